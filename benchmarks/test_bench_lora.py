"""pytest-benchmark entry points for CPU-sized cases: ``pytest benchmarks/ --benchmark-enable``
(the CLI table is ``fastpeft bench``). Without --benchmark-enable each case runs once, as a smoke test."""
import pytest
import torch

from bench_lora import providers, step_fn

SHAPE = (512, 1024, 1024)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("provider", ["linear", "reference", "peft", "peft+accelerate"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_lora_linear(benchmark, provider, mode, p):
    m, k, n = SHAPE
    mods = providers(k, n, 16, p, "cpu", torch.float32, kernels_ok=False)
    if provider not in mods:
        pytest.skip(f"{provider} is not installed")
    mod, backend, gemm = mods[provider]
    x = torch.randn(m, k, requires_grad=True)
    dy = torch.randn(m, n)
    benchmark(step_fn(mod, backend, gemm, mode, x, dy))
