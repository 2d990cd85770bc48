"""One timing harness for every fastpeft benchmark.

CUDA: ``triton.testing.do_bench`` (warm-up, then the median and 20/80% quantiles of CUDA-event timings,
with the L2 cache flushed between runs) and peak memory from ``torch.cuda.max_memory_allocated``.
CPU: the same statistics from ``time.perf_counter`` over repeated calls after warm-up.
Inputs are fresh random tensors (never zeros). Ratios are only ever taken within one run.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float | None = None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "date": time.strftime("%Y-%m-%d")}


def bench(fn, device: str, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median and 20/80% quantiles of ``fn()`` in milliseconds (and CUDA peak memory)."""
    if device == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, peak)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    for _ in range(max(1, int(warmup_ms / 1e3 / once))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / 1e3 / once))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return Timing(statistics.median(times), q[1], q[7])


def parse_kxn(s: str) -> tuple:
    """``"4096x11008"`` -> (4096, 11008): a (K, N) = (in, out) pair on the command line."""
    k, n = s.lower().split("x")
    return int(k), int(n)


def to_markdown(text: str, rows: list, columns: list) -> str:
    """The table ``print_table`` printed (its title and environment line) as markdown."""
    head, _, _ = text.partition("\n\n")
    lines = ["# " + head.splitlines()[0], "", head.splitlines()[1], "",
             "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns)
                     + " |")
    return "\n".join(lines) + "\n"


def print_table(title: str, env: dict, rows: list, columns: list) -> str:
    """Rows are dicts; ``columns`` are (key, header, format). Returns the text it printed."""
    head = f"{title}\n{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}"
    cells = [[h for _, h, _ in columns]] + [[fmt.format(r[k]) if r.get(k) is not None else "-"
                                               for k, _, fmt in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [head, ""] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(3, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str, env: dict, rows: list) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [r if isinstance(r, dict) else asdict(r) for r in rows]}, f, indent=2)


def plot_ratios(rows: list, path: str, title: str, baseline: str = "linear") -> None:
    """One bar group per case, one bar per provider: median time / the baseline's (lower is better).
    Rows carry M, K, N, r, p, mode, provider and vs_linear (the ratio to the baseline)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    cases = []
    for r in rows:
        key = (r["M"], r["K"], r["N"], r["r"], r["p"], r["mode"])
        if key not in cases:
            cases.append(key)
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != baseline]
    width = 0.8 / max(1, len(provs))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases) * max(1, len(provs)) / 2), 5))
    for i, prov in enumerate(provs):
        vals = []
        for c in cases:
            hit = [r["vs_linear"] for r in rows if r["provider"] == prov and
                   (r["M"], r["K"], r["N"], r["r"], r["p"], r["mode"]) == c]
            vals.append(hit[0] if hit else float("nan"))
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=prov)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"M{m} {k}x{n}\nr{r} p{p} {mode}" for m, k, n, r, p, mode in cases], fontsize=7, rotation=60)
    ax.set_ylabel(f"time / {baseline} (same run)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_output_args(ap, plot_help: str = "bar chart of the ratios to the baseline") -> None:
    """The options every benchmark script shares: timing budget and where the table goes."""
    ap.add_argument("--warmup-ms", type=float, default=25)
    ap.add_argument("--rep-ms", type=float, default=100)
    ap.add_argument("--json", metavar="FILE", help="write the rows and the environment as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    ap.add_argument("--plot", metavar="PNG", help=plot_help)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def report(args, env: dict, rows: list, columns: list, title: str, plot_title: str, baseline: str = "linear") -> list:
    """Print the table and write what ``add_output_args``' options ask for; returns the rows."""
    text = print_table(title, env, rows, columns)
    if args.json:
        write_json(args.json, env, rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(text, rows, columns))
    if args.plot:
        plot_ratios(rows, args.plot, f"{plot_title} on {env['device']}", baseline=baseline)
    return rows
