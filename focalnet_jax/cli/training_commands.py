"""`focalnet train` and `cv`: their flags, the process group and the config with its overrides."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from focalnet_jax.errors import UserError

OVERRIDES_EPILOG = "Any config field can be overridden: --config.train.steps=100 --config.seed=1"


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process (default: SLURM's variables, else one process)"
    )
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, help="total number of processes")
    group.add_argument("--process_id", type=int, help="this process's rank, 0..N-1")


def add_compilation_cache_flag(
    parser: argparse.ArgumentParser,
    default: str,
    reuse: str = "restarts and folds reuse the compiled steps",
) -> None:
    """`--compilation_cache DIR` (`distributed.compilation_cache`); `reuse`: what it saves."""
    parser.add_argument(
        "--compilation_cache",
        type=Path,
        help=f"folder of the persistent XLA compilation cache, so {reuse} (default: {default})",
    )


def add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="config file, optionally with :arg (configs/picai.py:fold=2)",
    )
    parser.add_argument(
        "--workdir", type=Path, required=True, help="run folder; resumes if present"
    )
    parser.add_argument("--fold", type=int, help="shortcut for --config.data.fold")
    parser.epilog = OVERRIDES_EPILOG
    add_compilation_cache_flag(parser, "$JAX_COMPILATION_CACHE_DIR, else none")
    _add_distributed_flags(parser)


def _training_setup(args: argparse.Namespace):
    """Join the process group, load the config with its overrides; returns the config."""
    import logging

    from focalnet_jax.config_loading import load_config, override_keys
    from focalnet_jax.run import RunSpec
    from focalnet_jax.training import distributed

    # Our progress at INFO; libraries (Orbax, absl) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("focalnet_jax").setLevel(logging.INFO)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        config = load_config(args.config, args.overrides)
        overridden = override_keys(args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as error:  # flags and config: the user's
        raise UserError(error.args[0] if error.args else str(error)) from error
    _set_fold(config, args, "data.fold" in overridden)
    _check_store_arg(config, args, "data.store" in overridden)
    RunSpec.from_config(config)  # every config error in one line, before any compilation

    logging.getLogger("focalnet_jax").info("%s", distributed.describe())
    return config


def _config_arg_fold(spec: str) -> int | str | None:
    """The fold the `:arg` of `--config FILE:arg` sets (`configs/focalnet.py:fold=2`: 2), None
    where it sets none."""
    from focalnet_jax.config_loading import config_file_arg

    if (value := config_file_arg(spec, "fold")) is None:
        return None
    try:  # as `configs/default.parse_arg` reads it: `fold=+1` is fold 1
        return int(value)
    except ValueError:
        return value


def _check_store_arg(config, args: argparse.Namespace, store_overridden: bool) -> None:
    """Refuses `--config FILE:...,store=A` with `--config.data.store=B` naming another folder:
    the override, applied last, silently overruled the store the file was given."""
    from focalnet_jax.config_loading import config_file_arg

    arg_store = config_file_arg(args.config, "store")
    if not (store_overridden and arg_store):
        return
    given = config.data.store
    if Path(arg_store).expanduser().resolve() != Path(given).expanduser().resolve():
        raise UserError(f"--config {args.config} and --config.data.store={given} disagree")


def _set_fold(config, args: argparse.Namespace, fold_overridden: bool) -> None:
    """`train --fold K` sets data.fold. Refused where a fold asked for would be silently
    overruled: two of `--fold`, `--config.data.fold` and `--config FILE:fold=J` that disagree, and
    any of them in `cv`, which trains the folds of `--folds`."""
    given = [(f"--fold {args.fold}", args.fold)] if args.fold is not None else []
    if fold_overridden:  # the override is applied last: the config's fold is its value
        given.append((f"--config.data.fold={config.data.fold}", config.data.fold))
    if (arg_fold := _config_arg_fold(args.config)) is not None:
        given.append((f"--config {args.config}", arg_fold))
    if args.command == "cv" and given:
        first = given[0][0]
        raise UserError(f"{first}: cv trains every fold, or those of --folds (e.g. --folds 2)")
    for (one, fold), (other, other_fold) in itertools.combinations(given, 2):
        if fold != other_fold:
            raise UserError(f"{one} and {other} disagree")
    if args.fold is not None:
        config.data.fold = args.fold


def _train_run(
    config, workdir: Path, command: str, *, last: bool = True, process_ends: bool = False
) -> None:
    """`train_and_evaluate(config, workdir)`. A SIGTERM that arrived once the run was complete
    (`graceful_stop.TrainingStopped.complete`) ends the command's `last` run with one line on
    stderr (the command exits with status 0); before another run (`cv`) it stops the command.
    After the `last` run, when the process ends with the command (`process_ends`, not a caller's
    `cli.main(argv)`), a SIGTERM during its exit ends it at once with status 0 and that line
    (`graceful_stop.exit_zero_on_sigterm`): the command's work is done."""
    import jax

    from focalnet_jax.training import train_and_evaluate
    from focalnet_jax.training.graceful_stop import TrainingStopped, exit_zero_on_sigterm

    try:
        step = int(jax.device_get(train_and_evaluate(config, workdir).step))
    except TrainingStopped as stop:
        if not (stop.complete and last):
            raise
        print(f"focalnet {command}: {stop.completed}", file=sys.stderr)
        if process_ends:
            exit_zero_on_sigterm("")  # said already
        return
    if last and process_ends:
        completed = TrainingStopped(step, workdir, complete=True).completed
        exit_zero_on_sigterm(f"focalnet {command}: {completed}")


def run_train(args: argparse.Namespace) -> int:
    import jax

    from focalnet_jax.data.atomic_files import check_output_folder
    from focalnet_jax.training.distributed import compilation_cache

    check_output_folder(args.workdir, "--workdir")
    with compilation_cache(args.compilation_cache):
        config = _training_setup(args)
        _train_run(config, args.workdir, args.command, process_ends=args.process_ends)
    if jax.process_index() == 0:  # once per run, not once per process
        print(f"checkpoints and TensorBoard logs in {args.workdir}", flush=True)
    return 0


def _int_list(text: str) -> list[int]:
    """`--folds 0,2` -> [0, 2]; a fold given twice is refused (it was trained once, then resumed
    as done, and reported twice)."""
    try:
        values = [int(f) for f in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} names fold(s) {repeated} more than once")
    return values


def add_cv(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally with :arg")
    parser.add_argument("--workdir", type=Path, required=True, help="fold k in WORKDIR/fold<k>")
    parser.add_argument("--folds", type=_int_list, help="comma-separated folds (default: all)")
    parser.add_argument("--fold", type=int, help=argparse.SUPPRESS)
    parser.epilog = OVERRIDES_EPILOG
    add_compilation_cache_flag(parser, "$JAX_COMPILATION_CACHE_DIR, else WORKDIR/compilation_cache")
    _add_distributed_flags(parser)


def _check_folds(config, folds: list[int], workdir: Path) -> None:
    """A `UserError` before any fold trains, for the first of `folds` whose start would be
    refused: first a fold outside `data.num_folds`, a fold whose run in `workdir/fold<k>` was
    trained with another config, or a fold run of `workdir` outside `folds` trained with another
    config, or on other cases or data than the config's store and split give it now (a
    rewritten `data.splits` folder, another store: the folds would overlap); a fold being
    trained by another process now; then each fold's start as training checks it without
    training (`run_start.check_run_start`: the store, the fold's split and batches,
    `loss.mfl_weight='auto'` on its training rows, a resumed run's recorded store and cases, its
    checkpoint past the config's steps), the message led by `fold <k>: `."""
    # Imported once logging is set up (`_training_setup`): importing Orbax gives the root logger
    # a handler of Python's default format, which `logging.basicConfig` would then leave as it is.
    from focalnet_jax.data.run_store import check_training_store
    from focalnet_jax.errors import is_user_error
    from focalnet_jax.run import RunSpec
    from focalnet_jax.run import workdir as workdir_lib
    from focalnet_jax.run.run_folder import fold_runs, has_checkpoint_step
    from focalnet_jax.training import sharding
    from focalnet_jax.training.run_start import (
        check_not_being_trained,
        check_run_start,
        open_config_store,
    )

    num_folds = config.data.num_folds
    if outside := [fold for fold in folds if not 0 <= fold < num_folds]:
        raise UserError(f"--folds {outside[0]}: not in [0, data.num_folds={num_folds})")
    for fold in folds:
        config.data.fold = fold
        try:
            RunSpec.from_config(config)
            resumed = workdir / f"fold{fold}"
            workdir_lib.check_resumed_config(workdir_lib.absolute_paths(config), resumed)
        except UserError as error:
            raise UserError(f"fold {fold}: {error}") from None
    siblings = {
        int(fold): run
        for run in fold_runs(workdir)
        if (fold := run.name.removeprefix("fold")).isdigit() and int(fold) not in folds
    }
    for fold, sibling in siblings.items():
        config.data.fold = fold
        try:
            workdir_lib.check_resumed_config(workdir_lib.absolute_paths(config), sibling)
        except UserError as error:
            raise UserError(f"fold {fold} (already in {workdir}): {error}") from None
    check_not_being_trained([workdir / f"fold{fold}" for fold in folds])
    store = open_config_store(workdir_lib.absolute_paths(config))  # its errors name no fold
    for fold, sibling in siblings.items():  # split as it recorded (a rewritten data.splits, ...)
        if not has_checkpoint_step(sibling):  # no run yet: its fold starts over when trained
            continue
        config.data.fold = fold
        try:
            split = RunSpec.from_config(config).for_store(store).fold_split(store)
            check_training_store(sibling, store, split=split)
        except UserError as error:
            raise UserError(f"fold {fold} (already in {workdir}): {error}") from None
    mesh = sharding.make_mesh()
    for fold in folds:
        config.data.fold = fold
        try:
            check_run_start(config, workdir / f"fold{fold}", mesh, store=store)
        except Exception as error:
            if not is_user_error(error):
                raise
            raise UserError(f"fold {fold}: {error}") from error


def run_cv(args: argparse.Namespace) -> int:
    import jax

    from focalnet_jax.data.atomic_files import check_output_folder
    from focalnet_jax.run.run_folder import check_run_folder
    from focalnet_jax.training.distributed import compilation_cache

    check_output_folder(args.workdir, "--workdir")
    check_run_folder(args.workdir, cv=True)
    cache = args.compilation_cache
    if cache is None and not jax.config.jax_compilation_cache_dir:
        cache = args.workdir / "compilation_cache"
    with compilation_cache(cache):
        config = _training_setup(args)
        folds = args.folds or list(range(config.data.num_folds))
        _check_folds(config, folds, args.workdir)
        for index, fold in enumerate(folds):
            config.data.fold = fold
            last = index == len(folds) - 1
            workdir = args.workdir / f"fold{fold}"
            _train_run(config, workdir, args.command, last=last, process_ends=args.process_ends)
    if jax.process_index() == 0:
        print(f"trained folds {folds}; runs in {args.workdir}/fold<k>", flush=True)
    return 0
