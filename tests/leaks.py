"""Find internals in what a service answers with: URLs, host names and IP addresses, ports,
file paths, database URLs, Python source and credentials.

``scan`` looks at every string of a JSON body (or the raw text of another body) and at every
header value. Something the request itself carried (its path, query, body or headers) is the
caller's own input echoed back, e.g. in a rejection message: it is not a leak. ``forbidden``
adds literal strings that must never appear (the journal's URL, a bait planted upstream).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

_HOST_SUFFIXES = "internal|local|lan|localdomain|corp|home|svc|cluster|com|net|org|io|dev|cloud"

PATTERNS: dict[str, re.Pattern[str]] = {
    "URL": re.compile(r"\b[a-z][a-z0-9+.-]*://", re.I),
    "IPv4 address": re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])"),
    "IPv6 address": re.compile(
        r"(?<![\w:])[0-9a-f]{0,4}::(?:[0-9a-f]{1,4}:?)*(?![\w:])|(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}",
        re.I,
    ),
    "host name": re.compile(
        rf"\blocalhost\b|\b[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)*\.(?:{_HOST_SUFFIXES})\b",
        re.I,
    ),
    "host:port": re.compile(r"\b[\w.-]*[a-z][\w.-]*:\d{2,5}\b", re.I),
    "file path": re.compile(r"(?<![\w.~%-])/(?:[\w.@-]+/)+[\w.@-]*|\b[a-z]:\\", re.I),
    "Python source": re.compile(r"\.py\b|Traceback|site-packages|File \"", re.I),
    "database": re.compile(
        r"\b(?:postgres(?:ql)?|sqlite|mysql|asyncpg|aiosqlite|psycopg)\w*", re.I
    ),
    "credential": re.compile(
        r"\b(?:password|passwd|pwd|secret|token|api[-_]?key|authorization|bearer)\b"
        r"|[\w.-]+:[^@\s/\"']+@[\w.-]+",
        re.I,
    ),
}


@dataclass(frozen=True)
class Leak:
    where: str  # "detail", "header retry-after", ...
    kind: str  # a PATTERNS key, or "forbidden"
    found: str

    def __str__(self) -> str:
        return f"{self.kind} {self.found!r} in {self.where}"


def request_text(path_and_query: str, body: bytes | str | None, headers: Iterable[str]) -> str:
    """Everything a request carried, lower-cased, for the echo test: the path and query (not
    the scheme, host and port of the URL), the body (also JSON-decoded) and header values."""
    path = unquote(path_and_query)
    # The server may drop control characters from a path (a percent-encoded newline, say):
    # what it echoes is then the path without them.
    parts = [path, "".join(c for c in path if c.isprintable() or c == " ")]
    # An error may quote an id of the path as Python's repr does ('\t:\x82' for a tab, a
    # colon and a control character): what it echoes is then the escaped form.
    parts.append(repr(path))
    if body:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        parts.append(text)
        try:
            parts.append(json.dumps(json.loads(text), ensure_ascii=False))
        except ValueError:
            pass
    parts.extend(headers)
    return "\n".join(parts).lower()


def path_and_query(url: str) -> str:
    split = urlsplit(url)
    return split.path + ("?" + split.query if split.query else "")


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield f"{where}.{key}" if where else str(key), str(key)
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")
    elif value is not None:
        yield where, str(value)


def scan(
    body: bytes,
    headers: Iterable[tuple[str, str]],
    *,
    sent: str,
    forbidden: Iterable[str] = (),
) -> list[Leak]:
    """Every leak in a response (``sent``: :func:`request_text` of its request)."""
    try:
        decoded: Any = json.loads(body)
        places = list(_strings(decoded, ""))
    except ValueError:
        places = [("body", body.decode("utf-8", "replace"))]
    places += [(f"header {name}", value) for name, value in headers]
    leaks = []
    literal = [f for f in forbidden if f]
    for where, text in places:
        lowered = text.lower()
        for word in literal:
            if word.lower() in lowered:
                leaks.append(Leak(where, "forbidden", word))
        for kind, pattern in PATTERNS.items():
            for match in pattern.finditer(text):
                found = match.group(0)
                if found.lower() not in sent:
                    leaks.append(Leak(where, kind, found))
    return leaks
