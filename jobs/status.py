"""``overheard status OUTPUT``: what a caption run did, or is doing, from its manifest, and what
OUTPUT holds over all its runs.

The caption job rewrites ``OUTPUT/runs/<run>/manifest.json`` atomically when it starts, after every
committed part, and at the end (``jobs.caption.publish_manifest``), so this works while a run is
going, on a finished run, and on local or s3:// outputs alike. No Ray needed.

The "output total" block sums the runs' manifests (captioned sources, windows, hours: each
manifest counts exactly its committed parts) and reads the committed failure parts (few and
small) for failed sources by type and those still failing (``jobs.sink.failed_sources``);
``--failures`` lists them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.config_cli import parse
from jobs.sink import failed_sources
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
    failures: bool = field(default=False, metadata={
        "help": "list the failed sources (all runs, or --run-id's) by error type, with their "
                "messages and whether a later run captioned them"})


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
             f"done before this run, {m.get('sources_listed', 0)} listed"
             + (f" (+{m['sources_duplicate']} duplicate entr"
                f"{'y' if m['sources_duplicate'] == 1 else 'ies'})"
                if m.get("sources_duplicate") else ""),
             f"  windows: {m.get('windows', 0)} ({m.get('audio_hours', 0.0):.3f} h of audio), "
             f"{m.get('windows_per_s', 0.0):.2f} windows/s over {_duration(m.get('wall_s', 0.0))}",
             f"  failures: {m.get('failures_by_type') or 'none'}",
             f"  parts committed: {_parts(m)}"]
    if state == "running" and m.get("eta_s") is not None:
        lines.append(f"  ETA: {_duration(m['eta_s'])} (at the rate since the first output)")
    if m.get("first_output_s") is not None:
        lines.append(f"  first output after {m['first_output_s']:.1f} s")
    if limit_text(m):
        lines.append(f"  {limit_text(m)}")
    if m.get("sources_deferred"):  # unknown sizes past --unknown-block-bytes: a second round
        lines.append(f"  rounds: {m.get('rounds', 0)} ({m['sources_deferred']} sources of unknown "
                     "size deferred to the second, packed by their sizes)")
    return "\n".join(lines)


def _by_type(t: pa.Table) -> dict:
    """{error_type: sources} of a failed_sources table, most frequent first."""
    if t.num_rows == 0:
        return {}
    c = t.column("error_type").value_counts().to_pylist()
    return {d["values"]: d["counts"] for d in sorted(c, key=lambda d: (-d["counts"], d["values"]))}


def output_total(output: str, ms: list[dict]) -> str:
    """What OUTPUT holds over every run: captioned sources, windows and hours from the manifests
    ``ms`` (all runs), failed and still-failing sources by type from the failure parts."""
    f = failed_sources(output)
    still = f.filter(f.column("still_failing"))
    hours = sum(float(m.get("audio_hours") or 0.0) for m in ms)
    lines = [f"output total over {len(ms)} run{'s' * (len(ms) != 1)}:",
             f"  sources: {sum(m.get('sources_captioned', 0) for m in ms)} captioned, "
             f"{f.num_rows} failed {_by_type(f) or ''}".rstrip()
             + f", {still.num_rows} still failing {_by_type(still) or ''}".rstrip(),
             f"  windows: {sum(m.get('windows', 0) for m in ms)} ({hours:.3f} h of audio)"]
    if f.num_rows:
        lines.append(f"  failure rows: {storage.join(output, 'failures')} (list the sources: "
                     f"overheard status {output} --failures)")
    return "\n".join(lines)


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def limit_text(m: dict) -> str:
    """What --limit left for a later run ("" when the run had no limit or left nothing)."""
    if not m.get("limit"):
        return ""
    left = m.get("sources_listed", 0) - m.get("sources_skipped_done", 0) - m.get("sources_todo", 0)
    more = "" if m.get("listing_complete", True) else "at least "
    if left <= 0 and not more:
        return ""
    return (f"--limit {m['limit']} reached: {more}{max(left, 0)} more listed source"
            f"{'s' * (left != 1)} left for a later run (rerun without --limit, or with a higher one)")


def _without_uri(message: str, uri: str) -> str:
    """A failure message without the source's own path where it repeats it (the line already
    starts with the URI): "x.txt: corrupt: x.txt: cannot parse" -> "x.txt: corrupt: cannot
    parse"; an OS error's "No such file or directory: 'x.wav'" -> "No such file or directory"."""
    message = str(message or "")
    path = uri.split("#", 1)[0]
    for p in dict.fromkeys((uri, path)):
        message = message.replace(f"{p}: ", "").replace(f": '{p}'", "")
    return message


def format_failures(t: pa.Table, limit: int | None = None) -> str:
    """Failed sources (a failed_sources table) grouped by error type, most frequent first: one
    line each, URI and message (``limit``: at most that many lines in all)."""
    lines, shown = [], 0
    for kind, n in _by_type(t).items():
        rows = t.filter(pc.equal(t.column("error_type"), kind))
        still = pc.sum(rows.column("still_failing")).as_py() or 0
        lines.append(f"{kind} ({n} source{'s' * (n != 1)}"
                     + (f", {n - still} captioned by a later run)" if still < n else ")"))
        for r in rows.to_pylist():
            if limit is not None and shown >= limit:
                break
            later = "" if r["still_failing"] else " [captioned by a later run]"
            lines.append(f"  {r['source_uri']}: {_one_line(_without_uri(r['message'], r['source_uri']))}"
                         f"{later}")
            shown += 1
    if limit is not None and t.num_rows > shown:
        lines.append(f"  ... {t.num_rows - shown} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(StatusConfig, argv, "overheard status", __doc__.split("\n\n")[0])
    ms = read_manifests(a.output)
    chosen = [m for m in ms if m.get("run_id") == a.run_id] if a.run_id else ms
    if not chosen:
        print(f"overheard status: no run{' ' + a.run_id if a.run_id else ''} under "
              f"{storage.join(a.output, 'runs')}", file=sys.stderr)
        return 1
    if a.failures:
        f = failed_sources(a.output, a.run_id)
        if a.json:
            print(json.dumps(f.to_pylist(), indent=2))
        else:
            print(format_failures(f) if f.num_rows else
                  f"no failed sources in {a.output}" + (f" run {a.run_id}" if a.run_id else ""))
        return 0
    chosen = chosen if a.all else chosen[-1:]
    if a.json:
        print(json.dumps(chosen if a.all else chosen[0], indent=2))
    else:
        # the latest run alone may say "failures: none" after a no-op resume: the total says
        # what earlier runs left
        print("\n\n".join([format_status(m) for m in chosen] + [output_total(a.output, ms)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
