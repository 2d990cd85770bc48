"""Argument checks shared by the ops, layers and model surgery.

Every message names the argument, what was expected and what was given, so that a user can fix the
call without reading fastpeft's source.
"""
from __future__ import annotations

import functools
import math
import operator
import os
import re
import warnings

import torch

from .ops.common import capturing
from .reference import DORA_DROPOUT_MODES

# float64 runs on the reference path only (the kernels take the three training dtypes).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INIT_CHOICES = (True, False, "gaussian", "orthogonal", "eva")
SELECTIONS = ("random", "magnitude", "scores")  # how a sparse delta's positions are picked


def _compiling() -> bool:
    """While torch.compile traces, the checks of tensor *values* (a host sync each, which would break the
    graph) are skipped; shapes, dtypes and devices are still checked. Run a step eagerly to check them."""
    return torch.compiler.is_compiling()


def _skip_value_checks() -> bool:
    """``_compiling()``, or a CUDA graph being captured on the current stream: a host sync there is an
    error (cudaErrorStreamCaptureUnsupported), and the graph replays without the checks anyway."""
    return _compiling() or capturing()


def _host_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` for a check that reads its values: under ``torch.func`` transforms the tensor beneath the transforms'
    wrappers (under vmap every sample's values at once; a batched tensor's values cannot be read on the host)."""
    if torch._C._are_functorch_transforms_active():
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
    return t


def check_rank(r, name: str = "r") -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{name} must be a positive int, got {r!r}")
    return r


def check_dropout(p, name: str = "lora_dropout") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def check_finite_number(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def few(names) -> str:
    """The first four of ``names`` for a message, with how many there are when more: ``['a', 'b', 'c', 'd', ...]
    (6)``."""
    names = list(names)
    return str(names) if len(names) <= 4 else f"{str(names[:4])[:-1]}, ...] ({len(names)})"


def check_bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")
    return v


def check_choice(v, choices: tuple, name: str):
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def base_rewriting_init(init_lora_weights) -> str | None:
    """``"pissa"`` / ``"olora"`` / ``"loftq"`` / ``"corda"`` for PEFT's inits that set A and B from the base weight W
    and put another weight in W's place (``"pissa"``: W's top-r singular triplets, exact SVD, and the residual
    W - s B A; ``"pissa_niter_<n>"``: the same from torch's randomized ``svd_lowrank`` with n subspace iterations;
    ``"olora"``: W's thin QR, and the residual; ``"loftq"``: the quantized W, and B A its quantization error's top-r
    part; ``"corda"``: W's SVD weighted by its inputs' covariance, from PEFT's ``preprocess_corda``, and the
    residual), else None."""
    if not isinstance(init_lora_weights, str):
        return None
    if init_lora_weights == "pissa" or _PISSA_NITER.fullmatch(init_lora_weights):
        return "pissa"
    if init_lora_weights in ("loftq", "corda"):
        return init_lora_weights
    return "olora" if init_lora_weights.lower() == "olora" else None


LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig()


def _peft_subconfig(value, init_lora_weights, init: str, cls: str, defaults: dict, unset, missing: str,
                    required: bool):
    """PEFT's rules for an init's sub-config (``loftq_config`` / ``eva_config`` / ``corda_config``, named after
    ``init``): ``value`` a dict or PEFT's ``cls`` (taken as its fields); with another init ``unset`` (a given one
    ignored, with PEFT's warning); with ``init`` and none given (None or ``unset``) ``missing`` raised where
    ``required``, else warned and the defaults taken; unknown keys refused. Returns the fields over ``defaults``."""
    name = f"{init}_config"
    if value is not None and not isinstance(value, dict):
        if type(value).__name__ != cls:
            raise TypeError(f"{name} must be a dict or a peft.{cls}, got {type(value).__name__}")
        value = dict(vars(value))
    if init_lora_weights != init:
        if value is not None and value != unset:
            warnings.warn(f"{name} is given but will be ignored: init_lora_weights is not {init!r} (PEFT's warning)",
                          UserWarning, stacklevel=5)
        return None if unset is None else dict(unset)
    if value is None or value == unset:
        if required:
            raise ValueError(missing)
        warnings.warn(missing, UserWarning, stacklevel=5)
        value = {}
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; known: {sorted(defaults)}")
    return {**defaults, **value}


def check_loftq_config(loftq_config, init_lora_weights) -> dict:
    """PEFT's ``loftq_config`` (a dict or a ``peft.LoftQConfig``) checked: ``{"loftq_bits": 4 | 8, "loftq_iter": n >=
    1}`` for ``init_lora_weights="loftq"`` (PEFT's rule: then it must be given), ``{}`` otherwise (one given there is
    ignored, with PEFT's warning)."""
    out = _peft_subconfig(loftq_config, init_lora_weights, "loftq", "LoftQConfig", LOFTQ_DEFAULTS, {},
                          "init_lora_weights='loftq' needs loftq_config (PEFT's rule), e.g. {'loftq_bits': 4, "
                          "'loftq_iter': 1} or peft.LoftQConfig(loftq_bits=4)", required=True)
    if init_lora_weights != "loftq":
        return out
    if out["loftq_bits"] not in (4, 8) or isinstance(out["loftq_bits"], bool):
        raise ValueError(f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), PEFT's choices, got "
                         f"{out['loftq_bits']!r}")
    if not isinstance(out["loftq_iter"], int) or isinstance(out["loftq_iter"], bool) or out["loftq_iter"] < 1:
        raise ValueError(f"loftq_config['loftq_iter'] must be an int >= 1, got {out['loftq_iter']!r}")
    return out


_PISSA_NITER = re.compile(r"pissa_niter_\d+")


def check_init(init_lora_weights):
    """PEFT's plain inits: True (kaiming A, zero B), "gaussian", "orthogonal" (BA = 0), False (both random, for
    tests), "eva" (True's A, zero B, until ``initialize_lora_eva_weights`` sets A from data); and its base-rewriting
    ones, "pissa", "pissa_niter_<n>", "olora", "loftq" and "corda" (``base_rewriting_init``)."""
    if base_rewriting_init(init_lora_weights) is not None:
        return init_lora_weights
    if not any(init_lora_weights is c or init_lora_weights == c for c in INIT_CHOICES) \
            or isinstance(init_lora_weights, (int, float)) and not isinstance(init_lora_weights, bool):
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} or 'pissa', 'pissa_niter_<n>', 'olora', "
                         f"'loftq', 'corda', got {init_lora_weights!r}")
    return init_lora_weights


CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}  # PEFT's CordaConfig()


def check_corda_config(corda_config, init_lora_weights) -> dict | None:
    """PEFT's ``corda_config`` (a dict or a ``peft.CordaConfig``) checked as PEFT's LoraConfig does: for
    ``init_lora_weights="corda"`` its fields (``CORDA_DEFAULTS`` where absent, PEFT's warning when none is given;
    corda_method "ipm" or "kpm"), None otherwise (one given there is ignored, with PEFT's warning)."""
    out = _peft_subconfig(corda_config, init_lora_weights, "corda", "CordaConfig", CORDA_DEFAULTS, None,
                          "init_lora_weights is 'corda' but corda_config is not specified: PEFT's default CorDA "
                          "config (PEFT's warning)", required=False)
    if out is None:
        return None
    check_choice(out["corda_method"], ("ipm", "kpm"), "corda_config['corda_method']")
    for k in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
        check_bool(out[k], f"corda_config['{k}']")
    return out


EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}  # PEFT's EvaConfig()


def check_eva_config(eva_config, init_lora_weights) -> dict | None:
    """PEFT's ``eva_config`` (a dict or a ``peft.EvaConfig``) checked as PEFT's LoraConfig does: for
    ``init_lora_weights="eva"`` its fields (``EVA_DEFAULTS`` where absent, with PEFT's warning when none is given;
    rho >= 1, 0 <= tau <= 1), None otherwise (one given there is ignored, with PEFT's warning)."""
    out = _peft_subconfig(eva_config, init_lora_weights, "eva", "EvaConfig", EVA_DEFAULTS, None,
                          "init_lora_weights is 'eva' but eva_config is not specified: PEFT's default EVA config "
                          f"{EVA_DEFAULTS} (PEFT's warning)", required=False)
    if out is None:
        return None
    if isinstance(out["rho"], bool) or not isinstance(out["rho"], (int, float)) or not out["rho"] >= 1:
        raise ValueError(f"eva_config['rho'] must be a number >= 1.0 (PEFT's rule), got {out['rho']!r}")
    if isinstance(out["tau"], bool) or not isinstance(out["tau"], (int, float)) or not 0 <= out["tau"] <= 1:
        raise ValueError(f"eva_config['tau'] must be in [0, 1] (PEFT's rule), got {out['tau']!r}")
    for k in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        check_bool(out[k], f"eva_config['{k}']")
    if isinstance(out["label_mask_value"], bool) or not isinstance(out["label_mask_value"], int):
        raise ValueError(f"eva_config['label_mask_value'] must be an int, got {out['label_mask_value']!r}")
    return out


@functools.lru_cache(maxsize=None)
def _taken_names() -> frozenset:
    """Attribute names of the containers an adapter's name becomes a key of (``nn.ModuleDict`` /
    ``nn.ParameterDict``, whose keys are attributes): "training", "forward", "to", "_parameters", ..."""
    return frozenset(dir(torch.nn.ModuleDict)) | frozenset(dir(torch.nn.ParameterDict)) | frozenset(
        vars(torch.nn.Module()))


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")
    if name == "__base__":
        raise ValueError("adapter name '__base__' is reserved: adapter_names / mixed_batch take it for rows that run "
                         "the base model (PEFT's name); pick another name")
    if name in _taken_names():  # checked before anything changes (PEFT, keeping nn.ModuleDicts, fails half way
        # through on most of these names, e.g. "training", "forward", "to"; a few it takes: "get", "copy")
        raise ValueError(f"adapter name {name!r} is an attribute of torch's nn.ModuleDict / nn.ParameterDict, which "
                         "hold fastpeft's adapters by name; pick another name")
    return name


def check_module_list(v, name: str):
    """None or a list of module names (not a bare string)."""
    if v is None:
        return None
    if isinstance(v, str) or not all(isinstance(s, str) and s for s in v):
        raise TypeError(f"{name} must be a list of module names or None, got {v!r}")
    return list(v)


def check_layers(layers_to_transform, layers_pattern, target_modules):
    """PEFT's rules for ``layers_to_transform`` (None, an int >= 0 or a list of them) and ``layers_pattern`` (None, a
    regex or a list of them), which filter a target_modules list, never a regex string ("all-linear", which PEFT
    refuses here, is taken as the list of every linear layer's name)."""
    idx = layers_to_transform
    items = idx if isinstance(idx, (list, tuple)) else [idx] if idx is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"layers_to_transform must be None, an int >= 0 or a list of them, got {idx!r}")
    pats = layers_pattern if isinstance(layers_pattern, (list, tuple)) else [layers_pattern] if layers_pattern else []
    for pat in pats:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"layers_pattern must be None, a non-empty str or a list of them, got {layers_pattern!r}")
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"layers_pattern {pat!r} is not a valid regex: {e}") from None
    if pats and idx is None:
        raise ValueError(f"layers_pattern={layers_pattern!r} needs layers_to_transform (the block indices to adapt)")
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear" and (items or pats):
        raise ValueError(f"layers_to_transform / layers_pattern cannot be used with a regex target_modules "
                         f"({target_modules!r}), as in PEFT: put the block indices into the regex, or pass a list")


def check_token_indices(v):
    """PEFT's ``trainable_token_indices``: None, a list of token ids (the input embeddings'), or a dict of module
    name -> such a list; each list non-empty, ints >= 0, without repeats. Returns it with tuples made lists."""
    if v is None:
        return None

    def ids(lst, what):
        if not isinstance(lst, (list, tuple)) or not lst or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lst):
            raise ValueError(f"{what} must be a non-empty list of token ids (ints >= 0), got {lst!r}")
        if len(set(lst)) != len(lst):
            raise ValueError(f"{what} lists token ids more than once: {sorted({i for i in lst if lst.count(i) > 1})}")
        return list(lst)

    if isinstance(v, dict):
        if not v or not all(isinstance(k, str) and k for k in v):
            raise ValueError(f"trainable_token_indices as a dict maps module names to token ids, got {v!r}")
        return {k: ids(lst, f"trainable_token_indices[{k!r}]") for k, lst in v.items()}
    return ids(v, "trainable_token_indices")


def check_sparse_options(density, block_size, selection, prefix: str = "", allow_zero: bool = False) -> None:
    """A sparse delta's settings: density in (0, 1] ([0, 1] with ``allow_zero``: none), block size, selection; the
    errors name the arguments as the caller has them (``prefix`` "sparse_": LoraConfig's / FastLoRALinear's)."""
    ok_density = isinstance(density, (int, float)) and not isinstance(density, bool) and \
        (0.0 <= float(density) <= 1.0 if allow_zero else 0.0 < float(density) <= 1.0)
    if not ok_density:
        raise ValueError(f"{prefix}density must be a float in {'[0, 1]' if allow_zero else '(0, 1]'}, got {density!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{prefix}block_size must be a positive int, got {block_size!r}")
    check_choice(selection, SELECTIONS, f"{prefix}selection")


def check_in_features(x: torch.Tensor, in_features: int) -> None:
    """A layer's input: a tensor whose last dim is ``in_features`` (the message names both sizes)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor of shape (..., {in_features}), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"input's last dim must be in_features={in_features}, got {got}")


def check_embedding(embedding, name: str = "embedding") -> None:
    """An ``nn.Embedding`` fastpeft's embedding LoRA can wrap: nn.Embedding's own forward, or a transformers scaled
    embedding (a forward of its own multiplying the lookup by a one-element ``embed_scale``: Gemma 3's), no
    ``max_norm`` (its lookup renormalises the table's rows in place), dense gradients."""
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(f"{name} must be an nn.Embedding, got {type(embedding).__name__}")
    scale = getattr(embedding, "embed_scale", None)
    scaled = isinstance(scale, (int, float)) or isinstance(scale, torch.Tensor) and scale.numel() == 1
    if type(embedding).forward is not torch.nn.Embedding.forward and not (
            scaled and [n for n, _ in embedding.named_parameters()] == ["weight"]
            and all(n == "embed_scale" for n, _ in embedding.named_buffers()) and not embedding._modules):
        raise TypeError(f"{name} is a {type(embedding).__module__}.{type(embedding).__name__}, an nn.Embedding with a "
                        "forward of its own that is not a plain transformers scaled embedding (a one-element "
                        "embed_scale, no other parameters, buffers or submodules), which fastpeft's layer would "
                        "bypass")
    if embedding.max_norm is not None:
        raise ValueError(f"{name} has max_norm={embedding.max_norm!r}: its lookups renormalise rows in place; "
                         "fastpeft's embedding LoRA takes max_norm=None only")
    if embedding.sparse:
        raise ValueError(f"{name} has sparse=True (sparse gradients); fastpeft's embedding LoRA takes sparse=False "
                         "only")


def check_embedding_ids(x, num_embeddings: int) -> None:
    """An embedding layer's input: an int32 / int64 tensor of ids (their range is the lookup's to check)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"input must be an int64 / int32 tensor of ids in [0, {num_embeddings}), got {got}")


def check_linear(linear, name: str = "linear") -> None:
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(linear).__name__}")


def check_file_tensors(expected_shapes: dict, weights: dict, directory) -> None:
    """An adapter file's tensors: exactly the expected keys, each of its expected shape, floating point."""
    missing = sorted(set(expected_shapes) - set(weights))
    unexpected = sorted(set(weights) - set(expected_shapes))
    if missing or unexpected:
        raise ValueError(f"adapter {os.fspath(directory)!r} does not fit the model: missing keys "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected keys "
                         f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k, shape in expected_shapes.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise ValueError(f"adapter tensor {k!r} must have shape {tuple(shape)} for this model, got "
                             f"{tuple(weights[k].shape)}")
        if not weights[k].is_floating_point():
            raise ValueError(f"adapter tensor {k!r} must be floating point, got {weights[k].dtype}")


def check_shape(t: torch.Tensor, expected: tuple, name: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_tensor(t, name: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_same_device_dtype(ref_name: str, ref: torch.Tensor, check_dtype: bool = True, **others) -> None:
    """Every tensor in ``others`` (None allowed) is on ``ref``'s device and, if asked, of its dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
        if check_dtype and t.dtype != ref.dtype:
            raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device type (False for types without autocast, such as "meta", for
    which ``torch.is_autocast_enabled`` raises)."""
    # CUDA and CPU first, without ``x.device.type`` (0.17 µs) and the availability lookup (0.15 µs): this runs
    # in every lora_linear call's cache key.
    if x.is_cuda:
        return torch.is_autocast_enabled("cuda")
    if x.is_cpu:
        return torch.is_autocast_enabled("cpu")
    t = x.device.type
    return torch.amp.is_autocast_available(t) and torch.is_autocast_enabled(t)


# The lora_linear argument sets that passed the checks, by key, each with its memo (see
# check_lora_linear_args): a decode step repeats a few shapes, and the checks read nothing the key does not
# hold (types, shapes, dtypes, devices, autocast, the two numbers).
_LORA_ARGS_OK: dict = {}


def _lora_args_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """All that ``check_lora_linear_args`` reads of its arguments, or None (not cached) for anything but
    tensors and plain numbers, and while torch.compile traces (dynamo would guard on the cache)."""
    if type(scaling) not in (float, int) or type(dropout_p) not in (float, int) or _compiling():
        return None
    try:
        return (type(x), x.shape, x.dtype, x.device, type(weight), weight.shape, weight.dtype, weight.device,
                type(lora_A), lora_A.shape, lora_A.dtype, lora_A.device,
                type(lora_B), lora_B.shape, lora_B.dtype, lora_B.device,
                None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device),
                autocast_on(x), scaling, dropout_p)
    except AttributeError:
        return None


def _checked_once(cache_name: str, key, check, *args) -> dict | None:
    """``check(*args)`` unless the argument set ``key`` passed before; the set's memo (a dict kept as long as
    its cache entry), or None when ``key`` is None (not cacheable, or torch.compile tracing: checked every time).
    The cache is this module's dict named ``cache_name``, looked up only for a key: a traced call must not touch
    it (torch 2.11's dynamo guards on the length of a dict passed in, and recompiles after every eager call
    that adds an entry)."""
    if key is None:
        check(*args)
        return None
    cache = globals()[cache_name]
    memo = cache.get(key)
    if memo is not None:
        return memo
    check(*args)
    if len(cache) >= 4096:  # a bound for programs that sweep shapes
        cache.clear()
    memo = cache[key] = {}
    return memo


def check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> dict | None:
    """Shapes, dtypes and devices of a ``lora_linear`` call (see API.md for the conventions); an argument
    set that passed once (same types, shapes, dtypes, devices, numbers) passes again without the checks.

    Returns the argument set's memo: a dict that lives as long as the set's cache entry, where a caller keeps
    what it derives from what the key holds and nothing else (``lora_linear``: the backend resolved for these
    tensors, under its own key of the asked name and the kernel state). None when the set is not cached."""
    key = _lora_args_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return _checked_once("_LORA_ARGS_OK", key, _check_lora_linear_args, x, weight, bias, lora_A, lora_B, scaling,
                         dropout_p)


def _check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    check_tensor(x, "x")
    check_tensor(weight, "weight", ndim=2)
    check_tensor(lora_A, "lora_A", ndim=2)
    check_tensor(lora_B, "lora_B", ndim=2)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    out_f, in_f = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"x's last dim must be in_features={in_f}, got {got} (x shape {tuple(x.shape)})")
    r = lora_A.shape[0]
    check_shape(lora_A, (r, in_f), "lora_A")
    check_shape(lora_B, (out_f, r), "lora_B")
    if bias is not None:
        check_shape(bias, (out_f,), "bias")
    _check_dtypes_and_numbers(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


def _check_dtypes_and_numbers(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """x of a float dtype, the tensors on its device and of its dtype (outside autocast), scaling a finite Python
    number and dropout_p a rate: what the LoRA ops' argument checks share."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16, bfloat16 (or float64 on the reference backend), got {x.dtype}")
    # Under autocast the parameters may legitimately be of another dtype than x (fp32 master weights,
    # bf16 activations): the matmuls cast them, as nn.Linear's would.
    check_same_device_dtype("x", x, not autocast_on(x), weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if isinstance(scaling, torch.Tensor):
        raise TypeError(f"scaling must be a Python number, got a tensor of shape {tuple(scaling.shape)}")
    check_finite_number(scaling, "scaling")
    check_dropout(dropout_p, "dropout_p")


_QLORA_ARGS_OK: dict = {}  # as _LORA_ARGS_OK, for check_qlora_linear_args


def check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p) -> dict | None:
    """``qlora_linear``'s arguments: qweight a ``fastpeft.quant.QuantizedWeight`` (out, in), the rest as for
    ``lora_linear`` (any floating dtype: they are cast to the layer's compute dtype), all on qweight's device.
    Cached as ``check_lora_linear_args``: a set that passed (same types, shapes, dtypes, devices, numbers, the
    weight's shape and device) passes again without the checks; returns its memo (None when not cached)."""
    key = None
    if type(scaling) in (float, int) and type(dropout_p) in (float, int) and not _compiling():
        try:
            key = (type(qweight), qweight.shape, qweight.data.device,
                   *((type(t), t.shape, t.dtype, t.device) for t in (x, lora_A, lora_B)),
                   None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device), scaling, dropout_p)
        except AttributeError:
            key = None
    return _checked_once("_QLORA_ARGS_OK", key, _check_qlora_linear_args, x, qweight, bias, lora_A, lora_B, scaling,
                         dropout_p)


def _check_qlora_linear_args(x, qweight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    from .quant import QuantizedWeight

    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastpeft.quant.QuantizedWeight (QuantizedWeight.from_module(layer)), "
                        f"got {type(qweight).__name__}")
    out_f, in_f = qweight.shape
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is None and name == "bias":
            continue
        check_tensor(t, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != qweight.device:
            raise ValueError(f"{name} must be on the quantized weight's device {qweight.device}, got {t.device}")
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x's last dim must be in_features={in_f}, got "
                         f"{x.shape[-1] if x.dim() else '0-d tensor'}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape (r, {in_f}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, lora_A.shape[0]):
        raise ValueError(f"lora_B must have shape ({out_f}, {lora_A.shape[0]}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    check_finite_number(scaling, "scaling")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def expand_adapter_ids(adapter_ids, x: torch.Tensor, n: int, check_range: bool = True) -> torch.Tensor:
    """Per-row ids (x.shape[:-1]) from per-row or per-sequence ((x.shape[0],)) ids, checked.

    The range check reads the ids' min and max (a host sync on GPUs); callers that built the ids
    themselves (``mixed_batch``) skip it with ``check_range=False``.
    """
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"adapter_ids must be an int64/int32 tensor, got "
                        f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids must be on x's device {x.device}, got {adapter_ids.device}")
    rows = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == rows:
        ids = adapter_ids
    elif x.dim() >= 2 and tuple(adapter_ids.shape) == (x.shape[0],):
        # int64 before the expand, which stays a view (stride 0 past the first dim): the kernels read from the
        # strides that each sequence's rows share one adapter (ops.multi.sequence_rows)
        ids = adapter_ids.to(torch.int64).view((-1,) + (1,) * (x.dim() - 2)).expand(rows)
    else:
        raise ValueError(f"adapter_ids must have shape {rows} (per row) or ({x.shape[0]},) "
                         f"(per sequence), got {tuple(adapter_ids.shape)}")
    if check_range and ids.numel() and not _skip_value_checks():
        lo, hi = (int(v) for v in torch.aminmax(_host_values(ids)))
        if lo < -1 or hi >= n:
            raise ValueError(f"adapter_ids must be in [-1, {n - 1}] (-1 = base only, {n} adapters), "
                             f"got values in [{lo}, {hi}]")
    return ids.to(torch.int64)


def check_lora_multi_args(x, weight, bias, lora_A_stack, lora_B_stack, scalings, ranks, dropout_p,
                          check_values: bool = True) -> int:
    """Shapes, dtypes and devices of a ``lora_linear_multi`` call, and (``check_values``: a host sync each)
    the ranges of ranks and dropout_p; returns the number of adapters."""
    check_tensor(lora_A_stack, "lora_A_stack", ndim=3)
    check_tensor(lora_B_stack, "lora_B_stack", ndim=3)
    n, r_max, _ = lora_A_stack.shape
    check_tensor(weight, "weight", ndim=2)
    out_f, in_f = weight.shape
    check_shape(lora_A_stack, (n, r_max, in_f), "lora_A_stack")
    check_shape(lora_B_stack, (n, out_f, r_max), "lora_B_stack")
    # The single-adapter checks cover x, weight, bias and the dtypes / devices of the stacks (adapter 0's).
    check_lora_linear_args(x, weight, bias, lora_A_stack[0] if n else weight.new_empty(0, in_f),
                           lora_B_stack[0] if n else weight.new_empty(out_f, 0), 1.0, 0.0)
    for name, t in (("scalings", scalings), ("ranks", ranks), ("dropout_p", dropout_p)):
        if t is None:
            continue
        check_tensor(t, name, ndim=1)
        check_shape(t, (n,), name)
        check_same_device_dtype("lora_A_stack", lora_A_stack, False, **{name: t})
    if ranks is not None:
        if ranks.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ranks must be an int64/int32 tensor, got {ranks.dtype}")
        if n and check_values and not _skip_value_checks() and (int(ranks.min()) < 1 or int(ranks.max()) > r_max):
            raise ValueError(f"ranks must be in [1, r_max={r_max}], got values in [{int(ranks.min())}, "
                             f"{int(ranks.max())}]")
    if dropout_p is not None and n and check_values and not _skip_value_checks() and (
            float(dropout_p.min()) < 0.0 or float(dropout_p.max()) >= 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got values in [{float(dropout_p.min())}, "
                         f"{float(dropout_p.max())}]")
    return n


def check_sparse_delta(delta_indices, delta_values, out_features: int, in_features: int, block_size: int,
                       check_order: bool = True) -> None:
    """Shapes, dtypes and (with ``check_order``, a host sync) range / order / uniqueness of a sparse delta.

    block_size 1: indices (nnz,) flat row-major into (out, in), sorted and unique; values (nnz,).
    block_size b: indices (nblocks, 2) block (row, col), sorted row-major and unique; values (nblocks, b, b).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    check_tensor(delta_indices, "delta_indices")
    check_tensor(delta_values, "delta_values")
    if delta_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"delta_indices must be int32 or int64, got {delta_indices.dtype}")
    if not delta_values.is_floating_point():
        raise TypeError(f"delta_values must be a floating-point tensor, got {delta_values.dtype}")
    if delta_values.device != delta_indices.device:
        raise ValueError(f"delta_values must be on delta_indices' device {delta_indices.device}, got {delta_values.device}")
    check_order = check_order and not _skip_value_checks()
    b = block_size
    if b == 1:
        if delta_indices.dim() != 1:
            raise ValueError(f"delta_indices must be 1-D (nnz,) flat indices for block_size=1, got shape "
                             f"{tuple(delta_indices.shape)}")
        check_shape(delta_values, (delta_indices.shape[0],), "delta_values")
        keys, limit = delta_indices.long(), out_features * in_features
        if check_order and keys.numel():
            lo, hi = int(keys.min()), int(keys.max())
            if lo < 0 or hi >= limit:
                raise ValueError(f"delta_indices must be in [0, {limit}) for a ({out_features}, {in_features}) "
                                 f"weight, got values in [{lo}, {hi}]")
    else:
        if delta_indices.dim() != 2 or delta_indices.shape[1] != 2:
            raise ValueError(f"delta_indices must have shape (nblocks, 2) of block (row, col) for block_size={b}, "
                             f"got {tuple(delta_indices.shape)}")
        check_shape(delta_values, (delta_indices.shape[0], b, b), "delta_values")
        rb, cb = -(-out_features // b), -(-in_features // b)
        if check_order and delta_indices.numel():
            for col, lim, what in ((0, rb, "block rows"), (1, cb, "block columns")):
                lo, hi = int(delta_indices[:, col].min()), int(delta_indices[:, col].max())
                if lo < 0 or hi >= lim:
                    raise ValueError(f"delta_indices' {what} must be in [0, {lim}) for a ({out_features}, "
                                     f"{in_features}) weight in blocks of {b}, got values in [{lo}, {hi}]")
        keys = delta_indices[:, 0].long() * cb + delta_indices[:, 1].long()
    if check_order and keys.numel() > 1:
        step = keys[1:] - keys[:-1]
        if bool((step == 0).any()):
            i = int((step == 0).nonzero()[0, 0])
            raise ValueError(f"delta_indices must be unique, got {_entry(delta_indices, i)} twice (positions {i} "
                             f"and {i + 1})")
        if bool((step < 0).any()):
            i = int((step < 0).nonzero()[0, 0])
            raise ValueError(f"delta_indices must be sorted (row-major), got {_entry(delta_indices, i)} at position "
                             f"{i} before {_entry(delta_indices, i + 1)}")


def _entry(indices: torch.Tensor, i: int):
    """Entry i of sparse-delta indices for a message: a flat index, or a block (row, col)."""
    return int(indices[i]) if indices.dim() == 1 else tuple(int(v) for v in indices[i])


def check_seed(seed) -> None:
    """A dropout seed: None (drawn) or an int in [0, 2**63)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")


_DORA_ARGS_OK: dict = {}  # as _LORA_ARGS_OK, for check_dora_linear_args


def _tensor_key(t):
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, seed,
                           dropout_mode, weight_sq_norm) -> dict | None:
    """A ``dora_linear`` call: ``lora_linear``'s checks, and the magnitude (out,), the dropout mode and the
    cached squared row norms of W (out,) or None. Cached as ``check_lora_linear_args`` (the seed, which changes
    from call to call, is checked every time); returns the argument set's memo, None when it is not cached."""
    check_seed(seed)
    key = _lora_args_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if key is not None and type(training) is bool and type(dropout_mode) is str:
        try:
            key += (_tensor_key(magnitude), _tensor_key(weight_sq_norm), training, dropout_mode)
        except AttributeError:
            key = None
    else:
        key = None
    return _checked_once("_DORA_ARGS_OK", key, _check_dora_linear_args, x, weight, bias, lora_A, lora_B, magnitude,
                         scaling, dropout_p, training, dropout_mode, weight_sq_norm)


def _check_dora_linear_args(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, dropout_mode,
                            weight_sq_norm) -> None:
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    out_f = weight.shape[0]
    check_tensor(magnitude, "magnitude", ndim=1)
    check_shape(magnitude, (out_f,), "magnitude")
    if not magnitude.is_floating_point():
        raise ValueError(f"magnitude must be floating point, got {magnitude.dtype}")
    check_same_device_dtype("x", x, False, magnitude=magnitude)
    if weight_sq_norm is not None:
        check_tensor(weight_sq_norm, "weight_sq_norm", ndim=1)
        check_shape(weight_sq_norm, (out_f,), "weight_sq_norm")
        if not weight_sq_norm.is_floating_point():
            raise ValueError(f"weight_sq_norm must be floating point, got {weight_sq_norm.dtype}")
        check_same_device_dtype("x", x, False, weight_sq_norm=weight_sq_norm)
    check_bool(training, "training")
    check_choice(dropout_mode, DORA_DROPOUT_MODES, "dropout_mode")


def check_dora_options(use_dora, sparse_density) -> None:
    """``use_dora`` is a bool, and not combined with a sparse delta (RoSA)."""
    check_bool(use_dora, "use_dora")
    if use_dora and isinstance(sparse_density, (int, float)) and sparse_density > 0:
        raise ValueError(f"use_dora=True with sparse_density={sparse_density} (RoSA) is not supported: a DoRA "
                         "adapter has no sparse delta; use one or the other")


def routed_batch(n_names: int, x, k: int = 1) -> int:
    """How many rows of a layer's input x (batch, ..., in) each of ``mixed_batch``'s ``n_names`` names (one per
    sequence) covers: 1, or the layer's block's ``rows_per_sequence`` k when the batch is k times the names
    (generate's expansion of each sequence into k consecutive rows: ``num_beams`` / ``num_return_sequences``).
    Anything else raises: a batch that merely happens to be a multiple is not taken for an expansion."""
    batch = x.shape[0] if x.dim() >= 2 else None
    if batch == n_names:
        return 1
    if k > 1 and batch == n_names * k:
        return k
    hint = (f" or {n_names * k} (rows_per_sequence={k})" if k > 1 else
            "; inside generate with num_beams / num_return_sequences = k, give mixed_batch rows_per_sequence=k")
    raise ValueError(f"mixed_batch was given {n_names} adapter_names (one per sequence), but this layer's input "
                     f"has batch size {batch if batch is not None else 'none'} (shape {tuple(x.shape)}), expected "
                     f"{n_names}{hint}")


def up_projection(experts) -> str:
    """The name of a transformers experts module's first expert weight: ``gate_up_proj`` (gated) or ``up_proj``."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def _check_integer(t: torch.Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def experts_reason(experts) -> str | None:
    """Why ``experts`` is not a transformers experts module ``lora_experts`` computes (None: it is one): a module of
    ``transformers.integrations.use_experts_implementation`` (transformers >= 5: Qwen3-MoE, Mixtral, gpt-oss, ...),
    whose expert weights are 3-D Parameters (E, out, in) (or (E, in, out), ``is_transposed``), with its flags."""
    name = type(experts).__name__
    for attr in ("num_experts", "has_gate", "has_bias", "is_transposed"):
        if not hasattr(experts, attr):
            return (f"{name} is not a transformers experts module (no {attr!r}: a class decorated with "
                    "transformers.integrations.use_experts_implementation, transformers >= 5)")
    if getattr(experts, "_is_expert_parallel", False):
        return f"{name} is sharded for expert parallelism (routing holds sentinel ids)"
    if not isinstance(experts.num_experts, int) or experts.num_experts < 1:
        return f"{name}.num_experts is {experts.num_experts!r}, not a positive int"
    up = up_projection(experts)
    for p in (up, "down_proj"):
        w = getattr(experts, p, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != experts.num_experts:
            return f"{name}.{p} is not a 3-D tensor of {experts.num_experts} experts"
        if not w.is_floating_point():
            return f"{name}.{p} is a {type(w).__name__} of dtype {w.dtype} (a quantized expert weight)"
        n_out = w.shape[2] if experts.is_transposed else w.shape[1]
        b = getattr(experts, p + "_bias", None) if experts.has_bias else None
        if experts.has_bias and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0], n_out)):
            return f"{name}.{p}_bias is not an (experts, out) = ({w.shape[0]}, {n_out}) tensor"
    gate = "_apply_gate" if experts.has_gate else "act_fn"
    if not callable(getattr(experts, gate, None)):
        return f"{name} has no {gate}"
    return None


def check_lora_experts_args(experts, hidden_states, top_k_index, top_k_weights, adapters, adapter_ids=None,
                            check_ids=True) -> dict:
    """The checks of ``fastpeft.lora_experts``; returns ``adapters`` as {parameter name: [(A, B, s) or None, ...]}."""
    why = experts_reason(experts)
    if why is not None:
        raise TypeError(f"experts: {why}")
    check_tensor(hidden_states, "hidden_states", 2)
    check_tensor(top_k_index, "top_k_index", 2)
    check_tensor(top_k_weights, "top_k_weights")
    _check_integer(top_k_index, "top_k_index")
    if top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"top_k_index must have one row per row of hidden_states ({hidden_states.shape[0]}), got "
                         f"shape {tuple(top_k_index.shape)}")
    if top_k_weights.shape != top_k_index.shape or not top_k_weights.is_floating_point():
        raise ValueError(f"top_k_weights must be a float tensor of top_k_index's shape {tuple(top_k_index.shape)}, got "
                         f"{top_k_weights.dtype} of shape {tuple(top_k_weights.shape)}")
    check_same_device_dtype("hidden_states", hidden_states, False, top_k_index=top_k_index,
                            top_k_weights=top_k_weights)
    up = up_projection(experts)
    w_up = getattr(experts, up)
    hidden = w_up.shape[1] if experts.is_transposed else w_up.shape[2]
    if hidden_states.shape[1] != hidden:
        raise ValueError(f"hidden_states' last dim must be {type(experts).__name__}'s hidden size {hidden} (its "
                         f"{up} {tuple(w_up.shape)}), got {hidden_states.shape[1]}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a float tensor, got {hidden_states.dtype}")
    check_same_device_dtype("hidden_states", hidden_states, False, **{up: w_up})
    adapters = {} if adapters is None else adapters
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be a dict of parameter name -> [(lora_A, lora_B, scaling), ...], got "
                        f"{type(adapters).__name__}")
    out = {}
    for p, terms in adapters.items():
        if p not in (up, "down_proj"):
            raise ValueError(f"adapters: {p!r} is not an expert weight of {type(experts).__name__}; expected "
                             f"{up!r} or 'down_proj'")
        w = getattr(experts, p)
        n_e, n_out, n_in = (w.shape[0], w.shape[2], w.shape[1]) if experts.is_transposed else tuple(w.shape)
        out[p] = []
        if not isinstance(terms, (list, tuple)):
            raise TypeError(f"adapters[{p!r}] must be a list of (lora_A, lora_B, scaling), got {type(terms).__name__}")
        for i, term in enumerate(terms):
            if term is None:  # (an adapter without this weight, in a batch of several adapters)
                out[p].append(None)
                continue
            if not isinstance(term, (tuple, list)) or len(term) != 3:
                raise TypeError(f"adapters[{p!r}][{i}] must be (lora_A, lora_B, scaling), got {type(term).__name__}")
            a, b, s = term
            check_tensor(a, f"adapters[{p!r}][{i}] lora_A", 3)
            check_tensor(b, f"adapters[{p!r}][{i}] lora_B", 3)
            r = a.shape[1]
            if a.shape != (n_e, r, n_in) or b.shape != (n_e, n_out, r):
                raise ValueError(f"adapters[{p!r}][{i}]: lora_A must be (experts, r, in) = ({n_e}, r, {n_in}) and "
                                 f"lora_B (experts, out, r) = ({n_e}, {n_out}, r), got {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise TypeError(f"adapters[{p!r}][{i}]: lora_A and lora_B must be float tensors, got {a.dtype} / "
                                f"{b.dtype}")
            check_same_device_dtype(f"{type(experts).__name__}.{p}", w, False, lora_A=a, lora_B=b)
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise TypeError(f"adapters[{p!r}][{i}]: scaling must be a number, got {s!r}")
            out[p].append((a, b, float(s)))
    if adapter_ids is not None:
        check_tensor(adapter_ids, "adapter_ids", 1)
        _check_integer(adapter_ids, "adapter_ids")
        if adapter_ids.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"adapter_ids must have one id per row of hidden_states ({hidden_states.shape[0]}), got "
                             f"shape {tuple(adapter_ids.shape)}")
        check_same_device_dtype("hidden_states", hidden_states, False, adapter_ids=adapter_ids)
        n = {len(terms) for terms in out.values()}
        if len(n) > 1:
            raise ValueError(f"with adapter_ids, every adapters list holds one entry (or None) per adapter: got lists "
                             f"of {sorted(n)} entries")
        n = n.pop() if n else 0
        if check_ids and adapter_ids.numel():
            lo, hi = (int(v) for v in torch.stack([adapter_ids.min(), adapter_ids.max()]).tolist())
            if lo < -1 or hi >= n:
                raise ValueError(f"adapter_ids must be in [-1, {n}) (-1: no adapter), got values in [{lo}, {hi}]")
    return out


def _conv_tuple(v, d: int, name: str, minimum: int) -> tuple:
    """A convolution's ``stride`` / ``dilation`` / numeric ``padding``: an int or a tuple of ``d`` ints >= minimum."""
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v,) * d
    try:  # (integer-like values torch's convolutions take: numpy ints)
        vals = tuple(operator.index(i) for i in vals if not isinstance(i, bool))
    except TypeError:
        vals = ()
    if len(vals) != d or not all(i >= minimum for i in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {d} of them, got {v!r}")
    return vals


def check_lora_conv_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, stride, padding, dilation) -> tuple:
    """``lora_conv``'s arguments; returns ``(batched, stride, padding, dilation)``: whether x has its batch dim, and
    the geometry as tuples of one int per spatial dim (padding may stay ``"same"`` / ``"valid"``)."""
    check_tensor(weight, "weight")
    if weight.dim() not in (3, 4, 5):
        raise ValueError(f"weight must be a convolution kernel (out, in, *kernel) with 1-3 spatial dims, got "
                         f"shape {tuple(weight.shape)}")
    d = weight.dim() - 2
    out_c, in_c, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    check_tensor(x, "x")
    if x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != in_c:
        raise ValueError(f"x must be (N, {in_c}, *spatial) or unbatched ({in_c}, *spatial) with {d} spatial dims "
                         f"for weight {tuple(weight.shape)}, got shape {tuple(x.shape)}")
    check_tensor(lora_A, "lora_A", ndim=d + 2)
    r = lora_A.shape[0]
    check_shape(lora_A, (r, in_c, *kernel), "lora_A")
    check_tensor(lora_B, "lora_B", ndim=2)
    check_shape(lora_B, (out_c, r), "lora_B")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        check_shape(bias, (out_c,), "bias")
    _check_dtypes_and_numbers(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    stride = _conv_tuple(stride, d, "stride", 1)
    dilation = _conv_tuple(dilation, d, "dilation", 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a tuple of {d} ints, 'same' or 'valid', got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"padding='same' needs stride 1 (as torch's convolutions), got stride {stride}")
    else:
        padding = _conv_tuple(padding, d, "padding", 0)
    return x.dim() == d + 2, stride, padding, dilation


def check_lora_bias(lora_bias, init_lora_weights, use_dora, sparse_density) -> None:
    """PEFT's ``lora_bias`` (a bias on B): a bool, with the True / False inits only and without DoRA (PEFT's rules);
    fastpeft also refuses it beside a sparse delta (RoSA)."""
    check_bool(lora_bias, "lora_bias")
    if not lora_bias:
        return
    if init_lora_weights not in (True, False):
        raise ValueError(f"lora_bias=True is only supported with init_lora_weights=True or False (PEFT's rule), got "
                         f"init_lora_weights={init_lora_weights!r}")
    if use_dora is True:
        raise ValueError("lora_bias=True is not supported with use_dora=True (PEFT's rule): use one of the two")
    if sparse_density:
        raise ValueError(f"lora_bias=True beside a sparse delta (RoSA, sparse_density={sparse_density!r}) is not "
                         "supported: use one of the two")
