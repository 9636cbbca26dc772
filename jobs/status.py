"""``overheard status OUTPUT``: what a caption run did, or is doing, from its manifest.

The caption job rewrites ``OUTPUT/runs/<run>/manifest.json`` atomically when it starts, after every
committed part, and at the end (``jobs.caption.publish_manifest``), so this works while a run is
going, on a finished run, and on local or s3:// outputs alike. No Ray needed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from jobs.config_cli import parse
from overheard import storage

# A running manifest is rewritten at least every --flush-interval (default 60 s) once output
# flows; with no rewrite for this long (or 3 flush intervals, if longer) the driver is likely gone.
STALE_S = 600.0


@dataclass
class StatusConfig:
    output: str = field(metadata={"help": "the caption job's output folder/prefix (local or s3://)"})
    run_id: str = field(default="", metadata={"help": "this run (empty: the latest)"})
    all: bool = field(default=False, metadata={"help": "every run, oldest first"})
    json: bool = field(default=False, metadata={"help": "print the manifest(s) as JSON"})


def read_manifests(output: str) -> list[dict]:
    """Every run's manifest under OUTPUT/runs, oldest first (unreadable ones skipped)."""
    fs, path = storage.get_fs(storage.join(output, "runs"))
    if not fs.exists(path):
        return []
    out = []
    for p in fs.glob(path.rstrip("/") + "/*/manifest.json"):
        try:
            with fs.open(p, "rb") as f:
                out.append(json.loads(f.read()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: (m.get("started_at") or 0, m.get("run_id", "")))


def state_of(m: dict, now: float | None = None, flush_interval_s: float = 60.0) -> str:
    """``running``, ``running?`` (no rewrite for a long time: the driver may have died), or the
    final status the run wrote (completed / interrupted / incomplete)."""
    st = m.get("status", "?")
    if st != "running":
        return st
    age = (now or time.time()) - float(m.get("updated_at") or m.get("started_at") or 0)
    return "running" if age <= max(STALE_S, 3 * flush_interval_s) else "running?"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _parts(m: dict) -> int:
    """Part files the run committed: a count since issue 19 (the files are in OUTPUT/_commits),
    a list of their URIs in older manifests."""
    p = m.get("parts") or 0
    return len(p) if isinstance(p, list) else int(p)


def format_status(m: dict, now: float | None = None) -> str:
    now = now or time.time()
    state = state_of(m, now)
    done = m.get("sources_captioned", 0) + m.get("sources_failed", 0)
    todo = m.get("sources_todo", 0)
    lines = [f"run {m.get('run_id')}: {state}"
             + (f" (no update for {_duration(now - float(m.get('updated_at', 0)))}; the driver "
                "may have stopped: rerun the same command to resume)" if state == "running?" else ""),
             f"  input {m.get('input')} -> output {m.get('output')}",
             f"  sources: {done}/{todo} done ({m.get('sources_captioned', 0)} captioned, "
             f"{m.get('sources_failed', 0)} failed), {m.get('sources_skipped_done', 0)} already "
             f"done before this run, {m.get('sources_listed', 0)} listed",
             f"  windows: {m.get('windows', 0)} ({m.get('audio_hours', 0.0):.3f} h of audio), "
             f"{m.get('windows_per_s', 0.0):.2f} windows/s over {_duration(m.get('wall_s', 0.0))}",
             f"  failures: {m.get('failures_by_type') or 'none'}",
             f"  parts committed: {_parts(m)}"]
    if state == "running" and m.get("eta_s") is not None:
        lines.append(f"  ETA: {_duration(m['eta_s'])} (at the rate since the first output)")
    if m.get("first_output_s") is not None:
        lines.append(f"  first output after {m['first_output_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(StatusConfig, argv, "overheard status", __doc__.split("\n\n")[0])
    ms = read_manifests(a.output)
    if a.run_id:
        ms = [m for m in ms if m.get("run_id") == a.run_id]
    if not ms:
        print(f"overheard status: no run{' ' + a.run_id if a.run_id else ''} under "
              f"{storage.join(a.output, 'runs')}", file=sys.stderr)
        return 1
    ms = ms if a.all else ms[-1:]
    if a.json:
        print(json.dumps(ms if a.all else ms[0], indent=2))
    else:
        print("\n\n".join(format_status(m) for m in ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
