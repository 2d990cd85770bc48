"""``fastpeft bench sparse``: the table, its JSON and markdown on tiny shapes, and the benchmark's torch
providers computing what fastpeft computes."""
import json

import pytest
import torch

from fastpeft.cli import _bench_module, main


def test_bench_sparse_table(tmp_path, capsys):
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    rc = main(["bench", "sparse", "--tokens", "16", "--shape", "80x48", "--density", "0.01", "0.05", "--block", "1",
               "16", "--warmup-ms", "1", "--rep-ms", "3", "--quiet", "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ratios to frozen nn.Linear in the same run" in out and "torch " in out
    data = json.loads(js.read_text())
    assert {"device", "torch", "triton", "date"} <= set(data["environment"])
    rows = data["rows"]
    assert {(r["density"], r["block"], r["mode"]) for r in rows} == {
        (d, b, m) for d in (0.01, 0.05) for b in (1, 16) for m in ("fwd", "fwd+bwd")}
    assert {r["provider"] for r in rows} >= {"linear", "scatter", "dense-dW"}
    assert all(r["vs_linear"] == 1.0 for r in rows if r["provider"] == "linear")
    assert all(r["ms"] > 0 and r["M"] == 16 and (r["K"], r["N"]) == (80, 48) for r in rows)
    assert md.read_text().startswith("# Sparse-delta linear")


def _interpreted_kernels():
    from fastpeft import kernels

    return kernels.HAS_TRITON and kernels.INTERPRET


@pytest.mark.parametrize("rank", [0, 4], ids=["sparse", "rosa"])
@pytest.mark.parametrize("block", [1, 16])
def test_bench_providers_agree_with_the_reference(block, rank):
    """Every provider of the table computes the reference's output and gradients (x, values[, A, B]); the
    fastpeft ones (triton backend) where the kernels run here (TRITON_INTERPRET=1 on the CPU)."""
    bs = _bench_module("bench_sparse")
    from harness import env_vars

    torch.manual_seed(0)
    dtype = torch.float32 if _interpreted_kernels() else torch.float64  # the kernels take fp32 at most
    lin = torch.nn.Linear(80, 48, dtype=dtype).requires_grad_(False)
    idx, values, flat, which = bs.make_delta(48, 80, 0.2, block, "cpu", dtype)
    x = torch.randn(7, 80, dtype=dtype)
    dy = torch.randn(7, 48, dtype=dtype)
    lora = (torch.randn(rank, 80, dtype=dtype) / 9, torch.randn(48, rank, dtype=dtype) / 2) if rank else None
    plan = None
    if _interpreted_kernels():
        from fastpeft.ops.sparse import build_sparse_plan

        plan = build_sparse_plan(idx, 48, 80, block)
    results = {}
    for name, (kind, envs) in bs.providers(block, kernels_ok=_interpreted_kernels()).items():
        if kind == "linear":
            continue
        xx, vv = x.clone().requires_grad_(), values.clone().requires_grad_()
        ll = tuple(t.clone().requires_grad_() for t in lora) if lora else None
        delta = (idx, vv, flat, which)
        with env_vars(envs):
            y = bs.forward_fn(kind, xx, lin, delta, plan, ll)()
            results[name] = [y] + list(torch.autograd.grad(y, bs.wrt(kind, xx, delta, ll), dy))
    assert {"reference", "scatter", "dense-dW"} <= set(results)
    if _interpreted_kernels():
        assert {"fastpeft", "fastpeft-kernels", "fastpeft-torch"} <= set(results)
    for name, got in results.items():
        for what, a, b in zip(("y", "dx", "dvalues", "dA", "dB"), results["reference"], got):
            # dense-dW forms dW in fp32 (as SpIEL does), also for fp64 inputs
            tol = 1e-5 if name == "dense-dW" or dtype == torch.float32 else 1e-7
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.skipif(not _interpreted_kernels(), reason="the fastpeft providers need the kernels (interpreter here)")
def test_bench_table_with_the_fastpeft_providers(monkeypatch, tmp_path, capsys):
    """The table as on a GPU (the kernels run under the interpreter): every provider, the RoSA rows (r 4), the
    path column."""
    _bench_module("bench_sparse")  # puts the benchmarks folder, and its harness, on sys.path
    import harness

    monkeypatch.setattr(harness, "kernels_ok", lambda device: True)
    js = tmp_path / "s.json"
    rc = main(["bench", "sparse", "--tokens", "8", "--shape", "64x48", "--density", "0.1", "--block", "1", "16",
               "--lora-rank", "4", "--warmup-ms", "1", "--rep-ms", "1", "--quiet", "--json", str(js)])
    assert rc == 0
    rows = json.loads(js.read_text())["rows"]
    for b in (1, 16):
        got = {r["provider"] for r in rows if r["block"] == b}
        variants = {"fastpeft-fused", "fastpeft-dense"} if b > 1 else {"fastpeft-tile", "fastpeft-gather"}
        from fastpeft.kernels import lora_tma
        if b > 1 and lora_tma.tma_supported("cuda"):  # the interpreter runs tensor descriptors
            variants.add("fastpeft-tma")
        assert got == {"linear", "reference", "scatter", "dense-dW", "fastpeft", "fastpeft-kernels",
                       "fastpeft-torch"} | variants
    assert {r["lora_r"] for r in rows} == {4} and all("path" in r for r in rows if r["provider"] == "fastpeft")
    assert "path (floor)" in capsys.readouterr().out


@pytest.mark.skipif(not _interpreted_kernels(), reason="the fastpeft providers need the kernels (interpreter here)")
def test_bench_path_column_names_the_one_dy_pass(monkeypatch, tmp_path, capsys):
    """``--lora-rank 16``: the path column of the ``fastpeft`` rows names what the floor kept, RoSA's
    kernels-dy1 included (CUDA's timing faked on the CPU: torch fastest in forward, kernels-dy1 in backward)."""
    _bench_module("bench_sparse")
    import harness

    from fastpeft.kernels import lora as K
    from fastpeft.ops import sparse as OS

    monkeypatch.setattr(harness, "kernels_ok", lambda device: True)
    monkeypatch.setattr(K, "INTERPRET", False)
    monkeypatch.setattr(OS, "_path_cache", {})
    monkeypatch.setattr(K, "_bench", lambda fn: {"kernels_dy1": 1.0, "composed": 1.5}.get(fn.__name__, 2.0))
    real_choose = OS.choose_path
    cuda = torch.device("cuda")
    monkeypatch.setattr(OS, "choose_path", lambda key, run, device: real_choose(key, run, cuda))
    js = tmp_path / "s.json"
    rc = main(["bench", "sparse", "--tokens", "8", "--shape", "64x48", "--density", "0.1", "--block", "16",
               "--lora-rank", "16", "--warmup-ms", "1", "--rep-ms", "1", "--quiet", "--json", str(js)])
    assert rc == 0
    rows = json.loads(js.read_text())["rows"]
    paths = {r["mode"]: r["path"] for r in rows if r["provider"] == "fastpeft"}
    assert paths == {"fwd": "fwd torch", "fwd+bwd": "fwd torch, bwd kernels-dy1"}, paths
    assert "bwd kernels-dy1" in capsys.readouterr().out
