"""fp16's range in the GEMM epilogues that fold the LoRA scale into a factor before the tensor-core product.

``scale * (u @ B^T)`` was computed as ``(scale * u rounded to fp16) @ B^T``: with scale > 1 (s = alpha / r above
1, or 1 / (1 - p) with dropout) that is inf from |u| > 65504 / scale, where PyTorch's own fp16 composition holds
u and stays finite. The scale now goes onto the R x N factor there (``kernels._common.scale_onto_lv``; in the
many-adapter TMA kernel, per adapter, in registers). Each kernel is checked at |u| ~ 1e4 and scale 4-8 (scale * u
well past 65504, every true value finite): finite, and its error against fp64 at most 2x that of PyTorch's fp16.
Runs under TRITON_INTERPRET=1 on CPU tensors and on CUDA.
"""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import triton_backend_device  # noqa: E402
from fastpeft.reference import dropout_threshold, kernel_stream_on_cpu  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import _common as C  # noqa: E402
from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import lora_tma as T  # noqa: E402
from fastpeft.kernels import sparse_delta as SD  # noqa: E402
from fastpeft.ops.sparse import build_sparse_plan  # noqa: E402

M, KD, N, R = 33, 48, 80, 8
TMA = T.tma_supported(DEV)


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().max())


def _operands(seed=0):
    """a (M, K) O(1), W^T (K, N), u (M, R) fp32 at |u| ~ 1e4 (below 6e4), B^T (R, N) at ~1e-2 (a factor early in
    training), bias (N,): fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, KD, generator=g, dtype=torch.float64)
    b = torch.randn(KD, N, generator=g, dtype=torch.float64) / KD ** 0.5
    lu = (torch.randn(M, R, generator=g, dtype=torch.float64) * 1e4).clamp(-6e4, 6e4)
    lv = torch.randn(R, N, generator=g, dtype=torch.float64) * 1e-2
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    return a, b, lu, lv, bias


def _check(got: torch.Tensor, exact: torch.Tensor, torch_fp16: torch.Tensor, what: str):
    """got finite, and within 2x PyTorch's own fp16 error against fp64 (plus fp16's rounding of the output)."""
    got, exact, ref = got.double().cpu(), exact.double().cpu(), torch_fp16.double().cpu()
    assert torch.isfinite(ref).all(), f"{what}: the case must be finite in PyTorch's fp16"
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite outputs"
    assert _amax(got - exact) <= 2 * _amax(ref - exact) + 2 ** -10 * _amax(exact), what


def test_scale_onto_lv_rule():
    """fp16 with |scale| > 1: scale = m 2^e (frexp), 2^e onto lv (exact), m onto lu; anything else as given."""
    lv = torch.randn(R, N, dtype=torch.float16)
    for scale, m, e in ((4.0, 0.5, 3), (-8.0, -0.5, 4), (2.5, 0.625, 2), (1.5, 0.75, 1)):
        moved, s = C.scale_onto_lv(lv, scale)
        assert s == m and torch.equal(moved, (lv.double() * 2 ** e).half()), scale
    for dtype, scale in ((torch.float16, 0.5), (torch.float16, 1.0), (torch.float16, -1.0), (torch.bfloat16, 4.0),
                         (torch.float32, -4.0)):
        t = lv.to(dtype)
        kept, s = C.scale_onto_lv(t, scale)
        assert kept is t and s == scale, (dtype, scale)


GEMMS = ["fused"] + (["tma"] if TMA else [])


@pytest.mark.parametrize("dt", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kernel", GEMMS)
def test_the_split_adds_no_rounding(kernel, dt):
    """Where s u is in range, the split gives the bits of the unsplit fold (lu = s u in fp32, scale 1), in every
    dtype and for scales that are not powers of two: the power of two and the rounding commute."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    a, b, lu, lv, bias = _operands(5)
    lu = lu / 1e3                                                         # |s u| well inside fp16's range
    run = K.lora_gemm if kernel == "fused" else T.lora_gemm_tma
    args = dict(a=a.to(DEV, dtype), b=b.to(DEV, dtype), lv=lv.to(DEV, dtype), bias=bias.to(DEV, dtype))
    for scale in (2.5, -3.0, 8.0, 0.75):
        got = run(lu=lu.float().to(DEV), scale=scale, **args)
        want = run(lu=(lu.float() * scale).to(DEV), scale=1.0, **args)  # the fold as the kernel did it
        assert torch.equal(got, want), (kernel, dt, scale)


@pytest.mark.parametrize("scale", [8.0, -8.0, 2.5])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("kernel", ["fused", "tma"])
def test_lora_gemm_epilogue(kernel, masked, scale):
    if kernel == "tma" and not TMA:
        pytest.skip("needs sm_90+ and tensor descriptors")
    a, b, lu, lv, bias = _operands()
    seed = 7
    thr = dropout_threshold(0.5) if masked else 0
    keep = K.lora_gemm(a=torch.zeros(M, KD, dtype=torch.float16, device=DEV), b=b.half().to(DEV),
                       lu=torch.ones(M, R, device=DEV), lv=torch.ones(R, N, dtype=torch.float16, device=DEV),
                       scale=1.0, seed=seed, threshold=thr).double().cpu() != 0 if masked else 1.0
    exact = a @ b + scale * keep * (lu @ lv) + bias
    torch_fp16 = (a.half() @ b.half() + scale * keep * (lu.half() @ lv.half()) + bias.half()).double()
    args = dict(a=a.half().to(DEV), b=b.half().to(DEV), lu=lu.float().to(DEV), lv=lv.half().to(DEV),
                bias=bias.half().to(DEV), scale=scale, seed=seed, threshold=thr)
    got = K.lora_gemm(**args) if kernel == "fused" else T.lora_gemm_tma(**args)
    _check(got, exact, torch_fp16, f"{kernel} {'masked' if masked else 'plain'} scale {scale}")


@pytest.mark.skipif(not TMA, reason="needs sm_90+ and tensor descriptors")
def test_tma_forward_with_the_fused_shrink():
    """u formed in the kernel (x at ~1e3, |u| ~ 1e4), then folded with s = 8."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, KD, generator=g, dtype=torch.float64) * 1e3
    w = torch.randn(N, KD, generator=g, dtype=torch.float64) / KD ** 0.5
    la = torch.randn(R, KD, generator=g, dtype=torch.float64) * 1.5
    lb = torch.randn(N, R, generator=g, dtype=torch.float64) * 1e-2
    scale = 8.0
    exact = x @ w.t() + scale * (x @ la.t()) @ lb.t()
    x16, w16, la16, lb16 = (t.half() for t in (x, w, la, lb))
    torch_fp16 = x16 @ w16.t() + scale * ((x16 @ la16.t()) @ lb16.t())
    y, _ = T.lora_forward_tma(x=x16.to(DEV), w_t=w16.to(DEV).t(), lora_A=la16.to(DEV), lv=lb16.to(DEV).t(),
                              scale=scale)
    _check(y, exact, torch_fp16, "tma fused shrink")


@pytest.mark.skipif(not TMA, reason="needs sm_90+ and tensor descriptors")
def test_many_adapter_tma_forward():
    """Per-adapter scales 8, 0.5 and -6: each row's own, the power of two of |s_a| > 1 on B_a's tile."""
    g = torch.Generator().manual_seed(2)
    n = 3
    x = torch.randn(M, KD, generator=g, dtype=torch.float64) * 1e3
    w = torch.randn(N, KD, generator=g, dtype=torch.float64) / KD ** 0.5
    la = torch.randn(n, R, KD, generator=g, dtype=torch.float64) * 1.5
    lb = torch.randn(n, N, R, generator=g, dtype=torch.float64) * 1e-2
    scales = torch.tensor([8.0, 0.5, -6.0], dtype=torch.float64)
    ids = torch.arange(M) % (n + 1) - 1                                   # -1 (base only), 0, 1, 2
    def compose(x, w, la, lb, sc):
        y = x @ w.t()
        for i in range(n):
            rows = ids == i
            y[rows] += sc[i] * ((x[rows] @ la[i].t()) @ lb[i].t())
        return y
    exact = compose(x, w, la, lb, scales)
    torch_fp16 = compose(x.half(), w.half(), la.half(), lb.half(), scales.half())
    got = T.multi_forward_tma(x=x.half().to(DEV), weight=w.half().to(DEV), bias=None, lora_A_stack=la.half().to(DEV),
                              lora_B_stack=lb.half().to(DEV), scalings=scales.float().to(DEV), ids=ids.to(DEV))
    _check(got, exact, torch_fp16, "many-adapter tma")


@pytest.mark.parametrize("scale", [8.0, -2.5])
@pytest.mark.parametrize("kernel", ["fused", "tma"])
def test_sparse_gemm_epilogue(kernel, scale):
    """RoSA's dX epilogue (W + Δ, then s * mask * (v @ A)) at |v| ~ 1e4 and scale 8 / -2.5."""
    if kernel == "tma" and not TMA:
        pytest.skip("needs sm_90+ and tensor descriptors")
    a, b, lu, lv, _ = _operands(3)                        # a: dY (M, out=K); W (out, in) = b (K, N)
    w = b
    idx = torch.tensor([[0, 1], [1, 0], [2, 4]], dtype=torch.int32, device=DEV)
    vals = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1e-2
    plan = build_sparse_plan(idx, KD, N, 16)
    wd = SD.sparse_densify(w.to(DEV), idx, vals.to(DEV), 16, torch.float64).cpu()
    exact = a @ wd + scale * (lu @ lv)
    torch_fp16 = (a.half() @ wd.half() + scale * (lu.half() @ lv.half())).double()
    args = (a.half().to(DEV), w.half().to(DEV))
    low = (lu.float().to(DEV), lv.half().to(DEV), None, 16, False)
    if kernel == "fused":
        got = SD.sparse_block_gemm(*args, plan.block_map, vals.float().to(DEV), *low, scale=scale)
    else:
        got = SD.sparse_block_gemm_tma(*args, plan.csr_cols, vals.float().to(DEV), *low, scale=scale)
    _check(got, exact, torch_fp16, f"sparse {kernel} scale {scale}")


@pytest.mark.skipif(not TMA, reason="needs sm_90+ and tensor descriptors")
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_tma_dx_pass_in_range(dora):
    """The backward's fused TMA kernel (dX, v = dY B and dB from one pass over dY; DoRA's with g) at |v| ~ 1e4 and
    scale -8: dX = dY W + s (v A) finite and within 2x PyTorch's fp16 error."""
    g = torch.Generator().manual_seed(6)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64) * 1e3
    w = torch.randn(N, KD, generator=g, dtype=torch.float64) / N ** 0.5
    la = torch.randn(R, KD, generator=g, dtype=torch.float64) * 3e-2
    lb = torch.randn(N, R, generator=g, dtype=torch.float64) * 1.2
    gain = (1 + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)) if dora else torch.ones(N, dtype=torch.float64)
    scale = -8.0
    gdy = dy * gain
    exact = gdy @ w + scale * ((gdy @ lb) @ la)
    g16 = (dy.half().double() * gain).half()
    torch_fp16 = g16 @ w.half() + scale * ((g16 @ lb.half()) @ la.half())
    args = dict(dy=dy.half().to(DEV), w=w.half().to(DEV), lora_A=la.half().to(DEV), lora_B=lb.half().to(DEV),
                scale=scale)
    if dora:
        dx = T.dora_backward_tma(g=gain.float().to(DEV), **args)[0]
    else:
        dx = T.lora_backward_tma(**args)[0]
    assert _amax(g16.double() @ lb) * abs(scale) > 65504 > _amax(g16.double() @ lb), "the case must stress the fold"
    _check(dx, exact, torch_fp16, f"{'DoRA' if dora else 'LoRA'} dX pass")


@pytest.mark.parametrize("s", [4.0, -2.5])
@pytest.mark.parametrize("gemm", ["fused", "cublas", "tma", "tma-shrink"])
def test_lora_linear_fp16_forward_and_backward(monkeypatch, gemm, s):
    """The whole op on the triton backend, fp16, s = 4 or -2.5 and dropout 0.5 (scale 8 / -5 on the masked
    epilogue): y and every gradient finite and within 2x the fp16 reference backend's error against fp64."""
    if gemm.startswith("tma") and not TMA:
        pytest.skip("needs sm_90+ and tensor descriptors")
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, KD, generator=g, dtype=torch.float64) * 1e3
    w = torch.randn(N, KD, generator=g, dtype=torch.float64) / KD ** 0.5
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    la = torch.randn(R, KD, generator=g, dtype=torch.float64) * 1.5
    lb = torch.randn(N, R, generator=g, dtype=torch.float64) * 1e-2
    dy = torch.randn(M, N, generator=g, dtype=torch.float64) * 1e-2  # dB = s dY^T u stays finite

    def run(backend, dtype, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (x, la, lb)]
        y = fastpeft.lora_linear(leaves[0], w.to(device, dtype), bias.to(device, dtype), leaves[1], leaves[2], s,
                                 dropout_p=0.5, training=True, seed=11, backend=backend)
        grads = torch.autograd.grad(y, leaves, dy.to(device, dtype))
        return [t.detach().double().cpu() for t in (y, *grads)]

    with kernel_stream_on_cpu():  # the reference draws the kernels' masks on CPU tensors
        exact = run("reference", torch.float64, "cpu")
        ref16 = run("reference", torch.float16, "cpu")
    got = run("triton", torch.float16, DEV)
    for name, g16, r16, e in zip(("y", "dX", "dA", "dB"), got, ref16, exact):
        _check(g16, e, r16, f"{gemm} s {s} {name}")
