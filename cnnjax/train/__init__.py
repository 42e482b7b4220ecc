"""Training: train state, per-device steps, data-parallel wrappers, schedules,
checkpoints, the loop.

from cnnjax import train
config = train.get_preset('cifar_resnet').replace(model='resnet56')
result = train.train_and_evaluate(config, 'runs/resnet56')
"""

from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.config import PRESETS, TrainConfig, get_preset
from cnnjax.train.engine import Engine, Member
from cnnjax.train.loop import (
    RunResult,
    build,
    evaluate_checkpoint,
    evaluate_weights,
    initial_state,
    train_and_evaluate,
)
from cnnjax.train.metrics import MetricsWriter, NonFiniteLossError, read_metrics
from cnnjax.train.optim import (
    create_learning_rate_fn,
    create_optimizer,
    num_train_steps,
    weight_decay_mask,
)
from cnnjax.train.parallel import AXIS, DataParallel, initialize_distributed
from cnnjax.train.state import TrainState, create_train_state
from cnnjax.train.steps import cross_entropy, make_eval_step, make_train_step, top_k_error
from cnnjax.train.workdir import CheckpointError, WorkdirLocked

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
