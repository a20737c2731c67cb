"""Which endpoint a studio command talks to, from its command line: the options, their
environment variables, and the client. No Gradio here, so that commands without a page
(`python -m studio.replay`) take the same options as `python -m studio`.

    --endpoint-url URL                  a local endpoint already running (STUDIO_ENDPOINT_URL)
    --endpoint-name NAME --region R     a SageMaker endpoint (STUDIO_ENDPOINT_NAME, AWS_REGION)
    neither                             the checkout's local endpoint, started for the command
                                        (--local-endpoint-args, STUDIO_LOCAL_ENDPOINT_ARGS)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from studio.client import StudioClient
from studio.endpoint_launcher import (
    LocalEndpointProcess,
    checkout_random_weights,
    own_endpoint_available,
)


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--endpoint-url", default=env.get("STUDIO_ENDPOINT_URL"), help="a local endpoint already running")
    parser.add_argument("--endpoint-name", default=env.get("STUDIO_ENDPOINT_NAME"), help="a SageMaker endpoint")
    parser.add_argument(
        "--local-endpoint-args", type=shlex.split, default=shlex.split(env.get("STUDIO_LOCAL_ENDPOINT_ARGS", "")),
        help="with neither endpoint given: options for the local endpoint the studio starts, e.g. "
             "\"--model-store DIR --cache-dir DIR --max-models 3\" (see python -m serving.local_endpoint --help)",
    )
    parser.add_argument(
        "--region", default=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        help="the SageMaker endpoint's AWS region",
    )


def check_endpoint_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error when the options name no endpoint, or two."""
    if args.endpoint_url and args.endpoint_name:
        parser.error("give either --endpoint-url (local) or --endpoint-name (SageMaker), not both")
    if not (args.endpoint_url or args.endpoint_name or own_endpoint_available()):
        parser.error(
            "no endpoint configured: set STUDIO_ENDPOINT_NAME and AWS_REGION for a SageMaker endpoint, "
            "or STUDIO_ENDPOINT_URL for a local one"
        )


@dataclass(frozen=True)
class Endpoint:
    """The endpoint the options chose, once it is there."""

    where: str  # for the log: a URL, or the SageMaker endpoint's name and region
    client_factory: Callable[[], StudioClient]
    listing_url: str | None  # the local endpoint's list of loaded models; None on AWS
    random_weights: str | None  # the checkout's own endpoint's random weights, if so (sdserve RANDOM_KINDS)


def open_endpoint(args: argparse.Namespace, stack: contextlib.ExitStack,
                  say: Callable[[str], None] = print) -> Endpoint:
    """The endpoint the options name; with none named, the checkout's local endpoint, started
    now and stopped when `stack` closes."""
    if args.endpoint_name:
        return Endpoint(
            f"SageMaker endpoint {args.endpoint_name} ({args.region})",
            lambda: StudioClient.for_sagemaker(args.endpoint_name, args.region), None, None,
        )
    url, random_weights = args.endpoint_url, None
    if not url:
        say("Starting the local endpoint (the first start takes a minute)…")
        url = stack.enter_context(LocalEndpointProcess(endpoint_args=args.local_endpoint_args)).url
        random_weights = checkout_random_weights()
    # The local endpoint's listing says which models are loaded; AWS has none (the panel then
    # judges from the studio's own calls).
    return Endpoint(url, lambda: StudioClient.for_local(url), f"{url.rstrip('/')}/models", random_weights)
