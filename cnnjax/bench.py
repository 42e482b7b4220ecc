"""Train- and eval-step benchmark of cnnjax, side by side with other implementations, one run.

    python -m cnnjax bench --model resnet20 --batch_size 128
    python -m cnnjax bench --model resnet56 --xla fast default --conv_backend auto xla
    python -m experiments.bench --model resnet56 --impl cnnjax flax torch-cl  # with the twins

Every implementation x XLA configuration is a worker process (XLA reads its flags once, at
start). The workers compile one after the other (compile times are not contended by each other),
then run interleaved rounds, the order rotating each round, so that a noisy shared machine loads
them alike; the ratios of images/s are taken per round against the first worker and their median
is what to quote. Also reported: compile time, the compiled step's memory and the process's peak
RSS, achieved GFLOP/s (6 x multiply-adds per image for a train step, 2 x for an eval step), a
measured matrix-multiply ceiling in the compute dtype and, on a known GPU/TPU at bfloat16, the
MFU against the datasheet peak (`PEAK_BF16_TFLOPS`). On a GPU the workers share the card
(`worker_env`).

Implementations. This module holds the harness and one implementation, `cnnjax` (the registry
model, `JaxRunner`). Others are `Runner` subclasses defined anywhere, offered by name with
`register(name, 'module:attribute')`: a `Spec` carries that import path to its worker process,
which imports it (the directory of its top-level package reaches the worker through PYTHONPATH,
`worker_env`), so the library never names them. The reference twins of the CIFAR ResNet, built
from flax.linen `nn.Conv`/`nn.BatchNorm` (`flax`) and in PyTorch, channels-last or NCHW
(`torch-cl`, `torch-nchw`; torch is never a cnnjax dependency), live with the benchmark scripts
in experiments/bench_twins.py; `python -m experiments.bench` registers them and runs this
harness with the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
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
from typing import Any, ClassVar

from cnnjax import settings, xla_flags
from cnnjax.cli import ArgumentParser

# cnnjax.functional's gradient paths
CONV_VJPS, BN_VJPS = settings.CONV_VJP_MODES, settings.BN_VJP_MODES
CONV_BACKENDS = settings.CONV_BACKENDS  # who computes cnnjax.functional.conv2d
BN_BACKENDS = settings.BN_BACKENDS  # who computes cnnjax.functional.batch_norm's passes
# who computes the filter gradients of cnnjax's oneDNN convolutions
CONV_WEIGHTS = settings.CONV_WEIGHTS
# the C allocator: as entry points set it, cnnjax.xla_flags.tune_malloc(), glibc's
MALLOCS = ("auto", "tuned", "default")
MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
_PREFIX = "@@bench "

# Dense bf16 peak TFLOP/s by device kind (vendors' datasheets, without sparsity), for MFU:
# achieved model FLOP/s over this. Matched in order against jax.Device.device_kind.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)

# --------------------------------------------------------------------------- implementations

# name -> 'module:attribute' of its Runner class; the library's own, then `register`'s.
_RUNNERS: dict[str, str] = {"cnnjax": "cnnjax.bench:JaxRunner"}
_DEFAULTS: list[str] = ["cnnjax"]  # what `--impl` compares when not given
# Named in the unknown-implementation error only: defined in experiments/bench_twins.py and
# registered by `python -m experiments.bench`, never imported here.
_TWINS = ("flax", "torch-cl", "torch-nchw")
_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def register(name: str, runner: str, *, default: bool = False) -> None:
    """Offers implementation `name` to `Spec(impl=name)` and `--impl`.

    Args:
      name: the implementation's name (letters, digits, '-', '_', '.'); registering a name again
        replaces its runner.
      runner: import path 'module:attribute' of a `Runner` subclass. It is not imported here:
        `Spec.validate` imports it in the parent (its class attributes and `check`), and each
        worker process imports it again to build the runner.
      default: also compared when `--impl` is not given (options added by `add_arguments` after
        this call).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"implementation name {name!r}: letters, digits, '-', '_' or '.'")
    if not isinstance(runner, str) or not _PATH.match(runner):
        raise ValueError(f"runner {runner!r}: give an import path 'module:attribute'")
    _RUNNERS[name] = runner
    if default and name not in _DEFAULTS:
        _DEFAULTS.append(name)


def implementations() -> tuple[str, ...]:
    """The registered implementation names, the library's first."""
    return tuple(_RUNNERS)


def runner_path(impl: str) -> str:
    """The import path registered for `impl`; ValueError naming the choices for other names."""
    try:
        return _RUNNERS[impl]
    except KeyError:
        pass
    message = f"impl={impl!r}; choose one of {implementations()}"
    if impl in _TWINS:
        message += (
            f" (the Flax and PyTorch twins of the CIFAR nets, {', '.join(_TWINS)}, are "
            "run by `python -m experiments.bench`, which takes the same flags)"
        )
    raise ValueError(message)


def load_runner(path: str) -> type[Runner]:
    """The class at import path 'module:attribute' (imported now); ValueError if there is none."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise ValueError(f"runner {path!r}: give an import path 'module:attribute'")
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"runner {path!r} cannot be imported: {type(e).__name__}: {e}") from e
    # Duck-typed: under `python -m cnnjax.bench` this module is also loaded as __main__.
    if not isinstance(cls, type) or not all(hasattr(cls, a) for a in ("step", "product", "check")):
        raise ValueError(f"runner {path!r} is {cls!r}, not a cnnjax.bench.Runner subclass")
    return cls


def import_root(path: str) -> str | None:
    """The directory a worker needs on its sys.path to import runner `path`: the one holding its
    top-level package or module; None for the library's own runners (the worker imports cnnjax
    as the parent does) and for modules not found."""
    top = path.partition(":")[0].split(".")[0]
    if top == "cnnjax":
        return None
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:  # a package, a namespace package too
        return os.path.dirname(os.path.abspath(list(found.submodule_search_locations)[0]))
    return os.path.dirname(os.path.abspath(found.origin)) if found.origin else None


@dataclasses.dataclass(frozen=True)
class Spec:
    """One worker: an implementation of a model under one XLA configuration.

    Args:
      impl: an implementation name, `implementations()`: the library's 'cnnjax' and those given
        to `register` (experiments/bench.py registers the Flax and PyTorch twins); any name when
        `runner` is given.
      model: registered model name ('resnet20'); an implementation may cover fewer (the twins:
        the CIFAR ResNets and plain nets, depth 6n+2), see its runner's `check`.
      batch_size: images per step.
      dtype: compute dtype; 'bfloat16' keeps float32 parameters and BN statistics (torch:
        autocast).
      xla: a `cnnjax.xla_flags.CPU_PRESETS` name or an XLA flag string (JAX workers only).
      scan_blocks: build the cnnjax ResNet with scanned blocks (compile-time option).
      conv_vjp: cnnjax's convolution gradient path, `cnnjax.settings` conv_vjp ('auto',
        'canonical' or 'xla'; cnnjax workers only).
      bn_vjp: cnnjax's BatchNorm training gradient path, `cnnjax.settings` bn_vjp ('auto',
        'fused' or 'autodiff'; cnnjax workers only).
      conv_backend: the library of cnnjax's convolutions, `cnnjax.settings` conv_backend
        ('auto', 'onednn' or 'xla'; cnnjax workers only).
      bn_backend: who computes cnnjax's BatchNorm passes, `cnnjax.settings` bn_backend
        ('auto', 'native' or 'xla'; cnnjax workers only).
      conv_weights: who computes the filter gradient of a convolution on the oneDNN path:
        'direct' (cnnjax's own kernel, `cnnjax.settings` conv_weights, where it applies),
        'onednn', or 'auto' (the library's default: 'direct'); cnnjax workers only.
      malloc: the C allocator, for every implementation (torch gains from it too): 'auto' (what
        cnnjax's entry points do: `cnnjax.xla_flags.tune_malloc()` on a CPU host unless
        CNNJAX_CPU_FAST=0; the parent decides, `worker_spec`), 'tuned' (always) or 'default'
        (glibc's own settings).
      threads: pin the worker to this many cores (sched_setaffinity; torch also sets its
        intra-op threads, XLA sizes its pool from the affinity); 0 leaves both libraries'
        defaults.
      runner: import path 'module:attribute' of the `Runner` class the worker builds; '' (the
        default) takes the one registered for `impl`, which `validate` fills in, so that the
        worker process needs no registry.
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
    runner: str = ""

    def runner_class(self) -> type[Runner]:
        """The Runner class of this spec (imported); ValueError for an unknown impl."""
        return load_runner(self.runner or runner_path(self.impl))

    def validate(self) -> Spec:
        """This spec with its runner's import path filled in; ValueError for a bad field."""
        cls = self.runner_class()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {DTYPES}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"threads must be an int >= 0 (0: the libraries' defaults), got {self.threads!r}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        cls.check(self)  # the models it covers: ValueError with the ones it does
        if self.scan_blocks and not cls.cnnjax_options:
            raise ValueError(f"scan_blocks is a cnnjax model option; impl={self.impl!r} has none")
        if self.malloc not in MALLOCS:
            raise ValueError(f"malloc={self.malloc!r}; choose one of {MALLOCS}")
        for name, choices in (
            ("conv_vjp", CONV_VJPS),
            ("bn_vjp", BN_VJPS),
            ("conv_backend", CONV_BACKENDS),
            ("bn_backend", BN_BACKENDS),
            ("conv_weights", CONV_WEIGHTS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {choices}")
            if value != "auto" and not cls.cnnjax_options:
                raise ValueError(f"{name} is a cnnjax option; impl={self.impl!r} has none")
        unknown = xla_flags.unknown_flags(self.xla)
        if unknown and cls.uses_xla:  # XLA would abort the worker on them
            raise ValueError(
                f"xla={self.xla!r} sets {unknown}, which the installed jaxlib does "
                "not define; choose another XLA configuration, e.g. 'default'"
            )
        return self if self.runner else dataclasses.replace(self, runner=runner_path(self.impl))

    @property
    def is_jax(self) -> bool:
        """Whether the worker runs on JAX (takes XLA configurations): its runner's `uses_xla`."""
        return self.runner_class().uses_xla

    @property
    def label(self) -> str:
        base = self.impl + ("+scan" if self.scan_blocks else "")
        vjp = "" if self.conv_vjp == "auto" else f",vjp={self.conv_vjp}"
        vjp += "" if self.bn_vjp == "auto" else f",bn={self.bn_vjp}"
        vjp += "" if self.conv_backend == "auto" else f",conv={self.conv_backend}"
        vjp += "" if self.bn_backend == "auto" else f",bn_lib={self.bn_backend}"
        vjp += "" if self.conv_weights == "auto" else f",dw={self.conv_weights}"
        vjp += "" if self.malloc == "auto" else f",malloc={self.malloc}"
        if self.is_jax:
            return f"{base}[{self.xla}{vjp}]"
        return base + (f"[{vjp[1:]}]" if vjp else "")


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The datasheet dense bf16 peak of an accelerator (`PEAK_BF16_TFLOPS`), or None: unknown
    device, a CPU, or a float32 run (whose peak depends on TF32 and precision settings)."""
    if dtype != "bfloat16":
        return None
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in kind), None)


# --------------------------------------------------------------------------- runners


class Runner:
    """What a worker runs: `step(mode, n)` dispatches n steps and waits for the last one.

    A subclass is built in the worker process as `cls(spec)` and sets `info` (a JSON-able dict:
    compile times, device, versions). Subclasses outside the library are offered by `register`.
    """

    # Runs on JAX: one worker per XLA configuration, XLA_FLAGS set; False: one worker, 'default'.
    uses_xla: ClassVar[bool] = True
    # Takes cnnjax's own options (scan_blocks, conv_vjp, bn_vjp, conv_backend, ...).
    cnnjax_options: ClassVar[bool] = False
    # Top-level modules it needs; where one is missing its workers are skipped with a message.
    requires: ClassVar[tuple[str, ...]] = ()

    info: dict[str, Any]

    @classmethod
    def check(cls, spec: Spec) -> None:
        """Raises ValueError for a spec it cannot run (e.g. a model it does not cover); called
        by `Spec.validate` in the parent, before any worker starts."""

    def step(self, mode: str, n: int) -> None:
        raise NotImplementedError

    def product(self, n: int) -> Callable[[], Any]:
        """A call that runs one n x n x n matrix product in the compute dtype and waits for it."""
        raise NotImplementedError

    def matmul(self, n: int, reps: int, budget_s: float = 0.5) -> tuple[float, int]:
        """(best GFLOP/s of `reps` n^3 products, the n used). n shrinks so that one product takes
        about `budget_s` at most: bfloat16 products on a CPU without bf16 instructions can run
        at 1 GFLOP/s (PyTorch on this project's AVX2 machine), where n = 2048 would take
        minutes."""
        probe = min(n, 256)
        f = self.product(probe)
        f()
        rate = 2 * probe**3 / min(_timed(f) for _ in range(2))
        if n > probe:
            n = max(probe, min(n, int((rate * budget_s / 2) ** (1 / 3))))
            f = self.product(n)
            f()
        return 2 * n**3 / min(_timed(f) for _ in range(reps)) / 1e9, n


class JaxRunner(Runner):
    """cnnjax: cnnjax.train's train and eval steps of the registry model, compiled ahead of time.

    A subclass steps another Flax module the same way by overriding `build_model` (and `check`,
    `cnnjax_options`): the Flax twin in experiments/bench_twins.py does.
    """

    cnnjax_options: ClassVar[bool] = True

    @classmethod
    def check(cls, spec: Spec) -> None:
        from cnnjax.models import get_spec  # imports JAX, but starts no backend

        get_spec(spec.model)  # unknown names: ValueError with the closest registered ones

    def build_model(self, spec: Spec, dtype: Any) -> Any:
        """The flax module to step (its input shape: `cnnjax.models.get_spec(spec.model)`)."""
        from cnnjax import models

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        if spec.scan_blocks:
            kwargs["scan_blocks"] = True
        return models.create(spec.model, **kwargs)

    def __init__(self, spec: Spec):
        import flax
        import jax
        import jax.numpy as jnp
        import optax

        from cnnjax import analysis, models, native, settings
        from cnnjax.train import create_train_state, make_eval_step, make_train_step

        jax.config.update("jax_enable_compilation_cache", False)
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else None
        model = self.build_model(spec, dtype)
        shape = models.get_spec(spec.model).input_shape
        tx = optax.sgd(0.1, momentum=0.9)
        # rbg keys: threefry's initialiser graph takes XLA CPU 5x longer to compile (not what is
        # measured).
        state = create_train_state(jax.random.key(0, impl="rbg"), model, tx, shape)
        image = jax.random.normal(jax.random.key(1), (spec.batch_size, *shape), jnp.float32)
        batch = {"image": image, "label": jnp.arange(spec.batch_size, dtype=jnp.int32) % 10}
        train = jax.jit(
            make_train_step(model, tx, lambda s: 0.1, axis_name=None, rng_impl="rbg"),
            donate_argnums=0,
        )
        evaluate = jax.jit(make_eval_step(model, axis_name=None))
        t0, c0 = time.perf_counter(), time.process_time()
        self._train = train.lower(state, batch).compile()
        t1, c1 = time.perf_counter(), time.process_time()
        self._eval = evaluate.lower(state, batch).compile()
        t2 = time.perf_counter()
        mem = self._train.memory_analysis()
        step_bytes = (
            None
            if mem is None
            else (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            )
        )
        hlo = self._train.as_text()
        onednn_calls = sum(hlo.count(f'custom_call_target="{t}"') for t in native.CONV_TARGETS)
        bn_calls = sum(hlo.count(f'custom_call_target="{t}"') for t in native.BN_TARGETS)
        self.state, self.batch, self._jax, self._dtype = state, batch, jax, dtype or jnp.float32
        chosen = settings.current()  # what the steps were compiled with (`worker_settings`)
        device = jax.devices()[0]
        self.info = {
            "device": device.device_kind,
            "platform": device.platform,
            "peak_tflops": peak_tflops(device.device_kind, spec.dtype),
            "compile_train_s": t1 - t0,
            "compile_eval_s": t2 - t1,
            "compile_train_cpu_s": c1 - c0,
            "train_step_mib": None if step_bytes is None else step_bytes / 2**20,
            "macs_per_image": analysis.summary(spec.model, shape).total_macs,
            "ynn_fusions": hlo.count('"__ynn_fusion"'),
            "xnn_fusions": hlo.count("__xnn_fusion"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "conv_vjp": chosen.conv_vjp,
            "bn_vjp": chosen.bn_vjp,
            "conv_backend": chosen.conv_backend,
            "bn_backend": chosen.bn_backend,
            "onednn_calls": onednn_calls,
            "native_bn_calls": bn_calls,
            "onednn": native.dnnl_version() if onednn_calls else None,
            "conv_weights": chosen.conv_weights if onednn_calls else None,
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

        key = self._jax.random.key(2)
        a = self._jax.random.normal(key, (n, n), jnp.float32).astype(self._dtype)
        f = self._jax.jit(lambda a: a @ a)
        return lambda: f(a).block_until_ready()


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec_json: str) -> int:
    """A worker's loop: import the spec's runner class (its import path, `Spec.runner`), build
    and compile, then answer 'run MODE N', 'matmul N REPS', 'quit' on stdin."""
    spec = Spec(**json.loads(spec_json))
    if spec.threads:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[: spec.threads])
    # Before any library starts its threads, and before JAX is imported (XLA's allocations must
    # find glibc tuned). The parent resolves 'auto' (`worker_spec`); a spec given by hand with
    # 'auto' decides as the entry points do, in this process's environment.
    malloc_tuned = spec.malloc != "default" and xla_flags.tune_malloc(force=spec.malloc == "tuned")
    try:
        spec = spec.validate()
        if spec.is_jax:  # read when the runner traces its steps
            from cnnjax import settings

            settings.set_defaults(**worker_settings(spec))
        runner = spec.runner_class()(spec)
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
    compared = {
        xla_flags.flag_name(f) for flags in xla_flags.CPU_PRESETS.values() for f in flags.split()
    }
    kept = " ".join(f for f in inherited.split() if xla_flags.flag_name(f) not in compared)
    return xla_flags.merge_flags(xla_flags.resolve(config), kept)


def worker_settings(spec: Spec) -> dict[str, str]:
    """The `cnnjax.settings` a worker sets before it builds its runner: the spec's choices
    ('auto': the library's default, whatever the parent process set)."""
    return {
        "conv_vjp": spec.conv_vjp,
        "bn_vjp": spec.bn_vjp,
        "conv_backend": spec.conv_backend,
        "bn_backend": spec.bn_backend,
        "conv_weights": spec.conv_weights,
    }


def worker_spec(spec: Spec, parent: Mapping[str, str]) -> Spec:
    """The spec a worker receives: `spec` with malloc='auto' resolved in the parent's environment
    to what an entry point would do there ('tuned' on a CPU host, 'default' where a GPU/TPU is
    expected or CNNJAX_CPU_FAST=0, `xla_flags.malloc_wanted`). The worker itself runs with
    CNNJAX_CPU_FAST=0 (`worker_env`), so it could not tell."""
    if spec.malloc != "auto":
        return spec
    wanted = xla_flags.malloc_wanted(parent)
    return dataclasses.replace(spec, malloc="tuned" if wanted else "default")


def worker_env(spec: Spec, parent: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker starts with: the parent's, with the spec's XLA flags, and
    CNNJAX_CPU_FAST=0 so that nothing in the worker adds flags of its own. On a GPU
    the workers share the card: JAX allocates as it goes instead of taking 75% of the memory at
    start (XLA_PYTHON_CLIENT_PREALLOCATE=false, unless the parent sets it). A runner from outside
    the library gets the directory of its package put first on PYTHONPATH (`import_root`): such
    a package (experiments/, say) is not installed, and the worker may start elsewhere."""
    env = dict(parent, **{xla_flags.ENV_SWITCH: "0"})  # the layers' choices: worker_settings
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if spec.is_jax:
        env["XLA_FLAGS"] = worker_xla_flags(spec.xla, parent.get("XLA_FLAGS", ""))
    root = import_root(spec.runner or runner_path(spec.impl))
    paths = [p for p in parent.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root is not None and root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    return env


# A worker process: cnnjax.bench imported as itself (not as __main__, a second copy of it).
_WORKER = "import sys; from cnnjax.bench import worker_main; sys.exit(worker_main(sys.argv[1]))"


class Worker:
    """A worker process seen from the parent."""

    def __init__(self, spec: Spec, timeout_s: float = 600.0):
        self.spec, self.timeout_s = spec, timeout_s
        sent = worker_spec(spec, os.environ)  # the allocator choice travels in the spec
        cmd = [sys.executable, "-c", _WORKER, json.dumps(dataclasses.asdict(sent))]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=worker_env(spec, os.environ),
        )
        self.info = self._receive()

    def _receive(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                msg = json.loads(line[len(_PREFIX) :])
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


def run(
    specs: Sequence[Spec],
    *,
    rounds: int = 5,
    steps: int = 3,
    modes: Sequence[str] = MODES,
    matmul_n: int = 2048,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmarks `specs` side by side; the first spec is the reference of the ratios.

    Args:
      specs: the workers (at least one); labels must differ.
      rounds: interleaved rounds; each worker runs `steps` steps of each mode per round (0: only
        compile, e.g. to measure the compile time of a model too large to step here).
      steps: steps per worker, mode and round (timed together, dispatched back to back).
      modes: 'train' and/or 'eval'.
      matmul_n: size of the n x n x n matmul ceiling in the compute dtype (0: skip); a worker
        shrinks it where one product would take over 0.5 s (`Runner.matmul`).
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
        raise ValueError(
            f"duplicate workers {labels}: each implementation x XLA configuration once"
        )
    if rounds < 0 or steps < 1:
        raise ValueError(f"rounds={rounds} must be >= 0 (0: compile only) and steps={steps} >= 1")
    if matmul_n < 0:
        raise ValueError(f"matmul={matmul_n} must be >= 0 (0: no matmul ceiling)")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes={tuple(modes)}; choose from {MODES}")
    say = log or (lambda _: None)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "load_start": os.getloadavg(),
        "rounds": rounds,
        "steps": steps,
        "workers": [],
    }
    workers: list[Worker] = []
    try:
        for spec in specs:
            say(f"starting {spec.label} ({spec.model}, batch {spec.batch_size}, {spec.dtype}) ...")
            try:
                w = Worker(spec)
            except RuntimeError as e:
                say(f"  skipped: {e}")
                continue
            say(
                f"  compiled: train {w.info['compile_train_s']:.1f} s, "
                f"eval {w.info['compile_eval_s']:.1f} s"
            )
            workers.append(w)
        if not workers:
            raise RuntimeError("no worker started (see 'skipped' above)")
        times = {w.spec.label: {m: [] for m in modes} for w in workers}
        cpu = {w.spec.label: {m: [] for m in modes} for w in workers}
        loads = []
        for r in range(rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)] if workers else []
            for w in order:
                for m in modes:
                    answer = w.ask(f"run {m} {steps}")
                    times[w.spec.label][m].append(answer["wall_s"] / steps)
                    cpu[w.spec.label][m].append(answer["cpu_s"] / steps)
            loads.append(os.getloadavg()[0])
            say(f"round {r + 1}/{rounds} done (load {loads[-1]:.1f})")
        ceilings = {
            w.spec.label: w.ask(f"matmul {matmul_n} 3") if matmul_n and rounds else {}
            for w in workers
        }
        for w in workers:
            peak_rss = w.close().get("peak_rss_mib")
            label = w.spec.label
            result["workers"].append(
                _summarise(w, times[label], cpu[label], ceilings[label], peak_rss, workers)
            )
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
                entry["ratio"][m] = {
                    "median": _median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                }
    return result


def _summarise(
    w: Worker,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    matmul: dict[str, Any],
    peak_rss: float | None,
    workers: Sequence[Worker],
) -> dict[str, Any]:
    """One worker's entry of `run`'s result (per-mode images/s, GFLOP/s, compile time, memory)."""
    spec, info = w.spec, dict(w.info)
    info.pop("ready", None)
    ceiling, peak_tflops = matmul.get("gflops"), info.get("peak_tflops")
    macs = info.get("macs_per_image") or next(
        (
            v.info.get("macs_per_image")
            for v in workers
            if v.spec.model == spec.model and v.info.get("macs_per_image")
        ),
        None,
    )
    entry = {
        "label": spec.label,
        "spec": dataclasses.asdict(spec),
        **info,
        "peak_rss_mib": peak_rss,
        "matmul_gflops": ceiling,
        "matmul_n": matmul.get("n"),
        "modes": {},
    }
    for m, ts in times.items():
        if not ts:
            continue
        ips = [spec.batch_size / t for t in ts]
        med = _median(ips)
        gflops = None if macs is None else med * macs * (6 if m == "train" else 2) / 1e9
        entry["modes"][m] = {
            "images_per_s": med,
            "best_images_per_s": max(ips),
            "per_round": ips,
            "step_ms": 1e3 * _median(ts),
            "images_per_cpu_s": spec.batch_size / _median(cpu[m]),
            "gflops": gflops,
            "fraction_of_matmul": None if not (gflops and ceiling) else gflops / ceiling,
            "mfu": None if not (gflops and peak_tflops) else gflops / (1e3 * peak_tflops),
        }
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
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": simd,
        "python": platform.python_version(),
    }


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of `run`'s result."""
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {' '.join(m['simd'])}; "
        f"load {result['load_start'][0]:.1f} -> {result['load_end'][0]:.1f}; "
        f"{result['rounds']} rounds x {result['steps']} steps; ratios vs {result['reference']}"
    ]
    devices = sorted(
        {
            e["device"]
            for e in result["workers"]
            if e.get("platform", "cpu") != "cpu" and e.get("device")
        }
    )
    if devices:
        lines.append(f"accelerator: {', '.join(devices)}")
    head = (
        f"{'worker':28s} {'mode':5s} {'img/s':>7s} {'best':>7s} {'ms/step':>8s} {'ratio':>6s} "
        f"{'[min-max]':>13s} {'img/CPUs':>8s} {'GFLOP/s':>8s} {'%mm':>4s} {'MFU%':>5s} "
        f"{'compile':>8s} {'step MiB':>8s} "
        f"{'RSS MiB':>8s}"
    )
    lines += [head, "-" * len(head)]
    for e in result["workers"]:
        if not e["modes"]:
            lines.append(
                f"{e['label']:28s} compile only: train {e['compile_train_s']:.1f} s "
                f"(CPU {e.get('compile_train_cpu_s', float('nan')):.1f} s), "
                f"eval {e['compile_eval_s']:.1f} s"
            )
        for mode, r in e["modes"].items():
            ratio = e["ratio"][mode]
            frac = "" if r["fraction_of_matmul"] is None else f"{100 * r['fraction_of_matmul']:.0f}"
            mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}"
            comp = e.get(f"compile_{mode}_s")
            gflops = "" if r["gflops"] is None else format(r["gflops"], ".1f")
            step_mib = e.get("train_step_mib")
            rss = e.get("peak_rss_mib")
            lines.append(
                f"{e['label']:28s} {mode:5s} {r['images_per_s']:7.1f} "
                f"{r['best_images_per_s']:7.1f} {r.get('step_ms', float('nan')):8.2f} "
                f"{ratio['median']:6.2f} {ratio['min']:6.2f}-{ratio['max']:<6.2f} "
                f"{r['images_per_cpu_s']:8.1f} {gflops:>8s} {frac:>4s} {mfu:>5s} "
                f"{'' if comp is None else format(comp, '.1f') + ' s':>8s} "
                f"{'' if step_mib is None else format(step_mib, '.0f'):>8s} "
                f"{'' if rss is None else format(rss, '.0f'):>8s}"
            )
    ceil = ", ".join(
        f"{e['label']} {e['matmul_gflops']:.0f} (n={e.get('matmul_n')})"
        for e in result["workers"]
        if e["matmul_gflops"]
    )
    if ceil:
        dtype = result["workers"][0]["spec"]["dtype"]
        lines.append(f"matmul ceiling (GFLOP/s, {dtype} square matmul): {ceil}")
    peaks = {e["peak_tflops"] for e in result["workers"] if e.get("peak_tflops")}
    if peaks:
        lines.append(
            "MFU: model FLOP/s (6 x multiply-adds per trained image, 2 x evaluated) over the "
            f"datasheet dense bf16 peak, {', '.join(f'{p:g}' for p in sorted(peaks))} TFLOP/s"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m cnnjax bench` and `python -m experiments.bench`; `--impl` offers
    the implementations registered when this is called (`register`)."""
    p.add_argument(
        "--model", default="resnet20", help="registered model (the twins: CIFAR resnet/plain 6n+2)"
    )
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument(
        "--impl",
        nargs="+",
        default=list(_DEFAULTS),
        metavar="IMPL",
        help=f"implementations: {', '.join(implementations())} (default: "
        f"{' '.join(_DEFAULTS)}); the first (with the first --xla) is the "
        "reference of the ratios",
    )
    p.add_argument(
        "--xla",
        nargs="+",
        default=["auto"],
        help="XLA configurations for the JAX implementations: names "
        f"({', '.join(xla_flags.CPU_PRESETS)}) or flag strings starting with "
        "'--'; auto (the default): 'fast' on a CPU host, 'default' where a "
        "GPU/TPU is expected (the CPU flags do nothing there)",
    )
    p.add_argument("--scan_blocks", action="store_true", help="cnnjax ResNet with scanned blocks")
    p.add_argument(
        "--conv_vjp",
        nargs="+",
        choices=CONV_VJPS,
        default=["auto"],
        help="cnnjax convolution gradient paths to compare (auto: canonical on CPU)",
    )
    p.add_argument(
        "--bn_vjp",
        nargs="+",
        choices=BN_VJPS,
        default=["auto"],
        help="cnnjax BatchNorm training gradient paths to compare (auto: fused on CPU)",
    )
    p.add_argument(
        "--conv_backend",
        nargs="+",
        choices=CONV_BACKENDS,
        default=["auto"],
        help="cnnjax convolution libraries to compare (auto: oneDNN on the CPU where "
        "installed, see cnnjax.native)",
    )
    p.add_argument(
        "--bn_backend",
        nargs="+",
        choices=BN_BACKENDS,
        default=["auto"],
        help="who computes cnnjax's BatchNorm passes, to compare (auto: the native "
        "kernels on the CPU where built)",
    )
    p.add_argument(
        "--conv_weights",
        nargs="+",
        choices=CONV_WEIGHTS,
        default=["auto"],
        help="who computes the filter gradients of cnnjax's oneDNN convolutions, to "
        "compare (auto: cnnjax's own kernel where it applies, see "
        "cnnjax.settings conv_weights)",
    )
    p.add_argument(
        "--malloc",
        nargs="+",
        choices=MALLOCS,
        default=["auto"],
        help="C allocator settings to compare, for every implementation (auto: as "
        "the entry points, tuned on a CPU host; tuned: "
        "cnnjax.xla_flags.tune_malloc)",
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per worker, mode and round")
    p.add_argument(
        "--matmul",
        type=int,
        default=2048,
        help="n of the n^3 matmul ceiling, smaller where one product would take over "
        "0.5 s (0: skip)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin every worker to this many cores (torch threads too); 0: the libraries' defaults",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")


def auto_xla(environ: Mapping[str, str] | None = None) -> str:
    """The XLA configuration `--xla auto` compares: 'fast' (`configure_cpu()`'s CPU preset) on a
    CPU host whose jaxlib defines its flags; 'default' (XLA's own) where a GPU/TPU is expected,
    since the CPU flags do nothing there, or where the jaxlib lacks them."""
    if xla_flags.accelerator_expected(environ) or xla_flags.unknown_flags("fast"):
        return "default"
    return "fast"


def specs_from_args(args: argparse.Namespace) -> list[Spec]:
    """One Spec per implementation x XLA configuration (an implementation not on JAX once, XLA
    'default'), x each cnnjax option for cnnjax; an implementation whose `Runner.requires` are
    not installed (torch for the PyTorch twin) is skipped with a message."""
    specs: list[Spec] = []
    for impl in args.impl:
        cls = Spec(impl).runner_class()  # an unknown name: ValueError naming the choices
        ours = cls.cnnjax_options
        for xla in args.xla if cls.uses_xla else ["default"]:
            xla = auto_xla() if xla == "auto" else xla
            mine = (lambda values: values) if ours else (lambda values: ["auto"])  # noqa: E731
            for vjp, bn_vjp, backend, bn_backend, weights, malloc in itertools.product(
                mine(args.conv_vjp),
                mine(args.bn_vjp),
                mine(args.conv_backend),
                mine(args.bn_backend),
                mine(args.conv_weights),
                args.malloc,
            ):
                spec = Spec(
                    impl,
                    args.model,
                    args.batch_size,
                    args.dtype,
                    xla,
                    scan_blocks=args.scan_blocks and ours,
                    threads=args.threads,
                    conv_vjp=vjp,
                    bn_vjp=bn_vjp,
                    malloc=malloc,
                    conv_backend=backend,
                    bn_backend=bn_backend,
                    conv_weights=weights,
                )
                if spec.label not in {s.label for s in specs}:
                    specs.append(spec.validate())
    kept, told = [], set()
    for spec in specs:
        missing = [m for m in spec.runner_class().requires if importlib.util.find_spec(m) is None]
        if not missing:
            kept.append(spec)
        elif spec.impl not in told:
            told.add(spec.impl)
            print(
                f"{', '.join(missing)} not installed: skipping {spec.impl} "
                f"(pip install {' '.join(missing)})",
                file=sys.stderr,
            )
    return kept


def run_from_args(args: argparse.Namespace, prog: str = "cnnjax bench") -> int:
    if args.json:  # checked before the minutes of benchmarking, written atomically after
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r}: give a file path in an existing directory")
    try:
        result = run(
            specs_from_args(args),
            rounds=args.rounds,
            steps=args.steps,
            modes=args.modes,
            matmul_n=args.matmul,
            log=lambda s: print(s, file=sys.stderr),
        )
    except RuntimeError as e:  # a worker died mid-run (out of memory, a crash in a library)
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        from cnnjax.train.metrics import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def main(
    argv: Sequence[str] | None = None, *, prog: str = "cnnjax bench", description: str | None = None
) -> int:
    """`python -m cnnjax.bench` entry point, and `python -m experiments.bench`'s (its `prog`,
    after it registers the twins). Also runs a worker (`--worker SPEC_JSON`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    parser = ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv), prog)
    except ValueError as e:
        message = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line
        parser.exit(2, f"{prog}: error: {message}\n")


if __name__ == "__main__":
    # The module proper (its registry and classes), not this __main__ copy of it.
    from cnnjax.bench import main as _main

    raise SystemExit(_main())
