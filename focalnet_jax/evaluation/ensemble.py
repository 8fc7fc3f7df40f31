"""Several trained models as one predictor: cross-validation fold ensembles and flip TTA.

- Ensemble: the mean over models of P(class >= k), k = 1..5 (`Predictor` gives every encoding
  in that form: one-hot models through the tail sums of their softmax), as nnU-Net averages its
  five fold models. The models must agree on the set of their input components (not their
  order: each model gets its channels in its own training order), their output encoding and
  the preprocessing settings that shape their inputs; anything else is an error naming the runs.
- Test-time augmentation `flip`: the mean of the prediction and the re-flipped prediction of the
  left-right flipped input. The crop's columns run along the T2w in-plane axis nearest LPS x
  (the patient's right to left; data/geometry.py), so the flip mirrors the columns (axis 2 of
  `[N, H, W, C]`) about the crop centre: the flip training used (`augment.source_coordinates`).
  Without interpolation it is exact, and a mirrored prostate is a plausible prostate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.run_store import RECORD_FILE, read_run_store, warn_other_version
from focalnet_jax.data.store import preprocess_settings as store_preprocess_settings
from focalnet_jax.data.store_settings import settings_diff
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.inference import Batch, Predictor, checked_images, run_overlapped
from focalnet_jax.evaluation.predictions import MODELS_FILE
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.run.run_folder import FOLD_NAME, fold_runs, lost_config

log = logging.getLogger(__name__)

TTA_MODES = ("none", "flip")
NOT_A_FOLD = "not a fold<k> run of focalnet cv (a copy of a fold would count it twice)"
LEFT_RIGHT_AXIS = 2  # columns of [N, H, W, C]: along LPS +x (patient right -> left)
# Labels only: how a label value 1 reads does not change a model's inputs.
LABEL_ONLY_SETTINGS = ("label_values",)


class EnsembleError(UserError):
    """Runs that cannot form an ensemble (names the runs and the reason)."""


def preprocess_settings(
    config, workdir: str | Path | None = None, store: str | Path | None = None
) -> dict | None:
    """The preprocessing settings the run was trained with: those recorded in `workdir`
    (`data.run_store`; a training store rebuilt since with other settings is named in a warning),
    else (a run from before these records) its training store's (`store`, e.g. evaluate's
    --store, else `data.store`); neither: a UserError."""
    path = str(store or config.data.store or "")
    settings = store_preprocess_settings(path) if path else None
    record = read_run_store(workdir) if workdir is not None else None
    if record is not None:
        diff = settings_diff(record["settings"]["preprocess"], settings or {}, ("run", "store"))
        if settings is not None and diff:
            log.warning(
                "store %s was rebuilt since training (%s): preprocessing as the run was trained",
                path,
                "; ".join(diff),
            )
        warn_other_version(record, workdir)
        return record["settings"]["preprocess"]
    if settings is None:
        given = store is not None
        note = (
            "" if given or workdir is None else workdir_lib.missing_path_note(workdir, "data.store")
        )
        raise UserError(
            f"run {workdir} records no store settings ({RECORD_FILE}) and its training store "
            f"{path or '(none configured)'}{' (--store)' if given else ''} is not readable{note}: "
            f"its preprocessing is unknown; restore that store, set data.store in "
            f"{workdir_lib.CONFIG_FILE} to a copy, or give a copy as `focalnet evaluate --workdir "
            "RUN --store COPY`"
        )
    log.warning("run %s records no store settings: preprocessing as store %s", workdir, path)
    return settings


def input_settings(preprocess: dict | None) -> dict:
    """The preprocessing settings that shape model inputs (defaults filled in)."""
    settings = PreprocessConfig.from_any(preprocess).settings()
    return {k: v for k, v in settings.items() if k not in LABEL_ONLY_SETTINGS}


def settings_difference(have: dict, want: dict) -> dict:
    """{key: (have, want)} for every key whose values differ."""
    keys = sorted(set(have) | set(want))
    return {k: (have.get(k), want.get(k)) for k in keys if have.get(k) != want.get(k)}


def final_step(workdir: Path) -> tuple[int | None, str]:
    """(step of the run's finished checkpoint, else None; why not). Finished: a checkpoint at the
    run's total steps: the configured `train.steps`, or for a run that counts epochs the total
    its training recorded at start (`store.json`: epochs x steps per epoch of its training
    slices). An epoch-based run without that record cannot be told finished: left out."""
    try:
        config = workdir_lib.read_config(workdir)
    except FileNotFoundError as error:
        return None, str(error)
    if not (workdir / workdir_lib.CHECKPOINT_DIR).is_dir():
        return None, "no checkpoint"
    manager = workdir_lib.make_manager(workdir, read_only=True)
    try:
        steps = manager.all_steps()
    finally:
        manager.close()
    if not steps:
        return None, "no checkpoint"
    target = int(config.train.steps)
    if target <= 0:
        target = (read_run_store(workdir) or {}).get("total_steps")
        if target is None:
            return None, (
                "counts epochs but records no total steps (trained before they were recorded): "
                "cannot tell whether it finished; name the run itself to use it"
            )
    if max(steps) < target:
        return None, f"latest checkpoint at step {max(steps)} of {target}"
    return target, ""


def _warn_unfinished(runs: Sequence[Path]) -> None:
    """One warning for each of `runs` (runs named themselves) whose latest checkpoint, the one
    used, is not at its total steps."""
    for run in runs:
        finished, why = final_step(run)
        if finished is None:
            log.warning("%s: not finished (%s): its latest checkpoint is used", run, why)


def resolve_folder(
    path: str | Path, used_elsewhere: Collection[str] = ()
) -> tuple[list[Path], list[dict]]:
    """(runs, left out) of a `--checkpoint` / `--workdir` argument: the run itself, or every
    `fold<k>` run of a cross-validation folder with a finished checkpoint. Left out, each logged
    and listed as {"run": absolute path, "reason"}: unfinished folds, other `fold*` runs (e.g. a
    copy `fold0.bak`, which would count its fold twice in the mean), and the `fold<k>` of
    k < `data.num_folds` (the largest the fold runs' config.json give) with no run at all.
    `used_elsewhere`: the absolute paths of runs named themselves beside the folder, used and so
    never left out."""
    path = Path(path)
    named = fold_runs(path)
    folds = [p for p in named if FOLD_NAME.fullmatch(p.name)]
    for fold in sorted(path.glob("fold*")):  # a fold so lost is no run: never left out as untrained
        if FOLD_NAME.fullmatch(fold.name) and (lost := lost_config(fold)):
            raise EnsembleError(f"{path}: {lost}, or move {fold.name} out")
    if not folds and (lost := lost_config(path)):
        raise EnsembleError(lost)
    if (path / workdir_lib.CONFIG_FILE).is_file():
        if named:  # a run trained into a cross-validation folder
            raise EnsembleError(
                f"{path}: both a training run ({workdir_lib.CONFIG_FILE}) and a cross-validation "
                f"folder ({named[0].name}/{workdir_lib.CONFIG_FILE}); name the run or the folds' "
                "runs themselves (several --checkpoint)"
            )
        return [path], []
    folds.sort(key=lambda p: (len(p.name), p.name))  # fold2 before fold10
    if not folds:
        raise EnsembleError(
            f"{path}: neither a training run (no {workdir_lib.CONFIG_FILE}) nor a "
            f"cross-validation folder (no fold<k>/{workdir_lib.CONFIG_FILE})"
        )
    for fold in folds:
        trained = _data_value(fold, "fold")  # None: unreadable, named where the run is read
        if trained is not None and trained != int(fold.name[len("fold") :]):
            raise EnsembleError(
                f"{path}: {fold.name} trained data.fold={trained} "
                f"({fold / workdir_lib.CONFIG_FILE}); in the ensemble it would stand for "
                f"{fold.name}, counting another fold's model: retrain it with --fold "
                f"{fold.name[len('fold') :]}, or move it out"
            )
    strays = sorted(set(named) - set(folds))
    strays = [stray for stray in strays if str(stray.resolve()) not in used_elsewhere]
    for stray in strays:
        log.warning("%s: %s left out of the ensemble (%s)", path, stray.name, NOT_A_FOLD)
    runs, skipped = [], {}
    for fold in folds:
        step, reason = final_step(fold)
        if step is None:
            if str(fold.resolve()) not in used_elsewhere:
                skipped[fold] = reason
        else:
            runs.append(fold)
    if not runs:
        raise EnsembleError(
            f"cross-validation folder {path}: no fold with a finished checkpoint ("
            + "; ".join(f"{fold.name}: {reason}" for fold, reason in skipped.items())
            + ")"
        )
    _check_one_config(path, runs)
    for fold, reason in skipped.items():
        log.warning("%s: fold left out of the ensemble (%s: %s)", path, fold.name, reason)
    num_folds = max(_data_value(fold, "num_folds") or 0 for fold in folds)
    missing = [f"fold{k}" for k in range(num_folds) if path / f"fold{k}" not in folds]
    if missing:
        log.warning(
            "%s: ensemble of %d of %d folds; %s %s never trained",
            path,
            len(runs),
            num_folds,
            ", ".join(missing),
            "was" if len(missing) == 1 else "were",
        )
    left_out = [{"run": str(fold.resolve()), "reason": reason} for fold, reason in skipped.items()]
    left_out += [{"run": str(stray.resolve()), "reason": NOT_A_FOLD} for stray in strays]
    left_out += [
        {"run": str((path / name).resolve()), "reason": "never trained"} for name in missing
    ]
    return runs, left_out


def _check_one_config(path: Path, folds: Sequence[Path]) -> None:
    """EnsembleError naming the fold and the keys where a finished fold of cross-validation
    folder `path` was trained with another config than the first (`focalnet cv` refuses to
    write such a fold; `focalnet train --workdir cv/fold1` does not): the folds' ensemble stands
    for one config. Keys a resumed run may change and `data.fold` may differ."""
    first = workdir_lib.saved_config(folds[0])
    allowed = (*workdir_lib.RESUMABLE_KEYS, "data.fold")
    for fold in folds[1:]:
        if changed := workdir_lib.config_changes(first, workdir_lib.saved_config(fold), allowed):
            raise EnsembleError(
                f"{path}: {fold.name} was trained with another config than {folds[0].name} "
                f"({'; '.join(changed)}); the ensemble of a cross-validation folder's folds "
                "stands for one config: train the fold again with the folds' config, or move it "
                "out"
            )


def _data_value(run: Path, key: str) -> int | None:
    """`data.<key>` (an integer: `fold`, `num_folds`) of a run's config.json; None where it
    gives none."""
    try:
        value = json.loads((run / workdir_lib.CONFIG_FILE).read_text())["data"][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclasses.dataclass
class Ensemble:
    """Models as `scores = ensemble(images)`: images float32 `[N, H, W, C]` (components in
    `components` order, T2w unclipped) -> float32 `[N, H, W, 5]`, the mean P(class >= k).
    Each model gets its channels gathered into its own order (`data.components` of its run), so
    models that list one set of components in different orders give the mean of their
    single-model predictions. `left_out`: the folds of its cross-validation folders left out
    ({"run", "reason"}, `resolve_folder`)."""

    predictors: list[Predictor]
    runs: list[Path]
    preprocess: dict | None
    tta: str = "none"
    left_out: list[dict] = dataclasses.field(default_factory=list)

    @property
    def components(self) -> tuple[str, ...]:
        """The components an exam gives, in the order `__call__` takes them stacked: T2w first
        (the grid every other component is resampled onto, so read even for a model that does
        not use it), then the others in the first model's order, e.g. ('t2w', 'adc', 'hbv') for
        models of t2w,adc,hbv then t2w,hbv,adc, ('t2w', 'hbv', 'adc') the other way round."""
        return ("t2w", *(c for c in self.predictors[0].components if c != "t2w"))

    @property
    def batch_size(self) -> int:
        """Slices per model call that fill every model's batches."""
        return max(p.batch_size for p in self.predictors)

    @property
    def output_encoding(self) -> str:
        """The models' output encoding (`encoding.ENCODINGS`; they agree on it)."""
        return self.predictors[0].spec.output_encoding

    @property
    def spec(self):
        """The first model's `RunSpec` (they agree on the set of components, the encoding and
        the preprocessing); its `components` are in that model's order, which the ensemble's
        input order (`components`, T2w first) need not follow."""
        return self.predictors[0].spec

    @property
    def input_preprocess(self) -> dict | None:
        """The preprocessing settings that shape the models' inputs (`input_settings`, as JSON
        reads them back), None where unknown (models not loaded from a run)."""
        if self.preprocess is None:
            return None
        return json.loads(json.dumps(input_settings(self.preprocess)))

    @property
    def inference_configs(self) -> dict:
        """{run (absolute): what its config decides of its scores beside its weights: `model`
        (less `pretrained`, an initialisation), the output encoding and its components in input
        order}, as JSON reads them back. A run whose config.json was edited since (e.g.
        `model.output_stride`) gives other scores from the same weights."""
        configs = {}
        for run, predictor in zip(self.runs, self.predictors, strict=True):
            model = predictor.spec.config.model.as_configdict().to_dict()
            model.pop("pretrained", None)
            configs[str(run.resolve())] = {
                "model": model,
                "output_encoding": predictor.spec.output_encoding,
                "components": list(predictor.spec.components),
            }
        return json.loads(json.dumps(configs))

    def describe(self) -> dict:
        """Which models formed the predictions: {"models": [{"run", "step"}], "tta"}, each run
        absolute (symlinks resolved, so that one run reads the same however it was named),
        "weights" (each model's `variables_digest`, where every model was loaded from a run: a
        run trained again to the same step reads as other models), "left_out" (a list of {"run",
        "reason"}) where a cross-validation folder's fold was, and "output_encoding": "binary"
        for models of lesion against no lesion (scores without a grade; only then, so that
        earlier outputs of graded models still resume)."""
        models = [
            {"run": str(r.resolve()), "step": p.step}
            for r, p in zip(self.runs, self.predictors, strict=True)
        ]
        described = {"models": models, "tta": self.tta}
        weights = [p.weights for p in self.predictors]
        if None not in weights:
            described["weights"] = weights
        if self.left_out:
            described["left_out"] = self.left_out
        if self.output_encoding == "binary":
            described["output_encoding"] = "binary"
        return described

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = checked_images(images, self.components)
        if self.tta == "flip":
            # One pass over [plain; flipped] per model: twice the batch, one compilation.
            both = np.concatenate([images, np.flip(images, LEFT_RIGHT_AXIS)])
        else:
            both = images
        total = np.zeros((*images.shape[:3], 5), np.float64)
        run_overlapped(self._batches(both, total))
        return (total / len(self.predictors)).astype(np.float32)

    def non_finite(self, images: np.ndarray) -> list[str]:
        """The checkpoint folders (a run where its model was not loaded from one) of the models
        whose scores of `images` (stacked in `components` order), alone (with the ensemble's
        TTA, each given its own order of the components), are NaN or infinite."""
        names = []
        for run, predictor in zip(self.runs, self.predictors, strict=True):
            alone = dataclasses.replace(self, predictors=[predictor], runs=[run])
            order = [self.components.index(c) for c in alone.components]
            if not np.isfinite(alone(images[..., order])).all():
                names.append(str(predictor.checkpoint or run))
        return names

    def _batches(self, both: np.ndarray, total: np.ndarray) -> Iterator[Batch]:
        """Every model's batches, one model after the other, so that `run_overlapped`
        dispatches model i + 1's first batch before model i's last scores are read back; each
        model's scores (flip TTA: the mean of plain and re-flipped) are added to `total` when
        its last batch is in."""
        for predictor in self.predictors:
            scores = np.zeros((*both.shape[:3], 5), np.float32)
            # This model's channels in its own order: a host-side gather, one compiled function.
            channels = [self.components.index(c) for c in predictor.components]
            add = functools.partial(self._add_model, scores, total)
            yield from predictor.batches(both[..., channels], scores, then=add)

    def _add_model(self, scores: np.ndarray, total: np.ndarray) -> None:
        """`total += ` one model's `scores` of the plain (and, flip TTA, the flipped) slices."""
        if self.tta == "flip":
            n = len(total)
            scores = 0.5 * (scores[:n] + np.flip(scores[n:], LEFT_RIGHT_AXIS))
        total += scores


def write_models(models: Ensemble, out_dir: str | Path, store=None) -> Path:
    """`out_dir/models.json`: `Ensemble.describe()`, so that an ensemble of fewer runs than a
    folder holds (a fold left out) is visible beside its predictions; with the store the cases
    were read from, its path (absolute, symlinks resolved, as the runs') and the slices it keeps
    ("store": {"path", "slices"}: a store of the annotated slices alone holds no whole volume)."""
    described = models.describe()
    if store is not None:
        path = str(Path(store.path).resolve())
        described["store"] = {"path": path, "slices": store.settings["slices"]}
    return write_json_atomic(described, Path(out_dir) / MODELS_FILE)


def check_compatible(runs: Sequence[Path], predictors: Sequence[Predictor], settings) -> None:
    """Raises EnsembleError naming the runs when two hold the same weights (a copy would count
    its model twice), or when models differ in their set of components (their orders may
    differ), output encoding or input preprocessing settings."""
    checks = {
        "the set of components": [sorted(p.components) for p in predictors],
        "output encodings": [p.spec.output_encoding for p in predictors],
        "input preprocessing settings": [input_settings(s) for s in settings],
    }
    first_of = {}  # weights digest -> the first run holding them
    for run, predictor in zip(runs, predictors, strict=True):
        if predictor.weights is not None and (copied := first_of.get(predictor.weights)):
            raise EnsembleError(
                f"{copied} and {run} hold the same weights (one a copy of the other?): the "
                "ensemble would count that model twice; name one of them"
            )
        first_of.setdefault(predictor.weights, run)
    for what, values in checks.items():
        if any(v != values[0] for v in values[1:]):
            if what == "input preprocessing settings":
                values = [settings_difference(v, values[0]) or "reference" for v in values]
            elif what == "the set of components":  # as each run lists them
                values = [list(p.components) for p in predictors]
            listed = "; ".join(f"{run}: {v}" for run, v in zip(runs, values, strict=True))
            raise EnsembleError(f"models disagree on {what}: {listed}")


def load_ensemble(
    paths: str | Path | Sequence[str | Path],
    *,
    step: int | None = None,
    batch_size: int = 16,
    tta: str = "none",
    store: str | Path | None = None,
) -> Ensemble:
    """An `Ensemble` of every run named by `paths` (runs or cross-validation folders).

    `step` picks one checkpoint step and needs a single run. `store`: the runs' training store
    where it is not their `data.store` (read for runs that record no preprocessing settings).
    """
    if tta not in TTA_MODES:
        raise EnsembleError(f"tta {tta!r}: expected one of {TTA_MODES}")
    if isinstance(paths, str | Path):
        paths = [paths]
    named = {str(Path(p).resolve()) for p in paths if (Path(p) / workdir_lib.CONFIG_FILE).is_file()}
    resolved = [resolve_folder(path, named) for path in paths]
    runs = [run for path_runs, _ in resolved for run in path_runs]
    if len({run.resolve() for run in runs}) != len(runs):
        raise EnsembleError(f"a run is named twice: {[str(r) for r in runs]}")
    if step is not None and len(runs) > 1:
        raise EnsembleError(f"--step picks one checkpoint of one run; got {len(runs)} runs")
    predictors = [Predictor.from_workdir(run, step=step, batch_size=batch_size) for run in runs]
    if step is None:  # the folds of a cross-validation folder are finished (`resolve_folder`)
        _warn_unfinished([Path(p) for p in paths if (Path(p) / workdir_lib.CONFIG_FILE).is_file()])
    settings = [
        preprocess_settings(p.spec.config, run, store)
        for run, p in zip(runs, predictors, strict=True)
    ]
    ensemble = make_ensemble(predictors, runs, settings, tta)
    ensemble.left_out = [fold for _, left_out in resolved for fold in left_out]
    return ensemble


def make_ensemble(
    predictors: Sequence[Predictor], runs: Sequence[Path], settings: Sequence, tta: str = "none"
) -> Ensemble:
    """An `Ensemble` of loaded models (`settings`: each run's preprocessing settings, None where
    unknown), checked with `check_compatible`. Models of one architecture on the same devices
    share one compiled function (they differ only in their variables: one set of components is
    one number of input channels, and each model's order is a gather of the channels before
    its batches, `Ensemble._batches`)."""
    if tta not in TTA_MODES:
        raise EnsembleError(f"tta {tta!r}: expected one of {TTA_MODES}")
    check_compatible(runs, predictors, settings)
    if tta == "flip":
        for run, predictor in zip(runs, predictors, strict=True):
            if not predictor.spec.config.augment.flip:
                log.warning(
                    "%s was trained without the left-right flip (augment.flip=False): --tta flip "
                    "averages in its predictions of mirrored slices it never saw", run,
                )  # fmt: skip
    predictors = list(predictors)
    shared: dict[str, Predictor] = {}
    for i, predictor in enumerate(predictors):
        spec = predictor.spec
        devices = [device.id for device in predictor.mesh.devices.flat]
        key = json.dumps(
            [spec.config.model.to_dict(), spec.output_encoding, devices], sort_keys=True
        )
        if key in shared:
            predictors[i] = dataclasses.replace(predictor, apply=shared[key].apply)
        shared.setdefault(key, predictor)
    known = next((s for s in settings if s is not None), None)
    log.info("%d model(s): %s; tta %s", len(runs), ", ".join(str(r) for r in runs), tta)
    return Ensemble(predictors, list(runs), known, tta)
