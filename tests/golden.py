"""Caption tables written before a refactor, to prove it changed no behaviour (issue 14).

    python -m tests.golden --write     # regenerate tests/data/golden/*.parquet (only on purpose)

Three runs over examples/media, a 37.8-s medley of them, and two bad files (an empty .wav and random bytes named .flac,
so failure rows are compared too): the shipped default model (beam search), the same model with
projection decoding, a 5-s hop and scored captions, and greedy nearest-neighbour decoding with
--min-confidence 0.5 (withheld captions). Each run's caption and failure rows are stored sorted,
with the source path made relative and the columns that depend on when or where it ran
(run_id, source_version) dropped. tests/test_golden.py re-runs them and compares: captions,
decoding labels, model ids and error types exactly, floats within 1e-4.

One column was rewritten once, on purpose: the decoder part of ``model_id`` was a hash of the
decoder's local path (so the tables matched only in the checkout that wrote them); it is now
``overheard.checkpoint.model_id`` over the decoder's files, and the stored ``model_id`` was replaced by the
new id after checking that every other column of a fresh run still matched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")
EXAMPLES = os.path.join(ROOT, "examples", "media")
RUNS = {
    "default": {},
    "projection": dict(strategy="projection", hop=5.0, score_captions=True),
    "withheld": dict(strategy="nearest", search="greedy", min_confidence=0.5),
}
DROP = ("run_id", "source_version")


def make_input(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    for f in sorted(os.listdir(EXAMPLES)):
        if not f.endswith(".md"):
            shutil.copy(os.path.join(EXAMPLES, f), os.path.join(d, f))
    # one long file (37.8 s) so windows past the first and 5-s hops are compared too
    parts = ["soundworld_0.ogg", "dog_bark_like.ogg", "soundworld_1.ogg", "speech.mp3",
             "soundworld_2.ogg"]
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    for p in parts:
        cmd += ["-i", os.path.join(EXAMPLES, p)]
    cmd += ["-filter_complex", "".join(f"[{i}:a]" for i in range(len(parts))) +
            f"concat=n={len(parts)}:v=0:a=1[a]", "-map", "[a]", "-ar", "48000", "-ac", "1",
            "-c:a", "pcm_s16le", "-bitexact", os.path.join(d, "medley.wav")]
    subprocess.run(cmd, check=True)
    open(os.path.join(d, "empty.wav"), "wb").close()
    # fixed bytes, not random: the same failure message every time
    with open(os.path.join(d, "noise.flac"), "wb") as f:
        f.write(bytes((i * 97 + 13) % 251 for i in range(4096)))
    return d


def normalise(t: pa.Table, input_dir: str) -> pa.Table:
    t = t.drop_columns([c for c in DROP if c in t.column_names])
    rel = pc.replace_substring(t["source_uri"], input_dir.rstrip("/") + "/", "")
    t = t.set_column(t.column_names.index("source_uri"), "source_uri", rel)
    if "message" in t.column_names:  # failure messages name the file
        msg = pc.replace_substring(t["message"], input_dir.rstrip("/") + "/", "")
        t = t.set_column(t.column_names.index("message"), "message", msg)
    keys = [("source_uri", "ascending")]
    if "window_index" in t.column_names:
        keys.append(("window_index", "ascending"))
    else:
        keys.append(("error_type", "ascending"))
    return t.sort_by(keys)


def run_all(work: str) -> dict[str, dict[str, pa.Table]]:
    """{run name: {"captions": table, "failures": table}} for the golden runs, in ``work``."""
    from jobs.caption import CaptionConfig, run
    from jobs.sink import read_table_dir

    inp = make_input(os.path.join(work, "input"))
    out = {}
    for name, kw in RUNS.items():
        dest = os.path.join(work, name)
        run(CaptionConfig(input=inp, output=dest, progress=False, **kw))
        out[name] = {t: normalise(read_table_dir(os.path.join(dest, t)), inp)
                     for t in ("captions", "failures")}
    return out


def main() -> int:
    import tempfile

    import ray
    if "--write" not in sys.argv:
        print(__doc__)
        return 2
    ray.init(num_cpus=2, include_dashboard=False)
    with tempfile.TemporaryDirectory() as work:
        tables = run_all(work)
    os.makedirs(GOLDEN, exist_ok=True)
    for name, ts in tables.items():
        for t, table in ts.items():
            pq.write_table(table, os.path.join(GOLDEN, f"{name}-{t}.parquet"))
            print(name, t, table.num_rows, "rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
