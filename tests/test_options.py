"""Every ``overheard`` command checks its options before any work (issue 15 item 2) and documents
every option (issue 14 item 3). Pure argparse: no Ray, no media, no models.

Each command's ``main(argv)`` runs with one bad value (NaN, a number below its bound, an unknown
enum); it must exit with status 2 and print exactly one line on stderr naming the option, before
touching the inputs (the positional paths below do not exist, so work started would fail
differently). Measured: the whole file in 4.3 s wall (pytest start-up included), 2 shared cores.
"""

from __future__ import annotations

import importlib
import re

import pytest

from jobs.cli import COMMANDS


def _main(command: str):
    module, _, func = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), func or "main")


# (command, argv, the option the error line must name). Positionals are paths that do not exist.
BAD = [
    ("caption", ["in/", "out/", "--sample-temperature", "nan"], "--sample-temperature"),
    ("caption", ["in/", "out/", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("caption", ["in/", "out/", "--mode", "telepathy"], "--mode"),
    ("show", ["out/", "--limit", "-5"], "--limit"),
    ("timeline", ["out/", "dest/", "--sim", "nan"], "--sim"),
    ("timeline", ["out/", "dest/", "--sim", "1.5"], "--sim"),
    ("timeline", ["out/", "dest/", "--format", "docx"], "--format"),
    ("index", ["out/", "idx/", "--batch-size", "0"], "--batch-size"),
    ("search", ["idx/", "rain", "-k", "-3"], "--k"),
    ("search", ["idx/", "rain", "--pool", "0"], "--pool"),
    ("search", ["idx/", "rain", "--mode", "psychic"], "--mode"),
    ("serve", ["out/", "--max-span-s", "nan"], "--max-span-s"),
    ("serve", ["out/", "--port", "70000"], "--port"),
    ("export-opensearch", ["out/", "b.ndjson", "--max-docs-per-file", "-1"], "--max-docs-per-file"),
    ("export-opensearch", ["out/", "b.ndjson", "--flavor", "solr"], "--flavor"),
    ("embed-captions", ["c.csv", "emb/", "--actor-cpus", "inf"], "--actor-cpus"),
    ("embed-captions", ["c.csv", "emb/", "--actors", "0"], "--actors"),
    ("embed-captions", ["c.csv", "emb/", "--dtype", "int4"], "--dtype"),
    ("train-decoder", ["dec/", "--dropout", "nan"], "--dropout"),
    ("train-decoder", ["dec/", "--epochs", "-1"], "--epochs"),
    ("train-decoder", ["dec/", "--mapper", "lstm"], "--mapper"),
    ("estimate-gap", ["--clap", "c/", "--pairs", "p.csv", "--out", "g.json", "--max-windows", "0"],
     "--max-windows"),
    ("estimate-gap", ["--pairs", "p.csv", "--out", "g.json"], "--clap"),
    ("estimate-gap", ["--clap", "c/", "--out", "g.json", "--audio", "a/"], "--pairs"),
    ("build-model", ["m/", "--eval-whole-clip", "nan"], "--eval-whole-clip"),
    ("build-model", ["m/", "--max-pairs", "-1"], "--max-pairs"),
    ("build-model", ["m/", "--eval-tokenizer", "nltk"], "--eval-tokenizer"),
    ("evaluate", ["out/", "refs.csv", "--tokenizer", "nltk"], "--tokenizer"),
    ("evaluate", ["out/", "refs.csv", "--windowing", "last"], "--windowing"),
    ("evaluate", ["out/", "refs.csv", "--metrics", "bleu,wer"], "--metrics"),
    ("train-audibility", ["--heldout-fraction", "nan"], "--heldout-fraction"),
    ("train-audibility", ["--heldout-fraction", "0"], "--heldout-fraction"),
    ("train-audibility", ["--epochs", "0"], "--epochs"),
    ("dali-tiny", ["d/", "--seed", "-1"], "--seed"),
    ("dali-prefix", ["p/", "--lr", "nan"], "--lr"),
    ("dali-prefix", ["p/", "--prefix-tokens", "0"], "--prefix-tokens"),
    ("dali-align", ["a/", "--window", "11"], "--window"),
    ("dali-align", ["a/", "--loss", "kl"], "--loss"),
    ("dali-distill", ["d/", "--window=-inf"], "--window"),
    ("dali-distill", ["d/", "--dtype", "float8"], "--dtype"),
]


def test_every_command_has_a_bad_value_case():
    # `status` has no numeric or enum option (output, --run-id, --all, --json): nothing to bound
    assert {c for c, _, _ in BAD} | {"status"} == set(COMMANDS)


@pytest.mark.parametrize("command,argv,option", BAD, ids=[f"{c}:{a[-1]}" for c, a, _ in BAD])
def test_bad_option_exits_2_with_one_line(command, argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative positionals: nothing outside tmp_path could be touched
    with pytest.raises(SystemExit) as e:
        _main(command)(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"overheard {command}: error: "), lines[0]
    assert option in lines[0], lines[0]
    assert out.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def _help_entries(text: str) -> dict[str, str]:
    """argparse --help -> {option or positional: its description (continuation lines joined)}."""
    entries: dict[str, str] = {}
    key = None
    section = described = False
    for line in text.splitlines():
        # "options:", "positional arguments:", or a group's title ("decoding (...):")
        if re.match(r"^\S.*:$", line):
            section, key = True, None
            # an argument group's description: the lines up to the first blank one
            described = line not in ("options:", "positional arguments:", "optional arguments:")
            continue
        if described:
            described = bool(line.strip()) and not line.startswith("  -")
            if described or not line.strip():
                continue
        if not section or not line.strip():
            key = None if not line.strip() else key
            continue
        m = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            key = m.group(1)
            entries[key] = (m.group(2) or "").strip()
        elif key is not None and line.startswith("   "):
            entries[key] = (entries[key] + " " + line.strip()).strip()
        else:
            section = False
    return entries


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        _main(command)(["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert len(entries) >= 2, entries  # -h plus at least one of the command's own
    missing = [k for k, v in entries.items() if not v or v.startswith("(default:")]
    assert missing == [], f"{command}: no help for {missing}"
