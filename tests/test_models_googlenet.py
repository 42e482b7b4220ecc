"""GoogLeNet (paper, naive modules, torchvision conventions), the Inception module, BN-Inception.

Shapes and counts via `jax.eval_shape`; real passes only on single modules (whole networks are
marked slow: their compilation takes tens of seconds on a CPU).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import functional as F
from cnnjax.functional import adaptive_avg_pool
from cnnjax.models import create, get_spec
from cnnjax.models.googlenet import GOOGLENET_MODULES, BNInceptionModule, InceptionModule
from cnnjax.nn import BatchNorm, Conv

from model_testing import (
    KEY,
    abstract_apply,
    abstract_variables,
    fan_in_variables,
    n_params,
    normal,
)


def intermediate_shapes(model, shape):
    _, state = abstract_apply(model, shape, capture_intermediates=True, mutable=["intermediates"])
    return {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k != "__call__"}


# ------------------------------------------------------------------------ Table 1, from definitions


def conv_weights(k, c_in, c_out):
    return k * k * c_in * c_out


def inception_weights(c_in, b1, r3, b3, r5, b5, proj, naive=False, k5=5):
    """Weights (no biases) of one Inception module, written from Figure 2."""
    if naive:
        return conv_weights(1, c_in, b1) + conv_weights(3, c_in, b3) + conv_weights(k5, c_in, b5)
    return (
        conv_weights(1, c_in, b1)
        + conv_weights(1, c_in, r3)
        + conv_weights(3, r3, b3)
        + conv_weights(1, c_in, r5)
        + conv_weights(k5, r5, b5)
        + conv_weights(1, c_in, proj)
    )


def inception_out(c_in, b1, r3, b3, r5, b5, proj, naive=False):
    return b1 + b3 + b5 + (c_in if naive else proj)


# Table 1 of Szegedy et al. 2014: output side, output depth, 'params' (K) and 'ops' (M) columns.
TABLE1 = {
    "conv1": (112, 64, 2.7, 34),
    "pool1": (56, 64, None, None),
    "conv2": (56, 192, 112, 360),
    "pool2": (28, 192, None, None),
    "inception3a": (28, 256, 159, 128),
    "inception3b": (28, 480, 380, 304),
    "pool3": (14, 480, None, None),
    "inception4a": (14, 512, 364, 73),
    "inception4b": (14, 512, 437, 88),
    "inception4c": (14, 512, 463, 100),
    "inception4d": (14, 528, 580, 119),
    "inception4e": (14, 832, 840, 170),
    "pool4": (7, 832, None, None),
    "inception5a": (7, 832, 1072, 54),
    "inception5b": (7, 1024, 1388, 71),
    "fc": (1, 1000, 1000, 1),
}
# Rows whose printed numbers disagree with their own layer definitions: conv1 (7x7x3x64 = 9.2K
# weights, not 2.7K), 4c (the params column; its 100M ops do match 497.5K x 14 x 14) and 5a
# (1072K and 54M, for 1018K and 51M). The params column counts weights only, in units of 1024.
PARAMS_ERRATA = {"conv1", "inception4c", "inception5a"}
OPS_ERRATA = {"conv1", "inception5a"}


def table1_weights() -> dict[str, int]:
    w = {
        "conv1": conv_weights(7, 3, 64),
        "conv2": conv_weights(1, 64, 64) + conv_weights(3, 64, 192),
    }
    c = 192
    for key, row in GOOGLENET_MODULES.items():
        w[f"inception{key}"] = inception_weights(c, *row)
        c = inception_out(c, *row)
    w["fc"] = 1024 * 1000
    return w


@pytest.mark.parametrize(
    "name", ["googlenet", "googlenet_naive", "googlenet_torchvision", "bn_inception"]
)
def test_output_shape_and_dtype(name):
    spec = get_spec(name)
    assert spec.input_shape == (224, 224, 3) and spec.num_classes == 1000
    hash(create(name))
    for dtype in (None, jnp.bfloat16):
        out = abstract_apply(create(name, num_classes=7, dtype=dtype), spec.input_shape)
        assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_googlenet_maps_follow_table_1():
    shapes = intermediate_shapes(create("googlenet"), (224, 224, 3))
    for row, (side, depth, _, _) in TABLE1.items():
        want = (2, depth) if row == "fc" else (2, side, side, depth)
        assert shapes[row] == want, row
    assert shapes["avgpool"] == (2, 1024)
    # The LRNs of the stem (Figure 3) are there.
    assert shapes["norm1"] == (2, 56, 56, 64) and shapes["norm2"] == (2, 56, 56, 192)


def test_googlenet_params_per_row_match_table_1_within_its_rounding():
    params = abstract_variables(create("googlenet"), (224, 224, 3))["params"]
    weights = table1_weights()
    # The implementation holds exactly the weights of Table 1's widths (plus one bias per filter).
    for row, w in weights.items():
        if row == "conv2":
            got = params["conv2_reduce"]["kernel"].size + params["conv2"]["kernel"].size
        elif row.startswith("inception"):
            got = sum(v["kernel"].size for v in params[row].values())
        else:
            got = params[row]["kernel"].size
        assert got == w, row
    for row, w in weights.items():
        side, _, table_k, table_m = TABLE1[row]
        if row not in PARAMS_ERRATA:
            assert abs(w / 1024 - table_k) <= 0.02 * table_k, (row, w / 1024, table_k)
        if row not in OPS_ERRATA and row != "fc":
            assert abs(w * side * side / 1e6 - table_m) <= 0.01 * table_m, (
                row,
                w * side * side / 1e6,
                table_m,
            )
    # The rows the lecture quotes.
    assert round(weights["inception3a"] / 1024) == 160 and int(weights["inception3a"] / 1024) == 159
    assert weights["inception3b"] == 388_096  # "388K" decimal, Table 1's 380K (379.0 x 1024)
    assert weights["inception5b"] == 1_442_816  # Table 1: 1388K (1409 x 1024 here, 1.5% off)


def test_googlenet_total_matches_the_sum_of_table_1():
    params = abstract_variables(create("googlenet"), (224, 224, 3))["params"]
    weights = table1_weights()
    table_sum_k = sum(k for _, _, k, _ in TABLE1.values() if k is not None)
    assert table_sum_k == pytest.approx(6797.7)  # the paper's "about 6.8M"
    assert abs(sum(weights.values()) / 1024 - table_sum_k) <= 0.01 * table_sum_k
    biases = 64 + 64 + 192 + sum(sum(row) for row in GOOGLENET_MODULES.values()) + 1000
    assert n_params(params) == sum(weights.values()) + biases == 6_998_552
    spec = get_spec("googlenet")
    assert abs(n_params(params) - spec.reference_params) <= spec.params_rtol * spec.reference_params


def test_googlenet_5x5_branch_is_really_5x5():
    p = abstract_variables(create("googlenet"), (224, 224, 3))["params"]
    assert p["inception3a"]["branch5x5"]["kernel"].shape == (5, 5, 16, 32)
    assert p["inception5b"]["branch5x5"]["kernel"].shape == (5, 5, 48, 128)
    p = abstract_variables(create("googlenet_torchvision"), (224, 224, 3))["params"]
    assert p["inception3a"]["branch5x5"]["kernel"].shape == (3, 3, 16, 32)


def test_googlenet_torchvision_conventions_give_its_exact_counts():
    variables = abstract_variables(create("googlenet_torchvision"), (224, 224, 3))
    assert n_params(variables["params"]) == 6_624_904  # torchvision googlenet, aux_logits=False
    assert "bias" not in variables["params"]["conv1"] and "conv1_bn" in variables["params"]
    variables = abstract_variables(create("googlenet_torchvision", aux_logits=True), (224, 224, 3))
    assert n_params(variables["params"]) == 13_004_888  # with its two auxiliary classifiers
    shapes = intermediate_shapes(create("googlenet_torchvision"), (224, 224, 3))
    assert "norm1" not in shapes and shapes["pool4"] == (2, 7, 7, 832)


def test_googlenet_naive_count_from_definition():
    weights, biases, c = (
        conv_weights(7, 3, 64) + conv_weights(1, 64, 64) + conv_weights(3, 64, 192),
        320,
        192,
    )
    for row in GOOGLENET_MODULES.values():
        weights += inception_weights(c, *row, naive=True)
        biases += row[0] + row[2] + row[4]
        c = inception_out(c, *row, naive=True)
    assert c == 4944
    weights, biases = weights + c * 1000, biases + 1000
    params = abstract_variables(create("googlenet_naive"), (224, 224, 3))["params"]
    assert n_params(params) == weights + biases
    assert n_params(params) > 13 * 6_998_552  # why the paper reduces dimensions first


def test_aux_heads_only_in_training():
    model = create("googlenet", aux_logits=True, num_classes=11)
    # init with train=False still creates the heads, so a later training step finds them.
    params = abstract_variables(model, (224, 224, 3))["params"]
    aux_in = {"aux1": 512, "aux2": 528}  # outputs of 4a and 4d
    for head, c in aux_in.items():
        assert params[head]["conv"]["kernel"].shape == (1, 1, c, 128)
        assert params[head]["fc1"]["kernel"].shape == (
            4 * 4 * 128,
            1024,
        )  # 14x14 -> 4x4 by 5x5/3 avg pool
        assert params[head]["fc2"]["kernel"].shape == (1024, 11)
    aux_params = sum(n_params(params[h]) for h in aux_in)
    assert aux_params == sum(
        c * 128 + 128 + 2048 * 1024 + 1024 + 1024 * 11 + 11 for c in aux_in.values()
    )
    logits, aux = abstract_apply(model, (224, 224, 3), train=True)
    assert logits.shape == (2, 11) and [a.shape for a in aux] == [(2, 11), (2, 11)]
    assert all(a.dtype == jnp.float32 for a in aux)
    assert abstract_apply(model, (224, 224, 3), train=False).shape == (2, 11)
    plain = create("googlenet", num_classes=11)
    assert abstract_apply(plain, (224, 224, 3), train=True).shape == (2, 11)
    assert not {"aux1", "aux2"} & set(abstract_variables(plain, (224, 224, 3))["params"])


def test_googlenet_input_validation():
    model = create("googlenet", num_classes=5)
    assert model.min_input_size() == 47 and model.min_input_size(with_aux=True) == 79
    assert abstract_apply(model, (47, 47, 3)).shape == (2, 5)
    with pytest.raises(ValueError, match="at least 47x47"):
        abstract_apply(model, (46, 60, 3))
    with pytest.raises(ValueError, match="expects 3 input channel"):
        abstract_apply(model, (224, 224, 1))
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(
            partial(model.init, train=False), KEY, jax.ShapeDtypeStruct((224, 224, 3), jnp.float32)
        )
    aux = create("googlenet", aux_logits=True, num_classes=5)
    with pytest.raises(ValueError, match="at least 79x79.*aux_logits=False"):
        abstract_apply(aux, (78, 78, 3))
    assert abstract_apply(aux, (79, 79, 3), train=True)[0].shape == (2, 5)
    with pytest.raises(ValueError, match="inception_block"):
        abstract_apply(create("googlenet", inception_block="fancy"), (224, 224, 3))


def test_adaptive_avg_pool_takes_torchvisions_windows():
    # PyTorch's adaptive_avg_pool2d: bin i of n rows spans floor(i n / 4) to ceil((i + 1) n / 4).
    x = normal(3, (2, 14, 9, 5))
    rows, cols = [(0, 4), (3, 7), (7, 11), (10, 14)], [(0, 3), (2, 5), (4, 7), (6, 9)]
    want = np.stack(
        [np.stack([np.asarray(x)[:, a:b, c:d].mean((1, 2)) for c, d in cols], 1) for a, b in rows],
        1,
    )
    np.testing.assert_allclose(adaptive_avg_pool(x, 4), want, rtol=1e-6, atol=1e-7)
    # On 4a's 14x14 map these are not the paper's 5x5/3 windows; where 4 divides the side, they
    # are the plain 4x4/4 average pool.
    assert not np.allclose(adaptive_avg_pool(x[:, :, :5], 4)[:, :, 0], F.avg_pool(x, 5, 3)[:, :, 0])
    y = normal(4, (2, 16, 12, 3))
    np.testing.assert_allclose(adaptive_avg_pool(y, 4), F.avg_pool(y, (4, 3), (4, 3)), atol=1e-6)


def test_googlenet_torchvision_aux_pool_and_transform_input():
    model = create("googlenet_torchvision", aux_logits=True, num_classes=5)
    assert model.transform_input and model.aux_pool == "adaptive"
    # torchvision's aux heads pool to 4x4 whatever the map: they need no larger input.
    assert model.min_input_size() == model.min_input_size(with_aux=True) == 31
    (logits, aux), _ = abstract_apply(model, (31, 31, 3), train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 5) and [a.shape for a in aux] == [(2, 5), (2, 5)]
    with pytest.raises(ValueError, match="at least 31x31") as e:
        abstract_apply(model, (30, 30, 3), train=True, mutable=["batch_stats"])
    assert "aux_logits" not in str(e.value)
    assert not create("googlenet").transform_input and create("googlenet").aux_pool == "5x5/3"
    with pytest.raises(ValueError, match="aux_pool must be one of"):
        abstract_apply(create("googlenet", aux_pool="max"), (224, 224, 3))
    with pytest.raises(ValueError, match="transform_input re-normalises RGB"):
        abstract_apply(create("googlenet_torchvision", in_channels=1), (224, 224, 1))


# ----------------------------------------------------------------------------- the lecture's module


def test_lecture_module_naive_vs_reduced():
    """28x28x256 input, 128 1x1, 192 3x3, 96 5x5 and a 3x3 pool; reductions of
    64 in the reduced one."""
    x = jax.ShapeDtypeStruct((1, 28, 28, 256), jnp.float32)
    naive = InceptionModule(b1x1=128, b3x3=192, b5x5=96, block="naive")
    reduced = InceptionModule(128, 64, 192, 64, 96, 64)
    results = {}
    for name, module in (("naive", naive), ("reduced", reduced)):
        variables = jax.eval_shape(module.init, KEY, x)
        out = jax.eval_shape(module.apply, variables, x)
        kernels = [v["kernel"].shape for v in variables["params"].values()]
        # Stride-1 'same' convolutions: multiply-adds = output pixels x kernel size.
        macs = sum(28 * 28 * int(np.prod(k)) for k in kernels)
        results[name] = (out.shape, n_params(variables["params"]), macs)
    assert results["naive"] == (
        (1, 28, 28, 128 + 192 + 96 + 256),
        1_089_952,
        854_196_224,
    )  # the lecture's 854M
    # 28x28 x (64x256 + 64x256 + 128x256 + 192x3x3x64 + 96x5x5x64 + 64x256)
    assert results["reduced"] == ((1, 28, 28, 480), 346_720, 271_351_808)


def test_naive_module_passes_the_pooled_input_through():
    x = normal(1, (2, 6, 6, 8))
    module = InceptionModule(b1x1=4, b3x3=5, b5x5=3, block="naive")
    y = jax.jit(module.apply)(fan_in_variables(module, x), x)
    assert y.shape == (2, 6, 6, 4 + 5 + 3 + 8)
    np.testing.assert_array_equal(np.asarray(y[..., 12:]), np.asarray(F.max_pool(x, 3, 1, 1)))
    with pytest.raises(ValueError, match="positive filter counts"):
        InceptionModule(b1x1=4, b3x3=5, b5x5=3).init(KEY, x)  # reduced needs its reductions


def test_inception_module_forward_backward():
    x = normal(2, (2, 5, 5, 6))
    module = InceptionModule(4, 3, 5, 2, 3, 2)
    variables = fan_in_variables(module, x)
    y = jax.jit(module.apply)(variables, x)
    # Differentiate with respect to the input too: its gradient flows back through the max pool.
    loss, grads = jax.jit(
        jax.value_and_grad(
            lambda p, x: jnp.sum(module.apply({"params": p}, x) ** 2), argnums=(0, 1)
        )
    )(variables["params"], x)
    assert y.shape == (2, 5, 5, 4 + 5 + 3 + 2) and np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0, path


# ----------------------------------------------------------------------------- BN-Inception


def test_bn_inception_count_and_maps():
    model = create("bn_inception")
    variables = abstract_variables(model, (224, 224, 3))
    assert n_params(variables["params"]) == 11_295_240  # the common Caffe-derived port
    convs = [
        path
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel" and path[-2].key != "fc"
    ]
    bns = jax.tree.leaves(variables["batch_stats"])
    assert len(bns) == 2 * len(convs)  # a BatchNorm (mean, var) after every convolution
    shapes = intermediate_shapes(model, (224, 224, 3))
    want = {
        "pool2": (28, 192),
        "inception3a": (28, 256),
        "inception3b": (28, 320),
        "inception3c": (14, 576),
        "inception4a": (14, 576),
        "inception4b": (14, 576),
        "inception4c": (14, 608),
        "inception4d": (14, 608),
        "inception4e": (7, 1056),
        "inception5a": (7, 1024),
        "inception5b": (7, 1024),
    }
    for row, (side, depth) in want.items():
        assert shapes[row] == (2, side, side, depth), row
    # 5x5 replaced by two 3x3s.
    p = variables["params"]["inception3a"]
    assert p["double3x3_1"]["kernel"].shape == (3, 3, 64, 96) and p["double3x3_2"][
        "kernel"
    ].shape == (3, 3, 96, 96)
    assert "branch1x1" not in variables["params"]["inception3c"]


def test_bn_inception_stride2_module_pool_is_caffe_ceil_mode():
    norm = partial(BatchNorm, use_running_average=False)
    module = BNInceptionModule(0, 4, 5, 3, 6, "max", 0, 2, conv=Conv, norm=norm, act=jax.nn.relu)
    for side in (8, 7):
        x = normal(side, (2, side, side, 3))
        y, _ = jax.jit(partial(module.apply, mutable=["batch_stats"]))(
            fan_in_variables(module, x), x
        )
        half = -(-side // 2)
        assert y.shape == (2, half, half, 5 + 6 + 3)  # every branch agrees, odd sides included
        if side % 2 == 0:
            np.testing.assert_array_equal(
                np.asarray(y[..., 11:]), np.asarray(F.max_pool(x, 3, 2, ceil_mode=True))
            )


def test_bn_inception_input_validation():
    model = create("bn_inception", num_classes=3)
    assert model.min_input_size() == 11
    assert abstract_apply(model, (11, 11, 3)).shape == (2, 3)
    with pytest.raises(ValueError, match="at least 11x11"):
        abstract_apply(model, (10, 10, 3))
    with pytest.raises(ValueError, match="expects 3 input channel"):
        abstract_apply(model, (224, 224, 4))


# ---------------------------------------------------------------------- whole networks, real passes


def _train_step(model, x, labels):
    variables = fan_in_variables(model, x, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
        out, updates = model.apply(
            {"params": p, **state},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(7)},
        )
        logits, aux = out if isinstance(out, tuple) else (out, [])
        xent = partial(optax.softmax_cross_entropy_with_integer_labels, labels=labels)
        # The paper weights the auxiliary losses by 0.3.
        return xent(logits).mean() + 0.3 * sum(xent(a).mean() for a in aux), updates

    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0, (
            f"zero or non-finite gradient at {path}"
        )
    return state, updates


@pytest.mark.slow
def test_googlenet_forward_backward_at_47():
    _train_step(create("googlenet", num_classes=10), normal(1, (2, 47, 47, 3)), jnp.array([1, 2]))


@pytest.mark.slow
def test_googlenet_torchvision_with_aux_forward_backward_at_79():
    state, updates = _train_step(
        create("googlenet_torchvision", aux_logits=True, num_classes=10),
        normal(1, (2, 79, 79, 3)),
        jnp.array([1, 2]),
    )
    assert not np.allclose(
        np.asarray(state["batch_stats"]["aux1"]["conv_bn"]["mean"]),
        np.asarray(updates["batch_stats"]["aux1"]["conv_bn"]["mean"]),
    )


@pytest.mark.slow
def test_bn_inception_forward_backward_at_32():
    state, updates = _train_step(
        create("bn_inception", num_classes=10), normal(1, (2, 32, 32, 3)), jnp.array([1, 2])
    )
    assert not np.allclose(
        np.asarray(state["batch_stats"]["conv1_bn"]["mean"]),
        np.asarray(updates["batch_stats"]["conv1_bn"]["mean"]),
    )
