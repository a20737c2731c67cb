"""Results that survive a restart: the results store on S3 (studio/bucket_store.py, studio/blobs.py).

Each behaviour runs twice: on a local Folder (the fast tier) and on a bucket of moto in server
mode on 127.0.0.1, reached by boto3 as the studio reaches it (AWS_ENDPOINT_URL_S3; mark aws).
"A restart" is a new store on the same bucket with an empty local folder; "another studio" is a
second store on the same bucket, started before the first one's saves. Races between two studios
are played out step by step at the one seam they share, the bucket's calls (`Interleaved`).

The last test restarts `python -m studio` itself on the bucket (marks studio, aws, browser).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from deploy.config import DeployConfig
from deploy.policy import studio_policy
from serving.processes import find_free_port
from studio import signing
from studio.__main__ import DEFAULT_RESULTS_PREFIX, parse_args
from studio.__main__ import open_store as open_studio_store
from studio.access import hash_password
from studio.blobs import Blob, BlobError, Bucket, Folder
from studio.bucket_store import (
    HISTORY_SECRET,
    IMAGES,
    KEEPERS,
    SIGNING_KEY,
    VISITOR_KEY,
    BucketResultStore,
    image_key,
    shared_secret,
)
from studio.process import StudioProcess
from studio.store import ResultStore, owner_key
from tests.deploy_support import REGION
from tests.test_client_jobs import FakeEndpoint

from .samples import png_with_parameters

BUCKET = "sd-studio-results-test"
PREFIX = "team-a/results"


def pngs(count: int, size=(8, 8), offset: int = 0) -> list[bytes]:
    return [png_with_parameters(None, size=size, color=(index % 256, index // 256, 9))
            for index in range(offset, offset + count)]


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.aws)])
def blobs(request, tmp_path, monkeypatch):
    """The shared storage: a folder, or s3://BUCKET/PREFIX/ on a reset moto server."""
    if request.param == "folder":
        return Folder(tmp_path / "bucket")
    moto_url = request.getfixturevalue("moto")  # clean AWS variables, dummy credentials, a reset server
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_url)  # boto3's own variable, as the studio is run
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    return Bucket(BUCKET, PREFIX, region=REGION)


def keys(blobs, under: str) -> list[str]:
    return [blob.key for blob in blobs.list(under)]


def markers(blobs, under: str = f"{KEEPERS}/") -> list[tuple[str, str]]:
    """(id, owner key) of each marker: keepers/<id>/<owner key>.<when saved>."""
    return sorted((key.split("/")[1], key.split("/")[2].partition(".")[0]) for key in keys(blobs, under))


def open_store(blobs, tmp_path: Path, name: str = "copies", **limits) -> BucketResultStore:
    """A studio's store on `blobs`, with its own (empty) folder of local copies."""
    return BucketResultStore(blobs, tmp_path / name, **limits)


# --- the store's behaviour on the bucket ---------------------------------------------------------


def test_a_result_is_its_owners_only(blobs, tmp_path):
    store = open_store(blobs, tmp_path)
    png = pngs(1)[0]
    result_id = store.save(png, "generate-seed-1.png", owner="ann")
    assert keys(blobs, f"{IMAGES}/") == [image_key(result_id, "generate-seed-1.png")]
    assert markers(blobs) == [(result_id, owner_key("ann"))]  # a hash, never the name
    assert store.path(result_id, owner="ann").read_bytes() == png
    assert store.open(result_id, owner="ann").size == (8, 8)
    assert store.usage("ann") == (1, len(png))
    for reader in ("bob", "studio"):
        assert not store.keeps(result_id, owner=reader)
        assert store.path(result_id, owner=reader) is None and store.open(result_id, owner=reader) is None
        assert store.link(result_id, owner=reader) is None
    assert store.path("../" + result_id, owner="ann") is None and store.path(None, owner="ann") is None


def test_a_restart_with_an_empty_folder_serves_every_result_and_history(blobs, tmp_path):
    first = open_store(blobs, tmp_path, "first")
    ann = [first.save(png, f"ann-{index}.png", owner="ann") for index, png in enumerate(pngs(3))]
    bob = first.save(pngs(1, offset=7)[0], "bob.png", owner="bob")
    entry = signing.signed(first.key, "ann", {"id": ann[0], "task": "generate", "parameters": {}, "inputs": {}})

    restarted = open_store(blobs, tmp_path, "second")  # another machine: nothing on its disk
    assert not any((tmp_path / "second").iterdir())
    assert restarted.key == first.key and signing.signature_matches(restarted.key, "ann", entry)
    assert restarted.usage("ann") == first.usage("ann") and restarted.usage("bob") == first.usage("bob")
    assert [restarted.path(result_id, owner="ann").read_bytes() for result_id in ann] == pngs(3)
    assert restarted.path(bob, owner="ann") is None and restarted.path(ann[0], owner="bob") is None
    # The oldest is still the oldest: the restarted store prunes ann's in the order she saved them.
    pruning = open_store(blobs, tmp_path, "third", max_items=3)
    pruning.save(pngs(1, offset=20)[0], "x.png", owner="ann")
    assert pruning.path(ann[0], owner="ann") is None and pruning.path(ann[1], owner="ann") is not None


def test_the_keys_live_in_the_bucket_and_two_starts_at_once_agree(blobs, tmp_path):
    made: list[bytes] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        made.append(shared_secret(blobs, SIGNING_KEY))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 4 and len(set(made)) == 1 and len(made[0]) == signing.KEY_BYTES
    store = open_store(blobs, tmp_path)
    assert store.key == made[0]
    # BrowserState's key and the visitor cookies' key too, each its own.
    assert len({shared_secret(blobs, VISITOR_KEY), shared_secret(blobs, HISTORY_SECRET), store.key}) == 3
    assert shared_secret(blobs, VISITOR_KEY) == shared_secret(blobs, VISITOR_KEY)
    blobs.put(f"keys/{SIGNING_KEY}", b"not a key")
    with pytest.raises(ValueError, match="is not a studio key"):
        open_store(blobs, tmp_path, "again")


def test_each_owner_has_its_quota_and_what_goes_leaves_the_bucket(blobs, tmp_path):
    store = open_store(blobs, tmp_path, max_items=2)
    ann = [store.save(png, "a.png", owner="ann") for png in pngs(4)]
    bob = store.save(pngs(1, offset=9)[0], "b.png", owner="bob")
    assert [store.path(result_id, owner="ann") is not None for result_id in ann] == [False, False, True, True]
    assert markers(blobs) == sorted([(result_id, owner_key("ann")) for result_id in ann[2:]]
                                    + [(bob, owner_key("bob"))])
    assert sorted(key.split("/")[1] for key in keys(blobs, f"{IMAGES}/")) == sorted([*ann[2:], bob])
    assert not (tmp_path / "copies" / ann[0]).exists(), "its local copy went too"


def test_an_image_two_owners_keep_stays_until_both_let_it_go(blobs, tmp_path):
    store = open_store(blobs, tmp_path, max_items=1)
    shared, other_a, other_b = pngs(3)
    result_id = store.save(shared, "x.png", owner="ann")
    assert store.save(shared, "y.png", owner="bob") == result_id
    assert keys(blobs, f"{IMAGES}/") == [image_key(result_id, "x.png")], "one image, under its first name"
    store.save(other_a, "x.png", owner="ann")
    assert store.path(result_id, owner="bob") is not None and store.path(result_id, owner="ann") is None
    store.save(other_b, "x.png", owner="bob")
    assert image_key(result_id, "x.png") not in keys(blobs, f"{IMAGES}/")


def test_past_the_limit_the_largest_holders_go_first(blobs, tmp_path):
    store = open_store(blobs, tmp_path, max_items=3, max_total_items=5)
    images = pngs(6)
    small = [store.save(png, "x.png", owner="small") for png in images[:2]]
    large = [store.save(png, "x.png", owner="large") for png in images[2:5]]
    store.save(images[5], "x.png", owner="new")
    assert all(store.path(result_id, owner="small") for result_id in small)
    assert [store.path(result_id, owner="large") is not None for result_id in large] == [False, True, True]
    assert len(keys(blobs, f"{IMAGES}/")) == 5


def test_links_for_gradio_are_local_copies_made_on_first_read(blobs, tmp_path):
    png = pngs(1, size=(32, 32))[0]
    result_id = open_store(blobs, tmp_path, "first").save(png, "made.png", owner="ann")
    store = open_store(blobs, tmp_path, "second")
    store.serve_links_in(tmp_path / "gradio" / "links")
    assert not (tmp_path / "second" / result_id).exists(), "nothing fetched before a read"
    link = store.link(result_id, owner="ann")
    assert link.read_bytes() == png and link.name == "made.png"
    assert link.parent.name == signing.link_token(store.key, owner_key("ann"), result_id)
    assert store.link_owner_matches(link, "ann") is True and store.link_owner_matches(link, "bob") is False
    assert store.link(result_id, owner="ann") == link and store.link(result_id, owner="bob") is None


def test_the_local_copies_are_held_within_their_limit(blobs, tmp_path):
    images = pngs(6, size=(48, 48))
    size = max(map(len, images))
    ids = [open_store(blobs, tmp_path, "maker").save(png, "x.png", owner="ann") for png in images]
    store = open_store(blobs, tmp_path, "copies", max_cache_bytes=3 * size)
    store.serve_links_in(tmp_path / "links")
    links = [store.link(result_id, owner="ann") for result_id in ids]
    copies = [path for path in (tmp_path / "copies").rglob("*.png")]
    assert len(copies) == 3 and sum(path.stat().st_size for path in copies) <= 3 * size
    assert [link.read_bytes() for link in links] == images, "a link outlives its copy (a hard link)"
    assert store.path(ids[0], owner="ann").read_bytes() == images[0], "fetched again when read again"
    restarted = open_store(blobs, tmp_path, "copies", max_cache_bytes=3 * size)
    assert len(restarted._cached) == 3, "the copies a run left are used again"


def test_a_local_results_folder_is_not_taken_for_a_folder_of_copies(blobs, tmp_path):
    ResultStore(tmp_path / "results").save(pngs(1)[0], "x.png", owner="ann")
    with pytest.raises(ValueError, match="holds a local results store"):
        open_store(blobs, tmp_path, "results")


# --- two studios on one bucket -------------------------------------------------------------------


def test_another_studio_serves_what_this_one_saved_after_it_started(blobs, tmp_path):
    other = open_store(blobs, tmp_path, "other")  # started first: its bookkeeping knows nothing of what follows
    this = open_store(blobs, tmp_path, "this")
    result_id = this.save(pngs(1)[0], "x.png", owner="ann")
    assert other.path(result_id, owner="bob") is None, "another owner: not found in the bucket either"
    assert other.path(result_id, owner="ann").read_bytes() == pngs(1)[0]
    assert other.usage("ann") == this.usage("ann")


def test_a_prune_keeps_an_image_another_studios_owner_keeps(blobs, tmp_path):
    image = pngs(1)[0]
    this = open_store(blobs, tmp_path, "this", max_items=1)
    other = open_store(blobs, tmp_path, "other")
    result_id = this.save(image, "x.png", owner="ann")
    assert other.save(image, "x.png", owner="bob") == result_id  # `this` does not know bob keeps it
    this.save(pngs(1, offset=5)[0], "x.png", owner="ann")  # ann lets it go in `this`
    assert this.path(result_id, owner="ann") is None
    assert markers(blobs, f"{KEEPERS}/{result_id}/") == [(result_id, owner_key("bob"))]
    assert open_store(blobs, tmp_path, "restarted").path(result_id, owner="bob").read_bytes() == image


class Interleaved:
    """A store's storage that plays steps between its calls: each hook runs once, just before (or
    after) the first call matching `when(method, key)`. A step is another studio's save or prune,
    or another thread of this one's."""

    def __init__(self, blobs):
        self.blobs = blobs
        self.hooks: list[dict] = []

    def __repr__(self) -> str:
        return repr(self.blobs)

    def before(self, when: Callable[[str, str], bool], step: Callable[[], None]) -> dict:
        self.hooks.append(hook := {"when": when, "step": step, "after": False, "done": False})
        return hook

    def after(self, when: Callable[[str, str], bool], step: Callable[[], None]) -> dict:
        self.hooks.append(hook := {"when": when, "step": step, "after": True, "done": False})
        return hook

    def _due(self, method: str, key: str, after: bool) -> list[dict]:
        due = [hook for hook in self.hooks if not hook["done"] and hook["after"] == after and hook["when"](method, key)]
        for hook in due:
            hook["done"] = True
        return due

    def _call(self, method: str, key: str, *args, **kwargs):
        for hook in self._due(method, key, after=False):
            hook["step"]()
        answer = getattr(self.blobs, method)(key, *args, **kwargs)
        if method == "list":
            answer = list(answer)
        for hook in self._due(method, key, after=True):
            hook["step"]()
        return answer

    def put(self, key, *args, **kwargs):
        return self._call("put", key, *args, **kwargs)

    def get(self, key):
        return self._call("get", key)

    def head(self, key) -> Blob | None:
        return self._call("head", key)

    def delete(self, key):
        return self._call("delete", key)

    def list(self, under, **kwargs):
        return iter(self._call("list", under, **kwargs))


def test_a_save_that_races_a_delete_elsewhere_puts_the_image_back(blobs, tmp_path):
    """`this` lets go of an image (no marker left when it lists them) while `other` saves it for
    bob: `other`'s marker lands after the listing, its check then finds the image gone."""
    image, newer = pngs(2)
    this = open_store(blobs, tmp_path, "this", max_items=1)
    result_id = this.save(image, "x.png", owner="ann")
    shared = Interleaved(blobs)
    race = shared.before(lambda method, key: method == "put" and key.startswith(f"{KEEPERS}/{result_id}/"),
                         lambda: this.save(newer, "x.png", owner="ann"))  # ann's prune: marker, listing, delete
    other = BucketResultStore(shared, tmp_path / "other")
    assert other.save(image, "x.png", owner="bob") == result_id and race["done"]
    assert keys(blobs, f"{IMAGES}/{result_id}/") == [image_key(result_id, "x.png")], "put back by its check"
    assert open_store(blobs, tmp_path, "restarted").path(result_id, owner="bob").read_bytes() == image


def test_a_delete_that_races_a_save_elsewhere_puts_the_image_back(blobs, tmp_path):
    """`this` finds no marker, `other`'s whole save (marker and check) lands before `this`
    deletes the image: `this` lists the markers again after its delete and puts it back."""
    image, newer = pngs(2)
    shared = Interleaved(blobs)
    this = BucketResultStore(shared, tmp_path / "this", max_items=1)
    result_id = this.save(image, "x.png", owner="ann")
    other = BucketResultStore(blobs, tmp_path / "other")  # knows the image: its save puts only the marker
    race = shared.after(lambda method, key: method == "list" and key == f"{KEEPERS}/{result_id}/",  # the first listing
                        lambda: other.save(image, "x.png", owner="bob"))
    this.save(newer, "x.png", owner="ann")
    assert race["done"] and this.path(result_id, owner="ann") is None
    assert keys(blobs, f"{IMAGES}/{result_id}/") == [image_key(result_id, "x.png")], "put back from the copy"
    assert open_store(blobs, tmp_path, "restarted").path(result_id, owner="bob").read_bytes() == image


# --- what the studio's IAM policy allows -----------------------------------------------------------

IAM_ACTIONS = {"PutObject": "s3:PutObject", "GetObject": "s3:GetObject", "DeleteObject": "s3:DeleteObject",
               "ListObjectsV2": "s3:ListBucket"}


@pytest.mark.aws
def test_the_studios_policy_allows_exactly_the_calls_the_store_makes(moto, monkeypatch, tmp_path):
    """Every S3 call of a studio's life on the bucket (start, saves, a quota's deletes, another
    studio's reads and look-ups, a restart) is one `python -m deploy policy studio
    --results-bucket` allows, on that bucket and prefix; and the policy allows no action the
    store does not use."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    calls: list[tuple[str, dict]] = []

    def bucket() -> Bucket:
        made = Bucket(BUCKET, PREFIX, region=REGION)
        made.client.meta.events.register(
            "before-parameter-build.s3", lambda model, params, **_: calls.append((model.name, dict(params))))
        return made

    store = BucketResultStore(bucket(), tmp_path / "one", max_items=1)
    other = BucketResultStore(bucket(), tmp_path / "two")
    first, second = pngs(2)
    result_id = store.save(first, "x.png", owner="ann")
    store.save(first, "x.png", owner="ann")  # saved again: a new marker replaces the old
    assert other.path(result_id, owner="ann").read_bytes() == first and other.path(result_id, owner="bob") is None
    store.save(second, "x.png", owner="ann")  # past ann's quota: her first image goes
    BucketResultStore(bucket(), tmp_path / "three").link(result_id, owner="ann")

    statements = {statement["Sid"]: statement for statement in
                  studio_policy(DeployConfig(results_bucket=BUCKET, results_prefix=PREFIX, region=REGION))["Statement"]}
    objects, listing = statements["StudioResults"], statements["ListStudioResults"]
    used = set()
    for operation, params in calls:
        action = IAM_ACTIONS[operation]  # a KeyError: a call the policy was not written for
        used.add(action)
        assert params["Bucket"] == BUCKET
        if action == "s3:ListBucket":
            assert listing["Resource"] == f"arn:aws:s3:::{BUCKET}"
            assert fnmatch.fnmatchcase(params["Prefix"], listing["Condition"]["StringLike"]["s3:prefix"])
        else:
            assert action in objects["Action"]
            assert fnmatch.fnmatchcase(f"arn:aws:s3:::{BUCKET}/{params['Key']}", objects["Resource"])
    assert used == {*objects["Action"], listing["Action"]}


# --- failures --------------------------------------------------------------------------------------


@pytest.mark.aws
def test_a_missing_bucket_is_a_clear_error_that_names_no_bucket(moto, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    with pytest.raises(BlobError) as refused:
        BucketResultStore(Bucket("no-such-bucket-here", PREFIX, region=REGION), tmp_path / "copies")
    assert "results storage did not answer" in str(refused.value) and "NoSuchBucket" in str(refused.value)
    assert "no-such-bucket-here" not in str(refused.value) and PREFIX not in str(refused.value)


def test_a_bad_prefix_or_bucket_name_is_refused_before_any_call(tmp_path):
    for name, prefix, words in [("ok-bucket", "", "empty"), ("ok-bucket", "a/../b", "segments"),
                                ("ok-bucket", "a//b", "segments"), ("ok-bucket", "a/*", "segments"),
                                ("Bad_Bucket", "a", "bucket name")]:
        with pytest.raises(ValueError, match=words):
            Bucket(name, prefix, client=object())


def test_the_folder_keeps_its_keys_inside(tmp_path):
    folder = Folder(tmp_path / "blobs")
    with pytest.raises(ValueError, match="not a key"):
        folder.put("../outside", b"x")
    assert folder.put("a/b", b"1", only_if_absent=True) and not folder.put("a/b", b"2", only_if_absent=True)
    assert folder.get("a/b") == b"1" and folder.head("a/b").size == 1 and folder.get("a/c") is None


# --- the studio's options -----------------------------------------------------------------------------


def test_the_results_bucket_options_and_their_variables(monkeypatch, tmp_path):
    base = ["--endpoint-url", "http://127.0.0.1:9", "--results-dir", str(tmp_path / "copies")]
    args = parse_args(base)
    assert args.results_bucket is None and args.results_prefix == DEFAULT_RESULTS_PREFIX
    monkeypatch.setenv("STUDIO_RESULTS_BUCKET", "team-results")
    monkeypatch.setenv("STUDIO_RESULTS_PREFIX", "team-a/results")
    monkeypatch.setenv("STUDIO_RESULTS_CACHE_MB", "512")
    args = parse_args(base)
    assert (args.results_bucket, args.results_prefix, args.results_cache_mb) == ("team-results", "team-a/results", 512)
    for bad in (["--results-prefix", "a/../b"], ["--results-prefix", "/"], ["--results-bucket", "No_Such"],
                ["--results-cache-mb", "0"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


@pytest.mark.aws
def test_the_studio_takes_its_keys_from_the_bucket(moto, monkeypatch, tmp_path):
    """What `python -m studio --results-bucket` opens: the store on the bucket, and the visitor
    cookies' and BrowserState's keys from it, the same on every start, on any machine."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    opened = [open_studio_store(parse_args(["--endpoint-url", "http://127.0.0.1:9", "--results-bucket", BUCKET,
                                            "--results-prefix", PREFIX, "--region", REGION,
                                            "--results-dir", str(tmp_path / run)]))
              for run in ("first", "second")]
    (first, visitor, history), (second, visitor_again, history_again) = opened
    assert isinstance(first, BucketResultStore) and first.key == second.key
    assert (visitor, history) == (visitor_again, history_again) and len({visitor, bytes.fromhex(history), first.key}) == 3
    assert not list(tmp_path.glob(".*-key")) and not list(tmp_path.glob(".*-secret")), "nothing beside the folder"


# --- a studio restarted on the bucket -----------------------------------------------------------------

PASSWORDS = {"ann": "ann's long password", "bob": "bob's long password"}
STARTUP_TIMEOUT_S = 300


@contextlib.contextmanager
def answering_endpoint() -> Iterator[str]:
    """A stand-in for the endpoint on 127.0.0.1 that answers InvokeEndpoint as sdserve does, at once
    (tests/test_client_jobs.FakeEndpoint's answers): the results, not the models, are under test."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            values = {tensor["name"]: tensor["data"][0] for tensor in json.loads(body)["inputs"]}
            request = {"model": self.headers["X-Amzn-SageMaker-Target-Model"].removesuffix(".tar.gz"),
                       "gen_args": json.loads(values["gen_args"]), "image": None}
            answer = FakeEndpoint.answer(request)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:  # the model listing and the like: none here
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sign_in(page, url: str, name: str) -> None:
    """Sign in as the sign-in form does; the browser keeps the cookie."""
    answer = page.request.post(f"{url}login", form={"username": name, "password": PASSWORDS[name]})
    assert answer.ok, answer.status


@pytest.mark.studio
@pytest.mark.aws
@pytest.mark.browser
def test_a_restarted_studio_on_the_bucket_opens_the_earlier_results_and_history(moto, monkeypatch, tmp_path, page):
    """A designer makes a result in the page; the studio is stopped and another started on the same
    bucket with an empty results folder and an empty Gradio cache (a Space restarted elsewhere).
    The page, reloaded, shows the history (BrowserState's key, the signing key and the markers all
    came back from the bucket), its image is served, and picking it restores it. Another designer,
    in the same browser (the same stored history), sees none of it and cannot fetch its image."""
    from playwright.sync_api import expect

    from tests.test_browser_studio import generate_at

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    users = tmp_path / "users.txt"
    users.write_text("".join(f"{name}:{hash_password(password)}\n" for name, password in PASSWORDS.items()))
    port = find_free_port()  # the same origin for both: the browser keeps the history per origin

    def studio(run: str, endpoint: str) -> StudioProcess:
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / run / "gradio"))  # each its own, empty cache
        return StudioProcess("--endpoint-url", endpoint, "--users-file", str(users), "--results-bucket", BUCKET,
                             "--results-prefix", PREFIX, "--results-dir", str(tmp_path / run / "results"),
                             port=port, log=tmp_path / f"{run}.log", startup_timeout_s=STARTUP_TIMEOUT_S)

    with answering_endpoint() as endpoint:
        with studio("first", endpoint) as first:
            sign_in(page, first.url, "ann")
            generate_at(page, first.url, "a lighthouse on the bucket", (64, 64), 4242)
            expect(page.locator("#history img")).to_have_count(1)
        assert not (tmp_path / "second").exists()

        started = time.monotonic()
        with studio("second", endpoint) as second:
            answered_in_s = time.monotonic() - started
            sign_in(page, second.url, "ann")  # the first studio's sign-ins went with it
            page.reload()
            thumbnail = page.locator("#history img").first
            expect(thumbnail).to_have_js_property("naturalWidth", 64, timeout=60_000)  # served, and decoded
            restored_in_s = time.monotonic() - started
            print(f"\nrestart to first restore: {restored_in_s:.1f} s (the new studio answered after "
                  f"{answered_in_s:.1f} s)")
            thumbnail.click()
            expect(page.locator("#status")).to_contain_text("Restored into Generate: seed 4242")
            expect(page.locator("#generate-seed input")).to_have_value("4242")
            served = thumbnail.get_attribute("src")
            assert page.request.get(served).ok
            assert not any((tmp_path / "second" / "results").rglob(".owners")), "the folder holds copies only"

            sign_in(page, second.url, "bob")
            assert page.request.get(served).status in (403, 404), "bob may not fetch ann's image"
            page.reload()
            expect(page.locator("#generate-prompt textarea")).to_be_visible(timeout=60_000)
            expect(page.locator("#history img")).to_have_count(0)
