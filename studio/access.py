"""Who may use the studio, and how much of the endpoint each designer may take.

Sign-in fits where the studio runs:

* on 127.0.0.1 (the default), nobody else can reach it: no sign-in;
* as a server beyond 127.0.0.1, Gradio's own sign-in, with designers from a users file
  (STUDIO_USERS_FILE or --users-file): one `name:pbkdf2_sha256$rounds$salt$hash` line each, made
  with `python -m studio.access add NAME` (the password is asked for, never stored); each password
  is checked in a thread off the event loop (`PasswordChecks`), and studio/gate.py throttles
  sign-ins per address and per name;
* as a Hugging Face Space with `hf_oauth: true` in its README, "Sign in with Hugging Face", only
  where the Space's real OAuth is present (SPACE_OAUTH_VARIABLES; elsewhere Gradio would sign
  everyone in as the machine's own account), for the accounts and organisations of --allow
  (STUDIO_ALLOW), or any account when none is given (said at start-up).

Binding beyond 127.0.0.1 with none of these is refused unless told so (--public-without-login).
Whom a request is from is decided in one place, `Access.designer_of`, which both the gate (for
every route that takes data or serves files) and each event handler (`Access.designer`) ask:
the signed-in name; without a sign-in a visitor cookie the studio signed itself, and on
127.0.0.1 only, the browser session when there is none (never a session id a client chose).
What each designer may send (jobs at once, per minute, work per day) is in studio/quotas.py.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdserve.files import atomic_file

from studio import signing
from studio.errors import StudioError

PBKDF2_ROUNDS = 310_000  # OWASP's figure for PBKDF2-HMAC-SHA256
NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# --- designers from a file ------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None, rounds: int = PBKDF2_ROUNDS) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    return f"pbkdf2_sha256${rounds}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, rounds, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(rounds))
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)


@dataclass
class Users:
    """The designers who may sign in: name -> stored password hash."""

    hashes: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> Users:
        hashes = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, separator, stored = line.partition(":")
            if not separator or not valid_name(name) or not stored.startswith("pbkdf2_sha256$"):
                raise ValueError(f"{path}, line {number}: expected NAME:pbkdf2_sha256$... "
                                 "(made with `python -m studio.access add NAME`)")
            hashes[name] = stored
        if not hashes:
            raise ValueError(f"{path} names no designer; add one with `python -m studio.access add NAME`")
        return cls(hashes)

    def check(self, name: str, password: str) -> bool:
        """Whether `password` is `name`'s: as slow for an unknown name as for a known one (it
        blocks for a PBKDF2; Gradio is given `PasswordChecks(users.check).check`)."""
        stored = self.hashes.get(name) or _unknown_name_hash()
        return password_matches(password, stored) and name in self.hashes


@functools.cache
def _unknown_name_hash() -> str:
    return hash_password(secrets.token_hex(16))


# Password checks running at once. Each is a PBKDF2 of PBKDF2_ROUNDS (~120 ms of one core), run in
# these threads, off the event loop, so that sign-ins never stall pages, streams and API calls;
# two leave the other cores to everything else.
PASSWORD_CHECK_THREADS = 2
# Checks that may wait for a thread; a sign-in past these is refused at once ("busy", not
# counted as a failure) rather than queued: a flood from many addresses costs at most
# PASSWORD_CHECK_THREADS cores, and a designer's sign-in waits behind at most this many checks
# (about half a second).
PASSWORD_CHECKS_WAITING = 8


class SignInBusy(StudioError):
    """More sign-ins are being checked than PasswordChecks takes; the gate answers 503."""


class PasswordChecks:
    """Gradio's `auth` for a users file: `check` is a coroutine function (Gradio awaits it) that
    runs the blocking `check_password(name, password)` in a bounded pool of threads."""

    def __init__(self, check_password: Callable[[str, str], bool], threads: int = PASSWORD_CHECK_THREADS,
                 waiting: int = PASSWORD_CHECKS_WAITING):
        self._check_password = check_password
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="password-check")
        self._most = threads + waiting
        self._in_flight = 0  # running or waiting for a thread; freed when the check ends, not when its caller gives up
        self._lock = threading.Lock()

    async def check(self, name: str, password: str) -> bool:
        with self._lock:
            if self._in_flight >= self._most:
                raise SignInBusy("The studio is checking many sign-ins just now; try again in a moment.")
            self._in_flight += 1
        future = self._pool.submit(self._check_password, name, password)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future: Any) -> None:
        with self._lock:
            self._in_flight -= 1


def valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and set(name) <= NAME_CHARACTERS


# --- who a request is from -------------------------------------------------------------------------

# Without a sign-in, a visitor is this cookie, which the gate sets (signed with the studio's own key,
# HttpOnly, SameSite=Lax): a client cannot pick another visitor's, as it could a session id.
VISITOR_COOKIE = "sd-studio-visitor"
VISITOR_COOKIE_MAX_LENGTH = 128  # ours are 87 characters; longer ones are not read
# A designer named by its browser session: on 127.0.0.1 only, for a client that keeps no cookies.
SESSION_DESIGNER = "session:"
# Hugging Face user and organisation names, as --allow takes them.
HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# The scope under which a Space's sign-in lists the user's organisations (`hf_oauth_scopes` in its README).
HF_ORGANISATIONS_SCOPE = "read-memberships"
# What Gradio needs to run Hugging Face's real sign-in (gradio/oauth.py). Without SYSTEM=spaces it
# mocks the sign-in, signing everyone in as the machine's own Hugging Face account, with a session
# key made from an empty secret when OAUTH_CLIENT_SECRET is missing.
SPACE_OAUTH_VARIABLES = {"SYSTEM": "spaces", "SPACE_ID": None, "OAUTH_CLIENT_ID": None, "OAUTH_CLIENT_SECRET": None,
                         "OAUTH_SCOPES": None, "OPENID_PROVIDER_URL": None}


class NotSignedIn(StudioError):
    """The caller is nobody the studio may serve; the gate answers `status` with the message."""

    status = 401


class NotAllowed(NotSignedIn):
    """Signed in, but not among those the studio serves (--allow)."""

    status = 403


@dataclass(frozen=True)
class Caller:
    """What a request says about who sent it, read from an ASGI scope (the gate) or a gr.Request
    (an event handler), for `Access.designer_of`."""

    username: str | None = None  # password sign-in: the name Gradio's access-token cookie stands for
    session: Mapping | None = None  # Hugging Face sign-in: the signed session cookie's content
    cookies: Mapping[str, str] = field(default_factory=dict)
    session_hash: str | None = None  # the browser session Gradio names; chosen by the client

    @classmethod
    def of_request(cls, request: Any) -> Caller:
        """From a gr.Request: its Starlette request's own cookies and session where it still has one
        (gr.Request hands dicts out converted to objects). A route of the studio's own asks
        studio.gate.scope_designer with its Starlette request's scope instead."""
        raw = getattr(request, "request", None)
        scope = getattr(raw, "scope", None)
        if isinstance(scope, Mapping):
            cookies, session = dict(raw.cookies), scope.get("session")
        else:
            cookies, session = dict(getattr(request, "cookies", None) or {}), getattr(request, "session", None)
        return cls(getattr(request, "username", None), session, cookies, getattr(request, "session_hash", None))


@dataclass(frozen=True)
class AllowList:
    """The Hugging Face accounts that may use the studio: user names and `org:NAME` organisations."""

    users: frozenset[str] = frozenset()
    organisations: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """From `alice,bob,org:acme` (--allow, STUDIO_ALLOW); names compare without case."""
        users, organisations = set(), set()
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, name = item.rpartition(":")
            if kind not in ("", "org") or not HF_NAME.fullmatch(name):
                raise ValueError(f"--allow: {item!r} is neither a Hugging Face user name nor org:NAME")
            (organisations if kind else users).add(name.casefold())
        if not users and not organisations:
            raise ValueError("--allow names nobody; give user names and org:NAME, separated by commas")
        return cls(frozenset(users), frozenset(organisations))

    def admits(self, userinfo: Mapping) -> bool:
        if str(userinfo.get("preferred_username") or "").casefold() in self.users:
            return True
        orgs = userinfo.get("orgs")
        return isinstance(orgs, list) and any(
            isinstance(org, Mapping) and str(org.get("preferred_username") or "").casefold() in self.organisations
            for org in orgs)


def new_visitor_cookie(key: bytes) -> str:
    visitor = secrets.token_urlsafe(16)
    return f"{visitor}.{signing.visitor_mac(key, visitor)}"


def visitor_of(cookie: str | None, key: bytes) -> str | None:
    """The visitor a cookie names, when the studio signed it with `key`; else None."""
    if not cookie or len(cookie) > VISITOR_COOKIE_MAX_LENGTH:
        return None
    visitor, _, mac = cookie.partition(".")
    if not visitor or not hmac.compare_digest(mac.encode(), signing.visitor_mac(key, visitor).encode()):
        return None
    return visitor


def visitor_key_beside(results_dir: Path) -> bytes:
    """The key visitor cookies are signed with, kept beside the results folder like the store's
    signing key, so that visitors stay who they were when the studio restarts."""
    return signing.load_key(signing.key_path(results_dir, "visitor"))


# --- how the studio is reached ---------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    # "local": 127.0.0.1, no sign-in; "public": beyond it with no sign-in (--public-without-login);
    # "password": a users file; "huggingface": a Space's OAuth.
    mode: str
    users: Users | None = None
    allow: AllowList | None = None  # Hugging Face sign-in: who may use the studio (None: any account)
    visitor_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    notice: str | None = None  # said at start-up: who may use the studio, where that is wider than it may seem

    @property
    def signs_in(self) -> bool:
        return self.mode in ("password", "huggingface")

    @property
    def names_visitors(self) -> bool:
        """Whether visitors are told apart by VISITOR_COOKIE (no sign-in)."""
        return not self.signs_in

    def with_visitor_key(self, key: bytes) -> Access:
        return dataclasses.replace(self, visitor_key=key)

    def designer(self, request: Any) -> str:
        """Whom a gr.Request is from (see `designer_of`)."""
        return self.designer_of(Caller.of_request(request))

    def designer_of(self, caller: Caller) -> str:
        """Whom a request is from: the signed-in name (`hf:NAME` for Hugging Face), else the
        visitor its cookie names (`visitor:ID`), else on 127.0.0.1 only its browser session
        (`session:HASH`: clients there may keep no cookies). NotSignedIn (NotAllowed) when the
        studio may not serve it; the gate and every handler ask here."""
        if self.mode == "password":
            if caller.username:
                return str(caller.username)
            raise NotSignedIn("Sign in first.")
        if self.mode == "huggingface":
            return self._hugging_face_designer(caller.session)
        visitor = visitor_of(caller.cookies.get(VISITOR_COOKIE), self.visitor_key)
        if visitor is not None:
            return f"visitor:{visitor}"
        if self.mode == "public":
            raise NotSignedIn("The studio tells its visitors apart by a cookie it sets: open its page first "
                              "(an API client: keep the cookies the studio sends).")
        return f"{SESSION_DESIGNER}{caller.session_hash or 'local'}"

    def _hugging_face_designer(self, session: Mapping | None) -> str:
        info = (session or {}).get("oauth_info") or {}
        expires_at = info.get("expires_at")
        userinfo = info.get("userinfo") or {}
        name = userinfo.get("preferred_username")
        if not name or (expires_at is not None and expires_at < time.time()):
            raise NotSignedIn("Sign in with Hugging Face first (the button at the top of the page).")
        if self.allow is not None and not self.allow.admits(userinfo):
            raise NotAllowed(f"The Hugging Face account {name} may not use this studio; its owner can add it "
                             "to the studio's allow-list.")
        return f"hf:{name}"


def choose_access(host: str, users_file: Path | None, public_without_login: bool,
                  environ: Mapping[str, str] | None = None, allow: str | None = None) -> Access:
    """The sign-in that fits; ValueError when the studio would face others without one, or would
    run Hugging Face sign-in without a Space's real OAuth.

    `allow`: --allow / STUDIO_ALLOW, the Hugging Face users and organisations who may use the
    studio (`alice,bob,org:acme`); only with Hugging Face sign-in."""
    env = os.environ if environ is None else environ
    allow_list = AllowList.parse(allow) if allow and allow.strip() else None
    local = host in LOCAL_HOSTS
    # A Space's OAuth app (hf_oauth: true) sets OAUTH_CLIENT_ID; a Space container beyond
    # 127.0.0.1 with no other sign-in can only mean to use it.
    wants_hugging_face = bool(env.get("OAUTH_CLIENT_ID")) or bool(
        env.get("SPACE_ID") and not local and not public_without_login)
    if users_file is not None:
        access = Access("password", Users.load(users_file))
    elif wants_hugging_face:
        return _hugging_face_access(env, allow_list)
    elif local:
        access = Access("local")
    elif public_without_login:
        access = Access("public", notice=(
            f"--public-without-login: anyone who reaches {host} may use the studio and its endpoint, "
            "within the quotas of a visitor (a cookie; a new one is a new visitor)."))
    else:
        raise ValueError(
            f"--host {host} lets others reach the studio, and it has no sign-in: give --users-file "
            "(STUDIO_USERS_FILE; `python -m studio.access add NAME` makes one), run it as a Hugging Face "
            "Space with `hf_oauth: true`, or say --public-without-login to serve anyone who finds it"
        )
    if allow_list is not None:
        raise ValueError("--allow (STUDIO_ALLOW) names Hugging Face accounts: it applies only to Hugging Face "
                         "sign-in, on a Space with `hf_oauth: true`")
    return access


def _hugging_face_access(env: Mapping[str, str], allow: AllowList | None) -> Access:
    missing = [name if value is None else f"{name}={value}" for name, value in SPACE_OAUTH_VARIABLES.items()
               if not env.get(name) or (value is not None and env.get(name) != value)]
    if missing:
        raise ValueError(
            f"Hugging Face sign-in needs a Space's real OAuth, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing: elsewhere Gradio signs everyone in as this "
            "machine's own Hugging Face account. Run the studio as a Space with `hf_oauth: true` in its README, "
            "or give it --users-file"
        )
    notice = None
    if allow is None:
        notice = ("Any Hugging Face account may use this studio: give --allow (STUDIO_ALLOW), e.g. "
                  "alice,bob,org:acme, to name who may.")
    elif allow.organisations and HF_ORGANISATIONS_SCOPE not in env.get("OAUTH_SCOPES", "").split():
        notice = (f"--allow names organisations, which the Space's sign-in lists only with the "
                  f"{HF_ORGANISATIONS_SCOPE} scope (hf_oauth_scopes in its README); without it only the "
                  "user names of --allow get in.")
    return Access("huggingface", allow=allow, notice=notice)


# --- python -m studio.access add NAME ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.access", description="Manage the studio's users file.")
    parser.add_argument("command", choices=["add"])
    parser.add_argument("name")
    parser.add_argument("--users-file", type=Path,
                        default=Path(os.environ.get("STUDIO_USERS_FILE") or "studio-users.txt"))
    args = parser.parse_args(argv)
    if not valid_name(args.name):
        parser.error("a name is 1 to 64 letters, digits or . _ - @")
    password = os.environ.get("STUDIO_NEW_PASSWORD") or getpass.getpass(f"Password for {args.name}: ")
    if len(password) < 12:
        parser.error("a password has at least 12 characters")
    lines = args.users_file.read_text().splitlines() if args.users_file.is_file() else []
    lines = [line for line in lines if line.partition(":")[0] != args.name]
    lines.append(f"{args.name}:{hash_password(password)}")
    with atomic_file(args.users_file, mode=0o600) as staging:
        staging.write_text("\n".join(lines) + "\n")
    print(f"{args.name} can sign in (users file {args.users_file})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
