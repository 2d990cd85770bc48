"""Triton backend of :func:`fastpeft.sparse_delta_linear` and :func:`fastpeft.lora_sparse_linear`.

``y = x (W + Δ)^T + b`` (and RoSA: ``+ s (drop(x) A^T) B^T``) with Δ sparse: ``nnz`` flat entries
(block_size 1) or ``nblocks`` b x b blocks of W (out, in). The kernels are in ``kernels/sparse_delta.py``
(W + Δ densified into a transient buffer for cuBLAS, or added inside a block-sparse-aware GEMM; the
values' gradient by SDDMM) and ``kernels/lora.py`` (the LoRA branch). Neither Function saves a W-sized
tensor for backward, and neither ever forms an (out, in) gradient unless W itself requires one.

:data:`SparsePlan` is the device-side bookkeeping of one set of indices: a :class:`TilePlan` (the tile
bucketing of flat entries) or a :class:`BlockPlan` (the block map of blocks). Build it once with
:func:`build_sparse_plan` and pass it to every call with those indices (``plan=``), or let each call
build its own.

Each forward and each backward runs the faster of two compositions, measured once per shape bucket
(:func:`choose_path`, ``kernels.lora.timed_choice``): ``"kernels"`` (the above) and ``"torch"``, the plain
torch way of PEFT-SHiRA / RoSA (clone W, scatter Δ in, cuBLAS matmuls; :func:`w_plus_delta_torch`,
:func:`sddmm_torch`), so that the triton backend is never slower than that. RoSA's backward times a third,
``"kernels-dy1"`` (the kernels with LoRA's v and dB from one read of dY), where v and dB are both needed.
The torch composition holds a W-sized W + Δ while it runs (forward, and backward for dX), as the kernels'
densify path does; it too saves nothing W-sized for backward and never forms an (out, in) gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..kernels import lora as K
from ..kernels import lora_tma as KT
from ..kernels import sparse_delta as SD
from .common import _bucket, _seed_arg, autocast_inputs, base_grads, no_second_derivatives, returned
from .lora import dropout_constants, dx_key, fwd_key, lora_factor_grads, lora_gemm, torch_backward, torch_forward
from .sparse_cpu import sddmm_torch, w_plus_delta_torch

# Tiles are visited in groups of this many tile rows (as GROUP_M in Triton's matmul tutorial): the
# programs working at one time share their rows of dY and a few column panels of X in L2.
_TILE_GROUP = 8


class TilePlan(NamedTuple):
    """Where ``nnz`` flat entries (block_size 1) of an (out, in) delta are, bucketed by T x T tile of W
    (T = ``tile``; ntiles = cdiv(out, T) cdiv(in, T)) for the tile SDDMM; every tensor is on the device.

    tile_list (ntiles,) int32: tile ids (tile row * tiles per row + tile column), the non-empty ones first,
              in groups of ``_TILE_GROUP`` tile rows; tile_count (1,) int32: how many are non-empty;
    starts (ntiles + 1,) int32: tile t owns tile-sorted positions [starts[t], starts[t + 1]);
    order (nnz,) int32: tile-sorted position -> entry (a stable sort of the entries by tile);
    loc (nnz,) int32: (row % T) * T + col % T of each sorted entry.
    """
    tile_list: torch.Tensor
    tile_count: torch.Tensor
    starts: torch.Tensor
    order: torch.Tensor
    loc: torch.Tensor
    out_features: int
    in_features: int
    nnz: int
    tile: int

    block_size = 1

    def tensors(self) -> tuple:
        return (self.tile_list, self.tile_count, self.starts, self.order, self.loc)

    def check(self, delta_indices, out_features, in_features, block_size) -> None:
        _check_plan(self, delta_indices, out_features, in_features, block_size)

    def __repr__(self) -> str:
        return f"TilePlan(out={self.out_features}, in={self.in_features}, nnz={self.nnz}, tile={self.tile})"


class BlockPlan(NamedTuple):
    """Where ``nnz`` b x b blocks (b = ``block_size`` > 1) of an (out, in) delta are, for the block-fused GEMM.

    block_map (cdiv(out, b), cdiv(in, b)) int32: the block id at each block position, -1 where none; on
              the device, and only where the fused GEMM takes b (a power of two >= 16), else None.
    csr_rows, csr_cols: ``kernels.sparse_delta.block_csr`` of the blocks by block row (the forward's output
              blocks) and by block column (dX's), for the TMA sparse GEMM (sm_90+); only where it takes b
              (16, 32 or 64), else None.
    """
    block_map: Optional[torch.Tensor]
    out_features: int
    in_features: int
    nnz: int
    block_size: int
    csr_rows: Optional[tuple] = None
    csr_cols: Optional[tuple] = None

    def tensors(self) -> tuple:
        return (self.block_map,) + tuple(t for c in (self.csr_rows, self.csr_cols) if c is not None for t in c)

    def check(self, delta_indices, out_features, in_features, block_size) -> None:
        _check_plan(self, delta_indices, out_features, in_features, block_size)

    def __repr__(self) -> str:
        return (f"BlockPlan(out={self.out_features}, in={self.in_features}, nnz={self.nnz}, "
                f"block_size={self.block_size})")


# Either plan. Shapes depend on out, in, b and nnz only, and building one needs no host sync, so a plan can
# be built inside a compiled region or cached by a layer for as long as its indices do not change.
SparsePlan = Union[TilePlan, BlockPlan]


def _check_plan(plan: SparsePlan, delta_indices, out_features, in_features, block_size) -> None:
    """Raise if ``plan`` was not built for indices of this shape on this weight (no host sync: the
    indices' values are the caller's promise)."""
    got = (plan.out_features, plan.in_features, plan.block_size, plan.nnz)
    want = (int(out_features), int(in_features), int(block_size), int(delta_indices.shape[0]))
    if got != want:
        raise ValueError(f"plan was built for (out, in, block_size, nnz) = {got}, got a call with {want}; "
                         "build it again with fastpeft.ops.sparse.build_sparse_plan")
    for t in plan.tensors():
        if t is not None and t.device != delta_indices.device:
            raise ValueError(f"plan is on {t.device}, the indices on {delta_indices.device}")


def build_sparse_plan(delta_indices: torch.Tensor, out_features: int, in_features: int, block_size: int = 1,
                      device=None, tile: int | None = None) -> SparsePlan:
    """The plan of sorted, unique ``delta_indices`` (see ``fastpeft.sparse_delta_linear``): a
    :class:`TilePlan` for block_size 1, a :class:`BlockPlan` for blocks.

    Torch ops on ``device`` (default: the indices'), no host sync. ``tile`` (32 or 64, block_size 1
    only) overrides ``kernels.sparse_delta.choose_tile``.
    """
    device = torch.device(device) if device is not None else delta_indices.device
    idx = delta_indices.to(device)
    out_f, in_f, b = int(out_features), int(in_features), int(block_size)
    nnz = idx.shape[0]
    if b > 1:
        block_map = None
        rb, cb = -(-out_f // b), -(-in_f // b)
        if SD.fused_gemm_ok(b):
            block_map = torch.full((rb, cb), -1, device=device, dtype=torch.int32)
            if nnz:
                block_map[idx[:, 0].long(), idx[:, 1].long()] = torch.arange(nnz, device=device, dtype=torch.int32)
        csr = [SD.block_csr(idx, rb, cb, by_col) for by_col in (False, True)] if SD.tma_gemm_ok(b) else [None, None]
        return BlockPlan(block_map, out_f, in_f, nnz, b, *csr)
    t = int(tile) if tile is not None else SD.choose_tile(nnz, out_f, in_f)
    if t not in (16, 32, 64, 128):
        raise ValueError(f"tile must be 16, 32, 64 or 128, got {tile!r}")
    n_tr, n_tc = -(-out_f // t), -(-in_f // t)
    ntiles = n_tr * n_tc
    flat = idx.long()
    r, c = flat // in_f, flat % in_f
    key = (r // t) * n_tc + c // t
    order = torch.argsort(key, stable=True)
    starts = torch.searchsorted(key[order], torch.arange(ntiles + 1, device=device, dtype=torch.int64))
    loc = ((r % t) * t + c % t)[order]
    # Visit order: groups of _TILE_GROUP tile rows, column by column inside a group; empty tiles last.
    ids = torch.arange(ntiles, device=device)
    tr, tc = ids // n_tc, ids % n_tc
    g = _TILE_GROUP
    grouped = ((tr // g) * n_tc + tc) * g + tr % g
    nonempty = starts[1:] > starts[:-1]
    tile_list = torch.argsort(torch.where(nonempty, grouped, grouped + (-(-n_tr // g)) * g * n_tc))
    tile_count = nonempty.sum().reshape(1)
    i32 = torch.int32
    return TilePlan(tile_list.to(i32), tile_count.to(i32), starts.to(i32), order.to(i32), loc.to(i32), out_f, in_f,
                    nnz, t)


# ----------------------------------------------------------------------------------------------------
# shared pieces of the two Functions
# ----------------------------------------------------------------------------------------------------


def _w_plus_delta(weight, indices, values, block_size, dtype):
    """W + Δ in ``dtype``: a transient (out, in) buffer, freed by the caller as soon as it is used."""
    if indices.shape[0] == 0:
        return weight if weight.dtype == dtype else weight.to(dtype)
    return SD.densify_op(weight, indices, values, block_size=block_size, dtype=dtype)


def _sddmm(dy, x, indices, values, plan: SparsePlan):
    """dvalues: (dY^T X) on Δ's support, in values' dtype and shape. Never an (out, in) tensor."""
    nnz = indices.shape[0]
    if nnz == 0:
        return values.new_zeros(values.shape)
    if plan.block_size > 1:
        g = SD.sddmm_blocks_op(dy, x, indices, block_size=plan.block_size)
    elif SD.choose_sddmm(nnz, dy.shape[1], x.shape[1]) == "gather":
        g = SD.gather_dot_op(dy, x, indices)
    else:
        g = SD.sddmm_tiles_op(dy, x, tile_list=plan.tile_list, tile_count=plan.tile_count, starts=plan.starts,
                              order=plan.order, loc=plan.loc, tile=plan.tile)
    return g.to(values.dtype)


def _block_gemm(plan: SparsePlan, key: tuple, fused, dense, tma, device):
    """The output of the block GEMM way ``SD.choose_sparse_gemm`` picks for this key: the block-fused GEMM,
    W + Δ densified + cuBLAS, or (``tma`` not None: offered, sm_90+) the TMA GEMM with Δ's blocks as more MMAs;
    dense alone where the plan has no block map (entries, or b not a power of two >= 16)."""
    if not isinstance(plan, BlockPlan) or plan.block_map is None:
        return dense()
    way = SD.choose_sparse_gemm(key, plan.block_size, fused, dense, device, run_tma=tma)
    return {"fused": fused, "dense": dense, "tma": tma}[way]()


def _tma_way(plan: SparsePlan, a, weight, transpose_w: bool, run, *factors):
    """``run`` where the TMA sparse GEMM can take a @ op(W) (``SD.sparse_block_gemm_tma``), else None: a plan
    with its block CSR, not while tracing, a TMA device and dtype (``KT.tma_precision_ok``), TMA rows, one dtype
    for a, W and the LoRA factor (RoSA: A (r, K) in dX, B (N, r) in the forward), whose rank has configs
    (``SD.tma_rank_fits``)."""
    if not isinstance(plan, BlockPlan) or plan.csr_rows is None or torch.compiler.is_compiling():
        return None
    rank = (factors[0].shape[1] if transpose_w else factors[0].shape[0]) if factors else 0
    ok = (KT.tma_supported(a.device) and KT.tma_precision_ok(a.dtype, SD.gemm_mode() == "tma")
          and KT.tma_shapes_ok(a=a, b=weight.t() if transpose_w else weight)
          and all(t.dtype == a.dtype for t in (weight, *factors)) and SD.tma_rank_fits(rank))
    return run if ok else None


# ----------------------------------------------------------------------------------------------------
# the plain torch composition, and the choice between it and the kernels (the floor)
# ----------------------------------------------------------------------------------------------------


# FASTPEFT_SPARSE_PATH: "kernels" or "torch" force one composition of both Functions' forward and backward;
# "auto" (the default) times them once per shape key on CUDA, with RoSA's "kernels-dy1" where it is offered.
# "kernels" forces the kernels composition with two shrinks over dY (RoSA's backward), never "kernels-dy1":
# a forced path is the same code on every card.
PATH_CHOICES = ("auto", "kernels", "torch")
_path_cache: dict = {}  # shape key -> "kernels", "kernels-dy1" (RoSA's backward only) or "torch"


def path_mode() -> str:
    """FASTPEFT_SPARSE_PATH, checked; ``auto`` reads as ``kernels`` while a kernel variant is forced
    (FASTPEFT_SPARSE_GEMM or FASTPEFT_SPARSE_SDDMM), as a forced FASTPEFT_LORA_GEMM does for LoRA."""
    mode = K.env_choice("FASTPEFT_SPARSE_PATH", PATH_CHOICES)
    if mode == "auto" and (SD.gemm_mode() != "auto" or SD.sddmm_mode() != "auto"):
        return "kernels"
    return mode


def choose_path(key: tuple, candidates: dict, device: torch.device) -> str:
    """The name of the candidate to run for a sparse-delta forward / backward of this shape key:
    ``"kernels"`` or ``"torch"`` (and ``"kernels-dy1"`` where RoSA's backward offers it). Forced by
    :func:`path_mode`, else the fastest measured once (``kernels.lora.timed_choice``); deterministic mode,
    torch.compile tracing, CPU and the interpreter keep ``"kernels"``."""
    return K.timed_choice(_path_cache, key, path_mode(), device, candidates, "kernels")


def chosen_paths(m: int, in_features: int, out_features: int, block_size: int, nnz: int, rank: int = 0) -> dict:
    """What auto has measured so far for this shape (any dtype, bias, dropout, gradients):
    {"fwd": {"kernels", ...}, "bwd": {...}} of ``sparse_delta_linear`` (``rank`` 0) or RoSA (LoRA rank
    ``rank``; its "bwd" may hold "kernels-dy1"), nnz = the number of indices (entries or blocks). Benchmarks
    report it."""
    op = "rosa" if rank else "sd"
    want = (_bucket(m), in_features, out_features) + ((rank,) if rank else ()) + (block_size, _bucket(nnz))
    out = {"fwd": set(), "bwd": set()}
    for key, choice in _path_cache.items():
        for way in out:
            if key[0] == f"{op}-path-{way}" and key[1:1 + len(want)] == want:
                out[way].add(choice)
    return out


# ----------------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------------


class SparseDeltaLinearFunction(torch.autograd.Function):
    r"""Sparse-delta linear on the triton kernels or, where it is faster, the plain torch composition; x is
    2-D here, (M, K), weight W (N, K).

    Δ (N, K) is zero but on its support S (the nnz entries, or the positions of the blocks clipped to
    W); v are its values, Δ = scatter_S(v). Forward:

        y = x (W + Δ)^T + b

    either with W' = W + Δ densified into a transient buffer (a W-sized copy, fp32 sums rounded once
    to x's dtype) and one cuBLAS GEMM, or (blocks) with one GEMM adding Δ into its W tiles as it loads
    them. Backward, from dY (M, N): y_mn = sum_k x_mk (W + Δ)_nk + b_n, so

        dX  = dY (W + Δ)                         the same two ways (W' recomputed, not saved)
        dΔ  = dY^T x                             only on S: dv_i = sum_m dY[m, row_i] x[m, col_i]
                                                 (blocks: dv_j = dY[:, rows_j]^T x[:, cols_j], b x b;
                                                 positions outside W get 0), an SDDMM
        dW  = dY^T x,   db = sum_m dY_m          (only when required; dW is (N, K) by definition)

    Forward and backward each run the faster of two compositions of these formulas, measured once per
    shape bucket (:func:`choose_path`): ``"kernels"`` (the above) and ``"torch"`` (W' by clone + scatter
    in torch and cuBLAS matmuls, dΔ by :func:`sddmm_torch`). The torch side always forms W' = W + Δ, a
    transient W-sized buffer in x's dtype (forward, and backward again for dX): one W of memory more
    while it runs, as the kernels' densify path; the timing weighs only its speed. ``plan``: the
    :data:`SparsePlan` of the indices (block size, block map or tile bucketing).

    Saved for backward: x, W, v, the indices and the plan; W + Δ is recomputed (dense and torch paths) or
    never formed (fused path), and no (N, K) gradient is formed for v. No atomics on the kernels: the
    SDDMM's partial sums over M are added in a fixed order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, plan):
        y = _sd_forward(x, weight, bias, values, indices, plan)
        # The plan's tensors are bookkeeping of the indices, never changed in place: held on ctx with it.
        ctx.save_for_backward(x, weight, values, indices)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        no_second_derivatives("sparse_delta_linear")
        x, weight, values, indices = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
        b = plan.block_size
        m, k = x.shape
        n = weight.shape[0]

        def kernels():
            dx = dv = None
            if need_x:
                def fused():
                    return SD.block_gemm_op(dy, weight, plan.block_map, values, lu=None, lv=None, bias=None,
                                            block_size=b, transpose_w=False)

                def dense():
                    return dy @ _w_plus_delta(weight, indices, values, b, dy.dtype)  # W + Δ freed on return

                def tma():
                    return SD.sparse_block_gemm_tma(dy, weight, plan.csr_cols, values, None, None, None, b, False)

                key = ("sd-dx", _bucket(m), n, k, b, x.dtype, weight.dtype, False)
                dx = _block_gemm(plan, key, fused, dense, _tma_way(plan, dy, weight, False, tma), x.device)
            if need_v:
                dv = _sddmm(dy, x, indices, values, plan)
            return dx, dv

        def composed():
            dx = dy @ w_plus_delta_torch(weight, indices, values, b, dy.dtype) if need_x else None
            dv = sddmm_torch(dy, x, indices, values, b) if need_v else None
            return dx, dv

        dx = dv = None
        if need_x or need_v:
            key = ("sd-path-bwd", _bucket(m), k, n, b, _bucket(indices.shape[0]), x.dtype, weight.dtype, need_x, need_v)
            run = {"kernels": kernels, "torch": composed}
            dx, dv = run[choose_path(key, run, dy.device)]()
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, dv, None, None


def _sd_forward(x, weight, bias, values, indices, plan):
    """``SparseDeltaLinearFunction``'s forward on the faster of its two compositions."""
    b = plan.block_size
    m, k = x.shape
    n = weight.shape[0]

    def kernels():
        def fused():
            return SD.block_gemm_op(x, weight, plan.block_map, values, lu=None, lv=None, bias=bias, block_size=b,
                                    transpose_w=True)

        def dense():
            w2 = _w_plus_delta(weight, indices, values, b, x.dtype)
            return torch.addmm(bias, x, w2.t()) if bias is not None else x @ w2.t()

        def tma():
            return SD.sparse_block_gemm_tma(x, weight, plan.csr_rows, values, None, None, bias, b, True)

        key = ("sd-fwd", _bucket(m), k, n, b, x.dtype, weight.dtype, bias is not None)
        return _block_gemm(plan, key, fused, dense, _tma_way(plan, x, weight, True, tma), x.device)

    def composed():
        w2 = w_plus_delta_torch(weight, indices, values, b, x.dtype)
        return torch.addmm(bias, x, w2.t()) if bias is not None else x @ w2.t()

    key = ("sd-path-fwd", _bucket(m), k, n, b, _bucket(indices.shape[0]), x.dtype, weight.dtype, bias is not None)
    run = {"kernels": kernels, "torch": composed}
    return run[choose_path(key, run, x.device)]()


class LoRASparseLinearFunction(torch.autograd.Function):
    r"""LoRA beside a sparse delta (RoSA) on the triton kernels or, where it is faster, the plain torch
    composition; x is 2-D here, (M, K).

    W (N, K), Δ = scatter_S(v) as in :class:`SparseDeltaLinearFunction`, A (r, K), B (N, r), s the
    scaling, p the dropout rate, D the keep-mask of x (M, K) (redrawn from the seed, never stored) and
    drop(x) = D * x / (1 - p). Forward:

        u = drop(x) A^T                          (M, r) fp32, the LoRA shrink (mask redrawn in its loads)
        y = x (W + Δ)^T + s u B^T + b            blocks: one GEMM adding Δ into its W tiles, with
                                                 s u B^T + b in its epilogue; else W' = W + Δ densified
                                                 (transient) and the LoRA GEMM of kernels/lora.py on it
                                                 (fused epilogue, or cuBLAS + addmm_)

    Backward, from dY (M, N). y depends on x through x (W + Δ)^T and through u, on v only through
    x (W + Δ)^T (dropout touches the LoRA branch only):

        v_ = dY B                                (M, r), recomputed
        dL/du = s v_
        dX  = dY (W + Δ) + s D * (v_ A) / (1 - p)    the LoRA dX GEMM on W + Δ (recomputed or fused)
        dA  = (dL/du)^T drop(x) = s v_^T drop(x)     (r, K)
        dB  = s dY^T u                               (N, r)
        dΔ  = dY^T x on S only (the undropped x)     the SDDMM
        dW  = dY^T x,   db = sum_m dY_m              (only when required)

    Forward and backward each run the faster of the kernels and the torch composition, measured once per
    shape bucket (:func:`choose_path`); the torch one is LoRA's (``ops.lora.torch_forward`` /
    ``torch_backward``: cuBLAS matmuls, the masked pieces on the kernels) on W' = W + Δ by clone + scatter
    (a transient W-sized buffer, as in :class:`SparseDeltaLinearFunction`), with dΔ by :func:`sddmm_torch`.

    dY (M, N) is read by v_ = dY B, by dB = s dY^T u (two shrinks), by the dX GEMM and by the SDDMM on
    ``"kernels"``. Where v_ and dB are both needed (dX or dA, and dB) the backward also times
    ``"kernels-dy1"``: the same composition with v_ and dB from one read of dY (``lora_factor_grads(...,
    one_dy_pass=True)``, ``kernels.lora.lora_dy_pass``: fixed-order partial sums, no atomics), as
    :class:`~fastpeft.ops.lora.LoRALinearFunction` does. FASTPEFT_SPARSE_PATH=kernels still forces
    ``"kernels"`` (two shrinks), ``torch`` forces ``"torch"``; ``"kernels-dy1"`` runs only where ``auto``
    measures it fastest. Deterministic mode, tracing, the CPU and the interpreter keep ``"kernels"``.

    Saved for backward: x (not a dropped copy), u (M, r) (fp32 on the kernels, x's dtype on torch without
    dropout), W, A, B, v, the indices and the plan; W + Δ is recomputed or never formed. No atomics on the
    kernels.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, values, indices, plan, scaling, dropout_p, seed):
        thr, drop_scale = dropout_constants(dropout_p)
        y, u = _rosa_forward(x, weight, bias, lora_A, lora_B, values, indices, plan, scaling, thr, drop_scale, seed)
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, values, indices)  # the plan is held on ctx
        ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale = scaling, seed, thr, drop_scale
        ctx.plan, ctx.has_bias = plan, bias is not None
        return returned(y)

    @staticmethod
    def backward(ctx, dy):
        no_second_derivatives("lora_sparse_linear (RoSA)")
        x, u, weight, lora_A, lora_B, values, indices = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b, need_a, need_bb, need_v = ctx.needs_input_grad[:6]
        s, seed, thr, ds, b = ctx.scaling, ctx.seed, ctx.thr, ctx.drop_scale, plan.block_size
        m, k = x.shape
        n, r = weight.shape[0], lora_A.shape[0]

        def kernels(one_dy_pass=False):
            dx = dv = None
            v, da, dbb = lora_factor_grads(dy, x, u, lora_A, lora_B, scaling=s, drop_scale=ds, seed=seed,
                                           threshold=thr, need_v=need_x, need_a=need_a, need_b=need_bb,
                                           one_dy_pass=one_dy_pass)
            if need_x:
                def fused():
                    return SD.block_gemm_op(dy, weight, plan.block_map, values, lu=v, lv=lora_A, bias=None,
                                            block_size=b, transpose_w=False, scale=s * ds, seed=seed, threshold=thr)

                def dense():
                    w2 = _w_plus_delta(weight, indices, values, b, dy.dtype)
                    return lora_gemm(dy, w2, v, lora_A, scale=s * ds, seed=seed, threshold=thr,
                                     key=dx_key(m, n, k, r, x.dtype, thr > 0))  # shared with LoRALinearFunction

                def tma():
                    return SD.sparse_block_gemm_tma(dy, weight, plan.csr_cols, values, v, lora_A, None, b, False,
                                                    scale=s * ds, seed=seed, threshold=thr)

                key = ("rosa-dx", _bucket(m), n, k, r, b, x.dtype, weight.dtype, thr > 0)
                dx = _block_gemm(plan, key, fused, dense, _tma_way(plan, dy, weight, False, tma, lora_A), x.device)
            if need_v:
                dv = _sddmm(dy, x, indices, values, plan)
            return dx, da, dbb, dv

        def composed():
            w2 = w_plus_delta_torch(weight, indices, values, b, dy.dtype) if need_x else None
            dx, da, dbb = torch_backward(dy, x, u, w2, lora_A, lora_B, scaling=s, drop_scale=ds, seed=seed,
                                         threshold=thr, need_x=need_x, need_a=need_a, need_b=need_bb)
            del w2  # W + Δ freed before the SDDMM's panels are formed
            dv = sddmm_torch(dy, x, indices, values, b) if need_v else None
            return dx, da, dbb, dv

        def kernels_dy1():  # a named function, not a partial: timers and spies read candidates by __name__
            return kernels(one_dy_pass=True)

        key = ("rosa-path-bwd", _bucket(m), k, n, r, b, _bucket(indices.shape[0]), x.dtype, weight.dtype, thr > 0,
               need_x, need_a, need_bb, need_v)
        run = {"kernels": kernels, "torch": composed}
        if (need_x or need_a) and need_bb:  # v and dB both needed: one pass over dY gives both
            run = {"kernels": kernels, "kernels-dy1": kernels_dy1, "torch": composed}
        dx, da, dbb, dv = run[choose_path(key, run, dy.device)]()
        dw, db = base_grads(dy, x, weight, need_w, need_b and ctx.has_bias)
        return dx, dw, db, da, dbb, dv, None, None, None, None, None


def _rosa_forward(x, weight, bias, lora_A, lora_B, values, indices, plan, scaling, thr, drop_scale, seed):
    """``(y, u)`` of ``LoRASparseLinearFunction``'s forward on the faster of its two compositions."""
    b = plan.block_size
    m, k = x.shape
    n, r = weight.shape[0], lora_A.shape[0]

    def kernels():
        # The mask of x (M, K) element (m, k) is draw(seed, m K + k).
        u = K.shrink_op(x, lora_A.t(), scale=drop_scale, seed=seed, threshold=thr, mask_sp=k, mask_sq=1)

        def fused():
            return SD.block_gemm_op(x, weight, plan.block_map, values, lu=u, lv=lora_B.t(), bias=bias, block_size=b,
                                    transpose_w=True, scale=scaling)

        def dense():
            w2 = _w_plus_delta(weight, indices, values, b, x.dtype)
            return lora_gemm(x, w2.t(), u, lora_B.t(), bias=bias, scale=scaling,
                             key=fwd_key(m, k, n, r, x.dtype, bias is not None))  # shared with LoRALinearFunction

        def tma():
            return SD.sparse_block_gemm_tma(x, weight, plan.csr_rows, values, u, lora_B.t(), bias, b, True,
                                            scale=scaling)

        key = ("rosa-fwd", _bucket(m), k, n, r, b, x.dtype, weight.dtype, bias is not None)
        return _block_gemm(plan, key, fused, dense, _tma_way(plan, x, weight, True, tma, lora_B), x.device), u

    def composed():
        w2 = w_plus_delta_torch(weight, indices, values, b, x.dtype)
        return torch_forward(x, w2, bias, lora_A, lora_B, scaling=scaling, drop_scale=drop_scale, seed=seed,
                             threshold=thr)

    key = ("rosa-path-fwd", _bucket(m), k, n, r, b, _bucket(indices.shape[0]), x.dtype, weight.dtype, bias is not None,
           thr > 0)
    run = {"kernels": kernels, "torch": composed}
    return run[choose_path(key, run, x.device)]()


# ----------------------------------------------------------------------------------------------------
# entry points (called by fastpeft.functional)
# ----------------------------------------------------------------------------------------------------


def _plan_for(plan, delta_indices, weight, block_size) -> SparsePlan:
    if plan is None:
        return build_sparse_plan(delta_indices, weight.shape[0], weight.shape[1], block_size)
    if not isinstance(plan, (TilePlan, BlockPlan)):
        raise TypeError(f"plan must be a SparsePlan (fastpeft.ops.sparse.build_sparse_plan) or None, "
                        f"got {type(plan).__name__}")
    plan.check(delta_indices, weight.shape[0], weight.shape[1], block_size)
    return plan


def sparse_delta_linear_triton(x, weight, bias, delta_indices, delta_values, block_size=1, plan=None):
    """Triton path of ``sparse_delta_linear``: x (..., in) any strides -> (..., out). Arguments checked by
    the caller; ``plan`` as returned by :func:`build_sparse_plan` for these indices, or None (built here).

    Under autocast only x and the bias are cast: W and the delta's values stay as they are, since the
    kernels add W + Δ in fp32 and round the sum once to x's dtype, as autocast's F.linear rounds the fp32
    W + Δ of the reference once."""
    x, bias = autocast_inputs(x, bias)
    plan = _plan_for(plan, delta_indices, weight, block_size)
    indices = delta_indices.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = SparseDeltaLinearFunction.apply(x2, weight, bias, delta_values, indices, plan)
    return y.view(*lead, weight.shape[0])


def lora_sparse_linear_triton(x, weight, bias, lora_A, lora_B, scaling, delta_indices, delta_values, block_size=1,
                              dropout_p=0.0, seed=None, plan=None):
    """Triton path of ``lora_sparse_linear`` (RoSA): x (..., in) any strides -> (..., out). ``dropout_p``
    is already 0 when not training; ``seed`` is used only with dropout. Under autocast x, the bias and
    the LoRA factors are cast (W and the values as in ``sparse_delta_linear_triton``)."""
    x, bias, lora_A, lora_B = autocast_inputs(x, bias, lora_A, lora_B)
    plan = _plan_for(plan, delta_indices, weight, block_size)
    indices = delta_indices.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = LoRASparseLinearFunction.apply(x2, weight, bias, lora_A, lora_B, delta_values, indices, plan,
                                           float(scaling), float(dropout_p), _seed_arg(seed))
    return y.view(*lead, weight.shape[0])
