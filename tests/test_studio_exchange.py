"""The session export format (studio/exchange.py): a chain with a branch goes out and comes back
the same, twice the same bytes; hostile zips are refused by their records, before anything is
decompressed or decoded, with memory held (tracemalloc), each refusal naming its limit."""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import io
import json
import re
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from studio.exchange import (
    MANIFEST_NAME,
    MAX_MEMBERS,
    MAX_PNG_BYTES,
    ExchangeError,
    Limits,
    decode_png,
    export_zip,
    import_entries,
    lineage,
    read_zip,
)
from studio.metadata import image_to_png, read_parameters
from studio.session import MAX_RESULT_SIDE
from studio.store import ResultStore
from studio.tasks import TASKS

from .samples import bomb_png_b64

# What a refusal may hold at its peak: the bombs unpack to a gigabyte, a hundred thousand
# members to as many objects; refused from their records, they cost next to nothing.
REFUSAL_PEAK_BYTES = 8 * 1024 * 1024


# --- a chain as the studio keeps it ------------------------------------------------------------


def parameters_for(task: str, seed: int, size: tuple[int, int]) -> dict:
    parameters = {"model": TASKS[task].model, "prompt": f"{task} {seed}", "seed": seed,
                  "num_inference_steps": 2, "width": size[0], "height": size[1]}
    if TASKS[task].tool is not None:
        parameters["task"] = task
    return parameters


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


class Store:
    """The images by id, as ResultStore names them (the first 32 hex digits of the SHA-256)."""

    def __init__(self) -> None:
        self.pngs: dict[str, bytes] = {}

    def save(self, png: bytes) -> str:
        result_id = hashlib.sha256(png).hexdigest()[:32]
        self.pngs[result_id] = png
        return result_id


def make(store: Store, task: str, seed: int, size: tuple[int, int], parent: dict | None = None,
         mask: bool = False) -> dict:
    """An entry as the studio records it, with its parent's result as its input image."""
    inputs = {}
    if parent is not None:
        inputs["image"] = store.save(image_to_png(decode_png(store.pngs[parent["id"]])))
        if mask:
            painted = Image.new("L", size, 0)
            painted.paste(255, (8, 8, 24, 24))
            inputs["mask"] = store.save(image_to_png(painted))
    png = image_to_png(noise(size, seed), parameters_for(task, seed, size))
    return {"id": store.save(png), "task": task, "parameters": parameters_for(task, seed, size),
            "parent": parent["id"] if parent else None, "inputs": inputs}


@pytest.fixture
def chain():
    """generate -> erase -> extend, and a branch from the generate: restyle -> upscale. The
    history, newest first."""
    store = Store()
    generated = make(store, "generate", 1, (64, 64))
    erased = make(store, "erase", 2, (64, 64), generated, mask=True)
    extended = make(store, "extend", 3, (96, 64), erased)
    restyled = make(store, "restyle", 4, (64, 64), generated)
    upscaled = make(store, "upscale", 5, (256, 256), restyled)
    return store, [upscaled, restyled, extended, erased, generated]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode_png(png))


def test_a_chain_with_a_branch_comes_back_the_same(chain):
    store, history = chain
    data = export_zip(history, store.pngs.get)
    assert export_zip(history, store.pngs.get) == data  # deterministic: the same chain, the same bytes
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert names == [MANIFEST_NAME, "01-generate.png", "02-erase.png", "02-erase-image.png", "02-erase-mask.png",
                     "03-extend.png", "03-extend-image.png", "04-restyle.png",  # its input is the erase's
                     "05-upscale.png", "05-upscale-image.png"]

    read = read_zip(data)
    oldest_first = history[::-1]
    assert [step.task for step in read.steps] == ["generate", "erase", "extend", "restyle", "upscale"]
    assert [step.id for step in read.steps] == [entry["id"] for entry in oldest_first]
    assert [step.parent for step in read.steps] == [entry["parent"] for entry in oldest_first]
    for step, entry in zip(read.steps, oldest_first):
        assert step.parameters == entry["parameters"] == read_parameters(step.png)
        assert np.array_equal(pixels(step.png), pixels(store.pngs[entry["id"]]))
        assert set(step.inputs) == set(entry["inputs"])
        for name, input_id in entry["inputs"].items():
            assert np.array_equal(pixels(step.inputs[name]), pixels(store.pngs[input_id]))
    assert decode_png(read.step(history[3]["id"]).inputs["mask"]).mode == "L"


def test_an_import_is_saved_as_the_importers_with_its_links_on_the_new_ids(chain, tmp_path):
    store, history = chain
    results = ResultStore(tmp_path / "results")
    entries = import_entries(read_zip(export_zip(history, store.pngs.get)),
                             lambda png, name: results.save(png, name, owner="importer"))
    assert [entry["task"] for entry in entries] == ["upscale", "restyle", "extend", "erase", "generate"]
    by_task = {entry["task"]: entry for entry in entries}
    assert by_task["generate"]["parent"] is None
    assert by_task["erase"]["parent"] == by_task["restyle"]["parent"] == by_task["generate"]["id"]
    assert by_task["extend"]["parent"] == by_task["erase"]["id"]
    assert by_task["upscale"]["parent"] == by_task["restyle"]["id"]
    for entry in entries:
        assert read_parameters(results.path(entry["id"], owner="importer").read_bytes()) == entry["parameters"]
        assert all(results.path(input_id, owner="importer") is not None for input_id in entry["inputs"].values())
    assert results.usage("importer")[0] == 5 + 4  # the results and their inputs (a shared one once)
    # Exported again from the importer's store: the same chain.
    again = read_zip(export_zip(entries, lambda result_id: results.path(result_id, owner="importer").read_bytes()))
    assert [(step.task, step.parameters) for step in again.steps] == \
           [(entry["task"], entry["parameters"]) for entry in entries[::-1]]


def test_a_chain_is_a_result_and_its_ancestors_only(chain):
    store, history = chain
    upscaled, restyled, _, _, generated = history
    assert [entry["id"] for entry in lineage(history, upscaled["id"])] == \
           [upscaled["id"], restyled["id"], generated["id"]]
    read = read_zip(export_zip(lineage(history, upscaled["id"]), store.pngs.get))
    assert [step.task for step in read.steps] == ["generate", "restyle", "upscale"]
    assert lineage(history, "0" * 32) == []
    looped = [{**generated, "parent": upscaled["id"]}, *history[:-1]]  # a forged history that loops
    assert len(lineage(looped, upscaled["id"])) == 3


def test_a_step_whose_image_is_gone_is_left_out_and_its_child_starts_the_chain(chain):
    store, history = chain
    upscaled, restyled = history[0], history[1]
    gone = {**store.pngs}
    del gone[restyled["id"]]
    read = read_zip(export_zip(history, gone.get))
    assert restyled["id"] not in {step.id for step in read.steps}
    assert read.step(upscaled["id"]).parent is None
    assert "image" in read.step(upscaled["id"]).inputs  # what replay feeds it instead


def test_a_forged_history_exports_a_chain_that_reads(chain):
    """The history comes back from the browser: parents of any type, in a loop, inputs of any kind."""
    store, history = chain
    upscaled, restyled, extended, erased, generated = history
    forged = [{**upscaled, "parent": ["x"]}, {**restyled, "parent": extended["id"]},
              {**extended, "parent": restyled["id"], "inputs": {"image": {"id": 1}, "other": erased["id"]}},
              {**erased, "inputs": "none"}, "not an entry", {**generated, "id": "../../etc"}]
    read = read_zip(export_zip(forged, store.pngs.get))
    # Oldest first, each as soon as its parent is placed; the loop cut at its first step.
    assert [step.task for step in read.steps] == ["erase", "upscale", "extend", "restyle"]
    assert [step.parent for step in read.steps] == [None, None, None, extended["id"]]
    assert read.step(erased["id"]).inputs == {} and read.step(extended["id"]).inputs == {}


def test_an_export_over_the_steps_an_import_takes_is_refused():
    store = Store()
    history = [make(store, "generate", seed, (64, 64)) for seed in range(51)]
    with pytest.raises(ExchangeError, match="at most 50 steps; this one has 51"):
        export_zip(history, store.pngs.get)


# --- hostile zips ---------------------------------------------------------------------------------


def refused(data, match: str, limits: Limits | None = None) -> None:
    """read_zip refuses `data` with a message matching `match`, its memory held."""
    tracemalloc.start()
    try:
        with pytest.raises(ExchangeError, match=match):
            read_zip(data, limits) if limits else read_zip(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < REFUSAL_PEAK_BYTES, f"refusing it held {peak:,} bytes"


def raw_zip(members: list[tuple[str, int, bytes, int, int]], *, listed_count: int | None = None) -> bytes:
    """A zip written record by record: (name, method, packed bytes, CRC, unpacked size) a member,
    as declared (so a test can declare what it likes); ZIP64 end records past 65,535 members."""
    local, directory, offset = [], [], 0
    for name, method, packed, crc, size in members:
        encoded = name.encode()
        header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(packed), size,
                             len(encoded), 0) + encoded
        directory.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x031E, 20, 0, method, 0, 0x21, crc,
                                     len(packed), size, len(encoded), 0, 0, 0, 0, 0o644 << 16, offset) + encoded)
        local += [header, packed]
        offset += len(header) + len(packed)
    central = b"".join(directory)
    count = len(members) if listed_count is None else listed_count
    tail = b""
    if count > 0xFFFF:
        zip64_at = offset + len(central)
        tail = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), offset)
        tail += struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_at, 1)
        count = 0xFFFF
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), offset, 0)
    return b"".join(local) + central + tail + end


def zeros_deflated(megabytes: int) -> bytes:
    """`megabytes` MB of zeros as one raw deflate stream, built from one compressed block (after a
    full flush the compressor starts afresh, so every further block is the same bytes)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    megabyte = bytes(1 << 20)
    first = compressor.compress(megabyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(megabyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * (megabytes - 2) + block + compressor.flush()


def zeros_crc(megabytes: int) -> int:
    crc, megabyte = 0, bytes(1 << 20)
    for _ in range(megabytes):
        crc = zlib.crc32(megabyte, crc)
    return crc


def test_the_zeros_stream_is_what_it_says():
    packed = zeros_deflated(4)
    assert zlib.decompress(packed, -15) == bytes(4 << 20) and zlib.crc32(bytes(4 << 20)) == zeros_crc(4)


def test_a_zip_bomb_is_refused_by_its_declared_size():
    gigabyte = 1024
    bomb = raw_zip([("01-generate.png", zipfile.ZIP_DEFLATED, zeros_deflated(gigabyte), zeros_crc(gigabyte),
                     gigabyte << 20)])
    assert len(bomb) < 2 << 20
    refused(bomb, re.escape(f"01-generate.png unpacks to 1,073,741,824 bytes; a PNG of a session export is at most "
                            f"{MAX_PNG_BYTES:,}."))


def test_a_member_packed_tighter_than_a_session_export_is_refused():
    bomb = raw_zip([("01-generate.png", zipfile.ZIP_DEFLATED, zeros_deflated(8), zeros_crc(8), 8 << 20)])
    refused(bomb, r"01-generate.png unpacks to 8,388,608 bytes from [\d,]+, more than 100:1")


def test_a_header_that_understates_the_size_lets_no_more_through():
    """The directory and the manifest give a real PNG's size and checksum, and a fair ratio; the
    stream inflates to 64 MB of zeros. Reading stops at the declared size, and the member is damaged."""
    png = result_png("generate", 1)
    manifest = manifest_for({"01-generate.png": png}, [step("a" * 32, "generate", "01-generate.png")])
    bomb = raw_zip([(MANIFEST_NAME, zipfile.ZIP_STORED, manifest, zlib.crc32(manifest), len(manifest)),
                    ("01-generate.png", zipfile.ZIP_DEFLATED, zeros_deflated(64), zlib.crc32(png), len(png))])
    refused(bomb, r"The zip's member 01-generate.png is damaged \(Bad CRC-32")


@pytest.mark.parametrize("name, words", [
    ("../x.png", r"points outside the zip \(\.\.\)"),
    ("steps/../../x.png", r"points outside the zip"),
    ("/etc/x.png", "has an absolute path"),
    ("C:\\x.png", "has an absolute path"),
    ("steps/", r"holds a folder \(steps/\)"),
    ("steps/01-generate.png", "is in a folder"),
    ("01-generate.exe", "is not a file of a session export"),
])
def test_paths_outside_the_zip_and_folders_are_refused(name, words):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo(name), b"x")
    refused(buffer.getvalue(), words)


def test_a_hundred_thousand_members_are_refused_before_the_directory_is_read():
    members = [(f"{index:06d}.png", zipfile.ZIP_STORED, b"", 0, 0) for index in range(100_000)]
    crowded = raw_zip(members)
    with zipfile.ZipFile(io.BytesIO(crowded)) as archive:  # a real zip: zipfile reads all of them
        assert len(archive.infolist()) == 100_000
    refused(crowded, re.escape(f"The zip has 100,000 members; a session export has at most {MAX_MEMBERS:,}."))
    # The end record says 3; the directory is what is too large.
    refused(raw_zip(members, listed_count=3), r"The zip's directory is [\d,]+ bytes; a session export's is at most")


def test_one_member_over_the_count_is_refused_too():
    members = [(f"{index:03d}.png", zipfile.ZIP_STORED, b"", 0, 0) for index in range(MAX_MEMBERS + 1)]
    refused(raw_zip(members), f"has {MAX_MEMBERS + 1} members; a session export has at most {MAX_MEMBERS}")


def test_a_png_bomb_inside_is_refused_from_its_header():
    bomb = base64.b64decode(bomb_png_b64(100_000, 100_000))
    bomb = with_parameters(bomb, parameters_for("generate", 1, (100_000, 100_000)))
    data = zip_of({"01-generate.png": bomb}, [step("a" * 32, "generate", "01-generate.png",
                                                   parameters=parameters_for("generate", 1, (100_000, 100_000)))])
    refused(data, re.escape(f"01-generate.png is 100,000×100,000 px; a result of the studio is at most "
                            f"{MAX_RESULT_SIDE:,} px a side."))


def test_an_input_over_its_tabs_side_is_refused():
    large = image_to_png(Image.new("RGB", (1100, 64)))
    result = result_png("restyle", 1)
    data = zip_of({"01-restyle.png": result, "01-restyle-image.png": large},
                  [step("a" * 32, "restyle", "01-restyle.png", inputs={"image": "01-restyle-image.png"})])
    refused(data, re.escape("01-restyle-image.png is 1,100×64 px; Restyle's input is at most 1,024 px a side."))


# --- manifests that lie -------------------------------------------------------------------------------


def result_png(task: str, seed: int, size=(64, 64)) -> bytes:
    return image_to_png(noise(size, seed), parameters_for(task, seed, size))


def with_parameters(png: bytes, parameters: dict) -> bytes:
    """The PNG with a parameters chunk put right after its header (no decoding: it may be a bomb)."""
    text = b"parameters\0" + json.dumps(parameters).encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    return png[:33] + chunk + png[33:]


def step(step_id: str, task: str, file: str, *, parent: str | None = None, inputs: dict | None = None,
         parameters: dict | None = None, seed: int = 1) -> dict:
    return {"id": step_id, "task": task, "parameters": parameters or parameters_for(task, seed, (64, 64)),
            "parent": parent, "file": file, "inputs": inputs or {}}


def manifest_for(files: dict[str, bytes], steps: list[dict], **changes) -> bytes:
    manifest = {"format": "sd-studio-chain", "version": 1, "steps": steps,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}
    return json.dumps({**manifest, **changes}).encode()


def zip_of(files: dict[str, bytes], steps: list[dict], *, manifest: bytes | None = None, **changes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(MANIFEST_NAME, manifest if manifest is not None else manifest_for(files, steps, **changes))
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def two_steps(**second) -> tuple[dict, list[dict]]:
    files = {"01-generate.png": result_png("generate", 1), "02-restyle.png": result_png("restyle", 2)}
    steps = [step("a" * 32, "generate", "01-generate.png"),
             {**step("b" * 32, "restyle", "02-restyle.png", parent="a" * 32, seed=2), **second}]
    return files, steps


def test_the_minimal_two_steps_are_read():
    files, steps = two_steps()
    assert [s.parent for s in read_zip(zip_of(files, steps)).steps] == [None, "a" * 32]


def test_a_manifest_that_lies_about_a_size_is_refused():
    files, steps = two_steps()
    listed = json.loads(manifest_for(files, steps))
    listed["files"]["02-restyle.png"]["bytes"] += 1
    refused(zip_of(files, steps, manifest=json.dumps(listed).encode()),
            r"The manifest says 02-restyle.png is [\d,]+ bytes; the zip's is")


def test_a_manifest_that_lies_about_a_hash_is_refused():
    files, steps = two_steps()
    listed = json.loads(manifest_for(files, steps))
    listed["files"]["02-restyle.png"]["sha256"] = "0" * 64
    refused(zip_of(files, steps, manifest=json.dumps(listed).encode()),
            r"02-restyle.png is not the file the manifest lists \(its SHA-256 differs\)")


def test_a_manifest_that_lists_a_missing_file_is_refused():
    files, steps = two_steps()
    manifest = manifest_for({**files, "03-upscale.png": b"x"}, steps)
    refused(zip_of(files, steps, manifest=manifest), "The manifest lists 03-upscale.png, which is not in the zip")


def test_a_member_the_manifest_does_not_list_is_refused():
    files, steps = two_steps()
    manifest = manifest_for(files, steps)
    refused(zip_of({**files, "99-extra.png": b"x"}, steps, manifest=manifest),
            "The zip holds 99-extra.png, which the manifest does not list")


def test_parent_links_in_a_cycle_are_refused():
    files, steps = two_steps()
    steps[0]["parent"] = "b" * 32
    refused(zip_of(files, steps), re.escape("The steps' parent links form a cycle (steps 1 → 2 → 1); a chain has none."))
    files, steps = two_steps(parent="b" * 32)
    refused(zip_of(files, steps), re.escape("form a cycle (steps 2 → 2)"))


def test_other_broken_links_are_refused():
    files, steps = two_steps(parent="c" * 32)
    refused(zip_of(files, steps), "Step 2 of the manifest names a parent that is not in the zip")
    files, steps = two_steps(id="a" * 32, parent=None)
    refused(zip_of(files, steps), "Steps 1 and 2 of the manifest have the same id")
    files, steps = two_steps()
    steps[0]["parent"] = "b" * 32
    steps[1]["parent"] = None
    refused(zip_of(files, steps), "Step 1 of the manifest comes before its parent")


def test_parameters_other_than_the_pngs_are_refused():
    files, steps = two_steps()
    steps[1]["parameters"] = {**steps[1]["parameters"], "seed": 99}
    refused(zip_of(files, steps), "02-restyle.png carries other parameters than the manifest says it does")
    files, steps = two_steps(task="upscale")
    refused(zip_of(files, steps), "Step 2 of the manifest says upscale, but its parameters are not of that tab")


@pytest.mark.parametrize("manifest, words", [
    (b"[" * 100 + b"]" * 100, "nested more than 11 deep"),
    (b'{"format": [' + b"[]," * 30_000 + b"[]]}", "holds more than 25,600 values"),
    (b'{"format": "sd-studio-chain", "version": 1, "steps": ["' + b"\\\\" * 100_000, "a string never ends"),
    (b"\xff\xfe", "is not UTF-8 text"),
    (b'{"format": "sd-studio-chain", "version": 1', "is not readable JSON"),
    (b'{"format": "other"}', "is not a session export's"),
    (b'{"format": "sd-studio-chain", "version": 2}', "of version 2; this studio reads version 1"),
])
def test_a_manifest_of_the_wrong_shape_is_refused(manifest, words):
    refused(zip_of({}, [], manifest=manifest), words)


def test_what_is_not_a_zip_or_too_large_is_refused(tmp_path):
    refused(b"not a zip at all", "not a zip")
    files, steps = two_steps()
    data = zip_of(files, steps)
    refused(data, re.escape(f"The zip is {len(data):,} bytes; a session export is at most 1,000."), Limits(zip_bytes=1000))
    refused(data, "unpacks to more than 100 bytes, the most an import takes", Limits(total_bytes=100))
    path = tmp_path / "session.zip"
    path.write_bytes(data)
    assert len(read_zip(path).steps) == 2  # a path is read like bytes


@pytest.mark.parametrize("method, words", [(zipfile.ZIP_BZIP2, "compressed with method 12"),
                                           (zipfile.ZIP_LZMA, "compressed with method 14")])
def test_other_compression_methods_are_refused(method, words):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr("01-generate.png", b"x")
    refused(buffer.getvalue(), words)


def test_a_name_twice_is_refused():
    one = raw_zip([("01-generate.png", zipfile.ZIP_STORED, b"x", zlib.crc32(b"x"), 1)] * 2)
    refused(one, "The zip holds 01-generate.png twice")


def test_a_mask_of_another_size_than_its_image_is_refused():
    files = {"01-erase.png": image_to_png(noise((64, 64), 1), parameters_for("erase", 1, (64, 64))),
             "01-erase-image.png": image_to_png(noise((64, 64), 2)),
             "01-erase-mask.png": image_to_png(Image.new("L", (32, 32)))}
    steps = [step("a" * 32, "erase", "01-erase.png",
                  inputs={"image": "01-erase-image.png", "mask": "01-erase-mask.png"})]
    refused(zip_of(files, steps), "01-erase-mask.png is 32×32 px; a mask is the size of its image, 64×64 px")


def test_only_pixels_and_parameters_are_kept():
    """A PNG with more text chunks than its parameters comes back with its parameters only."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters_for("generate", 1, (64, 64))))
    info.add_text("Comment", "anything at all " * 100)
    buffer = io.BytesIO()
    noise((64, 64), 1).save(buffer, format="PNG", pnginfo=info)
    files = {"01-generate.png": buffer.getvalue()}
    read = read_zip(zip_of(files, [step("a" * 32, "generate", "01-generate.png")]))
    with Image.open(io.BytesIO(read.steps[0].png)) as image:
        assert set(image.text) == {"parameters"}


# --- any damage: a chain, or an ExchangeError; nothing else -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=25), children, max_size=5),
    max_leaves=12,
)


@functools.cache
def small_export() -> tuple[bytes, dict]:
    store = Store()
    generated = make(store, "generate", 1, (64, 64))
    erased = make(store, "erase", 2, (64, 64), generated, mask=True)
    data = export_zip([erased, generated], store.pngs.get)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return data, json.loads(archive.read(MANIFEST_NAME))


def read_or_refused(data: bytes) -> None:
    try:
        read_zip(data)
    except ExchangeError as error:
        assert str(error)


@given(flips=st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 2**32))
def test_a_damaged_export_is_read_or_refused(flips, cut):
    data, _ = small_export()
    damaged = bytearray(data)
    for position, value in flips:  # the records at both ends are where damage matters most
        damaged[position % 200 if position % 3 == 0 else -1 - position % 400 if position % 3 == 1
                else position % len(data)] = value
    read_or_refused(bytes(damaged[: None if cut is None else cut % len(data)]))


@given(changes=st.lists(st.tuples(st.integers(0, 2**32), json_values | st.just(KeyError)), min_size=1, max_size=3))
def test_a_manifest_of_any_values_is_read_or_refused(changes):
    data, manifest = small_export()
    manifest = copy.deepcopy(manifest)
    places = list(json_places(manifest))
    for index, value in changes:
        container, key = places[index % len(places)]
        if value is KeyError and isinstance(container, dict):
            container.pop(key, None)
        elif value is not KeyError:
            container[key] = value
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        files = {name: archive.read(name) for name in archive.namelist() if name != MANIFEST_NAME}
    read_or_refused(zip_of(files, [], manifest=json.dumps(manifest).encode()))


def json_places(value):
    """(container, key) of every value inside a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield value, key
        yield from json_places(child)
