"""`--kinds a,b,...`: the benchmarks' choice of what to time, among the names a script knows.
Imported by the scripts beside it (the script directory is on `sys.path` when one runs)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


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
