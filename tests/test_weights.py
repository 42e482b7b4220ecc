"""cnnjax.weights and `cnnjax convert` / `cnnjax eval --weights`: files, errors, the layout rules.

The per-family logit comparisons are in test_weights_<family>.py. Tests that need torch take the
`ts` fixture (tests/torch_support.py) and skip without the extra cnnjax[torch].
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnnjax import cli, data, models, weights
from cnnjax.weights._convert import Rule

# The issue's list: every one must be covered, from its own source.
COVERED = {
    **{
        n: "torchvision"
        for n in (
            "alexnet_torchvision",
            "googlenet_torchvision",
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "resnext101_64x4d",
            "wide_resnet50_2",
            "wide_resnet101_2",
            "densenet121",
            "densenet161",
            "densenet169",
            "densenet201",
            *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
        )
    },
    **{
        n: "timm"
        for n in (
            "inception_v4",
            "inception_resnet_v2",
            "dpn68",
            "dpn92",
            "dpn98",
            "dpn107",
            "dpn131",
        )
    },
}


@pytest.fixture(scope="module")
def ts():
    return pytest.importorskip("torch_support", reason="needs the extra cnnjax[torch]")


@pytest.fixture(scope="module")
def resnet18(ts, tmp_path_factory):
    """A randomised torchvision ResNet-18 with 10 classes, and its state_dict saved as .pth."""
    m = ts.torchvision.models.resnet18(num_classes=10)
    ts.randomize(m, size=32)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    ts.torch.save(m.state_dict(), path)
    return m, str(path)


def test_sources_cover_the_issue_list():
    assert set(weights.SOURCES) == set(COVERED)
    for name, lib in COVERED.items():
        models.get_spec(name)  # registered
        assert weights.SOURCES[name].startswith(f"{lib}:"), name
    assert weights.normalization("resnet50") == "imagenet"
    assert weights.normalization("inception_v4") == "inception"
    assert weights.normalization("dpn92") == "dpn"
    with pytest.raises(ValueError, match="no published weights are mapped for model 'resnet56'"):
        weights.load_torch_state_dict("resnet56", {})
    with pytest.raises(ValueError, match="did you mean .*resnet50"):
        weights.load_torch_state_dict("resnet5O", {})


def test_dense_after_flatten_permutes_rows_to_nhwc_order():
    """torch: W @ flatten(f) over (C, H, W); cnnjax: flatten over (H, W, C) @ kernel."""
    rng = np.random.default_rng(0)
    c, h, w, out = 3, 2, 4, 5
    f = rng.normal(size=(c, h, w))
    weight = rng.normal(size=(out, c * h * w))
    kernel = Rule("params/fc/kernel", "fc.weight", "dense_chw", (c, h, w)).apply(weight)
    np.testing.assert_allclose(
        f.transpose(1, 2, 0).reshape(-1) @ kernel, weight @ f.reshape(-1), rtol=1e-12
    )
    conv = rng.normal(size=(out, c, 3, 1))  # OIHW
    hwio = Rule("params/c/kernel", "c.weight", "conv").apply(conv)
    assert hwio.shape == (3, 1, c, out) and hwio[2, 0, 1, 4] == conv[4, 1, 2, 0]


def test_fixed_normalizations_are_the_published_constants():
    ds = data.load_dataset("digits", image_size=8, channels=3)
    pipe = data.Pipeline(ds, 32, normalize="imagenet")
    batch = next(iter(pipe.eval_batches("test")))
    raw = pipe.eval_arrays("test")["image"][0].astype(np.float64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch["image"], (raw / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        data.Pipeline(
            data.load_dataset("digits", image_size=8, channels=1), 32, normalize="imagenet"
        )


def test_state_dict_errors_name_each_tensor_and_the_expected_shape(resnet18):
    m, _ = resnet18
    sd = dict(m.state_dict())
    del sd["layer1.0.conv1.weight"]
    sd["layer9.weight"] = sd["fc.bias"]
    sd["layer2.0.bn1.running_var"] = sd["layer2.0.bn1.running_var"][:5]
    with pytest.raises(weights.WeightsError) as e:
        weights.load_torch_state_dict("resnet18", sd)
    text = str(e.value)
    assert "missing tensor 'layer1.0.conv1.weight' (shape (64, 64, 3, 3)" in text
    assert "unexpected tensor(s) 'layer9.weight'" in text
    assert "tensor 'layer2.0.bn1.running_var' has shape (5,), expected (128,)" in text
    with pytest.raises(weights.WeightsError, match="state_dict keys must be tensor names"):
        weights.load_torch_state_dict("resnet18", {1: np.zeros(3)})


def test_prefix_and_head_width_and_num_classes(ts, resnet18):
    m, _ = resnet18
    plain = weights.load_torch_state_dict("resnet18", m.state_dict())
    assert plain["params"]["fc"]["kernel"].shape == (512, 10)  # the state_dict's own head
    wrapped = {f"module.{k}": v for k, v in m.state_dict().items()}  # nn.DataParallel's names
    same = weights.load_torch_state_dict("resnet18", wrapped)
    assert jax.tree.all(jax.tree.map(np.array_equal, plain, same))
    with pytest.raises(weights.WeightsError, match=r"'fc.bias' has shape \(10,\), expected \(7,\)"):
        weights.load_torch_state_dict("resnet18", m.state_dict(), num_classes=7)


def test_files_round_trip(ts, resnet18, tmp_path):
    from safetensors.torch import save_file

    m, pth = resnet18
    want = weights.load_torch_state_dict("resnet18", m.state_dict())
    st = str(tmp_path / "r.safetensors")
    save_file(m.state_dict(), st)
    for source in (pth, st):
        got = weights.load("resnet18", source)
        assert jax.tree.all(jax.tree.map(np.array_equal, want, got)), source
    for dest in ("v.npz", "v_orbax"):
        weights.save(want, tmp_path / dest)
        got = weights.load("resnet18", tmp_path / dest, num_classes=10)
        assert jax.tree.all(jax.tree.map(np.array_equal, want, got)), dest
        with pytest.raises(weights.WeightsError, match="give num_classes"):
            weights.load("resnet18", tmp_path / dest)  # the registered 1000 classes
        with pytest.raises(FileExistsError):
            weights.save(want, tmp_path / dest)


def test_convert_command(ts, resnet18, tmp_path, capsys):
    _, pth = resnet18
    dest = tmp_path / "r.npz"
    assert cli.main(["convert", pth, str(dest), "--model", "resnet18"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "model": "resnet18",
        "source": "torchvision:resnet18",
        "dest": str(dest),
        "params": 11_181_642,
    }  # torchvision's count with a 10-way head
    before = dest.read_bytes()
    with pytest.raises(SystemExit) as e:  # never overwritten
        cli.main(["convert", pth, str(dest), "--model", "resnet18"])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert dest.read_bytes() == before


@pytest.mark.parametrize(
    "suffix, garbage",
    [
        (".pth", b"not a pickle"),
        (".safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
        (".npz", b"PK\x03\x04 truncated"),
    ],
)
def test_corrupt_or_wrong_files_are_one_error_and_write_nothing(
    ts, resnet18, tmp_path, capsys, suffix, garbage
):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(garbage)
    dest = tmp_path / "out.npz"
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(bad), str(dest), "--model", "resnet18"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(bad) in err and err.count("\n") == 1, err
    assert not dest.exists() and os.listdir(tmp_path) == [bad.name]
    # A whole state_dict of another model: one error, nothing written either.
    m = ts.torchvision.models.resnet34(num_classes=10)
    other = tmp_path / "resnet34.pth"
    ts.torch.save(m.state_dict(), other)
    with pytest.raises(SystemExit):
        cli.main(["convert", str(other), str(dest), "--model", "resnet18"])
    assert "unexpected tensor(s) 'layer1.2.bn1.bias'" in capsys.readouterr().err
    assert not dest.exists()


def test_eval_weights_equals_torch_on_the_same_images(ts, resnet18, tmp_path, capsys):
    """`cnnjax eval --weights`: loss and errors over digits' test split, against torch's model
    on the same normalised images."""
    m, pth = resnet18
    assert (
        cli.main(
            [
                "eval",
                "--weights",
                pth,
                "--model",
                "resnet18",
                "--dataset",
                "digits",
                "--image_size",
                "32",
                "--global_batch_size",
                "64",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    pipe = data.Pipeline(
        data.load_dataset("digits", image_size=32, channels=3), 64, normalize="imagenet"
    )
    images = np.concatenate([b["image"][b["mask"]] for b in pipe.eval_batches("test")])
    labels = np.concatenate([b["label"][b["mask"]] for b in pipe.eval_batches("test")])
    with ts.torch.no_grad():
        logits = m(ts.torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    assert got["test_loss"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-4)
    assert got["test_error"] == pytest.approx(np.mean(logits.argmax(1) != labels), abs=1e-9)
    top5 = np.argsort(-logits, 1)[:, :5]
    assert got["test_top5_error"] == pytest.approx(np.mean((top5 != labels[:, None]).all(1)))
    with pytest.raises(SystemExit):
        cli.main(["eval", "--weights", pth, "--model", "resnet18"])
    assert "--weights needs --model NAME and --dataset NAME" in capsys.readouterr().err


def test_cnnjax_does_not_import_torch(tmp_path):
    empty = tmp_path / "w.pth"
    empty.touch()
    code = (
        "import sys, cnnjax.weights, cnnjax.cli, cnnjax.models, cnnjax.train\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "try:\n"
        "    cnnjax.weights.read_state_dict(sys.argv[1])\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(empty)], capture_output=True, text=True, check=True
    ).stdout
    assert "needs torch: pip install 'cnnjax[torch]'" in out, out
