"""PEFT method families, and the field's other PEFT methods in plain PyTorch, through ``fastpeft.inject``.

``Method`` lists what ``inject``, ``save_adapter`` and ``load_adapter`` ask of a method family; one object
per family answers it, looked up by ``peft_type`` (``fastpeft.inject.method_for``). LoRA and sparse
deltas are answered in ``inject.py``; this module answers for

- ``BitFitConfig``: train only the bias terms (Ben Zaken et al., 2022);
- ``AdapterConfig``: bottleneck adapters after the attention and / or feed-forward output projections,
  Houlsby (both) or Pfeiffer (feed-forward only), zero-initialised so the model starts unchanged;
- ``PromptTuningConfig``: trainable virtual tokens prepended through ``inputs_embeds`` (Lester et al.,
  2021); the model is still called as ``model(input_ids=..., attention_mask=...)``;
- ``LayerwiseConfig``: train only the last n blocks, or the modules whose names match a pattern, with
  ``layerwise_param_groups`` for layer-wise learning-rate decay.

Each method can also train listed ``modules_to_save`` (a classifier head, say) in place. Their adapter
files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``); prompt tuning uses
PEFT's own keys (``peft_type: "PROMPT_TUNING"``, tensor ``prompt_embeddings``), the others fastpeft's
``peft_type`` (``BITFIT``, ``BOTTLENECK_ADAPTER``, ``LAYERWISE``) with each trained tensor under
``base_model.model.<parameter name>``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_file_tensors, check_finite_number, check_module_list, check_rank
from .matching import compile_pattern, is_bias, module_names, name_list, set_submodule

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
VARIANTS = ("pfeiffer", "houlsby")
# Output projections of attention and feed-forward blocks, by transformers model type (regexes).
ADAPTER_TARGETS = {
    "bert": (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense"),
    "roberta": (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense"),
    "distilbert": (r".*attention\.out_lin", r".*ffn\.lin2"),
    "llama": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "mistral": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "qwen2": (r".*self_attn\.o_proj", r".*mlp\.down_proj"),
    "gpt2": (r".*attn\.c_proj", r".*mlp\.c_proj"),
}


# ---- what every method family answers -------------------------------------------------------------

class Method:
    """A PEFT method family as ``inject`` / ``save_adapter`` / ``load_adapter`` see it.

    ``state`` arguments are the model's ``fastpeft.inject.PeftState`` (adapters, active one, trained
    parameter names). File keys are relative to PEFT's ``base_model.model.`` prefix, except
    ``root_keys``, which PEFT writes without it.
    """

    peft_type: str = ""
    config_class: type = object
    alone = True      # the model's only adapter (LoRA adapters sit side by side)
    root_keys = ()
    file_prefix = "base_model.model."  # PEFT's prefix of the other keys (its PeftModel -> tuner -> model)

    def config_to_json(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        """``adapter_config.json``'s content for ``config``."""
        raise NotImplementedError

    def config_from_json(self, d: dict, path: str):
        """The config ``d`` (``adapter_config.json``'s content) describes; ValueError names ``path``."""
        raise NotImplementedError

    def check_addable(self, model: nn.Module, config) -> None:
        """Raise when ``model`` cannot take a new ``config`` adapter (beyond what ``plan`` checks)."""

    def plan(self, model: nn.Module, config):
        """What ``apply`` will do, resolved against ``model`` and checked; nothing changes."""
        raise NotImplementedError

    def apply(self, model: nn.Module, config, adapter_name: str, plan, state) -> None:
        """Add the adapter to ``model`` (frozen beyond what it trains); ``inject`` records it in ``state``."""
        raise NotImplementedError

    def file_tensors(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        """File key -> the model's tensor it holds, for ``save_adapter``."""
        raise NotImplementedError

    def check_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        """Check a file's config and tensors (``weights``: key -> tensor) against ``model`` before anything
        changes; returns ``(plan, weights)``, the plan for ``inject`` and the weights ``install`` copies."""
        raise NotImplementedError

    def reload(self, model: nn.Module, config, adapter_name: str, plan, state) -> None:
        """Prepare ``model``'s adapter ``adapter_name`` to take a file's config (all checked already)."""

    def install(self, model: nn.Module, config, adapter_name: str, weights: dict, trainable: bool, state) -> None:
        """Copy a checked file's tensors into the model's adapter ``adapter_name``."""
        raise NotImplementedError

    def construct(self, kwargs: dict, path: str):
        """``config_class(**kwargs)``, its errors re-raised as ValueError naming the file."""
        try:
            return self.config_class(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid adapter config {path}: {e}") from None


# ---- configs ---------------------------------------------------------------------------------------

@dataclass
class BitFitConfig:
    """Train only the bias terms (parameters named ``bias``), plus ``modules_to_save``."""

    modules_to_save: Optional[list] = None
    peft_type = "BITFIT"

    def __post_init__(self):
        self.modules_to_save = check_module_list(self.modules_to_save, "modules_to_save")

    def to_dict(self):
        return asdict(self)


@dataclass
class AdapterConfig:
    """Bottleneck adapters ``h + up(act(down(h)))`` on the outputs of ``target_modules`` (regex
    fullmatch or list of names / ``.name`` suffixes, as LoRA's); None takes the attention and
    feed-forward output projections of known transformers models: both for ``variant="houlsby"``,
    the feed-forward one for ``"pfeiffer"``. ``up`` starts at zero: the model starts unchanged."""

    bottleneck_dim: int = 64
    target_modules: Optional[Union[str, list]] = None
    variant: str = "pfeiffer"
    non_linearity: str = "relu"
    scaling: float = 1.0
    modules_to_save: Optional[list] = None
    peft_type = "BOTTLENECK_ADAPTER"

    def __post_init__(self):
        check_rank(self.bottleneck_dim, "bottleneck_dim")
        check_choice(self.variant, VARIANTS, "variant")
        check_choice(self.non_linearity, tuple(ACTIVATIONS), "non_linearity")
        self.scaling = check_finite_number(self.scaling, "scaling")
        self.target_modules = name_list(self.target_modules, "target_modules")
        self.modules_to_save = check_module_list(self.modules_to_save, "modules_to_save")

    def to_dict(self):
        return asdict(self)


@dataclass
class PromptTuningConfig:
    """``num_virtual_tokens`` trainable embeddings prepended to every input of a transformers model.

    Initialised from randomly chosen rows of the model's input embeddings, or with ``init_text`` (needs
    ``tokenizer``) from that text's token embeddings, repeated to length."""

    num_virtual_tokens: int = 20
    init_text: Optional[str] = None
    tokenizer: Optional[object] = None
    modules_to_save: Optional[list] = None
    peft_type = "PROMPT_TUNING"

    def __post_init__(self):
        check_rank(self.num_virtual_tokens, "num_virtual_tokens")
        if self.init_text is not None and self.tokenizer is None:
            raise ValueError("init_text needs tokenizer (to turn the text into token ids), got None")
        self.modules_to_save = check_module_list(self.modules_to_save, "modules_to_save")

    def to_dict(self):
        d = asdict(self)
        d.pop("tokenizer")
        return d


@dataclass
class LayerwiseConfig:
    """Train only the last ``train_last_n`` blocks of the model's main stack of layers, or the modules
    whose full names fullmatch ``layers_pattern`` (one of the two), plus ``modules_to_save``."""

    train_last_n: Optional[int] = None
    layers_pattern: Optional[str] = None
    modules_to_save: Optional[list] = None
    peft_type = "LAYERWISE"

    def __post_init__(self):
        if (self.train_last_n is None) == (self.layers_pattern is None):
            raise ValueError("LayerwiseConfig needs exactly one of train_last_n and layers_pattern, got "
                             f"train_last_n={self.train_last_n!r}, layers_pattern={self.layers_pattern!r}")
        if self.train_last_n is not None:
            check_rank(self.train_last_n, "train_last_n")
        if self.layers_pattern is not None:
            compile_pattern(self.layers_pattern, "layers_pattern")
        self.modules_to_save = check_module_list(self.modules_to_save, "modules_to_save")

    def to_dict(self):
        return asdict(self)


METHOD_CONFIGS = (BitFitConfig, AdapterConfig, PromptTuningConfig, LayerwiseConfig)


# ---- modules ---------------------------------------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """``base(x) + scaling * up(act(down(base(x))))``; down (d, out), up (out, d) zero-initialised."""

    def __init__(self, base: nn.Module, bottleneck_dim: int, non_linearity: str = "relu", scaling: float = 1.0):
        super().__init__()
        out_f = _out_features(base)
        if out_f is None:
            raise ValueError(f"an adapter goes after a module with out_features (nn.Linear), got {type(base).__name__}")
        w = next(base.parameters())
        self.base = base
        self.adapter_down = nn.Linear(out_f, bottleneck_dim, device=w.device, dtype=w.dtype)
        self.adapter_up = nn.Linear(bottleneck_dim, out_f, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.non_linearity, self.scaling = non_linearity, scaling

    def forward(self, *args, **kwargs):
        h = self.base(*args, **kwargs)
        return h + self.scaling * self.adapter_up(ACTIVATIONS[self.non_linearity](self.adapter_down(h)))


class PromptEmbedding(nn.Module):
    """The virtual tokens (n, dim); registered on the model as ``fastpeft_prompt``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(weight)


def _cached_length(past) -> int:
    """Tokens already in a transformers cache (a ``Cache`` or the legacy tuple of (key, value) per layer); 0 for
    None or an empty cache."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def _prompt_hook(model, args, kwargs):
    """Forward pre-hook: input_ids -> inputs_embeds with the n virtual tokens in front, and every per-token input
    made to match: attention_mask and token_type_ids get n leading ones / zeros, per-token labels (integer, the
    shape of input_ids) n leading -100 (sequence-level labels, as a classifier's (B,), are left alone),
    position_ids and cache_position shift by n behind positions 0 .. n - 1 of the prompt. A generation step
    whose cache already holds the prompt (``cache`` / ``past_key_values`` not empty) adds no prompt: its
    positions shift by n and its attention mask gets the prompt's n columns where it lacks them."""
    prompt = model.fastpeft_prompt.prompt_embeddings
    n = prompt.shape[0]
    if args:
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            return args, kwargs
        embeds = model.get_input_embeddings()(ids)
    b, t = embeds.shape[:2]
    # transformers >= 5.2x names the cache argument ``cache``, earlier versions ``past_key_values``
    cached = _cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
    kwargs["inputs_embeds"] = embeds if cached else torch.cat(
        [prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
    mask = kwargs.get("attention_mask")
    # the user's mask covers the user's tokens (the cache holds the prompt's n beside them)
    if mask is not None and mask.dim() == 2 and mask.shape[1] == t + max(cached - n, 0):
        kwargs["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], dim=1)
    for name in ("position_ids", "cache_position"):
        pos = kwargs.get(name)
        if pos is not None:
            if cached:
                kwargs[name] = pos + n
            else:
                head = torch.arange(n, device=pos.device, dtype=pos.dtype)
                head = head.expand(*pos.shape[:-1], n) if pos.dim() > 1 else head
                kwargs[name] = torch.cat([head, pos + n], dim=-1)
    if not cached:
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(b, n), tt], dim=1)
        labels = kwargs.get("labels")
        if (labels is not None and not labels.is_floating_point() and labels.dim() == 2
                and tuple(labels.shape) == (b, t)):
            kwargs["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
    return args, kwargs


# ---- injection -------------------------------------------------------------------------------------

def main_blocks(model: nn.Module) -> tuple:
    """``(prefix, blocks)`` of the model's main stack of layers: its longest nn.ModuleList whose items
    all share one type (encoder.layer, model.layers, h, ...)."""
    best = ("", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            if best[1] is None or len(m) > len(best[1]):
                best = (name, m)
    if best[1] is None:
        raise ValueError("the model has no stack of layers (an nn.ModuleList of one block type)")
    return best


def _saved_names(model, config) -> list:
    if not config.modules_to_save:
        return []
    names = module_names(model, list(config.modules_to_save))
    if not names:
        raise ValueError(f"modules_to_save {config.modules_to_save} matched no module of the model")
    return names


def _adapter_targets(model, config) -> list:
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ADAPTER_TARGETS:
            raise ValueError(f"target_modules is None and fastpeft knows no adapter places for model type "
                             f"{model_type!r}: pass target_modules")
        attn, ffn = ADAPTER_TARGETS[model_type]
        spec = f"({attn})|({ffn})" if config.variant == "houlsby" else ffn
    names = module_names(model, spec)
    if not names:
        raise ValueError(f"target_modules {spec!r} matched no module of the model")
    for n in names:
        if _out_features(model.get_submodule(n)) is None:
            raise ValueError(f"target_modules matched {n!r}, a {type(model.get_submodule(n)).__name__} without "
                             "out_features; adapters go after linear projections")
    return names


def _out_features(module: nn.Module):
    """A projection's output width: nn.Linear's ``out_features``, transformers' Conv1D's ``nf`` (GPT-2), else None."""
    out = getattr(module, "out_features", None)
    if out is None and type(module).__name__ == "Conv1D":
        out = getattr(module, "nf", None)
    return out


# PEFT's TaskType -> the heads its task model for the type wraps as modules_to_save (trains and saves): a file of the
# type without them does not load in PEFT
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


class ParameterMethod(Method):
    """A method whose adapter is a set of the model's parameters (some of which it adds), each saved under
    its parameter name; its plan is parameter name -> shape, and ``state.trained`` lists the names.

    Such an adapter is part of the model itself: it cannot be switched off in place (``set_adapter(None)``).
    ``removable``: ``delete_adapter`` takes out what ``modify`` added (a prompt, bottleneck adapters) and the
    model runs its base again; BitFit and layer-wise adapters train the model's own tensors, so there is no base to
    go back to, and they are refused there. ``mergeable``: ``merge_and_unload`` keeps it as the model's weights
    (BitFit, layer-wise); a prompt or bottleneck adapter cannot fold into the weights and is refused."""

    removable = mergeable = False

    def remove(self, model: nn.Module) -> None:
        """Take out what ``modify`` added (``removable`` methods only)."""

    def method_shapes(self, model: nn.Module, config) -> dict:
        """Parameter name -> shape of what the method itself trains (beyond ``modules_to_save``)."""
        raise NotImplementedError

    def modify(self, model: nn.Module, config) -> None:
        """Add the method's modules to ``model`` (none by default)."""

    def file_key(self, param_name: str) -> str:
        return param_name

    def plan(self, model: nn.Module, config) -> dict:
        shapes = {}
        for s in _saved_names(model, config):
            for pn, p in model.get_submodule(s).named_parameters():
                shapes[f"{s}.{pn}"] = tuple(p.shape)
        shapes.update(self.method_shapes(model, config))
        return shapes

    def apply(self, model: nn.Module, config, adapter_name: str, plan: dict, state) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        self.modify(model, config)
        params = dict(model.named_parameters(remove_duplicate=False))  # tied aliases (lm_head.weight) too
        for name in plan:
            params[name].requires_grad_(True)
        state.trained = sorted(plan)

    def config_to_json(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        d = dict(config.to_dict())
        d.update(peft_type=self.peft_type, task_type=None, inference_mode=True)
        return d

    def config_from_json(self, d: dict, path: str):
        fields = {k for k in self.config_class.__dataclass_fields__ if k not in ("tokenizer", "init_text")}
        return self.construct({k: d[k] for k in fields if k in d and d[k] is not None}, path)

    def file_tensors(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        params = dict(model.named_parameters(remove_duplicate=False))
        return {self.file_key(n): params[n] for n in state.trained}

    def check_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        """A fresh model takes the file through ``inject``; one with this adapter gets its tensors replaced."""
        configs = state.adapters
        if configs and (adapter_name not in configs or type(configs[adapter_name]) is not type(config)):
            raise ValueError(f"model already has adapter(s) {list(configs)}; a {type(config).__name__} adapter loads "
                             f"onto a model without adapters, or over its own ({adapter_name!r})")
        if configs:
            params = dict(model.named_parameters(remove_duplicate=False))
            plan, expected = None, {self.file_key(n): tuple(params[n].shape) for n in state.trained}
        else:
            plan = self.plan(model, config)
            expected = {self.file_key(n): shape for n, shape in plan.items()}
        check_file_tensors(expected, weights, directory)
        return plan, weights

    def install(self, model: nn.Module, config, adapter_name: str, weights: dict, trainable: bool, state) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for n in state.trained:
                params[n].copy_(weights[self.file_key(n)])
                params[n].requires_grad_(trainable)


class BitFitMethod(ParameterMethod):
    peft_type, config_class = BitFitConfig.peft_type, BitFitConfig
    mergeable = True

    def method_shapes(self, model: nn.Module, config) -> dict:
        return {n: tuple(p.shape) for n, p in model.named_parameters() if is_bias(n)}

    def plan(self, model: nn.Module, config) -> dict:
        shapes = super().plan(model, config)
        if not shapes:
            raise ValueError("BitFit: the model has no bias parameters (and no modules_to_save)")
        return shapes


class AdapterMethod(ParameterMethod):
    peft_type, config_class = AdapterConfig.peft_type, AdapterConfig

    def method_shapes(self, model: nn.Module, config) -> dict:
        shapes = {}
        for n in _adapter_targets(model, config):
            out_f, d = _out_features(model.get_submodule(n)), config.bottleneck_dim
            shapes.update({f"{n}.adapter_down.weight": (d, out_f), f"{n}.adapter_down.bias": (d,),
                           f"{n}.adapter_up.weight": (out_f, d), f"{n}.adapter_up.bias": (out_f,)})
        return shapes

    removable = True

    def modify(self, model: nn.Module, config) -> None:
        for n in _adapter_targets(model, config):
            set_submodule(model, n, BottleneckAdapter(model.get_submodule(n), config.bottleneck_dim,
                                                      config.non_linearity, config.scaling))

    def remove(self, model: nn.Module) -> None:
        for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]:
            set_submodule(model, n, m.base)


PROMPT_KEY = "prompt_embeddings"  # PEFT's key for the virtual tokens (no base_model.model. prefix)


class PromptTuningMethod(ParameterMethod):
    peft_type, config_class = PromptTuningConfig.peft_type, PromptTuningConfig
    root_keys = (PROMPT_KEY,)
    removable = True
    file_prefix = "base_model."  # a prompt-learning PeftModel holds the model itself as base_model

    def remove(self, model: nn.Module) -> None:
        remove_prompt(model)

    def _check_prompt_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        try:
            return super().check_load(model, config, adapter_name, weights, directory, state)
        except ValueError:
            # fastpeft's files before 2026-12-01 put the saved modules under "base_model.model." (read here with
            # "base_model." taken off: one "model." too many)
            legacy = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
            if legacy == weights:
                raise
            try:
                return super().check_load(model, config, adapter_name, legacy, directory, state)
            except ValueError:
                pass
            raise

    def method_shapes(self, model: nn.Module, config) -> dict:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # generate() runs the encoder apart from the model's forward (get_encoder()), so the prompt would be
            # missing from generation, and the decoder's inputs must not be touched: not supported here
            raise ValueError(f"prompt tuning here is for decoder-only and encoder-only models; "
                             f"{type(model).__name__} is an encoder-decoder model (config.is_encoder_decoder), "
                             "whose generate() runs its encoder apart from the model's forward: use PEFT's prompt "
                             "tuning (task_type SEQ_2_SEQ_LM) for it")
        if emb is None:
            raise ValueError("prompt tuning needs a transformers model (get_input_embeddings), got "
                             f"{type(model).__name__}")
        return {"fastpeft_prompt.prompt_embeddings": (config.num_virtual_tokens, emb.weight.shape[1])}

    def modify(self, model: nn.Module, config) -> None:
        emb = model.get_input_embeddings()
        model.fastpeft_prompt = PromptEmbedding(_initial_prompt(emb, config))
        model._fastpeft_prompt_hook = model.register_forward_pre_hook(_prompt_hook, with_kwargs=True)

    def file_key(self, param_name: str) -> str:
        return PROMPT_KEY if param_name == "fastpeft_prompt.prompt_embeddings" else param_name

    @staticmethod
    def _head_params(model: nn.Module, trained) -> dict:
        """Name -> Parameter of the task head PEFT's task model for this model wraps (``TASK_HEADS``), which its
        files must hold (its loader asks for them), where the adapter does not train it (modules_to_save)."""
        names = module_names(model, list(TASK_HEADS.get(_prompt_task_type(model), ())))
        return {f"{n}.{pn}": p for n in names for pn, p in model.get_submodule(n).named_parameters()
                if f"{n}.{pn}" not in trained}

    def file_tensors(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        return {**super().file_tensors(model, config, adapter_name, state), **self._head_params(model, state.trained)}

    def check_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        # the task head's tensors (file_tensors) are taken where the file has them, and loaded into the head
        trained = state.trained if state.adapters else self.plan(model, config)
        params = self._head_params(model, trained)
        heads = {k: v for k, v in weights.items() if k in params}
        check_file_tensors({k: params[k].shape for k in heads}, heads, directory)  # another head's: refused here
        plan, rest = self._check_prompt_load(model, config, adapter_name,
                                             {k: v for k, v in weights.items() if k not in heads}, directory, state)
        return plan, {**rest, **heads}

    def install(self, model: nn.Module, config, adapter_name: str, weights: dict, trainable: bool, state) -> None:
        super().install(model, config, adapter_name, weights, trainable, state)
        with torch.no_grad():
            for n, p in self._head_params(model, state.trained).items():
                if n in weights:
                    p.copy_(weights[n])

    def config_to_json(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        d = super().config_to_json(model, config, adapter_name, state)
        # the task type PEFT needs to build the task model that adds the virtual tokens (a plain PeftModel,
        # from task_type None, would run the base model: other outputs, no error)
        d["task_type"] = _prompt_task_type(model)
        d.update(token_dim=model.fastpeft_prompt.prompt_embeddings.shape[1], num_transformer_submodules=1,
                 prompt_tuning_init="TEXT" if config.init_text else "RANDOM",
                 prompt_tuning_init_text=config.init_text,
                 base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None)
        d.pop("init_text")
        return d


class LayerwiseMethod(ParameterMethod):
    peft_type, config_class = LayerwiseConfig.peft_type, LayerwiseConfig
    mergeable = True

    def method_shapes(self, model: nn.Module, config) -> dict:
        if config.train_last_n is not None:
            prefix, blocks = main_blocks(model)
            # another stack as long, outside this one (lists inside its blocks, experts say, are its own)
            tied = [n for n, m in model.named_modules() if n != prefix and not n.startswith(prefix + ".")
                    and isinstance(m, nn.ModuleList) and len(m) == len(blocks) and len({type(c) for c in m}) == 1]
            if tied:  # an encoder-decoder's two stacks (T5: encoder.block, decoder.block): which last n is meant?
                raise ValueError(f"train_last_n: the model has several stacks of {len(blocks)} blocks ({prefix!r}, "
                                 f"{', '.join(repr(n) for n in tied)}); name the layers with layers_pattern instead")
            if config.train_last_n > len(blocks):
                raise ValueError(f"train_last_n={config.train_last_n} but the model has {len(blocks)} blocks "
                                 f"({prefix})")
            names = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks) - config.train_last_n,
                                                                          len(blocks))]
        else:
            names = [n for n, _ in model.named_modules() if n and re.fullmatch(config.layers_pattern, n)]
            if not names:
                raise ValueError(f"layers_pattern {config.layers_pattern!r} matched no module of the model")
        return {f"{n}.{pn}": tuple(p.shape) for n in names for pn, p in model.get_submodule(n).named_parameters()}


METHODS = (BitFitMethod(), AdapterMethod(), PromptTuningMethod(), LayerwiseMethod())

# A transformers model class's suffix -> the PEFT task type whose model class runs prompt tuning for it.
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


_TASK_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"))


def _prompt_task_type(model: nn.Module) -> str:
    """PEFT's task type for a prompt-tuned ``model``: the transformers auto class its class belongs to (GPT-2's
    ``GPT2LMHeadModel`` is a causal LM), else its class name's suffix; FEATURE_EXTRACTION (a base model: its
    outputs are the hidden states) for the others."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        modeling_auto = None
    for mapping, task in _TASK_MAPPINGS if modeling_auto is not None else ():
        for classes in getattr(modeling_auto, mapping, {}).values():
            if name in ((classes,) if isinstance(classes, str) else tuple(classes)):
                return task
    return next((t for suffix, t in _TASK_TYPES if name.endswith(suffix)), "FEATURE_EXTRACTION")


@torch.no_grad()
def _initial_prompt(emb: nn.Module, config) -> torch.Tensor:
    w = emb.weight
    n = config.num_virtual_tokens
    if config.init_text is not None:
        ids = config.tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init_text {config.init_text!r} has no tokens")
        ids = torch.tensor((ids * (n // len(ids) + 1))[:n], device=w.device)
    else:
        ids = torch.randint(0, w.shape[0], (n,), device=w.device)
    return w[ids].detach().clone()


def remove_prompt(model: nn.Module) -> None:
    """Undo prompt tuning: remove the hook and the virtual tokens."""
    hook = getattr(model, "_fastpeft_prompt_hook", None)
    if hook is not None:
        hook.remove()
        del model._fastpeft_prompt_hook
    if hasattr(model, "fastpeft_prompt"):
        del model.fastpeft_prompt


def layerwise_param_groups(model: nn.Module, lr: float, decay: float = 0.8, weight_decay: float = 0.0) -> list:
    """Optimizer parameter groups with layer-wise learning-rate decay over the trainable parameters.

    Block i of the model's main stack (of L) gets ``lr * decay ** (L - 1 - i)``: the top block trains at
    ``lr``, lower ones slower; trainable parameters outside the stack (a head) and above it get ``lr``,
    those below it (embeddings: ``nn.Embedding`` modules and parameters named ``*embed*``) ``lr * decay ** L``.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0.0 < lr < math.inf):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    prefix, blocks = main_blocks(model)
    n_blocks = len(blocks)
    # an embedding's parameters, its LoRA factors included (fastpeft's FastLoRAEmbedding, by class name: no import)
    embeddings = {id(p) for m in model.modules()
                  if isinstance(m, nn.Embedding) or type(m).__name__ == "FastLoRAEmbedding" for p in m.parameters()}
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = None
        if prefix and name.startswith(prefix + "."):
            depth = int(name[len(prefix) + 1:].split(".")[0])
        elif "embed" in name or id(p) in embeddings:  # GPT-2's wte / wpe are embeddings too
            depth = -1  # below the stack
        scale = 1.0 if depth is None else decay ** (n_blocks - 1 - depth)
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * s, "weight_decay": weight_decay} for s, ps in sorted(groups.items())]
