"""Sparse deltas on the CPU path (``fastpeft.ops.sparse_cpu``): both ways of Δ's part (W + Δ by clone + scatter,
and gathers at decode sizes) against the fp64 formula, every gradient, clipped edge blocks, RoSA with the CPU
dropout stream, the kept W + Δ buffer (and a fresh one where autograd records it), the oracle under
``kernel_stream_on_cpu``, and the autocast dtype rules."""
import pytest
import torch

import fastpeft
from fastpeft import reference as R
from fastpeft.ops import sparse_cpu as SC
from fastpeft.quant import release_workspaces
from conftest import assert_close_report


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _case(m, k, n, b, count, r=0, dtype=torch.float64, seed=0):
    """x (m, k), W (n, k), bias (n,), A (r, k), B (n, r), indices and values of ``count`` entries / blocks."""
    g = _g(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, generator=g, dtype=dtype)
    a = torch.randn(r, k, generator=g, dtype=dtype) / k ** 0.5
    bb = torch.randn(n, r, generator=g, dtype=dtype) / max(r, 1) ** 0.5
    rb, cb = -(-n // b), -(-k // b)
    flat = torch.sort(torch.randperm(rb * cb, generator=g)[:count]).values
    idx = flat if b == 1 else torch.stack([flat // cb, flat % cb], 1)
    vals = torch.randn(*((count,) if b == 1 else (count, b, b)), generator=g, dtype=dtype)
    return x, w, bias, a, bb, idx, vals


@pytest.fixture(params=["gathers", "w-prime"])
def way(request, monkeypatch):
    """Δ's part forced one way: gathers (ratios 0: always) or W + Δ formed (ratios past any case: never)."""
    big = 10 ** 9
    monkeypatch.setattr(SC, "_GATHER_RATIO", 0 if request.param == "gathers" else big)
    monkeypatch.setattr(SC, "_GATHER_RATIO_DV", 0 if request.param == "gathers" else big)
    return request.param


CASES = [(1, 48, 40, 1, 30), (7, 80, 48, 1, 200), (33, 130, 48, 1, 5), (7, 70, 40, 16, 4), (33, 80, 48, 16, 7),
         (1, 130, 80, 32, 3), (5, 48, 40, 1, 0)]  # 70 x 40 / 130 x 80: clipped edge blocks; nnz 0 last


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n,b,count", CASES, ids=[f"M{c[0]}-K{c[1]}-N{c[2]}-b{c[3]}-nnz{c[4]}" for c in CASES])
def test_sparse_delta_matches_the_formula_fp64(way, m, k, n, b, count, bias):
    """y = x (W + Δ)^T + b; dX = dY (W + Δ), dv = (dY^T x) on Δ's support (0 outside W), dW = dY^T x,
    db = sum dY: each way, to fp64 rounding."""
    x, w, bs, _, _, idx, vals = _case(m, k, n, b, count)
    leaves = [x.requires_grad_(), w.requires_grad_(), vals.requires_grad_()] + ([bs.requires_grad_()] if bias else [])
    y = fastpeft.sparse_delta_linear(x, w, bs if bias else None, idx, vals, block_size=b, backend="reference")
    dy = torch.randn(m, n, generator=_g(1), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy)
    with torch.no_grad():
        delta = R.dense_delta_ref(idx, vals, n, k, b)
        dense_dw = dy.t() @ x
        if b == 1:
            dv = dense_dw.reshape(-1)[idx]
        else:
            pad = torch.zeros(-(-n // b) * b, -(-k // b) * b, dtype=torch.float64)
            pad[:n, :k] = dense_dw
            dv = torch.stack([pad[i * b:(i + 1) * b, j * b:(j + 1) * b] for i, j in idx.tolist()]) if count else \
                vals.new_zeros(vals.shape)
        want = [x @ (w + delta).t() + (bs if bias else 0), dy @ (w + delta), dense_dw, dv] + ([dy.sum(0)] if bias else [])
    for name, g_, e in zip(["y", "dX", "dW", "dv", "db"], [y, *got], want):
        assert g_.shape == e.shape, name
        assert_close_report(g_, e, 1e-12, 1e-12, f"{way} {name}")


RCASES = [(1, 48, 40, 8, 1, 30), (7, 80, 48, 16, 16, 4), (33, 130, 48, 1, 1, 40)]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("m,k,n,r,b,count", RCASES, ids=[f"M{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-b{c[4]}" for c in RCASES])
def test_rosa_matches_the_formula_with_the_cpu_mask(way, m, k, n, r, b, count, p):
    """RoSA: y = x (W + Δ)^T + b + s (D x A^T / (1-p)) B^T with D the CPU stream's mask; every gradient
    (dv from the undropped x) to fp64 rounding."""
    x, w, bs, a, bb, idx, vals = _case(m, k, n, b, count, r=r)
    leaves = [t.requires_grad_() for t in (x, bs, a, bb, vals)]
    s, seed = 1.5, 2**41 + 9
    y = fastpeft.lora_sparse_linear(x, w, bs, a, bb, s, idx, vals, b, dropout_p=p, seed=seed, backend="reference")
    dy = torch.randn(m, n, generator=_g(2), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy)
    with torch.no_grad():
        d = R.cpu_keep_mask(seed, m, k, p).double() / (1 - p) if p else torch.ones(m, k, dtype=torch.float64)
        wp = w + R.dense_delta_ref(idx, vals, n, k, b)
        u = (x * d) @ a.t()
        want_y = x @ wp.t() + bs + s * u @ bb.t()
        dv = SC.sddmm_torch(dy, x, idx, vals, b)
        want = [dy @ wp + s * d * (dy @ bb @ a), dy.sum(0), s * (dy @ bb).t() @ (x * d), s * dy.t() @ u, dv]
    assert_close_report(y, want_y, 1e-12, 1e-12, f"{way} y")
    for name, g_, e in zip(["dX", "db", "dA", "dB", "dv"], got, want):
        assert_close_report(g_, e, 1e-12, 1e-12, f"{way} {name}")


@pytest.mark.parametrize("op", ["sparse", "rosa"])
def test_gradcheck_and_double_backward(way, op):
    """gradcheck and gradgradcheck (create_graph: W + Δ in a fresh tensor, autograd saves it) in fp64."""
    x, w, bs, a, bb, idx, vals = _case(4, 10, 6, 1, 9, r=3)
    if op == "sparse":
        def fn(x, v, bs):
            return fastpeft.sparse_delta_linear(x, w, bs, idx, v, backend="reference")
        args = (x, vals, bs)
    else:
        def fn(x, v, a, bb):
            return fastpeft.lora_sparse_linear(x, w, bs, a, bb, 0.7, idx, v, backend="reference")
        args = (x, vals, a, bb)
    args = tuple(t.requires_grad_() for t in args)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_w_prime_goes_into_the_kept_buffer_unless_recorded():
    """Forward and backward form W + Δ in the CPU workspace (one buffer, no W-sized allocation per call);
    while autograd records the product (double backward) a fresh tensor, which it may save."""
    release_workspaces()
    x, w, _, _, _, idx, vals = _case(3, 64, 32, 1, 40, dtype=torch.float32)
    plan = SC.CPUPlan(idx, 32, 64, 1)
    first = SC._w_prime(w, plan, vals, x)
    again = SC._w_prime(w, plan, vals, x)
    assert first.data_ptr() == again.data_ptr()
    with torch.enable_grad():
        recorded = SC._w_prime(w, plan, vals, x.requires_grad_())
    assert recorded.data_ptr() != first.data_ptr()
    torch.testing.assert_close(recorded, first, rtol=0, atol=0)
    release_workspaces()


def test_values_grad_by_chunks_of_gathers(monkeypatch):
    """The gather-dots of the values' gradient in chunks (a chunk of 7 elements: 2 rows x 3 entries) give
    sddmm_torch's result."""
    monkeypatch.setattr(SC, "_GATHER_RATIO_DV", 0)
    monkeypatch.setattr(SC, "_GATHER_CHUNK", 7)
    x, w, _, _, _, idx, vals = _case(2, 30, 20, 1, 50)
    dy = torch.randn(2, 20, generator=_g(3), dtype=torch.float64)
    torch.testing.assert_close(SC._values_grad(dy, x, SC.CPUPlan(idx, 20, 30, 1), vals), SC.sddmm_torch(dy, x, idx, vals, 1),
                               rtol=1e-12, atol=1e-12)


def test_decode_sizes_take_gathers_and_larger_ones_w_prime(monkeypatch):
    """At M = 1 and 1 % density Δ's part goes by gathers (no W + Δ); at M = 256 W + Δ is formed."""
    calls = []
    real = SC.w_plus_delta_torch
    monkeypatch.setattr(SC, "w_plus_delta_torch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for m, formed in ((1, False), (256, True)):
        x, w, bs, _, _, idx, vals = _case(m, 256, 256, 1, 655, dtype=torch.float32)
        calls.clear()
        y = fastpeft.sparse_delta_linear(x.requires_grad_(), w, bs, idx, vals.requires_grad_(), backend="reference")
        y.sum().backward()
        assert bool(calls) == formed, (m, calls)


def test_oracle_under_kernel_stream_on_cpu(monkeypatch):
    """Inside ``kernel_stream_on_cpu`` the reference backend runs the oracle (reference.py), not this path."""
    x, w, bs, a, bb, idx, vals = _case(7, 48, 40, 1, 30, r=4)

    def boom(*a, **kw):
        raise AssertionError("the CPU path ran")
    monkeypatch.setattr(SC.SparseDeltaLinearCPUFunction, "apply", boom)
    monkeypatch.setattr(SC.LoRASparseLinearCPUFunction, "apply", boom)
    with R.kernel_stream_on_cpu():
        fastpeft.sparse_delta_linear(x.requires_grad_(), w, bs, idx, vals, backend="reference")
        fastpeft.lora_sparse_linear(x, w, bs, a, bb, 1.0, idx, vals, dropout_p=0.1, seed=3, backend="reference")
    with pytest.raises(AssertionError, match="the CPU path ran"):
        fastpeft.sparse_delta_linear(x, w, bs, idx, vals, backend="reference")


@pytest.mark.parametrize("b", [1, 16], ids=["b1", "b16"])
def test_autocast_bf16_rounds_w_prime_once_as_the_reference(b):
    """Under CPU autocast to bf16: y in bf16 within 2x the reference's error against fp64, the values'
    gradient in their own fp32, W + Δ summed in fp32 and rounded once."""
    x, w, bs, a, bb, idx, vals = _case(9, 80, 48, b, 4 if b > 1 else 300, r=8, dtype=torch.float32)
    exact = R.lora_sparse_linear_ref(*(t.double() for t in (x, w, bs, a, bb)), 1.0, idx, vals.double(), b)
    vals.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_sparse_linear(x, w, bs, a, bb, 1.0, idx, vals, b, backend="reference")
        with R.kernel_stream_on_cpu():
            ref = fastpeft.lora_sparse_linear(x, w, bs, a, bb, 1.0, idx, vals, b, backend="reference")
    assert y.dtype == ref.dtype == torch.bfloat16
    assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-6
    (g,) = torch.autograd.grad(y.float().sum(), [vals])
    (gr,) = torch.autograd.grad(ref.float().sum(), [vals])
    assert g.dtype == torch.float32 and g.shape == vals.shape
    assert_close_report(g, gr, 2e-2, 2e-2 * gr.abs().max().item(), "dv")


def test_no_grad_forward_and_leading_dims():
    """Without anything to differentiate the forward skips the autograd Function; any leading dims and a
    non-contiguous x give the 2-D result."""
    x, w, bs, _, _, idx, vals = _case(2 * 7, 48, 40, 1, 60)
    x3 = x.view(2, 7, 48).transpose(0, 1)
    with torch.no_grad():
        y = fastpeft.sparse_delta_linear(x3, w, bs, idx, vals, backend="reference")
    want = R.sparse_delta_linear_ref(x3.reshape(-1, 48), w, bs, idx, vals).view(7, 2, 40)
    assert not y.requires_grad and y.shape == (7, 2, 40)
    assert_close_report(y, want, 1e-12, 1e-12, "y")


def test_a_layer_keeps_its_plan_until_its_indices_change():
    """A SparseDeltaLinear on the CPU path keeps one CPUPlan for its indices (the rows and columns are derived
    once), rebuilt after an in-place change or a new indices tensor; outputs follow the current indices."""
    torch.manual_seed(0)
    layer = fastpeft.SparseDeltaLinear(48, 40, density=0.05, dtype=torch.float64)
    with torch.no_grad():
        layer.delta_values.normal_()
    x = torch.randn(1, 48, dtype=torch.float64)

    def want():
        return R.sparse_delta_linear_ref(x, layer.weight, layer.bias, layer.delta_indices, layer.delta_values)
    assert_close_report(layer(x), want(), 1e-12, 1e-12, "y")
    plan = layer._plan.plan
    assert isinstance(plan, SC.CPUPlan) and plan.indices is layer.delta_indices
    layer(x)
    assert layer._plan.plan is plan  # kept
    with torch.no_grad():
        layer.delta_indices.add_(1)  # still sorted, unique and in range: every entry one column on
    assert_close_report(layer(x), want(), 1e-12, 1e-12, "y after add_")
    assert layer._plan.plan is not plan
    layer.delta_indices = layer.delta_indices.clone() - 1
    assert_close_report(layer(x), want(), 1e-12, 1e-12, "y after a new tensor")


def test_functional_calls_keep_nothing_between_calls():
    """Without a plan every call derives what it uses: indices changed behind the version counter (through
    .data, or .data replaced) still give the right output."""
    x, w, bs, _, _, idx, vals = _case(1, 48, 40, 1, 30)
    for change in (lambda: idx.data.add_(1), lambda: setattr(idx, "data", idx.data - 1)):
        change()
        for m in (1, 64):  # gathers, then W + Δ
            xm = x.expand(m, -1)
            assert_close_report(fastpeft.sparse_delta_linear(xm, w, bs, idx, vals, backend="reference"),
                                R.sparse_delta_linear_ref(xm, w, bs, idx, vals), 1e-12, 1e-12, f"M{m}")


def test_indices_changed_before_backward_raise():
    """The indices are saved for backward: changed in place between forward and backward, autograd raises (as it
    does through the oracle) instead of a values' gradient for other positions."""
    x, w, bs, _, _, idx, vals = _case(3, 48, 40, 1, 30)
    y = fastpeft.sparse_delta_linear(x, w, bs, idx, vals.requires_grad_(), backend="reference")
    with torch.no_grad():
        idx.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inference_mode_indices():
    """Indices made under torch.inference_mode (no version counter) work, through the op and a layer."""
    with torch.inference_mode():
        x, w, bs, _, _, idx, vals = _case(5, 48, 40, 1, 30)
        layer = fastpeft.SparseDeltaLinear(48, 40, density=0.05, dtype=torch.float64)
    for m in (1, 5):
        assert_close_report(fastpeft.sparse_delta_linear(x[:m], w, bs, idx, vals, backend="reference"),
                            R.sparse_delta_linear_ref(x[:m], w, bs, idx, vals), 1e-12, 1e-12, f"M{m}")
        with torch.inference_mode():
            layer(x[:m])


def test_a_plan_for_other_indices_is_refused():
    x, w, bs, _, _, idx, vals = _case(3, 48, 40, 1, 30)
    with pytest.raises(ValueError, match=r"plan was built for indices \(29,\)"):
        fastpeft.sparse_delta_linear(x, w, bs, idx, vals, backend="reference", plan=SC.CPUPlan(idx[:29], 40, 48, 1))


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_torch_func_grad_and_vmap(p):
    """torch.func over the sparse ops on CPU tensors runs plain autograd compositions with the CPU stream: grad
    equals eager's (dropout included); without dropout per-sample gradients add up to it."""
    x, w, bs, a, bb, idx, vals = _case(4, 48, 40, 1, 30, r=4)

    def loss(v, xi):
        return fastpeft.lora_sparse_linear(xi, w, bs, a, bb, 0.7, idx, v, dropout_p=p, seed=3,
                                           backend="reference").square().sum()
    g = torch.func.grad(loss)(vals, x)
    v_ = vals.clone().requires_grad_()
    want, = torch.autograd.grad(loss(v_, x), v_)
    assert_close_report(g, want, 1e-10, 1e-10, "dv")
    if p == 0.0:
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(vals, x[:, None])
        assert_close_report(per_sample.sum(0), want, 1e-12, 1e-12, "sum of per-sample dv")


def test_plan_kept_under_inference_mode_is_not_kept():
    """A layer first called under inference mode keeps nothing derived there (inference tensors): a later
    training step with create_graph can save what it derives."""
    torch.manual_seed(0)
    layer = fastpeft.SparseDeltaLinear(48, 40, density=0.1, block_size=4, dtype=torch.float64)
    x = torch.randn(6, 48, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)
    xg = x.clone().requires_grad_()
    gx, = torch.autograd.grad(layer(xg).square().sum(), xg, create_graph=True)
    gx.square().sum().backward()
    assert layer.delta_values.grad is not None


def test_float64_under_autocast_stays_float64():
    x, w, bs, a, bb, idx, vals = _case(5, 48, 40, 16, 3, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.sparse_delta_linear(x, w, bs, idx, vals, 16, backend="reference")
        z = fastpeft.lora_sparse_linear(x, w, bs, a, bb, 0.7, idx, vals, 16, backend="reference")
    assert y.dtype == z.dtype == torch.float64
    assert_close_report(y, R.sparse_delta_linear_ref(x, w, bs, idx, vals, 16), 1e-12, 1e-12, "y")
    assert_close_report(z, R.lora_sparse_linear_ref(x, w, bs, a, bb, 0.7, idx, vals, 16), 1e-12, 1e-12, "z")


def test_rosa_with_an_int_seed_compiles_under_inductor():
    x, w, bs, a, bb, idx, vals = _case(4, 64, 48, 1, 80, r=4, dtype=torch.float32)

    def fn(x, a):
        return fastpeft.lora_sparse_linear(x, w, bs, a, bb, 0.7, idx, vals, dropout_p=0.2, seed=5,
                                           backend="reference", check=False)
    torch._dynamo.reset()
    assert_close_report(torch.compile(fn, fullgraph=True)(x, a), fn(x, a), 1e-5, 1e-5, "y")
