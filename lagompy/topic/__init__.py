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
  :func:`message_command_id`.
* ``_subscriber.py``: :class:`Subscriber`.
* ``_transport.py``: the transport protocol (:class:`TopicTransport`, :class:`MessageFeed`,
  :class:`TopicProducer`, :class:`MessageBatch`) and the contract every transport keeps.
"""

from lagompy.topic._subscriber import Subscriber, offset_key
from lagompy.topic._topic import Message, StartFrom, Topic, entity_key, message_command_id
from lagompy.topic._transport import MessageBatch, MessageFeed, TopicProducer, TopicTransport

__all__ = [
    "Message",
    "MessageBatch",
    "MessageFeed",
    "StartFrom",
    "Subscriber",
    "Topic",
    "TopicProducer",
    "TopicTransport",
    "entity_key",
    "message_command_id",
    "offset_key",
]
