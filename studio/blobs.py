"""Where a shared results store keeps its objects: an S3 bucket under a prefix, or a local folder,
behind one small interface (put, get, head, delete, list; keys are "/"-separated and relative).

    Bucket("my-bucket", "sd-studio/results")   # s3://my-bucket/sd-studio/results/<key>, boto3
    Folder(Path("/data/shared"))               # /data/shared/<key>: the same store on one disk

The bucket is reached with boto3's usual chain for credentials, and its usual variables for an
endpoint other than AWS's (AWS_ENDPOINT_URL_S3, or AWS_ENDPOINT_URL: a moto server in the tests,
MinIO). Only the calls the studio's IAM policy allows are made (`python -m deploy policy studio
--results-bucket ...`): PutObject, GetObject, DeleteObject, and ListObjectsV2 under the prefix.
`head` is a one-key listing, not HeadObject: a user whose ListBucket is limited to the prefix
gets 403 rather than 404 from HeadObject on a missing key, and could not tell "absent" from
"refused".

Every object is written whole (S3's PutObject, a rename here): a reader sees the old object or
the new one. `put(..., only_if_absent=True)` creates a key only when no other writer did
(S3's conditional write, If-None-Match: *), so two studios starting at once agree on one key.
Failures are `BlobError`s, a StudioError whose message names no bucket, path or account.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from sdserve.files import atomic_file

from studio.errors import StudioError

log = logging.getLogger(__name__)

# A prefix is plain relative path segments: nothing S3, an IAM wildcard or a shell could read
# another way ('..', '*', '//', backslashes, control characters); deploy checks its copy alike.
PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
PREFIX_MAX = 256  # S3 keys stop at 1024; this leaves room for the store's own keys
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for a bucket's name
# S3's connection and read timeouts for the store: an image is at most ~50 MB (a 4096 px PNG).
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
# Calls in all (botocore's standard mode retries throttling and 5xx with backoff).
MAX_ATTEMPTS = 3
LIST_PAGE = 1000  # S3's most keys per ListObjectsV2 answer
AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_ABSENT_CODES = {"404", "NoSuchKey", "NotFound"}
_TAKEN_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}  # If-None-Match lost to another writer


class BlobError(StudioError):
    """The store's objects could not be read or written; the message is fit for a designer."""


@dataclass(frozen=True)
class Blob:
    key: str  # relative to the store's root
    size: int
    modified_ns: int  # when it was last written (S3: to the second)


def bucket_problem(name: str) -> str | None:
    """Why `name` cannot be an S3 bucket's name, or None when it can."""
    if not BUCKET_NAME.fullmatch(name):
        return f"{name!r} is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')"
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be a results prefix, or None when it can."""
    if not prefix:
        return "it is empty (the results would sit at the bucket's root)"
    if len(prefix) > PREFIX_MAX:
        return f"it is longer than {PREFIX_MAX} characters"
    segments = prefix.split("/")
    if not all(PREFIX_SEGMENT.fullmatch(segment) and segment not in (".", "..") for segment in segments):
        return "use segments of letters, digits, '.', '_' and '-' joined by single '/' (no '.' or '..' segment)"
    return None


class Bucket:
    """Objects under s3://`name`/`prefix`/ through boto3."""

    def __init__(self, name: str, prefix: str, *, region: str | None = None, client: Any = None):
        prefix = prefix.strip("/")
        problem = bucket_problem(name) or prefix_problem(prefix)
        if problem:
            raise ValueError(f"s3://{name}/{prefix}: {problem}")
        self.name, self.prefix = name, prefix
        self.client = client if client is not None else _s3_client(region)

    def __repr__(self) -> str:
        return f"s3://{self.name}/{self.prefix}/"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def put(self, key: str, data: bytes, *, only_if_absent: bool = False) -> bool:
        """Write `data` at `key`; False (nothing written) when `only_if_absent` and it is there."""
        extra = {"IfNoneMatch": "*"} if only_if_absent else {}
        try:
            self.client.put_object(Bucket=self.name, Key=self._key(key), Body=data, **extra)
        except AWS_ERRORS as error:
            if only_if_absent and _code(error) in _TAKEN_CODES:
                return False
            raise self._failed("write", key, error) from None
        return True

    def get(self, key: str) -> bytes | None:
        """The object at `key`; None when there is none."""
        try:
            answer = self.client.get_object(Bucket=self.name, Key=self._key(key))
            return answer["Body"].read()
        except AWS_ERRORS as error:
            if _code(error) in _ABSENT_CODES:
                return None
            raise self._failed("read", key, error) from None

    def head(self, key: str) -> Blob | None:
        """`key`'s size and time; None when there is none (a one-key listing: see the module)."""
        for blob in self.list(key, limit=1):
            return blob if blob.key == key else None
        return None

    def delete(self, key: str) -> None:
        """Remove `key` (nothing happens when it is not there)."""
        try:
            self.client.delete_object(Bucket=self.name, Key=self._key(key))
        except AWS_ERRORS as error:
            raise self._failed("delete", key, error) from None

    def list(self, under: str, *, limit: int | None = None) -> Iterator[Blob]:
        """The objects whose keys start with `under`, in key order (at most `limit`)."""
        paging = {"PageSize": min(limit or LIST_PAGE, LIST_PAGE), **({"MaxItems": limit} if limit else {})}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=self._key(under), PaginationConfig=paging)
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    yield Blob(item["Key"][len(self.prefix) + 1:], int(item["Size"]),
                               int(item["LastModified"].timestamp() * 1e9))
        except AWS_ERRORS as error:
            raise self._failed("list", under, error) from None

    def _failed(self, what: str, key: str, error: Exception) -> BlobError:
        log.warning("results store: could not %s %s%s: %s", what, self, key, error)  # the log, not the page
        return BlobError(f"The studio's results storage did not answer ({what}: {_code(error) or 'no connection'}); "
                         "try again in a moment.")


class Folder:
    """The same interface over a local folder: `<root>/<key>`, each file written whole."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{self.root}/"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"not a key of this folder: {key!r}")
        return path

    def put(self, key: str, data: bytes, *, only_if_absent: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not only_if_absent:
            with atomic_file(path) as staging:
                staging.write_bytes(data)
            return True
        staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            staging.write_bytes(data)
            os.link(staging, path)  # fails when the key is there: the first writer wins
        except FileExistsError:
            return False
        finally:
            staging.unlink(missing_ok=True)
        return True

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def head(self, key: str) -> Blob | None:
        try:
            stat = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Blob(key, stat.st_size, stat.st_mtime_ns)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)  # its folder stays: a writer may be about to use it

    def list(self, under: str, *, limit: int | None = None) -> Iterator[Blob]:
        found = 0
        start = self.root / under.rpartition("/")[0]  # the deepest folder `under` names
        for directory, folders, files in os.walk(start):
            folders.sort()
            for name in sorted(files):
                key = Path(directory, name).relative_to(self.root).as_posix()
                if name.startswith(".") or not key.startswith(under):  # "." names: writes under way
                    continue
                blob = self.head(key)
                if blob is None:
                    continue
                yield blob
                found += 1
                if limit is not None and found >= limit:
                    return


def _s3_client(region: str | None) -> Any:
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session(region_name=region).client("s3", config=botocore.config.Config(
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
    ))


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return "404" if status == "404" and not code else code
