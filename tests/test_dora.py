"""DoRA: the oracle against PEFT 0.21, the Function's every gradient against fp64 autograd, the factored
norm's cancellation row, and the kernels (TRITON_INTERPRET=1 on CPU) against the reference."""
import pytest
import torch
import torch.nn as nn

from conftest import assert_close_report
from fastpeft.ops.dora import (CANCEL_RATIO, dora_linear, dora_norm, dora_norm_factored, weight_sq_norms)
from fastpeft.reference import dora_linear_ref, dora_norm_ref, lora_dropout_stream

NAMES = ("y", "dx", "dW", "db", "dA", "dB", "dm")


def _case(M, K, N, r, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype) * 0.1 if bias else None
    a = torch.randn(r, K, generator=g, dtype=dtype) / K**0.5
    bb = torch.randn(N, r, generator=g, dtype=dtype) * 0.3
    m = torch.linalg.vector_norm(w, dim=1) * (1 + 0.1 * torch.randn(N, generator=g, dtype=dtype))
    return [x, w, b, a, bb, m]


def _run(fn, tensors, dtype, dy, grad_w=True):
    """fn(*leaves) and the gradients of every leaf (x, W, b, A, B, m), leaves cast to dtype."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(i != 1 or grad_w)
              for i, t in enumerate(tensors)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y] + [None if t is None else t.grad for t in leaves]


def _ref(p, mode, s=1.5, seed=7, training=True):
    return lambda x, w, b, a, bb, m: dora_linear_ref(x, w, b, a, bb, m, s, p, training, seed, mode)


def _ours(backend, p, mode, s=1.5, seed=7, training=True):
    return lambda x, w, b, a, bb, m: dora_linear(x, w, b, a, bb, m, s, p, training, seed, mode, backend=backend)


MODES = [pytest.param(0.0, "exact", id="p0"), pytest.param(0.25, "exact", id="p0.25-exact"),
         pytest.param(0.25, "lora_only", id="p0.25-lora_only")]


# ----------------------------------------------------------------------------------------------------
# the reference Function (plain torch) against fp64 autograd through the oracle
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p,mode", MODES)
@pytest.mark.parametrize("shape", [(33, 80, 48, 8), (1, 48, 130, 1)], ids=["M33-K80-N48-r8", "M1-K48-N130-r1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_reference_function_fp64(shape, p, mode, bias):
    t = _case(*shape, bias=bias)
    dy = torch.randn(shape[0], shape[2], dtype=torch.float64)
    want = _run(_ref(p, mode), t, torch.float64, dy)
    got = _run(_ours("reference", p, mode), t, torch.float64, dy)
    for name, a, e in zip(NAMES, got, want):
        if e is not None:
            assert_close_report(a, e, 1e-10, 1e-12 * float(e.detach().abs().max()), name)


def test_eval_ignores_dropout_and_modes_agree():
    t = _case(9, 48, 40, 4)
    y0 = dora_linear_ref(*t, 1.5, 0.0, False)
    for mode in ("exact", "lora_only"):
        assert_close_report(dora_linear(*t, 1.5, 0.3, False, None, mode), y0, 1e-12, 1e-12, mode)
    # In training the two modes differ (the exact one keeps the base term on x): the test can tell them apart.
    ye = dora_linear(*t, 1.5, 0.3, True, 5, "exact")
    yl = dora_linear(*t, 1.5, 0.3, True, 5, "lora_only")
    assert float((ye - yl).abs().max()) > 1e-3


def test_zero_magnitude_column_gradient():
    """dm from the saved output divides by m; a column with m_j = 0 is recomputed, not 0/0."""
    t = _case(17, 48, 40, 4)
    t[5][3] = 0.0
    dy = torch.randn(17, 40, dtype=torch.float64)
    want = _run(_ref(0.0, "exact"), t, torch.float64, dy)
    for backend, dtype, tol in (("reference", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)):
        got = _run(_ours(backend, 0.0, "exact"), t, dtype, dy)
        assert torch.isfinite(got[6]).all()
        assert_close_report(got[6], want[6], tol, tol * float(want[6].abs().max()), f"dm {backend}")


@pytest.mark.parametrize("case", ["tiny-m", "bias-dominated"])
def test_magnitude_gradient_where_y_minus_b_loses_z(case):
    """dm_j = Σ_i dY_ij z_ij / n_j does not depend on m, but the plain backward reads z from y = g z + b: with m_j
    near 0 (1e-30: y = b exactly, dm came out 0 and the row could never recover) or a bias 500x the column's
    g z (y − b cancels: 100x PEFT's error in bf16), those columns are recomputed from x. fp32 and bf16, both
    backends (bf16: within 2x PyTorch's own error in computing z in bf16, plus half a bf16 ulp of dm itself, which
    the gradient is rounded to)."""
    t = _case(17, 48, 40, 4)
    if case == "tiny-m":
        t[5][[3, 9]] = 1e-30
    else:
        t[2][[3, 9]] = 500.0
        t[5][[3, 9]] *= 0.01
    dy = torch.randn(17, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = _run(_ref(0.0, "exact"), t, torch.float64, dy)[6]
    own = [t_.to(torch.bfloat16).to(torch.float64) if t_ is not None else None for t_ in t]  # PyTorch in bf16:
    z = (own[0] @ own[1].t() + 1.5 * (own[0] @ own[3].t()) @ own[4].t()).to(torch.bfloat16).to(torch.float64)
    n = torch.linalg.vector_norm(own[1] + 1.5 * own[4] @ own[3], dim=1)
    torch_err = float(((dy * z).sum(0) / n - want).abs().max())
    for backend in ("reference", "triton"):
        for dtype, tol in ((torch.float32, 2e-5 * float(want.abs().max())),
                           (torch.bfloat16, 2 * torch_err + 2.0**-8 * float(want.abs().max()))):
            got = _run(_ours(backend, 0.0, "exact"), t, dtype, dy)[6].double()
            assert_close_report(got, want, 0.0, tol, f"dm {backend} {dtype}")


# ----------------------------------------------------------------------------------------------------
# the norm: factored form, its cancellation row, the kernel
# ----------------------------------------------------------------------------------------------------

def _cancelling_case(dtype=torch.float32, r=8):
    """Row 0 of W is −sB_0A plus a 1e-4 remainder (formed in fp64, then rounded): ‖W_0 + sB_0A‖ ≈ 1e-3,
    ≈ 3e-4·‖W_0‖, where fp32 rounding of the factored terms (each ≈ ‖W_0‖²) swamps n_0²."""
    gen = torch.Generator().manual_seed(3)
    N, K, s = 40, 96, 2.0
    a = torch.randn(r, K, generator=gen)
    b = torch.randn(N, r, generator=gen) * 0.1
    w = torch.randn(N, K, generator=gen) * 0.05
    w[0] = (-s * (b[0].double() @ a.double()) + 1e-4 * torch.randn(K, generator=gen, dtype=torch.float64)).float()
    return w.to(dtype), a.to(dtype), b.to(dtype), s


def _assert_norm_close(n, exact, w, what):
    """Rows other than 0 to 1e-5; row 0 to its conditioning: forming W_0 + sB_0A in fp32 at all (as PEFT
    does) costs up to eps32·(|W_0| + |sB_0A|) per element, ≈ 2·eps32·‖W_0‖ on the norm."""
    assert_close_report(n[1:], exact[1:], 1e-5, 0.0, what)
    bound = 4 * torch.finfo(torch.float32).eps * float(torch.linalg.vector_norm(w[0].double()))
    err = abs(float(n[0]) - float(exact[0]))
    assert err <= bound, (f"{what}: row 0: got {float(n[0]):.6g}, expected {float(exact[0]):.6g} "
                          f"(|err| {err:.3g} > {bound:.3g})")


def test_norm_cancellation_row_falls_back():
    w, a, b, s = _cancelling_case()
    exact = dora_norm_ref(w.double(), a.double(), b.double(), s)
    n, rows = dora_norm_factored(w, a, b, s, weight_sq_norms(w))
    assert rows.tolist() == [0], f"fallback rows {rows.tolist()}"
    _assert_norm_close(n, exact, w, "norm with fallback")
    # Without the fallback row 0 would be wrong: the factored sum alone, in fp32, for that row.
    w2, wa = (w[0] ** 2).sum(), w[0] @ a.t()
    raw = (w2 + 2 * s * (wa * b[0]).sum() + s * s * (b[0] @ (a @ a.t()) @ b[0])).clamp_min(0).sqrt()
    assert abs(float(raw) - float(exact[0])) > 1e-2 * float(exact[0]), "row 0 does not cancel: test is void"
    assert float(exact[0]) ** 2 < CANCEL_RATIO * float((w[0].double() ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [8, 40], ids=["r8", "r40"])  # r40: R_PAD 64 in 16-rank slices, the last partial
def test_norm_kernel(dtype, r):
    w, a, b, s = _cancelling_case(dtype, r)
    exact = dora_norm_ref(w.double(), a.double(), b.double(), s)
    n = dora_norm(w, a, b, s, backend="triton")
    assert n.dtype == torch.float32
    _assert_norm_close(n, exact, w.float(), f"norm kernel {dtype} r{r}")


def test_compiled_norm_fallback_and_zero_magnitude_match_eager():
    """Under ``torch.compile(fullgraph=True)`` the cancelling row's exact sum and a zero magnitude's dm take
    traced branches (``torch.cond``; eager's ``nonzero`` would break the graph): the norm as exact as eager's,
    and the same output and gradients as eager with m_3 = 0."""
    w, a, b, s = _cancelling_case()
    exact = dora_norm_ref(w.double(), a.double(), b.double(), s)
    torch._dynamo.reset()
    n = torch.compile(lambda w, a, b: dora_norm(w, a, b, s), fullgraph=True, backend="aot_eager")(w, a, b)
    _assert_norm_close(n, exact, w, "compiled norm with fallback")
    x, w, _, a, b, m = (t.float() if t is not None else None for t in _case(5, 48, 40, 4))
    m[3] = 0.0
    dy = torch.randn(5, 40, generator=torch.Generator().manual_seed(4))

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, m)]
        y = fn(*leaves)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))

    def op(x, a, bb, m):
        return dora_linear(x, w, None, a, bb, m, s)

    want = grads(op)
    assert torch.isfinite(want[4]).all() and float(want[4][3].abs()) > 0
    torch._dynamo.reset()
    got = grads(torch.compile(op, fullgraph=True, backend="aot_eager"))
    for name, g, e in zip(("y", "dx", "dA", "dB", "dm"), got, want):
        assert_close_report(g, e, 1e-5, 1e-6 * float(e.abs().max()), f"compiled {name}")


def test_norm_factored_odd_shapes_and_cache():
    t = _case(1, 130, 100, 24, dtype=torch.float32)
    w, a, b = t[1], t[3], t[4]
    exact = dora_norm_ref(w.double(), a.double(), b.double(), 0.7)
    n, rows = dora_norm_factored(w, a, b, 0.7)
    assert rows.numel() == 0
    assert_close_report(n, exact, 2e-6, 0.0, "factored")
    assert_close_report(dora_norm(w, a, b, 0.7, weight_sq_norms(w)), n, 0.0, 0.0, "cached ‖W‖²")


# ----------------------------------------------------------------------------------------------------
# kernels (TRITON_INTERPRET=1) against the fp64 oracle, fp32 and bf16
# ----------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("kernel_stream_reference")
@pytest.mark.parametrize("p,mode", MODES)
@pytest.mark.parametrize("shape", [(33, 80, 48, 8), (7, 48, 130, 16)], ids=["M33-K80-N48-r8", "M7-K48-N130-r16"])
def test_kernels_fp32(shape, p, mode):
    t = _case(*shape)
    dy = torch.randn(shape[0], shape[2], dtype=torch.float64)
    want = _run(_ref(p, mode), t, torch.float64, dy)
    got = _run(_ours("triton", p, mode), t, torch.float32, dy)
    for name, a, e in zip(NAMES, got, want):
        assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


@pytest.fixture
def forced_fused_shrink(monkeypatch):
    """FASTPEFT_LORA_GEMM=tma-shrink, and a list that records each launch of the fused forward."""
    pytest.importorskip("triton")
    from fastpeft.kernels import lora_tma as KT
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "tma-shrink")
    ran, real, real_bwd = [], KT.lora_forward_tma, KT.dora_backward_tma
    monkeypatch.setattr(KT, "lora_forward_tma", lambda **kw: ran.append(("fwd", kw["col_scale"].shape)) or real(**kw))
    monkeypatch.setattr(KT, "dora_backward_tma", lambda **kw: ran.append(("bwd", kw["g"].shape)) or real_bwd(**kw))
    return ran


@pytest.mark.usefixtures("kernel_stream_reference")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p,mode", [MODES[0], MODES[2]])
@pytest.mark.parametrize("shape", [(33, 80, 48, 8), (7, 48, 136, 16)], ids=["M33-K80-N48-r8", "M7-K48-N136-r16"])
def test_kernels_fused_shrink_fp32(forced_fused_shrink, shape, p, mode, bias):
    """The plain forward on the TMA GEMM with the shrink fused and g in its epilogue, the backward's dX, v, dB
    and dm from one TMA kernel over dY (sm_90+; forced here): output and every gradient as the fp64
    oracle's."""
    t = _case(*shape, bias=bias)
    dy = torch.randn(shape[0], shape[2], dtype=torch.float64)
    want = _run(_ref(p, mode), t, torch.float64, dy)
    got = _run(_ours("triton", p, mode), t, torch.float32, dy)
    # the fused backward holds ranks up to 16 without dropout's mask (kernels.lora_tma.dora_dy_pass_fits)
    assert forced_fused_shrink == [("fwd", (shape[2],))] + ([("bwd", (shape[2],))] if p == 0 else [])
    for name, a, e in zip(NAMES, got, want):
        if e is not None:
            assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


@pytest.mark.usefixtures("kernel_stream_reference")
@pytest.mark.parametrize("m_trains", [True, False], ids=["dm", "no-dm"])
def test_the_fused_backward_is_asked_for_the_magnitude_partials_only_when_m_trains(forced_fused_shrink, monkeypatch,
                                                                                  m_trains):
    """The plain backward's choice of the fused TMA dY pass asks ``dora_dy_pass_fits`` with ``dm_part`` exactly when
    the magnitude needs its gradient (the partials of dm take shared memory: with them fewer configs fit, none in
    fp32); where it says no, the kernels' path runs and the gradients are still the oracle's."""
    from fastpeft.kernels import lora_tma as KT
    asked, real = [], KT.dora_dy_pass_fits
    monkeypatch.setattr(KT, "dora_dy_pass_fits", lambda *a, **kw: asked.append(kw.get("dm_part")) or real(*a, **kw))
    t = _case(33, 80, 48, 8)
    dy = torch.randn(33, 48, dtype=torch.float64)
    leaves = [None if v is None else v.detach().float().requires_grad_(i == 5 and m_trains or i in (0, 3, 4))
              for i, v in enumerate(t)]
    y = _ours("triton", 0.0, "exact")(*leaves)
    y.backward(dy.float())
    assert asked and set(asked) == {m_trains} and forced_fused_shrink[-1][0] == "bwd"  # the op's, the launcher's
    monkeypatch.setattr(KT, "dora_dy_pass_fits", lambda *a, **kw: False)  # no config holds it: the kernels' path
    forced_fused_shrink.clear()
    leaves2 = [None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for v in leaves]
    _ours("triton", 0.0, "exact")(*leaves2).backward(dy.float())
    assert [k for k, _ in forced_fused_shrink] == ["fwd"]
    for a, b, name in zip(leaves2, leaves, ("x", "W", "b", "A", "B", "m")):
        if b is not None and b.grad is not None:
            assert_close_report(a.grad, b.grad, 1e-5, 1e-5 * float(b.grad.abs().max()), name)


@pytest.fixture
def forced_decode(monkeypatch):
    """FASTPEFT_LORA_GEMM=decode, and a list that records each launch of the one-launch decode forward."""
    pytest.importorskip("triton")
    from fastpeft.kernels import quant as KQ
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "decode")
    ran, real = [], KQ.lora_decode
    monkeypatch.setattr(KQ, "lora_decode", lambda *a, **kw: ran.append(kw["col_scale"].shape) or real(*a, **kw))
    return ran


@pytest.mark.usefixtures("kernel_stream_reference")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p,mode", MODES)
@pytest.mark.parametrize("shape", [(33, 80, 48, 8), (1, 48, 136, 16), (64, 130, 40, 24)],
                         ids=["M33-K80-N48-r8", "M1-K48-N136-r16", "M64-K130-N40-r24"])
def test_kernels_decode_fp32(forced_decode, shape, p, mode, bias):
    """The plain forward in one launch (``kernels.quant.lora_decode``: g in its epilogue, u written for the
    backward): output and every gradient as the fp64 oracle's; PEFT's exact dropout mode keeps its own GEMMs."""
    t = _case(*shape, bias=bias)
    dy = torch.randn(shape[0], shape[2], dtype=torch.float64)
    want = _run(_ref(p, mode), t, torch.float64, dy)
    got = _run(_ours("triton", p, mode), t, torch.float32, dy)
    assert forced_decode == ([] if p > 0 and mode == "exact" else [(shape[2],)])
    for name, a, e in zip(NAMES, got, want):
        if e is not None:
            assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


@pytest.mark.usefixtures("kernel_stream_reference")
def test_kernels_decode_bf16_and_eval(forced_decode):
    """bf16 within 2x PyTorch's error through the decode forward; an eval call (no autograd, the norm cached)
    launches it alone and gives the reference's output."""
    t = _case(16, 80, 48, 8, dtype=torch.float32)
    t[5] = t[5] * 4.0
    _assert_bf16_error_at_most_twice_pytorchs(0.0, "exact", t, torch.randn(16, 48))
    assert len(forced_decode) == 1
    x, w, b, a, bb, m = (v.to(torch.float32) for v in t)
    with torch.no_grad():
        got = dora_linear(x, w, b, a, bb, m, 1.5, 0.1, False, 7, "exact", backend="triton", norm_cache={})
        want = dora_linear_ref(x.double(), w.double(), b.double(), a.double(), bb.double(), m.double(), 1.5, 0.1,
                               False, 7, "exact")
    assert len(forced_decode) == 2
    assert_close_report(got, want, 2e-5, 2e-5 * float(want.abs().max()), "eval y")


@pytest.mark.usefixtures("kernel_stream_reference")
def test_kernels_fused_shrink_bf16_and_exact_mode(forced_fused_shrink):
    """bf16 within 2x PyTorch's error on the fused forward and backward; PEFT's exact dropout mode keeps its
    own GEMMs (two accumulators), which the fused kernels do not have."""
    t = _case(33, 80, 48, 8, dtype=torch.float32)
    t[5] = t[5] * 4.0
    _assert_bf16_error_at_most_twice_pytorchs(0.0, "lora_only", t, torch.randn(33, 48))
    assert [kind for kind, _ in forced_fused_shrink] == ["fwd", "bwd"]
    _assert_bf16_error_at_most_twice_pytorchs(0.25, "lora_only", t, torch.randn(33, 48))
    assert [kind for kind, _ in forced_fused_shrink] == ["fwd", "bwd", "fwd"]  # the mask: the DX GEMM's backward
    _run(_ours("triton", 0.25, "exact"), t, torch.float32, torch.randn(33, 48))
    assert len(forced_fused_shrink) == 3


@pytest.mark.usefixtures("kernel_stream_reference")
def test_kernels_noncontiguous_x():
    t = _case(20, 80, 48, 8, dtype=torch.float32)
    t[0] = torch.randn(80, 20).t()  # (20, 80), column-major
    dy = torch.randn(20, 48)
    want = _run(_ref(0.25, "exact"), [u.double() for u in t], torch.float64, dy.double())
    got = _run(_ours("triton", 0.25, "exact"), t, torch.float32, dy)
    for name, a, e in zip(NAMES, got, want):
        assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


def _assert_bf16_error_at_most_twice_pytorchs(p, mode, t, dy):
    """The flash-attention rule: the kernel's bf16 error against an fp32 reference is at most 2x that of
    the same formula run by PyTorch in bf16 (plus a tiny atol), for the output and every gradient."""
    ref32 = _run(_ref(p, mode), t, torch.float32, dy)
    torch16 = _run(_ref(p, mode), t, torch.bfloat16, dy)
    ours16 = _run(_ours("triton", p, mode), t, torch.bfloat16, dy)
    for name, a, pt, e in zip(NAMES, ours16, torch16, ref32):
        err = float((a.float() - e).abs().max())
        err_pt = float((pt.float() - e).abs().max())
        assert err <= 2 * err_pt + 1e-4 * float(e.detach().abs().max()), \
            f"{name}: kernel {err:.3g} vs PyTorch {err_pt:.3g}"


@pytest.mark.usefixtures("kernel_stream_reference")
@pytest.mark.parametrize("p,mode,bias_scale", [pytest.param(*m.values, 1.0, id=m.id) for m in MODES]
                         + [pytest.param(0.0, "exact", 30.0, id="p0-bias30")])
def test_kernels_bf16_error_at_most_twice_pytorchs(p, mode, bias_scale):
    """The flash-attention rule (``_assert_bf16_error_at_most_twice_pytorchs``). bias30: a bias 30x larger,
    where dm, read back from the bf16 output as Σ dY (y − b) / m, loses most."""
    shape = (33, 80, 48, 8)
    t = _case(*shape, dtype=torch.float32)
    t[5] = t[5] * 4.0  # g ≈ 4 so that bf16 rounding of the output and of z are well apart from zero effects
    t[2] = t[2] * bias_scale
    dy = torch.randn(shape[0], shape[2])
    _assert_bf16_error_at_most_twice_pytorchs(p, mode, t, dy)


# ----------------------------------------------------------------------------------------------------
# against PEFT 0.21's DoRA, same A, B, m: outputs and gradients to 1e-5 in fp32
# ----------------------------------------------------------------------------------------------------

class _FastpeftDropout(nn.Module):
    """PEFT's lora_dropout module replaced by fastpeft's mask (the reference backend's stream for x), so that
    both draw the same x̃."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return lora_dropout_stream(x, self.p, self.seed)


def _peft_dora(K, N, r, alpha, p, bias):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(K, N, bias=bias))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=True, lora_dropout=p,
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(N))
    return pm, layer


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p,training", [(0.0, True), (0.2, True), (0.2, False)],
                         ids=["p0", "p0.2-train", "p0.2-eval"])
def test_matches_peft_dora(backend, p, training, request):
    if backend == "triton":  # on CPU tensors the kernels draw their Philox stream; the reference path its own
        request.getfixturevalue("kernel_stream_reference")
    K, N, r, alpha, seed = 48, 40, 8, 16, 11
    pm, layer = _peft_dora(K, N, r, alpha, p, bias=True)
    pm.train(training)
    if p > 0:
        layer.lora_dropout["default"] = _FastpeftDropout(p, seed)
    x = torch.randn(3, 11, K)
    dy = torch.randn(3, 11, N)
    a_p, b_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m_p = layer.lora_magnitude_vector["default"].weight
    xp = x.clone().requires_grad_()
    yp = pm(xp)
    yp.backward(dy)
    base = layer.get_base_layer()
    leaves = [x.clone().requires_grad_(), a_p.detach().clone().requires_grad_(),
              b_p.detach().clone().requires_grad_(), m_p.detach().clone().requires_grad_()]
    y = dora_linear(leaves[0], base.weight.detach(), base.bias.detach(), leaves[1], leaves[2], leaves[3],
                    layer.scaling["default"], p, training, seed, "exact", backend=backend)
    y.backward(dy)
    assert_close_report(y, yp, 1e-5, 1e-5, "y")
    for name, ours, theirs in zip(("dx", "dA", "dB", "dm"), leaves, (xp, a_p, b_p, m_p)):
        e = theirs.grad
        assert_close_report(ours.grad, e, 1e-5, 1e-5 * float(e.detach().abs().max()), name)


# ----------------------------------------------------------------------------------------------------
# GPU: the autotuned configs (the interpreter runs the explicit test blocks only)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("p,mode", MODES)
def test_gpu_autotuned_bf16_error_at_most_twice_pytorchs(p, mode):
    shape = (1000, 1024, 1536, 16)
    t = [u.cuda() for u in _case(*shape, dtype=torch.float32)]
    dy = torch.randn(shape[0], shape[2], device="cuda")
    _assert_bf16_error_at_most_twice_pytorchs(p, mode, t, dy)


def test_opcheck_registered_ops():
    from fastpeft.kernels import dora as KD
    if not KD._HAS_TRITON_OP:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    x, w, b, a, bb, m = _case(33, 48, 40, 8, dtype=torch.float32)
    u, g = torch.randn(33, 8), torch.rand(40) + 0.5
    dy = torch.randn(33, 40)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastpeft.dora_norm.default, (w, a, bb, 0.5), test_utils=tests)
    torch.library.opcheck(torch.ops.fastpeft.dora_gemm.default,
                          (KD.FWD_EXACT, x, w.t(), u, bb.t(), g, b, 0.5, 3, 2**30, 1.3, None), test_utils=tests)
    torch.library.opcheck(torch.ops.fastpeft.dora_gemm.default,
                          (KD.DM_EXACT, x, w.t(), u, bb.t(), g, None, 0.5, 3, 2**30, 1.3, dy), test_utils=tests)
    torch.library.opcheck(torch.ops.fastpeft.dora_dy_pass.default, (dy, dy, g, b, bb), test_utils=tests)


def _peak_cpu_bytes(fn):
    """Peak of the bytes torch allocates on the CPU while fn runs, above what existed before (profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def test_cpu_path_dropout_is_the_cpu_stream_and_four_weight_gemms():
    """On CPU tensors the PyTorch path draws the CPU path's dropout stream (``lora_dropout_cpu``, SplitMix64: the
    kernels' Philox one in PyTorch int64 ops cost more than the GEMMs, and made p > 0 slower than PEFT), and a
    training step in the exact mode does PEFT's four (M, K, N) GEMMs, not five: z = x̃ Wᵀ + s u Bᵀ is kept from
    the forward for dm instead of recomputed."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastpeft.reference import lora_dropout_cpu, lora_dropout_ref
    M, K, N, r, s, p, seed = 64, 96, 80, 4, 1.5, 0.25, 5
    t = _case(M, K, N, r, dtype=torch.float64)
    y = dora_linear(*t, s, p, True, seed, "exact")
    x, w, b, a, bb, m = t
    g = m / dora_norm_ref(w, a, bb, s)
    for drop, same in ((lora_dropout_cpu, True), (lora_dropout_ref, False)):
        xd = drop(x, p, seed)
        want = x @ w.t() + (g - 1) * (xd @ w.t()) + g * (s * (xd @ a.t()) @ bb.t()) + b
        assert torch.allclose(y, want, rtol=1e-12, atol=1e-12) == same
    leaves = [u.detach().clone().requires_grad_(i != 1) for i, u in enumerate(_case(M, K, N, r))]
    dy = torch.randn(M, N)
    with FlopCounterMode(display=False) as fc:
        dora_linear(*leaves, s, p, True, seed, "exact").backward(dy)
    gemm = 2 * M * K * N
    assert 4 * gemm <= fc.get_total_flops() < 4.5 * gemm, fc.get_total_flops() / gemm


@pytest.mark.parametrize("mode", ["exact", "lora_only"])
def test_backward_redraws_the_forwards_stream(mode):
    """The backward redraws the mask of the stream the forward drew (kept on ctx), even where the stream switch
    changes in between (``kernel_stream_on_cpu`` around the forward only): the same gradients as a step taken
    wholly under it."""
    from fastpeft.reference import kernel_stream_on_cpu
    t = _case(17, 48, 40, 4)
    dy = torch.randn(17, 40, dtype=torch.float64)
    with kernel_stream_on_cpu():
        want = _run(_ours("reference", 0.25, mode), t, torch.float64, dy)
        leaves = [None if u is None else u.detach().clone().requires_grad_() for u in t]
        y = _ours("reference", 0.25, mode)(*leaves)
    y.backward(dy)  # outside: the CPU stream is what a fresh draw would take now
    for name, got, w in zip(NAMES[1:], [u.grad if u is not None else None for u in leaves], want[1:]):
        if w is not None:
            assert torch.equal(got, w), name


def test_reference_path_has_no_out_by_in_temporary():
    """Few tokens, a large W: DoRA's forward + backward (norm included) allocates far less than one
    (out, in) fp32 matrix, where PEFT's W + sBA (and the oracle) needs several."""
    t = _case(4, 512, 768, 8, dtype=torch.float32)
    t = [u.requires_grad_(i != 1) for i, u in enumerate(t)]
    dy = torch.randn(4, 768)
    nk = 768 * 512 * 4

    def ours():
        dora_linear(*t, 1.5, 0.25, True, 3, "exact").backward(dy)

    def oracle():
        _ref(0.25, "exact")(*t).backward(dy)

    assert _peak_cpu_bytes(oracle) >= nk  # the measurement sees an (out, in) temporary where there is one
    assert _peak_cpu_bytes(ours) < nk / 8, f"peak {_peak_cpu_bytes(ours)} B vs one (out, in) fp32: {nk} B"


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("mode", ["exact", "lora_only"])
def test_second_derivatives_match_autograd_of_the_oracle(mode, p):
    """create_graph=True: the gradients of x, W, A, B, m are themselves differentiable, and their derivatives
    equal those of autograd through ``dora_linear_ref`` (the same mask, the norm detached), fp64. The fast
    backward's saved u and g carry no graph; the Function recomputes its formula by recorded ops instead."""
    tensors = _case(5, 12, 7, 3)
    dy = torch.randn(5, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def seconds(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        firsts = torch.autograd.grad((y * dy).sum(), leaves, create_graph=True)
        probe = sum((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view(g.shape)).sum() for g in firsts)
        return list(firsts) + list(torch.autograd.grad(probe, leaves, allow_unused=True))
    got, want = seconds(_ours("reference", p, mode)), seconds(_ref(p, mode))
    names = [f"d{n}" for n in ("x", "W", "b", "A", "B", "m")] + [f"d(probe)/d{n}" for n in ("x", "W", "b", "A", "B", "m")]
    for name, g_, w_ in zip(names, got, want):
        if w_ is None:
            assert g_ is None or not g_.abs().max(), name
            continue
        assert_close_report(g_, w_, 1e-10, 1e-10, f"{mode} p{p} {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_output_changed_in_place_before_backward(backend):
    """nn.ReLU(inplace=True) or ``h += r`` after a DoRA layer: the plain backward, which reads z from the output,
    recomputes it from x instead (before 2026-12-01 backward raised "modified by an inplace operation")."""
    t = _case(9, 48, 40, 4)
    dy = torch.randn(9, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def relu_inplace(fn):
        return lambda *leaves: fn(*leaves).relu_()
    want = _run(relu_inplace(_ref(0.0, "exact")), t, torch.float64, dy)
    got = _run(relu_inplace(_ours(backend, 0.0, "exact")), t, torch.float32, dy)
    for name, a, e in zip(NAMES, got, want):
        if e is not None:
            assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_output_changed_in_place_under_checkpointing(backend, reentrant):
    """Inside activation checkpointing, whose non-reentrant recomputation autograd does not version-check: the
    output changed in place after the DoRA layer gives the oracle's gradients (the saved y gave dm 140% off)."""
    from torch.utils.checkpoint import checkpoint
    t = _case(9, 48, 40, 4)
    dy = torch.randn(9, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def checkpointed(fn):
        def body(*leaves):
            y = fn(*leaves)
            y += 1.0
            return y.relu_()
        return lambda *leaves: checkpoint(body, *leaves, use_reentrant=reentrant)
    want = _run(checkpointed(_ref(0.0, "exact")), t, torch.float64, dy)
    got = _run(checkpointed(_ours(backend, 0.0, "exact")), t, torch.float32, dy)
    for name, a, e in zip(NAMES, got, want):
        if e is not None:
            assert_close_report(a, e, 2e-5, 2e-5 * float(e.detach().abs().max()), name)


def test_plain_output_is_not_kept_alive_after_backward():
    """The eager plain mode holds y through an alias the backward drops: after backward, with the graph still
    referenced (a training loop keeps its loss until the next step), y's memory is free."""
    from torch.multiprocessing.reductions import StorageWeakRef
    leaves = [t.detach().float().requires_grad_() for t in _case(9, 48, 40, 4)]
    y = dora_linear(*leaves, 1.5, 0.0, True, None, "exact")
    ref = StorageWeakRef(y.untyped_storage())
    loss = (y * 2.0).sum()  # the graph keeps the Function's node, its ctx too
    del y
    loss.backward(retain_graph=True)
    assert ref.expired()
    loss.backward()  # a second backward recomputes z: gradients twice the first's
    assert torch.isfinite(leaves[5].grad).all()
