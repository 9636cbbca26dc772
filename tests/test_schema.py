"""The window-row contract (overheard.schema, issue 14): rows are built, extended by a stage and
marked failed through its helpers, and a window's real length travels with it (issue 19)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from overheard.schema import (STAGE_FIELDS, WINDOW_FIELDS, Failures, add_columns, caption_rows,
                              caption_schema, failure_row, window_row, window_samples,
                              window_table)


def _rows():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    return [window_row("a.wav", "v1", 0, 0.0, 10.0, np.ones(10, np.float32), "repeatpad"),
            window_row("a.wav", "v1", 1, 10.0, 10.7, x, "zeros", n_windows=2),
            failure_row("b.wav", "v2", "decode", "corrupt", "x" * 3000, windows_kept=0)]


def test_window_table_has_the_contract_types_and_the_real_length():
    t = window_table(_rows())
    for name, typ in WINDOW_FIELDS.items():
        assert t.schema.field(name).type == typ, name
    assert t.schema.field("samples").type == STAGE_FIELDS["samples"]
    assert "frame" not in t.column_names  # audio mode: no frame column, has_frame all False
    assert t.column("has_frame").to_pylist() == [False] * 3
    assert t.column("valid_samples").to_pylist() == [10, 7, 0]
    assert t.column("pad_mode").to_pylist() == ["repeatpad", "zeros", "repeatpad"]
    assert t.column("n_windows").to_pylist() == [-1, 2, -1]
    assert t.column("window_index").to_pylist() == [0, 1, -1]
    assert len(t.column("error_message")[2].as_py()) == 2000  # capped, as every failure message
    got = window_samples(t.column("samples"), [1, 0, 2])
    np.testing.assert_array_equal(got[0], np.linspace(-1, 1, 7, dtype=np.float32))
    assert got[1].shape == (10,) and got[2].shape == (0,)


def test_has_frame_follows_the_frame_bytes():
    rows = _rows()[:2]
    rows[0]["frame"], rows[1]["frame"] = b"\x01" * 12, b""
    t = window_table(rows)
    assert t.column("has_frame").to_pylist() == [True, False]
    assert t.schema.field("frame").type == pa.large_binary()


def test_add_columns_replaces_in_place_appends_and_drops():
    t = window_table(_rows())
    fail = Failures(t)
    assert fail.ok == [0, 1]
    fail.mark(1, "model_error", "embed", "encoder failed")
    fail.mark(1, "other", "caption", "second failure is not kept")
    fail.mark(2, "model_error", "embed", "a failure row keeps its own error")
    emb = np.eye(3, 4, dtype=np.float32)
    out = add_columns(t, drop=["samples"], **fail.columns(), audio_embedding=emb,
                      clap_id=["c1"] * 3, level_dbfs=np.array([-20.0, np.nan, np.nan]))
    assert "samples" not in out.column_names
    # replaced columns keep their place; new ones come after
    assert out.column_names[:len(WINDOW_FIELDS)] == list(WINDOW_FIELDS)
    assert out.column("error_type").to_pylist() == ["", "model_error", "corrupt"]
    assert out.column("stage").to_pylist() == ["", "embed", "decode"]
    assert out.schema.field("audio_embedding").type == pa.list_(pa.float32(), 4)
    assert out.column("level_dbfs").to_pylist() == [-20.0, None, None]  # NaN -> null
    assert out.schema.field("clap_id").type == pa.string()
    with pytest.raises(KeyError):
        add_columns(t, not_in_the_contract=[1, 2, 3])


def test_caption_rows_cast_to_the_caption_table_with_the_ids_apart():
    t = add_columns(window_table(_rows()[:2]), drop=["samples"],
                    audio_embedding=np.ones((2, 4), np.float32), clap_id=["c1", "c1"],
                    caption=["a", "b"], decoding=["plain/beam3"] * 2, decoder_id=["d1", "d1"],
                    model_id=["c1+d1"] * 2)
    schema = caption_schema(4)
    out = caption_rows(t, schema, "run7")
    assert out.schema == schema
    assert out.column("run_id").to_pylist() == ["run7", "run7"]
    assert out.column("clap_id").to_pylist() == ["c1", "c1"]
    assert out.column("decoder_id").to_pylist() == ["d1", "d1"]
    assert out.column("has_frame").to_pylist() == [False, False]
    assert out.column("audibility").null_count == 2  # a score no stage computed
