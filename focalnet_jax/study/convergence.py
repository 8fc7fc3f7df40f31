"""Whether a study's models were trained to a plateau.

Each training cell logs its validation loss (`val/loss`: the arm's own loss on the validation
fold) every `train.eval_every` steps and at its last step. A cell's `val_loss_drop_last_quarter`
is the relative fall of that loss over the last quarter of its steps, (L(q) - L(end)) / L(q), with
L(q) the last evaluation at or before 3/4 of the steps. A cell is at a plateau when the drop is at
most `PLATEAU_DROP`: training on to the end of its schedule lowered its loss by little. A rising
loss (a negative drop: overfitting) counts as a plateau too, since more steps would not help.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from focalnet_jax.training.tb_logging import read_scalars

PLATEAU_DROP = 0.05
VAL_LOSS = "val/loss"


@dataclasses.dataclass(frozen=True)
class LossCurve:
    """A cell's validation loss `losses[N]` at training steps `steps[N]` (ascending)."""

    steps: np.ndarray
    losses: np.ndarray

    @property
    def final(self) -> float:
        """The loss at the last evaluation (NaN without evaluations)."""
        return float(self.losses[-1]) if self.losses.size else math.nan

    @property
    def drop_last_quarter(self) -> float:
        """(L(q) - L(end)) / L(q), q the last evaluation at or before 3/4 of the last step; NaN
        when there is no such evaluation or L(q) is not positive."""
        if self.steps.size < 2:
            return math.nan
        before = np.flatnonzero(self.steps <= 0.75 * self.steps[-1])
        if not before.size or self.losses[before[-1]] <= 0:
            return math.nan
        reference = float(self.losses[before[-1]])
        return (reference - self.final) / reference


def val_loss_curve(run_dir: str | Path) -> LossCurve:
    """The validation loss curve of the training run in `run_dir` (from its `tb/` events)."""
    steps, losses = read_scalars(Path(run_dir) / "tb", VAL_LOSS)
    return LossCurve(steps, losses)


def at_plateau(drop: float) -> bool:
    """Whether a drop over the last quarter (from `LossCurve.drop_last_quarter`) is a plateau."""
    return not math.isnan(drop) and drop <= PLATEAU_DROP
