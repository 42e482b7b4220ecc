"""Helpers shared by the model tests: abstract initialisation and NumPy-filled variables."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# RngBitGenerator keys: initialisers compile several times faster than with threefry on CPU.
KEY = jax.random.key(0, impl="rbg")


def abstract(model, input_shape, batch=2):
    """(logits, variables) as ShapeDtypeStructs: one trace, no compile."""
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)


def abstract_variables(model, shape, batch=2, train=False):
    """model.init's variables as ShapeDtypeStructs for a (batch, *shape) float32 input."""
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return jax.eval_shape(partial(model.init, train=train), KEY, x)


def abstract_apply(model, shape, batch=2, train=False, **kwargs):
    """Shapes of model.apply's outputs (and intermediates with capture_intermediates=True)."""
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    variables = jax.eval_shape(partial(model.init, train=False), KEY, x)
    return jax.eval_shape(
        partial(model.apply, train=train, rngs={"dropout": KEY}, **kwargs), variables, x
    )


def normal(seed, shape):
    """Standard-normal test data from NumPy (jax.random would compile a kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def n_params(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def numpy_variables(model, x_shape, seed=0, *, random_bn=False, init_args=None):
    """Variables of the model's structure filled by NumPy: no initialiser is compiled.

    Kernels ~ N(0, 2 / fan_out) (He); BN gamma 1, beta 0, mean 0, var 1, or random values
    (gamma, beta, mean ~ 1 / 0 / 0 + N(0, 0.3), var ~ U(0.5, 2)) with random_bn.
    """
    rng = np.random.default_rng(seed)
    args = init_args if init_args is not None else (jnp.zeros(x_shape),)
    kwargs = {} if init_args is not None else {"train": False}
    shapes = jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))

    def fill(path, a):
        name = str(path[-1])
        if "kernel" in name:
            fan_out = int(np.prod(a.shape[:-2])) * a.shape[-1] if len(a.shape) == 4 else a.shape[0]
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_out), a.shape), jnp.float32)
        if random_bn:
            if "var" in name:
                return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32)
            return jnp.asarray(
                rng.normal(1.0 if "scale" in name else 0.0, 0.3, a.shape), jnp.float32
            )
        return (
            jnp.ones(a.shape, jnp.float32)
            if ("scale" in name or "var" in name)
            else jnp.zeros(a.shape, jnp.float32)
        )

    return jax.tree_util.tree_map_with_path(fill, shapes)


def fan_in_variables(model, x, seed=0, **init_kwargs):
    """Variables of `model` filled from NumPy (He fan-in kernels, zero biases, unit BN scale and
    variance), skipping the slow-to-compile PRNG of `model.init`; structure
    and shapes are init's."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(partial(model.init, **init_kwargs), KEY, x)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
        return (
            jnp.ones(leaf.shape, leaf.dtype)
            if name in ("scale", "var")
            else jnp.zeros(leaf.shape, leaf.dtype)
        )

    return jax.tree_util.tree_map_with_path(fill, shapes)


def jittered_variables(model, *args, seed=0, **kwargs):
    """Variables of the model's structure filled from NumPy with every parameter non-trivial: He
    fan-in kernels, biases and BN betas ~ N(0, 0.1^2), BN gammas ~ 1 + N(0, 0.1^2); BN statistics
    mean 0, variance 1 (the initialisers are not under test; compiling them
    costs seconds per shape)."""
    abstract = jax.eval_shape(lambda *a: model.init(KEY, *a, **kwargs), *args)
    rng = np.random.default_rng(seed)

    def fill(path, a):
        leaf = jax.tree_util.keystr(path)
        if "batch_stats" in leaf:
            return jnp.zeros(a.shape) if "mean" in leaf else jnp.ones(a.shape)
        if "scale" in leaf:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(a.shape), jnp.float32)
        std = 0.1 if a.ndim == 1 else np.sqrt(2.0 / np.prod(a.shape[:-1]))
        return jnp.asarray(std * rng.standard_normal(a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)
