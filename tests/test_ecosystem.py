"""fastpeft's layers inside the PyTorch machinery people already run: autocast, activation checkpointing
(reentrant and not, with dropout), and a long training run whose memory must not grow.

Each check runs on the reference backend (the CPU path) and on the triton kernels under the
interpreter; the ``gpu``-marked versions repeat them on CUDA where a GPU is lent.
"""
import gc
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastpeft

BACKENDS = ["reference", "triton"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lora(kind: str, in_f=48, out_f=40, device="cpu", dropout=0.0, seed=0):
    """A layer of ``kind`` with non-zero adapter weights (B starts at zero otherwise)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, device=device)
    if kind == "sparse":
        layer = fastpeft.SparseDeltaLinear.from_linear(base, density=0.1)
        with torch.no_grad():
            layer.delta_values.normal_(0, 0.05)
        return layer
    layer = fastpeft.FastLoRALinear.from_linear(base, r=8, lora_alpha=16, lora_dropout=dropout,
                                                sparse_density=0.05 if kind == "rosa" else 0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        for v in layer.sparse_values.values():
            v.normal_(0, 0.05)
    if kind == "multi":
        layer.add_adapter("other", r=4, lora_alpha=4, lora_dropout=dropout)
        with torch.no_grad():
            layer.lora_B_adapters["other"].normal_(0, 0.05)
    return layer


def _call(layer, kind, x):
    if kind == "multi":
        ids = torch.arange(x.shape[0], device=x.device) % 3 - 1  # base, default, other, ...
        return layer(x, ids)
    return layer(x)


def _merged_weight(layer, kind) -> torch.Tensor:
    """The dense W' with y = x W'^T + b for the ``kind`` layer (first row's adapter for "multi")."""
    if kind == "sparse":
        return layer.weight + layer.dense_delta()
    w = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    if kind == "rosa":
        idx, values = layer.adapter_sparse_delta()
        w = w + fastpeft.dense_delta_ref(idx, values, *layer.weight.shape, 1)
    return w


# ------------------------------------------------------------------------------------------ autocast


def _autocast_case(kind, backend, device, dtype):
    layer = _lora(kind, device=device)
    x = torch.randn(7, 48, device=device, requires_grad=True)
    ids_rows = None
    if kind == "multi":  # compare on the rows that use the active ("default") adapter
        ids_rows = torch.arange(7, device=device) % 3 == 1
    with fastpeft.use_backend(backend), torch.autocast(device, dtype=dtype):
        y = _call(layer, kind, x)
        lin = nn.Linear(48, 40, device=device)
        with torch.no_grad():
            lin.weight.copy_(_merged_weight(layer, kind).detach())
            lin.bias.copy_(layer.bias)
        y_lin = lin(x)
    exact = F.linear(x.double(), _merged_weight(layer, kind).detach().double(), layer.bias.double())
    if ids_rows is not None:
        y, y_lin, exact = y[ids_rows], y_lin[ids_rows], exact[ids_rows]
    return layer, x, y, y_lin, exact


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lora", "multi", "rosa", "sparse"])
def test_autocast_cpu_bf16_like_linear(kind, backend):
    """Under CPU bf16 autocast the output is bf16 like nn.Linear's, its error against fp64 at most twice
    nn.Linear's (on the same merged weight), and fp32 parameters get fp32 gradients."""
    layer, x, y, y_lin, exact = _autocast_case(kind, backend, "cpu", torch.bfloat16)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    err = (y.double() - exact).abs().max().item()
    lin_err = (y_lin.double() - exact).abs().max().item()
    assert err <= 2 * lin_err + 1e-3, (err, lin_err)
    y.float().square().sum().backward()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["lora", "multi", "rosa", "sparse"])
def test_autocast_cuda_like_linear(kind, dtype):
    layer, x, y, y_lin, exact = _autocast_case(kind, "triton", "cuda", dtype)
    assert y.dtype == y_lin.dtype == dtype
    err = (y.double() - exact).abs().max().item()
    lin_err = (y_lin.double() - exact).abs().max().item()
    assert err <= 2 * lin_err + 1e-3, (err, lin_err)


# ---------------------------------------------------------------------------- activation checkpointing


class _Block(nn.Module):
    """Two dropout-LoRA layers with a nonlinearity between: what a transformer MLP looks like."""

    def __init__(self, kind, device):
        super().__init__()
        self.up = _lora(kind, 48, 64, device, dropout=0.3, seed=1)
        self.down = _lora(kind, 64, 48, device, dropout=0.3, seed=2)
        self.kind = kind

    def forward(self, x):
        return _call(self.down, self.kind, F.gelu(_call(self.up, self.kind, x)))


def _grads(kind, backend, device, mode):
    block = _Block(kind, device).train()
    torch.manual_seed(123)  # the dropout seeds are drawn from this generator
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    with fastpeft.use_backend(backend):
        if mode == "plain":
            h = block(x)
        else:
            h = checkpoint(block, x, use_reentrant=(mode == "reentrant"))
        loss = h.square().mean()
        loss.backward()
    named = {n: p.grad for n, p in block.named_parameters() if p.requires_grad}
    return loss.detach(), x.grad, named


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lora", "multi", "rosa"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpoint_with_dropout_gives_identical_grads(mode, kind, backend):
    """The recomputed forward redraws the same dropout seed (checkpoint restores the CPU generator it
    comes from), hence the same mask: loss and every gradient equal the un-checkpointed run bit for bit."""
    loss, gx, grads = _grads(kind, backend, DEV, "plain")
    loss_c, gx_c, grads_c = _grads(kind, backend, DEV, mode)
    assert torch.equal(loss, loss_c)
    assert torch.equal(gx, gx_c)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        assert grads[name] is not None and torch.equal(grads[name], grads_c[name]), name


def test_checkpoint_mask_is_really_random():
    """Guard against the equality above holding trivially: another seed gives other gradients."""
    _, _, g1 = _grads("lora", "reference", "cpu", "plain")
    block = _Block("lora", "cpu").train()
    torch.manual_seed(124)
    x = torch.randn(2, 5, 48, requires_grad=True)
    torch.manual_seed(999)
    block(x).square().mean().backward()
    assert not torch.equal(g1["up.lora_A_adapters.default"], block.up.lora_A.grad)


# ------------------------------------------------------------------------------------------ long run


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets torch's deprecated aliases
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set from /proc")
def test_500_steps_memory_does_not_grow():
    """500 AdamW steps of an injected model (LoRA with dropout and a sparse delta) on a fixed seed: after
    warm-up (100 steps), neither the number of live tensors nor the resident set grows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 8))
    fastpeft.inject(model, fastpeft.LoraConfig(r=8, lora_dropout=0.1, target_modules=["0", "2", "4"],
                                               sparse_density=0.05))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, target = torch.randn(32, 64), torch.randn(32, 8)

    from torch._subclasses.fake_tensor import FakeTensor

    def live_tensors():
        # Fake tensors are not memory: tracing in earlier tests (torch.compile) leaves some in torch's global
        # state, freed whenever torch gets to it, which would read as a change here.
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor))

    samples = {}
    for step in range(500):
        y = model(x)
        loss = F.mse_loss(y, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in (99, 499):
            samples[step] = (live_tensors(), _rss_bytes())
    (t100, rss100), (t500, rss500) = samples[99], samples[499]
    assert t500 == t100, f"live tensors grew from {t100} to {t500} between steps 100 and 500"
    assert rss500 - rss100 < 16 * 2**20, f"resident set grew by {(rss500 - rss100) / 2**20:.1f} MiB"
    assert loss.item() < F.mse_loss(torch.zeros_like(target), target).item()
