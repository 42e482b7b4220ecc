"""Helpers shared by the model tests: abstract initialisation and NumPy-filled variables."""

import jax
import jax.numpy as jnp
import numpy as np

# RngBitGenerator keys: initialisers compile several times faster than with threefry on CPU.
KEY = jax.random.key(0, impl="rbg")


def abstract(model, input_shape, batch=2):
    """(logits, variables) as ShapeDtypeStructs: one trace, no compile."""
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(KEY, x, train=False), x)



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
            return jnp.asarray(rng.normal(1.0 if "scale" in name else 0.0, 0.3, a.shape), jnp.float32)
        return jnp.ones(a.shape, jnp.float32) if ("scale" in name or "var" in name) else jnp.zeros(a.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)
