"""The full-size models on a GPU, in this process (no Triton): throughput, memory, the upscaler.

Prepared to run as one script on a GPU machine that has torch and transformers but neither
diffusers nor a network. diffusers travels as its wheel (pure Python, no dependencies beyond
what transformers brings, except importlib_metadata, which it uses only on Python < 3.8):

    here:   .venv/bin/python -m pip download diffusers==0.42.1 --no-deps -d build/wheels
    there:  python bench/gpu_full_size.py --diffusers-wheel build/wheels/diffusers-0.42.1-py3-none-any.whl \\
                --build --json $OUT/gpu-full-size.json

(or `pip install --no-deps` the wheel first and leave --diffusers-wheel out). The checkout's
`serving` and `sdserve` are imported from this file's checkout, nothing installed. --build writes
the full-size weights the script needs into --repository (serving/full_size.py; initialised on
the GPU: a minute, 10 GB for the four models). Measured, each printed and written to --json:

1. the Generate model at 512x512, 25 steps: images/s at batch 1, 2, 4 and 8, with plain diffusers
   (from_pretrained in fp16, its defaults: SDPA attention, its own scheduler) and with the
   project's settings (sdserve.pipelines: load_pipeline and run_call, per-row generators, the
   step callbacks that time each step and stop a call at its deadline).
2. The peak GPU memory of each of the four models making one image at its working size.
3. The x4 upscaler at 256 and 512 px input; its VAE decoding a 2048 px image, untiled and tiled.
4. One optimisation (--optimisation) at batch 8: images/s against plain diffusers, and whether
   the images stay within one level (of 255) of the unoptimised ones.

It runs on a CPU too, at 64 px on the tiny weights (tests/test_full_size.py), so it cannot rot:
    python bench/gpu_full_size.py --device cpu --repository serving/models --size 64 --steps 2 \\
        --batches 1 2 --upscale-inputs 32 --decode-size 128 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "serving"):  # `serving` and `sdserve` from this checkout
    if str(path) not in sys.path:
        sys.path.append(str(path))

from sdserve.catalog import MODELS_BY_TASK  # noqa: E402 (after the path above; standard library only)

GENERATE, UPSCALE = MODELS_BY_TASK["generate"].name, MODELS_BY_TASK["upscale"].name
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
ASSETS = REPO_ROOT / "assets"
# The side the SD 2 models were trained at, for a model whose entry names no working side.
TRAINED_SIDE = 512
OPTIMISATIONS = ("channels_last", "fuse_qkv", "compile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_full_size.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "build" / "full-size-models",
                        help="model repository holding <model>/1/checkpoint (default: build/full-size-models)")
    parser.add_argument("--build", action="store_true",
                        help="write the full-size weights missing or stale in --repository first")
    parser.add_argument("--diffusers-wheel", type=Path, help="diffusers' wheel, installed here if it is missing")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512, help="the Generate model's side for the throughput runs")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--working-side", type=int, help="one side for every model's memory run (default: each its own)")
    parser.add_argument("--upscale-inputs", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--decode-size", type=int, default=2048, help="px of the upscaler VAE's decode")
    parser.add_argument("--optimisation", choices=OPTIMISATIONS, default="channels_last")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each kind (after one warm-up)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    ensure_diffusers(args.diffusers_wheel)

    import torch

    device = torch.device(args.device)
    if args.build:
        build(args.repository, device.type)
    figures: dict[str, Any] = {"device": describe(device), "size": args.size, "steps": args.steps}
    print(f"{figures['device']}; {GENERATE} {args.size}x{args.size}, {args.steps} steps")
    # Each section loads what it measures and lets it go when it returns: one model in memory at a time.
    figures["throughput"] = {"attention": None, "plain diffusers": {}, "project": {}}
    figures["throughput"].update(plain_throughput(args, device))
    free(device)
    figures["throughput"].update(project_throughput(args, device))
    free(device)
    print_throughput(args, figures["throughput"])
    print("\n2. Peak GPU memory of one image at each model's working size")
    figures["peak_memory"] = {}
    from sdserve.catalog import MODELS

    for model in MODELS:
        figures["peak_memory"][model] = peak_memory(args, device, model)
        free(device)
    figures["upscaler"] = upscaler(args, device)
    free(device)
    figures["optimisation"] = optimisation(args, device)
    free(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def ensure_diffusers(wheel: Path | None) -> None:
    """diffusers importable: installed already, or from its wheel into a temporary folder."""
    if importlib.util.find_spec("diffusers") is not None:
        return
    if wheel is None:
        sys.exit("error: diffusers is not installed; pass --diffusers-wheel (see `--help` for how to bring it)")
    target = tempfile.mkdtemp(prefix="diffusers-")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", target, str(wheel)], check=True)
    sys.path.insert(0, target)


def build(repository: Path, device: str) -> None:
    from sdserve.checkpoint import checkpoint_dir
    from sdserve.catalog import MODELS

    from serving import full_size, weights

    for model in MODELS:
        folder = checkpoint_dir(repository, model)
        if not full_size.is_current(model, folder):
            started = time.perf_counter()
            weights.write_full_size(model, folder, device=device)
            print(f"built {model} in {time.perf_counter() - started:.0f} s")


def describe(device) -> str:
    import torch

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{device.type}, torch {torch.__version__}"


def checkpoint(args, model: str) -> Path:
    from sdserve.checkpoint import checkpoint_dir, checkpoint_variant, read_marker

    folder = checkpoint_dir(args.repository, model)
    marker = read_marker(folder)
    if not marker:
        sys.exit(f"error: no weights in {folder} (--build writes the full-size ones)")
    if checkpoint_variant(folder) != marker.get("variant"):  # what load_pipeline will ask for
        sys.exit(f"error: sdserve.checkpoint.checkpoint_variant({folder}) is not the marker's variant "
                 f"{marker.get('variant')!r}: the project's loader cannot read these weights")
    return folder


def plain_pipeline(args, model: str, device) -> Any:
    """The model as diffusers loads it by default: from_pretrained in fp16 (fp32 on a CPU)."""
    import diffusers
    import torch
    from sdserve.catalog import MODELS
    from sdserve.checkpoint import read_marker

    folder = checkpoint(args, model)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = getattr(diffusers, MODELS[model].pipeline_class).from_pretrained(
        folder, variant=read_marker(folder).get("variant"), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def seconds(device, function) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def median_of(args, device, function) -> float:
    function()  # warm-up: kernels chosen, memory allocated
    return statistics.median(seconds(device, function) for _ in range(args.repeats))


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. Throughput ------------------------------------------------------------------------------


def plain_throughput(args, device) -> dict:
    """Images/s of plain diffusers at each batch: one prompt repeated, the pipeline's defaults."""
    import torch

    print(f"\n1. {GENERATE} images/s ({args.repeats} timed calls after a warm-up; median)")
    pipe = plain_pipeline(args, GENERATE, device)
    out = {}
    for batch in args.batches:
        def plain_call() -> None:
            pipe([PROMPT] * batch, num_inference_steps=args.steps, height=args.size, width=args.size,
                 generator=torch.Generator("cpu").manual_seed(0))
        out[batch] = batch / median_of(args, device, plain_call)
    return {"plain diffusers": out}


def project_throughput(args, device) -> dict:
    """Images/s as the endpoint makes them: load_pipeline, and run_call on one row per image."""
    from sdserve.catalog import MODELS
    from sdserve.pipelines import ImageRow, load_pipeline, run_call
    from sdserve.request import GenerationRequest

    loaded = load_pipeline(GENERATE, checkpoint(args, GENERATE), device)
    gen_args = json.dumps({"num_inference_steps": args.steps, "width": args.size, "height": args.size})
    request = GenerationRequest(model=GENERATE, prompt=PROMPT, negative_prompt="",
                                args=MODELS[GENERATE].parse_gen_args(gen_args))
    out = {}
    for batch in args.batches:
        rows = [ImageRow(request, seed=seed) for seed in range(batch)]
        out[batch] = batch / median_of(args, device, lambda: run_call(loaded, rows))
    return {"attention": loaded.attention, "project": out}


def print_throughput(args, figures: dict) -> None:
    print(f"   {'batch':>5} {'plain diffusers':>16} {'project':>10} {'project/plain':>14}   ({figures['attention']})")
    for batch in args.batches:
        plain, project = figures["plain diffusers"][batch], figures["project"][batch]
        print(f"   {batch:5} {plain:16.2f} {project:10.2f} {project / plain:14.2f}")


# --- 2. Peak memory ----------------------------------------------------------------------------


def working_side(spec) -> int:
    """What the studio asks of a model most: its tile where it tiles, else the side it works at
    (px of its input, or of the image it makes)."""
    return spec.tiling.side if spec.tiling else (spec.working_side or TRAINED_SIDE)


def working_call(args, model: str, side: int) -> dict[str, Any]:
    """The pipeline arguments of one image of `model` at its working side."""
    from PIL import Image
    from sdserve.catalog import MODELS

    spec = MODELS[model]
    call: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": args.steps}
    if not spec.takes_image:
        return {**call, "height": side, "width": side}
    with Image.open(ASSETS / "sample.png") as image:
        call["image"] = image.convert("RGB").resize((side, side))
    if spec.takes_mask:
        with Image.open(ASSETS / "sample_mask.png") as mask:
            call["mask_image"] = mask.convert("L").resize((side, side))
    if spec.size_from_image:
        call.update(height=side, width=side)
    return call


def peak_of(device, function) -> tuple[float, float | None]:
    """(seconds, peak GPU memory allocated in GiB: None off a GPU) of one call."""
    import torch

    if device.type != "cuda":
        return seconds(device, function), None
    torch.cuda.reset_peak_memory_stats(device)
    spent = seconds(device, function)
    return spent, torch.cuda.max_memory_allocated(device) / 2**30


def peak_memory(args, device, model: str) -> dict:
    import torch

    from sdserve.catalog import MODELS

    side = args.working_side or working_side(MODELS[model])
    pipe = plain_pipeline(args, model, device)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    call = working_call(args, model, side)
    spent, peak = peak_of(device, lambda: pipe(**call, generator=torch.Generator("cpu").manual_seed(0)))
    print(f"   {model:10} {side:5} px: {spent:6.2f} s, peak {fmt_gib(peak)} (weights {fmt_gib(weights_gib)})")
    return {"side": side, "seconds": spent, "peak_gib": peak, "weights_gib": weights_gib}


def fmt_gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


# --- 3. The upscaler ---------------------------------------------------------------------------


def upscaler(args, device) -> dict:
    import torch
    from PIL import Image

    print("\n3. The x4 upscaler, and its VAE decoding a large image")
    out: dict[str, Any] = {"inputs": {}, "decode": {}}
    pipe = plain_pipeline(args, UPSCALE, device)
    with Image.open(ASSETS / "sample.png") as sample:
        sample = sample.convert("RGB")
    for side in args.upscale_inputs:
        image = sample.resize((side, side))
        out["inputs"][side] = guarded(device, lambda: pipe(
            prompt=PROMPT, image=image, num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(0)))
        print(f"   {side} px in, {4 * side} px out: {show(out['inputs'][side])}")
    vae = pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(1, vae.config.latent_channels, args.decode_size // factor, args.decode_size // factor,
                          generator=torch.Generator("cpu").manual_seed(0)).to(device, vae.dtype)
    for tiled in (False, True):
        vae.enable_tiling() if tiled else vae.disable_tiling()
        with torch.no_grad():
            result = guarded(device, lambda: vae.decode(latents / vae.config.scaling_factor))
        out["decode"]["tiled" if tiled else "untiled"] = result
        print(f"   VAE decode to {args.decode_size} px, {'tiled' if tiled else 'untiled'} ({vae.dtype}): {show(result)}")
    return out


def guarded(device, function) -> dict:
    """Seconds and peak memory of a call; running out of GPU memory is a result too."""
    import torch

    try:
        spent, peak = peak_of(device, function)
    except torch.cuda.OutOfMemoryError as error:
        free(device)
        return {"out_of_memory": str(error).splitlines()[0]}
    return {"seconds": spent, "peak_gib": peak}


def show(result: dict) -> str:
    if "out_of_memory" in result:
        return f"OUT OF MEMORY ({result['out_of_memory'][:120]})"
    return f"{result['seconds']:.2f} s, peak {fmt_gib(result['peak_gib'])}"


# --- 4. One optimisation -----------------------------------------------------------------------


def optimisation(args, device) -> dict:
    import numpy as np
    import torch

    batch = max(args.batches)
    print(f"\n4. {args.optimisation} at batch {batch}, against plain diffusers")
    pipe = plain_pipeline(args, GENERATE, device)

    def images() -> list:
        return pipe([PROMPT] * batch, num_inference_steps=args.steps, height=args.size, width=args.size,
                    generator=torch.Generator("cpu").manual_seed(0)).images

    reference = images()
    plain = batch / median_of(args, device, images)
    first_call = seconds(device, lambda: apply(pipe, args.optimisation))
    first_call += seconds(device, images)  # torch.compile compiles on the first call
    optimised_images = images()
    optimised = batch / statistics.median(seconds(device, images) for _ in range(args.repeats))
    differences = np.stack([np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
                            for a, b in zip(reference, optimised_images)])
    out = {"name": args.optimisation, "batch": batch, "plain_images_per_s": plain, "images_per_s": optimised,
           "ratio": optimised / plain, "first_call_s": first_call, "max_level_difference": int(differences.max()),
           "share_over_one_level": float((differences > 1).mean())}
    within = "within one level" if out["max_level_difference"] <= 1 else \
        f"NOT within one level (max {out['max_level_difference']}, {out['share_over_one_level']:.1%} of values over 1)"
    print(f"   {plain:.2f} -> {optimised:.2f} images/s: ratio {out['ratio']:.2f}; images {within}; "
          f"first call after applying it {first_call:.1f} s")
    return out


def apply(pipe, name: str) -> None:
    import torch

    if name == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    elif name == "fuse_qkv":
        pipe.fuse_qkv_projections()
    else:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)


def quiet() -> None:
    """The figures, not every load's progress bars and notices (when run as a script)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    if importlib.util.find_spec("diffusers") is not None:  # else main() installs it, and prints what it says
        quiet()
    sys.exit(main())
