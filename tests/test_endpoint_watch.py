"""The endpoint panel's figures without an endpoint: the cost estimate, and each model's state
and cold-start wait judged from the studio's own calls (as on AWS, where no listing exists).
The clock is a plain counter the tests move on; the calls are reported as StudioClient does."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sdserve.instances import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES

from deploy.config import ConfigError, DeployConfig, check_endpoint_settings
from studio.endpoint_watch import (
    COLD,
    LOADING,
    WARM,
    WARM_FOR_S,
    EndpointWatch,
    Pricing,
    WarmUps,
    describe_endpoint,
    warm_up_request,
)
from tests.samples import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def watch(clock) -> EndpointWatch:
    return EndpointWatch(Pricing("ml.g5.2xlarge"), clock=clock)


def view(watch: EndpointWatch, model: str):
    return next(v for v in watch.views() if v.model == model)


# --- the cost estimate ----------------------------------------------------------------------------


def test_cost_per_image_is_seconds_times_the_hourly_price():
    pricing = Pricing("ml.g5.2xlarge")
    assert pricing.hourly == INSTANCE_TYPES["ml.g5.2xlarge"].usd_per_hour
    assert pricing.per_image(3600) == pytest.approx(pricing.hourly)
    assert pricing.per_image(4.0) == pytest.approx(4.0 * 1.515 / 3600)


def test_a_price_given_replaces_the_tables():
    pricing = Pricing("ml.g5.2xlarge", usd_per_hour=2.0)
    assert pricing.per_image(1.8) == pytest.approx(0.001)
    assert "--price-per-hour" in pricing.source


def test_an_unknown_instance_type_needs_a_price():
    with pytest.raises(ValueError, match="no price known for 'ml.x9.huge'.*--price-per-hour"):
        Pricing("ml.x9.huge")
    assert Pricing("ml.x9.huge", usd_per_hour=3.0).hourly == 3.0
    with pytest.raises(ValueError, match="positive"):
        Pricing("ml.g5.2xlarge", usd_per_hour=0)


def test_deploy_offers_exactly_the_priced_instance_types():
    assert DeployConfig().instance_type == DEFAULT_INSTANCE_TYPE in INSTANCE_TYPES
    for name in INSTANCE_TYPES:
        check_endpoint_settings(DeployConfig(instance_type=name))
    with pytest.raises(ConfigError, match="not one deploy offers.*serving/sdserve/instances.py"):
        check_endpoint_settings(DeployConfig(instance_type="ml.x9.huge"))


def test_the_panel_says_the_cost_is_an_estimate_and_with_what_price(watch, clock):
    watch.call("sd_base").done(2.0, 1)  # cold: no seconds per image from it
    watch.call("sd_base").done(0.8, 1)
    text = describe_endpoint(watch)
    assert "**Costs are estimates**" in text and "ml.g5.2xlarge at $1.515/h (on-demand, us-east-1)" in text
    assert f"| Generate (sd_base) | **warm** | 1.2 s | 0.8 s | ≈ ${0.8 * 1.515 / 3600:.5f} |" in text
    assert "| Erase (sd_inpaint) | cold | — | — | — |" in text


# --- states and waits from the studio's own calls ---------------------------------------------------


def test_a_model_never_called_is_cold_with_nothing_measured(watch):
    assert {v.model: v.state for v in watch.views()} == dict.fromkeys(("sd_base", "sd_depth", "sd_inpaint", "sd_upscale"), COLD)
    assert view(watch, "sd_base").cold_wait_s is None and view(watch, "sd_base").cost_per_image is None
    assert "the studio's own calls" in watch.source


def test_a_first_call_is_loading_then_warm_and_warm_calls_give_seconds_per_image(watch, clock):
    first = watch.call("sd_inpaint")
    assert watch.state("sd_inpaint") == LOADING
    clock.now += 30
    first.done(30.0, 1)
    assert watch.state("sd_inpaint") == WARM
    assert view(watch, "sd_inpaint").seconds_per_image is None, "a cold call's time is mostly the load"
    assert view(watch, "sd_inpaint").cold_wait_s is None, "no warm time yet to take off"
    for seconds in (4.0, 2.0, 3.0):  # a 2-image call of 4 s is 2 s an image
        watch.call("sd_inpaint").done(seconds * 2, 2)
    assert view(watch, "sd_inpaint").seconds_per_image == 3.0


def test_cold_wait_is_a_cold_calls_time_minus_the_warm_time_of_its_images(watch, clock):
    watch.call("sd_base").done(1.0, 1)  # cold, unmeasured
    watch.call("sd_base").done(1.0, 1)
    watch.call("sd_base").done(2.0, 2)  # warm: 1 s an image
    clock.now += WARM_FOR_S + 1  # long idle: SageMaker may have evicted it
    assert watch.state("sd_base") == COLD
    watch.call("sd_base").done(14.0, 4)
    assert view(watch, "sd_base").cold_wait_s == 10.0
    assert watch.state("sd_base") == WARM


def test_told_still_loading_makes_a_warm_looking_model_loading(watch, clock):
    watch.call("sd_depth").done(1.0, 1)
    call = watch.call("sd_depth")
    assert watch.state("sd_depth") == WARM
    call.loading()  # ModelNotReadyException: SageMaker evicted it meanwhile
    call.loading()  # a second retry counts once
    assert watch.state("sd_depth") == LOADING
    call.failed()
    assert watch.state("sd_depth") == WARM, "its last answer is still recent"


def test_a_call_sent_while_another_loads_the_model_is_not_taken_for_warm(watch):
    first, second = watch.call("sd_upscale"), watch.call("sd_upscale")
    first.done(20.0, 1)
    second.done(21.0, 1)
    assert view(watch, "sd_upscale").seconds_per_image is None


def test_a_warm_up_calls_time_is_the_wait_and_not_a_speed(watch, clock):
    watch.call("sd_inpaint", warm_up=True).done(12.5, 1)
    assert view(watch, "sd_inpaint").cold_wait_s == 12.5
    watch.call("sd_inpaint", warm_up=True).done(0.1, 1)
    assert view(watch, "sd_inpaint").seconds_per_image is None


def test_a_failed_call_changes_nothing_but_ends(watch):
    call = watch.call("sd_base")
    call.failed()
    call.failed()
    assert watch.state("sd_base") == COLD


# --- warm-ups ----------------------------------------------------------------------------------------


def test_the_warm_up_request_is_the_smallest_each_model_takes():
    for model, images in (("sd_base", set()), ("sd_depth", {"image"}), ("sd_inpaint", {"image", "mask_image"}),
                          ("sd_upscale", {"image"})):
        inputs, gen_args = warm_up_request(model)
        assert set(inputs) - {"prompt", "negative_prompt"} == images
        assert gen_args["num_inference_steps"] == 1
        assert all(inputs[name].size == (64, 64) for name in images)
    assert warm_up_request("sd_depth")[1]["strength"] == 1.0, "one step run, not none"


def test_warm_ups_skip_warm_models_and_run_one_per_model_at_a_time(watch):
    import threading

    release, sent = threading.Event(), []

    def send(model: str) -> None:
        sent.append(model)
        release.wait(10)

    warm_ups = WarmUps(watch, send)
    assert warm_ups.request("sd_inpaint").startswith("Loading sd_inpaint")
    assert warm_ups.request("sd_inpaint") == "sd_inpaint is already being loaded."
    watch.call("sd_base").done(1.0, 1)
    assert warm_ups.request("sd_base") == "sd_base is loaded already."
    release.set()
    for _ in range(100):
        if not warm_ups.in_flight():
            break
        threading.Event().wait(0.05)
    assert sent == ["sd_inpaint"] and not warm_ups.in_flight()


# --- the local endpoint's listing ------------------------------------------------------------------


@contextlib.contextmanager
def listing_server(models: list[dict], asked: threading.Event | None = None,
                   release: threading.Event | None = None) -> Iterator[str]:
    """A stand-in for the local endpoint's /models in this process (its URL): these models; the
    answer waits for `release` once `asked` is set, when given."""

    class Listing(BaseHTTPRequestHandler):
        def do_GET(self):
            if asked is not None:
                asked.set()
                release.wait(10)
            body = json.dumps({"models": models}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Listing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/models"
    finally:
        if release is not None:
            release.set()
        server.shutdown()
        server.server_close()


def test_a_call_is_not_held_for_the_listing_and_is_judged_by_it_when_it_comes():
    asked, release = threading.Event(), threading.Event()
    with listing_server([{"target_model": "sd_base.tar.gz", "state": "loading"}], asked, release) as url:
        watch = EndpointWatch(listing_url=url)
        call = watch.call("sd_base")  # returns while the listing is fetched (a held call would wait 10 s here)
        assert asked.wait(10) and not call.judged
        release.set()
        call.done(30.0, 1)  # the listing said the model was loading: a cold call, not a speed
        assert call.found_cold and view(watch, "sd_base").seconds_per_image is None


def test_an_evicted_models_cold_start_leaves_out_the_archive_it_has_on_disk():
    # As the local endpoint lists them: sd_base loaded (its first load fetched and extracted the
    # archive), sd_depth evicted after such a load, sd_upscale evicted after a reload.
    models = [
        {"target_model": "sd_base.tar.gz", "state": "loaded", "load_seconds": 95.0, "archive_seconds": 40.0},
        {"target_model": "sd_depth.tar.gz", "state": "absent", "load_seconds": 120.0, "archive_seconds": 50.0},
        {"target_model": "sd_upscale.tar.gz", "state": "absent", "load_seconds": 30.0, "archive_seconds": 0.01},
    ]
    with listing_server(models) as url:
        watch = EndpointWatch(listing_url=url)
        assert (view(watch, "sd_base").state, view(watch, "sd_base").cold_wait_s) == (WARM, 95.0)  # what it took
        assert (view(watch, "sd_depth").state, view(watch, "sd_depth").cold_wait_s) == (COLD, 70.0)
        assert view(watch, "sd_upscale").cold_wait_s == pytest.approx(29.99)
        assert view(watch, "sd_inpaint").cold_wait_s is None  # never loaded: not measured
        assert "loads again from the endpoint's disk, without its download" in describe_endpoint(watch)
