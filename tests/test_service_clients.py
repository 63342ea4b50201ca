"""A service's clients and their circuit breakers, set in code: ``Service(clients=[...],
breakers=...)`` and ``ServiceClient(..., registry=..., breaker=...)``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from lagompy.service import (
    BreakerRegistry,
    CircuitBreaker,
    Service,
    ServiceClient,
    ServiceLocator,
    default_registry,
)


def test_an_empty_registry_given_is_the_one_used() -> None:
    """A BreakerRegistry with no breakers yet is falsy (it has a length): it must still be
    the registry used, not the process-wide one."""
    breakers = BreakerRegistry()
    locator = ServiceLocator({"inventory": "http://127.0.0.1:9", "pricing": "http://127.0.0.1:9"})
    inventory = ServiceClient(
        "inventory",
        locator=locator,
        registry=breakers,
        breaker=CircuitBreaker("inventory", max_failures=3, call_timeout=2),
    )
    assert inventory.registry is breakers
    service = Service(
        name="shop", clients=[inventory, "pricing"], locator=locator, breakers=breakers
    )
    assert service.breakers is breakers
    app = FastAPI(lifespan=service.lifespan)
    service.install(app)

    async def started() -> list[str]:
        await service.start()
        try:
            return [b.id for b in service.breakers]
        finally:
            await service.stop()

    assert sorted(asyncio.run(started())) == ["inventory", "pricing"]
    assert breakers.get("inventory").settings.max_failures == 3
    assert "inventory" not in {b.id for b in default_registry}
