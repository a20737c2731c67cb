"""A batch of requests in, one answer (or one error) per request out.

Triton's dynamic batcher hands `execute` several requests at once. Here they are
validated one by one, every image they ask for becomes a row, rows that can share a
pipeline call are grouped (same size and pipeline arguments; per-row prompts,
negative prompts and seeds), each group runs as one call, and the images are split
back per request. A bad request, or a failed call, only fails the requests in it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from PIL import Image

from .budget import CallOverBudget, ModelBusy, megapixels
from .catalog import GENERATED_IMAGE, INPUT_NAMES, MAX_IMAGES_PER_CALL, MAX_PAYLOAD_BYTES, PARAMETERS
from .errors import RequestError
from .images import encode_within
from .params import image_seeds, random_seed
from .pipelines import CallStopped, ImageRow, LoadedPipeline, run_call, scheduler_class_name
from .request import GenerationRequest, parse_request

log = logging.getLogger(__name__)

# Triton's KServe JSON around the output tensors (names, shapes, datatypes), with room to spare.
ANSWER_FRAMING_BYTES = 1024


@dataclass
class Answer:
    """What one request gets back: per row, its images and its parameters."""

    images: list[list[bytes]]  # base64 PNGs, [rows][num_images_per_prompt]
    parameters: list[bytes]  # JSON, one per row

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {
            GENERATED_IMAGE: np.array(self.images, dtype=np.object_),
            PARAMETERS: np.array(self.parameters, dtype=np.object_).reshape(-1, 1),
        }


def split_rows(inputs: Mapping[str, np.ndarray | None]) -> list[dict[str, bytes | None]]:
    """Per-row raw values from the BYTES input tensors of one request ([rows, 1] each)."""
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise RequestError(unknown[0], f"is not an input of this model (inputs: {', '.join(INPUT_NAMES)})")
    present = {name: array for name, array in inputs.items() if array is not None}
    if "prompt" not in present:
        raise RequestError("prompt", "is required")
    rows = len(present["prompt"])
    for name, array in present.items():
        if array.ndim != 2 or array.shape != (rows, 1):
            raise RequestError(
                name, f"must have shape [{rows}, 1] (one value per row), got {list(array.shape)}"
            )
    return [
        {name: _as_bytes(present[name][row, 0]) if name in present else None for name in INPUT_NAMES}
        for row in range(rows)
    ]


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def serve_batch(
    loaded: LoadedPipeline,
    batch: list[Mapping[str, np.ndarray | None]],
    max_images_per_call: int = MAX_IMAGES_PER_CALL,
    max_answer_bytes: int = MAX_PAYLOAD_BYTES,
) -> list[Answer | Exception]:
    """Answer every request of a batch; a failing one gets its exception instead.

    The batch shares one invocation's time: calls predicted not to fit in what is left of the
    model's budget are refused, and a call still running at the deadline is stopped.
    """
    deadline = time.monotonic() + loaded.budget.seconds
    outcomes: list[list[GenerationRequest] | Exception] = []
    for inputs in batch:
        try:
            requests = [parse_request(loaded.model, row) for row in split_rows(inputs)]
            refusal = loaded.budget.refusal(loaded.model, requests[0].args, sum(
                megapixels(request.size, request.args["num_images_per_prompt"]) for request in requests
            ))
            outcomes.append(refusal or requests)
        except RequestError as error:
            outcomes.append(error)

    # Every image to make, tagged with (request index, row index), seeds resolved now
    # so the answer can say which seed (and variation seed) each image used.
    rows_by_key: dict[tuple, list[tuple[int, int, ImageRow]]] = defaultdict(list)
    seeds: dict[tuple[int, int], list[dict[str, int]]] = {}
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            continue
        for row_index, request in enumerate(outcome):
            row_seeds = image_seeds(request.args, random_seed)
            seeds[index, row_index] = row_seeds
            for image in row_seeds:
                rows_by_key[request.batch_key()].append(
                    (index, row_index, ImageRow(request, image["seed"], image.get("variation_seed"))))

    images: dict[tuple[int, int], list] = defaultdict(list)
    for tagged in rows_by_key.values():
        # Rows of one key share their size and arguments: each call takes as many as fit in what
        # is left of the invocation's time (one, while the model's speed is still unknown).
        pending = list(tagged)
        while pending:
            # A request that failed in an earlier call of this batch is not run further.
            pending = [tag for tag in pending if not isinstance(outcomes[tag[0]], Exception)]
            if not pending:
                break
            request = pending[0][2].request
            count = loaded.budget.rows_that_fit(
                megapixels(request.size), request.steps, deadline - time.monotonic(),
                min(max_images_per_call, len(pending)),
            )
            if count == 0:
                _fail(outcomes, pending, ModelBusy(loaded.model, loaded.budget.seconds))
                break
            chunk, pending = pending[:count], pending[count:]
            rows = [row for _, _, row in chunk]
            try:
                generated = run_call(loaded, rows, deadline=deadline)
            except CallStopped as stopped:
                _fail(outcomes, chunk, CallOverBudget("gen_args", (
                    f"{loaded.model} stopped at step {stopped.steps_done} of {stopped.steps_total}: the call "
                    f"would run past {loaded.budget.words()}; lower "
                    f"{request.spec.what_to_lower(request.args)}")))
                continue
            except Exception as error:  # the call's requests fail; the rest of the batch goes on
                log.exception("pipeline call failed for %d image(s)", len(chunk))
                # The caller hears what kind of failure it was; its text (paths, devices) stays in the log.
                _fail(outcomes, chunk, RuntimeError(
                    f"{loaded.model} failed to generate ({type(error).__name__}); the model server's log has "
                    "the details"))
                continue
            for (index, row_index, _), image in zip(chunk, generated):
                images[index, row_index].append(image)

    answers: list[Answer | Exception] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            answers.append(outcome)
            continue
        try:
            answers.append(_answer(loaded, outcome, [seeds[index, row] for row in range(len(outcome))],
                                   [images[index, row] for row in range(len(outcome))], max_answer_bytes))
        except RequestError as error:
            answers.append(error)
    return answers


def _fail(outcomes: list, chunk: list, error: Exception) -> None:
    for index, _, _ in chunk:
        outcomes[index] = error


def _answer(
    loaded: LoadedPipeline,
    requests: list[GenerationRequest],
    seeds: list[list[dict[str, int]]],
    made: list[list[Image.Image]],
    max_answer_bytes: int,
) -> Answer:
    """One request's answer, its images encoded so that the whole answer fits `max_answer_bytes`."""
    parameters = [
        effective_parameters(loaded, request, row_seeds, row_images[0].size)
        for request, row_seeds, row_images in zip(requests, seeds, made)
    ]
    # Each image's own PNG chunk: its row's parameters with that image's seeds.
    texts = [[json.dumps({**row, **image}) for image in row_seeds] for row, row_seeds in zip(parameters, seeds)]
    # What the answer carries besides the images: the parameters, and JSON framing per tensor.
    overhead = sum(len(json.dumps(row)) + 64 for row in parameters) + ANSWER_FRAMING_BYTES
    encoded, encoding = encode_within(made, texts, max_answer_bytes - overhead)
    return Answer(
        images=encoded,
        parameters=[json.dumps({**row, "encoding": encoding}).encode("utf-8") for row in parameters],
    )


def effective_parameters(
    loaded: LoadedPipeline, request: GenerationRequest, seeds: list[dict[str, int]], size: tuple[int, int]
) -> dict[str, Any]:
    """Everything needed to make the same image again; `seeds` are each image's (params.image_seeds)."""
    parameters = {
        "model": loaded.model,
        "weights": loaded.weights_kind,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        **request.args,
        **seeds[0],
        "seeds": [image["seed"] for image in seeds],
        **({"variation_seeds": [image["variation_seed"] for image in seeds]} if "variation_seed" in seeds[0] else {}),
        "scheduler_class": scheduler_class_name(request.args["scheduler"], loaded.default_scheduler),
        "width": size[0],
        "height": size[1],
    }
    for field in ("prompt", "negative_prompt"):
        tokens = len(loaded.pipe.tokenizer(getattr(request, field)).input_ids)
        parameters[f"{field}_truncated"] = tokens > loaded.max_prompt_tokens
    return parameters
