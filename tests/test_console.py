"""What a new user reads on the console after a few runs into one OUTPUT (found by trying the
tool as one): the failed files named at the end of a run and listed by ``overheard status
--failures``; ``overheard status`` saying what OUTPUT holds over all runs (not only the latest,
which after a no-op resume says "failures: none"); a manifest's repeated rows counted apart from
its sources; ``overheard show`` aligned for CJK/emoji names.

Three real runs of ``overheard caption`` (in-process CLI, the suite's local Ray, the tiny model)
on wav files made with sox, a corrupt .flac and a file the manifest names before it exists:
    r1: a manifest of 5 sources -> 3 captioned, corrupt.flac fails (corrupt, permanent),
        late.wav fails (not_found, retryable)
    r2: late.wav now exists; the manifest names a.wav and late.wav twice more (7 rows, 5 sources)
        -> late.wav captioned, 4 already done, 2 duplicate rows
    r3: the same manifest again: nothing to do
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re

import pytest

from tests import media_factory as mf

NAMES = ("a.wav", "日本の音.wav", "🐕 dog.wav")


def _cli(argv: list[str]) -> tuple[int, str]:
    from jobs.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, tiny_model, ray_local):
    d = tmp_path_factory.mktemp("console")
    media = d / "media"
    media.mkdir()
    for i, name in enumerate(NAMES):
        mf.make_tone(media / name, seconds=3.0, sr=16000, freq=300 + 100 * i)
    rng = random.Random(7)
    (media / "corrupt.flac").write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    uris = [str(media / n) for n in (*NAMES, "corrupt.flac", "late.wav")]
    m1, m2 = d / "m1.csv", d / "m2.csv"
    m1.write_text("uri\n" + "\n".join(uris) + "\n")
    m2.write_text("uri\n" + "\n".join(uris + [uris[0], uris[-1]]) + "\n")
    out = str(d / "out")
    common = ["--model", tiny_model, "--show", "0", "--no-progress"]
    runs = {"r1": _cli(["caption", str(m1), out, "--run-id", "r1", *common])}
    mf.make_tone(media / "late.wav", seconds=3.0, sr=16000, freq=900)
    for r in ("r2", "r3"):
        runs[r] = _cli(["caption", str(m2), out, "--run-id", r, *common])
    man = {r: json.load(open(os.path.join(out, "runs", r, "manifest.json"))) for r in runs}
    return dict(out=out, uris=uris, runs=runs, man=man)


def test_caption_names_the_failed_files_and_where_they_are(three_runs):
    out, uris = three_runs["out"], three_runs["uris"]
    rc, text = three_runs["runs"]["r1"]
    assert rc == 0 and "3 files captioned, 2 failed" in text
    block = text[text.index("failed sources of this run (2):"):]
    assert "corrupt (1 source)" in block and "not_found (1 source)" in block
    # each failed file by its URI, with its reason on the same line
    assert re.search(re.escape(uris[3]) + r": \S", block)
    assert re.search(re.escape(uris[4]) + r": \S", block)
    assert f"all failure rows: {os.path.join(out, 'failures')}" in block
    assert f"overheard status {out} --failures --run-id r1" in block
    # a run without failures prints no such block
    assert "failed sources of this run" not in three_runs["runs"]["r2"][1]


def test_status_failures_lists_every_failed_source_by_type(three_runs):
    out, uris = three_runs["out"], three_runs["uris"]
    rc, text = _cli(["status", out, "--failures"])
    assert rc == 0
    lines = text.splitlines()
    assert "corrupt (1 source)" in lines
    assert "not_found (1 source, 1 captioned by a later run)" in lines
    late = next(ln for ln in lines if ln.startswith(f"  {uris[4]}: "))
    assert late.endswith("[captioned by a later run]")
    bad = next(ln for ln in lines if ln.startswith(f"  {uris[3]}: "))
    assert "later run" not in bad
    # the URI leads the line once; the message does not repeat it ("x: corrupt: x: ...", an
    # OS error's "No such file or directory: 'x'")
    assert bad.count(uris[3]) == 1 and late.count(uris[4]) == 1, (bad, late)
    rc, js = _cli(["status", out, "--failures", "--json"])
    rows = {r["source_uri"]: r for r in json.loads(js)}
    assert set(rows) == {uris[3], uris[4]}
    assert rows[uris[3]]["error_type"] == "corrupt" and rows[uris[3]]["still_failing"]
    assert rows[uris[4]]["retryable"] and not rows[uris[4]]["still_failing"]
    assert rows[uris[4]]["run_id"] == "r1"
    rc, none = _cli(["status", out, "--failures", "--run-id", "r2"])
    assert rc == 0 and none.strip() == f"no failed sources in {out} run r2"


def test_status_says_what_output_holds_over_all_runs(three_runs):
    out = three_runs["out"]
    rc, text = _cli(["status", out])
    assert rc == 0
    latest, total = text.split("\n\noutput total")
    # the latest run (a no-op resume) has no failures of its own ...
    assert latest.startswith("run r3: completed") and "failures: none" in latest
    # ... but OUTPUT holds two failed sources, one of them captioned since
    assert total.splitlines()[0] == " over 3 runs:"
    assert ("  sources: 4 captioned, 2 failed {'corrupt': 1, 'not_found': 1}, "
            "1 still failing {'corrupt': 1}") in total
    windows = sum(m["windows"] for m in three_runs["man"].values())
    assert windows > 0 and f"  windows: {windows} (" in total
    assert f"overheard status {out} --failures" in total


def test_repeated_manifest_rows_are_not_sources(three_runs):
    man, runs = three_runs["man"], three_runs["runs"]
    assert (man["r1"]["sources_listed"], man["r1"]["sources_duplicate"]) == (5, 0)
    # 7 rows naming 5 sources: a.wav (done) and late.wav (to do) repeated once each
    r2 = man["r2"]
    assert (r2["sources_listed"], r2["sources_duplicate"], r2["sources_skipped_done"],
            r2["sources_todo"], r2["sources_captioned"]) == (5, 2, 4, 1, 1)
    r3 = man["r3"]
    assert (r3["sources_listed"], r3["sources_duplicate"], r3["sources_skipped_done"],
            r3["sources_todo"]) == (5, 2, 5, 0)
    assert "0 failed, 5 already done (2 duplicate listing entries ignored)" in runs["r3"][1]
    rc, text = _cli(["status", three_runs["out"], "--run-id", "r3"])
    assert "5 already done before this run, 5 listed (+2 duplicate entries)" in text


def test_show_aligns_wide_file_names(three_runs):
    from jobs.show import display_width

    rc, text = _cli(["show", three_runs["out"]])
    assert rc == 0
    cols = {}
    for line in text.splitlines():
        m = re.search(r" +\d+\.\d\d- *\d+\.\d\ds  ", line)
        cols.setdefault(line[:m.start()].rstrip(), set()).add(display_width(line[:m.end()]))
    assert set(cols) >= set(NAMES)  # the CJK and emoji names are there
    # every row's time column ends at the same terminal column, whatever the name's characters
    assert len(set().union(*cols.values())) == 1, cols
    assert display_width("日本の音.wav") == 12 and display_width("🐕 dog.wav") == 10

