"""Messages as JSON: the language-neutral form the HTTP route serves (and any transport may
publish). A message is an object with its metadata and its payload::

    {"topic": "user-events", "partition": 2, "offset": 1041, "key": "ada",
     "timestamp": "2026-12-04T18:20:11.532000+00:00", "type": "UserRegistration", "version": 1,
     "entity_type": "user", "entity_id": "ada", "seq_nr": 1,
     "payload": {"user_id": "ada", "name": "Ada", "email": "ada@example.org"}}

The payload is the message dataclass as JSON: fields by name; datetimes, dates and times in ISO
8601; UUIDs and decimals as strings; bytes as base64; nested dataclasses as objects; tuples and
sets as arrays (pydantic's JSON mode, both ways).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from lagompy.errors import TopicMessageInvalid
from lagompy.topic._topic import Message, Topic

__all__ = ["message_from_json", "message_to_json"]


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def message_to_json(message: Message[Any]) -> dict[str, Any]:
    """The JSON object of a message (see the module's docs)."""
    payload = _adapter(type(message.payload)).dump_python(message.payload, mode="json")
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


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TopicMessageInvalid(f"field {name!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def message_from_json(topic: Topic[Any], data: object, *, partition: int) -> Message[Any]:
    """A message of ``topic``'s partition from its JSON object; ``TopicMessageInvalid`` naming
    what does not fit (a missing field, a payload the message type refuses, another topic's or
    partition's message, a type name or a version this side does not know)."""
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
    try:
        timestamp = datetime.fromisoformat(_field(data, "timestamp", str))
        payload = _adapter(topic.message_type).validate_python(data.get("payload"))
    except ValidationError as e:
        raise TopicMessageInvalid(
            f"the payload does not fit {topic.message_type.__qualname__}: "
            f"{e.error_count()} error(s), first: {_first(e)}"
        ) from None
    except ValueError as e:
        raise TopicMessageInvalid(f"bad timestamp: {e}") from None
    return Message(
        topic=name,
        payload=payload,
        key=_field(data, "key", str),
        partition=partition,
        offset=_field(data, "offset", int),
        timestamp=timestamp,
        type_name=type_name,
        version=version,
        entity_type=_field(data, "entity_type", str),
        entity_id=_field(data, "entity_id", str),
        seq_nr=_field(data, "seq_nr", int),
    )


def _first(error: ValidationError) -> str:
    first = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
    return f"{where}: {first.get('msg', '')}"
