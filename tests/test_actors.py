"""The model actors as plain classes (no Ray): the windows they read straight from Arrow buffers
are the windows the decode stage wrote, however Ray Data chunks or slices the batch."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from actors.clap_embedder import ClapEmbedder  # noqa: E402
from actors.windows import decode_sources, samples_matrix  # noqa: E402
from overheard.clap import ClapEncoder  # noqa: E402
from tests import media_factory as mf  # noqa: E402


def _windows(rng, k: int, n: int) -> list[np.ndarray]:
    return [rng.standard_normal(n).astype(np.float32) for _ in range(k)]


def test_samples_matrix_reads_chunked_and_sliced_columns():
    rng = np.random.default_rng(0)
    w = _windows(rng, 7, 1000)
    arr = pa.array([x.tobytes() for x in w], pa.large_binary())
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 1), arr.slice(4)])
    small = pa.array([x.tobytes() for x in w], pa.binary())  # Ray Data's numpy -> Arrow bytes
    for col in (arr, chunked, pa.chunked_array([arr]), small, small.slice(0)):
        got = samples_matrix(col, [6, 0, 3, 4], 1000)
        assert got.dtype == np.float32 and got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.stack([w[6], w[0], w[3], w[4]]))
    # a slice of a slice: Arrow offsets no longer start at 0
    sl = arr.slice(2, 4).slice(1, 2)
    np.testing.assert_array_equal(samples_matrix(sl, [1, 0], 1000), np.stack([w[4], w[3]]))
    np.testing.assert_array_equal(samples_matrix(small.slice(2, 4).slice(1, 2), [1, 0], 1000),
                                  np.stack([w[4], w[3]]))
    assert samples_matrix(arr, [], 1000).shape == (0, 1000)


def test_samples_matrix_refuses_a_window_of_the_wrong_length():
    arr = pa.array([np.zeros(1000, np.float32).tobytes(), np.zeros(999, np.float32).tobytes()],
                   pa.large_binary())
    assert samples_matrix(arr, [0], 1000).shape == (1, 1000)
    with pytest.raises(ValueError, match="window 1 holds 999 samples, expected 1000"):
        samples_matrix(arr, [1], 1000)


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
    ref = []
    for t in tables:
        for row in t.to_pylist():
            x = np.frombuffer(row["samples"], np.float32)
            valid = int(round((row["end_s"] - row["start_s"]) * enc.sampling_rate))
            # repeatpad, as the embedder does for a window shorter than the model's 10 s
            y = np.zeros_like(x)
            reps = x.size // valid
            y[: reps * valid] = np.tile(x[:valid], reps)
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
    assert all(fused.column("caption").to_pylist()[:4]) and fused.column("caption")[4].as_py() == ""
