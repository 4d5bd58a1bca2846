// Package dispatch is the Go client of Dispatch, an agent runtime served over gRPC
// (dispatch.v1.Dispatch, proto/dispatch/v1/transport.proto).
//
// A [Client] has a method for every public call. Unary calls get the client's default
// deadline (30 s; [WithTimeout]) when their context has none. [Client.Subscribe] streams a
// conversation's events and resubscribes by itself from the last event_seq it yielded;
// [Client.RunTurn] sends a message and streams the turn that takes it. Every failure is an
// [*Error] carrying the gRPC status code; errors.Is(err, [ErrNotFound]) tests for one.
// The message types are in package dispatchv1 (github.com/dispatch-run/dispatch/clients/go/dispatchv1).
package dispatch

import (
	"context"
	"iter"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dispatch-run/dispatch/clients/go/dispatchv1"
)

const (
	// DefaultAddress is where the client connects unless told otherwise (dispatchd up's default).
	DefaultAddress = "127.0.0.1:7600"
	// DefaultTimeout is a unary call's deadline when its context has none.
	DefaultTimeout = 30 * time.Second
)

// Client is a connection to a Dispatch server with one API key. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	rpc     dispatchv1.DispatchClient
	address string
	timeout time.Duration
	log     *slog.Logger
	backoff backoff
}

type config struct {
	address     string
	apiKey      string
	haveKey     bool
	timeout     time.Duration
	creds       credentials.TransportCredentials
	dialOptions []grpc.DialOption
	log         *slog.Logger
	backoff     backoff
}

// Option configures [New].
type Option func(*config)

// WithAddress is the server's host:port (default: DISPATCH_ADDRESS, else [DefaultAddress]).
func WithAddress(address string) Option { return func(c *config) { c.address = address } }

// WithAPIKey is the key every call sends as `authorization: Bearer <key>` (default:
// [FindAPIKey]). An empty key sends none, and the server answers UNAUTHENTICATED.
func WithAPIKey(key string) Option {
	return func(c *config) { c.apiKey, c.haveKey = key, true }
}

// WithTimeout is the deadline of a unary call whose context has none (default [DefaultTimeout];
// 0: none). Streams never get one: give their context a deadline, or cancel it.
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithTransportCredentials secures the connection (default: plaintext, as dispatchd serves on
// loopback; put TLS in front of it for anything else).
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(c *config) { c.creds = creds }
}

// WithDialOptions adds options to grpc.NewClient (interceptors, keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOptions = append(c.dialOptions, opts...) }
}

// WithLogger is where the client says why it resubscribes (default: nowhere). API keys are
// never logged.
func WithLogger(log *slog.Logger) Option { return func(c *config) { c.log = log } }

// WithBackoff is how long a subscription waits before resubscribing after a failure: initial,
// doubling with each failure in a row, at most max (default 100 ms and 5 s).
func WithBackoff(initial, max time.Duration) Option {
	return func(c *config) { c.backoff = backoff{initial: initial, max: max} }
}

// FindAddress is the server's address: DISPATCH_ADDRESS, else [DefaultAddress].
func FindAddress() string {
	if address := strings.TrimSpace(os.Getenv("DISPATCH_ADDRESS")); address != "" {
		return address
	}
	return DefaultAddress
}

// FindAPIKey is the API key: DISPATCH_API_KEY, else the api_key file that `dispatchd up` writes
// to its data directory (DISPATCH_DATA_DIR, default .dispatch), else "".
func FindAPIKey() string {
	if key := strings.TrimSpace(os.Getenv("DISPATCH_API_KEY")); key != "" {
		return key
	}
	dir := os.Getenv("DISPATCH_DATA_DIR")
	if dir == "" {
		dir = ".dispatch"
	}
	data, err := os.ReadFile(filepath.Join(dir, "api_key"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// New makes a client. It connects lazily, on the first call (as grpc.NewClient), so it fails
// only on options that cannot work. Close it when done.
func New(opts ...Option) (*Client, error) {
	cfg := config{timeout: DefaultTimeout, backoff: defaultBackoff}
	for _, opt := range opts {
		opt(&cfg)
	}
	if cfg.address == "" {
		cfg.address = FindAddress()
	}
	if !cfg.haveKey {
		cfg.apiKey = FindAPIKey()
	}
	if cfg.creds == nil {
		cfg.creds = insecure.NewCredentials()
	}
	if cfg.log == nil {
		cfg.log = slog.New(slog.DiscardHandler)
	}
	dial := []grpc.DialOption{
		grpc.WithTransportCredentials(cfg.creds),
		grpc.WithChainUnaryInterceptor(defaultDeadline(cfg.timeout)),
	}
	if cfg.apiKey != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{key: cfg.apiKey, secure: cfg.creds.Info().SecurityProtocol != "insecure"}))
	}
	conn, err := grpc.NewClient(cfg.address, append(dial, cfg.dialOptions...)...)
	if err != nil {
		return nil, wrap(err)
	}
	return &Client{
		conn:    conn,
		rpc:     dispatchv1.NewDispatchClient(conn),
		address: cfg.address,
		timeout: cfg.timeout,
		log:     cfg.log,
		backoff: cfg.backoff,
	}, nil
}

// Address is the server's address the client was made with.
func (c *Client) Address() string { return c.address }

// Close closes the connection; calls and streams still open on it end.
func (c *Client) Close() error { return c.conn.Close() }

// Stub is the generated client over the same connection (the API key and the default deadline
// apply; its errors are plain gRPC statuses).
func (c *Client) Stub() dispatchv1.DispatchClient { return c.rpc }

// bearer sends the API key on every call. It never appears in a log or an error.
type bearer struct {
	key    string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.key}, nil
}

// RequireTransportSecurity is false only on a plaintext connection the caller chose (the
// default, for dispatchd on loopback); with TLS the key travels only over TLS.
func (b bearer) RequireTransportSecurity() bool { return b.secure }

func (b bearer) String() string { return "bearer(<redacted>)" }

// defaultDeadline gives a unary call whose context has no deadline one of d (0: none).
func defaultDeadline(d time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := ctx.Deadline(); !ok && d > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

func unary[Req, Resp any](ctx context.Context, call func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	resp, err := call(ctx, req)
	if err != nil {
		var zero Resp
		return zero, wrap(err)
	}
	return resp, nil
}

// ------------------------------------------------------------------ workspaces

// CreateWorkspace creates a workspace: a root directory tools resolve paths against (confined
// to it with ConfineTools), the computer and agent its conversations default to, and
// permission rules over the agents'.
func (c *Client) CreateWorkspace(ctx context.Context, req *dispatchv1.PublicCreateWorkspaceRequest) (*dispatchv1.Workspace, error) {
	return unary(ctx, c.rpc.CreateWorkspace, orNew(req))
}

// ListWorkspaces is one page of the tenant's workspaces; see [Client.AllWorkspaces].
func (c *Client) ListWorkspaces(ctx context.Context, req *dispatchv1.PublicListWorkspacesRequest) (*dispatchv1.ListWorkspacesResponse, error) {
	return unary(ctx, c.rpc.ListWorkspaces, orNew(req))
}

// AllWorkspaces is every workspace of the tenant, fetched page by page (pageSize 0: the
// server's default).
func (c *Client) AllWorkspaces(ctx context.Context, pageSize int32) iter.Seq2[*dispatchv1.Workspace, error] {
	return pages(ctx, func(ctx context.Context, token string) ([]*dispatchv1.Workspace, string, error) {
		r, err := c.ListWorkspaces(ctx, &dispatchv1.PublicListWorkspacesRequest{PageSize: pageSize, PageToken: token})
		return r.GetWorkspaces(), r.GetNextPageToken(), err
	})
}

// -------------------------------------------------------------- conversations

// CreateConversation creates a conversation (in the default workspace unless WorkspaceId is
// set); Cwd, ComputerId and Agent override the workspace's. A nil request takes every default.
func (c *Client) CreateConversation(ctx context.Context, req *dispatchv1.PublicCreateConversationRequest) (*dispatchv1.Conversation, error) {
	return unary(ctx, c.rpc.CreateConversation, orNew(req))
}

// ListConversations is one page of conversations (of WorkspaceId if set); see
// [Client.AllConversations].
func (c *Client) ListConversations(ctx context.Context, req *dispatchv1.PublicListConversationsRequest) (*dispatchv1.ListConversationsResponse, error) {
	return unary(ctx, c.rpc.ListConversations, orNew(req))
}

// AllConversations is every conversation (of workspaceID if not empty), page by page.
func (c *Client) AllConversations(ctx context.Context, workspaceID string, pageSize int32) iter.Seq2[*dispatchv1.Conversation, error] {
	return pages(ctx, func(ctx context.Context, token string) ([]*dispatchv1.Conversation, string, error) {
		r, err := c.ListConversations(ctx, &dispatchv1.PublicListConversationsRequest{WorkspaceId: workspaceID, PageSize: pageSize, PageToken: token})
		return r.GetConversations(), r.GetNextPageToken(), err
	})
}

// GetConversation is the conversation; NOT_FOUND if it does not exist (or is another tenant's).
func (c *Client) GetConversation(ctx context.Context, conversationID string) (*dispatchv1.Conversation, error) {
	return unary(ctx, c.rpc.GetConversation, &dispatchv1.PublicGetConversationRequest{ConversationId: conversationID})
}

// UpdateConversation sets the fields set in req (proto3 optional: nil leaves one alone, a
// pointer to "" clears an override); see [String] for the pointers.
func (c *Client) UpdateConversation(ctx context.Context, req *dispatchv1.PublicUpdateConversationRequest) (*dispatchv1.Conversation, error) {
	return unary(ctx, c.rpc.UpdateConversation, orNew(req))
}

// DeleteConversation deletes the conversation with its messages and events.
func (c *Client) DeleteConversation(ctx context.Context, conversationID string) error {
	_, err := unary(ctx, c.rpc.DeleteConversation, &dispatchv1.PublicDeleteConversationRequest{ConversationId: conversationID})
	return err
}

// String is a pointer to s, for the optional fields of [dispatchv1.PublicUpdateConversationRequest].
func String(s string) *string { return &s }

// ---------------------------------------------------------------------- turns

// Send sends a user message (Text, or Chunks). With a turn running, Policy says what happens:
// SEND_POLICY_ENQUEUE (the default: the answer has Queued and the running turn's id),
// SEND_POLICY_INTERRUPT or SEND_POLICY_REJECT (FAILED_PRECONDITION). A repeat with the same
// IdempotencyKey answers with the turn the first started. Subscribe from the answer's
// AfterEventSeq to follow the turn, or use [Client.RunTurn].
func (c *Client) Send(ctx context.Context, req *dispatchv1.SendRequest) (*dispatchv1.SendResponse, error) {
	return unary(ctx, c.rpc.Send, orNew(req))
}

// Cancel aborts the conversation's running turn (only if it is turnID, when not empty). The
// answer's TurnId is the turn aborted, empty when none was.
func (c *Client) Cancel(ctx context.Context, conversationID, turnID string) (*dispatchv1.CancelResponse, error) {
	return unary(ctx, c.rpc.Cancel, &dispatchv1.CancelRequest{ConversationId: conversationID, TurnId: turnID})
}

// GetTurn is the turn: its state, attempts, lease, finish reason and times. NOT_FOUND if the
// conversation has no such turn (or is another tenant's).
func (c *Client) GetTurn(ctx context.Context, conversationID, turnID string) (*dispatchv1.Turn, error) {
	return unary(ctx, c.rpc.GetTurn, &dispatchv1.PublicGetTurnRequest{ConversationId: conversationID, TurnId: turnID})
}

// ListTurns is one page of a conversation's turns, oldest first, only those in States when
// set; see [Client.AllTurns].
func (c *Client) ListTurns(ctx context.Context, req *dispatchv1.PublicListTurnsRequest) (*dispatchv1.ListTurnsResponse, error) {
	return unary(ctx, c.rpc.ListTurns, orNew(req))
}

// AllTurns is every turn of the conversation (in states, when given), oldest first, page by page.
func (c *Client) AllTurns(ctx context.Context, conversationID string, states ...dispatchv1.TurnState) iter.Seq2[*dispatchv1.Turn, error] {
	return pages(ctx, func(ctx context.Context, token string) ([]*dispatchv1.Turn, string, error) {
		r, err := c.ListTurns(ctx, &dispatchv1.PublicListTurnsRequest{ConversationId: conversationID, States: states, PageToken: token})
		return r.GetTurns(), r.GetNextPageToken(), err
	})
}

// ------------------------------------------------------------------ approvals

// ResolveApproval decides a pending approval: approve, reject (with a Reason the model is
// told) or edit (with EditedInputJson); Remember lets the same call run without asking for
// the rest of the conversation. Deciding one twice is FAILED_PRECONDITION.
func (c *Client) ResolveApproval(ctx context.Context, req *dispatchv1.PublicResolveApprovalRequest) (*dispatchv1.Approval, error) {
	return unary(ctx, c.rpc.ResolveApproval, orNew(req))
}

// Approve lets the waiting call run; with remember, the same call runs without asking for the
// rest of the conversation.
func (c *Client) Approve(ctx context.Context, approvalID string, remember bool) (*dispatchv1.Approval, error) {
	return c.ResolveApproval(ctx, &dispatchv1.PublicResolveApprovalRequest{ApprovalId: approvalID, Decision: dispatchv1.ApprovalDecision_APPROVAL_DECISION_APPROVE, Remember: remember})
}

// Reject refuses the waiting call: it does not run, and the model gets an error result with reason.
func (c *Client) Reject(ctx context.Context, approvalID, reason string) (*dispatchv1.Approval, error) {
	return c.ResolveApproval(ctx, &dispatchv1.PublicResolveApprovalRequest{ApprovalId: approvalID, Decision: dispatchv1.ApprovalDecision_APPROVAL_DECISION_REJECT, Reason: reason})
}

// Edit runs the waiting call with inputJSON (a JSON object) instead; input the tool's schema
// does not take is INVALID_ARGUMENT, and the approval stays open.
func (c *Client) Edit(ctx context.Context, approvalID, inputJSON string, remember bool) (*dispatchv1.Approval, error) {
	return c.ResolveApproval(ctx, &dispatchv1.PublicResolveApprovalRequest{ApprovalId: approvalID, Decision: dispatchv1.ApprovalDecision_APPROVAL_DECISION_EDIT, EditedInputJson: inputJSON, Remember: remember})
}

// ListApprovals is the conversation's approvals, oldest first; only those still waiting with
// pendingOnly.
func (c *Client) ListApprovals(ctx context.Context, conversationID string, pendingOnly bool) (*dispatchv1.ListApprovalsResponse, error) {
	return unary(ctx, c.rpc.ListApprovals, &dispatchv1.PublicListApprovalsRequest{ConversationId: conversationID, PendingOnly: pendingOnly})
}

// ---------------------------------------------------------- history and the rest

// History is the committed messages with seq > AfterSeq, at most Limit (0: all); the answer's
// LastSeq is the conversation's highest seq. See [Client.AllHistory].
func (c *Client) History(ctx context.Context, req *dispatchv1.HistoryRequest) (*dispatchv1.HistoryResponse, error) {
	return unary(ctx, c.rpc.History, orNew(req))
}

// AllHistory is every committed message with seq > afterSeq, pageSize per call (0: 500).
func (c *Client) AllHistory(ctx context.Context, conversationID string, afterSeq int64, pageSize int32) iter.Seq2[*dispatchv1.Message, error] {
	if pageSize <= 0 {
		pageSize = 500
	}
	return func(yield func(*dispatchv1.Message, error) bool) {
		after := afterSeq
		for {
			r, err := c.History(ctx, &dispatchv1.HistoryRequest{ConversationId: conversationID, AfterSeq: after, Limit: pageSize})
			if err != nil {
				yield(nil, err)
				return
			}
			for _, m := range r.GetMessages() {
				if !yield(m, nil) {
					return
				}
			}
			messages := r.GetMessages()
			if len(messages) == 0 || messages[len(messages)-1].GetSeq() >= r.GetLastSeq() {
				return
			}
			after = messages[len(messages)-1].GetSeq()
		}
	}
}

// Metrics is per-turn (and per-step) metrics of the conversation, of one turn when turnID is
// not empty.
func (c *Client) Metrics(ctx context.Context, conversationID, turnID string) (*dispatchv1.GetMetricsResponse, error) {
	return unary(ctx, c.rpc.Metrics, &dispatchv1.MetricsRequest{ConversationId: conversationID, TurnId: turnID})
}

// Models is the models the server's agents use.
func (c *Client) Models(ctx context.Context) (*dispatchv1.ModelsResponse, error) {
	return unary(ctx, c.rpc.Models, &dispatchv1.ModelsRequest{})
}

// Computers is the computers tools can run on: this machine and the SSH config's hosts.
func (c *Client) Computers(ctx context.Context) (*dispatchv1.ComputersResponse, error) {
	return unary(ctx, c.rpc.Computers, &dispatchv1.ComputersRequest{})
}

// CreateStreamToken is a short-lived token that opens one conversation's event stream over
// HTTP without the API key (for a browser's EventSource); ttl 0: the server's default.
func (c *Client) CreateStreamToken(ctx context.Context, conversationID string, ttl time.Duration) (*dispatchv1.StreamToken, error) {
	return unary(ctx, c.rpc.CreateStreamToken, &dispatchv1.CreateStreamTokenRequest{ConversationId: conversationID, TtlSeconds: int32(ttl / time.Second)})
}

// orNew is req, or a new empty request when it is nil (for requests that may be all defaults).
func orNew[T any](req *T) *T {
	if req == nil {
		return new(T)
	}
	return req
}

// pages walks a paged listing: page(token) is one page's items and the next page's token.
func pages[T any](ctx context.Context, page func(context.Context, string) ([]T, string, error)) iter.Seq2[T, error] {
	return func(yield func(T, error) bool) {
		token := ""
		for {
			items, next, err := page(ctx, token)
			if err != nil {
				var zero T
				yield(zero, err)
				return
			}
			for _, item := range items {
				if !yield(item, nil) {
					return
				}
			}
			if next == "" {
				return
			}
			token = next
		}
	}
}
