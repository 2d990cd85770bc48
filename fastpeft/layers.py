"""fastpeft's ``nn.Module``s: ``FastLoRALinear``, ``SparseDeltaLinear``, the ``SparseDelta`` they share,
``ModulesToSaveWrapper`` and ``TrainableTokensWrapper`` (PEFT's trainable tokens).

- ``TunerLayer`` (PEFT's ``BaseTunerLayer``): a frozen base weight and bias taken from an ``nn.Linear``,
  and merge / unmerge / ``to_linear`` of the layer's ``delta_weight()``.
- ``SparseDelta``: a trainable sparse delta Δ on a few of a weight's entries (``delta_indices`` buffer,
  ``delta_values`` Parameter). ``SparseDeltaLinear`` is one on its own base; a RoSA adapter of a
  ``FastLoRALinear`` holds one in ``sparse_deltas[name]``.
- ``FastLoRALinear``: each adapter owns plain Parameters, ``lora_A`` (r, in) and ``lora_B`` (out, r). The
  many-adapter kernels read two stacks, A (n, r_max, in) and B (n, out, r_max), zero beyond each
  adapter's rank. A training step builds them from the Parameters (so gradients reach them); without
  gradients they are built once and cached until a Parameter changes (another object, an in-place
  write, a move), which is what inference on mixed batches reads.
- ``FastLoRAParameter`` (PEFT's ``ParamWrapper``, ``target_parameters``): LoRA on one 2-D / 3-D Parameter of a module,
  nested one layer per Parameter; a transformers experts module's expert weights through ``lora_experts``.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import operator
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import (LOFTQ_DEFAULTS, base_rewriting_init, check_adapter_name, check_bool, check_dora_options,
                      check_dropout, check_embedding, check_embedding_ids, check_finite_number, check_in_features,
                      check_init, check_linear, check_loftq_config, check_lora_bias, check_rank, check_sparse_delta,
                      check_sparse_options, check_tensor, expand_adapter_ids, experts_reason, routed_batch,
                      up_projection)
from .functional import (dora_conv, dora_linear, lora_conv, lora_experts, lora_linear, lora_linear_multi,
                         lora_sparse_linear, qlora_linear, resolve_backend, sparse_delta_linear)
from .ops.common import (cast_params, held, kept_state, kept_transpose, optimizer_steps, outside_inference_mode,
                         tensor_version)
from .ops.conv import CONV_FNS
from .ops.dora import weight_sq_norms
from .ops.experts import grouped_mm_refusal, peft_expert_factors
from .quant import (QuantizedWeight, assign_merged_weight, base_kind, bnb_cpu_serves, call_buffer, conv1d_class,
                    dequantize_weight, guard_repacked_layers, is_conv1d, is_quantized, kept_quantized_weight,
                    import_bitsandbytes, merged_weight, remember_quant_state)
from .reference import dense_delta_ref, multi_lora_add, tracing_or_transformed, use_cpu_path
from .selection import SparseSpec


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass
class AdapterSpec:
    """Hyper-parameters of one low-rank adapter of a layer (its sparse delta, if any, is its SparseDelta's)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool = False  # DoRA: a magnitude vector rescales each output row (lora_magnitude_vector)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def _spec(r, lora_alpha, lora_dropout, use_rslora) -> AdapterSpec:
    check_rank(r)
    alpha = check_finite_number(lora_alpha, "lora_alpha")
    if alpha == int(alpha):
        alpha = int(alpha)  # keep PEFT's JSON ints as ints
    check_bool(use_rslora, "use_rslora")
    return AdapterSpec(r, alpha, check_dropout(lora_dropout), use_rslora)


def rosa_spec(sparse_density, sparse_block_size=1, sparse_selection="random") -> SparseSpec | None:
    """The sparse delta that ``FastLoRALinear`` / ``LoraConfig``'s ``sparse_*`` arguments ask for (None at
    density 0: LoRA alone)."""
    check_sparse_options(sparse_density, sparse_block_size, sparse_selection, "sparse_", allow_zero=True)
    return SparseSpec(sparse_density, sparse_block_size, sparse_selection) if sparse_density > 0.0 else None


def _conv1d_type():
    conv = conv1d_class()
    if conv is None:
        raise RuntimeError("a layer made from a transformers Conv1D needs transformers imported to rebuild it")
    return conv


# What a layer's calls keep in its __dict__ (eval-mode casts, DoRA's m / n, the transposed view of a W stored
# (in, out)).
_KEPT_KEYS = ("_dora_gain", "_casts", "_value_casts", "_wt")


def with_lora_bias(bias, lora_bias, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``b + s b_B`` (PEFT's lora_bias: B's bias joins the layer's), summed in fp32 (fp64 for fp64) and rounded once to
    ``dtype``; differentiable in both."""
    acc = torch.promote_types(dtype, torch.float32)
    added = scaling * lora_bias.to(acc)
    return (added if bias is None else bias.to(acc) + added).to(dtype)


def module_shell(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` without its weight and bias (their entries None): what a layer keeps, unregistered,
    to give the module itself back in ``base_module()`` (its class, hooks and attributes) without holding its old
    tensors once the layer's own are replaced (``load_state_dict(assign=True)``, FSDP2)."""
    shell = copy.copy(module)
    shell._parameters = {k: (None if k in ("weight", "bias") else v) for k, v in module._parameters.items()}
    shell._buffers = dict(module._buffers)
    return shell


def _refused(message: str):
    """A constructor classmethod a layer class refuses (it wraps another kind of module): raises ``TypeError(message)``,
    which names the constructor to use."""
    def refuse(cls, *args, **kwargs):
        raise TypeError(message)
    refuse.__doc__ = f"Refused: {message}."
    return classmethod(refuse)


def _entry(params: nn.ParameterDict, name: str):
    """``params[name]``, read from the ParameterDict's own table: its ``[]`` goes through nn.Module's
    ``__getattr__`` (1.1 µs a read, a fifth of a decode forward's host time for A and B). Falls back to
    ``[]`` where the table lacks the name (a wrapper that set it as a plain attribute)."""
    p = params._parameters.get(name)
    return p if p is not None else params[name]


# ---- the shared base ---------------------------------------------------------------------------------

class TunerLayer(nn.Module):
    """What the adapter layers share (PEFT's ``BaseTunerLayer``): the frozen base ``weight`` (out, in) and
    ``bias``, shared with the ``nn.Linear`` they wrap, and folding ``delta_weight()`` (out, in) into it."""

    _delta_name = "adapter"  # for messages
    _rows_per_sequence = 1  # the rows_per_sequence of the mixed_batch block routing the layer (set_routing)
    fan_in_fan_out = False  # made from transformers' Conv1D (``FastLoRALinear.from_conv1d``): weight stored (in, out)
    _stored_in_out = False  # weight stored (in, out): a Conv1D's, an embedding's (num_embeddings, embedding_dim)

    def _init_base(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        shape = weight.shape if weight.dim() == 2 else (weight.shape[0], weight[0].numel())  # a kernel: (O, C·K)
        self.out_features, self.in_features = shape[::-1] if self._stored_in_out else shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        self.merged = False

    def _w(self) -> torch.Tensor:
        """W (out, in): the registered ``weight``, or where it is stored (in, out) (a Conv1D's own Parameter, an
        embedding's (num_embeddings, embedding_dim)) its transpose, a view read in place. The same view object is
        returned while the Parameter, its memory, dtype and device are (DoRA's norm cache keys on identity), and a
        fresh one while tracing or while W requires grad (no autograd node kept between calls)."""
        params = self._parameters
        w = params["weight"] if "weight" in params else self.weight
        return kept_transpose(self.__dict__, "_wt", w) if self._stored_in_out else w

    def delta_weight(self) -> torch.Tensor:
        """What ``merge`` adds to the weight: (out, in), in the weight's dtype."""
        raise NotImplementedError

    def _kept(self) -> dict | None:
        """Where no-grad calls keep values between calls (casts, DoRA's norm): the module's dict in eval mode, None
        in training mode, where each call computes them afresh as PEFT does (a validation pass without ``eval()``
        after a hand-written update through ``.data``, which bumps no version, sees it)."""
        return None if self.training else self.__dict__

    def train(self, mode: bool = True):
        """``nn.Module.train``, the values kept between no-grad calls dropped first (the mixed-batch stacks, DoRA's
        ‖W‖² and m / n, the casts of fp32 adapters): they follow the Parameters' versions and optimizer steps, and a
        write through ``.data`` (seen by neither) is then seen at the next mode switch, as evaluation after training
        makes one. Only on a switch: Trainer calls ``train()`` at every step, and a captured CUDA graph may read
        them."""
        if bool(mode) != self.training:
            self._drop_kept()
        return super().train(mode)

    def _drop_kept(self) -> None:
        """Forget what calls keep (the casts of fp32 adapters, DoRA's norm): at a mode switch, and at ``.to()`` /
        ``.cuda()`` (which swap the Parameters' data: the kept tensors would hold the old memory, on the device it
        left, until the next call)."""
        for key in _KEPT_KEYS:
            self.__dict__.pop(key, None)

    def _apply(self, fn, *args, **kwargs):
        self._drop_kept()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """nn.Module's state without what calls keep (``_drop_kept``'s keys): a deepcopy or pickle would copy a cached
        view of W apart from W itself (a second full W in the copy until its next call)."""
        state = dict(self.__dict__)
        for key in _KEPT_KEYS:
            state.pop(key, None)
        return state

    def has_delta(self) -> bool:
        """Whether there is a delta to merge (a ``FastLoRALinear``: an active adapter)."""
        return True

    def sparse_delta(self, adapter_name: str | None = None):
        """The ``SparseDelta`` of the layer (of adapter ``adapter_name``; default the active one), or None."""
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the weight in place (W += ΔW); forward is then a plain linear. The weight's
        storage is shared with the wrapped ``nn.Linear``, which sees the change too."""
        if self.merged:
            raise RuntimeError(f"merge: the {self._delta_name} is already merged")
        if not self.has_delta():
            raise RuntimeError(f"merge: no active {self._delta_name} to merge (set_adapter first)")
        self._w().add_(self._exact_delta())  # W + ΔW rounded once to W's dtype, as PEFT's merge
        self.merged = True

    def _exact_delta(self) -> torch.Tensor:
        """ΔW as merging adds it: ``delta_weight`` (in W's dtype) here; in fp32 where the layer computes it so
        (a bf16 W then takes W + ΔW rounded once, not ΔW rounded first)."""
        return self.delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W -= ΔW). Exact up to the weight dtype's rounding."""
        if not self.merged:
            raise RuntimeError(f"unmerge: the {self._delta_name} is not merged")
        self._w().sub_(self._exact_delta())
        self.merged = False

    def base_module(self) -> nn.Module:
        """The plain module in this layer's place, holding its weight and bias Parameters (no copy): an
        ``nn.Linear``, or for a layer made ``from_conv1d`` a transformers ``Conv1D``."""
        if self.fan_in_fan_out:
            with torch.device("meta"):
                conv = _conv1d_type()(self.out_features, self.in_features)
            conv.weight = self.weight
            conv.bias = self.bias
            return conv
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding W + ΔW (and a copy of b); this layer is left untouched."""
        w = self._w().detach().clone()
        if not self.merged and self.has_delta():
            w += self._exact_delta()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin


def _call_routing(module, adapter_ids=None):
    """``(routing, k)`` routing this call of ``module`` (a LoRA layer or a modules_to_save wrapper): its
    ``mixed_batch`` block's (``set_routing``), None without one or with ``adapter_ids``. An activation checkpoint's
    recomputation in backward reads it too: backward inside the block (after it, the recomputation would run
    without the routing)."""
    if adapter_ids is not None or module._routing is None:
        return None
    return module._routing, module._rows_per_sequence


def _per_row(ids: torch.Tensor, per: int) -> torch.Tensor:
    """``mixed_batch``'s ids (one per sequence) repeated for the ``per`` consecutive rows each sequence became
    (``routed_batch``)."""
    return ids if per == 1 else ids.repeat_interleave(per)


# ---- sparse deltas -----------------------------------------------------------------------------------

class _SparsePlanCache:
    """What the op derives from a delta's indices, kept for the next call: the triton path's tile bucketing /
    block map, or the CPU path's ``CPUPlan``; rebuilt when the indices change (another tensor or storage, an
    in-place write: data pointer, version, shape). Writes that bypass the version counter (through ``.data`` or
    a numpy view) are not seen: change a layer's indices in place, or assign new ones."""

    def __init__(self):
        self.key, self.plan = None, None

    def get(self, op: str, x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, block_size: int):
        # While torch.compile traces, the op builds the plan inside the graph (no host sync): the cache key
        # holds a data pointer, which dynamo cannot compare (nor can a functorch-wrapped tensor give one). Inference
        # tensors have no version counter.
        if tracing_or_transformed() or indices.is_inference():
            return None
        backend = resolve_backend(op, None, x, weight)
        cpu = backend == "reference" and use_cpu_path(x)
        if backend != "triton" and not cpu:
            return None
        key = (indices.data_ptr(), indices._version, tuple(indices.shape), x.device, tuple(weight.shape), block_size,
               cpu)
        if key != self.key:
            if cpu:
                from .ops.sparse_cpu import CPUPlan

                self.plan = CPUPlan(indices, weight.shape[0], weight.shape[1], block_size)
            else:
                from .ops.sparse import build_sparse_plan

                self.plan = build_sparse_plan(indices, weight.shape[0], weight.shape[1], block_size, x.device)
            self.key = key
        return self.plan


def _values_shape(indices: torch.Tensor, block_size: int) -> tuple:
    return (indices.shape[0],) if block_size == 1 else (indices.shape[0], block_size, block_size)


class SparseDelta(nn.Module):
    """A trainable sparse delta Δ (out, in) on a few entries of a frozen weight W, placed by a ``SparseSpec``.

    block_size 1: ``delta_indices`` (nnz,) flat row-major indices into W (a buffer), ``delta_values``
    (nnz,); block_size b: ``delta_indices`` (nblocks, 2) block (row, col), ``delta_values`` (nblocks, b, b).
    nnz (or nblocks) = round(density x entries (or blocks)). Δ starts at zero.
    """

    def __init__(self, weight: torch.Tensor, spec: SparseSpec, scores: torch.Tensor | None = None):
        super().__init__()
        self._init_delta(weight, spec, scores)

    def _init_delta(self, weight: torch.Tensor, spec: SparseSpec, scores: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        self.spec = spec
        idx = spec.select(weight, scores)
        self.register_buffer("delta_indices", idx)
        self.delta_values = nn.Parameter(torch.zeros(_values_shape(idx, spec.block_size), device=weight.device,
                                                     dtype=weight.dtype))
        self._plan = _SparsePlanCache()

    density = property(lambda self: self.spec.density)
    block_size = property(lambda self: self.spec.block_size)
    selection = property(lambda self: self.spec.selection)

    def dense_delta(self) -> torch.Tensor:
        """Δ as a dense (out, in) tensor (differentiable in delta_values)."""
        return dense_delta_ref(self.delta_indices, self.delta_values, self.out_features, self.in_features,
                               self.block_size)

    def sparse_plan(self, op: str, x: torch.Tensor, weight: torch.Tensor):
        """The triton path's tile plan of the positions (cached), or None where ``op`` does not run on triton."""
        return self._plan.get(op, x, weight, self.delta_indices, self.block_size)

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the delta's positions (and values: given, or zeros), checked first. The values Parameter
        stays the same object (its optimizer state must be reset if its size changed)."""
        b, current = self.block_size, self.delta_values
        check_sparse_delta(indices, values if values is not None else current.new_zeros(_values_shape(indices, b)),
                           self.out_features, self.in_features, b)
        idx = indices.to(device=current.device, dtype=torch.int64)
        new_values = (values.to(device=current.device, dtype=current.dtype).clone() if values is not None
                      else torch.zeros(_values_shape(idx, b), device=current.device, dtype=current.dtype))
        self.delta_indices = idx
        current.data = new_values

    def select_positions(self, weight: torch.Tensor, selection: str | None = None,
                         scores: torch.Tensor | None = None) -> None:
        """Pick new positions on ``weight`` (by ``selection``, default the spec's, which it then becomes) and
        reset the values to zero."""
        selection = selection or self.selection
        check_sparse_options(self.density, self.block_size, selection)
        spec = replace(self.spec, selection=selection)
        self.set_delta(spec.select(weight, scores))  # checked (a merged layer refuses) before the spec changes
        self.spec = spec


class SparseDeltaLinear(TunerLayer, SparseDelta):
    """``y = x (W + Δ)^T + b``: W (and b) frozen, Δ a trainable ``SparseDelta`` on a few of W's entries.

    Shapes: weight (out, in); the delta as ``SparseDelta``'s. ``selection``: "random", "magnitude"
    (largest |W|) or "scores" (largest |scores|, e.g. gradient magnitudes from
    ``fastpeft.select_by_gradients``).
    """

    _delta_name = "delta"

    def __init__(self, in_features, out_features, density=0.01, block_size=1, selection="random", bias=True,
                 device=None, dtype=None):
        nn.Module.__init__(self)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_rank(v, name)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, density, block_size, selection, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, density=0.01, block_size=1, selection="random", scores=None):
        """Wrap ``linear``: shares (not copies) its weight and bias, and freezes them."""
        check_linear(linear)
        base_kind(linear)  # an nn.Linear with a forward of its own (or a quantized layer): refused, naming it
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, density, block_size, selection, scores)
        return self

    def _setup(self, weight, bias, density, block_size, selection, scores):
        spec = SparseSpec(density, block_size, selection)
        self._init_base(weight, bias)
        self._init_delta(weight, spec, scores)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density}, block_size={self.block_size}, selection={self.selection!r}, "
                f"entries={self.delta_values.numel()}, merged={self.merged}")

    active = True  # False: set_adapter(None), the base alone runs (a class default: layers pickled before it)

    def sparse_delta(self, adapter_name: str | None = None) -> SparseDelta:
        return self

    def has_delta(self) -> bool:
        return self.active

    def switch_refused(self, name) -> bool:
        """Whether ``set_adapter(name)`` refuses: the delta is merged and ``name`` would switch it off."""
        return self.merged and name is None

    def set_adapter(self, name) -> None:
        """Apply and train the delta (a name: the model's adapter), or run the base alone, the delta frozen (None)."""
        if self.switch_refused(name):
            raise RuntimeError("set_adapter(None) on a layer with its delta merged: unmerge() first")
        self.active = name is not None
        self.delta_values.requires_grad_(self.active)

    def delta_weight(self) -> torch.Tensor:
        return self.dense_delta().detach().to(self.weight.dtype)

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the delta's positions (and values: given, or zeros), checked first. The values
        Parameter stays the same object (its optimizer state must be reset if its size changed)."""
        if self.merged:
            raise RuntimeError("set_delta on a merged layer: call unmerge() first")
        super().set_delta(indices, values)

    def reselect(self, selection: str | None = None, scores: torch.Tensor | None = None) -> None:
        """Pick new positions (``selection``, default the layer's) and reset the values to zero."""
        self.select_positions(self.weight, selection, scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        check_in_features(x, self.in_features)
        if self.merged or not self.active:
            return F.linear(x, self.weight, self.bias)
        plan = self.sparse_plan("sparse_delta_linear", x, self.weight)
        values = self.delta_values
        if values.dtype != self.weight.dtype:  # fp32 values on a bf16 / fp16 base (inject's autocast_adapter_dtype)
            (values,) = cast_params((values,), self.weight.dtype, self._kept(), "_value_casts")
        return sparse_delta_linear(x, self.weight, self.bias, self.delta_indices, values, self.block_size,
                                   check=False, plan=plan)


# ---- LoRA --------------------------------------------------------------------------------------------

@torch.no_grad()
def base_rewriting_factors(w: torch.Tensor, r: int, scaling: float, init_lora_weights: str) -> tuple:
    """``(A (r, in), B (out, r), W - s B A)`` of PEFT's base-rewriting inits, from ``w`` (out, in) fp32, computed as
    PEFT's ``pissa_init`` / ``olora_init`` do (the same torch calls in the same order: a seed gives PEFT's bits).

    PiSSA: W = V S Uᵀ (``torch.linalg.svd``; ``"pissa_niter_<n>"``: ``torch.svd_lowrank(W, r, niter=n)``, randomized),
    A = diag(√(S_r / s)) U_rᵀ, B = V_r diag(√(S_r / s)), so s B A is W's best rank-r part. OLoRA: W = Q R (thin QR),
    A = R[:r], B = Q[:, :r]. The residual W - s B A then stands in W's place: the layer starts as its base."""
    if base_rewriting_init(init_lora_weights) == "olora":
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    else:
        if init_lora_weights == "pissa":
            v, sv, uh = torch.linalg.svd(w, full_matrices=False)
            vr, sr, uhr = v[:, :r], sv[:r] / scaling, uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(w, r, niter=int(init_lora_weights.rsplit("_", 1)[1]))
            sr, uhr = sr / scaling, ur.t()
        a = torch.diag(torch.sqrt(sr)) @ uhr
        b = vr @ torch.diag(torch.sqrt(sr))
    return a, b, w - scaling * b @ a


@torch.no_grad()
def loftq_factors(w: torch.Tensor, r: int, loftq_bits: int = 4, loftq_iter: int = 1) -> tuple:
    """``(A (r, in), B (out, r), Q)`` of PEFT's LoftQ init from ``w`` (out, in) fp32, computed as PEFT's
    ``loftq_init`` does (bitsandbytes' quantizers, the same SVD: PEFT's bits, on any device bitsandbytes runs on;
    PEFT's own needs a CUDA / XPU card).

    Alternates ``loftq_iter`` times: Q = dequant(quant(W - B A)) (from W at first; ``loftq_bits`` 4: bitsandbytes'
    NF4, blocks of 64, fp32 absmax, as ``Params4bit(compress_statistics=False)``; 8: its row-wise int8), then B A =
    the top-r part of W - Q (``torch.linalg.svd``: B = U_r √S_r, A = √S_r V_rᵀ). Q then stands in W's place, and
    Q + B A ≈ W. As in PEFT, the scaling s = alpha / r is not taken into account: the layer computes Q + s B A, which
    approximates W at s = 1 only (``loftq_scaling_warning``)."""
    bnb = import_bitsandbytes()
    res = w
    for i in range(loftq_iter):
        if loftq_bits == 4:
            q = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                                  quant_type="nf4").to(w.device)
            deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        else:
            q = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to(w.device)
            deq = bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).to(w.device)
        a, b = loftq_error_factors(w - deq, r)
        if i + 1 < loftq_iter:
            res = w - b @ a
    return a, b, deq


def loftq_error_factors(error: torch.Tensor, r: int) -> tuple:
    """``(A (r, in), B (out, r))``: the top-r part of a quantization error W - Q (out, in) fp32 as PEFT's LoftQ takes
    it (``torch.linalg.svd``: B = U_r √S_r, A = √S_r V_rᵀ; PEFT's bits: its product with diag(√S) has one non-zero
    term per entry, the same rounding as this scaling)."""
    u, sv, vh = torch.linalg.svd(error, full_matrices=False)
    root = torch.sqrt(sv[:r])
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous()


@torch.no_grad()
def corda_factors(w: torch.Tensor, eigens, scaling: float) -> tuple:
    """``(A (r, in), B (out, r), W - s B A)`` of PEFT's CorDA init from ``w`` (out, in) fp32 and the ``eigens`` PEFT's
    ``preprocess_corda`` leaves on the layer (U (out, r), S (r,), V (in, r): W's SVD weighted by its inputs'
    covariance, "ipm" / "kpm"), computed as PEFT's ``corda_init``: S / s, A = √S Vᵀ, B = U √S."""
    s = eigens.S_WC / scaling  # (PEFT divides in place: its eigens are deleted after)
    a = eigens.V_WC.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = eigens.U_WC.mul(s.sqrt()).contiguous()
    return a, b, w - scaling * b @ a


def corda_reason(module: nn.Module, r: int) -> str | None:
    """Why ``module`` (an ``nn.Linear``) holds no CorDA eigens for rank ``r`` (PEFT's ``preprocess_corda`` leaves
    them on each target: U (out, r), S (r,), V (in, r), finite); None where it does."""
    if isinstance(module, TunerLayer):
        return ("init_lora_weights='corda' on a layer that holds a fastpeft adapter already: CorDA's eigens are "
                "measured on the plain layer (preprocess_corda); preprocess and inject the CorDA adapter first, then "
                "add the others")
    eigens = getattr(module, "eigens", None)
    if eigens is None:
        return ("init_lora_weights='corda' needs PEFT's CorDA eigens on the layer: run fastpeft.preprocess_corda("
                "model, config, run_model) first (PEFT's preprocess_corda: the covariance of the layer's inputs). A saved "
                "CorDA adapter loads onto the original model converted to plain LoRA (save_adapter(..., "
                "path_initial_model_for_weight_conversion=...)), or onto its residual model with load_adapter(..., "
                "residual=True)")
    out, inn = module.weight.shape
    for field, want in (("U_WC", (out, r)), ("S_WC", (r,)), ("V_WC", (inn, r))):
        t = getattr(eigens, field, None)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return (f"init_lora_weights='corda': the layer's eigens.{field} is {got}, expected {want} (r={r}): run "
                    "preprocess_corda with this config (its r and rank_pattern)")
        if not torch.isfinite(t).all():
            return f"init_lora_weights='corda': the layer's eigens.{field} holds inf / NaN (PEFT's check)"
    return None


LOFTQ_SCALING_WARNING = r".*LoftQ \(as PEFT's\) sets B A"  # (load_adapter silences it: the file's A, B replace it)


def loftq_scaling_warning(scaling: float, where: str) -> None:
    """PEFT's LoftQ sets B A to the quantization error W - Q whatever the scaling (PEFT issue #1982): warn where
    s = alpha / r is not 1, since the layer then starts at Q + s (W - Q), not at ≈ W."""
    if scaling != 1:
        warnings.warn(f"{where}: LoftQ (as PEFT's) sets B A to the quantization error W - Q without the scaling "
                      f"s = {scaling:g}: the layer starts at Q + s B A = Q + {scaling:g} (W - Q), not at ≈ W; "
                      "lora_alpha = r (s = 1) gives LoftQ's start", UserWarning, stacklevel=4)


class FastLoRALinear(TunerLayer):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W (and b) frozen.

    Shapes: weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r); x (..., in) -> (..., out).
    ``scaling = lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``). The adapter built with the
    layer is named ``"default"``; ``add_adapter`` adds more (other ranks too), ``set_adapter`` picks the
    one ``forward(x)`` uses and trains, and ``forward(x, adapter_ids)`` gives each row its own.
    ``r``, ``lora_alpha``, ``lora_dropout``, ``scaling``, ``lora_A`` and ``lora_B`` are the active
    adapter's. ``sparse_density > 0`` gives an adapter a ``SparseDelta`` beside its low-rank update (RoSA).
    ``use_dora=True`` makes an adapter DoRA (PEFT's): ``y = (m / ‖W + sBA‖_row) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b``
    with the magnitude ``lora_magnitude_vector[name]`` (out,) trained beside A and B.
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, init_lora_weights=True, device=None, dtype=None, adapter_name="default",
                 sparse_density=0.0, sparse_block_size=1, sparse_selection="random", use_dora=False, lora_bias=False,
                 loftq_config=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check_rank(v, name)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                    init_lora_weights, sparse_density, sparse_block_size, sparse_selection, use_dora, lora_bias,
                    loftq_config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, adapter_name="default", sparse_density=0.0, sparse_block_size=1,
                    sparse_selection="random", use_dora=False, lora_bias=False,
                    loftq_config=None) -> "FastLoRALinear":
        """Wrap ``linear``: the new layer shares (not copies) its weight and bias, and freezes them. A bitsandbytes
        ``Linear4bit`` / ``Linear8bitLt`` gives a ``QLoRALinear`` holding it as it is (see there; no lora_bias)."""
        check_linear(linear)
        base_kind(linear)  # another library's quantized layer, or an nn.Linear with a forward of its own: refused
        check_bool(lora_bias, "lora_bias")
        if is_quantized(linear) and lora_bias:
            raise ValueError(f"lora_bias=True on a bitsandbytes {type(linear).__name__}: not supported on a quantized "
                             "base (PEFT computes it; fastpeft.accelerate leaves such layers on PEFT's forward)")
        if is_quantized(linear):
            return QLoRALinear.from_quantized(linear, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                                              adapter_name, sparse_density, sparse_block_size, sparse_selection,
                                              use_dora=use_dora)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora,
                    init_lora_weights, sparse_density, sparse_block_size, sparse_selection, use_dora, lora_bias,
                    loftq_config)
        return self

    @classmethod
    def from_conv1d(cls, conv: nn.Module, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, adapter_name="default", use_dora=False,
                    lora_bias=False) -> "FastLoRALinear":
        """Wrap transformers' ``Conv1D`` (GPT-2's projections: y = x W + b, W stored (in, out); PEFT's
        ``fan_in_fan_out``). The layer holds the Conv1D's own ``weight`` Parameter, (in, out) as stored (frozen; its
        name, shape and identity as in the model: ``state_dict``, ties and checkpoints as before), and computes
        with its transpose, a view read in place (``_w()``: the kernels take any strides), which merging writes
        through. ``base_module()`` (and so ``fastpeft.merge_and_unload``) gives a Conv1D back. ``in_features`` /
        ``out_features``, ``lora_A`` (r, in) and ``lora_B`` (out, r) are as for an nn.Linear (PEFT's files). RoSA's
        sparse delta is not offered here."""
        if not is_conv1d(conv):
            raise TypeError(f"conv must be a transformers Conv1D computing with Conv1D's own forward, got "
                            f"{type(conv).__module__}.{type(conv).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fan_in_fan_out = self._stored_in_out = True
        self._setup(conv.weight, conv.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                    use_dora=use_dora, lora_bias=lora_bias)
        return self

    def _setup(self, weight, bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
               sparse_density=0.0, sparse_block_size=1, sparse_selection="random", use_dora=False, lora_bias=False,
               loftq_config=None):
        _spec(r, lora_alpha, lora_dropout, use_rslora)
        check_bool(lora_bias, "lora_bias")
        check_dora_options(use_dora, sparse_density)
        rosa_spec(sparse_density, sparse_block_size, sparse_selection)
        check_init(init_lora_weights)
        check_adapter_name(adapter_name)
        flags = [(p, p.requires_grad) for p in (weight, bias) if p is not None]
        try:
            self._setup_layer(weight, bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                              sparse_density, sparse_block_size, sparse_selection, use_dora, lora_bias, loftq_config)
        except BaseException:  # a refused adapter (PiSSA's r above min(out, in), ...): the caller's module as it was
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    def _setup_layer(self, weight, bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                     sparse_density, sparse_block_size, sparse_selection, use_dora, lora_bias, loftq_config=None):
        self._init_base(weight, bias)
        self.lora_A_adapters = nn.ParameterDict()
        self.lora_B_adapters = nn.ParameterDict()
        self.sparse_deltas = nn.ModuleDict()  # adapter -> SparseDelta (RoSA adapters only)
        self.lora_magnitude_vector = nn.ParameterDict()  # adapter -> m (out,) (DoRA adapters only)
        self.lora_bias_adapters = nn.ParameterDict()  # adapter -> b_B (out,) (PEFT's lora_bias=True adapters only)
        self._wsq = None        # (key, ‖W_j‖² fp32): DoRA's cached squared row norms of the frozen W
        self._dora_norm = None  # n = ‖W + sBA‖_row fp32 (fp64 W: fp64) of a merged DoRA adapter, kept to unmerge
        self._specs: dict = {}
        self._active: str | None = None
        self._stacks = None     # (key, (A, B)): the no-grad stacks and the Parameters' state they were built from
        self._meta = None       # device tensors (scalings, ranks, dropout) for mixed batches
        self._routing = None    # (adapter names, ids) per sequence, set by set_routing (fastpeft.mixed_batch)
        kw = dict(lora_bias=True) if lora_bias is True else {}  # (layers refusing it take no such argument)
        if loftq_config is not None:  # (likewise)
            kw["loftq_config"] = loftq_config
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, sparse_density,
                         sparse_block_size, sparse_selection, use_dora=use_dora, **kw)
        self.set_adapter(adapter_name)

    def _drop_kept(self) -> None:
        """``TunerLayer._drop_kept``, and the mixed-batch stacks and DoRA's ‖W‖²."""
        self._stacks = self._wsq = None
        super()._drop_kept()

    # ---- the adapter registry ------------------------------------------------------------------

    @property
    def adapter_names(self) -> list:
        """Names of the layer's adapters; a name's index is its adapter id in ``forward(x, adapter_ids)``."""
        return list(self._specs)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None,
                    use_dora=False, lora_bias=False, loftq_config=None):
        """Add adapter ``name`` (its own rank, alpha, dropout); the active adapter does not change and the
        new one starts frozen unless it is the first (``set_adapter`` trains the active one).
        ``sparse_density > 0`` adds a sparse delta beside the low-rank update (RoSA): that share of W's
        entries (or blocks of ``sparse_block_size``), picked by ``sparse_selection``, zero at first.
        ``use_dora=True``: a DoRA adapter, its magnitude initialised to the row norms ``‖W + sBA‖``.
        ``lora_bias=True`` (PEFT's): B has a bias b_B (out,), the update ``s (B A x + b_B)``; zero at first (drawn as
        PEFT's nn.Linear bias with ``init_lora_weights=False``); PEFT allows it with the True / False inits only, not
        with DoRA (nor, here, with a sparse delta)."""
        check_adapter_name(name)
        check_dora_options(use_dora, sparse_density)
        check_lora_bias(lora_bias, init_lora_weights, use_dora, sparse_density)
        if self.fan_in_fan_out and sparse_density:
            raise ValueError(f"adapter {name!r}: sparse_density={sparse_density!r} on a layer made from a transformers "
                             "Conv1D (W stored (in, out)): it takes LoRA and DoRA adapters, not a sparse delta (RoSA)")
        if name in self._specs:
            raise ValueError(f"adapter {name!r} already exists in this layer (adapters {self.adapter_names})")
        spec = replace(_spec(r, lora_alpha, lora_dropout, use_rslora), use_dora=use_dora)
        sparse = rosa_spec(sparse_density, sparse_block_size, sparse_selection)
        check_init(init_lora_weights)
        loftq_config = check_loftq_config(loftq_config or (LOFTQ_DEFAULTS if init_lora_weights == "loftq" else None),
                                          init_lora_weights)
        if init_lora_weights == "corda" and not isinstance(self, FastLoRAEmbedding):
            raise ValueError(f"adapter {name!r}: init_lora_weights='corda' takes PEFT's CorDA eigens of the layer (its "
                             "inputs' covariance, from preprocess_corda on the model): use fastpeft.inject on the "
                             "preprocessed model")
        if init_lora_weights == "eva" and isinstance(self, (FastLoRAConv, FastLoRAParameter)):
            raise ValueError(f"adapter {name!r}: init_lora_weights='eva' on a {type(self).__name__}: EVA initialises "
                             "linear layers from their inputs (PEFT raises 'Unknown initialization' on convolutions)")
        why = base_rewriting_reason(self, spec.r, init_lora_weights, sparse_density)
        if why is not None:
            raise ValueError(f"adapter {name!r}: {why}")
        # The positions first: selecting checks sparse_scores, and a failure must leave the layer as it was.
        delta = SparseDelta(self.weight, sparse, sparse_scores) if sparse is not None else None
        kw = self._adapter_kwargs()
        trains = self._active is None
        self.lora_A_adapters[name] = nn.Parameter(torch.empty(spec.r, self.in_features, **kw), requires_grad=trains)
        self.lora_B_adapters[name] = nn.Parameter(torch.empty(self.out_features, spec.r, **kw), requires_grad=trains)
        self._specs[name] = spec
        if lora_bias:
            self.lora_bias_adapters[name] = nn.Parameter(torch.empty(self.out_features, **kw), requires_grad=trains)
            if self.bias is None:  # (PEFT's warning)
                warnings.warn(f"adapter {name!r}: lora_bias=True on a layer without a bias: merging it won't be "
                              "possible", UserWarning, stacklevel=3)
        if delta is not None:
            delta.delta_values.requires_grad_(trains)
            self.sparse_deltas[name] = delta
        self.reset_lora_parameters(init_lora_weights, adapter_name=name, _fresh=True,
                                   **({"loftq_config": loftq_config} if loftq_config else {}))
        if use_dora:
            self._add_magnitude(name, trains)
        self._meta = None
        self._reroute()

    def _adapter_kwargs(self) -> dict:
        """Device and dtype of new adapters' Parameters: the base weight's."""
        return dict(device=self.weight.device, dtype=self.weight.dtype)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter ``forward(x)`` applies and the only one that trains (None: none)."""
        if name is not None and name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        if self.switch_refused(name):
            raise RuntimeError(f"set_adapter({name!r}) on a layer with {self._active!r} merged: unmerge() first")
        self._active = name
        for n in self._specs:
            self.lora_A_adapters[n].requires_grad_(n == name)
            self.lora_B_adapters[n].requires_grad_(n == name)
            if n in self.sparse_deltas:
                self.sparse_deltas[n].delta_values.requires_grad_(n == name)
            if n in self.lora_magnitude_vector:
                self.lora_magnitude_vector[n].requires_grad_(n == name)
            if n in self.lora_bias_adapters:
                self.lora_bias_adapters[n].requires_grad_(n == name)

    def switch_refused(self, name) -> bool:
        """Whether ``set_adapter(name)`` refuses: another adapter than ``name`` (or None) is merged."""
        return self.merged and name != self._active

    def delete_refused(self, name) -> bool:
        """Whether ``delete_adapter(name)`` refuses: ``name`` is the merged adapter."""
        return self.merged and name == self._active

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; later adapters' ids shift down by one. Deleting the active adapter
        leaves none active (forward is then the base layer) until ``set_adapter``."""
        if name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        if self.delete_refused(name):
            raise RuntimeError(f"delete_adapter({name!r}): it is merged; unmerge() first")
        del self._specs[name]
        del self.lora_A_adapters[name]
        del self.lora_B_adapters[name]
        if name in self.sparse_deltas:
            del self.sparse_deltas[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        if name in self.lora_bias_adapters:
            del self.lora_bias_adapters[name]
        if self._active == name:
            self._active = None
        self._meta = None
        self._reroute()

    @torch.no_grad()
    def _resize(self, name: str, r: int, lora_alpha, init_lora_weights) -> None:
        """Adapter ``name`` made again at rank ``r`` and ``lora_alpha`` in its place (PEFT's ``update_layer`` with a
        new rank, which EVA's rank redistribution calls): new A (r, in) and B (out, r) drawn as a new adapter's, the
        adapter's other settings, its trainable flag and its magnitude (DoRA: ‖W‖ while B = 0) kept."""
        old = self._spec_of(name)
        self._specs[name] = replace(_spec(r, lora_alpha, old.lora_dropout, old.use_rslora), use_dora=old.use_dora)
        held = self.lora_A_adapters[name]  # (its dtype kept: fp32 factors on a bf16 base stay fp32; PEFT's update_layer
        kw, trains = dict(device=held.device, dtype=held.dtype), held.requires_grad  # gives the base's dtype there)
        self.lora_A_adapters[name] = nn.Parameter(torch.empty(r, self.in_features, **kw), requires_grad=trains)
        self.lora_B_adapters[name] = nn.Parameter(torch.empty(self.out_features, r, **kw), requires_grad=trains)
        self._meta = self._stacks = None
        self._drop_kept()
        self.reset_lora_parameters(init_lora_weights, adapter_name=name, _fresh=True)

    def _reroute(self) -> None:
        """Inside ``fastpeft.mixed_batch``, the routing ids again after an adapter was added or deleted (ids are
        positions in ``adapter_names``, which shift): each sequence keeps its adapter's name."""
        if self._routing is not None:
            self.set_routing(self._routing[0], self._rows_per_sequence)

    def _spec_of(self, name: str | None) -> AdapterSpec:
        name = self._active if name is None else name
        if name is None:
            raise AttributeError("this layer has no active adapter (set_adapter(name) picks one)")
        if name not in self._specs:
            raise ValueError(f"adapter {name!r} is not in this layer; it has {self.adapter_names}")
        return self._specs[name]

    def adapter_spec(self, name: str | None = None) -> AdapterSpec:
        """Rank, alpha, dropout and rsLoRA flag of adapter ``name`` (default: the active one)."""
        return self._spec_of(name)

    def adapter_parameters(self, name: str | None = None) -> tuple:
        """``(lora_A, lora_B)`` Parameters of adapter ``name`` (default: the active one)."""
        name = self._active if name is None else name
        self._spec_of(name)
        return self._pair(name)

    def _pair(self, name: str) -> tuple:
        """``(lora_A, lora_B)`` of adapter ``name``, known to exist; read from the tables (see ``_entry``)."""
        modules = self._modules
        return _entry(modules["lora_A_adapters"], name), _entry(modules["lora_B_adapters"], name)

    def _base_parameters(self) -> tuple:
        """``(weight, bias)`` from the module's table where they are registered there, else as attributes:
        nn.Module's ``__getattr__`` costs 0.4 µs a read on every forward."""
        params = self._parameters
        if self._stored_in_out:
            return self._w(), params["bias"] if "bias" in params else self.bias
        return (params["weight"] if "weight" in params else self.weight,
                params["bias"] if "bias" in params else self.bias)

    def sparse_delta(self, adapter_name: str | None = None) -> SparseDelta | None:
        """The ``SparseDelta`` of adapter ``adapter_name`` (default: the active one), None when it has none."""
        name = self._active if adapter_name is None else adapter_name
        self._spec_of(name)
        return self.sparse_deltas[name] if name in self.sparse_deltas else None

    def adapter_sparse_delta(self, name: str | None = None):
        """``(indices, values)`` of adapter ``name``'s sparse delta (RoSA), or None when it has none."""
        delta = self.sparse_delta(name)
        return None if delta is None else (delta.delta_indices, delta.delta_values)

    @property
    def sparse_values(self) -> dict:
        """Adapter name -> its sparse delta's values Parameter (RoSA adapters only)."""
        return {n: d.delta_values for n, d in self.sparse_deltas.items()}

    @torch.no_grad()
    def set_sparse_delta(self, name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace adapter ``name``'s sparse-delta positions (values: given, or zeros). Checked first."""
        self._spec_of(name)
        if name not in self.sparse_deltas:
            raise ValueError(f"adapter {name!r} has no sparse delta (it was made with sparse_density=0)")
        if self.merged and name == self._active:  # W holds the old delta: unmerging would subtract the new one
            raise RuntimeError(f"set_sparse_delta({name!r}) on a layer with it merged: unmerge() first")
        self.sparse_deltas[name].set_delta(indices, values)

    def update_adapter(self, name: str, lora_alpha=None, lora_dropout=None, use_rslora=None) -> None:
        """Change an adapter's alpha / dropout / rsLoRA flag (its rank is fixed by its tensors)."""
        s = self._spec_of(name)
        new = replace(_spec(s.r, s.lora_alpha if lora_alpha is None else lora_alpha,
                            s.lora_dropout if lora_dropout is None else lora_dropout,
                            s.use_rslora if use_rslora is None else use_rslora), use_dora=s.use_dora)
        if self.merged and name == self._active and new.scaling != s.scaling:
            raise RuntimeError("update_adapter would change the scaling of the merged adapter: unmerge() first")
        self._specs[name] = new
        self._meta = None

    # The active adapter's attributes, as in the single-adapter API.
    lora_A = property(lambda self: self.adapter_parameters()[0], doc="Active adapter's A (r, in).")
    lora_B = property(lambda self: self.adapter_parameters()[1], doc="Active adapter's B (out, r).")
    r = property(lambda self: self._spec_of(None).r)
    scaling = property(lambda self: self._spec_of(None).scaling)
    lora_alpha = property(lambda self: self._spec_of(None).lora_alpha,
                          lambda self, v: self.update_adapter(self._active, lora_alpha=v))
    lora_dropout = property(lambda self: self._spec_of(None).lora_dropout,
                            lambda self, v: self.update_adapter(self._active, lora_dropout=v))
    use_rslora = property(lambda self: self._spec_of(None).use_rslora,
                          lambda self, v: self.update_adapter(self._active, use_rslora=v))

    # ---- per-sequence routing ------------------------------------------------------------------

    @property
    def routing(self) -> list | None:
        """The per-sequence adapter names ``set_routing`` gave (None: no routing)."""
        return None if self._routing is None else list(self._routing[0])

    @property
    def rows_per_sequence(self) -> int:
        """The rows each routed sequence covers in a generate loop's expanded batch (``set_routing``)."""
        return self._rows_per_sequence

    def set_routing(self, adapter_names: list | None, rows_per_sequence: int = 1) -> None:
        """Apply adapter ``adapter_names[i]`` to sequence i (dim 0 of the input) of every later
        ``forward(x)``: None, or a name this layer lacks, runs the base alone for it; a batch of k times the
        names with ``rows_per_sequence`` k gives each name k consecutive rows (``routed_batch``). ``None`` ends
        the routing. ``fastpeft.mixed_batch`` sets it for every layer of a model and restores it after."""
        self._rows_per_sequence = rows_per_sequence
        if adapter_names is None:
            self._routing = None
            return
        local = {n: i for i, n in enumerate(self.adapter_names)}
        with outside_inference_mode():  # kept for the block's calls: a normal tensor (its groups are cached by version)
            ids = torch.tensor([local.get(n, -1) for n in adapter_names], dtype=torch.int64, device=self.weight.device)
        self._routing = (list(adapter_names), ids)

    # ---- stacks for the many-adapter kernels ---------------------------------------------------

    def _build_stacks(self, used=None) -> tuple:
        """(A (n, r_max, in), B (n, out, r_max)) from the adapters' Parameters, zero-padded to r_max; adapters not in
        ``used`` (None: all) enter detached, so that a batch without rows of theirs leaves their ``.grad`` None (a
        zero gradient would still move them: AdamW's momentum and weight decay), as PEFT's per-adapter branches do."""
        r_max = max(s.r for s in self._specs.values())
        ta, tb = self._modules["lora_A_adapters"], self._modules["lora_B_adapters"]

        def take(p, n):
            return p if used is None or n in used else p.detach()
        pa = [F.pad(take(_entry(ta, n), n), (0, 0, 0, r_max - s.r)) for n, s in self._specs.items()]
        pb = [F.pad(take(_entry(tb, n), n), (0, r_max - s.r)) for n, s in self._specs.items()]
        dt = self._stack_dtype(pa[0].dtype)
        return torch.stack(pa).to(dt), torch.stack(pb).to(dt)

    def _stack_dtype(self, adapters: torch.dtype) -> torch.dtype:
        """The dtype of the mixed-batch stacks: the base's (fp32 adapters on a bf16 / fp16 base are cast)."""
        return self.weight.dtype

    def stacked(self) -> tuple | None:
        """``(A (n, r_max, in), B (n, out, r_max))`` of every adapter (None without adapters): a copy of the
        Parameters, zero beyond each rank, cached until one of them is replaced, written in place (an
        optimizer step) or moved (``.to()``)."""
        if not self._specs:
            return None
        params = self._all_pairs()
        # Read at every call (a mixed decode step's host time: 1 µs an adapter, was 4.8 through nn.Module's
        # lookups): each Parameter's identity, and its version, storage, dtype, device and shape.
        state = kept_state(params)
        cached = self._stacks
        if cached is None or cached[1] != state or len(cached[0]) != len(params) \
                or not all(map(operator.is_, params, cached[0])):
            with torch.no_grad():
                self._stacks = cached = (params, state, self._build_stacks(), held(params))
        return cached[2]

    def _all_pairs(self) -> list:
        """``[A_0, B_0, A_1, B_1, ...]`` of every adapter in id order, read from the tables (see ``_entry``)."""
        ta, tb = self._modules["lora_A_adapters"], self._modules["lora_B_adapters"]
        return [p for n in self._specs for p in (_entry(ta, n), _entry(tb, n))]

    def _forward_stacks(self, routing=None, ids: torch.Tensor | None = None) -> tuple:
        """The stacks a mixed batch reads: built from the Parameters when a gradient must reach them (and
        while torch.compile traces or a torch.func transform runs: the cache key reads versions and data pointers),
        else the cached ones. Only the adapters the batch uses get gradients: those ``routing`` (``_call_routing``'s)
        names, or, on the CPU (where reading them costs no sync), those the per-row ``ids`` hold; on a GPU explicit
        ids give the others zeros (no host read in a step)."""
        if tracing_or_transformed() or self.training or torch.is_grad_enabled() and any(
                p.requires_grad for p in self._all_pairs()):
            return self._build_stacks(self._used_adapters(routing, ids))
        return self.stacked()

    def _used_adapters(self, routing, ids: torch.Tensor | None) -> set | None:
        """The names of the adapters a mixed batch uses, which alone get gradients: those ``routing``
        (``_call_routing``'s) names, or on the CPU (where reading them costs no sync) those the per-row ``ids`` hold;
        None (all) elsewhere."""
        if routing is not None:
            return set(routing[0][0])
        if ids is not None and ids.device.type == "cpu" and not tracing_or_transformed():
            names = list(self._specs)
            return {names[i] for i in ids.unique().tolist() if i >= 0}
        return None

    def _adapter_meta(self, device) -> tuple:
        """(scalings fp32, ranks int64, dropout fp32) tensors (n,) on ``device``, cached."""
        if self._meta is None or self._meta[0].device != device:
            specs = list(self._specs.values())
            with outside_inference_mode():  # kept: a later training step saves them for backward
                self._meta = (torch.tensor([s.scaling for s in specs], dtype=torch.float32, device=device),
                              torch.tensor([s.r for s in specs], dtype=torch.int64, device=device),
                              torch.tensor([s.lora_dropout for s in specs], dtype=torch.float32, device=device))
        return self._meta

    # ---- init, forward ---------------------------------------------------------------------------

    def _reset_target(self, init_lora_weights, adapter_name: str | None) -> tuple | None:
        """``(name, spec, lora_A, lora_B)`` that ``reset_lora_parameters`` draws into, checked (the init, the adapter,
        not merged); None for factors on the meta device (nothing to draw into)."""
        check_init(init_lora_weights)
        name = self._active if adapter_name is None else adapter_name
        spec = self._spec_of(name)
        if self.merged and name == self._active:
            raise RuntimeError("reset_lora_parameters on a merged adapter: call unmerge() first")
        a, b = self.lora_A_adapters[name], self.lora_B_adapters[name]
        return None if a.is_meta else (name, spec, a, b)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None,
                              _fresh: bool = False, loftq_config=None) -> None:
        """PEFT's inits: ``True`` A kaiming-uniform(a=sqrt(5)), B zeros, so the layer starts as its base;
        ``"gaussian"`` A ~ N(0, std=1/r), B zeros; ``"orthogonal"`` (even r) A and B (/ 10) from the odd and even rows
        of one random orthogonal r x r matrix, so BA = 0; ``False`` both kaiming-uniform (non-zero B, for tests).

        Drawn as PEFT draws them, on the CPU in fp32 from torch's generator, then copied: with ``_fresh`` (a new
        adapter) first the two draws of PEFT's ``nn.Linear(in, r)`` / ``nn.Linear(r, out)``, so that a seed gives
        PEFT's initial factors (before 2026-12-01 A differed: a run moved from get_peft_model to inject changed)."""
        target = self._reset_target(init_lora_weights, adapter_name)
        if target is None:
            return
        name, spec, a, b = target
        r, k, n = spec.r, self.in_features, self.out_features
        if init_lora_weights == "orthogonal" and r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even rank (PEFT's), got r={r} for {name!r}")

        rewriting = base_rewriting_init(init_lora_weights)
        if rewriting is not None and not _fresh:
            raise ValueError(f"reset_lora_parameters(init_lora_weights={init_lora_weights!r}) on adapter {name!r}: "
                             "PiSSA / OLoRA / LoftQ take A and B from W and leave W - s B A (LoftQ: Q) in W's place "
                             "when an adapter is made; drawing them again would subtract a second time (LoftQ: "
                             "quantize Q again) (add a new adapter instead)")

        def kaiming(*shape):
            return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        lora_bias = self._modules["lora_bias_adapters"]._parameters.get(name)
        if _fresh or init_lora_weights is False:  # PEFT's nn.Linear layers, made before its init (which False skips)
            a0, b0 = kaiming(r, k), kaiming(n, r)
            if lora_bias is not None:  # (nn.Linear(r, out)'s bias, drawn after its weight)
                bias0 = torch.empty(n).uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
        if init_lora_weights is False:
            a.copy_(a0)
            b.copy_(b0)
            if lora_bias is not None:
                lora_bias.copy_(bias0)
            return
        if init_lora_weights == "eva" and _fresh:  # PEFT's: nn.Linear(in, r)'s draw kept, B zero (EVA sets A later)
            a.copy_(a0)
            b.zero_()
            return
        if rewriting is not None:
            self._rewrite_base(init_lora_weights, spec, a, b, loftq_config)
            if rewriting == "loftq":
                loftq_scaling_warning(spec.scaling, f"adapter {name!r}")
            return
        if lora_bias is not None:
            lora_bias.zero_()
        if init_lora_weights == "orthogonal":  # PEFT's: scaled by 1/10, rounded to a float base weight's dtype
            dt = self.weight.dtype if self.weight.is_floating_point() else torch.float32
            q, _ = torch.linalg.qr(torch.randn(r, r))
            a.copy_(((torch.randn(k, r // 2) @ q[0::2]).T / 10.0).to(dt))
            b.copy_((torch.randn(r // 2, n).T @ q[1::2] / 10.0).to(dt))
            return
        a.copy_(torch.empty(r, k).normal_(0.0, 1.0 / r) if init_lora_weights == "gaussian" else kaiming(r, k))
        b.zero_()

    @torch.no_grad()
    def _corda_init(self, name: str, eigens) -> None:
        """PEFT's ``corda_init`` of adapter ``name`` (made with ``init_lora_weights=False``, PEFT's draws): A, B from
        ``eigens`` and W ← W - s B A (``_rewrite_base``; checked by inject: ``corda_reason``,
        ``base_rewriting_reason``)."""
        self._rewrite_base("corda", self._spec_of(name), self.lora_A_adapters[name], self.lora_B_adapters[name],
                           eigens=eigens)

    def _rewrite_base(self, init_lora_weights: str, spec: AdapterSpec, a: nn.Parameter, b: nn.Parameter,
                      loftq_config=None, eigens=None) -> None:
        """PiSSA / OLoRA (PEFT's ``pissa_init`` / ``olora_init``): A, B from W in fp32 (``base_rewriting_factors``),
        then W ← W - s B A in place (rounded once to W's dtype; a tied Parameter changes with it, as in PEFT). LoftQ
        (PEFT's ``loftq_init``; ``loftq_config`` PEFT's, checked by ``add_adapter``; None: its ``LoftQConfig()``, 4
        bits, 1 iteration): A, B and W ← Q from ``loftq_factors``. CorDA (PEFT's ``corda_init``): A, B from the
        layer's ``eigens`` (``corda_factors``) and W ← W - s B A. W's dtype and r were checked by ``add_adapter`` /
        inject (``base_rewriting_reason``)."""
        w = self._w()
        kind = base_rewriting_init(init_lora_weights)
        if kind == "loftq":
            fa, fb, residual = loftq_factors(w.float(), spec.r, **(loftq_config or LOFTQ_DEFAULTS))
        elif kind == "corda":
            fa, fb, residual = corda_factors(w.float(), eigens, spec.scaling)
        else:
            fa, fb, residual = base_rewriting_factors(w.float(), spec.r, spec.scaling, init_lora_weights)
        a.copy_(fa)
        b.copy_(fb)
        w.copy_(residual)
        self._drop_kept()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.lora_alpha}, dropout={s.lora_dropout}, scaling={s.scaling:g})"
                             for n, s in self._specs.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"active={self._active!r}, merged={self.merged}, adapters=[{adapters}]")

    def _check_input(self, x: torch.Tensor) -> None:
        check_in_features(x, self.in_features)

    def _refuse_routed_variants(self, routing) -> None:
        """DoRA and RoSA adapters cannot be routed per row: inside mixed_batch those its names route (adapters the
        layer merely holds do not matter), with adapter_ids any it holds (which rows use which is on the device)."""
        dora, rosa = self._modules["lora_magnitude_vector"]._parameters, self._modules["sparse_deltas"]._modules
        if dora or rosa:
            held = routing[0][0] if routing is not None else list(self._specs)
            if any(n in dora for n in held):
                raise ValueError(f"DoRA adapters {[n for n in dora if n in held]} cannot be routed per row "
                                 "(adapter_ids / mixed_batch), as in PEFT; use set_adapter")
            if any(n in rosa for n in held):
                raise RuntimeError(f"adapters with a sparse delta (RoSA) {[n for n in rosa if n in held]} cannot be "
                                   "routed per row (adapter_ids / mixed_batch); use set_adapter")

    def _routed_ids(self, x: torch.Tensor, adapter_ids: torch.Tensor | None) -> tuple:
        """``(routing, adapter_ids)`` of a forward, x checked against in_features: without ``adapter_ids``, those
        of the enclosing ``fastpeft.mixed_batch`` (``routing``: ``((names, ids), rows_per_sequence)``, see
        ``_call_routing``; None when not routed). A merged layer refuses to route rows."""
        self._check_input(x)
        routing = _call_routing(self, adapter_ids)
        if routing is not None:
            adapter_ids = routing[0][1]
        if self.merged and adapter_ids is not None:
            raise RuntimeError("adapter_ids cannot route rows on a merged layer: call unmerge() first")
        return routing, adapter_ids

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., in) -> (..., out). ``adapter_ids`` (int tensor of shape ``x.shape[:-1]`` per row, or
        ``(x.shape[0],)`` per sequence) gives each row the adapter of that index in ``adapter_names``
        (-1 = base only); inside ``fastpeft.mixed_batch`` the per-sequence routing applies."""
        routing, adapter_ids = self._routed_ids(x, adapter_ids)
        if self.merged:
            return F.linear(x, self._w(), self.bias)
        if adapter_ids is None:
            name = self._active
            if name is None:
                return F.linear(x, self._w(), self.bias)
            # One adapter (decode, evaluation): the registry read without nn.Module's attribute lookups.
            s = self._specs[name]
            a, b = self._pair(name)
            weight, bias = self._base_parameters()
            if a.dtype != weight.dtype or b.dtype != weight.dtype:  # fp32 adapters on a bf16 / fp16 base
                a, b = cast_params((a, b), weight.dtype, self._kept(), "_casts")
            if s.use_dora:
                return self._dora_forward(x, name, s, a, b, weight, bias)
            delta = self._modules["sparse_deltas"]._modules.get(name)
            if delta is None:
                lb = self._modules["lora_bias_adapters"]._parameters.get(name)
                if lb is not None:  # PEFT's lora_bias: s b_B joins the layer's bias
                    bias = with_lora_bias(bias, lb, s.scaling, weight.dtype)
                return lora_linear(x, weight, bias, a, b, s.scaling, s.lora_dropout, self.training)
            plan = delta.sparse_plan("lora_sparse_linear", x, weight)
            values = delta.delta_values
            if values.dtype != weight.dtype:  # fp32 sparse values on a bf16 / fp16 base
                (values,) = cast_params((values,), weight.dtype, self._kept(), "_value_casts")
            return lora_sparse_linear(x, weight, bias, a, b, s.scaling, delta.delta_indices,
                                      values, delta.block_size, s.lora_dropout, self.training,
                                      check=False, plan=plan)
        self._refuse_routed_variants(routing)
        if routing is not None:
            adapter_ids = _per_row(adapter_ids, routed_batch(adapter_ids.shape[0], x, routing[1]))
        ids = expand_adapter_ids(adapter_ids, x, len(self._specs), check_range=routing is None)
        if not self._specs:
            return F.linear(x, self._w(), self.bias)
        scalings, ranks, dropout = self._adapter_meta(x.device)
        stack_a, stack_b = self._forward_stacks(routing, ids)
        y = lora_linear_multi(x, self._w(), self.bias, stack_a, stack_b, scalings, ids, ranks,
                              dropout_p=dropout, training=self.training, check_ids=False)
        return y if not self._modules["lora_bias_adapters"]._parameters else y + self._row_biases(ids, routing, y.dtype)

    def _row_biases(self, ids: torch.Tensor, routing, dtype: torch.dtype) -> torch.Tensor:
        """Each row's ``s b_B`` (..., out) of its adapter (PEFT's lora_bias; zero for adapters without one and for
        rows of id -1), in ``dtype``. Only the adapters the batch uses get gradients (see ``_forward_stacks``)."""
        names = list(self._specs)
        used = self._used_adapters(routing, ids)
        biases = self._modules["lora_bias_adapters"]._parameters
        acc = torch.promote_types(dtype, torch.float32)
        zero = torch.zeros(self.out_features, device=ids.device, dtype=acc)
        rows = []
        for n in names:
            p = biases.get(n)
            rows.append(zero if p is None else (p if used is None or n in used else p.detach()).to(acc)
                        * self._specs[n].scaling)
        table = torch.stack(rows + [zero]).to(dtype)  # the last row for id -1
        return table[torch.where(ids < 0, len(names), ids)]

    def _lora_bias_step(self, sign: float) -> None:
        """``bias += sign s b_B`` of the active adapter (merge / unmerge), summed in fp32 and rounded once; PEFT's
        error where the base layer has no bias."""
        lb = self._modules["lora_bias_adapters"]._parameters.get(self._active)
        if lb is None:
            return
        acc = torch.promote_types(self.bias.dtype, torch.float32)
        with torch.no_grad():
            self.bias.copy_((self.bias.to(acc) + sign * self._specs[self._active].scaling * lb.to(acc))
                            .to(self.bias.dtype))

    def _check_bias_mergeable(self) -> None:
        if self._active in self.lora_bias_adapters and self.bias is None:
            raise RuntimeError(f"merge: adapter {self._active!r} has lora_bias=True but the base layer has no bias to "
                               "merge it into (PEFT's rule: 'Impossible to merge LoRA with lora_bias=True')")

    # ---- merging ---------------------------------------------------------------------------------

    def has_delta(self) -> bool:
        return self._active is not None

    @torch.no_grad()
    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``scaling * B A`` (+ the sparse delta, RoSA) (out, in) of an adapter (default: the active one), in
        the weight's dtype, computed in fp32 (fp64 for an fp64 weight: merged and unmerged agree to its precision)."""
        return self._exact_delta(adapter_name).to(self.weight.dtype)

    @torch.no_grad()
    def _exact_delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """``delta_weight`` before its rounding to W's dtype: fp32 (fp64 for an fp64 W)."""
        name = self._active if adapter_name is None else adapter_name
        s = self._spec_of(name)
        a, b = self.lora_A_adapters[name], self.lora_B_adapters[name]
        dt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        # (a convolution's kernels as the (out, r) / (r, in) matrices)
        delta = s.scaling * (b.to(dt).reshape(b.shape[0], s.r) @ a.to(dt).reshape(s.r, -1))
        sparse = self.sparse_delta(name)
        if sparse is not None:
            delta += sparse.dense_delta().to(dt)
        return delta

    # ---- DoRA ----------------------------------------------------------------------------------------

    def is_dora(self, adapter_name: str | None = None) -> bool:
        """Whether adapter ``adapter_name`` (default: the active one) is a DoRA adapter."""
        return self._spec_of(adapter_name).use_dora

    def magnitude(self, adapter_name: str | None = None) -> nn.Parameter | None:
        """The magnitude ``m`` (out,) of DoRA adapter ``adapter_name`` (default: the active one), else None."""
        name = self._active if adapter_name is None else adapter_name
        self._spec_of(name)
        return self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else None

    @torch.no_grad()
    def _add_magnitude(self, name: str, trains: bool) -> None:
        """m = ‖W + sBA‖_row (= ‖W‖ with B = 0), in fp32 (fp64 for fp64) then W's dtype, as PEFT's
        ``DoraLinearLayer``."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        w = self._w().to(acc) + self._exact_delta(name).to(acc)
        m = torch.linalg.vector_norm(w, dim=1).to(self.weight.dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(m, requires_grad=trains)

    def _weight_sq_norm(self) -> torch.Tensor | None:
        """‖W_j‖² (out,) fp32, cached while W is unchanged (same storage, version, dtype, device); None while
        torch.compile traces or a torch.func transform runs (the key reads a data pointer; the op computes it),
        and in training mode, where the op computes it afresh as the other kept values are (``_kept``): a write
        through ``.data`` (a base weight swapped, a hand-written update) bumps no version. Only the reference path
        reads it; the kernels take the norm from their own pass over W."""
        w = self._w()
        if tracing_or_transformed() or self._kept() is None:
            return None
        # a frozen W: no optimizer step changes it (with kept_state every training step would recompute ‖W‖²)
        key = (w.data_ptr(), tensor_version(w), w.dtype, w.device, tuple(w.shape),
               optimizer_steps() if w.requires_grad else 0)
        if self._wsq is None or self._wsq[0] != key:
            self._wsq = (key, weight_sq_norms(w.detach()), held((w,)))
        return self._wsq[1]

    def _dora_forward(self, x, name, s, a, b, weight, bias):
        kept = self._kept()  # the norm and m / n of no-grad calls in eval mode (see ops.dora.dora_linear)
        cache = None if kept is None else kept.setdefault("_dora_gain", {})
        return dora_linear(x, weight, bias, a, b, _entry(self._modules["lora_magnitude_vector"], name), s.scaling,
                           s.lora_dropout, self.training, weight_sq_norm=self._weight_sq_norm(), norm_cache=cache)

    @torch.no_grad()
    def _dora_merged(self, name: str) -> tuple:
        """(W' = (m / n) ⊙ (W + sBA) in W's dtype, n fp32 (out,)), as PEFT's merge."""
        delta = self._exact_delta(name)  # fp32 (fp64 for an fp64 W)
        dt = delta.dtype
        w = self._w().to(dt) + delta
        n = torch.linalg.vector_norm(w, dim=1)
        g = self.lora_magnitude_vector[name].to(dt) / n
        return (g[:, None] * w).to(self.weight.dtype), n

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into W in place: W += sBA (LoRA; with lora_bias also b += s b_B), W ← (m/n) ⊙
        (W + sBA) (DoRA, n kept)."""
        if self.merged or self._active is None or not self.is_dora():
            if not self.merged and self._active is not None:
                self._check_bias_mergeable()
            super().merge()
            self._lora_bias_step(1.0)
            return
        new, self._dora_norm = self._dora_merged(self._active)
        self._w().copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W -= sBA (LoRA; with lora_bias b -= s b_B), W ← W ⊙ (n/m) − sBA (DoRA, with the n kept at
        merge)."""
        if not self.merged or self._active is None or not self.is_dora():
            super().unmerge()
            self._lora_bias_step(-1.0)
            return
        dt = self._dora_norm.dtype  # fp64 for an fp64 weight (see _dora_merged)
        g = self.lora_magnitude_vector[self._active].to(dt) / self._dora_norm
        w = self._w().to(dt) / g[:, None] - self._exact_delta(self._active).to(dt)
        self._w().copy_(w.to(self.weight.dtype))
        self._dora_norm = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding the merged weight (and a copy of b); this layer is left untouched."""
        if not self.merged and self._active is not None:
            self._check_bias_mergeable()
        lin = super().to_linear()
        if not self.merged and self._active is not None and self.is_dora():
            lin.weight.copy_(self._dora_merged(self._active)[0])
        lb = self._modules["lora_bias_adapters"]._parameters.get(self._active)
        if not self.merged and lb is not None:
            lin.bias.copy_(with_lora_bias(lin.bias, lb, self._specs[self._active].scaling, lin.bias.dtype))
        return lin


class FastLoRAEmbedding(FastLoRALinear):
    """LoRA on an ``nn.Embedding`` (PEFT's ``lora.Embedding``): ``y = E[x] + scaling * (A^T[x]) B^T`` for int ids x.

    Shapes: weight E (num_embeddings, embedding_dim), the embedding's own Parameter (frozen); lora_A (r,
    num_embeddings) and lora_B (embedding_dim, r): PEFT's ``lora_embedding_A`` / ``lora_embedding_B``, the layout of
    ``FastLoRALinear``'s factors with in = num_embeddings, out = embedding_dim (E is W stored (in, out)); x (...)
    int -> (..., embedding_dim). As PEFT's layer: no dropout on ids (``lora_dropout`` is kept, not applied), A
    zeros and B ~ N(0, 1) at init (``True`` / ``"gaussian"``; ``False``: both N(0, 1)), ``padding_idx`` and
    ``scale_grad_by_freq`` passed to both lookups, merge E += (s B A)^T. Many adapters per batch
    (``forward(x, adapter_ids)``, ``mixed_batch``) add each row's own. ``use_dora=True``: PEFT's DoRA embedding
    (``_dora_lookup``; not routed per row). A transformers scaled embedding (Gemma 3's: a forward multiplying the
    lookup by ``embed_scale``) is taken: its scale multiplies the base lookup and each adapter's term, as PEFT's layer
    does (``_scaled``). Not offered: RoSA, lora_bias, an embedding with ``max_norm`` (its lookup
    renormalises rows in place) or ``sparse=True`` gradients. In eval mode ‖E‖² is kept between calls (a write
    through ``.data`` is seen at the next ``train()`` / ``eval()`` switch, as for the other layers)."""

    _stored_in_out = True

    def __init__(self, num_embeddings, embedding_dim, r=8, lora_alpha=8, lora_dropout=0.0, padding_idx=None,
                 use_rslora=False, init_lora_weights=True, device=None, dtype=None, adapter_name="default",
                 use_dora=False):
        """A new ``nn.Embedding(num_embeddings, embedding_dim, padding_idx)`` (frozen) with adapter ``adapter_name``."""
        nn.Module.__init__(self)
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            check_rank(v, name)
        self._wrap(nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype),
                   r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name, use_dora)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                       init_lora_weights=True, adapter_name="default", use_dora=False) -> "FastLoRAEmbedding":
        """Wrap ``embedding`` (its weight Parameter held, not copied, and frozen)."""
        check_embedding(embedding)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._wrap(embedding, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name, use_dora)
        return self

    def _wrap(self, embedding, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name,
              use_dora=False) -> None:
        self.padding_idx = embedding.padding_idx
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        if type(embedding).forward is not nn.Embedding.forward:  # a transformers scaled embedding (check_embedding)
            scale = embedding.embed_scale
            if isinstance(scale, torch.Tensor):  # Gemma 3's: a buffer, moving with the layer
                self.register_buffer("embed_scale", scale.detach().reshape(()), persistent=False)
            else:  # BART's: a Python number, as the module multiplies by it
                self._scale_number = float(scale)
            self.__dict__["_scaled_module"] = module_shell(embedding)  # (not registered) base_module() gives it back
        self._setup(embedding.weight, None, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                    use_dora=use_dora)

    from_linear = _refused("FastLoRAEmbedding wraps an nn.Embedding: FastLoRAEmbedding.from_embedding(embedding, "
                           "...); an nn.Linear takes FastLoRALinear.from_linear")
    from_conv1d = _refused("FastLoRAEmbedding wraps an nn.Embedding: FastLoRAEmbedding.from_embedding(embedding, "
                           "...); a Conv1D takes FastLoRALinear.from_conv1d")

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None,
                    use_dora=False):
        """Add adapter ``name`` (its own rank, alpha; dropout kept, not applied to ids), as
        ``FastLoRALinear.add_adapter``. ``use_dora=True`` (PEFT's DoRA embedding): a magnitude m (embedding_dim,),
        initialised to the norms of each column of E + s (B A)ᵀ over the vocabulary (W = Eᵀ's rows);
        ``sparse_density > 0`` is refused."""
        check_dora_options(use_dora, sparse_density)
        if sparse_density:
            raise ValueError(f"adapter {name!r}: sparse_density={sparse_density!r} on an embedding layer: fastpeft's "
                             "embedding LoRA takes LoRA and DoRA adapters, not a sparse delta")
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora=use_dora)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None,
                              _fresh: bool = False) -> None:
        """PEFT's embedding inits: ``True`` / ``"gaussian"`` / ``"orthogonal"`` A zeros, B ~ N(0, 1) (the layer
        starts as its base); ``False`` both ~ N(0, 1) (for tests). Drawn as PEFT's (CPU, fp32): with ``_fresh``
        first the randn A and B it makes before its init."""
        target = self._reset_target(init_lora_weights, adapter_name)
        if target is None:
            return
        _, spec, a, b = target
        if _fresh or init_lora_weights is False:
            a0, b0 = torch.randn(spec.r, self.in_features), torch.randn(self.out_features, spec.r)
        if init_lora_weights is False:
            a.copy_(a0)
            b.copy_(b0)
            return
        a.zero_()
        b.copy_(torch.empty(self.out_features, spec.r).normal_())

    def _check_input(self, x: torch.Tensor) -> None:
        check_embedding_ids(x, self.in_features)

    _scale_number = None  # a scaled embedding's embed_scale where it is a Python number (BART's)

    def _scaled(self, t: torch.Tensor, base: bool = False) -> torch.Tensor:
        """t times a scaled embedding's ``embed_scale``, as the embedding's forward (``base``: the lookup) and PEFT's
        layer (an adapter's term) apply it: a buffer in t's dtype; a Python number as such for the lookup, and rounded
        to the weight's dtype for an adapter's term (PEFT's ``_get_embed_scale``). t itself for a plain nn.Embedding."""
        scale = self._buffers.get("embed_scale")
        if scale is not None:
            return t * scale.to(t.dtype)
        number = self._scale_number
        if number is None:
            return t
        return t * number if base else t * torch.tensor(number, dtype=self.weight.dtype, device=t.device).to(t.dtype)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)

    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scaling * A^T[x] B^T`` of adapter ``name``, in the adapters' dtype: fp32 adapters on a bf16 / fp16 table
        compute in fp32 and the sum is rounded once to the table's dtype, as PEFT's layer does (a gather and an r-wide
        product: no cast of A, which has a column per token of the vocabulary)."""
        a, b = self._pair(name)
        return self._scaled((self._lookup(x, a.t()) @ b.t()) * self._specs[name].scaling)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (...) int ids -> (..., embedding_dim). ``adapter_ids`` (per id, ``x.shape``, or per sequence,
        ``(x.shape[0],)``) gives each position the adapter of that index in ``adapter_names`` (-1 = base only);
        inside ``fastpeft.mixed_batch`` the per-sequence routing applies."""
        routing, adapter_ids = self._routed_ids(x, adapter_ids)
        y = self._scaled(self._lookup(x, self.weight), base=True)
        if self.merged:
            return y
        if adapter_ids is None:
            if self._active is None:
                return y
            if self._specs[self._active].use_dora:
                return self._dora_lookup(x, y, self._active)
            return (y + self._branch(x, self._active)).to(y.dtype)
        self._refuse_routed_variants(routing)
        rows = x.unsqueeze(-1)  # the per-row id rules of the linear layers, rows = x's positions
        if routing is not None:  # the names are on the host: each adapter computes on its own sequences only
            per = routed_batch(adapter_ids.shape[0], rows, routing[1])
            names = [n for n in routing[0][0] for _ in range(per)]
            return self._grouped(y, x, ((n, torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device))
                                        for n in dict.fromkeys(names) if n in self._specs))
        ids = expand_adapter_ids(adapter_ids, rows, len(self._specs), check_range=True)
        if x.device.type == "cpu":  # reading the ids on the host costs nothing here: each adapter on its own ids
            specs = list(self._specs)
            # per sequence (one id per row of dim 0): whole sequences; else single positions
            seq = x.dim() > 1 and adapter_ids.shape == x.shape[:1]
            by = adapter_ids if seq else ids
            return self._grouped(y, x, ((specs[i], (by == i).nonzero().squeeze(1) if seq else
                                         (by == i).nonzero(as_tuple=True)) for i in by.unique().tolist() if i >= 0))
        out = y  # on a GPU without a host read (no sync; CUDA-graph capturable): every adapter's branch, masked
        for i, name in enumerate(self._specs):
            out = out + torch.where((ids == i)[..., None], self._branch(x, name), 0.0)
        return out.to(y.dtype)

    def _dora_lookup(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        """PEFT's DoRA embedding: ``g ⊙ (E[x] + s Aᵀ[x] Bᵀ)``, g = m / n with n_j = ‖E[:, j] + s (B A)ᵀ[:, j]‖ over the
        vocabulary (detached), taken in factored form (``ops.dora.dora_norm`` on W = Eᵀ: E read once, no (vocab, dim)
        temporary; PEFT forms (B A)ᵀ and E + s (B A)ᵀ at every call); summed in fp32 (fp64 for fp64), rounded once."""
        from .ops.dora import dora_norm

        s = self._specs[name]
        a, b = self._pair(name)
        n = dora_norm(self._w(), a, b, s.scaling, weight_sq_norm=self._weight_sq_norm())
        lora = self._branch(x, name)
        acc = torch.promote_types(torch.promote_types(y.dtype, lora.dtype), torch.float32)
        g = _entry(self._modules["lora_magnitude_vector"], name).to(acc) / n.to(acc)
        return (g * (y.to(acc) + lora.to(acc))).to(y.dtype)

    def _grouped(self, y: torch.Tensor, x: torch.Tensor, groups) -> torch.Tensor:
        """``y`` plus each adapter's branch on its own entries of ``x`` only: ``groups`` of (name, index), the index a
        tensor of whole sequences (rows of dim 0) or a tuple of positions. Before 2026-12-01 every adapter ran on the
        whole batch (16 adapters at 16 x 128 ids: 16x PEFT's time). fp32 adapters on a half table are summed in fp32
        and rounded once, as PEFT."""
        out = None
        for name, index in groups:
            branch = self._branch(x[index], name)
            if out is None:  # (y is this call's own: written in place, once per adapter; nothing saved it)
                out = y.to(torch.promote_types(y.dtype, branch.dtype))
            branch = branch.to(out.dtype)
            if isinstance(index, tuple):
                out.index_put_(index, branch, accumulate=True)
            else:
                out.index_add_(0, index, branch)
        return y if out is None else out.to(y.dtype)

    def base_module(self) -> nn.Module:
        """The ``nn.Embedding`` in this layer's place, holding its weight Parameter (no copy); for a scaled embedding
        the wrapped module itself, its ``embed_scale`` the layer's."""
        scaled = self.__dict__.get("_scaled_module")
        if scaled is not None:
            scaled.weight = self.weight
            if "embed_scale" in self._buffers:
                scaled.embed_scale = self.embed_scale
            return scaled
        emb = nn.Embedding(self.in_features, self.out_features, padding_idx=self.padding_idx,
                           scale_grad_by_freq=self.scale_grad_by_freq, device="meta")
        emb.weight = self.weight
        return emb

    def to_linear(self):
        """Refused: an embedding has no nn.Linear form (``merge()`` then ``base_module()``: the merged table)."""
        raise TypeError("to_linear: an embedding layer has no nn.Linear form; merge_and_unload gives the merged "
                        "nn.Embedding (base_module() after merge())")

    def extra_repr(self) -> str:
        return "embedding: " + super().extra_repr().replace("in_features=", "num_embeddings=").replace(
            "out_features=", "embedding_dim=").replace(", bias=False", f", padding_idx={self.padding_idx}")



def conv_reason(conv: nn.Module) -> str | None:
    """Why fastpeft's ops cannot compute LoRA on ``conv`` (an ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``, or a subclass
    keeping their ``forward`` and ``_conv_forward``: the ops convolve with the weight as it is), or None when they
    can."""
    torch_cls = next((c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(conv, c)), None)
    if torch_cls is None or type(conv).forward is not torch_cls.forward or \
            type(conv)._conv_forward is not torch_cls._conv_forward:
        return (f"a {type(conv).__module__}.{type(conv).__name__}: LoRA convolutions wrap nn.Conv1d / Conv2d / Conv3d "
                "(or a subclass keeping their forward and _conv_forward); a transposed convolution or a computation of "
                "its own is not taken")
    if conv.groups != 1:
        return (f"groups={conv.groups}: a grouped convolution (PEFT cannot merge LoRA into one either); fastpeft's "
                "LoRA convolutions take groups=1")
    if dilated(conv) and conv.padding != "same":
        return (f"dilation={tuple(conv.dilation)} with kernel_size={tuple(conv.kernel_size)} and padding="
                f"{conv.padding!r}: PEFT's lora_A is not dilated, so its output would not have the base's shape "
                "(PEFT's layer fails on it too; with padding='same' both keep the input's)")
    return None


def dilated(conv: nn.Module) -> bool:
    """Whether ``conv`` dilates a kernel wider than 1 (PEFT's lora_A, not dilated, then sees another receptive
    field: computed by the plain composition, not ``lora_conv``, which convolves A as W)."""
    return any(d != 1 and k != 1 for d, k in zip(conv.dilation, conv.kernel_size))


def wrap_reason(conv: nn.Module) -> str | None:
    """Why ``FastLoRAConv`` cannot hold ``conv``'s weight as its own (None: it can): a weight computed from other
    Parameters (``parametrizations.weight_norm``, the older ``weight_norm``'s pre-hook) or any forward hook, which
    the layer would drop. (``fastpeft.accelerate`` computes such PEFT layers: it reads the weight at each call.)"""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(conv) or not isinstance(conv._parameters.get("weight"), nn.Parameter):
        return (f"a {type(conv).__name__} whose weight is computed from other Parameters (weight_norm, a "
                "parametrization): fastpeft's layer would drop them; train it through PEFT and fastpeft.accelerate")
    if conv._forward_pre_hooks or conv._forward_hooks:
        return f"a {type(conv).__name__} with forward hooks, which fastpeft's layer would drop"
    return None


class FastLoRAConv(FastLoRALinear):
    """LoRA on an ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``):
    ``y = conv(x, W) + b + scaling * conv1x1(conv(drop(x), A), B)``, computed by ``fastpeft.lora_conv``.

    Shapes: weight W (O, C, *k), the convolution's own Parameter (frozen); lora_A (r, C, *k), a kernel of the
    base's size, stride and padding (zero padding, as PEFT's, whatever the base's ``padding_mode``); lora_B
    (O, r, 1, ...): PEFT's two convolutions' kernels, so its files load unchanged. x (N, C, *S) or unbatched
    (C, *S) -> (N, O, *S'). ``in_features`` is C·prod(k) and ``out_features`` O: W, A and ``delta_weight()`` as
    (O, C·prod(k)) matrices (merging adds ``s B A`` in W's shape, as PEFT). Several adapters, ``set_adapter``,
    merge / unmerge, ``adapter_ids`` (one id per sample, (N,)) and ``mixed_batch`` as ``FastLoRALinear``.
    ``use_dora=True``: PEFT's DoRA convolution (``fastpeft.dora_conv``), its magnitude (1, O, 1, ...). Not offered
    (``conv_reason``): groups > 1, a dilated kernel wider than 1, another module's forward; nor sparse deltas (RoSA),
    nor DoRA on a base padded otherwise than with zeros."""

    def __init__(self, conv: nn.Module, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                 adapter_name="default", use_dora=False, lora_bias=False):
        """Wrap ``conv`` (its weight and bias Parameters held, not copied, and frozen) with adapter ``adapter_name``."""
        nn.Module.__init__(self)
        if not isinstance(conv, nn.Module):
            raise TypeError(f"conv must be an nn.Conv1d / Conv2d / Conv3d, got {type(conv).__name__}")
        why = conv_reason(conv) or wrap_reason(conv)
        if why is not None:
            raise ValueError(f"FastLoRAConv cannot wrap {why}")
        self.conv_dims = conv.weight.dim() - 2
        self._conv_type = type(conv)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = (tuple(int(v) for v in t)
                                                        for t in (conv.kernel_size, conv.stride, conv.dilation))
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(int(v) for v in conv.padding)
        self.padding_mode = conv.padding_mode
        self._dilated = dilated(conv)
        self._reversed_padding = getattr(conv, "_reversed_padding_repeated_twice", None)
        self.__dict__["_conv_module"] = module_shell(conv)  # (not registered) base_module() gives it back
        self._setup(conv.weight, conv.bias, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                    use_dora=use_dora, lora_bias=lora_bias)

    @classmethod
    def from_conv(cls, conv: nn.Module, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                  adapter_name="default", use_dora=False, lora_bias=False) -> "FastLoRAConv":
        """``FastLoRAConv(conv, ...)``: wrap ``conv``, sharing (not copying) its weight and bias."""
        return cls(conv, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_name, use_dora, lora_bias)

    from_linear = _refused("FastLoRAConv wraps an nn.Conv1d / Conv2d / Conv3d: FastLoRAConv.from_conv(conv, ...); "
                           "an nn.Linear takes FastLoRALinear.from_linear")
    from_conv1d = _refused("FastLoRAConv wraps torch's nn.Conv1d / Conv2d / Conv3d; transformers' Conv1D (GPT-2) is a "
                           "linear layer: FastLoRALinear.from_conv1d")

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None,
                    use_dora=False, lora_bias=False):
        """Add adapter ``name`` (its own rank, alpha, dropout, lora_bias), as ``FastLoRALinear.add_adapter``: A
        (r, C, *k) and B (O, r, 1, ...) drawn as PEFT's convolutions draw them; ``use_dora=True``: a DoRA adapter, its
        magnitude (1, O, 1, ...) (PEFT's) the norms of W + s B A over C and the kernel. ``sparse_density > 0`` is
        refused, and DoRA on a base padded otherwise than with zeros or dilated (PEFT's DoRA convolution computes part
        of it with zero padding and no dilation)."""
        check_dora_options(use_dora, sparse_density)
        if sparse_density:
            raise ValueError(f"adapter {name!r}: sparse_density={sparse_density!r} on a convolution: fastpeft's "
                             "convolutions take LoRA and DoRA adapters, not a sparse delta")
        if use_dora is True and (self.padding_mode != "zeros" or self._dilated):
            what = f"padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else \
                f"dilation={self.dilation}"
            raise ValueError(f"adapter {name!r}: use_dora=True on a convolution with {what}: PEFT's DoRA convolution "
                             "computes part of its base with zero padding and no dilation; use a LoRA adapter there")
        if isinstance(init_lora_weights, str) and init_lora_weights == "orthogonal":
            raise ValueError(f"adapter {name!r}: init_lora_weights='orthogonal' on a convolution: PEFT's orthogonal "
                             "init is for linear layers (PEFT refuses it here, and could not load the file)")
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora=use_dora,
                            lora_bias=lora_bias)
        # the factors in PEFT's kernel shapes (the same numbers: drawn as (r, C·K) / (O, r), the fan-ins PEFT's have)
        for table, shape in ((self.lora_A_adapters, (r, self.in_channels, *self.kernel_size)),
                             (self.lora_B_adapters, (self.out_channels, r) + (1,) * self.conv_dims)):
            p = table[name]
            table[name] = nn.Parameter(p.detach().view(shape), requires_grad=p.requires_grad)

    def _reset_target(self, init_lora_weights, adapter_name: str | None) -> tuple | None:
        """``FastLoRALinear._reset_target`` with A and B as (r, C·K) / (O, r) views of their kernels (the draws
        write through them)."""
        target = super()._reset_target(init_lora_weights, adapter_name)
        if target is None:
            return None
        name, spec, a, b = target
        return name, spec, a.view(spec.r, -1), b.view(b.shape[0], spec.r)

    @torch.no_grad()
    def _exact_delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """``s B A`` in W's shape (O, C, *k), fp32 (fp64 for an fp64 W), as PEFT's ``get_delta_weight``."""
        return super()._exact_delta(adapter_name).view(self.weight.shape)

    @torch.no_grad()
    def _add_magnitude(self, name: str, trains: bool) -> None:
        """m = ‖W + sBA‖ over C and the kernel, (1, O, 1, ...) as PEFT's ``_DoraConvNdLayer`` keeps it, computed in
        fp32 then W's dtype."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        w = (self._w().to(acc) + self._exact_delta(name).to(acc)).flatten(1)
        m = torch.linalg.vector_norm(w, dim=1).to(self.weight.dtype)
        shape = (1, self.out_channels) + (1,) * self.conv_dims
        self.lora_magnitude_vector[name] = nn.Parameter(m.view(shape), requires_grad=trains)

    @torch.no_grad()
    def _dora_merged(self, name: str) -> tuple:
        """(W' = (m / n) ⊙ (W + sBA) in W's shape and dtype, n fp32 (O,)), as PEFT's merge."""
        delta = self._exact_delta(name)
        dt = delta.dtype
        w = self._w().to(dt) + delta
        n = torch.linalg.vector_norm(w.flatten(1), dim=1)
        g = self.lora_magnitude_vector[name].reshape(-1).to(dt) / n
        return (g.view(-1, *(1,) * self.conv_dims, 1) * w).to(self.weight.dtype), n

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W -= sBA (LoRA), W ← W ⊙ (n/m) − sBA (DoRA, with the n kept at merge)."""
        if not self.merged or self._active is None or not self.is_dora():
            return super().unmerge()
        dt = self._dora_norm.dtype
        g = self.lora_magnitude_vector[self._active].reshape(-1).to(dt) / self._dora_norm
        w = self._w().to(dt) / g.view(-1, *(1,) * self.conv_dims, 1) - self._exact_delta(self._active).to(dt)
        self._w().copy_(w.to(self.weight.dtype))
        self._dora_norm = None
        self.merged = False

    def _check_input(self, x: torch.Tensor) -> None:
        d = self.conv_dims
        if not isinstance(x, torch.Tensor) or x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, *spatial) or unbatched ({self.in_channels}, "
                             f"*spatial) with {d} spatial dims for this {self._conv_type.__name__}, got {got}")

    def _base_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The base convolution of x (``padding_mode`` applied as the conv's own forward does)."""
        conv = CONV_FNS[self.conv_dims]
        if self.padding_mode != "zeros":
            return conv(F.pad(x, self._reversed_padding, mode=self.padding_mode), self.weight, self.bias, self.stride,
                        0, self.dilation)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _factors(self, name: str) -> tuple:
        """(A (r, C, *k), B (O, r)) of adapter ``name`` in W's dtype (fp32 adapters on a half-precision W cast per call,
        or kept between no-grad calls in eval mode)."""
        a, b = self._pair(name)
        if a.dtype != self.weight.dtype or b.dtype != self.weight.dtype:
            a, b = cast_params((a, b), self.weight.dtype, self._kept(), "_casts")
        return a, b.view(b.shape[0], b.shape[1])

    def _branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scaling * conv1x1(conv(drop(x), A), B)`` of adapter ``name`` alone (PEFT's branch: A zero-padded), by
        autograd: mixed batches, and bases padded otherwise than with zeros."""
        s = self._specs[name]
        a, b = self._factors(name)
        conv = CONV_FNS[self.conv_dims]
        if self.training and s.lora_dropout > 0.0:
            x = F.dropout(x, s.lora_dropout, True)
        u = conv(x, a, None, self.stride, self.padding)  # (PEFT's lora_A: not dilated)
        lb = self._modules["lora_bias_adapters"]._parameters.get(name)
        return conv(u, b.view(*b.shape, *(1,) * self.conv_dims), lb if lb is None else lb.to(b.dtype)) * s.scaling

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, *S) or (C, *S) -> (N, O, *S'). ``adapter_ids`` (N,) gives each sample the adapter of that index in
        ``adapter_names`` (-1 = base only); inside ``fastpeft.mixed_batch`` the per-sequence routing applies."""
        routing, adapter_ids = self._routed_ids(x, adapter_ids)
        if self.merged or adapter_ids is None and self._active is None:
            return self._base_conv(x)
        if adapter_ids is None:
            name = self._active
            s = self._specs[name]
            if self.padding_mode != "zeros" or self._dilated:  # PEFT's branch beside the base, by autograd
                y = self._base_conv(x)
                return (y + self._branch(x, name)).to(y.dtype)
            a, b = self._factors(name)
            if s.use_dora:
                return dora_conv(x, self.weight, self.bias, a, b, _entry(self._modules["lora_magnitude_vector"], name),
                                 s.scaling, s.lora_dropout, self.training, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation)
            bias = self.bias
            lb = self._modules["lora_bias_adapters"]._parameters.get(name)
            if lb is not None:  # PEFT's lora_bias: s b_B joins the layer's bias
                bias = with_lora_bias(bias, lb, s.scaling, self.weight.dtype)
            return lora_conv(x, self.weight, bias, a, b, s.scaling, s.lora_dropout, self.training,
                             stride=self.stride, padding=self.padding, dilation=self.dilation)
        if x.dim() == self.conv_dims + 1:
            raise ValueError("adapter_ids route the samples of a batched input (N, C, *spatial); got an unbatched x "
                             f"of shape {tuple(x.shape)}")
        self._refuse_routed_variants(routing)
        if routing is not None:
            adapter_ids = _per_row(adapter_ids, routed_batch(adapter_ids.shape[0], x, routing[1]))
        ids = expand_adapter_ids(adapter_ids, x[:, 0].flatten(1)[:, :1], len(self._specs), check_range=routing is None)
        ids = ids.reshape(-1)
        y = self._base_conv(x)
        names = list(self._specs)
        if x.device.type == "cpu" and not tracing_or_transformed():  # each adapter on its own samples (host ids)
            for i in ids.unique().tolist():
                if i >= 0:
                    index = (ids == i).nonzero().squeeze(1)
                    y = y.index_add(0, index, self._branch(x[index], names[i]).to(y.dtype))
            return y
        used = None if routing is None else set(routing[0][0])  # (those the block routes: the others get no grad)
        for i, name in enumerate(names):  # traced, or on a GPU without a host read: every adapter's branch, masked
            if used is None or name in used:
                y = y + torch.where((ids == i).view(-1, *(1,) * (y.dim() - 1)), self._branch(x, name), 0).to(y.dtype)
        return y

    def base_module(self) -> nn.Module:
        """The convolution this layer wrapped (the module itself: a subclass of its own keeps its class and state),
        holding the layer's weight and bias Parameters (no copy)."""
        conv = self.__dict__["_conv_module"]
        conv.weight = self.weight
        conv.bias = self.bias
        return conv

    def to_linear(self):
        """Refused: a convolution has no nn.Linear form (``merge()`` then ``base_module()``: the merged convolution)."""
        raise TypeError("to_linear: a convolution layer has no nn.Linear form; merge_and_unload gives the merged "
                        f"{self._conv_type.__name__} (base_module() after merge())")

    def extra_repr(self) -> str:
        return (f"{self._conv_type.__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}), " + super().extra_repr())


# ---- LoRA on parameters (PEFT's target_parameters): a mixture of experts' expert weights, any 2-D / 3-D one -------

def param_base(module: nn.Module) -> nn.Module:
    """The module under a chain of ``FastLoRAParameter`` layers (``module`` itself when it is none)."""
    while isinstance(module, FastLoRAParameter):
        module = module._modules["base_layer"]
    return module


def parameter_reason(module: nn.Module, name: str) -> str | None:
    """Why LoRA cannot go on ``module``'s own Parameter ``name`` (None: it can): PEFT's ``ParamWrapper`` takes a 2-D
    (out, in) or 3-D (experts, out, in) floating-point Parameter."""
    p = module._parameters.get(name)
    what = f"{type(module).__name__}.{name}"
    if not isinstance(p, torch.Tensor):
        return f"{type(module).__name__} has no Parameter {name!r}"
    if type(module).__module__.startswith("peft."):
        return f"{what} belongs to a Hugging Face PEFT layer (fastpeft.to_peft / PEFT's API for PEFT's models)"
    if p.dim() not in (2, 3):
        return (f"{what} is a {p.dim()}-D Parameter {tuple(p.shape)}: LoRA on parameters (PEFT's ParamWrapper) takes "
                "2-D (out, in) and 3-D (experts, out, in) ones")
    if not p.is_floating_point():
        return f"{what} is a {type(p).__name__} of dtype {p.dtype} (quantized): LoRA needs a floating-point weight"
    return None


def parameter_layout(module: nn.Module, name: str) -> tuple:
    """``(experts, in_features, out_features, transposed)`` of ``module``'s Parameter ``name`` as PEFT's
    ``ParamWrapper`` reads it: 2-D (out, in), one expert; 3-D (E, out, in), or (E, in, out) where the module says
    ``is_transposed`` (gpt-oss)."""
    w = getattr(module, name)
    transposed = w.dim() == 3 and bool(getattr(module, "is_transposed", False))
    d1, d2 = w.shape[-2:]
    return (w.shape[0] if w.dim() == 3 else 1, *((d1, d2) if transposed else (d2, d1)), transposed)


def parameter_adapter_reason(lora_dropout=0.0, use_dora=False, lora_bias=False, sparse_density=0.0,
                             init_lora_weights=True) -> str | None:
    """Why an adapter with these options cannot go on a parameter (None: it can): PEFT's ``ParamWrapper`` rules (no
    dropout: x cannot be factored out of a product with W + s B A; no DoRA, lora_bias), and neither a sparse delta nor
    the orthogonal init (PEFT's draws r x r blocks of an (r, in) A, not of its (r E, in) one)."""
    for value, what in ((lora_dropout, "lora_dropout != 0 (PEFT's ParamWrapper refuses it: dropout(x) cannot be "
                                       "factored out of a product with W + s B A)"),
                        (use_dora, "use_dora=True (PEFT's ParamWrapper refuses LoRA variants)"),
                        (lora_bias, "lora_bias=True (PEFT's ParamWrapper refuses it)"),
                        (sparse_density, "a sparse delta (sparse_density > 0)"),
                        (init_lora_weights in ("orthogonal", "eva"), f"init_lora_weights={init_lora_weights!r}"),
                        (base_rewriting_init(init_lora_weights) is not None,
                         f"init_lora_weights={init_lora_weights!r} (PiSSA / OLoRA / LoftQ rewrite a layer's 2-D "
                         "weight)")):
        if value:
            return f"LoRA on parameters (target_parameters) takes no {what}"
    return None


def _loftq_reason(module: nn.Module, what: str) -> str | None:
    """Why LoftQ cannot rewrite ``module`` where PiSSA could (the rules they share are ``base_rewriting_reason``'s)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{what} needs bitsandbytes (its quantizers make Q, as PEFT's LoftQ): pip install bitsandbytes"
    if isinstance(module, (nn.Embedding, FastLoRAEmbedding)):
        return (f"{what} on an embedding: PEFT's LoftQ is for linear layers (its embedding path fails with a "
                "TypeError); exclude it")
    return None


def base_rewriting_reason(module: nn.Module, r: int, init_lora_weights, sparse_density=0.0) -> str | None:
    """Why PEFT's base-rewriting init ``init_lora_weights`` (PiSSA / OLoRA, ``base_rewriting_init``) cannot make an
    adapter of rank ``r`` on ``module`` (an ``nn.Linear`` / Conv1D / embedding / ... or fastpeft's layer on one); None
    where it can, or where the init does not rewrite W (an embedding: PEFT gives it its plain embedding init)."""
    kind = base_rewriting_init(init_lora_weights)
    what = f"init_lora_weights={init_lora_weights!r}"
    if kind == "loftq":
        why = _loftq_reason(module, what)
        if why is not None:
            return why
    if kind is None or isinstance(module, (nn.Embedding, FastLoRAEmbedding)):
        return None
    if isinstance(module, FastLoRAParameter):
        return f"{what} on a parameter (target_parameters): PEFT's PiSSA / OLoRA / LoftQ rewrite a layer's 2-D weight"
    if isinstance(module, (FastLoRAConv, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (f"{what} on a convolution: PEFT's PiSSA / OLoRA / LoftQ are for linear layers (PEFT raises "
                f"{'a TypeError' if kind == 'loftq' else repr('Unknown initialization')} on convolutions); exclude it")
    if is_quantized(module) or isinstance(module, QLoRALinear):
        return f"{what} on a bitsandbytes {type(getattr(module, 'base_layer', module)).__name__} base: " + (
            "LoftQ quantizes a floating-point W itself (PEFT's rule: do not pass a quantized model); on a model "
            "loaded in 4 bits, fastpeft.replace_lora_weights_loftq(model, model_path) sets the adapters from the "
            "original weights instead" if kind == "loftq" else
            "the factors come from a floating-point W (PEFT refuses PiSSA on a quantized weight; its OLoRA "
            "requantizes the residual, which fastpeft does not offer); initialise on the floating-point model, save "
            "its residual (fastpeft.unload), quantize that, and load the adapter on it with load_adapter(..., "
            "residual=True)")
    if sparse_density:
        return (f"{what} beside a sparse delta (RoSA, sparse_density={sparse_density!r}): not offered; use one of "
                "the two")
    if kind == "corda" and (is_conv1d(module) or getattr(module, "fan_in_fan_out", False)):
        return f"{what} on a transformers Conv1D (W stored (in, out)): not offered here (PEFT's transposes it)"
    if kind in ("olora", "loftq") and (is_conv1d(module) or getattr(module, "fan_in_fan_out", False)):
        return (f"{what} on a transformers Conv1D (W stored (in, out)): PEFT's {kind}_init factors the stored (in, "
                "out) matrix, " + ("giving A and B of the wrong shapes" if kind == "loftq" else
                                   "and its layer then fails at the first forward") + "; 'pissa' works there")
    if getattr(module, "merged", False):
        return f"{what} on a layer with a merged adapter: W is not the base weight; unmerge() first"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if kind == "loftq"
                                                                                 else ()):
            # (PEFT's PiSSA / OLoRA rule; its LoftQ computes in fp32 and casts back, fp64 too)
            return f"{what} needs an fp32 / fp16 / bf16 base weight (PEFT's rule), got {weight.dtype}"
        if weight.dim() == 2 and r > min(weight.shape):
            return (f"{what} with r={r}: W {tuple(weight.shape)} has only {min(weight.shape)} singular directions "
                    f"(r <= {min(weight.shape)})")
    return None


def _fast_experts(base: nn.Module, names: list) -> bool:
    """Whether ``lora_experts`` computes LoRA on ``base``'s parameters ``names``: a transformers experts module's
    expert weights."""
    return experts_reason(base) is None and all(n in (up_projection(base), "down_proj") for n in names)


class FastLoRAParameter(FastLoRALinear):
    """LoRA on one Parameter of a module (PEFT's ``ParamWrapper``, its ``target_parameters``): W (out, in), or a
    mixture of experts' W (E, out, in) with expert e's update ``s B_e A_e``.

    ``base_layer``: the module holding the Parameter ``parameter_name``, or another ``FastLoRAParameter`` on its other
    Parameter. As PEFT nests its wrappers (one per Parameter, the first registered innermost), the module names and
    the file keys (``<module>.lora_A.weight``, ``<module>.base_layer.lora_A.weight``) are PEFT's. Shapes are PEFT's:
    lora_A (r E, in) holds expert e's rows at e r .. e r + r - 1, lora_B (out, r E) expert e's column j at j E + e
    (E = 1 for a 2-D Parameter); a 3-D Parameter is (E, in, out) where its module says ``is_transposed`` (gpt-oss).
    ``weight`` is the Parameter itself, read from its module (not registered here).

    ``forward(*args, **kwargs)`` is the module's call with the active adapter of every layer of the chain (the
    outermost is the one called): on a transformers experts module's ``gate_up_proj`` / ``up_proj`` / ``down_proj``
    (``use_experts_implementation``, transformers >= 5) by ``fastpeft.lora_experts`` (the routed rows' products only,
    never W + sBA per expert; ``adapter_ids`` (T,) per token and ``mixed_batch`` as ``FastLoRALinear``, one name per
    sequence of the (batch, seq) tokens the experts take flattened); on any other Parameter (a router's weight, another
    module's experts) as PEFT computes it, the module called with W + s B A in the Parameter's place
    (``torch.func.functional_call``; per-row adapters by one call per adapter in the batch, ``_composed_rows``).
    Several adapters, ``set_adapter``, merge / unmerge as ``FastLoRALinear``. PEFT's rules: no dropout, DoRA,
    lora_bias (and no sparse delta, nor the orthogonal init)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r=8, lora_alpha=8, use_rslora=False,
                 init_lora_weights=True, adapter_name="default"):
        """Wrap ``base_layer``'s Parameter ``parameter_name`` (held in place, frozen) with adapter ``adapter_name``."""
        nn.Module.__init__(self)
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module holding the Parameter, got {type(base_layer).__name__}")
        if not isinstance(parameter_name, str):
            raise TypeError(f"parameter_name must be the name of a Parameter of base_layer, got {parameter_name!r}")
        base = param_base(base_layer)
        why = parameter_reason(base, parameter_name)
        if why is not None:
            raise ValueError(f"parameter_name {parameter_name!r}: {why}")
        if parameter_name in [m.parameter_name for m in FastLoRAParameter.chain(base_layer)]:
            raise ValueError(f"parameter_name {parameter_name!r}: base_layer holds LoRA on it already (add_adapter "
                             "adds adapters beside)")
        self.parameter_name = parameter_name
        self.num_experts, self.in_features, self.out_features, self.is_transposed = parameter_layout(base,
                                                                                                     parameter_name)
        self.base_layer = base_layer
        self._setup(base._parameters[parameter_name], None, adapter_name, r, lora_alpha, 0.0, use_rslora,
                    init_lora_weights)

    from_linear = _refused("FastLoRAParameter wraps a Parameter of a module: FastLoRAParameter(module, "
                           "parameter_name, ...); a whole nn.Linear takes FastLoRALinear.from_linear")
    from_conv1d = from_linear

    @staticmethod
    def chain(module: nn.Module) -> list:
        """The ``FastLoRAParameter`` layers from ``module`` inwards (empty when it is none)."""
        out = []
        while isinstance(module, FastLoRAParameter):
            out.append(module)
            module = module._modules["base_layer"]
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The Parameter (out, in), or (E, out, in) / (E, in, out) (``is_transposed``), its module's own."""
        return getattr(param_base(self._modules["base_layer"]), self.parameter_name)

    def _init_base(self, weight: nn.Parameter, bias) -> None:  # (in / out features: parameter_layout's, in __init__)
        weight.requires_grad_(False)
        self.merged = False

    @property
    def bias(self) -> torch.Tensor | None:
        """The module's ``bias`` (a Linear's, a router's), as PEFT's ``ParamWrapper`` gives it (``bias="lora_only"``
        trains and saves it); on the innermost layer of a chain only, None on the others and where the module has
        none. The layer's forward is the module's, bias included."""
        base = self._modules["base_layer"]
        b = None if isinstance(base, FastLoRAParameter) else getattr(base, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None,
                    use_dora=False, lora_bias=False):
        """Add adapter ``name`` (its own rank and alpha), frozen unless it is the layer's first; lora_A (r E, in) and
        lora_B (out, r E) drawn as PEFT's (``reset_lora_parameters``). Dropout, DoRA, lora_bias and sparse deltas are
        refused (``parameter_adapter_reason``)."""
        check_adapter_name(name)
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora)
        check_init(init_lora_weights)
        why = parameter_adapter_reason(lora_dropout, use_dora, lora_bias, sparse_density, init_lora_weights)
        if why is not None:
            raise ValueError(f"adapter {name!r} on {self.parameter_name}: {why}")
        if name in self._specs:
            raise ValueError(f"adapter {name!r} already exists in this layer (adapters {self.adapter_names})")
        kw = self._adapter_kwargs()
        trains = self._active is None
        rows = spec.r * self.num_experts
        self.lora_A_adapters[name] = nn.Parameter(torch.empty(rows, self.in_features, **kw), requires_grad=trains)
        self.lora_B_adapters[name] = nn.Parameter(torch.empty(self.out_features, rows, **kw), requires_grad=trains)
        self._specs[name] = spec
        self.reset_lora_parameters(init_lora_weights, adapter_name=name, _fresh=True)
        self._meta = None
        self._reroute()

    def update_adapter(self, name: str, lora_alpha=None, lora_dropout=None, use_rslora=None) -> None:
        """``FastLoRALinear.update_adapter``; a dropout other than 0 is refused (PEFT's rule)."""
        if lora_dropout:
            raise ValueError(f"adapter {name!r} on {self.parameter_name}: "
                             + parameter_adapter_reason(lora_dropout=lora_dropout))
        super().update_adapter(name, lora_alpha, lora_dropout, use_rslora)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None,
                              _fresh: bool = False) -> None:
        """PEFT's inits of its ``ParamWrapper``: ``True`` A (r E, in) kaiming-uniform(a=sqrt(5)), B zeros;
        ``"gaussian"`` A ~ N(0, std=1/r); ``False`` both kaiming-uniform. Drawn as PEFT draws them (with ``_fresh``
        first its two ``nn.Linear`` layers' draws), on the CPU in fp32, then copied."""
        target = self._reset_target(init_lora_weights, adapter_name)
        if target is None:
            return
        name, spec, a, b = target
        why = parameter_adapter_reason(init_lora_weights=init_lora_weights)
        if why is not None:
            raise ValueError(f"adapter {name!r} on {self.parameter_name}: {why}")

        def kaiming(*shape):
            return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        rows, k, n = a.shape[0], self.in_features, self.out_features
        if _fresh or init_lora_weights is False:
            a0, b0 = kaiming(rows, k), kaiming(n, rows)
        if init_lora_weights is False:
            a.copy_(a0)
            b.copy_(b0)
            return
        a.copy_(torch.empty(rows, k).normal_(0.0, 1.0 / spec.r) if init_lora_weights == "gaussian"
                else kaiming(rows, k))
        b.zero_()

    def _factors(self, name: str) -> tuple:
        """Adapter ``name`` as ``lora_experts`` takes it: ``(A (E, r, in), B (E, out, r), scaling)``, views of the
        Parameters (PEFT's ``get_delta_factors``)."""
        return (*peft_expert_factors(*self._pair(name), self.num_experts), self._specs[name].scaling)

    def _in_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """An (E, out, in) delta in W's layout: transposed where W is (E, in, out), (out, in) for a 2-D W."""
        if self.is_transposed:
            delta = delta.transpose(1, 2)
        return delta if self.weight.dim() == 3 else delta[0]

    def _delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``s B_e A_e`` of adapter ``name`` in W's layout and ``dtype``, differentiable: computed in the factors'
        dtype, then cast (PEFT's ``get_delta_weight``)."""
        a, b, s = self._factors(name)
        return self._in_layout(torch.bmm(b, a) * s).to(dtype)

    @torch.no_grad()
    def _exact_delta(self, adapter_name: str | None = None) -> torch.Tensor:
        """``s B_e A_e`` in W's layout, fp32 (fp64 for an fp64 W): what merging adds."""
        name = self._active if adapter_name is None else adapter_name
        self._spec_of(name)
        a, b, s = self._factors(name)
        dt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self._in_layout(s * torch.bmm(b.to(dt), a.to(dt)))

    def base_module(self) -> nn.Module:
        """The module holding the Parameter (its merged or unmerged weights; no copy)."""
        return param_base(self)

    def to_linear(self):
        raise TypeError(f"FastLoRAParameter holds LoRA on {type(param_base(self)).__name__}.{self.parameter_name}, "
                        "not a linear layer: fastpeft.merge_and_unload(model) folds it into that module")

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, alpha={s.lora_alpha}, scaling={s.scaling:g})"
                             for n, s in self._specs.items())
        return (f"parameter_name={self.parameter_name!r}, shape={tuple(self.weight.shape)}, "
                f"in_features={self.in_features}, out_features={self.out_features}, active={self._active!r}, "
                f"merged={self.merged}, adapters=[{adapters}]")

    def forward(self, *args, adapter_ids: torch.Tensor | None = None, **kwargs):
        """The module's call with LoRA on the chain's Parameters. An experts module: ``(hidden_states (T, H),
        top_k_index (T, k), top_k_weights (T, k))`` -> (T, H); ``adapter_ids``: (T,) per token, or (n,) with n
        dividing T (a run of T / n tokens each), the index of an adapter in ``adapter_names`` (-1: none); inside
        ``fastpeft.mixed_batch`` each sequence's adapter. Any other module: its own arguments (per-row adapters: see
        ``_composed_rows``)."""
        chain = FastLoRAParameter.chain(self)
        base = param_base(self)
        if type(base).__module__.startswith("peft."):
            raise TypeError(f"{type(base).__name__}, a Hugging Face PEFT layer, sits inside fastpeft's LoRA layers "
                            "(peft.get_peft_model on a model fastpeft.inject prepared): use one of the two, or "
                            "fastpeft.to_peft(model) to hand fastpeft's adapters to PEFT first")
        if _fast_experts(base, [m.parameter_name for m in chain]):
            return self._experts_forward(chain, base, *args, adapter_ids=adapter_ids, **kwargs)
        routing = _call_routing(self, adapter_ids)
        if adapter_ids is not None or routing is not None:
            return self._composed_rows(chain, base, adapter_ids, routing, args, kwargs)
        weights = {m.parameter_name: m.weight + m._delta(m._active, m.weight.dtype) for m in chain
                   if m._active is not None and not m.merged}
        if not weights:
            return base(*args, **kwargs)
        return torch.func.functional_call(base, weights, args, kwargs)

    def _composed_rows(self, chain: list, base: nn.Module, adapter_ids, routing, args, kwargs):
        """Per-row adapters on the composed form (PEFT refuses them there): the module called once for the base rows
        and once per adapter the batch uses, with W + s B A in the Parameter's place, each row of every output
        taken from its adapter's call. Rows: dim 0 of the first tensor argument, in equal runs, one per name
        (``mixed_batch``'s, one per sequence: the batch, its k-fold expansion, or its tokens flattened) or per entry of
        ``adapter_ids`` (indices in ``adapter_names``, -1 the base; read on the host). Outputs: tensors with those rows
        (tuples and lists of them too)."""
        what = f"LoRA on {type(base).__name__}.{[m.parameter_name for m in chain]}"
        merged = [m.parameter_name for m in chain if m.merged]
        if merged:
            raise RuntimeError(f"{what}: adapters cannot route rows on a merged layer ({merged} merged): call "
                               "unmerge() first")
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.dim() == 0:
            raise ValueError(f"{what}: per-row adapters (adapter_ids / mixed_batch / adapter_names) need a tensor "
                             "argument whose dim 0 holds the rows")
        if routing is not None:
            names = list(routing[0][0])
        else:
            if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dim() != 1 or adapter_ids.is_floating_point():
                raise TypeError(f"adapter_ids must be a 1-D integer tensor, got {type(adapter_ids).__name__}"
                                f"{'' if not isinstance(adapter_ids, torch.Tensor) else f' of {adapter_ids.dtype}'}")
            ids = adapter_ids.tolist()
            if any(i < -1 or i >= len(self._specs) for i in ids):
                raise ValueError(f"adapter_ids must lie in [-1, {len(self._specs) - 1}] (this layer's adapters "
                                 f"{self.adapter_names}), got {min(ids)}..{max(ids)}")
            names = [None if i < 0 else self.adapter_names[i] for i in ids]
        n_rows = x.shape[0]
        if not names or n_rows % len(names):
            raise ValueError(f"{what}: {len(names)} {'adapter_names' if routing is not None else 'adapter_ids'} do "
                             f"not split its input's {n_rows} rows (dim 0 of shape {tuple(x.shape)}) into equal runs")
        per = n_rows // len(names)

        def call(adapter):
            weights = {m.parameter_name: m.weight + m._delta(adapter, m.weight.dtype) for m in chain
                       if adapter in m._specs}
            return torch.func.functional_call(base, weights, args, kwargs) if weights else base(*args, **kwargs)
        out = call(None)
        for adapter in dict.fromkeys(n for n in names if n is not None and any(n in m._specs for m in chain)):
            rows = torch.tensor([n == adapter for n in names], device=x.device).repeat_interleave(per)
            out = _take_rows(out, call(adapter), rows, what)
        return out

    def _experts_forward(self, chain: list, experts: nn.Module, hidden_states, top_k_index, top_k_weights,
                         adapter_ids=None) -> torch.Tensor:
        """``forward`` on a transformers experts module, by ``fastpeft.lora_experts``."""
        routing = _call_routing(self, adapter_ids)
        if adapter_ids is None and routing is None:
            adapters = {m.parameter_name: [m._factors(m._active)] for m in chain
                        if m._active is not None and not m.merged}
            if not adapters:
                return experts(hidden_states, top_k_index, top_k_weights)
            return lora_experts(experts, hidden_states, top_k_index, top_k_weights, adapters, check_ids=False,
                                form=_traced_form(hidden_states, experts, adapters))
        merged = [m.parameter_name for m in chain if m.merged]
        if merged:
            raise RuntimeError(f"adapter_ids cannot route rows on a merged layer ({merged} merged): call unmerge() "
                               "first")
        check_tensor(hidden_states, "hidden_states", 2)
        n_tok = hidden_states.shape[0]
        if routing is not None:
            names, k = routing[0][0], routing[1]
            used = [n for n in dict.fromkeys(names) if any(n in m._specs for m in chain)]
            index = {n: j for j, n in enumerate(used)}
            ids = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64, device=hidden_states.device)
            if n_tok % (len(names) * k):  # (the (batch, seq) tokens flattened: a multiple of the sequences)
                raise ValueError(f"mixed_batch was given {len(names)} adapter_names (one per sequence"
                                 f"{f', {k} rows each' if k > 1 else ''}), but the experts' input has {n_tok} tokens "
                                 f"(batch x sequence, flattened), not a multiple of {len(names) * k}")
        else:
            used, ids = self.adapter_names, adapter_ids
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
                raise TypeError(f"adapter_ids must be a 1-D integer tensor, got "
                                f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}"
                                f"{'' if not isinstance(ids, torch.Tensor) else f' of shape {tuple(ids.shape)}'}")
            if ids.device != hidden_states.device:
                raise ValueError(f"adapter_ids is on {ids.device}, hidden_states on {hidden_states.device}")
            if ids.numel() == 0 or n_tok % ids.numel():
                raise ValueError(f"adapter_ids has {ids.numel()} entries, which do not split the experts' {n_tok} "
                                 "tokens into equal runs")
        ids = ids.repeat_interleave(n_tok // ids.numel())
        if routing is None and ids.device.type == "cpu" and not tracing_or_transformed():
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(used)):
                raise ValueError(f"adapter_ids must lie in [-1, {len(used) - 1}] (this layer's adapters {used}), got "
                                 f"{int(ids.min())}..{int(ids.max())}")
            present = set(ids.unique().tolist())
            used_now = {n for j, n in enumerate(used) if j in present}
        else:
            used_now = set(used) if routing is not None else None

        def term(m, n):
            if n not in m._specs:
                return None
            a, b, s = m._factors(n)
            return (a, b, s) if used_now is None or n in used_now else (a.detach(), b.detach(), s)
        if not used:  # (every row runs the base: the experts module's own call)
            return experts(hidden_states, top_k_index, top_k_weights)
        adapters = {m.parameter_name: [term(m, n) for n in used] for m in chain}
        return lora_experts(experts, hidden_states, top_k_index, top_k_weights, adapters, check_ids=False,
                            adapter_ids=ids, form=_traced_form(hidden_states, experts, adapters))


def _take_rows(out, new, rows: torch.Tensor, what: str):
    """``out`` with the rows ``rows`` (a bool (n,) tensor) of every tensor taken from ``new`` (tuples and lists
    alike); raises for a tensor without those n rows in dim 0."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != rows.shape[0]:
            raise ValueError(f"{what}: per-row adapters need every output to hold the input's {rows.shape[0]} rows in "
                             f"dim 0, got an output of shape {tuple(out.shape)}; use set_adapter")
        return torch.where(rows.view(-1, *[1] * (out.dim() - 1)), new, out)
    if isinstance(out, (tuple, list)) and type(out) in (tuple, list):
        return type(out)(_take_rows(o, n, rows, what) for o, n in zip(out, new))
    return out


def _traced_form(x: torch.Tensor, experts: nn.Module, adapters: dict):
    """``lora_experts``' form for a ``FastLoRAParameter`` call: while torch.compile traces, grouped_mm where it runs
    (no host sync) and inductor lowers it (bf16), else the loop (a graph break at its host sync); eagerly its own
    pick."""
    if not torch.compiler.is_compiling():
        return None
    weights = [getattr(experts, up_projection(experts)), experts.down_proj]
    factors = [f for terms in adapters.values() for f in terms if f is not None]
    ok = grouped_mm_refusal(x, weights, factors) is None and weights[0].dtype == x.dtype == torch.bfloat16
    return "grouped_mm" if ok else "loop"


# ---- quantized bases (QLoRA) -------------------------------------------------------------------------

def _global_forward_hooks() -> bool:
    """Whether global nn.Module forward hooks are registered (they may hold a layer's output)."""
    return bool(nn.modules.module._global_forward_hooks)


class QLoRALinear(FastLoRALinear):
    """``FastLoRALinear`` over a bitsandbytes ``Linear4bit`` (NF4 / FP4) or ``Linear8bitLt`` base, as PEFT's
    ``lora.bnb`` layers: the bnb module is held as it is in ``base_layer`` (frozen, its packed weight read in place
    by ``fastpeft.quant.QuantizedWeight``, a view kept while bnb's tensors stay the same, nothing dequantized
    kept); ``weight`` / ``bias`` are its. Adapters are fp32 Parameters, cast to the layer's compute dtype per call
    (without gradients the cast copies are kept while the Parameters are unchanged); forward is ``qlora_linear``.
    Many adapters per batch dequantize W afresh for the call and run ``lora_linear_multi`` on it. A DoRA adapter
    (QDoRA) dequantizes W for the call and runs ``dora_linear`` on it (magnitudes fp32, from the dequantized W's row
    norms). RoSA (a sparse delta) needs a floating-point weight and is refused. ``merge`` / ``unmerge`` requantize
    (lossy, warned, as PEFT); ``to_linear`` gives a plain floating-point ``nn.Linear``.
    """

    @classmethod
    def from_quantized(cls, layer: nn.Module, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                       init_lora_weights=True, adapter_name="default", sparse_density=0.0, sparse_block_size=1,
                       sparse_selection="random", use_dora=False) -> "QLoRALinear":
        """Wrap the bitsandbytes layer ``layer`` (not copied, its weight never re-wrapped)."""
        if base_kind(layer) == "linear":
            raise TypeError(f"QLoRALinear wraps a bitsandbytes Linear4bit / Linear8bitLt, got {type(layer).__name__}")
        QuantizedWeight.from_module(layer)  # a weight not quantized yet / in bnb's CPU layout: refused here
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_layer = layer
        for p in layer.parameters():  # the packed weight already has requires_grad False (and cannot have True)
            if p.is_floating_point():
                p.requires_grad_(False)
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.merged = False
        self._setup_adapters(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             sparse_density, sparse_block_size, sparse_selection, use_dora)
        guard_repacked_layers(layer, skip=[layer])  # (state_dict unpacks first; the serving calls keep the scales)
        return self

    def _setup_adapters(self, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                        sparse_density, sparse_block_size, sparse_selection, use_dora=False):
        _spec(r, lora_alpha, lora_dropout, use_rslora)
        check_init(init_lora_weights)
        check_adapter_name(adapter_name)
        self.lora_A_adapters = nn.ParameterDict()
        self.lora_B_adapters = nn.ParameterDict()
        self.sparse_deltas = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA (QDoRA): fp32 magnitudes (out,)
        self.lora_bias_adapters = nn.ParameterDict()  # (lora_bias is refused on a quantized base)
        self._wsq = self._dora_norm = None
        self._specs: dict = {}
        self._active = None
        self._stacks = None
        self._meta = None
        self._routing = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, sparse_density,
                         sparse_block_size, sparse_selection, use_dora=use_dora)
        self.set_adapter(adapter_name)

    weight = property(lambda self: self.base_layer.weight, doc="bnb's packed weight (Params4bit / Int8Params).")
    bias = property(lambda self: self.base_layer.bias, doc="The bnb layer's bias (out,) or None.")

    _qw = None     # (objects, state, QuantizedWeight): the view quantized_weight keeps
    _casts = None  # (params, state, (A, B, bias) in the compute dtype): what _compute_copies keeps

    def quantized_weight(self) -> QuantizedWeight:
        """The base weight read in place, kept while bnb's objects stay the same (``fastpeft.quant.
        kept_quantized_weight``: the weight Parameter's identity, storage, version, its quant_state or int8
        CB / SCB, the compute dtype); rebuilt when one changes, and per call while torch.compile traces."""
        qw, kept = kept_quantized_weight(self._modules["base_layer"], self._qw)
        if kept is not self._qw:
            self._qw = kept
        return qw

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .cpu() swap the tensors' data: the kept view would hold the old memory (the packed
        # weight's, on the device it left) until the next call (the casts: TunerLayer._apply)
        self._qw = None
        return super()._apply(fn, *args, **kwargs)

    def _stack_dtype(self, adapters: torch.dtype) -> torch.dtype:
        return adapters  # the adapters' own (fp32): the forward casts the stacks to the compute dtype of the call

    def _compute_copies(self, cdt: torch.dtype, a, b) -> tuple:
        """``(lora_A, lora_B, bias)`` for a call computing in ``cdt`` (fp32 adapters on a bf16 layer: cast, the casts
        kept between no-grad calls, ``ops.common.cast_params``)."""
        layer = self._modules["base_layer"]
        bias = layer._parameters["bias"] if "bias" in layer._parameters else layer.bias
        return cast_params((a, b, bias), cdt, self._kept(), "_casts")

    def _adapter_kwargs(self) -> dict:
        return dict(device=self.weight.device, dtype=torch.float32)  # fp32 adapters, as PEFT's QLoRA

    def add_adapter(self, name, r, lora_alpha, lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
                    sparse_density=0.0, sparse_block_size=1, sparse_selection="random", sparse_scores=None,
                    use_dora=False):
        check_dora_options(use_dora, sparse_density)
        if rosa_spec(sparse_density, sparse_block_size, sparse_selection) is not None:
            raise ValueError(f"adapter {name!r}: a sparse delta (RoSA, sparse_density={sparse_density}) needs a "
                             f"floating-point base weight, and this layer's is a bitsandbytes "
                             f"{type(self.base_layer).__name__}; use sparse_density=0 (LoRA alone) on a quantized "
                             "model")
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, use_dora=use_dora)

    @torch.no_grad()
    def _dense(self) -> torch.Tensor:
        """deq(W) (out, in) in bitsandbytes' own dequantized dtype (the layer's: bf16 on a bf16 model), then fp32, a
        fresh tensor: the values PEFT's DoRA reads (its magnitude init and merge dequantize so)."""
        return dequantize_weight(self.quantized_weight()).float()

    def _peft_dtype(self) -> torch.dtype | None:
        """The half compute dtype of a 4-bit base (bf16 / fp16), to which PEFT moves new adapters (their values then
        rounded to it, and made fp32 again by autocast_adapter_dtype); None otherwise."""
        dt = getattr(self.base_layer, "compute_dtype", None)
        return dt if dt in (torch.float16, torch.bfloat16) else None

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True, adapter_name: str | None = None,
                              _fresh: bool = False) -> None:
        """``FastLoRALinear.reset_lora_parameters``; a new adapter's factors rounded through a half compute dtype, as
        PEFT's come out on such a base (so that a seed gives PEFT's factors there too)."""
        super().reset_lora_parameters(init_lora_weights, adapter_name, _fresh)
        dt = self._peft_dtype()
        if _fresh and dt is not None:
            for p in self.adapter_parameters(self._active if adapter_name is None else adapter_name):
                p.copy_(p.to(dt))

    def _add_magnitude(self, name: str, trains: bool) -> None:
        """QDoRA: m = ‖deq(W) + sBA‖_row, an fp32 Parameter, computed as PEFT's DoRA on a bitsandbytes layer does: in
        fp32, or in a half compute dtype where PEFT's adapters are in it at that point."""
        dt = self._peft_dtype()
        if dt is None:
            m = torch.linalg.vector_norm(self._dense() + self.delta_weight(name, dora=False), dim=1)
        else:
            a, b = (p.detach().to(dt) for p in self.adapter_parameters(name))
            w = dequantize_weight(self.quantized_weight()).to(dt) + self._specs[name].scaling * (b @ a)
            m = torch.linalg.norm(w, dim=1).float()
        self.lora_magnitude_vector[name] = nn.Parameter(m, requires_grad=trains)

    def _weight_sq_norm(self):
        return None  # the op computes ‖W‖² from the W dequantized for the call (no key: the workspace is shared)

    def _serves(self, x: torch.Tensor) -> bool:
        """Whether this call's base product is bnb's CPU inference kernel (``fastpeft.quant.bnb_cpu_serves``: an
        eval-mode call on the CPU, as PEFT's layer makes it); the adapters' terms are then added to its output."""
        return not self.training and bnb_cpu_serves(self._modules["base_layer"], x)

    @staticmethod
    def _bnb_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The bnb layer's own forward on its CPU inference path, its block scales kept first where this call
        repacks the weight (``fastpeft.quant.remember_quant_state``: put back exactly when it is unpacked)."""
        remember_quant_state(layer)
        return layer(x)

    def _served(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """bnb's eval-mode CPU forward of x (..., in) (bias included) plus adapter ``name``'s ``s (x Aᵀ) Bᵀ``, as
        PEFT's layer computes it there, to the last bit: ``(x Aᵀ Bᵀ) * s`` in the adapters' dtype (fp32), cast to
        the output's and added (eval: no dropout); under autocast in autocast's dtypes, as PEFT. Added in place into
        bnb's fresh output, unless hooks on the bnb layer may hold it (PEFT clones it)."""
        layer = self._modules["base_layer"]
        y = self._bnb_call(layer, x)
        a, b = self._pair(name)
        s = self._specs[name].scaling
        if torch.is_autocast_enabled(x.device.type):  # PEFT computes the term in autocast's dtype, no casts
            return y + F.linear(F.linear(x, a), b) * s
        t = torch.mm(x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.t(), b.t()).mul_(s).to(y.dtype)
        if y.is_contiguous() and not (layer._forward_hooks or _global_forward_hooks()):
            return y.view(-1, y.shape[-1]).add_(t).view(y.shape)
        return (y.reshape(-1, y.shape[-1]) + t).view(y.shape)

    def _base_forward(self, x: torch.Tensor, qw: QuantizedWeight | None = None) -> torch.Tensor:
        """x deq(W)^T + b with W dequantized for this call, or bnb's own forward where it runs its CPU inference
        kernel (``_serves``); autograd saves W only for dX (x requires grad)."""
        if qw is None and self._serves(x):
            return self._bnb_call(self._modules["base_layer"], x)
        qw = self.quantized_weight() if qw is None else qw
        cdt = qw.compute_dtype_for(x)
        b = self.bias
        w = dequantize_weight(qw, cdt, out=call_buffer(qw, cdt, saved=torch.is_grad_enabled() and x.requires_grad))
        y = F.linear(x.to(cdt), w, None if b is None else b.to(cdt))
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As ``FastLoRALinear.forward``, on the quantized base."""
        routing, adapter_ids = self._routed_ids(x, adapter_ids)
        if self.merged:
            return self._base_forward(x)
        if adapter_ids is None:
            if self._active is None:
                return self._base_forward(x)
            s = self._specs[self._active]
            if not s.use_dora and self._serves(x):  # (QDoRA's norm needs deq(W): its own path)
                return self._served(x, self._active)
            qw = self.quantized_weight()
            cdt = qw.compute_dtype_for(x)
            a, b, bias = self._compute_copies(cdt, *self._pair(self._active))
            if s.use_dora:  # QDoRA: W dequantized for the call (a fresh one where autograd keeps it), DoRA's op on it
                w = dequantize_weight(qw, cdt, out=call_buffer(qw, cdt, saved=torch.is_grad_enabled()))
                m = _entry(self._modules["lora_magnitude_vector"], self._active)
                return dora_linear(x.to(cdt), w, bias, a, b, m, s.scaling, s.lora_dropout, self.training,
                                   norm_cache=None).to(x.dtype)
            return qlora_linear(x, qw, bias, a, b, s.scaling, s.lora_dropout, self.training)
        self._refuse_routed_variants(routing)
        if routing is not None:
            adapter_ids = _per_row(adapter_ids, routed_batch(adapter_ids.shape[0], x, routing[1]))
        ids = expand_adapter_ids(adapter_ids, x, len(self._specs), check_range=routing is None)
        if not self._specs:
            return self._base_forward(x)
        if self._serves(x) and not torch.is_autocast_enabled(x.device.type):  # eval on the CPU: bnb's kernel for
            stack_a, stack_b = self._forward_stacks(routing, ids)  # (the adapters' dtype: fp32, as PEFT's terms)
            layer = self._modules["base_layer"]  # x Wᵀ + b, each row's adapter added to it
            y = self._bnb_call(layer, x)
            y2 = y.reshape(-1, y.shape[-1])
            scalings, ranks, _ = self._adapter_meta(x.device)
            if y2.dtype != stack_a.dtype:
                acc = y2.new_zeros(y2.shape, dtype=stack_a.dtype)
            else:  # bnb's fresh output, unless hooks on the bnb layer may hold it (PEFT clones it)
                acc = y2.clone() if layer._forward_hooks or _global_forward_hooks() else y2
            acc = multi_lora_add(acc, x.reshape(-1, x.shape[-1]).to(stack_a.dtype), stack_a, stack_b, scalings,
                                 ids, ranks)
            return (acc if acc.dtype == y.dtype else y2 + acc.to(y.dtype)).view(y.shape)
        qw = self.quantized_weight()
        cdt = qw.compute_dtype_for(x)
        w = dequantize_weight(qw, cdt, out=call_buffer(qw, cdt, saved=torch.is_grad_enabled()))  # multi saves W
        b = None if self.bias is None else self.bias.to(cdt)
        scalings, ranks, dropout = self._adapter_meta(x.device)
        stack_a, stack_b = self._forward_stacks(routing, ids)
        y = lora_linear_multi(x.to(cdt), w, b, stack_a.to(cdt), stack_b.to(cdt), scalings, ids, ranks,
                              dropout_p=dropout, training=self.training, check_ids=False)
        return y.to(x.dtype)

    @torch.no_grad()
    def delta_weight(self, adapter_name: str | None = None, dora: bool = True) -> torch.Tensor:
        """``scaling * B A`` (out, in) of an adapter (default: the active one), fp32; for a DoRA adapter (``dora``)
        W' - deq(W) with W' = (m / n) ⊙ (deq(W) + sBA), n = ‖deq(W) + sBA‖_row: what merging adds to deq(W)."""
        name = self._active if adapter_name is None else adapter_name
        s = self._spec_of(name)
        delta = s.scaling * (self.lora_B_adapters[name].float() @ self.lora_A_adapters[name].float())
        return self._dora_delta(name, delta)[0] if dora and s.use_dora else delta

    def _dora_delta(self, name: str, delta: torch.Tensor) -> tuple:
        """(W' - deq(W), n) of DoRA adapter ``name`` from its ``delta`` sBA: n = ‖deq(W) + sBA‖_row, W' = (m/n) ⊙
        (deq(W) + sBA); W dequantized once."""
        w = self._dense()
        v = w + delta
        n = torch.linalg.vector_norm(v, dim=1)
        return (self.lora_magnitude_vector[name].float() / n)[:, None] * v - w, n

    @torch.no_grad()
    def merge(self) -> None:
        """PEFT's merge into a quantized layer: dequantize, add the delta (DoRA: W ← (m/n)(W + sBA), n kept),
        requantize (lossy, warned). On failure (bitsandbytes cannot quantize here) a RuntimeError and the layer as
        it was."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged")
        if not self.has_delta():
            raise RuntimeError("merge: no active adapter to merge (set_adapter first)")
        if self.is_dora():
            delta, n = self._dora_delta(self._active, self.delta_weight(dora=False))
            assign_merged_weight(self.base_layer, merged_weight(self.base_layer, delta, round_to_weight=True))
            self._dora_norm = n
        else:
            assign_merged_weight(self.base_layer, merged_weight(self.base_layer, self.delta_weight()))
        self._qw = None  # the view of the weight before: not kept alive until the next call
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again: dequantize, subtract (DoRA: W ← W' (n/m) − sBA with the n kept at merge),
        requantize (lossy: not the weight before ``merge``)."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        dora = self.is_dora()
        if dora:
            w = self._dense()
            g = self._dora_norm / self.lora_magnitude_vector[self._active].float()
            delta = g[:, None] * w - self.delta_weight(dora=False) - w
        else:
            delta = -self.delta_weight()
        assign_merged_weight(self.base_layer, merged_weight(self.base_layer, delta, round_to_weight=dora))
        self._qw = None  # the view of the weight before: not kept alive until the next call
        self._dora_norm = None
        self.merged = False

    def base_module(self) -> nn.Module:
        """The bitsandbytes layer this layer wraps, itself (its packed weight as bnb holds it)."""
        return self.base_layer

    @torch.no_grad()
    def to_linear(self, name: str = "") -> nn.Linear:
        """A new floating-point ``nn.Linear`` holding deq(W) + ΔW (and a copy of b); this layer is left untouched."""
        qw = self.quantized_weight()
        delta = self.delta_weight() if not self.merged and self.has_delta() else torch.zeros(qw.shape, device=qw.device)
        return merged_weight(self.base_layer, delta, dequantize=True, name=name)


# ---- modules_to_save ---------------------------------------------------------------------------------

class ModulesToSaveWrapper(nn.Module):
    """A frozen original module and a trainable copy per adapter; forward runs the active adapter's copy
    (the original when the active adapter has none). Inside ``fastpeft.mixed_batch`` each sequence
    (dim 0 of the first argument) runs its own adapter's copy.

    The parameters of a copy are saved with its adapter, under the original module's names.
    """

    _rows_per_sequence = 1

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

    @property
    def routing(self) -> list | None:
        """The per-sequence adapter names ``set_routing`` gave (None: no routing)."""
        return None if self._routing is None else list(self._routing)

    rows_per_sequence = property(lambda self: self._rows_per_sequence, doc="See FastLoRALinear.rows_per_sequence.")

    def set_routing(self, adapter_names: list | None, rows_per_sequence: int = 1) -> None:
        """Run sequence i (dim 0 of the first argument) of every later call through adapter
        ``adapter_names[i]``'s copy (the original for None or a name without one), on its ``rows_per_sequence``
        consecutive rows in a batch of that many times the names; None ends it."""
        self._routing = None if adapter_names is None else list(adapter_names)
        self._rows_per_sequence = rows_per_sequence

    def forward(self, *args, **kwargs):
        routing = _call_routing(self)
        if routing is None:
            return self.active_module(*args, **kwargs)
        (names, k), x, rest = routing, args[0], args[1:]
        if any(isinstance(a, torch.Tensor) for a in rest) or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            raise RuntimeError("mixed_batch routes a modules_to_save module by the first argument's batch dim "
                               "only; this call passes more tensors")
        per = routed_batch(len(names), x, k)
        names = [n for n in names for _ in range(per)]  # each sequence's rows, expanded as generate does
        outs, order = [], []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
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


class TokenRows(nn.Module):
    """One adapter's trained rows of an embedding (PEFT's trainable tokens): ``trainable_tokens_delta`` (n, dim)
    holds the new values (not differences, PEFT's name notwithstanding) of the rows ``token_indices`` (n,).

    ``forward`` is the base module's output with those tokens' entries replaced: an ``nn.Embedding`` (times its
    ``embed_scale`` where it has one, as transformers' scaled embeddings) gives row j for id ``token_indices[j]``;
    an ``nn.Linear`` output head tied to it gives column ``token_indices[j]`` from row j. Neither writes a copy of
    the (vocab, dim) weight. ``base``: the wrapped module (not registered here: the wrapper holds it)."""

    def __init__(self, base: nn.Module, token_indices: list, values: torch.Tensor | nn.Parameter):
        super().__init__()
        self.__dict__["_base"] = base
        self.trainable_tokens_delta = values if isinstance(values, nn.Parameter) else nn.Parameter(values)
        self.register_buffer("token_indices", torch.tensor(token_indices, dtype=torch.long,
                                                           device=base.weight.device), persistent=False)
        self._lut_cache = None
        # the embeddings' padding row among the trained ones (F.embedding gives it no gradient, as PEFT's does); read
        # here once, so that forward reads no tensor on the host (torch.compile(fullgraph=True))
        pad = getattr(base, "padding_idx", None)
        self._pad = list(token_indices).index(pad) if pad is not None and pad in token_indices else None

    def _lookup(self, vocab: int) -> torch.Tensor:
        """(vocab,) long: row j at id token_indices[j], -1 elsewhere; rebuilt when the indices move."""
        idx = self.token_indices
        if self._lut_cache is None or self._lut_cache.device != idx.device or self._lut_cache.numel() != vocab:
            lut = torch.full((vocab,), -1, dtype=torch.long, device=idx.device)
            lut[idx] = torch.arange(idx.numel(), device=idx.device)
            self._lut_cache = lut
        return self._lut_cache

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: ids (...) for an embedding -> (..., dim); hidden states (..., dim) for a head -> (..., vocab)."""
        base = self._base
        out = base(x, *args, **kwargs)
        rows = self.trainable_tokens_delta.to(base.weight.dtype)  # PEFT casts them to the weight's dtype too
        if isinstance(base, nn.Embedding):
            local = self._lookup(base.num_embeddings)[x]
            if getattr(base, "scale_grad_by_freq", False):
                # gradients divided by each id's count in x, as PEFT's lookup in the whole table divides them: the
                # ids outside the trained rows go to a zero row of their own, not to row 0 (which clamp would count)
                rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
                new = F.embedding(torch.where(local >= 0, local, rows.shape[0] - 1), rows, padding_idx=self._pad,
                                  scale_grad_by_freq=True)
            else:
                new = F.embedding(local.clamp(min=0), rows, padding_idx=self._pad)
            scale = getattr(base, "embed_scale", None)
            if scale is not None:
                new = new * (scale.to(new.dtype) if isinstance(scale, torch.Tensor) else scale)
            return torch.where((local >= 0).unsqueeze(-1), new.to(out.dtype), out)
        bias = None if base.bias is None else base.bias[self.token_indices]
        cols = F.linear(x, rows, bias)
        return out.index_copy(out.dim() - 1, self.token_indices, cols.to(out.dtype))


class TrainableTokensWrapper(ModulesToSaveWrapper):
    """PEFT's trainable tokens (``LoraConfig(trainable_token_indices=...)``) on an ``nn.Embedding``, or on the
    ``nn.Linear`` output head tied to it: per adapter a ``TokenRows`` in ``modules_to_save[name]`` (the routing,
    adapter switching and ``mixed_batch`` of ``ModulesToSaveWrapper``). A tied head's rows are the embedding's own
    Parameter (``tied``: not saved again, as PEFT). ``.weight`` is ``merged_weight()`` (the rows in place, as PEFT's);
    other attributes the wrapper lacks (``num_embeddings``, ``padding_idx``, ...) are the base module's."""

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list, values=None):
        nn.Module.__init__(self)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = None
        self._routing = None
        self.tied = set()  # adapters whose rows are another wrapper's Parameter
        for p in module.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, token_indices, values)
        self.set_adapter(adapter_name)

    def add_adapter(self, name: str, token_indices: list | None = None, values=None) -> None:
        """Rows for ``name`` at ``token_indices``: ``values`` (a tied layer's Parameter, kept as is), or a copy of
        the base weight's rows (PEFT's init: the outputs start unchanged)."""
        if token_indices is None:
            raise ValueError("TrainableTokensWrapper.add_adapter needs the adapter's token_indices")
        if values is None:
            w = self.original_module.weight
            values = w.detach()[torch.tensor(token_indices, dtype=torch.long, device=w.device)].clone()
        self.modules_to_save[name] = TokenRows(self.original_module, token_indices, values)
        (self.tied.add if isinstance(values, nn.Parameter) else self.tied.discard)(name)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s rows (a tied head's copy of them: the reference only)."""
        super().delete_adapter(name)
        self.tied.discard(name)

    def rows(self, name: str) -> TokenRows | None:
        """Adapter ``name``'s ``TokenRows`` (``.trainable_tokens_delta`` (n, dim), ``.token_indices`` (n,)), or
        None where it trains no tokens here."""
        return self.modules_to_save[name] if name in self.modules_to_save else None

    def unwrap(self, own_weight: bool = False) -> nn.Module:
        """The base module with the active adapter's rows written into its weight (``own_weight``: into a copy,
        leaving a weight shared with other modules as it was); what ``merge_and_unload`` puts back."""
        module, rows = self.original_module, self.rows(self.active_adapter)
        if rows is None:
            return module
        with torch.no_grad():
            if own_weight:
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
            w = module.weight
            w.index_copy_(0, rows.token_indices.to(w.device), rows.trainable_tokens_delta.detach().to(w.dtype))
        return module

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapter's rows in place (vocab, dim): a differentiable copy (gradients reach
        the rows), or the base weight itself without rows. What ``.weight`` gives, as PEFT's wrapper: code that reads
        ``get_output_embeddings().weight`` for its own product (TRL's fused LM-head loss, Liger's) then trains the
        rows too (before 2026-12-01 it read the base weight, and SFTTrainer silently ignored a tied head's rows)."""
        base = self.original_module.weight
        rows = self.rows(self.active_adapter)
        if rows is None:
            return base
        return base.index_copy(0, rows.token_indices.to(base.device), rows.trainable_tokens_delta.to(base.dtype))

    def __getattr__(self, name):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ("modules_to_save", "original_module"):
                raise
            if name == "weight":
                return self.merged_weight()
            return getattr(self.original_module, name)
