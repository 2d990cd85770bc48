"""``fastpeft.accelerate`` on real Hugging Face PEFT models: before and after, outputs and every gradient
equal PEFT's own (tiny LLaMA built from a config, adapters with non-zero B so a dropped term shows).

Dropout: fastpeft draws its own (Philox, seeded) mask, not torch's, so a training step with dropout is
compared to PEFT's formula *with fastpeft's mask* (recovered from the output of an invertible layer),
statistically for the drop rate, and exactly in eval mode.
"""
import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft import kernels  # noqa: E402
from conftest import assert_close_report  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning")]

RTOL, ATOL = 1e-5, 1e-6  # fp32; the one-adapter path is bitwise equal, sums of adapters reorder additions
VOCAB = 97
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (3, 9), generator=g)


def lora_model(base, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))


def with_small_adapter(model, lora_alpha, target_modules):
    """``model`` with a second adapter "small" (rank 4), drawn after ``torch.manual_seed(1)``."""
    torch.manual_seed(1)
    model.add_adapter("small", peft.LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=target_modules,
                                               init_lora_weights=False))
    return model


def assert_dropout_recovered(dropped, x, p, tol):
    """``dropped``, drop(x) solved back from an output, drops a fraction p of x (within 4 sigma) and keeps the
    rest as x / (1 - p) (to ``tol``). Returns the keep mask."""
    keep = dropped.abs() > 1e-6 * x.abs()
    frac = 1 - keep.double().mean().item()
    n = x.numel()
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5, f"drop rate {frac:.4f}, expected {p} (n={n})"
    assert_close_report(dropped[keep], (x / (1 - p)).detach()[keep], tol, tol, "kept values")
    return keep


def run(model, ids, **kw):
    """Logits and the gradient of every trainable parameter (by name) of one loss.backward()."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), grads


def assert_same(got, want, what, rtol=RTOL, atol=ATOL):
    (lg, gg), (lw, gw) = got, want
    assert_close_report(lg, lw, rtol, atol, f"{what}: logits")
    assert gg.keys() == gw.keys(), f"{what}: gradients of {sorted(set(gg) ^ set(gw))[:4]} differ in presence"
    assert gw, f"{what}: no gradients at all"
    for n in gw:
        assert_close_report(gg[n], gw[n], rtol, atol, f"{what}: grad of {n}")


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


# ---------------------------------------------------------------------------------------------------------
# The plain cases
# ---------------------------------------------------------------------------------------------------------
def test_one_adapter_outputs_and_gradients_equal_peft(base, ids):
    model = lora_model(base)
    want = run(model, ids)
    report = fastpeft.accelerate(model)
    assert len(report.patched) == 2 * len(TARGETS) and not report.skipped and report.newly_patched == 6
    assert isinstance(q_proj(model), peft.tuners.lora.LoraLayer) and isinstance(model, peft.PeftModel)
    assert type(q_proj(model)).__name__ == "AcceleratedLinear"
    assert_same(run(model, ids), want, "accelerated")
    assert report.calls() == {"fastpeft": 6}
    assert "6 of 6 PEFT LoRA layers" in str(report)
    again = fastpeft.accelerate(model)  # a no-op
    assert again.newly_patched == 0 and again.patched == report.patched
    assert type(q_proj(model)).__name__ == "AcceleratedLinear"
    fastpeft.restore(model)
    assert type(q_proj(model)) is peft.tuners.lora.layer.Linear and "_fastpeft_calls" not in q_proj(model).__dict__
    assert_same(run(model, ids), want, "restored")


def test_dropout_eval_equal_and_train_runs_fastpeft(base, ids):
    model = lora_model(base, lora_dropout=0.1)
    model.eval()
    want = run(model, ids)
    fastpeft.accelerate(model)
    assert_same(run(model, ids), want, "dropout 0.1, eval")
    model.train()
    run(model, ids)  # CPU, backend "auto": the CPU path, its own dropout stream, no dropped copy of x kept
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 2}
    with fastpeft.use_backend("reference"):
        torch.manual_seed(3)
        a = run(model, ids)
        torch.manual_seed(3)
        b = run(model, ids)
    assert q_proj(model)._fastpeft_calls["fastpeft"] == 4
    assert_same(a, b, "dropout 0.1, train, same torch seed")  # the mask is a function of torch's generator
    assert not torch.equal(a[0], want[0])  # and dropout did drop something


class OneLinear(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x)


def test_dropout_train_matches_peft_formula_with_fastpeft_mask():
    """y = x W^T + b + s B A drop(x): with B A invertible, drop(x) is read back from y; the rate must be p
    (binomial bounds), kept values x / (1-p), and the gradients PEFT's formula's with that same mask."""
    d, p, rows = 32, 0.1, 64
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear(d).double(), peft.LoraConfig(r=d, lora_alpha=d, target_modules=["lin"],
                                                                        lora_dropout=p, init_lora_weights=False))
    fastpeft.accelerate(model)
    layer = model.base_model.model.lin
    model.train()
    x = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    with fastpeft.use_backend("reference"):  # asked for: fastpeft's mask even on the CPU
        y = model(x)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        delta = y - x @ w.T - bias
        dropped = torch.linalg.solve(b @ a, delta.T).T  # = drop(x)
    keep = assert_dropout_recovered(dropped, x, p, 1e-9)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [x.grad, a.grad, b.grad]
    # PEFT's formula with the recovered mask, through torch autograd.
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    mask = keep.double() / (1 - p)
    y2 = x2 @ w.T + bias + (b2 @ (a2 @ (x2 * mask).T)).T * layer.scaling["default"]
    y2.backward(gy)
    for g, g2, name in zip(got, [x2.grad, a2.grad, b2.grad], ["x", "lora_A", "lora_B"]):
        assert_close_report(g, g2, 1e-9, 1e-9, f"grad of {name}")
    assert layer._fastpeft_calls == {"fastpeft": 1}


def test_disable_adapter(base, ids):
    model = lora_model(base)
    want_on = run(model, ids)
    with model.disable_adapter():
        want = model(input_ids=ids).logits  # the frozen base: nothing to differentiate
    fastpeft.accelerate(model)
    with model.disable_adapter():
        got = model(input_ids=ids).logits
    assert_close_report(got, want, 0, 0, "disabled")
    assert_close_report(got, base(input_ids=ids).logits, RTOL, ATOL, "disabled = base")
    assert q_proj(model)._fastpeft_calls == {"adapters disabled": 1}
    assert_same(run(model, ids), want_on, "enabled again")


def test_set_adapter_between_ranks(base, ids):
    model = with_small_adapter(lora_model(base), 8, TARGETS)
    want = {}
    for name in ("small", "default"):
        model.set_adapter(name)
        want[name] = run(model, ids)
    fastpeft.accelerate(model)
    for name in ("default", "small"):
        model.set_adapter(name)
        assert_same(run(model, ids), want[name], f"adapter {name}")
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 2}


def test_two_active_adapters(base, ids):
    model = with_small_adapter(lora_model(base), 4, ["q_proj", "v_proj"])
    model.base_model.set_adapter(["default", "small"])
    want = run(model, ids)
    assert any("small" in n for n in want[1]) and any("default" in n for n in want[1])
    fastpeft.accelerate(model)
    assert_same(run(model, ids), want, "two active adapters")
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 1}


def test_mixed_adapter_names_batch_with_base_rows(base, ids):
    model = with_small_adapter(lora_model(base), 8, ["q_proj", "v_proj"])
    for n, p in model.named_parameters():  # adapter_names is inference-only in PEFT; check gradients anyway
        p.requires_grad_("lora_" in n)
    model.eval()
    names = ["small", "__base__", "default"]
    want = run(model, ids, adapter_names=names)
    fastpeft.accelerate(model)
    assert_same(run(model, ids, adapter_names=names), want, "mixed batch")
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 1}
    down = model.base_model.model.model.layers[0].mlp.down_proj  # has "default" only: "small" rows run the base
    assert down._fastpeft_calls == {"fastpeft": 1}
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=ids, adapter_names=names[:2])  # PEFT's own check still runs


def test_merge_unmerge_and_merge_and_unload(base, ids):
    model = lora_model(base)
    want = run(model, ids)
    model.merge_adapter()
    want_merged = model(input_ids=ids).logits.detach()
    model.unmerge_adapter()
    fastpeft.accelerate(model)
    model.merge_adapter()
    assert_close_report(model(input_ids=ids).logits, want_merged, 0, 0, "merged")
    assert q_proj(model)._fastpeft_calls == {"merged adapters": 1}
    model.unmerge_adapter()
    assert_same(run(model, ids), want, "unmerged")
    plain = model.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close_report(plain(input_ids=ids).logits, want[0], 1e-4, 1e-5, "merge_and_unload")


def test_save_pretrained_same_files_and_reload(base, ids, tmp_path):
    from safetensors.torch import load_file

    model = lora_model(base)
    model.save_pretrained(tmp_path / "peft")
    want = run(model, ids)
    fastpeft.accelerate(model)
    model.save_pretrained(tmp_path / "accel")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "accel" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 6
    for k in a:
        assert torch.equal(a[k], b[k]), k
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "accel", is_trainable=True)
    assert_same(run(reloaded, ids), want, "reloaded by PEFT")
    fastpeft.accelerate(reloaded)
    assert_same(run(reloaded, ids), want, "reloaded, accelerated")


def _rel_err(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def test_fp32_adapters_on_bf16_base_and_autocast(base, ids):
    """PEFT's default on a bf16 model: fp32 adapters (autocast_adapter_dtype). The patched layers run fastpeft's
    ops with the factors cast to bf16 (as autocast would), the gradients reaching the fp32 Parameters; PEFT
    computes that branch in fp32. Judged the flash-attention way against the same model in fp32 (bf16 weights
    held exactly): fastpeft's error at most 2x PEFT's own, logits and every gradient."""
    model = peft.get_peft_model(copy.deepcopy(base).to(torch.bfloat16),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    layer = q_proj(model)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    ref = run(copy.deepcopy(model).float(), ids)
    want = run(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_ac = run(model, ids)
    fastpeft.accelerate(model)
    got = run(model, ids)
    assert layer._fastpeft_calls == {"fastpeft": 1}
    assert got[1].keys() == want[1].keys() and all(g.dtype == torch.float32 for g in got[1].values())
    for what, g, w, r in [("logits", got[0], want[0], ref[0])] + [
            (f"grad of {n}", got[1][n], want[1][n], ref[1][n]) for n in want[1]]:
        assert _rel_err(g, r) <= 2 * _rel_err(w, r) + 1e-3, (what, _rel_err(g, r), _rel_err(w, r))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(model, ids)
    assert layer._fastpeft_calls["fastpeft"] == 2
    assert_same(got, want_ac, "fp32 adapters, bf16 base, autocast", 2e-2, 2e-2)
    model.eval()
    with torch.no_grad():  # no-grad calls in eval keep the bf16 casts: an in-place update is seen at the next call
        first = model(input_ids=ids).logits
        kept = layer.__dict__["_fastpeft_casts"][2]
        assert model(input_ids=ids).logits is not None and layer.__dict__["_fastpeft_casts"][2] is kept
        layer.lora_B["default"].weight.add_(0.5)
        assert not torch.equal(model(input_ids=ids).logits, first)
        layer.lora_B["default"].weight.sub_(0.5)
        assert torch.equal(model(input_ids=ids).logits, first)


def test_cast_input_dtype_disabled_same_dtypes(base, ids):
    model = lora_model(base)
    want = run(model, ids)
    fastpeft.accelerate(model)
    with peft.helpers.disable_input_dtype_casting(model):
        assert_same(run(model, ids), want, "cast_input_dtype_enabled=False")
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 1}


def test_hooks_on_base_layer_run_peft_forward(base, ids):
    model = lora_model(base)
    want = run(model, ids)
    fastpeft.accelerate(model)
    seen = []
    handle = q_proj(model).base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_same(run(model, ids), want, "hooked base layer")
    handle.remove()
    assert len(seen) == 1 and q_proj(model)._fastpeft_calls == {"hooks on the base layer": 1}


# ---------------------------------------------------------------------------------------------------------
# Layers fastpeft does not compute: skipped, PEFT's forward, same outputs
# ---------------------------------------------------------------------------------------------------------
def test_lora_bias_and_dora_layers_are_patched(base, ids):
    """PEFT's lora_bias (a bias on B: the update is s (B u + b_B)) runs on fastpeft's ops since 2026-12-01, s b_B
    added to the layer's bias: logits and every gradient (b_B's included) equal PEFT's, with dropout in training too
    (the bias is not dropped), and beside a second adapter; in an adapter_names batch it runs PEFT's forward."""
    model = lora_model(base, target_modules=["v_proj"])
    torch.manual_seed(1)
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    model.add_adapter("lbias", peft.LoraConfig(r=4, target_modules=["down_proj", "v_proj"], lora_bias=True,
                                               init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B.lbias.bias"):
                p.normal_()  # (PEFT starts b_B at 0: a dropped term would not show)
    want = {}
    for name in ("default", "dora", "lbias"):
        model.set_adapter(name)
        want[name] = run(model, ids)
    model.base_model.set_adapter(["default", "lbias"])
    want["both"] = run(model, ids)
    mixed = ["lbias", "__base__", "default"]
    with torch.no_grad():
        want["mixed"] = model.eval()(input_ids=ids, adapter_names=mixed).logits
    report = fastpeft.accelerate(model, strict=True)
    assert sorted(n.rsplit(".", 1)[-1] for n in report.patched) == ["down_proj"] * 2 + ["q_proj"] * 2 + ["v_proj"] * 2
    assert not report.skipped and not report.partial
    for name in ("dora", "lbias", "default", "both"):
        if name == "both":
            model.base_model.set_adapter(["default", "lbias"])
        else:
            model.set_adapter(name)
        got = run(model, ids)
        assert_same(got, want[name], f"adapter {name}")
        assert name not in ("lbias", "both") or any(n.endswith("lora_B.lbias.bias") for n in got[1])
    with torch.no_grad():
        assert_close_report(model(input_ids=ids, adapter_names=mixed).logits, want["mixed"], RTOL, ATOL, "mixed")
    calls = report.calls()
    # dora: q_proj; lbias: v_proj, down_proj; default: v_proj; both: v_proj, down_proj (two layers each)
    assert calls["fastpeft"] == 2 * (1 + 2 + 1 + 2) and calls["lora_bias adapter in an adapter_names batch"] == 4


def test_lora_bias_with_dropout_in_training(base, ids):
    """With dropout, PEFT's lora_bias adds s b_B undropped: fastpeft's mask on x, the bias term exact. Solved from a
    call's output with B = 0 and b_B set: the update is s b_B on every row."""
    model = lora_model(base, target_modules=["down_proj"], lora_bias=True, lora_dropout=0.5)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].bias.normal_()
    fastpeft.accelerate(model, strict=True)
    model.train()
    x = torch.randn(4, layer.in_features)
    want = layer.base_layer(x) + layer.scaling["default"] * layer.lora_B["default"].bias
    assert_close_report(layer(x), want, RTOL, ATOL, "s b_B, undropped")
    assert layer._fastpeft_calls == {"fastpeft": 1}


def dora_model(base, **kw):
    return lora_model(base, use_dora=True, **kw)


def test_dora_outputs_and_gradients_equal_peft(base, ids):
    model = dora_model(base)
    want = run(model, ids)
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n in want[1])  # magnitude grads compared
    report = fastpeft.accelerate(model, strict=True)  # DoRA no longer stays on PEFT's forward
    assert len(report.patched) == 2 * len(TARGETS) and not report.skipped and not report.partial
    assert type(q_proj(model)).__name__ == "AcceleratedLinear"
    assert_same(run(model, ids), want, "DoRA, eval")
    assert q_proj(model)._fastpeft_calls == {"fastpeft": 1}
    # Train mode, no dropout: PEFT recomputes the base term on (undropped) x, the same y.
    model.train()
    fastpeft.restore(model)
    want = run(model, ids)
    fastpeft.accelerate(model)
    assert_same(run(model, ids), want, "DoRA, train, dropout 0")


def test_dora_dropout_in_eval_equals_peft_and_x_gradient(base, ids):
    model = dora_model(base, lora_dropout=0.1)
    model.eval()
    want = run(model, ids)
    layer = q_proj(model)
    x = torch.randn(2, 5, 64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [layer(xs[0])]
    fastpeft.accelerate(model)
    assert_same(run(model, ids), want, "DoRA, dropout 0.1, eval")
    ys.append(layer(xs[1]))
    gy = torch.randn_like(ys[0])
    for y, xi in zip(ys, xs):
        y.backward(gy)
    assert_close_report(ys[1], ys[0], RTOL, ATOL, "DoRA layer output")
    assert_close_report(xs[1].grad, xs[0].grad, RTOL, ATOL, "DoRA layer: grad of x")
    assert layer._fastpeft_calls == {"fastpeft": 2}


def test_dora_dropout_train_matches_peft_formula_with_fastpeft_mask():
    """PEFT 0.21's DoRA with dropout in training: y = x W^T + b + (g-1) (x~ W^T) + g s (x~ A^T B^T), g = m / |W + sBA|
    (rows, detached): y - x W^T - b = x~ M^T with M = diag(g-1) W + diag(g) s B A, so x~ is read back (M invertible);
    the rate must be p and kept values x / (1-p) (a LoRA-only dropout would not give a masked x), and the gradients
    of x, A, B, m PEFT's formula's with that mask."""
    d, p, rows = 32, 0.1, 64
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear(d).double(), peft.LoraConfig(
        r=d, lora_alpha=d, target_modules=["lin"], lora_dropout=p, init_lora_weights=False, use_dora=True))
    fastpeft.accelerate(model)
    layer = model.base_model.model.lin
    model.train()
    x = torch.randn(rows, d, dtype=torch.float64, requires_grad=True)
    with fastpeft.use_backend("reference"):
        y = model(x)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]

    def gain(m_, a_, b_):
        return m_ / (w + s * b_ @ a_).norm(dim=1).detach()

    with torch.no_grad():
        g = gain(m, a, b)
        mat = (g - 1)[:, None] * w + g[:, None] * s * (b @ a)
        dropped = torch.linalg.solve(mat, (y - x @ w.T - bias).T).T  # = drop(x)
    keep = assert_dropout_recovered(dropped, x, p, 1e-8)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [x.grad, a.grad, b.grad, m.grad]
    x2, a2, b2, m2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b, m))
    xd = x2 * (keep.double() / (1 - p))
    g2 = gain(m2, a2, b2)
    y2 = x2 @ w.T + bias + (g2 - 1) * (xd @ w.T) + g2 * s * (xd @ a2.T @ b2.T)
    y2.backward(gy)
    for gr, gr2, name in zip(got, [x2.grad, a2.grad, b2.grad, m2.grad], ["x", "lora_A", "lora_B", "magnitude"]):
        assert_close_report(gr, gr2, 1e-8, 1e-8, f"grad of {name}")
    assert layer._fastpeft_calls == {"fastpeft": 1}


def test_dora_with_a_second_active_adapter_or_adapter_names_runs_peft_forward(base, ids):
    model = lora_model(base, target_modules=["q_proj"])
    torch.manual_seed(1)
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    model.base_model.set_adapter(["default", "dora"])
    want = run(model, ids)
    fastpeft.accelerate(model, strict=True)
    assert_same(run(model, ids), want, "LoRA + DoRA active")
    assert q_proj(model)._fastpeft_calls == {"several active adapters, DoRA among them": 1}


class Conv1DModel(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.c_attn = transformers.pytorch_utils.Conv1D(d, d)  # GPT-2's (in, out) layer
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(torch.tanh(self.c_attn(x)))


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def gpt2_lora(gpt2, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True,
          "init_lora_weights": False, **kw}
    return peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(**kw))


def seeded_run(model, ids, seed=5, **kw):
    """``run`` after ``torch.manual_seed(seed)``: GPT-2's own dropout draws the same masks in both models."""
    torch.manual_seed(seed)
    return run(model, ids, **kw)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gpt2_conv1d_layers_are_accelerated(gpt2, ids, dora):
    """GPT-2's projections (transformers Conv1D, W stored (in, out), PEFT's fan_in_fan_out) run on fastpeft's ops
    with W read as a transposed view: logits and gradients equal PEFT's in training (LoRA bit for bit) and eval,
    merge / unmerge as PEFT's. Before 2026-12-01 these layers all stayed on PEFT's forward."""
    model = gpt2_lora(gpt2, use_dora=dora)
    want = seeded_run(model, ids)
    model.eval()
    with torch.no_grad():
        want_eval = model(ids).logits
    model.train()
    report = fastpeft.accelerate(model, strict=True)
    assert len(report.patched) == 8 and report.skipped == {}  # c_attn, c_proj (2), c_fc in each of 2 blocks
    assert_same(seeded_run(model, ids), want, "GPT-2 Conv1D", **({} if dora else {"rtol": 0, "atol": 0}))
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # the second call: DoRA's norm kept on the same W view
            assert_close_report(model(ids).logits, want_eval, RTOL, ATOL, "GPT-2 Conv1D, eval")
        model.merge_adapter()
        assert_close_report(model(ids).logits, want_eval, 1e-5, 1e-5, "merged")
        model.unmerge_adapter()
        assert_close_report(model(ids).logits, want_eval, 1e-5, 1e-5, "unmerged")
    calls = collections.Counter()
    for name in report.patched:
        calls.update(model.get_submodule(name)._fastpeft_calls)
    assert set(calls) == {"fastpeft", "merged adapters"} and calls["fastpeft"] == 8 * 4  # train, eval twice, unmerged


def test_gpt2_conv1d_adapter_names_batch_and_a_swapped_weight(gpt2, ids):
    """An ``adapter_names`` batch over Conv1D layers equals PEFT's; the W view kept between eval calls follows a
    weight whose ``.data`` is swapped (new memory, same Parameter, as a load makes) instead of reading the old."""
    model = gpt2_lora(gpt2)
    torch.manual_seed(1)
    model.add_adapter("small", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                               init_lora_weights=False))
    model.eval()
    names = ["small", "__base__", "default"]
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
        fastpeft.accelerate(model, strict=True)
        assert_close_report(model(ids, adapter_names=names).logits, want, RTOL, ATOL, "adapter_names")
        assert layer._fastpeft_calls == {"fastpeft": 1}
        model(ids)                                        # W's view kept
        conv = layer.base_layer
        conv.weight.data = conv.weight.data * 2
        got = model(ids).logits
    fastpeft.restore(model)
    with torch.no_grad():
        assert_close_report(got, model(ids).logits, RTOL, ATOL, "after a .data swap of W")


def test_an_unfrozen_conv1d_weight_gets_its_gradient_after_eval_calls():
    """accelerate's kept transposed view of a Conv1D's W is not handed out once W requires grad (a view with no
    autograd edge to W: no gradient, silently)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Conv1DModel(), peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                   init_lora_weights=False))
    fastpeft.accelerate(model, strict=True)
    model.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        model(x)                                       # the view kept
    conv = model.base_model.model.c_attn.base_layer
    conv.weight.requires_grad_(True)
    model(x).sum().backward()
    assert conv.weight.grad is not None and torch.count_nonzero(conv.weight.grad) > 0
    assert model.base_model.model.c_attn._fastpeft_calls == {"fastpeft": 2}


class OwnConv1D(transformers.pytorch_utils.Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")
def test_fan_in_fan_out_disagreeing_with_the_base_and_conv1d_subclasses_fall_back():
    """fan_in_fan_out=True on an nn.Linear (PEFT clears it there; it would transpose only PEFT's merge) and a Conv1D
    subclass with a forward of its own stay on PEFT's forward, each named in the report; the outputs unchanged."""
    torch.manual_seed(0)
    model = Conv1DModel()
    model.c_attn.__class__ = OwnConv1D
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "proj"], fan_in_fan_out=True,
                                                       init_lora_weights=False))
    model.base_model.model.proj.fan_in_fan_out = True  # PEFT clears it on an nn.Linear: set by hand
    x = torch.randn(5, 16)
    want = model(x)
    with pytest.warns(UserWarning, match="(?s)nothing it can compute.*unchanged.*remove the call"):
        report = fastpeft.accelerate(model)  # not strict: a warning and the report, the model unchanged
    assert report.patched == []
    assert "OwnConv1D, a transformers Conv1D with a forward of its own" in report.skipped["base_model.model.c_attn"]
    assert "fan_in_fan_out=True on a base layer storing W (out, in)" in report.skipped["base_model.model.proj"]
    with pytest.raises(ValueError, match="(?s)strict=True.*nothing was changed.*Conv1D"):
        fastpeft.accelerate(model, strict=True)
    assert_close_report(model(x), want, 0, 0, "fan_in_fan_out")
    torch.manual_seed(0)
    model = peft.get_peft_model(Conv1DModel(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                               init_lora_weights=False))
    want = model(x)
    fastpeft.accelerate(model, strict=True)
    model.base_model.model.c_attn.fan_in_fan_out = False  # a hand-made disagreement after accelerate: at the call
    assert_close_report(model(x), want, 0, 0, "flag cleared")
    assert model.base_model.model.c_attn._fastpeft_calls == {
        "fan_in_fan_out=False on a transformers Conv1D base layer (W stored (in, out))": 1}


# ---------------------------------------------------------------------------------------------------------
# The triton backend (CUDA, or the interpreter on CPU)
# ---------------------------------------------------------------------------------------------------------
needs_kernels = pytest.mark.skipif(not (kernels.HAS_TRITON and (kernels.INTERPRET or torch.cuda.is_available())),
                                   reason="needs triton on CUDA or TRITON_INTERPRET=1")


@needs_kernels
@pytest.mark.parametrize("mode", ["one", "mixed"])
def test_triton_backend(mode):
    dev = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear(16).to(dev), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                                       init_lora_weights=False))
    torch.manual_seed(1)
    model.add_adapter("r2", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights=False))
    model.set_adapter("default")
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    x = torch.randn(3, 2, 16, device=dev)
    kw = {"adapter_names": ["r2", "__base__", "default"]} if mode == "mixed" else {}
    if mode == "mixed":
        model.eval()

    def step():
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = model(xx, **kw)
        (y * torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)).sum().backward()
        return [y.detach(), xx.grad] + [p.grad for n, p in sorted(model.named_parameters()) if p.grad is not None]

    want = step()
    fastpeft.accelerate(model)
    with fastpeft.use_backend("triton"):
        got = step()
    assert len(got) == len(want) >= 4
    for g, w in zip(got, want):
        assert_close_report(g, w, 1e-4, 1e-5, f"triton, {mode}")
    assert model.base_model.model.lin._fastpeft_calls == {"fastpeft": 1}


@needs_kernels
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")
def test_triton_backend_on_a_conv1d_layer():
    """GPT-2's Conv1D on the kernels: W (out, in) is a transposed view of the stored (in, out) weight, read in
    place; with dropout, outputs and every gradient equal the reference backend's (same Philox mask)."""
    dev = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    torch.manual_seed(0)
    model = peft.get_peft_model(Conv1DModel(16).to(dev), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.3, init_lora_weights=False))
    fastpeft.accelerate(model, strict=True)
    x = torch.randn(6, 16, device=dev, requires_grad=True)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        with fastpeft.use_backend(backend), fastpeft.reference.kernel_stream_on_cpu():
            y = model(x)
            y.square().sum().backward()
        results[backend] = [y.detach(), x.grad.clone()] + [
            p.grad for n, p in sorted(model.named_parameters()) if "lora_" in n]
    assert len(results["triton"]) == 4
    for g, w in zip(results["triton"], results["reference"]):
        assert_close_report(g, w, 1e-4, 1e-5, "Conv1D, triton vs reference, dropout 0.3")
    assert model.base_model.model.c_attn._fastpeft_calls == {"fastpeft": 2}


@needs_kernels
def test_triton_backend_dropout_same_mask_as_reference_backend():
    """In training with dropout the kernels redraw the reference path's Philox mask: same torch seed, same
    output and gradients on both backends (and the mask really drops: the output differs from eval's)."""
    dev = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear(16).to(dev), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                                       lora_dropout=0.3, init_lora_weights=False))
    fastpeft.accelerate(model)
    x = torch.randn(6, 16, device=dev)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        # On CPU tensors the reference backend draws the CPU path's own stream unless asked for the kernels'.
        with fastpeft.use_backend(backend), fastpeft.reference.kernel_stream_on_cpu():
            y = model(x)
            y.square().sum().backward()
        results[backend] = [y.detach()] + [p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]
    assert len(results["triton"]) == 3
    for g, w in zip(results["triton"], results["reference"]):
        assert_close_report(g, w, 1e-4, 1e-5, "triton vs reference, dropout 0.3")
    model.eval()
    assert not torch.allclose(model(x), results["reference"][0])


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
def test_not_a_lora_model(base):
    with pytest.raises(TypeError, match="LlamaForCausalLM has no PEFT LoRA layer"):
        fastpeft.accelerate(copy.deepcopy(base))
    with pytest.raises(TypeError, match="got a str"):
        fastpeft.accelerate("model")
    native = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="fastpeft model"):
        fastpeft.accelerate(native)
    loha = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LOHA"):
        fastpeft.accelerate(loha)
    mixed = peft.PeftMixedModel(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="PeftMixedModel"):
        fastpeft.accelerate(mixed)
    with pytest.raises(TypeError, match="strict must be a bool"):
        fastpeft.accelerate(lora_model(base), strict="yes")


def test_transformers_add_adapter_model(base, ids):
    """A transformers model holding PEFT LoRA layers without a PeftModel around it (``add_adapter``, which in
    transformers 5.24 needs peft >= 0.22, injects them with ``peft.inject_adapter_in_model``)."""
    model = copy.deepcopy(base)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    try:
        model.add_adapter(config)
    except ValueError as e:
        if "version of PEFT" not in str(e):
            raise
        model = peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    want = run(model, ids)
    report = fastpeft.accelerate(model)
    assert len(report.patched) == 6
    assert_same(run(model, ids), want, "transformers add_adapter")


def test_two_active_adapters_with_dropout_in_training_run_peft_forward():
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear(16), peft.LoraConfig(r=4, target_modules=["lin"], lora_dropout=0.1,
                                                               init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["lin"], lora_dropout=0.1, init_lora_weights=False))
    model.base_model.set_adapter(["default", "b"])
    fastpeft.accelerate(model)
    layer = model.base_model.model.lin
    x = torch.randn(4, 16)
    model.eval()
    with fastpeft.use_backend("reference"):
        want = peft.tuners.lora.layer.Linear.forward(layer, x)
        assert_close_report(model(x), want, RTOL, ATOL, "two adapters, eval")
        model.train()
        model(x)
    assert layer._fastpeft_calls == {"fastpeft": 1, "several active adapters with dropout in training (PEFT draws "
                                                    "a mask per adapter)": 1}


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes bases: 4-bit (NF4) through qlora_linear, int8 on PEFT's forward
# ---------------------------------------------------------------------------------------------------------
class QuantizedToy(nn.Module):
    """Two NF4 Linear4bit layers (one nested-statistics with a bias, one plain without) and one Linear8bitLt,
    quantized on the CPU as transformers' BitsAndBytesConfig would leave them; PEFT dispatches its bnb LoRA
    layers by the model's is_loaded_in_4bit / is_loaded_in_8bit."""
    is_loaded_in_4bit = True
    is_loaded_in_8bit = True

    def __init__(self, bnb, d=64, compute_dtype=torch.float32):
        super().__init__()
        self.a = bnb.nn.Linear4bit(d, d, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
        self.b = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        self.c = bnb.nn.Linear8bitLt(d, d, has_fp16_weights=False)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def quantized_model(compute_dtype=torch.float32, **kw):
    from fastpeft.quant import import_bitsandbytes

    try:
        bnb = import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed")
    torch.manual_seed(0)
    toy = QuantizedToy(bnb, compute_dtype=compute_dtype).to("cpu")
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["a", "b", "c"], "init_lora_weights": False, **kw}
    model = peft.get_peft_model(toy, peft.LoraConfig(**kw))
    return model.train()  # eval mode on the CPU: bnb repacks Linear4bit weights for its own inference kernel


def run_x(model, x):
    """Output and the gradients of x and of every trainable parameter of one backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def test_4bit_layers_equal_peft_and_int8_stays_on_peft():
    model = quantized_model()
    types = {n: type(getattr(model.base_model.model, n)) for n in "abc"}
    assert [t.__module__ + "." + t.__name__ for t in types.values()] == \
        ["peft.tuners.lora.bnb.Linear4bit"] * 2 + ["peft.tuners.lora.bnb.Linear8bitLt"]
    x = torch.randn(3, 5, 64)
    want = run_x(model, x)
    assert sorted(want[2]) == sorted(f"base_model.model.{n}.lora_{f}.default.weight" for n in "abc" for f in "AB")
    with pytest.raises(ValueError, match="(?s)strict=True.*int8"):
        fastpeft.accelerate(model, strict=True)
    report = fastpeft.accelerate(model)
    assert report.patched == ["base_model.model.a", "base_model.model.b"] and not report.partial
    assert list(report.skipped) == ["base_model.model.c"] and "LLM.int8" in report.skipped["base_model.model.c"]
    assert type(model.base_model.model.a).__name__ == "AcceleratedLinear4bit"
    assert isinstance(model.base_model.model.a, types["a"])
    got = run_x(model, x)
    assert_close_report(got[0], want[0], RTOL, ATOL, "4-bit: output")
    assert_close_report(got[1], want[1], RTOL, ATOL, "4-bit: grad of x")
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        assert_close_report(got[2][n], want[2][n], RTOL, ATOL, f"4-bit: grad of {n}")
    assert report.calls() == {"fastpeft": 2}
    with fastpeft.use_backend("reference"):  # with dropout 0 every backend computes PEFT's y
        assert_close_report(model(x), want[0], RTOL, ATOL, "4-bit, reference backend")
    fastpeft.restore(model)
    assert type(model.base_model.model.a) is types["a"]
    assert_close_report(model(x), want[0], 0, 0, "restored")


def test_4bit_fp32_adapters_on_bf16_compute_dtype_run_on_fastpeft():
    """PEFT's QLoRA default: fp32 adapters on a bf16 compute dtype. fastpeft computes the branch in the compute
    dtype (PEFT: fp32); against the same layer computed in fp32 on the same 4-bit weight, its error is at most 2x
    PEFT's own (bf16 output), for y, dx and every gradient."""
    model = quantized_model(compute_dtype=torch.bfloat16, target_modules=["a"])
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    want = run_x(model, x)
    layer = model.base_model.model.a
    layer.base_layer.compute_dtype = torch.float32
    ref = run_x(model, x.float())
    layer.base_layer.compute_dtype = torch.bfloat16
    fastpeft.accelerate(model, strict=True)
    got = run_x(model, x)
    assert layer._fastpeft_calls == {"fastpeft": 1}
    pairs = [("y", got[0], want[0], ref[0]), ("dx", got[1], want[1], ref[1])] + [
        (f"grad of {n}", got[2][n], want[2][n], ref[2][n]) for n in want[2]]
    for what, g, w, r in pairs:
        assert _rel_err(g, r) <= 2 * _rel_err(w, r) + 1e-3, (what, _rel_err(g, r), _rel_err(w, r))


def test_4bit_eval_on_cpu_follows_bnb():
    """In eval mode, on a CPU with AVX512-BF16, an input without grad: bnb's Linear4bit repacks its weight for
    its own inference kernel (absmax rounded to bf16, other outputs): that call runs PEFT's forward; every other
    call fastpeft's, equal to PEFT's, a repacked weight unpacked first as bnb's state_dict() does (before
    2026-12-01 every later call ran PEFT's forward until a checkpoint save)."""
    model = quantized_model(target_modules=["a"], lora_dropout=0.1)
    fastpeft.accelerate(model)
    layer = model.base_model.model.a
    model.eval()
    x = torch.randn(4, 64)
    xg = x.clone().requires_grad_(True)
    with fastpeft.use_backend("reference"):
        assert_close_report(layer(xg), peft.tuners.lora.bnb.Linear4bit.forward(layer, xg), RTOL, ATOL, "eval, grad")
    assert layer._fastpeft_calls == {"fastpeft": 1}
    with torch.no_grad():
        want = peft.tuners.lora.bnb.Linear4bit.forward(layer, x)
        assert_close_report(layer(x), want, 0, 0, "eval, no grad")
    repacks = layer.base_layer.support_avx512bf16_for_cpu
    assert getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False) == repacks
    paths = layer._fastpeft_calls
    assert paths["fastpeft"] == (1 if repacks else 2) and sum(paths.values()) == 2
    if repacks:
        assert any("repacked" in k for k in paths if k != "fastpeft")
        with torch.no_grad():  # an input that requires grad: not bnb's kernel's call
            got = layer(xg)
        assert not layer.base_layer.weight.quant_state.packing_format_for_cpu  # unpacked, fastpeft's ops
        assert layer._fastpeft_calls["fastpeft"] == 2 and sum(layer._fastpeft_calls.values()) == 3
        with torch.no_grad():
            assert_close_report(got, peft.tuners.lora.bnb.Linear4bit.forward(layer, xg), RTOL, ATOL, "unpacked")


def test_4bit_eval_on_cpu_without_bnbs_kernel_runs_fastpeft():
    """``fastpeft.quant.set_cpu_inference_kernel(False)``: the eval-mode, no-grad call bnb would run on its CPU
    kernel runs fastpeft's op instead, exactly (the train-mode numbers), and the weight is not repacked."""
    model = quantized_model(target_modules=["a"])
    fastpeft.accelerate(model)
    layer = model.base_model.model.a
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = layer(x)
    prev = fastpeft.quant.set_cpu_inference_kernel(False)
    try:
        with torch.no_grad():
            got = layer.eval()(x)
    finally:
        fastpeft.quant.set_cpu_inference_kernel(prev)
    assert layer._fastpeft_calls == {"fastpeft": 2}
    assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_close_report(got, want, 0, 0, "eval, no grad, bnb's kernel off")


# ---------------------------------------------------------------------------------------------------------
# The kept QuantizedWeight (4-bit) and DoRA norm follow every change at the next call
# ---------------------------------------------------------------------------------------------------------
def peft_forward(layer, x):
    """PEFT's own forward of an accelerated layer (what fastpeft.restore would run)."""
    return type(layer)._fastpeft_original.forward(layer, x)


def assert_follows_peft(layer, x, what, rtol=RTOL, atol=ATOL):
    """One no-grad call on fastpeft's ops (counted), equal to PEFT's forward of the layer as it is now."""
    before = layer._fastpeft_calls["fastpeft"]
    with torch.no_grad():
        got = layer(x)
        want = peft_forward(layer, x)
    assert layer._fastpeft_calls["fastpeft"] == before + 1, f"{what}: {dict(layer._fastpeft_calls)}"
    assert_close_report(got, want, rtol, atol, what)
    return got


@pytest.mark.filterwarnings("ignore:(Merge|Unmerge) lora module to 4-bit linear:UserWarning")
def test_4bit_kept_view_follows_merge_unmerge_and_adapter_changes():
    """The QuantizedWeight kept per 4-bit layer is reused by unchanged calls and rebuilt at the next call after
    PEFT's merge / unmerge (requantized into a new Params4bit), a swapped weight; adapter loads and switches
    reach the op (train mode: bnb's CPU eval repacking stays out)."""
    model = quantized_model(target_modules=["a", "b"])
    torch.manual_seed(2)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["a", "b"],
                                               init_lora_weights=False))
    fastpeft.accelerate(model)
    layer, other_layer = model.base_model.model.a, model.base_model.model.b
    x = torch.randn(2, 64)
    first = assert_follows_peft(layer, x, "first call")
    kept = layer.__dict__["_fastpeft_qw"]
    assert_follows_peft(layer, x, "cached call")
    assert layer.__dict__["_fastpeft_qw"] is kept  # reused, not rebuilt
    layer.merge()
    with torch.no_grad():
        merged = layer(x)  # merged: PEFT's forward
    layer.unmerge()  # requantized twice: a new weight, other bytes
    after = assert_follows_peft(layer, x, "after merge / unmerge")
    assert layer.__dict__["_fastpeft_qw"] is not kept
    assert (merged - first).abs().max() < 0.5 and not torch.equal(after, first)
    w = layer.base_layer.weight
    w.data = w.data.flip(0).contiguous()  # same Parameter, other storage (what .to() does)
    assert_follows_peft(layer, x, "weight data replaced")
    w.quant_state = other_layer.base_layer.weight.quant_state  # same bytes, another quant_state (other absmax)
    assert_follows_peft(layer, x, "quant_state replaced")
    layer.base_layer.weight = other_layer.base_layer.weight  # another layer's packed weight (no bias there)
    assert_follows_peft(layer, x, "swapped weight")
    model.set_adapter("other")
    assert_follows_peft(layer, x, "set_adapter('other')")
    model.set_adapter("default")
    assert_follows_peft(layer, x, "set_adapter('default')")
    loaded = {k: v.flip(0) for k, v in peft.get_peft_model_state_dict(model, adapter_name="default").items()}
    peft.set_peft_model_state_dict(model, loaded, adapter_name="default")
    assert torch.equal(layer.lora_A["default"].weight, loaded["base_model.model.a.lora_A.weight"])
    assert_follows_peft(layer, x, "other adapter weights loaded")
    fastpeft.restore(model)
    assert "_fastpeft_qw" not in layer.__dict__


def dora_linear_model(d=32, seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(OneLinear(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                              use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_()  # a norm well away from ‖W‖
    return model.eval()


def test_dora_norm_cache_follows_peft_changes():
    """Eval / no-grad DoRA calls of an accelerated PEFT layer keep the norm (and m / norm); every change PEFT
    makes takes effect at the next call: magnitude, lora_A, lora_B, W written in place, the scaling, set_adapter,
    disable_adapter, loaded adapter weights, merge / unmerge."""
    model = dora_linear_model()
    torch.manual_seed(3)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], use_dora=True,
                                               init_lora_weights=False))
    fastpeft.accelerate(model, strict=True)
    layer = model.base_model.model.lin
    x = torch.randn(3, 32)
    assert_follows_peft(layer, x, "first call")
    kept = layer.__dict__["_fastpeft_dora"]["gain"]
    assert_follows_peft(layer, x, "cached call")
    assert layer.__dict__["_fastpeft_dora"]["gain"] is kept  # the norm was not recomputed
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    assert_follows_peft(layer, x, "magnitude written in place")
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(0.5)
    assert_follows_peft(layer, x, "lora_A written in place")
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(-2)
    assert_follows_peft(layer, x, "lora_B written in place")
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)
    assert_follows_peft(layer, x, "W written in place")
    layer.scale_layer(0.5)
    assert_follows_peft(layer, x, "scaling")
    layer.unscale_layer()
    assert_follows_peft(layer, x, "scaling back")
    model.set_adapter("other")
    assert_follows_peft(layer, x, "set_adapter('other')")
    model.set_adapter("default")
    assert_follows_peft(layer, x, "set_adapter('default')")
    with model.disable_adapter(), torch.no_grad():
        assert_close_report(layer(x), layer.base_layer(x), 0, 0, "disabled")
    assert_follows_peft(layer, x, "adapters enabled again")
    donor = dora_linear_model(seed=5)
    loaded = peft.get_peft_model_state_dict(donor)
    peft.set_peft_model_state_dict(model, loaded, adapter_name="default")
    assert torch.equal(layer.lora_magnitude_vector["default"].weight,
                       donor.base_model.model.lin.lora_magnitude_vector["default"].weight)
    assert_follows_peft(layer, x, "other adapter weights loaded")
    model.merge_adapter()
    with torch.no_grad():
        layer(x)  # merged: PEFT's forward
    model.unmerge_adapter()
    assert_follows_peft(layer, x, "after merge / unmerge", 1e-4, 1e-5)
    fastpeft.restore(model)
    assert "_fastpeft_dora" not in layer.__dict__


@pytest.mark.filterwarnings("ignore:(Merge|Unmerge) lora module to 4-bit linear:UserWarning")
def test_4bit_kept_view_does_not_keep_a_replaced_weight_alive():
    """PEFT's merge and .to() on an accelerated 4-bit layer drop its kept QuantizedWeight: the packed weight they
    replaced is freed at once, not at the layer's next call (a merged layer keeps none: its calls run PEFT's
    forward before reading the weight)."""
    import gc
    import weakref

    model = quantized_model(target_modules=["a"])
    fastpeft.accelerate(model)
    layer = model.base_model.model.a
    x = torch.randn(2, 64)
    for step in ("merge", "to"):
        assert_follows_peft(layer, x, f"before {step}")
        old = weakref.ref(layer.__dict__["_fastpeft_qw"][2].data)  # the packed bytes the kept view holds
        if step == "to":
            layer.base_layer.weight.data = layer.base_layer.weight.data.clone()  # as a move swaps the data
            layer.to("cpu")
        else:
            layer.merge()
            with torch.no_grad():
                layer(x)  # merged: PEFT's forward, nothing kept
            assert "_fastpeft_qw" not in layer.__dict__
            layer.unmerge()
        gc.collect()
        assert old() is None, step
    assert_follows_peft(layer, x, "after")


def test_mixed_batch_keeps_its_stacks_until_a_factor_or_scaling_changes(base, ids, monkeypatch):
    """adapter_names batches without a gradient: the padded stacks are built once and kept while the same
    adapters come back; an in-place update of a factor, a replaced factor, another scaling or another set of
    adapters builds them again (and gives PEFT's outputs); with a gradient they are built at every call."""
    import sys
    A = sys.modules["fastpeft.accelerate"]  # the module (fastpeft.accelerate is the function)
    model = with_small_adapter(lora_model(base), 8, ["q_proj", "v_proj"])
    model.eval()
    names = ["small", "__base__", "default"]
    fastpeft.accelerate(model)
    layer = q_proj(model)
    built = []
    real = A.F.pad
    monkeypatch.setattr(A.F, "pad", lambda *a, **kw: built.append(1) or real(*a, **kw))

    def builds(**kw):
        built.clear()
        with torch.no_grad():
            out = model(input_ids=ids, adapter_names=kw.pop("names", names)).logits
        return len(built), out
    first, _ = builds()
    assert first > 0
    assert builds()[0] == 0  # kept
    with torch.no_grad():
        layer.lora_B["small"].weight.add_(0.5)  # in place: its version moves
    n, got = builds()
    assert n > 0
    fastpeft.restore(model)
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
    assert_close_report(got, want, rtol=1e-5, atol=1e-5, what="after an in-place update")
    fastpeft.accelerate(model)
    builds()
    layer.lora_A["default"].weight = nn.Parameter(layer.lora_A["default"].weight.detach() * 2)  # replaced
    assert builds()[0] > 0 and builds()[0] == 0
    layer.scaling["small"] *= 2
    assert builds()[0] > 0
    assert builds(names=["default", "default", "__base__"])[0] > 0
    built.clear()
    model(input_ids=ids, adapter_names=names).logits.sum().backward()  # a gradient: built, not kept
    assert built and "_fastpeft_stacks" in layer.__dict__
    built.clear()
    model(input_ids=ids, adapter_names=names)
    assert built
    fastpeft.restore(model)
    assert "_fastpeft_stacks" not in layer.__dict__


def test_per_call_tensor_checks_name_what_falls_back(base, ids):
    """The per-call checks of x and the layer's tensors: a tensor subclass factor, a factor of an integer dtype, a
    meta input, a factor on another device (meta here) and a factor with a bias each run PEFT's forward, with the
    reason named; after each is undone the layer runs on fastpeft's ops again."""
    from fastpeft.accelerate import runtime_fallback_reason

    class Sub(torch.Tensor):
        pass

    model = lora_model(base)
    fastpeft.accelerate(model)
    layer = q_proj(model)
    x = torch.randn(2, 64)
    lora_a = layer.lora_A["default"]
    w = lora_a.weight
    assert runtime_fallback_reason(layer, x) is None
    cases = [
        ("weight", nn.Parameter(w.detach().as_subclass(Sub)), "a Sub of dtype torch.float32 on cpu"),
        ("weight", nn.Parameter(torch.zeros(w.shape, dtype=torch.int32), requires_grad=False),
         "a Parameter of dtype torch.int32 on cpu"),
        ("weight", nn.Parameter(torch.empty(w.shape, device="meta")), "parameters on meta, input on cpu"),
        ("bias", nn.Parameter(torch.zeros(w.shape[0])),
         "adapter 'default': lora_A with a bias, lora_B without one, for lora_bias=False"),
        ("weight", None, "a NoneType of dtype None on None"),
    ]
    for name, value, why in cases:
        old = lora_a._parameters.get(name)
        setattr(lora_a, name, value)
        try:
            assert runtime_fallback_reason(layer, x) == why, name
        finally:
            setattr(lora_a, name, old)
    assert runtime_fallback_reason(layer, x.to("meta")) == "a Tensor of dtype torch.float32 on meta"
    assert runtime_fallback_reason(layer, x) is None
    run(model, ids)
    assert layer._fastpeft_calls == {"fastpeft": 1}


def test_layers_injected_by_peft_without_a_peft_model(base, ids):
    """``peft.inject_adapter_in_model`` (what transformers' ``add_adapter`` calls) leaves a plain model with PEFT
    LoRA layers: accelerate patches them, with PEFT's outputs and gradients."""
    torch.manual_seed(0)
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False), copy.deepcopy(base))
    want = run(model, ids)
    report = fastpeft.accelerate(model, strict=True)
    assert_same(run(model, ids), want, "inject_adapter_in_model")
    assert report.calls() == {"fastpeft": 2 * len(TARGETS)}


def test_4bit_fp32_input_on_bf16_compute_dtype_stays_on_peft():
    """prepare_model_for_kbit_training's recipe: fp32 activations into a 4-bit layer computing in bf16, fp32
    adapters. PEFT computes the LoRA branch in fp32 there (~4x more accurate than in bf16): PEFT's forward runs."""
    model = quantized_model(compute_dtype=torch.bfloat16, target_modules=["a"])
    x = torch.randn(4, 64)
    want = run_x(model, x)
    fastpeft.accelerate(model, strict=True)
    got = run_x(model, x)
    layer = model.base_model.model.a
    assert list(layer._fastpeft_calls) == ["float32 input on a 4-bit layer computing in bfloat16 (PEFT computes the "
                                           "LoRA branch in the input's and adapters' precision)"]
    assert_close_report(got[0], want[0], 0, 0, "fp32 input, bf16 compute dtype")


def test_adapters_added_after_accelerate_are_patched_too(base, ids, tmp_path):
    """``load_adapter`` / ``add_adapter`` after ``accelerate`` put PEFT LoRA layers on modules that had none: they
    are patched as well and the report follows (before 2026-12-01 they ran PEFT's forward, unreported, until
    ``accelerate`` was called again). The model still pickles, and ``restore`` takes the wrappers off."""
    import io

    lora_model(base, seed=3, target_modules=["q_proj", "up_proj"]).save_pretrained(tmp_path)
    model = lora_model(base)
    report = fastpeft.accelerate(model)
    first = len(report.patched)
    model.load_adapter(tmp_path, adapter_name="b")
    torch.manual_seed(2)
    model.add_adapter("c", peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    lora = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert all(hasattr(type(m), "_fastpeft_original") for m in lora.values())
    assert sorted(report.patched) == sorted(lora) and len(report.patched) > first
    plain = lora_model(base)
    plain.load_adapter(tmp_path, adapter_name="b")
    torch.manual_seed(2)
    plain.add_adapter("c", peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    for name in ("b", "c"):
        model.set_adapter(name)
        plain.set_adapter(name)
        assert_same(run(model, ids), run(plain, ids), f"adapter {name}")
    assert report.calls().get("fastpeft", 0) > 0
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert "load_adapter" in torch.load(buf, weights_only=False).__dict__
    fastpeft.restore(model)
    assert "load_adapter" not in model.__dict__ and "_fastpeft_report" not in model.__dict__
    assert not any(hasattr(type(m), "_fastpeft_original") for m in model.modules())


def test_a_later_adapter_fastpeft_cannot_compute_is_warned_of(base):
    """The warning names the user's line (before 2026-12-01 it pointed into fastpeft.hf's method wrapper)."""
    model = lora_model(base)
    report = fastpeft.accelerate(model, strict=True)
    with pytest.warns(UserWarning, match=r"after add_adapter: 1 LoRA layers keep PEFT's forward \(for the new "
                                         r"adapter\): .*Embedding") as caught:
        model.add_adapter("e", peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert [w.filename for w in caught if "after add_adapter" in str(w.message)] == [__file__]
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]


def test_every_report_handed_out_follows_later_adapters(base, ids):
    """A second ``accelerate`` call returns a report of its own (newly_patched 0); the first one, which a user may
    have kept, follows the adapters added later too: their layers listed, their calls counted (before
    2026-12-01 only the newest report did)."""
    model = lora_model(base)
    first = fastpeft.accelerate(model)
    before = first.newly_patched
    second = fastpeft.accelerate(model)
    assert second.newly_patched == 0 and second.patched == first.patched
    model.add_adapter("new", peft.LoraConfig(r=4, target_modules=["up_proj"]))
    for report in (first, second):
        assert any(n.endswith("up_proj") for n in report.patched), report.patched
    assert second.newly_patched > 0 and first.newly_patched == before + second.newly_patched
    model.set_adapter("new")
    model(input_ids=ids)
    assert first.calls() == second.calls() and first.calls().get("fastpeft", 0) > 0


def test_falcon_linear_layers_are_accelerated():
    """Falcon's projections are FalconLinear, an nn.Linear subclass computing x Wᵀ + b (quant._PLAIN_FORWARD):
    accelerated like nn.Linear, with PEFT's outputs and gradients (before 2026-12-01 every one was skipped as
    'not an nn.Linear')."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    base = transformers.FalconForCausalLM(cfg).eval()
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                     init_lora_weights=False))
    model = copy.deepcopy(plain)
    report = fastpeft.accelerate(model, strict=True)
    assert len(report.patched) == 4 and not report.skipped
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    got, want = model(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert report.calls() == {"fastpeft": 4}
