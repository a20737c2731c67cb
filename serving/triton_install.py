"""Find and prepare the Triton server that ships inside the ``nvidia-pytriton`` wheel.

The wheel carries a complete ``tritonserver`` 2.51 binary, its shared libraries and the Python
backend, but leaves two things undone: the Python-backend stub of this interpreter's version is
not in place, and the SageMaker listener binds 0.0.0.0 (``loopback_bind.c``, preloaded, keeps it
on 127.0.0.1). ``serving.local_triton`` runs the server this module prepares.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdserve.files import atomic_file

SERVING_DIR = Path(__file__).resolve().parent
INSTALL_HINT = (
    "install it into this environment with `pip install nvidia-pytriton==0.7.0` "
    "(it is pinned in requirements.txt; `make test` sets the environment up)"
)


class TritonLaunchError(RuntimeError):
    """The server could not be prepared, started or made ready."""


# --------------------------------------------------------------------------------------------
# Finding and preparing the server inside the wheel
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonInstallation:
    """Paths of the Triton server bundled in the installed ``nvidia-pytriton`` wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    @property
    def python_backend(self) -> Path:
        return self.backends / "python"

    @property
    def stub(self) -> Path:
        """Where the Python backend looks for its stub executable."""
        return self.python_backend / "triton_python_backend_stub"

    def bundled_stub(self, version: tuple[int, int] | None = None) -> Path:
        """The stub the wheel ships for one Python version (default: this interpreter's)."""
        major, minor = version or sys.version_info[:2]
        stubs = self.root / "python_backend_stubs"
        return stubs / f"{major}.{minor}" / "triton_python_backend_stub"


def find_triton() -> TritonInstallation:
    """Locate the server in the installed pytriton package without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError(f"the tritonserver binary comes from the nvidia-pytriton wheel, "
                                f"which is not installed for {sys.executable}: {INSTALL_HINT}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    install = TritonInstallation(root=package_dir / "tritonserver",
                                 libs=package_dir.parent / "nvidia_pytriton.libs")
    if not install.binary.is_file():
        raise TritonLaunchError(f"pytriton is installed at {package_dir} but has no "
                                f"{install.binary.relative_to(package_dir.parent)}; a wheel "
                                f"without the bundled server? Reinstall: {INSTALL_HINT}")
    return install


_prepare_lock = threading.Lock()


def prepare_triton(install: TritonInstallation | None = None) -> TritonInstallation:
    """Do the one-time preparation the wheel leaves undone; idempotent and safe to race.

    The Python backend runs ``backends/python/triton_python_backend_stub``, but the wheel keeps
    one stub per Python version under ``python_backend_stubs/``: copy this interpreter's into
    place. The copy goes to a temporary name first and is renamed with ``os.replace``, so a
    second process doing the same at the same time (or a server starting a stub meanwhile)
    never sees a half-written executable.
    """
    install = install or find_triton()
    with _prepare_lock:
        try:
            source = install.bundled_stub()
            if not source.is_file():
                raise TritonLaunchError(
                    f"the nvidia-pytriton wheel has no Python-backend stub for Python "
                    f"{sys.version_info[0]}.{sys.version_info[1]} ({source}); use a Python the "
                    f"wheel supports (3.8 to 3.13)")
            target = install.stub
            if not target.is_file() or target.stat().st_size != source.stat().st_size:
                with atomic_file(target, mode=0o755) as staging:
                    shutil.copyfile(source, staging)
            for binary in (install.binary, target):
                _make_executable(binary)
        except OSError as exc:
            raise TritonLaunchError(
                f"could not prepare the Triton server in {install.root} ({exc}); the first start "
                f"needs write access to this environment's site-packages") from exc
    return install


LOOPBACK_SOURCE = SERVING_DIR / "loopback_bind.c"


def loopback_preload(install: TritonInstallation) -> Path:
    """The shared library that keeps the SageMaker listener on 127.0.0.1, built on first use.

    Triton has no address flag for that listener (it binds 0.0.0.0); loopback_bind.c, preloaded,
    turns wildcard binds into loopback ones. The library is named after the source's hash, so an
    edited source is rebuilt, and written under a temporary name first, so racing builds are safe.
    """
    digest = hashlib.sha256(LOOPBACK_SOURCE.read_bytes()).hexdigest()[:12]
    library = install.root / f"loopback_bind-{digest}.so"
    if library.is_file():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise TritonLaunchError(
            "SageMaker mode needs a C compiler to keep its port on 127.0.0.1 (Triton has no address "
            "flag for it): apt-get install gcc")
    with atomic_file(library, mode=0o755) as staging:
        built = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(staging), str(LOOPBACK_SOURCE), "-ldl"],
            capture_output=True, text=True)
        if built.returncode != 0:
            raise TritonLaunchError(f"could not build {LOOPBACK_SOURCE.name}: {built.stderr.strip()}")
    return library


def _make_executable(path: Path) -> None:
    # Only chmod when needed: the package may be read-only once prepared.
    mode = path.stat().st_mode
    wanted = mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
    if mode != wanted:
        os.chmod(path, wanted)


def gpu_available() -> bool:
    """Whether an NVIDIA GPU is visible (the driver's device node exists and is not masked)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return Path("/dev/nvidia0").exists() or (gpus.is_dir() and any(gpus.iterdir()))


def _env_paths(*parts: str | os.PathLike | None) -> str:
    """Join path-list fragments with ':', dropping empties and duplicates, keeping order."""
    seen: list[str] = []
    for part in parts:
        for item in str(part or "").split(os.pathsep):
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


def server_env(install: TritonInstallation, *, sagemaker: bool = False,
               extra_env: Mapping[str, str] | None = None,
               base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver and the Python-backend stubs it starts.

    * LD_LIBRARY_PATH: the interpreter's LIBDIR first (the stub links libpython3.X.so), then
      the wheel's bundled libraries, then whatever was there.
    * PATH: the bin folder of this interpreter's virtual environment first: the stub runs the
      first Python on PATH, and model.py must import torch/diffusers from this environment.
    * SAGEMAKER_MULTI_MODEL=true in SageMaker mode only (removed otherwise: it changes how the
      binary behaves), with loopback_bind preloaded so that its listener binds 127.0.0.1.
      Everything else passes through; ``extra_env`` wins.
    """
    env = dict(os.environ if base_env is None else base_env)
    extra = dict(extra_env or {})
    env["LD_LIBRARY_PATH"] = _env_paths(sysconfig.get_config_var("LIBDIR"), install.libs,
                                        extra.pop("LD_LIBRARY_PATH", None),
                                        env.get("LD_LIBRARY_PATH"))
    env["PATH"] = _env_paths(Path(sys.executable).parent, extra.pop("PATH", None),
                             env.get("PATH") or os.defpath)
    if sagemaker:
        env["SAGEMAKER_MULTI_MODEL"] = "true"
        env["LD_PRELOAD"] = _env_paths(loopback_preload(install), env.get("LD_PRELOAD"))
    else:
        env.pop("SAGEMAKER_MULTI_MODEL", None)
    env.update(extra)
    return env
