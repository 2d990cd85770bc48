"""Fused LoRA kernels (triton backend) against the float64 reference: forward, every gradient, dropout,
saved tensors, op registration. Runs under TRITON_INTERPRET=1 on CPU tensors (small odd shapes) and on
CUDA where present; tests marked ``gpu`` need a GPU."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import DTYPES, assert_close_report, lora_inputs, triton_backend_device  # noqa: E402

# The kernels are compared with the reference backend: on CPU tensors it must draw the kernels' Philox masks
# (the oracle), not the CPU path's own stream.
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")
from fastpeft import kernels  # noqa: E402
from fastpeft.reference import dropout_mask, lora_linear_ref  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import _common as C  # noqa: E402
from fastpeft.kernels import lora as K  # noqa: E402

SHAPES = [(1, 48, 80, 1), (7, 80, 48, 8), (33, 130, 48, 16), (100, 48, 130, 24), (7, 48, 33, 128), (17, 64, 40, 17)]


def _make(m, k, n, r, dtype, bias=True, seed=0, lead=()):
    inputs = lora_inputs(torch.Generator().manual_seed(seed), m, k, n, r, bias, lead)
    return [t.to(DEV, dtype) if t is not None else None for t in inputs]


def _run(backend, x, w, b, a, bb, s, p, seed, dy, grads_wb=False):
    """Output and gradients (x, A, B[, W, b]) of one call, on copies that require grad."""
    x, a, bb = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    w = w.detach().clone().requires_grad_(grads_wb)
    b = b.detach().clone().requires_grad_(grads_wb) if b is not None else None
    y = fastpeft.lora_linear(x, w, b, a, bb, s, dropout_p=p, training=True, seed=seed, backend=backend)
    inputs = [x, a, bb] + ([w] + ([b] if b is not None else []) if grads_wb else [])
    return [y] + list(torch.autograd.grad(y, inputs, dy))


def _check_against_reference(case, x, w, b, a, bb, s, p, seed, grads_wb=False):
    """fp32: close to fp64 (rtol 1e-5). fp16/bf16: error vs fp64 at most 2x PyTorch's own in that dtype."""
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64).to(x.device, x.dtype)
    got = _run("triton", x, w, b, a, bb, s, p, seed, dy, grads_wb)
    exact = _run("reference", *(t.double() if t is not None else None for t in (x, w, b, a, bb)), s, p, seed,
                 dy.double(), grads_wb)
    names = ["y", "dx", "dA", "dB", "dW", "db"]
    if x.dtype == torch.float32:
        for name, g, e in zip(names, got, exact):
            assert g.dtype == torch.float32
            assert_close_report(g, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()), what=f"{case} {name}")
        return
    torch_low = _run("reference", x, w, b, a, bb, s, p, seed, dy, grads_wb)
    for name, g, e, t in zip(names, got, exact, torch_low):
        assert g.dtype == x.dtype, name
        err = (g.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        tiny = 1e-3 * e.abs().max().item()
        assert err <= 2 * torch_err + tiny, f"{case} {name}: kernel error {err:.3g} > 2 x PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
def test_forward_and_every_gradient(m, k, n, r, dt, p, bias):
    x, w, b, a, bb = _make(m, k, n, r, DTYPES[dt], bias)
    _check_against_reference(f"M{m}-K{k}-N{n}-r{r}-{dt}-p{p}", x, w, b, a, bb, 0.75, p, seed=1234)


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_both_gemm_variants(monkeypatch, gemm, dt):
    """The fused-epilogue GEMM and the cuBLAS + in-place low-rank update compute the same thing."""
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    for p in (0.0, 0.2):
        x, w, b, a, bb = _make(33, 80, 48, 8, DTYPES[dt])
        _check_against_reference(f"{gemm}-{dt}-p{p}", x, w, b, a, bb, 2.0, p, seed=77)


def test_bad_gemm_choice(monkeypatch):
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "fastest")
    x, w, b, a, bb = _make(3, 48, 48, 4, torch.float32)
    with pytest.raises(ValueError, match="FASTPEFT_LORA_GEMM must be one of"):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="triton")


def test_weight_and_bias_gradients_when_required():
    x, w, b, a, bb = _make(33, 48, 80, 8, torch.float32)
    _check_against_reference("dW-db", x, w, b, a, bb, 0.5, 0.1, seed=3, grads_wb=True)


def test_leading_dims_and_noncontiguous_input():
    x, w, b, a, bb = _make(5, 48, 40, 8, torch.float32, lead=(2, 3))
    _check_against_reference("lead", x, w, b, a, bb, 1.0, 0.1, seed=5)
    xt = x.transpose(0, 1)  # (3, 2, 5, 48), not contiguous
    assert not xt.is_contiguous()
    _check_against_reference("transposed", xt, w, b, a, bb, 1.0, 0.1, seed=5)
    xs = torch.randn(9, 96, device=DEV)[:, ::2]  # strided last dim
    _check_against_reference("strided", xs, w, b, a, bb, 1.0, 0.0, seed=5)


def test_empty_batch():
    x, w, b, a, bb = _make(0, 48, 40, 8, torch.float32)
    x.requires_grad_()
    y = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert x.grad.shape == (0, 48)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_reference_mask(p):
    """The shrink kernel's in-load mask is exactly dropout_mask(seed): keep-rate 1 - p, scale 1/(1-p)."""
    m, k = 100, 130
    x = torch.ones(m, k, device=DEV)
    eye = torch.eye(k, device=DEV)  # u = drop(x) @ I = drop(x)
    u = K.lora_shrink(x, eye, 1.0 / (1 - p), 42, fastpeft.reference.dropout_threshold(p), k, 1)
    keep = dropout_mask(42, m, k, p, device=DEV)
    torch.testing.assert_close(u, keep.float() / (1 - p), rtol=0, atol=1e-6)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03


def test_backward_applies_the_forwards_mask():
    """dX's low-rank part is masked exactly where the forward dropped x (W = 0 isolates it)."""
    m, k, n, r, p = 33, 80, 48, 8, 0.5
    x, w, b, a, bb = _make(m, k, n, r, torch.float32)
    w = torch.zeros_like(w)
    x.requires_grad_()
    y = fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, seed=11, backend="triton")
    y.backward(torch.randn_like(y))
    keep = dropout_mask(11, m, k, p, device=DEV)
    assert bool((x.grad[~keep] == 0).all()) and bool((x.grad[keep] != 0).all())


def test_same_seed_same_bits_other_seed_differs():
    x, w, b, a, bb = _make(33, 80, 48, 8, torch.float32)
    dy = torch.randn(33, 48, device=DEV)
    r1 = _run("triton", x, w, b, a, bb, 1.0, 0.3, 5, dy)
    r2 = _run("triton", x, w, b, a, bb, 1.0, 0.3, 5, dy)
    r3 = _run("triton", x, w, b, a, bb, 1.0, 0.3, 6, dy)
    assert all(torch.equal(u, v) for u, v in zip(r1, r2))  # deterministic: no atomics
    assert not torch.equal(r1[0], r3[0])


def test_no_dropped_copy_of_x_is_saved():
    """Saved for backward: x itself, u (M, r) fp32 and the parameters; nothing else of x's size."""
    m, k, n, r = 64, 80, 48, 8
    x, w, b, a, bb = _make(m, k, n, r, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for backend, expect_copy in (("triton", False), ("reference", True)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, seed=1, backend=backend)
        big = [t for t in saved if t.numel() >= m * k and t.data_ptr() != x.data_ptr()
               and t.data_ptr() != w.data_ptr()]
        assert bool(big) == expect_copy, (backend, [tuple(t.shape) for t in big])
        if backend == "triton":
            extra = sum(t.numel() * t.element_size() for t in saved
                        if t.data_ptr() not in (x.data_ptr(), w.data_ptr(), a.data_ptr(), bb.data_ptr()))
            assert extra <= m * r * 4, extra  # only u, M x r fp32


def test_layer_and_injected_model_on_triton_backend():
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.1, init_lora_weights=False).to(DEV)
    x = torch.randn(3, 7, 48, device=DEV)
    for train in (True, False):
        layer.train(train)
        torch.manual_seed(2)
        ref = layer(x)
        with fastpeft.use_backend("triton"):
            torch.manual_seed(2)
            out = layer(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_autocast_cpu_bf16_like_linear():
    if DEV != "cpu":
        pytest.skip("CPU autocast")
    x, w, b, a, bb = _make(7, 48, 40, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        ref = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend="reference")
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = lora_linear_ref(*(t.double() for t in (x, w, b, a, bb)), 1.0)
    assert (y.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + 1e-3


def test_fp32_follows_matmul_precision_policy():
    assert K._dot_precision(torch.float32) == ("ieee" if torch.get_float32_matmul_precision() == "highest"
                                               else "tf32")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert K._dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)
    assert K.r_pad(1) == 16 and K.r_pad(17) == 32 and K.r_pad(128) == 128


@pytest.mark.skipif(not K._HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck_registered_ops():
    x, w, b, a, bb = _make(33, 48, 40, 8, torch.float32)
    u = torch.randn(33, 8, device=DEV)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastpeft.lora_shrink.default, (x, a.t(), 1.25, 7, 2**30, 48, 1), test_utils=tests)
    torch.library.opcheck(torch.ops.fastpeft.lora_gemm.default, (x, w.t(), u, bb.t(), b, 0.5, 0, 0), test_utils=tests)
    torch.library.opcheck(torch.ops.fastpeft.lora_lowrank_add_.default,
                          (torch.randn(33, 40, device=DEV), u, bb.t(), 0.5, 3, 2**31), test_utils=tests)


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_gpu_llm_shape_matches_reference(dt):
    x, w, b, a, bb = _make(2048, 4096, 4096, 16, DTYPES[dt])
    _check_against_reference(f"gpu-{dt}", x, w, b, a, bb, 2.0, 0.1, seed=1)


@pytest.mark.gpu
def test_gpu_auto_backend_picks_triton():
    from fastpeft.functional import resolve_backend

    x = torch.randn(4, 8, device="cuda")
    assert resolve_backend("lora_linear", "auto", x) == "triton"


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, a, bb = _make(256, 512, 384, 16, torch.bfloat16)
    a.requires_grad_()
    bb.requires_grad_()

    def f(x, a, bb):
        return fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1, seed=3, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x, a, bb)
    torch.testing.assert_close(y, f(x, a, bb))
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None


def test_gemm_choice_rules(monkeypatch):
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    calls = []
    run = {"fused": lambda: calls.append("f"), "cublas": lambda: calls.append("c")}
    pick = K.choose_gemm(("k",), run, torch.device("cpu"))
    assert pick == "fused" and not calls  # off CUDA: no timing
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "cublas")
    assert K.choose_gemm(("k",), run, torch.device("cuda")) == "cublas"
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    monkeypatch.setattr(K, "INTERPRET", False)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert K.choose_gemm(("k",), run, torch.device("cuda")) == "cublas"  # pinned, not timed
    finally:
        torch.use_deterministic_algorithms(old)
    assert not calls


def test_eager_calls_launch_directly_and_compile_sees_the_ops(monkeypatch):
    kernel = K._lora_shrink_kernel
    assert C._wrap(kernel) is kernel  # eager: no dispatcher / wrap_triton on the launch path
    if K._HAS_TRITON_OP:
        with C._op_body():  # inside a registered op's body the launch goes through wrap_triton
            assert C._state.in_op
            if not kernels.INTERPRET:  # under the interpreter wrap_triton hands the kernel back as it is
                assert C._wrap(kernel) is not kernel
        assert not C._state.in_op
        calls = []
        monkeypatch.setattr(torch.ops.fastpeft, "lora_shrink", lambda *a: calls.append(a) or "op")
        call = C.eager_or_op(lambda *a: "launcher", lambda *a: torch.ops.fastpeft.lora_shrink(*a))
        assert call(1) == "launcher" and not calls
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert call(1) == "op" and calls == [(1,)]


def test_op_wrapper_binds_the_seed_by_name(monkeypatch):
    """Eager: the launcher, as called. While compiling: the op, with every argument in the launcher's
    order (its defaults filled in), and a tensor seed, given by position or by name, moved to seed_t."""
    calls = []

    def launcher(a, b, scale=1.0, seed=0, threshold=0):
        return "launcher"

    def op(*args, **kw):
        calls.append((args, kw))
        return "op"

    call = C.eager_or_op(launcher, op)
    assert call(1, 2, seed=5) == "launcher" and not calls
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    t = torch.tensor([7])
    assert call(1, 2, seed=t, threshold=3) == "op"
    call(1, 2, 0.5, t)
    call(1, 2, threshold=4, seed=9)
    assert calls == [((1, 2, 1.0, 0, 3), {"seed_t": t}), ((1, 2, 0.5, 0, 0), {"seed_t": t}), ((1, 2, 1.0, 9, 4), {})]


def test_split_heuristic(monkeypatch):
    """One rule for every split reduction: explicit blocks split in 2 past two blocks; on a GPU, enough
    programs for two per SM, each looping over at least 4 blocks, at most 64 partials."""
    t = torch.empty(1)
    monkeypatch.setattr(C, "_use_explicit_blocks", lambda t: True)
    assert C.split_count(t, 5, 32, 16) == 1 and C.split_count(t, 5, 33, 16) == 2
    monkeypatch.setattr(C, "_use_explicit_blocks", lambda t: False)
    monkeypatch.setattr(C, "_sm_count", lambda index: 132)
    assert C.split_count(t, 4, 10000, 64) == 40         # 4 blocks of 64 per partial at least
    assert C.split_count(t, 132, 10**6, 64) == 2        # two programs per SM
    assert C.split_count(t, 0, 10**7, 64) == 64         # no programs counted: no division by zero; capped
    assert C.split_count(t, 1000, 10**6, 64) == 1
    assert C.split_chunk(0, 3, 16) == (0, 1)
    assert C.split_chunk(100, 2, 16) == (64, 2)
    assert C.split_chunk(40, 4, 16) == (16, 3)          # recounted: no empty partial


@pytest.mark.parametrize("n", [48, 130, 37], ids=["N48", "N130", "N37"])  # N % 4 == 0 or not (Philox words)
@pytest.mark.parametrize("block_n", [32, 128, 256], ids=["BN32", "BN128-halves", "BN256-quarters"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_gemm_epilogue_subtiles_and_mask_words(block_n, n, p):
    """The fused GEMM at explicit BLOCK_N: the rank-R update as one more MMA (p=0) or, masked, formed in
    sub-tiles of the accumulator (halves at BLOCK_N 128, quarters at 256) with one Philox draw per 4
    columns, aligned (N % 4 == 0) or not, equals a @ b + s * mask * (lu @ lv) + bias with the reference mask."""
    m, k, r, s, seed = 33, 80, 8, 0.75, 77
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    lu, lv = torch.randn(m, r, generator=g) * 4, torch.randn(r, n, generator=g)  # a large update: a wrong mask shows
    bias = torch.randn(n, generator=g)
    thr = fastpeft.reference.dropout_threshold(p) if p else 0
    old = K.set_test_blocks(BLOCK_N=block_n)
    try:
        got = K.lora_gemm(a.to(DEV), b.to(DEV), lu.to(DEV), lv.to(DEV), bias.to(DEV), s, seed, thr)
    finally:
        K.set_test_blocks(**old)
    keep = dropout_mask(seed, m, n, p).double() if p else torch.ones(m, n, dtype=torch.float64)
    want = a.double() @ b.double() + s * keep * (lu.double() @ lv.double()) + bias.double()
    assert_close_report(got.cpu(), want, rtol=1e-5, atol=1e-4, what=f"BN{block_n} N{n} p{p}")
    if block_n == 32:  # the cuBLAS path's in-place update draws its mask the same way
        out = (a @ b + bias).to(DEV)
        K.lora_lowrank_add_(out, lu.to(DEV), lv.to(DEV), s, seed, thr)
        assert_close_report(out.cpu(), want, rtol=1e-5, atol=1e-4, what=f"low-rank add N{n} p{p}")


# ---- the dY pass: v = dY B and dB = s dY^T u from one read of dY (issue 12 item 2) ---------------------

DY_M, DY_N, DY_R = [1, 7, 33, 100], [48, 80, 130], [1, 8, 16, 24]


def _low_precision_rule(got, exact, torch_low, what):
    """fp32: close to fp64. fp16/bf16: the error vs fp64 at most 2x PyTorch's own in that dtype (+ a tiny atol)."""
    if torch_low is None:
        assert_close_report(got, exact, rtol=1e-5, atol=1e-5 * max(1.0, exact.abs().max().item()), what=what)
        return
    err = (got.double() - exact).abs()
    torch_err = (torch_low.double() - exact).abs().max().item()
    tiny = 1e-3 * exact.abs().max().item()
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max().item() <= 2 * torch_err + tiny, (
        f"{what}: kernel error {err.max().item():.3g} at {worst} (got {got.flatten()[err.argmax()].item():.6g}, "
        f"expected {exact.flatten()[err.argmax()].item():.6g}) > 2 x PyTorch's {torch_err:.3g}")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("r", DY_R, ids=[f"r{r}" for r in DY_R])
@pytest.mark.parametrize("n", DY_N, ids=[f"N{n}" for n in DY_N])
@pytest.mark.parametrize("m", DY_M, ids=[f"M{m}" for m in DY_M])
def test_dy_pass_kernel_matches_fp64(m, n, r, dt):
    """lora_dy_pass alone: v = dY B (fp32) and dB = s dY^T u (fp32, u rounded to dY's dtype as the shrink
    does) against fp64, across row blocks and (N > 64) column chunks of the explicit blocks."""
    dtype, s = DTYPES[dt], 0.75
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + r)
    dy, b = torch.randn(m, n, generator=g).to(dtype), (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    u = torch.randn(m, r, generator=g)  # fp32, as the forward's shrink leaves it
    v, db = K.lora_dy_pass(dy.to(DEV), b.to(DEV), u.to(DEV), s)
    assert v.dtype == db.dtype == torch.float32 and v.shape == (m, r) and db.shape == (n, r)
    ul = u.to(dtype)
    v_exact, db_exact = dy.double() @ b.double(), s * dy.double().t() @ ul.double()
    low = dtype != torch.float32
    case = f"M{m}-N{n}-r{r}-{dt}"
    _low_precision_rule(v.cpu(), v_exact, (dy @ b) if low else None, f"{case} v")
    _low_precision_rule(db.cpu(), db_exact, (dy.t() @ ul) * s if low else None, f"{case} dB")


def test_dy_pass_same_bits_twice_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(5)
    dy, b, u = torch.randn(100, 130, generator=g), torch.randn(130, 24, generator=g), torch.randn(100, 24, generator=g)
    dy, b, u = dy.to(DEV), b.to(DEV), u.to(DEV)
    one, two = K.lora_dy_pass(dy, b, u, 2.0), K.lora_dy_pass(dy, b, u, 2.0)
    for a_, b_ in zip(one, two):
        assert torch.equal(a_, b_)
    with pytest.raises(ValueError, match="lora_dy_pass"):
        K.lora_dy_pass(dy, b[:-1], u)
    v, db = K.lora_dy_pass(dy[:0], b, u[:0])
    assert v.shape == (0, 24) and not db.any()


@pytest.mark.skipif(not K._HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck_dy_pass_op():
    g = torch.Generator().manual_seed(6)
    dy, b, u = torch.randn(33, 80, generator=g), torch.randn(80, 8, generator=g), torch.randn(33, 8, generator=g)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastpeft.lora_dy_pass.default, (dy.to(DEV), b.to(DEV), u.to(DEV), 0.5),
                          test_utils=tests)


@pytest.fixture
def force_dy_pass(monkeypatch):
    """The backward's "kernels-dy1" composition wherever it is offered; records what was offered and that
    the dY pass ran."""
    from fastpeft.ops import lora as OL

    seen = {"offered": [], "ran": 0}
    real_choose, real_pass = OL.choose_path, K.dy_pass_op

    def choose(key, run, device):
        if key[0] == "bwd":
            seen["offered"].append(tuple(run))
            if "kernels-dy1" in run:
                return "kernels-dy1"
        return real_choose(key, run, device)

    def dy_pass(*args, **kwargs):
        seen["ran"] += 1
        return real_pass(*args, **kwargs)
    monkeypatch.setattr(OL, "choose_path", choose)
    monkeypatch.setattr(K, "dy_pass_op", dy_pass)
    return seen


DY1_SHAPES = [(1, 64, 48, 1), (7, 48, 80, 8), (33, 80, 130, 16), (100, 48, 130, 24), (33, 130, 48, 24)]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", DY1_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in DY1_SHAPES])
def test_backward_through_the_dy_pass(force_dy_pass, m, k, n, r, dt, p):
    """The whole layer, its backward forced onto "kernels-dy1": output and every gradient against fp64 (dA's
    mask redrawn from the forward's seed)."""
    x, w, b, a, bb = _make(m, k, n, r, DTYPES[dt])
    _check_against_reference(f"dy1 M{m}-K{k}-N{n}-r{r}-{dt}-p{p}", x, w, b, a, bb, 0.75, p, seed=1234)
    assert force_dy_pass["ran"] >= 1 and all(o[:2] == ("kernels", "kernels-dy1") for o in force_dy_pass["offered"])


NEEDS = [(True, True, True), (True, False, True), (False, True, True), (True, True, False), (False, False, True),
         (True, False, False), (False, True, False)]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("need", NEEDS, ids=["-".join(n for n, f in zip("xAB", nd) if f) for nd in NEEDS])
def test_dy_pass_gradient_subsets(force_dy_pass, need, p):
    """Each subset of (dX, dA, dB): "kernels-dy1" is offered exactly where v (dX or dA) and dB are both
    needed, and the gradients asked for match fp64."""
    need_x, need_a, need_b = need
    m, k, n, r, s, seed = 33, 80, 130, 16, 0.75, 21
    x, w, b, a, bb = _make(m, k, n, r, torch.float32)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(DEV)

    def run(backend, cast):
        leaves = [t.detach().to(cast).requires_grad_(f) for t, f in zip((x, a, bb), need)]
        y = fastpeft.lora_linear(leaves[0], w.to(cast), b.to(cast), leaves[1], leaves[2], s, dropout_p=p,
                                 training=True, seed=seed, backend=backend)
        wanted = [t for t in leaves if t.requires_grad]
        return list(torch.autograd.grad(y, wanted, dy.to(cast)))
    got, exact = run("triton", torch.float32), run("reference", torch.float64)
    for name, g_, e_ in zip([nm for nm, f in zip(("dx", "dA", "dB"), need) if f], got, exact):
        assert_close_report(g_, e_, rtol=1e-5, atol=1e-5 * max(1.0, e_.abs().max().item()), what=f"{need} {name}")
    both = (need_x or need_a) and need_b
    assert all(("kernels-dy1" in o) == both for o in force_dy_pass["offered"]) and force_dy_pass["offered"]
    assert (force_dy_pass["ran"] > 0) == both


def test_dy_pass_backward_same_bits_twice(force_dy_pass):
    x, w, b, a, bb = _make(100, 48, 130, 24, torch.bfloat16)
    dy = torch.randn(100, 130, generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    one, two = (_run("triton", x, w, b, a, bb, 0.5, 0.1, 99, dy) for _ in range(2))
    for name, g1, g2 in zip(("y", "dx", "dA", "dB"), one, two):
        assert torch.equal(g1, g2), name
    assert force_dy_pass["ran"] == 2


@pytest.mark.skipif(not K._HAS_TRITON_OP, reason="torch.library.triton_op needs torch >= 2.6")
def test_dy_pass_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces dy_pass_op as the registered op (no graph break), same numbers."""
    g = torch.Generator().manual_seed(8)
    dy, b, u = (torch.randn(*s, generator=g).to(DEV) for s in ((33, 80), (80, 8), (33, 8)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda dy, b, u: K.dy_pass_op(dy, b, u, scale=0.5), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(dy, b, u), K.lora_dy_pass(dy, b, u, 0.5)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 14336])
def test_gpu_dy_pass_llm_shape(n):
    """Autotuned (and pinned, deterministic) dY pass at an LLM shape: within 2x PyTorch's bf16 error, the
    same bits twice in deterministic mode."""
    g = torch.Generator().manual_seed(0)
    m, r, s = 2048, 16, 2.0
    dy = torch.randn(m, n, generator=g).to(DEV, torch.bfloat16)
    b = (torch.randn(n, r, generator=g) / r ** 0.5).to(DEV, torch.bfloat16)
    u = torch.randn(m, r, generator=g).to(DEV)
    v, db = K.lora_dy_pass(dy, b, u, s)
    ul = u.to(torch.bfloat16)
    _low_precision_rule(v, dy.double() @ b.double(), dy @ b, f"N{n} v")
    _low_precision_rule(db, s * dy.double().t() @ ul.double(), (dy.t() @ ul) * s, f"N{n} dB")
    with fastpeft.deterministic():
        one, two = K.lora_dy_pass(dy, b, u, s), K.lora_dy_pass(dy, b, u, s)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(one, two))


# ----------------------------------------------------------------------------------------------------
# the one-launch forward at decode sizes (kernels.quant.lora_decode, FASTPEFT_LORA_GEMM=decode)
# ----------------------------------------------------------------------------------------------------

DECODE_SHAPES = [(1, 48, 80, 1), (7, 80, 48, 8), (33, 130, 48, 16), (64, 48, 130, 24), (5, 64, 40, 64)]


@pytest.fixture
def force_decode(monkeypatch):
    """FASTPEFT_LORA_GEMM=decode, counting the launches of ``lora_decode`` and of the shrink / GEMM it replaces."""
    from fastpeft.kernels import quant as KQ

    calls = {"decode": 0, "shrink": 0}
    real_decode, real_shrink = KQ.lora_decode, K.shrink_op

    def decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    def shrink(*args, **kwargs):
        calls["shrink"] += 1
        return real_shrink(*args, **kwargs)
    monkeypatch.setattr(KQ, "lora_decode", decode)
    monkeypatch.setattr(K, "shrink_op", shrink)
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "decode")
    return calls


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("m,k,n,r", DECODE_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in DECODE_SHAPES])
def test_decode_forward_and_every_gradient(force_decode, m, k, n, r, dt, p):
    """The forward in one launch (y and u; the backward on the kernels from that u) against float64: output
    and every gradient, with and without dropout (the same mask as the shrink kernel's, redrawn in backward)."""
    x, w, b, a, bb = _make(m, k, n, r, DTYPES[dt], bias=m % 2 == 1)
    _check_against_reference(f"decode-M{m}-K{k}-N{n}-r{r}-{dt}-p{p}", x, w, b, a, bb, 0.75, p, seed=4321,
                             grads_wb=m == 7)
    assert force_decode["decode"] == 1  # the one forward; the shrinks counted are the backward's
    with torch.no_grad():
        force_decode["shrink"] = 0
        fastpeft.lora_linear(x, w, b, a, bb, 0.75, dropout_p=p, training=True, seed=1, backend="triton")
    assert force_decode == {"decode": 2, "shrink": 0}


def test_decode_kernel_u_strides_and_empty():
    """``lora_decode`` directly: u is the shrink kernel's (same mask), x and W read through any strides (a
    column slice of x, a transposed copy of W), and empty inputs give empty outputs without a launch."""
    from fastpeft.kernels import quant as KQ
    from fastpeft.reference import dropout_threshold

    g = torch.Generator().manual_seed(3)
    xs = torch.randn(7, 2 * 80, generator=g).to(DEV)[:, ::2]        # stride (160, 2)
    w = torch.randn(80, 48, generator=g).to(DEV).t()                # (48, 80), strides (1, 48)
    a, bb, bias = (torch.randn(*s, generator=g).to(DEV) for s in ((8, 80), (48, 8), (48,)))
    thr = dropout_threshold(0.25)
    y, u = KQ.lora_decode(xs, w, a, bb, bias, 1.5, 1 / 0.75, 11, thr)
    want_u = K.lora_shrink(xs, a.t(), 1 / 0.75, 11, thr, 80, 1)
    torch.testing.assert_close(u, want_u, rtol=1e-5, atol=1e-5)
    want = xs @ w.t() + bias + 1.5 * (want_u @ bb.t())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # a seed drawn on the device (CUDA-graph capture, torch.compile regions): read by the kernel, same bits
    y_t, u_t = KQ.lora_decode(xs, w, a, bb, bias, 1.5, 1 / 0.75, torch.tensor([11], device=DEV), thr)
    assert torch.equal(y_t, y) and torch.equal(u_t, u)
    y2, none = KQ.lora_decode(xs, w, a, bb, None, 1.5, 1.0, 0, 0, write_u=False)
    assert none is None
    torch.testing.assert_close(y2, xs @ w.t() + 1.5 * (xs @ a.t()) @ bb.t(), rtol=1e-5, atol=1e-5)
    for m, n in ((0, 48), (3, 0)):
        y0, u0 = KQ.lora_decode(xs[:m], w[:n], a, bb[:n], None, 1.0, 1.0, 0, 0)
        assert y0.shape == (m, n) and u0.shape == (m, 8)


def test_decode_is_offered_at_decode_sizes(monkeypatch):
    """The forward offers ``"decode"`` (after the kernels: ties and fixed modes keep them) up to DENSE_MAX_M
    rows, at any row count when forced, never while tracing; the backward never (forced: its kernels)."""
    from fastpeft.kernels import quant as KQ
    from fastpeft.ops import lora as OL

    seen = []
    real = OL.choose_path
    monkeypatch.setattr(OL, "choose_path", lambda key, run, device: seen.append((key[0], tuple(run)))
                        or real(key, run, device))

    def offered(m):
        x, w, a = (torch.randn(*s).to(DEV) for s in ((m, 48), (40, 48), (8, 48)))
        return tuple(OL.offered_forwards(x, w, a))
    assert offered(1) == offered(KQ.DENSE_MAX_M) == ("kernels", "torch", "decode")
    assert offered(KQ.DENSE_MAX_M + 1) == ("kernels", "torch")
    x, w, a, bb = (torch.randn(*s).to(DEV) for s in ((5, 48), (40, 48), (8, 48), (40, 8)))
    fastpeft.lora_linear(x.requires_grad_(), w, None, a, bb, 1.0, backend="triton").sum().backward()
    assert [k for k, _ in seen] == ["bwd"] and "decode" not in seen[0][1]  # the forward settled without candidates
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "decode")
    assert OL._decode_offered(KQ.DENSE_MAX_M + 1)
    assert OL._settled_forward(("fwd",), torch.device(DEV)) == "decode"  # forced: runs without building candidates
    with monkeypatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)  # a plain launcher: dynamo does not trace it
        assert not OL._decode_offered(1)
        assert OL._settled_forward(("fwd",), torch.device(DEV)) is None  # built, without decode: forcing it raises


def test_decode_forced_above_its_rows(force_decode):
    """FASTPEFT_LORA_GEMM=decode runs the one launch at any row count (DENSE_MAX_M only bounds what auto times)."""
    from fastpeft.kernels import quant as KQ

    x, w, b, a, bb = _make(KQ.DENSE_MAX_M + 3, 48, 40, 8, torch.float32)
    with torch.no_grad():
        y = fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend="triton")
    assert force_decode == {"decode": 1, "shrink": 0}
    torch.testing.assert_close(y, fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend="reference"), rtol=1e-5,
                               atol=1e-5)


def test_a_measured_path_this_call_cannot_take_falls_back_to_the_kernels(monkeypatch):
    """A key's measured winner that this call is not offered (the fused shrink, measured at 256 rows, for 200 rows
    of the same power-of-two bucket) runs the kernels instead, without re-timing: no KeyError, no TMA launch."""
    from fastpeft.kernels import lora_tma as KT
    from fastpeft.ops import lora as OL

    real = K.settled_choice
    monkeypatch.setattr(K, "settled_choice", lambda cache, key, device, fixed, first: "tma-shrink"
                        if cache is OL._path_cache and key[0] == "fwd" else real(cache, key, device, fixed, first))
    monkeypatch.setattr(KT, "lora_forward_tma", lambda **kw: pytest.fail("the fused shrink ran"))
    monkeypatch.setattr(K, "_bench", lambda fn: pytest.fail("re-timed"))
    x, w, b, a, bb = _make(OL.FUSED_SHRINK_MIN_ROWS - 56, 48, 40, 8, torch.float32)
    with torch.no_grad():
        y = fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend="triton")
    torch.testing.assert_close(y, fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend="reference"), rtol=1e-5,
                               atol=1e-5)


def test_decode_blocks_rule():
    """``dense_blocks``: 32-wide N tiles where 64-wide ones would leave SMs idle, at least 2 R_PAD wide (A, read
    by every program, stays at most half its W tile), BLOCK_M 16 up to 16 rows, 64 above; powers of two."""
    from fastpeft.kernels.quant import dense_blocks

    assert dense_blocks(1, 4096, 16, 132)[:3] == (16, 32, 128)   # 64 tiles of 64 < 132 SMs
    assert dense_blocks(16, 14336, 16, 132)[:3] == (16, 64, 128)  # 224 tiles of 64: every SM busy
    assert dense_blocks(1, 4096, 32, 132)[1] == 64 and dense_blocks(1, 4096, 64, 132)[1] == 128
    assert dense_blocks(1, 4096, 128, 132)[1] == 128
    assert dense_blocks(17, 4096, 16, 132)[0] == 64 and dense_blocks(64, 4096, 64, 132)[:3] == (64, 128, 32)
    for m in (1, 16, 64):
        for rp in (16, 32, 64, 128):
            bm, bn, bk, warps, stages = dense_blocks(m, 4096, rp, 132)
            assert all(v & (v - 1) == 0 and v >= 16 for v in (bm, bn, bk)) and bn >= min(128, 2 * rp)


def test_fixed_launch_blocks_fit_shared_memory_in_every_dtype():
    """The launches that do not autotune (the shrinks, the decode kernel, deterministic mode's pinned configs)
    keep their tuned blocks in 16-bit dtypes and cut stages (or BLOCK_Q) where fp32 tiles would not fit the
    227 KiB of shared memory an sm_90 block has: compiled for sm_90 (triton 3.6), the fp32 shrink at R_PAD 256 and
    3 stages took 245760 B, the decode kernel 307200 B, DoRA's pinned 128 x 128 x 64 262144 B, the pinned TMA
    GEMM 262168 B and more (benchmarks/results/sm90-resources-fp32-*.md: with these blocks, none above)."""
    from fastpeft.kernels import dora as D
    from fastpeft.kernels import lora_tma as T
    from fastpeft.kernels._common import SMEM_BUDGET, narrow_blocks
    from fastpeft.kernels.quant import dense_blocks

    hw = 232448
    for rp in (16, 32, 64, 128, 256):
        assert narrow_blocks(64, rp, 2, 2) == (64, 3) and narrow_blocks(16, rp, 2, 2) == (64, 3)
        assert K.pinned_dy_pass(K.dy_pass_block_m(8192, rp), rp, 2) == K._PINNED_DY_PASS
    for rp in (16, 32, 64, 128):  # the decode blocks: unchanged in bf16 up to R_PAD 128
        for m in (1, 16, 64):
            assert dense_blocks(m, 4096, rp, 132, 2)[4] == (4 if m <= 16 else 3)
    assert T.pinned_tma(2) == T._PINNED_TMA
    for cfgs in (D._ONE_ACC_CONFIGS, D._TWO_ACC_CONFIGS):
        c = cfgs[0]
        assert D.pinned_config(cfgs, 2) == dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    for isz in (2, 4):
        for rp in (16, 64, 256, 512, 1024):
            for rows in (16, 64):
                bq, st = narrow_blocks(rows, rp, isz, isz)
                assert st * bq * (rows + rp) * isz <= SMEM_BUDGET < hw and bq >= 16 and bq & (bq - 1) == 0
            bm = K.dy_pass_block_m(8192, rp)
            cfg = K.pinned_dy_pass(bm, rp, isz)
            assert cfg["num_stages"] * cfg["BLOCK_N"] * (bm + 2 * rp) * isz <= SMEM_BUDGET or cfg["num_stages"] == 1
            if rp <= 512:
                for m in (1, 16, 64):
                    bm_, bn, bk, _, st = dense_blocks(m, 4096, rp, 132, isz)
                    assert st * (bm_ + bn + rp) * bk * isz <= SMEM_BUDGET
    assert narrow_blocks(64, 256, 4, 4) == (64, 2) and narrow_blocks(64, 1024, 4, 4)[0] == 32
    assert dense_blocks(1, 4096, 256, 132, 4)[4] < dense_blocks(1, 4096, 256, 132, 2)[4]
    assert K.pinned_dy_pass(32, 256, 4)["num_stages"] < 3
    assert T.pinned_tma(4)["num_stages"] == 2
    pinned = D.pinned_config(D._ONE_ACC_CONFIGS, 4)
    assert (pinned["BLOCK_M"] + pinned["BLOCK_N"]) * pinned["BLOCK_K"] * 4 * pinned["num_stages"] <= SMEM_BUDGET


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_decode_llm_shape(m, r):
    """The decode kernel at the card's own blocks (``dense_blocks``: not the explicit test blocks) at an LLM
    shape, with dropout: y within 2x PyTorch's bf16 error, u the shrink kernel's, the same bits twice."""
    from fastpeft.kernels import quant as KQ
    from fastpeft.reference import dropout_threshold

    x, w, b, a, bb = _make(m, 4096, 4096, r, torch.bfloat16)
    thr, ds = dropout_threshold(0.1), 1 / 0.9
    y, u = KQ.lora_decode(x, w, a, bb, b, 2.0, ds, 5, thr)
    keep = dropout_mask(5, m, 4096, 0.1, device=x.device)
    exact = (x.double() @ w.double().t() + b.double()
             + 2.0 * ((x.double() * keep * ds) @ a.double().t()) @ bb.double().t())
    low = x @ w.t() + b + 2.0 * ((x * keep * ds) @ a.t()) @ bb.t()
    _low_precision_rule(y, exact, low, f"decode M{m} r{r} y")
    torch.testing.assert_close(u, K.lora_shrink(x, a.t(), ds, 5, thr, 4096, 1), rtol=1e-4, atol=1e-4)
    y2, u2 = KQ.lora_decode(x, w, a, bb, b, 2.0, ds, 5, thr)
    assert torch.equal(y, y2) and torch.equal(u, u2)
    # DoRA's plain forward: g (N,) fp32 on x W^T + s u B^T, then the bias
    g = 1.0 + 0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(2)).to(x.device)
    yg, _ = KQ.lora_decode(x, w, a, bb, b, 2.0, ds, 5, thr, col_scale=g)
    _low_precision_rule(yg, (exact - b.double()) * g.double() + b.double(), ((low - b).float() * g).to(low.dtype) + b,
                        f"decode M{m} r{r} y with g")


@pytest.mark.gpu
def test_gpu_fp32_tf32_rank256_launches_fit_the_card():
    """fp32 with TF32 allowed (torch's "high" precision, common in training scripts) at rank 256: the launches
    that do not autotune compiled to 245760 B (the shrinks) and 307200 B (the decode kernel) of shared memory
    before, over an sm_90 block's 232448 B (OutOfResources at launch). Now they fit: each runs, within TF32's
    error of fp64. Fixed blocks only (no autotuning: the card's test step has seconds, not minutes)."""
    from fastpeft.kernels import multi_lora as ML
    from fastpeft.kernels import quant as KQ

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        x, w, b, a, bb = _make(16, 1024, 2048, 256, torch.float32)
        ref_u = x.double() @ a.double().t()
        assert_close_report(K.lora_shrink(x, a.t(), 1.0), ref_u, 1e-2, 1e-2 * float(ref_u.abs().max()), "shrink")
        y, _ = KQ.lora_decode(x, w, a, bb, b, 2.0, 1.0, 0, 0)
        exact = x.double() @ w.double().t() + b.double() + 2.0 * ref_u @ bb.double().t()
        assert_close_report(y, exact, 1e-2, 1e-2 * float(exact.abs().max()), "decode")
        ids = torch.zeros(16, dtype=torch.long, device=x.device)
        order, _, blocks = ML.group_rows(ids, 1, 16)
        one = torch.ones(1, device=x.device)
        u = ML.multi_lora_shrink(x, a.t().unsqueeze(0), order, blocks, torch.tensor([256], dtype=torch.int32,
                                 device=x.device), one, torch.zeros(1, dtype=torch.long, device=x.device), 16)
        assert_close_report(u, ref_u[order], 1e-2, 1e-2 * float(ref_u.abs().max()), "many-adapter shrink")
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.gpu
def test_gpu_dora_fp32_deterministic_pinned_configs():
    """Deterministic mode launches DoRA's GEMM with one pinned config; in fp32 its 128 x 128 x 64 at 4 stages
    took 262144 B of shared memory (over sm_90's 232448 B), so fp32 DoRA in deterministic mode raised. Now the
    pinned config fits: forward + backward run twice with the same bits, close to the reference path."""
    from fastpeft.functional import dora_linear

    g = torch.Generator().manual_seed(4)
    x, w, b, a, bb = (t.to(DEV, torch.float32) for t in lora_inputs(g, 300, 512, 384, 16, True, ()))
    mag = torch.linalg.vector_norm(w, dim=1) * 1.1
    dy = torch.randn(300, 384, device=DEV)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a, bb, mag)]
        y = dora_linear(leaves[0], w, b, leaves[1], leaves[2], leaves[3], 2.0, 0.0, True, None, "exact",
                        backend=backend)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    with fastpeft.deterministic():
        first, second = run("triton"), run("triton")
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    for name, got, want in zip(("y", "dx", "dA", "dB", "dm"), first, run("reference")):
        assert_close_report(got, want, 1e-4, 1e-4 * float(want.detach().abs().max()), name)


@pytest.mark.gpu
def test_gpu_backward_with_an_expanded_dy():
    """The gradient of a sum over rows reaches the layer as an expanded dY (row stride 0), which is no TMA
    address: the TMA backward copies it to rows first, and gives what the same dY made contiguous gives."""
    from fastpeft.kernels import lora_tma as T

    x, w, b, a, bb = _make(512, 1024, 1024, 16, torch.bfloat16)
    if not T.tma_supported(x.device):
        pytest.skip("needs sm_90+ and a triton with tensor descriptors")
    dy_expanded = torch.randn(1024, device=DEV, dtype=torch.bfloat16).expand(512, 1024)
    assert dy_expanded.stride(0) == 0
    u = x.float() @ a.float().t()
    cfg = T.pinned_tma(2)  # one config, no autotuning
    got = T.lora_backward_tma(dy=dy_expanded, w=w, lora_A=a, lora_B=bb, u=u, scale=2.0, config=cfg)
    want = T.lora_backward_tma(dy=dy_expanded.contiguous(), w=w, lora_A=a, lora_B=bb, u=u, scale=2.0, config=cfg)
    for name, p, q in zip(("dx", "v", "dB"), got, want):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_second_derivatives_on_the_kernels_match_the_reference(p):
    """create_graph=True through the triton Function: its backward records the oracle's formula with the kernels'
    mask, so the gradients are differentiable. Before 2026-12-01 they carried no graph: a double backward raised
    ("does not require grad") or, with W trainable beside, came out 95% off with A's and B's parts missing."""
    x, w, b, a, bb = _make(7, 48, 40, 8, torch.float32)
    dy = torch.randn(7, 40, device=DEV)

    def seconds(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, a, bb)]
        y = fastpeft.lora_linear(*leaves, 1.5, dropout_p=p, training=True, seed=11, backend=backend)
        firsts = torch.autograd.grad((y * dy).sum(), leaves, create_graph=True)
        probe = sum((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype, device=DEV).view(g.shape)).sum()
                    for g in firsts)
        return list(firsts) + list(torch.autograd.grad(probe, leaves, allow_unused=True))
    for got, want, name in zip(seconds("triton"), seconds("reference"), ["dx", "dW", "db", "dA", "dB"] * 2):
        if want is None:
            assert got is None or not got.abs().max(), name
        else:
            assert_close_report(got, want, 1e-5, 1e-5 * max(1.0, float(want.abs().max())), name)


def test_second_derivatives_through_kernels_without_a_graph_are_refused():
    """The many-adapter, sparse and RoSA triton Functions' gradients carry no graph: create_graph raises, naming the
    op and the way out, instead of leaving their part out of the second derivatives. (QLoRA's triton Function takes
    the same check, ops.common.no_second_derivatives.)"""
    x, w, b, a, bb = _make(6, 48, 40, 4, torch.float32)
    x.requires_grad_(True)
    ids = torch.tensor([0, 1, -1, 1, 0, 0], device=DEV)
    y = fastpeft.lora_linear_multi(x, w, b, torch.stack([a, a]), torch.stack([bb, bb]), torch.tensor([1.0, 2.0]),
                                   ids, backend="triton")
    with pytest.raises(RuntimeError, match=r"create_graph=True .*lora_linear_multi.*backend='reference'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    values = torch.zeros(5, device=DEV, requires_grad=True)
    y = fastpeft.sparse_delta_linear(x, w, b, torch.tensor([0, 3, 50, 61, 700], device=DEV), values,
                                     backend="triton")
    with pytest.raises(RuntimeError, match=r"create_graph=True .*sparse_delta_linear"):
        torch.autograd.grad(y.square().sum(), values, create_graph=True)
    y = fastpeft.lora_sparse_linear(x, w, b, a, bb, 1.5, torch.tensor([0, 3, 50, 61, 700], device=DEV), values,
                                    backend="triton")
    with pytest.raises(RuntimeError, match=r"create_graph=True .*lora_sparse_linear \(RoSA\)"):
        torch.autograd.grad(y.square().sum(), values, create_graph=True)


def test_torch_composition_backward_keeps_fp16_range(monkeypatch):
    """The backward's torch composition (FASTPEFT_LORA_GEMM=torch, one of the timed candidates) puts s into the
    products as their alpha: dA = s vᵀx and dB = s dYᵀu formed unscaled overflowed fp16 at s = 0.25 (|dA| ~ 16k),
    where PyTorch's own fp16 composition stays finite."""
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "torch")
    torch.manual_seed(0)
    M, K, N, r, s = 4096, 64, 64, 64, 0.25
    x = torch.randn(M, K, dtype=torch.float64)
    A = torch.randn(r, K, dtype=torch.float64) / K**0.5
    B = torch.randn(N, r, dtype=torch.float64) * 0.1
    W = torch.randn(N, K, dtype=torch.float64) / K**0.5
    dy = 24.0 * ((x @ A.t())[:, :1] @ torch.ones(1, N, dtype=torch.float64))
    want_a = s * (dy @ B).t() @ x
    leaves = [t.half().to(DEV).requires_grad_() for t in (A, B)]
    y = fastpeft.lora_linear(x.half().to(DEV), W.half().to(DEV), None, *leaves, s, backend="triton")
    y.backward(dy.half().to(DEV))
    assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all()
    assert_close_report(leaves[0].grad.double().cpu(), want_a, rtol=2e-3, atol=2e-3 * float(want_a.abs().max()),
                        what="dA")
