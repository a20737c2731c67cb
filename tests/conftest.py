"""Fixtures shared by the test modules, by area: the model repository and artifacts (all), the
local endpoint's archive store, a browser page (the browser tests), and the deploy tests' AWS
fixtures (defined in deploy_support); and the tiers' guard (process_support): a test that starts
a process or a pipeline without the mark that says so fails.

The suite runs in parallel (`make test`: pytest-xdist, one file per worker at a time, the files
on the shared endpoint together): what a fixture shares lives in the worker's own temporary
folder, ports are the system's free ones, and the checkout's tiny weights are built before pytest
starts (or once, under a lock)."""

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from playwright.sync_api import Page, sync_playwright
from sdserve.catalog import MODELS

from serving.archive import build_model_archive

# The deploy tests' fixtures, offered to every test from here so that no test imports a fixture.
from tests.deploy_support import clean_env, deploy, moto, moto_url, repository, tripwire  # noqa: F401
from tests.process_support import guarded, starts_something

ROOT = Path(__file__).resolve().parents[1]

# Property tests: a fixed, fast set of examples in `make test` (repeatable); HYPOTHESIS_PROFILE=long
# searches 3000 examples a test with no deadline.
settings.register_profile("fast", max_examples=60, deadline=timedelta(seconds=2), derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
MODEL_REPOSITORY = ROOT / "serving" / "models"
ARTIFACTS = ROOT / "test-artifacts"


# --- the tiers: an unmarked test may start no process and no pipeline (tests/process_support.py) ---


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with guarded(item):  # the fixtures too: a session fixture that starts a server counts
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with guarded(item):
        return (yield)


# --- the files' groups and order under xdist (`make test`) ------------------------------------
# Each worker takes one group of tests at a time (`--dist loadfile`, refined here): a group is a
# test file, except that the files on the worker's shared endpoint (the `shared_endpoint`
# fixture) make one group, so that one endpoint loads the four models for all of them. The
# longest groups go first, so that none of them starts last while the other workers sit idle. The
# slowest files' seconds (in `make test` on the 2-core machine, which prints the slowest tests)
# are written here; any other file counts a few seconds for each test that starts something and
# little for the others.
SLOW_FILE_SECONDS = {
    "test_browser_studio.py": 430, "test_local_endpoint.py": 390, "test_local_endpoint_eviction.py": 360,
    "test_load_faults.py": 345, "test_studio_endpoint_panel.py": 280, "test_full_size.py": 130,
    "test_studio_api.py": 85, "test_triton_models.py": 80, "test_local_endpoint_cli.py": 55,
    "test_studio_s3_store.py": 40, "test_local_endpoint_s3.py": 40, "test_client_jobs.py": 40,
    "test_deploy_config.py": 40, "test_deploy_aws.py": 40, "test_sdserve_batch.py": 30,
    "test_local_triton.py": 30,
}
# The files whose tests use `shared_endpoint`: xdist's controller, which groups the tests, sees
# only their names; the workers check this list against the fixtures their tests use.
SHARED_ENDPOINT_FILES = {"test_client_jobs.py", "test_edits.py", "test_studio_api.py", "test_studio_replay.py"}
SHARED_ENDPOINT_GROUP = "shared-endpoint"


def xdist_group_of(path: str | Path) -> str:
    name = Path(path).name
    return SHARED_ENDPOINT_GROUP if name in SHARED_ENDPOINT_FILES else str(path)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the shared endpoint's files as one group."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(super()._split_scope(nodeid))

    return FileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # only where xdist's workers collect
        return
    using = {item.path.name for item in items if "shared_endpoint" in getattr(item, "fixturenames", ())}
    collected = {item.path.name for item in items}
    if using != SHARED_ENDPOINT_FILES & collected:
        raise pytest.UsageError(f"tests/conftest.py: SHARED_ENDPOINT_FILES says {sorted(SHARED_ENDPOINT_FILES)}, "
                                f"the files collected that use shared_endpoint are {sorted(using)}")
    seconds: dict[Path, float] = {}
    for item in items:
        seconds[item.path] = seconds.get(item.path, 0.0) + (3.0 if starts_something(item) else 0.1)
    group_seconds: dict[str, float] = {}
    for path in seconds:
        group = xdist_group_of(path)
        group_seconds[group] = group_seconds.get(group, 0.0) + SLOW_FILE_SECONDS.get(path.name, seconds[path])
    items.sort(key=lambda item: -group_seconds[xdist_group_of(item.path)])  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The checkout's model repository with weights in place (tiny ones unless real are there).

    `make test` builds them before pytest starts, so this only checks; otherwise the first worker
    here builds them while the others wait on the lock (they then find them in place)."""
    lock = ROOT / "build" / "tiny-models.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        subprocess.run(
            [sys.executable, "-m", "serving.weights", "tiny", "--keep-existing"], cwd=ROOT, check=True
        )
    return MODEL_REPOSITORY


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def archive_store(model_repository, tmp_path_factory) -> Path:
    """A local model store with the four tiny models' archives, built once per session."""
    store = tmp_path_factory.mktemp("model-store")
    for model in MODELS:
        build_model_archive(model, model_repository, store)
    return store


@pytest.fixture(scope="session")
def shared_endpoint(archive_store, tmp_path_factory, artifacts_dir):
    """A plain local endpoint on the tiny models, for the test files that only call it (no
    settings of their own, nothing they break): started once per xdist worker, its models warm
    for the next file, instead of a Triton and four model loads for each file."""
    from tests.endpoint_support import start_endpoint

    server = start_endpoint(archive_store, tmp_path_factory.mktemp("shared-endpoint"), artifacts_dir,
                            "shared-endpoint")
    yield server
    server.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(tmp_path) -> Iterator[Page]:
    """A page of Debian chromium through Playwright, headless, in a fresh profile."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",  # a fresh profile: no history from an earlier run
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
