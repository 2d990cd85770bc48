"""Many adapters in one batch (triton backend of ``lora_linear_multi``) against the float64 reference:
forward, every gradient, heterogeneous ranks, -1 rows, dropout, the device-side grouping, saved
tensors, op registration. Runs under TRITON_INTERPRET=1 on CPU tensors (small odd shapes) and on CUDA
where present; tests marked ``gpu`` need a GPU."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import DTYPES, assert_close_report, triton_backend_device  # noqa: E402

# The kernels are compared with the reference backend: on CPU tensors it must draw the kernels' Philox masks
# (the oracle), not the CPU path's own stream.
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")
from fastpeft.reference import dropout_mask, dropout_threshold, lora_linear_multi_ref  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import multi_lora as MK  # noqa: E402
from fastpeft.ops.multi import lora_linear_multi_triton  # noqa: E402


def _make(m, k, n_out, ranks, dtype, bias=True, seed=0, lead=(), pad_garbage=True):
    """x (*lead, m, k), weight, bias, stacks (n, r_max, k) / (n, n_out, r_max), scalings (n,), ranks (n,).

    With ``pad_garbage`` the stacks hold random values past each adapter's rank: they must never count."""
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    x = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(n, r_max, k, generator=g, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(n, n_out, r_max, generator=g, dtype=torch.float64) / r_max ** 0.5
    if not pad_garbage:
        for i, r in enumerate(ranks):
            a[i, r:] = 0
            bb[i, :, r:] = 0
    s = torch.linspace(0.5, 2.0, n, dtype=torch.float32).to(DEV)
    rk = torch.tensor(ranks, device=DEV)
    return [t.to(DEV, dtype) if t is not None else None for t in (x, w, b, a, bb)] + [s, rk]


def _ids(shape, n, seed=1, base_rows=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1 if base_rows else 0, n, shape, generator=g).to(DEV)


def _run(backend, x, w, b, a, bb, s, ids, ranks, p, seed, dy, grads_wb=False):
    """Output and gradients (x, A stack, B stack[, W, b]) of one call, on copies that require grad."""
    x, a, bb = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    w = w.detach().clone().requires_grad_(grads_wb)
    b = b.detach().clone().requires_grad_(grads_wb) if b is not None else None
    y = fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, ranks, backend=backend, dropout_p=p, seed=seed)
    inputs = [x, a, bb] + ([w] + ([b] if b is not None else []) if grads_wb else [])
    return [y] + list(torch.autograd.grad(y, inputs, dy))


def _dy(x, n_out):
    g = torch.Generator().manual_seed(9)
    return torch.randn(*x.shape[:-1], n_out, generator=g, dtype=torch.float64).to(x.device, x.dtype)


def _check_against_reference(case, x, w, b, a, bb, s, ranks, ids, p=None, seed=0, grads_wb=False):
    """fp32: close to fp64 (rtol 1e-5). fp16/bf16: error vs fp64 at most 2x PyTorch's own in that dtype."""
    dy = _dy(x, w.shape[0])
    got = _run("triton", x, w, b, a, bb, s, ids, ranks, p, seed, dy, grads_wb)
    exact = _run("reference", *(t.double() if t is not None else None for t in (x, w, b, a, bb)), s, ids, ranks, p,
                 seed, dy.double(), grads_wb)
    names = ["y", "dx", "dA", "dB", "dW", "db"]
    if x.dtype == torch.float32:
        for name, g, e in zip(names, got, exact):
            assert g.dtype == torch.float32 and g.shape == e.shape, name
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), what=f"{case} {name}")
        return
    torch_low = _run("reference", x, w, b, a, bb, s, ids, ranks, p, seed, dy, grads_wb)
    for name, g, e, t in zip(names, got, exact, torch_low):
        assert g.dtype == x.dtype and g.shape == e.shape, name
        err = (g.double() - e).abs()
        torch_err = (t.double() - e).abs().max().item()
        tiny = 1e-3 * e.abs().max().item()
        if err.max().item() > 2 * torch_err + tiny:
            idx = int(err.argmax())
            pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))
            raise AssertionError(f"{case} {name}: kernel error {err.max().item():.3g} > 2 x PyTorch's "
                                 f"{torch_err:.3g} at {pos}: got {g.flatten()[idx].item():.6g}, "
                                 f"expected {e.flatten()[idx].item():.6g}")


# (case id, m, k, n_out, ranks, lead dims, per-sequence ids, dropout rates or None, bias, grads of W and b)
CASES = [
    ("M37-K80-N48-r1.8.16.24-base_rows", 37, 80, 48, [1, 8, 16, 24], (), False, None, True, True),
    ("M33-K48-N80-r1.8.16.24-p0.1.0.0.3.0.5", 33, 48, 80, [1, 8, 16, 24], (), False, [0.1, 0.0, 0.3, 0.5], False,
     False),
    ("B3xT7-K48-N40-r8.16.4-per_seq-p0.2", 7, 48, 40, [8, 16, 4], (3,), True, [0.2, 0.2, 0.2], True, False),
    ("M7-K48-N33-r1..24-row_per_adapter", 7, 48, 33, [1, 3, 8, 13, 16, 20, 24], (), False, None, True, False),
]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_every_gradient(case, dt):
    name, m, k, n_out, ranks, lead, per_seq, p, bias, grads_wb = case
    x, w, b, a, bb, s, rk = _make(m, k, n_out, ranks, DTYPES[dt], bias, lead=lead)
    n = len(ranks)
    if name.endswith("row_per_adapter"):
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(3)).to(DEV)  # each row its own
    elif per_seq:
        ids = torch.tensor([2, -1, 0], device=DEV)  # one id per sequence of x (3, 7, K)
    else:
        ids = _ids(x.shape[:-1], n)
    pt = torch.tensor(p, device=DEV) if p is not None else None
    _check_against_reference(f"{name}-{dt}", x, w, b, a, bb, s, rk, ids, pt, seed=1234, grads_wb=grads_wb)


def test_ranks_none_noncontiguous_x_and_no_base_rows():
    x, w, b, a, bb, s, _ = _make(5, 48, 40, [16, 16], torch.float32, lead=(2, 3))
    ids = _ids(x.shape[:-1], 2, base_rows=False)
    _check_against_reference("ranks=None", x, w, b, a, bb, s, None, ids)
    xt, it = x.transpose(0, 1), ids.transpose(0, 1)  # (3, 2, 5, 48), not contiguous
    assert not xt.is_contiguous()
    _check_against_reference("transposed", xt, w, b, a, bb, s, None, it, torch.tensor([0.1, 0.4], device=DEV), 5)
    xs = torch.randn(9, 96, device=DEV)[:, ::2]  # strided last dim
    _check_against_reference("strided", xs, w, b, a, bb, s, None, _ids((9,), 2))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_all_rows_on_one_adapter_is_lora_linear(p):
    """n=1, and n=3 with every row on adapter 1 (rank 8 of r_max 16), equal the single-adapter op."""
    for ranks, i in (([16], 0), ([4, 8, 16], 1)):
        x, w, b, a, bb, s, rk = _make(21, 48, 40, ranks, torch.float32)
        r, scale = ranks[i], float(s[i])
        ids = torch.full((21,), i, device=DEV)
        dy = _dy(x, 40)
        pt = torch.full((len(ranks),), p, device=DEV)
        y_m, dx_m, da_m, db_m = _run("triton", x, w, b, a, bb, s, ids, rk, pt, 17, dy)
        xs, ai, bi = (t.detach().clone().requires_grad_() for t in (x, a[i, :r], bb[i, :, :r]))
        y_1 = fastpeft.lora_linear(xs, w, b, ai, bi, scale, dropout_p=p, seed=17, backend="triton")
        dx_1, da_1, db_1 = torch.autograd.grad(y_1, (xs, ai, bi), dy)
        for what, got, want in (("y", y_m, y_1), ("dx", dx_m, dx_1), ("dA", da_m[i, :r], da_1),
                                ("dB", db_m[i, :, :r], db_1)):
            assert_close_report(got, want, rtol=1e-5, atol=1e-5, what=f"n={len(ranks)} {what}")
        assert not da_m[i, r:].any() and not db_m[i, :, r:].any()
        others = [j for j in range(len(ranks)) if j != i]
        assert not da_m[others].any() and not db_m[others].any()


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_single_row(dt):
    x, w, b, a, bb, s, rk = _make(1, 48, 40, [8, 2], DTYPES[dt])
    _check_against_reference(f"M1-{dt}", x, w, b, a, bb, s, rk, torch.tensor([1], device=DEV),
                             torch.tensor([0.0, 0.3], device=DEV), seed=2)


def test_empty_batch():
    x, w, b, a, bb, s, rk = _make(0, 48, 40, [8, 4], torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    y = fastpeft.lora_linear_multi(x, w, b, a, bb, s, torch.zeros(0, dtype=torch.long, device=DEV), rk,
                                   backend="triton")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert x.grad.shape == (0, 48)
    assert a.grad.shape == a.shape and not a.grad.any() and not bb.grad.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf row, on purpose
def test_padded_ranks_never_count_and_get_zero_gradients():
    """Values past r_a in the stacks do not change y, and their gradients are exactly zero."""
    ranks = [1, 8, 16, 24]
    args = _make(37, 48, 40, ranks, torch.float32)
    clean = _make(37, 48, 40, ranks, torch.float32, pad_garbage=False)
    ids = _ids((37,), 4)
    dy = _dy(args[0], 40)
    p = torch.tensor([0.1, 0.2, 0.0, 0.3], device=DEV)
    got = _run("triton", *args[:5], args[5], ids, args[6], p, 3, dy)
    got_clean = _run("triton", *clean[:5], clean[5], ids, clean[6], p, 3, dy)
    for u, v in zip(got, got_clean):
        assert torch.equal(u, v)
    da, db = got[2], got[3]
    for i, r in enumerate(ranks):
        assert torch.count_nonzero(da[i, r:]) == 0 and torch.count_nonzero(db[i, :, r:]) == 0, i
        assert torch.count_nonzero(da[i, :r]) > 0 and torch.count_nonzero(db[i, :, :r]) > 0, i
    # The shrink reads only r_a rows of A_a: u's columns past r_a are zero despite the garbage there.
    x = args[0]
    bm = MK._TEST_BLOCKS["BLOCK_M"]
    order, bounds, blocks = MK.group_rows(ids, 4, bm)
    thr = torch.zeros(4, dtype=torch.int64, device=DEV)
    u = MK.multi_lora_shrink(x, args[3].transpose(1, 2), order, blocks, args[6].to(torch.int32), args[5], thr, bm,
                             0, False, 0, 0)
    sorted_ids = ids[order]
    for i, r in enumerate(ranks):
        assert not u[sorted_ids == i, r:].any() and u[sorted_ids == i, :r].all(), i
    assert not u[sorted_ids == -1].any()
    # Still exact zeros where x holds an inf (0 * inf would be nan).
    x_inf = x.clone()
    x_inf[(ids == 1).nonzero()[0, 0], 3] = float("inf")
    da_inf = _run("triton", x_inf, *args[1:5], args[5], ids, args[6], None, 0, dy)[2]
    assert torch.count_nonzero(da_inf[1, 8:]) == 0 and not da_inf[1, :8].isfinite().all()


def test_each_rows_gradient_reaches_only_its_adapter():
    x, w, b, a, bb, s, rk = _make(33, 48, 40, [4, 8, 8, 16], torch.float32)
    ids = torch.tensor([0, 2, -1] * 11, device=DEV)  # adapters 1 and 3 unused
    dy = _dy(x, 40)
    dy[ids != 2] = 0  # only adapter 2's rows carry a gradient
    y, dx, da, db = _run("triton", x, w, b, a, bb, s, ids, rk, None, 0, dy)
    assert not da[[0, 1, 3]].any() and not db[[0, 1, 3]].any()
    assert da[2].any() and db[2].any()
    assert not dx[ids != 2].any()
    # Unused adapters' weights do not change y (a2 requires grad: the same grouped kernels as y's run, not the
    # no-grad forward's choice, whose sums are ordered otherwise).
    a2, bb2 = a.clone(), bb.clone()
    a2[[1, 3]] += 1.0
    bb2[[1, 3]] -= 1.0
    y2 = fastpeft.lora_linear_multi(x, w, b, a2.requires_grad_(), bb2, s, ids, rk, backend="triton")
    assert torch.equal(y, y2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_reference_mask(p):
    """The shrink kernel's in-load mask is exactly dropout_mask(seed) at each row's own rate."""
    m, k, n = 37, 48, 3
    rates = torch.tensor([p, 0.0, p / 2], device=DEV)
    ids = _ids((m,), n)
    order, bounds, blocks = MK.group_rows(ids, n, MK._TEST_BLOCKS["BLOCK_M"])
    eye = torch.eye(k, device=DEV).expand(n, k, k)  # u = drop(x) @ I = drop(x)
    thr = torch.tensor([dropout_threshold(float(q)) for q in rates.double()], device=DEV)
    scale = (1.0 / (1.0 - rates.double())).float()
    ranks = torch.full((n,), k, device=DEV, dtype=torch.int32)
    u_sorted = MK.multi_lora_shrink(torch.ones(m, k, device=DEV), eye, order, blocks, ranks, scale, thr,
                                    MK._TEST_BLOCKS["BLOCK_M"], 42, True, k, 1)
    u = torch.zeros_like(u_sorted).index_copy_(0, order, u_sorted)  # back to the original row order
    for i in range(n):
        q = float(rates[i].double())
        keep = dropout_mask(42, m, k, q, device=DEV)[ids == i]
        torch.testing.assert_close(u[ids == i], keep.float() / (1 - q), rtol=0, atol=1e-6)
    assert not u[ids == -1].any()
    keep = dropout_mask(42, 200, 130, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02


def test_backward_applies_the_forwards_mask_and_seeds_fix_the_bits():
    m, k, n_out, p = 33, 48, 40, 0.5
    x, w, b, a, bb, s, rk = _make(m, k, n_out, [8, 16], torch.float32)
    w = torch.zeros_like(w)  # dX is then the low-rank part alone
    ids = _ids((m,), 2)
    rates = torch.tensor([p, 0.0], device=DEV)
    dy = _dy(x, n_out)
    r1 = _run("triton", x, w, b, a, bb, s, ids, rk, rates, 11, dy)
    dx = r1[1]
    keep = dropout_mask(11, m, k, p, device=DEV)
    rows0 = ids == 0
    assert not dx[rows0][~keep[rows0]].any() and bool((dx[rows0][keep[rows0]] != 0).all())
    assert bool((dx[ids == 1] != 0).all())  # rate 0: nothing dropped
    assert not dx[ids == -1].any()
    r2 = _run("triton", x, w, b, a, bb, s, ids, rk, rates, 11, dy)
    r3 = _run("triton", x, w, b, a, bb, s, ids, rk, rates, 12, dy)
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))  # deterministic: no atomics
    assert not torch.equal(r1[0], r3[0])


def _check_grouping(ids, n, block_m, order, bounds, blocks):
    m = ids.shape[0]
    assert torch.equal(ids[order], torch.sort(ids, stable=True).values)
    assert torch.equal(order.sort().values, torch.arange(m))
    for i in range(n):
        assert int(bounds[i + 1] - bounds[i]) == int((ids == i).sum())
        assert torch.equal(order[int(bounds[i]):int(bounds[i + 1])], (ids == i).nonzero().squeeze(1))  # stable
    covered = torch.zeros(m, dtype=torch.long)
    for adapter, start, end in blocks.t().tolist():
        if start == end:
            continue
        assert int(bounds[adapter]) <= start < end == int(bounds[adapter + 1])
        covered[order[start:min(start + block_m, end)]] += 1
    assert torch.equal(covered, (ids >= 0).long())  # every adapter row in exactly one block, -1 rows in none


@pytest.mark.parametrize("m,n,block_m", [(0, 3, 16), (1, 1, 16), (37, 4, 16), (100, 7, 32), (64, 1, 64), (5, 0, 16)])
def test_grouping_is_static_and_sync_free(m, n, block_m):
    """group_rows runs on data-less tensors (FakeTensorMode: any .item(), .tolist(), nonzero(), bincount or
    data-dependent shape raises), and its shapes depend on M, n and BLOCK_M only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = MK.num_blocks(m, n, block_m)
    assert t == -(-m // block_m) + n
    with FakeTensorMode():
        fake = MK.group_rows(torch.empty(m, dtype=torch.int64), n, block_m)
        with pytest.raises(Exception):
            torch.bincount(torch.empty(m, dtype=torch.int64) + 1, minlength=n + 1)  # the check has teeth
    assert [tuple(f.shape) for f in fake] == [(m,), (n + 1,), (3, t)]
    for seed, low in ((0, -1), (1, 0), (2, n - 1 if n else -1)):
        ids = torch.randint(low, max(n, 1), (m,), generator=torch.Generator().manual_seed(seed)) if n else \
            torch.full((m,), -1)
        real = MK.group_rows(ids, n, block_m)
        assert [f.shape for f in fake] == [r.shape for r in real]
        assert [f.dtype for f in fake] == [r.dtype for r in real]
        _check_grouping(ids, n, block_m, *real)


def test_saved_tensors_budget():
    """Saved for backward: x itself, u (M x r_max fp32), the grouping and per-adapter constants, the
    parameters; no dropped copy of x and nothing else of x's size."""
    m, k, n_out, ranks = 64, 80, 48, [4, 8, 16]
    x, w, b, a, bb, s, rk = _make(m, k, n_out, ranks, torch.float32)
    for t in (x, a, bb):
        t.requires_grad_()
    ids = _ids((m,), 3)
    rates = torch.tensor([0.1, 0.2, 0.3], device=DEV)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    params = {t.data_ptr() for t in (x, w, b, a, bb)}
    for backend, expect_copy in (("triton", False), ("reference", True)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, rk, backend=backend, dropout_p=rates, seed=1)
        big = [t for t in saved if t.numel() >= m * k and t.data_ptr() not in params]
        assert bool(big) == expect_copy, (backend, [tuple(t.shape) for t in big])
        if backend == "triton":
            extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params)
            t_blocks = MK.num_blocks(m, 3, MK.block_m_for(x, m, 3))
            budget = m * max(ranks) * 4 + m * 8 + (3 + 1) * 4 + 3 * t_blocks * 4 + 3 * (4 + 4 + 4 + 8)
            assert extra <= budget, (extra, budget, [tuple(t.shape) for t in saved])


def test_autocast_cpu_bf16_like_linear():
    if DEV != "cpu":
        pytest.skip("CPU autocast")
    x, w, b, a, bb, s, rk = _make(7, 48, 40, [8, 4], torch.float32)
    ids = _ids((7,), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, rk, backend="triton")
        ref = fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, rk, backend="reference")
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = lora_linear_multi_ref(*(t.double() for t in (x, w, b, a, bb)), s, ids, rk)
    assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("ids,exc,msg", [
    (torch.tensor([0, 4, 1]), ValueError, r"adapter_ids must be in \[-1, 3\]"),
    (torch.tensor([0, -2, 1]), ValueError, r"adapter_ids must be in \[-1, 3\]"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"adapter_ids must have shape \(3,\)"),
    (torch.zeros(3), TypeError, "adapter_ids must be an int64/int32 tensor"),
], ids=["too_big", "below_-1", "wrong_shape", "float"])
def test_bad_ids_raise_clear_errors(ids, exc, msg):
    x, w, b, a, bb, s, rk = _make(3, 48, 40, [8, 4, 2, 1], torch.float32)
    with pytest.raises(exc, match=msg):
        fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids.to(DEV), rk, backend="triton")


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck_registered_ops():
    x, w, b, a, bb, s, rk = _make(37, 48, 40, [1, 8, 16, 24], torch.float32)
    ids = _ids((37,), 4)
    bm = MK._TEST_BLOCKS["BLOCK_M"]
    order, bounds, blocks = MK.group_rows(ids, 4, bm)
    r32 = rk.to(torch.int32)
    thr = torch.tensor([0, 2**30, 2**31, 3 * 2**30], device=DEV)
    u = MK.multi_lora_shrink(x, a.transpose(1, 2), order, blocks, r32, s, thr, bm, 7, True, 48, 1)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    ops = torch.ops.fastpeft
    torch.library.opcheck(ops.multi_lora_shrink.default,
                          (x, a.transpose(1, 2), order, blocks, r32, s, thr, bm, 7, True, 48, 1), test_utils=tests)
    torch.library.opcheck(ops.multi_lora_expand_.default,
                          (torch.randn(37, 40, device=DEV), u, bb.transpose(1, 2), order, blocks, r32, s, thr, bm,
                           3, True, 40, 1), test_utils=tests)
    torch.library.opcheck(ops.multi_lora_segment_grad.default,
                          (x, u, order, bounds, r32, s, thr, 5, True, 48, 1, True), test_utils=tests)


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_gpu_llm_shape_matches_reference(dt):
    ranks = [8, 16, 64, 32, 16, 8, 4, 64]
    x, w, b, a, bb, s, rk = _make(2048, 4096, 4096, ranks, DTYPES[dt])
    ids = _ids((2048,), len(ranks))
    _check_against_reference(f"gpu-{dt}", x, w, b, a, bb, s, rk, ids,
                             torch.full((len(ranks),), 0.1, device=DEV), seed=1)


@pytest.mark.gpu
def test_gpu_decode_shape_matches_reference():
    """Few rows over many adapters: split-K in the shrink, most blocks partly filled or empty."""
    ranks = [16] * 32
    x, w, b, a, bb, s, rk = _make(48, 4096, 4096, ranks, torch.bfloat16)
    _check_against_reference("gpu-decode", x, w, b, a, bb, s, rk, _ids((48,), 32))


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """Forward and backward of the triton path never synchronise with the host."""
    x, w, b, a, bb, s, rk = _make(300, 512, 256, [8, 16, 32], torch.bfloat16)
    ids = _ids((300,), 3)
    rates = torch.tensor([0.1, 0.0, 0.2], device=DEV)
    for t in (x, a, bb):
        t.requires_grad_()
    lora_linear_multi_triton(x, w, b, a, bb, s, ids, rk, rates, 3).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = lora_linear_multi_triton(x, w, b, a, bb, s, ids, rk, rates, 3)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, a, bb, s, rk = _make(256, 512, 384, [8, 16, 4], torch.bfloat16)
    ids = _ids((256,), 3)
    rates = torch.tensor([0.1, 0.0, 0.2], device=DEV)
    a.requires_grad_()
    bb.requires_grad_()

    def f(x, a, bb):
        return lora_linear_multi_triton(x, w, b, a, bb, s, ids, rk, rates, 3)

    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x, a, bb)
    torch.testing.assert_close(y, f(x, a, bb))
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None
