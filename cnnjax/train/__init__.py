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
    "engine": ("Engine", "Member", "initial_state"),
    "loop": (
        "RunResult",
        "build",
        "evaluate_checkpoint",
        "evaluate_weights",
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


__all__ = sorted(_HOME)
