"""sdserve's batching on the real tiny pipelines, in-process (no Triton)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from sdserve import batch as batch_module
from sdserve.batch import serve_batch
from sdserve.budget import BUSY_WORDS, CallOverBudget, ModelBusy, WorkBudget, megapixels
from sdserve.catalog import CHECKPOINT_DIR, MODELS
from sdserve.errors import RequestError
from sdserve.params import SCHEDULERS
from sdserve.pipelines import CallStopped, _step_callback, load_pipeline

from .samples import (
    SAME_IMAGE_TOLERANCE,
    assert_same_image,
    mask_b64,
    max_pixel_difference,
    png_b64,
)

pytestmark = pytest.mark.pipeline

STEPS = 2


@pytest.fixture(scope="module")
def pipelines(model_repository):
    return {name: load_pipeline(name, model_repository / name / "1" / CHECKPOINT_DIR) for name in MODELS}


def request(prompt=b"a lighthouse at dusk", gen_args=None, **inputs):
    args = {"num_inference_steps": STEPS, "height": 64, "width": 64, **(gen_args or {})}
    values = {"prompt": prompt, "gen_args": json.dumps(args).encode(), **inputs}
    return {name: np.array([[value]], dtype=np.object_) for name, value in values.items()}


def image_request(model, gen_args=None, size=(64, 64), **extra):
    args = {"num_inference_steps": STEPS, **(gen_args or {})}
    inputs = {"image": png_b64(size, (90, 140, 200))}
    if model == "sd_inpaint":
        inputs["mask_image"] = mask_b64(size)
    inputs.update(extra)
    return {
        name: np.array([[value]], dtype=np.object_)
        for name, value in {"prompt": b"stone wall", "gen_args": json.dumps(args).encode(), **inputs}.items()
    }


def pngs(answer):
    return [base64.b64decode(data) for data in answer.images[0]]


def image_of(answer, index=0):
    return Image.open(io.BytesIO(pngs(answer)[index]))


def params_of(answer):
    return json.loads(answer.parameters[0])


def test_text_to_image_size_and_parameters(pipelines):
    [answer] = serve_batch(pipelines["sd_base"], [request(gen_args={"seed": 11, "width": 96})])
    assert image_of(answer).size == (96, 64)
    parameters = params_of(answer)
    assert parameters["model"] == "sd_base" and parameters["weights"] == "tiny-random"
    assert parameters["seed"] == 11 and parameters["seeds"] == [11]
    assert parameters["width"] == 96 and parameters["height"] == 64 and parameters["num_inference_steps"] == STEPS
    assert parameters["prompt"] == "a lighthouse at dusk" and parameters["prompt_truncated"] is False
    # The PNG itself carries the parameters, so a download can be reproduced.
    assert json.loads(image_of(answer).text["parameters"])["seed"] == 11


@pytest.mark.parametrize(
    "model, size, expected",
    [("sd_depth", (64, 48), (64, 48)), ("sd_inpaint", (64, 64), (64, 64)), ("sd_upscale", (32, 40), (128, 160))],
)
def test_image_models_output_sizes(pipelines, model, size, expected):
    [answer] = serve_batch(pipelines[model], [image_request(model, {"seed": 3}, size=size)])
    assert image_of(answer).size == expected
    assert params_of(answer)["width"] == expected[0]


def test_same_seed_same_image_other_seed_differs(pipelines):
    loaded = pipelines["sd_base"]
    first, second, other = serve_batch(
        loaded, [request(gen_args={"seed": 5}), request(gen_args={"seed": 5}), request(gen_args={"seed": 6})]
    )
    assert_same_image(image_of(first), image_of(second))
    assert max_pixel_difference(image_of(first), image_of(other)) > SAME_IMAGE_TOLERANCE
    assert params_of(first) == params_of(second)


def test_random_seed_is_reported_and_reproduces(pipelines):
    loaded = pipelines["sd_base"]
    [answer] = serve_batch(loaded, [request(gen_args={"seed": -1})])
    seed = params_of(answer)["seed"]
    assert 0 <= seed < 2**32
    [again] = serve_batch(loaded, [request(gen_args={"seed": seed})])
    assert_same_image(image_of(again), image_of(answer))


@pytest.mark.parametrize("model", list(MODELS))
def test_seed_gives_same_image_alone_or_in_a_batch(pipelines, model):
    loaded = pipelines[model]
    make = (lambda seed, prompt: request(prompt, {"seed": seed})) if model == "sd_base" else (
        lambda seed, prompt: image_request(model, {"seed": seed}, prompt=prompt)
    )
    [alone] = serve_batch(loaded, [make(42, b"red roof")])
    together = serve_batch(loaded, [make(7, b"green door"), make(42, b"red roof"), make(9, b"blue sky")])
    # Same latents and noise; float sums over another batch size may round a pixel by one level.
    assert max_pixel_difference(image_of(together[1]), image_of(alone)) <= 1
    assert max_pixel_difference(image_of(together[0]), image_of(alone)) > 1


def test_compatible_requests_share_one_pipeline_call(pipelines, monkeypatch):
    calls = []
    real_run_call = batch_module.run_call
    monkeypatch.setattr(batch_module, "run_call", lambda loaded, rows, **kw: calls.append(len(rows)) or real_run_call(loaded, rows, **kw))
    answers = serve_batch(
        pipelines["sd_base"],
        [
            request(b"one", {"seed": 1}),
            request(b"two", {"seed": 2, "num_images_per_prompt": 2}),
            request(b"three", {"seed": 3, "height": 96}),  # another size: its own call
        ],
    )
    assert sorted(calls) == [1, 3]
    assert [len(answer.images[0]) for answer in answers] == [1, 2, 1]


def test_calls_are_split_at_the_configured_size(pipelines, monkeypatch):
    calls = []
    real_run_call = batch_module.run_call
    monkeypatch.setattr(batch_module, "run_call", lambda loaded, rows, **kw: calls.append(len(rows)) or real_run_call(loaded, rows, **kw))
    serve_batch(pipelines["sd_base"], [request(gen_args={"seed": s, "num_images_per_prompt": 3}) for s in range(2)], max_images_per_call=4)
    assert calls == [4, 2]


def test_images_per_prompt_use_consecutive_seeds(pipelines):
    loaded = pipelines["sd_base"]
    [several] = serve_batch(loaded, [request(gen_args={"seed": 20, "num_images_per_prompt": 2})])
    [second_alone] = serve_batch(loaded, [request(gen_args={"seed": 21})])
    assert params_of(several)["seeds"] == [20, 21]
    assert max_pixel_difference(image_of(several, 1), image_of(second_alone)) <= 1


def test_bad_requests_fail_alone(pipelines):
    answers = serve_batch(
        pipelines["sd_inpaint"],
        [
            image_request("sd_inpaint", {"seed": 1}),
            image_request("sd_inpaint", {"steps": 3}),
            image_request("sd_inpaint", mask_image=mask_b64(box=(0, 0, 0, 0))),
            image_request("sd_inpaint", {"seed": 2}),
        ],
    )
    assert isinstance(answers[1], RequestError) and answers[1].field == "gen_args.steps"
    assert isinstance(answers[2], RequestError) and answers[2].field == "mask_image"
    assert image_of(answers[0]).size == image_of(answers[3]).size == (64, 64)


def test_a_failing_call_fails_only_its_requests(pipelines, monkeypatch):
    real_run_call = batch_module.run_call

    def fail_on_ddim(loaded, rows, **options):
        if rows[0].request.args["scheduler"] == "ddim":
            raise RuntimeError("CUDA out of memory in /opt/conda/lib/python3.11/site-packages/torch/x.py")
        return real_run_call(loaded, rows, **options)

    monkeypatch.setattr(batch_module, "run_call", fail_on_ddim)
    ok, failed = serve_batch(pipelines["sd_base"], [request(), request(gen_args={"scheduler": "ddim"})])
    assert image_of(ok).size == (64, 64)
    assert isinstance(failed, RuntimeError) and "failed to generate (RuntimeError)" in str(failed)
    assert "/opt/conda" not in str(failed)  # the details stay in the server's log


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs(pipelines, scheduler):
    [answer] = serve_batch(pipelines["sd_base"], [request(gen_args={"scheduler": scheduler, "seed": 1})])
    parameters = params_of(answer)
    assert parameters["scheduler"] == scheduler
    if scheduler != "default":
        assert parameters["scheduler_class"] == SCHEDULERS[scheduler][0]


def test_long_prompt_is_truncated_and_said_so(pipelines):
    [answer] = serve_batch(pipelines["sd_base"], [request(" ".join(["tower"] * 500).encode())])
    parameters = params_of(answer)
    assert parameters["prompt_truncated"] is True and parameters["negative_prompt_truncated"] is False
    assert image_of(answer).size == (64, 64)


def test_multi_row_request(pipelines):
    rows = {
        "prompt": np.array([[b"a"], [b"b"]], dtype=np.object_),
        "gen_args": np.array([[b'{"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}']] * 2, dtype=np.object_),
    }
    [answer] = serve_batch(pipelines["sd_base"], [rows])
    arrays = answer.as_arrays()
    assert arrays["generated_image"].shape == (2, 1) and arrays["parameters"].shape == (2, 1)



# --- every answer fits, and no call outlives its invocation --------------------------------------


def answer_bytes(answer) -> int:
    return sum(len(data) for row in answer.images for data in row) + sum(len(p) for p in answer.parameters)


def test_an_answer_that_fits_is_lossless_png(pipelines):
    [answer] = serve_batch(pipelines["sd_upscale"], [image_request("sd_upscale", size=(96, 96))])
    assert params_of(answer)["encoding"] == "png"
    assert image_of(answer).format == "PNG" and image_of(answer).size == (384, 384)


def test_an_answer_over_the_limit_falls_back_to_lossy_webp_and_says_so(pipelines):
    loaded = pipelines["sd_upscale"]
    [png] = serve_batch(loaded, [image_request("sd_upscale", size=(96, 96))])
    limit = answer_bytes(png) // 2
    [answer] = serve_batch(loaded, [image_request("sd_upscale", size=(96, 96))], max_answer_bytes=limit)
    assert params_of(answer)["encoding"].startswith("webp q")
    assert answer_bytes(answer) <= limit
    fallback = image_of(answer)
    assert fallback.format == "WEBP" and fallback.size == (384, 384)


def test_an_answer_that_cannot_fit_is_refused_naming_the_limit(pipelines):
    loaded = pipelines["sd_base"]
    [refused, served] = serve_batch(loaded, [request(gen_args={"num_images_per_prompt": 4}), request()],
                                    max_answer_bytes=3000)
    assert isinstance(refused, RequestError) and refused.field == "gen_args"
    assert "fewer images per call (now 4)" in str(refused) and "MB one answer may carry" in str(refused)
    assert isinstance(served, RequestError)  # 3000 bytes hold no image at all
    [normal] = serve_batch(loaded, [request()])  # the model serves the next request as usual
    assert params_of(normal)["encoding"] == "png"


def test_a_call_predicted_over_the_budget_is_refused_before_any_work(model_repository):
    loaded = load_pipeline("sd_base", model_repository / "sd_base" / "1" / CHECKPOINT_DIR, call_budget_s=20)
    assert loaded.budget.predict(1.0, 10) is None  # nothing measured yet
    for size in (64, 64, 128):  # the first call only warms the model up
        serve_batch(loaded, [request(gen_args={"num_inference_steps": 4, "width": size, "height": size})])
    assert loaded.budget.predict(0.004, 2) > 0  # measured on its own calls, at two sizes
    calls = []
    real_run_call = batch_module.run_call
    big = {"num_inference_steps": 150, "width": 1024, "height": 1024, "num_images_per_prompt": 4}
    try:
        batch_module.run_call = lambda *args, **kwargs: calls.append(1) or real_run_call(*args, **kwargs)
        [refused, small] = serve_batch(loaded, [request(gen_args=big), request()])
    finally:
        batch_module.run_call = real_run_call
    assert isinstance(refused, CallOverBudget) and refused.field == "gen_args"
    message = str(refused)
    assert "over the 20 s a pipeline call may take of an invocation's 60 s" in message
    assert "num_inference_steps (now 150)" in message and "width x height (now 1024x1024)" in message
    assert "num_images_per_prompt (now 4)" in message
    assert image_of(small).size == (64, 64) and calls == [1]  # only the small request ran


def test_a_call_that_runs_over_is_stopped_at_a_step_and_the_next_is_served(model_repository):
    loaded = load_pipeline("sd_base", model_repository / "sd_base" / "1" / CHECKPOINT_DIR, call_budget_s=0.2)
    long_call = {"num_inference_steps": 150, "width": 128, "height": 128}
    [stopped] = serve_batch(loaded, [request(gen_args=long_call)])
    assert isinstance(stopped, CallOverBudget)
    steps_done = int(str(stopped).split("stopped at step ")[1].split(" ")[0])
    assert 1 <= steps_done < 150 and "of 150" in str(stopped)
    loaded.budget.seconds = 60
    [served] = serve_batch(loaded, [request()])
    assert image_of(served).size == (64, 64)


def test_a_call_stops_when_another_step_as_long_would_end_past_the_deadline():
    """Steps of 1.2 s with 2 s left: stopped after the second step, before the deadline, rather
    than a whole step past it; the last step asked for is not stopped for the next."""
    step_ends: list[float] = []
    now = [1000.0]  # the clock the deadline is read against, moved by hand: a step takes 1.2 s exactly
    deadline = now[0] + 2.0
    check = _step_callback(False, step_ends, deadline, total=10, clock=lambda: now[0])["callback"]
    check(0, None, None)
    now[0] += 1.2
    with pytest.raises(CallStopped) as stopped:
        check(1, None, None)
    assert now[0] < deadline and (stopped.value.steps_done, stopped.value.steps_total) == (2, 10)
    last = _step_callback(False, [], now[0] + 2.0, total=2, clock=lambda: now[0])["callback"]
    last(0, None, None)
    now[0] += 1.2
    last(1, None, None)  # no step is due after this one: the call decodes and answers


@pytest.mark.parametrize("model", ["sd_depth", "sd_inpaint"])
def test_strength_times_steps_below_one_is_refused_naming_strength(pipelines, model):
    [refused] = serve_batch(pipelines[model], [image_request(model, {"num_inference_steps": 3, "strength": 0.2})])
    assert isinstance(refused, RequestError) and refused.field == "gen_args.strength"
    assert "at least 1" in str(refused)


def test_rows_beyond_the_time_left_in_the_invocation_are_answered_busy(model_repository, monkeypatch):
    loaded = load_pipeline("sd_base", model_repository / "sd_base" / "1" / CHECKPOINT_DIR, call_budget_s=30)
    [first_ever, second] = serve_batch(loaded, [request(gen_args={"seed": 1}), request(gen_args={"seed": 2})])
    assert image_of(first_ever) and image_of(second)  # unmeasured: one row a call, then as many as fit
    # A speed known and held still: a step costs 10 ms a row, the rest of a call 29.97 s, so one
    # row takes all but 10 ms of the 30 s (2 steps: 29.99 s) and two rows do not fit (30.01 s).
    budget = WorkBudget(30, call_overhead_s=29.97)
    row = megapixels((64, 64))
    budget.steps_seen.extend([(row, 0.01), (2 * row, 0.02)])
    monkeypatch.setattr(budget, "record", lambda *args, **kwargs: None)
    loaded.budget = budget
    answers = serve_batch(loaded, [request(gen_args={"seed": seed}) for seed in range(3)])
    assert image_of(answers[0]).size == (64, 64)  # the first row fits; after it, no time is left
    for busy in answers[1:]:
        assert isinstance(busy, ModelBusy) and BUSY_WORDS in str(busy)
