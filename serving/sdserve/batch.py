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
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .catalog import INPUT_NAMES, MAX_IMAGES_PER_CALL
from .errors import RequestError
from .images import encode_png
from .params import RANDOM_SEED, SEED_MAX
from .pipelines import ImageRow, LoadedPipeline, run_call, scheduler_class_name
from .request import GenerationRequest, parse_request

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """What one request gets back: per row, its images and its parameters."""

    images: list[list[bytes]]  # base64 PNGs, [rows][num_images_per_prompt]
    parameters: list[bytes]  # JSON, one per row

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {
            "generated_image": np.array(self.images, dtype=np.object_),
            "parameters": np.array(self.parameters, dtype=np.object_).reshape(-1, 1),
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
) -> list[Answer | Exception]:
    """Answer every request of a batch; a failing one gets its exception instead."""
    outcomes: list[list[GenerationRequest] | Exception] = []
    for inputs in batch:
        try:
            outcomes.append([parse_request(loaded.model, row) for row in split_rows(inputs)])
        except RequestError as error:
            outcomes.append(error)

    # Every image to make, tagged with (request index, row index), seeds resolved now
    # so the answer can say which seed each image used.
    rows_by_key: dict[tuple, list[tuple[int, int, ImageRow]]] = defaultdict(list)
    seeds: dict[tuple[int, int], list[int]] = {}
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            continue
        for row_index, request in enumerate(outcome):
            first_seed = _resolve_seed(request.args["seed"])
            row_seeds = [(first_seed + k) % (SEED_MAX + 1) for k in range(request.args["num_images_per_prompt"])]
            seeds[index, row_index] = row_seeds
            for seed in row_seeds:
                rows_by_key[request.batch_key()].append((index, row_index, ImageRow(request, seed)))

    images: dict[tuple[int, int], list] = defaultdict(list)
    for tagged in rows_by_key.values():
        for start in range(0, len(tagged), max_images_per_call):
            # A request that failed in an earlier call of this batch is not run further.
            chunk = [
                tag
                for tag in tagged[start : start + max_images_per_call]
                if not isinstance(outcomes[tag[0]], Exception)
            ]
            if not chunk:
                continue
            try:
                generated = run_call(loaded, [row for _, _, row in chunk])
            except Exception as error:  # the call's requests fail; the rest of the batch goes on
                log.exception("pipeline call failed for %d image(s)", len(chunk))
                for index, _, _ in chunk:
                    outcomes[index] = RuntimeError(f"{loaded.model} failed to generate: {error}")
                continue
            for (index, row_index, _), image in zip(chunk, generated):
                images[index, row_index].append(image)

    answers: list[Answer | Exception] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            answers.append(outcome)
            continue
        answer = Answer(images=[], parameters=[])
        for row_index, request in enumerate(outcome):
            row_seeds = seeds[index, row_index]
            made = images[index, row_index]
            parameters = effective_parameters(loaded, request, row_seeds, made[0].size)
            answer.parameters.append(json.dumps(parameters).encode("utf-8"))
            answer.images.append(
                [
                    encode_png(image, {"parameters": json.dumps({**parameters, "seed": seed})})
                    for image, seed in zip(made, row_seeds)
                ]
            )
        answers.append(answer)
    return answers


def _resolve_seed(seed: int) -> int:
    return secrets.randbelow(SEED_MAX + 1) if seed == RANDOM_SEED else seed


def effective_parameters(
    loaded: LoadedPipeline, request: GenerationRequest, seeds: list[int], size: tuple[int, int]
) -> dict[str, Any]:
    """Everything needed to make the same image again."""
    parameters = {
        "model": loaded.model,
        "weights": loaded.weights_kind,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        **request.args,
        "seed": seeds[0],
        "seeds": seeds,
        "scheduler_class": scheduler_class_name(request.args["scheduler"], loaded.default_scheduler),
        "width": size[0],
        "height": size[1],
    }
    for field in ("prompt", "negative_prompt"):
        tokens = len(loaded.pipe.tokenizer(getattr(request, field)).input_ids)
        parameters[f"{field}_truncated"] = tokens > loaded.max_prompt_tokens
    return parameters
