"""`python -m cnnjax train` and `eval`: presets, per-field overrides, errors, a run and its evaluation."""

import json
import os
import subprocess
import sys

import pytest

from cnnjax import cli, train
from cnnjax.train.config import TrainConfig


def parse(*argv):
    args = cli.build_parser().parse_args(["train", "--workdir", "w", *argv])
    return cli.config_from_args(args)


def test_preset_with_overrides():
    config = parse("--preset", "cifar_resnet", "--model", "resnet56", "--boundaries", "100,200", "--nesterov")
    assert config == train.get_preset("cifar_resnet").replace(model="resnet56", boundaries=(100, 200), nesterov=True)
    # A run length or boundaries in the other unit replace the preset's.
    config = parse("--preset", "cifar_resnet", "--num_epochs", "2", "--boundary_epochs", "1")
    assert config.num_steps is None and config.num_epochs == 2 and config.boundaries == () and config.boundary_epochs == (1.0,)
    assert parse().num_steps is None and parse("--num_steps", "5").num_steps == 5


def test_config_file_and_print_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(train.get_preset("digits_resnet").to_json())
    assert parse("--config", str(path), "--seed", "3") == train.get_preset("digits_resnet").replace(seed=3)
    assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--preset", "cifar_plain", "--print_config"]) == 0
    assert TrainConfig.from_dict(json.loads(capsys.readouterr().out)) == train.get_preset("cifar_plain")
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("argv,needle", [
    (["--optimizer", "sgdd", "--num_steps", "3"], "optimizer='sgdd' is not one of ['sgd', 'adam', 'adamw']"),
    (["--model", "resnet7", "--num_steps", "3"], "model='resnet7' is not a registered model"),
    (["--num_steps", "1.5"], "cannot parse '1.5' for TrainConfig.num_steps"),
    (["--preset", "cifar_resnet", "--config", "c.json"], "--config or --preset, not both"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--workdir", str(tmp_path), *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_preset_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--workdir", "w", "--preset", "cifar"])
    assert "cifar_resnet" in capsys.readouterr().err


def test_train_then_eval_a_registry_model(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    argv = ["train", "--workdir", workdir, "--model", "linear", "--dataset", "digits", "--image_size", "8",
            "--channels", "1", "--global_batch_size", "32", "--num_steps", "20", "--learning_rate", "0.05",
            "--schedule", "constant", "--normalize", "per_channel", "--parallel", "none", "--log_every", "10",
            "--checkpoint_every", "10", "--progress_bar", "false", "--rng_impl", "rbg"]
    assert cli.main(argv) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 20 and final["test_error"] < 0.5
    assert cli.main(["eval", "--workdir", workdir]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated == pytest.approx(final)
    assert cli.main(["eval", "--workdir", workdir, "--step", "10"]) == 0
    earlier = json.loads(capsys.readouterr().out)
    assert earlier["step"] == 10 and earlier["test_loss"] > final["test_loss"]
    with pytest.raises(SystemExit):
        cli.main(["eval", "--workdir", str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err


def test_python_dash_m_cnnjax_help():
    proc = subprocess.run([sys.executable, "-m", "cnnjax", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "eval" in proc.stdout
