"""Sparse-delta kernels (triton backend) against the float64 reference: ``sparse_delta_linear`` and RoSA's
``lora_sparse_linear``, forward and every gradient, both delta formats, both GEMM variants, every SDDMM,
the plan, the saved-tensor budget and the registered ops. Runs under TRITON_INTERPRET=1 on CPU tensors
(small odd shapes) and on CUDA where present; tests marked ``gpu`` need a GPU."""
import itertools

import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import DTYPES, assert_close_report, lora_inputs, triton_backend_device  # noqa: E402
from fastpeft.functional import lora_sparse_linear, sparse_delta_linear  # noqa: E402

DEV = triton_backend_device()
# the reference backend on CPU tensors runs the oracle (reference.py, the kernels' Philox masks), not the CPU path
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import sparse_delta as SD  # noqa: E402
from fastpeft.ops import sparse as OS  # noqa: E402
from fastpeft.ops.sparse import SparsePlan, build_sparse_plan  # noqa: E402

# (M, in, out): odd sizes; with b = 16 / 32 the bottom / right blocks of 80 x 130 and 48 x 80 are clipped.
SHAPES = [(1, 80, 48), (7, 130, 80), (33, 80, 48)]


def _delta(out_f, in_f, b, density=0.1, seed=0, nnz=None):
    """Sorted unique indices and fp64 values: flat entries (b = 1) or b x b blocks (edge blocks included)."""
    g = torch.Generator().manual_seed(seed)
    rb, cb = -(-out_f // b), -(-in_f // b)
    total = rb * cb
    n = nnz if nnz is not None else max(1, round(density * total))
    flat = torch.randperm(total, generator=g)[:n].sort().values
    if b == 1:
        return flat.to(DEV), torch.randn(n, generator=g, dtype=torch.float64).to(DEV)
    if nnz is None:  # always one block on the clipped corner, so the clipping is tested
        flat = torch.unique(torch.cat([flat[:-1], torch.tensor([total - 1])]))
        n = flat.numel()
    idx = torch.stack([flat // cb, flat % cb], 1).to(torch.int32)
    return idx.to(DEV), torch.randn(n, b, b, generator=g, dtype=torch.float64).to(DEV)


def _make(m, k, n, r=8, bias=True, seed=0, lead=()):
    inputs = lora_inputs(torch.Generator().manual_seed(seed), m, k, n, r, bias, lead)
    return [t.to(DEV) if t is not None else None for t in inputs]


def _run(backend, dtype, x, w, bias, idx, vals, b, dy, lora=None, grads_wb=False, plan=None):
    """Output and gradients (x, values[, A, B][, W, b]) of one call, on copies in ``dtype``."""
    cast = [t.detach().to(dtype) if t is not None else None for t in (x, w, bias, vals)]
    x, w, bias, vals = cast
    x.requires_grad_()
    vals.requires_grad_()
    w.requires_grad_(grads_wb)
    if bias is not None:
        bias.requires_grad_(grads_wb)
    inputs = [x, vals]
    if lora is None:
        y = sparse_delta_linear(x, w, bias, idx, vals, b, backend=backend, plan=plan)
    else:
        a, bb, s, p, seed = lora
        a, bb = (t.detach().to(dtype).requires_grad_() for t in (a, bb))
        inputs += [a, bb]
        y = lora_sparse_linear(x, w, bias, a, bb, s, idx, vals, b, dropout_p=p, seed=seed, backend=backend, plan=plan)
    if grads_wb:
        inputs += [w] + ([bias] if bias is not None else [])
    return [y] + list(torch.autograd.grad(y, inputs, dy.to(dtype)))


def _amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _check(case, dtype, x, w, bias, idx, vals, b, lora=None, grads_wb=False, plan=None):
    """fp32: close to fp64 (rtol 1e-5). fp16/bf16: error vs fp64 at most 2x PyTorch's own in that dtype."""
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64).to(DEV)
    names = ["y", "dx", "dvalues"] + (["dA", "dB"] if lora is not None else []) + (["dW", "db"] if grads_wb else [])
    got = _run("triton", dtype, x, w, bias, idx, vals, b, dy, lora, grads_wb, plan)
    exact = _run("reference", torch.float64, x, w, bias, idx, vals, b, dy, lora, grads_wb)
    assert len(got) == len(exact) == len(names) - (bias is None and grads_wb)
    if dtype == torch.float32:
        for name, g, e in zip(names, got, exact):
            assert g.dtype == torch.float32 and g.shape == e.shape, (name, g.dtype, g.shape, e.shape)
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, _amax(e)), what=f"{case} {name}")
        return
    torch_low = _run("reference", dtype, x, w, bias, idx, vals, b, dy, lora, grads_wb)
    for name, g, e, t in zip(names, got, exact, torch_low):
        assert g.dtype == dtype and g.shape == e.shape, (name, g.dtype, g.shape, e.shape)
        err, torch_err, tiny = _amax(g.double() - e), _amax(t.double() - e), 1e-3 * _amax(e)
        assert err <= 2 * torch_err + tiny, f"{case} {name}: kernel error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


# ---- sparse delta alone -----------------------------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b", [1, 16, 32], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_sparse_delta_forward_and_gradients(m, k, n, b, dt):
    x, w, bias, _, _ = _make(m, k, n)
    idx, vals = _delta(n, k, b, density=0.1 if b == 1 else 0.3, seed=m)
    _check(f"M{m}-K{k}-N{n}-b{b}-{dt}", DTYPES[dt], x, w, bias, idx, vals, b)


@pytest.mark.parametrize("gemm", ["fused", "dense"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("b", [16, 32], ids=lambda b: f"b{b}")
def test_both_gemm_variants(monkeypatch, b, dt, gemm):
    """The block-fused GEMM and densify + matmul give the same numbers (forward and dX), also for RoSA."""
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", gemm)
    calls = []
    for name in ("block_gemm_op", "densify_op"):
        real = getattr(SD, name)
        monkeypatch.setattr(SD, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    x, w, bias, a, bb = _make(33, 130, 80)
    idx, vals = _delta(80, 130, b, density=0.4, seed=b)
    _check(f"{gemm}-b{b}-{dt}", DTYPES[dt], x, w, bias, idx, vals, b)
    _check(f"rosa-{gemm}-b{b}-{dt}", DTYPES[dt], x, w, bias, idx, vals, b, lora=(a, bb, 0.5, 0.2, 7))
    assert set(calls) == {"block_gemm_op" if gemm == "fused" else "densify_op"}, calls


# ---- the TMA sparse GEMM (sm_90+; the interpreter runs tensor descriptors) ----------------------------------

from fastpeft.kernels import lora_tma as KT  # noqa: E402

needs_tma = pytest.mark.skipif(not KT.tma_supported(DEV), reason="needs sm_90+ and triton tensor descriptors")
# in / out multiples of 8 (TMA rows); with b = 32 / 64 the bottom / right blocks are clipped
TMA_SHAPES = [(1, 80, 48), (33, 136, 80), (100, 48, 136)]


@needs_tma
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b", [16, 32, 64], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("m,k,n", TMA_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in TMA_SHAPES])
def test_tma_gemm_forward_and_gradients(monkeypatch, m, k, n, b, dt):
    """FASTPEFT_SPARSE_GEMM=tma: the forward and dX on the TMA GEMM with Δ's blocks as more MMAs, as the
    reference gives them (fp32 to 1e-5; fp16 / bf16 within 2x PyTorch's error), for the delta alone and for
    RoSA with dropout (the LoRA epilogue, masked in dX); every gradient."""
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "tma")
    calls = []
    real = SD.sparse_block_gemm_tma
    monkeypatch.setattr(SD, "sparse_block_gemm_tma", lambda *a, **kw: calls.append(a[8]) or real(*a, **kw))
    x, w, bias, a, bb = _make(m, k, n)
    idx, vals = _delta(n, k, b, density=0.3, seed=m + b)
    _check(f"tma-M{m}-b{b}-{dt}", DTYPES[dt], x, w, bias, idx, vals, b)
    assert calls == [True, False]  # the forward, then dX
    if m == 33 or dt == "bf16":
        _check(f"tma-rosa-M{m}-b{b}-{dt}", DTYPES[dt], x, w, bias, idx, vals, b, lora=(a, bb, 0.5, 0.2, 7))
        assert calls[2:] == [True, False]


@needs_tma
def test_tma_gemm_kernel_edges():
    """The launcher alone: no block, a block on every block row of a tile (several MMAs into one accumulator),
    values in fp32 beside bf16 operands, a tile narrower than a block (BLOCK_N 32, b 64), the masked LoRA
    epilogue against the block-fused pointer kernel, and its refusals."""
    x, w, bias, a, bb = _make(37, 64, 96)
    x, w, bias = (t.float() for t in (x, w, bias))
    rb = 6
    idx = torch.tensor([[r, c] for r in range(rb) for c in (0, 3) if (r + c) % 2 == 0], dtype=torch.int32, device=DEV)
    vals = torch.randn(idx.shape[0], 16, 16, device=DEV)
    plan = build_sparse_plan(idx, 96, 64, 16)
    want = x @ SD.sparse_densify(w, idx, vals, 16, torch.float32).t() + bias
    for cfg in (None, dict(KT._TEST_CONFIG, BLOCK_N=64), dict(KT._TEST_CONFIG, BLOCK_N=32, BLOCK_K=16)):
        y = SD.sparse_block_gemm_tma(x, w, plan.csr_rows, vals, None, None, bias, 16, True, config=cfg)
        assert_close_report(y, want, rtol=1e-5, atol=1e-5, what=f"blocks {cfg}")
    empty = build_sparse_plan(idx[:0], 96, 64, 16)
    y0 = SD.sparse_block_gemm_tma(x, w, empty.csr_rows, vals[:0], None, None, bias, 16, True)
    assert_close_report(y0, x @ w.t() + bias, rtol=1e-5, atol=1e-5, what="no block")
    # b 64 over tiles of 32 columns; bf16 operands, fp32 values
    idx64, vals64 = _delta(96, 64, 64, nnz=2, seed=3)
    p64 = build_sparse_plan(idx64, 96, 64, 64)
    xb, wb = x.bfloat16(), w.bfloat16()
    got = SD.sparse_block_gemm_tma(xb, wb, p64.csr_rows, vals64.float(), None, None, None, 64, True)
    exact = x.double() @ (SD.sparse_densify(w.double(), idx64, vals64, 64, torch.float64)).t()
    low = (xb @ SD.sparse_densify(wb, idx64, vals64.bfloat16(), 64, torch.bfloat16).t()).double()
    assert _amax(got.double() - exact) <= 2 * _amax(low - exact) + 1e-3 * _amax(exact)
    # RoSA's masked dX epilogue: the pointer kernel's numbers
    dy = torch.randn(37, 96, device=DEV)
    v = torch.randn(37, 8, device=DEV)
    thr = 429496730
    ref = SD.sparse_block_gemm(dy, w, plan.block_map, vals, v, a.float(), None, 16, False, 0.7, 5, thr)
    for cfg in (None, dict(KT._TEST_CONFIG, BLOCK_N=128), dict(KT._TEST_CONFIG, BLOCK_N=256)):  # halves, quarters
        got = SD.sparse_block_gemm_tma(dy, w, plan.csr_cols, vals, v, a.float(), None, 16, False, scale=0.7, seed=5,
                                       threshold=thr, config=cfg)
        assert_close_report(got, ref, rtol=1e-5, atol=1e-5, what=f"masked LoRA epilogue {cfg}")
    with pytest.raises(ValueError, match="block_size must be 16, 32 or 64, got 128"):
        SD.sparse_block_gemm_tma(x, w, plan.csr_rows, vals, None, None, None, 128, True)
    with pytest.raises(ValueError, match="K and N must be multiples of 8 for torch.float16"):
        SD.sparse_block_gemm_tma(x[:, :60].half(), w[:, :60].half(), plan.csr_rows, vals, None, None, None, 16, True)


def test_block_csr_and_the_plan():
    """block_csr groups the blocks by block row (or column) in order along the other, ids pointing back into
    the indices; the plan holds both for b 16..64 and neither for other b."""
    idx = torch.tensor([[0, 2], [0, 5], [2, 1], [3, 2], [3, 4]], dtype=torch.int32)
    ptr, ent = SD.block_csr(idx, 4, 6, by_col=False)
    assert ptr.tolist() == [0, 2, 2, 3, 5] and ent.tolist() == [[2, 0], [5, 1], [1, 2], [2, 3], [4, 4]]
    ptr, ent = SD.block_csr(idx, 4, 6, by_col=True)
    assert ptr.tolist() == [0, 0, 1, 3, 3, 4, 5] and ent.tolist() == [[2, 2], [0, 0], [3, 3], [3, 4], [0, 1]]
    for b, has in ((16, True), (64, True), (128, False), (24, False)):
        plan = build_sparse_plan(idx.to(DEV), 4 * b, 6 * b, b)
        assert (plan.csr_rows is not None) == (plan.csr_cols is not None) == has, b
        assert (plan.block_map is not None) == SD.fused_gemm_ok(b)


@needs_tma
def test_forced_tma_where_it_cannot_run(monkeypatch):
    """FASTPEFT_SPARSE_GEMM=tma where the TMA GEMM is not offered (in_features 130: not whole TMA rows; b 128):
    a ValueError naming what is offered."""
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "tma")
    for k, b in ((130, 16), (256, 128)):
        x, w, bias, _, _ = (t.float() for t in _make(5, k, 48 if b == 16 else 256))
        idx, vals = _delta(w.shape[0], k, b, nnz=1)
        vals = vals.float()
        with pytest.raises(ValueError, match=r"'tma' is forced but cannot run here; offered: \('fused', 'dense'\)"):
            sparse_delta_linear(x, w, bias, idx, vals, b, backend="triton")


def test_fused_and_dense_are_the_same_bits(monkeypatch):
    """W + Δ is rounded once from fp32 in both variants, so the bf16 outputs agree to the GEMM's rounding."""
    x, w, bias, _, _ = _make(33, 80, 48)
    idx, vals = _delta(48, 80, 16, density=0.5)
    x, w, bias, vals = (t.to(torch.bfloat16) for t in (x, w, bias, vals))
    w2 = SD.sparse_densify(w, idx, vals, 16, torch.bfloat16)
    torch.testing.assert_close(w2, SD.sparse_block_gemm(torch.eye(80, dtype=torch.bfloat16, device=DEV), w,
                                                        build_sparse_plan(idx, 48, 80, 16).block_map, vals, None,
                                                        None, None, 16, True, 1.0, 0, 0).t(), rtol=0, atol=0)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("how", ["tile32", "tile64", "gather"])
def test_every_sddmm(monkeypatch, how, dt):
    """dvalues of flat entries by 32 x 32 tiles, 64 x 64 tiles (persistent programs, split over M) and the
    gather-dot, on a delta that leaves many tiles empty."""
    monkeypatch.setenv("FASTPEFT_SPARSE_SDDMM", "gather" if how == "gather" else "tile")
    x, w, bias, _, _ = _make(33, 130, 80)
    idx, vals = _delta(80, 130, 1, density=0.02, seed=3)
    plan = build_sparse_plan(idx, 80, 130, 1, tile=64 if how == "tile64" else 32)
    empty = plan.tile_list.numel() - int(plan.tile_count)
    assert empty > 0, "the case must have empty tiles"
    _check(f"{how}-{dt}", DTYPES[dt], x, w, bias, idx, vals, 1, plan=plan)


def test_entries_in_one_corner_only():
    """All entries in one tile of W (every other tile empty), and a delta with a single entry."""
    x, w, bias, _, _ = _make(7, 130, 80)
    rows, cols = torch.meshgrid(torch.arange(70, 80), torch.arange(120, 130), indexing="ij")
    idx = (rows * 130 + cols).flatten().to(DEV)
    vals = torch.randn(idx.numel(), dtype=torch.float64, device=DEV)
    _check("corner", torch.float32, x, w, bias, idx, vals, 1)
    _check("single", torch.float32, x, w, bias, torch.tensor([80 * 130 - 1], device=DEV),
           torch.tensor([0.7], dtype=torch.float64, device=DEV), 1)
    idx_b, vals_b = _delta(80, 130, 32, nnz=1)
    _check("single-block", torch.float32, x, w, bias, idx_b, vals_b, 32)


@pytest.mark.parametrize("b", [1, 16], ids=lambda b: f"b{b}")
def test_empty_delta(b):
    x, w, bias, a, bb = _make(7, 80, 48)
    idx = torch.zeros((0,) if b == 1 else (0, 2), dtype=torch.int64, device=DEV)
    vals = torch.zeros((0,) if b == 1 else (0, b, b), dtype=torch.float64, device=DEV)
    _check(f"nnz0-b{b}", torch.float32, x, w, bias, idx, vals, b)
    _check(f"rosa-nnz0-b{b}", torch.float32, x, w, bias, idx, vals, b, lora=(a, bb, 2.0, 0.1, 3))


@pytest.mark.parametrize("b", [8, 24], ids=lambda b: f"b{b}")
def test_block_sizes_the_fused_gemm_does_not_take(b):
    """b < 16 or not a power of two: densify + matmul, and the block SDDMM on padded sub-tiles."""
    x, w, bias, _, _ = _make(7, 130, 80)
    idx, vals = _delta(80, 130, b, density=0.3, seed=b)
    assert build_sparse_plan(idx, 80, 130, b).block_map is None
    _check(f"b{b}", torch.float32, x, w, bias, idx, vals, b)


def test_blocks_split_into_sub_tiles():
    """A 32 x 32 block handled by four 16 x 16 programs (as 128 x 128 blocks are by 64 x 64 ones on GPUs)."""
    old = SD.set_test_blocks(SUB=16)
    try:
        x, w, bias, _, _ = _make(33, 130, 80)
        idx, vals = _delta(80, 130, 32, density=0.3)
        _check("sub16", torch.float32, x, w, bias, idx, vals, 32)
    finally:
        SD.set_test_blocks(**old)


@pytest.mark.parametrize("b", [1, 32], ids=lambda b: f"b{b}")
def test_weight_and_bias_gradients_when_required(b):
    x, w, bias, a, bb = _make(33, 80, 48)
    idx, vals = _delta(48, 80, b, density=0.2)
    _check(f"dW-db-b{b}", torch.float32, x, w, bias, idx, vals, b, grads_wb=True)
    _check(f"rosa-dW-db-b{b}", torch.float32, x, w, bias, idx, vals, b, lora=(a, bb, 0.5, 0.1, 2), grads_wb=True)


def test_no_bias_leading_dims_and_noncontiguous_input():
    x, w, _, a, bb = _make(5, 48, 40, lead=(2, 3))
    idx, vals = _delta(40, 48, 16, density=0.5)
    _check("lead", torch.float32, x, w, None, idx, vals, 16)
    xt = x.transpose(0, 1)  # (3, 2, 5, 48), not contiguous
    assert not xt.is_contiguous()
    _check("transposed", torch.float32, xt, w, None, idx, vals, 16, lora=(a, bb, 1.0, 0.1, 5))
    xs = torch.randn(9, 96, dtype=torch.float64, device=DEV)[:, ::2]  # strided last dim
    idx1, vals1 = _delta(40, 48, 1, density=0.1)
    _check("strided", torch.float32, xs, w, None, idx1, vals1, 1)


def test_empty_batch():
    x, w, bias, _, _ = _make(0, 48, 40)
    for b in (1, 16):
        idx, vals = _delta(40, 48, b, density=0.3)
        x0, v0 = x.float().requires_grad_(), vals.float().requires_grad_()
        y = sparse_delta_linear(x0, w.float(), bias.float(), idx, v0, b, backend="triton")
        assert y.shape == (0, 40)
        y.sum().backward()
        assert x0.grad.shape == (0, 48) and bool((v0.grad == 0).all())


# ---- RoSA: LoRA and a sparse delta in one op ----------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("b", [1, 16, 32], ids=lambda b: f"b{b}")
def test_rosa_forward_and_every_gradient(b, dt, p):
    m, k, n, r = (7, 130, 80, 8) if b != 16 else (33, 80, 48, 16)
    x, w, bias, a, bb = _make(m, k, n, r)
    idx, vals = _delta(n, k, b, density=0.1 if b == 1 else 0.3, seed=b)
    _check(f"rosa-M{m}-K{k}-N{n}-r{r}-b{b}-{dt}-p{p}", DTYPES[dt], x, w, bias, idx, vals, b,
           lora=(a, bb, 0.75, p, 1234))


def test_rosa_uses_the_lora_gemm_variants(monkeypatch):
    """On the dense path the LoRA GEMM of kernels/lora.py runs on W + Δ, fused or cuBLAS + update."""
    x, w, bias, a, bb = _make(33, 80, 48)
    idx, vals = _delta(48, 80, 1, density=0.1)
    monkeypatch.setenv("FASTPEFT_SPARSE_PATH", "kernels")  # on a GPU the floor could otherwise take torch
    for lora_gemm in ("fused", "cublas"):
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", lora_gemm)
        _check(f"rosa-{lora_gemm}", torch.float32, x, w, bias, idx, vals, 1, lora=(a, bb, 0.5, 0.3, 11))


def test_rosa_dropout_leaves_the_delta_gradient_alone():
    """dvalues come from the undropped x: the same with and without dropout on the LoRA branch."""
    x, w, bias, a, bb = _make(33, 80, 48)
    idx, vals = _delta(48, 80, 1, density=0.1)
    dy = torch.randn(33, 48, device=DEV, dtype=torch.float64)
    g0 = _run("triton", torch.float32, x, w, bias, idx, vals, 1, dy, lora=(a, bb, 1.0, 0.0, 1))
    g1 = _run("triton", torch.float32, x, w, bias, idx, vals, 1, dy, lora=(a, bb, 1.0, 0.5, 1))
    torch.testing.assert_close(g0[2], g1[2], rtol=0, atol=0)
    assert not torch.equal(g0[1], g1[1])


# ---- RoSA's backward with v and dB from one read of dY ("kernels-dy1") ---------------------------------

def _force_dy1(monkeypatch):
    """RoSA's backward on "kernels-dy1" wherever it is offered (FASTPEFT_SPARSE_PATH does not force it);
    every other choice as auto makes it. Returns the candidate names each RoSA backward was offered and
    one entry per dY pass run."""
    monkeypatch.setenv("FASTPEFT_SPARSE_PATH", "auto")
    offered, passes = [], []
    real_choose, real_pass = OS.choose_path, K.dy_pass_op

    def choose(key, run, device):
        if key[0] == "rosa-path-bwd":
            offered.append(tuple(run))
            if "kernels-dy1" in run:
                return "kernels-dy1"
        return real_choose(key, run, device)
    monkeypatch.setattr(OS, "choose_path", choose)
    monkeypatch.setattr(K, "dy_pass_op", lambda *a, **kw: passes.append(1) or real_pass(*a, **kw))
    return offered, passes


# (block size, M, in, out, rank): flat entries at M 1 and 33; 16 x 16 blocks clipped at 80 x 130's edges (the
# fused GEMM); 32 x 32 blocks clipped at 48 x 80's.
DY1_CASES = [(1, 1, 80, 48, 8), (1, 33, 130, 80, 16), (16, 7, 130, 80, 8), (32, 33, 80, 48, 16)]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("b,m,k,n,r", DY1_CASES, ids=[f"b{b}-M{m}-K{k}-N{n}-r{r}" for b, m, k, n, r in DY1_CASES])
def test_rosa_one_dy_pass_backward(monkeypatch, b, m, k, n, r, dt, p):
    """"kernels-dy1" forced: the output and every gradient (x, values, A, B, W, bias) are the reference's,
    from one dY pass per backward, and a second run gives the same bits (fixed-order partial sums)."""
    offered, passes = _force_dy1(monkeypatch)
    x, w, bias, a, bb = _make(m, k, n, r)
    idx, vals = _delta(n, k, b, density=0.1 if b == 1 else 0.3, seed=b)
    lora = (a, bb, 0.75, p, 1234)
    _check(f"rosa-dy1-b{b}-M{m}-K{k}-N{n}-r{r}-{dt}-p{p}", DTYPES[dt], x, w, bias, idx, vals, b, lora=lora,
           grads_wb=True)
    assert offered == [("kernels", "kernels-dy1", "torch")] and passes == [1], (offered, passes)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    r1, r2 = (_run("triton", DTYPES[dt], x, w, bias, idx, vals, b, dy, lora, grads_wb=True) for _ in range(2))
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))
    assert len(passes) == 3


def test_rosa_one_dy_pass_offered_exactly_where_v_and_db_are_needed(monkeypatch):
    """The backward offers "kernels-dy1" where v (for dX or dA) and dB are both needed, and only there; forced
    there, each gradient asked for is the reference's (dA alone beside dB included)."""
    offered, passes = _force_dy1(monkeypatch)
    m, k, n, r, b = 7, 80, 48, 4, 1
    x, w, bias, a, bb = (t.float() for t in _make(m, k, n, r))
    idx, vals = _delta(n, k, b, density=0.2)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(DEV)
    for need in itertools.product((False, True), repeat=4):  # x, A, B, values
        if not any(need):
            continue
        offered.clear()
        passes.clear()
        results = []
        for backend in ("triton", "reference"):
            leaves = [t.detach().float().requires_grad_(q) for t, q in zip((x, a, bb, vals), need)]
            y = lora_sparse_linear(leaves[0], w, bias, leaves[1], leaves[2], 0.5, idx, leaves[3], b, dropout_p=0.1,
                                   seed=3, backend=backend)
            results.append([y] + list(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy)))
        want = (need[0] or need[1]) and need[2]
        three = ("kernels", "kernels-dy1", "torch") if want else ("kernels", "torch")
        assert offered == [three] and len(passes) == want, (need, offered, passes)
        for i, (g, e) in enumerate(zip(*results)):
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, _amax(e)), what=f"need {need} output {i}")


# ---- plan, determinism, memory, registration ---------------------------------------------------------

def test_plan_reused_across_calls():
    x, w, bias, _, _ = _make(33, 80, 48)
    idx, vals = _delta(48, 80, 1, density=0.1)
    plan = build_sparse_plan(idx, 48, 80, 1)
    assert isinstance(plan, SparsePlan) and plan.tile == SD.choose_tile(idx.numel(), 48, 80) and plan.nnz == idx.numel()
    counts = (plan.starts[1:] - plan.starts[:-1]).long()
    assert int(plan.tile_count) == int((counts > 0).sum()) and int(counts.sum()) == idx.numel()
    assert bool((counts[plan.tile_list[: int(plan.tile_count)].long()] > 0).all())
    assert sorted(plan.order.tolist()) == list(range(idx.numel()))
    dy = torch.randn(33, 48, dtype=torch.float64, device=DEV)
    for seed in (1, 2):  # other values, same indices: the plan still holds
        v = torch.randn(vals.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEV)
        with_plan = _run("triton", torch.float32, x, w, bias, idx, v, 1, dy, plan=plan)
        without = _run("triton", torch.float32, x, w, bias, idx, v, 1, dy)
        assert all(torch.equal(p, q) for p, q in zip(with_plan, without))
    blocks, bvals = _delta(48, 80, 16, density=0.4)
    bplan = build_sparse_plan(blocks, 48, 80, 16)
    assert bplan.block_map.shape == (3, 5)
    assert sorted(bplan.block_map[bplan.block_map >= 0].tolist()) == list(range(blocks.shape[0]))
    _check("block-plan", torch.float32, x, w, bias, blocks, bvals, 16, plan=bplan)
    with pytest.raises(ValueError, match="plan was built for"):
        sparse_delta_linear(x.float(), w.float(), None, idx[:-1], vals[:-1].float(), 1, backend="triton", plan=plan)
    with pytest.raises(TypeError, match="SparsePlan"):
        sparse_delta_linear(x.float(), w.float(), None, idx, vals.float(), 1, backend="triton", plan="plan")


def test_same_inputs_same_bits():
    x, w, bias, a, bb = _make(33, 130, 80)
    dy = torch.randn(33, 80, dtype=torch.float64, device=DEV)
    for b in (1, 32):
        idx, vals = _delta(80, 130, b, density=0.2)
        r1 = _run("triton", torch.float32, x, w, bias, idx, vals, b, dy, lora=(a, bb, 1.0, 0.3, 5))
        r2 = _run("triton", torch.float32, x, w, bias, idx, vals, b, dy, lora=(a, bb, 1.0, 0.3, 5))
        assert all(torch.equal(u, v) for u, v in zip(r1, r2))  # no atomics


@pytest.mark.parametrize("gemm", ["fused", "dense", "torch"])
@pytest.mark.parametrize("b", [1, 16], ids=lambda b: f"b{b}")
def test_nothing_weight_sized_is_saved(monkeypatch, b, gemm):
    """Saved for backward: x, W itself, the values, indices and plan, (u (M, r) fp32 and A, B for RoSA);
    never W + Δ or any other W-sized tensor; also on the floor's torch composition."""
    if gemm == "torch":
        monkeypatch.setenv("FASTPEFT_SPARSE_PATH", "torch")
    else:
        monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", gemm)
    m, k, n, r = 8, 130, 80, 8
    x, w, bias, a, bb = (t.float() for t in _make(m, k, n, r))
    idx, vals = _delta(n, k, b, density=0.3)
    vals = vals.float().requires_grad_()
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    plan = build_sparse_plan(idx, n, k, b)
    own = {t.data_ptr() for t in (x, w, bias, a, bb, vals, idx) + plan.tensors() if t is not None}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for rosa in (False, True):
        for backend in ("triton", "reference"):
            saved.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if rosa:
                    lora_sparse_linear(x, w, bias, a, bb, 1.0, idx, vals, b, dropout_p=0.1, seed=1, backend=backend,
                                       plan=plan)
                else:
                    sparse_delta_linear(x, w, bias, idx, vals, b, backend=backend, plan=plan)
            big = [tuple(t.shape) for t in saved if t.numel() >= n * k and t.data_ptr() != w.data_ptr()]
            assert bool(big) == (backend == "reference"), (rosa, backend, big)  # the oracle saves W + Δ
            if backend == "triton":
                extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in own)
                assert extra <= (m * r * 4 if rosa else 0), (rosa, extra)


@pytest.mark.skipif(not K._HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck_registered_ops():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, w, bias, _, bb = (t.float() for t in _make(33, 80, 48))
    dy = torch.randn(33, 48, device=DEV)
    idx, vals = _delta(48, 80, 1, density=0.1)
    plan = build_sparse_plan(idx, 48, 80, 1)
    bidx, bvals = _delta(48, 80, 16, density=0.4)
    bplan = build_sparse_plan(bidx, 48, 80, 16)
    u = torch.randn(33, 8, device=DEV)
    ops = torch.ops.fastpeft
    torch.library.opcheck(ops.sparse_densify.default, (w, idx, vals.float(), 1, torch.float32), test_utils=tests)
    torch.library.opcheck(ops.sparse_densify.default, (w, bidx, bvals.float(), 16, torch.bfloat16), test_utils=tests)
    torch.library.opcheck(ops.sparse_block_gemm.default, (x, w, bplan.block_map, bvals.float(), u, bb.t(), bias, 16,
                                                          True, 0.5, 0, 0), test_utils=tests)
    torch.library.opcheck(ops.sparse_block_gemm.default, (dy, w, bplan.block_map, bvals.float(), None, None, None, 16,
                                                          False, 1.0, 0, 0), test_utils=tests)
    torch.library.opcheck(ops.sparse_sddmm_blocks.default, (dy, x, bidx, 16), test_utils=tests)
    torch.library.opcheck(ops.sparse_sddmm_tiles.default, (dy, x, plan.tile_list, plan.tile_count, plan.starts,
                                                           plan.order, plan.loc, plan.tile), test_utils=tests)
    torch.library.opcheck(ops.sparse_gather_dot.default, (dy, x, idx), test_utils=tests)


def test_autocast_cpu_bf16_like_linear():
    if DEV != "cpu":
        pytest.skip("CPU autocast")
    x, w, bias, a, bb = (t.float() for t in _make(7, 80, 48))
    idx, vals = _delta(48, 80, 16, density=0.4)
    vals = vals.float().requires_grad_()
    exact = fastpeft.reference.lora_sparse_linear_ref(x.double(), w.double(), bias.double(), a.double(), bb.double(),
                                                      1.0, idx, vals.double(), 16)
    for gemm in ("fused", "dense"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTPEFT_SPARSE_GEMM", gemm)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = lora_sparse_linear(x, w, bias, a, bb, 1.0, idx, vals, 16, backend="triton")
                ref = lora_sparse_linear(x, w, bias, a, bb, 1.0, idx, vals, 16, backend="reference")
        assert y.dtype == ref.dtype == torch.bfloat16
        assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3
        (g,) = torch.autograd.grad(y.float().sum(), [vals])
        assert g.dtype == torch.float32 and g.shape == vals.shape


@pytest.mark.parametrize("b", [1, 16], ids=lambda b: f"b{b}")
def test_layers_on_triton_backend(b):
    """SparseDeltaLinear and a RoSA FastLoRALinear give the reference's outputs and gradients on the
    triton backend, with the layer's cached plan reused from one call to the next."""
    torch.manual_seed(0)
    sd = fastpeft.SparseDeltaLinear(80, 48, density=0.2, block_size=b).to(DEV)
    rosa = fastpeft.FastLoRALinear(80, 48, r=8, lora_dropout=0.1, init_lora_weights=False, sparse_density=0.2,
                                   sparse_block_size=b).to(DEV)
    with torch.no_grad():
        sd.delta_values.normal_()
        for v in rosa.sparse_values.values():
            v.normal_()
    x = torch.randn(3, 7, 80, device=DEV)
    for layer in (sd, rosa):
        params = [p for p in layer.parameters() if p.requires_grad]
        results = []
        for backend in ("reference", "triton", "triton"):
            with fastpeft.use_backend(backend):
                torch.manual_seed(2)
                y = layer(x)
                results.append([y] + list(torch.autograd.grad(y.square().sum(), params)))
        for got, want in zip(results[1], results[0]):  # fp32 both: rounding apart, scaled to the largest value
            assert_close_report(got, want, rtol=1e-5, atol=1e-5 * max(1.0, _amax(want)), what=type(layer).__name__)
        assert all(torch.equal(u, v) for u, v in zip(results[1], results[2]))
        plans = layer.sparse_delta()._plan
        assert isinstance(plans.plan, SparsePlan)
    assert sd._plan.plan.block_size == b


def test_dispatch_rules(monkeypatch):
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "auto")
    cpu = torch.device("cpu")
    assert SD.choose_sparse_gemm(("k",), 1, None, None, cpu) == "dense"     # no fused GEMM for entries
    assert SD.choose_sparse_gemm(("k",), 24, None, None, cpu) == "dense"    # nor for b not a power of two
    assert SD.choose_sparse_gemm(("k",), 16, None, None, cpu) == "fused"    # interpreter / CPU: fused, untimed
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "fused")
    assert SD.choose_sparse_gemm(("k",), 8, None, None, cpu) == "dense"
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "auto")
    monkeypatch.setattr(SD, "INTERPRET", False)
    monkeypatch.setattr(K, "INTERPRET", False)  # the timed choice itself lives in kernels/lora.py
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert SD.choose_sparse_gemm(("k",), 32, None, None, torch.device("cuda")) == "dense"  # pinned, not timed
    finally:
        torch.use_deterministic_algorithms(old)
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "fastest")
    with pytest.raises(ValueError, match="FASTPEFT_SPARSE_GEMM must be one of"):
        SD.gemm_mode()
    monkeypatch.setenv("FASTPEFT_SPARSE_SDDMM", "auto")
    assert SD.choose_sddmm(4000, 4096, 4096) == "gather"       # 0.024%: under a quarter entry per 32 x 32 tile
    assert SD.choose_sddmm(16777, 4096, 4096) == "tile"        # 0.1%
    assert SD.choose_tile(16777, 4096, 4096) == 32 and SD.choose_tile(167772, 4096, 4096) == 64  # 0.1%, 1%
    monkeypatch.setenv("FASTPEFT_SPARSE_SDDMM", "slow")
    with pytest.raises(ValueError, match="FASTPEFT_SPARSE_SDDMM must be one of"):
        SD.choose_sddmm(1, 8, 8)
    with pytest.raises(ValueError, match="tile must be"):
        build_sparse_plan(torch.tensor([0]), 8, 8, 1, tile=48)


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 32], ids=lambda b: f"b{b}")
def test_gpu_llm_shape_matches_reference(b):
    x, w, bias, a, bb = _make(2048, 4096, 4096, 16)
    idx, vals = _delta(4096, 4096, b, density=0.01)
    _check(f"gpu-b{b}", torch.bfloat16, x, w, bias, idx, vals, b)
    _check(f"gpu-rosa-b{b}", torch.bfloat16, x, w, bias, idx, vals, b, lora=(a, bb, 2.0, 0.1, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 32], ids=lambda b: f"b{b}")
def test_gpu_torch_compile_fullgraph(b):
    torch._dynamo.reset()
    x, w, bias, a, bb = (t.to(torch.bfloat16) for t in _make(256, 512, 384, 16))
    idx, vals = _delta(384, 512, b, density=0.05)
    vals = vals.to(torch.bfloat16).requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()

    def f(x, a, bb, vals):
        return fastpeft.functional.lora_sparse_linear(x, w, bias, a, bb, 2.0, idx, vals, b, dropout_p=0.1, seed=3,
                                                      backend="triton", check=False)

    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x, a, bb, vals)
    torch.testing.assert_close(y, f(x, a, bb, vals))
    y.float().sum().backward()
    assert a.grad is not None and bb.grad is not None and vals.grad is not None


@pytest.mark.gpu
@needs_tma
def test_gpu_tma_sparse_gemm_llm_shape(monkeypatch):
    """The TMA sparse GEMM forced at an LLM shape (the real persistent grid): 1 % of 32 x 32 blocks, alone and
    as RoSA with dropout, forward and every gradient as the reference gives them. Explicit blocks
    (FASTPEFT_AUTOTUNE=0): autotuning its four variants would take most of device_check's test step; the
    benches tune it."""
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "tma")
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "0")
    x, w, bias, a, bb = _make(2048, 4096, 4096, 16)
    idx, vals = _delta(4096, 4096, 32, density=0.01)
    _check("gpu-tma-b32", torch.bfloat16, x, w, bias, idx, vals, 32)
    _check("gpu-tma-rosa-b32", torch.bfloat16, x, w, bias, idx, vals, 32, lora=(a, bb, 2.0, 0.1, 1))


@needs_tma
def test_tma_not_offered_for_rosa_ranks_above_64(monkeypatch):
    """RoSA at rank 65 (R_PAD 128, no config): the GEMM choice is offered fused and dense only."""
    seen = []
    real = SD.choose_sparse_gemm
    monkeypatch.setattr(SD, "choose_sparse_gemm", lambda *a, **kw: seen.append(kw.get("run_tma")) or real(*a, **kw))
    x, w, bias, a, bb = (t.float() for t in _make(5, 48, 80, 65))
    idx, vals = _delta(80, 48, 16, nnz=2)
    for r in (65, 64):
        seen.clear()
        lora_sparse_linear(x, w, bias, a[:r], bb[:, :r], 1.0, idx, vals.float(), 16, backend="triton")
        assert (seen[0] is None) == (r == 65), r
