"""Generation arguments as data: each key a request may put in `gen_args`, declared once.

An `Argument` carries its type, range, default, and the label and help text the studio shows;
the server validates `gen_args` with it, the studio builds its controls from it and the client
checks its keywords against it. Which model takes which arguments is in `catalog.MODELS`.

Standard library only: the studio imports this without torch.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RequestError

MAX_GEN_ARGS_BYTES = 4096
SEED_MAX = 2**32 - 1
RANDOM_SEED = -1

# Names a request may use for `scheduler`, and the diffusers class (with config
# overrides) behind each. "default" keeps the checkpoint's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "default": None,
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}

WIDGETS = ("slider", "number", "dropdown", "checkbox")
# A number written as text, in JSON's number syntax ("20", "0.3", "1e3"): read as that number.
NUMBER_TEXT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# The argument image-to-image pipelines skip the first (1 - strength) of their steps by.
STRENGTH = "strength"


@dataclass(frozen=True)
class Argument:
    """One generation argument: the key in `gen_args`, the pipeline keyword and the studio control."""

    name: str
    kind: type  # int, float, str, or bool (a studio-side switch; see studio.edits)
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # the studio's slider step
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None
    widget: str = "slider"  # how the studio shows it: one of WIDGETS
    main: bool = False  # shown beside the prompts in the studio's tab (the rest: under "Sampling")
    # Passed to the pipeline call under its own name; False for what sdserve applies itself
    # (the seed becomes a generator, the scheduler replaces the pipeline's, images become rows).
    pipeline: bool = True
    # Part of the batch key: requests share a pipeline call only when these are equal. False for
    # what differs between rows of one call (each row has its own seed and is one image).
    shared_by_batch: bool = True

    def check(self, value: Any, field: str | None = None) -> Any:
        """The value with its proper type, or a RequestError naming `field` and the limit.

        The one rule for every way a value comes (the server's gen_args, the studio's controls,
        its named API, StudioClient's keywords), so that a value means the same everywhere:
        None (JSON null, an emptied field) is the default; a number may come as a JSON number or
        as text in JSON's number syntax ("0.3"); an integer argument takes a number equal to an
        integer (20.0 is 20, 20.5 is refused); a switch takes true/false or 1/0; a boolean is
        never a number (a designer's `true` is never a step count).
        """
        field = field or f"gen_args.{self.name}"
        if value is None:
            return self.default
        if self.kind is bool:
            if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
                return bool(value)
            raise RequestError(field, f"must be {self.describe()}; got {value!r}")
        if isinstance(value, bool):
            raise RequestError(field, f"must be {self.describe()}, not a boolean")
        if self.kind is str:
            if not isinstance(value, str):
                raise RequestError(field, f"must be {self.describe()}, got {type(value).__name__}")
        else:
            value = self._number(value, field)
        if self.choices and value not in self.choices:
            raise RequestError(field, f"must be one of {', '.join(self.choices)}; got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise RequestError(field, f"must be {self.describe_range()}; got {value}")
        if self.multiple_of and value % self.multiple_of:
            raise RequestError(field, f"must be a multiple of {self.multiple_of}; got {value}")
        return value

    def _number(self, value: Any, field: str) -> int | float:
        """A numeric argument's value as its kind (int or float); see `check` for the rule."""
        if isinstance(value, str) and NUMBER_TEXT.fullmatch(value):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise RequestError(field, f"must be {self.describe()}, got {type(value).__name__}")
        if not math.isfinite(value):
            raise RequestError(field, f"must be a finite number {self.describe_range()}")
        if self.kind is float:
            return float(value)
        if value != int(value):
            raise RequestError(field, f"must be {self.describe()}, got {value!r}")
        return int(value)

    def describe(self) -> str:
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        return f"{names[self.kind]} {self.describe_range()}".strip()

    def describe_range(self) -> str:
        if self.minimum is None:
            return ""
        number = "{:d}" if self.kind is int else "{:g}"
        return f"from {number.format(self.minimum)} to {number.format(self.maximum)}"


# --- the arguments every model takes ------------------------------------------------------------


def sampling_arguments(guidance: float) -> tuple[Argument, ...]:
    """Steps, guidance, scheduler, seed and image count; `guidance` is the model's default."""
    return (
        Argument(
            "num_inference_steps", int, 50, "Steps", "Denoising steps: more take longer and refine more.",
            minimum=1, maximum=150, step=1,
        ),
        Argument(
            "guidance_scale", float, guidance, "Guidance", "How closely to follow the prompt.",
            minimum=0.0, maximum=30.0, step=0.5,
        ),
        Argument(
            "scheduler", str, "default", "Scheduler", "The sampler; default keeps the model's own.",
            choices=tuple(SCHEDULERS), widget="dropdown", pipeline=False,
        ),
        Argument(
            "seed", int, RANDOM_SEED, "Seed", "-1 picks a random seed; the one used is shown with the result.",
            minimum=RANDOM_SEED, maximum=SEED_MAX, step=1, widget="number", pipeline=False, shared_by_batch=False,
        ),
        Argument(
            "num_images_per_prompt", int, 1, "Images", "How many images to make, each with the next seed.",
            minimum=1, maximum=4, step=1, pipeline=False, shared_by_batch=False,
        ),
    )


def strength_argument(default: float, help: str) -> Argument:
    """How far an image-to-image model moves from its input; it runs that share of its steps."""
    return Argument(STRENGTH, float, default, "Strength", help, 0.0, 1.0, 0.05, main=True)


def variation_arguments() -> tuple[Argument, ...]:
    """A second seed whose noise is mixed into the seed's (spherically), for variations of an image."""
    return (
        Argument(
            "variation_seed", int, RANDOM_SEED, "Variation seed",
            "The second noise mixed in; -1 picks a random one. Each further image takes the next one.",
            minimum=RANDOM_SEED, maximum=SEED_MAX, step=1, widget="number", pipeline=False, shared_by_batch=False,
        ),
        Argument(
            "variation_strength", float, 0.0, "Variation strength",
            "0 gives the seed's own image, 1 the variation seed's; in between, a variation of the seed's image.",
            minimum=0.0, maximum=1.0, step=0.05, pipeline=False, shared_by_batch=False,
        ),
    )


def random_seed() -> int:
    """What -1 resolves to: a seed from the whole range, unpredictable (the secrets module)."""
    return secrets.randbelow(SEED_MAX + 1)


def image_seeds(args: Mapping[str, Any], pick_seed: Callable[[], int]) -> list[dict[str, int]]:
    """The seeds of each image a request (or a job) makes, as the keys of its gen_args.

    Plain images take consecutive seeds: seed, seed + 1, ... Variations (variation_strength > 0)
    are all variations of one image, the seed's: they keep the seed and take consecutive
    variation seeds. -1 is resolved with `pick_seed`, once, so the numbers stay consecutive;
    a variation seed is resolved only when it is used. The server (sdserve.batch) and the
    studio (which sends N images as N calls, studio.planning) both count this way.
    """
    def resolved(seed: int) -> int:
        return pick_seed() if seed == RANDOM_SEED else seed

    count = args.get("num_images_per_prompt", 1)
    seed = resolved(args.get("seed", RANDOM_SEED))
    if args.get("variation_strength", 0) > 0:
        variation_seed = resolved(args.get("variation_seed", RANDOM_SEED))
        return [{"seed": seed, "variation_seed": (variation_seed + k) % (SEED_MAX + 1)} for k in range(count)]
    return [{"seed": (seed + k) % (SEED_MAX + 1)} for k in range(count)]


def parse_gen_args(arguments: tuple[Argument, ...], raw: bytes | str | None, model: str) -> dict[str, Any]:
    """Validated generation arguments with every default filled in (`model` names it in errors)."""
    allowed = {argument.name: argument for argument in arguments}
    given: dict[str, Any] = {}
    if raw:
        if len(raw) > MAX_GEN_ARGS_BYTES:
            raise RequestError("gen_args", f"is over the {MAX_GEN_ARGS_BYTES} byte limit")
        try:
            given = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise RequestError("gen_args", f"is not valid JSON ({error})") from None
        if not isinstance(given, dict):
            raise RequestError("gen_args", "must be a JSON object")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RequestError(
            f"gen_args.{unknown[0]}",
            f"is not an accepted argument for {model} (accepted: {', '.join(sorted(allowed))})",
        )
    return {name: argument.check(given[name]) if name in given else argument.default for name, argument in allowed.items()}
