"""QLoRA: bitsandbytes base layers read in place, dequantized bit-exactly, and LoRA over them (fastpeft.quant,
fastpeft.ops.qlora, kernels/quant.py).

- dequantize_ref is compared bit for bit with bitsandbytes over NF4 / FP4, nested or not, block sizes 64 / 128,
  several quant_storage dtypes, fp32 / bf16 / fp16 and odd shapes; the triton dequant pass with it.
- The op (reference and both triton forward paths, under TRITON_INTERPRET on CPU) against an fp64 oracle on the
  same dequantized weight: forward and every gradient, the kernel's error at most 2x a same-dtype PyTorch run's.
- The CPU route of dequantize_weight (bnb's C kernels called directly) bit for bit with dequantize_ref, and its
  fallback when the symbols are missing.
- The op against PEFT's lora.Linear4bit / Linear8bitLt on the same bnb layer and the same A, B; on the CPU in
  fp32, bit for bit (NF4 / FP4, nested or not, with and without autograd); odd in_features to the oracle.
- Merging as PEFT does (dequantize, add, requantize with a warning), or into a plain nn.Linear.
"""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.quant import import_bitsandbytes  # noqa: E402  (not `import bitsandbytes`: see its docstring)

try:
    bnb = import_bitsandbytes()
except ImportError:
    pytest.skip("bitsandbytes is not installed", allow_module_level=True)
BF = bnb.functional

from conftest import assert_close_report  # noqa: E402
from fastpeft.functional import qlora_linear  # noqa: E402
from fastpeft.quant import (QuantizedWeight, base_kind, dequantize_ref, dequantize_weight, merge_into_quantized)  # noqa: E402
from fastpeft.reference import kernel_stream_on_cpu, lora_dropout_stream  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bnb_default_dequant(packed, qs):
    """bitsandbytes' own flat-layout dequantizer (its default / CUDA semantics). Its CPU C kernel indexes absmax
    per row, wrong when in_features is not a multiple of the block size (see fastpeft/quant.py)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # bnb torch.compiles it
    absmax = qs.absmax
    if qs.nested:
        absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return eager(packed.reshape(-1).view(torch.uint8), absmax.float(), qs.code, qs.blocksize,
                                    qs.shape, qs.dtype)


def _layer4(in_f, out_f, quant_type="nf4", nested=True, blocksize=64, storage=torch.uint8, dtype=torch.float32,
            compute_dtype=None, bias=True, seed=0):
    """A quantized bnb Linear4bit from a random dense weight of ``dtype``, on the CPU."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=nested, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type, quant_storage=storage, blocksize=blocksize, module=layer)
    if bias:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _layer8(in_f, out_f, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


# ---- dequantization: bit for bit --------------------------------------------------------------------

DEQ_CASES = [(qt, nested, bs, st, dt, shape)
             for qt in ("nf4", "fp4") for nested in (False, True) for bs in (64, 128)
             for st in ("uint8", "bf16", "fp32") for dt in ("fp32", "bf16", "fp16")
             for shape in ((48, 128), (33, 136))]  # 136: not a multiple of either block size


@pytest.mark.parametrize("qt,nested,bs,st,dt,shape", DEQ_CASES,
                         ids=[f"{c[0]}-{'nested' if c[1] else 'flat'}-bs{c[2]}-{c[3]}-{c[4]}-{c[5][0]}x{c[5][1]}"
                              for c in DEQ_CASES])
def test_dequantize_ref_is_bit_exact_with_bitsandbytes(qt, nested, bs, st, dt, shape):
    storage = torch.uint8 if st == "uint8" else DT[st]
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=DT[dt])
    packed, qs = BF.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=qt, quant_storage=storage)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, quant_type=qt, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True, module=layer)
    qw = QuantizedWeight.from_module(layer)
    got = dequantize_ref(qw)
    if shape[1] % bs == 0:
        want = BF.dequantize_4bit(packed, qs)
    else:
        want = _bnb_default_dequant(packed, qs)
    assert got.dtype == want.dtype == DT[dt]
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    # bit for bit but for the sign of zero: FP4's code 0b1000 is -0, which bnb's native CPU kernel gives as -0.0 on a
    # CPU without AVX512-BF16 and +0.0 elsewhere (x + 0.0 makes both +0; before 2026-12-02 this failed there)
    assert torch.equal((got + 0.0).view(bits), (want + 0.0).view(bits)), \
        f"max |diff| {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("qt,nested,st,shape", [("nf4", True, torch.bfloat16, (48, 128)), ("fp4", False, torch.uint8, (48, 128)),
                                               ("nf4", False, torch.float32, (33, 136))], ids=lambda v: str(v))
def test_fast_dequantize_is_dequantize_ref_bit_for_bit(qt, nested, st, shape):
    """The reference op path takes bnb's own kernel where its layout agrees, dequantize_ref elsewhere."""
    layer = _layer4(shape[1], shape[0], quant_type=qt, nested=nested, storage=st, dtype=torch.bfloat16)
    qw = QuantizedWeight.from_module(layer)
    for dt in (None, torch.float32, torch.float16):
        assert torch.equal(dequantize_weight(qw, dt), dequantize_ref(qw, dt))


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int8"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_weight_into_a_buffer_is_bit_for_bit(kind, dt):
    """``out=``: the same bits written into the caller's buffer (a larger flat one, as the workspace is), whether
    the route produces ``dt`` there directly or casts into it; a buffer of the wrong dtype or size is refused."""
    layer = _layer8(136, 33) if kind == "int8" else _layer4(
        128, 33, quant_type=kind[:3], nested=kind.endswith("nested"), dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    buf = torch.full((33 * 128 + 100 + 33 * 8,), float("nan"), dtype=dt)
    got = dequantize_weight(qw, dt, out=buf)
    assert torch.equal(got, dequantize_weight(qw, dt)) and got.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize_weight(qw, dt, out=buf[:10])
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize_weight(qw, torch.float16, out=buf)


NATIVE_CASES = [(qt, nested, bs, dt, shape) for qt in ("nf4", "fp4") for nested in (False, True) for bs in (64, 128)
                for dt in ("fp32", "bf16", "fp16") for shape in ((48, 128), (7, 1024), (33, 130), (16, 80))]


@pytest.mark.parametrize("qt,nested,bs,dt,shape", NATIVE_CASES,
                         ids=[f"{c[0]}-{'nested' if c[1] else 'flat'}-bs{c[2]}-{c[3]}-{c[4][0]}x{c[4][1]}"
                              for c in NATIVE_CASES])
def test_native_cpu_dequantize_is_dequantize_ref_bit_for_bit(qt, nested, bs, dt, shape):
    """bitsandbytes' C kernels called directly (the CPU route of dequantize_weight): taken wherever in_features is
    a multiple of the block size, and then bit for bit the PyTorch oracle; refused (None) elsewhere, where
    dequantize_weight falls back to the oracle's layout."""
    from fastpeft.quant import _bnb_cpu_symbol, _dequantize_4bit_native

    if _bnb_cpu_symbol(f"cdequantize_blockwise_cpu_{qt}_fp32") is None:
        pytest.skip("this bitsandbytes build has no native CPU dequantizer")
    layer = _layer4(shape[1], shape[0], quant_type=qt, nested=nested, blocksize=bs, dtype=DT[dt])
    qw = QuantizedWeight.from_module(layer)
    got = _dequantize_4bit_native(qw)
    if shape[1] % bs:
        assert got is None, "the native route must refuse a layout its kernel indexes differently"
    else:
        assert got is not None, "the native CPU route was not taken"
        want = dequantize_ref(qw)
        assert got.dtype == want.dtype and torch.equal(got, want), \
            f"max |diff| {(got.float() - want.float()).abs().max()}"
    for out in (None, torch.float32):
        assert torch.equal(dequantize_weight(qw, out), dequantize_ref(qw, out))


TORCH_DEQ_CASES = [(qt, nested, bs, dt, shape) for qt in ("nf4", "fp4") for nested in (False, True) for bs in (64, 128)
                   for dt in ("fp32", "bf16") for shape in ((33, 136), (5, 129), (16, 80), (8, 256))]


@pytest.mark.parametrize("qt,nested,bs,dt,shape", TORCH_DEQ_CASES,
                         ids=[f"{c[0]}-{'nested' if c[1] else 'flat'}-bs{c[2]}-{c[3]}-{c[4][0]}x{c[4][1]}"
                              for c in TORCH_DEQ_CASES])
def test_torch_dequantize_is_dequantize_ref_bit_for_bit(qt, nested, bs, dt, shape):
    """The PyTorch fallback of dequantize_weight (8-byte table words gathered by int32 index_select), bit for bit
    the oracle, odd element counts (5x129: half a byte at the end) and partial last blocks included."""
    from fastpeft.quant import _dequantize_4bit_torch

    layer = _layer4(shape[1], shape[0], quant_type=qt, nested=nested, blocksize=bs, dtype=DT[dt])
    qw = QuantizedWeight.from_module(layer)
    got, want = _dequantize_4bit_torch(qw), dequantize_ref(qw)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max()}"


def test_dequantize_weight_without_native_symbols_falls_back_bit_for_bit(monkeypatch):
    """A bitsandbytes build without the C symbols (a mock library, another version): bnb's dequantize_4bit, the
    same bits, and the op's outputs unchanged."""
    from fastpeft import quant

    layer = _layer4(128, 48, nested=True, compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    x, A, B = torch.randn(7, 128), torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1
    fast_w = dequantize_weight(qw)
    fast_y = qlora_linear(x, qw, layer.bias, A, B, 2.0, backend="reference")
    monkeypatch.setattr(quant, "_NATIVE", {k: None for k in ("cdequantize_blockwise_cpu_nf4_fp32",
                                                              "cdequantize_blockwise_cpu_fp32")})
    assert quant._dequantize_4bit_native(qw) is None
    assert torch.equal(dequantize_weight(qw), fast_w)
    assert torch.equal(qlora_linear(x, qw, layer.bias, A, B, 2.0, backend="reference"), fast_y)


def test_int8_dequantize_ref_is_bit_exact_with_bitsandbytes():
    layer = _layer8(130, 33)
    qw = QuantizedWeight.from_module(layer)
    want = BF.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    assert torch.equal(dequantize_ref(qw).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain-absmax"])
def test_a_weight_repacked_for_bnbs_cpu_kernel_is_unpacked_and_read(nested):
    """bitsandbytes repacks a Linear4bit weight for its CPU inference kernel at an eval-mode call (its own layout,
    absmax rounded to bf16). Reading it unpacks it in place to the weight before the repack, up to the bf16
    rounding of absmax (before 2026-12-01 fastpeft refused such a layer: inject after a first CPU generate()
    failed). Without nested absmax, bitsandbytes' own unpacking (state_dict) leaves absmax in the repacked layout
    (bnb 0.50: scales scrambled, 0.067 off on this layer); fastpeft puts it back, bnb's forward reading it too."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer = _layer4(128, 64, nested=nested)
    before = dequantize_weight(QuantizedWeight.from_module(layer, "proj")).clone()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    qw = QuantizedWeight.from_module(layer, "proj")
    assert not layer.weight.quant_state.packing_format_for_cpu
    scale = before.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert bool(((dequantize_weight(qw) - before).reshape(-1, 64).abs() <= scale * 2.0**-7).all())  # bf16 absmax
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert_close_report(layer.train()(x), F.linear(x, dequantize_weight(qw), layer.bias), 1e-5, 1e-5)


def test_view_reads_the_packed_weight_in_place():
    layer = _layer4(128, 48, nested=True, storage=torch.bfloat16)
    qw = QuantizedWeight.from_module(layer, "q")
    qs = layer.weight.quant_state
    assert qw.data.data_ptr() == layer.weight.data.data_ptr() and qw.data.dtype == torch.uint8
    assert qw.absmax is qs.absmax and qw.nested_absmax is qs.state2.absmax and qw.offset is qs.offset
    assert (qw.kind, qw.shape, qw.blocksize, qw.nested) == ("nf4", (48, 128), 64, True)
    l8 = _layer8(80, 48)
    q8 = QuantizedWeight.from_module(l8)
    assert q8.data.data_ptr() == l8.weight.data.data_ptr() and q8.scales is l8.weight.SCB
    assert base_kind(layer) == "4bit" and base_kind(l8) == "8bit" and base_kind(nn.Linear(2, 2)) == "linear"


@pytest.mark.parametrize("qt,nested,dt", [(q, n, d) for q in ("nf4", "fp4") for n in (False, True)
                                          for d in ("fp32", "bf16", "fp16")],
                         ids=lambda v: str(v))
def test_triton_dequant_pass_is_bit_exact(qt, nested, dt):
    from fastpeft.kernels import quant as KQ

    layer = _layer4(130, 33, quant_type=qt, nested=nested, dtype=DT[dt] if dt != "fp16" else torch.float32)
    qw = QuantizedWeight.from_module(layer)
    got = KQ.dequantize_4bit(qw, DT[dt]).clone()
    want = dequantize_ref(qw, DT[dt])
    assert torch.equal(got, want), f"max |diff| {(got.float() - want.float()).abs().max()}"


# ---- the op against an fp64 oracle -------------------------------------------------------------------

def _oracle(x, w, bias, A, B, s, p, seed):
    """fp64 forward and gradients of y = x Wᵀ + b + s drop(x) Aᵀ Bᵀ, with a fixed upstream gradient."""
    x, w, bias, A, B = (t.detach().double().requires_grad_(t is not w) if t is not None else None
                        for t in (x, w, bias, A, B))
    xd = lora_dropout_stream(x, p, seed) if p else x
    y = F.linear(x, w, bias) + s * F.linear(F.linear(xd, A), B)
    return y, (x, A, B, bias)


def _run(fn, x, A, B, bias, g):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    y = fn(x, A, B, bias)
    y.backward(g.to(y.dtype))
    return [y.detach(), x.grad, A.grad, B.grad] + ([bias.grad] if bias is not None else [])


OP_CASES = [
    # id, kind, nested, compute dtype, path, M, p
    ("nf4-nested-bf16-fused-M1", "nf4", True, "bf16", "fused", 1, 0.0),
    ("nf4-nested-bf16-dequant-M33-p0.1", "nf4", True, "bf16", "dequant", 33, 0.1),
    ("fp4-fp16-fused-M7-p0.1", "fp4", False, "fp16", "fused", 7, 0.1),
    ("fp4-nested-fp32-dequant-M33", "fp4", True, "fp32", "dequant", 33, 0.0),
    ("nf4-fp32-fused-M33-p0.1", "nf4", False, "fp32", "fused", 33, 0.1),
    ("int8-bf16-M7-p0.1", "int8", False, "bf16", "fused", 7, 0.1),
    ("int8-fp16-M33", "int8", False, "fp16", "fused", 33, 0.0),
    ("int8-fp32-M1", "int8", False, "fp32", "fused", 1, 0.0),
]


@pytest.mark.parametrize("kind,nested,dt,path,M,p", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_qlora_op_matches_fp64_oracle(kind, nested, dt, path, M, p, backend):
    _check_op_against_oracle(kind, nested, dt, path, M, p, backend)


def test_cpu_path_dropout_is_the_cpu_stream():
    """On CPU tensors the PyTorch path's mask is the CPU path's stream (``lora_dropout_cpu``, as plain LoRA's):
    the kernels' Philox stream in PyTorch int64 ops, drawn in forward and backward, made p > 0 slower than
    PEFT + bitsandbytes."""
    from fastpeft.reference import lora_dropout_cpu, lora_dropout_ref
    layer = _layer4(128, 48, quant_type="nf4", nested=True, compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    torch.manual_seed(3)
    x, A, B = torch.randn(9, 128), torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1
    y = qlora_linear(x, qw, None, A, B, 2.0, dropout_p=0.2, seed=11, backend="reference")
    w = dequantize_ref(qw, torch.float32)
    for drop, same in ((lora_dropout_cpu, True), (lora_dropout_ref, False)):
        want = x @ w.t() + 2.0 * (drop(x, 0.2, 11) @ A.t()) @ B.t()
        assert torch.allclose(y, want, rtol=1e-5, atol=1e-5) == same


def test_backward_redraws_the_forwards_stream():
    """The PyTorch path's backward redraws the mask of the stream its forward drew (kept on ctx), even where the
    stream switch changes in between: the same gradients as a step taken wholly under ``kernel_stream_on_cpu``."""
    layer = _layer8(128, 48)
    qw = QuantizedWeight.from_module(layer)
    torch.manual_seed(3)
    x, A, B = torch.randn(9, 128), torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1
    g = torch.randn(9, 48)

    def step(split):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        with kernel_stream_on_cpu():
            y = qlora_linear(leaves[0], qw, None, leaves[1], leaves[2], 2.0, dropout_p=0.2, seed=11,
                             backend="reference")
            if not split:
                y.backward(g)
        if split:
            y.backward(g)
        return [t.grad for t in leaves]
    for a, b in zip(step(True), step(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("gemm", ["tma-shrink", "cublas", "torch"])
def test_dequant_path_runs_loras_forward_choices(monkeypatch, gemm, p):
    """The dequant path is bf16 LoRA's forward and backward on the workspace: each of LoRA's choices forced
    (FASTPEFT_LORA_GEMM) gives the oracle's output and gradients; ``tma-shrink`` fuses the shrink and the
    backward's dY pass there."""
    pytest.importorskip("triton")
    from fastpeft.kernels import lora_tma as KT
    monkeypatch.setenv("FASTPEFT_LORA_GEMM", gemm)
    ran, real, real_bwd = [], KT.lora_forward_tma, KT.lora_backward_tma
    monkeypatch.setattr(KT, "lora_forward_tma", lambda **kw: ran.append("fwd") or real(**kw))
    monkeypatch.setattr(KT, "lora_backward_tma", lambda **kw: ran.append("bwd") or real_bwd(**kw))
    _check_op_against_oracle("nf4", True, "bf16", "dequant", 33, p, "triton")
    assert ran == (["fwd", "bwd"] if gemm == "tma-shrink" else [])


GPU_OP_CASES = [(kind, nested, path, M, p) for kind, nested in (("nf4", True), ("fp4", False), ("int8", False))
                for path, M in (("fused", 1), ("fused", 16), ("dequant", 64), ("dequant", 512), (None, 16), (None, 512))
                for p in (0.0, 0.1) if not (kind == "int8" and path == "dequant")]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,nested,path,M,p", GPU_OP_CASES, ids=lambda v: str(v))
def test_gpu_qlora_op_matches_fp64_oracle(kind, nested, path, M, p):
    """On the card, bf16, autotuned: each forward path forced (None: the timed choice) at decode and prefill
    sizes, forward and every gradient within 2x a bf16 PyTorch run's error against fp64; the bnb layer quantized
    on the CPU, then moved (its packed bytes unchanged)."""
    _check_op_against_oracle(kind, nested, "bf16", path, M, p, "triton", device="cuda", K=320, N=192, r=16)


def _check_op_against_oracle(kind, nested, dt, path, M, p, backend, device="cpu", K=128, N=48, r=8):
    """The op's forward and gradients within 2x a same-dtype PyTorch run's error against fp64; the oracle's
    dropout mask is the backend's stream (the kernels' Philox one for triton, on CPU tensors too)."""
    with kernel_stream_on_cpu() if backend == "triton" else contextlib.nullcontext():
        _check_op(kind, nested, dt, path, M, p, backend, device, K, N, r)


def _check_op(kind, nested, dt, path, M, p, backend, device, K, N, r):
    dtype = DT[dt]
    s, seed = 2.0, 1234
    layer = _layer8(K, N) if kind == "int8" else _layer4(K, N, quant_type=kind, nested=nested, compute_dtype=dtype)
    layer = layer.to(device)
    qw = QuantizedWeight.from_module(layer)
    torch.manual_seed(2)
    x = torch.randn(M, K, dtype=dtype).to(device)
    A = (torch.randn(r, K) * 0.1).to(device, dtype)
    B = (torch.randn(N, r) * 0.1).to(device, dtype)
    bias = layer.bias.detach().to(dtype)
    g = torch.randn(M, N, dtype=torch.float64).to(device)
    w_c = dequantize_ref(qw, dtype)  # the weight as the compute dtype holds it: the same for all three runs
    y64, leaves = _oracle(x, w_c, bias, A, B, s, p, seed)
    y64.backward(g)
    want = [y64.detach()] + [t.grad for t in leaves]

    def torch_run(x, A, B, b):
        xd = lora_dropout_stream(x, p, seed) if p else x
        return F.linear(x, w_c, b) + s * F.linear(F.linear(xd, A), B)

    def op(x, A, B, b):
        return qlora_linear(x, qw, b, A, B, s, dropout_p=p, seed=seed, backend=backend,
                            path=path if backend == "triton" else None)

    base = _run(torch_run, x, A, B, bias, g)
    got = _run(op, x, A, B, bias, g)
    for name, gt, bt, wt in zip(("y", "dx", "dA", "dB", "dbias"), got, base, want):
        assert gt.dtype == bt.dtype, name
        torch_err = (bt.double() - wt).abs().max().item()
        assert_close_report(gt, wt, rtol=0.0, atol=2 * torch_err + 1e-6 * max(1.0, wt.abs().max().item()),
                            what=f"{name} (PyTorch's own max error {torch_err:.3g})")


def test_fused_and_dequant_paths_agree_bitwise_on_fp32_weights():
    """Both forward paths dequantize to the same bits; only the summation order of x Wᵀ may differ."""
    layer = _layer4(128, 40, compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    x = torch.randn(5, 128)
    A, B = torch.randn(8, 128) * 0.1, torch.randn(40, 8) * 0.1
    y1 = qlora_linear(x, qw, layer.bias, A, B, 0.5, backend="triton", path="fused")
    y2 = qlora_linear(x, qw, layer.bias, A, B, 0.5, backend="triton", path="dequant")
    assert_close_report(y1, y2, rtol=1e-6, atol=1e-6, what="fused vs dequant")


# ---- the op against PEFT + bitsandbytes on the same layer ----------------------------------------------

class _One(nn.Module):
    """One bnb layer as a model; flagged as transformers flags a model loaded with BitsAndBytesConfig, so that PEFT
    wraps it in its bnb LoRA layers."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = isinstance(proj, bnb.nn.Linear4bit)
        self.is_loaded_in_8bit = isinstance(proj, bnb.nn.Linear8bitLt)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int8"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_same_outputs_and_gradients_as_peft_bitsandbytes(kind, backend):
    peft = pytest.importorskip("peft")
    K, N, r, alpha = 128, 48, 8, 16
    if kind == "int8":
        base = _layer8(K, N)
    else:
        base = _layer4(K, N, quant_type=kind[:3], nested=kind.endswith("nested"), compute_dtype=torch.float32)
    model = peft.get_peft_model(_One(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                            lora_dropout=0.0, init_lora_weights=False))
    lora_layer = model.base_model.model.proj
    assert type(lora_layer).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    A, B = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
    model.train()  # bnb's CPU eval path would repack the weight in place (packing_format_for_cpu)
    torch.manual_seed(3)
    x = torch.randn(2, 5, K)
    x1 = x.clone().requires_grad_()
    y_peft = model(x1)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    dA_peft, dB_peft = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None

    qw = QuantizedWeight.from_module(base)
    x2 = x.clone().requires_grad_()
    y = qlora_linear(x2, qw, base.bias, A, B, alpha / r, backend=backend)
    y.backward(g)
    if kind == "int8":
        # bnb's int8 matmul also quantizes x to int8 (LLM.int8()); ours is W8A16 on the exact int8 weight,
        # so the base outputs differ by x's quantization error: compare the LoRA part and dX's LoRA part exactly,
        # the whole to that error.
        assert_close_report(y, y_peft, rtol=0, atol=0.05, what="y vs PEFT+bnb int8")
    else:
        assert_close_report(y, y_peft, rtol=1e-5, atol=1e-5, what="y vs PEFT+bnb")
        assert_close_report(x2.grad, x1.grad, rtol=1e-5, atol=1e-5, what="dx vs PEFT+bnb")
    assert_close_report(A.grad, dA_peft, rtol=1e-4, atol=1e-5, what="dA vs PEFT")
    assert_close_report(B.grad, dB_peft, rtol=1e-4, atol=1e-5, what="dB vs PEFT")


PEFT_CPU_CASES = [(qt, nested, K, M) for qt in ("nf4", "fp4") for nested in (False, True)
                  for K, M in ((128, 1), (128, 7), (130, 33), (1024, 16))] + \
                 [("int8", False, K, M) for K, M in ((128, 1), (80, 7), (130, 33), (48, 64), (80, 80))]


@pytest.mark.parametrize("qt,nested,K,M", PEFT_CPU_CASES,
                         ids=[f"{c[0]}-{'nested' if c[1] else 'flat'}-K{c[2]}-M{c[3]}" for c in PEFT_CPU_CASES])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_cpu_path_equals_peft_bitsandbytes_bit_for_bit(qt, nested, K, M, grad):
    """fp32 on the CPU, in training mode: the reference path runs PEFT + bnb's operations in their order (bnb's
    dequantization, F.linear with the bias, then + lora_B(lora_A(x)) * s), so outputs and gradients are PEFT's bit
    for bit, with and without autograd. K = 130 (odd) is where bnb itself takes the flat-layout PyTorch
    dequantizer; in_features not a multiple of the block size but even (80) is where bnb's CPU C kernel disagrees
    with its own quantizer (test_cpu_path_on_odd_shapes_matches_the_oracle). int8: W = C * (SCB / 127) as bnb's
    CPU training matmul (MatMul8bitFp) forms it, x not quantized, where M >= K; below, the scales go on the (M, N)
    side (``_scales_on_rows``: y and dX to rounding, dA and dB still bit for bit)."""
    peft = pytest.importorskip("peft")
    N, r, alpha = 48, 8, 13  # scaling 1.625: not a power of two, so the order of the products shows
    if qt == "int8":
        base = _layer8(K, N)
    else:
        base = _layer4(K, N, quant_type=qt, nested=nested, compute_dtype=torch.float32)
    model = peft.get_peft_model(_One(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                            lora_dropout=0.0, init_lora_weights=False))
    model.train()  # bnb's CPU eval path would repack the weight in place (packing_format_for_cpu)
    lora_layer = model.base_model.model.proj
    A, B = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
    qw = QuantizedWeight.from_module(base)
    rows_scaled = qt == "int8" and M < K
    torch.manual_seed(4)
    x = torch.randn(M, K)
    if not grad:
        with torch.no_grad():
            want, got = model(x), qlora_linear(x, qw, base.bias, A, B, alpha / r, backend="reference")
        assert got.grad_fn is None
        if rows_scaled:
            assert not torch.equal(got, want)  # the other order: the check below can fail
            assert_close_report(got, want, rtol=1e-6, atol=1e-6, what="y")
        else:
            assert torch.equal(got, want), f"y: max |diff| {(got - want).abs().max()}"
        return
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = model(x1)
    g = torch.randn_like(want)
    want.backward(g)
    grads_peft = [x1.grad, A.grad.clone(), B.grad.clone()]
    A.grad = B.grad = None
    got = qlora_linear(x2, qw, base.bias, A, B, alpha / r, backend="reference")
    got.backward(g)
    for name, a, b in zip(("y", "dx", "dA", "dB"), [got, x2.grad, A.grad, B.grad], [want] + grads_peft):
        if rows_scaled and name in ("y", "dx"):
            assert_close_report(a, b, rtol=1e-6, atol=1e-6, what=name)
        else:
            assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max()}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_int8_half_precision_keeps_its_range(dtype, backend):
    """int8 weights of std 0.02 (row scales c ~ 5e-4), x of magnitude 60, M < K: in fp16 the row scales stay on W,
    on the PyTorch path (x Cᵀ = y / c overflowed to inf at |y| ~ 28, dY ⊙ c underflowed, dX 7 % off) and in the
    triton backward (dY ⊙ c underflowed: dX 3.6 % off; here under the interpreter); bf16 (fp32's exponent range)
    is the control. y and dX within a few of the dtype's rounding steps of an fp32 computation on the same weight."""
    if backend == "triton":
        pytest.importorskip("triton")
        from fastpeft.kernels import INTERPRET
        if not INTERPRET:
            pytest.skip("the triton int8 path on CPU tensors needs TRITON_INTERPRET=1")
    K, N, r = 256, 8, 4
    lin = nn.Linear(K, N)
    torch.manual_seed(0)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    layer = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    qw = QuantizedWeight.from_module(layer)
    w = qw.data.float() * (qw.scales / 127).unsqueeze(1)
    x = (torch.randn(1, K) * 60).to(dtype).requires_grad_()
    a, b = torch.zeros(r, K, dtype=dtype), torch.zeros(N, r, dtype=dtype)
    from fastpeft.reference import kernel_stream_on_cpu
    with kernel_stream_on_cpu():
        y = qlora_linear(x, qw, layer.bias.to(dtype), a, b, 1.0, backend=backend)
    want = x.detach().float() @ w.t() + layer.bias.detach()
    assert torch.isfinite(y).all()
    assert_close_report(y.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()), what="y")
    dy = (torch.randn(1, N) * 1e-3).to(dtype)
    with kernel_stream_on_cpu():
        y.backward(dy)
    rel = float((x.grad.float() - dy.float() @ w).norm() / (dy.float() @ w).norm())
    assert rel < 1e-2, rel


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int8"])
def test_cpu_path_compiles_without_graph_breaks(kind):
    """torch.compile(fullgraph=True) over the CPU path (aot_eager: dynamo and AOT autograd): the direct ctypes
    route of dequantize_weight is left for bnb's torch.library ops while compiling, so there is no graph break, and
    the compiled outputs and gradients equal eager's bit for bit, with and without autograd."""
    layer = _layer8(128, 48) if kind == "int8" else \
        _layer4(128, 48, quant_type=kind[:3], nested=kind.endswith("nested"), compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    torch.manual_seed(6)
    x0, A0, B0 = torch.randn(7, 128), torch.randn(8, 128) * 0.1, torch.randn(48, 8) * 0.1

    def fn(x, A, B):
        return qlora_linear(x, qw, layer.bias, A, B, 1.625, backend="reference")

    def run(f):
        x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
        y = f(x, A, B)
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad, A.grad, B.grad]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for name, got, want in zip(("y", "dx", "dA", "dB"), run(compiled), run(fn)):
        assert torch.equal(got, want), f"{name}: max |diff| {(got - want).abs().max()}"
    with torch.no_grad():
        assert torch.equal(compiled(x0, A0, B0), fn(x0, A0, B0))


ODD_CASES = [(qt, nested, K, M) for qt in ("nf4", "fp4") for nested in (False, True)
             for K, M in ((80, 1), (80, 7), (130, 33), (136, 7))]


@pytest.mark.parametrize("qt,nested,K,M", ODD_CASES,
                         ids=[f"{c[0]}-{'nested' if c[1] else 'flat'}-K{c[2]}-M{c[3]}" for c in ODD_CASES])
def test_cpu_path_on_odd_shapes_matches_the_oracle(qt, nested, K, M):
    """in_features not a multiple of the block size: the reference path dequantizes in the quantizer's flat layout
    (dequantize_ref), with and without autograd; output and gradients to the fp64 oracle on that weight within
    2x a same-dtype PyTorch run's error."""
    N, r, s = 40, 8, 2.0
    layer = _layer4(K, N, quant_type=qt, nested=nested, compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    torch.manual_seed(5)
    x, A, B = torch.randn(M, K), torch.randn(r, K) * 0.1, torch.randn(N, r) * 0.1
    bias = layer.bias.detach()
    g = torch.randn(M, N, dtype=torch.float64)
    w = dequantize_ref(qw, torch.float32)
    y64, leaves = _oracle(x, w, bias, A, B, s, 0.0, 0)
    y64.backward(g)
    want = [y64.detach()] + [t.grad for t in leaves[:3]]
    base = _run(lambda x, A, B, b: F.linear(x, w, b) + s * F.linear(F.linear(x, A), B), x, A, B, None, g)
    got = _run(lambda x, A, B, b: qlora_linear(x, qw, bias, A, B, s, backend="reference"), x, A, B, None, g)
    for name, gt, bt, wt in zip(("y", "dx", "dA", "dB"), got, base, want):
        torch_err = (bt.double() - wt).abs().max().item()
        assert_close_report(gt, wt, rtol=0.0, atol=2 * torch_err + 1e-6 * max(1.0, wt.abs().max().item()),
                            what=f"{name} (PyTorch's own max error {torch_err:.3g})")
    with torch.no_grad():
        assert torch.equal(qlora_linear(x, qw, bias, A, B, s, backend="reference"), got[0])


# ---- merging -------------------------------------------------------------------------------------------

def test_merge_requantizes_with_a_warning_as_peft_does():
    peft = pytest.importorskip("peft")
    K, N, r = 128, 48, 8
    ours = _layer4(K, N, nested=True, compute_dtype=torch.float32)
    theirs = _layer4(K, N, nested=True, compute_dtype=torch.float32)
    model = peft.get_peft_model(_One(theirs), peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"],
                                                              init_lora_weights=False))
    lora_layer = model.base_model.model.proj
    delta = lora_layer.get_delta_weight("default").detach()
    with pytest.warns(UserWarning, match="lossy"):
        merge_into_quantized(ours, delta, name="proj")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_layer.merge()
    assert torch.equal(ours.weight.data, theirs.weight.data)  # the same requantized bytes as PEFT's merge
    assert torch.equal(dequantize_ref(QuantizedWeight.from_module(ours)),
                       dequantize_ref(QuantizedWeight.from_module(theirs)))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_with_dequantize_gives_a_float_linear_with_the_same_outputs(kind):
    K, N, r = 128, 48, 8
    layer = _layer8(K, N) if kind == "int8" else _layer4(K, N, compute_dtype=torch.float32)
    qw = QuantizedWeight.from_module(layer)
    A, B = torch.randn(r, K) * 0.1, torch.randn(N, r) * 0.1
    before = layer.weight.data.clone()
    lin = merge_into_quantized(layer, 2.0 * B @ A, dequantize=True)
    assert type(lin) is nn.Linear and lin.weight.dtype == torch.float32
    assert torch.equal(layer.weight.data, before)  # the quantized layer is left as it was
    x = torch.randn(7, K)
    want = qlora_linear(x, qw, layer.bias, A, B, 2.0, backend="reference")
    assert_close_report(lin(x), want, rtol=1e-5, atol=1e-5, what="merged nn.Linear vs QLoRA")


# ---- the shared workspace ------------------------------------------------------------------------------

def _in_new_thread(fn):
    """fn() in a thread of its own (a fresh CPU workspace), its exception re-raised here."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_cpu_path_dequantizes_into_the_workspace_with_no_weight_sized_allocation(kind):
    """After the first call, a forward + backward of the CPU path allocates no tensor as large as W (a fresh one
    per call is mapped and faulted in page by page above glibc's mmap threshold), and its outputs are the same."""
    import fastpeft

    K, N = 256, 192
    base = _layer8(K, N) if kind == "int8" else _layer4(K, N, nested=True)
    layer = fastpeft.FastLoRALinear.from_linear(base, r=8, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(3, K, requires_grad=True)

    def step():
        y = layer(x)
        return (y,) + torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), torch.ones_like(y))

    def run():
        first = step()
        with torch.profiler.profile(profile_memory=True) as prof:
            second = step()
        largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
        return first, second, largest
    first, second, largest = _in_new_thread(run)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert 0 < largest < N * K * 4 // 4, f"a call allocated {largest} B, W is {N * K * 4} B"


@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_workspace_first_allocated_under_inference_mode_serves_training(kind):
    """A model run under torch.inference_mode() first (an evaluation, a generate) and trained next: the workspace
    it allocated is an ordinary tensor, which the training step can write (int8 writes it with copy_, which
    refuses an inference tensor outside inference mode)."""
    import fastpeft

    base = _layer8(128, 48) if kind == "int8" else _layer4(128, 48)
    layer = fastpeft.FastLoRALinear.from_linear(base, r=8, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(5, 128)

    def run():
        with torch.inference_mode():
            y0 = layer(x)
        y = layer(x.requires_grad_())
        y.sum().backward()
        return y0, y.detach(), x.grad
    y0, y, dx = _in_new_thread(run)
    assert torch.equal(y0, y) and dx is not None


def test_workspace_is_per_thread_on_the_cpu_and_grows():
    from fastpeft.quant import workspace

    here = workspace("cpu", torch.float16, 64)
    assert workspace("cpu", torch.float16, 32).data_ptr() == here.data_ptr()  # reused, not shrunk
    there = _in_new_thread(lambda: workspace("cpu", torch.float16, 64))
    assert there.data_ptr() != here.data_ptr()  # two threads' calls run at once on the CPU
    assert workspace("cpu", torch.float16, 1 << 16).numel() == 1 << 16


def test_base_forward_keeps_its_own_weight_where_autograd_saves_it():
    """With no active adapter the layer is x deq(W)^T + b; when x requires grad autograd keeps W for dX, so W is
    not the shared workspace, which the next layer's call overwrites: dX through two such layers is exact."""
    import fastpeft

    a = fastpeft.FastLoRALinear.from_linear(_layer4(64, 64, seed=1), r=4)
    b = fastpeft.FastLoRALinear.from_linear(_layer4(64, 64, seed=2), r=4)
    for m in (a, b):
        m.set_adapter(None)
    x = torch.randn(4, 64, requires_grad=True)
    b(a(x)).sum().backward()
    wa, wb = (dequantize_ref(QuantizedWeight.from_module(m.base_layer)) for m in (a, b))
    x2 = x.detach().requires_grad_()
    F.linear(F.linear(x2, wa, a.bias), wb, b.bias).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_many_adapters_per_batch_keep_their_weight_for_the_backward():
    """Mixed adapter ids through two stacked quantized layers, with gradients: lora_linear_multi's autograd saves
    W, so the call's W is not the workspace (the second layer would overwrite the first's): dX and the adapters'
    gradients equal those of each row run alone through its adapter's single-adapter path."""
    import fastpeft

    layers = []
    for seed in (1, 2):
        m = fastpeft.FastLoRALinear.from_linear(_layer4(64, 64, seed=seed), r=4, lora_alpha=8, init_lora_weights=False)
        m.add_adapter("other", 2, 4, init_lora_weights=False)
        layers.append(m)
    params = [p for m in layers for name in ("default", "other")
              for p in (m.lora_A_adapters[name], m.lora_B_adapters[name])]
    x = torch.randn(3, 64)
    ids = torch.tensor([0, 1, -1])

    def grads(rows, fwd):
        for p in params:  # set_adapter freezes the inactive adapters: all train here
            p.requires_grad_(True)
        xg = rows.clone().requires_grad_()
        return torch.autograd.grad(fwd(xg).square().sum(), [xg] + params, allow_unused=True)
    mixed = grads(x, lambda v: layers[1](layers[0](v, ids), ids))
    dx, dparams = [], [torch.zeros_like(p) for p in params]
    for row, name in enumerate(("default", "other", None)):
        for m in layers:
            m.set_adapter(name)
        one = grads(x[row:row + 1], lambda v: layers[1](layers[0](v)))
        dx.append(one[0])
        for acc, g in zip(dparams, one[1:]):
            if g is not None:
                acc += g
    assert_close_report(mixed[0], torch.cat(dx), atol=1e-5, rtol=1e-4)
    for g, w in zip(mixed[1:], dparams):
        assert_close_report(g, w, atol=1e-5, rtol=1e-4)


def _lora_on(kind, seed):
    import fastpeft

    base = _layer8(64, 64, seed=seed) if kind == "int8" else _layer4(64, 64, seed=seed)
    return fastpeft.FastLoRALinear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)


def _dense_twin(m, kind, v):
    """The layer on a freshly dequantized W (the op's int8 W: C * (SCB / 127)), through plain autograd."""
    qw = QuantizedWeight.from_module(m.base_layer)
    if kind == "int8":
        w = qw.data.float() * (qw.scales.unsqueeze(1) * (1 / 127))
    else:
        w = dequantize_weight(qw, torch.float32)
    return F.linear(v, w, m.bias) + m.scaling * F.linear(F.linear(v, m.lora_A), m.lora_B)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_double_backward_keeps_its_own_weight(kind):
    """create_graph=True: autograd saves the backward's W for the second derivative, so that W is not the shared
    workspace (the next layer's backward overwrites it; bnb's C dequantizer without bumping the version counter,
    so nf4 would be silently wrong and int8 would raise). Second-order gradients through two stacked layers
    equal those of the same layers on freshly dequantized weights."""
    a, b = _lora_on(kind, 1), _lora_on(kind, 2)
    x = torch.randn(3, 64, requires_grad=True)
    gx, = torch.autograd.grad(b(a(x)).square().sum(), x, create_graph=True)
    got = torch.autograd.grad(gx.square().sum(), a.lora_A)[0]
    gx2, = torch.autograd.grad(_dense_twin(b, kind, _dense_twin(a, kind, x)).square().sum(), x, create_graph=True)
    want = torch.autograd.grad(gx2.square().sum(), a.lora_A)[0]
    assert_close_report(gx, gx2, atol=1e-5, rtol=1e-5)
    assert_close_report(got, want, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_second_derivatives_through_the_adapter_gradients(kind):
    """create_graph=True on the adapters' gradients: dB = s dYᵀ u depends on x and A through u, which the backward
    recomputes by recorded ops (the u saved by the forward has no graph: it would read as a constant). d/dx and
    d/dA of ‖dL/dB‖² equal those of the same layer on a freshly dequantized W through plain autograd."""
    m = _lora_on(kind, 4)
    x = torch.randn(3, 64, requires_grad=True)

    def second(fwd):
        gb, = torch.autograd.grad(fwd(x).square().sum(), m.lora_B, create_graph=True)
        return torch.autograd.grad(gb.square().sum(), (x, m.lora_A))
    got, want = second(m), second(lambda v: _dense_twin(m, kind, v))
    for name, g_, w_ in zip(("x", "A"), got, want):
        assert_close_report(g_, w_, atol=1e-4 * w_.abs().max().item(), rtol=1e-4, what=name)


def test_torch_func_transforms_get_a_fresh_weight():
    """Under torch.func (grad / vjp) the workspace is not written: the transforms refuse in-place writes to a
    captured tensor, and a buffer first allocated there would be a wrapped tensor."""
    m = _lora_on("int8", 3)
    m.set_adapter(None)  # the base forward
    c = torch.randn(3, 64)
    m(c)  # the thread's workspace exists
    v = torch.randn(3, 64)
    g = torch.func.grad(lambda t: (m(c) * t).sum())(v)
    assert torch.equal(g, m(c))


def test_release_workspaces_and_buffers_of_any_shape():
    from fastpeft.quant import release_workspaces, workspace

    first = workspace("cpu", torch.float64, 100)
    release_workspaces()
    assert workspace("cpu", torch.float64, 10).data_ptr() != first.data_ptr()  # `first` holds the old buffer
    qw = QuantizedWeight.from_module(_layer4(64, 48))
    buf = torch.empty(96, 64)  # a 2-D contiguous buffer of enough elements: used flat
    assert torch.equal(dequantize_weight(qw, torch.float32, out=buf), dequantize_weight(qw, torch.float32))


def test_base_module_is_the_bitsandbytes_layer_itself():
    """``base_module()`` of a QLoRA layer is the bnb layer it wraps (its packed weight as bnb holds it), not an
    nn.Linear over the packed bytes (which raised at its first call)."""
    import fastpeft

    base = _layer4(64, 32)
    layer = fastpeft.FastLoRALinear.from_linear(base, r=4)
    assert layer.base_module() is base
