"""The results store on S3 (studio/blobs.py's Bucket): results that survive a restart, on any
machine, and that several studios on one bucket serve alike.

The bookkeeping, per-owner quotas, pruning, owner checks and served links are ResultStore's
(studio/store.py); this class keeps the images and the owners' markers in the bucket, under the
prefix:

    images/<id>/<name>.png          the image (<id>: the first 32 hex digits of its SHA-256)
    keepers/<id>/<owner key>.<ns>   an empty object: that owner keeps the image, saved at <ns>
                                    (nanoseconds: S3 lists times to the second, and an owner's
                                    oldest images go first); saved again, a new marker replaces it
    keys/signing-key                the key history entries and link tokens are signed with (64 hex)
    keys/history-secret             BrowserState's key, and
    keys/visitor-key                the visitor cookies' key: both as the local store keeps them
                                    beside its folder, so that a restart elsewhere keeps every history

Markers are keyed by the image first, so "does anyone still keep this image" is one listing.
On start the bookkeeping is rebuilt from two listings (`images/`, `keepers/`); nothing is
deleted then. Gradio serves files only from disk, so the results folder (`--results-dir`) holds
local copies, fetched on first read and kept within `max_cache_bytes` (least recently used go
first; a served link is a hard link, so its bytes stay until Gradio cleans its cache). The
signing key is kept in the bucket: whoever can read the bucket can read the images anyway
(docs/security.md).

Several studios on one bucket. Each keeps its own bookkeeping in memory and writes through:
  * an owner this studio does not know to keep an image (another studio saved it since this one
    started) is looked up in the bucket on that read (one listing) and adopted;
  * a save puts the image (unless this studio knows it is there), then the marker, then checks
    that the image is still there and puts it again if not;
  * an image goes only when no marker is left: after deleting its own marker, a studio lists the
    image's markers and deletes the image only when there are none; it then lists them again, and
    if a save elsewhere came in between, puts the image back from its local copy.
So a concurrent prune never deletes an image a marker it can see keeps, and a save racing a
delete restores the image itself (its check comes after its marker). What remains: a save of
the very same bytes elsewhere whose marker and check both land between this studio's listing and
its delete, where this studio has no local copy, loses that image (its owner's entry then shows
nothing). Quotas are each studio's view: two studios saving for one designer at once can hold
up to twice the designer's quota until the next prune that sees the bucket.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

from sdserve.files import atomic_file

from studio import signing
from studio.blobs import Blob, BlobError
from studio.store import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ITEMS,
    ID_PATTERN,
    OWNERS_DIR,
    UNOWNED,
    ResultStore,
    _Owner,
    _safe_name,
)

log = logging.getLogger(__name__)

IMAGES, KEEPERS, KEYS = "images", "keepers", "keys"
SIGNING_KEY, HISTORY_SECRET, VISITOR_KEY = "signing-key", "history-secret", "visitor-key"
# The local copies Gradio serves: room for the images a few dozen designers have open (a 4096 px
# upscale is up to ~50 MB of PNG); the disk watermark (store.py) guards the disk besides.
DEFAULT_MAX_CACHE_BYTES = 2 * 1024 * 1024 * 1024


def image_key(result_id: str, name: str) -> str:
    return f"{IMAGES}/{result_id}/{name}"


def marker_key(result_id: str, key: str, saved: int) -> str:
    return f"{KEEPERS}/{result_id}/{key}.{saved}"


def _owner_and_time(name: str) -> tuple[str, int] | None:
    """(owner key, when saved) of a marker's last part, "<owner key>.<ns>"; None for any other."""
    key, _, saved = name.partition(".")
    return (key, int(saved)) if ID_PATTERN.fullmatch(key) and saved.isdigit() else None


def shared_secret(blobs: Any, name: str) -> bytes:
    """The 32-byte key `keys/<name>` in the store, made on the first start (the first writer wins:
    studios starting at once agree); ValueError naming it when it is not one."""
    key = f"{KEYS}/{name}"
    blobs.put(key, secrets.token_hex(signing.KEY_BYTES).encode(), only_if_absent=True)
    text = (blobs.get(key) or b"").decode("ascii", "replace").strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != signing.KEY_BYTES:
        raise ValueError(f"{blobs}{key} is not a studio key ({2 * signing.KEY_BYTES} hex digits); delete it "
                         "to make a new one (every session history is then lost)")
    return value


class BucketResultStore(ResultStore):
    """ResultStore with its images and markers in `blobs` (a Bucket, or a Folder) and local copies
    in `cache_dir`; see the module's docstring."""

    def __init__(self, blobs: Any, cache_dir: Path, max_items: int = DEFAULT_MAX_ITEMS,
                 max_bytes: int = DEFAULT_MAX_BYTES, *, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
                 **limits: Any):
        if (Path(cache_dir) / OWNERS_DIR).is_dir():
            raise ValueError(f"{cache_dir} holds a local results store; with a results bucket the results folder "
                             "holds only local copies (and removes what is not one): give it another folder")
        self.blobs = blobs
        self.max_cache_bytes = max_cache_bytes
        self._names: dict[str, str] = {}  # id -> its file name, for every image the bookkeeping knows
        self._cached: OrderedDict[str, int] = OrderedDict()  # id -> bytes of its local copy, least recent first
        self._cache_bytes = 0
        self.rebuilt_in_s = 0.0  # how long the start's listings took
        super().__init__(cache_dir, max_items, max_bytes, key=limits.pop("key", None) or shared_secret(blobs, SIGNING_KEY),
                         **limits)

    # --- the bookkeeping, rebuilt from the bucket --------------------------------------------------

    def _load(self) -> None:
        started = time.monotonic()
        images: dict[str, Blob] = {}
        for blob in self.blobs.list(f"{IMAGES}/"):
            result_id, name = _id_and_name(blob.key)
            if name.endswith(".png") and result_id not in images:
                images[result_id] = blob
                self._names[result_id] = name
        newest: dict[tuple[str, str], int] = {}  # (owner key, id) -> when saved
        markers = 0
        for blob in self.blobs.list(f"{KEEPERS}/"):
            result_id, name = _id_and_name(blob.key)
            marker = _owner_and_time(name)
            # A marker without its image is left alone: a save elsewhere puts the image back (see above).
            if result_id in images and marker is not None:
                newest[marker[0], result_id] = max(marker[1], newest.get((marker[0], result_id), 0))
                markers += 1
        held: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
        for (key, result_id), saved in newest.items():
            held[key].append((saved, result_id, images[result_id].size))
        for key, items in held.items():
            self._adopt(key, items)
        self._adopt(UNOWNED, [(blob.modified_ns, result_id, blob.size)
                              for result_id, blob in images.items() if result_id not in self._keepers])
        self._load_copies()
        self.rebuilt_in_s = time.monotonic() - started
        log.info("results store %s: %d images, %d markers, %d local copies, read in %.2f s",
                 self.blobs, len(images), markers, len(self._cached), self.rebuilt_in_s)

    def _load_copies(self) -> None:
        """The local copies an earlier run left that are still whole; the rest of them removed."""
        found = []
        for folder in self.root.iterdir():
            if not (ID_PATTERN.fullmatch(folder.name) and folder.is_dir()):
                continue
            copy = self._file(folder.name)
            if copy is not None and copy.stat().st_size == self._sizes.get(folder.name):
                found.append((copy.stat().st_mtime_ns, folder.name))
            else:
                shutil.rmtree(folder, ignore_errors=True)
        for _, result_id in sorted(found):
            self._remember_copy(result_id, self._sizes[result_id])

    def _kept_elsewhere(self, key: str, result_id: str) -> bool:
        # This studio lets go of an owner's image (bookkeeping and marker) with the lock held, and
        # `keeps` asked the bookkeeping first: a marker found now is not one being deleted here.
        try:
            found = self._look_up(key, result_id)
        except BlobError:
            return False
        if found is None:
            return False
        with self._lock:
            self._adopt_found(key, result_id, *found)
        return True

    def _look_up(self, key: str, result_id: str) -> tuple[int, str, int] | None:
        """(when saved, image name, size) when the bucket says `key` keeps `result_id`."""
        found = [_owner_and_time(blob.key.rsplit("/", 1)[1]) for blob in self.blobs.list(f"{KEEPERS}/{result_id}/{key}.")]
        saved = max((marker[1] for marker in found if marker is not None and marker[0] == key), default=None)
        if saved is None:
            return None
        with self._lock:
            name, size = self._names.get(result_id), self._sizes.get(result_id)
        if name is None or size is None:
            image = next(iter(self.blobs.list(f"{IMAGES}/{result_id}/", limit=1)), None)
            if image is None:
                return None
            name, size = image.key.rsplit("/", 1)[1], image.size
        return saved, name, size

    def _adopt_found(self, key: str, result_id: str, saved: int, name: str, size: int) -> None:
        """What `_look_up` found, into the bookkeeping (with the lock held)."""
        self._names.setdefault(result_id, name)
        kept = self._owners.setdefault(key, _Owner())
        if result_id not in kept.items:
            kept.bytes += self._add(result_id, size)
            self._keepers.setdefault(result_id, set()).add(key)
            kept.items[result_id] = saved
            kept.items = dict(sorted(kept.items.items(), key=lambda item: item[1]))  # oldest first

    # --- reading: local copies ---------------------------------------------------------------------

    def _file(self, result_id: object) -> Path | None:
        name = self._names.get(result_id) if isinstance(result_id, str) else None
        path = self.root / result_id / name if name else None
        return path if path is not None and path.is_file() else None

    def _source(self, result_id: str) -> Path | None:
        path = self._file(result_id)
        if path is not None:
            with self._lock:
                if result_id in self._cached:
                    self._cached.move_to_end(result_id)
            return path
        name = self._names.get(result_id)
        if name is None:
            return None
        try:
            data = self.blobs.get(image_key(result_id, name))
        except BlobError:
            return None
        if data is None:
            return None
        try:
            self._write_copy(result_id, name, data)
        except OSError:  # let go meanwhile (its folder removed under the write)
            return None
        with self._lock:
            if self._names.get(result_id) != name:  # let go meanwhile: no copy to keep
                shutil.rmtree(self.root / result_id, ignore_errors=True)
                return None
            self._remember_copy(result_id, len(data))
        return self._file(result_id)

    def _write_copy(self, result_id: str, name: str, data: bytes) -> None:
        folder = self.root / result_id
        folder.mkdir(exist_ok=True)
        with atomic_file(folder / name) as staging:
            staging.write_bytes(data)

    def _remember_copy(self, result_id: str, size: int) -> None:
        """Count a local copy (with the lock held) and remove the least recently used past the limit."""
        if result_id not in self._cached:
            self._cached[result_id] = size
            self._cache_bytes += size
        self._cached.move_to_end(result_id)
        while self._cache_bytes > self.max_cache_bytes and len(self._cached) > 1:
            oldest = next(iter(self._cached))
            if oldest == result_id:
                self._cached.move_to_end(oldest)
                continue
            self._forget_copy(oldest)

    def _forget_copy(self, result_id: str) -> None:
        self._cache_bytes -= self._cached.pop(result_id, 0)
        shutil.rmtree(self.root / result_id, ignore_errors=True)

    # --- saving: the image, then the marker, then the check ----------------------------------------

    def _publish(self, result_id: str, png: bytes, name: str) -> None:
        with self._lock:
            known = result_id in self._names
        if not known:
            self.blobs.put(image_key(result_id, _safe_name(name)), png)

    def _write(self, result_id: str, png: bytes, name: str) -> None:
        name = self._names.get(result_id) or _safe_name(name)
        self._names[result_id] = name
        try:
            self._write_copy(result_id, name, png)
        except OSError:  # the local copy is a cache: the bucket has the image
            return
        self._remember_copy(result_id, len(png))

    def _mark(self, key: str, result_id: str) -> int:
        saved = time.time_ns()
        self.blobs.put(marker_key(result_id, key, saved), b"")
        before = self._owners[key].items.get(result_id) if key in self._owners else None
        if before is not None:  # saved again: the new marker replaces the old
            self._unmark(key, result_id, before)
        return saved

    def _confirm(self, result_id: str, png: bytes, name: str) -> None:
        with self._lock:
            name = self._names.get(result_id)
        if name is not None and self.blobs.head(image_key(result_id, name)) is None:  # deleted by a prune elsewhere
            self.blobs.put(image_key(result_id, name), png)

    # --- letting go -------------------------------------------------------------------------------

    def _unmark(self, key: str, result_id: str, saved: int) -> None:
        if key == UNOWNED:  # no marker: an image found without one
            return
        try:
            self.blobs.delete(marker_key(result_id, key, saved))
        except BlobError:  # logged; the marker is read again at the next start, and pruned then
            pass

    def _owner_gone(self, key: str) -> None:
        pass

    def _remove_image(self, result_id: str) -> None:
        name = self._names.pop(result_id, None)
        copy = self._file_named(result_id, name)
        try:
            if name is not None and not self._has_markers(result_id):
                self.blobs.delete(image_key(result_id, name))
                if self._has_markers(result_id) and copy is not None:  # a save elsewhere came in between
                    self.blobs.put(image_key(result_id, name), copy.read_bytes())
        except (BlobError, OSError):  # logged; an image left behind is found without owners at the next start
            pass
        self._forget_copy(result_id)

    def _has_markers(self, result_id: str) -> bool:
        return next(iter(self.blobs.list(f"{KEEPERS}/{result_id}/", limit=1)), None) is not None

    def _file_named(self, result_id: str, name: str | None) -> Path | None:
        path = self.root / result_id / name if name else None
        return path if path is not None and path.is_file() else None


def _id_and_name(key: str) -> tuple[str, str]:
    """(id, last part) of "<images or keepers>/<id>/<name>"; ("", "") for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or not ID_PATTERN.fullmatch(parts[1]):
        return "", ""
    return parts[1], parts[2]
