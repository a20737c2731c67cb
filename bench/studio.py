"""Many designers, one endpoint: the studio's sharing measured side by side in one run.

Everything runs here, on 127.0.0.1: the local endpoint (real Triton, tiny weights, SageMaker's
limits) and the studio in front of it (the real Gradio app), driven by gradio_client, one client
per designer (each its own session). Each line is a ratio of two things measured in this run:

1. 8 designers at once, each one 1-image Generate, through the studio vs the same 8 calls made
   straight to the endpoint with boto3, in pairs of rounds (which goes first alternates): the
   median over the pairs of studio throughput / direct.
2. Head of line: designer B's 1-image job while designer A's 4-image job runs, vs B alone.
3. Over the limit: a call predicted over the call budget is refused (time to the refusal), and a
   call that cannot be predicted yet is stopped by the budget (when, against the budget).
4. The 512x512 upscale: the largest answer of the tiled job vs the 6 MB cap, and its time vs the
   same upscale sent as one call (whose answer the server must squeeze into the cap as WebP).
5. Sending on warms up: a designer's generate -> Send to Erase -> (think time) -> erase, on an
   endpoint with room for one model (so the erase's model is cold after every generate): the
   erase's wait when Send to warmed the model up vs when it did not (alternating rounds).

The endpoint's models compute with all cores but one (--compute-threads): in use the endpoint's
accelerator, the studio and the designers' browsers are separate machines. Sharing every core here,
the studio's own work (about 0.1 s of CPU for 8 jobs) and the harness's would be taken from the
pipelines' threads, which all wait for the slowest (0 gives the models every core, to compare).

    python -m bench.studio [--pairs 9] [--rounds 3] [--size 64] [--steps 10] [--think 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

from bench.harness import build_store, designer_client, local_endpoint, timed
from deploy.invoke import PROMPT, sample_image, sample_mask
from sdserve.catalog import CALL_BUDGET_S, MAX_PAYLOAD_BYTES, MODELS_BY_TASK
from serving.archive import REPO_ROOT
from studio.client import EndpointConfig, StudioClient, StudioError
from studio.planning import plan_job
from studio.process import StudioProcess
from studio.runner import run_job
from studio.tasks import TASKS

DESIGNERS = 8


def running_studio(endpoint_url: str, work: Path, name: str = "studio") -> StudioProcess:
    """The studio as it runs in use, in front of `endpoint_url`: its own process (`python -m
    studio`), so that its work and the harness's do not share one interpreter; no quota in the way.
    Its results and log in `work` under `name`. Use it as a context manager; its URL is `.url`."""
    return StudioProcess("--endpoint-url", endpoint_url, "--results-dir", str(work / f"{name}-results"),
                         "--jobs-per-minute", "1000", "--work-per-day", "10000000",
                         "--daily-budget", "10000000", "--jobs-at-once", "64", log=work / f"{name}.log")


def at_once(functions: list[Callable[[], object]]) -> float:
    """Seconds for all of `functions`, started together, to finish."""
    with ThreadPoolExecutor(len(functions)) as pool:
        started = time.perf_counter()
        for future in [pool.submit(function) for function in functions]:
            future.result()
        return time.perf_counter() - started


class AnswerSizes:
    """Wraps a boto3 sagemaker-runtime client to note the size of every answer body."""

    def __init__(self, runtime):
        self.runtime, self.sizes = runtime, []

    def invoke_endpoint(self, **kwargs):
        response = self.runtime.invoke_endpoint(**kwargs)
        body = response["Body"].read()
        self.sizes.append(len(body))
        return {**response, "Body": _Body(body)}


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def read(self) -> bytes:
        return self.data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.studio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of parts 2 and 5 (default 3)")
    parser.add_argument("--pairs", type=int, default=9,
                        help="part 1: pairs of rounds, studio and direct side by side (default 9)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--upscale-steps", type=int, default=2)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "serving" / "models")
    parser.add_argument("--think", type=float, default=10.0, help="part 5: seconds between Send to and Erase")
    parser.add_argument("--compute-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="CPU threads the endpoint's models compute with (default: all cores but one; "
                             "0: every core, torch's default)")
    parser.add_argument("--parts", default="12345", help="which of the five to run (default 12345)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.compute_threads = args.compute_threads or None  # 0: torch's default, every core
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    generate = {"prompt": PROMPT, "width": args.size, "height": args.size, "num_inference_steps": args.steps}
    figures: dict = {"designers": DESIGNERS, "size": args.size, "steps": args.steps, "rounds": args.rounds,
                     "pairs": args.pairs,
                     "compute_threads": args.compute_threads, "cores": os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="bench-studio-") as work:
        work = Path(work)
        build_store(work / "store", args.repository)
        if set(args.parts) & set("1234"):
            shared(args, work, generate, figures)
        if "5" in args.parts:
            figures["warm_up_on_send"] = warm_up_on_send(args, work)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def shared(args, work: Path, generate: dict, figures: dict) -> None:
    """Parts 1 to 4: one endpoint with room for every model, the studio in front of it."""
    with local_endpoint(work, compute_threads=args.compute_threads) as endpoint, \
            running_studio(endpoint.url, work) as studio:
        url = studio.url
        config = EndpointConfig(endpoint_name=endpoint.settings.endpoint_name, endpoint_url=endpoint.url)
        direct = StudioClient(config)
        # The designers' browsers are elsewhere in real use, so the harness keeps its own work on
        # these two cores out of the studio's figures: it does not download the images, and it
        # does not verify TLS on this plain-HTTP 127.0.0.1 URL (designer_client: with verification
        # on, ~47 ms of CPU a request measured here, over 0.5 s a round for 8 designers, charged
        # to the studio's side).
        designers = [designer_client(url) for _ in range(DESIGNERS)]
        threads = f"{args.compute_threads} of {os.cpu_count()} cores" if args.compute_threads else "every core"
        print(f"Studio {url} in front of the local endpoint {endpoint.url} (tiny weights, CPU, the models "
              f"computing with {threads}), {args.size} px, {args.steps} steps; medians of {args.pairs} pairs "
              f"of rounds (part 1), {args.rounds} rounds (the others)")

        def through_studio(client: Client, **values) -> None:
            client.predict(api_name="/generate", **{**generate, **values})

        def straight(seed: int) -> None:
            direct.generate(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps, seed=seed)

        # Warm-up: the model loaded, its speed measured at two sizes, and every designer's
        # session open (Gradio builds a session's state, ~50 ms of CPU, on its first event),
        # so that the rounds time jobs, not sessions being opened.
        at_once([lambda client=client: through_studio(client, seed=1) for client in designers])
        direct.generate(PROMPT, width=2 * args.size, height=2 * args.size, num_inference_steps=args.steps)

        if "1" in args.parts:
            figures["eight_designers"] = eight_designers(args, designers, through_studio, straight)
        if "2" in args.parts:
            figures["head_of_line"] = head_of_line(args, designers, through_studio, generate)
        if "3" in args.parts:
            figures["over_the_limit"] = over_the_limit(direct)
        if "4" in args.parts:
            figures["upscale_512"] = upscale_512(args, config, direct)


def eight_designers(args, designers, through_studio, straight) -> dict:
    """1. Eight designers at once, through the studio and straight to the endpoint: a pair of
    rounds at a time, the two side by side (which goes first alternates), so that the machine's
    drift from one pair to the next falls on both."""
    def studio_round() -> float:
        return at_once([lambda client=client, seed=seed: through_studio(client, seed=seed)
                        for seed, client in enumerate(designers)])

    def direct_round() -> float:
        return at_once([lambda seed=seed: straight(seed) for seed in range(DESIGNERS)])

    studio_s, direct_s = [], []
    for pair in range(args.pairs):
        if pair % 2:
            studio_s.append(studio_round())
            direct_s.append(direct_round())
        else:
            direct_s.append(direct_round())
            studio_s.append(studio_round())
    one_s = statistics.median(timed(lambda: straight(0)) for _ in range(args.rounds))
    studio, direct = statistics.median(studio_s), statistics.median(direct_s)
    ratios = [d / s for d, s in zip(direct_s, studio_s)]
    ratio = statistics.median(ratios)
    print(f"\n1. {DESIGNERS} designers at once: studio {studio:.2f} s, straight to the endpoint {direct:.2f} s "
          f"(one call alone {one_s:.2f} s: batching gives the endpoint {DESIGNERS * one_s / direct:.2f}x)")
    print(f"   studio throughput / direct, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"   studio throughput / direct: {ratio:.2f}x, the median pair (goal: at least 0.95x)")
    return {"studio_s": studio_s, "direct_s": direct_s, "one_call_s": one_s, "pair_ratios": ratios, "ratio": ratio}


def head_of_line(args, designers, through_studio, generate: dict) -> dict:
    """2. Designer B's 1-image job alone, and while designer A's 4-image job runs."""
    designer_a, designer_b = designers[0], designers[1]
    solo = [timed(lambda: through_studio(designer_b, seed=7)) for _ in range(args.rounds)]
    contended = []
    for _ in range(args.rounds):
        big = designer_a.submit(api_name="/generate", **{**generate, "num_images_per_prompt": 4, "seed": 3})
        time.sleep(0.5)  # A's first call is on the endpoint
        contended.append(timed(lambda: through_studio(designer_b, seed=7)))
        big.result()
    solo_s, contended_s = statistics.median(solo), statistics.median(contended)
    print(f"\n2. Head of line: B's 1-image job alone {solo_s:.2f} s, while A's 4-image job runs {contended_s:.2f} s")
    print(f"   latency behind a 4-image job / alone: {contended_s / solo_s:.2f}x (goal: at most 2x)")
    return {"solo_s": solo, "behind_4_images_s": contended, "ratio": contended_s / solo_s}


def failure_after(call: Callable[[], object]) -> tuple[float | None, str]:
    """(seconds until `call` failed, its message), or (None, ...) when it did not fail."""
    started = time.perf_counter()
    try:
        call()
    except StudioError as error:
        return time.perf_counter() - started, str(error)
    return None, "it did not fail"


def over_the_limit(direct: StudioClient) -> dict:
    """3. Refused at once when the model can predict the call, stopped at the budget when not."""
    huge = {"width": 1024, "height": 1024, "num_inference_steps": 150}
    refused_s, refusal = failure_after(lambda: direct.generate(PROMPT, **huge))
    restyle = MODELS_BY_TASK["restyle"]
    # Loaded with a request refused before any pipeline call: its speed is still unknown.
    failure_after(lambda: direct.invoke(restyle.name, {"prompt": PROMPT, "negative_prompt": ""},
                                        {"num_inference_steps": 0}))
    stopped_s, stop = failure_after(
        lambda: direct.restyle(sample_image(256), PROMPT, num_inference_steps=150, strength=1.0))
    print(f"\n3. Over the limit ({CALL_BUDGET_S} s a call):")
    if refused_s is not None and "would take about" not in refusal:  # it ran, and failed otherwise
        refusal = f"failed after {refused_s:.1f} s without a refusal: {refusal}"
        refused_s = None
    print(f"   1024 px x 150 steps refused after {refused_s * 1000:.0f} ms (goal: under 1 s): {refusal}"
          if refused_s is not None else f"   1024 px x 150 steps NOT refused ({refusal})")
    print(f"   {restyle.name}'s first call (256 px x 150 steps, speed unknown) stopped after {stopped_s:.1f} s, "
          f"{stopped_s - CALL_BUDGET_S:+.1f} s against the budget (goal: at most +2 s): {stop}"
          if stopped_s is not None else f"   {restyle.name}'s first call NOT stopped ({stop})")
    return {"refused_after_s": refused_s, "refusal": refusal, "stopped_after_s": stopped_s, "stop": stop,
            "budget_s": CALL_BUDGET_S}


def upscale_512(args, config: EndpointConfig, direct: StudioClient) -> dict:
    """4. The 512x512 upscale: tiled (the largest answer vs the cap) and as one call."""
    sizes = AnswerSizes(direct.runtime)
    measured = StudioClient(config, runtime=sizes)
    photo = sample_image(512)
    options = {"num_inference_steps": args.upscale_steps, "seed": 5}
    plan = plan_job(TASKS["upscale"].check({"prompt": PROMPT, **options}, photo))
    tiled_s, failure = failure_after(lambda: run_job(measured, plan).raise_for_errors())
    if tiled_s is not None:
        print(f"\n4. Upscale of a 512x512 photo: the tiled job FAILED after {tiled_s:.1f} s: {failure}")
        return {"calls": plan.call_count, "failed": failure}
    tiled_s = timed(lambda: run_job(measured, plan).raise_for_errors())  # now warm, like the one call below
    largest = max(sizes.sizes)
    sizes.sizes.clear()
    upscale = MODELS_BY_TASK["upscale"]
    untiled_s, failure = failure_after(lambda: measured.invoke(
        upscale.name, {"prompt": PROMPT, "negative_prompt": "", "image": photo}, options))
    if untiled_s is None:  # it did not fail: time it again, now warm like the tiles were
        untiled_s = timed(lambda: measured.invoke(
            upscale.name, {"prompt": PROMPT, "negative_prompt": "", "image": photo}, options))
        untiled = f"{untiled_s:.1f} s (its answer {max(sizes.sizes) / 2**20:.2f} MB, fitted as WebP)"
    else:
        untiled, untiled_s = f"failed: {failure}", None
    print(f"\n4. Upscale of a 512x512 photo ({args.upscale_steps} steps): {plan.call_count} tiles, largest answer "
          f"{largest / 2**20:.2f} MB = {largest / MAX_PAYLOAD_BYTES:.2f}x the 6 MB cap; tiled {tiled_s:.1f} s, "
          f"as one call {untiled}" + (f"; tiled / one call {tiled_s / untiled_s:.2f}x" if untiled_s else ""))
    return {"calls": plan.call_count, "largest_answer_bytes": largest, "cap_bytes": MAX_PAYLOAD_BYTES,
            "tiled_s": tiled_s, "untiled_s": untiled_s, "untiled": untiled}


def warm_up_on_send(args, work: Path) -> dict:
    """5. generate -> Send to Erase -> think -> erase, with room for one model: the erase's wait
    with the warm-up that Send to fires and without it (alternating rounds, one designer)."""
    mask = work / "mask.png"
    sample_mask(args.size).save(mask)
    waits: dict[bool, list[float]] = {False: [], True: []}
    with local_endpoint(work, cache="cache-one-model", logs="logs-one-model", max_models=1,
                        compute_threads=args.compute_threads) as endpoint, \
            running_studio(endpoint.url, work, "studio-one-model") as studio:
        url = studio.url
        # This designer downloads its results: the studio takes an image to erase as an upload
        # (it does not fetch URLs of its own host).
        designer = designer_client(url, download_files=True)
        for _ in range(args.rounds):
            for warm_up in (False, True):
                # The generate loads its model, and so evicts the inpainting one: the erase's model is cold.
                images, _ = designer.predict(api_name="/generate", prompt=PROMPT, width=args.size, height=args.size,
                                             num_inference_steps=args.steps)
                image = images[0]["image"]
                if warm_up:  # what Send to Erase does besides showing the image in the tab
                    designer.predict(task="erase", api_name="/warm_up")
                time.sleep(args.think)  # the designer paints the mask, writes the prompt
                waits[warm_up].append(timed(lambda image=image: designer.predict(
                    api_name="/erase", image=handle_file(image), mask=handle_file(str(mask)), prompt=PROMPT,
                    num_inference_steps=args.steps, work_side=args.size)))
        loads = {m["target_model"]: m["loads"] for m in endpoint.listing()["models"]}
    without, with_warm_up = statistics.median(waits[False]), statistics.median(waits[True])
    print(f"\n5. Sending on warms up (room for one model, {args.think:.0f} s between Send to Erase and Erase): "
          f"the erase's wait without warm-up {without:.1f} s, with {with_warm_up:.1f} s")
    print(f"   erase wait without / with warm-up: {without / with_warm_up:.2f}x "
          f"(loads: {', '.join(f'{name} {count}' for name, count in sorted(loads.items()))})")
    return {"think_s": args.think, "without_warm_up_s": waits[False], "with_warm_up_s": waits[True],
            "ratio": without / with_warm_up, "loads": loads}


if __name__ == "__main__":
    sys.exit(main())
