"""The lecture-claim experiments (experiments/*.py of issue 8) run end to end on tiny settings.

Each script's `main` writes its Markdown section and its CSV/PNG files; the numbers asserted here
are those the scripts compute from the library (closed formulas, published counts), so a script
that silently stopped computing them would fail. Real data sets are never read.
"""

from __future__ import annotations

import csv
import math

import pytest

from experiments import (
    batchnorm_study,
    bn_folding,
    cost_arguments,
    cost_vs_accuracy,
    filters,
    lenet_mnist,
    receptive_fields,
)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cost_arguments(tmp_path):
    assert cost_arguments.main(["--out", str(tmp_path), "--no_networks"]) == 0
    text = (tmp_path / "cost_arguments.md").read_text()
    rows = {(r["part"], r["design"], r["C"]): r for r in read_csv(tmp_path / "cost_arguments.csv")}
    # 27C^2 against 49C^2 (C = 64: 110,592 and 200,704), both seeing 7x7.
    assert rows[("vgg", "3 x conv3x3", "64")]["params"] == str(27 * 64 * 64)
    assert rows[("vgg", "1 x conv7x7", "512")]["params"] == str(49 * 512 * 512)
    assert rows[("vgg", "3 x conv3x3", "256")]["receptive_field"] == "7"
    assert rows[("vgg", "1 x conv7x7", "256")]["receptive_field"] == "7"
    # The lecture's module: 854M multiply-adds naive, 271M with 1x1 reductions of 64.
    assert rows[("inception_lecture", "naive", "256")]["macs"] == "854196224"
    assert rows[("inception_lecture", "reduced", "256")]["macs"] == "271351808"
    assert "Command: `python -m experiments.cost_arguments" in text and "wall time" in text


def test_cost_vs_accuracy(tmp_path):
    assert cost_vs_accuracy.main(["--out", str(tmp_path), "--models", "resnet18", "alexnet"]) == 0
    rows = {r["model"]: r for r in read_csv(tmp_path / "cost_vs_accuracy.csv")}
    assert (
        rows["resnet18"]["params"] == "11689512"
        and round(int(rows["resnet18"]["macs"]) / 1e9, 3) == 1.814
    )
    assert float(rows["resnet18"]["top1"]) == 69.758 and rows["alexnet"]["top1"] == ""
    text = (tmp_path / "cost_vs_accuracy.md").read_text()
    assert "| resnet18 | 224x224x3 | 11,689,512 | 1.814 | 1.814 | 69.76 |" in text
    assert (tmp_path / "cost_vs_accuracy.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        cost_vs_accuracy.main(["--out", str(tmp_path), "--models", "resnet9000"])


def test_receptive_fields(tmp_path):
    assert (
        receptive_fields.main(["--out", str(tmp_path), "--models", "alexnet", "vgg16", "--measure"])
        == 0
    )
    text = (tmp_path / "receptive_fields.md").read_text()
    assert "| 3 stacked 3x3 convs see 7x7 | 7 | 7 | 7 | 1 |" in text
    assert (
        "| 3x3 conv, 2x2/2 max pool, 3x3 conv: the pool doubles the step | 8 | 8 | 8 | 2 |" in text
    )
    rows = {r["network"]: r for r in read_csv(tmp_path / "receptive_fields.csv")}
    assert (rows["alexnet"]["receptive_field"], rows["vgg16"]["receptive_field"]) == ("195", "212")
    assert rows["vgg16"]["stride"] == "32" and rows["vgg16"]["match"] == "True"


def test_bn_folding(tmp_path):
    # Batch 2 as the equality check's: the timing reuses its two compiled networks.
    argv = [
        "--out",
        str(tmp_path),
        "--models",
        "resnet20",
        "--time",
        "resnet20",
        "--batch_size",
        "2",
        "--repeats",
        "2",
        "--calls",
        "1",
    ]
    assert bn_folding.main(argv) == 0
    (row,) = read_csv(tmp_path / "bn_folding.csv")
    assert (row["batchnorms"], row["folded"], row["unfolded"]) == ("19", "19", "0")
    # Every BatchNorm's scale, shift, mean and var are gone; each folded conv gained a bias.
    assert int(row["params_before"]) - int(row["params_after"]) == 2 * 688 - 688
    assert row["state_after"] == "0" and row["allclose"] == "True"
    (timing,) = read_csv(tmp_path / "bn_folding_timing.csv")
    assert float(timing["original_ms"]) > 0 and float(timing["folded_ms"]) > 0


def test_lenet_mnist_tiny(tmp_path):
    argv = [
        "--presets",
        "tiny",
        "--out",
        str(tmp_path / "out"),
        "--workdir",
        str(tmp_path / "runs"),
    ]
    assert lenet_mnist.main(argv) == 0
    text = (tmp_path / "out" / "lenet_mnist.md").read_text()
    assert "| digits |" in text and "total params: 1,256,080" in text
    steps = [int(r["step"]) for r in read_csv(tmp_path / "out" / "lenet_mnist.csv")]
    assert steps[-1] == 6 and (tmp_path / "out" / "lenet_mnist.png").exists()
    assert lenet_mnist.main(argv) == 0  # a finished run is read back, not retrained


def test_batchnorm_study_tiny(tmp_path):
    assert batchnorm_study.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "batchnorm_study.csv")
    runs = {r["run"] for r in rows}
    assert len(runs) == 4  # 2 rates x BN/no BN
    text = (tmp_path / "batchnorm_study.md").read_text()
    # lr 1e12 without BN overflows within the 4 steps; with BN (scale-invariant) it does not.
    final_table = text.split("### Final test error")[1].split("###")[0]
    row = {
        line.split(" | ")[1]: line
        for line in final_table.splitlines()
        if line.startswith("| He N(0, 2/fan_in)")
    }
    assert "diverged (step" in row["no"] and "diverged" not in row["yes"]
    # The diverging step is the run's last row, its loss not finite (also when no log came before).
    last = [r for r in rows if r["run"] == "nobn_he_lr1e+12"][-1]
    assert f"diverged (step {last['step']})" in row["no"] and not math.isfinite(
        float(last["train_loss"])
    )
    assert (tmp_path / "batchnorm_study.png").exists() and (
        tmp_path / "batchnorm_final.png"
    ).exists()


def test_batchnorm_study_network():
    import jax
    import jax.numpy as jnp

    from cnnjax.analysis import summary

    s = summary(batchnorm_study.StudyCNN(10, batch_norm=True), (16, 16, 1))
    assert [r.type for r in s.rows].count("BatchNorm") == 6 and [r.type for r in s.rows].count(
        "Conv"
    ) == 6
    plain = summary(batchnorm_study.StudyCNN(10, batch_norm=False), (16, 16, 1))
    # Without BN every conv has a bias; with BN a scale and a shift instead.
    assert s.total_params - plain.total_params == 16 * 2 + 32 * 2 + 64 * 2
    x = jnp.ones((2, 16, 16, 1))
    small = batchnorm_study.StudyCNN(10, weight_init="gauss0.01")
    v = jax.eval_shape(lambda: small.init(jax.random.key(0), x, train=False))
    assert v["params"]["fc"]["kernel"].shape == (64, 10)
    with pytest.raises(ValueError, match="weight_init"):
        batchnorm_study.StudyCNN(10, weight_init="zeros").init(jax.random.key(0), x, train=False)


def test_filters_tiny(tmp_path):
    argv = ["--preset", "tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "runs")]
    assert filters.main(argv) == 0
    text = (tmp_path / "out" / "filters.md").read_text()
    assert "after training" in text and (tmp_path / "out" / "filters.png").stat().st_size > 1000


def test_filter_grid_and_statistics():
    import numpy as np

    kernel = np.zeros((3, 3, 3, 5), np.float32)
    kernel[:, :, 0, 0] = np.arange(9).reshape(3, 3)  # a red ramp
    grid = filters.filter_grid(kernel, columns=4, zoom=2, gap=1)
    assert grid.shape == (2 * 7 + 1, 4 * 7 + 1, 3)
    np.testing.assert_allclose(
        grid[1:3, 1:3, 0], 0.0
    )  # the ramp's first weight (zoom 2): its minimum
    np.testing.assert_allclose(grid[5:7, 5:7, 0], 1.0)  # its last weight: the maximum
    np.testing.assert_allclose(
        grid[1:7, 1:7, 1:], 0.0
    )  # green and blue are 0, the filter's minimum
    noise = np.random.default_rng(0).normal(size=(7, 7, 3, 64))
    smooth = np.broadcast_to(np.linspace(-1, 1, 7)[None, :, None, None], (7, 7, 3, 64))
    assert abs(filters.filter_statistics(noise)["neighbour_correlation"]) < 0.1
    assert filters.filter_statistics(smooth)["neighbour_correlation"] > 0.5
    assert filters.filter_statistics(smooth)["grey_share"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        filters.filter_grid(np.zeros((3, 3, 2, 4)))


def test_scripts_refuse_bad_arguments_before_any_work(tmp_path, capsys):
    from experiments import bench_data

    (a_file := tmp_path / "a_file").write_text("")
    cases = (
        (
            cost_vs_accuracy.main,
            ["--models"],
            "at least one name",
        ),  # was an IndexError after measuring
        (receptive_fields.main, ["--out", str(a_file)], "is a file"),
        (
            bench_data.main,
            ["--batch_size", "5000", "--steps", "1", "--no_train"],
            "no full global batch",
        ),
    )
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, argv


def test_lenet_mnist_leaves_no_workdir_when_its_data_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="mnist"):
        lenet_mnist.run_preset("mnist", tmp_path / "lenet_mnist", str(tmp_path / "empty"))
    assert not (tmp_path / "lenet_mnist").exists()  # it was left behind, empty
