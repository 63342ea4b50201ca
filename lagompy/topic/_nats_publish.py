"""A link's publications to JetStream, written by lagompy instead of nats-py's
``publish_async``: :class:`Publications`.

A producer publishes a page of messages at a time and waits for the broker's acknowledgement
of each before it stores its position. nats-py's ``publish_async`` took ~40 us of the
producer's ~58 us of CPU per message (2026-12-07): per message a ``wait_for`` on its
semaphore (a task and a timer), a random token read from ``os.urandom``, the header block
built a header at a time, a future with a callback. Here a run of messages goes out as one
write of their ``HPUB`` commands (header blocks made by
:func:`~lagompy.topic._nats_wire._header_block`), each with a reply subject of its own under
one inbox subscription; the broker's answers resolve their futures. Publishing 50,000
messages with the same headers on one connection: ~63,000 messages/s at ~12 us of CPU each,
against ~22,000/s at ~41 us through ``publish_async``.

The same guarantees: at most ``max_in_flight`` messages of a link unacknowledged (credits
taken before a run is written, given back as each answer arrives or its wait ends), an
answer that is an error (or the broker's "no responders") fails the page, a page not
answered within ``ack_timeout`` fails it (its messages are published again, and the stream's
duplicate window drops those it had), and so does a wait of ``ack_timeout`` for a credit that
no answer gives back. This uses nats-py's private parts (``_send_command``,
``_flush_pending``): :func:`fits` tells whether the installed nats-py has them; the link
uses ``publish_async`` otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from lagompy.errors import TopicError

log = logging.getLogger("lagompy.topic")

__all__ = ["Publications", "fits", "unacknowledged"]


def fits(nc: Any) -> bool:
    """Whether the connection has the private parts :class:`Publications` writes through."""
    return all(
        callable(getattr(nc, name, None)) for name in ("_send_command", "_flush_pending")
    ) and isinstance(getattr(nc, "max_payload", None), int)


def unacknowledged(unanswered: int, sent: int, timeout: float) -> TopicError:
    """The error of a page whose messages were not all acknowledged within ``timeout``
    seconds (here, and through nats-py's ``publish_async``)."""
    return TopicError(
        f"the broker did not acknowledge {unanswered} of {sent} messages within {timeout} s"
    )


class Publications:
    """The publications of one connection (see the module's docs). :meth:`start` subscribes
    the inbox the answers come to."""

    def __init__(self, nc: Any, max_in_flight: int) -> None:
        self.nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._cut = len(self._prefix)
        self._reply = self._prefix.encode()
        self._next = 0
        #: token -> the future of the message whose answer is awaited.
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._free = max_in_flight
        self._freed = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self._prefix}*", cb=self._answered)

    async def _answered(self, msg: Any) -> None:
        """An answer of the broker: its future's result is the stream that stored the message,
        or a :class:`TopicError` saying why it did not."""
        future = self._waiting.pop(msg.subject[self._cut :], None)
        if future is None:  # its page failed or timed out already
            return
        self._give(1)
        if future.done():
            return
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is not None:  # 503: no stream takes the subject
            future.set_exception(TopicError(f"the broker answered status {status:.10}"))
            return
        try:
            answer = json.loads(msg.data)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("stream"), str):
            future.set_result(answer["stream"])
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        code = error.get("err_code") if isinstance(error, dict) else None
        future.set_exception(
            TopicError(f"the broker refused a message (error code {code})")
            if code is not None
            else TopicError("the broker's answer to a message does not read")
        )

    def _give(self, count: int) -> None:
        self._free += count
        self._freed.set()

    async def _take(self, wanted: int, timeout: float) -> int:
        """Credits for up to ``wanted`` messages (at least one), waiting for answers to give
        some back when none is left; 0 when none came back within ``timeout`` seconds (a
        broker that stopped answering holds every credit: the page fails as one whose answers
        did not come, rather than waiting for as long as the broker is stalled)."""
        if self._free <= 0:
            try:
                async with asyncio.timeout(timeout):
                    while self._free <= 0:
                        self._freed.clear()
                        await self._freed.wait()
            except TimeoutError:
                return 0
        granted = min(wanted, self._free)
        self._free -= granted
        return granted

    async def publish(
        self, subject: str, blocks: list[bytes], bodies: list[bytes], timeout: float
    ) -> list[str]:
        """Publish each body with its header block to ``subject``, in order; once every one
        is answered, the streams that stored them. :class:`TopicError` when one is refused,
        too large for the broker, or not answered within ``timeout`` seconds (waiting for
        credits included: no answer to free one within ``timeout`` fails the page too)."""
        limit = self.nc.max_payload
        for block, body in zip(blocks, bodies, strict=True):
            if len(block) + len(body) > limit:
                raise TopicError(
                    f"a message of {len(block) + len(body)} bytes is over the broker's "
                    f"limit of {limit}"
                )
        loop = asyncio.get_running_loop()
        head = b"HPUB " + subject.encode() + b" " + self._reply
        tokens: list[str] = []
        futures: list[asyncio.Future[str]] = []
        try:
            at, count = 0, len(bodies)
            while at < count:
                granted = await self._take(count - at, timeout)
                if not granted:
                    raise self._unacknowledged(tokens, timeout)
                commands = []
                for block, body in zip(
                    blocks[at : at + granted], bodies[at : at + granted], strict=True
                ):
                    self._next += 1
                    token = str(self._next)
                    future: asyncio.Future[str] = loop.create_future()
                    self._waiting[token] = future
                    tokens.append(token)
                    futures.append(future)
                    size = len(block)
                    commands.append(
                        b"%s%s %d %d\r\n%s%s\r\n"
                        % (head, token.encode(), size, size + len(body), block, body)
                    )
                at += granted
                await self.nc._send_command(b"".join(commands))
                await self.nc._flush_pending()
            try:
                async with asyncio.timeout(timeout):
                    return list(await asyncio.gather(*futures))
            except TimeoutError:
                raise self._unacknowledged(tokens, timeout) from None
        finally:
            for token in tokens:
                if self._waiting.pop(token, None) is not None:
                    self._give(1)
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # (retrieved: the first one raised already)

    def _unacknowledged(self, tokens: list[str], timeout: float) -> TopicError:
        return unacknowledged(sum(token in self._waiting for token in tokens), len(tokens), timeout)

    def close(self) -> None:
        """Fail what still waits for an answer (the connection is closing)."""
        waiting, self._waiting = self._waiting, {}
        self._give(len(waiting))
        for future in waiting.values():
            if not future.done():
                future.set_exception(TopicError("the connection to the broker was closed"))
