"""The studio under load and under faults (bench/load/): the real studio, which starts its
own local endpoint (real Triton, tiny weights), driven by gradio_client designers.

One studio serves the whole module (its models load once); the fault tests chain only the
Generate tab so that what must be loaded again after a fault is one model. kill-studio comes last:
the studio it kills is started again, but its models are then cold.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import pytest

from bench.load.designers import MODEL_TABS, RESTORE
from bench.load.faults import fault_passed
from bench.load.run import run_load, warm_up
from bench.load.studio_tree import Studio, started_studio

from .endpoint_support import invoke, model_info, runtime_client, slow_model_archive, start_endpoint, wait_for

pytestmark = pytest.mark.triton

GENERATE_ONLY = ("generate",)


@pytest.fixture(scope="module")
def studio(model_repository, tmp_path_factory) -> Iterator[Studio]:
    with started_studio(tmp_path_factory.mktemp("load-studio")) as studio:
        warm_up(studio)
        yield studio


def assert_handled(figures: dict) -> None:
    """What a fault may cost: failed requests, each with a message; never a lost job, the history,
    or a manual step."""
    assert all("Traceback" not in message for message in figures["messages"]), figures["messages"]
    assert figures["lost"] == 0
    assert figures["history"]["intact"], figures["history"]["problems"]
    assert figures["history"]["results_served"] > 0
    assert figures["recovery_s"] is not None, "not every tab answered again after the fault"
    assert fault_passed(figures)


@pytest.mark.studio
def test_designers_get_every_answer_under_load(studio):
    figures = run_load(studio, designers=2, seconds=15)
    assert figures["failed"] == 0 and figures["lost"] == 0, figures["messages"]
    for tab in (*MODEL_TABS, RESTORE):
        assert figures["tabs"][tab]["done"] > 0, f"no {tab} job completed"
        assert figures["tabs"][tab]["p50_s"] is not None
    assert {"studio", "endpoint", "tritonserver"} <= set(figures["memory"])
    assert any(role.startswith("stub ") for role in figures["memory"])


@pytest.mark.studio
def test_a_killed_model_is_reported_and_loaded_again(studio):
    figures = run_load(studio, designers=2, seconds=10, fault="kill-model", tabs=GENERATE_ONLY)
    assert_handled(figures)
    assert any("crashed" in message for message in figures["messages"]), figures["messages"]


@pytest.mark.studio
def test_a_restarted_endpoint_comes_back_by_itself(studio):
    figures = run_load(studio, designers=2, seconds=10, fault="restart-endpoint", tabs=GENERATE_ONLY)
    assert_handled(figures)


@pytest.mark.studio
def test_a_killed_endpoint_leaves_no_triton_or_stub_behind_and_comes_back(studio):
    figures = run_load(studio, designers=1, seconds=10, fault="kill-endpoint", tabs=GENERATE_ONLY)
    assert figures["children"] >= 2  # tritonserver and at least one model's stub
    assert figures["orphans"] == []
    assert_handled(figures)


@pytest.mark.studio
def test_an_unreadable_model_store_is_named_and_forgotten_once_readable(studio):
    figures = run_load(studio, designers=1, seconds=10, fault="unreadable-store", tabs=GENERATE_ONLY)
    assert any("permission denied" in message for message in figures["messages"]), figures["messages"]
    assert_handled(figures)


@pytest.mark.studio
def test_a_killed_studio_takes_its_endpoint_and_triton_with_it(studio):
    figures = run_load(studio, designers=1, seconds=10, fault="kill-studio", tabs=GENERATE_ONLY)
    assert figures["children"] >= 3  # the endpoint, tritonserver and at least one stub
    assert figures["orphans"] == []
    assert_handled(figures)


def test_a_call_cut_short_by_a_graceful_stop_is_told_why(archive_store, artifacts_dir, tmp_path):
    """Stopping, the endpoint gives answers in progress a few seconds; one still waiting then (here
    for a model that takes minutes to load) gets an error saying so, in SageMaker's shape."""
    target = "stop-test-slow.tar.gz"
    slow_model_archive(archive_store / target)
    endpoint = start_endpoint(archive_store, tmp_path, artifacts_dir, "load-faults-graceful-stop")
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(invoke, runtime_client(endpoint.url), target)
            assert wait_for(lambda: model_info(endpoint, target).get("state") == "loading", timeout=120)
            endpoint.stop()
            with pytest.raises(botocore.exceptions.ClientError) as raised:
                call.result(timeout=120)
    finally:
        endpoint.stop()
    assert raised.value.response["Error"]["Code"] == "InternalFailure"
    assert "stopped before stop-test-slow.tar.gz answered: it is shutting down" in str(raised.value)
