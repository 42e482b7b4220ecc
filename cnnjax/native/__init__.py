"""Native CPU kernels: oneDNN convolutions and BatchNorm's passes as XLA FFI custom calls.

XLA's CPU backend runs convolutions through Eigen (or YNNPACK, slower still on the CIFAR layers'
filter gradients, PERFORMANCE.md section 1), and needs transposes around every filter gradient.
oneDNN (the library PyTorch's CPU convolutions run on) computes the forward pass and both
gradients directly on NHWC activations and HWIO kernels. `dnnl_conv.cc` wraps its three
convolution primitives as XLA FFI handlers; `cnnjax.native.onednn` calls them from JAX and
differentiates them (to any order); `cnnjax.functional.conv2d` uses them on the CPU backend
(`CONV_BACKEND`, PERFORMANCE.md section 10). `batch_norm.cc` holds BatchNorm's passes over the
activations (statistics, normalisation with a fused ReLU and residual addition, and their
backward), `cnnjax.native.batch_norm` their JAX side, used by `cnnjax.functional.batch_norm`
(`BN_BACKEND`, section 11). Both split their work over XLA's intra-op threads (`parallel.h`) and
are compiled into one library.

On Linux x86-64 cnnjax depends on oneDNN's CPU build and headers from PyPI (`onednn-cpu-gomp`,
`onednn-devel-cpu-gomp`, installed into the environment's prefix); elsewhere they are optional
and XLA's convolutions run without them. The first lowering compiles
the sources with the system's C++ compiler (a few seconds, once) into a cache directory:
`$CNNJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cnnjax`, else `~/.cache/cnnjax`. The library is named
by a hash of its sources, the jaxlib version, the oneDNN location, the compiler and its flags
(with -mavx2 -mfma where the CPU has them), so a change to any of them rebuilds it.
`CNNJAX_DNNL_ROOT` points at another oneDNN 3.x installation (a directory with
include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so); `CXX` names the compiler.

The layers decide at trace time from cheap facts (`usable()`: Linux, oneDNN found, a C++
compiler, no failed build), and the library is built and its FFI targets registered when a
call to them is first lowered (`ensure_lowering_hook`), so tracing (`jax.eval_shape`, `cnnjax
summary`) builds nothing. `available()` builds now and says whether the kernels can run,
`unavailable_reason()` why not; `load()` raises `NativeUnavailable` with that reason. Where the
build fails (a broken compiler), a RuntimeWarning says so once per process; a computation
already traced onto the kernels then fails to lower with that reason (backend='xla' avoids
them), and later traces under 'auto' take XLA's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from cnnjax import settings

_HERE = Path(__file__).parent
SOURCES = (_HERE / "dnnl_conv.cc", _HERE / "batch_norm.cc")  # compiled together into one library
HEADERS = (_HERE / "parallel.h", _HERE / "conv_weights.h")
CONV_TARGETS = ("cnnjax_dnnl_conv_fwd", "cnnjax_dnnl_conv_bwd_data", "cnnjax_dnnl_conv_bwd_weights")
BN_TARGETS = (
    "cnnjax_bn_sums",
    "cnnjax_bn_apply",
    "cnnjax_bn_apply_residual",
    "cnnjax_bn_grad_sums",
    "cnnjax_bn_grad_sums_masked",
    "cnnjax_bn_grad_apply",
)
TARGETS = CONV_TARGETS + BN_TARGETS
DNNL_PACKAGES = (
    "onednn-cpu-gomp==2023.2.0",
    "onednn-devel-cpu-gomp==2023.2.0",
)  # as pyproject.toml pins them
INSTALL_HINT = (
    f"pip install {' '.join(DNNL_PACKAGES)} (oneDNN's CPU build and headers, Linux x86-64)"
)
# -O3 vectorises the BatchNorm loops over channels; no contraction into FMAs, so that the ReLU mask
# recomputed in a backward pass is the forward's, bit for bit.
_CXXFLAGS = ("-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")


def _isa_flags() -> tuple[str, ...]:
    """-mavx2 -mfma where this CPU has them (the BatchNorm loops run 8 floats wide); part of the
    cached library's name, so a cache shared with an older CPU never hands it these instructions."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return ("-mavx2", "-mfma") if {"avx2", "fma"} <= set(flags) else ()


def _cxxflags() -> tuple[str, ...]:
    return _CXXFLAGS + _isa_flags()


class NativeUnavailable(RuntimeError):
    """The oneDNN kernels cannot be built or loaded here; the message says why and what to do."""


def _candidate_root() -> Path:
    """Where oneDNN is looked for (`cnnjax.settings.dnnl_root`: CNNJAX_DNNL_ROOT, else this
    environment's prefix, where the pip packages put it)."""
    return settings.dnnl_root()


def dnnl_root() -> Path | None:
    """The oneDNN installation to build against (`_candidate_root`), or None if it has none."""
    root = _candidate_root()
    if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and _libdnnl(root) is not None:
        return root
    return None


def _libdnnl(root: Path) -> Path | None:
    for lib in ("lib", "lib64"):
        if (root / lib / "libdnnl.so").exists():
            return root / lib
    return None


def cache_dir() -> Path:
    """Where built libraries are kept (`cnnjax.settings.cache_dir`)."""
    return settings.cache_dir()


def _compiler() -> str | None:
    return (
        shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    )


def _command(cxx: str, root: Path, output: Path) -> list[str]:
    import jax.ffi

    libdir = _libdnnl(root)
    return [
        cxx,
        *_cxxflags(),
        "-o",
        str(output),
        *map(str, SOURCES),
        "-isystem",
        str(root / "include"),
        "-isystem",
        jax.ffi.include_dir(),
        f"-L{libdir}",
        "-ldnnl",
        "-lgomp",
        f"-Wl,-rpath,{libdir}",
    ]


def library_path(root: Path, cxx: str) -> Path:
    """The cached library for these sources, jaxlib, oneDNN, compiler and flags."""
    import jaxlib

    digest = hashlib.sha256()
    for part in (
        *(f.read_bytes() for f in SOURCES + HEADERS),
        jaxlib.__version__.encode(),
        str(root.resolve()).encode(),
        str(Path(cxx).resolve()).encode(),
        " ".join(_cxxflags()).encode(),
    ):
        digest.update(part + b"\0")
    return cache_dir() / "native" / f"libcnnjax_dnnl-{digest.hexdigest()[:16]}.so"


def build(root: Path, cxx: str) -> Path:
    """Compiles the sources unless the cached library exists; returns its path. The library is
    written under a temporary name and renamed into place, so concurrent builds (parallel test
    workers) never see a half-written file."""
    target = library_path(root, cxx)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(_command(cxx, root, Path(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeUnavailable(
                f"compiling {', '.join(f.name for f in SOURCES)} with {cxx} against oneDNN in "
                f"{root} failed:\n{proc.stderr[-4000:]}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"the oneDNN kernels are built for Linux only (this is {sys.platform})"
    root = dnnl_root()
    if root is None:
        return (
            None,
            f"oneDNN 3.x was not found in {_candidate_root()}; "
            f"{INSTALL_HINT}, or set CNNJAX_DNNL_ROOT",
        )
    try:
        cxx = _compiler()
        if cxx is None:
            raise NativeUnavailable(
                "no C++ compiler found (set CXX, or install g++) to build the oneDNN kernels"
            )
        lib = ctypes.CDLL(str(build(root, cxx)))
    except (NativeUnavailable, OSError) as e:
        # oneDNN is installed, so its kernels were expected: say once why XLA's convolutions run.
        warnings.warn(
            f"cnnjax: oneDNN's convolutions are unavailable, XLA's run instead: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, str(e)
    lib.cnnjax_dnnl_version.restype = ctypes.c_char_p
    lib.cnnjax_conv_weights_calls.restype = ctypes.c_int64
    if not _registered:  # XLA keeps the first registration for the life of the process
        import jax

        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        _registered.append(lib)
    return lib, ""


_registered: list[ctypes.CDLL] = []


def load() -> ctypes.CDLL:
    """The loaded kernel library, its FFI targets registered with JAX; raises NativeUnavailable."""
    lib, reason = _load()
    if lib is None:
        raise NativeUnavailable(reason)
    return lib


def available() -> bool:
    """Whether the oneDNN kernels can run here (builds them on first use)."""
    return _load()[0] is not None


@functools.lru_cache(maxsize=None)
def _facts() -> str:
    if not sys.platform.startswith("linux"):
        return f"the oneDNN kernels are built for Linux only (this is {sys.platform})"
    if dnnl_root() is None:
        return (
            f"oneDNN 3.x was not found in {_candidate_root()}; "
            f"{INSTALL_HINT}, or set CNNJAX_DNNL_ROOT"
        )
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++) to build the oneDNN kernels"
    return ""


def usable_reason() -> str:
    """Why the kernels cannot be used here, judged without building them: '' where they can
    (Linux, oneDNN installed, a C++ compiler, and no failed build in this process). What the
    layers decide from at trace time; the build itself waits for the first lowering of a call
    to them (`ensure_lowering_hook`)."""
    if _load.cache_info().currsize:  # a build or load was tried: its outcome
        return _load()[1]
    return _facts()


def usable() -> bool:
    """`usable_reason()` is '' (cheap: builds nothing)."""
    return not usable_reason()


def forget() -> None:
    """Forgets what was found and loaded (tests that change the environment)."""
    _facts.cache_clear()
    _load.cache_clear()


_hooked: list[bool] = []


def ensure_lowering_hook() -> None:
    """Builds and registers the kernels when a call to them is first lowered for the CPU, not
    when it is traced: `jax.eval_shape` or `make_jaxpr` of a network builds nothing. (A CPU
    lowering rule for JAX's ffi_call primitive that loads the library for cnnjax's targets and
    then lowers as JAX does; where this JAX lacks that primitive, the library is loaded now.)"""
    if _hooked:
        return
    try:
        from jax._src import ffi as jax_ffi
        from jax.interpreters import mlir

        primitive, lowering = jax_ffi.ffi_call_p, jax_ffi.ffi_call_lowering
    except (ImportError, AttributeError):
        load()
        _hooked.append(True)
        return

    def lower(ctx, *args, target_name, **params):
        if target_name in TARGETS:
            load()  # NativeUnavailable says why, where the build failed
        return lowering(ctx, *args, target_name=target_name, **params)

    mlir.register_lowering(primitive, lower, platform="cpu")
    _hooked.append(True)


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    return _load()[1]


def dnnl_version() -> str:
    """The version of the oneDNN library the kernels run on, e.g. '3.2.0'."""
    return load().cnnjax_dnnl_version().decode()


def direct_conv_weights() -> bool:
    """Whether the library has cnnjax's own filter-gradient kernel (conv_weights.h: built where
    the CPU has AVX2 and FMA); elsewhere oneDNN computes every filter gradient."""
    return bool(load().cnnjax_conv_weights_kernel())


def direct_conv_weights_calls() -> int:
    """How many filter gradients that kernel has computed in this process (calls, not parts)."""
    return load().cnnjax_conv_weights_calls()
