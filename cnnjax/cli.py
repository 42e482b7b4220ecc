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


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- train -----------------------------------------------------------------------------------------

def _field_help() -> dict[str, str]:
    """Each TrainConfig field's description, from the 'Args:' section of its docstring."""
    from cnnjax.train.config import TrainConfig

    helps: dict[str, str] = {}
    name = None
    for line in (TrainConfig.__doc__ or "").split("Args:", 1)[-1].splitlines():
        m = re.match(r"^ {6}(\w+): (.*)$", line)
        if m:
            name, helps[m.group(1)] = m.group(1), m.group(2)
        elif name and line.startswith(" " * 8):
            helps[name] += " " + line.strip()
    return helps


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from cnnjax.train.config import PRESETS, TrainConfig, field_names, field_types

    p.add_argument("--workdir", required=True, help="run directory; re-running with it resumes")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named config (fields below override it)")
    p.add_argument("--config", metavar="JSON",
                   help="start from a config.json (e.g. another run's); for a workdir whose "
                        "config.json is missing, the run's own config restores it")
    p.add_argument("--allow_change", nargs="+", default=(), metavar="FIELD",
                   help="on resume, let these fields differ from the run's config.json (the "
                        "learning rate and its schedule; recorded in config_history.jsonl)")
    p.add_argument("--print_config", action="store_true", help="print the resulting config and exit")
    dist = p.add_argument_group("multi-process (default: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
                                "$JAX_PROCESS_ID, or SLURM / Open MPI / Cloud TPU auto-detection)")
    dist.add_argument("--coordinator_address", help="host:port of process 0")
    dist.add_argument("--num_processes", type=int)
    dist.add_argument("--process_id", type=int)
    fields = p.add_argument_group("config fields (override the preset)")
    helps, types, defaults = _field_help(), field_types(), TrainConfig()
    for name in field_names():
        kwargs = dict(dest=f"field_{name}", metavar=name.upper(), default=None,
                      help=f"{helps.get(name, '')} [default {getattr(defaults, name)!r}]".replace("%", "%%"))
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
    changes = {name: parse_field(name, getattr(args, f"field_{name}")) for name in field_names()
               if getattr(args, f"field_{name}") is not None}
    # A run length given on the command line replaces the preset's (they are exclusive).
    if "num_steps" in changes and "num_epochs" not in changes:
        changes["num_epochs"] = None
    if "num_epochs" in changes and "num_steps" not in changes:
        changes["num_steps"] = None
    if "boundary_epochs" in changes and "boundaries" not in changes:
        changes["boundaries"] = ()
    if "boundaries" in changes and "boundary_epochs" not in changes:
        changes["boundary_epochs"] = ()
    return config.replace(**changes)


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
        result = train.train_and_evaluate(config, args.workdir, allow_changes=args.allow_change,
                                          restore_config=bool(args.config))
    except train.NonFiniteLossError as e:
        print(f"cnnjax train: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"cnnjax train: stopped by SIGTERM at step {result.step}; checkpoint saved. "
              f"Re-run with --workdir {args.workdir} to resume.", file=sys.stderr)
        return EXIT_PREEMPTED
    if len(result.members) > 1:
        print(json.dumps({"step": result.step, "members": result.members}))
    else:
        print(json.dumps({"step": result.step, **result.metrics}))
    return 0


# -- eval ------------------------------------------------------------------------------------------

def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="a training run's directory")
    p.add_argument("--step", type=int, help="checkpoint to evaluate (default: the newest)")
    p.add_argument("--split", choices=("test", "validation"), help="default: the run's eval_split")


def run_eval(args: argparse.Namespace) -> int:
    from cnnjax import train

    print(json.dumps(train.evaluate_checkpoint(args.workdir, step=args.step, split=args.split)))
    return 0


# -- summary / models -----------------------------------------------------------------------------

def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name (see `cnnjax models`)")
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("H", "W", "C"),
                   help="one image's shape (default: the model's registered input shape)")
    p.add_argument("--num-classes", type=int, help="classifier width (default: the registered one)")
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
    p.add_argument("--long", action="store_true", help="also input shape, classes, reference parameters, source")


def run_models(args: argparse.Namespace) -> int:
    from cnnjax import models

    for name in models.list_models(args.pattern):
        if args.long:
            s = models.get_spec(name)
            ref = f"{s.reference_params:,}" if s.reference_params else "-"
            print(f"{name:28s} {'x'.join(map(str, s.input_shape)):>11s} {s.num_classes:>5d} {ref:>13s}  {s.source}")
        else:
            print(name)
    return 0


# -- degradation ------------------------------------------------------------------------------------

def add_degradation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", help="arguments of `python -m experiments.degradation` (e.g. --preset cpu)")


def run_degradation(args: argparse.Namespace) -> int:
    try:
        from experiments import degradation
    except ImportError:
        raise ValueError("the experiments package is not importable: install cnnjax from its source tree "
                         "(pip install -e .) or run from the repository root") from None
    return degradation.main(args.args)


# -- bench -----------------------------------------------------------------------------------------

def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from cnnjax import bench

    bench.add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    from cnnjax import bench

    return bench.run_from_args(args)


COMMANDS: dict[str, Command] = {
    "summary": Command("the lecture-style layer table of a model (no compile)", add_summary_arguments, run_summary),
    "models": Command("list the registered models", add_models_arguments, run_models),
    "degradation": Command("plain vs residual degradation experiment (see experiments/degradation.py)",
                           add_degradation_arguments, run_degradation),
    "train": Command("train a model (resumes when the workdir holds a run)", add_train_arguments, run_train),
    "eval": Command("evaluate a run's checkpoint", add_eval_arguments, run_eval),
    "bench": Command("step speed next to Flax nn.Conv and PyTorch (cnnjax.bench)", add_bench_arguments, run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnjax", description="Convolutional networks in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the libraries' INFO messages too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. Bad arguments exit with status 2 and a message."""
    from cnnjax import xla_flags

    xla_flags.configure_cpu()  # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if args.command == "degradation":
        # Everything after the command word goes, in order, to the experiment's own parser.
        args.args = argv[argv.index("degradation") + 1:]
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
