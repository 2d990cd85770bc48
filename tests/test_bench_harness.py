"""benchmarks/harness.py's runner on toy cases: rows, ratios within a group, extras, no-grad groups,
inputs freed between cases, and ``main`` building the options and the table of a toy bench."""
import json
import os
import time
import weakref

import pytest
import torch

from fastpeft.cli import _bench_module

harness = _bench_module("harness")


class _Inputs:
    """Stands for a case's tensors; the test watches when it is freed."""


def _toy_cases(log, refs):
    def setup(name, scale):
        log.append(("setup", name, [r() is not None for r in refs]))  # which earlier inputs are still alive
        inputs = _Inputs()
        refs.append(weakref.ref(inputs))
        for mode in ("fwd", "fwd+bwd"):
            grads = []

            def base(inputs=inputs):
                return sum(range(200))

            def slow(inputs=inputs, grads=grads):
                grads.append(torch.is_grad_enabled())
                return sum(range(200 * scale))

            yield harness.Group({"mode": mode}, {"base": base, "slow": slow},
                                extra=lambda provider, times: {"seen": sorted(times)}, grad=mode == "fwd+bwd")
            log.append(("grad", name, mode, set(grads)))

    return [harness.Case({"name": name, "size": scale}, lambda name=name, scale=scale: setup(name, scale))
            for name, scale in (("a", 20), ("b", 40))]


def test_run_cases_rows_ratios_and_groups():
    log, refs = [], []
    cases = _toy_cases(log, refs)
    assert log == []  # nothing is built before its turn
    rows = harness.run_cases(cases, "cpu", baseline="base", warmup_ms=1, rep_ms=2, progress=False)
    assert [(r["name"], r["mode"], r["provider"]) for r in rows] == [
        (n, m, p) for n in "ab" for m in ("fwd", "fwd+bwd") for p in ("base", "slow")]
    for r in rows:
        assert list(r)[:4] == ["name", "size", "mode", "provider"]
        assert harness.case_keys(r) == ["name", "size", "mode"]
        assert r["ms"] > 0 and r["p20"] <= r["ms"] <= r["p80"] and r["peak_mib"] is None
        assert r["seen"] == ["base", "slow"]
    for base, slow in zip(rows[::2], rows[1::2]):
        assert base["vs_base"] == 1.0
        assert slow["vs_base"] == pytest.approx(slow["ms"] / base["ms"]) and slow["vs_base"] > 1
    # fwd groups ran without grad, fwd+bwd with; case a's inputs were freed before case b was built
    assert [e for e in log if e[0] == "grad"] == [("grad", n, m, {m == "fwd+bwd"})
                                                  for n in "ab" for m in ("fwd", "fwd+bwd")]
    assert [e for e in log if e[0] == "setup"] == [("setup", "a", []), ("setup", "b", [False])]


def test_main_builds_options_table_and_files(tmp_path, capsys):
    seen = {}

    def add_arguments(ap, cuda):
        ap.add_argument("--sizes", nargs="+", type=int, default=[3])

    def cases(args, ctx):
        seen.update(dtype=ctx.dtype, device=ctx.device, kernels_ok=ctx.kernels_ok, modes=args.modes)
        return [harness.Case({"n": n}, lambda n=n: iter([harness.Group({"mode": m}, {
            "floor": lambda: None, "other": lambda n=n: sum(range(100 * n))}) for m in args.modes]))
            for n in args.sizes]

    toy = harness.Benchmark(
        prog="toy", description="a toy", add_arguments=add_arguments, cases=cases,
        columns=[("n", "n", "{}"), ("mode", "mode", "{}"), ("provider", "provider", "{}"),
                 ("vs_floor", "x floor", "{:.2f}")],
        title="Toy, {dtype}", plot_title="toy ({dtype})", no_gpu="No GPU: toy on the CPU.", baseline="floor",
        modes=("fwd", "fwd+bwd"))
    js, md, png = tmp_path / "t.json", tmp_path / "t.md", tmp_path / "t.png"
    rows = harness.main(toy, ["--sizes", "2", "5", "--dtype", "float16", "--modes", "fwd", "--warmup-ms", "1",
                              "--rep-ms", "2", "--quiet", "--json", str(js), "--markdown", str(md), "--plot", str(png)])
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert out.startswith("No GPU: toy on the CPU.\n\n") and seen["kernels_ok"] is False
    assert seen["dtype"] == torch.float16 and seen["modes"] == ["fwd"]
    assert "Toy, float16\n" in out and "x floor" in out and "torch " in out
    assert [(r["n"], r["mode"], r["provider"]) for r in rows] == [(n, "fwd", p) for n in (2, 5)
                                                                  for p in ("floor", "other")]
    data = json.loads(js.read_text())
    assert data["rows"] == rows and {"device", "torch", "triton", "date"} <= set(data["environment"])
    assert md.read_text().startswith("# Toy, float16") and png.stat().st_size > 1000
    with pytest.raises(SystemExit):  # a bench without modes has no --modes
        harness.main(harness.Benchmark(prog="toy", description="", add_arguments=add_arguments, cases=cases,
                                       columns=toy.columns, title="", plot_title="", no_gpu=""), ["--modes", "fwd"])


def test_cut_run_leaves_its_measured_rows(tmp_path):
    """A bench killed mid-run (here: the third case raises, as a timeout would stop it) leaves complete JSON and
    markdown files of the cases measured before, marked partial; a full run's files carry no mark."""
    def cases(args, ctx):
        def setup(n):
            if n == 3:
                raise KeyboardInterrupt("cut")
            return iter([harness.Group({"mode": m}, {"floor": lambda: None, "other": lambda: sum(range(100))})
                         for m in args.modes])
        return [harness.Case({"n": n}, lambda n=n: setup(n)) for n in args.sizes]

    def add_arguments(ap, cuda):
        ap.add_argument("--sizes", nargs="+", type=int)

    toy = harness.Benchmark(
        prog="toy", description="", add_arguments=add_arguments, cases=cases,
        columns=[("n", "n", "{}"), ("mode", "mode", "{}"), ("provider", "provider", "{}")],
        title="Toy", plot_title="", no_gpu="", baseline="floor", modes=("fwd", "fwd+bwd"))
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    argv = ["--warmup-ms", "1", "--rep-ms", "2", "--quiet", "--json", str(js), "--markdown", str(md)]
    with pytest.raises(KeyboardInterrupt):
        harness.main(toy, ["--sizes", "1", "2", "3", "4"] + argv)
    data = json.loads(js.read_text())
    assert [(r["n"], r["mode"], r["provider"]) for r in data["rows"]] == [
        (n, m, p) for n in (1, 2) for m in ("fwd", "fwd+bwd") for p in ("floor", "other")]
    assert data["partial"] == "8 rows; the run stopped in or after case 2 of 4"
    text = md.read_text()
    assert text.startswith("# Toy [partial: 8 rows; the run stopped in or after case 2 of 4]") and text.count("| 2 | fwd+bwd |") == 2
    assert not list(tmp_path.glob("*.tmp*"))  # written through a rename, nothing left behind
    harness.main(toy, ["--sizes", "1", "2"] + argv)
    assert "partial" not in json.loads(js.read_text()) and md.read_text().startswith("# Toy\n")


def test_env_vars_restores(monkeypatch):
    monkeypatch.setenv("FASTPEFT_TOY_A", "old")
    monkeypatch.delenv("FASTPEFT_TOY_B", raising=False)
    with harness.env_vars({"FASTPEFT_TOY_A": "new", "FASTPEFT_TOY_B": "set"}):
        assert os.environ["FASTPEFT_TOY_A"] == "new" and os.environ["FASTPEFT_TOY_B"] == "set"
    assert os.environ["FASTPEFT_TOY_A"] == "old" and "FASTPEFT_TOY_B" not in os.environ


def test_bench_lora_offers_the_decode_provider_up_to_its_rows(monkeypatch):
    """bench lora's ``fastpeft-decode`` (FASTPEFT_LORA_GEMM=decode) is a provider up to DENSE_MAX_M rows, and its
    timed step runs the one-launch forward (here under the interpreter, on CPU tensors)."""
    pytest.importorskip("triton")
    from fastpeft import kernels
    from fastpeft.kernels import quant as KQ

    if not kernels.INTERPRET:
        pytest.skip("runs the kernels on CPU tensors under TRITON_INTERPRET=1")
    bl = _bench_module("bench_lora")
    small = bl.providers(48, 40, 8, 0.0, "cpu", torch.float32, True, m=KQ.DENSE_MAX_M)
    assert "fastpeft-decode" in small and small["fastpeft-decode"][1:] == ("triton", "decode")
    assert "fastpeft-decode" not in bl.providers(48, 40, 8, 0.0, "cpu", torch.float32, True, m=KQ.DENSE_MAX_M + 1)
    assert "fastpeft-decode" not in bl.providers(48, 40, 8, 0.0, "cpu", torch.float32, True)
    ran, real = [], KQ.lora_decode
    monkeypatch.setattr(KQ, "lora_decode", lambda *a, **kw: ran.append(a[0].shape) or real(*a, **kw))
    mod, backend, gemm = small["fastpeft-decode"]
    x, dy = torch.randn(5, 48, requires_grad=True), torch.randn(5, 40)
    bl.step_fn(mod, backend, gemm, "fwd+bwd", x, dy)()  # the forward on the decode kernel, the backward's kernels
    assert ran == [torch.Size([5, 48])]


def test_checks_give_each_row_its_error_against_its_oracle():
    """``Group.checks``: after the timing, each checked provider's result (y and the gradients) against its oracle,
    a timed provider or an untimed one of ``oracles``; unchecked rows carry no error."""
    y, g = torch.randn(6, 5), torch.randn(5)

    def group():
        yield harness.Group({}, {"ref": lambda: (y, g), "good": lambda: (y * (1 + 1e-4), g),
                                 "bad": lambda: (y, -g), "other": lambda: y},
                            checks={"good": "ref", "bad": "ref", "other": "exact"},
                            oracles={"exact": lambda: y.double()})
    rows = harness.run_cases([harness.Case({}, group)], "cpu", baseline="ref", warmup_ms=1, rep_ms=2,
                             progress=False)
    by = {r["provider"]: r for r in rows}
    assert "rel_err" not in by["ref"] and "err_vs" not in by["ref"]
    assert by["good"]["rel_err"] == pytest.approx(1e-4, rel=1e-2) and by["good"]["err_vs"] == "ref"
    assert by["bad"]["rel_err"] == pytest.approx(2.0) and by["bad"]["err_vs"] == "ref"  # the worst tensor: -g
    assert by["other"]["rel_err"] == 0.0 and by["other"]["err_vs"] == "exact"
    with pytest.raises(ValueError, match=r"do not pair up: \[\(6, 5\)\] against \[\(6, 5\), \(5,\)\]"):
        harness.rel_error(y, (y, g))
    with pytest.raises(TypeError, match="tensor or a tuple of tensors, got NoneType"):
        harness.rel_error(None, y)


def test_bench_lora_checks_every_fastpeft_path_against_the_reference():
    """bench lora's groups check each fastpeft path (y, dx, dA, dB) against the reference path of the same layer
    without dropout (here the kernels under the interpreter, fp32: agreement to rounding), and nothing with it."""
    pytest.importorskip("triton")
    from fastpeft import kernels

    if not kernels.INTERPRET:
        pytest.skip("runs the kernels on CPU tensors under TRITON_INTERPRET=1")
    bl = _bench_module("bench_lora")
    ctx = harness.Context("cpu", torch.float32, True)
    (grp,) = bl.groups(7, 48, 40, 8, 0.0, ["fwd+bwd"], ctx)
    fast = sorted(n for n in grp.calls if n.startswith("fastpeft"))
    assert {"fastpeft", "fastpeft-fused", "fastpeft-cublas", "fastpeft-decode"} <= set(fast)
    assert {n: o for n, o in grp.checks.items() if n in fast} == {n: "reference" for n in fast}
    errors = harness.check_errors(grp)
    assert all(errors[n]["rel_err"] < 1e-5 for n in fast), errors
    (dropped,) = bl.groups(7, 48, 40, 8, 0.1, ["fwd"], ctx)
    assert dropped.checks == {}


def test_a_provider_that_raises_is_a_row_and_the_table_goes_on(capsys):
    """A provider whose call raises (a kernel the card's compiler rejects, say) gets a row with no times and the
    error in ``err_vs``; the other providers and groups are timed, and a check that cannot run is a cell too."""
    y = torch.randn(4, 3)

    def boom():
        raise RuntimeError("no kernel | here\nsecond line")

    def group(base_fails):
        calls = {"base": boom if base_fails else (lambda: y), "ok": lambda: y, "bad": boom,
                 "odd": lambda: (y, y)}
        yield harness.Group({"mode": "fwd"}, calls, extra=lambda name, times: {"base_ms": times["base"].median_ms},
                            checks={"ok": "base", "bad": "base", "odd": "base"})
    rows = harness.run_cases([harness.Case({"n": 1}, lambda: group(False)), harness.Case({"n": 2}, lambda: group(True))],
                             "cpu", baseline="base", warmup_ms=1, rep_ms=2, progress=False)
    by = {(r["n"], r["provider"]): r for r in rows}
    assert [(r["n"], r["provider"]) for r in rows] == [(n, p) for n in (1, 2) for p in ("base", "ok", "bad", "odd")]
    bad = by[1, "bad"]
    assert bad["ms"] is None and bad["vs_base"] is None and bad["rel_err"] is None
    assert bad["err_vs"] == "run failed: RuntimeError: no kernel / here"  # one line, no markdown cell break
    assert by[1, "ok"]["rel_err"] == 0.0 and by[1, "ok"]["vs_base"] > 0 and by[1, "ok"]["base_ms"] > 0
    assert by[1, "odd"]["rel_err"] is None and by[1, "odd"]["err_vs"].startswith("check vs base failed: ValueError")
    # the baseline itself failed: no ratios, no extras from it, the check's oracle failure named
    assert by[2, "ok"]["ms"] > 0 and by[2, "ok"]["vs_base"] is None and "base_ms" not in by[2, "ok"]
    assert by[2, "ok"]["err_vs"] == "check vs base failed: RuntimeError: no kernel / here"
    assert by[2, "odd"]["err_vs"] == by[2, "ok"]["err_vs"]  # every row checked against it names the oracle's error
    assert "bad: run failed: RuntimeError" in capsys.readouterr().err
    text = harness.to_markdown("t\nenv\n\n", rows, harness.TIMING_COLUMNS + harness.ERROR_COLUMNS)
    assert "| bad | - | - | - | - | run failed: RuntimeError: no kernel / here |" in text



def test_cpu_providers_take_turns_and_a_late_failure_is_a_result():
    """On the CPU a group's providers are timed in rounds, their order rotating, so that a shared machine's slow
    phase falls on all of them; one that raises only on a later call is reported failed, the others go on."""
    order, calls = [], {"late": 0}

    def provider(name):
        def fn():
            order.append(name)
            time.sleep(1e-4)
        return fn

    def late():
        calls["late"] += 1
        if calls["late"] > 3:  # its estimate, warm-up and first round pass; it raises in the second round
            raise RuntimeError("broke")
        order.append("late")
    fns = {"a": provider("a"), "b": provider("b"), "late": late}
    times, failed = harness.bench_interleaved(fns, warmup_ms=0, rep_ms=0, rounds=4)  # one call a turn
    assert sorted(times) == ["a", "b"] and list(failed) == ["late"] and str(failed["late"]) == "broke"
    assert all(t.p20_ms <= t.median_ms <= t.p80_ms and t.median_ms >= 0.1 for t in times.values())
    assert order[:6] == ["a", "a", "b", "b", "late", "late"]  # each one's estimate and warm-up
    # rounds: a b late | b (late) a | (late) a b | a b
    assert order[6:] == ["a", "b", "late", "b", "a", "a", "b", "a", "b"]


def test_noisy_rows_are_noted(capsys):
    """Rows whose p80 is over 1.5x their p20 get a note under the table (on stderr): on a shared machine their
    ratios are not to be read at a few percent."""
    rows = [{"provider": "a", "ms": 1.0, "p20": 1.0, "p80": 1.2}, {"provider": "b", "ms": 2.0, "p20": 1.0, "p80": 2.0},
            {"provider": "c", "ms": None, "p20": None, "p80": None}]
    assert harness.noisy_rows(rows) == [rows[1]]
    args = type("A", (), {"json": None, "markdown": None, "plot": None})()
    env = {"device": "cpu", "torch": "t", "triton": "-", "date": "d"}
    harness.report(args, env, rows, [("provider", "provider", "{}")], "T", "T")
    assert "note: 1 of 3 rows spread over 1.5x" in capsys.readouterr().err
    harness.report(args, env, rows[:1], [("provider", "provider", "{}")], "T", "T")
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, expect", [
    ("gpt2_lora", ["--width", "64", "--vocab", "50", "--seq", "8", "--batch", "1", "--dropout", "0.1"],
     ["| train step | 0.1 |", "| eval forward | 0.1 |"]),
    ("trainable_tokens", ["--width", "64", "--vocab", "300", "--seq", "16", "--batch", "1", "--tokens", "4"],
     ["| train step (ms) |", "| saved for backward (MiB) | ", "Adapter file: "]),
    ("moe_lora", ["--width", "64", "--vocab", "50", "--seq", "8", "--batch", "1", "--experts", "4", "--top-k", "2",
                  "--intermediate", "16"], ["| train step |", "| eval forward |", "4 experts top-2"]),
    ("moe_lora", ["--width", "64", "--vocab", "50", "--seq", "8", "--batch", "1", "--experts", "4", "--top-k", "2",
                  "--intermediate", "16", "--all-linear"], ["| train step |", "converted by PEFT"]),
    ("pissa_lora", ["--width", "64", "--vocab", "50", "--seq", "8", "--batch", "1", "--init", "olora"],
     ["| make the adapter (s) |", "| train step (ms) |", "init_lora_weights='olora'"]),
], ids=["gpt2_lora", "trainable_tokens", "moe_lora", "moe_lora_all_linear", "pissa_lora"])
def test_whole_model_scripts_write_their_tables(tmp_path, script, argv, expect):
    """The whole-model scripts (shared harness: model_args, time_model_calls, emit_markdown) run at toy sizes and
    write the table they print; times are not checked (benchmarks, not tests)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = tmp_path / "t.md"
    text = _bench_module(script).main([*argv, "--rep-ms", "0", "--out", str(out)])
    assert out.read_text() == text and text.count("\n|") >= 4
    assert f"`python benchmarks/{script}.py {' '.join(argv[:2])}" in text
    for line in expect:
        assert line in text, line
    with pytest.raises(SystemExit):  # a width the models cannot take: an argparse error, before any model is built
        _bench_module(script).main(["--width", "65"])


def test_qpissa_error_table(tmp_path):
    """benchmarks/qpissa_error.py on the demo's MiniLM (where installed): QPiSSA's and LoftQ's starts nearer W than
    QLoRA's."""
    pytest.importorskip("bitsandbytes")
    from fastpeft.demo import classify, data

    if data.importlib.util.find_spec(classify.MODEL_PACKAGE) is None:
        pytest.skip(f"{classify.MODEL_PACKAGE} is not installed")
    out = tmp_path / "q.md"
    text = _bench_module("qpissa_error").main(["--ranks", "8", "--loftq-iters", "1", "--out", str(out)])
    assert out.read_text() == text and "36 linear weights" in text and "LoftQ 1 iter:" in text
    row = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    qlora, qpissa, loftq = (float(cell.split()[0]) for cell in row.split("|")[2:5])
    assert 0 < qpissa < qlora and 0 < loftq < qlora


def test_eva_init_table(tmp_path):
    """benchmarks/eva_init.py on the demo's MiniLM (where installed): PEFT's and fastpeft's EVA inits compared (the
    script raises where their ranks or factors differ), the ranks within the budget."""
    pytest.importorskip("peft")
    from fastpeft.demo import classify, data

    for package in (classify.MODEL_PACKAGE, data.DATA_PACKAGE):
        if data.importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    out = tmp_path / "e.md"
    text = _bench_module("eva_init").main(["--rank", "4", "--batches", "2", "--batch-size", "8", "--seq-len", "16",
                                           "--out", str(out)])
    assert out.read_text() == text and "bit for bit (checked)" in text
    ranks = [int(line.split("|")[2]) for line in text.splitlines() if line.startswith("| encoder.layer.")]
    assert len(ranks) == 12 and sum(ranks) == 4 * 12 and max(ranks) <= 8
