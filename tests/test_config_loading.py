"""Config files and `--config.a.b=value` overrides (focalnet_jax/config_loading.py, configs/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from focalnet_jax.config_loading import apply_overrides, get_config_from_file, load_config
from focalnet_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py"))
CONTRACT_KEYS = (
    "seed",
    "data.store",
    "data.fold",
    "data.components",
    "train.steps",
    "train.batch_size",
    "train.log_every",
    "train.checkpoint_every",
)


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_has_contract_keys_and_a_recipe_docstring(name):
    config = load_config(str(CONFIGS / name))
    for key in CONTRACT_KEYS:
        _get(config, key)  # raises KeyError when absent
    source = (CONFIGS / name).read_text()
    docstring = source.split('"""')[1]
    assert "Expected runtime" in docstring and "Expected metric" in docstring, name
    if name != "default.py":
        assert "focalnet train --config configs/" + name.removesuffix(".py") in docstring


def test_paper_defaults_in_focalnet_config():
    config = load_config(str(CONFIGS / "focalnet.py"))
    assert (config.model.name, config.model.depth, config.model.output_stride) == (
        "deeplab",
        101,
        8,
    )
    assert (config.loss.name, config.loss.mfl, config.loss.mfl_weight) == (
        "ordinal_focal",
        True,
        "auto",
    )
    assert (config.train.epochs, config.train.batch_size, config.data.num_folds) == (200, 16, 5)
    optim = config.optim
    assert (optim.lr, optim.momentum, optim.weight_decay) == (1e-3, 0.9, 1e-4)
    assert (optim.decay_rate, optim.decay_steps) == (0.7, 2000)
    assert tuple(config.data.components) == ("t2w", "adc")


def test_overrides_convert_to_the_type_of_the_field():
    config = load_config(
        str(CONFIGS / "focalnet.py"),
        [
            "--config.train.steps=12",
            "--config.optim.lr=3e-4",
            "--config.loss.mfl=false",
            "--config.loss.mfl_mode",
            "select",
            "--config.data.components=t2w,adc,hbv",
            "--config.augment.scale_range=(0.8, 1.2)",
            "--config.loss.subsets=[('t2w',), ('adc', 'hbv')]",
            "--config.loss.mfl_weight=130.5",
        ],
    )
    assert config.train.steps == 12 and isinstance(config.train.steps, int)
    assert config.optim.lr == 3e-4
    assert config.loss.mfl is False
    assert config.loss.mfl_mode == "select"
    assert tuple(config.data.components) == ("t2w", "adc", "hbv")
    assert tuple(config.augment.scale_range) == (0.8, 1.2)
    assert [tuple(s) for s in config.loss.subsets] == [("t2w",), ("adc", "hbv")]
    assert config.loss.mfl_weight == "130.5"  # a str field; the trainer reads 'auto' or a number


def test_a_key_given_twice_takes_its_last_value():
    """As argparse and absl flags do: a launch script's defaults followed by `"$@"` are
    overridden by the user's (`launch/one_host.sh`, `launch/slurm_folds.sh`)."""
    config = load_config(
        str(CONFIGS / "focalnet.py"), ["--config.train.steps=12", "--config.train.steps", "7"]
    )
    assert config.train.steps == 7


def test_none_resets_a_list_field():
    # configs/picai.py sets two subsets; None asks for every non-empty proper subset again.
    config = load_config(str(CONFIGS / "picai.py"), ["--config.loss.subsets=None"])
    assert config.loss.subsets is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.stepz=3", "train.stepz"),
        ("--config.trian.steps=3", "trian"),
        ("--config.train=3", "group"),
        ("--config.train.steps=many", "integer"),
        ("--config.loss.mfl=maybe", "boolean"),
        ("--config.optim.lr=fast", "number"),
        ("--train.steps=3", "overrides look like"),
        ("--config.train.steps", "no value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises((KeyError, ValueError), match=message):
        load_config(str(CONFIGS / "focalnet.py"), [override])


def test_a_misspelt_loss_name_is_reported_as_unknown_not_as_an_mfl_mismatch():
    """The name was checked after MFL: `loss.name=bogus` on an MFL config said to switch MFL off."""
    from focalnet_jax.errors import UserError
    from focalnet_jax.run import RunSpec

    config = load_config(str(CONFIGS / "focalnet.py"), ["--config.loss.name=bogus"])
    with pytest.raises(UserError, match=r"^loss.name: unknown loss 'bogus'; expected one of"):
        RunSpec.from_config(config)


def test_config_args_select_variants_and_reject_unknown_names():
    ce = load_config(str(CONFIGS / "ablation_loss.py") + ":loss=ce,fold=3")
    assert (ce.loss.name, ce.loss.mfl, ce.data.fold) == ("sigmoid_ce", False, 3)
    basic = load_config(str(CONFIGS / "ablation_augment.py") + ":augment=basic")
    assert (basic.augment.flip, basic.augment.intensity) == (True, False)
    picai = load_config(str(CONFIGS / "picai.py") + ":fold=2,runlocal")
    assert tuple(picai.data.components) == ("t2w", "adc", "hbv") and picai.model.depth == 18
    with pytest.raises(ValueError, match="'folds' unknown"):
        load_config(str(CONFIGS / "picai.py") + ":folds=2")
    assert load_config(str(CONFIGS / "picai.py") + ":runlocal=false").model.depth == 101
    # A misspelt boolean is refused, not read as false (a full-size run for a smoke run).
    with pytest.raises(ValueError, match="runlocal='ture': expected true or false"):
        load_config(str(CONFIGS / "picai.py") + ":runlocal=ture")
    with pytest.raises(ValueError, match="loss='dice'"):
        load_config(str(CONFIGS / "ablation_loss.py") + ":loss=dice")
    # A bare word is a flag's only: `:fold` set data.fold = True, which trained fold 1.
    for name in ("focalnet.py", "demo.py", "picai.py"):
        with pytest.raises(ValueError, match=r"config arg 'fold' needs a value \(fold=\.\.\.\)"):
            load_config(str(CONFIGS / name) + ":fold")
    with pytest.raises(ValueError, match=r"config arg 'store' needs a value"):
        load_config(str(CONFIGS / "picai.py") + ":store")
    # A name given twice trained the last; `train --fold` compared with the first.
    twice = r"get_config\('fold=1,fold=2'\): config arg 'fold' given twice$"
    with pytest.raises(ValueError, match=twice):
        load_config(str(CONFIGS / "demo.py") + ":fold=1,fold=2")
    # A store path holding a comma split the args: "config arg 'x' unknown" and no more.
    with pytest.raises(ValueError, match=r"config arg 'b' unknown; expected one of \['fold', "
                                         r"'store'\]; a store path holding a comma is given as "
                                         r"--config.data.store=PATH$"):  # fmt: skip
        load_config(str(CONFIGS / "demo.py") + ":store=/data/a, b")
    with pytest.raises(ValueError, match=r"config arg 'b' unknown; .*--config.data.store=PATH$"):
        load_config(str(CONFIGS / "demo.py") + ":store=/data/a,b=c")


def test_a_list_in_brackets_without_quotes_is_a_comma_separated_list():
    """`--config.data.components=(t2w,adc)` gave the components '(t2w' and 'adc)'."""
    for text in ("(t2w,adc)", "[t2w, adc]", "('t2w', 'adc')", "t2w,adc"):
        config = load_config(str(CONFIGS / "demo.py"), [f"--config.data.components={text}"])
        assert tuple(config.data.components) == ("t2w", "adc"), text


def test_missing_file_and_a_field_added_on_purpose(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(str(tmp_path / "nope.py"))
    config = get_config_from_file(str(CONFIGS / "demo.py"))
    with config.unlocked():  # locked by configs/default.py
        config.new_field = 1
    apply_overrides(config, ["--config.new_field=2"])
    assert config.new_field == 2


def test_each_config_imports_the_default_of_its_own_folder(tmp_path):
    """Two config folders, each with its own `default.py`: the second load got the first
    folder's `default` (cached by the import system), and an edited `default.py` was not read
    again in the same process."""
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "default.py").write_text(
            "import ml_collections\n\n\ndef get_config():\n"
            f"    return ml_collections.ConfigDict({{'origin': {name!r}}})\n"
        )
        (folder / "exp.py").write_text(
            "import default\n\n\ndef get_config():\n    return default.get_config()\n"
        )
    assert get_config_from_file(str(tmp_path / "a" / "exp.py")).origin == "a"
    assert get_config_from_file(str(tmp_path / "b" / "exp.py")).origin == "b"
    (tmp_path / "a" / "default.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'origin': 'a, edited'})\n"
    )
    assert get_config_from_file(str(tmp_path / "a" / "exp.py")).origin == "a, edited"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("config.train.stpes = 5", 'Key "stpes" does not exist and cannot be added since the '
         'config is locked. Did you mean "steps" instead of "stpes"?'),
        ("config.train.zzz = 5", 'Key "zzz" does not exist and cannot be added since the config '
         "is locked."),
        # A value of the wrong type, or an error met computing one, gave no line.
        ("config.train.steps = '5'", "Could not override field 'steps' (reference). 5 is of "
         "original type <class 'str'> and cannot be casted to type <class 'int'>"),
        ("config.train.steps = int('5k')", "invalid literal for int() with base 10: '5k'"),
    ],
)  # fmt: skip
def test_a_key_the_defaults_lack_is_an_error_at_its_line(tmp_path, line, reason):
    """`default.get_config()` came unlocked: a misspelled key set in an experiment file was a
    new field that nothing read, and the run trained with the default. The error is one line
    naming the file and line; a field added on purpose goes inside `config.unlocked()`."""
    path = tmp_path / "exp.py"
    head = f"import sys\n\nsys.path.insert(0, {str(CONFIGS)!r})\nimport default\n\n\n"
    body = "def get_config():\n    config = default.get_config()\n    {}\n    return config\n"
    path.write_text(head + body.format(line))
    with pytest.raises(UserError) as error:
        get_config_from_file(str(path))
    kind = "ValueError" if "int()" in reason else "TypeError" if "field" in reason else ""
    kind = kind or "AttributeError"
    assert str(error.value) == f"config file {path}: get_config(): {kind} at {path}:9: {reason}"
    if kind == "AttributeError":
        path.write_text(head + body.format(f"with config.unlocked():\n        {line}"))
        assert get_config_from_file(str(path)).train.get("stpes", 5) == 5
