"""Where result and input images live on the studio's side, named by their content, kept per owner.

The browser keeps only ids (the session history is stored there, each entry signed for its
owner: studio/signing.py), and every lookup names the owner: an image is found only for an owner
who keeps it, so an id copied from another designer finds nothing. An id is checked against its
pattern before it is turned into a path, so a history entry edited in the browser cannot point
the studio at any other file.

Layout, under the root:

    <id>/<name>.png             the image; <id> is the first 32 hex digits of its SHA-256
    .owners/<owner key>/<id>    an empty file: this owner keeps that image (its time: when last saved)

Gradio never serves this folder. What the page shows is a link the store makes for the owner
(`link`): a hard link (a copy across file systems) in a folder Gradio serves, its own cache,

    <links>/<id>/<token>/<name>.png     token: HMAC(key, owner, id), studio/signing.py

so a URL names an id and a token that only its owner was given, never the results folder.
Gradio's cache cleaning (build_app's delete_cache) removes links after a while; the store
removes an owner's links when the owner lets the image go.

Each owner (a signed-in name, else the browser's designer) has a quota: at most `max_items`
images and `max_bytes` bytes; past it that owner's oldest images are let go, and an image goes
from the disk once no owner keeps it. So one designer's (or one script's) saves never remove
another's results. Owners are stored as a hash of their name, never the name itself.

The whole folder has a limit too, far above one owner's (sessions end without saying so).
Past `max_total_items` or `max_total_bytes`, the owners holding the most go first, each losing
its oldest, until the folder is within its limits: images from before owners existed first,
then the largest holder (most recently saved first among equals), the saving owner included
(never the image just saved). This levels holdings from the top: an owner holding no more
than the folder's limit divided by the number of owners loses nothing to the others' saves, so
twenty new accounts that fill their quotas lose their own images, not the established
designers'.

New jobs are refused while the results folder's disk has less than `min_free_bytes` free
(`check_room`), so a full disk never fails jobs half-way.

The bookkeeping is kept in memory as well (read from the marker files at start), so one studio
process owns a results folder. studio/bucket_store.py keeps the same store on S3 (results that
survive a restart, for several studios at once): it replaces the few methods below that touch
the disk (`_source`, `_write`, `_mark`, `_unmark`, `_remove_image`, `_load`, and the hooks
around a save), and the bookkeeping, quotas, pruning and links are this module's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sdserve.files import atomic_file

from studio import signing
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
# The whole folder: past this, the largest holders go first (see the module's docstring).
DEFAULT_MAX_TOTAL_ITEMS = 20_000
DEFAULT_MAX_TOTAL_BYTES = 10 * 1024 * 1024 * 1024
# Free space the results folder's disk keeps: below it new jobs are refused. Room for the jobs
# the studio has taken already (each up to 4 images of up to ~50 MB, the largest upscale),
# Gradio's copies of uploads until its cache is cleaned, and the system itself; a disk that
# fills up fails jobs half-way, and Gradio's uploads with them.
DEFAULT_MIN_FREE_BYTES = 2 * 1024 * 1024 * 1024
UNOWNED = "unowned"  # the images found without an owner (kept before owners existed): let go first

_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def owner_key(owner: str) -> str:
    """The owner's folder name: path-safe and not the name itself."""
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def free_disk_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


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
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        free_bytes: Callable[[Path], int] = free_disk_bytes,
        key: bytes | None = None,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items  # per owner; their oldest go past this (a history entry there is then dropped)
        self.max_bytes = max_bytes  # per owner, likewise
        self.max_total_items = max(max_total_items, max_items)
        self.max_total_bytes = max(max_total_bytes, max_bytes)
        self.min_free_bytes = min_free_bytes
        self.free_bytes = free_bytes  # of the disk a path is on (injected by tests)
        # Signs history entries and names served links; never leaves the server (studio/signing.py).
        self.key = signing.load_key(signing.key_path(self.root)) if key is None else key
        # Where `link` makes served links; build_app moves it into Gradio's cache (`serve_links_in`).
        self.links_dir = self.root.parent / f".{self.root.name}-links"
        with _LOCKS_LOCK:
            self._lock = _LOCKS.setdefault(self.root, threading.Lock())
        self._owners: dict[str, _Owner] = {}
        self._keepers: dict[str, set[str]] = {}  # id -> owner keys
        self._sizes: dict[str, int] = {}  # id -> bytes on disk
        self._total_bytes = 0
        self._load()

    # --- reading: always as an owner ---------------------------------------------------------------

    def keeps(self, result_id: object, *, owner: str) -> bool:
        """Whether `owner` keeps the image `result_id` (False for a malformed id)."""
        if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
            return False
        key = owner_key(owner)
        with self._lock:
            if key in self._keepers.get(result_id, ()):
                return True
        return self._kept_elsewhere(key, result_id)

    def path(self, result_id: object, *, owner: str = DEFAULT_OWNER) -> Path | None:
        """The file behind an id `owner` keeps; None for an unknown or malformed id, or one
        `owner` does not keep. For the studio's own use: what the page shows is `link`."""
        return self._source(result_id) if self.keeps(result_id, owner=owner) else None

    def open(self, result_id: object, *, owner: str = DEFAULT_OWNER) -> Image.Image | None:
        path = self.path(result_id, owner=owner)
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

    def _file(self, result_id: object) -> Path | None:
        """The image's file in the folder, if it is there."""
        if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
            return None
        try:
            files = sorted((self.root / result_id).glob("*.png"))
        except OSError:
            return None
        return files[0] if files else None

    # --- what a store on other storage replaces (studio/bucket_store.py) -----------------------------

    def _source(self, result_id: str) -> Path | None:
        """A file on this disk with the image, to read or link (called without the lock)."""
        return self._file(result_id)

    def _kept_elsewhere(self, key: str, result_id: str) -> bool:
        """Whether an owner this process does not know of keeping the image does (another
        studio on shared storage); here, the folder's bookkeeping is all there is."""
        return False

    def _publish(self, result_id: str, png: bytes, name: str) -> None:
        """Before a save takes the lock: nothing here."""

    def _confirm(self, result_id: str, png: bytes, name: str) -> None:
        """After a save let go of the lock: nothing here."""

    def _mark(self, key: str, result_id: str) -> int:
        """Record on the disk that `key` keeps `result_id` (again: then it is their newest); when (ns)."""
        marker = self.root / OWNERS_DIR / key / result_id
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return marker.stat().st_mtime_ns

    def _unmark(self, key: str, result_id: str, saved: int) -> None:
        """`key` no longer keeps `result_id`, which they saved at `saved` (ns)."""
        (self.root / OWNERS_DIR / key / result_id).unlink(missing_ok=True)

    def _owner_gone(self, key: str) -> None:
        _remove_if_empty(self.root / OWNERS_DIR / key)

    def _remove_image(self, result_id: str) -> None:
        """The image goes: no owner of this process keeps it (called with the lock)."""
        shutil.rmtree(self.root / result_id, ignore_errors=True)

    # --- serving: owner-keyed links -----------------------------------------------------------------

    def serve_links_in(self, folder: Path) -> None:
        """Make served links in `folder` from now on (build_app: a folder in Gradio's cache, the
        studio's user's only); the links an earlier run left there are removed."""
        folder = Path(folder).resolve()
        with self._lock:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)  # Gradio's cache is often in /tmp: other users of the machine see nothing
            self.links_dir = folder

    def link(self, result_id: object, *, owner: str) -> Path | None:
        """A link to the image that only `owner` is given (see the module's docstring), made or
        refreshed now; None when `owner` does not keep it. A link that is there already is
        touched (its ctime), so Gradio's cache cleaning counts its age from now."""
        if not self.keeps(result_id, owner=owner):
            return None
        key = owner_key(owner)
        folder = self.links_dir / result_id / signing.link_token(self.key, key, result_id)
        with self._lock:
            if key not in self._keepers.get(result_id, ()):  # let go meanwhile
                return None
            for target in _pngs(folder):
                try:
                    stat = target.stat()
                    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # sets ctime, keeps mtime
                    return target
                except OSError:
                    break
        source = self._source(result_id)  # outside the lock: on other storage, a download
        if source is None:
            return None
        with self._lock:
            if key not in self._keepers.get(result_id, ()):
                return None
            target = folder / source.name
            try:
                _link_or_copy(source, target)
            except OSError:  # the source went meanwhile (let go, or a cached copy cleaned)
                return None
            return target

    def link_owner_matches(self, path: object, owner: str) -> bool | None:
        """For a check at fetch time: whether `path` is a link of this store's made for `owner`
        (True/False), or None when it is not one of its links at all.

        A link of `owner`'s that is not there (an earlier run's: links are removed at start, and
        the cache is cleaned) is made again now, while `owner` keeps the image: a URL handed out
        before a restart keeps working for its owner, and only for them."""
        try:
            parts = Path(str(path)).resolve().relative_to(self.links_dir).parts
        except (ValueError, OSError):
            return None
        if len(parts) != 3 or not ID_PATTERN.fullmatch(parts[0]):
            return None
        matches = parts[1] == signing.link_token(self.key, owner_key(owner), parts[0])
        if matches and not (self.links_dir / Path(*parts)).exists():
            self.link(parts[0], owner=owner)
        return matches

    # --- room on the disk ------------------------------------------------------------------------------

    def check_room(self) -> None:
        """A StudioError when the results folder's disk has less than `min_free_bytes` free."""
        free = self.free_bytes(self.root)
        if free < self.min_free_bytes:
            raise StudioError(
                f"The studio is short of disk space ({_gigabytes(free)} free; it keeps at least "
                f"{_gigabytes(self.min_free_bytes)} free), so it takes no new jobs for now. Try again later."
            )

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
        self._publish(result_id, png, name)
        with self._lock:
            if self._file(result_id) is None:
                self._write(result_id, png, name)
            self._keep(key, result_id, len(png))
            self._prune(key, keep=result_id)
            self._prune_folder(keep=result_id)
        self._confirm(result_id, png, name)
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
        saved = self._mark(key, result_id)  # first: a failed write records nothing
        kept = self._owners.setdefault(key, _Owner())
        if result_id in kept.items:
            del kept.items[result_id]  # saved again: now the newest
        else:
            kept.bytes += self._add(result_id, size)
            self._keepers.setdefault(result_id, set()).add(key)
        kept.items[result_id] = saved

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

    def _prune_folder(self, keep: str) -> None:
        """Past the folder's limits, the largest holder lets go of its oldest, again and again
        (see the module's docstring); `keep` (the image just saved) stays."""
        while True:
            over_bytes = self._total_bytes > self.max_total_bytes
            if not over_bytes and len(self._sizes) <= self.max_total_items:
                return
            # An owner whose only image is the one just saved has nothing to let go.
            candidates = [key for key, kept in self._owners.items() if len(kept.items) > 1 or keep not in kept.items]
            if not candidates:
                return
            largest = max(candidates, key=functools.partial(self._holding, by_bytes=over_bytes))
            self._let_go(largest, next(result_id for result_id in self._owners[largest].items if result_id != keep))

    def _holding(self, key: str, by_bytes: bool) -> tuple:
        """How much `key` holds, for `_prune_folder`: images from before owners first, then the
        largest (bytes or images, whichever limit is passed), then the most recently saved."""
        kept = self._owners[key]
        return key == UNOWNED, kept.bytes if by_bytes else len(kept.items), kept.last_saved

    def _let_go(self, key: str, result_id: str) -> None:
        """`key` no longer keeps `result_id` (nor its link to it); the image goes when nobody does."""
        kept = self._owners[key]
        saved = kept.items.pop(result_id)
        kept.bytes -= self._sizes.get(result_id, 0)
        self._unmark(key, result_id, saved)
        shutil.rmtree(self.links_dir / result_id / signing.link_token(self.key, key, result_id), ignore_errors=True)
        keepers = self._keepers.get(result_id, set())
        keepers.discard(key)
        if not keepers:
            self._keepers.pop(result_id, None)
            self._total_bytes -= self._sizes.pop(result_id, 0)
            self._remove_image(result_id)
            _remove_if_empty(self.links_dir / result_id)
        if not kept.items:
            del self._owners[key]
            self._owner_gone(key)

    def _load(self) -> None:
        """The bookkeeping from the marker files; images without one are UNOWNED's, oldest first."""
        owners_dir = self.root / OWNERS_DIR
        for folder in owners_dir.iterdir() if owners_dir.is_dir() else ():
            if not (folder.is_dir() and ID_PATTERN.fullmatch(folder.name)):
                continue
            markers = []
            for marker in folder.iterdir():
                path = self._file(marker.name)
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
            path = self._file(folder.name)
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


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy where the two are on different file systems),
    whole or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        try:
            os.link(source, staging)
        except OSError:  # another file system (EXDEV), or one without hard links
            shutil.copyfile(source, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def _pngs(folder: Path) -> list[Path]:
    try:
        return sorted(path for path in folder.iterdir() if path.suffix == ".png" and not path.name.startswith("."))
    except OSError:
        return []


def _gigabytes(size: int) -> str:
    return f"{size / 2**30:.1f} GB"


def _safe_name(name: str) -> str:
    stem = SAFE_NAME.sub("-", str(name)).strip("-.").removesuffix(".png")
    stem = stem[:MAX_NAME_CHARS].strip("-.") or "image"
    return f"{stem}.png"


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not there
        pass
