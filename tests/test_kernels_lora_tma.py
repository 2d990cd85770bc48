"""The TMA (tensor-descriptor, persistent) fused LoRA GEMM of kernels/lora_tma.py against the float64
reference: the forward ``y = x W^T + s u B^T + b`` and ``dX = dY W + s mask * (v A) / (1 - p)``, the mask
bit-exact, odd M, ranks 1..128. Runs under TRITON_INTERPRET=1 on CPU tensors (the interpreter runs
tensor descriptors) and on CUDA with sm_90+; its sm_90 compile is checked by benchmarks/sm90_table.py."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import DTYPES, assert_close_report, lora_inputs, triton_backend_device  # noqa: E402
from fastpeft.reference import dropout_mask, dropout_threshold, lora_linear_ref  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import lora_tma as T  # noqa: E402

if not T.tma_supported(DEV):
    pytest.skip("needs sm_90+ and triton with tl.make_tensor_descriptor", allow_module_level=True)

# K and N whole 16-byte rows (multiples of 8); M odd; ranks 1, 16, 24, 128.
SHAPES = [(1, 48, 80, 1), (33, 80, 48, 16), (100, 48, 136, 24), (7, 64, 40, 128)]


def _make(m, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = lora_inputs(g, m, k, n, r)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    return [t.to(DEV, dtype) for t in (*inputs, dy)]


def _reference(x, w, b, a, bb, dy, s, p, seed):
    """(y, dX) of lora_linear on the reference path, in the inputs' dtype."""
    x = x.detach().clone().requires_grad_()
    y = lora_linear_ref(x, w, b, a, bb, s, dropout_p=p, training=True, seed=seed)
    (dx,) = torch.autograd.grad(y, [x], dy)
    return y.detach(), dx


def _tma(x, w, b, a, bb, dy, s, p, seed):
    """(y, dX) from the TMA GEMM, u and v from the shrink kernel, as LoRALinearFunction composes them."""
    thr = dropout_threshold(p) if p else 0
    ds = 1.0 / (1.0 - p)
    u = K.lora_shrink(a=x, b=a.t(), scale=ds, seed=seed, threshold=thr, mask_sp=x.shape[1], mask_sq=1)
    y = T.lora_gemm_tma(a=x, b=w.t(), lu=u, lv=bb.t(), bias=b, scale=s)             # forward: W as (N, K) rows
    v = K.lora_shrink(a=dy, b=bb, scale=1.0, seed=0, threshold=0, mask_sp=0, mask_sq=0)
    dx = T.lora_gemm_tma(a=dy, b=w, lu=v, lv=a, scale=s * ds, seed=seed, threshold=thr)  # dX: W as (K, N) rows
    return y, dx


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
def test_forward_and_dx_match_reference(m, k, n, r, dt, p):
    """fp32: close to fp64. fp16/bf16: error vs fp64 at most 2x PyTorch's own in that dtype (+ a tiny atol)."""
    case = f"M{m}-K{k}-N{n}-r{r}-{dt}-p{p}"
    x, w, b, a, bb, dy = _make(m, k, n, r, DTYPES[dt])
    got = _tma(x, w, b, a, bb, dy, 0.75, p, 1234)
    exact = _reference(*(t.double() for t in (x, w, b, a, bb, dy)), 0.75, p, 1234)
    for name, g, e in zip(("y", "dx"), got, exact):
        assert g.dtype == x.dtype and g.shape == e.shape, name
        if x.dtype == torch.float32:
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), what=f"{case} {name}")
    if x.dtype != torch.float32:
        low = _reference(x, w, b, a, bb, dy, 0.75, p, 1234)
        for name, g, e, t in zip(("y", "dx"), got, exact, low):
            err = (g.double() - e).abs().max().item()
            torch_err = (t.double() - e).abs().max().item()
            assert err <= 2 * torch_err + 1e-3 * e.abs().max().item(), \
                f"{case} {name}: kernel error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("block_n", [32, 128, 256], ids=["BN32", "BN128-halves", "BN256-quarters"])
def test_mask_is_the_reference_mask_bit_for_bit(block_n):
    """With a = 0 the output is s * mask * (lu @ lv): exactly 0 where dropped (the reference mask, bit for
    bit), the unmasked product where kept, at every epilogue sub-tiling; a seed given as a device tensor
    draws the same mask."""
    m, k, n, r, p, seed = 37, 32, 264, 8, 0.4, 99
    g = torch.Generator().manual_seed(1)
    lu = torch.randn(m, r, generator=g).to(DEV)
    lv = torch.randn(r, n, generator=g).to(DEV)
    a = torch.zeros(m, k, device=DEV)
    b = torch.randn(k, n, generator=g).to(DEV)
    cfg = dict(T._TEST_CONFIG, BLOCK_N=block_n)
    keep = dropout_mask(seed, m, n, p, device=DEV)
    full = T.lora_gemm_tma(a=a, b=b, lu=lu, lv=lv, scale=1.0, config=cfg)
    for s in (seed, torch.tensor([seed], device=DEV)):
        out = T.lora_gemm_tma(a=a, b=b, lu=lu, lv=lv, scale=1.0, seed=s, threshold=dropout_threshold(p), config=cfg)
        assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
        # kept: the unmasked product (to rounding: the unmasked path sums it into the accumulator)
        assert_close_report(out[keep], full[keep], rtol=1e-6, atol=1e-6, what=f"kept, BLOCK_N {block_n}")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03


def test_same_bits_as_the_pointer_kernel():
    """fp32 at the same blocks: the TMA kernel and lora._lora_gemm_kernel sum in the same order, so the
    same numbers come out, with and without the mask, in either layout of b."""
    m, k, n, r = 45, 64, 72, 16
    g = torch.Generator().manual_seed(2)
    a, w = torch.randn(m, k, generator=g).to(DEV), torch.randn(n, k, generator=g).to(DEV)
    lu, lv = torch.randn(m, r, generator=g).to(DEV), torch.randn(r, n, generator=g).to(DEV)
    bias = torch.randn(n, generator=g).to(DEV)
    for b in (w.t(), w.t().contiguous()):
        for thr in (0, dropout_threshold(0.25)):
            want = K.lora_gemm(a=a, b=b, lu=lu, lv=lv, bias=bias, scale=0.5, seed=3, threshold=thr)
            got = T.lora_gemm_tma(a=a, b=b, lu=lu, lv=lv, bias=bias, scale=0.5, seed=3, threshold=thr)
            assert_close_report(got, want, rtol=1e-6, atol=1e-5, what=f"b strides {b.stride()} thr {thr}")


def test_noncontiguous_a_and_empty_rows():
    x, w, b, a, bb, dy = _make(16, 48, 40, 8, torch.float32)
    xs = torch.cat([x, x], 1)[:, ::2]  # strided: copied for TMA
    got = T.lora_gemm_tma(a=xs, b=w.t(), lu=x[:, :8], lv=bb.t(), bias=b, scale=1.0)
    want = xs.double() @ w.double().t() + x[:, :8].double() @ bb.double().t() + b.double()
    assert_close_report(got, want, rtol=1e-5, atol=1e-5, what="strided a")
    assert T.lora_gemm_tma(a=x[:0], b=w.t(), lu=x[:0, :8], lv=bb.t(), scale=1.0).shape == (0, 40)


def test_supported_and_shape_checks(monkeypatch):
    x, w, b, a, bb, dy = _make(4, 48, 40, 8, torch.bfloat16)
    assert T.tma_shapes_ok(a=x, b=w.t())
    assert not T.tma_shapes_ok(a=x[:, :44], b=w[:, :44].t())  # K = 44: rows of 88 bytes
    with pytest.raises(ValueError, match="multiples of 8"):
        T.lora_gemm_tma(a=x[:, :44], b=w[:, :44].t(), lu=x[:, :8], lv=bb.t())
    monkeypatch.setattr(T, "INTERPRET", False)
    assert not T.tma_supported("cpu")  # outside the interpreter: CUDA sm_90+ only
