#!/usr/bin/env python3
"""How fast rudderlite is, as ratios against what bounds it, measured side by side in one run.

    python3 bench/bench.py            # about five minutes; needs wrk (apt-get install -y wrk)
                                      # for HTTP load
    python3 bench/bench.py --quick    # one short round of each, to check that the benchmark
                                      # itself works

Every figure is a ratio of two things measured in the same run, in interleaved rounds (A B A B A B,
medians), because this machine is shared and noisy: absolute numbers move, ratios much less.
Standard library only; the load comes from wrk when it is installed, else from a slower Python
client (then the ratios say less).

1. /v1/track requests/s at 1 and 8 keep-alive connections / an empty ThreadingHTTPServer that reads
   the body and answers ok (the ceiling of any http.server design);
2. /v1/batch events/s with 100-event batches / json.loads + one json.dumps per event + one write per
   batch in a bare loop (the floor of the work an event needs);
3. --fsync always / --fsync off, /v1/track at 16 connections (group commit keeps this near 1);
4. peak RSS with 8 clients sending 4 MiB batches for 10 s; RSS growth after 200,000 single events;
5. start-up, spawn to first answered /health / python -c "import http.server";
6. cost per event at batch sizes 1, 10, 100, 1000; /v1/track with a 500 MB active file /
   an empty one;
7. /v1/track req/s of one key while 8 long-polls of another key wait over a full history /
   with no poll;
8. /v1/track req/s with the line per request on standard error / with --quiet;
9. /v1/batch events/s, 100-event batches checked against a catalog-like tracking plan /
   without a plan;
10. µs per gzip member with 1,000 members / with 100,000 (inflating is linear: about 1);
11. start plus stop of an embedded server, rudderlite.running(), in ms.
"""

import argparse
import base64
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUDDERLITE = os.path.join(ROOT, "rudderlite.py")
WRITE_KEY = "bench-write-key"
AUTHORIZATION = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
TARGETS = {
    "track, 1 connection": 0.85,
    "track, 8 connections": 0.85,
    "batch of 100": 0.6,
    "fsync always / off": 0.5,
    "track, 500 MB file / empty file": 0.9,
    "track while 8 polls wait / none": 0.9,
    "track, a line per request / quiet": 0.9,
    "batch of 100, plan / no plan": 0.75,
    "gzip µs per member, 1k / 100k members": 0.5,
}


def sample_event(number: int) -> dict:
    """A typical server-side track event, about 400 bytes."""
    return {"type": "track", "userId": f"user-{number % 1000}", "event": "Order Completed",
            "messageId": f"bench-{number}", "timestamp": "2026-11-26T10:00:00.123Z",
            "properties": {"orderId": number, "total": 27.5, "currency": "EUR",
                           "products": [{"sku": "A-1", "qty": 2}]},
            "context": {"library": {"name": "analytics-python", "version": "2.1.9"},
                        "ip": "203.0.113.9"}}


def batch_body(size: int) -> bytes:
    batch = [sample_event(number) for number in range(size)]
    return json.dumps({"batch": batch, "sentAt": "2026-11-26T10:00:01Z"}).encode()


TRACK_BODY = json.dumps(
    {key: value for key, value in sample_event(1).items() if key != "type"}).encode()


# -- servers under test ----------------------------------------------------------------------------


class CeilingHandler(http.server.BaseHTTPRequestHandler):
    """The least an http.server design can do: read the body, answer ok in one send."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Length: 2\r\n\r\nok")

    def do_GET(self):
        self.do_POST()

    def log_message(self, *args):
        pass


def serve_ceiling() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CeilingHandler)
    server.daemon_threads = True
    print(f"ceiling listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


class Server:
    """A server process, ready once it printed its listening line."""

    started = []

    def __init__(self, command, stderr=subprocess.DEVNULL):
        Server.started.append(self)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
        line = self.process.stdout.readline().decode()
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        if stderr == subprocess.PIPE:  # read as a terminal would: line by line, as it comes
            threading.Thread(target=lambda: all(self.process.stderr), daemon=True).start()

    @classmethod
    def rudderlite(cls, data_dir, *options, quiet=True):
        return cls([sys.executable, RUDDERLITE, "--port", "0", "--data-dir", data_dir, *options]
                   + (["--quiet"] if quiet else []),
                   stderr=subprocess.DEVNULL if quiet else subprocess.PIPE)

    @classmethod
    def ceiling(cls):
        return cls([sys.executable, os.path.abspath(__file__), "--serve-ceiling"])

    def memory_kib(self, field):
        """VmRSS (now) or VmHWM (peak) of the process, in KiB."""
        with open(f"/proc/{self.process.pid}/status") as status:
            return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


# -- load ------------------------------------------------------------------------------------------


def load(url, path, body, connections, seconds, headers=None) -> float:
    """Requests/s of POST path with body over keep-alive connections; wrk when installed."""
    headers = {"Authorization": AUTHORIZATION, "Content-Type": "application/json",
               **(headers or {})}
    if shutil.which("wrk"):
        return load_with_wrk(url, path, body, connections, seconds, headers)
    return load_with_python(url, path, body, connections, seconds, headers)


def load_with_wrk(url, path, body, connections, seconds, headers) -> float:
    with tempfile.TemporaryDirectory() as directory:
        body_file = os.path.join(directory, "body")
        with open(body_file, "wb") as file:
            file.write(body)
        threads = min(connections, 2)
        header_lines = [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
        script = ['wrk.method = "POST"', f'local f = io.open("{body_file}", "rb")',
                  "wrk.body = f:read('*a')", "f:close()", *header_lines]
        script_file = os.path.join(directory, "script.lua")
        with open(script_file, "w") as file:
            file.write("\n".join(script) + "\n")
        command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                   "-s", script_file, url + path]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output:
        raise SystemExit(f"non-200 answers under load:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def load_with_python(url, path, body, connections, seconds, headers) -> float:
    host, port = url[len("http://"):].rsplit(":", 1)
    deadline = time.monotonic() + seconds
    counts = []

    def client():
        connection = http.client.HTTPConnection(host, int(port))
        count = 0
        while time.monotonic() < deadline:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            count += 1
        counts.append(count)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def interleaved(rounds, **measurements):
    """Run each measurement once per round, alternating, and return the median of each."""
    results = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            results[name].append(measure())
    return {name: statistics.median(values) for name, values in results.items()}


# -- the figures -----------------------------------------------------------------------------------


def accepted_events(server, authorization=AUTHORIZATION) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    connection.request("GET", "/rudderlite/stats", headers={"Authorization": authorization})
    return sum(json.loads(connection.getresponse().read())["accepted"].values())


def bare_loop_events_per_second(body: bytes, seconds: float) -> float:
    """The floor: parse a batch, encode each event once, write the batch once."""
    with tempfile.TemporaryFile() as file:
        events = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            batch = json.loads(body)["batch"]
            file.write(b"".join(json.dumps(event).encode() + b"\n" for event in batch))
            events += len(batch)
        return events / (time.monotonic() - started)


def startup_seconds(data_dir) -> float:
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, RUDDERLITE, "--port", "0", "--quiet", "--data-dir", data_dir],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    port = int(process.stdout.readline().decode().rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
    elapsed = time.monotonic() - started
    process.terminate()
    process.wait()
    return elapsed


def bare_import_seconds() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import http.server"], check=True)
    return time.monotonic() - started


def write_big_active_file(data_dir, size):
    os.makedirs(data_dir, exist_ok=True)
    line = json.dumps(sample_event(0)).encode() + b"\n"
    chunk = line * (1024 * 1024 // len(line))
    with open(os.path.join(data_dir, "events.jsonl"), "wb") as file:
        for _ in range(size // len(chunk)):
            file.write(chunk)


def catalog_plan() -> dict:
    """A tracking plan as RudderStack's catalog builds them: 10 track events, 5 to 8 properties each
    with types, required ones, an enum, and no other properties allowed."""
    events = []
    for number in range(10):
        properties = {"orderId": {"type": ["integer"]}, "total": {"type": ["number"], "minimum": 0},
                      "currency": {"type": ["string"], "enum": ["EUR", "USD", "GBP"]},
                      "products": {"type": ["array"], "items": {"type": ["object"]}},
                      "coupon": {"type": ["string", "null"]}}
        for extra in range(number % 4):
            properties[f"extra{extra}"] = {"type": ["string"], "maxLength": 64}
        name = "Order Completed" if number == 0 else f"Event {number}"
        events.append({"name": name, "eventType": "track", "rules": {
            "$schema": "https://json-schema.org/draft/2019-09/schema", "type": "object",
            "properties": {"properties": {"type": "object", "properties": properties,
                                          "required": ["orderId", "total", "currency"],
                                          "additionalProperties": False}},
            "required": ["properties"]}})
    return {"id": "tp_bench", "version": 1, "events": events}


def poll_forever(url, authorization, stop):
    """A long-poll that never gets what it waits for, asked again each time it is answered."""
    host, port = url[len("http://"):].rsplit(":", 1)
    while not stop.is_set():
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request("GET", "/rudderlite/events?wait=60&min=1000000",
                               headers={"Authorization": authorization})
            connection.getresponse().read()
        except OSError:  # the server stopped
            return
        finally:
            connection.close()


def gzip_member_cost(members: int) -> float:
    """µs per member to inflate a body of ``members`` small gzip members."""
    sys.path.insert(0, ROOT)
    import gzip
    import rudderlite
    body = b"".join(gzip.compress(b" ") for _ in range(members))
    started = time.process_time()
    rudderlite.inflate_gzip(body, 10 * 1024 * 1024)
    return (time.process_time() - started) * 1e6 / members


def embedded_start_stop_ms(data_dir) -> float:
    sys.path.insert(0, ROOT)
    import rudderlite
    started = time.monotonic()
    with rudderlite.running(port=0, data_dir=data_dir, quiet=True):
        pass
    return (time.monotonic() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round of each")
    parser.add_argument("--serve-ceiling", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_ceiling:
        serve_ceiling()
        return 0
    rounds, seconds = (1, 1) if options.quick else (3, 3)
    scratch = tempfile.mkdtemp(prefix="rudderlite-bench-")
    figures = []

    def report(name, value, bound, unit=""):
        ratio = value / bound
        target = TARGETS.get(name)
        if target is None:
            verdict = ""
        elif ratio >= target:
            verdict = "  ok"
        else:
            verdict = f"  BELOW TARGET {target}"
        say(f"{name:<34} {value:>12,.1f} / {bound:>12,.1f} {unit:<10} = {ratio:5.2f}{verdict}")

    def say(figure):
        figures.append(figure)
        print(figure, flush=True)

    load_from = "wrk" if shutil.which("wrk") else "a Python client"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load from {load_from}; "
          f"{rounds} interleaved rounds of {seconds} s\n")
    try:
        # 1. track against the ceiling
        rudderlite = Server.rudderlite(os.path.join(scratch, "track"))
        ceiling = Server.ceiling()
        for connections in (1, 8):
            result = interleaved(
                rounds,
                rudderlite=lambda: load(rudderlite.url, "/v1/track", TRACK_BODY,
                                        connections, seconds),
                ceiling=lambda: load(ceiling.url, "/v1/track", TRACK_BODY, connections, seconds))
            name = f"track, {connections} connection{'s' * (connections > 1)}"
            report(name, result["rudderlite"], result["ceiling"], "req/s")
        ceiling.stop()

        # 2. batches of 100 against the bare loop
        body = batch_body(100)
        result = interleaved(
            rounds,
            rudderlite=lambda: 100 * load(rudderlite.url, "/v1/batch", body, 2, seconds),
            floor=lambda: bare_loop_events_per_second(body, seconds))
        report("batch of 100", result["rudderlite"], result["floor"], "events/s")

        # 6a. cost per event by batch size
        costs = []
        for size in (1, 10, 100, 1000):
            body = batch_body(size)
            events_per_second = size * statistics.median(
                load(rudderlite.url, "/v1/batch", body, 2, seconds) for _ in range(rounds))
            costs.append(f"{size}: {1e6 / events_per_second:.1f}")
        say(f"{'µs per event by batch size':<34} {', '.join(costs)}")
        rudderlite.stop()

        # 3. fsync always against off
        always = Server.rudderlite(os.path.join(scratch, "fsync-always"), "--fsync", "always")
        off = Server.rudderlite(os.path.join(scratch, "fsync-off"), "--fsync", "off")
        result = interleaved(
            rounds,
            always=lambda: load(always.url, "/v1/track", TRACK_BODY, 16, seconds),
            off=lambda: load(off.url, "/v1/track", TRACK_BODY, 16, seconds))
        report("fsync always / off", result["always"], result["off"], "req/s")
        always.stop()
        off.stop()

        # 4. memory
        big = Server.rudderlite(os.path.join(scratch, "big-batches"),
                                "--rotate-bytes", str(2 ** 40))
        body = batch_body(4 * 1024 * 1024 // len(batch_body(1)))
        load(big.url, "/v1/batch", body, 8, 2 if options.quick else 10)
        peak_mib = big.memory_kib("VmHWM") / 1024
        say(f"{'peak RSS, 8 x 4 MiB batches':<34} {peak_mib:>12,.1f} MiB"
            + ("  ok" if peak_mib <= 150 else "  ABOVE TARGET 150"))
        big.stop()

        many = Server.rudderlite(os.path.join(scratch, "many"))
        load(many.url, "/v1/track", TRACK_BODY, 8, 1)
        before = many.memory_kib("VmRSS") / 1024
        total = 20_000 if options.quick else 200_000
        while accepted_events(many) < total:
            load(many.url, "/v1/track", TRACK_BODY, 8, 5)
        total = accepted_events(many)
        after = many.memory_kib("VmRSS") / 1024
        label = f"RSS growth over {total:,} events"
        say(f"{label:<34} {after - before:>12,.1f} MiB ({before:.1f} -> {after:.1f})"
            + ("  ok" if after - before <= 30 else "  ABOVE TARGET 30"))
        many.stop()

        # 5. start-up
        result = interleaved(
            rounds * 3,
            rudderlite=lambda: startup_seconds(os.path.join(scratch, "startup")),
            bare=bare_import_seconds)
        report("start-up / import http.server", result["rudderlite"] * 1000,
               result["bare"] * 1000, "ms")
        figures[-1] += "  ok" if result["rudderlite"] <= 3 * result["bare"] else "  ABOVE TARGET 3"

        # 6b. a 500 MB active file against an empty one
        big_dir = os.path.join(scratch, "big-file")
        write_big_active_file(big_dir, 64 * 1024 * 1024 if options.quick else 500 * 1024 * 1024)
        full = Server.rudderlite(big_dir, "--rotate-bytes", str(2 ** 40))
        empty = Server.rudderlite(os.path.join(scratch, "empty-file"))
        result = interleaved(
            rounds,
            full=lambda: load(full.url, "/v1/track", TRACK_BODY, 8, seconds),
            empty=lambda: load(empty.url, "/v1/track", TRACK_BODY, 8, seconds))
        report("track, 500 MB file / empty file", result["full"], result["empty"], "req/s")
        full.stop()
        empty.stop()

        # 7. senders of one key while long-polls of another wait over a full history: two servers
        # with the same history of 10,000 events, 8 polls waiting on one of them
        other_key = "Basic " + base64.b64encode(b"polled-key:").decode()
        polled = Server.rudderlite(os.path.join(scratch, "polled"))
        unpolled = Server.rudderlite(os.path.join(scratch, "unpolled"))
        for server in (polled, unpolled):
            while accepted_events(server, other_key) < 10_000:
                load(server.url, "/v1/batch", batch_body(100), 2, 1,
                     headers={"Authorization": other_key})
        stop_polls = threading.Event()
        for _ in range(8):
            threading.Thread(target=poll_forever, args=(polled.url, other_key, stop_polls),
                             daemon=True).start()
        time.sleep(1)  # the polls arrive and read the history once
        result = interleaved(
            rounds,
            polls=lambda: load(polled.url, "/v1/track", TRACK_BODY, 1, seconds),
            none=lambda: load(unpolled.url, "/v1/track", TRACK_BODY, 1, seconds))
        report("track while 8 polls wait / none", result["polls"], result["none"], "req/s")
        stop_polls.set()
        polled.stop()
        unpolled.stop()

        # 8. the line per request on standard error against --quiet
        talking = Server.rudderlite(os.path.join(scratch, "talking"), quiet=False)
        quiet = Server.rudderlite(os.path.join(scratch, "quiet"))
        result = interleaved(
            rounds,
            talking=lambda: load(talking.url, "/v1/track", TRACK_BODY, 1, seconds),
            quiet=lambda: load(quiet.url, "/v1/track", TRACK_BODY, 1, seconds))
        report("track, a line per request / quiet", result["talking"], result["quiet"], "req/s")
        talking.stop()
        quiet.stop()

        # 9. batches against a catalog-like tracking plan
        plan_file = os.path.join(scratch, "plan.json")
        with open(plan_file, "w") as file:
            json.dump(catalog_plan(), file)
        body = batch_body(100)
        checked = Server.rudderlite(os.path.join(scratch, "checked"), "--tracking-plan", plan_file)
        unchecked = Server.rudderlite(os.path.join(scratch, "unchecked"))
        result = interleaved(
            rounds,
            plan=lambda: 100 * load(checked.url, "/v1/batch", body, 2, seconds),
            none=lambda: 100 * load(unchecked.url, "/v1/batch", body, 2, seconds))
        report("batch of 100, plan / no plan", result["plan"], result["none"], "events/s")
        checked.stop()
        unchecked.stop()

        # 10. gzip members: the cost of each stays the same however many there are
        result = interleaved(rounds, few=lambda: gzip_member_cost(1_000),
                             many=lambda: gzip_member_cost(100_000))
        report("gzip µs per member, 1k / 100k members", result["few"], result["many"], "µs")

        # 11. an embedded server, started and stopped as a test fixture does
        start_stop = statistics.median(embedded_start_stop_ms(os.path.join(scratch, f"embedded{n}"))
                                       for n in range(10))
        say(f"{'running(): start + stop':<34} {start_stop:>12,.1f} ms")
    finally:
        for server in Server.started:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + "\n".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
