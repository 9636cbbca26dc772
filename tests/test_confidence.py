"""The confidence column (overheard.confidence) and ``--min-confidence``, with the shipped model.

* AudioStats: the calibration maps the held-out median distance to 0.95 and the 95th percentile
  to 0.5, survives a save/load, and AUROC equals the pairwise definition.
* The caption actor writes ``confidence`` on every window (null on failure rows); in-world scenes
  score high and noise low with the shipped sound-world model; ``min_confidence`` withholds
  the caption of low windows (row kept, caption null, ``decoding`` says why); a model without
  statistics falls back to the caption-memory cosine, or null without a memory.
* The caption job: nothing lost, schema version 2, and the summary's note about the bundled model.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from overheard import confidence as conf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "overheard", "assets", "soundworld-model")


def test_audio_stats_calibration_roundtrip_and_auroc(tmp_path):
    rng = np.random.default_rng(0)
    scale = np.linspace(0.2, 1.0, 16)
    train = rng.standard_normal((2000, 16)) * scale + 3.0
    held = rng.standard_normal((500, 16)) * scale + 3.0
    st = conf.AudioStats.fit(train, held)
    c = st.confidence(held)
    assert c.dtype == np.float32 and np.all((c >= 0) & (c <= 1))
    assert np.median(c) == pytest.approx(0.95, abs=0.01)
    assert np.mean(c < 0.5) == pytest.approx(0.05, abs=0.01)
    far = rng.standard_normal((50, 16)) + 3.0 * np.sign(rng.standard_normal(16))  # another direction
    assert np.all(st.confidence(far) < 0.05)
    st.save(str(tmp_path))
    back = conf.AudioStats.load(str(tmp_path))
    np.testing.assert_array_equal(back.confidence(held), c)
    assert (back.d50, back.d95, back.n_train, back.n_calibration) == (st.d50, st.d95, 2000, 500)
    assert conf.AudioStats.load(str(tmp_path / "nothing")) is None
    a, b = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 60).round(1)  # rounded: ties count half
    pairwise = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert conf.auroc(a, b) == pytest.approx(pairwise, abs=1e-12)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """2 in-world scenes (fresh split) + white noise, brown noise and silence, as files."""
    import soundfile as sf

    from overheard import outofworld as oow
    from overheard import soundworld as sw

    d = tmp_path_factory.mktemp("conf-clips")
    sw.write_dataset(str(d), 2, seed=0, split="conf")
    for kind in ("white", "brown", "silence"):
        sf.write(str(d / "conf" / f"zz_{kind}.flac"), oow.make_clip(kind, 1), oow.SR, subtype="PCM_16")
    return d / "conf"


def _batch(paths):
    from actors.windows import decode_sources, failure_row

    src = pa.table({"source_uri": [str(p) for p in paths], "source_version": [""] * len(paths)})
    batch = pa.concat_tables(list(decode_sources(src)))
    bad = failure_row("x.wav", "", "decode", "corrupt", "bad bytes")
    return pa.concat_tables([batch, pa.Table.from_pylist([bad], schema=batch.schema)])


def test_actor_confidence_and_min_confidence(clips, tiny_model):
    from actors.captioner import Captioner
    from actors.clap_captioner import ClapCaptioner
    from actors.clap_embedder import ClapEmbedder
    from jobs.caption_config import DecodingConfig

    paths = sorted(clips.glob("*.flac"))  # conf_00000, conf_00001, zz_brown, zz_silence, zz_white
    batch = _batch(paths)
    clap = dict(clap_path=os.path.join(MODEL, "clap"))
    dec = os.path.join(MODEL, "decoder")
    plain = ClapCaptioner(clap, dict(decoder_path=dec, decoding=DecodingConfig()))(batch)
    c = plain.column("confidence").to_pylist()
    assert plain.schema.field("confidence").type == pa.float32()
    assert c[5] is None and all(0.0 <= x <= 1.0 for x in c[:5])
    # measured (direct, float32 audio): in-world 0.86 / 0.99, white noise 0.22, brown noise 0.01;
    # silence (-80 dBFS) 0.97 from the distance alone, ~3e-4 after the loudness gate
    assert min(c[:2]) > 0.5 and max(c[2:5]) < 0.5, c
    assert plain.column("level_dbfs").to_pylist()[3] < -70
    assert all(plain.column("caption").to_pylist()[:5])

    held = ClapCaptioner(clap, dict(decoder_path=dec,
                                    decoding=DecodingConfig(min_confidence=0.5)))(batch)
    assert held.num_rows == 6  # nothing lost
    assert held.column("confidence").to_pylist() == c  # same signal, independent of the cut
    caps, decs = held.column("caption").to_pylist(), held.column("decoding").to_pylist()
    assert caps[:2] == plain.column("caption").to_pylist()[:2] and caps[2:5] == [None] * 3
    for i in (2, 3, 4):
        assert decs[i] == f"withheld: confidence {c[i]:.3f} < 0.5 (plain/beam3)"
    assert decs[0] == "plain/beam3" and caps[5] == ""  # failure rows unchanged

    # fallback without statistics: the tiny model has no caption memory either -> null
    tiny = Captioner(os.path.join(tiny_model, "decoder"), DecodingConfig())
    emb = ClapEmbedder(clap_path=os.path.join(tiny_model, "clap"))(batch)
    assert tiny.stats is None and tiny.fallback_memory is None
    assert tiny(emb).column("confidence").null_count == 6


def test_memory_fallback(tmp_path):
    """A decoder dir with a caption memory but no audio_stats: the nearest-memory cosine."""
    import shutil

    from actors.captioner import Captioner
    from jobs.caption_config import DecodingConfig

    dec = tmp_path / "decoder"
    shutil.copytree(os.path.join(MODEL, "decoder"), dec)
    os.remove(dec / conf.STATS_FILE)
    cap = Captioner(str(dec), DecodingConfig())
    assert cap.stats is None and cap.fallback_memory is not None
    emb = np.random.default_rng(0).standard_normal((3, cap.fallback_memory.shape[1])).astype(np.float32)
    want = conf.memory_confidence(emb, cap.fallback_memory)
    np.testing.assert_array_equal(cap.confidence(emb), want)
    assert np.all((want >= 0) & (want <= 1))


def test_job_keeps_withheld_rows_and_summary_names_the_bundled_model(ray_local, clips, tmp_path):
    from jobs.caption import CaptionConfig, run, summary_text
    from overheard.schema import SCHEMA_VERSION

    assert SCHEMA_VERSION == "2"
    m = run(CaptionConfig(input=str(clips), output=str(tmp_path / "out"), min_confidence=0.5,
                          progress=False, show=0))
    assert m["status"] == "completed" and m["windows"] == 5
    assert m["windows_scored"] == 5 and m["windows_low_confidence"] == 3 and m["bundled_model"]
    parts = sorted((tmp_path / "out" / "captions").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("source_uri")
    assert t.schema.metadata[b"overheard_schema_version"] == b"2"
    assert t.schema.field("caption").nullable
    assert t.column("caption").null_count == 3 and t.column("confidence").null_count == 0
    withheld = [u.rsplit("/", 1)[-1] for u, c in zip(t.column("source_uri").to_pylist(),
                                                      t.column("caption").to_pylist()) if c is None]
    assert withheld == ["zz_brown.flac", "zz_silence.flac", "zz_white.flac"]
    text = summary_text(m)  # 3 of 5 low: "most" -> the note
    assert "confidence: 3 of 5 windows below 0.5" in text
    assert "only on a generated world of 11 sound sources" in text and "--model" in text
    assert "bundled model" not in summary_text(dict(m, windows_low_confidence=2))  # not most
    assert "bundled model" not in summary_text(dict(m, bundled_model=False))  # user's own model


def test_clap_training_can_leave_sources_out(tmp_path):
    """training.clap_contrastive --exclude-sources (the held-out-sources split of
    bench/confidence_heldout.py): every scene containing an excluded source is dropped."""
    import json

    from training.soundworld_data import without_sources as _without_sources

    feats = np.arange(4 * 3, dtype=np.float16).reshape(4, 3)
    rows = [{"sources": ["dog"]}, {"sources": ["rain", "birds"]}, {"sources": ["siren", "rain"]},
            {"sources": ["knock"]}]
    fp, cp = tmp_path / "features.npy", tmp_path / "captions.json"
    np.save(fp, feats)
    cp.write_text(json.dumps(rows))
    f2, c2 = _without_sources(str(fp), str(cp), "dog, siren")
    np.testing.assert_array_equal(np.load(f2), feats[[1, 3]])
    assert json.loads(open(c2).read()) == [rows[1], rows[3]]
    assert _without_sources(str(fp), str(cp), "siren,dog") == (f2, c2)  # same split, reused
