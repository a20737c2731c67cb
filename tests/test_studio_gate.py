"""The gate in front of every Gradio route (studio/gate.py): sign-in before any body is read, the
payload limits, sign-in throttling and password checks off the event loop, and visitors told
apart by a cookie the studio signs. Most tests launch the real studio app in this process (no
subprocess, `demo.launch(prevent_thread_lock=True)` with `launch_options` as `python -m studio`
passes them) and drive it with Starlette's TestClient; a few call the gate with a stand-in for
Gradio that records whether the body was read; the last runs `python -m studio`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gradio.oauth
import httpx
import itsdangerous
import pytest
from gradio_client import Client
from starlette.testclient import TestClient

from serving.processes import find_free_port
from bench.load.hostile import Strangers
from studio import gate
from studio.access import (
    VISITOR_COOKIE,
    Access,
    AllowList,
    PasswordChecks,
    SignInBusy,
    Users,
    hash_password,
    new_visitor_cookie,
)
from studio.app import build_app
from studio.client import StudioClient
from studio.errors import StudioError
from studio.gate import (
    FAILURES_BEFORE_LOCKOUT,
    FIRST_LOCKOUT_S,
    LOGINS_PER_ADDRESS_PER_MINUTE,
    MAX_EDITOR_LAYERS,
    MAX_FILES_PER_UPLOAD,
    MAX_LOCKOUT_S,
    Gate,
    LoginThrottle,
    launch_options,
)
from studio.process import StudioProcess
from studio.session import MAX_UPLOAD_BYTES
from studio.store import ResultStore
from tests.samples import Clock

PASSWORD = "correct horse battery"
OAUTH_SECRET = "space-oauth-secret"
# What a Space sets with `hf_oauth: true` (and SYSTEM=spaces), as gradio.oauth reads it at import.
SPACE_OAUTH = {"OAUTH_CLIENT_ID": "client-id", "OAUTH_CLIENT_SECRET": OAUTH_SECRET, "OAUTH_SCOPES": "openid profile",
               "OPENID_PROVIDER_URL": "https://127.0.0.1:9"}
PNG = (Path(__file__).resolve().parents[1] / "assets" / "sample.png").read_bytes()


class Recorder:
    """Outermost ASGI wrapper: how many body messages the app took from the client."""

    def __init__(self, app):
        self.app, self.body_messages = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.body_messages += message["type"] == "http.request"
            return message

        await self.app(scope, counted, send)


@contextlib.contextmanager
def launched(tmp_path: Path, access: Access, clock: Clock | None = None) -> Iterator[object]:
    """The studio's Gradio app as `python -m studio` launches it (in this process, a free port)."""
    demo = build_app(lambda: StudioClient.for_local("http://127.0.0.1:9"), store=ResultStore(tmp_path / "results"),
                     access=access)
    demo.queue().launch(server_name="127.0.0.1", server_port=find_free_port(), prevent_thread_lock=True, quiet=True,
                        max_file_size=MAX_UPLOAD_BYTES, **launch_options(access, clock=clock or Clock()))
    try:
        yield demo
    finally:
        demo.close()


def upload(client, name: str = "a.png", **kwargs) -> httpx.Response:
    return client.post("/gradio_api/upload", files=[("files", (name, PNG, "image/png"))], **kwargs)


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "layer.png"}


def erase_join(path: str, layers: int) -> dict:
    """A queue join of an Erase run whose editor value names `path` as background and `layers` layers."""
    layer = file_data(path)
    return {"data": [[], {"background": layer, "layers": [layer] * layers, "composite": layer}, "a prompt"],
            "fn_index": 3, "session_hash": "abc123", "event_data": None, "trigger_id": None}


# --- Hugging Face sign-in: nothing is read from anyone not signed in ------------------------------------


def session_cookie(user: str, orgs: tuple[str, ...] = ()) -> str:
    """The cookie Gradio's SessionMiddleware reads after a real Hugging Face sign-in (gradio/oauth.py)."""
    info = {"oauth_info": {"userinfo": {"preferred_username": user, "orgs": [{"preferred_username": org} for org in orgs]},
                           "expires_at": time.time() + 600}}
    signer = itsdangerous.TimestampSigner(hashlib.sha256(f"{OAUTH_SECRET}-v4".encode()).hexdigest())
    return "session=" + signer.sign(base64.b64encode(json.dumps(info).encode())).decode()


@pytest.fixture(scope="module")
def hugging_face_studio(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradio.oauth, "get_space", lambda: "team/sd-studio")  # Gradio's real OAuth routes
        for name, value in SPACE_OAUTH.items():
            patch.setattr(gradio.oauth, name, value)
        access = Access("huggingface", allow=AllowList.parse("alice,org:acme"))
        with launched(tmp_path_factory.mktemp("hf"), access) as demo:
            yield demo


def test_unsigned_upload_queue_join_and_file_fetch_are_refused_before_the_body_is_read(hugging_face_studio):
    """With Hugging Face sign-in Gradio itself has no `auth`: before the gate these answered 200."""
    recorder = Recorder(hugging_face_studio.server_app)
    client = TestClient(recorder, base_url="https://testserver")  # the session cookie is Secure
    alice = {"cookie": session_cookie("alice")}
    stored = upload(client, headers=alice)
    assert stored.status_code == 200
    path = stored.json()[0]

    recorder.body_messages = 0
    refused = [upload(client), client.post("/gradio_api/queue/join", json=erase_join(path, 1)),
               client.post("/gradio_api/call/generate", json={"data": ["a house"]})]
    assert [answer.status_code for answer in refused] == [401, 401, 401]
    assert "Sign in with Hugging Face" in refused[0].json()["detail"]
    assert recorder.body_messages == 0, "the gate read a body it refuses"
    assert client.get(f"/gradio_api/file={path}").status_code == 401
    assert client.get(f"/gradio_api/file={path}", headers=alice).status_code == 200
    # The page and its config stay open, so that a visitor can sign in.
    assert client.get("/").status_code == 200 and client.get("/config").status_code == 200


def test_only_the_allowed_hugging_face_accounts_get_in(hugging_face_studio):
    client = TestClient(hugging_face_studio.server_app, base_url="https://testserver")
    bob = upload(client, headers={"cookie": session_cookie("bob")})
    assert bob.status_code == 403 and "bob may not use this studio" in bob.json()["detail"]
    assert upload(client, headers={"cookie": session_cookie("carol", orgs=("acme",))}).status_code == 200


# --- payload limits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_studio(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_SHARE", "true")  # would publish the studio on a gradio.live link
        with launched(tmp_path_factory.mktemp("local"), Access("local")) as demo:
            yield demo


def test_the_studio_is_never_shared_and_never_shows_unexpected_errors(local_studio):
    assert local_studio.share is False and local_studio.show_error is False
    assert launch_options(Access("local"))["share"] is False


def test_an_editor_value_of_64_layers_is_refused_before_any_layer_is_decoded(local_studio):
    client = TestClient(local_studio.server_app)
    path = upload(client).json()[0]
    refused = client.post("/gradio_api/queue/join", json=erase_join(path, 64))
    assert refused.status_code == 413
    assert refused.json()["detail"] == f"Image editor: at most {MAX_EDITOR_LAYERS} layers; got 64."
    assert client.post("/gradio_api/queue/join", json=erase_join(path, 1)).status_code == 200


def test_uploads_are_refused_past_their_files_and_bytes(local_studio):
    recorder = Recorder(local_studio.server_app)
    client = TestClient(recorder)
    files = [("files", (f"{index}.png", PNG, "image/png")) for index in range(MAX_FILES_PER_UPLOAD + 1)]
    many = client.post("/gradio_api/upload", files=files)
    assert many.status_code == 413 and many.json()["detail"] == (
        f"Upload: at most {MAX_FILES_PER_UPLOAD} files a request; got more.")
    assert client.post("/gradio_api/upload", files=files[:MAX_FILES_PER_UPLOAD]).status_code == 200
    recorder.body_messages = 0
    huge = client.post("/gradio_api/upload", content=b"", headers={
        "content-type": "multipart/form-data; boundary=x", "content-length": str(gate.MAX_UPLOAD_REQUEST_BYTES + 1)})
    assert huge.status_code == 413 and "Upload: at most" in huge.json()["detail"]
    assert recorder.body_messages == 0


def test_event_bodies_are_refused_past_their_size_before_they_are_read(local_studio):
    recorder = Recorder(local_studio.server_app)
    client = TestClient(recorder)
    answer = client.post("/gradio_api/queue/join", content=b"{}", headers={
        "content-type": "application/json", "content-length": str(gate.MAX_EVENT_BODY_BYTES + 1)})
    assert answer.status_code == 413 and answer.json()["detail"] == (
        f"Request body: at most {gate.MAX_EVENT_BODY_BYTES:,} bytes; got {gate.MAX_EVENT_BODY_BYTES + 1:,}.")
    assert recorder.body_messages == 0


class Downstream:
    """Gradio's stand-in behind the gate: reads the whole body, answers 200."""

    def __init__(self):
        self.called, self.body = False, b""

    async def __call__(self, scope, receive, send):
        self.called = True
        more = True
        while more:
            message = await receive()
            self.body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call_gate(gate_app, path: str, chunks: list[bytes], headers: dict[str, str], client=("203.0.113.1", 1),
              method: str = "POST"):
    """(status, body) of one request through the gate, its body sent in `chunks`."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "scheme": "http",
             "client": client, "headers": [(name.encode(), value.encode()) for name, value in headers.items()]}
    messages = [{"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
                for index, chunk in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(gate_app(scope, receive, send))
    return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])


def test_a_checked_event_reaches_gradio_unchanged_and_a_refused_one_never_does():
    downstream = Downstream()
    guarded = Gate(downstream, access=Access("local"))
    body = json.dumps(erase_join("/tmp/layer.png", 2)).encode()
    assert call_gate(guarded, "/gradio_api/queue/join", [body[:100], body[100:]], {})[0] == 200
    assert downstream.body == body
    downstream = Downstream()
    status, answer = call_gate(Gate(downstream, access=Access("local")), "/gradio_api/queue/join",
                               [json.dumps(erase_join("/tmp/layer.png", 64)).encode()], {})
    assert status == 413 and b"at most 4 layers; got 64" in answer and not downstream.called


def test_a_chunked_upload_is_cut_at_its_byte_limit(monkeypatch):
    monkeypatch.setattr(gate, "MAX_UPLOAD_REQUEST_BYTES", 1000)
    downstream = Downstream()
    status, answer = call_gate(Gate(downstream, access=Access("local")), "/gradio_api/upload", [b"x" * 400] * 5,
                               {"content-type": "multipart/form-data; boundary=b0und"})
    assert status == 413 and b"Upload: at most 1,000 bytes; got more." in answer
    assert downstream.body == b"x" * 800 + b"\r\n--b0und--\r\n"  # Gradio was handed the multipart's end


def test_a_result_file_of_another_designer_is_answered_as_missing():
    public = Access("public")
    cookie = new_visitor_cookie(public.visitor_key)
    asked = []

    def owns_file(path: str, designer: str) -> bool | None:
        asked.append((path, designer))
        return {"/cache/mine.png": True, "/cache/theirs.png": False}.get(path)

    visitor = {"cookie": f"{VISITOR_COOKIE}={cookie}"}
    for path, status in (("/cache/mine.png", 200), ("/cache/theirs.png", 404), ("/tmp/gradio/upload.png", 200)):
        downstream = Downstream()
        answer = call_gate(Gate(downstream, access=public, owns_file=owns_file), f"/gradio_api/file={path}", [b""],
                           visitor, method="GET")
        assert answer[0] == status and downstream.called == (status == 200)
    assert {designer for _, designer in asked} == {f"visitor:{cookie.split('.')[0]}"}


# --- password sign-in -----------------------------------------------------------------------------------


class DesignerUsers(Users):
    """alice's password, checked for real (few rounds); the name "slow" blocks until released."""

    def __init__(self):
        super().__init__({"alice": hash_password(PASSWORD, rounds=1000)})
        self.checks, self.entered, self.release, self.finished = 0, threading.Event(), threading.Event(), threading.Event()

    def check(self, name: str, password: str) -> bool:
        self.checks += 1
        if name == "slow":
            self.entered.set()
            self.release.wait(60)
            self.finished.set()
        return super().check(name, password)


@pytest.fixture(scope="module")
def password_studio(tmp_path_factory):
    users, clock = DesignerUsers(), Clock()
    with launched(tmp_path_factory.mktemp("password"), Access("password", users), clock) as demo:
        yield demo, users, clock


def sign_in(client, name: str, password: str, *, as_page: bool = True) -> httpx.Response:
    """POST /login as the sign-in page does (a multipart form), or as gradio_client does (urlencoded)."""
    if as_page:
        return client.post("/login", files={"username": (None, name), "password": (None, password)})
    return client.post("/login", data={"username": name, "password": password})


def test_a_password_check_does_not_block_other_requests(password_studio):
    """Gradio called the users file's check on its event loop: ~8 sign-ins a second stalled every page."""
    demo, users, _ = password_studio
    url = demo.local_url
    answers = []
    slow = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}login", timeout=120,
                                                                     data={"username": "slow", "password": "x"})))
    slow.start()
    try:
        assert users.entered.wait(60)
        assert httpx.get(f"{url}config", timeout=60).status_code in (200, 401)  # answered while the check runs
        assert not users.finished.is_set(), "the page waited for the password check"
    finally:
        users.release.set()
        slow.join(120)
    assert answers[0].status_code == 400


def test_thirty_wrong_passwords_for_one_name_are_throttled_for_that_address_only(password_studio):
    demo, users, clock = password_studio
    guesser = TestClient(demo.server_app, client=("203.0.113.7", 1))
    checks = users.checks
    answers = [sign_in(guesser, "alice", f"guess {index}").status_code for index in range(30)]
    assert answers == [400] * FAILURES_BEFORE_LOCKOUT + [429] * (30 - FAILURES_BEFORE_LOCKOUT)
    assert users.checks - checks == FAILURES_BEFORE_LOCKOUT  # the rest cost no password check
    locked = sign_in(guesser, "alice", PASSWORD)
    assert locked.status_code == 429 and "wrong passwords for this name" in locked.json()["detail"]
    assert locked.headers["retry-after"] == str(FIRST_LOCKOUT_S)
    designer = TestClient(demo.server_app, client=("198.51.100.9", 1))  # alice, elsewhere
    assert sign_in(designer, "alice", PASSWORD).status_code == 200
    clock.now += FIRST_LOCKOUT_S
    assert sign_in(guesser, "alice", PASSWORD).status_code == 200


def test_sign_ins_from_one_address_are_limited_per_minute(password_studio):
    demo, _, clock = password_studio
    client = TestClient(demo.server_app, client=("203.0.113.8", 1))
    answers = [sign_in(client, f"name{index}", "x").status_code for index in range(LOGINS_PER_ADDRESS_PER_MINUTE + 1)]
    assert answers == [400] * LOGINS_PER_ADDRESS_PER_MINUTE + [429]
    clock.now += 60
    assert sign_in(client, "alice", PASSWORD).status_code == 200


def test_signed_out_callers_are_refused_with_a_users_file_and_the_signed_in_get_through(password_studio):
    demo, _, _ = password_studio
    client = TestClient(demo.server_app, client=("203.0.113.9", 1))
    assert upload(client).status_code == 401
    assert sign_in(client, "alice", PASSWORD, as_page=False).status_code == 200  # it keeps Gradio's access token
    assert upload(client).status_code == 200


def test_a_lockout_doubles_with_each_failure_and_is_capped():
    clock = Clock()
    throttle = LoginThrottle(clock)
    locks = []
    for _ in range(FAILURES_BEFORE_LOCKOUT + 6):
        clock.now += MAX_LOCKOUT_S  # past any lockout, and past the address's minute
        assert throttle.refusal("alice", "203.0.113.7") is None
        throttle.record("alice", "203.0.113.7", succeeded=False)
        refusal = throttle.refusal("alice", "203.0.113.7")
        locks.append(refusal and refusal[1])
    assert locks == [None] * (FAILURES_BEFORE_LOCKOUT - 1) + [60, 120, 240, 480, 900, 900, 900]
    throttle.record("alice", "203.0.113.7", succeeded=True)
    assert throttle.refusal("alice", "203.0.113.7") is None


def test_password_checks_past_the_pool_are_refused_at_once():
    release = threading.Event()
    checks = PasswordChecks(lambda name, password: release.wait(60), threads=1, waiting=0)

    async def two_at_once():
        first = asyncio.ensure_future(checks.check("alice", "x"))
        await asyncio.sleep(0)  # the first is in its thread
        with pytest.raises(SignInBusy):
            await checks.check("bob", "y")
        release.set()
        return await first

    assert asyncio.run(two_at_once()) is True


def test_a_busy_sign_in_is_answered_503_and_not_counted_as_a_failure():
    async def busy_gradio(scope, receive, send):
        await receive()
        raise SignInBusy("The studio is checking many sign-ins just now; try again in a moment.")

    guarded = Gate(busy_gradio, access=Access("password", Users({"alice": "pbkdf2_sha256$1$00$00"})))
    form = {"content-type": "application/x-www-form-urlencoded"}
    for _ in range(FAILURES_BEFORE_LOCKOUT + 1):
        status, answer = call_gate(guarded, "/login", [b"username=alice&password=x"], form)
        assert status == 503 and b"many sign-ins" in answer
    assert guarded.throttle.refusal("alice", "203.0.113.1") is None  # not locked out


# --- without a sign-in: visitors --------------------------------------------------------------------------


class FakeRequest:
    def __init__(self, cookies=None, session_hash="abc"):
        self.cookies, self.session_hash, self.username, self.session = cookies or {}, session_hash, None, None


def test_a_session_hash_the_client_chooses_no_longer_names_the_designer_without_login(tmp_path):
    """With --public-without-login a designer was the session_hash the client sent: a new one reset
    every quota, a known one took another's images."""
    public = Access("public")
    with pytest.raises(StudioError, match="cookie"):
        public.designer(FakeRequest(session_hash="someone-elses"))
    cookie = new_visitor_cookie(public.visitor_key)
    mine = public.designer(FakeRequest({VISITOR_COOKIE: cookie}, session_hash="one"))
    assert mine.startswith("visitor:") and public.designer(FakeRequest({VISITOR_COOKIE: cookie}, session_hash="two")) == mine
    forged = cookie.split(".")[0] + ".forged"
    with pytest.raises(StudioError):
        public.designer(FakeRequest({VISITOR_COOKIE: forged}))
    # On 127.0.0.1 a client that keeps no cookies is still its session.
    assert Access("local").designer(FakeRequest(session_hash="abc")) == "session:abc"

    with launched(tmp_path, public) as demo:
        client = TestClient(demo.server_app)
        refused = client.post("/gradio_api/queue/join", json=erase_join("/tmp/x.png", 1))
        assert refused.status_code == 401 and "cookie" in refused.json()["detail"]
        given = refused.headers["set-cookie"]
        assert given.startswith(f"{VISITOR_COOKIE}=") and "HttpOnly" in given and "SameSite=Lax" in given
        assert upload(client).status_code == 200  # the client kept the cookie it was given


# --- the real studio --------------------------------------------------------------------------------------


@pytest.mark.studio
def test_the_studio_refuses_unsigned_uploads_and_jobs_and_serves_the_signed_in(tmp_path):
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"alice:{hash_password(PASSWORD)}\n")
    with StudioProcess("--endpoint-url", f"http://127.0.0.1:{find_free_port()}", "--users-file", str(users_file),
                       "--results-dir", str(tmp_path / "results"), startup_timeout_s=120) as studio:
        assert upload(httpx.Client(base_url=studio.url)).status_code == 401
        join = httpx.post(f"{studio.url}gradio_api/queue/join", json=erase_join("/tmp/x.png", 1))
        assert join.status_code == 401
        alice = Client(studio.url, auth=("alice", PASSWORD), verbose=False)
        # `make load --hostile`'s strangers, a few of each kind: none is let in, alice still is.
        strangers = Strangers(studio.url, designer_names=("alice",), max_requests=12, rate_per_kind=1000)
        strangers.start().wait()
        figures = strangers.figures()
        assert all(sum(answers.values()) == 12 for answers in figures["answers"].values())
        assert figures["let_in"] == {kind: 0 for kind in figures["answers"]}
        assert figures["answers"]["logins"].get("429", 0) >= 2  # 10 a minute from one address
        with pytest.raises(Exception, match="Cannot reach"):  # signed in: it goes as far as the endpoint
            alice.predict(prompt="a house", width=64, height=64, api_name="/generate")
