"""Property tests of what the serving side decodes from strangers: the KServe inputs of a request
(rows, text, base64 images, gen_args) and model archives. Whatever comes in: no crash, no hang,
bounded work, and every refusal a RequestError naming its field (or the archive's own error).
Fast in `make test`; HYPOTHESIS_PROFILE=long searches far longer (see conftest.py)."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.archive import CorruptArchiveError, UnsafeArchiveError, safe_extract
from sdserve.batch import split_rows
from sdserve.catalog import INPUT_NAMES, MODELS
from sdserve.errors import RequestError
from sdserve.images import decode_image
from sdserve.request import parse_request

from .samples import bomb_png_b64, png_b64

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=25), children, max_size=5),
    max_leaves=20,
)
names = st.sampled_from(sorted(INPUT_NAMES)) | st.text(max_size=12)
models = st.sampled_from(sorted(MODELS))


def refused_clearly(call) -> None:
    """`call()` returns, or refuses with a RequestError whose message names its field."""
    try:
        call()
    except RequestError as error:
        assert str(error).startswith(error.field + ": ") and error.problem


@given(model=models, raw=st.binary(max_size=600) | json_values.map(lambda value: json.dumps(value).encode()))
def test_gen_args_of_any_shape(model, raw):
    refused_clearly(lambda: MODELS[model].parse_gen_args(raw))


@given(model=models, arguments=st.dictionaries(st.sampled_from(sorted({a.name for s in MODELS.values() for a in s.arguments})),
                                               json_values, max_size=6))
def test_gen_args_of_the_right_names_and_any_values(model, arguments):
    refused_clearly(lambda: MODELS[model].parse_gen_args(json.dumps(arguments)))


@given(data=st.binary(max_size=2000) | st.text(max_size=400).map(str.encode))
def test_base64_images_of_any_bytes(data):
    refused_clearly(lambda: decode_image(data, "image"))


@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_images_claiming_any_size_are_refused_before_their_pixels(width, height):
    tracemalloc.start()
    try:
        refused_clearly(lambda: decode_image(bomb_png_b64(width, height), "image"))
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20  # nothing near the claimed size
    finally:
        tracemalloc.stop()


@given(inputs=st.dictionaries(names, st.lists(st.lists(st.binary(max_size=40) | st.text(max_size=40), max_size=3),
                                              max_size=3), max_size=5))
def test_kserve_inputs_of_any_shape(inputs):
    arrays = {}
    for name, rows in inputs.items():
        try:
            arrays[name] = np.array(rows, dtype=np.object_)
        except ValueError:  # ragged: numpy cannot make it, Triton never would
            return
    refused_clearly(lambda: split_rows(arrays))


@given(model=models, fields=st.dictionaries(st.sampled_from(sorted(INPUT_NAMES)),
                                            st.binary(max_size=200) | st.just(png_b64((48, 40))), max_size=5))
def test_request_rows_of_any_content(model, fields):
    refused_clearly(lambda: parse_request(model, fields))


def _archive(members: list[tuple[str, int, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = bytes([kind])
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            info.linkname = "../x" if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


member_names = st.text(alphabet="ab./\\-_\x00", min_size=1, max_size=12) | st.sampled_from(
    ["../evil", "/etc/x", "a/../../b", "m/1/model.py", "m/config.pbtxt", "./m", "m//x"])
member_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                tarfile.FIFOTYPE, tarfile.CHRTYPE])


@given(members=st.lists(st.tuples(member_names, member_kinds.map(ord), st.binary(max_size=64)), max_size=6),
       cut=st.none() | st.integers(0, 400))
def test_archives_of_any_members_extract_inside_or_are_refused(tmp_path_factory, members, cut):
    work = tmp_path_factory.mktemp("fuzz-archive")
    data = _archive(members)
    archive = work / "model.tar.gz"
    archive.write_bytes(data if cut is None else data[:cut])
    dest = work / "out"
    try:
        safe_extract(archive, dest, max_total_bytes=10_000, max_members=5)
    except (UnsafeArchiveError, CorruptArchiveError) as error:
        assert str(error)
        assert not dest.exists()  # a refused archive leaves nothing behind
        return
    for path in dest.rglob("*"):
        assert path.resolve().is_relative_to(dest.resolve()) and not path.is_symlink()
    assert {p.name for p in work.iterdir()} <= {"model.tar.gz", "out"}  # nothing written beside it


@pytest.mark.parametrize("text", ["[" * 200_000, "{\"a\":" * 100_000])
def test_deeply_nested_gen_args_are_refused_not_a_recursion_error(text):
    with pytest.raises(RequestError) as refused:
        MODELS["sd_base"].parse_gen_args(text.encode())
    assert refused.value.field == "gen_args"
