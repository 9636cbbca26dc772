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
import typing

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


# ---------------------------------------------------------------- the caption job's option groups

def _caption_help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        _main("caption")(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_caption_help_is_grouped(capsys):
    """--help lists the caption options under their groups (argparse argument groups), and
    the group of each option is the sub-config that holds it."""
    import dataclasses

    from jobs.caption_config import CaptionConfig

    text = _caption_help(capsys)
    assert text.startswith("usage: overheard caption [options] INPUT OUTPUT\n")
    # each heading's block: the flags listed under it
    blocks: dict[str, set[str]] = {}
    head, described = None, False
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            head = line[:-1]
            blocks[head] = set()
            described = head != "options"  # a group's description runs to the first blank line
        elif described:
            described = bool(line.strip())
        elif head and (m := re.match(r"^  (-[^\s,]+|[a-z]\w*)(?:\s|,|$)", line)):
            blocks[head].add(m.group(1))
    titles = [f.metadata["title"] for f in dataclasses.fields(CaptionConfig)]
    hints = typing.get_type_hints(CaptionConfig)
    assert titles == ["inputs", "windows", "decoding (CLAP + decoder models)",
                      "guidance (CLAP + decoder models)", "DALI models", "resources",
                      "output and run"]
    assert list(blocks) == ["options"] + titles
    assert blocks["options"] == {"-h"}  # nothing left ungrouped
    for f in dataclasses.fields(CaptionConfig):
        want = {sub.name if sub.default is dataclasses.MISSING
                else "--" + sub.name.replace("_", "-") for sub in dataclasses.fields(hints[f.name])}
        assert blocks[f.metadata["title"]] == want, f.name
    # the two temperatures are told apart by their group and their help
    assert "--temperature" in blocks["decoding (CLAP + decoder models)"]
    assert "--sample-temperature" in blocks["DALI models"]
    entries = _help_entries(text)
    assert "retrieval" in entries["--strategy STRATEGY"]  # a choice the help once left out
    # all 50 options of the flat help before the grouping (48 flags + INPUT OUTPUT), none lost,
    # + --unknown-size-sources, --unknown-block-bytes, --decode-in-actors (added since)
    assert sum(len(b) for b in blocks.values()) - 1 == 53


def test_caption_config_flat_and_grouped_agree():
    """Flat keywords (tests, benches), dataclasses.replace and flat reads give the same config
    as the groups; the saved JSON is grouped and reads back flat."""
    import dataclasses
    import json

    from jobs.caption import CaptionConfig as Reexported
    from jobs.caption_config import CaptionConfig, DecodingConfig, WindowConfig
    from jobs.config_cli import flat_dict, flatten_saved, to_json

    assert Reexported is CaptionConfig
    flat = CaptionConfig(input="in", output="out", window=5.0, num_beams=4, captioner_actors=2)
    grouped = CaptionConfig("in", "out", windows=WindowConfig(window=5.0),
                            decoding=DecodingConfig(num_beams=4), captioner_actors=2)
    assert flat == grouped
    assert flat.window == flat.windows.window == 5.0 and flat.num_beams == 4
    again = dataclasses.replace(flat, window=3.0, strategy="nearest")
    assert (again.window, again.strategy, again.num_beams, flat.window) == (3.0, "nearest", 4, 5.0)
    saved = json.loads(to_json(again))
    assert saved["windows"]["window"] == 3.0 and saved["decoding"]["strategy"] == "nearest"
    assert flatten_saved(saved) == flat_dict(again)
    with pytest.raises(TypeError, match="windw"):
        CaptionConfig(input="in", output="out", windw=5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        flat.windows.window = 1.0  # groups are shared between configs: never changed in place


def test_settings_differ_reads_grouped_and_older_flat_configs(tmp_path):
    """A rerun compares its settings with the latest earlier run's config.json, whether that was
    saved grouped (now) or flat (before the grouping)."""
    import json
    import os
    import time

    from jobs.caption import CaptionConfig, settings_differ
    from jobs.config_cli import to_json

    out = tmp_path / "out"
    cfg = CaptionConfig(input="in", output=str(out), run_id="now", window=5.0, strategy="nearest")
    old = out / "runs" / "old" / "config.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"input": "in", "window": 10.0, "strategy": "plain", "hop": 0.0}))
    assert settings_differ(cfg) == {"window": [10.0, 5.0], "strategy": ["plain", "nearest"]}
    new = out / "runs" / "new" / "config.json"
    new.parent.mkdir(parents=True)
    new.write_text(to_json(CaptionConfig(input="in", output=str(out), window=5.0, hop=2.0)))
    t = time.time() + 5
    os.utime(new, (t, t))  # the latest earlier run
    assert settings_differ(cfg) == {"hop": [2.0, 0.0], "strategy": ["plain", "nearest"]}


# Options that cannot apply whatever the model: refused while parsing (no model read yet).
NOT_APPLICABLE = [
    (["--temperature", "0.5"], "--temperature"),  # projection only
    (["--strategy", "nearest", "--temperature", "0.5"], "--temperature"),
    (["--search", "greedy", "--num-beams", "5"], "--num-beams"),
    (["--guidance-mode", "topk"], "--guidance-mode"),
    (["--guidance-weights", "1,1,1", "--guidance-candidates", "9"], "--guidance-weights, "
                                                                    "--guidance-candidates"),
    (["--audibility-model", "none"], "--audibility-model"),
    (["--encoder-actors", "2"], "--encoder-actors"),  # the fused pool has no CLAP pool
    (["--whole-clip", "30", "--window", "5"], "--window"),
]


@pytest.mark.parametrize("argv,option", NOT_APPLICABLE, ids=[a[0] for a, _ in NOT_APPLICABLE])
def test_inapplicable_option_is_refused_with_one_line(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        _main("caption")(["in/", "out/"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("overheard caption: error: ") and option in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    [],
    ["--strategy", "projection", "--temperature", "0.5"],
    ["--search", "greedy"],
    ["--guidance", "--guidance-mode", "topk", "--guidance-candidates", "9"],
    ["--score-captions", "--audibility-model", "none"],
    ["--no-fuse-models", "--encoder-actors", "2"],
    ["--whole-clip", "30"],
    ["--whole-clip", "30", "--window", "30"],
    ["--num-beams", "3", "--search", "greedy"],  # the default value: not the user's choice
])
def test_applicable_options_parse(argv):
    from jobs.caption_config import CaptionConfig
    from jobs.config_cli import parse

    cfg = parse(CaptionConfig, ["in/", "out/"] + argv, "overheard caption", "")
    assert cfg.input == "in/"


@pytest.mark.parametrize("model,argv,options", [
    ("dali", ["--strategy", "nearest", "--guidance"], "--strategy, --guidance do not apply"),
    ("dali", ["--clap", "x", "--encoder-batch", "4", "--min-confidence", "0.2"],
     "--clap, --min-confidence, --encoder-batch do not apply"),
    ("dali", ["--no-fuse-models"], "--fuse-models does not apply"),
    ("clap", ["--sample-temperature", "0.2"], "--sample-temperature needs a DALI model"),
    ("clap", ["--max-new-tokens", "8", "--mode", "audio+image"],
     "--mode, --max-new-tokens need a DALI model"),
])
def test_options_of_the_other_model_are_refused(model, argv, options, tiny_model, tiny_dali,
                                                tmp_path, capsys):
    """The model decides which groups apply: a DALI model refuses decoding/guidance options
    (it used to ignore --strategy and --guidance silently), a CLAP + decoder model the DALI
    ones. One line, exit 2, before listing the input or writing the output."""
    path = str(tiny_dali if model == "dali" else tiny_model)
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _main("caption")([str(tmp_path / "in"), str(out), "--model", path] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("overheard caption: error: "), err
    assert options in err[0], err[0]
    assert not out.exists()


def test_one_option_parser_for_every_command():
    """Every command's module reads its options through jobs/config_cli.py (one dataclass ->
    argparse path): none builds its own argparse parser."""
    import inspect

    import pathlib

    modules = {COMMANDS[c][0].partition(":")[0] for c in COMMANDS}
    sources = {name: inspect.getsource(importlib.import_module(name)) for name in modules}
    # and the scripts that rebuild the shipped models
    root = pathlib.Path(__file__).resolve().parent.parent
    sources.update({str(p): p.read_text() for p in (root / "scripts").glob("*.py")})
    for name, src in sorted(sources.items()):
        assert "argparse" not in src and "add_argument" not in src, name
        assert "config_cli" in src, name


def test_strategy_choices_match_the_captioner():
    from actors.captioner import STRATEGIES
    from jobs.caption_config import STRATEGIES as CHOICES

    assert CHOICES == STRATEGIES


def test_a_field_without_help_is_refused():
    """config_cli builds no parser for a config with an undocumented option (the issue counted 7)."""
    from dataclasses import dataclass, field

    from jobs.config_cli import parser_for

    @dataclass
    class Documented:
        n: int = field(default=1, metadata={"help": "how many"})

    @dataclass
    class Undocumented:
        n: int = field(default=1, metadata={"help": "how many"})
        k: int = 2

    assert parser_for(Documented, "x", "").parse_args(["--n", "3"]).n == 3
    with pytest.raises(TypeError, match="Undocumented.k has no help"):
        parser_for(Undocumented, "x", "")
