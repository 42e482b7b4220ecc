"""Every registered model: published parameter count, output shape, a replaceable head, and the
registry's errors. Parametrized over list_models() at collection time, so new families are picked
up by simply existing; shapes and counts come from jax.eval_shape (nothing is compiled)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models

KEY = jax.random.key(0, impl="rbg")
NAMES = models.list_models()
# Nets of 150 layers and more (the depth is in the name) take 3 to 30 s each to
# trace on a shared CPU.
SLOW = {n for n in NAMES if any(int(d) >= 150 for d in re.findall(r"\d+", n))}


def param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def abstract(model, input_shape, batch=2):
    """(output, variables) of model.init_with_output as ShapeDtypeStructs."""
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(
        lambda x: model.init_with_output({"params": KEY, "dropout": KEY}, x, train=False), x
    )


@functools.cache
def default_abstract(name):
    """abstract() of the registered default configuration, traced once per session."""
    return abstract(models.create(name), models.get_spec(name).input_shape)


def n_params(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))


def test_the_registry_is_populated():
    assert len(NAMES) >= 1 and NAMES == sorted(NAMES)
    assert all(name == name.lower() for name in NAMES)


@pytest.mark.parametrize("name", [param(n) for n in NAMES])
def test_spec_params_and_output_shape(name):
    spec = models.get_spec(name)
    assert spec.name == name and spec.source and spec.family
    assert len(spec.input_shape) == 3 and all(
        isinstance(d, int) and d > 0 for d in spec.input_shape
    )
    assert spec.num_classes >= 2 and 0.0 <= spec.params_rtol < 0.1
    assert spec.params_rtol == 0.0 or spec.reference_params is not None
    out, variables = default_abstract(name)
    assert out.shape == (2, spec.num_classes) and out.dtype == jnp.float32
    if spec.reference_params is not None:
        count = n_params(variables)
        assert abs(count - spec.reference_params) <= spec.params_rtol * spec.reference_params, (
            f"{name}: {count:,} parameters, reference {spec.reference_params:,} (rtol "
            f"{spec.params_rtol}; {spec.params_note})"
        )


def _one_per_family():
    """The first registered model of each family (the head test needs a trace per model)."""
    seen = {}
    for name in NAMES:
        if name not in SLOW:
            seen.setdefault(models.get_spec(name).family, name)
    return sorted(seen.values())


@pytest.mark.parametrize("name", _one_per_family())
def test_num_classes_changes_the_head(name):
    spec = models.get_spec(name)
    default = 7 if spec.num_classes != 7 else 9
    out, variables = abstract(models.create(name, num_classes=default), spec.input_shape)
    assert out.shape == (2, default)
    _, reference = default_abstract(name)
    # Only the classifier changes: some parameter leaves differ in their last axis, nothing else.
    a = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(variables["params"])
    }
    b = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(reference["params"])
    }
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k] != b[k]]
    assert changed and all(a[k][-1] == default and b[k][-1] == spec.num_classes for k in changed)


def test_unknown_names_raise_with_close_matches():
    name = NAMES[0]
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    for call in (models.create, models.get_spec):
        with pytest.raises(
            ValueError,
            match=rf"unknown model '{re.escape(typo)}'.*did you mean .*{re.escape(name)}",
        ):
            call(typo)
    with pytest.raises(ValueError, match="unknown model 'qqqqqqqq'") as info:
        models.create("qqqqqqqq")
    assert "did you mean" not in str(info.value)
    assert models.get_spec(name.upper()).name == name  # names are case-insensitive


def test_create_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"has no option\(s\) \['no_such_option'\]"):
        models.create(NAMES[0], no_such_option=1)


def test_list_models_pattern():
    assert models.list_models("*") == NAMES
    assert models.list_models("qqqq*") == []
    prefix = NAMES[0][:3]
    assert models.list_models(prefix + "*") == [n for n in NAMES if n.startswith(prefix)]
    with pytest.raises(TypeError, match="pattern must be a string"):
        models.list_models(5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None])
def test_create_rejects_a_bad_num_classes(bad):
    # Before: ZeroDivisionError (0) or a JAX shape TypeError (-3, '10') deep inside init.
    with pytest.raises(
        ValueError, match=r"num_classes must be a positive int .* got " + re.escape(repr(bad))
    ):
        models.create("lenet5", num_classes=bad)
    assert models.create("resnet20", num_classes=np.int64(7)).num_classes == 7
