"""The `focalnet` console script: argument parsing only (SPEC section 7).

Each subcommand has an `_add_<name>` function that declares its flags and a `_run_<name>` function
that imports the module doing the work lazily (so `focalnet synth` does not pay for importing JAX).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


# --- data: synth, preprocess, folds ---------------------------------------------------------------


# --- training: train, cv --------------------------------------------------------------------------


# --- evaluation: evaluate, summarize, predict -----------------------------------------------------


_COMMANDS: dict[str, tuple] = {
    # name: (help, add_parser_fn, run_fn)
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focalnet",
        description="FocalNet for prostate cancer detection and Gleason score prediction in mp-MRI.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_fn, _) in _COMMANDS.items():
        add_fn(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `train` and `cv` take free-form `--config.KEY=VALUE` overrides that argparse does not know.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("train", "cv"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    run_fn = _COMMANDS[args.command][2]
    return int(run_fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
