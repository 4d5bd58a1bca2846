"""The ``dispatch.v1.ConversationStore`` servicer: checks request fields, calls the backend.

Field checks (required ids, id shapes, enum values, signs) live here; rules about
content and state (append checks, the turn state machine, tenancy) live with the
backend, so every backend enforces them alike.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator

from google.protobuf import duration_pb2

from dispatch.shared.errors import Context, InvalidArgument, grpc_errors
from dispatch.shared.ids import require_id
from dispatch.shared.mux import MuxServer
from dispatch.store.backend import (
    API_KEY_PREFIX,
    APPROVAL_PREFIX,
    CONVERSATION_PREFIX,
    TURN_PREFIX,
    WORKSPACE_PREFIX,
    FinishReason,
    LeaseFence,
    LeaseRef,
    NextTurn,
    Store,
    TurnSeal,
    TurnState,
)
from dispatch.v1 import common_pb2, store_pb2, store_pb2_grpc

_TURN_STATES = frozenset(common_pb2.TurnState.values())
_FINISH_REASONS = frozenset(common_pb2.FinishReason.values())


def _tenant(tenant_id: str) -> str:
    if not tenant_id:
        raise InvalidArgument("tenant_id is required")
    return tenant_id


_id = require_id


def _optional_id(value: str, field: str, prefix: str) -> str:
    return _id(value, field, prefix) if value else ""


def _not_negative(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field} must be 0 or more, got {value}")
    return value


def _state(value: int, field: str) -> TurnState:
    if value not in _TURN_STATES or value == common_pb2.TURN_STATE_UNSPECIFIED:
        raise InvalidArgument(f"{field} must be a turn state, got {value}")
    return common_pb2.TurnState.ValueType(value)


def _finish_reason(value: int) -> FinishReason:
    if value not in _FINISH_REASONS:
        raise InvalidArgument(f"finish_reason {value} is not a finish reason")
    return common_pb2.FinishReason.ValueType(value)


def _required_text(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def _ttl(value: duration_pb2.Duration) -> datetime.timedelta:
    # Sign and size are the backend's rule (lease_ttl_ns); this only converts.
    return datetime.timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def _fence(request: store_pb2.AppendRequest) -> LeaseFence | None:
    if not request.HasField("fence"):
        return None
    fence = request.fence
    # Owner and epoch are the backend's rule (check_fence_fields); the id's shape is checked here.
    return LeaseFence(
        turn_id=_id(fence.turn_id, "fence.turn_id", TURN_PREFIX), owner=fence.owner, epoch=fence.epoch
    )


def _seal(request: store_pb2.AppendRequest) -> TurnSeal | None:
    if not request.HasField("seal"):
        return None
    return TurnSeal(
        state=_state(request.seal.state, "seal.state"),
        finish_reason=_finish_reason(request.seal.finish_reason),
        error_message=request.seal.error_message,
    )


def _next_turn(request: store_pb2.AppendRequest) -> NextTurn | None:
    if not request.HasField("next_turn"):
        return None
    wanted = request.next_turn
    state = wanted.state
    if state != common_pb2.TURN_STATE_UNSPECIFIED:
        state = _state(state, "next_turn.state")
    return NextTurn(
        lease_ttl=_ttl(wanted.lease_ttl),
        state=state,
        agent=wanted.agent,
        reserve_event_seq=wanted.reserve_event_seq,
    )


def _move_to(value: int) -> TurnState:
    # Which states an append may move its turn to is the backend's rule (MOVABLE_STATES).
    if value == common_pb2.TURN_STATE_UNSPECIFIED:
        return common_pb2.TURN_STATE_UNSPECIFIED
    return _state(value, "move_to")


def _approval_ids(approval: common_pb2.Approval, field: str) -> None:
    # An append's approvals may leave these empty (they are its fenced turn's).
    _optional_id(approval.conversation_id, f"{field}.conversation_id", CONVERSATION_PREFIX)
    _optional_id(approval.turn_id, f"{field}.turn_id", TURN_PREFIX)


def _lease_ref(index: int, ref: store_pb2.LeaseRef) -> LeaseRef:
    return LeaseRef(
        tenant_id=_required_text(ref.tenant_id, f"leases[{index}].tenant_id"),
        turn_id=_id(ref.turn_id, f"leases[{index}].turn_id", TURN_PREFIX),
        epoch=_not_negative(ref.epoch, f"leases[{index}].epoch"),
    )


class StoreServicer(store_pb2_grpc.ConversationStoreServicer):
    """Serves a ``Store`` backend over gRPC."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # AppendStream's calls: each answered by Append itself, so nothing about an append
        # (checks, fence, synced commit before the answer, errors) differs between the two.
        self.append_streams: MuxServer[store_pb2.AppendStreamRequest, store_pb2.AppendStreamResponse] = (
            MuxServer(self._append_one, store_pb2.AppendStreamResponse, what="store append")
        )

    # ------------------------------------------------------------ workspaces

    @grpc_errors
    async def CreateWorkspace(
        self, request: store_pb2.CreateWorkspaceRequest, context: Context
    ) -> common_pb2.Workspace:
        return await self.store.create_workspace(
            _tenant(request.tenant_id),
            name=_required_text(request.name, "name"),
            root=_required_text(request.root, "root"),
            default_computer_id=request.default_computer_id,
            default_agent=request.default_agent,
            confine_tools=request.confine_tools,
            permissions=request.permissions,
        )

    @grpc_errors
    async def GetWorkspace(
        self, request: store_pb2.GetWorkspaceRequest, context: Context
    ) -> common_pb2.Workspace:
        return await self.store.get_workspace(
            _tenant(request.tenant_id), _id(request.workspace_id, "workspace_id", WORKSPACE_PREFIX)
        )

    @grpc_errors
    async def ListWorkspaces(
        self, request: store_pb2.ListWorkspacesRequest, context: Context
    ) -> common_pb2.ListWorkspacesResponse:
        page = await self.store.list_workspaces(
            _tenant(request.tenant_id),
            page_size=_not_negative(request.page_size, "page_size"),
            page_token=request.page_token,
        )
        return common_pb2.ListWorkspacesResponse(workspaces=page.items, next_page_token=page.next_page_token)

    @grpc_errors
    async def UpdateWorkspace(
        self, request: store_pb2.UpdateWorkspaceRequest, context: Context
    ) -> common_pb2.Workspace:
        return await self.store.update_workspace(
            _tenant(request.tenant_id),
            _id(request.workspace_id, "workspace_id", WORKSPACE_PREFIX),
            # A workspace always has a name and a root; only the defaults may be cleared.
            name=_required_text(request.name, "name") if request.HasField("name") else None,
            root=_required_text(request.root, "root") if request.HasField("root") else None,
            default_computer_id=request.default_computer_id
            if request.HasField("default_computer_id")
            else None,
            default_agent=request.default_agent if request.HasField("default_agent") else None,
            confine_tools=request.confine_tools if request.HasField("confine_tools") else None,
            permissions=request.permissions.rules if request.HasField("permissions") else None,
        )

    # --------------------------------------------------------- conversations

    @grpc_errors
    async def CreateConversation(
        self, request: store_pb2.CreateConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        return await self.store.create_conversation(
            _tenant(request.tenant_id),
            workspace_id=_optional_id(request.workspace_id, "workspace_id", WORKSPACE_PREFIX),
            title=request.title,
            cwd=request.cwd,
            computer_id=request.computer_id,
            agent=request.agent,
        )

    @grpc_errors
    async def GetConversation(
        self, request: store_pb2.GetConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        return await self.store.get_conversation(
            _tenant(request.tenant_id), _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        )

    @grpc_errors
    async def ListConversations(
        self, request: store_pb2.ListConversationsRequest, context: Context
    ) -> common_pb2.ListConversationsResponse:
        page = await self.store.list_conversations(
            _tenant(request.tenant_id),
            workspace_id=_optional_id(request.workspace_id, "workspace_id", WORKSPACE_PREFIX),
            page_size=_not_negative(request.page_size, "page_size"),
            page_token=request.page_token,
        )
        return common_pb2.ListConversationsResponse(
            conversations=page.items, next_page_token=page.next_page_token
        )

    @grpc_errors
    async def UpdateConversation(
        self, request: store_pb2.UpdateConversationRequest, context: Context
    ) -> common_pb2.Conversation:
        return await self.store.update_conversation(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            title=request.title if request.HasField("title") else None,
            cwd=request.cwd if request.HasField("cwd") else None,
            computer_id=request.computer_id if request.HasField("computer_id") else None,
            agent=request.agent if request.HasField("agent") else None,
        )

    @grpc_errors
    async def DeleteConversation(
        self, request: store_pb2.DeleteConversationRequest, context: Context
    ) -> common_pb2.DeleteConversationResponse:
        await self.store.delete_conversation(
            _tenant(request.tenant_id), _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        )
        return common_pb2.DeleteConversationResponse()

    # --------------------------------------------------------------- history

    @grpc_errors
    async def Append(self, request: store_pb2.AppendRequest, context: Context) -> store_pb2.AppendResponse:
        for i, approval in enumerate(request.approvals):
            _approval_ids(approval, f"approvals[{i}]")
        done = await self.store.append(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            request.messages,
            request.events,
            take_queue_for_turn=_optional_id(request.take_queue_for_turn, "take_queue_for_turn", TURN_PREFIX),
            fence=_fence(request),
            reserve_event_seq=request.reserve_event_seq,
            seal=_seal(request),
            release_lease=request.release_lease,
            next_turn=_next_turn(request),
            approvals=request.approvals,
            move_to=_move_to(request.move_to),
            step_metrics=request.step_metrics,
            turn_metrics=request.turn_metrics if request.HasField("turn_metrics") else None,
        )
        return store_pb2.AppendResponse(
            messages=done.messages,
            first_seq=done.first_seq,
            last_seq=done.last_seq,
            last_event_seq=done.last_event_seq,
            dequeued=done.dequeued,
            turn=done.turn,
            next_turn=done.next_turn,
            next_turn_messages=done.next_turn_messages,
            reserved_event_seq=done.reserved_event_seq,
            approvals=done.approvals,
        )

    async def AppendStream(
        self, request_iterator: AsyncIterator[store_pb2.AppendStreamRequest], context: Context
    ) -> AsyncIterator[store_pb2.AppendStreamResponse]:
        async for reply in self.append_streams.serve(request_iterator, context):
            yield reply

    async def _append_one(
        self, request: store_pb2.AppendStreamRequest, context: Context
    ) -> store_pb2.AppendStreamResponse:
        return store_pb2.AppendStreamResponse(append=await self.Append(request.append, context))

    @grpc_errors
    async def Load(self, request: store_pb2.LoadRequest, context: Context) -> store_pb2.LoadResponse:
        history = await self.store.load_since(
            _tenant(request.tenant_id), _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        )
        return store_pb2.LoadResponse(messages=history.messages, last_seq=history.last_seq)

    @grpc_errors
    async def LoadSince(
        self, request: store_pb2.LoadSinceRequest, context: Context
    ) -> store_pb2.LoadResponse:
        history = await self.store.load_since(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            after_seq=_not_negative(request.after_seq, "after_seq"),
            limit=_not_negative(request.limit, "limit"),
        )
        return store_pb2.LoadResponse(messages=history.messages, last_seq=history.last_seq)

    @grpc_errors
    async def LoadEvents(
        self, request: store_pb2.LoadEventsRequest, context: Context
    ) -> store_pb2.LoadEventsResponse:
        history = await self.store.load_events(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            after_event_seq=_not_negative(request.after_event_seq, "after_event_seq"),
            limit=_not_negative(request.limit, "limit"),
        )
        return store_pb2.LoadEventsResponse(events=history.events, last_event_seq=history.last_event_seq)

    # ----------------------------------------------------------------- turns

    @grpc_errors
    async def CreateTurn(self, request: store_pb2.CreateTurnRequest, context: Context) -> common_pb2.Turn:
        state = request.state
        if state != common_pb2.TURN_STATE_UNSPECIFIED:
            state = _state(state, "state")
        return await self.store.create_turn(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            idempotency_key=request.idempotency_key,
            state=state,
            computer_id=request.computer_id,
            cwd=request.cwd,
            agent=request.agent,
            lease_owner=request.lease_owner,
            lease_ttl=_ttl(request.lease_ttl) if request.HasField("lease_ttl") else None,
            reserve_event_seq=request.reserve_event_seq,
            user_messages=request.user_messages,
            exclusive=request.exclusive,
        )

    @grpc_errors
    async def GetTurn(self, request: store_pb2.GetTurnRequest, context: Context) -> common_pb2.Turn:
        return await self.store.get_turn(
            _tenant(request.tenant_id), _id(request.turn_id, "turn_id", TURN_PREFIX)
        )

    @grpc_errors
    async def ListTurns(
        self, request: store_pb2.ListTurnsRequest, context: Context
    ) -> common_pb2.ListTurnsResponse:
        page = await self.store.list_turns(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            states=[_state(s, "states") for s in request.states],
            page_size=_not_negative(request.page_size, "page_size"),
            page_token=request.page_token,
            idempotency_key=request.idempotency_key,
        )
        return common_pb2.ListTurnsResponse(turns=page.items, next_page_token=page.next_page_token)

    @grpc_errors
    async def TransitionTurn(
        self, request: store_pb2.TransitionTurnRequest, context: Context
    ) -> common_pb2.Turn:
        return await self.store.transition_turn(
            _tenant(request.tenant_id),
            _id(request.turn_id, "turn_id", TURN_PREFIX),
            _state(request.to, "to"),
            finish_reason=_finish_reason(request.finish_reason),
            error_message=request.error_message,
            user_message_seq=_not_negative(request.user_message_seq, "user_message_seq"),
            lease_owner=request.lease_owner,
            lease_epoch=_not_negative(request.lease_epoch, "lease_epoch"),
            max_running=_not_negative(request.max_running, "max_running"),
        )

    # ------------------------------------------------------------- execution

    @grpc_errors
    async def ResolveExecution(
        self, request: store_pb2.ResolveExecutionRequest, context: Context
    ) -> store_pb2.ResolveExecutionResponse:
        where = await self.store.resolve_execution(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            _optional_id(request.turn_id, "turn_id", TURN_PREFIX),
        )
        return store_pb2.ResolveExecutionResponse(
            computer_id=where.computer_id,
            cwd=where.cwd,
            workspace_root=where.workspace_root,
            confine_tools=where.confine_tools,
            workspace_id=where.workspace_id,
            workspace_permissions=where.workspace_permissions,
            remembered=where.remembered,
        )

    # ------------------------------------------------------------- reconcile

    @grpc_errors
    async def Reconcile(
        self, request: store_pb2.ReconcileRequest, context: Context
    ) -> store_pb2.ReconcileResponse:
        appended = await self.store.reconcile(
            _tenant(request.tenant_id), _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        )
        return store_pb2.ReconcileResponse(appended=appended)

    # ---------------------------------------------------------------- leases

    @grpc_errors
    async def ClaimLease(self, request: store_pb2.ClaimLeaseRequest, context: Context) -> common_pb2.Turn:
        return await self.store.claim_lease(
            _tenant(request.tenant_id),
            _id(request.turn_id, "turn_id", TURN_PREFIX),
            _required_text(request.owner, "owner"),
            _ttl(request.ttl),
            reserve_event_seq=request.reserve_event_seq,
        )

    @grpc_errors
    async def RenewLease(self, request: store_pb2.RenewLeaseRequest, context: Context) -> common_pb2.Turn:
        return await self.store.renew_lease(
            _tenant(request.tenant_id),
            _id(request.turn_id, "turn_id", TURN_PREFIX),
            _required_text(request.owner, "owner"),
            _ttl(request.ttl),
            epoch=_not_negative(request.epoch, "epoch"),
        )

    @grpc_errors
    async def ReleaseLease(self, request: store_pb2.ReleaseLeaseRequest, context: Context) -> common_pb2.Turn:
        return await self.store.release_lease(
            _tenant(request.tenant_id),
            _id(request.turn_id, "turn_id", TURN_PREFIX),
            _required_text(request.owner, "owner"),
            epoch=_not_negative(request.epoch, "epoch"),
        )

    @grpc_errors
    async def ListExpiredLeases(
        self, request: store_pb2.ListExpiredLeasesRequest, context: Context
    ) -> common_pb2.ListTurnsResponse:
        turns = await self.store.list_expired_leases(limit=_not_negative(request.limit, "limit"))
        return common_pb2.ListTurnsResponse(turns=turns)

    @grpc_errors
    async def RenewLeases(
        self, request: store_pb2.RenewLeasesRequest, context: Context
    ) -> store_pb2.RenewLeasesResponse:
        owner = _required_text(request.owner, "owner")
        ttl = _ttl(request.ttl)
        kernels: list[store_pb2.KernelInfo] = []
        if request.HasField("kernel"):
            kernel = store_pb2.KernelInfo()
            kernel.CopyFrom(request.kernel)
            kernel.owner = owner
            _required_text(kernel.address, "kernel.address")
            if kernel.run_slots < 0 or kernel.running < 0:
                raise InvalidArgument("kernel.run_slots and kernel.running must be 0 or more")
            kernels = await self.store.heartbeat(kernel, ttl)
        lost = await self.store.renew_leases(
            owner, ttl, [_lease_ref(i, ref) for i, ref in enumerate(request.leases)]
        )
        return store_pb2.RenewLeasesResponse(lost_turn_ids=lost, kernels=kernels)

    @grpc_errors
    async def ListKernels(
        self, request: store_pb2.ListKernelsRequest, context: Context
    ) -> store_pb2.ListKernelsResponse:
        return store_pb2.ListKernelsResponse(kernels=await self.store.list_kernels())

    @grpc_errors
    async def RetireKernel(
        self, request: store_pb2.RetireKernelRequest, context: Context
    ) -> store_pb2.RetireKernelResponse:
        await self.store.retire_kernel(_required_text(request.owner, "owner"))
        return store_pb2.RetireKernelResponse()

    # --------------------------------------------------------------- metrics

    @grpc_errors
    async def RecordTurnMetrics(
        self, request: store_pb2.RecordTurnMetricsRequest, context: Context
    ) -> store_pb2.RecordTurnMetricsResponse:
        tenant_id = _tenant(request.tenant_id)
        metrics = request.metrics
        _id(metrics.turn_id, "metrics.turn_id", TURN_PREFIX)
        _optional_id(metrics.conversation_id, "metrics.conversation_id", CONVERSATION_PREFIX)
        _finish_reason(metrics.finish_reason)
        await self.store.record_turn_metrics(tenant_id, metrics)
        return store_pb2.RecordTurnMetricsResponse()

    @grpc_errors
    async def RecordStepMetrics(
        self, request: store_pb2.RecordStepMetricsRequest, context: Context
    ) -> store_pb2.RecordStepMetricsResponse:
        tenant_id = _tenant(request.tenant_id)
        conversation_id = _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        metrics = request.metrics
        _id(metrics.turn_id, "metrics.turn_id", TURN_PREFIX)
        _finish_reason(metrics.finish_reason)
        await self.store.record_step_metrics(tenant_id, conversation_id, metrics)
        return store_pb2.RecordStepMetricsResponse()

    @grpc_errors
    async def GetMetrics(
        self, request: store_pb2.GetMetricsRequest, context: Context
    ) -> common_pb2.GetMetricsResponse:
        turns = await self.store.get_metrics(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            _optional_id(request.turn_id, "turn_id", TURN_PREFIX),
        )
        return common_pb2.GetMetricsResponse(turns=turns)

    # ----------------------------------------------------------------- queue

    @grpc_errors
    async def Enqueue(self, request: store_pb2.EnqueueRequest, context: Context) -> store_pb2.EnqueueResponse:
        queued = await self.store.enqueue(
            _tenant(request.tenant_id),
            _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            request.message,
            request.idempotency_key,
            only_behind_turn=request.only_behind_turn,
        )
        return store_pb2.EnqueueResponse(queued=queued)

    @grpc_errors
    async def DrainQueue(
        self, request: store_pb2.DrainQueueRequest, context: Context
    ) -> store_pb2.DrainQueueResponse:
        drained = await self.store.drain_queue(
            _tenant(request.tenant_id), _id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX)
        )
        return store_pb2.DrainQueueResponse(messages=drained)

    # ------------------------------------------------------------- approvals

    @grpc_errors
    async def CreateApproval(
        self, request: store_pb2.CreateApprovalRequest, context: Context
    ) -> common_pb2.Approval:
        tenant_id = _tenant(request.tenant_id)
        approval = request.approval
        _id(approval.conversation_id, "approval.conversation_id", CONVERSATION_PREFIX)
        _id(approval.turn_id, "approval.turn_id", TURN_PREFIX)
        return await self.store.create_approval(tenant_id, approval)

    @grpc_errors
    async def ResolveApproval(
        self, request: store_pb2.ResolveApprovalRequest, context: Context
    ) -> common_pb2.Approval:
        return await self.store.resolve_approval(
            _tenant(request.tenant_id),
            _id(request.approval_id, "approval_id", APPROVAL_PREFIX),
            request.decision,
            edited_input_json=request.edited_input_json,
            reason=request.reason,
            decided_by=request.decided_by,
            remember=request.remember,
            remembered_rule=request.remembered_rule if request.HasField("remembered_rule") else None,
        )

    @grpc_errors
    async def GetApproval(
        self, request: store_pb2.GetApprovalRequest, context: Context
    ) -> common_pb2.Approval:
        return await self.store.get_approval(
            _tenant(request.tenant_id), _id(request.approval_id, "approval_id", APPROVAL_PREFIX)
        )

    @grpc_errors
    async def ListApprovals(
        self, request: store_pb2.ListApprovalsRequest, context: Context
    ) -> common_pb2.ListApprovalsResponse:
        tenant_id = _tenant(request.tenant_id)
        if not request.conversation_id and not request.turn_id:
            raise InvalidArgument("conversation_id or turn_id is required")
        approvals = await self.store.list_approvals(
            tenant_id,
            _optional_id(request.conversation_id, "conversation_id", CONVERSATION_PREFIX),
            turn_id=_optional_id(request.turn_id, "turn_id", TURN_PREFIX),
            pending_only=request.pending_only,
        )
        return common_pb2.ListApprovalsResponse(approvals=approvals)

    # -------------------------------------------------------------- api keys
    # Administrative, except Authenticate, which the transport calls per client.

    @grpc_errors
    async def CreateApiKey(
        self, request: store_pb2.CreateApiKeyRequest, context: Context
    ) -> store_pb2.CreateApiKeyResponse:
        key, secret = await self.store.create_api_key(_tenant(request.tenant_id), request.name)
        return store_pb2.CreateApiKeyResponse(key=key, secret=secret)

    @grpc_errors
    async def ListApiKeys(
        self, request: store_pb2.ListApiKeysRequest, context: Context
    ) -> store_pb2.ListApiKeysResponse:
        return store_pb2.ListApiKeysResponse(keys=await self.store.list_api_keys(request.tenant_id))

    @grpc_errors
    async def RevokeApiKey(
        self, request: store_pb2.RevokeApiKeyRequest, context: Context
    ) -> store_pb2.RevokeApiKeyResponse:
        key = await self.store.revoke_api_key(_id(request.key_id, "key_id", API_KEY_PREFIX))
        return store_pb2.RevokeApiKeyResponse(key=key)

    @grpc_errors
    async def Authenticate(
        self, request: store_pb2.AuthenticateRequest, context: Context
    ) -> store_pb2.AuthenticateResponse:
        # The secret is never echoed: not in an error, not in a log.
        key = await self.store.authenticate(_required_text(request.secret, "secret"))
        return store_pb2.AuthenticateResponse(tenant_id=key.tenant_id, key_id=key.id)
