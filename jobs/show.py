"""``overheard show OUTPUT``: print caption rows of an output folder (local or s3://)."""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.config_cli import parse
from jobs.sink import read_table_dir
from overheard import storage

COLUMNS = ["source_uri", "window_index", "start_s", "end_s", "caption", "decoding", "run_id"]


@dataclass
class ShowConfig:
    output: str = field(metadata={"help": "the caption job's output folder/prefix (local or s3://)"})
    run_id: str | None = field(default=None, metadata={
        "help": "only rows of this run (none: every run)"})
    limit: int = field(default=50, metadata={"min": 0, "help": "rows to print at most"})


def read_captions(output: str, run_id: str | None = None) -> pa.Table:
    t = read_table_dir(storage.join(output, "captions"), COLUMNS)
    if t is None:
        return pa.table({c: [] for c in COLUMNS})
    if run_id:
        t = t.filter(pc.equal(t.column("run_id"), run_id))
    return t.sort_by([("source_uri", "ascending"), ("window_index", "ascending")])


def display_width(s: str) -> int:
    """Terminal columns of ``s``: East Asian wide/fullwidth characters (CJK, most emoji) take
    two, combining marks and zero-width characters none (``len`` counts each as one)."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in s)


def pad(s: str, width: int) -> str:
    """``s`` left-aligned in ``width`` terminal columns (``f"{s:<width}"`` by display width)."""
    return s + " " * max(0, width - display_width(s))


def format_rows(t: pa.Table, limit: int = 20) -> str:
    lines = []
    for r in t.slice(0, limit).to_pylist():
        name = r["source_uri"].rsplit("/", 1)[-1]
        text = r["caption"] if r["caption"] is not None else f"({r['decoding']})"  # withheld
        lines.append(f"{pad(name, 32)} {r['start_s']:8.2f}-{r['end_s']:8.2f}s  {text}")
    if t.num_rows > limit:
        lines.append(f"... {t.num_rows - limit} more rows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(ShowConfig, argv, "overheard show", __doc__)
    t = read_captions(a.output, a.run_id)
    if t.num_rows == 0:  # a typo must not look like an empty result
        print(f"overheard show: no caption rows under {storage.join(a.output, 'captions')}"
              + (f" for run {a.run_id}" if a.run_id else ""), file=sys.stderr)
        return 1
    print(format_rows(t, a.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
