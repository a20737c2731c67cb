"""Results reachable only by their owner, and disk held in bounds (issue 19).

The history the browser keeps is signed by the server for its designer (studio/signing.py), and
every read of a result (restore, its inputs, the galleries, the download, Send to, before/after,
the named API) names the owner the store must keep it for; the page gets owner-keyed links in
Gradio's cache, never the results folder. Gradio's cache is cleaned; new jobs are refused below
a disk watermark; past the folder's limit the largest holders lose their own images first.

The handlers run in-process, on an app built by build_app; Gradio's file route is reached with
Starlette's TestClient. Nothing here starts a process.
"""

from __future__ import annotations

import json
import stat
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.routes import App
from PIL import Image
from starlette.testclient import TestClient

from studio import app as app_module
from studio import session, signing
from studio.__main__ import parse_args
from studio.access import Access
from studio.errors import StudioError
from studio.results import GenerationResult
from studio.store import DEFAULT_MIN_FREE_BYTES, ResultStore, owner_key
from studio.tasks import TASKS

from .samples import png_with_parameters

GENERATE = {"model": "sd_base", "seed": 42, "prompt": "a lighthouse", "width": 64, "height": 64}


def made(store: ResultStore, owner: str, seed: int = 42, task: str = "generate", inputs=None) -> dict:
    """One entry of `owner`'s, as a job of theirs records it."""
    parameters = {**GENERATE, "seed": seed}
    result = GenerationResult(model="sd_base", images=[], png=[png_with_parameters(parameters, color=(seed % 256, 0, 0))],
                              parameters=parameters)
    [entry] = session.record_result(store, TASKS[task], result, inputs, owner=owner)
    return entry


def request(name: str) -> SimpleNamespace:
    """What a gr.Request of a signed-in designer says about them."""
    return SimpleNamespace(username=name, session_hash=f"hash of {name}", request=None, cookies={}, session=None)


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "results")


@pytest.fixture
def studio(tmp_path, monkeypatch):
    """(demo, its handlers, its store): the studio with password sign-in; its endpoint is never called."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    store = ResultStore(tmp_path / "results")

    def no_endpoint():
        raise AssertionError("the endpoint was called")

    demo = app_module.build_app(no_endpoint, store=store, access=Access("password"))
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "show_history")
    return demo, handlers, store


# --- the history is tamper-proof ------------------------------------------------------------------


def test_another_designers_entry_reads_nothing(store):
    """HEAD: any existing id was accepted from anyone (valid_history and every read took no owner)."""
    image = Image.new("RGB", (64, 64), "red")
    ann = made(store, "ann", inputs={"image": image})
    assert session.valid_history([ann], store, owner="ann") == [ann]
    assert session.valid_history([ann], store, owner="bob") == []
    assert session.restored_inputs(ann, store, owner="bob") == {}
    assert session.gallery_items([ann], store, owner="bob") == []
    assert session.download_path(ann, store, owner="bob") is None
    assert session.result_image(ann, store, owner="bob") is None
    assert session.before_after(ann, store, owner="bob") is None
    assert store.path(ann["id"], owner="bob") is None and store.open(ann["id"], owner="bob") is None
    # ...and the same reads as ann find it all.
    assert session.restored_inputs(ann, store, owner="ann")["image"].tobytes() == image.tobytes()
    assert session.result_image(ann, store, owner="ann").size == (64, 64)
    assert session.before_after(ann, store, owner="ann") is not None


def test_an_entry_naming_an_id_its_designer_keeps_needs_the_studios_signature(store):
    """BrowserState's key is in the page: an entry written in the browser, or one whose id or
    inputs were swapped for another designer's, is refused even when the store keeps the ids."""
    ann, bob = made(store, "ann", seed=1), made(store, "bob", seed=2)
    store.save(store.path(bob["id"], owner="bob").read_bytes(), "x", owner="ann")  # ann keeps bob's image too
    unsigned = {key: value for key, value in ann.items() if key != signing.SIGNATURE_FIELD}
    forged = [
        unsigned,
        {**ann, "id": bob["id"]},
        {**ann, "inputs": {"image": bob["id"]}},
        {**ann, "task": "upscale"},
        {**bob},  # signed, but for bob
        signing.signed(b"\0" * signing.KEY_BYTES, "ann", unsigned),  # signed with another key
    ]
    assert session.valid_history([*forged, ann], store, owner="ann") == [ann]
    assert all(session.download_path(entry, store, owner="ann") is None for entry in forged)
    assert session.valid_history([{**ann, "parameters": {"prompt": "mine now"}}], store, owner="ann") != []  # see signing.py


def test_the_signing_key_stays_on_the_server_and_survives_a_restart(tmp_path, studio):
    demo, _, store = studio
    path = signing.key_path(store.root)
    assert path.parent == store.root.parent and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.key.hex() not in json.dumps(demo.get_config_file(), default=str)
    entry = made(store, "ann")
    assert session.valid_history([entry], ResultStore(store.root), owner="ann") == [entry]


def test_the_pages_reads_check_the_designer(studio):
    _, handlers, store = studio
    source = Image.new("RGB", (64, 64), "blue")
    ann = session.with_inputs(store, [made(store, "ann", task="restyle")],
                              session.keep_inputs(store, TASKS["restyle"], {"image": source}, owner="ann"), owner="ann")
    history = [*ann]
    shown = handlers.show_history(history, request("bob"))
    assert shown[handlers.page.history] == [] and shown[handlers.page.history_gallery] == []
    picked = gr.SelectData(None, {"index": 0, "value": None})
    assert handlers.pick_from_history(history, picked, request("bob")) == {}
    send = handlers.send_to(handlers.page.panels["upscale"])
    with pytest.warns(UserWarning, match="Nothing to send yet"):  # gr.Warning, outside an event
        assert send(ann[0], request("bob")) == {}
    # The owner gets it all back, as before.
    shown = handlers.show_history(history, request("ann"))
    assert shown[handlers.page.history] == history and len(shown[handlers.page.history_gallery]) == 1
    restored = handlers.pick_from_history(history, picked, request("ann"))
    panel = handlers.page.panels["restyle"]
    assert restored[panel.source].tobytes() == source.tobytes() and restored[panel.download].value is not None
    sent = send(ann[0], request("ann"))
    assert sent[handlers.page.panels["upscale"].source].size == (64, 64)


class Endpoint:
    """A client whose every call makes one small image of its own, its parameters embedded as the
    endpoint does."""

    calls = 0

    def invoke(self, model, inputs, gen_args, **options):
        Endpoint.calls += 1
        parameters = {"model": model, "seed": Endpoint.calls, "seeds": [Endpoint.calls]}
        png = png_with_parameters(parameters, size=(64, 64), color=(Endpoint.calls % 256, 0, 0))
        return GenerationResult(model=model, images=[], png=[png], parameters=parameters)


def test_a_run_records_signed_entries_with_their_inputs_and_keeps_the_history(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    store = ResultStore(tmp_path / "results")
    demo = app_module.build_app(Endpoint, store=store, access=Access("password"))
    handlers = next(fn.fn.__self__ for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "show_history")
    page, panel = handlers.page, handlers.page.panels["restyle"]
    run = handlers.run(panel)
    source = Image.new("RGB", (64, 64), "green")
    first = list(run([], source, request("ann"), prompt="a watercolor"))[-1][page.history]
    [entry] = first
    assert set(entry) == {"id", "task", "parameters", "parent", "inputs", "signature"} and entry["task"] == "restyle"
    assert session.restored_inputs(entry, store, owner="ann")["image"].tobytes() == source.tobytes()
    second = list(run(first, source, request("ann"), prompt="an oil painting"))[-1]
    assert second[page.history][1:] == first  # the earlier entry stays, as it was
    assert [path for path, _ in second[page.history_gallery]] == [
        session.download_path(item, store, owner="ann") for item in second[page.history]]
    third = list(run(first, source, request("bob"), prompt="bob's"))[-1][page.history]
    assert len(third) == 1 and third[0]["id"] != entry["id"]  # ann's entry is not bob's history
    assert session.valid_history(third, store, owner="bob") == third


def test_a_dropped_png_restores_into_the_droppers_own_results(studio):
    _, handlers, store = studio
    restored = handlers.open_png(png_with_parameters(GENERATE), request("ann"))
    entry = restored[handlers.page.panels["generate"].current]
    assert session.valid_history([entry], store, owner="ann") == [entry]
    assert session.valid_history([entry], store, owner="bob") == []


# --- URLs name links, not the results folder ---------------------------------------------------------


def test_the_page_gets_owner_keyed_links_and_gradio_never_serves_the_results_folder(studio):
    """HEAD: gr.set_static_paths(results folder), so /gradio_api/file=<absolute results path> served
    any result to anyone, and the page's URLs showed that path."""
    demo, handlers, store = studio
    entry = made(store, "ann")
    [(link, _)] = session.gallery_items([entry], store, owner="ann")
    assert str(store.root) not in link and link.startswith(gr.utils.get_upload_folder())
    assert entry["id"] in link and signing.link_token(store.key, owner_key("ann"), entry["id"]) in link
    assert session.gallery_items([entry], store, owner="ann")[0][0] == link  # the same link each time
    assert store.link_owner_matches(link, "ann") is True and store.link_owner_matches(link, "bob") is False
    assert store.link_owner_matches(store.path(entry["id"], owner="ann"), "ann") is None
    assert stat.S_IMODE(store.links_dir.stat().st_mode) == 0o700

    gallery = handlers.page.history_gallery
    shown = gr.processing_utils.move_files_to_cache(gallery.postprocess([(link, "x")]), gallery, postprocess=True)
    url = shown[0]["image"]["url"]
    assert url == f"/gradio_api/file={link}" and str(store.root) not in url  # Gradio serves the link, no copy

    with TestClient(App.create_app(demo)) as client:
        served = client.get(url)
        assert served.status_code == 200 and served.content == store.path(entry["id"], owner="ann").read_bytes()
        assert client.get(f"/gradio_api/file={store.path(entry['id'], owner='ann')}").status_code == 403


def test_a_link_goes_with_its_owners_image_and_comes_back_after_gradio_cleans_it(store):
    ann = made(store, "ann", seed=1)
    link = store.link(ann["id"], owner="ann")
    link.unlink()  # what Gradio's cache cleaning does
    assert store.link(ann["id"], owner="ann") == link and link.is_file()
    small = ResultStore(store.root, max_items=1, key=store.key)
    small.links_dir = store.links_dir
    small.save(png_with_parameters({**GENERATE, "seed": 2}), "x", owner="ann")  # ann lets the first go
    assert not link.exists() and small.link(ann["id"], owner="ann") is None


def test_a_url_handed_out_before_a_restart_opens_again_for_its_owner_only(tmp_path):
    """A restarted studio removes the links an earlier run left (serve_links_in); the URL a
    designer's page or script still holds is made again when its owner fetches it."""
    before = ResultStore(tmp_path / "results")
    before.serve_links_in(tmp_path / "links")
    ann = made(before, "ann", seed=3)
    link = before.link(ann["id"], owner="ann")
    after = ResultStore(tmp_path / "results", key=before.key)
    after.serve_links_in(tmp_path / "links")
    assert not link.exists()
    assert after.link_owner_matches(link, "bob") is False and not link.exists()  # nothing made for another
    assert after.link_owner_matches(link, "ann") is True
    assert link.read_bytes() == after.path(ann["id"], owner="ann").read_bytes()


# --- disk in bounds -----------------------------------------------------------------------------------


def test_gradios_cache_is_cleaned(studio):
    """HEAD: delete_cache unset, so uploads and Gradio's copies were never removed."""
    demo, _, _ = studio
    assert demo.delete_cache == (app_module.CACHE_CLEAN_EVERY_S, app_module.CACHE_MAX_AGE_S)
    assert app_module.CACHE_CLEAN_EVERY_S < app_module.CACHE_MAX_AGE_S <= 24 * 3600


def test_below_the_disk_watermark_new_jobs_are_refused_in_words(studio, tmp_path):
    _, handlers, store = studio
    low = ResultStore(tmp_path / "low", min_free_bytes=2 * 2**30, free_bytes=lambda path: 2**30)
    with pytest.raises(StudioError, match=r"short of disk space \(1.0 GB free; it keeps at least 2.0 GB free\)"):
        low.check_room()
    ResultStore(tmp_path / "ok", min_free_bytes=2**30, free_bytes=lambda path: 2**30).check_room()
    store.free_bytes = lambda path: 0
    with pytest.raises(gr.Error, match="short of disk space") as refused:
        handlers.api(TASKS["generate"])(request=request("ann"), prompt="a house")
    assert str(store.root) not in str(refused.value)


def test_the_watermark_is_a_flag_with_an_environment_variable(monkeypatch):
    endpoint = ["--endpoint-url", "http://127.0.0.1:9"]
    monkeypatch.delenv("STUDIO_MIN_FREE_DISK_MB", raising=False)
    assert parse_args(endpoint).min_free_disk_mb == DEFAULT_MIN_FREE_BYTES // 2**20 == 2048
    assert parse_args([*endpoint, "--min-free-disk-mb", "10"]).min_free_disk_mb == 10
    monkeypatch.setenv("STUDIO_MIN_FREE_DISK_MB", "500")
    assert parse_args(endpoint).min_free_disk_mb == 500


def blob(owner: int, index: int, size: int) -> bytes:
    """`size` bytes no other call makes (the store keeps bytes; what they are does not matter here)."""
    head = f"{owner}:{index}:".encode()
    return head + b"\0" * (size - len(head))


def test_a_flood_of_new_accounts_loses_its_own_images_not_the_established_designers(tmp_path):
    """HEAD: past the folder's limit the least recently active owners went first, so 20 new
    accounts filling their quotas pushed out everyone else's results. Scaled down: 1 KB images,
    a 10 KB quota per owner, a 100 KB folder (20 quotas fill it twice over)."""
    store = ResultStore(tmp_path / "results", max_bytes=10 * 1024, max_total_bytes=100 * 1024)
    established = {f"designer {n}": [store.save(blob(n, i, 1024), "x", owner=f"designer {n}") for i in range(4)]
                   for n in range(3)}
    for account in range(20):
        for index in range(10):  # each fills its quota
            store.save(blob(100 + account, index, 1024), "x", owner=f"new account {account}")
    for owner, ids in established.items():
        assert all(store.path(result_id, owner=owner) for result_id in ids), f"{owner} lost images"
    used = [store.usage(owner)[1] for owner in [*established, *(f"new account {n}" for n in range(20))]]
    assert sum(used) <= store.max_total_bytes
    flood = used[len(established):]
    assert max(flood) - min(flood) <= 1024  # leveled: each new account kept about the same share
