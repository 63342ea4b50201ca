"""Language-neutral descriptions of a service's topics: a JSON Schema per message type (its
current version) and an AsyncAPI 3 document of every topic, so that a consumer written in any
language knows what it reads::

    GET /topics/asyncapi.json            the AsyncAPI 3.0 document (linked from the OpenAPI docs)
    GET /topics/{name}/schema            the JSON Schema (2020-12) of the topic's message payload

A message has one structure on both transports, in JSON or in MessagePack (the topic's
``encoding``; the message's content type says which): over HTTP the object of
:func:`~lagompy.topic.message_to_json` (metadata and ``payload``), over NATS JetStream the
payload alone with the metadata in headers. The document describes both: one channel per topic
whose address is the NATS subject pattern (``<prefix>.<topic>.{partition}``), the headers, and the
HTTP route in the channel's description.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import TypeAdapter

from lagompy.topic._topic import Topic

__all__ = ["asyncapi_document", "envelope_schema", "message_schema", "schema_router"]

_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def message_schema(topic: Topic[Any]) -> dict[str, Any]:
    """The JSON Schema of ``topic``'s payload as it is published (the message type's current
    version), with its stored type name and version."""
    schema = TypeAdapter(topic.message_type).json_schema(mode="serialization")
    return {
        "$schema": _SCHEMA_DIALECT,
        "title": topic.type_name,
        "x-lagompy-type": topic.type_name,
        "x-lagompy-version": topic.version,
        **{k: v for k, v in schema.items() if k != "title"},
    }


def envelope_schema(topic: Topic[Any]) -> dict[str, Any]:
    """The JSON Schema of a message as the HTTP route serves it: metadata and ``payload``."""
    payload = message_schema(topic)
    definitions = payload.pop("$defs", {})
    payload.pop("$schema", None)
    return {
        "$schema": _SCHEMA_DIALECT,
        "title": f"{topic.name} message",
        "type": "object",
        "required": [
            "topic",
            "partition",
            "offset",
            "key",
            "timestamp",
            "type",
            "version",
            "entity_type",
            "entity_id",
            "seq_nr",
            "payload",
        ],
        "properties": {
            "topic": {"const": topic.name},
            "partition": {"type": "integer", "minimum": 0, "maximum": topic.partitions - 1},
            "offset": {"type": "integer", "minimum": 1},
            "key": {"type": "string"},
            "timestamp": {"type": "string", "format": "date-time"},
            "type": {"const": topic.type_name},
            "version": {"type": "integer", "minimum": 1, "maximum": topic.version},
            "entity_type": {"type": "string"},
            "entity_id": {"type": "string"},
            "seq_nr": {"type": "integer", "minimum": 1},
            "payload": payload,
        },
        **({"$defs": definitions} if definitions else {}),
    }


#: The headers of a message on NATS JetStream (see lagompy.topic._nats_wire).
_NATS_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": [
        "Nats-Msg-Id",
        "Lagompy-Offset",
        "Lagompy-Type",
        "Lagompy-Version",
        "Lagompy-Time",
    ],
    "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "topic:partition:offset (dedup)."},
        "Lagompy-Offset": {
            "type": "string",
            "description": "The source event's journal offset: the position to store.",
        },
        "Lagompy-Key": {"type": "string", "description": "The message key, percent-encoded."},
        "Lagompy-Entity-Type": {"type": "string", "description": "Percent-encoded."},
        "Lagompy-Entity-Id": {"type": "string", "description": "Percent-encoded."},
        "Lagompy-Seq-Nr": {"type": "string", "description": "The event's sequence number."},
        "Lagompy-Time": {"type": "string", "description": "When the event was written (ISO)."},
        "Lagompy-Type": {"type": "string", "description": "The message type's stored name."},
        "Lagompy-Version": {"type": "string", "description": "Its schema version."},
        "Lagompy-Position-Only": {
            "type": "string",
            "description": "Present ('1') on a position marker: no payload; skip it.",
        },
    },
}


def asyncapi_document(
    topics: Iterable[Topic[Any]],
    *,
    title: str = "topics",
    version: str = "1",
    subject_prefix: str = "lagompy",
    http_prefix: str = "/topics",
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``topics`` (see the module's docs)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for topic in topics:
        payload = message_schema(topic)
        payload.pop("$schema", None)
        key = f"{topic.type_name}.v{topic.version}"
        schemas[key] = payload
        messages[key] = {
            "name": topic.type_name,
            "title": f"{topic.type_name} version {topic.version}",
            "contentType": topic.media_type,
            "headers": _NATS_HEADERS,
            "payload": {"$ref": f"#/components/schemas/{key}"},
            "correlationId": {"location": "$message.header#/Nats-Msg-Id"},
        }
        channels[topic.name] = {
            "address": f"{subject_prefix}.{topic.name}.{{partition}}",
            "title": topic.name,
            "description": (
                f"Messages of topic {topic.name!r}: {topic.partitions} partitions (one per shard "
                f"of the source entity's tag: an entity's messages are in order in one), keyed "
                f"by entity id unless the topic says otherwise. Over HTTP: GET "
                f"{http_prefix}/{topic.name}/partitions/{{partition}}?after=OFFSET (the "
                f"message objects carry the payload and these headers' values; lagompy's "
                f"subscribers ask for the same values as MessagePack columns, Accept: "
                f"application/vnd.lagompy.columns+msgpack)."
            ),
            "parameters": {
                "partition": {
                    "enum": [str(p) for p in range(topic.partitions)],
                    "description": "The partition: a shard of the source entity's tag.",
                }
            },
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        }
        operations[f"publish-{topic.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{topic.name}"},
            "messages": [{"$ref": f"#/channels/{topic.name}/messages/{key}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Topics published by this service (lagompy): positions are journal "
            "offsets; at-least-once delivery, deduplicated by message id.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def schema_router(
    topics: Iterable[Topic[Any]],
    *,
    prefix: str = "/topics",
    title: str = "topics",
    subject_prefix: str = "lagompy",
) -> APIRouter:
    """``GET {prefix}/asyncapi.json`` (in the OpenAPI docs) and ``GET {prefix}/{name}/schema``
    (404 problem document for an unknown topic)."""
    by_name = {t.name: t for t in topics}
    document = asyncapi_document(
        by_name.values(), title=title, subject_prefix=subject_prefix, http_prefix=prefix
    )
    router = APIRouter(prefix=prefix, tags=["topics"])

    @router.get(
        "/asyncapi.json",
        summary="AsyncAPI 3 document of the topics this service publishes",
        description="Channels (one per topic, NATS subject per partition), messages, headers "
        "and payload JSON Schemas; each topic's schema alone at GET {prefix}/{name}/schema.",
    )
    async def asyncapi() -> dict[str, Any]:
        return document

    @router.get("/{name}/schema", include_in_schema=False)
    async def schema(name: str) -> dict[str, Any]:
        topic = by_name.get(name)
        if topic is None:
            raise HTTPException(status_code=404, detail=f"no topic named {name!r:.120}")
        return message_schema(topic)

    return router
