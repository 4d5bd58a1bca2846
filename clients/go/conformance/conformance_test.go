package conformance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/dispatch-run/dispatch/clients/go/dispatch"
	"github.com/dispatch-run/dispatch/clients/go/dispatchv1"
)

// deadline is the scenario's bound on one subscribe and on one wait_turn (README.md).
const deadline = 30 * time.Second

var ended = map[string]bool{
	"TURN_STATE_COMPLETED":   true,
	"TURN_STATE_FAILED":      true,
	"TURN_STATE_ABORTED":     true,
	"TURN_STATE_INTERRUPTED": true,
}

type scenario struct {
	Cases []struct {
		Name  string           `json:"name"`
		Unary bool             `json:"unary"`
		Steps []map[string]any `json:"steps"`
	} `json:"cases"`
}

func TestScenario(t *testing.T) {
	env := map[string]string{}
	for _, name := range []string{"DISPATCH_CONFORMANCE_SCENARIO", "DISPATCH_ADDRESS", "DISPATCH_API_KEY", "DISPATCH_CONFORMANCE_OTHER_KEY"} {
		if env[name] = os.Getenv(name); env[name] == "" {
			t.Skipf("%s is not set: the conformance scenario runs against a stack (tests/conformance/test_go.py starts one)", name)
		}
	}
	data, err := os.ReadFile(env["DISPATCH_CONFORMANCE_SCENARIO"])
	if err != nil {
		t.Fatal(err)
	}
	var sc scenario
	decoder := json.NewDecoder(bytes.NewReader(data))
	decoder.UseNumber()
	if err := decoder.Decode(&sc); err != nil {
		t.Fatalf("%s: %v", env["DISPATCH_CONFORMANCE_SCENARIO"], err)
	}
	if len(sc.Cases) == 0 {
		t.Fatal("the scenario has no cases")
	}
	keys := map[string]string{"local": env["DISPATCH_API_KEY"], "other": env["DISPATCH_CONFORMANCE_OTHER_KEY"], "nobody": "not-a-key"}
	clients := map[string]*dispatch.Client{}
	for who, key := range keys {
		client, err := dispatch.New(dispatch.WithAddress(env["DISPATCH_ADDRESS"]), dispatch.WithAPIKey(key))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		clients[who] = client
	}
	for _, c := range sc.Cases {
		t.Run(c.Name, func(t *testing.T) {
			r := &runner{clients: clients, saved: map[string]any{}}
			for index, step := range c.Steps {
				if err := r.step(step); err != nil {
					t.Fatalf("step %d (%v): %v", index, step["op"], err)
				}
			}
		})
	}
}

// callFailed is a call that ended with a gRPC status: code is its name (NOT_FOUND).
type callFailed struct{ code, message string }

func (e *callFailed) Error() string { return e.code + ": " + e.message }

type runner struct {
	clients map[string]*dispatch.Client
	saved   map[string]any
}

func (r *runner) step(step map[string]any) error {
	op, _ := step["op"].(string)
	if op == "expect" {
		return r.expect(step)
	}
	who, _ := step["as"].(string)
	if who == "" {
		who = "local"
	}
	result, err := r.call(r.clients[who], op, step)
	if failed, ok := err.(*callFailed); ok {
		if want, _ := step["error"].(string); want != failed.code {
			return fmt.Errorf("failed with %s: %s", failed.code, failed.message)
		}
		return nil
	}
	if err != nil {
		return err
	}
	if want, ok := step["error"]; ok {
		return fmt.Errorf("succeeded; expected %v", want)
	}
	if name, ok := step["save"].(string); ok {
		r.saved[name] = result
	}
	return nil
}

// ------------------------------------------------------------------- values

// resolve is value, or the saved value a "$name.path" names.
func (r *runner) resolve(value any) (any, error) {
	s, ok := value.(string)
	if !ok || !strings.HasPrefix(s, "$") {
		return value, nil
	}
	parts := strings.Split(s[1:], ".")
	here, ok := r.saved[parts[0]]
	if !ok {
		return nil, fmt.Errorf("%s: nothing saved as %q", s, parts[0])
	}
	for _, segment := range parts[1:] {
		switch node := here.(type) {
		case []any:
			switch {
			case segment == "count":
				here = len(node)
			case segment == "first" || segment == "last":
				if len(node) == 0 {
					return nil, fmt.Errorf("%s: the list is empty", s)
				}
				here = node[0]
				if segment == "last" {
					here = node[len(node)-1]
				}
			case strings.HasPrefix(segment, "kind:"):
				found := false
				for _, e := range node {
					if m, ok := e.(map[string]any); ok && m["__kind"] == segment[5:] {
						here, found = m, true
						break
					}
				}
				if !found {
					return nil, fmt.Errorf("%s: no %s event in the list", s, segment[5:])
				}
			default:
				i, err := strconv.Atoi(segment)
				if err != nil || i < 0 || i >= len(node) {
					return nil, fmt.Errorf("%s: no element %q in a list of %d", s, segment, len(node))
				}
				here = node[i]
			}
		case map[string]any:
			next, ok := node[segment]
			if !ok {
				return nil, fmt.Errorf("%s: no field %q", s, segment)
			}
			here = next
		default:
			return nil, fmt.Errorf("%s: %q of a %T", s, segment, here)
		}
	}
	return here, nil
}

func (r *runner) arg(step map[string]any, name string, fallback any) (any, error) {
	value, ok := step[name]
	if !ok {
		return fallback, nil
	}
	return r.resolve(value)
}

func (r *runner) str(step map[string]any, name string) (string, error) {
	value, err := r.arg(step, name, "")
	if err != nil {
		return "", err
	}
	s, ok := value.(string)
	if !ok {
		return "", fmt.Errorf("%s is %v, not a string", name, value)
	}
	return s, nil
}

func (r *runner) integer(step map[string]any, name string) (int64, error) {
	value, err := r.arg(step, name, 0)
	if err != nil {
		return 0, err
	}
	n, ok := number(value)
	if !ok {
		return 0, fmt.Errorf("%s is %v, not a number", name, value)
	}
	return n, nil
}

// number reads a JSON number, an int or an int64 written as a string (the proto3 JSON mapping).
func number(value any) (int64, bool) {
	switch v := value.(type) {
	case int:
		return int64(v), true
	case float64:
		return int64(v), v == float64(int64(v))
	case json.Number:
		n, err := v.Int64()
		return n, err == nil
	case string:
		n, err := strconv.ParseInt(v, 10, 64)
		return n, err == nil
	}
	return 0, false
}

// same is equality with numbers compared as numbers.
func same(a, b any) bool {
	x, aok := number(a)
	y, bok := number(b)
	if aok && bok {
		return x == y
	}
	return fmt.Sprint(a) == fmt.Sprint(b)
}

// asData is message in the proto3 JSON mapping with proto field names and every field without
// presence, decoded; an AgentEvent also carries its kind as "__kind".
func asData(message proto.Message) (map[string]any, error) {
	raw, err := protojson.MarshalOptions{UseProtoNames: true, EmitDefaultValues: true}.Marshal(message)
	if err != nil {
		return nil, err
	}
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	var data map[string]any
	if err := decoder.Decode(&data); err != nil {
		return nil, err
	}
	if event, ok := message.(*dispatchv1.AgentEvent); ok {
		data["__kind"] = kind(event)
	}
	return data, nil
}

func kind(event *dispatchv1.AgentEvent) string {
	m := event.ProtoReflect()
	if field := m.WhichOneof(m.Descriptor().Oneofs().ByName("kind")); field != nil {
		return string(field.Name())
	}
	return ""
}

// ------------------------------------------------------------------- calls

func (r *runner) call(client *dispatch.Client, op string, step map[string]any) (any, error) {
	result, err := r.sdkCall(client, op, step)
	var failed *dispatch.Error
	if errors.As(err, &failed) {
		return nil, &callFailed{code: dispatch.CodeName(failed.Code), message: failed.Message}
	}
	if err != nil {
		return nil, err
	}
	if message, ok := result.(proto.Message); ok {
		return asData(message)
	}
	return result, nil
}

func (r *runner) sdkCall(client *dispatch.Client, op string, step map[string]any) (any, error) {
	conv, err := r.str(step, "conversation")
	if err != nil {
		return nil, err
	}
	ctx := context.Background() // unary calls get the client's default deadline
	switch op {
	case "create_conversation":
		agent, _ := step["agent"].(string)
		title, _ := step["title"].(string)
		return client.CreateConversation(ctx, &dispatchv1.PublicCreateConversationRequest{Agent: agent, Title: title})
	case "get_conversation":
		return client.GetConversation(ctx, conv)
	case "send":
		text, err := r.str(step, "text")
		if err != nil {
			return nil, err
		}
		key, err := r.str(step, "idempotency_key")
		if err != nil {
			return nil, err
		}
		policy, err := r.enum(step, "policy", "SEND_POLICY_ENQUEUE", dispatchv1.SendPolicy_value)
		if err != nil {
			return nil, err
		}
		return client.Send(ctx, &dispatchv1.SendRequest{ConversationId: conv, Text: text, Policy: dispatchv1.SendPolicy(policy), IdempotencyKey: key})
	case "subscribe":
		return r.subscribe(client, conv, step)
	case "cancel":
		turn, err := r.str(step, "turn_id")
		if err != nil {
			return nil, err
		}
		return client.Cancel(ctx, conv, turn)
	case "get_turn", "wait_turn":
		turn, err := r.str(step, "turn_id")
		if err != nil {
			return nil, err
		}
		until := time.Now().Add(deadline)
		for {
			got, err := client.GetTurn(ctx, conv, turn)
			if err != nil || op == "get_turn" || ended[got.GetState().String()] {
				return got, err
			}
			if time.Now().After(until) {
				return nil, fmt.Errorf("turn still %s after %s", got.GetState(), deadline)
			}
			time.Sleep(50 * time.Millisecond)
		}
	case "list_turns":
		return client.ListTurns(ctx, &dispatchv1.PublicListTurnsRequest{ConversationId: conv})
	case "history":
		return client.History(ctx, &dispatchv1.HistoryRequest{ConversationId: conv})
	case "list_approvals":
		pending, err := r.arg(step, "pending_only", false)
		if err != nil {
			return nil, err
		}
		only, _ := pending.(bool)
		return client.ListApprovals(ctx, conv, only)
	case "resolve_approval":
		id, err := r.str(step, "approval_id")
		if err != nil {
			return nil, err
		}
		reason, err := r.str(step, "reason")
		if err != nil {
			return nil, err
		}
		decision, err := r.enum(step, "decision", "", dispatchv1.ApprovalDecision_value)
		if err != nil {
			return nil, err
		}
		return client.ResolveApproval(ctx, &dispatchv1.PublicResolveApprovalRequest{ApprovalId: id, Decision: dispatchv1.ApprovalDecision(decision), Reason: reason})
	}
	return nil, fmt.Errorf("unknown op %q", op)
}

// enum is the argument name, a full enum value name (SEND_POLICY_REJECT), as its number.
func (r *runner) enum(step map[string]any, name, fallback string, values map[string]int32) (int32, error) {
	s, err := r.str(step, name)
	if err != nil {
		return 0, err
	}
	if s == "" {
		s = fallback
	}
	n, ok := values[s]
	if !ok {
		return 0, fmt.Errorf("%s: unknown value %q", name, s)
	}
	return n, nil
}

// subscribe reads with the client's own Subscribe (its resume logic), under the scenario's
// deadline. stop_after and stop_at drop the stream by cancelling its context, as a lost
// connection would.
func (r *runner) subscribe(client *dispatch.Client, conv string, step map[string]any) ([]any, error) {
	after, err := r.integer(step, "after_event_seq")
	if err != nil {
		return nil, err
	}
	opts := []dispatch.SubscribeOption{dispatch.After(after)}
	if _, ok := step["until"]; ok {
		until, err := r.enum(step, "until", "", dispatchv1.SubscribeUntil_value)
		if err != nil {
			return nil, err
		}
		opts = append(opts, dispatch.Until(dispatchv1.SubscribeUntil(until)))
	}
	stopAfter, hasStopAfter := number(step["stop_after"])
	stopAt, _ := step["stop_at"].(string)
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	events := []any{}
	for event, err := range client.Subscribe(ctx, conv, opts...) {
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("subscribe: no end after %s and %d events: %w", deadline, len(events), err)
			}
			return nil, err
		}
		data, err := asData(event)
		if err != nil {
			return nil, err
		}
		events = append(events, data)
		if (hasStopAfter && int64(len(events)) == stopAfter) || (stopAt != "" && kind(event) == stopAt) {
			cancel() // drop the stream, as a lost connection would
			break
		}
	}
	return events, nil
}

// ------------------------------------------------------------------- expect

func (r *runner) expect(step map[string]any) error {
	if raw, ok := step["value"]; ok {
		value, err := r.resolve(raw)
		if err != nil {
			return err
		}
		if other, ok := step["equals"]; ok {
			want, err := r.resolve(other)
			if err != nil {
				return err
			}
			if !same(value, want) {
				return fmt.Errorf("%v is %v, not %v", raw, value, want)
			}
		}
		if other, ok := step["differs"]; ok {
			want, err := r.resolve(other)
			if err != nil {
				return err
			}
			if same(value, want) {
				return fmt.Errorf("%v is %v, the same as %v", raw, value, other)
			}
		}
	}
	if raw, ok := step["events"]; ok {
		events, err := r.events(raw)
		if err != nil {
			return err
		}
		if err := checkEvents(events, step); err != nil {
			return err
		}
	}
	if raw, ok := step["joined"]; ok {
		parts, _ := raw.([]any)
		var joined []map[string]any
		for _, part := range parts {
			events, err := r.events(part)
			if err != nil {
				return err
			}
			joined = append(joined, events...)
		}
		whole, err := r.events(step["equals"])
		if err != nil {
			return err
		}
		if a, b := summary(joined), summary(whole); !slices.Equal(a, b) {
			return fmt.Errorf("joined %v != %v", a, b)
		}
		if a, b := text(joined), text(whole); a != b {
			return fmt.Errorf("joined text %q != %q", a, b)
		}
	}
	return nil
}

func (r *runner) events(raw any) ([]map[string]any, error) {
	value, err := r.resolve(raw)
	if err != nil {
		return nil, err
	}
	list, ok := value.([]any)
	if !ok {
		return nil, fmt.Errorf("%v is not a list of events", raw)
	}
	events := make([]map[string]any, 0, len(list))
	for _, e := range list {
		m, ok := e.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("%v holds %T, not an event", raw, e)
		}
		events = append(events, m)
	}
	return events, nil
}

func kinds(events []map[string]any) []string {
	out := make([]string, len(events))
	for i, e := range events {
		out[i], _ = e["__kind"].(string)
	}
	return out
}

func text(events []map[string]any) string {
	var b strings.Builder
	for _, e := range events {
		if e["__kind"] == "text_delta" {
			delta, _ := e["text_delta"].(map[string]any)
			s, _ := delta["text"].(string)
			b.WriteString(s)
		}
	}
	return b.String()
}

func summary(events []map[string]any) []string {
	out := make([]string, len(events))
	for i, e := range events {
		out[i] = fmt.Sprintf("%v:%v", e["event_seq"], e["__kind"])
	}
	return out
}

func names(value any) []string {
	list, _ := value.([]any)
	out := make([]string, len(list))
	for i, v := range list {
		out[i], _ = v.(string)
	}
	return out
}

func checkEvents(events []map[string]any, step map[string]any) error {
	seen := kinds(events)
	if raw, ok := step["count"]; ok {
		if n, _ := number(raw); int64(len(events)) != n {
			return fmt.Errorf("%d events: %v", len(events), seen)
		}
	}
	if raw, ok := step["starts_with"]; ok {
		want := names(raw)
		if len(seen) < len(want) || !slices.Equal(seen[:len(want)], want) {
			return fmt.Errorf("starts %v", seen)
		}
	}
	if raw, ok := step["ends_with"]; ok {
		want := names(raw)
		if len(seen) < len(want) || !slices.Equal(seen[len(seen)-len(want):], want) {
			return fmt.Errorf("ends %v", seen)
		}
	}
	if raw, ok := step["contains"]; ok {
		want := names(raw)
		i := 0
		for _, k := range seen {
			if i < len(want) && k == want[i] {
				i++
			}
		}
		if i < len(want) {
			return fmt.Errorf("%v not in order in %v", want, seen)
		}
	}
	for _, k := range names(step["excludes"]) {
		if slices.Contains(seen, k) {
			return fmt.Errorf("%s in %v", k, seen)
		}
	}
	if raw, ok := step["text"]; ok {
		if got := text(events); got != raw {
			return fmt.Errorf("text %q, want %q", got, raw)
		}
	}
	if raw, ok := step["consecutive_from"]; ok {
		first, _ := number(raw)
		for i, e := range events {
			if seq, _ := number(e["event_seq"]); seq != first+int64(i) {
				return fmt.Errorf("event_seqs %v", summary(events))
			}
		}
	}
	return nil
}
