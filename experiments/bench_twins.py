"""The benchmark's reference twins of the CIFAR ResNet, and the runners that step them.

The same network as `cnnjax.models.create('resnet<depth>')` (option A shortcuts, 16/32/64
widths, bias-free convolutions, He fan-out initialisers), built two other ways:

- `flax_cifar_resnet`: from flax.linen layers, every convolution `nn.Conv` and every norm
  `nn.BatchNorm`; stepped by `FlaxTwinRunner` (cnnjax.train's steps, like cnnjax's own);
- `torch_cifar_resnet`: in PyTorch (BN momentum 0.1 = Flax's 0.9); stepped eagerly by
  `TorchRunner` (channels-last) and `TorchNCHWRunner` (NCHW), on the GPU when torch sees one.
  torch is never a cnnjax dependency: without it these workers are skipped.

They are not part of the library: `python -m experiments.bench` registers them with
`cnnjax.bench.register` as `flax`, `torch-cl` and `torch-nchw` (`experiments.bench.TWINS`), and
each worker process imports its runner from here by that import path.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from cnnjax import bench

_CIFAR = re.compile(r"^(resnet|plain)(\d+)$")


def cifar_depth(model: str) -> tuple[bool, int]:
    """(plain, depth) of a registered CIFAR ResNet / plain-net name; ValueError for other names."""
    # The registered CIFAR depths (imports jax, starts no backend).
    from cnnjax.models.resnet import CIFAR_PARAMS

    m = _CIFAR.match(model)
    if not m or int(m.group(2)) not in CIFAR_PARAMS:
        names = ", ".join(f"resnet{d}" for d in CIFAR_PARAMS)
        raise ValueError(
            f"model={model!r}: the flax and torch twins cover the registered CIFAR "
            f"nets ({names} and their plain<depth> twins); use impl='cnnjax' alone "
            "for other models"
        )
    return m.group(1) == "plain", int(m.group(2))


# --------------------------------------------------------------------------- the Flax nn.Conv twin


def flax_cifar_resnet(depth: int, plain: bool = False, num_classes: int = 10, dtype: Any = None):
    """The CIFAR ResNet of cnnjax.models (option A, 16/32/64 widths) built from flax.linen layers.

    Same layers, parameter count and initialisers as `cnnjax.models.create('resnet<depth>')`, but
    every convolution is `flax.linen.Conv` and every norm `flax.linen.BatchNorm`.
    """
    import flax.linen as nn

    from cnnjax.models.resnet import zero_pad_shortcut

    he = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    class Block(nn.Module):
        features: int
        strides: int

        @nn.compact
        def __call__(self, x, train: bool):
            conv = partial(
                nn.Conv,
                kernel_size=(3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=he,
                dtype=dtype,
            )
            norm = partial(
                nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
            )
            y = nn.relu(
                norm(name="bn1")(conv(self.features, strides=self.strides, name="conv1")(x))
            )
            y = norm(name="bn2")(conv(self.features, name="conv2")(y))
            if plain:
                return nn.relu(y)
            return nn.relu(zero_pad_shortcut(x, self.features, self.strides) + y)

    class FlaxCifarResNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            n = (depth - 2) // 6
            x = nn.Conv(
                16,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=he,
                dtype=dtype,
                name="stem_conv",
            )(x)
            x = nn.relu(
                nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=dtype,
                    name="stem_bn",
                )(x)
            )
            for s, width in enumerate((16, 32, 64), start=1):
                for b in range(1, n + 1):
                    x = Block(width, 2 if s > 1 and b == 1 else 1, name=f"stage{s}_block{b}")(
                        x, train
                    )
            x = x.mean(axis=(1, 2))
            return nn.Dense(num_classes, dtype=dtype, name="fc")(x).astype("float32")

    return FlaxCifarResNet()


class FlaxTwinRunner(bench.JaxRunner):
    """The Flax twin, stepped exactly as cnnjax's model is (`cnnjax.bench.JaxRunner`)."""

    cnnjax_options: ClassVar[bool] = False

    @classmethod
    def check(cls, spec: bench.Spec) -> None:
        cifar_depth(spec.model)

    def build_model(self, spec: bench.Spec, dtype: Any) -> Any:
        plain, depth = cifar_depth(spec.model)
        return flax_cifar_resnet(depth, plain, dtype=dtype)


# --------------------------------------------------------------------------- the PyTorch twin


def torch_cifar_resnet(depth: int, plain: bool = False, num_classes: int = 10):
    """The same CIFAR ResNet in PyTorch (bias-free convs, BN momentum 0.1 = Flax 0.9, option A)."""
    import torch
    from torch import nn
    from torch.nn import functional as tf

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            if plain:
                return torch.relu(y)
            sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                sc = tf.pad(sc, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(sc + y)

    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for s, width in enumerate((16, 32, 64), start=1):
        for b in range(n):
            layers.append(Block(cin, width, 2 if s > 1 and b == 0 else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class TorchRunner(bench.Runner):
    """The PyTorch twin, channels-last: zero_grad, forward, cross-entropy, backward, SGD step
    (eager), on the GPU when torch sees one (as JAX would use it), else on the CPU."""

    uses_xla: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("torch",)
    channels_last: ClassVar[bool] = True

    @classmethod
    def check(cls, spec: bench.Spec) -> None:
        cifar_depth(spec.model)

    def __init__(self, spec: bench.Spec):
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
            torch.set_num_interop_threads(1)
        torch.manual_seed(0)
        plain, depth = cifar_depth(spec.model)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = torch_cifar_resnet(depth, plain).to(self.device, memory_format=fmt)
        x = torch.randn(spec.batch_size, 3, 32, 32)
        self.x = x.to(self.device).contiguous(memory_format=fmt)
        self.y = (torch.arange(spec.batch_size) % 10).to(self.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.autocast = spec.dtype == "bfloat16"
        self.torch = torch
        t0 = time.perf_counter()
        self.step("train", 1)
        t1 = time.perf_counter()
        self.step("eval", 1)
        cuda = self.device == "cuda"
        kind = torch.cuda.get_device_name() if cuda else platform.processor()
        self.info = {
            "compile_train_s": t1 - t0,
            "compile_eval_s": time.perf_counter() - t1,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": kind,
            "platform": "gpu" if cuda else "cpu",
            "peak_tflops": bench.peak_tflops(kind, spec.dtype) if cuda else None,
        }

    def step(self, mode: str, n: int) -> None:
        torch = self.torch
        with torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
            if mode == "eval":
                self.net.eval()
                with torch.no_grad():
                    for _ in range(n):
                        self.net(self.x)
            else:
                self.net.train()
                for _ in range(n):
                    self.opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(self.net(self.x).float(), self.y)
                    loss.backward()
                    self.opt.step()
        if self.device == "cuda":  # kernels run asynchronously: wait for the last one
            torch.cuda.synchronize()

    def product(self, n: int) -> Callable[[], Any]:
        torch = self.torch
        a = torch.randn(n, n).to(self.device, torch.bfloat16 if self.autocast else torch.float32)
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        return lambda: (a @ a, sync())


class TorchNCHWRunner(TorchRunner):
    """The PyTorch twin in NCHW (PyTorch's default memory format)."""

    channels_last: ClassVar[bool] = False
