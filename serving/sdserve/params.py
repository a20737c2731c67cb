"""`gen_args`: the allow-list of generation arguments, per model, with types and ranges.

Nothing from a request reaches a pipeline call unless it is declared here. Unknown keys,
wrong types and out-of-range values are refused with an error naming the key.
"""

from __future__ import annotations

import json
import math
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


@dataclass(frozen=True)
class Param:
    """One allowed generation argument: its type, bounds and default."""

    kind: type  # int, float or str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None

    def validate(self, key: str, value: Any) -> Any:
        field = f"gen_args.{key}"
        # bool is an int in Python; a designer's `true` is never a step count.
        if isinstance(value, bool):
            raise RequestError(field, f"must be {self.describe()}, not a boolean")
        if self.kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, self.kind):
            raise RequestError(field, f"must be {self.describe()}, got {type(value).__name__}")
        if self.kind is float and not math.isfinite(value):
            raise RequestError(field, f"must be a finite number {self.describe_range()}")
        if self.choices and value not in self.choices:
            raise RequestError(field, f"must be one of {', '.join(self.choices)}; got {value!r}")
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise RequestError(field, f"must be {self.describe_range()}; got {value}")
        if self.multiple_of and value % self.multiple_of:
            raise RequestError(field, f"must be a multiple of {self.multiple_of}; got {value}")
        return value

    def describe(self) -> str:
        names = {int: "an integer", float: "a number", str: "a string"}
        return f"{names[self.kind]} {self.describe_range()}".strip()

    def describe_range(self) -> str:
        if self.minimum is None:
            return ""
        number = "{:d}" if self.kind is int else "{:g}"
        return f"from {number.format(self.minimum)} to {number.format(self.maximum)}"


def _seed() -> Param:
    # -1 asks the server to pick one; the one it picked is reported back.
    return Param(int, RANDOM_SEED, minimum=RANDOM_SEED, maximum=SEED_MAX)


def _common(steps: int, guidance: float) -> dict[str, Param]:
    return {
        "num_inference_steps": Param(int, steps, minimum=1, maximum=150),
        "guidance_scale": Param(float, guidance, minimum=0.0, maximum=30.0),
        "seed": _seed(),
        "scheduler": Param(str, "default", choices=tuple(SCHEDULERS)),
        "num_images_per_prompt": Param(int, 1, minimum=1, maximum=4),
    }


# Defaults follow the reference article and each pipeline's documented defaults.
MODEL_PARAMS: dict[str, dict[str, Param]] = {
    "sd_base": {
        **_common(steps=50, guidance=7.5),
        "height": Param(int, 512, minimum=64, maximum=1024, multiple_of=8),
        "width": Param(int, 512, minimum=64, maximum=1024, multiple_of=8),
    },
    "sd_depth": {
        **_common(steps=50, guidance=7.5),
        "strength": Param(float, 0.8, minimum=0.0, maximum=1.0),
    },
    "sd_inpaint": {
        **_common(steps=50, guidance=7.5),
        "strength": Param(float, 1.0, minimum=0.0, maximum=1.0),
    },
    "sd_upscale": {
        **_common(steps=50, guidance=9.0),
        "noise_level": Param(int, 20, minimum=0, maximum=350),
    },
}


def parse_gen_args(model: str, raw: bytes | str | None) -> dict[str, Any]:
    """Validated generation arguments with every default filled in."""
    allowed = MODEL_PARAMS[model]
    given: dict[str, Any] = {}
    if raw:
        if len(raw) > MAX_GEN_ARGS_BYTES:
            raise RequestError("gen_args", f"is over the {MAX_GEN_ARGS_BYTES} byte limit")
        try:
            given = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError("gen_args", f"is not valid JSON ({error})") from None
        if not isinstance(given, dict):
            raise RequestError("gen_args", "must be a JSON object")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise RequestError(
            f"gen_args.{unknown[0]}",
            f"is not an accepted argument for {model} (accepted: {', '.join(sorted(allowed))})",
        )
    return {
        key: param.validate(key, given[key]) if key in given else param.default
        for key, param in allowed.items()
    }
