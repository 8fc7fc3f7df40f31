"""The study spec: loading, validation and the training overrides of each cell.

A spec is an ml_collections file (`configs/studies/*.py`, `get_config(arg)`) with the fields
(docs/studies.md): `base` (a training config, `file.py[:arg]`), `store`, `repeats`, `folds` (None =
all), `num_folds`, `common` and `arms` (nested dicts mirroring the training config), `ensembles`
(name -> arm names); and optionally `seed` (the seed of repeat 0), `evaluate` (per-cell
evaluation options) and `slurm` (job array options). Any field is overridable with
`--spec.KEY=VALUE`, as `--config.KEY=VALUE` for a training config.

Seed rule: cell (arm, repeat r, fold k) trains with `config.seed = spec.seed + r`, the same for
every arm and fold, so arms of one repeat start from the same initialisation and data order
where their models have the same shape. The folds themselves come from `data.fold_seed` (or given
`data.splits`), which the base config or `common` sets, never an arm: every arm and repeat sees the
same patients in fold k. Paths that `common` or an arm set (`run.workdir.PATH_KEYS`) are recorded
absolute (`with_absolute_paths`).

`validate` checks everything that can be checked before a cell runs, one line per error: unknown
config keys and values (against the loaded base config: `common`'s on it alone, named as
`common`'s; each arm's with `common` applied exactly as its cells will apply them), repeats < 1,
a repeat's seed out of range, `evaluate` options `focalnet evaluate` would refuse,
folds outside num_folds, ensembles naming unknown arms, a store that does not exist or cannot be
opened (`data.store.open_store`: no cases.json, an old format), fewer patients in it than
num_folds, components an arm trains on that it lacks, names that cannot be folder names, and every
check of `run.RunSpec.from_config` on each arm's config (loss names and settings, the MFL rule of
`losses.check_mfl`, schedule, model).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections

from focalnet_jax.config_loading import (
    apply_overrides,
    config_file_arg,
    get_config_from_file,
    load_config,
    split_overrides,
)
from focalnet_jax.data.writer_folders import moved_aside_note
from focalnet_jax.errors import UserError, plural
from focalnet_jax.study.errors import StudyError
from focalnet_jax.study.slurm_options import check_slurm_options

SPEC_PREFIX = "--spec."
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder name and a ConfigDict key
RESERVED = ("report", "slurm", "compilation_cache")
# Set by the study for every cell; an arm or `common` setting them would break the design.
STUDY_KEYS = ("seed", "data.store", "data.fold", "data.num_folds")
FOLD_KEYS = ("data.fold_seed", "data.splits")  # the folds: `common` may set them, an arm not


def relative_to_cwd(path: str | Path) -> str:
    """`path` relative to the current folder where it lies inside it, else as given: shown in
    commands and reports without the machine's absolute paths. A `file.py:arg` keeps its arg."""
    file, colon, arg = str(path).partition(":")
    try:
        file = str(Path(file).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        pass
    return file + colon + arg


def defaults() -> ml_collections.ConfigDict:
    """The optional fields with their defaults (a spec file may leave them out)."""
    spec = ml_collections.ConfigDict()
    spec.seed = 0  # repeat r trains with seed + r
    spec.folds = None  # None = every fold of num_folds
    spec.common = {}
    spec.ensembles = {}
    spec.evaluate = {"picai_bootstraps": 0, "figures": False}
    spec.slurm = {
        "partition": "",
        "time": "",
        "gpus": 0,  # GPUs per task (--gpus-per-task)
        "cpus": 0,  # CPUs per task (0: the cluster's default)
        "throttle": 0,  # at most this many tasks at once (the array's %); 0: no limit
        "extra": (),  # further '#SBATCH' lines, e.g. ('--qos=short',)
    }
    return spec


_REQUIRED_FIELDS = ("base", "store", "repeats", "num_folds", "arms")


def load_spec(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a spec file (`file.py[:arg]`) over `defaults()` and apply `--spec.KEY=VALUE`."""
    try:
        loaded = get_config_from_file(path, kind="spec")
    except (FileNotFoundError, UserError) as error:
        # ConfigDict refuses a key with a dot, e.g. an arm '../x'
        dotted = re.search(r"the key (.+) contains one", str(error))
        if dotted is None:
            raise StudyError(str(error)) from None
        raise StudyError(
            f"spec {path}: name {dotted.group(1)!r}: expected letters, digits, '_', '-' (no dots)"
        ) from None
    spec = defaults()
    fields = sorted([*spec.keys(), *_REQUIRED_FIELDS])
    for key, value in loaded.items():
        if key not in fields:  # a misspelt field would silently keep its default
            raise StudyError(f"spec {path}: unknown field {key!r}; expected one of {fields}")
        if isinstance(value, ml_collections.ConfigDict) and key in ("evaluate", "slurm"):
            if unknown := sorted(set(value.keys()) - set(spec[key].keys())):
                raise StudyError(
                    f"spec {path}: unknown field(s) {[f'{key}.{k}' for k in unknown]}; "
                    f"{key} has {sorted(spec[key].keys())}"
                )
            for field, item in value.items():
                _set_field(spec[key], field, item, f"spec {path}: {key}.{field}")
        else:
            _set_field(spec, key, value, f"spec {path}: {key}")
    missing = [k for k in _REQUIRED_FIELDS if k not in spec]
    if missing:
        raise StudyError(f"spec {path}: missing field(s) {missing}")
    spec.lock()
    as_config = []
    try:
        pairs = split_overrides(overrides, SPEC_PREFIX)  # KEY=VALUE or KEY VALUE
    except ValueError as error:
        raise StudyError(str(error)) from None
    for key, value in pairs:
        if not _add_override_key(spec, f"{key}={value}"):
            as_config.append(f"--config.{key}={value}")
    try:
        apply_overrides(spec, as_config)
    except (KeyError, ValueError) as error:
        raise StudyError(error.args[0].replace("--config.", SPEC_PREFIX)) from None
    return spec


def _add_override_key(spec: ml_collections.ConfigDict, item: str) -> bool:
    """Set `KEY=VALUE` where KEY (`common.a.b` or `arms.<arm>.a.b`) is not in the spec yet:
    `common` and `arms` hold config overrides, so any key of the base config may be added there
    (checked against it by `validate`, as the spec file's own). VALUE is read as true/false/none
    (any case) or a Python literal, else kept as text. Returns False for every other item (a key
    the spec has, any other field), left to `apply_overrides`."""
    key, sep, text = item.partition("=")
    path = key.split(".")
    if not sep or path[0] not in ("common", "arms") or len(path) < 2 or not all(path):
        return False
    node = spec
    for name in path[:-1]:
        if name not in node:
            break
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            return False
    else:
        if path[-1] in node:
            return False
    words = {"true": True, "false": False, "none": None}  # as config_loading reads them
    try:
        value = words[text.lower()] if text.lower() in words else ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    with spec.unlocked():
        node = spec
        for name in path[:-1]:
            if name not in node:
                node[name] = ml_collections.ConfigDict()
            node = node[name]
        node[path[-1]] = value
    return True


def flatten(nested: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """`{'loss': {'name': 'ce'}}` -> `[('loss.name', 'ce')]` (depth first, insertion order)."""
    items = []
    for key, value in nested.items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def override_text(key: str, value) -> str:
    """`--config.KEY=VALUE` with VALUE as `config_loading` parses it back to `value`."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple):
        text = repr(tuple(value))
    else:
        text = repr(value)
    return f"--config.{key}={text}"


def _set_field(node: ml_collections.ConfigDict, key: str, value, where: str) -> None:
    """`node[key] = value`; a value of another type than the field's default (`seed = '1'`) is a
    `StudyError` naming `where` (ConfigDict raised a TypeError)."""
    try:
        node[key] = value
    except TypeError:
        wanted = f"{type(node[key]).__name__} (its default is {node[key]!r})"
        raise StudyError(f"{where}={value!r}: expected {wanted}") from None


def _plain(value):
    """ConfigDicts and tuples as JSON-ready dicts and lists."""
    if isinstance(value, ml_collections.ConfigDict | Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_name(kind: str, name: str) -> None:
    if not NAME.fullmatch(name) or name in RESERVED:
        raise StudyError(
            f"{kind} {name!r}: expected letters, digits, '_', '-' (not {list(RESERVED)})"
        )


def _check_case_distinct(names: Sequence[str]) -> None:
    """Arm and ensemble names are folder names: two that differ only in letter case would be one
    folder on a case-insensitive file system (macOS, Windows), their cells each other's."""
    seen: dict[str, str] = {}
    for name in names:
        if (other := seen.setdefault(name.casefold(), name)) != name:
            first, second = sorted((other, name))
            raise StudyError(
                f"{first!r} and {second!r}: names that differ only in letter case are one folder "
                "on a case-insensitive file system; rename one"
            )


def _check_overrides(where: str, items: list[tuple[str, object]], *, arm: bool) -> None:
    for key, _ in items:
        if key in STUDY_KEYS:
            raise StudyError(f"{where}: {key!r} is set by the study for each cell, not by an arm")
        if arm and key in FOLD_KEYS:
            raise StudyError(
                f"{where}: {key!r} chooses the folds, which every arm shares (fold k holds the "
                "same patients in every arm); set it in `common`"
            )


def _is_int(value) -> bool:
    """An int, not a bool (`folds=True` read as fold 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(plain: Mapping, slurm: bool = True) -> list[int]:
    """The fields of a spec (or of a recorded study) that need no file to check: counts, folds,
    names, seeds, the `common`, `evaluate` and `slurm` dicts and the SLURM options' types, with
    `slurm` their forms too (a recorded study's are checked where they are used: a spec may
    replace them);
    returns its folds as a list (None: every fold of num_folds). `StudyError` on the first
    problem."""
    if not _is_int(plain["repeats"]) or plain["repeats"] < 1:
        raise StudyError(f"repeats={plain['repeats']!r}: expected an integer >= 1")
    num_folds = plain["num_folds"]
    if not _is_int(num_folds) or num_folds < 2:
        raise StudyError(f"num_folds={num_folds!r}: expected an integer >= 2")
    folds = list(range(num_folds)) if plain["folds"] is None else plain["folds"]
    folds = [folds] if isinstance(folds, int) else folds
    listed = isinstance(folds, list | tuple) and folds
    if not listed or any(not _is_int(f) or not 0 <= f < num_folds for f in folds):
        raise StudyError(f"folds={plain['folds']!r}: expected folds in 0..{num_folds - 1}")
    if len(set(folds)) != len(folds):  # each cell twice, its fold counted twice in the report
        raise StudyError(f"folds={plain['folds']!r}: expected each fold once")
    for key in ("common", "evaluate", "slurm"):
        if not isinstance(plain[key], Mapping):
            raise StudyError(f"{key}={plain[key]!r}: expected a dict")
    if not isinstance(plain["arms"], Mapping) or not plain["arms"]:
        raise StudyError(f"arms={plain['arms']!r}: expected a dict of >= 1 arm: name -> overrides")
    for name, overrides in plain["arms"].items():
        _check_name("arm", name)
        if not isinstance(overrides, Mapping):
            raise StudyError(
                f"arm {name!r}: {overrides!r}: expected a nested dict of config overrides, "
                "e.g. {'loss': {'name': 'sigmoid_ce', 'mfl': False}}"
            )
    if not isinstance(plain["ensembles"], Mapping):
        raise StudyError(f"ensembles={plain['ensembles']!r}: expected a dict: name -> arm names")
    _check_ensembles(plain["ensembles"], list(plain["arms"]))
    _check_case_distinct([*plain["arms"], *plain["ensembles"]])
    check_slurm_options(plain["slurm"], forms=slurm)
    _check_evaluate(plain["evaluate"])
    _check_seeds(plain["seed"], plain["repeats"])
    return list(folds)


def validate(spec: ml_collections.ConfigDict, spec_file: str) -> dict:
    """The spec as a plain dict, checked (module docstring); `StudyError` on the first problem."""
    plain = _plain(spec)
    folds = check_fields(plain)
    if not plain["store"]:
        raise StudyError("the spec names no store: give --spec FILE:STORE or --spec.store=STORE")
    store = Path(plain["store"]).expanduser()
    if not store.is_dir():
        raise StudyError(
            f"store {plain['store']!r} does not exist (preprocessed store folder)"
            f"{moved_aside_note(store)}"
        )
    base = plain["base"]
    base_path, sep, base_arg = str(base).partition(":")
    if not Path(base_path).is_file():
        raise StudyError(f"base {base!r}: training config file does not exist")
    for key, field in (("fold", "folds"), ("store", "store")):
        if config_file_arg(str(base), key) is not None:  # each cell's train would refuse it
            raise StudyError(
                f"base {base!r}: its {key}= is for one run; the study sets data.{key} of each "
                f"cell (its {field!r} field): drop {key}= from base"
            )
    plain.update(
        base=str(Path(base_path).resolve()) + sep + base_arg,
        store=str(store.resolve()),
        folds=folds,
        spec_file=str(spec_file),
    )
    plain = with_absolute_paths(plain)
    _check_common(plain)
    opened = _open_store(plain)
    encodings = {
        arm: _check_arm(plain, arm, opened.components, tuple(opened.images.shape[1:3]))
        for arm in plain["arms"]
    }
    for name, members in plain["ensembles"].items():
        if len({encodings[m] == "binary" for m in members}) > 1:  # as `check_compatible`
            listed = "; ".join(f"{m}: {encodings[m]}" for m in members)
            raise StudyError(
                f"ensemble {name!r}: its arms disagree on output encodings ({listed}): a "
                "lesion-only model's score is no P(class >= k) of a graded one"
            )
    return plain


def with_absolute_paths(plain: Mapping) -> dict:
    """`plain` (a spec as a dict) with the paths `common` and the arms set for a run
    (`run.workdir.PATH_KEYS`: split files, pretrained weights) absolute, as training records
    them, so that a study resumed, or a cell started, from another folder reads the same files."""
    from focalnet_jax.run.workdir import PATH_KEYS, absolute_path  # JAX: as `_check_arm`

    def absolute(overrides: Mapping) -> dict:
        out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in overrides.items()}
        for key in PATH_KEYS:
            group, leaf = key.split(".")
            if isinstance(out.get(group), dict) and leaf in out[group]:
                out[group][leaf] = absolute_path(out[group][leaf])
        return out

    arms = {name: absolute(overrides) for name, overrides in plain["arms"].items()}
    return {**plain, "common": absolute(plain.get("common", {})), "arms": arms}


def _check_ensembles(ensembles: Mapping[str, Sequence[str]], arms: Sequence[str]) -> None:
    for name, members in ensembles.items():
        _check_name("ensemble", name)
        if name in arms:
            raise StudyError(f"ensemble {name!r}: an arm has that name")
        if not isinstance(members, list | tuple) or not all(isinstance(m, str) for m in members):
            raise StudyError(f"ensemble {name!r}: {members!r}: expected a list of arm names")
        unknown = [m for m in members if m not in arms]
        if unknown:
            raise StudyError(
                f"ensemble {name!r}: expected >= 2 of the arms {list(arms)}, got unknown {unknown}"
            )
        if len(members) < 2:
            raise StudyError(f"ensemble {name!r}: expected >= 2 arms, got {members}")
        if twice := next((m for i, m in enumerate(members) if m in members[:i]), None):
            # ('ce', 'ce') is arm ce itself, reported as an ensemble and compared with ce
            raise StudyError(f"ensemble {name!r}: arm {twice!r} is named twice, in {members}")


def _check_evaluate(options: Mapping) -> None:
    """The spec's `evaluate` options of the types `focalnet evaluate` takes: a bad one failed
    every cell once trained, and the study, recorded with it, could not be given another."""
    bootstraps = options.get("picai_bootstraps")
    if isinstance(bootstraps, bool) or not isinstance(bootstraps, int) or bootstraps < 0:
        raise StudyError(f"evaluate.picai_bootstraps={bootstraps!r}: expected an integer >= 0")
    if not isinstance(options.get("figures"), bool):
        raise StudyError(f"evaluate.figures={options.get('figures')!r}: expected True or False")


def _check_seeds(seed, repeats: int) -> None:
    """Every repeat's seed (`seed_for`) in the range a run takes, not only repeat 0's (the only
    one an arm's config is checked with): the last repeat's cells failed at their start."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - repeats:
        raise StudyError(
            f"seed={seed!r}: repeats 0..{repeats - 1} train with seeds seed..seed+{repeats - 1}, "
            "each expected in [0, 2**63)"
        )


def _config_error(where: str, plain: Mapping, error: Exception) -> StudyError:
    """The one-line error of overrides of `where` ('common', an arm) refused by the base config."""
    message = error.args[0] if error.args else str(error)
    return StudyError(f"{where} on base {str(plain['base']).partition(':')[0]}: {message}")


def _check_common(plain: Mapping) -> None:
    """`common` names keys of the base config with values of their types, checked on the base
    alone, so that a typo there is named against `common`, not against the first arm (the loss
    checks of `load_config` wait for each arm: they depend on its loss)."""
    items = flatten(plain["common"])
    _check_overrides("common", items, arm=False)
    try:
        _common_config(plain)
    except (KeyError, ValueError) as error:
        raise _config_error("common", plain, error) from None


def _check_arm(
    plain: Mapping, arm: str, store_components: Sequence[str], image_size: tuple[int, int]
) -> str:
    """The config of `arm` loads, passes every check a cell's `focalnet train` makes before it
    starts (`RunSpec.from_config` at the store's `image_size`), trains on components the store
    holds and names pretrained weights that exist (a cell would fail on them only once it
    starts); returns the arm's output encoding."""
    _check_overrides(f"arm {arm!r}", flatten(plain["arms"][arm]), arm=True)
    try:
        config = load_config(plain["base"], cell_overrides(plain, arm, 0, plain["folds"][0]))
    except (KeyError, ValueError, FileNotFoundError) as error:
        raise _config_error(f"arm {arm!r}", plain, error) from None
    from focalnet_jax.run import RunSpec  # JAX: only `study run` validates arms

    try:
        encoding = RunSpec.from_config(config, num_devices=1, image_size=image_size).output_encoding
    except UserError as error:
        raise StudyError(f"arm {arm!r}: {error}") from None
    missing = [c for c in config.data.components if c not in store_components]
    if missing:
        raise StudyError(
            f"arm {arm!r}: data.components {tuple(config.data.components)}: {missing} not in "
            f"store {plain['store']} (it holds {store_components})"
        )
    pretrained = config.model.pretrained
    if pretrained and not Path(pretrained).expanduser().is_file():
        from focalnet_jax.models.pretrained import no_such_weights_file

        missing = no_such_weights_file(pretrained)
        raise StudyError(f"arm {arm!r}: model.pretrained {pretrained}: {missing}")
    return encoding


def _open_store(plain: Mapping):
    """The spec's store, opened (`data.store.open_store`: a current, complete store), with at
    least one patient per fold of `num_folds`."""
    from focalnet_jax.data.store import open_store

    try:
        opened = open_store(plain["store"])
    except (FileNotFoundError, UserError) as error:
        raise StudyError(f"store {plain['store']!r}: {error}") from None
    patients = len(opened.patient_max_class())
    if patients < plain["num_folds"]:
        raise StudyError(
            f"num_folds={plain['num_folds']}: store {plain['store']} has only "
            f"{plural(patients, 'patient')}"
        )
    return opened


def seed_for(plain: Mapping, repeat: int) -> int:
    """The training seed of repeat `repeat` (module docstring)."""
    return int(plain["seed"]) + int(repeat)


def cell_overrides(plain: Mapping, arm: str, repeat: int, fold: int) -> list[str]:
    """The `--config.KEY=VALUE` list of cell (arm, repeat, fold): common, then the arm, then the
    study's own keys (store, folds, seed)."""
    items = flatten(plain["common"]) + flatten(plain["arms"][arm])
    items += [
        ("data.store", plain["store"]),
        ("data.num_folds", plain["num_folds"]),
        ("data.fold", fold),
        ("seed", seed_for(plain, repeat)),
    ]
    return [override_text(key, value) for key, value in items]


def evaluation_slices(plain: Mapping) -> str:
    """The slices of the paper's 2D protocol that every cell and ensemble of the study is
    evaluated on: `data.slices` of the base config with `common`. An arm's own `data.slices`
    changes what it trains on, not the slices the arms are compared on (`annotated` counts the FP
    rate over the lesion slices of the patients with a lesion, `all` over every slice and
    patient)."""
    return str(_common_config(plain).data.slices)


def _common_config(plain: Mapping) -> ml_collections.ConfigDict:
    """The base config with `common`'s overrides (no arm's)."""
    config = get_config_from_file(plain["base"])
    return apply_overrides(config, [override_text(k, v) for k, v in flatten(plain["common"])])


def arm_config(plain: Mapping, arm: str) -> ml_collections.ConfigDict:
    """The training config of `arm` (repeat 0, first fold), e.g. for reports."""
    return load_config(plain["base"], cell_overrides(plain, arm, 0, plain["folds"][0]))
