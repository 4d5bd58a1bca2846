"""gRPC server reflection, both versions: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection serves only v1alpha, and its symbol lookup does not find a method
(``grpcurl describe dispatch.v1.Dispatch.Send`` said "Symbol not found"). The two
versions' messages are the same on the wire (only the package differs), so one
servicer answers both: v1 is registered with v1alpha's message classes for its bytes,
and v1's descriptor (v1alpha's with the v1 package) is added to the pool so that
reflection describes itself under both names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2, reflection_pb2_grpc

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: Any) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    pool.AddSerializedFile(proto.SerializeToString())


# The base's helpers (``_file_containing_symbol``, ``_pool``) are not in its type stubs.
_Servicer: Any = _async.ReflectionServicer


class Reflection(_Servicer):  # type: ignore[misc]
    """v1alpha's servicer, also finding the file of a method (``pkg.Service.Method``)."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        answer = super()._file_containing_symbol(request, fully_qualified_name)
        if not answer.HasField("error_response"):
            return answer
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            found = self._pool.FindServiceByName(service)
        except KeyError:
            return answer
        if method not in found.methods_by_name:
            return answer
        return super()._file_containing_symbol(request, service)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) for ``service_names`` and for itself."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = Reflection([*service_names, V1, V1ALPHA], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    handler = grpc.method_handlers_generic_handler(
        V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
