package dispatch

// These tests run the client against a real gRPC server in this process (the generated
// DispatchServer on a loopback port) whose streams break, end and resync on purpose: the
// client's own logic, without a Dispatch stack. tests/conformance runs it against dispatchd.

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/dispatch-run/dispatch/clients/go/dispatchv1"
)

// fake is a Dispatch server whose Subscribe runs the test's script, one function per call.
type fake struct {
	dispatchv1.UnimplementedDispatchServer
	mu        sync.Mutex
	requests  []*dispatchv1.SubscribeRequest
	calls     []func(*dispatchv1.SubscribeRequest, grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error
	auth      []string
	deadlines []bool
	send      func(*dispatchv1.SendRequest) (*dispatchv1.SendResponse, error)
}

func (f *fake) Subscribe(req *dispatchv1.SubscribeRequest, stream grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
	f.mu.Lock()
	n := len(f.requests)
	f.requests = append(f.requests, req)
	f.note(stream.Context())
	f.mu.Unlock()
	if n >= len(f.calls) {
		return status.Error(codes.FailedPrecondition, "the test's script has no more calls")
	}
	return f.calls[n](req, stream)
}

func (f *fake) note(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.auth = append(f.auth, md.Get("authorization")...)
	_, ok := ctx.Deadline()
	f.deadlines = append(f.deadlines, ok)
}

func (f *fake) GetConversation(ctx context.Context, req *dispatchv1.PublicGetConversationRequest) (*dispatchv1.Conversation, error) {
	f.mu.Lock()
	f.note(ctx)
	f.mu.Unlock()
	if req.GetConversationId() != "conv_1" {
		return nil, status.Errorf(codes.NotFound, "conversation %s not found", req.GetConversationId())
	}
	return &dispatchv1.Conversation{Id: "conv_1"}, nil
}

func (f *fake) Send(ctx context.Context, req *dispatchv1.SendRequest) (*dispatchv1.SendResponse, error) {
	return f.send(req)
}

func (f *fake) subscribeRequests() []*dispatchv1.SubscribeRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.requests)
}

// serve starts f on a loopback port and returns a client of it (with a 1 ms backoff, so the
// tests do not wait; the schedule itself is checked in TestBackoffSchedule).
func serve(t *testing.T, f *fake, opts ...Option) *Client {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	dispatchv1.RegisterDispatchServer(server, f)
	go func() { _ = server.Serve(lis) }()
	t.Cleanup(server.Stop)
	opts = append([]Option{WithAddress(lis.Addr().String()), WithAPIKey("test-key"), WithBackoff(time.Millisecond, time.Millisecond)}, opts...)
	client, err := New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func text(seq int64, s string) *dispatchv1.AgentEvent {
	return &dispatchv1.AgentEvent{ConversationId: "conv_1", TurnId: "turn_1", EventSeq: seq, Kind: &dispatchv1.AgentEvent_TextDelta{TextDelta: &dispatchv1.TextDelta{Text: s}}}
}

func batch(events ...*dispatchv1.AgentEvent) *dispatchv1.SubscribeResponse {
	return &dispatchv1.SubscribeResponse{Events: events}
}

func collect(t *testing.T, seq func(func(*dispatchv1.AgentEvent, error) bool)) ([]int64, error) {
	t.Helper()
	var seqs []int64
	for event, err := range seq {
		if err != nil {
			return seqs, err
		}
		seqs = append(seqs, event.GetEventSeq())
	}
	return seqs, nil
}

func TestSubscribeResumesABrokenStreamFromTheLastEvent(t *testing.T) {
	f := &fake{}
	f.calls = append(f.calls,
		func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			_ = s.Send(batch(text(1, "a"), text(2, "b")))
			_ = s.Send(batch(text(3, "c")))
			return status.Error(codes.Unavailable, "the server is shutting down")
		},
		func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			return status.Error(codes.Internal, "a dropped connection")
		},
		func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			// An overlap with what was already yielded: never yielded twice.
			_ = s.Send(batch(text(2, "b"), text(3, "c"), text(4, "d")))
			return s.Send(batch(text(5, "e")))
		},
	)
	client := serve(t, f)
	seqs, err := collect(t, client.Subscribe(testContext(t), "conv_1", Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_TURN_SEALED)))
	if err != nil {
		t.Fatalf("subscribe failed: %v", err)
	}
	if want := []int64{1, 2, 3, 4, 5}; !slices.Equal(seqs, want) {
		t.Fatalf("events %v, want %v", seqs, want)
	}
	var after []int64
	for _, r := range f.subscribeRequests() {
		after = append(after, r.GetAfterEventSeq())
		if r.GetUntil() != dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_TURN_SEALED {
			t.Fatalf("resubscribed with until %v", r.GetUntil())
		}
	}
	if want := []int64{0, 3, 3}; !slices.Equal(after, want) {
		t.Fatalf("subscribed after %v, want %v", after, want)
	}
}

func TestSubscribeResubscribesOnResync(t *testing.T) {
	f := &fake{}
	f.calls = append(f.calls,
		func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			_ = s.Send(batch(text(8, "a")))
			_ = s.Send(&dispatchv1.SubscribeResponse{Resync: &dispatchv1.Resync{AfterEventSeq: 8}})
			// The client hangs up after a resync; nothing after it is read.
			<-s.Context().Done()
			return nil
		},
		func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			return s.Send(batch(text(9, "b")))
		},
	)
	client := serve(t, f)
	seqs, err := collect(t, client.Subscribe(testContext(t), "conv_1", After(7), Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_CAUGHT_UP)))
	if err != nil || !slices.Equal(seqs, []int64{8, 9}) {
		t.Fatalf("events %v, error %v", seqs, err)
	}
	if r := f.subscribeRequests(); len(r) != 2 || r[0].GetAfterEventSeq() != 7 || r[1].GetAfterEventSeq() != 8 {
		t.Fatalf("requests %v", r)
	}
}

func TestAFollowStreamThatEndsIsResumedAndABoundedOneIsOver(t *testing.T) {
	ends := func(events ...*dispatchv1.AgentEvent) func(*dispatchv1.SubscribeRequest, grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		return func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
			return s.Send(batch(events...))
		}
	}
	f := &fake{}
	f.calls = append(f.calls, ends(text(1, "a")), ends(text(2, "b")))
	client := serve(t, f)
	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	var seqs []int64
	for event, err := range client.Subscribe(ctx, "conv_1") {
		if err != nil {
			t.Fatalf("follow failed: %v", err)
		}
		if seqs = append(seqs, event.GetEventSeq()); len(seqs) == 2 {
			break
		}
	}
	if !slices.Equal(seqs, []int64{1, 2}) || len(f.subscribeRequests()) != 2 {
		t.Fatalf("events %v after %d subscriptions", seqs, len(f.subscribeRequests()))
	}

	bounded := &fake{}
	bounded.calls = append(bounded.calls, ends(text(1, "a")), ends(text(2, "b")))
	seqs, err := collect(t, serve(t, bounded).Subscribe(ctx, "conv_1", Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_CAUGHT_UP)))
	if err != nil || !slices.Equal(seqs, []int64{1}) || len(bounded.subscribeRequests()) != 1 {
		t.Fatalf("bounded: events %v, error %v, %d subscriptions", seqs, err, len(bounded.subscribeRequests()))
	}
}

func TestSubscribeFailsAtOnceOnAStatusNotToResumeFrom(t *testing.T) {
	f := &fake{}
	f.calls = append(f.calls, func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		return status.Error(codes.NotFound, "conversation conv_x not found")
	})
	client := serve(t, f)
	_, err := collect(t, client.Subscribe(testContext(t), "conv_x"))
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("error %v, want NOT_FOUND", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Message != "conversation conv_x not found" || err.Error() != "NOT_FOUND: conversation conv_x not found" {
		t.Fatalf("error %#v", err)
	}
	if len(f.subscribeRequests()) != 1 {
		t.Fatalf("subscribed %d times", len(f.subscribeRequests()))
	}
}

func TestSubscribeGivesUpAfterMaxReconnectsAndNoReconnectRaises(t *testing.T) {
	broken := func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		return status.Error(codes.Unavailable, "down")
	}
	f := &fake{}
	f.calls = append(f.calls, broken, broken, broken, broken)
	client := serve(t, f)
	_, err := collect(t, client.Subscribe(testContext(t), "conv_1", MaxReconnects(2)))
	if !errors.Is(err, ErrUnavailable) || err.Error() != "UNAVAILABLE: down (gave up after 2 reconnects)" {
		t.Fatalf("error %v", err)
	}
	if n := len(f.subscribeRequests()); n != 3 {
		t.Fatalf("subscribed %d times, want 3", n)
	}

	once := &fake{}
	once.calls = append(once.calls, broken, broken)
	_, err = collect(t, serve(t, once).Subscribe(testContext(t), "conv_1", NoReconnect()))
	if !errors.Is(err, ErrUnavailable) || len(once.subscribeRequests()) != 1 {
		t.Fatalf("error %v after %d subscriptions", err, len(once.subscribeRequests()))
	}
}

func TestCancellingTheContextEndsTheStreamWithCancelled(t *testing.T) {
	f := &fake{}
	f.calls = append(f.calls, func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		_ = s.Send(batch(text(1, "a")))
		<-s.Context().Done()
		return nil
	})
	client := serve(t, f)
	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	var seqs []int64
	var failed error
	for event, err := range client.Subscribe(ctx, "conv_1") {
		if err != nil {
			failed = err
			break
		}
		seqs = append(seqs, event.GetEventSeq())
		cancel() // as a runner that drops the stream
	}
	if !slices.Equal(seqs, []int64{1}) || !errors.Is(failed, context.Canceled) || !errors.Is(failed, ErrCanceled) {
		t.Fatalf("events %v, error %v", seqs, failed)
	}
	if Code(failed) != codes.Canceled || status.Code(failed) != codes.Canceled {
		t.Fatalf("code %v", Code(failed))
	}
}

func TestEveryCallSendsTheKeyAndUnaryCallsGetADefaultDeadline(t *testing.T) {
	f := &fake{}
	f.calls = append(f.calls, func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		return nil
	})
	client := serve(t, f)
	if _, err := client.GetConversation(context.Background(), "conv_1"); err != nil {
		t.Fatal(err)
	}
	_, err := client.GetConversation(context.Background(), "conv_x")
	if !errors.Is(err, ErrNotFound) || Code(err) != codes.NotFound {
		t.Fatalf("error %v", err)
	}
	if _, err := collect(t, client.Subscribe(testContext(t), "conv_1", Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_CAUGHT_UP))); err != nil {
		t.Fatal(err)
	}
	noDeadline, cancel := context.WithCancel(context.Background())
	defer cancel()
	for range client.Subscribe(noDeadline, "conv_1", Until(dispatchv1.SubscribeUntil_SUBSCRIBE_UNTIL_CAUGHT_UP)) {
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !slices.Equal(f.auth, []string{"Bearer test-key", "Bearer test-key", "Bearer test-key", "Bearer test-key"}) {
		t.Fatalf("authorization %v", f.auth)
	}
	// Unary: the default deadline; the stream with testContext's: its own; the last: none.
	if !slices.Equal(f.deadlines, []bool{true, true, true, false}) {
		t.Fatalf("deadlines %v", f.deadlines)
	}
}

func TestNoKeyNoHeader(t *testing.T) {
	f := &fake{}
	client := serve(t, f, WithAPIKey(""))
	if _, err := client.GetConversation(testContext(t), "conv_1"); err != nil {
		t.Fatal(err)
	}
	if len(f.auth) != 0 {
		t.Fatalf("authorization %v", f.auth)
	}
}

func turnEvent(seq int64, turn string, kind any) *dispatchv1.AgentEvent {
	e := &dispatchv1.AgentEvent{ConversationId: "conv_1", TurnId: turn, EventSeq: seq}
	switch k := kind.(type) {
	case *dispatchv1.TurnStarted:
		e.Kind = &dispatchv1.AgentEvent_TurnStarted{TurnStarted: k}
	case *dispatchv1.TextDelta:
		e.Kind = &dispatchv1.AgentEvent_TextDelta{TextDelta: k}
	case *dispatchv1.TurnDone:
		e.Kind = &dispatchv1.AgentEvent_TurnDone{TurnDone: k}
	case *dispatchv1.TurnSealed:
		e.Kind = &dispatchv1.AgentEvent_TurnSealed{TurnSealed: k}
	}
	return e
}

func TestRunTurnFollowsAQueuedMessageIntoTheNextTurn(t *testing.T) {
	f := &fake{send: func(req *dispatchv1.SendRequest) (*dispatchv1.SendResponse, error) {
		return &dispatchv1.SendResponse{TurnId: "turn_1", Queued: true, AfterEventSeq: 10}, nil
	}}
	f.calls = append(f.calls, func(req *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		if req.GetAfterEventSeq() != 10 {
			return status.Errorf(codes.InvalidArgument, "after %d", req.GetAfterEventSeq())
		}
		_ = s.Send(batch(
			turnEvent(11, "turn_1", &dispatchv1.TextDelta{Text: "running"}),
			turnEvent(12, "turn_1", &dispatchv1.TurnDone{}),
			turnEvent(13, "turn_1", &dispatchv1.TurnSealed{}),
			turnEvent(14, "turn_2", &dispatchv1.TurnStarted{}),
			turnEvent(15, "turn_2", &dispatchv1.TextDelta{Text: "mine"}),
			turnEvent(16, "turn_2", &dispatchv1.TurnDone{}),
			turnEvent(17, "turn_2", &dispatchv1.TurnSealed{}),
			turnEvent(18, "turn_3", &dispatchv1.TurnStarted{}),
		))
		<-s.Context().Done()
		return nil
	})
	client := serve(t, f)
	seqs, err := collect(t, client.RunTurn(testContext(t), &dispatchv1.SendRequest{ConversationId: "conv_1", Text: "hi"}))
	if err != nil || !slices.Equal(seqs, []int64{11, 12, 13, 14, 15, 16, 17}) {
		t.Fatalf("events %v, error %v", seqs, err)
	}
}

func TestRunTurnReportsAFailedSend(t *testing.T) {
	f := &fake{send: func(req *dispatchv1.SendRequest) (*dispatchv1.SendResponse, error) {
		return nil, status.Error(codes.FailedPrecondition, "a turn is running")
	}}
	client := serve(t, f)
	_, err := collect(t, client.RunTurn(testContext(t), &dispatchv1.SendRequest{ConversationId: "conv_1", Text: "hi", Policy: dispatchv1.SendPolicy_SEND_POLICY_REJECT}))
	if !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("error %v", err)
	}
}

func TestBackoffSchedule(t *testing.T) {
	r := newResume("conv_1", defaultBackoff, nil, nil)
	broken := status.Error(codes.Unavailable, "down")
	var delays []time.Duration
	for range 8 {
		r.request()
		if err := r.broke(broken); err != nil {
			t.Fatal(err)
		}
		delays = append(delays, r.next)
	}
	ms := time.Millisecond
	if want := []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 5000 * ms, 5000 * ms}; !slices.Equal(delays, want) {
		t.Fatalf("delays %v, want %v", delays, want)
	}
	// An event resets the exponent; a resync after progress resubscribes at once.
	r.request()
	r.accept(batch(text(1, "a")))
	if err := r.broke(broken); err != nil || r.next != 100*ms {
		t.Fatalf("after progress: %v, %v", r.next, err)
	}
	r.request()
	r.accept(&dispatchv1.SubscribeResponse{Events: []*dispatchv1.AgentEvent{text(2, "b")}, Resync: &dispatchv1.Resync{AfterEventSeq: 2}})
	if err := r.ended(); err != nil || r.next != 0 || r.done {
		t.Fatalf("after resync: %v, %v, done %v", r.next, err, r.done)
	}
	if r.cursor != 2 {
		t.Fatalf("cursor %d", r.cursor)
	}
}

func TestAddressAndKeyFromTheEnvironment(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "api_key"), []byte("file-key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DISPATCH_ADDRESS", "")
	t.Setenv("DISPATCH_API_KEY", "")
	t.Setenv("DISPATCH_DATA_DIR", dir)
	if FindAddress() != DefaultAddress || FindAPIKey() != "file-key" {
		t.Fatalf("address %q key from file %v", FindAddress(), FindAPIKey() == "file-key")
	}
	t.Setenv("DISPATCH_ADDRESS", " 127.0.0.1:9 ")
	t.Setenv("DISPATCH_API_KEY", "env-key")
	if FindAddress() != "127.0.0.1:9" || FindAPIKey() != "env-key" {
		t.Fatalf("address %q, key from env %v", FindAddress(), FindAPIKey() == "env-key")
	}
	client, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if client.Address() != "127.0.0.1:9" {
		t.Fatalf("address %q", client.Address())
	}
}

func TestErrorText(t *testing.T) {
	if s := (&Error{Code: codes.FailedPrecondition, Message: "a turn is running"}).Error(); s != "FAILED_PRECONDITION: a turn is running" {
		t.Fatal(s)
	}
	if s := ErrUnauthenticated.Error(); s != "UNAUTHENTICATED" {
		t.Fatal(s)
	}
	if errors.Is(&Error{Code: codes.NotFound}, context.Canceled) {
		t.Fatal("NOT_FOUND is not context.Canceled")
	}
	if errors.Is(&Error{Code: codes.DeadlineExceeded}, context.DeadlineExceeded) != true {
		t.Fatal("DEADLINE_EXCEEDED is context.DeadlineExceeded")
	}
}

func TestTurnFollowerEndsAtTheSealOfATurnThatTookTheMessageAsSteering(t *testing.T) {
	f := newTurnFollower(&dispatchv1.SendResponse{TurnId: "turn_1", Queued: true})
	steered := &dispatchv1.AgentEvent{TurnId: "turn_1", EventSeq: 2, Kind: &dispatchv1.AgentEvent_SteeringInjected{SteeringInjected: &dispatchv1.SteeringInjected{}}}
	for _, e := range []*dispatchv1.AgentEvent{turnEvent(1, "turn_1", &dispatchv1.TextDelta{}), steered, turnEvent(3, "turn_1", &dispatchv1.TurnDone{})} {
		if !f.accept(e) || f.done {
			t.Fatalf("event %d: done %v", e.GetEventSeq(), f.done)
		}
	}
	if !f.accept(turnEvent(4, "turn_1", &dispatchv1.TurnSealed{})) || !f.done {
		t.Fatal("the seal of the steered turn ends it")
	}
	if f.accept(turnEvent(5, "turn_2", &dispatchv1.TurnStarted{})) {
		t.Fatal("the next turn is not this message's")
	}

	// After turn_done, a fatal error is the turn ending unsealed.
	unsealed := newTurnFollower(&dispatchv1.SendResponse{TurnId: "turn_1"})
	fatal := &dispatchv1.AgentEvent{TurnId: "turn_1", EventSeq: 3, Kind: &dispatchv1.AgentEvent_Error{Error: &dispatchv1.ErrorEvent{Fatal: true, Code: "store"}}}
	unsealed.accept(turnEvent(2, "turn_1", &dispatchv1.TurnDone{}))
	if !unsealed.accept(fatal) || !unsealed.done {
		t.Fatal("a fatal error after turn_done ends the turn")
	}
}

func TestSubscribeSurvivesTheServerGoingAwayAndComingBack(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := lis.Addr().String()
	first := &fake{}
	first.calls = append(first.calls, func(_ *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		_ = s.Send(batch(text(1, "a"), text(2, "b")))
		<-s.Context().Done()
		return nil
	})
	gone := grpc.NewServer()
	dispatchv1.RegisterDispatchServer(gone, first)
	go func() { _ = gone.Serve(lis) }()
	defer gone.Stop()

	second := &fake{}
	second.calls = append(second.calls, func(req *dispatchv1.SubscribeRequest, s grpc.ServerStreamingServer[dispatchv1.SubscribeResponse]) error {
		return s.Send(batch(text(2, "b"), text(3, "c")))
	})
	back := grpc.NewServer()
	dispatchv1.RegisterDispatchServer(back, second)
	defer back.Stop()

	client, err := New(WithAddress(address), WithAPIKey("test-key"), WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	var seqs []int64
	for event, err := range client.Subscribe(testContext(t), "conv_1") {
		if err != nil {
			t.Fatalf("after %v: %v", seqs, err)
		}
		seqs = append(seqs, event.GetEventSeq())
		switch event.GetEventSeq() {
		case 2:
			// The server goes away mid-stream (connections cut), and another takes its address.
			gone.Stop()
			again, err := net.Listen("tcp", address)
			if err != nil {
				t.Fatalf("listen again on %s: %v", address, err)
			}
			go func() { _ = back.Serve(again) }()
		case 3:
			if !slices.Equal(seqs, []int64{1, 2, 3}) {
				t.Fatalf("events %v", seqs)
			}
			if r := second.subscribeRequests(); r[len(r)-1].GetAfterEventSeq() != 2 {
				t.Fatalf("resubscribed after %d", r[len(r)-1].GetAfterEventSeq())
			}
			return
		}
	}
	t.Fatalf("the stream ended after %v", seqs)
}

func TestEveryPublicRPCHasAMethod(t *testing.T) {
	rpcs := reflect.TypeFor[dispatchv1.DispatchClient]()
	client := reflect.TypeFor[*Client]()
	for i := range rpcs.NumMethod() {
		name := rpcs.Method(i).Name
		method, ok := client.MethodByName(name)
		if !ok {
			t.Errorf("the RPC %s has no method on *Client", name)
			continue
		}
		if method.Type.NumIn() < 2 || method.Type.In(1) != reflect.TypeFor[context.Context]() {
			t.Errorf("%s does not take a context.Context first", name)
		}
	}
}
