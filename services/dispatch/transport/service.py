"""The public ``dispatch.v1.Dispatch`` servicer.

Every call carries an API key (``authorization: Bearer <key>``); the key's
tenant scopes everything the call touches. ``Subscribe`` and ``GetConversation``
also take a stream token in its place (``tokens.py``): a browser's pass to one
conversation's events, minted by ``CreateStreamToken``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

import grpc

from dispatch.shared.errors import (
    Context,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    from_rpc_error,
    grpc_errors,
)
from dispatch.shared.ids import require_id
from dispatch.shared.limits import MAX_MESSAGE_CHARS
from dispatch.store.backend import APPROVAL_PREFIX, CONVERSATION_PREFIX, TURN_PREFIX
from dispatch.transport.auth import Authenticator, Caller, bearer
from dispatch.transport.fanout import Fanout, OpenStream
from dispatch.transport.kernels import Kernels
from dispatch.transport.tokens import StreamTokens, is_stream_token
from dispatch.v1 import (
    common_pb2,
    kernel_pb2,
    kernel_pb2_grpc,
    store_pb2,
    store_pb2_grpc,
    transport_pb2,
    transport_pb2_grpc,
)

LOCAL_TENANT = "local"
# What one message may hold, besides MAX_MESSAGE_CHARS of text.
MAX_CHUNKS = 64
MAX_IDEMPOTENCY_KEY = 200


def _conversation_id(value: str) -> str:
    return require_id(value, "conversation_id", CONVERSATION_PREFIX)


def _message_chunks(request: transport_pb2.SendRequest) -> list[common_pb2.Chunk]:
    """The user message's chunks: ``chunks``, or ``text`` as one; text only, within the limits."""
    chunks = list(request.chunks)
    if not chunks:
        if not request.text:
            raise InvalidArgument("the message is empty: set text or chunks")
        chunks = [common_pb2.Chunk(text=common_pb2.TextChunk(text=request.text))]
    elif request.text:
        raise InvalidArgument("set text or chunks, not both")
    if len(chunks) > MAX_CHUNKS:
        raise InvalidArgument(f"the message has {len(chunks)} chunks; the limit is {MAX_CHUNKS}")
    for i, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("kind")
        if kind != "text":
            raise InvalidArgument(
                f"chunk {i} is {kind or 'empty'}: a message from a client holds text chunks only"
            )
    size = sum(len(c.text.text) for c in chunks)
    if size > MAX_MESSAGE_CHARS:
        raise InvalidArgument(f"the message has {size} characters; the limit is {MAX_MESSAGE_CHARS}")
    if not any(c.text.text.strip() for c in chunks):
        raise InvalidArgument("the message has no text")
    return chunks


# A permission rule's pattern, at most (the kernel refuses longer ones too).
MAX_PATTERN_CHARS = 500
_ACTIONS = {
    common_pb2.PERMISSION_ACTION_ALLOW,
    common_pb2.PERMISSION_ACTION_ASK,
    common_pb2.PERMISSION_ACTION_DENY,
}
# What a client may decide; EXPIRED and CLOSED are the kernel's own decisions.
_CLIENT_DECISIONS = {
    common_pb2.APPROVAL_DECISION_APPROVE: "approve",
    common_pb2.APPROVAL_DECISION_REJECT: "reject",
    common_pb2.APPROVAL_DECISION_EDIT: "edit",
}


def _permission_rules(rules: Sequence[common_pb2.PermissionRule]) -> list[common_pb2.PermissionRule]:
    """``rules`` if each names a tool and an action and has a pattern within the limit; else
    ``InvalidArgument`` naming the rule (its index, tool and pattern)."""
    for i, rule in enumerate(rules):
        shown = f"{rule.tool[:80]!r}" + (f" {rule.pattern[:80]!r}" if rule.pattern else "")
        where = f"permissions[{i}] ({shown})"
        if not rule.tool.strip():
            raise InvalidArgument(f"{where}: tool is required: a tool's name, or * for any tool")
        if rule.action not in _ACTIONS:
            raise InvalidArgument(f"{where}: action must be allow, ask or deny")
        if len(rule.pattern) > MAX_PATTERN_CHARS:
            raise InvalidArgument(f"{where}: the pattern is longer than {MAX_PATTERN_CHARS} characters")
        if "\x00" in rule.pattern:
            raise InvalidArgument(f"{where}: the pattern holds a NUL character")
    return list(rules)


def _check_resolution(request: transport_pb2.PublicResolveApprovalRequest) -> None:
    """``InvalidArgument`` unless the decision is one a client makes (approve, reject, edit),
    edited input (a JSON object) comes exactly with edit, and remember only with approve or
    edit. Whether the edited input fits the tool's schema is the kernel's to say."""
    decision = request.decision
    if decision not in _CLIENT_DECISIONS:
        got = (
            common_pb2.ApprovalDecision.Name(decision).removeprefix("APPROVAL_DECISION_").lower()
            if decision in common_pb2.ApprovalDecision.values()
            else str(decision)
        )
        raise InvalidArgument(f"decision must be approve, reject or edit, got {got}")
    if decision == common_pb2.APPROVAL_DECISION_EDIT:
        if not request.edited_input_json:
            raise InvalidArgument("an edit decision needs edited_input_json: the tool's new input")
        try:
            edited = json.loads(request.edited_input_json)
        except ValueError as exc:
            raise InvalidArgument(f"edited_input_json is not valid JSON: {exc}") from None
        if not isinstance(edited, dict):
            raise InvalidArgument(f"edited_input_json must be a JSON object, got {type(edited).__name__}")
    elif request.edited_input_json:
        raise InvalidArgument("edited_input_json is only taken with an edit decision")
    if request.remember and decision == common_pb2.APPROVAL_DECISION_REJECT:
        raise InvalidArgument("remember is only taken with approve or edit")


T = TypeVar("T")


class DispatchServicer(transport_pb2_grpc.DispatchServicer):
    def __init__(
        self,
        kernel: kernel_pb2_grpc.KernelAsyncStub | None,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        rpc_timeout: float,
        *,
        kernel_events: OpenStream | None = None,
        kernels: Kernels | None = None,
        stream_tokens: StreamTokens | None = None,
    ):
        """``kernel_events``: the kernel's Subscribe decoded as ``EventBatchView`` (see
        ``fanout.event_view``); without it events are decoded and encoded again.
        ``kernels``: several kernels (found through the store); a conversation's calls go
        to the one running its turn, and ``kernel`` (then None) is not used.
        ``stream_tokens``: what mints and checks stream tokens (default: a secret of this
        process alone)."""
        if kernel is None and kernels is None:
            raise ValueError("a transport needs a kernel, or kernels found through the store")
        self.kernel = kernel
        self.kernels = kernels
        self.store = store
        self.timeout = rpc_timeout
        self.auth = Authenticator(store, rpc_timeout)
        self.tokens = stream_tokens or StreamTokens.from_config("")
        self.fanout = Fanout(kernel, open_stream=kernel_events, kernels=kernels)

    async def _kernel(
        self, tenant_id: str = "", conversation_id: str = ""
    ) -> kernel_pb2_grpc.KernelAsyncStub:
        """The kernel for a call about ``conversation_id`` (any kernel without one)."""
        if self.kernels is None:
            assert self.kernel is not None
            return self.kernel
        if conversation_id:
            return (await self.kernels.for_conversation(tenant_id, conversation_id)).stub
        return (await self.kernels.any()).stub

    async def _caller(self, context: Context) -> Caller:
        """Who calls, by API key; a stream token does not do here."""
        credential = bearer(context.invocation_metadata())
        if is_stream_token(credential):
            raise PermissionDenied(
                "a stream token opens only its conversation's events (Subscribe); this call needs an API key"
            )
        return await self.auth.caller(credential)

    async def _tenant(self, context: Context) -> str:
        return (await self._caller(context)).tenant_id

    async def _reader(self, context: Context, conversation_id: str) -> tuple[str, str]:
        """The tenant of a call that reads ``conversation_id``, and the id checked: by API key,
        or by a stream token minted for that conversation."""
        credential = bearer(context.invocation_metadata())
        if is_stream_token(credential):
            checked = _conversation_id(conversation_id)
            return self.tokens.check(credential, checked).tenant_id, checked
        tenant = await self.auth.tenant(credential)
        return tenant, _conversation_id(conversation_id)

    async def _require_agent(self, name: str, key: str) -> None:
        """Refuse an agent the kernel does not have: a conversation (or workspace) set to one
        could never take a message. Empty means the default, always fine."""
        if not name:
            return
        resp = await self._call(
            "could not check the agent",
            (await self._kernel()).ListModels(kernel_pb2.KernelListModelsRequest(), timeout=self.timeout),
        )
        agents = sorted({agent for model in resp.models for agent in model.agents})
        if name not in agents:
            raise InvalidArgument(
                f"{key}: no agent {name!r} is configured; configured agents: {', '.join(agents) or 'none'}"
            )

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, what) from None

    @grpc_errors
    async def CreateWorkspace(
        self, request: transport_pb2.PublicCreateWorkspaceRequest, context: Context
    ) -> common_pb2.Workspace:
        tenant = await self._tenant(context)
        permissions = _permission_rules(request.permissions)
        await self._require_agent(request.default_agent, "default_agent")
        return await self._call(
            "could not create the workspace",
            self.store.CreateWorkspace(
                store_pb2.CreateWorkspaceRequest(
                    tenant_id=tenant,
                    name=request.name,
                    root=request.root,
                    default_computer_id=request.default_computer_id,
                    default_agent=request.default_agent,
                    confine_tools=request.confine_tools,
                    permissions=permissions,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def ListWorkspaces(
        self, request: transport_pb2.PublicListWorkspacesRequest, context: Context
    ) -> common_pb2.ListWorkspacesResponse:
        tenant = await self._tenant(context)
        return await self._call(
            "could not list workspaces",
            self.store.ListWorkspaces(
                store_pb2.ListWorkspacesRequest(
                    tenant_id=tenant,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def CreateConversation(
        self, request: transport_pb2.PublicCreateConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        tenant = await self._tenant(context)
        await self._require_agent(request.agent, "agent")
        return await self._call(
            "could not create the conversation",
            self.store.CreateConversation(
                store_pb2.CreateConversationRequest(
                    tenant_id=tenant,
                    workspace_id=request.workspace_id,
                    title=request.title,
                    cwd=request.cwd,
                    computer_id=request.computer_id,
                    agent=request.agent,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def ListConversations(
        self, request: transport_pb2.PublicListConversationsRequest, context: Context
    ) -> common_pb2.ListConversationsResponse:
        tenant = await self._tenant(context)
        return await self._call(
            "could not list conversations",
            self.store.ListConversations(
                store_pb2.ListConversationsRequest(
                    tenant_id=tenant,
                    workspace_id=request.workspace_id,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def GetConversation(
        self, request: transport_pb2.PublicGetConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        tenant, conversation_id = await self._reader(context, request.conversation_id)
        return await self._conversation(tenant, conversation_id)

    async def _conversation(self, tenant: str, conversation_id: str) -> common_pb2.Conversation:
        return await self._call(
            "could not get the conversation",
            self.store.GetConversation(
                store_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def CreateStreamToken(
        self, request: transport_pb2.CreateStreamTokenRequest, context: Context
    ) -> transport_pb2.StreamToken:
        """A token that opens ``conversation_id``'s events for ``ttl_seconds``, in place of
        the API key (see ``tokens.py``). The conversation must be the caller's."""
        caller = await self._caller(context)
        conversation_id = _conversation_id(request.conversation_id)
        await self._conversation(caller.tenant_id, conversation_id)
        token, expires = self.tokens.mint(caller, conversation_id, request.ttl_seconds)
        reply = transport_pb2.StreamToken(token=token, conversation_id=conversation_id)
        reply.expires_at.FromDatetime(expires)
        return reply

    @grpc_errors
    async def DeleteConversation(
        self, request: transport_pb2.PublicDeleteConversationRequest, context: Context
    ) -> common_pb2.DeleteConversationResponse:
        tenant = await self._tenant(context)
        return await self._call(
            "could not delete the conversation",
            self.store.DeleteConversation(
                store_pb2.DeleteConversationRequest(
                    tenant_id=tenant,
                    conversation_id=_conversation_id(request.conversation_id),
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def UpdateConversation(
        self, request: transport_pb2.PublicUpdateConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        tenant = await self._tenant(context)
        update = store_pb2.UpdateConversationRequest(
            tenant_id=tenant,
            conversation_id=_conversation_id(request.conversation_id),
        )
        for name in ("title", "cwd", "computer_id", "agent"):
            if request.HasField(name):
                setattr(update, name, getattr(request, name))
        if request.HasField("agent"):
            await self._require_agent(request.agent, "agent")
        return await self._call(
            "could not update the conversation", self.store.UpdateConversation(update, timeout=self.timeout)
        )

    @grpc_errors
    async def Send(self, request: transport_pb2.SendRequest, context: Context) -> transport_pb2.SendResponse:
        tenant = await self._tenant(context)
        chunks = _message_chunks(request)
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        conversation_id = _conversation_id(request.conversation_id)
        start = kernel_pb2.StartTurnRequest(
            tenant_id=tenant,
            conversation_id=conversation_id,
            chunks=chunks,
            policy=request.policy,
            idempotency_key=request.idempotency_key,
        )
        resp = await self._start_turn(start)
        return transport_pb2.SendResponse(
            turn_id=resp.turn_id, state=resp.state, queued=resp.queued, after_event_seq=resp.after_event_seq
        )

    async def _start_turn(self, start: kernel_pb2.StartTurnRequest) -> kernel_pb2.StartTurnResponse:
        """StartTurn on the conversation's kernel. With several kernels, a kernel that could
        not take it is passed over and the next one asked, when asking again cannot start
        the message twice: the kernel refused it unseen, or the send has an idempotency key."""
        attempts = 3 if self.kernels is not None and self.kernels.relocates else 1
        for attempt in range(attempts):
            route = None
            if self.kernels is not None:
                route = await self.kernels.for_conversation(start.tenant_id, start.conversation_id)
            kernel = await self._kernel() if route is None else route.stub
            try:
                return await kernel.StartTurn(start, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE and (
                    bool(start.idempotency_key) or _unseen(exc)
                )
                if route is None or not retry or attempt + 1 == attempts:
                    raise from_rpc_error(exc, "could not start the turn") from None
                assert self.kernels is not None
                self.kernels.suspect(route.address)
        raise AssertionError("unreachable")

    @grpc_errors
    async def Subscribe(  # type: ignore[override]  # it yields pre-encoded responses too
        self, request: transport_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[transport_pb2.SubscribeResponse | bytes]:
        tenant, conversation_id = await self._reader(context, request.conversation_id)
        if request.after_event_seq < 0:
            raise InvalidArgument("after_event_seq must be 0 or more")
        if request.until not in common_pb2.SubscribeUntil.values():
            raise InvalidArgument(f"until must be one of {', '.join(common_pb2.SubscribeUntil.keys())}")
        async for batch in self.fanout.subscribe(
            tenant, conversation_id, request.after_event_seq, request.until
        ):
            if batch.resync_after is not None:
                yield transport_pb2.SubscribeResponse(
                    resync=transport_pb2.Resync(after_event_seq=batch.resync_after)
                )
            else:
                # Already a SubscribeResponse's bytes: the hub encoded each event once.
                yield batch.payload

    @grpc_errors
    async def Cancel(
        self, request: transport_pb2.CancelRequest, context: Context
    ) -> transport_pb2.CancelResponse:
        tenant = await self._tenant(context)
        resp = await self._call(
            "could not cancel the turn",
            (await self._kernel(tenant, _conversation_id(request.conversation_id))).Cancel(
                kernel_pb2.KernelCancelRequest(
                    tenant_id=tenant,
                    conversation_id=_conversation_id(request.conversation_id),
                    turn_id=request.turn_id,
                ),
                timeout=self.timeout,
            ),
        )
        return transport_pb2.CancelResponse(turn_id=resp.turn_id)

    @grpc_errors
    async def GetTurn(self, request: transport_pb2.PublicGetTurnRequest, context: Context) -> common_pb2.Turn:
        tenant = await self._tenant(context)
        conversation_id = _conversation_id(request.conversation_id)
        turn_id = require_id(request.turn_id, "turn_id", TURN_PREFIX)
        turn = await self._call(
            "could not get the turn",
            self.store.GetTurn(
                store_pb2.GetTurnRequest(tenant_id=tenant, turn_id=turn_id), timeout=self.timeout
            ),
        )
        # The store scopes a turn to its tenant only; the path names the conversation too, and
        # a turn reached through another conversation's path is not there.
        if turn.conversation_id != conversation_id:
            raise NotFound(f"turn {turn_id} not found in conversation {conversation_id}")
        return turn

    @grpc_errors
    async def ListTurns(
        self, request: transport_pb2.PublicListTurnsRequest, context: Context
    ) -> common_pb2.ListTurnsResponse:
        tenant = await self._tenant(context)
        conversation_id = _conversation_id(request.conversation_id)
        known = [v for v in common_pb2.TurnState.values() if v != common_pb2.TURN_STATE_UNSPECIFIED]
        for state in request.states:
            if state not in known:
                names = ", ".join(common_pb2.TurnState.Name(v) for v in known)
                raise InvalidArgument(f"states: {state} is not a turn state; expected one of {names}")
        # page_size and page_token are checked where the other listings check theirs: in the
        # store (0 or more, at most its MAX_PAGE_SIZE; a token it issued).
        return await self._call(
            "could not list turns",
            self.store.ListTurns(
                store_pb2.ListTurnsRequest(
                    tenant_id=tenant,
                    conversation_id=conversation_id,
                    states=request.states,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def ResolveApproval(
        self, request: transport_pb2.PublicResolveApprovalRequest, context: Context
    ) -> common_pb2.Approval:
        """Decide a pending approval, as the caller's key: the kernel records it (``decided_by``
        is the key's id) and lets the waiting call run, run with the edited input, or fail."""
        caller = await self._caller(context)
        approval_id = require_id(request.approval_id, "approval_id", APPROVAL_PREFIX)
        _check_resolution(request)
        kernel = await self._kernel()
        if self.kernels is not None:
            # The kernel whose turn waits for it wakes the call at once (any kernel could
            # decide it: the decision is the store's).
            approval = await self._call(
                "could not find the approval",
                self.store.GetApproval(
                    store_pb2.GetApprovalRequest(tenant_id=caller.tenant_id, approval_id=approval_id),
                    timeout=self.timeout,
                ),
            )
            kernel = await self._kernel(caller.tenant_id, approval.conversation_id)
        return await self._call(
            "could not resolve the approval",
            kernel.ResolveApproval(
                kernel_pb2.KernelResolveApprovalRequest(
                    tenant_id=caller.tenant_id,
                    approval_id=approval_id,
                    decision=request.decision,
                    edited_input_json=request.edited_input_json,
                    reason=request.reason,
                    decided_by=caller.key_id,
                    remember=request.remember,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def ListApprovals(
        self, request: transport_pb2.PublicListApprovalsRequest, context: Context
    ) -> common_pb2.ListApprovalsResponse:
        """The conversation's approvals, oldest first; only the pending ones when asked."""
        tenant = await self._tenant(context)
        return await self._call(
            "could not list approvals",
            self.store.ListApprovals(
                store_pb2.ListApprovalsRequest(
                    tenant_id=tenant,
                    conversation_id=_conversation_id(request.conversation_id),
                    pending_only=request.pending_only,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def History(
        self, request: transport_pb2.HistoryRequest, context: Context
    ) -> transport_pb2.HistoryResponse:
        tenant = await self._tenant(context)
        if request.after_seq < 0 or request.limit < 0:
            raise InvalidArgument("after_seq and limit must be 0 or more")
        resp = await self._call(
            "could not load the history",
            self.store.LoadSince(
                store_pb2.LoadSinceRequest(
                    tenant_id=tenant,
                    conversation_id=_conversation_id(request.conversation_id),
                    after_seq=request.after_seq,
                    limit=request.limit,
                ),
                timeout=self.timeout,
            ),
        )
        return transport_pb2.HistoryResponse(messages=resp.messages, last_seq=resp.last_seq)

    @grpc_errors
    async def Metrics(
        self, request: transport_pb2.MetricsRequest, context: Context
    ) -> common_pb2.GetMetricsResponse:
        tenant = await self._tenant(context)
        return await self._call(
            "could not load metrics",
            self.store.GetMetrics(
                store_pb2.GetMetricsRequest(
                    tenant_id=tenant,
                    conversation_id=_conversation_id(request.conversation_id),
                    turn_id=request.turn_id,
                ),
                timeout=self.timeout,
            ),
        )

    @grpc_errors
    async def Models(
        self, request: transport_pb2.ModelsRequest, context: Context
    ) -> transport_pb2.ModelsResponse:
        await self._tenant(context)  # authenticated, though not tenant-scoped
        resp = await self._call(
            "could not list models",
            (await self._kernel()).ListModels(kernel_pb2.KernelListModelsRequest(), timeout=self.timeout),
        )
        return transport_pb2.ModelsResponse(models=resp.models)

    @grpc_errors
    async def Computers(
        self, request: transport_pb2.ComputersRequest, context: Context
    ) -> transport_pb2.ComputersResponse:
        await self._tenant(context)  # authenticated, though not tenant-scoped
        resp = await self._call(
            "could not list computers",
            (await self._kernel()).ListComputers(
                kernel_pb2.KernelListComputersRequest(), timeout=self.timeout
            ),
        )
        return transport_pb2.ComputersResponse(computers=resp.computers)


def _unseen(exc: grpc.aio.AioRpcError) -> bool:
    """Whether an UNAVAILABLE call never reached a kernel that could have acted on it: the
    connection failed, or the kernel refused it as it shuts down."""
    details = (exc.details() or "").lower()
    return any(
        words in details
        for words in (
            "failed to connect",
            "connection refused",
            "shutting down",
            "connections to all backends",
        )
    )
