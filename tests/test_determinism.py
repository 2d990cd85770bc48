"""Deterministic mode (``fastpeft.set_deterministic`` / ``fastpeft.deterministic()`` /
``torch.use_deterministic_algorithms(True)`` / ``FASTPEFT_DETERMINISTIC=1``): every op's forward and
backward on the triton backend give the same bits on a second run from fresh copies of the inputs and the
same seed, and the timing-dependent choices (kernels vs torch, fused / TMA / cuBLAS GEMM, autotuned configs)
are pinned. Runs under TRITON_INTERPRET=1 on CPU tensors; tests marked ``gpu`` repeat it on CUDA at larger
shapes with every cache of timed choices cleared between the runs, as in a new process."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import triton_backend_device  # noqa: E402
from fastpeft import kernels  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.kernels import sparse_delta as SD  # noqa: E402
from fastpeft.ops import lora as OL  # noqa: E402
from fastpeft.ops import sparse as OS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ["lora_linear", "lora_linear_multi", "sparse_delta_linear", "lora_sparse_linear",
       "sparse_delta_linear-b16", "lora_sparse_linear-b16"]


def _inputs(op, m, k, n, dtype, dev=DEV):
    """(fn, args) for one op with dropout where it has one and seed=None (drawn from torch's generator).
    The args that require grad are the leaves whose gradients are compared."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=False, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(grad)

    x, w, b = t(m, k, grad=True), t(n, k, scale=k ** -0.5), t(n)
    if op == "lora_linear":
        a, bb = t(16, k, grad=True, scale=k ** -0.5), t(n, 16, grad=True, scale=0.25)
        return (lambda x, a, bb: fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.1)), (x, a, bb)
    if op == "lora_linear_multi":
        sa, sb = t(3, 16, k, grad=True, scale=k ** -0.5), t(3, n, 16, grad=True, scale=0.25)
        scalings = torch.tensor([2.0, 1.0, 0.5], device=dev)
        ranks = torch.tensor([16, 4, 8], device=dev)
        rates = torch.tensor([0.1, 0.0, 0.2], device=dev)
        ids = (torch.randint(-1, 3, (m,), generator=g)).to(dev)
        return (lambda x, sa, sb: fastpeft.lora_linear_multi(x, w, b, sa, sb, scalings, ids, ranks, dropout_p=rates),
                (x, sa, sb))
    block = 16 if op.endswith("-b16") else 1
    rb, cb = -(-n // block), -(-k // block)
    flat = torch.randperm(rb * cb, generator=g)[:max(2, rb * cb // 10)].sort().values
    if block == 1:
        idx, vals = flat.to(dev), t(flat.numel(), grad=True, scale=0.1)
    else:
        idx, vals = torch.stack([flat // cb, flat % cb], 1).to(dev), t(flat.numel(), block, block, grad=True, scale=0.1)
    if op.startswith("sparse_delta_linear"):
        return (lambda x, v: fastpeft.sparse_delta_linear(x, w, b, idx, v, block)), (x, vals)
    a, bb = t(16, k, grad=True, scale=k ** -0.5), t(n, 16, grad=True, scale=0.25)
    return (lambda x, a, bb, v: fastpeft.lora_sparse_linear(x, w, b, a, bb, 2.0, idx, v, block, dropout_p=0.1)), \
        (x, a, bb, vals)


def _run(fn, args):
    """Output and every gradient, from fresh copies of the inputs and torch.manual_seed(3) (the seed)."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    torch.manual_seed(3)
    with fastpeft.use_backend("triton"):
        y = fn(*args)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
        grads = torch.autograd.grad(y, [a for a in args if a.requires_grad], dy)
    return [y] + list(grads)


def _assert_bitwise(first, second, what):
    names = ["y"] + [f"grad {i}" for i in range(len(first) - 1)]
    for name, u, v in zip(names, first, second):
        if not torch.equal(u, v):
            diff = (u.double() - v.double()).abs()
            raise AssertionError(f"{what} {name}: not bitwise equal, {int((diff > 0).sum())} elements differ, "
                                 f"max |diff| {diff.max():.3g}")


@pytest.fixture
def deterministic_mode():
    with fastpeft.deterministic():
        yield


# ---- the switch ----------------------------------------------------------------------------------

def test_switch_api(monkeypatch):
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC", raising=False)
    assert not fastpeft.is_deterministic()
    with fastpeft.deterministic():
        assert fastpeft.is_deterministic()
        with fastpeft.deterministic(False):
            assert not fastpeft.is_deterministic()
        assert fastpeft.is_deterministic()
    assert not fastpeft.is_deterministic()
    fastpeft.set_deterministic(True)
    try:
        assert fastpeft.is_deterministic() and kernels.is_deterministic()
    finally:
        fastpeft.set_deterministic(False)
    assert not fastpeft.is_deterministic()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastpeft.set_deterministic("yes")
    for value, want in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("FASTPEFT_DETERMINISTIC", value)
        assert fastpeft.is_deterministic() is want, value
    monkeypatch.setenv("FASTPEFT_DETERMINISTIC", "maybe")
    with pytest.raises(ValueError, match="FASTPEFT_DETERMINISTIC must be 0 or 1"):
        fastpeft.is_deterministic()
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC")
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert fastpeft.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(old)


def test_timed_choices_are_pinned(monkeypatch):
    """On CUDA, auto mode times fused vs cuBLAS (dense) once per shape; deterministic mode never times."""
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", "auto")
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(SD, "INTERPRET", False)
    cuda = torch.device("cuda")
    run = {"fused": None, "tma": None, "cublas": None}
    with fastpeft.deterministic():
        assert K.choose_gemm(("k",), run, cuda) == "cublas"
        assert SD.choose_sparse_gemm(("k",), 32, None, None, cuda) == "dense"
    monkeypatch.setenv("FASTPEFT_DETERMINISTIC", "1")
    assert K.choose_gemm(("k",), run, cuda) == "cublas"


def test_autotuned_gemms_run_one_pinned_config(monkeypatch):
    """Deterministic mode launches the GEMMs that otherwise autotune with the pinned config (here on the
    interpreter, with the explicit test blocks turned off), and they still compute the right thing."""
    x = torch.randn(70, 48, device=DEV)
    w = torch.randn(40, 48, device=DEV)
    if kernels.INTERPRET:
        with fastpeft.deterministic():  # the interpreter keeps its explicit blocks
            assert K.gemm_launch_config(x, K._TEST_BLOCKS)["BLOCK_M"] == K._TEST_BLOCKS["BLOCK_M"]
    monkeypatch.setattr(K, "_use_explicit_blocks", lambda t: False)
    assert K.gemm_launch_config(x, K._TEST_BLOCKS) is None  # autotune
    with fastpeft.deterministic():
        assert K.gemm_launch_config(x, K._TEST_BLOCKS) == K._PINNED_GEMM
    if not kernels.INTERPRET:
        return
    monkeypatch.setattr(K, "_lora_gemm_tuned", None)  # the autotuner must not be reached
    monkeypatch.setattr(SD, "_sparse_gemm_tuned", None)
    u, lv = torch.randn(70, 4), torch.randn(4, 40)
    block_map = torch.full((3, 3), -1, dtype=torch.int32)
    block_map[1, 2] = 0
    vals = torch.randn(1, 16, 16)
    with fastpeft.deterministic():
        y = K.lora_gemm(x, w.t(), u, lv, None, 0.5, 0, 0)
        torch.testing.assert_close(y, x @ w.t() + 0.5 * u @ lv)
        y = SD.sparse_block_gemm(x, w, block_map, vals, None, None, None, 16, True, 1.0, 0, 0)
        w2 = w.clone()
        w2[16:32, 32:48] += vals[0]
        torch.testing.assert_close(y, x @ w2.t())


# ---- bitwise reproducibility -----------------------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("op", OPS)
def test_ops_bitwise_reproducible(op, dt, deterministic_mode):
    # M = 100 rows and K = 130 features: the reductions over M and K are split into partial sums.
    fn, args = _inputs(op, 100, 130, 48, DTYPES[dt])
    _assert_bitwise(_run(fn, args), _run(fn, args), f"{op}-{dt}")


@pytest.mark.parametrize("gemm", ["fused", "cublas"])
def test_lora_gemm_variants_bitwise_reproducible(gemm, monkeypatch, deterministic_mode):
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    fn, args = _inputs("lora_linear", 33, 80, 48, torch.float32)
    _assert_bitwise(_run(fn, args), _run(fn, args), gemm)


@pytest.mark.parametrize("sddmm", ["tile", "gather"])
def test_sddmm_variants_bitwise_reproducible(sddmm, monkeypatch, deterministic_mode):
    monkeypatch.setenv("FASTPEFT_SPARSE_SDDMM", sddmm)
    fn, args = _inputs("sparse_delta_linear", 100, 80, 48, torch.float32)
    _assert_bitwise(_run(fn, args), _run(fn, args), sddmm)


def test_layers_bitwise_reproducible(deterministic_mode):
    """A training step's gradients of an injected model (LoRA with dropout, RoSA), twice."""
    from torch import nn

    def step():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 48)).to(DEV)
        fastpeft.inject(model, fastpeft.LoraConfig(r=8, lora_dropout=0.1, target_modules=["0", "2"],
                                                   init_lora_weights=False))
        model[2].add_adapter("rosa", 8, 8, lora_dropout=0.1, init_lora_weights=False, sparse_density=0.05)
        model[2].set_adapter("rosa")
        x = torch.randn(2, 50, 80, device=DEV)
        with fastpeft.use_backend("triton"):
            loss = model(x).square().mean()
        params = [p for p in model.parameters() if p.requires_grad]
        return [loss.detach()] + list(torch.autograd.grad(loss, params))
    _assert_bitwise(step(), step(), "model")


# ---- GPU only --------------------------------------------------------------------------------------

def _forget_timed_choices():
    """What a new process would not know: the measured GEMM choices and the autotuners' picks."""
    K._choice_cache.clear()
    SD._choice_cache.clear()
    OL._path_cache.clear()
    OS._path_cache.clear()
    K._lora_gemm_tuned.cache.clear()
    SD._sparse_gemm_tuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["auto", "fused"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_ops_bitwise_reproducible(op, gemm, monkeypatch, deterministic_mode):
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    monkeypatch.setenv("FASTPEFT_SPARSE_GEMM", gemm)
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "1")
    fn, args = _inputs(op, 2048, 1024, 768, torch.bfloat16)
    first = _run(fn, args)
    _forget_timed_choices()
    _assert_bitwise(first, _run(fn, args), f"gpu {op} {gemm}")


@pytest.mark.gpu
def test_gpu_use_deterministic_algorithms_is_honoured(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        fn, args = _inputs("lora_sparse_linear-b16", 1024, 1024, 768, torch.bfloat16)
        first = _run(fn, args)
        _forget_timed_choices()
        _assert_bitwise(first, _run(fn, args), "gpu use_deterministic_algorithms")
    finally:
        torch.use_deterministic_algorithms(old)
