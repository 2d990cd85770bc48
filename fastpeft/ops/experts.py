"""LoRA on a mixture of experts' expert weights (PEFT's ``target_parameters``): the grouped forms.

``fastpeft.functional.lora_experts`` sorts a batch's (token, expert) pairs by expert and runs each projection of
the experts module as a grouped linear layer with LoRA (``project``), in one of two forms:

- ``"loop"``: ``fastpeft.reference.lora_grouped_linear_ref``, a pair of products per expert with rows, one host
  sync for the group sizes.
- ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` for the base and for both LoRA products (three grouped
  launches a projection, offsets on the device: no host sync, so a CUDA graph can capture it and torch.compile
  trace it, for bf16: inductor lowers grouped_mm for that dtype only).

``pick_form``: grouped_mm only where its kernels take every operand (torch >= 2.10; one float dtype, bf16 on
CUDA with sm_80+; every row length a multiple of 16 bytes; bf16 while torch.compile traces). On CUDA then (never
timed there yet). On the CPU
grouped_mm up to 32 rows per expert, the loop beyond. Measured on 2 threads, fp32, 64 experts, top-4, H 1024,
I 512, r 16, forward / forward + backward ms: 16 tokens (1 row per expert) grouped_mm 24 / 48 against the
loop's 25 / 55; 256 tokens (16 rows) 50 / 109 against 61 / 139; 2048 tokens (128 rows) 382 / 761 against
247 / 680 (the grouped kernel is slow on the rank-16 products of large groups).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import lora_grouped_linear_ref

FORMS = ("loop", "grouped_mm")


def grouped_mm_refusal(x: torch.Tensor, weights: list, factors: list) -> str | None:
    """Why ``F.grouped_mm`` cannot run a ``lora_experts`` call on x (None: it can): it needs torch >= 2.10, every
    operand in one float dtype it has a kernel for (on CUDA bf16, sm_80+), strides of 16 bytes (every row length:
    in, out and each rank) and 16-byte aligned data."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (torch >= 2.10)"
    if x.device.type not in ("cpu", "cuda"):
        return f"no grouped_mm kernel on {x.device.type}"
    dt = weights[0].dtype
    if any(t.dtype != dt for t in weights) or dt not in _GROUPED_MM_DTYPES:
        return (f"expert weights of dtype {sorted({str(t.dtype) for t in weights})}: grouped_mm takes "
                f"{_GROUPED_MM_DTYPES}")
    if x.device.type == "cuda" and (dt != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return "grouped_mm on CUDA takes bf16 expert weights on sm_80+"
    size = torch.finfo(dt).bits // 8
    dims = [d for w in weights for d in w.shape[1:]] + [a.shape[1] for a, _, _ in factors]
    # (data pointers are not read while torch.compile traces: Parameters come 16-byte aligned from the allocator)
    if any(d * size % 16 for d in dims) or (not torch.compiler.is_compiling()
                                            and any(t.data_ptr() % 16 for t in weights)):
        return (f"a row length not a multiple of 16 bytes (in / out / ranks {sorted(set(dims))} of {dt}) or expert "
                "weights not 16-byte aligned")
    return None


def pick_form(x: torch.Tensor, weights: list, factors: list, rows: int, n_exp: int) -> str:
    """The form of a ``lora_experts`` call on x (its ``rows`` (token, expert) pairs over ``n_exp`` experts): see the
    module's docstring."""
    if grouped_mm_refusal(x, weights, factors) is not None:
        return "loop"
    if torch.compiler.is_compiling() and weights[0].dtype != torch.bfloat16:
        return "loop"  # (traced, grouped_mm lowers for bf16 only: fp32 failed at trace time on the CPU)
    return "grouped_mm" if x.device.type == "cuda" or rows <= 32 * n_exp else "loop"


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def peft_expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, n_exp: int) -> tuple:
    """``(A (E, r, in), B (E, out, r))``, views of PEFT's ``ParamWrapper`` factors for ``n_exp`` experts: ``lora_a``
    (r E, in) holds expert e's rows at e r .. e r + r - 1, ``lora_b`` (out, r E) expert e's column j at j E + e
    (PEFT's ``get_delta_factors``)."""
    return (lora_a.view(n_exp, -1, lora_a.shape[-1]),
            lora_b.view(lora_b.shape[0], -1, n_exp).permute(2, 0, 1))


def _grouped_mm_linear(x, weight, bias, offsets, ids, factors, transposed: bool, masks) -> torch.Tensor:
    """``lora_grouped_linear_ref``'s result with ``F.grouped_mm``: ``offsets`` (E,) int32 the groups' end rows,
    ``ids`` (S,) each row's group (for the bias), ``masks`` one (S,) 0/1 tensor or None per factor."""
    dt = weight.dtype
    y = F.grouped_mm(x.to(dt), weight if transposed else weight.transpose(1, 2), offs=offsets)
    if bias is not None:
        y = y + bias.index_select(0, ids)
    for (a, b, s), m in zip(factors, masks):
        # (E, in, r) and (E, r, out): B's view from PEFT's layout has no unit stride in its last two dims, which
        # grouped_mm needs: a contiguous (E, out, r) copy (the adapter's size, not W's)
        a = a.to(dt) if not torch.compiler.is_compiling() else _dense_copy(a, dt)  # (A's view: (E, in, r) unit-stride)
        u = F.grouped_mm(x.to(dt), a.transpose(1, 2), offs=offsets)
        if m is not None:
            u = u * m.to(dt).unsqueeze(1)
        y = y + s * F.grouped_mm(u, _dense_copy(b, dt).transpose(1, 2), offs=offsets)
    return y


def _dense_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``, row-major (what grouped_mm needs of B's and A's stacks, whose views of PEFT's layout it
    refuses). Eagerly a copy only where needed; while torch.compile traces, ``fastpeft::dense_copy``, an op whose
    output layout inductor cannot choose (it laid a traced ``.contiguous()`` or ``empty().copy_()`` out as the
    permuted view it copied, with frozen factors, and grouped_mm's kernel refused the strides)."""
    if not torch.compiler.is_compiling():
        return t.to(dtype).contiguous()
    return torch.ops.fastpeft.dense_copy(t, dtype)


@torch.library.custom_op("fastpeft::dense_copy", mutates_args=())
def _dense_copy_op(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).clone(memory_format=torch.contiguous_format)


@_dense_copy_op.register_fake
def _(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def _dense_copy_backward(ctx, grad):
    return grad.to(ctx.dtype), None


def _dense_copy_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype


_dense_copy_op.register_autograd(_dense_copy_backward, setup_context=_dense_copy_setup)


class Groups:
    """A batch's rows sorted by expert, as both forms read them: ``perm`` (S,) the sorted order of the flattened
    (token, slot) pairs, ``ids`` (S,) their experts, and ``sizes`` (the loop's group sizes, host ints) or
    ``offsets`` (grouped_mm's group ends, on the device)."""

    def __init__(self, top_k_index: torch.Tensor, n_exp: int, form: str, check_ids: bool):
        flat = top_k_index.reshape(-1)
        self.ids, self.perm = torch.sort(flat, stable=True)
        self.form = form
        ends = torch.searchsorted(self.ids, torch.arange(n_exp + 1, device=flat.device, dtype=flat.dtype))
        self.sizes = self.offsets = None
        if form == "loop" or check_ids:
            bounds = ends.tolist()  # the one host sync
            if bounds[0] != 0 or bounds[-1] != flat.numel():
                raise ValueError(f"top_k_index must hold expert ids in [0, {n_exp}), got values outside it")
            self.sizes = [bounds[e + 1] - bounds[e] for e in range(n_exp)]
        if form == "grouped_mm":
            self.offsets = ends[1:].to(torch.int32)

    def project(self, x, weight, bias, factors, transposed: bool, masks=None) -> torch.Tensor:
        """One projection of the experts (rows of x in sorted order): ``x W_eᵀ + b_e + Σ s (x A_eᵀ) B_eᵀ``; ``masks``:
        None or one (S,) 0/1 tensor (or None) per factor, the sorted rows its term reaches."""
        masks = [None] * len(factors) if masks is None else masks
        if self.form == "grouped_mm":
            return _grouped_mm_linear(x, weight, bias, self.offsets, self.ids, factors, transposed, masks)
        # in the experts' dtype, autocast or not, as the grouped_mm form (and transformers' grouped_mm) computes:
        # the same precision whatever the number of rows picks
        with torch.autocast(x.device.type, enabled=False):
            return lora_grouped_linear_ref(x.to(weight.dtype), weight, bias, self.sizes, [f[0] for f in factors],
                                           [f[1] for f in factors], [f[2] for f in factors], transposed=transposed,
                                           row_masks=masks)
