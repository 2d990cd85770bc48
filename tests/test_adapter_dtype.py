"""Adapters on a bf16 / fp16 base: ``inject`` / ``load_adapter`` make the LoRA factors and DoRA magnitudes fp32
Parameters, as PEFT's ``get_peft_model`` / ``from_pretrained`` do (``autocast_adapter_dtype=True``), and every
layer kind computes with them cast to the base's dtype, the gradients reaching the fp32 Parameters. In the base's
own dtype an update below half its rounding step is lost: DoRA's magnitude (~‖W_j‖) did not move at all under
AdamW at lr 1e-4. Errors are judged against the same model in fp32 (bf16 weights held exactly)."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.inject import adapter_configs

peft = pytest.importorskip("peft")

IN, OUT = 64, 48


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, OUT)
        self.b = nn.Linear(OUT, IN)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))  # smooth: a ReLU's kinks flip with bf16 rounding


def _base(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return Toy().to(dtype)


def _rel_err(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def _trainable(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inject_makes_fp32_adapters_like_peft_and_they_train(dtype, dora):
    cfg = dict(r=8, lora_alpha=16, target_modules=["a", "b"], use_dora=dora)
    pm = peft.get_peft_model(_base(dtype), peft.LoraConfig(**cfg))
    fm = fastpeft.inject(_base(dtype), fastpeft.LoraConfig(**cfg))
    theirs = sorted((n.split(".")[-2 if "magnitude" in n else -3], p.dtype) for n, p in _trainable(pm).items())
    ours = {p.dtype for p in _trainable(fm).values()}
    assert ours == {torch.float32} and {d for _, d in theirs} == {torch.float32}
    assert len(_trainable(fm)) == len(theirs)
    assert fm.a.weight.dtype == dtype  # the base stays as it was
    params = list(_trainable(fm).values())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        fm(torch.randn(16, IN, generator=g).to(dtype)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p, b in zip(params, before):  # every entry moves (A, B and, for DoRA, m): bf16 Parameters lost most
        assert (p != b).float().mean() > 0.9

    kept = fastpeft.inject(_base(dtype), fastpeft.LoraConfig(**cfg), autocast_adapter_dtype=False)
    assert {p.dtype for p in _trainable(kept).values()} == {dtype}


@pytest.mark.parametrize("kind", ["lora", "dora", "rosa", "dropout"])
def test_fp32_adapters_on_bf16_compute_within_2x_of_peft(kind):
    """Outputs and gradients of fp32 adapters on a bf16 base: fastpeft (the factors cast to bf16, as autocast
    casts them) against the fp32 model, at most 2x the error of PEFT (which computes the branch in fp32)."""
    kw = dict(r=8, lora_alpha=16, target_modules=["a", "b"], init_lora_weights=False)
    if kind == "dora":
        kw["use_dora"] = True
    pm = peft.get_peft_model(_base(), peft.LoraConfig(**kw))
    fm = fastpeft.inject(_base(), fastpeft.LoraConfig(**kw, sparse_density=0.05 if kind == "rosa" else 0.0,
                                                     lora_dropout=0.1 if kind == "dropout" else 0.0))
    with torch.no_grad():  # PEFT's factors (and magnitudes) into ours: the same fp32 values
        for n in ("a", "b"):
            layer, theirs = getattr(fm, n), getattr(pm.base_model.model, n)
            a, b = layer.adapter_parameters("default")
            a.copy_(theirs.lora_A["default"].weight)
            b.copy_(theirs.lora_B["default"].weight)
            if kind == "dora":
                layer.magnitude("default").copy_(theirs.lora_magnitude_vector["default"].weight)
    fm.train(kind == "dropout")
    pm.eval()
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(2)).bfloat16()

    def run(m, x, seed=3):
        torch.manual_seed(seed)
        x = x.clone().requires_grad_(True)
        y = m(x)
        y.float().square().sum().backward()
        out = {"y": y.detach(), "dx": x.grad}
        out.update({n: p.grad for n, p in _trainable(m).items()})
        m.zero_grad(set_to_none=True)
        return out
    got, ref = run(fm, x), run(copy.deepcopy(fm).float(), x.float())
    assert {n: t.dtype for n, t in got.items() if n not in ("y", "dx")} == {
        n: torch.float32 for n in got if n not in ("y", "dx")}
    if kind in ("lora", "dora"):
        want = run(pm, x)
        pref = run(copy.deepcopy(pm).float(), x.float())
        assert _rel_err(want["y"], pref["y"]) > 0  # the check below has a bf16 error to compare with
        for n in ("y", "dx"):
            assert _rel_err(got[n], ref[n]) <= 2 * _rel_err(want[n], pref[n]) + 1e-3, (n, _rel_err(got[n], ref[n]))
    for n in got:  # every gradient at bf16's resolution of the fp32 model's (dropout: the same mask, same seed)
        assert _rel_err(got[n], ref[n]) < 3e-2, (n, _rel_err(got[n], ref[n]))


def test_many_adapters_and_files_with_fp32_adapters_on_bf16(tmp_path):
    fm = fastpeft.inject(_base(), fastpeft.LoraConfig(r=4, target_modules=["a", "b"], init_lora_weights=False))
    fastpeft.inject(fm, fastpeft.LoraConfig(r=8, lora_alpha=4, target_modules=["a"], init_lora_weights=False),
                    adapter_name="two", activate=False)
    x = torch.randn(3, 5, IN).bfloat16()
    with torch.no_grad():
        with fastpeft.mixed_batch(fm, ["default", "two", None]):
            mixed = fm(x)
        singles = []
        for name in ("default", "two", None):
            fastpeft.set_adapter(fm, name)
            singles.append(fm(x))
    for i in range(3):
        torch.testing.assert_close(mixed[i], singles[i][i], rtol=1.6e-2, atol=1e-2)
    fastpeft.set_adapter(fm, "default")
    fastpeft.save_adapter(fm, tmp_path)
    loaded = fastpeft.load_adapter(_base(), tmp_path)  # fp32 in the file, fp32 Parameters: bit for bit
    for n, p in _trainable(loaded).items():
        assert p.dtype == torch.float32 and torch.equal(p, dict(fm.named_parameters())[n]), n
    pm = peft.PeftModel.from_pretrained(_base(), tmp_path)  # and PEFT reads the same fp32 tensors
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    assert adapter_configs(loaded)["default"].r == 4


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merging_fp32_adapters_into_a_bf16_weight_rounds_once_as_peft(dora):
    """W + ΔW (DoRA: (m / n)(W + sBA)) computed in fp32 and rounded once to bf16, as PEFT's merge does (rounding
    ΔW to bf16 first left 30% of the merged entries off PEFT's); unmerge gives W back to bf16's rounding."""
    kw = dict(r=8, lora_alpha=16, target_modules=["a", "b"], init_lora_weights=False, use_dora=dora)
    pm = peft.get_peft_model(_base(), peft.LoraConfig(**kw))
    fm = fastpeft.inject(_base(), fastpeft.LoraConfig(**kw))
    with torch.no_grad():
        for n in ("a", "b"):
            layer, theirs = getattr(fm, n), getattr(pm.base_model.model, n)
            a, b = layer.adapter_parameters("default")
            a.copy_(theirs.lora_A["default"].weight)
            b.copy_(theirs.lora_B["default"].weight)
            if dora:
                layer.magnitude("default").copy_(theirs.lora_magnitude_vector["default"].weight)
    w0 = fm.a.weight.detach().clone()
    pm.merge_adapter()
    for layer in fastpeft.lora_layers(fm).values():
        layer.merge()
    for n in ("a", "b"):
        ours, theirs = getattr(fm, n).weight, getattr(pm.base_model.model, n).base_layer.weight
        assert torch.equal(ours, theirs), (n, float((ours.float() - theirs.float()).abs().max()))
    fm.a.unmerge()
    torch.testing.assert_close(fm.a.weight, w0, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_sparse_delta_alone_trains_fp32_values_on_a_half_base(dtype, tmp_path):
    """SparseDeltaConfig on a bf16 / fp16 base: fp32 values, as RoSA's and PEFT's SHiRA's (before 2026-12-01 they
    stayed in the base's dtype: at 0.25, AdamW steps of 1e-4 rounded away, training silently stalled). The layer
    computes with them cast; eval calls keep the cast and see an optimizer step; files round-trip;
    autocast_adapter_dtype=False keeps the base's dtype."""
    cfg = fastpeft.SparseDeltaConfig(density=0.05, target_modules=["a", "b"])
    fm = fastpeft.inject(_base(dtype), cfg)
    values = [layer.delta_values for layer in fastpeft.sparse_layers(fm).values()]
    assert {v.dtype for v in values} == {torch.float32} and fm.a.weight.dtype == dtype
    with torch.no_grad():
        for v in values:
            v.fill_(0.25)
    before = [v.detach().clone() for v in values]
    opt = torch.optim.AdamW(values, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, IN, generator=g).to(dtype)
    for _ in range(3):
        fm(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    for v, b in zip(values, before):
        assert (v != b).float().mean() > 0.9

    def want():  # W + Δ with Δ's values cast once to the base's dtype, by hand
        with torch.no_grad():
            h = x
            for name in ("a", "b"):
                layer = getattr(fm, name)
                h = nn.functional.linear(h, layer.weight + layer.dense_delta().to(dtype), layer.bias)
                h = torch.tanh(h) if name == "a" else h
            return h

    fm.eval()
    with torch.no_grad():
        first = want()
        assert torch.equal(fm(x), first) and torch.equal(fm(x), first)  # the second call reads the kept cast
        for v in values:
            v.add_(0.5)  # an in-place update: the kept cast is rebuilt
        assert torch.equal(fm(x), want()) and not torch.equal(want(), first)
    fastpeft.save_adapter(fm, tmp_path)
    back = fastpeft.load_adapter(_base(dtype), tmp_path)
    for (n, a), (_, b) in zip(sorted(fastpeft.sparse_layers(fm).items()), sorted(fastpeft.sparse_layers(back).items())):
        assert b.delta_values.dtype == torch.float32 and torch.equal(a.delta_values, b.delta_values), n
    kept = fastpeft.inject(_base(dtype), cfg, autocast_adapter_dtype=False)
    assert {layer.delta_values.dtype for layer in fastpeft.sparse_layers(kept).values()} == {dtype}
