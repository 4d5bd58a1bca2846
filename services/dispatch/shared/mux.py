"""Many unary calls over one long-lived bidirectional stream.

A unary gRPC round trip in Python costs several times a message on a stream that is
already open, so the kernel's per-step calls (store appends, exec file calls) travel as
messages on one stream per peer. Each request envelope carries an ``id`` (and its
deadline, ``timeout_ms``); each answer carries the ``id`` it answers and either its
result or an ``error`` (``dispatch.v1.CallStatus``), in any order.

``MuxClient`` is the caller's side: every call has its own deadline, a call that fails
raises ``grpc.aio.AioRpcError`` with the status code and details the unary RPC would
have ended with (so retry logic written against unary calls works unchanged), a stream
that breaks fails every call waiting on it with UNAVAILABLE and the next call opens a
new one, and a caller cancelled while it waits leaves the stream to the others.

``MuxServer`` is the servicer's side: it reads requests, runs each in its own task (at
most ``limit`` at once, so a slow call never holds up the others and a flood cannot
grow without bound), writes each answer as it finishes, and answers a call that failed
with what the unary servicer method would have: a ``DispatchError`` as ``grpc_errors``
maps it (the unary method is called as is, with a per-call context whose ``abort``
records the status), anything else UNKNOWN as grpc.aio words it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, NoReturn, Protocol, TypeVar, cast

import grpc

from dispatch.shared.errors import Context
from dispatch.v1 import mux_pb2

log = logging.getLogger(__name__)

# What grpc.aio says of a call whose deadline passed.
DEADLINE_DETAILS = "Deadline Exceeded"
# Calls a stream runs at once on the server side.
DEFAULT_LIMIT = 64
# How long closing a client waits for the server to end the stream.
CLOSE_WAIT = 5.0

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class Envelope(Protocol):
    """A request on a multiplexed stream: ``AppendStreamRequest``, ``ExecSessionRequest``."""

    id: int
    timeout_ms: int


class Reply(Protocol):
    """An answer on a multiplexed stream: ``AppendStreamResponse``, ``ExecSessionResponse``."""

    id: int

    @property
    def error(self) -> mux_pb2.CallStatus: ...

    def HasField(self, field_name: Any) -> bool: ...


Req = TypeVar("Req", bound=Envelope)
Resp = TypeVar("Resp", bound=Reply)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary call that ended with ``code`` and ``details`` raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def status_code(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


# ---------------------------------------------------------------------------- client


class _Stream(Generic[Req, Resp]):
    """One open stream: its call, what waits to be written, the calls waiting for answers."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Req, Resp]):
        self.call = call
        self.outbox: asyncio.Queue[Req | None] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[Resp]] = {}
        self.broken: grpc.aio.AioRpcError | None = None
        self.tasks: list[asyncio.Task[None]] = []


class MuxClient(Generic[Req, Resp]):
    """Unary-like calls over one bidirectional stream, opened when first needed.

    ``open`` starts the stream (``stub.AppendStream``); ``what`` names it in errors.
    """

    def __init__(self, open: Callable[[], grpc.aio.StreamStreamCall[Req, Resp]], what: str):
        self._open = open
        self.what = what
        self._stream: _Stream[Req, Resp] | None = None
        self._next_id = 0
        self._closed = False
        # Streams opened so far (tests and metrics: a broken stream is replaced, not reused).
        self.opened = 0
        # The peer has no such stream method (an older version): callers fall back to unary.
        self.unimplemented = False

    async def call(self, request: Req, timeout: float) -> Resp:  # noqa: ASYNC109 - the call's own deadline
        """Send ``request`` (its ``id`` and ``timeout_ms`` are set here) and wait for its
        answer, at most ``timeout`` seconds. Raises ``grpc.aio.AioRpcError`` as the unary
        call would: the call's own status, DEADLINE_EXCEEDED, or UNAVAILABLE when the
        stream broke before the answer came."""
        if timeout is None or not timeout > 0:
            raise ValueError(f"every call on the {self.what} stream needs a deadline, got {timeout!r}")
        if self._closed:
            raise rpc_error(grpc.StatusCode.CANCELLED, f"the {self.what} stream is closed")
        stream = self._stream if self._stream is not None else self._start()
        self._next_id += 1
        request.id = call_id = self._next_id
        request.timeout_ms = min(2**32 - 1, math.ceil(timeout * 1000))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Resp] = loop.create_future()
        stream.pending[call_id] = answer
        timer = loop.call_later(timeout, _expire, answer)
        stream.outbox.put_nowait(request)
        try:
            reply = await answer
        finally:
            # A cancelled caller only stops waiting: its answer, when it comes, is dropped.
            timer.cancel()
            stream.pending.pop(call_id, None)
        if reply.HasField("error"):
            raise rpc_error(status_code(reply.error.code), reply.error.details)
        return reply

    def _start(self) -> _Stream[Req, Resp]:
        stream: _Stream[Req, Resp] = _Stream(self._open())
        self.opened += 1
        stream.tasks = [
            asyncio.create_task(self._write(stream), name=f"{self.what} stream writer"),
            asyncio.create_task(self._read(stream), name=f"{self.what} stream reader"),
        ]
        self._stream = stream
        return stream

    async def _write(self, stream: _Stream[Req, Resp]) -> None:
        # The only task that writes: grpc takes one write at a time, and a write cancelled
        # half way cancels the whole call, so no caller ever writes itself.
        try:
            while True:
                request = await stream.outbox.get()
                if request is None:
                    await stream.call.done_writing()
                    return
                await stream.call.write(request)
        except grpc.aio.AioRpcError as exc:
            self._break(stream, exc)
        except asyncio.InvalidStateError:  # the call ended (the reader says why)
            pass

    async def _read(self, stream: _Stream[Req, Resp]) -> None:
        why: grpc.aio.AioRpcError
        try:
            while True:
                reply = await stream.call.read()
                if reply is grpc.aio.EOF:
                    why = rpc_error(
                        grpc.StatusCode.UNAVAILABLE, f"the {self.what} stream ended before answering"
                    )
                    break
                answer = stream.pending.pop(cast(Resp, reply).id, None)
                if answer is not None and not answer.done():
                    answer.set_result(cast(Resp, reply))
        except grpc.aio.AioRpcError as exc:
            why = exc
        except asyncio.CancelledError:
            why = rpc_error(grpc.StatusCode.UNAVAILABLE, f"the {self.what} stream was closed")
            self._break(stream, why)
            raise
        self._break(stream, why)

    def _break(self, stream: _Stream[Req, Resp], exc: grpc.aio.AioRpcError) -> None:
        """The stream is unusable: fail everything waiting on it; the next call opens another."""
        if stream.broken is not None:
            return
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            self.unimplemented = True
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            stream.broken = exc
        else:
            # However the stream itself ended (cancelled by a stopping server, reset), the
            # calls on it did not get their answer: for them the peer was unavailable.
            detail = f"the {self.what} stream broke: {exc.code().name}: {exc.details() or ''}"
            stream.broken = rpc_error(grpc.StatusCode.UNAVAILABLE, detail)
        if self._stream is stream:
            self._stream = None
        for answer in stream.pending.values():
            if not answer.done():
                answer.set_exception(stream.broken)
        stream.pending.clear()
        stream.outbox.put_nowait(None)
        stream.call.cancel()

    async def close(self) -> None:
        """End the stream cleanly: no more calls, the server's answers to the calls already
        sent are awaited (a few seconds at most), then the stream is done."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.outbox.put_nowait(None)
        writer, reader = stream.tasks
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(writer, reader)), CLOSE_WAIT)
        for task in stream.tasks:
            task.cancel()
        await asyncio.gather(*stream.tasks, return_exceptions=True)


def _expire(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS))


# ---------------------------------------------------------------------------- server


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The context one call on a multiplexed stream runs with, in place of a unary call's
    ``ServicerContext``: ``abort`` ends this call only; metadata and peer are the stream's."""

    def __init__(self, stream: Context, timeout: float | None):
        self._stream = stream
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise _Aborted(code, details)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    def peer(self) -> str:
        return self._stream.peer()

    def cancelled(self) -> bool:
        return self._stream.cancelled()

    def done(self) -> bool:
        return self._stream.done()


class MuxServer(Generic[Req, Resp]):
    """Serves multiplexed streams of one kind; ``drain`` ends them all (server shutdown).

    ``answer(request, context)`` answers one request envelope; it is given a
    ``CallContext`` (typed as a servicer context, so unary servicer methods take it).
    ``reply`` makes an empty answer envelope (for errors).
    """

    def __init__(
        self,
        answer: Callable[[Req, Context], Awaitable[Resp]],
        reply: Callable[[], Resp],
        *,
        what: str,
        limit: int = DEFAULT_LIMIT,
    ):
        self._answer = answer
        self._reply = reply
        self.what = what
        self.limit = limit
        self._readers: set[asyncio.Task[None]] = set()
        self._draining = False

    async def serve(self, requests: AsyncIterator[Req], context: Context) -> AsyncIterator[Resp]:
        """The answers to ``requests``, each as soon as it is ready (the servicer's stream method
        yields them)."""
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the {self.what} service is shutting down")
        # Answers as they finish; None: a call ended without one (cancelled), or reading ended.
        answers: asyncio.Queue[Resp | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.limit)
        running: set[asyncio.Task[None]] = set()
        calls = 0  # read and not answered yet
        reading = True
        failed: list[BaseException] = []

        async def one(request: Req) -> None:
            nonlocal calls
            reply: Resp | None = None
            try:
                reply = await self._one(request, context)
            finally:
                calls -= 1
                slots.release()
                answers.put_nowait(reply)

        async def read() -> None:
            nonlocal calls, reading
            try:
                async for request in requests:
                    await slots.acquire()
                    calls += 1
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except asyncio.CancelledError:
                pass  # drained: the calls already read are answered, then the stream ends
            except BaseException as exc:  # an abort (undecodable request) or a broken stream
                failed.append(exc)
            finally:
                reading = False
                answers.put_nowait(None)

        reader = asyncio.create_task(read(), name=f"{self.what} stream reader")
        self._readers.add(reader)
        try:
            while reading or calls or not answers.empty():
                got = await answers.get()
                if got is not None:
                    yield got
                elif failed:
                    raise failed[0]
        finally:
            self._readers.discard(reader)
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _one(self, request: Req, stream: Context) -> Resp:
        timeout = request.timeout_ms / 1000 if request.timeout_ms else None
        context = CallContext(stream, timeout)
        try:
            async with asyncio.timeout(timeout) as scope:
                reply = await self._answer(request, cast(Context, context))
        except _Aborted as exc:
            return self._failed(request, exc.code, exc.details)
        except TimeoutError:
            if scope.expired():
                return self._failed(request, grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS)
            return self._unexpected(request, TimeoutError())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._unexpected(request, exc)
        reply.id = request.id
        return reply

    def _unexpected(self, request: Req, exc: Exception) -> Resp:
        # What grpc.aio answers (and logs) for an exception a unary method let through.
        log.error("%s call %d: unexpected error", self.what, request.id, exc_info=exc)
        return self._failed(request, grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")

    def _failed(self, request: Req, code: grpc.StatusCode, details: str) -> Resp:
        reply = self._reply()
        reply.id = request.id
        reply.error.code = code.value[0]
        reply.error.details = details
        return reply

    def drain(self) -> None:
        """Stop reading every stream: the calls already read are answered, then each stream
        ends (its caller opens a new one, elsewhere or after a restart); new streams are
        refused with UNAVAILABLE. A stopping server's grace lets the answers go out."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()
