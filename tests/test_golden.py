"""Behaviour unchanged: the caption job still writes the tables stored in tests/data/golden
(written by tests/golden.py before the code was reshaped for issue 14)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.golden import GOLDEN, RUNS, run_all

EXACT = {"source_uri", "window_index", "caption", "decoding", "model_id", "stage", "error_type",
         "message", "retryable", "windows_kept", "source_meta"}


@pytest.fixture(scope="module")
def fresh(ray_local, tmp_path_factory):
    return run_all(str(tmp_path_factory.mktemp("golden")))


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("table", ["captions", "failures"])
def test_same_tables_as_before(fresh, name, table):
    want = pq.read_table(os.path.join(GOLDEN, f"{name}-{table}.parquet"))
    got = fresh[name][table]
    assert got.num_rows == want.num_rows
    assert want.num_rows > 0 or table == "failures"
    # every stored column is still there with the same meaning; new columns may be added
    for col in want.column_names:
        assert col in got.column_names, col
        w, g = want[col].to_pylist(), got[col].to_pylist()
        if col in EXACT:
            assert g == w, col
        else:
            wa = np.array([x if x is not None else np.nan for x in w], dtype=np.float64) \
                if not isinstance(next((x for x in w if x is not None), 0.0), list) \
                else np.array(w, dtype=np.float64)
            ga = np.array([x if x is not None else np.nan for x in g], dtype=np.float64) \
                if not isinstance(next((x for x in g if x is not None), 0.0), list) \
                else np.array(g, dtype=np.float64)
            np.testing.assert_allclose(ga, wa, atol=1e-4, rtol=1e-4, equal_nan=True,
                                       err_msg=col)
