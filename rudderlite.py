#!/usr/bin/env python3
"""rudderlite: a local stand-in for RudderStack's HTTP event API, in one standard-library file.

RudderStack's HTTP source takes analytics events over plain HTTP: ``POST /v1/track``,
``/v1/identify``, ``/v1/page``, ``/v1/screen``, ``/v1/group``, ``/v1/alias`` with one event,
``/v1/batch`` with ``{"batch": [...]}``, authenticated with HTTP Basic where the user name is the
source's *write key* and the password is empty. rudderlite answers that API as RudderStack's
open-source data plane (rudder-server, its ``gateway/`` package) does, and appends every accepted
event as one JSON line to a file you can read with ``jq``. It is a local mock, a CI fake endpoint
and something to read; it is not a production collector (no destinations, no queueing, no replay).

Run it::

    python3 rudderlite.py                     # http://127.0.0.1:8080, events in ./rudderlite-data/
    curl -u MY_WRITE_KEY: -d '{"userId": "u1", "event": "Signed Up"}' http://127.0.0.1:8080/v1/track
    tail -n1 rudderlite-data/events.jsonl | jq .

Each request leaves one line on standard error that says what arrived; ``--print`` also writes every
stored event to standard output for ``jq``, and http://127.0.0.1:8080/rudderlite/ shows them live.

What a request meets, in the order this file is written:

1. the contract as data: limits, event types, every answer with its status;
2. configuration: one frozen dataclass whose defaults are the documented limits;
3. pure functions: Basic auth, gzip within limits, JSON, the contract checks, enrichment;
4. tracking plans: a JSON Schema checker compiled once per plan, with RudderStack's verdicts;
5. the store: ``DATA_DIR/events.jsonl``, rotated to ``events-<UTC time>.jsonl`` by size;
6. the inspection history behind ``/rudderlite/events`` (for tests that assert on what an app sent);
7. HTTP: reading heads and bodies within limits, the route table, the one place answers are made;
8. the server: connection limits, deadlines, clean shutdown, ``running()`` for embedding in tests;
9. the command line, and the live page that ``GET /rudderlite/`` serves.

README.md is the manual: every answer, what is stored, and where rudderlite chose for itself. The
tests are in ``test_rudderlite.py`` (``python3 -m pip install pytest hypothesis && python3 -m
pytest -q``). """

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import hmac
import http
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

__version__ = "0.2.0"

logger = logging.getLogger("rudderlite")


###############################################################################
# The contract as data
###############################################################################

#: The event types RudderStack knows; each has its own endpoint ``/v1/<type>``.
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
#: When the store fsyncs: before each 200, at least once a second, or never.
FSYNC_MODES = ("always", "interval", "off")


class Answer(NamedTuple):
    """One answer of the API: its status and the plain-text message sent with it."""

    status: int
    message: str


# The answers of the README's Answers table, in its order; the messages are rudder-server's
# (gateway/response), or Go's net/http where rudder-server leaves the answer to it.
HOST_NOT_ALLOWED = Answer(403, "host not allowed")
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
OK = Answer(200, "ok")
# Answers to a head or a body framing that cannot be read: as Go's net/http, before anything else.
BAD_REQUEST = Answer(400, "400 Bad Request")
HEADERS_TOO_LARGE = Answer(431, "431 Request Header Fields Too Large")
BODY_UNREADABLE = Answer(400, "failed to read body from request")  # rudder-server says 500
UNSUPPORTED_TRANSFER_ENCODING = Answer(501, "Unsupported transfer encoding")
# Answers of rudderlite's own endpoints and limits.
BAD_QUERY = Answer(400, "invalid query parameter")
TOO_MANY_CONNECTIONS = Answer(503, "too many connections")
INTERNAL_ERROR = Answer(500, "internal server error")

#: Contract checks: fields that, when present and not null, must be JSON objects.
OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
#: Contract checks: fields that, when present and not null, must be RFC 3339 date-times.
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
#: Contract checks: the field alias and group events cannot do without (track's "event" is checked
#: on its own: it must be a non-blank string).
REQUIRED_FIELD = {"alias": "previousId", "group": "groupId"}
#: Contract checks: fields that identify a user; strings or numbers.
ID_FIELDS = ("userId", "anonymousId")

# RFC 3339 §5.6 date-time: 2026-11-26T10:00:00Z, with an optional fraction and a numeric offset.
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
    """Everything a server needs to know; the defaults are the documented limits (README: Command
    line)."""

    #: Address to bind: loopback unless the user asks otherwise.
    host: str = "127.0.0.1"
    #: Port to bind; 0 lets the OS pick a free one (read it back from ``server.url``).
    port: int = 8080
    #: Directory of the JSONL files; created if missing.
    data_dir: str = "./rudderlite-data"
    #: The accepted write keys; empty accepts any non-empty key.
    write_keys: Tuple[str, ...] = ()
    #: Largest single event: the body of /v1/<type>, or one event of a batch as compact JSON.
    max_event_bytes: int = 32 * 1024
    #: Largest /v1/batch body, after gzip is undone (RudderStack: 4 MB).
    max_batch_bytes: int = 4 * 1024 * 1024
    #: The active file is rotated before it would pass this size.
    rotate_bytes: int = 64 * 1024 * 1024
    #: "always": fsync before answering 200; "interval": at least once a second; "off": never.
    fsync: str = "off"
    #: Answer contract violations (and tracking-plan violations) with 400 instead of accepting them.
    strict: bool = False
    #: No line per request on standard error, no contract warnings.
    quiet: bool = False
    #: Also write every stored event to standard output, one JSON line each.
    print_events: bool = False
    #: A RudderStack tracking plan to check events against: a path to its JSON, or the parsed plan.
    tracking_plan: Optional[object] = None
    #: Host names served besides IP addresses and localhost, when bound to loopback.
    allow_hosts: Tuple[str, ...] = ()
    #: Origins besides loopback ones that may read /rudderlite/* from a browser.
    allow_origins: Tuple[str, ...] = ()
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
    #: Seconds a client has to take in an answer.
    answer_timeout: float = 60.0
    #: Largest request head in bytes.
    max_head_bytes: int = 64 * 1024


###############################################################################
# Pure functions: auth, bodies, JSON, the contract checks, enrichment (no I/O)
###############################################################################


class Rejection(Exception):
    """A request refused with an answer of the contract.

    ``detail`` says more (which batch event was too large); it goes to /rudderlite/rejected and to
    the request's line on standard error, never into the answer. ``close`` means the connection
    cannot carry another request after this answer, because where this request's body ends is
    unknown. """

    def __init__(self, answer: Answer, detail: str = "", headers: Tuple[str, ...] = (),
                 close: bool = False):
        super().__init__(answer.message)
        self.answer = answer
        self.detail = detail
        self.headers = headers
        self.close = close


class StoredEvent(NamedTuple):
    """An accepted event, ready for the file: its line, and what the request's log line says of
    it."""

    line: bytes
    type: object  # its "type": a string, or whatever a batch event sent (a contract warning)
    name: str  # the track event's name, or the page or screen name; "" when it has none
    user_id: str
    anonymous_id: str
    warnings: Tuple[str, ...]  # contract violations, "field: problem"
    violations: Tuple[str, ...]  # tracking-plan violations, "type at /pointer: message"


def write_key_from_authorization(authorization: Optional[str]) -> str:
    """The write key of an ``Authorization: Basic base64(key:)`` header (RFC 7617), password
    ignored.

    As Go's ``Request.BasicAuth``: the scheme is case-insensitive and the decoded text must hold a
    colon. """
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
    """Whether the key may send. Every allowed key is compared, each in constant time, so how long
    this takes says nothing about how much of a key was right."""
    if not allowed_keys:
        return True
    given = write_key.encode("utf-8")
    matches = [hmac.compare_digest(given, key.encode("utf-8")) for key in allowed_keys]
    return any(matches)


def compressed_limit(limit: int) -> int:
    """How many gzip bytes may carry ``limit`` inflated bytes: deflate's stored blocks add 5 bytes
    a 64 KiB, the gzip header and trailer a few more; a generous margin keeps it simple."""
    return limit + limit // 64 + 1024


def inflate_gzip(compressed: bytes, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip``, refusing the body once it inflates past ``limit`` bytes.

    Inflating stops at limit + 1 bytes, so a small body that would inflate to gigabytes costs no
    more than the limit. A body may hold several gzip members one after another (RFC 1952 §2.2), as
    Go's gzip reader accepts. Each member is fed in pieces that double in size, so what zlib copies
    of the input left over after a member is never more than that member: the cost stays linear in
    the body however many members it has. A truncated or corrupt stream is ``invalid json``. """
    inflated = bytearray()
    compressed = memoryview(compressed)
    position = 0
    while position < len(compressed):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # 16: a gzip header and trailer
        piece_size = 64
        while not inflater.eof:
            piece = compressed[position:position + piece_size]
            if not piece:
                raise Rejection(INVALID_JSON)  # the member ends before its trailer
            position += len(piece)
            piece_size = min(2 * piece_size, 1 << 20)
            try:
                inflated += inflater.decompress(piece, limit + 1 - len(inflated))
            except zlib.error:
                raise Rejection(INVALID_JSON) from None
            if len(inflated) > limit:
                raise Rejection(REQUEST_TOO_LARGE)
        position -= len(inflater.unused_data)  # the start of the next member
    return bytes(inflated)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: JSON allows the text, but no float (and no Go float64) holds it
        raise ValueError(f"{text} overflows")
    return value


_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json(body: bytes):
    """The JSON value of a body, or ``invalid json``: UTF-8 only, no NaN or Infinity, no number that
    overflows a float, no nesting too deep to parse."""
    try:
        return _JSON_DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # ValueError covers UnicodeDecodeError and JSONDecodeError
        raise Rejection(INVALID_JSON) from None


_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ASCII_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def encode_json(value) -> bytes:
    """Compact UTF-8 JSON: the size a batch event is measured by, and the form of a line in the
    file."""
    try:
        try:
            return _COMPACT_JSON.encode(value).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): JSON, not UTF-8; kept escaped
            return _ASCII_JSON.encode(value).encode("ascii")
    except RecursionError:  # nesting too deep to write back
        raise Rejection(INVALID_JSON) from None


def batch_events(document) -> list:
    """The events of a /v1/batch body; other top-level keys (``sentAt``, ``writeKey``...) are
    ignored."""
    events = document.get("batch") if isinstance(document, dict) else None
    if not isinstance(events, list) or not events:
        raise Rejection(EMPTY_BATCH)
    return events


def id_text(value) -> str:
    """An id as rudder-server reads it: a string trimmed, null as empty, anything else as its JSON
    text (so a number, and also a boolean or an object, counts as an id; the contract checks warn
    of the last two)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return encode_json(value).decode("utf-8")


def is_blank(value) -> bool:
    """Absent for the contract: null, or a string of only white space."""
    return value is None or (isinstance(value, str) and not value.strip())


JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean",
                   type(None): "null"}


def json_type(value) -> str:
    """The JSON name of a value's type, for messages (int and float are both "number")."""
    return JSON_TYPE_NAMES.get(type(value), "number")


def contract_violations(event: dict, event_type) -> List[str]:
    """The contract violations of one event (README: Contract checks) as ``field: problem`` texts,
    in field order. ``event_type`` is whatever the event or the path says, a string or not."""
    violations = []
    known_type = event_type if isinstance(event_type, str) and event_type in EVENT_TYPES else None
    if known_type is None:
        shown = "missing" if event_type is None else encode_json(event_type).decode("utf-8")[:100]
        violations.append(f"type: {shown} is not one of {', '.join(EVENT_TYPES)}")
    if known_type == "track":
        if not (isinstance(event.get("event"), str) and event["event"].strip()):
            violations.append('event: track needs a non-empty "event"')
    elif known_type in REQUIRED_FIELD and is_blank(event.get(REQUIRED_FIELD[known_type])):
        required = REQUIRED_FIELD[known_type]
        violations.append(f'{required}: {known_type} needs "{required}"')
    for field in OBJECT_FIELDS:
        value = event.get(field)
        if value is not None and not isinstance(value, dict):
            violations.append(f"{field}: must be an object, not {json_type(value)}")
    for field in TIMESTAMP_FIELDS:
        value = event.get(field)
        if value is not None and not (isinstance(value, str)
                                      and RFC3339_DATE_TIME.fullmatch(value)):
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
    """The event's userId and anonymousId as id texts; refuses what the gateway refuses first."""
    if not isinstance(event, dict):
        raise Rejection(NOT_AN_EVENT)
    user_id, anonymous_id = id_text(event.get("userId")), id_text(event.get("anonymousId"))
    if not user_id and not anonymous_id:
        raise Rejection(NO_IDENTITY)
    return user_id, anonymous_id


#: Ids up to this many characters have their rudderId cached; longer ones are rare and would make
#: the cache's memory depend on what clients send.
CACHED_ID_CHARACTERS = 128


def rudder_id(user_id: str, anonymous_id: str) -> str:
    """rudder-server's rudderId: the MD5 of ``userId:anonymousId`` read as a UUID with version 4
    bits."""
    if len(user_id) + len(anonymous_id) <= CACHED_ID_CHARACTERS:
        return _cached_rudder_id(user_id, anonymous_id)
    return _computed_rudder_id(user_id, anonymous_id)


def _computed_rudder_id(user_id: str, anonymous_id: str) -> str:
    text = f"{user_id}:{anonymous_id}".encode("utf-8")
    digest = hashlib.md5(text, usedforsecurity=False).digest()
    return str(uuid.UUID(bytes=digest, version=4))  # version=4 also sets the RFC 4122 variant bits


# The same users send again and again; a cached id costs a tenth of a computed one.
_cached_rudder_id = functools.lru_cache(maxsize=8192)(_computed_rudder_id)


def enrichment(event: dict, received_at: str, request_ip: str, type_from_path: Optional[str],
               event_rudder_id: str) -> dict:
    """The fields the gateway sets on an event (README: What is stored), only those that change."""
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

    ``encoded`` is the event as received, already encoded (to measure it); when the fields are all
    new keys, they are appended to that encoding instead of encoding the whole event a second time.
    """
    if not event.keys().isdisjoint(fields):  # a field replaces one the client sent
        event.update(fields)
        return encode_json(event) + b"\n"
    return encoded[:-1] + b"," + encode_json(fields)[1:] + b"\n"  # "{...}" + ',"messageId":...}'


def utc_timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as rudder-server writes ``receivedAt``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def display_name(event: dict) -> str:
    """What a person calls the event: the track event's name, else the page, screen or group
    name."""
    for field in ("event", "name"):
        value = event.get(field)
        if isinstance(value, str) and value:
            return value
    return ""


def process_body(body: bytes, type_from_path: Optional[str], config: Config, received_at: str,
                 request_ip: str, plan=None) -> List[StoredEvent]:
    """Check a request's body as the gateway does and return its events as lines, or raise the one
    Rejection that answers it.

    ``type_from_path`` is the type of a single-event endpoint, None for a batch. The checks run in
    the README's order: JSON, then the batch, then the size of every batch event, then each event
    in order (not an object, no ids, and under ``--strict`` its contract and plan violations); the
    first that fails answers, so a request is all or nothing. """
    document = parse_json(body)
    events = [document] if type_from_path else batch_events(document)
    encodings = [encode_json(event) for event in events]
    if not type_from_path:
        for index, encoded in enumerate(encodings):
            if len(encoded) > config.max_event_bytes:
                raise Rejection(REQUEST_TOO_LARGE,
                                f"batch[{index}] is {len(encoded)} bytes as compact JSON, "
                                f"over --max-event-bytes {config.max_event_bytes}")
    stored = []
    for index, (event, encoded) in enumerate(zip(events, encodings)):
        where = "" if type_from_path else f"batch[{index}]"
        user_id, anonymous_id = identities(event)
        event_type = type_from_path or event.get("type")
        warnings = tuple(f"{where}.{text}" if where else text
                         for text in contract_violations(event, event_type))
        if warnings and config.strict:
            raise Rejection(Answer(400, warnings[0]))
        fields = enrichment(event, received_at, request_ip, type_from_path,
                            rudder_id(user_id, anonymous_id))
        if plan is None:
            line, violations = stored_line(event, encoded, fields), ()
        else:
            event.update(fields)
            violations = plan_verdict(plan, event)
            if violations and config.strict:
                raise Rejection(Answer(400, f"{where}: {violations[0]}" if where
                                       else violations[0]))
            line = encode_json(event) + b"\n"
        stored.append(StoredEvent(line, event_type, display_name(event), user_id, anonymous_id,
                                  warnings, violations))
    return stored


def source_config(write_key: str) -> dict:
    """What ``GET /sourceConfig`` answers: the smallest source configuration the JavaScript SDK
    accepts.

    No destinations (so the SDK loads no integration scripts) and no stats collection (so it posts
    no metrics): the browser SDK then runs fully offline against rudderlite. """
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


###############################################################################
# Tracking plans: RudderStack's verdicts, offline
###############################################################################


class PlanUnusable(ValueError):
    """A tracking plan that cannot be used: not JSON, or not one of RudderStack's plan shapes."""


def load_tracking_plan(document, default_id: str):
    raise PlanUnusable("tracking plans are not supported yet")


def plan_verdict(plan, event: dict) -> Tuple[str, ...]:
    """Check an event against the plan and write the verdict into its context as rudder-server does
    downstream of its gateway: ``trackingPlanId``, ``trackingPlanVersion`` and ``violationErrors``
    (empty when it conforms). A context that is not an object is left as it is, as there."""
    errors = plan.violations(event)
    context = event.get("context")
    if context is None:
        context = event["context"] = {}
    if isinstance(context, dict):
        context.update(trackingPlanId=plan.id, trackingPlanVersion=plan.version,
                       violationErrors=errors)
    return tuple(f"{error['type']} at {error['meta'].get('instancePath') or '/'}: "
                 f"{error['message']}" for error in errors)


def read_plan_file(path: str):
    """The tracking plan file's JSON; the plan's id defaults to the file's name without
    extension."""
    with open(path, "rb") as file:
        content = file.read()
    try:
        document = parse_json(content)
    except Rejection:
        raise PlanUnusable(f"{path} is not JSON") from None
    return load_tracking_plan(document, os.path.splitext(os.path.basename(path))[0])


def file_signature(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class TrackingPlans:
    """The tracking plan in use, if any. A plan given as a file is loaded again when the file
    changes, from the next request on; a broken edit keeps the previous plan and is said once.

    A rule Ajv would refuse to compile is said once when its plan loads; its events then pass
    unchecked, as in RudderStack, unless ``strict``, which refuses such a plan altogether.
    """

    def __init__(self, source, strict: bool):
        self.strict = strict
        self.path = None if source is None or isinstance(source, dict) else os.fspath(source)
        self._lock = threading.Lock()
        self._signature = file_signature(self.path) if self.path else None
        self._plan = None
        if self.path:
            self._plan = self._checked(read_plan_file(self.path))
        elif source is not None:
            self._plan = self._checked(load_tracking_plan(source, "tracking-plan"))

    def _checked(self, plan):
        for problem in plan.problems:
            logger.warning("tracking plan: %s; its events pass unchecked", problem)
        if plan.problems and self.strict:
            raise PlanUnusable(f"{plan.problems[0]} (--strict refuses a rule it cannot check)")
        return plan

    def current(self):
        """The plan for the next request, loaded again first if its file changed."""
        if self.path is None:
            return self._plan
        signature = file_signature(self.path)
        if signature != self._signature:
            with self._lock:
                if signature != self._signature:
                    self._signature = signature
                    self._reload()
        return self._plan

    def _reload(self) -> None:
        try:
            plan = self._checked(read_plan_file(self.path))
        except (OSError, PlanUnusable) as error:
            logger.warning("tracking plan %s changed but cannot be used (%s); still checking with "
                           "the previous one", self.path, getattr(error, "strerror", None) or error)
            return
        self._plan = plan
        logger.warning("tracking plan %s changed: checking with version %s from now on",
                       self.path, plan.version)


###############################################################################
# The store: rotating JSONL files
###############################################################################

ACTIVE_FILE = "events.jsonl"
ARCHIVE_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"  # fixed width: names sort in the order they were written
ARCHIVE_NAME = re.compile(r"events-(\d{8}T\d{6}\.\d{6}Z)\.jsonl")
#: At start, an unfinished last line up to this size is read to see whether it is a whole event.
LARGEST_LINE_TO_CHECK = 8 * 1024 * 1024


class EventStore:
    """The JSONL files: ``events.jsonl`` appended to, and renamed to ``events-<UTC time>.jsonl``
    when full.

    Every request is one ``os.write`` of whole lines under one lock: the lines of a request are
    contiguous, concurrent requests never interleave, and a request never straddles two files. A
    write that fails is cut back to the last whole line before the error is raised, so the file
    only ever holds whole lines. With ``mirror_fd`` (``--print``), the same lines go to that
    descriptor too, in the same order, under the same lock.

    With ``fsync="always"``, requests share fsyncs (group commit): a writer whose lines are not yet
    on disk either starts an fsync that covers every line written so far, or waits for the one in
    progress and then the next, instead of paying for its own. """

    def __init__(self, data_dir: str, rotate_bytes: int, fsync: str,
                 mirror_fd: Optional[int] = None):
        self.data_dir = data_dir
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self.mirror_fd = mirror_fd
        self.path = os.path.join(data_dir, ACTIVE_FILE)
        self._lock = threading.Condition()
        os.makedirs(data_dir, exist_ok=True)
        self._fd, self._identity = self._open_active_file()
        self._size = self._finish_last_line()
        self._needs_repair = False  # a failed write could not be cut back: cut before the next one
        self._last_archive_time = self._newest_archive_time()
        self._write_problem: Optional[str] = None  # why the last write failed, until one succeeds
        self._written = 0  # requests written so far ...
        self._synced = 0  # ... and how many of them are known to be on disk
        self._sync_in_progress = False
        self.fsyncs = 0  # how many fsyncs the appends needed: fewer than the appends (group commit)
        self._closed = threading.Event()
        if fsync == "interval":
            threading.Thread(target=self._sync_every_second, name="rudderlite-fsync",
                             daemon=True).start()

    def _open_active_file(self) -> Tuple[int, Tuple[int, int]]:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        status = os.fstat(fd)
        return fd, (status.st_dev, status.st_ino)

    def _finish_last_line(self) -> int:
        """Make the active file end in a whole line, as a power cut mid-write may not have left it,
        and return its size.

        What follows the last newline is either a whole event that only lacks its newline (a file
        written by hand), which gets its newline, or a line whose write was cut off. The latter is
        moved out of the active file into ``events.jsonl.unfinished-<UTC time>`` beside it, and
        said: whatever its size, nothing rudderlite did not write itself is ever thrown away. """
        size = os.fstat(self._fd).st_size
        start = self._last_line_start(size)
        if start == size:
            return size
        if size - start <= LARGEST_LINE_TO_CHECK:
            with contextlib.suppress(Rejection):
                if isinstance(parse_json(os.pread(self._fd, size - start, start)), dict):
                    os.write(self._fd, b"\n")
                    logger.warning("added the missing newline after the last event of %s",
                                   self.path)
                    return size + 1
        moment = datetime.datetime.now(datetime.timezone.utc).strftime(ARCHIVE_TIME_FORMAT)
        aside = f"{self.path}.unfinished-{moment}"
        with open(aside, "xb") as file:
            for offset in range(start, size, 1 << 20):
                file.write(os.pread(self._fd, min(1 << 20, size - offset), offset))
            file.flush()
            os.fsync(file.fileno())
        os.ftruncate(self._fd, start)
        logger.warning("moved an unfinished last line of %d bytes from %s to %s",
                       size - start, self.path, aside)
        return start

    def _last_line_start(self, size: int) -> int:
        """Where the bytes after the file's last newline begin (``size`` when it ends in one)."""
        end = size
        while end > 0:
            start = max(0, end - 65536)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return 0

    def _newest_archive_time(self) -> datetime.datetime:
        times = [datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)]
        for name in os.listdir(self.data_dir):
            match = ARCHIVE_NAME.fullmatch(name)
            if match:
                moment = datetime.datetime.strptime(match.group(1), ARCHIVE_TIME_FORMAT)
                times.append(moment.replace(tzinfo=datetime.timezone.utc))
        return max(times)

    def append(self, lines: bytes) -> None:
        """Write one request's lines; when this returns they are with the OS (and on disk when
        fsync is always). Raises OSError when they could not be written; then none of them is in
        the file."""
        with self._lock:
            if self._closed.is_set():
                raise OSError("the store is closed")
            try:
                self._reopen_if_gone()
                if self._size and self._size + len(lines) > self.rotate_bytes:
                    self._rotate()
                self._write_whole(lines)
            except OSError as error:
                self._write_problem = f"the last write failed: {error.strerror or error}"
                raise
            self._write_problem = None
            self._written += 1
            if self.fsync == "always":
                self._sync_through(self._written)
            if self.mirror_fd is not None:
                self._write_mirror(lines)

    def _reopen_if_gone(self) -> None:
        """Notice that the active file, or the whole data directory, was deleted or moved away while
        running, and start a new one: events must not go on into a file nobody can read."""
        try:
            status = os.stat(self.path)
            if (status.st_dev, status.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        while self._sync_in_progress:  # that fsync still uses the old descriptor
            self._lock.wait()
        os.makedirs(self.data_dir, exist_ok=True)
        new_fd, self._identity = self._open_active_file()
        os.close(self._fd)
        self._fd, self._size, self._needs_repair = new_fd, os.fstat(new_fd).st_size, False
        self._synced = self._written  # what went to the old file can no longer be synced
        logger.warning("%s was deleted or moved away; writing to a new one", self.path)

    def _write_whole(self, lines: bytes) -> None:
        if self._needs_repair:
            os.ftruncate(self._fd, self._size)
            self._needs_repair = False
        view = memoryview(lines)
        written = 0
        try:
            while written < len(lines):  # short near a size limit; then the next write fails
                written += os.write(self._fd, view[written:])
        except OSError:
            self._needs_repair = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                self._needs_repair = False
            raise
        self._size += len(lines)

    def _write_mirror(self, lines: bytes) -> None:
        """``--print``: the same lines to standard output. A reader that went away (``| head``) ends
        the printing, not the server."""
        view = memoryview(lines)
        try:
            while view:
                view = view[os.write(self.mirror_fd, view):]
        except OSError as error:
            self.mirror_fd = None
            logger.warning("stopped printing events: standard output failed (%s)", error.strerror)

    def _sync_through(self, ticket: int) -> None:
        """Return once the first ``ticket`` writes are on disk. Called, and returns, with the lock
        held."""
        while self._synced < ticket:
            if self._sync_in_progress:
                self._lock.wait()
                continue
            self._sync_in_progress = True
            target, fd = self._written, self._fd
            self._lock.release()  # others may write meanwhile; the next fsync carries them
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
        name = f"events-{moment.strftime(ARCHIVE_TIME_FORMAT)}.jsonl"
        archive = os.path.join(self.data_dir, name)
        if self.fsync != "off":
            os.fsync(self._fd)  # its lines on disk before its new name is
        os.rename(self.path, archive)
        try:
            new_fd, identity = self._open_active_file()
        except OSError:
            os.rename(archive, self.path)
            raise
        os.close(self._fd)
        self._fd, self._identity, self._size, self._last_archive_time = new_fd, identity, 0, moment
        self._synced = self._written  # all of it went to disk with the old file
        if self.fsync != "off":
            self._sync_directory()

    def _sync_directory(self) -> None:
        directory = os.open(self.data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def problem(self) -> Optional[str]:
        """Why events cannot be stored now, or None. A deleted file is noticed and recreated here
        too, so /health tells the truth without waiting for the next event."""
        with self._lock:
            if self._closed.is_set():
                return "the store is closed"
            try:
                self._reopen_if_gone()
            except OSError as error:
                return f"cannot recreate {self.path}: {error.strerror or error}"
            return self._write_problem

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

#: The longest a ``wait=`` answer is held, in seconds.
MAX_WAIT_SECONDS = 60.0
#: How many rejections are remembered, and for how many write keys counts are kept.
MAX_REJECTIONS = 1000
MAX_COUNTED_KEYS = 1000
#: How much of a rejected body, and of its path, /rudderlite/rejected shows.
REJECTED_PREVIEW_BYTES = 1024
#: What an entry of the history costs besides its line, for ``--history-bytes``.
ENTRY_OVERHEAD_BYTES = 200


def key_digest(write_key: str) -> bytes:
    """What the history holds of a write key: its SHA-256, the same 32 bytes whatever the key's
    length, so what a client sends cannot make the history's memory grow, and no key sits in memory
    as text."""
    return hashlib.sha256(write_key.encode("utf-8")).digest()


class Entry(NamedTuple):
    """One accepted event or one rejection, as the history holds it."""

    cursor: int  # its place in the one sequence of everything recorded; only grows
    key: bytes  # key_digest of its write key
    data: bytes  # the stored line of an event, or a rejection's record as JSON
    warnings: Tuple[str, ...]  # an event's contract violations
    valid: bool  # an event with no contract warning and no plan violation


class Query(NamedTuple):
    """What /rudderlite/events and /rudderlite/rejected were asked for (README: the inspection
    API)."""

    filters: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...] = ()  # (path, any of these values)
    after: Optional[int] = None  # only what was recorded after this cursor
    limit: int = 0  # at most this many: the newest, or with ``after`` the first after it; 0: all
    wait: float = 0.0  # hold the answer up to this many seconds ...
    minimum: int = 1  # ... until this many match
    valid: Optional[bool] = None  # only events with (False) or without (True) any violation


class Found(NamedTuple):
    """An answer of the history: the matching records, the cursor to follow them with, and whether
    the bounded history dropped something recorded after the cursor it was asked about."""

    records: List[dict]
    cursor: int
    missed: bool


class KeyCounts:
    """What /rudderlite/stats says of one key, and the newest cursor its bounded history dropped."""

    def __init__(self):
        self.accepted: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()
        self.valid = self.invalid = 0
        self.dropped_through = 0


class History:
    """The recent accepted events and rejections, bounded in count and bytes, with one sequence of
    cursors for both.

    Events are kept as their stored lines (compact bytes, decoded only when asked for), so the
    bound in bytes is close to the memory they take. One lock guards it all and is only ever held
    briefly: decoding and filtering happen outside it. A long-poll (``wait=``) waits on a condition
    of its own write key, so an event wakes only the polls of its key, and on waking looks only at
    what is newer than what it already saw: waiting costs the senders nothing, and a poll costs in
    proportion to what is new for it, not to the history. """

    def __init__(self, max_events: int, max_bytes: int):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._events: collections.deque = collections.deque()
        self._bytes = 0
        self._rejections: collections.deque = collections.deque()
        self._last_cursor = 0
        self._counts: "collections.OrderedDict[bytes, KeyCounts]" = collections.OrderedDict()
        self._waiting: Dict[Optional[bytes], threading.Condition] = {}  # key -> its polls
        self._closed = False

    @property
    def cursor(self) -> int:
        """The cursor of the newest record: following it returns only what comes after now."""
        with self._lock:
            return self._last_cursor

    def _counts_of(self, key: bytes) -> KeyCounts:
        counts = self._counts.pop(key, None) or KeyCounts()
        self._counts[key] = counts  # most recently used last; the oldest key is forgotten first
        while len(self._counts) > MAX_COUNTED_KEYS:
            self._counts.popitem(last=False)
        return counts

    def _wake(self, key: bytes) -> None:
        for waiting in (self._waiting.get(key), self._waiting.get(None)):
            if waiting is not None:
                waiting.notify_all()

    def record_accepted(self, key: bytes, events: List[StoredEvent]) -> None:
        with self._lock:
            counts = self._counts_of(key)
            for event in events:
                self._last_cursor += 1
                valid = not (event.warnings or event.violations)
                entry = Entry(self._last_cursor, key, event.line, event.warnings, valid)
                self._events.append(entry)
                self._bytes += entry_size(entry)
                counts.accepted[event.type if event.type in EVENT_TYPES else "other"] += 1
                counts.valid += valid
                counts.invalid += not valid
            while len(self._events) > self.max_events or self._bytes > self.max_bytes:
                dropped = self._events.popleft()
                self._bytes -= entry_size(dropped)
                if dropped.key in self._counts:
                    self._counts[dropped.key].dropped_through = dropped.cursor
            self._wake(key)

    def record_rejected(self, key: bytes, record: dict) -> None:
        with self._lock:
            self._last_cursor += 1
            self._rejections.append(Entry(self._last_cursor, key, encode_json(record), (), False))
            if len(self._rejections) > MAX_REJECTIONS:
                dropped = self._rejections.popleft()
                if dropped.key in self._counts:
                    self._counts[dropped.key].dropped_through = dropped.cursor
            self._counts_of(key).rejected[str(record["status"])] += 1
            self._wake(key)

    def events(self, key: Optional[bytes], query: Query) -> Found:
        """This key's events (every key's for None) that match the query, oldest first."""
        return self._find(self._events, key, query, event_record)

    def rejections(self, key: bytes, query: Query) -> Found:
        """This key's rejections that match the query, oldest first."""
        return self._find(self._rejections, key, query, rejection_record)

    def _find(self, entries: collections.deque, key: Optional[bytes], query: Query,
              to_record: Callable[[Entry], dict]) -> Found:
        """The records of ``entries`` that match, held until ``query.minimum`` of them are there
        when asked to wait. Each turn looks only at what was recorded since the previous one."""
        deadline = time.monotonic() + min(query.wait, MAX_WAIT_SECONDS)
        seen = query.after or 0
        found: List[Tuple[int, dict]] = []
        with self._lock:
            counts = self._counts.get(key) if key is not None else None
            missed = (query.after is not None and counts is not None
                      and counts.dropped_through > seen)
        while True:
            new, seen = self._entries_after(entries, key, seen)
            found += [(entry.cursor, to_record(entry)) for entry in new
                      if matches(entry, to_record, query)]
            remaining = deadline - time.monotonic()
            if len(found) >= query.minimum or remaining <= 0 or not self._wait_for_news(key, seen,
                                                                                       remaining):
                break
        return answer_of(found, seen, missed, query)

    def _entries_after(self, entries: collections.deque, key: Optional[bytes],
                       seen: int) -> Tuple[List[Entry], int]:
        """The entries of this key recorded after cursor ``seen``, and the cursor they reach."""
        with self._lock:
            if not entries or entries[0].cursor > seen:
                newer = list(entries)  # all of them: a copy is quicker than a walk
            else:
                newer = []
                for entry in reversed(entries):
                    if entry.cursor <= seen:
                        break
                    newer.append(entry)
                newer.reverse()
            return [entry for entry in newer if key is None or entry.key == key], self._last_cursor

    def _wait_for_news(self, key: Optional[bytes], seen: int, seconds: float) -> bool:
        """Wait until something is recorded for this key after ``seen``; False once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._last_cursor != seen:
                return True  # recorded while the last turn was looking: look again
            waiting = self._waiting.setdefault(key, threading.Condition(self._lock))
            try:
                waiting.wait(seconds)
            finally:
                if not getattr(waiting, "_waiters", True):  # the last poll of this key: forget it
                    self._waiting.pop(key, None)
            return not self._closed

    def stats(self, key: bytes) -> dict:
        with self._lock:
            counts = self._counts.get(key) or KeyCounts()
            return {"accepted": dict(counts.accepted), "rejected": dict(counts.rejected),
                    "valid": counts.valid, "invalid": counts.invalid}

    def reset(self, key: bytes) -> None:
        """Forget this key's events, rejections and counts (the files are untouched; cursors go
        on)."""
        with self._lock:
            self._events = collections.deque(entry for entry in self._events if entry.key != key)
            self._bytes = sum(map(entry_size, self._events))
            self._rejections = collections.deque(entry for entry in self._rejections
                                                 if entry.key != key)
            self._counts.pop(key, None)

    def close(self) -> None:
        """Answer every long-poll now (the server is stopping)."""
        with self._lock:
            self._closed = True
            for waiting in self._waiting.values():
                waiting.notify_all()


def entry_size(entry: Entry) -> int:
    """What an entry counts against ``--history-bytes``: its line, its warnings and a fixed
    overhead."""
    return len(entry.data) + sum(map(len, entry.warnings)) + ENTRY_OVERHEAD_BYTES


def event_record(entry: Entry) -> dict:
    """An event as /rudderlite/events shows it: the stored event, plus its contract warnings."""
    event = json.loads(entry.data)
    if entry.warnings:
        event["warnings"] = list(entry.warnings)
    return event


def rejection_record(entry: Entry) -> dict:
    return json.loads(entry.data)


def matches(entry: Entry, to_record: Callable[[Entry], dict], query: Query) -> bool:
    """Whether an entry passes the query's ``valid`` and filters (decoding it only when needed)."""
    if query.valid is not None and entry.valid != query.valid:
        return False
    if not query.filters:
        return True
    record = to_record(entry)
    return all(field_matches(record, path, wanted) for path, wanted in query.filters)


def field_matches(record: dict, path: Tuple[str, ...], wanted: Tuple[str, ...]) -> bool:
    """Whether the value at ``path`` (``properties.orderId``) is one of the wanted texts: a string
    as it is, a number as a number (``1`` finds ``1.0``), anything else as its JSON text."""
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    if isinstance(value, str):
        return value in wanted
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(number_or_none(text) == value for text in wanted)
    return encode_json(value).decode("utf-8") in wanted


def number_or_none(text: str) -> Optional[float]:
    try:
        return _finite_float(text)
    except ValueError:
        return None


def answer_of(found: List[Tuple[int, dict]], seen: int, missed: bool, query: Query) -> Found:
    """Apply ``limit``: without ``after`` the newest N; with it the first N, the cursor then
    standing after the last one returned, so a client that follows cursors sees everything once, in
    order."""
    if not query.limit or len(found) <= query.limit:
        return Found([record for _cursor, record in found], seen, missed)
    if query.after is None:
        return Found([record for _cursor, record in found[-query.limit:]], seen, missed)
    kept = found[:query.limit]
    return Found([record for _cursor, record in kept], kept[-1][0], missed)


###############################################################################
# HTTP: reading requests within limits
###############################################################################

#: A refused body up to this much past its limit is read and dropped, so the connection can stay.
DRAIN_ALLOWANCE = 64 * 1024
#: After an early answer, how much more of its body is read, and how long, before closing.
LINGER_BYTES = 256 * 1024
LINGER_SECONDS = 1.0
MAX_CHUNK_LINE = 1024
MAX_TRAILER_LINES = 64
HEX_DIGITS = re.compile(rb"[0-9a-fA-F]{1,16}")
DECIMAL_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would also take "²"
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (\S+) (HTTP/1\.[01])\r?\n")
HEADER_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(.*?)[ \t]*\r?\n")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Content-Length values Go's net/http accepts: a decimal that fits in 63 bits.
LARGEST_CONTENT_LENGTH = 2 ** 63 - 1


class ClientGone(Exception):
    """The client closed the connection or ran out of time; there is nobody to answer."""


@dataclasses.dataclass
class Request:
    """One request, as read from its connection; made afresh for each, so nothing carries over."""

    method: str
    target: str  # as sent: origin-form "/v1/track?a=1", or absolute-form "http://host/v1/track"
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: Dict[str, str]  # names lower-cased; a field sent twice joined by ", " (RFC 9110 §5.3)
    peer_ip: str
    url: urllib.parse.SplitResult = urllib.parse.SplitResult("", "", "", "", "")
    #: The body's framing (RFC 9112 §6): its declared length, whether it is chunked, and what is
    #: wrong with the framing, which is answered once the host has been checked.
    body_length: int = 0
    chunked: bool = False
    framing_problem: Optional[Rejection] = None
    #: Whether the client lets the connection carry another request after this one.
    keep_alive: bool = True
    #: Filled in while the request is answered.
    write_key: Optional[str] = None
    body_read: bool = False
    body_limit: int = 0  # the most this request's endpoint reads, on the wire
    continue_sent: bool = False
    body_preview: bytes = b""
    accepted: List[StoredEvent] = dataclasses.field(default_factory=list)
    refusal: Optional[Rejection] = None

    @property
    def has_body(self) -> bool:
        return self.chunked or self.body_length > 0

    @property
    def expects_continue(self) -> bool:
        expect = self.headers.get("expect", "").lower()
        return self.version == "HTTP/1.1" and expect == "100-continue"


def unreadable_request(peer_ip: str) -> Request:
    """The stand-in for a request whose head could not be read: answered, then the connection
    closes."""
    return Request("", "", "HTTP/1.1", {}, peer_ip, keep_alive=False, body_read=True)


def read_exactly(rfile, length: int) -> bytes:
    data = rfile.read(length)
    if len(data) < length:
        raise ClientGone()
    return data


def discard(rfile, length: int) -> None:
    """Read and drop ``length`` bytes, 64 KiB at a time, so the connection can carry the next
    request."""
    while length > 0:
        length -= len(read_exactly(rfile, min(length, 65536)))


def read_request_head(rfile, limit: int) -> Tuple[bytes, bytes]:
    """The request line and the header block up to its empty line (RFC 9112 §2.1), at most
    ``limit`` bytes in all."""
    request_line = b"\r\n"
    while request_line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignore empty lines before a request
        request_line = rfile.readline(limit + 1)
        if not request_line.endswith(b"\n"):
            if len(request_line) > limit:
                raise Rejection(HEADERS_TOO_LARGE, close=True)
            raise ClientGone()
    headers = bytearray()
    while True:
        line = rfile.readline(limit + 1 - len(request_line) - len(headers))
        headers += line
        if len(request_line) + len(headers) > limit:
            raise Rejection(HEADERS_TOO_LARGE, close=True)
        if not line.endswith(b"\n"):
            raise ClientGone()
        if line in (b"\r\n", b"\n"):
            return request_line, bytes(headers)


def parse_request(request_line: bytes, header_block: bytes, peer_ip: str) -> Request:
    """The Request of a head: method, target, version and header fields (RFC 9112 §3 and §5).

    Folded header lines (obs-fold) are refused, as RFC 9112 §5.2 allows. The body's framing is read
    here too, since the connection's fate depends on it whatever the answer is.
    """
    parsed = REQUEST_LINE.fullmatch(request_line)
    if not parsed:
        raise Rejection(BAD_REQUEST, close=True)
    method, target, version = (part.decode("latin-1") for part in parsed.groups())
    headers: Dict[str, str] = {}
    for line in header_block.splitlines(keepends=True)[:-1]:  # the last line is the empty one
        field = HEADER_LINE.fullmatch(line)
        if not field:
            raise Rejection(BAD_REQUEST, close=True)
        name, value = field.group(1).decode("latin-1").lower(), field.group(2).decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    request = Request(method, target, version, headers, peer_ip)
    with contextlib.suppress(ValueError):  # such as an unclosed "[" in an absolute-form target
        request.url = urllib.parse.urlsplit(target)
    options = {option.strip() for option in headers.get("connection", "").lower().split(",")}
    request.keep_alive = "close" not in options and (version == "HTTP/1.1"
                                                     or "keep-alive" in options)
    try:
        request.body_length, request.chunked = body_framing(headers)
    except Rejection as problem:
        request.framing_problem, request.keep_alive = problem, False
    if request.chunked and (version == "HTTP/1.0" or "content-length" in headers):
        request.keep_alive = False  # RFC 9112 §6.1: smuggling, or a client too old for chunked
    request.body_read = not request.has_body
    return request


def body_framing(headers: Dict[str, str]) -> Tuple[int, bool]:
    """The declared body length and whether the body is chunked, refused as Go's net/http refuses
    them before rudder-server sees the request: any transfer coding but chunked is 501, then a
    Content-Length that is not one decimal number below 2^63 is 400 (RFC 9112 §6.1 and §6.3)."""
    transfer_encoding = headers.get("transfer-encoding")
    if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
        raise Rejection(UNSUPPORTED_TRANSFER_ENCODING, close=True)
    length = 0
    if "content-length" in headers:
        values = {value.strip() for value in headers["content-length"].split(",")}
        text = values.pop()
        if values or not DECIMAL_DIGITS.fullmatch(text) or len(text.lstrip("0")) > 19:
            raise Rejection(BAD_REQUEST, close=True)
        length = int(text.lstrip("0") or "0")
        if length > LARGEST_CONTENT_LENGTH:
            raise Rejection(BAD_REQUEST, close=True)
    return length, transfer_encoding is not None


def read_chunked(rfile, limit: int) -> bytes:
    """A ``Transfer-Encoding: chunked`` body (RFC 9112 §7.1), refused once it would pass
    ``limit``."""
    body = bytearray()
    while True:
        line = rfile.readline(MAX_CHUNK_LINE)
        if not line.endswith(b"\n"):
            raise ClientGone() if not line else Rejection(BODY_UNREADABLE, close=True)
        size_text = line.split(b";", 1)[0].strip()  # chunk extensions follow a semicolon; ignored
        if not HEX_DIGITS.fullmatch(size_text):
            raise Rejection(BODY_UNREADABLE, close=True)
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise Rejection(REQUEST_TOO_LARGE, close=True)
        body += read_exactly(rfile, size)
        if rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
            raise Rejection(BODY_UNREADABLE, close=True)
    for _ in range(MAX_TRAILER_LINES):  # trailer fields up to the empty line, ignored
        line = rfile.readline(MAX_CHUNK_LINE)
        if not line:
            raise ClientGone()
        if line in (b"\r\n", b"\n"):
            return bytes(body)
    raise Rejection(BODY_UNREADABLE, close=True)


def first_query_value(query: str, name: str) -> str:
    """The first value of a query parameter, its name compared once percent-decoded, as Go's
    ``url.Values.Get`` does; "" when absent."""
    for parameter, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if parameter == name:
            return value
    return ""


def loggable_target(target: str) -> str:
    """The target with the value of any parameter whose decoded name is a write key blanked, and no
    control character: what a log line may show. The redaction decodes names as the parser does,
    so ``write%4Bey=KEY`` is redacted too."""
    path, question_mark, query = target.partition("?")
    parameters = []
    for parameter in query.split("&") if question_mark else ():
        name, equals, _value = parameter.partition("=")
        if urllib.parse.unquote_plus(name).lower() == "writekey":
            parameter = f"{name}{equals}REDACTED"
        parameters.append(parameter)
    return header_safe(path + question_mark + "&".join(parameters))


@functools.lru_cache(maxsize=1)  # one date a second, not one a request
def http_date(second: int) -> str:
    """The ``Date`` header value (RFC 9110 §6.6.1) for a Unix time in whole seconds."""
    return email.utils.formatdate(second, usegmt=True)


def header_safe(value: str) -> str:
    """A text fit to echo in a header or a log line: no CR, LF or other control character."""
    return CONTROL_CHARACTERS.sub("", value)


def host_name(value: str) -> str:
    """The host of a ``Host`` header or a target's authority, without port, lower case, and without
    the trailing dot of a fully qualified name."""
    value = value.strip().lower()
    if is_ip_address(value):
        return value
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name, colon, port = value.rpartition(":")
    if colon and DECIMAL_DIGITS.fullmatch(port or "0"):
        value = name
    return value.rstrip(".")


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def host_allowed(name: str, allowed_names: Tuple[str, ...]) -> bool:
    """Whether a loopback-bound rudderlite serves this host name (README: Who may talk to it): an IP
    address, localhost, a name under .localhost, or one given with --allow-host. Any other name can
    only come from a page whose DNS was rebound to 127.0.0.1."""
    return (is_ip_address(name) or name == "localhost" or name.endswith(".localhost")
            or name in allowed_names)


LOOPBACK_ORIGIN = re.compile(r"http://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?")


def inspection_origin_allowed(origin: str, allowed_origins: Tuple[str, ...]) -> bool:
    """Whether a page of this origin may read /rudderlite/* through CORS: loopback pages (a test
    runner on this machine) and the origins given with --allow-origin."""
    origin = origin.strip().lower().rstrip("/")
    return bool(LOOPBACK_ORIGIN.fullmatch(origin)) or origin in allowed_origins


###############################################################################
# HTTP: the line each request leaves on standard error
###############################################################################

#: How many events of a request its line names one by one; more are counted by type.
EVENTS_NAMED = 3
#: How long a name or an id may be in a line before it is cut.
SHOWN_CHARACTERS = 40


def shown(value: str) -> str:
    """A value as a line shows it: no control character (an event name cannot move the terminal's
    cursor or change its colours), and cut to a length that keeps the line readable."""
    value = header_safe(value)
    return value if len(value) <= SHOWN_CHARACTERS else value[:SHOWN_CHARACTERS - 1] + "…"


def events_summary(events: List[StoredEvent]) -> str:
    """What a request brought, at a glance: up to three events by type and name, more counted by
    type with their commonest names; then who sent them; then how many broke the contract or the
    plan."""
    def type_of(event: StoredEvent) -> str:
        return event.type if isinstance(event.type, str) else "?"

    if len(events) <= EVENTS_NAMED:
        what = ", ".join(f'{type_of(event)} "{shown(event.name)}"' if event.name else type_of(event)
                         for event in events)
    else:
        by_type = collections.Counter(map(type_of, events))
        parts = []
        for event_type, count in by_type.most_common():
            names = collections.Counter(event.name for event in events
                                        if type_of(event) == event_type and event.name)
            named = ", ".join(f'"{shown(name)}"' + (f" ×{times}" if times > 1 else "")
                              for name, times in names.most_common(2))
            more = ", …" if len(names) > 2 else ""
            parts.append(f"{count} {event_type}" + (f" ({named}{more})" if named else ""))
        what = f"{len(events)} events: " + ", ".join(parts)
    return what + people_summary(events) + problems_summary(events)


def people_summary(events: List[StoredEvent]) -> str:
    users = list(dict.fromkeys(event.user_id for event in events if event.user_id))
    anonymous = list(dict.fromkeys(event.anonymous_id for event in events if event.anonymous_id))
    parts = []
    for label, ids in (("user", users), ("anonymous", anonymous)):
        if ids and (label == "user" or not users or len(events) == 1):
            more = f" +{len(ids) - 2}" if len(ids) > 2 else ""
            parts.append(f"{label} " + ", ".join(map(shown, ids[:2])) + more)
    return " · " + ", ".join(parts) if parts else ""


def problems_summary(events: List[StoredEvent]) -> str:
    """How many contract warnings and plan violations the events carry, and the first of each."""
    parts = []
    warnings = [text for event in events for text in event.warnings]
    violations = [text for event in events for text in event.violations]
    for label, problems in (("warning", warnings), ("plan violation", violations)):
        if problems:
            plural = "s" if len(problems) > 1 else ""
            parts.append(f"{len(problems)} {label}{plural} ({shown_problem(problems[0])})")
    return " · " + " · ".join(parts) if parts else ""


def shown_problem(text: str) -> str:
    text = header_safe(text)
    return text if len(text) <= 3 * SHOWN_CHARACTERS else text[:3 * SHOWN_CHARACTERS - 1] + "…"


def request_summary(request: Request, status: int, message: str) -> Optional[str]:
    """The request's line on standard error (after the time), or None for a request that needs none:
    every request that brought events, and every refused one."""
    path = loggable_target(request.url.path or request.target) or "-"
    if request.accepted:
        return f"{status} {path} {events_summary(request.accepted)}"
    if status < 400:
        return None
    detail = f" ({shown_problem(request.refusal.detail)})" if request.refusal and \
        request.refusal.detail else ""
    return f"{status} {request.method or '-'} {path} {message}{detail}"


class TerminalFormatter(logging.Formatter):
    """Log lines for a person: the time, then the line, coloured by how it went when standard error
    is a terminal (green: stored; yellow: stored with warnings or violations, or a warning; red:
    refused, or an error)."""

    COLOURS = {"stored": "\033[32m", "warned": "\033[33m", "refused": "\033[31m"}
    LEVEL_TONES = {logging.WARNING: "warned", logging.ERROR: "refused", logging.CRITICAL: "refused"}

    def __init__(self, colour: bool):
        super().__init__("%(asctime)s.%(msecs)03d %(message)s", datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tone = getattr(record, "tone", None) or self.LEVEL_TONES.get(record.levelno)
        if self.colour and tone:
            return f"{self.COLOURS[tone]}{text}\033[0m"
        return text


def log_answer(request: Request, status: int, message: str) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    summary = request_summary(request, status, message)
    if summary is None:
        return
    if status >= 400:
        tone = "refused"
    elif any(event.warnings or event.violations for event in request.accepted):
        tone = "warned"
    else:
        tone = "stored"
    logger.info("%s", summary, extra={"tone": tone})


###############################################################################
# HTTP: the request handler
###############################################################################


class Response(NamedTuple):
    """An answer, made by the endpoint or the refusal, written by ``RequestHandler.send``."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Tuple[str, ...] = ()
    close: bool = False  # the connection cannot carry another request after this answer


def json_response(value) -> Response:
    return Response(200, encode_json(value), "application/json")


class Endpoint(NamedTuple):
    """A row of the route table."""

    methods: Tuple[str, ...]  # HEAD is answered wherever GET is, without the body
    answer: str  # the RequestHandler method that answers it, once the checks before it passed
    key_from: str  # where its write key comes from: "header", "query", "header or query", or ""


#: What rudder-server's gateway answers on /health while it can store events.
HEALTH = {"appType": "EMBEDDED", "server": "UP", "db": "UP", "acceptingEvents": "TRUE",
          "routingEvents": "TRUE", "mode": "NORMAL", "backendConfigMode": "API", "lastSync": "",
          "lastRegulationSync": ""}
#: Query parameters of /rudderlite/events and /rudderlite/rejected that are not filters.
QUERY_OPTIONS = ("limit", "after", "wait", "min", "valid")
#: What the live page may do in a browser: nothing from elsewhere, no framing by other sites.
PAGE_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; "
                        "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class RequestHandler(socketserver.StreamRequestHandler):
    """One connection: its requests one after another (HTTP/1.1 keep-alive), each read, answered and
    its body settled.

    rudderlite reads and writes HTTP itself rather than through http.server's
    BaseHTTPRequestHandler: every read is bounded (head size, body size, and a deadline for each
    wait on the client), the checks run in the order of the README's Answers table, and each answer
    goes out in one send. So this derives from socketserver.StreamRequestHandler, which gives only
    ``rfile`` and ``wfile``. Every answer, the refusal of an unreadable head included, is written by
    ``send()``, and every refusal after the head is made in ``dispatch()``. Two writes are not
    answers of this class: the interim ``100 Continue`` (``read_body``), and the ``503`` that the
    server sends over the connection cap before any handler exists.
    """

    #: path -> Endpoint; the order of the checks is in dispatch().
    ROUTES = {
        **{f"/v1/{event_type}": Endpoint(("POST",), "accept_single", "header")
           for event_type in EVENT_TYPES},
        "/v1/batch": Endpoint(("POST",), "accept_batch", "header"),
        "/beacon/v1/batch": Endpoint(("POST",), "accept_batch", "query"),  # navigator.sendBeacon
        "/": Endpoint(("GET",), "answer_health", ""),
        "/health": Endpoint(("GET",), "answer_health", ""),
        "/version": Endpoint(("GET",), "answer_version", ""),
        "/sourceConfig": Endpoint(("GET",), "answer_source_config", "header or query"),
        "/sourceConfig/": Endpoint(("GET",), "answer_source_config", "header or query"),
        "/rudderlite": Endpoint(("GET",), "answer_page", ""),
        "/rudderlite/": Endpoint(("GET",), "answer_page", ""),
        "/rudderlite/events": Endpoint(("GET",), "inspect_events", "header"),
        "/rudderlite/rejected": Endpoint(("GET",), "inspect_rejected", "header"),
        "/rudderlite/stats": Endpoint(("GET",), "inspect_stats", "header"),
        "/rudderlite/reset": Endpoint(("POST",), "inspect_reset", "header"),
    }

    def setup(self) -> None:
        super().setup()
        # One send per answer, sent at once: a small second send would wait on the client's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.linger = False

    # -- the request loop -------------------------------------------------------------------------

    def handle(self) -> None:
        with contextlib.suppress(ClientGone, OSError):  # the client left, or ran out of time
            while self.serve_one_request():
                pass

    def serve_one_request(self) -> bool:
        """Wait for a request, read its head, answer it, and settle its body; whether the connection
        can carry another. Each wait on the client has its deadline; the server's own work has none,
        so nothing it has accepted goes unanswered."""
        connections, config = self.server.connections, self.server.config
        connections.idle(self.connection, config.idle_timeout)
        if not self.rfile.peek(1):
            return False  # the client closed, or the server is stopping and closed this idle one
        connections.await_client(self.connection, config.head_timeout)
        try:
            request = parse_request(*read_request_head(self.rfile, config.max_head_bytes),
                                    self.client_address[0])
        except Rejection as rejection:
            request = unreadable_request(self.client_address[0])
            response = self.refuse(request, rejection)
        else:
            if request.body_read:  # no body: nothing more to wait for from the client
                connections.work(self.connection)
            else:
                connections.await_client(self.connection, config.body_timeout)
            response = self.dispatch(request)
        closes = self.closes_after(request, response)
        connections.await_client(self.connection, config.answer_timeout)
        self.send(request, response, closes)
        if closes:
            self.linger = not request.body_read
            return False
        if not request.body_read:
            connections.await_client(self.connection, config.body_timeout)
            discard(self.rfile, request.body_length)
        return True

    # -- the checks, in the order of the README's Answers table -----------------------------------

    def dispatch(self, request: Request) -> Response:
        """The answer to a request. The checks run in this order and the first that fails answers;
        every refusal becomes its answer here, in one place."""
        try:
            self.check_host(request)  # 403 host not allowed
            if request.framing_problem:
                raise request.framing_problem  # 501, then 400: where the body ends is unknown
            if request.method == "OPTIONS":
                return self.answer_preflight(request)  # 204, before any auth
            endpoint = self.route(request)  # 404, then 405
            if endpoint.key_from:
                request.write_key = self.authenticate(request, endpoint.key_from)  # 401, 401
            return getattr(self, endpoint.answer)(request)  # events: 413, 400s, 500
        except Rejection as rejection:
            return self.refuse(request, rejection)
        except (ClientGone, OSError):
            raise
        except Exception:
            logger.exception("bug while answering %s %s", request.method,
                             loggable_target(request.target))
            return Response(INTERNAL_ERROR.status, INTERNAL_ERROR.message.encode(), close=True)

    def check_host(self, request: Request) -> None:
        """Bound to loopback, only local host names are served, so that a web page whose DNS name
        was rebound to 127.0.0.1 can neither read nor change anything (README: Who may talk to it).
        RFC 9112 §3.2.2: an absolute-form target's host takes the place of Host."""
        if not self.server.guards_host:
            return
        authority = request.url.netloc.rpartition("@")[2]  # no user information, when given
        host = authority if authority else request.headers.get("host")
        if host and not host_allowed(host_name(host), self.server.config.allow_hosts):
            raise Rejection(HOST_NOT_ALLOWED)

    def route(self, request: Request) -> Endpoint:
        endpoint = self.ROUTES.get(request.url.path)
        if endpoint is None:
            raise Rejection(PAGE_NOT_FOUND)
        if ("GET" if request.method == "HEAD" else request.method) not in endpoint.methods:
            allowed = {*endpoint.methods, "OPTIONS"} | ({"HEAD"} if "GET" in endpoint.methods
                                                         else set())
            raise Rejection(METHOD_NOT_ALLOWED, headers=(f"Allow: {', '.join(sorted(allowed))}",))
        return endpoint

    def authenticate(self, request: Request, key_from: str) -> str:
        """The write key from where the endpoint takes it, refused unless it is an allowed one."""
        from_query = key_from == "query" or (key_from == "header or query"
                                             and "authorization" not in request.headers)
        if from_query:
            write_key = first_query_value(request.url.query, "writeKey")
            if not write_key:
                raise Rejection(NO_WRITE_KEY_IN_QUERY if key_from == "query"
                                else NO_WRITE_KEY_IN_HEADER)
        else:
            write_key = write_key_from_authorization(request.headers.get("authorization"))
        if not write_key_allowed(write_key, self.server.config.write_keys):
            raise Rejection(INVALID_WRITE_KEY)
        return write_key

    def refuse(self, request: Request, rejection: Rejection) -> Response:
        """The answer to a refused request, recorded for /rudderlite/rejected under its write key
        once the key is known and allowed (before that, nobody may read it)."""
        request.refusal = rejection
        if request.write_key is not None:
            self.server.history.record_rejected(key_digest(request.write_key), {
                "status": rejection.answer.status,
                "message": rejection.answer.message,
                **({"detail": rejection.detail} if rejection.detail else {}),
                "path": request.url.path[:REJECTED_PREVIEW_BYTES],
                "receivedAt": utc_timestamp(datetime.datetime.now(datetime.timezone.utc)),
                "body": request.body_preview[:REJECTED_PREVIEW_BYTES].decode("utf-8", "replace"),
            })
        return Response(rejection.answer.status, rejection.answer.message.encode("utf-8"),
                        headers=rejection.headers, close=rejection.close)

    # -- answers ----------------------------------------------------------------------------------

    def closes_after(self, request: Request, response: Response) -> bool:
        """Whether the connection ends with this answer, which then says ``Connection: close``:
        when the client or the answer asks for it, when the server is stopping, or when a body left
        unread cannot be read and dropped (too large, chunked, or a client still waiting for 100
        Continue)."""
        if not request.keep_alive or response.close or self.server.connections.closing:
            return True
        if request.body_read:
            return False
        client_waits = request.expects_continue and not request.continue_sent
        can_drain = (not request.chunked and not client_waits
                     and request.body_length <= request.body_limit + DRAIN_ALLOWANCE)
        return not can_drain

    def send(self, request: Request, response: Response, closes: bool) -> None:
        """Write the whole answer in one send: status line, headers, body (none for HEAD or 204)."""
        lines = [f"HTTP/1.1 {response.status} {http.HTTPStatus(response.status).phrase}",
                 f"Date: {http_date(int(time.time()))}"]
        if response.status != 204:
            lines += [f"Content-Type: {response.content_type}",
                      f"Content-Length: {len(response.body)}"]
        origin = self.cors_origin(request)
        if origin is not None:  # on every answer to a browser, errors too, or it cannot read them
            lines += [f"Access-Control-Allow-Origin: {origin}",
                      "Access-Control-Allow-Credentials: true"]
        if "origin" in request.headers:
            lines.append("Vary: Origin")
        lines += response.headers
        if closes:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if request.method == "HEAD" else head + response.body)
        log_answer(request, response.status, response.body.decode("utf-8", "replace")
                   if response.status >= 400 else "")

    def cors_origin(self, request: Request) -> Optional[str]:
        """The ``Origin`` to grant, or None. The event endpoints grant every origin (the browser SDK
        runs on the user's site); /rudderlite/* only loopback pages and --allow-origin ones."""
        origin = request.headers.get("origin")
        if not origin or (request.refusal and request.refusal.answer is HOST_NOT_ALLOWED):
            return None
        if request.url.path.startswith("/rudderlite") and not inspection_origin_allowed(
                origin, self.server.config.allow_origins):
            return None
        return header_safe(origin)

    def answer_preflight(self, request: Request) -> Response:
        """A CORS preflight: 204 before any auth (preflights carry no credentials), allowing what
        was asked, to the origins cors_origin grants."""
        if self.cors_origin(request) is None:
            return Response(204)
        headers = ["Access-Control-Allow-Methods: GET, HEAD, POST, OPTIONS",
                   "Access-Control-Max-Age: 900"]
        requested = request.headers.get("access-control-request-headers")
        if requested:
            headers.append(f"Access-Control-Allow-Headers: {header_safe(requested)}")
        if request.headers.get("access-control-request-private-network", "").lower() == "true":
            headers.append("Access-Control-Allow-Private-Network: true")  # public page, loopback
        return Response(204, headers=tuple(headers))

    # -- bodies -----------------------------------------------------------------------------------

    def read_body(self, request: Request, limit: int) -> bytes:
        """The body, gzip undone, refused while it is read once it passes ``limit`` (413 before any
        parsing). Once it is read, the server's work begins and no deadline cuts it short."""
        gzipped = request.headers.get("content-encoding", "").strip().lower() in ("gzip", "x-gzip")
        request.body_limit = compressed_limit(limit) if gzipped else limit
        if not request.chunked and request.body_length > request.body_limit:
            raise Rejection(REQUEST_TOO_LARGE)
        if request.expects_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # RFC 9110 §10.1.1: send the body
            request.continue_sent = True
        if request.chunked:
            raw = read_chunked(self.rfile, request.body_limit)
        else:
            raw = read_exactly(self.rfile, request.body_length)
        request.body_read = True
        self.server.connections.work(self.connection)
        request.body_preview = raw[:REJECTED_PREVIEW_BYTES]
        if not gzipped:
            return raw
        body = inflate_gzip(raw, limit)
        request.body_preview = body[:REJECTED_PREVIEW_BYTES]
        return body

    def finish(self) -> None:
        """Close gently after an early answer: shut our side, then read what the client still sends
        for a moment, so its unread bytes do not make the kernel reset the connection and lose our
        answer."""
        super().finish()
        if not self.linger:
            return
        self.server.connections.idle(self.connection, 2 * LINGER_SECONDS)
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            received = 0
            while received < LINGER_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                received += len(chunk)

    # -- the event endpoints ----------------------------------------------------------------------

    def accept_single(self, request: Request) -> Response:
        return self.accept_events(request, type_from_path=request.url.path.rsplit("/", 1)[-1])

    def accept_batch(self, request: Request) -> Response:
        return self.accept_events(request, type_from_path=None)

    def accept_events(self, request: Request, type_from_path: Optional[str]) -> Response:
        """The rest of the checks of an event request: its body within the limit (413), its events
        (413 for one too large, the 400s), their storage (500); then they are visible to
        /rudderlite/events before the 200 is sent."""
        server, config = self.server, self.server.config
        body = self.read_body(request, config.max_event_bytes if type_from_path
                              else config.max_batch_bytes)
        with server.parsing.reserve(len(body)):
            received_at = utc_timestamp(datetime.datetime.now(datetime.timezone.utc))
            forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
            stored = process_body(body, type_from_path, config, received_at,
                                  forwarded or request.peer_ip, server.plans.current())
            try:
                server.store.append(b"".join(event.line for event in stored))
            except OSError as error:
                logger.error("could not store %d events: %s", len(stored), error)
                raise Rejection(STORE_FAILED) from None
        server.history.record_accepted(key_digest(request.write_key), stored)
        request.accepted = stored
        return Response(OK.status, OK.message.encode())

    # -- the other endpoints ----------------------------------------------------------------------

    def answer_health(self, request: Request) -> Response:
        """rudder-server's health answer; 503 when events cannot be stored (it says why)."""
        problem = self.server.store.problem()
        if problem:
            return Response(503, f"cannot store events: {problem}".encode("utf-8"))
        return json_response(HEALTH)

    def answer_version(self, request: Request) -> Response:
        return json_response({"version": __version__, "server": "rudderlite"})

    def answer_source_config(self, request: Request) -> Response:
        """The JavaScript SDK sends its key both in Basic auth and in the ``writeKey`` parameter."""
        return json_response(source_config(request.write_key))

    def answer_page(self, request: Request) -> Response:
        """The live page: served without credentials, it holds no data until it is given a key."""
        return Response(200, LIVE_PAGE.encode("utf-8"), "text/html; charset=utf-8",
                        headers=(f"Content-Security-Policy: {PAGE_SECURITY_POLICY}",
                                 "Cache-Control: no-store"))

    def inspect_events(self, request: Request) -> Response:
        found = self.server.history.events(key_digest(request.write_key),
                                           parse_query(request.url.query))
        return json_response({"events": found.records, "cursor": found.cursor,
                              "missed": found.missed})

    def inspect_rejected(self, request: Request) -> Response:
        found = self.server.history.rejections(key_digest(request.write_key),
                                               parse_query(request.url.query))
        return json_response({"rejected": found.records, "cursor": found.cursor,
                              "missed": found.missed})

    def inspect_stats(self, request: Request) -> Response:
        return json_response(self.server.history.stats(key_digest(request.write_key)))

    def inspect_reset(self, request: Request) -> Response:
        self.server.history.reset(key_digest(request.write_key))
        return json_response({"reset": True})


def parse_query(text: str) -> Query:
    """The Query of /rudderlite/events or /rudderlite/rejected. Every parameter that is not an
    option filters on a field or dotted path; a parameter given twice matches either value."""
    options: Dict[str, str] = {}
    filters: Dict[Tuple[str, ...], List[str]] = {}
    for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        if name in QUERY_OPTIONS:
            options[name] = value
        else:
            filters.setdefault(tuple(name.split(".")), []).append(value)
    valid = options.get("valid")
    if valid not in (None, "true", "false"):
        raise Rejection(BAD_QUERY, "valid takes true or false")
    return Query(filters=tuple((path, tuple(values)) for path, values in filters.items()),
                 after=query_number(options, "after", None),
                 limit=query_number(options, "limit", 0),
                 minimum=query_number(options, "min", 1), wait=query_seconds(options),
                 valid=None if valid is None else valid == "true")


def query_number(options: Dict[str, str], name: str, default: Optional[int]) -> Optional[int]:
    text = options.get(name)
    if text is None:
        return default
    if not DECIMAL_DIGITS.fullmatch(text) or len(text) > 18:
        raise Rejection(BAD_QUERY, f"{name} takes a whole number")
    return int(text)


def query_seconds(options: Dict[str, str]) -> float:
    text = options.get("wait", "0")
    seconds = number_or_none(text) if DECIMAL_NUMBER.fullmatch(text) else None
    if seconds is None:
        raise Rejection(BAD_QUERY, "wait takes seconds, such as 5 or 0.5")
    return seconds


DECIMAL_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


###############################################################################
# The server
###############################################################################

#: At shutdown, how long requests in flight may take to finish.
SHUTDOWN_GRACE_SECONDS = 10.0
#: How often the watchdog looks for connections past their deadline.
WATCHDOG_SECONDS = 0.5


@dataclasses.dataclass
class ConnectionState:
    deadline: float  # when the watchdog shuts the socket; infinity while the server works
    idle: bool  # waiting for its next request: closed at once when the server stops
    shut: bool = False  # the watchdog (or stopping) shut it: nothing more can be read


class Connections:
    """The open connections: a cap on their number, and a deadline for every wait on a client.

    A connection waits for its next request (idle), for the client to send a head or a body, or for
    the client to take an answer; each wait has a deadline, and a watchdog shuts the sockets whose
    deadline passed, which ends any read or write blocked on them: a client trickling its headers a
    byte at a time (slowloris) cannot hold a thread. While the server itself works on a request
    (from the end of its body to its answer), there is no deadline: what the server accepted is
    answered. At shutdown, idle connections are closed at once and busy ones are given time to
    finish. """

    def __init__(self, limit: int):
        self.limit = limit
        self.closing = False
        self._changed = threading.Condition()
        self._open: Dict[socket.socket, ConnectionState] = {}

    def __len__(self) -> int:
        with self._changed:
            return len(self._open)

    def admit(self, sock: socket.socket) -> bool:
        with self._changed:
            if len(self._open) >= self.limit or self.closing:
                return False
            self._open[sock] = ConnectionState(math.inf, idle=False)  # until its thread starts
            return True

    def idle(self, sock: socket.socket, seconds: float) -> None:
        """The connection waits for its next request; when stopping, it is closed at once."""
        with self._changed:
            state = self._open[sock]
            state.deadline, state.idle = time.monotonic() + seconds, True
            if self.closing:
                self._shut(sock, state)
            self._changed.notify_all()

    def await_client(self, sock: socket.socket, seconds: float) -> None:
        """The connection waits for the client (to send, or to take an answer) at most
        ``seconds``."""
        with self._changed:
            state = self._open[sock]
            state.deadline, state.idle = time.monotonic() + seconds, False

    def work(self, sock: socket.socket) -> None:
        """The server works on the request: no deadline until its answer. Raises ClientGone when the
        deadline passed just before, so a request whose socket was shut is not taken on."""
        with self._changed:
            state = self._open[sock]
            if state.shut:
                raise ClientGone()
            state.deadline, state.idle = math.inf, False

    def forget(self, sock: socket.socket) -> None:
        with self._changed:
            self._open.pop(sock, None)
            self._changed.notify_all()

    def expire(self) -> None:
        now = time.monotonic()
        with self._changed:
            for sock, state in self._open.items():
                if state.deadline < now and not state.shut:
                    self._shut(sock, state)

    def close_idle(self) -> None:
        """From now on, refuse new connections and close each connection once it is idle."""
        with self._changed:
            self.closing = True
            for sock, state in self._open.items():
                if state.idle:
                    self._shut(sock, state)

    def wait_until_closed(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for every connection to finish its request and close."""
        deadline = time.monotonic() + grace
        with self._changed:
            while self._open and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    @staticmethod
    def _shut(sock: socket.socket, state: ConnectionState) -> None:
        """End every wait on the socket. An idle one is only shut for reading: a request that had
        already arrived is still read and answered, since its answer can still be written."""
        state.shut = not state.idle
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD if state.idle else socket.SHUT_RDWR)


class ParsingBudget:
    """How many body bytes are parsed into events at once.

    A body becomes about ten times its size in Python objects while it is checked, so eight clients
    sending 4 MiB batches at once would take hundreds of MiB. Bodies wait here, already read, until
    the bytes in progress leave room; one body is always let through, however large. With the GIL,
    parsing two bodies at once is no faster than one after the other, so nothing is lost.
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


class ParsingLanes:
    """Two parsing budgets: small bodies (single events) never wait behind a large batch."""

    def __init__(self, small_body_bytes: int, budget_bytes: int):
        self.small_body_bytes = small_body_bytes
        self.small = ParsingBudget(budget_bytes)
        self.large = ParsingBudget(budget_bytes)

    def reserve(self, size: int):
        return (self.small if size <= self.small_body_bytes else self.large).reserve(size)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RudderliteServer(http.server.ThreadingHTTPServer):
    """The HTTP server with its store, its history and its connections; one thread per
    connection."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, config: Config):
        self.config = config
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        super().__init__((config.host, config.port), RequestHandler)  # bind first: a start that
        try:  # fails on a busy port must leave no data directory behind
            self.plans = TrackingPlans(config.tracking_plan, config.strict)
            mirror = sys.stdout.fileno() if config.print_events else None
            self.store = EventStore(config.data_dir, config.rotate_bytes, config.fsync, mirror)
        except BaseException:
            self.server_close()
            raise
        self.history = History(config.history_events, config.history_bytes)
        self.connections = Connections(config.max_connections)
        self.parsing = ParsingLanes(config.max_event_bytes, config.max_batch_bytes)
        self.guards_host = is_loopback(config.host)
        self._stopping = threading.Event()
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._serving: Optional[threading.Thread] = None
        threading.Thread(target=self._watchdog, name="rudderlite-watchdog", daemon=True).start()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host name, which can take seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.server_port}"

    def _watchdog(self) -> None:
        while not self._stopping.wait(WATCHDOG_SECONDS):
            self.connections.expire()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until ``stop()``. socketserver's own loop would notice a stop only at
        its next poll interval; this one also waits on a wakeup socket, so stopping takes no
        time."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wakeup_reader, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for ready, _events in selector.select():
                    if ready.fileobj is self.socket and not self._stopping.is_set():
                        self._accept()

    def _accept(self) -> None:
        try:
            connection, client_address = self.get_request()
        except OSError:  # the client gave up before it was accepted
            return
        self.process_request(connection, client_address)

    def process_request(self, request, client_address) -> None:
        """Start the connection's thread, unless the connection cap is reached: then answer 503 at
        once, which every SDK retries."""
        if self.connections.admit(request):
            return super().process_request(request, client_address)
        with contextlib.suppress(OSError):
            request.settimeout(0.5)
            body = TOO_MANY_CONNECTIONS.message.encode()
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; "
                            b"charset=utf-8\r\nRetry-After: 1\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        self.connections.forget(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection's thread ended in an exception the handler did not expect: one traceback.
        (A socket error there, such as a client gone before its thread began, is no bug.)"""
        if isinstance(sys.exc_info()[1], OSError):
            return
        logger.exception("bug on the connection from %s", client_address[0])

    def start(self) -> "RudderliteServer":
        """Serve in a background thread (for embedding); ``stop()`` ends it."""
        self._serving = threading.Thread(target=self.serve_forever, name="rudderlite-server",
                                         daemon=True)
        self._serving.start()
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, answer the requests in flight (waiting at most ``grace`` seconds),
        close."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wakeup_writer.send(b"\0")
        if self._serving is not None:
            self._serving.join()
        self.socket.close()
        self.connections.close_idle()
        self.history.close()  # long-polls answer now with what they have
        self.connections.wait_until_closed(grace)
        self.store.close()
        self._wakeup_reader.close()
        self._wakeup_writer.close()

    # -- embedding: what /rudderlite/events answers, without HTTP ---------------------------------

    @property
    def cursor(self) -> int:
        """The cursor of the newest event or rejection: ``received(after=server.cursor)`` later
        returns only what came after now."""
        return self.history.cursor

    def received(self, write_key: Optional[str] = None, *, after: Optional[int] = None,
                 **filters) -> List[dict]:
        """The events sent with ``write_key`` (any key for None) that match the filters, oldest
        first, as /rudderlite/events answers them: ``received("KEY", event="Signed Up")``."""
        return self.history.events(embedded_key(write_key), embedded_query(after, filters)).records

    def wait_for(self, write_key: Optional[str] = None, count: int = 1, *, timeout: float = 10.0,
                 after: Optional[int] = None, **filters) -> List[dict]:
        """Like ``received()``, but waits until at least ``count`` events match: SDKs send from a
        background thread a moment after the app calls them. Raises AssertionError, saying what did
        arrive, when they do not come within ``timeout`` seconds."""
        query = embedded_query(after, filters)._replace(wait=timeout, minimum=count)
        events = self.history.events(embedded_key(write_key), query).records
        if len(events) < count:
            everything = embedded_query(after, {})
            arrived = self.history.events(embedded_key(write_key), everything).records
            raise AssertionError(f"waited {timeout} s for {count} event(s) matching {filters}, "
                                 f"{len(events)} came; all that arrived: {arrived[-20:]}")
        return events

    def __exit__(self, *exc_info) -> None:
        self.stop()


def embedded_key(write_key: Optional[str]) -> Optional[bytes]:
    return None if write_key is None else key_digest(write_key)


def embedded_query(after: Optional[int], filters: dict) -> Query:
    """The Query of keyword filters: a dotted path as a name (``**{"properties.plan": "pro"}``), any
    JSON value as the wanted one."""
    wanted = {name: value if isinstance(value, str) else encode_json(value).decode("utf-8")
              for name, value in filters.items()}
    return Query(filters=tuple((tuple(name.split(".")), (value,))
                               for name, value in wanted.items()), after=after)


def make_server(config: Config = Config()) -> RudderliteServer:
    """A server bound to ``config.host:config.port`` (read the real port from ``.url``), not yet
    serving. Raises OSError when the address or the data directory cannot be used, and
    PlanUnusable when the tracking plan cannot."""
    return RudderliteServer(config)


@contextlib.contextmanager
def running(config: Optional[Config] = None, **settings):
    """Run a server in a background thread for the length of a ``with`` block; for tests::

        with rudderlite.running(port=0, data_dir=str(tmp_path)) as server:
            requests.post(server.url + "/v1/track", ...)
            assert server.wait_for("KEY", event="Signed Up")
    """
    server = make_server(dataclasses.replace(config or Config(), **settings)).start()
    try:
        yield server
    finally:
        server.stop()


###############################################################################
# The command line
###############################################################################


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a mistake is said in one line, as the README promises, not with the
    whole usage."""

    def error(self, message: str):
        self.exit(2, f"rudderlite: {message}; python3 rudderlite.py --help lists the options\n")


def parse_config(argv: Optional[List[str]] = None) -> Config:
    """Build a Config from the command line; the defaults come from Config itself, declared once."""
    defaults = Config()
    parser = OneLineParser(prog="rudderlite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=defaults.host,
                        help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=defaults.port,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--data-dir", default=defaults.data_dir,
                        help="where the JSONL files go (default: %(default)s)")
    parser.add_argument("--write-key", dest="write_keys", action="append", default=[],
                        help="accept only this key (repeatable; default: any non-empty key)")
    for option, help_text in [("--max-event-bytes", "largest event"),
                              ("--max-batch-bytes", "largest batch body"),
                              ("--rotate-bytes", "rotate the active file before this size"),
                              ("--history-events", "events remembered for /rudderlite/events"),
                              ("--history-bytes", "bytes of those events at most"),
                              ("--max-connections", "connections served at once")]:
        name = option[2:].replace("-", "_")
        parser.add_argument(option, type=positive_number, default=getattr(defaults, name),
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--fsync", choices=FSYNC_MODES, default=defaults.fsync,
                        help="always: before answering 200; interval: every second; off (default)")
    parser.add_argument("--strict", action="store_true",
                        help="answer contract and tracking-plan violations with 400")
    parser.add_argument("--quiet", action="store_true",
                        help="no line per request on standard error")
    parser.add_argument("--print", dest="print_events", action="store_true",
                        help="write every stored event to standard output as a JSON line")
    parser.add_argument("--tracking-plan", metavar="FILE",
                        help="check events against this RudderStack tracking plan (JSON)")
    parser.add_argument("--allow-host", dest="allow_hosts", metavar="NAME", action="append",
                        default=[], help="also serve this Host name when bound to loopback")
    parser.add_argument("--allow-origin", dest="allow_origins", metavar="ORIGIN", action="append",
                        default=[], help="also let pages of this origin read /rudderlite/*")
    options = vars(parser.parse_args(argv))
    options["write_keys"] = tuple(options["write_keys"])
    options["allow_hosts"] = tuple(host_name(name) for name in options["allow_hosts"])
    options["allow_origins"] = tuple(origin.lower().rstrip("/")
                                     for origin in options["allow_origins"])
    return Config(**options)


def port_number(text: str) -> int:
    if not DECIMAL_DIGITS.fullmatch(text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def positive_number(text: str) -> int:
    if not DECIMAL_DIGITS.fullmatch(text) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def start_problem(config: Config, error: Exception) -> str:
    """What stopped the start, in one line that says what to do."""
    if isinstance(error, PlanUnusable):
        return f"cannot use --tracking-plan {config.tracking_plan}: {error}"
    if getattr(error, "filename", None):
        return f"cannot use --data-dir {config.data_dir}: {error.strerror or error}"
    if getattr(error, "errno", None) == errno.EADDRINUSE:
        return (f"port {config.port} on {config.host} is already in use: stop what uses it, or "
                f"choose another port with --port (--port 0 picks a free one)")
    reason = getattr(error, "strerror", None) or error
    return f"cannot listen on {config.host} port {config.port}: {reason}"


def configure_logging(config: Config) -> None:
    """Log lines on standard error, for a person; coloured only on a terminal without NO_COLOR."""
    handler = logging.StreamHandler(sys.stderr)
    colour = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    handler.setFormatter(TerminalFormatter(colour))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if config.quiet else logging.INFO)


#: Closing the terminal (SIGHUP) stops rudderlite as cleanly as SIGTERM and Ctrl-C do.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def send_stop_signals_to(wakeup: socket.socket) -> None:
    """From now on, the stop signals write a byte to ``wakeup``.

    The OS may deliver a signal to any thread, and Python runs handlers only in the main thread,
    between two bytecodes: a main thread asleep in Event.wait() might not notice a signal delivered
    to a connection's thread. The wakeup socket (signal.set_wakeup_fd) is written by whichever
    thread got it. """
    wakeup.setblocking(False)
    signal.set_wakeup_fd(wakeup.fileno())
    for signal_number in STOP_SIGNALS:
        signal.signal(signal_number, lambda *_: None)  # the wakeup byte is all that is needed


def main(argv: Optional[List[str]] = None) -> int:
    """Run until SIGTERM, SIGINT or SIGHUP, then finish the requests in flight and exit 0."""
    config = parse_config(argv)
    configure_logging(config)
    try:
        server = make_server(config)
    except (OSError, PlanUnusable) as error:
        print(f"rudderlite: {start_problem(config, error)}", file=sys.stderr)
        return 2
    stop_requests, wakeup = socket.socketpair()
    send_stop_signals_to(wakeup)  # before the listening line tells anyone to send signals
    server.start()
    print(f"rudderlite listening on {server.url}", flush=True,
          file=sys.stderr if config.print_events else sys.stdout)  # --print: stdout is events
    logger.info("events go to %s; see them live at %s/rudderlite/",
                os.path.abspath(server.store.path), server.url)
    stop_requests.recv(1)
    for signal_number in STOP_SIGNALS:  # a second signal while stopping, or while Python exits,
        signal.signal(signal_number, signal.SIG_IGN)  # must not kill the process half-way
    server.stop()
    return 0


###############################################################################
# The live page: GET /rudderlite/
###############################################################################

LIVE_PAGE = """<!doctype html>
<title>rudderlite</title>
<p>rudderlite</p>
"""


if __name__ == "__main__":
    sys.exit(main())
