"""Jobs split into several InvokeEndpoint calls (studio/planning.py, studio/tiles.py,
studio/runner.py): planning, stitching, seeds, partial failure and cancellation against a stand-in
runtime, then the real local endpoint (real Triton, tiny weights): a 4-image generate and tiled
and one-tile upscales."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import threading

import botocore.exceptions
import numpy as np
import pytest
from PIL import Image
from sdserve.catalog import MAX_PAYLOAD_BYTES, MODELS_BY_TASK
from sdserve.images import encode_png
from sdserve.params import SEED_MAX
from sdserve.wire import worst_case_answer_bytes

from studio.client import EndpointConfig, StudioClient
from studio.errors import JobCancelled, PartialJobError, StudioError
from studio.metadata import read_parameters
from studio.planning import plan_job
from studio.results import GenerationResult, JobResult
from studio.runner import CancelSignal, run_job
from studio.tasks import TASKS
from studio.tiles import TileLayout, axis_weights, stitch, tile_positions

from .endpoint_support import (
    ENDPOINT_NAME,
    STEPS,
    runtime_client,
    scene,
)
from .samples import assert_same_image


TILING = MODELS_BY_TASK["upscale"].tiling  # the upscaler's tiles (sdserve.catalog.Tiling)


def checked_plan(task: str, prompt: str = "", *, image=None, gen_args=None, **planning):
    """A job checked as its tab checks it (Task.check), then planned (`planning`: tiling, rng)."""
    return plan_job(TASKS[task].check({"prompt": prompt, **(gen_args or {})}, image), **planning)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Pixels that do not compress: the worst case for an answer's size."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


# --- a stand-in for the endpoint ---------------------------------------------------------------


class FakeEndpoint:
    """A sagemaker-runtime stand-in that answers like sdserve, fast: sd_upscale returns the input
    enlarged x4 (NEAREST, so a tile's output is exactly the crop of the whole image's output), the
    other models a flat image whose colour comes from its seed. `fail(request)` returns an error
    message to answer with a ModelError; `gate(request)` may block (to hold a call in flight)."""

    def __init__(self, fail=None, gate=None):
        self.fail = fail or (lambda request: None)
        self.gate = gate or (lambda request: None)
        self.requests: list[dict] = []  # {"model", "gen_args", "image", "body"} in arrival order
        self.answers: list[bytes] = []
        self.lock = threading.Lock()

    def invoke_endpoint(self, **call):
        values = {tensor["name"]: tensor["data"][0] for tensor in json.loads(call["Body"])["inputs"]}
        request = {"model": call["TargetModel"].removesuffix(".tar.gz"), "gen_args": json.loads(values["gen_args"]),
                   "body": call["Body"], "image": None}
        if "image" in values:
            request["image"] = Image.open(io.BytesIO(base64.b64decode(values["image"]))).convert("RGB")
        with self.lock:
            self.requests.append(request)
        self.gate(request)
        error = self.fail(request)
        if error:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "ModelError", "Message": "Received client error (400)"},
                 "OriginalMessage": json.dumps({"error": error})}, "InvokeEndpoint")
        answer = self.answer(request)
        with self.lock:
            self.answers.append(answer)
        return {"Body": io.BytesIO(answer)}

    @staticmethod
    def answer(request: dict) -> bytes:
        args = request["gen_args"]
        seed = args.get("seed", 0)
        seeds = [(seed + k) % (SEED_MAX + 1) for k in range(args.get("num_images_per_prompt", 1))]
        if request["model"] == "sd_upscale":
            image = request["image"]
            images = [image.resize((image.width * 4, image.height * 4), Image.Resampling.NEAREST) for _ in seeds]
        else:
            size = (args.get("width", 64), args.get("height", 64))
            images = [Image.new("RGB", size, (s % 256, s // 256 % 256, 7)) for s in seeds]
        parameters = {"model": request["model"], "seed": seeds[0], "seeds": seeds, **args,
                      "width": images[0].width, "height": images[0].height}
        encoded = [encode_png(image, {"parameters": json.dumps({**parameters, "seed": s})}).decode()
                   for image, s in zip(images, seeds)]
        return json.dumps({"outputs": [{"name": "generated_image", "data": encoded},
                                       {"name": "parameters", "data": [json.dumps(parameters)]}]}).encode()


def fake_client(endpoint: FakeEndpoint) -> StudioClient:
    config = EndpointConfig("sd-studio", endpoint_url="http://127.0.0.1:9", backoff_s=0.01)
    return StudioClient(config, runtime=endpoint)


def one_worker(calls: int = 1):
    """A submit function that sends one call at a time (a strict scheduler), and its executor."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=calls)
    return executor.submit, executor


# --- planning: pure, nothing sent --------------------------------------------------------------


def test_an_image_that_fits_one_tile_is_one_call_sent_untouched():
    image = noise((200, 200))
    plan = checked_plan("upscale", "a house", image=image, gen_args={"seed": 5, "num_inference_steps": 2})
    assert plan.call_count == 1 and plan.layout is None and not plan.is_split and not plan.reasons
    (call,) = plan.calls
    assert call.inputs["image"] is image  # not cropped, converted nor resized
    assert call.gen_args == {"seed": 5, "num_inference_steps": 2}  # exactly what was asked
    assert plan.summary == "Upscale: one call to the endpoint."


@pytest.mark.parametrize(("size", "tile", "overlap", "calls", "grid"), [
    ((512, 512), TILING.side, TILING.overlap, 9, (3, 3)),
    ((1024, 1024), TILING.side, TILING.overlap, 25, (5, 5)),
    ((1024, 300), TILING.side, TILING.overlap, 10, (5, 2)),  # 300 is sent as 296 (multiple of 8)
    ((263, 263), TILING.side, TILING.overlap, 1, (1, 1)),  # 256 once snapped: one tile
    ((96, 96), 64, 16, 4, (2, 2)),
])
def test_tile_counts(size, tile, overlap, calls, grid):
    plan = checked_plan("upscale", image=noise(size), gen_args={"seed": 1}, tile_side=tile, tile_overlap=overlap)
    assert plan.call_count == calls
    if calls > 1:
        assert (len(plan.layout.xs), len(plan.layout.ys)) == grid
        assert all(call.inputs["image"].size == plan.layout.tile_size for call in plan.calls)
        assert "6 MB" in plan.summary and f"{calls} calls" in plan.summary  # names the limit


@pytest.mark.parametrize("length", [33, 257, 264, 300, 448, 456, 500, 512, 640, 768, 1000, 1024])
@pytest.mark.parametrize(("tile", "overlap"), [(TILING.side, TILING.overlap), (64, 16), (128, 0)])
def test_tiles_cover_the_side_overlap_enough_and_are_as_few_as_possible(length, tile, overlap):
    starts = tile_positions(length, tile, overlap)
    side = min(tile, length)
    assert starts[0] == 0 and starts[-1] + side == length  # whole tiles, flush with both edges
    assert starts == sorted(set(starts))
    for before, after in zip(starts, starts[1:]):
        assert before + side - after >= overlap  # every neighbour overlaps at least `overlap`
    if len(starts) > 1:  # one tile fewer could not cover the side with that overlap
        assert (len(starts) - 1) * (tile - overlap) + overlap < length


def test_a_tiled_image_is_resized_to_multiples_of_8_as_the_server_would():
    plan = checked_plan("upscale", image=noise((300, 301)), gen_args={"seed": 1})
    assert plan.layout.size == (296, 296) and plan.layout.output_size == (1184, 1184)


def test_every_tile_answer_fits_the_cap_even_for_noise():
    """The tile side is sized for the worst case: a tile of noise with the longest prompts, as the
    server encodes it (PNG with its parameters in a text chunk, and the parameters output)."""
    out = TILING.side * 4
    assert worst_case_answer_bytes(out, out) <= MAX_PAYLOAD_BYTES
    prompt = "\U0001F600" * 4000  # 4000 characters, each escaped to 12 bytes in JSON
    parameters = json.dumps({"model": "sd_upscale", "prompt": prompt, "negative_prompt": prompt, "seed": 1,
                             "seeds": [1]})
    image = encode_png(noise((out, out)), {"parameters": parameters}).decode()
    answer = json.dumps({"model_name": "sd_upscale", "model_version": "1", "outputs": [
        {"name": "generated_image", "datatype": "BYTES", "shape": [1, 1], "data": [image]},
        {"name": "parameters", "datatype": "BYTES", "shape": [1, 1], "data": [parameters]}]}).encode()
    assert len(answer) <= worst_case_answer_bytes(out, out) <= MAX_PAYLOAD_BYTES
    with pytest.raises(ValueError, match="can exceed"):  # a tile too large for the cap is refused
        checked_plan("upscale", image=noise((600, 600)), tile_side=320)


def test_upscale_takes_up_to_1024_px_and_says_so_beyond():
    assert TILING.max_input_side == 1024
    checked_plan("upscale", image=Image.new("RGB", (1024, 1024)))
    with pytest.raises(StudioError, match=r"1025×64 px; Upscale accepts at most 1024 px a side"):
        checked_plan("upscale", image=Image.new("RGB", (1025, 64)))


def test_arguments_are_checked_before_planning():
    with pytest.raises(StudioError, match="takes no argument 'steps'"):
        checked_plan("generate", "a cat", gen_args={"steps": 3})
    with pytest.raises(StudioError, match="Images: must be from 1 to 4; got 5"):
        checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 5})


# --- seeds ---------------------------------------------------------------------------------------


def test_several_images_are_one_call_each_with_consecutive_seeds():
    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 4, "seed": 10, "width": 64, "height": 64})
    assert plan.seeds == (10, 11, 12, 13) and plan.call_count == 4
    assert [call.gen_args for call in plan.calls] == [
        {"num_images_per_prompt": 1, "seed": seed, "width": 64, "height": 64} for seed in (10, 11, 12, 13)]
    assert [call.label for call in plan.calls] == [f"image {k} of 4" for k in (1, 2, 3, 4)]
    assert "4 calls" in plan.summary and "seeds 10 to 13" in plan.summary


def test_seed_minus_one_is_resolved_once_so_the_seeds_are_consecutive():
    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 3}, rng=random.Random(4))
    first = random.Random(4).randint(0, SEED_MAX)
    assert plan.seeds == (first, first + 1, first + 2)
    assert [call.seed for call in plan.calls] == list(plan.seeds)
    # Past the largest seed they wrap around, as the server's do.
    assert checked_plan("generate", "a", gen_args={"num_images_per_prompt": 3, "seed": SEED_MAX}).seeds == (SEED_MAX, 0, 1)
    # A one-image job gets its seed now too, so the plan can show it before anything is sent.
    assert 0 <= checked_plan("generate", "a").calls[0].seed <= SEED_MAX


def test_every_tile_uses_its_images_seed():
    plan = checked_plan("upscale", image=noise((96, 96)), gen_args={"seed": 41, "num_images_per_prompt": 2},
                        tile_side=64, tile_overlap=16)
    assert plan.call_count == 8 and plan.seeds == (41, 42)
    assert [call.seed for call in plan.calls] == [41] * 4 + [42] * 4
    assert {call.gen_args["num_images_per_prompt"] for call in plan.calls} == {1}


# --- stitching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tile", "overlap", "scale"), [
    ((96, 96), 64, 16, 4),
    ((456, 300), 256, 64, 1),  # three tiles overlap at once along x: weights are normalized
    ((1024, 1024), 256, 64, 1),  # the largest input's layout (at x1 to keep it fast)
    ((200, 72), 64, 0, 2),  # no overlap: tiles abut
])
def test_tiles_cut_from_a_known_image_stitch_back_to_it_exactly(size, tile, overlap, scale):
    layout = TileLayout.for_image(size, tile, overlap, scale)
    big = noise(layout.output_size, seed=3)
    tiles = [big.crop(tuple(v * scale for v in box)) for box in layout.boxes]
    assert np.array_equal(np.asarray(stitch(layout, tiles)), np.asarray(big))


def test_blend_weights_sum_to_one_and_fade_linearly_across_the_overlap():
    starts, tile, length = [0, 48], 64, 112  # overlap [48, 64)
    weights = axis_weights(starts, tile, length)
    total = np.zeros(length)
    for start, weight in zip(starts, weights):
        total[start : start + tile] += weight
    assert np.allclose(total, 1)
    left, right = weights
    assert np.all(left[:48] == 1) and np.all(right[16:] == 1)  # outside the overlap: the tile alone
    ramp = right[:16]
    assert np.all(np.diff(ramp) > 0) and np.allclose(np.diff(ramp), ramp[1] - ramp[0])  # linear
    assert 0 < ramp[0] < 0.1 and 0.9 < ramp[-1] < 1

    # Two tiles that disagree: each keeps its own side, the seam fades from one to the other.
    layout = TileLayout.for_image((112, 64), 64, 16, 1)
    assert layout.xs == (0, 48)
    black, grey = Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (200, 200, 200))
    row = np.asarray(stitch(layout, [black, grey]))[10, :, 0]
    assert np.all(row[:48] == 0) and np.all(row[64:] == 200)
    assert np.all(np.diff(row[47:65].astype(int)) >= 0) and 0 < row[55] < 200


# --- running a job (stand-in endpoint) ---------------------------------------------------------


def test_a_one_tile_job_gives_the_endpoints_image_byte_for_byte():
    endpoint = FakeEndpoint()
    client = fake_client(endpoint)
    image = noise((64, 64))
    untiled = client.invoke("sd_upscale", {"prompt": "a", "negative_prompt": "", "image": image}, {"seed": 3})
    result = run_job(client, checked_plan("upscale", "a", image=image, gen_args={"seed": 3}))
    typed = client.upscale(image, "a", seed=3)
    assert endpoint.requests[0]["body"] == endpoint.requests[1]["body"] == endpoint.requests[2]["body"]
    assert result.png[0] == untiled.png[0] == typed.png[0]  # the endpoint's own PNG, untouched
    assert result.parameters == untiled.parameters and result.seeds == [3]
    assert isinstance(result, JobResult) and result.complete and result.calls_sent == 1


def test_a_split_generate_reports_each_image_and_progress_as_calls_finish():
    arrived = threading.Barrier(4, timeout=10)  # passes only when all 4 calls are in flight at once
    endpoint = FakeEndpoint(gate=lambda request: arrived.wait())
    client = fake_client(endpoint)
    caller = threading.current_thread()
    reported, lines = [], []

    def on_result(index: int, part: GenerationResult) -> None:
        assert threading.current_thread() is caller  # callbacks come on run_job's own thread
        reported.append((index, part.parameters["seed"], len(part.images)))

    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 4, "seed": 10, "width": 64, "height": 64})
    result = run_job(client, plan, on_result=on_result, on_status=lines.append)
    assert sorted(request["gen_args"]["seed"] for request in endpoint.requests) == [10, 11, 12, 13]
    assert {request["gen_args"]["num_images_per_prompt"] for request in endpoint.requests} == {1}
    assert sorted(reported) == [(0, 10, 1), (1, 11, 1), (2, 12, 1), (3, 13, 1)]
    assert result.complete and len(result.images) == 4 and result.seeds == [10, 11, 12, 13]
    assert result.parameters["seed"] == 10 and result.parameters["num_images_per_prompt"] == 4
    assert [read_parameters(png)["seed"] for png in result.png] == [10, 11, 12, 13]  # each PNG: its own seed
    assert [image.getpixel((0, 0))[0] for image in result.images] == [10, 11, 12, 13]  # in seed order
    assert lines[0] == "Sending 4 calls to sd_base at once…"
    assert [line for line in lines if "done" in line] == [f"{k} of 4 images done." for k in (1, 2, 3, 4)]


def test_failed_images_are_named_and_the_made_ones_kept():
    endpoint = FakeEndpoint(fail=lambda request: "CUDA out of memory" if request["gen_args"]["seed"] == 12 else None)
    client = fake_client(endpoint)
    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 4, "seed": 10})
    made = []
    result = run_job(client, plan, on_result=lambda index, part: made.append(index))
    assert sorted(made) == [0, 1, 3] and result.image_indices == [0, 1, 3]
    assert len(result.images) == 3 and result.seeds == [10, 11, 13] and not result.complete
    assert [str(failure) for failure in result.failures] == ["Image 3 of 4 (seed 12) failed: CUDA out of memory."]
    with pytest.raises(PartialJobError) as raised:
        result.raise_for_errors()
    message = str(raised.value)
    assert message.startswith("3 of 4 images were made. Image 3 of 4 (seed 12) failed: CUDA out of memory.")
    assert "6 MB answer limit" in message  # why it was split, naming the limit
    assert raised.value.result is result
    # The typed method raises the same, carrying the images made.
    with pytest.raises(PartialJobError) as typed:
        client.generate("a cat", num_images_per_prompt=4, seed=10)
    assert len(typed.value.result.images) == 3 and isinstance(typed.value, StudioError)


def test_a_one_call_job_that_fails_keeps_the_models_own_words():
    client = fake_client(FakeEndpoint(fail=lambda request: "prompt: must not be empty for sd_base"))
    with pytest.raises(StudioError, match="^prompt: must not be empty for sd_base$"):
        client.generate("a cat", seed=1)


def test_a_failed_tile_fails_the_upscale_and_its_other_tiles_are_not_sent():
    endpoint = FakeEndpoint(fail=lambda request: "the GPU fell over" if len(endpoint.requests) == 2 else None)
    client = fake_client(endpoint)
    plan = checked_plan("upscale", image=noise((96, 96)), gen_args={"seed": 7}, tile_side=64, tile_overlap=16)
    submit, executor = one_worker()
    with executor:
        result = run_job(client, plan, submit=submit)
    assert len(endpoint.requests) == 2  # tiles 3 and 4 were never sent
    assert result.images == [] and result.calls_sent == 2
    with pytest.raises(StudioError) as raised:
        result.raise_for_errors()
    assert not isinstance(raised.value, PartialJobError)
    assert str(raised.value).startswith(
        "The upscale failed and nothing was kept: an image with a missing tile would have a hole. "
        "Tile 2 of 4 (seed 7) failed: the GPU fell over.")


def test_a_tiled_upscale_through_the_stand_in_is_the_whole_image_upscaled():
    endpoint = FakeEndpoint()
    image = noise((96, 88))
    lines = []
    result = fake_client(endpoint).upscale(image, "a", seed=7, on_status=lines.append)  # typed method: plans itself
    assert result.images[0].size == (384, 352) and len(endpoint.requests) == 1  # fits one 256 px tile
    plan = checked_plan("upscale", image=image, gen_args={"seed": 7}, tile_side=64, tile_overlap=16)
    result = run_job(fake_client(endpoint), plan, on_status=lines.append)
    expected = image.resize((384, 352), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert {request["image"].size for request in endpoint.requests[1:]} == {(64, 64)}
    assert {request["gen_args"]["seed"] for request in endpoint.requests[1:]} == {7}
    assert read_parameters(result.png[0])["width"] == 384 and result.parameters["tiles"]["count"] == 4
    assert "4 of 4 tiles done." in lines


def test_a_plain_upscale_of_a_1024_px_image_is_25_tiles_stitched_into_4096_px():
    endpoint = FakeEndpoint()
    image = scene(1024)  # flat areas and edges: quick to encode, and every seam shows if misplaced
    result = fake_client(endpoint).upscale(image, "a house", seed=11)
    assert len(endpoint.requests) == 25 and {r["image"].size for r in endpoint.requests} == {(256, 256)}
    assert result.images[0].size == (4096, 4096) and result.seeds == [11]
    expected = image.resize((4096, 4096), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))


# --- cancellation --------------------------------------------------------------------------------


def all_cancelled(futures, timeout: float = 10.0) -> bool:
    """Wait until every future is cancelled: cancel() runs the done callbacks at once (whereas
    concurrent.futures.wait counts a cancelled future only once an executor has taken it up)."""
    ended = threading.Semaphore(0)
    for future in futures:
        future.add_done_callback(lambda _: ended.release())
    return all(ended.acquire(timeout=timeout) for _ in futures) and all(f.cancelled() for f in futures)


def test_cancelling_stops_the_calls_not_yet_sent_and_keeps_what_the_sent_ones_made():
    in_flight, release = threading.Event(), threading.Event()

    def gate(request):
        in_flight.set()
        assert release.wait(10)

    endpoint = FakeEndpoint(gate=gate)
    cancelled = CancelSignal()
    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 4, "seed": 20})
    submit, executor = one_worker()
    queued, submitted = [], threading.Semaphore(0)

    def recording_submit(fn):  # run_job's futures, to wait for its cancel to reach the queued ones
        queued.append(submit(fn))
        submitted.release()
        return queued[-1]

    outcome = {}
    with executor:
        worker = threading.Thread(target=lambda: outcome.update(
            result=run_job(fake_client(endpoint), plan, submit=recording_submit, cancelled=cancelled)))
        worker.start()
        assert in_flight.wait(10)
        cancelled.set()  # image 1 is in flight, images 2-4 wait in the executor
        for _ in range(4):
            assert submitted.acquire(timeout=10)
        assert all_cancelled(queued[1:])  # run_job sees the cancel and cancels the calls not started
        release.set()  # the call already sent finishes
        worker.join(10)
    result = outcome["result"]
    assert len(endpoint.requests) == 1 and result.calls_sent == 1
    assert result.cancelled and result.seeds == [20] and len(result.images) == 1  # not lost
    with pytest.raises(PartialJobError, match="1 of 4 images were made. Cancelled after 1 of 4 calls were sent"):
        result.raise_for_errors()


class HoldingScheduler:
    """A stand-in for the studio's fair scheduler: holds submitted calls until told to run them,
    and (like a careless one) runs even those whose job has been cancelled."""

    def __init__(self):
        self.held: list[tuple[concurrent.futures.Future, object]] = []
        self.submitted = threading.Semaphore(0)

    def submit(self, fn) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        self.held.append((future, fn))
        self.submitted.release()
        return future

    def run(self, index: int, *, honour_cancel: bool = True) -> None:
        future, fn = self.held[index]
        if honour_cancel and not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except Exception as error:
            if not future.done():
                future.set_exception(error)


@pytest.mark.parametrize("honour_cancel", [True, False],
                         ids=["scheduler drops cancelled futures", "scheduler runs them anyway"])
def test_an_injected_scheduler_runs_the_calls_and_a_cancelled_job_sends_no_more(honour_cancel):
    endpoint = FakeEndpoint()
    scheduler = HoldingScheduler()
    cancelled = CancelSignal()
    plan = checked_plan("generate", "a cat", gen_args={"num_images_per_prompt": 3, "seed": 5})
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        result=run_job(fake_client(endpoint), plan, submit=scheduler.submit, cancelled=cancelled)))
    worker.start()
    for _ in range(3):
        assert scheduler.submitted.acquire(timeout=10)  # every call is handed over at once
    scheduler.run(0)
    cancelled.set()
    assert all_cancelled([future for future, _ in scheduler.held[1:]])  # run_job cancels the futures still held
    for index in (1, 2):
        future, fn = scheduler.held[index]
        if honour_cancel:
            assert future.cancelled()
            scheduler.run(index)  # finds it cancelled and does not run it
        else:
            with pytest.raises(Exception):  # run anyway, the call refuses to send
                fn()
    worker.join(10)
    assert not worker.is_alive() and len(endpoint.requests) == 1
    assert outcome["result"].cancelled and outcome["result"].seeds == [5]


def test_a_job_cancelled_before_anything_was_sent_says_so():
    endpoint = FakeEndpoint()
    cancelled = CancelSignal()
    cancelled.set()
    result = run_job(fake_client(endpoint), checked_plan("generate", "a cat", gen_args={"seed": 1}), cancelled=cancelled)
    assert endpoint.requests == [] and result.cancelled and result.calls_sent == 0
    with pytest.raises(JobCancelled):
        result.raise_for_errors()


def test_a_scheduler_that_refuses_a_call_fails_that_call_only():
    endpoint = FakeEndpoint()
    submit, executor = one_worker()
    attempts = []

    def choosy(fn):
        attempts.append(fn)
        if len(attempts) == 2:
            raise RuntimeError("queue full")
        return submit(fn)

    with executor:
        plan = checked_plan("generate", "a", gen_args={"num_images_per_prompt": 3, "seed": 1})
        result = run_job(fake_client(endpoint), plan, submit=choosy)
    assert result.seeds == [1, 3]
    assert [str(failure) for failure in result.failures] == [
        "Image 2 of 3 (seed 2) failed: it could not be queued (queue full)."]


# --- through the real local endpoint (real Triton, tiny weights) -------------------------------


class Recording:
    """Passes calls to a real sagemaker-runtime client and keeps each request and raw answer."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.calls: list[tuple[dict, bytes]] = []
        self.lock = threading.Lock()

    def invoke_endpoint(self, **request):
        response = self.runtime.invoke_endpoint(**request)
        answer = response["Body"].read()
        with self.lock:
            self.calls.append((request, answer))
        return {**response, "Body": io.BytesIO(answer)}

    def images_sent(self) -> list[tuple[int, int]]:
        sizes = []
        for request, _ in self.calls:
            values = {tensor["name"]: tensor["data"][0] for tensor in json.loads(request["Body"])["inputs"]}
            sizes.append(Image.open(io.BytesIO(base64.b64decode(values["image"]))).size)
        return sizes


@pytest.fixture(scope="module")
def endpoint(shared_endpoint):
    return shared_endpoint


@pytest.fixture
def recorded(endpoint) -> tuple[StudioClient, Recording]:
    recording = Recording(runtime_client(endpoint.url))
    client = StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url, backoff_s=0.2),
                          runtime=recording)
    return client, recording


@pytest.mark.triton
def test_four_images_through_the_endpoint_are_four_calls_with_consecutive_seeds(endpoint, recorded):
    client, recording = recorded
    arguments = {"num_inference_steps": STEPS, "width": 64, "height": 64, "seed": 1000}
    # The server's own answer for the whole job in one call, to compare against.
    whole = client.invoke("sd_base", {"prompt": "a lighthouse", "negative_prompt": ""},
                          {**arguments, "num_images_per_prompt": 4})
    before, reported = endpoint.invocations_total, []
    plan = checked_plan("generate", "a lighthouse", gen_args={**arguments, "num_images_per_prompt": 4})
    result = run_job(client, plan, on_result=lambda index, part: reported.append(index))
    assert endpoint.invocations_total - before == 4 and sorted(reported) == [0, 1, 2, 3]
    assert result.complete and len(result.images) == 4 and result.seeds == [1000, 1001, 1002, 1003]
    assert [read_parameters(png)["seed"] for png in result.png] == [1000, 1001, 1002, 1003]
    assert {json.loads(json.loads(request["Body"])["inputs"][-1]["data"][0])["num_images_per_prompt"]
            for request, _ in recording.calls[1:]} == {1}
    for split, together in zip(result.images, whole.images):
        assert_same_image(split, together)  # the same images as the server's own 4-image call


@pytest.mark.triton
def test_a_tiled_upscale_through_the_endpoint_is_4x_and_one_call_per_tile(endpoint, recorded):
    client, recording = recorded
    lines = []
    plan = checked_plan("upscale", "a house", image=scene(96),
                        gen_args={"num_inference_steps": STEPS, "noise_level": 20, "seed": 7},
                        tile_side=64, tile_overlap=16)
    before = endpoint.invocations_total
    result = run_job(client, plan, on_status=lines.append).raise_for_errors()
    assert endpoint.invocations_total - before == 4 and recording.images_sent() == [(64, 64)] * 4
    assert result.images[0].size == (384, 384)
    parameters = read_parameters(result.png[0])
    assert (parameters["width"], parameters["height"], parameters["seed"]) == (384, 384, 7)
    assert parameters["weights"] == "tiny-random" and parameters["tiles"]["count"] == 4
    assert "4 of 4 tiles done." in lines


@pytest.mark.triton
def test_a_one_tile_upscale_through_the_endpoint_is_the_untiled_call(endpoint, recorded):
    client, recording = recorded
    image, arguments = scene(64), {"num_inference_steps": STEPS, "noise_level": 20, "seed": 9}
    untiled = client.invoke("sd_upscale", {"prompt": "a house", "negative_prompt": "", "image": image}, arguments)
    result = run_job(client, checked_plan("upscale", "a house", image=image, gen_args=arguments)).raise_for_errors()
    (untiled_request, _), (tiled_request, tiled_answer) = recording.calls
    assert tiled_request["Body"] == untiled_request["Body"]  # the same request, byte for byte
    assert result.png[0] == base64.b64decode(json.loads(tiled_answer)["outputs"][0]["data"][0])  # untouched
    assert result.images[0].size == (256, 256)
    assert_same_image(result.images[0], untiled.images[0])  # the project's determinism guarantee
