"""Listing and planning in chunks (jobs/sources.py, issue 19 item 4): manifest folders of parts,
S3 prefixes listed page by page, dedup across chunks and spill buckets, the anti-join against
what OUTPUT holds, --limit. No Ray: these are the driver's metadata paths."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sources
from jobs.sink import done_uris
from overheard import storage
from overheard.schema import FAILURE_SCHEMA


def _plan(inp, out, **kw):
    return sources.plan_sources(sources.open_listing(inp, page_size=kw.pop("page_size", None)),
                                str(out), os.path.join(str(out), "todo"), **kw)


def _todo(plan) -> list[tuple]:
    return [(u, v) for u, v, *_ in plan.rows()]


def test_manifest_folder_of_parquet_csv_and_jsonl_parts(tmp_path, monkeypatch):
    """A folder whose files are all manifest parts is read part by part, in listing order; a
    URI named by two parts is one source, the first part's entry winning; JSONL paths are
    relative to their part's folder."""
    monkeypatch.setattr(sources, "CHUNK_ROWS", 2)  # several batches per part
    parts = tmp_path / "manifest"
    parts.mkdir()
    pq.write_table(pa.table({"uri": ["s3://b/a.wav", "s3://b/c.wav", "s3://b/a.wav", None, ""],
                             "version": ["v1", "v1", "dup", "x", "y"]}), parts / "part-0.parquet")
    (parts / "part-1.csv").write_text("uri,version,size\ns3://b/c.wav,later,9\ns3://b/d.wav,v2,x\n"
                                      "s3://b/e.wav,v2,12\n")
    (parts / "part-2.jsonl").write_text(
        json.dumps({"audio_filepath": "rel/f.flac", "offset": 1, "duration": 2}) + "\n"
        "not json\n" + json.dumps({"audio_filepath": "s3://b/a.wav", "version": "jl"}) + "\n")
    listing = sources.open_listing(str(parts))
    assert listing.kind == "parts"
    t = sources.list_sources(str(parts))
    got = list(zip(*(t[c].to_pylist() for c in ("source_uri", "source_version", "size"))))
    f = str(parts / "rel" / "f.flac")
    assert got == sorted([("s3://b/a.wav", "v1", 0), ("s3://b/c.wav", "v1", 0),
                          ("s3://b/d.wav", "v2", 0), ("s3://b/e.wav", "v2", 12),
                          (f"{parts}/part-2.jsonl#line=2", "", 0),
                          (f + "#t=1,3", "", 32_000)])
    loc = dict(zip(t["source_uri"].to_pylist(), t["locator"].to_pylist()))
    assert loc[f + "#t=1,3"]["kind"] == "span" and loc["s3://b/a.wav"] is None
    assert loc[f"{parts}/part-2.jsonl#line=2"]["error_type"] == "corrupt"
    # OUTPUT inside the folder: its parts (they have a source_uri column) are not manifest parts
    out = parts / "out"
    _parts(out, captions=["s3://b/zz.wav"])
    p = sources.plan_sources(sources.open_listing(str(parts), output=str(out)), str(out),
                             str(out / "runs" / "r" / "todo"))
    assert [u for u, _ in _todo(p)] == [u for u in t["source_uri"].to_pylist()]
    # 9 entries (3 Parquet rows with a URI, 3 CSV rows, 3 JSONL lines) naming 6 sources
    assert (p.listed, p.duplicate) == (6, 3)
    # a folder holding media as well is a media folder: its Parquet URI tables are not sources
    (parts / "z.wav").write_bytes(b"RIFF")
    assert sources.open_listing(str(parts)).kind == "files"
    assert sources.list_sources(str(parts))["source_uri"].to_pylist() == [str(parts / "z.wav")]


def test_manifest_part_without_text_uri_column_is_refused_at_open(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    pq.write_table(pa.table({"uri": [1, 2]}), d / "part-0.parquet")
    with pytest.raises(ValueError, match="must hold text"):
        sources.open_listing(str(d))
    (d / "part-0.parquet").unlink()
    (d / "part-0.csv").write_text("name\nx.wav\n")
    with pytest.raises(ValueError, match="needs one of the columns"):
        sources.open_listing(str(d))


def test_dedup_across_chunks_and_spill_buckets_keeps_the_first_entry(tmp_path, monkeypatch):
    """2,000 entries of 600 URIs in a scrambled order, read 64 rows at a time: held in memory
    and spilled to hash buckets, both give each URI once with its first entry's version."""
    n = 2000
    uris = [f"s3://b/k{(i * 7919) % 600:04d}.wav" for i in range(n)]
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris, "version": [f"e{i}" for i in range(n)]}), man)
    first = {}
    for i, u in enumerate(uris):
        first.setdefault(u, f"e{i}")
    monkeypatch.setattr(sources, "CHUNK_ROWS", 64)
    held = _plan(str(man), tmp_path / "o1")
    assert _todo(held) == sorted(first.items())  # in memory: sorted by URI
    # sources counted once each; the 1,400 repeats apart (a new user read 7 "listed" of 5)
    assert (held.count, held.listed, held.skipped_done, held.duplicate) == (600, 600, 0, n - 600)
    monkeypatch.setattr(sources, "SPILL_ROWS", 100)
    monkeypatch.setattr(sources, "BUCKETS", 8)
    monkeypatch.setattr(sources, "TODO_PART_ROWS", 128)
    spilled = _plan(str(man), tmp_path / "o2")
    assert sorted(_todo(spilled)) == sorted(first.items())
    assert spilled.count == 600 and len(spilled.parts) == 5  # 600 rows in parts of 128
    assert (spilled.listed, spilled.duplicate) == (600, n - 600)  # counted bucket by bucket
    # done sources met many times over many chunks count once: 200 done, each listed 3-4 times
    _parts(tmp_path / "o4", captions=[f"s3://b/k{i:04d}.wav" for i in range(0, 600, 3)])
    part_done = _plan(str(man), tmp_path / "o4")
    assert (part_done.listed, part_done.skipped_done, part_done.count,
            part_done.duplicate) == (600, 200, 400, n - 600)
    again = _plan(str(man), tmp_path / "o3")
    assert _todo(again) == _todo(spilled)  # deterministic order: bucket, then URI
    b = sources._bucket_ids(pa.array([u for u, _ in _todo(spilled)]), 8)
    assert list(b) == sorted(b) and len(set(b)) == 8  # bucket order; every bucket used


def _parts(out, captions=(), failures=()):
    os.makedirs(out / "captions", exist_ok=True)
    os.makedirs(out / "failures", exist_ok=True)
    pq.write_table(pa.table({"source_uri": list(captions)}), out / "captions" / "part-r-0.parquet")
    n = len(failures)
    pq.write_table(pa.table({
        "source_uri": [u for u, _ in failures], "source_version": [""] * n,
        "stage": ["read"] * n, "error_type": ["read_error" if r else "corrupt" for _, r in failures],
        "message": ["m"] * n, "retryable": [r for _, r in failures],
        "windows_kept": pa.array([0] * n, pa.int32()), "run_id": ["r"] * n},
        schema=FAILURE_SCHEMA), out / "failures" / "part-r-0.parquet")
    # a temp file (a part being written) never counts
    pq.write_table(pa.table({"source_uri": ["s3://b/e.wav"]}), out / "captions" / ".tmp-x.parquet")


def test_anti_join_rules_captions_and_permanent_failures_are_done(tmp_path):
    """Done: caption rows, or a permanent failure (even beside a retryable one). Redone: only
    retryable failures. Nothing else is done, however the URI is spelt elsewhere."""
    out = tmp_path / "out"
    _parts(out, captions=["s3://b/a.wav", "s3://b/a.wav"],
           failures=[("s3://b/b.wav", True), ("s3://b/c.wav", False), ("s3://b/d.wav", True),
                     ("s3://b/d.wav", False)])
    assert done_uris(str(out)).to_pylist() == ["s3://b/a.wav", "s3://b/c.wav", "s3://b/d.wav"]
    man = tmp_path / "m.csv"
    man.write_text("uri\n" + "\n".join(f"s3://b/{c}.wav" for c in "edcba") + "\ns3://b/c.wav\n")
    p = _plan(str(man), out)
    assert [u for u, _ in _todo(p)] == ["s3://b/b.wav", "s3://b/e.wav"]
    # sources counted, not entries: c listed twice is one done source and one duplicate
    assert (p.listed, p.skipped_done, p.count, p.duplicate) == (5, 3, 2, 1)
    assert done_uris(str(tmp_path / "nothing")).to_pylist() == []


def test_limit_takes_the_first_sources_by_uri_from_any_order(tmp_path, monkeypatch):
    """--limit N: the first N todo sources by URI, exact whatever the manifest's order and
    chunking (a running top-N), duplicates resolved to their first entry."""
    monkeypatch.setattr(sources, "CHUNK_ROWS", 50)
    uris = [f"s3://b/{(i * 37) % 400:03d}.wav" for i in range(800)]  # each URI twice
    man = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris, "version": [str(i) for i in range(800)]}), man)
    out = tmp_path / "out"
    _parts(out, captions=["s3://b/000.wav", "s3://b/002.wav"])
    p = _plan(str(man), out, limit=5)
    want = [f"s3://b/{k:03d}.wav" for k in (1, 3, 4, 5, 6)]
    assert [u for u, _ in _todo(p)] == want
    first = {}
    for i, u in enumerate(uris):
        first.setdefault(u, str(i))
    assert [v for _, v in _todo(p)] == [first[u] for u in want]
    assert p.complete  # a manifest is read to its end
    # the repeats of the 2 done and of the 5 kept are found; the 393 beyond the 5th are never
    # deduplicated (a running top-N holds N rows, not every URI), so they count as listed
    assert (p.listed, p.skipped_done, p.duplicate) == (800 - 7, 2, 7)


def test_limit_stops_listing_an_ordered_folder_early(tmp_path, monkeypatch):
    d = tmp_path / "in"
    for sub in ("a", "b", "c"):
        (d / sub).mkdir(parents=True)
        for i in range(10):
            (d / sub / f"{i:02d}.wav").write_bytes(b"x")
    pages = []
    real = storage.iter_file_pages

    def counting(*a, **kw):
        for page in real(*a, **kw):
            pages.append(len(page))
            yield page
    monkeypatch.setattr(storage, "iter_file_pages", counting)
    listing = sources.open_listing(str(d), page_size=4)
    pages.clear()  # open_listing's look at the first page (a media folder or manifest parts?)
    p = sources.plan_sources(listing, "", str(tmp_path / "todo"), limit=3,
                             done=pa.array([], pa.string()))
    assert [u.rsplit("/", 2)[-2:] for u, _ in _todo(p)] == [["a", "00.wav"], ["a", "01.wav"],
                                                             ["a", "02.wav"]]
    # 30 files in pages of 4: the first page holds the 3, the second (read ahead) bounds them
    assert not p.complete and len(pages) == 2 and p.listed == 4
    full = _plan(str(d), tmp_path / "out2", limit=30, page_size=4)
    assert full.complete and full.count == 30


def test_output_inside_input_is_not_listed(tmp_path):
    d = tmp_path / "in"
    (d / "out" / "captions").mkdir(parents=True)
    (d / "a.wav").write_bytes(b"x")
    (d / "out" / "captions" / "x.wav").write_bytes(b"x")
    (d / "outdoor.wav").write_bytes(b"x")  # contains the output's name, is not inside it
    p = _plan(str(d), d / "out")
    assert sorted(os.path.basename(u) for u, _ in _todo(p)) == ["a.wav", "outdoor.wav"]
    p.remove()
    assert not os.path.exists(p.path)


def test_s3_prefix_and_glob_are_listed_page_by_page(s3_server, s3_bucket, monkeypatch):
    """The loopback S3 server with pages of 3 keys: every ListObjectsV2 call asks for at most 3,
    the listing equals s3fs's own find, and --limit stops after the pages it needs."""
    fs = s3_server.fs()
    base = f"{s3_bucket}/paged"
    keys = [f"x/{i:02d}.wav" for i in range(14)] + ["x/sub/z.flac", "x/.hidden.wav",
                                                    "x/notes.txt", "y/00.wav"]
    for k in keys:
        fs.pipe(f"{base}/{k}", b"RIFF" + k.encode())
    calls = []
    import s3fs
    real = s3fs.S3FileSystem.call_s3

    def counting(self, method, *a, **kw):
        if method == "list_objects_v2":
            calls.append(kw.get("MaxKeys"))
        return real(self, method, *a, **kw)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", counting)
    got = sources.list_sources(f"s3://{base}/x/")
    want = sorted(f"s3://{p}" for p in fs.find(f"{base}/x/") if p.endswith((".wav", ".flac"))
                  and "/." not in p)
    assert got["source_uri"].to_pylist() == want and len(want) == 15
    assert all(v and ":" not in v for v in got["source_version"].to_pylist())  # ETags
    calls.clear()
    pages = list(storage.iter_file_pages(f"s3://{base}/x/", (".wav", ".flac"), page_size=3))
    assert calls and set(calls) == {3} and len(calls) >= 6  # 17 keys in pages of 3
    assert [u for p in pages for u, _, _ in p] == want
    calls.clear()
    g = [u for p in storage.iter_file_pages(f"s3://{base}/*/0*.wav", page_size=3) for u, _, _ in p]
    assert g == sorted(f"s3://{p}" for p in fs.glob(f"{base}/*/0*.wav"))
    calls.clear()
    listing = sources.open_listing(f"s3://{base}/x/", page_size=3)
    calls.clear()
    p = sources.plan_sources(listing, "", "memory://overheard-test-todo/todo", limit=2,
                             done=pa.array([], pa.string()))
    assert [u for u, _ in _todo(p)] == want[:2] and not p.complete
    # the pages holding them (.hidden.wav takes a slot of the first) and the one read ahead,
    # not all 6+ of the prefix
    assert len(calls) == 3
    p.remove()


def test_jsonl_in_chunks_matches_reading_it_whole(tmp_path):
    from overheard import layouts
    m = tmp_path / "m.jsonl"
    lines = [json.dumps({"audio_filepath": f"a{i % 7}.wav", "offset": i % 3, "duration": 1})
             for i in range(40)] + ["{bad", ""]
    m.write_text("\r\n".join(lines) + "\n")
    chunks = list(layouts.iter_jsonl(str(m), chunk_lines=5))
    assert len(chunks) > 3 and all(len(c) <= 5 for c in chunks)
    merged = {}
    for c in chunks:
        for s in c:
            merged.setdefault(s[0], s)
    assert sorted(merged.values(), key=lambda s: s[0]) == layouts.read_jsonl(str(m))
    assert f"{m}#line=41" in merged  # line numbers as bytes.splitlines counts them


def test_one_local_file_named_three_ways_is_one_source(tmp_path):
    """/x/clip3.wav, file:///x/clip3.wav and /x/../x/clip3.wav name one file: one source (the
    first entry's version wins), the other two counted as duplicates; a span fragment keeps its
    suffix, s3:// and relative URIs are left as they are."""
    d = tmp_path / "x"
    d.mkdir()
    clip = str(d / "clip3.wav")
    alias = f"{tmp_path}/../{tmp_path.name}/x/./clip3.wav"
    man = tmp_path / "m.csv"
    man.write_text("uri,version\n" + "\n".join([
        f"{clip},first", f"file://{clip},second", f"{tmp_path}/x/../x/clip3.wav,third",
        f'"{alias}#t=1,2",span', "s3://b/../k//a.wav,s3", "rel/../a.wav,rel"]) + "\n")
    p = _plan(str(man), tmp_path / "out")
    assert _todo(p) == sorted([(clip, "first"), (f"{clip}#t=1,2", "span"),
                               ("s3://b/../k//a.wav", "s3"), ("rel/../a.wav", "rel")])
    assert (p.count, p.listed, p.duplicate) == (4, 4, 2)
    # done sources in normal form are skipped whatever form the manifest names them in
    p2 = _plan(str(man), tmp_path / "out2", done=pa.array([clip]))
    assert (p2.count, p2.skipped_done, p2.duplicate) == (3, 1, 2)
    # a JSONL line's file:// path and ../ path too
    j = tmp_path / "m.jsonl"
    j.write_text("\n".join(json.dumps({"audio_filepath": a}) for a in [
        clip, f"file://{clip}", "x/../x/clip3.wav", "./x/clip3.wav"]) + "\n")
    p3 = _plan(str(j), tmp_path / "out3")
    assert [r[0] for r in p3.rows()] == [clip] and p3.duplicate == 3


def test_jsonl_duplicates_are_counted_and_plain_lines_are_loose(tmp_path):
    """11 lines naming 10 files: 10 sources and 1 duplicate (as a CSV manifest counts it); a line
    naming only a file is a loose source (no locator: the decode task stats it), a line with
    other keys or a span keeps its span locator; source ids as before."""
    d = tmp_path / "clips"
    d.mkdir()
    names = [f"c{i}.wav" for i in range(10)]
    j = d / "m.jsonl"
    j.write_text("\n".join(json.dumps({"audio_filepath": n}) for n in names + ["c3.wav"]) + "\n")
    p = _plan(str(j), tmp_path / "out")
    rows = p.rows()
    assert [r[0] for r in rows] == sorted(str(d / n) for n in names)
    assert all(len(r) == 3 for r in rows)  # loose: null locator
    assert (p.count, p.listed, p.duplicate) == (10, 10, 1)
    csv = d / "m.csv"
    csv.write_text("uri\n" + "\n".join(str(d / n) for n in names + ["c3.wav"]) + "\n")
    pc_ = _plan(str(csv), tmp_path / "out_csv")
    assert (pc_.listed, pc_.duplicate) == (p.listed, p.duplicate)
    j2 = d / "m2.jsonl"
    j2.write_text("\n".join(json.dumps(x) for x in [
        {"audio_filepath": "c0.wav", "text": "hi"}, {"audio_filepath": "c1.wav", "size": 123},
        {"audio_filepath": "c2.wav", "offset": 1}, {"audio_filepath": "c4.wav", "size": "x"}]))
    got = {r[0]: r for r in _plan(str(j2), tmp_path / "out2").rows()}
    assert got[str(d / "c0.wav")][3]["kind"] == "span" and got[str(d / "c0.wav")][3]["meta"]
    # a "size" key is one of the line's keys (source_meta, as before): a span locator, its size
    # used; a size that is not a number is unknown, not an error
    assert got[str(d / "c1.wav")][2] == 123 and got[str(d / "c4.wav")][2] == 0
    assert got[str(d / "c2.wav") + "#t=1"][3]["kind"] == "span"
