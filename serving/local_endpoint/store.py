"""Where model archives come from: a local folder or an S3 prefix, as on a SageMaker MME.

A TargetModel names an object relative to the store (``<model>.tar.gz`` -> ``<folder>/<model>.
tar.gz`` or ``s3://bucket/prefix/<model>.tar.gz``), exactly as SageMaker resolves it against the
model's ``ModelDataUrl`` prefix. New archives placed in the store become invokable without a
restart; a changed archive is picked up the next time its model is loaded (SageMaker itself
never reloads a loaded model when the object changes, and neither does this endpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdserve.catalog import MODELS

from serving.archive import (
    DEFAULT_SDSERVE_DIR,
    MissingCheckpointError,
    archive_name,
    build_model_archive,
    has_checkpoint,
)

from .errors import InternalFailure, ValidationError

log = logging.getLogger("serving.local_endpoint")

TARGET_MODEL_MAX = 1024  # the TargetModelHeader shape's max length in botocore's model


@dataclass(frozen=True)
class ArchiveInfo:
    target: str
    url: str  # for messages: file:///... or s3://bucket/key
    version: str  # changes whenever the archive's bytes may have changed
    size: int


def check_target(target: str | None) -> str:
    """The TargetModel header, validated as a relative archive name (no way out of the store)."""
    if not target:
        raise ValidationError(
            "This is a multi-model endpoint: the request must name a model archive in the "
            f"X-Amzn-SageMaker-Target-Model header (TargetModel, e.g. '{next(iter(MODELS))}.tar.gz').")
    if len(target) > TARGET_MODEL_MAX:
        raise ValidationError(f"TargetModel is {len(target)} characters long, over the limit of "
                              f"{TARGET_MODEL_MAX}.")
    parts = target.split("/")
    if (target[0].isspace() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target) or "\\" in target
            or target.startswith("/") or any(part in ("", ".", "..") for part in parts)):
        raise ValidationError(f"TargetModel {target!r} is not a valid model archive name: give a "
                              f"path relative to the model store, without '..', '.', empty parts or "
                              f"a leading '/'.")
    return target


class ModelStore:
    """Interface of a store; ``describe`` answers None for a missing archive."""

    url: str

    def describe(self, target: str) -> ArchiveInfo | None:
        raise NotImplementedError

    @contextlib.contextmanager
    def local_copy(self, info: ArchiveInfo, scratch: Path) -> Iterator[Path]:
        """A local file holding the archive for as long as the block runs."""
        raise NotImplementedError

    def not_found(self, target: str) -> ValidationError:
        # Worded like AWS's answer for a TargetModel with no object under ModelDataUrl.
        return ValidationError(
            f"Failed to download model data (TargetModel: {target}, model store: {self.url}). "
            f"Please ensure that there is an object located at the URL.")


class LocalStore(ModelStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def describe(self, target: str) -> ArchiveInfo | None:
        path = self.root / PurePosixPath(check_target(target))
        try:
            resolved = path.resolve()
            if not resolved.is_relative_to(self.root):  # a link in the store pointing out of it
                return None
            status = resolved.stat()
        except PermissionError:
            # The archive may well be there: say that the store cannot be read, as the S3 store
            # does for AccessDenied, rather than that the object is missing.
            raise ValidationError(
                f"Failed to download model data (TargetModel: {target}, model store: {self.url}): "
                f"permission denied. Please ensure that the endpoint may read the model store.") from None
        except OSError:
            return None
        if not resolved.is_file():
            return None
        return ArchiveInfo(target=target, url=f"file://{resolved}",
                           version=f"{status.st_size}-{status.st_mtime_ns}-{status.st_ino}",
                           size=status.st_size)

    @contextlib.contextmanager
    def local_copy(self, info: ArchiveInfo, scratch: Path) -> Iterator[Path]:
        # No copy needed: the archive is read in place (safe_extract only reads it).
        yield Path(info.url.removeprefix("file://"))


class S3Store(ModelStore):
    """Archives under ``s3://bucket/prefix/`` read with boto3 (credentials from the usual chain)."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 client=None) -> None:
        match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
        if not match:
            raise ValueError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        self.bucket, prefix = match.group(1), match.group(2)
        self.prefix = prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
        if client is None:
            import boto3
            import botocore.config

            client = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION")
                                           or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1").client(
                "s3", endpoint_url=endpoint_url,
                config=botocore.config.Config(connect_timeout=10, read_timeout=60,
                                              retries={"total_max_attempts": 3, "mode": "standard"}))
        self.client = client
        self.transfer_config = None  # boto3's TransferConfig for downloads; None: its defaults (ranged parts)

    def key(self, target: str) -> str:
        return f"{self.prefix}/{target}" if self.prefix else target

    def describe(self, target: str) -> ArchiveInfo | None:
        import botocore.exceptions

        key = self.key(check_target(target))
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code", "")
            if status == 404 or code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return None
            raise ValidationError(
                f"Failed to download model data (bucket: {self.bucket}, key: {key}): {code or status}. "
                f"Please ensure that the endpoint's credentials may read the object.") from None
        except botocore.exceptions.BotoCoreError as error:
            raise InternalFailure(f"Could not reach the model store {self.url}: {error}") from None
        etag = str(head.get("ETag", "")).strip('"')
        modified = head.get("LastModified")
        return ArchiveInfo(target=target, url=f"s3://{self.bucket}/{key}",
                           version=f"{etag}-{modified.timestamp() if modified else ''}",
                           size=int(head.get("ContentLength", 0)))

    @contextlib.contextmanager
    def local_copy(self, info: ArchiveInfo, scratch: Path) -> Iterator[Path]:
        import botocore.exceptions

        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, prefix=".download-", suffix=".tar.gz")
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, self.key(info.target), name, Config=self.transfer_config)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                raise ValidationError(f"Failed to download model data from {info.url}: {error}") from None
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)


def open_store(location: str | os.PathLike, *, s3_endpoint_url: str | None = None,
               region: str | None = None) -> ModelStore:
    text = str(location)
    if text.startswith("s3://"):
        return S3Store(text, endpoint_url=s3_endpoint_url, region=region)
    return LocalStore(Path(text))


# --- building the local store from the checkout's model repository ---------------------------

def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith((".pyc", ".pyo")):
                continue
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return newest


def build_missing_archives(repository: Path, store_dir: Path, *,
                           sdserve_dir: Path = DEFAULT_SDSERVE_DIR) -> list[Path]:
    """Archive every model of ``repository`` that has weights and no up-to-date archive yet.

    An archive counts as up to date when it is newer than every file of its model folder and of
    the vendored sdserve package (so new weights or code are picked up); models without weights
    are skipped with a log line. Returns the archives written.
    """
    repository, store_dir = Path(repository), Path(store_dir)
    written = []
    sdserve_newest = _newest_mtime(sdserve_dir)
    for config in sorted(repository.glob("*/config.pbtxt")):
        model = config.parent.name
        if not has_checkpoint(repository, model):
            log.info("not archiving %s: no weights in %s (run `make tiny-models`)", model, repository / model)
            continue
        target = store_dir / archive_name(model)
        newest = max(_newest_mtime(repository / model), sdserve_newest)
        if target.is_file() and target.stat().st_mtime >= newest:
            continue
        try:
            path = build_model_archive(model, repository, store_dir, sdserve_dir=sdserve_dir)
        except MissingCheckpointError as error:
            log.info("not archiving %s: %s", model, error)
            continue
        log.info("built %s (%.1f MB)", path, path.stat().st_size / 1e6)
        written.append(path)
    return written
