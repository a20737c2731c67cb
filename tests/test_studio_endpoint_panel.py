"""The endpoint panel, warm-up on "Send to" and the before/after view, end to end: `python -m
studio` in front of a local endpoint with SageMaker's limits on (60 s a call, 6 MB answers) and
room for one model only, so every change of model is a cold load. Over the named API
(gradio_client) for the actions, and in a real browser (Debian chromium through Playwright),
whose screenshots go to test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from playwright.sync_api import Page, expect

from tests.endpoint_support import HeldCalls, listing, start_endpoint, wait_for
from tests.test_browser_studio import CALL_TIMEOUT_MS, generate_small, paint_a_mask, run_and_wait, set_number
from tests.test_studio_api import launched_studio, picture

pytestmark = [pytest.mark.studio, pytest.mark.triton]
LOAD_TIMEOUT_S = 240  # a cold load of a tiny model on two busy cores
JOBS_PER_MINUTE = 3
TINY = {"num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def endpoint(archive_store, tmp_path_factory, artifacts_dir):
    endpoint = start_endpoint(archive_store, tmp_path_factory.mktemp("panel-endpoint"), artifacts_dir,
                              "endpoint-panel-endpoint", max_models=1)
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def studio_url(endpoint, tmp_path_factory) -> Iterator[str]:
    with launched_studio(tmp_path_factory.mktemp("panel-results"), "--endpoint-url", endpoint.url,
                         "--jobs-per-minute", str(JOBS_PER_MINUTE)) as url:
        yield url


def loaded(endpoint) -> set[str]:
    return {m["target_model"] for m in listing(endpoint)["models"] if m["state"] == "loaded"}


def states(client: Client) -> dict[str, str]:
    return {view["model"]: view["state"] for view in client.predict(api_name="/endpoint_status")}


# --- over the named API -----------------------------------------------------------------------------


def test_warm_up_loads_the_model_in_the_background_outside_the_quotas(studio_url, endpoint, tmp_path, monkeypatch):
    client = Client(studio_url, verbose=False)
    images, _ = client.predict(prompt="a house", seed=3, **TINY, api_name="/generate")
    assert loaded(endpoint) == {"sd_base.tar.gz"}
    assert states(client)["sd_base"] == "warm" and states(client)["sd_inpaint"] == "cold"

    # A designer who has used up this minute's jobs (sd_base is warm now: they are quick)...
    busy = Client(studio_url, verbose=False)
    for seed in range(JOBS_PER_MINUTE):
        busy.predict(prompt="a house", seed=seed, **TINY, api_name="/generate")
    with pytest.raises(AppError, match="jobs in the last minute"):
        busy.predict(prompt="one too many", **TINY, api_name="/generate")
    # ...still warms a model up: it is the studio's call, not a job. The endpoint holds the load
    # until the warm-up has answered: a warm-up that waited for its load would never answer.
    held = HeldCalls(endpoint, monkeypatch, method="load")
    try:
        answer = busy.submit(task="erase", api_name="/warm_up").result(timeout=60)  # a hang guard
        assert answer == "Loading sd_inpaint on the endpoint now, while you get the next step ready."
        assert held.arrived.wait(LOAD_TIMEOUT_S), "the warm-up never asked the endpoint to load sd_inpaint"
        assert client.predict(task="erase", api_name="/warm_up") == "sd_inpaint is already being loaded."
    finally:
        held.release.set()
    assert wait_for(lambda: loaded(endpoint) == {"sd_inpaint.tar.gz"}, timeout=LOAD_TIMEOUT_S), listing(endpoint)
    assert wait_for(lambda: states(client)["sd_inpaint"] == "warm", timeout=10)
    assert states(client)["sd_base"] == "cold", "the endpoint had room for one model"
    panel = {view["model"]: view for view in client.predict(api_name="/endpoint_status")}
    assert panel["sd_inpaint"]["cold_wait_s"] > 0, "the endpoint's own load time"
    assert client.predict(task="erase", api_name="/warm_up") == "sd_inpaint is loaded already."

    erased, _ = client.predict(image=handle_file(images[0]["image"]), mask=handle_file(picture(tmp_path / "m.png")),
                               prompt="a tree", num_inference_steps=2, work_side=64, api_name="/erase")
    assert len(erased) == 1
    assert listing(endpoint)["models"][0]["loads"] == 1, "the erase found its model loaded"


def test_warm_up_of_an_unknown_tab_is_refused_in_words(studio_url):
    client = Client(studio_url, verbose=False)
    with pytest.raises(AppError, match="No tab 'paint'; the tabs are generate, restyle, erase, extend, upscale"):
        client.predict(task="paint", api_name="/warm_up")


# --- in the browser -----------------------------------------------------------------------------------


def panel_row(page: Page, title: str):
    return page.locator("#endpoint-panel tr", has_text=title)


@pytest.mark.browser
def test_sending_on_loads_the_target_model_while_the_designer_paints(studio_url, endpoint, page, artifacts_dir):
    page.goto(studio_url)
    generate_small(page, "a small house under a blue sky")
    expect(panel_row(page, "Generate (sd_base)")).to_contain_text("warm")
    expect(panel_row(page, "Restyle (sd_depth)")).to_contain_text("cold")

    page.locator("#generate-send-restyle").click()
    expect(page.locator("#status")).to_contain_text("Sent to Restyle. Loading sd_depth on the endpoint now")
    # Before the designer has done anything in the tab, the model is loading, then loaded.
    expect(panel_row(page, "Restyle (sd_depth)")).to_contain_text("warm", timeout=LOAD_TIMEOUT_S * 1000)
    assert loaded(endpoint) == {"sd_depth.tar.gz"}
    page.screenshot(path=str(artifacts_dir / "studio-send-warms-up.png"), full_page=True)
    run_and_wait(page, "restyle", "Restyle")


@pytest.mark.browser
def test_the_panel_shows_states_cold_start_and_an_estimated_cost(studio_url, page, artifacts_dir):
    page.goto(studio_url)
    generate_small(page, "a lighthouse")
    run_and_wait(page, "generate", "Generate")  # warm: its seconds per image are measured
    panel = page.locator("#endpoint-panel")
    expect(panel).to_contain_text("States from the local endpoint's model listing")
    expect(panel).to_contain_text("Costs are estimates")
    expect(panel).to_contain_text("ml.g5.2xlarge at $1.515/h (on-demand, us-east-1)")
    row = panel_row(page, "Generate (sd_base)")
    expect(row).to_contain_text("warm")
    expect(row).to_contain_text("≈ $")
    expect(panel_row(page, "Upscale (sd_upscale)")).to_contain_text("cold")
    page.locator("#endpoint-panel").screenshot(path=str(artifacts_dir / "studio-endpoint-panel.png"))


@pytest.mark.browser
def test_before_and_after_in_the_tab_and_from_the_history(studio_url, page, artifacts_dir):
    page.goto(studio_url)
    generate_small(page, "a red boat")
    page.locator("#generate-send-erase").click()
    expect(page.locator("#status")).to_contain_text("Sent to Erase")
    paint_a_mask(page)
    set_number(page, "erase-work_side", 64)  # the tiny model at its own size, not the 512 px of real weights
    run_and_wait(page, "erase", "Erase")
    slider = page.locator("#erase-before-after img")
    expect(slider).to_have_count(2, timeout=30_000)
    page.locator("#erase-before-after").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir / "studio-before-after.png"), full_page=True)

    page.reload()  # a new page: the comparison comes back from the history entry alone
    expect(page.locator("#history img")).to_have_count(2, timeout=30_000)
    expect(page.locator("#erase-before-after img")).to_have_count(0)
    page.locator("#history img").nth(0).click()
    expect(page.locator("#status")).to_contain_text("Restored into Erase", timeout=CALL_TIMEOUT_MS)
    expect(page.locator("#erase-before-after img")).to_have_count(2)
    sources = [page.locator("#erase-before-after img").nth(i).get_attribute("src") for i in range(2)]
    assert "erase-image" in sources[0] and "erase-seed" in sources[1], sources
    page.locator("#erase-before-after").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir / "studio-before-after-history.png"), full_page=True)
