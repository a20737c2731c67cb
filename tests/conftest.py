"""Fixtures shared by the test modules, by area: the model repository and artifacts (all), the
local endpoint's archive store, a browser page (the browser tests), and the deploy tests' AWS
fixtures (defined in deploy_support)."""

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


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The checkout's model repository with weights in place (tiny ones unless real are there)."""
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
