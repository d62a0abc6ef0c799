"""Tests for rudderlite, over real sockets and real files, in the order of the module.

Most tests run a server in a background thread (``rudderlite.running``) on port 0; the tests of crashes,
signals and resource limits run ``python rudderlite.py`` as a real process and wait for its listening line.
"""

import base64
import glob
import gzip
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import rudderlite

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "test-write-key"
OTHER_KEY = "other-write-key"
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
RECEIVED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# -- helpers -------------------------------------------------------------------------------------------------


def basic_auth(write_key=KEY, password=""):
    return "Basic " + base64.b64encode(f"{write_key}:{password}".encode()).decode()


class Reply:
    def __init__(self, response):
        self.status = response.status
        self.body = response.read()
        self.text = self.body.decode("utf-8", "replace")
        self.headers = response.headers

    def json(self):
        return json.loads(self.body)


def send(url, method, path, body=b"", headers=None, key=KEY, connection=None):
    """One request; ``key=None`` sends no Authorization. Pass ``connection`` to reuse a keep-alive one."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    all_headers = {"Authorization": basic_auth(key)} if key is not None else {}
    all_headers.update(headers or {})
    own = connection is None
    if own:
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=30)
    try:
        connection.request(method, path, body=body if body or method == "POST" else None, headers=all_headers)
        return Reply(connection.getresponse())
    finally:
        if own:
            connection.close()


def post(url, path, body, **kwargs):
    return send(url, "POST", path, body, **kwargs)


def stored_events(data_dir):
    """Every event in the files, oldest first; every line must be whole JSON."""
    events = []
    for path in sorted(glob.glob(os.path.join(data_dir, "events*.jsonl"))):
        with open(path, "rb") as file:
            content = file.read()
        assert not content or content.endswith(b"\n"), f"{path} ends in a torn line"
        events += [json.loads(line) for line in content.splitlines()]
    return events


def track(user_id="u1", event="Order Completed", **fields):
    return {"userId": user_id, "event": event, **fields}


def batch_of(*events, **top_level):
    return {"batch": [{"type": "track", **event} for event in events], **top_level}


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def server(data_dir):
    with rudderlite.running(port=0, data_dir=data_dir, quiet=True) as running_server:
        yield running_server


@pytest.fixture
def make_server(tmp_path):
    """Start servers with any settings; all are stopped after the test."""
    servers = []

    def start(**settings):
        settings.setdefault("data_dir", str(tmp_path / f"data{len(servers)}"))
        server = rudderlite.make_server(rudderlite.Config(port=0, quiet=True, **settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class Process:
    """``python rudderlite.py`` as a real process; ready once it printed its listening line."""

    def __init__(self, data_dir, *options, preexec_fn=None):
        self.data_dir = data_dir
        self.popen = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "rudderlite.py"), "--port", "0", "--data-dir", data_dir, *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        self.first_line = self.popen.stdout.readline().decode().rstrip("\n")
        self.url = self.first_line.rsplit(" ", 1)[-1]

    def stop(self, signal_number=signal.SIGTERM):
        self.popen.send_signal(signal_number)
        _out, err = self.popen.communicate(timeout=30)
        self.stderr = err.decode()
        return self.popen.returncode


@pytest.fixture
def processes(data_dir):
    started = []

    def start(*options, **kwargs):
        process = Process(data_dir, *options, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.communicate()


# -- 1. command line ------------------------------------------------------------------------------------------


def test_listening_line_first_then_sigterm_exits_zero(processes):
    process = processes()
    assert re.fullmatch(r"rudderlite listening on http://127\.0\.0\.1:\d+", process.first_line)
    assert process.url.rsplit(":", 1)[1] != "0"
    assert post(process.url, "/v1/track", track()).status == 200
    assert process.stop(signal.SIGTERM) == 0
    assert len(stored_events(process.data_dir)) == 1


def test_sigint_also_exits_zero(processes):
    process = processes()
    assert process.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("options", [["--port", "nope"], ["--fsync", "sometimes"], ["--max-event-bytes", "0"],
                                     ["--port", "70000"], ["--no-such-option"]])
def test_bad_option_is_one_line_and_exit_2(options):
    result = subprocess.run([sys.executable, os.path.join(HERE, "rudderlite.py"), *options],
                            capture_output=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == b""


def test_unusable_data_dir_is_one_line_and_exit_2(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    result = subprocess.run([sys.executable, os.path.join(HERE, "rudderlite.py"), "--port", "0",
                             "--data-dir", str(not_a_directory)], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert "data-dir" in result.stderr.decode()


def test_binds_loopback_by_default():
    assert rudderlite.parse_config([]).host == "127.0.0.1"
    assert rudderlite.parse_config([]) == rudderlite.Config()


def test_write_key_never_in_the_access_log(processes):
    process = processes()
    post(process.url, "/v1/track", track(), key="secret-key-in-header")
    post(process.url, "/beacon/v1/batch?writeKey=secret-key-in-query", batch_of(track()), key=None)
    assert process.stop() == 0
    assert "200 /beacon/v1/batch" in process.stderr
    assert "secret-key" not in process.stderr


def test_quiet_has_no_access_log(processes):
    process = processes("--quiet")
    assert post(process.url, "/v1/track", track()).status == 200
    assert process.stop() == 0
    assert "/v1/track" not in process.stderr


# -- 2. endpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", rudderlite.EVENT_TYPES)
def test_single_event_endpoint_stores_type_from_path(server, data_dir, event_type):
    reply = post(server.url, f"/v1/{event_type}", {**track(), "type": "screen" if event_type != "screen" else "page",
                                                  "previousId": "p", "groupId": "g"})
    assert (reply.status, reply.text) == (200, "ok")
    [stored] = stored_events(data_dir)
    assert stored["type"] == event_type


def test_batch_stores_every_event_and_ignores_other_top_level_keys(server, data_dir):
    body = {"batch": [{"type": "track", **track("a")}, {"type": "identify", "userId": "b"}],
            "sentAt": "2026-11-26T10:00:00Z", "writeKey": "ignored", "timestamp": "x", "context": {"y": 1}}
    assert post(server.url, "/v1/batch", body).status == 200
    stored = stored_events(data_dir)
    assert [(event["type"], event["userId"]) for event in stored] == [("track", "a"), ("identify", "b")]
    assert all("writeKey" not in event and "sentAt" not in event for event in stored)


def test_beacon_takes_the_write_key_from_the_query(server, data_dir):
    reply = post(server.url, f"/beacon/v1/batch?writeKey={KEY}", batch_of(track()), key=None,
                 headers={"Content-Type": "text/plain"})
    assert reply.status == 200
    assert len(stored_events(data_dir)) == 1
    assert len(server.received(KEY)) == 1


def test_beacon_without_key_is_401_from_query(server, data_dir):
    reply = post(server.url, "/beacon/v1/batch", batch_of(track()), key=KEY)
    assert (reply.status, reply.text) == (401, "failed to read writekey from query params")
    assert stored_events(data_dir) == []


def test_preflight_answers_204_before_auth_echoing_what_was_asked(server):
    reply = send(server.url, "OPTIONS", "/v1/track", key=None, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "anonymousid,authorization,content-type,sentat,rsa-retry-attempt",
        "Access-Control-Request-Private-Network": "true"})
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert reply.headers["Access-Control-Allow-Credentials"] == "true"
    assert reply.headers["Access-Control-Allow-Headers"] == \
        "anonymousid,authorization,content-type,sentat,rsa-retry-attempt"
    assert reply.headers["Access-Control-Max-Age"] == "900"
    assert reply.headers["Access-Control-Allow-Private-Network"] == "true"


def test_preflight_on_any_path(server):
    assert send(server.url, "OPTIONS", "/not/a/route", key=None).status == 204


def test_cors_headers_on_errors_too(server):
    reply = post(server.url, "/v1/track", track(), key=None, headers={"Origin": "http://app.example"})
    assert reply.status == 401
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"


def test_no_cors_headers_without_origin(server):
    assert "Access-Control-Allow-Origin" not in post(server.url, "/v1/track", track()).headers


@pytest.mark.parametrize("origin", [b"http://a\r\n X-Injected: yes", b"http://a\x0bX-Injected: yes",
                                    b"http://a\rX-Injected: yes"])
def test_origin_cannot_inject_headers(server, origin):
    with raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\nOrigin: " + origin + b"\r\n\r\n") as sock:
        answer, _body = read_answer(sock)
    assert b"\nX-Injected" not in answer and b"\rX-Injected" not in answer
    assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400"))  # folded lines are refused (RFC 9112 §5.2)


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health(server, path):
    reply = send(server.url, "GET", path, key=None)
    assert reply.status == 200
    assert reply.json()["server"] == "UP"


def test_version(server):
    reply = send(server.url, "GET", "/version", key=None)
    assert reply.json()["version"] == rudderlite.__version__


@pytest.mark.parametrize("path", ["/sourceConfig", "/sourceConfig/?p=npm&v=3.34.1&build=modern&writeKey=" + KEY])
def test_source_config_is_what_the_js_sdk_needs(server, path):
    reply = send(server.url, "GET", path, headers={"Origin": "http://page"})
    source = reply.json()["source"]
    assert reply.status == 200
    assert source["id"] and source["config"] == {} and source["destinations"] == [] and source["enabled"] is True
    assert source["writeKey"] == KEY
    assert reply.headers["Access-Control-Allow-Origin"] == "http://page"


def test_source_config_head_has_no_body(server):
    reply = send(server.url, "HEAD", "/sourceConfig/")
    assert reply.status == 200 and reply.body == b""
    assert int(reply.headers["Content-Length"]) > 0


def test_source_config_refuses_unknown_key_when_keys_are_given(make_server):
    server = make_server(write_keys=(KEY,))
    assert send(server.url, "GET", "/sourceConfig/?writeKey=nope", key=None).status == 401
    assert send(server.url, "GET", f"/sourceConfig/?writeKey={KEY}", key=None).status == 200


def test_gzip_body_with_any_content_type(server, data_dir):
    body = gzip.compress(json.dumps(batch_of(track())).encode())
    reply = post(server.url, "/v1/batch", body,
                 headers={"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200
    assert stored_events(data_dir)[0]["event"] == "Order Completed"


def test_chunked_body(server, data_dir):
    connection = http.client.HTTPConnection(server.server_address[0], server.server_port)
    chunks = [b'{"userId": "u1", ', b'"event": "Chunked"}']
    connection.request("POST", "/v1/track", body=iter(chunks), encode_chunked=True,
                       headers={"Authorization": basic_auth(), "Transfer-Encoding": "chunked"})
    assert connection.getresponse().read() == b"ok"
    assert stored_events(data_dir)[0]["event"] == "Chunked"


def raw_exchange(server, head):
    """A raw connection that has sent ``head``: for what http.client will not send."""
    sock = socket.create_connection((server.server_address[0], server.server_port), timeout=30)
    sock.sendall(head)
    return sock


def read_answer(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1)) if b"Content-Length" in head else 0
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[:length]


def test_expect_100_continue_is_answered_before_the_body(server, data_dir):
    body = json.dumps(track()).encode()
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with raw_exchange(server, head) as sock:
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status_head, answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 200") and answer == b"ok"
    assert len(stored_events(data_dir)) == 1


def test_expect_100_continue_too_large_is_refused_without_continue(server):
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            f"Content-Length: {10 ** 9}\r\nExpect: 100-continue\r\n\r\n").encode()
    with raw_exchange(server, head) as sock:
        status_head, answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 413")
    assert answer == b"request size exceeds max limit"


def test_expect_100_continue_unauthorized_is_refused_without_continue(server):
    head = b"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
    with raw_exchange(server, head) as sock:
        status_head, _answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 401")


def test_keep_alive_carries_many_requests_and_errors(server, data_dir):
    connection = http.client.HTTPConnection(server.server_address[0], server.server_port)
    statuses = [post(server.url, "/v1/track", body, connection=connection).status
                for body in [track(), b"{not json", track(), {"event": "no ids"}, track()]]
    assert statuses == [200, 400, 200, 400, 200]
    assert send(server.url, "GET", "/nope", b"x" * 100, connection=connection).status == 404
    assert post(server.url, "/v1/track", track(), connection=connection).status == 200
    assert len(stored_events(data_dir)) == 4


# -- 3. answers, in their order -------------------------------------------------------------------------------


def test_unknown_path_is_404(server):
    reply = post(server.url, "/v1/nope", track())
    assert (reply.status, reply.text) == (404, "404 page not found")
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("method,path", [("GET", "/v1/track"), ("PUT", "/v1/batch"), ("DELETE", "/v1/page"),
                                         ("POST", "/health"), ("GET", "/rudderlite/reset")])
def test_known_path_wrong_method_is_405_before_auth(server, method, path):
    reply = send(server.url, method, path, key=None)
    assert (reply.status, reply.text) == (405, "method not allowed")
    assert "OPTIONS" in reply.headers["Allow"]


@pytest.mark.parametrize("authorization", [None, "Bearer abc", "Basic !!!notbase64", "Basic " + base64.b64encode(
    b"no-colon").decode(), basic_auth(""), "Basic " + base64.b64encode(b"\xff\xfe:").decode()])
def test_missing_or_undecodable_credentials_are_401(server, data_dir, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    reply = post(server.url, "/v1/track", track(), key=None, headers=headers)
    assert (reply.status, reply.text) == (401, "failed to read writekey from header")
    assert stored_events(data_dir) == []


@settings(max_examples=300, deadline=None)
@given(authorization=st.text()
       | st.builds("{} {}".format, st.sampled_from(["Basic", "basic", "BASIC", "Bearer"]), st.text())
       | st.builds(lambda raw: "Basic " + base64.b64encode(raw).decode(), st.binary()))
def test_any_authorization_header_gives_a_key_or_the_401(authorization):
    try:
        assert rudderlite.write_key_from_authorization(authorization)
    except rudderlite.Rejection as rejection:
        assert rejection.answer == rudderlite.NO_WRITE_KEY_IN_HEADER


def test_non_ascii_credentials_are_401_not_a_crash(server):
    headers = {"Authorization": "Basic caf\u00e9".encode("utf-8").decode("latin-1")}
    reply = post(server.url, "/v1/track", track(), key=None, headers=headers)
    assert (reply.status, reply.text) == (401, "failed to read writekey from header")


def test_password_is_ignored(server):
    assert post(server.url, "/v1/track", track(), headers={"Authorization": basic_auth(KEY, "pw")}).status == 200


def test_write_key_allow_list(make_server):
    server = make_server(write_keys=(KEY, OTHER_KEY))
    assert post(server.url, "/v1/track", track(), key=KEY).status == 200
    assert post(server.url, "/v1/track", track(), key=OTHER_KEY).status == 200
    reply = post(server.url, "/v1/track", track(), key=KEY + "x")
    assert (reply.status, reply.text) == (401, "invalid write key")
    reply = post(server.url, f"/beacon/v1/batch?writeKey={KEY}x", batch_of(track()), key=None)
    assert (reply.status, reply.text) == (401, "invalid write key")


def test_write_keys_are_compared_in_constant_time():
    assert rudderlite.write_key_allowed("a", ("a", "b"))
    assert not rudderlite.write_key_allowed("c", ("a", "b"))
    assert rudderlite.write_key_allowed("anything", ())


def test_single_event_over_limit_is_413(make_server):
    server = make_server(max_event_bytes=100)
    body = json.dumps(track(properties={"pad": "x" * 200}))
    reply = post(server.url, "/v1/track", body)
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    assert stored_events(server.config.data_dir) == []


def test_batch_over_limit_is_413(make_server):
    server = make_server(max_batch_bytes=1000)
    reply = post(server.url, "/v1/batch", batch_of(*[track()] * 30))
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")


def test_one_event_of_a_batch_over_the_event_limit_is_413_and_named_in_rejected(make_server):
    server = make_server(max_event_bytes=200)
    body = batch_of(track(), track(properties={"pad": "x" * 300}))
    reply = post(server.url, "/v1/batch", body)
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    [rejected] = send(server.url, "GET", "/rudderlite/rejected").json()["rejected"]
    assert rejected["detail"].startswith("batch[1] is ")
    assert "over --max-event-bytes 200" in rejected["detail"]
    assert stored_events(server.config.data_dir) == []


def test_huge_declared_body_is_refused_without_reading_it(server):
    with raw_exchange(server, (f"POST /v1/batch HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
                               f"Content-Length: {2 * 10 ** 9}\r\n\r\n").encode() + b"{" * 1000) as sock:
        status_head, answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 413") and b"Connection: close" in status_head


def test_endless_chunked_body_is_refused_at_the_limit(make_server):
    server = make_server(max_batch_bytes=10_000)
    with raw_exchange(server, (f"POST /v1/batch HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n").encode()) as sock:
        try:
            for _ in range(100):
                sock.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")
        except OSError:
            pass  # the server stopped reading: that is the point
        status_head, _answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 413")


def test_gzip_bomb_costs_no_more_than_the_limit(server):
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 100_000
    reply = post(server.url, "/v1/batch", bomb, headers={"Content-Encoding": "gzip"})
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")


INVALID_JSON_BODIES = {
    "not json": b"{nope",
    "empty": b"",
    "not utf-8": b'{"userId": "\xff\xfe", "event": "x"}',
    "utf-16": json.dumps(track()).encode("utf-16"),
    "NaN": b'{"userId": "u", "event": "x", "properties": {"v": NaN}}',
    "Infinity": b'{"userId": "u", "event": "x", "properties": {"v": Infinity}}',
    "-Infinity": b'{"userId": "u", "event": "x", "properties": {"v": -Infinity}}',
    "overflowing number": b'{"userId": "u", "event": "x", "properties": {"v": 1e400}}',
    "deep nesting": b'{"userId": "u", "event": "x", "properties": ' + b"[" * 15_000 + b"]" * 15_000 + b"}",
    "trailing garbage": json.dumps(track()).encode() + b"}",
}


@pytest.mark.parametrize("name", INVALID_JSON_BODIES)
def test_invalid_json_is_400(server, data_dir, name):
    for path, body in [("/v1/track", INVALID_JSON_BODIES[name]),
                       ("/v1/batch", INVALID_JSON_BODIES[name].replace(b'{"userId"', b'{"batch": [{"userId"'))]:
        reply = post(server.url, path, body)
        assert (reply.status, reply.text) == (400, "invalid json"), path
    assert stored_events(data_dir) == []


@pytest.mark.parametrize("gzip_body", [b"not gzip at all", gzip.compress(json.dumps(track()).encode())[:-6]])
def test_undecodable_gzip_is_invalid_json(server, gzip_body):
    reply = post(server.url, "/v1/track", gzip_body, headers={"Content-Encoding": "gzip"})
    assert (reply.status, reply.text) == (400, "invalid json")


@pytest.mark.parametrize("body", [{}, {"batch": None}, {"batch": {}}, {"batch": "x"}, {"batch": []}, [track()], "x"])
def test_empty_batch_payload(server, body):
    reply = post(server.url, "/v1/batch", json.dumps(body))
    assert (reply.status, reply.text) == (400, "empty batch payload")


@pytest.mark.parametrize("path,body", [("/v1/batch", {"batch": [1]}), ("/v1/batch", {"batch": [track(), "x"]}),
                                       ("/v1/track", [track()]), ("/v1/track", "x"), ("/v1/identify", None)])
def test_event_that_is_not_an_object(server, data_dir, path, body):
    reply = post(server.url, path, json.dumps(body))
    assert (reply.status, reply.text) == (400, "event is not a valid rudder event")
    assert stored_events(data_dir) == []


@pytest.mark.parametrize("ids", [{}, {"userId": None}, {"userId": None, "anonymousId": None},
                                 {"userId": "", "anonymousId": "  "}, {"userId": " \t\n"}])
def test_event_without_ids(server, data_dir, ids):
    without_ids = {"event": "x", **ids}
    for path, body in [("/v1/track", without_ids), ("/v1/batch", batch_of(track(), without_ids))]:
        reply = post(server.url, path, body)
        assert (reply.status, reply.text) == (400, "request neither has anonymousId nor userId")
    assert stored_events(data_dir) == []


@pytest.mark.parametrize("ids", [{"userId": 0}, {"anonymousId": 12.5}, {"userId": "", "anonymousId": "a"},
                                 {"userId": None, "anonymousId": "a"}])
def test_numbers_and_one_id_are_enough(server, ids):
    assert post(server.url, "/v1/track", {"event": "x", **ids}).status == 200


def test_size_is_checked_before_the_other_400s(make_server):
    server = make_server(max_event_bytes=200)
    body = {"batch": ["not an event", {"type": "track", "event": "x", "properties": {"pad": "x" * 300}}]}
    assert post(server.url, "/v1/batch", body).status == 413


def test_oversized_invalid_json_is_413_not_400(make_server):
    server = make_server(max_event_bytes=100)
    assert post(server.url, "/v1/track", b"{" * 200).status == 413


def test_unauthorized_comes_before_too_large(make_server):
    server = make_server(max_event_bytes=100, write_keys=(KEY,))
    assert post(server.url, "/v1/track", b"x" * 200, key=None).text == "failed to read writekey from header"
    assert post(server.url, "/v1/track", b"x" * 200, key="nope").text == "invalid write key"


@pytest.mark.parametrize("events,message", [
    ([{"event": "no ids"}, "not an event"], "request neither has anonymousId nor userId"),
    (["not an event", {"event": "no ids"}], "event is not a valid rudder event"),
])
def test_first_failing_event_decides(server, events, message):
    assert post(server.url, "/v1/batch", {"batch": events}).text == message


def test_strict_violation_names_field_and_index(make_server):
    server = make_server(strict=True)
    body = batch_of(track(), track(), track(), {"userId": "u", "event": "  "})
    reply = post(server.url, "/v1/batch", body)
    assert (reply.status, reply.text) == (400, 'batch[3].event: track needs a non-empty "event"')
    assert stored_events(server.config.data_dir) == []


def test_nothing_of_a_refused_request_is_stored(server, data_dir):
    body = batch_of(*[track(f"u{i}") for i in range(10)], {"event": "no ids"})
    assert post(server.url, "/v1/batch", body).status == 400
    assert stored_events(data_dir) == [] and server.received(KEY) == []


def test_malformed_request_line_gets_plain_400(server):
    with raw_exchange(server, b"THIS IS NOT HTTP\r\n\r\n") as sock:
        status_head, _answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 400")


def test_oversized_head_is_431(server):
    with raw_exchange(server, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n") as sock:
        status_head, _answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 431")


def test_conflicting_content_length_is_refused(server, data_dir):
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            "Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}{}{}").encode()
    with raw_exchange(server, head) as sock:
        status_head, _answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 400")
    assert stored_events(data_dir) == []


# -- 4. what is stored ----------------------------------------------------------------------------------------


def expected_rudder_id(user_id_text, anonymous_id_text):
    """Independent of the module: MD5 hex, version nibble 4, variant nibble 8-b."""
    digest = bytearray(hashlib.md5(f"{user_id_text}:{anonymous_id_text}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    hex_text = digest.hex()
    return f"{hex_text[:8]}-{hex_text[8:12]}-{hex_text[12:16]}-{hex_text[16:20]}-{hex_text[20:]}"


def test_enrichment(server, data_dir):
    sent = {"userId": " u1 ", "anonymousId": "a1", "event": "x", "properties": {"k": [1, 2.5, None, "é"]}}
    post(server.url, "/v1/track", sent, headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.1"})
    [stored] = stored_events(data_dir)
    assert UUID_TEXT.fullmatch(stored["messageId"])
    assert RECEIVED_AT.fullmatch(stored["receivedAt"])
    assert stored["request_ip"] == "203.0.113.9"
    assert stored["rudderId"] == expected_rudder_id("u1", "a1")
    assert stored["type"] == "track"
    assert {key: stored[key] for key in sent} == sent


def test_request_ip_is_the_peer_without_forwarded_for(server, data_dir):
    post(server.url, "/v1/track", track())
    assert stored_events(data_dir)[0]["request_ip"] == "127.0.0.1"


@pytest.mark.parametrize("ids,text", [({"userId": 42}, "42:"), ({"anonymousId": "a"}, ":a"),
                                      ({"userId": "u", "anonymousId": None}, "u:")])
def test_rudder_id_from_ids(server, data_dir, ids, text):
    post(server.url, "/v1/track", {"event": "x", **ids})
    assert stored_events(data_dir)[0]["rudderId"] == expected_rudder_id(*text.split(":"))


@pytest.mark.parametrize("sent,kept", [("node-next-1732615200000-abc", True), ("  m-1  ", False), ("", False),
                                       ("   ", False), (17, False), (None, False)])
def test_message_id(server, data_dir, sent, kept):
    post(server.url, "/v1/track", track(messageId=sent))
    stored = stored_events(data_dir)[0]["messageId"]
    if kept:
        assert stored == sent
    elif isinstance(sent, str) and sent.strip():
        assert stored == sent.strip()
    else:
        assert UUID_TEXT.fullmatch(stored)


def test_received_at_and_request_ip_sent_by_the_client_are_kept(server, data_dir):
    post(server.url, "/v1/batch", batch_of(track(receivedAt="2020-01-01T00:00:00.000Z", request_ip="1.2.3.4")))
    stored = stored_events(data_dir)[0]
    assert (stored["receivedAt"], stored["request_ip"]) == ("2020-01-01T00:00:00.000Z", "1.2.3.4")


def test_lone_surrogate_is_stored_as_valid_utf8_json(server, data_dir):
    post(server.url, "/v1/track", b'{"userId": "u", "event": "\\ud800 x"}')
    with open(os.path.join(data_dir, "events.jsonl"), "rb") as file:
        line = file.read()
    line.decode("utf-8")  # valid UTF-8, so jq and every reader can take it
    assert json.loads(line)["event"] == "\ud800 x"


def test_rotation_keeps_every_event_once_in_files_that_sort_in_order(make_server):
    server = make_server(rotate_bytes=2000)
    for number in range(60):
        assert post(server.url, "/v1/track", track(event=f"e{number}")).status == 200
    files = sorted(glob.glob(os.path.join(server.config.data_dir, "events*.jsonl")))
    assert len(files) > 5 and files[-1].endswith("events.jsonl")
    assert all(re.fullmatch(r"events-\d{8}T\d{6}\.\d{6}Z\.jsonl", os.path.basename(path)) for path in files[:-1])
    assert all(os.path.getsize(path) <= 2000 for path in files)
    assert [event["event"] for event in stored_events(server.config.data_dir)] == [f"e{n}" for n in range(60)]


def test_request_larger_than_rotate_bytes_goes_alone_into_a_fresh_file(make_server):
    server = make_server(rotate_bytes=1000)
    post(server.url, "/v1/track", track())
    post(server.url, "/v1/batch", batch_of(*[track(f"big{i}") for i in range(20)]))
    post(server.url, "/v1/track", track())
    files = sorted(glob.glob(os.path.join(server.config.data_dir, "events*.jsonl")))
    counts = [len(open(path).read().splitlines()) for path in files]
    assert counts == [1, 20, 1]


def test_torn_last_line_is_cut_at_start_and_whole_lines_kept(processes, data_dir):
    os.makedirs(data_dir)
    whole = json.dumps(track()) + "\n"
    with open(os.path.join(data_dir, "events.jsonl"), "w") as file:
        file.write(whole * 3 + '{"userId": "u", "ev')
    process = processes()
    assert post(process.url, "/v1/track", track()).status == 200
    assert process.stop() == 0
    assert "moved an unfinished last line of 19 bytes" in process.stderr
    assert len(stored_events(data_dir)) == 4


# -- property tests: size limits at the exact byte, and what is stored ---------------------------------------

EVENT_LIMIT = 1024
BATCH_LIMIT = 4096

json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 53), 2 ** 53)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
identifiers = st.text(min_size=1, max_size=20).filter(lambda text: text.strip() == text and text.strip())
valid_events = st.fixed_dictionaries(
    {"userId": identifiers, "event": identifiers},
    optional={"anonymousId": identifiers, "properties": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
              "context": st.fixed_dictionaries({"library": st.fixed_dictionaries({"name": identifiers})}),
              "timestamp": st.just("2026-11-26T10:00:00.123+01:00")})


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    settings_ = dict(max_event_bytes=EVENT_LIMIT, max_batch_bytes=BATCH_LIMIT, port=0, quiet=True,
                     data_dir=str(tmp_path_factory.mktemp("limits")))
    with rudderlite.running(**settings_) as server:
        yield server


def padded_to(body: bytes, size: int) -> bytes:
    """The same JSON with trailing white space up to exactly ``size`` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


def accepted_count(server):
    return len(server.received(KEY))


hypothesis_settings = settings(max_examples=25, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_exact_limit(server, path, at_limit: bytes, over_limit: bytes, gzipped: bool, events: int):
    """The body at the limit is accepted whole; one byte more is 413 and stores nothing."""
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    encode = gzip.compress if gzipped else bytes
    before = accepted_count(server)
    assert post(server.url, path, encode(at_limit), headers=headers).status == 200
    reply = post(server.url, path, encode(over_limit), headers=headers)
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    assert accepted_count(server) == before + events


@hypothesis_settings
@given(event=valid_events, gzipped=st.booleans())
def test_single_event_body_of_exactly_the_limit_is_accepted_one_more_byte_is_413(limits_server, event, gzipped):
    body = json.dumps(event, ensure_ascii=False).encode()
    assume(len(body) < EVENT_LIMIT)
    assert_exact_limit(limits_server, "/v1/track", padded_to(body, EVENT_LIMIT), padded_to(body, EVENT_LIMIT + 1),
                       gzipped, events=1)


@hypothesis_settings
@given(events=st.lists(valid_events, min_size=1, max_size=5), gzipped=st.booleans())
def test_batch_body_of_exactly_the_limit_is_accepted_one_more_byte_is_413(limits_server, events, gzipped):
    body = json.dumps({"batch": [{"type": "track", **event} for event in events]}).encode()
    assume(len(body) < BATCH_LIMIT and all(len(rudderlite.encode_json(e)) < EVENT_LIMIT - 20 for e in events))
    assert_exact_limit(limits_server, "/v1/batch", padded_to(body, BATCH_LIMIT), padded_to(body, BATCH_LIMIT + 1),
                       gzipped, events=len(events))


def event_of_encoded_size(event: dict, size: int) -> dict:
    """The event with a ``pad`` property making its compact JSON exactly ``size`` bytes."""
    padded = {**event, "type": "track", "properties": {**event.get("properties", {}), "pad": ""}}
    missing = size - len(json.dumps(padded, ensure_ascii=False, separators=(",", ":")).encode())
    padded["properties"]["pad"] = "x" * missing
    return padded


@hypothesis_settings
@given(event=valid_events, gzipped=st.booleans())
def test_batch_event_of_exactly_the_event_limit_is_accepted_one_more_byte_is_413(limits_server, event, gzipped):
    assume(len(json.dumps(event, ensure_ascii=False).encode()) < EVENT_LIMIT - 100)
    at_limit = {"batch": [track(), event_of_encoded_size(event, EVENT_LIMIT)]}
    over_limit = {"batch": [track(), event_of_encoded_size(event, EVENT_LIMIT + 1)]}
    assert_exact_limit(limits_server, "/v1/batch", json.dumps(at_limit).encode(), json.dumps(over_limit).encode(),
                       gzipped, events=2)


CLIENT_ANSWERS = {rudderlite.INVALID_JSON, rudderlite.EMPTY_BATCH, rudderlite.NOT_AN_EVENT, rudderlite.NO_IDENTITY,
                  rudderlite.REQUEST_TOO_LARGE}


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | st.builds(lambda value: json.dumps(value).encode(), json_values),
       type_from_path=st.sampled_from([None, *rudderlite.EVENT_TYPES]), strict=st.booleans())
def test_any_body_gives_events_or_one_of_the_contract_answers(body, type_from_path, strict):
    config = rudderlite.Config(strict=strict, max_event_bytes=200)
    try:
        stored = rudderlite.process_body(body, type_from_path, config, "2026-11-26T10:00:00.000Z", "127.0.0.1")
    except rudderlite.Rejection as rejection:
        assert rejection.answer in CLIENT_ANSWERS or (strict and rejection.answer.status == 400)
    else:
        assert all(json.loads(event.line) for event in stored)


@settings(max_examples=200, deadline=None)
@given(compressed=st.binary(max_size=200) | st.builds(gzip.compress, st.binary(max_size=3000)))
def test_any_gzip_body_inflates_within_the_limit_or_is_refused(compressed):
    try:
        assert len(rudderlite.inflate_gzip(compressed, 1000)) <= 1000
    except rudderlite.Rejection as rejection:
        assert rejection.answer in (rudderlite.INVALID_JSON, rudderlite.REQUEST_TOO_LARGE)


@hypothesis_settings
@given(body=st.binary(max_size=600), path=st.sampled_from(["/v1/track", "/v1/batch", "/v1/alias"]),
       gzipped=st.booleans())
def test_any_body_over_the_wire_is_answered_by_the_contract(limits_server, body, path, gzipped):
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    reply = post(limits_server.url, path, body, headers=headers)
    assert (reply.status, reply.text) in {(200, "ok"), *[(answer.status, answer.message) for answer in CLIENT_ANSWERS]}


HTTP_PIECES = [b"POST ", b"GET ", b"/v1/track", b"/v1/batch", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b":",
               b" ", b"Content-Length: 5", b"Expect: 100-continue", b"Transfer-Encoding: chunked", b"0\r\n",
               b"ffffffff", b"\x00", b"\xff", b"Authorization: Basic dGVzdDo=", b"Content-Encoding: gzip", b"{}"]
http_ish_bytes = st.lists(st.sampled_from(HTTP_PIECES)
                          | st.binary(max_size=20), max_size=30).map(b"".join)


@settings(hypothesis_settings, max_examples=100)
@given(sent=http_ish_bytes)
def test_any_bytes_on_a_connection_leave_the_server_answering(limits_server, sent, caplog):
    with socket.create_connection((limits_server.server_address[0], limits_server.server_port), timeout=30) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)  # the end of what this client sends: the server must not wait for more
        while sock.recv(65536):
            pass
    assert send(limits_server.url, "GET", "/health").status == 200
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@hypothesis_settings
@given(event=valid_events, event_type=st.sampled_from(rudderlite.EVENT_TYPES), batched=st.booleans())
def test_what_is_stored_is_what_was_sent_plus_the_enrichment(limits_server, event, event_type, batched):
    message_id = str(uuid.uuid4())
    sent = {**event, "messageId": message_id, "previousId": "p", "groupId": "g"}
    if batched:
        sent["type"] = event_type
    body = json.dumps({"batch": [sent]} if batched else sent).encode()
    assume(len(body) <= EVENT_LIMIT)  # sizes have tests of their own above
    reply = post(limits_server.url, "/v1/batch" if batched else f"/v1/{event_type}", body)
    assert reply.status == 200
    [from_file] = [stored for stored in stored_events(limits_server.config.data_dir)
                   if stored["messageId"] == message_id]
    added = {key: from_file.pop(key) for key in ("receivedAt", "request_ip", "rudderId")}
    assert from_file == {**sent, "type": event_type}
    assert RECEIVED_AT.fullmatch(added["receivedAt"]) and added["request_ip"] == "127.0.0.1"
    assert added["rudderId"] == expected_rudder_id(event["userId"], event.get("anonymousId", ""))


# -- never lose an acknowledged event; never fall over ---------------------------------------------------------


class LoadSenders:
    """Threads sending batches of two events over keep-alive connections until stopped or refused."""

    def __init__(self, url, threads=4, events_per_batch=2):
        self.url = url
        self.events_per_batch = events_per_batch
        self.acknowledged = []  # batch ids answered 200
        self.statuses = []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.send_until_stopped) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def send_until_stopped(self):
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(self.url).netloc, timeout=30)
        while not self.stopping.is_set():
            batch_id = str(uuid.uuid4())
            body = batch_of(*[track(messageId=f"{batch_id}/{n}") for n in range(self.events_per_batch)])
            try:
                reply = post(self.url, "/v1/batch", body, connection=connection)
            except (OSError, http.client.HTTPException):
                return
            with self.changed:
                self.statuses.append(reply.status)
                if reply.status == 200:
                    self.acknowledged.append(batch_id)
                self.changed.notify_all()

    def wait_for(self, count):
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.acknowledged) >= count, timeout=120)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def assert_each_acknowledged_event_stored_once(data_dir, senders):
    counts = {}
    for event in stored_events(data_dir):
        counts[event["messageId"]] = counts.get(event["messageId"], 0) + 1
    assert set(counts.values()) == {1}
    for batch_id in senders.acknowledged:
        assert all(counts.get(f"{batch_id}/{n}") == 1 for n in range(senders.events_per_batch))


def test_sigkill_under_load_keeps_every_acknowledged_event_exactly_once(processes, data_dir):
    process = processes()
    senders = LoadSenders(process.url)
    senders.wait_for(300)
    process.popen.kill()
    senders.stop()
    process.popen.wait()
    assert processes().stop() == 0  # a restart cuts a line a kill may have torn, and touches nothing else
    assert_each_acknowledged_event_stored_once(data_dir, senders)


def test_rotation_under_concurrent_load_keeps_every_event_once_and_requests_whole(make_server):
    server = make_server(rotate_bytes=4096)
    senders = LoadSenders(server.url, threads=6, events_per_batch=3)
    senders.wait_for(300)
    senders.stop()
    assert_each_acknowledged_event_stored_once(server.config.data_dir, senders)
    files = glob.glob(os.path.join(server.config.data_dir, "events*.jsonl"))
    assert len(files) > 10
    for path in files:  # the three events of a request stand together in one file
        ids = [json.loads(line)["messageId"] for line in open(path)]
        for position in range(0, len(ids), 3):
            assert [message_id.split("/")[1] for message_id in ids[position:position + 3]] == ["0", "1", "2"]
            assert len({message_id.split("/")[0] for message_id in ids[position:position + 3]}) == 1


def limit_file_size_to_20_kb():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_failed_write_is_500_leaves_whole_lines_and_recovers(processes, data_dir):
    process = processes(preexec_fn=limit_file_size_to_20_kb)
    acknowledged = []
    for number in range(100):
        reply = post(process.url, "/v1/track", track(event=f"e{number}", properties={"pad": "x" * 700}))
        if reply.status != 200:
            break
        acknowledged.append(f"e{number}")
    assert (reply.status, reply.text) == (500, "failed to store events")
    assert [event["event"] for event in stored_events(data_dir)] == acknowledged  # whole lines, nothing more
    assert post(process.url, "/v1/track", track(event="still refused", properties={"pad": "x" * 700})).status == 500
    resource.prlimit(process.popen.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert post(process.url, "/v1/track", track(event="after")).status == 200
    assert process.stop() == 0
    assert [event["event"] for event in stored_events(data_dir)] == acknowledged + ["after"]
    assert "Traceback" not in process.stderr


def test_slow_headers_are_cut_and_idle_connections_do_not_block_others(make_server):
    server = make_server(head_timeout=1.0)
    address = (server.server_address[0], server.server_port)
    idle = [socket.create_connection(address) for _ in range(300)]
    slowloris = socket.create_connection(address, timeout=30)
    slowloris.sendall(b"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
    try:
        assert post(server.url, "/v1/track", track()).status == 200
        slowloris.sendall(b"b")
        assert slowloris.recv(1024) == b""  # the watchdog closed it once its head took longer than head_timeout
    finally:
        for sock in idle + [slowloris]:
            sock.close()


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(make_server):
    server = make_server(idle_timeout=1.0)
    connection = http.client.HTTPConnection(server.server_address[0], server.server_port, timeout=30)
    assert post(server.url, "/v1/track", track(), connection=connection).status == 200
    assert connection.sock.recv(1024) == b""


def test_connections_over_the_cap_get_503(make_server):
    server = make_server(max_connections=5)
    address = (server.server_address[0], server.server_port)
    held = [socket.create_connection(address) for _ in range(5)]
    try:
        with raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n") as sock:
            status_head, answer = read_answer(sock)
        assert status_head.startswith(b"HTTP/1.1 503") and answer == b"too many connections"
    finally:
        for sock in held:
            sock.close()
    for _attempt in range(1000):  # a freed slot serves again, once the server has seen those clients leave
        with raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n") as sock:
            status_head, _answer = read_answer(sock)
        if not status_head.startswith(b"HTTP/1.1 503"):
            break
    assert status_head.startswith(b"HTTP/1.1 200")


def test_clients_leaving_mid_request_leave_no_traceback(processes, data_dir):
    process = processes()
    address = urllib.parse.urlsplit(process.url).netloc.split(":")
    head = f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\nContent-Length: 1000\r\n\r\n"
    for partial in [head.encode() + b'{"userId"', head.encode(), b"POST /v1/tr", b"GET /health HTTP/1.1\r\nHo"]:
        with socket.create_connection((address[0], int(address[1]))) as sock:
            sock.sendall(partial)
    with socket.create_connection((address[0], int(address[1]))) as sock:  # leaves before reading its answer
        body = json.dumps(track()).encode()
        sock.sendall(head.replace("1000", str(len(body))).encode() + body)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert post(process.url, "/v1/track", track()).status == 200
    assert process.stop() == 0
    assert "Traceback" not in process.stderr and "Exception" not in process.stderr
    assert all(event["userId"] == "u1" for event in stored_events(data_dir))


def test_sigterm_under_load_exits_zero_and_keeps_every_acknowledged_event(processes, data_dir):
    process = processes()
    senders = LoadSenders(process.url)
    senders.wait_for(200)
    assert process.stop(signal.SIGTERM) == 0
    senders.stop()
    assert set(senders.statuses) == {200}
    assert_each_acknowledged_event_stored_once(data_dir, senders)
    assert "Traceback" not in process.stderr


def test_sigterm_lets_a_request_in_flight_finish(processes, data_dir):
    process = processes()
    address = urllib.parse.urlsplit(process.url).netloc.split(":")
    body = json.dumps(track(event="in flight")).encode()
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((address[0], int(address[1])), timeout=30) as sock:
        sock.sendall(head + body[:10])
        assert send(process.url, "GET", "/health").status == 200  # the server has the partial request by now
        process.popen.send_signal(signal.SIGTERM)
        for _attempt in range(1_000_000):  # the signal that it is stopping: new connections are refused
            try:
                socket.create_connection((address[0], int(address[1]))).close()
            except (ConnectionRefusedError, ConnectionResetError):  # reset: it was in the backlog as it closed
                break
        else:
            pytest.fail("the server kept accepting connections after SIGTERM")
        sock.sendall(body[10:])
        status_head, answer = read_answer(sock)
    assert status_head.startswith(b"HTTP/1.1 200") and b"Connection: close" in status_head
    assert process.stop() == 0
    assert [event["event"] for event in stored_events(data_dir)] == ["in flight"]


def test_fsync_always_shares_fsyncs_between_concurrent_requests(tmp_path):
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=2 ** 40, fsync="always")
    start = threading.Barrier(16)

    def append_fifty():
        start.wait()
        for number in range(50):
            store.append(json.dumps(track(event=f"e{number}")).encode() + b"\n")

    writers = [threading.Thread(target=append_fifty) for _ in range(16)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    store.close()
    assert len(stored_events(str(tmp_path))) == 800
    assert 0 < store.fsyncs < 800


@pytest.mark.parametrize("mode", ["always", "interval"])
def test_fsync_modes_store_every_concurrent_request(processes, data_dir, mode):
    process = processes("--fsync", mode)
    senders = LoadSenders(process.url, threads=8)
    senders.wait_for(200)
    senders.stop()
    assert process.stop() == 0
    assert_each_acknowledged_event_stored_once(data_dir, senders)


# -- 5. contract violations: warnings by default, 400 under --strict ------------------------------------------

# (event in a batch, the message, with the event's index prepended in a batch)
VIOLATIONS = [
    ({"userId": "u", "event": "x"}, "type: missing is not one of track, identify, page, screen, group, alias"),
    ({"type": "Track", "userId": "u", "event": "x"},
     'type: "Track" is not one of track, identify, page, screen, group, alias'),
    ({"type": "track", "userId": "u"}, 'event: track needs a non-empty "event"'),
    ({"type": "track", "userId": "u", "event": " "}, 'event: track needs a non-empty "event"'),
    ({"type": "track", "userId": "u", "event": 7}, 'event: track needs a non-empty "event"'),
    ({"type": "alias", "userId": "u"}, 'previousId: alias needs "previousId"'),
    ({"type": "alias", "userId": "u", "previousId": None}, 'previousId: alias needs "previousId"'),
    ({"type": "group", "userId": "u", "groupId": ""}, 'groupId: group needs "groupId"'),
    *[({"type": "identify", "userId": "u", field: value}, f"{field}: must be an object, not {kind}")
      for field in rudderlite.OBJECT_FIELDS for value, kind in [([], "array"), ("x", "string"), (1, "number")]],
    *[({"type": "identify", "userId": "u", field: value}, f"{field}: must be an RFC 3339 date-time like "
                                                          "2026-11-26T10:00:00Z")
      for field in rudderlite.TIMESTAMP_FIELDS
      for value in ["2026-11-26", "2026-11-26 10:00:00", "2026-13-01T00:00:00Z", "yesterday", 1732615200]],
    ({"type": "identify", "userId": "u", "messageId": 5}, "messageId: must be a string, not number"),
    ({"type": "identify", "userId": {"id": 1}}, "userId: must be a string or a number, not object"),
    ({"type": "identify", "userId": "u", "anonymousId": True},
     "anonymousId: must be a string or a number, not boolean"),
]


@pytest.mark.parametrize("event,message", VIOLATIONS)
def test_violation_is_a_warning_by_default(server, data_dir, event, message):
    assert post(server.url, "/v1/batch", {"batch": [{"type": "track", **track()}, event]}).status == 200
    stored = server.received(KEY)
    assert stored[1]["warnings"] == [f"batch[1].{message}"]
    assert "warnings" not in stored[0]
    assert all("warnings" not in event for event in stored_events(data_dir))  # the file holds events only


@pytest.mark.parametrize("event,message", VIOLATIONS)
def test_violation_is_400_under_strict(make_server, event, message):
    server = make_server(strict=True)
    reply = post(server.url, "/v1/batch", {"batch": [{"type": "track", **track()}, event]})
    assert (reply.status, reply.text) == (400, f"batch[1].{message}")
    assert stored_events(server.config.data_dir) == []


def test_single_event_violation_has_no_index_and_type_comes_from_path(make_server):
    server = make_server(strict=True)
    reply = post(server.url, "/v1/alias", {"userId": "u", "type": "whatever"})
    assert (reply.status, reply.text) == (400, 'previousId: alias needs "previousId"')
    assert post(server.url, "/v1/identify", {"userId": "u", "type": "whatever"}).status == 200


@pytest.mark.parametrize("event", [
    {"type": "page", "userId": "", "anonymousId": "a", "properties": None, "context": {}, "integrations": {"All": True},
     "originalTimestamp": "2026-11-26T12:02:23.989368+00:00", "sentAt": "2026-11-26T12:02:23.989Z"},
    {"type": "track", "userId": None, "anonymousId": 7, "event": "e", "timestamp": "2026-11-26t10:00:00.1-05:30"},
    {"type": "group", "userId": "u", "groupId": 12, "traits": {}},
    {"type": "alias", "userId": "u", "previousId": "p", "messageId": "node-next-1-x"},
])
def test_conforming_events_carry_no_warning(make_server, event):
    server = make_server(strict=True)
    assert post(server.url, "/v1/batch", {"batch": [event]}).status == 200
    assert "warnings" not in server.received(KEY)[0]


# -- 6. inspection API ------------------------------------------------------------------------------------------


def inspect(server, query="", key=KEY):
    reply = send(server.url, "GET", "/rudderlite/events" + query, key=key)
    assert reply.status == 200, reply.text
    return reply.json()["events"]


def test_an_event_is_visible_as_soon_as_its_200_arrives(server):
    for number in range(20):
        assert post(server.url, "/v1/track", track(event=f"e{number}")).status == 200
        assert inspect(server)[-1]["event"] == f"e{number}"


def test_filters(server):
    post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m1",
         "properties": {"orderId": 42, "total": 9.5}, "context": {"app": {"name": "web"}}},
        {"type": "track", "userId": "u2", "event": "Order Completed", "properties": {"orderId": "43"}},
        {"type": "identify", "anonymousId": "a1", "context": {"app": {"name": "ios"}}},
        {"type": "page", "userId": "u1", "properties": {"flag": True, "none": None}},
    ]})
    def names(query):
        return [event.get("event") or event["type"] for event in inspect(server, query)]
    assert names("?type=track") == ["Order Completed", "Order Completed"]
    assert names("?event=Order%20Completed&userId=u2") == ["Order Completed"]
    assert names("?userId=u1") == ["Order Completed", "page"]
    assert names("?anonymousId=a1") == ["identify"]
    assert names("?messageId=m1") == ["Order Completed"]
    assert names("?properties.orderId=42") == ["Order Completed"]  # a number compared as text
    assert names("?properties.orderId=43") == ["Order Completed"]
    assert names("?context.app.name=web") == ["Order Completed"]
    assert names("?properties.total=9.5&properties.orderId=42") == ["Order Completed"]
    assert names("?properties.flag=true") == ["page"] and names("?properties.none=null") == ["page"]
    assert names("?context.app.name=android") == [] and names("?properties.orderId.deeper=1") == []
    assert names("?limit=2") == ["identify", "page"]
    assert names("?type=track&limit=1") == ["Order Completed"]


def test_bad_query_is_400(server):
    for query in ["?limit=x", "?wait=nan", "?wait=-1", "?min=-2", "?limit=-1"]:
        reply = send(server.url, "GET", "/rudderlite/events" + query)
        assert (reply.status, reply.text) == (400, "invalid query parameter"), query


def test_each_key_sees_only_its_own(server):
    post(server.url, "/v1/track", track(event="for A"), key="key-a")
    post(server.url, "/v1/track", track(event="for B"), key="key-b")
    post(server.url, "/v1/track", {"event": "refused"}, key="key-b")
    assert [event["event"] for event in inspect(server, key="key-a")] == ["for A"]
    assert [event["event"] for event in inspect(server, key="key-b")] == ["for B"]
    assert send(server.url, "GET", "/rudderlite/rejected", key="key-a").json()["rejected"] == []
    assert len(send(server.url, "GET", "/rudderlite/rejected", key="key-b").json()["rejected"]) == 1
    assert send(server.url, "GET", "/rudderlite/stats", key="key-a").json() == \
        {"accepted": {"track": 1}, "rejected": {}, "valid": 1, "invalid": 0}
    assert post(server.url, "/rudderlite/reset", b"", key="key-a").status == 200
    assert inspect(server, key="key-a") == [] and len(inspect(server, key="key-b")) == 1


def test_inspection_needs_an_allowed_key(make_server):
    server = make_server(write_keys=(KEY,))
    for method, path in [("GET", "/rudderlite/events"), ("GET", "/rudderlite/rejected"),
                         ("GET", "/rudderlite/stats"), ("POST", "/rudderlite/reset")]:
        assert send(server.url, method, path, key=None).text == "failed to read writekey from header"
        assert send(server.url, method, path, key="nope").text == "invalid write key"
        assert send(server.url, method, path).status == 200


def test_long_poll_answers_once_enough_events_match(server):
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(inspect(server, "?event=late&wait=60&min=3")))
    waiter.start()
    for number in range(3):
        post(server.url, "/v1/track", track(event="late" if number != 1 else "other"))
    post(server.url, "/v1/track", track(event="late"))
    waiter.join(30)
    assert not waiter.is_alive(), "the long-poll did not answer when its third event arrived"
    assert len(answers[0]) >= 3 and {event["event"] for event in answers[0]} == {"late"}


def test_long_poll_answers_what_it_has_when_the_time_is_up(server):
    post(server.url, "/v1/track", track(event="only one"))
    assert [event["event"] for event in inspect(server, "?wait=0.3&min=5")] == ["only one"]


def test_rejected_records_status_message_path_time_and_body(server):
    body = json.dumps({"event": "no ids", "pad": "x" * 2000})
    post(server.url, "/v1/track", body)
    [rejected] = send(server.url, "GET", "/rudderlite/rejected").json()["rejected"]
    assert rejected["status"] == 400 and rejected["message"] == "request neither has anonymousId nor userId"
    assert rejected["path"] == "/v1/track" and RECEIVED_AT.fullmatch(rejected["receivedAt"])
    assert rejected["body"] == body[:1024]


def test_stats_and_reset(server):
    post(server.url, "/v1/batch", batch_of(track(), track()))
    post(server.url, "/v1/identify", {"userId": "u"})
    post(server.url, "/v1/track", b"nope")
    post(server.url, "/v1/batch", {"batch": []})
    assert send(server.url, "GET", "/rudderlite/stats").json() == \
        {"accepted": {"track": 2, "identify": 1}, "rejected": {"400": 2}, "valid": 3, "invalid": 0}
    post(server.url, "/rudderlite/reset", b"")
    assert send(server.url, "GET", "/rudderlite/stats").json() == \
        {"accepted": {}, "rejected": {}, "valid": 0, "invalid": 0}
    assert inspect(server) == [] and send(server.url, "GET", "/rudderlite/rejected").json()["rejected"] == []
    assert len(stored_events(server.config.data_dir)) == 3  # the files are untouched


def test_history_is_bounded_to_the_newest_events(make_server):
    server = make_server(history_events=5, history_bytes=10_000)
    for number in range(12):
        post(server.url, "/v1/track", track(event=f"e{number}"))
    assert [event["event"] for event in inspect(server)] == [f"e{n}" for n in range(7, 12)]
    post(server.url, "/v1/batch", batch_of(*[track(properties={"pad": "x" * 3000})] * 4))
    assert len(inspect(server)) == 2  # 4 events of 3 KB (and their overhead) do not fit in 10,000 bytes
    assert len(stored_events(server.config.data_dir)) == 16


# -- embedding: the pytest fixture of the README -----------------------------------------------------------------


@pytest.fixture
def rudderstack(tmp_path):
    """The README's fixture, as a user would paste it."""
    with rudderlite.running(port=0, data_dir=str(tmp_path / "events")) as server:
        yield server


def test_readme_fixture_as_a_user_writes_it(rudderstack):
    import urllib.request
    request = urllib.request.Request(rudderstack.url + "/v1/track", method="POST",
                                     data=json.dumps({"userId": "ada", "event": "Signed Up"}).encode(),
                                     headers={"Authorization": basic_auth("test-key")})
    with urllib.request.urlopen(request) as answer:
        assert answer.read() == b"ok"
    [event] = rudderstack.received("test-key", event="Signed Up")
    assert event["userId"] == "ada"


def test_stopping_a_server_answers_a_pending_long_poll(tmp_path):
    answers = []
    with rudderlite.running(port=0, data_dir=str(tmp_path), quiet=True) as server:
        waiter = threading.Thread(target=lambda: answers.append(inspect(server, "?wait=60&min=1")))
        waiter.start()
        while not len(server.connections):  # no other signal tells that the long-poll has arrived
            threading.Event().wait(0.01)
    waiter.join(30)
    assert answers == [[]]


# -- real SDKs: the bytes and headers each one sends (SDK_NOTES.md), stdlib only --------------------------------

SDK_TIME = "2026-11-26T12:02:23.989Z"


@pytest.fixture
def strict_server(make_server):
    """Strict, so that any contract warning a real SDK's event would carry fails the test."""
    return make_server(strict=True)


def assert_stored_as_sent(server, sent_events):
    stored = server.received(KEY)
    assert len(stored) == len(sent_events)
    for sent, kept in zip(sent_events, stored):
        assert "warnings" not in kept
        assert {key: kept[key] for key in sent if key != "type"} == {k: v for k, v in sent.items() if k != "type"}
    return stored


def test_sdk_rudder_sdk_python(strict_server):
    """rudder-sdk-python 2.1.9: /v1/batch only, gzip, explicit null ids, context.traits on identify."""
    library = {"name": "analytics-python", "version": "2.1.9"}
    events = [
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:23.989368+00:00",
         "context": {"library": library, "traits": {"email": "ada@example.com"}}, "type": "identify",
         "userId": "ada", "messageId": str(uuid.uuid4()), "channel": "server"},
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:24.001204+00:00",
         "context": {"library": library}, "type": "track", "userId": "ada", "event": "Signed Up",
         "properties": {"plan": "pro", "seats": 3}, "messageId": str(uuid.uuid4()), "channel": "server"},
    ]
    body = gzip.compress(json.dumps({"batch": events, "sentAt": "2026-11-26T12:02:24.5+00:00"}).encode())
    reply = post(strict_server.url, "/v1/batch", body, headers={
        "Content-Type": "application/json", "User-Agent": "analytics-python/2.1.9", "Content-Encoding": "gzip"})
    assert (reply.status, reply.text) == (200, "ok")  # this SDK counts only status 200 as success
    assert_stored_as_sent(strict_server, events)


def test_sdk_segment_analytics_python(strict_server):
    """segment-analytics-python 2.4.0: /v1/batch, no gzip, writeKey in the body, root traits on identify."""
    library = {"name": "analytics-python", "version": "2.4.0"}
    events = [
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:26.341+00:00",
         "context": {"library": library}, "type": "identify", "userId": "ada", "traits": {"name": "Ada"},
         "messageId": str(uuid.uuid4())},
        {"integrations": {}, "anonymousId": "anon-1", "timestamp": "2026-11-26T12:02:26.342+00:00",
         "context": {"library": library}, "type": "group", "userId": None, "groupId": "g-1", "traits": {}},
    ]
    body = json.dumps({"batch": events, "sentAt": "2026-11-26T12:02:26.400+00:00", "writeKey": KEY})
    reply = post(strict_server.url, "/v1/batch", body, headers={
        "Content-Type": "application/json", "User-Agent": "analytics-python/2.4.0", "X-Retry-Count": "0"})
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_rudder_sdk_node(strict_server):
    """@rudderstack/rudder-sdk-node 3.0.13: gzip labelled as a form, timestamp and sentAt at the top level."""
    meta = {"nodeVersion": "20.20.2"}
    library = {"name": "analytics-node", "version": "3.0.13"}
    events = [
        {"traits": {"name": "Ada"}, "userId": "ada", "type": "identify",
         "context": {"library": library, "traits": {"name": "Ada"}}, "_metadata": meta,
         "originalTimestamp": SDK_TIME, "sentAt": SDK_TIME, "messageId": str(uuid.uuid4()), "channel": "server"},
        {"event": "Signed Up", "properties": {"plan": "pro"}, "anonymousId": "anon-1", "type": "track",
         "context": {"library": library}, "_metadata": meta, "originalTimestamp": SDK_TIME, "sentAt": SDK_TIME,
         "messageId": str(uuid.uuid4()), "channel": "server"},
        {"previousId": "anon-1", "userId": "ada", "type": "alias", "context": {"library": library},
         "_metadata": meta, "originalTimestamp": SDK_TIME, "sentAt": SDK_TIME, "messageId": str(uuid.uuid4()),
         "channel": "server"},
    ]
    body = json.dumps({"batch": events, "timestamp": SDK_TIME, "sentAt": SDK_TIME}, separators=(",", ":"))
    reply = post(strict_server.url, "/v1/batch", gzip.compress(body.encode()), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip",
        "user-agent": "analytics-node/3.0.13", "Accept": "application/json, text/plain, */*"})
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_segment_analytics_node(strict_server):
    """@segment/analytics-node 3.1.0: messageIds that are not UUIDs, kept exactly as sent."""
    events = [{"type": "track", "event": "Signed Up", "userId": "ada", "properties": {"plan": "pro"},
               "context": {"library": {"name": "@segment/analytics-node", "version": "3.1.0"}},
               "integrations": {}, "_metadata": {"nodeVersion": "20.20.2", "jsRuntime": "node"},
               "timestamp": SDK_TIME, "messageId": f"node-next-1732615343989-{uuid.uuid4()}"}]
    body = json.dumps({"batch": events, "writeKey": KEY, "sentAt": SDK_TIME}, separators=(",", ":"))
    reply = post(strict_server.url, "/v1/batch", body, headers={
        "Content-Type": "application/json", "User-Agent": "analytics-node-next/latest"})
    assert reply.status == 200
    [stored] = assert_stored_as_sent(strict_server, events)
    assert stored["messageId"].startswith("node-next-")


def browser_event(event_type, anonymous_id="c1b7e4a8-0f5e-4c57-9a51-0d2cf5f2b3a1", **fields):
    """What @rudderstack/analytics-js v3 builds before identify: userId "" beside the anonymousId."""
    app = {"name": "RudderLabs JavaScript SDK", "namespace": "com.rudderlabs.javascript", "version": "3.34.1",
           "installType": "npm"}
    return {"channel": "web", "context": {"app": app,
                                          "library": {"name": "RudderLabs JavaScript SDK", "version": "3.34.1"},
                                          "userAgent": "Mozilla/5.0", "locale": "en-US", "traits": {}},
            "type": event_type, "messageId": str(uuid.uuid4()), "originalTimestamp": SDK_TIME,
            "integrations": {"All": True}, "userId": "", "anonymousId": anonymous_id, "properties": {},
            "sentAt": SDK_TIME, **fields}


def browser_headers(event):
    return {"Origin": "http://127.0.0.1:5173", "Content-Type": "application/json;charset=UTF-8",
            "Accept": "application/json", "SentAt": SDK_TIME,
            "AnonymousId": base64.b64encode(event["anonymousId"].encode()).decode()}


def test_sdk_analytics_js_loads_its_config_then_sends_each_event(strict_server):
    """@rudderstack/analytics-js 3.34.1, default XHR queue: config, preflights, then POST /v1/<type>."""
    server, origin = strict_server, "http://127.0.0.1:5173"
    config_path = f"/sourceConfig/?p=npm&v=3.34.1&build=modern&writeKey={KEY}&lockIntegrationsVersion=true" \
                  "&lockPluginsVersion=true"
    preflight = send(server.url, "OPTIONS", config_path, key=None, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Headers"] == "authorization"
    config = send(server.url, "GET", config_path, headers={"Origin": origin, "Accept": "application/json"})
    assert config.status == 200 and config.headers["Access-Control-Allow-Origin"] == origin
    source = config.json()["source"]
    assert source["id"] and source["config"] == {} and source["enabled"] is True
    assert not source.get("destinations") and "statsCollection" not in json.dumps(config.json())
    page_properties = {"path": "/", "url": "http://127.0.0.1:5173/", "title": "Shop", "referrer": "$direct",
                       "search": "", "tab_url": "http://127.0.0.1:5173/"}
    events = [browser_event("page", properties=page_properties, name="Home"),
              browser_event("track", event="Added to Cart"),
              browser_event("identify", userId="ada", context={"traits": {"email": "ada@example.com"}}),
              browser_event("group", userId="ada", groupId="g-1", traits={}),
              browser_event("alias", userId="ada", previousId="c1b7e4a8-0f5e-4c57-9a51-0d2cf5f2b3a1")]
    for event in events:
        path = f"/v1/{event['type']}"
        preflight = send(server.url, "OPTIONS", path, key=None, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "anonymousid,authorization,content-type,sentat"})
        assert preflight.headers["Access-Control-Allow-Headers"] == "anonymousid,authorization,content-type,sentat"
        reply = post(server.url, path, json.dumps(event), headers=browser_headers(event))
        assert reply.status == 200, reply.text
        assert reply.headers["Access-Control-Allow-Origin"] == origin
    assert_stored_as_sent(server, events)


def test_sdk_analytics_js_batch_mode(strict_server):
    events = [browser_event("track", event=f"Step {n}") for n in range(3)]
    reply = post(strict_server.url, "/v1/batch", json.dumps({"batch": events, "sentAt": SDK_TIME}),
                 headers=browser_headers(events[0]))
    assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:5173"
    assert_stored_as_sent(strict_server, events)


def test_sdk_analytics_js_beacon_mode(strict_server):
    """sendBeacon: text/plain, the key in the query only, cookies, no preflight."""
    events = [browser_event("track", event="Left Page"), browser_event("page", name="Bye")]
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://127.0.0.1:5173",
               "Sec-Fetch-Mode": "no-cors", "Cookie": "rl_anonymous_id=RS_ENC_v3_abc; rl_session=x"}
    body = json.dumps({"batch": events, "sentAt": SDK_TIME})
    reply = post(strict_server.url, f"/beacon/v1/batch?writeKey={KEY}", body, key=None, headers=headers)
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_node_oversized_event_is_413_and_rejected_names_it(make_server):
    """rudder-sdk-node sends an event over 32 KB anyway; the whole batch is refused, and rejected says why."""
    server = make_server()
    events = [{"type": "track", "event": "small", "anonymousId": "a"},
              {"type": "track", "event": "huge", "anonymousId": "a", "properties": {"blob": "x" * 40_000}}]
    body = gzip.compress(json.dumps({"batch": events, "sentAt": SDK_TIME}).encode())
    reply = post(server.url, "/v1/batch", body, headers={"Content-Encoding": "gzip",
                                                         "Content-Type": "application/x-www-form-urlencoded"})
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    [rejected] = send(server.url, "GET", "/rudderlite/rejected").json()["rejected"]
    assert re.fullmatch(r"batch\[1\] is \d+ bytes as compact JSON, over --max-event-bytes 32768", rejected["detail"])
    assert rejected["body"].startswith('{"batch"')


# -- the README's recipes, run as written ---------------------------------------------------------------------


def readme_recipe(name):
    """The fenced block that follows ``<!-- recipe: NAME -->`` in README.md."""
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    block = readme.split(f"<!-- recipe: {name} -->\n", 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_github_actions_step_runs_as_written(tmp_path):
    step = readme_recipe("github-actions")
    script = step.split("run: |\n", 1)[1]
    script = "\n".join(line[4:] for line in script.splitlines())
    with open(os.path.join(HERE, "rudderlite.py"), "rb") as source:
        (tmp_path / "rudderlite.py").write_bytes(source.read())
    environment = {**os.environ, "PORT": str(free_port()), "RUNNER_TEMP": str(tmp_path)}
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert [event["event"] for event in stored_events(str(tmp_path / "rudderlite"))] == ["Order Completed"]


def test_readme_jq_one_liner(server, data_dir):
    if not shutil.which("jq"):
        pytest.skip("jq is not installed")
    post(server.url, "/v1/batch", {"batch": [{"type": "track", "userId": "ada", "event": "Upgraded",
                                              "properties": {"plan": "pro"}}, {"type": "identify", "userId": "ada"}]})
    command = readme_recipe("jq").strip().replace("rudderlite-data/", data_dir + "/")
    output = subprocess.run(["bash", "-c", command], capture_output=True, check=True, timeout=30).stdout
    assert [json.loads(line) for line in output.splitlines()] == [{"event": "Upgraded", "userId": "ada", "plan": "pro"}]
