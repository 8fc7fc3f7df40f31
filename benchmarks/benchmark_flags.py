"""The benchmarks' shared flags: `--kinds a,b,...` (what to time, among the names a script knows),
counts (`count`), and errors of the project's own checks as one line (`run_main`).
Imported by the scripts beside it (the script directory is on `sys.path` when one runs)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable

from focalnet_jax.errors import UserError


def add_kinds_flag(parser: argparse.ArgumentParser, known: Iterable[str], help: str) -> None:
    """`--kinds`, every one of `known` by default; `help` says what a kind is."""
    names = ",".join(known)
    parser.add_argument("--kinds", default=names, help=f"comma-separated {help}, of {names}")


def chosen_kinds(parser: argparse.ArgumentParser, text: str, known: Iterable[str]) -> list[str]:
    """The kinds named in `text` (`--kinds`), in its order, each once; a parser error (exit 2)
    when it names none or one that is not `known`."""
    known = list(known)
    kinds = list(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    if not kinds or set(kinds) - set(known):
        parser.error(f"--kinds: expected names from {','.join(known)}, got {text!r}")
    return kinds


def count(low: int = 1) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low` (a step count of 0 divided by zero after the
    compile, a negative `--max-steps` ran the whole fold)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def int_list(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """`2,6,14` -> [2, 6, 14], each once, in its order; a parser error for another text."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers, got {text!r}")
    return list(dict.fromkeys(values))


def run_main(main: Callable[[], None]) -> None:
    """Runs a benchmark's `main`: a `UserError` or a missing file met there (a store that does
    not exist, a config value the project's own code refuses) ends it as `focalnet` would: one
    line, `<script>: error: <message>`, exit status 2."""
    try:
        main()
    except (UserError, FileNotFoundError) as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)
