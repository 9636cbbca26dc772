"""The model actors as plain classes (no Ray): the windows they read straight from Arrow buffers
are the windows the decode stage wrote, however Ray Data chunks or slices the batch."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actors.clap_embedder import ClapEmbedder  # noqa: E402
from actors.windows import decode_sources  # noqa: E402
from overheard.clap import ClapEncoder  # noqa: E402
from overheard.schema import window_samples  # noqa: E402
from tests import media_factory as mf  # noqa: E402


def test_window_samples_reads_chunked_and_sliced_columns():
    rng = np.random.default_rng(0)
    # windows of different real lengths: a column carries no padding (issue 19)
    w = [rng.standard_normal(n).astype(np.float32) for n in (1000, 1000, 7, 1000, 250, 1, 1000)]
    arr = pa.array([x.tobytes() for x in w], pa.large_binary())
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 1), arr.slice(4)])
    small = pa.array([x.tobytes() for x in w], pa.binary())  # Ray Data's numpy -> Arrow bytes
    for col in (arr, chunked, pa.chunked_array([arr]), small, small.slice(0)):
        got = window_samples(col, [6, 0, 2, 4, 5])
        assert all(g.dtype == np.float32 for g in got)
        for g, k in zip(got, [6, 0, 2, 4, 5]):
            np.testing.assert_array_equal(g, w[k])
    # a slice of a slice: Arrow offsets no longer start at 0
    for col in (arr.slice(2, 4).slice(1, 2), small.slice(2, 4).slice(1, 2)):
        a, b = window_samples(col, [1, 0])
        np.testing.assert_array_equal(a, w[4])
        np.testing.assert_array_equal(b, w[3])
    assert window_samples(arr, []) == []


def test_window_samples_refuses_bytes_that_are_not_float32():
    arr = pa.array([np.zeros(10, np.float32).tobytes(), b"abc"], pa.large_binary())
    assert window_samples(arr, [0])[0].shape == (10,)
    with pytest.raises(ValueError, match="window 1: 3 bytes"):
        window_samples(arr, [1])


def test_clap_embedder_on_decoded_windows_equals_the_encoder(tiny_model, tmp_path):
    """decode_sources -> ClapEmbedder (a plain class): embeddings equal ClapEncoder.embed_audio
    on the same windows, in a batch whose samples column Ray Data could hand over in chunks."""
    if not mf.have_tools():
        raise RuntimeError("ffmpeg and sox are required")
    a = mf.make_tone(tmp_path / "a.wav", seconds=25.0, freq=330.0)  # 3 windows, last 5 s
    b = mf.make_tone(tmp_path / "b.flac", seconds=4.0, freq=880.0)  # 1 short window
    src = pa.table({"source_uri": [str(a), str(b)], "source_version": ["", ""]})
    tables = [t for i in range(2) for t in decode_sources(src.slice(i, 1))]
    batch = pa.concat_tables(tables)  # chunked: one chunk per yielded table
    assert batch.column("samples").num_chunks == 2 and batch.num_rows == 4
    clap = os.path.join(tiny_model, "clap")
    out = ClapEmbedder(clap)(batch)
    enc = ClapEncoder(clap)
    # each window carries its real samples and their count (the 25-s source's last window:
    # 5 s = 240000 samples; the 4-s source: 192000), no padding
    assert batch.column("valid_samples").to_pylist() == [480000, 480000, 240000, 192000]
    assert [len(b) for b in batch.column("samples").to_pylist()] == [
        4 * v for v in batch.column("valid_samples").to_pylist()]
    ref = []
    for t in tables:
        for row in t.to_pylist():
            x = np.frombuffer(row["samples"], np.float32)
            # repeatpad to the model's 10 s, written out here rather than by the code under test
            y = np.zeros(enc.window_samples, np.float32)
            reps = y.size // x.size
            y[: reps * x.size] = np.tile(x, reps)
            ref.append(enc.embed_audio(y[None])[0])
    got = np.asarray(out.column("audio_embedding").to_pylist(), np.float32)
    assert out.column("error_type").to_pylist() == [""] * 4
    assert "samples" not in out.column_names
    np.testing.assert_allclose(got, np.stack(ref), atol=1e-5)
    assert len({tuple(np.round(g, 4)) for g in got}) == 4  # four different windows


def test_fused_actor_equals_the_two_stages(tiny_model, tmp_path):
    """ClapCaptioner (CLAP in chunks of encoder_batch, then the decoder on the whole batch)
    returns exactly what ClapEmbedder followed by Captioner return; a failure row passes
    through both."""
    from actors.captioner import Captioner
    from actors.clap_captioner import ClapCaptioner
    from actors.windows import failure_row
    from jobs.caption_config import DecodingConfig, ScoringConfig

    a = mf.make_tone(tmp_path / "a.wav", seconds=35.0, freq=500.0)  # 4 windows
    src = pa.table({"source_uri": [str(a)], "source_version": [""]})
    batch = pa.concat_tables(list(decode_sources(src)))
    bad = failure_row("x.wav", "", "decode", "corrupt", "bad bytes")
    batch = pa.concat_tables([batch, pa.Table.from_pylist([bad], schema=batch.schema)])
    clap = dict(clap_path=os.path.join(tiny_model, "clap"))
    # score_captions: the caption scorer embeds text with the same CLAP, loaded once when fused
    cap = dict(decoder_path=os.path.join(tiny_model, "decoder"),
               decoding=DecodingConfig(search="beam", num_beams=3), clap_path=clap["clap_path"],
               scoring=ScoringConfig(score_captions=True, audibility_model="none"))
    actor = ClapCaptioner(clap, cap, encoder_batch=3)
    assert actor.captioner.scorers[0] is actor.embedder.encoder
    fused = actor(batch)
    two = Captioner(**cap)(ClapEmbedder(**clap)(batch))
    assert fused.num_rows == 5 and fused.column_names == two.column_names
    for name in ("caption", "decoding", "model_id", "error_type", "window_index"):
        assert fused.column(name).to_pylist() == two.column(name).to_pylist(), name
    np.testing.assert_allclose(np.asarray(fused.column("clap_similarity").to_pylist()[:4]),
                               np.asarray(two.column("clap_similarity").to_pylist()[:4]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(fused.column("audio_embedding").to_pylist()),
                               np.asarray(two.column("audio_embedding").to_pylist()), atol=1e-6)
    assert fused.column("error_type").to_pylist()[-1] == "corrupt"
    # the two ids travel as their own columns; model_id is only their join, for the table
    clap_id, dec_id = fused.column("clap_id").to_pylist(), fused.column("decoder_id").to_pylist()
    assert clap_id[0] == actor.embedder.encoder.model_id and dec_id[0] == actor.captioner.model_id
    assert fused.column("model_id").to_pylist() == [f"{c}+{d}" for c, d in zip(clap_id, dec_id)]
    assert all(fused.column("caption").to_pylist()[:4]) and fused.column("caption")[4].as_py() == ""


def test_short_sources_share_a_table_and_long_ones_stream(tmp_path):
    """decode_sources: whole short sources of one input batch go out together (fewer blocks for
    Ray Data to move), a source is cut only when it alone fills WINDOWS_PER_YIELD windows; every
    row still carries its real length (window 1-s: 48000 samples)."""
    from actors.windows import WINDOWS_PER_YIELD
    paths = [mf.make_tone(tmp_path / f"s{i}.wav", seconds=2.5, sr=8000) for i in range(3)]
    paths.append(mf.make_tone(tmp_path / "long.wav", seconds=WINDOWS_PER_YIELD + 2.5, sr=8000))
    src = pa.table({"source_uri": [str(p) for p in paths], "source_version": [""] * 4})
    tables = list(decode_sources(src, window_s=1.0))
    # 3 short sources x 3 windows = 9 >= 8: one table of them, then the long one: 8 + 3 windows
    assert [t.num_rows for t in tables] == [9, WINDOWS_PER_YIELD, 3]
    assert set(tables[0].column("source_uri").to_pylist()) == {str(p) for p in paths[:3]}
    assert tables[1].column("window_index").to_pylist() == list(range(WINDOWS_PER_YIELD))
    valid = pa.concat_tables(tables).column("valid_samples").to_pylist()
    assert valid == [48000, 48000, 24000] * 3 + [48000] * (WINDOWS_PER_YIELD + 2) + [24000]
