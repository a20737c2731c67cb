"""The studio's plain logic, without a browser or an endpoint: tasks (and the one check of a job's
inputs), masks, PNG metadata, the result store, the session history and the status stream."""

from __future__ import annotations

import base64
import io
import json
import os

import botocore.exceptions
import pytest
from PIL import Image, PngImagePlugin
from sdserve.catalog import MODELS
from sdserve.params import RANDOM_SEED, SEED_MAX

from studio import session
from studio.client import EndpointConfig, StudioClient
from studio.errors import StudioError
from studio.masks import brush_layer, editor_value, mask_from_editor, mask_from_layers
from studio.metadata import embed_parameters, image_to_png, read_parameters
from studio.planning import plan_job
from studio.results import GenerationResult
from studio.runner import Status, Tick, job_events, run_job
from studio.scheduler import FairScheduler
from studio.status import status_line, with_status
from studio.store import ResultStore
from studio.tasks import TASK_BY_MODEL, TASKS, task_of

from .samples import png_with_parameters


def painted_mask(size=(64, 64), box=(16, 16, 40, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "results")


# --- tasks: derived from the model table ------------------------------------------------------


@pytest.mark.parametrize("task", TASKS.values(), ids=lambda task: task.name)
def test_each_model_is_a_tab_whose_controls_are_its_arguments(task):
    """A model's own tab, or an edit tool's on it (Erase, Extend), whose settings follow the arguments."""
    spec = MODELS[task.model]
    if task.tool is None or task.name == spec.task:
        assert TASK_BY_MODEL[spec.name] is task and spec.task == task.name
    else:
        assert task_of({"model": spec.name, "task": task.name}) is task
    settings = task.tool.settings if task.tool else ()
    names = [control.name for control in task.controls]
    assert names == ["prompt", "negative_prompt", *spec.argument_names, *(setting.name for setting in settings)]
    arguments = {argument.name: argument for argument in (*spec.arguments, *settings)}
    for control in task.controls[2:]:
        argument = arguments[control.name]
        assert (control.label, control.default, control.minimum, control.maximum) == (
            argument.label, argument.default, argument.minimum, argument.maximum
        )


def test_the_client_methods_take_the_tables_arguments():
    client = StudioClient(EndpointConfig(endpoint_name="x", endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StudioError, match="takes no argument 'steps'.*num_inference_steps"):
        client.generate("a house", steps=3)
    with pytest.raises(StudioError, match="takes no argument 'width'"):
        client.upscale(Image.new("RGB", (64, 64)), width=256)


def control(task: str, name: str):
    return next(control for control in TASKS[task].controls if control.name == name)


def test_check_gives_the_endpoint_its_types_and_refuses_what_is_out_of_range():
    steps = control("generate", "num_inference_steps")
    assert steps.check(50.0) == 50 and isinstance(steps.check(50.0), int)
    assert steps.check(None) == 50
    for bad, words in ((1000, "from 1 to 150; got 1000"), ("nonsense", "must be an integer"), (float("nan"), "finite"),
                       (20.5, "must be an integer")):
        with pytest.raises(StudioError, match=words) as raised:
            steps.check(bad)
        assert str(raised.value).startswith(steps.label)
    seed = control("generate", "seed")
    assert seed.check(None) == RANDOM_SEED and seed.check(SEED_MAX) == SEED_MAX
    with pytest.raises(StudioError, match=str(SEED_MAX)):
        seed.check(2**40)
    scheduler = control("generate", "scheduler")
    assert scheduler.check("euler_a") == "euler_a"
    with pytest.raises(StudioError, match="must be one of default"):
        scheduler.check("rm -rf")
    assert control("restyle", "strength").check("0.3") == 0.3


class Answering:
    """A sagemaker-runtime stand-in that answers every call with one image and keeps the gen_args sent."""

    def __init__(self):
        self.sent = []

    def invoke_endpoint(self, **request):
        values = {tensor["name"]: tensor["data"][0] for tensor in json.loads(request["Body"])["inputs"]}
        self.sent.append(json.loads(values["gen_args"]))
        png = base64.b64encode(png_with_parameters({"model": "sd_base", "seed": 1})).decode()
        answer = {"outputs": [{"name": "generated_image", "data": [png]}, {"name": "parameters", "data": ['{"seed": 1}']}]}
        return {"Body": io.BytesIO(json.dumps(answer).encode())}


def test_20_steps_written_20_0_mean_the_same_through_every_entry_point():
    """One rule (Argument.check): the tab, the client's keywords and the endpoint's own check agree."""
    spec = MODELS["sd_base"]
    assert spec.parse_gen_args(json.dumps({"num_inference_steps": 20.0}))["num_inference_steps"] == 20  # the server
    [call] = plan_job(TASKS["generate"].check({"prompt": "a house", "num_inference_steps": 20.0})).calls  # the tab, its API
    assert call.gen_args["num_inference_steps"] == 20 and type(call.gen_args["num_inference_steps"]) is int
    runtime = Answering()
    client = StudioClient(EndpointConfig("sd-studio", endpoint_url="http://127.0.0.1:9"), runtime=runtime)
    client.generate("a house", num_inference_steps=20.0, seed=1)  # the client
    assert runtime.sent == [{"num_inference_steps": 20, "seed": 1}]
    for refuse in (lambda: spec.parse_gen_args(json.dumps({"num_inference_steps": 20.5})),
                   lambda: TASKS["generate"].check({"prompt": "a house", "num_inference_steps": 20.5}),
                   lambda: client.generate("a house", num_inference_steps=20.5)):
        with pytest.raises((StudioError, ValueError), match="must be an integer from 1 to 150, got 20.5"):
            refuse()
    assert len(runtime.sent) == 1, "nothing refused was sent"


def test_restore_falls_back_to_the_default_for_unusable_stored_values():
    steps = control("generate", "num_inference_steps")
    assert steps.restore(20.0) == 20
    assert steps.restore(1000) == steps.restore("nonsense") == 50
    assert control("generate", "scheduler").restore("rm -rf") == "default"


# --- tasks: running one through the client layer --------------------------------------------


def tab_values(task: str, **values):
    """What a tab hands its handler: every control's value (these given, the others their defaults)."""
    return {**TASKS[task].defaults(), **values}


def test_a_tab_plans_its_job_with_validated_arguments():
    values = tab_values("generate", prompt="a house", num_inference_steps=2.0, width=64.0, height=64, seed=5.0)
    plan = plan_job(TASKS["generate"].check(values))
    [call] = plan.calls
    assert plan.model == "sd_base" and call.inputs["prompt"] == "a house"
    assert call.gen_args["num_inference_steps"] == 2 and call.gen_args["width"] == 64 and call.seed == 5
    assert call.gen_args["guidance_scale"] == 7.5 and call.gen_args["scheduler"] == "default"


def test_a_tab_plans_image_and_mask_as_the_endpoint_takes_them():
    plan = plan_job(TASKS["erase"].check(tab_values("erase", prompt=""), Image.new("RGBA", (64, 64)), painted_mask()))
    [call] = plan.calls
    assert call.inputs["image"].mode == "RGB" and call.inputs["mask_image"].mode == "L"
    assert call.gen_args["strength"] == 1.0


def test_several_images_or_a_large_upscale_are_planned_as_several_calls_and_said_so():
    four = plan_job(TASKS["generate"].check({"prompt": "a house", "num_images_per_prompt": 4, "seed": 10}))
    assert [call.seed for call in four.calls] == [10, 11, 12, 13] and four.is_split
    tiled = plan_job(TASKS["upscale"].check({}, Image.new("RGB", (512, 512))))
    assert tiled.call_count == 9 and "9 calls" in tiled.summary and "6 MB" in tiled.summary


def test_run_sends_the_plan_through_the_jobs_turn():
    import threading

    sent = []

    class Client:
        def invoke(self, model, inputs, gen_args, *, cancelled, **options):
            sent.append((model, cancelled, threading.current_thread().name))
            parameters = {"model": model, "seed": 7, "seeds": [7]}
            return GenerationResult(model=model, images=[], png=[png_with_parameters(parameters)], parameters=parameters)

    scheduler = FairScheduler(capacity=1)
    plan = plan_job(TASKS["generate"].check({"prompt": "a house"}))
    with scheduler.job("a") as job:
        result = run_job(Client(), plan, submit=job.submit, cancelled=job.cancelled)
    # Sent by the scheduler's worker, in the job's turn, cancelled by the job's cancel.
    assert sent == [("sd_base", job.cancelled, "endpoint-call-0")] and result.parameters["seed"] == 7


def test_a_job_queues_its_calls_while_it_waits_its_turn_and_they_go_in_it():
    """The studio submits a job's calls at once; a session's later job holds them until the earlier
    one is over (no thread waits for the turn), and a cancel drops them unsent."""
    scheduler = FairScheduler(capacity=2)
    first, second, third = scheduler.job("a"), scheduler.job("a"), scheduler.job("a")
    ran = []
    waiting = second.submit(lambda: ran.append("second") or "second")
    dropped = third.submit(lambda: ran.append("third"))
    assert not waiting.done() and second.waiting_line() == "Queued behind 1 earlier job of yours…"
    third.cancel()
    assert dropped.cancelled()
    with first:
        pass  # the session's earlier job ends: the next one's queued call goes
    assert waiting.result(10) == "second" and ran == ["second"]


@pytest.mark.parametrize(
    "task, values, image, mask, message",
    [
        ("generate", {"prompt": "  "}, None, None, "Write a prompt"),
        ("restyle", {"prompt": "x"}, None, None, "needs an input image"),
        ("upscale", {}, Image.new("RGB", (1100, 100)), None, "at most 1024 px"),
        ("restyle", {"prompt": "x"}, Image.new("RGB", (1100, 64)), None, "at most 1024 px"),
        ("restyle", {"prompt": "x"}, Image.new("RGB", (64, 16)), None, "at least 32 px"),
        ("erase", {}, Image.new("RGB", (64, 64)), None, "mask is empty"),
        ("erase", {}, Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 0), "mask is empty"),
        ("erase", {}, Image.new("RGB", (64, 64)), painted_mask((32, 32), (0, 0, 8, 8)), "must be the same size"),
    ],
)
def test_bad_inputs_are_refused_before_planning(task, values, image, mask, message):
    with pytest.raises(StudioError, match=message):
        TASKS[task].check(values, image, mask)


# --- masks ------------------------------------------------------------------------------------


def test_mask_is_white_where_painted_black_elsewhere():
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 40), (10, 10, 20, 20))  # faint paint still counts
    mask = mask_from_layers([layer, None], (64, 64))
    assert mask.mode == "L" and mask.size == (64, 64)
    assert mask.getpixel((15, 15)) == 255 and mask.getpixel((30, 30)) == 0
    assert {value for _, value in mask.getcolors()} == {0, 255}


def test_layers_of_another_size_are_scaled_to_the_image():
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 16, 16))
    mask = mask_from_layers([layer], (64, 64))
    assert mask.size == (64, 64) and mask.getpixel((31, 31)) == 255 and mask.getpixel((33, 33)) == 0


def test_editor_value_round_trips_the_mask():
    image = Image.new("RGB", (64, 48), (1, 2, 3))
    mask = painted_mask((64, 48), (5, 5, 30, 30))
    value = editor_value(image, mask)
    assert value["layers"][0].mode == "RGBA" and value["layers"][0].size == (64, 48)
    back_image, back_mask = mask_from_editor(value)
    assert back_image.tobytes() == image.tobytes()
    assert back_mask.tobytes() == mask.tobytes()
    assert brush_layer(mask).getpixel((0, 0))[3] == 0


def test_editor_without_an_image_gives_nothing():
    assert mask_from_editor(None) == (None, None)
    assert mask_from_editor({"background": None, "layers": [], "composite": None}) == (None, None)
    assert editor_value(None)["background"] is None


# --- PNG metadata -----------------------------------------------------------------------------


def test_parameters_round_trip_through_the_png_text_chunk():
    parameters = {"model": "sd_base", "seed": 42, "prompt": "ein Haus ☀"}
    png = embed_parameters(png_with_parameters(None, extra_text={"Software": "x"}), parameters)
    assert read_parameters(png) == parameters
    assert Image.open(io.BytesIO(png)).text["Software"] == "x"


def test_embedding_keeps_the_bytes_when_the_parameters_are_there():
    png = png_with_parameters({"seed": 1})
    assert embed_parameters(png, {"seed": 1}) is png
    assert read_parameters(embed_parameters(png, {"seed": 2})) == {"seed": 2}


@pytest.mark.parametrize("data", [b"", b"not a png", png_with_parameters(None)])
def test_files_without_parameters_read_as_none(data):
    assert read_parameters(data) is None


def test_non_object_parameters_read_as_none():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "[1, 2]")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    assert read_parameters(buffer.getvalue()) is None


# --- the result store -------------------------------------------------------------------------


def test_store_names_files_by_content(store):
    png = png_with_parameters({"seed": 3})
    result_id = store.save(png, "generate seed 3")
    assert store.save(png, "another name") == result_id
    path = store.path(result_id)
    assert path.name == "generate-seed-3.png" and path.read_bytes() == png
    assert store.open(result_id).size == (64, 64)


@pytest.mark.parametrize("forged", ["../../etc/passwd", "0" * 31, "G" * 32, None, 12, "0" * 32])
def test_store_refuses_malformed_or_unknown_ids(store, forged):
    assert store.path(forged) is None
    assert store.open(forged) is None


def test_store_removes_the_oldest_past_its_limit(tmp_path):
    store = ResultStore(tmp_path, max_items=3)  # per owner (tests/test_studio_hardening.py has the rest)
    ids = []
    for color in range(5):
        ids.append(store.save(png_with_parameters(None, color=(color, 0, 0)), "x", owner="ann"))
        for path in tmp_path.rglob("*"):  # distinct modification times, oldest first: set, not slept for
            if ids[-1] in path.parts:
                os.utime(path, ns=(10**18 + color * 10**9,) * 2)
    assert [store.path(result_id, owner="ann") is not None for result_id in ids] == [False, False, True, True, True]


# --- the session history ----------------------------------------------------------------------


def generation_result(model="sd_base", seeds=(11, 12), embedded=True, weights="tiny-random") -> GenerationResult:
    parameters = {"model": model, "weights": weights, "prompt": "a house", "seed": seeds[0], "seeds": list(seeds),
                  "num_inference_steps": 3, "guidance_scale": 5.0, "num_images_per_prompt": len(seeds)}
    pngs = [png_with_parameters({**parameters, "seed": seed} if embedded else None, color=(seed, 0, 0)) for seed in seeds]
    return GenerationResult(model=model, images=[], png=pngs, parameters=parameters)


@pytest.mark.parametrize("embedded", [True, False], ids=["endpoint-embedded", "studio-embedded"])
def test_every_image_becomes_an_entry_with_its_own_seed(store, embedded):
    entries = session.record_result(store, TASKS["generate"], generation_result(embedded=embedded))
    assert [entry["parameters"]["seed"] for entry in entries] == [11, 12]
    for entry in entries:
        assert entry["task"] == "generate" and entry["inputs"] == {}
        assert read_parameters(store.path(entry["id"]).read_bytes()) == entry["parameters"]
        assert store.path(entry["id"]).name == f"generate-seed-{entry['parameters']['seed']}.png"


def test_inputs_are_kept_for_restoring(store):
    image, mask = Image.new("RGB", (64, 64), "red"), painted_mask()
    [entry] = session.record_result(store, TASKS["erase"], generation_result("sd_inpaint", seeds=(5,)), {"image": image, "mask": mask})
    restored = session.restored_inputs(entry, store)
    assert restored["image"].tobytes() == image.tobytes()
    assert restored["mask"].convert("L").tobytes() == mask.tobytes()


def test_history_is_newest_first_and_bounded():
    history = session.add_to_history([], [{"id": "a"}])
    history = session.add_to_history(history, [{"id": "b"}, {"id": "c"}])
    assert [entry["id"] for entry in history] == ["b", "c", "a"]
    assert len(session.add_to_history(history, [{"id": str(n)} for n in range(60)], limit=50)) == 50


def test_history_from_the_browser_is_checked(store):
    [good] = session.record_result(store, TASKS["generate"], generation_result(seeds=(1,)))
    forged = [
        {**good, "id": "../../../etc/passwd"},
        {**good, "task": "rm"},
        {**good, "parameters": "x"},
        {**good, "id": "f" * 32},  # well-formed, but not in the store
        "not an entry",
    ]
    assert session.valid_history([*forged, good], store) == [good]
    assert session.valid_history({"not": "a list"}, store) == []


def test_restoring_maps_parameters_back_onto_controls():
    parameters = {"model": "sd_depth", "prompt": "p", "num_inference_steps": 3, "num_images_per_prompt": 2,
                  "strength": 0.4, "seed": 99, "scheduler": "bogus", "weights": "tiny-random"}
    values = session.restored_values(TASKS["restyle"], parameters)
    assert values == {"prompt": "p", "num_inference_steps": 3, "num_images_per_prompt": 2, "strength": 0.4, "seed": 99, "scheduler": "default"}


def test_a_dropped_png_becomes_an_entry_of_its_task(store):
    png = png_with_parameters({"model": "sd_upscale", "seed": 8, "noise_level": 30}, extra_text={"Comment": "x"})
    entry = session.entry_from_png(store, png)
    assert entry["task"] == "upscale" and entry["parameters"]["noise_level"] == 30
    kept = store.path(entry["id"]).read_bytes()  # its pixels and parameters, written anew: not the file as dropped
    assert kept != png and read_parameters(kept) == entry["parameters"]
    assert Image.open(io.BytesIO(kept)).tobytes() == Image.open(io.BytesIO(png)).tobytes()
    assert session.entry_from_png(store, png_with_parameters({"model": "other"})) is None
    assert session.entry_from_png(store, image_to_png(Image.new("RGB", (8, 8)))) is None


def test_captions_and_banner_flag():
    entry = {"task": "erase", "parameters": {"seed": 4, "prompt": "x" * 100, "weights": "tiny-random"}}
    caption = session.caption(entry)
    assert caption.startswith("Erase · seed 4 · xxx") and caption.endswith("…") and len(caption) < 90
    assert session.random_weights([entry]) == "tiny-random"
    assert session.random_weights([{"parameters": {"weights": "hub"}}]) is None
    assert session.random_weights([{"parameters": {"weights": "hub"}}, {"parameters": {"weights": "full-size-random"}}]) \
        == "full-size-random"
    assert session.effective_seed(entry) == 4 and session.effective_seed({"parameters": {"seed": True}}) is None


# --- the status stream ------------------------------------------------------------------------


def drain(stream) -> tuple[list, object]:
    """Everything a generator yields, and what it returns."""
    items = []
    while True:
        try:
            items.append(next(stream))
        except StopIteration as done:
            return items, done.value


def test_status_stream_relays_reports_and_returns_the_result():
    def job():  # a job's events (studio.runner.job_events): its lines, a tick of the clock between them
        yield Status("Sending to sd_base…")
        yield Tick()
        yield Status("sd_base answered in 0.1 s.")
        return "result"

    updates, result = drain(with_status(job(), present=lambda line: {"status": line}))
    assert result == "result"
    lines = [update["status"] for update in updates]
    assert len(lines) == 3 and "Sending to sd_base" in lines[0] and "Sending to sd_base" in lines[1]
    assert "answered" in lines[-1]


def test_status_stream_raises_the_calls_error():
    def job():
        yield Status("Sending to sd_base…")
        raise StudioError("The endpoint is busy.")

    with pytest.raises(StudioError, match="busy"):
        list(with_status(job()))


class LoadingRuntime:
    """A sagemaker-runtime stand-in whose model is still loading on the first call."""

    def __init__(self):
        self.calls = 0

    def invoke_endpoint(self, **request):
        self.calls += 1
        if self.calls == 1:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "ModelNotReadyException", "Message": "loading"}}, "InvokeEndpoint"
            )
        png = base64.b64encode(png_with_parameters({"model": "sd_base", "seed": 1})).decode()
        answer = {"outputs": [{"name": "generated_image", "data": [png]}, {"name": "parameters", "data": ['{"seed": 1}']}]}
        return {"Body": io.BytesIO(json.dumps(answer).encode())}


def test_the_status_line_says_when_the_model_is_loading():
    client = StudioClient(EndpointConfig("sd-studio", endpoint_url="http://127.0.0.1:9", backoff_s=0.01), runtime=LoadingRuntime())
    lines, result = drain(
        with_status(job_events(client, plan_job(TASKS["generate"].check({"prompt": "a house"})), tick_s=0.01))
    )
    assert result.seeds == [1]
    assert any("still loading" in line for line in lines), lines


def test_a_slow_call_says_why():
    assert "loads it" not in status_line("Sending…", 2)
    assert "loads it" in status_line("Sending…", 30)


def test_the_banner_and_the_endpoint_panel_say_which_random_weights():
    from studio.app import banner_text
    from studio.endpoint_watch import EndpointWatch, describe_endpoint

    assert "Full-size random weights" in banner_text("full-size-random") and "noise" in banner_text("full-size-random")
    assert "Demo weights" in banner_text("tiny-random")
    panel = describe_endpoint(EndpointWatch(random_weights="full-size-random"))
    assert panel.startswith("**Full-size random weights** (the real SD 2 architectures")
    assert "random weights" not in describe_endpoint(EndpointWatch())  # real weights, or AWS: nothing said
