"""The registry of workflows (:class:`Workflows`), their definitions and :class:`RetryPolicy`.

A workflow is an ``async def`` taking a :class:`~lagompy.workflow.WorkflowContext` and one
input, registered under a name and an explicit version::

    workflows = Workflows()

    @workflows.workflow("transfer", version=1, max_running=100)
    async def transfer(ctx: WorkflowContext, request: TransferRequest) -> TransferResult: ...

The input and output annotations say how they are serialized (lagompy's msgpack serialization,
registered dataclasses with versions and upcasters: no pickle); the registry's serializer
registers them, and every class given in ``types``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from lagompy.errors import ConfigurationError, UnknownWorkflow
from lagompy.serialization import Serializer

if TYPE_CHECKING:
    from lagompy.workflow._context import WorkflowContext

__all__ = ["RetryPolicy", "WorkflowDef", "Workflows", "return_annotation"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

WorkflowFn = Callable[["WorkflowContext", Any], Awaitable[Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """How a step is retried: up to ``max_attempts`` tries in all, waiting ``initial_delay``
    seconds after the first failure, ``backoff`` times more after each (at most ``max_delay``).
    Only exceptions of ``retry_on`` are retried; any other fails the step at once."""

    max_attempts: int = 3
    initial_delay: float = 0.1
    max_delay: float = 10.0
    backoff: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}"
            )
        if self.initial_delay < 0 or self.max_delay < 0 or self.backoff < 1:
            raise ConfigurationError(
                "RetryPolicy needs initial_delay >= 0, max_delay >= 0 and backoff >= 1"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1)))


@dataclass(frozen=True)
class WorkflowDef:
    """One registered version of a workflow."""

    name: str
    version: int
    fn: WorkflowFn
    input_type: Any
    output_type: Any
    #: At most this many runs of the workflow (all versions) run at once; the others queue.
    max_running: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def return_annotation(fn: Callable[..., Any]) -> Any:
    """The resolved return annotation of ``fn`` (``Any`` when it has none or it cannot be
    resolved)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return Any
    return hints.get("return", Any)


def _input_annotation(fn: Callable[..., Any], name: str) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 2:
        raise ConfigurationError(
            f"workflow {name!r}: {getattr(fn, '__qualname__', fn)!r} must take exactly two "
            f"parameters (ctx, input), it takes {len(params)}"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ConfigurationError(
            f"workflow {name!r}: the annotations of {fn.__qualname__} cannot be resolved: {e}"
        ) from e
    return hints.get(params[1].name, Any)


class Workflows:
    """The workflows an app runs, by name and version, and the serializer of their values.

    ``types``: more classes the workflows' steps return or signals carry (registered with
    the serializer; the inputs' and outputs' annotations are registered on their own)."""

    def __init__(self, types: Iterable[Any] = ()) -> None:
        self.serializer = Serializer()
        self._defs: dict[str, dict[int, WorkflowDef]] = {}
        for t in types:
            self.serializer.register(t)

    def workflow(
        self,
        name: str,
        *,
        version: int,
        max_running: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated ``async def (ctx, input)`` as ``name`` at ``version``.
        ``max_running``: a queue that runs at most this many runs at once; ``retry``: the
        default policy of its steps."""

        def decorate(fn: F) -> F:
            self.register(fn, name, version=version, max_running=max_running, retry=retry)
            return fn

        return decorate

    def register(
        self,
        fn: Callable[..., Awaitable[Any]],
        name: str,
        *,
        version: int,
        max_running: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> WorkflowDef:
        if not isinstance(name, str) or not name or len(name) > 255 or "\x00" in name:
            raise ConfigurationError(
                f"a workflow needs a name of 1 to 255 characters, got {name!r}"
            )
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(
                f"workflow {name!r}: version must be an int >= 1, got {version!r}"
            )
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(f"workflow {name!r}: {fn!r} must be an async def")
        if max_running is not None and max_running < 1:
            raise ConfigurationError(f"workflow {name!r}: max_running must be >= 1 or None")
        versions = self._defs.setdefault(name, {})
        if version in versions:
            raise ConfigurationError(f"workflow {name!r} version {version} is registered twice")
        input_t = _input_annotation(fn, name)
        output_t = return_annotation(fn)
        self.serializer.register(input_t)
        self.serializer.register(output_t)
        definition = WorkflowDef(
            name, version, fn, input_t, output_t, max_running, retry or RetryPolicy()
        )
        versions[version] = definition
        return definition

    def names(self) -> list[str]:
        return sorted(self._defs)

    def latest(self, name: str) -> WorkflowDef:
        """The highest registered version of ``name``."""
        versions = self._defs.get(name)
        if not versions:
            known = ", ".join(repr(n) for n in self.names()) or "none"
            raise UnknownWorkflow(f"no workflow is registered as {name!r} (registered: {known})")
        return versions[max(versions)]

    def get(self, name: str, version: int | None = None) -> WorkflowDef:
        """``name`` at ``version`` (None: the latest); ``UnknownWorkflow`` if not registered."""
        latest = self.latest(name)
        if version is None:
            return latest
        found = self._defs[name].get(version)
        if found is None:
            raise UnknownWorkflow(
                f"workflow {name!r} has no version {version} (registered: "
                f"{sorted(self._defs[name])})"
            )
        return found

    def for_run(self, name: str, version: int) -> WorkflowDef:
        """The code a run of ``name`` started at ``version`` goes on with: that version while
        it is registered, else the latest (which serves old runs through ``ctx.patched``)."""
        versions = self._defs.get(name, {})
        return versions.get(version) or self.latest(name)

    def max_running(self, name: str) -> int | None:
        """The concurrency limit of ``name``: the smallest its registered versions declare."""
        limits = [d.max_running for d in self._defs.get(name, {}).values() if d.max_running]
        return min(limits) if limits else None
