"""Bad input to TrainConfig, `train_and_evaluate` and `evaluate_checkpoint`: one clear
ValueError naming the field or argument, raised before anything is written (a failed run
never blocks the corrected rerun)."""

import json
import os

import flax.linen as nn
import numpy as np
import pytest

from cnnjax import train
from cnnjax.train.config import TrainConfig

from helpers_train.tiny import TinyCNN, digits_config


def tiny_config(**changes):
    return digits_config(
        num_steps=2,
        parallel="none",
        log_every=1,
        checkpoint_every=2,
        rng_impl="rbg",
    ).replace(**changes)


@pytest.mark.parametrize(
    "d,needle",
    [
        (
            {"learning_rate": "0.1", "num_steps": 1},
            "TrainConfig.learning_rate: Input should be a valid number, got '0.1'",
        ),
        ({"num_steps": 1.0}, "TrainConfig.num_steps: Input should be a valid integer, got 1.0"),
        ({"boundaries": 5}, "TrainConfig.boundaries: Input should be a valid tuple, got 5"),
        ({"boundaries": [100.5]}, "TrainConfig.boundaries[0]: Input should be a valid integer"),
        (
            {"boundary_epochs": "30,60"},
            "TrainConfig.boundary_epochs: Input should be a valid tuple, got '30,60'",
        ),
        ({"nesterov": "yes"}, "TrainConfig.nesterov: Input should be a valid boolean, got 'yes'"),
        (
            {"model_kwargs": []},
            "TrainConfig.model_kwargs: Input should be a valid dictionary, got []",
        ),
        ({"model_kwargs": {1: 2}}, "TrainConfig.model_kwargs key 1: Input should be a valid str"),
        ({"seed": True}, "TrainConfig.seed: Input should be a valid integer, got True"),
        ({"seed": np.int64(3)}, "TrainConfig.seed: Input should be a valid integer"),
        (
            {"optimizer": "sgdd"},
            "TrainConfig.optimizer: Input should be 'sgd', 'adam' or 'adamw', got 'sgdd'",
        ),
    ],
)
def test_from_dict_names_the_field_and_the_expected_type(d, needle):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(d)
    assert needle in str(info.value)
    # The same check when a config is built directly and validated.
    with pytest.raises(ValueError) as info:
        TrainConfig(num_steps=1).replace(**d).validate(check_registries=False)
    assert needle in str(info.value)


def test_from_dict_wants_an_object():
    with pytest.raises(ValueError, match="JSON object.*got a list"):
        TrainConfig.from_dict([1, 2])
    assert TrainConfig.from_dict({"boundaries": [100.0, 200], "num_epochs": 3}).boundaries == (
        100,
        200,
    )


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("num_epochs", float("inf"), "num_epochs must be a finite number > 0"),
        ("decay_factor", -0.1, "decay_factor must be > 0"),
        ("decay_factor", 0.0, "decay_factor must be > 0"),
        ("weight_decay", float("nan"), "weight_decay must be a number, got nan"),
        ("warmup_lr", float("nan"), "warmup_lr must be a number, got nan"),
        ("aux_weight", float("nan"), "aux_weight must be a number, got nan"),
        ("seed", -1, "seed must be an int in [0, 2**32)"),
        ("seed", 2**32, "seed must be an int in [0, 2**32)"),
        ("image_size", 0, "image_size must be a positive int"),
        ("channels", 2, "channels must be 1 or 3"),
    ],
)
def test_validate_rejects_values_the_run_cannot_use(field, value, needle):
    length = {"num_steps": None} if field == "num_epochs" else {}
    with pytest.raises(ValueError) as info:
        TrainConfig(num_steps=1).replace(**length, **{field: value}).validate(
            check_registries=False
        )
    assert needle in str(info.value)


def test_from_json_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read config file .*missing.json.*No such file"):
        TrainConfig.from_json_file(str(tmp_path / "missing.json"))
    for text, needle in (
        ("{oops", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"learning_rate": "0.1"}', "learning_rate: Input should be a valid number"),
    ):
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ValueError, match="c.json") as info:
            TrainConfig.from_json_file(str(tmp_path / "c.json"))
        assert needle in str(info.value)


class DividesByZero(nn.Module):
    num_classes: int = 10
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train: bool):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1)) / 0 * (1 // 0)


def takes_nothing():
    return TinyCNN()


@pytest.mark.parametrize(
    "model_fn,needle",
    [
        (
            DividesByZero,
            r"model 'tiny' cannot take 8x8x1 inputs: ZeroDivisionError: integer division or "
            r"modulo by zero \(check --model, --model_kwargs, --image_size and --channels\)",
        ),
        (
            takes_nothing,
            r"cannot build model 'tiny': TypeError: .*unexpected keyword.*--model_kwargs",
        ),
    ],
)
def test_a_model_that_fails_to_build_raises_before_the_workdir_is_created(
    tmp_path, model_fn, needle
):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=needle):
        train.train_and_evaluate(tiny_config(), workdir, model_fn=model_fn)
    assert not os.path.exists(workdir)


def test_a_workdir_that_is_a_file_is_rejected_before_the_data_is_loaded(tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_text("")

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(train.loop.data, "load_dataset", no_data)
    for workdir, needle in (
        (path, "is an existing file, not a directory"),
        (path / "run", "cannot be created"),
    ):
        with pytest.raises(ValueError, match=f"workdir .*{needle}"):
            train.train_and_evaluate(tiny_config(), str(workdir), model_fn=TinyCNN)


def test_the_config_of_a_run_without_checkpoints_is_replaced(tmp_path):
    # What a run that failed before its first checkpoint leaves: the rerun with a corrected
    # config trains, and the failed attempt's metric records are dropped.
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny_config(image_size=2).to_json())
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 9.0}) + "\n")
    result = train.train_and_evaluate(tiny_config(), str(workdir), model_fn=TinyCNN)
    assert result.step == 2 and result.resumed_from == 0
    assert TrainConfig.from_json_file(str(workdir / "config.json")) == tiny_config()
    assert [r["step"] for r in train.read_metrics(str(workdir / "metrics.jsonl"))] == [1, 2]
    assert train.read_metrics(str(workdir / "metrics.jsonl"))[0]["train_loss"] != 9.0
    # With a checkpoint it is a run, and a different config is refused (without touching it).
    with pytest.raises(ValueError, match="different config.*image_size: 8 -> 16"):
        train.train_and_evaluate(tiny_config(image_size=16), str(workdir), model_fn=TinyCNN)
    assert TrainConfig.from_json_file(str(workdir / "config.json")) == tiny_config()


def test_evaluate_checkpoint_creates_nothing_and_checks_its_arguments(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    with pytest.raises(ValueError, match="no checkpoint to evaluate"):
        train.evaluate_checkpoint(str(tmp_path), model_fn=TinyCNN)
    assert os.listdir(tmp_path) == ["config.json"]
    with pytest.raises(ValueError, match="step must be"):
        train.evaluate_checkpoint(str(tmp_path), step="10", model_fn=TinyCNN)
    with pytest.raises(ValueError, match="split must be"):
        train.evaluate_checkpoint(str(tmp_path), split="train", model_fn=TinyCNN)
    (tmp_path / "config.json").write_text('{"learning_rate": "0.1", "num_steps": 1}')
    with pytest.raises(
        ValueError,
        match=r"config file .*config.json.*learning_rate: Input should be a valid number",
    ):
        train.evaluate_checkpoint(str(tmp_path), model_fn=TinyCNN)
