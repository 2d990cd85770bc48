"""Many adapters per layer and per batch: the registry, stacked storage, per-row routing against a
row-by-row loop, gradients on mixed batches, and model-level routing with mixed_batch (also inside
transformers' generate)."""
import copy

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft import FastLoRALinear, LoraConfig
from test_inject import Toy

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _layer(dtype=torch.float32, ranks=(4, 1, 8), alphas=(8, 3, 4)):
    torch.manual_seed(0)
    layer = FastLoRALinear(48, 40, r=ranks[0], lora_alpha=alphas[0], init_lora_weights=False, dtype=dtype)
    for i, (r, a) in enumerate(zip(ranks[1:], alphas[1:])):
        layer.add_adapter(f"a{i + 1}", r, a, use_rslora=i == 0, init_lora_weights=False)
    return layer.eval()


def _row_by_row(layer, x, ids):
    """Each row alone, through set_adapter: the oracle for routing."""
    active = layer.active_adapter
    x2, ids2 = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    rows = []
    for m in range(x2.shape[0]):
        i = int(ids2[m])
        layer.set_adapter(layer.adapter_names[i] if i >= 0 else None)
        rows.append(layer(x2[m:m + 1]))
    layer.set_adapter(active)
    return torch.cat(rows).view(*x.shape[:-1], -1)


def test_registry_and_stacked_storage():
    layer = _layer()
    assert layer.adapter_names == ["default", "a1", "a2"] and layer.active_adapter == "default"
    stack_a, stack_b = layer.stacked()
    assert stack_a.shape == (3, 8, 48) and stack_b.shape == (3, 40, 8)
    for i, name in enumerate(layer.adapter_names):
        a, b = layer.adapter_parameters(name)
        r = layer.adapter_spec(name).r
        assert a.shape == (r, 48) and b.shape == (40, r)
        assert torch.equal(stack_a[i, :r], a) and torch.equal(stack_b[i, :, :r], b)
        assert torch.count_nonzero(stack_a[i, r:]) == 0 and torch.count_nonzero(stack_b[i, :, r:]) == 0
    assert layer.stacked()[0] is stack_a  # cached while no Parameter changes
    # An in-place update of a Parameter (an optimizer step) shows in the next stacks.
    with torch.no_grad():
        layer.adapter_parameters("a1")[0].add_(1.0)
    assert torch.equal(layer.stacked()[0][1, :1], layer.adapter_parameters("a1")[0])
    # So does a Parameter replaced by another object (as FSDP2 swaps its own in).
    layer.lora_B_adapters["a2"] = nn.Parameter(torch.randn(40, 8))
    assert torch.equal(layer.stacked()[1][2], layer.lora_B_adapters["a2"])
    # Adding a larger rank keeps the Parameter objects and their values.
    a_default = layer.lora_A
    before = a_default.detach().clone()
    layer.add_adapter("big", 16, 16)
    assert layer.stacked()[0].shape == (4, 16, 48) and layer.lora_A is a_default
    assert torch.equal(a_default, before) and torch.equal(layer.stacked()[0][0, :4], a_default)
    layer.delete_adapter("a1")
    assert layer.adapter_names == ["default", "a2", "big"] and layer.stacked()[0].shape == (3, 16, 48)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a2", 4, 4)
    with pytest.raises(ValueError, match="'nope' is not in this layer"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="r must be a positive int"):
        layer.add_adapter("bad", 0, 4)


def test_set_adapter_trains_only_the_active_one():
    layer = _layer()
    layer.set_adapter("a2")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == \
        {"lora_A_adapters.a2", "lora_B_adapters.a2"}
    assert layer.r == 8 and layer.scaling == 0.5
    layer.delete_adapter("a2")
    assert layer.active_adapter is None
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dt", list(DTYPES))
def test_per_row_ids_match_row_by_row(dt):
    layer = _layer(DTYPES[dt])
    x = torch.randn(2, 7, 48, dtype=DTYPES[dt])
    ids = torch.randint(-1, 3, (2, 7))
    ids[0, 0], ids[1, 1] = -1, 2
    got = layer(x, adapter_ids=ids)
    tol = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[dt]
    torch.testing.assert_close(got, _row_by_row(layer, x, ids), rtol=tol, atol=tol)


def test_per_sequence_ids_and_every_row_its_own_adapter():
    layer = _layer()
    x = torch.randn(3, 5, 48)
    seq = torch.tensor([2, -1, 0])
    torch.testing.assert_close(layer(x, adapter_ids=seq), _row_by_row(layer, x, seq.view(3, 1).expand(3, 5)))
    names = [f"x{i}" for i in range(6)]
    for i, n in enumerate(names):
        layer.add_adapter(n, 1 + i, 2.0 + i, init_lora_weights=False)
    x = torch.randn(9, 48)
    ids = torch.arange(9)  # every row a different adapter
    torch.testing.assert_close(layer(x, adapter_ids=ids), _row_by_row(layer, x, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids,exc,msg", [
    (torch.tensor([0, 3, 1]), ValueError, r"adapter_ids must be in \[-1, 2\]"),
    (torch.tensor([0, -2, 1]), ValueError, r"adapter_ids must be in \[-1, 2\]"),
    (torch.tensor([[0, 1, 1]]), ValueError, r"adapter_ids must have shape \(3,\)"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, "int64/int32"),
], ids=["too-big", "below-minus-one", "wrong-shape", "float"])
def test_bad_ids(ids, exc, msg):
    with pytest.raises(exc, match=msg):
        _layer()(torch.randn(3, 48), adapter_ids=ids)


def test_functional_multi_bad_arguments():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    a, b, s = torch.randn(2, 4, 16), torch.randn(2, 8, 4), torch.ones(2)
    ids = torch.zeros(4, dtype=torch.long)
    cases = [
        (dict(lora_A_stack=torch.randn(2, 4, 15)), r"lora_A_stack must have shape \(2, 4, 16\)"),
        (dict(lora_B_stack=torch.randn(2, 8, 3)), r"lora_B_stack must have shape \(2, 8, 4\)"),
        (dict(scalings=torch.ones(3)), r"scalings must have shape \(2,\)"),
        (dict(ranks=torch.tensor([4, 5])), r"ranks must be in \[1, r_max=4\]"),
        (dict(ranks=torch.tensor([1.0, 2.0])), "ranks must be an int64/int32 tensor"),
    ]
    base = dict(x=x, weight=w, bias=None, lora_A_stack=a, lora_B_stack=b, scalings=s, adapter_ids=ids)
    for change, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            fastpeft.lora_linear_multi(**{**base, **change})


def test_multi_with_one_adapter_equals_lora_linear():
    layer = _layer(ranks=(8,), alphas=(16,))
    x = torch.randn(6, 48)
    torch.testing.assert_close(layer(x, adapter_ids=torch.zeros(6, dtype=torch.long)), layer(x))


def test_mixed_batch_training_gradients_reach_only_each_rows_adapter():
    layer = _layer().train()
    for p in list(layer.lora_A_adapters.values()) + list(layer.lora_B_adapters.values()):
        p.requires_grad_(True)
    x = torch.randn(6, 48, requires_grad=True)
    ids = torch.tensor([0, 0, 2, -1, 2, 0])  # nobody uses a1
    y = layer(x, adapter_ids=ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    # no gradient at all (None, as an adapter that did not run in PEFT): a zero one would still move it under AdamW
    assert layer.lora_A_adapters["a1"].grad is None and layer.lora_B_adapters["a1"].grad is None
    # Each used adapter's gradient equals the one from its rows alone.
    for name, rows in (("default", [0, 1, 5]), ("a2", [2, 4])):
        solo = copy.deepcopy(layer)
        solo.set_adapter(name)
        xs = x.detach()[rows].requires_grad_()
        solo(xs).backward(dy[rows])
        torch.testing.assert_close(layer.lora_A_adapters[name].grad, solo.lora_A_adapters[name].grad)
        torch.testing.assert_close(layer.lora_B_adapters[name].grad, solo.lora_B_adapters[name].grad)
        torch.testing.assert_close(x.grad[rows], xs.grad)
    torch.testing.assert_close(x.grad[3], dy[3] @ layer.weight)  # base-only row


def test_to_dtype_and_deepcopy_repack_the_stack():
    layer = _layer()
    x = torch.randn(5, 48)
    ids = torch.tensor([0, 1, 2, -1, 1])
    y = layer(x, adapter_ids=ids)
    half = copy.deepcopy(layer).to(torch.float64)
    assert half.stacked()[0].dtype == torch.float64
    assert torch.equal(half.stacked()[0][0, :4], half.lora_A)
    torch.testing.assert_close(half(x.double(), adapter_ids=ids), y.double(), rtol=1e-5, atol=1e-5)


# ---- model level -------------------------------------------------------------------------------------

def _toy_with_adapters():
    torch.manual_seed(0)
    m = Toy().eval()
    fastpeft.inject(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                  modules_to_save=["lm_head"]), "a")
    fastpeft.inject(m, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj", "mlp.0"],
                                  init_lora_weights=False), "b")
    fastpeft.inject(m, LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                  init_lora_weights=False, modules_to_save=["lm_head"]), "c")
    with torch.no_grad():
        for name in ("a", "c"):
            m.lm_head.modules_to_save[name].weight.add_(0.1 * torch.randn_like(m.lm_head.weight))
    return m


def _alone(model, name, x):
    fastpeft.set_adapter(model, name)
    try:
        return model(x)
    finally:
        fastpeft.set_adapter(model, "a")


def test_mixed_batch_equals_each_adapter_alone():
    m = _toy_with_adapters()
    x = torch.randn(5, 3, 16)
    names = ["a", None, "b", "c", "a"]
    with fastpeft.mixed_batch(m, names):
        y = m(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(y[i], _alone(m, name, x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    # Outside the block the active adapter applies again.
    torch.testing.assert_close(m(x), _alone(m, "a", x))


def test_set_routing_is_per_sequence_ids():
    """The layer method mixed_batch uses: names per sequence (None or an unknown name = base), cleared by None."""
    layer = _layer()
    x = torch.randn(4, 3, 48)
    layer.set_routing(["a2", None, "default", "not-here"])
    assert layer.routing == ["a2", None, "default", "not-here"]
    routed = layer(x)
    layer.set_routing(None)
    assert layer.routing is None
    torch.testing.assert_close(routed, layer(x, adapter_ids=torch.tensor([2, -1, 0, -1])), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), _row_by_row(layer, x, torch.zeros(4, 3, dtype=torch.long)))


def test_mixed_batch_bad_names():
    m = _toy_with_adapters()
    with pytest.raises(ValueError, match=r"\['zzz'\] are not adapters of this model"):
        with fastpeft.mixed_batch(m, ["a", "zzz"]):
            pass
    with pytest.raises(TypeError, match="non-empty list"):
        with fastpeft.mixed_batch(m, "a"):
            pass
    with pytest.raises(ValueError, match=r"adapter_ids must have shape|batch size"):
        with fastpeft.mixed_batch(m, ["a", "b"]):
            m(torch.randn(3, 4, 16))


def test_load_adapter_many_times_and_route(tmp_path):
    src = _toy_with_adapters()
    for name in ("a", "b", "c"):
        fastpeft.save_adapter(src, tmp_path / name, adapter_name=name)
    torch.manual_seed(0)
    m = Toy().eval()
    for name in ("a", "b", "c"):
        fastpeft.load_adapter(m, tmp_path / name, adapter_name=name)
    assert fastpeft.active_adapter(m) == "a"
    x = torch.randn(3, 2, 16)
    names = ["c", "b", "a"]
    with fastpeft.mixed_batch(m, names), fastpeft.mixed_batch(src, names):
        torch.testing.assert_close(m(x), src(x), rtol=1e-5, atol=1e-5)


def test_mixed_batch_inside_transformers_generate():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, r in (("x", 4), ("y", 8)):
        fastpeft.inject(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False), name)
        with torch.no_grad():
            for layer in fastpeft.lora_layers(model).values():
                layer.adapter_parameters(name)[1].mul_(20)  # make each adapter change the greedy tokens
    ids = torch.randint(1, 64, (3, 5))
    names = ["x", None, "y"]

    def routed_and_alone(k=1, **kw):
        """generate's output with the names routed, and each sequence's generated alone with its adapter set."""
        kw.update(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with fastpeft.mixed_batch(model, names, rows_per_sequence=k):
            out = model.generate(ids, **kw)
        alone = []
        for i, name in enumerate(names):
            fastpeft.set_adapter(model, name)
            alone.append(model.generate(ids[i:i + 1], **kw))
        return out, alone

    out, alone = routed_and_alone()
    assert torch.equal(out, torch.cat(alone))
    assert not torch.equal(alone[0], alone[1]) or not torch.equal(alone[1], alone[2])
    # beams and several returned sequences: generate repeats each sequence's rows, the names follow them
    out, alone = routed_and_alone(2, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 6 and torch.equal(out, torch.cat(alone))
    with pytest.raises(ValueError, match=r"batch size 6.*rows_per_sequence=k"):  # no k given: no guess
        routed_and_alone(num_beams=2)
    x = torch.randn(6, 5, 32)  # a batch that is 2 x the names is not taken for beams unless k = 2 is given
    with pytest.raises(ValueError, match=r"3 adapter_names.*batch size 6.*expected 3 or 9 \(rows_per_sequence=3\)"):
        with fastpeft.mixed_batch(model, names, rows_per_sequence=3):
            model.model.layers[0].self_attn.q_proj(x)


CASES_MULTI_FORMS = [  # (rows, adapters, ids kind, ranks mixed, dtype, batched)
    (64, 64, "each-row-its-own", False, torch.float32, True),
    (40, 6, "all-present", False, torch.bfloat16, True),
    (37, 6, "random-with-base", True, torch.float32, False),
    (40, 9, "subset", False, torch.float32, False),
]


@pytest.mark.parametrize("rows,n,kind,mixed,dt,batched", CASES_MULTI_FORMS, ids=lambda v: str(v))
def test_eager_forms_of_multi_lora_add_equal_the_masked_form(monkeypatch, rows, n, kind, mixed, dt, batched):
    """multi_lora_add in eager mode (the batched form when every adapter has rows at the full rank, else the loop
    over rank-sliced views) against its compiled form (every adapter on every row at r_max, masks), run eagerly
    on the same inputs: output and every gradient to fp32 rounding; base rows (-1), a subset of the adapters,
    mixed ranks with inf in B past each rank (never read), bf16."""
    from fastpeft import reference as R

    torch.manual_seed(rows + n)
    k, out, r = 48, 40, 8
    x = torch.randn(rows, k, dtype=dt, requires_grad=True)
    a = torch.randn(n, r, k, dtype=dt, requires_grad=True)
    b = torch.randn(n, out, r, dtype=dt, requires_grad=True)
    scal = torch.rand(n) + 0.5
    ranks = torch.randint(1, r + 1, (n,)) if mixed else None
    if mixed:
        with torch.no_grad():
            for i in range(n):  # (the compiled form reads A's padding, then masks u: not inf there)
                b[i, :, int(ranks[i]):] = float("inf")
    if kind == "each-row-its-own":
        ids = torch.randperm(rows) % n
    elif kind == "all-present":
        ids = torch.arange(rows) % n
    elif kind == "subset":
        ids = torch.tensor([1, 3, 4, 6, 8])[torch.randint(0, 5, (rows,))]
    else:
        ids = torch.randint(-1, n, (rows,))
    dy = torch.randn(rows, out, dtype=dt)

    def run():
        R._GROUPS_CACHE.clear()
        y = R.multi_lora_add(torch.zeros(rows, out, dtype=dt), x, a, b, scal, ids, ranks)
        return (y,) + torch.autograd.grad(y, (x, a, b), dy)
    calls = []
    real = R._batched_lora_add
    monkeypatch.setattr(R, "_batched_lora_add", lambda *args: calls.append(1) or real(*args))
    eager = run()
    assert bool(calls) == batched
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    masked = run()
    tol = 1e-5 if dt == torch.float32 else 2e-2
    for got, want in zip(eager, masked):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["per-sequence-prefill", "skewed", "decode-spread"])
def test_batched_form_only_where_it_pays(monkeypatch, case):
    """Without gradients: per-sequence runs longer than _BATCHED_MAX_RUN stay on the in-place loop (views of x
    and y, no gather), a skewed batch (one adapter with most rows) stays on the loop (padding every adapter to
    the largest would multiply the rows), and a decode step spread over every adapter is batched. The result
    is the loop's either way."""
    from fastpeft import reference as R

    torch.manual_seed(0)
    n, k, out, r = 4, 48, 40, 8
    if case == "per-sequence-prefill":
        ids = torch.arange(n).repeat_interleave(64)  # 4 sequences of 64 tokens, one adapter each
    elif case == "skewed":
        ids = torch.cat([torch.zeros(256, dtype=torch.long), torch.arange(1, n)])
    else:
        ids = torch.arange(12) % n
    x = torch.randn(ids.numel(), k)
    a, b, scal = torch.randn(n, r, k), torch.randn(n, out, r), torch.rand(n)
    calls = []
    real = R._batched_lora_add
    monkeypatch.setattr(R, "_batched_lora_add", lambda *args: calls.append(1) or real(*args))
    R._GROUPS_CACHE.clear()
    with torch.no_grad():
        got = R.multi_lora_add(torch.zeros(ids.numel(), out), x, a, b, scal, ids)
    assert bool(calls) == (case == "decode-spread")
    want = torch.stack([scal[i] * (b[i] @ (a[i] @ x[m])) for m, i in enumerate(ids.tolist())])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_rank_below_zero_counts_as_zero_as_in_the_compiled_form(monkeypatch):
    """Ranks are clamped to [0, r_max] in eager mode, as the compiled form's masks read them (unvalidated
    input, e.g. check_ids=False): a rank of -1 is no update, not A[:-1]."""
    from fastpeft import reference as R

    torch.manual_seed(1)
    x, a, b = torch.randn(6, 16), torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    ids, ranks = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([-1, 2])
    R._GROUPS_CACHE.clear()
    eager = R.multi_lora_add(torch.zeros(6, 8), x, a, b, torch.ones(2), ids, ranks)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(eager, R.multi_lora_add(torch.zeros(6, 8), x, a, b, torch.ones(2), ids, ranks))
    assert torch.equal(eager[ids == 0], torch.zeros(3, 8))


def test_deleting_an_adapter_inside_mixed_batch_routes_by_name():
    """Inside a mixed_batch block the layers route by name: deleting an adapter the block does not route (later ones'
    ids shift down) leaves every sequence on its own adapter; deleting one it routes is refused (its sequences would
    silently run the base; before 2026-12-01 they did), the model unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    for name in ("a", "d", "b", "c"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
                        adapter_name=name, activate=name == "a")
    x = torch.randn(3, 4, 16)

    def alone(name):
        fastpeft.set_adapter(model, name)
        with torch.no_grad():
            return model(x)
    want = {n: alone(n) for n in ("a", "b", "c")}
    fastpeft.set_adapter(model, "a")
    with torch.no_grad(), fastpeft.mixed_batch(model, ["a", "b", "c"]):
        fastpeft.delete_adapter(model, "d")
        got = model(x)
        for i, n in enumerate("abc"):
            torch.testing.assert_close(got[i], want[n][i])
        with pytest.raises(RuntimeError, match=r"delete_adapter\('b'\) inside a mixed_batch block that routes"):
            fastpeft.delete_adapter(model, "b")
        assert model[0].adapter_names == ["a", "b", "c"]
        torch.testing.assert_close(model(x), got)


def test_a_layer_injected_inside_mixed_batch_is_routed_too():
    """An inject inside a mixed_batch block that wraps a new layer: the new layer routes the block's sequences as
    the others do (it ran the newly active adapter on every row), and stops routing when the block ends."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12))
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="a")
    x = torch.randn(3, 4, 16)
    with torch.no_grad(), fastpeft.mixed_batch(model, ["a", None, "a"]):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["1"], init_lora_weights=False),
                        adapter_name="b")  # active now: without the routing its layer would run b on every row
        assert model[1].routing == ["a", None, "a"]
        got = model(x)
    assert model[1].routing is None and model[0].routing is None
    with torch.no_grad():
        want = {}
        for name in ("a", None):
            fastpeft.set_adapter(model, name)
            want[name] = model(x)
    for i, name in enumerate(("a", None, "a")):
        torch.testing.assert_close(got[i], want[name][i])
