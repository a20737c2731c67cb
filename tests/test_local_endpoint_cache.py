"""The local endpoint's model store and cache on their own (no Triton): archives built into the
store, extracted once, versions, crash copies, refusals that leave nothing behind; and how much of
what the cache holds may be loaded at once by default."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from serving.archive import build_model_archive
from serving.local_endpoint import EndpointSettings, LocalStore, ValidationError, build_missing_archives
from serving.local_endpoint.__main__ import build_parser
from serving.local_endpoint.cache import ModelCache, folder_size
from serving.local_endpoint.registry import triton_model_name
from serving.local_endpoint.server import MODELS_MEMORY_SHARE, RESIDENT_PER_FOLDER_BYTE, default_max_gb
from serving.local_endpoint.store import S3Store, check_target

from .endpoint_support import EVIL_TRICKS, evil_archive, files_below
from .test_archive import make_model, make_sdserve


@pytest.fixture
def store(tmp_path) -> LocalStore:
    repository = tmp_path / "repo"
    make_model(repository, "sd_base")
    build_model_archive("sd_base", repository, tmp_path / "store", sdserve_dir=make_sdserve(tmp_path))
    return LocalStore(tmp_path / "store")


def cache_in(tmp_path, **settings) -> ModelCache:
    return ModelCache(tmp_path / "cache", max_archive_bytes=settings.get("max_archive_bytes", 10**7))


def rewrite(path: Path) -> None:
    """The same bytes written again, modified a second after the last time: a new version of the
    file whatever the grain of the file system's clock (set, not waited for)."""
    modified = path.stat().st_mtime_ns + 10**9
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(modified, modified))


def test_an_archive_is_extracted_once_and_reused_by_a_later_endpoint(store, tmp_path):
    info = store.describe("sd_base.tar.gz")
    repo = cache_in(tmp_path).extracted(store, info)
    assert (repo / "sd_base" / "config.pbtxt").is_file() and (repo / "sd_base" / "1" / "sdserve").is_dir()
    assert folder_size(repo) == sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    marker = repo / "sd_base" / "marker"
    marker.write_text("still here")  # a second extraction would not have it
    assert cache_in(tmp_path).extracted(store, store.describe("sd_base.tar.gz")) == repo
    assert marker.is_file()


def test_a_changed_archive_is_extracted_again_and_the_old_version_removed(store, tmp_path):
    cache = cache_in(tmp_path)
    first = cache.extracted(store, store.describe("sd_base.tar.gz"))
    archive = store.root / "sd_base.tar.gz"
    rewrite(archive)  # same bytes, new file: a new version
    second = cache.extracted(store, store.describe("sd_base.tar.gz"))
    assert second != first and second.is_dir() and not first.parent.exists()

    cache.in_use = lambda folder: folder == second.parent  # loaded by the endpoint: kept
    rewrite(archive)
    third = cache.extracted(store, store.describe("sd_base.tar.gz"))
    assert third.is_dir() and second.is_dir()


def test_two_endpoints_extracting_at_once_share_one_complete_folder(store, tmp_path):
    info = store.describe("sd_base.tar.gz")
    results: list = []

    def extract() -> None:
        try:
            results.append(cache_in(tmp_path).extracted(store, info))  # separate objects: no shared lock
        except Exception as error:  # noqa: BLE001 - checked below
            results.append(error)

    threads = [threading.Thread(target=extract) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    assert not list((tmp_path / "cache" / "models").glob("*/.*partial"))


def test_a_reload_after_a_crash_gets_a_hard_linked_copy(store, tmp_path):
    cache = cache_in(tmp_path)
    repo = cache.extracted(store, store.describe("sd_base.tar.gz"))
    assert cache.generation(repo, 0) == repo
    copy = cache.generation(repo, 1)
    assert copy != repo and copy.name == "repo-r1"
    original = repo / "sd_base" / "1" / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors"
    copied = copy / "sd_base" / "1" / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors"
    assert os.stat(original).st_ino == os.stat(copied).st_ino  # no second copy of the weights
    assert cache.generation(repo, 1) == copy
    assert triton_model_name("sd_base.tar.gz", 0) == "sd_base.tar.gz"
    assert triton_model_name("sd_base.tar.gz", 1) == "sd_base.tar.gz@r1"
    odd = triton_model_name("team a/sd_base v2.tar.gz", 0)
    assert odd.startswith("team_a_sd_base_v2.tar.gz-") and " " not in odd and "/" not in odd


@pytest.mark.parametrize("trick", EVIL_TRICKS)
def test_an_escaping_archive_leaves_nothing_behind(tmp_path, trick):
    outside = tmp_path / "outside" / "pwned"
    outside.parent.mkdir()
    (tmp_path / "store").mkdir()
    evil_archive(tmp_path / "store" / "evil.tar.gz", trick, outside)
    store = LocalStore(tmp_path / "store")
    cache = cache_in(tmp_path)
    before = files_below(cache.root)
    with pytest.raises(ValidationError, match="Refused to extract model data archive"):
        cache.extracted(store, store.describe("evil.tar.gz"))
    assert files_below(cache.root) == before and list(outside.parent.iterdir()) == []


def test_an_archive_over_the_size_limit_is_refused_before_reading(store, tmp_path):
    cache = cache_in(tmp_path, max_archive_bytes=100)
    with pytest.raises(ValidationError, match="over the endpoint's limit of 100 bytes"):
        cache.extracted(store, store.describe("sd_base.tar.gz"))
    assert list(cache.models.iterdir()) == []


@pytest.mark.parametrize("target", ["", "/abs.tar.gz", "../up.tar.gz", "a/../b.tar.gz", "a//b.tar.gz",
                                    "./a.tar.gz", "a\\b.tar.gz", "new\nline.tar.gz", " lead.tar.gz", "x" * 1025])
def test_target_models_that_could_leave_the_store_are_refused(target):
    with pytest.raises(ValidationError):
        check_target(target)


def test_a_link_in_the_store_pointing_out_of_it_is_not_followed(store, tmp_path):
    secret = tmp_path / "secret.tar.gz"
    secret.write_bytes(b"not for the endpoint")
    (store.root / "linked.tar.gz").symlink_to(secret)
    assert store.describe("linked.tar.gz") is None
    assert store.describe("missing.tar.gz") is None
    assert store.describe("sd_base.tar.gz").size == (store.root / "sd_base.tar.gz").stat().st_size


def test_s3_urls():
    store = S3Store("s3://bucket/some/prefix/", client=object())
    assert (store.bucket, store.url, store.key("sd_base.tar.gz")) == (
        "bucket", "s3://bucket/some/prefix/", "some/prefix/sd_base.tar.gz")
    assert S3Store("s3://bucket", client=object()).key("sd_base.tar.gz") == "sd_base.tar.gz"
    with pytest.raises(ValueError):
        S3Store("https://bucket/prefix", client=object())


def test_archives_are_built_when_missing_or_out_of_date(tmp_path):
    repository = tmp_path / "repo"
    make_model(repository, "sd_base")
    make_model(repository, "sd_depth")
    (repository / "sd_depth" / "1" / "checkpoint" / "model_index.json").unlink()  # no weights
    sdserve = make_sdserve(tmp_path)
    store = tmp_path / "store"

    def build() -> list[str]:
        return [p.name for p in build_missing_archives(repository, store, sdserve_dir=sdserve)]

    assert build() == ["sd_base.tar.gz"] and not (store / "sd_depth.tar.gz").exists()
    assert build() == []  # up to date

    def dated(newer: Path | None) -> None:
        """Every source at t=0, the archive at t=1000, ``newer`` at t=2000."""
        for path in [*(repository / "sd_base").rglob("*"), *sdserve.rglob("*")]:
            os.utime(path, (0, 0))
        os.utime(store / "sd_base.tar.gz", (1000, 1000))
        if newer is not None:
            os.utime(newer, (2000, 2000))

    dated(None)
    assert build() == []
    dated(repository / "sd_base" / "1" / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors")
    assert build() == ["sd_base.tar.gz"]  # new weights
    dated(sdserve / "catalog.py")
    assert build() == ["sd_base.tar.gz"]  # new serving code
    dated(repository / "sd_base" / "1" / "__pycache__" / "model.cpython-311.pyc")
    assert build() == []  # bytecode a Triton stub left behind does not count


# --- the memory budget's default ------------------------------------------------------------------


def test_the_default_budget_holds_what_fits_in_the_machines_memory():
    # 24 GiB (this project's CI machine): 7.1 GiB of folders, whose models hold 2.35x that on a CPU.
    budget = default_max_gb(24 * 2**30)
    assert budget == 7.1
    assert budget * RESIDENT_PER_FOLDER_BYTE <= 24 * MODELS_MEMORY_SHARE
    assert default_max_gb(48 * 2**30) == pytest.approx(2 * budget, abs=0.15)  # each rounded to 0.1
    here = default_max_gb()
    assert EndpointSettings().max_gb == here and EndpointSettings().limits().max_bytes == int(here * 2**30)
    assert build_parser().parse_args([]).max_gb == here


def test_a_budget_of_zero_gb_is_no_limit():
    assert EndpointSettings(max_gb=0).limits().max_bytes is None
    assert EndpointSettings(max_gb=None).limits().max_bytes is None
    assert build_parser().parse_args(["--max-gb", "0"]).max_gb == 0

