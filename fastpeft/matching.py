"""Hugging Face PEFT's module-name rules, and the submodule surgery that puts adapter layers in place.

Shared by ``inject.py`` (LoRA, sparse deltas) and ``methods.py`` (the other methods); it imports neither.

Matching, as PEFT does it:
- ``target_modules`` a string: ``re.fullmatch`` against the full module name;
- a list: a module matches an entry equal to its full name or to a ``.``-separated suffix of it;
- ``"all-linear"``: every ``nn.Linear`` except the output head (``model.get_output_embeddings()``);
- ``exclude_modules`` (same rules) and the ``modules_to_save`` modules are never targets;
- ``layers_to_transform`` (with ``layers_pattern``): of what a list (or ``"all-linear"``) matches by suffix, only
  the modules under the numbered blocks it names: ``<pattern>.<i>.`` (any ``<name>.<i>.`` without a pattern, the
  first such index of the name); an exact full name in the list is kept whatever its index;
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched as ``(.*\\.)?(key)$`` against the name;
- ``modules_to_save`` entries match module names that end with them;
- ``bias="all"`` trains the parameters named ``bias``.
"""
from __future__ import annotations

import re

import torch.nn as nn

ALL_LINEAR = "all-linear"
# Used when target_modules is None, by ``model.config.model_type``, where peft is not installed (with it, PEFT's own
# table is read first: ``default_targets``). PEFT 0.21's defaults for these.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}


def compile_pattern(pattern: str, what: str) -> re.Pattern:
    """``re.compile(pattern)``, raising TypeError / ValueError that name ``what``."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a str, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from None


def name_list(v, name: str):
    """None, a regex string, or a list of names (sets and tuples are sorted into lists), checked."""
    if v is None:
        return None
    if isinstance(v, str):
        if v.lower() != ALL_LINEAR or name != "target_modules":
            compile_pattern(v, name)
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        if not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"{name} must be a regex string or a non-empty list of module names, got {v!r}")
        return items
    raise TypeError(f"{name} must be a str, a list of str or None, got {type(v).__name__}")


def matches(spec, name: str) -> bool:
    """PEFT's rule: a string is fullmatched; a list matches an exact name or a ``.name`` suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The block index PEFT reads from a module name for ``layers_to_transform``: the first ``<pattern>.<i>.`` of
    ``name`` for the first of ``layers_pattern`` found in it, or the first ``<name>.<i>.`` without a pattern;
    None when the name has none (``model.layers.3.mlp.up_proj`` -> 3, also with ``layers_pattern="layers"``)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if m is not None:
                break
    return int(m.group(1)) if m is not None else None


def in_layers(name: str, layers_to_transform, layers_pattern=None) -> bool:
    """Whether ``name`` lies in a block that ``layers_to_transform`` (an int or a list of ints; None or [] for all)
    names, by ``layer_index``: PEFT's filter on what a target_modules list matched by suffix."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    i = layer_index(name, layers_pattern)
    if i is None:
        return False
    return i == layers_to_transform if isinstance(layers_to_transform, int) else i in layers_to_transform


def is_all_linear(spec) -> bool:
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def module_names(model: nn.Module, spec) -> list:
    """Full names of ``model``'s modules that ``spec`` matches."""
    return [n for n, _ in model.named_modules() if n and matches(spec, n)]


def pattern_value(patterns: dict, name: str, default):
    """The value of the first ``patterns`` key matching ``name`` as ``(.*\\.)?(key)$``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_head(model: nn.Module):
    """``model.get_output_embeddings()``, or None when the model has none."""
    return _embeddings(model, "get_output_embeddings")


def input_embeddings(model: nn.Module):
    """``model.get_input_embeddings()``, or None when the model has none."""
    return _embeddings(model, "get_input_embeddings")


def _embeddings(model: nn.Module, getter: str):
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _peft_default_targets() -> dict:
    """PEFT's own table of default LoRA targets by model type (empty where peft does not import)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        return {}
    return table


def default_targets(model: nn.Module) -> list | str:
    """PEFT's default LoRA targets for ``model.config.model_type``: from PEFT's own table where peft is installed
    (every type it knows: gptj, deberta-v2, gemma3_text, ...; before 2026-12-01 fastpeft's shorter copy alone, and
    phi's differed), else fastpeft's copy of it; ValueError for an unknown type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    peft_table = _peft_default_targets()
    if model_type in peft_table:
        targets = peft_table[model_type]  # a list, or a regex string (gemma4), as PEFT's _prepare_adapter_config
        return targets if isinstance(targets, str) else list(targets)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError("target_modules is None and fastpeft knows no default targets for model type "
                     f"{model_type!r}: pass target_modules (a list of names, a regex, or 'all-linear')")


def is_bias(param_name: str) -> bool:
    """Whether ``bias="all"`` trains this parameter: PEFT's rule, a parameter named ``bias``. A name that only
    contains the word (T5's ``relative_attention_bias.weight``) is no bias term."""
    return param_name == "bias" or param_name.endswith(".bias")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model``'s submodule ``name`` (a full dotted name) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
