"""The producing service of bench/topics_bench.py: the contract topic served over HTTP from the
journal of ``LAGOMPY_JOURNAL_URL`` (``lagompy run bench._topics_app:app``)."""

from __future__ import annotations

from fastapi import FastAPI

from lagompy.service import Service
from lagompy.settings import JournalSettings
from lagompy.testkit.topics import contract_topic
from lagompy.topic import TopicsComponent

service = Service(
    name="bench-topics",
    components=[TopicsComponent([contract_topic], journal_settings=JournalSettings())],
)
app = FastAPI(lifespan=service.lifespan)
service.install(app)
