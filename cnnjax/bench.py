"""Train- and eval-step benchmark of cnnjax against reference implementations, one run side by side.

    python -m cnnjax bench --model resnet20 --batch-size 128
    python -m cnnjax bench --model resnet56 --impl cnnjax flax torch-cl --xla fast default

Every implementation x XLA configuration is a worker process (XLA reads its flags once, at
start): `cnnjax` (the registry model), `flax` (a twin built from flax.linen `nn.Conv` and
`nn.BatchNorm`), `torch-cl` / `torch-nchw` (the same network in PyTorch, channels-last or NCHW;
only when torch is installed, never a cnnjax dependency). The workers compile one after the other
(compile times are not contended by each other), then run interleaved rounds, the order rotating
each round, so that a noisy shared machine loads them alike; the ratios of images/s are taken per
round against the first worker and their median is what to quote. Also reported: compile time,
the compiled step's memory and the process's peak RSS, achieved GFLOP/s (6 x multiply-adds per
image for a train step, 2 x for an eval step), a measured matrix-multiply ceiling in the compute
dtype and, on a known GPU/TPU at bfloat16, the MFU against the datasheet peak (`PEAK_BF16_TFLOPS`).
On a GPU the PyTorch twin runs on the GPU too (CUDA, autocast for bfloat16), and the workers share
the card (`worker_env`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from cnnjax import xla_flags

IMPLS = ("cnnjax", "flax", "torch-cl", "torch-nchw")
CONV_VJPS, BN_VJPS = xla_flags.CONV_VJP_MODES, xla_flags.BN_VJP_MODES  # cnnjax.functional's gradient paths
CONV_BACKENDS = xla_flags.CONV_BACKENDS  # who computes cnnjax.functional.conv2d
BN_BACKENDS = xla_flags.BN_BACKENDS  # who computes cnnjax.functional.batch_norm's passes
CONV_WEIGHTS = xla_flags.CONV_WEIGHTS  # who computes the filter gradients of cnnjax's oneDNN convolutions
MALLOCS = ("auto", "tuned", "default")  # the C allocator: as entry points set it, cnnjax.xla_flags.tune_malloc(), glibc's
MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
_PREFIX = "@@bench "
_CIFAR = re.compile(r"^(resnet|plain)(\d+)$")

# Dense bf16 peak TFLOP/s by device kind (vendors' datasheets, without sparsity), for MFU:
# achieved model FLOP/s over this. Matched in order against jax.Device.device_kind.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L4", 121.0), ("A10G", 70.0),
    ("TPU v6", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0),
)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One worker: an implementation of a model under one XLA configuration.

    Args:
      impl: one of IMPLS.
      model: registered model name ('resnet20'); the flax and torch twins cover the CIFAR
        ResNets and plain nets (depth 6n+2).
      batch_size: images per step.
      dtype: compute dtype; 'bfloat16' keeps float32 parameters and BN statistics (torch: autocast).
      xla: a `cnnjax.xla_flags.CPU_PRESETS` name or an XLA flag string (JAX workers only).
      scan_blocks: build the cnnjax ResNet with scanned blocks (compile-time option).
      conv_vjp: cnnjax's convolution gradient path, `cnnjax.functional.CONV_VJP` ('auto',
        'canonical' or 'xla'; cnnjax workers only).
      bn_vjp: cnnjax's BatchNorm training gradient path, `cnnjax.functional.BN_VJP` ('auto', 'fused'
        or 'autodiff'; cnnjax workers only).
      conv_backend: the library of cnnjax's convolutions, `cnnjax.functional.CONV_BACKEND` ('auto',
        'onednn' or 'xla'; cnnjax workers only).
      bn_backend: who computes cnnjax's BatchNorm passes, `cnnjax.functional.BN_BACKEND` ('auto',
        'native' or 'xla'; cnnjax workers only).
      conv_weights: who computes the filter gradient of a convolution on the oneDNN path:
        'direct' (cnnjax's own kernel, `cnnjax.native.onednn.WEIGHTS`, where it applies), 'onednn',
        or 'auto' (the library's default: 'direct'); cnnjax workers only.
      malloc: the C allocator, for every implementation (torch gains from it too): 'auto' (what
        cnnjax's entry points do: `cnnjax.xla_flags.tune_malloc()` on a CPU host unless
        CNNJAX_CPU_MALLOC=0), 'tuned' (always) or 'default' (glibc's own settings).
      threads: pin the worker to this many cores (sched_setaffinity; torch also sets its intra-op
        threads, XLA sizes its pool from the affinity); 0 leaves both libraries' defaults.
    """

    impl: str = "cnnjax"
    model: str = "resnet20"
    batch_size: int = 128
    dtype: str = "float32"
    xla: str = "fast"
    scan_blocks: bool = False
    threads: int = 0
    conv_vjp: str = "auto"
    bn_vjp: str = "auto"
    malloc: str = "auto"
    conv_backend: str = "auto"
    bn_backend: str = "auto"
    conv_weights: str = "auto"

    def validate(self) -> Spec:
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r}; choose one of {IMPLS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {DTYPES}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: the libraries' defaults), got {self.threads!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.impl == "cnnjax":
            from cnnjax.models import get_spec  # imports JAX, but starts no backend

            get_spec(self.model)  # unknown names: ValueError with the closest registered ones
        else:
            cifar_depth(self.model)
            if self.scan_blocks:
                raise ValueError(f"scan_blocks is a cnnjax model option; impl={self.impl!r} has none")
        if self.malloc not in MALLOCS:
            raise ValueError(f"malloc={self.malloc!r}; choose one of {MALLOCS}")
        for name, choices in (("conv_vjp", CONV_VJPS), ("bn_vjp", BN_VJPS), ("conv_backend", CONV_BACKENDS),
                               ("bn_backend", BN_BACKENDS), ("conv_weights", CONV_WEIGHTS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {choices}")
            if value != "auto" and self.impl != "cnnjax":
                raise ValueError(f"{name} is a cnnjax option; impl={self.impl!r} has none")
        unknown = xla_flags.unknown_flags(self.xla)
        if unknown and self.is_jax:  # XLA would abort the worker on them
            raise ValueError(f"xla={self.xla!r} sets {unknown}, which the installed jaxlib does not define; "
                             "choose another XLA configuration, e.g. 'default'")
        return self

    @property
    def is_jax(self) -> bool:
        return not self.impl.startswith("torch")

    @property
    def label(self) -> str:
        base = self.impl + ("+scan" if self.scan_blocks else "")
        vjp = "" if self.conv_vjp == "auto" else f",vjp={self.conv_vjp}"
        vjp += "" if self.bn_vjp == "auto" else f",bn={self.bn_vjp}"
        vjp += "" if self.conv_backend == "auto" else f",conv={self.conv_backend}"
        vjp += "" if self.bn_backend == "auto" else f",bn_lib={self.bn_backend}"
        vjp += "" if self.conv_weights == "auto" else f",dw={self.conv_weights}"
        vjp += "" if self.malloc == "auto" else f",malloc={self.malloc}"
        return f"{base}[{self.xla}{vjp}]" if self.is_jax else base + (f"[{vjp[1:]}]" if vjp else "")


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The datasheet dense bf16 peak of an accelerator (`PEAK_BF16_TFLOPS`), or None: unknown device,
    a CPU, or a float32 run (whose peak depends on TF32 and precision settings)."""
    if dtype != "bfloat16":
        return None
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def cifar_depth(model: str) -> tuple[bool, int]:
    """(plain, depth) of a registered CIFAR ResNet / plain-net name; ValueError for other names."""
    from cnnjax.models.resnet import CIFAR_PARAMS  # the registered CIFAR depths (imports jax, not a backend)

    m = _CIFAR.match(model)
    if not m or int(m.group(2)) not in CIFAR_PARAMS:
        names = ", ".join(f"resnet{d}" for d in CIFAR_PARAMS)
        raise ValueError(f"model={model!r}: the flax and torch twins cover the registered CIFAR nets ({names} and "
                         "their plain<depth> twins); use impl='cnnjax' alone for other models")
    return m.group(1) == "plain", int(m.group(2))


# --------------------------------------------------------------------------- the Flax nn.Conv twin


def flax_cifar_resnet(depth: int, plain: bool = False, num_classes: int = 10, dtype: Any = None):
    """The CIFAR ResNet of cnnjax.models (option A, 16/32/64 widths) built from flax.linen layers.

    Same layers, parameter count and initialisers as `cnnjax.models.create('resnet<depth>')`, but
    every convolution is `flax.linen.Conv` and every norm `flax.linen.BatchNorm`.
    """
    import flax.linen as nn

    from cnnjax.models.resnet import zero_pad_shortcut

    he = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    class Block(nn.Module):
        features: int
        strides: int

        @nn.compact
        def __call__(self, x, train: bool):
            conv = partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                           kernel_init=he, dtype=dtype)
            norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
            y = nn.relu(norm(name="bn1")(conv(self.features, strides=self.strides, name="conv1")(x)))
            y = norm(name="bn2")(conv(self.features, name="conv2")(y))
            if plain:
                return nn.relu(y)
            return nn.relu(zero_pad_shortcut(x, self.features, self.strides) + y)

    class FlaxCifarResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            n = (depth - 2) // 6
            x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=he, dtype=dtype,
                        name="stem_conv")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                                     name="stem_bn")(x))
            for s, width in enumerate((16, 32, 64), start=1):
                for b in range(1, n + 1):
                    x = Block(width, 2 if s > 1 and b == 1 else 1, name=f"stage{s}_block{b}")(x, train)
            x = x.mean(axis=(1, 2))
            return nn.Dense(num_classes, dtype=dtype, name="fc")(x).astype("float32")

    return FlaxCifarResNet()


# --------------------------------------------------------------------------- the PyTorch twin


def torch_cifar_resnet(depth: int, plain: bool = False, num_classes: int = 10):
    """The same CIFAR ResNet in PyTorch (bias-free convs, BN momentum 0.1 = Flax 0.9, option A)."""
    import torch
    from torch import nn
    from torch.nn import functional as tf

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            if plain:
                return torch.relu(y)
            sc = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.pad:
                sc = tf.pad(sc, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(sc + y)

    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for s, width in enumerate((16, 32, 64), start=1):
        for b in range(n):
            layers.append(Block(cin, width, 2 if s > 1 and b == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


# --------------------------------------------------------------------------- workers


class _Runner:
    """What a worker runs: `step(mode, n)` dispatches n steps and waits for the last one."""

    info: dict[str, Any]

    def step(self, mode: str, n: int) -> None:
        raise NotImplementedError

    def product(self, n: int) -> Callable[[], Any]:
        """A call that runs one n x n x n matrix product in the compute dtype and waits for it."""
        raise NotImplementedError

    def matmul(self, n: int, reps: int, budget_s: float = 0.5) -> tuple[float, int]:
        """(best GFLOP/s of `reps` n^3 products, the n used). n shrinks so that one product takes
        about `budget_s` at most: bfloat16 products on a CPU without bf16 instructions can run
        at 1 GFLOP/s (PyTorch on this project's AVX2 machine), where n = 2048 would take minutes."""
        probe = min(n, 256)
        f = self.product(probe)
        f()
        rate = 2 * probe**3 / min(_timed(f) for _ in range(2))
        if n > probe:
            n = max(probe, min(n, int((rate * budget_s / 2) ** (1 / 3))))
            f = self.product(n)
            f()
        return 2 * n**3 / min(_timed(f) for _ in range(reps)) / 1e9, n


class _JaxRunner(_Runner):
    """cnnjax or the Flax twin: cnnjax.train's train and eval steps, compiled ahead of time."""

    def __init__(self, spec: Spec):
        import flax
        import jax
        import jax.numpy as jnp
        import optax

        from cnnjax import analysis, models
        from cnnjax import functional as F
        from cnnjax import native
        from cnnjax.native import onednn
        from cnnjax.train import create_train_state, make_eval_step, make_train_step

        jax.config.update("jax_enable_compilation_cache", False)
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else None
        if spec.impl == "cnnjax":
            kwargs = {"dtype": dtype} if dtype is not None else {}
            if spec.scan_blocks:
                kwargs["scan_blocks"] = True
            model = models.create(spec.model, **kwargs)
        else:
            plain, depth = cifar_depth(spec.model)
            model = flax_cifar_resnet(depth, plain, dtype=dtype)
        shape = models.get_spec(spec.model).input_shape
        tx = optax.sgd(0.1, momentum=0.9)
        # rbg keys: threefry's initialiser graph takes XLA CPU 5x longer to compile (not what is measured).
        state = create_train_state(jax.random.key(0, impl="rbg"), model, tx, shape)
        batch = {"image": jax.random.normal(jax.random.key(1), (spec.batch_size, *shape), jnp.float32),
                 "label": jnp.arange(spec.batch_size, dtype=jnp.int32) % 10}
        train = jax.jit(make_train_step(model, tx, lambda s: 0.1, axis_name=None, rng_impl="rbg"), donate_argnums=0)
        evaluate = jax.jit(make_eval_step(model, axis_name=None))
        t0, c0 = time.perf_counter(), time.process_time()
        self._train = train.lower(state, batch).compile()
        t1, c1 = time.perf_counter(), time.process_time()
        self._eval = evaluate.lower(state, batch).compile()
        t2 = time.perf_counter()
        mem = self._train.memory_analysis()
        step_bytes = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                               + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        hlo = self._train.as_text()
        onednn_calls = sum(hlo.count(f'custom_call_target="{t}"') for t in native.CONV_TARGETS)
        bn_calls = sum(hlo.count(f'custom_call_target="{t}"') for t in native.BN_TARGETS)
        self.state, self.batch, self._jax, self._dtype = state, batch, jax, dtype or jnp.float32
        device = jax.devices()[0]
        self.info = {
            "device": device.device_kind, "platform": device.platform,
            "peak_tflops": peak_tflops(device.device_kind, spec.dtype),
            "compile_train_s": t1 - t0, "compile_eval_s": t2 - t1, "compile_train_cpu_s": c1 - c0,
            "train_step_mib": None if step_bytes is None else step_bytes / 2**20,
            "macs_per_image": analysis.summary(spec.model, shape).total_macs,
            "ynn_fusions": hlo.count('"__ynn_fusion"'), "xnn_fusions": hlo.count("__xnn_fusion"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "flax": flax.__version__,
            "conv_vjp": F.CONV_VJP, "bn_vjp": F.BN_VJP, "conv_backend": F.CONV_BACKEND,
            "bn_backend": F.BN_BACKEND, "onednn_calls": onednn_calls, "native_bn_calls": bn_calls,
            "onednn": native.dnnl_version() if onednn_calls else None,
            "conv_weights": onednn.WEIGHTS if onednn_calls else None,
            "direct_weights_kernel": native.direct_conv_weights() if onednn_calls else None,
        }

    def step(self, mode: str, n: int) -> None:
        out = None
        for _ in range(n):
            if mode == "train":
                self.state, out = self._train(self.state, self.batch)
            else:
                out = self._eval(self.state, self.batch)
        self._jax.block_until_ready(out)

    def product(self, n: int) -> Callable[[], Any]:
        import jax.numpy as jnp

        a = self._jax.random.normal(self._jax.random.key(2), (n, n), jnp.float32).astype(self._dtype)
        f = self._jax.jit(lambda a: a @ a)
        return lambda: f(a).block_until_ready()


class _TorchRunner(_Runner):
    """The PyTorch twin: zero_grad, forward, cross-entropy, backward, SGD step (eager), on the GPU
    when torch sees one (as JAX would use it), else on the CPU."""

    def __init__(self, spec: Spec):
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
            torch.set_num_interop_threads(1)
        torch.manual_seed(0)
        plain, depth = cifar_depth(spec.model)
        fmt = torch.channels_last if spec.impl == "torch-cl" else torch.contiguous_format
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = torch_cifar_resnet(depth, plain).to(self.device, memory_format=fmt)
        self.x = torch.randn(spec.batch_size, 3, 32, 32).to(self.device).contiguous(memory_format=fmt)
        self.y = (torch.arange(spec.batch_size) % 10).to(self.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.autocast = spec.dtype == "bfloat16"
        self.torch = torch
        t0 = time.perf_counter()
        self.step("train", 1)
        t1 = time.perf_counter()
        self.step("eval", 1)
        kind = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor()
        self.info = {"compile_train_s": t1 - t0, "compile_eval_s": time.perf_counter() - t1,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": kind, "platform": "gpu" if self.device == "cuda" else "cpu",
                     "peak_tflops": peak_tflops(kind, spec.dtype) if self.device == "cuda" else None}

    def step(self, mode: str, n: int) -> None:
        torch = self.torch
        with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
            if mode == "eval":
                self.net.eval()
                with torch.no_grad():
                    for _ in range(n):
                        self.net(self.x)
            else:
                self.net.train()
                for _ in range(n):
                    self.opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(self.net(self.x).float(), self.y)
                    loss.backward()
                    self.opt.step()
        if self.device == "cuda":  # kernels run asynchronously: wait for the last one
            torch.cuda.synchronize()

    def product(self, n: int) -> Callable[[], Any]:
        torch = self.torch
        a = torch.randn(n, n).to(self.device, torch.bfloat16 if self.autocast else torch.float32)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        return lambda: (a @ a, sync())


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec_json: str) -> int:
    """A worker's loop: build and compile, then answer 'run MODE N', 'matmul N REPS', 'quit' on stdin."""
    spec = Spec(**json.loads(spec_json)).validate()
    if spec.threads:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:spec.threads])
    # Before any library starts its threads. 'auto' decides as the entry points do (CPU host,
    # CNNJAX_CPU_MALLOC); 'tuned' and 'default' regardless of the environment.
    malloc_tuned = spec.malloc != "default" and xla_flags.tune_malloc(force=spec.malloc == "tuned")
    try:
        runner = _JaxRunner(spec) if spec.is_jax else _TorchRunner(spec)
    except Exception as e:  # reported to the parent, which goes on without this worker
        _send({"error": f"{type(e).__name__}: {e}"})
        return 1
    _send({"ready": True, **runner.info, "malloc_tuned": malloc_tuned})
    warm = set()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            if cmd[1] not in warm:  # the first runs allocate and fill caches
                runner.step(cmd[1], 2)
                warm.add(cmd[1])
            c, t = time.process_time(), time.perf_counter()
            runner.step(cmd[1], int(cmd[2]))
            _send({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c})
        elif cmd[0] == "matmul":
            gflops, n = runner.matmul(int(cmd[1]), int(cmd[2]))
            _send({"gflops": gflops, "n": n})
    _send({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return 0


def worker_xla_flags(config: str, inherited: str = "") -> str:
    """A worker's XLA_FLAGS: the configuration's flags plus the inherited ones no preset sets.

    Flags that some preset sets (e.g. added by `configure_cpu()` in the parent) are dropped from
    `inherited`, so that 'default' really is XLA's default; other flags (device count, dumps) stay.
    """
    compared = {xla_flags.flag_name(f) for flags in xla_flags.CPU_PRESETS.values() for f in flags.split()}
    kept = " ".join(f for f in inherited.split() if xla_flags.flag_name(f) not in compared)
    return xla_flags.merge_flags(xla_flags.resolve(config), kept)


def worker_env(spec: Spec, parent: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: the parent's, with the spec's XLA flags and gradient
    paths, and CNNJAX_CPU_FAST=0 so that nothing in the worker adds flags of its own. On a GPU the
    workers share the card: JAX allocates as it goes instead of taking 75% of the memory at start
    (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the parent sets it)."""
    env = dict(parent, **{xla_flags.ENV_SWITCH: "0", "CNNJAX_CONV_VJP": spec.conv_vjp, "CNNJAX_BN_VJP": spec.bn_vjp,
                          "CNNJAX_CONV_BACKEND": spec.conv_backend, "CNNJAX_BN_BACKEND": spec.bn_backend,
                          "CNNJAX_CONV_WEIGHTS": spec.conv_weights})
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if spec.is_jax:
        env["XLA_FLAGS"] = worker_xla_flags(spec.xla, parent.get("XLA_FLAGS", ""))
    if not xla_flags.enabled(parent):  # CNNJAX_CPU_FAST=0: the entry points leave the allocator alone, so 'auto' does
        env[xla_flags.MALLOC_SWITCH] = "0"
    return env


class Worker:
    """A worker process seen from the parent."""

    def __init__(self, spec: Spec, timeout_s: float = 600.0):
        self.spec, self.timeout_s = spec, timeout_s
        cmd = [sys.executable, "-m", "cnnjax.bench", "--worker", json.dumps(dataclasses.asdict(spec))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=worker_env(spec, os.environ))
        self.info = self._receive()

    def _receive(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                msg = json.loads(line[len(_PREFIX):])
                if "error" in msg:
                    raise RuntimeError(f"{self.spec.label}: {msg['error']}")
                return msg
        err = self.proc.stderr.read()[-2000:]
        raise RuntimeError(f"{self.spec.label}: worker exited ({self.proc.wait()}): {err}")

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._receive()

    def close(self) -> dict[str, Any]:
        try:
            out = self.ask("quit")
        except (RuntimeError, BrokenPipeError):
            out = {}
        self.proc.wait(timeout=60)
        return out


# --------------------------------------------------------------------------- the side-by-side run


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(specs: Sequence[Spec], *, rounds: int = 5, steps: int = 3, modes: Sequence[str] = MODES,
        matmul_n: int = 2048, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Benchmarks `specs` side by side; the first spec is the reference of the ratios.

    Args:
      specs: the workers (at least one); labels must differ.
      rounds: interleaved rounds; each worker runs `steps` steps of each mode per round (0: only
        compile, e.g. to measure the compile time of a model too large to step here).
      steps: steps per worker, mode and round (timed together, dispatched back to back).
      modes: 'train' and/or 'eval'.
      matmul_n: size of the n x n x n matmul ceiling in the compute dtype (0: skip); a worker
        shrinks it where one product would take over 0.5 s (`_Runner.matmul`).
      log: progress messages (None: quiet).

    Returns:
      A JSON-able dict: machine, per-worker results (images/s per round, median, best, compile
      time, memory, GFLOP/s, matmul ceiling) and per-mode ratios to the first worker.
    """
    specs = [s.validate() for s in specs]
    if not specs:
        raise ValueError("specs is empty: give at least one implementation")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate workers {labels}: each implementation x XLA configuration once")
    if rounds < 0 or steps < 1:
        raise ValueError(f"rounds={rounds} must be >= 0 (0: compile only) and steps={steps} >= 1")
    if matmul_n < 0:
        raise ValueError(f"matmul={matmul_n} must be >= 0 (0: no matmul ceiling)")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={tuple(modes)}; choose from {MODES}")
    say = log or (lambda _: None)
    result: dict[str, Any] = {"machine": machine_info(), "load_start": os.getloadavg(), "rounds": rounds,
                              "steps": steps, "workers": []}
    workers: list[Worker] = []
    try:
        for spec in specs:
            say(f"starting {spec.label} ({spec.model}, batch {spec.batch_size}, {spec.dtype}) ...")
            try:
                w = Worker(spec)
            except RuntimeError as e:
                say(f"  skipped: {e}")
                continue
            say(f"  compiled: train {w.info['compile_train_s']:.1f} s, eval {w.info['compile_eval_s']:.1f} s")
            workers.append(w)
        if not workers:
            raise RuntimeError("no worker started (see 'skipped' above)")
        times = {w.spec.label: {m: [] for m in modes} for w in workers}
        cpu = {w.spec.label: {m: [] for m in modes} for w in workers}
        loads = []
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)] if workers else []
            for w in order:
                for m in modes:
                    answer = w.ask(f"run {m} {steps}")
                    times[w.spec.label][m].append(answer["wall_s"] / steps)
                    cpu[w.spec.label][m].append(answer["cpu_s"] / steps)
            loads.append(os.getloadavg()[0])
            say(f"round {r + 1}/{rounds} done (load {loads[-1]:.1f})")
        ceilings = {w.spec.label: w.ask(f"matmul {matmul_n} 3") if matmul_n and rounds else {} for w in workers}
        for w in workers:
            peak_rss = w.close().get("peak_rss_mib")
            label = w.spec.label
            result["workers"].append(_summarise(w, times[label], cpu[label], ceilings[label], peak_rss, workers))
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    result["load_rounds"] = loads if workers else []
    result["load_end"] = os.getloadavg()
    ref = result["workers"][0]["label"] if result["workers"] else None
    result["reference"] = ref
    for entry in result["workers"]:
        entry["ratio"] = {}
        for m in modes:
            base = times[ref][m]
            per_round = [b / t for b, t in zip(base, times[entry["label"]][m])]
            if per_round:
                entry["ratio"][m] = {"median": _median(per_round), "min": min(per_round), "max": max(per_round)}
    return result


def _summarise(w: Worker, times: dict[str, list[float]], cpu: dict[str, list[float]], matmul: dict[str, Any],
               peak_rss: float | None, workers: Sequence[Worker]) -> dict[str, Any]:
    """One worker's entry of `run`'s result (per-mode images/s, GFLOP/s, compile time, memory)."""
    spec, info = w.spec, dict(w.info)
    info.pop("ready", None)
    ceiling, peak_tflops = matmul.get("gflops"), info.get("peak_tflops")
    macs = info.get("macs_per_image") or next((v.info.get("macs_per_image") for v in workers
                                               if v.spec.model == spec.model and v.info.get("macs_per_image")), None)
    entry = {"label": spec.label, "spec": dataclasses.asdict(spec), **info, "peak_rss_mib": peak_rss,
             "matmul_gflops": ceiling, "matmul_n": matmul.get("n"), "modes": {}}
    for m, ts in times.items():
        if not ts:
            continue
        ips = [spec.batch_size / t for t in ts]
        med = _median(ips)
        gflops = None if macs is None else med * macs * (6 if m == "train" else 2) / 1e9
        entry["modes"][m] = {"images_per_s": med, "best_images_per_s": max(ips), "per_round": ips,
                             "step_ms": 1e3 * _median(ts),
                             "images_per_cpu_s": spec.batch_size / _median(cpu[m]),
                             "gflops": gflops,
                             "fraction_of_matmul": None if not (gflops and ceiling) else gflops / ceiling,
                             "mfu": None if not (gflops and peak_tflops) else gflops / (1e3 * peak_tflops)}
    return entry


def machine_info() -> dict[str, Any]:
    """CPU model, core count, SIMD extensions, Python and package versions."""
    flags, model = set(), platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd, "python": platform.python_version()}


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of `run`'s result."""
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {' '.join(m['simd'])}; "
             f"load {result['load_start'][0]:.1f} -> {result['load_end'][0]:.1f}; "
             f"{result['rounds']} rounds x {result['steps']} steps; ratios vs {result['reference']}"]
    devices = sorted({e["device"] for e in result["workers"] if e.get("platform", "cpu") != "cpu" and e.get("device")})
    if devices:
        lines.append(f"accelerator: {', '.join(devices)}")
    head = (f"{'worker':28s} {'mode':5s} {'img/s':>7s} {'best':>7s} {'ms/step':>8s} {'ratio':>6s} {'[min-max]':>13s} "
            f"{'img/CPUs':>8s} {'GFLOP/s':>8s} {'%mm':>4s} {'MFU%':>5s} {'compile':>8s} {'step MiB':>8s} "
            f"{'RSS MiB':>8s}")
    lines += [head, "-" * len(head)]
    for e in result["workers"]:
        if not e["modes"]:
            lines.append(f"{e['label']:28s} compile only: train {e['compile_train_s']:.1f} s "
                         f"(CPU {e.get('compile_train_cpu_s', float('nan')):.1f} s), eval {e['compile_eval_s']:.1f} s")
        for mode, r in e["modes"].items():
            ratio = e["ratio"][mode]
            frac = "" if r["fraction_of_matmul"] is None else f"{100 * r['fraction_of_matmul']:.0f}"
            mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
            comp = e.get(f"compile_{mode}_s")
            lines.append(
                f"{e['label']:28s} {mode:5s} {r['images_per_s']:7.1f} {r['best_images_per_s']:7.1f} "
                f"{r.get('step_ms', float('nan')):8.2f} "
                f"{ratio['median']:6.2f} {ratio['min']:6.2f}-{ratio['max']:<6.2f} {r['images_per_cpu_s']:8.1f} "
                f"{'' if r['gflops'] is None else format(r['gflops'], '.1f'):>8s} {frac:>4s} {mfu:>5s} "
                f"{'' if comp is None else format(comp, '.1f') + ' s':>8s} "
                f"{'' if e.get('train_step_mib') is None else format(e['train_step_mib'], '.0f'):>8s} "
                f"{'' if e.get('peak_rss_mib') is None else format(e['peak_rss_mib'], '.0f'):>8s}")
    ceil = ", ".join(f"{e['label']} {e['matmul_gflops']:.0f} (n={e.get('matmul_n')})"
                     for e in result["workers"] if e["matmul_gflops"])
    if ceil:
        dtype = result["workers"][0]["spec"]["dtype"]
        lines.append(f"matmul ceiling (GFLOP/s, {dtype} square matmul): {ceil}")
    peaks = {e["peak_tflops"] for e in result["workers"] if e.get("peak_tflops")}
    if peaks:
        lines.append(f"MFU: model FLOP/s (6 x multiply-adds per trained image, 2 x evaluated) over the datasheet "
                     f"dense bf16 peak, {', '.join(f'{p:g}' for p in sorted(peaks))} TFLOP/s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m cnnjax bench` and experiments/bench.py."""
    p.add_argument("--model", default="resnet20", help="registered model (twins: CIFAR resnet/plain 6n+2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--impl", nargs="+", default=["cnnjax", "flax", "torch-cl"], choices=IMPLS,
                   help="implementations; the first (with the first --xla) is the reference of the ratios")
    p.add_argument("--xla", nargs="+", default=["auto"],
                   help=f"XLA configurations for the JAX implementations: names ({', '.join(xla_flags.CPU_PRESETS)}) "
                        "or flag strings starting with '--'; auto (the default): 'fast' on a CPU host, "
                        "'default' where a GPU/TPU is expected (the CPU flags do nothing there)")
    p.add_argument("--scan-blocks", action="store_true", help="cnnjax ResNet with scanned blocks")
    p.add_argument("--conv-vjp", nargs="+", choices=CONV_VJPS, default=["auto"],
                   help="cnnjax convolution gradient paths to compare (auto: canonical on CPU)")
    p.add_argument("--bn-vjp", nargs="+", choices=BN_VJPS, default=["auto"],
                   help="cnnjax BatchNorm training gradient paths to compare (auto: fused on CPU)")
    p.add_argument("--conv-backend", nargs="+", choices=CONV_BACKENDS, default=["auto"],
                   help="cnnjax convolution libraries to compare (auto: oneDNN on the CPU where installed, see cnnjax.native)")
    p.add_argument("--bn-backend", nargs="+", choices=BN_BACKENDS, default=["auto"],
                   help="who computes cnnjax's BatchNorm passes, to compare (auto: the native kernels on the CPU where built)")
    p.add_argument("--conv-weights", nargs="+", choices=CONV_WEIGHTS, default=["auto"],
                   help="who computes the filter gradients of cnnjax's oneDNN convolutions, to compare "
                        "(auto: cnnjax's own kernel where it applies, see cnnjax.native.onednn.WEIGHTS)")
    p.add_argument("--malloc", nargs="+", choices=MALLOCS, default=["auto"],
                   help="C allocator settings to compare, for every implementation (auto: as the entry points, tuned on a CPU host; tuned: cnnjax.xla_flags.tune_malloc)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per worker, mode and round")
    p.add_argument("--matmul", type=int, default=2048,
                   help="n of the n^3 matmul ceiling, smaller where one product would take over 0.5 s (0: skip)")
    p.add_argument("--threads", type=int, default=0,
                   help="pin every worker to this many cores (torch threads too); 0: the libraries' defaults")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")


def auto_xla(environ: Mapping[str, str] | None = None) -> str:
    """The XLA configuration `--xla auto` compares: 'fast' (`configure_cpu()`'s CPU preset) on a
    CPU host whose jaxlib defines its flags; 'default' (XLA's own) where a GPU/TPU is expected,
    since the CPU flags do nothing there, or where the jaxlib lacks them."""
    if xla_flags.accelerator_expected(environ) or xla_flags.unknown_flags("fast"):
        return "default"
    return "fast"


def specs_from_args(args: argparse.Namespace) -> list[Spec]:
    """One Spec per implementation x XLA configuration (torch once); torch is skipped if missing."""
    specs = []
    for impl in args.impl:
        for xla in (args.xla if not impl.startswith("torch") else ["default"]):
            xla = auto_xla() if xla == "auto" else xla
            ours = impl == "cnnjax"
            for vjp, bn_vjp, backend, bn_backend, weights, malloc in itertools.product(
                    args.conv_vjp if ours else ["auto"], args.bn_vjp if ours else ["auto"],
                    args.conv_backend if ours else ["auto"], args.bn_backend if ours else ["auto"],
                    args.conv_weights if ours else ["auto"], args.malloc):
                spec = Spec(impl, args.model, args.batch_size, args.dtype, xla, scan_blocks=args.scan_blocks and ours,
                            threads=args.threads, conv_vjp=vjp, bn_vjp=bn_vjp, malloc=malloc, conv_backend=backend,
                            bn_backend=bn_backend, conv_weights=weights)
                if spec.label not in {s.label for s in specs}:
                    specs.append(spec.validate())
    if any(not s.is_jax for s in specs):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            print("torch is not installed: skipping the PyTorch reference (pip install torch)", file=sys.stderr)
            specs = [s for s in specs if s.is_jax]
    return specs


def run_from_args(args: argparse.Namespace) -> int:
    if args.json:  # checked before the minutes of benchmarking, written atomically after
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r}: give a file path in an existing directory")
    try:
        result = run(specs_from_args(args), rounds=args.rounds, steps=args.steps, modes=args.modes,
                     matmul_n=args.matmul, log=lambda s: print(s, file=sys.stderr))
    except RuntimeError as e:  # a worker died mid-run (out of memory, a crash in a library)
        print(f"cnnjax bench: {e}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        from cnnjax.train.metrics import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cnnjax.bench` / experiments/bench.py entry point (also runs workers)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    parser = argparse.ArgumentParser(prog="cnnjax bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ValueError as e:
        parser.exit(2, f"cnnjax bench: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
