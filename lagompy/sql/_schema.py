"""lagompy's journal tables, as SQLAlchemy Core metadata (SQLite and PostgreSQL).

``lagompy_events``
    One row per event. ``global_offset`` is assigned by the database and never reused, even after
    deletes (``AUTOINCREMENT`` on SQLite, an identity column on PostgreSQL). ``(entity_type,
    entity_id, seq_nr)`` is unique: a second writer can never merge into an entity's history.
    ``slice`` is the entity's slice (``lagompy.journal``'s ``slice_of``: ``stable_hash(entity_id)
    % 1024``), the same for all its events (migration 0013).
``lagompy_event_tags``
    One row per (tag, event): exact tag lookup in offset order for read sides.
``lagompy_deletions``
    Per entity, the highest sequence number ever deleted (``deleted_to``), so that deleting
    events never lowers the entity's highest sequence number; and the highest sequence number
    at which a deletion left the entity with no events at all (``restarted_at``, 0: never,
    migration 0014): it was forgotten there, and recovery starts it again from its initial
    state at that number, under the events it wrote since.
``lagompy_snapshots``
    Saved states, one row per (entity, sequence number).
``lagompy_command_replies``
    The encoded reply of every command (with a command id) that persisted events, written in the
    same transaction as its events and keyed by ``(entity_type, entity_id, command_id)``:
    a retried command is answered from here instead of being applied twice. ``seq_nr`` is the
    highest sequence number of the command's events; deleting events up to a sequence number
    deletes the replies up to it too.
``lagompy_readside_offsets``
    One row per (read-side processor, tag) in the *projection* database: the offset of the last
    event the processor's handlers committed, and the lease that lets one worker at a time
    commit there (``owner``, ``epoch``, ``lease_expires_us``). Every batch updates the offset
    only where ``epoch`` is still the worker's own, in the same transaction as the handlers'
    writes. Also the persisted pause flag, the state a worker reports (``running``, ``paused``,
    ``failed``...), its events/s, and the last handler failure (error, offset, entity, sequence
    number, attempts). The row with tag ``*`` is the processor's own lease, held while its
    ``global_prepare`` runs.
``lagompy_idempotency_keys``
    One row per (service, ``Idempotency-Key``): the request the key was first used with (its
    ``method``, its route's path template and a ``fingerprint`` of the whole request: method,
    route, path and query parameters, body), when it was bound (``created_us``, which also
    makes the command ids of its asks unique to this binding), until when its first request
    counts as in flight (``in_flight_until_us``, 0 once it answered) and how many later
    requests repeated it (``repeats``). A key is bound for the service's key lifetime; expired
    rows are taken over by the next request with the key, and swept.
``lagompy_console_audit``
    One row per action taken in the management console (``lagompy.console``): when (``at_us``),
    in which service, by whom (``actor``), what (``action`` and its ``target``), and how it
    ended (``result``: ``ok``, ``refused`` or ``failed``, with a ``detail``). ``id`` orders them.
``lagompy_workflow_runs``
    One row per durable workflow run (``lagompy.workflow``), written by the workflow executor's
    consumer of the runs' tag with its position (exactly once): the run's workflow, version,
    key, parent, status (``queued``, ``running``, ``completed``, ``failed``, ``cancelled``),
    the tag (partition) whose executor drives it, the number of recorded steps, a durable
    timer's wake time, whether a cancel was asked, timestamps and the error. Admission
    (``queued`` -> ``running``) is the one write outside the consumer.
``lagompy_workflow_types``
    One row per workflow name: its concurrency limit (``max_running``, from the code) and the
    operator's ``paused`` flag; admissions of the type lock it.
``lagompy_parked``
    In the *projection* (or subscriber's) database: one row per event (read side) or message
    (topic subscriber) that a consumer with ``on_failure="park"`` gave up on after
    ``max_attempts``, written in the same fenced transaction that moves the consumer's offset
    past it. ``consumer_kind`` (``read-side`` or ``subscriber``), ``consumer`` (the processor's
    name, or ``topic:<topic>:<group>``), ``tag`` (the tag or partition tag) and
    ``event_offset`` name it (unique together); ``entity_type``, ``entity_id``, ``seq_nr`` and
    ``event_type`` say what it was; ``error_class``, ``error`` (as failures show them: no SQL
    text, no parameters) and ``attempts`` why. ``message`` is a subscriber's message as its
    JSON form (HTTP and NATS messages are not in this database's journal; a read side re-reads
    its event from the journal by offset). ``retry_requested_us`` is set by an operator's
    retry: the consumer's worker runs the handler again and deletes the row in one
    transaction; ``retries`` counts the retries that failed again.
``lagompy_consumer_members``
    In the *projection* (or consumer's) database, beside the offsets: one row per running
    instance (``member``) of a consumer (``consumer``: a read-side processor's name...), with
    when it joined and until when it counts as live (``expires_us``, pushed forward by a
    heartbeat every renew interval; a member that stops deletes its row). The live members,
    sorted, spread the consumer's partitions between them (``lagompy.consumer``'s
    ``Membership``).
``lagompy_topic_messages``
    On a journal placed on several databases, the relay log of the topics the service
    publishes (in the home database; migration 0015): one row per message, keyed by
    ``(topic, partition, message_offset)``, the offset gap-free from 1 per partition (a topic
    partition keeps one sequence of positions whichever database its events come from). The
    row holds what a :class:`~lagompy.topic.Message` carries: ``message_key``, the source
    event's ``entity_type``, ``entity_id``, ``seq_nr`` and ``written_at_us``, and the payload
    encoded by lagompy's serializer (``type_name``, ``version``, ``payload``); plus where it
    came from (``source_database``, ``source_offset``), for operators.
``lagompy_topic_heads``
    Per (topic, partition) of the relay log, the last offset allocated (``last_offset``): a
    relay's transaction moves it with ``UPDATE ... RETURNING``, so the row lock makes the next
    allocator wait for the previous commit, and offsets commit in order, without gaps.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

# SQLite only gives AUTOINCREMENT semantics (never reuse a rowid) to an INTEGER PRIMARY KEY.
_OffsetType = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "lagompy_events",
    metadata,
    Column("global_offset", _OffsetType, primary_key=True, autoincrement=True),
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("event_type", String(255), nullable=False),
    Column("event_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("tags", LargeBinary, nullable=True),
    Column("written_at_us", BigInteger, nullable=False),
    Column("metadata", LargeBinary, nullable=True),
    Column("slice", Integer, nullable=False),
    UniqueConstraint("entity_type", "entity_id", "seq_nr", name="uq_lagompy_events_entity_seq"),
    sqlite_autoincrement=True,
)

event_tags = Table(
    "lagompy_event_tags",
    metadata,
    Column("tag", String(255), nullable=False),
    Column("global_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("tag", "global_offset", name="pk_lagompy_event_tags"),
)
Index("ix_lagompy_event_tags_offset", event_tags.c.global_offset)

deletions = Table(
    "lagompy_deletions",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("deleted_to", BigInteger, nullable=False),
    Column("restarted_at", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("entity_type", "entity_id", name="pk_lagompy_deletions"),
)

snapshots = Table(
    "lagompy_snapshots",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("written_at_us", BigInteger, nullable=False),
    Column("state_type", String(255), nullable=False),
    Column("state_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    PrimaryKeyConstraint("entity_type", "entity_id", "seq_nr", name="pk_lagompy_snapshots"),
)

command_replies = Table(
    "lagompy_command_replies",
    metadata,
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("command_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    PrimaryKeyConstraint(
        "entity_type", "entity_id", "command_id", name="pk_lagompy_command_replies"
    ),
)

readside_offsets = Table(
    "lagompy_readside_offsets",
    metadata,
    Column("processor", String(255), nullable=False),
    Column("tag", String(255), nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("owner", String(255), nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("lease_expires_us", BigInteger, nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("state", String(32), nullable=False),
    Column("events_per_s", Float, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("skipped", BigInteger, nullable=False),
    Column("error", Text, nullable=True),
    Column("error_offset", BigInteger, nullable=True),
    Column("error_entity_type", String(255), nullable=True),
    Column("error_entity_id", String(255), nullable=True),
    Column("error_seq_nr", BigInteger, nullable=True),
    Column("error_attempts", Integer, nullable=True),
    Column("error_at_us", BigInteger, nullable=True),
    PrimaryKeyConstraint("processor", "tag", name="pk_lagompy_readside_offsets"),
)

idempotency_keys = Table(
    "lagompy_idempotency_keys",
    metadata,
    Column("scope", String(255), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("method", String(16), nullable=False),
    Column("route", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("in_flight_until_us", BigInteger, nullable=False),
    Column("repeats", BigInteger, nullable=False),
    PrimaryKeyConstraint("idempotency_key", "scope", name="pk_lagompy_idempotency_keys"),
)
Index("ix_lagompy_idempotency_keys_created", idempotency_keys.c.created_us)

console_audit = Table(
    "lagompy_console_audit",
    metadata,
    Column("id", _OffsetType, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("service", String(255), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", Text, nullable=False),
    Column("result", String(32), nullable=False),
    Column("detail", Text, nullable=True),
    sqlite_autoincrement=True,
)

process_states = Table(
    "lagompy_process_states",
    metadata,
    Column("manager", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("tag", String(255), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("state_type", String(255), nullable=False),
    Column("state_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("manager", "key", name="pk_lagompy_process_states"),
)

process_timers = Table(
    "lagompy_process_timers",
    metadata,
    Column("manager", String(255), nullable=False),
    Column("timer_id", String(255), nullable=False),
    Column("tag", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("due_us", BigInteger, nullable=False),
    Column("message_type", String(255), nullable=False),
    Column("message_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    PrimaryKeyConstraint("manager", "timer_id", name="pk_lagompy_process_timers"),
)
Index(
    "ix_lagompy_process_timers_due",
    process_timers.c.manager,
    process_timers.c.tag,
    process_timers.c.due_us,
)
Index("ix_lagompy_process_timers_key", process_timers.c.manager, process_timers.c.key)

workflow_runs = Table(
    "lagompy_workflow_runs",
    metadata,
    Column("run_id", String(255), nullable=False),
    Column("workflow", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_key", String(255), nullable=True),
    Column("parent", String(255), nullable=True),
    Column("status", String(32), nullable=False),
    Column("tag", String(255), nullable=False),
    Column("steps", Integer, nullable=False),
    Column("wake_at_us", BigInteger, nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("finished_us", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    PrimaryKeyConstraint("run_id", name="pk_lagompy_workflow_runs"),
)
Index("ix_lagompy_workflow_runs_tag", workflow_runs.c.tag, workflow_runs.c.status)
Index(
    "ix_lagompy_workflow_runs_workflow",
    workflow_runs.c.workflow,
    workflow_runs.c.status,
    workflow_runs.c.created_us,
)

workflow_types = Table(
    "lagompy_workflow_types",
    metadata,
    Column("workflow", String(255), nullable=False),
    Column("max_running", Integer, nullable=True),
    Column("paused", Boolean, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("workflow", name="pk_lagompy_workflow_types"),
)
parked = Table(
    "lagompy_parked",
    metadata,
    Column("id", _OffsetType, primary_key=True, autoincrement=True),
    Column("consumer_kind", String(32), nullable=False),
    Column("consumer", String(255), nullable=False),
    Column("tag", String(255), nullable=False),
    Column("event_offset", BigInteger, nullable=False),
    Column("entity_type", String(255), nullable=True),
    Column("entity_id", String(255), nullable=True),
    Column("seq_nr", BigInteger, nullable=True),
    Column("event_type", String(255), nullable=True),
    Column("error_class", String(255), nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("parked_at_us", BigInteger, nullable=False),
    Column("message", Text, nullable=True),
    Column("retry_requested_us", BigInteger, nullable=True),
    Column("retries", Integer, nullable=False),
    UniqueConstraint("consumer", "tag", "event_offset", name="uq_lagompy_parked_position"),
    sqlite_autoincrement=True,
)
Index("ix_lagompy_parked_error_class", parked.c.error_class)
Index("ix_lagompy_parked_entity", parked.c.entity_type, parked.c.entity_id)

consumer_members = Table(
    "lagompy_consumer_members",
    metadata,
    Column("consumer", String(255), nullable=False),
    Column("member", String(255), nullable=False),
    Column("joined_us", BigInteger, nullable=False),
    Column("heartbeat_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    PrimaryKeyConstraint("consumer", "member", name="pk_lagompy_consumer_members"),
)

topic_messages = Table(
    "lagompy_topic_messages",
    metadata,
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("message_offset", BigInteger, nullable=False),
    Column("message_key", Text, nullable=False),
    Column("entity_type", String(255), nullable=False),
    Column("entity_id", String(255), nullable=False),
    Column("seq_nr", BigInteger, nullable=False),
    Column("written_at_us", BigInteger, nullable=False),
    Column("type_name", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("source_database", String(255), nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition", "message_offset", name="pk_lagompy_topic_messages"),
)

topic_heads = Table(
    "lagompy_topic_heads",
    metadata,
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition", name="pk_lagompy_topic_heads"),
)
