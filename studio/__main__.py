"""python -m studio: the studio at http://127.0.0.1:7860.

    python -m studio                                        # starts the checkout's local endpoint
    python -m studio --endpoint-url http://127.0.0.1:8080   # a local endpoint already running
    python -m studio --endpoint-name NAME --region REGION   # a SageMaker endpoint

Each flag has an environment variable (STUDIO_ENDPOINT_URL, STUDIO_ENDPOINT_NAME, AWS_REGION,
STUDIO_LOCAL_ENDPOINT_ARGS, GRADIO_SERVER_NAME, GRADIO_SERVER_PORT, STUDIO_RESULTS_DIR, STUDIO_RESULTS_BUCKET,
STUDIO_RESULTS_PREFIX, STUDIO_RESULTS_CACHE_MB, STUDIO_MIN_FREE_DISK_MB,
STUDIO_USERS_FILE, STUDIO_ALLOW, STUDIO_INSTANCE_TYPE, STUDIO_PRICE_PER_HOUR, and the quotas'
STUDIO_JOBS_AT_ONCE, STUDIO_JOBS_PER_MINUTE, STUDIO_WORK_PER_DAY and STUDIO_DAILY_BUDGET, see
studio/quotas.py), which is how a container or a Hugging Face Space sets them. AWS
credentials come from boto3's usual chain (and an S3 endpoint other than AWS's from
AWS_ENDPOINT_URL_S3). Beyond 127.0.0.1 the studio needs a sign-in (see studio/access.py) or
--public-without-login.

Results are kept in --results-dir, or with --results-bucket in S3 (studio/bucket_store.py: they
survive a restart on any machine, and studios on one bucket serve each other's), --results-dir
then holding local copies only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from sdserve.files import atomic_file
from sdserve.instances import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES

from studio.access import choose_access, visitor_key_beside
from studio.app import build_app
from studio.blobs import BlobError, Bucket, bucket_problem, prefix_problem
from studio.bucket_store import (
    DEFAULT_MAX_CACHE_BYTES,
    HISTORY_SECRET,
    VISITOR_KEY,
    BucketResultStore,
    shared_secret,
)
from studio.endpoint_options import add_endpoint_arguments, check_endpoint_arguments, open_endpoint
from studio.endpoint_watch import EndpointWatch, Pricing
from studio.gate import launch_options
from studio.quotas import Quotas
from studio.session import MAX_UPLOAD_BYTES
from studio.store import DEFAULT_MIN_FREE_BYTES, ResultStore

DEFAULT_RESULTS_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd-studio" / "results"
# The results' prefix in the bucket: what `python -m deploy policy studio` allows by default
# (<project>/results, the project being sd-studio).
DEFAULT_RESULTS_PREFIX = "sd-studio/results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m studio", description="SD Studio, the designers' image studio.")
    add_endpoint_arguments(parser)  # studio/endpoint_options.py: shared with python -m studio.replay
    parser.add_argument(
        "--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to serve on (0.0.0.0 in a container)",
    )
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--results-dir", type=Path, default=Path(env.get("STUDIO_RESULTS_DIR") or DEFAULT_RESULTS_DIR),
        help="where result images are kept (with --results-bucket: their local copies, which Gradio serves)",
    )
    parser.add_argument(
        "--results-bucket", default=env.get("STUDIO_RESULTS_BUCKET") or None, metavar="BUCKET",
        help="keep results in this S3 bucket, under --results-prefix: they survive a restart, on any machine "
             "(STUDIO_RESULTS_BUCKET; default: none, results stay in --results-dir)",
    )
    parser.add_argument(
        "--results-prefix", default=env.get("STUDIO_RESULTS_PREFIX") or DEFAULT_RESULTS_PREFIX, metavar="PREFIX",
        help=f"with --results-bucket: the key prefix results go under (STUDIO_RESULTS_PREFIX; "
             f"default {DEFAULT_RESULTS_PREFIX})",
    )
    parser.add_argument(
        "--results-cache-mb", type=int, metavar="MB",
        default=int(env.get("STUDIO_RESULTS_CACHE_MB") or DEFAULT_MAX_CACHE_BYTES // 2**20),
        help="with --results-bucket: the most the local copies in --results-dir take "
             f"(STUDIO_RESULTS_CACHE_MB; default {DEFAULT_MAX_CACHE_BYTES // 2**20})",
    )
    parser.add_argument(
        "--min-free-disk-mb", type=int, metavar="MB",
        default=int(env.get("STUDIO_MIN_FREE_DISK_MB") or DEFAULT_MIN_FREE_BYTES // 2**20),
        help="new jobs are refused while the results folder's disk has less free than this "
             f"(STUDIO_MIN_FREE_DISK_MB; default {DEFAULT_MIN_FREE_BYTES // 2**20})",
    )
    parser.add_argument(
        "--users-file", type=Path, default=env.get("STUDIO_USERS_FILE") or None,
        help="designers who may sign in (`python -m studio.access add NAME` makes it)",
    )
    parser.add_argument(
        "--public-without-login", action="store_true",
        help="serve beyond 127.0.0.1 with no sign-in: anyone who finds it can use the endpoint",
    )
    parser.add_argument(
        "--allow", default=env.get("STUDIO_ALLOW") or None, metavar="NAMES",
        help="with Hugging Face sign-in: the accounts and organisations that may use the studio, e.g. "
             "alice,bob,org:acme (STUDIO_ALLOW; default: any Hugging Face account)",
    )
    try:
        Quotas.from_env().add_arguments(parser)  # --jobs-at-once, --jobs-per-minute, --work-per-day, --daily-budget
    except ValueError as error:
        parser.error(str(error))
    parser.add_argument(
        "--instance-type", default=env.get("STUDIO_INSTANCE_TYPE") or DEFAULT_INSTANCE_TYPE,
        help=f"the endpoint's instance type, whose on-demand price the cost per image is estimated with "
             f"({', '.join(INSTANCE_TYPES)}; default {DEFAULT_INSTANCE_TYPE})",
    )
    parser.add_argument(
        "--price-per-hour", type=float, default=env.get("STUDIO_PRICE_PER_HOUR") or None, metavar="USD",
        help="the instance's price per hour, where the table's us-east-1 on-demand price does not fit",
    )
    args = parser.parse_args(argv)
    try:
        args.quotas = Quotas.from_args(args)
        args.pricing = Pricing(args.instance_type, args.price_per_hour)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.access = choose_access(args.host, args.users_file, args.public_without_login, allow=args.allow)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if args.results_bucket:
        problem = bucket_problem(args.results_bucket) or prefix_problem(args.results_prefix.strip("/"))
        if problem:
            parser.error(f"--results-bucket/--results-prefix: {problem}")
        if args.results_cache_mb < 1:
            parser.error(f"--results-cache-mb: at least 1; got {args.results_cache_mb}")
    check_endpoint_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (docker stop, a test ending) unwinds like Ctrl+C, so the local endpoint is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        store, visitor_key, history_secret = open_store(args)
    except (BlobError, ValueError) as error:
        sys.exit(f"python -m studio: the results store: {error}")
    with contextlib.ExitStack() as stack:
        endpoint = open_endpoint(args, stack, say=lambda line: print(line, flush=True))
        logging.getLogger("studio").info("endpoint: %s", endpoint.where)  # the log, not the page: no names there
        if args.access.notice:
            logging.getLogger("studio").warning("%s", args.access.notice)
        args.access = args.access.with_visitor_key(visitor_key)
        demo = build_app(
            endpoint.client_factory, store=store, random_weights=endpoint.random_weights,
            history_secret=history_secret, access=args.access, quotas=args.quotas,
            watch=EndpointWatch(args.pricing, listing_url=endpoint.listing_url, random_weights=endpoint.random_weights),
        )
        demo.queue().launch(
            server_name=args.host, server_port=args.port,
            **launch_options(args.access, owns_file=store.link_owner_matches),  # studio/gate.py
            # Uploads are refused past what the studio can take (the largest PNG it makes), before
            # Gradio stores them; nothing in the results folder is served (the page gets links to
            # results made for their owner, ResultStore.link).
            max_file_size=MAX_UPLOAD_BYTES, blocked_paths=[str(store.root)],
        )


def open_store(args: argparse.Namespace) -> tuple[ResultStore, bytes, str]:
    """(the results store, the visitor cookies' key, BrowserState's key): kept beside the results
    folder, or with a results bucket in it, so that every history survives a restart elsewhere."""
    limits = {"min_free_bytes": args.min_free_disk_mb * 2**20}
    if not args.results_bucket:
        store = ResultStore(args.results_dir, **limits)
        return store, visitor_key_beside(store.root), _history_secret(store.root)
    bucket = Bucket(args.results_bucket, args.results_prefix, region=args.region)
    store = BucketResultStore(bucket, args.results_dir, max_cache_bytes=args.results_cache_mb * 2**20, **limits)
    return store, shared_secret(bucket, VISITOR_KEY), shared_secret(bucket, HISTORY_SECRET).hex()


def _history_secret(results_dir: Path) -> str:
    """The key the browser's copy of the history is encrypted with, kept beside the results folder
    (not in it: the store owns that folder). It is sent to the page (BrowserState), so it proves
    nothing; the server's own signature on each entry does (studio/signing.py).

    Gradio picks a new one at every start otherwise, and the history would be lost with every
    restart although its images are still here.
    """
    path = results_dir.parent / f".{results_dir.name}-history-secret"
    served = results_dir / ".history-secret"  # where earlier versions kept it
    if served.is_file():
        if not path.is_file():
            served.replace(path)
            path.chmod(0o600)
        served.unlink(missing_ok=True)
    if not path.is_file():
        with atomic_file(path, mode=0o600) as staging:
            staging.write_text(secrets.token_urlsafe(16))
    return path.read_text().strip()


if __name__ == "__main__":
    main()
