"""``overheard evaluate CAPTIONS REFERENCES``: score a caption table against reference captions.

    overheard evaluate ./out clotho_captions_evaluation.csv
    overheard evaluate ./out audiocaps_test.csv --metrics bleu,meteor,rouge_l,cider_d --out eval.json
    overheard evaluate ./out refs.csv --metrics all          # + SPICE/SPIDEr (Java 8/11 + CoreNLP jars)

CAPTIONS: a caption-job output folder (its ``captions/*.parquet``), a folder of Parquet parts, or
one Parquet file, local or s3://.  ``--windowing`` says which caption stands for a clip:
    first  the caption of its FIRST window (lowest ``window_index``; a 10-s clip is one window);
           the report counts the clips that had more windows than the one scored
    whole  the clip's one whole-clip window: caption with ``overheard caption --whole-clip S``
           (S >= the longest clip, e.g. 30 for Clotho's 15-30-s clips), which embeds each clip as
           CLAP's normalised mean over its 10-s chunks; a clip with several windows is an error
The report (and its first line on stdout) says which was used.
REFERENCES: CSV / Parquet in the Clotho layout (``file_name, caption_1..caption_5``) or the
AudioCaps layout (``youtube_id`` [+ ``audiocap_id, start_time``], one ``caption`` per row, rows of
one clip grouped).  A source matches a reference by file basename: exactly, else without the
extension (``a.flac`` <-> ``a.wav``), else AudioCaps' ``Y<id>`` / ``<id>_<start>`` names.

Metrics (``overheard.metrics``, where each one's implementation and needs are listed): the
maintained COCO caption evaluation code (``pycocoevalcap``, the implementation the DCASE / AAC
literature reports; aac-metrics wraps the same code but downloads its Java parts on first use)
on PTB-tokenised, lower-cased text without punctuation: bleu_1..bleu_4, meteor, rouge_l,
cider_d (the AAC literature's "CIDEr"), and on request spice and spider.

The default set leaves SPICE/SPIDEr out (and says so): their jars are a first-use download that
offline machines cannot make.  Asking for them without the jars is an error naming the missing
files -- never a silent gap.  The PTB tokenizer is Java too (``--tokenizer simple`` is a
pure-Python approximation for machines without Java; it changes scores slightly, and the output
records which one ran).

Output: a JSON (``--out``; default ``CAPTIONS/evaluation.json``) with the corpus scores, counts,
unmatched clips, what was not computed and why, and per-clip scores; a table on stdout.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

from jobs.config_cli import parse
from overheard import storage
from overheard.metrics import (ALL_METRICS, DEFAULT_METRICS, NOT_DEFAULT_NOTE, MetricUnavailable, Scorer,
                               parse_metrics)

KEY_COLUMNS = ("file_name", "youtube_id", "file", "filename", "audio", "path", "uri", "fname")
WINDOWINGS = ("first", "whole")


@dataclass
class EvaluateConfig:
    captions: str = field(metadata={
        "help": "caption-job output folder, folder of parts, or a .parquet"})
    references: str = field(metadata={
        "help": "reference captions .csv/.parquet (Clotho or AudioCaps layout)"})
    metrics: str = field(default=",".join(DEFAULT_METRICS), metadata={
        "help": f"comma-separated, from {', '.join(ALL_METRICS)}; aliases bleu, rouge, cider, "
                f"default, all"})
    out: str = field(default="", metadata={
        "help": "JSON report (default CAPTIONS/evaluation.json, or <file>.evaluation.json for a "
                "single file)"})
    tokenizer: str = field(default="ptb", metadata={
        "choices": ("ptb", "simple"),
        "help": "ptb: Stanford PTBTokenizer as in COCO (Java); simple: Python approximation"})
    corenlp_dir: str = field(default="", metadata={
        "help": "folder holding the CoreNLP 3.6.0 jars for SPICE (default: pycocoevalcap/spice/lib)"})
    strict: bool = field(default=False, metadata={"help": "unmatched clips are an error"})
    windowing: str = field(default="first", metadata={
        "choices": WINDOWINGS,
        "help": "first: score each clip's first window; whole: each clip's one whole-clip window "
                "(caption with --whole-clip S)"})

    def validate(self) -> None:
        try:  # an unknown metric name: one line, before reading any table
            parse_metrics(self.metrics)
        except ValueError as e:
            raise ValueError(f"--metrics: {e}") from None


# ----------------------------------------------------------------------------- reading tables
def read_references(uri: str) -> dict[str, list[str]]:
    """{clip key (file basename / youtube id as written): [reference captions]} of a table."""
    from overheard.corpus import caption_columns, read_table

    t = read_table(uri)
    key = next((c for c in KEY_COLUMNS if c in t.column_names), None)
    if key is None:
        raise ValueError(f"{uri}: needs a clip column, one of {KEY_COLUMNS} (Clotho: file_name, "
                         f"AudioCaps: youtube_id); has {t.column_names}")
    cols = caption_columns(t.column_names)
    keys = t.column(key).to_pylist()
    data = [t.column(c).to_pylist() for c in cols]
    out: dict[str, list[str]] = {}
    for i, k in enumerate(keys):
        if k is None or not str(k).strip():
            continue
        caps = out.setdefault(os.path.basename(str(k).strip()), [])
        for col in data:
            v = col[i]
            if v is not None and str(v).strip():
                caps.append(str(v).strip())
    return {k: v for k, v in out.items() if v}


def read_hypotheses(uri: str, windowing: str = "first", counts: dict | None = None
                    ) -> dict[str, str]:
    """{file basename: caption of the source's first window} of a caption table / output dir.
    ``windowing="whole"``: every source must have exactly one window (ValueError naming some
    that do not). ``counts``, if given, receives {basename: windows of that source}."""
    if windowing not in WINDOWINGS:
        raise ValueError(f"--windowing must be one of {WINDOWINGS}, got {windowing!r}")
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(uri)
    if fs.isfile(path):
        files = [uri]
    else:
        base = storage.join(uri, "captions")
        root = base if fs.exists(storage.get_fs(base)[1]) else uri
        from jobs.sink import counts as committed  # (``counts`` is this function's argument)

        ok = committed(root) if root == base else (lambda u: True)  # committed parts (jobs/sink.py)
        files = [u for u, _, _ in storage.list_files(root, (".parquet",)) if ok(u)]
    if not files:
        raise FileNotFoundError(f"no caption Parquet files at {uri} (expected {uri}/captions/*.parquet)")
    best: dict[str, tuple[int, str, str]] = {}
    seen: dict[str, set] = {}
    for u in files:
        with storage.open_input(u) as f:
            t = pq.read_table(f, columns=["source_uri", "window_index", "caption"])
        for s, w, c in zip(*(t.column(n).to_pylist() for n in ("source_uri", "window_index", "caption"))):
            w = int(w or 0)
            seen.setdefault(s, set()).add(w)
            if s not in best or w < best[s][0]:
                best[s] = (w, s, c or "")
    multi = sorted(s for s, ws in seen.items() if len(ws) > 1)
    if windowing == "whole" and multi:
        raise ValueError(
            f"--windowing whole: {len(multi)} of {len(seen)} clips have several windows (e.g. "
            f"{[m.rsplit('/', 1)[-1] for m in multi[:3]]}); caption them with --whole-clip S, "
            f"S >= the longest clip (Clotho: 30), or score their first windows (--windowing first)")
    out: dict[str, str] = {}
    for s, (_, _, c) in sorted(best.items()):
        name = s.rstrip("/").rsplit("/", 1)[-1]
        out[name] = c
        if counts is not None:
            counts[name] = len(seen[s])
    return out


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def match(hyps: dict[str, str], refs: dict[str, list[str]]) -> tuple[dict, dict, list[str], list[str]]:
    """Pair captions with references by basename -> (hyps, refs keyed alike, captions without
    references, references without captions)."""
    by_name = dict(refs)
    by_stem: dict[str, str] = {}
    for k in refs:
        by_stem.setdefault(_stem(k), k)
        by_stem.setdefault(k, k)  # AudioCaps youtube ids carry no extension
    h_out, r_out, unmatched = {}, {}, []
    used = set()
    for name, cap in hyps.items():
        st = _stem(name)
        cands = [name, st]
        if len(st) == 12 and st.startswith("Y"):      # AudioSet's Y<11-char id>
            cands.append(st[1:])
        m = re.match(r"^Y?(.+)_(\d+(?:\.\d+)?)(?:_\d+(?:\.\d+)?)?$", st)  # <id>_<start>[_<end>]
        if m:
            cands.append(m.group(1))
        k = next((c for c in cands if c in by_name), None) or \
            next((by_stem[c] for c in cands if c in by_stem), None)
        if k is None:
            unmatched.append(name)
            continue
        h_out[name], r_out[name] = cap, refs[k]
        used.add(k)
    missing = sorted(k for k in refs if k not in used)
    return h_out, r_out, sorted(unmatched), missing


# ----------------------------------------------------------------------------- job
def evaluate(captions: str, references: str, metrics=DEFAULT_METRICS, tokenizer: str = "ptb",
             corenlp: str = "", scorer: Scorer | None = None, strict: bool = False,
             windowing: str = "first") -> dict:
    """Score ``captions`` against ``references``; returns the report dict (see module doc)."""
    t0 = time.time()
    requested = parse_metrics(metrics)
    own = scorer is None
    sc = scorer or Scorer(requested, tokenizer, corenlp)  # checks Java/jars before reading
    try:
        counts: dict[str, int] = {}
        hyps = read_hypotheses(captions, windowing, counts)
        refs = read_references(references)
        h, r, unmatched, missing = match(hyps, refs)
        if strict and (unmatched or missing):
            raise ValueError(f"{len(unmatched)} captioned clips have no references, {len(missing)} "
                             f"referenced clips have no caption (--strict)")
        corpus, per = sc.score(h, r)
    finally:
        if own:
            sc.close()
    not_computed = {}
    if "spice" not in requested:
        not_computed["spice"] = NOT_DEFAULT_NOTE
    if "spider" not in requested:
        not_computed["spider"] = NOT_DEFAULT_NOTE
    return {
        "captions": captions, "references": references,
        "metrics": {m: corpus[m] for m in requested if m in corpus},
        "not_computed": not_computed,
        "tokenizer": sc.tokenizer, "implementation": "pycocoevalcap 1.2",
        "windowing": windowing,
        "clips_with_unscored_windows": sorted(k for k in h if counts.get(k, 1) > 1),
        "n_scored": len(h), "n_captioned": len(hyps), "n_references": len(refs),
        "captions_without_references": unmatched, "references_without_captions": missing,
        "per_clip": {k: {"caption": h[k], **per[k]} for k in sorted(h)},
        "seconds": round(time.time() - t0, 2),
    }


LABELS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
          "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D", "spice": "SPICE",
          "spider": "SPIDEr"}


WINDOWING_TEXT = {"first": "the first window of each clip",
                  "whole": "whole clips (one window as long as the clip)"}


def format_report(rep: dict) -> str:
    lines = [f"scored: {WINDOWING_TEXT[rep.get('windowing', 'first')]}", "",
             "| metric | score |", "|---|---:|"]
    for m, v in rep["metrics"].items():
        lines.append(f"| {LABELS[m]} | {v:.4f} |")
    for m, why in rep["not_computed"].items():
        lines.append(f"| {LABELS[m]} | n/a |")
    lines.append("")
    lines.append(f"{rep['n_scored']} clips scored ({rep['n_captioned']} captioned, "
                 f"{rep['n_references']} with references); tokenizer {rep['tokenizer']}")
    if rep.get("clips_with_unscored_windows"):
        x = rep["clips_with_unscored_windows"]
        lines.append(f"NOTE: {len(x)} clips have more windows than the first one scored, e.g. "
                     f"{x[:3]}; caption with --whole-clip S and use --windowing whole to score "
                     f"whole clips")
    if rep["captions_without_references"]:
        x = rep["captions_without_references"]
        lines.append(f"WARNING: {len(x)} captioned clips have no references (not scored), e.g. {x[:3]}")
    if rep["references_without_captions"]:
        x = rep["references_without_captions"]
        lines.append(f"WARNING: {len(x)} referenced clips have no caption (not scored), e.g. {x[:3]}")
    if rep["not_computed"]:
        lines.append(NOT_DEFAULT_NOTE if all(v == NOT_DEFAULT_NOTE for v in rep["not_computed"].values())
                     else "; ".join(f"{k}: {v}" for k, v in rep["not_computed"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse(EvaluateConfig, argv, "overheard evaluate", __doc__.splitlines()[0],
              epilog="\n".join(__doc__.splitlines()[5:]))
    try:
        rep = evaluate(a.captions, a.references, a.metrics, a.tokenizer, a.corenlp_dir,
                       strict=a.strict, windowing=a.windowing)
    except (MetricUnavailable, ValueError, FileNotFoundError) as e:
        print(f"overheard evaluate: error: {e}", file=sys.stderr)
        return 2
    out = a.out
    if not out:
        fs, path = storage.get_fs(a.captions)
        out = (a.captions.rsplit(".", 1)[0] + ".evaluation.json" if fs.isfile(path)
               else storage.join(a.captions, "evaluation.json"))
    storage.write_bytes_atomic(out, json.dumps(rep, indent=1).encode())
    print(format_report(rep))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
