"""`TrainConfig`, the one place a run's hyper-parameters live, and the named presets.

A config is plain data: it is written to `<workdir>/config.json`, read back by `cnnjax eval`, and
compared on resume. Presets are configs with a name; the CLI starts from one and overrides fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from typing import Any, Literal

import numpy as np

# The choices of the string fields, as types: pydantic checks them with the rest, and the CLI
# offers them as its flags' choices.
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["step", "cosine", "constant"]
Warmup = Literal["linear", "constant"]
WdMask = Literal["all", "no_bn_bias"]
Dtype = Literal["float32", "bfloat16"]
Parallel = Literal["shard_map", "pmap", "none"]
RngImpl = Literal["threefry2x32", "rbg", "unsafe_rbg"]
MemberMap = Literal["auto", "vmap", "loop"]
EvalSplit = Literal["test", "validation"]

# Fields that may change when a run is resumed (how long, how often, how it is shown).
# steps_per_dispatch and data_on_device change how the same steps are computed, not which.
RESUMABLE_FIELDS = frozenset(
    {
        "num_steps",
        "num_epochs",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "progress_bar",
        "data_dir",
        "steps_per_dispatch",
        "data_on_device",
        "member_map",
    }
)


# Pairs of fields of which a run sets one: the run's length, and the step schedule's boundaries.
EXCLUSIVE = (("num_steps", "num_epochs"), ("boundaries", "boundary_epochs"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Args:
      model: registry name (`cnnjax.models.list_models()`).
      model_kwargs: extra overrides for `cnnjax.models.create` (e.g. {'zero_init_residual': True}).
      dataset: `cnnjax.data` name ('digits', 'mnist', 'cifar10', 'imagenet2012', a .npz dir, ...).
      data_dir: where the data set lives (None: the data module's default).
      image_size: resize images to this side (None: the model's default input size).
      channels: force 1 or 3 channels (None: the model's default input channels).
      validation_size: training examples held out as the 'validation' split.
      eval_split: split evaluated during and after training ('test' or 'validation').
      augment: 'none', 'flip', 'cifar' (pad 4, crop, flip) or 'imagenet' (scale augmentation,
        crop, flip).
      normalize: 'per_pixel_mean' (the ResNet CIFAR recipe), 'per_channel', 'scale', or the
        fixed constants published weights expect: 'imagenet' (torchvision), 'inception', 'dpn'.
      global_batch_size: examples per step over all devices and processes.
      num_steps: length of the run in steps; exactly one of num_steps and num_epochs is set.
      num_epochs: length of the run in epochs (rounded up to whole steps).
      optimizer: 'sgd' (momentum, optionally Nesterov), 'adam' (L2 decay) or 'adamw' (decoupled).
      learning_rate: peak rate for `base_batch_size` examples (or for this batch if that is None).
      base_batch_size: linear scaling rule (Goyal et al. 2017): the rate used is
        learning_rate * global_batch_size / base_batch_size. None: no scaling.
      momentum: SGD momentum (or Adam's b1).
      nesterov: Nesterov momentum for SGD.
      weight_decay: L2 coefficient (added to the gradient, as in the ResNet
          paper), or AdamW's decay.
      wd_mask: 'all' decays every parameter (the ResNet paper); 'no_bn_bias' skips every
        parameter with fewer than two axes (BatchNorm scale and bias, layer biases).
      schedule: 'step' (divide by 1/decay_factor at each boundary), 'cosine' (to zero at the
        end, after the warm-up) or 'constant'.
      boundaries: step-decay boundaries in steps (the paper: 32000, 48000).
      boundary_epochs: the same in epochs (converted with the steps per epoch); use one of the two.
      decay_factor: multiplier at each boundary (0.1).
      warmup_steps: steps of warm-up before the schedule (0: none).
      warmup: 'constant' holds warmup_lr (ResNet-110 on CIFAR: 0.01 for about 400 steps; the
        paper warms up "until the training error is below 80%", a fixed count is used here) or
        'linear' ramps from warmup_lr to the peak (Goyal et al.).
      warmup_lr: the warm-up rate ('constant') or starting rate ('linear').
      label_smoothing: epsilon of label smoothing (0: plain cross-entropy).
      aux_weight: weight of auxiliary classifier losses (GoogLeNet: 0.3).
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
      parallel: 'shard_map' (jit over shard_map on a 1-D mesh of all devices), 'pmap', or
        'none' (one device, no named axis).
      seed: seeds initialisation, data order and dropout.
      seeds: independent runs of this config with seeds seed, seed + 1, ..., trained as members
        of one compiled program (vmap over a leading member axis), each with its own parameters,
        statistics, optimiser state, data order, augmentation draws and dropout keys (with
        rng_impl 'rbg' a member's dropout bits differ from its single run's; threefry2x32's do
        not). The validation carve-out is the first seed's for all.
      twins: train the plain and the residual net of the model's depth side by side, for each
        seed, as members of one program: a ResNet with option A shortcuts (the two have the same
        parameters), the plain member computed by the same network with its shortcuts scaled by 0.
      data_on_device: put the training split (and the evaluated split) on the devices once, as
        uint8 sharded over the data axis, and make each batch there (gather, normalise, pad, crop,
        flip) from the host pipeline's own draws: the same batches, without the host's pixel work.
        For sets held in memory, with augment 'none', 'flip' or 'cifar'.
      steps_per_dispatch: training steps per compiled call (lax.scan); log_every, eval_every and
        checkpoint_every must be multiples of it. Callbacks and SIGTERM act between calls.
      member_map: how a program computes its members: 'vmap' (batched, each kernel once for all
        members), 'loop' (one after the other in the same program) or 'auto' (vmap on a GPU or
        TPU; loop on the CPU, where vmap runs cnnjax's native kernels member by member, slower).
      rng_impl: JAX PRNG implementation for initialisation and dropout. 'threefry2x32' is JAX's
        default (identical on every backend); 'rbg' is much faster on TPU and compiles much
        faster on CPU (big_vision and t5x use it), with backend-dependent bits.
      log_every: steps between training-metric records.
      eval_every: steps between evaluations (0: only at the end).
      checkpoint_every: steps between checkpoints (0: only at the end and on SIGTERM).
      keep_checkpoints: how many recent checkpoints to keep.
      progress_bar: show a tqdm bar on process 0.
    """

    model: str = "lenet5"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    channels: int | None = None
    validation_size: int = 0
    eval_split: EvalSplit = "test"
    augment: str = "none"
    normalize: str = "per_pixel_mean"
    global_batch_size: int = 128
    num_steps: int | None = None
    num_epochs: float | None = None
    optimizer: Optimizer = "sgd"
    learning_rate: float = 0.1
    base_batch_size: int | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    wd_mask: WdMask = "all"
    schedule: Schedule = "constant"
    boundaries: tuple[int, ...] = ()
    boundary_epochs: tuple[float, ...] = ()
    decay_factor: float = 0.1
    warmup_steps: int = 0
    warmup: Warmup = "constant"
    warmup_lr: float = 0.0
    label_smoothing: float = 0.0
    aux_weight: float = 0.3
    dtype: Dtype = "float32"
    parallel: Parallel = "shard_map"
    seed: int = 0
    seeds: int = 1
    twins: bool = False
    data_on_device: bool = False
    steps_per_dispatch: int = 1
    member_map: MemberMap = "auto"
    rng_impl: RngImpl = "threefry2x32"
    log_every: int = 50
    eval_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    progress_bar: bool = True

    def __post_init__(self):
        # JSON gives lists; keep the dataclass hashable-looking and comparable. Values of the
        # wrong type are kept as given, for `validate` to name the field and the expected type.
        if isinstance(self.boundaries, (list, tuple)):
            object.__setattr__(
                self,
                "boundaries",
                tuple(
                    int(b) if _is_real(b) and math.isfinite(b) and float(b).is_integer() else b
                    for b in self.boundaries
                ),
            )
        if isinstance(self.boundary_epochs, (list, tuple)):
            object.__setattr__(
                self,
                "boundary_epochs",
                tuple(float(b) if _is_real(b) else b for b in self.boundary_epochs),
            )
        if isinstance(self.model_kwargs, dict):
            object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))

    @property
    def peak_learning_rate(self) -> float:
        """learning_rate after the linear batch-size scaling rule."""
        if self.base_batch_size:
            return self.learning_rate * self.global_batch_size / self.base_batch_size
        return self.learning_rate

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`; unknown field names raise ValueError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; fields are {field_names()}")
        return dataclasses.replace(self, **changes)

    def override(self, **changes: Any) -> TrainConfig:
        """`replace`, where a field given replaces its exclusive twin too (EXCLUSIVE): a preset's
        num_epochs gives way to num_steps given on the command line, boundary_epochs to
        boundaries, and the other way round."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for a, b in EXCLUSIVE:
            for given, other in ((a, b), (b, a)):
                if given in changes and other not in changes:
                    changes[other] = defaults[other]
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["boundaries"] = list(self.boundaries)
        d["boundary_epochs"] = list(self.boundary_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of a field-name -> value dict (as `to_dict` and config.json give).

        Raises ValueError for anything but a dict, unknown field names and values of the wrong
        type (naming the field and the expected type).
        """
        if not isinstance(d, dict):
            raise ValueError(
                f"a TrainConfig is built from a JSON object (dict) of field names to values, "
                f"got a {type(d).__name__}"
            )
        unknown = sorted(set(d) - set(field_names()), key=str)
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; fields are {field_names()}")
        config = cls(**d)
        config._check_types()
        return config

    @classmethod
    def from_json_file(cls, path: str) -> TrainConfig:
        """The config in a JSON file (a run's config.json); ValueError naming the file otherwise."""
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(
                f"cannot read config file {os.fspath(path)!r}: {e.strerror or e}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(
                f"config file {os.fspath(path)!r} must hold a JSON object of TrainConfig fields "
                f"(like a run's config.json), got a JSON {type(d).__name__}"
            )
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"config file {os.fspath(path)!r}: {e}") from None

    def _check_types(self) -> None:
        """Raises ValueError naming the first field whose value does not have its annotated type.

        pydantic checks, strictly: '0.1' is not a number, 1.0 not an int, True neither.
        """
        import pydantic

        try:
            _fields_adapter().validate_python({name: getattr(self, name) for name in field_names()})
        except pydantic.ValidationError as e:
            raise ValueError(_describe_error(e)) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self, *, check_registries: bool = True) -> TrainConfig:
        """Raises ValueError naming the first bad field, its value and the valid choices.

        The types first (`_check_types`), then what a type cannot say: ranges, the fields that
        go together, the registries' names.
        """
        self._check_types()
        for name, hint in field_types().items():
            if hint is float or hint == float | None:
                value = getattr(self, name)
                if value is not None and math.isnan(value):
                    raise ValueError(f"TrainConfig.{name} must be a number, got nan")
        for name in (
            "global_batch_size",
            "log_every",
            "keep_checkpoints",
            "seeds",
            "steps_per_dispatch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "validation_size"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"TrainConfig.{name} must be an int >= 0, got {getattr(self, name)!r}"
                )
        if (self.num_steps is None) == (self.num_epochs is None):
            raise ValueError(
                f"TrainConfig: set exactly one of num_steps and num_epochs, got "
                f"num_steps={self.num_steps}, num_epochs={self.num_epochs}"
            )
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(
                f"TrainConfig.num_steps must be a positive int, got {self.num_steps!r}"
            )
        if self.num_epochs is not None and not (
            self.num_epochs > 0 and math.isfinite(self.num_epochs)
        ):
            raise ValueError(
                f"TrainConfig.num_epochs must be a finite number > 0, got {self.num_epochs!r}"
            )
        if self.boundaries and self.boundary_epochs:
            raise ValueError(
                "TrainConfig: give step-decay boundaries either in steps (boundaries) or in "
                f"epochs (boundary_epochs), not both: {self.boundaries} and {self.boundary_epochs}"
            )
        for name in ("boundaries", "boundary_epochs"):
            b = getattr(self, name)
            if list(b) != sorted(set(b)) or any(x <= 0 for x in b):
                raise ValueError(f"TrainConfig.{name} must be increasing and positive, got {b}")
        if self.schedule != "step" and (self.boundaries or self.boundary_epochs):
            raise ValueError(
                "TrainConfig: boundaries are only used by schedule='step', "
                f"got schedule={self.schedule!r}"
            )
        if not self.learning_rate > 0 or self.warmup_lr < 0:
            raise ValueError(
                f"TrainConfig: learning_rate must be > 0 and warmup_lr >= 0, got "
                f"{self.learning_rate} and {self.warmup_lr}"
            )
        for name in ("learning_rate", "warmup_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or (value and np.float32(value) == 0):
                raise ValueError(
                    f"TrainConfig.{name}={value!r} is not a rate float32 can hold "
                    "(finite, and 0 or at least 1.4e-45): the steps compute in "
                    "float32"
                )
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise ValueError(
                "TrainConfig.base_batch_size must be a positive int or None, "
                f"got {self.base_batch_size}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.weight_decay < 0 or self.aux_weight < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"TrainConfig: need weight_decay >= 0, aux_weight >= 0 and 0 <= momentum < 1, got "
                f"{self.weight_decay}, {self.aux_weight}, {self.momentum}"
            )
        if not self.decay_factor > 0:
            raise ValueError(
                "TrainConfig.decay_factor must be > 0 (the rate is multiplied by it at each "
                f"step-decay boundary), got {self.decay_factor!r}"
            )
        if not 0 <= self.seed < 2**32:
            # Larger seeds wrap around in jax.random.key (2**32 gives the key of seed 0).
            raise ValueError(f"TrainConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.seed + self.seeds > 2**32:
            last = self.seed + self.seeds - 1
            raise ValueError(
                f"TrainConfig: seeds {self.seed}..{last} pass 2**32 - 1; lower seed or seeds"
            )
        n = self.steps_per_dispatch
        for name in ("log_every", "eval_every", "checkpoint_every"):
            every = getattr(self, name)
            if every % n:
                below, above = every // n * n, (every // n + 1) * n
                fits = " or ".join(map(str, sorted({below, above} - {0})))
                raise ValueError(
                    f"TrainConfig.{name}={every} is not a multiple of "
                    f"steps_per_dispatch={n}: the host sees the run only between "
                    f"dispatches; use {name}={fits}, or change steps_per_dispatch"
                )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(
                f"TrainConfig.image_size must be a positive int (pixels per side) or None for the "
                f"model's default, got {self.image_size!r}"
            )
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(
                f"TrainConfig.channels must be 1 or 3 (or None for the model's default), "
                f"got {self.channels!r}"
            )
        if self.eval_split == "validation" and self.validation_size == 0:
            raise ValueError(
                "TrainConfig.eval_split='validation' needs validation_size > 0 (examples held out "
                "from the training set)"
            )
        if check_registries:
            self._validate_names()
        return self

    def _validate_names(self) -> None:
        # Imported here: a config is plain data and loads without the models or the data code.
        from cnnjax import data, models

        if self.model not in models.list_models():
            names = models.list_models()
            close = difflib.get_close_matches(str(self.model), names, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(
                f"TrainConfig.model={self.model!r} is not a registered model; "
                f"{hint}valid choices: {names}"
            )
        npz = self.data_dir is not None and os.path.exists(
            os.path.join(self.data_dir, f"{self.dataset}.npz")
        )
        if self.dataset not in data.list_datasets() and not npz:
            raise ValueError(
                f"TrainConfig.dataset={self.dataset!r} is not a known data set; valid choices: "
                f"{data.list_datasets()}, or the name of a <data_dir>/<name>.npz file"
            )
        for name, choices in (("augment", data.AUGMENTATIONS), ("normalize", data.NORMALIZATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TrainConfig.{name}={getattr(self, name)!r} is not one of {list(choices)}"
                )
        if self.data_on_device and self.augment not in data.device.AUGMENTATIONS:
            choices = list(data.device.AUGMENTATIONS)
            raise ValueError(
                f"TrainConfig: data_on_device runs augment {choices} on the devices; "
                f"augment={self.augment!r} resizes on the host: set "
                "data_on_device=false"
            )


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


@functools.cache
def field_types() -> dict[str, Any]:
    """Field name -> resolved type annotation (for the CLI's per-field flags)."""
    return typing.get_type_hints(TrainConfig)


@functools.cache
def field_help() -> dict[str, str]:
    """Field name -> its description in the docstring's Args section (the CLI's help)."""
    import docstring_parser

    doc = docstring_parser.parse(TrainConfig.__doc__ or "", docstring_parser.DocstringStyle.GOOGLE)
    return {p.arg_name: " ".join((p.description or "").split()) for p in doc.params}


@functools.cache
def _fields_adapter():
    """pydantic's validator of a dict holding every field: a model of the same annotations."""
    import pydantic

    fields = {name: (hint, ...) for name, hint in field_types().items()}
    # strict: no coercion ('0.1' is not a number); `model_kwargs` is a field name, not pydantic's.
    config = pydantic.ConfigDict(strict=True, protected_namespaces=())
    return pydantic.TypeAdapter(pydantic.create_model("TrainConfig", __config__=config, **fields))


@functools.cache
def _type_adapter(hint: Any):
    import pydantic

    return pydantic.TypeAdapter(hint)


def _describe_error(e) -> str:
    """One line for the first error of a pydantic ValidationError: where, what, and the value."""
    error = e.errors()[0]
    name, *inner = error["loc"]
    key = ""
    if inner[-1:] == ["[key]"]:  # a dict key's location ends with the key, then '[key]'
        *inner, bad_key, _ = inner
        key = f" key {bad_key!r}"
    where = "".join(f"[{i!r}]" for i in inner) + key
    return f"TrainConfig.{name}{where}: {error['msg']}, got {error['input']!r}"


def parse_field(name: str, text: str) -> Any:
    """A command-line string as the value of TrainConfig field `name`.

    pydantic reads it as it reads strings ('64000', '1e-3', 'true' or 'yes', 'nan', a choice).
    For the shell on top: 'none' (or 'null', or '') is None where a field may be None; a list is
    'a,b' or 'a b'; an int may be written 64e3 (the paper's "64k iterations"); model_kwargs is
    JSON.
    """
    import pydantic

    hint = field_types()[name]
    if type(None) in typing.get_args(hint) and text.lower() in ("none", "null", ""):
        return None
    base = _without_none(hint)
    adapter = _type_adapter(base)
    try:
        if typing.get_origin(base) is tuple:
            return adapter.validate_python(text.replace(",", " ").split())
        if typing.get_origin(base) is dict:
            return adapter.validate_json(text)
        if base is int and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", text):
            return adapter.validate_python(float(text))  # 1.5e0 is refused: not integral
        return adapter.validate_strings(text)
    except pydantic.ValidationError as e:
        raise ValueError(
            f"cannot parse {text!r} for TrainConfig.{name} of type {_spelled(hint)}: "
            f"{e.errors()[0]['msg']}"
        ) from None


def _without_none(hint: Any) -> Any:
    """X of `X | None`; other annotations as they are."""
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _spelled(hint: Any) -> str:
    """An annotation as written in the source ('bool', 'int | None', "Literal['sgd', 'adam']")."""
    return hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")


_CIFAR_RESNET = TrainConfig(
    # He et al. 2016, section 4.2: batch 128, lr 0.1 divided by 10 at 32k and 48k iterations,
    # stop at 64k, weight decay 1e-4 on every weight, momentum 0.9, 4-pixel pad + crop + flip,
    # per-pixel mean subtracted; 45k/5k train/val split for tuning (here the full 50k trains).
    model="resnet20",
    dataset="cifar10",
    global_batch_size=128,
    num_steps=64_000,
    optimizer="sgd",
    learning_rate=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    wd_mask="all",
    schedule="step",
    boundaries=(32_000, 48_000),
    decay_factor=0.1,
    augment="cifar",
    normalize="per_pixel_mean",
    log_every=100,
    eval_every=2_000,
    checkpoint_every=2_000,
)

_IMAGENET_RESNET = TrainConfig(
    model="resnet50",
    dataset="imagenet2012",
    global_batch_size=256,
    num_epochs=90,
    optimizer="sgd",
    learning_rate=0.1,
    base_batch_size=256,
    momentum=0.9,
    weight_decay=1e-4,
    wd_mask="all",
    schedule="step",
    boundary_epochs=(30, 60),
    decay_factor=0.1,
    augment="imagenet",
    normalize="per_channel",
    dtype="bfloat16",
    log_every=100,
    eval_every=5_000,
    checkpoint_every=5_000,
)

PRESETS: dict[str, TrainConfig] = {
    # Smoke run on the embedded scikit-learn digits: seconds on a laptop CPU.
    "digits_lenet": TrainConfig(
        model="lenet5",
        dataset="digits",
        global_batch_size=64,
        num_steps=600,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        normalize="scale",
        log_every=50,
        eval_every=200,
        checkpoint_every=200,
    ),
    # The degradation experiment in minutes on a CPU (digits at 16x16, 3 channels).
    "digits_resnet": dataclasses.replace(
        _CIFAR_RESNET,
        dataset="digits",
        image_size=16,
        channels=3,
        num_steps=400,
        schedule="constant",
        boundaries=(),
        augment="none",
        log_every=20,
        eval_every=100,
        checkpoint_every=100,
    ),
    "cifar_resnet": _CIFAR_RESNET,
    "cifar_plain": dataclasses.replace(_CIFAR_RESNET, model="plain20"),
    # ResNet-110: 0.01 until training error < 80% (about 400 iterations), then the same recipe.
    "cifar_resnet110": dataclasses.replace(
        _CIFAR_RESNET, model="resnet110", warmup_steps=400, warmup="constant", warmup_lr=0.01
    ),
    # He et al. 2016, section 3.4: batch 256, lr 0.1 (/10 at plateaus; epochs 30/60 as in the
    # reference implementations), 90 epochs, weight decay 1e-4, momentum 0.9, scale augmentation.
    "imagenet_resnet": _IMAGENET_RESNET,
    # Goyal et al. 2017: the large-batch recipe (linear scaling + 5 epochs of linear warm-up).
    "imagenet_resnet_large_batch": dataclasses.replace(
        _IMAGENET_RESNET,
        global_batch_size=8192,
        wd_mask="no_bn_bias",
        boundary_epochs=(30, 60, 80),
        warmup_steps=780,
        warmup="linear",
        warmup_lr=0.1,
        log_every=20,
        eval_every=1_000,
        checkpoint_every=1_000,
    ),
    # Szegedy et al. 2014, section 6: SGD with momentum 0.9, the rate decreased by 4% every 8
    # epochs (a step of 0.96 at each multiple of 8 epochs); the two auxiliary classifiers of
    # section 5 train with their losses weighted by 0.3 (dropout 0.4 and 0.7 are the model's).
    # The paper gives no rate, batch, weight decay or length: those are BVLC's solver.prototxt
    # for bvlc_googlenet (made with Szegedy's help, same schedule: 320k iterations of 32 images
    # are 8 epochs): 0.01 for 32 images, decay 2e-4 not on biases, 10M iterations = 250 epochs.
    # Not expressible here: the asynchronous updates, Polyak averaging, Caffe's doubled bias
    # rate, the paper's photometric distortions and 8%-100%-area crops (scale augmentation
    # instead).
    "imagenet_googlenet": TrainConfig(
        model="googlenet",
        model_kwargs={"aux_logits": True},
        dataset="imagenet2012",
        global_batch_size=32,
        num_epochs=250,
        optimizer="sgd",
        learning_rate=0.01,
        base_batch_size=32,
        momentum=0.9,
        weight_decay=2e-4,
        wd_mask="no_bn_bias",
        schedule="step",
        boundary_epochs=tuple(range(8, 250, 8)),
        decay_factor=0.96,
        aux_weight=0.3,
        augment="imagenet",
        normalize="per_channel",
        dtype="bfloat16",
        log_every=100,
        eval_every=40_000,
        checkpoint_every=40_000,
    ),
}


def get_preset(name: str) -> TrainConfig:
    """The named preset; ValueError listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid choices: {sorted(PRESETS)}") from None
