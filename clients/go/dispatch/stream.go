package dispatch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/dispatch-run/dispatch/clients/go/dispatchv1"
)

// resumable are the statuses a broken stream is resumed on; any other is the caller's to
// handle. INTERNAL and UNKNOWN are what a connection dropped mid-stream often surfaces as;
// RESOURCE_EXHAUSTED is how a server without Resync messages says "you fell behind".
var resumable = map[codes.Code]bool{
	codes.Unavailable:       true,
	codes.Internal:          true,
	codes.Unknown:           true,
	codes.ResourceExhausted: true,
	codes.Aborted:           true,
}

type backoff struct{ initial, max time.Duration }

var defaultBackoff = backoff{initial: 100 * time.Millisecond, max: 5 * time.Second}

// SubscribeOption configures [Client.Subscribe].
type SubscribeOption func(*resume)

// After starts the subscription after event_seq seq (default 0: from the first event).
func After(seq int64) SubscribeOption { return func(r *resume) { r.cursor = seq } }

// Until says where the subscription ends (default SUBSCRIBE_UNTIL_FOLLOW: never):
// SUBSCRIBE_UNTIL_CAUGHT_UP after the events up to the live edge at the moment of subscribing;
// SUBSCRIBE_UNTIL_TURN_SEALED after the turn_sealed of the turn running (or queued) then, or,
// with none running, as CAUGHT_UP.
func Until(until dispatchv1.SubscribeUntil) SubscribeOption {
	return func(r *resume) { r.until = until }
}

// NoReconnect makes a broken stream an error instead of resubscribing.
func NoReconnect() SubscribeOption { return func(r *resume) { r.reconnect = false } }

// MaxReconnects gives up after n resubscriptions (default: never gives up).
func MaxReconnects(n int) SubscribeOption { return func(r *resume) { r.maxReconnects = n } }

// SubscribeBackoff overrides the client's [WithBackoff] for one subscription.
func SubscribeBackoff(initial, max time.Duration) SubscribeOption {
	return func(r *resume) { r.backoff = backoff{initial: initial, max: max} }
}

// resume is one subscription's cursor and its reconnect decisions: which request to send,
// which events of a response are new, and after a stream ends or breaks whether (and after
// how long) to subscribe again. The Python SDK's Resume (dispatch_client/_stream.py), decision
// for decision.
type resume struct {
	conversationID string
	// The last event_seq yielded (or the caller's starting point).
	cursor        int64
	until         dispatchv1.SubscribeUntil
	reconnect     bool
	maxReconnects int // < 0: no limit
	backoff       backoff
	log           *slog.Logger

	// Set by a response carrying Resync: the server ends the stream; subscribe again.
	resync     bool
	reconnects int
	// Reconnects in a row without an event in between: the backoff's exponent.
	failures int
	progress bool
	// The wait before the next subscription; done: stop.
	next time.Duration
	done bool
}

func newResume(conversationID string, b backoff, log *slog.Logger, opts []SubscribeOption) *resume {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &resume{conversationID: conversationID, reconnect: true, maxReconnects: -1, backoff: b, log: log}
	for _, opt := range opts {
		opt(r)
	}
	if r.until == dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_UNSPECIFIED {
		r.until = dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_FOLLOW
	}
	return r
}

// follow: a follow stream never ends by design, so one that does is resumed; a bounded one
// that ends with OK is over.
func (r *resume) follow() bool { return r.until == dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_FOLLOW }

// request is the next (re)subscription's: from the last event yielded.
func (r *resume) request() *dispatchv1.SubscribeRequest {
	r.resync, r.progress = false, false
	return &dispatchv1.SubscribeRequest{ConversationId: r.conversationID, AfterEventSeq: r.cursor, Until: r.until}
}

// accept is the response's events not yielded yet, in order; the cursor moves past them.
func (r *resume) accept(resp *dispatchv1.SubscribeResponse) []*dispatchv1.AgentEvent {
	var fresh []*dispatchv1.AgentEvent
	for _, event := range resp.GetEvents() {
		if event.GetEventSeq() > r.cursor {
			r.cursor = event.GetEventSeq()
			fresh = append(fresh, event)
		}
	}
	if len(fresh) > 0 {
		r.progress, r.failures = true, 0
	}
	if resp.GetResync() != nil {
		r.resync = true
		r.log.Info("the server asked for a resync; resubscribing",
			"conversation", r.conversationID, "after_event_seq", resp.GetResync().GetAfterEventSeq(), "from", r.cursor)
	}
	return fresh
}

// ended: the stream ended without an error (or after a resync). Only a follow stream, which
// should never end, is resumed; a bounded one has reached its end.
func (r *resume) ended() error {
	switch {
	case r.resync:
		return r.schedule(nil, r.progress)
	case r.follow() && r.reconnect:
		r.log.Info("the event stream ended; resubscribing", "conversation", r.conversationID)
		return r.schedule(nil, false)
	default:
		r.done = true
		return nil
	}
}

// broke: the stream failed with err. The error is returned when it is not one to resume from.
func (r *resume) broke(err error) error {
	e := asError(err)
	if !r.reconnect || !resumable[e.Code] {
		r.done = true
		return e
	}
	if err := r.schedule(e, false); err != nil {
		return err
	}
	r.log.Warn("the event stream broke; resubscribing",
		"conversation", r.conversationID, "error", e.Error(), "in", r.next)
	return nil
}

func (r *resume) schedule(cause *Error, immediate bool) error {
	if r.maxReconnects >= 0 && r.reconnects >= r.maxReconnects {
		r.done = true
		gaveUp := fmt.Sprintf("gave up after %d reconnects", r.reconnects)
		if cause == nil {
			return &Error{Code: codes.Unavailable, Message: "the event stream ended; " + gaveUp}
		}
		return &Error{Code: cause.Code, Message: fmt.Sprintf("%s (%s)", cause.Message, gaveUp)}
	}
	r.reconnects++
	if immediate {
		r.next = 0
		return nil
	}
	delay := r.backoff.initial
	for i := 0; i < r.failures && delay > 0 && delay < r.backoff.max; i++ {
		delay *= 2
	}
	delay = min(delay, r.backoff.max)
	r.next = delay
	r.failures++
	return nil
}

// Subscribe streams every event of the conversation after [After]'s event_seq (default 0),
// one by one: history, then live, until [Until] says it is over (default: never; follow the
// live tail until ctx ends or the loop breaks).
//
// When the server asks for a resync, the stream breaks (UNAVAILABLE, as when the server shuts
// down; INTERNAL, UNKNOWN, ABORTED, as a dropped connection surfaces; RESOURCE_EXHAUSTED) or a
// follow stream just ends, it subscribes again from the last event_seq it yielded, with the
// same until, backing off exponentially between failed attempts ([WithBackoff];
// [MaxReconnects] gives up, [NoReconnect] makes it an error). A bounded stream that ends with
// OK is over; a resumed one ends where the new subscription says. No event is missed or
// yielded twice. Any other failure (UNAUTHENTICATED, NOT_FOUND, ..., and CANCELLED or
// DEADLINE_EXCEEDED when ctx ends) is yielded once as an [*Error], and the sequence ends.
// Breaking out of the loop ends the stream at once.
func (c *Client) Subscribe(ctx context.Context, conversationID string, opts ...SubscribeOption) iter.Seq2[*dispatchv1.AgentEvent, error] {
	return func(yield func(*dispatchv1.AgentEvent, error) bool) {
		r := newResume(conversationID, c.backoff, c.log, opts)
		for !r.done {
			if r.next > 0 {
				timer := time.NewTimer(r.next)
				select {
				case <-ctx.Done():
					timer.Stop()
					yield(nil, asError(ctx.Err()))
					return
				case <-timer.C:
				}
			}
			stop, err := c.subscribeOnce(ctx, r, yield)
			if stop {
				return
			}
			if err != nil {
				yield(nil, err)
				return
			}
		}
	}
}

// subscribeOnce runs one Subscribe call: it yields the new events, and says whether the
// caller stopped (stop) or the subscription failed for good (err).
func (c *Client) subscribeOnce(ctx context.Context, r *resume, yield func(*dispatchv1.AgentEvent, error) bool) (stop bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the call: after a resync, a break, or an error
	stream, err := c.rpc.Subscribe(ctx, r.request())
	if err != nil {
		return false, r.broke(err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return false, r.ended()
		}
		if err != nil {
			return false, r.broke(err)
		}
		for _, event := range r.accept(resp) {
			if !yield(event, nil) {
				return true, nil
			}
		}
		if r.resync {
			return false, r.ended()
		}
	}
}

// turnFollower picks the events of the turn a Send answered (sent) out of the conversation's
// stream, and says when it is over. A message queued behind a running turn is either taken by
// that turn as steering, or starts the next turn after the seal: without a steering_injected in
// the running turn, the follower goes on to the next turn that starts. The Python SDK's
// TurnFollower.
type turnFollower struct {
	turnID   string
	queued   bool
	steered  bool
	turnDone bool
	done     bool
}

func newTurnFollower(sent *dispatchv1.SendResponse) *turnFollower {
	return &turnFollower{turnID: sent.GetTurnId(), queued: sent.GetQueued()}
}

// accept says whether event is one of the turn's; it sets done on its last.
func (f *turnFollower) accept(event *dispatchv1.AgentEvent) bool {
	if f.turnID == "" {
		// Waiting for the turn that takes the queued message.
		if event.GetTurnStarted() == nil {
			return false
		}
		f.turnID, f.queued = event.GetTurnId(), false
	}
	if event.GetTurnId() != f.turnID || f.done {
		return false
	}
	switch kind := event.GetKind().(type) {
	case *dispatchv1.AgentEvent_SteeringInjected:
		f.steered = true
	case *dispatchv1.AgentEvent_TurnDone:
		f.turnDone = true
	case *dispatchv1.AgentEvent_TurnSealed:
		if f.queued && !f.steered {
			f.turnID, f.turnDone = "", false // the message starts the next turn
		} else {
			f.done = true
		}
	case *dispatchv1.AgentEvent_Error:
		// After turn_done, a fatal error is the turn ending unsealed (the store failed).
		if kind.Error.GetFatal() && f.turnDone {
			f.done = true
		}
	}
	return true
}

// FollowTurn streams the events of the turn that sent (what [Client.Send] answered) started
// or was queued into, up to its turn_sealed, resubscribing as [Client.Subscribe] does. With
// SEND_POLICY_ENQUEUE a message sent while a turn runs is queued (sent.Queued, with the
// running turn's id): that turn's events come, and, unless it took the message as steering,
// the next turn's.
func (c *Client) FollowTurn(ctx context.Context, conversationID string, sent *dispatchv1.SendResponse, opts ...SubscribeOption) iter.Seq2[*dispatchv1.AgentEvent, error] {
	return func(yield func(*dispatchv1.AgentEvent, error) bool) {
		follower := newTurnFollower(sent)
		opts = append(append([]SubscribeOption{}, opts...), After(sent.GetAfterEventSeq()))
		for event, err := range c.Subscribe(ctx, conversationID, opts...) {
			if err != nil {
				yield(nil, err)
				return
			}
			if follower.accept(event) && !yield(event, nil) {
				return
			}
			if follower.done {
				return
			}
		}
	}
}

// RunTurn sends req (as [Client.Send]), then streams the events of the turn that takes the
// message up to its turn_sealed (as [Client.FollowTurn]). A failed Send is the sequence's only
// element.
func (c *Client) RunTurn(ctx context.Context, req *dispatchv1.SendRequest, opts ...SubscribeOption) iter.Seq2[*dispatchv1.AgentEvent, error] {
	return func(yield func(*dispatchv1.AgentEvent, error) bool) {
		sent, err := c.Send(ctx, req)
		if err != nil {
			yield(nil, err)
			return
		}
		for event, err := range c.FollowTurn(ctx, req.GetConversationId(), sent, opts...) {
			if !yield(event, err) {
				return
			}
		}
	}
}
