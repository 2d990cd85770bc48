"""``torch.inference_mode`` (the usual serving context) over every layer kind: calls made there, with their own
tensors (adapter ids, a routing block's ids) made there too, give the no-grad outputs; and training afterwards in
the same process works: nothing a layer keeps from a call in inference mode (adapter metadata, stacks, DoRA's
‖W‖², sparse plans and buffers, QLoRA's casts) is an inference tensor that autograd would refuse to save or an
in-place update would refuse to write."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from conftest import assert_close_report

KINDS = ["lora", "lora-dropout", "many", "many-dropout", "dora", "sparse", "rosa", "qlora", "qlora-bf16"]


def _layer(kind):
    """(layer, extra forward args as a function, input)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    p = 0.1 if kind.endswith("dropout") else 0.0
    kw = dict(r=8, lora_alpha=16, init_lora_weights=False, lora_dropout=p)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    ids = None
    if kind.startswith("lora"):
        layer = fastpeft.FastLoRALinear.from_linear(lin, **kw)
    elif kind == "dora":
        layer = fastpeft.FastLoRALinear.from_linear(lin, use_dora=True, **kw)
    elif kind.startswith("many"):
        layer = fastpeft.FastLoRALinear.from_linear(lin, **kw)
        layer.add_adapter("b", 4, 8, lora_dropout=p, init_lora_weights=False)
        for q in layer.parameters():
            q.requires_grad_(q is not layer.weight and q is not layer.bias)
        ids = [0, 1, -1, 1, 0, 0]
    elif kind in ("sparse", "rosa"):
        model = nn.Sequential(lin)
        cfg = (fastpeft.SparseDeltaConfig(density=0.05, target_modules=["0"]) if kind == "sparse" else
               fastpeft.LoraConfig(r=8, target_modules=["0"], sparse_density=0.05, init_lora_weights=False))
        fastpeft.inject(model, cfg)
        layer = model[0]
        if kind == "sparse":
            nn.init.normal_(layer.delta_values, std=0.1)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        cdt = torch.bfloat16 if kind == "qlora-bf16" else torch.float32
        base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=cdt, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=base)
        base.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        layer = fastpeft.FastLoRALinear.from_linear(base.to("cpu"), **kw)
    return layer, (lambda: (torch.tensor(ids),) if ids is not None else ()), x


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode_then_training(kind):
    layer, extra, x = _layer(kind)
    layer.eval()
    with torch.no_grad():
        want = copy.deepcopy(layer)(x, *extra())
    with torch.inference_mode():  # the layer's first call: whatever it keeps is made in inference mode
        got = layer(x, *extra())   # ids made in inference mode too
        again = layer(x, *extra())  # what the first call kept, read back
    assert_close_report(got, want, 0, 0, f"{kind} in inference mode")
    assert_close_report(again, want, 0, 0, f"{kind} in inference mode, second call")
    # the same process trains afterwards: eval-mode and train-mode steps, each with a backward
    params = [q for q in layer.parameters() if q.requires_grad]
    ref = copy.deepcopy(layer)
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        getattr(ref, mode)()
        torch.manual_seed(3)
        loss = layer(x, *extra()).float().square().mean()
        grads = torch.autograd.grad(loss, params)
        torch.manual_seed(3)
        ref_loss = ref(x, *extra()).float().square().mean()
        ref_grads = torch.autograd.grad(ref_loss, [q for q in ref.parameters() if q.requires_grad])
        assert_close_report(loss, ref_loss, 0, 0, f"{kind} {mode} loss after inference mode")
        for g, r in zip(grads, ref_grads):
            assert_close_report(g, r, 0, 0, f"{kind} {mode} gradient after inference mode")
        with torch.no_grad():
            for q in params:  # an optimizer step: in-place writes the kept values must follow
                q.add_(0.01)
            for q in ref.parameters():
                if q.requires_grad:
                    q.add_(0.01)
    layer.eval()
    ref.eval()
    with torch.inference_mode():
        got = layer(x, *extra())
    with torch.no_grad():
        want = ref(x, *extra())
    assert_close_report(got, want, 0, 0, f"{kind} in inference mode after training")


def test_routing_blocks_and_accelerated_adapter_names_in_inference_mode():
    peft = pytest.importorskip("peft")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 6)

        def forward(self, x):
            return self.lin(x)
    torch.manual_seed(0)
    pm = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(r=4, target_modules=["lin"], init_lora_weights=False))
    pm.eval()
    x = torch.randn(3, 8)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        want = pm(x, adapter_names=names)
    fastpeft.accelerate(pm)
    for _ in range(2):
        with torch.inference_mode():
            got = pm(x, adapter_names=names)
        assert_close_report(got, want, 1e-6, 1e-6, "accelerated adapter_names in inference mode")
    with torch.no_grad():
        assert_close_report(pm(x, adapter_names=names), want, 1e-6, 1e-6, "accelerated adapter_names after it")

    model = nn.Sequential(nn.Linear(8, 6))
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), adapter_name="b",
                    activate=False)
    xs = torch.randn(3, 5, 8)
    with torch.no_grad():
        want = model[0](xs, torch.tensor([0, 1, -1]))
    for _ in range(2):
        with torch.inference_mode(), fastpeft.mixed_batch(model, ["default", "b", None]):
            got = model(xs)
        assert_close_report(got, want, 0, 0, "mixed_batch entered in inference mode")
    with fastpeft.mixed_batch(model, ["default", "b", None]):  # then training through the block
        model(xs).square().mean().backward()
    assert model[0].adapter_parameters("default")[1].grad is not None  # the active one trains


@pytest.mark.parametrize("kind", KINDS)
def test_a_layer_made_in_inference_mode_serves_there(kind):
    """Parameters made in inference mode (a model built or loaded for serving inside it) are inference tensors,
    without version counters: the values kept between calls are keyed without them (recomputed every call)."""
    with torch.inference_mode():
        layer, extra, x = _layer(kind)
        layer.eval()
        ref = copy.deepcopy(layer)
        first, second = layer(x, *extra()), layer(x, *extra())
        want = ref(x, *extra())
    assert_close_report(first, want, 0, 0, f"{kind} made in inference mode")
    assert_close_report(second, want, 0, 0, f"{kind} made in inference mode, second call")
