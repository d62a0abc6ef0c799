"""Tests for rudderlite, over real sockets and real files, in the order of the module.

Most tests run a server in a background thread (``rudderlite.running``) on port 0; the tests of
crashes, signals, logs and resource limits run it as a real process and wait for its listening
line. Tests that need a program the machine may lack (jq, chromium) skip, saying so.
"""

import atexit
import base64
import contextlib
import fcntl
import glob
import gzip
import hashlib
import http.client
import json
import os
import pty
import queue
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import rudderlite

pytest_plugins = ["pytester"]  # the README's pytest recipes run in a project of their own
HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "test-write-key"
OTHER_KEY = "other-write-key"
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
RECEIVED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# -- helpers ---------------------------------------------------------------------------------------


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
    """One request; ``key=None`` sends no Authorization. Pass ``connection`` to reuse one."""
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
        connection.request(method, path, body=body if body or method == "POST" else None,
                           headers=all_headers)
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


def inspect(server, query="", key=KEY):
    """The events /rudderlite/events answers."""
    return inspect_answer(server, query, key)["events"]


def inspect_answer(server, query="", key=KEY, path="/rudderlite/events"):
    reply = send(server.url, "GET", path + query, key=key)
    assert reply.status == 200, reply.text
    return reply.json()


class RawClient:
    """A raw connection, for what http.client will not send or hides (it drops HEAD bodies and
    reconnects silently): sends bytes as given, reads answers one at a time, so pipelined answers
    are not lost, and stops at EOF, so an answer cut short fails the test instead of hanging it."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before {what}: {self.buffer!r}")
        self.buffer += chunk

    def head(self) -> bytes:
        """Everything up to the next empty line: an answer's head, or an interim 100 Continue."""
        while b"\r\n\r\n" not in self.buffer:
            self._read_more("a whole head")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def answer(self, method: str = "GET"):
        """The next answer's head and body (by Content-Length; none for HEAD)."""
        head = self.head()
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        length = int(length.group(1)) if length and method != "HEAD" else 0
        while len(self.buffer) < length:
            self._read_more("the end of an answer's body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head, body

    def rest_until_closed(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def raw_connection(server) -> RawClient:
    return RawClient((server.server_address[0], server.server_port))


@contextlib.contextmanager
def raw_exchange(server, data: bytes):
    """A raw connection that has sent ``data``."""
    with raw_connection(server) as client:
        client.send(data)
        yield client


def request_head(method, path, body=b"", key=KEY, extra=""):
    authorization = f"Authorization: {basic_auth(key)}\r\n" if key else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


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
        settings.setdefault("quiet", True)
        started = rudderlite.make_server(rudderlite.Config(port=0, **settings)).start()
        servers.append(started)
        return started

    yield start
    for started in servers:
        started.stop()


class Process:
    """rudderlite as a real process (see ``rudderlite_command``); ready once it printed its
    listening line.

    Standard error is read by a thread into a queue, so a test can wait for a line as its
    readiness signal (``wait_for_line``) and still see all of it after ``stop()``."""

    def __init__(self, data_dir, *options, preexec_fn=None, env=None, stderr=None):
        self.data_dir = data_dir
        self.popen = subprocess.Popen(
            rudderlite_command("--port", "0", "--data-dir", data_dir, *options),
            stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE, preexec_fn=preexec_fn,
            env=child_environment(env))
        self.lines = queue.Queue()
        self.seen = []
        if stderr is None:
            self.reader = threading.Thread(target=self._read_stderr, daemon=True)
            self.reader.start()
        listening_stream = self.popen.stdout
        if "--print" in options:
            self.first_line = self.wait_for_line(r"rudderlite listening on ")
        else:
            ready, _, _ = select.select([listening_stream], [], [], 30)
            assert ready, f"no listening line within 30 s: {self.seen}"
            self.first_line = listening_stream.readline().decode().rstrip("\n")
        self.url = self.first_line.rsplit(" ", 1)[-1]
        self.address = urllib.parse.urlsplit(self.url).netloc.rsplit(":", 1)
        self.address = (self.address[0], int(self.address[1]))

    def _read_stderr(self):
        for line in self.popen.stderr:
            self.lines.put(line.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def wait_for_line(self, pattern, timeout=30):
        """The next line of standard error that matches ``pattern`` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"standard error ended without {pattern!r}: {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def stop(self, signal_number=signal.SIGTERM):
        self.popen.send_signal(signal_number)
        self.popen.wait(timeout=30)
        self.reader.join(30)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        self.stderr = "\n".join(self.seen)
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
            process.popen.wait()


def readme_recipe(name):
    """The fenced block that follows ``<!-- recipe: NAME -->`` in README.md."""
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    block = readme.split(f"<!-- recipe: {name} -->\n", 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1]


# The suite starts rudderlite some fifty times. Python compiles a script on every start and caches
# only imported modules, and compiling rudderlite.py is a third of a start; so the tests that are
# not about the README's own command lines run the same main() as ``python3 -m rudderlite``, with
# a bytecode cache of their own that leaves the checkout untouched.
BYTECODE_CACHE = tempfile.mkdtemp(prefix="rudderlite-test-bytecode-")
atexit.register(shutil.rmtree, BYTECODE_CACHE, True)


def rudderlite_command(*options):
    return [sys.executable, "-m", "rudderlite", *options]


def child_environment(environment=None):
    """``environment`` (by default this process's), set up for ``rudderlite_command``: the module
    is this directory's, wherever the tests run from (PYTHONSAFEPATH keeps the current directory
    out of the module path on Python 3.11 and later)."""
    environment = {**(os.environ if environment is None else environment), "PYTHONPATH": HERE,
                   "PYTHONSAFEPATH": "1", "PYTHONPYCACHEPREFIX": BYTECODE_CACHE}
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    return environment


# -- the command line ------------------------------------------------------------------------------


def test_listening_line_first_then_sigterm_exits_zero(processes):
    process = processes()
    assert re.fullmatch(r"rudderlite listening on http://127\.0\.0\.1:\d+", process.first_line)
    assert send(process.url, "GET", "/health").status == 200
    assert process.stop() == 0


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_as_sigterm_does(processes, signal_number):
    process = processes()
    assert post(process.url, "/v1/track", track()).status == 200
    assert process.stop(signal_number) == 0
    assert len(stored_events(process.data_dir)) == 1


@contextlib.contextmanager
def request_in_flight(process, event_name="in flight"):
    """A request whose head the server has read and whose body it is waiting for: the server's
    ``100 Continue`` proves it. Yields the socket and the rest of the body to send."""
    body = json.dumps(track(event=event_name)).encode()
    with RawClient(process.address) as client:
        client.send(request_head("POST", "/v1/track", body, extra="Expect: 100-continue\r\n")
                    [:-len(body)])
        assert client.head() == b"HTTP/1.1 100 Continue"
        yield client, body


def test_more_signals_while_stopping_and_exiting_are_ignored(processes):
    process = processes()
    with request_in_flight(process) as (client, body):
        process.popen.send_signal(signal.SIGTERM)
        process.popen.send_signal(signal.SIGINT)
        client.send(body)
        head, answer = client.answer()
    assert head.startswith(b"HTTP/1.1 200") and answer == b"ok"
    while process.popen.poll() is None:  # signal it all the way through Python's exit
        process.popen.send_signal(signal.SIGTERM)
    assert process.popen.returncode == 0


def test_sigterm_lets_a_request_in_flight_finish_and_refuses_new_connections(processes):
    process = processes()
    with request_in_flight(process) as (client, body):
        process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # stopping shows as new connections being refused
            try:
                socket.create_connection(process.address, timeout=5).close()
            except (ConnectionRefusedError, ConnectionResetError):
                break
        else:
            pytest.fail("the server kept accepting connections after SIGTERM")
        client.send(body)
        head, answer = client.answer()
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and answer == b"ok"
    assert process.stop() == 0
    assert [event["event"] for event in stored_events(process.data_dir)] == ["in flight"]


BAD_OPTIONS = [
    (["--port", "abc"], "argument --port: 'abc' is not a port number (0 to 65535)"),
    (["--port", "70000"], "argument --port: '70000' is not a port number (0 to 65535)"),
    (["--max-event-bytes", "0"], "argument --max-event-bytes: '0' is not a whole number above 0"),
    (["--max-batch-bytes", "1e6"],
     "argument --max-batch-bytes: '1e6' is not a whole number above 0"),
    (["--fsync", "sometimes"], "argument --fsync: invalid choice: 'sometimes'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize("options,says", BAD_OPTIONS)
def test_bad_option_is_one_line_that_says_what_is_wrong_and_exit_2(capsys, options, says):
    with pytest.raises(SystemExit) as exited:
        rudderlite.parse_config(options)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("rudderlite: ") and says in lines[0]
    assert "--help" in lines[0] and "positive_int" not in lines[0]


def test_an_older_python_is_told_in_one_line_before_anything_starts(tmp_path):
    """Python 3.8 imports the module, so without a check it would start and then answer every event
    with a 500 (Ubuntu 20.04 still has 3.8)."""
    older = shutil.which("python3.8")
    if older is None or subprocess.run([older, "-c", "pass"], capture_output=True).returncode:
        pytest.skip("no Python 3.8 to try")
    result = subprocess.run([older, os.path.join(HERE, "rudderlite.py")], capture_output=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.decode() == "rudderlite: needs Python 3.9 or newer; this is Python 3.8\n"
    assert not os.path.exists(tmp_path / "rudderlite-data")


def test_a_bad_option_on_the_real_command_line_creates_nothing(tmp_path):
    result = subprocess.run(rudderlite_command("--port", "abc"), capture_output=True, timeout=30,
                            cwd=tmp_path, env=child_environment())
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "rudderlite-data")


def test_unusable_data_dir_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(rudderlite_command("--port", "0", "--data-dir", str(blocker / "x")),
                            capture_output=True, timeout=30, env=child_environment())
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"rudderlite: cannot use --data-dir {blocker / 'x'}: ")


def test_port_in_use_says_so_and_what_to_do_and_creates_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(rudderlite_command("--port", str(port)), capture_output=True,
                                timeout=30, cwd=tmp_path, env=child_environment())
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"rudderlite: port {port} on 127.0.0.1 is already in use")
    assert "--port 0" in line
    assert not os.path.exists(tmp_path / "rudderlite-data")  # a failed start leaves nothing


def test_the_start_says_where_events_go_and_where_to_see_them(processes, data_dir):
    process = processes()
    line = process.wait_for_line(r"events go to")
    assert os.path.join(os.path.abspath(data_dir), "events.jsonl") in line
    assert f"{process.url}/rudderlite/" in line


def readme_option_defaults():
    """The README's option table: option -> the default it documents."""
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    table = readme.split("## Command line", 1)[1].split("\n\n", 2)[2]
    defaults = {}
    for row in re.findall(r"^\| `(--[a-z-]+)`(?:, `(--[a-z-]+)`)? \| ([^|]+) \|", table, re.M):
        values = re.findall(r"`([^`]+)`", row[2])
        for option, value in zip([name for name in row[:2] if name], values):
            defaults[option] = value
    return defaults


def test_defaults_are_the_documented_numbers():
    documented = readme_option_defaults()
    config = rudderlite.parse_config([])
    assert config == rudderlite.Config()
    expected = {"--host": "127.0.0.1", "--port": "8080", "--data-dir": "./rudderlite-data",
                "--max-event-bytes": "32768", "--max-batch-bytes": "4194304",
                "--rotate-bytes": "67108864", "--fsync": "off", "--history-events": "10000",
                "--history-bytes": "33554432", "--max-connections": "512"}
    assert {option: documented[option] for option in expected} == expected
    for option, value in expected.items():
        assert str(getattr(config, option[2:].replace("-", "_"))) == value, option
    assert (config.idle_timeout, config.head_timeout, config.body_timeout) == (60.0, 10.0, 60.0)
    assert rudderlite.FSYNC_INTERVAL_SECONDS == 1  # "--fsync interval": every second
    assert config.max_head_bytes == 64 * 1024 and not config.strict and not config.quiet


def test_write_key_never_in_a_log_line(processes):
    process = processes()
    post(process.url, "/v1/track", track(), key="zq8Xk3-in-header")
    post(process.url, "/beacon/v1/batch?writeKey=zq8Xk3-in-query", batch_of(track()), key=None)
    post(process.url, "/beacon/v1/batch?write%4Bey=zq8Xk3-encoded", batch_of(track()), key=None)
    post(process.url, "/beacon/v1/batch?WRITEKEY=zq8Xk3-refused", batch_of(track()), key=None)
    send(process.url, "GET", "/nowhere?writeKey=zq8Xk3-404")
    assert process.stop() == 0
    assert process.stderr.count("200 /beacon/v1/batch") == 2  # the decoded name is the key's
    assert "401 POST /beacon/v1/batch?WRITEKEY=REDACTED" in process.stderr
    assert "404 GET /nowhere?writeKey=REDACTED" in process.stderr
    assert "zq8" not in process.stderr and "Xk3" not in process.stderr


def test_quiet_leaves_no_line_per_request_nor_warnings(processes):
    process = processes("--quiet")
    assert post(process.url, "/v1/track", {"userId": "u"}).status == 200  # a contract warning
    assert post(process.url, "/v1/track", b"{").status == 400
    assert process.stop() == 0
    assert process.stderr == ""


# -- endpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", rudderlite.EVENT_TYPES)
def test_single_event_endpoint_stores_type_from_path(server, data_dir, event_type):
    other = "screen" if event_type != "screen" else "page"
    reply = post(server.url, f"/v1/{event_type}",
                 {**track(), "type": other, "previousId": "p", "groupId": "g"})
    assert (reply.status, reply.text) == (200, "ok")
    [stored] = stored_events(data_dir)
    assert stored["type"] == event_type


def test_batch_stores_every_event_and_ignores_other_top_level_keys(server, data_dir):
    body = {"batch": [{"type": "track", **track("a")}, {"type": "identify", "userId": "b"}],
            "sentAt": "2026-11-26T10:00:00Z", "writeKey": "ignored", "timestamp": "x",
            "context": {"y": 1}}
    assert post(server.url, "/v1/batch", body).status == 200
    stored = stored_events(data_dir)
    assert [(event["type"], event["userId"]) for event in stored] == [("track", "a"),
                                                                      ("identify", "b")]
    assert all("writeKey" not in event and "sentAt" not in event for event in stored)


def test_beacon_takes_the_first_write_key_of_the_query_as_go_decodes_it(server, data_dir):
    headers = {"Content-Type": "text/plain"}
    for query in [f"writeKey={KEY}", f"write%4Bey={KEY}", f"writeKey={KEY}&writeKey=other"]:
        reply = post(server.url, f"/beacon/v1/batch?{query}", batch_of(track()), key=None,
                     headers=headers)
        assert reply.status == 200, query
    assert len(server.received(KEY)) == 3 and server.received("other") == []
    for query in ["", "writekey=" + KEY, "writeKey=&writeKey=" + KEY]:  # the name is case-sensitive
        reply = post(server.url, f"/beacon/v1/batch?{query}", batch_of(track()), key=KEY)
        assert (reply.status, reply.text) == (401, "failed to read writekey from query params")
    assert len(stored_events(data_dir)) == 3


def test_preflight_answers_204_before_auth_echoing_what_was_asked(server):
    reply = send(server.url, "OPTIONS", "/v1/track", key=None, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "anonymousid,authorization,content-type,sentat,x-more",
        "Access-Control-Request-Private-Network": "true"})
    assert reply.status == 204 and reply.body == b""
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert reply.headers["Access-Control-Allow-Credentials"] == "true"
    assert reply.headers["Access-Control-Allow-Headers"] == \
        "anonymousid,authorization,content-type,sentat,x-more"
    assert reply.headers["Access-Control-Max-Age"] == "900"
    assert reply.headers["Access-Control-Allow-Private-Network"] == "true"
    assert reply.headers["Vary"] == "Origin"


def test_preflight_on_any_path(server):
    assert send(server.url, "OPTIONS", "/not/a/route", key=None).status == 204


def test_cors_headers_on_errors_too_and_vary_on_every_answer_to_an_origin(server):
    reply = post(server.url, "/v1/track", track(), key=None,
                 headers={"Origin": "http://app.example"})
    assert reply.status == 401
    assert reply.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert reply.headers["Vary"] == "Origin"
    plain = post(server.url, "/v1/track", track())
    assert "Access-Control-Allow-Origin" not in plain.headers and "Vary" not in plain.headers


@pytest.mark.parametrize("header,value", [
    ("Origin", b"http://a\r\n X-Injected: yes"), ("Origin", b"http://a\x0bX-Injected: yes"),
    ("Origin", b"http://a\rX-Injected: yes"), ("Origin", b"http://a\x7f\x1b[31mX"),
    ("Origin", b"http://a\x9b31mX\x85"), ("Access-Control-Request-Headers", b"a,\x9bb\x85"),
    ("Access-Control-Request-Headers", b"a,\x0bX-Injected: yes"),
])
def test_echoed_headers_carry_no_control_characters(server, header, value):
    origin = b"" if header == "Origin" else b"Origin: http://a\r\n"
    head = (b"OPTIONS /v1/track HTTP/1.1\r\nHost: localhost\r\n" + origin + header.encode() + b": "
            + value + b"\r\n\r\n")
    with raw_exchange(server, head) as client:
        head, _body = client.answer()
    assert b"\nX-Injected" not in head and b"\rX-Injected" not in head
    assert not any(re.search(rb"[\x00-\x1f\x7f-\x9f]", line) for line in head.split(b"\r\n"))
    assert head.startswith((b"HTTP/1.1 204", b"HTTP/1.1 400"))  # obs-fold is refused (RFC 9112)


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health_is_rudder_servers_answer(server, path):
    reply = send(server.url, "GET", path, key=None)
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    assert reply.json()["server"] == "UP" and reply.json()["db"] == "UP"


def test_version(server):
    reply = send(server.url, "GET", "/version", key=None)
    assert reply.json()["version"] == rudderlite.__version__


@pytest.mark.parametrize("path", ["/sourceConfig",
                                  "/sourceConfig/?p=npm&v=3.34.1&build=modern&writeKey=" + KEY])
def test_source_config_is_what_the_js_sdk_needs(server, path):
    reply = send(server.url, "GET", path, headers={"Origin": "http://page"})
    source = reply.json()["source"]
    assert reply.status == 200
    assert source["id"] and source["config"] == {} and source["destinations"] == []
    assert source["enabled"] is True and source["writeKey"] == KEY
    assert reply.headers["Access-Control-Allow-Origin"] == "http://page"


def test_head_is_answered_like_get_without_a_body_on_the_same_connection(server):
    with raw_connection(server) as client:
        client.send(b"HEAD /sourceConfig/ HTTP/1.1\r\nHost: localhost\r\n"
                    b"Authorization: " + basic_auth().encode() + b"\r\n\r\n"
                    b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _none = client.answer("HEAD")
        second_head, body = client.answer()  # right after the head: HEAD sent no body
    assert head.startswith(b"HTTP/1.1 200") and int(re.search(rb"Content-Length: (\d+)",
                                                                 head).group(1)) > 0
    assert second_head.startswith(b"HTTP/1.1 200") and json.loads(body)["server"] == "rudderlite"


def test_source_config_refuses_unknown_key_when_keys_are_given(make_server):
    server = make_server(write_keys=(KEY,))
    assert send(server.url, "GET", "/sourceConfig/?writeKey=nope", key=None).status == 401
    assert send(server.url, "GET", f"/sourceConfig/?writeKey={KEY}", key=None).status == 200


def test_gzip_body_with_any_content_type(server, data_dir):
    body = gzip.compress(json.dumps(batch_of(track())).encode())
    reply = post(server.url, "/v1/batch", body, headers={
        "Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200
    assert stored_events(data_dir)[0]["event"] == "Order Completed"


def test_every_gzip_member_is_inflated(server, data_dir):
    text = json.dumps(batch_of(track(event="first"), track(event="second"))).encode()
    members = gzip.compress(text[:20]) + gzip.compress(text[20:40]) + gzip.compress(text[40:])
    gzipped = {"Content-Encoding": "gzip"}
    assert post(server.url, "/v1/batch", members, headers=gzipped).status == 200
    assert [event["event"] for event in stored_events(data_dir)] == ["first", "second"]
    many = b"".join(gzip.compress(text[i:i + 1]) for i in range(len(text)))  # one byte each
    assert post(server.url, "/v1/batch", many, headers=gzipped).status == 200
    assert len(stored_events(data_dir)) == 4


def test_chunked_body_with_extensions_and_trailers(server, data_dir):
    body = b'{"userId": "u1", "event": "Chunked"}'
    chunked = (b"10;name=value\r\n" + body[:16] + b"\r\n" + f"{len(body) - 16:x}".encode()
               + b"\r\n" + body[16:] + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with raw_exchange(server, head + chunked) as client:
        answer_head, answer = client.answer()
    assert answer_head.startswith(b"HTTP/1.1 200") and answer == b"ok"
    assert stored_events(data_dir)[0]["event"] == "Chunked"


def test_chunk_data_without_its_crlf_is_refused_and_closes(server, data_dir):
    head = (f"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    body = json.dumps(track()).encode()  # a whole event, then junk where its chunk's CRLF goes
    chunked = b"%x\r\n%s" % (len(body), body) + b"junk\r\n0\r\n\r\n"
    with raw_exchange(server, head + chunked) as client:
        answer_head, answer = client.answer()
        assert client.rest_until_closed() == b""
    assert answer_head.startswith(b"HTTP/1.1 400") and answer == b"failed to read body from request"
    assert b"Connection: close" in answer_head and stored_events(data_dir) == []


def test_expect_100_continue_is_answered_before_the_body(server, data_dir):
    body = json.dumps(track()).encode()
    head = request_head("POST", "/v1/track", body, extra="Expect: 100-continue\r\n")[:-len(body)]
    with raw_exchange(server, head) as client:
        assert client.head() == b"HTTP/1.1 100 Continue"
        client.send(body)
        status_head, answer = client.answer()
    assert status_head.startswith(b"HTTP/1.1 200") and answer == b"ok"
    assert len(stored_events(data_dir)) == 1


@pytest.mark.parametrize("head,status", [
    (request_head("POST", "/v1/track", extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", f"Content-Length: {10 ** 9}".encode()), b"413"),
    (request_head("POST", "/v1/track", key=None, extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", b"Content-Length: 10"), b"401"),
])
def test_expect_100_continue_refused_without_continue_and_closed(server, head, status):
    with raw_exchange(server, head) as client:
        status_head, _answer = client.answer()
        assert client.rest_until_closed() == b""  # its body never came: the connection cannot go on
    assert status_head.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in status_head


def test_keep_alive_carries_many_requests_and_errors_on_one_connection(server, data_dir):
    bodies = [track(), b"{not json", track(), {"event": "no ids"}, track()]
    requests = b"".join(request_head("POST", "/v1/track", json.dumps(body).encode()
                                     if isinstance(body, dict) else body) for body in bodies)
    requests += request_head("GET", "/nope", b"x" * 100)
    requests += request_head("POST", "/v1/track", json.dumps(track()).encode())
    with raw_exchange(server, requests) as client:
        statuses = [client.answer()[0].split(b" ")[1] for _ in range(7)]
    assert statuses == [b"200", b"400", b"200", b"400", b"200", b"404", b"200"]
    assert len(stored_events(data_dir)) == 4


def test_a_small_unread_body_is_drained_a_large_one_closes(make_server):
    server = make_server(max_event_bytes=1000)
    with raw_connection(server) as client:
        client.send(request_head("POST", "/nope", b"x" * 5000) + request_head("GET", "/health"))
        assert client.answer()[0].startswith(b"HTTP/1.1 404")
        assert client.answer()[0].startswith(b"HTTP/1.1 200")  # the same connection went on
        client.send(request_head("POST", "/v1/track", b"x" * 200_000))
        head, _body = client.answer()
        assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
        assert client.rest_until_closed() == b""


@pytest.mark.parametrize("version,connection,stays_open", [
    ("HTTP/1.0", "", False), ("HTTP/1.0", "keep-alive", True), ("HTTP/1.1", "", True),
    ("HTTP/1.1", "close", False)])
def test_connection_persistence_follows_rfc_9112(server, version, connection, stays_open):
    header = f"Connection: {connection}\r\n" if connection else ""
    with raw_exchange(server, f"GET /health {version}\r\n{header}\r\n".encode()) as client:
        head, _body = client.answer()
        assert (b"Connection: close" not in head) == stays_open
        if stays_open:
            client.send(b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert client.answer()[0].startswith(b"HTTP/1.1 200")
        else:
            assert client.rest_until_closed() == b""


def test_http_1_0_with_transfer_encoding_is_read_then_closed(server, data_dir):
    body = b'{"userId": "u1", "event": "old client"}'
    head = (f"POST /v1/track HTTP/1.0\r\nConnection: keep-alive\r\n"
            f"Authorization: {basic_auth()}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    with raw_exchange(server, head + chunked) as client:
        answer_head, _answer = client.answer()
        assert client.rest_until_closed() == b""
    assert answer_head.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer_head


# -- who may talk to it ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io",
                                  "localhost.evil.example", "EVIL.example."])
@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/rudderlite/events"),
                                         ("POST", "/rudderlite/reset"), ("OPTIONS", "/v1/track"),
                                         ("POST", "/v1/track"), ("GET", "/rudderlite/")])
def test_a_host_that_is_not_local_is_403_first(server, host, method, path):
    body = json.dumps(track()).encode() if method == "POST" else b""
    head = request_head(method, path, body, extra="Origin: http://evil.example\r\n").replace(
        b"Host: localhost", f"Host: {host}".encode())
    with raw_exchange(server, head) as client:
        answer_head, answer = client.answer()
    assert answer_head.startswith(b"HTTP/1.1 403") and answer == b"host not allowed"
    assert b"Access-Control-Allow-Origin" not in answer_head
    assert server.received() == [] and inspect_answer(server, path="/rudderlite/rejected")[
        "rejected"] == []


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "localhost.", "app.localhost:3000",
                                  "127.0.0.1:8080", "[::1]:8080", "10.0.0.7", "", None])
def test_local_hosts_and_no_host_are_served(server, host):
    head = b"GET /health HTTP/1.1\r\n" + (f"Host: {host}\r\n".encode() if host is not None else b"")
    with raw_exchange(server, head + b"\r\n") as client:
        assert client.answer()[0].startswith(b"HTTP/1.1 200")


def test_allow_host_adds_a_name_and_an_absolute_target_is_checked_too(make_server):
    server = make_server(allow_hosts=("dev.example",))
    for target, host, status in [("/health", "dev.example:80", b"200"),
                                 ("http://evil.example/health", "localhost", b"403"),
                                 ("http://localhost/health", "evil.example", b"200")]:
        head = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        with raw_exchange(server, head) as client:
            assert client.answer()[0].startswith(b"HTTP/1.1 " + status), (target, host)


@pytest.mark.parametrize("target", ["//127.0.0.1/rudderlite/events", "//localhost/rudderlite/stats",
                                    "//x@127.0.0.1/rudderlite/events", "//[::1]/rudderlite/reset"])
def test_a_path_that_looks_like_an_authority_is_a_path_not_a_host(server, target):
    """``//127.0.0.1/...`` in a rebound page's fetch is origin-form: its Host is still checked."""
    post(server.url, "/v1/track", track(event="private"))
    for host, status in [("evil.example", b"403"), ("localhost", b"404")]:
        with raw_exchange(server, request_head("GET", target).replace(
                b"Host: localhost", f"Host: {host}".encode())) as client:
            assert client.answer()[0].startswith(b"HTTP/1.1 " + status), host
    assert len(server.received(KEY)) == 1


@pytest.mark.parametrize("line", [b"Host: [::1]evil.example", b"X-Nul: a\x00b",
                                  b"X-Escape: \x1b[31m"])
def test_a_head_with_a_broken_host_or_control_characters_is_refused(server, line):
    head = b"GET /health HTTP/1.1\r\n" + line + b"\r\n\r\n"
    with raw_exchange(server, head) as client:
        assert client.answer()[0].startswith((b"HTTP/1.1 400", b"HTTP/1.1 403"))


def test_a_target_with_a_control_character_is_refused(server):
    with raw_exchange(server, b"GET /\x01health HTTP/1.1\r\nHost: localhost\r\n\r\n") as client:
        assert client.answer()[0].startswith(b"HTTP/1.1 400")


def test_only_loopback_binding_guards_the_host():
    assert all(map(rudderlite.is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(rudderlite.is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))


@pytest.mark.parametrize("origin,granted", [
    ("http://localhost:5173", True), ("http://127.0.0.1:9000", True), ("http://[::1]:3000", True),
    ("http://localhost", True), ("http://evil.example", False), ("null", False),
    ("https://localhost:5173", False), ("http://localhost.evil.example", False),
    ("http://allowed.example", True)])
def test_inspection_cors_only_for_loopback_and_allowed_origins(make_server, origin, granted):
    server = make_server(allow_origins=("http://allowed.example",))
    headers = {"Origin": origin}
    reply = send(server.url, "GET", "/rudderlite/events", headers=headers)
    assert reply.status == 200  # the answer is made; the browser alone keeps it from the page
    assert (reply.headers.get("Access-Control-Allow-Origin") == origin) == granted
    preflight = send(server.url, "OPTIONS", "/rudderlite/reset", key=None, headers={
        **headers, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert ("Access-Control-Allow-Origin" in preflight.headers) == granted
    assert ("Access-Control-Allow-Headers" in preflight.headers) == granted
    event_reply = post(server.url, "/v1/track", track(), headers=headers)
    assert event_reply.headers["Access-Control-Allow-Origin"] == origin  # events: every origin


# -- answers, in their order -----------------------------------------------------------------------


def test_unknown_path_is_404(server):
    reply = post(server.url, "/v1/nope", track())
    assert (reply.status, reply.text) == (404, "404 page not found")
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/track", "OPTIONS, POST"), ("PUT", "/v1/batch", "OPTIONS, POST"),
    ("DELETE", "/v1/page", "OPTIONS, POST"), ("POST", "/health", "GET, HEAD, OPTIONS"),
    ("GET", "/rudderlite/reset", "OPTIONS, POST"), ("POST", "/rudderlite/", "GET, HEAD, OPTIONS")])
def test_known_path_wrong_method_is_405_before_auth_with_the_exact_allow(server, method, path,
                                                                          allow):
    reply = send(server.url, method, path, key=None)
    assert (reply.status, reply.text) == (405, "method not allowed")
    assert reply.headers["Allow"] == allow


@pytest.mark.parametrize("authorization", [
    None, "Bearer abc", "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(),
    basic_auth(""), "Basic " + base64.b64encode(b"\xff\xfe:").decode(), "Basic caf\u00e9"])
def test_missing_or_undecodable_credentials_are_401(server, data_dir, authorization):
    headers = {"Authorization": authorization.encode().decode("latin-1")} if authorization else {}
    reply = post(server.url, "/v1/track", track(), key=None, headers=headers)
    assert (reply.status, reply.text) == (401, "failed to read writekey from header")
    assert stored_events(data_dir) == []


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_case_insensitive_and_the_password_ignored(server, scheme):
    credentials = base64.b64encode(f"{KEY}:a password".encode()).decode()
    reply = post(server.url, "/v1/track", track(), key=None,
                 headers={"Authorization": f"{scheme} {credentials}"})
    assert reply.status == 200 and len(server.received(KEY)) == 1


@settings(max_examples=150, deadline=None)
@given(authorization=st.text()
       | st.builds("{} {}".format, st.sampled_from(["Basic", "basic", "Bearer"]), st.text())
       | st.builds(lambda raw: "Basic " + base64.b64encode(raw).decode(), st.binary()))
def test_any_authorization_header_gives_a_key_or_the_401(authorization):
    try:
        assert rudderlite.write_key_from_authorization(authorization)
    except rudderlite.Rejection as rejection:
        assert rejection.answer == rudderlite.NO_WRITE_KEY_IN_HEADER


def test_write_key_allow_list(make_server):
    server = make_server(write_keys=(KEY, OTHER_KEY))
    assert post(server.url, "/v1/track", track(), key=KEY).status == 200
    assert post(server.url, "/v1/track", track(), key=OTHER_KEY).status == 200
    reply = post(server.url, "/v1/track", track(), key=KEY + "x")
    assert (reply.status, reply.text) == (401, "invalid write key")
    reply = post(server.url, f"/beacon/v1/batch?writeKey={KEY}x", batch_of(track()), key=None)
    assert (reply.status, reply.text) == (401, "invalid write key")


def test_every_allowed_key_is_compared_with_compare_digest(monkeypatch):
    """Constant time: hmac.compare_digest for each allowed key, whichever matches, so the time
    taken does not tell how many keys, or how much of one, were right."""
    compared = []
    real = rudderlite.hmac.compare_digest
    monkeypatch.setattr(rudderlite.hmac, "compare_digest",
                        lambda given, key: compared.append(key) or real(given, key))
    assert rudderlite.write_key_allowed("a", ("a", "b", "c"))
    assert not rudderlite.write_key_allowed("zz", ("a", "b", "c"))
    assert compared == [b"a", b"b", b"c"] * 2
    assert rudderlite.write_key_allowed("anything", ())


def test_single_event_over_limit_is_413(make_server):
    server = make_server(max_event_bytes=100)
    reply = post(server.url, "/v1/track", json.dumps(track(properties={"pad": "x" * 200})))
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    assert stored_events(server.config.data_dir) == []


def test_batch_over_limit_is_413(make_server):
    server = make_server(max_batch_bytes=1000)
    reply = post(server.url, "/v1/batch", batch_of(*[track()] * 30))
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")


def test_one_event_of_a_batch_over_the_event_limit_is_413_and_named_in_rejected(make_server):
    server = make_server(max_event_bytes=200)
    reply = post(server.url, "/v1/batch", batch_of(track(), track(properties={"pad": "x" * 300})))
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    [rejected] = inspect_answer(server, path="/rudderlite/rejected")["rejected"]
    assert re.fullmatch(r"batch\[1\] is \d+ bytes as compact JSON, over --max-event-bytes 200",
                        rejected["detail"])
    assert stored_events(server.config.data_dir) == []


def test_huge_declared_body_is_refused_without_reading_it_and_closed(server):
    head = request_head("POST", "/v1/batch").replace(b"Content-Length: 0",
                                                     f"Content-Length: {2 * 10 ** 9}".encode())
    with raw_exchange(server, head + b"{" * 1000) as client:
        status_head, _answer = client.answer()
        assert client.rest_until_closed() == b""
    assert status_head.startswith(b"HTTP/1.1 413") and b"Connection: close" in status_head


@pytest.mark.parametrize("extra,status", [(0, b"200"), (1, b"413")])
def test_a_chunked_body_of_exactly_the_limit_is_read_one_byte_more_is_413(make_server, extra,
                                                                          status):
    server = make_server(max_batch_bytes=2000)
    body = json.dumps(batch_of(track())).encode()
    body = body[:-1] + b" " * (2000 + extra - len(body)) + b"}"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 300]), body[i:i + 300])
                      for i in range(0, len(body), 300)) + b"0\r\n\r\n"
    head = (f"POST /v1/batch HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with raw_exchange(server, head + chunks) as client:
        assert client.answer()[0].startswith(b"HTTP/1.1 " + status)
    assert len(server.received(KEY)) == (extra == 0)


def test_endless_chunked_body_is_refused_at_the_limit(make_server):
    server = make_server(max_batch_bytes=10_000)
    head = (f"POST /v1/batch HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic_auth()}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with raw_exchange(server, head) as client:
        with contextlib.suppress(OSError):  # the server stops reading: that is the point
            for _ in range(100):
                client.send(b"1000\r\n" + b" " * 4096 + b"\r\n")
        status_head, _answer = client.answer()
    assert status_head.startswith(b"HTTP/1.1 413")


def test_gzip_inflates_no_further_than_the_limit():
    """A bomb (16 MiB of blanks in 16 KiB) costs the limit's worth of memory, not its own size."""
    import tracemalloc
    bomb = gzip.compress(b"[" + b" " * (16 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 20_000
    tracemalloc.start()
    try:
        with pytest.raises(rudderlite.Rejection) as refused:
            rudderlite.inflate_gzip(bomb, 1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.answer == rudderlite.REQUEST_TOO_LARGE
    assert peak < 2.5 * 1024 * 1024  # the inflated bytes, and no more than one copy of them


def test_a_gzip_body_larger_than_the_limit_that_inflates_within_it_is_accepted(make_server):
    """Stored deflate blocks make a body larger once compressed: the limit is on inflated bytes,
    and the compressed body may be a little larger."""
    server = make_server(max_batch_bytes=100_000)
    body = json.dumps(batch_of(*[track(properties={"pad": os.urandom(10_000).hex()})] * 4)).encode()
    body = body[:-1] + b" " * (100_000 - len(body) - 1) + b"}"
    stored = gzip.compress(body, compresslevel=0)
    assert len(stored) > 100_000
    assert post(server.url, "/v1/batch", stored, headers={"Content-Encoding": "gzip"}).status == 200


INVALID_JSON_BODIES = {
    "not json": b"{nope",
    "empty": b"",
    "not utf-8": b'{"userId": "\xff\xfe", "event": "x"}',
    "utf-16": json.dumps(track()).encode("utf-16"),
    "NaN": b'{"userId": "u", "event": "x", "properties": {"v": NaN}}',
    "Infinity": b'{"userId": "u", "event": "x", "properties": {"v": Infinity}}',
    "-Infinity": b'{"userId": "u", "event": "x", "properties": {"v": -Infinity}}',
    "overflowing number": b'{"userId": "u", "event": "x", "properties": {"v": 1e400}}',
    "deep nesting": (b'{"userId": "u", "event": "x", "properties": ' + b"[" * 15_000
                     + b"]" * 15_000 + b"}"),
    "trailing garbage": json.dumps(track()).encode() + b"}",
}


@pytest.mark.parametrize("name", INVALID_JSON_BODIES)
def test_invalid_json_is_400(server, data_dir, name):
    body = INVALID_JSON_BODIES[name]
    for path, sent in [("/v1/track", body),
                       ("/v1/batch", body.replace(b'{"userId"', b'{"batch": [{"userId"'))]:
        reply = post(server.url, path, sent)
        assert (reply.status, reply.text) == (400, "invalid json"), path
    assert stored_events(data_dir) == []


def test_rejected_says_where_the_json_broke(server):
    for body, detail in [(b'{"userId": "u", "event": x}', "Expecting value: line 1 column 26"),
                         (b'{"userId": "\xff"}', "not UTF-8 at byte 12"),
                         (b'{"v": NaN}', "NaN is not JSON")]:
        post(server.url, "/v1/track", body)
        assert detail in inspect_answer(server, path="/rudderlite/rejected")["rejected"][-1][
            "detail"]


def test_a_number_that_overflows_anywhere_in_a_batch_body_is_invalid_json(server, data_dir):
    reply = post(server.url, "/v1/batch", b'{"batch": [{"type": "track", "userId": "u", '
                                          b'"event": "x"}], "sentAt": 1e400}')
    assert (reply.status, reply.text) == (400, "invalid json")
    assert stored_events(data_dir) == []


@pytest.mark.parametrize("gzip_body", [b"not gzip at all",
                                       gzip.compress(json.dumps(track()).encode())[:-6],
                                       gzip.compress(json.dumps(track()).encode()) + b"trailing"])
def test_undecodable_gzip_is_invalid_json(server, gzip_body):
    reply = post(server.url, "/v1/track", gzip_body, headers={"Content-Encoding": "gzip"})
    assert (reply.status, reply.text) == (400, "invalid json")


@pytest.mark.parametrize("body", [{}, {"batch": None}, {"batch": {}}, {"batch": "x"},
                                  {"batch": []}, [track()], "x"])
def test_empty_batch_payload(server, body):
    reply = post(server.url, "/v1/batch", json.dumps(body))
    assert (reply.status, reply.text) == (400, "empty batch payload")


@pytest.mark.parametrize("path,body", [
    ("/v1/batch", {"batch": [1]}), ("/v1/batch", {"batch": [track(), "x"]}),
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


@pytest.mark.parametrize("ids", [{"userId": 0}, {"anonymousId": 12.5},
                                 {"userId": "", "anonymousId": "a"},
                                 {"userId": None, "anonymousId": "a"},
                                 {"userId": True}, {"anonymousId": {}}, {"userId": []}])
def test_numbers_booleans_objects_and_one_id_are_enough_as_in_rudder_server(server, ids):
    assert post(server.url, "/v1/track", {"event": "x", **ids}).status == 200


def test_size_is_checked_before_the_other_400s(make_server):
    server = make_server(max_event_bytes=200)
    body = {"batch": ["not an event", {"type": "track", "event": "x",
                                       "properties": {"pad": "x" * 300}}]}
    assert post(server.url, "/v1/batch", body).status == 413


def test_oversized_invalid_json_is_413_not_400(make_server):
    server = make_server(max_event_bytes=100)
    assert post(server.url, "/v1/track", b"{" * 200).status == 413


def test_unauthorized_comes_before_too_large(make_server):
    server = make_server(max_event_bytes=100, write_keys=(KEY,))
    assert post(server.url, "/v1/track", b"x" * 200, key=None).text == \
        "failed to read writekey from header"
    assert post(server.url, "/v1/track", b"x" * 200, key="nope").text == "invalid write key"


@pytest.mark.parametrize("events,message", [
    ([{"event": "no ids"}, "not an event"], "request neither has anonymousId nor userId"),
    (["not an event", {"event": "no ids"}], "event is not a valid rudder event"),
])
def test_first_failing_event_decides(server, events, message):
    assert post(server.url, "/v1/batch", {"batch": events}).text == message


def test_strict_answer_names_the_first_violation_of_the_first_event_that_has_one(make_server):
    server = make_server(strict=True)
    body = batch_of(track(), track(), {"userId": "u", "event": "  ", "properties": []},
                    {"userId": "u"})
    reply = post(server.url, "/v1/batch", body)
    assert (reply.status, reply.text) == (400, 'batch[2].event: track needs a non-empty "event"')
    assert stored_events(server.config.data_dir) == []


def test_nothing_of_a_refused_request_is_stored(server, data_dir):
    body = batch_of(*[track(f"u{i}") for i in range(10)], {"event": "no ids"})
    assert post(server.url, "/v1/batch", body).status == 400
    assert stored_events(data_dir) == [] and server.received(KEY) == []


@pytest.mark.parametrize("head,answer", [
    (b"THIS IS NOT HTTP\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
     b"HTTP/1.1 431 Request Header Fields Too Large"),
    (b"GET /health HTTP/1.1\r\nfolded: a\r\n b\r\n\r\n", b"HTTP/1.1 400 Bad Request")])
def test_an_unreadable_head_is_answered_as_go_does_and_closed(server, head, answer):
    with raw_exchange(server, head) as client:
        status_head, body = client.answer()
        with contextlib.suppress(ConnectionResetError):  # unread bytes of a huge head
            assert client.rest_until_closed() == b""
    assert status_head.startswith(answer) and b"Connection: close" in status_head
    assert body == answer.split(b" ", 1)[1]


@pytest.mark.parametrize("framing,answer", [
    ("Content-Length: 5\r\nContent-Length: 6", b"400 Bad Request"),
    ("Content-Length: \u00b2", b"400 Bad Request"), ("Content-Length: -1", b"400 Bad Request"),
    ("Content-Length: 0x10", b"400 Bad Request"), ("Content-Length: 99999999999999999999",
                                                   b"400 Bad Request"),
    ("Transfer-Encoding: gzip, chunked", b"Unsupported transfer encoding"),
    ("Transfer-Encoding: identity", b"Unsupported transfer encoding")])
@pytest.mark.parametrize("path", ["/v1/track", "/nowhere", "/health"])
def test_broken_body_framing_is_answered_before_404_405_and_401_and_closes(server, data_dir,
                                                                          framing, answer, path):
    head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n\r\n{{}}{{}}{{}}"
            ).encode("latin-1")
    with raw_exchange(server, head) as client:
        status_head, body = client.answer()
        assert client.rest_until_closed() == b""
    assert body == answer and b"Connection: close" in status_head
    assert stored_events(data_dir) == []


# -- what is stored --------------------------------------------------------------------------------


def expected_rudder_id(user_id_text, anonymous_id_text):
    """Independent of the module: MD5 hex, version nibble 4, variant nibble 8-b."""
    digest = bytearray(hashlib.md5(f"{user_id_text}:{anonymous_id_text}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    hex_text = digest.hex()
    return f"{hex_text[:8]}-{hex_text[8:12]}-{hex_text[12:16]}-{hex_text[16:20]}-{hex_text[20:]}"


def test_enrichment(server, data_dir):
    sent = {"userId": " u1 ", "anonymousId": "a1", "event": "x",
            "properties": {"k": [1, 2.5, None, "é"]}}
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
                                      ({"userId": "u", "anonymousId": None}, "u:"),
                                      ({"userId": "x" * 100, "anonymousId": "y" * 100},
                                       "x" * 100 + ":" + "y" * 100)])
def test_rudder_id_from_ids(server, data_dir, ids, text):
    post(server.url, "/v1/track", {"event": "x", **ids})
    post(server.url, "/v1/track", {"event": "x", **ids})  # the second time from the cache, if any
    user_id, anonymous_id = text.split(":")
    assert [event["rudderId"] for event in stored_events(data_dir)] == \
        [expected_rudder_id(user_id, anonymous_id)] * 2


def test_a_lone_surrogate_in_an_id_is_stored_and_hashed_as_go_reads_it(server, data_dir):
    reply = post(server.url, "/v1/track", b'{"userId": "a\\ud800b", "event": "x"}')
    assert (reply.status, reply.text) == (200, "ok")
    [stored] = stored_events(data_dir)
    assert stored["userId"] == "a\ud800b"
    assert stored["rudderId"] == expected_rudder_id("a\ufffdb", "")  # Go decodes it to U+FFFD


@pytest.mark.parametrize("sent,kept", [("node-next-1732615200000-abc", True), ("  m-1  ", False),
                                       ("", False), ("   ", False), (17, False), (None, False)])
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
    post(server.url, "/v1/batch", batch_of(track(receivedAt="2020-01-01T00:00:00.000Z",
                                                 request_ip="1.2.3.4")))
    stored = stored_events(data_dir)[0]
    assert (stored["receivedAt"], stored["request_ip"]) == ("2020-01-01T00:00:00.000Z", "1.2.3.4")


def test_lone_surrogate_is_stored_as_valid_utf8_json(server, data_dir):
    post(server.url, "/v1/track", b'{"userId": "u", "event": "\\ud800 x"}')
    with open(os.path.join(data_dir, "events.jsonl"), "rb") as file:
        line = file.read()
    line.decode("utf-8")  # valid UTF-8, so jq and every reader can take it
    assert json.loads(line)["event"] == "\ud800 x"


def archives(data_dir):
    return sorted(glob.glob(os.path.join(data_dir, "events-*.jsonl")))


def test_rotation_happens_only_when_the_next_request_would_not_fit(make_server):
    server = make_server(rotate_bytes=2000)
    for number in range(60):
        assert post(server.url, "/v1/track", track(event=f"e{number:02d}")).status == 200
    data_dir = server.config.data_dir
    files = archives(data_dir) + [os.path.join(data_dir, "events.jsonl")]
    assert len(files) > 5
    assert all(re.fullmatch(r"events-\d{8}T\d{6}\.\d{6}Z\.jsonl", os.path.basename(path))
               for path in files[:-1])
    sizes = [os.path.getsize(path) for path in files]
    first_lines = [len(open(path, "rb").readline()) for path in files]
    assert all(size <= 2000 for size in sizes)
    assert all(sizes[i] + first_lines[i + 1] > 2000 for i in range(len(files) - 1))
    assert [event["event"] for event in stored_events(data_dir)] == [f"e{n:02d}" for n in range(60)]


def test_a_request_larger_than_rotate_bytes_goes_alone_into_a_fresh_file(make_server):
    server = make_server(rotate_bytes=1000)
    post(server.url, "/v1/batch", batch_of(*[track(f"first{i}") for i in range(20)]))
    assert archives(server.config.data_dir) == []  # an empty active file is never rotated
    post(server.url, "/v1/track", track())
    post(server.url, "/v1/batch", batch_of(*[track(f"big{i}") for i in range(20)]))
    post(server.url, "/v1/track", track())
    files = archives(server.config.data_dir) + [
        os.path.join(server.config.data_dir, "events.jsonl")]
    assert [len(open(path).read().splitlines()) for path in files] == [20, 1, 20, 1]


def test_a_request_that_fills_the_file_to_exactly_rotate_bytes_stays_in_it(make_server, tmp_path):
    probe = make_server()
    post(probe.url, "/v1/track", track())
    line_size = os.path.getsize(os.path.join(probe.config.data_dir, "events.jsonl"))
    server = make_server(rotate_bytes=2 * line_size)  # the lines of identical events: same size
    for _ in range(2):
        post(server.url, "/v1/track", track())
    assert archives(server.config.data_dir) == []  # exactly full: no rotation yet
    post(server.url, "/v1/track", track())
    assert len(archives(server.config.data_dir)) == 1


def test_a_write_whose_cut_back_failed_is_cut_before_the_next_one(tmp_path, monkeypatch):
    """A disk that fills mid-write, and then refuses the cut back too: the store cuts the torn
    lines before it writes anything else, so the file still holds whole lines only."""
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=2 ** 40, fsync="off")
    store.append(b'{"n":1}\n')
    real_write, real_truncate = os.write, os.ftruncate
    failures = {"write": 1, "truncate": 1}

    def write_half_then_fail(fd, data):
        if failures["write"]:
            failures["write"] -= 1
            real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    def truncate_fails_once(fd, size):
        if failures["truncate"]:
            failures["truncate"] -= 1
            raise OSError(5, "Input/output error")
        return real_truncate(fd, size)

    monkeypatch.setattr(rudderlite.os, "write", write_half_then_fail)
    monkeypatch.setattr(rudderlite.os, "ftruncate", truncate_fails_once)
    with pytest.raises(OSError):
        store.append(b'{"n":2}\n{"n":3}\n')
    store.append(b'{"n":4}\n')
    store.close()
    assert [event["n"] for event in stored_events(str(tmp_path))] == [1, 4]


def test_archive_names_sort_after_those_already_there(make_server, tmp_path):
    data_dir = tmp_path / "existing"
    data_dir.mkdir()
    (data_dir / "events-29991231T235959.999999Z.jsonl").write_text(json.dumps(track("old")) + "\n")
    server = make_server(data_dir=str(data_dir), rotate_bytes=300)
    for number in range(4):
        post(server.url, "/v1/track", track(f"new{number}"))
    assert [event["userId"] for event in stored_events(str(data_dir))] == \
        ["old", "new0", "new1", "new2", "new3"]


def write_active_file(data_dir, content: bytes):
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "events.jsonl"), "wb") as file:
        file.write(content)


def set_aside_files(data_dir):
    return glob.glob(os.path.join(data_dir, "events.jsonl.unfinished-*"))


WHOLE_LINES = b"".join(json.dumps(track(f"u{n}")).encode() + b"\n" for n in range(3))


@pytest.mark.parametrize("tail", [b'{"userId": "u", "ev', b"x" * 200_000,
                                  b'{"not": "closed", "pad": "' + b"y" * 100_000],
                         ids=["torn", "200 KB of garbage", "100 KB unclosed object"])
def test_an_unfinished_last_line_is_set_aside_whole_lines_untouched(processes, data_dir, tail):
    write_active_file(data_dir, WHOLE_LINES + tail)
    process = processes()
    process.wait_for_line(f"moved an unfinished last line of {len(tail)} bytes")
    assert post(process.url, "/v1/track", track("after")).status == 200
    assert process.stop() == 0
    with open(os.path.join(data_dir, "events.jsonl"), "rb") as file:
        assert file.read().startswith(WHOLE_LINES)
    [aside] = set_aside_files(data_dir)
    with open(aside, "rb") as file:
        assert file.read() == tail
    assert [event["userId"] for event in stored_events(data_dir)] == ["u0", "u1", "u2", "after"]


def test_a_file_without_any_newline_is_set_aside_not_emptied(processes, data_dir):
    content = b"z" * 3_000_000
    write_active_file(data_dir, content)
    process = processes()
    assert process.stop() == 0
    [aside] = set_aside_files(data_dir)
    assert os.path.getsize(aside) == len(content)
    assert os.path.getsize(os.path.join(data_dir, "events.jsonl")) == 0


def test_a_last_event_without_its_newline_is_kept_and_completed(processes, data_dir):
    write_active_file(data_dir, WHOLE_LINES + json.dumps(track("by hand")).encode())
    process = processes()
    process.wait_for_line("added the missing newline")
    assert post(process.url, "/v1/track", track("after")).status == 200
    assert process.stop() == 0
    assert set_aside_files(data_dir) == []
    assert [event["userId"] for event in stored_events(data_dir)] == \
        ["u0", "u1", "u2", "by hand", "after"]


def test_a_deleted_data_directory_is_noticed_and_recreated(server, data_dir):
    assert post(server.url, "/v1/track", track("before")).status == 200
    shutil.rmtree(data_dir)
    assert send(server.url, "GET", "/health").status == 200
    assert os.path.exists(os.path.join(data_dir, "events.jsonl"))
    assert post(server.url, "/v1/track", track("after")).status == 200
    os.remove(os.path.join(data_dir, "events.jsonl"))
    assert post(server.url, "/v1/track", track("after the file")).status == 200
    assert [event["userId"] for event in stored_events(data_dir)] == ["after the file"]


# -- property tests: size limits at the exact byte, and any input gets a contract answer ----------

EVENT_LIMIT = 1024
BATCH_LIMIT = 4096

json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 53), 2 ** 53)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3),
                           max_leaves=8)
identifiers = st.text(min_size=1, max_size=20).filter(lambda text: text.strip() == text)
valid_events = st.fixed_dictionaries(
    {"userId": identifiers, "event": identifiers},
    optional={"anonymousId": identifiers,
              "properties": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
              "context": st.fixed_dictionaries({"library": st.fixed_dictionaries(
                  {"name": identifiers})}),
              "timestamp": st.just("2026-11-26T10:00:00.123+01:00")})
#: Events whose every known field may hold any JSON value: a type that is a list, an id that is an
#: object, a timestamp that is a number...
event_shaped = st.dictionaries(
    st.sampled_from(["type", "userId", "anonymousId", "event", "messageId", "properties",
                     "traits", "context", "integrations", "timestamp", "sentAt", "previousId",
                     "groupId", "name", "receivedAt", "request_ip"]), json_values, max_size=8)
json_bodies = (st.builds(lambda events: {"batch": events}, st.lists(event_shaped, max_size=4))
               | event_shaped | json_values).map(lambda value: json.dumps(value).encode())


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory):
    settings_ = dict(max_event_bytes=EVENT_LIMIT, max_batch_bytes=BATCH_LIMIT, port=0, quiet=True,
                     data_dir=str(tmp_path_factory.mktemp("limits")))
    with rudderlite.running(**settings_) as running_server:
        yield running_server


def padded_to(body: bytes, size: int) -> bytes:
    """The same JSON with trailing white space up to exactly ``size`` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


hypothesis_settings = settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_exact_limit(server, path, at_limit: bytes, over_limit: bytes, gzipped: bool,
                       events: int):
    """The body at the limit is accepted whole; one byte more is 413 and stores nothing."""
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    encode = gzip.compress if gzipped else bytes
    before = len(server.received(KEY))
    assert post(server.url, path, encode(at_limit), headers=headers).status == 200
    reply = post(server.url, path, encode(over_limit), headers=headers)
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    assert len(server.received(KEY)) == before + events


@hypothesis_settings
@given(event=valid_events, gzipped=st.booleans())
def test_single_event_body_of_exactly_the_limit_is_accepted_one_more_byte_is_413(
        limits_server, event, gzipped):
    body = json.dumps(event, ensure_ascii=False).encode()
    assume(len(body) < EVENT_LIMIT)
    assert_exact_limit(limits_server, "/v1/track", padded_to(body, EVENT_LIMIT),
                       padded_to(body, EVENT_LIMIT + 1), gzipped, events=1)


@hypothesis_settings
@given(events=st.lists(valid_events, min_size=1, max_size=5), gzipped=st.booleans())
def test_batch_body_of_exactly_the_limit_is_accepted_one_more_byte_is_413(limits_server, events,
                                                                          gzipped):
    body = json.dumps({"batch": [{"type": "track", **event} for event in events]}).encode()
    assume(len(body) < BATCH_LIMIT)
    assume(all(len(rudderlite.encode_json(event)) < EVENT_LIMIT - 20 for event in events))
    assert_exact_limit(limits_server, "/v1/batch", padded_to(body, BATCH_LIMIT),
                       padded_to(body, BATCH_LIMIT + 1), gzipped, events=len(events))


def event_of_encoded_size(event: dict, size: int) -> dict:
    """The event with a ``pad`` property making its compact JSON exactly ``size`` bytes."""
    padded = {**event, "type": "track", "properties": {**event.get("properties", {}), "pad": ""}}
    missing = size - len(json.dumps(padded, ensure_ascii=False, separators=(",", ":")).encode())
    padded["properties"]["pad"] = "x" * missing
    return padded


@hypothesis_settings
@given(event=valid_events, gzipped=st.booleans())
def test_batch_event_of_exactly_the_event_limit_is_accepted_one_more_byte_is_413(
        limits_server, event, gzipped):
    assume(len(json.dumps(event, ensure_ascii=False).encode()) < EVENT_LIMIT - 100)
    at_limit = {"batch": [track(), event_of_encoded_size(event, EVENT_LIMIT)]}
    over_limit = {"batch": [track(), event_of_encoded_size(event, EVENT_LIMIT + 1)]}
    assert_exact_limit(limits_server, "/v1/batch", json.dumps(at_limit).encode(),
                       json.dumps(over_limit).encode(), gzipped, events=2)


CLIENT_ANSWERS = {rudderlite.INVALID_JSON, rudderlite.EMPTY_BATCH, rudderlite.NOT_AN_EVENT,
                  rudderlite.NO_IDENTITY, rudderlite.REQUEST_TOO_LARGE}


@settings(max_examples=120, deadline=None)
@given(body=st.binary(max_size=300) | json_bodies,
       type_from_path=st.sampled_from([None, *rudderlite.EVENT_TYPES]), strict=st.booleans())
def test_any_body_gives_events_or_one_of_the_contract_answers(body, type_from_path, strict):
    config = rudderlite.Config(strict=strict, max_event_bytes=200)
    try:
        stored = rudderlite.process_body(body, type_from_path, config,
                                         "2026-11-26T10:00:00.000Z", "127.0.0.1")
    except rudderlite.Rejection as rejection:
        assert rejection.answer in CLIENT_ANSWERS or (strict and rejection.answer.status == 400)
    else:
        assert all(json.loads(event.line) for event in stored)
        assert rudderlite.events_summary(stored)


@settings(max_examples=200, deadline=None)
@given(compressed=st.binary(max_size=200) | st.builds(gzip.compress, st.binary(max_size=3000)))
def test_any_gzip_body_inflates_within_the_limit_or_is_refused(compressed):
    try:
        assert len(rudderlite.inflate_gzip(compressed, 1000)) <= 1000
    except rudderlite.Rejection as rejection:
        assert rejection.answer in (rudderlite.INVALID_JSON, rudderlite.REQUEST_TOO_LARGE)


@hypothesis_settings
@given(body=st.binary(max_size=600) | json_bodies,
       path=st.sampled_from(["/v1/track", "/v1/batch", "/v1/alias", "/beacon/v1/batch?writeKey=k"]),
       gzipped=st.booleans())
def test_any_body_over_the_wire_is_answered_by_the_contract(limits_server, body, path, gzipped):
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    reply = post(limits_server.url, path, gzip.compress(body) if gzipped else body,
                 headers=headers)
    allowed = {(200, "ok"), *[(answer.status, answer.message) for answer in CLIENT_ANSWERS]}
    assert (reply.status, reply.text) in allowed


HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Host", "Authorization", "Origin", "Expect",
                "Connection", "Content-Encoding", "X-Forwarded-For",
                "Access-Control-Request-Headers", "X-Other"]
header_values = st.text(max_size=20).map(lambda text: text.replace("\r", "").replace("\n", ""))
heads = st.builds(
    lambda method, target, version, fields: (f"{method} {target} {version}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in fields) + "\r\n").encode("utf-8"),
    st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT", "G\u00e9T"]),
    st.sampled_from(["/v1/track", "/v1/batch", "/health", "/rudderlite/events?wait=x",
                     "/beacon/v1/batch?writeKey=k", "http://localhost/health", "*", "/%ff"]),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=5))


@settings(hypothesis_settings, max_examples=100)
@given(head=heads, body=st.binary(max_size=40))
def test_any_head_gets_an_answer_never_a_500_and_no_error_is_logged(limits_server, head, body,
                                                                   caplog):
    with raw_connection(limits_server) as client:
        client.send(head + body)
        client.sock.shutdown(socket.SHUT_WR)  # all this client sends: no wait for more
        with contextlib.suppress(AssertionError):  # a connection closed without an answer is fine
            status_head, _answer = client.answer()
            assert not status_head.startswith(b"HTTP/1.1 5"), status_head
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


HTTP_PIECES = [b"POST ", b"GET ", b"/v1/track", b"/v1/batch", b" HTTP/1.1", b" HTTP/1.0", b"\r\n",
               b"\n", b"\r", b":", b" ", b"Content-Length: 5", b"Expect: 100-continue",
               b"Transfer-Encoding: chunked", b"0\r\n", b"ffffffff", b"\x00", b"\xff",
               b"Authorization: Basic dGVzdDo=", b"Content-Encoding: gzip", b"{}"]
http_ish_bytes = st.lists(st.sampled_from(HTTP_PIECES) | st.binary(max_size=20),
                          max_size=30).map(b"".join)


@settings(hypothesis_settings, max_examples=60)
@given(sent=http_ish_bytes)
def test_any_bytes_on_a_connection_leave_the_server_answering(limits_server, sent, caplog):
    with raw_connection(limits_server) as client:
        client.send(sent)
        client.sock.shutdown(socket.SHUT_WR)
        client.rest_until_closed()
    assert send(limits_server.url, "GET", "/health").status == 200
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@hypothesis_settings
@given(event=valid_events, event_type=st.sampled_from(rudderlite.EVENT_TYPES),
       batched=st.booleans())
def test_what_is_stored_is_what_was_sent_plus_the_enrichment(limits_server, event, event_type,
                                                              batched):
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


# -- never lose an acknowledged event; never fall over ---------------------------------------------


class LoadSenders:
    """Threads sending batches over keep-alive connections until stopped or refused."""

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
            body = batch_of(*[track(messageId=f"{batch_id}/{n}")
                              for n in range(self.events_per_batch)])
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
    assert set(counts.values()) <= {1}
    for batch_id in senders.acknowledged:
        assert all(counts.get(f"{batch_id}/{n}") == 1 for n in range(senders.events_per_batch))


def test_sigkill_under_load_keeps_every_acknowledged_event_exactly_once(processes, data_dir):
    process = processes()
    senders = LoadSenders(process.url)
    senders.wait_for(300)
    process.popen.kill()
    senders.stop()
    process.popen.wait()
    assert processes().stop() == 0  # a restart sets aside a line a kill may have torn
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
            request = ids[position:position + 3]
            assert [message_id.split("/")[1] for message_id in request] == ["0", "1", "2"]
            assert len({message_id.split("/")[0] for message_id in request}) == 1


def limit_file_size_to_20_kb():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_failed_write_is_500_health_says_why_whole_lines_stay_and_it_recovers(processes,
                                                                             data_dir):
    process = processes(preexec_fn=limit_file_size_to_20_kb)
    acknowledged = []
    padded = {"pad": "x" * 700}
    for number in range(100):
        reply = post(process.url, "/v1/track", track(event=f"e{number}", properties=padded))
        if reply.status != 200:
            break
        acknowledged.append(f"e{number}")
    assert (reply.status, reply.text) == (500, "failed to store events")
    assert [event["event"] for event in stored_events(data_dir)] == acknowledged  # nothing torn
    health = send(process.url, "GET", "/health")
    assert (health.status, health.text) == (503, "cannot store events: the last write failed: "
                                                 "File too large")
    assert post(process.url, "/v1/track", track(event="refused", properties=padded)).status == 500
    resource.prlimit(process.popen.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert post(process.url, "/v1/track", track(event="after")).status == 200
    assert send(process.url, "GET", "/health").status == 200
    assert process.stop() == 0
    assert [event["event"] for event in stored_events(data_dir)] == acknowledged + ["after"]
    assert "Traceback" not in process.stderr
    assert "could not store 1 events" in process.stderr


@pytest.fixture
def quick_watchdog(monkeypatch):
    """The watchdog looks for connections past their deadline every 20 ms instead of every
    quarter of a second, for the tests that wait for a deadline to pass."""
    monkeypatch.setattr(rudderlite, "WATCHDOG_SECONDS", 0.02)


def test_slow_headers_are_cut_and_idle_connections_do_not_block_others(make_server,
                                                                       quick_watchdog):
    server = make_server(head_timeout=0.1)
    idle = [raw_connection(server) for _ in range(100)]
    slowloris = raw_connection(server)
    slowloris.send(b"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
    try:
        assert post(server.url, "/v1/track", track()).status == 200
        slowloris.send(b"b")
        assert slowloris.rest_until_closed() == b""  # cut once its head took over head_timeout
    finally:
        for client in idle + [slowloris]:
            client.close()


def test_an_idle_connection_lasts_its_idle_timeout_and_no_longer(make_server, quick_watchdog):
    server = make_server(idle_timeout=0.2, head_timeout=60, body_timeout=60, answer_timeout=60)
    with raw_connection(server) as client:
        client.sock.settimeout(10)  # far past the idle timeout, far short of the others
        client.send(request_head("GET", "/health"))
        client.answer()
        time.sleep(0.1)  # half the idle timeout: still open
        client.send(request_head("GET", "/health"))
        assert client.answer()[0].startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert client.rest_until_closed() == b""
    assert time.monotonic() - started >= 0.15  # closed by the deadline, not at once


def test_connections_over_the_cap_get_503_with_retry_after(make_server):
    server = make_server(max_connections=5)
    held = [raw_connection(server) for _ in range(5)]
    for client in held:  # each is admitted and served: they hold their slots
        client.send(request_head("GET", "/health"))
        client.answer()
    try:
        with raw_exchange(server, request_head("GET", "/health")) as client:
            status_head, answer = client.answer()
            assert client.rest_until_closed() == b""
        assert status_head.startswith(b"HTTP/1.1 503") and answer == b"too many connections"
        assert b"\r\nRetry-After: 1\r\n" in status_head + b"\r\n"
    finally:
        for client in held:
            client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a freed slot serves again once the server saw them go
        with raw_exchange(server, request_head("GET", "/health")) as client:
            status_head, _answer = client.answer()
        if not status_head.startswith(b"HTTP/1.1 503"):
            break
    assert status_head.startswith(b"HTTP/1.1 200")


def test_clients_leaving_mid_request_leave_no_traceback(processes, data_dir):
    process = processes()
    head = request_head("POST", "/v1/track").replace(b"Content-Length: 0",
                                                     b"Content-Length: 1000")
    for partial in [head + b'{"userId"', head, b"POST /v1/tr", b"GET /health HTTP/1.1\r\nHo"]:
        with socket.create_connection(process.address) as sock:
            sock.sendall(partial)
    with socket.create_connection(process.address) as sock:  # leaves before reading its answer
        sock.sendall(request_head("POST", "/v1/track", json.dumps(track()).encode()))
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


def test_a_request_that_arrives_as_sigterm_does_is_answered_or_not_taken(processes, data_dir):
    """The server is paused while a request reaches an idle keep-alive connection and SIGTERM
    is sent; resumed, it either answers that request or never stores it."""
    for attempt in range(3):
        process = processes()
        with RawClient(process.address) as client:
            client.send(request_head("GET", "/health"))
            client.answer()  # the connection is now idle, between two requests
            os.kill(process.popen.pid, signal.SIGSTOP)
            name = f"racing {attempt}"
            client.send(request_head("POST", "/v1/track", json.dumps(track(event=name)).encode()))
            os.kill(process.popen.pid, signal.SIGTERM)
            os.kill(process.popen.pid, signal.SIGCONT)
            try:
                answered = client.answer()[0].startswith(b"HTTP/1.1 200")
            except (AssertionError, ConnectionResetError):
                answered = False
        assert process.popen.wait(30) == 0
        stored = [event for event in stored_events(data_dir) if event["event"] == name]
        assert len(stored) == answered, f"stored {len(stored)}, answered {answered}"


def test_a_request_worked_on_past_its_body_deadline_is_still_answered(make_server,
                                                                      quick_watchdog):
    """The request's body is read, then it waits for its turn to be parsed (the test holds the
    whole parsing budget of its lane); its body deadline passes meanwhile. The server accepted
    it, so it must answer it, however long its turn takes (here longer than a body deadline)."""
    server = make_server(body_timeout=0.3)
    answers = []
    with server.parsing.small.reserve(server.config.max_batch_bytes):
        sender = threading.Thread(target=lambda: answers.append(
            post(server.url, "/v1/track", track(event="waited")).status))
        sender.start()
        with raw_connection(server) as late:  # a body deadline that starts after the sender's
            late.send(request_head("POST", "/v1/track").replace(b"Content-Length: 0",
                                                                b"Content-Length: 10") + b"{")
            assert late.rest_until_closed() == b""  # the watchdog ran past both deadlines
    sender.join(30)
    assert answers == [200]
    assert [event["event"] for event in stored_events(server.config.data_dir)] == ["waited"]


def test_a_small_body_never_waits_behind_a_large_one():
    lanes = rudderlite.ParsingLanes(small_body_bytes=1000, budget_bytes=4000)
    small_done = threading.Event()

    def parse_small():
        with lanes.reserve(500):
            small_done.set()

    with lanes.reserve(4000):  # a batch holds the whole budget of its lane
        threading.Thread(target=parse_small).start()
        assert small_done.wait(10)


def test_stop_is_immediate_whatever_the_poll_interval(tmp_path):
    server = rudderlite.make_server(rudderlite.Config(port=0, data_dir=str(tmp_path), quiet=True))
    serving = threading.Thread(target=server.serve_forever, args=(3600,))
    serving.start()
    assert send(server.url, "GET", "/health").status == 200
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    stopping.join(10)
    serving.join(10)
    assert not stopping.is_alive() and not serving.is_alive()


def test_an_event_nested_deeper_than_a_later_decoding_can_go_never_breaks_the_api(server):
    depth = 900
    nested = {"userId": "u", "event": "deep", "properties": {"p": json.loads("[" * depth
                                                                              + "]" * depth)}}
    for _ in range(3):
        reply = post(server.url, "/v1/track", nested)
        if reply.status == 400:  # too deep for this stack even to take in: fine too
            depth -= 100
            nested["properties"]["p"] = json.loads("[" * depth + "]" * depth)
    post(server.url, "/v1/track", track(event="plain"))
    assert inspect(server)[-1]["event"] == "plain"
    assert send(server.url, "GET", "/rudderlite/events?event=plain").status == 200


def test_missed_is_said_even_after_the_key_was_forgotten(make_server, monkeypatch):
    monkeypatch.setattr(rudderlite, "MAX_COUNTED_KEYS", 3)
    server = make_server(history_events=3)
    cursor = inspect_answer(server)["cursor"]
    post(server.url, "/v1/batch", batch_of(*[track(event=f"e{n}") for n in range(5)]))
    for number in range(4):  # four other keys: the first key's counts are forgotten
        post(server.url, "/v1/track", track(), key=f"other-{number}")
    assert inspect_answer(server, f"?after={cursor}")["missed"] is True


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1))


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                                reason="reads memory use from /proc (Linux)")


@needs_proc
def test_long_write_keys_do_not_grow_the_history_past_its_bound(processes):
    """The history holds a digest of each key, not the key: 250 events with a 40,000-character key
    would otherwise hold 10 MB."""
    process = processes("--history-events", "250")
    connection = http.client.HTTPConnection(*process.address, timeout=30)
    long_key = "k" * 40_000
    post(process.url, "/v1/track", track(), key=long_key, connection=connection)
    before = resident_kib(process.popen.pid)
    for _ in range(250):
        assert post(process.url, "/v1/track", track(), key=long_key,
                    connection=connection).status == 200
    assert resident_kib(process.popen.pid) - before < 5_000


@needs_proc
def test_unique_long_ids_do_not_grow_the_rudder_id_cache(processes):
    """Only short ids are cached: 780 unique 30 KB ids would otherwise hold 23 MB. Two batches
    first, for the memory any batch takes (up to 8 MB more than after the first, as measured)."""
    process = processes("--history-bytes", "100000")

    def batch(number):
        return batch_of(*[track(f"{number}-{n}-" + "i" * 30_000) for n in range(130)])

    for number in range(2):
        assert post(process.url, "/v1/batch", batch(number)).status == 200
    before = resident_kib(process.popen.pid)
    for number in range(2, 8):
        assert post(process.url, "/v1/batch", batch(number)).status == 200
    assert resident_kib(process.popen.pid) - before < 12_000


@needs_proc
def test_slow_readers_of_a_full_history_hold_no_copy_of_it(processes):
    process = processes()
    batch = batch_of(*[track(properties={"pad": "x" * 300}) for _ in range(100)])
    for _ in range(50):
        post(process.url, "/v1/batch", batch)  # 5,000 events, about 2.5 MB of lines
    before = resident_kib(process.popen.pid)
    readers = [RawClient(process.address) for _ in range(20)]
    for reader in readers:
        reader.send(request_head("GET", "/rudderlite/events"))
        reader.head()  # and then stops reading: its answer waits in the server
    try:
        assert send(process.url, "GET", "/health").status == 200
        assert resident_kib(process.popen.pid) - before < 20_000  # not 20 copies of the history
    finally:
        for reader in readers:
            reader.close()


def test_gzip_batches_are_inflated_one_budget_at_a_time(make_server, monkeypatch):
    """Small gzip bodies that each inflate to the batch limit wait for the parsing budget before
    they inflate, so that a hundred of them cannot take a hundred times the limit at once."""
    inflating, most = [], []
    real_inflate = rudderlite.inflate_gzip

    def counted_inflate(compressed, limit):
        inflating.append(limit)
        most.append(len(inflating))
        time.sleep(0.01)  # long enough for another to start, were it allowed to
        try:
            return real_inflate(compressed, limit)
        finally:
            inflating.pop()

    monkeypatch.setattr(rudderlite, "inflate_gzip", counted_inflate)
    server = make_server(max_batch_bytes=1024 * 1024)
    body = gzip.compress(json.dumps(batch_of(track())).encode()[:-1] + b" " * 1_000_000 + b"}")
    senders = [threading.Thread(target=post, args=(server.url, "/v1/batch", body),
                                kwargs={"headers": {"Content-Encoding": "gzip"}})
               for _ in range(20)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert len(server.received(KEY)) == 20 and max(most) == 1


def test_fsync_always_shares_fsyncs_between_concurrent_requests(tmp_path):
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=2 ** 40, fsync="always")
    start = threading.Barrier(16)

    def append_fifty():
        start.wait()
        for number in range(50):
            store.append(json.dumps(track(event=f"e{number}")).encode() + b"\n")

    writers = [threading.Thread(target=append_fifty, daemon=True) for _ in range(16)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    assert not any(writer.is_alive() for writer in writers), "an append waited for ever"
    store.close()
    assert len(stored_events(str(tmp_path))) == 800
    assert 0 < store.fsyncs < 800


def test_fsync_always_syncs_each_append_made_alone(tmp_path):
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=2 ** 40, fsync="always")
    for number in range(5):
        store.append(json.dumps(track(event=f"e{number}")).encode() + b"\n")
        assert store.fsyncs == number + 1
    store.close()


def test_fsync_interval_syncs_what_was_written_after_its_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(rudderlite, "FSYNC_INTERVAL_SECONDS", 0.2)  # the second, shortened
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=2 ** 40, fsync="interval")
    store.append(json.dumps(track()).encode() + b"\n")
    assert store.fsyncs == 0  # not at the append
    deadline = time.monotonic() + 5
    while store.fsyncs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the interval thread gives no other sign
    store.close()
    assert store.fsyncs >= 1


@pytest.mark.parametrize("mode", ["interval", "always", "off"])
def test_a_file_is_fsynced_before_it_is_renamed_unless_fsync_is_off(tmp_path, monkeypatch, mode):
    """What the OS is asked, in order: with fsync on, each rotated file's lines reach the disk
    before its new name does, so that a power cut cannot leave a name without its lines."""
    calls = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(rudderlite.os, "fsync",
                        lambda fd: calls.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(rudderlite.os, "rename", lambda old, new: calls.append(
        ("rename", os.stat(old).st_ino)) or real_rename(old, new))
    store = rudderlite.EventStore(str(tmp_path), rotate_bytes=100, fsync=mode)
    for number in range(5):
        store.append(json.dumps(track(event=f"e{number}", pad="x" * 50)).encode() + b"\n")
    renamed = [inode for call, inode in calls if call == "rename"]
    assert len(renamed) == 4
    for inode in renamed:
        rename_at = calls.index(("rename", inode))
        assert (("fsync", inode) in calls[:rename_at]) == (mode != "off")
    store.close()


@pytest.mark.parametrize("mode", ["always", "interval"])
def test_fsync_modes_store_every_concurrent_request(processes, data_dir, mode):
    process = processes("--fsync", mode)
    senders = LoadSenders(process.url, threads=8)
    senders.wait_for(200)
    senders.stop()
    assert process.stop() == 0
    assert_each_acknowledged_event_stored_once(data_dir, senders)


# -- contract checks: warnings by default, 400 under --strict --------------------------------------

ALL_TYPES = "track, identify, page, screen, group, alias"
# (an event of a batch, the message; the event's index is put before it in a batch)
VIOLATIONS = [
    ({"userId": "u", "event": "x"}, f"type: missing is not one of {ALL_TYPES}"),
    ({"type": "Track", "userId": "u", "event": "x"}, f'type: "Track" is not one of {ALL_TYPES}'),
    ({"type": ["track"], "userId": "u", "event": "x"},
     f'type: ["track"] is not one of {ALL_TYPES}'),
    ({"type": {"a": 1}, "userId": "u", "event": "x"}, f'type: {{"a":1}} is not one of {ALL_TYPES}'),
    ({"type": "track", "userId": "u"}, 'event: track needs a non-empty "event"'),
    ({"type": "track", "userId": "u", "event": " "}, 'event: track needs a non-empty "event"'),
    ({"type": "track", "userId": "u", "event": 7}, 'event: track needs a non-empty "event"'),
    ({"type": "alias", "userId": "u"}, 'previousId: alias needs "previousId"'),
    ({"type": "alias", "userId": "u", "previousId": None}, 'previousId: alias needs "previousId"'),
    ({"type": "group", "userId": "u", "groupId": ""}, 'groupId: group needs "groupId"'),
    *[({"type": "identify", "userId": "u", field: value}, f"{field}: must be an object, not {kind}")
      for field in rudderlite.OBJECT_FIELDS
      for value, kind in [([], "array"), ("x", "string"), (1, "number")]],
    *[({"type": "identify", "userId": "u", field: value},
       f"{field}: must be an RFC 3339 date-time like 2026-11-26T10:00:00Z")
      for field in rudderlite.TIMESTAMP_FIELDS
      for value in ["2026-11-26", "2026-11-26 10:00:00", "2026-13-01T00:00:00Z", "yesterday",
                    1732615200, "2026-11-00T10:00:00Z", "2026-11-32T10:00:00Z",
                    "2026-11-26T24:00:00Z", "2026-11-26T10:00:00+24:00"]],
    ({"type": "identify", "userId": "u", "messageId": 5},
     "messageId: must be a string, not number"),
    ({"type": "identify", "userId": {"id": 1}}, "userId: must be a string or a number, not object"),
    ({"type": "identify", "userId": "u", "anonymousId": True},
     "anonymousId: must be a string or a number, not boolean"),
]


@pytest.mark.parametrize("event,message", VIOLATIONS)
def test_violation_is_a_warning_by_default(server, data_dir, event, message):
    assert post(server.url, "/v1/batch", {"batch": [{"type": "track", **track()}, event]}
                ).status == 200
    stored = server.received(KEY)
    assert stored[1]["warnings"] == [f"batch[1].{message}"]
    assert "warnings" not in stored[0]
    assert all("warnings" not in event for event in stored_events(data_dir))  # only events there


@pytest.mark.parametrize("event,message", VIOLATIONS)
def test_violation_is_400_under_strict(make_server, event, message):
    server = make_server(strict=True)
    for path in ["/v1/batch", f"/beacon/v1/batch?writeKey={KEY}"]:
        reply = post(server.url, path, {"batch": [{"type": "track", **track()}, event]})
        assert (reply.status, reply.text) == (400, f"batch[1].{message}")
    assert stored_events(server.config.data_dir) == []


def test_single_event_violation_has_no_index_and_type_comes_from_path(make_server):
    server = make_server(strict=True)
    reply = post(server.url, "/v1/alias", {"userId": "u", "type": "whatever"})
    assert (reply.status, reply.text) == (400, 'previousId: alias needs "previousId"')
    assert post(server.url, "/v1/identify", {"userId": "u", "type": "whatever"}).status == 200


@pytest.mark.parametrize("event", [
    {"type": "page", "userId": "", "anonymousId": "a", "properties": None, "context": {},
     "integrations": {"All": True}, "originalTimestamp": "2026-11-26T12:02:23.989368+00:00",
     "sentAt": "2026-11-26T12:02:23.989Z"},
    {"type": "track", "userId": None, "anonymousId": 7, "event": "e",
     "timestamp": "2026-11-26t10:00:00.1-05:30"},
    {"type": "group", "userId": "u", "groupId": 12, "traits": {},
     "timestamp": "2026-02-29T23:59:60Z"},
    {"type": "alias", "userId": "u", "previousId": "p", "messageId": "node-next-1-x"},
])
def test_conforming_events_carry_no_warning(make_server, event):
    server = make_server(strict=True)
    assert post(server.url, "/v1/batch", {"batch": [event]}).status == 200
    assert "warnings" not in server.received(KEY)[0]


# -- the inspection API ----------------------------------------------------------------------------


def test_an_event_is_visible_as_soon_as_its_200_arrives(server):
    for number in range(20):
        assert post(server.url, "/v1/track", track(event=f"e{number}")).status == 200
        assert inspect(server)[-1]["event"] == f"e{number}"


def test_filters(server):
    post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m1",
         "properties": {"orderId": 42, "total": 9.5}, "context": {"app": {"name": "web"}}},
        {"type": "track", "userId": "u2", "event": "Order Completed",
         "properties": {"orderId": "43", "total": 10}},
        {"type": "identify", "anonymousId": "a1", "context": {"app": {"name": "ios"}}},
        {"type": "page", "userId": "u1", "properties": {"flag": True, "none": None,
                                                        "list": [1, "a"], "object": {"b": 2}}},
    ]})

    def names(query):
        return [event.get("event") or event["type"] for event in inspect(server, query)]

    assert names("?type=track") == ["Order Completed", "Order Completed"]
    assert names("?event=Order%20Completed&userId=u2") == ["Order Completed"]
    assert names("?userId=u1") == ["Order Completed", "page"]
    assert names("?anonymousId=a1") == ["identify"]
    assert names("?messageId=m1") == ["Order Completed"]
    assert names("?properties.orderId=42") == ["Order Completed"]  # a number, as a number
    assert names("?properties.orderId=42.0") == ["Order Completed"]
    assert names("?properties.orderId=43") == ["Order Completed"]  # a string, as it is
    assert names("?properties.total=10.0&properties.total=9.5") == ["Order Completed"] * 2
    assert names("?type=identify&type=page") == ["identify", "page"]  # repeated: either value
    assert names("?context.app.name=web") == ["Order Completed"]
    assert names("?properties.flag=true&properties.none=null") == ["page"]
    assert names('?properties.list=[1,"a"]&properties.object={"b":2}') == ["page"]
    assert names("?properties.missing=") == []


def test_bad_query_is_400_and_its_line_says_which_parameter(processes):
    process = processes()
    for query, says in [("?limit=x", "limit"), ("?wait=nan", "wait"), ("?wait=-1", "wait"),
                        ("?wait=1e400", "wait"), ("?min=-2", "min"), ("?limit=-1", "limit"),
                        ("?after=x", "after"), ("?valid=yes", "valid"), ("?min=%D9%A3", "min")]:
        for path in ["/rudderlite/events", "/rudderlite/rejected"]:
            reply = send(process.url, "GET", path + query)
            assert (reply.status, reply.text) == (400, "invalid query parameter"), query
            assert f"({says} takes" in process.wait_for_line("invalid query parameter")
    # what an app sent, only: the inspection API's own refusals are not among the rejected
    assert inspect_answer(process, path="/rudderlite/rejected")["rejected"] == []


def test_each_key_sees_only_its_own(server):
    post(server.url, "/v1/track", track(event="for A"), key="key-a")
    post(server.url, "/v1/track", track(event="for B"), key="key-b")
    post(server.url, "/v1/track", {"event": "refused"}, key="key-b")
    assert [event["event"] for event in inspect(server, key="key-a")] == ["for A"]
    assert [event["event"] for event in inspect(server, key="key-b")] == ["for B"]
    assert inspect_answer(server, key="key-a", path="/rudderlite/rejected")["rejected"] == []
    assert len(inspect_answer(server, key="key-b", path="/rudderlite/rejected")["rejected"]) == 1
    assert send(server.url, "GET", "/rudderlite/stats", key="key-a").json() == \
        {"accepted": {"track": 1}, "rejected": {}, "valid": 1, "invalid": 0}
    assert post(server.url, "/rudderlite/reset", b"", key="key-a").status == 200
    assert inspect(server, key="key-a") == [] and len(inspect(server, key="key-b")) == 1


def test_inspection_needs_an_allowed_key(make_server):
    server = make_server(write_keys=(KEY,))
    for method, path in [("GET", "/rudderlite/events"), ("GET", "/rudderlite/rejected"),
                         ("GET", "/rudderlite/stats"), ("POST", "/rudderlite/reset")]:
        assert send(server.url, method, path, key=None).text == \
            "failed to read writekey from header"
        assert send(server.url, method, path, key="nope").text == "invalid write key"
        assert send(server.url, method, path).status == 200


def test_long_poll_answers_once_enough_events_match(server):
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(
        inspect(server, "?event=late&wait=60&min=3")))
    cursor = server.cursor
    waiter.start()
    for number in range(3):
        post(server.url, "/v1/track", track(event="late" if number != 1 else "other"))
    post(server.url, "/v1/track", track(event="late"))
    waiter.join(30)
    assert not waiter.is_alive(), "the long-poll did not answer when its third event arrived"
    assert len(answers[0]) >= 3 and {event["event"] for event in answers[0]} == {"late"}
    assert server.cursor == cursor + 4


def test_long_poll_answers_what_it_has_when_the_time_is_up(server):
    post(server.url, "/v1/track", track(event="only one"))
    assert [event["event"] for event in inspect(server, "?wait=0.1&min=5")] == ["only one"]


def test_a_long_poll_outlives_the_body_deadline(make_server, quick_watchdog):
    """A request without a body is the server's work once its head is read: no client deadline
    cuts a long-poll short."""
    server = make_server(body_timeout=0.05)
    post(server.url, "/v1/track", track())
    assert len(inspect(server, "?wait=0.25&min=5")) == 1


def test_waiting_is_capped(make_server, monkeypatch):
    monkeypatch.setattr(rudderlite, "MAX_WAIT_SECONDS", 0.1)
    server = make_server()
    assert inspect(server, "?wait=3600&min=5") == []  # answered after 0.1 s, not an hour


def test_stopping_a_server_answers_a_pending_long_poll(tmp_path):
    with rudderlite.running(port=0, data_dir=str(tmp_path), quiet=True) as server:
        client = raw_connection(server)
        client.send(request_head("GET", "/health")
                    + request_head("GET", "/rudderlite/events?wait=60&min=1"))
        assert client.answer()[0].startswith(b"HTTP/1.1 200")  # the long-poll is read next
    head, body = client.answer()  # stop() returned after answering it
    client.close()
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["events"] == []


def test_rejected_records_status_message_path_time_and_body(server):
    body = json.dumps({"event": "no ids", "pad": "x" * 2000})
    post(server.url, "/v1/track", body)
    [rejected] = inspect_answer(server, path="/rudderlite/rejected")["rejected"]
    assert rejected["status"] == 400
    assert rejected["message"] == "request neither has anonymousId nor userId"
    assert rejected["path"] == "/v1/track" and RECEIVED_AT.fullmatch(rejected["receivedAt"])
    assert rejected["body"] == body[:1024]


def test_stats_and_reset(server):
    post(server.url, "/v1/batch", batch_of(track(), track()))
    post(server.url, "/v1/identify", {"userId": "u"})
    post(server.url, "/v1/track", {"userId": "u"})  # a contract warning: not valid
    post(server.url, "/v1/track", b"nope")
    post(server.url, "/v1/batch", {"batch": []})
    assert send(server.url, "GET", "/rudderlite/stats").json() == \
        {"accepted": {"track": 3, "identify": 1}, "rejected": {"400": 2}, "valid": 3,
         "invalid": 1}
    post(server.url, "/rudderlite/reset", b"")
    assert send(server.url, "GET", "/rudderlite/stats").json() == \
        {"accepted": {}, "rejected": {}, "valid": 0, "invalid": 0}
    assert inspect(server) == []
    assert inspect_answer(server, path="/rudderlite/rejected")["rejected"] == []
    assert len(stored_events(server.config.data_dir)) == 4  # the files are untouched


def test_valid_keeps_the_events_with_or_without_warnings(server):
    post(server.url, "/v1/batch", {"batch": [{"type": "track", **track()},
                                             {"type": "track", "userId": "u"}]})
    assert [event.get("event") for event in inspect(server, "?valid=true")] == ["Order Completed"]
    [invalid] = inspect(server, "?valid=false")
    assert invalid["warnings"] == ['batch[1].event: track needs a non-empty "event"']


def test_history_is_bounded_to_the_newest_events_and_bytes(make_server):
    server = make_server(history_events=5, history_bytes=10_000)
    for number in range(12):
        post(server.url, "/v1/track", track(event=f"e{number}"))
    assert [event["event"] for event in inspect(server)] == [f"e{n}" for n in range(7, 12)]
    post(server.url, "/v1/batch", batch_of(*[track(properties={"pad": "x" * 3000})] * 4))
    assert len(inspect(server)) == 2  # 4 events of 3 KB and their overhead pass 10,000 bytes
    assert len(stored_events(server.config.data_dir)) == 16


# -- the cursor ------------------------------------------------------------------------------------


def test_a_cursor_returns_only_what_came_after_it_in_order(server):
    first = inspect_answer(server)
    assert first["events"] == [] and first["missed"] is False
    post(server.url, "/v1/batch", batch_of(*[track(event=f"e{n}") for n in range(5)]))
    following = inspect_answer(server, f"?after={first['cursor']}")
    assert [event["event"] for event in following["events"]] == [f"e{n}" for n in range(5)]
    assert following["cursor"] > first["cursor"]
    assert inspect_answer(server, f"?after={following['cursor']}")["events"] == []


def test_with_a_cursor_limit_keeps_the_first_ones_and_nothing_is_seen_twice(server):
    post(server.url, "/v1/batch", batch_of(*[track(event=f"e{n}") for n in range(7)]))
    seen, cursor = [], 0
    for _ in range(4):
        answer = inspect_answer(server, f"?after={cursor}&limit=3")
        seen += [event["event"] for event in answer["events"]]
        cursor = answer["cursor"]
    assert seen == [f"e{n}" for n in range(7)]
    assert [event["event"] for event in inspect(server, "?limit=2")] == ["e5", "e6"]


def test_a_cursor_with_wait_waits_for_new_events_only_and_follows_filters(server):
    post(server.url, "/v1/track", track(event="old"))
    cursor = inspect_answer(server)["cursor"]
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(inspect_answer(
        server, f"?after={cursor}&wait=30&min=2&event=new")))
    waiter.start()
    for name in ["other", "new", "other", "new"]:
        post(server.url, "/v1/track", track(event=name))
        post(server.url, "/v1/track", track(event="new"), key=OTHER_KEY)  # another key's
    waiter.join(30)
    assert [event["event"] for event in answers[0]["events"]] == ["new", "new"]


def test_cursors_only_grow_across_resets_and_are_one_sequence(server):
    post(server.url, "/v1/track", track())
    post(server.url, "/v1/track", b"{")
    events_cursor = inspect_answer(server)["cursor"]
    rejected_cursor = inspect_answer(server, path="/rudderlite/rejected")["cursor"]
    assert events_cursor == rejected_cursor  # one sequence for events and rejections
    post(server.url, "/rudderlite/reset", b"")
    assert inspect_answer(server)["cursor"] == events_cursor
    post(server.url, "/v1/track", track(event="after the reset"))
    answer = inspect_answer(server, f"?after={events_cursor}")
    assert [event["event"] for event in answer["events"]] == ["after the reset"]
    assert answer["cursor"] > events_cursor and answer["missed"] is False


def test_rejected_follows_a_cursor_too(server):
    cursor = inspect_answer(server, path="/rudderlite/rejected")["cursor"]
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(inspect_answer(
        server, f"?after={cursor}&wait=30&min=1", path="/rudderlite/rejected")))
    waiter.start()
    post(server.url, "/v1/track", b"{")
    waiter.join(30)
    assert [record["message"] for record in answers[0]["rejected"]] == ["invalid json"]


def test_an_answer_says_when_the_history_dropped_what_came_after_its_cursor(make_server):
    server = make_server(history_events=3)
    cursor = inspect_answer(server)["cursor"]
    post(server.url, "/v1/batch", batch_of(*[track(event=f"e{n}") for n in range(5)]))
    answer = inspect_answer(server, f"?after={cursor}")
    assert answer["missed"] is True
    assert [event["event"] for event in answer["events"]] == ["e2", "e3", "e4"]
    assert inspect_answer(server, f"?after={answer['cursor']}")["missed"] is False


def test_a_cursor_from_a_server_that_ran_before_restarts_following(make_server):
    first = make_server()
    post(first.url, "/v1/track", track())
    old_cursor = inspect_answer(first)["cursor"]
    second = make_server()
    post(second.url, "/v1/track", track(event="in the new run"))
    answer = inspect_answer(second, f"?after={old_cursor}&wait=30&min=1")
    assert [event["event"] for event in answer["events"]] == ["in the new run"]


# -- embedding: the pytest fixture of the README ---------------------------------------------------


@pytest.fixture
def rudderstack(tmp_path):
    """The README's fixture, as a user would paste it."""
    with rudderlite.running(port=0, data_dir=str(tmp_path / "events")) as running_server:
        yield running_server


def sign_up_in_the_background(url, delay):
    """What an SDK does: send from its own thread, a moment after the app called it."""
    def send_later():
        request = urllib.request.Request(
            url + "/v1/batch", method="POST", headers={"Authorization": basic_auth("test-key")},
            data=json.dumps(batch_of(track("ada", "Signed Up"))).encode())
        urllib.request.urlopen(request, timeout=30).read()

    timer = threading.Timer(delay, send_later)
    timer.start()
    return timer


def test_readme_fixture_waits_for_what_an_sdk_sends_late(rudderstack):
    sign_up_in_the_background(rudderstack.url, delay=0.1)
    [event] = rudderstack.wait_for("test-key", event="Signed Up")
    assert event["userId"] == "ada"


def test_wait_for_says_what_came_instead_when_the_time_is_up(rudderstack):
    sign_up_in_the_background(rudderstack.url, delay=0).join(30)
    with pytest.raises(AssertionError, match="Signed Up"):
        rudderstack.wait_for("test-key", count=1, timeout=0.1, event="Logged In")
    with pytest.raises(AssertionError, match="1 more arrived with other keys"):
        rudderstack.wait_for("another-key", timeout=0.05)


def test_received_and_wait_for_follow_a_cursor(rudderstack):
    sign_up_in_the_background(rudderstack.url, delay=0).join(30)
    cursor = rudderstack.cursor
    assert rudderstack.received("test-key", after=cursor) == []
    sign_up_in_the_background(rudderstack.url, delay=0.1)
    assert len(rudderstack.wait_for("test-key", after=cursor, event="Signed Up")) == 1
    assert len(rudderstack.received("test-key", event="Signed Up")) == 2


# -- what a person sees: one line per request, --print, the live page ------------------------------

LINE_TIME = r"^\d\d:\d\d:\d\d\.\d{3} "


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    """One real rudderlite process, with its line per request on standard error, for the
    tests of what those lines say; each test reads the lines its own requests left."""
    process = Process(str(tmp_path_factory.mktemp("talking")), "--max-event-bytes", "200")
    yield process
    process.stop()


def lines_of(process, act):
    """The lines that ``act(connection)`` leaves on the process's standard error: those between
    two marks, two refused requests made before and after it on the same connection. A line is
    written after its answer is sent, so only on one connection is the order of two lines that of
    their requests."""
    mark = uuid.uuid4().hex
    connection = http.client.HTTPConnection(*process.address, timeout=30)
    try:
        send(process.url, "GET", f"/before-{mark}", connection=connection)
        process.wait_for_line(f"/before-{mark}")
        act(connection)
        send(process.url, "GET", f"/after-{mark}", connection=connection)
    finally:
        connection.close()
    lines = []
    while True:
        line = process.lines.get(timeout=30)
        if f"/after-{mark}" in line:
            return lines
        lines.append(line)


def posting(path, body, **options):
    """An act for ``lines_of``: one POST on its connection."""
    return lambda connection: send(f"http://{connection.host}:{connection.port}", "POST", path,
                                   body, connection=connection, **options)


def test_a_line_names_each_event_of_a_small_request_and_who_sent_it(talking):
    [single] = lines_of(talking, posting("/v1/track",
                                         track("ada", "Signed Up", anonymousId="a1")))
    assert re.search(LINE_TIME + r'200 /v1/track track "Signed Up" · user ada, anonymous a1$',
                     single)
    [small_batch] = lines_of(talking, posting("/v1/batch", {"batch": [
        {"type": "page", "anonymousId": "a9", "name": "Home"}, {"type": "identify", "userId": "bo"},
        {"type": "track", "userId": "bo", "event": "Clicked"}]}))
    assert small_batch.endswith('200 /v1/batch page "Home", identify, track "Clicked" · user bo')
    [page] = lines_of(talking, posting("/v1/page", {"anonymousId": "a9"}))
    assert page.endswith("200 /v1/page page · anonymous a9")


def test_a_large_batch_is_one_readable_line(talking):
    events = ([track(f"user{n}", "Order Completed") for n in range(60)]
              + [track(f"user{n}", "Clicked") for n in range(30)]
              + [{"type": "page", "anonymousId": f"a{n}", "name": "Home"} for n in range(10)])
    [line] = lines_of(talking, posting("/v1/batch", {
        "batch": [{"type": "track", **event} for event in events]}))
    assert line.endswith('200 /v1/batch 100 events: 90 track ("Order Completed" ×60, '
                         '"Clicked" ×30), 10 page ("Home" ×10) · user user0, user1 +58')


def test_warnings_are_counted_in_the_requests_line_with_the_first_one(talking):
    [line] = lines_of(talking, posting("/v1/batch", {
        "batch": [{"type": "track", "userId": "u"}] * 500}))  # one line, not one an event
    assert line.endswith('· 500 warnings (batch[0].event: track needs a non-empty "event")')


def test_a_refusal_says_status_message_and_detail(talking):
    [too_large] = lines_of(talking, posting("/v1/batch", batch_of(
        track(), track(properties={"pad": "x" * 300}))))
    assert re.search(LINE_TIME + r"413 POST /v1/batch request size exceeds max limit \(batch\[1\] "
                     r"is \d+ bytes as compact JSON, over --max-event-bytes 200\)$", too_large)
    [no_key] = lines_of(talking, posting("/v1/track", track(), key=None))
    assert no_key.endswith("401 POST /v1/track failed to read writekey from header")


def test_other_requests_leave_a_line_only_when_refused(talking):
    def requests(connection):
        for path in ["/health", "/version", "/rudderlite/events", "/rudderlite/",
                     "/sourceConfig/"]:
            assert send(talking.url, "GET", path, connection=connection).status == 200
        send(talking.url, "OPTIONS", "/v1/track", key=None, connection=connection)
        send(talking.url, "POST", "/health", key=None, connection=connection)

    [line] = lines_of(talking, requests)
    assert line.endswith("405 POST /health method not allowed")


def test_names_and_ids_cannot_move_the_terminal(talking):
    [line] = lines_of(talking, posting("/v1/track", track(
        "\x1b[2J\x1b[Hmallory", "\x1b]0;title\x07Bought\x9b31m")))
    assert "\x1b" not in line and "\x07" not in line and "\x9b" not in line
    assert "mallory" in line and "Bought" in line


def test_a_type_or_a_strict_message_cannot_forge_or_split_a_line(processes):
    process = processes("--strict")
    forged = "\x1b[2K\r\x1b[32m10:00:00.000 200 /v1/track track \"Forged\"\x1b[0m\nsecond line"
    post(process.url, "/v1/batch", {"batch": [{"type": forged, "userId": "u"}]})
    post(process.url, "/v1/batch", {"batch": [{"type": "track", "userId": "u\u2028\u202e",
                                               "event": "\x7fx\x9b31m"}]})
    post(process.url, "/v1/batch", {"batch": [{"type": "tr\u202eack\u2028", "userId": "u"}]})
    assert process.stop() == 0
    refusals = [line for line in process.seen if " 400 " in line]
    assert len(refusals) == 2 and "second line" in refusals[0]  # one line each, as text
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u202e]", process.stderr.replace("\n", ""))


def read_terminal(master, pattern, timeout=30):
    """What a terminal shows until a line matches ``pattern``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern.encode(), seen):
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"the terminal never showed {pattern!r}: {seen!r}")
        seen += os.read(master, 65536)
    return seen


@pytest.mark.parametrize("no_color,coloured", [(None, True), ("", True), ("1", False)])
def test_colour_only_on_a_terminal_without_no_color(data_dir, no_color, coloured):
    master, terminal = pty.openpty()
    environment = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    if no_color is not None:
        environment["NO_COLOR"] = no_color
    process = Process(data_dir, env=environment, stderr=terminal)
    try:
        post(process.url, "/v1/track", track())
        post(process.url, "/v1/track", b"{")
        shown = read_terminal(master, "400 POST")
    finally:
        process.popen.terminate()
        process.popen.wait(30)
        os.close(master)
        os.close(terminal)
    assert (b"\x1b[32m" in shown and b"\x1b[31m" in shown) == coloured
    assert coloured or b"\x1b" not in shown


def test_no_colour_through_a_pipe(processes):
    process = processes()
    post(process.url, "/v1/track", b"{")
    process.wait_for_line("400")
    assert process.stop() == 0
    assert "\x1b" not in process.stderr


def test_print_writes_each_stored_event_to_standard_output_as_it_is_stored(processes, data_dir):
    process = processes("--print")
    assert process.first_line.startswith("rudderlite listening on")  # on standard error
    sent = [{"type": "identify", "userId": "ada"}, {"type": "track", **track("ada", "Signed Up")}]
    printed = []
    for event in sent:
        assert post(process.url, "/v1/batch", {"batch": [event]}).status == 200
        printed.append(process.popen.stdout.readline())  # there already: no waiting on a timer
    post(process.url, "/v1/batch", batch_of(track(), track()))
    printed += [process.popen.stdout.readline(), process.popen.stdout.readline()]
    assert process.stop() == 0
    assert process.popen.stdout.read() == b""  # nothing else on standard output
    with open(os.path.join(data_dir, "events.jsonl"), "rb") as file:
        assert printed == file.read().splitlines(keepends=True)


def test_the_readme_print_pipe_to_jq_works_as_written(data_dir):
    if not shutil.which("jq"):
        pytest.skip("jq is not installed: apt-get install -y jq")
    command = readme_recipe("print").strip()
    assert command == """python3 rudderlite.py --print | jq 'select(.event == "Signed Up")'"""
    server_command, jq_command = command.split(" | ")
    server = subprocess.Popen(server_command.split()[:2] + ["--port", "0", "--data-dir", data_dir,
                                                            "--print"],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    jq = subprocess.Popen(["jq", "select(.event == \"Signed Up\")"], stdin=server.stdout,
                          stdout=subprocess.PIPE)
    server.stdout.close()
    try:
        url = server.stderr.readline().decode().split()[-1]
        post(url, "/v1/batch", batch_of(track("ada", "Signed Up"), track("ada", "Clicked")))
        post(url, "/v1/track", track("bo", "Signed Up"))
    finally:
        server.terminate()
        server.wait(30)
    output = jq.communicate(timeout=30)[0]
    found = [json.loads(part) for part in re.split(rb"(?<=\n})\n", output.strip())]
    assert [(event["userId"], event["event"]) for event in found] == [("ada", "Signed Up"),
                                                                     ("bo", "Signed Up")]


def test_print_to_a_reader_that_went_away_stops_printing_not_the_server(data_dir):
    server = subprocess.Popen(rudderlite_command("--port", "0", "--data-dir", data_dir, "--print"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_environment())
    try:
        url = server.stderr.readline().decode().split()[-1]
        server.stdout.close()  # as `| head -n 0` does
        for number in range(3):
            assert post(url, "/v1/track", track(event=f"e{number}")).status == 200
    finally:
        server.terminate()
        errors = server.communicate(timeout=30)[1].decode()
    assert server.returncode == 0
    assert errors.count("stopped printing events") == 1
    assert len(stored_events(data_dir)) == 3


def test_print_to_a_reader_that_stopped_reading_holds_up_nothing(data_dir):
    """A pager left paused: standard output is a pipe nobody reads, far past its 64 KiB."""
    server = subprocess.Popen(rudderlite_command("--port", "0", "--data-dir", data_dir, "--print"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_environment())
    url = server.stderr.readline().decode().split()[-1]
    events = [track(f"u{n}", properties={"pad": "x" * 1000}) for n in range(300)]
    for event in events:  # about 400 KB to print, and nobody reads them
        assert post(url, "/v1/track", event).status == 200
    assert send(url, "GET", "/health").status == 200
    server.terminate()
    printed = server.stdout.read()  # the reader comes back: everything is printed, in order
    assert server.wait(30) == 0
    with open(os.path.join(data_dir, "events.jsonl"), "rb") as file:
        assert printed == file.read()


def test_the_page_is_served_without_credentials_and_asks_for_nothing_from_elsewhere(server):
    for path in ["/rudderlite/", "/rudderlite", "/rudderlite/?writeKey=KEY"]:
        reply = send(server.url, "GET", path, key=None)
        assert reply.status == 200 and reply.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in reply.headers["Content-Security-Policy"]
        assert "connect-src 'self'" in reply.headers["Content-Security-Policy"]
    page = reply.text
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing loaded elsewhere
    assert not re.search(r"https?://(?!localhost|127\.0\.0\.1)", page)
    assert not re.search(r"(fetch|open)\(\s*[\"'`]https?:", page)
    called = set(re.findall(r"/rudderlite/[a-z]+", page))
    assert called <= {"/rudderlite/events", "/rudderlite/rejected", "/rudderlite/reset",
                      "/rudderlite/stats"}
    assert {"/rudderlite/events", "/rudderlite/rejected", "/rudderlite/reset"} <= called
    assert "innerHTML" not in page  # event data is only ever text


# -- real SDKs: the bytes and headers each one sends, stdlib only ----------------------------------

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
        assert {key: kept[key] for key in sent if key != "type"} == \
            {key: value for key, value in sent.items() if key != "type"}
    return stored


def test_sdk_rudder_sdk_python(strict_server):
    """rudder-sdk-python 2.1.9: /v1/batch only, gzip, explicit null ids, context.traits."""
    library = {"name": "analytics-python", "version": "2.1.9"}
    events = [
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:23.989368+00:00",
         "context": {"library": library, "traits": {"email": "ada@example.com"}},
         "type": "identify", "userId": "ada", "messageId": str(uuid.uuid4()), "channel": "server"},
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:24.001204+00:00",
         "context": {"library": library}, "type": "track", "userId": "ada", "event": "Signed Up",
         "properties": {"plan": "pro", "seats": 3}, "messageId": str(uuid.uuid4()),
         "channel": "server"},
    ]
    body = json.dumps({"batch": events, "sentAt": "2026-11-26T12:02:24.5+00:00"}).encode()
    reply = post(strict_server.url, "/v1/batch", gzip.compress(body), headers={
        "Content-Type": "application/json", "User-Agent": "analytics-python/2.1.9",
        "Content-Encoding": "gzip"})
    assert (reply.status, reply.text) == (200, "ok")  # this SDK counts only 200 as success
    assert_stored_as_sent(strict_server, events)


def test_sdk_segment_analytics_python(strict_server):
    """segment-analytics-python 2.4.0: /v1/batch, no gzip, writeKey in the body, root traits."""
    library = {"name": "analytics-python", "version": "2.4.0"}
    events = [
        {"integrations": {}, "anonymousId": None, "timestamp": "2026-11-26T12:02:26.341+00:00",
         "context": {"library": library}, "type": "identify", "userId": "ada",
         "traits": {"name": "Ada"}, "messageId": str(uuid.uuid4())},
        {"integrations": {}, "anonymousId": "anon-1", "timestamp": "2026-11-26T12:02:26.342+00:00",
         "context": {"library": library}, "type": "group", "userId": None, "groupId": "g-1",
         "traits": {}},
    ]
    body = json.dumps({"batch": events, "sentAt": "2026-11-26T12:02:26.400+00:00", "writeKey": KEY})
    reply = post(strict_server.url, "/v1/batch", body, headers={
        "Content-Type": "application/json", "User-Agent": "analytics-python/2.4.0",
        "X-Retry-Count": "0"})
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_rudder_sdk_node(strict_server):
    """@rudderstack/rudder-sdk-node 3.0.13: gzip labelled as a form, top-level timestamp."""
    meta = {"nodeVersion": "20.20.2"}
    library = {"name": "analytics-node", "version": "3.0.13"}
    common = {"_metadata": meta, "originalTimestamp": SDK_TIME, "sentAt": SDK_TIME,
              "channel": "server"}
    events = [
        {"traits": {"name": "Ada"}, "userId": "ada", "type": "identify",
         "context": {"library": library, "traits": {"name": "Ada"}},
         "messageId": str(uuid.uuid4()), **common},
        {"event": "Signed Up", "properties": {"plan": "pro"}, "anonymousId": "anon-1",
         "type": "track", "context": {"library": library}, "messageId": str(uuid.uuid4()),
         **common},
        {"previousId": "anon-1", "userId": "ada", "type": "alias", "context": {"library": library},
         "messageId": str(uuid.uuid4()), **common},
    ]
    body = json.dumps({"batch": events, "timestamp": SDK_TIME, "sentAt": SDK_TIME},
                      separators=(",", ":"))
    reply = post(strict_server.url, "/v1/batch", gzip.compress(body.encode()), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip",
        "user-agent": "analytics-node/3.0.13", "Accept": "application/json, text/plain, */*"})
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_segment_analytics_node(strict_server):
    """@segment/analytics-node 3.1.0: messageIds that are not UUIDs, kept exactly as sent."""
    events = [{"type": "track", "event": "Signed Up", "userId": "ada",
               "properties": {"plan": "pro"},
               "context": {"library": {"name": "@segment/analytics-node", "version": "3.1.0"}},
               "integrations": {}, "_metadata": {"nodeVersion": "20.20.2", "jsRuntime": "node"},
               "timestamp": SDK_TIME, "messageId": f"node-next-1732615343989-{uuid.uuid4()}"}]
    body = json.dumps({"batch": events, "writeKey": KEY, "sentAt": SDK_TIME},
                      separators=(",", ":"))
    reply = post(strict_server.url, "/v1/batch", body, headers={
        "Content-Type": "application/json", "User-Agent": "analytics-node-next/latest"})
    assert reply.status == 200
    [stored] = assert_stored_as_sent(strict_server, events)
    assert stored["messageId"].startswith("node-next-")


BROWSER_ORIGIN = "http://127.0.0.1:5173"


def browser_event(event_type, anonymous_id="c1b7e4a8-0f5e-4c57-9a51-0d2cf5f2b3a1", **fields):
    """What @rudderstack/analytics-js v3 builds before identify: userId "" beside anonymousId."""
    sdk = {"name": "RudderLabs JavaScript SDK", "version": "3.34.1"}
    app = {**sdk, "namespace": "com.rudderlabs.javascript", "installType": "npm"}
    return {"channel": "web", "context": {"app": app, "library": sdk, "userAgent": "Mozilla/5.0",
                                          "locale": "en-US", "traits": {}},
            "type": event_type, "messageId": str(uuid.uuid4()), "originalTimestamp": SDK_TIME,
            "integrations": {"All": True}, "userId": "", "anonymousId": anonymous_id,
            "properties": {}, "sentAt": SDK_TIME, **fields}


def browser_headers(event):
    return {"Origin": BROWSER_ORIGIN, "Content-Type": "application/json;charset=UTF-8",
            "Accept": "application/json", "SentAt": SDK_TIME,
            "AnonymousId": base64.b64encode(event["anonymousId"].encode()).decode()}


def test_sdk_analytics_js_loads_its_config_then_sends_each_event(strict_server):
    """@rudderstack/analytics-js 3.34.1, XHR queue: config, preflights, then POST /v1/<type>."""
    server = strict_server
    config_path = (f"/sourceConfig/?p=npm&v=3.34.1&build=modern&writeKey={KEY}"
                   "&lockIntegrationsVersion=true&lockPluginsVersion=true")
    preflight = send(server.url, "OPTIONS", config_path, key=None, headers={
        "Origin": BROWSER_ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization"
    config = send(server.url, "GET", config_path,
                  headers={"Origin": BROWSER_ORIGIN, "Accept": "application/json"})
    assert config.status == 200
    assert config.headers["Access-Control-Allow-Origin"] == BROWSER_ORIGIN
    source = config.json()["source"]
    assert source["id"] and source["config"] == {} and source["enabled"] is True
    assert not source.get("destinations") and "statsCollection" not in config.text
    page_properties = {"path": "/", "url": BROWSER_ORIGIN + "/", "title": "Shop",
                       "referrer": "$direct", "search": "", "tab_url": BROWSER_ORIGIN + "/"}
    events = [browser_event("page", properties=page_properties, name="Home"),
              browser_event("track", event="Added to Cart"),
              browser_event("identify", userId="ada",
                            context={"traits": {"email": "ada@example.com"}}),
              browser_event("group", userId="ada", groupId="g-1", traits={}),
              browser_event("alias", userId="ada",
                            previousId="c1b7e4a8-0f5e-4c57-9a51-0d2cf5f2b3a1")]
    asked = "anonymousid,authorization,content-type,sentat"
    for event in events:
        path = f"/v1/{event['type']}"
        preflight = send(server.url, "OPTIONS", path, key=None, headers={
            "Origin": BROWSER_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        assert preflight.headers["Access-Control-Allow-Headers"] == asked
        reply = post(server.url, path, json.dumps(event), headers=browser_headers(event))
        assert reply.status == 200, reply.text
        assert reply.headers["Access-Control-Allow-Origin"] == BROWSER_ORIGIN
    assert_stored_as_sent(server, events)


def test_sdk_analytics_js_batch_mode(strict_server):
    events = [browser_event("track", event=f"Step {n}") for n in range(3)]
    reply = post(strict_server.url, "/v1/batch", json.dumps({"batch": events, "sentAt": SDK_TIME}),
                 headers=browser_headers(events[0]))
    assert reply.status == 200
    assert reply.headers["Access-Control-Allow-Origin"] == BROWSER_ORIGIN
    assert_stored_as_sent(strict_server, events)


def test_sdk_analytics_js_beacon_mode(strict_server):
    """sendBeacon: text/plain, the key in the query only, cookies, no preflight."""
    events = [browser_event("track", event="Left Page"), browser_event("page", name="Bye")]
    headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": BROWSER_ORIGIN,
               "Sec-Fetch-Mode": "no-cors", "Cookie": "rl_anonymous_id=RS_ENC_v3_abc; rl_session=x"}
    body = json.dumps({"batch": events, "sentAt": SDK_TIME})
    reply = post(strict_server.url, f"/beacon/v1/batch?writeKey={KEY}", body, key=None,
                 headers=headers)
    assert reply.status == 200
    assert_stored_as_sent(strict_server, events)


def test_sdk_node_oversized_event_is_413_and_rejected_names_it(make_server):
    """rudder-sdk-node sends an event over 32 KB anyway; the batch is refused, and says why."""
    server = make_server()
    events = [{"type": "track", "event": "small", "anonymousId": "a"},
              {"type": "track", "event": "huge", "anonymousId": "a",
               "properties": {"blob": "x" * 40_000}}]
    body = gzip.compress(json.dumps({"batch": events, "sentAt": SDK_TIME}).encode())
    reply = post(server.url, "/v1/batch", body, headers={
        "Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"})
    assert (reply.status, reply.text) == (413, "request size exceeds max limit")
    [rejected] = inspect_answer(server, path="/rudderlite/rejected")["rejected"]
    assert re.fullmatch(r"batch\[1\] is \d+ bytes as compact JSON, over --max-event-bytes 32768",
                        rejected["detail"])
    assert rejected["body"].startswith('{"batch"')


# -- the live page in a real browser ---------------------------------------------------------------
#
# Headless Chromium driven over the DevTools protocol with the standard library only: started with
# --remote-debugging-pipe, it reads protocol messages on its descriptor 3 and writes them on 4, each
# a JSON object followed by a NUL byte (no port, no websocket). A command {"id", "method", "params",
# "sessionId"} is answered by the message with the same id; every other message is an event. A tab
# is reached through Target.attachToTarget with flatten: its messages carry its sessionId. Every
# read waits until a deadline at most (select): a test fails, never hangs. The waiting for what the
# page shows is done in the page, by a promise that a MutationObserver resolves: no sleep.

#: Chromium (or Chrome) from the PATH; the tests that need it skip when there is none.
CHROMIUM = (shutil.which("chromium") or shutil.which("chromium-browser")
            or shutil.which("google-chrome"))
#: Headless as root, on a machine without network, without Chromium reaching for the network.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server", "--remote-debugging-pipe",
)
#: The descriptors Chromium's pipe handler reads commands from and writes answers to.
CHROMIUM_READS_FD = 3
CHROMIUM_WRITES_FD = 4


class ProtocolError(Exception):
    """A command answered with an error, or an evaluated expression that threw."""


class Browser:
    """One headless Chromium process and the protocol messages exchanged with it."""

    def __init__(self, executable=CHROMIUM, timeout=10.0):
        self.executable = executable
        #: Seconds one command may take unless told otherwise.
        self.timeout = timeout
        #: Every event received so far, as ``{"method", "params", "sessionId"}``, oldest first.
        self.events = []
        self._pid = None
        self._profile = None
        self._commands = None
        self._answers = None
        self._last_id = 0
        self._unread = b""

    # -- The process ---------------------------------------------------------------------------

    def start(self):
        """Start Chromium with a new profile, connected by two pipes; returns self."""
        self._profile = tempfile.mkdtemp(prefix="rudderlite-chromium-")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # Popen(pass_fds=...) keeps a descriptor under its own number only, and Chromium wants 3
        # and 4: posix_spawn places them (a dup2 in the child, safe with threads, as preexec_fn is
        # not). The child's ends are first moved above 4, so that neither can overwrite the other.
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
                      for fd in (commands_read, answers_write)]
        os.close(commands_read)
        os.close(answers_write)
        arguments = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}"]
        try:
            environment = {**os.environ, "TMPDIR": self._profile}  # its sockets go there too
            self._pid = os.posix_spawn(self.executable, arguments, environment, file_actions=[
                (os.POSIX_SPAWN_DUP2, child_ends[0], CHROMIUM_READS_FD),
                (os.POSIX_SPAWN_DUP2, child_ends[1], CHROMIUM_WRITES_FD),
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ], setsid=True)  # a process group of its own, so that close() ends its helpers too
        finally:
            for fd in child_ends:
                os.close(fd)
        try:
            self.call("Target.setDiscoverTargets", {"discover": True})  # answered: the pipes work
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Kill Chromium and the processes it started, and remove its profile. Safe to repeat."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)  # at once: SIGKILL cannot be caught or ignored
            self._pid = None
        for fd in (self._commands, self._answers):
            if fd is not None:
                os.close(fd)
        self._commands = None
        self._answers = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    # -- The protocol --------------------------------------------------------------------------

    def call(self, method, params=None, session=None, timeout=None):
        """Send one command and return its result; events arriving meanwhile go to ``events``."""
        self._last_id += 1
        command = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(json.dumps(command).encode() + b"\0", deadline)
        while True:
            message = self._receive(deadline, f"{method} was not answered in time")
            if message.get("id") == self._last_id:
                if "error" in message:
                    raise ProtocolError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def wait_for_event(self, method, session=None, since=0, timeout=None):
        """The first event ``method`` (of ``session`` when given) from index ``since`` of
        ``events`` on, read from Chromium when it has not arrived yet."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for event in self.events[since:]:
                if event["method"] == method and session in (None, event.get("sessionId")):
                    return event
            since = len(self.events)
            self._receive(deadline, f"no {method} event in time")

    def _send(self, data, deadline):
        while data:
            remaining = max(0.0, deadline - time.monotonic())
            if not select.select([], [self._commands], [], remaining)[1]:
                raise TimeoutError("Chromium does not read its commands")
            data = data[os.write(self._commands, data):]

    def _receive(self, deadline, what):
        """One message, read before ``deadline``; an event is also appended to ``events``."""
        while b"\0" not in self._unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._answers], [], [], remaining)[0]:
                raise TimeoutError(what)
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed its protocol pipe (it exited)")
            self._unread += chunk
        message, _, self._unread = self._unread.partition(b"\0")
        message = json.loads(message)
        if "id" not in message:
            self.events.append(message)
        return message

    # -- Pages ---------------------------------------------------------------------------------

    def open_page(self, url="about:blank", width=1280, height=800, page_class=None):
        """A new tab of ``width`` x ``height`` that has loaded ``url``, as a Page (or
        ``page_class``). Its Page, Runtime, Log and Network events are collected from the start."""
        first_event = len(self.events)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        page = (page_class or Page)(self, target, session, first_event)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        if url != "about:blank":
            page.navigate(url)
        return page


class Page:
    """One tab, attached with its own session."""

    def __init__(self, browser, target, session, first_event):
        self.browser = browser
        self.target = target
        self.session = session
        self._first_event = first_event

    def call(self, method, params=None, timeout=None):
        return self.browser.call(method, params, self.session, timeout)

    def events(self, method):
        """The parameters of every event ``method`` of this tab so far."""
        return [event["params"] for event in self.browser.events[self._first_event:]
                if event["method"] == method and event.get("sessionId") == self.session]

    def navigate(self, url):
        """Load ``url`` and wait for its load event."""
        since = len(self.browser.events)
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise ProtocolError(f"navigating to {url}: {answer['errorText']}")
        self.browser.wait_for_event("Page.loadEventFired", self.session, since)

    def evaluate(self, expression, await_promise=True, timeout=None):
        """The value of a JavaScript expression (awaited when it is a promise), as JSON."""
        answer = self.call("Runtime.evaluate", {
            "expression": expression, "awaitPromise": await_promise, "returnByValue": True,
            "userGesture": True,
        }, timeout)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise ProtocolError(details.get("exception", {}).get("description")
                                or details.get("text"))
        return answer["result"].get("value")

    def wait_for(self, condition, timeout=3.0):
        """Wait until the JavaScript expression ``condition`` is truthy, and return its value.

        The page checks it at once and after each change of its DOM (a MutationObserver): no
        polling. After ``timeout`` seconds the promise rejects: ProtocolError names the condition.
        """
        expression = """new Promise((resolve, reject) => {
            const check = () => {
                const value = (%s);
                if (value) { observer.disconnect(); clearTimeout(timer); resolve(value); }
            };
            const observer = new MutationObserver(check);
            const timer = setTimeout(() => {
                observer.disconnect();
                reject(new Error("timed out waiting for: " + %s));
            }, %d);
            observer.observe(document, {subtree: true, childList: true, attributes: true,
                                        characterData: true});
            check();
        })""" % (condition, json.dumps(condition), timeout * 1000)
        return self.evaluate(expression, timeout=timeout + self.browser.timeout)

    def screenshot(self, path):
        """Save what the tab shows as a PNG file."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as file:
            file.write(base64.b64decode(data))

    def close(self):
        self.browser.call("Target.closeTarget", {"targetId": self.target})


def live_server_settings(tmp_path_factory, **settings):
    return {"port": 0, "quiet": True, "data_dir": str(tmp_path_factory.mktemp("live")), **settings}


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with rudderlite.running(**live_server_settings(tmp_path_factory)) as running_server:
        yield running_server.url


@pytest.fixture
def start_server(tmp_path_factory):
    """Starts another server with other settings and returns its URL; all stop after the test."""
    with contextlib.ExitStack() as servers:
        yield lambda **settings: servers.enter_context(rudderlite.running(
            **live_server_settings(tmp_path_factory, **settings))).url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not installed: apt-get install -y chromium")
    with Browser() as started:
        yield started


@pytest.fixture
def write_key():
    """A key of its own for each test, so that no test sees another's events."""
    return f"page-test-{uuid.uuid4().hex[:8]}"


def rows_of(list_id):
    """JavaScript: the rows of the table ``events`` or ``rejected``, newest first."""
    return f"[...document.querySelectorAll('#{list_id} tbody tr')]"


def row_showing(text, list_id="events"):
    """JavaScript: the first visible row whose text contains ``text``, else null."""
    return (f"({rows_of(list_id)}.find((row) => !row.hidden && "
            f"row.textContent.includes({json.dumps(text)})) || null)")


class LivePage(Page):
    """The tab, with what a person does on the live page and what they read there."""

    def click(self, selector):
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def type_filter(self, text):
        self.evaluate(f"""{{
            const input = document.getElementById("filter");
            input.value = {json.dumps(text)};
            input.dispatchEvent(new Event("input"));
        }}""")

    def rows(self, list_id="events"):
        """The text of each cell of each visible row, newest row first."""
        return self.evaluate(f"""{rows_of(list_id)}.filter((row) => !row.hidden)
                                 .map((row) => [...row.cells].map((cell) => cell.textContent))""")

    def text_of(self, selector):
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")

    def is_hidden(self, element_id):
        return self.evaluate(f"document.getElementById({json.dumps(element_id)}).hidden")

    def status(self):
        return self.evaluate("[document.getElementById('status').className, "
                             "document.getElementById('status').textContent]")


def open_live_page(browser, url, write_key=None):
    """A tab showing the page (on ``write_key`` when given)."""
    query = "" if write_key is None else "?writeKey=" + urllib.parse.quote(write_key)
    return browser.open_page(f"{url}/rudderlite/{query}", page_class=LivePage)


@contextlib.contextmanager
def live_page(browser, url, write_key):
    """The page on ``write_key``, once its first answers are in; closed afterwards, when it must
    not have thrown any JavaScript exception."""
    page = open_live_page(browser, url, write_key)
    try:
        page.wait_for("document.querySelector('#status.live')")
        yield page
        assert page.events("Runtime.exceptionThrown") == []
    finally:
        page.close()


@pytest.fixture
def page(browser, server_url, write_key):
    with live_page(browser, server_url, write_key) as opened:
        yield opened


def sent(url, write_key, path, body):
    """POST ``body`` as an SDK does: the status and the answer's text."""
    reply = post(url, path, body, key=write_key, headers={"Content-Type": "application/json"})
    return reply.status, reply.text


def events_of(url, write_key):
    return send(url, "GET", "/rudderlite/events", key=write_key).json()["events"]


def web_track(name, **fields):
    return {"type": "track", "userId": "ada", "anonymousId": "anon-1", "event": name, **fields}


def test_the_page_loads_without_errors_and_talks_only_to_its_server(browser, server_url,
                                                                    write_key):
    with live_page(browser, server_url, write_key) as page:
        assert sent(server_url, write_key, "/v1/track", web_track("Signed Up")) == (200, "ok")
        page.wait_for(row_showing("Signed Up"))
        page.click("#events tbody tr")
        page.type_filter("signed")
        page.click("#tab-rejected")

        assert page.events("Runtime.exceptionThrown") == []
        assert [call for call in page.events("Runtime.consoleAPICalled")
                if call["type"] in ("error", "assert")] == []
        assert [added["entry"] for added in page.events("Log.entryAdded")
                if added["entry"]["level"] == "error"] == []
        urls = [sent["request"]["url"] for sent in page.events("Network.requestWillBeSent")]
        assert any(url.startswith(server_url + "/rudderlite/events?") for url in urls)
        # A data: URL (the page's empty icon) never leaves the page; all else goes to the server.
        assert [url for url in urls if not url.startswith((server_url + "/", "data:"))] == []


def test_without_a_write_key_the_page_asks_for_one_and_keeps_it_in_the_url(browser, server_url,
                                                                           write_key):
    page = open_live_page(browser, server_url)
    try:
        page.wait_for("!document.getElementById('key-form').hidden")
        assert page.is_hidden("app")
        urls = [sent["request"]["url"] for sent in page.events("Network.requestWillBeSent")]
        assert [url for url in urls if "/rudderlite/events" in url] == []  # no key, no data

        page.evaluate(f"""{{
            document.getElementById("key-input").value = {json.dumps(write_key)};
            document.getElementById("key-form").requestSubmit();
        }}""")
        page.wait_for("document.querySelector('#status.live')")
        assert page.evaluate("location.search") == f"?writeKey={write_key}"
        sent(server_url, write_key, "/v1/track", web_track("Opened From The Form"))
        page.wait_for(row_showing("Opened From The Form"))

        page.navigate(page.evaluate("location.href"))  # a reload opens the same key
        page.wait_for(row_showing("Opened From The Form"))
    finally:
        page.close()


def test_a_refused_write_key_is_shown_and_asked_for_again(browser, start_server):
    url = start_server(write_keys=("the-right-key",))
    page = open_live_page(browser, url, "a-wrong-key")
    try:
        message = page.wait_for("!document.getElementById('key-form').hidden && "
                                "document.getElementById('key-error').textContent")
        assert message == "rudderlite answered: invalid write key"
        assert page.evaluate("document.getElementById('key-input').value") == "a-wrong-key"
    finally:
        page.close()


def test_a_write_key_that_is_not_ascii_is_sent_as_utf8(browser, server_url):
    write_key = f"clé-ключ-鍵-{uuid.uuid4().hex[:6]}"
    with live_page(browser, server_url, write_key) as page:
        sent(server_url, write_key, "/v1/track", web_track("Ünïcödé Key"))
        page.wait_for(row_showing("Ünïcödé Key"))
        requests = [event["request"] for event in page.events("Network.requestWillBeSent")
                    if "/rudderlite/events" in event["request"]["url"]]
        assert {request["headers"].get("Authorization") for request in requests} == {
            basic_auth(write_key)}


# The live table

def test_events_appear_within_a_second_of_their_200_without_a_reload(page, server_url,
                                                                     write_key):
    page.evaluate("window.notReloaded = true")
    assert sent(server_url, write_key, "/v1/track", web_track("Signed Up")) == (200, "ok")
    answered = time.time()
    shown = page.wait_for(f"{row_showing('Signed Up')} && Date.now()") / 1000
    assert shown - answered < 1.0

    batch = [web_track(f"Step {number}") for number in (1, 2, 3)]
    assert sent(server_url, write_key, "/v1/batch", {"batch": batch})[0] == 200
    answered = time.time()
    shown = page.wait_for(f"{row_showing('Step 3')} && Date.now()") / 1000
    assert shown - answered < 1.0
    assert page.evaluate("window.notReloaded") is True
    assert [row[2] for row in page.rows()] == ["Step 3", "Step 2", "Step 1", "Signed Up"]
    time_shown, event_type, name, ids, problems = page.rows()[0]
    assert (event_type, ids, problems) == ("track", "adaanon-1", "")
    assert len(time_shown) == len("10:00:00.123")


def test_events_sent_before_the_page_opened_are_shown(browser, server_url, write_key):
    for name in ("Earlier", "Later"):
        sent(server_url, write_key, "/v1/track", web_track(name))
    sent(server_url, write_key, "/v1/page", {"anonymousId": "anon-2", "name": "Pricing"})
    sent(server_url, write_key, "/v1/group", {"userId": "ada", "groupId": "acme"})
    with live_page(browser, server_url, write_key) as page:
        page.wait_for(row_showing("Later"))
        assert [row[1:3] for row in page.rows()] == [
            ["group", "group acme"], ["page", "Pricing"], ["track", "Later"], ["track", "Earlier"]]


def test_a_click_on_a_row_shows_the_whole_event(page, server_url, write_key):
    event = web_track("Order Completed", context={"app": {"name": "web"}},
                  properties={"orderId": "o-1041", "products": [{"sku": "A-1", "qty": 2}]})
    sent(server_url, write_key, "/v1/track", event)
    page.wait_for(row_showing("Order Completed"))
    page.click("#events tbody tr")
    shown = page.wait_for("document.getElementById('detail-json').textContent")
    assert json.loads(shown) == events_of(server_url, write_key)[0]
    assert page.text_of("#detail-title") == "track Order Completed"
    assert page.evaluate("document.querySelector('#events tbody tr.selected') !== null")


def test_the_filter_hides_rows_that_do_not_match(page, server_url, write_key):
    sent(server_url, write_key, "/v1/batch", {"batch": [
        web_track("Product Viewed", properties={"color": "teal"}),
        web_track("Product Viewed", properties={"color": "red"}),
        web_track("Cart Viewed")]})
    page.wait_for(row_showing("Cart Viewed"))
    page.type_filter("TEAL")  # anywhere in the event's JSON, in any case
    assert [row[2] for row in page.rows()] == ["Product Viewed"]
    assert page.text_of("#count-events") == "1 of 3"

    sent(server_url, write_key, "/v1/track", web_track("Teal Button Clicked"))
    sent(server_url, write_key, "/v1/track", web_track("Checkout Started"))
    page.wait_for(f"{rows_of('events')}.length === 5")
    assert [row[2] for row in page.rows()] == ["Teal Button Clicked", "Product Viewed"]

    page.type_filter("")
    assert len(page.rows()) == 5


def test_pause_holds_new_events_and_resume_shows_them(page, server_url, write_key):
    sent(server_url, write_key, "/v1/track", web_track("Before Pause"))
    page.wait_for(row_showing("Before Pause"))
    page.click("#pause")
    sent(server_url, write_key, "/v1/track", web_track("During Pause 1"))
    sent(server_url, write_key, "/v1/batch", {"batch": [web_track("During Pause 2")]})
    page.wait_for("document.getElementById('status').textContent.includes('2 new events')")
    assert [row[2] for row in page.rows()] == ["Before Pause"]

    page.click("#pause")  # now labelled Resume
    page.wait_for(row_showing("During Pause 2"))
    assert [row[2] for row in page.rows()] == ["During Pause 2", "During Pause 1", "Before Pause"]
    assert page.text_of("#pause") == "Pause"


def test_reset_clears_the_page_and_the_server_and_following_goes_on(page, server_url,
                                                                    write_key):
    sent(server_url, write_key, "/v1/track", web_track("Before Reset"))
    sent(server_url, write_key, "/v1/batch", b"{not json")
    page.wait_for(row_showing("Before Reset"))
    page.click("#reset")
    page.wait_for(f"{rows_of('events')}.length === 0 && document.querySelector('#status.live')")
    assert page.evaluate(f"{rows_of('rejected')}.length") == 0
    assert events_of(server_url, write_key) == []

    sent(server_url, write_key, "/v1/track", web_track("After Reset"))
    page.wait_for(row_showing("After Reset"))
    assert [row[2] for row in page.rows()] == ["After Reset"]


def test_the_table_keeps_at_most_1000_rows(page, server_url, write_key):
    batch = [web_track(f"Event {number}") for number in range(1100)]
    assert sent(server_url, write_key, "/v1/batch", {"batch": batch})[0] == 200
    page.wait_for(row_showing("Event 1099"), timeout=10)
    assert page.evaluate(f"{rows_of('events')}.length") == 1000
    assert page.rows()[-1][2] == "Event 100"
    assert "1,000" in page.text_of(".hint")


# What went wrong: warnings, violations, refusals, lost events, lost connections

#: A plan under which ``properties.bad`` must be a string.
PLAN_OF_THE_PAGE_TESTS = {"id": "tp_page", "version": 1, "events": [
    {"name": name, "eventType": "track", "rules": {"properties": {"properties": {
        "properties": {"bad": {"type": ["string"]}}}}}} for name in ("Fine", "Priced", "")]}


def test_events_with_warnings_or_violations_are_marked(browser, start_server, write_key):
    server_url = start_server(tracking_plan=PLAN_OF_THE_PAGE_TESTS)
    with live_page(browser, server_url, write_key) as page:
        assert_problems_are_marked(page, server_url, write_key)


def assert_problems_are_marked(page, server_url, write_key):
    sent(server_url, write_key, "/v1/batch", {"batch": [
        web_track("Fine"),
        {"type": "track", "userId": "ada", "event": ""},  # no event name: a contract warning
        web_track("Priced", properties={"bad": True}),  # a tracking-plan violation
    ]})
    page.wait_for(row_showing("Priced"))
    priced, unnamed, fine = page.evaluate(f"""{rows_of('events')}.map((row) => ({{
        flagged: row.classList.contains("flagged"),
        background: getComputedStyle(row).backgroundColor,
        badges: [...row.querySelectorAll(".badge")].map((badge) =>
                                                        badge.className + " " + badge.textContent),
        problems: row.cells[4].textContent}}))""")
    assert (fine["flagged"], fine["badges"], fine["problems"]) == (False, [], "")
    assert unnamed["flagged"] and unnamed["badges"] == ["badge warning 1"]
    assert 'batch[1].event: track needs a non-empty "event"' in unnamed["problems"]
    assert priced["flagged"] and priced["badges"] == ["badge violation 1"]
    assert "Datatype-Mismatch at /properties/bad: must be string" in priced["problems"]
    assert priced["background"] != fine["background"]

    page.click("#events tbody tr")
    page.wait_for("document.getElementById('detail-problems').children.length")
    assert page.evaluate("[...document.querySelectorAll('#detail-problems li')]"
                         ".map((item) => item.className + ': ' + item.textContent)") == [
        "violation: Datatype-Mismatch at /properties/bad: must be string"]


def test_refused_requests_are_listed_with_their_message(page, server_url, write_key):
    assert sent(server_url, write_key, "/v1/batch", b'{"batch": [') == (400, "invalid json")
    too_large = web_track("Huge", properties={"blob": "x" * 40_000})
    answer = sent(server_url, write_key, "/v1/batch", {"batch": [web_track("Small"), too_large]})
    assert answer == (413, "request size exceeds max limit")
    page.click("#tab-rejected")
    page.wait_for(f"{rows_of('rejected')}.length === 2")
    assert page.is_hidden("events")
    too_large_row, invalid_row = page.rows("rejected")
    assert invalid_row[1:] == ["400", "/v1/batch", "invalid json",
                               "Expecting value: line 1 column 12 (char 11)", '{"batch": [']
    assert too_large_row[1:4] == ["413", "/v1/batch", "request size exceeds max limit"]
    assert too_large_row[4].startswith("batch[1] is ")
    assert page.text_of("#count-rejected") == "2"


def test_events_of_any_shape_are_shown(page, server_url, write_key):
    sent(server_url, write_key, "/v1/batch", {"batch": [
        {"type": "track", "userId": 42, "event": {"not": "a string"}, "context": "not an object",
         "properties": [1, 2]},
        {"type": "identify", "anonymousId": "anon-9", "warnings": "sent by the client"},
        {"type": "alias", "userId": "ada", "previousId": "anon-1",
         "context": {"violationErrors": [None, 7, {"meta": "odd"}]}},
    ]})
    page.wait_for(f"{rows_of('events')}.length === 3")
    alias, identify, odd_track = page.rows()
    assert odd_track[1:4] == ["track", '{"not":"a string"}', "42"]
    assert identify[1:5] == ["identify", "", "anon-9", ""]
    assert alias[1:3] == ["alias", "previously anon-1"]
    page.click("#events tbody tr")
    page.wait_for("document.getElementById('detail-problems').children.length === 3")


def test_event_data_is_shown_as_text_never_as_markup(page, server_url, write_key):
    attack = '<img src=x onerror="window.owned = true">'
    sent(server_url, write_key, "/v1/track", web_track(attack, userId="<b>ada</b>"))
    sent(server_url, write_key, "/v1/batch", b"<script>window.owned = true</script>")
    page.wait_for(row_showing(attack))
    page.click("#events tbody tr")
    page.click("#tab-rejected")
    page.wait_for(row_showing("<script>", "rejected"))
    page.click("#rejected tbody tr")
    assert page.evaluate("document.querySelectorAll('main img, main b, main script').length") == 0
    assert page.evaluate("window.owned") is None


def test_events_the_server_no_longer_holds_are_announced(browser, start_server, write_key):
    url = start_server(history_events=5)
    with live_page(browser, url, write_key) as page:
        assert page.is_hidden("missed")
        # Ten events at once in a history of five: five are gone before the page can ask.
        sent(url, write_key, "/v1/batch", {"batch": [web_track(f"Burst {n}") for n in range(10)]})
        page.wait_for("!document.getElementById('missed').hidden")
        assert [row[2] for row in page.rows()] == [f"Burst {n}" for n in range(9, 4, -1)]


def test_a_lost_connection_is_shown_retried_with_backoff_and_recovered(browser, start_server,
                                                                      write_key, tmp_path):
    first_run = rudderlite.make_server(rudderlite.Config(port=0, quiet=True,
                                                         data_dir=str(tmp_path))).start()
    port = first_run.server_port
    page = open_live_page(browser, first_run.url, write_key)
    try:
        page.wait_for("document.querySelector('#status.live')")
        first_run.stop()
        # The server is gone: the status line says so, and the page tries again 1 s, then 2 s later.
        page.wait_for("document.getElementById('status').textContent"
                      ".includes('trying again in 2 s')", timeout=6)
        assert page.status()[0] == "error"
        attempts = [request for request in page.events("Network.requestWillBeSent")
                    if "/rudderlite/events" in request["request"]["url"]]
        assert len(attempts) <= 4  # the first, the held one, two retries: no spinning

        url = start_server(port=port)  # back, as a new run of the server
        sent(url, write_key, "/v1/track", web_track("Back Again"))
        page.wait_for(row_showing("Back Again"), timeout=6)
        assert page.status()[0] == "live"
    finally:
        page.close()


# -- the README's recipes, run as written ----------------------------------------------------------


#: The shell GitHub Actions runs a step's script with.
ACTIONS_SHELL = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]


def test_readme_github_actions_step_runs_as_written_and_finds_its_own_server(tmp_path):
    script = readme_recipe("github-actions").split("run: |\n", 1)[1]
    script = "\n".join(line[4:] for line in script.splitlines())
    shutil.copy(os.path.join(HERE, "rudderlite.py"), tmp_path / "rudderlite.py")
    with socket.socket() as squatter:  # another server on 8080 must not fool the step
        with contextlib.suppress(OSError):
            squatter.bind(("127.0.0.1", 8080))
            squatter.listen()
        result = subprocess.run(ACTIONS_SHELL + [script], cwd=tmp_path, capture_output=True,
                                timeout=120, env={**os.environ, "RUNNER_TEMP": str(tmp_path)})
    assert result.returncode == 0, result.stderr.decode()
    assert [event["event"] for event in stored_events(str(tmp_path / "rudderlite"))] == \
        ["Order Completed"]


def test_readme_github_actions_step_fails_loudly_when_the_app_sent_nothing(tmp_path):
    script = readme_recipe("github-actions").split("run: |\n", 1)[1]
    script = "\n".join(line[4:] for line in script.splitlines() if "-d '{" not in line)
    script = script.replace("wait=10", "wait=0.1")  # nothing will come: no need to wait long
    shutil.copy(os.path.join(HERE, "rudderlite.py"), tmp_path / "rudderlite.py")
    result = subprocess.run(ACTIONS_SHELL + [script], cwd=tmp_path, capture_output=True,
                            timeout=120, env={**os.environ, "RUNNER_TEMP": str(tmp_path)})
    assert result.returncode != 0 and b"no Order Completed event" in result.stderr


MY_APP = '''
"""An app that tracks through an SDK-like client: from a background thread, a moment later."""
import base64, json, threading, urllib.request

settings = {}

def configure(data_plane_url, write_key):
    settings.update(url=data_plane_url, key=write_key)

def sign_up(user_id):
    def send():
        body = {"batch": [{"type": "track", "userId": user_id, "event": "Signed Up"}]}
        credentials = base64.b64encode((settings["key"] + ":").encode()).decode()
        request = urllib.request.Request(settings["url"] + "/v1/batch", json.dumps(body).encode(),
                                         {"Authorization": "Basic " + credentials})
        urllib.request.urlopen(request).read()
    threading.Timer(0.1, send).start()
'''


def check_out_posting(revenue) -> str:
    """The app's check-out, which sends an order from a background thread, a moment later."""
    return f'''
def check_out(user_id):
    event = {{"type": "track", "userId": user_id, "event": "Order Completed",
             "properties": {{"orderId": "o-1", "revenue": {revenue}, "currency": "EUR"}}}}
    credentials = base64.b64encode((settings["key"] + ":").encode()).decode()
    request = urllib.request.Request(settings["url"] + "/v1/batch",
                                     json.dumps({{"batch": [event]}}).encode(),
                                     {{"Authorization": "Basic " + credentials}})
    threading.Timer(0.1, lambda: urllib.request.urlopen(request).read()).start()
'''


@pytest.mark.parametrize("revenue,passes", [(49.9, True), ('"49.90"', False)])
def test_readme_pytest_fixtures_run_as_written_with_an_sdk_that_sends_late(pytester, revenue,
                                                                         passes):
    """A user's project with the README's two fixtures (the plain one and the tracking-plan one)
    and the README's plan: its tests pass when the app follows the plan, and the plan's fails,
    saying why, when the app sends a revenue as a string."""
    pytester.makepyfile(my_app=MY_APP + check_out_posting(revenue),
                        test_signup=readme_recipe("pytest"),
                        test_checkout=readme_recipe("pytest-plan"))
    (pytester.path / "plan.json").write_text(readme_recipe("plan"))
    shutil.copy(os.path.join(HERE, "rudderlite.py"), pytester.path / "rudderlite.py")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2 if passes else 1, failed=0 if passes else 1)
    assert passes or "must be number" in result.stdout.str()


def test_readme_jq_one_liner(server, data_dir):
    if not shutil.which("jq"):
        pytest.skip("jq is not installed: apt-get install -y jq")
    post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "ada", "event": "Upgraded", "properties": {"plan": "pro"}},
        {"type": "identify", "userId": "ada"}]})
    command = readme_recipe("jq").strip().replace("rudderlite-data/", data_dir + "/")
    output = subprocess.run(["bash", "-c", command], capture_output=True, check=True,
                            timeout=30).stdout
    assert json.loads(output) == {"event": "Upgraded", "userId": "ada", "plan": "pro"}


def readme_shell_lines():
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    blocks = re.findall(r"```(?:sh|yaml)\n(.*?)```", readme, re.S)
    return [line for block in blocks for line in block.splitlines()]


def test_the_readme_runs_python3_never_python():
    """Stock Debian and Ubuntu have only python3."""
    lines = readme_shell_lines()
    assert any("python3 rudderlite.py" in line for line in lines)
    assert not [line for line in lines if re.search(r"(^|[\s;&|(])python\s", line)]


def test_the_readme_curl_lines_run_as_written(server):
    """Every curl line of 'Send it events' against a real server, with URL and KEY as there."""
    with open(os.path.join(HERE, "README.md")) as file:
        section = file.read().split("## Send it events", 1)[1].split("```sh\n", 1)[1]
    script = section.split("```", 1)[0].replace("URL=http://127.0.0.1:8080", f"URL={server.url}")
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c",
                             script.replace("curl ", "curl -fsS ")], capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert len(server.received("KEY")) == 9


def project_files():
    listed = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else []
    return names or [name for name in os.listdir(HERE) if os.path.isfile(os.path.join(HERE, name))]


def test_the_project_cites_no_file_it_does_not_have():
    """Users never see the files behind the project; only what is in the repository may be named."""
    files = set(project_files())
    texts = {name: open(os.path.join(HERE, name), encoding="utf-8").read()
             for name in ("README.md", "rudderlite.py", "test_rudderlite.py") if name in files}
    for name, text in texts.items():
        for cited in set(re.findall(r"\b[A-Z_]{3,}\.md\b", text)):
            assert cited in {os.path.basename(path) for path in files}, f"{name} cites {cited}"
    for image in re.findall(r"\]\(([\w./-]+\.png)\)", texts.get("README.md", "")):
        assert os.path.exists(os.path.join(HERE, image)), image


def test_the_module_keeps_its_lines_within_100_characters():
    with open(os.path.join(HERE, "rudderlite.py"), encoding="utf-8") as file:
        long_lines = [number for number, line in enumerate(file, 1) if len(line.rstrip("\n")) > 100]
    assert long_lines == []


# -- tracking plans --------------------------------------------------------------------------------


def product_rule(**properties_schema):
    """A rule over the whole event: its properties an object of these properties."""
    return {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
            "required": ["properties"],
            "properties": {"properties": {"type": "object", "additionalProperties": False,
                                          **properties_schema}}}


PRODUCT_CLICKED = product_rule(properties={"sku": {"type": ["string"]},
                                           "price": {"type": ["number"], "minimum": 0}},
                               required=["sku"])
IDENTIFY_RULE = {"type": "object", "properties": {"traits": {
    "type": "object", "properties": {"email": {"type": "string", "format": "email"}}}}}

#: The same plan in each of RudderStack's shapes.
PLAN_SHAPES = {
    "api": {"id": "tp_api", "version": 3, "events": [
        {"name": "Product Clicked", "eventType": "track", "rules": PRODUCT_CLICKED},
        {"name": "", "eventType": "identify", "rules": IDENTIFY_RULE}]},
    "rules": {"id": "tp_rules", "version": 4, "rules": {
        "events": [{"name": "Product Clicked", "rules": PRODUCT_CLICKED}],
        "identify": IDENTIFY_RULE}},
    "ruddertyper": {"id": "tp_typer", "version": 5, "rules": {"events": [
        {"name": "Product Clicked", "eventType": "track", "rules": PRODUCT_CLICKED},
        {"name": "", "eventType": "identify", "rules": IDENTIFY_RULE}]}},
}

BAD_PRICE = {"type": "Datatype-Mismatch", "message": "must be number",
             "meta": {"instancePath": "/properties/price",
                      "schemaPath": "#/properties/properties/properties/price/type"}}
NO_SKU = {"type": "Required-Missing", "message": "must have required property 'sku'",
          "property": "sku", "meta": {"instancePath": "/properties",
                                      "schemaPath": "#/properties/properties/required"}}
COLOR = {"type": "Additional-Properties",
         "message": "must NOT have additional properties 'color'", "property": "color",
         "meta": {"instancePath": "/properties",
                  "schemaPath": "#/properties/properties/additionalProperties"}}
BAD_EMAIL = {"type": "Advance-Rules-Violation", "message": 'must match format "email"',
             "meta": {"instancePath": "/traits/email",
                      "schemaPath": "#/properties/traits/properties/email/format"}}


def context_of(event):
    return {key: event["context"][key] for key in ("trackingPlanId", "trackingPlanVersion",
                                                   "violationErrors")}


@pytest.mark.parametrize("shape", PLAN_SHAPES)
def test_each_plan_shape_gives_rudderstacks_verdicts(make_server, shape):
    plan = PLAN_SHAPES[shape]
    server = make_server(tracking_plan=plan)
    sent = [
        {"type": "track", "userId": "u", "event": "Product Clicked",
         "properties": {"sku": "A-1", "price": 9.5}},
        {"type": "track", "userId": "u", "event": "Product Clicked",
         "properties": {"price": "9.5", "color": "red"}},
        {"type": "identify", "userId": "u", "traits": {"email": "not an address"}},
        {"type": "identify", "userId": "u", "traits": {"email": "ada@example.com"}},
        {"type": "track", "userId": "u", "event": "Nobody Planned This"},
        {"type": "page", "userId": "u", "name": "Home"},
        {"type": "alias", "userId": "u", "previousId": "p"},
    ]
    assert post(server.url, "/v1/batch", {"batch": sent}).status == 200  # verdicts never refuse
    stored = stored_events(server.config.data_dir)
    assert [event["context"]["violationErrors"] for event in stored] == [
        [], [NO_SKU, COLOR, BAD_PRICE], [BAD_EMAIL], [],  # in Ajv's keyword order
        [{"type": "Unplanned-Event", "message": "no schema for event: Nobody Planned This",
          "meta": {}}],
        [], []]
    assert {(event["context"]["trackingPlanId"], event["context"]["trackingPlanVersion"])
            for event in stored} == {(plan["id"], plan["version"])}
    assert [event["context"] for event in server.received(KEY)] == \
        [event["context"] for event in stored]


def test_the_verdict_goes_into_the_context_as_rudder_server_writes_it(make_server):
    server = make_server(tracking_plan=PLAN_SHAPES["api"])
    post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {"sku": "a"},
         "context": {"app": {"name": "web"}}},
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {"sku": "a"},
         "context": None},
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {"sku": 1},
         "context": "not an object"}]})
    kept, created, left = stored_events(server.config.data_dir)
    assert kept["context"]["app"] == {"name": "web"} and kept["context"]["violationErrors"] == []
    assert context_of(created) == {"trackingPlanId": "tp_api", "trackingPlanVersion": 3,
                                   "violationErrors": []}
    assert left["context"] == "not an object"  # as rudder-server leaves it
    [flagged] = inspect(server, "?valid=false")
    assert flagged["context"] == "not an object"  # still known to break the plan


def test_an_empty_rule_is_an_unplanned_track_and_nothing_for_other_types(make_server):
    server = make_server(tracking_plan={"id": "tp", "version": 1, "events": [
        {"name": "Empty", "eventType": "track", "rules": {}},
        {"name": "", "eventType": "page", "rules": {}}]})
    post(server.url, "/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "Empty"},
                                             {"type": "page", "userId": "u"}]})
    track_event, page_event = stored_events(server.config.data_dir)
    assert track_event["context"]["violationErrors"] == [
        {"type": "Unplanned-Event", "message": "no schema for event: Empty", "meta": {}}]
    assert page_event["context"]["violationErrors"] == []


def test_valid_and_stats_count_plan_violations(make_server):
    server = make_server(tracking_plan=PLAN_SHAPES["api"])
    post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {"sku": "a"}},
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {}},
        {"type": "track", "userId": "u"}]})  # a contract warning, and unplanned
    assert [event["properties"] for event in inspect(server, "?valid=true")] == [{"sku": "a"}]
    assert len(inspect(server, "?valid=false")) == 2
    stats = send(server.url, "GET", "/rudderlite/stats").json()
    assert (stats["valid"], stats["invalid"]) == (1, 2)


def test_strict_refuses_the_first_violation_naming_the_event(make_server):
    server = make_server(tracking_plan=PLAN_SHAPES["api"], strict=True)
    reply = post(server.url, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "Product Clicked", "properties": {"sku": "a"}},
        {"type": "track", "userId": "u", "event": "Product Clicked",
         "properties": {"sku": "a", "price": -1}}]})
    assert (reply.status, reply.text) == (
        400, "batch[1]: Advance-Rules-Violation at /properties/price: must be >= 0")
    reply = post(server.url, "/v1/track", {"userId": "u", "event": "Product Clicked",
                                           "properties": {}})
    assert (reply.status, reply.text) == (
        400, "Required-Missing at /properties: must have required property 'sku'")
    assert stored_events(server.config.data_dir) == []


def test_the_plan_id_defaults_to_the_file_name(make_server, tmp_path):
    plan = {key: value for key, value in PLAN_SHAPES["api"].items() if key != "id"}
    path = tmp_path / "checkout-plan.json"
    path.write_text(json.dumps(plan))
    server = make_server(tracking_plan=str(path))
    post(server.url, "/v1/identify", {"userId": "u"})
    assert stored_events(server.config.data_dir)[0]["context"]["trackingPlanId"] == "checkout-plan"


@pytest.mark.parametrize("content,says", [
    (b"{not json", "not JSON"), (b"[]", "not a tracking plan"),
    (b'{"id": "x", "events": "no"}', "not a tracking plan")])
def test_a_plan_file_that_cannot_be_used_stops_the_start(tmp_path, content, says):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    result = subprocess.run(rudderlite_command("--port", "0", "--data-dir", str(tmp_path / "data"),
                                               "--tracking-plan", str(path)),
                            capture_output=True, timeout=30, env=child_environment())
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line == f"rudderlite: cannot use --tracking-plan {path}: {says}" or (
        line.startswith(f"rudderlite: cannot use --tracking-plan {path}: {says}: "))
    assert not os.path.exists(tmp_path / "data")


def test_a_plan_file_that_cannot_be_used_is_named_when_embedding_too(make_server, tmp_path):
    """``tracking_plan="plan.json"`` is read from the current directory: the error says which
    file it looked for."""
    for content, says in [(None, "No such file or directory"), (b"{", "not JSON"),
                          (b"[]", "not a tracking plan")]:
        path = tmp_path / "plan.json"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(rudderlite.PlanUnusable) as refused:
            make_server(tracking_plan=str(path))
        assert str(refused.value).startswith(f"{path}: {says}")


UNCOMPILABLE_RULES = [
    ({"properties": {"properties": {"properties": {"n": {"type": "float"}}}}},
     "/events/0/rules/properties/properties/properties/n/type"),
    ({"properties": {"properties": {"properties": {"n": {"pattern": "("}}}}},
     "/events/0/rules/properties/properties/properties/n/pattern"),
    ({"properties": {"properties": {"$ref": "#/$defs/nowhere"}}},
     "/events/0/rules/properties/properties/$ref"),
    ({"properties": {"properties": {"required": ["sku"], "properties": {}}}},
     "/events/0/rules/properties/properties/required"),
    ({"properties": {"properties": {"properties": {"n": {"format": "no-such-format"}}}}},
     "/events/0/rules/properties/properties/properties/n/format"),
]


@pytest.mark.parametrize("rule,pointer", UNCOMPILABLE_RULES)
def test_a_rule_ajv_would_refuse_is_said_once_and_its_events_pass_unchecked(make_server, tmp_path,
                                                                            caplog, rule, pointer):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"id": "tp", "version": 1, "events": [
        {"name": "Broken", "eventType": "track", "rules": rule},
        {"name": "Fine", "eventType": "track", "rules": PRODUCT_CLICKED}]}))
    server = make_server(tracking_plan=str(path))
    [said] = [record.getMessage() for record in caplog.records if pointer in record.getMessage()]
    assert '"Broken"' in said and said.endswith("its events pass unchecked")
    post(server.url, "/v1/batch", batch_of({"userId": "u", "event": "Broken",
                                            "properties": {"n": 1}},
                                           {"userId": "u", "event": "Fine", "properties": {}}))
    broken, fine = stored_events(server.config.data_dir)
    assert broken["context"]["violationErrors"] == []  # unchecked, as in RudderStack
    assert fine["context"]["violationErrors"] == [NO_SKU]
    with pytest.raises(rudderlite.PlanUnusable, match="--strict refuses a rule it cannot check"):
        make_server(tracking_plan=str(path), strict=True)


def test_strict_refuses_a_plan_with_a_rule_it_cannot_check_in_one_line(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"id": "tp", "version": 1, "events": [
        {"name": "Broken", "eventType": "track", "rules": UNCOMPILABLE_RULES[0][0]}]}))
    result = subprocess.run(rudderlite_command("--port", "0", "--data-dir", str(tmp_path / "data"),
                                               "--tracking-plan", str(path), "--strict"),
                            capture_output=True, timeout=30, env=child_environment())
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"rudderlite: cannot use --tracking-plan {path}: ")
    assert UNCOMPILABLE_RULES[0][1] in line


def test_an_edited_plan_is_used_from_the_next_request_and_a_broken_edit_keeps_the_last(processes,
                                                                                        tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"id": "tp", "version": 1, "events": []}))
    process = processes("--tracking-plan", str(path))
    assert process.wait_for_line("tracking plan").endswith(
        f"checking events against tracking plan tp, version 1, from {path}")
    post(process.url, "/v1/track", track())  # unplanned under version 1
    path.write_text(json.dumps({"id": "tp", "version": 2, "events": [
        {"name": "Order Completed", "eventType": "track", "rules": {}}]}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # surely a new modification time
    post(process.url, "/v1/track", track())
    process.wait_for_line("checking with version 2")
    path.write_text("{broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10 ** 9))
    post(process.url, "/v1/track", track())
    post(process.url, "/v1/track", track())
    assert process.stop() == 0
    stored = stored_events(process.data_dir)
    assert [event["context"]["trackingPlanVersion"] for event in stored] == [1, 2, 2, 2]
    assert process.stderr.count("still checking with the previous one") == 1


def test_the_request_line_counts_plan_violations(processes, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN_SHAPES["api"]))
    process = processes("--tracking-plan", str(path))
    post(process.url, "/v1/track", {"userId": "u", "event": "Product Clicked",
                                    "properties": {"price": "9"}})
    assert process.wait_for_line("/v1/track").endswith(
        '· 2 plan violations (Required-Missing at /properties: must have required property '
        "'sku')")


#: Real Ajv's verdicts, as rudder-transformer runs it (Ajv 8.18.0, ajv-formats 2.1.1, ajv-draft-04
#: 1.0.0; allErrors, strictRequired, allowUnionTypes, strict mode), on rules and events made to
#: cover every keyword, violation type, plan shape, trap and quirk: a case has a ``rule`` (the rule
#: of the event's entry) or a whole ``plan``, an ``event``, and either the ``expected`` violations
#: or ``problem: true`` (Ajv refuses the rule: its events pass unchecked).
with open(os.path.join(HERE, "testdata", "ajv_verdicts.json"), encoding="ascii") as verdicts:
    AJV_CASES = json.load(verdicts)


def plan_of_case(case):
    """The plan a case runs: its own, or its rule as the entry of the event's name and type."""
    if "plan" in case:
        return json.loads(json.dumps(case["plan"]))
    event = case["event"]
    entry = {"eventType": event.get("type"), "rules": case["rule"], "name": ""}
    if event.get("type") == "track":
        del entry["name"]
        if "event" in event:
            entry["name"] = event["event"]
    return {"id": "tp_cases", "version": 1, "events": [entry]}


@pytest.mark.parametrize("case", AJV_CASES, ids=[case["name"] for case in AJV_CASES])
def test_the_checker_gives_ajvs_verdict(case):
    plan = rudderlite.load_tracking_plan(plan_of_case(case), "cases")
    violations = plan.violations(json.loads(json.dumps(case["event"])))
    if case.get("problem"):
        assert plan.problems and violations == []
    else:
        assert violations == case["expected"]
        assert "rule" not in case or plan.problems == []


def over_the_wire(case):
    """Whether a case runs the same over HTTP: an event with an id, and a rule that does not close
    the event's root (rudderlite adds request_ip and rudderId to what it stores)."""
    rule, event = case.get("rule"), case["event"]
    return (isinstance(rule, dict) and event.get("type") in rudderlite.EVENT_TYPES
            and (event.get("userId") or event.get("anonymousId"))
            and "additionalProperties" not in rule and "unevaluatedProperties" not in rule
            and "$ref" not in json.dumps(rule))


def first_keyword(case) -> str:
    """The keyword of a case's first violation (the end of its schemaPath), or what it is."""
    if case.get("problem"):
        return "a rule Ajv refuses"
    if not case["expected"]:
        return "conforming"
    return case["expected"][0]["meta"].get("schemaPath", "").rsplit("/", 1)[-1] or "unplanned"


#: One case of each keyword that gives the first violation (and one conforming, one refused rule),
#: sent over HTTP: what the file and /rudderlite/events hold must be Ajv's verdict too.
WIRE_CASES = list({first_keyword(case): case for case in reversed(AJV_CASES)
                   if over_the_wire(case)}.values())


@pytest.mark.parametrize("case", WIRE_CASES, ids=[case["name"] for case in WIRE_CASES])
def test_a_served_event_carries_ajvs_verdict(make_server, case):
    server = make_server(tracking_plan=plan_of_case(case))
    assert post(server.url, "/v1/batch", {"batch": [case["event"]]}).status == 200
    [stored] = stored_events(server.config.data_dir)
    expected = [] if case.get("problem") else case["expected"]
    assert stored["context"]["violationErrors"] == expected
    assert server.received(KEY)[0]["context"]["violationErrors"] == expected


plan_contexts = st.one_of(st.none(), st.just(None), st.just({}), st.dictionaries(
    st.sampled_from(["library", "app", "traits", "trackingPlanId"]), json_values, max_size=3),
    json_scalars)


@settings(max_examples=100, deadline=None)
@given(event=valid_events, context=plan_contexts, sent_type=st.sampled_from(rudderlite.EVENT_TYPES))
def test_the_verdict_in_the_stored_line_is_the_event_with_its_context_set(event, context,
                                                                          sent_type):
    """The verdict is put into the encoding made to measure the event; the line must be exactly
    the event as stored with its context as rudder-server writes it, whatever the context is."""
    if context is not None:
        event = {**event, "context": context}
    event = {**event, "type": sent_type}
    plan = rudderlite.load_tracking_plan(PLAN_SHAPES["api"], "plan")
    body = json.dumps({"batch": [event]}).encode()
    [stored] = rudderlite.process_body(body, None, rudderlite.Config(), "2026-11-26T10:00:00.000Z",
                                       "127.0.0.1", plan)
    line = json.loads(stored.line)
    verdict = {"trackingPlanId": "tp_api", "trackingPlanVersion": 3,
               "violationErrors": plan.violations(line)}
    if "context" not in event or event["context"] is None:
        assert line["context"] == verdict
    elif isinstance(event["context"], dict):
        assert line["context"] == {**event["context"], **verdict}
    else:
        assert line["context"] == event["context"]
    assert {key: value for key, value in line.items() if key != "context"} == {
        **{key: value for key, value in event.items() if key != "context"},
        **{key: line[key] for key in ("messageId", "receivedAt", "request_ip", "rudderId")}}


property_kinds = st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True),
                                 st.sampled_from(["string", "number", "integer", "boolean"]),
                                 min_size=1, max_size=6)
VALUES_OF_KIND = {"string": st.text(max_size=5), "integer": st.integers(-10 ** 9, 10 ** 9),
                  "number": st.floats(allow_nan=False, allow_infinity=False),
                  "boolean": st.booleans()}
WRONG_VALUE_OF_KIND = {"string": 1, "number": "1", "integer": 1.5, "boolean": "true"}


@settings(max_examples=80, deadline=None)
@given(kinds=property_kinds, data=st.data())
def test_an_event_made_to_a_rule_conforms_and_breaking_one_property_is_that_violation(kinds, data):
    rule = product_rule(properties={name: {"type": [kind]} for name, kind in kinds.items()},
                        required=sorted(kinds))
    plan = rudderlite.load_tracking_plan({"id": "tp", "version": 1, "events": [
        {"name": "Made", "eventType": "track", "rules": rule}]}, "tp")
    properties = {name: data.draw(VALUES_OF_KIND[kind]) for name, kind in kinds.items()}
    event = {"type": "track", "event": "Made", "userId": "u", "properties": properties}
    assert plan.problems == [] and plan.violations(event) == []
    broken = data.draw(st.sampled_from(sorted(kinds)))
    event["properties"][broken] = WRONG_VALUE_OF_KIND[kinds[broken]]
    assert plan.violations(event) == [{
        "type": "Datatype-Mismatch", "message": f"must be {kinds[broken]}",
        "meta": {"instancePath": f"/properties/{broken}",
                 "schemaPath": f"#/properties/properties/properties/{broken}/type"}}]


# -- the README's picture of the live page ---------------------------------------------------------

#: The plan of the README's picture: an order's revenue must be a number.
SHOP_PLAN = {"id": "tp_shop", "version": 7, "events": [
    {"name": "Order Completed", "eventType": "track", "rules": product_rule(
        properties={"orderId": {"type": ["string"]}, "revenue": {"type": ["number"]},
                    "currency": {"type": ["string"], "enum": ["EUR", "USD"]}},
        required=["orderId", "revenue"])},
    {"name": "Plan Selected", "eventType": "track", "rules": {"type": "object"}},
    {"name": "", "eventType": "page", "rules": {"type": "object"}}]}


def save_live_view(path=os.path.join(HERE, "docs", "live-view.png")):
    """Take the README's picture: the live page at 1280x800 in headless Chromium, with a visitor's
    page views, an identify, a group, an order that breaks the plan (its details open) and a refused
    request. ``python3 -c 'import test_rudderlite as t; t.save_live_view()'``"""
    write_key = "2Fq8xWebAppKey"
    context = {"library": {"name": "RudderLabs JavaScript SDK", "version": "3.34.1"},
               "page": {"path": "/pricing", "url": "http://localhost:3000/pricing"}}
    visitor = {"anonymousId": "3f1c9a2e-77d0-4b8e-9a41-5d2c1f0b8e63", "context": context}
    user = dict(visitor, userId="user-1041")
    with tempfile.TemporaryDirectory() as data_dir, \
            rudderlite.running(port=0, quiet=True, data_dir=data_dir,
                               tracking_plan=SHOP_PLAN) as server, Browser() as browser:
        with live_page(browser, server.url, write_key) as page:
            sent(server.url, write_key, "/v1/batch", {"batch": [
                dict(visitor, type="page", name="Home", properties={"path": "/"}),
                dict(visitor, type="page", name="Pricing", properties={"path": "/pricing"}),
                dict(visitor, type="track", event="Plan Selected",
                     properties={"plan": "team", "billing": "yearly"}),
                dict(user, type="identify", traits={"email": "ada@example.com", "plan": "team"}),
                dict(user, type="group", groupId="acme-inc", traits={"name": "Acme Inc."}),
            ]})
            sent(server.url, write_key, "/v1/track", dict(user, properties={"button": "pay"}))
            sent(server.url, write_key, "/v1/track", dict(
                user, event="Order Completed",
                properties={"orderId": "o-20417", "revenue": "49.90", "currency": "EUR"}))
            sent(server.url, write_key, "/v1/batch", b'{"batch": [{"type": "track", "userId": ')
            page.wait_for(f"{row_showing('Order Completed')} && "
                          f"{rows_of('rejected')}.length === 1")
            page.click("#events tbody tr")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            page.screenshot(path)
    return path


def test_the_readme_picture_can_be_taken_again(browser, tmp_path):
    path = save_live_view(str(tmp_path / "live-view.png"))
    with open(path, "rb") as picture:
        assert picture.read(8) == b"\x89PNG\r\n\x1a\n"
