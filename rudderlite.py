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
import unicodedata
import urllib.parse
import uuid
import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

if sys.version_info < (3, 9):  # Python 3.8 would start, then answer every event with a 500
    raise SystemExit(f"rudderlite: needs Python 3.9 or newer; this is Python "
                     f"{sys.version_info[0]}.{sys.version_info[1]}")

__version__ = "0.2.0"

logger = logging.getLogger("rudderlite")


###############################################################################
# The contract as data
###############################################################################

#: The event types RudderStack knows; each has its own endpoint ``/v1/<type>``.
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
#: When the store fsyncs: before each 200, at least once a second, or never.
FSYNC_MODES = ("always", "interval", "off")
#: With ``--fsync interval``, how long a stored line may wait for its fsync.
FSYNC_INTERVAL_SECONDS = 1.0


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
    except UnicodeDecodeError as error:
        raise Rejection(INVALID_JSON, f"not UTF-8 at byte {error.start}") from None
    except RecursionError:
        raise Rejection(INVALID_JSON, "nested too deep") from None
    except ValueError as error:  # JSONDecodeError says where; the others say what
        raise Rejection(INVALID_JSON, str(error)) from None


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
    text = go_utf8(f"{user_id}:{anonymous_id}")
    digest = hashlib.md5(text, usedforsecurity=False).digest()
    return str(uuid.UUID(bytes=digest, version=4))  # version=4 also sets the RFC 4122 variant bits


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def go_utf8(text: str) -> bytes:
    """A text's UTF-8 as rudder-server holds it: a lone surrogate (JSON allows ``"\\ud800"``,
    UTF-8 does not) is the replacement character, as Go's JSON decoder makes it."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


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


def context_last(event):
    """The event with its context object moved to its end, for an event to be checked against a
    tracking plan: the verdict then goes into the context's encoding at the end of the event's,
    without encoding the event again (see stored_line_with_verdict). The members of a JSON object
    have no order, and an encoding's length does not depend on it."""
    if isinstance(event, dict) and isinstance(event.get("context"), dict):
        event["context"] = event.pop("context")
    return event


def stored_line_with_verdict(event: dict, encoded: bytes, fields: dict, verdict) -> bytes:
    """The line of an event checked against a tracking plan: as stored_line, with the ``verdict``
    (``trackingPlanId``, ``trackingPlanVersion``, ``violationErrors``) in its context, as
    rudder-server writes it downstream: a missing or null context becomes the verdict, an object
    gets its three fields, any other context is left as it is. ``encoded`` is the encoding of the
    event after context_last."""
    context = event.get("context")
    if context is not None and not isinstance(context, dict):
        return stored_line(event, encoded, fields)
    if "context" not in event:
        return stored_line(event, encoded, {**fields, "context": verdict.fields})
    if context is not None and event.keys().isdisjoint(fields) and context.keys().isdisjoint(
            verdict.fields):  # encoded ends in '"context":{...}}': the verdict goes before '}}'
        return (encoded[:-2] + (b"," if context else b"") + verdict.members_json + b"},"
                + encode_json(fields)[1:] + b"\n")
    event.update(fields)
    event["context"] = {**(context or {}), **verdict.fields}
    return encode_json(event) + b"\n"


def utc_now() -> str:
    """Now, in RFC 3339 in UTC with milliseconds, as rudder-server writes ``receivedAt``:
    ``2026-11-26T10:00:00.123Z``."""
    now = time.time()
    return f"{utc_second(int(now))}.{int(now * 1000) % 1000:03d}Z"


@functools.lru_cache(maxsize=1)  # one text a second, not one a request
def utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


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
    if plan is not None:
        events = [context_last(event) for event in events]
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
            verdict = plan_verdict(plan, {**event, **fields})  # the event as stored
            violations = verdict.violations
            if violations and config.strict:
                raise Rejection(Answer(400, f"{where}: {violations[0]}" if where
                                       else violations[0]))
            line = stored_line_with_verdict(event, encoded, fields, verdict)
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


# Tracking plans: check events against a RudderStack tracking plan, with RudderStack's verdicts.
#
# RudderStack checks each event of a source that has a tracking plan after its gateway answered:
# rudder-server's processor (``processor/trackingplan.go``) sends the event to rudder-transformer,
# whose ``src/util/eventValidation.js`` finds the event's rule in the plan and runs Ajv on it:
# ``Ajv2019`` (JSON Schema draft 2019-09, with the draft-06 and draft-07 meta-schemas added), or
# ``ajv-draft-04`` for a rule whose ``$schema`` mentions draft-04, with ``ajv-formats`` and the
# options ``allErrors``, ``strictRequired`` and ``allowUnionTypes`` in Ajv's default strict mode.
# Each Ajv error becomes one violation ``{"type", "message", "meta": {"instancePath",
# "schemaPath"}}``.
#
# rudderlite does the same without Node: a JSON Schema validator written to Ajv's behaviour
# rather than to the specification's where they differ (``multipleOf`` divides in floating point,
# formats are ajv-formats' expressions, patterns are ECMAScript's, errors come in Ajv's keyword
# order, and Ajv's bookkeeping of evaluated properties is followed to the letter). As Ajv compiles
# a schema into one JavaScript function, each rule is compiled once, when the plan loads, into
# nested closures: a table maps each keyword to a small function that returns the closure checking
# it (as python-jsonschema's ``_keywords.py`` maps keywords to validators), so checking an event
# does nothing loading could do.
#
# A rule Ajv refuses to compile (strict mode: an unknown keyword or format, a ``required`` name
# the schema does not define, a bad pattern, a dangling ``$ref``...) is one line of
# ``TrackingPlan.problems``, and its events pass unchecked, as rudder-transformer lets them
# through.


# -- The facts as data: violation types, messages, Ajv's keyword order -----------------------------

#: rudder-transformer's violation type for each Ajv error keyword (eventValidation.js,
#: ``validate``); every other keyword is an ``Unknown-Violation``.
VIOLATION_TYPES = {
    "required": "Required-Missing",
    "type": "Datatype-Mismatch",
    "additionalProperties": "Additional-Properties",
    "unevaluatedProperties": "Additional-Properties",
    **dict.fromkeys(
        ("minLength", "maxLength", "pattern", "format", "multipleOf", "minimum", "maximum",
         "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "uniqueItems", "enum",
         "if"),
        "Advance-Rules-Violation"),
}
UNKNOWN_VIOLATION = "Unknown-Violation"
UNPLANNED_EVENT = "Unplanned-Event"

#: The event types rudder-transformer checks (``supportedEventTypes``); alias never is.
CHECKED_EVENT_TYPES = ("track", "identify", "page", "screen", "group")

# Ajv runs a schema's keywords in groups, not in the schema's key order (lib/compile/rules.ts,
# lib/compile/validate/index.ts): the keywords for any value first, then those for numbers,
# strings, arrays and objects, each group in the order its vocabularies added them (lib/2019.ts:
# dynamic, core, validation, applicator, format, next, unevaluated; then ajv-formats' format
# limits). ``items``, ``additionalItems`` and ``contains`` are added "before uniqueItems".
_GROUPS_2019 = (
    (None, ("$dynamicAnchor", "$dynamicRef", "$recursiveAnchor", "$recursiveRef", "id", "$ref",
            "nullable", "const", "enum", "not", "anyOf", "oneOf", "allOf", "if", "then", "else")),
    ("number", ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf",
                "format")),
    ("string", ("maxLength", "minLength", "pattern", "format", "formatMaximum", "formatMinimum",
                "formatExclusiveMaximum", "formatExclusiveMinimum")),
    ("array", ("maxItems", "minItems", "additionalItems", "items", "contains", "uniqueItems",
               "maxContains", "minContains", "unevaluatedItems")),
    ("object", ("maxProperties", "minProperties", "required", "propertyNames",
                "additionalProperties", "dependencies", "properties", "patternProperties",
                "dependentRequired", "dependentSchemas", "unevaluatedProperties")),
)
# ajv-draft-04: no 2019-09 keywords; exclusiveMaximum/Minimum are booleans read by maximum/minimum.
_GROUPS_DRAFT4 = (
    (None, ("$ref", "nullable", "const", "enum", "not", "anyOf", "oneOf", "allOf", "if", "then",
            "else")),
    ("number", ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf",
                "format")),
    ("string", ("maxLength", "minLength", "pattern", "format", "formatMaximum", "formatMinimum",
                "formatExclusiveMaximum", "formatExclusiveMinimum")),
    ("array", ("maxItems", "minItems", "additionalItems", "items", "contains", "uniqueItems")),
    ("object", ("maxProperties", "minProperties", "required", "propertyNames",
                "additionalProperties", "dependencies", "properties", "patternProperties")),
)
#: Keywords Ajv knows but that check nothing (no code of their own, or read by another keyword).
_INERT_2019 = ("$schema", "$id", "$defs", "$vocabulary", "$comment", "definitions", "$async",
               "type", "title", "description", "default", "deprecated", "readOnly", "writeOnly",
               "examples", "contentMediaType", "contentEncoding", "contentSchema")
_INERT_DRAFT4 = ("$schema", "id", "$defs", "$comment", "definitions", "$async", "type", "title",
                 "description", "default")


# -- JSON values as JavaScript sees them -----------------------------------------------------------


def js_number_text(number) -> str:
    """ECMAScript's Number::toString: how Ajv writes a number into a message (``5``, ``0.1``,
    ``1e-7``, ``1e+21``). Python ints are first made doubles, as JSON.parse does."""
    number = float(number)
    if number != number:
        return "NaN"
    if number in (math.inf, -math.inf):
        return "Infinity" if number > 0 else "-Infinity"
    if number == 0:
        return "0"
    if number < 0:
        return "-" + js_number_text(-number)
    # repr() gives the shortest digits that round-trip, as ECMAScript asks; only the layout differs.
    mantissa, _, exponent = repr(number).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0")
    if len(digits) <= point <= 21:
        return digits + "0" * (point - len(digits))
    if 0 < point <= 21:
        return digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    power = point - 1
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{head}e{'+' if power > 0 else '-'}{abs(power)}"


_MISSING = object()  # a field that is not there: JavaScript's undefined


def js_string(value) -> str:
    """JavaScript's String(value) for a JSON value (``_MISSING`` is undefined): what a template
    literal shows, as in rudder-transformer's ``no schema for event: ${event}``."""
    if value is _MISSING:
        return "undefined"
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return js_number_text(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # Array.prototype.join shows null and undefined as ""
        return ",".join("" if item is None else js_string(item) for item in value)
    return "[object Object]"


_ARRAY_INDEX = re.compile(r"(?:0|[1-9][0-9]{0,9})\Z")


def js_key_order(obj: dict) -> list:
    """An object's keys in JavaScript's order (``for...in``, ``Object.keys``): keys that are array
    indices first, in numeric order, then the others in insertion order. Ajv reports errors in this
    order, so ``{"b": 1, "2": 1}`` yields ``2`` before ``b``."""
    indices = [key for key in obj if _ARRAY_INDEX.match(key) and int(key) < 4294967295]
    if not indices:
        return list(obj)
    indices.sort(key=int)
    return indices + [key for key in obj if key not in set(indices)]


def _js_truthy(value) -> bool:
    """JavaScript's truthiness: objects and arrays are true even when empty."""
    return type(value) in (dict, list) or bool(value)


def json_equal(left, right) -> bool:
    """Deep equality as Ajv's ``equal`` (fast-deep-equal) and ``===`` see JSON: 1 equals 1.0, but
    true is not 1 and false is not 0, at any depth."""
    left_type, right_type = type(left), type(right)
    if left_type is bool or right_type is bool:
        return left_type is right_type and left == right
    if left_type in (int, float):
        return right_type in (int, float) and left == right
    if left_type is list:
        return (right_type is list and len(left) == len(right)
                and all(json_equal(a, b) for a, b in zip(left, right)))
    if left_type is dict:
        return (right_type is dict and len(left) == len(right)
                and all(key in right and json_equal(left[key], right[key]) for key in left))
    return left_type is right_type and left == right


def _is_number(value) -> bool:
    """Ajv's "number" under ``strictNumbers``: a finite double, never a boolean."""
    kind = type(value)
    return kind is int or (kind is float and value - value == 0.0)


def _is_integer(value) -> bool:
    """Ajv's "integer": a number with no fraction, so 1.0 is an integer."""
    kind = type(value)
    return kind is int or (kind is float and value - value == 0.0 and value.is_integer())


#: The JSON types that one Python class stands for (numbers need a test: 1.0 is an integer).
_PYTHON_TYPES = {"null": type(None), "boolean": bool, "string": str, "object": dict, "array": list}
#: Ajv's data types and how each is recognised (lib/compile/validate/dataType.ts, checkDataType).
_TYPE_TESTS = {
    "null": lambda value: value is None,
    "boolean": lambda value: type(value) is bool,
    "string": lambda value: type(value) is str,
    "number": _is_number,
    "integer": _is_integer,
    "object": lambda value: type(value) is dict,
    "array": lambda value: type(value) is list,
}


def pointer_token(key: str) -> str:
    """A key as one token of a JSON Pointer (RFC 6901): how Ajv writes ``instancePath``."""
    return key.replace("~", "~0").replace("/", "~1")


def fragment_token(key) -> str:
    """A key as one token of a URI fragment: Ajv's ``escapeFragment``, a JSON Pointer token through
    encodeURIComponent, so ``schemaPath`` shows ``Sample%20property`` where ``instancePath`` shows
    ``Sample property``."""
    return urllib.parse.quote(pointer_token(str(key)), safe="!'()*-._~")


# -- ECMAScript regular expressions, in Python's re ------------------------------------------------

# Ajv compiles ``pattern`` (and ``patternProperties``) with ``new RegExp(source, "u")``;
# ajv-formats' "regex" format only asks whether ``new RegExp(source)`` compiles. Python's re differs
# from ECMAScript in ways a plan can meet, so patterns are parsed as ECMAScript (ECMA-262, "Regular
# Expressions", u flag) and rewritten for re: ``.`` excludes the four ECMAScript line terminators;
# ``$`` matches only at the very end (re's also before a final newline); ``\d``, ``\w`` and ``\b``
# are ASCII-only; ``\s`` is ECMAScript's white space (with U+FEFF); a backreference to a group that
# did not take part matches the empty string; ``\p{...}`` is expanded from unicodedata.

_JS_SPACE = r"\t\n\x0b\x0c\r\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_CLASS_ESCAPES = {"d": "0-9", "w": "A-Za-z0-9_", "s": _JS_SPACE}
_WORD_BOUNDARY = {
    "b": r"(?:(?<=[A-Za-z0-9_])(?![A-Za-z0-9_])|(?<![A-Za-z0-9_])(?=[A-Za-z0-9_]))",
    "B": r"(?:(?<=[A-Za-z0-9_])(?=[A-Za-z0-9_])|(?<![A-Za-z0-9_])(?![A-Za-z0-9_]))",
}
_CONTROL_ESCAPES = {"f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\x0b"}
_SYNTAX_CHARACTERS = "^$\\.*+?()[]{}|/"
_GENERAL_CATEGORIES = {
    "L": "Letter", "LC": "Cased_Letter", "Lu": "Uppercase_Letter", "Ll": "Lowercase_Letter",
    "Lt": "Titlecase_Letter", "Lm": "Modifier_Letter", "Lo": "Other_Letter", "M": "Mark",
    "Mn": "Nonspacing_Mark", "Mc": "Spacing_Mark", "Me": "Enclosing_Mark", "N": "Number",
    "Nd": "Decimal_Number", "Nl": "Letter_Number", "No": "Other_Number", "P": "Punctuation",
    "Pc": "Connector_Punctuation", "Pd": "Dash_Punctuation", "Ps": "Open_Punctuation",
    "Pe": "Close_Punctuation", "Pi": "Initial_Punctuation", "Pf": "Final_Punctuation",
    "Po": "Other_Punctuation", "S": "Symbol", "Sm": "Math_Symbol", "Sc": "Currency_Symbol",
    "Sk": "Modifier_Symbol", "So": "Other_Symbol", "Z": "Separator", "Zs": "Space_Separator",
    "Zl": "Line_Separator", "Zp": "Paragraph_Separator", "C": "Other", "Cc": "Control",
    "Cf": "Format", "Cs": "Surrogate", "Co": "Private_Use", "Cn": "Unassigned",
}
_CATEGORY_ALIASES = {"Combining_Mark": "M", "digit": "Nd", "punct": "P", "cntrl": "Cc"}
_CATEGORY_ALIASES.update({long: short for short, long in _GENERAL_CATEGORIES.items()})
_CATEGORY_ALIASES.update({short: short for short in _GENERAL_CATEGORIES})
_BINARY_PROPERTIES = {"Any": "Any", "ASCII": "ASCII", "Assigned": "Assigned",
                      "ASCII_Hex_Digit": "AHex", "AHex": "AHex", "White_Space": "space",
                      "space": "space"}
_SCRIPT_PREFIXES = ("Script=", "sc=", "Script_Extensions=", "scx=")


class PatternError(ValueError):
    """A pattern ECMAScript refuses (Ajv's compile error), or one this translation cannot run."""


def _class_char(code: int) -> str:
    """One code point written so that re reads it literally, in or out of a class."""
    char = chr(code)
    if char.isascii() and char.isalnum():
        return char
    return f"\\x{code:02x}" if code < 0x100 else (
        f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


class _PatternParser:
    """A recursive-descent parser of ECMAScript pattern syntax that writes the equivalent re source.

    ``unicode`` is the u flag: Ajv's patterns have it; without it (ajv-formats' "regex" format) the
    syntax is Annex B's lenient one and only validity matters.
    """

    def __init__(self, source: str, unicode: bool):
        self.source = source
        self.position = 0
        self.unicode = unicode
        self.group_count, self.group_names = self._count_groups()
        self.groups_opened = 0
        self.names_seen: set = set()
        self.groups_closed: set = set()  # numbers and names of the groups already closed

    def fail(self, why: str):
        raise PatternError(f"Invalid regular expression: /{self.source}/: {why}")

    def _count_groups(self) -> Tuple[int, set]:
        """The capturing groups, counted before parsing as ECMAScript does for \\N and \\k<name>."""
        count, names, index, in_class = 0, set(), 0, False
        text = self.source
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            if in_class:
                in_class = char != "]"
            elif char == "[":
                in_class = True
            elif char == "(":
                if not text.startswith("?", index + 1):
                    count += 1
                elif text.startswith("?<", index + 1) and text[index + 3:index + 4] not in "=!":
                    count += 1
                    names.add(text[index + 3:text.find(">", index)])
            index += 1
        return count, names

    def peek(self, text: str) -> bool:
        return self.source.startswith(text, self.position)

    def at_end(self) -> bool:
        return self.position >= len(self.source)

    def translate(self) -> str:
        python = self.disjunction()
        if not self.at_end():
            self.fail("Unmatched ')'" if self.peek(")") else "Lone quantifier brackets")
        return python

    def disjunction(self) -> str:
        alternatives = [self.alternative()]
        while self.peek("|"):
            self.position += 1
            alternatives.append(self.alternative())
        return "|".join(alternatives)

    def alternative(self) -> str:
        terms = []
        while not self.at_end() and not self.peek("|") and not self.peek(")"):
            terms.append(self.term())
        return "".join(terms)

    def term(self) -> str:
        char = self.source[self.position]
        if char == "^":
            self.position += 1
            return self.no_quantifier("^")
        if char == "$":
            self.position += 1
            return self.no_quantifier(r"\Z")
        if self.peek("\\b") or self.peek("\\B"):  # re's \B never matches an empty string
            self.position += 2
            return self.no_quantifier(_WORD_BOUNDARY[self.source[self.position - 1]])
        if self.peek("(?=") or self.peek("(?!") or self.peek("(?<=") or self.peek("(?<!"):
            opening = self.source[self.position:self.position + (4 if self.peek("(?<") else 3)]
            self.position += len(opening)
            inner = self.disjunction()
            self.expect(")")
            look = f"{opening}{inner})"
            if opening.startswith("(?<") or self.unicode:
                return self.no_quantifier(look)
            return look + self.quantifier()
        atom = self.atom()
        return atom + self.quantifier()

    def no_quantifier(self, python: str) -> str:
        if not self.at_end() and self.source[self.position] in "*+?" or self.quantifier_ahead():
            self.fail("Nothing to repeat")
        return python

    def quantifier_ahead(self) -> bool:
        return self.peek("{") and re.match(r"\{\d+(,\d*)?\}", self.source[self.position:])

    def expect(self, text: str):
        if not self.peek(text):
            self.fail("Unterminated group")
        self.position += len(text)

    def quantifier(self) -> str:
        if self.at_end():
            return ""
        char = self.source[self.position]
        if char in "*+?":
            self.position += 1
            written = char
        elif char == "{":
            match = re.match(r"\{(\d+)(,(\d*))?\}", self.source[self.position:])
            if not match:
                if self.unicode:
                    self.fail("Incomplete quantifier")
                return ""
            low, high = int(match.group(1)), match.group(3)
            if high and int(high) < low:
                self.fail("numbers out of order in {} quantifier")
            self.position += match.end()
            written = match.group(0)
        else:
            return ""
        if self.peek("?"):
            self.position += 1
            written += "?"
        if self.peek("*") or self.peek("+") or self.peek("?") or self.quantifier_ahead():
            self.fail("Nothing to repeat")
        return written

    def atom(self) -> str:
        char = self.source[self.position]
        if char == ".":
            self.position += 1
            return "[^\\n\\r\\u2028\\u2029]"
        if char == "(":
            return self.group()
        if char == "[":
            return self.character_class()
        if char == "\\":
            return self.atom_escape()
        if char in "*+?":
            self.fail("Nothing to repeat")
        if char == "{":
            if self.unicode or self.quantifier_ahead():
                self.fail("Nothing to repeat" if self.quantifier_ahead() else
                          "Lone quantifier brackets")
        if char in "}]" and self.unicode:
            self.fail("Lone quantifier brackets")
        return self.literal()

    def literal(self) -> str:
        code = self.code_point_here()
        return _class_char(code)

    def code_point_here(self) -> int:
        """The source character here, a surrogate pair counted as one code point in u mode."""
        char = self.source[self.position]
        self.position += 1
        return ord(char)

    def group(self) -> str:
        self.position += 1
        if self.peek("?:"):
            self.position += 2
            opening = "(?:"
        elif self.peek("?<"):
            end = self.source.find(">", self.position)
            name = self.source[self.position + 2:end] if end > 0 else ""
            if not re.match(r"[A-Za-z_$][A-Za-z0-9_$]*\Z", name):
                self.fail("Invalid capture group name")
            if self._python_group_name(name) in self.names_seen:
                self.fail("Duplicate capture group name")
            self.names_seen.add(self._python_group_name(name))
            self.position = end + 1
            opening = f"(?P<{self._python_group_name(name)}>"
        elif self.peek("?"):
            self.fail("Invalid group")
        else:
            opening = "("
        number = None
        if opening != "(?:":
            self.groups_opened += 1
            number = self.groups_opened
        inner = self.disjunction()
        if not self.peek(")"):
            self.fail("Unterminated group")
        self.position += 1
        if number is not None:
            self.groups_closed.add(number)
            if opening != "(":
                self.groups_closed.add(opening[4:-1])
        return f"{opening}{inner})"

    @staticmethod
    def _python_group_name(name: str) -> str:
        return "g_" + name.replace("$", "_S")

    def atom_escape(self) -> str:
        self.position += 1
        if self.at_end():
            self.fail("\\ at end of pattern")
        char = self.source[self.position]
        if char in "123456789":
            match = re.match(r"\d+", self.source[self.position:])
            number = int(match.group(0))
            if number <= self.group_count:
                self.position += match.end()
                # A group that has not matched (or is still open) matches "" in ECMAScript.
                if number not in self.groups_closed:
                    return "(?:)"
                return f"(?({number})\\{number})"
            if self.unicode:
                self.fail("Invalid escape")
            return _class_char(self.character_escape())
        if char == "k" and (self.unicode or self.group_names):
            match = re.match(r"k<([^>]*)>", self.source[self.position:])
            if not match or match.group(1) not in self.group_names:
                self.fail("Invalid named reference")
            self.position += match.end()
            name = self._python_group_name(match.group(1))
            if name not in self.groups_closed:
                return "(?:)"
            return f"(?({name})(?P={name}))"
        escaped = self.class_escape_set()
        if escaped is not None:
            positive, negated = escaped
            return f"[{'^' if negated else ''}{positive}]" if positive else (
                "[\\s\\S]" if negated else "(?!)")
        return _class_char(self.character_escape())

    def class_escape_set(self) -> Optional[Tuple[str, bool]]:
        """``\\d \\D \\w \\W \\s \\S \\p{..} \\P{..}`` here (after the backslash): the class body
        and whether it is negated; None when the escape is a single character."""
        char = self.source[self.position]
        if char.lower() in _CLASS_ESCAPES:
            self.position += 1
            return _CLASS_ESCAPES[char.lower()], char.isupper()
        if char in "pP" and self.unicode:
            match = re.match(r"[pP]\{([^}]*)\}", self.source[self.position:])
            if not match:
                self.fail("Invalid property name")
            self.position += match.end()
            return self.property_ranges(match.group(1)), char == "P"
        return None

    def character_escape(self) -> int:
        """A CharacterEscape here (after the backslash), as its code point."""
        source, char = self.source, self.source[self.position]
        self.position += 1
        if char in _CONTROL_ESCAPES:
            return ord(_CONTROL_ESCAPES[char])
        if char == "c":
            if self.position < len(source) and source[self.position].isascii() and \
                    source[self.position].isalpha():
                self.position += 1
                return ord(source[self.position - 1]) % 32
            if self.unicode:
                self.fail("Invalid unicode escape")
            self.position -= 1
            return ord("\\")
        if char == "0" and not (self.position < len(source) and source[self.position].isdigit()):
            return 0
        if char == "x":
            match = re.match(r"[0-9A-Fa-f]{2}", source[self.position:])
            if match:
                self.position += 2
                return int(match.group(0), 16)
            if self.unicode:
                self.fail("Invalid escape")
            return ord("x")
        if char == "u":
            return self.unicode_escape()
        if not self.unicode:
            if char.isdigit():  # Annex B legacy octal escapes, such as \07
                match = re.match(r"[0-7]{1,3}", source[self.position - 1:])
                if match and int(match.group(0), 8) < 256:
                    self.position += match.end() - 1
                    return int(match.group(0), 8)
            return ord(char)
        if char in _SYNTAX_CHARACTERS:
            return ord(char)
        self.fail("Invalid escape")

    def unicode_escape(self) -> int:
        source = self.source
        if self.unicode and self.peek("{"):
            match = re.match(r"\{([0-9A-Fa-f]+)\}", source[self.position:])
            if not match or int(match.group(1), 16) > 0x10FFFF:
                self.fail("Invalid Unicode escape")
            self.position += match.end()
            return int(match.group(1), 16)
        match = re.match(r"[0-9A-Fa-f]{4}", source[self.position:])
        if not match:
            if self.unicode:
                self.fail("Invalid Unicode escape")
            return ord("u")
        self.position += 4
        code = int(match.group(0), 16)
        if self.unicode and 0xD800 <= code < 0xDC00:  # \uD83D\uDE00: one code point in u mode
            low = re.match(r"\\u(d[c-f][0-9a-f]{2})", source[self.position:], re.IGNORECASE)
            if low:
                self.position += 6
                return 0x10000 + ((code - 0xD800) << 10) + (int(low.group(1), 16) - 0xDC00)
        return code

    def character_class(self) -> str:
        self.position += 1
        negated = self.peek("^")
        if negated:
            self.position += 1
        singles: List[str] = []  # re class body pieces: characters, ranges, positive sets
        excluded: List[str] = []  # bodies of negated sets inside the class (\D, \S, \W, \P{..})
        while True:
            if self.at_end():
                self.fail("Unterminated character class")
            if self.peek("]"):
                self.position += 1
                break
            start = self.class_atom()
            if self.peek("-") and not self.source.startswith("]", self.position + 1) and \
                    self.position + 1 < len(self.source):
                self.position += 1
                end = self.class_atom()
                if isinstance(start, tuple) or isinstance(end, tuple):
                    if self.unicode:
                        self.fail("Invalid character class")
                    for atom in (start, end):  # Annex B: [\d-z] is \d, "-" and z
                        self.add_class_atom(atom, singles, excluded)
                    singles.append("\\-")
                    continue
                if end < start:
                    self.fail("Range out of order in character class")
                singles.append(f"{_class_char(start)}-{_class_char(end)}")
                continue
            self.add_class_atom(start, singles, excluded)
        body = "".join(singles)
        parts = ([f"[{body}]"] if body else []) + [f"[^{part}]" for part in excluded]
        if not parts:
            return "[\\s\\S]" if negated else "(?!)"
        union = parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
        if negated:
            if not excluded:
                return f"[^{body}]"
            return f"(?:(?!{union})[\\s\\S])"
        return union

    @staticmethod
    def add_class_atom(atom, singles: list, excluded: list):
        if isinstance(atom, tuple):
            body, negated = atom
            (excluded if negated else singles).append(body)
        else:
            singles.append(_class_char(atom))

    def class_atom(self):
        """One class member: a code point, or (body, negated) for a class escape."""
        if not self.peek("\\"):
            return self.code_point_here()
        self.position += 1
        if self.at_end():
            self.fail("\\ at end of pattern")
        char = self.source[self.position]
        if char == "b":
            self.position += 1
            return 8
        if char == "-" and self.unicode:
            self.position += 1
            return ord("-")
        escaped = self.class_escape_set()
        if escaped is not None:
            return escaped
        if not self.unicode and char in "123456789":
            return self.character_escape()
        if not self.unicode and char == "k":
            self.position += 1
            return ord("k")
        return self.character_escape()

    def property_ranges(self, name: str) -> str:
        """The re class body of ``\\p{name}``, from unicodedata (its Unicode version, not
        Node's)."""
        if name.startswith(_SCRIPT_PREFIXES):
            raise PatternError(f"\\p{{{name}}}: Unicode scripts cannot be checked here "
                               f"(Python's unicodedata has no Script property)")
        if name.startswith(("General_Category=", "gc=")):
            name = name.partition("=")[2]
            key = _CATEGORY_ALIASES.get(name)
        else:
            key = _CATEGORY_ALIASES.get(name) or _BINARY_PROPERTIES.get(name)
        if key is None:
            raise PatternError(f"Invalid regular expression: /{self.source}/: Invalid property "
                               f"name (or one this check does not know: {name})")
        return _unicode_set(key)


_FIXED_SETS = {"Any": "\\x00-\\U0010ffff", "ASCII": "\\x00-\\x7f", "AHex": "0-9A-Fa-f",
               "space": _JS_SPACE.replace(r"\ufeff", r"\x85")}  # Unicode's White_Space


@functools.lru_cache(maxsize=None)
def _category_ranges() -> Dict[str, List[Tuple[int, int]]]:
    """Every code point's general category, as ranges, in one pass (a tenth of a second), made
    once per process, when the first \\p{...} is met. Planes 4 to 13 hold nothing yet and planes
    15 and 16 are private use, so they are not asked one by one."""
    ranges: Dict[str, List[Tuple[int, int]]] = {}
    current, start = None, 0
    for code in list(range(0x40000)) + list(range(0xE0000, 0xF0000)):
        category = unicodedata.category(chr(code))
        if category != current or code != end + 1:
            if current is not None:
                ranges.setdefault(current, []).append((start, end))
            current, start = category, code
        end = code
    ranges.setdefault(current, []).append((start, end))
    ranges["Cn"] += [(0x40000, 0xDFFFF), (0xFFFFE, 0xFFFFF), (0x10FFFE, 0x10FFFF)]
    ranges["Co"] = ranges.get("Co", []) + [(0xF0000, 0xFFFFD), (0x100000, 0x10FFFD)]
    return ranges


@functools.lru_cache(maxsize=None)  # the keys are the few names the tables above know
def _unicode_set(key: str) -> str:
    """The re class body of one \\p{..} key (a general category or binary property)."""
    if key in _FIXED_SETS:
        return _FIXED_SETS[key]
    ranges = _category_ranges()
    if key == "Assigned":
        names = [name for name in ranges if name != "Cn"]
    elif key == "LC":
        names = ["Lu", "Ll", "Lt"]
    else:
        names = [name for name in ranges if name.startswith(key)]
    merged = sorted(pair for name in names for pair in ranges.get(name, ()))
    return "".join(_class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"
                   for low, high in merged)


def compile_pattern(source: str):
    """An ECMAScript pattern with the u flag, as a compiled re; PatternError when Ajv would refuse
    it or re cannot run it (a lookbehind of varying length, a repetition count above re's limit)."""
    python = _PatternParser(source, True).translate()
    try:
        return re.compile(python, re.ASCII)
    except (re.error, OverflowError, RecursionError) as error:
        raise PatternError(f"pattern /{source}/ cannot be checked here: {error}") from None


def is_ecmascript_regex(source: str) -> bool:
    """Whether ``new RegExp(source)`` compiles (no flags): ajv-formats' "regex" format."""
    try:
        _PatternParser(source, False).translate()
    except PatternError:
        return False
    return True


# -- Formats, as ajv-formats asserts them ----------------------------------------------------------

# rudder-transformer calls ``addFormats(ajv)`` with no options: ajv-formats' "full" mode
# (ajv-formats 2.1.1, src/formats.ts, ``fullFormats``). Its checks are regular expressions and a few
# functions, looser than the RFCs in places, and rudder-transformer's own tests rely on that (a
# date-time without an offset is valid). Each is rebuilt here from its grammar: ``_Z`` is the end of
# the text (ECMAScript's ``$``), classes spell out both letter cases where ajv-formats uses the
# ``i`` flag, and ``\d``, ``\s`` are ECMAScript's.

_Z = r"\Z"
_HEX = "[0-9A-Fa-f]"
_PERCENT = f"%{_HEX}{{2}}"
_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"  # "01" and "001" pass, as in ajv-formats
_IPV4 = rf"(?:{_DEC_OCTET}\.){{3}}{_DEC_OCTET}"
_H16 = f"{_HEX}{{1,4}}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "(?:" + "|".join((  # RFC 3986 IPv6address, as ajv-formats' URI expression arranges it
    f"(?:(?:{_H16}:){{6}}"
    f"|::(?:{_H16}:){{5}}"
    f"|(?:{_H16})?::(?:{_H16}:){{4}}"
    f"|(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}"
    f"|(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}"
    f"|(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:"
    f"|(?:(?:{_H16}:){{0,4}}{_H16})?::){_LS32}",
    f"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
    f"(?:(?:{_H16}:){{0,6}}{_H16})?::",
)) + ")"
_SUB_DELIMS = "!$&'()*+,;="


def _uri_expression(quote: str, scheme_required: bool) -> str:
    """ajv-formats' "uri" (``quote`` "", scheme required, a hierarchical part required) and
    "string" (``quote`` '"': it lets a double quote into host names, paths, queries and
    fragments; scheme and hierarchical part optional). Both accept "scheme:/host" (one slash before
    an authority) and no empty path after a bare scheme."""
    unreserved = "A-Za-z0-9\\-._~"
    userinfo = f"(?:[{unreserved}{_SUB_DELIMS}:]|{_PERCENT})*@"
    ip_literal = rf"\[(?:{_IPV6}|[Vv]{_HEX}+\.[{unreserved}{_SUB_DELIMS}:]+)\]"
    reg_name = f"(?:[{unreserved}{_SUB_DELIMS}{quote}]|{_PERCENT})*"
    pchar = f"(?:[{unreserved}{_SUB_DELIMS}{quote}:@]|{_PERCENT})"
    segments = f"(?:/{pchar}*)*"
    authority_path = f"/?/(?:{userinfo})?(?:{ip_literal}|{_IPV4}|{reg_name})(?::[0-9]*)?{segments}"
    hierarchical = f"(?:{authority_path}|/(?:{pchar}+{segments})?|{pchar}+{segments})"
    query_or_fragment = f"(?:[{unreserved}{_SUB_DELIMS}{quote}:@/?]|{_PERCENT})*"
    scheme = "(?:[A-Za-z][A-Za-z0-9+\\-.]*:)"
    optional = "" if scheme_required else "?"
    return (f"{scheme}{optional}{hierarchical}{optional}"
            f"(?:\\?{query_or_fragment})?(?:#{query_or_fragment})?{_Z}")


_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})\Z")
_TIME = re.compile(
    r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([zZ]|[+-][0-9]{2}(?::?[0-9]{2})?)?\Z")
_DATE_TIME_SEPARATOR = re.compile(f"[tT{_JS_SPACE}]")
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# The longest expressions stay text, compiled on first use (re's own cache): they take milliseconds
# to compile, and most runs check no format at all.
_URI = _uri_expression("", True)
_URI_REFERENCE = _uri_expression('"', False)
_URL_NAME = "[A-Za-z0-9\u00a1-\uffff]+"
_URL_TLD = r"(?:\.[A-Za-z\u00a1-\uffff]{2,})"
_URL_OCTET_LAST = r"(?:[1-9][0-9]?|1[0-9][0-9]|2[0-4][0-9]|25[0-4])"
_URL = (  # "url": http(s) or ftp, a public IPv4 address or a name with a top-level domain
    rf"(?i:https?|ftp)://(?:\S+(?::\S*)?@)?".replace(r"\S", f"[^{_JS_SPACE}]")
    + r"(?:(?!(?:10|127)(?:\.[0-9]{1,3}){3})(?!(?:169\.254|192\.168)(?:\.[0-9]{1,3}){2})"
    r"(?!172\.(?:1[6-9]|2[0-9]|3[0-1])(?:\.[0-9]{1,3}){2})"
    r"(?:[1-9][0-9]?|1[0-9][0-9]|2[01][0-9]|22[0-3])"
    r"(?:\.(?:1?[0-9]{1,2}|2[0-4][0-9]|25[0-5])){2}"
    rf"(?:\.{_URL_OCTET_LAST})"
    rf"|(?:(?:{_URL_NAME}-)*{_URL_NAME})(?:\.(?:{_URL_NAME}-)*{_URL_NAME})*{_URL_TLD})"
    rf"(?::[0-9]{{2,5}})?(?:/[^{_JS_SPACE}]*)?{_Z}")
_EMAIL_ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_EMAIL = re.compile(rf"{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*@(?:{_LABEL}\.)+{_LABEL}{_Z}")
_HOST_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(
    rf"(?=[^\n\r\u2028\u2029]{{1,253}}\.?{_Z}){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?{_Z}")
_IPV4_FORMAT = re.compile(_IPV4 + _Z)
_IPV6_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zeros, unlike _IPV4
_IPV6_V4 = rf"{_IPV6_OCTET}(?:\.{_IPV6_OCTET}){{3}}"
_IPV6_FORMAT = ("(?:" + "|".join((  # ajv-formats' "ipv6": RFC 4291 text forms
    rf"(?:(?:{_H16}:){{7}}(?:{_H16}|:))",
    rf"(?:(?:{_H16}:){{6}}(?::{_H16}|{_IPV6_V4}|:))",
    rf"(?:(?:{_H16}:){{5}}(?:(?:(?::{_H16}){{1,2}})|:{_IPV6_V4}|:))",
    rf"(?:(?:{_H16}:){{4}}(?:(?:(?::{_H16}){{1,3}})|(?:(?::{_H16})?:{_IPV6_V4})|:))",
    rf"(?:(?:{_H16}:){{3}}(?:(?:(?::{_H16}){{1,4}})|(?:(?::{_H16}){{0,2}}:{_IPV6_V4})|:))",
    rf"(?:(?:{_H16}:){{2}}(?:(?:(?::{_H16}){{1,5}})|(?:(?::{_H16}){{0,3}}:{_IPV6_V4})|:))",
    rf"(?:(?:{_H16}:){{1}}(?:(?:(?::{_H16}){{1,6}})|(?:(?::{_H16}){{0,4}}:{_IPV6_V4})|:))",
    rf"(?::(?:(?:(?::{_H16}){{1,7}})|(?:(?::{_H16}){{0,5}}:{_IPV6_V4})|:))",
)) + ")" + _Z)
_UUID = re.compile(
    rf"(?:[uU][rR][nN]:[uU][uU][iI][dD]:)?{_HEX}{{8}}-(?:{_HEX}{{4}}-){{3}}{_HEX}{{12}}{_Z}")
_POINTER_TOKENS = r"(?:/(?:[^~/]|~0|~1)*)*"
_JSON_POINTER = re.compile(_POINTER_TOKENS + _Z)
_RELATIVE_JSON_POINTER = re.compile(rf"(?:0|[1-9][0-9]*)(?:#|{_POINTER_TOKENS}){_Z}")
_POINTER_FRAGMENT = re.compile(
    rf"#(?:/(?:[A-Za-z0-9_\-.!$&'()*+,;:=@]|{_PERCENT}|~0|~1)*)*{_Z}")
_URI_TEMPLATE_NAME = rf"(?:[A-Za-z0-9_]|{_PERCENT})+(?::[1-9][0-9]{{0,3}}|\*)?"
_URI_TEMPLATE = re.compile(
    rf"(?:[^\x00-\x20\"'<>%\\^`{{|}}]|{_PERCENT}"
    rf"|\{{[+#./;?&=,!@|]?{_URI_TEMPLATE_NAME}(?:,{_URI_TEMPLATE_NAME})*\}})*{_Z}")
_DURATION = re.compile(  # "P", not empty; years to days then T and hours to seconds, or weeks
    r"P(?!\Z)(?:(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?"
    r"(?:[0-9]+S)?)?|(?:[0-9]+W)?)\Z")
# "byte" is a regular expression with the m flag, searched: one line of base64 (or one empty line,
# such as the end after a final line break) is enough. ECMAScript's line terminators are four.
_LINE_START, _LINE_END = r"(?<![^\n\r\u2028\u2029])", r"(?![^\n\r\u2028\u2029])"
_BYTE = re.compile(
    _LINE_START + r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?" + _LINE_END)


def _is_leap_year(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _is_date(text: str) -> bool:
    """ajv-formats "date": YYYY-MM-DD with a real day of that month."""
    match = _DATE.match(text)
    if not match:
        return False
    year, month, day = (int(part) for part in match.groups())
    return 1 <= month <= 12 and 1 <= day <= (
        29 if month == 2 and _is_leap_year(year) else _DAYS_IN_MONTH[month])


def _is_time(text: str) -> bool:
    """ajv-formats "time": HH:MM:SS[.frac][offset]; the offset is optional (even inside date-time)
    and not range-checked; a leap second only as 23:59:60, whatever the offset."""
    match = _TIME.match(text)
    if not match:
        return False
    hour, minute, second = (int(part) for part in match.groups()[:3])
    return (hour <= 23 and minute <= 59 and second <= 59) or (hour, minute, second) == (23, 59, 60)


def _is_date_time(text: str) -> bool:
    """ajv-formats "date-time": a date and a time split at one "T", "t" or white space."""
    parts = _DATE_TIME_SEPARATOR.split(text)
    return len(parts) == 2 and _is_date(parts[0]) and _is_time(parts[1])


def _is_uri(text: str) -> bool:
    """ajv-formats "uri": it must hold a "/" or ":" and match the URI grammar with a scheme."""
    return ("/" in text or ":" in text) and re.match(_URI, text) is not None


def _is_regex(text: str) -> bool:
    """ajv-formats "regex": compiles as an ECMAScript expression (no flags), with no ``\\Z``."""
    return re.search(r"[^\\]\\Z", text) is None and is_ecmascript_regex(text)


def _matches(expression) -> Callable[[str], bool]:
    return lambda text: re.match(expression, text) is not None


def _is_int32(number) -> bool:
    return _is_integer(number) and -(2 ** 31) <= number <= 2 ** 31 - 1


class Format(NamedTuple):
    """One ajv-formats format: the data type it checks (others pass) and its test; ``test`` None
    means known but checking nothing (``password``, ``binary``, ``float``, ``double``)."""

    data_type: str
    test: Optional[Callable]


#: ajv-formats' "full" formats, in its order. The number formats check numbers only.
FORMATS = {
    "date": Format("string", _is_date),
    "time": Format("string", _is_time),
    "date-time": Format("string", _is_date_time),
    "duration": Format("string", _matches(_DURATION)),
    "uri": Format("string", _is_uri),
    "uri-reference": Format("string", _matches(_URI_REFERENCE)),
    "uri-template": Format("string", _matches(_URI_TEMPLATE)),
    "url": Format("string", _matches(_URL)),
    "email": Format("string", _matches(_EMAIL)),
    "hostname": Format("string", _matches(_HOSTNAME)),
    "ipv4": Format("string", _matches(_IPV4_FORMAT)),
    "ipv6": Format("string", _matches(_IPV6_FORMAT)),
    "regex": Format("string", _is_regex),
    "uuid": Format("string", _matches(_UUID)),
    "json-pointer": Format("string", _matches(_JSON_POINTER)),
    "json-pointer-uri-fragment": Format("string", _matches(_POINTER_FRAGMENT)),
    "relative-json-pointer": Format("string", _matches(_RELATIVE_JSON_POINTER)),
    "byte": Format("string", lambda text: _BYTE.search(text) is not None),
    "int32": Format("number", _is_int32),
    "int64": Format("number", _is_integer),
    "float": Format("number", None),
    "double": Format("number", None),
    "password": Format("string", None),
    "binary": Format("string", None),
}


def _compare_dates(left: str, right: str):
    """ajv-formats' compareDate: plain string order; None (undefined) when either is empty."""
    if not (left and right):
        return None
    return (left > right) - (left < right)


def _compare_times(left: str, right: str):
    """ajv-formats' compareTime: hours, minutes, seconds and fraction as one string; the offset is
    ignored; None when either does not look like a time."""
    if not (left and right):
        return None
    first, second = _TIME.match(left), _TIME.match(right)
    if not (first and second):
        return None
    left_key = "".join(first.group(1, 2, 3)) + (first.group(4) or "")
    right_key = "".join(second.group(1, 2, 3)) + (second.group(4) or "")
    return (left_key > right_key) - (left_key < right_key)


def _compare_date_times(left: str, right: str):
    """ajv-formats' compareDateTime: the dates, then the times."""
    if not (left and right):
        return None
    left_parts = _DATE_TIME_SEPARATOR.split(left) + [""]
    right_parts = _DATE_TIME_SEPARATOR.split(right) + [""]
    order = _compare_dates(left_parts[0], right_parts[0])
    if order is None:
        return None
    return order or _compare_times(left_parts[1], right_parts[1])


#: The formats whose values formatMaximum and its kin can compare (ajv-formats' ``compare``).
FORMAT_COMPARISONS = {"date": _compare_dates, "time": _compare_times,
                      "date-time": _compare_date_times}


# -- What Ajv refuses before compiling: the meta-schema --------------------------------------------

# Ajv validates a rule against its meta-schema before compiling it (core.ts, ``validateSchema``):
# the one its ``$schema`` names, else draft 2019-09's (draft-04's for ajv-draft-04), and refuses a
# rule that fails. Only keyword values are checked there, and which keywords differs: draft-07 does
# not know ``dependentRequired`` or ``$defs``, draft-04 wants every subschema to be an object.
# Formats are not asserted there (Ajv copies its options for meta-schemas while ``validateFormats``
# is off), so "uri", "uri-reference" and "regex" values need only be strings.
# Each check returns a reason, or None when the value is fine.


def _meta_string_array(value, at_least: int = 0) -> Optional[str]:
    if type(value) is not list or not all(type(item) is str for item in value):
        return "must be an array of strings"
    if len(value) < at_least:
        return f"must have at least {at_least} item"
    return "must not repeat an item" if len(set(value)) != len(value) else None


def _meta_unique(value: list) -> bool:
    return not any(json_equal(value[i], value[j])
                   for i in range(len(value)) for j in range(i))


def _meta_non_negative_integer(value) -> Optional[str]:
    return None if _is_integer(value) and value >= 0 else "must be an integer >= 0"


def _meta_types(value) -> Optional[str]:
    names = ("array", "boolean", "integer", "null", "number", "object", "string")
    if type(value) is str:
        return None if value in names else f"{value!r} is not a JSON type"
    if type(value) is list and value and all(type(item) is str and item in names
                                             for item in value) and _meta_unique(value):
        return None
    return "must be a JSON type or a non-empty array of distinct JSON types"


_META_CHECKS: Dict[str, Callable] = {
    "string": lambda value: None if type(value) is str else "must be a string",
    "boolean": lambda value: None if type(value) is bool else "must be a boolean",
    "number": lambda value: None if _is_number(value) else "must be a number",
    "positive": lambda value: None if _is_number(value) and value > 0 else "must be a number > 0",
    "count": _meta_non_negative_integer,
    "array": lambda value: None if type(value) is list else "must be an array",
    "choices": lambda value: None if type(value) is list and value and _meta_unique(value) else (
        "must be a non-empty array of distinct values"),
    "names": _meta_string_array,
    "names1": lambda value: _meta_string_array(value, 1),
    "types": _meta_types,
    "id": lambda value: None if type(value) is str and re.match(r"[^#]*#?\Z", value) else (
        "must be a string without a fragment"),
    "anchor": lambda value: None if type(value) is str and re.match(
        r"[A-Za-z][-A-Za-z0-9.:_]*\Z", value) else "must be a plain name",
    "map": lambda value: None if type(value) is dict else "must be an object",
    "names-map": lambda value: "must be an object" if type(value) is not dict else next(
        (f"{name!r} {reason}" for name, reason in ((name, _meta_string_array(names))
                                                    for name, names in value.items()) if reason),
        None),
    "vocabulary": lambda value: None if type(value) is dict and all(
        type(flag) is bool for flag in value.values()) else "must map URIs to booleans",
}
# Subschema positions the meta-schema walks into: the value is a schema, a map of schemas, an array
# of schemas (not empty), a schema or such an array, or a map of schemas or property lists.
_SUBSCHEMA_KINDS = ("schema", "schemas", "schema-list", "schema-or-list", "dependencies",
                    "boolean-or-schema")
_META_2019 = {
    "$id": "id", "$schema": "string", "$anchor": "anchor", "$ref": "string",
    "$recursiveRef": "string", "$recursiveAnchor": "boolean", "$vocabulary": "vocabulary",
    "$comment": "string", "$defs": "schemas", "definitions": "schemas",
    "dependencies": "dependencies",
    "additionalItems": "schema", "unevaluatedItems": "schema", "items": "schema-or-list",
    "contains": "schema", "additionalProperties": "schema", "unevaluatedProperties": "schema",
    "properties": "schemas", "patternProperties": "schemas", "dependentSchemas": "schemas",
    "propertyNames": "schema", "if": "schema", "then": "schema", "else": "schema",
    "allOf": "schema-list", "anyOf": "schema-list", "oneOf": "schema-list", "not": "schema",
    "multipleOf": "positive", "maximum": "number", "exclusiveMaximum": "number",
    "minimum": "number", "exclusiveMinimum": "number", "maxLength": "count", "minLength": "count",
    "pattern": "string", "maxItems": "count", "minItems": "count", "uniqueItems": "boolean",
    "maxContains": "count", "minContains": "count", "maxProperties": "count",
    "minProperties": "count", "required": "names", "dependentRequired": "names-map",
    "enum": "array",
    "type": "types", "title": "string", "description": "string", "deprecated": "boolean",
    "readOnly": "boolean", "writeOnly": "boolean", "examples": "array", "format": "string",
    "contentMediaType": "string", "contentEncoding": "string", "contentSchema": "schema",
}
_META_DRAFT7 = {
    "$id": "string", "$schema": "string", "$ref": "string", "$comment": "string",
    "title": "string", "description": "string", "readOnly": "boolean", "examples": "array",
    "multipleOf": "positive", "maximum": "number", "exclusiveMaximum": "number",
    "minimum": "number", "exclusiveMinimum": "number", "maxLength": "count", "minLength": "count",
    "pattern": "string", "additionalItems": "schema", "items": "schema-or-list",
    "maxItems": "count",
    "minItems": "count", "uniqueItems": "boolean", "contains": "schema", "maxProperties": "count",
    "minProperties": "count", "required": "names", "additionalProperties": "schema",
    "definitions": "schemas", "properties": "schemas", "patternProperties": "schemas",
    "dependencies": "dependencies", "propertyNames": "schema", "enum": "choices", "type": "types",
    "format": "string", "contentMediaType": "string", "contentEncoding": "string", "if": "schema",
    "then": "schema", "else": "schema", "allOf": "schema-list", "anyOf": "schema-list",
    "oneOf": "schema-list", "not": "schema",
}
_META_DRAFT6 = {keyword: kind for keyword, kind in _META_DRAFT7.items() if keyword not in (
    "$comment", "readOnly", "contentMediaType", "contentEncoding", "if", "then", "else")}
_META_DRAFT4 = {
    "id": "string", "$schema": "string", "title": "string", "description": "string",
    "multipleOf": "positive", "maximum": "number", "exclusiveMaximum": "boolean",
    "minimum": "number", "exclusiveMinimum": "boolean", "maxLength": "count", "minLength": "count",
    "pattern": "string", "additionalItems": "boolean-or-schema", "items": "schema-or-list",
    "maxItems": "count",
    "minItems": "count", "uniqueItems": "boolean", "maxProperties": "count",
    "minProperties": "count", "required": "names1", "additionalProperties": "boolean-or-schema",
    "definitions": "schemas", "properties": "schemas", "patternProperties": "schemas",
    "dependencies": "dependencies", "enum": "choices", "type": "types", "allOf": "schema-list",
    "anyOf": "schema-list", "oneOf": "schema-list", "not": "schema",
}


class _MetaSchema(NamedTuple):
    """One meta-schema Ajv can validate a rule against, as the checks above."""

    name: str
    keywords: Dict[str, str]
    boolean_schemas: bool  # draft-04 has none: true and false are not schemas there


_META_SCHEMAS = {
    "2019-09": _MetaSchema("draft 2019-09", _META_2019, True),
    "draft-07": _MetaSchema("draft-07", _META_DRAFT7, True),
    "draft-06": _MetaSchema("draft-06", _META_DRAFT6, True),
    "draft-04": _MetaSchema("draft-04", _META_DRAFT4, False),
}
# The $schema values each Ajv instance of rudder-transformer knows (with "#" or "#/" at the end or
# not): Ajv2019 with the draft-06 and draft-07 meta-schemas added, and ajv-draft-04.
_SCHEMA_URIS = {
    "https://json-schema.org/draft/2019-09/schema": "2019-09",
    "http://json-schema.org/schema": "2019-09",
    "http://json-schema.org/draft-07/schema": "draft-07",
    "http://json-schema.org/draft-06/schema": "draft-06",
}
_SCHEMA_URIS.update({f"https://json-schema.org/draft/2019-09/meta/{vocabulary}": "2019-09"
                     for vocabulary in ("core", "applicator", "validation", "meta-data", "format",
                                        "content")})
_DRAFT4_URIS = {"http://json-schema.org/draft-04/schema": "draft-04",
                "http://json-schema.org/schema": "draft-04"}


def _meta_problem(schema, meta: _MetaSchema, pointer: str) -> Optional[Tuple[str, str]]:
    """The first place where ``schema`` fails ``meta``: (JSON pointer, reason), or None."""
    if type(schema) is not dict:
        if type(schema) is bool and meta.boolean_schemas:
            return None
        return pointer, f"a schema must be an object{' or a boolean' * meta.boolean_schemas}"
    if meta.name == "draft-04":
        for exclusive, limit in (("exclusiveMaximum", "maximum"), ("exclusiveMinimum", "minimum")):
            if exclusive in schema and limit not in schema:
                return f"{pointer}/{exclusive}", f'needs "{limit}" beside it (draft-04)'
    for keyword, value in schema.items():
        kind = meta.keywords.get(keyword)
        if kind is None:
            continue
        at = f"{pointer}/{pointer_token(keyword)}"
        if kind not in _SUBSCHEMA_KINDS:
            reason = _META_CHECKS[kind](value)
            if reason:
                return at, f"{keyword} {reason} ({meta.name} meta-schema)"
            continue
        found = _meta_subschemas(keyword, value, kind, meta, at)
        if found:
            return found
    return None


def _meta_subschemas(keyword: str, value, kind: str, meta: _MetaSchema, at: str):
    if kind == "boolean-or-schema" and type(value) is bool:  # draft-04 additionalProperties/Items
        return None
    if kind in ("schema", "boolean-or-schema") or (
            kind == "schema-or-list" and type(value) is not list):
        return _meta_problem(value, meta, at)
    if kind in ("schema-list", "schema-or-list"):
        if type(value) is not list or not value:
            return at, f"{keyword} must be a non-empty array of schemas ({meta.name} meta-schema)"
        for index, item in enumerate(value):
            found = _meta_problem(item, meta, f"{at}/{index}")
            if found:
                return found
        return None
    if type(value) is not dict:
        return at, f"{keyword} must be an object ({meta.name} meta-schema)"
    for name, item in value.items():
        item_at = f"{at}/{pointer_token(name)}"
        if kind == "dependencies" and type(item) is list:
            reason = _meta_string_array(item, 1 if meta.name == "draft-04" else 0)
            if reason:
                return item_at, f"dependencies {reason} ({meta.name} meta-schema)"
            continue
        found = _meta_problem(item, meta, item_at)
        if found:
            return found
    return None


# -- The compiler: one rule into closures, keyword by keyword --------------------------------------

# A compiled schema is a closure ``check(data, path, errors, frame) -> bool``:
#   ``errors`` None asks for the verdict only, stopping where Ajv's code stops without allErrors;
#   a list asks for every error, as Ajv's allErrors does, appended as ``_Error`` tuples;
#   ``path`` is the instance path of ``data`` (JSON Pointer), used only when errors are collected;
#   ``frame`` holds the run-time variables of the current Ajv function (below), or None.
# ``not`` and the condition of ``if`` ask for the verdict only, as Ajv runs them without errors and
# without allErrors; an event is first checked that way, and again for its errors if it fails.
#
# Ajv tracks which properties and items a schema has "evaluated", for unevaluatedProperties and
# unevaluatedItems, partly when compiling (names known in advance, or "all") and partly when
# validating (a variable of the generated function). Which one, and when a variable is merged into
# another, decides what Ajv reports, sometimes not as the specification would (an ``if`` without
# ``then`` counts its properties when it fails; a failed ``anyOf`` loses what came before it; a
# ``patternProperties`` after such a loss throws, and rudder-transformer then lets the event pass).
# The compiler follows lib/compile/util.ts (``mergeEvaluated``) step by step: compile-time values
# are frozensets, True or item counts; run-time variables are ``_Slot``s, numbered places in the
# frame of one function call.


class _Error(NamedTuple):
    """One Ajv error, as rudder-transformer reads it."""

    keyword: str
    message: str
    instance_path: str
    schema_path: str
    property: Optional[str] = None


class _Problem(Exception):
    """Ajv refuses to compile the rule: where (a JSON Pointer into the plan file) and why."""

    def __init__(self, pointer: str, reason: str):
        super().__init__(f"{pointer}: {reason}")


class _Crash(Exception):
    """Ajv's generated code throws while validating (rudder-transformer then reports nothing)."""


class _Slot:
    """A run-time variable of Ajv's generated function: the index of a place in the frame."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Function:
    """A function Ajv compiles: the rule itself, or a ``$ref`` target it compiles apart (one that
    holds a ``$ref`` itself). Its errors' schema paths start again at ``#``."""

    def __init__(self, schema, base: str, pointer: str, anchors: bool):
        self.schema = schema
        self.base = base
        self.pointer = pointer
        self.anchors = anchors  # frame[0] holds the $recursiveAnchor targets of this validation
        self.slots = 1 if anchors else 0
        self.compiled = False
        self.props = None  # what it evaluated, once compiled: static, or a _Slot read at run time
        self.items = None
        self.run = None  # run(data, path, errors, anchors) -> (valid, evaluated props and items)

    def new_slot(self) -> _Slot:
        self.slots += 1
        return _Slot(self.slots - 1)

    def new_frame(self, anchors=None) -> Optional[list]:
        """The run-time variables of one call (None when there are none)."""
        if not self.slots:
            return None
        frame = [None] * self.slots
        if self.anchors:
            frame[0] = {} if anchors is None else anchors
        return frame

    def finish(self, check, props, items):
        """Make ``run`` once the schema is compiled (recursive calls find it at run time)."""
        self.compiled, self.props, self.items = True, props, items

        def read(state, frame):
            if isinstance(state, _Slot):
                return frame[state.index]
            return set(state) if isinstance(state, frozenset) else state

        def run(data, path, errors, anchors=None):
            frame = self.new_frame(anchors)
            valid = check(data, path, errors, frame)
            return valid, read(props, frame), read(items, frame)

        self.run = run


def _always(data, path, errors, frame) -> bool:
    return True


def _fail(errors, keyword, message, path, schema_path, property=None) -> bool:
    """Record one error when errors are collected; always False, the verdict of a failed check."""
    if errors is not None:
        errors.append(_Error(keyword, message, path, schema_path, property))
    return False


_SKIP_REST = object()  # a verdict "valid, and skip the rest of this group of keywords" (truthy)


def _sequence(checks: list):
    """Checks run one after the other: all of them when errors are collected, else until one fails.
    The verdict is Ajv's: valid when no error was added."""
    if any(getattr(check, "skips_rest", False) for check in checks[:-1]):
        return _sequence_with_skips(tuple(checks))
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks

        def check_two(data, path, errors, frame):
            if errors is None:
                return first(data, path, None, frame) and second(data, path, None, frame)
            mark = len(errors)
            first(data, path, errors, frame)
            second(data, path, errors, frame)
            return len(errors) == mark

        return check_two
    checks = tuple(checks)

    def check_all(data, path, errors, frame):
        if errors is None:
            for check in checks:
                if not check(data, path, None, frame):
                    return False
            return True
        mark = len(errors)
        for check in checks:
            check(data, path, errors, frame)
        return len(errors) == mark

    return check_all


def _sequence_with_skips(checks: tuple):
    """A sequence where, without errors, a check may end the group early as valid."""
    def check_all(data, path, errors, frame):
        if errors is None:
            for check in checks:
                verdict = check(data, path, None, frame)
                if verdict is _SKIP_REST:
                    return True
                if not verdict:
                    return False
            return True
        mark = len(errors)
        for check in checks:
            check(data, path, errors, frame)
        return len(errors) == mark

    return check_all


def _run(operations, frame):
    for operation in operations:
        operation(frame)


def _type_test(types: List[str]) -> Callable:
    """One predicate for a list of Ajv types."""
    if len(types) == 1:
        return _TYPE_TESTS[types[0]]
    if all(name in _PYTHON_TYPES for name in types):
        python_types = frozenset(_PYTHON_TYPES[name] for name in types)
        return lambda value: type(value) in python_types
    tests = tuple(_TYPE_TESTS[name] for name in types)
    return lambda value: any(test(value) for test in tests)


class _Cxt:
    """Ajv's schema compilation context (``SchemaCxt``, ``it``) for one schema object."""

    __slots__ = ("rule", "function", "schema", "path", "pointer", "base", "defined", "props",
                 "items", "check")

    def __init__(self, rule, function, schema, path, pointer, base, defined):
        self.rule = rule
        self.function = function
        self.schema = schema
        self.path = path  # Ajv's errSchemaPath: where errors say they come from
        self.pointer = pointer  # where the schema is in the plan file, for problems
        self.base = base  # the base URI for $ref
        self.defined = defined  # Ajv's definedProperties, for strictRequired
        self.props = None  # evaluated properties: None, frozenset, True or _Slot
        self.items = None  # evaluated items: None, int, True or _Slot

    def problem(self, keyword: str, reason: str):
        raise _Problem(f"{self.pointer}/{pointer_token(keyword)}", reason)

    def subschema(self, schema, keyword: str, *tokens, new_data: bool) -> "_Cxt":
        """Compile a subschema at ``keyword/tokens...``. A subschema of a property or an item
        (``new_data``) starts a fresh set of defined properties, for its parent too (Ajv's
        ``dataContextProps`` replaces the parent's set)."""
        if new_data:
            self.defined = set()
        try:
            path = "/".join([self.path, keyword] + [fragment_token(token) for token in tokens])
        except UnicodeEncodeError:  # encodeURIComponent throws on a lone surrogate
            self.problem(keyword, "URI malformed")
        pointer = "/".join([self.pointer, pointer_token(keyword)] + [pointer_token(str(token))
                                                                       for token in tokens])
        child = _Cxt(self.rule, self.function, schema, path, pointer, self.base, self.defined)
        child.check = _compile_schema(child)
        return child

    # What a subschema evaluated flows into its parent (lib/compile/util.ts, mergeEvaluated). Each
    # merge returns the run-time operations it needs, to run where Ajv's generated code does them.

    def merge(self, kind: str, source, to_variable: bool = False) -> list:
        target = getattr(self, kind)
        operations = []
        if target is None:
            result = source
        elif isinstance(target, _Slot):
            operations.append(_MERGES[kind][isinstance(source, _Slot)](source, target))
            result = target
        elif isinstance(source, _Slot):
            operations.append(_MERGES[kind][False](target, source))
            result = source
        elif source is True:
            result = True
        else:
            result = source | target if kind == "props" else max(source, target)
        if to_variable and not isinstance(result, _Slot):
            slot = self.function.new_slot()
            operations.append(_initialise(slot, result))
            result = slot
        setattr(self, kind, result)
        return operations

    def merge_evaluated(self, child: "_Cxt", to_variable: bool = False) -> list:
        if not self.rule.tracking:
            return []
        operations = []
        if self.props is not True and child.props is not None:
            operations += self.merge("props", child.props, to_variable)
        if self.items is not True and child.items is not None:
            operations += self.merge("items", child.items, to_variable)
        return operations

    def merge_if_valid(self, child: "_Cxt") -> Optional[list]:
        """Ajv's mergeValidEvaluated: operations to run when the child is valid, or None when Ajv
        does not merge (and may then skip the remaining branches of an anyOf)."""
        if self.rule.tracking and (self.props is not True or self.items is not True):
            return self.merge_evaluated(child, True)
        return None


def _initialise(slot: _Slot, value):
    index = slot.index
    if isinstance(value, frozenset):
        return lambda frame: frame.__setitem__(index, set(value))
    return lambda frame: frame.__setitem__(index, value)


def _merge_props_variables(source: _Slot, target: _Slot):
    source, target = source.index, target.index

    def operation(frame):
        into, names = frame[target], frame[source]
        if into is not True and names is not None:
            if names is True:
                frame[target] = True
            else:
                if into is None:
                    into = frame[target] = set()
                into.update(names)

    return operation


def _merge_props_value(value, target: _Slot):
    target = target.index

    def operation(frame):
        into = frame[target]
        if into is not True:
            if value is True:
                frame[target] = True
            else:
                if into is None:
                    into = frame[target] = set()
                into.update(value)

    return operation


def _larger_items(into, count):
    """Ajv's ``to > from ? to : from``, where ``to`` may be undefined (None)."""
    return into if into is not None and into > count else count


def _merge_items_variables(source: _Slot, target: _Slot):
    source, target = source.index, target.index

    def operation(frame):
        into, count = frame[target], frame[source]
        if into is not True and count is not None:
            frame[target] = True if count is True else _larger_items(into, count)

    return operation


def _merge_items_value(value, target: _Slot):
    target = target.index

    def operation(frame):
        into = frame[target]
        if into is not True:
            frame[target] = True if value is True else _larger_items(into, value)

    return operation


#: The run-time merges, by kind and by whether the source is a variable.
_MERGES = {"props": {True: _merge_props_variables, False: _merge_props_value},
           "items": {True: _merge_items_variables, False: _merge_items_value}}


def _has_rules(rule, schema) -> bool:
    """Ajv's schemaHasRules: a keyword that checks something (or throws) is present."""
    if type(schema) is bool:
        return not schema
    return any(key in rule.rules for key in schema)


def _always_valid(cxt: _Cxt, schema, keyword: str = "") -> bool:
    """Ajv's alwaysValidSchema: true, {}, or keywords that check nothing; unknown keywords are
    refused here too (strict mode)."""
    if type(schema) is bool:
        return schema
    pointer = f"{cxt.pointer}/{keyword}" if keyword else cxt.pointer
    if schema is None:  # Object.keys(null) throws
        raise _Problem(pointer, "Cannot convert undefined or null to object")
    if type(schema) in (str, list):  # where a meta-schema lets such a value through (draft-07's
        if schema:  # dependentSchemas), its indices are unknown keywords ...
            raise _Problem(f"{pointer}/0", 'unknown keyword "0" (strict mode)')
        return True
    if type(schema) is not dict:  # ... and a number has no keys at all: always valid
        return True
    _check_unknown_keywords(cxt.rule, schema, pointer)
    return not _has_rules(cxt.rule, schema)


def _check_unknown_keywords(rule, schema: dict, pointer: str):
    for key in schema:
        if key not in rule.known:
            raise _Problem(f"{pointer}/{pointer_token(key)}",
                           f'unknown keyword "{key}" (strict mode)')


def _schema_types(cxt: _Cxt) -> List[str]:
    """Ajv's getSchemaTypes: ``type`` as a list, with "null" added by ``nullable: true``."""
    schema = cxt.schema
    declared = schema.get("type")
    types = declared if type(declared) is list else ([] if declared is None else [declared])
    if not all(type(name) is str and name in _TYPE_TESTS for name in types):
        cxt.problem("type", "type must be a JSON type or a list of them")
    types = list(types)
    nullable = schema.get("nullable", _MISSING)
    if "null" in types:
        if nullable is False:
            cxt.problem("nullable", "type null contradicts nullable: false")
    else:
        if not types and nullable is not _MISSING:
            cxt.problem("nullable", '"nullable" cannot be used without "type"')
        if nullable is True:
            types.append("null")
    return types


def _false_schema(path: str):
    schema_path = f"{path}/false schema"
    return lambda data, at, errors, frame: _fail(errors, "false schema", "boolean schema is false",
                                                 at, schema_path)


def _compile_schema(cxt: _Cxt):
    """A schema object or boolean as one check (lib/compile/validate/index.ts, subschemaCode)."""
    schema, rule = cxt.schema, cxt.rule
    if type(schema) is bool:
        return _always if schema else _false_schema(cxt.path)
    if type(schema) is not dict:  # only where no meta-schema looked (see _always_valid)
        if type(schema) in (str, list) and schema:
            raise _Problem(f"{cxt.pointer}/0", 'unknown keyword "0" (strict mode)')
        return _always
    _check_unknown_keywords(rule, schema, cxt.pointer)
    if _js_truthy(schema.get("$async")) and schema is not rule.root.schema:
        raise _Problem(f"{cxt.pointer}/$async", "async schema in sync schema")
    if not _has_rules(rule, schema):
        return _always
    schema_id = schema.get(rule.id_keyword)
    if schema_id and type(schema_id) is str and schema is not cxt.function.schema:
        cxt.base = _resolve_uri(cxt.base, schema_id)  # a function's base has its $id already
    types = _schema_types(cxt)
    if schema.get("$ref") and not any(key != "$ref" and key in rule.rules for key in schema):
        return _keyword_ref(cxt, schema["$ref"], None) or _always  # "$ref" alone: nothing else runs
    # A type error comes first, unless there is one type with keywords for it: then it comes where
    # that type's keywords would have run (Ajv's coerceAndCheckDataType and groupKeywords).
    present = {group: [key for key in keywords if key in schema] for group, keywords in rule.groups}
    type_first = bool(types) and not (len(types) == 1 and present.get(types[0]))
    declared = schema.get("type")
    if type(declared) is list and "null" in types and "null" not in declared:
        declared = declared + ["null"]  # Ajv pushes "null" into the schema's own type array
    type_message, type_path = "must be " + js_string(declared), f"{cxt.path}/type"
    any_value, typed = [], []
    for group, keywords in rule.groups:
        if not present[group]:
            continue
        checks = [check for check in (_KEYWORDS[key](cxt, schema[key], group)
                                      for key in present[group]) if check is not None]
        if group is None:
            any_value = checks
            continue
        reports_type = not type_first and types == [group]
        if checks or reports_type:
            typed.append(_group_step(group, _sequence(checks) if checks else None,
                                     reports_type, type_message, type_path))
    type_step = _type_step(types, type_message, type_path) if type_first else None
    return _schema_check(type_step, any_value, typed)


def _schema_check(type_step, any_value: list, typed: list):
    """One schema object's checks in Ajv's order: a type error first (when it goes first), the
    keywords for any value, then each data type's keywords. Without errors it stops where Ajv's
    generated code stops without allErrors: not at the type error, but after the group of keywords
    for any value, or at the first failing keyword."""
    if type_step is None or not any_value:
        steps = ([] if type_step is None else [type_step]) + any_value + typed
        return _sequence(steps) if steps else _always
    any_value, typed = tuple(any_value), tuple(typed)
    first = type_step

    def check(data, path, errors, frame):
        if errors is None:
            type_ok = type_step(data, path, None, frame)
            for keyword in any_value:
                if not keyword(data, path, None, frame):
                    return False
            if not type_ok:
                return False
            for group in typed:
                if not group(data, path, None, frame):
                    return False
            return True
        mark = len(errors)
        first(data, path, errors, frame)
        for keyword in any_value:
            keyword(data, path, errors, frame)
        for group in typed:
            group(data, path, errors, frame)
        return len(errors) == mark

    return check


def _type_step(types: List[str], message: str, schema_path: str):
    """The type check that comes first. Most rules name JSON types Python tells apart by class
    alone (every value here comes from json.loads), which needs no call of a test function."""
    if all(name in _PYTHON_TYPES for name in types):
        if len(types) == 1:
            kind = _PYTHON_TYPES[types[0]]
            return lambda data, path, errors, frame: type(data) is kind or _fail(
                errors, "type", message, path, schema_path)
        kinds = frozenset(_PYTHON_TYPES[name] for name in types)
        return lambda data, path, errors, frame: type(data) in kinds or _fail(
            errors, "type", message, path, schema_path)
    test = _type_test(types)
    return lambda data, path, errors, frame: test(data) or _fail(errors, "type", message, path,
                                                                  schema_path)


def _group_step(group: str, keywords, reports_type: bool, type_message: str, type_path: str):
    """The keywords of one data type, run when the data has it; else the type error if it is that
    type's turn to report it."""
    kind = _PYTHON_TYPES.get(group)
    test = _TYPE_TESTS[group]
    if reports_type:
        def step(data, path, errors, frame):
            if type(data) is kind if kind else test(data):
                return keywords is None or keywords(data, path, errors, frame)
            return _fail(errors, "type", type_message, path, type_path)
        return step
    if kind:
        return lambda data, path, errors, frame: type(data) is not kind or keywords(
            data, path, errors, frame)
    return lambda data, path, errors, frame: not test(data) or keywords(data, path, errors, frame)


# ---- Keywords for any value -------------------------------------------------------------------


def _check_schema_type(cxt: _Cxt, keyword: str, value, *kinds: str):
    """Ajv's validSchemaType: the keyword's value must be of one of these JSON types."""
    if not any(_TYPE_TESTS[kind](value) if kind != "number" else (
            type(value) in (int, float)) for kind in kinds):
        cxt.problem(keyword, f"{keyword} value must be {' or '.join(kinds)}")


def _equal_to(expected) -> Callable:
    if type(expected) is str:
        return lambda value: type(value) is str and value == expected
    return lambda value: json_equal(value, expected)


def _keyword_const(cxt: _Cxt, expected, group):
    equal, schema_path = _equal_to(expected), f"{cxt.path}/const"
    return lambda data, path, errors, frame: equal(data) or _fail(
        errors, "const", "must be equal to constant", path, schema_path)


def _one_of_values(values: list) -> Callable:
    """A membership test with JSON equality; strings (the usual enum) by hashing."""
    strings = frozenset(value for value in values if type(value) is str)
    others = tuple(value for value in values if type(value) is not str)
    if not others:
        return lambda value: type(value) is str and value in strings
    return lambda value: (type(value) is str and value in strings) or any(
        json_equal(value, other) for other in others)


def _keyword_enum(cxt: _Cxt, values, group):
    _check_schema_type(cxt, "enum", values, "array")
    if not values:
        cxt.problem("enum", "enum must have non-empty array")
    allowed, schema_path = _one_of_values(values), f"{cxt.path}/enum"
    return lambda data, path, errors, frame: allowed(data) or _fail(
        errors, "enum", "must be equal to one of the allowed values", path, schema_path)


def _keyword_not(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "not", schema, "object", "boolean")
    schema_path = f"{cxt.path}/not"
    if _always_valid(cxt, schema, "not"):
        return lambda data, path, errors, frame: _fail(errors, "not", "must NOT be valid", path,
                                                       schema_path)
    subschema = cxt.subschema(schema, "not", new_data=False).check
    return lambda data, path, errors, frame: not subschema(data, path, None, frame) or _fail(
        errors, "not", "must NOT be valid", path, schema_path)


def _keyword_any_of(cxt: _Cxt, schemas, group):
    """anyOf (lib/vocabularies/code.ts, validateUnion): each branch's errors, then "must match a
    schema in anyOf" when none passed; none of them when one did."""
    _check_schema_type(cxt, "anyOf", schemas, "array")
    if not cxt.rule.tracking and any(_always_valid(cxt, schema) for schema in schemas):
        return None
    branches = []
    for index, schema in enumerate(schemas):
        child = cxt.subschema(schema, "anyOf", index, new_data=False)
        merges = cxt.merge_if_valid(child)
        branches.append((child.check, merges or (), merges is None))
    schema_path = f"{cxt.path}/anyOf"

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        valid = False
        for branch, merges, stop_when_valid in branches:
            passed = branch(data, path, errors, frame)
            if passed:
                valid = True
                if merges:
                    _run(merges, frame)
            if stop_when_valid and valid:
                break
        if valid:
            if errors is not None:
                del errors[mark:]
            return True
        return _fail(errors, "anyOf", "must match a schema in anyOf", path, schema_path)

    return check


def _keyword_one_of(cxt: _Cxt, schemas, group):
    """oneOf: Ajv stops at the second passing branch (the later ones are not even run)."""
    _check_schema_type(cxt, "oneOf", schemas, "array")
    branches = []
    for index, schema in enumerate(schemas):
        if _always_valid(cxt, schema):
            branches.append((None, ()))
            continue
        child = cxt.subschema(schema, "oneOf", index, new_data=False)
        branches.append((child.check, cxt.merge_evaluated(child, True)))
    schema_path = f"{cxt.path}/oneOf"

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        valid = False
        for index, (branch, merges) in enumerate(branches):
            passed = branch is None or branch(data, path, errors, frame)
            if index and passed and valid:
                valid = False
                break
            if passed:
                valid = True
                if merges:
                    _run(merges, frame)
        if valid:
            if errors is not None:
                del errors[mark:]
            return True
        return _fail(errors, "oneOf", "must match exactly one schema in oneOf", path, schema_path)

    return check


def _keyword_all_of(cxt: _Cxt, schemas, group):
    _check_schema_type(cxt, "allOf", schemas, "array")
    parts = []
    for index, schema in enumerate(schemas):
        if _always_valid(cxt, schema):
            continue
        child = cxt.subschema(schema, "allOf", index, new_data=False)
        parts.append((child.check, cxt.merge_evaluated(child)))
    if not parts:
        return None
    if not any(merges for _, merges in parts):
        return _sequence([part for part, _ in parts])

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        for part, merges in parts:
            if not part(data, path, errors, frame) and errors is None:
                return False
            if merges:
                _run(merges, frame)
        return errors is None or len(errors) == mark

    return check


def _keyword_if(cxt: _Cxt, schema, group):
    """if/then/else: the branch's errors, then 'must match "then" schema' (or "else")."""
    _check_schema_type(cxt, "if", schema, "object", "boolean")
    parent = cxt.schema
    if "then" not in parent and "else" not in parent:
        cxt.problem("if", '"if" without "then" and "else" is ignored (strict mode)')
    clauses = [name for name in ("then", "else")
               if name in parent and not _always_valid(cxt, parent[name], name)]
    if not clauses:
        return None
    condition = cxt.subschema(schema, "if", new_data=False)
    condition_merges = cxt.merge_evaluated(condition)
    compiled = {}
    for name in clauses:
        child = cxt.subschema(parent[name], name, new_data=False)
        compiled[name] = (child.check, cxt.merge_if_valid(child) or (),
                          f'must match "{name}" schema')
    then_clause, else_clause = compiled.get("then"), compiled.get("else")
    test, schema_path = condition.check, f"{cxt.path}/if"

    def check(data, path, errors, frame):
        passed = test(data, path, None, frame)
        if condition_merges:
            _run(condition_merges, frame)
        clause = then_clause if passed else else_clause
        if clause is None:
            return True
        branch, merges, message = clause
        if branch(data, path, errors, frame):
            if merges:
                _run(merges, frame)
            return True
        return _fail(errors, "if", message, path, schema_path)

    return check


def _keyword_then_else(keyword: str):
    def compile_clause(cxt: _Cxt, schema, group):
        _check_schema_type(cxt, keyword, schema, "object", "boolean")
        if "if" not in cxt.schema:
            cxt.problem(keyword, f'"{keyword}" without "if" is ignored (strict mode)')
        return None
    return compile_clause


def _keyword_ref(cxt: _Cxt, reference, group):
    """$ref: a target without a $ref of its own is compiled in place, its errors' schema paths
    starting with the $ref text; any other is a function of its own (paths start at "#")."""
    _check_schema_type(cxt, "$ref", reference, "string")
    rule = cxt.rule
    if reference in ("#", "#/") and cxt.base == rule.root.base:
        target = rule.root
    else:
        target = rule.resolve(cxt, reference)
    if not isinstance(target, _Function):
        schema, pointer = target
        child = _Cxt(rule, cxt.function, schema, reference, pointer, cxt.base, cxt.defined)
        child.check = _compile_schema(child)
        merges = cxt.merge_evaluated(child)
        if not merges:
            return child.check

        def inline(data, path, errors, frame):
            valid = child.check(data, path, errors, frame)
            _run(merges, frame)
            return valid

        return inline
    return _call_function(cxt, target)


def _call_function(cxt: _Cxt, function: Optional[_Function], choose=None):
    """A call of another compiled function (Ajv's callRef); what it evaluated is merged when it
    passes: known in advance if it is compiled already, else read from its result. ``choose``
    picks the function at run time instead ($recursiveRef)."""
    merges, reads = [], []
    if cxt.rule.tracking:
        for kind in ("props", "items"):
            if getattr(cxt, kind) is True:
                continue
            known = getattr(function, kind, None)
            if function is not None and function.compiled and not isinstance(known, _Slot):
                if known is not None:
                    merges += cxt.merge(kind, known)
            else:
                slot = cxt.function.new_slot()
                reads.append((kind, slot.index))
                merges += cxt.merge(kind, slot, True)

    anchors = cxt.rule.anchors

    def call(data, path, errors, frame):
        callee = function if choose is None else choose(frame)
        # Ajv compiles every function with allErrors, whatever its caller's mode.
        if errors is None:
            valid, props, items = callee.run(data, "", [], frame[0] if anchors else None)
        else:
            valid, props, items = callee.run(data, path, errors, frame[0] if anchors else None)
        if valid and (reads or merges):
            for kind, index in reads:
                frame[index] = props if kind == "props" else items
            _run(merges, frame)
        return valid

    return call


# ---- Keywords for numbers ---------------------------------------------------------------------

_LIMITS = {  # keyword: (comparison shown in messages, test of a valid number)
    "maximum": ("<=", lambda number, limit: number <= limit),
    "minimum": (">=", lambda number, limit: number >= limit),
    "exclusiveMaximum": ("<", lambda number, limit: number < limit),
    "exclusiveMinimum": (">", lambda number, limit: number > limit),
}


def _keyword_limit(keyword: str):
    def compile_limit(cxt: _Cxt, limit, group):
        if cxt.rule.draft4 and keyword.startswith("exclusive"):
            _check_schema_type(cxt, keyword, limit, "boolean")
            bound = "maximum" if keyword == "exclusiveMaximum" else "minimum"
            if bound not in cxt.schema:
                cxt.problem(keyword, f"{keyword} can only be used with {bound}")
            return None
        _check_schema_type(cxt, keyword, limit, "number")
        name = keyword
        if cxt.rule.draft4 and cxt.schema.get("exclusive" + keyword[0].upper() + keyword[1:]):
            name = "exclusive" + keyword[0].upper() + keyword[1:]  # draft-04: a boolean beside
        comparison, holds = _LIMITS[name]
        message = f"must be {comparison} {js_number_text(limit)}"
        schema_path = f"{cxt.path}/{keyword}"
        return lambda data, path, errors, frame: holds(data, limit) or _fail(
            errors, keyword, message, path, schema_path)
    return compile_limit


def _is_multiple(number, divisor) -> bool:
    """Ajv's multipleOf: ``number / divisor`` in floating point, and ``res === parseInt(res)``,
    which also fails for quotients of 1e21 and more (parseInt reads "1e+21" as 1)."""
    try:
        quotient = float(number) / float(divisor)
    except (OverflowError, ZeroDivisionError):
        return False
    return quotient - quotient == 0.0 and quotient.is_integer() and abs(quotient) < 1e21


def _keyword_multiple_of(cxt: _Cxt, divisor, group):
    _check_schema_type(cxt, "multipleOf", divisor, "number")
    message = f"must be multiple of {js_number_text(divisor)}"
    schema_path = f"{cxt.path}/multipleOf"
    return lambda data, path, errors, frame: (
        divisor != 0 and _is_multiple(data, divisor)) or _fail(
        errors, "multipleOf", message, path, schema_path)


# ---- Keywords that bound a count: of strings, arrays and objects ------------------------------


def _keyword_count(keyword: str, counted: str):
    """maxLength and minLength, maxItems and minItems, maxProperties and minProperties: a bound on
    ``len()`` of a string (in code points, as Ajv's ucs2length counts), an array or an object."""
    def compile_count(cxt: _Cxt, limit, group):
        _check_schema_type(cxt, keyword, limit, "number")
        schema_path = f"{cxt.path}/{keyword}"
        if keyword.startswith("max"):
            message = f"must NOT have more than {js_number_text(limit)} {counted}"
            return lambda data, path, errors, frame: len(data) <= limit or _fail(
                errors, keyword, message, path, schema_path)
        message = f"must NOT have fewer than {js_number_text(limit)} {counted}"
        return lambda data, path, errors, frame: len(data) >= limit or _fail(
            errors, keyword, message, path, schema_path)
    return compile_count


# ---- Keywords for strings ---------------------------------------------------------------------


def _keyword_pattern(cxt: _Cxt, source, group):
    _check_schema_type(cxt, "pattern", source, "string")
    expression = cxt.rule.pattern(cxt, "pattern", source)
    message, schema_path = f'must match pattern "{source}"', f"{cxt.path}/pattern"
    search = expression.search
    return lambda data, path, errors, frame: search(data) is not None or _fail(
        errors, "pattern", message, path, schema_path)


def _keyword_format(cxt: _Cxt, name, group):
    _check_schema_type(cxt, "format", name, "string")
    known = FORMATS.get(name)
    if known is None:
        cxt.problem("format", f'unknown format "{name}" (strict mode)')
    if known.test is None or known.data_type != group:
        return None
    test, message, schema_path = known.test, f'must match format "{name}"', f"{cxt.path}/format"
    return lambda data, path, errors, frame: test(data) or _fail(
        errors, "format", message, path, schema_path)


_FORMAT_LIMITS = {"formatMaximum": ("<=", lambda order: order > 0),
                  "formatMinimum": (">=", lambda order: order < 0),
                  "formatExclusiveMaximum": ("<", lambda order: order >= 0),
                  "formatExclusiveMinimum": (">", lambda order: order <= 0)}


def _keyword_format_limit(keyword: str):
    """ajv-formats' formatMaximum and kin: compare dates and times as ajv-formats does."""
    def compile_format_limit(cxt: _Cxt, limit, group):
        if "format" not in cxt.schema:
            cxt.problem(keyword, f"parent schema must have dependencies of {keyword}: format")
        _check_schema_type(cxt, keyword, limit, "string")
        name = cxt.schema["format"]
        _check_schema_type(cxt, "format", name, "string")
        known = FORMATS.get(name)
        if known is None or known.test is None:
            return None
        compare = FORMAT_COMPARISONS.get(name)
        if compare is None:
            cxt.problem(keyword, f'"{keyword}": format "{name}" does not define "compare" function')
        comparison, fails = _FORMAT_LIMITS[keyword]
        message, schema_path = f"should be {comparison} {limit}", f"{cxt.path}/{keyword}"

        def check(data, path, errors, frame):
            order = compare(data, limit)
            return order is None or not fails(order) or _fail(errors, keyword, message, path,
                                                              schema_path)
        return check
    return compile_format_limit


# ---- Keywords for arrays ----------------------------------------------------------------------


def _each_item(subschema, start: int = 0):
    """A subschema applied to every item from ``start`` on."""
    def check(data, path, errors, frame):
        if errors is None:
            for index in range(start, len(data)):
                if not subschema(data[index], None, None, frame):
                    return False
            return True
        mark = len(errors)
        for index in range(start, len(data)):
            subschema(data[index], f"{path}/{index}", errors, frame)
        return len(errors) == mark
    return check


def _keyword_items(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "items", schema, "object", "array", "boolean")
    if type(schema) is list:  # a tuple: one schema per position
        merges = []
        if cxt.rule.tracking and schema and cxt.items is not True:
            merges = cxt.merge("items", len(schema))
        positions = []
        for index, item_schema in enumerate(schema):
            if not _always_valid(cxt, item_schema):
                child = cxt.subschema(item_schema, "items", index, new_data=True)
                positions.append((index, child.check, f"/{index}"))
        # Ajv keeps the last position's verdict in one variable of the generated function; without
        # allErrors, a position the array is too short for goes on only if that (possibly stale)
        # verdict is true, else the rest of the array keywords is skipped, without an error.
        last = cxt.function.new_slot().index if positions else 0
        cxt.rule.quick = False  # that skip is wrong for a verdict-only first look at an event

        def tuple_check(data, path, errors, frame):
            if merges:
                _run(merges, frame)
            mark = 0 if errors is None else len(errors)
            for index, check, token in positions:
                if index < len(data):
                    frame[last] = check(data[index], None if errors is None else path + token,
                                        errors, frame)
                    if errors is None and not frame[last]:
                        return False
                elif errors is None and not frame[last]:
                    return _SKIP_REST
            return errors is None or len(errors) == mark

        tuple_check.skips_rest = True
        return tuple_check if positions or merges else None
    cxt.items = True
    if _always_valid(cxt, schema, "items"):
        return None
    return _each_item(cxt.subschema(schema, "items", new_data=True).check)


def _keyword_additional_items(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "additionalItems", schema, "object", "boolean")
    tuple_schemas = cxt.schema.get("items")
    if type(tuple_schemas) is not list:
        cxt.problem("additionalItems",
                    '"additionalItems" is ignored when "items" is not an array of schemas')
    cxt.items = True
    count = len(tuple_schemas)
    if schema is False:
        message = f"must NOT have more than {count} items"
        schema_path = f"{cxt.path}/additionalItems"
        return lambda data, path, errors, frame: len(data) <= count or _fail(
            errors, "additionalItems", message, path, schema_path)
    if _always_valid(cxt, schema, "additionalItems"):
        return None
    return _each_item(cxt.subschema(schema, "additionalItems", new_data=True).check, count)


def _keyword_contains(cxt: _Cxt, schema, group):
    """contains, with minContains/maxContains (2019-09): the failing items' errors, then
    "must contain at least..." when too few (or too many) items pass; none when it passes."""
    _check_schema_type(cxt, "contains", schema, "object", "boolean")
    parent = cxt.schema
    if cxt.rule.draft4:
        least, most = 1, None
    else:
        for limit in ("minContains", "maxContains"):
            if limit in parent:
                _check_schema_type(cxt, limit, parent[limit], "number")
        least, most = parent.get("minContains", 1), parent.get("maxContains")
    if most is None:
        message = f"must contain at least {js_number_text(least)} valid item(s)"
    else:
        message = (f"must contain at least {js_number_text(least)} and no more than "
                   f"{js_number_text(most)} valid item(s)")
    schema_path = f"{cxt.path}/contains"
    if most is None and least == 0:
        cxt.problem("contains", '"minContains" == 0 without "maxContains": "contains" keyword '
                                'ignored (strict mode)')
    if most is not None and least > most:
        cxt.problem("contains", '"minContains" > "maxContains" is always invalid (strict mode)')
    if _always_valid(cxt, schema, "contains"):
        return lambda data, path, errors, frame: (
            len(data) >= least and (most is None or len(data) <= most)) or _fail(
            errors, "contains", message, path, schema_path)
    cxt.items = True
    item_check = cxt.subschema(schema, "contains", new_data=True).check
    # With neither minContains nor maxContains, Ajv keeps the last item's verdict in a variable of
    # the whole generated function: an empty array then reuses the verdict of the previous array
    # this keyword checked in the same call (undefined, a failure, at first).
    last = cxt.function.new_slot().index

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        if most is None and least == 1:
            valid = frame[last]
            for index, item in enumerate(data):
                valid = frame[last] = item_check(
                    item, None if errors is None else f"{path}/{index}", errors, frame)
                if valid:
                    break
        else:
            valid, count = least == 0, 0
            if least > 0 or data:
                for index, item in enumerate(data):
                    if not item_check(item, None if errors is None else f"{path}/{index}", errors,
                                      frame):
                        continue
                    count += 1
                    if most is None:
                        if count >= least:
                            valid = True
                            break
                    elif count > most:
                        valid = False
                        break
                    elif count >= least:
                        valid = True
        if valid:
            if errors is not None:
                del errors[mark:]
            return True
        return _fail(errors, "contains", message, path, schema_path)

    return check


def _unique_key(item, many_types: bool):
    """The property name Ajv's fast uniqueItems loop files an item under (a JavaScript object key):
    String(item), with "_" after strings when several types are allowed."""
    if type(item) is str:
        return item + "_" if many_types else item
    return js_string(item)


def _keyword_unique_items(cxt: _Cxt, unique, group):
    """uniqueItems: one error for the first duplicate found. Ajv searches from the end, and words
    the indices differently when ``items`` declares simple types (its fast loop)."""
    _check_schema_type(cxt, "uniqueItems", unique, "boolean")
    if not unique:
        return None
    item_schema = cxt.schema.get("items")
    item_types = []
    if type(item_schema) is dict:
        item_types = [item_schema["type"]] if type(item_schema.get("type")) is str else list(
            item_schema.get("type") or [])
        if item_schema.get("nullable") is True and "null" not in item_types:
            item_types.append("null")
    schema_path = f"{cxt.path}/uniqueItems"

    def message(first, second):
        return f"must NOT have duplicate items (items ## {first} and {second} are identical)"

    if item_types and not any(name in ("object", "array") for name in item_types):
        of_type, many = _type_test(item_types), len(item_types) > 1

        def fast_check(data, path, errors, frame):
            seen = {}
            for index in range(len(data) - 1, -1, -1):
                item = data[index]
                if not of_type(item):
                    continue
                key = _unique_key(item, many)
                if key in seen:
                    return _fail(errors, "uniqueItems", message(seen[key], index), path,
                                 schema_path)
                seen[key] = index
            return True

        return fast_check

    def check(data, path, errors, frame):
        for later in range(len(data) - 1, 0, -1):
            for earlier in range(later - 1, -1, -1):
                if json_equal(data[later], data[earlier]):
                    return _fail(errors, "uniqueItems", message(earlier, later), path, schema_path)
        return True

    return check


def _keyword_contains_limit(keyword: str):
    def compile_contains_limit(cxt: _Cxt, limit, group):
        _check_schema_type(cxt, keyword, limit, "number")
        if "contains" not in cxt.schema:
            cxt.problem(keyword, f'"{keyword}" without "contains" is ignored (strict mode)')
        return None
    return compile_contains_limit


def _keyword_unevaluated_items(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "unevaluatedItems", schema, "object", "boolean")
    evaluated = cxt.items or 0
    if evaluated is True:
        return None
    cxt.items = True
    schema_path = f"{cxt.path}/unevaluatedItems"
    if isinstance(evaluated, _Slot):  # known only at run time; Ajv compares the length with it
        index = evaluated.index
        if schema is False:
            def variable_check(data, path, errors, frame):
                count = frame[index]
                if count is None or len(data) <= count:  # JavaScript: n > undefined is false
                    return True
                return _fail(errors, "unevaluatedItems",
                             f"must NOT have more than {js_string(count)} items", path, schema_path)
            return variable_check
        if _always_valid(cxt, schema, "unevaluatedItems"):
            return None
        child = cxt.subschema(schema, "unevaluatedItems", new_data=True).check

        def variable_items_check(data, path, errors, frame):
            count = frame[index]
            if count is None or count is not True:
                return count is None or _each_item(child, count)(data, path, errors, frame)
            if len(data) <= 1:  # JavaScript compares the length with true as with 1 ...
                return True
            mark = 0 if errors is None else len(errors)  # ... and counts from true: data[true]
            if not child(_MISSING, None if errors is None else f"{path}/true", errors, frame) and (
                    errors is None):  # is undefined, then items 2, 3...
                return False
            return _each_item(child, 2)(data, path, errors, frame) and (
                errors is None or len(errors) == mark)
        return variable_items_check
    if schema is False:
        message = f"must NOT have more than {evaluated} items"
        return lambda data, path, errors, frame: len(data) <= evaluated or _fail(
            errors, "unevaluatedItems", message, path, schema_path)
    if _always_valid(cxt, schema, "unevaluatedItems"):
        return None
    return _each_item(cxt.subschema(schema, "unevaluatedItems", new_data=True).check, evaluated)


# ---- Keywords for objects ---------------------------------------------------------------------

#: Names every JavaScript object has through its prototype: Ajv's strictRequired check finds them in
#: any ``properties`` (``props?.[name] === undefined`` is false for them).
_PROTOTYPE_NAMES = frozenset((
    "constructor", "__defineGetter__", "__defineSetter__", "hasOwnProperty", "__lookupGetter__",
    "__lookupSetter__", "isPrototypeOf", "propertyIsEnumerable", "toString", "valueOf",
    "__proto__", "toLocaleString"))


def _schema_names(schemas) -> list:
    """Ajv's allSchemaProperties: a map's keys in JavaScript order, except __proto__."""
    return [name for name in js_key_order(schemas) if name != "__proto__"] if type(
        schemas) is dict else []


def _keyword_required(cxt: _Cxt, names, group):
    _check_schema_type(cxt, "required", names, "array")
    if not names:
        return None
    properties = cxt.schema.get("properties")
    for name in names:  # strictRequired: every required name must be defined
        if type(name) is not str:
            cxt.problem("required", "required must hold property names")
        defined = type(properties) is dict and (name in properties or name in _PROTOTYPE_NAMES)
        if not defined and name not in cxt.defined:
            cxt.problem("required", f'required property "{name}" has no schema in "properties" '
                                    f'here (strictRequired)')
    names, schema_path, all_names = tuple(names), f"{cxt.path}/required", frozenset(names)
    messages = {name: f"must have required property '{name}'" for name in names}

    def check(data, path, errors, frame):
        if data.keys() >= all_names:
            return True
        valid = True
        for name in names:
            if name not in data:
                if errors is None:
                    return False
                errors.append(_Error("required", messages[name], path, schema_path, name))
                valid = False
        return valid

    return check


def _keyword_property_names(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "propertyNames", schema, "object", "boolean")
    if _always_valid(cxt, schema, "propertyNames"):
        return None
    name_check = cxt.subschema(schema, "propertyNames", new_data=True).check
    schema_path = f"{cxt.path}/propertyNames"

    def check(data, path, errors, frame):
        if errors is None:
            return all(name_check(key, None, None, frame) for key in data)
        mark = len(errors)
        for key in js_key_order(data):
            if not name_check(key, path, errors, frame):
                errors.append(_Error("propertyNames", "property name must be valid", path,
                                     schema_path))
        return len(errors) == mark

    return check


def _keyword_additional_properties(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "additionalProperties", schema, "object", "boolean")
    cxt.props = True
    if _always_valid(cxt, schema, "additionalProperties"):
        return None
    parent = cxt.schema
    names = frozenset(_schema_names(parent.get("properties")))
    patterns = tuple(cxt.rule.pattern(cxt, "patternProperties", source).search
                     for source in _schema_names(parent.get("patternProperties")))
    schema_path = f"{cxt.path}/additionalProperties"
    if schema is False:
        message = "must NOT have additional properties"

        def closed_check(data, path, errors, frame):
            if errors is None:
                return names.issuperset(data) or all(
                    key in names or any(search(key) for search in patterns) for key in data)
            valid = True
            for key in js_key_order(data):
                if key not in names and not any(search(key) for search in patterns):
                    errors.append(_Error("additionalProperties", message, path, schema_path, key))
                    valid = False
            return valid

        return closed_check
    value_check = cxt.subschema(schema, "additionalProperties", new_data=True).check

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        for key in (data if errors is None else js_key_order(data)):
            if key in names or any(search(key) for search in patterns):
                continue
            at = None if errors is None else f"{path}/{pointer_token(key)}"
            if not value_check(data[key], at, errors, frame) and errors is None:
                return False
        return errors is None or len(errors) == mark

    return check


def _keyword_properties(cxt: _Cxt, schemas, group):
    _check_schema_type(cxt, "properties", schemas, "object")
    names = _schema_names(schemas)
    cxt.defined.update(names)
    merges = cxt.merge("props", frozenset(names)) if (
        cxt.rule.tracking and names and cxt.props is not True) else []
    checked = []
    for name in names:
        if _always_valid(cxt, schemas[name]):
            continue
        child = cxt.subschema(schemas[name], "properties", name, new_data=True)
        cxt.defined.add(name)
        checked.append((name, child.check, "/" + pointer_token(name)))
    checked = tuple(checked)
    quick = tuple((name, value_check) for name, value_check, _ in checked)

    def check(data, path, errors, frame):
        if merges:
            _run(merges, frame)
        if errors is None:
            for name, value_check in quick:
                if name in data and not value_check(data[name], None, None, frame):
                    return False
            return True
        mark = len(errors)
        for name, value_check, token in checked:
            if name in data:
                value_check(data[name], path + token, errors, frame)
        return len(errors) == mark

    return check if checked or merges else None


def _keyword_pattern_properties(cxt: _Cxt, schemas, group):
    _check_schema_type(cxt, "patternProperties", schemas, "object")
    rule = cxt.rule
    sources = _schema_names(schemas)
    always = [source for source in sources if _always_valid(cxt, schemas[source])]
    if not sources or (len(always) == len(sources) and (not rule.tracking or cxt.props is True)):
        return None
    defined = cxt.schema.get("properties")
    merges = []
    if cxt.props is not True and not isinstance(cxt.props, _Slot):
        slot = cxt.function.new_slot()
        merges.append(_initialise(slot, cxt.props if cxt.props is not None else frozenset()))
        cxt.props = slot
    props = cxt.props
    record = rule.tracking and props is not True
    index = props.index if isinstance(props, _Slot) else None
    patterns = []
    for source in sources:
        search = rule.pattern(cxt, "patternProperties", source).search
        for name in (defined if type(defined) is dict else ()):
            if search(name):
                cxt.problem("patternProperties", f"property {name} matches pattern {source} "
                                                 f"(use allowMatchingProperties; strict mode)")
        value_check = None if source in always else cxt.subschema(
            schemas[source], "patternProperties", source, new_data=True).check
        patterns.append((search, value_check))

    def check(data, path, errors, frame):
        if merges:
            _run(merges, frame)
        keys = js_key_order(data) if record or errors is not None else data
        if errors is None:  # as Ajv without allErrors: a name is recorded even when its value
            failed = False  # fails, and only the last name checked decides whether to go on
            for search, value_check in patterns:
                last = True
                for key in keys:
                    if not search(key):
                        continue
                    if value_check is not None:
                        last = value_check(data[key], None, None, frame)
                        failed = failed or not last
                    if record:
                        _record(frame, index, key)
                    elif not last:
                        break
                if not last:
                    return False
            return not failed
        mark = len(errors)
        for search, value_check in patterns:
            for key in keys:
                if search(key):
                    if value_check is not None:
                        value_check(data[key], f"{path}/{pointer_token(key)}", errors, frame)
                    if record:
                        _record(frame, index, key)
        return len(errors) == mark

    return check


def _record(frame, index: int, name: str):
    """Ajv's ``props[key] = true`` for patternProperties; on an undefined variable it throws."""
    evaluated = frame[index]
    if evaluated is None:
        raise _Crash("Cannot set properties of undefined")
    if evaluated is not True:
        evaluated.add(name)


def _dependency_message(name: str, dependencies: list) -> str:
    noun = "property" if len(dependencies) == 1 else "properties"
    return f"must have {noun} {', '.join(dependencies)} when property {name} is present"


def _property_dependencies(cxt: _Cxt, keyword: str, dependencies: Dict[str, list]):
    """dependentRequired, and the lists of dependencies: one error per missing property."""
    schema_path = f"{cxt.path}/{keyword}"
    rules = []
    for name, needed in dependencies.items():
        if type(needed) is not list:
            cxt.problem(keyword, f"{keyword} must map names to lists of names")
        if needed:
            rules.append((name, tuple(needed), _dependency_message(name, needed)))
    if not rules:
        return None

    def check(data, path, errors, frame):
        valid = True
        for name, needed, message in rules:
            if name in data:
                for other in needed:
                    if other not in data:
                        if errors is None:
                            return False
                        errors.append(_Error(keyword, message, path, schema_path))
                        valid = False
        return valid

    return check


def _schema_dependencies(cxt: _Cxt, keyword: str, schemas: dict):
    """dependentSchemas, and the schemas of dependencies: applied when the property is there."""
    parts = []
    for name in js_key_order(schemas):
        if _always_valid(cxt, schemas[name]):
            continue
        child = cxt.subschema(schemas[name], keyword, name, new_data=False)
        parts.append((name, child.check, cxt.merge_if_valid(child) or ()))
    if not parts:
        return None

    def check(data, path, errors, frame):
        mark = 0 if errors is None else len(errors)
        for name, part, merges in parts:
            if name in data:
                if part(data, path, errors, frame):
                    if merges:
                        _run(merges, frame)
                elif errors is None:
                    return False
        return errors is None or len(errors) == mark

    return check


def _keyword_dependencies(cxt: _Cxt, dependencies, group):
    _check_schema_type(cxt, "dependencies", dependencies, "object")
    names = [name for name in js_key_order(dependencies) if name != "__proto__"]
    lists = {name: dependencies[name] for name in names if type(dependencies[name]) is list}
    schemas = {name: dependencies[name] for name in names if type(dependencies[name]) is not list}
    checks = [check for check in (_property_dependencies(cxt, "dependencies", lists),
                                  _schema_dependencies(cxt, "dependencies", schemas)) if check]
    return _sequence(checks) if checks else None


def _keyword_dependent_required(cxt: _Cxt, dependencies, group):
    _check_schema_type(cxt, "dependentRequired", dependencies, "object")
    return _property_dependencies(cxt, "dependentRequired",
                                  {name: dependencies[name] for name in js_key_order(dependencies)})


def _keyword_dependent_schemas(cxt: _Cxt, schemas, group):
    _check_schema_type(cxt, "dependentSchemas", schemas, "object")
    return _schema_dependencies(cxt, "dependentSchemas", schemas)


def _keyword_unevaluated_properties(cxt: _Cxt, schema, group):
    _check_schema_type(cxt, "unevaluatedProperties", schema, "object", "boolean")
    evaluated = cxt.props
    cxt.props = True
    if evaluated is True:
        return None
    schema_path = f"{cxt.path}/unevaluatedProperties"
    value_check = None
    if schema is not False and not _always_valid(cxt, schema, "unevaluatedProperties"):
        value_check = cxt.subschema(schema, "unevaluatedProperties", new_data=True).check
    elif schema is not False:
        return None
    index = evaluated.index if isinstance(evaluated, _Slot) else None
    known = evaluated if isinstance(evaluated, frozenset) else frozenset()
    message = "must NOT have unevaluated properties"

    def check(data, path, errors, frame):
        names = known
        if index is not None:
            names = frame[index]
            if names is True:
                return True
            names = names or ()
        mark = 0 if errors is None else len(errors)
        for key in (data if errors is None else js_key_order(data)):
            if key in names:
                continue
            if value_check is None:
                if errors is None:
                    return False
                errors.append(_Error("unevaluatedProperties", message, path, schema_path, key))
            elif not value_check(data[key], None if errors is None else
                                 f"{path}/{pointer_token(key)}", errors, frame) and errors is None:
                return False
        return errors is None or len(errors) == mark

    return check


def _keyword_recursive_anchor(cxt: _Cxt, value, group):
    """$recursiveAnchor: true: the first schema entered with it becomes the target of
    ``$recursiveRef: "#"`` for the rest of the validation (Ajv's dynamicAnchor, lib/vocabularies/
    dynamic): the current function when the schema is its root, else a function compiled for it."""
    _check_schema_type(cxt, "$recursiveAnchor", value, "boolean")
    if not value:
        cxt.problem("$recursiveAnchor", "$recursiveAnchor: false is ignored (strict mode)")
    rule = cxt.rule
    rule.recursive_anchor = True
    if cxt.schema is cxt.function.schema and cxt.path == "#":
        target = cxt.function
    else:
        target = _Function(cxt.schema, rule.root.base, cxt.pointer, rule.anchors)
        target_cxt = _Cxt(rule, target, cxt.schema, "#", cxt.pointer, rule.root.base, set())
        target.finish(_compile_schema(target_cxt), target_cxt.props, target_cxt.items)

    def check(data, path, errors, frame):
        frame[0].setdefault("", target)
        return True

    return check


def _keyword_recursive_ref(cxt: _Cxt, reference, group):
    """$recursiveRef: "#": the first $recursiveAnchor target of this validation if a
    $recursiveAnchor was compiled before it, else the current function (Ajv's dynamicRef)."""
    _check_schema_type(cxt, "$recursiveRef", reference, "string")
    if not reference.startswith("#"):
        cxt.problem("$recursiveRef", '"$recursiveRef" only supports hash fragment reference')
    current, anchor = cxt.function, reference[1:]
    if anchor == "" and cxt.rule.recursive_anchor:
        return _call_function(cxt, None, lambda frame: frame[0].get("", current))
    return _call_function(cxt, None, lambda frame: current)


def _keyword_nullable(cxt: _Cxt, nullable, group):
    _check_schema_type(cxt, "nullable", nullable, "boolean")  # read by _schema_types
    return None


def _keyword_id(cxt: _Cxt, value, group):
    cxt.problem("id", 'NOT SUPPORTED: keyword "id", use "$id" for schema ID')


def _keyword_unsupported(keyword: str):
    def compile_unsupported(cxt: _Cxt, value, group):
        cxt.problem(keyword, f"{keyword} cannot be checked here (Ajv would check it)")
    return compile_unsupported


#: Keyword name -> compile function ``(cxt, value, group) -> check or None``.
_KEYWORDS = {
    "const": _keyword_const,
    "enum": _keyword_enum,
    "not": _keyword_not,
    "anyOf": _keyword_any_of,
    "oneOf": _keyword_one_of,
    "allOf": _keyword_all_of,
    "if": _keyword_if,
    "then": _keyword_then_else("then"),
    "else": _keyword_then_else("else"),
    "$ref": _keyword_ref,
    "$recursiveRef": _keyword_recursive_ref,
    "$recursiveAnchor": _keyword_recursive_anchor,
    "$dynamicRef": _keyword_unsupported("$dynamicRef"),
    "$dynamicAnchor": _keyword_unsupported("$dynamicAnchor"),
    "id": _keyword_id,
    "nullable": _keyword_nullable,
    **{keyword: _keyword_limit(keyword) for keyword in _LIMITS},
    "multipleOf": _keyword_multiple_of,
    "maxLength": _keyword_count("maxLength", "characters"),
    "minLength": _keyword_count("minLength", "characters"),
    "pattern": _keyword_pattern,
    "format": _keyword_format,
    **{keyword: _keyword_format_limit(keyword) for keyword in _FORMAT_LIMITS},
    "maxItems": _keyword_count("maxItems", "items"),
    "minItems": _keyword_count("minItems", "items"),
    "additionalItems": _keyword_additional_items,
    "items": _keyword_items,
    "contains": _keyword_contains,
    "uniqueItems": _keyword_unique_items,
    "maxContains": _keyword_contains_limit("maxContains"),
    "minContains": _keyword_contains_limit("minContains"),
    "unevaluatedItems": _keyword_unevaluated_items,
    "maxProperties": _keyword_count("maxProperties", "properties"),
    "minProperties": _keyword_count("minProperties", "properties"),
    "required": _keyword_required,
    "propertyNames": _keyword_property_names,
    "additionalProperties": _keyword_additional_properties,
    "dependencies": _keyword_dependencies,
    "properties": _keyword_properties,
    "patternProperties": _keyword_pattern_properties,
    "dependentRequired": _keyword_dependent_required,
    "dependentSchemas": _keyword_dependent_schemas,
    "unevaluatedProperties": _keyword_unevaluated_properties,
}


# -- One rule: Ajv's instance, the meta-schema, $ref resolution ------------------------------------

_REF_KEYWORDS = frozenset(("$ref", "$recursiveRef", "$recursiveAnchor", "$dynamicRef",
                           "$dynamicAnchor"))
_ANCHOR = re.compile(r"[A-Za-z_][-A-Za-z0-9._]*\Z")
#: Keys json-schema-traverse does not walk into when Ajv collects a rule's $id (resolve.ts).
_NOT_SUBSCHEMAS = frozenset((
    "default", "enum", "const", "required", "maximum", "minimum", "exclusiveMaximum",
    "exclusiveMinimum", "multipleOf", "maxLength", "minLength", "pattern", "format", "maxItems",
    "minItems", "uniqueItems", "maxProperties", "minProperties"))
_SCHEMA_LISTS = frozenset(("items", "allOf", "anyOf", "oneOf"))
_SCHEMA_MAPS = frozenset(("$defs", "definitions", "properties", "patternProperties",
                          "dependencies"))


def _normalize_id(uri: str) -> str:
    """Ajv's normalizeId: without a final "#" or "#/"."""
    return re.sub(r"#/?\Z", "", uri)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986, section 5.2.4."""
    output: List[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(output) > 1:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if path.endswith(("/.", "/..")):
        output.append("")
    return "/".join(output)


def _resolve_uri(base: str, reference: str) -> str:
    """A reference resolved against a base URI (RFC 3986, section 5.2), as Ajv resolves ``$id``
    and ``$ref``; both without a final "#"."""
    reference = _normalize_id(reference)
    if not base:
        return reference
    target = urllib.parse.urlsplit(reference)
    origin = urllib.parse.urlsplit(base)
    if target.scheme:
        parts = (target.scheme, target.netloc, _remove_dot_segments(target.path), target.query)
    elif target.netloc:
        parts = (origin.scheme, target.netloc, _remove_dot_segments(target.path), target.query)
    elif not target.path:
        parts = (origin.scheme, origin.netloc, origin.path,
                 target.query if "?" in reference else origin.query)
    elif target.path.startswith("/"):
        parts = (origin.scheme, origin.netloc, _remove_dot_segments(target.path), target.query)
    else:
        directory = origin.path[:origin.path.rfind("/") + 1] if origin.path else (
            "/" if origin.netloc else "")
        parts = (origin.scheme, origin.netloc, _remove_dot_segments(directory + target.path),
                 target.query)
    resolved = urllib.parse.urlunsplit(parts + ("",))
    return _normalize_id(resolved + ("#" + target.fragment if target.fragment else ""))


def _mentions(value, key: str) -> bool:
    """Whether a key appears anywhere in a JSON value."""
    if type(value) is dict:
        return key in value or any(_mentions(item, key) for item in value.values())
    return type(value) is list and any(_mentions(item, key) for item in value)


def _has_ref(schema) -> bool:
    """Ajv's hasRef: a $ref anywhere inside (then a $ref target is compiled apart, not inlined)."""
    if type(schema) is dict:
        return any(key in _REF_KEYWORDS or _has_ref(value) for key, value in schema.items())
    if type(schema) is list:
        return any(_has_ref(item) for item in schema)
    return False


class _Rule:
    """One rule being compiled: the Ajv instance rudder-transformer picks for it (Ajv2019, or
    ajv-draft-04), its meta-schema, the ids it declares, and the functions its $refs need."""

    def __init__(self, schema: dict, pointer: str):
        self.pointer = pointer
        declared = schema.get("$schema", _MISSING)
        if declared is not _MISSING and type(declared) is not str:
            raise _Problem(f"{pointer}/$schema", "$schema must be a string")
        self.draft4 = declared is not _MISSING and "draft-04" in declared
        uris = _DRAFT4_URIS if self.draft4 else _SCHEMA_URIS
        if declared is _MISSING:
            meta = "draft-04" if self.draft4 else "2019-09"
        elif _normalize_id(declared) in uris:
            meta = uris[_normalize_id(declared)]
        else:
            raise _Problem(f"{pointer}/$schema", f'no schema with key or ref "{declared}" '
                                                 f"(Ajv knows no such meta-schema)")
        self.groups = _GROUPS_DRAFT4 if self.draft4 else _GROUPS_2019
        self.rules = frozenset(key for _, keywords in self.groups for key in keywords) | {
            "type", "$comment"}
        self.known = self.rules | frozenset(_INERT_DRAFT4 if self.draft4 else _INERT_2019)
        self.id_keyword = "id" if self.draft4 else "$id"
        self.tracking = not self.draft4  # Ajv2019 tracks evaluated properties and items
        self.quick = True  # a verdict-only first look at an event agrees with collecting errors
        found = _meta_problem(schema, _META_SCHEMAS[meta], pointer)
        if found:
            raise _Problem(*found)
        root_id = schema.get(self.id_keyword)
        base = _normalize_id(root_id) if type(root_id) is str else ""
        self.anchors = _mentions(schema, "$recursiveAnchor")  # a frame place for the targets
        self.recursive_anchor = False  # a $recursiveAnchor was compiled (Ajv: root.dynamicAnchors)
        self.root = _Function(schema, base, pointer, self.anchors)
        # Ajv's registry of the rule's ids (getSchemaRefs): an absolute id maps to the JSON Pointer
        # of its schema inside the rule ("fullPath"), the rule's own id to the rule; ids and anchors
        # that stay fragments ("#foo", when the rule has no id) are "local refs".
        self.document = base.partition("#")[0]
        self.refs: Dict[str, str] = {} if base.startswith("#") else {base: ""}  # even for ""
        self.local: Dict[str, Tuple[object, str]] = {}
        self._collect_ids(schema, "", base, set())
        self.functions: Dict[Tuple[int, str], _Function] = {}
        self.patterns: Dict[str, object] = {}

    def _collect_ids(self, schema, at: str, base: str, seen: set):
        """Walk the rule as json-schema-traverse does for Ajv's getSchemaRefs; ``at`` is the JSON
        Pointer inside the rule."""
        if type(schema) is not dict:
            return
        if at:  # the rule's own id is registered apart
            declared = schema.get(self.id_keyword)
            if type(declared) is str:
                base = self._add_ref(declared, base, schema, at, seen)
            for anchor_keyword in ("$anchor", "$dynamicAnchor"):
                anchor = schema.get(anchor_keyword)
                if type(anchor) is str:
                    if not _ANCHOR.match(anchor):
                        raise _Problem(f"{self.pointer}{at}/{anchor_keyword}",
                                       f'invalid anchor "{anchor}"')
                    self._add_ref("#" + anchor, base, schema, at, seen)
        for key, value in schema.items():
            inner = f"{at}/{pointer_token(key)}"
            if type(value) is list:
                if key in _SCHEMA_LISTS:
                    for index, item in enumerate(value):
                        self._collect_ids(item, f"{inner}/{index}", base, seen)
            elif key in _SCHEMA_MAPS:
                if type(value) is dict:
                    for name, item in value.items():
                        self._collect_ids(item, f"{inner}/{pointer_token(name)}", base, seen)
            elif key not in _NOT_SUBSCHEMAS:
                self._collect_ids(value, inner, base, seen)

    def _add_ref(self, reference: str, base: str, schema, at: str, seen: set) -> str:
        uri = _normalize_id(_resolve_uri(base, reference) if base else reference)
        if uri in seen:
            raise _Problem(f"{self.pointer}{at}", f'reference "{uri}" resolves to more than one '
                                                  f"schema")
        seen.add(uri)
        if uri != _normalize_id(self.document + "#" + at):
            if uri.startswith("#"):
                self.local[uri] = (schema, at)
            else:
                self.refs[uri] = self.document + "#" + at
        return uri

    def pattern(self, cxt: _Cxt, keyword: str, source: str):
        """A pattern compiled once per rule (Ajv caches its RegExps too)."""
        if source not in self.patterns:
            try:
                self.patterns[source] = compile_pattern(source)
            except PatternError as error:
                cxt.problem(keyword, str(error))
        return self.patterns[source]

    def resolve(self, cxt: _Cxt, reference: str):
        """A $ref target (lib/compile/index.ts, resolveRef): (schema, pointer) to compile in
        place, or a _Function to call."""
        full = _resolve_uri(cxt.base, reference)
        target = self._resolve(cxt, full)
        if target is None and full in self.local:
            schema, at = self.local[full]
            target = (schema, self.pointer + at, cxt.base)
        if target is None:
            cxt.problem("$ref", f"can't resolve reference {reference} from id {cxt.base or '#'}")
        schema, pointer, base = target
        if not _has_ref(schema):
            return schema, pointer
        if schema is self.root.schema and base == self.root.base:
            return self.root
        key = (id(schema), base)
        if key not in self.functions:
            function = self.functions[key] = _Function(schema, base, pointer, self.anchors)
            function_cxt = _Cxt(self, function, schema, "#", pointer, base, set())
            check = _compile_schema(function_cxt)
            function.finish(check, function_cxt.props, function_cxt.items)
        return self.functions[key]

    def _resolve(self, cxt: _Cxt, uri: str):
        """Ajv's ``resolve``: follow the registry to a pointer, then resolveSchema."""
        while uri in self.refs and self.refs[uri] != "":
            uri = self.refs[uri]
        if uri in self.refs:  # the rule itself, by its id
            return self.root.schema, self.pointer, self.root.base
        return self._resolve_schema(cxt, uri, set())

    def _resolve_schema(self, cxt: _Cxt, uri: str, seen: set):
        """Ajv's resolveSchema: a pointer into the rule, or into a schema found by its id. Ajv
        recurses without end on some chains of ids and $refs (and throws "Maximum call stack size
        exceeded", so RudderStack lets the events through); those are refused here too."""
        if uri in seen:
            cxt.problem("$ref", "Ajv's resolution of this $ref never ends (Maximum call stack "
                                "size exceeded)")
        seen.add(uri)
        document, _, fragment = uri.partition("#")
        if document == self.document and self.root.schema:
            return self._json_pointer(cxt, fragment, (self.root.schema, self.pointer,
                                                      self.root.base), seen)
        registered = self.refs.get(document)
        if registered is None:
            return None
        if registered == "":
            start = self.root.schema, self.pointer, self.root.base
        else:
            start = self._resolve_schema(cxt, registered, seen)
            if start is None or type(start[0]) is not dict:
                return None
        if document == uri:
            return start
        return self._json_pointer(cxt, fragment, start, seen)

    def _json_pointer(self, cxt: _Cxt, fragment: str, start, seen: set):
        """Ajv's getJsonPointer: follow a fragment's JSON Pointer from a schema, the base URI
        changing at each $id on the way, and on through a schema that is only a $ref."""
        if not fragment.startswith("/"):
            return None
        schema, pointer, base = start
        for token in fragment[1:].split("/"):
            if type(schema) is bool:
                return None
            token = urllib.parse.unquote(token).replace("~1", "/").replace("~0", "~")
            if type(schema) is dict and token in schema:
                schema = schema[token]
            elif type(schema) is list and token.isdigit() and int(token) < len(schema):
                schema = schema[int(token)]
            else:
                return None
            pointer = f"{pointer}/{pointer_token(token)}"
            declared = schema.get(self.id_keyword) if type(schema) is dict else None
            if declared and type(declared) is str and token not in (
                    "properties", "patternProperties", "enum", "dependencies", "definitions"):
                base = _resolve_uri(base, declared)
        found = None
        if type(schema) is dict and schema.get("$ref") and type(schema["$ref"]) is str and not any(
                key != "$ref" and key in self.rules for key in schema):
            found = self._resolve_schema(cxt, _resolve_uri(base, schema["$ref"]), seen)
        found = found or (schema, pointer, base)
        return None if found[0] is self.root.schema else found

    def compile(self):
        """The rule's check, compiled as Ajv compiles the rule's function."""
        cxt = _Cxt(self, self.root, self.root.schema, "#", self.pointer, self.root.base, set())
        check = _compile_schema(cxt)
        self.root.finish(check, cxt.props, cxt.items)
        return check, self.root


# -- Tracking plans: shapes, matching, violations --------------------------------------------------


class PlanUnusable(ValueError):
    """The file is not JSON or not one of the plan shapes; str() is one line for the user."""


class _Compiled(NamedTuple):
    """One reachable rule: its check and function, or the problem that stops Ajv compiling it.
    ``quick``: an event may first be checked for its verdict only (errors only if it fails)."""

    check: Optional[Callable]
    function: Optional[_Function]
    problem: Optional[str]
    quick: bool = True


_NO_SCHEMA = None  # a rule lookup that finds nothing (or nothing usable): "no schema for event"


def _js_identity(value):
    """A dict key under which two JSON values are JavaScript-``===``: RudderStack matches event
    names with ``===`` (a number 5 is not the name "5"); objects and arrays never match."""
    if value is _MISSING:
        return ("undefined",)
    if value is None or type(value) in (str, bool):
        return (type(value).__name__, value)
    if type(value) in (int, float):
        return ("number", float(value))
    return None


def _is_empty_rule(rule) -> bool:
    """rudder-transformer's ``!eventSchema || Object.keys(eventSchema).length === 0``."""
    if rule is _MISSING or rule is None or rule is False or rule == "" or (
            type(rule) in (int, float) and (rule == 0 or rule != rule)):
        return True
    return type(rule) not in (dict, str, list) or len(rule) == 0


class TrackingPlan:
    """A loaded plan: every reachable rule compiled once; ``violations`` checks one event.

    ``id`` and ``version`` are what rudder-server writes as ``context.trackingPlanId`` and
    ``context.trackingPlanVersion``; ``problems`` has one line per rule Ajv would refuse to
    compile (its events pass unchecked, as in RudderStack). Thread-safe: checking mutates nothing.
    """

    def __init__(self, plan_id: str, version, rules: Dict[tuple, _Compiled], problems: List[str]):
        self.id = plan_id
        self.version = version
        self.problems = problems
        self._rules = rules  # (event type, _js_identity(name)) -> rule
        #: The verdict of a conforming event, and its members as JSON, made once.
        self.conforming = {"trackingPlanId": plan_id, "trackingPlanVersion": version,
                           "violationErrors": []}
        self.conforming_json = encode_json(self.conforming)[1:-1]
        self._tracks = {identity[1]: compiled for (event_type, identity), compiled in rules.items()
                        if event_type == "track" and identity[0] == "str"}  # the usual lookup

    def violations(self, event: dict) -> List[dict]:
        """rudder-transformer's violations for one event (``[]`` when it conforms): Ajv's errors
        mapped as ``src/util/eventValidation.js`` maps them, or one ``Unplanned-Event`` for a track
        without a rule. Alias and unknown types are never checked."""
        event_type = event.get("type")
        if event_type == "track":
            name = event.get("event", _MISSING)
            compiled = self._tracks.get(name) if type(name) is str else self._rules.get(
                ("track", _js_identity(name)))
        elif type(event_type) is str and event_type in CHECKED_EVENT_TYPES:
            name = ""
            compiled = self._rules.get((event_type, ("str", "")))
        else:
            return []
        if compiled is _NO_SCHEMA:
            if event_type != "track":
                return []
            return [{"type": UNPLANNED_EVENT, "message": f"no schema for event: {js_string(name)}",
                     "meta": {}}]
        if compiled.check is None:
            return []
        function = compiled.function
        if compiled.quick:
            try:
                if compiled.check(event, "", None, function.new_frame()):
                    return []
            except (_Crash, RecursionError):
                pass  # the full run below decides, as Ajv's (which collects all errors) would
        errors: List[_Error] = []
        try:
            compiled.check(event, "", errors, function.new_frame())
        except (_Crash, RecursionError):
            return []  # Ajv throws; rudder-transformer reports nothing for the event
        return [_violation(error) for error in errors]


def _violation(error: _Error) -> dict:
    """One Ajv error as rudder-transformer reports it (``validate`` in eventValidation.js)."""
    kind = VIOLATION_TYPES.get(error.keyword, UNKNOWN_VIOLATION)
    meta = {"instancePath": error.instance_path, "schemaPath": error.schema_path}
    if kind == "Additional-Properties":
        return {"type": kind, "message": f"{error.message} '{error.property}'",
                "property": error.property, "meta": meta}
    if kind == "Required-Missing":
        return {"type": kind, "message": error.message, "property": error.property, "meta": meta}
    return {"type": kind, "message": error.message, "meta": meta}


def _compile_rule(rule, pointer: str) -> _Compiled:
    """A rule as rudder-transformer compiles it: its ``version`` key removed, a string ``$schema``
    naming draft-04 sending it to ajv-draft-04, any compile error letting its events through."""
    if type(rule) is not dict:
        return _Compiled(None, None, f"{pointer}: a rule must be a JSON Schema object")
    rule = {key: value for key, value in rule.items() if key != "version"}
    try:
        compiler = _Rule(rule, pointer)
        check, function = compiler.compile()
    except _Problem as problem:
        return _Compiled(None, None, str(problem))
    except RecursionError:
        return _Compiled(None, None, f"{pointer}: the rule nests too deeply to compile here")
    if _js_truthy(rule.get("$async")):  # Ajv returns a Promise, truthy: "valid" for the transformer
        return _Compiled(_always, function, None)
    return _Compiled(check, function, None, compiler.quick)


def _rule_entries(plan: dict) -> List[Tuple[str, object, object, str]]:
    """(event type, name, rule, JSON pointer of the rule) for every lookup a plan answers, in the
    order RudderStack searches (the first match wins); a missing rule is ``_MISSING``."""
    if "events" in plan:  # the API's shape (rudder-transformer checks it first)
        events = plan["events"]
        if type(events) is not list:
            raise PlanUnusable('not a tracking plan: "events" must be a list')
        entries = []
        for index, entry in enumerate(events):
            if type(entry) is not dict:
                raise PlanUnusable(f"not a tracking plan: events[{index}] is not an object")
            entries.append((entry.get("eventType", _MISSING), entry.get("name", _MISSING),
                            entry.get("rules", _MISSING), f"/events/{index}/rules"))
        return entries
    rules = plan.get("rules")
    if type(rules) is not dict:
        raise PlanUnusable('not a tracking plan: neither "events" (a list) nor "rules" (an object)')
    entries = [(event_type, "", rules[event_type], f"/rules/{event_type}")
               for event_type in CHECKED_EVENT_TYPES
               if event_type != "track" and event_type in rules]
    events = rules.get("events", [])
    if type(events) is not list:
        raise PlanUnusable('not a tracking plan: "rules.events" must be a list')
    for index, entry in enumerate(events):
        if type(entry) is not dict:
            raise PlanUnusable(f"not a tracking plan: rules.events[{index}] is not an object")
        event_type = entry.get("eventType", "track")  # RudderTyper's plan.json names the type
        name = entry.get("name", _MISSING)
        if event_type != "track" and name != "":
            continue
        entries.append((event_type, name, entry.get("rules", _MISSING),
                        f"/rules/events/{index}/rules"))
    return entries


def load_tracking_plan(source, default_id: str) -> TrackingPlan:
    """A parsed plan file (any of RudderStack's shapes) compiled for checking events.

    ``default_id`` names the plan when it has no ``id`` (the file name without its extension).
    Raises PlanUnusable when ``source`` is not a plan; a rule Ajv would refuse is not an error
    but a line of ``problems``.
    """
    if type(source) is not dict:
        raise PlanUnusable("not a tracking plan: the file must hold a JSON object")
    plan_id = source.get("id")
    if plan_id is None or plan_id == "":
        plan_id = default_id
    if type(plan_id) is not str:
        raise PlanUnusable('not a tracking plan: "id" must be a string')
    version = source.get("version")
    if version is not None and not _is_integer(version):
        raise PlanUnusable('not a tracking plan: "version" must be an integer')
    rules: Dict[tuple, _Compiled] = {}
    problems = []
    for event_type, name, rule, pointer in _rule_entries(source):
        if type(event_type) is not str or event_type not in CHECKED_EVENT_TYPES:
            continue  # no event can ask for this entry
        key = (event_type, _js_identity(name))
        if key in rules or key[1] is None:
            continue  # an earlier entry answers this lookup (or none can)
        if _is_empty_rule(rule):
            rules[key] = _NO_SCHEMA
            continue
        compiled = _compile_rule(rule, pointer)
        rules[key] = compiled
        if compiled.problem:
            who = f'track "{js_string(name)}"' if event_type == "track" else event_type
            problems.append(f"{who}: {compiled.problem}")
    return TrackingPlan(plan_id, int(version) if version is not None else None, rules, problems)


class Verdict(NamedTuple):
    """An event's verdict as rudder-server writes it into the event's context downstream of its
    gateway, its members as JSON, and its violations as lines for people."""

    fields: dict  # trackingPlanId, trackingPlanVersion, violationErrors (empty when it conforms)
    members_json: bytes  # '"trackingPlanId":...,"violationErrors":[...]'
    violations: Tuple[str, ...]  # 'Datatype-Mismatch at /properties/price: must be number'


def plan_verdict(plan: TrackingPlan, event: dict) -> Verdict:
    errors = plan.violations(event)
    if not errors:
        return Verdict(plan.conforming, plan.conforming_json, ())
    fields = {**plan.conforming, "violationErrors": errors}
    return Verdict(fields, encode_json(fields)[1:-1], tuple(
        f"{error['type']} at {error['meta'].get('instancePath') or '/'}: {error['message']}"
        for error in errors))


def read_plan_file(path: str):
    """The tracking plan in a file; the plan's id defaults to the file's name without extension.
    Why a file cannot be used starts with its path (the one given: it may be relative)."""
    try:
        with open(path, "rb") as file:
            content = file.read()
    except OSError as error:
        raise PlanUnusable(f"{path}: {error.strerror or error}") from None
    try:
        document = parse_json(content)
    except Rejection:
        raise PlanUnusable(f"{path}: not JSON") from None
    try:
        return load_tracking_plan(document, os.path.splitext(os.path.basename(path))[0])
    except PlanUnusable as error:
        raise PlanUnusable(f"{path}: {error}") from None


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
        if plan.problems and self.strict:
            where = f"{self.path}: " if self.path else ""
            raise PlanUnusable(f"{where}{plan.problems[0]} (--strict refuses a rule it cannot "
                               f"check)")
        for problem in plan.problems:
            logger.warning("tracking plan: %s; its events pass unchecked", problem)
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
        except PlanUnusable as error:
            logger.warning("tracking plan changed but cannot be used (%s); still checking with the "
                           "previous one", error)
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
    only ever holds whole lines. With a ``printer`` (``--print``), the same lines are handed to it
    in the same order, under the same lock.

    With ``fsync="always"``, requests share fsyncs (group commit): a writer whose lines are not yet
    on disk either starts an fsync that covers every line written so far, or waits for the one in
    progress and then the next, instead of paying for its own. """

    def __init__(self, data_dir: str, rotate_bytes: int, fsync: str,
                 printer: Optional["EventPrinter"] = None):
        self.data_dir = data_dir
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self.printer = printer
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
            if self.printer is not None:
                self.printer.put(lines)

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
        while not self._closed.wait(FSYNC_INTERVAL_SECONDS):
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
            self.fsyncs += 1
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


#: How much --print may hold for a reader that does not keep up; beyond it, lines are skipped.
PRINT_BACKLOG_BYTES = 16 * 1024 * 1024


class EventPrinter:
    """``--print``: the stored lines, on standard output, in the order they were stored.

    A thread of its own writes them, so that a reader that stops reading (a pager left paused, a
    stuck ``jq``) holds up nothing but the printing. What waits for it is bounded: past
    PRINT_BACKLOG_BYTES, lines are skipped (they are in the file) and that is said on standard
    error, as is a reader that went away (``| head``), which ends the printing, not the server.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self._waiting: collections.deque = collections.deque()
        self._waiting_bytes = 0
        self._skipped = 0  # events not printed since the reader last kept up
        self._stopped = False
        self._changed = threading.Condition()
        threading.Thread(target=self._print_forever, name="rudderlite-print", daemon=True).start()

    def put(self, lines: bytes) -> None:
        """Hand over one request's lines; never waits for the reader."""
        with self._changed:
            if self._stopped:
                return
            if self._waiting_bytes + len(lines) > PRINT_BACKLOG_BYTES:
                if not self._skipped:
                    logger.warning("standard output is not being read: skipping events in --print "
                                   "until it is (they are stored all the same)")
                self._skipped += lines.count(b"\n")
                return
            self._waiting.append(lines)
            self._waiting_bytes += len(lines)
            self._changed.notify_all()

    def _print_forever(self) -> None:
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                lines = self._waiting.popleft()
            try:
                self._write(lines)
            except OSError as error:
                with self._changed:
                    self._stopped = True
                    self._waiting.clear()
                    self._changed.notify_all()
                logger.warning("stopped printing events: standard output failed (%s)",
                               error.strerror or error)
                return
            with self._changed:
                self._waiting_bytes -= len(lines)
                if self._skipped and not self._waiting:
                    logger.warning("printing again; skipped %d events", self._skipped)
                    self._skipped = 0
                self._changed.notify_all()

    def _write(self, lines: bytes) -> None:
        view = memoryview(lines)
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self, seconds: float) -> None:
        """Wait up to ``seconds`` for what waits to be printed (the server is stopping)."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while self._waiting_bytes and not self._stopped and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())


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
    data: bytes  # the stored line of an event (without its newline), or a rejection as JSON
    warnings: Tuple[str, ...]  # an event's contract violations
    valid: bool  # an event with no contract warning and no plan violation


class Query(NamedTuple):
    """What /rudderlite/events and /rudderlite/rejected were asked for (README: the inspection
    API)."""

    filters: Tuple[Tuple[Tuple[str, ...], frozenset, frozenset], ...] = ()  # see wanted_values
    after: Optional[int] = None  # only what was recorded after this cursor
    limit: Optional[int] = None  # at most this many: the newest, or with ``after`` the first
    wait: float = 0.0  # hold the answer up to this many seconds ...
    minimum: int = 1  # ... until this many match
    valid: Optional[bool] = None  # only events with (False) or without (True) any violation


class Found(NamedTuple):
    """An answer of the history: the matching entries, the cursor to follow them with, and whether
    the bounded history dropped something recorded after the cursor it was asked about."""

    entries: List[Entry]
    cursor: int
    missed: bool


class KeyCounts:
    """What /rudderlite/stats says of one key, and the newest cursor of each of its lists that the
    bounded history dropped."""

    def __init__(self):
        self.accepted: collections.Counter = collections.Counter()
        self.rejected: collections.Counter = collections.Counter()
        self.valid = self.invalid = 0
        self.dropped_through = {"events": 0, "rejected": 0}


class History:
    """The recent accepted events and rejections, bounded in count and bytes, with one sequence of
    cursors for both.

    Events are kept as their stored lines (compact bytes, decoded only when asked for), so the bound
    in bytes is close to the memory they take. One lock guards it all and is only ever held
    briefly: decoding and filtering happen outside it. A long-poll (``wait=``) waits on a condition
    of its own write key, so an event wakes only the polls of its key, and on waking looks only at
    what is newer than what it already saw: waiting costs the senders nothing, and a poll costs in
    proportion to what is new for it, not to the history.
    """

    def __init__(self, max_events: int, max_bytes: int):
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        #: "events" and "rejected": their entries, oldest first.
        self._lists: Dict[str, collections.deque] = {"events": collections.deque(),
                                                     "rejected": collections.deque()}
        self._bytes = 0  # of the events
        # Cursors start from the time in microseconds, so those of a later run are larger still.
        self._last_cursor = time.time_ns() // 1000
        self._counts: "collections.OrderedDict[bytes, KeyCounts]" = collections.OrderedDict()
        self._all_keys = KeyCounts()  # of every key: what it dropped
        self._waiting: Dict[Optional[bytes], threading.Condition] = {}  # key -> its polls' ...
        self._pollers: collections.Counter = collections.Counter()  # ... and how many they are
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

    def _append(self, kind: str, entry: Entry) -> None:
        self._lists[kind].append(entry)
        for waiting in (self._waiting.get(entry.key), self._waiting.get(None)):
            if waiting is not None:  # the polls of this key, and those of every key, look again
                waiting.notify_all()

    def _drop_oldest(self, kind: str) -> Entry:
        dropped = self._lists[kind].popleft()
        self._all_keys.dropped_through[kind] = dropped.cursor
        if dropped.key in self._counts:
            self._counts[dropped.key].dropped_through[kind] = dropped.cursor
        return dropped

    def record_accepted(self, key: bytes, events: List[StoredEvent]) -> None:
        with self._lock:
            counts = self._counts_of(key)
            for event in events:
                self._last_cursor += 1
                valid = not (event.warnings or event.violations)
                line = event.line[:-1]  # without its newline, so an answer shows it as it is
                entry = Entry(self._last_cursor, key, line, event.warnings, valid)
                self._append("events", entry)
                self._bytes += entry_size(entry)
                counts.accepted[event.type if event.type in EVENT_TYPES else "other"] += 1
                counts.valid += valid
                counts.invalid += not valid
            while len(self._lists["events"]) > self.max_events or self._bytes > self.max_bytes:
                self._bytes -= entry_size(self._drop_oldest("events"))

    def record_rejected(self, key: bytes, record: dict) -> None:
        with self._lock:
            self._counts_of(key).rejected[str(record["status"])] += 1
            self._last_cursor += 1
            self._append("rejected", Entry(self._last_cursor, key, encode_json(record), (), False))
            if len(self._lists["rejected"]) > MAX_REJECTIONS:
                self._drop_oldest("rejected")

    def find(self, kind: str, key: Optional[bytes], query: Query) -> Found:
        """This key's events or rejections (every key's for None) that match the query, oldest
        first, held until ``query.minimum`` of them are there when asked to wait. Each turn looks
        only at what was recorded since the previous one."""
        deadline = time.monotonic() + min(query.wait, MAX_WAIT_SECONDS)
        seen = query.after or 0
        found: List[Entry] = []
        missed = False
        while True:
            new, newly_missed, seen = self._entries_after(kind, key, seen)
            missed = missed or newly_missed
            found += [entry for entry in new if matching(entry, RECORD_JSON[kind], query)]
            remaining = deadline - time.monotonic()
            if len(found) >= query.minimum or remaining <= 0:
                break
            if not self._wait_for_news(key, seen, remaining):
                break
        return limited(found, seen, missed and query.after is not None, query)

    def _entries_after(self, kind: str, key: Optional[bytes],
                       seen: int) -> Tuple[List[Entry], bool, int]:
        """The entries of this key recorded after cursor ``seen``; whether the history dropped any
        of them first; and the cursor that this look reaches."""
        with self._lock:
            entries = self._lists[kind]
            counts = self._counts.get(key) if key is not None else None
            # A key whose counts were forgotten (a thousand other keys came since) may have lost
            # anything the history dropped.
            dropped_through = (counts or self._all_keys).dropped_through[kind]
            missed = dropped_through > seen
            if seen > self._last_cursor:  # a cursor from a clock set back: follow from the start
                seen, missed = 0, True
            if not entries or entries[0].cursor > seen:
                newer = list(entries)  # all of them: a copy is quicker than a walk
            else:
                newer = []
                for entry in reversed(entries):
                    if entry.cursor <= seen:
                        break
                    newer.append(entry)
                newer.reverse()
            mine = [entry for entry in newer if key is None or entry.key == key]
            return mine, missed, self._last_cursor

    def _wait_for_news(self, key: Optional[bytes], seen: int, seconds: float) -> bool:
        """Wait until something is recorded for this key after ``seen``; False once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._last_cursor != seen:
                return True  # recorded while the last turn was looking: look again
            waiting = self._waiting.setdefault(key, threading.Condition(self._lock))
            self._pollers[key] += 1
            try:
                waiting.wait(seconds)
            finally:
                self._pollers[key] -= 1
                if not self._pollers[key]:  # the last poll of this key: forget its condition
                    del self._pollers[key], self._waiting[key]
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
            for entries in self._lists.values():
                kept = [entry for entry in entries if entry.key != key]
                entries.clear()
                entries.extend(kept)
            self._bytes = sum(map(entry_size, self._lists["events"]))
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


def event_json(entry: Entry) -> bytes:
    """An event as /rudderlite/events shows it: its stored line, plus its contract warnings."""
    if not entry.warnings:
        return entry.data
    return entry.data[:-1] + b',"warnings":' + encode_json(list(entry.warnings)) + b"}"


def rejection_json(entry: Entry) -> bytes:
    return entry.data


#: How the entries of each list of the history are shown.
RECORD_JSON = {"events": event_json, "rejected": rejection_json}


def decoded(entry: Entry, record_json: Callable[[Entry], bytes]) -> Optional[dict]:
    """An entry as a dict, or None for an event nested too deep to decode here (the stack of this
    call is deeper than the one that took it in)."""
    try:
        return json.loads(record_json(entry))
    except RecursionError:
        return None


def matching(entry: Entry, record_json: Callable[[Entry], bytes], query: Query) -> bool:
    """Whether an entry passes the query's ``valid`` and filters; it is only decoded for filters."""
    if query.valid is not None and entry.valid != query.valid:
        return False
    if not query.filters:
        return True
    record = decoded(entry, record_json)
    return record is not None and all(field_matches(record, path, texts, numbers)
                                      for path, texts, numbers in query.filters)


def field_matches(record: dict, path: Tuple[str, ...], texts: frozenset,
                  numbers: frozenset) -> bool:
    """Whether the value at ``path`` (``properties.orderId``) is one of the wanted ones: a string
    one of the ``texts``, a number one of the ``numbers`` (``1`` finds ``1.0``), anything else
    its compact JSON one of the ``texts``."""
    value = record
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    if isinstance(value, str):
        return value in texts
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value in numbers
    return encode_json(value).decode("utf-8") in texts


def wanted_values(texts) -> Tuple[frozenset, frozenset]:
    """A filter's wanted values, as texts and, those that are numbers, as numbers: turned once per
    query, not once per event."""
    numbers = set()
    for text in texts:
        with contextlib.suppress(ValueError):
            numbers.add(_finite_float(text))
    return frozenset(texts), frozenset(numbers)


def limited(found: List[Entry], seen: int, missed: bool, query: Query) -> Found:
    """Apply ``limit``: without ``after`` the newest N; with it the first N, the cursor then
    standing after the last one returned, so that a client that follows cursors sees everything
    once, in order."""
    cursor = seen
    if query.limit is not None and len(found) > query.limit:
        if query.after is None:
            found = found[len(found) - query.limit:]
        else:
            found = found[:query.limit]
            cursor = found[-1].cursor if found else query.after
    return Found(found, cursor, missed)


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
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([!-~\x80-\xff]+) (HTTP/1\.[01])\r?\n")
ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A header line, without its LF: a name, then a value of no control character but the tab, then
# the CR (RFC 9110 §5.5; RFC 9112 §2.2 and §5.2: no bare CR, no folded line).
HEADER_FIELD = re.compile("(" + TOKEN.decode() + r"):([^\x00-\x08\x0a-\x1f\x7f]*)\r?")
#: What may not be echoed into a header or a log line: control characters, and the format and
#: separator characters that reorder or break a line on a terminal.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                                "\u2060-\u2069\ufeff]")
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
    takes_events: bool = False
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

    Folded header lines (obs-fold) and bare CRs are refused, as RFC 9112 §5.2 and §2.2 allow. The
    body's framing is read here too, since the connection's fate depends on it whatever the answer.
    """
    parsed = REQUEST_LINE.fullmatch(request_line)
    if not parsed:
        raise Rejection(BAD_REQUEST, close=True)
    method, target, version = (part.decode("latin-1") for part in parsed.groups())
    headers: Dict[str, str] = {}
    for line in header_block.decode("latin-1").split("\n")[:-2]:  # the empty line, and after it
        field = HEADER_FIELD.fullmatch(line)
        if not field:
            raise Rejection(BAD_REQUEST, close=True)
        name, value = field.group(1).lower(), field.group(2).strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    request = Request(method, target, version, headers, peer_ip, url=split_target(target))
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


def split_target(target: str) -> urllib.parse.SplitResult:
    """The path and query of a request target (RFC 9112 §3.2). Only a target that begins with a
    scheme is absolute-form, with an authority (which takes the place of Host); any other is a path:
    ``//127.0.0.1/x`` is the path ``//127.0.0.1/x``, not a host."""
    if ABSOLUTE_FORM.match(target):
        with contextlib.suppress(ValueError):  # such as an unclosed "[": then it is no route
            return urllib.parse.urlsplit(target)
        return urllib.parse.SplitResult("", "", "", "", "")
    path, _, query = target.partition("?")
    return urllib.parse.SplitResult("", "", path, query, "")


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


@functools.lru_cache(maxsize=None)  # a handful of statuses
def status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"


@functools.lru_cache(maxsize=1)  # one date a second, not one a request
def http_date(second: int) -> str:
    """The ``Date`` header value (RFC 9110 §6.6.1) for a Unix time in whole seconds."""
    return email.utils.formatdate(second, usegmt=True)


def header_safe(value: str) -> str:
    """A text fit to echo in a header or a log line: no CR, LF or other control character."""
    return CONTROL_CHARACTERS.sub("", value)


HOST_AND_PORT = re.compile(r"(?:\[(?P<literal>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::[0-9]*)?")


def host_name(value: str) -> str:
    """The host of a ``Host`` header or a target's authority: without its port, in lower case, a
    name without the trailing dot of a fully qualified one. What is no host at all is returned as
    it is, and so is never allowed."""
    value = value.strip().lower()
    if is_ip_address(value):  # an IPv6 address without brackets
        return value
    parts = HOST_AND_PORT.fullmatch(value)
    if not parts:
        return value
    return parts["literal"] if parts["literal"] is not None else parts["name"].rstrip(".")


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)  # a client sends the same Host again and again
def local_host(host: str, allowed_names: Tuple[str, ...]) -> bool:
    """Whether a ``Host`` (or an absolute-form target's authority) names this machine."""
    return host_allowed(host_name(host), allowed_names)


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
        return shown(event.type) if isinstance(event.type, str) else "?"

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
    """Who sent the events: their userIds (two, and how many more), and their anonymousIds too for
    a single event or when none has a userId."""
    users = list(dict.fromkeys(event.user_id for event in events if event.user_id))
    anonymous = list(dict.fromkeys(event.anonymous_id for event in events if event.anonymous_id))
    named = [("user", users)]
    if len(events) == 1 or not users:
        named.append(("anonymous", anonymous))
    parts = [f"{label} {first_two(ids)}" for label, ids in named if ids]
    return " · " + ", ".join(parts) if parts else ""


def first_two(ids: List[str]) -> str:
    return ", ".join(map(shown, ids[:2])) + (f" +{len(ids) - 2}" if len(ids) > 2 else "")


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
    every request that brought events, and every refused one (with its query, keys blanked)."""
    if request.accepted:
        return f"{status} {header_safe(request.url.path)} {events_summary(request.accepted)}"
    if status < 400:
        return None
    target = loggable_target(request.target) or "-"
    detail = request.refusal.detail if request.refusal else ""
    return f"{status} {request.method or '-'} {target} {message}" + (
        f" ({shown_problem(detail)})" if detail else "")


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
    logger.info("%s", header_safe(summary), extra={"tone": tone})


###############################################################################
# HTTP: the request handler
###############################################################################


class Response(NamedTuple):
    """An answer, made by the endpoint or the refusal, written by ``RequestHandler.send``."""

    status: int
    body: Union[bytes, Tuple[bytes, ...]] = b""  # one piece, or pieces written one after another
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
    takes_events: bool = False  # its refusals are recorded for /rudderlite/rejected


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
        **{f"/v1/{event_type}": Endpoint(("POST",), "accept_single", "header", True)
           for event_type in EVENT_TYPES},
        "/v1/batch": Endpoint(("POST",), "accept_batch", "header", True),
        "/beacon/v1/batch": Endpoint(("POST",), "accept_batch", "query", True),  # sendBeacon
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
            request.takes_events = endpoint.takes_events
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
        if host and not local_host(host, self.server.config.allow_hosts):
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
        """The answer to a refused request. A refused request to an event endpoint is recorded
        for /rudderlite/rejected under its write key, once the key is known and allowed (before
        that, nobody may read it); refusals of the inspection API itself are not, so that the list
        says only what an app sent."""
        request.refusal = rejection
        if request.write_key is not None and request.takes_events:
            self.server.history.record_rejected(key_digest(request.write_key), {
                "status": rejection.answer.status,
                "message": rejection.answer.message,
                **({"detail": rejection.detail} if rejection.detail else {}),
                "path": request.url.path[:REJECTED_PREVIEW_BYTES],
                "receivedAt": utc_now(),
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
        """Write the answer: status line, headers and body (none for HEAD or 204) in one send, or
        for a body of many pieces, in sends of about 64 KiB; then log the request's line, which so
        costs the client no time."""
        pieces = (response.body,) if isinstance(response.body, bytes) else response.body
        lines = [status_line(response.status), f"Date: {http_date(int(time.time()))}"]
        if response.status != 204:
            lines += [f"Content-Type: {response.content_type}",
                      f"Content-Length: {sum(map(len, pieces))}"]
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
        send_size, waiting = len(head), [head]
        for piece in pieces if request.method != "HEAD" else ():
            if send_size + len(piece) > 65536:
                self.wfile.write(b"".join(waiting))
                send_size, waiting = 0, []
            send_size += len(piece)
            waiting.append(piece)
        self.wfile.write(b"".join(waiting))
        log_answer(request, response.status, b"".join(pieces).decode("utf-8", "replace")
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

    def read_body(self, request: Request, limit: int, gzipped: bool) -> bytes:
        """The body as sent, refused while it is read once it passes ``limit`` (or what can carry
        ``limit`` inflated bytes): 413 before any parsing. Once it is read, the server's work
        begins and no deadline cuts it short."""
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
        return raw

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
        limit = config.max_event_bytes if type_from_path else config.max_batch_bytes
        gzipped = request.headers.get("content-encoding", "").strip().lower() in ("gzip", "x-gzip")
        body = self.read_body(request, limit, gzipped)
        with server.parsing.reserve(limit if gzipped else len(body)):  # what it may become
            if gzipped:
                body = inflate_gzip(body, limit)
                request.body_preview = body[:REJECTED_PREVIEW_BYTES]
            received_at = utc_now()
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
        return self.inspect("events", request)

    def inspect_rejected(self, request: Request) -> Response:
        return self.inspect("rejected", request)

    def inspect(self, kind: str, request: Request) -> Response:
        """``{"events": [...], "cursor": N, "missed": false}`` (or ``"rejected"``), made of the
        stored lines as they are: nothing is decoded to answer, and the answer is written piece by
        piece, so a client that reads it slowly holds no copy of the history."""
        found = self.server.history.find(kind, key_digest(request.write_key),
                                         parse_query(request.url.query))
        record_json = RECORD_JSON[kind]
        parts = [b'{"%s":[' % kind.encode()]
        for number, entry in enumerate(found.entries):
            parts += [b"," if number else b"", record_json(entry)]
        parts.append(b'],"cursor":%d,"missed":%s}' % (found.cursor,
                                                       b"true" if found.missed else b"false"))
        return Response(200, tuple(parts), "application/json")

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
    return Query(filters=tuple((path, *wanted_values(values)) for path, values in filters.items()),
                 after=query_number(options, "after", None),
                 limit=query_number(options, "limit", None),
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
    if not DECIMAL_NUMBER.fullmatch(text) or len(text) > 18:
        raise Rejection(BAD_QUERY, "wait takes seconds, such as 5 or 0.5")
    return float(text)


DECIMAL_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


###############################################################################
# The server
###############################################################################

#: At shutdown, how long requests in flight may take to finish.
SHUTDOWN_GRACE_SECONDS = 10.0
#: At shutdown, how long --print may take to print what waits for it.
PRINT_FLUSH_SECONDS = 5.0
#: How often the watchdog looks for connections past their deadline.
WATCHDOG_SECONDS = 0.25


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
            printer = EventPrinter(sys.stdout.fileno()) if config.print_events else None
            self.store = EventStore(config.data_dir, config.rotate_bytes, config.fsync, printer)
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
        if self.connections.closing:
            return self.shutdown_request(request)  # stopping: as if it came a moment later
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
        self.connections.close_idle()  # first: every answer from now on says Connection: close
        self._wakeup_writer.send(b"\0")
        if self._serving is not None:
            self._serving.join()
        self.socket.close()
        self.history.close()  # long-polls answer now with what they have
        self.connections.wait_until_closed(grace)
        self.store.close()
        if self.store.printer is not None:
            self.store.printer.flush(PRINT_FLUSH_SECONDS)
        self._wakeup_reader.close()
        self._wakeup_writer.close()

    # -- embedding: what /rudderlite/events answers, without HTTP ---------------------------------

    @property
    def cursor(self) -> int:
        """The cursor of the newest event or rejection: ``received(after=server.cursor)`` later
        returns only what came after now."""
        return self.history.cursor

    def received(self, write_key: Optional[str] = None, *, after: Optional[int] = None,
                 valid: Optional[bool] = None, **filters) -> List[dict]:
        """The events sent with ``write_key`` (any key for None) that match the filters, oldest
        first, as /rudderlite/events answers them: ``received("KEY", event="Signed Up")``."""
        return self.events_of(write_key, embedded_query(after, filters)._replace(valid=valid))

    def wait_for(self, write_key: Optional[str] = None, count: int = 1, *, timeout: float = 10.0,
                 after: Optional[int] = None, valid: Optional[bool] = None,
                 **filters) -> List[dict]:
        """Like ``received()``, but waits until at least ``count`` events match: SDKs send from a
        background thread a moment after the app calls them. Raises AssertionError, saying what did
        arrive, when they do not come within ``timeout`` seconds."""
        query = embedded_query(after, filters)._replace(wait=timeout, minimum=count, valid=valid)
        events = self.events_of(write_key, query)
        if len(events) < count:
            arrived = self.events_of(write_key, embedded_query(after, {}))
            others = len(self.events_of(None, embedded_query(after, {}))) - len(arrived)
            raise AssertionError(
                f"waited {timeout} s for {count} event(s) matching {filters}, {len(events)} came; "
                f"all that arrived with this key: {arrived[-20:]}"
                + (f"; {others} more arrived with other keys" if others else ""))
        return events

    def events_of(self, write_key: Optional[str], query: Query) -> List[dict]:
        found = self.history.find("events", embedded_key(write_key), query)
        events = (decoded(entry, event_json) for entry in found.entries)
        return [event for event in events if event is not None]

    def __exit__(self, *exc_info) -> None:
        self.stop()


def embedded_key(write_key: Optional[str]) -> Optional[bytes]:
    return None if write_key is None else key_digest(write_key)


def embedded_query(after: Optional[int], filters: dict) -> Query:
    """The Query of keyword filters: a dotted path as a name (``**{"properties.plan": "pro"}``), any
    JSON value as the wanted one."""
    wanted = {name: value if isinstance(value, str) else encode_json(value).decode("utf-8")
              for name, value in filters.items()}
    return Query(filters=tuple((tuple(name.split(".")), *wanted_values([value]))
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
        return f"cannot use --tracking-plan {error}"  # which starts with the file's path
    if getattr(error, "filename", None):
        return (f"cannot use --data-dir {config.data_dir}: {error.strerror or error}; give a "
                f"directory rudderlite may write to, or one that does not exist yet")
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
    if server.plans.path:
        plan = server.plans.current()
        logger.info("checking events against tracking plan %s, version %s, from %s",
                    plan.id, plan.version, server.plans.path)
    stop_requests.recv(1)
    for signal_number in STOP_SIGNALS:  # a second signal while stopping, or while Python exits,
        signal.signal(signal_number, signal.SIG_IGN)  # must not kill the process half-way
    server.stop()
    logger.info("stopped; every event answered 200 is in %s", os.path.abspath(config.data_dir))
    return 0


###############################################################################
# The live page: GET /rudderlite/
###############################################################################

# What ``GET /rudderlite/`` serves: one page, with nothing loaded from anywhere else, that follows
# /rudderlite/events and /rudderlite/rejected with cursors and long-polls (README: See events as
# they arrive). It only ever shows event data as text.

LIVE_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rudderlite: live events</title>
<link rel="icon" href="data:,">
<style>
  :root { --text: #1f2328; --muted: #656d76; --line: #d8dee4; --soft: #f6f8fa; --red: #cf222e;
          --amber: #9a6700; --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
  * { box-sizing: border-box; }
  html, body { height: 100%; margin: 0; }
  body { display: flex; flex-direction: column; color: var(--text);
         font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
  button, input { font: inherit; padding: 4px 10px; border: 1px solid var(--line);
                  border-radius: 6px; background: #fff; color: var(--text); }
  button { cursor: pointer; }
  button:hover { background: var(--soft); }
  code, .mono { font-family: var(--mono); font-size: 12px; }
  [hidden] { display: none !important; }

  header, #session, nav { display: flex; align-items: center; gap: 16px; padding: 0 16px; }
  header { height: 48px; border-bottom: 1px solid var(--line); background: var(--soft); }
  header h1 { margin: 0; font-size: 16px; }
  header h1 span, .hint { color: var(--muted); font-weight: normal; }
  #session { flex: 1; padding: 0; }
  #status { flex: 1; margin: 0; color: var(--muted); }
  #status::before { content: "\25CF"; margin-right: 6px; }   /* a dot */
  #status.live::before { color: #1a7f37; }
  #status.paused::before { color: var(--amber); }
  #status.error { color: var(--red); }
  #change-key { border: 0; padding: 0 4px; background: none; color: #0969da; }

  #key-form { width: 460px; margin: 80px auto; padding: 8px 24px 24px;
              border: 1px solid var(--line); border-radius: 8px; }
  #key-form input { width: 100%; margin-bottom: 12px; }
  #key-error { color: var(--red); }

  main { flex: 1; display: flex; flex-direction: column; min-height: 0; }
  nav { height: 48px; gap: 8px; border-bottom: 1px solid var(--line); }
  nav .tab { border-color: transparent; }
  nav .tab[aria-selected="true"] { border-color: var(--line); background: var(--soft);
                                   font-weight: 600; }
  nav .tab span { margin-left: 6px; color: var(--muted); font-weight: normal; }
  #filter { width: 280px; margin-left: auto; }
  .hint { font-size: 12px; }
  #missed { margin: 0; padding: 6px 16px; background: #fff8c5; border-bottom: 1px solid #eac54f; }
  .panes { flex: 1; display: flex; min-height: 0; }
  .list { flex: 1; overflow: auto; }
  aside { width: 400px; overflow: auto; padding: 12px 16px; border-left: 1px solid var(--line);
          background: var(--soft); }
  aside h2 { margin: 0 0 8px; font-size: 14px; overflow-wrap: anywhere; }
  aside ul { margin: 0 0 12px; padding-left: 18px; }
  aside pre { margin: 0; font: 12px/1.5 var(--mono); white-space: pre-wrap;
              overflow-wrap: anywhere; }
  li.warning { color: var(--amber); }
  li.violation { color: var(--red); }
  .empty { margin: 0; padding: 12px 16px; color: var(--muted); }
  .empty code { display: block; margin-top: 6px; color: var(--text); }
  aside .empty { padding: 0; }

  table { width: 100%; border-collapse: collapse; table-layout: fixed; }
  th { position: sticky; top: 0; background: #fff; text-align: left; font-size: 12px;
       color: var(--muted); border-bottom: 1px solid var(--line); }
  th, td { padding: 5px 8px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  td { border-bottom: 1px solid #eef1f4; }
  tbody tr { cursor: pointer; }
  tbody tr:hover { background: var(--soft); }
  /* an event with warnings or violations */
  tr.flagged { background: #fff5f5; box-shadow: inset 3px 0 var(--red); }
  tbody tr.selected { background: #ddf4ff; }
  td.time { font-family: var(--mono); font-size: 12px; color: var(--muted); }
  td .anonymous { color: var(--muted); }
  td span:not(:empty) + .anonymous { margin-left: 8px; }
  .type { padding: 1px 7px; border-radius: 10px; font-size: 12px; background: #eaeef2; }
  .type[data-type="track"] { background: #ddf4ff; color: #0550ae; }
  .type[data-type="identify"] { background: #fbefff; color: #8250df; }
  .type[data-type="page"] { background: #dafbe1; color: #116329; }
  .type[data-type="screen"] { background: #d8f3f0; color: #0a6158; }
  .type[data-type="group"] { background: #fff1e5; color: #953800; }
  .badge { display: inline-block; min-width: 20px; margin-right: 6px; padding: 0 6px;
           border-radius: 10px; color: #fff; font-size: 11px; font-weight: 600; text-align: center;
           background: var(--red); }
  .badge.warning { background: #bf8700; }
</style>
</head>
<body>
<header>
  <h1>rudderlite <span>live events</span></h1>
  <div id="session" hidden>
    <span>key <code id="key-name"></code><button id="change-key">change</button></span>
    <p id="status" role="status"></p>
    <button id="pause" aria-pressed="false">Pause</button>
    <button id="reset" title="Forget this key's events and refusals, here and on the server">
      Reset</button>
  </div>
</header>

<form id="key-form" hidden>
  <h2>Which write key?</h2>
  <p>This page shows, as they arrive, the events sent with one write key (the user name of their
    Basic auth).</p>
  <p id="key-error" hidden></p>
  <input id="key-input" name="writeKey" placeholder="write key" autocomplete="off" required>
  <button type="submit">Show events</button>
</form>

<main id="app" hidden>
  <nav>
    <button class="tab" id="tab-events" aria-selected="true">
      Events<span id="count-events"></span></button>
    <button class="tab" id="tab-rejected" aria-selected="false">
      Refused<span id="count-rejected"></span></button>
    <input id="filter" type="search" placeholder="Filter: any text in the JSON" aria-label="Filter">
    <span class="hint">Newest on top, at most 1,000 rows per list</span>
  </nav>
  <p id="missed" hidden>The server's history dropped some records before this page could fetch
    them; the events are still in the data directory's <code>events*.jsonl</code> files.</p>
  <div class="panes">
    <section class="list">
      <table id="events">
        <colgroup><col style="width: 104px"><col style="width: 84px"><col style="width: 24%">
          <col style="width: 23%"><col></colgroup>
        <thead><tr><th>Time</th><th>Type</th><th>Name</th><th>User id, anonymous id</th>
          <th>Problems</th></tr></thead>
        <tbody></tbody>
      </table>
      <table id="rejected" hidden>
        <colgroup><col style="width: 104px"><col style="width: 60px"><col style="width: 100px">
          <col style="width: 24%"><col><col style="width: 24%"></colgroup>
        <thead><tr><th>Time</th><th>Status</th><th>Path</th><th>Message</th><th>Detail</th>
          <th>Body</th></tr></thead>
        <tbody></tbody>
      </table>
      <p id="empty" class="empty"></p>
    </section>
    <aside>
      <p id="detail-empty" class="empty">Click a row to see all of it.</p>
      <h2 id="detail-title"></h2>
      <ul id="detail-problems"></ul>
      <pre id="detail-json"></pre>
    </aside>
  </div>
</main>

<script>
"use strict";
// The page follows /rudderlite/events and /rudderlite/rejected with long-polls: the first request
// asks for the newest records, each next one for what came after the cursor of the answer before,
// and the server holds it until something arrives. Event data is whatever a client sent: it reaches
// the page as text only (textContent, title, dataset), never as markup.

const MAX_ROWS = 1000;     // rows kept per list; the oldest go first
const HOLD_SECONDS = 25;   // how long the server may hold a request while nothing new arrives
const $ = (id) => document.getElementById(id);

// Per list: what to call it, how many old records to show first, how to draw one, what waits.
const lists = {
  events: {name: "events", first: 200, makeRow: eventRow, waiting: []},
  rejected: {name: "refusals", first: 100, makeRow: refusalRow, waiting: []},
};
const recordOf = new WeakMap();   // <tr> -> {kind, item, text}: text is what the filter searches
let writeKey = null;
let run = null;            // AbortController of the current requests; new on reset and new keys
let paused = false;
let shownKind = "events";
let connecting = false;    // from opening a key until its first answer
let problem = "";          // what went wrong, shown in the status line until the next answer

// ---- Talking to rudderlite ----

function authorization(key) {
  // btoa takes only Latin-1 characters, so the key goes in as its UTF-8 bytes.
  return "Basic " + btoa(String.fromCharCode(...new TextEncoder().encode(key + ":")));
}

async function api(method, path, signal) {
  const response = await fetch(path, {method, signal, cache: "no-store",
                                      headers: {Authorization: authorization(writeKey)}});
  const body = await response.text();
  if (!response.ok) {
    const error = new Error(body.trim() || `HTTP ${response.status}`);
    throw Object.assign(error, {status: response.status});
  }
  return JSON.parse(body);
}

function sleep(milliseconds, signal) {   // ends early when the run is stopped
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, milliseconds);
    signal.addEventListener("abort", done);
  });
}

// Follows one list until the run stops: every record once, in order, through lost connections.
async function follow(kind, signal) {
  let cursor = null;
  let failures = 0;
  while (!signal.aborted) {
    const held = cursor !== null;
    const query = held ? `after=${cursor}&wait=${HOLD_SECONDS}&min=1&limit=500`
                       : `limit=${lists[kind].first}`;
    const started = Date.now();
    let answer;
    try {
      answer = await api("GET", `/rudderlite/${kind}?${query}`, signal);
    } catch (error) {
      if (signal.aborted) return;
      if (error.status === 401) return askForKey(error.message);
      failures += 1;
      const seconds = Math.min(30, 2 ** (failures - 1));   // 1, 2, 4 ... 30 s between attempts
      showProblem(`Reading ${lists[kind].name} failed (${error.message}); ` +
                  `trying again in ${seconds} s`);
      await sleep(seconds * 1000, signal);
      continue;
    }
    if (signal.aborted) return;
    failures = 0;
    connecting = false;
    showProblem("");
    if (held && answer.cursor < cursor) {   // cursors only grow: the server restarted; begin again
      cursor = null;
      continue;
    }
    cursor = answer.cursor;
    if (answer.missed) $("missed").hidden = false;
    receive(kind, answer[kind]);
    // Never spin: when a held request is answered at once with nothing, wait a second.
    if (held && answer[kind].length === 0 && Date.now() - started < 1000) await sleep(1000, signal);
  }
}

function start() {
  stop();
  run = new AbortController();
  for (const kind in lists) follow(kind, run.signal);
}

function stop() {
  if (run) run.abort();
  run = null;
}

// ---- Rows ----

// Any value as one line of text: a string as it is, anything else as JSON.
const text = (value) =>
  value == null ? "" : typeof value === "string" ? value : JSON.stringify(value);

function element(tag, className, content = "") {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = content;
  return node;
}

function cell(row, content = "", className = "") {
  const td = element("td", className, content);
  td.title = content;   // all of it, when the cell cuts it short
  row.append(td);
  return td;
}

function localTime(iso) {
  const date = new Date(iso);
  const pad = (number, width = 2) => String(number).padStart(width, "0");
  return isNaN(date) ? text(iso) : `${pad(date.getHours())}:${pad(date.getMinutes())}:` +
                                   `${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

// What names an event of each type (the fields the contract checks ask for).
const NAME_FIELDS = {track: "event", page: "name", screen: "name", group: "groupId",
                     alias: "previousId"};

function nameOf(event) {
  const field = NAME_FIELDS[event.type];
  const prefix = {groupId: "group ", previousId: "previously "}[field] || "";
  return field && event[field] != null ? prefix + text(event[field]) : "";
}

// The contract warnings and the tracking plan's violations of an event, one line each.
function problemsOf(event) {
  const warnings = Array.isArray(event.warnings) ? event.warnings : [];
  const violations = event.context?.violationErrors;
  return warnings.map((warning) => ({kind: "warning", line: text(warning)})).concat(
    (Array.isArray(violations) ? violations : []).map((violation) => {
      const where = violation?.meta?.instancePath || violation?.property;
      const line = `${text(violation?.type)}${where ? " at " + text(where) : ""}: ` +
                   text(violation?.message);
      return {kind: "violation", line};
    }));
}

function eventRow(event) {
  const row = element("tr", "");
  cell(row, localTime(event.receivedAt), "time").title = text(event.receivedAt);
  const type = cell(row).appendChild(element("span", "type", text(event.type)));
  type.dataset.type = text(event.type);
  cell(row, nameOf(event));
  const [userId, anonymousId] = [text(event.userId), text(event.anonymousId)];
  const ids = cell(row, "", "");
  ids.append(element("span", "", userId), element("span", "anonymous", anonymousId));
  ids.title = `${userId} ${anonymousId}`.trim();
  const problems = problemsOf(event);
  const problemsCell = cell(row);
  for (const kind of ["warning", "violation"]) {
    const count = problems.filter((found) => found.kind === kind).length;
    if (count) problemsCell.append(element("span", `badge ${kind}`, String(count)));
  }
  if (problems.length) {
    row.classList.add("flagged");
    problemsCell.append(problems[0].line);
    problemsCell.title = problems.map((found) => found.line).join("\n");
  }
  return row;
}

function refusalRow(refusal) {
  const row = element("tr", "");
  cell(row, localTime(refusal.receivedAt), "time").title = text(refusal.receivedAt);
  cell(row).append(element("span", "badge", text(refusal.status)));
  cell(row, text(refusal.path), "mono");
  cell(row, text(refusal.message));
  cell(row, text(refusal.detail));
  cell(row, text(refusal.body), "mono");
  return row;
}

const rowsOf = (kind) => $(kind).tBodies[0];

function addRow(kind, item) {
  const row = lists[kind].makeRow(item);
  row.tabIndex = 0;
  recordOf.set(row, {kind, item, text: JSON.stringify(item).toLowerCase()});
  row.hidden = !matchesFilter(row);
  rowsOf(kind).prepend(row);
  if (rowsOf(kind).rows.length > MAX_ROWS) rowsOf(kind).lastElementChild.remove();
}

function receive(kind, items) {
  if (paused) {
    const waiting = lists[kind].waiting;
    waiting.push(...items);
    waiting.splice(0, waiting.length - MAX_ROWS);   // more could not be shown anyway
  } else {
    items.forEach((item) => addRow(kind, item));
  }
  update();
}

function matchesFilter(row) {
  const wanted = $("filter").value.trim().toLowerCase();
  return !wanted || recordOf.get(row).text.includes(wanted);
}

function showDetail(row) {
  document.querySelector("tr.selected")?.classList.remove("selected");
  row.classList.add("selected");
  const {kind, item} = recordOf.get(row);
  $("detail-empty").hidden = true;
  const problems = kind === "events" ? problemsOf(item) : [];
  $("detail-problems").replaceChildren(
    ...problems.map((found) => element("li", found.kind, found.line)));
  if (kind === "events") {
    $("detail-title").textContent = `${text(item.type)} ${nameOf(item)}`;
    $("detail-json").textContent = JSON.stringify(item, null, 2);
  } else {   // a refused body as it came, rather than as a JSON string full of escapes
    const {body, ...refusal} = item;
    $("detail-title").textContent = `Refused ${text(item.status)}: ${text(item.message)}`;
    $("detail-json").textContent =
      `${JSON.stringify(refusal, null, 2)}\n\nBody (its first KiB):\n${text(body)}`;
  }
}

// ---- Status line, counts, tabs ----

const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;

function showProblem(message) {
  problem = message;
  update();
}

function update() {
  const waiting = [plural(lists.events.waiting.length, "new event"),
                   plural(lists.rejected.waiting.length, "refusal")]
    .filter((part) => !part.startsWith("0 "));
  $("status").className = problem ? "error" : connecting ? "" : paused ? "paused" : "live";
  $("status").textContent = problem || (connecting ? "Connecting..." : !paused ?
    "Live: new events appear as they arrive" :
    `Paused: ${waiting.length ? waiting.join(" and ") + " waiting" : "nothing new yet"}`);
  for (const kind in lists) {
    const rows = [...rowsOf(kind).rows];
    const shown = rows.filter((row) => !row.hidden).length;
    $(`count-${kind}`).textContent =
      shown === rows.length ? rows.length : `${shown} of ${rows.length}`;
  }
  $("empty").hidden = rowsOf(shownKind).rows.length > 0;
  $("empty").replaceChildren(...(shownKind === "rejected" ? ["No refused requests."] : [
    "No events yet for this key. Send one:",
    element("code", "", `curl -u '${writeKey}:' -d '{"userId": "ada", "event": "Signed Up"}' ` +
                        `${location.origin}/v1/track`)]));
}

function showList(kind) {
  shownKind = kind;
  for (const name in lists) {
    $(name).hidden = name !== kind;
    $(`tab-${name}`).setAttribute("aria-selected", String(name === kind));
  }
  update();
}

function clearLists() {
  for (const kind in lists) {
    rowsOf(kind).replaceChildren();
    lists[kind].waiting = [];
  }
  $("missed").hidden = true;
  $("detail-empty").hidden = false;
  for (const id of ["detail-title", "detail-problems", "detail-json"]) $(id).replaceChildren();
}

// ---- The write key ----

function askForKey(message) {
  stop();
  $("app").hidden = true;
  $("session").hidden = true;
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = `rudderlite answered: ${message}`;
  $("key-input").value = writeKey || "";
  $("key-input").focus();
}

function openKey(key) {
  writeKey = key;
  const url = new URL(location.href);
  url.searchParams.set("writeKey", key);
  history.replaceState(null, "", url);   // so that a reload opens the same key
  document.title = `rudderlite: ${key}`;
  $("key-name").textContent = key;
  $("key-form").hidden = true;
  $("app").hidden = false;
  $("session").hidden = false;
  clearLists();
  connecting = true;
  showProblem("");
  start();
}

// ---- Wiring ----

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (key) openKey(key);
});
$("change-key").addEventListener("click", () => askForKey(""));
$("tab-events").addEventListener("click", () => showList("events"));
$("tab-rejected").addEventListener("click", () => showList("rejected"));
$("filter").addEventListener("input", () => {
  for (const kind in lists) {
    for (const row of rowsOf(kind).rows) row.hidden = !matchesFilter(row);
  }
  update();
});
for (const kind in lists) {
  rowsOf(kind).addEventListener("click", (event) => showDetail(event.target.closest("tr")));
  rowsOf(kind).addEventListener("keydown", (event) => {
    if (event.key === "Enter") showDetail(event.target.closest("tr"));
  });
}

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(paused));
  if (!paused) {
    for (const kind in lists) lists[kind].waiting.splice(0).forEach((item) => addRow(kind, item));
  }
  update();
});

$("reset").addEventListener("click", async () => {
  // The requests in flight are dropped first, so that nothing from before the reset comes back.
  stop();
  $("reset").disabled = true;
  try {
    await api("POST", "/rudderlite/reset");
    clearLists();
    problem = "";
  } catch (error) {
    if (error.status === 401) return askForKey(error.message);
    problem = `Reset failed (${error.message})`;
  } finally {
    $("reset").disabled = false;
  }
  update();
  start();
});

const keyInUrl = new URLSearchParams(location.search).get("writeKey");
if (keyInUrl) openKey(keyInUrl); else askForKey("");
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
