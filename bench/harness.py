"""What the bench tools share: the model store they build, the local endpoint they run on it, a
simulated designer's session on the studio, and timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from gradio_client import Client

from sdserve.catalog import MODELS
from serving.archive import REPO_ROOT, build_model_archive
from serving.local_endpoint import EndpointSettings, LocalEndpoint

MODEL_REPOSITORY = REPO_ROOT / "serving" / "models"


def build_store(store: Path, repository: Path = MODEL_REPOSITORY, models: Iterable[str] = MODELS) -> Path:
    """A local model store holding the archive of each of ``models`` (every model by default)."""
    for model in models:
        build_model_archive(model, repository, store)
    return store


def local_endpoint(work: Path, *, cache: str = "cache", logs: str = "logs", **settings) -> LocalEndpoint:
    """The local endpoint (in-process, a free port) on the store in ``work``/store, its cache and
    logs in ``work`` too; ``settings``: more of EndpointSettings (max_models, compute_threads...).
    Use it as a context manager."""
    return LocalEndpoint(EndpointSettings(port=0, model_store=str(work / "store"), cache_dir=work / cache,
                                          log_dir=work / logs, **settings))


def designer_client(url: str, download_files: bool = False, auth: tuple[str, str] | None = None,
                    cookies: dict[str, str] | None = None) -> Client:
    """A simulated designer's session (gradio_client) on the studio at this URL.

    The designers' browsers are elsewhere in real use, so the harness keeps its own work out of
    the studio's figures: TLS is not verified on a plain-HTTP 127.0.0.1 URL (gradio_client opens
    a new httpx client for each request; with verification on, each one loads the CA bundle).
    `cookies`: a browser's, kept across a reconnect (without sign-in, the studio's visitor cookie
    is who the designer is)."""
    return Client(url, verbose=False, download_files=download_files, auth=auth,
                  ssl_verify=not url.startswith("http://127.0.0.1"), httpx_kwargs={"cookies": dict(cookies or {})})


def timed(function: Callable[[], object]) -> float:
    """Seconds ``function`` took."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started
