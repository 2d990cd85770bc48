"""Model surgery: configs, module matching (Hugging Face PEFT's rules), injection, merging.

Matching, as PEFT does it:
- ``target_modules`` a string: ``re.fullmatch`` against the full module name;
- a list: a module matches an entry equal to its full name or to a ``.``-separated suffix of it;
- ``"all-linear"``: every ``nn.Linear`` except the output head (``model.get_output_embeddings()``);
- ``exclude_modules`` (same rules) and the ``modules_to_save`` modules are never targets;
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched as ``(.*\\.)?(key)$`` against the name;
- ``modules_to_save`` entries match module names that end with them.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from ._checks import check_dropout, check_finite_number, check_rank
from .layers import FastLoRALinear, SparseDeltaLinear, _check_init, check_adapter_name, check_sparse_options

ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")
# Used when target_modules is None, by ``model.config.model_type`` (PEFT's defaults for these).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}


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
    sparse_density: float = 0.0      # > 0: a sparse delta beside each LoRA update (RoSA)
    sparse_block_size: int = 1
    sparse_selection: str = "random"

    def __post_init__(self):
        check_sparse_options(self.sparse_density, self.sparse_block_size, self.sparse_selection, "sparse_density",
                             allow_zero=True)
        check_rank(self.r)
        check_finite_number(self.lora_alpha, "lora_alpha")
        check_dropout(self.lora_dropout)
        self.target_modules = _name_list(self.target_modules, "target_modules")
        self.exclude_modules = _name_list(self.exclude_modules, "exclude_modules")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(self.use_rslora).__name__}")
        _check_init(self.init_lora_weights)
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list(list(self.modules_to_save) if not isinstance(
                self.modules_to_save, str) else [self.modules_to_save], "modules_to_save")
        for pname, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pat, dict):
                raise TypeError(f"{pname} must be a dict of module-name regex -> value, got {type(pat).__name__}")
            for k, v in pat.items():
                _compile(k, f"{pname} key")
                (check_rank if pname == "rank_pattern" else check_finite_number)(v, f"{pname}[{k!r}]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SparseDeltaConfig:
    """A trainable sparse delta on each target nn.Linear (``SparseDeltaLinear``): ``density`` of its
    entries (or blocks of ``block_size``), picked by ``selection`` ("random", "magnitude", "scores")."""

    density: float = 0.01
    block_size: int = 1
    selection: str = "random"
    target_modules: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[str, list]] = None

    def __post_init__(self):
        check_sparse_options(self.density, self.block_size, self.selection)
        self.target_modules = _name_list(self.target_modules, "target_modules")
        self.exclude_modules = _name_list(self.exclude_modules, "exclude_modules")

    def to_dict(self) -> dict:
        return asdict(self)


def _compile(pattern: str, what: str):
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a str, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from None


def _name_list(v, name):
    """None, a regex string, or a list of names (sets and tuples are sorted into lists)."""
    if v is None:
        return None
    if isinstance(v, str):
        if v.lower() != ALL_LINEAR or name != "target_modules":
            _compile(v, name)
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        if not items or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"{name} must be a regex string or a non-empty list of module names, got {v!r}")
        return items
    raise TypeError(f"{name} must be a str, a list of str or None, got {type(v).__name__}")


def _matches(spec, name: str) -> bool:
    """PEFT's rule: a string is fullmatched; a list matches an exact name or a ``.name`` suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + s) for s in spec)


def pattern_value(patterns: dict, name: str, default):
    """The value of the first ``patterns`` key matching ``name`` as ``(.*\\.)?(key)$``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _default_targets(model: nn.Module) -> list:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError("target_modules is None and fastpeft knows no default targets for model type "
                     f"{model_type!r}: pass target_modules (a list of names, a regex, or 'all-linear')")


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
    return found


@dataclass
class LoraPlan:
    """What ``inject`` will do, computed without touching the model (so loads can validate first)."""

    targets: dict  # full module name -> (r, lora_alpha)
    saved: list    # full names of the modules_to_save modules


def plan_lora(model: nn.Module, config: LoraConfig) -> LoraPlan:
    """Resolve ``config`` against ``model``'s module names; raises ValueError on no or bad matches.

    Targets are ``nn.Linear`` modules, or ``FastLoRALinear`` layers that already hold other adapters
    (the new adapter goes beside them)."""
    saved = _saved_module_names(model, getattr(config, "modules_to_save", None))
    spec = config.target_modules if config.target_modules is not None else _default_targets(model)
    all_linear = isinstance(spec, str) and spec.lower() == ALL_LINEAR
    head = _output_head(model) if all_linear else None
    targets = {}
    inner = []  # prefixes of LoRA layers and wrappers: their internals are never targets
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inner):
            continue
        if isinstance(module, (FastLoRALinear, SparseDeltaLinear, ModulesToSaveWrapper)):
            inner.append(name + ".")
        if _matches(config.exclude_modules, name) or any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if all_linear:
            hit = isinstance(module, (nn.Linear, FastLoRALinear)) and module is not head
        else:
            hit = _matches(spec, name)
        if not hit:
            continue
        if not isinstance(module, (nn.Linear, FastLoRALinear)):
            raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}; fastpeft "
                             "adapts nn.Linear modules only: narrow target_modules or exclude it")
        if isinstance(config, SparseDeltaConfig):
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target_modules matched {name!r}, a {type(module).__name__}; a sparse delta goes on "
                                 "a plain nn.Linear (one adapter kind per layer)")
            targets[name] = None
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        targets[name] = (r, alpha)
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, FastLoRALinear))][:8]
        raise ValueError(f"target_modules {spec!r} matched no nn.Linear of the model (after exclude_modules "
                         f"{config.exclude_modules!r}); its linear layers are named like {linear}")
    return LoraPlan(targets=targets, saved=saved)


class ModulesToSaveWrapper(nn.Module):
    """A frozen original module and a trainable copy per adapter; forward runs the active adapter's copy
    (the original when the active adapter has none). Inside ``fastpeft.mixed_batch`` each sequence
    (dim 0 of the first argument) runs its own adapter's copy.

    The parameters of a copy are saved with its adapter, under the original module's names.
    """

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = None
        self._routing = None
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name)
        self.set_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def set_adapter(self, name) -> None:
        self.active_adapter = name
        for n, m in self.modules_to_save.items():
            for p in m.parameters():
                p.requires_grad_(n == name)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def module_for(self, name) -> nn.Module:
        return self.modules_to_save[name] if name in self.modules_to_save else self.original_module

    @property
    def active_module(self) -> nn.Module:
        return self.module_for(self.active_adapter)

    def forward(self, *args, **kwargs):
        if self._routing is None:
            return self.active_module(*args, **kwargs)
        x, rest = args[0], args[1:]
        if any(isinstance(a, torch.Tensor) for a in rest) or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise RuntimeError("mixed_batch routes a modules_to_save module by the first argument's batch dim "
                               "only; this call passes more tensors")
        if x.shape[0] != len(self._routing):
            raise ValueError(f"mixed_batch was given {len(self._routing)} adapter names, but this module's "
                             f"input has batch size {x.shape[0]}")
        outs, order = [], []
        for name in dict.fromkeys(self._routing):
            rows = [i for i, n in enumerate(self._routing) if n == name]
            order += rows
            outs.append(self.module_for(name)(x[rows], *rest, **kwargs))
        out = torch.cat(outs)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return out[inverse.to(out.device)]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("modules_to_save", "original_module"):
                raise
            return getattr(self.active_module, name)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> dict:
    """Full module name -> ``FastLoRALinear``, for every LoRA layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FastLoRALinear)}


def sparse_layers(model: nn.Module) -> dict:
    """Full module name -> ``SparseDeltaLinear``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _plain_linear(layer) -> nn.Linear:
    """An nn.Linear sharing ``layer``'s weight and bias (no copy)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight = layer.weight
    lin.bias = layer.bias
    return lin


def saved_module_wrappers(model: nn.Module) -> dict:
    """Full module name -> ``ModulesToSaveWrapper``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def adapter_configs(model: nn.Module) -> dict:
    """Adapter name -> the ``LoraConfig`` it was injected with (empty when none)."""
    return getattr(model, "_fastpeft_adapters", {})


def active_adapter(model: nn.Module):
    """The model-wide active adapter's name (None: the base model)."""
    return getattr(model, "_fastpeft_active", None)


def is_bias(param_name: str) -> bool:
    """Whether ``bias="all"`` trains this parameter: PEFT's rule, a parameter named ``bias``. A name that only
    contains the word (T5's ``relative_attention_bias.weight``) is no bias term."""
    return param_name == "bias" or param_name.endswith(".bias")


def _apply_bias(model: nn.Module, bias: str, lora: dict) -> None:
    if bias == "all":
        for n, p in model.named_parameters():
            if is_bias(n):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora.values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def inject(model: nn.Module, config, adapter_name: str = "default", plan: LoraPlan | None = None,
           activate: bool = True) -> nn.Module:
    """Add the adapter ``config`` describes to ``model`` in place and freeze all it does not train.

    LoRA: each target ``nn.Linear`` becomes a ``FastLoRALinear`` sharing its weight and bias; a target
    that already is one gets ``adapter_name`` beside its adapters. With ``activate`` (default) the new
    adapter becomes the model's active one and the only one that trains. Checks the whole config
    against the model before changing anything. Returns ``model``.
    """
    from .methods import METHOD_CONFIGS, inject_method

    if not isinstance(config, (LoraConfig, SparseDeltaConfig) + METHOD_CONFIGS):
        raise TypeError("config must be a fastpeft LoraConfig, SparseDeltaConfig, BitFitConfig, AdapterConfig, "
                        f"PromptTuningConfig or LayerwiseConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    from .hf import attach_trainer_support  # adapter-only save_pretrained for Trainer / TRL (fastpeft/hf.py)
    attach_trainer_support(model)
    configs = adapter_configs(model)
    if isinstance(config, METHOD_CONFIGS):
        if configs:
            raise ValueError(f"model already has adapter(s) {list(configs)}; a {type(config).__name__} adapter is "
                             "the model's only adapter")
        model._fastpeft_trained = inject_method(model, config)
        model._fastpeft_adapters = {adapter_name: config}
        model._fastpeft_active = adapter_name
        return model
    alone = [c for c in (config, *configs.values()) if isinstance(c, (SparseDeltaConfig,) + METHOD_CONFIGS)]
    if configs and alone:
        raise ValueError(f"model already has adapter(s) {list(configs)}; a {type(alone[0]).__name__} adapter is the "
                         "model's only adapter (LoraConfig(sparse_density=...) puts sparse deltas beside LoRA)")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in the model (adapters {list(configs)}); "
                         "pick another adapter_name or delete_adapter it first")
    merged = [n for n, m in lora_layers(model).items() if m.merged]
    if merged:
        raise RuntimeError(f"layers {merged[:4]} have a merged adapter: unmerge them before adding another")
    field_name = "selection" if isinstance(config, SparseDeltaConfig) else "sparse_selection"
    if getattr(config, field_name) == "scores" and (isinstance(config, SparseDeltaConfig) or config.sparse_density > 0):
        raise ValueError(f"{field_name}='scores' needs a scores tensor per layer, which inject has none of: inject "
                         "with 'random' or 'magnitude', then fastpeft.select_by_gradients re-picks the positions "
                         "from gradient scores")
    plan = plan if plan is not None else plan_lora(model, config)
    # Everything below only mutates: all checks are done.
    if not configs:
        for p in model.parameters():
            p.requires_grad_(False)
    if isinstance(config, SparseDeltaConfig):
        for name in plan.targets:
            _set_submodule(model, name, SparseDeltaLinear.from_linear(model.get_submodule(name), config.density,
                                                                      config.block_size, config.selection))
        model._fastpeft_adapters = {adapter_name: config}
        model._fastpeft_active = adapter_name
        return model
    new_layers = {}
    for name, (r, alpha) in plan.targets.items():
        module = model.get_submodule(name)
        kw = dict(lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                  init_lora_weights=config.init_lora_weights, sparse_density=config.sparse_density,
                  sparse_block_size=config.sparse_block_size, sparse_selection=config.sparse_selection)
        if isinstance(module, FastLoRALinear):
            module.add_adapter(adapter_name, r, alpha, **kw)
            layer = module
        else:
            layer = FastLoRALinear.from_linear(module, r=r, lora_alpha=alpha, adapter_name=adapter_name, **kw)
            layer.set_adapter(None)
            _set_submodule(model, name, layer)
        new_layers[name] = layer
    # Biases first: the wrappers below then freeze their originals again and train their copies.
    _apply_bias(model, config.bias, new_layers)
    for name in plan.saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            wrapper = ModulesToSaveWrapper(module, adapter_name)
            wrapper.set_adapter(None)
            _set_submodule(model, name, wrapper)
    model._fastpeft_adapters = {**configs, adapter_name: config}
    if activate or not configs:
        set_adapter(model, adapter_name)
    else:
        set_adapter(model, active_adapter(model))
    return model


def set_adapter(model: nn.Module, adapter_name) -> None:
    """Make ``adapter_name`` the active adapter of every layer that has it (layers without it run their
    base) and the only one that trains; None runs the base model."""
    configs = adapter_configs(model)
    if adapter_name is not None and adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model; it has {list(configs)}")
    for layer in lora_layers(model).values():
        layer.set_adapter(adapter_name if adapter_name in layer.adapter_names else None)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.set_adapter(adapter_name)
    model._fastpeft_active = adapter_name


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from the model; if it was active, none is active afterwards.
    Layers left without adapters stay ``FastLoRALinear`` and run their base."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model; it has {list(configs)}")
    for layer in lora_layers(model).values():
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
    for wrapper in saved_module_wrappers(model).values():
        wrapper.delete_adapter(adapter_name)
    model._fastpeft_adapters = {k: v for k, v in configs.items() if k != adapter_name}
    if active_adapter(model) == adapter_name:
        set_adapter(model, None)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Route one adapter (or None = base) per sequence of the batch through every LoRA layer.

    ``adapter_names``: a list with one name or None per sequence (dim 0 of each layer's input). Inside
    the block each LoRA layer applies row i's adapter to every token of sequence i, also to the new
    tokens of a generation loop; layers that lack an adapter run their base for its sequences.
    """
    configs = adapter_configs(model)
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise TypeError(f"adapter_names must be a non-empty list of adapter names or None, got {adapter_names!r}")
    unknown = sorted({n for n in adapter_names if n is not None and n not in configs}, key=str)
    if unknown:
        raise ValueError(f"adapter_names {unknown} are not adapters of this model; it has {list(configs)}")
    layers = lora_layers(model)
    wrappers = saved_module_wrappers(model)
    previous = {id(m): m._routing for m in (*layers.values(), *wrappers.values())}
    try:
        for layer in layers.values():
            local = {n: i for i, n in enumerate(layer.adapter_names)}
            layer._routing = torch.tensor([local.get(n, -1) for n in adapter_names], dtype=torch.int64,
                                          device=layer.weight.device)
        for wrapper in wrappers.values():
            wrapper._routing = list(adapter_names)
        yield model
    finally:
        for m in (*layers.values(), *wrappers.values()):
            m._routing = previous[id(m)]


def trainable_parameters(model: nn.Module) -> tuple:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def format_trainable_parameters(model: nn.Module) -> str:
    """PEFT's summary line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(format_trainable_parameters(model))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold each layer's active adapter into its base weight and put plain modules back (other adapters
    are dropped); returns ``model``.

    Each ``FastLoRALinear`` becomes an ``nn.Linear`` sharing its (merged) weight and bias, without a copy;
    each modules_to_save wrapper becomes its trained copy.
    """
    for name, layer in lora_layers(model).items():
        if not layer.merged and layer.active_adapter is not None:
            layer.merge()
        _set_submodule(model, name, _plain_linear(layer))
    for name, layer in sparse_layers(model).items():
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, _plain_linear(layer))
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            _set_submodule(model, name, module.active_module)
    for attr in ("_fastpeft_adapters", "_fastpeft_active", "_fastpeft_trained"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def select_by_gradients(model: nn.Module, batches, loss_fn, progress: bool = True) -> dict:
    """RoSA's one-shot mask: accumulate |dL/dW| of each sparse delta's weight over ``batches``, then
    re-pick every delta's positions from those scores (values reset to zero); returns the scores.

    ``loss_fn(model, batch)`` returns a scalar loss. Covers ``SparseDeltaLinear`` layers and the active
    adapter of ``FastLoRALinear`` layers with a sparse delta. W's gradient is dense here (a few batches,
    once, before training), as in RoSA; the weights are frozen again afterwards.
    """
    from tqdm.auto import tqdm

    from .selection import select_indices

    targets = {n: m for n, m in sparse_layers(model).items()}
    targets.update({n: m for n, m in lora_layers(model).items() if m.active_adapter is not None
                    and m.adapter_sparse_delta() is not None})
    if not targets:
        raise ValueError("select_by_gradients: the model has no sparse deltas (SparseDeltaConfig, or LoraConfig "
                         "with sparse_density > 0)")
    scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in targets.items()}
    for m in targets.values():
        m.weight.requires_grad_(True)
    steps = 0
    try:
        for batch in tqdm(batches, desc="gradient scores", unit="batch", disable=not progress):
            loss_fn(model, batch).backward()
            for n, m in targets.items():
                scores[n] += m.weight.grad.float().abs()
                m.weight.grad = None
            steps += 1
    finally:
        for m in targets.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    if steps == 0:
        raise ValueError("select_by_gradients: batches was empty")
    for p in model.parameters():
        p.grad = None  # the scoring passes are not a training step
    for n, m in targets.items():
        if isinstance(m, SparseDeltaLinear):
            m.reselect("scores", scores[n])
        else:
            spec = m.adapter_spec()
            m.set_sparse_delta(m.active_adapter, select_indices(m.weight, spec.sparse_density, spec.sparse_block_size,
                                                                "scores", scores[n]))
    return scores
