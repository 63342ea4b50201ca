"""Topics: publish an entity's events to other services as public messages, with consumer
groups, stored positions and replay (Lagom's message broker API).

The producing service declares a :class:`Topic`: a name, a public message type (a frozen
dataclass, versioned like events), the source (an entity whose tag is a sharded tag:
partition ``i`` is shard ``i``), ``to_message(event) -> message | None`` and a key. Any service
subscribes with a :class:`Subscriber`: a ``group``, the ``topic`` and ``handle(conn, message)``,
whose SQL writes commit with the message's position in one transaction (exactly-once effect)::

    journal (tag shard i) ──▶ transport ──▶ feed of partition i ──▶ Subscriber.handle(conn, m)
                                                                    + position, one transaction

* ``_topic.py``: :class:`Topic`, :class:`Message`, :class:`StartFrom`,
  :func:`message_command_id`; ``_subscriber.py``: :class:`Subscriber`.
* ``_transport.py``: the transport protocol (:class:`TopicTransport`, :class:`MessageFeed`,
  :class:`TopicProducer`, :class:`MessageBatch`) and the contract every transport keeps.
* ``_embedded.py``: :class:`EmbeddedTransport`, subscribers in the journal's database read the
  tag in place; ``_http.py``: :func:`topic_router` (the producer's route) and
  :class:`HttpTransport` (a subscriber in another service pulls from it); ``_codec.py``:
  messages as JSON.
* ``_worker.py``: :class:`SubscriberWorker`, the consumer core fed by a transport, committing
  like a read side; ``_runner.py``: :func:`start_subscribers` and :class:`Subscribers`;
  ``_producers.py``: :func:`start_producers`, for transports with producers;
  ``_component.py``: :class:`TopicsComponent` and :class:`SubscribersComponent` for services;
  ``_ray.py``: :func:`start_subscribers_on_ray`, subscriber groups in Ray actors.
* ``_log.py``: where the producing service reads a partition's messages (the journal's tags,
  or on a journal placed on several databases the relay log); ``_relay.py``: the relays that
  write a placed journal's messages into that log, with offsets 1..N per partition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lagompy._lazy import on_first_use

if TYPE_CHECKING:
    from lagompy.topic._codec import (
        message_from_json,
        message_to_json,
        messages_from_json,
        messages_to_json,
    )
    from lagompy.topic._component import SubscribersComponent, TopicsComponent
    from lagompy.topic._embedded import EmbeddedTransport, JournalFeed
    from lagompy.topic._http import HttpFeed, HttpTransport, topic_router
    from lagompy.topic._nats import (
        BrokerSettings,
        NatsFeed,
        NatsProducer,
        NatsTransport,
        producer_name,
    )
    from lagompy.topic._producers import Producers, start_producers
    from lagompy.topic._ray import RaySubscribers, start_subscribers_on_ray, stop_subscribers_on_ray
    from lagompy.topic._runner import Subscribers, start_subscribers
    from lagompy.topic._schema import asyncapi_document, envelope_schema, message_schema
    from lagompy.topic._subscriber import Subscriber, offset_key
    from lagompy.topic._topic import Message, StartFrom, Topic, entity_key, message_command_id
    from lagompy.topic._transport import MessageBatch, MessageFeed, TopicProducer, TopicTransport
    from lagompy.topic._worker import SubscriberWorker

#: The public names, by the module that defines them; each is imported on first use
#: (:mod:`lagompy._lazy`).
_HOMES = {
    "lagompy.topic._codec": (
        "message_from_json",
        "message_to_json",
        "messages_from_json",
        "messages_to_json",
    ),
    "lagompy.topic._embedded": (
        "EmbeddedTransport",
        "JournalFeed",
    ),
    "lagompy.topic._nats": (
        "BrokerSettings",
        "NatsFeed",
        "NatsProducer",
        "NatsTransport",
        "producer_name",
    ),
    "lagompy.topic._producers": (
        "Producers",
        "start_producers",
    ),
    "lagompy.topic._runner": (
        "Subscribers",
        "start_subscribers",
    ),
    "lagompy.topic._subscriber": (
        "Subscriber",
        "offset_key",
    ),
    "lagompy.topic._topic": (
        "Message",
        "StartFrom",
        "Topic",
        "entity_key",
        "message_command_id",
    ),
    "lagompy.topic._transport": (
        "MessageBatch",
        "MessageFeed",
        "TopicProducer",
        "TopicTransport",
    ),
    "lagompy.topic._worker": ("SubscriberWorker",),
    "lagompy.topic._component": (
        "SubscribersComponent",
        "TopicsComponent",
    ),
    "lagompy.topic._http": (
        "HttpFeed",
        "HttpTransport",
        "topic_router",
    ),
    "lagompy.topic._ray": (
        "RaySubscribers",
        "start_subscribers_on_ray",
        "stop_subscribers_on_ray",
    ),
    "lagompy.topic._schema": (
        "asyncapi_document",
        "envelope_schema",
        "message_schema",
    ),
}

__all__ = [
    "BrokerSettings",
    "EmbeddedTransport",
    "HttpFeed",
    "HttpTransport",
    "JournalFeed",
    "Message",
    "MessageBatch",
    "MessageFeed",
    "NatsFeed",
    "NatsProducer",
    "NatsTransport",
    "Producers",
    "RaySubscribers",
    "StartFrom",
    "Subscriber",
    "SubscriberWorker",
    "Subscribers",
    "SubscribersComponent",
    "Topic",
    "TopicProducer",
    "TopicTransport",
    "TopicsComponent",
    "asyncapi_document",
    "entity_key",
    "envelope_schema",
    "message_command_id",
    "message_from_json",
    "message_schema",
    "message_to_json",
    "messages_from_json",
    "messages_to_json",
    "offset_key",
    "producer_name",
    "start_producers",
    "start_subscribers",
    "start_subscribers_on_ray",
    "stop_subscribers_on_ray",
    "topic_router",
]

if not TYPE_CHECKING:  # mypy sees the names above and flags any other
    __getattr__, __dir__ = on_first_use(__name__, _HOMES, globals())
