"""Evaluation reports: the radar's per-metric scaling with reference methods, and the CSV round trip."""
from __future__ import annotations

import numpy as np
import pytest

from dmfuse_jax.evaluation import report


def test_reference_methods_join_the_scaling_worked_by_hand():
    # one method alone would score 1 everywhere; with two baselines it is placed between them:
    # EN: mine 7, baselines 6 and 8 -> (7 - 6) / (8 - 6) = 0.5 -> 0.1 + 0.9 * 0.5 = 0.55
    # RMSE (lower is better): mine 30, baselines 20 and 60 -> 1 - (30 - 20) / 40 = 0.75 -> 0.775
    mine = {"mine": {"EN": (7.0, 0.1), "RMSE": (30.0, 1.0)}}
    ref = {"avg": {"EN": (6.0, 0.0), "RMSE": (60.0, 0.0)}, "max": {"EN": (8.0, 0.0), "RMSE": (20.0, 0.0)}}
    alone = report.normalized_scores(mine, ["EN", "RMSE"])
    np.testing.assert_allclose(alone["mine"], [1.0, 1.0])
    got = report.normalized_scores(mine, ["EN", "RMSE"], ref)
    assert list(got) == ["mine", "avg", "max"]
    np.testing.assert_allclose(got["mine"], [0.55, 0.775])
    np.testing.assert_allclose(got["avg"], [0.1, 0.1])
    np.testing.assert_allclose(got["max"], [1.0, 1.0])


def test_csv_round_trip_keeps_metrics_and_scoring(tmp_path):
    rows = [{"method": "a", "image": "01", "EN": 6.5, "SD": 30.25},
            {"method": "a", "image": "02", "EN": 7.0, "SD": 1e-3}]
    path = tmp_path / "s.csv"
    path.write_text(report.csv_text(rows, ["EN", "SD"], {"convention": "vifb", "color": "per-channel"}))
    back, metrics, scoring = report.read_csv(path)
    assert back == rows and metrics == ["EN", "SD"]
    assert scoring == {"convention": "vifb", "color": "per-channel"}
    path.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="method,image"):
        report.read_csv(path)
