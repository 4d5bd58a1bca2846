"""An HTTP/JSON bridge to the public API, for clients without gRPC (curl, browsers).

The bridge is a thin front over the transport's own ``dispatch.v1.Dispatch``
service: every HTTP request becomes a call on a grpc.aio channel to it, with the
caller's ``Authorization`` header passed on as the ``authorization`` metadata,
so authentication, validation, tenant scoping and error messages are the gRPC
ones. The header is never logged or echoed.

Bodies and answers are proto3 JSON (``json_format`` with the proto's field
names): int64 fields are strings, enums their names (``TURN_STATE_RUNNING``),
bytes base64, timestamps RFC 3339, and fields at their default are left out.

Routes::

    GET    /v1/workspaces                           ListWorkspaces       ?page_size=&page_token=
    POST   /v1/workspaces                           CreateWorkspace      {"name", "root", ..., "permissions"}
    POST   /v1/conversations                        CreateConversation
    GET    /v1/conversations                        ListConversations    ?workspace_id=&page_size=&page_token=
    GET    /v1/conversations/{id}                   GetConversation
    PATCH  /v1/conversations/{id}                   UpdateConversation
    DELETE /v1/conversations/{id}                   DeleteConversation
    POST   /v1/conversations/{id}/messages          Send                 {"text", "policy", "idempotency_key"}
    GET    /v1/conversations/{id}/events            Subscribe            ?after_event_seq=&until=
                                                                          &stream_token=
    POST   /v1/conversations/{id}/stream-token      CreateStreamToken    {"ttl_seconds"} (optional)
    POST   /v1/conversations/{id}/cancel            Cancel               {"turn_id"} (optional)
    GET    /v1/conversations/{id}/history           History              ?after_seq=&limit=
    GET    /v1/conversations/{id}/metrics           Metrics              ?turn_id=
    GET    /v1/conversations/{id}/turns             ListTurns            ?state=&page_size=&page_token=
    GET    /v1/conversations/{id}/turns/{turn_id}   GetTurn
    GET    /v1/conversations/{id}/approvals         ListApprovals        ?pending=true|false
    POST   /v1/approvals/{id}/resolve               ResolveApproval      {"decision", "reason",
                                                                          "edited_input_json", "remember"}
    GET    /v1/models                               Models
    GET    /v1/computers                            Computers
    GET    /healthz                                 the process serves HTTP (no key)
    GET    /readyz                                  the transport and its backends serve (no key)
    GET    /openapi.json                            this list as OpenAPI 3.1 (no key; see openapi.py)

Enum fields of a body (``policy``, ``decision``, a permission rule's ``action``) also
take the short lower-case name: ``"interrupt"`` for ``SEND_POLICY_INTERRUPT``,
``"approve"``, ``"reject"``, ``"edit"``; ``"ask"`` for ``PERMISSION_ACTION_ASK``
(``"permissions": [{"tool": "shell", "pattern": "git push*", "action": "ask"}]``), and so
does ``?state=`` (``running`` or ``TURN_STATE_RUNNING``; repeat it for several states).
``?pending=true`` lists only the approvals still waiting for a decision. A query
parameter a route does not take is a 400 naming it.

``/healthz`` and ``/readyz`` are for probes (a load balancer, Docker, Kubernetes) and take
no key: ``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 when the
transport's own gRPC service answers grpc.health.v1 SERVING and so does every check it was
given (the transport gives one for its kernels and one for its store), else 503 naming what
is not (``kernel: unreachable (UNAVAILABLE)``), never an address.

The event stream is Server-Sent Events when ``Accept`` names
``text/event-stream``, NDJSON otherwise; see ``HttpBridge._events``. A browser's
``EventSource`` cannot send ``Authorization``: it passes a stream token instead
(``?stream_token=``, minted by ``POST .../stream-token``; see ``tokens.py``).

Browsers on other origins may call the bridge when their origin is in
``cors_origins`` (``[transport] cors_origins``; none by default): the bridge
answers CORS preflights and marks every answer to such an origin.
The access log names a request's method, path and status, never its query or
headers (a stream token travels in the query).

A failure answers ``{"error": {"code": <gRPC status name>, "message": ...}}``
with the HTTP status of ``HTTP_STATUS``; the bridge's own refusals use
INVALID_ARGUMENT (400), NOT_FOUND (404), METHOD_NOT_ALLOWED (405) and
RESOURCE_EXHAUSTED (413, a body over ``max_body`` bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dispatch.shared.config import ListenError
from dispatch.shared.server import GRPC_OPTIONS, bind_error
from dispatch.transport.auth import INVALID
from dispatch.transport.openapi import document
from dispatch.transport.routes import LIST, ROUTES
from dispatch.v1 import common_pb2, transport_pb2, transport_pb2_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT = 30.0
KEEPALIVE_SECONDS = 15.0
MAX_BODY_BYTES = 4 * 1024 * 1024
# How long stop() lets requests in flight finish.
STOP_GRACE = 5.0
# How long /readyz waits for each health answer; a probe's own timeout must be longer.
READY_TIMEOUT = 2.0
_MAX_INT64 = 2**63 - 1

# Any other status is a 500.
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", **_STREAM_HEADERS}
_NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", **_STREAM_HEADERS}
_KEEPALIVE = b": keep-alive\n\n"

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


# One /readyz check: "serving", or a few words saying why not (never an address).
ReadyCheck = Callable[[], Awaitable[str]]


async def health_of(channel: grpc.aio.Channel, service: str = "", wait: float = READY_TIMEOUT) -> str:
    """grpc.health.v1 of ``service`` on ``channel``, as a /readyz check reports it; ``wait``:
    the call's deadline, in seconds."""
    stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed omits its methods
    try:
        reply: health_pb2.HealthCheckResponse = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=wait
        )
    except grpc.aio.AioRpcError as exc:
        return f"unreachable ({exc.code().name})"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "serving"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()


class HttpError(Exception):
    """A request the bridge refuses itself, before any gRPC call."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad_request(message: str) -> HttpError:
    return HttpError(400, grpc.StatusCode.INVALID_ARGUMENT.name, message)


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error answer; a 401 also says which scheme to authenticate with."""
    all_headers = dict(headers or {})
    if status == 401:
        all_headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=all_headers
    )


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _line(value: Any) -> str:
    """``value`` as JSON on one line, ASCII only: no U+2028 or U+0085 for a reader's splitlines()."""
    return json.dumps(value, separators=(",", ":"))


def _parse(data: dict[str, Any], message: Req, **path: str) -> Req:
    """``data`` parsed into ``message``; ``path`` fields come from the URL and may not disagree."""
    for name, value in path.items():
        if name in data and data[name] != value:
            raise _bad_request(f"{name} in the body differs from the one in the path")
        data[name] = value
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise _bad_request(str(exc)) from None
    return message


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _bad_request(f"the body must be a JSON object, not {type(data).__name__}")
    return data


def _query(request: web.Request, names: Sequence[str]) -> dict[str, Any]:
    return {name: request.query[name] for name in names if name in request.query}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _only_query(handler: Handler, *allowed: str) -> Handler:
    """``handler``, refusing a query parameter it does not take (400, naming it): a typo such
    as ``?after=5`` must not be silently ignored."""

    async def checked(request: web.Request) -> web.StreamResponse:
        unknown = sorted(set(request.query) - set(allowed))
        if unknown:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise _bad_request(
                f"unknown query parameter {', '.join(unknown)} for {request.method} {request.path}; {takes}"
            )
        return await handler(request)

    return checked


def _enum_field(data: dict[str, Any], name: str, prefix: str, choices: Sequence[str]) -> None:
    """Expand the short name of enum field ``name`` (``"reject"``) to the enum's (``SEND_POLICY_REJECT``)."""
    value = data.get(name)
    if value is None:
        return
    if isinstance(value, str):
        short = value.removeprefix(prefix).lower()
        if short in (*choices, "unspecified"):
            data[name] = prefix + short.upper()
            return
    raise _bad_request(f"{name} must be one of {', '.join(choices)}")


_TURN_STATES = {
    name.removeprefix("TURN_STATE_").lower(): value
    for name, value in common_pb2.TurnState.items()
    if value != common_pb2.TURN_STATE_UNSPECIFIED
}


def _states(request: web.Request) -> list[common_pb2.TurnState.ValueType]:
    """The turn states of every ``?state=``: short lower-case names (``running``) or the
    enum's (``TURN_STATE_RUNNING``), any case."""
    states = []
    for value in request.query.getall("state", ()):
        short = value.strip().lower().removeprefix("turn_state_")
        if short not in _TURN_STATES:
            raise _bad_request(f"state must be one of {', '.join(_TURN_STATES)}, got {value[:80]!r}")
        states.append(_TURN_STATES[short])
    return states


def _flag(request: web.Request, name: str) -> bool:
    """A ``?name=true|false`` query parameter (any case; absent: false)."""
    value = request.query.get(name, "false").strip().lower()
    if value not in ("true", "false"):
        raise _bad_request(f"{name} must be true or false, got {value[:80]!r}")
    return value == "true"


def _permission_actions(data: dict[str, Any]) -> None:
    """Expand the short names of the permission rules' actions in a workspace body."""
    rules = data.get("permissions")
    if not isinstance(rules, list):
        return  # absent, or the wrong type: the proto parser says so
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            try:
                _enum_field(rule, "action", "PERMISSION_ACTION_", ("allow", "ask", "deny"))
            except HttpError as exc:
                raise _bad_request(f"permissions[{i}].{exc.message}") from None


def _seq(value: str, name: str) -> int:
    text = value.strip()
    if not text.isdigit() or not text.isascii() or int(text) > _MAX_INT64:
        raise _bad_request(f"{name} must be an event_seq: a whole number, 0 or more")
    return int(text)


_UNTIL = {
    "follow": common_pb2.SUBSCRIBE_UNTIL_FOLLOW,
    "caught_up": common_pb2.SUBSCRIBE_UNTIL_CAUGHT_UP,
    "turn_sealed": common_pb2.SUBSCRIBE_UNTIL_TURN_SEALED,
}


def _until(request: web.Request) -> common_pb2.SubscribeUntil.ValueType:
    """Where the event stream ends by itself: ``?until=`` follow (the default), caught_up or
    turn_sealed."""
    value = request.query.get("until", "follow").strip().lower().removeprefix("subscribe_until_")
    if value not in _UNTIL:
        raise _bad_request(f"until must be one of {', '.join(_UNTIL)}, got {value!r}")
    return _UNTIL[value]


def _cursor(request: web.Request) -> int:
    """Where the event stream resumes: after_event_seq, or Last-Event-ID when that is larger."""
    after = _seq(request.query.get("after_event_seq", "0"), "after_event_seq")
    last = request.headers.get("Last-Event-ID", "")
    if last.strip():
        after = max(after, _seq(last, "Last-Event-ID"))
    return after


HTTP_LISTEN_FLAG = "--http-listen"


def _host_port(listen: str) -> tuple[str | None, int]:
    """``listen``'s host (None: every interface) and port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ListenError(
            listen, "the address must be host:port with a port from 0 to 65535", HTTP_LISTEN_FLAG
        )
    return host.strip("[]") or None, int(port)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without the query string (a stream token rides in it) or any
    header: remote, method, path, status, size and time."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %s %s %.3fs",
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


_CORS_METHODS = "GET, POST, PATCH, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, Accept, Last-Event-ID"
_CORS_MAX_AGE = "600"


class _Frames:
    """The event stream's wire format: Server-Sent Events or NDJSON."""

    def __init__(self, sse: bool):
        self.sse = sse

    def events(self, events: Sequence[common_pb2.AgentEvent]) -> bytes:
        if not self.sse:
            return "".join(_line(to_dict(e)) + "\n" for e in events).encode()
        parts = []
        for e in events:
            kind = e.WhichOneof("kind")
            head = f"id: {e.event_seq}\nevent: {kind}\n" if kind else f"id: {e.event_seq}\n"
            parts.append(f"{head}data: {_line(to_dict(e))}\n\n")
        return "".join(parts).encode()

    def resync(self, after_event_seq: int) -> bytes:
        if self.sse:
            data = _line({"after_event_seq": after_event_seq})
            return f"id: {after_event_seq}\nevent: resync\ndata: {data}\n\n".encode()
        return (_line({"resync": {"after_event_seq": str(after_event_seq)}}) + "\n").encode()

    def error(self, code: grpc.StatusCode, message: str) -> bytes:
        data = _line({"error": {"code": code.name, "message": message}})
        return f"event: stream_error\ndata: {data}\n\n".encode() if self.sse else (data + "\n").encode()


class HttpBridge:
    """The running bridge: an aiohttp server in front, one grpc.aio channel behind."""

    def __init__(
        self,
        grpc_target: str,
        *,
        batch_events: int = 64,
        rpc_timeout: float = RPC_TIMEOUT,
        keepalive: float = KEEPALIVE_SECONDS,
        max_body: int = MAX_BODY_BYTES,
        checks: Mapping[str, ReadyCheck] | None = None,
        ready_timeout: float = READY_TIMEOUT,
        cors_origins: Sequence[str] = (),
    ):
        if batch_events < 1:
            raise ValueError("batch_events must be 1 or more")
        self.port = 0
        self.batch_events = batch_events
        self.rpc_timeout = rpc_timeout
        self.keepalive = keepalive
        self.ready_timeout = ready_timeout
        self._channel = grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS)
        self._stub: transport_pb2_grpc.DispatchAsyncStub = transport_pb2_grpc.DispatchStub(self._channel)
        self._checks = dict(checks or {})
        self._streams: set[grpc.aio.UnaryStreamCall[Any, Any]] = set()
        self._closing = asyncio.Event()
        self._stopped = False
        self.cors_origins = frozenset(cors_origins)
        app = web.Application(client_max_size=max_body, middlewares=[self._errors, self._preflight])
        app.add_routes(self._routes())
        app.on_response_prepare.append(self._cors_headers)
        # handler_cancellation: a client that hangs up cancels its handler, and so its gRPC call.
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=STOP_GRACE,
            access_log_class=RedactingAccessLogger,
        )

    @property
    def active_streams(self) -> int:
        """Subscribe calls open upstream: one per connected event-stream client."""
        return len(self._streams)

    async def start(self, listen: str) -> None:
        """Serve on ``listen``; on failure nothing is left open. Raises ``ListenError``
        (naming ``--http-listen``) for an address it cannot listen on."""
        try:
            host, port = _host_port(listen)
            await self._runner.setup()
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            await self.stop()
            raise ListenError(listen, bind_error(exc), HTTP_LISTEN_FLAG) from None
        except BaseException:
            await self.stop()
            raise
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """End the event streams, let other requests finish within STOP_GRACE, close the channel."""
        if self._stopped:
            return
        self._stopped = True
        self._closing.set()
        await self._runner.cleanup()
        await self._channel.close()

    def _routes(self) -> list[web.RouteDef]:
        defs = []
        for route in ROUTES:
            handler = _only_query(getattr(self, route.handler), *route.query)
            if route.method == "GET":  # and no HEAD
                defs.append(web.get(route.path, handler, allow_head=False))
            else:
                defs.append(web.route(route.method, route.path, handler))
        return defs

    async def readiness(self) -> dict[str, str]:
        """What /readyz reports: ``serving``, or why not, for the transport and each check."""
        dispatch = transport_pb2.DESCRIPTOR.services_by_name["Dispatch"].full_name
        names = ["transport", *self._checks]
        states = await asyncio.gather(
            health_of(self._channel, dispatch, self.ready_timeout),
            *(check() for check in self._checks.values()),
        )
        checks = dict(zip(names, states, strict=True))
        if self._closing.is_set():
            checks["transport"] = "stopping"
        return checks

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        checks = await self.readiness()
        failing = [f"{name}: {state}" for name, state in checks.items() if state != "serving"]
        if not failing:
            return web.json_response({"status": "ready", "checks": checks})
        body = {
            "status": "not_ready",
            "checks": checks,
            "error": {
                "code": grpc.StatusCode.UNAVAILABLE.name,
                "message": "not ready: " + "; ".join(failing),
            },
        }
        return web.json_response(body, status=503)

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except grpc.aio.AioRpcError as exc:
            return error_response(HTTP_STATUS.get(exc.code(), 500), exc.code().name, exc.details() or "")
        except web.HTTPNotFound:
            return error_response(404, "NOT_FOUND", f"no route for {request.method} {request.path}")
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return error_response(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
                {"Allow": allowed},
            )
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                "RESOURCE_EXHAUSTED",
                f"the body is larger than the limit of {request.client_max_size} bytes",
            )
        except web.HTTPException as exc:
            return error_response(exc.status, exc.reason.upper().replace(" ", "_"), exc.text or exc.reason)
        except Exception:
            log.exception("HTTP bridge: %s %s failed", request.method, request.path)
            return error_response(500, "INTERNAL", "internal error in the HTTP bridge")

    def _allowed_origin(self, request: BaseRequest) -> str | None:
        """The request's ``Origin`` when CORS lets it read answers, else None."""
        origin = request.headers.get("Origin")
        if origin is None or not self.cors_origins:
            return None
        return origin if origin in self.cors_origins or "*" in self.cors_origins else None

    @web.middleware
    async def _preflight(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A CORS preflight (OPTIONS with Access-Control-Request-Method), answered here for
        every route: 204 for an allowed origin, 403 naming the setting otherwise."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if self._allowed_origin(request) is None:
            origin = request.headers.get("Origin", "")
            raise HttpError(
                403,
                grpc.StatusCode.PERMISSION_DENIED.name,
                f"cross-origin requests from {origin[:200]!r} are not allowed: add the origin to"
                " [transport] cors_origins (or DISPATCH_CORS_ORIGINS)",
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": _CORS_MAX_AGE,
            },
        )

    async def _cors_headers(self, request: BaseRequest, response: StreamResponse) -> None:
        """Mark an answer (streams too: this runs before the headers go) as readable by an
        allowed origin."""
        if not self.cors_origins:
            return
        response.headers.add("Vary", "Origin")
        origin = self._allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "WWW-Authenticate, Allow"

    def _metadata(self, request: web.Request, stream_token: bool = False) -> tuple[tuple[str, str], ...]:
        """The call's credential: the Authorization header, or (``stream_token``: on the
        event stream) a ``?stream_token=`` in its place."""
        value = request.headers.get("Authorization")
        token = request.query.get("stream_token") if stream_token else None
        if token is not None:
            if value is not None:
                raise _bad_request("send either an Authorization header or ?stream_token=, not both")
            value = f"Bearer {token}"
        if value is None:
            return ()
        if not (value.isascii() and value.isprintable()):
            raise HttpError(401, grpc.StatusCode.UNAUTHENTICATED.name, INVALID)
        return (("authorization", value),)

    async def _unary(
        self, request: web.Request, rpc: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], message: Req
    ) -> web.Response:
        reply = await rpc(message, metadata=self._metadata(request), timeout=self.rpc_timeout)
        return web.json_response(to_dict(reply))

    async def _list_workspaces(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            _query(request, ("page_size", "page_token")), transport_pb2.PublicListWorkspacesRequest()
        )
        return await self._unary(request, self._stub.ListWorkspaces, message)

    async def _create_workspace(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        _permission_actions(body)
        message = _parse(body, transport_pb2.PublicCreateWorkspaceRequest())
        return await self._unary(request, self._stub.CreateWorkspace, message)

    async def _create_conversation(self, request: web.Request) -> web.StreamResponse:
        message = _parse(await _body(request), transport_pb2.PublicCreateConversationRequest())
        return await self._unary(request, self._stub.CreateConversation, message)

    async def _list_conversations(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            _query(request, ("workspace_id", "page_size", "page_token")),
            transport_pb2.PublicListConversationsRequest(),
        )
        return await self._unary(request, self._stub.ListConversations, message)

    async def _get_conversation(self, request: web.Request) -> web.StreamResponse:
        message = transport_pb2.PublicGetConversationRequest(conversation_id=request.match_info["id"])
        return await self._unary(request, self._stub.GetConversation, message)

    async def _update_conversation(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            await _body(request),
            transport_pb2.PublicUpdateConversationRequest(),
            conversation_id=request.match_info["id"],
        )
        return await self._unary(request, self._stub.UpdateConversation, message)

    async def _delete_conversation(self, request: web.Request) -> web.StreamResponse:
        message = transport_pb2.PublicDeleteConversationRequest(conversation_id=request.match_info["id"])
        return await self._unary(request, self._stub.DeleteConversation, message)

    async def _send(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        _enum_field(body, "policy", "SEND_POLICY_", ("enqueue", "interrupt", "reject"))
        message = _parse(body, transport_pb2.SendRequest(), conversation_id=request.match_info["id"])
        return await self._unary(request, self._stub.Send, message)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            await _body(request), transport_pb2.CancelRequest(), conversation_id=request.match_info["id"]
        )
        return await self._unary(request, self._stub.Cancel, message)

    async def _history(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            _query(request, ("after_seq", "limit")),
            transport_pb2.HistoryRequest(),
            conversation_id=request.match_info["id"],
        )
        return await self._unary(request, self._stub.History, message)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            _query(request, ("turn_id",)),
            transport_pb2.MetricsRequest(),
            conversation_id=request.match_info["id"],
        )
        return await self._unary(request, self._stub.Metrics, message)

    async def _list_turns(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            _query(request, LIST),
            transport_pb2.PublicListTurnsRequest(states=_states(request)),
            conversation_id=request.match_info["id"],
        )
        return await self._unary(request, self._stub.ListTurns, message)

    async def _get_turn(self, request: web.Request) -> web.StreamResponse:
        message = transport_pb2.PublicGetTurnRequest(
            conversation_id=request.match_info["id"], turn_id=request.match_info["turn_id"]
        )
        return await self._unary(request, self._stub.GetTurn, message)

    async def _list_approvals(self, request: web.Request) -> web.StreamResponse:
        message = transport_pb2.PublicListApprovalsRequest(
            conversation_id=request.match_info["id"], pending_only=_flag(request, "pending")
        )
        return await self._unary(request, self._stub.ListApprovals, message)

    async def _resolve_approval(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        _enum_field(body, "decision", "APPROVAL_DECISION_", ("approve", "reject", "edit"))
        message = _parse(
            body, transport_pb2.PublicResolveApprovalRequest(), approval_id=request.match_info["id"]
        )
        return await self._unary(request, self._stub.ResolveApproval, message)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return await self._unary(request, self._stub.Models, transport_pb2.ModelsRequest())

    async def _computers(self, request: web.Request) -> web.StreamResponse:
        return await self._unary(request, self._stub.Computers, transport_pb2.ComputersRequest())

    async def _create_stream_token(self, request: web.Request) -> web.StreamResponse:
        message = _parse(
            await _body(request),
            transport_pb2.CreateStreamTokenRequest(),
            conversation_id=request.match_info["id"],
        )
        return await self._unary(request, self._stub.CreateStreamToken, message)

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(document())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """The conversation's events after the cursor (see ``_cursor``), following the live tail.

        Server-Sent Events: one SSE event per AgentEvent (``id:`` its event_seq,
        ``event:`` its kind, ``data:`` its JSON on one line), so an EventSource
        reconnects with Last-Event-ID and resumes without gap or repeat; a
        ``: keep-alive`` comment after ``keepalive`` seconds of silence.
        NDJSON: one AgentEvent per line, and nothing while idle.

        When the subscriber fell behind (a Resync, or RESOURCE_EXHAUSTED from
        the stream) the answer ends with ``event: resync`` / ``data:
        {"after_event_seq": N}`` (NDJSON: ``{"resync": {"after_event_seq":
        "N"}}``); resume after N. Any other failure once streaming ends it with
        ``event: stream_error`` (NDJSON: a line) carrying the error body.
        """
        conversation_id = request.match_info["id"]
        frames = _Frames("text/event-stream" in request.headers.get("Accept", ""))
        cursor = _cursor(request)
        until = _until(request)
        metadata = self._metadata(request, stream_token=True)
        # Subscribe reports a bad key or conversation only once the HTTP status is
        # sent; asking GetConversation first gives those failures their status.
        await self._stub.GetConversation(
            transport_pb2.PublicGetConversationRequest(conversation_id=conversation_id),
            metadata=metadata,
            timeout=self.rpc_timeout,
        )
        response = web.StreamResponse(headers=_SSE_HEADERS if frames.sse else _NDJSON_HEADERS)
        call = self._stub.Subscribe(
            transport_pb2.SubscribeRequest(
                conversation_id=conversation_id, after_event_seq=cursor, until=until
            ),
            metadata=metadata,
        )
        self._streams.add(call)
        closing = asyncio.ensure_future(self._closing.wait())
        read: asyncio.Future[object] | None = None
        try:
            await response.prepare(request)
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                waiting: set[asyncio.Future[Any]] = {read, closing}
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=self.keepalive if frames.sse else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in done:
                    await response.write(
                        frames.error(
                            grpc.StatusCode.UNAVAILABLE,
                            f"the server is shutting down; reconnect with after_event_seq={cursor}",
                        )
                    )
                    break
                if not done:
                    await response.write(_KEEPALIVE)
                    continue
                item, read = read.result(), None
                if not isinstance(item, transport_pb2.SubscribeResponse):
                    break
                events = item.events
                for i in range(0, len(events), self.batch_events):
                    await response.write(frames.events(events[i : i + self.batch_events]))
                    cursor = events[min(i + self.batch_events, len(events)) - 1].event_seq
                if item.HasField("resync"):
                    await response.write(frames.resync(item.resync.after_event_seq))
                    break
        except grpc.aio.AioRpcError as exc:
            tail = (
                frames.resync(cursor)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                else frames.error(exc.code(), exc.details() or "")
            )
            with contextlib.suppress(ConnectionResetError):
                await response.write(tail)
        except ConnectionResetError:
            return response
        finally:
            closing.cancel()
            call.cancel()
            if read is not None:
                read.cancel()
                read.add_done_callback(_consume)
            self._streams.discard(call)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response


async def start_http(
    listen: str,
    grpc_target: str,
    *,
    batch_events: int = 64,
    rpc_timeout: float = RPC_TIMEOUT,
    keepalive: float = KEEPALIVE_SECONDS,
    max_body: int = MAX_BODY_BYTES,
    checks: Mapping[str, ReadyCheck] | None = None,
    cors_origins: Sequence[str] = (),
) -> HttpBridge:
    """Serve the bridge on ``listen`` ("host:port"; port 0 picks a free one) in front of the
    Dispatch service at ``grpc_target``.

    ``batch_events``: most events per HTTP write; ``rpc_timeout``: deadline of each unary
    call; ``keepalive``: seconds of silence before an SSE keep-alive comment; ``max_body``:
    largest request body, in bytes; ``checks``: what /readyz asks besides the transport
    itself, by name (``kernel``, ``store``); ``cors_origins``: the web origins whose pages
    may call the bridge (``*``: any).
    """
    bridge = HttpBridge(
        grpc_target,
        batch_events=batch_events,
        rpc_timeout=rpc_timeout,
        keepalive=keepalive,
        max_body=max_body,
        checks=checks,
        cors_origins=cors_origins,
    )
    await bridge.start(listen)
    return bridge
