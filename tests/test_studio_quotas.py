"""studio.quotas and what it charges: a job's work (studio.planning, JobPlan.work: calls x steps x
megapixels), per-designer and studio-wide daily quotas on it, jobs at once, and the prompt's
length, all checked at Handlers.admit before anything is sent. No process, no endpoint; time
comes from a clock the tests move."""

from __future__ import annotations

import pytest
from PIL import Image
from sdserve.catalog import MAX_PROMPT_CHARS, MODELS

from studio import __main__ as studio_main
from studio.access import Access
from studio.app import Handlers
from studio.errors import StudioError
from studio.planning import describe_work, plan_job
from studio.quotas import DAY_S, MIN_JOB_WORK, QuotaBook, Quotas
from studio.scheduler import FairScheduler
from studio.store import ResultStore
from studio.tasks import TASKS
from tests.samples import Clock

ONE_1024_OUTPUT_MP = 1024 * 1024 / 1e6  # an upscaled 256 px tile's output, in megapixels
GENERATE_512 = 50 * 512 * 512 / 1e6  # a default Generate: 50 steps over 512×512 px


class Request:
    """What Access reads of a gr.Request in the local mode: the browser session (the designer is
    then "session:<hash>")."""

    def __init__(self, session_hash: str):
        self.session_hash, self.username, self.session = session_hash, None, None


def handlers(tmp_path, quotas: Quotas, clock=None) -> Handlers:
    """The studio's handlers with no page and no endpoint: enough for `admit`, which sends nothing."""
    book = QuotaBook(quotas, clock=clock or Clock())
    scheduler = FairScheduler(1, jobs_per_session=quotas.jobs_at_once)
    return Handlers(None, lambda: None, ResultStore(tmp_path / "results"), scheduler, Access("local"), book)


def upscale_values(images: int) -> dict:
    return {"prompt": "a house", "num_images_per_prompt": images}


# --- a job's work ----------------------------------------------------------------------------------


def test_a_jobs_work_is_its_calls_times_steps_times_output_megapixels():
    generate = plan_job(TASKS["generate"].check({"prompt": "a house"}))
    assert generate.work == pytest.approx(GENERATE_512)
    four = plan_job(TASKS["generate"].check({"prompt": "a house", "num_images_per_prompt": 4, "width": 1024}))
    assert four.call_count == 4 and four.work == pytest.approx(4 * 50 * 1024 * 512 / 1e6)
    # An upscale of four 1024 px images: 25 tiles each, 100 calls of a 1024×1024 px output.
    upscale = plan_job(TASKS["upscale"].check(upscale_values(4), Image.new("RGB", (1024, 1024))))
    assert (upscale.image_count, upscale.call_count) == (4, 100)
    assert upscale.work == pytest.approx(100 * 50 * ONE_1024_OUTPUT_MP)
    assert sum(call.work for call in upscale.calls) == upscale.work


def test_strength_scales_the_steps_of_an_image_to_image_model_as_the_table_says():
    assert MODELS["sd_depth"].strength_scales_steps and not MODELS["sd_upscale"].strength_scales_steps
    image = Image.new("RGB", (512, 515))  # the server cuts 515 down to 512 (a multiple of 8)
    half = plan_job(TASKS["restyle"].check({"prompt": "a house", "strength": 0.5, "num_inference_steps": 20}, image))
    assert half.work == pytest.approx(10 * 512 * 512 / 1e6)
    # Erase sends the box around its mask at the model's working side: that is what is worked on.
    big, mask = Image.new("RGB", (1024, 1024)), Image.new("L", (1024, 1024), 255)
    erase = plan_job(TASKS["erase"].check({"prompt": "a house"}, big, mask))
    assert erase.calls[0].inputs["image"].size == (512, 512)
    assert erase.work == pytest.approx(GENERATE_512)


def test_work_reads_as_designers_read_it():
    assert describe_work(5242.88) == "5,243 units of work"
    assert describe_work(1) == "1 unit of work"
    assert describe_work(0.4096) == "0.41 units of work"


# --- quotas on work -----------------------------------------------------------------------------


def test_an_upscale_of_four_1024_px_images_is_charged_its_100_calls_not_4_images(tmp_path):
    """A designer's day of 1,000 units: 4 images' worth of anything small, not one 100-call upscale."""
    studio = handlers(tmp_path, Quotas(work_per_day=1000))
    with pytest.raises(StudioError) as refused:
        studio.admit(TASKS["upscale"], Request("alice"), upscale_values(4), Image.new("RGB", (1024, 1024)))
    assert str(refused.value) == (
        "This job is 5,243 units of work (one unit is one denoising step over one megapixel of output); "
        "you have 1,000 units of work left of the 1,000 a designer may use in a day. Nothing was sent. "
        "Fewer steps, images or pixels make it smaller."
    )
    assert studio.scheduler.stats()["jobs"] == 0  # refused: its place in the queue given back
    _, _, plan, job = studio.admit(TASKS["upscale"], Request("alice"), upscale_values(1), Image.new("RGB", (256, 256)))
    assert plan.call_count == 1 and studio.scheduler.stats()["jobs"] == 1
    job.end()
    assert studio.quotas.left("session:alice")[0] == pytest.approx(1000 - 50 * ONE_1024_OUTPUT_MP)


def test_a_designers_day_of_work_refuses_with_the_cost_what_is_left_and_when():
    clock = Clock()
    book = QuotaBook(Quotas(jobs_per_minute=100, work_per_day=100, daily_budget=1000), clock=clock)
    assert book.charge("alice", 60) == 60
    clock.now += 3600
    book.charge("alice", 30)
    with pytest.raises(StudioError) as refused:
        book.charge("alice", 20)
    assert str(refused.value) == (
        "This job is 20 units of work (one unit is one denoising step over one megapixel of output); you have "
        "10 units of work left of the 100 a designer may use in a day. Nothing was sent. Enough is free again "
        "in 23 h 0 min; a smaller job may fit sooner."
    )
    book.charge("bob", 100)  # someone else's day is their own
    book.charge("alice", 10)
    assert book.left("alice") == (0, 1000 - 200)
    clock.now += DAY_S - 3600  # the first job is a day old: its 60 units are free again
    assert book.left("alice")[0] == 60
    book.charge("alice", 60)


def test_the_studio_has_a_daily_budget_for_all_designers_together():
    clock = Clock()
    book = QuotaBook(Quotas(jobs_per_minute=100, work_per_day=100, daily_budget=250), clock=clock)
    for designer in ("a", "b"):
        book.charge(designer, 100)
    with pytest.raises(StudioError, match=r"This job is 60 units of work .* the studio has 50 units of work left "
                                          r"of the 250 all designers together may use in a day\. Nothing was sent\."):
        book.charge("c", 60)  # a new account: its own quota is full, the studio's is not
    book.charge("c", 50)
    assert book.done_line("d", 5) == ("It was 5 units of work; you have 100 units of work left of the 100 a designer "
                                      "may use in a day. The studio has 0 units of work left for all designers.")
    clock.now += DAY_S
    book.charge("c", 100)


def test_every_job_costs_at_least_a_unit_and_the_book_forgets_what_is_a_day_old():
    """Each call costs something whatever its size, and the book does not grow with designers who
    came and went: it holds only the last day's entries."""
    clock = Clock()
    book = QuotaBook(Quotas(work_per_day=5, daily_budget=10_000), clock=clock)
    assert book.charge("alice", 0.001) == MIN_JOB_WORK
    for index in range(500):
        book.charge(f"session:{index}", 0.001)
        clock.now += 1
    clock.now += DAY_S
    book.charge("bob", 1)
    assert set(book._jobs) == set(book._work) == {"bob"} and len(book._studio) == 1


def test_jobs_per_minute_are_kept(tmp_path):
    clock = Clock()
    studio = handlers(tmp_path, Quotas(jobs_per_minute=2), clock)
    for _ in range(2):
        studio.admit(TASKS["generate"], Request("alice"), {"prompt": "a house"})[3].end()
    with pytest.raises(StudioError, match="2 jobs in the last minute.*go on in 60 s"):
        studio.admit(TASKS["generate"], Request("alice"), {"prompt": "a house"})
    clock.now += 60
    studio.admit(TASKS["generate"], Request("alice"), {"prompt": "a house"})


# --- jobs at once, at the one door --------------------------------------------------------------------


def test_ten_jobs_sent_at_once_by_one_designer_are_not_all_accepted(tmp_path):
    studio = handlers(tmp_path, Quotas(jobs_at_once=3))
    accepted, refused = [], []
    for _ in range(10):
        try:
            accepted.append(studio.admit(TASKS["generate"], Request("alice"), {"prompt": "a house"}))
        except StudioError as error:
            refused.append(str(error))
    assert len(accepted) == 3 and len(refused) == 7 and "3 jobs waiting or running" in refused[0]
    # Only the jobs let in were charged: a refused job costs nothing.
    assert studio.quotas.left("session:alice")[0] == pytest.approx(Quotas().work_per_day - 3 * GENERATE_512)
    studio.admit(TASKS["generate"], Request("bob"), {"prompt": "a house"})  # the next designer is not shut out


# --- the prompt's length --------------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_servers_limit_is_refused_before_planning(tmp_path, control):
    studio = handlers(tmp_path, Quotas())
    label = TASKS["generate"].control(control).label
    too_long = {"prompt": "a house", control: "é" * (MAX_PROMPT_CHARS + 1)}
    with pytest.raises(StudioError) as refused:
        studio.admit(TASKS["generate"], Request("alice"), too_long)
    assert str(refused.value) == f"{label}: at most {MAX_PROMPT_CHARS:,} characters; got {MAX_PROMPT_CHARS + 1:,}."
    assert studio.scheduler.stats()["jobs"] == 0 and studio.quotas.left("session:alice")[0] == Quotas().work_per_day
    at_limit = {"prompt": "a house", control: "é" * MAX_PROMPT_CHARS}
    assert len(getattr(TASKS["generate"].check(at_limit), control)) == MAX_PROMPT_CHARS


# --- flags and environment variables ------------------------------------------------------------------


def test_quotas_come_from_flags_over_environment_variables_over_the_defaults(monkeypatch):
    endpoint = ["--endpoint-url", "http://127.0.0.1:9"]
    assert studio_main.parse_args(endpoint).quotas == Quotas()
    monkeypatch.setenv("STUDIO_JOBS_AT_ONCE", "2")
    monkeypatch.setenv("STUDIO_DAILY_BUDGET", "5000")
    args = studio_main.parse_args([*endpoint, "--jobs-at-once", "4", "--work-per-day", "700"])
    assert args.quotas == Quotas(jobs_at_once=4, work_per_day=700, daily_budget=5000)
    with pytest.raises(SystemExit):
        studio_main.parse_args([*endpoint, "--jobs-at-once", "0"])
    with pytest.raises(ValueError, match="STUDIO_WORK_PER_DAY: a whole number"):
        Quotas.from_env({"STUDIO_WORK_PER_DAY": "lots"})
    with pytest.raises(ValueError, match="STUDIO_IMAGES_PER_DAY is no longer read; set STUDIO_WORK_PER_DAY"):
        Quotas.from_env({"STUDIO_IMAGES_PER_DAY": "500"})
