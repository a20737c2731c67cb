"""Fixtures shared by the test modules."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
