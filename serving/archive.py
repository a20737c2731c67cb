"""Model archives for a SageMaker multi-model endpoint, and their safe extraction.

`build_model_archive` writes `<name>.tar.gz` with the model's Triton folder at the archive root,
which is what SageMaker's Triton container loads after downloading `<prefix>/<name>.tar.gz`:

    <model>/config.pbtxt           <model>/configs/cpu.pbtxt
    <model>/1/model.py             <model>/1/sdserve/*.py       (the sdserve modules a model runs)
    <model>/1/checkpoint/**        (the diffusers pipeline folder)

`safe_extract` unpacks such an archive without trusting it (the local endpoint uses it, and so
can anyone who downloads an archive from S3).

CLI: python -m serving.archive --repository serving/models --out build/model-store [--models ...]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from sdserve.checkpoint import checkpoint_dir, has_checkpoint
from sdserve.files import atomic_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SDSERVE_DIR = REPO_ROOT / "serving" / "sdserve"
VENDORED_PACKAGE = "sdserve"
# What a model.py imports; the archive carries it and what it imports, nothing else of sdserve
# (the price table, redaction and file helpers serve the studio and deploy, not a model).
MODEL_ENTRY_MODULE = "triton_model"
# Never packed: bytecode is rebuilt by the container's Python and would break determinism.
IGNORED_NAMES = frozenset({"__pycache__", ".DS_Store"})
IGNORED_SUFFIXES = (".pyc", ".pyo")
# Weights are fp16 safetensors that barely compress. Measured on the full-size sd_depth (2.8 GB,
# `make bench-full-size`): level 1 saves 9% of the size for 104 s of deflating on one core, levels
# 6 and 9 half a percent more for as long; level 0 stores the tar in a valid gzip stream (what
# SageMaker asks of a model archive) in 2.4 s, and inflating it is a copy. 250 MB more to
# download is a second or two in a region; minutes of packaging and the inflating of every cold
# start are not worth it.
GZIP_LEVEL = 0
CHUNK = 1 << 20
# A tar ends with zero blocks padded to its record size (10 KiB by default): far less than this.
MAX_TRAILING_BYTES = 1 << 20
# tarfile reads an extended header (pax 'x'/'g', GNU long name 'L' / long link 'K') into memory
# whole, at the size its own header claims, before anything else sees it. What a model archive
# needs there is a path (Linux's PATH_MAX is 4,096 bytes) and a few numbers (size, mtime), so 64 KiB
# is far above any honest header and keeps a hostile one from costing more than that.
MAX_EXTENDED_HEADER_BYTES = 64 * 1024
# An honest member has at most a global pax header, a pax header and GNU long name and link
# headers before it; each one is a nested call in tarfile, so a chain of them is bounded too.
MAX_EXTENDED_HEADERS_PER_MEMBER = 4
EXTENDED_HEADER_TYPES = frozenset({tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                                   tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK})


class MissingCheckpointError(FileNotFoundError):
    """The model folder has no diffusers checkpoint to pack."""


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the destination, or is not a plain file/folder."""


class CorruptArchiveError(ValueError):
    """The archive is not a readable gzip-compressed tar file."""


def archive_name(model_name: str) -> str:
    """The S3 object name, which is also the TargetModel a client sends (`<model>.tar.gz`)."""
    return f"{model_name}.tar.gz"


def build_model_archive(
    model_name: str,
    repository: Path,
    out_dir: Path,
    *,
    sdserve_dir: Path = DEFAULT_SDSERVE_DIR,
) -> Path:
    """Write `<out_dir>/<model_name>.tar.gz` and return its path.

    The same inputs give the same bytes: entries are sorted, owners, times and modes normalized,
    and the gzip header carries neither a time nor a file name. Symbolic links in the model folder
    are followed and stored as the files they point to, since `safe_extract` refuses links.
    """
    model_dir = Path(repository) / model_name
    if not (model_dir / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{model_name}: no Triton model folder at {model_dir} (config.pbtxt missing)")
    if not has_checkpoint(Path(repository), model_name):
        raise MissingCheckpointError(
            f"{model_name}: no weights in {checkpoint_dir(Path(repository), model_name)} "
            "(run `make tiny-models` or `python -m serving.weights hub`)"
        )
    if not (Path(sdserve_dir) / "__init__.py").is_file():
        raise FileNotFoundError(f"no sdserve package to vendor at {sdserve_dir}")

    vendored = PurePosixPath(model_name, "1", VENDORED_PACKAGE)
    entries = dict(_walk(model_dir, PurePosixPath(model_name), skip=vendored))
    entries.update((vendored / path.name, path) for path in model_modules(Path(sdserve_dir)))
    # Folder entries for the archive root and the vendored package's folders.
    for parent in {p for name in entries for p in name.parents if p != PurePosixPath(".")}:
        entries.setdefault(parent, None)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / archive_name(model_name)
    with atomic_file(target) as staging, open(staging, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header free of the temp name and the clock.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(entries, key=str):
                    _add(tar, name, entries[name])
    return target


def model_modules(sdserve_dir: Path) -> list[Path]:
    """The files of sdserve a model runs: the package's __init__, its entry module and every
    module they import from the package, found by reading the imports (none is run)."""
    wanted, todo = {"__init__"}, [MODEL_ENTRY_MODULE]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        tree = ast.parse((sdserve_dir / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(f"{VENDORED_PACKAGE}."):
                todo.append(node.module.split(".")[1])
    return sorted(sdserve_dir / f"{name}.py" for name in wanted)


def _walk(folder: Path, arcdir: PurePosixPath, *, skip: PurePosixPath) -> Iterator[tuple[PurePosixPath, Path | None]]:
    """(archive name, source file or None for a folder) below `folder`, following links."""
    for path in sorted(folder.iterdir()):
        if path.name in IGNORED_NAMES or path.name.endswith(IGNORED_SUFFIXES):
            continue
        name = arcdir / path.name
        if name == skip:  # e.g. a development symlink; the vendored copy replaces it
            continue
        if path.is_dir():
            yield name, None
            yield from _walk(path, name, skip=skip)
        elif path.is_file():
            yield name, path


def _add(tar: tarfile.TarFile, name: PurePosixPath, source: Path | None) -> None:
    info = tarfile.TarInfo(str(name))
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if source is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    status = os.stat(source)  # follows links: the file's own bytes are stored
    info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
    info.size = status.st_size
    with open(source, "rb") as f:
        tar.addfile(info, f)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract(archive: Path, dest: Path, *, max_total_bytes: int, max_members: int = 10_000) -> Path:
    """Extract a model archive into `dest` (which must not exist yet) and return `dest`.

    Refused, with UnsafeArchiveError naming the member: absolute names, `..` components, every
    symbolic or hard link (model archives never need one, and refusing them all is simpler to
    trust than resolving targets), devices, FIFOs and anything else that is not a plain file or
    folder, duplicate names, more than `max_members` members, and more than `max_total_bytes` of
    file data and extended headers, counted while decompressing rather than trusted from headers.
    An extended (pax or GNU) header over MAX_EXTENDED_HEADER_BYTES, or more than
    MAX_EXTENDED_HEADERS_PER_MEMBER of them before one member, is refused before tarfile reads it,
    and so is every sparse file. A file that is not a gzip-compressed tar raises CorruptArchiveError.

    Everything is written into a fresh temporary folder beside `dest` and renamed into place
    only once the whole archive has been read, so a refused archive leaves nothing behind, and
    nothing is ever written outside that folder.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; extract into a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        _extract_members(archive, staging, max_total_bytes=max_total_bytes, max_members=max_members)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _extract_members(archive: Path, staging: Path, *, max_total_bytes: int, max_members: int) -> None:
    budget = _Budget(max_total_bytes)
    try:
        # Stream mode ("r|") reads members in order without seeking, so sizes are counted as the
        # data is decompressed and a gzip bomb is stopped at the limit. The gzip module, unlike
        # tarfile's own "r|gz", checks the stream's end (length and CRC), which is what finds an
        # archive cut short between two members.
        with gzip.open(archive, "rb") as unzipped, tarfile.open(
            fileobj=unzipped, mode="r|", tarinfo=_header_checks(archive.name, budget)
        ) as tar:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise UnsafeArchiveError(f"{archive.name}: more than {max_members} members")
                target = staging.joinpath(*_checked_name(member, staging).parts)
                try:
                    _write_member(tar, member, target, budget)
                except (FileExistsError, NotADirectoryError):
                    raise UnsafeArchiveError(f"member {member.name!r}: clashes with an earlier member") from None
            # The members end at the first zero block; what follows (a tar's padding) is read to
            # the gzip trailer, so an archive cut short there is still found out, and bounded, so a
            # bomb of trailing zeros is not.
            trailing = 0
            while chunk := unzipped.read(CHUNK):
                trailing += len(chunk)
                if trailing > MAX_TRAILING_BYTES:
                    raise UnsafeArchiveError(f"{archive.name}: more than {MAX_TRAILING_BYTES} bytes after its last member")
    except (tarfile.ReadError, tarfile.CompressionError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise CorruptArchiveError(f"{archive}: not a readable .tar.gz ({error})") from error


class _Budget:
    """Bytes of file data still allowed; headers are checked first, real bytes while streaming."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def check(self, name: str, size: int) -> None:
        if self.used + size > self.limit:
            raise UnsafeArchiveError(f"member {name!r}: archive expands to more than {self.limit} bytes")

    def spend(self, name: str, size: int) -> None:
        self.check(name, size)
        self.used += size


def _header_checks(archive_name: str, budget: _Budget) -> type[tarfile.TarInfo]:
    """A TarInfo class that checks each header before tarfile acts on it.

    `_proc_member` is tarfile's documented hook for a subclass; it runs once per raw header with
    only the 512-byte header parsed, so an extended header's size is checked, and counted in the
    archive's budget, before tarfile reads its data into memory. Sparse files are refused there
    and in their pax forms, whose maps tarfile would otherwise read without bound.
    """
    chain = 0  # extended headers seen since the last member

    class CheckedInfo(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            nonlocal chain
            if self.type in EXTENDED_HEADER_TYPES:
                chain += 1
                if chain > MAX_EXTENDED_HEADERS_PER_MEMBER:
                    raise UnsafeArchiveError(
                        f"{archive_name}: more than {MAX_EXTENDED_HEADERS_PER_MEMBER} extended headers before one member"
                    )
                if self.size > MAX_EXTENDED_HEADER_BYTES:
                    raise UnsafeArchiveError(
                        f"{archive_name}: an extended (pax/GNU) header of {self.size:,} bytes; "
                        f"at most {MAX_EXTENDED_HEADER_BYTES:,}"
                    )
                budget.spend(self.name or "extended header", self.size)
            else:
                chain = 0
                if self.type == tarfile.GNUTYPE_SPARSE:
                    _refuse_sparse(self)
            return super()._proc_member(tar)

        # tarfile calls these for the pax forms of GNU sparse files (0.0, 0.1 and 1.0).
        def _proc_gnusparse_00(self, next, pax_headers, buf):
            _refuse_sparse(next)

        def _proc_gnusparse_01(self, next, pax_headers):
            _refuse_sparse(next)

        def _proc_gnusparse_10(self, next, pax_headers, tarfile):
            _refuse_sparse(next)

    return CheckedInfo


def _refuse_sparse(member: tarfile.TarInfo) -> None:
    raise UnsafeArchiveError(f"member {member.name!r}: sparse files are refused")


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, budget: _Budget) -> None:
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    budget.check(member.name, member.size)
    target.parent.mkdir(parents=True, exist_ok=True)
    # "x": a second member with the same name is an error, never a silent overwrite.
    with tar.extractfile(member) as source, open(target, "xb") as out:
        while chunk := source.read(CHUNK):
            budget.spend(member.name, len(chunk))
            out.write(chunk)
    os.chmod(target, 0o755 if member.mode & stat.S_IXUSR else 0o644)


def _checked_name(member: tarfile.TarInfo, staging: Path) -> PurePosixPath:
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchiveError(f"member {name!r}: absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"member {name!r}: '..' in path")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"member {name!r}: links are refused (-> {member.linkname!r})")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"member {name!r}: not a regular file or folder (device, FIFO or other)")
    # Second line of defence: the standard library's own policy for untrusted archives.
    try:
        tarfile.data_filter(member, str(staging))
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"member {name!r}: {error}") from error
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.archive",
        description="Build deterministic <model>.tar.gz archives for a SageMaker multi-model endpoint.",
    )
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "serving" / "models",
                        help="Triton model repository (default: serving/models)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "model-store",
                        help="folder the archives are written to (default: build/model-store)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="models to pack (default: every folder with a config.pbtxt)")
    parser.add_argument("--sdserve", type=Path, default=DEFAULT_SDSERVE_DIR,
                        help="the sdserve package vendored into each archive")
    args = parser.parse_args(argv)

    models = args.models or sorted(p.parent.name for p in args.repository.glob("*/config.pbtxt"))
    if not models:
        parser.error(f"no models found in {args.repository}")
    for model in models:
        try:
            path = build_model_archive(model, args.repository, args.out, sdserve_dir=args.sdserve)
        except FileNotFoundError as error:
            print(f"error: {error}")
            return 1
        print(f"{path}  {format_size(path.stat().st_size)}  sha256={sha256_file(path)}")
    return 0


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


if __name__ == "__main__":
    raise SystemExit(main())
