"""The topic contract suite (lagompy.testkit.topics) for the embedded transports, on SQLite and
PostgreSQL: subscribers in the journal's database reading the tag in place, and subscribers
pulling over real HTTP from a producing service on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from lagompy.service import BreakerRegistry, Service
from lagompy.testkit.server import serve_in_thread
from lagompy.testkit.topics import TopicContract, TopicEnv, contract_topic
from lagompy.topic import HttpTransport, TopicsComponent, TopicTransport


class TestEmbeddedTopics(TopicContract):
    """The subscribers share the producer's database and read its journal directly."""


class TestHttpTopics(TopicContract):
    """The producing service serves GET /topics/... over HTTP; the subscribers pull from it."""

    @contextlib.asynccontextmanager
    async def transports(self, env: TopicEnv) -> AsyncIterator[Callable[[], TopicTransport]]:
        topics = TopicsComponent([contract_topic], journal_settings=env.subscriber_journal)
        service = Service(name="producer", components=[topics])
        app = FastAPI(lifespan=service.lifespan)
        service.install(app)
        with serve_in_thread(app) as base_url:
            yield lambda: HttpTransport(base_url, breakers=BreakerRegistry(), long_poll=0.5)
