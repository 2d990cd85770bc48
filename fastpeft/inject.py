"""Model surgery: the LoRA and sparse-delta configs, injection, the model's adapter state, merging.

``inject`` / ``save_adapter`` / ``load_adapter`` ask each PEFT method family the same few questions
(``methods.Method``); ``method_for`` finds a config's family, ``METHODS`` holds them by ``peft_type``.
LoRA (``LoraMethod``) and sparse deltas (``SparseDeltaMethod``) are answered here, the other methods in
``methods.py``; module-name matching follows PEFT's rules (``matching.py``). The model's bookkeeping
(its adapters' configs, the active one) is one ``PeftState`` on it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Union

import torch
import torch.nn as nn

from ._checks import (EVA_DEFAULTS, base_rewriting_init, check_adapter_name, check_bool, check_choice,
                      check_dora_options, check_dropout, check_embedding, check_file_tensors, check_finite_number,
                      check_init, check_corda_config, check_eva_config, check_layers, check_loftq_config,
                      check_lora_bias, check_rank, check_sparse_delta, check_sparse_options, check_token_indices, few)
from .layers import (FastLoRAConv, FastLoRAEmbedding, FastLoRAParameter, FastLoRALinear, ModulesToSaveWrapper,
                     QLoRALinear, SparseDeltaLinear, TrainableTokensWrapper, base_rewriting_reason, conv_reason,
                     corda_reason, dilated, loftq_error_factors, loftq_scaling_warning, param_base,
                     parameter_adapter_reason, parameter_layout, parameter_reason, rosa_spec, wrap_reason)
from .matching import (compile_pattern, default_targets, in_layers, input_embeddings, is_all_linear, is_bias, matches,
                       name_list, output_head, pattern_value, set_submodule)
from .methods import METHODS as OTHER_METHODS
from .methods import TASK_HEADS, ParameterMethod
from .methods import Method
from .quant import (QuantizedWeight, assign_merged_weight, base_kind, conv1d_class, dequantize_weight,
                    dequantized_linear, foreign_quant_library, guard_repacked_layers, is_conv1d, is_quantized,
                    merged_weight, peft_numel)
from .selection import SparseSpec

BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """What ``inject`` adds to a model; field names and meanings are PEFT's ``LoraConfig``'s."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[str, list]] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    modules_to_save: Optional[list] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[int, list]] = None  # only these block indices (of a target_modules list)
    layers_pattern: Optional[Union[str, list]] = None       # the blocks' container name(s): "layers", "h", ...
    # PEFT's trainable tokens: these rows of the input embeddings (a dict: of the named embedding layers) trained
    trainable_token_indices: Optional[Union[list, dict]] = None
    inference_mode: bool = False     # PEFT's: True adds the adapter frozen (files always say True, as PEFT's)
    fan_in_fan_out: bool = False     # PEFT's; read from each layer here (Conv1D: True, nn.Linear: False), as PEFT does
    ensure_weight_tying: bool = False  # PEFT's tied copies for tied embeddings: not supported (True is refused)
    sparse_density: float = 0.0      # > 0: a sparse delta beside each LoRA update (RoSA)
    sparse_block_size: int = 1
    sparse_selection: str = "random"
    use_dora: bool = False           # DoRA (PEFT's): a trained magnitude per output row of each layer
    lora_bias: bool = False          # PEFT's: a trained bias on B (the update s (B A x + b_B)); LoRA on dense layers
    task_type: Optional[str] = None  # PEFT's TaskType; SEQ_CLS / TOKEN_CLS / QUESTION_ANS also train the task head
    # PEFT's: Parameters adapted in place, "<module>.<param>" (suffix match), 2-D or 3-D (a mixture of experts' expert
    # weights, computed by lora_experts on transformers' experts modules): FastLoRAParameter layers
    target_parameters: Optional[list] = None
    # PEFT's: with init_lora_weights="loftq", {"loftq_bits": 4 | 8, "loftq_iter": n} (or a peft.LoftQConfig)
    loftq_config: dict = field(default_factory=dict)
    # PEFT's: with init_lora_weights="eva", {"rho", "tau", ...} (or a peft.EvaConfig; initialize_lora_eva_weights)
    eva_config: Optional[dict] = None
    # PEFT's: with init_lora_weights="corda", {"corda_method": "ipm" | "kpm", ...} (or a peft.CordaConfig)
    corda_config: Optional[dict] = None
    peft_type = "LORA"

    def __post_init__(self):
        check_sparse_options(self.sparse_density, self.sparse_block_size, self.sparse_selection, "sparse_",
                             allow_zero=True)
        check_rank(self.r)
        check_finite_number(self.lora_alpha, "lora_alpha")
        check_dropout(self.lora_dropout)
        self.target_parameters = _parameter_list(self.target_parameters)
        if self.target_parameters and isinstance(self.target_modules, (list, tuple, set)) and not self.target_modules:
            self.target_modules = None  # (PEFT's empty target_modules beside target_parameters: no module targets)
        self.target_modules = name_list(self.target_modules, "target_modules")
        self.exclude_modules = name_list(self.exclude_modules, "exclude_modules")
        if self.target_parameters:
            why = parameter_adapter_reason(self.lora_dropout, self.use_dora, self.lora_bias, self.sparse_density,
                                        self.init_lora_weights)
            if why is not None:
                raise ValueError(f"target_parameters={self.target_parameters}: {why}; leave it off for a config "
                                 "with target_parameters")
        check_layers(self.layers_to_transform, self.layers_pattern, self.target_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.layers_pattern, tuple):
            self.layers_pattern = list(self.layers_pattern)
        self.trainable_token_indices = check_token_indices(self.trainable_token_indices)
        for name in ("inference_mode", "fan_in_fan_out", "ensure_weight_tying"):
            check_bool(getattr(self, name), name)
        if self.ensure_weight_tying:
            raise ValueError("ensure_weight_tying=True (PEFT's one trained copy / one LoRA shared by tied input "
                             "embeddings and output head) is not supported by fastpeft; leave it False (each of the "
                             "tied layers then gets its own, as PEFT without it), or train with PEFT")
        check_choice(self.bias, BIAS_CHOICES, "bias")
        check_bool(self.use_rslora, "use_rslora")
        check_dora_options(self.use_dora, self.sparse_density)
        check_init(self.init_lora_weights)
        self.loftq_config = check_loftq_config(self.loftq_config, self.init_lora_weights)
        self.eva_config = check_eva_config(self.eva_config, self.init_lora_weights)
        self.corda_config = check_corda_config(self.corda_config, self.init_lora_weights)
        if self.init_lora_weights == "corda" and self.use_dora:
            raise ValueError("init_lora_weights='corda' with use_dora=True is not offered here (DoRA's magnitude would "
                             "have to follow the rewritten W); use one of the two")
        check_lora_bias(self.lora_bias, self.init_lora_weights, self.use_dora, self.sparse_density)
        check_choice(self.task_type, TASK_TYPES, "task_type")
        if self.modules_to_save is not None:
            self.modules_to_save = name_list(list(self.modules_to_save) if not isinstance(
                self.modules_to_save, str) else [self.modules_to_save], "modules_to_save")
        for pname, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pat, dict):
                raise TypeError(f"{pname} must be a dict of module-name regex -> value, got {type(pat).__name__}")
            for k, v in pat.items():
                compile_pattern(k, f"{pname} key")
                (check_rank if pname == "rank_pattern" else check_finite_number)(v, f"{pname}[{k!r}]")

    @property
    def sparse(self) -> SparseSpec | None:
        """The sparse delta beside each LoRA update (RoSA), None without one."""
        return rosa_spec(self.sparse_density, self.sparse_block_size, self.sparse_selection)

    def to_dict(self) -> dict:
        return asdict(self)


def _parameter_list(v) -> list | None:
    """``target_parameters`` checked: None, or a list of non-empty names "<module>.<param>" (PEFT's; a set or tuple is
    taken as a sorted list, an empty one as None)."""
    if v is None:
        return None
    if isinstance(v, (set, frozenset)):
        v = sorted(v)
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or \
            not all(isinstance(e, str) and e and not e.startswith(".") and not e.endswith(".") for e in v):
        raise TypeError(f"target_parameters must be a list of parameter names such as 'mlp.experts.gate_up_proj' "
                        f"(a module name, a dot, its parameter's name), got {v!r}")
    return list(v) or None


@dataclass
class SparseDeltaConfig:
    """A trainable sparse delta on each target nn.Linear (``SparseDeltaLinear``): ``density`` of its
    entries (or blocks of ``block_size``), picked by ``selection`` ("random", "magnitude", "scores")."""

    density: float = 0.01
    block_size: int = 1
    selection: str = "random"
    target_modules: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[str, list]] = None
    peft_type = "SPARSE_DELTA"  # fastpeft's own type: a sparse delta alone (PEFT has no equivalent)

    def __post_init__(self):
        check_sparse_options(self.density, self.block_size, self.selection)
        self.target_modules = name_list(self.target_modules, "target_modules")
        self.exclude_modules = name_list(self.exclude_modules, "exclude_modules")

    @property
    def sparse(self) -> SparseSpec:
        return SparseSpec(self.density, self.block_size, self.selection)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the model's adapter state -------------------------------------------------------------------------

@dataclass
class PeftState:
    """fastpeft's bookkeeping on an injected model (``model._fastpeft``): its adapters' configs by name, in
    the order they came, the model-wide active adapter, and the parameter names a BitFit / bottleneck /
    prompt / layer-wise adapter trains (what its files hold)."""

    adapters: dict = field(default_factory=dict)
    active: Optional[str] = None
    trained: list = field(default_factory=list)
    routing: Optional[list] = None  # the adapter names of an enclosing mixed_batch block, per sequence
    rows_per_sequence: int = 1      # and its rows_per_sequence
    disabled: int = 0               # depth of enclosing disable_adapter blocks: every row runs the base
    hidden: list = field(default_factory=list)  # the routings those blocks switched off (still the block's names)


_STATE = "_fastpeft"


def peft_state(model: nn.Module, create: bool = False) -> PeftState:
    """The model's ``PeftState``; a model without one gets a new empty one (kept on it with ``create``)."""
    state = model.__dict__.get(_STATE)
    if state is None:
        state = PeftState()
        if create:
            model.__dict__[_STATE] = state
    return state


def adapter_configs(model: nn.Module) -> dict:
    """Adapter name -> the config it was injected with (empty when none)."""
    state = model.__dict__.get(_STATE)
    return dict(state.adapters) if state is not None else {}


def unknown_adapters(model: nn.Module, argument: str, names: list, configs: dict) -> ValueError:
    """The error for adapter ``names`` (given as ``argument``) the model does not hold; names that layers hold through
    their own ``add_adapter`` are pointed to the model-level ways of adding one."""
    what = (f"{argument} {names[0]!r} is not an adapter" if argument == "adapter_name" else
            f"{argument} {names} are not adapters")
    layered = sorted({n for layer in lora_layers(model).values() for n in layer.adapter_names} & set(names), key=str)
    hint = (f"; {layered} {'was' if len(layered) == 1 else 'were'} added to single layers (FastLoRALinear.add_adapter),"
            " which the model does not track: add model-level adapters with fastpeft.inject(model, config, "
            "adapter_name=...) or fastpeft.load_adapter" if layered else "")
    return ValueError(f"{what} of this model; it has {list(configs)}{hint}")


def check_known(model: nn.Module, adapter_name, configs: dict, argument: str = "adapter_name") -> str:
    """``adapter_name``, one adapter of the model; else a TypeError (a list: PEFT's several active adapters) or
    ``unknown_adapters``' ValueError."""
    if not isinstance(adapter_name, str):
        several = isinstance(adapter_name, (list, tuple, set))
        raise TypeError(f"{argument} must be one adapter's name (a str), got {adapter_name!r}" + (
            ": fastpeft runs one adapter at a time per model (PEFT's several active adapters are not supported); "
            "fastpeft.mixed_batch routes a different adapter to each sequence" if several else ""))
    if adapter_name not in configs:
        raise unknown_adapters(model, argument, [adapter_name], configs)
    return adapter_name


def active_adapter(model: nn.Module):
    """The model-wide active adapter's name (None: the base model)."""
    state = model.__dict__.get(_STATE)
    return state.active if state is not None else None


# ---- finding layers ------------------------------------------------------------------------------------

def nested_parameter_layers(model: nn.Module, layers: dict) -> set:
    """The names of the ``FastLoRAParameter`` layers among ``layers`` that sit inside another (PEFT's nesting, one layer
    per Parameter of a module): they go with the outermost, whose ``base_module()`` is the module itself."""
    return {n for n, m in layers.items() if isinstance(m, FastLoRAParameter) and "." in n
            and isinstance(model.get_submodule(n.rpartition(".")[0]), FastLoRAParameter)}


def lora_layers(model: nn.Module) -> dict:
    """Full module name -> ``FastLoRALinear``, for every LoRA layer of ``model`` (its subclasses: embeddings,
    convolutions, QLoRA, and ``FastLoRAParameter`` on Parameters, nested as PEFT's: see ``nested_parameter_layers``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FastLoRALinear)}


def sparse_layers(model: nn.Module) -> dict:
    """Full module name -> ``SparseDeltaLinear``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def saved_module_wrappers(model: nn.Module) -> dict:
    """Full module name -> ``ModulesToSaveWrapper``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


# PEFT's TaskType values; the task models of the classification / QA ones train and save their head (PEFT's
# PeftModelForSequenceClassification / ...TokenClassification / ...QuestionAnswering add these module names to
# modules_to_save), which LoRA then leaves alone.
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _modules_to_save(model: nn.Module, config) -> list:
    """``config.modules_to_save`` plus, for a classification / QA ``task_type``, the task heads the model has
    (PEFT's task models add them; names it lacks are left out, as PEFT leaves them)."""
    names = list(getattr(config, "modules_to_save", None) or [])
    heads = TASK_HEADS.get(getattr(config, "task_type", None), ())
    if heads:
        present = [n for n, _ in model.named_modules()]
        names += [h for h in heads if h not in names and any(matches([h], n) for n in present)]
    return names


def _saved_module_names(model: nn.Module, modules_to_save) -> list:
    """Modules that ``modules_to_save`` entries name (suffix match, as PEFT), outermost only."""
    if not modules_to_save:
        return []
    found = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(m) for m in modules_to_save) \
                and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    if not found:
        raise ValueError(f"modules_to_save {modules_to_save} matched no module of the model")
    for name in found:  # (as PEFT: a trainable copy of another adapter's LoRA layer or tokens has no file form)
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper) and not isinstance(module, TrainableTokensWrapper):
            continue  # (another adapter's trained copy: this one gets its own beside it)
        held = [f"{name}.{n}".rstrip(".") + f" ({type(m).__name__})" for n, m in module.named_modules()
                if isinstance(m, SparseDeltaLinear) or isinstance(m, FastLoRALinear) and m.adapter_names
                or isinstance(m, TrainableTokensWrapper) and len(m.modules_to_save)]
        if held:
            raise ValueError(f"modules_to_save names {name!r}, which holds another adapter's layers: {few(held)}; "
                             "a trainable copy of them cannot be saved or loaded (PEFT refuses it too): leave it out "
                             "of modules_to_save, or delete that adapter first")
    for name in found:  # a trainable copy needs float parameters (a 4-bit / 8-bit packed weight cannot train)
        frozen = [n for n, p in model.get_submodule(name).named_parameters() if not p.is_floating_point()]
        if frozen:
            raise ValueError(f"modules_to_save: module {name!r} holds parameters that are not floating point "
                             f"({few(frozen)}: a quantized layer?), which a trainable copy cannot train; leave it out "
                             "of modules_to_save (or target it with LoRA)")
    return found


@dataclass
class LoraPlan:
    """What ``inject`` will do, computed without touching the model (so loads can validate first)."""

    targets: dict  # full module name -> (r, lora_alpha), or None for a sparse delta alone
    saved: list    # full names of the modules_to_save modules
    tokens: dict = field(default_factory=dict)  # trainable tokens: full name -> (token ids, tied embedding or None)
    # Parameters (target_parameters): layer name in targets (PEFT's nesting: "<module>", "<module>.base_layer") ->
    # (the module's name, the parameter's name), innermost first, after the module targets
    params: dict = field(default_factory=dict)

    def base(self, model: nn.Module, name: str) -> nn.Module:
        """Target ``name``'s module as it is before the change: a Parameter's module (or the LoRA layer on it,
        holding other adapters), else the module at ``name``."""
        return model.get_submodule(self.params[name][0] if name in self.params else name)


def plan_lora(model: nn.Module, config, reload: bool = False, warn: bool = True) -> LoraPlan:
    """Resolve a ``LoraConfig`` or ``SparseDeltaConfig`` against ``model``'s module names; raises ValueError
    on no or bad matches.

    Targets are ``nn.Linear`` modules, or ``FastLoRALinear`` layers that already hold other adapters
    (the new adapter goes beside them); with ``reload`` (a ``SparseDeltaConfig`` loaded over the model's sparse
    adapter) its ``SparseDeltaLinear`` layers."""
    saved = _saved_module_names(model, _modules_to_save(model, config))
    params = getattr(config, "target_parameters", None)
    # (PEFT's: target_parameters alone adapt no module; its default targets are for a config without either)
    spec = config.target_modules if config.target_modules is not None else [] if params else default_targets(model)
    all_linear = is_all_linear(spec)
    head = output_head(model) if all_linear else None
    targets = {}
    inner = []  # prefixes of LoRA layers and wrappers: their internals are never targets
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        if isinstance(module, (FastLoRALinear, SparseDeltaLinear, ModulesToSaveWrapper)):
            inner.append(name + ".")
        if matches(config.exclude_modules, name) or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if all_linear:  # PEFT's all-linear takes transformers' Conv1D too (GPT-2), not embeddings
            conv = _conv1d(module) or isinstance(module, FastLoRALinear) and module.fan_in_fan_out
            hit = (isinstance(module, (nn.Linear, FastLoRALinear))
                   and not isinstance(module, (FastLoRAEmbedding, FastLoRAConv, FastLoRAParameter))
                   or foreign_quant_library(module) is not None or conv) and module is not head \
                and not (conv and (isinstance(config, SparseDeltaConfig) or config.sparse is not None))
        else:
            hit = matches(spec, name)
        # PEFT's block filter, on suffix matches of a list (here also on all-linear): an exact full name is kept
        layers = getattr(config, "layers_to_transform", None)
        if hit and layers is not None and not (isinstance(spec, list) and name in spec):
            hit = in_layers(name, layers, config.layers_pattern)
        if not hit:
            continue
        if isinstance(module, FastLoRAParameter):
            held = [f"{_unwrapped(name)}.{m.parameter_name}" for m in FastLoRAParameter.chain(module)]
            raise ValueError(f"target_modules matched {name!r}, which holds LoRA on its Parameters {held}: those "
                             f"take adapters through target_parameters (PEFT's), e.g. target_parameters={held}; narrow "
                             "target_modules")
        _check_quantized_target(name, module, config)
        w = getattr(module, "weight", None)
        if getattr(module, "_hf_hook", None) is not None and isinstance(w, torch.Tensor) and w.is_meta:
            raise ValueError(f"target_modules matched {name!r}, whose weight accelerate offloads (device_map with "
                             "'cpu' / 'disk' entries: the weight is on meta and its hook loads it per call), which "
                             "fastpeft's layer would drop: load the model without offloading, or exclude it")
        if isinstance(module, nn.Linear) and not isinstance(module, (FastLoRALinear, SparseDeltaLinear)):
            base_kind(module, name)  # an nn.Linear subclass with a forward of its own: refused, naming it
        if reload and isinstance(module, SparseDeltaLinear):
            targets[name] = None  # the model's sparse adapter, loaded again
            continue
        if isinstance(module, (nn.Embedding, FastLoRAEmbedding)):  # (both checks refuse a sparse delta)
            _check_embedding_target(name, module, config)
        elif _conv1d(module) or isinstance(module, FastLoRALinear) and module.fan_in_fan_out:
            _check_conv1d_target(name, module, config)
        elif isinstance(module, (nn.modules.conv._ConvNd, FastLoRAConv)):
            _check_conv_target(name, module, config)
        elif not isinstance(module, (nn.Linear, FastLoRALinear)):
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}; fastpeft "
                             "adapts nn.Linear modules only (LoRA: transformers Conv1D, nn.Embedding and nn.Conv1d / "
                             "Conv2d / Conv3d too): narrow target_modules or exclude it")
        elif isinstance(config, SparseDeltaConfig):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}; a sparse delta goes on "
                                 "a plain nn.Linear (one adapter kind per layer)")
            targets[name] = None
            continue
        targets[name] = (pattern_value(config.rank_pattern, name, config.r),
                         pattern_value(config.alpha_pattern, name, config.lora_alpha))
    param_targets, param_layers = _plan_parameters(model, config, saved, set(targets), warn and not reload) \
        if params else ({}, {})
    targets.update(param_targets)  # after the modules' (PEFT draws their initial factors first)
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, FastLoRALinear)) or _conv1d(m)
                  or isinstance(m, nn.modules.conv._ConvNd)][:8]
        hint = ""
        if isinstance(spec, str) and not all_linear:
            hint = (f"; a string is matched against the whole module name (re.fullmatch, as PEFT): for a name "
                    f"suffix pass a list ([{spec!r}]) or a pattern such as '.*{spec}'")
        conv1d = [n for n, m in model.named_modules() if _conv1d(m)][:3]
        if conv1d and (isinstance(config, SparseDeltaConfig) or config.sparse is not None):
            hint += (f"; {conv1d} are transformers Conv1D layers (GPT-2 style), which take LoRA and DoRA adapters but "
                     "no sparse delta (RoSA's included)")
        if getattr(config, "layers_to_transform", None) is not None:
            hint += (f"; layers_to_transform={config.layers_to_transform!r} keeps only modules named "
                     f"'<{config.layers_pattern or 'name'}>.<i>.' with i among them")
        raise ValueError(f"target_modules {spec!r} matched no nn.Linear of the model, nor a convolution or embedding "
                         f"(after exclude_modules {config.exclude_modules!r}); its linear and convolution layers are "
                         f"named like {linear}{hint}")
    skipped = [n for n, m in model.named_modules() if (_conv1d(m) or getattr(m, "fan_in_fan_out", False) is True)
               and m is not head and not any(n.startswith(p) for p in inner)] if all_linear and (
        isinstance(config, SparseDeltaConfig) or config.sparse is not None) else []
    if warn and skipped:
        warnings.warn(f"target_modules='all-linear' leaves the transformers Conv1D layers {few(skipped)} without a "
                      "sparse delta (GPT-2 style layers take LoRA and DoRA adapters only)", UserWarning, stacklevel=4)
    if warn and not reload:
        # the user's own target_modules only: not PEFT's defaults (blip-2's list names both language models'
        # projections), not a file being loaded (its positions are fixed already)
        _warn_unadapted(model, config.target_modules, is_all_linear(config.target_modules),
                        {f"{base}.{pn}" for base, pn in param_layers.values()})
    return LoraPlan(targets=targets, saved=saved, tokens=_plan_tokens(model, config, targets, saved),
                    params=param_layers)


def _parameter_hit(wanted: list, key: str, hit: set) -> bool:
    """Whether parameter ``key`` ("<module>.<param>") is one of ``wanted`` (PEFT's target_parameters: the full name or
    a suffix after a dot); the entries it matches join ``hit``."""
    found = [t for t in wanted if key == t or key.endswith("." + t)]
    hit.update(found)
    return bool(found)


def _unwrapped(name: str) -> str:
    """A module name without the ``.base_layer`` parts that LoRA layers on Parameters add (PEFT's
    ``strip_base_layer_from_name``)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


def _held_parameters(model: nn.Module) -> dict:
    """Adapter name -> the Parameters ("<module>.<param>", unwrapped names) its ``FastLoRAParameter`` layers adapt."""
    held: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, FastLoRAParameter):
            for a in m.adapter_names:
                held.setdefault(a, set()).add(f"{_unwrapped(name)}.{m.parameter_name}")
    return held


def _plan_parameters(model: nn.Module, config, saved: list, module_targets: set, warn: bool) -> tuple:
    """``(targets, params)`` of ``config.target_parameters`` (see ``LoraPlan``): the Parameters they name (PEFT's
    matching: the full name "<module>.<param>" or a suffix after a dot; a module already holding LoRA on Parameters by
    its unwrapped name), each a layer nested as PEFT nests its ``ParamWrapper`` layers. Raises, naming it, for a
    Parameter LoRA cannot go on (``parameter_reason``: 2-D and 3-D floating-point ones), one of a module that
    target_modules adapts too or of a modules_to_save module, one whose module accelerate offloads, a module whose
    LoRA layers hold other Parameters, other Parameters than another adapter of the model adapts (PEFT's rule: every
    adapter of a model targets the same ones), and when nothing matches; warns of entries that match nothing."""
    wanted, hit = config.target_parameters, set()
    targets, params, inner = {}, {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        if isinstance(module, (FastLoRALinear, SparseDeltaLinear, ModulesToSaveWrapper)):
            inner.append(name + ".")
            if not isinstance(module, FastLoRAParameter):
                if isinstance(module, FastLoRALinear) and _parameter_hit(wanted, f"{name}.weight", hit):
                    raise ValueError(f"target_parameters matched {name}.weight, which LoRA of adapters "
                                     f"{module.adapter_names} adapts through target_modules: a Parameter takes one "
                                     "(PEFT refuses this too); leave it out of target_parameters")
                continue
        chain = FastLoRAParameter.chain(module)
        base = param_base(module)
        matched = [pn for pn, _ in base.named_parameters(recurse=False) if _parameter_hit(wanted, f"{name}.{pn}", hit)]
        if not matched:
            continue
        where = next((s for s in saved if name == s or name.startswith(s + ".")), None)
        if where is not None:
            raise ValueError(f"target_parameters matched {name}.{matched[0]}, inside modules_to_save {where!r} "
                             "(trained whole already): name it in one of the two")
        if name in module_targets:
            raise ValueError(f"target_parameters matched {name}.{matched[0]}, a Parameter of {name!r}, which "
                             "target_modules adapts too: one of the two (PEFT's LoRA layer and ParamWrapper do not "
                             "stack)")
        for pn in matched:
            why = parameter_reason(base, pn)
            if why is not None:
                raise ValueError(f"target_parameters matched {name}.{pn}: {why}; narrow target_parameters")
            if getattr(base, "_hf_hook", None) is not None and getattr(base, pn).is_meta:
                raise ValueError(f"target_parameters matched {name}.{pn}, which accelerate offloads (device_map with "
                                 "'cpu' / 'disk' entries: on meta, its hook loads it per call), which fastpeft's "
                                 "layer would never see: load the model without offloading, or leave it out")
        if chain:
            paths = {m.parameter_name: name + ".base_layer" * i for i, m in enumerate(chain)}
            missing = [pn for pn in matched if pn not in paths]
            if missing:
                held = sorted({a for m in chain for a in m.adapter_names})
                raise ValueError(f"target_parameters matched {[f'{name}.{pn}' for pn in missing]}, of a module whose "
                                 f"LoRA layers hold {sorted(paths)} for adapters {held}: every adapter of a model "
                                 "targets the same Parameters (PEFT's rule)")
        else:  # PEFT's nesting: the Parameters in the module's order, the first innermost
            paths = {pn: name + ".base_layer" * (len(matched) - 1 - i) for i, pn in enumerate(matched)}
        for pn in sorted(matched, key=lambda pn: -paths[pn].count(".base_layer")):  # innermost first, as PEFT draws
            key = f"{name}.{pn}"
            targets[paths[pn]] = (pattern_value(config.rank_pattern, key, config.r),
                                  pattern_value(config.alpha_pattern, key, config.lora_alpha))
            params[paths[pn]] = (name, pn)
    owners = sorted({b for b, _ in params.values()})
    inside = [(a, b) for a in owners for b in owners if b.startswith(a + ".")]
    if inside:
        raise ValueError(f"target_parameters matched Parameters of {inside[0][0]!r} and of its submodule "
                         f"{inside[0][1]!r}: LoRA on a module's own Parameters wraps it whole, so its submodules' "
                         "cannot take LoRA as well (PEFT fails on this too); narrow target_parameters")
    if not targets:
        found = [f"{n}.{pn}" for n, m in model.named_modules() if n for pn, p in m.named_parameters(recurse=False)
                 if p.dim() == 3][:4]
        raise ValueError(f"target_parameters {wanted} matched no parameter of the model (PEFT's matching: the full "
                         "name '<module>.<param>' or a suffix of it after a dot); " + (
                             f"its 3-D expert weights are named like {found}" if found else
                             "it has no 3-D expert weights (the experts modules of transformers >= 5's mixture-of-"
                             "experts models); a 2-D weight is named '<module>.weight'"))
    keys = {f"{_unwrapped(b)}.{pn}" for b, pn in params.values()}
    other = {a: ks for a, ks in _held_parameters(model).items() if ks != keys}
    if other:
        a, ks = next(iter(other.items()))
        raise ValueError(f"target_parameters adapts {few(sorted(keys))}, while adapter {a!r} of the model adapts "
                         f"{few(sorted(ks))}: every adapter of a model targets the same Parameters (PEFT's rule: it "
                         "cannot hold them side by side)")
    unmatched = [t for t in wanted if t not in hit]
    if warn and unmatched:
        warnings.warn(f"target_parameters entries {unmatched} match no parameter of the model (the others do): they "
                      "adapt nothing", UserWarning, stacklevel=5)
    return targets, params


def _plan_tokens(model: nn.Module, config, targets: dict, saved: list) -> dict:
    """Where ``trainable_token_indices`` trains rows, checked: full module name -> (token ids, the embedding whose
    rows a tied output head shares, or None). A list names rows of the input embeddings; a dict names layers
    (suffix match, as PEFT). As PEFT, an output head tied to wrapped input embeddings follows them (the same rows),
    unless the dict gives it other ids."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return {}
    emb = input_embeddings(model)
    emb_name = _module_name(model, emb)
    inner = [n + "." for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    if isinstance(spec, dict):
        wanted = {}
        for key, ids in spec.items():
            names = [n for n, _ in model.named_modules() if n and matches([key], n)
                     and not any(n.startswith(p) for p in inner)]
            if not names:
                raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of the model")
            wanted.update(dict.fromkeys(names, ids))
    elif emb_name is None:
        raise ValueError("trainable_token_indices as a list trains rows of the input embeddings, but the model has "
                         "none (get_input_embeddings()); name the layer: "
                         "trainable_token_indices={'embed_tokens': [...]}")
    else:
        wanted = {emb_name: spec}
    plan = {name: (ids, None) for name, ids in wanted.items()}
    head = output_head(model)
    head_name = _module_name(model, head)
    if emb_name in wanted and isinstance(head, ModulesToSaveWrapper) and not isinstance(head, TrainableTokensWrapper) \
            and len(head.modules_to_save) and head.original_module.weight is _token_base(emb).weight:
        # (read through the wrapper the tie did not show while its copy was active: the head then kept the old rows,
        # 31.9 off in logits, and refused it while none was; PEFT's forward fails on this model)
        raise ValueError(f"trainable_token_indices trains rows of {emb_name!r}, whose weight the output head "
                         f"{head_name!r} shares, and another adapter trains a copy of that head (modules_to_save): "
                         "its columns cannot follow the rows; train the tokens in a model without that adapter")
    tied = emb_name in wanted and head_name is not None and head_name not in inner and \
        _token_base(head).weight is _token_base(emb).weight
    if tied and wanted.get(head_name, wanted[emb_name]) == wanted[emb_name]:
        plan[head_name] = (wanted[emb_name], emb_name)  # tied: the head's columns follow the embedding's rows
    for name, (ids, _) in plan.items():
        _check_token_target(model, name, ids, targets, saved)
    return plan


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """``module``'s full name in ``model`` (None for None or a module not in it)."""
    return None if module is None else next((n for n, m in model.named_modules() if m is module), None)


def _token_base(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, TrainableTokensWrapper) else module


def _check_token_target(model: nn.Module, name: str, ids: list, targets: dict, saved: list) -> None:
    """A layer trainable tokens can go on: an nn.Embedding (transformers' scaled ones too) or a plain nn.Linear head,
    not trained otherwise; the ids inside its vocabulary."""
    module = model.get_submodule(name)
    if name in saved or isinstance(module, ModulesToSaveWrapper) and not isinstance(module, TrainableTokensWrapper):
        raise ValueError(f"trainable_token_indices: {name!r} is in modules_to_save, trained whole already; name it in "
                         "one of the two (as PEFT)")
    if name in targets or isinstance(module, (FastLoRALinear, SparseDeltaLinear)):
        raise ValueError(f"trainable_token_indices: {name!r} (tied to the input embeddings, or named) is a LoRA / "
                         "sparse-delta target too; fastpeft trains tokens on a plain embedding or head only: leave it "
                         "out of target_modules")
    base = _token_base(module)
    if isinstance(base, nn.Embedding):
        plain = type(base).forward is nn.Embedding.forward or hasattr(base, "embed_scale")
        if not plain or base.max_norm is not None:
            raise ValueError(f"trainable_token_indices: {name!r} is a {type(base).__name__} "
                             + ("with max_norm (renormalises its rows in place)" if plain else
                                "with a forward of its own") + "; trainable tokens need an nn.Embedding (or a "
                             "transformers scaled embedding, with embed_scale)")
        vocab = base.num_embeddings
    elif type(base) is nn.Linear:
        vocab = base.out_features
    else:
        raise ValueError(f"trainable_token_indices: {name!r} is a {type(base).__name__}; trainable tokens go on an "
                         "nn.Embedding (or the nn.Linear output head tied to it)")
    if max(ids) >= vocab:
        raise ValueError(f"trainable_token_indices for {name!r}: token id {max(ids)} is out of range for its "
                         f"{vocab} rows")


def _conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D or a subclass (one with a forward of its own is refused by ``_check_conv1d_target``)."""
    conv = conv1d_class()
    return conv is not None and isinstance(module, conv)


def _check_conv1d_target(name: str, module: nn.Module, config) -> None:
    """A transformers Conv1D target (or a layer made from one, taking another adapter): LoRA and DoRA only,
    Conv1D's own forward only."""
    if not isinstance(module, FastLoRALinear) and not is_conv1d(module):
        raise ValueError(f"target_modules matched {name!r}, a {type(module).__module__}.{type(module).__name__}: a "
                         "transformers Conv1D with a forward of its own, which fastpeft's layer would bypass (it "
                         "computes x W + b from the weight); exclude it")
    if isinstance(config, SparseDeltaConfig) or config.sparse is not None:
        raise ValueError(f"target_modules matched {name!r}, a transformers Conv1D (GPT-2 style, W stored (in, out)): "
                         "it takes LoRA and DoRA adapters, not a sparse delta (RoSA's included); exclude it or use "
                         "sparse_density=0")


def _check_conv_target(name: str, module: nn.Module, config) -> None:
    """A convolution target (or a LoRA convolution taking another adapter): plain LoRA only, on what
    ``FastLoRAConv`` takes (``layers.conv_reason``)."""
    if isinstance(config, SparseDeltaConfig) or config.sparse is not None:
        raise ValueError(f"target_modules matched {name!r}, a convolution: fastpeft's convolutions take LoRA and DoRA "
                         "adapters, not a sparse delta (RoSA's included); exclude it")
    if config.use_dora and (module.padding_mode != "zeros" or dilated(module)):
        what = f"padding_mode={module.padding_mode!r}" if module.padding_mode != "zeros" else \
            f"dilation={tuple(module.dilation)}"
        raise ValueError(f"target_modules matched {name!r}, a convolution with {what}, with use_dora=True: PEFT's DoRA "
                         "convolution computes part of its base with zero padding and no dilation; exclude it or use "
                         "LoRA")
    if getattr(config, "init_lora_weights", True) == "orthogonal":
        raise ValueError(f"target_modules matched {name!r}, a convolution, with init_lora_weights='orthogonal': PEFT's "
                         "orthogonal init is for linear layers (PEFT refuses it on convolutions); exclude it")
    why = None if isinstance(module, FastLoRAConv) else conv_reason(module) or wrap_reason(module)
    if why is not None:
        raise ValueError(f"target_modules matched {name!r}, {why}; exclude it")


def _check_embedding_target(name: str, module: nn.Module, config) -> None:
    """An nn.Embedding target (or an embedding LoRA layer taking another adapter): plain LoRA only, nn.Embedding's
    own forward, no max_norm, dense gradients (``_checks.check_embedding``)."""
    if isinstance(config, SparseDeltaConfig) or config.sparse is not None or config.lora_bias:
        what = "lora_bias=True (PEFT refuses it there too)" if getattr(config, "lora_bias", False) else \
            "a sparse delta (RoSA's included)"
        raise ValueError(f"target_modules matched {name!r}, an embedding layer: fastpeft's embedding LoRA takes LoRA "
                         f"and DoRA adapters, not {what}; exclude it")
    if not isinstance(module, FastLoRAEmbedding):
        check_embedding(module, f"module {name!r}")


def _in_out(module: nn.Module) -> tuple:
    """``(in_features, out_features)`` of a target before it is wrapped: an nn.Linear's, a Conv1D's (in, out)
    weight shape, an embedding's (num_embeddings, embedding_dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if _conv1d(module):
        return tuple(module.weight.shape)
    if isinstance(module, (nn.modules.conv._ConvNd, FastLoRAConv)):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def _factor_shapes(module: nn.Module, r: int) -> tuple:
    """PEFT's shapes of a target's (A, B): (r, in) and (out, r); a convolution's kernels (r, C, *k) and
    (O, r, 1, ...)."""
    k, n = _in_out(module)
    if isinstance(module, (nn.modules.conv._ConvNd, FastLoRAConv)):
        return (r, k, *module.kernel_size), (n, r) + (1,) * len(module.kernel_size)
    return (r, k), (n, r)


def _factor_keys(name: str, module: nn.Module) -> tuple:
    """PEFT's file keys of a target's (A, B): ``lora_embedding_A`` / ``_B`` on an embedding, else
    ``lora_A.weight`` / ``lora_B.weight``."""
    if isinstance(module, (nn.Embedding, FastLoRAEmbedding)):
        return f"{name}.lora_embedding_A", f"{name}.lora_embedding_B"
    return f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def _warn_unadapted(model: nn.Module, spec, all_linear: bool, covered: set = frozenset()) -> None:
    """A warning for what target_modules names but fastpeft leaves alone, where PEFT would adapt something: list
    entries that match no module (a recipe's w1 / w2 / w3 on a model whose experts are fused), and under all-linear
    the fused expert weights of mixture-of-experts layers (3-D Parameters, which PEFT and inject adapt through
    target_parameters, not through target_modules). Before 2026-12-01, silently: all-linear on Mixtral
    trained 12 % of PEFT's parameters, none in the experts. ``covered``: the expert weights ("<module>.<param>")
    target_parameters adapts (as do those LoRA holds already: not warned of)."""
    if all_linear:
        # 3-D or wider Parameters of modules that are not convolutions (whose kernels PEFT's all-linear leaves too)
        # (not a LoRA convolution's kernels, nor the Parameters a weight_norm computes a convolution's weight from)
        convs = [mn + "." for mn, m in model.named_modules() if isinstance(m, (FastLoRAConv, FastLoRAParameter))]
        fused = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
                 if not isinstance(m, (nn.modules.conv._ConvNd, FastLoRAConv)) and ".parametrizations." not in f".{mn}."
                 and not any(mn.startswith(c) for c in convs)
                 for pn, p in m.named_parameters(recurse=False) if p.dim() >= 3 and f"{mn}.{pn}" not in covered]
        if fused:
            warnings.warn("target_modules='all-linear' leaves the model's fused expert weights as they are: "
                          f"{few(fused)} (3-D Parameters: inject adapts nn.Linear modules only; PEFT adapts them "
                          "through target_parameters, which inject takes too: LoraConfig(target_parameters="
                          "[...]))", UserWarning,
                          stacklevel=5)
    elif isinstance(spec, (list, tuple)):
        names = [n for n, _ in model.named_modules() if n]
        unmatched = [e for e in spec if not any(matches([e], n) for n in names)]
        if unmatched:
            warnings.warn(f"target_modules entries {unmatched} match no module of the model (the others do): they "
                          "adapt nothing", UserWarning, stacklevel=5)


def _check_quantized_target(name: str, module: nn.Module, config) -> None:
    """Quantized targets, checked before any surgery: bitsandbytes layers take LoRA (not a sparse delta: RoSA needs
    a floating-point weight) and must be readable in place; other libraries' quantized layers are refused by name."""
    if foreign_quant_library(module) is not None:
        base_kind(module, name)  # raises, naming the library
    if not (isinstance(module, QLoRALinear) or is_quantized(module)):
        return
    if isinstance(config, SparseDeltaConfig) or getattr(config, "sparse_density", 0.0) > 0.0:
        kind = type(module.base_layer if isinstance(module, QLoRALinear) else module).__name__
        raise ValueError(f"target_modules matched {name!r}, a bitsandbytes {kind}: a sparse delta (RoSA) needs a "
                         "floating-point base weight; use LoRA alone (sparse_density=0) on a quantized model, or "
                         "exclude it")
    if getattr(config, "lora_bias", False):
        kind = type(module.base_layer if isinstance(module, QLoRALinear) else module).__name__
        raise ValueError(f"target_modules matched {name!r}, a bitsandbytes {kind}, with lora_bias=True: not "
                         "supported on a quantized base here (PEFT computes it; train it with PEFT and fastpeft."
                         "accelerate, which leaves those layers on PEFT's forward), or exclude it")
    if not isinstance(module, QLoRALinear):
        QuantizedWeight.from_module(module, name)  # not quantized yet / bnb's CPU-only layout: refused, named


def _trainable_flags(model: nn.Module) -> dict:
    """id(parameter) -> requires_grad, for every parameter of ``model``."""
    return {id(p): p.requires_grad for p in model.parameters()}


def _restore_flags(model: nn.Module, flags: dict, only=None) -> None:
    """The requires_grad of ``flags`` put back on the parameters it has (those named as ``only(name)`` says, if given);
    parameters made since keep theirs."""
    for n, p in model.named_parameters():
        if id(p) in flags and (only is None or only(n)):
            p.requires_grad_(flags[id(p)])


def _train_biases(model: nn.Module, bias: str, adapter_name=None) -> None:
    """The base biases trainable as the active adapter ``adapter_name``'s ``bias`` says: every parameter named bias
    ("all"), its LoRA layers' ("lora_only") or none; the modules_to_save wrappers' (originals and copies) are theirs
    to set. Since 2026-12-01 they follow the active adapter: the adapter whose files hold them trains them, no other
    one does (they were unfrozen at inject, and stayed trainable while another adapter trained)."""
    wrapped = {id(p) for w in saved_module_wrappers(model).values() for p in w.parameters()}
    lora = {id(m.bias) for m in lora_layers(model).values()
            if isinstance(getattr(m, "bias", None), torch.Tensor) and adapter_name in m.adapter_names}
    for n, p in model.named_parameters():
        if is_bias(n) and id(p) not in wrapped:
            p.requires_grad_(bias == "all" or (bias == "lora_only" and id(p) in lora))


# ---- sparse deltas in files ------------------------------------------------------------------------------

# A sparse delta's tensors: <module>.sparse_delta.indices (int64) and <module>.sparse_delta.values.
_SPARSE_SUFFIXES = (".sparse_delta.indices", ".sparse_delta.values")


def _sparse_file_tensors(layers: dict, adapter_name: str) -> dict:
    """File key -> tensor for each layer's sparse delta (SparseDeltaLinear, or a RoSA adapter's)."""
    keys = {}
    for name, layer in layers.items():
        delta = layer.sparse_delta(adapter_name)
        if delta is not None:
            keys[name + _SPARSE_SUFFIXES[0]] = delta.delta_indices.to(torch.int64)
            keys[name + _SPARSE_SUFFIXES[1]] = delta.delta_values
    return keys


def _take_sparse(model: nn.Module, spec: SparseSpec | None, plan: LoraPlan, weights: dict, directory) -> dict:
    """Pop and check the sparse-delta tensors of a file: target name -> (indices, values).

    Every target must have them when the config has a sparse delta (``spec``), and no other key may."""
    found = {}
    for key in [k for k in weights if k.endswith(_SPARSE_SUFFIXES)]:
        name = key[: key.rindex(".sparse_delta.")]
        if spec is None or name not in plan.targets:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: unexpected keys [{key!r}]")
        found.setdefault(name, {})[key[len(name):]] = weights.pop(key)
    if spec is None:
        return {}
    out = {}
    for name in plan.targets:
        parts = found.get(name, {})
        missing = [name + s for s in _SPARSE_SUFFIXES if s not in parts]
        if missing:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: missing keys {missing}")
        idx, vals = parts[_SPARSE_SUFFIXES[0]], parts[_SPARSE_SUFFIXES[1]]
        module = model.get_submodule(name)
        if not vals.is_floating_point():
            raise ValueError(f"adapter tensor {name + _SPARSE_SUFFIXES[1]!r} must be floating point, got {vals.dtype}")
        try:
            check_sparse_delta(idx, vals, module.out_features, module.in_features, spec.block_size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sparse delta of {name!r} in {os.fspath(directory)!r}: {e}") from None
        out[name] = (idx, vals)
    return out


def _check_scores_selection(config, field_name: str) -> None:
    spec = config.sparse
    if spec is not None and spec.selection == "scores":
        raise ValueError(f"{field_name}='scores' needs a scores tensor per layer, which inject has none of: inject "
                         "with 'random' or 'magnitude', then fastpeft.select_by_gradients re-picks the positions "
                         "from gradient scores")


def _check_nothing_merged(model: nn.Module) -> None:
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:
        raise RuntimeError(f"layers {few(merged)} have a merged adapter: unmerge them before adding another")


def _model_name(model: nn.Module):
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


# ---- LoRA --------------------------------------------------------------------------------------------------

# PEFT LoraConfig fields that change what the adapter computes and that fastpeft does not implement:
# an adapter that sets any of them cannot give PEFT's outputs here, so loading it is refused.
_UNSUPPORTED = ("layer_replication", "use_qalora", "alora_invocation_tokens",
                "use_bdlora", "megatron_config")
_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
                  "use_rslora", "init_lora_weights", "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora",
                  "task_type", "layers_to_transform", "layers_pattern", "trainable_token_indices", "lora_bias",
                  "target_parameters", "loftq_config", "eva_config", "corda_config")
# fields of PEFT's LoraConfig that only describe (or only matter with a variant refused elsewhere: megatron, QA-LoRA,
# an init that rewrites the base weights)
_PEFT_METADATA = ("auto_mapping", "base_model_name_or_path", "peft_type", "peft_version", "revision", "megatron_core",
                  "qalora_group_size", "lora_ga_config", "runtime_config")
_TIED_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared")


def lora_variants(d: dict) -> dict:
    """The fields of a PEFT LoRA config (``to_dict()`` or adapter_config.json) that ask for something fastpeft does not
    compute: those in ``_UNSUPPORTED`` set, and with peft installed any other field of PEFT's LoraConfig that
    fastpeft does not know and that differs from PEFT's default (KaSA, MonteCLoRA, VeLoRA, ... and those of later
    PEFT versions), so that none is dropped silently. Before 2026-12-01 only the listed ones were caught."""
    bad = {k: d[k] for k in _UNSUPPORTED if d.get(k) not in (None, False, [], {}, 0)}
    try:
        import peft
        defaults = peft.LoraConfig().to_dict()
    except Exception:  # (no peft: the list above)
        return bad
    known = set(_CONFIG_FIELDS + _SPARSE_LORA_FIELDS + _PEFT_METADATA) | {"inference_mode", "fan_in_fan_out",
                                                                          "ensure_weight_tying"}
    for k, default in defaults.items():
        if k not in known and k in d and d[k] != default and d[k] not in (None, False, [], {}):
            bad.setdefault(k, d[k])
    return bad


# PEFT's inits whose adapters sit on the base weights as they were: the file's A and B are all there is
_LOADABLE_INITS = (True, False, "gaussian", "orthogonal", "eva")
_SPARSE_LORA_FIELDS = ("sparse_density", "sparse_block_size", "sparse_selection")  # RoSA: fastpeft's own keys


_INIT_FIELDS = ("init_lora_weights", "loftq_config", "eva_config", "corda_config")  # an init and its sub-configs


def with_init(config, source=None):
    """``config`` (a LoraConfig) with ``source``'s init and its PEFT sub-configs, or with PEFT's default init (True,
    none): switching the init alone would leave a sub-config its checks drop or fill in (with PEFT's warnings)."""
    if source is None:
        return replace(config, init_lora_weights=True, loftq_config={}, eva_config=None, corda_config=None)
    return replace(config, **{k: getattr(source, k) for k in _INIT_FIELDS})


def _check_rewritable(model: nn.Module, config, plan: LoraPlan, eigens: bool = True) -> None:
    """PiSSA / OLoRA / LoftQ (a base-rewriting ``init_lora_weights``): every target of ``plan`` checked before any
    changes (``base_rewriting_reason``; a weight tied to another parameter refused: rewriting it would change that
    one too)."""
    if base_rewriting_init(config.init_lora_weights) is None:
        return
    rewritten = {}  # the targets whose W is rewritten (an embedding takes PEFT's plain init)
    for name, t in plan.targets.items():
        if t is not None and name not in plan.params:
            module = model.get_submodule(name)
            why = base_rewriting_reason(module, t[0], config.init_lora_weights, config.sparse_density)
            if why is None and eigens and config.init_lora_weights == "corda" and not isinstance(
                    module, (nn.Embedding, FastLoRAEmbedding)):
                why = corda_reason(module, t[0])
            if why is not None:
                raise ValueError(f"target_modules matched {name!r}: {why}")
            if not isinstance(module, (nn.Embedding, FastLoRAEmbedding)):
                rewritten[name] = module
    tied = _tied_weights(model, rewritten)
    if tied:  # PEFT rewrites the shared W: the tied input embeddings would change too
        name = next(iter(tied))
        raise ValueError(f"target_modules matched {name!r}, whose weight is tied to {few(tied[name])}: "
                         f"init_lora_weights={config.init_lora_weights!r} would rewrite W in both places, and the "
                         "model would not start as its base; exclude it (or untie first)")


def _warn_rewritten_base(model: nn.Module, config, adapter_name: str) -> None:
    """PEFT's warning when an adapter made with PiSSA / OLoRA / LoftQ (which rewrite the base weights) shares the model
    with another adapter."""
    configs = {**adapter_configs(model), adapter_name: config}
    rewriting = [n for n, c in configs.items() if base_rewriting_init(getattr(c, "init_lora_weights", None))]
    if len(configs) > 1 and rewriting:
        others = [n for n in configs if n not in rewriting]
        warnings.warn(f"adapters {rewriting} were made with PiSSA / OLoRA / LoftQ / CorDA, which leave W - s B0 A0 "
                      f"(LoftQ: the quantized W) in the base weights' place: the model's other adapters ({others}) sit "
                      "on that, not on W. To combine a PiSSA / OLoRA / CorDA adapter with others, save it as plain "
                      "LoRA (save_adapter(..., path_initial_model_for_weight_conversion=...)) and load that on the "
                      "original model", UserWarning, stacklevel=4)


class LoraMethod(Method):
    """LoRA (and RoSA: LoRA with a sparse delta beside it) in PEFT's files.

    Tensor keys: ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r); ``<module>.base_layer.bias``
    for a LoRA layer's bias and ``<path>.bias`` for other biases, when the config's ``bias`` trains them;
    ``<module>.<param>`` for every parameter of a ``modules_to_save`` module (its trained copy);
    ``<module>.sparse_delta.indices`` / ``.values`` for a RoSA delta; ``<module>.lora_magnitude_vector`` (out,)
    for a DoRA adapter (``use_dora``)."""

    peft_type, config_class, alone = LoraConfig.peft_type, LoraConfig, False

    def check_addable(self, model: nn.Module, config) -> None:
        _check_nothing_merged(model)
        _check_scores_selection(config, "sparse_selection")
        biased = [n for n, c in adapter_configs(model).items() if getattr(c, "bias", "none") != "none"]
        if getattr(config, "bias", "none") != "none" and biased:
            # PEFT's rule ("LoraModel supports only 1 adapter with bias"): the base biases are the model's own, saved
            # in that one adapter's files
            raise ValueError(f"bias={config.bias!r} on a new adapter, where adapter {biased[0]!r} trains the base "
                             "biases already: one adapter of a model may (PEFT's rule); add this one with bias='none'")

    def plan(self, model: nn.Module, config) -> LoraPlan:
        plan = plan_lora(model, config)
        odd = [f"{n} (r={t[0]})" for n, t in plan.targets.items() if t is not None and t[0] % 2]
        if config.init_lora_weights == "orthogonal" and odd:  # checked before any layer changes
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank (PEFT's), got {few(odd)}")
        _check_rewritable(model, config, plan)
        if config.init_lora_weights == "eva":  # (checked before any layer changes; an embedding takes PEFT's draws
            # and later init_lora_weights=True, as in PEFT)
            odd = [n for n, t in plan.targets.items() if t is not None and n not in plan.params
                   and not _eva_target(model.get_submodule(n), embeddings=True)]
            if odd:
                raise ValueError(f"target_modules matched {few(odd)}: init_lora_weights='eva' initialises linear "
                                 "layers (nn.Linear, Conv1D, bitsandbytes) from their inputs (PEFT raises 'Unknown "
                                 "initialization' on convolutions); exclude the others")
        return plan

    def apply(self, model: nn.Module, config, adapter_name: str, plan: LoraPlan, state) -> None:
        _warn_rewritten_base(model, config, adapter_name)
        kw = dict(lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                  init_lora_weights=config.init_lora_weights, sparse_density=config.sparse_density,
                  sparse_block_size=config.sparse_block_size, sparse_selection=config.sparse_selection,
                  use_dora=config.use_dora, **(dict(lora_bias=True) if config.lora_bias else {}))
        # (LoftQ's settings, to the linear layers only: it was refused on the others)
        loftq = dict(loftq_config=config.loftq_config) if config.init_lora_weights == "loftq" else {}
        corda = config.init_lora_weights == "corda"  # (linear layers: PEFT's draws, then corda_init from the eigens)
        linear_kw = dict(kw, init_lora_weights=False) if corda else kw
        made = {}  # a Parameter's module name -> the FastLoRAParameter made on it so far (the innermost first)
        for name, (r, alpha) in plan.targets.items():
            if name in plan.params:  # PEFT's nesting, innermost first; a chain there already takes the adapter
                base_name, pname = plan.params[name]
                held = model.get_submodule(base_name)
                if isinstance(held, FastLoRAParameter):
                    model.get_submodule(name).add_adapter(adapter_name, r, alpha, use_rslora=config.use_rslora,
                                                          init_lora_weights=config.init_lora_weights)
                    continue
                layer = FastLoRAParameter(made.get(base_name, held), pname, r, alpha, use_rslora=config.use_rslora,
                                          init_lora_weights=config.init_lora_weights, adapter_name=adapter_name)
                layer.set_adapter(None)
                if state.routing is not None:
                    layer.set_routing(state.routing, state.rows_per_sequence)
                made[base_name] = layer
                continue
            module = model.get_submodule(name)
            if isinstance(module, FastLoRALinear):
                module.add_adapter(adapter_name, r, alpha, **kw, **loftq)  # (corda: refused on a layer already)
                layer = module
            else:
                if isinstance(module, nn.Embedding):  # plan_lora refused sparse deltas and lora_bias there
                    layer = FastLoRAEmbedding.from_embedding(
                        module, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                        init_lora_weights=config.init_lora_weights, adapter_name=adapter_name,
                        use_dora=config.use_dora)
                elif isinstance(module, nn.modules.conv._ConvNd):  # plan_lora refused sparse deltas there
                    layer = FastLoRAConv.from_conv(
                        module, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                        init_lora_weights=config.init_lora_weights, adapter_name=adapter_name,
                        use_dora=config.use_dora, lora_bias=config.lora_bias)
                elif _conv1d(module):  # GPT-2's (in, out) layout; plan_lora refused a sparse delta there
                    layer = FastLoRALinear.from_conv1d(module, r=r, lora_alpha=alpha, adapter_name=adapter_name,
                                                       **{k: v for k, v in kw.items() if not k.startswith("sparse_")})
                else:
                    layer = FastLoRALinear.from_linear(module, r=r, lora_alpha=alpha, adapter_name=adapter_name,
                                                       **linear_kw, **loftq)
                    if corda:
                        layer._corda_init(adapter_name, module.eigens)
                        del module.eigens  # (PEFT's)
                layer.set_adapter(None)
                if state.routing is not None:  # made inside a mixed_batch block: routed as the others
                    layer.set_routing(state.routing, state.rows_per_sequence)
                set_submodule(model, name, layer)
        for base_name, layer in made.items():
            set_submodule(model, base_name, layer)
        for name in plan.saved:
            module = model.get_submodule(name)
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            else:
                wrapper = ModulesToSaveWrapper(module, adapter_name)
                wrapper.set_adapter(None)
                if state.routing is not None:
                    wrapper.set_routing(state.routing, state.rows_per_sequence)
                set_submodule(model, name, wrapper)
        # trainable tokens, the embeddings before a head tied to them (which takes their rows' Parameter)
        for name, (ids, tied_to) in sorted(plan.tokens.items(), key=lambda kv: kv[1][1] is not None):
            module = model.get_submodule(name)
            values = None if tied_to is None else \
                model.get_submodule(tied_to).rows(adapter_name).trainable_tokens_delta
            if isinstance(module, TrainableTokensWrapper):
                module.add_adapter(adapter_name, ids, values)
            else:
                wrapper = TrainableTokensWrapper(module, adapter_name, ids, values)
                wrapper.set_adapter(None)
                if state.routing is not None:
                    wrapper.set_routing(state.routing, state.rows_per_sequence)
                set_submodule(model, name, wrapper)

    @staticmethod
    def _layers(model: nn.Module, adapter_name: str) -> dict:
        return {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}

    def config_to_json(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        d = {k: getattr(config, k) for k in _CONFIG_FIELDS}
        if config.sparse is not None:
            d.update({k: getattr(config, k) for k in _SPARSE_LORA_FIELDS})
        # The resolved full names, which PEFT matches exactly: "all-linear", regexes and exclusions are
        # already applied, so PEFT adapts exactly the layers that were trained here.
        layers = self._layers(model, adapter_name)
        d["target_modules"] = sorted(n for n, m in layers.items() if not isinstance(m, FastLoRAParameter))
        # Parameters: their unwrapped names, which PEFT matches (and nests as the layers here are)
        d["target_parameters"] = sorted(f"{_unwrapped(n)}.{m.parameter_name}" for n, m in layers.items()
                                        if isinstance(m, FastLoRAParameter)) or None
        d["exclude_modules"] = None
        d["layers_to_transform"] = d["layers_pattern"] = None  # applied already: the names above are exact
        # RoSA (LoRA beside a sparse delta) under fastpeft's own type: PEFT refuses the file instead of loading the
        # LoRA part alone (it ignores the sparse fields and keys: other outputs, no error)
        # fan_in_fan_out: PEFT sets each layer's from its base module (True on a Conv1D, False on an nn.Linear),
        # warning where the config's disagrees; written as the layers are, as PEFT's own GPT-2 files have it
        fan_in = any(m.fan_in_fan_out for m in self._layers(model, adapter_name).values())
        d.update(peft_type=self.peft_type if config.sparse is None else ROSA_PEFT_TYPE, inference_mode=True,
                 fan_in_fan_out=fan_in, revision=None,
                 base_model_name_or_path=_model_name(model))
        return d

    def config_from_json(self, d: dict, path: str):
        # fan_in_fan_out is read from each target module (Conv1D: True, nn.Linear: False), as PEFT's layers do
        bad = lora_variants(d)
        if bad:
            raise ValueError(f"adapter config {path} uses LoRA variants fastpeft does not compute: {bad}")
        tied = d.get("modules_to_save") or [t for t in (d.get("target_modules") or [])
                                            if isinstance(t, str) and t.rsplit(".", 1)[-1] in _TIED_NAMES]
        if d.get("ensure_weight_tying") and tied:
            raise ValueError(f"adapter config {path} sets ensure_weight_tying on {tied}: PEFT's one trained copy / one "
                             "LoRA shared by tied embeddings and head is not supported here; PEFT loads this file")
        init = d.get("init_lora_weights", True)
        if init not in _LOADABLE_INITS and base_rewriting_init(init) is None:
            # LoRA-GA changes the base weights at init from gradients fastpeft does not have; MiCA freezes B
            # (another training rule). Orthogonal and EVA only pick A and B: loaded as any LoRA. PiSSA / OLoRA /
            # LoftQ: the load computes W - s B0 A0 (Q) again from W, as PEFT's does (check_load; LoftQ onto a
            # quantized model: load_adapter loads it as plain LoRA); CorDA likewise where preprocess_corda left its
            # eigens (else refused there, naming the ways that work).
            raise ValueError(f"init_lora_weights={init!r} in {path}: adapters initialised this way modify the "
                             "base weights (or train under another rule) and cannot be loaded onto the original model "
                             f"here; loadable: {_LOADABLE_INITS}, 'pissa', 'olora', 'loftq', 'corda'")
        kwargs = {k: d[k] for k in _CONFIG_FIELDS + _SPARSE_LORA_FIELDS if k in d and d[k] is not None}
        # The file's init, as PEFT's loaded config keeps it (an adapter made from the config, add_weighted_adapter's,
        # then draws PEFT's initial values), except orthogonal (PEFT's own fails on a 4-bit base, so such a file
        # saved again would not load there): the default init instead.
        if init not in (True, False, "gaussian", "eva") and base_rewriting_init(init) is None or \
                init == "eva" and d.get("target_parameters"):  # (fastpeft's EVA is for module targets)
            kwargs.pop("init_lora_weights", None)
            kwargs.pop("loftq_config", None)
            kwargs.pop("eva_config", None)
        return self.construct(kwargs, path)

    def _keys(self, model: nn.Module, config, adapter_name: str, layers: dict) -> dict:
        """File key -> the model's parameter it holds (LoRA factors, biases, modules_to_save copies)."""
        keys = {}
        for name, layer in layers.items():
            ka, kb = _factor_keys(name, layer)
            keys[ka], keys[kb] = layer.adapter_parameters(adapter_name)
            if layer.is_dora(adapter_name):
                keys[f"{name}{_DORA_SUFFIX}"] = layer.magnitude(adapter_name)
            if adapter_name in layer.lora_bias_adapters:  # PEFT's lora_bias: lora_B's bias
                keys[f"{name}.lora_B.bias"] = layer.lora_bias_adapters[adapter_name]
        saved = list(saved_module_wrappers(model))
        for name in saved:
            module = model.get_submodule(name)
            if adapter_name not in module.modules_to_save:
                continue
            if isinstance(module, TrainableTokensWrapper):  # a tied head's rows are the embedding's: saved once
                if adapter_name not in module.tied:
                    keys[name + _TOKENS_SUFFIX] = module.rows(adapter_name).trainable_tokens_delta
                continue
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                keys[f"{name}.{pname}"] = p
        if config.bias == "lora_only":
            for name, layer in layers.items():
                if layer.bias is not None:
                    keys[f"{name}.base_layer.bias"] = layer.bias
        elif config.bias == "all":
            for pname, p in _bias_parameters(model, saved):
                mod, _, leaf = pname.rpartition(".")
                keys[f"{mod}.base_layer.{leaf}" if mod in layers else pname] = p
        return keys

    def file_tensors(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        layers = self._layers(model, adapter_name)
        keys = {**self._keys(model, config, adapter_name, layers), **_sparse_file_tensors(layers, adapter_name)}
        # PEFT's save_embedding_layers="auto": where a target is named like an embedding (embed_tokens, lm_head), the
        # base weights of the LoRA'd input / output embeddings go into the file too (a resized vocabulary's rows)
        # (not with trainable tokens, as PEFT: they exist to keep the file small)
        named = any(n.rsplit(".", 1)[-1] in _EMBEDDING_LAYER_NAMES for n in layers) and \
            config.trainable_token_indices is None
        embeddings = (output_head(model), input_embeddings(model)) if named else ()
        for name, layer in layers.items():
            if any(layer is e for e in embeddings) and not isinstance(layer, (QLoRALinear, FastLoRAParameter)):
                if layer.merged:
                    raise RuntimeError(f"save_adapter: {name!r} has an adapter merged into its weight, which the file "
                                       f"holds as the base weight ({name + _BASE_WEIGHT!r}) for a resized "
                                       "vocabulary: a load would add the delta twice; unmerge the layer first")
                keys[name + _BASE_WEIGHT] = layer.weight
        return keys

    @staticmethod
    def _expected_shapes(model: nn.Module, config, plan: LoraPlan) -> dict:
        """File key -> shape, for the adapter ``plan`` would create on ``model`` (before it exists)."""
        expected = {}
        for name, (r, _) in plan.targets.items():
            lin = plan.base(model, name)
            ka, kb = (f"{name}.lora_A.weight", f"{name}.lora_B.weight") if name in plan.params else \
                _factor_keys(name, lin)
            if name in plan.params:  # PEFT's ParamWrapper: A (r E, in), B (out, r E), E = 1 for a 2-D Parameter
                base = param_base(lin)
                e, k, n, _ = parameter_layout(base, plan.params[name][1])
                expected[ka], expected[kb] = (r * e, k), (n, r * e)
                b = getattr(base, "bias", None)  # (lora_only: the module's bias, under the innermost layer's name)
                innermost = name == max((t for t, (m, _) in plan.params.items() if m == plan.params[name][0]),
                                        key=lambda t: t.count(".base_layer"))
                if config.bias == "lora_only" and isinstance(b, torch.Tensor) and innermost:
                    expected[f"{name}.base_layer.bias"] = tuple(b.shape)
                continue
            k, n = _in_out(lin)
            shapes = expected[ka], expected[kb] = _factor_shapes(lin, r)
            if config.lora_bias:
                expected[f"{name}.lora_B.bias"] = (n,)
            if config.use_dora:  # (a convolution's: (1, O, 1, ...), PEFT's)
                expected[f"{name}{_DORA_SUFFIX}"] = (1, n) + shapes[1][2:] if len(shapes[1]) > 2 else (n,)
            if config.bias == "lora_only" and getattr(lin, "bias", None) is not None:  # (an embedding has none)
                expected[f"{name}.base_layer.bias"] = tuple(lin.bias.shape)
        for name, (ids, tied_to) in plan.tokens.items():
            if tied_to is None:
                base = _token_base(model.get_submodule(name))
                expected[name + _TOKENS_SUFFIX] = (len(ids), base.weight.shape[1])
        for name in plan.saved:
            module = model.get_submodule(name)
            if isinstance(module, ModulesToSaveWrapper):
                module = module.original_module
            for pname, p in module.named_parameters():
                expected[f"{name}.{pname}"] = tuple(p.shape)
        if config.bias == "all":
            for pname, p in _bias_parameters(model, plan.saved + list(saved_module_wrappers(model))):
                mod, _, leaf = pname.rpartition(".")
                expected[f"{mod}.base_layer.{leaf}" if mod in plan.targets else pname] = tuple(p.shape)
        return expected

    def check_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        converted = _converted_for_transformers(model, config)
        if converted is not config:
            raise ValueError(f"adapter {os.fspath(directory)!r} was saved for transformers 4's mixture-of-experts "
                             f"layout (target_modules {config.target_modules}, one LoRA per expert), which "
                             "transformers 5 fuses: PEFT converts such a file's config and weights as it loads it (peft.PeftModel."
                             "from_pretrained; its save_pretrained then writes the new layout, which fastpeft loads); "
                             "fastpeft does not convert the weights")
        plan = plan_lora(model, config, warn=False)
        if adapter_name not in state.adapters and base_rewriting_init(config.init_lora_weights) is not None:
            if config.init_lora_weights.startswith("pissa_niter_"):  # (into an adapter the model has: any init)
                raise ValueError(f"init_lora_weights={config.init_lora_weights!r} in {os.fspath(directory)!r}: the "
                                 "adapter trained on W - s B0 A0 with B0, A0 from a randomized SVD, which cannot be "
                                 "drawn again; load it saved as plain LoRA (save_adapter / save_pretrained with "
                                 "path_initial_model_for_weight_conversion), or onto the residual model (fastpeft."
                                 "unload) with load_adapter(..., residual=True)")
            _check_rewritable(model, config, plan)  # "pissa" / "olora": W - s B0 A0 computed again, as PEFT's load
        _check_dora_file(config, weights, directory)
        sparse = _take_sparse(model, config.sparse, plan, weights, directory)
        expected = self._expected_shapes(model, config, plan)
        saved = plan.saved + list(saved_module_wrappers(model))
        weights = _resolve_aliases(expected, _drop_wrapper_duplicates(weights, saved))
        expected.update(_saved_base_weights(model, plan, weights))
        expected.update(_saved_embedding_weights(model, plan.targets, saved, weights))
        check_file_tensors(expected, weights, directory)
        if adapter_name in state.adapters:
            if not isinstance(state.adapters[adapter_name], LoraConfig):
                raise ValueError(f"adapter {adapter_name!r} of the model is a "
                                 f"{type(state.adapters[adapter_name]).__name__} adapter, the one in "
                                 f"{os.fspath(directory)!r} a LoraConfig adapter: load it under another adapter_name")
            layers = self._layers(model, adapter_name)
            merged = [n for n, m in layers.items() if m.merged and m.active_adapter == adapter_name]
            if merged:
                raise RuntimeError(f"adapter {adapter_name!r} is merged into layers {few(merged)}: unmerge them before "
                                   "loading over it")
            if set(plan.targets) != set(layers):
                raise ValueError(f"adapter config in {os.fspath(directory)!r} targets {sorted(plan.targets)}, but "
                                 f"adapter {adapter_name!r} of the model is on {sorted(layers)}")
            held = {n: w.rows(adapter_name).token_indices.tolist() for n, w in saved_module_wrappers(model).items()
                    if isinstance(w, TrainableTokensWrapper) and w.rows(adapter_name) is not None}
            if held != {n: ids for n, (ids, _) in plan.tokens.items()}:
                raise ValueError(f"adapter config in {os.fspath(directory)!r} trains tokens "
                                 f"{ {n: ids for n, (ids, _) in plan.tokens.items()} }, the model's adapter "
                                 f"{adapter_name!r} {held}: load it under another adapter_name")
            for n, layer in layers.items():
                if layer.is_dora(adapter_name) != config.use_dora:
                    raise ValueError(f"adapter config in {os.fspath(directory)!r} has use_dora={config.use_dora}, the "
                                     f"model's adapter {adapter_name!r} has use_dora={layer.is_dora(adapter_name)} "
                                     f"at {n!r}: load it under another adapter_name")
                if (adapter_name in layer.lora_bias_adapters) != config.lora_bias:
                    raise ValueError(f"adapter config in {os.fspath(directory)!r} has lora_bias={config.lora_bias}, "
                                     f"the model's adapter {adapter_name!r} has lora_bias="
                                     f"{adapter_name in layer.lora_bias_adapters} at {n!r}: load it under another "
                                     "adapter_name")
                if plan.targets[n][0] != layer.adapter_spec(adapter_name).r:
                    raise ValueError(f"adapter config gives {n!r} rank {plan.targets[n][0]}, the model's adapter "
                                     f"{adapter_name!r} has rank {layer.adapter_spec(adapter_name).r} there")
                # the sparse delta (RoSA) too: a file without one over an adapter with one would leave the old delta
                # in place, and a file with one needs the adapter's delta, of the same block size, to write into
                held = layer.sparse_delta(adapter_name)
                has = "no sparse delta" if held is None else f"a sparse delta of block size {held.block_size}"
                wants = ("no sparse delta" if config.sparse is None else
                         f"a sparse delta of block size {config.sparse.block_size}")
                if has != wants:
                    raise ValueError(f"adapter {os.fspath(directory)!r} has {wants}, the model's adapter "
                                     f"{adapter_name!r} has {has} at {n!r}: load it under another adapter_name")
        weights = dict(weights)
        for name, delta in sparse.items():
            weights[name + _SPARSE_SUFFIXES[0]], weights[name + _SPARSE_SUFFIXES[1]] = delta
        return plan, weights

    def reload(self, model: nn.Module, config, adapter_name: str, plan: LoraPlan, state) -> None:
        for n, layer in self._layers(model, adapter_name).items():
            layer.update_adapter(adapter_name, lora_alpha=plan.targets[n][1], lora_dropout=config.lora_dropout,
                                 use_rslora=config.use_rslora)

    def install(self, model: nn.Module, config, adapter_name: str, weights: dict, trainable: bool, state) -> None:
        layers = self._layers(model, adapter_name)
        keys = self._keys(model, config, adapter_name, layers)
        for name, layer in layers.items():  # the file's positions, never a new draw
            idx_key, values_key = name + _SPARSE_SUFFIXES[0], name + _SPARSE_SUFFIXES[1]
            if values_key in weights:
                layer.set_sparse_delta(adapter_name, weights[idx_key], weights[values_key])
                keys[values_key] = layer.sparse_delta(adapter_name).delta_values
        with torch.no_grad():
            for k, p in keys.items():
                if not k.endswith(_SPARSE_SUFFIXES[1]):
                    p.copy_(weights[k])
            for name in _saved_base_weights(model, LoraPlan(dict.fromkeys(layers), []), weights):
                layers[name[:-len(_BASE_WEIGHT)]].weight.copy_(weights[name])  # PEFT loads them into the base
            for key in _saved_embedding_weights(model, layers, list(saved_module_wrappers(model)), weights):
                model.get_parameter(key).copy_(weights[key])
        if state.active == adapter_name:  # an adapter loaded beside others stays frozen
            for p in keys.values():
                p.requires_grad_(trainable)


_DORA_SUFFIX = ".lora_magnitude_vector"  # PEFT's key of a DoRA magnitude (out,)
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's key of trainable tokens' rows (n, dim)
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's: targets named so save the embeddings' base weights
_BASE_WEIGHT = ".base_layer.weight"


def _saved_base_weights(model: nn.Module, plan: LoraPlan, weights: dict) -> dict:
    """File key -> shape of the base weights a file holds for its targets: PEFT saves the weight of an embedding
    layer it adapts (``save_embedding_layers="auto"``: a LoRA on ``lm_head``, whose vocabulary may have been resized)
    and loads it into the base layer. Float base layers only (a quantized one's packed weight is bnb's)."""
    out = {}
    for name in plan.targets:
        key = name + _BASE_WEIGHT
        if name in plan.params:  # (a Parameter's file holds no base weight)
            continue
        module = model.get_submodule(name)
        if key in weights and not (isinstance(module, QLoRALinear) or is_quantized(module)):
            if getattr(module, "merged", False):
                raise RuntimeError(f"the file holds the base weight of {name!r} ({key!r}), into which an adapter is "
                                   "merged: loading it would drop that merge; unmerge the layer first")
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                out[key] = tuple(w.shape)
    return out


def _saved_embedding_weights(model: nn.Module, targets, saved: list, weights: dict) -> dict:
    """File key -> shape of the model's input / output embedding weights a file holds as ``<module>.weight``, for
    embeddings it does not adapt or save as a modules_to_save copy: PEFT's ``save_embedding_layers="auto"`` writes
    them when the vocabulary was resized (new tokens) and loads them into the model, as these loads do (the model
    resized first: a shape that differs is refused, naming both)."""
    out = {}
    paths = {id(m): n for n, m in model.named_modules()}
    for module in (input_embeddings(model), output_head(model)):
        name = paths.get(id(module)) if module is not None else None
        if not name or name in targets or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        w, key = module._parameters.get("weight"), name + ".weight"
        if key in weights and isinstance(w, torch.Tensor) and w.is_floating_point() and not is_quantized(module):
            if weights[key].shape[1:] == w.shape[1:] and weights[key].shape[0] != w.shape[0]:
                raise ValueError(f"adapter file's {key!r} has {weights[key].shape[0]} rows (a vocabulary resized for "
                                 f"training), the model's {w.shape[0]}: resize the model first, "
                                 f"model.resize_token_embeddings({weights[key].shape[0]})")
            out[key] = tuple(w.shape)
    return out


def _check_dora_file(config, weights: dict, directory) -> None:
    """A DoRA file holds magnitudes and a plain LoRA file none: said plainly, before the key-by-key check."""
    has = sorted(k for k in weights if k.endswith(_DORA_SUFFIX))
    if config.use_dora and not has:
        raise ValueError(f"adapter {os.fspath(directory)!r}: its config has use_dora=true but the file holds no "
                         f"'{_DORA_SUFFIX[1:]}' tensors (DoRA magnitudes); the file is incomplete")
    if not config.use_dora and has:
        raise ValueError(f"adapter {os.fspath(directory)!r}: the file holds DoRA magnitudes ({has[:2]}"
                         f"{' ...' if len(has) > 2 else ''}) but its config has use_dora=false")


def _bias_parameters(model: nn.Module, saved: list) -> list:
    """``(name, parameter)`` of the biases ``bias="all"`` trains, outside modules_to_save modules."""
    return [(n, p) for n, p in model.named_parameters() if is_bias(n) and not any(n.startswith(s + ".") for s in saved)]


def _resolve_aliases(expected: dict, weights: dict) -> dict:
    """Older PEFT wrote a LoRA layer's bias as ``<module>.bias`` rather than ``<module>.base_layer.bias``."""
    out = dict(weights)
    for k in expected:
        if k not in out and ".base_layer." in k:
            alias = k.replace(".base_layer.", ".")
            if alias in out:
                out[k] = out.pop(alias)
    return out


def _drop_wrapper_duplicates(weights: dict, saved: list) -> dict:
    """PEFT's ``bias="all"`` also writes the biases inside its modules_to_save wrappers,
    ``<module>.original_module.bias`` (the frozen base bias) and ``<module>.modules_to_save.bias`` (the
    trained copy's, saved again as ``<module>.bias``, which is the one that loads): drop these duplicates."""
    inner = tuple(f"{s}.{part}." for s in saved for part in ("original_module", "modules_to_save"))
    return {k: v for k, v in weights.items() if not k.startswith(inner)} if inner else weights


# ---- a sparse delta alone ------------------------------------------------------------------------------------

_SPARSE_FIELDS = ("density", "block_size", "selection", "target_modules", "exclude_modules")


class SparseDeltaMethod(Method):
    """A sparse delta alone on each target (``SparseDeltaLinear``); fastpeft's own ``peft_type`` with the
    delta's tensors under ``<module>.sparse_delta.indices`` / ``.values``."""

    peft_type, config_class = SparseDeltaConfig.peft_type, SparseDeltaConfig

    def check_addable(self, model: nn.Module, config) -> None:
        _check_nothing_merged(model)
        _check_scores_selection(config, "selection")

    def plan(self, model: nn.Module, config) -> LoraPlan:
        return plan_lora(model, config)

    def apply(self, model: nn.Module, config, adapter_name: str, plan: LoraPlan, state) -> None:
        for name in plan.targets:
            set_submodule(model, name, SparseDeltaLinear.from_linear(model.get_submodule(name), config.density,
                                                                     config.block_size, config.selection))

    def config_to_json(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        d = {k: getattr(config, k) for k in _SPARSE_FIELDS}
        d.update(peft_type=self.peft_type, target_modules=sorted(sparse_layers(model)), exclude_modules=None)
        return d

    def config_from_json(self, d: dict, path: str):
        return self.construct({k: d[k] for k in _SPARSE_FIELDS if k in d and d[k] is not None}, path)

    def file_tensors(self, model: nn.Module, config, adapter_name: str, state) -> dict:
        return _sparse_file_tensors(sparse_layers(model), adapter_name)

    def check_load(self, model: nn.Module, config, adapter_name: str, weights: dict, directory, state):
        plan = plan_lora(model, config, reload=isinstance(state.adapters.get(adapter_name), SparseDeltaConfig),
                         warn=False)
        weights = dict(weights)
        sparse = _take_sparse(model, config.sparse, plan, weights, directory)
        if weights:
            raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: unexpected keys "
                             f"{sorted(weights)[:6]}")
        if adapter_name in state.adapters:
            layers = sparse_layers(model)
            if set(layers) != set(plan.targets) or not isinstance(state.adapters[adapter_name], SparseDeltaConfig):
                raise ValueError(f"adapter config in {os.fspath(directory)!r} targets {sorted(plan.targets)}, but "
                                 f"adapter {adapter_name!r} of the model is on {sorted(layers)}")
            merged = [n for n, layer in layers.items() if layer.merged]
            if merged:
                raise RuntimeError(f"adapter {adapter_name!r} is merged into layers {few(merged)}: unmerge them before "
                                   "loading over it")
            if any(layers[n].block_size != config.block_size for n in layers):
                raise ValueError(f"adapter config in {os.fspath(directory)!r} has block_size {config.block_size}, the "
                                 f"model's adapter {adapter_name!r} another")
        return plan, sparse

    def install(self, model: nn.Module, config, adapter_name: str, weights: dict, trainable: bool, state) -> None:
        for name, layer in sparse_layers(model).items():
            layer.set_delta(*weights[name])
            layer.delta_values.requires_grad_(trainable and layer.active)  # switched off: stays frozen


METHODS = {m.peft_type: m for m in (LoraMethod(), SparseDeltaMethod(), *OTHER_METHODS)}
# A RoSA adapter's files (files written before 2026-12-01 have "LORA" and the sparse fields: they load the same)
ROSA_PEFT_TYPE = "ROSA"
METHODS[ROSA_PEFT_TYPE] = METHODS[LoraConfig.peft_type]

# Called with the model by every inject, before any surgery: the modules that build on inject register here
# (fastpeft.hf: the adapter-only save_pretrained of Trainer checkpoints), so that inject imports none of them.
INJECT_HOOKS: list = []
_BY_CONFIG = {m.config_class: m for m in METHODS.values()}


def method_for(config) -> Method:
    """The method family of a config (a fastpeft ``LoraConfig``, ``SparseDeltaConfig``, ``BitFitConfig``, ...)."""
    method = _BY_CONFIG.get(type(config)) or next(
        (m for cls, m in _BY_CONFIG.items() if isinstance(config, cls)), None)
    if method is None:
        raise TypeError("config must be a fastpeft LoraConfig, SparseDeltaConfig, BitFitConfig, AdapterConfig, "
                        f"PromptTuningConfig or LayerwiseConfig, got {type(config).__name__}")
    return method


# ---- the model-level API -----------------------------------------------------------------------------------

def inject(model: nn.Module, config, adapter_name: str = "default", plan=None, activate: bool = True,
           autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add the adapter ``config`` describes to ``model`` in place and freeze all it does not train.

    LoRA: each target ``nn.Linear`` becomes a ``FastLoRALinear`` sharing its weight and bias; a target
    that already is one gets ``adapter_name`` beside its adapters. With ``activate`` (default) the new
    adapter becomes the model's active one and the only one that trains. Checks the whole config
    against the model before changing anything (``plan``: the family's plan, already checked).
    ``autocast_adapter_dtype`` (PEFT's, default True): on a bf16 / fp16 base the LoRA factors and DoRA magnitudes
    are fp32 Parameters, as PEFT's ``get_peft_model`` makes them (in the base's dtype, an update below half its
    rounding step is lost: a magnitude ~ ‖W_j‖ would not move at a learning rate of 1e-4); each call casts them to
    the base's dtype (the kernels compute there), the gradients reaching the fp32 Parameters. False keeps them in
    the base's dtype. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.inject takes the nn.Module to add an adapter to, got {type(model).__name__}")
    _check_no_peft_layers(model)
    config = _from_peft_config(config)
    if plan is None:  # (a file's config is PEFT's after any conversion: its targets are resolved)
        config = _converted_for_transformers(model, config)
    method = method_for(config)
    check_adapter_name(adapter_name)
    check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
    configs = adapter_configs(model)
    alone = [c for c in (config, *configs.values()) if method_for(c).alone]
    if configs and alone:
        hint = (" (LoraConfig(sparse_density=...) puts sparse deltas beside LoRA)"
                if isinstance(alone[0], SparseDeltaConfig) else "")
        raise ValueError(f"model already has adapter(s) {list(configs)}; the {type(alone[0]).__name__} adapter is the "
                         f"model's only adapter{hint}")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in the model (adapters {list(configs)}); "
                         "pick another adapter_name or delete_adapter it first")
    method.check_addable(model, config)
    given_plan = plan is not None
    plan = plan if given_plan else method.plan(model, config)
    # Everything below only mutates: all checks are done (before 2026-12-01 the hooks ran first, so a refused inject
    # left the model hf.py's instance methods and hooks).
    for hook in INJECT_HOOKS:
        hook(model)
    if not configs:
        for p in model.parameters():
            p.requires_grad_(False)
    state = peft_state(model, create=True)
    beside = bool(configs) and not activate  # added beside the active adapter, which stays active
    kept = _trainable_flags(model) if beside else None
    method.apply(model, config, adapter_name, plan, state)
    if autocast_adapter_dtype:
        _upcast_adapter(model, adapter_name)
    state.adapters[adapter_name] = config
    set_adapter(model, state.active if beside else adapter_name)
    if beside:  # every parameter there was stays as trainable as it was (an adapter loaded frozen stays frozen, biases
        # included; before 2026-12-01 this set_adapter unfroze it)
        _restore_flags(model, kept)
    _mark_adapters(model, True)
    if getattr(config, "inference_mode", False):  # PEFT's: the adapter is added frozen
        for p in method.file_tensors(model, config, adapter_name, state).values():
            p.requires_grad_(False)
    if not given_plan:  # (a load: the file's positions, trained already; nothing left to choose)
        _warn_coarse_blocks(model, config, adapter_name)
    if isinstance(plan, LoraPlan):
        tied = _tied_weights(model, {n: model.get_submodule(n) for n in plan.targets})
        if tied:  # as PEFT warns
            warnings.warn(f"adapter {adapter_name!r} adapts {few(list(tied))}, whose weights are tied to "
                          f"{few(sum(tied.values(), []))}: merge() changes those too while merged (merge_and_unload "
                          "unties them, giving each its own merged copy)")
    guard_repacked_layers(model, skip=[m.base_layer for m in model.modules() if isinstance(m, QLoRALinear)])
    return model


def _check_no_peft_layers(model: nn.Module) -> None:
    """PEFT's own model or layers (a PeftModel, LoRA layers get_peft_model made) are not inject's to wrap again: its
    all-linear would put LoRA on their lora_A / lora_B. ``fastpeft.accelerate`` is the way for them."""
    found = [n or type(model).__name__ for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if found:
        raise ValueError(f"fastpeft.inject: the model holds Hugging Face PEFT modules ({few(found)}); "
                         "fastpeft.accelerate(peft_model) runs PEFT's adapters on fastpeft's kernels in place, and "
                         "inject takes the base model (PeftModel.get_base_model() after unload(), or a fresh one)")


def _from_peft_config(config):
    """A ``peft.LoraConfig`` taken as fastpeft's (the fields fastpeft computes; the others refused, named, as in a
    file), so that PEFT code only swaps ``get_peft_model`` for ``inject``; other configs pass as they are."""
    if not type(config).__module__.startswith("peft.") or not hasattr(config, "to_dict"):
        return config
    d = config.to_dict()
    peft_type = str(getattr(d.get("peft_type"), "value", d.get("peft_type")))
    if peft_type != LoraConfig.peft_type:
        raise TypeError(f"fastpeft.inject takes PEFT's LoraConfig, or fastpeft's configs; a PEFT "
                        f"{type(config).__name__} runs as PEFT's: get_peft_model(model, config)")
    bad = lora_variants(d)
    if bad:
        raise ValueError(f"fastpeft.inject: the PEFT LoraConfig sets LoRA variants fastpeft does not compute: {bad}")
    fields = _CONFIG_FIELDS + ("inference_mode", "fan_in_fan_out", "ensure_weight_tying")
    kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
    if kwargs.get("task_type") is not None:
        kwargs["task_type"] = str(getattr(kwargs["task_type"], "value", kwargs["task_type"]))
    if isinstance(kwargs.get("target_modules"), (set, frozenset)):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    return LoraConfig(**kwargs)


def _converted_for_transformers(model: nn.Module, config):
    """``config`` as PEFT's ``get_peft_model`` converts it for transformers 5's fused mixture-of-experts layers (peft's
    own ``convert_peft_config_for_transformers``, where peft and transformers >= 5 are installed; Mixtral, Qwen2/3-MoE,
    ...): the v4 names of expert projections and routers in target_modules, and ``"all-linear"``'s share of them,
    become target_parameters (the fused ``gate_up_proj`` with twice the rank and alpha: the v4 gate and up LoRAs
    side by side). Other configs and models pass as they are. Before 2026-12-02 fastpeft left those layers out (with
    a warning), where PEFT adapts them."""
    if not isinstance(config, LoraConfig) or config.target_modules is None:
        return config
    try:
        import peft
        from peft.tuners.tuners_utils import is_transformers_ge_v5
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not is_transformers_ge_v5 or model_type is None:
        return config
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return config
    if get_checkpoint_conversion_mapping(model_type) is None:  # (PEFT's condition: a model type it converts for)
        return config
    tm = config.target_modules
    try:  # (PEFT's LoraConfig refuses some configs fastpeft takes, all-linear with layers_to_transform: not converted)
        pc = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(tm) if isinstance(
        tm, list) else tm, target_parameters=list(config.target_parameters or []) or None,
                             rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
                             exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
                             layers_pattern=config.layers_pattern)
    except (ValueError, TypeError):
        return config
    convert_peft_config_for_transformers(pc, model=model, conversions=None)

    def names(v):
        return sorted(v) if isinstance(v, (set, frozenset, list, tuple)) else v
    new = dict(target_modules=names(pc.target_modules) or None,
               target_parameters=names(pc.target_parameters) or None,
               rank_pattern=dict(pc.rank_pattern), alpha_pattern=dict(pc.alpha_pattern))
    old = dict(target_modules=names(tm), target_parameters=names(config.target_parameters),
               rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern)
    if new == old:
        return config
    if new["target_modules"] is None:
        new["target_modules"] = []  # (target_parameters alone: no module targets, not PEFT's defaults)
    try:
        return replace(config, **new)
    except ValueError as e:
        raise ValueError(f"PEFT converts this config for transformers 5's fused mixture-of-experts layers "
                         f"(target_modules {tm!r} -> {new['target_modules']}, target_parameters "
                         f"{new['target_parameters']}), and then: {e}") from None


def _covered(delta) -> int:
    """The entries of W (out, in) a sparse delta's positions cover: its blocks clipped at W's edges."""
    b, n, k = delta.block_size, delta.out_features, delta.in_features
    if b == 1:
        return delta.delta_indices.numel()
    rows, cols = delta.delta_indices.unbind(1)
    return int(((n - rows * b).clamp(max=b) * (k - cols * b).clamp(max=b)).sum())


def _warn_coarse_blocks(model: nn.Module, config, adapter_name: str) -> None:
    """A warning where blocks of ``block_size`` make a sparse delta cover over twice the density asked for (at
    least one block per layer: a 32 x 32 block on a 16 x 32 layer covers all of it, and half its values lie
    outside W, zero and unused, yet trained and counted); the positions are kept as asked."""
    spec = getattr(config, "sparse", None)  # SparseDeltaConfig's, RoSA's (None: LoRA alone, other methods)
    if spec is None or spec.block_size == 1:
        return
    density, block = spec.density, spec.block_size
    layers = sparse_layers(model) if isinstance(config, SparseDeltaConfig) else \
        {n: m.sparse_delta(adapter_name) for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
    shares = {n: _covered(d) / (d.out_features * d.in_features) for n, d in layers.items() if d is not None}
    over = {n: share for n, share in shares.items() if share > 2 * density}
    if over:
        worst = max(over, key=over.get)
        warnings.warn(f"adapter {adapter_name!r}: blocks of {block} cover more of W than density {density} asks for "
                      f"in {len(over)} layers (at least one block each; {worst}: {over[worst]:.1%}): "
                      f"{few(list(over))}; a smaller block size keeps the density", UserWarning, stacklevel=3)


def _mark_adapters(model: nn.Module, held: bool) -> None:
    """transformers' mark of a model holding PEFT adapters (``_hf_peft_config_loaded``), on a quantized model while
    it holds fastpeft's: its Trainer refuses a quantized model without it (``validate_quantization_for_training``),
    and its gradient checkpointing then makes the embeddings' output require grad, as for PEFT's QLoRA."""
    if held and getattr(model, "is_quantized", False):
        model._hf_peft_config_loaded = True
    elif not held:
        model.__dict__.pop("_hf_peft_config_loaded", None)


def _in_model(config) -> bool:
    """Whether ``config``'s adapter is part of the model itself (BitFit, bottleneck adapters, prompt tuning,
    layer-wise: ``methods.ParameterMethod``), not in layers that switch adapters."""
    return isinstance(method_for(config), ParameterMethod)


def _upcast_adapter(model: nn.Module, adapter_name: str) -> None:
    """The LoRA factors (DoRA's magnitudes, RoSA's sparse values, a sparse delta's values) of ``adapter_name`` in
    fp16 / bf16 made fp32, in place (the same Parameters), as PEFT's ``autocast_adapter_dtype`` (and SHiRA's
    values); a QLoRA layer's are fp32 already."""
    params = []
    for layer in lora_layers(model).values():
        if adapter_name not in layer.adapter_names:
            continue
        params += layer.adapter_parameters(adapter_name)
        if layer.is_dora(adapter_name):
            params.append(layer.magnitude(adapter_name))
        if adapter_name in layer.lora_bias_adapters:  # PEFT's lora_bias: B's bias is part of lora_B, upcast too
            params.append(layer.lora_bias_adapters[adapter_name])
        delta = layer.sparse_delta(adapter_name)
        if delta is not None:  # RoSA's sparse values: the same small updates on a growing value
            params.append(delta.delta_values)
    # a sparse delta alone: the model's only adapter, this one
    params += [layer.delta_values for layer in sparse_layers(model).values()]
    params += [w.rows(adapter_name).trainable_tokens_delta for w in saved_module_wrappers(model).values()
               if isinstance(w, TrainableTokensWrapper) and w.rows(adapter_name) is not None]  # trainable tokens
    for p in params:  # (kept stacks key on dtype and storage: rebuilt at their next use)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def set_adapter(model: nn.Module, adapter_name) -> None:
    """Make ``adapter_name`` the active adapter of every layer that has it (layers without it run their
    base) and the only one that trains; None runs the base model."""
    configs = adapter_configs(model)
    if adapter_name is not None:
        check_known(model, adapter_name, configs)
    active = peft_state(model).active
    if adapter_name is None and active is not None and _in_model(configs[active]):
        raise ValueError(f"adapter {active!r} ({type(configs[active]).__name__}) is part of the model itself: it "
                         "cannot be switched off in place (" + ("fastpeft.delete_adapter takes it out" if
                         method_for(configs[active]).removable else "it trains the model's own tensors") + ")")
    # each layer's name: the adapter where it holds it, else None (a sparse delta alone: the model's one adapter)
    switches = [(n, layer, adapter_name if adapter_name in layer.adapter_names else None)
                for n, layer in lora_layers(model).items()]
    switches += [(n, layer, adapter_name) for n, layer in sparse_layers(model).items()]
    merged = [n for n, layer, name in switches if layer.switch_refused(name)]
    if merged:  # checked before any layer switches
        raise RuntimeError(f"set_adapter({adapter_name!r}): layers {few(merged)} have an adapter merged; unmerge "
                           "them first")
    for _, layer, name in switches:
        layer.set_adapter(name)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.set_adapter(adapter_name)
    if any(getattr(c, "bias", "none") != "none" for c in configs.values()):
        _train_biases(model, "none" if adapter_name is None else getattr(configs[adapter_name], "bias", "none"),
                      adapter_name)
    peft_state(model, create=True).active = adapter_name


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from the model; if it was active, none is active afterwards.
    Layers left without adapters stay ``FastLoRALinear`` and run their base; LoRA on Parameters
    (``FastLoRAParameter``) left without adapters gives its module back, so that a later adapter on some of its
    Parameters nests as PEFT's does."""
    configs = adapter_configs(model)
    check_known(model, adapter_name, configs)
    state = peft_state(model)
    if any(r is not None and adapter_name in r for r in (state.routing, *state.hidden)):
        raise RuntimeError(f"delete_adapter({adapter_name!r}) inside a mixed_batch block that routes sequences to it "
                           "(their rows would silently run the base): delete it after the block")
    if _in_model(configs[adapter_name]):
        method = method_for(configs[adapter_name])
        if not method.removable:
            raise ValueError(f"adapter {adapter_name!r} ({type(configs[adapter_name]).__name__}) trained the "
                             "model's own tensors, so there is no base to go back to (load the base "
                             "model again); fastpeft.merge_and_unload keeps it as the model's weights")
        saved = getattr(configs[adapter_name], "modules_to_save", None)
        if saved:
            raise ValueError(f"adapter {adapter_name!r} ({type(configs[adapter_name]).__name__}) trained its "
                             f"modules_to_save {saved} in place: there is no base copy of them to go back to (load the "
                             "base model again)")
        method.remove(model)  # the prompt / bottleneck adapters out: the model runs its base again
        model.__dict__.pop(_STATE, None)  # it was the model's only adapter
        _mark_adapters(model, False)
        return
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.adapter_names}
    sparse = sparse_layers(model) if isinstance(configs[adapter_name], SparseDeltaConfig) else {}
    merged = [n for n, m in layers.items() if m.delete_refused(adapter_name)]
    merged += [n for n, m in sparse.items() if m.merged]
    if merged:  # checked before any layer changes
        raise RuntimeError(f"delete_adapter({adapter_name!r}): it is merged into layers {few(merged)}; unmerge them "
                           "first")
    if getattr(configs[adapter_name], "bias", "none") != "none":  # the base biases it trained: frozen again
        _train_biases(model, "none")
    for layer in layers.values():
        layer.delete_adapter(adapter_name)
    # LoRA on Parameters left without adapters: the module back (so that a later adapter nests as PEFT's would)
    every = lora_layers(model)
    nested = nested_parameter_layers(model, every)
    empty = [(n, m) for n, m in every.items() if isinstance(m, FastLoRAParameter) and n not in nested
             and not any(c.adapter_names for c in FastLoRAParameter.chain(m))]
    for name, layer in empty:
        set_submodule(model, name, layer.base_module())
    for name, layer in sparse.items():  # a sparse delta alone: its layers become the nn.Linear they wrapped
        set_submodule(model, name, layer.base_module())
    for wrapper in saved_module_wrappers(model).values():
        wrapper.delete_adapter(adapter_name)
    state = peft_state(model)
    if state.active == adapter_name:
        set_adapter(model, None)  # before its config goes (set_adapter reads the active adapter's)
    del state.adapters[adapter_name]
    if not state.adapters:
        _mark_adapters(model, False)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names, rows_per_sequence: int = 1):
    """Route one adapter (or None = base) per sequence of the batch through every LoRA layer.

    ``adapter_names``: a list with one name or None (or PEFT's ``"__base__"``) per sequence (dim 0 of each layer's
    input); inside ``disable_adapter`` every sequence runs the base. Inside
    the block each LoRA layer applies row i's adapter to every token of sequence i, also to the new
    tokens of a generation loop; layers that lack an adapter run their base for its sequences.
    ``rows_per_sequence`` k: layers whose batch is k times the names take each name for k consecutive rows, as
    ``generate`` expands each sequence (k = ``num_beams`` in beam search, ``num_return_sequences`` when sampling);
    any other batch size raises.
    """
    configs = adapter_configs(model)
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"adapter_names must be a non-empty list of adapter names or None, got {adapter_names!r}")
    # PEFT's name for base rows (refused as an adapter name); inside disable_adapter every row runs the base
    adapter_names = [None if n == BASE_ROWS or peft_state(model).disabled else n for n in adapter_names]
    check_rank(rows_per_sequence, "rows_per_sequence")
    unknown = sorted({n for n in adapter_names if n is not None and n not in configs}, key=str)
    if unknown:
        raise unknown_adapters(model, "adapter_names", unknown, configs)
    used = [n for n in dict.fromkeys(adapter_names) if n is not None]  # adapters the model merely holds do not matter
    dora = [n for n in used if getattr(configs[n], "use_dora", False)]
    if dora:
        raise ValueError(f"mixed_batch cannot route DoRA adapters {dora} per sequence (PEFT refuses this too); "
                         "use set_adapter")
    rosa = [n for n in used if getattr(configs[n], "sparse_density", 0.0) > 0]
    if rosa:
        raise ValueError(f"mixed_batch cannot route adapters with a sparse delta (RoSA) {rosa} per sequence; use "
                         "set_adapter")
    routed = [*lora_layers(model).values(), *saved_module_wrappers(model).values()]
    previous = [(m.routing, m.rows_per_sequence) for m in routed]  # each layer's: blocks on other models apart
    state = peft_state(model, create=True)
    previous_state = (state.routing, state.rows_per_sequence)
    try:
        # layers an inject makes inside the block take it too (apply)
        state.routing, state.rows_per_sequence = list(adapter_names), rows_per_sequence
        for m in routed:
            m.set_routing(list(adapter_names), rows_per_sequence)
        yield model
    finally:
        state.routing, state.rows_per_sequence = previous_state
        for m, (names, k) in zip(routed, previous):
            m.set_routing(names, k)
        known = set(map(id, routed))
        for m in [*lora_layers(model).values(), *saved_module_wrappers(model).values()]:
            if id(m) not in known:  # made inside the block: routed by it, not after
                m.set_routing(*previous_state)


# PEFT's combination types: the factor-wise ones (A and B merged apart, equal ranks), the ones merging ΔW_i then
# truncating by SVD, and "cat"; the ties / dare / magnitude-prune merges are peft.utils.merge_utils' own functions.
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
THROUGH_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("svd", "linear", "cat") + FACTOR_WISE[1:] + THROUGH_SVD[1:]
_MERGE_FN = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # merge_utils' functions of these names
SIGN_METHODS = ("total", "frequency")


def _merge_fn(how: str):
    """peft.utils.merge_utils' function for combination type ``how`` (``ties_svd`` -> ``ties``), and whether it takes
    ``majority_sign_method``; ``None`` for the plain weighted sums fastpeft computes itself."""
    name = how.removesuffix("_svd")
    if name not in _MERGE_FN:
        return None, False
    try:
        from peft.utils import merge_utils
    except ImportError as e:
        raise ImportError(f"combination_type={how!r} runs PEFT's own merge (peft.utils.merge_utils): pip install "
                          "peft") from e
    return getattr(merge_utils, name), name in ("ties", "dare_ties")


def add_weighted_adapter(model: nn.Module, adapters: list, weights: list, adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """PEFT's ``add_weighted_adapter``: a new LoRA adapter ``adapter_name`` combining ``adapters`` (LoRA adapters of
    the model) with ``weights``, on every layer any of them adapts; added frozen and inactive (``set_adapter`` it).

    - ``"cat"``: rank = the sum of theirs; A = the A_i scaled by w_i·s_i stacked, B = the B_i side by side, so
      ΔW = Σ w_i ΔW_i exactly;
    - ``"linear"``: equal ranks; A = Σ sign·√|w_i s_i| A_i, B = Σ √|w_i s_i| B_i (an approximation of Σ w_i ΔW_i);
    - ``"svd"`` (default, as PEFT): Σ w_i ΔW_i in fp32, truncated to ``svd_rank`` (default: the largest rank) by
      SVD, B = U S, A = Vᴴ; ``svd_clamp``: the quantile at which entries of both are clamped;
    - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"`` (equal ranks, weights
      sign·√|w_i s_i| on the A_i and √|w_i s_i| on the B_i), the A_i and the B_i each merged by PEFT's function of
      that name (``peft.utils.merge_utils``: prune each to ``density``, by magnitude or at random (dare, rescaled),
      ties keeping the entries of the majority sign by ``majority_sign_method``); ``"ties_svd"``,
      ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the same merge of the w_i, ΔW_i (in
      PEFT's orientation), then truncated by SVD as ``"svd"``. The dare types draw from torch's global generator
      in PEFT's order: under the same seed they give PEFT's adapter.

    Its config is the first adapter's with r = lora_alpha = the new rank (scaling 1; use_rslora kept, as PEFT does)
    on the layers named in full; modules_to_save copies and trainable tokens are not combined. DoRA and RoSA adapters
    are refused. Checked before any change."""
    configs = adapter_configs(model)
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    for name in adapters:
        check_known(model, name, configs, "adapters")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must be a list of one number per adapter ({len(adapters)}), got {weights!r}")
    weights = [check_finite_number(w, "weights") for w in weights]
    check_adapter_name(adapter_name)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in the model (adapters {list(configs)})")
    check_choice(combination_type, COMBINATIONS, "combination_type")
    if len(adapters) == 1:
        combination_type = "linear"  # PEFT's rule for one adapter (density and majority_sign_method unread)
    if combination_type.removesuffix("_svd") in _MERGE_FN:  # checked where PEFT reads them
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} needs density (the fraction of entries kept; "
                             "1 or more prunes nothing, as PEFT), got None")
        if check_finite_number(density, "density") < 0:
            raise ValueError(f"density must be >= 0 (the fraction of entries kept), got {density!r}")
        if combination_type.removesuffix("_svd") in ("ties", "dare_ties"):
            check_choice(majority_sign_method, SIGN_METHODS, "majority_sign_method")
        _merge_fn(combination_type)  # (peft importable)
    odd = [n for n in adapters if not isinstance(configs[n], LoraConfig) or configs[n].use_dora
           or configs[n].sparse is not None or configs[n].lora_bias or configs[n].target_parameters]
    if odd:
        raise ValueError(f"add_weighted_adapter combines plain LoRA adapters; {odd} are DoRA, RoSA, lora_bias, "
                         "target_parameters or other adapters")
    layers = {n: m for n, m in lora_layers(model).items() if any(a in m.adapter_names for a in adapters)}
    # PEFT's rank of an adapter: its r, or the largest of r and its rank_pattern's (layers below it are zero-padded)
    ranks = {a: max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters}
    if combination_type in FACTOR_WISE and len(set(ranks.values())) != 1:
        raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got {ranks}; use 'cat' "
                         "or an '_svd' type")
    if combination_type == "cat":
        rank = sum(ranks.values())
    else:
        rank = max(ranks.values()) if combination_type in FACTOR_WISE or svd_rank is None else \
            check_rank(svd_rank, "svd_rank")
    if svd_clamp is not None and not 0.0 < check_finite_number(svd_clamp, "svd_clamp") <= 1.0:
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"add_weighted_adapter: layers {few(merged)} have an adapter merged; unmerge them first")
    # PEFT's new config is the first adapter's on the union of the adapters' target_modules: its layer filters
    # (layers_to_transform on suffix matches, exclude_modules) keep the new adapter off the layers they leave out
    first = configs[adapters[0]]
    exact = {t for a in adapters if isinstance(configs[a].target_modules, (list, tuple, set))
             for t in configs[a].target_modules}
    layers = {n: m for n, m in layers.items() if not matches(first.exclude_modules, n)
              and (n in exact or in_layers(n, first.layers_to_transform, first.layers_pattern))}
    config = replace(first, r=rank, lora_alpha=rank, target_modules=sorted(layers), exclude_modules=None,
                     rank_pattern={}, alpha_pattern={}, modules_to_save=None, trainable_token_indices=None,
                     layers_to_transform=None, layers_pattern=None, task_type=None, inference_mode=False)
    rewriting = base_rewriting_init(config.init_lora_weights) is not None
    if rewriting:  # (PiSSA / OLoRA / LoftQ / CorDA would rewrite W a second time; PEFT's does: its base then changes)
        config = with_init(config)
    how = (combination_type, rank, svd_clamp, density, majority_sign_method)
    random = combination_type.startswith("dare")
    devices = sorted({p.device.index or 0 for m in layers.values() for p in m.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices) if random else contextlib.nullcontext():  # (a check: no draw kept)
        factors = {n: _padded(*_combined(m, adapters, weights, *how), rank, n) for n, m in layers.items()}
    inject(model, config, adapter_name, activate=False)
    if rewriting:  # the new adapter sits on the same residual: its config says so (a file then loads as the source's)
        peft_state(model).adapters[adapter_name] = with_init(config, first)
    if random:  # drawn again after the new adapter's initial draws, layer by layer, as PEFT draws them
        factors = {n: _padded(*_combined(m, adapters, weights, *how), rank, n) for n, m in layers.items()}
    with torch.no_grad():
        for n, (a, b) in factors.items():
            pa, pb = model.get_submodule(n).adapter_parameters(adapter_name)
            pa.copy_(a.view(pa.shape))  # (a convolution's factors are kernels: (r, C, *k), (O, r, 1, ...))
            pb.copy_(b.view(pb.shape))
            pa.requires_grad_(False)
            pb.requires_grad_(False)


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int, name: str) -> tuple:
    """(A, B) zero-padded to ``rank`` (a layer whose adapters' ranks, by rank_pattern, are below the new one)."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"add_weighted_adapter: {name!r} would need rank {r}, above the new adapter's {rank}")
    return (torch.cat([a, a.new_zeros(rank - r, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)) \
        if r < rank else (a, b)


def _weighted_sum(tensors: list, weights: list) -> torch.Tensor:
    """Σ w_i t_i as PEFT's ``task_arithmetic`` computes it (stacked, times an fp32 weight tensor, summed)."""
    t = torch.stack(tensors)
    return (t * torch.tensor(weights, device=t.device).view(-1, *[1] * (t.dim() - 1))).sum(0)


def _peft_delta(pair: tuple, scale: float, flip: bool) -> torch.Tensor:
    """ΔW = s B A of one adapter as PEFT's ``get_delta_weight`` computes it: (in, out) where ``flip`` (a Conv1D, an
    embedding), half-precision factors multiplied in fp32 on the CPU and the product rounded back."""
    a, b = pair
    cast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
    d = b.float() @ a.float() if cast else b @ a
    d = (d.t() if flip else d) * scale
    return d.to(a.dtype) if cast else d


@torch.no_grad()
def _combined(layer, adapters: list, weights: list, how: str, rank: int, clamp, density=None,
              sign_method="total") -> tuple:
    """(A (rank, in), B (out, rank)) of ``add_weighted_adapter`` on one layer from the adapters it holds, with PEFT's
    arithmetic step for step (the factors in their own dtype, as PEFT reads them; the SVD in fp32)."""
    held = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
    # (a convolution's kernels as the (r, C·K) / (O, r) matrices PEFT flattens them to)
    pairs = {a: tuple(p.detach().reshape(p.shape[0], -1) for p in layer.adapter_parameters(a)) for a, _ in held}
    scale = {a: layer.adapter_spec(a).scaling for a, _ in held}
    fn, signed = _merge_fn(how)
    extra = (density, sign_method) if signed else (density,)
    if how == "cat":
        a_new = torch.zeros(rank, layer.in_features, device=layer.weight.device)
        b_new = torch.zeros(layer.out_features, rank, device=layer.weight.device)
        at = 0
        for a, w in held:
            r = pairs[a][0].shape[0]
            a_new[at:at + r] = pairs[a][0] * w * scale[a]
            b_new[:, at:at + r] = pairs[a][1]
            at += r
        return a_new, b_new
    if how in FACTOR_WISE:
        if len({pairs[a][0].shape[0] for a, _ in held}) > 1:
            found = {a: pairs[a][0].shape[0] for a, _ in held}
            raise ValueError(f"combination_type={how!r} needs one rank per layer; the adapters' ranks differ at a "
                             f"layer ({found}, rank_pattern): use 'cat' or an '_svd' type")
        ws = [w * scale[a] for a, w in held]
        wa = [math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in ws]  # the sign on A only
        wb = [math.sqrt(abs(v)) for v in ws]
        out = []
        for i, c in ((0, wa), (1, wb)):
            ts = [pairs[a][i] for a, _ in held]
            out.append((_weighted_sum(ts, c) if fn is None else
                        fn(ts, torch.tensor(c, device=ts[0].device), *extra)).to(ts[0].dtype).float())
        return tuple(out)
    flip = layer.fan_in_fan_out or isinstance(layer, FastLoRAEmbedding)  # (ΔW_i in PEFT's orientation)
    deltas = [_peft_delta(pairs[a], scale[a], flip) for a, _ in held]
    ws = [w for _, w in held]
    delta = _weighted_sum(deltas, ws) if fn is None else fn(deltas, torch.tensor(ws, device=deltas[0].device), *extra)
    delta = (delta.t() if flip else delta).float()
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    if clamp is not None:  # PEFT's: one quantile over both factors' entries
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    if u.shape[1] < rank:  # a layer narrower than the rank: the rest stays zero
        u = torch.cat([u, u.new_zeros(u.shape[0], rank - u.shape[1])], 1)
        vh = torch.cat([vh, vh.new_zeros(rank - vh.shape[0], vh.shape[1])], 0)
    return vh, u


BASE_ROWS = "__base__"  # PEFT's adapter_names entry for rows that run the base model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """PEFT's ``disable_adapter()``: inside the block the model runs its base, every sequence of a ``mixed_batch``
    (or of a forward's ``adapter_names``) too; the active adapter and any routing come back after it. Biases an
    adapter trains (``bias="all"`` / ``"lora_only"``) are the model's own and stay as trained (warned, as PEFT).
    Adapters that are part of the model (BitFit, bottleneck, prompt tuning, layer-wise) cannot be switched off
    (``set_adapter``'s error)."""
    state = peft_state(model, create=True)
    active, routing, k = state.active, state.routing, state.rows_per_sequence
    kept = _trainable_flags(model)
    set_adapter(model, None)  # raises for adapters that are part of the model, before anything changed
    _restore_flags(model, kept, only=is_bias)  # the biases stay as trainable inside the block, as in PEFT
    bias = getattr(state.adapters.get(active), "bias", "none")
    if bias != "none":
        warnings.warn(f"disable_adapter: adapter {active!r} trains biases in place (bias={bias!r}); they stay as "
                      "trained inside the block, so it does not run the base model exactly (PEFT warns alike)",
                      UserWarning, stacklevel=3)
    routed = [*lora_layers(model).values(), *saved_module_wrappers(model).values()]
    previous = [(m.routing, m.rows_per_sequence) for m in routed]
    state.disabled += 1
    state.hidden.append(routing)
    try:
        if routing is not None:
            state.routing = [None] * len(routing)
            for m in routed:
                m.set_routing(state.routing, k)
        yield model
    finally:
        state.disabled -= 1
        state.hidden.pop()
        state.routing = routing
        for m, (names, rows) in zip(routed, previous):
            m.set_routing(names, rows)
        if active in adapter_configs(model):  # (deleted inside the block: none stays active)
            set_adapter(model, active)
            _restore_flags(model, kept)  # as trainable as before the block (an adapter loaded frozen stays frozen)


def trainable_parameters(model: nn.Module) -> tuple:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"trainable_parameters takes an nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():
        n = peft_numel(p)  # a 4-bit weight counts its unpacked size, as PEFT does
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """PEFT's summary line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(format_trainable_parameters(model))


def _quantized_unloads(model: nn.Module, dequantize: bool) -> dict:
    """``{name: module}`` that each ``QLoRALinear`` becomes, all built before any is put in (raises naming the
    module, the model unchanged): ``dequantize`` a new float ``nn.Linear`` (deq(W) + ΔW); else the bnb layer
    itself, with a requantized merged weight (lossy, warned) assigned only after every layer succeeded."""
    out, weights = {}, {}
    layers = lora_layers(model)
    if dequantize:  # the bitsandbytes layers LoRA did not target too: a plain floating-point model
        held = {f"{n}.base_layer" for n, layer in layers.items() if isinstance(layer, QLoRALinear)}
        for name, module in model.named_modules():
            if is_quantized(module) and name not in held:
                out[name] = dequantized_linear(module, name)
    for name, layer in layers.items():
        if not isinstance(layer, QLoRALinear):
            continue
        if dequantize:
            out[name] = layer.to_linear(name)
            continue
        out[name] = layer.base_layer
        if not layer.merged and layer.has_delta():
            weights[name] = merged_weight(layer.base_layer, layer.delta_weight(), name=name,
                                          round_to_weight=layer.is_dora())  # (PEFT rounds DoRA's W')
    for name, w in weights.items():
        assign_merged_weight(out[name], w)
    return out


def _drop_quantization_config(model: nn.Module) -> None:
    """A transformers model dequantized whole: its quantizer, ``config.quantization_config`` and ``is_quantized``
    dropped (as transformers' own ``dequantize``), so that ``save_pretrained`` writes a plain model that loads."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif getattr(model, "is_quantized", False):
        model.__dict__.pop("hf_quantizer", None)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        model.is_quantized = False


def _parameter_names(model: nn.Module) -> dict:
    """id(parameter) -> every name it has in ``model`` (tied parameters have several)."""
    names: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def _tied_weights(model: nn.Module, layers: dict) -> dict:
    """Layer name -> the names of the model's other parameters that are its weight (a tied output head's: the input
    embeddings), for the ``layers`` whose weight is tied."""
    names = _parameter_names(model)
    out = {}
    for name, layer in layers.items():
        w = getattr(layer, "weight", None)
        others = [n for n in names.get(id(w), []) if not n.startswith(name + ".")] if w is not None else []
        if others:
            out[name] = others
    return out


def _untie_word_embeddings(model: nn.Module) -> None:
    """``tie_word_embeddings`` False in the model's config (and its text config), so that a save and reload keep the
    head's own weight."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    for c in {id(c): c for c in (config, get_text() if callable(get_text) else None) if c is not None}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def _untie_saved_copies(model: nn.Module, caller: str = "merge_and_unload") -> None:
    """Before ``merge_and_unload`` puts modules_to_save copies in place: where the original of one shares a parameter
    with a module outside it (a tied input embedding / output head), the trained copy breaks the tie, so
    ``tie_word_embeddings`` goes False (warned), as PEFT's merge does. Before 2026-12-01 it stayed True, and a later
    ``tie_weights()`` / ``resize_token_embeddings`` silently put one matrix in the other's place."""
    names = _parameter_names(model)
    tied = []
    for wname, w in saved_module_wrappers(model).items():
        if isinstance(w, TrainableTokensWrapper) or w.active_adapter not in w.modules_to_save:
            continue
        for p in w.original_module.parameters():
            tied += [n for n in names.get(id(p), []) if not n.startswith(wname + ".")]
    if tied:
        warnings.warn(f"{caller}: the trained modules_to_save copies replace weights that {few(tied)} share "
                      "(tied); those keep the base weights, and config.tie_word_embeddings is set False")
        _untie_word_embeddings(model)


def _token_weights_to_copy(model: nn.Module) -> set:
    """Trainable-token wrappers whose trained rows go into a copy of their weight at ``merge_and_unload``: those
    whose weight another parameter shares that does not take the same rows (a head tied to embeddings whose tokens
    are not trained, or other ones); warned, and ``tie_word_embeddings`` set False, as for LoRA's tied layers."""
    wrappers = {n: w for n, w in saved_module_wrappers(model).items()
                if isinstance(w, TrainableTokensWrapper) and w.rows(w.active_adapter) is not None}
    if not wrappers:
        return set()
    names = _parameter_names(model)
    own = {}
    for name, w in wrappers.items():
        rows = w.rows(w.active_adapter).trainable_tokens_delta
        same = [n for n, o in wrappers.items() if o.rows(o.active_adapter).trainable_tokens_delta is rows]
        others = [p for p in names.get(id(w.original_module.weight), [])
                  if not any(p.startswith(s + ".") for s in same)]
        if others:
            own[name] = others
    if own:
        warnings.warn(f"merge_and_unload: the trained tokens of {few(list(own))} go into a copy of their weight, which "
                      f"{few(sum(own.values(), []))} share without those rows; config.tie_word_embeddings is set False")
        _untie_word_embeddings(model)
    return set(own)


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold each layer's active adapter into its base weight and put plain modules back (other adapters
    are dropped); returns ``model``.

    Each ``FastLoRALinear`` / ``SparseDeltaLinear`` becomes an ``nn.Linear`` sharing its (merged) weight and
    bias, without a copy; each modules_to_save wrapper becomes its trained copy. Over a bitsandbytes base
    (``QLoRALinear``): ``dequantize=False`` puts the bnb layer back with the merge requantized (PEFT's merge,
    lossy, warned); ``dequantize=True`` a plain floating-point ``nn.Linear``. Every quantized layer's result is
    built first, so a failure (bitsandbytes cannot requantize here) leaves the model unchanged. A layer whose weight
    is tied to another parameter (an output head tied to the input embeddings) gets its own merged copy, the other
    keeps the base weight (warned; ``config.tie_word_embeddings`` becomes False; one merged before is unmerged
    first, so the other keeps that merge's rounding).
    """
    check_bool(dequantize, "dequantize")
    unfoldable = _unfoldable(model)
    if unfoldable:
        raise ValueError(f"merge_and_unload: adapter {', '.join(unfoldable)} does not fold into the base weights (a "
                         "prompt or bottleneck adapter computes something no weight holds); fastpeft.delete_adapter "
                         "takes it out, or keep the model as it is")
    for n, layer in lora_layers(model).items():  # (before any change: PEFT fails half-way there)
        if not layer.merged and layer.has_delta():
            try:
                layer._check_bias_mergeable()
            except RuntimeError as e:
                raise RuntimeError(f"merge_and_unload: {n!r}: {e}; nothing was changed") from None
    quantized = _quantized_unloads(model, dequantize)
    for name, module in quantized.items():
        set_submodule(model, name, module)
    if dequantize and quantized:
        _drop_quantization_config(model)
    _mark_adapters(model, False)
    layers = {**lora_layers(model), **sparse_layers(model)}
    tied = _tied_weights(model, layers)
    if tied:
        embeddings = (output_head(model), input_embeddings(model))
        # a tied output head or input embedding: the word embeddings (a later tie_weights() would tie them again)
        untie_config = any(layers[n] is e for n in tied for e in embeddings if e is not None)
        warnings.warn(f"merge_and_unload: the weights of {few(list(tied))} are tied to {few(sum(tied.values(), []))}; "
                      "each gets its own merged copy, the others stay as they were"
                      + (", and config.tie_word_embeddings is set False" if untie_config else ""))
        if untie_config:
            _untie_word_embeddings(model)
    for name in tied:  # every tied layer's delta out of the shared W first (two tied layers may both be merged)
        if layers[name].merged:
            layers[name].unmerge()
    nested = nested_parameter_layers(model, layers)
    for name, layer in layers.items():
        if name in tied:  # the delta goes into a copy of W, the others keep W
            copied = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            if isinstance(layer, FastLoRAParameter):  # (its weight is its module's Parameter)
                setattr(param_base(layer), layer.parameter_name, copied)
            else:
                layer.weight = copied
        if not layer.merged and layer.has_delta():
            layer.merge()
        if name not in nested:  # (a nested one goes with the layer outside it, whose base_module() is the module)
            set_submodule(model, name, layer.base_module().train(layer.training))  # (the layer's mode: before
            # 2026-12-02 a new nn.Linear in an eval model was left in training mode)
    own = _token_weights_to_copy(model)  # before any wrapper goes
    _untie_saved_copies(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):
            set_submodule(model, name, module.unwrap(own_weight=name in own))
        elif isinstance(module, ModulesToSaveWrapper):
            set_submodule(model, name, module.active_module)
    model.__dict__.pop(_STATE, None)
    return model


def _unfoldable(model: nn.Module) -> list:
    """``"'name' (ConfigType)"`` of the model's adapters that no layer wrapping a base module holds (prompt tuning,
    bottleneck adapters): neither merge_and_unload nor unload can take them out."""
    return [f"{n!r} ({type(c).__name__})" for n, c in adapter_configs(model).items()
            if _in_model(c) and not method_for(c).mergeable]


def unload(model: nn.Module) -> nn.Module:
    """PEFT's ``unload()``: the base modules back in every adapter layer's place, nothing merged; returns ``model``.

    Each LoRA / sparse layer becomes the module it wraps (an ``nn.Linear`` sharing its weight and bias, a bitsandbytes
    layer itself, a Parameter's module); a modules_to_save wrapper its active adapter's trained copy (its original
    module where that adapter has none), a trainable-tokens wrapper the embedding without the trained rows, as
    PEFT's. A layer with a merged adapter keeps it in W (PEFT's; ``unmerge`` first for the weights as they were).
    After PiSSA / OLoRA this is the residual model (W - s B0 A0). Each module put back takes the mode of the layer it
    replaces. Where a trained modules_to_save copy replaces a weight tied to another module, ``tie_word_embeddings``
    becomes False (warned; PEFT's unload leaves it True, and a later ``tie_weights()`` would silently put the
    embeddings in the trained head's place)."""
    unfoldable = _unfoldable(model)
    if unfoldable:
        raise ValueError(f"unload: adapter {', '.join(unfoldable)} is no layer wrapping a base module (a prompt or "
                         "bottleneck adapter); fastpeft.delete_adapter takes it out")
    _mark_adapters(model, False)
    layers = {**lora_layers(model), **sparse_layers(model)}
    nested = nested_parameter_layers(model, layers)
    for name, layer in layers.items():
        if name not in nested:  # (a nested one goes with the layer outside it, whose base_module() is the module)
            set_submodule(model, name, layer.base_module().train(layer.training))
    _untie_saved_copies(model, "unload")
    for name, module in list(model.named_modules()):
        if isinstance(module, TrainableTokensWrapper):
            set_submodule(model, name, module.original_module.train(module.training))
        elif isinstance(module, ModulesToSaveWrapper):
            set_submodule(model, name, module.active_module.train(module.training))
    model.__dict__.pop(_STATE, None)
    return model


class _CheckpointWeights:
    """Tensors of a model's safetensors checkpoint (one file, or shards named by ``model.safetensors.index.json``), read
    one at a time (PEFT's ``_SafetensorLoader``; ``model_path``: a folder, a ``.safetensors`` file, or None: the
    model's ``name_or_path``, a folder or a Hub id already in the cache)."""

    def __init__(self, model: nn.Module, model_path):
        from safetensors import safe_open

        if model_path is not None and not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(f"model_path must be a str or os.PathLike (a folder or a .safetensors file), got "
                            f"{type(model_path).__name__}")
        where = model_path if model_path is not None else _model_name(model)
        if where is None:
            raise ValueError("replace_lora_weights_loftq: the model names no checkpoint (config.name_or_path); pass "
                             "model_path, the folder or .safetensors file of its unquantized weights")
        path = os.fspath(where)
        if not os.path.exists(path) and model_path is None:
            try:
                from huggingface_hub import snapshot_download
                path = snapshot_download(path, local_files_only=True)  # (PEFT's: the Hub cache only)
            except Exception as e:
                raise ValueError(f"replace_lora_weights_loftq: the model's checkpoint {where!r} is no folder here nor "
                                 f"in the Hugging Face cache ({type(e).__name__}); pass model_path") from None
        if os.path.basename(path) == "model.safetensors" and not os.path.exists(path):
            path = os.path.dirname(path) or "."  # (PEFT's: "<folder>/model.safetensors" of a sharded checkpoint)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            elif os.path.isfile(os.path.join(path, "model.safetensors")):
                files = None
                path = os.path.join(path, "model.safetensors")
            else:
                raise FileNotFoundError(f"replace_lora_weights_loftq: no model.safetensors (nor its shards' index) in "
                                        f"{path!r}; LoftQ reads the unquantized weights from safetensors files")
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            files = None
        else:
            raise FileNotFoundError(f"replace_lora_weights_loftq: model_path {path!r} is neither a folder nor a "
                                    ".safetensors file" + ("" if os.path.exists(path) else " (it does not exist)"))
        if files is None:
            with safe_open(path, framework="pt", device="cpu") as f:
                files = dict.fromkeys(f.keys(), path)
        self.files, self.open = files, safe_open
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def keys_of(self, name: str) -> list:
        """The keys module ``name``'s weight may have in the checkpoint: its own, and with the model's
        ``base_model_prefix`` taken off or added (checkpoints of a task model and of its base differ by it)."""
        p = self.prefix + "."
        keys = [f"{name}.weight", f"{name[len(p):]}.weight" if name.startswith(p) else f"{p}{name}.weight"]
        return keys if self.prefix else keys[:1]

    def key(self, name: str) -> str:
        """The checkpoint's key of module ``name``'s weight (``keys_of``' first one present)."""
        for k in self.keys_of(name):
            if k in self.files:
                return k
        raise KeyError(name)

    def shape(self, key: str) -> tuple:
        with self.open(self.files[key], framework="pt", device="cpu") as f:
            return tuple(f.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        with self.open(self.files[key], framework="pt", device="cpu") as f:
            return f.get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        with self.open(self.files[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def _conv1d_source(m) -> bool:
    """Whether transformers made this bnb layer from a Conv1D (its checkpoint weight is stored (in, out))."""
    return getattr(getattr(m.base_layer, "source_cls", None), "__name__", None) == "Conv1D"


@torch.no_grad()
def replace_lora_weights_loftq(model: nn.Module, model_path=None, adapter_name: str = "default", callback=None,
                               progress: bool = True) -> nn.Module:
    """PEFT's ``replace_lora_weights_loftq`` on a fastpeft model whose LoRA layers sit on bitsandbytes bases (a model
    loaded in 4 or 8 bits, then ``inject``): each such layer's adapter ``adapter_name`` becomes LoftQ's, the top-r
    part of W - Q (``loftq_error_factors``: B = U_r √S_r, A = √S_r V_rᵀ), with W the unquantized weight read from the
    model's safetensors checkpoint one tensor at a time and Q the layer's own dequantized weight; returns ``model``.

    ``model_path``: that checkpoint (a folder, its ``model.safetensors`` or sharded files, or None: the model's
    ``name_or_path``). ``callback(model, name) -> bool``, called after each layer: False puts that layer's previous
    A and B back (PEFT's: keep only what lowers the error on your inputs). As PEFT's, the scaling s = alpha / r is
    not taken into account (warned where s != 1), and a DoRA adapter's magnitude stays as it was. Every layer's key,
    shape and dtype (floating point: a quantized checkpoint is refused) are checked before any changes. A layer
    transformers made from a Conv1D (GPT-2's; the checkpoint holds W as (in, out)) reads W transposed (PEFT's takes
    the stored matrix: wrong factors on square layers); r above min(out, in) gets zero rows / columns beyond the
    SVD's triplets (PEFT's product). PEFT's own runs on a CUDA / XPU card and on 4-bit layers only; this one runs
    where the layers are, 8-bit ones too."""
    check_adapter_name(adapter_name)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (model, name) -> bool, got {type(callback).__name__}")
    check_bool(progress, "progress")
    layers = {n: m for n, m in lora_layers(model).items() if isinstance(m, QLoRALinear)
              and adapter_name in m.adapter_names}
    if not layers:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA layer of adapter {adapter_name!r} on a bitsandbytes "
                         f"base in the model (adapters: {sorted(adapter_configs(model))}); load the model in 4 / 8 "
                         "bits (transformers' BitsAndBytesConfig) and inject LoRA first")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"replace_lora_weights_loftq: layers {few(merged)} have a merged adapter: unmerge first")
    weights = _CheckpointWeights(model, model_path)
    keys, transposed = {}, {}
    for name, m in layers.items():
        try:
            keys[name] = weights.key(name)
        except KeyError:
            raise ValueError(f"replace_lora_weights_loftq: the checkpoint has no weight of layer {name!r} (looked for "
                             f"{' and '.join(weights.keys_of(name))}); is it this model's?") from None
        dtype = weights.dtype(keys[name])
        if dtype not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"replace_lora_weights_loftq: the checkpoint's {keys[name]} is {dtype}, not a "
                             "floating-point weight: a quantized checkpoint? pass model_path, the unquantized one")
        transposed[name] = _conv1d_source(m)
        shape = weights.shape(keys[name])[::-1] if transposed[name] else weights.shape(keys[name])
        if shape != (m.out_features, m.in_features):
            raise ValueError(f"replace_lora_weights_loftq: the checkpoint's {keys[name]} is {shape}, layer {name!r} "
                             f"holds ({m.out_features}, {m.in_features})")
    from tqdm.auto import tqdm

    warned = set()
    for name, m in tqdm(layers.items(), desc="LoftQ", unit="layer", disable=not progress or len(layers) < 8):
        spec = m._spec_of(adapter_name)
        if spec.scaling not in warned:
            warned.add(spec.scaling)
            loftq_scaling_warning(spec.scaling, f"replace_lora_weights_loftq, adapter {adapter_name!r}")
        a, b = m.lora_A_adapters[adapter_name], m.lora_B_adapters[adapter_name]
        q = dequantize_weight(m.quantized_weight()).float()
        w = weights.get(keys[name])
        w = w.t() if transposed[name] else w  # (a Conv1D's checkpoint holds W as (in, out))
        fa, fb = loftq_error_factors(w.to(q.device, torch.float32) - q, spec.r)
        if fa.shape[0] < spec.r:  # r > min(out, in): the SVD has fewer triplets; zero rows / columns (PEFT's product)
            fa = torch.cat([fa, fa.new_zeros(spec.r - fa.shape[0], fa.shape[1])])
            fb = torch.cat([fb, fb.new_zeros(fb.shape[0], spec.r - fb.shape[1])], dim=1)
        before = (a.detach().clone(), b.detach().clone()) if callback is not None else None
        a.copy_(fa)
        b.copy_(fb)
        if callback is not None and not callback(model, name):
            a.copy_(before[0])
            b.copy_(before[1])
    return model


def _exact_peft_targets(ranks: dict) -> dict:
    """PEFT LoraConfig fields that adapt exactly the layers ``ranks`` names ({name: r}), each at its rank, for PEFT's
    functions that pick their layers from a config (preprocess_corda, get_eva_state_dict): target_modules one regex of
    the exact names (PEFT matches a list's names as a name's end, a string whole) and rank_pattern keys anchored
    ("^": PEFT matches a pattern key as a name's end, so 'mlp.fc' would also give 'blocks.0.mlp.fc' its rank)."""
    return dict(target_modules="|".join(map(re.escape, ranks)),
                rank_pattern={"^" + re.escape(n): r for n, r in ranks.items()})


@torch.no_grad()
def preprocess_corda(model: nn.Module, config, run_model=None, hooked_model=None) -> nn.Module:
    """PEFT's ``preprocess_corda`` for ``inject(model, config)`` with ``init_lora_weights="corda"`` (CorDA, Yang et al.
    2024): the covariance of each target linear layer's inputs over what ``run_model()`` feeds the model, then W's
    SVD weighted by it ("ipm": the directions the inputs use least are trained, "kpm": the most; ``corda_config``),
    left on each layer as ``eigens`` for ``inject``; returns ``model``. PEFT's own code, on exactly the layers
    ``inject`` will adapt (their names resolved by fastpeft: "all-linear", patterns and exclusions applied) with each
    one's rank; ``corda_config``'s cache / covariance files as PEFT's. ``config``: fastpeft's or PEFT's LoraConfig.
    ``run_model()`` feeds the model one sequence a call, without padding (PEFT's hook takes (1, L, in) inputs); PEFT
    suggests some 256 samples of 2048 tokens for a 4096-wide model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    config = _from_peft_config(config)
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "corda":
        raise ValueError(f"preprocess_corda: config must be a LoraConfig with init_lora_weights='corda', got "
                         f"{type(config).__name__}" + (f" with init_lora_weights={config.init_lora_weights!r}"
                                                        if isinstance(config, LoraConfig) else ""))
    if run_model is not None and not callable(run_model):
        raise TypeError(f"run_model must be callable (it runs the model on your samples), got "
                        f"{type(run_model).__name__}")
    plan = plan_lora(model, config, warn=False)
    adapted = [n for n, t in plan.targets.items() if t is not None and isinstance(model.get_submodule(n),
                                                                                  (FastLoRALinear, SparseDeltaLinear))]
    if adapted:
        raise ValueError(f"preprocess_corda: target_modules match {few(adapted)}, which hold fastpeft adapters "
                         "already: CorDA's eigens are measured on the plain layers; preprocess and inject the CorDA "
                         "adapter first, then add the others")
    _check_rewritable(model, config, plan, eigens=False)  # (what inject would refuse, before the data pass)
    linear = {n: t[0] for n, t in plan.targets.items() if t is not None and n not in plan.params
              and isinstance(model.get_submodule(n), nn.Linear) and not _conv1d(model.get_submodule(n))}
    if not linear:
        raise ValueError(f"preprocess_corda: the config's target_modules ({config.target_modules!r}) match no linear "
                         "layer of the model")
    peft_config = PeftLoraConfig(r=config.r, **_exact_peft_targets(linear), init_lora_weights="corda",
                                 corda_config=CordaConfig(**config.corda_config))
    modules = {n: model.get_submodule(n) for n in linear}
    before = {n: (set(m._forward_hooks), m.__dict__.get("eigens")) for n, m in modules.items()}
    training = model.training
    try:
        peft_preprocess(model, peft_config, run_model=run_model, hooked_model=hooked_model)
    except BaseException as e:  # the layers as they were: PEFT's hooks and temporary fields gone
        for n, m in modules.items():
            hooks, held = before[n]
            for key in set(m._forward_hooks) - hooks:
                del m._forward_hooks[key]
            for attr in ("sample_count", "covariance_matrix", "rank", "corda_method", "eigens"):
                m.__dict__.pop(attr, None)
            if held is not None:
                m.eigens = held
        if isinstance(e, RuntimeError) and "expects a tensor with <= 2 dimensions" in str(e):
            raise ValueError("preprocess_corda: run_model must feed the model one sequence a call (PEFT's CorDA "
                             "hook takes (1, L, in) inputs), got a batch of several") from e
        raise
    finally:
        model.train(training)  # (PEFT's pass leaves the model in eval)
    return model


def _eva_target(module: nn.Module, embeddings: bool = False) -> bool:
    """Whether EVA initialises LoRA on ``module`` from its inputs: a linear layer (nn.Linear, a bitsandbytes one,
    Conv1D), or fastpeft's LoRA layer on one; with ``embeddings``, an embedding too (PEFT's EVA takes the adapter there
    and gives it init_lora_weights=True)."""
    if embeddings and isinstance(module, (nn.Embedding, FastLoRAEmbedding)):
        return True
    if isinstance(module, (FastLoRAEmbedding, FastLoRAConv, FastLoRAParameter)):
        return False
    return isinstance(module, (nn.Linear, FastLoRALinear)) or _conv1d(module)


def _eva_layers(model: nn.Module, adapter_name: str, what: str) -> tuple:
    """``(config, layers)`` of a LoRA adapter that EVA may initialise: its linear layers (nn.Linear, Conv1D,
    bitsandbytes), checked."""
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    config = configs.get(adapter_name)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{what}: the model has no LoRA adapter {adapter_name!r} (adapters: {sorted(configs)})")
    layers = LoraMethod._layers(model, adapter_name)
    odd = [n for n, m in layers.items() if not _eva_target(m, embeddings=True)]
    if odd:
        raise ValueError(f"{what}: adapter {adapter_name!r} sits on {few(odd)}, not a linear layer nor an "
                         "embedding: EVA initialises nn.Linear / Conv1D / bitsandbytes layers")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"{what}: layers {few(merged)} have a merged adapter: unmerge first")
    return config, layers


_LM = "language_modeling"  # (PEFT's default input preparation for EVA's SVD: causal-LM batches, masks applied)


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader, adapter_name: str = "default", forward_fn=None,
                       prepare_model_inputs_fn=_LM, prepare_layer_inputs_fn=_LM, show_progress_bar: bool = True):
    """PEFT's ``get_eva_state_dict`` for adapter ``adapter_name`` of a fastpeft model: ``{layer name: A (k, in)}``,
    the top right-singular vectors of each layer's inputs over ``dataloader`` (PEFT's incremental SVD, run until
    they converge, batches cycled), k redistributed over the layers from the explained variance within
    ``round(r * rho)`` per layer and a budget of the adapter's ranks (``eva_config``). Computed by PEFT's own code
    on the model with the adapter's layers put back to their base modules for the pass (the adapters never change
    an input there), so PEFT's hooks see the inputs they see in a PeftModel. ``forward_fn(model, batch)`` (None:
    ``model(**batch)``), ``prepare_model_inputs_fn`` / ``prepare_layer_inputs_fn``: PEFT's (``"language_modeling"``:
    its defaults, which drop padded and label-masked tokens; None: every token)."""
    from peft import EvaConfig
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import eva as peft_eva

    config, layers = _eva_layers(model, adapter_name, "get_eva_state_dict")
    check_bool(show_progress_bar, "show_progress_bar")
    if not hasattr(dataloader, "__len__") or not hasattr(dataloader, "__iter__"):
        raise TypeError(f"dataloader must be a sized iterable of batches (a DataLoader, a list), got "
                        f"{type(dataloader).__name__}")
    eva = config.eva_config if config.eva_config is not None else dict(EVA_DEFAULTS)
    ranks = {n: m._spec_of(adapter_name).r for n, m in layers.items() if _eva_target(m)}  # (the linear layers)
    peft_config = PeftLoraConfig(r=config.r, **_exact_peft_targets(ranks), init_lora_weights="eva",
                                 eva_config=EvaConfig(**eva))
    fns = {"forward_fn": forward_fn if forward_fn is not None else peft_eva.forward_fn_dict,
           "prepare_model_inputs_fn": peft_eva.prepare_model_inputs_fn_language_modeling
           if prepare_model_inputs_fn == _LM else prepare_model_inputs_fn,
           "prepare_layer_inputs_fn": peft_eva.prepare_layer_inputs_fn_language_modeling
           if prepare_layer_inputs_fn == _LM else prepare_layer_inputs_fn}
    swapped, training = [], model.training
    try:
        for name, layer in layers.items():
            set_submodule(model, name, layer.base_module())
            swapped.append((name, layer))
        return peft_eva.get_eva_state_dict(model, dataloader, peft_config=peft_config,
                                           show_progress_bar=show_progress_bar, **fns)
    finally:
        for name, layer in swapped:
            set_submodule(model, name, layer)
        model.train(training)  # (PEFT's pass sets eval and restores the mode only when it finishes)


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader=None, eva_state_dict: dict | None = None,
                                forward_fn=None, prepare_model_inputs_fn=_LM, prepare_layer_inputs_fn=_LM,
                                adapter_name: str = "default", show_progress_bar: bool = True) -> nn.Module:
    """PEFT's ``initialize_lora_eva_weights`` on a fastpeft model whose adapter ``adapter_name`` was made with
    ``init_lora_weights="eva"`` (EVA, Paischer et al. 2024): A ← the top right-singular vectors of each layer's
    inputs (``get_eva_state_dict`` over ``dataloader``, or ``eva_state_dict`` as it returns), B stays zero, so the
    model still computes its base; returns ``model``. The ranks are redistributed as PEFT's: a layer's adapter is
    made again at its new rank k (alpha times k / r with ``eva_config["adjust_scaling_factors"]``), a layer at k = 0
    loses it (its base module back), and the config's rank_pattern / alpha_pattern / target_modules say so (the
    files are PEFT's). Layers missing from ``eva_state_dict``, and embeddings (EVA takes linear layers), get
    init_lora_weights=True (PEFT's, warned). Every shape is checked before any change. Call it before making the
    optimizer (the resized adapters are new Parameters). The model must hold this adapter only."""
    config, layers = _eva_layers(model, adapter_name, "initialize_lora_eva_weights")
    if config.init_lora_weights != "eva":  # (PEFT's rule)
        raise ValueError(f"initialize_lora_eva_weights: adapter {adapter_name!r} was made with init_lora_weights="
                         f"{config.init_lora_weights!r}; EVA initialises adapters made with init_lora_weights='eva'")
    others = sorted(set(adapter_configs(model)) - {adapter_name})
    if others:
        raise ValueError(f"initialize_lora_eva_weights: the model holds other adapters too ({others}); EVA "
                         "changes this adapter's ranks and layers: initialise it before adding others")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights: pass dataloader (batches of the model's inputs) or "
                             "eva_state_dict (get_eva_state_dict's result)")
        eva_state_dict = get_eva_state_dict(model, dataloader, adapter_name, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, show_progress_bar)
    if not isinstance(eva_state_dict, dict):
        raise TypeError(f"eva_state_dict must be a dict of layer name -> A (k, in), got "
                        f"{type(eva_state_dict).__name__}")
    linear = [n for n, m in layers.items() if _eva_target(m)]
    unknown = sorted(set(eva_state_dict) - set(linear))
    if unknown:
        raise ValueError(f"eva_state_dict holds {few(unknown)}, not linear layers of adapter {adapter_name!r} "
                         f"({few(linear)})")
    for name, w in eva_state_dict.items():
        shape = (None, layers[name].in_features)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != shape[1] or not w.is_floating_point() \
                or w.shape[0] > shape[1]:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"eva_state_dict[{name!r}] must be a floating-point A of shape (k, {shape[1]}), got "
                             f"{got}")
    eva = config.eva_config or {}
    rank_pattern, alpha_pattern, targets, missing = {}, {}, [], []
    for name, layer in layers.items():  # (the model's order: new draws in PEFT's order)
        spec = layer._spec_of(adapter_name)
        r, alpha = spec.r, spec.lora_alpha
        if name in eva_state_dict:
            w = eva_state_dict[name]
            k = w.shape[0]
            if k == 0:  # no share of the budget: the layer goes (PEFT's)
                set_submodule(model, name, layer.base_module().train(layer.training))
                continue
            if k != r:
                if eva.get("adjust_scaling_factors", True):
                    alpha = alpha * (k / r)  # (PEFT's rounding: alpha *= new_rank / r)
                layer._resize(adapter_name, k, alpha, "eva")
            layer.lora_A_adapters[adapter_name].copy_(w)
            targets.append(name)
        else:
            layer._resize(adapter_name, r, alpha, True)
            missing.append(name)
            k = r
        if k != config.r:
            rank_pattern[name] = k
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    peft_state(model).adapters[adapter_name] = replace(
        config, target_modules=targets + missing, exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if missing:
        warnings.warn(f"initialize_lora_eva_weights: layers {few(missing)} were not in eva_state_dict (EVA takes "
                      "linear layers, not embeddings) and got init_lora_weights=True (PEFT's)", UserWarning,
                      stacklevel=3)
    return model


def select_by_gradients(model: nn.Module, batches, loss_fn, progress: bool = True) -> dict:
    """RoSA's one-shot mask: accumulate |dL/dW| of each sparse delta's weight over ``batches``, then
    re-pick every delta's positions from those scores (values reset to zero); returns the scores.

    ``loss_fn(model, batch)`` returns a scalar loss. Covers ``SparseDeltaLinear`` layers and the active
    adapter of ``FastLoRALinear`` layers with a sparse delta. W's gradient is dense here (a few batches,
    once, before training), as in RoSA; the weights are frozen again afterwards.
    """
    from tqdm.auto import tqdm

    targets = {n: m for n, m in {**sparse_layers(model), **lora_layers(model)}.items()
               if m.has_delta() and m.sparse_delta() is not None}
    if not targets:
        off = [n for n, m in sparse_layers(model).items() if not m.has_delta()]
        raise ValueError(f"select_by_gradients: the model's sparse deltas are switched off (layers {few(off)}): "
                         "fastpeft.set_adapter the adapter first" if off else
                         "select_by_gradients: the model has no sparse deltas (SparseDeltaConfig, or LoraConfig "
                         "with sparse_density > 0)")
    merged = [n for n, m in targets.items() if m.merged]
    if merged:  # W holds the current delta: checked before any layer is scored or changed
        raise RuntimeError(f"select_by_gradients: layers {few(merged)} have their sparse delta merged; unmerge them "
                           "first")
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in targets.items()}
    for m in targets.values():
        m.weight.requires_grad_(True)
    steps, reached = 0, set()
    try:
        for batch in tqdm(batches, desc="gradient scores", unit="batch", disable=not progress):
            loss_fn(model, batch).backward()
            for n, m in targets.items():
                if m.weight.grad is not None:  # a layer the batch's loss does not reach has no gradient
                    scores[n] += m.weight.grad.float().abs()
                    reached.add(n)
                m.weight.grad = None
            steps += 1
    finally:
        for m in targets.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    if steps == 0:
        raise ValueError("select_by_gradients: batches was empty")
    missed = [n for n in targets if n not in reached]
    if missed:
        for p in model.parameters():
            p.grad = None
        raise ValueError(f"select_by_gradients: layers {few(missed)} got no "
                         f"gradient from loss_fn in any batch (not used in the forward?); nothing was selected. "
                         f"Leave them out of target_modules, or score them with a loss that reaches them")
    for p in model.parameters():
        p.grad = None  # the scoring passes are not a training step
    for n, m in targets.items():
        m.sparse_delta().select_positions(m.weight, "scores", scores[n])
    state = peft_state(model)  # the saved config says how the positions were picked, as the layers do
    config = state.adapters.get(state.active)
    if isinstance(config, SparseDeltaConfig):
        state.adapters[state.active] = replace(config, selection="scores")
    elif getattr(config, "sparse_density", 0.0) > 0.0:
        state.adapters[state.active] = replace(config, sparse_selection="scores")
    return scores
