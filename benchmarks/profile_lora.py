"""Per-kernel profile of one LoRA layer's forward + backward, read against the roofline, and the decode table
eager and under CUDA graphs.

1. Steps: each kernel launch of LoRALinearFunction (shrink, fused GEMM, dY B, dB, dA, dX; the dY pass
   giving dY B and dB from one read of dY, the backward's "kernels-dy1") and its cuBLAS alternatives, plus
   nn.Linear's own GEMMs and the TMA GEMM (kernels/lora_tma.py) where the card has TMA, alone, with the
   shrink fused (the forward's "tma-shrink" path) and with the dY pass fused (the backward's "tma-dy").
   Last (4.), the other TMA kernels beside their alternatives: many adapters at prefill (64 of ranks 8-64, one
   per 512-token sequence) grouped vs one fused kernel, and a sparse delta (1 % of 32 x 32 blocks) forward
   and dX on densify + cuBLAS, the block-fused pointer GEMM and the TMA GEMM.
   For each: the kernels ``torch.profiler`` sees on the device (names, µs per call), the
   ``triton.testing.do_bench`` median, the bytes / flops of ``benchmarks/roofline.py``, the achieved TB/s
   and TFLOP/s and the % of the card's peak of the resource that bounds it.
2. Layer: every device kernel of ``FastLoRALinear`` forward + backward on the default backend, from
   ``torch.profiler`` (what actually runs, in order of time).
3. Decode (M = 1, 16, 64): the layer's forward vs frozen nn.Linear, eager and replayed as a CUDA graph, on
   the timed choice, the kernel path and the one-launch decode kernel (``FASTPEFT_LORA_GEMM``); then the same
   with 8 adapters of ranks 8-64, one per token (``mixed_batch`` routing), on the BGMV and the grouped path of
   the no-grad forward (``FASTPEFT_MULTI_PATH``).

    python benchmarks/profile_lora.py --out $OUT                    # M=8192, K=N=4096, r=16, p 0 and 0.1
    TRITON_INTERPRET=1 python benchmarks/profile_lora.py --smoke    # CPU dry run, tiny shapes

``--smoke`` runs on CPU tensors under the interpreter: times are not meaningful; what needs CUDA (the
device kernel tables, CUDA graphs, % of peak) is skipped with a printed line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import roofline as RF  # noqa: E402
from harness import env_vars  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import kernels  # noqa: E402
from fastpeft.reference import dropout_threshold  # noqa: E402


def skip(what: str):
    print(f"SKIPPED (needs CUDA): {what}", flush=True)


def card_key(name: str):
    """The roofline's card for a device name, or None (no peak known: no % of peak)."""
    for key in ("H200", "H100"):
        if key in name:
            return "H200" if key == "H200" else "H100-SXM"
    return None


def time_us(fn, cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # do_bench's default is the mean
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def device_kernels(fn, calls: int = 5) -> list:
    """[(kernel name, µs per call)] of the device kernels ``fn`` launches, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t and e.key and not e.key.startswith("ProfilerStep"):
            out.append((e.key, t / calls))
    return sorted(out, key=lambda kv: -kv[1])


def steps(M, K, N, r, p, dtype, device):
    """name -> (callable, roofline Cost or None). The launches of LoRALinearFunction, their cuBLAS
    alternatives, nn.Linear's GEMMs and the TMA GEMM."""
    from fastpeft.kernels import lora as KL

    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, w, bias, a, b, dy = rnd(M, K), rnd(N, K) / K ** 0.5, rnd(N), rnd(r, K) / K ** 0.5, rnd(N, r), rnd(M, N)
    s, seed = 2.0, 1234
    thr = dropout_threshold(p) if p else 0
    ds = 1.0 / (1.0 - p)
    u = KL.lora_shrink(a=x, b=a.t(), scale=ds, seed=seed, threshold=thr, mask_sp=K, mask_sq=1)
    v = KL.lora_shrink(a=dy, b=b, scale=1.0, seed=0, threshold=0, mask_sp=0, mask_sq=0)
    lin, lo = RF.linear_costs(M, K, N), RF.lora_costs(M, K, N, r)
    costs = {c.name: c for c in lin["fwd"] + lin["bwd"] + lo["fwd"] + lo["bwd"]}
    one = RF.lora_costs(M, K, N, r, fused_dy_pass=True)["bwd"][:2]  # the dY pass and its partial sums: one step
    costs["dY pass"] = RF.Cost("dY pass", one[0].what, one[0].flops + one[1].flops, one[0].bytes + one[1].bytes)
    add = RF.lowrank_add_cost(M, K, r)

    no_mask = dict(seed=0, threshold=0, mask_sp=0, mask_sq=0)
    masked = dict(seed=seed, threshold=thr)

    def cublas_dx():
        out = dy @ w
        if thr:
            return KL.lora_lowrank_add_(out=out, lu=v, lv=a, scale=s * ds, **masked)
        return out.addmm_(v.to(dtype), a, alpha=s * ds)

    out = {
        "linear fwd (cuBLAS)": (lambda: torch.nn.functional.linear(x, w, bias), costs["linear fwd"]),
        "linear dX (cuBLAS)": (lambda: dy @ w, costs["linear dX"]),
        f"shrink u = drop(x) A^T (p={p})": (
            lambda: KL.lora_shrink(a=x, b=a.t(), scale=ds, mask_sp=K, mask_sq=1, **masked), costs["shrink"]),
        "fused GEMM fwd": (lambda: KL.lora_gemm(a=x, b=w.t(), lu=u, lv=b.t(), bias=bias, scale=s, seed=0, threshold=0),
                           costs["fused GEMM"]),
        "cuBLAS fwd + addmm_": (lambda: torch.addmm(bias, x, w.t()).addmm_(u.to(dtype), b.t(), alpha=s), None),
        "shrink v = dY B": (lambda: KL.lora_shrink(a=dy, b=b, scale=1.0, **no_mask), costs["dY B"]),
        "shrink dB = s dY^T u": (lambda: KL.lora_shrink(a=dy.t(), b=u, scale=s, **no_mask), costs["dB"]),
        "dY pass v = dY B, dB = s dY^T u (one read of dY)": (lambda: KL.lora_dy_pass(dy=dy, b=b, u=u, scale=s),
                                                            costs["dY pass"]),
        f"shrink dA = s v^T drop(x) (p={p})": (
            lambda: KL.lora_shrink(a=x.t(), b=v, scale=s * ds, mask_sp=1, mask_sq=K, **masked), costs["dA"]),
        f"fused GEMM dX (p={p})": (
            lambda: KL.lora_gemm(a=dy, b=w, lu=v, lv=a, bias=None, scale=s * ds, **masked), costs["dX fused"]),
        f"cuBLAS dX + low-rank update (p={p})": (cublas_dx, None),
    }
    if thr:
        base = dy @ w
        out[f"low-rank add alone (p={p})"] = (
            lambda: KL.lora_lowrank_add_(out=base, lu=v, lv=a, scale=s * ds, **masked), add)
    try:
        from fastpeft.kernels import lora_tma as T
    except ImportError:
        T = None
    if T is not None and T.tma_supported(device) and T.tma_shapes_ok(a=x, b=w.t()):
        out["TMA GEMM fwd"] = (lambda: T.lora_gemm_tma(a=x, b=w.t(), lu=u, lv=b.t(), bias=bias, scale=s),
                               costs["fused GEMM"])
        out[f"TMA GEMM dX (p={p})"] = (lambda: T.lora_gemm_tma(a=dy, b=w, lu=v, lv=a, scale=s * ds, seed=seed,
                                                               threshold=thr), costs["dX fused"])
        if T.shrink_fits(r):
            fused = RF.lora_costs(M, K, N, r, fused_shrink=True)["fwd"][0]
            out[f"TMA GEMM fwd + fused shrink, u and y in one kernel (p={p})"] = (
                lambda: T.lora_forward_tma(x=x, w_t=w.t(), lora_A=a, lv=b.t(), bias=bias, scale=s, drop_scale=ds,
                                           seed=seed, threshold=thr), fused)
        if T.dy_pass_fits(r, thr > 0):
            fdx = RF.lora_costs(M, K, N, r, fused_dx=True)["bwd"]
            both = RF.Cost("dX + dY pass", fdx[0].what, fdx[0].flops + fdx[1].flops, fdx[0].bytes + fdx[1].bytes)
            out[f"TMA dX + dY pass, dX / v / dB in one kernel (p={p})"] = (
                lambda: T.lora_backward_tma(dy=dy, w=w, lora_A=a, lora_B=b, u=u, scale=s * ds, seed=seed,
                                            threshold=thr), both)
        z = u[:, :0]
        out["TMA GEMM, rank 0 (vs linear fwd: the >= 0.95x gate)"] = (
            lambda: T.lora_gemm_tma(a=x, b=w.t(), lu=z, lv=b.t()[:0], scale=s), costs["linear fwd"])
    elif T is not None:
        print("SKIPPED: TMA GEMM rows (needs sm_90+ and tl.make_tensor_descriptor)", flush=True)
    return out


def step_table(M, K, N, r, ps, dtype, device, card) -> tuple:
    cuda = device == "cuda"
    lines = [f"### Steps, M={M}, K={K}, N={N}, r={r}", "",
             "| p | step | device kernels (torch.profiler, µs per call) | do_bench µs | model MB | model GFLOP "
             "| TB/s | TFLOP/s | % of peak (bound) | roofline µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    if not cuda:
        skip("torch.profiler device-kernel names per step and % of peak (CPU run: times are interpreter times)")
    for p in ps:
        for name, (fn, cost) in steps(M, K, N, r, p, dtype, device).items():
            _measured(lines, rows, p, name, fn, cost, cuda, card)
    return lines, rows


def _measured(lines: list, rows: list, p, name: str, fn, cost, cuda: bool, card) -> None:
    """Time ``fn`` (do_bench median after a first call that autotunes / compiles), list its device kernels, and
    append its table line (read against the roofline ``cost``, None: no model) and JSON row; a failing step is a
    result too: its error is recorded and the table goes on."""
    peak = RF.CARDS.get(card) if card else None
    try:
        fn()
        us = time_us(fn, cuda)
        kern = device_kernels(fn) if cuda else []
    except Exception as exc:
        lines.append(f"| {p} | {name} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | | | | |")
        rows.append(dict(p=p, step=name, error=str(exc)))
        return
    ktxt = "; ".join(f"{k[:60]} {t:.1f}" for k, t in kern[:4]) or "-"
    mb = f"{cost.bytes / 1e6:.1f}" if cost else "-"
    gf = f"{cost.flops / 1e9:.2f}" if cost else "-"
    tbs = f"{cost.bytes / us / 1e6:.2f}" if cost else "-"
    tfs = f"{cost.flops / us / 1e6:.1f}" if cost else "-"
    if cost and peak:
        bound = cost.bound(card)
        frac = (cost.flops / (us * 1e-6) / peak["flops"] if bound == "compute"
                else cost.bytes / (us * 1e-6) / peak["bandwidth"])
        pct, roof = f"{100 * frac:.0f}% ({bound})", f"{cost.seconds(card) * 1e6:.1f}"
    else:
        pct, roof = "-", "-"
    lines.append(f"| {p} | {name} | {ktxt} | {us:.1f} | {mb} | {gf} | {tbs} | {tfs} | {pct} | {roof} |")
    rows.append(dict(p=p, step=name, us=us, kernels=kern, bytes=cost.bytes if cost else None,
                     flops=cost.flops if cost else None))
    print(lines[-1], flush=True)


def tma_table(M, K, N, dtype, device, card, adapters: int = 64, seq: int = 512, block: int = 32) -> tuple:
    """The other TMA kernels beside their alternatives, read against the roofline: many adapters at prefill
    (``adapters`` of ranks 8 / 16 / 32 / 64 cycling, one per sequence of ``seq`` rows: bench multi's setup) on
    the grouped kernels and on the one fused kernel; a sparse delta (1 % of ``block`` x ``block`` blocks)
    forward and dX on densify + cuBLAS, the block-fused pointer GEMM and the TMA GEMM."""
    from fastpeft.kernels import lora_tma as T
    from fastpeft.kernels import sparse_delta as SD
    from fastpeft.ops import multi as OM
    from fastpeft.ops.sparse import build_sparse_plan

    cuda = device == "cuda"
    lines = ["", f"### Other TMA kernels, M={M}, K={K}, N={N} (the first column: what the row varies)", "",
             "| case | step | device kernels (torch.profiler, µs per call) | do_bench µs | model MB | model GFLOP "
             "| TB/s | TFLOP/s | % of peak (bound) | roofline µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    if not T.tma_supported(device):
        print("SKIPPED: other TMA kernels (needs sm_90+ and tl.make_tensor_descriptor)", flush=True)
        return [], []
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, w, bias = rnd(M, K), rnd(N, K) / K ** 0.5, rnd(N)
    ranks = [(8, 16, 32, 64)[i % 4] for i in range(adapters)]
    r_max = max(ranks)
    a, b = rnd(adapters, r_max, K) / K ** 0.5, rnd(adapters, N, r_max)
    s = torch.full((adapters,), 2.0, device=device)
    rk = torch.tensor(ranks, device=device)
    ids = (torch.arange(M, device=device) // seq) % adapters
    args = (x, w, bias, a, b, s, ids, rk, None, 0)
    rank_sum = RF.expected_rank_sum(M, adapters, [8, 16, 32, 64], "prefill")
    lin = RF.linear_costs(M, K, N)["fwd"]
    grouped = RF.multi_costs(M, K, N, rank_sum, r_max, "prefill")
    grouped_cost = RF.Cost("grouped", "base GEMM + grouped shrink + expand", sum(c.flops for c in lin + grouped),
                           sum(c.bytes for c in lin + grouped))
    case = f"{adapters} adapters, seq {seq}"
    _measured(lines, rows, case, "many adapters: grouping, shrink, cuBLAS, expand",
              lambda: OM._grouped_forward(*args)[0], grouped_cost, cuda, card)
    if T.shrink_fits(r_max):
        _measured(lines, rows, case, "many adapters: one TMA kernel (multi_forward_tma)",
                  lambda: OM._fused_forward(*args), RF.multi_fused_cost(M, K, N, rank_sum, r_max), cuda, card)
    rb, cb = -(-N // block), -(-K // block)
    nblocks = max(1, round(0.01 * rb * cb))
    flat = torch.randperm(rb * cb, generator=g)[:nblocks].sort().values
    idx = torch.stack([flat // cb, flat % cb], 1).to(device=device, dtype=torch.int32)
    vals = torch.randn(nblocks, block, block, generator=g).to(device, dtype) * 0.01
    plan = build_sparse_plan(idx, N, K, block)
    dy = rnd(M, N)
    ideal = RF.sparse_costs(M, K, N, 0.01, block)
    tma = RF.sparse_costs(M, K, N, 0.01, block, tma_block_n=128)
    case = f"1 % of {block}x{block} blocks"
    for way, a_, trans, c_ideal, c_tma in (("fwd", x, True, ideal["fwd"][0], tma["fwd"][0]),
                                          ("dX", dy, False, ideal["bwd"][1], tma["bwd"][1])):
        def dense(a_=a_, trans=trans):
            w2 = SD.sparse_densify(w, idx, vals, block, dtype)
            return a_ @ (w2.t() if trans else w2)
        _measured(lines, rows, case, f"sparse {way}: densify + cuBLAS", dense, None, cuda, card)
        if plan.block_map is not None:
            _measured(lines, rows, case, f"sparse {way}: block-fused pointer GEMM",
                      lambda a_=a_, trans=trans: SD.sparse_block_gemm(a_, w, plan.block_map, vals, None, None, None,
                                                                      block, trans), c_ideal, cuda, card)
        if plan.csr_rows is not None and T.tma_shapes_ok(a=a_, b=w.t() if trans else w):
            csr = plan.csr_rows if trans else plan.csr_cols
            _measured(lines, rows, case, f"sparse {way}: TMA GEMM + block MMAs",
                      lambda a_=a_, trans=trans, csr=csr: SD.sparse_block_gemm_tma(a_, w, csr, vals, None, None, None,
                                                                                  block, trans), c_tma, cuda, card)
    return lines, rows


def layer_table(M, K, N, r, ps, dtype, device, backend) -> tuple:
    lines, rows = [], []
    if device != "cuda":
        skip("layer fwd+bwd device-kernel table (torch.profiler CUDA activity)")
        return lines, rows
    for p in ps:
        torch.manual_seed(0)
        layer = fastpeft.FastLoRALinear(K, N, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False,
                                        device=device, dtype=dtype)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)

        def step():
            with fastpeft.use_backend(backend):
                y = layer(x)
            y.backward(dy)

        kern = device_kernels(step)
        total = sum(t for _, t in kern)
        lines += ["", f"### Layer forward + backward, every device kernel (backend {backend}, p={p}, "
                  f"M={M}, K={K}, N={N}, r={r}): {total:.1f} µs in all", "", "| kernel | µs per step | share |",
                  "|---|---|---|"]
        lines += [f"| {k[:100]} | {t:.1f} | {100 * t / total:.0f}% |" for k, t in kern]
        rows.append(dict(p=p, kernels=kern, total_us=total))
    return lines, rows


def decode_table(tokens, K, N, r, dtype, device, backend) -> tuple:
    """The layer's no-grad forward at decode sizes vs frozen nn.Linear, eager and as a CUDA graph, on each LoRA
    forward path (FASTPEFT_LORA_GEMM): ``auto`` (the timed choice), ``fused`` (the kernel path: shrink, partial
    sum, epilogue GEMM) and ``decode`` (kernels.quant.lora_decode: one launch)."""
    cuda = device == "cuda"
    lines = ["", f"### Decode: forward of one layer (K={K}, N={N}, r={r}, p=0, backend {backend}) vs frozen "
             "nn.Linear; path: FASTPEFT_LORA_GEMM (auto: the timed choice; fused: shrink + sum + epilogue GEMM; "
             "decode: one launch)", "", "| M | path | linear eager µs | LoRA eager µs | eager x | linear graph µs | "
             "LoRA graph µs | graph x |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    if not cuda:
        skip("CUDA-graph columns of the decode table")
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, init_lora_weights=False)
    layer.requires_grad_(False)
    for m in tokens:
        x = torch.randn(m, K, device=device, dtype=dtype)

        def lora():
            with fastpeft.use_backend(backend):
                return layer(x)

        def plain():
            return lin(x)
        for path in ("auto", "fused", "decode"):
            with env_vars({"FASTPEFT_LORA_GEMM": path}):
                (le, pe), graph, note = _eager_and_graph([plain, lora], cuda)
            lg, pg = graph if graph is not None else (None, None)
            gtxt = (f"{lg:.1f} | {pg:.1f} | {pg / lg:.2f}" if lg else f"- | - | {note or 'skipped (CPU)'}")
            lines.append(f"| {m} | {path} | {le:.1f} | {pe:.1f} | {pe / le:.2f} | {gtxt} |")
            rows.append(dict(M=m, path=path, linear_eager_us=le, lora_eager_us=pe, linear_graph_us=lg,
                             lora_graph_us=pg, note=note))
            print(lines[-1], flush=True)
    return lines, rows


def _eager_and_graph(fns: list, cuda: bool) -> tuple:
    """([eager µs of each fn], [graph-replay µs of each] or None, note): each fn captured alone in a CUDA graph."""
    eager = [time_us(f, cuda) for f in fns]
    if not cuda:
        return eager, None, ""
    try:
        graphs = []
        for f in fns:
            f()
            torch.cuda.synchronize()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                f()
            graphs.append(gr)
        return eager, [time_us(g.replay, True) for g in graphs], ""
    except Exception as exc:  # not capturable is a finding: record it
        return eager, None, f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def multi_decode_table(tokens, K, N, dtype, device, backend, adapters: int = 8) -> tuple:
    """Decode with many adapters: a FastLoRALinear with ``adapters`` adapters (ranks 8, 16, 32, 64 in turn), each
    token its own (one sequence per token, routed as ``mixed_batch`` does, a few on the base), no grad; the BGMV
    and the grouped no-grad forward forced in turn, eager and replayed as a CUDA graph, vs frozen nn.Linear."""
    cuda = device == "cuda"
    lines = ["", f"### Decode, {adapters} adapters (ranks 8-64, one per token, K={K}, N={N}, backend {backend}) "
             "vs frozen nn.Linear: BGMV (base GEMM + 1 kernel) and grouped (grouping + 2 kernels)", "",
             "| M | path | linear eager µs | multi eager µs | eager x | linear graph µs | multi graph µs | graph x |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    if not cuda:
        skip("CUDA-graph columns of the many-adapter decode table")
    torch.manual_seed(0)
    ranks = [(8, 16, 32, 64)[i % 4] for i in range(adapters)]
    lin = torch.nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    layer = fastpeft.FastLoRALinear.from_linear(lin, r=ranks[0], lora_alpha=2 * ranks[0], init_lora_weights=False,
                                                adapter_name="a0")
    for i, r in enumerate(ranks[1:], 1):
        layer.add_adapter(f"a{i}", r, 2 * r, init_lora_weights=False)
    layer.eval().requires_grad_(False)
    try:
        for m in tokens:
            x = torch.randn(m, 1, K, device=device, dtype=dtype)
            g = torch.Generator().manual_seed(m)
            ids = torch.randint(-1, adapters, (m,), generator=g).tolist()
            layer.set_routing([None if i < 0 else f"a{i}" for i in ids])

            def multi():
                with torch.no_grad(), fastpeft.use_backend(backend):
                    return layer(x)

            def plain():
                return lin(x)
            for path in ("bgmv", "grouped"):
                with env_vars({"FASTPEFT_MULTI_PATH": path}):
                    (le, pe), graph, note = _eager_and_graph([plain, multi], cuda)
                lg, pg = graph if graph else (None, None)
                gtxt = (f"{lg:.1f} | {pg:.1f} | {pg / lg:.2f}" if lg else f"- | - | {note or 'skipped (CPU)'}")
                lines.append(f"| {m} | {path} | {le:.1f} | {pe:.1f} | {pe / le:.2f} | {gtxt} |")
                rows.append(dict(M=m, path=path, adapters=adapters, linear_eager_us=le, multi_eager_us=pe,
                                 linear_graph_us=lg, multi_graph_us=pg, note=note))
                print(lines[-1], flush=True)
    finally:
        layer.set_routing(None)
    return lines, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    ap.add_argument("--decode", nargs="*", type=int, default=[1, 16, 64])
    ap.add_argument("--backend", default="auto", help="backend of the layer and decode tables")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--out", default=".", help="folder for profile_lora.md / .json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not kernels.INTERPRET
    if a.smoke:
        if not kernels.INTERPRET:
            raise SystemExit("--smoke runs the kernels on the CPU: set TRITON_INTERPRET=1")
        a.tokens, a.k, a.n, a.decode, a.backend = 48, 64, 80, [1, 16], "triton"
        device, dtype = "cpu", torch.float32
    elif not cuda:
        raise SystemExit("profile_lora.py needs a CUDA device (or --smoke under TRITON_INTERPRET=1)")
    else:
        device, dtype = "cuda", torch.bfloat16
    import triton
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    card = card_key(name)
    head = [f"# LoRA per-kernel profile: {name} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{time.strftime('%Y-%m-%d')}", "",
            f"`python benchmarks/profile_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            + (" (smoke: CPU interpreter, times not meaningful)" if a.smoke else ""), "",
            "Bytes / flops from benchmarks/roofline.py (each operand once); % of peak is of the resource that "
            f"bounds the step on {card or 'this card (no peak known)'}.", ""]
    os.makedirs(a.out, exist_ok=True)
    md, js = [], dict(device=name, torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))

    def write(key, lines, rows):
        """Add one table and rewrite both files: a step cut by its timeout keeps the tables done before."""
        md.extend(lines)
        js[key] = rows
        with open(os.path.join(a.out, "profile_lora.md"), "w") as f:
            f.write("\n".join(head + md) + "\n")
        with open(os.path.join(a.out, "profile_lora.json"), "w") as f:
            json.dump(js, f, indent=1, default=str)
    steps_lines, steps_rows = step_table(a.tokens, a.k, a.n, a.rank, a.dropout, dtype, device, card)
    write("steps", steps_lines, steps_rows)
    write("layer", *layer_table(a.tokens, a.k, a.n, a.rank, a.dropout, dtype, device, a.backend))
    write("decode", *decode_table(a.decode, a.k, a.n, a.rank, dtype, device, a.backend))
    write("decode_multi", *multi_decode_table(a.decode, a.k, a.n, dtype, device, a.backend))
    # last: its autotuning (the pointer and TMA sparse GEMMs, the many-adapter kernel) may meet the step's timeout,
    # and every table above is written by then
    tma_lines, tma_rows = tma_table(a.tokens, a.k, a.n, dtype, device, card,
                                    **(dict(adapters=4, seq=16, block=16) if a.smoke else {}))
    write("tma", tma_lines, tma_rows)
    errors = [r for r in steps_rows + tma_rows if "error" in r]
    print(f"wrote {os.path.join(a.out, 'profile_lora.md')}; {len(errors)} step(s) failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
