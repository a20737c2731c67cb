"""Where result and input images live on the studio's side, named by their content, kept per owner.

The browser keeps only ids (the session history is stored there), and Gradio serves the files
from this folder. An id is checked against its pattern before it is turned into a path, so a
history entry edited in the browser cannot point the studio at any other file.

Layout, under the root:

    <id>/<name>.png             the image; <id> is the first 32 hex digits of its SHA-256
    .owners/<owner key>/<id>    an empty file: this owner keeps that image (its time: when last saved)

Each owner (a signed-in name, else the browser session) has a quota: at most `max_items`
images and `max_bytes` bytes; past it that owner's oldest images are let go, and an image goes
from the disk once no owner keeps it. So one designer's (or one script's) saves never remove
another's results. Owners are stored as a hash of their name, never the name itself.

A session ends without saying so (a reload is a new one), so the whole folder has a limit too,
far above one owner's: past `max_total_items` or `max_total_bytes`, the images of the owners
who saved least recently go first (images from before owners existed before them), never the
saving owner's.

Lookups (`path`, `open`) need no owner: a history written in one session still finds its
images after a reload, which is a new session. The bookkeeping is kept in memory as well (read
from the marker files at start), so one studio process owns a results folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sdserve.files import atomic_file

from studio.errors import StudioError

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# A file's name (what a download is called) is cut to this many characters before ".png": with
# atomic_file's temporary ".<name>.<random>.tmp" beside it, far below the usual 255-byte limit.
MAX_NAME_CHARS = 100
OWNERS_DIR = ".owners"
# Whose results they are when a caller does not say: one shared owner, as before owners existed.
DEFAULT_OWNER = "studio"
# Each owner's quota: room for the session history (50 results, each with up to two inputs) and
# several split jobs besides; a 4096 px upscale is up to ~50 MB of PNG, so 512 MB keeps ten of them.
DEFAULT_MAX_ITEMS = 500
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
# The whole folder: sessions that are over (their owners save no more) go first past this.
DEFAULT_MAX_TOTAL_ITEMS = 20_000
DEFAULT_MAX_TOTAL_BYTES = 10 * 1024 * 1024 * 1024
UNOWNED = "unowned"  # the images found without an owner (kept before owners existed): let go first

_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def owner_key(owner: str) -> str:
    """The owner's folder name: path-safe and not the name itself."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass
class _Owner:
    items: dict[str, int] = field(default_factory=dict)  # id -> when saved (ns), oldest first
    bytes: int = 0

    @property
    def last_saved(self) -> int:
        return next(reversed(self.items.values()), 0)


class ResultStore:
    def __init__(
        self,
        root: Path,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        max_total_items: int = DEFAULT_MAX_TOTAL_ITEMS,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items  # per owner; their oldest go past this (a history entry there is then dropped)
        self.max_bytes = max_bytes  # per owner, likewise
        self.max_total_items = max(max_total_items, max_items)
        self.max_total_bytes = max(max_total_bytes, max_bytes)
        with _LOCKS_LOCK:
            self._lock = _LOCKS.setdefault(self.root, threading.Lock())
        self._owners: dict[str, _Owner] = {}
        self._keepers: dict[str, set[str]] = {}  # id -> owner keys
        self._sizes: dict[str, int] = {}  # id -> bytes on disk
        self._total_bytes = 0
        self._load()

    # --- reading ----------------------------------------------------------------------------

    def path(self, result_id: object) -> Path | None:
        """The file behind an id, or None for an unknown or malformed id."""
        if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
            return None
        try:
            files = sorted((self.root / result_id).glob("*.png"))
        except OSError:
            return None
        return files[0] if files else None

    def open(self, result_id: object) -> Image.Image | None:
        path = self.path(result_id)
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                image.load()
                return image
        except (OSError, Image.DecompressionBombError):  # let go meanwhile, or not an image
            return None

    def usage(self, owner: str = DEFAULT_OWNER) -> tuple[int, int]:
        """(images, bytes) kept for `owner`."""
        with self._lock:
            kept = self._owners.get(owner_key(owner))
            return (len(kept.items), kept.bytes) if kept else (0, 0)

    # --- saving -------------------------------------------------------------------------------

    def save(self, png: bytes, name: str, *, owner: str = DEFAULT_OWNER) -> str:
        """Keep `png` as `<root>/<id>/<name>` (the name is what a download is called) for `owner`;
        its id back. Saving what is already there (any owner's) keeps the one file, now also
        `owner`'s and their newest. Past the owner's quota, their oldest images are let go.

        Safe to call from many threads at once, the same image included: the file is written
        to a temporary name and renamed, so it is whole or absent, and a failed write leaves
        no folder behind. Raises StudioError for an image larger than a whole quota.
        """
        if len(png) > self.max_bytes:
            raise StudioError(
                f"The image is {len(png) / 2**20:.1f} MB, more than the {self.max_bytes / 2**20:.0f} MB "
                "the studio keeps for one designer."
            )
        result_id = hashlib.sha256(png).hexdigest()[:32]
        key = owner_key(owner)
        with self._lock:
            if self.path(result_id) is None:
                self._write(result_id, png, name)
            self._keep(key, result_id, len(png))
            self._prune(key, keep=result_id)
            self._prune_folder(spare=key)
        return result_id

    def _write(self, result_id: str, png: bytes, name: str) -> None:
        folder = self.root / result_id
        try:
            folder.mkdir(exist_ok=True)
            with atomic_file(folder / _safe_name(name)) as staging:
                staging.write_bytes(png)
        except BaseException:
            _remove_if_empty(folder)
            raise

    def _keep(self, key: str, result_id: str, size: int) -> None:
        marker = self.root / OWNERS_DIR / key / result_id
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        kept = self._owners.setdefault(key, _Owner())
        if result_id in kept.items:
            del kept.items[result_id]  # saved again: now the newest
        else:
            kept.bytes += self._add(result_id, size)
            self._keepers.setdefault(result_id, set()).add(key)
        kept.items[result_id] = marker.stat().st_mtime_ns

    def _add(self, result_id: str, size: int) -> int:
        if result_id not in self._sizes:
            self._sizes[result_id] = size
            self._total_bytes += size
        return self._sizes[result_id]

    def _prune(self, key: str, keep: str) -> None:
        kept = self._owners[key]
        for result_id in list(kept.items):  # oldest first
            if len(kept.items) <= self.max_items and kept.bytes <= self.max_bytes:
                break
            if result_id != keep:
                self._let_go(key, result_id)

    def _prune_folder(self, spare: str) -> None:
        """Past the folder's limits, the owners who saved least recently let go of their oldest."""
        def over() -> bool:
            return len(self._sizes) > self.max_total_items or self._total_bytes > self.max_total_bytes

        if not over():
            return
        idle = sorted((key != UNOWNED, kept.last_saved, key) for key, kept in self._owners.items() if key != spare)
        for *_, key in idle:
            for result_id in list(self._owners[key].items):
                if not over():
                    return
                self._let_go(key, result_id)

    def _let_go(self, key: str, result_id: str) -> None:
        """`key` no longer keeps `result_id`; the image goes when nobody does."""
        kept = self._owners[key]
        del kept.items[result_id]
        kept.bytes -= self._sizes.get(result_id, 0)
        (self.root / OWNERS_DIR / key / result_id).unlink(missing_ok=True)
        keepers = self._keepers.get(result_id, set())
        keepers.discard(key)
        if not keepers:
            self._keepers.pop(result_id, None)
            self._total_bytes -= self._sizes.pop(result_id, 0)
            shutil.rmtree(self.root / result_id, ignore_errors=True)
        if not kept.items:
            del self._owners[key]
            _remove_if_empty(self.root / OWNERS_DIR / key)

    def _load(self) -> None:
        """The bookkeeping from the marker files; images without one are UNOWNED's, oldest first."""
        owners_dir = self.root / OWNERS_DIR
        for folder in owners_dir.iterdir() if owners_dir.is_dir() else ():
            if not (folder.is_dir() and ID_PATTERN.fullmatch(folder.name)):
                continue
            markers = []
            for marker in folder.iterdir():
                path = self.path(marker.name)
                if path is None:  # the image is gone (or the marker is not one)
                    marker.unlink(missing_ok=True)
                    continue
                markers.append((marker.stat().st_mtime_ns, marker.name, path.stat().st_size))
            self._adopt(folder.name, markers)
            if folder.name not in self._owners:
                _remove_if_empty(folder)
        unowned = []
        for folder in self.root.iterdir():
            if not (ID_PATTERN.fullmatch(folder.name) and folder.is_dir()) or folder.name in self._keepers:
                continue
            path = self.path(folder.name)
            if path is None:  # an empty folder (a failed save of an older studio)
                _remove_if_empty(folder)
                continue
            stat = path.stat()
            unowned.append((stat.st_mtime_ns, folder.name, stat.st_size))
        self._adopt(UNOWNED, unowned)

    def _adopt(self, key: str, items: list[tuple[int, str, int]]) -> None:
        """(when saved, id, size) of an owner's images, found on the disk."""
        kept = _Owner()
        for saved, result_id, size in sorted(items):
            kept.items[result_id] = saved
            kept.bytes += self._add(result_id, size)
            self._keepers.setdefault(result_id, set()).add(key)
        if kept.items:
            self._owners[key] = kept


def _safe_name(name: str) -> str:
    stem = SAFE_NAME.sub("-", str(name)).strip("-.")
    if stem.endswith(".png"):
        stem = stem[: -len(".png")]
    stem = stem[:MAX_NAME_CHARS].strip("-.") or "image"
    return f"{stem}.png"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not there
        pass
