"""``fastpeft.accelerate(peft_model)``: Hugging Face PEFT's LoRA layers computing through fastpeft's ops.

Each eligible ``peft.tuners.lora.Linear`` (and ``peft.tuners.lora.bnb.Linear4bit``) of the model gets its
class swapped (``__class__``) for a cached subclass, ``AcceleratedLinear`` (``AcceleratedLinear4bit``),
whose ``forward`` decides at every call:

- the active adapter(s) of a plain LoRA layer on an ``nn.Linear`` base -> ``fastpeft.lora_linear``
  (several active adapters: their factors side by side, one call);
- one active DoRA adapter (``use_dora=True``) on an ``nn.Linear`` base -> ``fastpeft.dora_linear`` with
  ``dropout_mode="exact"`` (PEFT 0.21's DoraLinearVariant: with dropout in training the DoRA term takes
  ``drop(x)``, base term included, the base layer's output stays on x; the mask is drawn only when the
  layer is in training mode, as PEFT gates it on ``module.training``);
- the active adapter(s) of a LoRA layer on a bitsandbytes ``Linear4bit`` base (NF4 / FP4, PEFT's
  ``lora.bnb.Linear4bit``) -> ``fastpeft.qlora_linear`` on the packed weight read in place, when the input,
  the adapters (and the bias) are in the layer's compute dtype: then PEFT's forward computes everything in
  that dtype too; one active DoRA adapter there (QDoRA) -> ``dora_linear`` on W dequantized for the call;
- ``adapter_names=`` (PEFT's mixed batches, ``"__base__"`` rows included) -> ``fastpeft.lora_linear_multi``;
- one active LoRA adapter of PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` (class ``AcceleratedConv2d``, ...) on a
  zero-padded, ungrouped base -> ``fastpeft.lora_conv``; a DoRA one -> ``fastpeft.dora_conv``;
- LoRA on a mixture of experts' 3-D expert weights (PEFT's ``target_parameters``: nested ``lora.ParamWrapper``
  layers, one per targeted parameter, over a transformers experts module) -> ``fastpeft.lora_experts``: the
  outermost wrapper (an accelerated subclass, named ``ParamWrapper`` as PEFT's, which finds wrappers by that name)
  computes every wrapper's active adapters on the routed rows of each
  expert, where PEFT forms ``W + s B A`` for all experts at each call; ``adapter_names`` batches too (PEFT refuses
  them there: each sequence's tokens get its adapter's terms); the inner wrappers keep PEFT's class (only the
  outermost's fallback calls them);
- anything else -> PEFT's own ``Linear.forward``, unchanged: disabled or merged adapters, LoRA variants
  other than DoRA (aLoRA, ...), DoRA with several active adapters or on an int8 base, ``lora_bias`` with DoRA, on
  a quantized base or in an ``adapter_names`` batch (elsewhere ``s b_B`` joins the layer's bias),
  hooks on the base layer or on the LoRA factors (accelerate's offload hooks included), parameters of other
  dtypes than the input outside autocast (fp32 adapters on a bf16 base: PEFT computes the LoRA branch in
  fp32; the same on a 4-bit base with another compute dtype), autocast on a 4-bit base, a 4-bit layer in eval
  mode on the CPU without grad (bnb's own CPU inference kernel, on a weight it repacks), several active adapters
  with dropout in training (PEFT draws one mask per adapter), extra forward arguments. Int8 bases
  (``lora.bnb.Linear8bitLt``) stay on PEFT's forward: bnb's LLM.int8 matmul quantizes the input too, which
  ``qlora_linear`` (W8A16) does not, so the outputs would not be PEFT's to float rounding.

The layers stay PEFT ``LoraLayer`` instances with all their state, so ``save_pretrained``, ``merge_adapter``,
``merge_and_unload``, ``set_adapter``, ``disable_adapter()``, ``add_adapter`` / ``load_adapter`` and
``cast_input_dtype_enabled`` behave as in PEFT. Dropout: PEFT's rate, fastpeft's seeded mask (recomputed in
backward, never stored), so a training step matches PEFT's in distribution, not bit for bit; with dropout
off (rate 0, or eval mode) outputs and gradients equal PEFT's (DoRA's magnitude included).

Kept between calls, in the layer's ``__dict__`` (``restore``, PEFT's merge / unmerge and ``.to()`` drop them): a
4-bit layer's ``QuantizedWeight`` view (``fastpeft.quant.kept_quantized_weight``, ``QLoRALinear``'s key), and a
DoRA layer's norm and m / norm for calls with nothing to differentiate (``dora_linear``'s ``norm_cache``, keyed on
W, A, B, m and the scaling, so ``set_adapter``, loaded or in-place written weights take effect at the next call).
"""
from __future__ import annotations

import collections
import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _torch_module

from ._checks import experts_reason, up_projection
from .functional import dora_conv, dora_linear, lora_conv, lora_experts, lora_linear, lora_linear_multi, qlora_linear
from .hf import _InstanceMethod
from .layers import conv_reason, dilated
from .ops.common import cast_params, held, kept_state, kept_transpose
from .quant import (_bnb_class_name, bnb_cpu_serves, call_buffer, conv1d_class, dequantize_weight,
                    guard_repacked_layers, is_conv1d, kept_quantized_weight, own_forward, unpack_for_grad)
from .ops.experts import grouped_mm_refusal, peft_expert_factors
from .reference import func_transforms_active, tracing_or_transformed

_KERNEL_OR_REF_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_classes: dict = {}  # PEFT's lora.Linear class -> its accelerated subclass (peft is imported lazily)
_FASTPEFT = "fastpeft"  # the runtime path counted for calls that ran on fastpeft's ops


# ---------------------------------------------------------------------------------------------------------
# The accelerated layer
# ---------------------------------------------------------------------------------------------------------
def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` on fastpeft's ops where it can be, PEFT's own forward elsewhere."""
    why = runtime_fallback_reason(self, x, args, kwargs)
    _count(self, why)
    if why is not None:
        return self._fastpeft_original.forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    names = kwargs.get("adapter_names")
    if names is not None:
        return _mixed_batch(self, x, names)
    return _active(self, x)


def _count(self, why: str | None) -> None:
    """One call of a patched layer in ``report.calls()``, by path: fastpeft's, or the reason PEFT's forward ran (not
    while torch.compile traces: the count would run once, at tracing)."""
    if not torch.compiler.is_compiling():
        calls = self.__dict__.get("_fastpeft_calls")
        if calls is not None:
            calls[why or _FASTPEFT] += 1


def _quantized_weight(self):
    """The 4-bit base weight read in place (``QuantizedWeight``), kept on the layer while bnb's objects stay the
    same (``fastpeft.quant.kept_quantized_weight``, the key of ``QLoRALinear.quantized_weight``): PEFT's merge /
    unmerge requantize into a new Parameter, ``.to()`` and bnb's CPU repacking swap the data."""
    d = self.__dict__
    kept = d.get("_fastpeft_qw")
    qw, new = kept_quantized_weight(self._modules["base_layer"], kept)
    if new is not kept:
        d["_fastpeft_qw"] = new
    return qw


def _norm_cache(self) -> dict | None:
    """The dict where ``dora_linear`` keeps DoRA's norm and m / norm for this layer's calls with nothing to
    differentiate, keyed on W, A, B, m, the scaling (``fastpeft.ops.dora._cached_gain``): another adapter
    (``set_adapter``), loaded or in-place written weights recompute it at the next call. None while torch.compile
    traces (nothing kept then, as the op computes the norm in the graph)."""
    if torch.compiler.is_compiling() or self.training:  # training mode: afresh at every call, as PEFT
        return None
    cache = self.__dict__.get("_fastpeft_dora")
    if cache is None:
        cache = self.__dict__["_fastpeft_dora"] = {}
    return cache


def _dropout(module) -> tuple:
    """``(p, training)`` of a PEFT dropout module (nn.Dropout or nn.Identity)."""
    if isinstance(module, nn.Dropout):
        return float(module.p), bool(module.training)
    return 0.0, False


def _is_dora(self, name: str) -> bool:
    return bool(self.use_dora.get(name, False))


_COMPUTES_LINEAR: dict = {}


def _computes_linear(base: nn.Module) -> bool:
    """Whether ``base`` computes x Wᵀ + b as nn.Linear does (nn.Linear, or a subclass keeping its forward or known
    to compute that: Falcon's FalconLinear, ``quant.own_forward``), not bitsandbytes' layers; by class, looked up
    once (a call's host path reads it). Before 2026-12-01 only nn.Linear itself: Falcon's layers stayed on PEFT."""
    cls = type(base)
    hit = _COMPUTES_LINEAR.get(cls)
    if hit is None:
        hit = _COMPUTES_LINEAR[cls] = (isinstance(base, nn.Linear) and _bnb_class_name(base) is None
                                    and not own_forward(base))
    return hit


def _dense(base: nn.Module) -> bool:
    """A base layer fastpeft computes from its dense weight: ``_computes_linear`` or a Conv1D."""
    return _computes_linear(base) or is_conv1d(base)


def _weight(self, base: nn.Module) -> torch.Tensor:
    """W (out, in) of a dense base layer: its weight, or a Conv1D's (in, out) weight transposed (a view, read in
    place: the kernels take any strides, TMA's descriptors either row layout). Between no-grad calls in eval mode
    the same view object is returned while the Parameter and its memory are (DoRA's norm cache keys on identity)."""
    w = _param(base, "weight")
    if not is_conv1d(base):
        return w
    return kept_transpose(self.__dict__, "_fastpeft_wt", w, keep=not self.training)


def _fan_in_fan_out_reason(self, base: nn.Module) -> str | None:
    """Why PEFT's ``fan_in_fan_out`` flag and the base layer disagree (None: they agree). Conv1D stores W (in, out)
    and PEFT sets the flag for it; on an nn.Linear the flag transposes only PEFT's merge, a configuration fastpeft
    leaves to PEFT's forward."""
    flag, conv = bool(getattr(self, "fan_in_fan_out", False)), is_conv1d(base)
    if flag == conv:
        return None
    return "fan_in_fan_out=True on a base layer storing W (out, in)" if flag else \
        "fan_in_fan_out=False on a transformers Conv1D base layer (W stored (in, out))"


def _active(self, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + sum_a s_a B_a A_a drop_a(x)`` over the active adapters, one fused call (DoRA: one adapter;
    a 4-bit base: ``qlora_linear`` on its packed weight)."""
    mods = self._modules  # as in runtime_fallback_reason: no nn.Module.__getattr__ on the per-call path
    base, lora_as, lora_bs = mods["base_layer"], mods["lora_A"]._modules, mods["lora_B"]._modules
    adapters = [a for a in self.active_adapters if a in lora_as]
    quantized = not _dense(base)  # a bnb Linear4bit (runtime_fallback_reason checked it)

    bias = _param(base, "bias")

    # fp32 adapters on a bf16 / fp16 base (PEFT's autocast_adapter_dtype, its default) compute in the base's dtype
    # (a 4-bit base's compute dtype), as under autocast: cast per call, the casts kept between no-grad calls
    qw = _quantized_weight(self) if quantized else None
    kept = None if self.training else self.__dict__  # kept between no-grad calls in eval mode only, as _norm_cache
    weight = None if quantized else _weight(self, base)
    cdt = qw.compute_dtype_for(x) if quantized else weight.dtype
    # PEFT's lora_bias: B has a bias b_B, so the update is s (B u + b_B): s b_B joins the layer's bias (its gradient
    # reaches b_B through the sum)
    lora_biases = [(lora_bs[a]._parameters["bias"], float(self.scaling[a])) for a in adapters
                   if lora_bs[a]._parameters.get("bias") is not None]
    if lora_biases:  # summed in fp32 and rounded once (as PEFT rounds its fp32 branch once)
        added = sum(s * b.float() for b, s in lora_biases)
        bias = (added if bias is None else bias.float() + added).to(cdt)

    def linear(lora_a, lora_b, scaling, p, training):
        lora_a, lora_b = cast_params((lora_a, lora_b), cdt, kept, "_fastpeft_casts")
        if quantized:
            return qlora_linear(x, qw, bias, lora_a, lora_b, scaling, p, training)
        return lora_linear(x, weight, bias, lora_a, lora_b, scaling, p, training)

    if len(adapters) == 1:
        a = adapters[0]
        p, training = _dropout(mods["lora_dropout"]._modules[a])
        lora_a, lora_b = _param(lora_as[a], "weight"), _param(lora_bs[a], "weight")
        if _is_dora(self, a):
            # PEFT applies DoRA's dropout only when the LoRA layer itself is in training mode.
            lora_a, lora_b = cast_params((lora_a, lora_b), cdt, kept, "_fastpeft_casts")
            w, cache, b = weight, _norm_cache(self), bias
            if quantized:  # QDoRA: W dequantized for the call (fresh where autograd keeps it); no norm cache, since
                # the workspace's memory is every 4-bit layer's in turn
                w, cache = dequantize_weight(qw, cdt, out=call_buffer(qw, cdt, saved=torch.is_grad_enabled())), None
                b = None if bias is None else bias.to(cdt)
            y = dora_linear(x.to(cdt) if quantized else x, w, b, lora_a, lora_b, _param(_magnitude(self, a), "weight"),
                            float(self.scaling[a]), p, training and self.training, dropout_mode="exact",
                            norm_cache=cache)
            return y.to(x.dtype) if quantized else y
        return linear(lora_a, lora_b, float(self.scaling[a]), p, training)
    # Several adapters (no dropout in training: see runtime_fallback_reason): sum_a s_a B_a A_a x is one LoRA
    # update with the factors side by side, A = [A_1; A_2] (r1+r2, in), B = [s_1 B_1, s_2 B_2] (out, r1+r2).
    scalings = [float(self.scaling[a]) for a in adapters]
    same = all(s == scalings[0] for s in scalings)
    lora_a = torch.cat([lora_as[a].weight.to(cdt) for a in adapters], 0)
    lora_b = torch.cat([lora_bs[a].weight.to(cdt) if same else lora_bs[a].weight.to(cdt) * s
                        for a, s in zip(adapters, scalings)], 1)
    return linear(lora_a, lora_b, scalings[0] if same else 1.0, 0.0, False)


def _mixed_batch(self, x: torch.Tensor, names) -> torch.Tensor:
    """PEFT's ``adapter_names`` batch: row i of x (dim 0) gets adapter ``names[i]``; ``"__base__"`` and names
    this layer lacks get the base layer only. Adapters of several ranks are zero-padded to the largest."""
    base = self.base_layer
    used = [n for n in dict.fromkeys(names) if n != "__base__" and n in self.lora_A]
    index = {n: i for i, n in enumerate(used)}
    dev = x.device
    ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64, device=dev)
    stack_a, stack_b, scalings, rank_t = _stacks(self, used, dev)
    rates = [p if training else 0.0 for p, training in (_dropout(self.lora_dropout[n]) for n in used)]
    drop_t = torch.tensor(rates, dtype=torch.float32, device=dev) if any(rates) else None
    return lora_linear_multi(x, _weight(self, base), base.bias, stack_a, stack_b, scalings, ids, rank_t,
                             dropout_p=drop_t, training=drop_t is not None, check_ids=False)


def _stacks(self, used: list, dev: torch.device) -> tuple:
    """``(A stack (n, r_max, in), B stack (n, out, r_max), scalings (n,) fp32, ranks (n,) int64 or None)`` of the
    adapters ``used``, zero-padded to the largest rank. Without anything to differentiate (PEFT's
    ``adapter_names`` serves inference: a generation loop calls every layer once per token) they are kept for
    the next call with the same adapters, until one of their factors changes (replaced, its data swapped, updated in
    place: the tensor version, an optimizer step) or a scaling does; with a gradient (or while compiling or under a
    torch.func transform) they are built from the Parameters at each call."""
    weights = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in used]
    grad = torch.is_grad_enabled() and any(t.requires_grad for pair in weights for t in pair)
    key = None
    if not grad and not self.training and not tracing_or_transformed():  # eval mode only (see _norm_cache)
        # the factors themselves are held by the entry and compared by identity (an id() could be reused)
        key = (tuple(used), dev, tuple(float(self.scaling[n]) for n in used),
               kept_state([t for pair in weights for t in pair]))
        hit = self.__dict__.get("_fastpeft_stacks")
        if hit is not None and hit[0] == key and all(x is y for x, y in zip(hit[1], (t for p in weights for t in p))):
            return hit[2]
    ranks = [a.shape[0] for a, _ in weights]
    r_max = max(ranks)
    dt = self._modules["base_layer"].weight.dtype  # fp32 adapters on a bf16 / fp16 base: the stacks in W's dtype
    stack_a = torch.stack([F.pad(a, (0, 0, 0, r_max - r)) for (a, _), r in zip(weights, ranks)]).to(dt)
    stack_b = torch.stack([F.pad(b, (0, r_max - r)) for (_, b), r in zip(weights, ranks)]).to(dt)
    scalings = torch.tensor([float(self.scaling[n]) for n in used], dtype=torch.float32, device=dev)
    rank_t = None if min(ranks) == r_max else torch.tensor(ranks, dtype=torch.int64, device=dev)
    out = (stack_a, stack_b, scalings, rank_t)
    if key is not None:
        factors = tuple(t for p in weights for t in p)
        self.__dict__["_fastpeft_stacks"] = (key, factors, out, held(factors))  # the batch's adapters
    return out


def _has_hooks(m: nn.Module, ignore=None) -> bool:
    """Hooks, or a replaced ``forward`` (accelerate's ``add_hook_to_module``: device maps, offloading); not
    fastpeft's own ``quant.unpack_for_grad`` (``guard_repacked_layers``), which fastpeft's path does itself, nor
    forward pre-hooks for which ``ignore(hook)`` is true."""
    pre = m._forward_pre_hooks
    return bool(m._forward_hooks or (pre and any(f is not unpack_for_grad and not (ignore and ignore(f))
                                                 for f in pre.values()))
                or m._backward_hooks or m._backward_pre_hooks or "forward" in m.__dict__)


def _peft_names_hook(f) -> bool:
    """PEFT's ``adapter_names`` pre-hook (``LoraModel._enable_peft_forward_hooks``), which it puts on every LoRA layer
    of a mixed batch: on an inner ParamWrapper it only hands the names on, and the outermost reads them."""
    return getattr(getattr(f, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook"


_HAS_ANY_GLOBAL_HOOK = getattr(_torch_module, "_has_any_global_hook", None)


def _global_hooks() -> bool:
    return bool(_HAS_ANY_GLOBAL_HOOK()) if _HAS_ANY_GLOBAL_HOOK is not None else False


_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _param(m: nn.Module, name: str):
    """``getattr(m, name)`` for a Parameter (or None) registered on m, read from ``_parameters`` without
    ``nn.Module.__getattr__`` (~0.3 µs a lookup on the per-call path); a plain attribute otherwise."""
    params = m._parameters
    return params[name] if name in params else getattr(m, name, None)


def _magnitude(self, name: str):
    """Adapter ``name``'s DoRA magnitude module (PEFT's ``lora_magnitude_vector[name]``), or None; read through
    ``_modules``, as the other per-call lookups."""
    mags = self._modules.get("lora_magnitude_vector")
    return None if mags is None else mags._modules.get(name)


def _adapter_reason(self, name: str, lora_a=None, lora_b=None, drop=None):
    """Why adapter ``name`` of this layer cannot run on fastpeft's ops (None: it can); ``lora_a`` / ``lora_b`` /
    ``drop``: its modules, when the caller has them already (looked up otherwise)."""
    if _is_peft_conv(getattr(type(self), "_fastpeft_original", type(self))):
        return _conv_adapter_reason(self, name)
    variant = self.lora_variant.get(name) if hasattr(self, "lora_variant") else None
    dora = _is_dora(self, name)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        kind = type(variant).__name__.replace("LinearVariant", "")
        return f"adapter {name!r} is a LoRA variant ({'DoRA' if kind == 'Dora' else kind})"
    if dora:
        base = self._modules["base_layer"]
        # a 4-bit base runs QDoRA (W dequantized per call); what else a quantized base needs is checked as for LoRA
        if type(base) is not nn.Linear and not is_conv1d(base) and _bnb_class_name(base) != "Linear4bit":
            return f"adapter {name!r} uses DoRA on a quantized base layer other than a 4-bit one"
        weight = getattr(_magnitude(self, name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return f"adapter {name!r} uses DoRA without a (out,) lora_magnitude_vector"
    lora_bias = bool(self.lora_bias.get(name, False))
    if lora_bias and (dora or not _dense(self._modules["base_layer"])):
        return f"adapter {name!r} has lora_bias=True ({'with DoRA' if dora else 'on a quantized base'})"
    if lora_a is None:
        lora_a, lora_b, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter {name!r} has factors of type {type(lora_a).__name__} / {type(lora_b).__name__}"
    if _param(lora_a, "bias") is not None or (_param(lora_b, "bias") is not None) != lora_bias:
        return (f"adapter {name!r}: lora_A {'with' if _param(lora_a, 'bias') is not None else 'without'} a bias, "
                f"lora_B {'with' if _param(lora_b, 'bias') is not None else 'without'} one, for lora_bias={lora_bias}")
    if type(drop) not in (nn.Dropout, nn.Identity) or (isinstance(drop, nn.Dropout) and not 0.0 <= drop.p < 1.0):
        return f"adapter {name!r} has a dropout module {drop!r}"
    return None


def runtime_fallback_reason(self, x, args=(), kwargs=None):
    """Why this call of an accelerated layer runs PEFT's own forward (None: it runs on fastpeft's ops)."""
    kwargs = kwargs or {}
    if self.disable_adapters:
        return "adapters disabled"
    if self.merged:
        return "merged adapters"
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra forward arguments (e.g. aLoRA offsets)"
    # the submodules through _modules: nn.Module.__getattr__ costs ~0.3 µs a lookup, and a call needs ~30
    mods = self._modules
    base = mods["base_layer"]
    lora_as, lora_bs, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
    quantized = not _dense(base)
    if quantized and _bnb_class_name(base) != "Linear4bit":
        return f"base layer is a {type(base).__name__}"
    why = _fan_in_fan_out_reason(self, base)
    if why is not None:
        return why
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return "input is not a tensor of at least one dim"
    qweight = None
    if quantized:
        if bnb_cpu_serves(base, x):
            # bnb's Linear4bit.forward repacks the weight here (absmax rounded to bf16) and computes with that.
            return "4-bit layer in eval mode on the CPU: bitsandbytes' own CPU inference kernel (repacked weight)"
        try:  # (a weight bnb's kernel repacked at such a call is unpacked here: quant.unpack_cpu_repacked)
            qweight = _quantized_weight(self)
        except (ValueError, TypeError) as e:
            return f"4-bit base layer fastpeft cannot read: {e}"
    names = kwargs.get("adapter_names")
    if names is None:
        adapters = [a for a in self.active_adapters if a in lora_as]
    else:
        if x.dim() < 2 or not isinstance(names, (list, tuple)) or len(names) != x.shape[0]:
            return "adapter_names that do not give one name per row of a 2-D or larger input"
        adapters = [n for n in dict.fromkeys(names) if n != "__base__" and n in lora_as]
    if not adapters:
        return "no adapter of this layer is active"
    for a in adapters:
        lora_a, lora_b, drop = lora_as[a], lora_bs[a], drops[a]
        why = _adapter_reason(self, a, lora_a, lora_b, drop)
        if why is not None:
            return why
        if _has_hooks(lora_a) or _has_hooks(lora_b) or _has_hooks(drop):
            return f"hooks on adapter {a!r}'s modules"
        if not isinstance(self.scaling[a], (int, float)):
            return f"adapter {a!r} has a scaling of type {type(self.scaling[a]).__name__}"
    doras = [a for a in adapters if _is_dora(self, a)]
    if doras and names is not None:
        return "DoRA adapter in an adapter_names batch"
    if names is not None and any(self.lora_bias.get(a, False) for a in adapters):
        return "lora_bias adapter in an adapter_names batch"
    if doras and len(adapters) > 1:
        return "several active adapters, DoRA among them"
    if doras and _has_hooks(_magnitude(self, doras[0])):
        return f"hooks on adapter {doras[0]!r}'s modules"
    if quantized and names is not None:
        return "adapter_names batch on a 4-bit base layer"
    if _has_hooks(base):
        return "hooks on the base layer"
    if _global_hooks():
        return "global module hooks"
    if names is None and len(adapters) > 1 and any(_dropout(drops[a])[1] and drops[a].p > 0 for a in adapters):
        return "several active adapters with dropout in training (PEFT draws a mask per adapter)"
    # x, W (not for a 4-bit base), b, each adapter's A and B, DoRA's m: dense tensors or Parameters (not a DTensor,
    # a quantized or another subclass) of a float dtype, on x's device, off the meta device (x's checked first)
    dev = x.device
    tensors = [x] if quantized else [x, _param(base, "weight")]
    bias = _param(base, "bias")
    if bias is not None:
        tensors.append(bias)
    n_base = len(tensors)  # x, W and b first: their dtypes must agree outside autocast, the adapters' need not
    for a in adapters:
        tensors += (_param(lora_as[a], "weight"), _param(lora_bs[a], "weight"))
        if self.lora_bias.get(a, False):
            tensors.append(_param(lora_bs[a], "bias"))
    tensors += [_param(_magnitude(self, a), "weight") for a in doras]
    dtypes = set()
    for i, t in enumerate(tensors):
        if type(t) not in _PLAIN_TYPES or t.layout != torch.strided or t.dtype not in _KERNEL_OR_REF_DTYPES or (
                t is x and dev.type == "meta"):
            return f"a {type(t).__name__} of dtype {getattr(t, 'dtype', None)} on {getattr(t, 'device', None)}"
        if t.device != dev:
            return f"parameters on {t.device}, input on {dev}"
        if i < n_base:
            dtypes.add(t.dtype)
    dt = dev.type
    autocast = torch.is_autocast_enabled(dt) if dt in ("cpu", "cuda") else (
        torch.amp.is_autocast_available(dt) and torch.is_autocast_enabled(dt))
    if quantized:
        # b and the adapters of any float dtype: qlora_linear computes in the layer's compute dtype, as bnb's matmul
        # does (PEFT computes fp32 adapters' branch in fp32: the same outputs to that dtype's rounding, 0.96-1.13x
        # PEFT's error with bf16 inputs). An input wider than the compute dtype (fp32 activations on a bf16 compute
        # dtype: prepare_model_for_kbit_training's recipe) stays on PEFT's forward: there PEFT's fp32 branch is ~4x
        # more accurate than one computed in bf16.
        if qweight.device != dev:
            return f"4-bit weight on {qweight.device}, input on {dev}"
        if autocast:
            return "autocast on a 4-bit base layer"
        cdt = qweight.compute_dtype_for(x)
        if torch.finfo(x.dtype).bits > torch.finfo(cdt).bits:
            return (f"{str(x.dtype)[6:]} input on a 4-bit layer computing in {str(cdt)[6:]} (PEFT computes the LoRA "
                    "branch in the input's and adapters' precision)")
        return None
    if not autocast and len(dtypes) > 1:
        # (the adapters and magnitudes may be of another dtype, fp32 on a bf16 base as PEFT makes them: cast to W's)
        return ("input, weight and bias of several dtypes outside autocast "
                f"({', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))})")
    return None


# what a patched layer keeps between calls (restore, merge, unmerge and .to() drop it too)
_KEPT = ("_fastpeft_qw", "_fastpeft_dora", "_fastpeft_stacks", "_fastpeft_casts", "_fastpeft_wt")


def _drop_kept(self) -> None:
    for key in _KEPT:
        self.__dict__.pop(key, None)


def _merge(self, *args, **kwargs):
    """PEFT's merge, the kept QuantizedWeight / DoRA norm dropped first: merging a 4-bit layer requantizes into a
    new Params4bit, and the packed weight it replaces is then freed at once, not at the layer's next call."""
    _drop_kept(self)
    return self._fastpeft_original.merge(self, *args, **kwargs)


def _unmerge(self, *args, **kwargs):
    """PEFT's unmerge, the kept state dropped first (as ``merge``)."""
    _drop_kept(self)
    return self._fastpeft_original.unmerge(self, *args, **kwargs)


def _apply(self, fn, *args, **kwargs):
    # .to() / .cuda() / .cpu() swap the tensors' data: the kept view would hold the old memory (the packed weight's,
    # on the device it left) until the next call
    _drop_kept(self)
    return self._fastpeft_original._apply(self, fn, *args, **kwargs)


def _train(self, mode: bool = True):
    """PEFT's ``train`` / ``eval``, the kept values dropped first: a write through ``.data`` (which no version
    counter sees) is then seen at the next mode switch, as evaluation after training makes one. Only on a switch:
    Trainer calls ``train()`` at every step, and a captured CUDA graph may read them."""
    if bool(mode) != self.training:
        _drop_kept(self)
    return self._fastpeft_original.train(self, mode)


# ---------------------------------------------------------------------------------------------------------
# LoRA on convolutions (PEFT's lora.Conv1d / Conv2d / Conv3d)
# ---------------------------------------------------------------------------------------------------------
_CONV_NAMES = ("Conv1d", "Conv2d", "Conv3d")


def _is_peft_conv(cls: type) -> bool:
    return cls.__module__ == "peft.tuners.lora.layer" and cls.__name__ in _CONV_NAMES


def _conv_layer_reason(m: nn.Module) -> str | None:
    """Why PEFT's LoRA convolution ``m`` cannot run on ``lora_conv`` at all (None: some adapter of it can)."""
    base = m._modules["base_layer"]
    why = conv_reason(base)
    if why is not None:
        return f"base layer is {why}"
    if base.padding_mode != "zeros":
        return (f"base convolution with padding_mode={base.padding_mode!r} (PEFT pads its lora_A with zeros, the base "
                "otherwise: PEFT's forward)")
    if dilated(base):
        return f"base convolution with dilation={tuple(base.dilation)} (PEFT's lora_A is not dilated: PEFT's forward)"
    if not m.lora_A:
        return "the layer holds no LoRA adapter"
    reasons = [_conv_adapter_reason(m, a) for a in m.lora_A]
    return "; ".join(reasons) if all(reasons) else None


def _conv_adapter_reason(self, name: str) -> str | None:
    """Why adapter ``name`` of PEFT's LoRA convolution cannot run on ``lora_conv`` (None: it can)."""
    variant = getattr(self, "lora_variant", {}).get(name)
    dora = _is_dora(self, name)
    if variant is not None and not (dora and type(variant).__name__ in ("DoraConv1dVariant", "DoraConv2dVariant",
                                                                        "DoraConv3dVariant")):
        return f"adapter {name!r} is a LoRA variant ({type(variant).__name__}) on a convolution"
    if dora:
        weight = getattr(_magnitude(self, name), "weight", None)
        o = self._modules["base_layer"].weight.shape[0]
        if not isinstance(weight, torch.Tensor) or weight.numel() != o:
            return f"adapter {name!r} uses DoRA without a magnitude of {o} elements"
    if self.lora_bias.get(name, False):
        return f"adapter {name!r} has lora_bias=True on a convolution"
    base, a, b = self._modules["base_layer"], self.lora_A[name], self.lora_B[name]
    ones = (1,) * (base.weight.dim() - 2)
    if type(a) is not type(base) or type(b) is not type(base) or a.bias is not None or b.bias is not None or \
            tuple(a.kernel_size) != tuple(base.kernel_size) or tuple(a.stride) != tuple(base.stride) or \
            a.padding != base.padding or a.padding_mode != "zeros" or a.groups != 1 or \
            tuple(b.kernel_size) != ones or tuple(b.stride) != ones or b.padding != (0,) * len(ones) or \
            b.groups != 1 or a.dilation != (1,) * len(ones):
        return f"adapter {name!r} has factors that are not PEFT's conv(x, A) and 1x1 B of this base"
    drop = self.lora_dropout[name]
    if type(drop) not in (nn.Dropout, nn.Identity) or (isinstance(drop, nn.Dropout) and not 0.0 <= drop.p < 1.0):
        return f"adapter {name!r} has a dropout module {drop!r}"
    return None


def _conv_runtime_reason(self, x, args, kwargs) -> str | None:
    """Why this call of an accelerated LoRA convolution runs PEFT's own forward (None: it runs on ``lora_conv`` /
    ``dora_conv``)."""
    if self.disable_adapters:
        return "adapters disabled"
    if self.merged:
        return "merged adapters"
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (adapter_names batches on a convolution: PEFT's forward)"
    mods = self._modules
    base = mods["base_layer"]
    adapters = [a for a in self.active_adapters if a in mods["lora_A"]._modules]
    if not adapters:
        return "no adapter of this layer is active"
    if len(adapters) > 1 and any(_is_dora(self, a) for a in adapters):
        return "several active adapters on a convolution, DoRA among them"
    if len(adapters) > 1 and any(_dropout(mods["lora_dropout"]._modules[a])[1] and
                                 mods["lora_dropout"]._modules[a].p > 0 for a in adapters):
        return "several active adapters with dropout in training (PEFT draws a mask per adapter)"
    if _has_hooks(base) or _global_hooks():
        return "hooks on the base layer" if _has_hooks(base) else "global module hooks"
    d = base.weight.dim() - 2
    if not isinstance(x, torch.Tensor) or x.dim() not in (d + 1, d + 2):
        return "input that is not a (batched) tensor of the convolution's dims"
    tensors = [x, _param(base, "weight"), _param(base, "bias")]
    for a in adapters:
        why = _conv_adapter_reason(self, a)
        if why is not None:
            return why
        lora_a, lora_b, drop = mods["lora_A"]._modules[a], mods["lora_B"]._modules[a], mods["lora_dropout"]._modules[a]
        mag = _magnitude(self, a) if _is_dora(self, a) else None
        if _has_hooks(lora_a) or _has_hooks(lora_b) or _has_hooks(drop) or (mag is not None and _has_hooks(mag)):
            return f"hooks on adapter {a!r}'s modules"
        if not isinstance(self.scaling[a], (int, float)):
            return f"adapter {a!r} has a scaling of type {type(self.scaling[a]).__name__}"
        tensors += [_param(lora_a, "weight"), _param(lora_b, "weight"), None if mag is None else _param(mag, "weight")]
    dtypes = set()
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if type(t) not in _PLAIN_TYPES or t.layout != torch.strided or t.dtype not in _KERNEL_OR_REF_DTYPES:
            return f"a {type(t).__name__} of dtype {getattr(t, 'dtype', None)} on {getattr(t, 'device', None)}"
        if t.device != x.device:
            return f"parameters on {t.device}, input on {x.device}"
        if i < 3:
            dtypes.add(t.dtype)
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) if dev in ("cpu", "cuda") else False
    if not autocast and len(dtypes) > 1:
        return "input, weight and bias of several dtypes outside autocast"
    return None


def _conv_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``lora.Conv*d.forward`` on ``fastpeft.lora_conv`` (the active LoRA adapters: several side by side, as
    ``_active`` puts linear ones) or ``fastpeft.dora_conv`` (one DoRA adapter), PEFT's own forward elsewhere."""
    why = _conv_runtime_reason(self, x, args, kwargs)
    _count(self, why)
    if why is not None:
        return self._fastpeft_original.forward(self, x, *args, **kwargs)
    mods = self._modules
    base = mods["base_layer"]
    adapters = [a for a in self.active_adapters if a in mods["lora_A"]._modules]
    weight, bias = _param(base, "weight"), _param(base, "bias")
    kept = None if self.training else self.__dict__
    geo = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
    if len(adapters) == 1:
        a = adapters[0]
        lora_a, lora_b = _param(mods["lora_A"]._modules[a], "weight"), _param(mods["lora_B"]._modules[a], "weight")
        p, training = _dropout(mods["lora_dropout"]._modules[a])
        s = float(self.scaling[a])
        lora_a, lora_b = cast_params((lora_a, lora_b), weight.dtype, kept, "_fastpeft_casts")
        lora_b = lora_b.view(lora_b.shape[0], lora_b.shape[1])
        if _is_dora(self, a):  # PEFT applies DoRA's dropout only when the LoRA layer itself is in training mode
            return dora_conv(x, weight, bias, lora_a, lora_b, _param(_magnitude(self, a), "weight"), s, p,
                             training and self.training, **geo)
        return lora_conv(x, weight, bias, lora_a, lora_b, s, p, training, **geo)
    # Several LoRA adapters (no dropout in training: see _conv_runtime_reason): sum_a s_a B_a conv(x, A_a) is one
    # update with the kernels side by side, A = [A_1; A_2] (r1+r2, C, *k), B = [s_1 B_1, s_2 B_2] (O, r1+r2).
    lora_a = torch.cat([mods["lora_A"]._modules[a].weight.to(weight.dtype) for a in adapters], 0)
    lora_b = torch.cat([mods["lora_B"]._modules[a].weight.to(weight.dtype).flatten(1) * float(self.scaling[a])
                        for a in adapters], 1)
    return lora_conv(x, weight, bias, lora_a, lora_b, 1.0, 0.0, False, **geo)


# ---------------------------------------------------------------------------------------------------------
# LoRA on a mixture of experts' 3-D expert weights (PEFT's target_parameters: lora.ParamWrapper)
# ---------------------------------------------------------------------------------------------------------
def _is_param_wrapper(m: nn.Module) -> bool:
    cls = getattr(type(m), "_fastpeft_original", type(m))
    return cls.__name__ == "ParamWrapper" and cls.__module__.startswith("peft.tuners.lora")


def _wrapper_chain(m: nn.Module) -> tuple:
    """``(wrappers, experts)``: PEFT's nested ``ParamWrapper`` layers from ``m`` inwards (one per targeted parameter
    of the same module), and the module they wrap."""
    chain, base = [m], m._modules["base_layer"]
    while _is_param_wrapper(base):
        chain.append(base)
        base = base._modules["base_layer"]
    return chain, base


def _wrapper_reason(m: nn.Module) -> str | None:
    """Why the outermost ``ParamWrapper`` ``m`` (and those it wraps) cannot run on ``lora_experts`` (None: it can)."""
    chain, base = _wrapper_chain(m)
    why = experts_reason(base)
    if why is not None:
        return f"target_parameters on a module fastpeft does not compute: {why}"
    up = up_projection(base)
    for w in chain:
        if w.parameter_name not in (up, "down_proj"):
            return (f"target_parameters names {type(base).__name__}.{w.parameter_name}: fastpeft computes LoRA on "
                    f"its {up!r} and 'down_proj' expert weights")
    if not any(w.lora_A for w in chain):
        return "the layer holds no LoRA adapter"
    for w in chain:
        reasons = [_adapter_reason(w, a) for a in w.lora_A]
        if w.lora_A and all(reasons):
            return "; ".join(reasons)
    return None


def _experts_fallback_reason(self, x, args, kwargs) -> str | None:
    """Why this call of an accelerated ``ParamWrapper`` runs PEFT's own forward (None: ``lora_experts``)."""
    chain, base = _wrapper_chain(self)
    for w in chain:
        if w.disable_adapters:
            return "adapters disabled"
        if w.merged:
            return "merged adapters"
    names = kwargs.get("adapter_names")
    if set(kwargs) - {"adapter_names"} or len(args) != 2:
        return "an expert layer called with other than (hidden_states, top_k_index, top_k_weights)"
    index, weights = args
    if not (isinstance(x, torch.Tensor) and isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor)
            and x.dim() == 2 and x.is_floating_point() and index.dim() == 2 and index.shape[0] == x.shape[0]
            and not index.is_floating_point() and weights.shape == index.shape and weights.is_floating_point()):
        return "inputs other than hidden_states (T, H), top_k_index (T, k) int, top_k_weights (T, k) float"
    if func_transforms_active():
        return "a torch.func transform (the expert loop reads its group sizes on the host)"
    why = experts_reason(base)
    if why is not None:
        return why
    if _has_hooks(base) or any(_has_hooks(w, ignore=_peft_names_hook) for w in chain[1:]):
        return "hooks on the experts module or an inner ParamWrapper"
    if _global_hooks():
        return "global module hooks"
    if names is not None and (not isinstance(names, (list, tuple)) or not names or x.shape[0] % len(names)):
        return "adapter_names that do not split the tokens into one run per sequence"
    dev, active = x.device, []
    for w in chain:
        mods = w._modules
        lora_as, lora_bs, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
        for a in (w.active_adapters if names is None else dict.fromkeys(names)):
            if a not in lora_as:
                continue
            active.append((w, a))
            why = _adapter_reason(w, a, lora_as[a], lora_bs[a], drops[a])
            if why is not None:
                return why
            if _has_hooks(lora_as[a]) or _has_hooks(lora_bs[a]) or _has_hooks(drops[a]):
                return f"hooks on adapter {a!r}'s modules"
            if not isinstance(w.scaling[a], (int, float)):
                return f"adapter {a!r} has a scaling of type {type(w.scaling[a]).__name__}"
            for t in (_param(lora_as[a], "weight"), _param(lora_bs[a], "weight")):
                if type(t) not in _PLAIN_TYPES or t.device != dev or t.dtype not in _KERNEL_OR_REF_DTYPES:
                    return f"adapter {a!r}: a {type(t).__name__} of dtype {t.dtype} on {t.device}, input on {dev}"
    if not active and names is None:  # (an adapter_names batch of base rows only runs here: PEFT would refuse it)
        return "no adapter of this layer is active"
    weights = [getattr(base, name) for name in (up_projection(base), "down_proj")]
    for t in weights:
        if type(t) not in _PLAIN_TYPES or t.device != dev or t.layout != torch.strided:
            return f"expert weight of shape {tuple(t.shape)}: a {type(t).__name__} on {t.device}, input on {dev}"
    if torch.compiler.is_compiling():
        # traced: the grouped_mm form only (no host sync), in bf16, the one dtype inductor lowers it for
        why = grouped_mm_refusal(x, weights, [_expert_factors(w, a) for w, a in active])
        if why is None and (weights[0].dtype != torch.bfloat16 or x.dtype != torch.bfloat16):
            why = "torch.compile lowers grouped_mm for bf16 only"
        if why is not None:
            return (f"torch.compile tracing, where the expert loop cannot run (it reads group sizes on the host) and "
                    f"{why}")
    return None


def _expert_factors(w: nn.Module, name: str) -> tuple:
    """Adapter ``name`` of ``ParamWrapper`` ``w`` as ``(A (E, r, in), B (E, out, r), scaling)``, views of PEFT's
    factors (``peft_expert_factors``)."""
    a, b = _param(w.lora_A[name], "weight"), _param(w.lora_B[name], "weight")
    return (*peft_expert_factors(a, b, w.num_experts), float(w.scaling[name]))


def _experts_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``ParamWrapper.forward`` (the outermost of a module's wrappers) as one ``lora_experts`` call: the
    active adapters of every wrapper in the chain, on their expert weights, without PEFT's parametrization (which
    forms W + s B A for every expert at each call)."""
    why = _experts_fallback_reason(self, x, args, kwargs)
    _count(self, why)
    if why is not None:
        return self._fastpeft_original.forward(self, x, *args, **kwargs)
    chain, base = _wrapper_chain(self)
    names = kwargs.get("adapter_names")
    if names is None:
        adapters = {w.parameter_name: [_expert_factors(w, a) for a in w.active_adapters if a in w.lora_A._modules]
                    for w in chain}
        return lora_experts(base, x, args[0], args[1], adapters, check_ids=False, form=_traced_form())
    # PEFT's adapter_names (one per sequence; PEFT refuses them on its ParamWrapper): the MoE block hands the experts
    # its (batch, seq) tokens flattened, so each name covers a run of seq tokens; "__base__" and names a wrapper
    # lacks get no term there
    used = [n for n in dict.fromkeys(names) if n != "__base__" and any(n in w.lora_A._modules for w in chain)]
    index = {n: j for j, n in enumerate(used)}
    per_seq = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64, device=x.device)
    adapter_ids = per_seq.repeat_interleave(x.shape[0] // len(names))
    adapters = {w.parameter_name: [_expert_factors(w, n) if n in w.lora_A._modules else None for n in used]
                for w in chain}
    return lora_experts(base, x, args[0], args[1], adapters, check_ids=False, adapter_ids=adapter_ids,
                        form=_traced_form())


def _traced_form():
    """``lora_experts``' form for an accelerated call: grouped_mm while torch.compile traces (the fallback reason
    checked it can run), else its own pick."""
    return "grouped_mm" if torch.compiler.is_compiling() else None


def _accelerated_class(original: type) -> type:
    """The cached subclass of PEFT's ``original`` layer class whose forward runs fastpeft's ops."""
    cls = _classes.get(original)
    if cls is None:
        wrapper = original.__name__ == "ParamWrapper"
        # (a wrapper keeps PEFT's class name: PEFT finds the wrappers to add an adapter to by ``__name__``)
        conv = _is_peft_conv(original)
        name = "AcceleratedLinear" if original.__name__ == "Linear" else (
            "ParamWrapper" if wrapper else f"Accelerated{original.__name__}" if conv else
            f"AcceleratedLinear{original.__name__[6:]}")
        cls = type(name, (original,), {
            "forward": _experts_forward if wrapper else _conv_forward if conv else _forward, "merge": _merge,
            "unmerge": _unmerge,
            "_apply": _apply, "train": _train,
            "__module__": __name__, "__qualname__": name,
            "_fastpeft_original": original,
            "__doc__": f"PEFT's lora {original.__name__} computing through fastpeft's ops (fastpeft.accelerate).",
        })
        _classes[original] = cls
    return cls


def __getattr__(name):  # pickling an accelerated model finds the class here
    if name == "AcceleratedLinear":
        from peft.tuners.lora.layer import Linear

        return _accelerated_class(Linear)
    if name == "AcceleratedLinear4bit":
        from peft.tuners.lora.bnb import Linear4bit

        return _accelerated_class(Linear4bit)
    if name in ("AcceleratedConv1d", "AcceleratedConv2d", "AcceleratedConv3d"):
        from peft.tuners.lora import layer

        return _accelerated_class(getattr(layer, name[11:]))
    if name == "ParamWrapper":  # (the accelerated wrapper keeps PEFT's class name)
        from peft.tuners.lora.layer import ParamWrapper

        return _accelerated_class(ParamWrapper)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AccelerateReport:
    """What ``fastpeft.accelerate`` did to a model.

    patched: names of the LoRA layers that now compute through fastpeft's ops (those of earlier calls
    included); skipped: layer name -> why it stays on PEFT's forward; partial: patched layer name -> its
    adapters that still run on PEFT's forward when active, and why; newly_patched: how many layers this
    call patched (0 on a second call), plus those the model's later ``load_adapter`` / ``add_adapter`` calls
    patched (each patches the layers it adds, warns of those it cannot, and updates the lists). ``calls()``
    counts, since ``accelerate``, the calls of the patched layers by path: ``"fastpeft"`` or the reason PEFT's
    forward ran.
    """

    patched: list
    skipped: dict
    partial: dict
    newly_patched: int
    _layers: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    def calls(self) -> dict:
        total = collections.Counter()
        for m in self._layers:
            total.update(m.__dict__.get("_fastpeft_calls", {}))
        return dict(total)

    def __str__(self) -> str:
        n = len(self.patched) + len(self.skipped)
        lines = [f"fastpeft.accelerate: {len(self.patched)} of {n} PEFT LoRA layers compute through fastpeft's "
                 f"ops ({self.newly_patched} patched by this call), {len(self.skipped)} skipped"]
        for name, why in self.skipped.items():
            lines.append(f"  skipped  {name}: {why}")
        for name, why in self.partial.items():
            lines.append(f"  partial  {name}: {why}")
        if self.patched:
            lines.append("  Patched layers run PEFT's own forward, call by call, for: disabled or merged adapters, "
                         "hooks on their modules, an input, weight and bias of several dtypes outside autocast "
                         "(fp32 adapters on a bf16 base run on fastpeft, cast), autocast on 4-bit layers, several "
                         "active adapters with dropout in training or with DoRA among them, DoRA or lora_bias in "
                         "adapter_names batches; expert layers (target_parameters) also while torch.compile traces "
                         "a model of another dtype than bf16. "
                         "report.calls() counts the paths taken.")
        return "\n".join(lines)


def _peft_classes():
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as e:
        raise ImportError(f"fastpeft.accelerate works on Hugging Face PEFT models, and peft does not import here "
                          f"({e}): pip install peft") from None
    return Linear, LoraLayer


_QUANTIZED = ("bnb", "gptq", "awq", "hqq", "torchao", "eetq", "aqlm", "quanto", "inc", "tp_layer", "gptqmodel")


def _is_peft_bnb(cls: type, name: str) -> bool:
    return cls.__module__ == "peft.tuners.lora.bnb" and cls.__name__ == name


def _layer_reason(m: nn.Module, linear_cls: type):
    """Why LoRA layer ``m`` cannot be accelerated at all (None: some adapter of it can)."""
    if _is_param_wrapper(m):  # (an inner one: _survey gives it its outermost wrapper's reason)
        return _wrapper_reason(m)
    cls = getattr(type(m), "_fastpeft_original", type(m))
    base = m.base_layer
    four_bit = _is_peft_bnb(cls, "Linear4bit") and _bnb_class_name(base) == "Linear4bit"
    if _is_peft_bnb(cls, "Linear8bitLt"):
        return ("bitsandbytes int8 base layer (peft's bnb.Linear8bitLt): PEFT's forward, as bnb's LLM.int8 matmul "
                "quantizes the input too, which fastpeft's W8A16 qlora_linear does not (outputs would differ "
                "beyond float rounding)")
    if _is_peft_conv(cls):
        return _conv_layer_reason(m)
    if cls is not linear_cls and not four_bit:
        mod = cls.__module__.rsplit(".", 1)[-1]
        if mod in _QUANTIZED:
            return f"quantized or distributed base layer (peft's {mod}.{cls.__name__}): PEFT's forward"
        return (f"peft's {cls.__name__} layer ({cls.__module__}): only lora.Linear and lora.bnb.Linear4bit layers "
                "are accelerated")
    if not four_bit and not _dense(base):
        if isinstance(base, nn.Linear):
            return f"base layer is a {type(base).__name__}, an nn.Linear with a forward of its own"
        conv = conv1d_class()
        if conv is not None and isinstance(base, conv):
            return f"base layer is a {type(base).__name__}, a transformers Conv1D with a forward of its own"
        return f"base layer is a {type(base).__name__}, not an nn.Linear or transformers Conv1D"
    why = _fan_in_fan_out_reason(m, base)
    if why is not None:
        return why
    reasons = [_adapter_reason(m, a) for a in m.lora_A]
    if m.lora_A and all(reasons):
        return "; ".join(reasons)
    if not m.lora_A:
        return "the layer holds no LoRA adapter"
    return None


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.accelerate takes a PEFT LoRA model (a peft.PeftModel, or a transformers model "
                        f"with adapters added by add_adapter), got a {type(model).__name__}")
    try:
        from peft import PeftMixedModel
    except ImportError:
        PeftMixedModel = ()
    if PeftMixedModel and isinstance(model, PeftMixedModel):
        raise TypeError("fastpeft.accelerate takes a LoRA PeftModel, got a PeftMixedModel (adapters of mixed types): "
                        "load the LoRA adapters with PeftModel / get_peft_model instead")
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        types = {name: str(getattr(getattr(c, "peft_type", None), "value", getattr(c, "peft_type", None)))
                 for name, c in configs.items()}
        if not any(t == "LORA" for t in types.values()):
            raise ValueError(f"fastpeft.accelerate takes a LoRA model; {type(model).__name__} holds adapters "
                             f"{types}")


def accelerate(model: nn.Module, strict: bool = False) -> AccelerateReport:
    """Make the PEFT LoRA layers of ``model`` compute through fastpeft's ops, in place; returns a report.

    model: a LoRA ``peft.PeftModel``, or a transformers model with PEFT adapters added by ``add_adapter``.
    Layers fastpeft cannot compute (LoRA variants other than DoRA, ``lora_bias`` on a quantized base, int8 and
    non-bitsandbytes quantized bases, DoRA on a quantized base other than a 4-bit one, bases other than nn.Linear,
    transformers' Conv1D and nn.Conv1d / 2d / 3d (PEFT's ``lora.Conv*d``: zero padding, groups 1, LoRA adapters), a
    ``fan_in_fan_out`` flag against the base's layout, ``target_parameters`` on anything but a transformers experts
    module's expert weights) keep PEFT's forward and are listed in
    ``report.skipped`` with the reason;
    ``strict=True`` raises ``ValueError`` instead (before changing anything) if any layer or adapter would
    stay on PEFT's forward. Calling it again is a no-op for the layers already patched;
    ``fastpeft.restore(model)`` undoes it.
    """
    linear_cls, lora_layer_cls = _peft_classes()
    _check_model(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lora_layer_cls)}
    if not layers:
        from .layers import FastLoRALinear

        if any(isinstance(m, FastLoRALinear) for m in model.modules()):
            raise TypeError(f"{type(model).__name__} is a fastpeft model (fastpeft.inject): its LoRA layers run "
                            "fastpeft's ops already; fastpeft.accelerate is for PEFT models")
        raise TypeError(f"fastpeft.accelerate takes a PEFT LoRA model (a peft.PeftModel, or a transformers model "
                        f"with adapters added by add_adapter); {type(model).__name__} has no PEFT LoRA layer")
    report, todo = _survey(layers, linear_cls)
    patched, skipped, partial = report.patched, report.skipped, report.partial
    if not patched and not strict:  # a generic script that always calls accelerate keeps running, told why
        warnings.warn(f"fastpeft.accelerate found nothing it can compute in {type(model).__name__}: the model is "
                      f"unchanged (PEFT's forward runs every layer); remove the call, or change what each layer "
                      f"below names:\n{report}", UserWarning, stacklevel=2)
        return report
    if strict and (skipped or partial):
        raise ValueError(f"fastpeft.accelerate(strict=True): some LoRA layers would stay on PEFT's forward; "
                         f"nothing was changed.\n{report}")
    _patch(todo)
    for method in _ADDING:  # LoRA layers PEFT adds later are patched too (into this report)
        if callable(getattr(type(model), method, None)):
            setattr(model, method, _InstanceMethod(_ADDING[method], model))
    reports = model.__dict__.setdefault("_fastpeft_report", [])  # every report handed out stays current
    _update_reports(reports, report, len(todo))
    reports.append(report)
    guard_repacked_layers(model)
    return report


def _survey(layers: dict, linear_cls: type) -> tuple:
    """``(report, layers to patch)`` for the PEFT LoRA ``layers`` (name -> module)."""
    patched, skipped, partial, todo = [], {}, {}, []
    # PEFT nests one ParamWrapper per targeted parameter of a module: the outermost computes them all
    outer_of = {id(w._modules["base_layer"]): w for w in layers.values() if _is_param_wrapper(w)}
    for name, m in layers.items():
        outer = m
        while id(outer) in outer_of:
            outer = outer_of[id(outer)]
        why = _layer_reason(outer, linear_cls)
        if why is not None:
            skipped[name] = why
            continue
        notes = [r for r in (_adapter_reason(m, a) for a in m.lora_A) if r]
        if notes:
            partial[name] = "; ".join(notes) + " (PEFT's forward when active)"
        patched.append(name)
        original = type(m).__dict__.get("_fastpeft_original")
        if outer is not m:  # an inner wrapper: runs as PEFT's (only the outermost's fallback calls it)
            if original is not None:
                m.__class__ = original
                m.__dict__.pop("_fastpeft_calls", None)
        elif original is None:  # not accelerated yet
            todo.append(m)
    return AccelerateReport(patched, skipped, partial, len(todo), [layers[n] for n in patched]), todo


def _patch(layers: list) -> None:
    for m in layers:
        m.__class__ = _accelerated_class(type(m))
        m._fastpeft_calls = collections.Counter()


def _update_reports(reports: list, new: AccelerateReport, patched_now: int) -> None:
    """The model's earlier reports made to say what ``new`` (a survey of its layers now) says, in place."""
    for report in reports:
        report.patched[:], report.skipped, report.partial = list(new.patched), dict(new.skipped), dict(new.partial)
        report._layers[:] = new._layers
        report.newly_patched += patched_now


def _then_patch(method: str):
    """The model's ``method`` (PEFT's / transformers' ``load_adapter``, ``add_adapter``), then the LoRA layers it
    made on modules that had none patched as ``accelerate`` patches (the model's report updated in place), so that
    one call of ``accelerate`` keeps holding for adapters loaded later. Every report ``accelerate`` returned for the
    model is updated (a second call's, and the first one's, which a user may have kept)."""
    def call(self, *args, **kwargs):
        out = getattr(type(self), method)(self, *args, **kwargs)
        reports = self.__dict__.get("_fastpeft_report")
        if reports:
            linear_cls, lora_layer_cls = _peft_classes()
            layers = {n: m for n, m in self.named_modules() if isinstance(m, lora_layer_cls)}
            new, todo = _survey(layers, linear_cls)
            _patch(todo)
            last = reports[-1]
            left = {n: why for n, why in new.skipped.items() if n not in last.skipped}
            left.update({n: why for n, why in new.partial.items() if last.partial.get(n) != why})
            if left:  # (the adapter is in already: strict=True could not refuse it before it was added)
                # stacklevel 3: the user's line, past this function and the _InstanceMethod that calls it
                warnings.warn(f"fastpeft.accelerate, after {method}: {len(left)} LoRA layers keep PEFT's forward "
                              "(for the new adapter): " + "; ".join(f"{n}: {why}" for n, why in list(left.items())[:4]),
                              UserWarning, stacklevel=3)
            _update_reports(reports, new, len(todo))
        return out

    call.__name__ = call.__qualname__ = f"_accelerated_{method}"
    return call


_accelerated_load_adapter = _then_patch("load_adapter")  # (module names: the model's bound copies pickle by them)
_accelerated_add_adapter = _then_patch("add_adapter")
_ADDING = {"load_adapter": _accelerated_load_adapter, "add_adapter": _accelerated_add_adapter}


def restore(model: nn.Module) -> nn.Module:
    """Undo ``fastpeft.accelerate``: every accelerated layer of ``model`` runs PEFT's own forward again
    (a model that was never accelerated is returned as it is). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.restore takes the model given to fastpeft.accelerate, got a {type(model).__name__}")
    accelerated = tuple(_classes.values())
    for method in _ADDING:
        own = model.__dict__.get(method)
        if isinstance(own, _InstanceMethod) and own.__func__ is _ADDING[method]:
            del model.__dict__[method]
    model.__dict__.pop("_fastpeft_report", None)
    for m in model.modules():
        if accelerated and isinstance(m, accelerated):
            m.__class__ = m._fastpeft_original
            m.__dict__.pop("_fastpeft_calls", None)
            _drop_kept(m)
    return model
