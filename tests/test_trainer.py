"""fastpeft-native models in ``transformers.Trainer`` and TRL's ``SFTTrainer``, and ``fastpeft.to_peft``.

A model prepared by ``fastpeft.inject`` saves adapter-only checkpoints (PEFT's files, plus
``model.safetensors`` hard-linked to the active adapter's weights, the file Trainer's resume reads), and a
run resumed from one follows the loss curve of an uninterrupted run.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import fastpeft  # noqa: E402
from conftest import assert_close_report  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

VOCAB = 32


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def injected(base, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kw}
    return fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(**kw))


def ids(n=3, t=9, seed=1):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def lora_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# save_pretrained / load_state_dict
# ---------------------------------------------------------------------------------------------------------
def test_save_pretrained_writes_adapter_only_peft_files(base, tmp_path):
    model = injected(base)
    x = ids()
    want = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "model.safetensors"]
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert len(weights) == 2 * 2 * 2 and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert os.path.samefile(tmp_path / "model.safetensors", tmp_path / "adapter_model.safetensors") or \
        load_file(tmp_path / "model.safetensors").keys() == weights.keys()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close_report(loaded(input_ids=x).logits, want, 1e-5, 1e-6, "PEFT loads save_pretrained's files")


def test_injected_model_pickles_whole(base, tmp_path):
    """``torch.save(model)`` / ``torch.load`` of an injected model (and pickle, as mp.spawn and Ray use it): the
    same outputs, and save_pretrained / load_state_dict still bound to the loaded copy with their signature."""
    import inspect

    model = injected(base)
    x = ids()
    want = model(input_ids=x).logits
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert_close_report(loaded(input_ids=x).logits, want, 0, 0, "torch.load")
    assert loaded.save_pretrained.__self__ is loaded and loaded.load_state_dict.__self__ is loaded
    assert "state_dict" in inspect.signature(loaded.save_pretrained).parameters
    loaded.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.__self__ is copied


def test_save_pretrained_state_dict_main_process_and_layout(base, tmp_path):
    model = injected(base)
    torch.manual_seed(5)
    model = fastpeft.inject(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                            adapter_name="other", activate=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = {n: (p * 2 if "lora" in n.lower() else p) for n, p in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=sd)
    model.save_pretrained(tmp_path / "plain")
    doubled, plain = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("sd", "plain"))
    assert doubled.keys() == plain.keys()
    for k in plain:
        assert torch.equal(doubled[k], plain[k] * 2), k
    for n, p in model.named_parameters():  # the model itself is untouched
        assert torch.equal(p, before[n]), n
    assert os.path.isfile(tmp_path / "plain" / "other" / "adapter_model.safetensors")  # PEFT's layout
    assert len(load_file(tmp_path / "plain" / "other" / "adapter_model.safetensors")) == 2 * 2
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not os.path.exists(tmp_path / "rank1")


def test_load_state_dict_of_adapter_file_and_of_plain_state(base, tmp_path):
    model = injected(base)
    x = ids()
    want = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    other = injected(base, seed=7)
    assert not torch.allclose(other(input_ids=x).logits, want)
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"), False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_close_report(other(input_ids=x).logits, want, 0, 0, "adapter state dict")
    third = injected(base, seed=9)
    third.load_state_dict(model.state_dict())  # an ordinary state dict: the model's own load_state_dict
    assert_close_report(third(input_ids=x).logits, want, 0, 0, "full state dict")


# ---------------------------------------------------------------------------------------------------------
# Trainer: save, resume, best model
# ---------------------------------------------------------------------------------------------------------
class Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, t=8):
        self.x = ids(n, t, seed=3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def trainer_for(model, out, **kw):
    kw = {"learning_rate": 5e-3, **kw}
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
        save_steps=1, save_strategy="steps", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(4))


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("init", [False, "pissa", "loftq"])
def test_trainer_checkpoints_hold_adapters_and_resume_follows_the_same_curve(base, tmp_path, init):
    """Also for a PiSSA or LoftQ adapter (its file's config says "pissa" / "loftq"; loading it into the model's adapter
    of that name at resume and at load_best_model_at_end is a plain load: before 2026-12-02's review both raised)."""
    if init == "loftq":
        pytest.importorskip("bitsandbytes")
    kw = dict(init_lora_weights=init, loftq_config={"loftq_bits": 4} if init == "loftq" else {})
    full = trainer_for(injected(base, **kw), tmp_path / "full", eval_strategy="steps", eval_steps=1,
                       load_best_model_at_end=True, metric_for_best_model="loss")
    full.train()
    curve = losses(full)
    assert len(curve) == 2
    ckpt = tmp_path / "full" / "checkpoint-1"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= files
    assert len(load_file(ckpt / "model.safetensors")) == 8  # the adapter: no base weight in the checkpoint
    assert json.loads((ckpt / "adapter_config.json").read_text())["init_lora_weights"] == init
    best = load_file(tmp_path / "full" / full.state.best_model_checkpoint.rsplit("/", 1)[-1] / "model.safetensors")
    layer = fastpeft.lora_layers(full.model)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.lora_A, best["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])

    resumed = trainer_for(injected(base, seed=11, **kw), tmp_path / "full")  # other draws (PiSSA / LoftQ: none; the
    # residual, W - s B0 A0 from the exact SVD, or Q is the first model's)
    resumed.train(resume_from_checkpoint=str(ckpt))
    after = losses(resumed)  # step 1's loss comes back with the checkpoint's trainer state, step 2's is new
    assert len(after) == 2 and after[0] == curve[0], resumed.state.log_history
    assert abs(after[1] - curve[1]) <= 1e-5 * abs(curve[1]), (after, curve)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_bnb_8bit"])
def test_trainer_eval_after_steps_of_optimizers_that_bump_no_version(base, tmp_path, optim):
    """Trainer's default optimizer (fused AdamW) and bitsandbytes' update the adapters in place without bumping their
    version counters: each evaluation's loss must be the trained model's, recomputed from the step's checkpoint in a
    fresh model (DoRA's kept norm once stayed at its pre-training value)."""
    if optim == "adamw_bnb_8bit":
        pytest.importorskip("bitsandbytes")
    model = injected(base, target_modules="all-linear", use_dora=True)
    trainer = trainer_for(model, tmp_path, eval_strategy="steps", eval_steps=1, optim=optim, learning_rate=5e-2)
    trainer.train()
    reported = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    batch = torch.stack([Rows(4)[i]["input_ids"] for i in range(4)])
    fresh = []
    for step in (1, 2):
        m = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / f"checkpoint-{step}").eval()
        with torch.no_grad():
            fresh.append(m(input_ids=batch, labels=batch).loss.item())
    assert len(reported) == 2 and fresh[0] != fresh[1]
    assert reported == pytest.approx(fresh, rel=1e-5), (reported, fresh)


# ---------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------
def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                                bos_token="[BOS]")


def test_sft_trainer_three_steps(base, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from fastpeft.hf import SFTTrainer

    g = torch.Generator().manual_seed(4)
    text = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (7,), generator=g)) for _ in range(6)]
    model = injected(base)
    frozen = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    start = lora_tensors(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                         logging_steps=1, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=True,
                         save_strategy="no", disable_tqdm=True, max_length=16)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": text}),
                         processing_class=tiny_tokenizer())
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(curve)))
    end = lora_tensors(model)
    assert start.keys() == end.keys() and all(not torch.equal(start[k], end[k]) for k in start)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, frozen)
    trainer.save_model(str(tmp_path / "final"))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "final")


def test_sft_trainer_refuses_peft_config_and_lora_on_lm_head(base, tmp_path):
    trl = pytest.importorskip("trl")
    from fastpeft.hf import SFTTrainer, check_sft_model

    with pytest.raises(ValueError, match="without peft_config"):
        SFTTrainer(model=injected(base), args=trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False),
                   peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))
    head = injected(base, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        check_sft_model(head)
    check_sft_model(copy.deepcopy(base), peft.LoraConfig(r=4))  # not a fastpeft model: TRL's own business


# ---------------------------------------------------------------------------------------------------------
# to_peft
# ---------------------------------------------------------------------------------------------------------
def test_to_peft_same_outputs_adapters_and_trainable_set(base):
    model = injected(base)
    torch.manual_seed(3)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False),
                    adapter_name="small", activate=False)
    x = ids()
    want = {}
    for name in ("small", "default"):
        fastpeft.set_adapter(model, name)
        want[name] = model(input_ids=x).logits.detach()
    trainable = fastpeft.trainable_parameters(model)
    pm = fastpeft.to_peft(model)
    assert isinstance(pm, peft.PeftModel) and pm.active_adapter == "default"
    assert not fastpeft.lora_layers(pm) and "save_pretrained" not in model.__dict__
    assert fastpeft.trainable_parameters(pm) == trainable
    assert_close_report(pm(input_ids=x).logits, want["default"], 1e-5, 1e-6, "to_peft, default")
    pm.set_adapter("small")
    assert_close_report(pm(input_ids=x).logits, want["small"], 1e-5, 1e-6, "to_peft, small")
    pm.set_adapter("default")
    fastpeft.accelerate(pm)  # and back onto fastpeft's ops, as a PeftModel
    assert_close_report(pm(input_ids=x).logits, want["default"], 1e-5, 1e-6, "to_peft + accelerate")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_to_peft_keeps_the_training_mode(base, training):
    """An eval model converts to an eval PeftModel (no dropout: the same outputs, call after call); a training one
    stays in training (PeftModel.from_pretrained(is_trainable=True) alone leaves every model in training)."""
    model = fastpeft.inject(copy.deepcopy(base), fastpeft.LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj"],
                                                                     init_lora_weights=False)).train(training)
    x = ids()
    pm = fastpeft.to_peft(model)
    assert pm.training is training and all(m.training is training for m in pm.modules())
    if not training:
        with torch.no_grad():
            assert torch.equal(pm(input_ids=x).logits, pm(input_ids=x).logits)


def test_to_peft_errors(base):
    with pytest.raises(TypeError, match="no fastpeft adapter"):
        fastpeft.to_peft(copy.deepcopy(base))
    sparse = injected(base, sparse_density=0.05)
    with pytest.raises(ValueError, match="sparse delta"):
        fastpeft.to_peft(sparse)
    assert fastpeft.lora_layers(sparse)  # unchanged
    merged = injected(base)
    next(iter(fastpeft.lora_layers(merged).values())).merge()
    with pytest.raises(ValueError, match="merged"):
        fastpeft.to_peft(merged)
    bitfit = fastpeft.inject(copy.deepcopy(base), fastpeft.LayerwiseConfig(train_last_n=1))
    with pytest.raises((ValueError, TypeError), match="adapter"):
        fastpeft.to_peft(bitfit)


def test_inject_hook_is_harmless_without_adapters(base, tmp_path):
    model = injected(base)
    fastpeft.merge_and_unload(model)
    assert isinstance(model.lm_head, nn.Linear)
    model.save_pretrained(tmp_path)  # transformers' own save: no fastpeft adapter left
    assert "config.json" in os.listdir(tmp_path) and "adapter_config.json" not in os.listdir(tmp_path)


def test_to_peft_modules_to_save_and_lora_only_bias():
    from test_inject import Toy

    torch.manual_seed(0)
    model = fastpeft.inject(Toy(), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only",
                                                       modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():  # every trainable tensor away from its initial value, so a dropped one shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 5, 16)
    want = model(x).detach()
    trainable = fastpeft.trainable_parameters(model)
    pm = fastpeft.to_peft(model)
    assert fastpeft.trainable_parameters(pm) == trainable
    assert_close_report(pm(x), want, 1e-6, 1e-6, "to_peft with modules_to_save and bias='lora_only'")
