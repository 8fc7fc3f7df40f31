"""What the training-loop tests share: the flags of their runs' checkpoints and validations
(`RUN`) and a run's TensorBoard events with its scalars by tag (`tb_scalars`)."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RUN = [
    "--config.train.checkpoint_every=5",
    "--config.train.keep_checkpoints=10",
    "--config.train.eval_every=10",
]


def tb_scalars(workdir):
    events = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
