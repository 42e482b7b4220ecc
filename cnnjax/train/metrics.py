"""Run records: `metrics.jsonl` (appended line by line), atomic JSON files, a training meter."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from cnnjax._files import atomic_write


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes `obj` as JSON, whole or not at all."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a crash, is skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsWriter:
    """Appends one JSON object per line to a metrics.jsonl file; a no-op unless `enabled`.

    Each record is written with a single `write` on a file opened with O_APPEND, and synced,
    so a crash leaves at most a torn last line (which `read_metrics` skips).

    Args:
      path: the metrics.jsonl file.
      enabled: False on every process but 0 of a multi-process run.
    """

    def __init__(self, path: str, *, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate_after(self, step: int) -> int:
        """Drops records of steps after `step` (written after the checkpoint being resumed).

        Returns the number of records dropped.
        """
        if not self.enabled or not os.path.exists(self.path):
            return 0
        records = read_metrics(self.path)
        keep = [r for r in records if r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        return len(records) - len(keep)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Meter:
    """Averages per-step training metrics over the steps since the last log record.

    Steps are added as device arrays (no host sync); `flush` copies them to the host and adds
    them to float64 sums one step at a time, so the sums do not depend on when flushes happen
    and are restored exactly from a checkpoint (`state()` / `from_state`).
    """

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0):
        self.sums = dict(sums or {})
        self.count = int(count)
        self.last: dict[str, float] = {}  # the most recent step's metrics
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, metrics: Any) -> None:
        self._pending.append((step, metrics))

    def flush(self, to_host: Callable[[Any], Any]) -> None:
        """Moves pending steps to the sums; NonFiniteLossError at the first non-finite loss."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for step, metrics in zip((s for s, _ in pending), to_host([m for _, m in pending])):
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"the training loss is {loss} at step {step}")
            for k, v in metrics.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.count += 1
            self.last = {k: float(v) for k, v in metrics.items()}

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state(self) -> dict[str, Any]:
        if self._pending:
            raise RuntimeError("flush the meter before saving its state")
        # A copy: the checkpointer writes it asynchronously while the next steps add to `sums`.
        return {"sums": dict(self.sums), "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Meter:
        state = state or {}
        return cls(state.get("sums"), state.get("count", 0))
