"""Quantized base layers (QLoRA): recognise them, read their packed weights in place, dequantize in PyTorch.

- ``base_kind(module)``: ``"linear"`` for ``nn.Linear``, ``"4bit"`` for ``bitsandbytes.nn.Linear4bit`` (NF4 /
  FP4, nested absmax or not, any ``quant_storage``), ``"8bit"`` for ``bitsandbytes.nn.Linear8bitLt``; a quantized
  layer of another library (GPTQ, AWQ, HQQ, torchao, quanto, EETQ, AQLM) raises ``TypeError`` naming the module
  and the library, never a confusing error from deep inside torch.
- ``QuantizedWeight.from_module(layer)``: a view of a bitsandbytes layer's weight: shape, compute dtype, the
  packed data and the quant state, all read in place (no copy: ``data_ptr`` is bnb's).
- ``dequantize_ref(qw)``: the dense weight in plain PyTorch, bit-exact with
  ``bitsandbytes.functional.dequantize_4bit`` / ``int8_vectorwise_dequant`` (the oracle of the kernels).
- ``dequantize_weight(qw, dtype, out=None)``: the same bits by the fastest route (on the CPU bitsandbytes' C kernels,
  called directly), a fresh tensor per call or written into ``out``.
- ``workspace(device, dtype, numel)``: the buffer a weight dequantized for one call lives in, shared by every
  quantized layer (per device; on the CPU per thread), so that a call allocates no weight-sized tensor;
  ``weight_workspace`` sizes it for a layer, ``call_buffer`` says where a PyTorch-path call puts its W,
  ``release_workspaces`` frees the buffers.
- ``merge_into_quantized(layer, delta, dequantize=...)``: PEFT's merge (dequantize, add, requantize with a
  warning), or a plain floating-point ``nn.Linear`` with ``dequantize=True``.

bitsandbytes is imported lazily: fastpeft runs without it, and a model that has no bnb layer never needs it.

Layout of a 4-bit weight (out, in), as bnb's ``quantize_4bit`` writes it: element ``e = n * in + k`` of the
row-major weight is nibble ``e % 2`` of byte ``e // 2`` (the high nibble first), read as uint8 whatever the
``quant_storage`` dtype; its value is ``code[nibble] * absmax[e // blocksize]`` in fp32, then cast to the
dequantized dtype. Nested ("double quant", ``compress_statistics=True``): ``absmax`` is itself uint8 codes of
an 8-bit blockwise quantization, ``absmax[i] = code2[q[i]] * absmax2[i // blocksize2] + offset`` in fp32.
Note: bnb 0.50's CPU C kernel for ``dequantize_4bit`` indexes absmax per row (``n * (in // blocksize) + k //
blocksize``), which disagrees with its own quantizer when ``in`` is not a multiple of the block size; the
flat layout above is the quantizer's and bnb's CUDA / default-backend dequantizer's, and is what is used here.
"""
from __future__ import annotations

import ctypes as ct
import functools
import importlib
import importlib.util
import operator
import os
import sys
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .ops.common import tensor_version
from .reference import func_transforms_active, tracing_or_transformed


def import_bitsandbytes():
    """``bitsandbytes``, imported so that its optional ``import kernels`` (Hugging Face's kernel-hub package, for a
    CPU GEMM) cannot pick up this repository's top-level ``kernels/`` folder instead. That happens whenever a
    checkout's root is on sys.path (``python`` run from the repo root, ``PYTHONPATH=<repo>`` for the tests): bnb
    then imports fastpeft's kernels a second time as ``kernels`` and logs a confusing warning. During bnb's import
    only, ``kernels`` is hidden when it is this folder, so bnb sees what it sees without it (not installed)."""
    if "bitsandbytes" not in sys.modules:
        ours = os.path.realpath(os.path.join(os.path.dirname(__file__), "kernels"))
        shadow = False
        if "kernels" not in sys.modules:
            try:
                spec = importlib.util.find_spec("kernels")
            except (ImportError, ValueError):
                spec = None
            shadow = bool(spec and spec.origin and os.path.realpath(os.path.dirname(spec.origin)) == ours)
        if shadow:
            sys.modules["kernels"] = None  # import kernels -> ImportError, which bnb handles
            try:
                importlib.import_module("bitsandbytes")
            finally:
                del sys.modules["kernels"]
    return importlib.import_module("bitsandbytes")


# 1 / 127 as bitsandbytes writes it (int8_vectorwise_dequant): W = CB * SCB * INT8_INV_SCALE, in fp32.
INT8_INV_SCALE = 7.874015718698502e-3

# Quantized linear layers of other libraries, refused by name: (module prefix, class-name words, library).
_FOREIGN = (
    (("auto_gptq", "gptqmodel", "optimum.gptq", "exllama"), ("QuantLinear", "GPTQ"), "GPTQ"),
    (("awq", "autoawq"), ("WQLinear", "AWQ"), "AWQ"),
    (("hqq",), ("HQQLinear", "HQQ"), "HQQ"),
    (("torchao",), (), "torchao"),
    (("optimum.quanto", "quanto"), ("QLinear",), "quanto"),
    (("eetq",), ("EetqLinear",), "EETQ"),
    (("aqlm",), ("QuantizedLinear",), "AQLM"),
)


def _bnb_class_name(module: nn.Module) -> str | None:
    """``"Linear4bit"`` / ``"Linear8bitLt"`` for bitsandbytes' layers (and their subclasses: LinearNF4,
    LinearFP4), else None. By module path, so that bitsandbytes is not imported for a plain model."""
    return _bnb_class_of(type(module))


@functools.lru_cache(maxsize=None)
def _bnb_class_of(module_type: type) -> str | None:
    for cls in module_type.__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return cls.__name__
    return None


def foreign_quant_library(module: nn.Module) -> str | None:
    """The name of the library whose quantized layer ``module`` is (GPTQ, AWQ, HQQ, torchao, ...), or None."""
    if _bnb_class_name(module) is not None:
        return None
    w = getattr(module, "weight", None)
    # an nn.Linear holding a plain float weight is no other library's quantized layer, whatever its class is called
    # (FakeQuantLinear: base_kind refuses it if its forward is its own)
    plain = isinstance(module, nn.Linear) and type(w) in (nn.Parameter, torch.Tensor) and w.is_floating_point()
    for cls in type(module).__mro__:
        mod, name = cls.__module__ or "", cls.__name__
        for prefixes, words, library in _FOREIGN:
            if any(mod == p or mod.startswith(p + ".") for p in prefixes):
                return library
            if not plain and words and any(w in name for w in words) and "quant" in (mod + name).lower():
                return library
    # torchao quantizes nn.Linear in place: the weight becomes one of its tensor subclasses.
    if isinstance(w, torch.Tensor) and type(w).__module__.startswith("torchao"):
        return "torchao"
    if isinstance(w, torch.Tensor) and getattr(w, "data", None) is not None \
            and type(w.data).__module__.startswith("torchao"):
        return "torchao"
    return None


def own_forward(module: nn.Module) -> bool:
    """Whether ``module``, an nn.Linear, computes something else than ``x Wᵀ + b``: a subclass with a forward of its
    own (fake quantization for QAT, ``torch.ao.nn.qat.Linear``, a router returning a tuple, ...), not bitsandbytes'
    (read in place) nor one known to compute x Wᵀ + b in its own way (``_PLAIN_FORWARD``). fastpeft's layers compute
    ``F.linear`` on the weight, so they would bypass it."""
    cls = type(module)
    return cls.forward is not nn.Linear.forward and _bnb_class_name(module) is None and not any(
        (c.__module__.split(".")[0], c.__name__) in _PLAIN_FORWARD for c in cls.__mro__)


# nn.Linear subclasses whose own forward computes x Wᵀ + b (module root, class): Falcon's every projection,
# ``input @ W.T + b`` unfused to match its bf16 rounding (LoRA's default targets there, PEFT's too).
_PLAIN_FORWARD = {("transformers", "FalconLinear")}


_CONV1D: dict = {}


def conv1d_class():
    """transformers' ``Conv1D`` where transformers is imported (a model holding one has imported it), else None."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` computing with Conv1D's own forward (GPT-2's projections:
    y = x W + b, W stored (in, out); PEFT's ``fan_in_fan_out``), not a subclass overriding it. By class, looked up
    once (the accelerated layers' per-call path reads it)."""
    cls = type(module)
    hit = _CONV1D.get(cls)
    if hit is None:
        conv = conv1d_class()
        hit = _CONV1D[cls] = conv is not None and issubclass(cls, conv) and cls.forward is conv.forward
    return hit


def base_kind(module: nn.Module, name: str = "") -> str:
    """``"4bit"``, ``"8bit"`` or ``"linear"`` for a base layer LoRA can wrap; ``TypeError`` for the quantized
    layers of other libraries and for anything else, naming the module (``name``) and what it is."""
    label = f"module {name!r} " if name else "the base layer "
    bnb = _bnb_class_name(module)
    if bnb == "Linear4bit":
        return "4bit"
    if bnb == "Linear8bitLt":
        return "8bit"
    library = foreign_quant_library(module)
    if library is not None:
        raise TypeError(f"{label}is a {library} quantized layer ({type(module).__module__}."
                        f"{type(module).__name__}); fastpeft's QLoRA supports bitsandbytes Linear4bit (NF4/FP4) and "
                        f"Linear8bitLt base layers only. Load the model with transformers' BitsAndBytesConfig, or "
                        f"unquantized")
    if isinstance(module, nn.Linear):
        if own_forward(module):
            raise TypeError(f"{label}is a {type(module).__module__}.{type(module).__name__}, an nn.Linear with a "
                            "forward of its own, which fastpeft's layer would bypass (it computes x W^T + b from the "
                            "weight); exclude it, or make it a plain nn.Linear")
        return "linear"
    raise TypeError(f"{label}must be an nn.Linear or a bitsandbytes Linear4bit / Linear8bitLt, got "
                    f"{type(module).__name__}")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return _bnb_class_name(module) is not None


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A bitsandbytes layer's weight, read in place: every tensor here *is* bnb's (no copy).

    kind: ``"nf4"``, ``"fp4"`` or ``"int8"``; shape: (out, in); compute_dtype: the layer's compute dtype, or
    None to follow the input (bnb's rule); dtype: the dtype bnb dequantizes to (the quantized weight's original
    dtype for 4-bit, float32 for int8).
    4-bit: ``data`` the packed bytes, a uint8 view (numel ``ceil(out*in/2)``); ``code`` (16,) fp32; ``absmax``
    fp32 (blocks,) or, nested, uint8 codes with ``nested_code`` (256,), ``nested_absmax`` fp32, ``nested_blocksize``
    and ``offset`` (a 0-d fp32 tensor: read by the kernels from memory, no host sync).
    int8: ``data`` the int8 weight (out, in), ``scales`` (out,) fp32 row scales (SCB).
    """
    kind: str
    shape: tuple
    compute_dtype: torch.dtype | None
    dtype: torch.dtype
    data: torch.Tensor
    blocksize: int = 0
    code: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    nested: bool = False
    nested_code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_blocksize: int = 0
    offset: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    name: str = ""
    quant_state: object = None  # bnb's QuantState (4-bit), by reference: for bnb's own dequantizer (``dequantize``)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "") -> "QuantizedWeight":
        """The view of a ``Linear4bit`` / ``Linear8bitLt`` layer's weight; ``ValueError`` naming the module when
        its weight is not quantized (yet). A 4-bit weight bitsandbytes repacked for its CPU inference kernel is
        unpacked first (``unpack_cpu_repacked``)."""
        label = f"module {name!r}" if name else f"the {type(module).__name__} layer"
        kind = base_kind(module, name)
        if kind == "4bit":
            unpack_cpu_repacked(module)
        w = module.weight
        if kind == "4bit":
            qs = getattr(w, "quant_state", None)
            if qs is None or not getattr(w, "bnb_quantized", True):
                raise ValueError(f"{label}: its Linear4bit weight is not quantized yet (bitsandbytes quantizes it "
                                 f"when the layer is moved to a device: call .to(device) first)")
            if qs.quant_type not in ("nf4", "fp4"):
                raise ValueError(f"{label}: quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
            shape = tuple(int(s) for s in qs.shape)
            if len(shape) != 2:
                raise ValueError(f"{label}: the quantized weight must be 2-D (out, in), got shape {shape}")
            data = w.data  # once: .data goes through Params4bit's __torch_function__ (~1.5 us on the CPU)
            data = data if data.dtype == torch.uint8 else data.view(torch.uint8)
            cdt = getattr(module, "compute_dtype", None)
            common = dict(kind=qs.quant_type, shape=shape, compute_dtype=cdt, dtype=qs.dtype, data=data,
                          blocksize=int(qs.blocksize), code=qs.code, name=name, quant_state=qs)
            if qs.nested:
                s2 = qs.state2
                return cls(**common, absmax=qs.absmax, nested=True, nested_code=s2.code, nested_absmax=s2.absmax,
                           nested_blocksize=int(s2.blocksize), offset=qs.offset)
            return cls(**common, absmax=qs.absmax)
        if kind == "8bit":
            cb = getattr(w, "CB", None)
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if w.dtype != torch.int8 or scb is None:
                raise ValueError(f"{label}: its Linear8bitLt weight is not quantized to int8 (has_fp16_weights=True, "
                                 f"or not moved to a device yet); got weight dtype {w.dtype}")
            data = cb if cb is not None and cb.dtype == torch.int8 else w.data
            return cls(kind="int8", shape=tuple(data.shape), compute_dtype=None, dtype=torch.float32, data=data,
                       scales=scb, name=name)
        raise TypeError(f"{label} is a plain nn.Linear, not a quantized layer")

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the layer computes in for input ``x``: bnb's Linear4bit rule (its ``compute_dtype`` when
        set, else the input's), the input's for int8 (W8A16)."""
        return self.compute_dtype if self.compute_dtype is not None else x.dtype


_CPU_KERNEL = [True]  # set_cpu_inference_kernel's switch (a list: one object, read at every call)


def set_cpu_inference_kernel(enabled: bool) -> bool:
    """Whether the eval-mode calls of a bitsandbytes layer on the CPU run bitsandbytes' own inference path, as
    PEFT's layers do (``True``, the default), or fastpeft's exact dequantize + GEMM (``False``); returns the
    previous setting. Process-wide; the layers fastpeft does not wrap always run bnb's own forward.

    bnb's path is its layer's forward in eval mode on an input without requires_grad: for a ``Linear4bit``, on a
    CPU with AVX512-BF16, a kernel reading a copy of the weight repacked in place into a layout of its own (block
    scales rounded to bf16, kept when fastpeft unpacks it for training) and computing in bf16; for a
    ``Linear8bitLt``, an int8 x int8 product of the input quantized per row. The outputs are PEFT + bitsandbytes'
    bit for bit, ~2e-3 (4-bit) and ~6e-3 (int8) relative off the exact product, and faster on a CPU
    (``fastpeft bench qlora --modes eval``; README). ``False`` keeps every call exact (the training path's numbers)
    and the stored weight as it is."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_inference_kernel's enabled must be a bool, got {enabled!r} "
                        f"({type(enabled).__name__})")
    prev, _CPU_KERNEL[0] = _CPU_KERNEL[0], enabled
    return prev


def bnb_cpu_serves(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether bnb's own forward of ``module`` runs ``x`` on its CPU inference path (its own condition: eval mode,
    x on the CPU without requires_grad; for a 4-bit layer, AVX512-BF16) and fastpeft lets it
    (``set_cpu_inference_kernel``): while torch.compile traces or torch.func transforms only on a weight repacked
    already (the repacking swaps the weight's data in place), and not where bnb fails: 4-bit shapes its repacking
    asserts on (out a multiple of 32, in of the block size), an input without rows (4-bit), int8 inputs of other
    than 2 or 3 dims; fastpeft computes those itself."""
    if not _CPU_KERNEL[0] or x.device.type != "cpu" or module.training or x.requires_grad or not x.numel():
        return False  # (no rows: bnb's 4-bit kernel dies of SIGFPE)
    traced = tracing_or_transformed()
    kind = _bnb_class_name(module)
    if kind == "Linear8bitLt":
        return x.dim() in (2, 3) and not traced  # (bnb's int8 path fails on other ranks)
    if kind != "Linear4bit" or not module.__dict__.get("support_avx512bf16_for_cpu", False):
        return False
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        return False
    if getattr(qs, "packing_format_for_cpu", False):  # (also in a compiled graph: it reads the repacked weight,
        return True                                   # where unpacking it would swap its data)
    if traced:
        return False
    shape = tuple(getattr(qs, "shape", ()))
    return len(shape) == 2 and shape[0] % 32 == 0 and shape[1] % max(2, int(qs.blocksize)) == 0


_NO_TORCH_FUNCTION = torch._C.DisableTorchFunctionSubclass  # bnb's Params4bit overrides it: 1.5 µs a method


_STATE_FIELDS = ("absmax", "nested", "state2", "offset", "dtype")  # what bnb's CPU repacking replaces in a QuantState


def remember_quant_state(module: nn.Module) -> None:
    """Keep the block scales of a ``Linear4bit`` weight not repacked (``_STATE_FIELDS`` of its QuantState, by
    reference: no copy) on that QuantState itself, so that ``unpack_cpu_repacked`` puts them back exactly. bnb's
    repacking rounds absmax to bf16 (and drops a nested absmax's 8-bit codes) in place on the same QuantState, and
    its own unpacking re-quantizes it: every eval -> train cycle would move the weights again (a nested absmax:
    ~2e-3 of the eval logits per cycle). Kept on the QuantState, it follows it through deepcopy and pickle (bnb
    copies the QuantState of a copied weight), and a new QuantState (a merge requantizes) starts without one.
    Called whenever a guarded layer is seen unpacked: at ``guard_repacked_layers``, before its eager calls, after a
    merge into it."""
    w = module._parameters.get("weight")
    qs = None if w is None else w.__dict__.get("quant_state")
    if qs is not None and "_fastpeft_scales" not in qs.__dict__ \
            and not qs.__dict__.get("packing_format_for_cpu", False):
        qs.__dict__["_fastpeft_scales"] = {k: qs.__dict__[k] for k in _STATE_FIELDS if k in qs.__dict__}


def unpack_cpu_repacked(module: nn.Module, *_) -> None:
    """A ``Linear4bit`` weight bitsandbytes repacked for its CPU inference kernel (at an eval-mode call on the CPU:
    its own layout, absmax rounded to bf16) back in the plain layout, in place: the nibbles by bnb's own inverse,
    the block scales as they were before the repacking where ``remember_quant_state`` kept them (the weight is then
    bit for bit the one before), else as bnb leaves them (bf16-rounded; a non-nested absmax put back in per-row
    order, which bnb 0.50's own unpacking leaves scrambled). Its next eval-mode call repacks it again. Also the
    state_dict and load_state_dict pre-hook ``guard_repacked_layers`` installs (bnb's own unpacking there would
    scramble or re-quantize the scales; a file holds the plain layout). Before 2026-12-01 fastpeft refused such a
    weight. No-op for any other layer."""
    qs = getattr(module.weight, "quant_state", None)
    if getattr(qs, "packing_format_for_cpu", False):
        if func_transforms_active():  # (swapping the weight's data inside a transform leaves it escaped)
            raise RuntimeError(f"a {type(module).__name__} weight is repacked for bitsandbytes' CPU inference kernel "
                               "(an eval-mode call did it) and cannot be unpacked inside a torch.func transform: "
                               "call model.train() (it unpacks) or run the model once outside the transform first")
        # (a compiled graph cannot swap the weight's data: done eagerly there, one graph break)
        (_unpack_eagerly if torch.compiler.is_compiling() else _unpack_now)(module, qs)


def _unpack_now(module: nn.Module, qs) -> None:
    """``unpack_cpu_repacked``'s work on a repacked weight with QuantState ``qs``."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w = module.weight  # (what Linear4bit._save_to_state_dict runs, without the layer's state_dict hooks)
    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
    kept = w.quant_state.__dict__.get("_fastpeft_scales")
    if kept is not None:  # the scales as they were, each field present exactly as before
        for k in _STATE_FIELDS:
            if k in kept:
                setattr(w.quant_state, k, kept[k])
            elif k in w.quant_state.__dict__:
                delattr(w.quant_state, k)
    else:
        absmax = w.quant_state.absmax
        if absmax.dim() == 2:  # bnb 0.50 leaves a non-nested absmax in the repacked (in / b, out) layout:
            w.quant_state.absmax = absmax.t().reshape(-1).float()  # per-row blocks again (bnb's forward reads it)
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = w.quant_state


_unpack_eagerly = torch.compiler.disable(_unpack_now)


def _unpack(module: nn.Module, x) -> None:
    """``unpack_for_grad``'s work (eager: it swaps the weight's data)."""
    w = module._parameters.get("weight")
    qs = None if w is None else w.__dict__.get("quant_state")
    if qs is None:
        return
    if qs.__dict__.get("packing_format_for_cpu", False):
        if module.training or (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
            unpack_cpu_repacked(module)
    else:
        remember_quant_state(module)  # (whatever decides that this call repacks: bnb's condition, not fastpeft's)


class _TrainUnpacks:
    """A guarded ``Linear4bit``'s own ``train(mode)``: switched to training, a repacked weight is unpacked first
    (``unpack_cpu_repacked``), eagerly, also for a model torch.compile then runs (its graphs cannot swap the
    weight's data). Held in the layer's ``__dict__``; pickles and deep-copies as (this class, the layer)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True):
        if mode:
            unpack_cpu_repacked(self.module)
        return type(self.module).train(self.module, mode)

    def __reduce__(self):
        return _TrainUnpacks, (self.module,)


def unpack_for_grad(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of a bnb ``Linear4bit`` (``guard_repacked_layers``): a weight bnb repacked for its CPU
    inference kernel is unpacked before a call in train mode or on an input that requires grad. bnb keeps the
    repacked weight and runs every later call on that kernel, which has no backward: the input's gradient is
    silently dropped (a bias makes it raise instead). Before a call on which bnb repacks, the block scales are kept
    (``remember_quant_state``). Nothing while torch.compile traces: there the layer's ``train()`` has unpacked
    the weight already (``_TrainUnpacks``). Removes itself once the weight is on another device."""
    w = module._parameters.get("weight")
    if w is None or w.device.type != "cpu":
        hooks = module._forward_pre_hooks
        for key in [k for k, f in hooks.items() if f is unpack_for_grad]:
            del hooks[key]
        return
    if torch.compiler.is_compiling():
        return
    _unpack(module, args[0] if args else kwargs.get("x", kwargs.get("input")))


def guard_repacked_layers(model: nn.Module, skip=()) -> int:
    """Give every bnb ``Linear4bit`` of ``model`` (or ``model`` itself) on a CPU bnb repacks for (AVX512-BF16)
    ``unpack_cpu_repacked`` as a state_dict and load_state_dict pre-hook, a ``train`` that unpacks
    (``_TrainUnpacks``) and, except the modules in ``skip`` (the bases of fastpeft's own layers, which unpack what
    they read and keep the scales themselves: no per-call hook there), the forward pre-hook ``unpack_for_grad``,
    each once; returns how many got the forward hook. Without them, one eval-mode call of a 4-bit model (an
    evaluation before training, a generate) leaves the layers fastpeft does not wrap passing no gradient to their
    inputs in training: with LoRA on q_proj / v_proj only (PEFT's default for Llama), o_proj drops every gradient
    and no adapter trains (PEFT + bitsandbytes: every LoRA gradient None; seen 2026-12-01, bitsandbytes 0.50.2); and
    a state_dict() of a repacked layer re-quantizes (nested) or scrambles (not nested) its block scales. ``inject``,
    ``accelerate`` and ``QLoRALinear`` call it."""
    skip = {id(m) for m in skip}
    n = 0
    for m in model.modules():
        if _bnb_class_name(m) != "Linear4bit" or not m.__dict__.get("support_avx512bf16_for_cpu"):
            continue
        w = m._parameters.get("weight")
        if w is None or w.device.type != "cpu":
            continue
        remember_quant_state(m)
        if unpack_cpu_repacked not in m._state_dict_pre_hooks.values():
            m.register_state_dict_pre_hook(unpack_cpu_repacked)
            m.register_load_state_dict_pre_hook(unpack_cpu_repacked)  # (the file holds the plain layout)
        if "train" not in m.__dict__:  # (fastpeft's own bases too: a compiled graph must not unpack as it reads)
            m.__dict__["train"] = _TrainUnpacks(m)
        if id(m) in skip or unpack_for_grad in m._forward_pre_hooks.values():
            continue
        m.register_forward_pre_hook(unpack_for_grad, with_kwargs=True)
        n += 1
    return n


def kept_quantized_weight(module: nn.Module, kept) -> tuple:
    """``(QuantizedWeight.from_module(module), kept')`` where ``kept`` is what the caller kept from its last call
    (None at first) and ``kept'`` what to keep for the next (``kept`` itself when still valid, or while
    torch.compile traces: nothing is kept then). The view is reused while bnb's objects stay the same: the weight
    Parameter (identity, storage, version), its quant_state (identity, CPU packing flag) or int8 CB / SCB, and the
    layer's compute dtype; rebuilt when one changes (merge / unmerge requantize into a new Parameter, ``.to()`` and
    bnb's CPU repacking swap the data). Building it costs 5 µs a call; the check under 1 µs. Serves
    ``QLoRALinear.quantized_weight`` and ``fastpeft.accelerate``'s 4-bit layers."""
    w = module._parameters.get("weight")
    if w is None or tracing_or_transformed():
        return QuantizedWeight.from_module(module), kept
    d = w.__dict__  # bnb's attributes, without Params4bit's __torch_function__ (1.5 µs a read)
    qs, st = d.get("quant_state"), module.__dict__.get("state")
    objs = (w, qs, d.get("CB"), d.get("SCB"), getattr(st, "SCB", None))
    with _NO_TORCH_FUNCTION():
        state = (w.data_ptr(), tensor_version(w))
    packed = qs is not None and qs.__dict__.get("packing_format_for_cpu", False)  # QuantState's getattr: 0.7 µs
    state += (packed, module.__dict__.get("compute_dtype"))
    if kept is None or kept[1] != state or not all(map(operator.is_, objs, kept[0])):
        kept = (objs, state, QuantizedWeight.from_module(module))
    return kept[2], kept


def dequantized_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The 4-bit weight's per-block scales (blocks,) as fp32, un-nesting them as bnb does (fp32 throughout)."""
    if not qw.nested:
        return qw.absmax.float()
    q = qw.absmax.reshape(-1).to(torch.int64)
    blk = torch.arange(q.numel(), device=q.device) // qw.nested_blocksize
    return qw.nested_code.float()[q] * qw.nested_absmax.float()[blk] + qw.offset.float()


def dequantize_ref(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (out, in), bit-exact with bitsandbytes' dequantization, then cast to ``dtype``.

    4-bit: ``code[nibble] * absmax[block]`` in fp32 cast to ``qw.dtype`` (what ``dequantize_4bit`` returns),
    then to ``dtype`` when given. int8: ``CB * SCB * (1/127)`` in fp32 (``int8_vectorwise_dequant``), then
    ``dtype``. Plain PyTorch on any device; allocates the (out, in) result and nothing is kept.
    """
    out_f, in_f = qw.shape
    n = out_f * in_f
    if qw.kind == "int8":
        w = qw.data * qw.scales.view(-1, 1) * INT8_INV_SCALE
    else:
        # One gather per byte from a 256-entry table of (high, low) nibble values: no per-nibble index tensor.
        code = qw.code.float()
        pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=-1)  # byte b -> (code[b>>4], code[b&15])
        vals = pairs[qw.data.reshape(-1).to(torch.int64)].reshape(-1)[:n]
        absmax = dequantized_absmax(qw)
        bs = qw.blocksize
        full = n - n % bs
        w = torch.empty(n, device=vals.device, dtype=torch.float32)
        w[:full] = (vals[:full].view(-1, bs) * absmax[:full // bs, None]).view(-1)
        if full < n:
            w[full:] = vals[full:] * absmax[full // bs]
        w = w.to(qw.dtype).view(out_f, in_f)
    return w if dtype is None else w.to(dtype)


def _dequantize_4bit_torch(qw: QuantizedWeight) -> torch.Tensor:
    """``dequantize_ref(qw)`` for a 4-bit weight, bit for bit, by a faster PyTorch route (any device): the
    256-entry byte table holds each byte's two fp32 values as one 8-byte word, gathered by ``index_select`` with
    int32 indices (a copy of bits, no arithmetic: a word's high half is a finite fp32, never a float64 NaN), then
    the block scales multiplied in place. 15-25x faster than ``dequantize_ref``'s float gather on a CPU
    (1024x1000 NF4: ~0.4 ms against 6-10 ms); the fallback where bitsandbytes' own kernel does not apply."""
    out_f, in_f = qw.shape
    n = out_f * in_f
    code = qw.code.float()
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=-1)  # byte b -> (code[b>>4], code[b&15])
    words = pairs.view(torch.float64).view(256)
    vals = words.index_select(0, qw.data.reshape(-1).to(torch.int32)).view(torch.float32)[:n]
    absmax = dequantized_absmax(qw)
    bs = qw.blocksize
    full = n - n % bs
    vals[:full].view(-1, bs).mul_(absmax[:full // bs, None])
    if full < n:
        vals[full:].mul_(absmax[full // bs])
    return vals.view(out_f, in_f).to(qw.dtype)


# bitsandbytes' native CPU dequantizers, looked up once by name: None where the library has no such symbol.
_NATIVE: dict = {}
_NATIVE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _bnb_cpu_symbol(name: str):
    """The C function ``name`` of bitsandbytes' native library (already imported), or None: a CUDA-less build
    stands in a mock that raises on every call, and an older or newer build may lack the symbol."""
    if name not in _NATIVE:
        ext = sys.modules.get("bitsandbytes.cextension")
        if ext is None:
            return None  # not imported (yet): looked up again next time
        _NATIVE[name] = getattr(getattr(getattr(ext, "lib", None), "_lib", None), name, None)
    return _NATIVE[name]


def _dequantize_4bit_native(qw: QuantizedWeight, out: torch.Tensor | None = None):
    """The 4-bit weight (out, in) in ``qw.dtype`` (written into ``out`` when it is a buffer of that dtype, see
    ``dequantize_weight``) by bitsandbytes' own CPU C kernels, called as its CPU backend
    calls them (``bitsandbytes/backends/cpu/ops.py``) but directly: the two ``torch.library`` dispatches of
    ``bitsandbytes.functional.dequantize_4bit`` (nested absmax, then the values) cost ~13 us a call on the CPU,
    more than the kernels themselves on a small layer. None where that route does not apply: not on the CPU, the
    symbols missing, in_features odd or not a multiple of the block size (bnb's kernel indexes absmax per row:
    the same as the flat layout only then), block size >= 2048 (bnb itself falls back there on AVX-512), or
    tensors not in the layout the kernels read, or under ``torch.compile`` (dynamo cannot trace a ctypes call; bnb's
    ``torch.library`` ops it can) or ``torch.func`` transforms (tensors made there have no data pointer to pass).
    Bit for bit ``dequantize_ref(qw)`` (tested)."""
    out_f, in_f = qw.shape
    bs = qw.blocksize
    if tracing_or_transformed() or qw.data.device.type != "cpu" \
            or in_f % 2 or in_f % bs or bs >= 2048 or qw.dtype not in _NATIVE_DTYPES or not qw.data.is_contiguous():
        return None
    values = _bnb_cpu_symbol(f"cdequantize_blockwise_cpu_{qw.kind}_{_NATIVE_DTYPES[qw.dtype]}")
    if values is None:
        return None
    absmax = qw.absmax
    if qw.nested:
        state2 = getattr(qw.quant_state, "state2", None)
        blockwise = _bnb_cpu_symbol("cdequantize_blockwise_cpu_fp32")
        if blockwise is None or getattr(state2, "dtype", torch.float32) != torch.float32 \
                or absmax.dtype != torch.uint8 or qw.nested_absmax.dtype != torch.float32 \
                or qw.nested_code.dtype != torch.float32 or not absmax.is_contiguous() \
                or qw.nested_code.device.type != "cpu":
            return None
    # W (when not in ``out``) before the scales' temporary: with the small temporary allocated (and freed) after
    # it, glibc reuses W's memory from call to call instead of trimming it and faulting it in again (1024x1024
    # fp32, M = 1, one thread: 0 page faults a call against 100-550, and 0.52 ms against 0.6-1.4 ms a forward +
    # backward, over 5 processes)
    w = _dense_out(out, qw.dtype, (out_f, in_f))
    if qw.nested:
        # bnb's dequantize_blockwise(absmax, state2) + offset, in fp32
        codes, absmax = absmax, torch.empty(absmax.shape, dtype=torch.float32)
        blockwise(ct.c_void_p(qw.nested_code.data_ptr()), ct.c_void_p(codes.data_ptr()),
                  ct.c_void_p(qw.nested_absmax.data_ptr()), ct.c_void_p(absmax.data_ptr()),
                  ct.c_longlong(qw.nested_blocksize), ct.c_longlong(codes.numel()))
        absmax += qw.offset
    else:
        absmax = absmax.float().contiguous()
    values(ct.c_void_p(qw.data.data_ptr()), ct.c_void_p(absmax.data_ptr()), ct.c_void_p(w.data_ptr()),
           ct.c_longlong(bs), ct.c_longlong(out_f), ct.c_longlong(in_f))
    return w


_SHARED_WORKSPACES: dict = {}        # (device, dtype) -> flat buffer, on accelerators (calls ordered on the stream)
_THREAD_WORKSPACES = threading.local()  # .bufs: the same dict for this thread, on the CPU (threads run at once)


def workspace(device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of ``numel`` elements for a weight dequantized for one call (a layer's forward, or backward's
    dX), shared by every quantized layer: its size is the largest layer's, not the model's. One per (device,
    dtype); on the CPU one per thread as well, since two threads' calls run at once there. Grown, never shrunk;
    allocated outside inference mode (an inference tensor could not be written by a later training step).

    Why not a fresh tensor per call: a CPU allocation above glibc's mmap threshold (32 MiB at most: every 4096 x
    4096 fp32 weight) is mapped and unmapped at each call and faulted in page by page, which costs more than the
    dequantization itself (4096 x 4096 int8, M = 1: 23 ms a forward fresh against 6 ms in a kept buffer).

    A fresh tensor instead: under ``torch.compile`` (a module-level buffer mutated inside a graph is the
    compiler's to manage), under ``torch.func`` transforms (they refuse in-place writes to a captured tensor), and
    during CUDA graph capture (a buffer grown later would free memory the graph still writes; a fresh one comes
    from the graph's own pool). On an accelerator the buffer is shared by host threads too: two threads driving
    one GPU through the quantized layers at once would interleave their dequantizations."""
    device = torch.device(device)
    if tracing_or_transformed() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.empty(numel, device=device, dtype=dtype)
    if device.type == "cpu":
        bufs = getattr(_THREAD_WORKSPACES, "bufs", None)
        if bufs is None:
            bufs = _THREAD_WORKSPACES.bufs = {}
    else:
        bufs = _SHARED_WORKSPACES
    key = (device, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs[key] = buf = None  # the smaller one freed before the larger one is allocated
        with torch.inference_mode(False):
            buf = bufs[key] = torch.empty(numel, device=device, dtype=dtype)
    return buf[:numel]


def release_workspaces() -> None:
    """Free the workspaces of this thread (CPU) and of every accelerator; the next call allocates again."""
    _SHARED_WORKSPACES.clear()
    getattr(_THREAD_WORKSPACES, "bufs", {}).clear()


def weight_workspace(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``workspace`` sized for ``qw``'s dense weight in ``dtype`` (flat, out*in elements)."""
    return workspace(qw.device, dtype, qw.shape[0] * qw.shape[1])


def call_buffer(qw: QuantizedWeight, dtype: torch.dtype, saved: bool) -> torch.Tensor | None:
    """Where a PyTorch-path call puts the weight it dequantizes (``dequantize_weight``'s ``out``): the CPU
    workspace, or None (a fresh tensor) where autograd will save W (``saved``: the next quantized layer's call
    overwrites the workspace, and bitsandbytes' C dequantizer writes it without bumping the version counter, so
    autograd would not notice) and off the CPU (bitsandbytes' dequantizer allocates its result there anyway,
    and the caching allocator reuses memory without page faults)."""
    return None if saved or qw.device.type != "cpu" else weight_workspace(qw, dtype)


def _dense_out(out: torch.Tensor | None, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """``out``'s first elements as a (out, in) tensor when it has ``dtype``, else a fresh one."""
    if out is not None and out.dtype == dtype:
        return out.view(-1)[:shape[0] * shape[1]].view(shape)
    return torch.empty(shape, dtype=dtype, device=out.device if out is not None else None)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_ref(qw, dtype)``, bit for bit, by the fastest exact route. 4-bit: on the CPU bitsandbytes' own
    C kernels called directly (``_dequantize_4bit_native``; 1024x1024 NF4 on this CPU: ~0.13 ms, against ~0.4 ms
    for ``_dequantize_4bit_torch`` and ~6 ms for ``dequantize_ref``), elsewhere bnb's ``dequantize_4bit`` where its
    layout agrees with the flat one (in_features a multiple of the block size), ``_dequantize_4bit_torch``
    otherwise. int8: in place in one fp32 tensor. A fresh tensor per call (nothing kept), or written into ``out``
    (a contiguous buffer of ``dtype`` with at least out*in elements, e.g. ``workspace``'s; a route that produces
    another dtype first still allocates that intermediate). The QLoRA op's reference path, merging and
    ``QLoRALinear``'s base forward use it."""
    if out is not None and (dtype is None or out.dtype != dtype or not out.is_contiguous()
                            or out.numel() < qw.shape[0] * qw.shape[1]):
        raise ValueError(f"dequantize_weight: out must be a contiguous {dtype} buffer of at least "
                         f"{qw.shape[0] * qw.shape[1]} elements, got {out.dtype} {tuple(out.shape)}")
    w, written = None, False  # written: w is out's (the route wrote there)
    if qw.kind == "int8" and qw.scales.dtype == torch.float32:
        # dequantize_ref's CB * SCB * (1/127) as one fp32 copy and two in-place products (the same roundings):
        # no int8 -> fp32 temporaries beside the result
        w = _dense_out(out, torch.float32, qw.shape).copy_(qw.data)
        w.mul_(qw.scales.view(-1, 1)).mul_(INT8_INV_SCALE)
        written = out is not None and out.dtype == torch.float32
    elif qw.kind != "int8" and qw.quant_state is not None and "bitsandbytes" in sys.modules:
        w = _dequantize_4bit_native(qw, out)
        written = w is not None and out is not None and out.dtype == qw.dtype
        if w is None and qw.in_features % qw.blocksize == 0:
            w = sys.modules["bitsandbytes"].functional.dequantize_4bit(qw.data.reshape(-1, 1), qw.quant_state)
    if w is None:
        w = _dequantize_4bit_torch(qw) if qw.kind != "int8" else dequantize_ref(qw)
    if out is None:
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    return w if written else out.view(-1)[:w.numel()].view(w.shape).copy_(w)  # copy_ casts as .to(dtype) does


def _layer_label(module: nn.Module, name: str) -> str:
    return f"module {name!r}" if name else f"the {type(module).__name__} layer"


def merged_weight(module: nn.Module, delta: torch.Tensor, dequantize: bool = False, name: str = "",
                  safe_merge: bool = False, round_to_weight: bool = False):
    """What merging ``delta`` (out, in) (a LoRA ``s B A``) into a bitsandbytes layer gives, built whole and not yet
    assigned (``module`` untouched), so that a model-level merge can build every layer's result first and swap
    them in only when all succeeded.

    ``dequantize=True``: a new plain ``nn.Linear`` (weight ``dequantize_weight(W) + delta`` in bnb's dequantized dtype,
    the bias copied) on the layer's device. ``dequantize=False``: PEFT's merge: dequantize, add, requantize into a
    new ``Params4bit`` / ``Int8Params`` with the layer's settings, with a warning that this is lossy. Raises naming
    the module: non-finite values with ``safe_merge``, bitsandbytes unable to quantize (no backend for the device).
    ``round_to_weight``: the sum rounded to the dequantized weight's dtype first (PEFT's DoRA merge does so).
    """
    label = _layer_label(module, name)
    qw = QuantizedWeight.from_module(module, name)
    if tuple(delta.shape) != tuple(qw.shape):
        raise ValueError(f"{label}: delta must have the weight's shape {tuple(qw.shape)}, got {tuple(delta.shape)}")
    w = dequantize_weight(qw)
    # in the wider of the two dtypes, as PEFT's bnb merge adds them: a bf16 W and an fp32 delta are rounded once,
    # when requantized (or cast for dequantize=True), not the delta first
    merged = w + delta.to(device=w.device)
    if round_to_weight:  # PEFT's DoRA merge rounds W' to the weight's dtype before requantizing
        merged = merged.to(w.dtype)
    if safe_merge and not bool(torch.isfinite(merged).all()):
        raise ValueError(f"{label}: the merged weight has non-finite values; the adapter seems to be broken")
    if dequantize:
        bias = getattr(module, "bias", None)
        lin = nn.Linear(qw.in_features, qw.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(merged)
            if bias is not None:
                lin.bias.copy_(bias.detach().to(w.dtype))
        lin.requires_grad_(False)
        return lin
    bnb = import_bitsandbytes()
    warnings.warn(f"{label}: merging a LoRA adapter into a {qw.kind} bitsandbytes layer requantizes its weight, "
                  f"which is lossy (outputs differ from the unmerged layer by the quantization error); use "
                  f"merge_and_unload(model, dequantize=True) for an exact floating-point model", UserWarning,
                  stacklevel=3)
    old = module.weight
    try:
        if qw.kind == "int8":
            new = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False,
                                    has_fp16_weights=old.has_fp16_weights).to(old.device)
        else:
            kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}
            kwargs.pop("data", None)
            kwargs["requires_grad"] = False
            if "bnb_quantized" in kwargs:
                kwargs["bnb_quantized"] = False
            kwargs["quant_state"] = None
            # the sum as it is (a bf16 W plus an fp32 delta: fp32), as PEFT quantizes it: rounded once, by the
            # quantization, and its quant_state then dequantizes to that dtype (PEFT's bytes, bit for bit)
            new = bnb.nn.Params4bit(merged.to("cpu"), **kwargs).to(old.device)
            if getattr(new, "quant_state", None) is None:
                raise RuntimeError("bitsandbytes returned an unquantized weight")
    except Exception as exc:  # a device bnb cannot quantize on, a broken install: say which module and why
        raise RuntimeError(f"{label}: cannot requantize the merged weight ({type(exc).__name__}: {exc}); the layer is "
                           f"unchanged. Use merge_and_unload(model, dequantize=True) for a floating-point model") from exc
    return new


def assign_merged_weight(module: nn.Module, new) -> nn.Module:
    """Put a requantized weight from ``merged_weight(..., dequantize=False)`` into its layer (cannot fail)."""
    module.weight = new
    if _bnb_class_name(module) == "Linear8bitLt" and getattr(module, "state", None) is not None:
        module.state.reset_grads()  # as PEFT: the int8 state is rebuilt from the new weight
    elif _bnb_class_name(module) == "Linear4bit":
        remember_quant_state(module)  # (the new QuantState's scales, for bnb's CPU repacking)
    return module


def merge_into_quantized(module: nn.Module, delta: torch.Tensor, dequantize: bool = False, name: str = "",
                         safe_merge: bool = False) -> nn.Module:
    """Merge ``delta`` into a bitsandbytes layer, following PEFT (see ``merged_weight``): ``dequantize=True`` returns a
    new plain ``nn.Linear`` and leaves ``module`` as it was; ``dequantize=False`` requantizes (lossy, warned) and
    changes ``module`` in place, returning it. On failure the layer is left as it was."""
    result = merged_weight(module, delta, dequantize, name, safe_merge)
    return result if dequantize else assign_merged_weight(module, result)


def dequantized_linear(module: nn.Module, name: str = "") -> nn.Linear:
    """A plain floating-point ``nn.Linear`` copy of a bitsandbytes layer (no adapter merged)."""
    qw = QuantizedWeight.from_module(module, name)
    return merge_into_quantized(module, torch.zeros(qw.shape, device=qw.device), dequantize=True, name=name)



def peft_numel(p: torch.Tensor) -> int:
    """``p``'s parameter count as PEFT's ``get_nb_trainable_parameters`` reports it: a 4-bit ``Params4bit`` holds
    two weights per byte of its storage, so its numel times 2 x the storage's item size."""
    n = p.numel()
    if type(p).__name__ == "Params4bit":
        n *= 2 * p.element_size()
    return n
