"""What a study's cells train on, recorded when the study is: digests of the base config (as
loaded, so that edits of the files it imports count) and of the store's case table.

The spec names both by path only. Edited between cells, they would give the cells that are done
and those still to run other recipes or data, and the study's comparisons would mix them without
a word; `check_inputs` refuses that before a cell starts (`study run`, and each cell itself, which
may start hours later from a queue). A study recorded before its inputs were is not checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from focalnet_jax.study.spec import StudyError

INPUTS = "inputs"  # the key of study.json holding the digests


def input_digests(plain: Mapping) -> dict[str, str]:
    """{'base_config': sha256 of the loaded base config, 'store_cases': sha256 of the store's
    cases.json} (hex) of a validated spec."""
    from focalnet_jax.config_loading import load_config

    config = load_config(plain["base"]).to_json_best_effort(sort_keys=True)
    cases = Path(plain["store"]).expanduser() / "cases.json"
    return {
        "base_config": hashlib.sha256(config.encode()).hexdigest(),
        "store_cases": hashlib.sha256(cases.read_bytes()).hexdigest(),
    }


def check_inputs(plain: Mapping, where: str | Path) -> None:
    """Raises a `StudyError` naming what changed when the base config or the store's cases
    differ from those recorded in `plain` (a study.json's contents)."""
    recorded = plain.get(INPUTS)
    if not recorded:
        return
    current = input_digests(plain)
    names = {
        "base_config": f"base config {plain['base']}",
        "store_cases": f"store {plain['store']}",
    }
    changed = [names[k] for k in names if recorded.get(k) != current[k]]
    if changed:
        raise StudyError(
            f"{where}: the study's {' and '.join(changed)} changed since the study was recorded; "
            "its cells would not share one recipe and data: restore it, or use a new --workdir"
        )
