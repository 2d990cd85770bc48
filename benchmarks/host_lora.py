"""Host time of one ``lora_linear`` call at decode size, on the CPU: what the Python path costs before any
kernel runs (checks, backend dispatch, autocast, reshape, the autograd Function, the timed choices).

    python benchmarks/host_lora.py [--calls 10000]
    python benchmarks/host_lora.py --multi [--calls 2000]   # many adapters: BGMV vs grouped no-grad forward

``--multi`` times one decode call of a FastLoRALinear with 8 adapters of mixed ranks (``forward(x, adapter_ids)``
and the ``mixed_batch`` routing) and of ``lora_linear_multi``, with ``FASTPEFT_MULTI_PATH`` forcing the BGMV
path (base addmm + 1 kernel) or the grouped one (``group_rows``' ~30 small torch ops, 2 kernels), and counts
the torch ops each call runs (every one a launch on a GPU, beside the triton kernels). The grouping's ops run
for real on tiny CPU tensors: their CPU time stands in for their launch cost.

Runs under TRITON_INTERPRET=1 with the kernel launchers replaced by stubs that only allocate their outputs,
so the triton path's host work is timed without the interpreter; the reference path runs as it is (its
matmuls on tiny tensors cost little). Rows: the functional call at M = 1 and 16 rows, and ``FastLoRALinear``'s
forward (eval, no_grad, one adapter) on the triton backend, and on its default one here (the reference
backend's CPU path); then the same on the triton backend for QLoRA (``QLoRALinear`` over a bitsandbytes
``Linear4bit`` NF4 nested, bf16 compute and input, fp32 adapters; ``qlora_linear``) and DoRA
(``FastLoRALinear(use_dora=True)``; ``dora_linear``), their launchers (``kernels.quant``, ``kernels.dora``)
stubbed the same way; and the same for PEFT's own layers made to run them by ``fastpeft.accelerate``: a
``lora.bnb.Linear4bit`` (bf16 adapters) and a ``lora.Linear``, plain and with ``use_dora=True``. Prints µs per call (median of 5 rounds of ``--calls`` calls each), in
this process's CPU time (``time.process_time``: a machine shared with other jobs stretches wall time, not it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from harness import env_vars  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft._checks import check_lora_linear_args  # noqa: E402
from fastpeft.functional import resolve_backend  # noqa: E402
from fastpeft.kernels import lora as K  # noqa: E402


def _stub_launchers():
    """Launchers that allocate their outputs and launch nothing."""
    K.shrink_op = lambda a, b, *args, **kw: a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    K.gemm_op = lambda a, b, lu, lv, **kw: a.new_empty((a.shape[0], b.shape[1]))
    K.lowrank_add_op = lambda out, lu, lv, **kw: out
    from fastpeft.kernels import multi_lora as MK

    MK.shrink_op = lambda src, w, *a, **kw: src.new_empty((src.shape[0], w.shape[2]), dtype=torch.float32)
    MK.expand_op = lambda out, *a, **kw: out
    MK.bgmv_op = lambda out, *a, **kw: out  # absent before the BGMV kernel: then unused
    # QLoRA's Function calls the plain launchers (K.lora_shrink / K.lora_gemm), DoRA's the ops
    from fastpeft.kernels import dora as DK
    from fastpeft.kernels import quant as QK

    K.lora_shrink = lambda a, b, *args, **kw: a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    K.lora_gemm = lambda a, b, lu, lv, *args, **kw: a.new_empty((a.shape[0], b.shape[1]))
    QK.qlora_fused = lambda x, qw, a, b, *args, **kw: (x.new_empty((x.shape[0], qw.shape[0])),
                                                       x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32))
    QK.lora_decode = lambda x, w, a, b, *args, **kw: (x.new_empty((x.shape[0], w.shape[0])),
                                                      x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32))
    QK.dequantize_4bit = lambda qw, dtype, out=None: out.view(qw.shape)  # the caller's workspace, no kernel
    DK.norm_op = lambda w, a, b, s: w.new_empty(w.shape[0], dtype=torch.float32)
    DK.gemm_op = lambda mode, a, b, *args, **kw: a.new_empty((a.shape[0], b.shape[1]))


def count_torch_ops(fn) -> list:
    """Names of the torch ops one call of fn runs, less views and other metadata-only ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    metadata = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "as_strided", "detach",
                "alias", "slice", "select", "unsqueeze", "squeeze", "empty", "empty_strided", "lift_fresh",
                "_reshape_alias", "new_empty"}
    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in metadata:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return ops


def multi_rows(calls: int) -> None:
    """The ``--multi`` table: µs per decode call and torch ops per call, BGMV and grouped."""
    import contextlib

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny ops: OpenMP hand-offs would cost more than the ops (and vary with the load)
    m, k, n, ranks = 16, 64, 64, [8, 16, 32, 64] * 2  # 16 decode tokens, 8 adapters
    layer = fastpeft.FastLoRALinear(k, n, r=ranks[0], lora_alpha=16, init_lora_weights=False, adapter_name="a0")
    for i, r in enumerate(ranks[1:], 1):
        layer.add_adapter(f"a{i}", r, 2 * r, init_lora_weights=False)
    layer.eval().requires_grad_(False)
    x = torch.randn(m, 1, k)
    ids = torch.arange(m) % (len(ranks) + 1) - 1  # every adapter and some base rows
    stack_a, stack_b = layer.stacked()
    scalings, rank_t, _ = layer._adapter_meta(x.device)
    names = [None if i < 0 else f"a{i}" for i in ids.tolist()]
    _stub_launchers()

    def layer_call():
        with torch.no_grad():
            layer(x, adapter_ids=ids)

    def routed_call():
        with torch.no_grad():
            layer(x)

    def functional_call():
        with torch.no_grad():
            fastpeft.lora_linear_multi(x, layer.weight, layer.bias, stack_a, stack_b, scalings, ids, rank_t,
                                       training=False, check_ids=False)
    rows = {"FastLoRALinear(x, adapter_ids)": layer_call, "FastLoRALinear(x), mixed_batch routing": routed_call,
            "lora_linear_multi(check_ids=False)": functional_call}
    print(f"host µs per decode call, CPU time, stub kernels (torch {torch.__version__}, M={m} tokens, "
          f"{len(ranks)} adapters, {calls} calls x 5 rounds, median); torch ops per call (each a launch on a GPU)")
    for path in ("bgmv", "grouped"):
        os.environ["FASTPEFT_MULTI_PATH"] = path
        with fastpeft.use_backend("triton"):
            for name, fn in rows.items():
                routing = contextlib.nullcontext()
                if fn is routed_call:
                    layer.set_routing(names)
                    routing = contextlib.ExitStack()
                    routing.callback(layer.set_routing, None)
                with routing:
                    ops = count_torch_ops(fn)
                    us = per_call_us(fn, calls)
                print(f"  {path:<8} {name:<40} {us:8.2f} µs  {len(ops):3d} torch ops")
    os.environ.pop("FASTPEFT_MULTI_PATH")


def _qlora_layer(k: int, n: int, r: int):
    """A QLoRALinear over a bnb Linear4bit NF4 nested (bf16 compute, as a bf16 model's), fp32 adapters, eval; as
    tests/test_qlora.py builds it. None where bitsandbytes does not import."""
    base = _nf4_base(k, n)
    if base is None:
        return None
    return fastpeft.FastLoRALinear.from_linear(base, r=r, init_lora_weights=False).eval()


def _nf4_base(k: int, n: int, bias_dtype=torch.float32):
    """A bnb Linear4bit NF4 nested (blocksize 64, bf16 compute dtype) on the CPU; None without bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - any import failure: no QLoRA rows
        return None
    lin = torch.nn.Linear(k, n)
    base = bnb.nn.Linear4bit(k, n, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                    quant_type="nf4", blocksize=64, module=base)
    base.bias = torch.nn.Parameter(lin.bias.data.to(bias_dtype), requires_grad=False)
    return base.to("cpu")


def quant_dora_rows(k: int, n: int, r: int, xs: dict, no_grad) -> dict:
    """QLoRA (NF4 nested, bf16 x) and DoRA (fp32) rows: the layers' eval forward in a triton block and the
    functional calls, no_grad."""
    from fastpeft.quant import QuantizedWeight

    rows = {}
    q = _qlora_layer(k, n, r)
    if q is not None:
        qxs = {m: xm.bfloat16() for m, xm in xs.items()}
        a, b, qb = q.lora_A, q.lora_B, q.bias  # read once: the functional rows time the call alone
        for m, xm in qxs.items():
            rows[f"QLoRALinear eval triton, no_grad, M={m}"] = ("triton", no_grad(lambda xm=xm: q(xm)))
        for m, xm in qxs.items():
            rows[f"qlora_linear triton, stub kernels, no_grad, M={m}"] = no_grad(
                lambda xm=xm, qw=QuantizedWeight.from_module(q.base_layer): fastpeft.functional.qlora_linear(
                    xm, qw, qb, a, b, 2.0, backend="triton"))
    d = fastpeft.FastLoRALinear(k, n, r=r, init_lora_weights=False, use_dora=True).eval()
    for m, xm in xs.items():
        rows[f"FastLoRALinear(use_dora) eval triton, no_grad, M={m}"] = ("triton", no_grad(lambda xm=xm: d(xm)))
    dargs = (d.weight, d.bias, d.lora_A, d.lora_B, d.lora_magnitude_vector["default"])
    for m, xm in xs.items():
        rows[f"dora_linear triton, stub kernels, no_grad, M={m}"] = no_grad(
            lambda xm=xm: fastpeft.functional.dora_linear(xm, *dargs, 2.0, training=False, backend="triton"))
    rows.update(peft_rows(k, n, r, xs, no_grad))
    return rows


def peft_rows(k: int, n: int, r: int, xs: dict, no_grad) -> dict:
    """``fastpeft.accelerate``'d PEFT layers: a ``lora.bnb.Linear4bit`` (NF4 nested, bf16 compute, bf16 adapters
    and input: the dtypes its accelerated path takes; train mode, dropout 0, as eval on the CPU is bnb's own
    repacking kernel) and a ``lora.Linear``, without and with ``use_dora=True`` (fp32, eval). Empty where peft does
    not import."""
    try:
        import peft
    except Exception:  # noqa: BLE001 - any import failure: no PEFT rows
        return {}
    rows = {}
    base = _nf4_base(k, n, torch.bfloat16)
    if base is not None:
        class Toy(torch.nn.Module):
            is_loaded_in_4bit = True  # PEFT dispatches its bnb LoRA layers on this

            def __init__(self, base):
                super().__init__()
                self.lin = base

            def forward(self, x):
                return self.lin(x)
        model = peft.get_peft_model(Toy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"],
                                                                        init_lora_weights=False))
        layer = model.base_model.model.lin
        for f in (layer.lora_A["default"], layer.lora_B["default"]):
            f.to(torch.bfloat16)
        fastpeft.accelerate(model, strict=True)
        layer.train()
        for m, xm in xs.items():
            rows[f"accelerated PEFT lora.bnb.Linear4bit triton, no_grad, M={m}"] = (
                "triton", no_grad(lambda xm=xm.bfloat16(), layer=layer: layer(xm)), layer)
    for dora in (False, True):
        torch.manual_seed(0)
        model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, n)), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=dora, init_lora_weights=False)).eval()
        fastpeft.accelerate(model, strict=True)
        layer = model.base_model.model[0]
        for m, xm in xs.items():
            rows[f"accelerated PEFT lora.Linear{'(use_dora)' if dora else ''} triton, no_grad, M={m}"] = (
                "triton", no_grad(lambda xm=xm, layer=layer: layer(xm)), layer)
    return rows


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        rounds.append((time.process_time() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=None, help="calls per round (default 10000, 2000 with --multi)")
    ap.add_argument("--multi", action="store_true", help="many adapters: the BGMV and grouped no-grad forwards")
    args = ap.parse_args(argv)
    if args.multi:
        return multi_rows(args.calls or 2000)
    args.calls = args.calls or 10000
    torch.manual_seed(0)
    k, n, r = 64, 64, 8  # sizes do not matter to the host path; M = 1 (one decode token) and 16
    w, b = torch.randn(n, k), torch.randn(n)
    a, bb = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    layer = fastpeft.FastLoRALinear(k, n, r=r, init_lora_weights=False).eval()
    _stub_launchers()
    xs = {m: torch.randn(m, k) for m in (1, 16)}
    x = xs[1]

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    rows = {
        "checks (check_lora_linear_args)": lambda: check_lora_linear_args(x, w, b, a, bb, 2.0, 0.0),
        "dispatch (resolve_backend)": lambda: resolve_backend("lora_linear", "triton", x, w, a, bb),
    }
    for m, xm in xs.items():
        rows[f"lora_linear triton, stub kernels, no_grad, M={m}"] = no_grad(
            lambda xm=xm: fastpeft.lora_linear(xm, w, b, a, bb, 2.0, backend="triton"))
    envs = {}  # row -> environment variables set around its calls
    for m, xm in xs.items():  # the one-launch forward (FASTPEFT_LORA_GEMM=decode) instead of shrink + GEMM
        name = f"lora_linear triton, stub kernels, no_grad, M={m}, decode kernel"
        rows[name] = no_grad(lambda xm=xm: fastpeft.lora_linear(xm, w, b, a, bb, 2.0, backend="triton"))
        envs[name] = {"FASTPEFT_LORA_GEMM": "decode"}
    for m, xm in xs.items():  # the layer's backend is "auto" (reference on CPU tensors): a use_backend block
        rows[f"FastLoRALinear eval triton, no_grad, M={m}"] = ("triton", no_grad(lambda xm=xm: layer(xm)))
    rows["lora_linear triton, stub kernels, grad, M=1"] = lambda: fastpeft.lora_linear(x, w, b, a, bb, 2.0,
                                                                                        backend="triton")
    rows["lora_linear reference, no_grad, M=1"] = no_grad(
        lambda: fastpeft.lora_linear(x, w, b, a, bb, 2.0, backend="reference"))
    rows["FastLoRALinear eval auto (CPU path), no_grad, M=1"] = no_grad(lambda: layer(x))
    rows.update(quant_dora_rows(k, n, r, xs, no_grad))
    print(f"host µs per call, CPU time (torch {torch.__version__}, {args.calls} calls x 5 rounds, median)")
    for name, fn in rows.items():
        block = contextlib.nullcontext()
        accelerated = None
        if isinstance(fn, tuple):  # (backend, fn[, accelerated layer]): the block is entered once, outside the calls
            block, fn, accelerated = fastpeft.use_backend(fn[0]), fn[1], (fn[2] if len(fn) > 2 else None)
        with block, env_vars(envs.get(name, {})):
            us = per_call_us(fn, args.calls)
        if accelerated is not None:  # an accelerated PEFT layer: every timed call ran on fastpeft's ops
            assert set(accelerated._fastpeft_calls) == {"fastpeft"}, dict(accelerated._fastpeft_calls)
        print(f"  {name:<64} {us:8.2f}")


if __name__ == "__main__":
    main()
