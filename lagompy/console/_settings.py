"""The console's settings: :class:`ConsoleSettings` (environment prefix ``LAGOMPY_CONSOLE_``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from lagompy.settings import LagompySettings

__all__ = ["MIN_TOKEN_LENGTH", "ConsoleSettings"]

#: The shortest action token accepted: a short token is guessed.
MIN_TOKEN_LENGTH = 16

_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


class ConsoleSettings(LagompySettings):
    """The management console's settings. Environment prefix ``LAGOMPY_CONSOLE_``."""

    model_config = SettingsConfigDict(env_prefix="LAGOMPY_CONSOLE_", frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Mount the console when service.install(app) is not told either way.",
    )
    prefix: str = Field(default="/console", description="Path under which the console is served.")
    token: str | None = Field(
        default=None,
        repr=False,
        description=(
            f"Bearer token that enables actions (at least {MIN_TOKEN_LENGTH} characters); "
            "without it the console is read-only and every action answers 403."
        ),
    )
    show_payloads: bool = Field(
        default=False,
        description="Show the values inside events and snapshots (masked by default).",
    )
    page_size: int = Field(
        default=50, ge=1, le=1000, description="Events per page on the Entities page."
    )
    user_header: str | None = Field(
        default=None,
        description=(
            "Request header naming the operator, set by a trusted reverse proxy "
            "(e.g. X-Forwarded-User); recorded in the audit log."
        ),
    )
    secure_cookie: bool = Field(
        default=False, description="Mark the login cookie Secure (when served over HTTPS)."
    )
    refresh_seconds: float = Field(
        default=2.0, ge=0, description="Seconds between live refreshes of a page's table (0: off)."
    )

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError("must start with / and hold path segments, without a trailing /")
        return value

    @model_validator(mode="after")
    def _check_token(self) -> ConsoleSettings:
        # Checked here rather than by a field validator: a field's error quotes the value
        # given, and this one is a secret.
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"token ({self.env_name('token')}): must hold at least {MIN_TOKEN_LENGTH} "
                "characters (the value given is not shown)"
            )
        return self

    @property
    def actions(self) -> bool:
        """Whether actions are enabled (a token is set)."""
        return self.token is not None
