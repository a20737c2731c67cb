"""Serving benchmark, measured side by side in one run (machines are noisy).

1. Throughput of 8 concurrent text-to-image requests with Triton's dynamic batching on vs off:
   one server holds two copies of the model, identical but for the `dynamic_batching` block,
   and rounds alternate between them.
2. Overhead of Triton for one request: the HTTP round trip vs calling the same pipeline
   in-process, alternating.

    python -m bench.pipelines [--steps 10] [--size 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as httpclient

from sdserve.catalog import CHECKPOINT_DIR, MODELS_BY_TASK
from sdserve.pipelines import load_pipeline
from serving.local_triton import LocalTriton
from serving.derived import model_variant

REPOSITORY = Path(__file__).resolve().parent.parent / "serving" / "models"
CONCURRENT = 8
GENERATE = MODELS_BY_TASK["generate"]
UNBATCHED = f"{GENERATE.name}_unbatched"


def bench_repository(repository: Path, workdir: Path) -> Path:
    """The generate model as it ships, and a copy without dynamic batching named UNBATCHED."""
    bench_repo = workdir / "models"
    bench_repo.mkdir()
    (bench_repo / GENERATE.name).symlink_to(repository / GENERATE.name)
    model_variant(repository, GENERATE, bench_repo, UNBATCHED, dynamic_batching=False)
    return bench_repo


def request_inputs(gen_args: dict) -> list:
    inputs = []
    for name, value in (("prompt", "a lighthouse at dusk"), ("gen_args", json.dumps(gen_args))):
        tensor = httpclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def concurrent_round(client, model: str, gen_args: dict) -> float:
    """Seconds for CONCURRENT requests sent at once to finish."""
    started = time.perf_counter()
    handles = [client.async_infer(model, request_inputs({**gen_args, "seed": seed})) for seed in range(CONCURRENT)]
    for handle in handles:
        handle.get_result()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    gen_args = {"num_inference_steps": args.steps, "height": args.size, "width": args.size}
    print(f"{GENERATE.name}, tiny weights, {args.size}x{args.size}, {args.steps} steps, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as workdir:
        with LocalTriton(bench_repository(args.repository.resolve(), Path(workdir))) as triton, \
                httpclient.InferenceServerClient(triton.http_address, concurrency=CONCURRENT, network_timeout=600) as client:
            for model in (GENERATE.name, UNBATCHED):  # warm-up
                concurrent_round(client, model, gen_args)
            batched, unbatched = [], []
            for _ in range(args.rounds):
                batched.append(concurrent_round(client, GENERATE.name, gen_args))
                unbatched.append(concurrent_round(client, UNBATCHED, gen_args))
            on, off = statistics.median(batched), statistics.median(unbatched)
            print(f"{CONCURRENT} concurrent requests: dynamic batching on {on:.2f} s, off {off:.2f} s (median of {args.rounds})")
            print(f"throughput ratio batching on/off: {off / on:.2f}x")

            loaded = load_pipeline(GENERATE.name, args.repository / GENERATE.name / "1" / CHECKPOINT_DIR)
            one_request = {**gen_args, "seed": 1}
            direct, served = [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                loaded.pipe(
                    prompt="a lighthouse at dusk",
                    num_inference_steps=args.steps,
                    height=args.size,
                    width=args.size,
                    generator=torch.Generator("cpu").manual_seed(1),
                )
                direct.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.infer(GENERATE.name, request_inputs(one_request))
                served.append(time.perf_counter() - started)
            in_process, round_trip = statistics.median(direct), statistics.median(served)
            print(f"one request: in-process pipeline {in_process * 1000:.0f} ms, Triton round trip {round_trip * 1000:.0f} ms")
            print(f"overhead ratio Triton/in-process: {round_trip / in_process:.2f}")


if __name__ == "__main__":
    main()
