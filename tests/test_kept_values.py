"""Values the layers keep between no-grad calls (the mixed-batch stacks, DoRA's ‖W‖² and m / n, QLoRA's casts of
fp32 adapters, ``fastpeft.accelerate``'s stacks and DoRA gain) follow the Parameters they come from: after an
optimizer step that bumps no version counter (fused AdamW, Trainer's default ``adamw_torch_fused``; bitsandbytes'
optimizers), and after a write through ``.data`` once the module switches mode (``eval()`` after training).
Each no-grad output is compared with the same layer's output with gradients on, which keeps nothing."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from conftest import assert_close_report


def _optimizer(kind, params):
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=0.05, fused=True)
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=0.05, min_8bit_size=0)


def _layer(kind):
    """(layer in eval mode, extra forward args, input)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    kw = dict(r=8, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    extra = ()
    if kind == "dora":
        layer = fastpeft.FastLoRALinear.from_linear(lin, use_dora=True, **kw)
    elif kind == "many":
        layer = fastpeft.FastLoRALinear.from_linear(lin, **kw)
        layer.add_adapter("b", 4, 8, init_lora_weights=False)
        for p in layer.parameters():
            p.requires_grad_(p is not layer.weight and p is not layer.bias)
        extra = (torch.tensor([0, 1, -1, 1, 0, 0]),)
    else:  # QLoRA on an NF4 base computing in bf16, fp32 adapters: the no-grad calls keep bf16 casts of A, B
        bnb = pytest.importorskip("bitsandbytes")
        base = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=base)
        base.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        layer = fastpeft.FastLoRALinear.from_linear(base.to("cpu"), **kw)
        x = x.bfloat16()
    return layer.eval(), extra, x


def _no_grad_and_grad(layer, x, extra):
    with torch.no_grad():
        kept = layer(x, *extra)
    fresh = layer(x, *extra).detach()  # gradients on: nothing kept is read
    return kept, fresh


@pytest.mark.parametrize("opt", ["adamw-fused", "bnb-adamw8bit"])
@pytest.mark.parametrize("kind", ["dora", "many", "qlora-bf16"])
def test_kept_values_follow_optimizer_steps_that_bump_no_version(kind, opt):
    layer, extra, x = _layer(kind)
    params = [p for p in layer.parameters() if p.requires_grad]
    optim = _optimizer(opt, params)
    kept, fresh = _no_grad_and_grad(layer, x, extra)  # the no-grad call keeps its values
    assert torch.equal(kept, fresh) or kind == "dora"
    versions = [p._version for p in params]
    before = [p.detach().clone() for p in params]
    for _ in range(2):  # in eval mode throughout: no mode switch drops anything
        layer(x, *extra).float().square().mean().backward()
        optim.step()
        optim.zero_grad()
    assert [p._version for p in params] == versions, "the optimizer bumped the versions: the test is void"
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    kept, fresh = _no_grad_and_grad(layer, x, extra)
    assert_close_report(kept.float(), fresh.float(), 1e-5, 1e-5 * float(fresh.abs().max()), f"{kind} after {opt}")


@pytest.mark.parametrize("kind", ["dora", "many", "qlora-bf16"])
def test_a_write_through_data_is_seen_at_the_next_mode_switch(kind):
    layer, extra, x = _layer(kind)
    _no_grad_and_grad(layer, x, extra)
    for p in layer.parameters():
        if p.requires_grad:
            p.data.mul_(1.5)  # no version bump
    layer.train()
    layer.eval()
    kept, fresh = _no_grad_and_grad(layer, x, extra)
    assert_close_report(kept.float(), fresh.float(), 1e-5, 1e-5 * float(fresh.abs().max()), kind)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-adapter_names", "dora"])
def test_accelerated_peft_follows_fused_adamw(use_dora):
    """A PEFT model made fast by ``fastpeft.accelerate``: its kept DoRA gain / adapter_names stacks after fused AdamW
    steps equal PEFT's own forward on a copy of the trained model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=use_dora, init_lora_weights=False))
    if not use_dora:
        model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))
    model.eval()
    fastpeft.accelerate(model)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    kw = {} if use_dora else {"adapter_names": ["default", "b", "__base__", "b"]}
    with torch.no_grad():
        model(x, **kw)  # kept
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    for _ in range(2):
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()
    with torch.no_grad():
        got = model(x, **kw)
        want = fastpeft.restore(copy.deepcopy(model))(x, **kw)
    assert_close_report(got, want, 1e-5, 1e-6, "accelerated after fused AdamW")


def test_a_no_op_mode_call_keeps_the_values():
    """``eval()`` on a layer already in eval (Trainer calls ``train()`` at every step) keeps what is kept: a captured
    CUDA graph may read it, and rebuilding DoRA's ‖W‖² each step costs a pass over W."""
    import weakref

    layer, extra, x = _layer("dora")
    _no_grad_and_grad(layer, x, extra)
    kept = weakref.ref(layer._wsq[1])
    layer.eval()
    assert kept() is not None and layer._wsq is not None
    layer.train()
    assert layer._wsq is None


def test_accelerated_adapter_names_stacks_follow_a_data_swap():
    """accelerate's kept adapter_names stacks key on the factors' data pointers too: a ``.data =`` swap (DeepSpeed
    style; no version bump, no optimizer step) is seen at the next call."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(16, 8)), peft.LoraConfig(
        r=2, target_modules=["0"], init_lora_weights=False), adapter_name="x")
    model.add_adapter("y", peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.eval()
    fastpeft.accelerate(model)
    x, kw = torch.randn(4, 16), {"adapter_names": ["x", "y", "x", "y"]}
    with torch.no_grad():
        model(x, **kw)
        lin = model.base_model.model[0].lora_A["y"]
        lin.weight.data = torch.randn_like(lin.weight) * 3
        got = model(x, **kw)
        want = fastpeft.restore(copy.deepcopy(model))(x, **kw)
    assert_close_report(got, want, 1e-5, 1e-6, "after a .data swap")


@pytest.mark.parametrize("kind", ["dora", "many", "qlora-bf16", "fp32-adapters-bf16-base"])
def test_training_mode_keeps_nothing_and_sees_data_writes(kind):
    """In training mode no-grad calls keep nothing (as PEFT, each computes afresh): a validation pass without
    ``eval()`` after a hand-written update through ``.data`` (which bumps no version) sees it at once."""
    if kind == "fp32-adapters-bf16-base":  # inject's fp32 factors on a bf16 base: the bf16 casts are what is kept
        model = fastpeft.inject(nn.Sequential(nn.Linear(64, 48)).bfloat16(), fastpeft.LoraConfig(
            r=8, target_modules=["0"], init_lora_weights=False))
        layer, extra, x = model[0], (), torch.randn(6, 64).bfloat16()
    else:
        layer, extra, x = _layer(kind)
    layer.train()
    for _ in range(2):
        with torch.no_grad():
            layer(x, *extra)
        for p in layer.parameters():
            if p.requires_grad:
                p.data.mul_(1.5)  # no version bump, no optimizer step, no mode switch
        kept, fresh = _no_grad_and_grad(layer.train(), x, extra)
        assert_close_report(kept.float(), fresh.float(), 1e-5, 1e-5 * float(fresh.abs().max()), kind)


@pytest.mark.parametrize("write", ["frozen-base-swapped", "trained-base-sgd"])
def test_dora_training_mode_sees_base_weight_data_writes(write):
    """DoRA's ‖W_j‖² was kept in training mode too, keyed on W's version: a base weight swapped through
    ``.data``, or a trained W updated by a hand-written ``p.data.add_`` step, left the norm stale (the outputs of
    the old W's norm). Now it is kept in eval mode only, as the other kept values."""
    from fastpeft.reference import dora_linear_ref
    layer, _, x = _layer("dora")
    layer.train()
    if write == "trained-base-sgd":
        layer.weight.requires_grad_(True)
    for _ in range(2):
        layer(x).sum().backward()
        with torch.no_grad():
            if write == "frozen-base-swapped":
                layer.weight.data.copy_(torch.randn_like(layer.weight))
            else:
                layer.weight.data.add_(layer.weight.grad, alpha=-0.5)
                layer.weight.grad = None
        want = dora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                               layer.lora_magnitude_vector["default"], layer.scaling, 0.0, True, None)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                got = layer(x)
            assert_close_report(got, want, 1e-5, 1e-5 * float(want.abs().max()), f"{write} grad={grad}")


@pytest.mark.parametrize("kind", ["sparse", "rosa"])
def test_kept_casts_never_outlive_their_values_memory(kind):
    """A kept cast holds on to the memory of what it was cast from: ``reselect`` / ``set_delta`` swap the values'
    ``.data`` (no version bump), and the allocator, given the old block back at once, put the new values at the
    same address, the key matched and the old delta's cast was applied after re-selection (before 2026-12-01, 1 of
    4 tries here). Every try must give the base's outputs (values zero after reselect)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16)
    if kind == "sparse":
        model = fastpeft.inject(nn.Sequential(copy.deepcopy(base)), fastpeft.SparseDeltaConfig(
            target_modules=["0"], density=0.05))
        delta = model[0]
    else:
        model = fastpeft.inject(nn.Sequential(copy.deepcopy(base)), fastpeft.LoraConfig(
            r=4, target_modules=["0"], sparse_density=0.05))
        delta = model[0].sparse_delta()
    assert delta.delta_values.dtype == torch.float32
    model.eval()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)  # zero values (and B): the base's output
        for trial in range(6):
            delta.delta_values.fill_(1.0)
            assert not torch.equal(model(x), want)  # a cast kept for the filled values
            delta.select_positions(model[0].weight)
            delta.select_positions(model[0].weight)
            assert torch.equal(model(x), want), f"try {trial}: the old values' cast was applied"


def _holds(entry_held: tuple, sources) -> bool:
    """Whether a kept value's ``held`` views share the memory of every one of ``sources`` (as they are now)."""
    ptrs = {h.untyped_storage().data_ptr() for h in entry_held if h is not None}
    return all(s.untyped_storage().data_ptr() in ptrs for s in sources)


def test_every_kept_value_holds_the_memory_it_was_built_from():
    """Each value kept between no-grad calls also holds views of what it was computed from (``ops.common.held``), so
    that a ``.data`` swap cannot hand the old block back to the allocator while the key still names its address:
    the fp32 adapters' casts, the mixed-batch stacks, DoRA's m / n and ‖W‖², and the accelerated PEFT layer's
    stacks. The ``cast_params`` case is tested by its effect above; here each site's entry is read."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(16, 12, r=4, init_lora_weights=False).eval()
    layer.add_adapter("b", 2, 2, init_lora_weights=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x, torch.tensor([0, 1, -1]))
    assert _holds(layer._stacks[3], layer._all_pairs()), "mixed-batch stacks"
    dora = fastpeft.FastLoRALinear(16, 12, r=4, use_dora=True, init_lora_weights=False).eval()
    with torch.no_grad():
        dora(x)
    gain = dora.__dict__["_dora_gain"]["gain"]
    assert _holds(gain[3], [dora.weight, dora.lora_A, dora.lora_B, dora.magnitude()]), "DoRA's m / n"
    assert _holds(dora._wsq[2], [dora.weight]), "DoRA's ‖W‖²"
    model = peft.get_peft_model(nn.Sequential(nn.Linear(16, 12)), peft.LoraConfig(r=4, target_modules=["0"],
                                                                                  init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.eval()
    fastpeft.accelerate(model, strict=True)
    peft_layer = model.base_model.model[0]
    with torch.no_grad():
        model(x, adapter_names=["default", "b", "__base__"])
    factors = [peft_layer.lora_A[n].weight for n in ("default", "b")] + [peft_layer.lora_B[n].weight
                                                                        for n in ("default", "b")]
    assert _holds(peft_layer.__dict__["_fastpeft_stacks"][3], factors), "accelerated adapter_names stacks"
