"""Starts the helper scripts of the training tests in fresh interpreters.

They inherit the session's XLA compilation cache (tests/conftest.py) through the environment:
they compile the same steps, and a cache hit runs the very same executable.
"""

import json
import os
import subprocess
import sys

HELPERS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HELPERS))


def start(script, *args, env=None, **popen_kwargs):
    """Popen of `python helpers_train/<script> args...` on CPU, output captured as text.

    `env` adds environment variables.
    """
    env = dict(
        os.environ,
        **(env or {}),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )
    return subprocess.Popen(
        [sys.executable, os.path.join(HELPERS, script), *map(str, args)],
        cwd=HELPERS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def finish(proc, timeout=300, returncode=0):
    """Waits for `proc`; checks its exit status; returns its last stdout line
    parsed as JSON (or None)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} timed out:\n{err[-3000:]}") from None
    assert proc.returncode == returncode, f"{proc.args} exited {proc.returncode}:\n{err[-3000:]}"
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


def run(script, *args, timeout=300, returncode=0):
    return finish(start(script, *args), timeout=timeout, returncode=returncode)
