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


# ---- the forward with the shrink fused into the TMA GEMM (lora_forward_tma) --------------------------------


def _fused(x, w, b, a, bb, s, p, seed, config=None):
    thr = dropout_threshold(p) if p else 0
    return T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=bb.t(), bias=b, scale=s, drop_scale=1.0 / (1.0 - p),
                              seed=seed, threshold=thr, config=config)


FUSED_SHAPES = [s for s in SHAPES if T.shrink_fits(s[3])] + [(65, 40, 32, 64)]  # one column block, 3 row blocks


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", FUSED_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in FUSED_SHAPES])
def test_fused_shrink_forward_matches_reference(m, k, n, r, dt, p):
    """(y, u) from one kernel: y as the reference forward (fp32 to 1e-5; fp16 / bf16 within 2x PyTorch's own
    error), u = drop(x) A^T in fp32 with the reference's mask, and both as the shrink kernel + TMA GEMM give
    them (the same sums but the shrink's split)."""
    case = f"M{m}-K{k}-N{n}-r{r}-{dt}-p{p}"
    x, w, b, a, bb, dy = _make(m, k, n, r, DTYPES[dt])
    y, u = _fused(x, w, b, a, bb, 0.75, p, 1234)
    assert y.dtype == x.dtype and u.dtype == torch.float32 and u.shape == (m, r)
    keep = dropout_mask(1234, m, k, p, device=DEV) if p else torch.ones(m, k, dtype=torch.bool, device=DEV)
    u_exact = (x.double() * keep / (1 - p)) @ a.double().t()
    y_exact = _reference(*(t.double() for t in (x, w, b, a, bb, dy)), 0.75, p, 1234)[0]
    if x.dtype == torch.float32:
        assert_close_report(y, y_exact, rtol=1e-5, atol=1e-5 * max(1.0, y_exact.abs().max().item()), what=f"{case} y")
    else:
        err = (y.double() - y_exact).abs().max().item()
        torch_err = (_reference(x, w, b, a, bb, dy, 0.75, p, 1234)[0].double() - y_exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * y_exact.abs().max().item(), f"{case} y: {err:.3g} vs {torch_err:.3g}"
    # u: products of x's dtype summed in fp32
    assert_close_report(u, u_exact, rtol=1e-5, atol=1e-5 * max(1.0, u_exact.abs().max().item()), what=f"{case} u")
    thr = dropout_threshold(p) if p else 0
    u2 = K.lora_shrink(a=x, b=a.t(), scale=1.0 / (1.0 - p), seed=1234, threshold=thr, mask_sp=k, mask_sq=1)
    assert_close_report(u, u2, rtol=1e-6, atol=1e-6 * max(1.0, u2.abs().max().item()), what=f"{case} u vs shrink")
    y2 = T.lora_gemm_tma(a=x, b=w.t(), lu=u2, lv=bb.t(), bias=b, scale=0.75)
    if torch.equal(u, u2):
        assert torch.equal(y, y2), f"{case}: the same u must give the same y"


@pytest.mark.parametrize("block_n", [32, 128], ids=["BN32", "BN128"])
def test_fused_shrink_seed_tensor_and_blocks(block_n):
    """A seed given as a device tensor draws the same mask; other tile widths give the same u."""
    x, w, b, a, bb, dy = _make(37, 64, 264, 8, torch.float32)
    cfg = dict(T._TEST_CONFIG, BLOCK_N=block_n)
    y, u = _fused(x, w, b, a, bb, 0.5, 0.3, 99, config=cfg)
    y_t, u_t = _fused(x, w, b, a, bb, 0.5, 0.3, torch.tensor([99], device=DEV), config=cfg)
    assert torch.equal(u, u_t) and torch.equal(y, y_t)
    y_0, u_0 = _fused(x, w, b, a, bb, 0.5, 0.3, 99)
    assert torch.equal(u, u_0)
    assert_close_report(y, y_0, rtol=1e-6, atol=1e-5, what=f"BLOCK_N {block_n} vs {T._TEST_CONFIG['BLOCK_N']}")


def test_fused_shrink_checks_and_edges():
    x, w, b, a, bb, dy = _make(5, 48, 40, 8, torch.float32)
    with pytest.raises(ValueError, match=r"lora_A must be \(R, K=48\), got \(8, 40\)"):
        T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a[:, :40], lv=bb.t())
    big = torch.zeros(128, 48, device=DEV)
    assert T.shrink_fits(64) and not T.shrink_fits(65)
    with pytest.raises(ValueError, match="rank 128.*at most 64"):
        T.lora_forward_tma(x=x, w_t=w.t(), lora_A=big, lv=torch.zeros(128, 40, device=DEV))
    y, u = T.lora_forward_tma(x=x[:0], w_t=w.t(), lora_A=a, lv=bb.t())
    assert y.shape == (0, 40) and u.shape == (0, 8)
    for g in (torch.ones(41, device=DEV), torch.ones(40, device=DEV, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"col_scale must be fp32 \(40,\)"):
            T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=bb.t(), col_scale=g)


# ---- the backward with the dY pass fused into dX's TMA GEMM (lora_backward_tma) ----------------------------


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", FUSED_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in FUSED_SHAPES])
def test_fused_dy_pass_matches_reference(m, k, n, r, dt, p):
    """(dX, v, dY^T u) from one kernel: dX as the reference backward's (fp32 to 1e-5; fp16 / bf16 within 2x
    PyTorch's own error), v = dY B and dY^T u in fp32 as the fp64 products (u rounded to dY's dtype, as the
    dB shrink rounds it), and v, dY^T u as the shrink kernels give them."""
    case = f"M{m}-K{k}-N{n}-r{r}-{dt}-p{p}"
    x, w, b, a, bb, dy = _make(m, k, n, r, DTYPES[dt])
    if not T.dy_pass_fits(r, p > 0):  # rank 64 with the mask: no config holds it (refused, named)
        with pytest.raises(ValueError, match=f"rank {r} is above what its configs hold for .* \\(at most 32 with the mask"):
            T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, threshold=dropout_threshold(p))
        return
    g = torch.Generator().manual_seed(3)
    u = torch.randn(m, r, generator=g).to(DEV)
    thr = dropout_threshold(p) if p else 0
    dx, v, dbu = T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, u=u, scale=0.75 / (1 - p), seed=1234,
                                     threshold=thr)
    assert dx.dtype == dy.dtype and v.dtype == dbu.dtype == torch.float32
    assert v.shape == (m, r) and dbu.shape == (n, r) and dx.shape == (m, k)
    v_exact = dy.double() @ bb.double()
    db_exact = dy.double().t() @ u.to(dy.dtype).double()
    for name, got, want in (("v", v, v_exact), ("dY^T u", dbu, db_exact)):
        assert_close_report(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()), what=f"{case} {name}")
    assert_close_report(v, K.lora_shrink(a=dy, b=bb), rtol=1e-6, atol=1e-6 * max(1.0, v_exact.abs().max().item()),
                        what=f"{case} v vs shrink")
    dx_exact = _reference(*(t.double() for t in (x, w, b, a, bb, dy)), 0.75, p, 1234)[1]
    if dy.dtype == torch.float32:
        assert_close_report(dx, dx_exact, rtol=1e-5, atol=1e-5 * max(1.0, dx_exact.abs().max().item()),
                            what=f"{case} dx")
    else:
        err = (dx.double() - dx_exact).abs().max().item()
        torch_err = (_reference(x, w, b, a, bb, dy, 0.75, p, 1234)[1].double() - dx_exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * dx_exact.abs().max().item(), f"{case} dx: {err:.3g} vs {torch_err:.3g}"
    dx2, v2, none = T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, scale=0.75 / (1 - p), seed=1234,
                                        threshold=thr)
    assert none is None and torch.equal(dx2, dx) and torch.equal(v2, v)  # without u: no partials, the same dX


def test_fused_dy_pass_checks_and_edges():
    x, w, b, a, bb, dy = _make(5, 48, 40, 8, torch.float32)
    u = torch.randn(5, 8, device=DEV)
    with pytest.raises(ValueError, match=r"lora_B must be \(N=40, R=8\), got \(40, 4\)"):
        T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb[:, :4])
    with pytest.raises(ValueError, match="rank 80 is above"):
        T.lora_backward_tma(dy=dy, w=w, lora_A=torch.zeros(80, 48, device=DEV), lora_B=torch.zeros(40, 80, device=DEV))
    dx, v, dbu = T.lora_backward_tma(dy=dy[:0], w=w, lora_A=a, lora_B=bb, u=u[:0])
    assert dx.shape == (0, 48) and v.shape == (0, 8) and torch.equal(dbu, torch.zeros(40, 8, device=DEV))
    # u with a non-unit inner stride (a transposed view): the same partials as a contiguous u
    ut = u.t().contiguous().t()
    assert ut.stride(-1) != 1
    got = T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, u=ut)
    want = T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, u=u)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    # a rank-1 B^T of odd strides (size-1 rows): copied to TMA rows, same result as a plain one
    b1 = torch.randn(1, 40, device=DEV).t()
    got = T.lora_backward_tma(dy=dy, w=w, lora_A=a[:1], lora_B=b1, u=u[:, :1])
    want = T.lora_backward_tma(dy=dy, w=w, lora_A=a[:1], lora_B=b1.contiguous().clone(), u=u[:, :1].clone())
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", FUSED_SHAPES[:3], ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in FUSED_SHAPES[:3]])
def test_dora_fused_dy_pass_matches_reference(m, k, n, r, dt, p, bias):
    """DoRA's plain backward on dY's side from one kernel, G = dY ⊙ g rounded to dY's dtype: v = G B,
    G^T u and Σ_i dY (y - b) in fp32 as the fp64 products of the same G, dX = G W + s mask (v A) as fp64 (fp32
    to 1e-5; fp16 / bf16 within 2x the error of the same formula in PyTorch's dtype)."""
    case = f"M{m}-K{k}-N{n}-r{r}-{dt}-p{p}-{bias}"
    x, w, b, a, bb, dy = _make(m, k, n, r, DTYPES[dt])
    gen = torch.Generator().manual_seed(4)
    g = (torch.rand(n, generator=gen) + 0.5).to(DEV)
    u = torch.randn(m, r, generator=gen).to(DEV)
    y = torch.randn(m, n, generator=gen).to(DEV, dy.dtype)
    yb = b if bias else None
    thr = dropout_threshold(p) if p else 0
    if not T.dora_dy_pass_fits(r, p > 0):  # ranks up to 16 without the mask: refused, named
        with pytest.raises(ValueError, match=f"rank {r}.* is not held by its configs"):
            T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, threshold=thr)
        return
    dx, v, dbu, dm = T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, u=u, y=y, bias=yb, scale=0.75,
                                         seed=1234, threshold=thr)
    gdy = (dy.float() * g).to(dy.dtype).double()
    keep = dropout_mask(1234, m, k, p, device=DEV) if p else torch.ones(m, k, dtype=torch.bool, device=DEV)
    want = {"v": gdy @ bb.double(), "G^T u": gdy.t() @ u.to(dy.dtype).double(),
            "dm": (dy.double() * (y.double() - (yb.double() if bias else 0.0))).sum(0)}
    for name, got in (("v", v), ("G^T u", dbu), ("dm", dm)):
        e = want[name]
        assert_close_report(got, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), what=f"{case} {name}")
    exact = gdy @ w.double() + 0.75 * keep * (want["v"] @ a.double())
    if dy.dtype == torch.float32:
        assert_close_report(dx, exact, rtol=1e-5, atol=1e-5 * max(1.0, exact.abs().max().item()), what=f"{case} dx")
    else:
        low = (gdy.to(dy.dtype) @ w + (0.75 * keep * (want["v"].float() @ a.float())).to(dy.dtype)).double()
        err, torch_err = (dx.double() - exact).abs().max().item(), (low - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * exact.abs().max().item(), f"{case} dx: {err:.3g} vs {torch_err:.3g}"


def test_dora_fused_dy_pass_checks(monkeypatch):
    x, w, b, a, bb, dy = _make(5, 48, 40, 8, torch.float32)
    g = torch.ones(40, device=DEV)
    with pytest.raises(ValueError, match=r"g must be fp32 \(40,\), got torch.float64 \(40,\)"):
        T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g.double())
    with pytest.raises(ValueError, match=r"y must be \(5, 40\) \(dY's shape\), got \(5, 41\)"):
        T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, y=torch.zeros(5, 41, device=DEV))
    dx, v, dbu, dm = T.dora_backward_tma(dy=dy[:0], w=w, lora_A=a, lora_B=bb, g=g, u=torch.zeros(0, 8, device=DEV),
                                         y=dy[:0], bias=b)
    assert dx.shape == (0, 48) and torch.equal(dm, torch.zeros(40, device=DEV)) and dbu.shape == (40, 8)
    # dm is column block 1's work: one block of dX's columns cannot give it (refused, named)
    assert T.dm_pass_fits(dy, 48) and not T.dm_pass_fits(dy, 48, dict(T._TEST_CONFIG, BLOCK_N=64))
    with pytest.raises(ValueError, match="in_features 48 must be above 64"):
        T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, y=dy, config=dict(T._TEST_CONFIG, BLOCK_N=64))
    with monkeypatch.context() as mp:  # an autotuned launch: two blocks of the widest BLOCK_N (256)
        mp.setattr(T, "_use_explicit_blocks", lambda t: False)
        assert not T.dm_pass_fits(dy, 256) and T.dm_pass_fits(dy, 264)
        # autotuned in fp32 with y (the magnitude partials): no config fits shared memory, refused by name (it
        # reached an empty autotune list); without y one does
        w_w, a_w = torch.randn(40, 264, device=DEV), torch.randn(8, 264, device=DEV)  # in_features 264
        with pytest.raises(ValueError, match=r"rank 8 and y \(the magnitude partials\) in torch.float32 is not held"):
            T.dora_backward_tma(dy=dy, w=w_w, lora_A=a_w, lora_B=bb, g=g, y=dy)
        assert T.dora_dy_pass_fits(8, False, 4) and not T.dora_dy_pass_fits(8, False, 4, dm_part=True)
    # y in another layout than dY: both read as standard rows, the same sums
    y = torch.randn(40, 5, device=DEV).t()
    got = T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, y=y, bias=b)[3]
    assert_close_report(got, (dy * (y - b)).sum(0), rtol=1e-5, atol=1e-5, what="strided y")


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_lora_linear_forced_tma_shrink(monkeypatch, dt, p):
    """FASTPEFT_LORA_GEMM=tma-shrink: the forward of lora_linear on the fused shrink (u saved from it), the
    backward on the kernels with the TMA GEMM; output and every gradient as the reference."""
    from fastpeft.ops import lora as OL

    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma-shrink")
    ran = []
    real, real_bwd = T.lora_forward_tma, T.lora_backward_tma
    monkeypatch.setattr(T, "lora_forward_tma", lambda **kw: ran.append("fwd") or real(**kw))
    monkeypatch.setattr(T, "lora_backward_tma", lambda **kw: ran.append("bwd") or real_bwd(**kw))
    g = torch.Generator().manual_seed(5)
    x, w, b, a, bb = [t.to(DEV, DTYPES[dt]) for t in lora_inputs(g, 33, 48, 80, 8)]
    dy = torch.randn(33, 80, generator=g).to(DEV, DTYPES[dt])
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, a, bb)]
    y = fastpeft.lora_linear(*leaves[:3], leaves[3], leaves[4], 0.5, dropout_p=p, training=True, seed=7,
                             backend="triton")
    got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
    assert ran == ["fwd", "bwd"], f"the fused paths ran: {ran}"
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, a, bb)]
    y_ref = lora_linear_ref(*ref_leaves, 0.5, dropout_p=p, training=True, seed=7)
    want = [y_ref.detach(), *torch.autograd.grad(y_ref, ref_leaves, dy.double())]
    tol = 1e-5 if dt == "fp32" else 3e-2
    for name, g_, e in zip(("y", "dx", "dw", "db", "dA", "dB"), got, want):
        assert_close_report(g_, e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()), what=f"{dt} p{p} {name}")
    assert OL.FUSED_SHRINK_MIN_ROWS > 33  # offered here only because it is forced


def on_card(test):
    """A gpu-marked test that needs the card's concurrent programs (not the interpreter's one-at-a-time)."""
    return pytest.mark.gpu(pytest.mark.skipif(DEV != "cuda", reason="needs the card's concurrent programs")(test))


# Real persistent grids (one program per SM) at two shipped configs: explicit, so that the test step does not
# autotune (the benches do), one with BLOCK_N 128 (the pinned one) and one with 256.
GPU_CONFIGS = (dict(T._PINNED_TMA), {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                                     "num_stages": 2})


@on_card
def test_fused_shrink_producers_and_waiters_on_the_card():
    """On a GPU with the real persistent grid (one program per SM, shipped blocks): many row blocks, each
    waited for by 15 column tiles, 20 launches, every one the same bits as the first and close to the
    two-kernel composition (a missed wait would read a stale or unwritten u)."""
    x, w, b, a, bb, dy = _make(4096 + 37, 1024, 2048, 16, torch.bfloat16)
    for p in (0.0, 0.1):
        thr = dropout_threshold(p) if p else 0
        u2 = K.lora_shrink(a=x, b=a.t(), scale=1.0 / (1.0 - p), seed=5, threshold=thr, mask_sp=x.shape[1], mask_sq=1)
        y2 = T.lora_gemm_tma(a=x, b=w.t(), lu=u2, lv=bb.t(), bias=b, scale=0.5)
        for cfg in GPU_CONFIGS:
            first = None
            for _ in range(20):
                y, u = _fused(x, w, b, a, bb, 0.5, p, 5, config=cfg)
                if first is None:
                    first = (y, u)
                    assert_close_report(u, u2, rtol=1e-5, atol=1e-3, what=f"p{p} {cfg} u")
                    assert_close_report(y.float(), y2.float(), rtol=2e-2, atol=2e-2, what=f"p{p} {cfg} y")
                assert torch.equal(y, first[0]) and torch.equal(u, first[1]), f"p{p} {cfg}: launches differ"


@on_card
def test_fused_shrink_with_doras_column_scale_on_the_card():
    """DoRA's plain forward on the card: g ⊙ (x W^T + s u B^T) + b, a shipped config, against fp32 torch."""
    x, w, b, a, bb, dy = _make(2048 + 5, 1024, 1536, 16, torch.bfloat16)
    g = torch.rand(1536, device=DEV) + 0.5
    y, u = T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=bb.t(), bias=b, scale=0.5, col_scale=g,
                              config=GPU_CONFIGS[1])
    want = (x.float() @ w.float().t() + 0.5 * u @ bb.float().t()) * g + b.float()
    assert_close_report(u, x.float() @ a.float().t(), rtol=1e-3, atol=1e-2, what="u")
    assert_close_report(y.float(), want, rtol=2e-2, atol=2e-2, what="y")


@on_card
def test_fused_dy_pass_on_the_card():
    """The fused backward on the card (two shipped configs), 20 launches with the same bits, close
    to the shrinks + TMA GEMM composition: a missed wait would read a stale or unwritten v."""
    x, w, b, a, bb, dy = _make(4096 + 37, 2048, 1024, 16, torch.bfloat16)
    u = torch.randn(dy.shape[0], 16, device=DEV)
    for p in (0.0, 0.1):
        thr = dropout_threshold(p) if p else 0
        v2 = K.lora_shrink(a=dy, b=bb)
        dx2 = T.lora_gemm_tma(a=dy, b=w, lu=v2, lv=a, scale=0.5, seed=5, threshold=thr)
        db2 = K.lora_shrink(a=dy.t(), b=u)
        for cfg in GPU_CONFIGS:
            first = None
            for _ in range(20):
                out = T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, u=u, scale=0.5, seed=5, threshold=thr,
                                          config=cfg)
                if first is None:
                    first = out
                    assert_close_report(out[1], v2, rtol=1e-5, atol=1e-3, what=f"p{p} {cfg} v")
                    assert_close_report(out[2], db2, rtol=1e-4, atol=1e-2, what=f"p{p} {cfg} dB")
                    assert_close_report(out[0].float(), dx2.float(), rtol=2e-2, atol=2e-2, what=f"p{p} {cfg} dX")
                assert all(torch.equal(o, f) for o, f in zip(out, first)), f"p{p} {cfg}: launches differ"


@on_card
def test_dora_fused_dy_pass_on_the_card():
    """DoRA's fused backward on the card, a shipped config: close to DoRA's own kernels (dY pass + DX GEMM)."""
    from fastpeft.kernels import dora as D
    x, w, b, a, bb, dy = _make(4096 + 37, 2048, 1024, 16, torch.bfloat16)
    g = torch.rand(1024, device=DEV) + 0.5
    u, y = torch.randn(dy.shape[0], 16, device=DEV), torch.randn_like(dy)
    dx, v, dbu, dm = T.dora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb, g=g, u=u, y=y, bias=b, scale=0.5,
                                         config=GPU_CONFIGS[0])
    v2, dm2 = D.dora_dy_pass(dy, y, g, b, bb)
    dx2 = D.dora_gemm(D.DX, dy, w, v2, a, g, None, 0.5)
    assert_close_report(v, v2, rtol=1e-4, atol=1e-2, what="v")
    assert_close_report(dm, dm2, rtol=1e-4, atol=1e-1, what="dm")
    assert_close_report(dx.float(), dx2.float(), rtol=2e-2, atol=2e-2, what="dX")
    assert_close_report(dbu, K.lora_shrink(a=dy.t(), b=u) * g[:, None], rtol=2e-2, atol=1.0, what="dB")


# ---- many adapters per batch, the shrink and each row block's adapters fused (multi_forward_tma) -------------


def _multi_inputs(m, k, n, ranks, dtype, seed=0):
    """x (m, k), W, bias, stacks A (na, r_max, k), B (na, n, r_max) with NaN past each adapter's rank (never
    read into y), scalings (na,), ranks (na,) int32; fp64 on the CPU then moved."""
    g = torch.Generator().manual_seed(seed)
    na, r_max = len(ranks), max(ranks)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    a = torch.randn(na, r_max, k, generator=g, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(na, n, r_max, generator=g, dtype=torch.float64) / r_max ** 0.5
    for i, r in enumerate(ranks):
        a[i, r:] = float("nan")
        bb[i, :, r:] = float("nan")
    s = torch.rand(na, generator=g, dtype=torch.float64) + 0.5
    return ([t.to(DEV, dtype) for t in (x, w, b, a, bb)] + [s.to(DEV, torch.float32),
                                                             torch.tensor(ranks, device=DEV, dtype=torch.int32)])


def _layout(kind, m, na, seed=0):
    """Row adapter ids (m,) int64: ``segments`` (sequences of 40 rows, one adapter each: blocks of 32 rows mix at
    most two), ``random`` (any of -1 .. na - 1 per row), ``one`` (adapter na - 1 everywhere), ``none`` (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids = {"segments": torch.arange(m) // 40 % na, "random": torch.randint(-1, na, (m,), generator=g),
           "one": torch.full((m,), na - 1), "none": torch.full((m,), -1)}[kind]
    return ids.to(DEV)


MULTI_SHAPES = [(100, 48, 80, (24, 8, 1)), (33, 64, 136, (16, 64, 8, 3)), (7, 40, 48, (8, 8)), (1, 48, 40, (16,))]


@pytest.mark.parametrize("layout", ["segments", "random", "one", "none"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,ranks", MULTI_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{'.'.join(map(str, r))}"
                                                           for m, k, n, r in MULTI_SHAPES])
def test_multi_forward_matches_reference(m, k, n, ranks, dt, layout):
    """y from one kernel against lora_linear_multi_ref in fp64 (fp32 to 1e-5; fp16 / bf16 within 2x PyTorch's
    own error), for rows sharing an adapter per sequence, mixed at random with rows of none, all one adapter
    and none at all; NaN past each adapter's rank in both stacks never reaches y."""
    from fastpeft.reference import lora_linear_multi_ref
    case = f"M{m}-K{k}-N{n}-{dt}-{layout}"
    x, w, b, a, bb, s, rk = _multi_inputs(m, k, n, list(ranks), DTYPES[dt])
    ids = _layout(layout, m, len(ranks))
    y = T.multi_forward_tma(x=x, weight=w, bias=b, lora_A_stack=a, lora_B_stack=bb, scalings=s, ids=ids, ranks=rk)
    assert y.dtype == x.dtype and y.shape == (m, n)

    def ref(*ts):
        a_, bb_ = ts[3].clone(), ts[4].clone()
        for i, r in enumerate(ranks):  # the reference multiplies the whole stack: zero the NaN past the ranks
            a_[i, r:] = 0
            bb_[i, :, r:] = 0
        return lora_linear_multi_ref(ts[0], ts[1], ts[2], a_, bb_, s.to(ts[0].dtype), ids, rk)
    exact = ref(*(t.double() for t in (x, w, b, a, bb)))
    if x.dtype == torch.float32:
        assert_close_report(y, exact, rtol=1e-5, atol=1e-5 * max(1.0, exact.abs().max().item()), what=case)
    else:
        err = (y.double() - exact).abs().max().item()
        torch_err = (ref(x, w, b, a, bb).double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * exact.abs().max().item(), f"{case}: {err:.3g} vs {torch_err:.3g}"


def test_multi_forward_no_bias_ranks_default_and_strides():
    """Without a bias and ranks (every adapter r_max), with x of odd strides and W read as a transposed copy:
    the same bits as with contiguous inputs; a one-tile-wide N (every tile a producer) and more row blocks."""
    x, w, b, a, bb, s, rk = _multi_inputs(70, 48, 32, [8, 8, 8], torch.float32)
    a, bb = a.nan_to_num(), bb.nan_to_num()
    ids = _layout("random", 70, 3)
    want = T.multi_forward_tma(x=x, weight=w, bias=None, lora_A_stack=a, lora_B_stack=bb, scalings=s, ids=ids)
    xs = torch.empty(70, 96, device=DEV)[:, ::2].copy_(x)
    assert xs.stride() == (96, 2)
    got = T.multi_forward_tma(x=xs, weight=w.t().contiguous().t(), bias=None, lora_A_stack=a,
                              lora_B_stack=bb.transpose(1, 2).contiguous().transpose(1, 2), scalings=s, ids=ids)
    assert torch.equal(got, want)
    ref = x @ w.t()
    for i in range(70):
        if ids[i] >= 0:
            ref[i] += s[ids[i]] * (x[i] @ a[ids[i]].t()) @ bb[ids[i]].t()
    assert_close_report(want, ref, rtol=1e-5, atol=1e-5, what="no bias")


def test_multi_forward_checks_and_edges():
    x, w, b, a, bb, s, rk = _multi_inputs(5, 48, 40, [8, 4], torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0], device=DEV)
    kw = dict(x=x, weight=w, bias=b, lora_A_stack=a, lora_B_stack=bb, scalings=s, ids=ids, ranks=rk)
    with pytest.raises(ValueError, match=r"lora_A_stack must be \(n, r_max, K=48\), got \(2, 8, 40\)"):
        T.multi_forward_tma(**dict(kw, lora_A_stack=a[:, :, :40]))
    with pytest.raises(ValueError, match=r"lora_B_stack must be \(n=2, N=40, r_max=8\), got \(2, 40, 4\)"):
        T.multi_forward_tma(**dict(kw, lora_B_stack=bb[:, :, :4]))
    with pytest.raises(ValueError, match="r_max 80 is above what its configs hold"):
        T.multi_forward_tma(**dict(kw, lora_A_stack=torch.zeros(2, 80, 48, device=DEV),
                                   lora_B_stack=torch.zeros(2, 40, 80, device=DEV)))
    with pytest.raises(ValueError, match=r"ids must be \(5,\), scalings and ranks \(2,\), got \(4,\)"):
        T.multi_forward_tma(**dict(kw, ids=ids[:4]))
    with pytest.raises(ValueError, match="K and N must be multiples of 8"):
        T.multi_forward_tma(**dict(kw, x=x[:, :44].half(), weight=w[:, :44].half(), lora_A_stack=a[:, :, :44]))
    assert T.multi_forward_tma(**dict(kw, x=x[:0], ids=ids[:0])).shape == (0, 40)
    none = T.multi_forward_tma(**dict(kw, ids=torch.full((5,), -1, device=DEV)))
    assert_close_report(none, x @ w.t() + b, rtol=1e-5, atol=1e-5, what="no adapter rows")


@on_card
def test_multi_forward_on_the_card():
    """The many-adapter forward on the card (two shipped configs, the real persistent grid): 64 adapters of
    ranks 8-64, sequences of 500 rows each with its adapter (blocks straddle two) and rows mixed at random; 20
    launches the same bits as the first, close to fp32 torch (a missed wait would read a stale u)."""
    ranks = [8, 16, 32, 64] * 16
    x, w, b, a, bb, s, rk = _multi_inputs(4096 + 37, 1024, 2048, ranks, torch.bfloat16)
    a, bb = a.nan_to_num(), bb.nan_to_num()
    for layout in ("seq", "random"):
        m = x.shape[0]
        ids = (torch.arange(m, device=DEV) // 500 * 7 % 64 if layout == "seq"
               else torch.randint(-1, 64, (m,), device=DEV))
        want = x.float() @ w.float().t() + b.float()
        for i in ids.unique().tolist():
            if i >= 0:
                rows = ids == i
                want[rows] += s[i] * (x[rows].float() @ a[i].float().t()) @ bb[i].float().t()
        for cfg in GPU_CONFIGS:
            first = None
            for _ in range(20):
                y = T.multi_forward_tma(x=x, weight=w, bias=b, lora_A_stack=a, lora_B_stack=bb, scalings=s, ids=ids,
                                        ranks=rk, config=cfg)
                if first is None:
                    first = y
                    assert_close_report(y.float(), want, rtol=2e-2, atol=5e-2, what=f"{layout} {cfg}")
                assert torch.equal(y, first), f"{layout} {cfg}: launches differ"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf row, on purpose
def test_multi_forward_bad_ids_and_inf_rows():
    """Ids outside [0, n) leave their rows to the base GEMM (never read past the scalings); an inf in a row of x
    reaches only that row, whichever adapter the row block's other rows use."""
    x, w, b, a, bb, s, rk = _multi_inputs(40, 48, 40, [8, 4], torch.float32)
    a, bb = a.nan_to_num(), bb.nan_to_num()
    ids = _layout("random", 40, 2)
    ids[[3, 17]] = torch.tensor([2, 1000], device=DEV)
    ids[[5, 9]] = torch.tensor([-7, 0], device=DEV)
    kw = dict(weight=w, bias=b, lora_A_stack=a, lora_B_stack=bb, scalings=s, ranks=rk)
    y = T.multi_forward_tma(x=x, ids=ids, **kw)
    base = x @ w.t() + b
    for i in (3, 17, 5):
        assert_close_report(y[i], base[i], rtol=1e-5, atol=1e-5, what=f"row {i} (id {int(ids[i])})")
    xi = x.clone()
    xi[9, 4] = float("inf")
    yi = T.multi_forward_tma(x=xi, ids=ids, **kw)
    others = torch.arange(40, device=DEV) != 9
    assert torch.isfinite(yi[others]).all() and not torch.isfinite(yi[9]).all()
    assert_close_report(yi[others], y[others], rtol=1e-6, atol=1e-6, what="rows beside the inf row")


def test_tma_refuses_rows_that_overlap():
    """An expanded (M, N) tensor (row stride 0: autograd's gradient of a sum) is no TMA address: ``_with_rows``
    copies it to standard rows; a 16-byte-aligned standard tensor goes as it is, and so does a single row."""
    dy = torch.randn(1, 64).expand(5, 64)
    assert dy.stride() == (0, 1) and not T._rows_ok(dy)
    copy = T._with_rows(dy)
    assert copy.stride() == (64, 1) and torch.equal(copy, dy)
    x = torch.randn(5, 64)
    assert T._rows_ok(x) and T._with_rows(x) is x
    assert T._rows_ok(torch.randn(1, 64))


def test_tma_autotunes_once_per_row_bucket():
    """The TMA GEMM's autotuner is keyed on M's power-of-two bucket (M_KEY), not M: batches padded to their
    longest sequence change M at every step, and each new key would time every config again."""
    keys = T._tuned().keys
    assert "M_KEY" in keys and "M" not in keys
    assert "M_KEY" in T._tuned_multi().keys


def test_direct_fp32_calls_are_refused_where_no_config_fits(monkeypatch):
    """Called directly (not through the ops, which offer them only where they fit), the fused TMA functions
    check the rank against the configs that fit the operands' dtype where they autotune: in fp32 the fused
    shrink holds ranks up to 32 (64 in 16-bit dtypes), refused with the limit named, not left to the
    autotuner's empty prune; a given config is the caller's to size."""
    # as on a card (no explicit test blocks); a given config still counts as the caller's to size
    monkeypatch.setattr(T, "fits_itemsize", lambda t, config=None: 2 if config is not None else t.element_size())
    x, w, b, a, bb, dy = _make(40, 64, 48, 64, torch.float32)
    with pytest.raises(ValueError, match=r"rank 64 is above what its configs hold for torch.float32 \(at most 32\)"):
        T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=bb.t())
    with pytest.raises(ValueError, match=r"rank 64 is above what its configs hold for torch.float32 \(at most 32\)"):
        T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=bb)
    y, _ = T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=bb.t(), config=dict(T._TEST_CONFIG))
    assert y.shape == (40, 48)

