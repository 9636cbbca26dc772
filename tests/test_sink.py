"""The driver's source assembly (jobs/sink.py), vectorised with Arrow, against a per-row reference.

The reference below is the per-row assembler the project used before (one Python dict per
source, rows handled one by one): its behaviour is the contract. Random streams of sources —
windows in any order, split over batches at random, rows resent by a retried task, window-level
model errors, retryable and permanent source failures after some windows — are fed to both; the
released captions, failure rows and counts must agree exactly.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from overheard.schema import RETRYABLE


class ReferenceAssembler:
    """Per-source semantics, row by row (the pre-vectorised implementation, condensed)."""

    def __init__(self):
        self.pending = {}

    def add(self, tbl: pa.Table):
        out = []
        for row in tbl.to_pylist():
            p = self.pending.setdefault(row["source_uri"], {"version": row["source_version"],
                                                            "windows": {}, "expected": None,
                                                            "failure": None})
            if row["window_index"] < 0:
                p["failure"] = p["failure"] or row
                p["expected"] = p["failure"]["windows_kept"]
            else:
                p["windows"].setdefault(row["window_index"], row)
                if row["n_windows"] >= 0:
                    p["expected"] = row["n_windows"]
        for uri in list(self.pending):
            p = self.pending[uri]
            if p["expected"] is not None and len(p["windows"]) >= p["expected"]:
                out.append(self._release(uri, p))
                del self.pending[uri]
        return out

    @staticmethod
    def _release(uri, p):
        failures, keep = [], []
        for idx in sorted(p["windows"]):
            w = p["windows"][idx]
            if w["error_type"]:
                failures.append(dict(source_uri=uri, source_version=p["version"], stage=w["stage"],
                                     error_type=w["error_type"],
                                     message=f"window {idx}: " + w["error_message"],
                                     retryable=False, windows_kept=0))
            else:
                keep.append(w)
        if p["failure"] is not None:
            f = p["failure"]
            retry = f["error_type"] in RETRYABLE
            msg = f["error_message"]
            if retry and keep:
                msg += f" ({len(keep)} windows discarded; the source is redone on rerun)"
                keep = []
            failures.append(dict(source_uri=uri, source_version=p["version"], stage=f["stage"],
                                 error_type=f["error_type"], message=msg, retryable=retry,
                                 windows_kept=len(keep)))
        return uri, keep, failures


def _stream(rng: random.Random, n_sources: int):
    rows = []
    for s in range(n_sources):
        uri, ver = f"s3://b/src{s:04d}.wav", f"v{s}"
        n = rng.choice([1, 1, 1, 2, 3, 8])
        kind = rng.choice(["ok"] * 6 + ["model_error", "corrupt", "read_error", "changed",
                                        "truncated", "no_audio"])
        if kind == "no_audio":
            rows.append(dict(source_uri=uri, source_version=ver, window_index=-1, n_windows=-1,
                             start_s=0.0, end_s=0.0, error_type="no_audio_samples",
                             error_message="no audio decoded", stage="decode", windows_kept=0))
            continue
        kept = n if kind in ("ok", "model_error") else rng.randint(0, n)
        for i in range(kept):
            bad = kind == "model_error" and rng.random() < 0.5
            last = kind in ("ok", "model_error") and i == n - 1
            rows.append(dict(source_uri=uri, source_version=ver, window_index=i,
                             n_windows=n if last else -1, start_s=10.0 * i,
                             end_s=10.0 * i + rng.choice([10.0, 10.0, 3.5]),
                             error_type="model_error" if bad else "",
                             error_message="CLAP encoder failed" if bad else "",
                             stage="embed" if bad else "", windows_kept=0))
        if kind not in ("ok", "model_error"):
            stage = "read" if kind in ("read_error", "changed") else "decode"
            rows.append(dict(source_uri=uri, source_version=ver, window_index=-1, n_windows=-1,
                             start_s=0.0, end_s=0.0, error_type=kind,
                             error_message=f"{kind} after {kept} windows", stage=stage,
                             windows_kept=kept))
    # Everything arrives in any order, and a retried upstream task resends some rows while
    # their source is still in flight. Copies land before the row that completes their source:
    # after a source is released Ray does not redeliver (a retried streaming task's consumed
    # outputs are not reported again), and the sink does not guard against it.
    rng.shuffle(rows)
    done_at, ref = {}, ReferenceAssembler()
    for i, r in enumerate(rows):
        for uri, _, _ in ref.add(_table([r])):
            done_at[uri] = i
    before = {}  # original position -> copies to deliver just before it
    for j in rng.sample(range(len(rows)), k=len(rows) // 5):
        if done_at[rows[j]["source_uri"]] != j:  # not the completing row itself
            before.setdefault(rng.randint(0, done_at[rows[j]["source_uri"]]), []).append(
                dict(rows[j]))
    return [c for i, r in enumerate(rows) for c in before.get(i, []) + [r]]


def _table(rows):
    t = pa.Table.from_pylist(rows, schema=pa.schema([
        ("source_uri", pa.string()), ("source_version", pa.string()),
        ("window_index", pa.int32()), ("n_windows", pa.int32()), ("start_s", pa.float64()),
        ("end_s", pa.float64()), ("error_type", pa.string()), ("error_message", pa.string()),
        ("stage", pa.string()), ("windows_kept", pa.int32())]))
    emb = np.arange(len(rows) * 4, dtype=np.float32)
    return t.append_column("audio_embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb), 4))


def _collect(r, got_caps, got_fails, counts):
    if r.captions is not None:
        pairs = list(zip(r.captions.column("source_uri").to_pylist(),
                         r.captions.column("window_index").to_pylist()))
        assert len(pairs) == len(set(pairs)) and not set(pairs) & got_caps, "double window"
        got_caps.update(pairs)
        assert "audio_embedding" in r.captions.column_names
    if r.failures is not None:
        got_fails += r.failures.to_pylist()
    for k in counts:
        counts[k] += getattr(r, k)


@pytest.mark.parametrize("seed,min_rows", [(s, m) for s in range(4) for m in (0, 150)])
def test_vectorised_assembly_equals_per_row_reference(seed, min_rows):
    """min_rows 0: assembled at every call; 150: incoming tables staged, assembled together."""
    from jobs.sink import SourceAssembler

    rng = random.Random(seed)
    rows = _stream(rng, 300)
    ref, asm = ReferenceAssembler(), SourceAssembler(min_rows=min_rows, max_delay_s=1e9)
    ref_caps, ref_fails, got_caps, got_fails = set(), [], set(), []
    counts = dict(sources=0, captioned=0, failed=0, windows=0, window_failures=0)
    audio = 0.0
    i = 0
    while i < len(rows):
        k = rng.choice([1, 2, 7, 50, 200])
        batch = _table(rows[i:i + k])
        i += k
        for uri, keep, fails in ref.add(batch):
            ref_caps.update((uri, w["window_index"]) for w in keep)
            ref_fails += fails
        for r in (asm.add(batch),) + ((asm.finish(),) if i >= len(rows) else ()):
            if r is None:
                continue
            _collect(r, got_caps, got_fails, counts)
            audio += r.audio_s
    assert not ref.pending and asm.pending_sources() == 0
    assert got_caps == ref_caps

    def key(f):
        return (f["source_uri"], f["message"])
    assert sorted(got_fails, key=key) == sorted(ref_fails, key=key)
    # counts as the manifest defines them
    n_sources = len({r["source_uri"] for r in rows})
    kept_uris = {u for u, _ in ref_caps}
    broken = {f["source_uri"] for f in ref_fails if f["stage"] in ("read", "decode")}
    assert counts["sources"] == n_sources and counts["windows"] == len(ref_caps)
    assert counts["captioned"] == len(kept_uris)
    assert counts["failed"] == len(broken & kept_uris) + n_sources - len(kept_uris)
    assert counts["window_failures"] == sum(f["stage"] not in ("read", "decode") for f in ref_fails)
    want_audio = sum(r["end_s"] - r["start_s"] for r in {(r["source_uri"], r["window_index"]): r
                     for r in rows if (r["source_uri"], r["window_index"]) in ref_caps}.values())
    assert audio == pytest.approx(want_audio)


def test_incomplete_source_is_held_back():
    from jobs.sink import SourceAssembler

    asm = SourceAssembler(min_rows=0)
    base = dict(source_version="v", start_s=0.0, end_s=10.0, error_type="", error_message="",
                stage="", windows_kept=0)
    # the terminal window (n_windows=3) first, then the others: nothing until all three are in
    assert asm.add(_table([dict(base, source_uri="a", window_index=2, n_windows=3)])) is None
    assert asm.add(_table([dict(base, source_uri="a", window_index=0, n_windows=-1)])) is None
    assert asm.pending_sources() == 1
    r = asm.add(_table([dict(base, source_uri="a", window_index=1, n_windows=-1),
                        dict(base, source_uri="b", window_index=0, n_windows=-1)]))
    assert r.sources == 1 and r.windows == 3 and asm.pending_sources() == 1  # b waits
