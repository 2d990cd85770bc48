"""One timing harness and one runner for every fastpeft benchmark.

Timing: on CUDA ``triton.testing.do_bench`` (warm-up, then the median and 20/80% quantiles of CUDA-event
timings, with the L2 cache flushed between runs) and peak memory from ``torch.cuda.max_memory_allocated``;
on the CPU the same statistics from ``time.perf_counter`` over single calls after warm-up, the providers of
a group taking turns (``bench_interleaved``: a shared CPU's drift, another tenant's load or the allocator's
state, falls on every provider alike, not on whichever ran during it). Inputs are fresh random tensors (never
zeros). Ratios are only ever taken within one run.

The runner: a bench script describes itself as a ``Benchmark`` (its options, its ``Case`` list, its table
columns) and calls ``main(benchmark, argv)``, which parses the options (the script's, then ``--dtype``,
``--modes`` where it has modes, and the output options), prints the header, times every case and prints /
writes / plots the table. A case builds its inputs once and yields ``Group``s: providers timed side by
side, each row's ratio taken to the group's baseline provider. A new provider is one more entry in a
group's ``calls``; a new case dimension one more field in ``Case.fields``; a new bench one small script.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from fastpeft import _cli
from fastpeft._cli import non_negative_float, output_file, positive_float, save_figure_atomic, write_text_atomic

# The bench scripts' argparse types: the command line's own.
positive_int, non_negative_int, rate, fraction, parse_kxn = (_cli.positive_int, _cli.non_negative_int, _cli.rate,
                                                             _cli.fraction, _cli.kxn)


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
    return _stats(times)


# Rounds of a CPU group's interleaved timing: each provider's calls are spread over this many turns.
CPU_ROUNDS = 5


def _stats(times: list) -> Timing:
    """Median and 20/80% quantiles of single-call times (ms)."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7])


def bench_interleaved(fns: dict, warmup_ms: float = 25, rep_ms: float = 100, rounds: int = CPU_ROUNDS) -> tuple:
    """``(times, failed)`` of CPU callables timed in turns: {name: Timing} (as ``bench`` gives, without memory)
    and {name: the exception} of those whose call raised (the others go on without them).

    Each provider is warmed up (~``warmup_ms``), then ``rounds`` rounds each give every provider ~``rep_ms /
    rounds`` of single timed calls (at least one), the providers' order rotating from round to round so that
    none always runs right after the same one (which would leave it that one's caches). The statistics pool a
    provider's calls over the rounds: a slow phase of a shared machine falls on every provider alike."""
    once, failed = {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            first = max(time.perf_counter() - t0, 1e-6)
            n = max(1, int(warmup_ms / 1e3 / first))
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            # a call's time once warm (the first may pay lazy set-up, compilation), which sizes the rounds
            once[name] = max((time.perf_counter() - t0) / n, 1e-6)
        except Exception as exc:
            failed[name] = exc
    names = [n for n in fns if n in once]
    samples = {n: [] for n in names}
    for r in range(rounds if names else 0):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if n in failed:  # raised in an earlier round
                continue
            fn, reps = fns[n], max(1, int(rep_ms / rounds / 1e3 / once[n]))
            try:
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    samples[n].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # a provider that fails on a later call: a result like the others
                failed[n] = exc
    return {n: _stats(samples[n]) for n in names if n not in failed}, failed


def time_model_calls(models: dict, ids, device: str, rep_ms: float, loss=None, forward=None) -> dict:
    """``{"train step": times, "eval forward": times}`` for whole transformers models (``{name: model}``) on the same
    ``input_ids``: one training step (zeroed grads, forward with ``labels``, backward) and one no-grad eval forward,
    {name: Timing}; interleaved on the CPU (``bench_interleaved``), ``bench`` on CUDA. Raises naming a failed one.
    ``loss(m)`` / ``forward(m)``: the step's loss and the eval call for models taking other inputs (images)."""
    loss = loss or (lambda m: m(input_ids=ids, labels=ids).loss)
    forward = forward or (lambda m: m(input_ids=ids))

    def step(m):
        def fn():
            m.train()
            m.zero_grad(set_to_none=True)
            loss(m).backward()
        return fn

    def infer(m):
        def fn():
            m.eval()
            with torch.no_grad():
                forward(m)
        return fn

    out = {}
    for what, make in (("train step", step), ("eval forward", infer)):
        fns = {name: make(m) for name, m in models.items()}
        if device == "cpu":
            times, failed = bench_interleaved(fns, rep_ms=rep_ms)
            if failed:
                raise RuntimeError(f"{what}: {failed}")
        else:
            times = {name: bench(fn, device, rep_ms=rep_ms) for name, fn in fns.items()}
        out[what] = times
    return out


def model_args(description: str, argv, width: int, vocab: int, extra=None):
    """The command line of a whole-model script: --layers --width (a multiple of 64: 64-wide heads) --vocab --batch
    --seq --rank --device --rep-ms --out, plus what ``extra(ap)`` adds; parsed and checked (``ap.error``)."""
    from fastpeft._cli import non_negative_int, output_file, positive_int

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--width", type=positive_int, default=width)
    ap.add_argument("--vocab", type=positive_int, default=vocab)
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--rank", type=positive_int, default=16)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rep-ms", type=non_negative_int, default=2000)
    ap.add_argument("--out", type=output_file, default=None, help="also write the table to this markdown file")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.width % 64:
        ap.error(f"--width must be a multiple of 64 (64-wide attention heads), got {args.width}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    return ap, args


def emit_markdown(head: str, script: str, argv, body: list, out: str | None) -> str:
    """A script's table as markdown: ``head``, the command line that made it (``python benchmarks/<script> ...``,
    from ``argv`` or sys.argv), ``body``'s lines; printed, and written atomically to ``out`` when given."""
    from fastpeft._cli import write_text_atomic

    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([head, "", f"`python benchmarks/{script} {cmd}`".replace(" `", "`"), "", *body, ""])
    print(text)
    if out:
        write_text_atomic(out, text)
    return text


def add_linear_args(ap, cuda: bool, tokens: tuple, shapes: tuple) -> None:
    """``--tokens`` (M values) and ``--shapes`` (KxN pairs) of a linear-layer bench; ``tokens`` and ``shapes``
    are (GPU defaults, CPU defaults)."""
    ap.add_argument("--tokens", nargs="+", type=positive_int, default=tokens[0] if cuda else tokens[1],
                    help="M values")
    ap.add_argument("--shapes", nargs="+", type=parse_kxn, default=shapes[0] if cuda else shapes[1],
                    help="KxN (in x out) pairs")


def linear_cases(args, ctx, groups: Callable) -> list:
    """A ``Case`` per (M, KxN, r, p) of ``--tokens``, ``--shapes``, ``--ranks`` and ``--dropout``, its groups
    from ``groups(m, k, n, r, p, modes, ctx)``."""
    return [Case(dict(M=m, K=k, N=n, r=r, p=p), functools.partial(groups, m, k, n, r, p, args.modes, ctx))
            for m in args.tokens for k, n in args.shapes for r in args.ranks for p in args.dropout]


def plain_columns(*keys: str) -> list:
    """Table columns headed by their key and printed as they are."""
    return [(k, k, "{}") for k in keys]


# The columns run_cases fills for every row: who ran, the median and its 20% / 80% quantiles; then, for the
# benches timed against a frozen nn.Linear, the ratio to it and the peak memory.
TIMING_COLUMNS = [("provider", "provider", "{}"), ("ms", "median ms", "{:.3f}"), ("p20", "p20", "{:.3f}"),
                  ("p80", "p80", "{:.3f}")]
VS_LINEAR_COLUMNS = [("vs_linear", "x nn.Linear", "{:.3f}"), ("peak_mib", "peak MiB", "{:.0f}")]
# Where a group checks its providers (``Group.checks``): the relative error of the row's result and what against.
ERROR_COLUMNS = [("rel_err", "rel. err", "{:.1e}"), ("err_vs", "err vs", "{}")]


def to_markdown(text: str, rows: list, columns: list) -> str:
    """The table ``print_table`` printed (its title and environment line) as markdown."""
    head, _, _ = text.partition("\n\n")
    lines = ["# " + head.splitlines()[0], "", head.splitlines()[1], "",
             "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns)
                     + " |")
    return "\n".join(lines) + "\n"


def table_head(title: str, env: dict) -> str:
    """The title line and the environment line above a table."""
    return f"{title}\n{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}"


def print_table(title: str, env: dict, rows: list, columns: list) -> str:
    """Rows are dicts; ``columns`` are (key, header, format). Returns the text it printed."""
    head = table_head(title, env)
    cells = [[h for _, h, _ in columns]] + [[fmt.format(r[k]) if r.get(k) is not None else "-"
                                               for k, _, fmt in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [head, ""] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(3, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str, env: dict, rows: list, partial: str | None = None) -> None:
    data = {"environment": env, "rows": [r if isinstance(r, dict) else asdict(r) for r in rows]}
    if partial:
        data["partial"] = partial
    write_text_atomic(path, json.dumps(data, indent=2))


def case_keys(row: dict) -> list:
    """The fields that name a row's case: those before ``provider`` (``run_cases`` puts them first)."""
    keys = list(row)
    return keys[:keys.index("provider")]


def plot_ratios(rows: list, path: str, title: str, baseline: str = "linear") -> None:
    """One bar group per case, one bar per provider: median time / the baseline's (lower is better).
    Rows carry their case's fields first (``case_keys``), then ``provider`` and ``vs_<baseline>``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    ratio = f"vs_{baseline}"
    keys = case_keys(rows[0])
    cases = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != baseline]
    width = 0.8 / max(1, len(provs))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases) * max(1, len(provs)) / 2), 5))
    for i, prov in enumerate(provs):
        vals = []
        for c in cases:
            hit = [r[ratio] for r in rows if r["provider"] == prov and tuple(r[k] for k in keys) == c]
            vals.append(hit[0] if hit and hit[0] is not None else float("nan"))
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=prov)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    half = (len(keys) + 1) // 2  # two lines: "M512 K4096 N4096\nr16 p0.1 fwd"
    words = [[v if isinstance(v, str) else f"{k}{v}" for k, v in zip(keys, c)] for c in cases]
    labels = [" ".join(w[:half]) + "\n" + " ".join(w[half:]) for w in words]
    ax.set_xticklabels(labels, fontsize=7, rotation=60)
    ax.set_ylabel(f"time / {baseline} (same run)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def load_rows(path: str) -> tuple:
    """``(environment, rows, baseline, partial)`` of a bench's ``--json`` file, checked: a clear ``SystemExit``
    naming the file and what is wrong where it is not one (no rows, rows without ``provider`` or without the
    one ``vs_<baseline>`` ratio every row of a table carries)."""
    where = f"fastpeft bench plot: {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise SystemExit(f"{where}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise SystemExit(f"{where}: not JSON ({exc})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        got = type(rows).__name__ if not isinstance(rows, list) else f"{len(rows)} rows"
        raise SystemExit(f"{where}: expected a bench --json file (a non-empty list of rows under 'rows'), got {got}")
    ratios = sorted({k for r in rows for k in r if k.startswith("vs_")})
    providers = {r.get("provider") for r in rows}
    # the ratio to a provider of the table (bench multi also carries vs_linear, its ratio to one adapter)
    own = [k for k in ratios if k[3:] in providers] if len(ratios) > 1 else ratios
    if len(own) != 1 or any("provider" not in r or own[0] not in r for r in rows):
        raise SystemExit(f"{where}: expected every row to have 'provider' and one 'vs_<baseline>' ratio to a "
                         f"provider of the table, got ratio columns {ratios}")
    return data.get("environment", {}), rows, own[0][3:], data.get("partial")


def plot_main(argv=None) -> list:
    """``fastpeft bench plot RESULT.json ... [--out PNG] [--title T]``: the ``--plot`` bar chart of tables
    already measured (a device run's ``$OUT/bench_*.json``), drawn here; one PNG beside each JSON, or ``--out``
    for a single one. Returns the PNGs written."""
    ap = argparse.ArgumentParser(prog="fastpeft bench plot", description=plot_main.__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="bench --json files")
    ap.add_argument("--out", type=output_file, help="the PNG (one JSON only; default: the JSON's path with .png)")
    ap.add_argument("--title", help="the chart's title (default: the file's name and the device)")
    a = ap.parse_args(argv)
    if a.out and len(a.json) > 1:
        raise SystemExit(f"fastpeft bench plot: --out takes one JSON file, got {len(a.json)}")
    loaded = [(path, load_rows(path)) for path in a.json]  # every file checked before any PNG is written
    written = []
    for path, (env, rows, baseline, partial) in loaded:
        out = a.out or os.path.splitext(path)[0] + ".png"
        title = a.title or f"{os.path.splitext(os.path.basename(path))[0]} on {env.get('device', '?')}"
        plot_ratios(rows, out, title + (" [partial]" if partial else ""), baseline=baseline)
        print(f"wrote {out} ({len(rows)} rows, ratios to {baseline})")
        written.append(out)
    return written


def add_output_args(ap, plot_help: str = "bar chart of the ratios to the baseline") -> None:
    """The options every benchmark script shares: timing budget and where the table goes."""
    ap.add_argument("--warmup-ms", type=non_negative_float, default=25)
    ap.add_argument("--rep-ms", type=positive_float, default=100)
    ap.add_argument("--json", metavar="FILE", type=output_file, help="write the rows and the environment as JSON")
    ap.add_argument("--markdown", metavar="FILE", type=output_file, help="write the table as markdown")
    ap.add_argument("--plot", metavar="PNG", type=output_file, help=plot_help)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def write_outputs(args, env: dict, rows: list, columns: list, title: str, partial: str | None = None) -> None:
    """The ``--json`` / ``--markdown`` files of ``rows`` (each written atomically); ``partial``: why the rows are
    not all the cases (appended to the title, and a field of the JSON)."""
    if partial:
        title = f"{title} [partial: {partial}]"
    if args.json:
        write_json(args.json, env, rows, partial)
    if args.markdown:
        write_text_atomic(args.markdown, to_markdown(table_head(title, env) + "\n\n", rows, columns))


def partial_writer(args, env: dict, columns: list, title: str):
    """``run_cases``' ``on_group``: rewrites the output files after every timed group, so a run cut short (the
    device check's per-step timeouts) still leaves what it measured, marked partial; None without output files."""
    if not (args.json or args.markdown):
        return None

    def on_group(rows: list, case: int, cases: int) -> None:
        write_outputs(args, env, rows, columns, title,
                      f"{len(rows)} rows; the run stopped in or after case {case} of {cases}")
    return on_group


# p80 / p20 above this: the row's samples spread too much for a ratio to be read at a few percent
NOISY_SPREAD = 1.5


def noisy_rows(rows: list) -> list:
    """The rows whose 80 % quantile is over NOISY_SPREAD times their 20 % one (a busy machine, a clock that moved)."""
    return [r for r in rows if r.get("p20") and r.get("p80") and r["p80"] / r["p20"] > NOISY_SPREAD]


def report(args, env: dict, rows: list, columns: list, title: str, plot_title: str, baseline: str = "linear") -> list:
    """Print the table (and a note where rows are noisy) and write what ``add_output_args``' options ask for; returns
    the rows."""
    print_table(title, env, rows, columns)
    noisy = noisy_rows(rows)
    if noisy:
        print(f"\nnote: {len(noisy)} of {len(rows)} rows spread over {NOISY_SPREAD}x between their p20 and p80 (other "
              "work on this machine? on a CPU, OMP_NUM_THREADS=1 and an idle machine help): read their ratios "
              "loosely", file=sys.stderr)
    write_outputs(args, env, rows, columns, title)
    if args.plot:
        plot_ratios(rows, args.plot, f"{plot_title} on {env['device']}", baseline=baseline)
    return rows


# ------------------------------------------------------------------------------------------ the runner


@contextlib.contextmanager
def env_vars(values: dict):
    """Set environment variables for a block (a forced GEMM variant, say), restoring them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Group:
    """Providers timed side by side: ``calls`` {provider: zero-argument callable}, each timed in the same
    run, each row's ratio taken to the baseline provider's median. ``fields``: the columns that name the
    group within its case (``mode``, say). ``extra(provider, times)``: more columns from the group's
    timings ({provider: Timing}). ``grad=False`` times the calls under ``torch.no_grad()`` (serving).
    ``checks`` {provider: oracle}: after the timing, each such provider's result (what its call returns: a
    tensor or a tuple of them, e.g. y and the gradients) is compared with the oracle's, a provider of ``calls``
    or an untimed callable of ``oracles``, computing the same function on the same inputs and weights
    (``rel_error``): a fast row that computes something else shows it in the table itself."""
    fields: dict
    calls: dict
    extra: Callable | None = None
    grad: bool = True
    checks: dict = field(default_factory=dict)
    oracles: dict = field(default_factory=dict)


def _tensors(result) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _tensors(r)]
    raise TypeError(f"a checked provider must return a tensor or a tuple of tensors, got {type(result).__name__}")


def rel_error(result, oracle) -> float:
    """The largest ``‖a − o‖₂ / ‖o‖₂`` (in fp32; ``‖a − o‖₂`` where ``o`` is zero) over the paired tensors of two
    results (``y`` and each gradient). A check of gross errors, not of the tests' tolerance: a bf16 kernel and a
    bf16 reference differ by ~1e-3 to 1e-2, a wrong one by ~1."""
    got, want = _tensors(result), _tensors(oracle)
    if len(got) != len(want) or any(a.shape != o.shape for a, o in zip(got, want)):
        raise ValueError(f"results do not pair up: {[tuple(a.shape) for a in got]} against "
                         f"{[tuple(o.shape) for o in want]}")
    worst = 0.0
    for a, o in zip(got, want):
        a, o = a.detach().float(), o.detach().float()
        diff, norm = float((a - o).norm()), float(o.norm())
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst


def failure(exc: BaseException, what: str = "run failed") -> str:
    """A one-line cell for a table: ``what: Type: the message's first line`` (no ``|``: markdown cells)."""
    first = (str(exc).strip().splitlines() or [""])[0][:100]
    return f"{what}: {type(exc).__name__}: {first}".replace("|", "/")


def check_errors(group: Group, failed=()) -> dict:
    """{provider: {"rel_err": ..., "err_vs": oracle}} of the group's ``checks``, each oracle run once; providers in
    ``failed`` (their timing raised) are left out. A check that raises (an oracle that cannot run, results that do
    not pair up) is a cell of the table, not the end of the bench: ``rel_err`` None, ``err_vs`` says why."""
    results, broken, out = {}, {}, {}  # oracle -> its result / why it could not run (each oracle run once)
    for name, oracle in group.checks.items():
        if name in failed:
            continue
        if oracle not in results and oracle not in broken:
            try:
                results[oracle] = (group.oracles.get(oracle) or group.calls[oracle])()
            except Exception as exc:
                broken[oracle] = failure(exc, f"check vs {oracle} failed")
        if oracle in broken:
            out[name] = {"rel_err": None, "err_vs": broken[oracle]}
            continue
        try:
            out[name] = {"rel_err": rel_error(group.calls[name](), results[oracle]), "err_vs": oracle}
        except Exception as exc:
            out[name] = {"rel_err": None, "err_vs": failure(exc, f"check vs {oracle} failed")}
    return out


@dataclass
class Case:
    """One case of a table: ``fields`` (the columns that name it: M, K, N, r, ...) and ``setup()``, called
    when its turn comes, which builds the inputs and yields the case's ``Group``s (one per mode, say):
    inputs built once serve every group and are freed before the next case."""
    fields: dict
    setup: Callable[[], Iterable[Group]]


@dataclass
class Context:
    """What a script's cases are built for: the device, the dtype of ``--dtype``, and whether the fused
    kernels can run here (CUDA, triton importable, not the interpreter)."""
    device: str
    dtype: torch.dtype
    kernels_ok: bool


@dataclass
class Benchmark:
    """A bench script: ``add_arguments(parser, cuda)`` adds its own options (defaults for a GPU or not);
    ``cases(args, context)`` lists its ``Case``s; ``columns`` (key, header, format) make the table, titled
    ``title`` (``{dtype}`` filled in); ``baseline`` is the provider every ratio is to; ``modes`` the
    ``--modes`` choices, none when empty, ``extra_modes`` more choices not run by default; ``no_gpu`` is printed
    before a CPU-only run."""
    prog: str
    description: str
    add_arguments: Callable
    cases: Callable
    columns: list
    title: str
    plot_title: str
    no_gpu: str
    baseline: str = "linear"
    modes: tuple = ()
    extra_modes: tuple = ()
    plot_help: str = "bar chart of the ratios to the baseline"
    progress: str = "bench"


def layer_step(mod, backend, mode: str, x, dy, context=contextlib.nullcontext) -> Callable:
    """One timed call of a layer (bench lora, dora, qlora): ``mod(x)`` under ``fastpeft.use_backend(backend or
    "auto")`` and ``context()``, then for ``mode == "fwd+bwd"`` the gradients a training step needs (x and the
    trainable parameters, from ``dy``). It returns y, or (y, dx, *the parameters' gradients)."""
    import fastpeft

    wrt = [x] + [p for p in mod.parameters() if p.requires_grad]

    def fn():
        with fastpeft.use_backend(backend or "auto"), context():
            y = mod(x)
            if mode == "fwd+bwd":
                return (y,) + torch.autograd.grad(y, wrt, dy)
            return y
    return fn


def linear_benchmark(**fields) -> Benchmark:
    """The ``Benchmark`` of a layer timed against a frozen nn.Linear (bench lora, dora, qlora, sparse): modes
    fwd and fwd+bwd, every ratio (and the plot) to nn.Linear; ``fields`` as ``Benchmark``'s."""
    return Benchmark(**{"modes": ("fwd", "fwd+bwd"), "plot_help": "bar chart of the ratios to nn.Linear", **fields})


def kernels_ok(device: str) -> bool:
    """The fused kernels can run: a CUDA device, triton imports, and not the CPU interpreter."""
    from fastpeft import kernels

    return device == "cuda" and kernels.HAS_TRITON and not kernels.INTERPRET


def _time_group(group: Group, device: str, warmup_ms: float, rep_ms: float, where: str) -> tuple:
    """``(times, failed, errors)`` of one group: {provider: Timing} of those that ran, {provider: why} of those
    whose call raised (a provider that cannot run here is a result: the table goes on), and ``check_errors``."""
    times, failed = {}, {}
    with contextlib.nullcontext() if group.grad else torch.no_grad():
        if device == "cuda":
            for name, fn in group.calls.items():
                try:
                    times[name] = bench(fn, device, warmup_ms, rep_ms)
                except Exception as exc:
                    failed[name] = exc
        else:  # the providers in turns (bench_interleaved): a shared CPU drifts
            times, failed = bench_interleaved(group.calls, warmup_ms, rep_ms)
        failed = {name: failure(exc) for name, exc in failed.items()}
        for name, why in failed.items():
            print(f"{where} {group.fields} {name}: {why}", file=sys.stderr)
        return times, failed, check_errors(group, failed)


def run_cases(cases: list, device: str, baseline: str = "linear", warmup_ms: float = 25, rep_ms: float = 100,
              progress: bool = True, desc: str = "bench", on_group: Callable | None = None) -> list:
    """Time every group of every case; one row per provider: the case's and group's fields, ``provider``,
    ``ms`` / ``p20`` / ``p80`` (median and quantiles), ``vs_<baseline>``, ``peak_mib``, the checks' error and the
    extras. A provider whose call raises gets a row with no times and the error in ``err_vs`` (one run on a lent
    card must not end at its first failing path). ``on_group(rows, i, n)``, if given, after each group of case i
    (1-based) of n, with the rows so far."""
    from tqdm.auto import tqdm

    rows = []
    cases = list(cases)
    for i, case in enumerate(tqdm(cases, desc=desc, unit="case", disable=not progress), 1):
        for group in case.setup():
            times, failed, errors = _time_group(group, device, warmup_ms, rep_ms, f"{desc}: {case.fields}")
            floor = times[baseline].median_ms if baseline in times else None
            for name in group.calls:
                if name in failed:
                    rows.append({**case.fields, **group.fields, "provider": name, "ms": None, "p20": None,
                                 "p80": None, f"vs_{baseline}": None, "peak_mib": None, "rel_err": None,
                                 "err_vs": failed[name]})
                    continue
                t = times[name]
                row = {**case.fields, **group.fields, "provider": name, "ms": t.median_ms, "p20": t.p20_ms,
                       "p80": t.p80_ms, f"vs_{baseline}": t.median_ms / floor if floor else None,
                       "peak_mib": t.peak_mib, **errors.get(name, {})}
                if group.extra is not None:
                    try:
                        row.update(group.extra(name, times))
                    except KeyError:  # an extra read from a provider that failed: those columns stay empty
                        if not failed:
                            raise
                rows.append(row)
            if on_group is not None:
                on_group(rows, i, len(cases))
            group = times = None  # drop this case's inputs before the next case builds its own
    return rows


def main(benchmark: Benchmark, argv=None) -> list:
    """Parse the options, print the header, time every case, and print / write / plot the table."""
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog=benchmark.prog, description=benchmark.description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(ap, cuda)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16" if cuda else "float32")
    if benchmark.modes:
        ap.add_argument("--modes", nargs="+", default=list(benchmark.modes),
                        choices=list(benchmark.modes) + list(benchmark.extra_modes))
    add_output_args(ap, benchmark.plot_help)
    args = ap.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    env = environment(device)
    if device != "cuda":
        print(benchmark.no_gpu + "\n")
    context = Context(device, getattr(torch, args.dtype), kernels_ok(device))
    title = benchmark.title.format(dtype=args.dtype)
    rows = run_cases(benchmark.cases(args, context), device, benchmark.baseline, args.warmup_ms, args.rep_ms,
                     progress=not args.quiet, desc=benchmark.progress,
                     on_group=partial_writer(args, env, benchmark.columns, title))
    return report(args, env, rows, benchmark.columns, title, benchmark.plot_title.format(dtype=args.dtype),
                  baseline=benchmark.baseline)
