"""What the weight-conversion tests share: torch with torchvision and timm, and logit comparisons.

Importing this module skips the importing test module when torch is not installed (the extra
`cnnjax[torch]`). On these machines pip's torchvision is a CUDA build beside a CPU torch: its
compiled ops cannot load, and two of its fake-kernel registrations then fail with "operator
torchvision::nms does not exist". The models need none of those ops; defining the two schemas
before torchvision is imported lets its (and timm's) models import. The shim lives here, in the
tests, never in the library.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="needs the extra cnnjax[torch] (torch, torchvision, timm)"
)


def _define_torchvision_schemas() -> None:
    import sys

    if "torchvision" in sys.modules:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
        except RuntimeError:
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_torchvision_schemas.lib = lib  # the registrations live as long as the library object


_define_torchvision_schemas()
torchvision = pytest.importorskip("torchvision", reason="needs the extra cnnjax[torch]")
timm = pytest.importorskip("timm", reason="needs the extra cnnjax[torch]")
torch.set_num_threads(1)  # one per pytest-xdist worker, as many workers as cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnnjax import models, weights  # noqa: E402


def randomize(model: torch.nn.Module, seed: int = 0, passes: int = 3, size: int = 64) -> None:
    """Makes a freshly built model's BatchNorm layers non-trivial: random affine parameters, and
    running statistics that are the true averages over `passes` training-mode forward passes on
    random images (momentum None for those passes: with 0.1, most of the statistics would stay
    near their initial 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        model.train()
        for _ in range(passes):
            model(torch.randn(4, 3, size, size, generator=g))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def inputs(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def convert(name: str, model: torch.nn.Module) -> dict:
    return weights.load_torch_state_dict(name, model.state_dict())


def cnnjax_apply(name: str, variables: dict, x: torch.Tensor, **kwargs):
    """cnnjax's evaluation-mode output for the NCHW batch `x` (NHWC inside)."""
    module = models.create(name, **kwargs)
    nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    return jax.jit(lambda v, a: module.apply(v, a, train=False))(variables, nhwc)


def assert_close(got, want, rtol: float = 1e-4, what: str = "logits") -> None:
    """`got` equals `want` to `rtol` relative to the largest magnitude of `want`."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert scale > 1e-3, f"{what}: reference too small to compare ({scale})"
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} x {scale:.3g}"


def assert_input_matters(logits, fraction: float = 0.01) -> None:
    """The logits of different images differ by more than rounding: otherwise a logit check would
    not see a wrongly converted early layer."""
    logits = np.asarray(logits)
    spread = float(np.std(logits, axis=0).max())
    assert spread > fraction * float(np.abs(logits).max()), "logits hardly depend on the input"


def check_logits(
    name: str,
    model: torch.nn.Module,
    size: int,
    batch: int = 2,
    rtol: float = 1e-4,
    features=(),
    **model_kwargs,
) -> dict:
    """Converts `model` (randomised first) and asserts that cnnjax's evaluation logits, and the
    outputs of `features` ((torch module name, cnnjax module path) pairs), equal torch's.
    Returns the variables.

    The reference is torch's model in float64. Deep nets amplify float32 rounding, so cnnjax (in
    float32) must come within `rtol`, or within 3x the distance of torch's own float32 result
    where rounding alone makes more (ResNet-152: about 4e-4); a conversion error is of order 1.
    """
    if batch < 2:
        raise ValueError("check_logits needs batch >= 2 to see that the logits depend on the input")
    randomize(model, size=size)
    x = inputs(size, batch)
    torch_names = [t for t, _ in features]
    want32, maps32 = torch_outputs(model, x, torch_names)
    want, maps = torch_outputs(model.double(), x.double(), torch_names)
    model.float()
    assert_input_matters(want)
    variables = convert(name, model)
    got, got_maps = cnnjax_outputs(name, variables, x, [p for _, p in features], **model_kwargs)
    for what, a, ref, ref32 in [
        ("logits", got, want, want32),
        *[(f"{t} / {'/'.join(p)}", got_maps[p], maps[t], maps32[t]) for t, p in features],
    ]:
        if np.shape(a) != ref.shape and np.size(a) == ref.size:  # a flatten of an NHWC map
            ref, ref32 = ref.reshape(np.shape(a)), ref32.reshape(np.shape(a))
        scale = float(np.max(np.abs(ref)))
        rounding = float(np.max(np.abs(ref32 - ref))) / scale
        assert_close(a, ref, max(rtol, 3 * rounding), what)
    return variables


def torch_outputs(model: torch.nn.Module, x: torch.Tensor, names=()):
    """torch's output on `x` and those of its submodules `names` (NHWC), in one pass."""
    maps = {}
    # Clones: an in-place ReLU after a module would overwrite its output.
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: maps.setdefault(n, o.clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y.numpy(), {n: m.permute(0, 2, 3, 1).numpy() for n, m in maps.items()}


def cnnjax_outputs(name: str, variables: dict, x: torch.Tensor, paths=(), **model_kwargs):
    """cnnjax's evaluation output on the NCHW batch `x`, and those of its submodules `paths`
    (tuples of module names, NHWC; a pair of outputs, such as a dual path block's, is
    concatenated on channels as timm carries it), from one compiled call."""
    module = models.create(name, **model_kwargs)
    paths = [tuple(p) for p in paths]

    def wanted(mdl, method_name):
        return method_name == "__call__" and mdl.path in paths

    @jax.jit
    def run(v, a):
        y, state = module.apply(
            v, a, train=False, capture_intermediates=wanted, mutable=["intermediates"]
        )
        return y, state.get("intermediates", {})

    y, found = run(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    out = {}
    for path in paths:
        node = found
        for p in path:
            node = node[p]
        value = node["__call__"][0]
        out[path] = jnp.concatenate(value, -1) if isinstance(value, (tuple, list)) else value
    return y, out
