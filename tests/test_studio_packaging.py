"""The studio's Docker image stays buildable: what the Dockerfile copies exists, its requirements
pin what the project pins, and the studio runs with nothing of the serving stack installed.

Docker itself cannot run here, so these check the pieces the image is built from.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
STUDIO_REQUIREMENTS = ROOT / "studio" / "requirements.txt"
STUDIO_LOCK = ROOT / "studio" / "requirements.lock"
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# What the studio's image must not need: the serving stack and the deploy tooling. It carries
# sdserve (the model table), whose modules that need torch it never imports.
SERVING_ONLY = ("torch", "diffusers", "transformers", "accelerate", "tritonclient", "pytriton", "serving", "deploy")


def pins(path: Path) -> dict[str, str]:
    """{normalized name: the pin line} of a requirements file."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {_normalize(Requirement(line).name): line for line in lines if line}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots) -> set[str]:
    """Every installed distribution the roots pull in (their non-extra requirements, recursively)."""
    seen: set[str] = set()
    stack = [_normalize(root) for root in roots]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(_normalize(requirement.name))
    return seen


def test_studio_pins_are_the_projects_pins():
    project, studio = pins(ROOT / "requirements.txt"), pins(STUDIO_REQUIREMENTS)
    assert {name: project.get(name) for name in studio} == studio


def test_every_project_pin_the_studio_pulls_in_is_pinned_for_it():
    project, studio = pins(ROOT / "requirements.txt"), pins(STUDIO_REQUIREMENTS)
    pulled_in = dependency_closure(studio) & set(project)
    assert pulled_in - set(studio) == set()
    assert not set(studio) & {_normalize(name) for name in SERVING_ONLY}


def dockerfile_instructions() -> list[list[str]]:
    """[instruction, arguments] per line, continuations joined, comments left out."""
    return [
        line.split(None, 1)
        for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """{normalized name: (the pin, its hashes)} of the lock, one entry per requirement."""
    entries = {}
    text = "\n".join(line for line in STUDIO_LOCK.read_text().splitlines() if not line.lstrip().startswith("#"))
    for entry in text.replace("\\\n", " ").splitlines():
        if entry.strip():
            requirement = entry.split(" --hash=")[0]
            entries[_normalize(Requirement(requirement).name)] = (requirement.strip(), SHA256.findall(entry))
    return entries


def test_dockerfile_copies_what_exists_and_runs_the_studio():
    instructions = dockerfile_instructions()
    copies = [arguments.split() for instruction, arguments in instructions if instruction == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {source.rstrip("/") for *sources, _ in copies for source in sources}
    assert {"studio", "assets", "studio/requirements.lock", "serving/sdserve"} <= copied
    assert ["serving/sdserve/", "sdserve/"] in copies  # imported as `sdserve`, as everywhere
    last = dict(instructions)  # the last of each instruction
    assert last["FROM"].startswith("python:3.11-slim")
    assert last["EXPOSE"] == "7860"
    assert last["CMD"] == '["python", "-m", "studio", "--host", "0.0.0.0", "--port", "7860"]'


def test_the_base_image_is_pinned_by_digest_beside_a_readable_tag():
    (base,) = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base)


def test_the_image_installs_only_the_hashed_lock():
    runs = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    assert installs == ["pip install --require-hashes --only-binary=:all: -r studio/requirements.lock"]


def test_every_requirement_of_the_lock_is_pinned_with_hashes():
    for line in STUDIO_LOCK.read_text().splitlines():  # a pin or a hash of it, nothing else
        assert line.lstrip().startswith("#") or re.fullmatch(
            r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+ \\|    --hash=sha256:[0-9a-f]{64}( \\)?", line), line
    entries = lock_entries()
    assert len(entries) > len(pins(STUDIO_REQUIREMENTS)), "the whole closure, not only the direct pins"
    for name, (requirement, hashes) in entries.items():
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", requirement), f"{name}: not an exact pin"
        assert hashes, f"{name}: no hash"
    assert "--index-url" not in STUDIO_LOCK.read_text() and "--find-links" not in STUDIO_LOCK.read_text()


def test_the_lock_pins_what_studio_requirements_pins():
    entries = lock_entries()
    for name, pin in pins(STUDIO_REQUIREMENTS).items():
        assert name in entries, f"{name} is missing from the lock: run `make studio-lock`"
        assert Requirement(entries[name][0]).specifier == Requirement(pin).specifier, (
            f"{name}: the lock has {entries[name][0]}, studio/requirements.txt {pin}: run `make studio-lock`")


def test_the_lock_covers_everything_the_studio_pins_pull_in():
    missing = dependency_closure(pins(STUDIO_REQUIREMENTS)) - set(lock_entries())
    assert missing == set(), "not in the lock (run `make studio-lock`)"


def test_the_lock_holds_nothing_of_the_serving_stack():
    assert not set(lock_entries()) & {_normalize(name) for name in SERVING_ONLY}


def run_without_serving_stack(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python where the serving stack's modules cannot be imported."""
    blocker = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {SERVING_ONLY!r}:
                    raise ModuleNotFoundError(f"{{name}} is not in the studio's image", name=name)
        sys.meta_path.insert(0, Blocked())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


@pytest.mark.process
def test_the_studio_builds_without_the_serving_stack(tmp_path):
    done = run_without_serving_stack(
        f"""
        from pathlib import Path
        from studio.app import build_app
        from studio.client import StudioClient
        from studio.store import ResultStore
        demo = build_app(lambda: StudioClient.for_local("http://127.0.0.1:9"), store=ResultStore(Path({str(tmp_path)!r})))
        print(sorted(demo.get_api_info()["named_endpoints"]))
        """
    )
    assert done.returncode == 0, done.stderr
    assert ("['/endpoint_status', '/erase', '/extend', '/generate', '/import', '/restore', '/restyle', '/upscale', "
            "'/warm_up']"
            in done.stdout)


@pytest.mark.process
def test_without_an_endpoint_setting_the_image_says_what_to_set():
    clean = {name: "" for name in ("STUDIO_ENDPOINT_URL", "STUDIO_ENDPOINT_NAME")}
    done = run_without_serving_stack(
        "import sys; sys.argv[0] = 'python -m studio'\nfrom studio.__main__ import main; main()", env=clean
    )
    assert done.returncode == 2
    assert "STUDIO_ENDPOINT_NAME and AWS_REGION" in done.stderr
    assert "Traceback" not in done.stderr
