"""torch.func transforms (grad, vmap) over every layer kind on CPU tensors: LoRA, DoRA, many adapters per batch,
QLoRA (NF4, int8) and RoSA. Plain autograd compositions run there (the fast paths' autograd Functions define no
setup_context / vmap rule), with the mask eager draws: ``func.grad`` gives eager's gradients; per-sample
gradients (vmap over grad) add up to them without dropout; under ``vmap(randomness="different")`` each sample
draws its own mask, under ``"same"`` one for all."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastpeft
from conftest import assert_close_report


def _bnb(kind, lin):
    bnb = pytest.importorskip("bitsandbytes")
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False,
                                    threshold=0.0)
        layer.load_state_dict({"weight": lin.weight.data, "bias": lin.bias.data})
        return layer.to("cpu")
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    layer.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move


def _layer(kind, p):
    """(module in training mode, extra forward args): the layer kind with LoRA dropout p; every adapter trains."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    kw = dict(r=8, lora_alpha=16, lora_dropout=p, init_lora_weights=False)
    extra = ()
    if kind == "lora":
        mod = fastpeft.FastLoRALinear.from_linear(lin, **kw)
    elif kind == "dora":
        mod = fastpeft.FastLoRALinear.from_linear(lin, use_dora=True, **kw)
    elif kind == "rosa":
        mod = fastpeft.FastLoRALinear.from_linear(lin, sparse_density=0.05, **kw)
        with torch.no_grad():
            for v in mod.sparse_values.values():
                v.normal_(std=0.1)
    elif kind == "many":
        mod = fastpeft.FastLoRALinear.from_linear(lin, **kw)
        mod.add_adapter("b", 4, 8, lora_dropout=p / 2, init_lora_weights=False)
        for t in mod.parameters():
            t.requires_grad_(t is not mod.weight and t is not mod.bias)
        extra = (torch.tensor([0, 1, -1, 1, 0, 0]),)
    else:
        mod = fastpeft.FastLoRALinear.from_linear(_bnb(kind, lin), **kw)
    return mod.train(), extra


KINDS = ["lora", "dora", "many", "rosa", "nf4", "int8"]


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_equals_eager_and_per_sample_grads_add_up(kind, p):
    mod, extra = _layer(kind, p)
    params = {k: v.detach() for k, v in mod.named_parameters() if v.requires_grad}
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))

    def loss(params, x, *extra):
        return functional_call(mod, params, (x, *extra)).square().sum()

    torch.manual_seed(5)  # the seed drawn inside: the same in both
    got = grad(loss)(params, x, *extra)
    torch.manual_seed(5)
    mod.zero_grad(set_to_none=True)
    loss(dict(mod.named_parameters()), x, *extra).backward()
    for name, t in mod.named_parameters():
        if t.requires_grad:
            # DoRA: the exact tiled norm there, the factored one in eager; QLoRA: another order of the same products
            tol = 1e-6 if kind in ("lora", "many", "rosa") else 1e-5
            assert_close_report(got[name], t.grad, tol, tol * float(t.grad.abs().max()), f"{kind} {name}")
    per_sample = vmap(grad(loss), in_dims=(None, 0) + (0,) * len(extra), randomness="same")(
        params, x[:, None], *(e[:, None] for e in extra))
    for name, g in per_sample.items():
        assert g.shape == (6, *params[name].shape), name
        if p == 0.0:
            assert_close_report(g.sum(0), got[name], 1e-5, 1e-6 * float(got[name].abs().max()), f"{kind} Σ {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_randomness_different_draws_a_mask_per_sample(kind):
    """Six copies of one sample: under randomness="same" every per-sample gradient is the same; under "different"
    each sample's own mask (its own seed, a batched tensor) gives each its own gradient."""
    mod, extra = _layer(kind, 0.5)
    params = {k: v.detach() for k, v in mod.named_parameters() if v.requires_grad}
    name = next(k for k in params if "lora_A" in k)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).expand(6, 64)
    ids = (torch.zeros(6, dtype=torch.int64),) if extra else ()  # every row on adapter 0: rate 0.5

    def loss(params, x, *ids):
        return functional_call(mod, params, (x, *ids)).square().sum()

    for randomness in ("same", "different"):
        g = vmap(grad(loss), in_dims=(None, 0) + (0,) * len(ids), randomness=randomness)(
            params, x[:, None], *(i[:, None] for i in ids))[name]
        # the same mask: equal to the batched products' rounding; another mask: half of x's elements differ
        equal = [torch.allclose(g[0], g[i], rtol=1e-5, atol=1e-5 * float(g.abs().max())) for i in range(1, 6)]
        if randomness == "same":
            assert all(equal), f"{kind}: one mask for all samples, yet the gradients differ"
        else:
            assert not any(equal), f"{kind}: a mask per sample, yet samples 0 and {equal.index(True) + 1} agree"


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_accelerated_peft_model(use_dora):
    """A PEFT model made fast by ``fastpeft.accelerate``: func.grad equals eager's gradients, with dropout, and
    per-sample gradients run with a mask per sample."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["0", "2"],
                                                    use_dora=use_dora, init_lora_weights=False)).train()
    assert fastpeft.accelerate(pm).patched
    params = {k: v.detach() for k, v in pm.named_parameters() if v.requires_grad}
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))

    def loss(params, x):
        return functional_call(pm, params, (x,)).square().sum()

    torch.manual_seed(3)
    got = grad(loss)(params, x)
    torch.manual_seed(3)
    loss(dict(pm.named_parameters()), x).backward()
    for name, t in pm.named_parameters():
        if t.requires_grad:
            assert_close_report(got[name], t.grad, 1e-5, 1e-5 * float(t.grad.abs().max()), name)
    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="different")(params, x[:, None])
    assert all(g.shape == (5, *params[k].shape) for k, g in per_sample.items())


@pytest.mark.parametrize("kind", ["lora", "dora", "many", "rosa"])
def test_model_ensembling_vmap_over_stacked_parameters(kind):
    """torch.func's ensembling recipe (``stack_module_state`` + vmap over the parameters, W included): batched
    weights reach the layers' caches (keyed on data pointers: skipped under transforms) and DoRA's norm (A, B
    batched, W not: no in-place add of a batched term into an unbatched one). Equal to each model run alone.
    (Not QLoRA: a stack of packed 4-bit weights has no quant state.)"""
    from torch.func import stack_module_state

    models = []
    for seed in range(3):
        mod, extra = _layer(kind, 0.0)
        with torch.no_grad():  # the same base, other adapters
            torch.manual_seed(10 + seed)
            for name, t in mod.named_parameters():
                if t.requires_grad:
                    t.normal_(std=0.2)
        models.append(mod.eval())
    params, buffers = stack_module_state(models)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    got = vmap(lambda p, b: functional_call(models[0], (p, b), (x, *extra)))(params, buffers)
    with torch.no_grad():
        want = torch.stack([m(x, *extra) for m in models])
    assert_close_report(got, want, 1e-5, 1e-5 * float(want.abs().max()), kind)


def test_dora_grad_of_the_base_weight_too():
    """func.grad over every parameter of a DoRA layer, W and b included (W then functorch-wrapped: ‖W‖²'s cache is
    skipped), equals eager's."""
    mod, _ = _layer("dora", 0.0)
    mod.weight.requires_grad_(True)
    mod.bias.requires_grad_(True)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    got = grad(lambda p: functional_call(mod, p, (x,)).square().sum())(params)
    functional_call(mod, dict(mod.named_parameters()), (x,)).square().sum().backward()
    for name, t in mod.named_parameters():
        assert_close_report(got[name], t.grad, 1e-5, 1e-5 * float(t.grad.abs().max()), name)


def test_triton_backend_refused_by_name_and_auto_takes_the_compositions():
    """Under a transform an explicit backend="triton" raises, naming torch.func (its Functions have no setup_context),
    whatever the op; "auto" resolves to the reference backend's compositions."""
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*s, generator=g) for s in ((3, 16), (8, 16), (4, 16), (8, 4)))
    m = torch.ones(8)
    calls = {"lora_linear": lambda a, backend: fastpeft.lora_linear(x, w, None, a, b, 2.0, backend=backend),
             "dora_linear": lambda a, backend: fastpeft.dora_linear(x, w, None, a, b, m, 2.0, backend=backend)}
    for op, fn in calls.items():
        with pytest.raises(RuntimeError, match=f"backend 'triton' cannot run {op} under torch.func"):
            grad(lambda a: fn(a, "triton").sum())(a)
        got = grad(lambda a: fn(a, "auto").sum())(a)
        a_ = a.clone().requires_grad_()
        fn(a_, "auto").sum().backward()
        assert_close_report(got, a_.grad, 1e-5, 1e-6, op)


def test_compiled_func_grad_over_dora():
    """``torch.compile(func.grad(loss))`` over a DoRA layer: the norm's fallback is traced without torch.cond there
    (cond has no rule under a functorch grad level); the gradients equal eager's."""
    mod, _ = _layer("dora", 0.0)
    params = {k: v.detach() for k, v in mod.named_parameters() if v.requires_grad}
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))

    def loss(p, x):
        return functional_call(mod, p, (x,)).square().sum()
    torch._dynamo.reset()
    got = torch.compile(grad(loss), backend="aot_eager")(params, x)
    want = grad(loss)(params, x)
    for name in params:
        assert_close_report(got[name], want[name], 1e-5, 1e-5 * float(want[name].abs().max()), name)
