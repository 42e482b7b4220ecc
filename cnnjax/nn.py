"""Thin Flax linen modules over `cnnjax.functional`.

Each module owns its parameters (and, for BatchNorm, its `batch_stats`) and calls the pure
function for the arithmetic. Train mode is explicit: BatchNorm takes `use_running_average`, Dropout
takes `deterministic`; nothing is inferred from which collections are mutable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import merge_param

from cnnjax import _checks as C
from cnnjax import functional as F

Array = jax.Array
Initializer = Callable[..., Array]
Dtype = Any

# He et al. 2015 as used by the ResNet paper (and torchvision): N(0, 2 / (k*k*C_out)).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
he_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

INITIALIZERS: dict[str, Initializer] = {
    "he_normal_fan_out": he_normal_fan_out,
    "he_normal_fan_in": he_normal_fan_in,
    "he_uniform": nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
    "lecun_normal": nn.initializers.lecun_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "glorot_normal": nn.initializers.glorot_normal(),
    # PyTorch's default for Conv2d and Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    "torch_default": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    "normal_0.01": nn.initializers.normal(0.01),
    "zeros": nn.initializers.zeros,
    "ones": nn.initializers.ones,
}


def get_initializer(init: str | Initializer) -> Initializer:
    """Returns the initializer for a name in INITIALIZERS, or the callable itself."""
    if callable(init):
        return init
    try:
        return INITIALIZERS[init]
    except KeyError:
        raise ValueError(
            f"unknown initializer {init!r}; choose one of {sorted(INITIALIZERS)} or pass a callable"
        ) from None


class Conv(nn.Module):
    """2-D convolution (cross-correlation) on NHWC inputs with an HWIO kernel.

    Args:
      features: output channels.
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw).
      padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
      dilation: int or (dh, dw).
      groups: feature groups (groups == in == out channels is depthwise).
      use_bias: add a learnable per-channel bias.
      kernel_init: initializer or its name in INITIALIZERS; He fan-out by default (ResNet paper).
      bias_init: initializer for the bias.
      dtype: compute dtype (None: the input's); parameters are kept in param_dtype.
      param_dtype: parameter dtype.
      precision: `lax` precision of the convolution.
    """

    features: int
    kernel_size: F.IntPair = 3
    strides: F.IntPair = 1
    padding: F.Padding = 0
    dilation: F.IntPair = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: str | Initializer = "he_normal_fan_out"
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4:
            raise ValueError(
                f"{self.name or 'Conv'}: x must be NHWC (rank 4), got shape {tuple(x.shape)}"
            )
        where = self.name or "Conv"
        features = C.positive_int(self.features, f"{where}: features")
        groups = C.positive_int(self.groups, f"{where}: groups")
        c_in = x.shape[-1]
        if c_in % groups or features % groups:
            raise ValueError(
                f"{where}: groups={groups} must divide both the input channels "
                f"{c_in} and features={features}"
            )
        kh, kw = C.pair(self.kernel_size, "kernel_size")
        kernel = self.param(
            "kernel",
            get_initializer(self.kernel_init),
            (kh, kw, c_in // groups, features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        dtype = F.compute_dtype(x, self.dtype)
        return F.conv2d(
            x.astype(dtype),
            kernel.astype(dtype),
            None if bias is None else bias.astype(dtype),
            stride=self.strides,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            precision=self.precision,
        )


class Dense(nn.Module):
    """Fully connected layer on the last axis.

    Args:
      features: output features.
      use_bias: add a learnable bias.
      kernel_init: initializer or its name in INITIALIZERS (LeCun normal by default).
      bias_init: initializer for the bias.
      dtype: compute dtype (None: the input's).
      param_dtype: parameter dtype.
    """

    features: int
    use_bias: bool = True
    kernel_init: str | Initializer = "lecun_normal"
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 1:
            raise ValueError(f"{self.name or 'Dense'}: x must have a feature axis, got a scalar")
        features = C.positive_int(self.features, f"{self.name or 'Dense'}: features")
        kernel = self.param(
            "kernel", get_initializer(self.kernel_init), (x.shape[-1], features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        dtype = F.compute_dtype(x, self.dtype)
        return F.dense(
            x.astype(dtype),
            kernel.astype(dtype),
            None if bias is None else bias.astype(dtype),
            precision=self.precision,
        )


class BatchNorm(nn.Module):
    """Batch normalisation with running averages in the `batch_stats` collection.

    Args:
      use_running_average: False in training (batch statistics, running averages updated),
        True at test time; may instead be given at call time.
      momentum: running = momentum * running + (1 - momentum) * batch (0.9 = PyTorch's 0.1).
      epsilon: added to the variance.
      axis_name: mapped axis (e.g. 'batch') over which batch statistics are averaged.
      use_scale, use_bias: learnable gamma and beta.
      scale_init, bias_init: their initializers (zeros for scale gives "zero-init residual").
      dtype: output dtype (None: the input's); statistics are always float32.

    Called as `bn(x, residual=r, activation=act)` it returns act(BN(x) + r), which on the CPU the
    native kernels compute in the same passes as the normalisation (`F.batch_norm`).
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        residual: Array | None = None,
        activation=None,
    ) -> Array:
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        where = self.name or "BatchNorm"
        C.check_bn_rank(x, f"{where}: ")  # before the statistics' shapes are taken from x
        C.check_eps(self.epsilon, f"{where}: epsilon")
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), jnp.float32) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (c,), jnp.float32) if self.use_bias else None
        initializing = self.is_initializing()
        dtype = F.compute_dtype(x, self.dtype)
        y, (mean, var) = F.batch_norm(
            x.astype(dtype),
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            train=not use_running_average,
            momentum=self.momentum,
            eps=self.epsilon,
            # No mapped axis exists while initialising outside pmap/shard_map.
            axis_name=None if initializing else self.axis_name,
            residual=None if residual is None else residual.astype(dtype),
            activation=activation,
        )
        if not use_running_average and not initializing:
            ra_mean.value, ra_var.value = mean, var
        return y


def batch_norm_for(model: nn.Module, train: bool) -> Callable[..., BatchNorm]:
    """`BatchNorm` configured from a network's fields: running averages unless `train`, and the
    network's `bn_momentum`, `bn_epsilon` (where it has one), `bn_axis_name` and `dtype`. The
    networks build every BatchNorm layer through it: `norm = batch_norm_for(self, train)`."""
    kwargs = dict(
        use_running_average=not train,
        momentum=model.bn_momentum,
        axis_name=model.bn_axis_name,
        dtype=model.dtype,
    )
    if hasattr(model, "bn_epsilon"):
        kwargs["epsilon"] = model.bn_epsilon
    return functools.partial(BatchNorm, **kwargs)


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels (AlexNet, section 3.3).

    Args:
      size: channels in the window (n).
      alpha, beta, k: the paper's constants (1e-4, 0.75, 2).
      alpha_over_n: divide alpha by n as PyTorch and Caffe do; the paper does not.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    alpha_over_n: bool = False

    def __call__(self, x: Array) -> Array:
        return F.local_response_norm(
            x, self.size, self.alpha, self.beta, self.k, alpha_over_n=self.alpha_over_n
        )


class Dropout(nn.Module):
    """Inverted dropout drawing from the 'dropout' rng; `deterministic=True` is the identity."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        deterministic = merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return F.dropout(x, self.rate, None, deterministic=True)
        return F.dropout(x, self.rate, self.make_rng("dropout"), deterministic=False)


class MaxPool(nn.Module):
    """Max pooling; strides default to the window."""

    window: F.IntPair
    strides: F.IntPair | None = None
    padding: F.Padding = 0
    ceil_mode: bool = False

    def __call__(self, x: Array) -> Array:
        return F.max_pool(x, self.window, self.strides, self.padding, ceil_mode=self.ceil_mode)


class AvgPool(nn.Module):
    """Average pooling; strides default to the window."""

    window: F.IntPair
    strides: F.IntPair | None = None
    padding: F.Padding = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def __call__(self, x: Array) -> Array:
        return F.avg_pool(
            x,
            self.window,
            self.strides,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
        )


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes."""

    keepdims: bool = False

    def __call__(self, x: Array) -> Array:
        return F.global_avg_pool(x, keepdims=self.keepdims)


class Flatten(nn.Module):
    """Flattens all but the batch axis."""

    def __call__(self, x: Array) -> Array:
        return F.flatten(x)
