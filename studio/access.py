"""Who may use the studio, and how much of the endpoint each designer may take.

Sign-in fits where the studio runs:

* on 127.0.0.1 (the default), nobody else can reach it: no sign-in;
* as a server beyond 127.0.0.1, Gradio's own sign-in, with designers from a users file
  (STUDIO_USERS_FILE or --users-file): one `name:pbkdf2_sha256$rounds$salt$hash` line each, made
  with `python -m studio.access add NAME` (the password is asked for, never stored);
* as a Hugging Face Space with `hf_oauth: true` in its README, "Sign in with Hugging Face"
  (the Space sets OAUTH_CLIENT_ID; every event checks the signed-in profile, the named API too).

Binding beyond 127.0.0.1 with none of these is refused unless told so (--public-without-login).
Quotas count per designer (the signed-in name, else the browser session): jobs per minute and
images per day, each refused with a message saying when the designer may go on.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import hashlib
import hmac
import os
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sdserve.files import atomic_file

from studio.errors import StudioError

PBKDF2_ROUNDS = 310_000  # OWASP's figure for PBKDF2-HMAC-SHA256
NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DAY_S, MINUTE_S = 86_400, 60


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
        """Gradio's `auth` callable: as slow for an unknown name as for a known one."""
        stored = self.hashes.get(name) or _unknown_name_hash()
        return password_matches(password, stored) and name in self.hashes


@functools.cache
def _unknown_name_hash() -> str:
    return hash_password(secrets.token_hex(16))


def valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and set(name) <= NAME_CHARACTERS


# --- how much each designer may send -------------------------------------------------------------


@dataclass(frozen=True)
class Quotas:
    jobs_per_minute: int = 10
    images_per_day: int = 500

    @classmethod
    def from_env(cls) -> Quotas:
        env = os.environ
        return cls(int(env.get("STUDIO_JOBS_PER_MINUTE", cls.jobs_per_minute)),
                   int(env.get("STUDIO_IMAGES_PER_DAY", cls.images_per_day)))


@dataclass
class QuotaBook:
    """What each designer has sent lately; `charge` refuses a job over a quota before it is sent."""

    quotas: Quotas
    clock: object = time.monotonic
    _jobs: dict[str, deque] = field(default_factory=dict)  # designer -> times of recent jobs
    _images: dict[str, deque] = field(default_factory=dict)  # designer -> (time, images) today
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def charge(self, designer: str, images: int) -> None:
        now = self.clock()
        with self._lock:
            jobs = _recent(self._jobs.setdefault(designer, deque()), now - MINUTE_S, key=lambda when: when)
            made = _recent(self._images.setdefault(designer, deque()), now - DAY_S, key=lambda entry: entry[0])
            if len(jobs) >= self.quotas.jobs_per_minute:
                wait = jobs[0] + MINUTE_S - now
                raise StudioError(f"You have sent {len(jobs)} jobs in the last minute, the most a designer "
                                  f"may; go on in {max(1, round(wait))} s.")
            used = sum(count for _, count in made)
            if used + images > self.quotas.images_per_day:
                left = self.quotas.images_per_day - used
                raise StudioError(f"This job makes {images} images; you have {max(0, left)} left of the "
                                  f"{self.quotas.images_per_day} a designer may make in a day.")
            jobs.append(now)
            made.append((now, images))


def _recent(entries: deque, since: float, key) -> deque:
    while entries and key(entries[0]) < since:
        entries.popleft()
    return entries


# --- how the studio is reached ---------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    mode: str  # "local" (no sign-in), "password" (users file), "huggingface" (a Space's OAuth)
    users: Users | None = None

    @property
    def signs_in(self) -> bool:
        return self.mode != "local"

    def designer(self, request: object) -> str:
        """Whom a request is from: the signed-in name, or (no sign-in) the browser session.

        `request` is a gr.Request; with Hugging Face sign-in its session holds what Gradio's
        OAuth routes stored there (the same data gr.OAuthProfile is made from).
        """
        if self.mode == "password" and getattr(request, "username", None):
            return str(request.username)
        if self.mode == "huggingface":
            info = (getattr(request, "session", None) or {}).get("oauth_info") or {}
            expired = info.get("expires_at") is not None and info["expires_at"] < time.time()
            name = (info.get("userinfo") or {}).get("preferred_username")
            if not name or expired:
                raise StudioError("Sign in with Hugging Face first (the button at the top of the page).")
            return f"hf:{name}"
        if self.signs_in:
            raise StudioError("Sign in first.")
        return f"session:{getattr(request, 'session_hash', None) or 'local'}"


def choose_access(host: str, users_file: Path | None, public_without_login: bool,
                  environ: dict[str, str] | None = None) -> Access:
    """The sign-in that fits; ValueError when the studio would face others without one."""
    env = os.environ if environ is None else environ
    if users_file is not None:
        return Access("password", Users.load(users_file))
    if env.get("SPACE_ID") and env.get("OAUTH_CLIENT_ID"):
        return Access("huggingface")
    if host in LOCAL_HOSTS or public_without_login:
        return Access("local")
    raise ValueError(
        f"--host {host} lets others reach the studio, and it has no sign-in: give --users-file "
        "(STUDIO_USERS_FILE; `python -m studio.access add NAME` makes one), run it as a Hugging Face "
        "Space with `hf_oauth: true`, or say --public-without-login to serve anyone who finds it"
    )


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
