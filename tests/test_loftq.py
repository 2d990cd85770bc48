"""PEFT's LoftQ in fastpeft: ``inject`` with ``init_lora_weights="loftq"`` (and ``FastLoRALinear``) quantizes each
target's W with bitsandbytes' quantizer and sets B A to the top-r part of the error, giving PEFT's factors and base
weights bit for bit (PEFT's own ``loftq_init`` run on the CPU here: PEFT hard-codes a CUDA / XPU device); files load
onto the original model (Q made again), onto the model loaded in 4 bits (as plain LoRA) and into PEFT; and
``replace_lora_weights_loftq`` sets the adapters of a model loaded in 4 / 8 bits as PEFT's does."""
import copy
import inspect
import json
import os
import warnings

import pytest
import torch

import fastpeft
from conftest import assert_close_to_largest as _close
from conftest import bitsandbytes_or_skip
from fastpeft import LoraConfig
from fastpeft.inject import adapter_configs

bnb = bitsandbytes_or_skip()
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import peft.tuners.lora.layer as peft_lora_layer  # noqa: E402
import peft.utils.loftq_utils as peft_loftq  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_pissa import _pair  # noqa: E402  (PEFT's get_peft_model and fastpeft's inject, the same config and seed)

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _on_the_cpu(fn):
    """PEFT's ``fn`` (``loftq_init`` / ``_loftq_init_new``) with its compute device the CPU instead of the hard-coded
    CUDA / XPU one: PEFT's code otherwise, line for line."""
    src = inspect.getsource(fn)
    device = '"xpu" if is_xpu_available() else "cuda"'
    assert device in src, "PEFT's LoftQ picks its device another way now: update this test"
    ns = dict(vars(peft_loftq))
    exec(src.replace(device, '"cpu"'), ns)
    return ns[fn.__name__]


@pytest.fixture
def peft_loftq_on_the_cpu(monkeypatch):
    monkeypatch.setattr(peft_lora_layer, "loftq_init", _on_the_cpu(peft_loftq.loftq_init))


def _llama(dtype=torch.float32, hidden=64):
    # features multiples of bnb's 64-block (its CPU quantizer's layout)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _config(bits=4, iters=1, **kw):
    return dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                loftq_config={"loftq_bits": bits, "loftq_iter": iters}, **kw)


def _trained(model, seed=5):
    """The adapters moved as training would (B non-zero too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model


@pytest.mark.parametrize("bits,iters,dtype", [
    (4, 1, torch.float32), (4, 1, torch.bfloat16), (4, 3, torch.float32), (4, 3, torch.bfloat16),
    (8, 2, torch.float32), (8, 2, torch.bfloat16), (4, 2, torch.float64),
], ids=["nf4-1iter-fp32", "nf4-1iter-bf16", "nf4-3iter-fp32", "nf4-3iter-bf16", "int8-2iter-fp32", "int8-2iter-bf16",
        "nf4-2iter-fp64"])
def test_factors_and_quantized_base_are_peft_bits(peft_loftq_on_the_cpu, bits, iters, dtype):
    base = _llama(dtype)
    theirs, ours = _pair(base, **_config(bits, iters))
    for name, fl in fastpeft.lora_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        for mine, peft_s in ((fl.lora_A, pl.lora_A["default"].weight), (fl.lora_B, pl.lora_B["default"].weight),
                             (fl.weight, pl.base_layer.weight)):
            assert mine.dtype == peft_s.dtype
            torch.testing.assert_close(mine, peft_s, rtol=0, atol=0)
        w0 = base.get_submodule(name).weight.float()
        q = fl.weight.float()
        assert not torch.equal(q, w0)  # W was replaced by its quantized value ...
        error, left = (w0 - q).norm(), (w0 - q - fl.lora_B.float() @ fl.lora_A.float()).norm()
        assert left < error  # ... and B A takes part of the error back
    with torch.no_grad():  # bf16: within two bf16 steps of the largest logit (the LoRA term rounds elsewhere)
        _close(ours(IDS).logits.float(), theirs(IDS).logits.float(), 2 ** -7 if dtype == torch.bfloat16 else 1e-5)


def test_dora_magnitude_and_gradients_follow_peft(peft_loftq_on_the_cpu):
    theirs, ours = _pair(_llama(), **_config(use_dora=True))
    for name, fl in fastpeft.lora_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(fl.lora_magnitude_vector["default"],
                                   pl.lora_magnitude_vector["default"].weight, rtol=0, atol=0)
    theirs.train()
    ours.train()
    got, want = ours(IDS, labels=IDS), theirs(IDS, labels=IDS)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for name, fl in fastpeft.lora_layers(ours).items():
        pl = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(fl.lora_A.grad, pl.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fl.lora_B.grad, pl.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_layer_takes_loftq_with_peft_s_default_config_and_warns_of_the_scaling():
    torch.manual_seed(0)
    lin = torch.nn.Linear(130, 80)
    w0 = lin.weight.detach().clone()
    a, b, q = fastpeft.layers.loftq_factors(w0, 8)  # PEFT's LoftQConfig(): 4 bits, 1 iteration
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # s = 1: no warning
        layer = fastpeft.FastLoRALinear.from_linear(lin, r=8, lora_alpha=8, init_lora_weights="loftq")
    for got, want in ((layer.lora_A, a), (layer.lora_B, b), (layer.weight, q)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"without the scaling s = 2.*Q \+ 2 \(W - Q\).*lora_alpha = r"):
        fastpeft.FastLoRALinear(130, 80, r=8, lora_alpha=16, init_lora_weights="loftq",
                                loftq_config={"loftq_bits": 8, "loftq_iter": 2})


def test_files_load_onto_the_original_model_the_4bit_one_and_into_peft(peft_loftq_on_the_cpu, tmp_path):
    """PEFT's LoftQ flow: make the adapter on the full-precision model, train, save it and the quantized base
    (``unload``), load that base in NF4 and the adapter on it; or load the adapter onto the original model, where
    Q is made again."""
    base = _llama()
    # all-linear: every layer transformers quantizes then holds LoftQ's Q
    model = _trained(fastpeft.inject(copy.deepcopy(base), LoraConfig(**{**_config(), "target_modules": "all-linear"})))
    with torch.no_grad():
        want = model(IDS).logits
    fastpeft.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq"
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert not any("base_layer" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))

    again = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "adapter")  # the original model: Q again
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, want, rtol=1e-5, atol=1e-5)

    fastpeft.unload(model).save_pretrained(tmp_path / "loftq-base")  # Q in fp32: NF4 of it is Q again
    q4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "loftq-base", quantization_config=q4,
                                                                device_map="cpu").eval()
    nf4 = fastpeft.load_adapter(nf4, tmp_path / "adapter")  # a model in 4 bits: loaded as plain LoRA on it
    assert adapter_configs(nf4)["default"].init_lora_weights is True
    with torch.no_grad():  # (train mode, no dropout: fastpeft's exact fp32 path; in eval bnb's CPU kernel serves,
        # which rounds on its own: ~2e-3 here, with or without adapters)
        torch.testing.assert_close(nf4.train()(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_scaling_warned_when_the_adapter_is_made_not_when_a_file_loads(tmp_path):
    base = _llama()
    with pytest.warns(UserWarning, match="without the scaling s = 2"):
        model = fastpeft.inject(copy.deepcopy(base), LoraConfig(**{**_config(), "lora_alpha": 8}))
    fastpeft.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LoftQ")  # the file's A and B replace LoftQ's start
        fastpeft.load_adapter(copy.deepcopy(base), tmp_path)


def test_to_peft_keeps_the_quantized_base_and_peft_s_config(peft_loftq_on_the_cpu):
    model = _trained(fastpeft.inject(_llama(), LoraConfig(**_config())))
    with torch.no_grad():
        want = model(IDS).logits
    theirs = fastpeft.to_peft(model).eval()
    assert theirs.peft_config["default"].init_lora_weights == "loftq"
    assert theirs.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 1}
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    _llama().save_pretrained(d)
    return d


def _quantized(checkpoint, bits):
    q = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
         if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=q, device_map="cpu")
    return fastpeft.inject(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear")).eval()


@pytest.mark.parametrize("bits", [4, 8], ids=["nf4", "int8"])
def test_replace_lora_weights_loftq_gives_peft_s_factors_and_lowers_the_error(checkpoint, bits):
    full = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model = _quantized(checkpoint, bits)
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    # PEFT's factors first: after an eval call on the CPU bnb's own dequantize_4bit no longer reads the layer right
    # (its quant state changes; fastpeft keeps the state it read)
    peft_s = _on_the_cpu(peft_loftq._loftq_init_new)
    want_factors = {}
    for name, layer in fastpeft.lora_layers(model).items():
        w = weights[f"{name}.weight"].float()
        if bits == 4:  # PEFT's own (4 bits only), on the layer's packed weight
            want_factors[name] = peft_s(layer.weight, weights[f"{name}.weight"], num_bits=4, reduced_rank=4)
            q = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        else:
            q = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
            want_factors[name] = fastpeft.layers.loftq_error_factors(w - q, 4)
        a, b = want_factors[name]
        assert (w - q - b @ a).norm() < (w - q).norm()
    with torch.no_grad():
        want = full(IDS).logits
        error = (model(IDS).logits - want).abs().mean()
    assert fastpeft.replace_lora_weights_loftq(model, checkpoint, progress=False) is model
    for name, layer in fastpeft.lora_layers(model).items():
        torch.testing.assert_close(layer.lora_A, want_factors[name][0], rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, want_factors[name][1], rtol=0, atol=0)
    if bits == 4:  # (int8: bnb's int8 matmul also rounds the inputs, an error of its own)
        with torch.no_grad():
            assert (model(IDS).logits - want).abs().mean() < error


def test_replace_lora_weights_loftq_callback_keeps_or_rolls_back(checkpoint):
    model = _quantized(checkpoint, 4)
    before = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in fastpeft.lora_layers(model).items()}
    seen = []

    def keep_attention(m, name):
        assert m is model
        seen.append(name)
        return "self_attn" in name
    fastpeft.replace_lora_weights_loftq(model, os.path.join(checkpoint, "model.safetensors"), callback=keep_attention,
                                        progress=False)
    assert seen == list(before)
    for name, layer in fastpeft.lora_layers(model).items():
        kept = torch.equal(layer.lora_B, before[name][1])
        assert kept != ("self_attn" in name), name
        if kept:
            assert torch.equal(layer.lora_A, before[name][0])


def test_replace_lora_weights_loftq_on_gpt2_s_conv1d_layers_and_a_rank_above_a_layer_s_size(tmp_path):
    """transformers loads GPT-2's Conv1D projections in 4 bits transposed to (out, in); the checkpoint keeps (in, out):
    W is read transposed (PEFT's takes the stored matrix, which on a square layer gives factors that raise the error).
    r above min(out, in): the SVD's triplets and zero rows / columns, PEFT's product B A."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    q4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q4, device_map="cpu")
        model = fastpeft.inject(model, LoraConfig(r=80, lora_alpha=80, target_modules=["c_attn", "c_proj"]))
        want = {}
        for name, layer in fastpeft.lora_layers(model).items():
            w = weights[f"{name}.weight"].t().float()  # (in, out) stored
            q = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            want[name] = w, q, fastpeft.layers.loftq_error_factors(w - q, 80)
        fastpeft.replace_lora_weights_loftq(model, tmp_path, progress=False)
    for name, layer in fastpeft.lora_layers(model).items():
        w, q, (a, b) = want[name]
        k = min(w.shape)
        assert tuple(layer.lora_A.shape) == (80, layer.in_features)  # the adapter's shapes kept
        torch.testing.assert_close(layer.lora_A[:k], a, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B[:, :k], b, rtol=0, atol=0)
        assert not layer.lora_A[k:].any() and not layer.lora_B[:, k:].any()
        assert (w - q - layer.lora_B @ layer.lora_A).norm() < 1e-4 * (w - q).norm()  # r >= min: all of the error
