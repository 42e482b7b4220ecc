"""`python -m cnnjax <command>` (also the `cnnjax` console script): a thin layer over the library.

Each command is a pair of functions, one adding its arguments to an argparse parser and one
running it, listed in COMMANDS. To add a command, write the two functions (importing what only
running needs inside `run`) and add a line to COMMANDS.

    python -m cnnjax train --preset cifar_resnet --model resnet56 --workdir runs/resnet56
    python -m cnnjax eval --workdir runs/resnet56

Exit status: 0 done; 1 the training diverged; 2 a bad argument, config, data set or workdir
(one line on stderr says which and how to fix it); EXIT_PREEMPTED (143) `cnnjax train` stopped
by SIGTERM after saving a checkpoint (re-run the same command to resume: schedulers may
requeue on it); 141 the output pipe closed (`cnnjax models | head -1`), quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def canonical_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with every long option spelled with underscores (`--data_dir` -> `--data_dir`), up
    to a `--`: each flag has one spelling in the help, and the other is accepted everywhere."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out[i] = "--" + name[2:].replace("-", "_") + eq + value
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser reading flags through `canonical_flags`: cnnjax's commands and
    experiment scripts define `--data_dir` and also take `--data_dir`."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(canonical_flags(args), namespace)


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- train -----------------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    import typing

    from cnnjax.train.config import PRESETS, TrainConfig, field_help, field_names, field_types

    p.add_argument("--workdir", required=True, help="run directory; re-running with it resumes")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from a named config (fields below override it)",
    )
    p.add_argument(
        "--config",
        metavar="JSON",
        help="start from a config.json (e.g. another run's); for a workdir whose "
        "config.json is missing, the run's own config restores it",
    )
    p.add_argument(
        "--allow_change",
        nargs="+",
        default=(),
        metavar="FIELD",
        help="on resume, let these fields differ from the run's config.json (the "
        "learning rate and its schedule; recorded in config_history.jsonl)",
    )
    p.add_argument(
        "--print_config", action="store_true", help="print the resulting config and exit"
    )
    dist = p.add_argument_group(
        "multi-process (default: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
        "$JAX_PROCESS_ID, or SLURM / Open MPI / Cloud TPU auto-detection)"
    )
    dist.add_argument("--coordinator_address", help="host:port of process 0")
    dist.add_argument("--num_processes", type=int)
    dist.add_argument("--process_id", type=int)
    fields = p.add_argument_group("config fields (override the preset)")
    helps, types, defaults = field_help(), field_types(), TrainConfig()
    for name in field_names():
        kwargs = dict(
            dest=f"field_{name}",
            metavar=name.upper(),
            default=None,
            help=f"{helps[name]} [default {getattr(defaults, name)!r}]".replace("%", "%%"),
        )
        if typing.get_origin(types[name]) is typing.Literal:
            kwargs.update(choices=typing.get_args(types[name]), metavar=None)
        if types[name] is bool:
            kwargs.update(nargs="?", const="true")
        fields.add_argument(f"--{name}", **kwargs)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of --config / --preset / the per-field flags, in that order of precedence."""
    from cnnjax.train.config import TrainConfig, field_names, get_preset, parse_field

    if args.config and args.preset:
        raise ValueError("give --config or --preset, not both")
    if args.config:
        try:
            config = TrainConfig.from_json_file(args.config)
        except ValueError as e:
            raise ValueError(f"--config: {e}") from None
    else:
        config = get_preset(args.preset) if args.preset else TrainConfig()
    changes = {
        name: parse_field(name, getattr(args, f"field_{name}"))
        for name in field_names()
        if getattr(args, f"field_{name}") is not None
    }
    return config.override(**changes)  # a run length given replaces the preset's


def run_train(args: argparse.Namespace) -> int:
    from cnnjax.train import parallel

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from cnnjax import train

    config = config_from_args(args).validate()
    if args.print_config:
        print(config.to_json())
        return 0
    from cnnjax.train.loop import check_workdir

    check_workdir(args.workdir, "--workdir")  # before any data is loaded
    try:
        result = train.train_and_evaluate(
            config, args.workdir, allow_changes=args.allow_change, restore_config=bool(args.config)
        )
    except train.NonFiniteLossError as e:
        print(f"cnnjax train: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(
            f"cnnjax train: stopped by SIGTERM at step {result.step}; checkpoint saved. "
            f"Re-run with --workdir {args.workdir} to resume.",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if len(result.members) > 1:
        print(json.dumps({"step": result.step, "members": result.members}))
    else:
        print(json.dumps({"step": result.step, **result.metrics}))
    return 0


# -- eval ------------------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--workdir", help="a training run's directory")
    what.add_argument(
        "--weights",
        metavar="FILE",
        help="weights to evaluate instead: a torchvision/timm state_dict "
        "(.safetensors, .pth) or cnnjax variables (.npz, orbax directory); "
        "needs --model and --dataset",
    )
    p.add_argument("--step", type=int, help="checkpoint to evaluate (default: the newest)")
    p.add_argument("--split", choices=("test", "validation"), help="default: the run's eval_split")
    w = p.add_argument_group("with --weights (the same fields as `cnnjax train`)")
    w.add_argument("--model", help="registered model name")
    w.add_argument("--dataset", help="data set name (see cnnjax.data.list_datasets())")
    w.add_argument("--data_dir", help="where the data set lies (offline)")
    w.add_argument("--image_size", type=int, help="resize images to this side")
    w.add_argument(
        "--normalize",
        help="default: what the weights' source expects (cnnjax.weights.normalization)",
    )
    w.add_argument("--global_batch_size", type=int, default=100, help="evaluation batch")


def run_eval(args: argparse.Namespace) -> int:
    from cnnjax import train

    if args.workdir is not None:
        bad = [
            f"--{k}"
            for k in ("model", "dataset", "data_dir", "image_size", "normalize")
            if getattr(args, k) is not None
        ]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} go with --weights; --workdir evaluates the run "
                "with its own config"
            )
        result = train.evaluate_checkpoint(args.workdir, step=args.step, split=args.split)
    else:
        if args.model is None or args.dataset is None:
            raise ValueError("--weights needs --model NAME and --dataset NAME")
        if args.step is not None:
            raise ValueError("--step goes with --workdir (a run's checkpoints)")
        from cnnjax import data, weights
        from cnnjax.train.config import TrainConfig

        normalize = args.normalize
        if normalize is None:
            normalize = (
                weights.normalization(args.model)
                if args.model in weights.SOURCES
                else "per_channel"
            )
        # ImageNet is evaluated as the weights' sources evaluate it: the centre crop of the image
        # resized to 256/224 of the crop (the evaluation half of the 'imagenet' augmentation).
        augment = "imagenet" if args.dataset == "imagenet2012" else "none"
        config = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            data_dir=args.data_dir,
            image_size=args.image_size,
            normalize=normalize,
            augment=augment,
            global_batch_size=args.global_batch_size,
            num_steps=1,
        ).validate()
        ds = data.load_dataset(config.dataset, data_dir=config.data_dir)
        try:
            variables = weights.load(args.model, args.weights, num_classes=ds.num_classes)
        except (OSError, ImportError) as e:
            raise ValueError(f"--weights: {e}") from None
        result = train.evaluate_weights(config, variables, split=args.split)
    print(json.dumps(result))
    return 0


# -- convert ---------------------------------------------------------------------------------------


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SRC",
        help="a torchvision/timm state_dict: .safetensors (no "
        "torch needed) or .pth/.pt/.bin (needs torch: pip install 'cnnjax[torch]')",
    )
    p.add_argument(
        "dest",
        metavar="DEST",
        help="cnnjax variables out: DEST.npz, or an orbax "
        "checkpoint directory for any other name; never overwritten",
    )
    p.add_argument("--model", required=True, help="cnnjax model name (cnnjax.weights.SOURCES)")
    p.add_argument(
        "--num_classes", type=int, help="classifier width (default: the state_dict's own)"
    )


def run_convert(args: argparse.Namespace) -> int:
    from cnnjax import weights

    try:
        if os.path.exists(args.dest):
            raise FileExistsError(f"DEST {args.dest!r} exists; remove it or choose another name")
        variables = weights.load(args.model, args.source, num_classes=args.num_classes)
        weights.save(variables, args.dest)
    except (OSError, ImportError) as e:
        raise ValueError(str(e)) from None
    import jax

    count = sum(a.size for a in jax.tree.leaves(variables["params"]))
    print(
        json.dumps(
            {
                "model": args.model,
                "source": weights.SOURCES.get(args.model),
                "dest": args.dest,
                "params": count,
            }
        )
    )
    return 0


# -- summary / models -----------------------------------------------------------------------------


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name (see `cnnjax models`)")
    p.add_argument(
        "--input_shape",
        type=int,
        nargs=3,
        metavar=("H", "W", "C"),
        help="one image's shape (default: the model's registered input shape)",
    )
    p.add_argument("--num_classes", type=int, help="classifier width (default: the registered one)")
    p.add_argument("--train", action="store_true", help="trace in training mode (auxiliary heads)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run_summary(args: argparse.Namespace) -> int:
    from cnnjax import analysis, models

    spec = models.get_spec(args.model)
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    shape = tuple(args.input_shape) if args.input_shape else spec.input_shape
    result = analysis.summary(models.create(spec.name, **overrides), shape, train=args.train)
    print(result.to_json() if args.json else analysis.format_summary(result))
    return 0


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument(
        "--long",
        action="store_true",
        help="also input shape, classes, reference parameters, source",
    )


def run_models(args: argparse.Namespace) -> int:
    from cnnjax import models

    for name in models.list_models(args.pattern):
        if args.long:
            s = models.get_spec(name)
            ref = f"{s.reference_params:,}" if s.reference_params else "-"
            print(
                f"{name:28s} {'x'.join(map(str, s.input_shape)):>11s} "
                f"{s.num_classes:>5d} {ref:>13s}  {s.source}"
            )
        else:
            print(name)
    return 0


# -- degradation -----------------------------------------------------------------------------------


def add_degradation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        help="the experiment's arguments (cnnjax degradation --help lists them; e.g. --preset cpu)",
    )


def run_degradation(args: argparse.Namespace) -> int:
    from cnnjax import degradation

    return degradation.main(args.args)


# -- bench -----------------------------------------------------------------------------------------


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from cnnjax import bench

    bench.add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    from cnnjax import bench

    return bench.run_from_args(args)


COMMANDS: dict[str, Command] = {
    "summary": Command(
        "the lecture-style layer table of a model (no compile)", add_summary_arguments, run_summary
    ),
    "models": Command("list the registered models", add_models_arguments, run_models),
    "degradation": Command(
        "plain vs residual degradation experiment (cnnjax.degradation)",
        add_degradation_arguments,
        run_degradation,
    ),
    "train": Command(
        "train a model (resumes when the workdir holds a run)", add_train_arguments, run_train
    ),
    "eval": Command("evaluate a run's checkpoint, or given weights", add_eval_arguments, run_eval),
    "convert": Command(
        "torchvision/timm weights into cnnjax variables (cnnjax.weights)",
        add_convert_arguments,
        run_convert,
    ),
    "bench": Command(
        "train/eval step speed of the CPU and XLA options side by side (cnnjax.bench)",
        add_bench_arguments,
        run_bench,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, the arguments of that command alone (adding the others'
    imports JAX and the trainer, seconds that `cnnjax --help` need not wait for)."""
    parser = ArgumentParser(prog="cnnjax", description="Convolutional networks in JAX/Flax.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log the libraries' INFO messages too"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        # `degradation` hands everything, --help included, to the experiment's own parser.
        p = sub.add_parser(
            name, help=command.help, description=command.help, add_help=name != "degradation"
        )
        if only is None or name == only:
            command.add_arguments(p)
        p.set_defaults(_run=command.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. Bad arguments exit with status 2 and a message."""
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    argv = list(sys.argv[1:] if argv is None else argv)
    named = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=named if named in COMMANDS else "")
    args, extra = parser.parse_known_args(argv)
    if args.command == "degradation":
        # Everything after the command word goes, in order, to the experiment's own parser
        # (--help too: it is the experiment's).
        args.args = argv[argv.index("degradation") + 1 :]
    elif extra:  # the command's usage, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    ours = logging.getLogger("cnnjax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for old in [h for h in ours.handlers if getattr(h, "_cnnjax_cli", False)]:
        ours.removeHandler(old)  # one handler, however often main runs in a process
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._cnnjax_cli = True
    ours.addHandler(handler)
    try:
        status = args._run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return status
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nothing for Python to print
        # when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ValueError as e:
        if args.verbose:
            raise
        message = re.sub(r"\s*\n\s*", " ", str(e).strip())  # one line
        parser.exit(2, f"cnnjax {args.command}: error: {message}\n")
