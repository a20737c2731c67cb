"""Sign-in (studio/access.py) and quotas (studio/quotas.py, more in test_studio_quotas), and `python -m studio` refusing to face others without
a sign-in; the last tests run the real studio (Gradio) and reach it with gradio_client."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from serving.processes import find_free_port
from studio.access import (
    Access,
    AllowList,
    NotAllowed,
    NotSignedIn,
    Users,
    choose_access,
    hash_password,
    password_matches,
)
from studio.client import StudioError
from studio.process import StudioProcess
from studio.quotas import QuotaBook, Quotas
from tests.samples import Clock

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


def test_passwords_are_stored_as_salted_pbkdf2_and_checked():
    stored = hash_password(PASSWORD, rounds=1000)
    assert stored.startswith("pbkdf2_sha256$1000$") and PASSWORD not in stored
    assert hash_password(PASSWORD, rounds=1000) != stored  # a new salt each time
    assert password_matches(PASSWORD, stored) and not password_matches("wrong", stored)
    assert not password_matches(PASSWORD, "plain:text") and not password_matches(PASSWORD, "pbkdf2_sha256$x$y$z")


def test_a_users_file_is_read_and_refused_when_malformed(tmp_path):
    good = tmp_path / "users.txt"
    good.write_text(f"# designers\nalice:{hash_password(PASSWORD, rounds=1000)}\n")
    users = Users.load(good)
    assert users.check("alice", PASSWORD) and not users.check("alice", "nope") and not users.check("bob", PASSWORD)
    for text in ("alice:secret\n", "al ice:pbkdf2_sha256$1$00$00\n", "# nobody\n"):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ValueError, match="studio.access add"):
            Users.load(bad)


@pytest.mark.process
def test_the_add_command_writes_a_private_users_file(tmp_path):
    users_file = tmp_path / "users.txt"
    env = {**os.environ, "STUDIO_NEW_PASSWORD": PASSWORD}
    for _ in range(2):  # adding the same name again replaces its line
        done = subprocess.run([sys.executable, "-m", "studio.access", "add", "alice", "--users-file", str(users_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert len(users_file.read_text().splitlines()) == 1 and Users.load(users_file).check("alice", PASSWORD)
    short = subprocess.run([sys.executable, "-m", "studio.access", "add", "bob", "--users-file", str(users_file)],
                           cwd=ROOT, env={**env, "STUDIO_NEW_PASSWORD": "short"}, capture_output=True, text=True)
    assert short.returncode == 2 and "at least 12 characters" in short.stderr


def test_jobs_per_minute_and_work_per_day_are_counted_per_designer():
    clock = Clock()
    book = QuotaBook(Quotas(jobs_per_minute=2, work_per_day=5), clock=clock)
    book.charge("alice", 1)
    book.charge("alice", 1)
    with pytest.raises(StudioError, match="2 jobs in the last minute.*go on in 60 s"):
        book.charge("alice", 1)
    book.charge("bob", 4)  # someone else's quota is their own
    clock.now += 61
    book.charge("alice", 3)  # a minute later: 5 units of work today
    clock.now += 61
    with pytest.raises(StudioError, match="This job is 1 unit of work .*you have 0 units of work left of the 5 "):
        book.charge("alice", 1)
    clock.now += 86_400
    book.charge("alice", 4)  # a day later


# What a Space with `hf_oauth: true` runs with: Gradio runs Hugging Face's real sign-in only here.
SPACE = {"SYSTEM": "spaces", "SPACE_ID": "team/sd-studio", "OAUTH_CLIENT_ID": "x", "OAUTH_CLIENT_SECRET": "y",
         "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": "https://huggingface.co"}


def test_the_sign_in_fits_where_the_studio_runs(tmp_path):
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"alice:{hash_password(PASSWORD, rounds=1000)}\n")
    assert choose_access("127.0.0.1", None, False, environ={}).mode == "local"
    with pytest.raises(ValueError, match="--users-file.*hf_oauth.*--public-without-login"):
        choose_access("0.0.0.0", None, False, environ={})
    public = choose_access("0.0.0.0", None, True, environ={})
    assert public.mode == "public" and "anyone who reaches 0.0.0.0" in public.notice
    assert choose_access("0.0.0.0", users_file, False, environ={}).mode == "password"
    assert choose_access("0.0.0.0", None, False, environ=SPACE).mode == "huggingface"


def test_hugging_face_sign_in_needs_the_space_s_real_oauth():
    """Elsewhere Gradio mocks the sign-in: everyone is the machine's own Hugging Face account."""
    for partial in ({"SPACE_ID": "team/sd-studio", "OAUTH_CLIENT_ID": "x"}, {**SPACE, "SYSTEM": "local"},
                    {key: value for key, value in SPACE.items() if key != "OAUTH_CLIENT_SECRET"}):
        with pytest.raises(ValueError, match="real OAuth.*missing.*machine's own Hugging Face account"):
            choose_access("0.0.0.0", None, False, environ=partial)
    with pytest.raises(ValueError, match="OAUTH_CLIENT_SECRET, OAUTH_SCOPES, OPENID_PROVIDER_URL are missing"):
        choose_access("0.0.0.0", None, False, environ={"SYSTEM": "spaces", "SPACE_ID": "s", "OAUTH_CLIENT_ID": "x"})


def test_an_allow_list_names_hugging_face_users_and_organisations():
    anyone = choose_access("0.0.0.0", None, False, environ=SPACE)
    assert anyone.allow is None and "Any Hugging Face account may use this studio" in anyone.notice
    named = choose_access("0.0.0.0", None, False, environ=SPACE, allow="Alice, bob")
    assert named.notice is None and named.allow == AllowList(frozenset({"alice", "bob"}))
    organisation = choose_access("0.0.0.0", None, False, environ=SPACE, allow="org:acme")
    assert "read-memberships" in organisation.notice
    assert choose_access("0.0.0.0", None, False, environ={**SPACE, "OAUTH_SCOPES": "openid profile read-memberships"},
                         allow="org:acme").notice is None
    for bad in ("al ice", "team:acme", " , "):
        with pytest.raises(ValueError, match="--allow"):
            AllowList.parse(bad)
    with pytest.raises(ValueError, match="only to Hugging Face sign-in"):
        choose_access("127.0.0.1", None, False, environ={}, allow="alice")


class FakeRequest:
    def __init__(self, username=None, session=None, session_hash="abc"):
        self.username, self.session, self.session_hash = username, session, session_hash


def signed_in(name: str, *, orgs=(), expires_in: float = 60) -> dict:
    """A session as Gradio's Hugging Face sign-in leaves it."""
    userinfo = {"preferred_username": name, "orgs": [{"preferred_username": org} for org in orgs]}
    return {"oauth_info": {"userinfo": userinfo, "expires_at": time.time() + expires_in}}


def test_whom_a_request_is_from():
    assert Access("local").designer(FakeRequest()) == "session:abc"
    assert Access("password").designer(FakeRequest(username="alice")) == "alice"
    with pytest.raises(NotSignedIn, match="Sign in first"):
        Access("password").designer(FakeRequest())
    hf = Access("huggingface")
    assert hf.designer(FakeRequest(session=signed_in("alice"))) == "hf:alice"
    for session in ({}, signed_in("alice", expires_in=-1), None):
        with pytest.raises(NotSignedIn, match="Sign in with Hugging Face"):
            hf.designer(FakeRequest(session=session))


def test_a_hugging_face_account_outside_the_allow_list_is_refused_by_name():
    hf = Access("huggingface", allow=AllowList.parse("alice,org:acme"))
    assert hf.designer(FakeRequest(session=signed_in("ALICE"))) == "hf:ALICE"
    assert hf.designer(FakeRequest(session=signed_in("carol", orgs=("acme",)))) == "hf:carol"
    with pytest.raises(NotAllowed, match="account bob may not use this studio") as refused:
        hf.designer(FakeRequest(session=signed_in("bob", orgs=("other",))))
    assert refused.value.status == 403


@pytest.mark.studio
def test_the_studio_refuses_to_face_others_without_a_sign_in():
    env = {key: value for key, value in os.environ.items() if key not in ("SPACE_ID", "OAUTH_CLIENT_ID")}
    done = subprocess.run([sys.executable, "-m", "studio", "--host", "0.0.0.0", "--endpoint-url", "http://127.0.0.1:9"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--public-without-login" in done.stderr and "Traceback" not in done.stderr


@contextlib.contextmanager
def studio_with_users(tmp_path: Path, *extra: str):
    """`python -m studio` with a users file on 127.0.0.1, in front of an endpoint nobody serves."""
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"alice:{hash_password(PASSWORD)}\n")
    with StudioProcess("--endpoint-url", f"http://127.0.0.1:{find_free_port()}", "--users-file", str(users_file),
                       "--results-dir", str(tmp_path / "results"), *extra, startup_timeout_s=120) as studio:
        yield studio.url


@pytest.mark.studio
def test_nothing_answers_without_signing_in_and_quotas_hold_for_the_signed_in(tmp_path):
    with studio_with_users(tmp_path, "--jobs-per-minute", "1") as url:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(prompt="a house", api_name="/generate")
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong password"), verbose=False)
        alice = Client(url, auth=("alice", PASSWORD), verbose=False)
        with pytest.raises(Exception, match="Cannot reach"):  # signed in: it goes as far as the endpoint
            alice.predict(prompt="a house", width=64, height=64, api_name="/generate")
        with pytest.raises(Exception, match="1 jobs in the last minute"):
            alice.predict(prompt="a house", width=64, height=64, api_name="/generate")
