"""cnnjax.bench and cnnjax.xla_flags: flag handling, the implementation registry, the reference
twins (experiments/bench_twins.py, registered by experiments/bench.py), numerics under the CPU
fast path, and small side-by-side runs. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import analysis, bench, cli, models, native, xla_flags
from cnnjax.models.resnet import cifar_resnet
from experiments import bench as experiments_bench
from experiments import bench_twins

YNN = "--xla_cpu_experimental_ynn_fusion_type"


# --------------------------------------------------------------------------- xla_flags


def test_merge_flags_keeps_the_users_value_and_adds_the_rest():
    merged = xla_flags.merge_flags("--xla_a=1 --xla_b=2", "--xla_a=3 --xla_c=4")
    assert merged.split() == ["--xla_a=1", "--xla_b=2", "--xla_c=4"]
    assert xla_flags.merge_flags("", "") == ""


def test_configure_cpu_sets_the_fast_flags_once():
    env: dict[str, str] = {}
    flags = xla_flags.configure_cpu(environ=env)
    assert env["XLA_FLAGS"] == flags == xla_flags.CPU_PRESETS["fast"]
    assert f"{YNN}=individual_dot,reduce,eltwise" in flags.split()
    assert xla_flags.configure_cpu(environ=env) == flags  # idempotent: no duplicate flags


def test_configure_cpu_respects_the_user_and_the_switch():
    mine = f"--xla_force_host_platform_device_count=4 {YNN}="
    user = {"XLA_FLAGS": mine}
    assert xla_flags.configure_cpu(environ=user) == user["XLA_FLAGS"] == mine
    other = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_flags.configure_cpu(environ=other).split() == [
        "--xla_force_host_platform_device_count=4",
        f"{YNN}=individual_dot,reduce,eltwise",
    ]
    off = {"CNNJAX_CPU_FAST": "0"}
    assert xla_flags.configure_cpu(environ=off) == "" and "XLA_FLAGS" not in off
    with pytest.raises(ValueError, match="CNNJAX_CPU_FAST='maybe'"):
        xla_flags.configure_cpu(environ={"CNNJAX_CPU_FAST": "maybe"})


_PAGE_FAULTS = r"""
import os, resource, sys
from cnnjax import xla_flags
# "off": the switch back, as a Python argument (it was an environment variable)
malloc = {"entry": None, "off": False}[sys.argv[1]]
# What every entry point does first (with malloc=None); on a CPU host it calls tune_malloc().
xla_flags.configure_cpu(malloc=malloc)
import jax, jax.numpy as jnp
x = jnp.ones((1024, 1024), jnp.float32)
# Large temporaries (the matmul's operands and its packing buffers), a scalar out.
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x) @ jnp.tanh(x[::-1])))
for _ in range(6):  # tuned, the heap grows by a block now and then over the first calls, then stays
    f(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults.sort()
print(xla_flags.malloc_wanted(malloc=malloc), faults[len(faults) // 2])  # the median call
"""


def _faults_per_call(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "CNNJAX_CPU_FAST"}
    env["JAX_PLATFORMS"] = "cpu"
    if mode == "off":
        # glibc's mmap threshold adapts to the blocks freed before (untuned medians of 3k-66k faults
        # per call); fixed at 1 MiB, every large temporary is mmapped, as glibc always does for
        # blocks over 32 MiB such as a ResNet-20 step's 281 MiB.
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    proc = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wanted, faults = proc.stdout.split()[-2:]
    return wanted, float(faults)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_tune_malloc_stops_the_per_call_page_faults():
    # glibc mmaps each large block and unmaps it on free, so every call of a compiled function
    # page-faults its temporaries anew (PERFORMANCE.md section 8); tuned, the memory is reused.
    # The median call after a warm-up: tuned, the heap still grows by 4 MiB (1,024 faults) now and
    # then in the first calls.
    wanted, faults = _faults_per_call("entry")
    wanted_off, faults_off = _faults_per_call("off")
    assert wanted == "True" and wanted_off == "False"
    assert faults_off > 5000 and faults < faults_off / 10, (faults, faults_off)


def test_the_allocator_is_tuned_on_cpu_hosts_only():
    cpu, gpu = {"JAX_PLATFORMS": "cpu"}, {"JAX_PLATFORMS": "cuda,cpu"}
    assert not xla_flags.accelerator_expected(cpu) and xla_flags.accelerator_expected(gpu)
    assert xla_flags.malloc_wanted(cpu) and not xla_flags.malloc_wanted(gpu)
    assert not xla_flags.malloc_wanted(cpu, malloc=False)  # the switch back (configure_cpu's)
    assert xla_flags.malloc_wanted(gpu, malloc=True)  # asked for on an accelerator host
    # CNNJAX_CPU_FAST=0 leaves the allocator alone, even when asked for
    off = {**cpu, "CNNJAX_CPU_FAST": "off"}
    assert not xla_flags.malloc_wanted(off) and not xla_flags.malloc_wanted(off, malloc=True)
    assert not xla_flags.tune_malloc(gpu) and not xla_flags.tune_malloc(cpu, malloc=False)
    assert not xla_flags.tune_malloc(off, malloc=True)
    with pytest.raises(ValueError, match="CNNJAX_CPU_FAST='maybe'"):
        xla_flags.malloc_wanted({"CNNJAX_CPU_FAST": "maybe"})


def test_flags_unknown_to_this_jaxlib_are_left_out():
    assert xla_flags.jaxlib_knows("xla_cpu_experimental_ynn_fusion_type")
    assert not xla_flags.jaxlib_knows("xla_cpu_no_such_flag_in_any_version")
    env: dict[str, str] = {}
    with pytest.warns(UserWarning, match="does not know.*xla_cpu_no_such_flag"):
        flags = xla_flags.configure_cpu(
            "--xla_cpu_no_such_flag=1 --xla_cpu_enable_fast_math=false", environ=env
        )
    assert flags == env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"


def test_configure_cpu_warns_once_jax_has_started(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("CNNJAX_CPU_FAST", raising=False)
    jax.devices()  # the backend is running: new flags would be ignored
    with pytest.warns(UserWarning, match="after JAX initialised its backend"):
        assert xla_flags.configure_cpu() == ""
    assert "XLA_FLAGS" not in os.environ


def test_resolve_presets_and_flag_strings():
    assert xla_flags.resolve("default") == ""
    assert xla_flags.resolve("no_ynn") == f"{YNN}="
    assert xla_flags.resolve(" --xla_cpu_use_onednn=true ") == "--xla_cpu_use_onednn=true"
    with pytest.raises(ValueError, match="unknown XLA configuration 'fastest'.*default"):
        xla_flags.resolve("fastest")


def test_worker_flags_drop_inherited_preset_flags_only():
    inherited = f"--xla_force_host_platform_device_count=2 {YNN}=individual_dot,reduce,eltwise"
    assert (
        bench.worker_xla_flags("default", inherited) == "--xla_force_host_platform_device_count=2"
    )
    no_ynn = bench.worker_xla_flags("no_ynn", inherited).split()
    assert no_ynn == [f"{YNN}=", "--xla_force_host_platform_device_count=2"]


# --------------------------------------------------------------------------- specs and twins


@pytest.fixture
def twins(monkeypatch):
    """The Flax and PyTorch twins registered as `python -m experiments.bench` does; the
    library's registry is as before after the test."""
    monkeypatch.setattr(bench, "_RUNNERS", dict(bench._RUNNERS))
    monkeypatch.setattr(bench, "_DEFAULTS", list(bench._DEFAULTS))
    experiments_bench.register_twins()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(impl="tf"), "impl='tf'"),
        (dict(dtype="float16"), "dtype='float16'"),
        (dict(batch_size=0), "batch_size"),
        (dict(threads=-1), "threads"),
        (dict(xla="bogus"), "unknown XLA configuration"),
        (
            dict(xla="--xla_cpu_no_such_flag=1"),
            r"\['--xla_cpu_no_such_flag=1'\], which the installed jaxlib does not define",
        ),
        (dict(conv_vjp="cudnn"), "conv_vjp='cudnn'"),
        (dict(bn_vjp="cudnn"), "bn_vjp='cudnn'"),
        (dict(malloc="jemalloc"), "malloc='jemalloc'"),
        (dict(conv_backend="mkldnn"), "conv_backend='mkldnn'"),
        (dict(bn_backend="cudnn"), "bn_backend='cudnn'"),
        (dict(conv_weights="brgemm"), "conv_weights='brgemm'"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.Spec(**kwargs).validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(impl="flax", model="resnet50"), "model='resnet50'.*CIFAR"),
        (dict(impl="torch-cl", model="vgg16"), "model='vgg16'"),
        (dict(impl="flax", scan_blocks=True), "scan_blocks"),
        (dict(impl="flax", conv_vjp="xla"), "conv_vjp is a cnnjax option"),
        (dict(impl="torch-cl", bn_vjp="autodiff"), "bn_vjp is a cnnjax option"),
        (dict(impl="flax", conv_backend="onednn"), "conv_backend is a cnnjax option"),
        (dict(impl="torch-cl", bn_backend="native"), "bn_backend is a cnnjax option"),
        (dict(impl="flax", conv_weights="onednn"), "conv_weights is a cnnjax option"),
    ],
)
def test_twin_spec_validation(twins, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.Spec(**kwargs).validate()


def test_unknown_impl_is_one_clear_error(capsys, monkeypatch):
    # The library offers its own implementation only; the twins' names point to the script that
    # registers them, other names get the choices alone.
    monkeypatch.setattr(bench, "_RUNNERS", dict(bench._RUNNERS))
    monkeypatch.setattr(bench, "_DEFAULTS", list(bench._DEFAULTS))
    assert bench.implementations() == ("cnnjax",)
    for impl in ("flax", "torch-cl", "torch-nchw"):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--model", "resnet20", "--impl", "cnnjax", impl])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1, err
        assert f"impl={impl!r}; choose one of ('cnnjax',)" in err
        assert "run by `python -m experiments.bench`" in err
        with pytest.raises(ValueError, match="python -m experiments.bench"):
            bench.Spec(impl).validate()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--impl", "tf"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "impl='tf'; choose one of ('cnnjax',)" in err
    assert "experiments" not in err
    p = cli.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args([]).impl == ["cnnjax"]  # `cnnjax bench` alone: the library's default
    # With the twins registered: the script's choices, the default as before the split.
    with pytest.raises(SystemExit) as e:
        experiments_bench.main(["--impl", "tf"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m experiments.bench: error: ")
    assert "choose one of ('cnnjax', 'flax', 'torch-cl', 'torch-nchw')" in err
    p = cli.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args([]).impl == ["cnnjax", "flax", "torch-cl"]
    for name, runner in (("x y", "m:a"), ("x", "not a path"), ("x", "m.a")):
        with pytest.raises(ValueError):
            bench.register(name, runner)
    with pytest.raises(ValueError, match="cannot be imported"):
        bench.Spec("mine", runner="experiments.bench_twins:NoSuchRunner").validate()


_OUTSIDE = """
from cnnjax import bench


class Mine(bench.JaxRunner):  # cnnjax's model, from a module that no installed package holds
    pass
"""


def test_a_twin_runs_through_its_registered_import_path(twins, monkeypatch, tmp_path):
    # Each spec carries its runner's import path; the worker imports it. experiments/ is not
    # installed: the worker, started elsewhere with cnnjax alone on its path, finds it through
    # the PYTHONPATH that worker_env adds. (A stale editable install may still map experiments/;
    # the module written here is on no path but the parent's, whatever is installed.)
    src = tmp_path / "src"
    src.mkdir()
    (src / "outside_runner.py").write_text(_OUTSIDE)
    monkeypatch.syspath_prepend(str(src))
    bench.register("mine", "outside_runner:Mine")
    specs = [bench.Spec("flax", "resnet20", batch_size=2, xla="fast")]
    if importlib.util.find_spec("torch") is not None:
        specs.append(bench.Spec("torch-nchw", "resnet20", batch_size=2))
    specs.append(bench.Spec("mine", "lenet5", batch_size=2, xla="fast"))
    checked = [s.validate() for s in specs]
    assert checked[0].runner == "experiments.bench_twins:FlaxTwinRunner" and not specs[0].runner
    root = os.path.dirname(os.path.dirname(os.path.abspath(bench_twins.__file__)))
    assert bench.worker_env(checked[0], {"PYTHONPATH": "/x"})["PYTHONPATH"] == f"{root}:/x"
    assert bench.worker_env(checked[-1], {})["PYTHONPATH"] == str(src)
    assert "PYTHONPATH" not in bench.worker_env(bench.Spec("cnnjax", "lenet5"), {})
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "cnnjax").symlink_to(os.path.dirname(os.path.abspath(bench.__file__)))
    kept = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and os.path.abspath(p) != root
    ]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(lib), *kept]))
    monkeypatch.chdir(tmp_path)
    result = bench.run(specs, rounds=1, steps=1, matmul_n=0, log=None)
    labels = ["flax[fast]", "torch-nchw", "mine[fast]"]
    assert [w["label"] for w in result["workers"]] == [s.label for s in checked]
    assert [s.label for s in checked] == labels[: len(specs) - 1] + labels[-1:]
    macs = {
        m: analysis.summary(m, models.get_spec(m).input_shape).total_macs
        for m in ("resnet20", "lenet5")
    }
    assert result["workers"][0]["macs_per_image"] == macs["resnet20"]
    for w, spec in zip(result["workers"], checked):
        assert w["spec"]["runner"] == spec.runner
        for mode, factor in (("train", 6), ("eval", 2)):
            r = w["modes"][mode]
            assert len(r["per_round"]) == 1 and r["images_per_s"] > 0
            want = r["images_per_s"] * factor * macs[spec.model] / 1e9
            assert r["gflops"] == pytest.approx(want)
    assert result["workers"][0]["onednn_calls"] == 0  # nn.Conv: XLA's convolutions
    if len(specs) > 2:
        assert result["workers"][1]["torch"] and "xla_flags" not in result["workers"][1]


def test_gradient_paths_multiply_the_cnnjax_workers_only(twins):
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(
        [
            "--impl",
            "cnnjax",
            "flax",
            "--conv_vjp",
            "auto",
            "xla",
            "--bn_vjp",
            "auto",
            "autodiff",
            "--xla",
            "fast",
        ]
    )
    assert [s.label for s in bench.specs_from_args(args)] == [
        "cnnjax[fast]",
        "cnnjax[fast,bn=autodiff]",
        "cnnjax[fast,vjp=xla]",
        "cnnjax[fast,vjp=xla,bn=autodiff]",
        "flax[fast]",
    ]
    args = p.parse_args(
        ["--impl", "cnnjax", "flax", "--conv_backend", "auto", "xla", "--xla", "fast"]
    )
    assert [s.label for s in bench.specs_from_args(args)] == [
        "cnnjax[fast]",
        "cnnjax[fast,conv=xla]",
        "flax[fast]",
    ]
    args = p.parse_args(
        ["--impl", "cnnjax", "flax", "--bn_backend", "auto", "xla", "--xla", "fast"]
    )
    assert [s.label for s in bench.specs_from_args(args)] == [
        "cnnjax[fast]",
        "cnnjax[fast,bn_lib=xla]",
        "flax[fast]",
    ]
    args = p.parse_args(
        ["--impl", "cnnjax", "flax", "--conv_weights", "auto", "onednn", "--xla", "fast"]
    )
    specs = bench.specs_from_args(args)
    assert [s.label for s in specs] == ["cnnjax[fast]", "cnnjax[fast,dw=onednn]", "flax[fast]"]
    # 'auto' is the library's default whatever the parent set; a choice is passed on.
    assert bench.worker_settings(specs[0])["conv_weights"] == "auto"
    assert bench.worker_settings(specs[1])["conv_weights"] == "onednn"
    assert not any(k.startswith("CNNJAX_CONV") for k in bench.worker_env(specs[1], {}))
    # The allocator setting applies to every implementation, torch included.
    args = p.parse_args(
        ["--impl", "cnnjax", "torch-cl", "--malloc", "auto", "default", "--xla", "fast"]
    )
    labels = [s.label for s in bench.specs_from_args(args)]
    assert labels[:2] == ["cnnjax[fast]", "cnnjax[fast,malloc=default]"]
    assert labels[2:] in (
        [],
        ["torch-cl", "torch-cl[malloc=default]"],
    )  # torch only where installed


def test_default_xla_configuration_follows_the_host(twins):
    # 'auto': the CPU fast path on a CPU host, XLA's own settings where a GPU/TPU is expected (its
    # CPU flags do nothing there).
    import argparse

    assert (
        bench.auto_xla({"JAX_PLATFORMS": "cpu"}) == "fast"
    )  # this jaxlib defines the preset's flag
    assert (
        bench.auto_xla({"JAX_PLATFORMS": "cuda"})
        == bench.auto_xla({"JAX_PLATFORMS": "tpu,cpu"})
        == "default"
    )
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    specs = bench.specs_from_args(p.parse_args(["--impl", "cnnjax", "flax"]))
    assert [s.xla for s in specs] == [bench.auto_xla()] * 2


def test_cli_reports_bad_arguments(twins, capsys):
    with pytest.raises(SystemExit) as e:
        experiments_bench.main(["--model", "resnet50", "--impl", "flax"])
    assert e.value.code == 2
    assert "model='resnet50'" in capsys.readouterr().err
    # Each fails at once (the unknown model used to be "skipped" with exit status 0, the --json
    # path was opened only after the whole benchmark, and a negative matmul size was taken).
    for argv, message in (
        (["--model", "foo", "--impl", "cnnjax"], "unknown model 'foo'"),
        (["--model", "lenet5", "--impl", "cnnjax", "--matmul", "-5"], "matmul=-5"),
        (["--model", "lenet5", "--impl", "cnnjax", "--json", "/no/such/dir/x.json"], "--json"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def _init(model, x):
    # Jitted, with an rbg key: eager or threefry initialisation compiles 5-10x longer on CPU.
    return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(2, impl="rbg"))


def test_flax_twin_has_the_cnnjax_layout_and_computes_the_same_function():
    def shapes(m):
        x = jnp.zeros((1, 32, 32, 3))
        variables = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
        return jax.tree.map(lambda a: a.shape, variables)

    twin = bench_twins.flax_cifar_resnet
    assert shapes(twin(20)) == shapes(models.create("resnet20"))
    assert shapes(twin(20, plain=True)) == shapes(models.create("plain20"))

    ours, twin = cifar_resnet(8), bench_twins.flax_cifar_resnet(8)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    v = _init(ours, x)
    v = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a + 0.1, v["batch_stats"])}
    both = jax.jit(
        lambda m, v, x: (
            m.apply(v, x, train=False),
            m.apply(v, x, train=True, mutable=["batch_stats"]),
        ),
        static_argnums=0,
    )
    e1, (y1, u1) = both(ours, v, x)
    e2, (y2, u2) = both(twin, v, x)
    np.testing.assert_allclose(e2, e1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y2, y1, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), u1, u2)


def test_torch_twin_has_the_same_parameters_and_outputs():
    torch = pytest.importorskip("torch")
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(bench_twins.torch_cifar_resnet(20)) == 269_722
    assert count(bench_twins.torch_cifar_resnet(20, plain=True)) == 269_722

    ours, net = cifar_resnet(8), bench_twins.torch_cifar_resnet(8)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    v = _init(ours, x)
    p, s = v["params"], jax.tree.map(lambda a: a + 0.1, v["batch_stats"])
    t = lambda a: torch.from_numpy(np.asarray(a).copy())  # noqa: E731

    def load(conv, bn, name, block=None):
        src_p, src_s = (p, s) if block is None else (p[block], s[block])
        conv.weight.data = t(np.transpose(src_p[name[0]]["kernel"], (3, 2, 0, 1)))
        bn.weight.data, bn.bias.data = t(src_p[name[1]]["scale"]), t(src_p[name[1]]["bias"])
        bn.running_mean.data, bn.running_var.data = (
            t(src_s[name[1]]["mean"]),
            t(src_s[name[1]]["var"]),
        )

    load(net[0], net[1], ("stem_conv", "stem_bn"))
    for i, block in enumerate(("stage1_block1", "stage2_block1", "stage3_block1")):
        load(net[3 + i].conv1, net[3 + i].bn1, ("conv1", "bn1"), block)
        load(net[3 + i].conv2, net[3 + i].bn2, ("conv2", "bn2"), block)
    net[8].weight.data, net[8].bias.data = t(p["fc"]["kernel"].T), t(p["fc"]["bias"])
    net.eval()
    with torch.no_grad():
        out = net(t(np.transpose(x, (0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(
        out, ours.apply({"params": p, "batch_stats": s}, x, train=False), rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------ numerics under each XLA configuration

_PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from cnnjax import functional as F
from cnnjax.models.resnet import cifar_resnet
from cnnjax.train import create_train_state, make_train_step

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
out = {}
for s in (1, 2):
    f = lambda x, w: F.conv2d(x, w, stride=s, padding=1)
    y, vjp = jax.vjp(jax.jit(f), x, w)
    gx, gw = vjp(jnp.ones_like(y))
    out[f"conv{s}"] = [np.asarray(a).tolist() for a in (y, gx, gw)]

model, tx = cifar_resnet(8), optax.sgd(0.1, momentum=0.9)
state = create_train_state(jax.random.key(0, impl="rbg"), model, tx, (32, 32, 3))
batch = {"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)), "label": jnp.arange(8) % 10}
step = make_train_step(model, tx, lambda s: 0.1, axis_name=None, rng_impl="rbg")
step = jax.jit(step).lower(state, batch).compile()
for _ in range(2):
    state, metrics = step(state, batch)
out["loss"] = float(metrics["loss"])
out["params"] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.params)]).tolist()
out["stats"] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.batch_stats)]).tolist()
# The filter gradient of a 32x32x16 layer: the convolution YNNPACK took in XLA's defaults.
conv = lambda x, w: F.conv2d(x, w, padding=1)
gw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
a = jax.ShapeDtypeStruct((8, 32, 32, 16), jnp.float32)
hlo = gw.lower(a, jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32), a).compile().as_text()
out["ynn_conv"] = "__ynn_fusion" in hlo
out["ynn_fusions"] = step.as_text().count('"__ynn_fusion"')
print("RESULT " + json.dumps(out))
"""


def _numpy_conv(x, w, s, p):
    """out[n,i,j,o] = sum_{a,b,c} xpad[n, i*s+a, j*s+b, c] w[a,b,c,o], and its gradients for
    dy = 1."""
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).astype(np.float64)
    kh, kw = w.shape[:2]
    ho, wo = (xp.shape[1] - kh) // s + 1, (xp.shape[2] - kw) // s + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    gxp, gw = np.zeros_like(xp), np.zeros(w.shape)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * s : i * s + kh, j * s : j * s + kw, :]
            y[:, i, j] = np.einsum("nabc,abco->no", patch, w)
            gw += patch.sum(0)[..., None]
            gxp[:, i * s : i * s + kh, j * s : j * s + kw, :] += w.sum(-1)
    return y, gxp[:, p:-p, p:-p, :], gw


@pytest.fixture(scope="module")
def probes():
    procs = {}
    for config in ("fast", "default"):  # side by side: two processes, two cores
        env = dict(
            os.environ,
            XLA_FLAGS=xla_flags.resolve(config),
            CNNJAX_CPU_FAST="0",
            JAX_PLATFORMS="cpu",
        )
        procs[config] = subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for config, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[config] = json.loads(
            next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]
        )
    return out


@pytest.mark.parametrize("config", ["fast", "default"])
def test_conv_matches_numpy_under_each_configuration(probes, config):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    for s in (1, 2):
        for got, want in zip(probes[config][f"conv{s}"], _numpy_conv(x, w, s, 1)):
            np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-4)


def test_fast_path_trains_like_xla_defaults(probes):
    fast, default = probes["fast"], probes["default"]
    assert fast["ynn_fusions"] > 0, "the fast flags did not take effect (no YNNPACK fusion formed)"
    assert not fast["ynn_conv"], "a convolution went to YNNPACK under the fast flags"
    assert np.isfinite(fast["loss"])
    np.testing.assert_allclose(fast["loss"], default["loss"], rtol=1e-5)
    np.testing.assert_allclose(fast["params"], default["params"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast["stats"], default["stats"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ a small side-by-side run


def test_run_side_by_side():
    specs = [
        bench.Spec("cnnjax", "lenet5", batch_size=4, xla="fast"),
        bench.Spec(
            "cnnjax",
            "lenet5",
            batch_size=4,
            xla="default",
            conv_vjp="xla",
            bn_vjp="autodiff",
            conv_backend="xla",
            bn_backend="xla",
        ),
    ]
    result = bench.run(specs, rounds=2, steps=1, matmul_n=64, log=None)
    assert [w["label"] for w in result["workers"]] == [
        "cnnjax[fast]",
        "cnnjax[default,vjp=xla,bn=autodiff,conv=xla,bn_lib=xla]",
    ]
    ref, other = result["workers"]
    assert ref["ratio"]["train"]["median"] == 1.0 == ref["ratio"]["eval"]["median"]
    macs = (
        28 * 28 * 5 * 5 * 1 * 20 + 14 * 14 * 5 * 5 * 20 * 50 + 2450 * 500 + 500 * 10
    )  # the lecture's LeNet-5
    for w in result["workers"]:
        assert w["macs_per_image"] == macs
        for mode, factor in (("train", 6), ("eval", 2)):
            r = w["modes"][mode]
            assert len(r["per_round"]) == 2 and r["images_per_s"] == pytest.approx(
                np.median(r["per_round"])
            )
            assert r["gflops"] == pytest.approx(r["images_per_s"] * factor * macs / 1e9)
        assert w["peak_rss_mib"] > 0 and w["matmul_gflops"] > 0 and w["compile_train_s"] > 0
    assert ref["xla_flags"] == xla_flags.CPU_PRESETS["fast"] and other["xla_flags"] == ""
    assert ref["conv_vjp"] == "auto" and other["conv_vjp"] == "xla"
    assert (
        ref["bn_vjp"] == "auto" and other["bn_vjp"] == "autodiff"
    )  # what each worker process really ran
    assert ref["conv_backend"] == "auto" and other["conv_backend"] == "xla"
    assert ref["bn_backend"] == "auto" and other["bn_backend"] == "xla"
    assert ref["native_bn_calls"] == other["native_bn_calls"] == 0  # LeNet-5 has no BatchNorm
    # 'auto' ran LeNet-5's two convolutions on oneDNN (where available: CPU, oneDNN installed).
    assert other["onednn_calls"] == 0 and other["onednn"] is None
    onednn_expected = ref["platform"] == "cpu" and native.available()
    assert (ref["onednn_calls"] >= 4) is onednn_expected and (
        ref["onednn"] is not None
    ) is onednn_expected
    assert (
        ref["conv_weights"] == ("auto" if onednn_expected else None)
        and other["conv_weights"] is None
    )
    assert ref["direct_weights_kernel"] is (
        native.direct_conv_weights() if onednn_expected else None
    )
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert ref["malloc_tuned"] is (
        glibc and xla_flags.malloc_wanted()
    )  # auto: as the entry points do
    # The ratio is taken round by round (same load), then the median.
    per_round = [
        b / a
        for a, b in zip(ref["modes"]["train"]["per_round"], other["modes"]["train"]["per_round"])
    ]
    assert other["ratio"]["train"]["median"] == pytest.approx(np.median(per_round))
    for w in result["workers"]:
        for r in w["modes"].values():  # no peak: no MFU
            assert r["step_ms"] == pytest.approx(
                1e3 * np.median([4 / ips for ips in r["per_round"]])
            )
            assert r["mfu"] is None
        assert (
            w["peak_tflops"] is None
        )  # float32: no single datasheet peak (TF32 or not), on any device
    report = bench.format_report(result)
    assert all(s.label in report for s in specs) and "matmul ceiling (GFLOP/s, float32" in report
    on_accelerator = (
        result["workers"][0]["platform"] != "cpu"
    )  # the suite also runs on GPU machines
    assert ("accelerator:" in report) is on_accelerator and "MFU:" not in report


@pytest.mark.slow
def test_torch_runner_steps_and_matmul():
    torch = pytest.importorskip("torch")
    runner = bench_twins.TorchRunner(bench.Spec("torch-cl", "resnet20", batch_size=2))
    before = [p.detach().clone() for p in runner.net.parameters()]
    runner.step("train", 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, runner.net.parameters()))
    assert runner.x.is_contiguous(memory_format=torch.channels_last)
    runner.step("eval", 1)
    gflops, n = runner.matmul(32, 1)
    assert not runner.net.training and gflops > 0 and n == 32


def test_matmul_ceiling_shrinks_where_products_are_slow():
    # A runner whose products take 2 n^3 / rate seconds: at 1 GFLOP/s (PyTorch bf16 on an AVX2
    # CPU) n = 2048 would take 17 s a product; the ceiling is taken at the n of about 0.5 s.
    class Fake(bench.Runner):
        def __init__(self, rate):
            self.rate = rate

        def product(self, n):
            return lambda: time.sleep(2 * n**3 / self.rate)

    gflops, n = Fake(1e9).matmul(2048, 1)
    assert (
        500 <= n <= 630 and 0.7 < gflops <= 1.0
    )  # (1e9 * 0.5 / 2) ** (1/3) = 630; sleep only overshoots
    gflops, n = Fake(1e13).matmul(2048, 1)
    assert n == 2048 and gflops > 1e3


def test_peak_table_names_the_right_part():
    # jax.Device.device_kind strings as the runtimes give them; the PCIe H100 is not the SXM part.
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312.0
    assert (
        bench.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
        and bench.peak_tflops("TPU v5", "bfloat16") == 459.0
    )
    assert (
        bench.peak_tflops("NVIDIA H100 80GB HBM3", "float32") is None
    )  # TF32 or not: no single peak
    assert bench.peak_tflops("cpu", "bfloat16") is None


def test_report_gives_mfu_against_the_peak():
    entry = {
        "label": "cnnjax[default]",
        "spec": {"dtype": "bfloat16"},
        "device": "NVIDIA H200",
        "platform": "gpu",
        "peak_tflops": 989.4,
        "compile_train_s": 40.0,
        "matmul_gflops": 7e5,
        "ratio": {"train": {"median": 1.0, "min": 1.0, "max": 1.0}},
        "modes": {
            "train": {
                "images_per_s": 5000.0,
                "best_images_per_s": 5100.0,
                "step_ms": 51.2,
                "images_per_cpu_s": 5000.0,
                "gflops": 122_700.0,
                "fraction_of_matmul": 0.175,
                "mfu": 0.124,
            }
        },
    }
    result = {
        "machine": {"cpu": "x", "cores": 16, "simd": []},
        "load_start": (0, 0, 0),
        "load_end": (0, 0, 0),
        "rounds": 1,
        "steps": 1,
        "reference": "cnnjax[default]",
        "workers": [entry],
    }
    report = bench.format_report(result)
    assert "accelerator: NVIDIA H200" in report and " 12.4 " in report and "989.4 TFLOP/s" in report
    assert "bfloat16 square matmul" in report


def test_mfu_is_model_flops_over_the_peak():
    # A worker on an H200 at bfloat16: 256 images in 35 ms, 4.089 G multiply-adds per image.
    from types import SimpleNamespace

    spec = bench.Spec("cnnjax", "resnet50", batch_size=256, dtype="bfloat16", xla="default")
    info = {
        "ready": True,
        "macs_per_image": 4_089_184_256,
        "peak_tflops": 989.4,
        "device": "NVIDIA H200",
    }
    w = SimpleNamespace(spec=spec, info=info)
    entry = bench._summarise(
        w,
        {"train": [0.035, 0.035], "eval": [0.010]},
        {"train": [0.04, 0.04], "eval": [0.01]},
        {"gflops": 664_195.0, "n": 8192},
        2490.0,
        [w],
    )
    train, evaluate = entry["modes"]["train"], entry["modes"]["eval"]
    flops = 256 / 0.035 * 6 * 4_089_184_256  # 6 multiply-adds' worth of FLOPs per trained image
    assert train["gflops"] == pytest.approx(flops / 1e9) and train["mfu"] == pytest.approx(
        flops / 989.4e12
    )
    assert train["mfu"] == pytest.approx(0.1814, abs=1e-4)  # PERFORMANCE.md's H200 figure, 18.1%
    assert evaluate["mfu"] == pytest.approx(256 / 0.010 * 2 * 4_089_184_256 / 989.4e12)
    assert (
        train["fraction_of_matmul"] == pytest.approx(flops / 664_195e9)
        and entry["matmul_n"] == 8192
    )
    assert (
        train["step_ms"] == pytest.approx(35.0)
        and entry["peak_rss_mib"] == 2490.0
        and "ready" not in entry
    )


def test_workers_share_an_accelerator():
    # Two JAX workers on one GPU: neither may take 75% of its memory at start; the user's choice
    # wins.
    spec = bench.Spec("cnnjax", "lenet5")
    assert bench.worker_env(spec, {})["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert (
        bench.worker_env(spec, {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})[
            "XLA_PYTHON_CLIENT_PREALLOCATE"
        ]
        == "true"
    )


def test_bench_auto_allocator_follows_the_entry_points():
    # 'auto' is what an entry point would do: tuned on a CPU host, not where a GPU/TPU is expected,
    # and left alone under CNNJAX_CPU_FAST=0 (configure_cpu() then changes nothing). Each worker
    # gets CNNJAX_CPU_FAST=0 itself, so the parent decides and the choice reaches the worker in
    # its spec ('tuned' or 'default'), not in an environment variable; 'tuned' and 'default'
    # pass as they are, whatever the parent's environment.
    auto, tuned, default = (bench.Spec("cnnjax", "lenet5", malloc=m) for m in bench.MALLOCS)
    cases = (
        ({}, True),
        ({"CNNJAX_CPU_FAST": "0"}, False),
        ({"CNNJAX_CPU_FAST": "1"}, True),
        ({"JAX_PLATFORMS": "cuda,cpu"}, False),
    )
    for extra, wanted in cases:
        parent = {"JAX_PLATFORMS": "cpu", **extra}
        sent = bench.worker_spec(auto, parent)
        assert sent == dataclasses.replace(auto, malloc="tuned" if wanted else "default")
        assert bench.worker_spec(tuned, parent) == tuned
        assert bench.worker_spec(default, parent) == default
        env = bench.worker_env(auto, parent)
        assert env["CNNJAX_CPU_FAST"] == "0", parent
        # nothing about the allocator in the worker's environment: what it adds are these
        added = set(env) - set(parent)
        assert added <= {"CNNJAX_CPU_FAST", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE"}, parent
    assert bench.worker_env(auto, {})["XLA_FLAGS"] == xla_flags.CPU_PRESETS["fast"]


def test_a_worker_applies_its_specs_allocator_first(monkeypatch, capsys):
    # The worker tunes (or not) as its spec says, before it builds anything (before JAX starts);
    # a bad dtype makes it stop right after, with an error message to the parent.
    calls = []
    monkeypatch.setattr(xla_flags, "tune_malloc", lambda **k: calls.append(k) or True)
    cases = (("tuned", [{"force": True}]), ("default", []), ("auto", [{"force": False}]))
    for malloc, called in cases:
        calls.clear()
        spec = bench.Spec("cnnjax", "lenet5", dtype="float8", malloc=malloc)
        assert bench.worker_main(json.dumps(dataclasses.asdict(spec))) == 1
        assert calls == called, malloc
        assert "dtype='float8'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "module",
    [
        "cnnjax.cli",
        "experiments.batchnorm_study",
        "experiments.bench_data",
        "experiments.bn_folding",
        "experiments.cost_arguments",
        "experiments.cost_vs_accuracy",
        "experiments.degradation",
        "experiments.filters",
        "experiments.lenet_mnist",
        "experiments.receptive_fields",
    ],
)
def test_every_entry_point_configures_the_cpu_first(module, monkeypatch):
    import importlib

    calls = []
    monkeypatch.setattr(xla_flags, "configure_cpu", lambda *a, **k: calls.append(a) or "")
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0 and calls == [
        ()
    ]  # called once, with the measured preset, before parsing


def test_engine_benchmark_runs_a_variant_against_the_host_baseline(tmp_path):
    # experiments/bench_engine.py end to end on its cheapest setting (one variant, 2 steps a round).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    try:
        import bench_engine
    finally:
        sys.path.pop(0)
    out = tmp_path / "engine.json"
    argv = [
        "--model",
        "resnet20",
        "--batch_size",
        "8",
        "--steps_per_dispatch",
        "2",
        "--steps",
        "2",
        "--rounds",
        "2",
        "--seeds",
        "--variants",
        "device_x2",
        "--parallel",
        "none",
        "--json",
        str(out),
    ]
    assert bench_engine.main(argv) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert sorted(run["variants"]) == ["device_x2", "host"] and run["batch_size"] == 8
    host, device = run["variants"]["host"], run["variants"]["device_x2"]
    assert host["ratio_to_host"] == 1.0 and host["members"] == device["members"] == 1
    assert len(device["rounds_s"]) == 2 and device["images_per_s"] > 0
    assert device["ratio_to_host"] == pytest.approx(
        device["images_per_s"] / host["images_per_s"], rel=0.5
    )
