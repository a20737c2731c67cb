"""The studio facing the public: what an upload, a forged history or a crafted PNG can cost it.

Uploads are bounded before anything is decoded (a dropped PNG's parameters are read from its
chunks, never its pixels, and what was dropped is never kept as it came); the results store
keeps a quota per owner, written atomically; a forged history or parameters chunk is a clear
refusal at a bounded cost. The property tests at the end run quickly by default; set
HYPOTHESIS_PROFILE=long for a longer search.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import tracemalloc
import zlib

import gradio as gr
import pytest
from PIL import Image, ImageFile
from sdserve import files as sdserve_files
from sdserve.images import MAX_SIDE as ENDPOINT_MAX_SIDE

from studio import metadata, session, signing
from studio import store as store_module
from studio.errors import StudioError
from studio.metadata import (
    MAX_PARAMETERS_BYTES,
    MAX_PNG_HEAD_BYTES,
    PngMetadataError,
    parameters_from_png,
    read_parameters,
    read_png_head,
)
from studio.results import GenerationResult
from studio.store import OWNERS_DIR, ResultStore, owner_key
from studio.tasks import TASKS
from studio.ui import bounded_upload

from .samples import png_with_parameters

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # until requirements.txt pins it: the property tests are skipped, the rest run
    given = None

GENERATE = {"model": "sd_base", "seed": 42, "prompt": "a lighthouse", "width": 512, "height": 512}


# --- PNGs built chunk by chunk ------------------------------------------------------------------


def chunk(kind: bytes, data: bytes, crc: int | None = None, length: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data) if length is None else length) + kind + data + struct.pack(">I", crc)


def ihdr(width: int, height: int) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def text_chunk(text: str, key: str = "parameters") -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))


def crafted_png(width: int, height: int, *chunks: bytes, idat: bytes = zlib.compress(b"\0" * 64)) -> bytes:
    """A PNG header claiming width x height, the given chunks, and a few bytes of image data."""
    return metadata.PNG_SIGNATURE + ihdr(width, height) + b"".join(chunks) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class CountingStream:
    """A stream that counts the bytes read from it."""

    def __init__(self, data: bytes):
        self.stream, self.count = io.BytesIO(data), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "results")


def folders(store: ResultStore) -> list[str]:
    return sorted(path.name for path in store.root.iterdir() if store_module.ID_PATTERN.fullmatch(path.name))


# --- 2. uploads ---------------------------------------------------------------------------------


def test_parameters_are_read_from_the_chunks_without_decoding_a_pixel(no_decoding):
    png = crafted_png(12000, 12000, text_chunk(json.dumps(GENERATE)))
    tracemalloc.start()
    try:
        assert read_parameters(png) == GENERATE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # the chunks only: nothing the size of 12000 x 12000 pixels
    head = read_png_head(png)
    assert (head.width, head.height) == (12000, 12000)


def test_a_huge_dropped_png_restores_its_parameters_and_keeps_nothing(store, no_decoding):
    png = crafted_png(12000, 12000, text_chunk(json.dumps(GENERATE)))
    tracemalloc.start()
    try:
        entry = session.restore_from_png(store, png, owner="ann")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry == {"id": None, "task": "generate", "parameters": GENERATE, "inputs": {}}
    assert peak < 2 * 1024 * 1024
    assert folders(store) == [] and store.usage("ann") == (0, 0)
    assert session.download_path(entry, store) is None and session.gallery_items([entry], store) == []
    assert session.valid_history([entry], store) == []  # never a history entry


def test_a_dropped_png_is_kept_only_as_its_pixels_and_parameters(store):
    clean = png_with_parameters(GENERATE, extra_text={"Comment": "x" * 1000})
    dropped = clean + b"\0junk" * (1024 * 1024)  # 5 MB after IEND
    entry = session.restore_from_png(store, dropped, owner="ann")
    kept = store.path(entry["id"], owner="ann").read_bytes()
    assert entry["task"] == "generate" and entry["parameters"] == GENERATE
    assert len(kept) < len(clean) and b"junk" not in kept
    assert read_parameters(kept) == GENERATE and Image.open(io.BytesIO(kept)).text == {"parameters": json.dumps(GENERATE)}
    assert Image.open(io.BytesIO(kept)).tobytes() == Image.open(io.BytesIO(clean)).tobytes()
    assert store.usage("ann") == (1, len(kept))


def test_a_drop_over_its_tabs_input_limit_keeps_only_its_parameters(store):
    upscaled = png_with_parameters({"model": "sd_upscale", "seed": 3}, size=(TASKS["upscale"].max_image_side + 8, 8))
    entry = session.restore_from_png(store, upscaled)
    assert entry["id"] is None and entry["task"] == "upscale" and folders(store) == []


@pytest.mark.parametrize("data, words", [
    (b"", "not a PNG"),
    (b"GIF89a" + b"\0" * 100, "not a PNG"),
    (png_with_parameters(None), "no studio parameters"),
    (png_with_parameters({"model": "other"}), "not from a model of this studio"),
    (png_with_parameters(GENERATE)[:40], "cut short"),
])
def test_a_drop_that_restores_nothing_says_why(store, data, words):
    with pytest.raises(StudioError, match=words):
        session.restore_from_png(store, data)
    assert session.entry_from_png(store, data) is None and folders(store) == []


def test_a_drop_can_be_read_from_its_file_reading_only_its_start(store, tmp_path):
    path = tmp_path / "dropped.png"
    path.write_bytes(crafted_png(9000, 9000, text_chunk(json.dumps(GENERATE))) + b"\0" * (8 * 1024 * 1024))
    assert session.restore_from_png(store, str(path))["parameters"] == GENERATE


def test_pil_refuses_what_is_far_larger_than_the_studio_ever_makes():
    assert session.MAX_INPUT_SIDE == 1024 <= ENDPOINT_MAX_SIDE  # the tabs' inputs, from the model table
    assert session.MAX_RESULT_SIDE == 4096  # an upscale of a 1024 px input
    assert Image.MAX_IMAGE_PIXELS == session.MAX_IMAGE_PIXELS == 4096 * 4096
    bomb = crafted_png(6000, 6000)  # more than twice the largest result: refused when opened
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    # Gradio's max_file_size: a studio PNG of the largest size, stored (PNG's worst case), fits.
    assert 4096 * 4096 * 3 < session.MAX_UPLOAD_BYTES < 52 * 1024 * 1024


@pytest.mark.parametrize("data, words", [
    (crafted_png(60000, 60000), "far too large"),
    (crafted_png(1100, 64), "1100×64 px; Restyle accepts at most 1024 px"),
    (b"not an image", "not a readable image"),
])
def test_an_upload_over_its_tabs_limit_is_refused_from_its_header(no_decoding, data, words):
    with pytest.raises(StudioError, match=words):
        session.check_upload(data, TASKS["restyle"].max_image_side, TASKS["restyle"].title)
    assert session.check_upload(crafted_png(1024, 512)) == (1024, 512)


def test_the_tabs_image_inputs_check_the_header_before_gradio_decodes(tmp_path, monkeypatch):
    import copy

    from gradio.data_classes import FileData, ImageData

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    big.write_bytes(crafted_png(30000, 30000))
    Image.new("RGB", (64, 32)).save(small)
    image = bounded_upload(gr.Image(type="pil", image_mode="RGB"), 1024, "Restyle")
    assert image.preprocess(ImageData(path=str(small), orig_name="small.png")).size == (64, 32)
    editor = bounded_upload(gr.ImageEditor(type="pil", image_mode="RGBA"), 1024, "Erase")

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(gr.Error, match="far too large: Restyle"):
        image.preprocess(ImageData(path=str(big), orig_name="big.png"))
    with pytest.raises(gr.Error, match="far too large: Restyle"):
        copy.deepcopy(image).preprocess(ImageData(path=str(big), orig_name="big.png"))  # a session's copy
    with pytest.raises(gr.Error, match="far too large: Erase"):
        editor.convert_and_format_image(FileData(path=str(big), orig_name="big.png"))
    with pytest.raises(gr.Error, match="far too large: Erase"):
        editor.convert_and_format_image(big.read_bytes())


def test_the_tabs_use_the_bounded_inputs():
    from studio import ui

    with gr.Blocks():
        panels = {name: ui.task_panel(task) for name, task in TASKS.items()}
    for name, panel in panels.items():
        for component in [*panel.api_images.values(), panel.source]:
            if component is not None:
                assert type(component) in (gr.Image, gr.ImageEditor)  # the same components in the page
                assert component.max_upload_side == TASKS[name].max_image_side


# --- 3. the results store: a quota per owner, atomic writes ------------------------------------


def pngs(count: int, size=(8, 8)) -> list[bytes]:
    return [png_with_parameters(None, size=size, color=(index % 256, index // 256, 7)) for index in range(count)]


def test_each_owner_is_pruned_on_its_own_oldest_first(tmp_path):
    store = ResultStore(tmp_path, max_items=3)
    ann = [store.save(png, "a", owner="ann") for png in pngs(2)]
    bob = [store.save(png, "b", owner="bob") for png in pngs(12)[2:]]  # ten free saves
    assert all(store.path(result_id, owner="ann") for result_id in ann), "another owner's saves remove none of ann's"
    assert [store.path(result_id, owner="bob") is not None for result_id in bob] == [False] * 7 + [True] * 3
    assert store.usage("ann")[0] == 2 and store.usage("bob")[0] == 3


def test_saving_again_makes_an_image_its_owners_newest(tmp_path):
    store = ResultStore(tmp_path, max_items=2)
    first, second, third = pngs(3)
    kept = store.save(first, "x", owner="ann")
    store.save(second, "x", owner="ann")
    store.save(first, "x", owner="ann")  # now the newest
    store.save(third, "x", owner="ann")
    assert store.path(kept, owner="ann") is not None and store.usage("ann")[0] == 2


def test_each_owner_has_a_byte_quota(tmp_path):
    images = pngs(4, size=(32, 32))
    size = max(map(len, images))
    store = ResultStore(tmp_path, max_bytes=2 * size + size // 2)
    ids = [store.save(png, "x", owner="ann") for png in images]
    assert [store.path(result_id, owner="ann") is not None for result_id in ids] == [False, False, True, True]
    assert store.usage("ann")[1] <= store.max_bytes
    with pytest.raises(StudioError, match="more than the"):
        ResultStore(tmp_path / "small", max_bytes=10).save(images[0], "x", owner="ann")


def test_an_image_two_owners_keep_stays_until_both_let_it_go(tmp_path):
    store = ResultStore(tmp_path, max_items=1)
    shared, other_a, other_b = pngs(3)
    result_id = store.save(shared, "x", owner="ann")
    assert store.save(shared, "x", owner="bob") == result_id
    store.save(other_a, "x", owner="ann")
    assert store.path(result_id, owner="bob") is not None, "bob still keeps it"
    assert store.path(result_id, owner="ann") is None, "ann let it go"
    store.save(other_b, "x", owner="bob")
    assert store.path(result_id, owner="bob") is None and result_id not in folders(store)


def test_owners_are_stored_as_a_hash_of_their_name(tmp_path):
    store = ResultStore(tmp_path)
    result_id = store.save(pngs(1)[0], "x", owner="../../etc/ann")
    [marker] = (tmp_path / OWNERS_DIR).rglob(result_id)
    assert marker.parent.name == owner_key("../../etc/ann") and "ann" not in str(marker)


def test_the_bookkeeping_survives_a_restart_and_old_images_are_adopted(tmp_path):
    store = ResultStore(tmp_path, max_items=2)
    ann = [store.save(png, "x", owner="ann") for png in pngs(2)]
    legacy = tmp_path / ("a" * 32)  # an image from before owners, and an empty folder a failed save left
    legacy.mkdir()
    (legacy / "old.png").write_bytes(pngs(5)[4])
    (tmp_path / ("b" * 32)).mkdir()
    restarted = ResultStore(tmp_path, max_items=2, max_total_items=3)
    assert restarted.usage("ann") == store.usage("ann")
    assert not (tmp_path / ("b" * 32)).exists()
    restarted.save(pngs(3)[2], "x", owner="bob")  # four images: past the folder's three
    assert "a" * 32 not in folders(restarted), "images without an owner go first"
    assert all(restarted.path(result_id, owner="ann") for result_id in ann)


def test_past_the_folders_limit_the_largest_holders_go_first(tmp_path):
    store = ResultStore(tmp_path, max_items=3, max_total_items=5)
    images = pngs(7)
    small = [store.save(png, "x", owner="small") for png in images[:2]]
    large = [store.save(png, "x", owner="large") for png in images[2:5]]
    store.save(images[5], "x", owner="new")  # six images: the largest holder lets go of its oldest
    assert all(store.path(result_id, owner="small") for result_id in small)
    assert [store.path(result_id, owner="large") is not None for result_id in large] == [False, True, True]
    store.save(images[6], "x", owner="small")  # small and large hold 3 and 2: small is the larger now
    assert store.path(small[0], owner="small") is None and store.usage("large")[0] == 2


def test_concurrent_saves_of_the_same_result_all_succeed_and_the_file_is_whole(tmp_path):
    store = ResultStore(tmp_path)
    png = png_with_parameters(GENERATE, size=(512, 512)) + b"\0" * (2 * 1024 * 1024)  # big enough to be written in parts
    expected = store_module.hashlib.sha256(png).hexdigest()[:32]
    barrier = threading.Barrier(16)
    results, errors, torn = [], [], []
    stop = threading.Event()

    def save(index: int) -> None:
        barrier.wait()
        try:
            results.append(store.save(png, "generate-seed-42.png", owner=f"owner {index % 4}"))
        except Exception as error:  # noqa: BLE001 - every failure is the test's
            errors.append(error)

    def read() -> None:
        while not stop.is_set():
            path = store.path(expected, owner="owner 0")
            if path is not None:
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                if data != png:
                    torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=save, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    reader.join()
    assert errors == [] and results == [expected] * 16 and torn == []
    assert store.path(expected, owner="owner 0").read_bytes() == png
    assert [path.name for path in (tmp_path / expected).iterdir()] == ["generate-seed-42.png"]  # no temporary left
    assert all(store.usage(f"owner {index}")[0] == 1 for index in range(4))


def test_concurrent_saves_of_different_results_by_one_owner_keep_its_quota(tmp_path):
    store = ResultStore(tmp_path, max_items=5)
    images = pngs(40)
    barrier = threading.Barrier(8)

    def save(part: list[bytes]) -> None:
        barrier.wait()
        for png in part:
            store.save(png, "x", owner="ann")

    threads = [threading.Thread(target=save, args=(images[index::8],)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.usage("ann")[0] == 5 and len(folders(store)) == 5


def test_the_store_writes_through_atomic_file(tmp_path, monkeypatch):
    used = []
    original = sdserve_files.atomic_file

    def spy(target, *args, **kwargs):
        used.append(target)
        return original(target, *args, **kwargs)

    monkeypatch.setattr(store_module, "atomic_file", spy)
    result_id = ResultStore(tmp_path).save(pngs(1)[0], "x")
    assert used == [tmp_path / result_id / "x.png"]


# --- 4. cheap to make expensive -----------------------------------------------------------------


def test_a_forged_history_of_200000_entries_is_cut_before_it_is_checked(store, monkeypatch):
    [good] = session.record_result(store, TASKS["generate"], GenerationResult(
        model="sd_base", images=[], png=[png_with_parameters(GENERATE)], parameters=GENERATE))
    read = set()  # the entries whose contents were looked at

    class Watched(dict):
        def __getitem__(self, key):
            read.add(id(self))
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.add(id(self))
            return super().get(key, default)

    forged = [Watched(id="f" * 32, task="generate", parameters={"seed": n}, inputs={}, signature="0" * 64)
              for n in range(200_000)]
    looked_up = []
    keeps = store.keeps
    monkeypatch.setattr(store, "keeps", lambda result_id, owner: looked_up.append(result_id) or keeps(result_id, owner=owner))
    assert session.valid_history([good, *forged], store) == [good]
    # Counted, not timed: at most HISTORY_LIMIT entries are read, whatever the history's length.
    assert len(read) < session.HISTORY_LIMIT and len(looked_up) <= session.HISTORY_LIMIT


@pytest.mark.parametrize("forged", [
    {"task": ["generate"]},  # unhashable: `in TASKS` raised TypeError
    {"task": {"a": 1}},
    {"inputs": {"image": ["x"]}},
    {"inputs": {"../../etc": "a" * 32}},
    {"inputs": []},
    {"parameters": {"prompt": "x" * (MAX_PARAMETERS_BYTES + 1)}},
    {"parameters": {"nested": json.loads("[" * 50 + "]" * 50)}},
    {"id": ["a" * 32]},
    {"signature": None},
    {"signature": "é" * 64},
    {"signature": "0" * 64},  # well-formed, but not the studio's
])
def test_forged_entries_are_dropped_not_raised(store, forged):
    [good] = session.record_result(store, TASKS["generate"], GenerationResult(
        model="sd_base", images=[], png=[png_with_parameters(GENERATE)], parameters=GENERATE))
    assert session.valid_history([{**good, **forged}, good], store) == [good]


def test_a_valid_entry_comes_back_with_only_an_entrys_keys(store):
    [good] = session.record_result(store, TASKS["generate"], GenerationResult(
        model="sd_base", images=[], png=[png_with_parameters(GENERATE)], parameters=GENERATE))
    assert session.valid_history([{**good, "extra": "x" * 100_000}], store) == [good]


def test_a_300_character_seed_makes_a_bounded_file_name_and_no_empty_folder(store):
    parameters = {**GENERATE, "seed": int("9" * 300)}
    [entry] = session.record_result(store, TASKS["generate"], GenerationResult(
        model="sd_base", images=[], png=[png_with_parameters(parameters)], parameters=parameters))
    assert store.path(entry["id"]).name == "generate-seed-unknown.png"
    result_id = store.save(png_with_parameters(None, color=(1, 2, 3)), "generate-seed-" + "9" * 300 + ".png")
    name = store.path(result_id).name
    assert name.startswith("generate-seed-999") and len(name) <= store_module.MAX_NAME_CHARS + len(".png")


def test_a_failed_save_leaves_no_folder_and_the_id_can_be_saved_later(store, monkeypatch):
    png = png_with_parameters(GENERATE)

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(store_module.Path, "write_bytes", full_disk)
        with pytest.raises(OSError):
            store.save(png, "x")
    assert folders(store) == []
    result_id = store.save(png, "x")
    assert store.path(result_id).read_bytes() == png


def test_an_empty_folder_does_not_block_its_id(store):
    png = png_with_parameters(GENERATE)
    result_id = store_module.hashlib.sha256(png).hexdigest()[:32]
    (store.root / result_id).mkdir()
    assert store.save(png, "x") == result_id and store.path(result_id).read_bytes() == png


@pytest.mark.parametrize("text", ["[" * 200_000, "[" * 100_000, "{" * 5000, json.dumps({"p": "x" * 200_000})])
def test_a_parameters_chunk_too_deep_or_too_long_is_a_clear_refusal(text, monkeypatch):
    png = png_with_parameters(None)
    png = png[:33] + text_chunk(text) + png[33:]  # after the header
    assert read_parameters(png) is None
    with pytest.raises(PngMetadataError, match="parameters"):
        parameters_from_png(png)
    if len(text) > MAX_PARAMETERS_BYTES:  # refused before parsing
        monkeypatch.setattr(metadata.json, "loads", lambda *a, **k: pytest.fail("parsed"))
        assert read_parameters(png) is None


def test_compressed_parameters_are_inflated_only_up_to_the_bound():
    bomb = zlib.compress(b" " * (50 * 1024 * 1024), 9)  # 50 MB of spaces in ~50 KB
    png = crafted_png(64, 64, chunk(b"zTXt", b"parameters\0\0" + bomb))
    with pytest.raises(PngMetadataError, match="over"):
        parameters_from_png(png)
    itxt = crafted_png(64, 64, chunk(b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress(json.dumps(GENERATE).encode())))
    assert read_parameters(itxt) == GENERATE


def test_a_chunk_claiming_gigabytes_is_refused_at_the_bound():
    png = metadata.PNG_SIGNATURE + ihdr(64, 64) + struct.pack(">I", 2**31 - 1) + b"tEXt" + b"parameters\0{}"
    stream = CountingStream(png + b"\0" * (3 * MAX_PNG_HEAD_BYTES))
    assert read_parameters(stream) is None and stream.count <= MAX_PNG_HEAD_BYTES
    skipped = metadata.PNG_SIGNATURE + ihdr(64, 64) + struct.pack(">I", 2**31 - 1) + b"zzZz"
    stream = CountingStream(skipped + b"\0" * (3 * MAX_PNG_HEAD_BYTES))
    assert read_parameters(stream) is None and stream.count <= MAX_PNG_HEAD_BYTES


def test_a_damaged_parameters_chunk_is_refused():
    good = text_chunk(json.dumps(GENERATE))
    bad_crc = good[:-4] + bytes(4)
    assert read_parameters(crafted_png(64, 64, bad_crc)) is None
    assert read_parameters(crafted_png(64, 64, good)) == GENERATE


# --- properties ---------------------------------------------------------------------------------
# Fast by default (a fixed set of examples, so a run is repeatable); HYPOTHESIS_PROFILE=long
# searches 3000 examples a test, with no deadline.

if given is None:

    @pytest.mark.skip(reason="hypothesis is not installed: the property tests need it")
    def test_properties_need_hypothesis():
        pass

else:
    PROFILE = settings()  # the profile conftest.py loaded (HYPOTHESIS_PROFILE)

    json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    json_values = st.recursive(
        json_scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
    chunk_types = st.sampled_from([b"IHDR", b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"IEND", b"gAMA", b"eXIf"]) | st.binary(
        min_size=4, max_size=4
    )

    @st.composite
    def png_like(draw) -> bytes:
        """Chunk sequences: real and random types, true and false lengths and CRCs, cut anywhere."""
        parts = [metadata.PNG_SIGNATURE if draw(st.booleans()) else draw(st.binary(max_size=8))]
        if draw(st.booleans()):
            parts.append(ihdr(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))))
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(chunk_types)
            if kind in metadata.TEXT_CHUNKS and draw(st.booleans()):
                body = b"parameters\0" + draw(st.binary(max_size=64) | st.just(json.dumps(GENERATE).encode()))
            else:
                body = draw(st.binary(max_size=64))
            length = draw(st.none() | st.integers(0, 2**32 - 1))
            crc = draw(st.none() | st.integers(0, 2**32 - 1))
            parts.append(chunk(kind, body, crc=crc, length=length))
        data = b"".join(parts)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return data

    @PROFILE
    @given(st.binary(max_size=2048))
    def test_any_bytes_read_as_parameters_or_none(data):
        result = read_parameters(data)
        assert result is None or isinstance(result, dict)

    @PROFILE
    @given(png_like(), st.integers(0, 4 * MAX_PNG_HEAD_BYTES))
    def test_any_chunk_sequence_is_read_within_the_bound(data, padding):
        stream = CountingStream(data + b"\0" * padding)
        try:
            head = read_png_head(stream)
        except PngMetadataError:
            head = None
        assert stream.count <= MAX_PNG_HEAD_BYTES
        assert head is None or head.parameters_text is None or len(head.parameters_text) <= MAX_PARAMETERS_BYTES
        result = read_parameters(data)
        assert result is None or isinstance(result, dict)

    @PROFILE
    @given(st.data())
    def test_a_studio_png_damaged_anywhere_reads_as_parameters_or_none(data):
        png = bytearray(png_with_parameters(GENERATE, size=(16, 16)))
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(png) - 1))
            png[position] = data.draw(st.integers(0, 255))
        png = bytes(png[: data.draw(st.integers(0, len(png)))])
        result = read_parameters(png)
        assert result in (None, GENERATE)  # a change to the parameters fails their CRC

    @PROFILE
    @given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
    def test_parameters_round_trip_within_the_bound(parameters):
        png = metadata.embed_parameters(png_with_parameters(None, size=(4, 4)), parameters)
        assert read_parameters(png) == parameters

    @pytest.fixture(scope="module")
    def shared_store(tmp_path_factory):
        store = ResultStore(tmp_path_factory.mktemp("history"))
        ids = [store.save(png, "x") for png in pngs(3)]
        return store, ids

    def signed_like(store, ids: list[str]):
        """Entries the studio signed (for its default owner), some then changed in any field."""
        signed = st.builds(
            lambda result_id, task, inputs: signing.signed(store.key, store_module.DEFAULT_OWNER, {
                "id": result_id, "task": task, "parameters": {}, "inputs": inputs}),
            st.sampled_from(ids), st.sampled_from(list(TASKS)),
            st.dictionaries(st.sampled_from(["image", "mask"]), st.sampled_from(ids), max_size=2),
        )
        changed = st.tuples(signed, st.sampled_from(["id", "task", "parameters", "inputs", "signature"]),
                            json_values).map(lambda change: {**change[0], change[1]: change[2]})
        return signed | changed

    def entry_like(ids: list[str]):
        return st.fixed_dictionaries(
            {},
            optional={
                "id": st.sampled_from(ids) | json_values,
                "task": st.sampled_from(list(TASKS)) | json_values,
                "parameters": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
                "inputs": st.dictionaries(st.sampled_from(["image", "mask", "x"]), st.sampled_from(ids) | json_values,
                                          max_size=2) | json_values,
                "extra": json_values,
            },
        )

    @PROFILE
    @given(st.data())
    def test_any_history_validates_to_at_most_fifty_valid_entries(shared_store, data):
        store, ids = shared_store
        good = signing.signed(store.key, store_module.DEFAULT_OWNER, {"id": ids[0], "task": "generate",
                                                                     "parameters": {}, "inputs": {}})
        history = data.draw(
            st.lists(entry_like(ids) | signed_like(store, ids) | json_values, max_size=120)
            | json_values
            | st.lists(st.just(good), min_size=51, max_size=300)
        )
        entries = session.valid_history(history, store)
        assert isinstance(entries, list) and len(entries) <= session.HISTORY_LIMIT
        assert session.valid_history(history, store, owner="another designer") == []
        for entry in entries:
            assert set(entry) == {"id", "task", "parameters", "parent", "inputs", "signature"}
            assert signing.signature_matches(store.key, store_module.DEFAULT_OWNER, entry)
            assert entry["task"] in TASKS and store.path(entry["id"]) is not None
            assert isinstance(entry["parameters"], dict) and isinstance(entry["inputs"], dict)
            session.caption(entry)  # shows without raising
        assert session.valid_history(entries, store) == entries
