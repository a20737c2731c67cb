"""The serving path at full size: the four models at their real sizes (random weights,
serving/full_size.py) through the real local endpoint and Triton, each figure with its goal.

    python -m bench.full_size [--models NAME ...] [--work DIR] [--store s3|local] [--gzip-levels 0 1 6 9]
                              [--json FILE] [--dry-run]

1. Packaging: each model's archive (serving.archive, what `python -m deploy package` uploads):
   its size against its folder's and the time to build it; and what the gzip level costs: the
   same tar stream deflated at each level given, time and size against the shipped level's.
2. Per model, on a fresh endpoint whose store is S3 (moto, in this process): the cold start
   split into fetch (the download), extract (safe_extract), load (Triton loading the model: its
   stub starting, from_pretrained) and first answer (64 px, 2 steps); the warm call (64 px,
   1 step); the resident memory of its Triton stub against the size the endpoint budgets for it
   (its extracted folder); a call of 512 px x 50 steps, refused at once naming what to lower;
   and a call that fits (128 px, 4 steps), answered within the 60 s of an invocation. Before
   those two, calls at two sizes teach the model its speed (sdserve.budget).
   Beside the load, the plain `from_pretrained` of the same extracted folder in a fresh process
   (the pipeline class, fp32, as the model loads it): extract + load against it.
3. Cycling: a memory budget that holds two models (the two largest folders), the four models
   called in turn twice on a fresh cache; every call loads its model, evicting the least recently
   used one. Each archive is fetched and extracted once (a reload finds it on disk, as SageMaker
   keeps it), the second round answers as the first (within one level), and the kernel killed
   nothing for memory (/proc/vmstat's oom_kill).

Without --dry-run the full-size weights are built under --work/repository (or kept while their
recipe is current): 10 GB for the four, and as much again for each of their archives, the
store's copy and the extracted cache (some 40 GB of disk); 4 to 6.5 GB of memory for a loaded
model (fp32 on a CPU), twice that while cycling; 20 minutes of a 2-core machine once the weights
are written (measured, docs/benchmarks.md). Schedule it.
--dry-run runs the same on the checkout's tiny weights at smaller sizes, in minutes
(tests/test_full_size.py runs it on two models).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
from sdserve.catalog import CALL_BUDGET_S, CHECKPOINT_DIR, INVOCATION_SECONDS, MODELS
from sdserve.checkpoint import checkpoint_dir
from sdserve.wire import decode_answer, encode_request, invoke_arguments

from bench.harness import MODEL_REPOSITORY, timed
from deploy.invoke import LOADING_ATTEMPTS, LOADING_BACKOFF_S, sample_call
from serving import full_size, weights
from serving.archive import CHUNK, GZIP_LEVEL, archive_name, build_model_archive
from serving.local_endpoint import EndpointSettings, LocalEndpoint
from serving.local_endpoint.cache import folder_size
from studio.replay import largest_difference

ENDPOINT_NAME = "sd-studio"
# moto answers each ranged GET of boto3's parallel download by copying the object whole: a 2.3 GB
# archive came at 3 MB/s in 8 MB parts (1.1 GB in 6 minutes). Whole objects, in one stream, from
# and to moto; real S3 serves ranges in parallel, faster.
ONE_STREAM = boto3.s3.transfer.TransferConfig(multipart_threshold=2**40, use_threads=False)
BUCKET, PREFIX = "sd-studio-bench", "mme/models"
MB = 1e6

# The goals each figure is held to (its ratio printed: below 1 is within it).
# A model's first call: as long as the smoke test (deploy.invoke) keeps asking a loading model.
COLD_START_GOAL_S = sum(LOADING_BACKOFF_S * 2**attempt for attempt in range(LOADING_ATTEMPTS - 1))
PACKAGING_GOAL_S = 120.0  # ours: `deploy package` packs four models per release; minutes each would drag
REFUSAL_GOAL_S = 1.0  # a call that cannot fit is told so at once, not after its 60 s
ARCHIVE_OVERHEAD_GOAL = 1.01  # an archive at most 1% over its folder: headers and framing, no more
EXTRACT_LOAD_GOAL = 1.5  # unpacking and loading through Triton, against from_pretrained of the folder
# A warm call fits a pipeline call's share of the invocation; a fitting call the invocation itself.


@dataclass(frozen=True)
class Sizes:
    """The calls made of each model: (output px, steps)."""

    warm: tuple[int, int]
    teach: tuple[tuple[int, int], ...]  # two sizes, so the budget fits a slope
    refused: tuple[int, int]
    fits: tuple[int, int]


# 256 px x 4 steps ran 22.6 s on the full-size Generate model here (fp32 on 2 cores) and was stopped before
# its last step by the call budget's deadline: a call that fits, with room, is smaller.
FULL = Sizes(warm=(64, 1), teach=((128, 2), (256, 2)), refused=(512, 50), fits=(128, 4))
# The tiny models are fast at every size: a dry run only proves every step works, quickly.
DRY_RUN = Sizes(warm=(64, 1), teach=((64, 2), (128, 2)), refused=(128, 12), fits=(64, 4))
COLD = (64, 2)  # the first call (two steps: the budget learns nothing from one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.full_size", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME")
    parser.add_argument("--work", type=Path,
                        help="weights, archives, store and cache, kept so that a second run reuses the weights "
                        "(default: build/bench-full-size, or build/bench-full-size-dry-run)")
    parser.add_argument("--store", choices=("s3", "local"), default="s3",
                        help="archives on S3 (moto in this process: the cold start includes a download) "
                        "or in a local folder (no fetch)")
    parser.add_argument("--gzip-levels", type=int, nargs="*", default=[0, 1, 6, 9])
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per model (the median is shown)")
    parser.add_argument("--dry-run", action="store_true", help="the checkout's tiny weights, small calls")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = DRY_RUN if args.dry_run else FULL
    args.work = args.work or Path("build/bench-full-size" + ("-dry-run" if args.dry_run else ""))
    figures: dict = {"weights": "tiny-random" if args.dry_run else full_size.FULL_SIZE_KIND, "models": args.models}

    repository = prepare_repository(args.work / "repository", args.models, dry_run=args.dry_run, figures=figures)
    store = args.work / "store"
    shutil.rmtree(store, ignore_errors=True)
    print(f"\n1. Packaging ({'tiny' if args.dry_run else 'full-size'} weights; shipped gzip level {GZIP_LEVEL})")
    figures["packaging"] = package(repository, store, args.models)
    figures["gzip_levels"] = gzip_costs(store / archive_name(largest(repository, args.models)), args.gzip_levels)

    with model_store(store, args.store) as settings:
        cache = args.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        print(f"\n2. Each model on a fresh endpoint, archives {'on S3 (moto)' if args.store == 's3' else 'local'}")
        figures["models_measured"] = {model: measure_model(args.work, model, sizes, args.repeats, settings)
                                      for model in args.models}
        print("\n3. Cycling under a memory budget that holds two models")
        figures["cycling"] = cycle(args.work, repository, args.models, settings)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def report(label: str, value: float, goal: float, unit: str, note: str = "") -> dict:
    """One figure, printed with its goal and their ratio; returned for the JSON."""
    ratio = value / goal if goal else float("nan")
    print(f"   {label:42} {value:10.2f} {unit:3}  goal {goal:9.2f} {unit:3}  ratio {ratio:6.2f}  {note}".rstrip())
    return {"value": value, "goal": goal, "unit": unit, "ratio": ratio}


# --- 0. The repository the bench packs ----------------------------------------------------------


def prepare_repository(repository: Path, models: list[str], *, dry_run: bool, figures: dict) -> Path:
    """The checkout's Triton model folders (configs, model.py) with full-size weights, built or
    kept while their recipe is current; with `dry_run`, linked to the checkout's tiny weights."""
    figures["build_s"] = {}
    for model in models:
        target = repository / model
        shutil.rmtree(target / "1" / "sdserve", ignore_errors=True)
        shutil.copytree(MODEL_REPOSITORY / model, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(CHECKPOINT_DIR, "__pycache__", "sdserve"))
        folder = checkpoint_dir(repository, model)
        if dry_run:
            tiny = checkpoint_dir(MODEL_REPOSITORY, model)
            if not (tiny / "model_index.json").is_file():
                sys.exit(f"error: no tiny weights in {tiny}: run `make tiny-models`")
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            shutil.rmtree(folder, ignore_errors=True)
            folder.symlink_to(tiny.resolve())
        elif not full_size.is_current(model, folder):
            print(f"building the full-size {model} in {folder} ...", flush=True)
            figures["build_s"][model] = timed(lambda: weights.write_full_size(model, folder))
            print(f"   {model}: {folder_size(folder) / MB:.0f} MB in {figures['build_s'][model]:.0f} s")
    return repository


def largest(repository: Path, models: list[str]) -> str:
    return max(models, key=lambda model: folder_size(checkpoint_dir(repository, model).resolve()))


# --- 1. Packaging ------------------------------------------------------------------------------


def package(repository: Path, store: Path, models: list[str]) -> dict:
    out = {}
    for model in models:
        seconds = timed(lambda: build_model_archive(model, repository, store))
        size = (store / archive_name(model)).stat().st_size
        folder = folder_size(checkpoint_dir(repository, model).resolve())
        print(f"   {model}: {size / MB:.0f} MB archive of a {folder / MB:.0f} MB folder")
        out[model] = {"archive_bytes": size, "folder_bytes": folder,
                      "size": report("  archive size / folder size", size / folder, ARCHIVE_OVERHEAD_GOAL, "x",
                                     f"(gzip level {GZIP_LEVEL}: the tar and the stream's framing)"),
                      "time": report("  time to build the archive", seconds, PACKAGING_GOAL_S, "s")}
    return out


def gzip_costs(archive: Path, levels: list[int]) -> dict:
    """Deflate the archive's tar stream at each level, and inflate what that gives, chunk by chunk
    in memory: the compression's own time, the size, and the decompression's time (what an
    extraction spends on the level: the tar's reading and writing cost the same at any level),
    against the shipped level's. Reading and inflating the archive itself are left out."""
    if not levels:
        return {}
    print(f"   gzip levels on {archive.name} (deflate and inflate time only; against level {GZIP_LEVEL}):")
    costs = {}
    for level in sorted(set(levels) | {GZIP_LEVEL}):
        deflate = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: a gzip stream, as the archive's
        inflate = zlib.decompressobj(31)
        size, deflate_s, inflate_s = 0, 0.0, 0.0

        def inflated(data: bytes) -> None:
            nonlocal size, inflate_s
            size += len(data)
            started = time.perf_counter()
            inflate.decompress(data)
            inflate_s += time.perf_counter() - started

        with gzip.open(archive, "rb") as tar:
            while chunk := tar.read(CHUNK):
                started = time.perf_counter()
                data = deflate.compress(chunk)
                deflate_s += time.perf_counter() - started
                inflated(data)
        started = time.perf_counter()
        data = deflate.flush()
        deflate_s += time.perf_counter() - started
        inflated(data)
        costs[level] = {"bytes": size, "deflate_s": deflate_s, "inflate_s": inflate_s}
    shipped = costs[GZIP_LEVEL]
    for level, cost in costs.items():
        print(f"     level {level}: {cost['bytes'] / MB:9.0f} MB ({cost['bytes'] / shipped['bytes']:.3f}x), deflate "
              f"{cost['deflate_s']:7.1f} s ({cost['deflate_s'] / shipped['deflate_s']:.2f}x), inflate "
              f"{cost['inflate_s']:6.1f} s ({cost['inflate_s'] / shipped['inflate_s']:.2f}x)")
    return costs


# --- 2. Each model on a fresh endpoint ---------------------------------------------------------


@contextlib.contextmanager
def model_store(store: Path, kind: str) -> Iterator[dict]:
    """The endpoint settings for the archives in `store`: that folder, or an S3 prefix on moto in
    server mode in this process (the test's way: tests/test_local_endpoint_s3.py), uploaded to."""
    if kind == "local":
        yield {"model_store": str(store)}
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    saved = dict(os.environ)
    empty = Path(tempfile.mkdtemp(prefix="bench-no-aws-config-"))
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE=str(empty / "config"), AWS_SHARED_CREDENTIALS_FILE=str(empty / "credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        os.environ.pop(name, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for archive in sorted(store.glob("*.tar.gz")):
            seconds = timed(lambda: s3.upload_file(str(archive), BUCKET, f"{PREFIX}/{archive.name}", Config=ONE_STREAM))
            print(f"   uploaded {archive.name} to moto in {seconds:.1f} s")
        yield {"model_store": f"s3://{BUCKET}/{PREFIX}/", "s3_endpoint_url": url}
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(empty, ignore_errors=True)


class TimedStore:
    """The endpoint's model store, timing what it does for each archive: the download (until its
    local copy is ready) and the extraction (while the cache holds that copy); and counting them.
    From moto, an archive comes in one stream (ONE_STREAM)."""

    def __init__(self, store) -> None:
        if hasattr(store, "transfer_config"):
            store.transfer_config = ONE_STREAM
        self._store = store
        self.fetch_s: dict[str, float] = {}
        self.extract_s: dict[str, float] = {}
        self.fetches: dict[str, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    @contextlib.contextmanager
    def local_copy(self, info, scratch: Path):
        started = time.perf_counter()
        self.fetches[info.target] = self.fetches.get(info.target, 0) + 1
        with self._store.local_copy(info, scratch) as path:
            fetched = time.perf_counter()
            self.fetch_s[info.target] = fetched - started
            try:
                yield path
            finally:
                self.extract_s[info.target] = time.perf_counter() - fetched


def endpoint_on(work: Path, logs: str, cache: str = "cache", **settings) -> LocalEndpoint:
    """The local endpoint (in this process, a free port) on the store in `settings`, its cache
    `work/cache` shared by the endpoints of part 2; a call waits for its model's load however long
    it takes."""
    return LocalEndpoint(EndpointSettings(port=0, cache_dir=work / cache, log_dir=work / "logs" / logs,
                                          max_models=None, load_wait_s=1800.0, **settings))


def runtime_client(url: str):
    """boto3's sagemaker-runtime on the local endpoint: no retries, and time for a model to load."""
    return boto3.session.Session(region_name="us-east-1", aws_access_key_id="local",
                                 aws_secret_access_key="local").client(
        "sagemaker-runtime", endpoint_url=url,
        config=botocore.config.Config(read_timeout=1800, retries={"total_max_attempts": 1}))


def call(runtime, model: str, size: int, steps: int) -> float:
    """Seconds for one call of the sample picture at `size` px output running `steps` denoising
    steps (an image-to-image model is asked for more: it runs strength x num_inference_steps)."""
    return answered(runtime, model, size, steps)[0]


def answered(runtime, model: str, size: int, steps: int):
    """(seconds, the decoded answer) of `call`."""
    spec = MODELS[model]
    asked = next(n for n in itertools.count(steps)
                 if spec.denoising_steps({**spec.defaults(), "num_inference_steps": n}) >= steps)
    inputs, gen_args = sample_call(spec, size, num_inference_steps=asked, seed=1)
    body = encode_request(inputs, gen_args)
    started = time.perf_counter()
    answer = runtime.invoke_endpoint(**invoke_arguments(ENDPOINT_NAME, model, body))["Body"].read()
    seconds = time.perf_counter() - started
    return seconds, decode_answer(answer)


def refused(runtime, model: str, size: int, steps: int) -> tuple[float, str | None]:
    """(seconds, the refusal's message), or the message None when the call was answered."""
    started = time.perf_counter()
    try:
        call(runtime, model, size, steps)
    except botocore.exceptions.ClientError as error:
        return time.perf_counter() - started, error.response.get("Error", {}).get("Message", str(error))
    return time.perf_counter() - started, None


def resident_bytes(endpoint, model: str) -> int:
    """The resident memory of the model's Triton stub processes (VmRSS)."""
    entry = endpoint.registry.entry(archive_name(model))
    total = 0
    for pid in endpoint.triton.stub_pids(entry.folder):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


PLAIN_LOAD = """
import gc, sys, time
import diffusers, torch
from sdserve.catalog import MODELS
from sdserve.checkpoint import checkpoint_variant
model, folder = sys.argv[1], sys.argv[2]
pipeline_class = getattr(diffusers, MODELS[model].pipeline_class)
for _ in range(2):  # the first pays for the imports diffusers and transformers make lazily
    started = time.perf_counter()
    pipe = pipeline_class.from_pretrained(folder, dtype=torch.float32, variant=checkpoint_variant(folder),
                                          use_safetensors=True)
    seconds = time.perf_counter() - started
    del pipe
    gc.collect()
print(seconds)
"""


def plain_load_seconds(model: str, folder: Path) -> float:
    """The pipeline's own from_pretrained of `folder` (fp32, safetensors, as a model loads it on
    a CPU) in a fresh process, its imports made: what a load through the endpoint is held to."""
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, model, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"from_pretrained of {folder} failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure_model(work: Path, model: str, sizes: Sizes, repeats: int, settings: dict) -> dict:
    out: dict = {}
    with endpoint_on(work, model, **settings) as endpoint:
        store = endpoint.registry.store = TimedStore(endpoint.registry.store)
        runtime = runtime_client(endpoint.url)
        print(f"   {model}:")
        cold = call(runtime, model, *COLD)
        entry = endpoint.registry.entry(archive_name(model))
        target = archive_name(model)
        fetch, extract = store.fetch_s.get(target, 0.0), store.extract_s.get(target, 0.0)
        split = {"fetch_s": fetch, "extract_s": extract, "load_s": entry.load_seconds - fetch - extract,
                 "first_answer_s": cold - entry.load_seconds}
        out["cold_split_s"] = split
        print("     cold start: " + ", ".join(f"{key[:-2]} {value:.1f} s" for key, value in split.items()))
        out["cold"] = report("cold start, first call", cold, COLD_START_GOAL_S, "s", f"({COLD[0]} px, {COLD[1]} steps)")
        plain = plain_load_seconds(model, checkpoint_dir(entry.repo, model))
        out["plain_from_pretrained_s"] = plain
        out["extract_load"] = report("extract + load / plain from_pretrained", (extract + split["load_s"]) / plain,
                                     EXTRACT_LOAD_GOAL, "x", f"(from_pretrained alone {plain:.1f} s)")
        warm = statistics.median(call(runtime, model, *sizes.warm) for _ in range(repeats))
        out["warm"] = report("warm call", warm, CALL_BUDGET_S, "s", f"({sizes.warm[0]} px, {sizes.warm[1]} step)")
        resident, budgeted = resident_bytes(endpoint, model), entry.size_bytes
        out["resident_bytes"], out["budgeted_bytes"] = resident, budgeted
        out["memory"] = report("resident memory / the size budgeted", resident / budgeted, 1.0, "x",
                               f"({resident / MB:.0f} MB resident, {budgeted / MB:.0f} MB folder)")
        for size, steps in sizes.teach:  # the model learns its speed at two sizes
            call(runtime, model, size, steps)
        seconds, message = refused(runtime, model, *sizes.refused)
        label = f"{sizes.refused[0]} px x {sizes.refused[1]} steps"
        out["refusal_message"] = message
        names_what = message is not None and "lower" in message and "num_inference_steps" in message
        if message is None:
            outcome = "ANSWERED, not refused"
        elif "stopped at step" in message:  # the budget let it start; the deadline stopped it
            outcome = "STOPPED at its deadline, not refused at once"
        else:
            outcome = "refused"
        out["refusal"] = report(f"{label} {outcome}", seconds, REFUSAL_GOAL_S, "s",
                                "" if message is None else "(names what to lower)" if names_what
                                else "(does NOT name what to lower)")
        if message is not None:
            print(f"     {message[:300]}")
        seconds, message = refused(runtime, model, *sizes.fits)
        label = f"{sizes.fits[0]} px x {sizes.fits[1]} steps"
        out["fits"] = report(f"{label} answered" if message is None else f"{label}: REFUSED", seconds,
                             INVOCATION_SECONDS, "s")
    return out


# --- 3. Cycling --------------------------------------------------------------------------------


def cycle(work: Path, repository: Path, models: list[str], settings: dict) -> dict:
    """The models in turn, twice, under a budget of the two largest folders, on a fresh cache:
    every call loads its model; only the first round's fetch and extract their archives."""
    sizes = sorted((folder_size(checkpoint_dir(repository, model).resolve()) for model in models), reverse=True)
    budget_gb = sum(sizes[:2]) / 2**30 * 1.01  # the metadata beside the weights
    shutil.rmtree(work / "cache-cycling", ignore_errors=True)
    oom_kills = kernel_oom_kills()
    with endpoint_on(work, "cycling", cache="cache-cycling", max_gb=budget_gb, **settings) as endpoint:
        store = endpoint.registry.store = TimedStore(endpoint.registry.store)
        runtime = runtime_client(endpoint.url)
        rounds = [[answered(runtime, model, *COLD) for model in models] for _ in range(2)]
        listing = endpoint.registry.snapshot()
        fetches = sum(store.fetches.values())
    oom_kills = kernel_oom_kills() - oom_kills
    times = [seconds for round_ in rounds for seconds, _ in round_]
    same = sum(all(within_one_level(a, b) for a, b in zip(first.images, second.images, strict=True))
               for (_, first), (_, second) in zip(*rounds, strict=True))
    loads, evictions = sum(m["loads"] for m in listing), sum(m["evictions"] for m in listing)
    print(f"   budget {budget_gb:.2f} GB; {len(times)} calls: {loads} loads, {evictions} evictions; "
          f"{oom_kills} processes killed for memory")
    return {"budget_gb": budget_gb, "per_call_s": times, "loads": loads, "evictions": evictions,
            "per_call": report("a call that loads its model (median)", statistics.median(times),
                               COLD_START_GOAL_S, "s", f"(max {max(times):.1f} s)"),
            "fetches": report("archives fetched and extracted / models", fetches / len(models), 1.0, "x",
                              f"({fetches} for {loads} loads: a reload finds its archive on disk)"),
            "same_answers": report("second round answered as the first", same / len(models), 1.0, "x",
                                   f"({same} of {len(models)} within one level of 255)"),
            "oom_kills": oom_kills}


def within_one_level(first, second) -> bool:
    """The project's determinism guarantee: same size, every pixel within one level of 255."""
    return first.size == second.size and largest_difference(first.convert("RGB"), second.convert("RGB")) <= 1


def kernel_oom_kills() -> int:
    """The kernel's count of processes it killed for memory (/proc/vmstat), printed as a difference."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
