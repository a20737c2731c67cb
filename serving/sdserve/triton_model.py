"""The Triton Python-backend side: tensors in, tensors (or errors) out.

Each model.py subclasses `StableDiffusionModel`, names its model and does nothing else;
everything Triton-agnostic lives in `batch`, `request` and `pipelines`, where it is
unit-tested without a server.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from .batch import Answer, serve_batch
from .catalog import CALL_BUDGET_S, CHECKPOINT_DIR, INPUT_NAMES, MAX_IMAGES_PER_CALL, MAX_PAYLOAD_BYTES
from .budget import ModelBusy
from .errors import RequestError
from .pipelines import load_pipeline


class StableDiffusionModel:
    model_name: str  # the catalog name, set by each model.py

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        # args["model_repository"] is this model's own folder; weights sit in its version folder.
        checkpoint = Path(args["model_repository"]) / args["model_version"] / CHECKPOINT_DIR
        on_gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
        settings = {key: value.get("string_value") for key, value in config.get("parameters", {}).items()}
        self.loaded = load_pipeline(
            self.model_name, checkpoint, device, float(settings.get("call_budget_seconds") or CALL_BUDGET_S)
        )
        self.max_images_per_call = int(settings.get("max_images_per_call") or MAX_IMAGES_PER_CALL)
        self.max_answer_bytes = int(settings.get("max_answer_bytes") or MAX_PAYLOAD_BYTES)

    def execute(self, requests: list) -> list:
        batch = [
            {name: _input_array(request, name) for name in INPUT_NAMES} for request in requests
        ]
        answers = serve_batch(self.loaded, batch, self.max_images_per_call, self.max_answer_bytes)
        return [_response(answer) for answer in answers]

    def finalize(self) -> None:
        del self.loaded


def _input_array(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _response(answer: Answer | Exception):
    if isinstance(answer, Exception):
        code = pb_utils.TritonError.INTERNAL
        if isinstance(answer, RequestError):
            code = pb_utils.TritonError.INVALID_ARG  # 400: the caller can fix it
        elif isinstance(answer, ModelBusy):
            code = pb_utils.TritonError.UNAVAILABLE  # 503: the same call may succeed in a moment
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer), code))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, array) for name, array in answer.as_arrays().items()]
    )
