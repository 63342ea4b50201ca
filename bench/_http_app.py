"""The server side of bench/http_bench.py: one app, two routes, served by one uvicorn process.

POST /ask/{user_id}   asks a User entity to change its name (one event, journal on PostgreSQL,
                      entities on Ray)
POST /bare/{user_id}  one asyncpg INSERT of a row of the same size, nothing else
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.user_service.entity import ChangeName, RegisterUser, UserCommand, UserEntity
from lagompy.service import Refs, Service, refs
from lagompy.settings import JournalSettings

PG_URL = os.environ["BENCH_PG_URL"]
SCHEMA = os.environ["BENCH_PG_SCHEMA"]

service = Service(
    name=os.environ.get("BENCH_APP", "http-bench"),
    entities=[UserEntity],
    journal_settings=JournalSettings(url=PG_URL, postgres_schema=SCHEMA, auto_migrate=True),
    ray=True,
    runtime_options={"hosts": 1},
    stop_runtime=True,
)
pool: Any = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(
        PG_URL, min_size=5, max_size=5, server_settings={"search_path": SCHEMA}
    )
    async with service.lifespan(app):
        yield
    await pool.close()


app = FastAPI(lifespan=lifespan)
service.install(app)
Users = Annotated[Refs[UserCommand], Depends(refs(UserEntity))]


class NewName(BaseModel):
    name: str


@app.post("/ask/{user_id}")
async def ask(user_id: str, body: NewName, users: Users) -> dict[str, Any]:
    user = await users(user_id).ask(ChangeName(body.name))
    return {"user_id": user.user_id, "name": user.name}


@app.post("/register/{user_id}")
async def register(user_id: str, body: NewName, users: Users) -> dict[str, Any]:
    user = await users(user_id).ask(RegisterUser(body.name, "bench@example.org"))
    return {"user_id": user.user_id, "name": user.name}


@app.post("/bare/{user_id}")
async def bare(user_id: str, body: NewName) -> dict[str, Any]:
    await pool.execute("INSERT INTO bench_bare (user_id, name) VALUES ($1, $2)", user_id, body.name)
    return {"user_id": user_id, "name": body.name}
