"""QLoRA: LoRA over a bitsandbytes base (4-bit NF4 / FP4, nested absmax or not, or 8-bit), against the
floating-point layers and the other ways to run it.

    fastpeft bench qlora                              # the default grid for this machine
    fastpeft bench qlora --tokens 1 16 --shapes 4096x4096 --ranks 16 --json out.json
    fastpeft bench qlora --quant nf4-nested fp4 int8  # which bases (default: NF4 nested on a GPU, all on a CPU)
    python benchmarks/bench_qlora.py ...              # the same, from a checkout

Providers: ``linear`` (frozen nn.Linear in --dtype, the floor), ``lora`` (fastpeft LoRA on that nn.Linear),
``peft-bnb`` (PEFT's LoRA on the bitsandbytes layer, the model flagged ``is_loaded_in_4bit`` / ``_8bit`` as
transformers flags it, so that PEFT takes its ``lora.bnb`` layers: bnb's matmul, then the eager LoRA branch),
``dequant-addmm`` (Unsloth-style, written here: dequantize W with bitsandbytes into a temporary, one GEMM, the
LoRA term by ``addmm_``; backward dequantizes again) and ``qlora`` (fastpeft's FastLoRALinear over the same
bnb layer: the fused / dequant-pass kernels on CUDA, the PyTorch path on the CPU). Modes ``fwd`` and
``fwd+bwd`` (dX, dA, dB), each with its peak memory on CUDA; ``--modes eval`` adds serving (eval mode, no
gradients: on the CPU, bitsandbytes' inference kernel under PEFT and fastpeft alike). Ratios are to ``linear``,
measured in one run.
``--dropout p``: ``lora``, ``qlora`` and ``peft-bnb`` train with LoRA dropout p (``dequant-addmm`` has none:
Unsloth's fast path needs p = 0). Without dropout, ``qlora`` and ``peft-bnb`` rows give their relative error
against ``dequant-addmm`` (y and every gradient); with it every call draws its own mask.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Case, Group  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.quant import import_bitsandbytes  # noqa: E402

GPU_TOKENS = [1, 16, 64, 512, 8192]
GPU_SHAPES = [(4096, 4096)]
CPU_TOKENS = [1, 16, 64, 512]
CPU_SHAPES = [(1024, 1024)]
QUANTS = ("nf4-nested", "nf4", "fp4-nested", "fp4", "int8")  # "-nested": bnb's compress_statistics (double quant)
GPU_QUANTS = ["nf4-nested"]
CPU_QUANTS = ["nf4-nested", "nf4", "fp4", "int8"]


def _dequantize(layer, dtype):
    """W (out, in) in ``dtype`` by bitsandbytes' own dequantizer (a temporary)."""
    bnb = import_bitsandbytes()
    w = layer.weight
    if getattr(w, "quant_state", None) is None:  # Linear8bitLt: CB * SCB / 127
        return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).to(dtype)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)


class DequantAddmm(torch.autograd.Function):
    """The Unsloth-style baseline: ``y = x deq(W)^T``, then ``y.addmm_(x A^T, B^T, alpha=s)``; backward
    ``dX = dY deq(W) + s (dY B) A`` with W dequantized again (never saved), ``dA = s (dY B)^T x``,
    ``dB = s dY^T (x A^T)``. No dropout (Unsloth's fast path needs dropout 0)."""

    @staticmethod
    def forward(ctx, x, A, B, layer, s):
        w = _dequantize(layer, x.dtype)
        u = x @ A.t()
        y = x @ w.t()
        y.addmm_(u, B.t(), alpha=s)
        ctx.layer, ctx.s = layer, s
        ctx.save_for_backward(x, A, B, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, u = ctx.saved_tensors
        w = _dequantize(ctx.layer, dy.dtype)
        v = dy @ B
        dx = dy @ w
        dx.addmm_(v, A, alpha=ctx.s)
        return dx, ctx.s * v.t() @ x, ctx.s * dy.t() @ u, None, None


def _quantized(lin: nn.Linear, quant: str, device, dtype):
    """A bitsandbytes layer holding ``lin``'s weight: ``Linear4bit`` (``quant`` "nf4" / "fp4", "-nested" for
    compress_statistics) or ``Linear8bitLt`` ("int8", has_fp16_weights=False, threshold 0)."""
    bnb = import_bitsandbytes()
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                    threshold=0.0)
        layer.load_state_dict({"weight": lin.weight.data.to("cpu")})
        return layer.to(device)
    qt, nested = quant.split("-")[0], quant.endswith("-nested")
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype, quant_type=qt,
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, compress_statistics=nested,
                                     quant_type=qt, module=layer)
    return layer.to(device)


def providers(k, n, r, quant, device, dtype, kernels_ok: bool, p: float = 0.0):
    """name -> (callable module(x), backend); LoRA dropout p on ``lora``, ``qlora`` and ``peft-bnb``."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    lora = fastpeft.FastLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)
    backend = "triton" if kernels_ok else "reference"
    qlayer = fastpeft.FastLoRALinear.from_linear(_quantized(lin, quant, device, dtype), r=r, lora_alpha=2 * r,
                                                 lora_dropout=p, init_lora_weights=False)
    a = lora.lora_A.detach().to(dtype).requires_grad_(True)
    b = lora.lora_B.detach().to(dtype).requires_grad_(True)
    base = _quantized(lin, quant, device, dtype)
    dq = _Module(lambda x: DequantAddmm.apply(x, a, b, base, 2.0), [a, b])
    out = {"linear": (lin, None), "lora": (lora, backend), "dequant-addmm": (dq, None), "qlora": (qlayer, backend)}
    try:
        import peft
    except ImportError:
        return out
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    model = nn.Sequential(_quantized(lin, quant, device, dtype))
    # as transformers flags a model loaded with BitsAndBytesConfig: PEFT then wraps the layer in lora.bnb's
    # Linear4bit / Linear8bitLt (what a QLoRA user runs), not its generic lora.Linear
    model.is_loaded_in_8bit = quant == "int8"
    model.is_loaded_in_4bit = quant != "int8"
    pm = peft.get_peft_model(model, cfg).train()
    layer = pm.base_model.model[0]
    with torch.no_grad():  # the same A, B everywhere: the providers compute the same outputs
        layer.lora_A["default"].weight.copy_(lora.lora_A)
        layer.lora_B["default"].weight.copy_(lora.lora_B)
        qlayer.lora_A.copy_(lora.lora_A)
        qlayer.lora_B.copy_(lora.lora_B)
    out["peft-bnb"] = (pm, None)
    return out


class _Module:
    """A callable with the ``parameters()`` the timed step differentiates."""

    def __init__(self, fn, params):
        self.fn, self.params = fn, params

    def __call__(self, x):
        return self.fn(x)

    def parameters(self):
        return iter(self.params)


def groups(m, k, n, r, quant, p, modes, ctx):
    x = torch.randn(m, k, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    dy = torch.randn(m, n, device=ctx.device, dtype=ctx.dtype)
    mods = providers(k, n, r, quant, ctx.device, ctx.dtype, ctx.kernels_ok, p)
    # The same quantized W and the same A, B (``providers``): fastpeft's QLoRA and PEFT + bitsandbytes are checked
    # against the plain dequantize + GEMM composition (y, dx, dA, dB), without dropout (with it each call draws
    # its own mask).
    checks = {name: "dequant-addmm" for name in ("qlora", "peft-bnb") if name in mods and p == 0.0}
    for mode in modes:
        if mode == "eval":
            yield _eval_group(k, n, r, quant, p, x.detach(), ctx)
            continue
        yield Group({"mode": mode},
                    {name: harness.layer_step(mod, be, mode, x, dy) for name, (mod, be) in mods.items()},
                    checks=checks)


def _eval_group(k, n, r, quant, p, x, ctx) -> Group:
    """Serving: every provider in eval mode, no gradients, an input without grad. There PEFT's layer runs bnb's own
    forward, which on a CPU with AVX512-BF16 repacks the weight for bnb's inference kernel (bf16); fastpeft's
    QLoRA does the same (``fastpeft.quant.set_cpu_inference_kernel``), so ``qlora`` is checked against
    ``peft-bnb`` (0 where both run that kernel), and ``peft-bnb`` against the exact ``dequant-addmm``."""
    mods = providers(k, n, r, quant, ctx.device, ctx.dtype, ctx.kernels_ok, p)
    for mod, _ in mods.values():
        if isinstance(mod, nn.Module):
            mod.eval()
    checks = {"qlora": "peft-bnb", "peft-bnb": "dequant-addmm"} if "peft-bnb" in mods else {}
    return Group({"mode": "eval"}, {name: harness.layer_step(mod, be, "fwd", x, None) for name, (mod, be) in
                                    mods.items()}, grad=False, checks=checks)


def cases(args, ctx) -> list:
    return [Case(dict(quant=qt, M=m, K=k, N=n, r=r, p=p), functools.partial(groups, m, k, n, r, qt, p, args.modes, ctx))
            for qt in args.quant for m in args.tokens for k, n in args.shapes for r in args.ranks for p in args.dropout]


def add_arguments(ap, cuda: bool) -> None:
    harness.add_linear_args(ap, cuda, (GPU_TOKENS, CPU_TOKENS), (GPU_SHAPES, CPU_SHAPES))
    ap.add_argument("--ranks", nargs="+", type=harness.positive_int, default=[16])
    ap.add_argument("--dropout", nargs="+", type=harness.rate, default=[0.0],
                    help="LoRA dropout of lora, qlora and peft-bnb (dequant-addmm has none)")
    ap.add_argument("--quant", nargs="+", choices=QUANTS, default=GPU_QUANTS if cuda else CPU_QUANTS,
                    help="the bitsandbytes bases: 4-bit nf4 / fp4 (-nested: double-quantized absmax) or int8 "
                         "(Linear8bitLt)")


COLUMNS = ([("quant", "base", "{}")] + harness.plain_columns("M", "K", "N", "r", "p", "mode") + harness.TIMING_COLUMNS
           + harness.VS_LINEAR_COLUMNS + harness.ERROR_COLUMNS)

BENCHMARK = harness.linear_benchmark(
    prog="fastpeft bench qlora", description=__doc__, extra_modes=("eval",), add_arguments=add_arguments, cases=cases,
    columns=COLUMNS,
    title="QLoRA (bitsandbytes bases), {dtype}, ratios to frozen nn.Linear in the same run",
    plot_title="QLoRA ({dtype})",
    no_gpu="No GPU here: the QLoRA kernels need one (not measured on GPU). Timing fastpeft's PyTorch path against "
           "nn.Linear, PEFT + bitsandbytes and dequantize + matmul + addmm_ on the CPU.")


def main(argv=None) -> list:
    return harness.main(BENCHMARK, argv)


if __name__ == "__main__":
    main()
