"""The worked examples in the loss docstrings (focalnet_jax/losses/*) hold: each is a hand
computation (e.g. p = 0.5 everywhere) that the code must reproduce."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("checks", "label_stats", "mfl", "pixel", "reductions", "registry")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"focalnet_jax.losses.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert name == "checks" or result.attempted > 0
