"""Index, search and OpenSearch export on real caption parts: the caption job (tiny random-weight
CLAP + decoder) runs on generated clips, its Parquet parts go into a LanceDB index through the
index job (no Ray: LanceDB merge_insert; local and on the loopback S3 server), and the bulk export is checked against the ``_bulk`` format's shape."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pytest

from tests import media_factory as mf

D_FIELDS = {"key", "source_uri", "window_index", "start_s", "end_s", "caption", "model_id",
            "run_id", "score", "confidence"}


def _caption(inp, out, model, **kw):
    from jobs.caption import CaptionConfig, run
    return run(CaptionConfig(input=str(inp), output=str(out), model=model, progress=False,
                             window=2.0, show=0, flush_interval=600, **kw))


def _captions(out) -> pa.Table:
    from jobs.sink import read_table_dir
    return read_table_dir(os.path.join(str(out), "captions"))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_model, ray_local):
    """One caption output holding two runs: run 1 on three clips, run 2 on two more clips."""
    root = tmp_path_factory.mktemp("search")
    a, b, out = root / "batch1", root / "batch2", root / "out"
    a.mkdir(), b.mkdir()
    mf.make_tone(str(a / "tone_a.wav"), seconds=4.0, freq=440)
    mf.make_speech(str(a / "speech_a.wav"), "rain falls on the roof while a dog barks")
    mf.make_speech(str(a / "speech_b.mp3"), "an engine starts and birds sing")
    mf.make_tone(str(b / "tone_b.flac"), seconds=5.0, freq=1200)
    mf.make_speech(str(b / "speech_c.wav"), "water runs and a door slams twice")
    m1 = _caption(a, out, tiny_model, run_id="run1")
    return dict(root=root, out=out, batch2=b, m1=m1, model=tiny_model)


@pytest.fixture(scope="module")
def indexed(captioned):
    from jobs.index import IndexConfig, run
    idx = str(captioned["root"] / "index")
    s = run(IndexConfig(captions=str(captioned["out"]), index=idx))
    return dict(captioned, index=idx, summary=s)


def test_index_holds_every_window_once(indexed):
    import lancedb
    caps = _captions(indexed["out"])
    s = indexed["summary"]
    assert s["rows_added"] == s["rows_total"] == caps.num_rows > 0
    t = lancedb.connect(indexed["index"]).open_table("windows").to_arrow()
    assert len(set(t.column("key").to_pylist())) == t.num_rows == caps.num_rows
    assert t.schema.field("audio_embedding").type.list_size == \
        caps.schema.field("audio_embedding").type.list_size
    assert {"source_uri", "start_s", "end_s", "window_index", "model_id", "run_id",
            "caption"} <= set(t.column_names)
    meta = json.load(open(os.path.join(indexed["index"], "overheard_index.json")))
    assert meta["claps"][meta["default_clap_id"]] == os.path.join(indexed["model"], "clap")


def test_search_returns_rows_with_fields(indexed, capsys):
    from jobs.search import main, search
    hits = search(indexed["index"], "the sound of rain", k=5)
    assert 0 < len(hits) <= 5
    for h in hits:
        assert D_FIELDS <= set(h)
        assert h["end_s"] > h["start_s"] >= 0
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert main([indexed["index"], "the sound of rain", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and re.search(r"\d+\.\d\d-\d+\.\d\ds", lines[0])


def test_own_embedding_finds_its_window_first(indexed):
    """A window's own embedding direction (scaled: cosine ignores norm) returns that window
    first. Pick the window least similar to every other one so ties (identical tone windows)
    cannot decide it."""
    from jobs.index import window_key
    from jobs.search import vector_search
    caps = _captions(indexed["out"])
    x = caps.column("audio_embedding").combine_chunks().values.to_numpy().reshape(caps.num_rows, -1)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    i = int(np.argmin(sim.max(axis=1)))
    assert sim[i].max() < 0.9999
    r = caps.slice(i, 1).to_pylist()[0]
    hits = vector_search(indexed["index"], 3.0 * x[i], k=3)
    assert hits[0]["key"] == window_key(r["source_uri"], r["window_index"], r["model_id"])
    assert hits[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["cosine"] > hits[1]["cosine"]


def test_full_text_finds_a_caption_word(indexed):
    from jobs.index import window_key
    from jobs.search import hybrid_search, text_search
    caps = _captions(indexed["out"]).to_pylist()
    word, row = None, None
    for r in caps:
        for w in re.findall(r"[a-z]{4,}", r["caption"].lower()):
            if w not in {"with", "this", "that", "from", "there", "then", "they", "have"}:
                word, row = w, r
                break
        if word:
            break
    assert word, "no alphabetic caption word in the tiny model's captions"
    hits = text_search(indexed["index"], word, k=len(caps))
    key = window_key(row["source_uri"], row["window_index"], row["model_id"])
    assert key in {h["key"] for h in hits}
    assert all(h["bm25"] > 0 for h in hits)
    # LanceDB's hybrid + RRFReranker: the embedding of the window least like any other, with a
    # word of its caption: that window is first in the vector list and in the text list, so its
    # fused score is 1 / (60 + 1) + 1 / (60 + its text rank); every score is the RRF sum
    caps_t = _captions(indexed["out"])
    x = caps_t.column("audio_embedding").combine_chunks().values.to_numpy().reshape(
        caps_t.num_rows, -1)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    i = int(np.argmin(sim.max(axis=1)))
    r = caps[i]
    words = [w for w in re.findall(r"[a-z]{3,}", r["caption"].lower())] or ["x"]
    fused = hybrid_search(indexed["index"], " ".join(words), x[i], k=len(caps))
    me = next(h for h in fused if h["key"] == window_key(r["source_uri"], r["window_index"],
                                                           r["model_id"]))
    assert me["vector_rank"] == 1 and me["cosine"] == pytest.approx(1.0, abs=1e-4)
    if me["text_rank"] is not None:
        assert me["score"] == pytest.approx(1 / 61 + 1 / (60 + me["text_rank"]), rel=1e-6)
    for h in fused:
        ranks = [q for q in (h["vector_rank"], h["text_rank"]) if q is not None]
        assert ranks and h["score"] == pytest.approx(sum(1 / (60 + q) for q in ranks), rel=1e-6)
    assert [h["score"] for h in fused] == sorted((h["score"] for h in fused), reverse=True)
    assert {"confidence", "cosine", "bm25"} <= set(fused[0])


def test_incremental_second_run_adds_exactly_its_rows(indexed):
    import lancedb
    from jobs.index import IndexConfig, run
    m2 = _caption(indexed["batch2"], indexed["out"], indexed["model"], run_id="run2")
    assert m2["windows"] > 0
    caps = _captions(indexed["out"])
    run2 = sum(1 for r in caps.column("run_id").to_pylist() if r == "run2")
    assert run2 == m2["windows"]
    s = run(IndexConfig(captions=str(indexed["out"]), index=indexed["index"]))
    assert s["parts_new"] == 1 and s["rows_read"] == run2 and s["rows_added"] == run2
    assert s["rows_total"] == caps.num_rows
    s = run(IndexConfig(captions=str(indexed["out"] / "captions"), index=indexed["index"]))
    assert s["parts_new"] == 0 and s["rows_added"] == 0 and s["rows_total"] == caps.num_rows
    db = lancedb.connect(indexed["index"])
    t = db.open_table("windows").to_arrow()
    assert len(set(t.column("key").to_pylist())) == t.num_rows == caps.num_rows
    log = db.open_table("parts").to_arrow().to_pylist()
    assert sum(p["rows"] for p in log) == caps.num_rows
    # a part read again (e.g. a kill after rows were written, before the log) adds nothing
    db.drop_table("parts")
    s = run(IndexConfig(captions=str(indexed["out"]), index=indexed["index"]))
    assert s["rows_read"] == caps.num_rows and s["rows_added"] == 0
    # the second run's windows are searchable by text right away
    from jobs.search import text_search
    r = next(r for r in caps.to_pylist() if r["run_id"] == "run2")
    w = max(re.findall(r"[a-z]+", r["caption"].lower()) or ["x"], key=len)
    if len(w) >= 4:
        assert any(h["run_id"] == "run2" for h in text_search(indexed["index"], w, k=100))


def test_index_reads_caption_parts_from_s3(captioned, s3_server, s3_bucket, tmp_path):
    from jobs.index import IndexConfig, run
    fs = s3_server.fs()
    dest = f"{s3_bucket}/search-caps"
    fs.put(str(captioned["out"]) + "/", dest, recursive=True)
    caps = [p for p in fs.find(dest) if p.endswith(".parquet") and "/captions/" in p]
    assert caps
    s = run(IndexConfig(captions=f"s3://{dest}", index=str(tmp_path / "idx")))
    n = _captions(captioned["out"])
    # the module's second run may or may not have been written before the copy
    assert s["rows_total"] == s["rows_added"] > 0 and s["rows_total"] <= n.num_rows
    assert s["parts_new"] == len(caps)


def test_index_on_s3_is_built_incrementally_and_searched(captioned, s3_server, s3_bucket,
                                                        capsys):
    """The LanceDB database itself on the loopback S3 server (storage_options: endpoint,
    allow_http, credentials from the environment; the secret is never printed)."""
    from jobs.index import main as index_main
    from jobs.search import search, vector_search
    idx = f"s3://{s3_bucket}/search-index"
    assert index_main([str(captioned["out"]), idx]) == 0
    n = _captions(captioned["out"]).num_rows  # the module's second run may have landed
    printed = capsys.readouterr()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in printed.out + printed.err
    assert f"{n} in all" in printed.out
    fs = s3_server.fs()
    assert fs.exists(f"{s3_bucket}/search-index/windows.lance")
    assert fs.exists(f"{s3_bucket}/search-index/overheard_index.json")
    assert index_main([str(captioned["out"]), idx]) == 0  # incremental: nothing new
    assert f"0 added, {n} in all" in capsys.readouterr().out
    hits = search(idx, "the sound of rain", k=3)
    assert 0 < len(hits) <= 3 and all(D_FIELDS <= set(h) for h in hits)
    assert all(h["confidence"] is None for h in hits)  # these parts have no confidence column
    caps = _captions(captioned["out"])
    v = caps.column("audio_embedding")[0].as_py()
    assert vector_search(idx, v, k=1)[0]["cosine"] == pytest.approx(1.0, abs=1e-4)


def test_index_job_runs_without_ray(captioned, tmp_path):
    """``overheard index`` in a fresh interpreter never imports Ray (LanceDB does the work)."""
    import subprocess
    import sys
    code = ("import sys; from jobs.index import main; main(sys.argv[1:]); "
            "print('RAY' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) "
            "else 'NO-RAY')")
    r = subprocess.run([sys.executable, "-c", code, str(captioned["out"]), str(tmp_path / "i")],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "NO-RAY"
    assert " added, " in r.stdout


def test_confidence_is_carried_when_the_parts_have_it(captioned, tmp_path):
    """Caption parts with a ``confidence`` column (float32, nullable) into an index that was
    built before from parts without one: the column is added, values kept, nulls stay null."""
    import lancedb
    import pyarrow.parquet as pq

    from jobs.index import IndexConfig, run
    caps = _captions(captioned["out"]).slice(0, 3)
    if "confidence" in caps.column_names:  # parts of this version have it: make older ones
        caps = caps.drop_columns(["confidence"])
    out = tmp_path / "out"
    (out / "captions").mkdir(parents=True)
    pq.write_table(caps.slice(0, 1), str(out / "captions" / "part-a.parquet"))
    idx = str(tmp_path / "idx")
    run(IndexConfig(captions=str(out), index=idx))
    conf = pa.array([0.25, None], pa.float32())
    pq.write_table(caps.slice(1, 2).append_column("confidence", conf),
                   str(out / "captions" / "part-b.parquet"))
    s = run(IndexConfig(captions=str(out), index=idx))
    assert s["rows_added"] == 2 and s["rows_total"] == 3
    t = lancedb.connect(idx).open_table("windows").to_arrow()
    assert t.schema.field("confidence").type == pa.float32()
    rows = caps.to_pylist()
    by_key = {(r["source_uri"], r["window_index"]): r["confidence"] for r in t.to_pylist()}
    assert by_key[(rows[0]["source_uri"], rows[0]["window_index"])] is None
    assert by_key[(rows[1]["source_uri"], rows[1]["window_index"])] == 0.25
    assert by_key[(rows[2]["source_uri"], rows[2]["window_index"])] is None


def test_export_opensearch_bulk_shape(captioned, tmp_path, capsys):
    from jobs.export import main
    out = str(tmp_path / "windows.ndjson")
    assert main([str(captioned["out"]), out, "--index-name", "sounds"]) == 0
    printed = capsys.readouterr().out
    caps = _captions(captioned["out"])
    dim = caps.schema.field("audio_embedding").type.list_size
    raw = open(out, "rb").read()
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    lines = raw.decode().split("\n")[:-1]
    assert len(lines) == 2 * caps.num_rows
    ids = []
    for action_line, doc_line in zip(lines[::2], lines[1::2]):
        action, doc = json.loads(action_line), json.loads(doc_line)
        assert list(action) == ["index"] and set(action["index"]) == {"_index", "_id"}
        assert action["index"]["_index"] == "sounds"
        ids.append(action["index"]["_id"])
        assert isinstance(doc, dict) and "index" not in doc
        assert {"source_uri", "window_index", "start_s", "end_s", "caption"} <= set(doc)
        v = doc["audio_embedding"]
        assert len(v) == dim and all(isinstance(f, float) for f in v)
        assert abs(np.linalg.norm(v) - 1) < 1e-4
    assert len(set(ids)) == len(ids)
    # idempotent: a re-export is byte-identical (same _ids, same order)
    out2 = str(tmp_path / "again.ndjson")
    assert main([str(captioned["out"]), out2, "--index-name", "sounds"]) == 0
    assert open(out2, "rb").read() == raw
    mapping = json.loads(open(out + ".mapping.json").read())
    vec = mapping["mappings"]["properties"]["audio_embedding"]
    assert vec["type"] == "knn_vector" and vec["dimension"] == dim
    assert mapping["settings"]["index"]["knn"] is True
    assert json.loads(printed)["mappings"]["properties"]["audio_embedding"] == vec
    # Elasticsearch flavour, split files
    from jobs.export import export
    r = export(str(captioned["out"]), str(tmp_path / "es.ndjson"), flavor="elasticsearch",
               max_docs_per_file=2)
    assert r["body"]["mappings"]["properties"]["audio_embedding"]["type"] == "dense_vector"
    assert sum(open(f).read().count("\n") for f in r["files"]) == 2 * caps.num_rows
