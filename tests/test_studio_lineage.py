"""Lineage, export and import on the page (issue 18, parts 2 and 3), in-process.

Each result records the result it was made from ("parent"): Send to, a history entry restored
into its tab, and Vary set it; another image put into the tab clears it; the signature covers it,
so a parent written in the browser is refused. The history's captions and its chain view show
chains and branches. Export makes a zip only its designer is served; importing it (the page's
drop or the named API) keeps the chain as the importer's, with the same parents and images.

The handlers run on an app built by build_app, against a client that makes each image itself;
nothing here starts a process.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from studio import app as app_module
from studio import session, signing
from studio.access import Access
from studio.exchange import MANIFEST_NAME, decode_png, export_zip, read_zip
from studio.metadata import image_to_png
from studio.quotas import JOBS_PER_MINUTE
from studio.results import GenerationResult
from studio.session import MAX_UPLOAD_BYTES
from studio.store import ResultStore
from studio.tasks import TASKS


def request(name: str) -> SimpleNamespace:
    """What a gr.Request of a signed-in designer says about them."""
    return SimpleNamespace(username=name, session_hash=f"hash of {name}", request=None, cookies={}, session=None)


class Endpoint:
    """A client whose every call makes one image of its own (noise, so every id differs), at the
    size its model makes from its input, its parameters embedded as the endpoint does."""

    def __init__(self) -> None:
        self.calls = 0

    def invoke(self, model, inputs, gen_args, **options):
        self.calls += 1
        size = (64, 64)
        if "image" in inputs:
            size = _size(inputs["image"])
            if model == "sd_upscale":
                size = (size[0] * 4, size[1] * 4)
        parameters = {"model": model, "seed": self.calls, "seeds": [self.calls],
                      "prompt": inputs.get("prompt", "")}
        rng = np.random.default_rng(self.calls)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
        return GenerationResult(model=model, images=[image], png=[image_to_png(image, parameters)],
                                parameters=parameters)


def _size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(io.BytesIO(image if isinstance(image, bytes) else base64.b64decode(image))) as opened:
        return opened.size


@pytest.fixture
def built(tmp_path, monkeypatch):
    """(demo, handlers, store): the studio with password sign-in and a client that makes its own images."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    store = ResultStore(tmp_path / "results")
    endpoint = Endpoint()
    demo = app_module.build_app(lambda: endpoint, store=store, access=Access("password"))
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "show_history")
    return demo, handlers, store


@pytest.fixture
def studio(built):
    """(handlers, store)."""
    return built[1:]


def last(events) -> dict:
    """A streaming handler's last update."""
    return list(events)[-1]


def generate(handlers, history, who="ann", **values) -> list:
    page = handlers.page
    return last(handlers.run(page.panels["generate"])(history, None, request(who), prompt="a house", width=64,
                                                     height=64, num_inference_steps=2, **values))[page.history]


def run_tab(handlers, task, history, source, made_from, who="ann") -> list:
    page = handlers.page
    return last(handlers.run(page.panels[task])(history, source, request(who), made_from=made_from,
                                                prompt=f"{task} it", num_inference_steps=2))[page.history]


def sent(handlers, entry, task, who="ann") -> tuple:
    """(image, sent id) that Send to puts into the tab `task`."""
    panel = handlers.page.panels[task]
    update = handlers.send_to(panel)(entry, request(who))
    return update[panel.source], update[panel.sent]


def chain_of_four(handlers):
    """generate -> restyle -> upscale, and a branch: restyle again from the generate. The history."""
    history = generate(handlers, [])
    image, sent_id = sent(handlers, history[0], "restyle")
    history = run_tab(handlers, "restyle", history, image, sent_id)
    image, sent_id = sent(handlers, history[0], "upscale")
    history = run_tab(handlers, "upscale", history, image, sent_id)
    image, sent_id = sent(handlers, history[2], "restyle")  # back to the generate: a branch
    return run_tab(handlers, "restyle", history, image, sent_id)


def structure(entries: list) -> list:
    """(task, the task and position of its parent) per entry, oldest first: a history's lineage,
    whatever its ids."""
    oldest_first = entries[::-1]
    position = {entry["id"]: index for index, entry in enumerate(oldest_first)}
    return [(entry["task"], position.get(entry["parent"])) for entry in oldest_first]


def pixels_hash(png: bytes) -> str:
    return hashlib.sha256(decode_png(png).convert("RGB").tobytes()).hexdigest()


# --- lineage -------------------------------------------------------------------------------------


def test_send_to_and_run_record_the_parent(studio):
    """HEAD: an entry had no parent; what a tab made from a sent result did not say so."""
    handlers, store = studio
    history = generate(handlers, [])
    assert history[0]["parent"] is None  # Generate: made fresh
    image, sent_id = sent(handlers, history[0], "restyle")
    assert sent_id == history[0]["id"]
    history = run_tab(handlers, "restyle", history, image, sent_id)
    restyled = history[0]
    assert restyled["parent"] == history[1]["id"]
    assert set(restyled) == {"id", "task", "parameters", "parent", "inputs", "signature"}
    assert session.valid_history(history, store, owner="ann") == history  # kept, as signed


def test_another_image_in_the_tab_has_no_parent(studio):
    """The tab's sent id counts only while the job's image is that result's pixels: an upload
    (or an example) put there since makes a fresh result; so does an id the designer does not keep."""
    handlers, _ = studio
    history = generate(handlers, [])
    image, sent_id = sent(handlers, history[0], "restyle")
    other = Image.new("RGB", image.size, "green")
    assert run_tab(handlers, "restyle", history, other, sent_id)[0]["parent"] is None
    bobs = generate(handlers, [], who="bob")[0]
    bobs_image, _ = sent(handlers, bobs, "restyle", who="bob")
    assert run_tab(handlers, "restyle", history, bobs_image, bobs["id"])[0]["parent"] is None


def test_vary_records_the_varied_result(studio):
    handlers, _ = studio
    page, panel = handlers.page, handlers.page.panels["generate"]
    history = generate(handlers, [])
    varied = last(handlers.vary(panel)(history, history[0], request("ann"), prompt="a house", width=64, height=64,
                                       num_inference_steps=2))[page.history]
    assert varied[0]["parent"] == history[0]["id"] and varied[1] == history[0]


def test_picking_a_history_entry_puts_its_parent_back_as_sent(studio):
    """Restored into its tab, an entry's input is there again: made again from it, a result is a
    sibling of the entry (its parent's child)."""
    handlers, _ = studio
    history = chain_of_four(handlers)
    panel = handlers.page.panels["upscale"]
    upscaled = history[1]
    restored = handlers.pick_from_history(history, gr.SelectData(None, {"index": 1, "value": None}), request("ann"))
    assert restored[panel.sent] == upscaled["parent"]
    again = run_tab(handlers, "upscale", history, restored[panel.source], restored[panel.sent])
    assert again[0]["parent"] == upscaled["parent"]


def test_the_signature_covers_the_parent(studio):
    """HEAD: the signature covered owner, id, task and inputs only, so a parent could be written in
    the browser. Now a parent changed, added or removed fails it; an entry signed before lineage
    (no parent) stays valid."""
    handlers, store = studio
    history = chain_of_four(handlers)
    child, fresh = history[1], history[-1]
    assert child["parent"] is not None and fresh["parent"] is None
    forged = [
        {**child, "parent": history[0]["id"]},  # another of the designer's results
        {**child, "parent": None},
        {key: value for key, value in child.items() if key != "parent"},
        {**fresh, "parent": child["id"]},
        {**child, "parent": "../../etc/passwd"},
        {**child, "parent": ["a list"]},
    ]
    assert session.valid_history(forged, store, owner="ann") == []
    assert session.valid_history([child, fresh], store, owner="ann") == [child, fresh]
    before_lineage = {key: value for key, value in fresh.items() if key != "parent"}
    assert signing.signature_matches(store.key, "ann", before_lineage)
    assert session.valid_history([before_lineage], store, owner="ann") == [fresh]
    assert signing.entry_signature(store.key, "ann", child) != signing.entry_signature(
        store.key, "ann", {**child, "parent": None})


def test_the_history_shows_chains_and_branches(studio):
    handlers, store = studio
    history = chain_of_four(handlers)
    shown = handlers.show_history(history, request("ann"))
    captions = [caption for _, caption in shown[handlers.page.history_gallery]]
    assert [caption.split(" · ")[0] for caption in captions] == ["#4 Restyle", "#3 Upscale", "#2 Restyle",
                                                                 "#1 Generate"]
    assert [caption.split(" · ")[2] for caption in captions] == ["from #1", "from #2", "from #1", "a house"]
    tree = shown[handlers.page.history_chains]
    assert tree.splitlines()[2:6] == [
        "#1 Generate · seed 1",
        "├─ #2 Restyle · seed 2",
        "│  └─ #3 Upscale · seed 3",
        "└─ #4 Restyle · seed 4",
    ]
    # A parent no longer in the history is named as such; one result alone is no chain.
    assert session.history_items(history[:1], store, owner="ann")[0][1].startswith(
        "#1 Restyle · seed 4 · from an earlier result")
    assert session.chains_markdown(history[-1:]) == ""


# --- export ---------------------------------------------------------------------------------------


def test_export_downloads_the_session_or_a_chain_served_to_its_designer_only(studio):
    handlers, store = studio
    history = chain_of_four(handlers)
    path = handlers.export_session(history, request("ann")).value["path"]
    first = path
    assert store.link_owner_matches(path, "ann") is True and store.link_owner_matches(path, "bob") is False
    assert str(store.root) not in path and path.endswith("sd-studio-session.zip")
    chain = read_zip(path)
    assert structure([{"id": step.id, "task": step.task, "parent": step.parent} for step in chain.steps][::-1]) == \
        structure(history)

    current = history[1]
    path = handlers.export_chain(history, current, request("ann")).value["path"]
    steps = read_zip(path).steps
    assert [step.task for step in steps] == ["generate", "restyle", "upscale"]
    assert [step.id for step in steps] == [history[3]["id"], history[2]["id"], current["id"]]
    assert not os.path.exists(first)  # the designer's earlier export is gone: one zip on disk each

    with pytest.raises(gr.Error, match="Nothing to export yet"):
        handlers.export_chain(history, current, request("bob"))  # not bob's
    with pytest.raises(gr.Error, match="the session history is empty"):
        handlers.export_session(history, request("bob"))


# --- import ---------------------------------------------------------------------------------------


def test_an_import_is_the_importers_with_the_same_chain(studio, tmp_path):
    handlers, store = studio
    history = chain_of_four(handlers)
    data = export_zip(history, lambda result_id: store.path(result_id, owner="ann").read_bytes())
    dropped = tmp_path / "session.zip"
    dropped.write_bytes(data)
    page = handlers.page
    imported = handlers.import_zip([], str(dropped), request("bob"))
    entries = imported[page.history]
    assert imported[page.status] == "Imported 4 results into the session history."
    assert structure(entries) == structure(history)
    assert session.valid_history(entries, store, owner="bob") == entries  # signed for bob, kept as his
    assert session.valid_history(entries, store, owner="ann") == []
    for theirs, ours in zip(entries, history):
        assert pixels_hash(store.path(theirs["id"], owner="bob").read_bytes()) == \
            pixels_hash(store.path(ours["id"], owner="ann").read_bytes())
        assert theirs["parameters"] == ours["parameters"]
    assert "├─ #2 Restyle" in imported[page.history_chains]
    # Imported again on top of what bob had: added to his history, newest first.
    again = handlers.import_zip(entries[:1], str(dropped), request("bob"))[page.history]
    assert len(again) == 5 and again[-1] == entries[0]

    results, api_entries = handlers.api_import(str(dropped), request("carol"))
    assert structure(api_entries) == structure(history) and len(results) == 4
    assert results[0][1].startswith("#4 Restyle") and "from #1" in results[0][1]


def test_an_import_refuses_what_the_reader_refuses_naming_the_limit(studio, tmp_path):
    handlers, store = studio
    assert app_module.IMPORT_LIMITS.zip_bytes == MAX_UPLOAD_BYTES  # what the page's upload takes at most
    huge = tmp_path / "huge.zip"
    with open(huge, "wb") as file:  # sparse: nothing of it is read
        file.truncate(MAX_UPLOAD_BYTES + 1)
    with pytest.raises(gr.Error, match=f"at most {MAX_UPLOAD_BYTES:,}"):
        handlers.import_zip([], str(huge), request("ann"))
    outside = tmp_path / "outside.zip"
    with zipfile.ZipFile(outside, "w") as archive:
        archive.writestr(MANIFEST_NAME, "{}")
        archive.writestr("../01-generate.png", b"x")
    with pytest.raises(gr.Error, match=r"points outside the zip"):
        handlers.import_zip([], str(outside), request("ann"))
    with pytest.raises(gr.Error, match="Drop a session or chain export"):
        handlers.api_import(None, request("ann"))
    store.free_bytes = lambda path: 0
    with pytest.raises(gr.Error, match="short of disk space"):
        handlers.import_zip([], str(outside), request("ann"))
    assert store.usage("ann") == (0, 0)


def test_exports_and_imports_count_as_jobs(studio, tmp_path):
    """One designer cannot keep the one exchange slot busy: each export or import is a job in
    their quota of jobs a minute (as the smallest job); others are not held back by it."""
    handlers, store = studio
    history = generate(handlers, [])  # one job
    for _ in range(JOBS_PER_MINUTE - 1):
        handlers.export_session(history, request("ann"))
    with pytest.raises(gr.Error, match=f"You have sent {JOBS_PER_MINUTE} jobs in the last minute"):
        handlers.export_session(history, request("ann"))
    dropped = tmp_path / "one.zip"
    dropped.write_bytes(export_zip(history, lambda result_id: store.path(result_id, owner="ann").read_bytes()))
    with pytest.raises(gr.Error, match="jobs in the last minute"):
        handlers.import_zip([], str(dropped), request("ann"))
    assert len(handlers.import_zip([], str(dropped), request("bob"))[handlers.page.history]) == 1


def test_the_page_wires_lineage_export_and_import(built):
    """The named API `/import`, one exchange at a time; each image tab's sent id forgotten on an
    upload or a clear in it."""
    demo, handlers, _ = built
    page = handlers.page
    functions = list(demo.fns.values())
    [imports] = [fn for fn in functions if fn.api_name == "import"]
    assert imports.concurrency_limit == 1 and imports.concurrency_id == "exchange"
    assert {fn.concurrency_id for fn in functions if fn.name in ("import_zip", "export_session", "export_chain")} == \
        {"exchange"}
    for name, panel in page.panels.items():
        if panel.sent is None or panel.mask_preview is not None:
            # Generate takes no image; Gradio's editor says "upload" for an image the server puts
            # there too, so Erase relies on the pixel check alone (test_another_image_in_the_tab...).
            assert not TASKS[name].takes_image or TASKS[name].takes_mask
            continue
        forgets = [fn for fn in functions if [output._id for output in fn.outputs] == [panel.sent._id]]
        targets = {tuple(target) for fn in forgets for target in fn.targets}
        assert {(panel.source._id, "upload"), (panel.source._id, "clear")} <= targets
