"""Benchmark of the local endpoint, measured in one run (the machine is shared and noisy, so
compared things alternate):

1. Cold first call vs warm call per model, through the studio's client layer (boto3
   sagemaker-runtime -> the local endpoint -> Triton in SageMaker MME mode). The cold call
   includes extracting the archive and Triton's load (each model's stub imports torch).
2. Overhead of the whole path for one text-to-image request, at each step count given: the
   end-to-end client call vs the same pipeline called in-process, alternating. Also shown, to
   place the overhead: the same body posted straight to Triton's SageMaker port (no front),
   sdserve's serve_batch in-process (pipeline + PNG encoding + parameters, i.e. what the model
   runs inside Triton), and the client call to a copy of the model whose config has no
   dynamic_batching block (the shipped config waits up to 1 ms for a batch to fill).
3. The eviction cycle: a budget of 2 models, the 4 models called in turn twice; every call
   loads its model (after evicting the least recently used one), so the time per call is a load
   plus a call. The archives are already extracted by then (cached on disk as on SageMaker).

    python -m bench.local_endpoint [--size 64] [--steps 2 25] [--repeats 9] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import build_store, local_endpoint, timed
from deploy.invoke import sample_job
from sdserve.catalog import MODELS, MODELS_BY_TASK
from sdserve.wire import encode_request
from serving.archive import REPO_ROOT, build_model_archive
from serving.derived import model_variant
from studio.client import EndpointConfig, StudioClient

PROMPT = "a lighthouse at dusk"
GENERATE = MODELS_BY_TASK["generate"]
UNBATCHED = "unbatched"  # a copy of the generate model without the dynamic-batching window


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_endpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 25],
                        help="step counts for the overhead comparison (default 2 25)")
    parser.add_argument("--cold-steps", type=int, default=2, help="steps of the cold/warm and eviction calls")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "serving" / "models")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="the endpoint's log lines too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    import torch
    from sdserve.batch import serve_batch
    from sdserve.catalog import CHECKPOINT_DIR
    from sdserve.pipelines import load_pipeline

    figures: dict = {"size": args.size, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as work:
        work = Path(work)
        build_store(work / "store", args.repository)
        model_variant(args.repository, GENERATE, work / "unbatched-repo", UNBATCHED, dynamic_batching=False)
        build_model_archive(UNBATCHED, work / "unbatched-repo", work / "store")

        # 1 + 2: one endpoint with room for every model.
        with local_endpoint(work, max_models=5) as endpoint:
            client = StudioClient(EndpointConfig(endpoint_name="sd-studio", endpoint_url=endpoint.url))
            print(f"Local endpoint {endpoint.url}, tiny weights, {args.size}x{args.size}, "
                  f"torch threads {torch.get_num_threads()}, medians of {args.repeats}")
            print("\n1. Cold first call vs warm call, through the client layer "
                  f"({args.cold_steps} steps; each model makes {args.size} px images)")
            print(f"   {'model':11} {'cold':>11} {'of which load':>14} {'warm':>11}  cold/warm")
            figures["cold_warm"] = {}
            for model in MODELS:
                cold = timed(lambda: sample_job(client, MODELS[model], args.size, num_inference_steps=args.cold_steps, seed=1))
                load = endpoint.registry.entry(f"{model}.tar.gz").load_seconds
                warm = statistics.median(timed(lambda: sample_job(client, MODELS[model], args.size, num_inference_steps=args.cold_steps, seed=1))
                                         for _ in range(args.repeats))
                figures["cold_warm"][model] = {"cold_s": cold, "load_s": load, "warm_s": warm}
                print(f"   {model:11} {ms(cold)} {ms(load)}   {ms(warm)}  {cold / warm:7.1f}x")

            print(f"\n2. One {GENERATE.name} request: end-to-end client call vs in-process pipeline call")
            loaded = load_pipeline(GENERATE.name, args.repository / GENERATE.name / "1" / CHECKPOINT_DIR)
            port = endpoint.triton.server.ports["sagemaker"]
            triton_name = endpoint.registry.entry(f"{GENERATE.name}.tar.gz").triton_name
            figures["overhead"] = {}
            for steps in args.steps:
                gen_args = {"num_inference_steps": steps, "width": args.size, "height": args.size, "seed": 1}
                body = encode_request({"prompt": PROMPT, "negative_prompt": ""},
                                      {**gen_args, "guidance_scale": 7.5, "scheduler": "default",
                                       "num_images_per_prompt": 1})
                arrays = {name: np.array([[value.encode()]], dtype=np.object_) for name, value in
                          {tensor["name"]: tensor["data"][0] for tensor in json.loads(body)["inputs"]}.items()}
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

                def in_process() -> None:
                    loaded.pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, height=args.size,
                                width=args.size, guidance_scale=7.5,
                                generator=torch.Generator("cpu").manual_seed(1))

                def serve_batch_call() -> None:
                    serve_batch(loaded, [{"prompt": arrays["prompt"], "negative_prompt": arrays["negative_prompt"],
                                          "image": None, "mask_image": None, "gen_args": arrays["gen_args"]}])

                def triton_direct() -> None:
                    connection.request("POST", f"/models/{triton_name}/invoke", body=body,
                                       headers={"Content-Type": "application/json",
                                                "X-Amzn-SageMaker-Target-Model": triton_name})
                    response = connection.getresponse()
                    response.read()
                    assert response.status == 200, response.status

                def end_to_end() -> None:
                    client.generate(PROMPT, num_inference_steps=steps, width=args.size, height=args.size, seed=1)

                def end_to_end_unbatched() -> None:
                    client.invoke(UNBATCHED, {"prompt": PROMPT, "negative_prompt": ""},
                                  {**gen_args, "guidance_scale": 7.5, "scheduler": "default",
                                   "num_images_per_prompt": 1})

                variants = {"in-process pipeline": in_process, "in-process serve_batch": serve_batch_call,
                            "Triton SageMaker port": triton_direct, "client -> endpoint": end_to_end,
                            "same, no batching window": end_to_end_unbatched}
                for function in variants.values():  # warm-up
                    function()
                samples: dict[str, list[float]] = {name: [] for name in variants}
                for _ in range(args.repeats):
                    for name, function in variants.items():  # alternating
                        samples[name].append(timed(function))
                connection.close()
                medians = {name: statistics.median(values) for name, values in samples.items()}
                minima = {name: min(values) for name, values in samples.items()}
                base, base_min = medians["in-process pipeline"], minima["in-process pipeline"]
                ratio = medians["client -> endpoint"] / base
                ratio_min = minima["client -> endpoint"] / base_min
                figures["overhead"][steps] = {"median_s": medians, "min_s": minima, "samples_s": samples,
                                              "ratio_median": ratio, "ratio_min": ratio_min}
                print(f"   {steps} steps:{'median':>27} {'vs in-process':>14} {'min':>11} {'vs in-process':>14}")
                for name in variants:
                    print(f"     {name:24} {ms(medians[name])} {medians[name] / base:8.2f}x "
                          f"(+{(medians[name] - base) * 1000:3.0f} ms) {ms(minima[name])} "
                          f"{minima[name] / base_min:6.2f}x (+{(minima[name] - base_min) * 1000:3.0f} ms)")
                unbatched = medians["same, no batching window"] / base
                figures["overhead"][steps]["ratio_unbatched_median"] = unbatched
                print(f"     overhead ratio end-to-end / in-process: {ratio:.2f} (medians), {ratio_min:.2f} (minima); "
                      f"{unbatched:.2f} without the batching window")

        # 3: a budget of two, the four models in turn, twice (the same cache: archives extracted).
        with local_endpoint(work, max_models=2) as endpoint:
            client = StudioClient(EndpointConfig(endpoint_name="sd-studio", endpoint_url=endpoint.url))
            print(f"\n3. Eviction cycle: budget of 2 models, {' '.join(MODELS)} twice, {args.cold_steps} steps")
            times = []
            for round_ in (1, 2):
                for model in MODELS:
                    times.append(timed(lambda: sample_job(client, MODELS[model], args.size, num_inference_steps=args.cold_steps, seed=1)))
            listing = {m["target_model"]: m for m in endpoint.registry.snapshot()}
            loads = sum(m["loads"] for m in listing.values())
            evictions = sum(m["evictions"] for m in listing.values())
            print(f"   {len(times)} calls, {loads} loads, {evictions} evictions: "
                  f"{statistics.mean(times):.2f} s per call on average "
                  f"(median {statistics.median(times):.2f} s, min {min(times):.2f}, max {max(times):.2f})")
            figures["eviction_cycle"] = {"calls": len(times), "loads": loads, "evictions": evictions,
                                         "mean_s": statistics.mean(times), "median_s": statistics.median(times),
                                         "per_call_s": times}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
