"""The table of an interleaved A/B run of bench/compare.sh: each measure per round for the base
and the head checkout, and the ratio of their medians (head / base; for times, above 1 is
slower, for rates, below 1 is slower).

    .venv/bin/python bench/compare_report.py /tmp/compare
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

#: (bench, pattern, measure name with {groups}, group holding the number). The patterns read
#: the quick runs' printed lines; a measure missing from one side shows as "-".
PATTERNS: list[tuple[str, str, str, int]] = [
    (
        "journal",
        r"(\w+) append batch=(\d+): ours (\d+)/s",
        "journal {1} append, batch {2}, events/s",
        3,
    ),
    (
        "journal",
        r"(\w+) append batch=(\d+): .* ratio ([\d.]+)",
        "journal {1} append, batch {2}, lagompy/raw",
        3,
    ),
    ("journal", r"(\w+) read by tag: ours (\d+)/s", "journal {1} read by tag, events/s", 2),
    ("runtime", r"CPU reference.*?: ([\d.]+) ms", "runtime CPU reference, ms", 1),
    (
        "runtime",
        r"(SQLite|PostgreSQL), (\d) host\(s\),\s+(\d{2,}) outstanding: ([\d,]+) commands/s",
        "runtime {1}, {2} host(s), {3} outstanding, commands/s",
        4,
    ),
    (
        "runtime",
        r"(SQLite|PostgreSQL), (\d) host\(s\),\s+1 outstanding: [\d,]+ commands/s p50 ([\d.]+) ms",
        "runtime {1}, {2} host(s), 1 outstanding, p50 ms",
        3,
    ),
    ("readside", r"read\+decode ([\d,]+)/s", "read side: read and decode, events/s", 1),
    (
        "readside",
        r"(?:rebuild|set-based) ([\d,]+)/s\s",
        "read side: rebuild set-based, events/s",
        1,
    ),
    ("readside", r"rebuild simple ([\d,]+)/s", "read side: rebuild simple, events/s", 1),
    (
        "readside",
        r"lag (?:\(set-based\) )?at [\d,]+ events/s: p50 ([\d.]+) ms",
        "read side: lag set-based p50, ms",
        1,
    ),
    ("http", r"\{'bare': \{'rps': ([\d.]+)", "HTTP bare route, requests/s", 1),
    ("http", r"'ask': \{'rps': ([\d.]+)", "HTTP POST that asks, requests/s", 1),
]


def collect(folder: Path) -> dict[str, dict[str, list[float]]]:
    measures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.glob("*-*-*.txt"), key=lambda p: p.stem.rsplit("-", 1)[-1]):
        label, bench, _round = path.stem.split("-")
        text = path.read_text(errors="replace")
        for pattern_bench, pattern, name, group in PATTERNS:
            if pattern_bench != bench:
                continue
            for match in re.finditer(pattern, text):
                key = name.format(None, *match.groups())
                measures[key][label].append(float(match[group].replace(",", "")))
    return measures


def _number(value: float) -> str:
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def report(folder: Path) -> str:
    lines = [
        "| measure | base, per round | head, per round | head / base (medians) |",
        "| --- | --- | --- | ---: |",
    ]
    for name, sides in collect(folder).items():
        base, head = sides.get("base", []), sides.get("head", [])
        ratio = f"{statistics.median(head) / statistics.median(base):.2f}" if base and head else "-"
        cells = [", ".join(_number(v) for v in side) or "-" for side in (base, head)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/compare")))
