"""A chain that travels, in a real browser (Debian chromium through Playwright), against
`python -m studio` on the checkout's local endpoint (real Triton, tiny weights).

A designer chains four tabs (generate -> erase -> restyle -> upscale), goes back to the erase
result and restyles it again (a branch), sees the chain in the history, and exports the session.
A fresh browser profile (another designer: in local mode a visitor is a signed cookie) imports the
zip and finds the same chain: as many steps, the same parents, the same images by the hash of
their pixels, the same chain view; and cannot fetch the first designer's images. The exported
session's size is written to test-artifacts/chain-export.txt.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from studio.exchange import Chain, read_zip
from tests.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.test_browser_studio import (
    generate_small,
    paint_a_mask,
    run_and_wait,
    set_number,
)
from tests.test_studio_api import launched_studio

pytestmark = [pytest.mark.studio, pytest.mark.triton, pytest.mark.browser]

VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def studio_url(model_repository, tmp_path_factory) -> Iterator[str]:
    with launched_studio(tmp_path_factory.mktemp("studio-results"), "--jobs-per-minute", "1000") as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian chromium, headless; each of its contexts is a fresh profile (no cookies, no storage)."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def fresh_page(browser: Browser) -> Page:
    return browser.new_context(viewport=VIEWPORT, accept_downloads=True).new_page()


def send(page: Page, source: str, target: str, title: str) -> None:
    page.locator(f"#{source}-send-{target}").click()
    expect(page.locator("#status")).to_contain_text(f"Sent to {title}")


def restyle(page: Page, seed: int) -> None:
    set_number(page, "restyle-seed", seed)
    run_and_wait(page, "restyle", "Restyle")


def export_session(page: Page, path: Path) -> Path:
    with page.expect_download() as download:
        page.locator("#export-session").click()
    assert download.value.suggested_filename == "sd-studio-session.zip"
    download.value.save_as(path)
    return path


def pixels(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def lineage(chain: Chain) -> list[tuple[str, int | None, str]]:
    """Per step in lineage order: its tab, its parent's position, the hash of its pixels."""
    position = {step.id: index for index, step in enumerate(chain.steps)}
    return [(step.task, position.get(step.parent), pixels(step.png)) for step in chain.steps]


def history_images(page: Page) -> list[str]:
    """The hash of the pixels of each image the history shows, newest first (fetched as the page's designer)."""
    sources = page.locator("#history img").evaluate_all("images => images.map(image => image.src)")
    return [pixels(page.request.get(source).body()) for source in sources]


def test_a_chain_with_a_branch_travels_to_a_fresh_browser(studio_url, browser, tmp_path, artifacts_dir):
    first = fresh_page(browser)
    first.goto(studio_url)
    expect(first.locator("#tiny-weights-banner")).to_contain_text("Demo weights", timeout=60_000)

    generate_small(first, "a red barn in a field")                      # 1
    send(first, "generate", "erase", "Erase")
    paint_a_mask(first)
    run_and_wait(first, "erase", "Erase")                               # 2, from 1
    send(first, "erase", "restyle", "Restyle")
    restyle(first, 11)                                                  # 3, from 2
    send(first, "restyle", "upscale", "Upscale")
    set_number(first, "upscale-seed", 12)
    run_and_wait(first, "upscale", "Upscale")                           # 4, from 3
    expect(first.locator("#history img")).to_have_count(4)
    first.locator("#history img").nth(2).click()                        # back to the erase result
    expect(first.locator("#status")).to_contain_text("Restored into Erase")
    send(first, "erase", "restyle", "Restyle")
    restyle(first, 13)                                                  # 5, from 2: the branch

    expect(first.locator("#history img")).to_have_count(5)
    history = first.locator("#history")
    for caption in ("#5 Restyle · seed 13 · from #2", "#4 Upscale · seed 12 · from #3",
                    "#3 Restyle · seed 11 · from #2", "#2 Erase · seed", "#1 Generate · seed"):
        expect(history).to_contain_text(caption)
    chains = first.locator("#history-chains")
    expect(chains).to_contain_text("├─ #3 Restyle · seed 11")
    expect(chains).to_contain_text("│  └─ #4 Upscale · seed 12")
    expect(chains).to_contain_text("└─ #5 Restyle · seed 13")
    view = chains.inner_text()
    shown = history_images(first)
    first.screenshot(path=str(artifacts_dir / "chain-session.png"), full_page=True)

    exported = export_session(first, tmp_path / "first.zip")
    chain = read_zip(exported)
    steps = lineage(chain)
    assert [(task, parent) for task, parent, _ in steps] == [
        ("generate", None), ("erase", 0), ("restyle", 1), ("upscale", 2), ("restyle", 1)]
    assert [digest for *_, digest in steps] == shown[::-1]
    assert set(chain.steps[1].inputs) == {"image", "mask"}
    size = exported.stat().st_size
    (artifacts_dir / "chain-export.txt").write_text(
        f"5-step session export (generate 64 px -> erase -> restyle -> upscale 256 px, restyle branch; "
        f"2 steps): {size:,} bytes\n")

    # Another designer, in a fresh profile: nothing of the first's, until the zip is dropped.
    second = fresh_page(browser)
    second.goto(studio_url)
    expect(second.locator("#tiny-weights-banner")).to_contain_text("Demo weights", timeout=60_000)
    expect(second.locator("#history img")).to_have_count(0)
    mine = first.locator("#history img").first.get_attribute("src")
    assert second.request.get(mine if mine.startswith("http") else studio_url.rstrip("/") + mine).status == 404

    second.locator("#zip-drop input[type=file]").set_input_files(str(exported))
    expect(second.locator("#status")).to_contain_text("Imported 5 results")
    expect(second.locator("#history img")).to_have_count(5)
    expect(second.locator("#history-chains")).to_have_text(view)
    assert history_images(second) == shown
    again = read_zip(export_session(second, tmp_path / "second.zip"))
    assert lineage(again) == steps
    assert [step.parameters for step in again.steps] == [step.parameters for step in chain.steps]

    # The imported chain is the second designer's to work on: picking a step restores it.
    second.locator("#history img").nth(1).click()
    expect(second.locator("#status")).to_contain_text("Restored into Upscale")
    second.screenshot(path=str(artifacts_dir / "chain-imported.png"), full_page=True)
