"""`python -m cnnjax train` and `eval`: presets, per-field overrides, errors, a
run and its evaluation."""

import json
import os
import subprocess
import sys

import pytest

from cnnjax import cli, train
from cnnjax.train import config as config_lib
from cnnjax.train.config import TrainConfig


def parse(*argv):
    args = cli.build_parser().parse_args(["train", "--workdir", "w", *argv])
    return cli.config_from_args(args)


def test_preset_with_overrides():
    config = parse(
        "--preset", "cifar_resnet", "--model", "resnet56", "--boundaries", "100,200", "--nesterov"
    )
    assert config == train.get_preset("cifar_resnet").replace(
        model="resnet56", boundaries=(100, 200), nesterov=True
    )
    # A run length or boundaries in the other unit replace the preset's.
    config = parse("--preset", "cifar_resnet", "--num_epochs", "2", "--boundary_epochs", "1")
    assert (
        config.num_steps is None
        and config.num_epochs == 2
        and config.boundaries == ()
        and config.boundary_epochs == (1.0,)
    )
    assert parse().num_steps is None and parse("--num_steps", "5").num_steps == 5


def test_config_file_and_print_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(train.get_preset("digits_resnet").to_json())
    assert parse("--config", str(path), "--seed", "3") == train.get_preset("digits_resnet").replace(
        seed=3
    )
    assert (
        cli.main(
            ["train", "--workdir", str(tmp_path / "w"), "--preset", "cifar_plain", "--print_config"]
        )
        == 0
    )
    assert TrainConfig.from_dict(json.loads(capsys.readouterr().out)) == train.get_preset(
        "cifar_plain"
    )
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["--optimizer", "sgdd", "--num_steps", "3"],
            "argument --optimizer: invalid choice: 'sgdd'",
        ),
        (["--model", "resnet7", "--num_steps", "3"], "model='resnet7' is not a registered model"),
        (["--num_steps", "1.5"], "cannot parse '1.5' for TrainConfig.num_steps"),
        (["--preset", "cifar_resnet", "--config", "c.json"], "--config or --preset, not both"),
    ],
)
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
    argv = [
        "train",
        "--workdir",
        workdir,
        "--model",
        "linear",
        "--dataset",
        "digits",
        "--image_size",
        "8",
        "--channels",
        "1",
        "--global_batch_size",
        "32",
        "--num_steps",
        "20",
        "--learning_rate",
        "0.05",
        "--schedule",
        "constant",
        "--normalize",
        "per_channel",
        "--parallel",
        "none",
        "--log_every",
        "10",
        "--checkpoint_every",
        "10",
        "--progress_bar",
        "false",
        "--rng_impl",
        "rbg",
    ]
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
    proc = subprocess.run(
        [sys.executable, "-m", "cnnjax", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "train" in proc.stdout and "eval" in proc.stdout


def run_cli(argv, capsys):
    """(exit status, stderr) of `cnnjax ARGV`; a bad-input error must be one line."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


TINY_RUN = [
    "--dataset",
    "digits",
    "--channels",
    "1",
    "--global_batch_size",
    "16",
    "--num_steps",
    "1",
    "--normalize",
    "per_channel",
    "--parallel",
    "none",
    "--progress_bar",
    "false",
    "--rng_impl",
    "rbg",
]


@pytest.mark.parametrize(
    "bad,needle",
    [
        (
            ["--image_size", "2"],
            "model 'lenet5' cannot take 2x2x1 inputs: LeNet5 needs inputs of at least 4x4 pixels",
        ),
        (["--image_size", "8", "--model_kwargs", '{"hidden": 0}'], "model_kwargs={'hidden': 0}"),
    ],
)
def test_a_model_that_cannot_be_built_leaves_nothing_and_the_corrected_rerun_trains(
    tmp_path, capsys, bad, needle
):
    workdir = str(tmp_path / "run")
    code, err = run_cli(
        ["train", "--workdir", workdir, *TINY_RUN, "--model", "lenet5", *bad], capsys
    )
    assert (
        code == 2
        and needle in err
        and "--model_kwargs" in err
        and len(err.strip().splitlines()) == 1
    ), err
    assert not os.path.exists(workdir)
    assert (
        cli.main(
            ["train", "--workdir", workdir, *TINY_RUN, "--model", "lenet5", "--image_size", "8"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "--config: cannot read config file '{path}': No such file or directory"),
        ("{oops", "--config: config file '{path}' is not valid JSON"),
        ("[1, 2]", "--config: config file '{path}' must hold a JSON object of TrainConfig fields"),
        (
            '{"learning_rate": "0.1", "num_steps": 1}',
            "TrainConfig.learning_rate: Input should be a valid number, got '0.1'",
        ),
        ('{"boundaries": 5}', "TrainConfig.boundaries: Input should be a valid tuple, got 5"),
    ],
)
def test_a_bad_config_file_is_named_with_its_problem(tmp_path, capsys, content, needle):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    code, err = run_cli(["train", "--workdir", str(tmp_path / "w"), "--config", str(path)], capsys)
    assert code == 2 and needle.format(path=path) in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{oops", "config.json' is not valid JSON"),
        (
            '{"learning_rate": "0.1", "num_steps": 1}',
            "config.json': TrainConfig.learning_rate: Input should be a valid number",
        ),
        ('{"num_steps": 1}', "has no checkpoint to evaluate"),
    ],
)
def test_eval_of_a_bad_workdir_names_the_file_and_creates_nothing(
    tmp_path, capsys, content, needle
):
    (tmp_path / "config.json").write_text(content)
    code, err = run_cli(["eval", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == ["config.json"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--num_epochs", "inf"], "num_epochs must be a finite number > 0, got inf"),
        (["--decay_factor", "-0.1"], "decay_factor must be > 0"),
        (["--weight_decay", "nan"], "weight_decay must be a number, got nan"),
        (["--seed", "-1"], "seed must be an int in [0, 2**32)"),
        (["--image_size", "0"], "image_size must be a positive int"),
        (["--channels", "2"], "channels must be 1 or 3"),
    ],
)
def test_print_config_validates_every_field(tmp_path, capsys, argv, needle):
    length = [] if "--num_epochs" in argv else ["--num_steps", "1"]
    code, err = run_cli(
        ["train", "--workdir", str(tmp_path / "w"), *length, *argv, "--print_config"], capsys
    )
    assert code == 2 and needle in err, err


def test_a_workdir_that_is_a_file_exits_2_naming_workdir(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    code, err = run_cli(["train", "--workdir", str(path), "--num_steps", "1"], capsys)
    assert code == 2 and f"--workdir '{path}' is an existing file, not a directory" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["train", "--workdir", "w"], ["eval", "--workdir", "w"]])
def test_an_unknown_flag_shows_the_command_usage(capsys, command):
    code, err = run_cli([*command, "--bogus"], capsys)
    assert (
        code == 2
        and f"usage: cnnjax {command[0]} " in err
        and f"cnnjax {command[0]}: error: unrecognized arguments: --bogus" in err
    ), err


def test_one_flag_spelling_with_the_other_as_alias(tmp_path, capsys):
    assert cli.canonical_flags(
        ["train", "--data-dir=x", "--global-batch-size", "8", "--", "--keep-me"]
    ) == ["train", "--data_dir=x", "--global_batch_size", "8", "--", "--keep-me"]
    for spelling in ("--print_config", "--print-config"):
        assert (
            cli.main(
                [
                    "train",
                    "--workdir",
                    str(tmp_path),
                    "--preset",
                    "cifar_plain",
                    "--global-batch-size",
                    "64",
                    spelling,
                ]
            )
            == 0
        )
        assert json.loads(capsys.readouterr().out)["global_batch_size"] == 64
    parser = cli.build_parser()
    flags = {
        o
        for a in parser._subparsers._group_actions[0].choices.values()
        for act in a._actions
        for o in act.option_strings
        if o.startswith("--")
    }
    assert not [f for f in flags if "-" in f[2:]], "every flag is spelled with underscores"


def test_help_lists_the_commands_without_importing_jax():
    """`cnnjax --help` and each command's help (the config fields' among them) load no JAX."""
    code = (
        "import sys\nfrom cnnjax import cli\nfor argv in (['--help'], *([c, '--help'] for c in "
        "cli.COMMANDS)):\n    try:\n        cli.main(argv)\n    except SystemExit:\n"
        "        pass\nassert 'jax' not in sys.modules, 'imported jax'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "convert" in out.stdout and "degradation" in out.stdout
    assert "--optimizer {sgd,adam,adamw}" in out.stdout  # train's help, with a field's choices


def test_train_names_load_on_first_use():
    """`cnnjax.train` imports a submodule when one of its names is first used (the help of
    `cnnjax train` needs only the config), and has exactly the names it lists."""
    assert train.train_and_evaluate is train.loop.train_and_evaluate
    assert len(train.__all__) == 30 and set(train.__all__) <= set(dir(train))
    for name in train.__all__:  # each name listed under the module that defines it
        value, home = getattr(train, name), f"cnnjax.train.{train._HOME[name]}"
        assert getattr(value, "__module__", home) == home, (name, value.__module__, home)
    with pytest.raises(AttributeError, match="has no attribute 'trian_and_evaluate'"):
        train.trian_and_evaluate


def test_train_help_describes_every_config_field(capsys):
    """Each field's flag carries its description from TrainConfig's docstring, whole (the
    continuation lines too), and its default."""
    helps = config_lib.field_help()
    assert set(helps) == set(config_lib.field_names())
    assert all(helps.values()), [name for name, text in helps.items() if not text]
    assert helps["warmup"].endswith("or 'linear' ramps from warmup_lr to the peak (Goyal et al.).")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "below 80%, a fixed count is used here" in out.replace('"', "")
    assert "--wd_mask {all,no_bn_bias} 'all' decays every parameter (the ResNet paper);" in out
    assert "[default 'all']" in out
