"""LoRA and DoRA on transformers' Conv1D (GPT-2's projections: y = x W + b, W stored (in, out); PEFT's
``fan_in_fan_out``) through ``fastpeft.inject`` / ``load_adapter``: the layer reads W as a transposed view of the
Conv1D's memory (no copy), and everything around it keeps Conv1D's layout: PEFT's files both ways (same outputs and
gradients as PEFT), ``state_dict`` keys and shapes, ``merge_and_unload`` (a Conv1D back), ``to_peft``, mixed batches,
the kernels (interpreter). Before 2026-12-01 ``inject`` refused Conv1D targets and ``load_adapter`` refused PEFT's
GPT-2 files (fan_in_fan_out)."""
import copy
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from conftest import assert_close_report, loss_step, peft_and_fastpeft_mixed_batches, train_steps  # noqa: E402
from fastpeft import FastLoRALinear, LoraConfig, SparseDeltaConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 61
TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def peft_files(gpt2, tmp_path, name="peft", **kw):
    """A PEFT LoRA of GPT-2 (non-zero B), saved with save_pretrained: (PeftModel, folder)."""
    torch.manual_seed(3)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but the target module is Conv1D"
        model = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(**kw))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _factor_key(name: str):
    """(module path, kind) of a LoRA factor or DoRA magnitude, PEFT's or fastpeft's; None for anything else."""
    name = name.replace("base_model.model.", "")
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
        if kind in name:
            return name.split(f".{kind}")[0], kind
    return None


def step(model, ids):
    """Logits and the gradients of the LoRA factors (and DoRA magnitudes), by module path and kind."""
    return loss_step(model, ids, _factor_key)


def c_attn(model):
    return model.transformer.h[0].attn.c_attn


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_gpt2_files_load_with_peft_outputs_and_gradients(gpt2, ids, tmp_path, dora):
    pm, folder = peft_files(gpt2, tmp_path, use_dora=dora)
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # PEFT sets it
    model = fastpeft.load_adapter(copy.deepcopy(gpt2), folder)
    layer = c_attn(model)
    assert isinstance(layer, FastLoRALinear) and layer.fan_in_fan_out
    assert layer.weight.shape == (32, 96) and layer._w().shape == (96, 32) and layer._w().stride() == (1, 96)
    (lw, gw), (lg, gg) = step(pm, ids), step(model, ids)
    tol = 1e-6 if dora else 0.0  # LoRA: the same operations as PEFT's Conv1D addmm and branch
    assert_close_report(lg, lw, tol, tol, "logits")
    assert gg.keys() == gw.keys() and len(gw) == 8 * (3 if dora else 2)  # c_attn, c_proj (2), c_fc per block
    for k in gw:
        assert_close_report(gg[k], gw[k], 1e-5, 1e-6, f"grad {k}")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_inject_save_and_peft_loads_the_same_model(gpt2, ids, tmp_path, dora):
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            init_lora_weights=False, use_dora=dora))
    assert sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, FastLoRALinear)) == \
        ["c_attn"] * 2 + ["c_fc"] * 2 + ["c_proj"] * 4
    fastpeft.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True  # as PEFT's layers hold it on Conv1D
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out")  # PEFT loads it without its flag warning
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours", is_trainable=True)
    (lw, gw), (lg, gg) = step(pm, ids), step(model, ids)
    assert_close_report(lg, lw, 1e-6, 1e-6, "logits")
    for k in gw:
        assert_close_report(gg[k], gw[k], 1e-5, 1e-6, f"grad {k}")


def test_the_conv1d_parameter_stays_and_a_base_checkpoint_loads(gpt2, ids):
    """The layer holds the Conv1D's own (in, out) Parameter under ``weight``: named_parameters and state_dict agree
    (functional_call with the model's own state_dict gives the model's outputs; GPT-2's c_proj is square, where a
    transposed entry would pass silently), and GPT-2's own checkpoint loads into the injected model."""
    base_sd = {k: v.clone() for k, v in gpt2.state_dict().items()}
    model = copy.deepcopy(gpt2)
    conv = model.transformer.h[0].attn.c_proj
    fastpeft.inject(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_proj
    assert layer.weight is conv.weight and layer.weight.shape == (32, 32) and not layer.weight.requires_grad
    assert (layer.in_features, layer.out_features) == (32, 32) and c_attn(model).in_features == 32
    sd = model.state_dict()
    params = dict(model.named_parameters())
    for k, v in base_sd.items():
        assert sd[k].shape == v.shape and torch.equal(sd[k], v), k
        if k in params:
            assert params[k].shape == v.shape, k
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.func.functional_call(model, {k: v.clone() for k, v in sd.items() if k != "lm_head.weight"},
                                         (ids,)).logits
    assert_close_report(got, want, 0, 0, "functional_call with the model's own state_dict")
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.zero_()
        missing, unexpected = model.load_state_dict(base_sd, strict=False)  # GPT-2's own checkpoint
    assert unexpected == [] and all("lora_" in k for k in missing)
    with torch.no_grad():
        assert_close_report(model(ids).logits, want, 0, 0, "after loading GPT-2's base state_dict")


def test_an_unfrozen_conv1d_weight_gets_its_gradient_after_eval_calls():
    """The transposed view of W kept between calls is not handed out once W requires grad (it would be a view
    with no autograd edge to W: no gradient, silently)."""
    torch.manual_seed(0)
    layer = FastLoRALinear.from_conv1d(transformers.pytorch_utils.Conv1D(6, 4), r=2, init_lora_weights=False)
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer(x)
    layer.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (4, 6)
    assert_close_report(layer.weight.grad, x.sum(0)[:, None].expand(4, 6), 1e-6, 1e-6, "dW of sum(x W)")


def test_a_deepcopy_does_not_copy_the_kept_view_apart_from_w():
    """The transposed view kept between eval calls stays out of a deepcopy / pickle (it would be copied apart from
    W: a second full W in the copy until its next call)."""
    layer = FastLoRALinear.from_conv1d(transformers.pytorch_utils.Conv1D(6, 4), r=2, init_lora_weights=False).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer(x)
    assert "_wt" in layer.__dict__
    copied = copy.deepcopy(layer)
    assert "_wt" not in copied.__dict__
    with torch.no_grad():
        assert torch.equal(copied(x), layer(x))
    assert copied._w().data_ptr() == copied.weight.data_ptr()


def test_a_tied_conv1d_weight_gets_its_own_merged_copy(gpt2, ids):
    """Merging into a Conv1D weight that another module shares: the merged layer gets its own copy (warned), the
    other keeps the base weight, as for an nn.Linear."""
    model = copy.deepcopy(gpt2)
    model.transformer.h[1].attn.c_attn.weight = model.transformer.h[0].attn.c_attn.weight
    with pytest.warns(UserWarning, match=r"tied to \['transformer.h.1.attn.c_attn.weight'\]"):
        fastpeft.inject(model, LoraConfig(r=4, target_modules=["transformer.h.0.attn.c_attn"],
                                          init_lora_weights=False))
    model.eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        other = model.transformer.h[1].attn.c_attn(x)
        want = model(ids).logits
    with pytest.warns(UserWarning, match="tied"):
        fastpeft.merge_and_unload(model)
    with torch.no_grad():
        assert_close_report(model.transformer.h[1].attn.c_attn(x), other, 0, 0, "the untargeted tied layer")
        assert_close_report(model(ids).logits, want, 1e-5, 1e-5, "merged")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_gives_conv1d_back(gpt2, ids, dora):
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            init_lora_weights=False, use_dora=dora)).eval()
    with torch.no_grad():
        want = model(ids).logits
        c_attn(model).merge()
        assert_close_report(model(ids).logits, want, 1e-5, 1e-5, "one layer merged")
        c_attn(model).unmerge()
        fastpeft.merge_and_unload(model)
        got = model(ids).logits
    conv = c_attn(model)
    assert type(conv) is transformers.pytorch_utils.Conv1D and conv.weight.shape == (32, 96)
    assert conv.weight.is_contiguous() and not conv.weight.requires_grad
    assert set(model.state_dict()) == set(gpt2.state_dict())
    assert_close_report(got, want, 1e-5, 1e-5, "merged and unloaded")
    # the unloaded model saves and loads as a plain GPT-2
    reloaded = copy.deepcopy(gpt2)
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close_report(reloaded(ids).logits, want, 1e-5, 1e-5, "reloaded")


def test_to_peft_and_training_steps(gpt2, ids):
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            lora_dropout=0.1))
    losses = train_steps(model, ids, 4)
    assert losses[-1] < losses[0]
    assert c_attn(model).lora_B.abs().sum() > 0  # B moved from its zero init
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    pm = fastpeft.to_peft(model)
    assert type(pm.base_model.model.transformer.h[0].attn.c_attn.base_layer) is transformers.pytorch_utils.Conv1D
    with torch.no_grad():
        assert_close_report(pm(ids).logits, want, 1e-6, 1e-6, "to_peft")


def test_mixed_batch_over_conv1d_layers(gpt2, ids, tmp_path):
    """Per-sequence adapters (two ranks, and the base) through Conv1D layers equal PEFT's adapter_names batch."""
    pm, a = peft_files(gpt2, tmp_path, "a")
    _, b = peft_files(gpt2, tmp_path, "b", r=2, lora_alpha=2, target_modules=["c_attn"])
    want, got, _ = peft_and_fastpeft_mixed_batches(pm, gpt2, a, b, ids)
    assert_close_report(got, want, 1e-6, 1e-6, "mixed batch")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_kernels_read_the_transposed_view(gpt2, ids, dora, dev):
    """On the triton backend (the interpreter on CPU tensors, the compiled kernels on a card: the GPU check runs the
    gpu-marked case), dropout in training: outputs and gradients equal the reference backend's with the kernels'
    mask, W read as the transposed view; then a mixed batch in eval."""
    if not fastpeft.kernels.HAS_TRITON or (dev == "cpu") != fastpeft.kernels.INTERPRET:
        pytest.skip("the triton backend on this device needs " + ("TRITON_INTERPRET=1" if dev == "cpu" else
                                                                   "a GPU without TRITON_INTERPRET"))
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            lora_dropout=0.2, init_lora_weights=False,
                                                            use_dora=dora)).to(dev)
    ids = ids.to(dev)
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(7)
        with fastpeft.use_backend(backend), fastpeft.reference.kernel_stream_on_cpu():
            results[backend] = step(model, ids)
    (lr, gr), (lt, gt) = results["reference"], results["triton"]
    assert_close_report(lt, lr, 1e-4, 1e-5, "logits")
    assert len(gr) == (6 if dora else 4)
    for k in gr:
        assert_close_report(gt[k], gr[k], 1e-4, 1e-5, f"grad {k}")
    if dora:
        return  # (mixed batches route LoRA adapters only)
    fastpeft.inject(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False), "b")
    model.eval()
    outs = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with fastpeft.use_backend(backend), fastpeft.mixed_batch(model, ["b", None, "default"]):
                outs[backend] = model(ids).logits
    assert_close_report(outs["triton"], outs["reference"], 1e-4, 1e-5, "mixed batch")


def test_refused_targets_name_the_module(gpt2):
    class OwnConv1D(transformers.pytorch_utils.Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    model = copy.deepcopy(gpt2)
    c_attn(model).__class__ = OwnConv1D
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn'.*OwnConv1D.*forward of its own"):
        fastpeft.inject(model, LoraConfig(target_modules=["c_attn"]))
    assert type(c_attn(model)) is OwnConv1D
    with pytest.raises(ValueError, match=r"transformers Conv1D.*not a sparse delta.*sparse_density=0"):
        fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(target_modules=["c_attn"], sparse_density=0.01))
    with pytest.raises(ValueError, match=r"transformers Conv1D.*not a sparse delta"):
        fastpeft.inject(copy.deepcopy(gpt2), SparseDeltaConfig(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match=r"conv must be a transformers Conv1D.*torch.nn.modules.linear.Linear"):
        FastLoRALinear.from_conv1d(torch.nn.Linear(4, 4))
    # RoSA as a second adapter on a Conv1D-made layer: refused before any layer changes (the file would not load)
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn'.*Conv1D.*not a sparse delta"):
        fastpeft.inject(model, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], sparse_density=0.01), "rosa")
    assert model.state_dict().keys() == before.keys() and c_attn(model).adapter_names == ["default"]
    with pytest.raises(ValueError, match=r"sparse_density=0.01 on a layer made from a transformers Conv1D"):
        c_attn(model).add_adapter("rosa", 2, 2, sparse_density=0.01)
    # a target that matches nothing names the Conv1D layers among the model's linear ones
    with pytest.raises(ValueError, match=r"named like \['transformer.h.0.attn.c_attn'"):
        fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Conv1D layers \(GPT-2 style\).*no sparse delta \(RoSA's included\)"):
        fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(target_modules="all-linear", sparse_density=0.01))


def test_all_linear_takes_conv1d_layers_as_peft_does(gpt2):
    model = fastpeft.inject(copy.deepcopy(gpt2), LoraConfig(target_modules="all-linear"))
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, FastLoRALinear))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(target_modules="all-linear"))
    want = sorted(n.replace("base_model.model.", "") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))
    assert adapted == want and len(adapted) == 8  # lm_head (the output layer) left out by both
