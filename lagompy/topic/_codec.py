"""Messages as JSON: the language-neutral form the HTTP route serves (and any transport may
publish). A message is an object with its metadata and its payload::

    {"topic": "user-events", "partition": 2, "offset": 1041, "key": "ada",
     "timestamp": "2026-12-04T18:20:11.532000+00:00", "type": "UserRegistration", "version": 1,
     "entity_type": "user", "entity_id": "ada", "seq_nr": 1,
     "payload": {"user_id": "ada", "name": "Ada", "email": "ada@example.org"}}

The payload is the message dataclass as JSON: fields by name; datetimes, dates and times in ISO
8601; UUIDs and decimals as strings; bytes as base64; nested dataclasses as objects; tuples and
sets as arrays (pydantic's JSON mode, both ways).

A message of an older version of the topic's type (a producer not yet upgraded) is brought to
the current version by the message type's upcasters (:func:`lagompy.serializable`'s
``upcasters``), applied to its JSON payload object one version at a time; a newer version is
refused (upgrade the subscriber first). See :func:`upcast_payload`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import msgpack
from pydantic import TypeAdapter, ValidationError

from lagompy.errors import TopicMessageInvalid
from lagompy.serialization import type_info
from lagompy.topic._topic import Message, Topic

_new = object.__new__

__all__ = [
    "COLUMNS",
    "JSON",
    "MSGPACK",
    "decode_body",
    "encode_payload",
    "encode_payloads",
    "message_from_json",
    "message_to_json",
    "messages_from_columns",
    "messages_from_json",
    "messages_to_columns",
    "messages_to_json",
    "upcast_payload",
]


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}
_LIST_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def _list_adapter(cls: type) -> TypeAdapter[Any]:
    """One adapter for a batch's payloads: one call into pydantic per batch, not per message."""
    adapter = _LIST_ADAPTERS.get(cls)
    if adapter is None:
        adapter = _LIST_ADAPTERS[cls] = TypeAdapter(list[cls])  # type: ignore[valid-type]
    return adapter


def _object(message: Message[Any], payload: Any) -> dict[str, Any]:
    return {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "key": message.key,
        "timestamp": message.timestamp.isoformat(),
        "type": message.type_name,
        "version": message.version,
        "entity_type": message.entity_type,
        "entity_id": message.entity_id,
        "seq_nr": message.seq_nr,
        "payload": payload,
    }


def message_to_json(message: Message[Any]) -> dict[str, Any]:
    """The JSON object of a message (see the module's docs)."""
    return _object(
        message, _adapter(type(message.payload)).dump_python(message.payload, mode="json")
    )


def messages_to_json(messages: Sequence[Message[Any]], message_type: type) -> list[dict[str, Any]]:
    """The JSON objects of a batch of messages whose payloads are ``message_type``s."""
    payloads = _list_adapter(message_type).dump_python([m.payload for m in messages], mode="json")
    return [_object(m, p) for m, p in zip(messages, payloads, strict=True)]


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TopicMessageInvalid(f"field {name!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _check_header(topic: Topic[Any], data: object, partition: int) -> dict[str, Any]:
    """``data`` if it is a message object of ``topic``'s ``partition`` of a type and version
    this side reads (its payload is checked apart)."""
    if not isinstance(data, dict):
        raise TopicMessageInvalid(f"a message must be a JSON object, got {type(data).__name__}")
    name = _field(data, "topic", str)
    if name != topic.name or _field(data, "partition", int) != partition:
        raise TopicMessageInvalid(
            f"expected a message of topic {topic.name!r} partition {partition}, got one of "
            f"{name!r:.100} partition {data.get('partition')!r:.20}"
        )
    type_name = _field(data, "type", str)
    version = _field(data, "version", int)
    if type_name != topic.type_name:
        raise TopicMessageInvalid(
            f"message type {type_name!r:.100} is not this topic's ({topic.type_name!r})"
        )
    if version > topic.version:
        raise TopicMessageInvalid(
            f"message type {type_name!r} version {version} is newer than this side's "
            f"{topic.message_type.__qualname__} (version {topic.version}): upgrade the "
            "subscriber's message class"
        )
    return data


#: The content types of payloads (see :attr:`Topic.encoding <lagompy.topic.Topic.encoding>`).
MSGPACK = "application/msgpack"
JSON = "application/json"
#: A batch of messages as columns, in MessagePack (see :func:`messages_to_columns`).
COLUMNS = "application/vnd.lagompy.columns+msgpack"


def encode_payload(topic: Topic[Any], payload: Any) -> bytes:
    """A payload's bytes in ``topic``'s encoding: its JSON form as JSON, or as a MessagePack
    map (the same structure, so one JSON Schema describes both)."""
    adapter = _adapter(type(payload))
    if topic.encoding == "json":
        return adapter.dump_json(payload)
    return cast(bytes, msgpack.packb(adapter.dump_python(payload, mode="json")))


def encode_payloads(topic: Topic[Any], payloads: list[Any]) -> list[bytes]:
    """:func:`encode_payload` of each payload, those of a MessagePack topic that are all of
    its message type turned into their JSON form in one call into pydantic (one call per
    payload was half of the encoding's cost in a producer, 2026-12-06)."""
    cls = topic.message_type
    if topic.encoding == "json" or not all(type(p) is cls for p in payloads):
        return [encode_payload(topic, p) for p in payloads]
    packb = msgpack.packb
    return [packb(o) for o in _list_adapter(cls).dump_python(payloads, mode="json")]


def decode_body(topic: Topic[Any], data: bytes, content_type: str | None, version: int) -> object:
    """The JSON-form object of a payload's bytes, by their content type (none: JSON, as
    messages were before MessagePack), brought to the current version (:func:`upcast_payload`);
    ``TopicMessageInvalid`` naming what does not fit."""
    what = f"message type {topic.type_name!r} version {version}"
    if content_type in (None, JSON):
        try:
            body = json.loads(data)
        except ValueError:
            raise TopicMessageInvalid(f"{what}: the payload is not JSON") from None
    elif content_type == MSGPACK:
        try:
            body = msgpack.unpackb(data)
        except Exception:  # msgpack raises several unrelated types for bad input
            raise TopicMessageInvalid(f"{what}: the payload is not MessagePack") from None
    else:
        raise TopicMessageInvalid(f"{what}: unknown content type {content_type!r:.60}")
    return upcast_payload(topic, body, version)


def upcast_payload(topic: Topic[Any], payload: object, version: int) -> object:
    """The JSON payload of a message of ``version`` in the form of the topic's current version.

    ``upcasters[k]`` of the message type (``@serializable(version=N, upcasters={k: f})``) gets
    the version-``k`` payload as its JSON object (a ``dict``: fields by name, datetimes as ISO
    strings...) and returns the version-``k+1`` object. ``TopicMessageInvalid`` names the missing
    upcaster, or the one that failed."""
    newest = type_info(topic.message_type)
    if version == newest.version:
        return payload
    what = f"message type {topic.type_name!r} version {version}"
    if version < 1 or version > newest.version:
        raise TopicMessageInvalid(f"{what} is not one this side reads (1..{newest.version})")
    if not isinstance(payload, dict):
        raise TopicMessageInvalid(f"{what}: the payload must be a JSON object to be upcast")
    for n in range(version, newest.version):
        upcaster = newest.upcasters.get(n)
        if upcaster is None:
            raise TopicMessageInvalid(
                f"cannot read {what}: {topic.message_type.__qualname__} has no upcaster from "
                f"version {n} to {n + 1}"
            )
        try:
            payload = upcaster(dict(payload))
        except Exception as e:
            raise TopicMessageInvalid(
                f"{what}: the upcaster from version {n} to {n + 1} raised "
                f"{type(e).__name__}: {e!s:.200}"
            ) from None
        if not isinstance(payload, dict):
            raise TopicMessageInvalid(
                f"{what}: the upcaster from version {n} to {n + 1} returned "
                f"{type(payload).__name__}, not a dict"
            )
    return payload


def _message(data: dict[str, Any], payload: Any, partition: int) -> Message[Any]:
    for name, kind in _FIELDS:
        _field(data, name, kind)
    # Built in its __dict__, as Topic.message does (see there).
    message: Message[Any] = _new(Message)
    message.__dict__.update(
        topic=data["topic"],
        payload=payload,
        key=data["key"],
        partition=partition,
        offset=data["offset"],
        timestamp=_timestamp(data["timestamp"]),
        type_name=data["type"],
        version=data["version"],
        entity_type=data["entity_type"],
        entity_id=data["entity_id"],
        seq_nr=data["seq_nr"],
    )
    return message


def _payload_error(topic: Topic[Any], error: ValidationError) -> TopicMessageInvalid:
    return TopicMessageInvalid(
        f"the payload does not fit {topic.message_type.__qualname__}: "
        f"{error.error_count()} error(s), first: {_first(error)}"
    )


def message_from_json(topic: Topic[Any], data: object, *, partition: int) -> Message[Any]:
    """A message of ``topic``'s partition from its JSON object; ``TopicMessageInvalid`` naming
    what does not fit (a missing field, a payload the message type refuses, another topic's or
    partition's message, a type name or a version this side does not know)."""
    checked = _check_header(topic, data, partition)
    raw = upcast_payload(topic, checked.get("payload"), checked["version"])
    try:
        payload = _adapter(topic.message_type).validate_python(raw)
    except ValidationError as e:
        raise _payload_error(topic, e) from None
    return _message(checked, payload, partition)


def messages_from_json(
    topic: Topic[Any], items: Sequence[object], *, partition: int
) -> list[Message[Any]]:
    """:func:`message_from_json` of a batch, its payloads validated in one call.

    The metadata of each message is checked in one expression, and only a message that fails
    it goes through the checks that name what is wrong: per message, the named checks cost as
    much as the rest of a pull (HTTP catch-up on SQLite, 2026-12-04)."""
    expected = (topic.name, partition, topic.type_name)
    newest = topic.version
    out_of_line: list[dict[str, Any]] = []
    for data in items:
        if not (
            type(data) is dict
            and (data.get("topic"), data.get("partition"), data.get("type")) == expected
            and type(data.get("version")) is int
            and data["version"] <= newest
            and type(data.get("offset")) is int
            and type(data.get("seq_nr")) is int
            and type(data.get("key")) is str
            and type(data.get("entity_type")) is str
            and type(data.get("entity_id")) is str
            and type(data.get("timestamp")) is str
        ):
            out_of_line.append(_check_header(topic, data, partition))
    for data in out_of_line:  # passed the named checks: a field the fast check refused
        for name, kind in _FIELDS:
            _field(data, name, kind)
    checked = cast(Sequence[dict[str, Any]], items)
    try:
        payloads = _list_adapter(topic.message_type).validate_python(
            [
                d.get("payload")
                if d["version"] == newest
                else upcast_payload(topic, d.get("payload"), d["version"])
                for d in checked
            ]
        )
    except ValidationError as e:
        raise _payload_error(topic, e) from None
    messages = []
    times: tuple[str, datetime] | None = None
    for data, payload in zip(checked, payloads, strict=True):
        stamp = data["timestamp"]
        if times is None or times[0] != stamp:  # one transaction's messages share it
            times = (stamp, _timestamp(stamp))
        message: Message[Any] = _new(Message)
        message.__dict__.update(
            topic=expected[0],
            payload=payload,
            key=data["key"],
            partition=partition,
            offset=data["offset"],
            timestamp=times[1],
            type_name=expected[2],
            version=data["version"],
            entity_type=data["entity_type"],
            entity_id=data["entity_id"],
            seq_nr=data["seq_nr"],
        )
        messages.append(message)
    return messages


#: The metadata fields besides topic, partition, type and version, and their JSON types.
_FIELDS = (
    ("offset", int),
    ("seq_nr", int),
    ("key", str),
    ("entity_type", str),
    ("entity_id", str),
    ("timestamp", str),
)


def _timestamp(text: str) -> datetime:
    try:
        timestamp = datetime.fromisoformat(text)
    except ValueError as e:
        raise TopicMessageInvalid(f"bad timestamp: {e}") from None
    if timestamp.tzinfo is None:
        raise TopicMessageInvalid("bad timestamp: it has no zone")
    return timestamp


def _first(error: ValidationError) -> str:
    first = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
    return f"{where}: {first.get('msg', '')}"


# --------------------------------------------------------------------------- columns

#: The per-message columns of a batch (see :func:`messages_to_columns`) and their types.
_COLUMNS = (
    ("offset", int),
    ("key", str),
    ("timestamp", str),
    ("version", int),
    ("entity_type", str),
    ("entity_id", str),
    ("seq_nr", int),
)


def messages_to_columns(
    topic: Topic[Any], partition: int, messages: Sequence[Message[Any]]
) -> dict[str, Any]:
    """A batch of messages as columns: ``topic``, ``partition`` and ``type`` once, then one
    array per field (``offset``, ``key``, ``timestamp``, ``version``, ``entity_type``,
    ``entity_id``, ``seq_nr``, ``payload``; the n-th message is the n-th item of each). The
    same values as :func:`messages_to_json`'s objects (payloads in their JSON form), without
    one object per message: lagompy's HTTP feeds ask for it in MessagePack, where an object per
    message (its eleven keys packed and unpacked as strings, a dict made for each) cost more
    than the rest of the pull (HTTP catch-up, 2026-12-05)."""
    stamps: dict[datetime, str] = {}
    timestamps = []
    for m in messages:  # one transaction's messages share their timestamp
        stamp = stamps.get(m.timestamp)
        if stamp is None:
            stamp = stamps[m.timestamp] = m.timestamp.isoformat()
        timestamps.append(stamp)
    return {
        "topic": topic.name,
        "partition": partition,
        "type": topic.type_name,
        "offset": [m.offset for m in messages],
        "key": [m.key for m in messages],
        "timestamp": timestamps,
        "version": [m.version for m in messages],
        "entity_type": [m.entity_type for m in messages],
        "entity_id": [m.entity_id for m in messages],
        "seq_nr": [m.seq_nr for m in messages],
        "payload": _list_adapter(topic.message_type).dump_python(
            [m.payload for m in messages], mode="json"
        ),
    }


def messages_from_columns(topic: Topic[Any], data: object, *, partition: int) -> list[Message[Any]]:
    """The messages of :func:`messages_to_columns`'s ``data``, checked as
    :func:`messages_from_json` checks objects; ``TopicMessageInvalid`` naming what does not
    fit."""
    if type(data) is not dict:
        raise TopicMessageInvalid(f"a batch must be a map, got {type(data).__name__}")
    name, number, type_name = data.get("topic"), data.get("partition"), data.get("type")
    if name != topic.name or number != partition or type(number) is not int:
        raise TopicMessageInvalid(
            f"expected messages of topic {topic.name!r} partition {partition}, got "
            f"{name!r:.100} partition {number!r:.20}"
        )
    if type_name != topic.type_name:
        raise TopicMessageInvalid(
            f"message type {type_name!r:.100} is not this topic's ({topic.type_name!r})"
        )
    payloads = data.get("payload")
    if type(payloads) is not list:
        raise TopicMessageInvalid("column 'payload' must be an array")
    count = len(payloads)
    columns = []
    for field, kind in _COLUMNS:
        column = data.get(field)
        if type(column) is not list or len(column) != count:
            raise TopicMessageInvalid(f"column {field!r} must be an array of {count} items")
        if not all(type(v) is kind for v in column):
            bad = next(v for v in column if type(v) is not kind)
            raise TopicMessageInvalid(
                f"column {field!r} must hold {kind.__name__}s, got {bad!r:.80}"
            )
        columns.append(column)
    offsets, keys, stamps, versions, entity_types, entity_ids, seq_nrs = columns
    newest = topic.version
    if count and max(versions) > newest:
        version = max(versions)
        raise TopicMessageInvalid(
            f"message type {type_name!r} version {version} is newer than this side's "
            f"{topic.message_type.__qualname__} (version {newest}): upgrade the subscriber's "
            "message class"
        )
    if any(v != newest for v in versions):
        payloads = [
            p if v == newest else upcast_payload(topic, p, v)
            for p, v in zip(payloads, versions, strict=True)
        ]
    try:
        values = _list_adapter(topic.message_type).validate_python(payloads)
    except ValidationError as e:
        raise _payload_error(topic, e) from None
    messages = []
    times: tuple[str, datetime] | None = None
    for i, payload in enumerate(values):
        stamp = stamps[i]
        if times is None or times[0] != stamp:  # one transaction's messages share it
            times = (stamp, _timestamp(stamp))
        # Built in its __dict__, as Topic.message does (see there).
        message: Message[Any] = _new(Message)
        message.__dict__.update(
            topic=name,
            payload=payload,
            key=keys[i],
            partition=partition,
            offset=offsets[i],
            timestamp=times[1],
            type_name=type_name,
            version=versions[i],
            entity_type=entity_types[i],
            entity_id=entity_ids[i],
            seq_nr=seq_nrs[i],
        )
        messages.append(message)
    return messages
