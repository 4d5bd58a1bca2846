"""The HTTP bridge's OpenAPI 3.1 document, generated from the protos and the route table.

``document()`` walks ``routes.ROUTES``: each route's operation takes its request
body and answer from the descriptors of its RPC's request and response messages,
and its query parameters from the request's fields (or, for the few the bridge
reads itself, from ``_QUERY``). Schemas follow the proto3 JSON mapping the bridge
speaks (``http.py``): proto field names, int64 as strings, enums by name, Timestamp
as RFC 3339, Duration as ``"1.5s"``; a oneof is its fields, at most one set.

Served at ``GET /openapi.json`` (no key), so clients in languages without gRPC can
be generated; tests/transport/test_openapi.py checks it against the protos, the
router and live answers.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from dispatch import __version__
from dispatch.transport.routes import ROUTES, Route
from dispatch.v1 import common_pb2, transport_pb2

SERVICE = transport_pb2.DESCRIPTOR.services_by_name["Dispatch"]
ERROR = "Error"
_REF = "#/components/schemas/"

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (and reads numbers too).
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
}

# Query parameters the bridge reads itself, not as a request field of the same name.
_QUERY: dict[str, dict[str, Any]] = {
    "after_event_seq": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Resume after this event_seq (Last-Event-ID wins when larger).",
    },
    "until": {
        "schema": {"type": "string", "enum": ["follow", "caught_up", "turn_sealed"], "default": "follow"},
        "description": "Where the stream ends by itself; the SubscribeUntil names are taken too.",
    },
    "stream_token": {
        "schema": {"type": "string"},
        "description": "A token from POST .../stream-token, in place of the Authorization header"
        " (for EventSource, which cannot send one).",
    },
    "state": {
        "schema": {
            "type": "array",
            "items": {
                "type": "string",
                "enum": ["queued", "running", "completed", "failed", "aborted", "interrupted"],
            },
        },
        "style": "form",
        "explode": True,
        "description": "Only turns in these states (repeat the parameter; TURN_STATE_ names are taken too).",
    },
    "pending": {
        "schema": {"type": "boolean", "default": False},
        "description": "Only approvals still pending.",
    },
}

# Enum fields of a body that also take the short lower-case name (``"reject"``).
_SHORT_ENUMS = {
    "dispatch.v1.SendPolicy": "SEND_POLICY_",
    "dispatch.v1.ApprovalDecision": "APPROVAL_DECISION_",
    "dispatch.v1.PermissionAction": "PERMISSION_ACTION_",
}


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    names = [value.name for value in enum.values]
    prefix = _SHORT_ENUMS.get(enum.full_name)
    if prefix:
        names += [name.removeprefix(prefix).lower() for name in names if name.startswith(prefix)]
    return {"type": "string", "enum": names}


class _Schemas:
    """Component schemas, one per message and enum reached from the routes."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    def ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        name = message.name
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to themselves
            self.components[name] = self._message(message)
        return {"$ref": _REF + name}

    def _enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        if enum.name not in self.components:
            self.components[enum.name] = _enum(enum)
        return {"$ref": _REF + enum.name}

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(f)
        if f.is_repeated:
            return {"type": "array", "items": single}
        return single

    def _single(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None:
            return self.ref(f.message_type)
        if f.enum_type is not None:
            return self._enum_ref(f.enum_type)
        return dict(_SCALARS[f.type])

    def _message(self, message: Descriptor, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties = {f.name: self.field(f) for f in message.fields if f.name not in skip}
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        # A oneof is its fields, at most one of them set (said, not encoded as `not`/`anyOf`:
        # client generators read plain objects best).
        real = [o for o in message.oneofs if not o.name.startswith("_")]
        if real:
            names = "; ".join(f"{o.name}: {' | '.join(f.name for f in o.fields)}" for o in real)
            schema["description"] = f"At most one field of each oneof is set ({names})."
        return schema

    def body(self, message: Descriptor, path_fields: frozenset[str]) -> dict[str, Any]:
        """A request body: the request message less the fields the path gives."""
        if not path_fields:
            return self.ref(message)
        return self._message(message, skip=path_fields)


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "The gRPC status name (NOT_FOUND, ...)."},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _query_parameter(name: str, request: Descriptor | None, schemas: _Schemas) -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": False}
    if name in _QUERY:
        param.update(_QUERY[name])
    else:
        assert request is not None, name
        f = request.fields_by_name[name]
        param["schema"] = dict(_SCALARS[f.type]) if f.type in _SCALARS else schemas.field(f)
        if f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64):
            param["schema"] = {"type": "integer", "minimum": 0}
    return param


def _responses(route: Route, output: Descriptor | None, schemas: _Schemas) -> dict[str, Any]:
    error = {"description": "Failed", "content": {"application/json": {"schema": {"$ref": _REF + ERROR}}}}
    if route.handler == "_events":
        assert output is not None
        event = schemas.ref(common_pb2.AgentEvent.DESCRIPTOR)
        ok: dict[str, Any] = {
            "description": "The events, as Server-Sent Events (Accept: text/event-stream; `id:` the"
            " event_seq, `event:` its kind, `data:` the AgentEvent) or NDJSON (one AgentEvent a line)."
            " A stream that fell behind ends with `event: resync` (NDJSON: a `resync` line); resume"
            " after its after_event_seq.",
            "content": {
                "text/event-stream": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": event},
            },
        }
    elif output is not None:
        ok = {"description": "OK", "content": {"application/json": {"schema": schemas.ref(output)}}}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {"200": ok, "default": error}


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    method = SERVICE.methods_by_name[route.rpc] if route.rpc else None
    request = method.input_type if method else None
    op: dict[str, Any] = {"operationId": route.rpc or route.handler.strip("_"), "summary": route.summary}
    if route.rpc:
        op["description"] = f"Calls `{SERVICE.full_name}.{route.rpc}`."
        op["tags"] = ["dispatch"]
    else:
        op["tags"] = ["bridge"]
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": f"The {field}.",
        }
        for name, field in route.params.items()
    ]
    params += [_query_parameter(name, request, schemas) for name in route.query]
    if params:
        op["parameters"] = params
    if route.body:
        assert request is not None
        body = schemas.body(request, frozenset(route.params.values()))
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    op["responses"] = _responses(route, method.output_type if method else None, schemas)
    if not route.auth:
        op["security"] = []
    elif route.handler == "_events":
        op["security"] = [{"apiKey": []}, {"streamToken": []}]
    return op


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once; the same dict every call: do not change it)."""
    schemas = _Schemas()
    schemas.components[ERROR] = _error_schema()
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Dispatch HTTP bridge",
            "version": __version__,
            "description": "The HTTP/JSON form of the gRPC service dispatch.v1.Dispatch (proto3 JSON"
            " with proto field names). Generated from proto/dispatch/v1 by the server itself.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`dispatchd keys create`).",
                },
                "streamToken": {"type": "apiKey", "in": "query", "name": "stream_token"},
            },
        },
        "security": [{"apiKey": []}],
    }
