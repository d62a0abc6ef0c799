#!/usr/bin/env python3
"""rudderlite: a local stand-in for RudderStack's HTTP event API, in one standard-library file.

RudderStack's HTTP source takes analytics events over plain HTTP: ``POST /v1/track``, ``/v1/identify``,
``/v1/page``, ``/v1/screen``, ``/v1/group``, ``/v1/alias`` with one event, ``/v1/batch`` with
``{"batch": [...]}``, authenticated with HTTP Basic where the user name is the source's *write key* and the
password is empty. rudderlite answers that API exactly as RudderStack's open-source data plane (rudder-server,
its ``gateway/`` package) does, and appends every accepted event as one JSON line to a file you can read
with ``jq``. It is a local mock, a CI fake endpoint and something to read; it is not a production collector
(no destinations, no queueing, no replay).

Run it::

    python rudderlite.py                      # http://127.0.0.1:8080, events in ./rudderlite-data/
    curl -u MY_WRITE_KEY: -d '{"userId": "u1", "event": "Signed Up"}' http://127.0.0.1:8080/v1/track
    tail -n1 rudderlite-data/events.jsonl | jq .

What a request meets, in the order this file is written:

1. the contract as data: limits, event types, every answer with its status;
2. configuration: one frozen dataclass whose defaults are the documented limits;
3. pure functions: Basic auth, gzip within limits, JSON parsing, validation, enrichment;
4. the store: ``DATA_DIR/events.jsonl``, rotated to ``events-<UTC time>.jsonl`` by size;
5. the inspection history behind ``/rudderlite/events`` (for tests that assert on what an app sent);
6. HTTP: reading heads and bodies within limits, the route table, the one place errors are answered;
7. the server: connection limits, deadlines, clean shutdown, ``running()`` for embedding in tests;
8. the command line.

The tests are in ``test_rudderlite.py`` (``pip install pytest hypothesis && python -m pytest``); the product's
contract is ``CONTRACT.md`` of the project, and README.md says where rudderlite chose for itself.
"""

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import hmac
import http
import http.server
import json
import logging
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from typing import Dict, List, NamedTuple, Optional, Tuple

__version__ = "0.1.0"

logger = logging.getLogger("rudderlite")


###############################################################################
# The contract as data
###############################################################################

#: The event types RudderStack knows; each has its own endpoint ``/v1/<type>``.
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
#: When the store fsyncs: before each 200, at least once a second, or never (CONTRACT section 1).
FSYNC_MODES = ("always", "interval", "off")


class Answer(NamedTuple):
    """One answer of the API: its status and the plain-text message rudder-server sends with it."""

    status: int
    message: str


# The answers, as rudder-server's gateway/response names them (CONTRACT section 3 gives their order).
OK = Answer(200, "ok")
PAGE_NOT_FOUND = Answer(404, "404 page not found")
METHOD_NOT_ALLOWED = Answer(405, "method not allowed")
NO_WRITE_KEY_IN_HEADER = Answer(401, "failed to read writekey from header")
NO_WRITE_KEY_IN_QUERY = Answer(401, "failed to read writekey from query params")
INVALID_WRITE_KEY = Answer(401, "invalid write key")
REQUEST_TOO_LARGE = Answer(413, "request size exceeds max limit")
INVALID_JSON = Answer(400, "invalid json")
EMPTY_BATCH = Answer(400, "empty batch payload")
NOT_AN_EVENT = Answer(400, "event is not a valid rudder event")
NO_IDENTITY = Answer(400, "request neither has anonymousId nor userId")
STORE_FAILED = Answer(500, "failed to store events")
# Answers the contract does not list; the messages are those of rudder-server or of Go's net/http under it.
BODY_UNREADABLE = Answer(400, "failed to read body from request")  # rudder-server says 500; the client caused it
BAD_REQUEST = Answer(400, "400 bad request")
BAD_QUERY = Answer(400, "invalid query parameter")
HEADERS_TOO_LARGE = Answer(431, "request header fields too large")
UNSUPPORTED_TRANSFER_ENCODING = Answer(501, "unsupported transfer encoding")
TOO_MANY_CONNECTIONS = Answer(503, "too many connections")
INTERNAL_ERROR = Answer(500, "internal server error")

#: Section 5: fields that, when present and not null, must be JSON objects.
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
#: Section 5: fields that, when present and not null, must be RFC 3339 date-times.
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
#: Section 5: the field alias and group events cannot do without (track's "event" is checked on its own:
#: it must be a non-blank string).
REQUIRED_FIELD = {"alias": "previousId", "group": "groupId"}
#: Section 5: fields that identify a user; strings or numbers.
ID_FIELDS = ("userId", "anonymousId")

# RFC 3339 §5.6 date-time: 2026-11-26T10:00:00Z, with an optional fraction and a numeric offset instead of Z.
RFC3339_DATE_TIME = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    re.IGNORECASE,
)


###############################################################################
# Configuration
###############################################################################


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a server needs to know; the defaults are the documented limits (CONTRACT section 1)."""

    #: Address to bind: loopback unless the user asks otherwise.
    host: str = "127.0.0.1"
    #: Port to bind; 0 lets the OS pick a free one (read it back from ``server.url``).
    port: int = 8080
    #: Directory of the JSONL files; created if missing.
    data_dir: str = "./rudderlite-data"
    #: The accepted write keys; empty accepts any non-empty key.
    write_keys: Tuple[str, ...] = ()
    #: Largest single event: the body of /v1/<type>, or one event of a batch as compact JSON (RudderStack: 32 KB).
    max_event_bytes: int = 32 * 1024
    #: Largest /v1/batch body, after gzip is undone (RudderStack: 4 MB).
    max_batch_bytes: int = 4 * 1024 * 1024
    #: The active file is rotated before it would pass this size.
    rotate_bytes: int = 64 * 1024 * 1024
    #: "always": fsync before answering 200; "interval": at least once a second; "off": leave it to the OS.
    fsync: str = "off"
    #: Answer contract violations (section 5) with 400 instead of accepting them with warnings.
    strict: bool = False
    #: No access log.
    quiet: bool = False
    #: How many recent events the inspection API remembers, and how many bytes of them at most.
    history_events: int = 10_000
    history_bytes: int = 32 * 1024 * 1024
    #: Connections served at once; one more is answered 503 and closed.
    max_connections: int = 512
    #: Seconds a keep-alive connection may wait for its next request.
    idle_timeout: float = 60.0
    #: Seconds a client has to send a request's head (request line and headers) once it started.
    head_timeout: float = 10.0
    #: Seconds a client has to send a request's body once its head arrived.
    body_timeout: float = 60.0
    #: Largest request head in bytes.
    max_head_bytes: int = 64 * 1024



###############################################################################
# Pure functions: auth, bodies, JSON, validation, enrichment (no I/O)
###############################################################################


class Rejection(Exception):
    """A request refused with an answer of the contract; ``detail`` goes only to /rudderlite/rejected."""

    def __init__(self, answer: Answer, detail: str = "", headers: Tuple[str, ...] = ()):
        super().__init__(answer.message)
        self.answer = answer
        self.detail = detail
        self.headers = headers


class StoredEvent(NamedTuple):
    """An accepted event, ready for the file: its JSON line, its type and its contract warnings."""

    line: bytes
    type: str
    warnings: Tuple[str, ...]


def write_key_from_authorization(authorization: Optional[str]) -> str:
    """The write key of an ``Authorization: Basic base64(key:)`` header (RFC 7617), the password ignored.

    As Go's ``Request.BasicAuth``: the scheme is case-insensitive and the decoded text must hold a colon.
    """
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        raise Rejection(NO_WRITE_KEY_IN_HEADER)
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 once decoded
        raise Rejection(NO_WRITE_KEY_IN_HEADER) from None
    write_key, colon, _password = decoded.partition(":")
    if not colon or not write_key:
        raise Rejection(NO_WRITE_KEY_IN_HEADER)
    return write_key


def write_key_allowed(write_key: str, allowed_keys: Tuple[str, ...]) -> bool:
    """Whether the key may send; every allowed key is compared in constant time, so timing tells nothing."""
    if not allowed_keys:
        return True
    given = write_key.encode("utf-8")
    matches = [hmac.compare_digest(given, key.encode("utf-8")) for key in allowed_keys]
    return any(matches)


def compressed_limit(limit: int) -> int:
    """How many gzip bytes may carry ``limit`` inflated bytes: deflate's stored blocks add 5 bytes a 64 KiB,
    the gzip header and trailer a few more; a generous margin keeps it simple."""
    return limit + limit // 64 + 1024


def inflate_gzip(compressed: bytes, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip``, refusing the body once it inflates past ``limit`` bytes.

    Inflating stops at limit + 1 bytes, so a small body that would inflate to gigabytes costs no more than the
    limit. A truncated or corrupt stream is ``invalid json``, as the contract says.
    """
    inflated = bytearray()
    remaining = compressed
    while remaining:  # RFC 1952 §2.2: a gzip file may be several members one after another
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            inflated += inflater.decompress(remaining, limit + 1 - len(inflated))
        except zlib.error:
            raise Rejection(INVALID_JSON) from None
        if len(inflated) > limit:
            raise Rejection(REQUEST_TOO_LARGE)
        if not inflater.eof:
            raise Rejection(INVALID_JSON)
        remaining = inflater.unused_data
    return bytes(inflated)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_json(body: bytes):
    """The JSON value of a body, or ``invalid json``: UTF-8 only, no NaN or Infinity, no nesting too deep.

    A number too large for a float (1e400) parses as infinity; encode_json refuses it, and every event is encoded
    right after parsing, so it is ``invalid json`` all the same.
    """
    try:
        return _JSON_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError and JSONDecodeError
        raise Rejection(INVALID_JSON) from None


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ASCII_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def encode_json(value) -> bytes:
    """Compact UTF-8 JSON: the size an event is measured by, and the form its line takes in the file."""
    try:
        try:
            return _COMPACT_JSON.encode(value).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but not UTF-8: keep it escaped
            return _ASCII_JSON.encode(value).encode("ascii")
    except (ValueError, RecursionError):  # infinity from an overflowing number, or nesting too deep to write
        raise Rejection(INVALID_JSON) from None


def batch_events(document) -> list:
    """The events of a /v1/batch body; other top-level keys (``sentAt``, ``writeKey``...) are ignored."""
    events = document.get("batch") if isinstance(document, dict) else None
    if not isinstance(events, list) or not events:
        raise Rejection(EMPTY_BATCH)
    return events


def id_text(value) -> str:
    """An id as rudder-server reads it: a string trimmed, null as empty, anything else as its JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return encode_json(value).decode("utf-8")


def is_blank(value) -> bool:
    """Absent for the contract: null, or a string of only white space."""
    return value is None or (isinstance(value, str) and not value.strip())


JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def json_type(value) -> str:
    """The JSON name of a value's type, for messages (int and float are both "number")."""
    return JSON_TYPE_NAMES.get(type(value), "number")


def contract_violations(event: dict, event_type) -> List[str]:
    """The contract violations of one event (CONTRACT section 5) as ``field: problem`` texts, in field order."""
    violations = []
    if event_type not in EVENT_TYPES:
        shown = "missing" if event_type is None else json.dumps(event_type)
        violations.append(f"type: {shown} is not one of {', '.join(EVENT_TYPES)}")
    if event_type == "track":
        if not (isinstance(event.get("event"), str) and event["event"].strip()):
            violations.append('event: track needs a non-empty "event"')
    elif event_type in REQUIRED_FIELD and is_blank(event.get(REQUIRED_FIELD[event_type])):
        required = REQUIRED_FIELD[event_type]
        violations.append(f'{required}: {event_type} needs "{required}"')
    for field in OBJECT_FIELDS:
        value = event.get(field)
        if value is not None and not isinstance(value, dict):
            violations.append(f"{field}: must be an object, not {json_type(value)}")
    for field in TIMESTAMP_FIELDS:
        value = event.get(field)
        if value is not None and not (isinstance(value, str) and RFC3339_DATE_TIME.fullmatch(value)):
            violations.append(f"{field}: must be an RFC 3339 date-time like 2026-11-26T10:00:00Z")
    message_id = event.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        violations.append(f"messageId: must be a string, not {json_type(message_id)}")
    for field in ID_FIELDS:
        value = event.get(field)
        if isinstance(value, (dict, list, bool)):
            violations.append(f"{field}: must be a string or a number, not {json_type(value)}")
    return violations


def identities(event) -> Tuple[str, str]:
    """The event's userId and anonymousId as id texts; refuses what the gateway refuses before anything else."""
    if not isinstance(event, dict):
        raise Rejection(NOT_AN_EVENT)
    user_id, anonymous_id = id_text(event.get("userId")), id_text(event.get("anonymousId"))
    if not user_id and not anonymous_id:
        raise Rejection(NO_IDENTITY)
    return user_id, anonymous_id


@functools.lru_cache(maxsize=8192)  # the same users send again and again; a cached id costs a tenth
def rudder_id(user_id: str, anonymous_id: str) -> str:
    """rudder-server's rudderId: the MD5 of ``userId:anonymousId`` read as a UUID with version 4 bits."""
    digest = hashlib.md5(f"{user_id}:{anonymous_id}".encode("utf-8"), usedforsecurity=False).digest()
    return str(uuid.UUID(bytes=digest, version=4))  # version=4 also sets the RFC 4122 variant bits


def enrichment(event: dict, received_at: str, request_ip: str, type_from_path: Optional[str],
               event_rudder_id: str) -> dict:
    """The fields the gateway sets on an event (CONTRACT section 4), only those whose value changes."""
    fields = {}
    message_id = event.get("messageId")
    if not isinstance(message_id, str) or not message_id.strip():
        fields["messageId"] = str(uuid.uuid4())
    elif message_id != message_id.strip():
        fields["messageId"] = message_id.strip()
    if event.get("receivedAt") is None:
        fields["receivedAt"] = received_at
    if event.get("request_ip") is None:
        fields["request_ip"] = request_ip
    fields["rudderId"] = event_rudder_id
    if type_from_path and event.get("type") != type_from_path:
        fields["type"] = type_from_path
    return fields


def stored_line(event: dict, encoded: bytes, fields: dict) -> bytes:
    """The event's line in the file: the event as received with ``fields`` set, as compact JSON.

    ``encoded`` is the event as received, already encoded (to measure it); when the fields are all new keys,
    they are appended to that encoding instead of encoding the whole event a second time.
    """
    if not event.keys().isdisjoint(fields):  # a field replaces one the client sent
        event.update(fields)
        return encode_json(event) + b"\n"
    return encoded[:-1] + b"," + encode_json(fields)[1:] + b"\n"  # never "{}": an event without ids is refused


def utc_timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as rudder-server writes ``receivedAt``: 2026-11-26T10:00:00.123Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def process_body(
    body: bytes, type_from_path: Optional[str], config: Config, received_at: str, request_ip: str
) -> List[StoredEvent]:
    """Check a request's body as the gateway does and return its events as lines, or raise one Rejection.

    ``type_from_path`` is the type of a single-event endpoint, None for a batch. The checks run in the contract's
    order: JSON, then the batch, then the size of every event, then each event in order; the first that fails
    answers, so a request is all or nothing.
    """
    document = parse_json(body)
    events = [document] if type_from_path else batch_events(document)
    encodings = [encode_json(event) for event in events]
    if not type_from_path:
        for index, encoded in enumerate(encodings):
            if len(encoded) > config.max_event_bytes:
                raise Rejection(REQUEST_TOO_LARGE, f"batch[{index}] is {len(encoded)} bytes as compact JSON, "
                                                   f"over --max-event-bytes {config.max_event_bytes}")
    stored = []
    for index, (event, encoded) in enumerate(zip(events, encodings)):
        user_id, anonymous_id = identities(event)
        event_type = type_from_path or event.get("type")
        warnings = tuple(contract_violations(event, event_type))
        if warnings and not type_from_path:
            warnings = tuple(f"batch[{index}].{warning}" for warning in warnings)
        if warnings and config.strict:
            raise Rejection(Answer(400, warnings[0]))
        fields = enrichment(event, received_at, request_ip, type_from_path, rudder_id(user_id, anonymous_id))
        stored.append(StoredEvent(stored_line(event, encoded, fields), event_type, warnings))
    return stored


def source_config(write_key: str) -> dict:
    """What ``GET /sourceConfig`` answers: the smallest source configuration the JavaScript SDK accepts.

    No destinations (so the SDK loads no integration scripts) and no stats collection (so it posts no metrics):
    the browser SDK then runs fully offline against rudderlite.
    """
    source_id = "rudderlite-" + hashlib.sha256(write_key.encode("utf-8")).hexdigest()[:16]
    return {
        "isHosted": False,
        "source": {
            "id": source_id,
            "name": "rudderlite",
            "writeKey": write_key,
            "workspaceId": "rudderlite",
            "enabled": True,
            "config": {},
            "destinations": [],
        },
    }


def field_text(event, dotted_path: str) -> Optional[str]:
    """The value at ``properties.orderId``-style paths as text (strings as they are, the rest as JSON)."""
    value = event
    for part in dotted_path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, str) else encode_json(value).decode("utf-8")


###############################################################################
# The store: rotating JSONL files
###############################################################################

ACTIVE_FILE = "events.jsonl"
ARCHIVE_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"  # fixed width, so names sort in the order they were written
ARCHIVE_NAME = re.compile(r"events-(\d{8}T\d{6}\.\d{6}Z)\.jsonl")


class EventStore:
    """The JSONL files: ``events.jsonl`` appended to, and renamed to ``events-<UTC time>.jsonl`` when full.

    Every request is one ``os.write`` of whole lines under one lock: the lines of a request are contiguous,
    concurrent requests never interleave, and a request never straddles two files. A write that fails is cut
    back to the last whole line before the error is raised, so the file only ever holds whole lines.

    With ``fsync="always"``, requests share fsyncs (group commit): a writer whose lines are not yet on disk
    either starts an fsync that covers every line written so far, or waits for the one in progress and then the
    next, instead of paying for its own.
    """

    def __init__(self, data_dir: str, rotate_bytes: int, fsync: str):
        self.data_dir = data_dir
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self.path = os.path.join(data_dir, ACTIVE_FILE)
        os.makedirs(data_dir, exist_ok=True)
        self._lock = threading.Condition()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = self._cut_torn_tail()
        self._needs_repair = False
        self._last_archive_time = self._newest_archive_time()
        self._written = 0  # requests written so far ...
        self._synced = 0  # ... and how many of them are known to be on disk
        self._sync_in_progress = False
        self.fsyncs = 0  # how many fsyncs the appends needed: fewer than the appends, thanks to group commit
        self._closed = threading.Event()
        if fsync == "interval":
            threading.Thread(target=self._sync_every_second, name="rudderlite-fsync", daemon=True).start()

    def _cut_torn_tail(self) -> int:
        """Cut a last line left without its newline (a power cut mid-write); return the size kept."""
        size = os.fstat(self._fd).st_size
        end = keep = size
        while end > 0:
            start = max(0, end - 65536)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = keep = start
        if keep < size:
            os.ftruncate(self._fd, keep)
            logger.warning("cut a torn last line of %d bytes from %s", size - keep, self.path)
        return keep

    def _newest_archive_time(self) -> datetime.datetime:
        times = [datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)]
        for name in os.listdir(self.data_dir):
            match = ARCHIVE_NAME.fullmatch(name)
            if match:
                moment = datetime.datetime.strptime(match.group(1), ARCHIVE_TIME_FORMAT)
                times.append(moment.replace(tzinfo=datetime.timezone.utc))
        return max(times)

    def append(self, lines: bytes) -> None:
        """Write one request's lines; when this returns they are with the OS (and on disk when fsync is always).

        Raises OSError when they could not be written; then none of them is in the file.
        """
        with self._lock:
            if self._closed.is_set():
                raise OSError("the store is closed")
            if self._size and self._size + len(lines) > self.rotate_bytes:
                self._rotate()
            self._write_whole(lines)
            self._written += 1
            if self.fsync == "always":
                self._sync_through(self._written)

    def _write_whole(self, lines: bytes) -> None:
        if self._needs_repair:  # an earlier write failed and its cut did too: cut before adding anything
            os.ftruncate(self._fd, self._size)
            self._needs_repair = False
        view = memoryview(lines)
        written = 0
        try:
            while written < len(lines):  # a write may be short near a size limit; the next one then fails
                written += os.write(self._fd, view[written:])
        except OSError:
            self._needs_repair = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                self._needs_repair = False
            raise
        self._size += len(lines)

    def _sync_through(self, ticket: int) -> None:
        """Return once the first ``ticket`` writes are on disk. Called, and returns, with the lock held."""
        while self._synced < ticket:
            if self._sync_in_progress:
                self._lock.wait()
                continue
            self._sync_in_progress = True
            target, fd = self._written, self._fd
            self._lock.release()  # others may write while this fsync runs; the next fsync will carry them
            try:
                os.fsync(fd)
                self.fsyncs += 1
            finally:
                self._lock.acquire()
                self._sync_in_progress = False
                self._lock.notify_all()
            self._synced = max(self._synced, target)

    def _sync_every_second(self) -> None:
        while not self._closed.wait(1.0):
            with self._lock:
                if self._synced < self._written and not self._closed.is_set():
                    with contextlib.suppress(OSError):
                        self._sync_through(self._written)

    def _rotate(self) -> None:
        """Rename the active file to ``events-<UTC time>.jsonl`` and start an empty one."""
        while self._sync_in_progress:  # that fsync still uses the old descriptor
            self._lock.wait()
        moment = max(datetime.datetime.now(datetime.timezone.utc),
                     self._last_archive_time + datetime.timedelta(microseconds=1))
        archive = os.path.join(self.data_dir, f"events-{moment.strftime(ARCHIVE_TIME_FORMAT)}.jsonl")
        if self.fsync != "off":
            os.fsync(self._fd)
        os.rename(self.path, archive)
        try:
            new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            os.rename(archive, self.path)
            raise
        os.close(self._fd)
        self._fd, self._size, self._last_archive_time = new_fd, 0, moment
        self._synced = self._written  # all of it went to disk with the old file
        if self.fsync != "off":
            self._sync_directory()

    def _sync_directory(self) -> None:
        directory = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def close(self) -> None:
        """Flush to disk and close; later appends raise OSError."""
        with self._lock:
            if self._closed.is_set():
                return
            while self._sync_in_progress:
                self._lock.wait()
            self._closed.set()
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)


###############################################################################
# The inspection history: what /rudderlite/* answers from
###############################################################################

#: Query parameters of /rudderlite/events that are not filters.
EVENTS_QUERY_OPTIONS = ("limit", "wait", "min")
#: The longest a /rudderlite/events?wait= answer is held, in seconds.
MAX_WAIT_SECONDS = 60.0
#: How many rejections are remembered, and how many write keys have counts.
MAX_REJECTIONS = 1000
MAX_COUNTED_KEYS = 1000
#: How much of a rejected body /rudderlite/rejected shows.
REJECTED_BODY_PREVIEW = 1024


class HistoryEntry(NamedTuple):
    write_key: str
    line: bytes
    warnings: Tuple[str, ...]


class History:
    """The recent accepted events and rejections, per write key, bounded in count and bytes.

    Events are kept as their stored lines (compact bytes, decoded only when asked for), so the bound in bytes is
    close to the memory they take. One condition both guards the history and wakes the long-polls of
    ``/rudderlite/events?wait=``.
    """

    def __init__(self, max_events: int, max_bytes: int):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._changed = threading.Condition()
        self._events: collections.deque = collections.deque()
        self._bytes = 0
        self._rejections: collections.deque = collections.deque(maxlen=MAX_REJECTIONS)
        self._counts: "collections.OrderedDict[str, Dict[str, collections.Counter]]" = collections.OrderedDict()
        self._closed = False

    def _counts_of(self, write_key: str) -> Dict[str, collections.Counter]:
        counts = self._counts.pop(write_key, None)
        if counts is None:
            counts = {"accepted": collections.Counter(), "rejected": collections.Counter()}
        self._counts[write_key] = counts  # most recently used last; the oldest key is forgotten first
        while len(self._counts) > MAX_COUNTED_KEYS:
            self._counts.popitem(last=False)
        return counts

    def record_accepted(self, write_key: str, events: List[StoredEvent]) -> None:
        with self._changed:
            accepted = self._counts_of(write_key)["accepted"]
            for event in events:
                self._events.append(HistoryEntry(write_key, event.line, event.warnings))
                self._bytes += len(event.line)
                accepted[event.type if event.type in EVENT_TYPES else "other"] += 1
            while len(self._events) > self.max_events or self._bytes > self.max_bytes:
                self._bytes -= len(self._events.popleft().line)
            self._changed.notify_all()

    def record_rejected(self, write_key: str, record: dict) -> None:
        with self._changed:
            self._rejections.append((write_key, record))
            self._counts_of(write_key)["rejected"][str(record["status"])] += 1

    def events(self, write_key: Optional[str], filters: Dict[str, str], limit: int = 0,
               wait: float = 0.0, minimum: int = 1) -> List[dict]:
        """This key's events (every key's for None) matching every filter, oldest first, the newest ``limit``
        of them when given; with ``wait``, held until ``minimum`` match."""
        deadline = time.monotonic() + min(wait, MAX_WAIT_SECONDS)
        with self._changed:
            while True:
                matching = self._matching(write_key, filters)
                remaining = deadline - time.monotonic()
                if len(matching) >= minimum or remaining <= 0 or self._closed:
                    break
                self._changed.wait(remaining)
        return matching[-limit:] if limit else matching

    def _matching(self, write_key: Optional[str], filters: Dict[str, str]) -> List[dict]:
        found = []
        for entry in self._events:
            if write_key is not None and entry.write_key != write_key:
                continue
            event = json.loads(entry.line)
            if all(field_text(event, path) == wanted for path, wanted in filters.items()):
                if entry.warnings:
                    event["warnings"] = list(entry.warnings)
                found.append(event)
        return found

    def rejections(self, write_key: str) -> List[dict]:
        with self._changed:
            return [record for key, record in self._rejections if key == write_key]

    def stats(self, write_key: str) -> dict:
        with self._changed:
            counts = self._counts.get(write_key) or {"accepted": {}, "rejected": {}}
            return {name: dict(counter) for name, counter in counts.items()}

    def reset(self, write_key: str) -> None:
        """Forget this key's events, rejections and counts (the files are untouched)."""
        with self._changed:
            self._events = collections.deque(entry for entry in self._events if entry.write_key != write_key)
            self._bytes = sum(len(entry.line) for entry in self._events)
            kept = [(key, record) for key, record in self._rejections if key != write_key]
            self._rejections = collections.deque(kept, maxlen=MAX_REJECTIONS)
            self._counts.pop(write_key, None)

    def close(self) -> None:
        """Answer every long-poll now (the server is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


###############################################################################
# HTTP: reading requests within limits
###############################################################################

#: A refused body up to this much past its limit is read and thrown away, so the connection can stay open.
DRAIN_ALLOWANCE = 64 * 1024
#: After an answer sent before its body was read, how much more is read (and how long) before closing.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0
MAX_CHUNK_LINE = 1024
MAX_TRAILER_LINES = 64
HEX_DIGITS = re.compile(rb"[0-9a-fA-F]{1,16}")
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (\S+) (HTTP/1\.[01])\r?\n")
HEADER_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(.*?)[ \t]*\r?\n")
WRITE_KEY_IN_QUERY = re.compile(r"(?i)(writekey=)[^&]*")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class ClientGone(Exception):
    """The client closed the connection or ran out of time; there is nobody to answer."""


def read_exactly(rfile, length: int) -> bytes:
    data = rfile.read(length)
    if len(data) < length:
        raise ClientGone()
    return data


def discard(rfile, length: int) -> None:
    """Read and drop ``length`` bytes, 64 KiB at a time, so the connection can carry the next request."""
    while length > 0:
        length -= len(read_exactly(rfile, min(length, 65536)))


def read_request_head(rfile, limit: int) -> Tuple[bytes, bytes]:
    """The request line and the header block up to its empty line (RFC 9112 §2.1), at most ``limit`` bytes."""
    request_line = b"\r\n"
    while request_line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before the request line
        request_line = rfile.readline(limit + 1)
        if not request_line.endswith(b"\n"):
            if len(request_line) > limit:
                raise Rejection(HEADERS_TOO_LARGE)
            raise ClientGone()
    headers = bytearray()
    while True:
        line = rfile.readline(limit + 1 - len(request_line) - len(headers))
        headers += line
        if len(request_line) + len(headers) > limit:
            raise Rejection(HEADERS_TOO_LARGE)
        if not line.endswith(b"\n"):
            raise ClientGone()
        if line in (b"\r\n", b"\n"):
            return request_line, bytes(headers)


def parse_head(request_line: bytes, header_block: bytes) -> Tuple[str, str, str, Dict[str, str]]:
    """Method, target, version and header fields of a request head (RFC 9112 §3 and §5).

    Field names are lower-cased; a field sent twice is joined with ", " (RFC 9110 §5.3), so two differing
    Content-Length lines show as one value that is not a number. Folded lines (obs-fold) are refused, as
    RFC 9112 §5.2 allows.
    """
    request = REQUEST_LINE.fullmatch(request_line)
    if not request:
        raise Rejection(BAD_REQUEST)
    method, target, version = (part.decode("latin-1") for part in request.groups())
    headers: Dict[str, str] = {}
    for line in header_block.splitlines(keepends=True)[:-1]:  # the last line is the empty one
        field = HEADER_LINE.fullmatch(line)
        if not field:
            raise Rejection(BAD_REQUEST)
        name, value = field.group(1).decode("latin-1").lower(), field.group(2).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, target, version, headers


def read_chunked(rfile, limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (RFC 9112 §7.1), refused as soon as it would pass ``limit``."""
    body = bytearray()
    while True:
        line = rfile.readline(MAX_CHUNK_LINE)
        if not line.endswith(b"\n"):
            raise ClientGone() if not line else Rejection(BODY_UNREADABLE)
        size_text = line.split(b";", 1)[0].strip()  # chunk extensions follow a semicolon; they are ignored
        if not HEX_DIGITS.fullmatch(size_text):
            raise Rejection(BODY_UNREADABLE)
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise Rejection(REQUEST_TOO_LARGE)
        body += read_exactly(rfile, size)
        if rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
            raise Rejection(BODY_UNREADABLE)
    for _ in range(MAX_TRAILER_LINES):  # trailer fields, up to the empty line; rudderlite ignores them
        line = rfile.readline(MAX_CHUNK_LINE)
        if not line:
            raise ClientGone()
        if line in (b"\r\n", b"\n"):
            return bytes(body)
    raise Rejection(BODY_UNREADABLE)


@functools.lru_cache(maxsize=1)  # one date a second, not one a request
def http_date(second: int) -> str:
    """The ``Date`` header value (RFC 9110 §6.6.1) for a Unix time in whole seconds."""
    return email.utils.formatdate(second, usegmt=True)


def header_safe(value: str) -> str:
    """A header value fit to echo back: no CR, LF or other control character can start a new header."""
    return CONTROL_CHARACTERS.sub("", value)


###############################################################################
# HTTP: the request handler
###############################################################################


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """Answers one connection's requests (HTTP/1.1 keep-alive), one ``dispatch()`` per request.

    Every answer goes through ``respond()``, which writes status line, headers and body in one send (with
    TCP_NODELAY; a second small send would wait on the client's delayed ACK). Every refusal is a Rejection
    raised anywhere below ``dispatch()`` and answered there, in one place.
    """

    protocol_version = "HTTP/1.1"

    #: path -> {method: handler method}. HEAD is answered like GET, without the body.
    ROUTES = {
        **{f"/v1/{event_type}": {"POST": "accept_single"} for event_type in EVENT_TYPES},
        "/v1/batch": {"POST": "accept_batch"},
        "/beacon/v1/batch": {"POST": "accept_beacon"},
        "/": {"GET": "answer_health"},
        "/health": {"GET": "answer_health"},
        "/version": {"GET": "answer_version"},
        "/sourceConfig": {"GET": "answer_source_config"},
        "/sourceConfig/": {"GET": "answer_source_config"},
        "/rudderlite/events": {"GET": "inspect_events"},
        "/rudderlite/rejected": {"GET": "inspect_rejected"},
        "/rudderlite/stats": {"GET": "inspect_stats"},
        "/rudderlite/reset": {"POST": "inspect_reset"},
    }

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.linger = False

    # -- the request loop -----------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        """Wait for a request, read its head within the deadlines, dispatch it, and settle its body."""
        connections, config = self.server.connections, self.server.config
        try:
            connections.watch(self.connection, config.idle_timeout, busy=False)
            if not self.rfile.peek(1):
                self.close_connection = True
                return
            connections.watch(self.connection, config.head_timeout, busy=True)
            self.start_request()
            try:
                request_line, header_block = read_request_head(self.rfile, config.max_head_bytes)
                self.command, self.path, self.request_version, self.headers = parse_head(request_line, header_block)
            except Rejection as rejection:
                self.close_connection = True
                return self.refuse(rejection)
            connection_options = {option.strip() for option in self.headers.get("connection", "").lower().split(",")}
            self.close_connection = "close" in connection_options or (
                self.request_version == "HTTP/1.0" and "keep-alive" not in connection_options)
            connections.watch(self.connection, config.body_timeout, busy=True)
            self.dispatch()
            self.settle_body()
        except (ClientGone, OSError, ValueError):  # OSError covers ConnectionError and TimeoutError
            # the client left, went quiet past its deadline, or the watchdog shut the socket: nobody to answer
            self.close_connection = True

    def start_request(self) -> None:
        """Forget the previous request of this connection."""
        self.command, self.path, self.request_version, self.headers = "", "", "HTTP/1.1", {}
        self.url = urllib.parse.SplitResult("", "", "", "", "")
        self.origin = self.write_key = self.declared_length = None
        self.body_pending = self.continue_sent = False
        self.body_limit = 0
        self.body_preview = b""

    # -- dispatch and answers -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Route the request and answer it; every Rejection becomes its answer here and nowhere else."""
        self.origin = self.headers.get("origin")
        with contextlib.suppress(ValueError):  # such as an unclosed "[" in an absolute-form target: no route
            self.url = urllib.parse.urlsplit(self.path)  # origin-form, or absolute-form (RFC 9112 §3.2.2)
        try:
            self.declared_length = self.content_length()
            self.body_pending = "transfer-encoding" in self.headers or self.declared_length > 0
            if self.command == "OPTIONS":
                return self.answer_preflight()
            getattr(self, self.route())()
        except Rejection as rejection:
            self.refuse(rejection)
        except (ClientGone, ConnectionError, TimeoutError):
            raise
        except Exception:
            logger.exception("bug while answering %s %s", self.command, self.loggable_path())
            self.close_connection = True
            self.respond(INTERNAL_ERROR.status, INTERNAL_ERROR.message.encode())

    def route(self) -> str:
        methods = self.ROUTES.get(self.url.path)
        if methods is None:
            raise Rejection(PAGE_NOT_FOUND)
        name = methods.get("GET" if self.command == "HEAD" else self.command)
        if name is None:
            allowed = ", ".join(sorted({*methods, "OPTIONS", *(["HEAD"] if "GET" in methods else [])}))
            raise Rejection(METHOD_NOT_ALLOWED, headers=(f"Allow: {allowed}",))
        return name

    def refuse(self, rejection: Rejection) -> None:
        answer = rejection.answer
        if self.write_key is not None:
            self.server.history.record_rejected(self.write_key, {
                "status": answer.status,
                "message": answer.message,
                **({"detail": rejection.detail} if rejection.detail else {}),
                "path": self.url.path,
                "receivedAt": utc_timestamp(datetime.datetime.now(datetime.timezone.utc)),
                "body": self.body_preview[:REJECTED_BODY_PREVIEW].decode("utf-8", "replace"),
            })
        self.respond(answer.status, answer.message.encode("utf-8"), headers=rejection.headers)

    def respond(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
                headers: Tuple[str, ...] = ()) -> None:
        """Write the whole answer in one send: status line, headers, body (no body for HEAD or 204)."""
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
                 f"Date: {http_date(int(time.time()))}"]
        if status != 204:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        if self.origin:  # CORS on every answer to a browser, errors included, or the page cannot read it
            lines += [f"Access-Control-Allow-Origin: {header_safe(self.origin)}",
                      "Access-Control-Allow-Credentials: true", "Vary: Origin"]
        lines += headers
        if self.body_pending and not self.can_drain_body():
            self.close_connection = True
        if self.close_connection or self.server.connections.closing:
            self.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        if not self.server.config.quiet:
            logger.info('%s "%s %s" %d %d', self.client_address[0], self.command or "-", self.loggable_path(),
                        status, len(body))

    def loggable_path(self) -> str:
        """The path with any write key in its query blanked: keys never reach a log line."""
        return WRITE_KEY_IN_QUERY.sub(r"\1REDACTED", header_safe(self.path))

    def answer_json(self, value) -> None:
        self.respond(200, encode_json(value), content_type="application/json")

    def answer_preflight(self) -> None:
        """A CORS preflight: 204 before any auth (preflights carry no credentials), allowing what was asked."""
        headers = ["Access-Control-Allow-Methods: GET, HEAD, POST, OPTIONS", "Access-Control-Max-Age: 900"]
        requested = self.headers.get("access-control-request-headers")
        if requested:
            headers.append(f"Access-Control-Allow-Headers: {header_safe(requested)}")
        if self.headers.get("access-control-request-private-network", "").lower() == "true":
            headers.append("Access-Control-Allow-Private-Network: true")  # a public page reaching loopback
        self.respond(204, headers=tuple(headers))

    # -- bodies -----------------------------------------------------------------------------------------

    def content_length(self) -> int:
        """The declared body length; malformed or conflicting values are refused (RFC 9112 §6.3)."""
        if "content-length" not in self.headers:
            return 0
        lengths = {value.strip() for value in self.headers["content-length"].split(",")}
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            self.close_connection = True
            raise Rejection(BODY_UNREADABLE)
        return int(next(iter(lengths)))

    def expects_continue(self) -> bool:
        return self.request_version == "HTTP/1.1" and self.headers.get("expect", "").lower() == "100-continue"

    def read_body(self, limit: int) -> bytes:
        """The body, gzip undone, refused while it is read once it passes ``limit`` (413 before any parsing)."""
        gzipped = self.headers.get("content-encoding", "").lower() in ("gzip", "x-gzip")
        wire_limit = compressed_limit(limit) if gzipped else limit
        self.body_limit = wire_limit
        transfer_encoding = self.headers.get("transfer-encoding")
        if transfer_encoding is not None:
            if transfer_encoding.lower() != "chunked":
                self.close_connection = True
                raise Rejection(UNSUPPORTED_TRANSFER_ENCODING)
            if "content-length" in self.headers:  # RFC 9112 §6.1: a smuggling attempt, or a bug
                self.close_connection = True
            self.send_continue()
            raw = read_chunked(self.rfile, wire_limit)
        else:
            if self.declared_length > wire_limit:
                raise Rejection(REQUEST_TOO_LARGE)
            self.send_continue()
            raw = read_exactly(self.rfile, self.declared_length)
        self.body_pending = False
        self.body_preview = raw[:REJECTED_BODY_PREVIEW]
        if not gzipped:
            return raw
        body = inflate_gzip(raw, limit)
        self.body_preview = body[:REJECTED_BODY_PREVIEW]
        return body

    def send_continue(self) -> None:
        if self.expects_continue():
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.continue_sent = True

    def can_drain_body(self) -> bool:
        """Whether a body left unread can be read and dropped to keep the connection: a declared length at
        most a little past the limit, and a client not waiting for ``100 Continue`` to send it."""
        if "transfer-encoding" in self.headers or self.declared_length is None:
            return False
        if self.expects_continue() and not self.continue_sent:
            return False
        return self.declared_length <= self.body_limit + DRAIN_ALLOWANCE

    def settle_body(self) -> None:
        """After the answer: drop a body left unread, or close the connection and linger (see finish)."""
        if not self.body_pending:
            return
        if self.close_connection:
            self.linger = True
        else:
            discard(self.rfile, self.declared_length)
        self.body_pending = False

    def finish(self) -> None:
        """Close gently after an early answer: shut our side, then read what the client still sends for a
        moment, so its unread bytes do not make the kernel reset the connection and lose our answer."""
        super().finish()
        if not self.linger:
            return
        self.server.connections.watch(self.connection, 2 * LINGER_SECONDS, busy=False)
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            received = 0
            while received < LINGER_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                received += len(chunk)

    # -- the event endpoints ------------------------------------------------------------------------------

    def authenticate(self) -> str:
        """The write key from Basic auth, refused unless it is allowed (CONTRACT section 3's two 401s)."""
        return self.allowed(write_key_from_authorization(self.headers.get("authorization")))

    def allowed(self, write_key: str) -> str:
        if not write_key_allowed(write_key, self.server.config.write_keys):
            raise Rejection(INVALID_WRITE_KEY)
        self.write_key = write_key
        return write_key

    def accept_single(self) -> None:
        self.accept_events(self.authenticate(), type_from_path=self.url.path.rsplit("/", 1)[-1])

    def accept_batch(self) -> None:
        self.accept_events(self.authenticate(), type_from_path=None)

    def accept_beacon(self) -> None:
        """``navigator.sendBeacon`` cannot set headers: the write key comes in the query."""
        write_key = urllib.parse.parse_qs(self.url.query).get("writeKey", [""])[-1]
        if not write_key:
            raise Rejection(NO_WRITE_KEY_IN_QUERY)
        self.accept_events(self.allowed(write_key), type_from_path=None)

    def accept_events(self, write_key: str, type_from_path: Optional[str]) -> None:
        config = self.server.config
        body = self.read_body(config.max_event_bytes if type_from_path else config.max_batch_bytes)
        with self.server.parsing.reserve(len(body)):
            received_at = utc_timestamp(datetime.datetime.now(datetime.timezone.utc))
            stored = process_body(body, type_from_path, config, received_at, self.request_ip())
            try:
                self.server.store.append(b"".join(event.line for event in stored))
            except OSError as error:
                logger.error("could not store %d events: %s", len(stored), error)
                raise Rejection(STORE_FAILED) from None
        self.server.history.record_accepted(write_key, stored)
        for event in stored:
            if event.warnings:
                logger.warning("accepted with contract warnings: %s", "; ".join(event.warnings))
        self.respond(OK.status, OK.message.encode())

    def request_ip(self) -> str:
        """The client's address as the gateway records it: the first X-Forwarded-For entry, else the peer."""
        forwarded = self.headers.get("x-forwarded-for", "").split(",")[0].strip()
        return forwarded or self.client_address[0]

    # -- the other endpoints ------------------------------------------------------------------------------

    def answer_health(self) -> None:
        self.answer_json({"server": "UP", "db": "UP", "acceptingEvents": "TRUE", "version": __version__})

    def answer_version(self) -> None:
        self.answer_json({"version": __version__, "server": "rudderlite"})

    def answer_source_config(self) -> None:
        """The JavaScript SDK sends its key both in Basic auth and in the ``writeKey`` query parameter."""
        if self.headers.get("authorization"):
            write_key = self.authenticate()
        else:
            write_key = urllib.parse.parse_qs(self.url.query).get("writeKey", [""])[-1]
            if not write_key:
                raise Rejection(NO_WRITE_KEY_IN_HEADER)
            self.allowed(write_key)
        self.answer_json(source_config(write_key))

    def inspect_events(self) -> None:
        write_key = self.authenticate()
        query = dict(urllib.parse.parse_qsl(self.url.query, keep_blank_values=True))
        filters = {path: value for path, value in query.items() if path not in EVENTS_QUERY_OPTIONS}
        try:
            limit = int(query.get("limit", 0))
            wait = float(query.get("wait", 0))
            minimum = int(query.get("min", 1))
        except ValueError:
            limit = -1
        if limit < 0 or minimum < 0 or not 0 <= wait < float("inf"):
            raise Rejection(BAD_QUERY, "limit and min take whole numbers, wait takes seconds")
        events = self.server.history.events(write_key, filters, limit, wait, minimum)
        self.answer_json({"events": events})

    def inspect_rejected(self) -> None:
        self.answer_json({"rejected": self.server.history.rejections(self.authenticate())})

    def inspect_stats(self) -> None:
        self.answer_json(self.server.history.stats(self.authenticate()))

    def inspect_reset(self) -> None:
        self.server.history.reset(self.authenticate())
        self.answer_json({"reset": True})


###############################################################################
# The server
###############################################################################

#: At shutdown, how long requests in flight may take to finish.
SHUTDOWN_GRACE_SECONDS = 10.0


class Connections:
    """The open connections: a cap on their number and a deadline for each.

    Each connection always has a deadline: for its next request while idle, for its head once a request began,
    for its body after that. A watchdog shuts down the sockets whose deadline passed, which ends any read
    blocked on them: a client trickling its headers a byte at a time (slowloris) cannot hold a thread.
    At shutdown, idle connections are closed at once and busy ones are given time to finish.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.closing = False
        self._changed = threading.Condition()
        self._open: Dict[socket.socket, Tuple[float, bool]] = {}  # socket -> (deadline, busy)

    def __len__(self) -> int:
        with self._changed:
            return len(self._open)

    def admit(self, sock: socket.socket) -> bool:
        with self._changed:
            if len(self._open) >= self.limit or self.closing:
                return False
            self._open[sock] = (float("inf"), False)  # until its thread starts and sets its first deadline
            return True

    def watch(self, sock: socket.socket, seconds: float, busy: bool) -> None:
        """Give the connection ``seconds`` for what it does next; an idle one is closed at once when stopping."""
        with self._changed:
            self._open[sock] = (time.monotonic() + seconds, busy)
            if self.closing and not busy:
                self._shut(sock)
                self._changed.notify_all()  # one fewer busy connection for wait_until_idle

    def forget(self, sock: socket.socket) -> None:
        with self._changed:
            self._open.pop(sock, None)
            self._changed.notify_all()

    def expire(self) -> None:
        now = time.monotonic()
        with self._changed:
            for sock, (deadline, _busy) in self._open.items():
                if deadline < now:
                    self._shut(sock)

    def close_idle(self) -> None:
        """From now on, refuse new connections and close each connection as soon as it is idle."""
        with self._changed:
            self.closing = True
            for sock, (_deadline, busy) in self._open.items():
                if not busy:
                    self._shut(sock)

    def wait_until_idle(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the requests in flight to be answered."""
        deadline = time.monotonic() + grace
        with self._changed:
            while any(busy for _deadline, busy in self._open.values()) and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class ParsingBudget:
    """How many body bytes are parsed into events at once.

    A body becomes about ten times its size in Python objects while it is checked, so eight clients sending
    4 MiB batches at once would take hundreds of MiB. Bodies wait here, already read, until the bytes in
    progress leave room; one body is always let through, however large. With the GIL, parsing two bodies at
    once is no faster than one after the other, so nothing is lost.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._in_progress = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, size: int):
        with self._changed:
            while self._in_progress and self._in_progress + size > self.limit:
                self._changed.wait()
            self._in_progress += size
        try:
            yield
        finally:
            with self._changed:
                self._in_progress -= size
                self._changed.notify_all()


class RudderliteServer(http.server.ThreadingHTTPServer):
    """The HTTP server with its store, its history and its connections; one thread per connection."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: Config):
        self.config = config
        self.store = EventStore(config.data_dir, config.rotate_bytes, config.fsync)
        self.history = History(config.history_events, config.history_bytes)
        self.connections = Connections(config.max_connections)
        self.parsing = ParsingBudget(config.max_batch_bytes)
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._stopped = threading.Event()
        self._serving: Optional[threading.Thread] = None
        try:
            super().__init__((config.host, config.port), RequestHandler)
        except OSError:
            self.store.close()
            raise
        threading.Thread(target=self._watchdog, name="rudderlite-watchdog", daemon=True).start()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host name, which can stall start-up for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.server_port}"

    def _watchdog(self) -> None:
        while not self._stopped.wait(0.5):
            self.connections.expire()

    def process_request(self, request, client_address) -> None:
        if self.connections.admit(request):
            return super().process_request(request, client_address)
        with contextlib.suppress(OSError):  # over the cap: say so at once; SDKs retry a 503
            request.settimeout(0.5)
            body = TOO_MANY_CONNECTIONS.message.encode()
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        self.connections.forget(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection's thread ended in an exception the handler did not expect: one logged traceback."""
        exception = sys.exc_info()[1]
        if isinstance(exception, (ConnectionError, TimeoutError)):
            return
        logger.exception("bug on the connection from %s", client_address[0])

    def start(self) -> "RudderliteServer":
        """Serve in a background thread (for embedding); ``stop()`` ends it."""
        self._serving = threading.Thread(target=self.serve_forever, args=(0.1,), name="rudderlite-server",
                                         daemon=True)
        self._serving.start()
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, answer the requests in flight (waiting at most ``grace`` seconds), close the files."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._serving is not None:
            self.shutdown()
            self._serving.join()
        self.connections.close_idle()
        self.socket.close()
        self.history.close()
        self.connections.wait_until_idle(grace)
        self.store.close()

    def received(self, write_key: Optional[str] = None, **filters: str) -> List[dict]:
        """The recent events sent with ``write_key`` (with any key for None) that match the filters, oldest
        first: what ``/rudderlite/events`` answers, without HTTP, for embedding."""
        return self.history.events(write_key, filters)

    def __exit__(self, *exc_info) -> None:
        self.stop()


def make_server(config: Config = Config()) -> RudderliteServer:
    """A server bound to ``config.host:config.port`` (read the real port from ``.url``), not yet serving.

    Raises OSError when the data directory or the address cannot be used.
    """
    return RudderliteServer(config)


@contextlib.contextmanager
def running(config: Optional[Config] = None, **settings):
    """Run a server in a background thread for the length of a ``with`` block; for tests::

        with rudderlite.running(port=0, data_dir=str(tmp_path)) as server:
            requests.post(server.url + "/v1/track", ...)
            assert server.received("KEY", event="Signed Up")
    """
    server = make_server(dataclasses.replace(config or Config(), **settings)).start()
    try:
        yield server
    finally:
        server.stop()


###############################################################################
# The command line
###############################################################################


def parse_config(argv: Optional[List[str]] = None) -> Config:
    """Build a Config from the command line; the defaults come from Config itself, declared once."""
    defaults = Config()
    parser = argparse.ArgumentParser(prog="rudderlite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=defaults.host, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=defaults.port,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="where the JSONL files go (default: %(default)s)")
    parser.add_argument("--write-key", dest="write_keys", action="append", default=[],
                        help="accept only this key (repeatable; default: any non-empty key)")
    for option, help_text in [("--max-event-bytes", "largest event"), ("--max-batch-bytes", "largest batch body"),
                              ("--rotate-bytes", "rotate the active file before it passes this size"),
                              ("--history-events", "events remembered for /rudderlite/events"),
                              ("--history-bytes", "bytes of events remembered for /rudderlite/events"),
                              ("--max-connections", "connections served at once")]:
        name = option[2:].replace("-", "_")
        parser.add_argument(option, type=positive_int, default=getattr(defaults, name),
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--fsync", choices=FSYNC_MODES, default=defaults.fsync,
                        help="always: before answering 200; interval: every second; off (default)")
    parser.add_argument("--strict", action="store_true", help="answer contract violations with 400")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    options = parser.parse_args(argv)
    return Config(**{**vars(options), "write_keys": tuple(options.write_keys)})


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def send_stop_signals_to(wakeup: socket.socket) -> None:
    """From now on, SIGTERM and SIGINT write a byte to ``wakeup``.

    The OS may deliver a signal to any thread, and Python runs handlers only in the main thread, between two
    bytecodes: a main thread asleep in time.sleep() or in Event.wait() would not notice a signal delivered to a
    connection's thread. The wakeup socket (signal.set_wakeup_fd) is written by whichever thread got it.
    """
    wakeup.setblocking(False)
    signal.set_wakeup_fd(wakeup.fileno())
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, lambda *_: None)  # the wakeup byte is all that is needed


def main(argv: Optional[List[str]] = None) -> int:
    """Run until SIGTERM or SIGINT, then finish the requests in flight and exit 0."""
    config = parse_config(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if config.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = make_server(config)
    except OSError as error:
        print(f"rudderlite: cannot start with --data-dir {config.data_dir} on {config.host}:{config.port}: {error}",
              file=sys.stderr)
        return 2
    server.start()
    stop_requests, wakeup = socket.socketpair()
    send_stop_signals_to(wakeup)  # before the listening line tells anyone to send signals
    print(f"rudderlite listening on {server.url}", flush=True)
    stop_requests.recv(1)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
