"""pytest-benchmark entry points: ``pytest benchmarks/ --benchmark-enable`` (they are skipped by
default so the test suite stays fast; the CLI table is ``python benchmarks/bench_lora.py``)."""
import pytest
import torch

import fastpeft
from bench_lora import providers

SHAPE = (512, 1024, 1024)


@pytest.mark.parametrize("provider", ["linear", "reference", "peft"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_lora_linear(benchmark, provider, mode):
    m, k, n = SHAPE
    mods = providers(k, n, 16, 0.1, "cpu", torch.float32)
    if provider not in mods:
        pytest.skip(f"{provider} not installed")
    mod, backend = mods[provider]
    x = torch.randn(m, k, requires_grad=True)
    dy = torch.randn(m, n)

    def fn():
        with fastpeft.use_backend(backend or "auto"):
            y = mod(x)
            if mode == "fwd+bwd":
                y.backward(dy)

    benchmark(fn)
