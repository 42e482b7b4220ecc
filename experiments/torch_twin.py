"""The paper's CIFAR recipe in PyTorch, timed: the speed comparison a user would make (issue 20).

    python experiments/torch_twin.py --data_dir DIR --model resnet56 --steps 2000 --json OUT.json

The same network as cnnjax's (`experiments.bench_twins.torch_cifar_resnet`: option A, bias-free
convs, BN momentum 0.1 = Flax's 0.9, He fan-out init) trained with the same recipe (SGD momentum
0.9, weight decay 1e-4 on every weight, lr 0.1, batch 128, 4-pixel pad + random crop + flip,
per-pixel mean) on the same design as cnnjax's engine: the uint8 training set resident on the
device, each batch gathered and augmented there. Each mode, eager and `torch.compile`, warms up
(compiling) and then runs --steps iterations, timed from a synchronised start to a synchronised end;
it reports ms per step, images/s and the final training loss. Without CIFAR-10 the embedded digits
at 32x32x3 stand in. torch is not a cnnjax dependency: install it to run this.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time

from cnnjax.cli import ArgumentParser

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(data_dir: str | None):
    """(uint8 train images NHWC, int labels, per-pixel mean in [0, 1]) of CIFAR-10 or the digits."""
    from cnnjax import data

    ds = (
        data.load_dataset("cifar10", data_dir=data_dir)
        if data_dir
        else data.load_dataset("digits", image_size=(32, 32), channels=3)
    )
    images, labels = ds.splits["train"].get(range(len(ds.splits["train"])))
    return images, labels, images.mean(axis=0) / 255.0


def train(
    model_name: str,
    mode: str,
    images,
    labels,
    mean,
    steps: int,
    warmup: int,
    device: str,
    batch: int = 128,
):
    import torch
    import torch.nn.functional as F

    from experiments.bench_twins import torch_cifar_resnet

    match = re.fullmatch(r"(resnet|plain)(\d+)", model_name)
    if match is None:
        raise SystemExit(f"--model {model_name!r}: a CIFAR net, resnetN or plainN (N = 6n + 2)")
    torch.manual_seed(0)
    net = torch_cifar_resnet(int(match.group(2)), plain=match.group(1) == "plain").to(device)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x_all = torch.as_tensor(images, device=device)  # uint8 [N, 32, 32, 3], resident
    y_all = torch.as_tensor(labels, device=device, dtype=torch.long)
    mean_t = torch.as_tensor(mean * 255.0, device=device, dtype=torch.float32)
    n = len(x_all)
    grid = torch.arange(32, device=device)

    per_epoch, order = n // batch, {}

    def batch_at(step):
        epoch, i = divmod(step, per_epoch)
        if epoch not in order:  # a new permutation each epoch, the last partial batch dropped
            order.clear()
            order[epoch] = torch.randperm(
                n, device=device, generator=torch.Generator(device=device).manual_seed(epoch)
            )
        g = torch.Generator(device=device).manual_seed(step)
        idx = order[epoch][i * batch : (i + 1) * batch]
        x = (x_all[idx].float() - mean_t) / 255.0
        x = F.pad(x, (0, 0, 4, 4, 4, 4))  # zeros after normalising, as cnnjax's pipeline
        oy, ox = torch.randint(0, 9, (2, batch, 1), device=device, generator=g)
        flip = torch.rand(batch, 1, device=device, generator=g) < 0.5
        rows, cols = oy + grid, ox + grid
        cols = torch.where(flip, cols.flip(1), cols)
        b = torch.arange(batch, device=device)[:, None, None]
        x = x[b, rows[:, :, None], cols[:, None, :]]  # [B, 32, 32, 3]
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last), y_all[idx]

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if mode == "compile" else step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time.perf_counter()
    for s in range(warmup):
        run(*batch_at(s))
    sync()
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        loss = run(*batch_at(s))
    sync()
    dt = time.perf_counter() - t
    return {
        "model": model_name,
        "mode": mode,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_s": warm_s,
        "ms_per_step": 1000 * dt / steps,
        "images_per_s": batch * steps / dt,
        "final_loss": float(loss.detach()),
    }


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--data_dir", "--data_dir", dest="data_dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images, labels, mean = load(args.data_dir)
    runs = [
        train(args.model, mode, images, labels, mean, args.steps, args.warmup, device)
        for mode in args.modes
    ]
    out = {
        "runs": runs,
        "provenance": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    for r in runs:
        print(
            f"{r['model']} {r['mode']:8s} {r['ms_per_step']:8.2f} ms/step "
            f"{r['images_per_s']:9.0f} img/s (warm-up {r['warmup_s']:.1f} s, "
            f"final loss {r['final_loss']:.3f})"
        )
    if args.json:
        from cnnjax.train.metrics import write_json_atomic

        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
