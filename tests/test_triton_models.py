"""The four models on a real local Triton, called through tritonclient over HTTP.

Requests have the reference article's shape: BYTES inputs of shape [1, 1].
"""

import base64
import io
import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from serving.local_triton import LocalTriton

from .samples import bomb_png_b64, mask_b64, png_b64

pytestmark = pytest.mark.triton

STEPS = 2


@pytest.fixture(scope="module")
def triton(model_repository, artifacts_dir):
    server = LocalTriton(model_repository, log_path=artifacts_dir / "triton-models.log")
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(triton):
    with httpclient.InferenceServerClient(triton.http_address, concurrency=8, network_timeout=300) as client:
        yield client


def inputs_for(prompt="a lighthouse", gen_args=None, **images):
    values = {"prompt": prompt, **images}
    if gen_args is not None:
        values["gen_args"] = gen_args if isinstance(gen_args, str) else json.dumps(gen_args)
    tensors = []
    for name, value in values.items():
        tensor = httpclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        tensors.append(tensor)
    return tensors


def outputs():
    return [httpclient.InferRequestedOutput("generated_image"), httpclient.InferRequestedOutput("parameters")]


def infer(client, model, prompt="a lighthouse", gen_args=None, **images):
    return client.infer(model, inputs_for(prompt, gen_args, **images), outputs=outputs())


def png_bytes(result):
    return base64.b64decode(result.as_numpy("generated_image")[0, 0])


def image_of(result):
    return Image.open(io.BytesIO(png_bytes(result)))


def parameters_of(result):
    return json.loads(result.as_numpy("parameters")[0, 0])


def base_args(**extra):
    return {"num_inference_steps": STEPS, "height": 64, "width": 64, **extra}


def test_text_to_image(client):
    result = infer(client, "sd_base", gen_args=base_args(seed=1, width=96))
    assert image_of(result).size == (96, 64)
    parameters = parameters_of(result)
    assert parameters["seed"] == 1 and parameters["weights"] == "tiny-random" and parameters["model"] == "sd_base"


def test_article_payload_over_plain_http(triton):
    """The exact JSON body of the article (no tritonclient), gen_args and negative prompt included."""
    import requests

    inputs = dict(prompt="Infinity pool on top of a high rise", negative_prompt="blur, low detail",
                  gen_args=json.dumps(base_args(guidance_scale=8)))
    payload = {"inputs": [{"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [data]} for name, data in inputs.items()]}
    response = requests.post(f"{triton.http_url}/v2/models/sd_base/infer", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    output = {item["name"]: item["data"] for item in response.json()["outputs"]}
    assert Image.open(io.BytesIO(base64.b64decode(output["generated_image"][0]))).size == (64, 64)
    assert json.loads(output["parameters"][0])["negative_prompt"] == "blur, low detail"


@pytest.mark.parametrize(
    "model, size, extra, expected",
    [
        ("sd_depth", (64, 48), {}, (64, 48)),
        ("sd_inpaint", (64, 64), {"mask_image": mask_b64()}, (64, 64)),
        ("sd_upscale", (48, 32), {}, (192, 128)),
    ],
)
def test_image_models(client, model, size, extra, expected):
    result = infer(client, model, gen_args={"num_inference_steps": STEPS, "seed": 4}, image=png_b64(size), **extra)
    assert image_of(result).size == expected


def test_seeds(client):
    first, again, other = (infer(client, "sd_base", gen_args=base_args(seed=seed)) for seed in (9, 9, 10))
    assert png_bytes(first) == png_bytes(again)
    assert png_bytes(first) != png_bytes(other)


def test_concurrent_mixed_batch_gets_one_answer_each(client):
    """Valid and invalid requests at once: the batcher groups them, each gets its own answer."""
    requests = [
        ("sd_base", base_args(seed=100 + index)) if index % 2 == 0 else ("sd_base", base_args(steps=3))
        for index in range(8)
    ]
    before = client.get_inference_statistics("sd_base")["model_stats"][0]
    pending = [client.async_infer(model, inputs_for(gen_args=args), outputs=outputs()) for model, args in requests]
    answers = []
    for handle in pending:
        try:
            answers.append(handle.get_result())
        except InferenceServerException as error:
            answers.append(error)
    after = client.get_inference_statistics("sd_base")["model_stats"][0]

    for index, answer in enumerate(answers):
        if index % 2 == 0:
            assert parameters_of(answer)["seed"] == 100 + index
            assert image_of(answer).size == (64, 64)
        else:
            assert isinstance(answer, InferenceServerException)
            assert "gen_args.steps" in answer.message()
    # Fewer executions than requests: Triton handed the model several requests at once.
    executions = after["execution_count"] - before["execution_count"]
    assert executions < len(requests), (executions, len(requests))


BAD_INPUTS = [
    ("sd_depth", {"image": b"!!not base64!!"}, {}, "image: is not valid base64"),
    ("sd_depth", {"image": base64.b64encode(b"just some text")}, {}, "image: is not a readable image"),
    ("sd_depth", {"image": png_b64((2100, 40))}, {}, "image: is 2100x40, over the limit of 2048 px a side"),
    ("sd_depth", {"image": bomb_png_b64(50000, 50000)}, {}, "image: is over the limit of 2048 px a side"),
    ("sd_depth", {}, {}, "image: is required for sd_depth"),
    ("sd_inpaint", {"image": png_b64()}, {}, "mask_image: is required"),
    ("sd_inpaint", {"image": png_b64(), "mask_image": mask_b64((32, 32), (0, 0, 9, 9))}, {}, "mask_image: is 32x32 but the image is 64x64"),
    ("sd_base", {}, "{steps: 3", "gen_args: is not valid JSON"),
    ("sd_base", {}, {"sampler": "ddim"}, "gen_args.sampler: is not an accepted argument"),
    ("sd_base", {}, {"num_inference_steps": "ten"}, "gen_args.num_inference_steps: must be an integer"),
    ("sd_base", {}, {"num_inference_steps": 0}, "gen_args.num_inference_steps: must be from 1 to 150; got 0"),
    ("sd_base", {}, {"num_inference_steps": 10000}, "gen_args.num_inference_steps: must be from 1 to 150; got 10000"),
    ("sd_base", {}, '{"guidance_scale": NaN}', "gen_args.guidance_scale: must be a finite number"),
    ("sd_depth", {"image": png_b64()}, {"strength": 1.5}, "gen_args.strength: must be from 0 to 1; got 1.5"),
]


@pytest.mark.parametrize("model, images, gen_args, message", BAD_INPUTS, ids=[case[3].split(":")[0] + f"-{i}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_field_and_server_keeps_serving(client, model, images, gen_args, message):
    with pytest.raises(InferenceServerException) as caught:
        infer(client, model, gen_args=gen_args, **images)
    assert message in caught.value.message()
    assert image_of(infer(client, "sd_base", gen_args=base_args(seed=1))).size == (64, 64)


def test_empty_prompt_where_required(client):
    with pytest.raises(InferenceServerException, match="prompt: must not be empty for sd_base"):
        infer(client, "sd_base", prompt="", gen_args=base_args())


def test_prompt_far_over_the_tokenizer_limit_is_truncated(client):
    result = infer(client, "sd_base", prompt=" ".join(["castle"] * 400), gen_args=base_args(seed=2))
    assert parameters_of(result)["prompt_truncated"] is True
    assert image_of(result).size == (64, 64)
