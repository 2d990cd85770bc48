"""The eager host path of ``lora_linear`` at decode sizes: argument sets that passed the checks are
cached by what the checks read, so a bad call is still refused after a good one of the same shapes; calls
with nothing to differentiate skip the autograd Function and give the same output. Every cache on the path
is keyed on (or reads at every call) what it depends on: each test changes one thing after a cached call
(FASTPEFT_BACKEND, use_backend blocks, the kernel state, dtype, device, autocast, FASTPEFT_LORA_GEMM,
deterministic mode, torch.compile tracing, the layer's registry) and checks that the next call follows.
QLoRA and DoRA layers keep what their no-grad calls derive (the QuantizedWeight view, the adapters' casts,
DoRA's m / norm): requantized, replaced or rewritten weights, adapters and magnitudes, a new compute dtype or
scaling, and FASTPEFT_QLORA_PATH each show in the next call."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import triton_backend_device  # noqa: E402
from fastpeft import _checks  # noqa: E402
from fastpeft import functional as F  # noqa: E402
from fastpeft import kernels  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import lora as K  # noqa: E402
from fastpeft.ops import lora as OL  # noqa: E402


def _args(m=3, k=16, n=24, r=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).to(DEV) for s in ((m, k), (n, k), (n,), (r, k), (n, r))]


def test_a_cached_good_call_does_not_let_a_bad_one_through():
    x, w, b, a, bb = _args()
    fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="reference")
    assert _checks._lora_args_key(x, w, b, a, bb, 2.0, 0.0) in _checks._LORA_ARGS_OK
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        fastpeft.lora_linear(x, w, b, a, bb, float("nan"), backend="reference")
    with pytest.raises(TypeError, match="scaling must be a Python number"):
        fastpeft.lora_linear(x, w, b, a, bb, torch.tensor(2.0), backend="reference")
    with pytest.raises(ValueError, match="lora_B must have shape"):
        fastpeft.lora_linear(x, w, b, a, bb[:, :3], 2.0, backend="reference")
    with pytest.raises(ValueError, match="bias must have x's dtype"):
        fastpeft.lora_linear(x, w, b.double(), a, bb, 2.0, backend="reference")
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=1.0, backend="reference")


def _assert_no_grad_skips(monkeypatch, function, backend, x, w, b, a, bb, p):
    """Under no_grad, lora_linear(backend) gives the bits it gives with grad, without running the autograd
    ``function``; with a parameter to differentiate (A), the function runs. Returns the no-grad output."""
    a.requires_grad_()
    want = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend=backend).detach()
    applied = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *t: applied.append(1) or apply(*t))
    with torch.no_grad():
        got = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend=backend)
    assert not applied
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, seed=7, backend=backend)
    assert applied and y.requires_grad
    return got


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_no_grad_calls_skip_the_function_and_match(monkeypatch, p):
    _assert_no_grad_skips(monkeypatch, OL.LoRALinearFunction, "triton", *_args(), p)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_cpu_path_no_grad_calls_skip_the_function_and_match(monkeypatch, p, lead):
    """The reference backend's CPU path (fastpeft.ops.lora_cpu) does the same, bit for bit."""
    from fastpeft.ops import lora_cpu

    _, w, b, a, bb = (t.cpu() for t in _args())
    x = torch.randn(*lead, w.shape[1], generator=torch.Generator().manual_seed(1))
    got = _assert_no_grad_skips(monkeypatch, lora_cpu.LoRALinearCPUFunction, "reference", x, w, b, a, bb, p)
    assert got.shape == (*lead, w.shape[0])


# ---- what the caches are keyed on: each change takes effect on the call after a cached one -------------

@pytest.fixture
def ran(monkeypatch):
    """The paths lora_linear calls ran, in order: "triton" (ops.lora's forward) or "reference"."""
    log = []
    fwd = OL._forward
    monkeypatch.setattr(OL, "_forward", lambda *a: log.append("triton") or fwd(*a))
    for name in ("lora_linear_cpu", "lora_linear_ref"):
        orig = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _orig=orig, **kw: log.append("reference") or _orig(*a, **kw))
    return log


def _twice(log, *args, **kw):
    """Two lora_linear calls (the second from the caches); the paths they ran."""
    del log[:]
    for _ in range(2):
        fastpeft.lora_linear(*args, **kw)
    return list(log)


AUTO = "triton" if DEV == "cuda" else "reference"  # what "auto" runs on DEV's tensors


def test_backend_env_takes_effect_after_a_cached_call(monkeypatch, ran):
    args = (*_args(), 2.0)
    for env, want in (("reference", "reference"), ("triton", "triton"), ("reference", "reference"),
                      ("auto", AUTO), ("TRITON", "triton")):
        monkeypatch.setenv("FASTPEFT_BACKEND", env)
        assert _twice(ran, *args) == [want] * 2, env
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of"):
        fastpeft.lora_linear(*args)
    monkeypatch.delenv("FASTPEFT_BACKEND")
    assert _twice(ran, *args) == [AUTO] * 2


def test_use_backend_blocks_take_effect_after_a_cached_call(monkeypatch, ran):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    args = (*_args(), 2.0)
    assert _twice(ran, *args) == [AUTO] * 2
    with fastpeft.use_backend("triton"):
        assert _twice(ran, *args) == ["triton"] * 2
        with fastpeft.use_backend("reference"):
            assert _twice(ran, *args) == ["reference"] * 2
            assert _twice(ran, *args, backend="triton") == ["triton"] * 2  # the call's own argument wins
        assert _twice(ran, *args) == ["triton"] * 2
    assert _twice(ran, *args) == [AUTO] * 2


def test_kernel_state_takes_effect_after_a_cached_call(monkeypatch, ran):
    args = (*_args(), 2.0)
    assert _twice(ran, *args, backend="triton") == ["triton"] * 2
    if DEV == "cpu":
        monkeypatch.setattr(kernels, "INTERPRET", False)  # CPU tensors, no interpreter: triton cannot run
        with pytest.raises(RuntimeError, match="backend 'triton' is not available.*TRITON_INTERPRET=1"):
            fastpeft.lora_linear(*args, backend="triton")
        monkeypatch.setattr(kernels, "INTERPRET", True)
        assert _twice(ran, *args, backend="triton") == ["triton"] * 2
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setattr(kernels, "TRITON_IMPORT_ERROR", "ImportError: no triton")
    with pytest.raises(RuntimeError, match="no triton"):
        fastpeft.lora_linear(*args, backend="triton")
    assert _twice(ran, *args, backend="auto") == ["reference"] * 2


def test_a_new_dtype_or_device_is_resolved_anew(ran):
    x, w, b, a, bb = _args()
    assert _twice(ran, x, w, b, a, bb, 2.0, backend="triton") == ["triton"] * 2
    wide = [t.double() for t in (x, w, b, a, bb)]  # same shapes, a dtype the kernels do not take
    with pytest.raises(RuntimeError, match="float64"):
        fastpeft.lora_linear(*wide, 2.0, backend="triton")
    assert _twice(ran, *wide, 2.0, backend="auto") == ["reference"] * 2
    meta = [t.to("meta") for t in (x, w, b, a, bb)]
    with pytest.raises(RuntimeError, match="got device meta"):
        fastpeft.lora_linear(*meta, 2.0, backend="triton")
    assert fastpeft.lora_linear(*meta, 2.0, backend="auto").device.type == "meta"
    assert _twice(ran, x, w, b, a, bb, 2.0, backend="triton") == ["triton"] * 2
    # The other ops' resolution (no memo of the checks: a key of the tensors' devices and dtypes).
    for _ in range(2):
        assert F.resolve_backend("sparse_delta_linear", "triton", x, w) == "triton"
    with pytest.raises(RuntimeError, match="float64"):
        F.resolve_backend("sparse_delta_linear", "triton", x, w.double())
    with pytest.raises(RuntimeError, match="got device meta"):
        F.resolve_backend("sparse_delta_linear", "triton", x, w.to("meta"))
    assert F.resolve_backend("sparse_delta_linear", "triton", x, None) == "triton"


def test_autocast_takes_effect_after_a_cached_call():
    x, w, b, a, bb = _args()
    assert fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="triton").dtype == torch.float32
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="triton")
        assert y.dtype == torch.bfloat16  # as nn.Linear's under autocast
        # fp32 parameters beside a bf16 x: allowed under autocast (the matmuls cast them) ...
        fastpeft.lora_linear(x.bfloat16(), w, b, a, bb, 2.0, backend="triton")
    with pytest.raises(ValueError, match="weight must have x's dtype"):  # ... and refused again outside it
        fastpeft.lora_linear(x.bfloat16(), w, b, a, bb, 2.0, backend="triton")
    assert fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="triton").dtype == torch.float32


@pytest.fixture
def gemm_calls(monkeypatch):
    """The kernel launchers each call reached: "shrink" and "gemm" (the fused GEMM)."""
    log = []
    for name, tag in (("shrink_op", "shrink"), ("gemm_op", "gemm")):
        orig = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _orig=orig, _tag=tag, **kw: log.append(_tag) or _orig(*a, **kw))
    return log


def test_lora_gemm_env_takes_effect_after_a_cached_call(monkeypatch, gemm_calls):
    x, w, b, a, bb = _args()
    want = fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="reference")
    cases = [("fused", ["shrink", "gemm"]), ("torch", []), ("cublas", ["shrink"]), ("fused", ["shrink", "gemm"])]
    if DEV == "cpu":  # on CUDA, auto times the candidates
        cases.insert(0, ("auto", ["shrink", "gemm"]))
    for mode, launched in cases:
        monkeypatch.setenv("FASTPEFT_LORA_GEMM", mode)
        for _ in range(2):  # the second call from the caches
            del gemm_calls[:]
            with torch.no_grad():
                y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="triton")
            assert gemm_calls == launched, mode
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_LORA_GEMM must be one of"):
        fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="triton")


def test_deterministic_mode_overrides_a_measured_choice(monkeypatch):
    """On CUDA a measured choice is kept per shape; deterministic mode, however it is turned on after it,
    takes the fixed choice at once, and the measured one is back when it is off."""
    monkeypatch.setattr(K, "INTERPRET", False)  # choose as on CUDA
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC", raising=False)
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", "auto")
    cuda, key = torch.device("cuda", 0), ("fwd", 1, 64, 64, 8, torch.bfloat16, True)
    monkeypatch.setattr(K, "_choice_cache", {key: "fused"})  # as measured by an earlier call
    monkeypatch.setattr(OL, "_path_cache", {key: "torch"})
    paths = {"kernels": None, "torch": None}

    def chosen():
        return K.settled_gemm(key, cuda), OL.choose_path(key, paths, cuda)
    assert chosen() == ("fused", "torch")
    with fastpeft.deterministic():
        assert chosen() == ("cublas", "kernels")
    assert chosen() == ("fused", "torch")
    monkeypatch.setenv("FASTPEFT_DETERMINISTIC", "1")
    assert chosen() == ("cublas", "kernels")
    monkeypatch.delenv("FASTPEFT_DETERMINISTIC")
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert chosen() == ("cublas", "kernels")
    finally:
        torch.use_deterministic_algorithms(old)
    assert chosen() == ("fused", "torch")


def test_tracing_reads_no_cache():
    """torch.compile traces past the caches: the compiled function follows the use_backend block it runs
    in, and eager calls that fill the caches afterwards do not make it trace again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, b, a, bb = _args()

    def fn(x):  # dropout: on CPU tensors the two backends draw other masks, so the output tells them apart
        return fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, seed=7)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    torch._dynamo.reset()
    outs = {}
    for name in ("triton", "reference", "triton"):
        with fastpeft.use_backend(name):
            want = fn(x)  # eager, into the caches
            torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
            outs[name] = want
    if DEV == "cpu":
        assert not torch.allclose(outs["triton"], outs["reference"])
    for m in (1, 5, 9):  # eager calls of other shapes and dtypes change the caches
        fastpeft.lora_linear(x[:1].expand(m, -1), w, b, a, bb, 2.0, backend="triton")
        fastpeft.lora_linear(*(t.double() for t in (x[:1], w, b, a, bb)), 2.0)
    with fastpeft.use_backend("triton"):
        compiled(x)
    assert counter.frame_count == 2  # one trace per block name, none since


# ---- the layer's one-adapter forward reads its registry at every call ------------------------------------

def test_layer_forward_follows_its_registry():
    import torch.nn as nn

    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(16, 24, r=4, init_lora_weights=False).to(DEV).eval()
    layer.add_adapter("other", 2, 4, init_lora_weights=False)
    x = torch.randn(3, 16, device=DEV)

    def want(name):
        a, b = layer.lora_A_adapters[name], layer.lora_B_adapters[name]
        s = layer.adapter_spec(name).scaling
        return fastpeft.lora_linear(x, layer.weight, layer.bias, a, b, s, backend="reference")

    def check(name):
        with fastpeft.use_backend("triton"), torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(layer(x), want(name), rtol=1e-5, atol=1e-5)
    check("default")
    layer.lora_B_adapters["default"] = nn.Parameter(torch.randn(24, 4, device=DEV))  # swapped in
    check("default")
    layer.weight = nn.Parameter(torch.randn(24, 16, device=DEV), requires_grad=False)
    check("default")
    layer.update_adapter("default", lora_alpha=12)
    check("default")
    layer.set_adapter("other")
    check("other")
    layer.merge()
    with torch.no_grad():
        merged = layer(x)
    layer.unmerge()
    torch.testing.assert_close(merged, want("other"), rtol=1e-5, atol=1e-5)


def test_mixed_batch_stacks_follow_the_parameters():
    """The no-grad stacks of a mixed batch are cached; an in-place write, another storage behind the same
    Parameter, a new dtype and a deleted adapter each take effect on the next call."""
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(16, 24, r=4, init_lora_weights=False).eval()
    layer.add_adapter("other", 2, 4, init_lora_weights=False)
    x, ids = torch.randn(2, 3, 16), torch.tensor([0, 1])

    def check(x, ids):
        want = []
        for i, j in enumerate(ids.tolist()):
            if j < 0:
                want.append(x[i] @ layer.weight.t() + layer.bias)
                continue
            name = layer.adapter_names[j]
            a, b = layer.lora_A_adapters[name], layer.lora_B_adapters[name]
            want.append(fastpeft.lora_linear(x[i], layer.weight, layer.bias, a, b, layer.adapter_spec(name).scaling,
                                             backend="reference"))
        with torch.no_grad():
            for _ in range(2):  # the second from the cached stacks
                torch.testing.assert_close(layer(x, ids), torch.stack(want), rtol=1e-5, atol=1e-5)
    check(x, ids)
    with torch.no_grad():
        layer.lora_A_adapters["other"].mul_(2)  # in place: a new version
    check(x, ids)
    layer.lora_B_adapters["default"].data = torch.randn(24, 4)  # another storage behind the same Parameter
    check(x, ids)
    layer.to(torch.float64)
    check(x.double(), ids)
    layer.delete_adapter("default")
    check(x.double(), torch.tensor([0, -1]))


# ---- QLoRA and DoRA: the layers' caches follow their weights, adapters and switches ------------------------

def _nf4_layer(in_f=128, out_f=48, compute_dtype=torch.float32, seed=0):
    """A bnb Linear4bit, NF4 nested, on the CPU (as tests/test_qlora.py builds it)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch.nn as nn

    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64, module=layer)
    layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _qlora_want(layer, x):
    """The active adapter's output from a QuantizedWeight built afresh and the Parameters as they are now."""
    from fastpeft.quant import QuantizedWeight

    s = layer.adapter_spec()
    with torch.no_grad():
        return F.qlora_linear(x, QuantizedWeight.from_module(layer.base_layer), layer.bias, layer.lora_A, layer.lora_B,
                              s.scaling, backend="reference")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_qlora_layer_follows_its_weight_after_cached_calls(backend):
    """QLoRALinear keeps its QuantizedWeight and, without gradients, the adapters' casts to the compute dtype:
    a requantized weight (merge then unmerge), a replaced one, a new compute dtype and adapters written in place
    or replaced each show in the next call."""
    import warnings

    import bitsandbytes as bnb
    import torch.nn as nn

    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear.from_linear(_nf4_layer(), r=4, lora_alpha=8, init_lora_weights=False).eval()
    x = torch.randn(3, 128)
    outs = []

    def check(tol=1e-5):
        with fastpeft.use_backend(backend), torch.no_grad():
            for _ in range(2):  # the second from the caches
                y = layer(x)
                torch.testing.assert_close(y, _qlora_want(layer, x), rtol=tol, atol=tol)
        outs.append(y)
    check()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merging requantizes, lossy
        layer.merge()
        with fastpeft.use_backend(backend), torch.no_grad():
            merged = layer(x)
        layer.unmerge()
    check()
    assert not torch.equal(outs[-1], outs[0])  # requantized twice: another weight
    with torch.no_grad():
        assert (merged - outs[0]).abs().max() < 0.5  # the merged layer: base + adapter, to the quantization error
    other = _nf4_layer(seed=1).weight  # another quantized weight swapped in
    layer.base_layer.weight = bnb.nn.Params4bit(other.data, requires_grad=False, quant_state=other.quant_state,
                                                bnb_quantized=True, module=layer.base_layer)
    check()
    with torch.no_grad():  # the same Parameter and quant_state, other bytes behind it (as .to() swaps them)
        layer.base_layer.weight.data = _nf4_layer(seed=2).weight.data.clone()
    check()
    layer.base_layer.compute_dtype = torch.bfloat16  # fp32 adapters and bias: now cast copies, kept
    check(tol=2e-2)
    with torch.no_grad():
        layer.lora_B.mul_(2)  # in place
    check(tol=2e-2)
    layer.lora_A_adapters["default"] = nn.Parameter(torch.randn(4, 128))  # replaced
    check(tol=2e-2)
    layer.base_layer.bias = nn.Parameter(torch.randn(48), requires_grad=False)
    check(tol=2e-2)
    assert all(not torch.equal(a, b) for a, b in zip(outs[1:], outs[2:]))


def test_qlora_path_env_takes_effect_after_a_cached_call(monkeypatch):
    """FASTPEFT_QLORA_PATH is read at every call: a forced path follows a cached (settled) choice at once."""
    from fastpeft.kernels import quant as KQ

    layer = fastpeft.FastLoRALinear.from_linear(_nf4_layer(), r=4, init_lora_weights=False).eval()
    x = torch.randn(2, 128)
    log = []
    fused, dequant = KQ.qlora_fused, KQ.dequantize_4bit
    monkeypatch.setattr(KQ, "qlora_fused", lambda *a, **kw: log.append("fused") or fused(*a, **kw))
    monkeypatch.setattr(KQ, "dequantize_4bit", lambda *a, **kw: log.append("dequant") or dequant(*a, **kw))
    want = _qlora_want(layer, x)
    for mode, path in (("auto", "fused"), ("dequant", "dequant"), ("fused", "fused"), ("dequant", "dequant")):
        if DEV == "cuda" and mode == "auto":
            continue  # timed there
        monkeypatch.setenv("FASTPEFT_QLORA_PATH", mode)
        for _ in range(2):
            del log[:]
            with fastpeft.use_backend("triton"), torch.no_grad():
                torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
            assert log == [path], mode
    monkeypatch.setenv("FASTPEFT_QLORA_PATH", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_QLORA_PATH must be one of"), torch.no_grad():
        with fastpeft.use_backend("triton"):
            layer(x)


def test_qlora_cached_checks_still_refuse_a_bad_call():
    from fastpeft.quant import QuantizedWeight

    layer = _nf4_layer()
    qw = QuantizedWeight.from_module(layer)
    x, a, b = torch.randn(2, 128), torch.randn(4, 128), torch.randn(48, 4)
    F.qlora_linear(x, qw, layer.bias, a, b, 2.0, backend="reference")
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        F.qlora_linear(x, qw, layer.bias, a, b, float("nan"), backend="reference")
    with pytest.raises(ValueError, match="lora_B must have shape"):
        F.qlora_linear(x, qw, layer.bias, a, b[:, :3], 2.0, backend="reference")
    with pytest.raises(TypeError, match="qweight must be a fastpeft.quant.QuantizedWeight"):
        F.qlora_linear(x, layer.weight, layer.bias, a, b, 2.0, backend="reference")


def _dora_want(layer, x):
    """The active DoRA adapter's output computed afresh (reference, no cache)."""
    s = layer.adapter_spec()
    with torch.no_grad():
        return F.dora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude(), s.scaling,
                             training=False, backend="reference")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dora_layer_follows_its_parameters_after_cached_calls(backend):
    """Without gradients a DoRA layer keeps m / ‖W + sBA‖: a magnitude, A, B or W written in place or
    replaced, a new scaling and another adapter each show in the next call; a training call is unaffected."""
    import torch.nn as nn

    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(48, 24, r=4, init_lora_weights=False, use_dora=True).eval()
    layer.add_adapter("other", 2, 4, init_lora_weights=False, use_dora=True)
    x = torch.randn(3, 48)
    outs = []

    def check():
        with fastpeft.use_backend(backend), torch.no_grad():
            for _ in range(2):  # the second from the cache
                y = layer(x)
                torch.testing.assert_close(y, _dora_want(layer, x), rtol=1e-5, atol=1e-5)
        outs.append(y)
    check()
    with torch.no_grad():
        layer.magnitude().mul_(1.5)
    check()
    with torch.no_grad():
        layer.lora_A.add_(0.5)  # the norm changes (and the output through u)
    check()
    layer.lora_B_adapters["default"] = nn.Parameter(torch.randn(24, 4))
    check()
    layer.lora_magnitude_vector["default"] = nn.Parameter(torch.rand(24) + 0.5)
    check()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    check()
    layer.update_adapter("default", lora_alpha=16)
    check()
    layer.set_adapter("other")
    check()
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))
    layer.train()  # with gradients: the Function, the norm computed afresh
    with fastpeft.use_backend(backend):
        y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), _dora_want(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is not None and layer.magnitude().grad is not None


def test_dora_norm_cache_reads_only_the_norm_it_was_given():
    """The functional call: no cache without a norm_cache dict; with one, the norm is kept in it."""
    torch.manual_seed(0)
    w, b, a, bb = torch.randn(24, 48), torch.randn(24), torch.randn(4, 48), torch.randn(24, 4)
    m, x = torch.rand(24) + 0.5, torch.randn(3, 48)
    cache = {}
    with torch.no_grad():
        y0 = F.dora_linear(x, w, b, a, bb, m, 2.0, training=False, backend="triton", norm_cache=cache)
        assert "gain" in cache
        a.mul_(2)
        y1 = F.dora_linear(x, w, b, a, bb, m, 2.0, training=False, backend="triton", norm_cache=cache)
        want = F.dora_linear(x, w, b, a, bb, m, 2.0, training=False, backend="reference")
    torch.testing.assert_close(y1, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y0, y1)


def test_qlora_kept_view_does_not_keep_a_replaced_weight_alive():
    """merge / unmerge and .to() drop the kept QuantizedWeight: the packed weight they replaced is freed at once,
    not at the next call (on a GPU near its memory limit, a second copy of every merged or moved layer)."""
    import gc
    import warnings
    import weakref

    layer = fastpeft.FastLoRALinear.from_linear(_nf4_layer(), r=4, init_lora_weights=False).eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    for step in ("merge", "unmerge", "to"):
        old = weakref.ref(layer.quantized_weight().data)  # the packed bytes the kept view holds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging requantizes, lossy
            if step == "to":
                layer.base_layer.weight.data = layer.base_layer.weight.data.clone()  # as a move swaps the data
                layer.to("cpu")
            else:
                getattr(layer, step)()
        gc.collect()
        assert old() is None, step
