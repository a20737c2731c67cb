"""python -m serving.local_endpoint: see ``--help``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdserve.catalog import INVOCATION_SECONDS, MAX_PAYLOAD_BYTES
from serving.triton_install import TritonLaunchError

from .server import (
    DEFAULT_CACHE,
    MAX_CONNECTIONS,
    DEFAULT_LOG_DIR,
    DEFAULT_REPOSITORY,
    DEFAULT_STORE,
    MODELS_MEMORY_SHARE,
    RESIDENT_PER_FOLDER_BYTE,
    EndpointSettings,
    LocalEndpoint,
    default_max_gb,
    serve_until_signalled,
)

DESCRIPTION = """\
A local SageMaker multi-model endpoint: the real tritonserver (SageMaker MME mode) behind a front
that speaks the SageMaker Runtime InvokeEndpoint API. Point boto3 at it:

  boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:8080", region_name="us-east-1",
               aws_access_key_id="local", aws_secret_access_key="local").invoke_endpoint(
      EndpointName="sd-studio", TargetModel="<model>.tar.gz", ContentType="application/json", Body=...)

Routes: POST /endpoints/<name>/invocations, GET /ping, GET /models (loaded models, size, last use).
TargetModel names an archive in the model store; it is downloaded and safely extracted into the
cache on first use, loaded into Triton, and the least recently used models are unloaded to stay
within --max-models / --max-gb.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.local_endpoint", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = a free one)")
    parser.add_argument("--endpoint-name", default="sd-studio", help="EndpointName it answers to (default sd-studio)")
    parser.add_argument("--model-store", default=str(DEFAULT_STORE),
                        help="folder or s3://bucket/prefix holding <model>.tar.gz archives "
                             "(default build/model-store)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint URL (e.g. a moto server) for an s3:// store")
    parser.add_argument("--region", help="AWS region for an s3:// store (default $AWS_REGION or us-east-1)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where archives are extracted (default build/model-cache)")
    parser.add_argument("--build-from", type=Path, metavar="REPOSITORY",
                        help="archive this Triton model repository's models into the (local) store "
                             "when missing or out of date; default: serving/models when the store is "
                             "the default folder")
    parser.add_argument("--no-build", action="store_true", help="never build archives")
    parser.add_argument("--max-models", type=int, default=4, help="models loaded at once (default 4; 0 = no limit)")
    parser.add_argument("--max-gb", type=float, default=default_max_gb(),
                        help="GiB of models loaded at once, a model counting the size of its extracted "
                             f"folder; 0 = no limit (default here {default_max_gb()}: the folders whose models "
                             f"fit in {MODELS_MEMORY_SHARE * 100:.0f}%% of this machine's memory, a model on a CPU "
                             f"holding {RESIDENT_PER_FOLDER_BYTE}x its folder)")
    parser.add_argument("--load-wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long a call waits for its model to load before ModelNotReadyException "
                             "(429); the load goes on (default 60)")
    parser.add_argument("--load-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up a load after this long (default 900)")
    parser.add_argument("--invoke-timeout", type=float, default=float(INVOCATION_SECONDS), metavar="SECONDS",
                        help=f"give up waiting for the model's answer after this long, answering ModelError "
                             f"as SageMaker does (default {INVOCATION_SECONDS}, SageMaker's limit)")
    parser.add_argument("--max-answer-bytes", type=int, default=MAX_PAYLOAD_BYTES, metavar="BYTES",
                        help=f"refuse a larger answer with ModelError (413) as SageMaker does "
                             f"(default {MAX_PAYLOAD_BYTES}, SageMaker's limit)")
    parser.add_argument("--retry-failed-after", type=float, default=300.0, metavar="SECONDS",
                        help="a failed load is answered from memory until its archive changes or this "
                             "long has passed (default 300)")
    parser.add_argument("--max-archive-gb", type=float, default=30.0,
                        help="refuse archives larger than this, packed or extracted (default 30)")
    parser.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR,
                        help="tritonserver's log goes here (default build/local-endpoint)")
    parser.add_argument("--model-config-name", default="auto",
                        help="configs/<NAME>.pbtxt Triton uses; auto = cpu without a GPU (default)")
    parser.add_argument("--compute-threads", type=int, metavar="N",
                        help="CPU threads each model computes with (default: torch's, every core); fewer "
                             "leave cores to a studio or clients on the same machine")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                        help=f"connections open at once; a request on one opened past this gets "
                             f"ServiceUnavailable (503) at once and its connection is closed "
                             f"(default {MAX_CONNECTIONS})")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log /ping requests")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_connections < 1:
        print(f"error: --max-connections: at least 1; got {args.max_connections}.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    build_from = args.build_from
    if build_from is None and not args.no_build and Path(args.model_store).resolve() == DEFAULT_STORE.resolve():
        build_from = DEFAULT_REPOSITORY
    if args.no_build:
        build_from = None
    if args.max_models < 0 or args.max_gb < 0:
        print("error: --max-models and --max-gb must be >= 0", file=sys.stderr)
        return 2
    settings = EndpointSettings(
        host=args.host, port=args.port, endpoint_name=args.endpoint_name, model_store=args.model_store,
        s3_endpoint_url=args.s3_endpoint_url, region=args.region, cache_dir=args.cache_dir,
        build_from=build_from, max_models=args.max_models or None, max_gb=args.max_gb or None,
        load_wait_s=args.load_wait, load_timeout_s=args.load_timeout, invoke_timeout_s=args.invoke_timeout,
        max_answer_bytes=args.max_answer_bytes,
        retry_failed_after_s=args.retry_failed_after, max_archive_gb=args.max_archive_gb,
        log_dir=args.log_dir, compute_threads=args.compute_threads, max_connections=args.max_connections,
        model_config_name=None if args.model_config_name.lower() == "none" else args.model_config_name)
    try:
        return serve_until_signalled(LocalEndpoint(settings))
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except (TritonLaunchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
