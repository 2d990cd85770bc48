"""LoRA on a mixture of experts' expert weights (PEFT's ``target_parameters``): ``lora_grouped_linear_ref`` against
a per-row formula, the grouped_mm form against the loop, ``lora_experts`` and ``fastpeft.accelerate`` against PEFT's
``ParamWrapper`` (outputs and every gradient) on tiny Qwen3-MoE and gpt-oss models built from configs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.ops import experts as OE
from fastpeft.reference import lora_grouped_linear_ref
from conftest import assert_close_report

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
VOCAB = 97
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
needs_grouped_mm = pytest.mark.skipif(not hasattr(F, "grouped_mm"),
                                      reason="torch.nn.functional.grouped_mm: torch>=2.10")


def per_row(x, weight, bias, sizes, factors, transposed):
    """The oracle's oracle: every row on its own, in fp64."""
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    rows = []
    for m, e in enumerate(ids.tolist()):
        w = weight[e].double()
        y = x[m].double() @ (w if transposed else w.t())
        if bias is not None:
            y = y + bias[e].double()
        for a, b, s in factors:
            y = y + s * (x[m].double() @ a[e].double().t()) @ b[e].double().t()
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, weight.shape[2 if transposed else 1]).double()


def grouped_inputs(g, sizes, k, n, ranks, transposed, bias, dtype):
    e = len(sizes)
    x = torch.randn(sum(sizes), k, generator=g).to(dtype)
    w = (torch.randn(e, k, n, generator=g) if transposed else torch.randn(e, n, k, generator=g)) / k ** 0.5
    b = torch.randn(e, n, generator=g) if bias else None
    factors = [(torch.randn(e, r, k, generator=g) / k ** 0.5, torch.randn(e, n, r, generator=g) / r ** 0.5, 0.5 + i)
               for i, r in enumerate(ranks)]
    cast = [(a.to(dtype), bb.to(dtype), s) for a, bb, s in factors]
    return x, w.to(dtype), None if b is None else b.to(dtype), cast


CASES = [((3, 0, 5, 1), 48, 80, (8,), False, True), ((7,), 130, 48, (1, 16), True, False),
         ((0, 0, 33, 0, 2), 80, 48, (24,), False, False), ((0, 0), 48, 80, (8,), True, True),
         ((1, 2, 3, 4, 5, 6), 48, 130, (), True, True)]


@pytest.mark.parametrize("sizes,k,n,ranks,transposed,bias", CASES,
                         ids=[f"g{'-'.join(map(str, c[0]))}-K{c[1]}-N{c[2]}-r{'+'.join(map(str, c[3])) or 0}"
                              f"{'-T' if c[4] else ''}{'-bias' if c[5] else ''}" for c in CASES])
def test_grouped_ref_matches_per_row(sizes, k, n, ranks, transposed, bias):
    g = torch.Generator().manual_seed(0)
    x, w, b, factors = grouped_inputs(g, sizes, k, n, ranks, transposed, bias, torch.float32)
    x.requires_grad_()
    leaves = [x] + [t.requires_grad_() for a, bb, _ in factors for t in (a, bb)]
    y = lora_grouped_linear_ref(x, w, b, sizes, [f[0] for f in factors], [f[1] for f in factors],
                                [f[2] for f in factors], transposed=transposed)
    x64 = x.detach().double().requires_grad_()
    f64 = [(a.detach().double().requires_grad_(), bb.detach().double().requires_grad_(), s) for a, bb, s in factors]
    want = per_row(x64, w, b, sizes, f64, transposed)
    assert y.shape == want.shape
    assert_close_report(y.double(), want, rtol=1e-5, atol=1e-5, what="y")
    if y.numel():
        dy = torch.randn(y.shape, generator=g)
        got = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        ref = torch.autograd.grad(want, [x64] + [t for a, bb, _ in f64 for t in (a, bb)], dy.double(),
                                  allow_unused=True)
        for i, (a, b_) in enumerate(zip(got, ref)):
            if b_ is None:
                assert a is None or not a.any()
            else:
                assert_close_report(a.double(), b_, rtol=1e-5, atol=1e-5, what=f"grad {i}")


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W-out-in", "W-in-out"])
def test_grouped_mm_form_matches_loop(dtype, transposed):
    """The CUDA form (``F.grouped_mm``, run here on the CPU) gives the loop's outputs and gradients, the factors in
    PEFT's layout (B a permuted view)."""
    g = torch.Generator().manual_seed(1)
    sizes, k, n, r = [3, 0, 5, 1, 0, 7], 48, 80, 8
    x, w, b, _ = grouped_inputs(g, sizes, k, n, (), transposed, True, dtype)
    e = len(sizes)
    a_flat = (torch.randn(e * r, k, generator=g) / k ** 0.5).to(dtype).requires_grad_()
    b_flat = (torch.randn(n, r * e, generator=g) / r ** 0.5).to(dtype).requires_grad_()
    factors = [(a_flat.view(e, r, k), b_flat.view(n, r, e).permute(2, 0, 1), 2.0)]
    ids = torch.repeat_interleave(torch.arange(e), torch.tensor(sizes))
    outs = {}
    for form in OE.FORMS:
        groups = OE.Groups(ids.view(-1, 1), e, form, check_ids=True)
        xi = x.detach().clone().requires_grad_()
        y = groups.project(xi, w, b, factors, transposed)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        outs[form] = (y, *torch.autograd.grad(y, (xi, a_flat, b_flat), dy))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for i, (a, b_) in enumerate(zip(outs["loop"], outs["grouped_mm"])):
        assert_close_report(b_.float(), a.float(), what=["y", "dx", "dA", "dB"][i], **tol)


# ---- models ------------------------------------------------------------------------------------------------------
def qwen3_moe():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, vocab_size=VOCAB)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=VOCAB)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "experts" in n and "bias" in n:  # (initialised to 0: a wrong bias would not show)
                p.normal_(std=0.1)
    return m


MODELS = {"qwen3-moe": qwen3_moe, "gpt-oss": gpt_oss}


@pytest.fixture(scope="module", params=list(MODELS))
def moe_base(request):
    return request.param, MODELS[request.param]()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))


def lora_model(base, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": TARGETS, "init_lora_weights": False,
          **kw}
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), grads(model)


def assert_same_step(a, b, rtol=1e-5, atol=1e-6):
    assert_close_report(a[0], b[0], rtol=rtol, atol=atol, what="logits")
    assert a[1].keys() == b[1].keys() and a[1]
    for n in a[1]:
        assert_close_report(a[1][n], b[1][n], rtol=rtol, atol=atol, what=n)


def test_accelerate_matches_peft(moe_base, ids):
    """Logits and every gradient (the LoRA factors of both projections, q_proj's beside them) equal PEFT's, and
    every call of the expert layers ran on fastpeft's path."""
    _, base = moe_base
    model = lora_model(base, target_modules=["q_proj"])
    want = step(model, ids)
    report = fastpeft.accelerate(model)
    assert not report.skipped and len(report.patched) == 2 * 2 + 2  # (q_proj, and two wrappers a layer)
    got = step(model, ids)
    assert_same_step(got, want)
    assert report.calls() == {"fastpeft": 2 + 2}  # the outermost wrapper of each layer, and q_proj
    wrapper = peft.tuners.lora.layer.ParamWrapper
    kinds = [type(m) is wrapper for m in model.modules() if isinstance(m, wrapper)]
    assert sorted(kinds) == [False, False, True, True]  # the outermost accelerated, the inner ones PEFT's
    fastpeft.restore(model)
    assert all(type(m) is wrapper for m in model.modules() if isinstance(m, wrapper))
    assert_same_step(step(model, ids), want)


def test_accelerate_training_steps_match_peft(moe_base, ids):
    """Three AdamW steps through the accelerated model follow PEFT's to float rounding."""
    _, base = moe_base
    models = [lora_model(base), lora_model(base)]
    fastpeft.accelerate(models[1])
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for _ in range(3):
        outs = []
        for m, opt in zip(models, opts):
            outs.append(step(m, ids))
            opt.step()
        assert_same_step(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_accelerate_one_parameter_and_two_adapters(moe_base, ids):
    """LoRA on down_proj alone (one wrapper), then a second adapter summed with it (PEFT's several active adapters
    add their deltas), then the first alone again (set_adapter), then disabled: PEFT's outputs each time."""
    _, base = moe_base
    model = lora_model(base, target_parameters=["mlp.experts.down_proj"])
    twin = lora_model(base, target_parameters=["mlp.experts.down_proj"])
    for m in (model, twin):
        torch.manual_seed(5)
        m.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=[],
                                               target_parameters=["mlp.experts.down_proj"], init_lora_weights=False))
    report = fastpeft.accelerate(twin)
    assert len(report.patched) == 2
    assert_same_step(step(twin, ids), step(model, ids))
    for m in (model, twin):
        m.base_model.set_adapter(["default", "other"])
    assert_same_step(step(twin, ids), step(model, ids))
    with twin.disable_adapter(), model.disable_adapter():
        assert_close_report(twin(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6, what="disabled")
    calls = report.calls()
    assert calls["fastpeft"] == 4 and calls["adapters disabled"] == 2


def test_adapters_added_and_loaded_after_accelerate(moe_base, ids, tmp_path):
    """PEFT's add_adapter / load_adapter of another target_parameters adapter work on an accelerated model (PEFT finds
    its wrappers by class name), the new adapter runs on fastpeft's ops (report updated), alone and summed with the
    first: PEFT's outputs and gradients."""
    _, base = moe_base
    second = dict(r=2, lora_alpha=6, target_modules=[], target_parameters=TARGETS, init_lora_weights=False)
    model, twin = lora_model(base), lora_model(base)
    report = fastpeft.accelerate(twin)
    for m in (model, twin):
        torch.manual_seed(7)
        m.add_adapter("b", peft.LoraConfig(**second))
    for active in (["b"], ["default", "b"]):
        for m in (model, twin):
            m.base_model.set_adapter(active)
        assert_same_step(step(twin, ids), step(model, ids))
    assert report.calls() == {"fastpeft": 4}
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b")
    again = lora_model(base)
    report = fastpeft.accelerate(again)
    again.load_adapter(tmp_path / "b", adapter_name="b")
    again.set_adapter("b")
    with torch.no_grad():
        assert_close_report(again(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-6, what="loaded b")
    assert report.calls() == {"fastpeft": 2}


def routed(seed=3, tokens=11):
    """A tiny Qwen3-MoE's first experts module and a batch routed to it: (experts, x, top_k_index, top_k_weights, g)."""
    experts = qwen3_moe().model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g)
    return experts, x, torch.randint(0, 8, (tokens, 2), generator=g), torch.rand(tokens, 2, generator=g), g


def test_loop_and_grouped_mm_forms_agree_under_autocast():
    """Both forms compute in the expert weights' dtype (transformers' grouped_mm semantics), autocast on or off, so
    the precision does not depend on the number of rows that picks the form."""
    experts, x, index, weights, g = routed()
    ad = {"down_proj": [(torch.randn(8, 4, 24, generator=g), torch.randn(8, 32, 4, generator=g), 2.0)]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [fastpeft.lora_experts(experts, x, index, weights, ad, form=form) for form in OE.FORMS]
    assert outs[0].dtype == torch.float32
    assert_close_report(outs[1], outs[0], rtol=1e-5, atol=1e-6, what="grouped_mm vs loop under autocast")


def test_lora_experts_many_adapters_per_token():
    """``adapter_ids``: each token gets only its adapter's terms (None: an adapter without that weight; -1: none),
    both forms, the output and every gradient as each token computed alone with its own adapter."""
    base = qwen3_moe()
    experts = base.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(5)

    def terms(k, n, r, s):
        return (torch.randn(8, r, k, generator=g) / k ** 0.5, torch.randn(8, n, r, generator=g) / r ** 0.5, s)
    adapters = {"gate_up_proj": [terms(32, 48, 4, 0.5), terms(32, 48, 8, 2.0)],
                "down_proj": [terms(24, 32, 4, 0.5), None]}
    leaves = [t for terms_ in adapters.values() for term in terms_ if term is not None for t in term[:2]]
    for t in leaves:
        t.requires_grad_()
    x = torch.randn(13, 32, generator=g, requires_grad=True)
    index = torch.randint(0, 8, (13, 2), generator=g)
    weights = torch.rand(13, 2, generator=g)
    aid = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0, 1, 1, 0, -1])
    dy = torch.randn(13, 32, generator=g)
    rows = []
    for t in range(13):
        j = int(aid[t])
        own = {} if j < 0 else {p: [terms_[j]] for p, terms_ in adapters.items() if terms_[j] is not None}
        rows.append(fastpeft.lora_experts(experts, x[t:t + 1], index[t:t + 1], weights[t:t + 1], own, form="loop"))
    want = torch.cat(rows)
    want_grads = torch.autograd.grad(want, [x] + leaves, dy)
    for form in OE.FORMS:
        y = fastpeft.lora_experts(experts, x, index, weights, adapters, form=form, adapter_ids=aid)
        assert_close_report(y, want, rtol=1e-5, atol=1e-6, what=f"{form}: y")
        for i, (a, b) in enumerate(zip(torch.autograd.grad(y, [x] + leaves, dy), want_grads)):
            assert_close_report(a, b, rtol=1e-5, atol=1e-6, what=f"{form}: grad {i}")


def test_accelerate_serves_adapter_names_batches(moe_base, ids):
    """PEFT refuses ``adapter_names`` on its ParamWrapper; accelerated, a mixed batch (and ``generate`` with it) gives
    each sequence what its adapter alone gives, "__base__" the base model's."""
    _, base = moe_base
    model = lora_model(base)
    torch.manual_seed(3)
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=TARGETS,
                                           init_lora_weights=False))
    model.eval()
    names = ["default", "b", "__base__"]
    with pytest.raises(ValueError, match="does not support mixed adapter batches"):
        copy.deepcopy(model)(ids, adapter_names=names)  # (a copy: PEFT leaves its name hooks on after the error)
    want, gen = [], []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n == "__base__":
                with model.disable_adapter():
                    want.append(model(ids[i:i + 1]).logits)
                    gen.append(model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False))
            else:
                model.set_adapter(n)
                want.append(model(ids[i:i + 1]).logits)
                gen.append(model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False))
    report = fastpeft.accelerate(model)
    with torch.no_grad():
        assert_close_report(model(ids, adapter_names=names).logits, torch.cat(want), rtol=1e-5, atol=1e-6,
                            what="mixed batch")
        out = model.generate(ids, adapter_names=names, max_new_tokens=4, do_sample=False)
        bases = model(ids[2:], adapter_names=["__base__"]).logits  # (base rows only: PEFT's forward would refuse)
    assert torch.equal(out, torch.cat(gen))
    assert_close_report(bases, want[2], rtol=1e-5, atol=1e-6, what="__base__ only")
    assert set(report.calls()) == {"fastpeft"}


def test_accelerate_bf16_as_accurate_as_peft(ids):
    """bf16 weights: PEFT rounds W + sBA to bf16, fastpeft keeps the update apart; both are as close to the fp64
    model's logits (measured: 0.0105 and 0.0105 of 0.43 on Qwen3-MoE, 0.0031 and 0.0027 of 0.40 on gpt-oss)."""
    base = qwen3_moe()
    model = lora_model(base)
    exact = copy.deepcopy(model).double()
    for m in exact.modules():  # (transformers' grouped_mm has no fp64 kernel: the eager loop)
        if hasattr(m, "config"):
            m.config._experts_implementation = "eager"
    want = exact(ids).logits
    fast = copy.deepcopy(model).to(torch.bfloat16)
    slow = copy.deepcopy(model).to(torch.bfloat16)
    fastpeft.accelerate(fast)
    with torch.no_grad():
        err_fast = (fast(ids).logits.double() - want).abs().max().item()
        err_peft = (slow(ids).logits.double() - want).abs().max().item()
    assert err_fast <= 1.5 * err_peft, (err_fast, err_peft)


def test_merge_save_load_unchanged(moe_base, ids, tmp_path):
    """PEFT's merge_and_unload and save / load of an accelerated model give what PEFT's give."""
    _, base = moe_base
    model = lora_model(base)
    fastpeft.accelerate(model)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    fastpeft.accelerate(loaded)
    with torch.no_grad():
        assert_close_report(loaded(ids).logits, want, rtol=1e-5, atol=1e-6, what="loaded")
        merged = model.merge_and_unload()
        assert_close_report(merged(ids).logits, want, rtol=1e-4, atol=1e-5, what="merged")


def test_fallbacks(ids):
    """Calls fastpeft does not compute run PEFT's forward, counted by reason: hooks on the experts module, a merged
    adapter; torch.compile traces PEFT's forward (the loop reads group sizes on the host)."""
    base = qwen3_moe()
    model = lora_model(base)
    report = fastpeft.accelerate(model)
    with torch.no_grad():
        want = model(ids).logits
    experts = model.base_model.model.model.layers[0].mlp.experts.base_layer.base_layer
    handle = experts.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        assert_close_report(model(ids).logits, want, rtol=1e-5, atol=1e-6, what="hooked")
    handle.remove()
    assert report.calls()["hooks on the experts module or an inner ParamWrapper"] == 1
    model.base_model.merge_adapter()
    with torch.no_grad():
        assert_close_report(model(ids).logits, want, rtol=1e-4, atol=1e-5, what="merged")
    model.base_model.unmerge_adapter()
    assert report.calls()["merged adapters"] == 2


def test_not_an_experts_module_is_skipped():
    """target_parameters on a plain nn.Linear's weight (2-D: PEFT's ParamWrapper over a Linear) stays on PEFT."""
    base = qwen3_moe()
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=[], target_parameters=["self_attn.q_proj.weight"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="found nothing"):
        report = fastpeft.accelerate(model)
    assert len(report.skipped) == 2 and all("not a transformers experts module" in w for w in report.skipped.values())
    with pytest.raises(ValueError, match="would stay on PEFT"):
        fastpeft.accelerate(model, strict=True)


def test_lora_experts_functional_matches_module():
    """``fastpeft.lora_experts`` without adapters is the experts module's own forward (any implementation)."""
    experts, x, index, weights, _ = routed()
    assert_close_report(fastpeft.lora_experts(experts, x, index, weights), experts(x, index, weights), rtol=1e-5,
                        atol=1e-6, what="no adapter")
    with pytest.raises(ValueError, match=r"top_k_index must hold expert ids in \[0, 8\)"):
        fastpeft.lora_experts(experts, x, index + 1, weights)


@pytest.mark.gpu
@needs_grouped_mm
def test_grouped_mm_form_on_the_card():
    """On a card (bf16, aligned): ``pick_form`` takes grouped_mm (no host sync), and it gives what the loop gives
    there, within twice the loop's own error against an fp32 loop (y and every gradient)."""
    g = torch.Generator().manual_seed(4)
    sizes, k, n, r = [300, 0, 17, 1, 129, 64, 0, 8], 256, 384, 16
    e = len(sizes)
    x, w, b, _ = grouped_inputs(g, sizes, k, n, (), False, True, torch.float32)
    a = torch.randn(e, r, k, generator=g) / k ** 0.5
    bb = torch.randn(e, n, r, generator=g) / r ** 0.5
    ids = torch.repeat_interleave(torch.arange(e), torch.tensor(sizes)).view(-1, 1).cuda()
    dy = torch.randn(sum(sizes), n, generator=g).cuda()
    res = {}
    for form, dt in (("loop", torch.float32), ("loop", torch.bfloat16), ("grouped_mm", torch.bfloat16)):
        xi, ai, bi = (t.cuda().to(dt).requires_grad_() for t in (x, a, bb))
        wi, bias = w.cuda().to(dt), b.cuda().to(dt)
        if form == "grouped_mm":
            assert OE.pick_form(xi, [wi], [(ai, bi, 2.0)], sum(sizes), e) == "grouped_mm"
        y = OE.Groups(ids, e, form, check_ids=True).project(xi, wi, bias, [(ai, bi, 2.0)], False)
        res[form, dt] = [t.float() for t in (y, *torch.autograd.grad(y, (xi, ai, bi), dy.to(dt)))]
    for i, (want, loop, fused) in enumerate(zip(*(res[key] for key in res))):
        own = (loop - want).abs().max().item()
        assert (fused - want).abs().max().item() <= 2 * own + 1e-3, (["y", "dx", "dA", "dB"][i], own)


def test_compiled_bf16_model_runs_the_grouped_form(monkeypatch, ids):
    """Under torch.compile a bf16 model's expert layers run lora_experts' grouped_mm form (no host sync; inductor
    lowers grouped_mm for bf16): PEFT's parametrization is never entered, and against the fp32 model the compiled
    logits and gradients are within twice the eager accelerated model's own bf16 error (measured: the same on the
    logits, 1.0-1.8x on the gradients, layer 0's 11-19 % eager, PEFT's too). An fp32 model traces PEFT's forward
    instead (its outputs)."""
    from peft.tuners.lora.layer import ParamWrapper

    torch._dynamo.reset()
    model32 = lora_model(qwen3_moe(), r=8)  # (rank 8: bf16 rows of 16 bytes, as grouped_mm needs)
    exact = step(model32, ids)
    model = copy.deepcopy(model32).to(torch.bfloat16)
    fastpeft.accelerate(model)
    eager = step(model, ids)

    def refuse(*a, **k):
        raise AssertionError("PEFT's forward ran")
    with monkeypatch.context() as m:
        m.setattr(ParamWrapper, "_activate_lora", refuse)
        fn = torch.compile(model)
        logits, grads_ = step(fn, ids)
        with torch.no_grad():  # (frozen factors: inductor laid B's copy out as its permuted view, grouped_mm refused)
            served = fn(ids).logits
    compiled = (logits, {n.replace("_orig_mod.", ""): g for n, g in grads_.items()})
    assert ((served.float() - eager[0].float()).norm() / eager[0].float().norm()).item() < 2e-2

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert compiled[1].keys() == exact[1].keys()
    for what, got, own, want in [("logits", compiled[0], eager[0], exact[0])] + [
            (n, compiled[1][n], eager[1][n], exact[1][n]) for n in exact[1]]:
        assert rel(got, want) <= 2 * rel(own, want) + 1e-3, (what, rel(got, want), rel(own, want))
    torch._dynamo.reset()
    fastpeft.accelerate(model32)
    logits, grads_ = step(torch.compile(model32), ids)
    assert_same_step((logits, {n.replace("_orig_mod.", ""): g for n, g in grads_.items()}), exact, rtol=1e-4,
                     atol=1e-5)
    torch._dynamo.reset()
