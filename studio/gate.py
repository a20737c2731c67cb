"""The gate: an ASGI middleware in front of every Gradio route, which decides before Gradio reads
a byte of a request's body whether the studio serves it.

* Every route that takes data or work or serves files (any POST but sign-in; reading files,
  queue and call results, upload progress and streams; anything under /studio/) refuses a caller
  who is not signed in (`Access.designer_of`, the one rule for who a request is from) with 401 (403:
  signed in, not allowed), in every sign-in mode. The page, its assets, /config and the sign-in
  routes stay open, so that the sign-in page works.
* Bodies are bounded before they are decoded: an event (queue join, call, run) at most
  MAX_EVENT_BODY_BYTES, then parsed and walked: an image editor value at most MAX_EDITOR_LAYERS
  layers, at most MAX_FILES_PER_EVENT file references; the body then goes on to Gradio as it came.
  An upload at most MAX_UPLOAD_REQUEST_BYTES and MAX_FILES_PER_UPLOAD files, counted as it streams.
  Past a limit: 413, naming it.
* Sign-in by password: at most LOGINS_PER_ADDRESS_PER_MINUTE attempts from one address, and a
  lockout of one name from one address after FAILURES_BEFORE_LOCKOUT wrong passwords, doubling
  from FIRST_LOCKOUT_S up to MAX_LOCKOUT_S (`LoginThrottle`); the outcome is read from Gradio's
  answer (200 signed in, 400 wrong).
* Without a sign-in it gives each visitor a cookie the studio signs (VISITOR_COOKIE).
* A file that `owns_file` (the result store's check) says is another designer's is answered 404.

`launch_options(access)` is what `demo.launch()` takes for all this; `scope_designer` names the
designer of an ASGI scope for routes of the studio's own.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from sdserve.catalog import MAX_PROMPT_CHARS
from starlette.datastructures import Headers
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import cookie_parser

from studio.access import (
    SESSION_DESIGNER,
    VISITOR_COOKIE,
    Access,
    Caller,
    NotSignedIn,
    PasswordChecks,
    SignInBusy,
    new_visitor_cookie,
    visitor_of,
)
from studio.metadata import MAX_PARAMETERS_BYTES
from studio.session import HISTORY_LIMIT, MAX_UPLOAD_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# --- payload limits ----------------------------------------------------------------------------------
# The Erase tab's editor has one paint layer (layers=False), and a restored mask arrives as one more;
# twice that leaves room for what the editor adds while painting. A layer of the largest Erase
# image decodes to ~4 MB, so the most a value may hold costs ~17 MB; 64 cost 273 MB.
MAX_EDITOR_LAYERS = 4
# The most file references one of the studio's events carries: the Erase editor's background,
# composite and layers (every other event and API call carries at most two).
MAX_FILES_PER_EVENT = MAX_EDITOR_LAYERS + 2
# The page uploads an event's files together, gradio_client one a request.
MAX_FILES_PER_UPLOAD = MAX_FILES_PER_EVENT
MULTIPART_PART_OVERHEAD_BYTES = 1024  # a part's delimiter and headers (its name, file name and type)
MAX_UPLOAD_REQUEST_BYTES = MAX_FILES_PER_UPLOAD * (MAX_UPLOAD_BYTES + MULTIPART_PART_OVERHEAD_BYTES)
# The largest event the studio's page sends: the session history (HISTORY_LIMIT entries, each at
# most MAX_PARAMETERS_BYTES of parameters besides its ids), a tab's two prompts (MAX_PROMPT_CHARS,
# at most 6 bytes of JSON a character) and the rest of its controls and file references.
HISTORY_ENTRY_BYTES = MAX_PARAMETERS_BYTES + 1024
MAX_EVENT_BODY_BYTES = HISTORY_LIMIT * HISTORY_ENTRY_BYTES + 2 * MAX_PROMPT_CHARS * 6 + 64 * 1024
# A sign-in form: a name of at most 64 characters and a password a password manager makes.
MAX_LOGIN_BODY_BYTES = 8 * 1024

# --- sign-in throttling ------------------------------------------------------------------------------
# Sign-in attempts from one address in any minute, whatever the names: a person retyping, not a script.
LOGINS_PER_ADDRESS_PER_MINUTE = 10
# Wrong passwords for one name from one address before that pair is locked out; each further
# failure after a lockout doubles it, up to MAX_LOCKOUT_S, and a success clears it. Only the pair
# is locked: a stranger elsewhere guessing a designer's password never locks the designer out,
# and one at the designer's own address for at most MAX_LOCKOUT_S at a time.
FAILURES_BEFORE_LOCKOUT = 5
FIRST_LOCKOUT_S = 60
MAX_LOCKOUT_S = 15 * 60
# Addresses and (name, address) pairs remembered; past it the longest quiet are forgotten.
THROTTLE_MEMORY = 10_000
MINUTE_S = 60

VISITOR_COOKIE_MAX_AGE_S = 365 * 86_400  # a visitor's results and quotas are theirs for as long

API = "/gradio_api"
SIGN_IN_ROUTES = ("/login", "/login/")
UPLOAD_ROUTE = f"{API}/upload"
# Events: what Gradio decodes into component values and runs.
EVENT_ROUTE = re.compile(rf"{API}/(queue/join|call/.+|run/.+|api/.+)")
# Reads (GET, HEAD) that serve files or what the studio made, or take part in an event.
GATED_READS = tuple(f"{API}/{route}" for route in (
    "file=", "file/", "queue/data", "call/", "upload_progress", "stream/", "proxy=", "run-history/", "runs",
    "vibe-code")) + ("/studio/",)
READS = ("GET", "HEAD", "OPTIONS")
FILE_ROUTES = (f"{API}/file=", f"{API}/file/")


OwnsFile = Callable[[str, str], bool | None]  # (path, designer) -> theirs, another's, or not a result


def launch_options(access: Access, *, owns_file: OwnsFile | None = None,
                   clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """What `demo.launch()` takes from the sign-in: Gradio's own sign-in for a users file (its
    check off the event loop), the gate in front of every route, never a share link (GRADIO_SHARE
    would otherwise publish the studio) and never an unexpected exception's text on the page
    (gr.Error's messages are still shown). `owns_file`: see Gate."""
    auth = PasswordChecks(access.users.check).check if access.mode == "password" else None
    return {
        "auth": auth,
        "app_kwargs": {"middleware": [Middleware(Gate, access=access, owns_file=owns_file, clock=clock)]},
        "share": False,
        "show_error": False,
    }


def scope_designer(access: Access, scope: Scope) -> str:
    """The designer an ASGI scope is from (Access.designer_of); NotSignedIn when nobody the studio serves."""
    return access.designer_of(_caller(access, scope))


def _caller(access: Access, scope: Scope) -> Caller:
    cookies = _cookies(scope)
    username = None
    if access.mode == "password":  # what Gradio's own get_current_user reads
        app = scope.get("app")
        tokens, cookie_id = getattr(app, "tokens", None) or {}, getattr(app, "cookie_id", None)
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        username = tokens.get(token) if token else None
    session = scope.get("session") if access.mode == "huggingface" else None
    return Caller(username=username, session=session, cookies=cookies)


def _cookies(scope: Scope) -> dict[str, str]:
    return cookie_parser(Headers(scope=scope).get("cookie", ""))


class Gate:
    """The middleware (see the module's docstring); `Middleware(Gate, access=...)` in the app's
    middleware puts it innermost of the app's own, after the session middleware of Hugging Face
    sign-in, so that the scope carries the session and Gradio's app (its sign-in tokens).

    `owns_file(path, designer)`: whether a file Gradio would serve is that designer's (True),
    another's (False: answered 404, as if it were not there) or no result at all (None)."""

    def __init__(self, app: Callable, *, access: Access, owns_file: OwnsFile | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.app, self.access, self.owns_file = app, access, owns_file
        self.throttle = LoginThrottle(clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path, method = _route_path(scope), scope.get("method", "GET")
        if scope["type"] == "http" and self.access.names_visitors and visitor_of(
                _cookies(scope).get(VISITOR_COOKIE), self.access.visitor_key) is None:
            send = _giving_visitor_cookie(scope, send, new_visitor_cookie(self.access.visitor_key))
        if method == "POST" and path in SIGN_IN_ROUTES:
            await self._sign_in(scope, receive, send)
            return
        if _gated(method, path):
            try:
                designer = scope_designer(self.access, scope)
            except NotSignedIn as refusal:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await _refuse(send, refusal.status, str(refusal))
                return
            # A session designer is the gate's guess (a file request names no session): not checked.
            served = _served_file(path) if method in ("GET", "HEAD") else None
            # In a thread: the store may make the link again first (a download, on S3).
            if (served is not None and self.owns_file is not None and not designer.startswith(SESSION_DESIGNER)
                    and await anyio.to_thread.run_sync(self.owns_file, served, designer) is False):
                await _refuse(send, 404, "No such file.")
                return
        if scope["type"] == "websocket" or method in READS:
            await self.app(scope, receive, send)
        elif path == UPLOAD_ROUTE:
            await self._upload(scope, receive, send)
        else:
            await self._bounded(scope, receive, send, event=bool(EVENT_ROUTE.fullmatch(path)))

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, *, event: bool) -> None:
        """A body read whole up to MAX_EVENT_BODY_BYTES, an event's checked, then replayed to Gradio."""
        body = await _read_body(scope, receive, send, MAX_EVENT_BODY_BYTES, "Request body")
        if body is None:
            return
        problem = event_problem(body) if event else None
        if problem is not None:
            await _refuse(send, 413, problem)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An upload streamed on to Gradio, its bytes and parts counted; past a limit Gradio is
        handed the multipart's end instead of the rest (so it keeps no more than a request may
        hold) and the caller gets 413."""
        length = _content_length(scope)
        if length is not None and length > MAX_UPLOAD_REQUEST_BYTES:
            await _refuse(send, 413, _too_many_bytes("Upload", MAX_UPLOAD_REQUEST_BYTES, length))
            return
        meter = UploadMeter(_multipart_boundary(scope))

        async def metered() -> Message:
            if meter.ended:
                return await receive()
            message = await receive()
            if message["type"] != "http.request":
                return message
            if meter.admit(message.get("body", b"")):
                meter.ended = not message.get("more_body", False)
                return message
            meter.ended = True
            return {"type": "http.request", "body": meter.ending(), "more_body": False}

        answered = False

        async def answering(message: Message) -> None:
            nonlocal answered
            if meter.refusal is not None and not answered:
                return  # Gradio's answer to the cut request; the caller gets the refusal
            answered = True
            await send(message)

        try:
            await self.app(scope, metered, answering)
        except Exception:
            if meter.refusal is None or answered:
                raise  # not the cut's doing
        if meter.refusal is not None and not answered:
            await _refuse(send, 413, meter.refusal)

    async def _sign_in(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(scope, receive, send, MAX_LOGIN_BODY_BYTES, "Sign-in form")
        if body is None:
            return
        if self.access.mode != "password":  # Gradio only redirects to the page
            await self.app(scope, _replay(body, receive), send)
            return
        name, address = await _login_name(scope, body), (scope.get("client") or ("unknown",))[0]
        refusal = self.throttle.refusal(name, address)
        if refusal is not None:
            message, wait_s = refusal
            await _refuse(send, 429, message, [(b"retry-after", str(wait_s).encode())])
            return
        status = None

        async def watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, _replay(body, receive), watching)
        except SignInBusy as busy:
            if status is not None:
                raise
            await _refuse(send, 503, str(busy), [(b"retry-after", b"1")])
            return
        if status in (200, 400):  # Gradio's answers: signed in, wrong name or password
            self.throttle.record(name, address, succeeded=status == 200)


# --- what an event may carry -------------------------------------------------------------------------


def event_problem(body: bytes) -> str | None:
    """Why an event's JSON body is refused (too many editor layers or files), or None. A body that
    is not JSON goes on to Gradio, which refuses it without decoding anything."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    files, layers = 0, 0
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if isinstance(value.get("layers"), list) and ("background" in value or "composite" in value):
                layers = max(layers, len(value["layers"]))
            meta = value.get("meta")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                files += 1
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    if layers > MAX_EDITOR_LAYERS:
        return f"Image editor: at most {MAX_EDITOR_LAYERS} layers; got {layers}."
    if files > MAX_FILES_PER_EVENT:
        return f"Files in one request: at most {MAX_FILES_PER_EVENT}; got {files}."
    return None


class UploadMeter:
    """Counts an upload's bytes and multipart parts as they stream, for `Gate._upload`."""

    def __init__(self, boundary: bytes | None):
        self.delimiter = b"\r\n--" + boundary if boundary else None
        self.tail = b"\r\n"  # the body's first delimiter needs no line break before it
        self.delimiters = self.size = 0
        self.refusal: str | None = None
        self.ended = False

    def admit(self, chunk: bytes) -> bool:
        """Whether `chunk` goes on; False (and `refusal` says why) past a limit."""
        self.size += len(chunk)
        if self.size > MAX_UPLOAD_REQUEST_BYTES:
            self.refusal = _too_many_bytes("Upload", MAX_UPLOAD_REQUEST_BYTES)
            return False
        if self.delimiter is not None:
            scan = self.tail + chunk  # a delimiter split between chunks is counted once, whole
            self.delimiters += scan.count(self.delimiter)
            self.tail = scan[-(len(self.delimiter) - 1):]
            if self.delimiters > MAX_FILES_PER_UPLOAD + 1:  # a delimiter before each part, one after the last
                self.refusal = f"Upload: at most {MAX_FILES_PER_UPLOAD} files a request; got more."
                return False
        return True

    def ending(self) -> bytes:
        """What ends the multipart body here: the parts so far are all Gradio keeps."""
        return self.delimiter + b"--\r\n" if self.delimiter is not None else b""


# --- sign-in throttling ------------------------------------------------------------------------------


@dataclass
class _Lockout:
    failures: int = 0
    locked_until: float = 0.0
    lock_s: float = 0.0


class LoginThrottle:
    """Sign-in attempts per address and wrong passwords per (name, address); see the constants.
    Used on the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._attempts: OrderedDict[str, deque] = OrderedDict()  # address -> times of recent attempts
        self._lockouts: OrderedDict[tuple[str, str], _Lockout] = OrderedDict()

    def refusal(self, name: str, address: str) -> tuple[str, int] | None:
        """(message, seconds to wait) when this attempt is refused; else None, and it is counted."""
        now = self.clock()
        attempts = _remembered(self._attempts, address, deque)
        while attempts and attempts[0] <= now - MINUTE_S:
            attempts.popleft()
        if len(attempts) >= LOGINS_PER_ADDRESS_PER_MINUTE:
            wait = _seconds(attempts[0] + MINUTE_S - now)
            message = (f"Sign-in: at most {LOGINS_PER_ADDRESS_PER_MINUTE} attempts a minute from one address; "
                       f"try again in {wait} s.")
            return message, wait
        lockout = self._lockouts.get((name, address))
        if lockout is not None and lockout.locked_until > now:
            wait = _seconds(lockout.locked_until - now)
            message = (f"Sign-in: {lockout.failures} wrong passwords for this name from your address; "
                       f"try again in {wait} s.")
            return message, wait
        attempts.append(now)
        return None

    def record(self, name: str, address: str, *, succeeded: bool) -> None:
        if succeeded:
            self._lockouts.pop((name, address), None)
            return
        lockout = _remembered(self._lockouts, (name, address), _Lockout)
        lockout.failures += 1
        if lockout.failures >= FAILURES_BEFORE_LOCKOUT:
            lockout.lock_s = min(MAX_LOCKOUT_S, 2 * lockout.lock_s or FIRST_LOCKOUT_S)
            lockout.locked_until = self.clock() + lockout.lock_s


def _remembered(table: OrderedDict, key: Any, make: Callable[[], Any]) -> Any:
    """table[key] (made when new), now the most recently used; the least recently used forgotten past THROTTLE_MEMORY."""
    value = table.pop(key, None)
    table[key] = value if value is not None else make()
    while len(table) > THROTTLE_MEMORY:
        table.popitem(last=False)
    return table[key]


def _seconds(duration: float) -> int:
    return max(1, int(duration + 0.999))


async def _login_name(scope: Scope, body: bytes) -> str:
    """The name a sign-in form gives (stripped, as Gradio takes it); "" when it gives none."""
    headers = Headers(scope=scope)
    content_type, _ = parse_options_header(headers.get("content-type", ""))

    async def stream():
        yield body
        yield b""

    try:
        if content_type == b"multipart/form-data":
            form = await MultiPartParser(headers, stream(), max_files=0, max_fields=8).parse()
        elif content_type == b"application/x-www-form-urlencoded":
            form = await FormParser(headers, stream()).parse()
        else:
            return ""
    except (MultiPartException, MultipartParseError, ValueError):  # Gradio refuses it; the address counts it
        return ""
    name = form.get("username")
    return name.strip() if isinstance(name, str) else ""


# --- plumbing ---------------------------------------------------------------------------------------


def _gated(method: str, path: str) -> bool:
    if path.startswith("/studio/"):
        return True
    if method not in READS:
        return path not in SIGN_IN_ROUTES
    return method != "OPTIONS" and path.startswith(GATED_READS)


def _served_file(path: str) -> str | None:
    """The file a file route names (Starlette has decoded the path already); None for other routes."""
    for prefix in FILE_ROUTES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return None


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _content_length(scope: Scope) -> int | None:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None


def _multipart_boundary(scope: Scope) -> bytes | None:
    content_type, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
    boundary = options.get(b"boundary") if content_type == b"multipart/form-data" else None
    return boundary or None


def _too_many_bytes(what: str, most: int, got: int | None = None) -> str:
    return f"{what}: at most {most:,} bytes; got {f'{got:,}' if got is not None else 'more'}."


async def _read_body(scope: Scope, receive: Receive, send: Send, most: int, what: str) -> bytes | None:
    """The whole body, at most `most` bytes (Content-Length first, then counted as it comes); None
    when refused with 413 (or the client left)."""
    length = _content_length(scope)
    if length is not None and length > most:
        await _refuse(send, 413, _too_many_bytes(what, most, length))
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > most:
            await _refuse(send, 413, _too_many_bytes(what, most))
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` giving `body` first, as one message, then whatever the client sends next (its leaving)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def _giving_visitor_cookie(scope: Scope, send: Send, cookie: str) -> Send:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    header = (f"{VISITOR_COOKIE}={cookie}; Path=/; Max-Age={VISITOR_COOKIE_MAX_AGE_S}; HttpOnly; "
              f"SameSite=Lax{secure}").encode()

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", header)]}
        await send(message)

    return sending


async def _refuse(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
