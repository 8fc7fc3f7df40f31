"""The study report's plateau check (focalnet_jax/study/convergence.py): validation loss curves read
back from TensorBoard events (a resumed run's re-written steps keep their last value), the drop
over the last quarter worked out by hand, the plateau rule at its limit, and the report's table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from focalnet_jax.study import convergence, figures
from focalnet_jax.study.report import _convergence
from focalnet_jax.training.tb_logging import SummaryWriter, read_scalars


def _write(logdir, points):
    writer = SummaryWriter(logdir, enabled=True)
    for step, value in points:
        writer.scalars(step, {"val/loss": value, "train/loss": 10 * value})
    writer.close()


def test_read_scalars_keeps_the_last_value_of_a_rewritten_step(tmp_path):
    # A run logged steps 100..300, then resumed from its step-200 checkpoint in a new process.
    _write(tmp_path, [(100, 0.5), (200, 0.4), (300, 0.35)])
    _write(tmp_path, [(300, 0.3), (400, 0.25)])
    steps, values = read_scalars(tmp_path, "val/loss")
    assert steps.tolist() == [100, 200, 300, 400]
    np.testing.assert_allclose(values, [0.5, 0.4, 0.3, 0.25], rtol=1e-6)
    assert read_scalars(tmp_path, "val/absent")[0].size == 0
    assert read_scalars(tmp_path / "no_events", "val/loss")[0].size == 0


def test_read_scalars_follows_the_event_order_of_files_started_in_the_same_second(tmp_path):
    # A run logged steps 1..4, stopped, and resumed from its step-2 checkpoint within the same
    # second on another host: the two file names share their second, and the resumed run's
    # host name sorts first, so name order reads the resumed run before the earlier one.
    first = SummaryWriter(tmp_path, enabled=True)
    first.session_start(1)
    for step in range(1, 5):
        first.scalars(step, {"val/loss": 1.0 / step})
    first.close()
    (earlier,) = tmp_path.iterdir()
    resumed = SummaryWriter(tmp_path, enabled=True)
    resumed.session_start(3)  # drops the steps 3 and 4 the first run logged past its checkpoint
    resumed.scalars(3, {"val/loss": 0.3})
    resumed.close()
    (later,) = set(tmp_path.iterdir()) - {earlier}
    second = earlier.name.split(".")[3]
    earlier.rename(tmp_path / f"events.out.tfevents.{second}.node-b.200.0")
    later.rename(tmp_path / f"events.out.tfevents.{second}.node-a.100.0")
    steps, values = read_scalars(tmp_path, "val/loss")
    assert steps.tolist() == [1, 2, 3]
    np.testing.assert_allclose(values, [1.0, 0.5, 0.3], rtol=1e-6)


def test_val_loss_curve_of_a_run_folder(tmp_path):
    _write(tmp_path / "tb", [(300 * k, 1.0 / k) for k in range(1, 9)])
    curve = convergence.val_loss_curve(tmp_path)
    assert curve.steps.tolist() == [300 * k for k in range(1, 9)]
    assert curve.final == pytest.approx(1 / 8)


@pytest.mark.parametrize(
    ("steps", "losses", "drop"),
    [
        # Reference: the evaluation at step 1800 (= 3/4 of 2400): (0.2 - 0.19) / 0.2.
        ([300, 600, 900, 1200, 1500, 1800, 2100, 2400], [9, 8, 7, 6, 0.5, 0.2, 0.195, 0.19], 0.05),
        # No evaluation at 3/4 exactly: the last one before it (step 1000 of 2000).
        ([500, 1000, 2000], [1.0, 0.8, 0.6], 0.25),
        # A rise: a negative drop.
        ([400, 800], [0.1, 0.12], -0.2),
    ],
)
def test_drop_over_the_last_quarter_by_hand(steps, losses, drop):
    curve = convergence.LossCurve(np.array(steps), np.array(losses, float))
    assert curve.drop_last_quarter == pytest.approx(drop)


def test_drop_is_nan_without_a_reference():
    one = convergence.LossCurve(np.array([800]), np.array([0.1]))
    late = convergence.LossCurve(np.array([700, 800]), np.array([0.2, 0.1]))  # none <= 600
    empty = convergence.LossCurve(np.zeros(0), np.zeros(0))
    assert math.isnan(one.drop_last_quarter) and math.isnan(late.drop_last_quarter)
    assert math.isnan(empty.final) and math.isnan(empty.drop_last_quarter)


def test_plateau_rule_at_its_limit():
    assert convergence.at_plateau(convergence.PLATEAU_DROP)
    assert not convergence.at_plateau(convergence.PLATEAU_DROP + 1e-6)
    assert convergence.at_plateau(-0.3)  # a rising loss
    assert not convergence.at_plateau(math.nan)


def test_convergence_table_counts_runs_at_a_plateau():
    rows = [
        {"arm": "ce", "kind": "arm", "val_loss": 0.10, "val_loss_drop_last_quarter": 0.01},
        {"arm": "ce", "kind": "arm", "val_loss": 0.12, "val_loss_drop_last_quarter": 0.09},
        {"arm": "fl", "kind": "arm", "val_loss": 0.03, "val_loss_drop_last_quarter": -0.02},
        {"arm": "both", "kind": "ensemble", "val_loss": math.nan},
    ]
    table = [line for line in _convergence(rows, ["ce", "fl"]) if line.startswith("| ")]
    assert table[1:] == [
        "| ce | 0.1100 +- 0.0141 | +5.0%; +9.0% | 1 / 2 |",
        "| fl | 0.0300 +- n/a | -2.0%; -2.0% | 1 / 1 |",
    ]


def test_convergence_table_says_n_a_for_runs_without_a_drop():
    """A run without a reference evaluation (one evaluation, or none before 3/4 of the steps) has
    no drop: ce's two such runs read "0 / 2" (no run at a plateau) beside a drop of n/a, and fl's
    third run was counted as not at a plateau; fl's loss mean is over 2 of its 3 runs."""
    nan = math.nan
    rows = [
        {"arm": "ce", "kind": "arm", "val_loss": 0.10, "val_loss_drop_last_quarter": nan},
        {"arm": "ce", "kind": "arm", "val_loss": 0.12, "val_loss_drop_last_quarter": nan},
        {"arm": "fl", "kind": "arm", "val_loss": 0.03, "val_loss_drop_last_quarter": 0.01},
        {"arm": "fl", "kind": "arm", "val_loss": 0.05, "val_loss_drop_last_quarter": 0.08},
        {"arm": "fl", "kind": "arm", "val_loss": nan, "val_loss_drop_last_quarter": nan},
    ]
    table = [line for line in _convergence(rows, ["ce", "fl"]) if line.startswith("| ")]
    assert table[1:] == [
        "| ce | 0.1100 +- 0.0141 | n/a | 0 / 0 (2 n/a) |",
        "| fl | 0.0400 +- 0.0141 (2/3) | +4.5%; +8.0% | 1 / 2 (1 n/a) |",
    ]


def test_val_loss_figure(tmp_path):
    curve = convergence.LossCurve(np.array([100, 200, 400]), np.array([0.3, 0.2, 0.19]))
    runs = {"ce": [("rep0 fold0", curve), ("rep1 fold0", curve)], "fl": []}
    path = figures.val_loss_curves(tmp_path / "val_loss.png", runs)
    assert path.stat().st_size > 0
