"""Sources of unknown size (a manifest without sizes): a decode task stats its block first, a
missing file fails there as ``not_found`` without being opened, and sources past the block's
byte budget are deferred to a second round that packs them by their now known sizes. Real
files made with sox, real local Ray, Parquet read back; every source lands exactly once."""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests import media_factory as mf

OPENED: list[str] = []  # paths opened while a test listens (an audit hook cannot be removed)
LISTEN: list[bool] = []


def _audit(event, args):
    if LISTEN and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _archive(d):
    """(manifest path, {name: seconds or None for missing}): one 60-s wav first in name order
    (decoded although over the budget), five 1-s wavs and a second 60-s wav past the budget
    (deferred), three missing files (not_found, never opened)."""
    files = {"a_big0.wav": 60.0, **{f"b_tiny{i}.wav": 1.0 for i in range(5)},
             "c_big1.wav": 60.0, **{f"d_missing{i}.wav": None for i in range(3)}}
    for name, s in files.items():
        if s is not None:
            mf.make_tone(str(d / name), seconds=s, sr=16000, channels=1, freq=440 + 100 * len(name))
    man = d / "manifest.parquet"  # no size column: every size unknown
    pq.write_table(pa.table({"uri": [str(d / n) for n in files]}), man)
    return str(man), files


def _block(d, files):
    uris = [str(d / n) for n in files]
    return pa.table({"source_uri": uris, "source_version": [""] * len(uris),
                     "size": pa.array([0] * len(uris), pa.int64()),
                     "block": pa.array([3] * len(uris), pa.int64())})


def test_decode_task_stats_defers_and_never_opens_missing(tmp_path):
    from actors.part_writer import DEFERRED, decode_sources_in_blocks, write_part

    _, files = _archive(tmp_path)
    part = dict(output=str(tmp_path / "out"), run_id="r", attempt="0123abcd")
    OPENED.clear()
    LISTEN.append(True)
    try:
        out = list(decode_sources_in_blocks(_block(tmp_path, files), part=part,
                                            unknown_budget=200_000))
    finally:
        LISTEN.clear()
    missing = [str(tmp_path / n) for n, s in files.items() if s is None]
    assert not [p for p in OPENED if p in missing], OPENED
    assert str(tmp_path / "a_big0.wav") in OPENED  # the first source is always decoded
    assert str(tmp_path / "c_big1.wav") not in OPENED  # deferred: not opened either
    rows = pa.concat_tables(out, promote_options="default")
    fails = rows.filter(pc.less(rows["window_index"], 0))
    assert sorted(fails["source_uri"].to_pylist()) == missing
    assert set(fails["error_type"].to_pylist()) == {"not_found"}
    assert "stat before opening" in fails["error_message"][0].as_py()
    assert pc.unique(rows.filter(pc.greater_equal(rows["window_index"], 0))["source_uri"]
                     ).to_pylist() == [str(tmp_path / "a_big0.wav")]
    # the deferred sources ride on the block's first row to the part writer, sizes known now
    notes = [m for m in rows["part_meta"].to_pylist() if m]
    assert len(notes) == 1 and notes[0].startswith(DEFERRED)
    note = json.loads(notes[0][len(DEFERRED):])
    assert note["block"] == 3
    assert {d["source_uri"].rsplit("/", 1)[-1]: d["size"] for d in note["deferred"]} == {
        n: os.path.getsize(tmp_path / n) for n in [f"b_tiny{i}.wav" for i in range(5)]
        + ["c_big1.wav"]}
    # budget 0 (a later round, whose sizes are known): nothing stat'ed; a missing file the
    # decoder opens is not_found too; a failure-only block is written by its decode task
    [carrier] = list(decode_sources_in_blocks(_block(tmp_path, ["d_missing0.wav"]),
                                              part=part, unknown_budget=0))
    [meta] = write_part(carrier, **part).to_pylist()
    assert meta["deferred"] == [] and json.loads(meta["failures_by_type"]) == {"not_found": 1}
    assert "stat before opening" not in pq.read_table(
        os.path.join(part["output"], meta["files"][0]))["message"][0].as_py()


def _deferral_run(man: str, out: str, tiny_model: str):
    """The caption job over ``_archive``'s 10 sources (as ``man`` lists them) with a 200-kB
    budget: (config, manifest), after checking what every such run must show: two rounds, the
    6 sources past the budget deferred, 7 captioned, the 3 missing ones not_found."""
    from jobs.caption import CaptionConfig, run

    cfg = CaptionConfig(input=man, output=out, model=tiny_model, progress=False, show=0,
                        unknown_size_sources=16, unknown_block_bytes=200_000)
    m = run(cfg)
    assert m["status"] == "completed" and m["rounds"] == 2, m
    assert m["sources_deferred"] == 6
    assert m["sources_todo"] == 10 and m["sources_captioned"] == 7 and m["sources_failed"] == 3
    assert m["failures_by_type"] == {"not_found": 3}
    return cfg, m


def test_deferred_sources_are_captioned_in_a_second_round(ray_local, tiny_model, tmp_path):
    from jobs.caption import run
    from jobs.sink import read_table_dir

    man, files = _archive(tmp_path)
    out = str(tmp_path / "out")
    cfg, m = _deferral_run(man, out, tiny_model)
    assert m["sources_incomplete"] == 0
    caps = read_table_dir(os.path.join(out, "captions"))
    fails = read_table_dir(os.path.join(out, "failures"))
    # every source exactly once: in one committed part, with each of its windows once
    per = {n: 0 for n in files}
    for u, i in zip(caps["source_uri"].to_pylist(), caps["window_index"].to_pylist()):
        per[u.rsplit("/", 1)[-1]] += 1
    assert caps.num_rows == len(set(zip(caps["source_uri"].to_pylist(),
                                        caps["window_index"].to_pylist())))
    assert per == {n: (6 if s == 60.0 else 1 if s else 0) for n, s in files.items()}, per
    assert sorted(u.rsplit("/", 1)[-1] for u in fails["source_uri"].to_pylist()) == [
        n for n, s in files.items() if s is None]
    assert fails["retryable"].to_pylist() == [True] * 3
    assert m["windows"] == caps.num_rows == 6 + 5 + 6
    # the deferred sources are in the second round's parts (another attempt id)
    attempt = {}
    for name in os.listdir(os.path.join(out, "captions")):
        t = pq.read_table(os.path.join(out, "captions", name), columns=["source_uri"])
        for u in set(t["source_uri"].to_pylist()):
            attempt[u.rsplit("/", 1)[-1]] = name.rsplit("-", 1)[-1]
    assert attempt["a_big0.wav"] != attempt["c_big1.wav"] == attempt["b_tiny0.wav"]
    assert len(os.listdir(os.path.join(out, "_commits"))) >= 2
    # overheard status says the run took a second round and why
    from jobs.status import format_status, read_manifests
    [run_m] = read_manifests(out)
    assert "  rounds: 2 (6 sources of unknown size deferred" in format_status(run_m)
    # a missing file is retried by the next run (it may have appeared); nothing else is
    mf.make_tone(str(tmp_path / "d_missing0.wav"), seconds=1.0, sr=16000, channels=1)
    m2 = run(cfg)
    assert m2["sources_todo"] == 3 and m2["sources_skipped_done"] == 7
    assert m2["sources_captioned"] == 1 and m2["failures_by_type"] == {"not_found": 2}


def test_object_store_sources_are_stated_not_opened(s3_server, s3_bucket, tmp_path):
    """On an object store the stat is a HEAD per source (STAT_THREADS at a time): a missing
    object is not_found there and deferred ones come back with their sizes."""
    from actors.windows import stat_unknown

    mf.make_tone(str(tmp_path / "x.wav"), seconds=1.0, sr=16000, channels=1)
    fs = s3_server.fs()
    body = (tmp_path / "x.wav").read_bytes()
    uris = [f"s3://{s3_bucket}/unk/{i}.wav" for i in range(4)] + [f"s3://{s3_bucket}/unk/gone.wav"]
    for u in uris[:4]:
        fs.pipe(u[len("s3://"):], body)
    block = pa.table({"source_uri": uris, "source_version": [""] * 5,
                      "size": pa.array([0] * 5, pa.int64())})
    todo, gone, deferred = stat_unknown(block, budget=2 * len(body))
    assert list(gone) == [uris[-1]] and "stat before opening" in gone[uris[-1]]
    assert todo["source_uri"].to_pylist() == [uris[0], uris[1], uris[-1]]
    assert deferred == [dict(source_uri=u, source_version="", size=len(body)) for u in uris[2:4]]


def test_jsonl_plain_lines_are_stated_and_deferred(ray_local, tiny_model, tmp_path):
    """A JSONL manifest of plain file lines (no offset/duration, no size) is stat'ed and
    deferred like the Parquet manifest above; its repeated line is counted as a duplicate."""
    _, files = _archive(tmp_path)
    man = tmp_path / "manifest.jsonl"
    names = list(files) + ["b_tiny2.wav"]
    man.write_text("\n".join(json.dumps({"audio_filepath": n}) for n in names) + "\n")
    out = str(tmp_path / "out")
    _, m = _deferral_run(str(man), out, tiny_model)
    assert m["sources_duplicate"] == 1
    from jobs.sink import read_table_dir
    caps = read_table_dir(os.path.join(out, "captions"))
    assert set(caps["source_uri"].to_pylist()) == {str(tmp_path / n) for n, s in files.items()
                                                   if s}
