"""One persistent XLA compilation cache for the whole test session (removed at its end).

Many tests compile programs another test has compiled already: a run and the same run alone per
seed, resumed, or in a subprocess. With the cache the later ones load the executable instead of
compiling it again (the very same executable, so nothing they compare changes). The cache
directory is made by the first pytest process (the xdist controller), before its workers start,
and reaches them and the tests' subprocesses through the environment. A user's own
JAX_COMPILATION_CACHE_DIR is left alone.
"""

import os
import shutil
import tempfile

_OWN = "_cnnjax_test_xla_cache"


def pytest_configure(config):
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # the user's, or the controller's inherited by an xdist worker
    path = tempfile.mkdtemp(prefix="cnnjax_test_xla_cache_")
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=path,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    setattr(config, _OWN, path)


def pytest_unconfigure(config):
    path = getattr(config, _OWN, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
