"""CUDA-graph capture of fastpeft layers (GPU only): a captured LoRA layer replays with the inputs copied into
its static tensors, and its dropout draws a new mask on every replay (the seed is drawn on the device while
capturing, ``fastpeft.ops.common.draw_seed``), the same mask in the captured backward as in the forward."""
from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRET,
                                                  reason="CUDA graphs need a GPU")]


def _capture(fn):
    """``(graph, outputs)``: ``fn`` warmed up on a side stream (as torch.cuda.graph requires), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


P = 0.5  # the dropout rate of the identity layer


def _identity_layer():
    """``(layer, x)``: A = B = I (r = K = N = 16), s = 1, dropout P, so y - x Wᵀ - b = drop(x); x has no zeros."""
    torch.manual_seed(0)
    k = 16
    layer = fastpeft.FastLoRALinear(k, k, r=k, lora_alpha=k, lora_dropout=P, device="cuda")
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(k))
        layer.lora_B.copy_(torch.eye(k))
    return layer, torch.rand(64, k, device="cuda") + 0.5


def _read_mask(layer, x, y):
    """The keep-mask that ``y`` (= layer(x)) applied, checked to be a dropout mask of rate ~P, and ``lora_A.grad``
    after ``y.backward(ones)`` checked to use that same mask: dA[j, k] = sum_m v[m, j] drop(x)[m, k] with
    v = dY B = 1, every row drop(x)'s column sums."""
    with torch.no_grad():
        ratio = (y - torch.nn.functional.linear(x, layer.weight, layer.bias)) / x
    keep = ratio > 1.0
    torch.testing.assert_close(ratio, keep.float() / (1 - P), atol=1e-4, rtol=1e-4)
    assert 0.3 < keep.float().mean().item() < 0.7
    expect = (keep.float() * x / (1 - P)).sum(0).expand_as(layer.lora_A)
    torch.testing.assert_close(layer.lora_A.grad, expect, atol=1e-3, rtol=1e-4)
    return keep


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dropout_redraws_its_mask_on_every_replay(backend):
    """A captured training step (``_identity_layer``) draws a new mask at every replay, and its captured backward
    sees its forward's mask."""
    layer, x = _identity_layer()

    def step():
        layer.lora_A.grad = None
        with fastpeft.use_backend(backend):
            y = layer(x)
        y.backward(torch.ones_like(y))
        return y

    graph, y = _capture(step)
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(_read_mask(layer, x, y))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2]), \
        "every replay dropped the same elements: the seed was baked into the graph"


def _eval_layer(kind):
    """A bf16 eval layer 256 -> 384, r 16, random LoRA factors: plain LoRA, DoRA, or LoRA over a bitsandbytes NF4
    (nested) base quantized on the CPU and moved to the card."""
    torch.manual_seed(0)
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False)
    if kind == "qlora":
        from fastpeft.quant import import_bitsandbytes

        try:
            bnb = import_bitsandbytes()
        except ImportError:
            pytest.skip("bitsandbytes is not installed (benchmarks/device_wheels.sh)")
        base = bnb.nn.Linear4bit(256, 384, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        base.weight = bnb.nn.Params4bit(torch.randn(384, 256) * 0.05, requires_grad=False, compress_statistics=True,
                                        quant_type="nf4", module=base)
        base = base.to("cpu").to("cuda")
        return fastpeft.FastLoRALinear.from_linear(base, **kw).eval()
    return fastpeft.FastLoRALinear(256, 384, use_dora=kind == "dora", device="cuda", dtype=torch.bfloat16,
                                   **kw).eval()


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("m", [1, 16])
def test_eval_decode_replays_new_inputs(kind, backend, m):
    """An eval decode step (no dropout) captured once gives eager's output for new inputs copied in: LoRA, DoRA
    (its cached norm read, not recomputed) and QLoRA (the packed weight dequantized inside the graph)."""
    layer = _eval_layer(kind)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)

    def step():
        with torch.no_grad(), fastpeft.use_backend(backend):
            return layer(x)

    graph, y = _capture(step)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, step())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_reduce_overhead_training_with_dropout(backend):
    """``torch.compile(mode="reduce-overhead")`` over a training step with dropout: inductor runs it under CUDA
    graphs (no cudagraph skip: the seed's draw on torch's CPU generator is partitioned out of the graph, as
    inductor's graph_partition does for CPU nodes), and every call draws a new mask, the backward seeing its
    forward's (``_read_mask``)."""
    from torch._dynamo.utils import counters

    layer, x = _identity_layer()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead")
    seen = []
    with fastpeft.use_backend(backend):
        for _ in range(5):
            torch.compiler.cudagraph_mark_step_begin()
            layer.lora_A.grad = None
            y = compiled(x)
            y.backward(torch.ones_like(y))
            torch.cuda.synchronize()
            seen.append(_read_mask(layer, x, y.detach().clone()))
    skips = dict(counters["inductor"])
    assert not any("cudagraph_skip" in key for key, n in skips.items() if n), f"CUDA graphs skipped: {skips}"
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:])), "two calls in a row dropped the same elements"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_captured_eval_of_fp32_adapters_on_a_bf16_base_follows_updates(backend):
    """``inject`` on a bf16 model makes fp32 adapters, cast to bf16 per call. Captured in eval (no grad), the cast
    runs inside the graph (``ops.common.cast_params`` keeps nothing while capturing): an in-place update of the
    fp32 factors, or a load over them, is read by the next replay, never a cast kept outside the graph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).to("cuda", torch.bfloat16)
    fastpeft.inject(model, fastpeft.LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    model.eval()
    a, b = model[0].adapter_parameters("default")
    assert a.dtype == b.dtype == torch.float32
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), fastpeft.use_backend(backend):
        graph, y = _capture(lambda: model(x))
        for step in range(2):
            b.add_(0.25)  # an optimizer step's in-place write
            graph.replay()
            torch.testing.assert_close(y, model(x), rtol=2e-2, atol=2e-2)  # b moved by 0.25: stale fails
