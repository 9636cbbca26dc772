"""What a user meets at the command line (found by trying the merged tool as a new user): one line
for a mistyped path instead of a traceback, `show` that does not pass a typo off as "no rows",
timeline file names that keep the source's own name, output files readable like any other."""

from __future__ import annotations

import os
import stat

import pytest


@pytest.mark.parametrize("argv", [
    ["caption", "/nonexistent/in", "/tmp/overheard-never-written"],
    ["timeline", "/nonexistent/out", "/tmp/overheard-never-written", "--format", "srt"],
    ["search", "/nonexistent/idx", "a dog"],
])
def test_missing_paths_are_one_line(argv, capsys):
    from jobs.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"overheard {argv[0]}: error: ") and "/nonexistent" in err[0]
    assert not os.path.exists("/tmp/overheard-never-written")


def test_show_of_a_typo_is_not_an_empty_result(tmp_path, capsys):
    from jobs.cli import main

    assert main(["show", str(tmp_path / "typo")]) == 1
    assert "no caption rows" in capsys.readouterr().err


def test_timeline_file_names_keep_the_source_name():
    from jobs.timeline import file_names

    names = file_names([("/a/track#2.flac", None), ("/a/scene one.ogg#t=3.5,7.5", None),
                        ("s3://b/train-00000.parquet#1", None),
                        ("s3://b/shard-000.tar#dir/s002.ogg", None), ("/x/clip.mp4", None)], "srt")
    assert list(names.values()) == ["track_2.srt", "scene_one-t3.5-7.5.srt", "train-00000-1.srt",
                                    "s002.srt", "clip.srt"]


def test_output_files_follow_the_umask(tmp_path):
    from overheard import storage

    p = tmp_path / "runs" / "r" / "manifest.json"
    storage.write_bytes_atomic(str(p), b"{}")
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode == 0o666 & ~storage._UMASK  # 0644 under the usual umask 022, not mkstemp's 0600


@pytest.mark.parametrize("argv, line", [
    (["caption", "in", "out", "--windw", "3"],
     "overheard caption: unknown option --windw (did you mean --window?)"),
    (["show", "out", "--limt=3"], "overheard show: unknown option --limt (did you mean --limit?)"),
    (["status", "out", "--frobnicate"],
     "overheard status: unknown option --frobnicate (see overheard status --help)"),
    (["index", "out", "idx", "extra"],
     "overheard index: unexpected argument 'extra' (see overheard index --help)"),
    (["caption", "in", "out", "--window", "x"],
     "overheard caption: error: argument --window: invalid float value: 'x' "
     "(see overheard caption --help)"),
])
def test_a_mistyped_option_is_one_line(argv, line):
    """The real command in a fresh process: one line on stderr (not argparse's usage block, 60
    lines for caption), nothing on stdout, exit 2."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=root, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [line]


def test_index_of_a_missing_or_empty_output_creates_nothing(tmp_path, capsys):
    from jobs.cli import main

    empty = tmp_path / "empty-out"
    empty.mkdir()
    for out in (tmp_path / "typo", empty):
        idx = tmp_path / f"idx-{out.name}"
        assert main(["index", str(out), str(idx)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("overheard index: error: ")
        assert str(out) in err[0] and not idx.exists()
