"""The one checkpoint I/O path of the model package (overheard/checkpoint.py) and the one table
reader (overheard/corpus.py): weights writer and checked reader, the model-id scheme, a decoder
config that claims an impossible retrieval k, table/record files. Tiny files; 0.6 s measured on
2 busy cores, plus the session's shared tiny_model fixture."""

from __future__ import annotations

import json

import pytest
import torch

from overheard import checkpoint as ck
from overheard.corpus import read_records, read_table


def test_save_weights_is_byte_stable_and_read_back_checked(tmp_path):
    t = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.ones(4)}
    ck.save_weights(t, tmp_path / "one.safetensors", metadata={"format": "pt"})
    ck.save_weights(t, tmp_path / "two.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    got = ck.read_weights(tmp_path / "one.safetensors", {"a": (4,), "b": (2, 3)})
    assert torch.equal(got["b"], t["b"]) and torch.equal(got["a"], t["a"])
    with pytest.raises(ValueError, match=r"shape mismatch for b: file \[2, 3\], config expects \[3, 2\]"):
        ck.read_weights(tmp_path / "one.safetensors", {"a": (4,), "b": (3, 2)})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['c'\]"):
        ck.read_weights(tmp_path / "one.safetensors", {"a": (4,), "b": (2, 3), "c": (1,)})
    with pytest.raises(ValueError, match="one key at most"):
        ck.save_weights(t, tmp_path / "x.safetensors", metadata={"format": "pt", "other": "x"})
    ck.save_weights({"i": torch.zeros(2, dtype=torch.int64)}, tmp_path / "int.safetensors")
    with pytest.raises(ValueError, match="expected floating point"):
        ck.read_weights(tmp_path / "int.safetensors", {"i": (2,)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        ck.read_weights(tmp_path / "junk.safetensors", {"a": (4,)})


def test_model_id_is_name_plus_weight_hash(tmp_path):
    for d in ("x/clap-small", "y/clap-small", "z/other"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "model.safetensors").write_bytes(b"same weights")
    ids = [ck.model_id(str(tmp_path / d), [tmp_path / d / "model.safetensors"], "clap")
           for d in ("x/clap-small", "y/clap-small", "z/other")]
    assert ids[0] == ids[1] and ids[0].startswith("clap-small-") and len(ids[0]) == len("clap-small-") + 12
    assert ids[2].split("-")[-1] == ids[0].split("-")[-1] and ids[2].startswith("other-")
    assert ck.model_id("hf://org/name@abc", [], "clap").startswith("name-")
    assert ck.model_id("/", [], "clap").startswith("clap-")


def test_decoder_with_impossible_retrieval_k_is_refused(tiny_model, tmp_path):
    import shutil

    from overheard.decoder import load_decoder

    d = tmp_path / "dec"
    shutil.copytree(f"{tiny_model}/decoder", d)
    meta = json.loads((d / "config.json").read_text())
    for k in ("3", 10 ** 6, -1):
        meta["extra"]["retrieval"] = {"k": k}
        (d / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="extra.retrieval.k must be an integer"):
            load_decoder(d)


def test_read_table_keeps_text_and_read_records_reads_every_layout(tmp_path):
    (tmp_path / "c.csv").write_text("file_name,caption_1\na.wav,1 2 3\nb.wav,\n")
    t = read_table(str(tmp_path / "c.csv"))
    assert t.column("caption_1").to_pylist() == ["1 2 3", None]   # text stays text, empty is null
    (tmp_path / "c.tsv").write_text("file_name\tcaption\na.wav\ta dog\n")
    assert read_records(str(tmp_path / "c.tsv")) == [{"file_name": "a.wav", "caption": "a dog"}]
    (tmp_path / "r.jsonl").write_text('{"audio": "a.wav", "caption": "x"}\n\n{"audio": "b.wav"}\n')
    assert read_records(str(tmp_path / "r.jsonl")) == [{"audio": "a.wav", "caption": "x"}, {"audio": "b.wav"}]
    (tmp_path / "w.json").write_text(json.dumps({"data": [{"caption": "rain"}]}))
    assert read_records(str(tmp_path / "w.json")) == [{"caption": "rain"}]
    with pytest.raises(ValueError, match="expected a table file"):
        read_table(str(tmp_path / "w.json"))
