"""Training: train state, per-device steps, data-parallel wrappers, schedules,
checkpoints, the loop.

from cnnjax import train
config = train.get_preset('cifar_resnet').replace(model='resnet56')
result = train.train_and_evaluate(config, 'runs/resnet56')
"""

import importlib

# Each name's module, imported when the name is first used: `cnnjax.train.config` (and so the
# CLI's help) loads without JAX.
_MODULES = {
    "checkpoint": ("Checkpointer",),
    "config": ("PRESETS", "TrainConfig", "get_preset"),
    "engine": ("Engine", "Member"),
    "loop": (
        "RunResult",
        "build",
        "evaluate_checkpoint",
        "evaluate_weights",
        "initial_state",
        "train_and_evaluate",
    ),
    "metrics": ("MetricsWriter", "NonFiniteLossError", "read_metrics"),
    "optim": (
        "create_learning_rate_fn",
        "create_optimizer",
        "num_train_steps",
        "weight_decay_mask",
    ),
    "parallel": ("AXIS", "DataParallel", "initialize_distributed"),
    "state": ("TrainState", "create_train_state"),
    "steps": ("cross_entropy", "make_eval_step", "make_train_step", "top_k_error"),
    "workdir": ("CheckpointError", "WorkdirLocked"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_HOME})


__all__ = [
    "AXIS",
    "CheckpointError",
    "Checkpointer",
    "DataParallel",
    "Engine",
    "Member",
    "MetricsWriter",
    "NonFiniteLossError",
    "PRESETS",
    "RunResult",
    "TrainConfig",
    "TrainState",
    "WorkdirLocked",
    "build",
    "create_learning_rate_fn",
    "create_optimizer",
    "create_train_state",
    "cross_entropy",
    "evaluate_checkpoint",
    "evaluate_weights",
    "get_preset",
    "initial_state",
    "initialize_distributed",
    "make_eval_step",
    "make_train_step",
    "num_train_steps",
    "read_metrics",
    "top_k_error",
    "train_and_evaluate",
    "weight_decay_mask",
]
