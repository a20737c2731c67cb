"""A designer's session in a real browser (Debian chromium through Playwright), against
`python -m studio` on the checkout's local endpoint (real Triton, tiny weights), one studio for the
module (its models load once; each test is a fresh profile, so another designer):

- generate, send to Erase, paint a mask with the mouse, erase, send to Upscale, upscale, and find
  all three results in the session history, also after a reload (test-artifacts/studio-session.png);
  a downloaded PNG dropped back restores its parameters; cancelled work never shows up; vary,
  erase with a feathered mask, extend;
- a chain that travels: four tabs chained (generate -> erase -> restyle -> upscale), back to the
  erase result and restyled again (a branch), the chain in the history, the session exported; a
  fresh profile (another designer: in local mode a visitor is a signed cookie) imports the zip and
  finds the same chain (as many steps, the same parents, the same images by the hash of their
  pixels, the same chain view), and cannot fetch the first designer's images. The exported
  session's size is written to test-artifacts/chain-export.txt.

The browser is conftest's `page`, or for the chain one Chromium with a fresh context per designer.
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
from tests.test_studio_api import launched_studio

CALL_TIMEOUT_MS = 300_000  # a model's first call loads it into Triton

pytestmark = [pytest.mark.studio, pytest.mark.triton, pytest.mark.browser]


@pytest.fixture(scope="module")
def studio_url(model_repository, tmp_path_factory) -> Iterator[str]:
    # The module's designers send more jobs a minute than one designer's default quota (quotas
    # have their own tests).
    with launched_studio(tmp_path_factory.mktemp("studio-results"), "--jobs-per-minute", "1000") as url:
        yield url


def set_number(page: Page, elem_id: str, value: float) -> None:
    """Type into a slider's (or number box's) number field."""
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def paint(page: Page, canvas_selector: str) -> None:
    """Three horizontal brush strokes across the middle of the editor's canvas."""
    canvas = page.locator(canvas_selector).first
    expect(canvas).to_be_visible()
    # The mouse works in viewport coordinates: the canvas must be on screen, whatever scrolled last.
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    center_x, center_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for offset in (-30, 0, 30):
        page.mouse.move(center_x - 60, center_y + offset)
        page.mouse.down()
        for step in range(1, 13):
            page.mouse.move(center_x - 60 + 10 * step, center_y + offset, steps=2)
        page.mouse.up()


def run_and_wait(page: Page, task: str, title: str) -> None:
    set_number(page, f"{task}-num_inference_steps", 2)
    page.locator(f"#{task}-run").click()
    expect(page.locator("#status")).to_contain_text(f"Done: {title}", timeout=CALL_TIMEOUT_MS)
    expect(page.locator(f"#{task}-results img").first).to_be_visible()


def generate_at(page: Page, url: str, prompt: str, size: tuple[int, int], seed: int) -> None:
    """A fresh page's Generate run with this prompt, size and seed."""
    page.goto(url)
    page.locator("#generate-prompt textarea").fill(prompt)
    set_number(page, "generate-width", size[0])
    set_number(page, "generate-height", size[1])
    set_number(page, "generate-seed", seed)
    run_and_wait(page, "generate", "Generate")


def history_survives_a_reload(page: Page, captions: tuple[str, ...], screenshot) -> None:
    """The history shows one result per caption (newest first), the page is saved as `screenshot`,
    and the history is all there again after a reload."""
    expect(page.locator("#history img")).to_have_count(len(captions))
    for caption in set(captions):
        expect(page.locator("#history")).to_contain_text(caption)
    page.screenshot(path=str(screenshot), full_page=True)
    page.reload()
    expect(page.locator("#history img")).to_have_count(len(captions), timeout=30_000)


def generate_small(page: Page, prompt: str) -> None:
    """A 64 px Generate of `prompt`, waited for."""
    page.locator("#generate-prompt textarea").fill(prompt)
    set_number(page, "generate-width", 64)
    set_number(page, "generate-height", 64)
    run_and_wait(page, "generate", "Generate")


def paint_a_mask(page: Page) -> None:
    """Paint a few strokes with a small brush on the Erase tab's editor; the mask preview shows it."""
    set_number(page, "erase-brush-size", 6)
    page.wait_for_timeout(500)  # the new brush size reaches the editor
    paint(page, "#erase-editor canvas")
    expect(page.locator("#erase-mask img")).to_be_visible()


def test_generate_erase_upscale_session(studio_url, page, artifacts_dir):
    page.goto(studio_url)
    expect(page.locator("#tiny-weights-banner")).to_contain_text("Demo weights", timeout=60_000)

    generate_small(page, "a small house under a blue sky")
    expect(page.locator("#generate-seed-used textarea")).not_to_have_value("")

    page.locator("#generate-send-erase").click()
    expect(page.locator("#status")).to_contain_text("Sent to Erase")
    expect(page.locator("#erase-prompt textarea")).to_have_value("a small house under a blue sky")
    paint_a_mask(page)
    run_and_wait(page, "erase", "Erase")

    page.locator("#erase-send-upscale").click()
    expect(page.locator("#status")).to_contain_text("Sent to Upscale")
    run_and_wait(page, "upscale", "Upscale")

    history_survives_a_reload(page, ("Upscale · seed", "Erase · seed", "Generate · seed"),
                              artifacts_dir / "studio-session.png")

    # Picking the oldest result restores it into Generate, with its size and effective seed.
    page.locator("#history img").nth(2).click()
    expect(page.locator("#status")).to_contain_text("Restored into Generate")
    expect(page.locator("#generate-width input[type=number]")).to_have_value("64")
    seed = page.locator("#generate-seed-used textarea").input_value()
    expect(page.locator("#generate-seed input")).to_have_value(seed)
    page.screenshot(path=str(artifacts_dir / "studio-restored.png"), full_page=True)


def test_a_downloaded_png_brings_its_parameters_back(studio_url, page, tmp_path):
    generate_at(page, studio_url, "a lighthouse", (64, 72), 4242)
    with page.expect_download() as download:
        page.locator("#generate-download").click()
    png = tmp_path / download.value.suggested_filename
    download.value.save_as(png)
    assert png.name == "generate-seed-4242.png"

    page.reload()  # a fresh page: nothing of the above in the controls
    expect(page.locator("#generate-prompt textarea")).to_have_value("")
    page.locator("#png-drop input[type=file]").set_input_files(str(png))
    expect(page.locator("#status")).to_contain_text("Restored into Generate: seed 4242")
    expect(page.locator("#generate-prompt textarea")).to_have_value("a lighthouse")
    expect(page.locator("#generate-height input[type=number]")).to_have_value("72")
    expect(page.locator("#generate-seed input")).to_have_value("4242")


def test_cancelled_work_never_shows_up(studio_url, page):
    page.goto(studio_url)
    page.locator("#generate-prompt textarea").fill("a slow one")
    set_number(page, "generate-width", 256)
    set_number(page, "generate-height", 256)
    set_number(page, "generate-num_inference_steps", 12)  # ten seconds or so on the CPU
    page.locator("#generate-run").click()
    expect(page.locator("#status")).to_contain_text("Working:", timeout=30_000)
    # The page takes clicks on Generate again once Gradio has reset the cancelled event.
    with page.expect_response(lambda response: response.url.endswith("/gradio_api/reset")):
        page.locator("#cancel").click()
    expect(page.locator("#status")).to_contain_text("Cancelled")

    # The endpoint still finishes the cancelled call; a quick one sent after it ends after it.
    page.locator("#generate-prompt textarea").fill("a quick one")
    set_number(page, "generate-width", 64)
    set_number(page, "generate-height", 64)
    run_and_wait(page, "generate", "Generate")
    expect(page.locator("#generate-results img")).to_have_count(1)
    expect(page.locator("#history img")).to_have_count(1)
    expect(page.locator("#history")).to_contain_text("a quick one")



def test_vary_erase_with_a_feathered_mask_and_extend(studio_url, page, artifacts_dir):
    """Vary a Generate result, erase with mask settings previewed before sending, extend the canvas,
    and restore the extension from the history with its settings."""
    generate_at(page, studio_url, "a harbour", (64, 64), 500)

    page.locator("#generate-vary").click()
    expect(page.locator("#history img")).to_have_count(2, timeout=CALL_TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("Done: Generate")
    expect(page.locator("#generate-variation_strength input[type=number]")).to_have_value("0.3")
    expect(page.locator("#generate-seed input")).to_have_value("500")
    expect(page.locator("#generate-variation_seed input")).not_to_have_value("-1")

    page.locator("#generate-send-erase").click()
    expect(page.locator("#status")).to_contain_text("Sent to Erase")
    set_number(page, "erase-mask_grow", 2)
    set_number(page, "erase-mask_feather", 6)
    set_number(page, "erase-brush-size", 6)
    page.wait_for_timeout(500)  # the new brush size reaches the editor
    paint(page, "#erase-editor canvas")
    expect(page.locator("#erase-edit-preview img")).to_be_visible(timeout=30_000)
    expect(page.locator("#erase-only_masked input[type=checkbox]")).to_be_checked()
    run_and_wait(page, "erase", "Erase")

    page.locator("#erase-send-extend").click()
    expect(page.locator("#status")).to_contain_text("Sent to Extend")
    set_number(page, "extend-extend_right", 32)
    set_number(page, "extend-extend_overlap", 8)
    expect(page.locator("#extend-edit-preview img")).to_be_visible(timeout=30_000)
    run_and_wait(page, "extend", "Extend")
    history_survives_a_reload(page, ("Extend · seed", "Erase · seed", "Generate · seed", "Generate · seed"),
                              artifacts_dir / "studio-edits.png")
    page.locator("#history img").nth(0).click()
    expect(page.locator("#status")).to_contain_text("Restored into Extend")
    expect(page.locator("#extend-extend_right input[type=number]")).to_have_value("32")
    expect(page.locator("#extend-extend_overlap input[type=number]")).to_have_value("8")
    page.screenshot(path=str(artifacts_dir / "studio-edits-restored.png"), full_page=True)


# --- a chain that travels to another designer ---------------------------------------------------

VIEWPORT = {"width": 1400, "height": 1000}


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
