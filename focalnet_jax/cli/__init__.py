"""The `focalnet` console script: argument parsing only (commands: README.md).

Each subcommand has an `add_<name>` function that declares its flags and a `run_<name>` function
that imports the module doing the work lazily (so `focalnet synth` does not pay for importing JAX):
`data_commands`, `training_commands`, `evaluation_commands`; `study` lives in focalnet_jax.study.
A user error (`errors.one_line_user_errors`) of any command ends as one line on stderr, `focalnet
<command>: error: <message>`, and exit status 2; `--verbose` adds its traceback. Other exceptions
keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.cli import data_commands as data
from focalnet_jax.cli import evaluation_commands as evaluation
from focalnet_jax.cli import training_commands as training
from focalnet_jax.errors import ctrl_c_never_dropped, one_line_user_errors, sigterm_as_interrupt

# SIGTERM keeps its default (the process ends at once) but in the training loop, which stops at the
# next step boundary with a checkpoint (focalnet_jax/training/graceful_stop.py); and in `study
# cell`, whose `focalnet train` child gets the same SIGTERM from SLURM (the cell is `interrupted`).
LONG_RUNNING = ("train", "cv", "study cell")

# `study` (arms x repeats x folds) declares its flags and actions in focalnet_jax.study.commands.


def _add_study(parser: argparse.ArgumentParser) -> None:
    from focalnet_jax.study.commands import add_arguments

    add_arguments(parser)


def _run_study(args: argparse.Namespace) -> int:
    from focalnet_jax.study.commands import run

    return run(args)


_COMMANDS: dict[str, tuple] = {
    # name: (help, add_parser_fn, run_fn)
    "synth": (
        "write a synthetic mp-MRI dataset in the PI-CAI layout",
        data.add_synth,
        data.run_synth,
    ),
    "preprocess": (
        "preprocess a PI-CAI folder or a manifest into a dataset store",
        data.add_preprocess,
        data.run_preprocess,
    ),
    "folds": (
        "print the patient-level cross-validation folds of a store",
        data.add_folds,
        data.run_folds,
    ),
    "train": ("train a config (resumes from --workdir)", training.add_train, training.run_train),
    "cv": ("train a config on every cross-validation fold", training.add_cv, training.run_cv),
    "evaluate": (
        "FROC, GS ROC and PI-CAI metrics of predictions (metrics.json, report.md, PNGs)",
        evaluation.add_evaluate,
        evaluation.run_evaluate,
    ),
    "summarize": (
        "combine cross-validation folds of several methods: mean+-SD, bands, Welch tests",
        evaluation.add_summarize,
        evaluation.run_summarize,
    ),
    "predict": (
        "run a model or an ensemble on exams: NIfTI score and detection maps, detections CSV, PNG",
        evaluation.add_predict,
        evaluation.run_predict,
    ),
    "study": (
        "arms x repeats x folds of training runs, locally or on SLURM; status; report",
        _add_study,
        _run_study,
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose error for a missing required argument also
    names the options of `argv` it does not know: a misspelt required flag (`--checkpiont`) was
    reported only as `--checkpoint` missing."""

    argv: Sequence[str] = ()  # the command line being parsed (`main`)

    def error(self, message: str):
        if message.startswith(("the following arguments are required", "one of the arguments")):
            given = [arg.split("=", 1)[0] for arg in self.argv if arg.startswith("--")]
            unknown = [
                arg for arg in given
                # argparse takes a prefix of an option for it (`--ou` for `--out`)
                if not any(option.startswith(arg) for option in self._option_string_actions)
                and not arg.startswith(("--config.", "--spec."))  # overrides, read later
            ]  # fmt: skip
            if unknown:
                message += f" (not recognized: {' '.join(dict.fromkeys(unknown))})"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="focalnet",
        description="FocalNet: prostate cancer detection and Gleason score prediction in mp-MRI.",
    )
    verbose_help = "show the traceback of an error"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    # Also after the subcommand; SUPPRESS keeps a --verbose given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_fn, _) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        add_fn(command)
        command.set_defaults(command_parser=command)  # its usage for an unknown flag
    return parser


def _expand_home(args: argparse.Namespace) -> None:
    """Expands a leading `~` of every path flag (also each of a repeated one) as the shell does
    for `--out ~/x` but not for `--out=~/x`, which wrote into a folder named `~` of the working
    folder (the config's paths, e.g. `--config.data.store=~/x`, are expanded where they are
    resolved: `run.workdir.absolute_path`)."""
    for name, value in vars(args).items():  # os.path's: `~nosuchuser` stays, as in the shell
        if isinstance(value, Path):
            setattr(args, name, Path(os.path.expanduser(value)))
        elif isinstance(value, list) and any(isinstance(item, Path) for item in value):
            setattr(args, name, [Path(os.path.expanduser(item)) for item in value])


def main(argv: Sequence[str] | None = None) -> int:
    """`focalnet ARGV`; the exit status. Without `argv`: the process's own command line (the
    console script, `python -m focalnet_jax.cli`), and the process ends when this returns: after
    a complete training run a SIGTERM then ends it with status 0 (`graceful_stop`)."""
    process_ends = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _Parser.argv = argv
    # `train` and `cv` take free-form `--config.KEY=VALUE` overrides that argparse does not know,
    # `study` `--spec.KEY=VALUE`.
    args, unknown = parser.parse_known_args(argv)
    _expand_home(args)
    args.process_ends = process_ends
    if unknown and args.command not in ("train", "cv", "study"):
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    run_fn = _COMMANDS[args.command][2]
    action = getattr(args, "study_command", None)  # `focalnet study ACTION: error: ...`
    prog = f"focalnet {args.command}" + (f" {action}" if action else "")
    # SIGTERM unwinds like Ctrl-C, removing temporary folders, except in training: a task of a
    # multi-process run must not wait at JAX's shutdown barrier for the others.
    long_running = prog.removeprefix("focalnet ") in LONG_RUNNING
    terminate = contextlib.nullcontext() if long_running else sigterm_as_interrupt()
    # A training process that fails alone leaves its process group at once (`distributed`).
    training = process_ends and args.command in ("train", "cv")
    group = contextlib.nullcontext()
    if training:
        from focalnet_jax.training.group_failures import end_process, leave_group_on_failure

        group = leave_group_on_failure(prog)
    try:
        with (
            group,
            one_line_user_errors(prog, verbose=args.verbose),
            terminate,
            ctrl_c_never_dropped(),
        ):
            return int(run_fn(args) or 0)
    except BrokenPipeError:
        if not process_ends:
            raise
        # `focalnet ... | head`: the reader has gone; the rest of the output goes nowhere (no
        # traceback), the status a shell gives a process that SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + int(signal.SIGPIPE)
    except SystemExit as stop:
        # A training process that failed ends once its error is printed (a status): the loop has
        # finished or failed its saves already (`loop._close`), but Orbax's threads of a save that
        # failed to create its folder wait 5 minutes before the interpreter could exit. In a
        # process group (every process stopped by a SIGTERM, or refused the same run) process 0
        # ends last (`end_process`).
        if training and isinstance(stop.code, int) and stop.code != 0:
            end_process(stop.code)
        raise
