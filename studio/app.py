"""The studio page, read top to bottom like a Gradio demo: the event handlers (`Handlers`, each
a plain method translating between components and the tested logic in tasks, session, masks and
metadata), then `layout` (the components of the page), then `wire` (which event calls which
handler), and `build_app`, which does the three in order.

Where a click goes: a tab's button calls `Handlers.run`, which checks the tab's values once
(studio/tasks.py, against the model table), plans the job (studio/planning.py), queues its calls
in the designer's turn (studio/scheduler.py, the endpoint shared fairly), sends them through the
client (studio/runner.py, studio/client.py) while streaming their status (studio/status.py),
records each image once as it arrives (studio/session.py) and shows it in the tab and the history.
The named API endpoints (`Handlers.api`) take the same path without the page.

Each result records the result it was made from (its "parent", studio/session.py): the one whose
image was put into the tab (Send to, a history entry restored: the tab's `sent` state) when the
job's input is still that image, pixel for pixel; the one varied (Vary); none otherwise. The
history shows the chains; "Export" downloads a chain or the session as a zip and dropping one (or
the `/import` API) brings it back, as the importer's (studio/exchange.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from sdserve.catalog import MAX_BATCH_SIZE
from sdserve.checkpoint import FULL_SIZE_KIND, TINY_KIND
from sdserve.files import atomic_file
from sdserve.params import random_seed

from studio import signing
from studio.access import Access
from studio.client import StudioClient
from studio.endpoint_watch import (
    RANDOM_WEIGHTS_MEANING,
    RANDOM_WEIGHTS_NAMES,
    EndpointWatch,
    WarmUps,
    describe_endpoint,
)
from studio.errors import PartialJobError, StudioError
from studio.exchange import (
    MAX_MANIFEST_BYTES,
    Limits,
    export_zip,
    import_entries,
    lineage,
    read_zip,
)
from studio.masks import editor_value, mask_from_editor
from studio.planning import JobPlan, plan_job
from studio.quotas import QuotaBook, Quotas
from studio.runner import job_events, run_job
from studio.scheduler import FairScheduler, Job
from studio.session import (
    MAX_UPLOAD_BYTES,
    Entry,
    add_to_history,
    before_after,
    chains_markdown,
    download_path,
    effective_seed,
    gallery_items,
    history_items,
    keep_inputs,
    record_result,
    restore_from_png,
    restored_inputs,
    restored_values,
    result_image,
    random_weights,
    signed_entry,
    valid_history,
    vary_values,
    with_inputs,
)
from studio.status import TICK_S, with_status
from studio.store import ResultStore, owner_key
from studio.tasks import TASKS, JobInputs, Task
from studio.ui import EDITOR_CANVAS_SIZE, TaskPanel, brush, task_panel

log = logging.getLogger(__name__)

LOCAL_ACCESS = Access("local")

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
HISTORY_STORAGE_KEY = "sd-studio-history"
# Calls in flight to the endpoint at once, for all tabs, API callers and designers together: as
# many as the endpoint runs in one batch per model, so Triton batches them; more would only queue
# there, where they cannot be cancelled.
ENDPOINT_CONCURRENCY = MAX_BATCH_SIZE
GENERIC_ERROR = "Something went wrong in the studio; the details are in its log."
# The banner over a studio whose endpoint serves random weights (the checkout's own, or a result
# made with them): what they are, and that every image is noise.
RANDOM_WEIGHTS_TITLES = {TINY_KIND: "Demo weights", FULL_SIZE_KIND: "Full-size random weights"}


def banner_text(kind: str) -> str:
    return (f"⚠️ **{RANDOM_WEIGHTS_TITLES[kind]}:** the endpoint serves {RANDOM_WEIGHTS_NAMES[kind]} "
            f"({RANDOM_WEIGHTS_MEANING[kind]}), so every image is noise. Real pictures need the real weights "
            "(`make real-weights`) or a SageMaker endpoint.")


# On the demo's tiny weights (a CPU), the article's 512 px and 50 steps take minutes an image;
# the studio starts small instead, and says so.
TINY_WEIGHTS_START = {"width": 128, "height": 128, "num_inference_steps": 10, "work_side": 128}
TINY_WEIGHTS_START_NOTE = " The studio starts at 128 px and 10 steps, which a CPU makes in seconds."
ENDPOINT_PANEL_REFRESH_S = 5  # the endpoint panel also refreshes when a job or a Send to ends
# An import through the page is one upload: at most Gradio's max_file_size (MAX_UPLOAD_BYTES, set
# in __main__), and an export's PNGs are stored as they are, so it unpacks to at most that and its
# manifest (deflated). The named API takes the same.
IMPORT_LIMITS = Limits(zip_bytes=MAX_UPLOAD_BYTES, total_bytes=MAX_UPLOAD_BYTES + MAX_MANIFEST_BYTES)
EXPORT_FILE = {"session": "sd-studio-session.zip", "chain": "sd-studio-chain.zip"}
# An export or import sends nothing to the endpoint but is a job of the studio's own (CPU, memory,
# disk): each counts in the designer's jobs a minute, charged as the smallest job (MIN_JOB_WORK).
EXCHANGE_WORK = 0.0
# Downloads the zip an export has just put into the page's download button: one click exports.
DOWNLOAD_EXPORT = """(file) => {
    if (!file || !file.url) return;
    const link = document.createElement("a");
    link.href = file.url;
    link.download = file.orig_name || "sd-studio-export.zip";
    document.body.appendChild(link);
    link.click();
    link.remove();
}"""


@dataclass
class Page:
    """The page's components that events read or update (each tab's are in its TaskPanel)."""

    banner: gr.Markdown
    status: gr.Markdown
    cancel: gr.Button
    history: gr.BrowserState
    tabs: gr.Tabs
    panels: dict[str, TaskPanel]
    history_gallery: gr.Gallery
    png_drop: gr.File
    endpoint_panel: gr.Markdown | None = None
    endpoint_timer: gr.Timer | None = None
    history_chains: gr.Markdown | None = None  # the history's chains as a tree
    export_session: gr.Button | None = None
    export_download: gr.DownloadButton | None = None  # the zip an export made, downloaded at once
    zip_drop: gr.File | None = None  # an export dropped here is imported

    @property
    def history_outputs(self) -> list:
        return [self.history, self.history_gallery, *([self.history_chains] if self.history_chains else [])]

    @property
    def restore_outputs(self) -> list:
        return [self.tabs, self.status, *(c for panel in self.panels.values() for c in panel.restore_outputs)]


# --- what the events do --------------------------------------------------------------------------


class Handlers:
    """The event handlers; each returns (or yields) updates keyed by component."""

    def __init__(self, page: Page, client: Callable[[], StudioClient], store: ResultStore, scheduler: FairScheduler,
                 access: Access, quotas: QuotaBook, watch: EndpointWatch | None = None):
        self.page, self.client, self.store, self.scheduler = page, client, store, scheduler
        self.access, self.quotas = access, quotas
        self.watch = watch or EndpointWatch()
        self.warm_ups = WarmUps(self.watch, lambda model: self.client().warm_up(model))
        self._exports: dict[str, Path] = {}  # each designer's latest export: one zip a designer on disk
        self._exports_lock = threading.Lock()

    def admit(self, task: Task, request: gr.Request | None, values: dict, image=None,
              mask=None) -> tuple[str, JobInputs, JobPlan, Job]:
        """(designer, inputs, plan, job) of a job the designer may send: signed in, inputs checked
        (the one check, Task.check), planned, given its place in the scheduler (the designer's jobs
        at once, the studio's) and charged its work (studio.quotas); nothing is sent before. The
        caller runs the job `with job:`; a job a quota refuses gives its place back at once."""
        designer = self.access.designer(request)
        self.store.check_room()  # below the disk watermark, no new job (ResultStore.check_room)
        inputs = task.check(values, image, mask)
        plan = plan_job(inputs)
        job = self.scheduler.job(designer)
        try:
            self.quotas.charge(designer, plan.work)
        except BaseException:
            job.end()
            raise
        return designer, inputs, plan, job

    def reader(self, request: gr.Request | None) -> str:
        """Whose results a request may see: the designer (a gr.Error when nobody signed in)."""
        try:
            return self.access.designer(request)
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from None

    def show_history_entries(self, entries: list[Entry], owner: str) -> dict:
        """The history (a valid one, `owner`'s) as the page shows it: kept in the browser, in the
        gallery with numbered captions naming each result's parent, and as a tree of its chains."""
        page = self.page
        return {page.history: entries, page.history_gallery: history_items(entries, self.store, owner=owner),
                **({page.history_chains: chains_markdown(entries)} if page.history_chains is not None else {})}

    def parent_of(self, task: Task, made_from: Any, image: Image.Image | None, owner: str) -> str | None:
        """The result a job of `task` is made from: `made_from` (the tab's `sent` id, or what Vary
        varied) when `owner` keeps it and, for a tab that takes an image, the job's image is its
        image pixel for pixel (another image put into the tab since is no child of it); else None."""
        if not self.store.keeps(made_from, owner=owner):
            return None
        if not task.takes_image:
            return made_from
        sent = self.store.open(made_from, owner=owner)
        if image is None or sent is None or sent.size != image.size:
            return None
        return made_from if sent.convert("RGB").tobytes() == image.convert("RGB").tobytes() else None

    def show_results(self, panel: TaskPanel, entries: list[Entry], owner: str) -> dict:
        return {panel.gallery: gallery_items(entries, self.store, owner=owner), panel.results: entries,
                **self.show_current(panel, entries[0], owner)}

    def show_current(self, panel: TaskPanel, entry: Entry, owner: str) -> dict:
        """An entry of `owner`'s as the tab's current result: its links are made for `owner` only."""
        seed = effective_seed(entry)
        path = download_path(entry, self.store, owner=owner)  # None for a dropped PNG kept as parameters only
        compare = before_after(entry, self.store, owner=owner) if panel.before_after is not None else None
        return {
            panel.current: entry,
            panel.parameters: entry["parameters"],
            panel.seed_used: "" if seed is None else str(seed),
            panel.download: gr.DownloadButton(value=path, interactive=path is not None),
            **({panel.before_after: compare} if panel.before_after is not None else {}),
        }

    def restore(self, entry: Entry, owner: str) -> dict:
        """The entry's parameters and inputs back into its tab, shown there as the current result."""
        page, panel = self.page, self.page.panels[entry["task"]]
        values = restored_values(panel.task, entry["parameters"])
        updates = {panel.controls[name]: value for name, value in values.items()}
        inputs = restored_inputs(entry, self.store, owner=owner)
        message = f"Restored into {panel.task.title}: seed {effective_seed(entry)}."
        if panel.source is not None and "image" in inputs:
            source = _source_update(panel, inputs["image"], inputs.get("mask"))
            if "mask" in inputs and source[panel.mask_preview] is None:
                message += " Paint the mask again: the editor shows masks only on 512×512 images."
            updates.update(source)
            # The tab holds the entry's input again: made again from it, a result is the entry's sibling.
            updates[panel.sent] = entry.get("parent")
        return {page.tabs: gr.Tabs(selected=panel.task.name), page.status: message, **updates,
                **self.show_results(panel, [entry], owner)}

    def run(self, panel: TaskPanel) -> Callable:
        """A tab's button: the job in the session's turn, its status streamed, its result shown."""
        task, page = panel.task, self.page

        def run(history_entries: list, source: Any = None, request: gr.Request = None, *, made_from: Any = None,
                **values: Any):
            made: dict[int, list[Entry]] = {}  # each image's entries, recorded once, as its call answers
            shown = [0]

            def record(index: int, one: Any) -> None:
                made[index] = record_result(self.store, task, one, owner=designer, parent=parent)

            def present(line: str) -> dict:
                update = {page.status: line}
                if len(made) != shown[0]:  # the images of a split job, shown as their calls answer
                    shown[0] = len(made)
                    update[panel.gallery] = gallery_items(_in_order(made), self.store, owner=designer)
                return update

            problem = None
            try:
                image, mask = _source_images(task, source)
                designer, inputs, plan, job = self.admit(task, request, values, image, mask)
                parent = self.parent_of(task, made_from, inputs.image, designer)
                with job:
                    events = job_events(self.client(), plan, submit=job.submit, cancelled=job.cancelled, tick_s=TICK_S)
                    result = yield from with_status(
                        events, present=present, on_image=record, waiting=job.waiting_line,
                        first_line=plan.summary if plan.is_split else "Starting…",
                    )
                result.raise_for_errors()
            except PartialJobError as error:  # what was made is kept and shown, with what failed
                result, problem = error.result, _designer_message(error)
            except Exception as error:
                message = _designer_message(error)
                yield {page.status: f"**Error:** {message}"}
                raise gr.Error(message, print_exception=False) from None
            entries = _in_order(made)
            images = {name: value for name, value in (("image", inputs.image), ("mask", inputs.mask)) if value is not None}
            input_ids = keep_inputs(self.store, task, images, owner=designer)  # for restoring, once per job
            entries = with_inputs(self.store, entries, input_ids, owner=designer)
            history_entries = add_to_history(valid_history(history_entries, self.store, owner=designer), entries)
            done = (f"{task.title}, {_count(len(entries))} in {result.seconds:.1f} s. "
                    f"{self.quotas.done_line(designer, plan.work)}")
            if problem is not None:
                gr.Warning(problem)
            yield {
                page.status: f"**Partly done:** {done} {problem}" if problem else f"**Done:** {done}",
                **self.show_history_entries(history_entries, designer),
                page.banner: _banner(random_weights(entries)),
                **self.show_results(panel, entries, designer),
            }

        return run

    def vary(self, panel: TaskPanel) -> Callable:
        """Vary: the current result's own values, a new random variation seed at VARY_STRENGTH, and
        the tab's run with them (the controls show what was used)."""
        run = self.run(panel)

        def vary(history_entries: list, entry: Entry | None, request: gr.Request = None, **values: Any):
            if not entry:
                raise gr.Error("Nothing to vary yet: make or pick a result first.", print_exception=False)
            varied = vary_values(panel.task, entry["parameters"], random_seed)
            yield {panel.controls[name]: value for name, value in varied.items()}
            # A variation is made from the result it varies (an image tab's would be checked against its input).
            yield from run(history_entries, request=request, made_from=entry.get("id"), **{**values, **varied})

        return vary

    def preview_edit(self, panel: TaskPanel) -> Callable:
        """An edit tab's preview of what will be sent, as its image (and mask) or settings change."""
        task = panel.task

        def preview(source: Any, *settings: Any):
            image, mask = _source_images(task, source)
            return task.preview(dict(zip(task.setting_names, settings)), image, mask)

        return preview

    def api(self, task: Task) -> Callable:
        """A task's named API endpoint: the same job, without the page."""

        def call(image=None, mask=None, request: gr.Request = None, **values: Any) -> tuple[list, dict]:
            try:
                designer, _, plan, job = self.admit(task, request, values, image, mask)
                with job:
                    result = run_job(self.client(), plan, submit=job.submit, cancelled=job.cancelled)
                result.raise_for_errors()
            except Exception as error:
                raise gr.Error(_designer_message(error), print_exception=False) from None
            entries = record_result(self.store, task, result, owner=designer)
            return gallery_items(entries, self.store, owner=designer), result.parameters

        return call

    def send_to(self, target: TaskPanel) -> Callable:
        def send(entry: Entry | None, request: gr.Request = None) -> dict:
            image = result_image(entry, self.store, owner=self.reader(request))
            if image is None:
                gr.Warning("Nothing to send yet: make or pick a result first.")
                return {}
            # The target's model loads while the designer paints the mask or writes the prompt.
            loading = self.warm_ups.request(target.task.model)
            return {
                self.page.tabs: gr.Tabs(selected=target.task.name),
                self.page.status: f"Sent to {target.task.title}. {loading}",
                target.controls["prompt"]: entry["parameters"].get("prompt", ""),
                **_source_update(target, image),
                target.sent: entry["id"],  # what the tab makes from this image is this result's child
            }

        return send

    def pick_result(self, panel: TaskPanel) -> Callable:
        def pick(results: list[Entry], selected: gr.SelectData, request: gr.Request = None) -> dict:
            return self.show_current(panel, results[selected.index], self.reader(request))

        return pick

    def pick_from_history(self, history_entries: list, selected: gr.SelectData, request: gr.Request = None) -> dict:
        owner = self.reader(request)
        entries = valid_history(history_entries, self.store, owner=owner)
        return self.restore(entries[selected.index], owner) if selected.index < len(entries) else {}

    def open_png(self, png: bytes | None, request: gr.Request = None) -> dict:
        """A dropped PNG's parameters (and, within the tabs' limits, its image) back in its tab;
        the upload itself is never kept."""
        try:
            owner = self.access.designer(request)
            entry = restore_from_png(self.store, png or b"", owner=owner)
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return self.restore(entry, owner)

    def warm_up(self, task: str, request: gr.Request = None) -> str:
        """Load a tab's model on the endpoint now, in the background (what "Send to" does).

        task: the tab whose model to load: restyle, erase or upscale (generate too).
        Returns what the studio did: loading it, or why not (loaded already, being loaded).
        Not counted against the designer's quotas: the call is the smallest the model takes.
        """
        self.access.designer(request)  # signed in, where the studio signs in
        if task not in TASKS:
            raise gr.Error(f"No tab {task!r}; the tabs are {', '.join(TASKS)}.", print_exception=False)
        return self.warm_ups.request(TASKS[task].model)

    def endpoint_status(self) -> list[dict]:
        """Each model as the endpoint panel shows it: state (warm, loading or cold), the wait a
        cold start costs (s), seconds per image warm, and the estimated cost per image (USD)."""
        return [dataclasses.asdict(view) for view in self.watch.views()]

    def endpoint_panel(self) -> str:
        return describe_endpoint(self.watch)

    def api_restore(self, png: bytes | None, request: gr.Request = None) -> tuple[str, dict]:
        """The named API's way back to an earlier result: a PNG the studio made -> (its tab, the
        values that make it again), what picking it in the history puts back into the tab."""
        try:
            entry = restore_from_png(self.store, png or b"", owner=self.access.designer(request))
        except StudioError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return entry["task"], restored_values(TASKS[entry["task"]], entry["parameters"])

    def show_history(self, history_entries: Any, request: gr.Request = None) -> dict:
        """The page's history on load: the entries signed for this designer; nothing shown (and the
        browser's copy left as it is) before anyone signed in."""
        try:
            owner = self.access.designer(request)
        except StudioError:
            return {self.page.history: gr.skip(), self.page.history_gallery: [], self.page.banner: gr.skip(),
                    **({self.page.history_chains: ""} if self.page.history_chains is not None else {})}
        entries = valid_history(history_entries, self.store, owner=owner)
        return {
            **self.show_history_entries(entries, owner),
            self.page.banner: _banner(random_weights(entries)),
        }

    # --- export and import (studio/exchange.py) ---------------------------------------------------

    def export_session(self, history_entries: Any, request: gr.Request = None) -> gr.DownloadButton:
        """The session history (its results still kept) as a zip, in the page's download button."""
        owner = self.reader(request)
        entries = valid_history(history_entries, self.store, owner=owner)
        if not entries:
            raise gr.Error("Nothing to export yet: the session history is empty.", print_exception=False)
        return self._export(entries, owner, "session")

    def export_chain(self, history_entries: Any, entry: Entry | None, request: gr.Request = None) -> gr.DownloadButton:
        """The current result's chain as a zip: its ancestors in the history, in lineage order, and itself."""
        owner = self.reader(request)
        [current] = valid_history([entry], self.store, owner=owner) or [None]
        if current is None:
            raise gr.Error("Nothing to export yet: make or pick a result first.", print_exception=False)
        chain = lineage(valid_history(history_entries, self.store, owner=owner), current["id"]) or [current]
        return self._export(chain, owner, "chain")

    def _export(self, entries: list[Entry], owner: str, what: str) -> gr.DownloadButton:
        try:
            self.quotas.charge(owner, EXCHANGE_WORK)
            data = export_zip(entries, functools.partial(self._png_bytes, owner=owner))
        except StudioError as error:  # a quota, or ExchangeError: more than an import takes
            raise gr.Error(str(error), print_exception=False) from None
        if len(data) > IMPORT_LIMITS.zip_bytes:
            gr.Warning(f"This export is {len(data):,} bytes; the page imports at most {IMPORT_LIMITS.zip_bytes:,} "
                       "(python -m studio.replay reads it whole). Export a chain for less.")
        path = self._served_zip(data, EXPORT_FILE[what], owner)
        return gr.DownloadButton(value=str(path), interactive=True)

    def _png_bytes(self, result_id: str, *, owner: str) -> bytes | None:
        """A PNG of `owner`'s as kept, for an export; None when the store no longer keeps it for them."""
        path = self.store.path(result_id, owner=owner)
        try:
            return path.read_bytes() if path is not None else None
        except OSError:  # let go meanwhile
            return None

    def _served_zip(self, data: bytes, name: str, owner: str) -> Path:
        """`data` written where the store's links are served, named as they are (ResultStore.link:
        <content id>/<owner's token>/<name>), so the gate serves it to `owner` only. Each designer's
        previous export is removed: one zip a designer on disk (and Gradio's cache cleaning)."""
        zip_id = hashlib.sha256(data).hexdigest()[:32]
        folder = self.store.links_dir / zip_id / signing.link_token(self.store.key, owner_key(owner), zip_id)
        path = folder / name
        with self._exports_lock:
            previous = self._exports.get(owner)
            if previous is not None and previous != path:
                _remove_export(previous)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, mode=0o600) as staging:
                staging.write_bytes(data)
            self._exports[owner] = path
        return path

    def import_zip(self, history_entries: Any, zip_path: str | None, request: gr.Request = None) -> dict:
        """A dropped export: its results kept as the designer's, added to their history (newest
        last in the zip, first in the history) with the chains as they were."""
        owner = self.reader(request)
        imported = self._import(zip_path, owner)
        entries = add_to_history(valid_history(history_entries, self.store, owner=owner), imported)
        return {
            self.page.status: f"Imported {len(imported)} result{'s' if len(imported) != 1 else ''} into the session "
                              "history.",
            self.page.zip_drop: None,
            self.page.banner: _banner(random_weights(imported)),
            **self.show_history_entries(entries, owner),
        }

    def api_import(self, session_zip: str | None, request: gr.Request = None) -> tuple[list, list[Entry]]:
        """The named API's import: an export of the studio (a session or chain zip) -> its results,
        kept as the caller's (gallery items: image, caption), and their history entries, newest
        first, each with its "parent" (the id of the result it was made from, or null), signed for
        the caller. Refused, naming the limit, when the zip is not one the studio takes."""
        owner = self.reader(request)
        entries = self._import(session_zip, owner)
        return history_items(entries, self.store, owner=owner), entries

    def _import(self, zip_path: str | None, owner: str) -> list[Entry]:
        """The entries of an export, its images saved as `owner`'s and the entries signed for them."""
        if not zip_path:
            raise gr.Error("Drop a session or chain export of the studio (.zip) to import it.", print_exception=False)
        try:
            self.store.check_room()
            self.quotas.charge(owner, EXCHANGE_WORK)
            chain = read_zip(zip_path, IMPORT_LIMITS)
            imported = import_entries(chain, lambda png, name: self.store.save(png, name, owner=owner))
        except StudioError as error:  # ExchangeError among them: the reader's refusal, naming its limit
            raise gr.Error(str(error), print_exception=False) from None
        except OSError:
            raise gr.Error("That upload could not be read; drop it again.", print_exception=False) from None
        return [signed_entry(self.store, entry, owner=owner) for entry in imported]


def _remove_export(path: Path) -> None:
    """An earlier export and its two folders (as `_served_zip` made them)."""
    path.unlink(missing_ok=True)
    for folder in (path.parent, path.parent.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty (another designer's export of the same zip) or gone
            break


# --- the page --------------------------------------------------------------------------------------


def layout(*, random_weights: str | None, history_secret: str | None, assets_dir: Path, access: Access) -> Page:
    """The components, in the current gr.Blocks: banner, status and Cancel, the tabs, the history."""
    examples = json.loads((assets_dir / "prompts.json").read_text())
    if access.mode == "huggingface":
        gr.LoginButton()
    banner = gr.Markdown(
        banner_text(random_weights or TINY_KIND) + (TINY_WEIGHTS_START_NOTE if random_weights == TINY_KIND else ""),
        visible=random_weights is not None, elem_id="tiny-weights-banner",
    )
    gr.Markdown("# SD Studio\nGenerate an image, then send it on to restyle it, erase part of it or upscale it.")
    with gr.Row(equal_height=True):
        status = gr.Markdown("Ready.", elem_id="status")
        cancel = gr.Button("Cancel", variant="stop", size="sm", scale=0, elem_id="cancel")
    history = gr.BrowserState([], storage_key=HISTORY_STORAGE_KEY, secret=history_secret)

    panels: dict[str, TaskPanel] = {}
    with gr.Tabs(selected="generate") as tabs:
        for task in TASKS.values():
            with gr.Tab(task.title, id=task.name, elem_id=f"tab-{task.name}"):
                panels[task.name] = panel = task_panel(task, TINY_WEIGHTS_START if random_weights == TINY_KIND else None)
                _examples(panel, examples.get(task.name, []), assets_dir)

    gr.Markdown("## Session history")
    history_gallery = gr.Gallery(
        label="Every result of this session, newest first, numbered from the oldest, each saying what it was made "
              "from: pick one to restore it in its tab",
        columns=8, fit_columns=False, height=240, allow_preview=False, interactive=False, elem_id="history",
    )
    history_chains = gr.Markdown("", elem_id="history-chains")
    with gr.Row(equal_height=True):
        export_session = gr.Button("Export the session (zip)", size="sm", scale=0, elem_id="export-session")
        export_download = gr.DownloadButton("Download the export again", interactive=False, size="sm", scale=0,
                                            elem_id="export-download")
    with gr.Row(equal_height=True):
        png_drop = gr.File(
            label="Drop a PNG made by the studio here to restore its parameters",
            file_types=[".png"], type="binary", height=120, elem_id="png-drop",
        )
        zip_drop = gr.File(
            label="Drop a session or chain export (.zip) here to import it into your history",
            file_types=[".zip"], type="filepath", height=120, elem_id="zip-drop",
        )
    with gr.Accordion("Endpoint", open=True, elem_id="endpoint-accordion"):
        endpoint_panel = gr.Markdown("Asking the endpoint…", elem_id="endpoint-panel")
    endpoint_timer = gr.Timer(ENDPOINT_PANEL_REFRESH_S)
    return Page(banner, status, cancel, history, tabs, panels, history_gallery, png_drop, endpoint_panel, endpoint_timer,
                history_chains=history_chains, export_session=export_session, export_download=export_download,
                zip_drop=zip_drop)


# --- the wiring ------------------------------------------------------------------------------------

UI_ONLY = {"api_visibility": "private"}
# Gradio may start every run event at once: the scheduler, not Gradio's queue, decides which
# calls reach the endpoint (and says when the studio is full).
SCHEDULED = {"concurrency_limit": None}
# Exports and imports read or write up to a whole zip in memory and decode its PNGs (CPU-bound):
# one at a time, for the page and the API together.
EXCHANGE = {"concurrency_limit": 1, "concurrency_id": "exchange"}


def wire(demo: gr.Blocks, page: Page, handlers: Handlers) -> None:
    """Every event of the page and the named API endpoints, tab by tab, then the page-wide ones."""
    run_events, send_events = [], []
    for panel in page.panels.values():
        task = panel.task
        run_events.append(panel.run.click(
            handlers.run(panel),
            inputs=[page.history, *([panel.source] if panel.source else [])],
            inputs_kwargs={**panel.controls, **({"made_from": panel.sent} if panel.sent is not None else {})},
            outputs=[page.status, *page.history_outputs, page.banner, *panel.result_outputs],
            show_progress="minimal",
            show_progress_on=[page.status, panel.gallery],  # not on every output: an error would be flagged on each
            **SCHEDULED, **UI_ONLY,
        ))
        gr.on(
            triggers=[],  # an API endpoint only: the tab's button above is the UI's way in
            fn=handlers.api(task),
            inputs_kwargs={**panel.api_images, **panel.controls},
            outputs=[panel.gallery, panel.parameters],
            api_name=task.name,
            api_description=_api_description(task),
            **SCHEDULED,
        )
        panel.gallery.select(handlers.pick_result(panel), inputs=panel.results, outputs=panel.current_outputs,
                             **UI_ONLY)
        if panel.vary is not None:
            run_events.append(panel.vary.click(
                handlers.vary(panel), inputs=[page.history, panel.current], inputs_kwargs=panel.controls,
                outputs=[page.status, *page.history_outputs, page.banner, *panel.result_outputs,
                         *panel.controls.values()],
                show_progress="minimal", show_progress_on=[page.status, panel.gallery], **SCHEDULED, **UI_ONLY,
            ))
        if panel.edit_preview is not None:
            gr.on(
                triggers=[panel.source.change, *(control.change for control in panel.setting_controls)],
                fn=handlers.preview_edit(panel), inputs=[panel.source, *panel.setting_controls],
                outputs=panel.edit_preview, show_progress="hidden", **UI_ONLY,
            )
        panel.reuse_seed.click(
            lambda seed: int(seed) if seed and seed.isdigit() else gr.skip(),
            inputs=panel.seed_used, outputs=panel.controls["seed"], **UI_ONLY,
        )
        for target_name, button in panel.send.items():
            target = page.panels[target_name]
            send_events.append(button.click(
                handlers.send_to(target), inputs=panel.current,
                outputs=[page.tabs, page.status, target.controls["prompt"], *target.source_outputs, target.sent],
                **UI_ONLY,
            ))
        if panel.sent is not None and panel.mask_preview is None:
            # Another image put into the tab: what it makes is no child of the one sent. (Gradio's image
            # editor says "upload" for an image the server puts there too: Erase relies on `parent_of`.)
            gr.on(triggers=[panel.source.upload, panel.source.clear], fn=lambda: None, outputs=panel.sent,
                  show_progress="hidden", queue=False, **UI_ONLY)
        panel.export_chain.click(
            handlers.export_chain, inputs=[page.history, panel.current], outputs=page.export_download,
            **EXCHANGE, **UI_ONLY,
        ).success(None, inputs=page.export_download, js=DOWNLOAD_EXPORT, **UI_ONLY)

    erase = next(panel for panel in page.panels.values() if panel.mask_preview is not None)
    erase.source.change(
        lambda value: mask_from_editor(value)[1],
        inputs=erase.source, outputs=erase.mask_preview, show_progress="hidden", **UI_ONLY,
    )
    erase.brush_size.change(
        lambda size: gr.ImageEditor(brush=brush(size), eraser=gr.Eraser(default_size=int(size))),
        inputs=erase.brush_size, outputs=erase.source, show_progress="hidden", **UI_ONLY,
    )
    page.cancel.click(
        lambda: "Cancelled: calls not yet sent are dropped; one already on the endpoint finishes there "
                "(within its time limit) and its result is dropped.",
        outputs=page.status, cancels=run_events, **UI_ONLY,
    )
    page.history_gallery.select(handlers.pick_from_history, inputs=page.history, outputs=page.restore_outputs,
                                **UI_ONLY)
    page.png_drop.upload(handlers.open_png, inputs=page.png_drop, outputs=page.restore_outputs, **UI_ONLY)
    wire_exchange(page, handlers)
    wire_endpoint_panel(demo, page, handlers, run_events + send_events)

    restored_task = gr.Textbox(label="task", visible=False)  # the API's answer only
    restored_controls = gr.JSON(label="values", visible=False)
    gr.on(
        triggers=[],  # an API endpoint only: the page restores by the history and the PNG drop above
        fn=handlers.api_restore, inputs=page.png_drop, outputs=[restored_task, restored_controls],
        api_name="restore",
        api_description="A PNG made by the studio (a result's download) -> the tab it came from and the values "
                        "of that tab's controls that make it again, as picking it in the session history does.",
    )
    demo.load(handlers.show_history, inputs=page.history, outputs=[*page.history_outputs, page.banner], **UI_ONLY)


def wire_exchange(page: Page, handlers: Handlers) -> None:
    """Export (the session here, a chain in each tab: `wire`) and import: the zip dropped on the
    page, and the named API `/import`."""
    page.export_session.click(
        handlers.export_session, inputs=page.history, outputs=page.export_download, **EXCHANGE, **UI_ONLY,
    ).success(None, inputs=page.export_download, js=DOWNLOAD_EXPORT, **UI_ONLY)
    page.zip_drop.upload(
        handlers.import_zip, inputs=[page.history, page.zip_drop],
        outputs=[page.status, page.zip_drop, page.banner, *page.history_outputs], **EXCHANGE, **UI_ONLY,
    )
    imported_results = gr.Gallery(label="results", visible=False)  # the API's answer only
    imported_entries = gr.JSON(label="entries", visible=False)
    gr.on(
        triggers=[],  # an API endpoint only: the page imports by the drop above
        fn=handlers.api_import, inputs=page.zip_drop, outputs=[imported_results, imported_entries],
        api_name="import",
        api_description="A session or chain export of the studio (.zip, as the page's Export downloads) -> its "
                        "results, kept as the caller's (image and caption: '#2 Erase · seed 5 · from #1'), and their "
                        "history entries, newest first, each naming its parent (the id of the result it was made "
                        "from, or null). Refused, naming the limit, when the zip is not an export the studio takes.",
        **EXCHANGE,
    )


def wire_endpoint_panel(demo: gr.Blocks, page: Page, handlers: Handlers, events: list) -> None:
    """The endpoint panel: on load, every few seconds, and after each job and Send to; and its
    named API endpoints (`/warm_up`, `/endpoint_status`)."""
    quiet = {"outputs": page.endpoint_panel, "show_progress": "hidden", "queue": False, **UI_ONLY}
    demo.load(handlers.endpoint_panel, **quiet)
    page.endpoint_timer.tick(handlers.endpoint_panel, **quiet)
    for event in events:
        event.then(handlers.endpoint_panel, **quiet)
    # Quick and never sent through the scheduler: the warm-up itself runs in the background.
    gr.api(handlers.warm_up, api_name="warm_up", queue=False)
    gr.api(handlers.endpoint_status, api_name="endpoint_status", queue=False)


# Gradio's cache (uploads, its copies of what the page shows, the store's links to results) is
# cleaned every CACHE_CLEAN_EVERY_S of the files older than CACHE_MAX_AGE_S: a working day's
# page keeps its images, and what a stranger uploads is gone within hours. A page open longer
# shows its links again when a result is picked or the page is reloaded.
CACHE_CLEAN_EVERY_S = 15 * 60
CACHE_MAX_AGE_S = 6 * 60 * 60
SERVED_LINKS_FOLDER = "sd-studio-results"  # in Gradio's cache: the store's links (ResultStore.link)


def build_app(
    client_factory: Callable[[], StudioClient],
    *,
    store: ResultStore,
    random_weights: str | None = None,
    history_secret: str | None = None,
    assets_dir: Path = ASSETS_DIR,
    endpoint_concurrency: int = ENDPOINT_CONCURRENCY,
    access: Access = LOCAL_ACCESS,
    quotas: Quotas = Quotas(),
    watch: EndpointWatch | None = None,
) -> gr.Blocks:
    """The studio as a gr.Blocks; `client_factory` is called once, on the first request.

    Sign-in by password is Gradio's (`launch(auth=access.users.check)`, see __main__); every
    handler asks `access` whom a request is from, and refuses it when nobody signed in.
    """
    # The samples are served from where they are. The results folder is never served: the page
    # gets its owner's links to results, made in Gradio's cache (one folder per results folder).
    gr.set_static_paths([assets_dir])
    store.serve_links_in(Path(gr.utils.get_upload_folder()) / SERVED_LINKS_FOLDER / owner_key(str(store.root)))
    with gr.Blocks(title="SD Studio", analytics_enabled=False,
                   delete_cache=(CACHE_CLEAN_EVERY_S, CACHE_MAX_AGE_S)) as demo:
        page = layout(random_weights=random_weights, history_secret=history_secret, assets_dir=assets_dir,
                      access=access)
        watch = watch or EndpointWatch()
        handlers = Handlers(page, functools.cache(lambda: _watched(client_factory(), watch)), store,
                            FairScheduler(endpoint_concurrency, jobs_per_session=quotas.jobs_at_once), access,
                            QuotaBook(quotas), watch)
        wire(demo, page, handlers)
    return demo


def _watched(client: StudioClient, watch: EndpointWatch) -> StudioClient:
    client.watch = watch  # every call it makes feeds the endpoint panel
    return client


def _in_order(made: dict[int, list[Entry]]) -> list[Entry]:
    """A job's entries in the order of its images (seed order), however their calls answered."""
    return [entry for index in sorted(made) for entry in made[index]]


def _banner(kind: str | None) -> Any:
    """The banner's update after results arrive: shown, saying what they were made with."""
    return gr.Markdown(banner_text(kind), visible=True) if kind else gr.skip()


def _count(images: int) -> str:
    return "1 image" if images == 1 else f"{images} images"


def _source_images(task: Task, source: Any):
    """(image, mask) from a tab's input component value: the editor gives both."""
    if task.takes_mask:
        return mask_from_editor(source)
    return source, None


def _source_update(panel: TaskPanel, image: Image.Image, mask: Image.Image | None = None) -> dict:
    """Put an image (and for Erase its mask, painted on, where the editor can show it) into a tab's input."""
    if panel.mask_preview is None:
        return {panel.source: image}
    if image.size != EDITOR_CANVAS_SIZE:
        mask = None  # it would show up shifted (see EDITOR_CANVAS_SIZE); the designer paints it again
    return {panel.source: editor_value(image, mask), panel.mask_preview: mask}


def _examples(panel: TaskPanel, prompts: list[dict], assets_dir: Path) -> None:
    """The tab's examples: prompts from assets/prompts.json, on the sample image (and mask)."""
    if not prompts:
        return
    text = [panel.controls["prompt"], panel.controls["negative_prompt"]]
    rows = [[prompt["prompt"], prompt.get("negative_prompt", "")] for prompt in prompts]
    if panel.source is None:
        gr.Examples(rows, inputs=text, label="Example prompts", cache_examples=False)
        return
    sample: Any = str(assets_dir / "sample.png")
    if panel.mask_preview is not None:
        sample = editor_value(Image.open(sample).convert("RGB"), Image.open(assets_dir / "sample_mask.png"))
    gr.Examples([[sample, *row] for row in rows], inputs=[panel.source, *text], label="Examples", cache_examples=False)


def _api_description(task: Task) -> str:
    images = ""
    if task.takes_mask:
        images = " `image` is the picture; `mask` is white where to replace, black where to keep, same size."
    elif task.takes_image:
        images = f" `image` is at most {task.max_image_side} px a side."
    return (
        f"{task.summary}{images} Returns the images (PNG, with the generation parameters in a text chunk) "
        "and the parameters the endpoint used, the effective seed included; seed -1 picks a random one."
    )


def _designer_message(error: Exception) -> str:
    """A short message for the designer: the client layer's own, or a generic one (logged in full)."""
    if isinstance(error, StudioError):
        return str(error)
    log.error("studio request failed", exc_info=error)
    return GENERIC_ERROR
