"""The runtime's defaults are the fields of :class:`~lagompy.settings.RuntimeSettings`: the
keyword arguments of the in-process runtime, the region client and the shard host take their
defaults from there, so that each default is written once."""

from __future__ import annotations

from typing import Any

from lagompy.settings import RuntimeSettings


def runtime_default(name: str) -> Any:
    """The default of the ``RuntimeSettings`` field ``name``."""
    return RuntimeSettings.model_fields[name].default
