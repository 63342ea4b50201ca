"""What travels between lagompy and NATS JetStream, and how a feed reads it fast: the header
names and blocks lagompy's producers write, the decoding of broker messages into
:class:`~lagompy.topic.Message` objects (one at a time, by runs, and by columns), and the
connection's parser in front of nats-py's, which hands a feed's inbox messages straight to it.

A read of the socket that begins with lagompy's own messages for one feed is split at them in
one call of the regex engine (:func:`_own_run`: every body checked against its control line's
lengths) and handed over in columns (:class:`_Run`), which the feed decodes a column at a time
(:func:`decode_run`). Any other read goes a match per message (:func:`_sink_loop`), and what
this module cannot vouch for goes to nats-py's own parser. The transport itself (links,
producers, feeds) is :mod:`lagompy.topic._nats`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote

import msgpack
from pydantic import ValidationError

from lagompy.errors import TopicMessageInvalid
from lagompy.topic._codec import JSON, MSGPACK, _adapter, _list_adapter, decode_body
from lagompy.topic._topic import Message, Topic, _made_many
from lagompy.topic._topic import _made as _topic_made

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js.api import RawStreamMsg

#: Header names (the message id header is JetStream's own).
MSG_ID = "Nats-Msg-Id"
H_OFFSET = "Lagompy-Offset"
H_KEY = "Lagompy-Key"
H_ENTITY_TYPE = "Lagompy-Entity-Type"
H_ENTITY_ID = "Lagompy-Entity-Id"
H_SEQ_NR = "Lagompy-Seq-Nr"
H_TIME = "Lagompy-Time"
H_TYPE = "Lagompy-Type"
H_VERSION = "Lagompy-Version"
H_CONTENT_TYPE = "Content-Type"
#: A position marker: no message, only "the partition's events up to this offset are
#: published" (a page that ends with events the topic filters out), so that subscribers'
#: positions move past filtered events as they do on the embedded transports.
H_MARKER = "Lagompy-Position-Only"


#: What ``quote(value, safe="")`` leaves as it is: such a value is its own header value.
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _header_values(
    message: Message[Any], content_type: str, stamps: dict[Any, str] | None = None
) -> tuple[str, ...]:
    """The values of a message's headers, in the order of :data:`_OWN_NAMES`. ``stamps``:
    times already written out (a transaction's events share theirs), the caller's to empty.
    (``quote`` of values it leaves alone and ``isoformat`` of the same time again were two
    fifths of these headers' cost, about a tenth of a producer's time on SQLite, 2026-12-06.)"""
    at = message.timestamp
    if stamps is None:
        stamp = at.isoformat()
    else:
        # Equal times with the same zone and fold are written alike (equal ones in other
        # zones, or a wall time's two folds in one zone, are not: they are kept apart).
        seen = (at, at.tzinfo, at.fold)
        got = stamps.get(seen)
        stamp = got if got is not None else stamps.setdefault(seen, at.isoformat())
    key, etype, eid = message.key, message.entity_type, message.entity_id
    return (
        f"{message.topic}:{message.partition}:{message.offset}",
        str(message.offset),
        key if _UNQUOTED(key) else quote(key, safe=""),
        etype if _UNQUOTED(etype) else quote(etype, safe=""),
        eid if _UNQUOTED(eid) else quote(eid, safe=""),
        str(message.seq_nr),
        stamp,
        message.type_name,
        str(message.version),
        content_type,
    )


def _headers(
    message: Message[Any], content_type: str, stamps: dict[Any, str] | None = None
) -> dict[str, str]:
    """A message's headers (see :func:`_header_values`)."""
    return dict(zip(_OWN_NAMES, _header_values(message, content_type, stamps), strict=True))


#: What nats-py makes of a header value's line breaks.
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block(headers: Mapping[str, str]) -> bytes:
    """The header block nats-py writes for ``headers`` (``NATS/1.0``, a ``Name: value`` line
    per header, an empty line): each name stripped (empty ones left out), each value
    stripped, its line breaks made spaces."""
    lines = [
        f"{name.strip()}: {value.strip().translate(_NEWLINES)}\r\n"
        for name, value in headers.items()
        if name.strip()
    ]
    return ("NATS/1.0\r\n" + "".join(lines) + "\r\n").encode()


@functools.cache
def _plain(value: str) -> bool:
    """Whether nats-py writes ``value`` as it is (nothing to strip, no line break)."""
    return value == value.strip().translate(_NEWLINES)


def _header_block(
    message: Message[Any], content_type: str, stamps: dict[Any, str] | None = None
) -> bytes:
    """:func:`header_block` of :func:`_headers`, filled into one template when nats-py would
    write every value as it is (always, but for a message type's name or a content type
    with white space at an end or a line break: those go the long way). Its values are
    quoted, numbers or an ISO time otherwise."""
    values = _header_values(message, content_type, stamps)
    if _plain(values[7]) and _plain(content_type):
        return (_OWN_TEMPLATE % values).encode()
    return header_block(dict(zip(_OWN_NAMES, values, strict=True)))


def _int_header(headers: dict[str, str], name: str) -> int:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        raise TopicMessageInvalid(
            f"header {name!r} is missing or not an integer: {headers.get(name)!r:.40}"
        ) from None


def _marker_headers(topic: Topic[Any], partition: int, offset: int, at: datetime) -> dict[str, str]:
    return {
        MSG_ID: f"{topic.name}:{partition}:{offset}",
        H_OFFSET: str(offset),
        H_TIME: at.isoformat(),
        H_MARKER: "1",
    }


class _BrokerMessage(Protocol):
    """A message as the broker delivered it: nats-py's, or a feed's :class:`_Received`."""

    @property
    def headers(self) -> dict[str, str] | None: ...

    @property
    def data(self) -> bytes: ...


def _offset_of(msg: _BrokerMessage | RawStreamMsg) -> int:
    headers = msg.headers
    try:
        return int(headers[H_OFFSET])  # type: ignore[index]
    except (KeyError, ValueError, TypeError):  # (a ``with suppress`` cost 2% of a catch-up)
        return _int_header(dict(headers or {}), H_OFFSET)


def _time_of(headers: dict[str, str]) -> datetime:
    try:
        return datetime.fromisoformat(headers[H_TIME])
    except (KeyError, ValueError):
        raise TopicMessageInvalid(f"header {H_TIME!r} is missing or not a time") from None


def decode(topic: Topic[Any], partition: int, headers: dict[str, str], data: bytes) -> Message[Any]:
    """A message of ``topic``'s partition from a broker message (``TopicMessageInvalid`` naming
    what does not fit)."""
    type_name = headers.get(H_TYPE)
    if type_name != topic.type_name:
        raise TopicMessageInvalid(
            f"message type {type_name!r:.100} is not this topic's ({topic.type_name!r})"
        )
    version = _int_header(headers, H_VERSION)
    if version > topic.version:
        raise TopicMessageInvalid(
            f"message type {type_name!r} version {version} is newer than this side's "
            f"{topic.message_type.__qualname__} (version {topic.version}): upgrade the "
            "subscriber's message class"
        )
    content_type = headers.get(H_CONTENT_TYPE)
    try:
        if version == topic.version and content_type in (None, JSON):
            payload = _adapter(topic.message_type).validate_json(data)
        else:
            payload = _adapter(topic.message_type).validate_python(
                decode_body(topic, data, content_type, version)
            )
    except ValidationError as e:
        raise TopicMessageInvalid(
            f"the payload does not fit {topic.message_type.__qualname__}: "
            f"{e.error_count()} error(s)"
        ) from None
    return Message(
        topic=topic.name,
        payload=payload,
        key=unquote(headers.get(H_KEY, "")),
        partition=partition,
        offset=_int_header(headers, H_OFFSET),
        timestamp=_time_of(headers),
        type_name=type_name,
        version=version,
        entity_type=unquote(headers.get(H_ENTITY_TYPE, "")),
        entity_id=unquote(headers.get(H_ENTITY_ID, "")),
        seq_nr=_int_header(headers, H_SEQ_NR),
    )


_unpackb = msgpack.unpackb


def _made(
    name: str,
    partition: int,
    type_name: str,
    version: int,
    offset: str,
    when: datetime | None,
    key: str,
    etype: str,
    eid: str,
    seq_nr: str,
) -> Message[Any]:
    """A message of its header values (percent-encoded ones decoded), made by the topic
    module's one construction; its payload is set once the batch's are decoded.
    ``ValueError`` when a number does not read."""
    return _topic_made(
        name,
        None,
        unquote(key) if "%" in key else key,
        partition,
        unquote(etype) if "%" in etype else etype,
        unquote(eid) if "%" in eid else eid,
        int(seq_nr),
        int(offset),
        when,
        type_name,
        version,
    )


def decode_batch(
    topic: Topic[Any], partition: int, msgs: Sequence[_BrokerMessage], where: str
) -> list[Message[Any] | None]:
    """The messages of a run of broker messages (None for a position marker), in one pass
    over their headers (checked in one expression each) and one call into pydantic for their
    payloads; a message that fails goes through :func:`decode`, which names what is wrong.
    (Per message, pydantic's call and the named checks cost as much as nats-py's own
    parsing.)

    Payloads of the topic's current version are read in one step: JSON ones joined into one
    array, MessagePack ones each unpacked (without :func:`~lagompy.topic._codec.decode_body`'s
    per-message steps, a tenth of a NATS catch-up's samples, 2026-12-06); other versions go
    through ``decode_body`` and the upcasters. The messages are made as their headers are
    read, and get their payloads at the end."""
    type_name, newest = topic.type_name, topic.version
    current = str(newest)
    name = topic.name
    out: list[Message[Any] | None] = []
    append = out.append
    made: list[Message[Any]] = []
    loaded: list[_BrokerMessage] = []
    contents: set[str | None] = set()
    bodies: list[bytes] = []
    upcast = False
    stamp, when = None, None
    content: str | None
    for msg in msgs:
        own = msg[3] if type(msg) is _Received else None
        try:
            if own is not None and own[8] == current and own[7] == type_name:
                # lagompy's own block (see _sink_run), its values in the order of _OWN_NAMES.
                _, offset, key, etype, eid, seq_nr, at, _, _, content = own
                version = newest
                body = msg[1]  # type: ignore[index]  # (a _Received, as own says)
            else:
                headers = msg.headers or {}
                if H_MARKER in headers:
                    append(None)
                    continue
                if headers.get(H_VERSION) == current and headers.get(H_TYPE) == type_name:
                    version = newest
                else:
                    try:
                        version = int(headers[H_VERSION])
                        if headers[H_TYPE] != type_name or version > newest:
                            raise ValueError
                    except (KeyError, ValueError):
                        decode(topic, partition, dict(headers), msg.data)  # raises, naming it
                        raise AssertionError("unreachable") from None
                    upcast = upcast or version != newest
                offset, key, at = headers[H_OFFSET], headers[H_KEY], headers[H_TIME]
                etype, eid = headers[H_ENTITY_TYPE], headers[H_ENTITY_ID]
                seq_nr, content = headers[H_SEQ_NR], headers.get(H_CONTENT_TYPE)
                body = msg.data
            if at != stamp:  # a transaction's messages share it
                stamp, when = at, datetime.fromisoformat(at)
            message = _made(
                name, partition, type_name, version, offset, when, key, etype, eid, seq_nr
            )
        except (KeyError, ValueError) as e:
            raise TopicMessageInvalid(
                f"{where}: a message's headers are incomplete ({e!r:.80})"
            ) from None
        append(message)
        made.append(message)
        loaded.append(msg)
        bodies.append(body)
        contents.add(content)
    if not made:
        return out
    adapter = _list_adapter(topic.message_type)
    try:
        objects: list[Any] | None = None
        if not upcast and contents <= {None, JSON}:  # validated from their bytes at once
            payloads = adapter.validate_json(b"[" + b",".join(bodies) + b"]")
        else:
            if not upcast and contents == {MSGPACK}:
                with contextlib.suppress(Exception):  # msgpack raises several types: named below
                    objects = [_unpackb(b) for b in bodies]
            if objects is None:  # older versions to upcast, or a payload that is not readable
                objects = [_body(topic, m, where) for m in loaded]
            payloads = adapter.validate_python(objects)
    except ValidationError:
        for msg in loaded:
            try:
                decode(topic, partition, msg.headers or {}, msg.data)
            except TopicMessageInvalid as e:
                raise TopicMessageInvalid(f"{where}, offset {_offset_of(msg)}: {e}") from None
        raise
    for message, payload in zip(made, payloads, strict=True):
        message.__dict__["payload"] = payload
    return out


def _body(topic: Topic[Any], msg: _BrokerMessage, where: str) -> object:
    """A message's payload as its JSON-form object of the current version (``decode_body``),
    its error naming where it is."""
    headers = msg.headers or {}
    try:
        return decode_body(topic, msg.data, headers.get(H_CONTENT_TYPE), int(headers[H_VERSION]))
    except TopicMessageInvalid as e:
        raise TopicMessageInvalid(f"{where}, offset {_offset_of(msg)}: {e}") from None


def decode_run(
    topic: Topic[Any], partition: int, run: _Run, offsets: list[int]
) -> list[Message[Any]] | None:
    """The messages of a run with lagompy's own header block (``offsets``: its offsets, read
    already), decoded column by column: one check per column of what the whole run shares
    (type, version, content type), one call per column for the numbers and times, and the
    messages made at once (:func:`~lagompy.topic._topic._made_many`). None when the run is
    not one it can vouch for (another version to upcast, another type, a value that does not
    read, a payload that does not fit): :func:`decode_batch` then decodes it message by
    message and names what is wrong. Its messages equal :func:`decode_batch`'s.

    (Per message, :func:`decode_batch`'s loop and its call of :func:`_made` were ~2.3 us, this
    ~1.9 with the same msgpack and pydantic calls, 2026-12-07.)"""
    _, _, keys, etypes, eids, seq_nrs, times, types, versions, contents = run.values
    type_name = topic.type_name
    if types.count(type_name) != len(types) or versions.count(str(topic.version)) != len(versions):
        return None
    bodies = run.bodies
    try:
        if contents.count(MSGPACK) == len(contents):
            objects = list(map(_unpackb, bodies))
        elif contents.count(JSON) == len(contents):
            objects = None
        else:
            return None
        seqs = list(map(int, seq_nrs))
        stamps = {at: datetime.fromisoformat(at) for at in set(times)}  # a transaction's share
        adapter = _list_adapter(topic.message_type)
        if objects is None:
            payloads = adapter.validate_json(b"[" + b",".join(bodies) + b"]")
        else:
            payloads = adapter.validate_python(objects)
    except Exception:  # msgpack raises several types, pydantic its own: named by decode_batch
        return None
    keys, etypes, eids = (
        [unquote(v) if "%" in v else v for v in column] if "%" in "".join(column) else column
        for column in (keys, etypes, eids)
    )
    return _made_many(
        topic.name,
        partition,
        type_name,
        topic.version,
        payloads,
        keys,
        offsets,
        list(map(stamps.__getitem__, times)),
        etypes,
        eids,
        seqs,
    )


# --------------------------------------------------------------------------- the connection

#: One header line the way every NATS client writes them (``Name: value``: a token, one space,
#: a value with no whitespace at either end), from the line break before it to the one after.
_HEADER_LINE = re.compile(r"\r\n([!-9;-~]+): ((?:\S(?:[^\r\n]*\S)?)?)(?=\r\n)")


def parse_headers(block: bytes | bytearray) -> dict[str, str] | None:
    """The headers of a header block (``NATS/1.0``, ``Name: value`` lines, an empty line,
    each line ended by CRLF) as nats-py's own parser gives them, in one pass over the block;
    None for a block it cannot vouch for (a status line, a line of another form), which
    nats-py's parser reads instead.

    nats-py splits the block and decodes, strips and checks each line in Python: about 12 µs
    per message with lagompy's ten headers, more than half of what nats-py spends on a message
    in a NATS catch-up (2026-12-06); this takes ~4 µs. Every line between the first and the
    empty one must be a match of :data:`_HEADER_LINE` (each match takes the line break before
    its line: all but the last two are taken), on which both parsers agree: the same name, a
    value their stripping leaves alone, the same UTF-8 decoding, the last of repeated names."""
    if not block.startswith(b"NATS/1.0\r\n") or not block.endswith(b"\r\n\r\n"):
        return None
    text = block[8:].decode("utf-8", "replace")
    pairs = _HEADER_LINE.findall(text)
    if not pairs or len(pairs) != text.count("\r\n") - 2:
        return None
    return dict(pairs)


#: The header block lagompy's producers write (:func:`_headers`, in its order), matched whole:
#: one match for the ten lines. Its values are printable ASCII without spaces (lagompy's are:
#: quoted, numbers, an ISO time), which :data:`_HEADER_LINE` takes as they are, so a block this
#: matches is one :func:`parse_headers` gives the same headers for; other blocks go to it.
_OWN_NAMES = (
    MSG_ID,
    H_OFFSET,
    H_KEY,
    H_ENTITY_TYPE,
    H_ENTITY_ID,
    H_SEQ_NR,
    H_TIME,
    H_TYPE,
    H_VERSION,
    H_CONTENT_TYPE,
)
#: The header block of lagompy's headers (:func:`_header_block`), its values to fill in.
_OWN_TEMPLATE = "NATS/1.0\r\n" + "".join(f"{name}: %s\r\n" for name in _OWN_NAMES) + "\r\n"
_OWN_BLOCK = re.compile(
    "NATS/1\\.0\r\n" + "".join(f"{name}: ([!-~]*)\r\n" for name in _OWN_NAMES) + "\r\n"
)


def read_headers(block: bytes | bytearray) -> dict[str, str] | None:
    """:func:`parse_headers`, with a shorter way for the blocks lagompy's producers write
    (one match of :data:`_OWN_BLOCK` instead of one per line)."""
    own = _OWN_BLOCK.fullmatch(block.decode("utf-8", "replace"))
    if own is not None:
        return dict(zip(_OWN_NAMES, own.groups()))  # noqa: B905 (ten groups, ten names)
    return parse_headers(block)


class _Received(tuple[dict[str, str] | None, bytes, str, tuple[str, ...] | None]):
    """A message of a feed's inbox as the connection hands it over: ``(headers, data,
    reply, own)``, its headers, body and reply subject (where its acknowledgement goes),
    without nats-py's message object. ``own``: the values of lagompy's header block (in the
    order of :data:`_OWN_NAMES`) when the message has exactly that block, which the feed
    reads without a dict (``headers`` is then made from them when asked for). (A tuple: a
    class of three slots took 1 µs to make, a fifth of the parser's fast run per message;
    the dict of the ten values another µs, 2026-12-06.)"""

    __slots__ = ()

    @property
    def headers(self) -> dict[str, str] | None:
        own = self[3]
        return self[0] if own is None else dict(zip(_OWN_NAMES, own))  # noqa: B905

    data = property(operator.itemgetter(1))
    reply = property(operator.itemgetter(2))


class _Run:
    """A run of messages of one subscription, each with lagompy's own header block, in
    columns: ``values`` (a list per name of :data:`_OWN_NAMES`, in its order), ``bodies`` and
    ``replies`` (where each message's acknowledgement goes). Iterating gives its messages as
    :class:`_Received` (what the feed falls back to when a run is not the usual one)."""

    __slots__ = ("bodies", "replies", "values")

    def __init__(self, values: list[list[str]], bodies: list[bytes], replies: list[str]) -> None:
        self.values = values
        self.bodies = bodies
        self.replies = replies

    @classmethod
    def of(cls, msgs: Sequence[_Received]) -> _Run:
        """The run of messages with lagompy's own block (``own`` set on each)."""
        values = [list(column) for column in zip(*(m[3] for m in msgs), strict=True)]
        return cls(values, [m[1] for m in msgs], [m[2] for m in msgs])

    @classmethod
    def joined(cls, runs: Sequence[_Run]) -> _Run:
        """One run of several, in order."""
        first = runs[0]
        values = [list(column) for column in first.values]
        bodies, replies = list(first.bodies), list(first.replies)
        for run in runs[1:]:
            for column, more in zip(values, run.values, strict=True):
                column += more
            bodies += run.bodies
            replies += run.replies
        return cls(values, bodies, replies)

    def __len__(self) -> int:
        return len(self.bodies)

    def __iter__(self) -> Iterator[_Received]:
        owns = zip(*self.values, strict=True)
        for body, reply, own in zip(self.bodies, self.replies, owns, strict=True):
            yield _Received((None, body, reply, own))

    def offsets(self) -> list[int] | None:
        """Its offsets, or None when one does not read."""
        try:
            return list(map(int, self.values[1]))
        except ValueError:
            return None


#: What a feed gives the connection for its inbox: called with its messages, in order, a run
#: at a time. Messages with lagompy's own header block come as a :class:`_Run`; any other
#: message comes alone, in a list.
Sink = Callable[["_Run | list[_Received]"], None]


#: A message's control line as nats-server writes it (``HMSG <subject> <sid> [<reply>]
#: <header bytes> <total bytes>``, single spaces), and the header block lagompy's producers
#: write when it follows (:data:`_OWN_BLOCK`, groups 6 on): matched in the read bytes decoded
#: as Latin-1 (a character per byte, so positions are the bytes'; the block's values are
#: ASCII, decoded alike). Any other form is left to :func:`read_headers` or nats-py's parser.
#: The subject and the reply are "anything but a space" and the numbers ``[0-9]``: the
#: engine runs a class of one excluded character in a loop of its own, where ``[^\s]`` and
#: ``\d`` test each character's category (the match took ~1.0 µs per message instead of
#: ~1.5, a fifth of a catch-up's parsing, 2026-12-07). nats-server separates the fields by
#: one space and puts no white space in subjects; the control line still has to end in the
#: two numbers and CRLF.
_HMSG_LINE = re.compile(
    "HMSG [^ ]+ ([0-9]+) (?:([^ ]+) )?([0-9]+) ([0-9]+)\r\n()(?:" + _OWN_BLOCK.pattern + ")?"
)


#: lagompy's own messages as :func:`_own_run` splits a read at them: the line break ending
#: the message before (or the one put in front of the read), the control line with a reply
#: (its sid, reply and two lengths) and lagompy's header block (its ten values). What lies
#: between two matches is a message's body, as long as its control line says, or the read
#: is not one run of them.
_OWN_RUN = re.compile("\r\nHMSG [^ ]+ ([0-9]+) ([^ ]+) ([0-9]+) ([0-9]+)\r\n" + _OWN_BLOCK.pattern)
#: A message's pieces in the split: its four values of the control line, its ten of the
#: header block, and its body (with, for the last, what follows it).
_PIECES = 5 + len(_OWN_NAMES)


def _own_run(data: bytes, sinks: Mapping[int, Sink]) -> tuple[int, bool] | None:
    """Hand a read that begins with a run of lagompy's own messages for one sink to it, in
    columns (a :class:`_Run`), from one split of the read at :data:`_OWN_RUN`: the regex
    engine finds the messages and takes their values in one call, and the run is checked
    whole: every body as long as its control line says (a body holding something that
    looks like a message, or anything else between two of them, fails it), one sid. The
    last message may be partial (left for the next read, as :func:`_sink_run` leaves it).

    Returns what :func:`_sink_run` returns for the run (the bytes taken, and False when a
    partial message ends it), or None when the read does not begin with such a run (nothing
    handed out: :func:`_sink_loop` reads it). (A match per message, its groups, and a
    ``_Received`` per message were ~2.9 us per message; this ~2.1, 2026-12-07.)"""
    text = "\r\n" + data.decode("latin-1")
    parts = _OWN_RUN.split(text)
    n = len(parts) // _PIECES
    if not n or parts[0]:
        return None
    sids = parts[1::_PIECES]
    if sids.count(sids[0]) != n:
        return None
    sink = sinks.get(int(sids[0]))
    if sink is None:
        return None
    heads = map(int, parts[3::_PIECES])
    lengths = list(map(operator.sub, map(int, parts[4::_PIECES]), heads))
    bodies = parts[_PIECES::_PIECES]
    tail, last = bodies[-1], lengths[-1]
    if len(tail) >= last + 2:  # the last message whole, with its line break
        bodies[-1] = tail[:last]
        taken, whole = len(data) + 2 - len(tail) + last, True
    else:  # left from its control line on (which no other match can hold)
        taken, whole = text.rfind("\r\nHMSG ", 0, len(text) - len(tail)), False
        n -= 1
        del bodies[-1], lengths[-1]
    if not n or list(map(len, bodies)) != lengths:
        return None
    end = n * _PIECES
    values = [parts[i:end:_PIECES] for i in range(5, _PIECES)]
    sink(_Run(values, list(map(str.encode, bodies, repeat("latin-1"))), parts[2:end:_PIECES]))
    return taken, whole


def _sink_run(buf: bytearray, sinks: Mapping[int, Sink]) -> tuple[int, bool]:
    """Hand the messages at the start of ``buf`` that go to sinks to them, with their headers
    read, while they are whole and their headers are ones :func:`read_headers` vouches for
    (a status, anything else, or a message for a subscription of nats-py's own stops it: the
    parser reads on from there).

    A read that begins with lagompy's own messages for one sink (a catch-up's reads, nearly
    all) goes to :func:`_own_run`; the rest, or a read of another form, to
    :func:`_sink_loop`.

    Returns the bytes taken, and False when it stopped at a sink's message not all read yet
    (left for the next read, which starts with it, rather than to nats-py's parser, which
    would take the rest of that read its own way)."""
    data = bytes(buf)  # (bodies sliced from bytes: one copy each, not two)
    run = _own_run(data, sinks)
    if run is None:
        return _sink_loop(data, 0, sinks)
    taken, whole = run
    if not whole or taken >= len(data):
        return taken, whole
    return _sink_loop(data, taken, sinks)


def _sink_loop(data: bytes, pos: int, sinks: Mapping[int, Sink]) -> tuple[int, bool]:
    """:func:`_sink_run` from ``pos`` on, a match of :data:`_HMSG_LINE` per message.

    What nats-py's parser does per message (a match of each control line it knows, until
    one fits, then its payload and a call of ``_process_msg``) was a sixth of a NATS
    catch-up's time once its header parsing and message objects were gone (2026-12-06).

    Each sink gets its messages with lagompy's own header block as one run (a call per
    message, and the feed's bookkeeping of each, were a tenth of this function's time,
    2026-12-07); a message of another form goes alone, after the run before it."""
    text = data.decode("latin-1")
    end = len(data)
    match = _HMSG_LINE.match
    runs: dict[int, list[_Received]] = {}  # sid -> the run of own messages not handed yet
    whole = True
    while True:
        line = match(text, pos)
        if line is None:
            break
        # (its groups at once: a call of the match's methods per value, and of ``group``
        # with the block's ten, were about a tenth of this function's time, 2026-12-07)
        groups = line.groups()
        sid = int(groups[0])
        if sid not in sinks:
            break
        head = int(groups[2])
        start = line.start(5)  # the header block's (the empty group after the control line)
        body = start + head
        stop = start + int(groups[3])
        if stop + 2 > end:
            whole = False
            break
        if groups[5] is not None and line.end() == body:  # lagompy's block, all of it
            run = runs.get(sid)
            if run is None:
                run = runs[sid] = []
            run.append(_Received((None, data[body:stop], groups[1] or "", groups[5:])))
        else:
            headers = read_headers(data[start:body])
            if headers is None:
                break
            run = runs.pop(sid, None)
            if run:
                sinks[sid](_Run.of(run))
            sinks[sid]([_Received((headers, data[body:stop], groups[1] or "", None))])
        pos = stop + 2
    for sid, run in runs.items():
        sinks[sid](_Run.of(run))
    return pos, whole


@functools.cache
def _client_class() -> type[NatsClient]:
    """nats-py's client with :func:`read_headers` in front of its own header parsing (which
    it falls back to), and *sinks*: an inbox subscription's messages handed to a function of
    the feed, with their headers read, where nats-py would make a message object, put it in
    the subscription's queue and have the subscription's task call its callback (about a
    fifth of a NATS catch-up's time, 2026-12-06). A nats-py that no longer calls
    ``_process_headers`` only reads headers its own way again; one that no longer calls
    ``_process_msg`` with these arguments, or whose parser is made otherwise, gets no sinks:
    :meth:`_Link.subscribe` then hands the messages over from a subscription callback (the
    tests check that the nats-py installed takes the short way)."""
    from nats.aio.client import Client
    from nats.protocol import parser as protocol

    class HeadersOnly(Client):
        async def _process_headers(self, headers: Any) -> dict[str, str] | None:
            if headers:
                parsed = read_headers(headers)
                if parsed is not None:
                    return parsed
            return await super()._process_headers(headers)

    if not _sinks_fit(Client, protocol):
        return HeadersOnly

    class SinkParser(protocol.Parser):
        """nats-py's parser, taking the run of messages for sinks at the start of what it
        has read in one loop (see :func:`_sink_run`), then the rest its own way."""

        async def parse(self, data: bytes = b"") -> None:
            sinks = self.nc.sinks
            if sinks and self.state == protocol.AWAITING_CONTROL_LINE:
                self.buf.extend(data)
                data = b""
                taken, whole = _sink_run(self.buf, sinks)
                if taken:
                    del self.buf[:taken]
                if not whole:
                    return  # a sink's message not all read: taken at the next read
            await super().parse(data)

    class HeadersClient(HeadersOnly):
        def __init__(self) -> None:
            super().__init__()
            #: sid -> the sink of the subscription (see :meth:`_Link.subscribe`).
            self.sinks: dict[int, Sink] = {}
            self._ps = SinkParser(self)

        async def _process_msg(
            self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            sink = self.sinks.get(sid)
            if sink is None:
                return await super()._process_msg(sid, subject, reply, data, headers)
            parsed = read_headers(headers) if headers else None
            if parsed is None and headers:
                parsed = await super()._process_headers(headers)
            sink([_Received((parsed, data, reply.decode(), None))])
            return None

    return HeadersClient


def _sinks_fit(client: type[NatsClient], protocol: Any) -> bool:
    """Whether this nats-py has what sinks plug into: a parser made with its client, keeping
    ``buf`` and ``state`` (``AWAITING_CONTROL_LINE`` between messages), and a
    ``_process_msg(sid, subject, reply, data, headers)`` hook (the slow way's path to sinks).
    Private parts of nats-py (2.16 here): another version may differ, and then goes its own
    way."""
    try:
        hook = list(inspect.signature(client._process_msg).parameters)
        probe = protocol.Parser(None)
        waiting = protocol.AWAITING_CONTROL_LINE
    except (AttributeError, TypeError, ValueError):
        return False
    return (
        hook[1:] == ["sid", "subject", "reply", "data", "headers"]
        and isinstance(probe.buf, bytearray)
        and probe.state == waiting
        and inspect.iscoroutinefunction(protocol.Parser.parse)
    )


def _own_offsets(arrived: list[_Received]) -> list[int] | None:
    """The offsets of a run of messages that all have lagompy's own header block, in one
    comprehension; None when one has not, or its offset does not read."""
    try:
        return [int(m[3][1]) for m in arrived]  # type: ignore[index]
    except (TypeError, ValueError):
        return None
