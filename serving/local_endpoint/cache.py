"""The on-disk model cache: archives extracted once, with ``serving.archive.safe_extract``.

Layout under the cache folder::

    models/<name>-<hash>/repo/<model>/config.pbtxt   one archive version, extracted
    models/<name>-<hash>/source.json                 which store, TargetModel and version
    models/<name>-<hash>/repo-r<N>/...               hard-linked copy used after a crash (N > 0)
    downloads/                                       S3 downloads while they are extracted

``<hash>`` covers the store URL, the TargetModel and the archive's version (size+mtime for a
folder, ETag for S3), so a changed archive is extracted afresh and an unchanged one is reused
across restarts, as SageMaker keeps unloaded models on disk. Extraction goes to a temporary
folder renamed into place only when the whole archive was accepted, so a ``repo`` folder that
exists is complete, and two endpoint processes sharing the cache cannot see a half-written one.
When a changed archive has been extracted, the folders of its older versions are removed unless
this endpoint still uses them (``in_use``).
Nothing is ever written outside the cache folder (safe_extract refuses absolute names, ``..``,
links, devices and archives over the size limit).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from serving.archive import CorruptArchiveError, UnsafeArchiveError, safe_extract
from sdserve.files import atomic_file

from .errors import InternalFailure, ValidationError
from .store import ArchiveInfo, ModelStore

log = logging.getLogger("serving.local_endpoint")

REPO_DIR = "repo"
SOURCE_FILE = "source.json"


def folder_size(folder: Path) -> int:
    """Bytes of the files below ``folder`` (links not followed): the memory-size proxy."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (extracted, or in use by another process), or already gone


def _slug(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", target)[:60] or "model"


class ModelCache:
    def __init__(self, root: Path, *, max_archive_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.models = self.root / "models"
        self.downloads = self.root / "downloads"
        self.max_archive_bytes = max_archive_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.in_use: Callable[[Path], bool] = lambda folder: False  # set by the registry
        self.models.mkdir(parents=True, exist_ok=True)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def folder_for(self, store: ModelStore, info: ArchiveInfo) -> Path:
        digest = hashlib.sha256("\0".join((store.url, info.target, info.version)).encode()).hexdigest()
        return self.models / f"{_slug(info.target)}-{digest[:16]}"

    def extracted(self, store: ModelStore, info: ArchiveInfo) -> Path:
        """The extracted repository folder for this archive version, extracting it if needed.

        Raises ValidationError (worded like SageMaker's "Failed to extract model data archive")
        for a corrupt, unsafe, oversized or wrongly laid out archive; nothing is left behind.
        """
        folder = self.folder_for(store, info)
        repo = folder / REPO_DIR
        with self._lock(folder.name):
            if not repo.is_dir():
                if info.size > self.max_archive_bytes:
                    raise ValidationError(
                        f"Refused to extract model data archive {info.url}: it is {info.size} bytes, "
                        f"over the endpoint's limit of {self.max_archive_bytes} bytes (--max-archive-gb).")
                self._extract(store, info, repo)
                self.check_layout(repo, info)
                self._write_source(folder, store, info)
                self._remove_older_versions(store, info, keep=folder)
            self.check_layout(repo, info)
        return repo

    @staticmethod
    def _write_source(folder: Path, store: ModelStore, info: ArchiveInfo) -> None:
        with atomic_file(folder / SOURCE_FILE) as staging:
            staging.write_text(json.dumps({"store": store.url, "target": info.target, "version": info.version}))

    def _remove_older_versions(self, store: ModelStore, info: ArchiveInfo, *, keep: Path) -> None:
        for folder in self.models.glob(f"{_slug(info.target)}-*"):
            if folder == keep or not folder.is_dir():
                continue
            try:
                source = json.loads((folder / SOURCE_FILE).read_text())
            except (OSError, ValueError):
                continue  # not ours to judge (being extracted, or from an older layout)
            if source.get("store") != store.url or source.get("target") != info.target:
                continue
            if self.in_use(folder):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s: an older version of %s", folder, info.target)

    def _extract(self, store: ModelStore, info: ArchiveInfo, repo: Path) -> None:
        try:
            try:
                with store.local_copy(info, self.downloads) as archive:
                    safe_extract(archive, repo, max_total_bytes=self.max_archive_bytes)
            finally:
                _remove_if_empty(repo.parent)  # a refused archive leaves no trace
        except UnsafeArchiveError as error:
            raise ValidationError(
                f"Refused to extract model data archive {info.url}: {error}. Nothing was written "
                f"outside the model cache.") from None
        except CorruptArchiveError as error:
            raise ValidationError(
                f"Failed to extract model data archive {info.url} ({error}). Please ensure that "
                f"the object located at the URL is a valid tar.gz archive.") from None
        except FileExistsError:
            pass  # another endpoint process extracted it meanwhile (its rename is atomic)
        except OSError as error:
            if repo.is_dir() and error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return  # the same race, detected at the rename
            raise InternalFailure(f"Could not extract {info.url} into the model cache {self.root}: "
                                  f"{error}") from None
        log.info("extracted %s into %s (%.1f MB)", info.url, repo, folder_size(repo) / 1e6)

    @staticmethod
    def check_layout(repo: Path, info: ArchiveInfo) -> str:
        """The archive must hold one Triton model folder at its root; returns its name."""
        entries = sorted(p.name for p in repo.iterdir())
        models = [name for name in entries if (repo / name / "config.pbtxt").is_file()]
        if len(models) != 1 or len(entries) != 1:
            shutil.rmtree(repo, ignore_errors=True)  # never load it; a fixed archive has a new version
            _remove_if_empty(repo.parent)
            raise ValidationError(
                f"Model data archive {info.url} must hold exactly one Triton model folder at its root "
                f"(<model>/config.pbtxt, <model>/1/model.py); it holds {entries[:10] or 'nothing'}.")
        return models[0]

    def generation(self, repo: Path, generation: int) -> Path:
        """The folder to load for a generation: ``repo`` itself, or a hard-linked copy of it.

        Triton's SageMaker mode keeps a crashed model's name and folder registered until its
        unload gives up (350 s), so a reload after a crash needs a folder not yet registered.
        """
        if generation == 0:
            return repo
        copy = repo.with_name(f"{REPO_DIR}-r{generation}")
        if copy.is_dir():
            return copy
        staging = Path(tempfile.mkdtemp(dir=repo.parent, prefix=f".{copy.name}.", suffix=".partial"))
        try:
            shutil.rmtree(staging)
            try:
                shutil.copytree(repo, staging, copy_function=os.link, symlinks=True)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(repo, staging, symlinks=True)
            os.rename(staging, copy)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if not copy.is_dir():
                raise InternalFailure(f"Could not prepare {copy} for a reload: {error}") from None
        return copy
