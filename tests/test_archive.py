"""serving/archive.py: deterministic model archives and their refusing extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from serving.archive import (
    DEFAULT_SDSERVE_DIR,
    MAX_EXTENDED_HEADER_BYTES,
    MAX_EXTENDED_HEADERS_PER_MEMBER,
    CorruptArchiveError,
    MissingCheckpointError,
    UnsafeArchiveError,
    build_model_archive,
    format_size,
    main,
    model_modules,
    safe_extract,
    sha256_file,
)


def make_model(repository: Path, name: str = "sd_base", *, weights: bytes = b"\x00fp16" * 100) -> Path:
    """A Triton model folder shaped like serving/models/<name>, with a fake diffusers checkpoint."""
    folder = repository / name
    files = {
        "config.pbtxt": f'name: "{name}"\nbackend: "python"\n',
        "configs/cpu.pbtxt": f'name: "{name}"\nbackend: "python"\ninstance_group [{{ kind: KIND_CPU }}]\n',
        "1/model.py": "import sdserve\n",
        "1/checkpoint/model_index.json": '{"_class_name": "StableDiffusionPipeline"}',
        "1/checkpoint/weights.json": '{"kind": "tiny-random"}',
        "1/__pycache__/model.cpython-311.pyc": "bytecode",
    }
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    (folder / "1/checkpoint/unet").mkdir()
    (folder / "1/checkpoint/unet/diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def make_sdserve(root: Path) -> Path:
    package = root / "sdserve"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "catalog.py").write_text("MODELS = {}\n")
    (package / "triton_model.py").write_text("from .catalog import MODELS\n")
    (package / "instances.py").write_text("PRICES = {}  # imported by no model: not vendored\n")
    (package / "__pycache__/catalog.cpython-311.pyc").write_text("bytecode")
    (package / "README.txt").write_text("not python, not vendored")
    return package


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path]:
    repository = tmp_path / "models"
    make_model(repository)
    return repository, make_sdserve(tmp_path / "serving")


def build(repo: tuple[Path, Path], out: Path, name: str = "sd_base") -> Path:
    repository, sdserve = repo
    return build_model_archive(name, repository, out, sdserve_dir=sdserve)


def test_archive_holds_the_triton_folder_at_its_root(repo, tmp_path):
    archive = build(repo, tmp_path / "out")
    assert archive == tmp_path / "out" / "sd_base.tar.gz"
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    files = sorted(m.name for m in members if m.isfile())
    assert files == [
        "sd_base/1/checkpoint/model_index.json",
        "sd_base/1/checkpoint/unet/diffusion_pytorch_model.safetensors",
        "sd_base/1/checkpoint/weights.json",
        "sd_base/1/model.py",
        "sd_base/1/sdserve/__init__.py",
        "sd_base/1/sdserve/catalog.py",
        "sd_base/1/sdserve/triton_model.py",
        "sd_base/config.pbtxt",
        "sd_base/configs/cpu.pbtxt",
    ]
    names = [m.name for m in members]
    assert names == sorted(names), "entries are sorted"
    assert "sd_base" in names and "sd_base/1/sdserve" in names, "folders have entries"
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
        assert member.mode == (0o755 if member.isdir() else 0o644)
    assert list(tmp_path.joinpath("out").iterdir()) == [archive], "no temp file left behind"


def test_an_archive_carries_only_the_sdserve_modules_a_model_runs():
    vendored = {path.name for path in model_modules(DEFAULT_SDSERVE_DIR)}
    assert {"__init__.py", "triton_model.py", "batch.py", "pipelines.py", "catalog.py"} <= vendored
    # The AWS price table, redaction and file helpers serve the studio and deploy only.
    assert vendored.isdisjoint({"instances.py", "redaction.py", "files.py"})


def test_gzip_header_has_no_time_and_no_file_name(repo, tmp_path):
    header = build(repo, tmp_path / "out").read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0, "FNAME flag set"
    assert header[4:8] == b"\x00\x00\x00\x00", "MTIME is not zero"


def test_same_input_gives_the_same_bytes(repo, tmp_path):
    first = build(repo, tmp_path / "a")
    # New times and a different umask on the inputs must not change the archive.
    for path in repo[0].rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    os.chmod(repo[0] / "sd_base/1/model.py", 0o600)
    second = build(repo, tmp_path / "b")
    assert sha256_file(first) == sha256_file(second)
    assert sha256_file(first) == hashlib.sha256(first.read_bytes()).hexdigest()


def test_changed_weights_change_the_archive(repo, tmp_path):
    before = sha256_file(build(repo, tmp_path / "a"))
    (repo[0] / "sd_base/1/checkpoint/unet/diffusion_pytorch_model.safetensors").write_bytes(b"other")
    assert sha256_file(build(repo, tmp_path / "b")) != before


def test_rebuild_replaces_the_archive_in_place(repo, tmp_path):
    first = build(repo, tmp_path / "out")
    (repo[0] / "sd_base/config.pbtxt").write_text('name: "sd_base"\nbackend: "python"\nmax_batch_size: 4\n')
    second = build(repo, tmp_path / "out")
    assert first == second and b"max_batch_size" in gzip.decompress(second.read_bytes())


def test_symlinks_in_the_model_folder_are_stored_as_files(repo, tmp_path):
    blob = tmp_path / "blob.safetensors"
    blob.write_bytes(b"shared weights")
    (repo[0] / "sd_base/1/checkpoint/vae").mkdir()
    (repo[0] / "sd_base/1/checkpoint/vae/model.safetensors").symlink_to(blob)
    with tarfile.open(build(repo, tmp_path / "out")) as tar:
        member = tar.getmember("sd_base/1/checkpoint/vae/model.safetensors")
        assert member.isfile() and tar.extractfile(member).read() == b"shared weights"


def test_model_own_sdserve_link_is_replaced_by_the_vendored_copy(repo, tmp_path):
    stale = tmp_path / "stale_sdserve"
    stale.mkdir()
    (stale / "old.py").write_text("")
    (repo[0] / "sd_base/1/sdserve").symlink_to(stale)
    with tarfile.open(build(repo, tmp_path / "out")) as tar:
        names = tar.getnames()
    assert "sd_base/1/sdserve/catalog.py" in names and "sd_base/1/sdserve/old.py" not in names


def test_missing_checkpoint_is_a_clear_error_and_writes_nothing(repo, tmp_path):
    make_model(repo[0], "sd_depth")
    (repo[0] / "sd_depth/1/checkpoint/model_index.json").unlink()
    with pytest.raises(MissingCheckpointError, match="sd_depth.*make tiny-models.*serving.weights hub"):
        build(repo, tmp_path / "out", "sd_depth")
    assert list((tmp_path / "out").glob("*")) == []


def test_extract_round_trip(repo, tmp_path):
    archive = build(repo, tmp_path / "out")
    dest = safe_extract(archive, tmp_path / "cache" / "sd_base-1", max_total_bytes=10**6)
    assert (dest / "sd_base/1/sdserve/catalog.py").read_text() == "MODELS = {}\n"
    weights = dest / "sd_base/1/checkpoint/unet/diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == b"\x00fp16" * 100
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sd_base-1"]


def test_extract_refuses_an_existing_destination(repo, tmp_path):
    archive = build(repo, tmp_path / "out")
    (tmp_path / "cache/sd_base").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        safe_extract(archive, tmp_path / "cache/sd_base", max_total_bytes=10**6)


# --- hostile archives, crafted member by member ---------------------------------------------


def craft(path: Path, *members: tuple[str, str, bytes | str]) -> Path:
    """Write a .tar.gz from (name, kind, data-or-link-target) triples."""
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
             "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload if kind in ("sym", "hard") else ""
                tar.addfile(info)
    return path


HOSTILE = [
    pytest.param("absolute path", [("/tmp/evil.txt", "file", b"x")], id="absolute"),
    pytest.param("'..' in path", [("sd_base/../../evil.txt", "file", b"x")], id="dotdot"),
    pytest.param("links are refused", [("sd_base/link", "sym", "/etc/passwd")], id="symlink-absolute"),
    pytest.param("links are refused", [("sd_base/link", "sym", "../../outside")], id="symlink-escape"),
    pytest.param("links are refused", [("sd_base/link", "sym", "config.pbtxt")], id="symlink-inside"),
    pytest.param("links are refused", [("sd_base/a", "file", b"x"), ("sd_base/h", "hard", "sd_base/a")],
                 id="hardlink"),
    pytest.param("not a regular file or folder", [("sd_base/dev", "chr", "")], id="device"),
    pytest.param("not a regular file or folder", [("sd_base/pipe", "fifo", "")], id="fifo"),
    pytest.param("clashes with an earlier member", [("sd_base/a", "file", b"x"), ("sd_base/a", "file", b"y")],
                 id="duplicate"),
    pytest.param("clashes with an earlier member", [("other", "file", b"x"), ("other/a", "file", b"y")],
                 id="file-then-folder"),
]


@pytest.mark.parametrize(("message", "members"), HOSTILE)
def test_hostile_archive_is_refused_and_nothing_is_written(tmp_path, message, members):
    archive = craft(tmp_path / "evil.tar.gz", ("sd_base/config.pbtxt", "file", b"ok"), *members)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(UnsafeArchiveError, match=message) as error:
        safe_extract(archive, cache / "sd_base", max_total_bytes=10**6)
    assert repr(members[-1][0]) in str(error.value), "the message names the member"
    assert list(cache.iterdir()) == [], "no partial extraction"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "evil.tar.gz"]
    assert not Path("/tmp/evil.txt").exists()


def test_dot_folder_entries_are_accepted(tmp_path):
    archive = craft(tmp_path / "a.tar.gz", (".", "dir", ""), ("./sd_base/config.pbtxt", "file", b"ok"))
    dest = safe_extract(archive, tmp_path / "x", max_total_bytes=100)
    assert (dest / "sd_base/config.pbtxt").read_bytes() == b"ok"


def test_size_limit_counts_all_members(tmp_path):
    archive = craft(tmp_path / "big.tar.gz", *[(f"sd_base/{i}.bin", "file", b"\0" * 600) for i in range(3)])
    with pytest.raises(UnsafeArchiveError, match=r"sd_base/1.bin.*more than 1000 bytes"):
        safe_extract(archive, tmp_path / "cache/x", max_total_bytes=1000)
    assert list((tmp_path / "cache").iterdir()) == []
    assert safe_extract(archive, tmp_path / "cache/x", max_total_bytes=1800).is_dir()


def test_compressed_bomb_stops_at_the_limit(tmp_path):
    bomb = craft(tmp_path / "bomb.tar.gz", ("sd_base/zeros", "file", b"\0" * 5_000_000))
    assert bomb.stat().st_size < 20_000
    with pytest.raises(UnsafeArchiveError, match="more than 1000000 bytes"):
        safe_extract(bomb, tmp_path / "cache/x", max_total_bytes=1_000_000)


def test_member_count_limit(tmp_path):
    archive = craft(tmp_path / "many.tar.gz", *[(f"d{i}", "dir", "") for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match="more than 4 members"):
        safe_extract(archive, tmp_path / "cache/x", max_total_bytes=100, max_members=4)


def test_an_archive_cut_between_two_members_is_found_out(tmp_path):
    whole = craft(tmp_path / "whole.tar.gz", ("a", "file", b"first" * 100), ("b", "file", b"second" * 100))
    with tarfile.open(whole) as tar:
        end_of_a = tar.getmember("b").offset  # where b's header starts, in the tar stream
    cut = tmp_path / "cut.tar.gz"
    with gzip.open(whole) as source, gzip.open(cut, "wb") as target:
        target.write(source.read(end_of_a))
    data = cut.read_bytes()
    cut.write_bytes(data[:-8])  # the members up to b are whole; the gzip trailer is gone
    with pytest.raises(CorruptArchiveError, match="not a readable .tar.gz"):
        safe_extract(cut, tmp_path / "cache/x", max_total_bytes=10_000)


def test_zeros_after_the_last_member_are_bounded(tmp_path):
    archive = tmp_path / "padded.tar.gz"
    with gzip.open(archive, "wb") as out:
        out.write(b"\0" * (2 * 1024 * 1024))  # an empty tar, then far more zeros than any padding
    with pytest.raises(UnsafeArchiveError, match="after its last member"):
        safe_extract(archive, tmp_path / "cache/x", max_total_bytes=10_000)


@pytest.mark.parametrize("content", ["garbage", "plain tar", "truncated"])
def test_corrupt_archive_is_a_clear_error(repo, tmp_path, content):
    path = tmp_path / "bad.tar.gz"
    if content == "garbage":
        path.write_bytes(b"this is not a gzip file at all" * 10)
    elif content == "plain tar":
        with tarfile.open(path, "w") as tar:
            tar.addfile(tarfile.TarInfo("sd_base"), None)
    else:
        data = build(repo, tmp_path / "out").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArchiveError, match="not a readable .tar.gz"):
        safe_extract(path, tmp_path / "cache/x", max_total_bytes=10**6)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cli_prints_path_size_and_sha256(repo, tmp_path, capsys):
    repository, sdserve = repo
    make_model(repository, "sd_upscale")
    code = main(["--repository", str(repository), "--out", str(tmp_path / "store"), "--sdserve", str(sdserve)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 2
    for line, name in zip(lines, ["sd_base", "sd_upscale"]):
        archive = tmp_path / "store" / f"{name}.tar.gz"
        assert line.startswith(str(archive))
        assert line.endswith(f"  {format_size(archive.stat().st_size)}  sha256={sha256_file(archive)}")


def test_sizes_are_printed_in_readable_units():
    assert [format_size(n) for n in (512, 20_503, 3 * 2**20, 5 * 2**30)] == ["512 B", "20.0 KiB", "3.0 MiB", "5.0 GiB"]


def test_cli_reports_missing_weights(repo, tmp_path, capsys):
    repository, sdserve = repo
    (repository / "sd_base/1/checkpoint/model_index.json").unlink()
    code = main(["--repository", str(repository), "--out", str(tmp_path / "store"), "--sdserve", str(sdserve)])
    assert code == 1 and "make tiny-models" in capsys.readouterr().out


# --- extended (pax/GNU) headers: tarfile reads them whole, so they are checked first ---------


def extended_header_archive(path: Path, headers: list[tuple[bytes, int]], *, last: str = "sd_base/config.pbtxt") -> Path:
    """A .tar.gz of the given extended headers (typeflag, claimed size) before one small file.

    A pax header's data is a `path` record then zeros, a GNU long name's is the name then zeros,
    to the size claimed: zeros compress about 1,000 to 1, so 100 MB claimed is ~100 KB on disk.
    """
    with gzip.open(path, "wb", compresslevel=9) as out:
        for typeflag, claimed in headers:
            info = tarfile.TarInfo("././@PaxHeader" if typeflag in (tarfile.XHDTYPE, tarfile.XGLTYPE) else "././@LongLink")
            info.type, info.size = typeflag, claimed
            out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if typeflag in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                data = pax_record("path", last)
            else:
                data = last.encode() + b"\0"
            out.write(data)
            remaining = claimed - len(data) + (-claimed % tarfile.BLOCKSIZE)
            while remaining > 0:
                out.write(b"\0" * min(remaining, 1 << 20))
                remaining -= min(remaining, 1 << 20)
        info = tarfile.TarInfo(last)
        info.size = 2
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT) + b"ok".ljust(tarfile.BLOCKSIZE, b"\0"))
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


def pax_record(keyword: str, value: str) -> bytes:
    """'<length> keyword=value\\n', the length counting its own digits."""
    rest = f" {keyword}={value}\n".encode()
    length = len(rest) + len(str(len(rest)))
    length += len(str(length)) - len(str(len(rest)))
    return str(length).encode() + rest


EXTENDED_TYPES = [pytest.param(tarfile.XHDTYPE, id="pax"), pytest.param(tarfile.XGLTYPE, id="pax-global"),
                  pytest.param(tarfile.GNUTYPE_LONGNAME, id="gnu-longname"),
                  pytest.param(tarfile.GNUTYPE_LONGLINK, id="gnu-longlink")]


@pytest.mark.parametrize("typeflag", EXTENDED_TYPES)
def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path, typeflag):
    claimed = 100 * 1024 * 1024
    bomb = extended_header_archive(tmp_path / "bomb.tar.gz", [(typeflag, claimed)])
    assert bomb.stat().st_size < 150_000
    cache = tmp_path / "cache"
    tracemalloc.start()
    try:
        # No total limit to hide behind: the per-header limit alone refuses it.
        with pytest.raises(UnsafeArchiveError, match=rf"bomb.tar.gz: an extended \(pax/GNU\) header of {claimed:,} bytes; "
                                                      rf"at most {MAX_EXTENDED_HEADER_BYTES:,}"):
            safe_extract(bomb, cache / "x", max_total_bytes=1 << 40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The header's data was never read: far less memory than the 100 MB it claims.
    assert peak < 8 * 1024 * 1024, f"peak {peak:,} bytes"
    assert list(cache.iterdir()) == []


def test_extended_headers_count_toward_the_archive_limit(tmp_path):
    under_each_limit = MAX_EXTENDED_HEADER_BYTES - 1024
    archive = extended_header_archive(tmp_path / "a.tar.gz", [(tarfile.XHDTYPE, under_each_limit)])
    with pytest.raises(UnsafeArchiveError, match=r"PaxHeader.*more than 10000 bytes"):
        safe_extract(archive, tmp_path / "cache/x", max_total_bytes=10_000)
    dest = safe_extract(archive, tmp_path / "cache/x", max_total_bytes=under_each_limit + 2)
    assert (dest / "sd_base/config.pbtxt").read_bytes() == b"ok"


def test_a_chain_of_extended_headers_is_bounded(tmp_path):
    chain = [(tarfile.XHDTYPE, 512)] * (MAX_EXTENDED_HEADERS_PER_MEMBER + 1)
    archive = extended_header_archive(tmp_path / "chain.tar.gz", chain)
    with pytest.raises(UnsafeArchiveError, match=f"more than {MAX_EXTENDED_HEADERS_PER_MEMBER} extended headers"):
        safe_extract(archive, tmp_path / "cache/x", max_total_bytes=10**6)
    allowed = extended_header_archive(tmp_path / "ok.tar.gz", chain[1:])
    assert (safe_extract(allowed, tmp_path / "cache/y", max_total_bytes=10**6) / "sd_base/config.pbtxt").is_file()


def test_sparse_files_are_refused(tmp_path):
    # GNU's old sparse member ('S'), and its pax form 1.0, whose map tarfile reads without bound.
    old = tmp_path / "old.tar.gz"
    info = tarfile.TarInfo("sd_base/sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    with gzip.open(old, "wb") as out:
        out.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * (2 * tarfile.BLOCKSIZE))
    pax = tmp_path / "pax.tar.gz"
    with tarfile.open(pax, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sd_base/GNUSparseFile.0/sparse")
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "sd_base/sparse", "GNU.sparse.realsize": "4"}
        body = b"1\n0\n4\n".ljust(tarfile.BLOCKSIZE, b"\0") + b"data"
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    for archive in (old, pax):
        with pytest.raises(UnsafeArchiveError, match="sparse files are refused"):
            safe_extract(archive, tmp_path / "cache" / archive.stem, max_total_bytes=10**6)


def test_honest_pax_headers_still_extract(tmp_path):
    long_name = "sd_base/1/checkpoint/" + "d" * 150 + "/ünet.safetensors"  # pax: over 100 bytes, not ASCII
    archive = craft(tmp_path / "long.tar.gz", (long_name, "file", b"weights"))
    dest = safe_extract(archive, tmp_path / "cache/x", max_total_bytes=10**6)
    assert (dest / long_name).read_bytes() == b"weights"
