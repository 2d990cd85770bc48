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


@pytest.mark.parametrize("block", [1, 16])
def test_bench_providers_agree_with_the_reference(block):
    bs = _bench_module("bench_sparse")
    from fastpeft.functional import sparse_delta_linear

    torch.manual_seed(0)
    w, bias = torch.randn(48, 80, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    idx, values, flat, which = bs.make_delta(48, 80, 0.2, block, "cpu", torch.float64)
    x = torch.randn(7, 80, dtype=torch.float64)
    dy = torch.randn(7, 48, dtype=torch.float64)
    results = []
    for kind in ("reference", "scatter", "dense-dW"):
        xx, vv = x.clone().requires_grad_(), values.clone().requires_grad_()
        if kind == "reference":
            y = sparse_delta_linear(xx, w, bias, idx, vv, block, backend="reference")
        elif kind == "scatter":
            y = bs.scatter_linear(xx, w, bias, vv, flat, which)
        else:
            y = bs.DenseGradGather.apply(xx, w, bias, vv, flat, which)
        results.append([y] + list(torch.autograd.grad(y, [xx, vv], dy)))
    for name, other in zip(("scatter", "dense-dW"), results[1:]):
        for what, a, b in zip(("y", "dx", "dvalues"), results[0], other):
            # dense-dW forms dW in fp32 (as SpIEL does), also for these fp64 inputs
            tol = 1e-5 if name == "dense-dW" else 1e-7
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=lambda m: f"{name} {what}: {m}")
