"""Sparse deltas in plain torch: the reference backend's path for CPU tensors, and the torch side of the triton
backend's floor.

``y = x (W + Δ)^T + b`` (and RoSA: ``+ s (drop(x) A^T) B^T``) with Δ sparse: ``nnz`` flat entries (block_size 1)
or ``nblocks`` b x b blocks of W (out, in), as in ``fastpeft.sparse_delta_linear``.

- :func:`w_plus_delta_torch` (W + Δ by clone + scatter, the PEFT-SHiRA / RoSA way) and :func:`sddmm_torch`
  (the values' gradient, dY^T X on Δ's support, never an (out, in) gradient) are the torch composition that
  ``fastpeft.ops.sparse`` times against its kernels on a GPU.
- :class:`SparseDeltaLinearCPUFunction` and :class:`LoRASparseLinearCPUFunction` run that composition on the
  CPU (``fastpeft.functional`` routes the reference backend's CPU calls here, as LoRA's to ``ops.lora_cpu``).
  ``fastpeft.reference``'s ``sparse_delta_linear_ref`` (a dense Δ added to W under torch autograd, which saves
  W + Δ and forms the dense (out, in) gradient) stays the oracle, run under ``kernel_stream_on_cpu()``.
  At decode sizes (few rows times few entries) Δ's part goes by gathers instead: ``y += x[:, cols] v`` added
  into its rows, with no W-sized copy (:func:`_gathers_win`).
- :class:`CPUPlan`: what is derived from the indices (rows, columns, flat positions), kept by a layer for its
  indices (``layers._SparsePlanCache``), derived per call by the functional API without one.
- Under ``torch.func`` transforms the reference backend runs plain autograd compositions instead
  (``reference.use_cpu_path``; with dropout, the same CPU stream): these Functions define no ``setup_context`` /
  vmap rule.

This module imports only torch (no triton): the CPU path runs where triton is absent.
"""
from __future__ import annotations

import torch

from ..quant import workspace
from .common import autocast_inputs, base_grads, returned
from .lora_cpu import _backward as _lora_backward
from .lora_cpu import _forward as _lora_forward
from .lora_cpu import recorded_u


# ----------------------------------------------------------------------------------------------------
# the torch composition (also the triton backend's floor, fastpeft.ops.sparse)
# ----------------------------------------------------------------------------------------------------


def _block_rows_cols(indices, out_features: int, in_features: int, b: int):
    """``(rows, cols, inside)`` of b x b blocks: each block's rows and columns of W, (nblocks, b) int64,
    clamped into W; ``inside`` (nblocks, b, b) bool marks the positions inside W, None when all are (the
    blocks tile W exactly)."""
    ar = torch.arange(b, device=indices.device)
    rows = indices[:, :1].long() * b + ar
    cols = indices[:, 1:2].long() * b + ar
    if out_features % b == 0 and in_features % b == 0:
        return rows, cols, None
    inside = (rows < out_features)[:, :, None] & (cols < in_features)[:, None, :]
    return rows.clamp(max=out_features - 1), cols.clamp(max=in_features - 1), inside


def _entries(indices, out_features: int, in_features: int, block_size: int):
    """``(flat, inside)``: the row-major position in W (out, in) of every value of Δ, int64 in the shape of
    the values, and ``inside`` as in :func:`_block_rows_cols` (None for flat entries)."""
    if block_size == 1:
        return indices.long(), None
    rows, cols, inside = _block_rows_cols(indices, out_features, in_features, block_size)
    return rows[:, :, None] * in_features + cols[:, None, :], inside


def w_plus_delta_torch(weight, indices, values, block_size: int, dtype, buf=None, plan=None):
    """W + Δ in ``dtype`` as a contiguous (out, in) tensor, in plain torch (the clone + scatter of
    PEFT-SHiRA / RoSA): W copied, its entries on Δ's support gathered, added to the values in fp32 (fp64 for
    fp64) and rounded once, scattered back: the same numbers as the kernels' densify. A transient W-sized buffer,
    as there: a new one, or the first elements of ``buf`` (flat, ``dtype``, W's elements and the spare one
    ``plan.scatter()`` counts). ``plan``:
    the indices' ``CPUPlan`` (its scatter positions kept), or None (derived here)."""
    out_f, in_f = weight.shape
    numel = out_f * in_f
    # Clipped blocks: their positions outside W are written to one spare element after W, never read.
    flat, dst, spare = (plan or CPUPlan(indices, out_f, in_f, block_size)).scatter()
    if buf is None:
        buf = torch.empty(numel + spare, device=weight.device, dtype=dtype)
    else:
        buf = buf[:numel + spare]
    w2 = buf[:numel].view(out_f, in_f)
    w2.copy_(weight)
    if indices.shape[0] == 0:
        return w2
    acc = torch.promote_types(dtype, torch.float32)  # fp32 (the kernels' densify), fp64 for fp64 (the CPU path)
    if dtype == acc and weight.dtype == dtype and weight.device.type == "cpu":
        # One pass (fp32 / fp64 on the CPU): unique positions, so each is w + v rounded once in dtype, the same
        # numbers as the gather, add and scatter below, which read W's entries twice more (~2.5x slower at M = 1).
        # Not on CUDA: index_add_ there is atomic adds, refused by deterministic mode.
        buf.index_add_(0, dst, values.reshape(-1).to(dtype))
        return w2
    new = (weight.reshape(-1)[flat].to(acc) + values.reshape(flat.shape).to(acc)).to(dtype)
    buf.index_put_((dst,), new.reshape(-1))
    return w2


def _scatter_positions(indices, out_features: int, in_features: int, block_size: int) -> tuple:
    """``(flat, dst, spare)`` of ``w_plus_delta_torch``: each value's row-major position in W (int64, the values'
    shape, clamped into W), where its sum is written (flat, (nvalues,): the spare element past W for positions
    outside it) and whether any is (1 spare element, else 0)."""
    flat, inside = _entries(indices, out_features, in_features, block_size)
    if inside is None:
        return flat, flat.reshape(-1), 0
    return flat, torch.where(inside, flat, out_features * in_features).reshape(-1), 1


# Row panels of dY^T X (block_size 1) hold at most this many bytes, and at most half of W's rows: the
# transient stays bounded and no (out, in) gradient is formed. Panels of >= 1k rows keep the cuBLAS GEMM
# (over M = 8192) at full rate; a cost model, not measured on a card.
_PANEL_BYTES = 64 << 20


def sddmm_torch(dy, x, indices, values, block_size: int):
    """dvalues = (dY^T X) on Δ's support, in values' dtype and shape, by cuBLAS matmuls in dY's dtype (what
    torch autograd computes for the clone + scatter forward). dy (M, out), x (M, in).

    - blocks: each block's b x b gradient dY[:, rows]^T X[:, cols] by one batched GEMM over the gathered
      column panels of dY and X (2 M nnz flops); blocks go in chunks whose gathered panels hold at most
      W's element count. Values outside W (clipped blocks) get 0.
    - flat entries: dY^T X by row panels (one GEMM each, ``_PANEL_BYTES``), each entry gathered from its
      panel (2 M out in flops whatever the density). Scattered entries leave cuBLAS nothing narrower to
      multiply: gathering each entry's two columns of length M instead moves 2 M nnz elements, which costs
      more than the GEMM above about 0.3% density on an H200 (peak rates; not measured). The kernels'
      gather-dot covers the lower densities.
    """
    m, out_f = dy.shape
    in_f = x.shape[1]
    nnz = indices.shape[0]
    if nnz == 0 or m == 0:
        return values.new_zeros(values.shape)
    if block_size > 1:
        b = block_size
        rows, cols, inside = _block_rows_cols(indices, out_f, in_f, b)
        chunk = max(1, (out_f * in_f) // (2 * m * b))
        parts = []
        for j in range(0, nnz, chunk):
            g = dy.index_select(1, rows[j:j + chunk].reshape(-1)).view(m, -1, b)   # (M, c, b)
            h = x.index_select(1, cols[j:j + chunk].reshape(-1)).view(m, -1, b)
            parts.append(torch.bmm(g.permute(1, 2, 0), h.permute(1, 0, 2)))      # (c, b, b)
        dv = parts[0] if len(parts) == 1 else torch.cat(parts)
        if inside is not None:
            dv = dv.masked_fill(~inside, 0)
        return dv.to(values.dtype)
    flat = indices.long()
    panel_rows = max(1, min(-(-out_f // 2), _PANEL_BYTES // max(1, in_f * dy.element_size())))
    dv = values.new_zeros(values.shape)
    for r0 in range(0, out_f, panel_rows):
        r1 = min(out_f, r0 + panel_rows)
        panel = dy[:, r0:r1].t() @ x                                          # (r1 - r0, in)
        local = flat - r0 * in_f
        mine = (local >= 0) & (local < panel.numel())
        got = panel.reshape(-1)[local.clamp(0, panel.numel() - 1)]
        dv = torch.where(mine, got.to(dv.dtype), dv)
    return dv




# ----------------------------------------------------------------------------------------------------
# decode sizes: Δ's part by gathers, no W-sized copy
# ----------------------------------------------------------------------------------------------------


class CPUPlan:
    """What the CPU path derives from one set of indices, each part computed at its first use and then kept: the
    values' rows and columns in W (``positions``: gathers, the values' gradient) and their flat positions
    (``scatter``: ``w_plus_delta_torch``). A layer holds one for its indices (``layers._SparsePlanCache``, rebuilt
    when their data pointer, version or shape changes, as the triton plan is); a call without one derives what
    it uses (for 10k entries the rows and columns by int64 division cost ~27 µs, more than the gathers at M = 1).
    """

    def __init__(self, indices, out_features: int, in_features: int, block_size: int):
        self.indices, self.out_features, self.in_features, self.block_size = (indices, out_features, in_features,
                                                                               block_size)
        self._positions = self._scatter = None

    def check(self, indices, out_features: int, in_features: int, block_size: int) -> None:
        """Raise unless this plan was built for indices of this shape, W of these sizes and this block size."""
        want = (tuple(indices.shape), out_features, in_features, block_size)
        got = (tuple(self.indices.shape), self.out_features, self.in_features, self.block_size)
        if got != want:
            raise ValueError(f"plan was built for indices {got[0]}, W {got[1]} x {got[2]}, block_size {got[3]}; "
                             f"this call has indices {want[0]}, W {want[1]} x {want[2]}, block_size {want[3]}")

    def positions(self) -> tuple:
        """``(rows, cols, inside)`` of every value's position in W (flat int64; ``inside`` (nvalues,) bool, None when
        all are inside: clipped edge blocks)."""
        if self._positions is not None:
            return self._positions
        n, k, b = self.out_features, self.in_features, self.block_size
        if b == 1:
            flat = self.indices.long()
            rows = torch.div(flat, k, rounding_mode="floor")
            out = (rows, flat - rows * k, None)
        else:
            rows, cols, inside = _block_rows_cols(self.indices, n, k, b)
            out = (rows[:, :, None].expand(-1, b, b).reshape(-1), cols[:, None, :].expand(-1, b, b).reshape(-1),
                   None if inside is None else inside.reshape(-1))
        if _keepable():
            self._positions = out
        return out

    def scatter(self) -> tuple:
        """``_scatter_positions`` of the indices."""
        if self._scatter is not None:
            return self._scatter
        out = _scatter_positions(self.indices, self.out_features, self.in_features, self.block_size)
        if _keepable():
            self._scatter = out
        return out


def _keepable() -> bool:
    """Whether what a plan derives now may be kept: not while torch.compile traces (no side effect in a graph: it
    is recomputed there) nor under inference mode (inference tensors, which a later call that autograd records
    could not save)."""
    return not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()


def _positions(plan: CPUPlan, values) -> tuple:
    """``(rows, cols, vals)``: each value of Δ with its row and column of W, flat (int64, int64, values' dtype).
    Block positions outside W (clipped edge blocks) are clamped into W with the value 0: they add nothing."""
    rows, cols, inside = plan.positions()
    vals = values.reshape(-1)
    return rows, cols, vals if inside is None else vals.masked_fill(~inside, 0)


def _add_delta_rows(out, a, src, dst, vals) -> None:
    """``out[:, dst_i] += a[:, src_i] v_i`` for every entry i, in place: out (M, ·) += a Δ-part, by one gather
    and one index_add (M x nnz elements moved)."""
    out.index_add_(1, dst, a.index_select(1, src).mul_(vals.to(a.dtype)))


# Δ's part by gathers where m x (values) <= W's elements / _GATHER_RATIO: measured on this CPU (2 threads, fp32,
# 1024 x 1024 and 1024 x 4096, density 0.1-5 %, M 1-64), gathers beat clone + scatter (forward, and dX) up to
# about 1/8 of W's elements and lose past 1/5, less the per-call costs a layer pays beside them (`fastpeft bench
# sparse`, M = 1: 5 % took 0.29 ms by gathers against 0.19 by clone + scatter): 1/32. The values' gradient by
# gather-dots beats sddmm_torch's panels up to about 2/3 of them (at M = 1: 6 µs against 88 µs, 0.1 %): 1/4.
_GATHER_RATIO = 32
_GATHER_RATIO_DV = 4
_GATHER_CHUNK = 1 << 18  # elements of one (M, chunk) gathered panel of the values' gradient


def _gathers_win(m: int, nvalues: int, weight, dtype) -> bool:
    """Whether Δ's part goes by gathers for m rows (no W-sized buffer): few rows times some values, in fp32 /
    fp64 with W of the same dtype (under autocast to bf16 W + Δ is rounded once, as the reference has it)."""
    return (nvalues > 0 and dtype in (torch.float32, torch.float64) and weight.dtype == dtype
            and m * nvalues * _GATHER_RATIO <= weight.shape[0] * weight.shape[1])


def _times_w_prime(a, weight, bias, plan: CPUPlan, values, transpose: bool):
    """``a (W + Δ)^T + b`` (``transpose``: the forward, a (M, in)) or ``a (W + Δ)`` (dX, a (M, out), no bias) in
    a's dtype: Δ's part by gathers at decode sizes (``_gathers_win``), else one product with W + Δ
    (``_w_prime``)."""
    gathers = _gathers_win(a.shape[0], values.numel(), weight, a.dtype)
    w = weight if gathers else _w_prime(weight, plan, values, a)
    w = w.t() if transpose else w
    out = torch.addmm(bias, a, w) if bias is not None else a @ w
    if gathers:
        rows, cols, vals = _positions(plan, values)
        if transpose:
            _add_delta_rows(out, a, cols, rows, vals)  # y[:, row_i] += x[:, col_i] v_i
        else:
            _add_delta_rows(out, a, rows, cols, vals)  # dX[:, col_i] += dY[:, row_i] v_i
    return out


def _values_grad(dy, x, plan: CPUPlan, values):
    """dv = (dY^T X) on Δ's support, in values' dtype and shape. Blocks: ``sddmm_torch`` (one batched GEMM over the
    blocks' panels). Flat entries: at decode sizes gather-dots, dv_i = sum_m dY[m, row_i] X[m, col_i], in chunks
    of at most ``_GATHER_CHUNK`` gathered elements; else one GEMM dY^T X and a gather from it (a W-sized transient,
    freed on return, never saved) while W is within ``_PANEL_BYTES``, ``sddmm_torch``'s row panels past it."""
    m = dy.shape[0]
    indices, block_size = plan.indices, plan.block_size
    nnz = indices.shape[0]
    n, k = dy.shape[1], x.shape[1]
    if block_size != 1 or nnz == 0 or m == 0:
        return sddmm_torch(dy, x, indices, values, block_size)
    if m * nnz * _GATHER_RATIO_DV > n * k:
        if n * k * dy.element_size() > _PANEL_BYTES:
            return sddmm_torch(dy, x, indices, values, block_size)
        # one GEMM, then the entries gathered from it (a transient the size of W, freed on return; sddmm_torch's
        # two half panels cost 10-15 % more here: 512 x 512, M = 256)
        rows, cols, _ = plan.positions()
        return (dy.t() @ x)[rows, cols].to(values.dtype)
    rows, cols, _ = plan.positions()
    step = max(1, _GATHER_CHUNK // m)
    parts = [(dy.index_select(1, rows[j:j + step]) * x.index_select(1, cols[j:j + step])).sum(0)
             for j in range(0, nnz, step)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(values.dtype)


# ----------------------------------------------------------------------------------------------------
# the CPU path's autograd Functions
# ----------------------------------------------------------------------------------------------------


class SparseDeltaLinearCPUFunction(torch.autograd.Function):
    r"""Sparse-delta linear on CPU tensors; x is 2-D here, (M, K), W (N, K), Δ = scatter_S(v) (N, K) with
    values v on its support S (entries, or b x b blocks clipped to W). Forward:

        y = x (W + Δ)^T + b                      W + Δ by clone + scatter into a kept buffer, one GEMM;
                                                 decode sizes: x W^T + b, then y[:, row_i] += x[:, col_i] v_i

    Backward, from dY (M, N): y_mn = sum_k x_mk (W + Δ)_nk + b_n, so

        dX  = dY (W + Δ)                         the same two ways (W + Δ formed again, never saved)
        dv  = (dY^T x) on S only                 dv_i = sum_m dY[m, row_i] x[m, col_i] (blocks: dY[:, rows_j]^T
                                                 x[:, cols_j], b x b; positions outside W get 0): gather-dots
                                                 at decode sizes, else ``_values_grad``'s GEMMs (for flat
                                                 entries a transient dY^T x, never saved)
        dW  = dY^T x,   db = sum_m dY_m          (only when required; dW is (N, K) by definition)

    Saved: x, W, v, and the indices on ctx (no W-sized tensor). The reference (``sparse_delta_linear_ref``) saves
    W + Δ under autograd and forms the dense (N, K) gradient of it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, block_size, plan):
        plan = plan or CPUPlan(indices, weight.shape[0], weight.shape[1], block_size)
        y = _times_w_prime(x, weight, bias, plan, values, transpose=True)
        ctx.save_for_backward(x, weight, values, indices)  # indices saved: changed in place before backward raises
        ctx.plan, ctx.has_bias = plan, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, _ = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        dx = _times_w_prime(dy, weight, None, plan, values, transpose=False) if need_x else None
        dv = _values_grad(dy, x, plan, values) if need_v else None
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, dv, None, None, None


class LoRASparseLinearCPUFunction(torch.autograd.Function):
    r"""LoRA beside a sparse delta (RoSA) on CPU tensors; x (M, K), W (N, K), Δ as in
    :class:`SparseDeltaLinearCPUFunction`, A (r, K), B (N, r), s the scaling, D the keep-mask of x (the CPU
    stream of ``cpu_keep_mask``, drop rate p, redrawn in backward), c = 1 / (1 - p). ``ops.lora_cpu``'s LoRA on
    W' = W + Δ (its docstring derives the LoRA terms):

        u = (D ⊙ x) A^T                          (M, r)
        y = x W'^T + b + s c u B^T

    Backward, from dY (M, N); Δ enters only through x W'^T (dropout touches the LoRA branch only):

        v_s = s c (dY B)
        dX  = dY W' + D ⊙ (v_s A)                W' formed again (or dY W plus Δ's gathers), never saved
        dA  = v_s^T (D ⊙ x),   dB = s c dY^T u
        dv  = (dY^T x) on S only                 the undropped x, as in SparseDeltaLinearCPUFunction
        dW  = dY^T x,   db = sum_m dY_m          (only when required)

    Saved: x, u (M, r), W, A, B, v, the indices and the seed; no W-sized tensor, no dropped copy of x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, values, indices, block_size, plan, scaling, dropout_p, seed):
        plan = plan or CPUPlan(indices, weight.shape[0], weight.shape[1], block_size)
        if _gathers_win(x.shape[0], values.numel(), weight, x.dtype):
            y, u = _lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
            rows, cols, vals = _positions(plan, values)
            _add_delta_rows(y, x, cols, rows, vals)
        else:
            y, u = _lora_forward(x, _w_prime(weight, plan, values, x), bias, lora_A, lora_B, scaling, dropout_p, seed)
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, values, indices, seed_t)
        ctx.seed = None if seed_t is not None else seed
        ctx.plan, ctx.scaling, ctx.dropout_p, ctx.has_bias = plan, scaling, dropout_p, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, lora_A, lora_B, values, _, seed_t = ctx.saved_tensors  # indices: saved for the version check
        plan = ctx.plan
        need_x, need_w, need_b, need_a, need_bb, need_v = ctx.needs_input_grad[:6]
        seed = seed_t if seed_t is not None else ctx.seed
        dy = dy.contiguous()
        u = recorded_u(u, x, lora_A, ctx.dropout_p, seed) if need_bb else u
        gathers = need_x and _gathers_win(dy.shape[0], values.numel(), weight, dy.dtype)
        w = weight if gathers or not need_x else _w_prime(weight, plan, values, dy)
        dx, da, dbb = _lora_backward(dy, x, u, w, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
                                     need_x, need_a, need_bb)
        del w  # W + Δ freed before the values' gradient
        if gathers:
            rows, cols, vals = _positions(plan, values)
            _add_delta_rows(dx, dy, rows, cols, vals)
        dv = _values_grad(dy, x, plan, values) if need_v else None
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, dv, None, None, None, None, None, None


def _w_prime(weight, plan: CPUPlan, values, a):
    """W + Δ (N, K) in a's dtype for one product with ``a``; W itself (cast) for an empty Δ. Formed in the CPU
    workspace (``fastpeft.quant.workspace``: a fresh W-sized tensor per call is mapped and faulted in page by
    page above glibc's mmap threshold) unless autograd records the product (double backward), which would save
    it."""
    if plan.indices.shape[0] == 0:
        return weight.to(a.dtype)
    recorded = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad or values.requires_grad)
    buf = None
    if weight.device.type == "cpu" and not recorded:  # W's elements and the spare one for clipped edge blocks
        buf = workspace(weight.device, a.dtype, weight.numel() + plan.scatter()[2])
    return w_plus_delta_torch(weight, plan.indices, values, plan.block_size, a.dtype, buf=buf, plan=plan)


# ----------------------------------------------------------------------------------------------------
# entry points (called by fastpeft.functional for CPU tensors on the reference backend)
# ----------------------------------------------------------------------------------------------------


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plan_for(plan, indices, weight, block_size: int):
    """``plan`` (a ``CPUPlan``) checked against this call, or None where there is none (one is derived per call)."""
    if plan is not None:
        plan.check(indices, weight.shape[0], weight.shape[1], block_size)
    return plan


def sparse_delta_linear_cpu(x, weight, bias, delta_indices, delta_values, block_size: int = 1,
                            plan: CPUPlan | None = None) -> torch.Tensor:
    """``y = x (W + Δ)^T + b`` on CPU tensors: x (..., in), any strides -> (..., out); arguments checked by the
    caller; ``plan``: the indices' ``CPUPlan`` (a layer's), or None. Under autocast x and the bias are cast; W + Δ
    is summed in fp32 and rounded once to the autocast dtype, as autocast's F.linear rounds the reference's fp32
    W + Δ."""
    if torch.is_autocast_enabled("cpu"):
        x, bias = autocast_inputs(x, bias)
        with torch.autocast("cpu", enabled=False):  # (entered only when on: ~4 µs at every decode step)
            return sparse_delta_linear_cpu(x, weight, bias, delta_indices, delta_values, block_size, plan)
    x2 = x.reshape(-1, x.shape[-1])
    indices = delta_indices.contiguous()
    plan = _plan_for(plan, indices, weight, int(block_size))
    if _grad_needed(x, weight, bias, delta_values):
        y = SparseDeltaLinearCPUFunction.apply(x2, weight, bias, delta_values, indices, int(block_size), plan)
    else:  # nothing to differentiate: the forward without the autograd Function's cost
        plan = plan or CPUPlan(indices, weight.shape[0], weight.shape[1], int(block_size))
        y = _times_w_prime(x2, weight, bias, plan, delta_values, transpose=True)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_sparse_linear_cpu(x, weight, bias, lora_A, lora_B, scaling: float, delta_indices, delta_values,
                           block_size: int = 1, dropout_p: float = 0.0, seed=None,
                           plan: CPUPlan | None = None) -> torch.Tensor:
    """RoSA on CPU tensors: ``y = x (W + Δ)^T + b + scaling (drop(x) A^T) B^T``, x (..., in) -> (..., out).
    ``dropout_p`` is the rate in effect (0 out of training), ``seed`` required with it; the mask is the CPU
    stream's, as ``lora_linear``'s on the CPU. Under autocast x, the bias and the factors are cast (W + Δ as in
    ``sparse_delta_linear_cpu``)."""
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed is required when training with dropout_p > 0, got None")
    if torch.is_autocast_enabled("cpu"):
        x, bias, lora_A, lora_B = autocast_inputs(x, bias, lora_A, lora_B)
        with torch.autocast("cpu", enabled=False):
            return lora_sparse_linear_cpu(x, weight, bias, lora_A, lora_B, scaling, delta_indices, delta_values,
                                          block_size, dropout_p, seed, plan)
    x2 = x.reshape(-1, x.shape[-1])
    indices = delta_indices.contiguous()
    plan = _plan_for(plan, indices, weight, int(block_size))
    y = LoRASparseLinearCPUFunction.apply(x2, weight, bias, lora_A, lora_B, delta_values, indices, int(block_size),
                                          plan, float(scaling), float(dropout_p), seed)
    return y.view(*x.shape[:-1], weight.shape[0])
