"""The HTTP front: SageMaker Runtime's InvokeEndpoint API on Starlette, served by uvicorn (h11).

Routes (all on one port, 127.0.0.1 by default):

* ``POST /endpoints/<EndpointName>/invocations`` - what boto3's ``sagemaker-runtime``
  ``invoke_endpoint`` sends. Request headers used: ``X-Amzn-SageMaker-Target-Model`` (required:
  this is a multi-model endpoint), ``Content-Type`` and ``Accept`` (forwarded to Triton),
  ``X-Amzn-SageMaker-Custom-Attributes`` (forwarded, and echoed back). SigV4 signatures are
  accepted without being checked, and never logged.
* ``GET /ping`` - 200 when tritonserver is up, 503 while starting or restarting.
* ``GET /models`` - every model the endpoint knows: state, size, last use, counters; plus the
  budget. ``GET /models/<TargetModel>`` - one of them.

Answers as SageMaker gives them: the model's body and ``Content-Type``,
``x-Amzn-Invoked-Production-Variant: AllTraffic``, ``X-Amzn-SageMaker-Custom-Attributes`` (the
model's own when it sets one - Triton never does - otherwise the request's value echoed back;
absent when neither has one), ``x-amzn-RequestId``. Errors carry ``x-amzn-ErrorType`` and a JSON
body, so boto3 raises the same exception classes as on AWS (see errors.py).

uvicorn's h11 protocol parses the requests: a malformed request line, header, Content-Length
(negative, not a number) or chunk size is refused with 400 before any route runs. What it does
not do is bound the time a client may take to send a request (its keep-alive timeout starts
only after an answer), so ``_Protocol`` adds that: a request must be received completely within
``request_timeout_s`` of its first byte (of the connection, for a new one), or it is answered
408 and the connection closed. And a connection closed before its request was read to the end
(a refusal) lingers a moment, reading nothing, so the answer reaches the client (_Transport).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import socket
import sys
import termios
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from http import HTTPStatus
from typing import Any, Protocol, TypeVar

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdserve.catalog import MAX_PAYLOAD_BYTES

from .errors import (
    EndpointError,
    InternalFailure,
    RequestTimeout,
    ServiceUnavailable,
    UnknownOperation,
    ValidationError,
)
from .triton import TARGET_HEADER



class LocalEndpoint(Protocol):
    """What the HTTP front needs of the endpoint behind it (server.LocalEndpoint is one)."""

    registry: Any
    requests_total: int
    stopping: bool

    def invoke(self, endpoint_name: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes, str]: ...

    def healthy(self) -> bool: ...

    def listing(self) -> dict: ...

log = logging.getLogger("serving.local_endpoint")
access_log = logging.getLogger("serving.local_endpoint.access")

MAX_REQUEST_BYTES = MAX_PAYLOAD_BYTES  # invoke_endpoint's limit (6,291,456 bytes)
REQUEST_TIMEOUT_S = 20.0  # to receive one whole request: request line, headers and body
KEEP_ALIVE_S = 60  # an idle connection is closed after this; long, so pooled clients rarely race it
SHUTDOWN_GRACE_S = 5  # stop() waits this long for answers in progress, then cuts them
LINGER_S = 2.0  # a refused request's connection: from the answer (and FIN) to closing the socket
THREADS = 256  # blocking calls at once (a call waits up to --load-wait for its model)
# Connections open at once, idle keep-alive ones included (--max-connections). Each can hold a
# request body of up to 6 MB in memory and a thread waiting for its model, so without a cap one
# client opening connections in a loop exhausts memory and threads for everyone. A connection
# opened past it gets 503 ServiceUnavailable for its request at once (the studio retries that),
# its body unread, and is closed. The studio sends at most 8 calls at once and botocore pools 10
# connections a client: 64 leaves room for a few studios and a benchmark's clients.
MAX_CONNECTIONS = 64
SERVER_NAME = "sd-studio-local-endpoint"
# Set in a request's ASGI scope["state"] when the protocol answered it (a 400 for a bad chunk, a
# 408) while the route was still reading the body: the route then neither answers nor logs it.
ANSWERED_BY_PROTOCOL = "local_endpoint.answered_by_protocol"
# Set in scope["state"] of every request on a connection opened past the cap: the route refuses it.
OVER_CAPACITY = "local_endpoint.over_capacity"

T = TypeVar("T")


# -- the routes ------------------------------------------------------------------------------

def build_app(endpoint: LocalEndpoint, limiter: anyio.CapacityLimiter,
              max_connections: int = MAX_CONNECTIONS) -> Starlette:
    """The ASGI app: thin routes around ``endpoint``; blocking work runs in ``limiter``'s threads."""

    async def blocking(function: Callable[..., T], *args: Any) -> T:
        # The registry and Triton's client block (locks, http.client, a load up to --load-wait).
        # When uvicorn cancels the request (stopping), the call finishes in its thread and
        # releases what it holds itself.
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter, abandon_on_cancel=True)

    async def invocations(request: Request) -> Response:
        headers = dict(request.headers.items())  # lower-case names
        request.state.target = headers.get(TARGET_HEADER.lower(), "-")
        body = await _read_body(request)
        name = request.path_params["name"]  # percent-decoded
        status, out, data, request.state.target = await blocking(endpoint.invoke, name, headers, body)
        if await request.is_disconnected():
            request.state.status = 499  # the caller hung up before the answer was written
        return Response(data, status, out)

    async def ping(request: Request) -> Response:
        up = await blocking(endpoint.healthy)
        return _json(200 if up else 503, {"status": "Healthy" if up else (
            "Starting" if endpoint.registry is None else "Unhealthy")})

    async def models(request: Request) -> Response:
        return _json(200, await blocking(endpoint.listing))

    async def model(request: Request) -> Response:
        target = request.state.target = request.path_params["target"]  # percent-decoded
        registry = endpoint.registry
        entry = None if registry is None else await blocking(registry.entry, target)
        if entry is None:
            raise UnknownOperation(f"The endpoint has not seen model {target}.")
        return _json(200, entry.describe())

    async def unknown(request: Request) -> Response:
        raise UnknownOperation(f"No route for {request.method} {request.scope['path']}; this endpoint serves "
                               f"POST /endpoints/<name>/invocations, GET /ping, GET /models.")

    def route(path: str, handler: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        async def answer(request: Request) -> Response:
            return await _answer(endpoint, request, handler, max_connections)
        return Route(path, answer, methods=[method])

    async def no_route(request: Request, _: Exception) -> Response:
        return await _answer(endpoint, request, unknown, max_connections)

    return Starlette(routes=[
        route("/endpoints/{name}/invocations", invocations, "POST"),
        route("/ping", ping, "GET"),
        route("/models", models, "GET"),
        route("/models/{target:path}", model, "GET"),
    ], exception_handlers={
        # Any other method or path: SageMaker's UnknownOperationException, not Starlette's 404/405.
        404: no_route, 405: no_route,
    })


async def _answer(endpoint: LocalEndpoint, request: Request,
                  handler: Callable[[Request], Awaitable[Response]], max_connections: int) -> Response:
    """Run one route: request id, SageMaker-shaped errors, the access log line."""
    started = time.monotonic()
    request.state.target = "-"
    request.state.status = None
    request.state.body_read = False
    endpoint.requests_total += 1  # only this event loop's thread writes it
    over_capacity = request.scope["state"].get(OVER_CAPACITY, False)
    try:
        if over_capacity:
            raise ServiceUnavailable(
                f"The endpoint has its limit of {max_connections} connections open (--max-connections); "
                f"this one is closed. Try again shortly.")
        response = await handler(request)
    except EndpointError as error:
        response = _error(error)
    except ClientDisconnect:  # while reading the body
        request.state.status = 499
        response = Response(status_code=400)  # nobody to send it to
    except Exception as error:  # noqa: BLE001 - answered, logged without the body
        log.exception("request failed")
        response = _error(InternalFailure(f"The local endpoint failed: {type(error).__name__}: {error}"))
    except asyncio.CancelledError:
        if not endpoint.stopping:
            raise
        # Stopping, uvicorn cuts the answers still in progress after SHUTDOWN_GRACE_S: the caller is
        # told why in SageMaker's shape rather than with a bare 500.
        response = _error(InternalFailure(
            f"The endpoint stopped before {request.state.target} answered: it is shutting down "
            f"(answers in progress get {SHUTDOWN_GRACE_S} s). Try again once it is back."))
    response.headers["x-amzn-RequestId"] = str(uuid.uuid4())
    if over_capacity or (not request.state.body_read and _has_body(request)):
        # Over the cap: free the connection. Not read: close rather than let uvicorn read (and
        # drop) the rest of it.
        response.headers["Connection"] = "close"
    if not request.scope["state"].get(ANSWERED_BY_PROTOCOL):  # else _Protocol answered and logged it
        log_request(request.method, request.scope["raw_path"].decode("latin-1"), request.state.target,
                    request.state.status or response.status_code, started)
    return response


async def _read_body(request: Request) -> bytes:
    """The request body, refused (ValidationError) as soon as it is known to be over the limit:
    from a Content-Length before reading any of it, or while reading a chunked body."""
    declared = request.headers.get("content-length")  # h11 has checked it is a number
    if declared is not None and int(declared) > MAX_REQUEST_BYTES:
        raise _too_large(f"{int(declared)} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise _too_large(f"at least {len(body)} bytes")  # read no further
    request.state.body_read = True
    return bytes(body)


def _too_large(size: str) -> ValidationError:
    return ValidationError(
        f"Request body is {size}, over invoke_endpoint's limit of {MAX_REQUEST_BYTES} bytes "
        f"(6 MB). Send a smaller image (fewer pixels, or JPEG instead of PNG).")


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


def _json(status: int, value: Any) -> Response:
    return Response(json.dumps(value, indent=1), status, {"Content-Type": "application/json"})


def _error(error: EndpointError) -> Response:
    return Response(error.body(), error.status, error.headers())


def log_request(method: str, path: str, target: str, status: int, started: float) -> None:
    """The one access line of a request: no body, no header but the TargetModel, nothing that
    could start a line of its own."""
    level = logging.DEBUG if path == "/ping" else logging.INFO
    access_log.log(level, "%s %s model=%s status=%s %.0f ms", loggable(method), loggable(path),
                   loggable(target), status, (time.monotonic() - started) * 1000)


def loggable(value: str) -> str:
    """``value`` with control characters (CR, LF, ESC, NEL...) and backslashes escaped as in
    Python source, so what a client sends cannot forge a log line or drive a terminal."""
    if value.isprintable() and "\\" not in value:
        return value
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                   for c in value)


# -- the protocol: h11 plus a bound on the time to receive a request --------------------------------

class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request, its own refusals
    (malformed framing: 400; too slow: 408) in SageMaker's error shape, and lingering closes.

    The deadline runs from a connection's opening, or from the first byte of a later request on
    it, until h11 has the request's end. It also bounds a body uvicorn reads and drops after an
    early answer. A connection that never sent a byte is closed without an answer.
    """

    front: HttpFront  # set per front (a subclass) by HttpFront

    _deadline: asyncio.TimerHandle | None = None
    _request_started = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.front.max_connections:  # this one counted
            # Requests copy app_state into their scope["state"]; the route refuses them unread.
            self.app_state = {**self.app_state, OVER_CAPACITY: True}
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.front.bytes_received += len(data)
        self._arm()  # a request is arriving (no-op when its deadline runs already)
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY) and self._deadline is not None:
            self._deadline.cancel()  # the request is complete (or h11 refused it)
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _arm(self) -> None:
        if self._deadline is None and not self.transport.is_closing():
            self._request_started = time.monotonic()
            self._deadline = self.loop.call_later(self.front.request_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self.transport.close()  # never sent a byte: nothing to answer
            return
        self._refuse(RequestTimeout(
            f"The request was not received completely within {self.front.request_timeout_s:g} s; "
            f"the connection is closed."))

    def send_400_response(self, msg: str) -> None:
        # h11 refused the request (uvicorn logged why): answer in SageMaker's shape.
        self._refuse(ValidationError(
            "The request is not valid HTTP/1.1 (request line, a header, Content-Length or the "
            "chunked body's framing); the connection is closed."))

    def _refuse(self, error: EndpointError) -> None:
        """Answer ``error`` and close, unless the route has begun its own answer (then just close)."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = error.body()
            headers = self.server_state.default_headers + [
                (name.lower().encode(), value.encode()) for name, value in error.headers().items()]
            headers += [(b"x-amzn-requestid", str(uuid.uuid4()).encode()), (b"connection", b"close"),
                        (b"content-length", str(len(body)).encode())]
            response = h11.Response(status_code=error.status, headers=headers,
                                    reason=HTTPStatus(error.status).phrase.encode())
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            # A route still reading this request's body learns it is answered and gets a
            # disconnect (as from connection_lost, which comes only once the socket is closed,
            # after lingering); a request h11 refused before its headers ended reached no route.
            method, path, target = "-", "-", "-"
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
                scope = self.cycle.scope
                scope["state"][ANSWERED_BY_PROTOCOL] = True
                method, path = scope["method"], scope["raw_path"].decode("latin-1")
                target = dict(scope["headers"]).get(TARGET_HEADER.lower().encode(), b"-").decode("latin-1")
            log_request(method, path, target, error.status, self._request_started)
        self.transport.close()

    def shutdown(self) -> None:
        if self.transport.is_closing():
            self.transport.close_now()  # stopping: no more lingering
        else:
            super().shutdown()

    def request_read(self) -> bool:
        """Whether all the client sent of its request so far has been read (nothing pending)."""
        state = self.conn.their_state
        return state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or (
            state is h11.IDLE and not self.conn.trailing_data[0])


class _Transport:
    """A connection's transport as uvicorn sees it, except that close() lingers when the request
    was not read to its end.

    Closing a socket that holds received bytes nobody read makes Linux send a reset at once, and
    the reset throws away what of the answer is still in the send queue: the client gets the
    headers of a refusal without its body, or nothing. So then close() sends the answer and a
    FIN, reads nothing more, and closes the socket once the client has acknowledged all of the
    answer (the kernel's send queue is empty), or after LINGER_S.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def resume_reading(self) -> None:
        if not self._lingering:
            self._transport.resume_reading()

    def close(self) -> None:
        if self.is_closing():
            return
        if self._protocol.request_read():
            self._transport.close()
            return
        self._lingering = True
        self._transport.pause_reading()
        self._transport.write_eof()  # after what is queued
        self._close_when_sent(self._protocol.loop.time() + LINGER_S)

    def close_now(self) -> None:
        self._transport.close()

    def _close_when_sent(self, deadline: float) -> None:
        if self._transport.is_closing():
            return
        if _unacknowledged(self._transport) and self._protocol.loop.time() < deadline:
            self._protocol.loop.call_later(0.01, self._close_when_sent, deadline)
        else:
            self._transport.close()


def _unacknowledged(transport: asyncio.Transport) -> int:
    """Bytes sent on the transport's socket the peer has not acknowledged yet, asyncio's own
    buffer included (1 where the kernel cannot say: wait the whole LINGER_S)."""
    if transport.get_write_buffer_size():
        return transport.get_write_buffer_size()
    try:
        queued = fcntl.ioctl(transport.get_extra_info("socket").fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (AttributeError, OSError):
        return 1
    return int.from_bytes(queued, sys.byteorder)


# -- serving ---------------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    def capture_signals(self) -> nullcontext[None]:  # type: ignore[override]
        # serve_until_signalled handles SIGINT/SIGTERM (uvicorn would not install handlers off the
        # main thread anyway; this keeps it so whatever thread runs it).
        return nullcontext()


class HttpFront:
    """uvicorn serving ``build_app(endpoint)`` in a thread of its own, on a socket bound at once
    (a taken port is an OSError here, before anything slow starts)."""

    def __init__(self, endpoint: LocalEndpoint, host: str, port: int, *,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections: at least 1; got {max_connections}.")
        self.socket = _listen(host, port)
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.bytes_received = 0  # read from clients, all connections (refusals must read no further)
        limiter = anyio.CapacityLimiter(THREADS)
        protocol = type("FrontProtocol", (_Protocol,), {"front": self})
        config = uvicorn.Config(
            build_app(endpoint, limiter, max_connections), http=protocol, ws="none", lifespan="off", loop="asyncio",
            interface="asgi3", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, headers=[("Server", SERVER_NAME)], timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._run, name="http front", daemon=True)
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self.socket]))
        except BaseException as error:  # noqa: BLE001 - reported by start()
            self._failure = error
            log.exception("the HTTP front stopped")

    def start(self) -> HttpFront:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP front did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting, close idle connections, give answers in progress SHUTDOWN_GRACE_S."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(SHUTDOWN_GRACE_S + 5)
        self.socket.close()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock
