"""The Kernel gRPC servicer: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dispatch.kernel.agents import model_infos
from dispatch.kernel.kernel import Kernel
from dispatch.shared.errors import Context, from_rpc_error, grpc_errors
from dispatch.v1 import common_pb2, exec_pb2, kernel_pb2, kernel_pb2_grpc


class KernelServicer(kernel_pb2_grpc.KernelServicer):
    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    @grpc_errors
    async def StartTurn(
        self, request: kernel_pb2.StartTurnRequest, context: Context
    ) -> kernel_pb2.StartTurnResponse:
        return await self.kernel.start_turn(
            request.tenant_id,
            request.conversation_id,
            request.chunks,
            request.policy,
            request.idempotency_key,
        )

    @grpc_errors
    async def Subscribe(
        self, request: kernel_pb2.KernelSubscribeRequest, context: Context
    ) -> AsyncIterator[common_pb2.EventBatch]:
        async for batch in self.kernel.subscribe(
            request.tenant_id,
            request.conversation_id,
            request.after_event_seq,
            request.until,
            movable=request.movable,
        ):
            yield common_pb2.EventBatch(events=batch, event_seqs=[e.event_seq for e in batch])

    @grpc_errors
    async def Cancel(
        self, request: kernel_pb2.KernelCancelRequest, context: Context
    ) -> kernel_pb2.KernelCancelResponse:
        turn_id = await self.kernel.cancel(request.tenant_id, request.conversation_id, request.turn_id)
        return kernel_pb2.KernelCancelResponse(turn_id=turn_id)

    @grpc_errors
    async def ListModels(
        self, request: kernel_pb2.KernelListModelsRequest, context: Context
    ) -> kernel_pb2.KernelListModelsResponse:
        return kernel_pb2.KernelListModelsResponse(models=model_infos(self.kernel.deps.agents))

    @grpc_errors
    async def ListComputers(
        self, request: kernel_pb2.KernelListComputersRequest, context: Context
    ) -> kernel_pb2.KernelListComputersResponse:
        try:
            resp = await self.kernel.deps.exec.ListComputers(
                exec_pb2.ListComputersRequest(), timeout=self.kernel.deps.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the exec service could not list computers") from None
        return kernel_pb2.KernelListComputersResponse(computers=resp.computers)

    @grpc_errors
    async def ResolveApproval(
        self, request: kernel_pb2.KernelResolveApprovalRequest, context: Context
    ) -> common_pb2.Approval:
        return await self.kernel.resolve_approval(
            request.tenant_id,
            request.approval_id,
            request.decision,
            edited_input_json=request.edited_input_json,
            reason=request.reason,
            decided_by=request.decided_by,
            remember=request.remember,
        )
