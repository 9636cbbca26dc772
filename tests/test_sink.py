"""The part writer's release of a block's sources (actors/part_writer.py), vectorised with Arrow,
against a per-row reference; and the commit log that decides which parts count (jobs/sink.py).

The reference below is the per-row assembler the project used before (one Python dict per
source, rows handled one by one): its behaviour is the contract. Random streams of sources —
windows in any order, cut into blocks of whole sources at random, window-level model errors,
retryable and permanent source failures after some windows — are fed to both; the released
captions, failure rows and counts must agree exactly.
"""

from __future__ import annotations

import json
import os
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
    return rows


def _blocks(rng: random.Random, rows: list[dict]) -> list[list[dict]]:
    """Whole sources cut into blocks of 1-40 sources, rows shuffled inside each block."""
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source_uri"], []).append(r)
    srcs, out = list(by_src.values()), []
    while srcs:
        k = rng.randint(1, 40)
        block = [r for s in srcs[:k] for r in s]
        srcs = srcs[k:]
        rng.shuffle(block)
        out.append(block)
    return out


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


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_release_equals_per_row_reference(seed):
    from actors.part_writer import check_complete, release

    rng = random.Random(seed)
    rows = _stream(rng, 300)
    ref_caps, ref_fails, got_caps, got_fails = set(), [], set(), []
    counts = dict(sources=0, captioned=0, failed=0, windows=0, window_failures=0)
    audio = 0.0
    for block in _blocks(rng, rows):
        ref = ReferenceAssembler()
        for uri, keep, fails in ref.add(_table(block)):
            ref_caps.update((uri, w["window_index"]) for w in keep)
            ref_fails += fails
        assert not ref.pending  # whole sources
        check_complete(_table(block))
        r = release(_table(block))
        _collect(r, got_caps, got_fails, counts)
        audio += r.audio_s
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
    want_audio = sum(r["end_s"] - r["start_s"] for r in rows
                     if (r["source_uri"], r["window_index"]) in ref_caps)
    assert audio == pytest.approx(want_audio)


def test_a_split_source_is_refused():
    """A block that holds part of a source (a pipeline that split it) is an error, not a part."""
    from actors.part_writer import check_complete

    base = dict(source_version="v", start_s=0.0, end_s=10.0, error_type="", error_message="",
                stage="", windows_kept=0)
    whole = [dict(base, source_uri="a", window_index=i, n_windows=3 if i == 2 else -1)
             for i in range(3)] + [dict(base, source_uri="b", window_index=0, n_windows=1)]
    check_complete(_table(whole))
    for cut in (whole[1:], whole[:2] + whole[3:]):
        with pytest.raises(RuntimeError, match="incomplete"):
            check_complete(_table(cut))


def test_only_committed_parts_count(tmp_path):
    """A part of the commit protocol is read only once a commit lists it; older part names are
    always read; remove_uncommitted deletes the rest (all, or one attempt's)."""
    import pyarrow.parquet as pq

    from actors.part_writer import part_name
    from jobs.sink import commit, done_uris, read_table_dir, remove_uncommitted

    out = tmp_path / "out"
    (out / "captions").mkdir(parents=True)

    def part(name, uris):
        pq.write_table(pa.table({"source_uri": uris}), out / "captions" / name)
    a, b, c = (part_name("r1", i, att) for i, att in ((0, "aaaaaaaa"), (1, "aaaaaaaa"),
                                                       (2, "bbbbbbbb")))
    part(a, ["s0"]), part(b, ["s1"]), part(c, ["s2"]), part("part-old-00000.parquet", ["s9"])
    assert done_uris(str(out)).to_pylist() == ["s9"]  # nothing committed yet
    commit(str(out), "r1", "aaaaaaaa", 0, [f"captions/{a}"], [0])
    assert sorted(read_table_dir(str(out / "captions"))["source_uri"].to_pylist()) == ["s0", "s9"]
    assert remove_uncommitted(str(out), "aaaaaaaa") == [str(out / "captions" / b)]
    assert (out / "captions" / c).exists()
    remove_uncommitted(str(out))
    assert sorted(os.listdir(out / "captions")) == sorted([a, "part-old-00000.parquet"])


def test_failure_only_block_is_written_by_its_decode_task(tmp_path):
    """Missing files decode to failure rows only: the decode task writes their part and sends
    one carrier row, which the part writer turns into that part's metadata (no second write)."""
    import pyarrow.parquet as pq

    from actors.part_writer import decode_sources_in_blocks, write_part

    out = str(tmp_path / "out")
    part = dict(output=out, run_id="r", attempt="0123abcd")
    block = pa.table({"source_uri": [str(tmp_path / f"gone{i}.wav") for i in range(5)],
                      "source_version": [""] * 5, "block": pa.array([7] * 5, pa.int64())})
    [carrier] = list(decode_sources_in_blocks(block, part=part))
    assert carrier.num_rows == 1 and carrier["part_meta"][0].as_py()
    [meta] = write_part(carrier, **part).to_pylist()
    assert meta["block"] == 7 and meta["sources"] == meta["failed"] == 5 and meta["windows"] == 0
    assert meta["files"] == ["failures/part-r-b000007-0123abcd.parquet"]
    assert json.loads(meta["failures_by_type"]) == {"not_found": 5}
    fails = pq.read_table(os.path.join(out, meta["files"][0]))
    assert sorted(fails["source_uri"].to_pylist()) == sorted(block["source_uri"].to_pylist())
    assert not os.path.exists(os.path.join(out, "captions"))
