"""Batched, jit-compiled prediction of P(class >= k) maps from a trained run, and the contract
predictions files of a run's validation fold.

One `Predictor` serves every output encoding: `encoding.scores_from_outputs` turns ordinal
(FocalNet), one-hot (Deeplab, U-Net-Mult) and binary (U-Net-Sing) outputs into P(class >= k).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from focalnet_jax import encoding
from focalnet_jax.data.run_store import (
    check_run_store,
    recorded_cases,
    warn_other_case_data,
    warn_other_version,
)
from focalnet_jax.data.store import Store, component_channels, open_store
from focalnet_jax.data.writer_folders import moved_aside_note
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.predictions import write_case
from focalnet_jax.run import DATA_AXIS, RunSpec, clip_inputs
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.run.checkpoint_digests import variables_digest

log = logging.getLogger(__name__)


def inference_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D `data` mesh over `devices` (default: every device of this process,
    `jax.local_devices()`): a batch of slices is split over them."""
    return Mesh(np.array(list(devices or jax.local_devices())), (DATA_AXIS,))


def checked_images(images: np.ndarray, components: Sequence[str]) -> np.ndarray:
    """`images` as float32 `[N, H, W, C]`, C = len(components); else a ValueError."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != len(components):
        raise ValueError(
            f"images: expected [N, H, W, {len(components)}] for components "
            f"{tuple(components)}, got {images.shape}"
        )
    return images


@dataclasses.dataclass
class Predictor:
    """A trained model as `scores = predictor(images)`: images float32 `[N, H, W, C]` (components
    in `spec.components` order, as the store holds them: T2w unclipped) -> float32
    `[N, H, W, 5]`.

    Data parallel over `mesh` (`inference_mesh`): each batch of `batch_size` slices (a multiple
    of the mesh's devices) is split over its devices along the slice axis; the variables are
    replicated on them once, when the predictor is made.
    """

    spec: RunSpec
    variables: dict
    apply: Callable
    batch_size: int = 16
    step: int | None = None  # the checkpoint step, where loaded from a run
    weights: str | None = None  # `variables_digest` of the checkpoint, where loaded from a run
    mesh: Mesh = dataclasses.field(default_factory=inference_mesh)
    checkpoint: Path | None = None  # the checkpoint step folder, where loaded from a run

    @property
    def components(self) -> tuple[str, ...]:
        return self.spec.components

    @classmethod
    def from_workdir(
        cls,
        workdir: str | Path,
        *,
        step: int | None = None,
        batch_size: int = 16,
        devices: Sequence[jax.Device] | None = None,
    ):
        """Loads the run's spec and checkpoint (`workdir.load_for_inference`)."""
        if step is None:
            step = workdir_lib.latest_step(workdir)
        spec, variables = workdir_lib.load_for_inference(workdir, step)
        predictor = cls.from_variables(spec, variables, batch_size=batch_size, devices=devices)
        return dataclasses.replace(
            predictor,
            step=step,
            weights=variables_digest(variables),
            checkpoint=Path(workdir) / workdir_lib.CHECKPOINT_DIR / str(step),
        )

    @classmethod
    def from_variables(
        cls,
        spec: RunSpec,
        variables: dict,
        *,
        batch_size: int = 16,
        devices: Sequence[jax.Device] | None = None,
    ):
        """The model of a run's `spec` with the given params and batch_stats, on `devices`
        (default: every local device). `batch_size` (>= 1; a `ValueError` else: -3 gave
        all-zero scores) is rounded up to a multiple of their number, so every device gets the
        same share of each batch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        mesh = inference_mesh(devices)
        batch_size = -(-batch_size // mesh.size) * mesh.size
        batch, replicated = NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())

        @functools.partial(jax.jit, in_shardings=(replicated, batch), out_shardings=batch)
        def apply(variables, images):
            # Inputs are clipped to [0, 1] as at training; BatchNorm uses running averages.
            logits = spec.model.apply(variables, clip_inputs(images), train=False)
            return encoding.scores_from_outputs(logits, spec.output_encoding, from_logits=True)

        placed = jax.device_put(variables, replicated)
        return cls(spec, placed, apply, batch_size, mesh=mesh)

    def batches(
        self, images: np.ndarray, out: np.ndarray, then: Callable[[], None] | None = None
    ) -> Iterator[Batch]:
        """The `Batch`es that predict `images` `[N, H, W, C]` into `out` `[N, H, W, 5]`, each
        `batch_size` slices (the last zero-padded: one compilation), placed on the mesh as they
        are drawn; `then` goes with the last one."""
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        count = images.shape[0]
        for first in range(0, count, self.batch_size):
            chunk = images[first : first + self.batch_size]
            padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            last = first + self.batch_size >= count
            dispatch = functools.partial(
                self.apply, self.variables, jax.device_put(padded, sharding)
            )
            yield Batch(dispatch, out, first, len(chunk), then if last else None)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = checked_images(images, self.components)
        out = np.zeros((*images.shape[:3], 5), np.float32)
        run_overlapped(self.batches(images, out))
        return out

    def non_finite(self, images: np.ndarray) -> list[str]:
        """[its checkpoint folder] where its scores of `images` are NaN or infinite, else []."""
        return [] if np.isfinite(self(images)).all() else [str(self.checkpoint or "(not saved)")]


def check_scores(models, case_id: str, images: np.ndarray, scores: np.ndarray) -> None:
    """A `UserError` naming the case and the checkpoints (`models.non_finite`) where `scores`,
    the output of `models` (a `Predictor` or an `Ensemble`) for the case's `images`, are not all
    finite: variables that are finite can still compute NaN (e.g. weights that overflow), which
    the lesion candidates and the predictions files would meet with no name for the cause."""
    if np.isfinite(scores).all():
        return
    kind = "NaN" if np.isnan(scores).any() else "infinity"
    names = models.non_finite(images)
    which = " and ".join(f"checkpoint {name}" for name in names) or "the models' mean"
    if len(getattr(models, "predictors", [models])) > 1:  # --step picks no model of several
        remedy = "leave its run out (name the others with --checkpoint)"
    else:
        remedy = "predict with another checkpoint (--step)"
    raise UserError(
        f"case {case_id}: {which} give{'' if len(names) > 1 else 's'} non-finite scores ({kind}) "
        f"from finite variables: the model is unusable; retrain it, or {remedy}"
    )


@dataclasses.dataclass(frozen=True)
class Batch:
    """One model call: `dispatch()` starts it and returns its scores on the device (padded
    rows included); they belong in `out[first : first + rows]`; `then()` (if any) runs once
    they are there."""

    dispatch: Callable[[], object]
    out: np.ndarray
    first: int
    rows: int
    then: Callable[[], None] | None = None


def run_overlapped(batches: Iterable[Batch]) -> None:
    """Runs `batches` in order, each dispatched (its inputs placed, its computation started)
    before the scores of the one before are read back, so the host's copies overlap the
    devices' work instead of leaving them idle between batches; one batch waits at a time."""
    pending = None  # (batch, scores on the devices)
    for batch in batches:
        scores = batch.dispatch()
        if pending is not None:
            _read_back(*pending)
        pending = (batch, scores)
    if pending is not None:
        _read_back(*pending)


def _read_back(batch: Batch, scores) -> None:
    batch.out[batch.first : batch.first + batch.rows] = jax.device_get(scores)[: batch.rows]
    if batch.then is not None:
        batch.then()


@dataclasses.dataclass
class _Queued:
    """A case waiting in `pooled_predictions`: its `images [S, H, W, C]` and the scores of its
    first `predicted` slices, in the parts that successive batches made."""

    key: object
    images: np.ndarray
    parts: list[np.ndarray] = dataclasses.field(default_factory=list)
    predicted: int = 0


def pooled_predictions(predict: Callable, cases: Iterable, batch_size: int) -> Iterator:
    """`(key, scores [S, H, W, 5])` for each `(key, images [S, H, W, C])` of `cases`, in order.

    The slices of consecutive cases are pooled, so every call of `predict` (a `Predictor` or an
    `Ensemble`) but the last gets a whole number of `batch_size` batches, whatever the cases'
    lengths: only the last batch of all is padded. A case is yielded as soon as all its slices
    are predicted; between calls fewer than `batch_size` slices wait, with the scores already
    made of the cases they belong to.
    """
    queue: list[_Queued] = []
    waiting = 0  # slices of the queued cases not predicted yet
    for key, images in cases:
        queue.append(_Queued(key, images))
        waiting += len(images)
        if waiting >= batch_size:
            yield from _predict_queued(predict, queue, waiting - waiting % batch_size)
            waiting %= batch_size
    yield from _predict_queued(predict, queue, waiting)


def _predict_queued(predict: Callable, queue: list[_Queued], count: int) -> Iterator:
    """Predicts the first `count` slices not yet predicted of the `queue`d cases, then pops and
    yields the cases that are complete."""
    parts, takers = [], []
    for entry in queue:
        if count == 0:
            break
        take = min(len(entry.images) - entry.predicted, count)
        if take:
            parts.append(entry.images[entry.predicted : entry.predicted + take])
            takers.append((entry, take))
            count -= take
    if parts:
        scores, first = predict(np.concatenate(parts)), 0
        for entry, take in takers:
            entry.parts.append(scores[first : first + take])
            entry.predicted += take
            first += take
    while queue and queue[0].predicted == len(queue[0].images):
        done = queue.pop(0)
        empty = np.zeros((*done.images.shape[:3], 5), np.float32)
        yield done.key, (np.concatenate(done.parts) if done.parts else empty)


def predict_cases(
    predictor: Predictor, store, case_ids: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Writes `<case_id>.npz` (contract, with t2w/adc clipped to [0, 1] for figures and the
    source slice indices) for every slice of each case, with a progress bar. The slices of
    consecutive cases share inference batches (`pooled_predictions`). `predictor`: a `Predictor`
    or an `Ensemble`."""
    channels = component_channels(store, predictor.components)

    def inputs():
        for case_id in case_ids:
            images = np.asarray(store.images[store.case_slices(case_id)])
            yield (case_id, images), images[..., channels]

    written = []
    pooled = pooled_predictions(predictor, inputs(), predictor.batch_size)
    for (case_id, images), scores in tqdm(pooled, total=len(case_ids), desc="predict", unit="case"):
        check_scores(predictor, case_id, images[..., channels], scores)
        rows = store.case_slices(case_id)
        record = store.case(case_id)
        extra = {
            name: np.clip(images[..., list(store.components).index(name)], 0.0, 1.0)
            for name in ("t2w", "adc")
            if name in store.components
        }
        written.append(
            write_case(
                out_dir,
                case_id,
                scores=scores,
                lesions=np.asarray(store.lesions[rows]),
                lesion_classes=np.asarray(record["lesion_classes"], np.int32),
                lesion_grade_known=np.asarray(record["lesion_grade_known"], bool),
                spacing=record["spacing"],
                patient_id=record["patient_id"],
                slice_index=np.asarray(store.slice_index[rows]),
                **extra,
            )
        )
    return written


def predict_validation_fold(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    store_path: str | Path | None = None,
    batch_size: int = 16,
    predictor=None,
) -> tuple[list[str], Store]:
    """Predicts every case of the run's validation fold (`config.data.fold`) into `out_dir`;
    returns their case ids (the cases an evaluation of the fold expects) and the store read.
    `predictor`: the run's model already loaded, e.g. with flip TTA (default:
    `Predictor.from_workdir`)."""
    if predictor is None:
        predictor = Predictor.from_workdir(workdir, step=step, batch_size=batch_size)
    data = predictor.spec.config.data
    if not store_path:
        store_path = data.store
        if not store_path:
            raise UserError(f"workdir {workdir}: its config has no data.store; pass --store")
        if not Path(store_path).exists() and not moved_aside_note(store_path):
            note = workdir_lib.missing_path_note(workdir, "data.store")
            fix = "run from the folder the run was trained in" if note else "restore it"
            raise FileNotFoundError(
                f"store {store_path} of run {workdir} does not exist{note}: {fix}, or pass --store"
            )
    store = open_store(store_path)
    # Another format version: as predict, with a warning (the run's cases are still checked).
    record = check_run_store(
        workdir, store.settings, against=f"store {store_path}", ignore=("slices", "version")
    )
    warn_other_version(record, workdir)
    val_cases = validation_cases(workdir, store, predictor.spec)
    if not val_cases:
        raise UserError(f"store {store_path}: fold {data.fold} has no validation case")
    warn_other_case_data(record, store, val_cases, workdir)
    log.info("predicting %d validation cases of fold %s", len(val_cases), data.fold)
    predict_cases(predictor, store, val_cases, out_dir)
    return list(val_cases), store


def validation_cases(workdir: str | Path, store, spec: RunSpec) -> list[str]:
    """The validation cases the run recorded at training start (`data.run_store`); a store
    lacking any is refused, naming them. A run that recorded none: its fold of `store`,
    recomputed (warned: a store rebuilt with other cases gives another split)."""
    recorded = recorded_cases(workdir, "val_cases")
    if recorded is None:
        log.warning(
            "run %s recorded no validation cases: recomputing fold %s of store %s",
            workdir,
            spec.config.data.fold,
            store.path,
        )
        return list(spec.fold_split(store).val_cases)
    missing = sorted(set(recorded) - set(store.case_ids))
    if missing:
        raise UserError(
            f"store {store.path} lacks {len(missing)} of the {len(recorded)} validation cases "
            f"run {workdir} recorded: {', '.join(missing)}"
        )
    return recorded
