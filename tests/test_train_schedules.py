"""Learning-rate schedules, optimisers and configs of cnnjax.train against the papers' numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import train
from cnnjax.train import config as config_lib
from cnnjax.train.config import TrainConfig


def lrs(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_resnet_cifar_paper_schedule_at_the_boundaries():
    # He et al. 2016, 4.2: 0.1, divided by 10 at 32k and 48k iterations, terminated at 64k.
    config = train.get_preset("cifar_resnet")
    schedule = train.create_learning_rate_fn(config, steps_per_epoch=390)
    assert train.num_train_steps(config, 390) == 64_000
    got = lrs(schedule, [0, 1, 31_999, 32_000, 32_001, 47_999, 48_000, 63_999])
    np.testing.assert_allclose(got, [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_resnet110_warmup_then_the_unshifted_paper_schedule():
    # ResNet-110: 0.01 until about 400 iterations, then back to 0.1; the boundaries stay put.
    schedule = train.create_learning_rate_fn(train.get_preset("cifar_resnet110"), 390)
    got = lrs(schedule, [0, 200, 399, 400, 31_999, 32_000, 48_000])
    np.testing.assert_allclose(got, [0.01, 0.01, 0.01, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_linear_warmup_and_cosine():
    config = TrainConfig(
        model="x",
        num_steps=1100,
        learning_rate=0.4,
        schedule="cosine",
        warmup_steps=100,
        warmup="linear",
        warmup_lr=0.0,
    )
    schedule = train.create_learning_rate_fn(config, 10)
    got = lrs(schedule, [0, 50, 100, 600, 1100])
    # Cosine over the 1000 steps after warm-up: 0.4 * (1 + cos(pi * t / 1000)) / 2.
    want = [0.0, 0.2, 0.4, 0.4 * (1 + math.cos(math.pi * 0.5)) / 2, 0.0]
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_linear_scaling_rule_and_epoch_boundaries():
    # Goyal et al. 2017: lr 0.1 per 256 images; 8192 images per step -> 3.2, warm-up over 5 epochs.
    config = train.get_preset("imagenet_resnet_large_batch")
    assert config.peak_learning_rate == pytest.approx(3.2)
    spe = 1_281_167 // 8192  # 156
    schedule = train.create_learning_rate_fn(config, spe)
    assert train.num_train_steps(config, spe) == 90 * spe
    got = lrs(schedule, [0, 390, 780, 30 * spe - 1, 30 * spe, 60 * spe, 80 * spe])
    np.testing.assert_allclose(
        got, [0.1, 0.1 + 3.1 * 390 / 780, 3.2, 3.2, 0.32, 0.032, 0.0032], rtol=1e-5
    )
    # The plain ImageNet recipe: /10 at epochs 30 and 60 of 5005 steps.
    config = train.get_preset("imagenet_resnet")
    np.testing.assert_allclose(
        lrs(train.create_learning_rate_fn(config, 5005), [150_149, 150_150, 300_300]),
        [0.1, 0.01, 0.001],
        rtol=1e-6,
    )


def test_googlenet_preset_follows_the_paper():
    # Szegedy et al. 2014, section 6: SGD, momentum 0.9, the rate 4% lower every 8 epochs; section
    # 5: the auxiliary classifiers' losses are weighted by 0.3 in training.
    from cnnjax import models

    config = train.get_preset("imagenet_googlenet").validate()
    assert (config.optimizer, config.momentum, config.aux_weight) == ("sgd", 0.9, 0.3)
    spe = 1_281_167 // 32
    assert train.num_train_steps(config, spe) == 250 * spe
    schedule = train.create_learning_rate_fn(config, spe)
    steps = [0, 8 * spe - 1, 8 * spe, 16 * spe - 1, 16 * spe, 248 * spe, 250 * spe - 1]
    want = [0.01, 0.01, 0.0096, 0.0096, 0.01 * 0.96**2, 0.01 * 0.96**31, 0.01 * 0.96**31]
    np.testing.assert_allclose(lrs(schedule, steps), want, rtol=1e-5)
    # Its model gives two aux logits in training (shapes only), none in evaluation.
    model = models.create(config.model, num_classes=5, **config.model_kwargs)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rngs = {"dropout": jax.random.key(1)}
    logits, aux = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x
    )
    assert logits.shape == (2, 5) and [a.shape for a in aux] == [(2, 5), (2, 5)]
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (2, 5)


@pytest.mark.slow
def test_googlenet_preset_trainer_weighs_the_aux_losses_0_3():
    # One step of the trainer with the preset's model and optimiser moves each classifier's bias
    # (not decayed) by -lr x its loss weight x the batch mean of softmax - one-hot: 1 for the main
    # classifier, 0.3 for the aux ones.
    from cnnjax import models

    config = train.get_preset("imagenet_googlenet")
    schedule = train.create_learning_rate_fn(config, 1_281_167 // 32)
    model = models.create(config.model, num_classes=5, **config.model_kwargs)
    size = model.min_input_size(with_aux=True)
    tx = train.create_optimizer(config, schedule)
    key = jax.random.key(0, impl=config.rng_impl)
    state = train.create_train_state(key, model, tx, (size, size, 3))
    images = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
    labels = np.array([1, 3], np.int32)
    step = train.make_train_step(
        model, tx, schedule, aux_weight=config.aux_weight, axis_name=None, rng_impl=config.rng_impl
    )
    new, metrics = jax.jit(step)(state, {"image": images, "label": labels})
    # The step's dropout key: the state's, folded with the step number.
    key = jax.random.wrap_key_data(state.rng, impl=config.rng_impl)
    rngs = {"dropout": jax.random.fold_in(key, 0)}
    logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True, rngs=rngs))(
        state.params, images
    )
    assert len(aux) == 2 and "aux_loss" in metrics
    onehot = np.eye(5)[labels]
    for path, z, weight in (
        (("fc",), logits, 1.0),
        (("aux1", "fc2"), aux[0], 0.3),
        (("aux2", "fc2"), aux[1], 0.3),
    ):
        before, after = state.params, new.params
        for k in path:
            before, after = before[k], after[k]
        want = -0.01 * weight * (np.asarray(jax.nn.softmax(z)) - onehot).mean(0)
        np.testing.assert_allclose(
            after["bias"] - before["bias"], want, rtol=1e-4, atol=1e-9, err_msg="/".join(path)
        )


def _one_update(config, params, grads, steps=1):
    tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 1))
    opt_state = tx.init(params)
    for _ in range(steps):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params


def test_sgd_momentum_nesterov_and_weight_decay_mask_against_numpy():
    params = {
        "conv": {"kernel": jnp.array([[1.0, -2.0]])},
        "bn": {"scale": jnp.array([0.5]), "bias": jnp.array([3.0])},
    }
    grads = {
        "conv": {"kernel": jnp.array([[0.1, 0.2]])},
        "bn": {"scale": jnp.array([-0.3]), "bias": jnp.array([0.4])},
    }
    lr, m, wd = 0.1, 0.9, 0.01
    for nesterov in (False, True):
        for mask in ("all", "no_bn_bias"):
            config = TrainConfig(
                model="x",
                num_steps=10,
                learning_rate=lr,
                momentum=m,
                nesterov=nesterov,
                weight_decay=wd,
                wd_mask=mask,
                schedule="constant",
            )
            got = _one_update(config, params, grads, steps=2)

            def reference(p, g, decay):
                p, v = np.asarray(p, np.float64), np.zeros(np.shape(p))
                for _ in range(2):
                    d = np.asarray(g) + (wd * p if decay else 0.0)  # L2 in the loss: grad + wd * w
                    v = m * v + d
                    p = p - lr * ((d + m * v) if nesterov else v)
                return p

            for (path, p), g in zip(
                jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(grads)
            ):
                decay = mask == "all" or p.ndim > 1
                want = reference(p, g, decay)
                leaf = got
                for k in path:
                    leaf = leaf[k.key]
                np.testing.assert_allclose(
                    leaf, want, rtol=1e-6, err_msg=f"{path} nesterov={nesterov} mask={mask}"
                )


def test_weight_decay_mask_skips_exactly_the_vectors():
    params = {
        "conv1": {"kernel": jnp.zeros((3, 3, 1, 2))},
        "bn1": {"scale": jnp.zeros(2), "bias": jnp.zeros(2)},
        "fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
    }
    mask = train.weight_decay_mask(params, "no_bn_bias")
    assert mask == {
        "conv1": {"kernel": True},
        "bn1": {"scale": False, "bias": False},
        "fc": {"kernel": True, "bias": False},
    }
    assert all(jax.tree.leaves(train.weight_decay_mask(params, "all")))


def test_adamw_decays_decoupled_and_adam_runs():
    params, grads = {"w": jnp.array([[2.0]])}, {"w": jnp.array([[0.0]])}
    config = TrainConfig(
        model="x",
        num_steps=1,
        optimizer="adamw",
        learning_rate=0.1,
        weight_decay=0.5,
        schedule="constant",
    )
    # Zero gradient: Adam's step is 0, the decoupled decay gives w - lr * wd * w.
    np.testing.assert_allclose(
        _one_update(config, params, grads)["w"], [[2.0 - 0.1 * 0.5 * 2.0]], rtol=1e-6
    )
    config = config.replace(optimizer="adam")
    assert np.isfinite(_one_update(config, params, {"w": jnp.array([[1.0]])})["w"]).all()


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("optimizer", "sgdd", "should be 'sgd', 'adam' or 'adamw', got 'sgdd'"),
        ("schedule", "linear", "should be 'step', 'cosine' or 'constant', got 'linear'"),
        ("wd_mask", "bn", "should be 'all' or 'no_bn_bias', got 'bn'"),
        ("parallel", "dp", "should be 'shard_map', 'pmap' or 'none', got 'dp'"),
        ("dtype", "float16", "should be 'float32' or 'bfloat16', got 'float16'"),
        ("member_map", "map", "should be 'auto', 'vmap' or 'loop', got 'map'"),
        ("rng_impl", "philox", "should be 'threefry2x32', 'rbg' or 'unsafe_rbg', got 'philox'"),
        ("global_batch_size", 0, "positive int"),
    ],
)
def test_config_validation_names_the_field_and_choices(field, value, needle):
    with pytest.raises(ValueError, match=f"{field}") as info:
        TrainConfig(num_steps=1).replace(**{field: value}).validate(check_registries=False)
    assert needle in str(info.value)


def test_config_validation_of_run_length_boundaries_and_registries():
    with pytest.raises(ValueError, match="exactly one of num_steps and num_epochs"):
        TrainConfig().validate(check_registries=False)
    with pytest.raises(ValueError, match="boundaries"):
        TrainConfig(num_steps=10, schedule="step", boundaries=(5, 3)).validate(
            check_registries=False
        )
    with pytest.raises(ValueError, match="model='resnet1001'.*valid choices.*resnet20"):
        TrainConfig(model="resnet1001", num_steps=10).validate()
    with pytest.raises(ValueError, match="dataset='cifar11'.*valid choices.*cifar10"):
        TrainConfig(model="resnet20", dataset="cifar11", num_steps=10).validate()
    with pytest.raises(ValueError, match="augment='autoaugment'.*'cifar'"):
        TrainConfig(model="resnet20", augment="autoaugment", num_steps=10).validate()
    with pytest.raises(ValueError, match="validation_size"):
        TrainConfig(eval_split="validation", num_steps=10).validate(check_registries=False)
    with pytest.raises(ValueError, match="preset.*valid choices.*cifar_resnet"):
        train.get_preset("cifar")
    with pytest.raises(ValueError, match="no field"):
        TrainConfig().replace(lr=0.1)
    for name, preset in train.PRESETS.items():
        preset.validate()
        assert TrainConfig.from_dict(preset.to_dict()) == preset, name


def test_parse_field_types():
    assert config_lib.parse_field("num_steps", "64e3") == 64_000
    assert config_lib.parse_field("boundaries", "32000,48000") == (32_000, 48_000)
    assert config_lib.parse_field("nesterov", "true") is True
    assert config_lib.parse_field("image_size", "none") is None
    assert config_lib.parse_field("model_kwargs", '{"width": 4}') == {"width": 4}
    assert config_lib.parse_field("learning_rate", "0.1") == 0.1
    assert config_lib.parse_field("boundary_epochs", "30 60") == (30.0, 60.0)
    assert config_lib.parse_field("nesterov", "off") is False
    assert config_lib.parse_field("data_dir", "") is None
    assert config_lib.parse_field("optimizer", "adamw") == "adamw"
    for name, text, reason in (
        ("num_steps", "1.5", "unable to parse string as an integer"),
        ("num_steps", "1.5e0", "got a number with a fractional part"),
        ("num_steps", "true", "unable to parse string as an integer"),
        ("seed", "none", "unable to parse string as an integer"),  # seed may not be None
        ("nesterov", "2", "should be a valid boolean"),
        ("boundaries", "1,x", "unable to parse string as an integer"),
        ("model_kwargs", "[1]", "should be an object"),
        ("optimizer", "sgdd", "should be 'sgd', 'adam' or 'adamw'"),
    ):
        with pytest.raises(ValueError) as info:
            config_lib.parse_field(name, text)
        assert f"cannot parse {text!r} for TrainConfig.{name} of type " in str(info.value)
        assert reason in str(info.value), (name, text, str(info.value))


def test_override_gives_way_to_the_exclusive_twin():
    """A run length or boundary list given replaces the preset's other spelling of it."""
    base = config_lib.get_preset("cifar_resnet")
    assert base.num_steps and base.boundaries
    cfg = base.override(num_epochs=3, boundary_epochs=(1, 2))
    assert (cfg.num_steps, cfg.num_epochs, cfg.boundaries, cfg.boundary_epochs) == (
        None,
        3,
        (),
        (1, 2),
    )
    both = base.override(num_steps=5, num_epochs=None)  # both given: taken as given
    assert (both.num_steps, both.num_epochs) == (5, None)
    with pytest.raises(ValueError, match="no field"):
        base.override(num_step=5)
