"""The local endpoint's HTTP front on its own (no tritonserver: it answers before needing one),
spoken to over raw sockets: malformed framing, bodies over the 6 MB limit, clients that stall,
forged log lines, concurrent invocations, boto3's view of it all."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import requests

from serving.local_endpoint import MAX_REQUEST_BYTES, EndpointSettings, LocalEndpoint
from serving.local_endpoint.front import MAX_CONNECTIONS, REQUEST_TIMEOUT_S

from .endpoint_support import invoke, runtime_client, wait_for

INVOCATIONS = "/endpoints/sd-studio/invocations"
TIMEOUT = 30  # no socket operation of these tests waits longer


@pytest.fixture
def front():
    """A factory: LocalEndpoint's front, listening on a free port, stopped after the test."""
    started: list[LocalEndpoint] = []

    def listen(**settings) -> LocalEndpoint:
        endpoint = LocalEndpoint(EndpointSettings(port=0, **{"request_timeout_s": 10.0, **settings}))
        started.append(endpoint.listen())
        return endpoint

    yield listen
    for endpoint in started:
        endpoint.stop()


def connect(endpoint: LocalEndpoint) -> socket.socket:
    host, port = endpoint.front.address
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.connect((host, port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our unread bytes in its buffer: what came first stays
            return data
        if not chunk:
            return data
        data += chunk


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole answer on a connection that stays open (its Content-Length says where it ends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed before an answer: {data!r}"
        data += chunk
    status, headers, body = parse(data)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed mid-answer: {data + body!r}"
        body += chunk
    return status, headers, body


def outlast_request_timeout(endpoint: LocalEndpoint) -> None:
    """Return once the front's request timeout has run out for every connection opened (and every
    request begun) before the call: a witness connection that sends half a request is answered
    408 when its own deadline, set later, fires, and the front fires deadlines in their order."""
    with connect(endpoint) as witness:
        witness.sendall(b"GET /ping HTTP/1.1\r\n")
        status, headers, _ = parse(read_until_closed(witness))
    assert status == 408 and error_code(headers) == "RequestTimeoutException"


def error_code(headers: dict[str, str]) -> str:
    return headers["x-amzn-errortype"].split(":")[0]


def send_until_refused(sock: socket.socket, total: int) -> int:
    """Send ``total`` bytes of body, or until the connection fails; how many the kernel took."""
    sent, piece = 0, b"x" * 65536
    while sent < total:
        try:
            sent += sock.send(piece[: total - sent])
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


def request_head(*headers: str, path: str = INVOCATIONS) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "X-Amzn-SageMaker-Target-Model: sd_base.tar.gz",
             *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- malformed framing: 400, and nothing read past it ---------------------------------------------

def test_negative_content_length_is_refused_and_the_body_is_never_read(front):
    endpoint = front()
    head = request_head("Content-Length: -1")
    with connect(endpoint) as sock:
        sock.sendall(head)
        status, headers, body = parse(read_until_closed(sock))  # answered, closed, before any body
        assert status == 400 and error_code(headers) == "ValidationError"
        assert "not valid HTTP/1.1" in json.loads(body)["Message"]
        send_until_refused(sock, 18 * 1024 * 1024)  # the 18 MB body meets a closed connection
    assert endpoint.front.bytes_received == len(head)  # the server read none of it


def test_negative_content_length_with_its_body_sent_at_once_is_answered(front):
    endpoint = front()
    head = request_head("Content-Length: -1")
    with connect(endpoint) as sock:
        sender = threading.Thread(target=lambda: send_until_refused(sock, 18 * 1024 * 1024), daemon=True)
        sock.sendall(head)
        sender.start()
        status, headers, _ = parse(read_until_closed(sock))
        sender.join(TIMEOUT)
    assert status == 400 and error_code(headers) == "ValidationError"
    assert not sender.is_alive()  # the server closed the connection: the sender did not hang
    assert endpoint.front.bytes_received - len(head) <= MAX_REQUEST_BYTES, endpoint.front.bytes_received


@pytest.mark.parametrize("length", ["12abc", "0x10", "1 2", ""])
def test_non_numeric_content_length_is_refused(front, length):
    endpoint = front()
    with connect(endpoint) as sock:
        sock.sendall(request_head(f"Content-Length: {length}") + b"{}")
        status, headers, _ = parse(read_until_closed(sock))
    assert status == 400 and error_code(headers) == "ValidationError"


@pytest.mark.parametrize("chunks", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}\r\n-1\r\n", b"2\r\n{}XX\r\n0\r\n\r\n"])
def test_bad_chunk_framing_is_refused(front, chunks, caplog):
    endpoint = front()
    with caplog.at_level(logging.INFO, logger="serving.local_endpoint.access"), connect(endpoint) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked") + chunks)
        status, headers, _ = parse(read_until_closed(sock))
        assert status == 400 and error_code(headers) == "ValidationError"
        assert wait_for_lines(caplog, "status=400") == 1  # one access line, by whichever layer answered


# --- bodies over invoke_endpoint's 6 MB ---------------------------------------------------------

def test_declared_body_over_the_limit_is_refused_before_any_of_it_is_sent(front):
    endpoint = front()
    head = request_head("Content-Length: 7340032")  # 7 MiB announced, none of it sent yet
    with connect(endpoint) as sock:
        sock.sendall(head)
        status, headers, body = parse(read_until_closed(sock))
        assert status == 400 and error_code(headers) == "ValidationError"
        assert json.loads(body)["Message"].startswith(
            "Request body is 7340032 bytes, over invoke_endpoint's limit of 6291456 bytes")
        assert headers["connection"] == "close"
        send_until_refused(sock, 7340032)
    assert endpoint.front.bytes_received == len(head)


def test_declared_body_over_the_limit_sent_at_once_is_refused_having_read_little(front):
    endpoint = front()
    head = request_head("Content-Length: 18874368")  # 18 MiB, sent right behind the headers
    with connect(endpoint) as sock:
        sender = threading.Thread(target=lambda: send_until_refused(sock, 18874368), daemon=True)
        sock.sendall(head)
        sender.start()
        status, headers, _ = parse(read_until_closed(sock))
        sender.join(TIMEOUT)
    assert status == 400 and error_code(headers) == "ValidationError"
    assert not sender.is_alive()
    assert endpoint.front.bytes_received - len(head) <= MAX_REQUEST_BYTES, endpoint.front.bytes_received


def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(front):
    endpoint = front()
    piece = 1024 * 1024
    with connect(endpoint) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked"))
        for _ in range(MAX_REQUEST_BYTES // piece):
            sock.sendall(b"%x\r\n" % piece + b"x" * piece + b"\r\n")
        sock.sendall(b"1\r\nx\r\n")  # one byte over; no last chunk: the server must not wait for it
        status, headers, body = parse(read_until_closed(sock))
        assert status == 400 and error_code(headers) == "ValidationError"
        assert "over invoke_endpoint's limit of 6291456 bytes" in json.loads(body)["Message"]
        read = endpoint.front.bytes_received
        send_until_refused(sock, 18 * 1024 * 1024)
    assert endpoint.front.bytes_received == read  # nothing after the refusal


def test_body_of_exactly_the_limit_is_read_and_reaches_the_endpoint(front):
    endpoint = front()  # not ready: the endpoint's own answer (503) proves the body was accepted
    with connect(endpoint) as sock:
        sock.sendall(request_head(f"Content-Length: {MAX_REQUEST_BYTES}", "Connection: close")
                     + b"x" * MAX_REQUEST_BYTES)
        status, headers, _ = parse(read_until_closed(sock))
    assert status == 503 and error_code(headers) == "ServiceUnavailable"


def test_boto3_gets_validation_errors_for_oversized_bodies_and_its_pool_stays_usable(front):
    endpoint = front()
    runtime = runtime_client(endpoint.url)
    for size in (MAX_REQUEST_BYTES + 1, 18 * 1024 * 1024):
        with pytest.raises(runtime.exceptions.ValidationError, match="over invoke_endpoint's limit of 6291456"):
            invoke(runtime, "sd_base.tar.gz", b"x" * size)
    with pytest.raises(runtime.exceptions.ServiceUnavailable, match="still starting"):
        invoke(runtime, "sd_base.tar.gz")


# --- clients that stall ------------------------------------------------------------------------------

def test_a_stalled_request_is_cut_within_30_s_by_default():
    # The default (checked here) is under 30 s; the cut itself is timed in the test below, with a
    # short timeout, so that no test waits out the default.
    assert REQUEST_TIMEOUT_S < 30
    assert EndpointSettings().request_timeout_s == REQUEST_TIMEOUT_S
    endpoint = LocalEndpoint(EndpointSettings(port=0)).listen()
    try:
        assert endpoint.front.request_timeout_s == REQUEST_TIMEOUT_S
    finally:
        endpoint.stop()


@pytest.mark.parametrize("sent", [
    b"POST /endpoints/sd-st",  # half a request line
    b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers without their end
    request_head("Content-Length: 100") + b"{\"inputs\": [",  # a body cut short
    request_head("Transfer-Encoding: chunked") + b"10\r\n{\"inputs\":",  # a chunk cut short
])
def test_a_request_that_stalls_is_answered_408_and_closed(front, sent, caplog):
    endpoint = front(request_timeout_s=1.5)
    started = time.monotonic()  # before the connection opens, which starts the front's clock
    with caplog.at_level(logging.INFO, logger="serving.local_endpoint.access"), connect(endpoint) as sock:
        sock.sendall(sent)
        status, headers, body = parse(read_until_closed(sock))
        assert time.monotonic() - started >= 1.5, "answered before the request timeout ran out"
        assert status == 408 and error_code(headers) == "RequestTimeoutException"
        assert "not received completely within 1.5 s" in json.loads(body)["Message"]
        assert wait_for_lines(caplog, "status=408") == 1


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(front):
    endpoint = front(request_timeout_s=1.5)
    with connect(endpoint) as sock:
        assert read_until_closed(sock) == b""


def test_a_body_no_route_reads_is_not_drained(front):
    # GET /ping answers without reading a body; the connection is closed rather than drained.
    endpoint = front()
    with connect(endpoint) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\nxx")
        status, headers, _ = parse(read_until_closed(sock))
    assert status == 503 and headers["connection"] == "close"


def test_keep_alive_serves_several_requests_on_one_connection(front):
    endpoint = front(request_timeout_s=1)
    with connect(endpoint) as sock:
        for index in range(3):
            if index:
                # Idle longer than a request may take: idle between requests is the keep-alive's
                # business, not the request timeout's.
                outlast_request_timeout(endpoint)
            sock.sendall(b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, _ = read_answer(sock)
            assert status == 200 and headers.get("connection") != "close"
    assert endpoint.requests_total == 3  # all on the one connection (the witnesses' reached no route)


# --- the access log cannot be forged ------------------------------------------------------------------

def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "serving.local_endpoint.access"]


def wait_for_lines(caplog, needle: str, timeout: float = 10) -> int:
    """How many access lines hold ``needle``, once there is one (or after ``timeout``: 0)."""
    return wait_for(lambda: sum(needle in line for line in access_lines(caplog)), timeout=timeout, interval=0.05)


@pytest.mark.parametrize("raw", [
    # Percent-encoded line breaks and other line separators in the /models/<TargetModel> path.
    b"GET /models/x%0d%0aFAKE%20GET%20/ping%20status=200 HTTP/1.1\r\nHost: h\r\n",
    b"GET /models/x%0dFAKE%0b%0c%1c%1d%1e%c2%85%e2%80%a8%1b[31m HTTP/1.1\r\nHost: h\r\n",
    # Line breaks and control bytes in the TargetModel header (a bare CR/LF ends a header: h11 400).
    request_head().replace(b"sd_base.tar.gz", b"a\r\nFAKE status=200").rstrip(b"\r\n") + b"\r\n",
    request_head().replace(b"sd_base.tar.gz", b"a\rFAKE status=200").rstrip(b"\r\n") + b"\r\n",
    request_head().replace(b"sd_base.tar.gz", b"a\x1cFAKE\x85FAKE\x1b[31m\x7f").rstrip(b"\r\n") + b"\r\n",
])
def test_control_characters_cannot_forge_an_access_line(front, caplog, raw):
    endpoint = front()
    with caplog.at_level(logging.INFO, logger="serving.local_endpoint.access"), connect(endpoint) as sock:
        sock.sendall(raw + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
        status, _, _ = parse(read_until_closed(sock))
        assert status in (400, 404, 503)
        assert wait_for_lines(caplog, f"status={status}") == 1
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    assert len(lines[0].splitlines()) == 1 and lines[0].isprintable(), lines
    assert not lines[0].startswith("FAKE")


def test_escaped_values_are_still_readable(front, caplog):
    endpoint = front()
    with caplog.at_level(logging.INFO, logger="serving.local_endpoint.access"):
        requests.get(endpoint.url + "/models/a%0D%1Bb", timeout=TIMEOUT)
    [line] = access_lines(caplog)
    assert line.startswith("GET /models/a%0D%1Bb model=a\\r\\x1bb status=404 ")


# --- concurrency, errors, ports --------------------------------------------------------------------

def test_twenty_invocations_run_at_once(front):
    endpoint = front()
    calls = 20
    together = threading.Barrier(calls, timeout=TIMEOUT)  # breaks unless all 20 are in at once

    def invoke_all_at_once(name, headers, body):
        together.wait()
        return 200, {"Content-Type": "application/json"}, body, headers["x-amzn-sagemaker-target-model"]

    endpoint.invoke = invoke_all_at_once
    answers: list = [None] * calls

    def call(index: int) -> None:
        answers[index] = requests.post(endpoint.url + INVOCATIONS, data=b'{"i": %d}' % index, timeout=TIMEOUT,
                                       headers={"X-Amzn-SageMaker-Target-Model": "sd_base.tar.gz"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + 5)
    assert [a.status_code for a in answers] == [200] * calls
    assert [a.json()["i"] for a in answers] == list(range(calls))


def test_connections_past_the_cap_get_a_quick_503_and_the_front_recovers(front):
    cap = 4
    endpoint = front(max_connections=cap)
    inside, release = threading.Semaphore(0), threading.Event()

    def held_invoke(name, headers, body):
        inside.release()
        release.wait(TIMEOUT)  # held until the refusal below has been answered
        return 200, {"Content-Type": "application/json"}, body, "sd_base.tar.gz"

    endpoint.invoke = held_invoke
    request = (f"POST {INVOCATIONS} HTTP/1.1\r\nHost: h\r\nX-Amzn-SageMaker-Target-Model: sd_base.tar.gz\r\n"
               f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()
    held = [connect(endpoint) for _ in range(cap)]
    try:
        for sock in held:
            sock.sendall(request)
        for _ in range(cap):
            assert inside.acquire(timeout=TIMEOUT), "the calls under the cap all run"
        with connect(endpoint) as extra:
            # Headers only: a route that read the body would wait for it until the request timeout
            # (then 408); the refusal comes first, while every call under the cap is still held.
            extra.sendall(request.replace(b"Content-Length: 2", b"Content-Length: 100000")[:-2])
            status, headers, body = parse(read_until_closed(extra))
        assert not release.is_set()
        assert status == 503 and error_code(headers) == "ServiceUnavailable"
        assert headers["connection"] == "close"
        message = json.loads(body)["Message"]
        assert f"its limit of {cap} connections open (--max-connections)" in message
    finally:
        release.set()
        answers = [parse(read_until_closed(sock)) for sock in held]
        for sock in held:
            sock.close()
    assert [status for status, _, _ in answers] == [200] * cap
    # Each held connection was closed by the front before its client read the end of it, so the
    # slots are free again: a new connection is served.
    with connect(endpoint) as after:
        after.sendall(request)
        status, _, body = parse(read_until_closed(after))
    assert (status, body) == (200, b"{}")


def test_the_connection_cap_is_a_flag_of_at_least_one(capsys):
    from serving.local_endpoint.__main__ import build_parser, main

    assert build_parser().parse_args([]).max_connections == MAX_CONNECTIONS
    assert build_parser().parse_args(["--max-connections", "16"]).max_connections == 16
    assert main(["--max-connections", "0"]) == 2  # refused before anything starts
    assert "--max-connections: at least 1; got 0." in capsys.readouterr().err


def test_the_request_timeout_does_not_cut_a_slow_answer(front):
    endpoint = front(request_timeout_s=1)
    arrived, release = threading.Event(), threading.Event()

    def slow_invoke(name, headers, body):
        arrived.set()
        assert release.wait(TIMEOUT), "never released"
        return 200, {"Content-Type": "application/json"}, body, "sd_base.tar.gz"

    endpoint.invoke = slow_invoke
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(requests.post(
        endpoint.url + INVOCATIONS, data=b"{}", timeout=TIMEOUT,
        headers={"X-Amzn-SageMaker-Target-Model": "sd_base.tar.gz"})))
    caller.start()
    try:
        assert arrived.wait(TIMEOUT), "the call never reached the endpoint"
        outlast_request_timeout(endpoint)  # the request is in: only its reception is timed
    finally:
        release.set()
        caller.join(TIMEOUT)
    [answer] = answers
    assert answer.status_code == 200 and answer.content == b"{}"
    assert answer.headers["Content-Type"] == "application/json"


def test_unknown_routes_and_methods_are_unknown_operations(front):
    endpoint = front()
    for method, path in (("GET", INVOCATIONS), ("DELETE", "/models"), ("GET", "/nothing"), ("PUT", "/ping")):
        answer = requests.request(method, endpoint.url + path, timeout=TIMEOUT)
        assert answer.status_code == 404, (method, path)
        assert error_code({k.lower(): v for k, v in answer.headers.items()}) == "UnknownOperationException"
        assert f"No route for {method} {path}" in answer.json()["Message"]


def test_ping_and_listing_answer_while_starting(front):
    endpoint = front()
    ping = requests.get(endpoint.url + "/ping", timeout=TIMEOUT)
    assert ping.status_code == 503 and ping.json() == {"status": "Starting"}
    assert ping.headers["Server"] == "sd-studio-local-endpoint" and ping.headers["x-amzn-RequestId"]
    assert requests.get(endpoint.url + "/models", timeout=TIMEOUT).json()["models"] == []


def test_a_taken_port_is_an_os_error(front):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            LocalEndpoint(EndpointSettings(port=port)).listen()


def test_stop_closes_idle_keep_alive_connections_at_once(front, monkeypatch):
    # Answers in progress get a grace far longer than the read below may wait (TIMEOUT): the
    # connection is closed in time only if stop() closes an idle one at once, not after the grace.
    monkeypatch.setattr("serving.local_endpoint.front.SHUTDOWN_GRACE_S", 10 * TIMEOUT)
    endpoint = front()
    with connect(endpoint) as sock:
        sock.sendall(b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_answer(sock)[0] == 200
        stopping = threading.Thread(target=endpoint.stop, daemon=True)
        stopping.start()
        assert read_until_closed(sock) == b""
    stopping.join(TIMEOUT)
    assert not stopping.is_alive()
