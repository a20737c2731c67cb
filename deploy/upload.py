"""Model archives on S3: build, upload only what changed, list.

Each object carries the sha256 of its archive as user metadata (`x-amz-meta-sha256`); an
archive whose hash matches the object's is not uploaded again. Archives are deterministic
(serving/archive.py), so an unchanged model folder always gives the same hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from serving.archive import build_model_archive, format_size, sha256_file
from sdserve.checkpoint import TINY_KIND, checkpoint_dir, read_marker
from deploy.aws import Aws, Call, DeployError
from deploy.config import DeployConfig

SHA_KEY = "sha256"  # S3 user metadata key
SHOWN_KEPT = 10  # `down --delete-artifacts` names at most this many of the objects it keeps


@dataclass(frozen=True)
class Archive:
    model: str
    path: Path
    sha256: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


# --- the calls -------------------------------------------------------------------------------------


def head_bucket(cfg: DeployConfig) -> Call:
    return Call("s3", "head_bucket", {"Bucket": cfg.bucket}, "the bucket must exist (checked before anything else)")


def head_archive(bucket: str, key: str) -> Call:
    return Call("s3", "head_object", {"Bucket": bucket, "Key": key}, "its sha256 metadata decides whether to upload")


def upload_archive(bucket: str, key: str, archive: Archive) -> Call:
    return Call(
        "s3", "upload_file",
        {
            "Filename": str(archive.path), "Bucket": bucket, "Key": key,
            "ExtraArgs": {"Metadata": {SHA_KEY: archive.sha256}, "ContentType": "application/gzip"},
        },
        "only when the object is missing or its sha256 differs (multipart for large files)",
    )


def list_archives_call(bucket: str, prefix: str) -> Call:
    return Call("s3", "list_objects_v2", {"Bucket": bucket, "Prefix": f"{prefix}/"}, "paginated")


def planned_upload(cfg: DeployConfig, models: tuple[str, ...]) -> list[Call]:
    calls = [head_bucket(cfg)]
    for model in models:
        key = cfg.archive_key(model)
        archive = Archive(model, cfg.archive_dir / f"{model}.tar.gz", "<sha256 of the archive>")
        calls += [head_archive(cfg.bucket, key), upload_archive(cfg.bucket, key, archive)]
    return calls


# --- doing it --------------------------------------------------------------------------------------


def build_archives(cfg: DeployConfig, models: tuple[str, ...]) -> list[Archive]:
    archives = []
    for model in models:
        path = build_model_archive(model, cfg.repository, cfg.archive_dir)
        archive = Archive(model, path, sha256_file(path))
        print(f"{model}: {path} {format_size(archive.size)} sha256={archive.sha256}{_tiny_warning(cfg, model)}")
        archives.append(archive)
    return archives


def _tiny_warning(cfg: DeployConfig, model: str) -> str:
    kind = read_marker(checkpoint_dir(cfg.repository, model)).get("kind")
    return "  (tiny random weights: fine for a smoke test, the images are noise)" if kind == TINY_KIND else ""


def ensure_bucket(cfg: DeployConfig, aws: Aws) -> None:
    try:
        found = aws.read(head_bucket(cfg))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("403", "AccessDenied"):
            raise DeployError(f"S3 bucket {cfg.bucket!r} exists but these credentials may not use it (403)") from None
        raise
    if found is None:
        raise DeployError(
            f"S3 bucket {cfg.bucket!r} does not exist (or is not visible to these credentials) in {cfg.region}; "
            f"create it first, e.g. `aws s3 mb s3://{cfg.bucket} --region {cfg.region}`"
        )


def upload(aws: Aws, bucket: str, key: str, archive: Archive) -> bool:
    """Upload unless the object already holds this archive; True when uploaded."""
    head = aws.read(head_archive(bucket, key))
    if head is not None and head.get("Metadata", {}).get(SHA_KEY) == archive.sha256:
        print(f"{archive.model}: s3://{bucket}/{key} unchanged, skipped")
        return False
    print(f"{archive.model}: uploading {format_size(archive.size)} to s3://{bucket}/{key}")
    aws.run(upload_archive(bucket, key, archive), echo=False)
    return True


def upload_all(cfg: DeployConfig, aws: Aws, archives: list[Archive]) -> None:
    for archive in archives:
        upload(aws, cfg.bucket, cfg.archive_key(archive.model), archive)


@dataclass(frozen=True)
class StoredArchive:
    key: str
    size: int
    sha256: str
    last_modified: str


def list_archives(aws: Aws, bucket: str, prefix: str) -> list[StoredArchive]:
    stored = []
    for item in aws.paginate(list_archives_call(bucket, prefix), "Contents"):
        # list_objects_v2 does not return user metadata; one HEAD per object does.
        head = aws.read(head_archive(bucket, item["Key"])) or {}
        stored.append(StoredArchive(
            key=item["Key"], size=item["Size"], sha256=head.get("Metadata", {}).get(SHA_KEY, "-"),
            last_modified=item["LastModified"].isoformat(timespec="seconds"),
        ))
    return stored


def print_archives(stored: list[StoredArchive], where: str) -> None:
    if not stored:
        print(f"no archives under {where}")
        return
    print(f"{len(stored)} archive(s) under {where}")
    width = max(len(item.key) for item in stored)
    for item in stored:
        print(f"{item.key:<{width}}  {format_size(item.size):>10}  {item.sha256}  {item.last_modified}")


def delete_archives_call(bucket: str, keys: list[str]) -> Call:
    return Call("s3", "delete_objects", {"Bucket": bucket, "Delete": {"Objects": [{"Key": key} for key in keys]}},
                "with --delete-artifacts: this configuration's archives that exist, and no other object")


def delete_archives(cfg: DeployConfig, aws: Aws) -> None:
    """Delete the archives `package` uploads for this configuration's models, and nothing else.

    The prefix may be shared (other deployments' archives, `add-model` extras, anything a person
    put there), so the keys come from the configuration, never from what the listing finds.
    """
    ensure_bucket(cfg, aws)
    present = {item["Key"] for item in aws.paginate(list_archives_call(cfg.bucket, cfg.s3_prefix), "Contents")}
    ours = [key for key in cfg.archive_keys if key in present]
    where = f"s3://{cfg.bucket}/{cfg.s3_prefix}/"
    if ours:
        answer = aws.run(delete_archives_call(cfg.bucket, ours))
        failed = answer.get("Errors", [])
        if failed:  # delete_objects answers 200 even when single keys are refused
            raise DeployError("could not delete " + ", ".join(f"{item['Key']} ({item['Code']})" for item in failed))
    print(f"deleted {len(ours)} archive(s) under {where}")
    others = sorted(present - set(ours))
    if others:
        shown = ", ".join(others[:SHOWN_KEPT]) + (", ..." if len(others) > SHOWN_KEPT else "")
        print(f"kept {len(others)} other object(s) there, not archives of {' '.join(cfg.models)}: {shown}")
