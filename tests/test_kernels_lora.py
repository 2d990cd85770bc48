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
