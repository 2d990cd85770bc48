"""The BGMV kernel of many adapters in one batch (``kernels.multi_lora.multi_lora_bgmv_``) and the no-grad
forward that picks it (``ops.multi._forward_no_grad``, ``FASTPEFT_MULTI_PATH``): against the float64
reference with odd shapes, mixed ranks, -1 rows, per-token and per-sequence ids, every dtype, dropout
(its mask is the grouped shrink's and the reference's), op registration, torch.compile, the ops launched
per decode call, and (GPU only) capture under a CUDA graph. Runs under TRITON_INTERPRET=1 on CPU tensors."""
import pytest
import torch

pytest.importorskip("triton")

import fastpeft  # noqa: E402
from conftest import DTYPES, assert_close_report, triton_backend_device  # noqa: E402
from fastpeft.reference import dropout_mask, dropout_threshold, lora_linear_multi_ref  # noqa: E402

DEV = triton_backend_device()

from fastpeft.kernels import lora as KL  # noqa: E402
from fastpeft.kernels import multi_lora as MK  # noqa: E402
from fastpeft.ops import multi as OM  # noqa: E402

# The kernels are compared with the reference backend: on CPU tensors it must draw the kernels' Philox masks.
pytestmark = pytest.mark.usefixtures("kernel_stream_reference")

RANKS = [1, 8, 5, 16]  # r_max 16 on adapter 3, rank 1 on adapter 0


def _make(m, k, n_out, ranks, dtype, lead=(), seed=0):
    """x (*lead, m, k), weight, bias, stacks (n, r_max, k) / (n, n_out, r_max) holding garbage past each rank,
    scalings (n,) fp32, ranks (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    x = torch.randn(*lead, m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n_out, generator=g, dtype=torch.float64)
    a = torch.randn(n, r_max, k, generator=g, dtype=torch.float64) / k ** 0.5
    bb = torch.randn(n, n_out, r_max, generator=g, dtype=torch.float64) / r_max ** 0.5
    s = torch.linspace(0.5, 2.0, n, dtype=torch.float32).to(DEV)
    return [t.to(DEV, dtype) for t in (x, w, b, a, bb)] + [s, torch.tensor(ranks, device=DEV)]


def _ids(shape, n, seed=1):
    return torch.randint(-1, n, shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def _forward(backend, x, w, b, a, bb, s, ids, ranks, p, seed):
    """A no-grad forward (the path under test on the triton backend); dropout on when ``p`` is given."""
    with torch.no_grad():
        return fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, ranks, backend=backend, dropout_p=p,
                                          training=p is not None, seed=seed)


def _check(case, x, w, b, a, bb, s, ids, ranks, p=None, seed=0):
    """fp32: close to fp64 (rtol 1e-5). fp16/bf16: error vs fp64 at most 2x PyTorch's own in that dtype."""
    got = _forward("triton", x, w, b, a, bb, s, ids, ranks, p, seed)
    exact = _forward("reference", *(t.double() for t in (x, w, b, a, bb)), s, ids, ranks, p, seed)
    assert got.dtype == x.dtype and got.shape == exact.shape, case
    if x.dtype == torch.float32:
        assert_close_report(got, exact, rtol=1e-5, atol=1e-5 * max(1.0, exact.abs().max().item()), what=case)
        return
    torch_low = _forward("reference", x, w, b, a, bb, s, ids, ranks, p, seed)
    err = (got.double() - exact).abs()
    torch_err = (torch_low.double() - exact).abs().max().item()
    tiny = 1e-3 * exact.abs().max().item()
    if err.max().item() > 2 * torch_err + tiny:
        idx = int(err.argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))
        raise AssertionError(f"{case}: kernel error {err.max().item():.3g} > 2 x PyTorch's {torch_err:.3g} at {pos}: "
                             f"got {got.flatten()[idx].item():.6g}, expected {exact.flatten()[idx].item():.6g}")


@pytest.fixture
def count_paths(monkeypatch):
    """Counts of the two no-grad forwards run: {"bgmv": .., "grouped": ..}."""
    counts = {"bgmv": 0, "grouped": 0}

    def counted(name, fn):
        def call(*args, **kw):
            counts[name] += 1
            return fn(*args, **kw)
        return call
    monkeypatch.setattr(OM, "_bgmv_forward", counted("bgmv", OM._bgmv_forward))
    monkeypatch.setattr(OM, "_grouped_forward", counted("grouped", OM._grouped_forward))
    return counts


# (m, k, n_out, lead dims, per-sequence ids, dropout rates or None): every M, K and N of the grid at least
# twice, dropout on half; per-sequence ids as (B, T) rows with one id per sequence.
CASES = [
    (1, 48, 48, (), False, None),
    (1, 130, 130, (), False, [0.1, 0.0, 0.3, 0.5]),
    (7, 80, 130, (), False, None),
    (7, 130, 48, (3,), True, [0.2, 0.2, 0.0, 0.4]),
    (33, 80, 48, (), False, [0.1, 0.0, 0.3, 0.5]),
    (33, 48, 130, (), False, None),
    (33, 130, 48, (), False, None),
    (11, 80, 130, (3,), True, None),
]


def _case_id(c):
    m, k, n, lead, per_seq, p = c
    rows = f"B{lead[0]}xT{m}" if lead else f"M{m}"
    return f"{rows}-K{k}-N{n}" + ("-per_seq" if per_seq else "") + ("-p" + ".".join(f"{q:g}" for q in p) if p else "")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bgmv_path_matches_reference(case, dt, monkeypatch, count_paths):
    m, k, n_out, lead, per_seq, p = case
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "bgmv")
    x, w, b, a, bb, s, rk = _make(m, k, n_out, RANKS, DTYPES[dt], lead=lead)
    ids = torch.tensor([2, -1, 3], device=DEV) if per_seq else _ids(x.shape[:-1], len(RANKS))
    if not per_seq:  # every adapter and the base rows present where there are rows enough
        ids.view(-1)[: min(m, 5)] = torch.tensor([3, 0, -1, 1, 2], device=DEV)[: min(m, 5)]
    pt = torch.tensor(p, device=DEV) if p is not None else None
    _check(f"{_case_id(case)}-{dt}", x, w, b, a, bb, s, ids, rk, pt, seed=1234)
    assert count_paths == {"bgmv": 1, "grouped": 0}  # the reference runs are not counted


@pytest.mark.parametrize("path", ["bgmv", "grouped"])
@pytest.mark.parametrize("m", [7, 65], ids=["M7", "M65"])
def test_each_path_runs_where_asked(path, m, monkeypatch, count_paths):
    """FASTPEFT_MULTI_PATH forces either path at any M; both match the reference, ranks=None and no bias too."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", path)
    x, w, b, a, bb, s, rk = _make(m, 48, 40, [8, 16, 4], torch.float32)
    ids = _ids((m,), 3)
    _check(f"M{m}-{path}", x, w, b, a, bb, s, ids, rk, torch.tensor([0.1, 0.0, 0.3], device=DEV), seed=7)
    y = _forward("triton", x, w, None, a, bb, s, ids, None, None, 0)
    assert_close_report(y, lora_linear_multi_ref(x, w, None, a, bb, s, ids), rtol=1e-5, atol=1e-5, what="no bias")
    assert count_paths == {"bgmv": 2 if path == "bgmv" else 0, "grouped": 2 if path == "grouped" else 0}


def test_auto_picks_bgmv_for_few_rows_and_training_keeps_grouped(monkeypatch, count_paths):
    """auto (untimed): BGMV up to BGMV_MAX_ROWS rows, the grouped kernels beyond; in training mode without grad
    (reentrant checkpointing: its recompute must give the same bits) and with a gradient to compute, grouped
    whatever M; a bad FASTPEFT_MULTI_PATH is a ValueError naming it."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "auto")
    monkeypatch.setattr(KL, "INTERPRET", True)  # on CUDA too: the first candidate, untimed
    for m, want in ((1, "bgmv"), (OM.BGMV_MAX_ROWS, "bgmv"), (OM.BGMV_MAX_ROWS + 1, "grouped")):
        x, w, b, a, bb, s, rk = _make(m, 48, 40, [8, 4], torch.float32)
        before = dict(count_paths)
        _forward("triton", x, w, b, a, bb, s, _ids((m,), 2), rk, None, 0)
        assert count_paths[want] == before[want] + 1, m
    before = dict(count_paths)
    x, w, b, a, bb, s, rk = _make(3, 48, 40, [8, 4], torch.float32)
    for p in (None, torch.tensor([0.1, 0.0], device=DEV)):
        with torch.no_grad():
            fastpeft.lora_linear_multi(x, w, b, a, bb, s, _ids((3,), 2), rk, backend="triton", dropout_p=p, seed=1,
                                       training=True)
    assert count_paths["grouped"] == before["grouped"] + 2 and count_paths["bgmv"] == before["bgmv"]
    before = dict(count_paths)
    a.requires_grad_()
    fastpeft.lora_linear_multi(x, w, b, a, bb, s, _ids((3,), 2), rk, backend="triton").sum().backward()
    assert count_paths["grouped"] == before["grouped"] + 1 and count_paths["bgmv"] == before["bgmv"]
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "fastest")
    with pytest.raises(ValueError, match="FASTPEFT_MULTI_PATH must be one of"):
        _forward("triton", x, w, b, a.detach(), bb, s, _ids((3,), 2), rk, None, 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf row, on purpose
def test_padded_ranks_bad_ids_and_inf_never_count():
    """Values past r_a in the stacks never count; ids outside [0, n) leave their rows alone; an inf in a row
    of x reaches only that row."""
    m, k, n_out = 9, 48, 40
    x, w, b, a, bb, s, rk = _make(m, k, n_out, RANKS, torch.float32)
    clean_a, clean_b = a.clone(), bb.clone()
    for i, r in enumerate(RANKS):
        clean_a[i, r:] = 0
        clean_b[i, :, r:] = 0
        a[i, r:] = float("nan")
        bb[i, :, r:] = float("inf")
    ids = torch.tensor([0, 1, 2, 3, -1, 4, -7, 3, 0], device=DEV)  # 4 and -7: out of range, as -1
    thr = torch.zeros(4, dtype=torch.int64, device=DEV)
    base = torch.randn(m, n_out, device=DEV)
    got = MK.multi_lora_bgmv_(base.clone(), x, a, bb, ids, rk, s, thr)
    want = MK.multi_lora_bgmv_(base.clone(), x, clean_a, clean_b, ids, rk, s, thr)
    assert torch.equal(got, want)
    assert torch.equal(got[[4, 5, 6]], base[[4, 5, 6]])
    ref = base.clone()
    for row, i in enumerate(ids.tolist()):
        if 0 <= i < 4:
            r = RANKS[i]
            ref[row] += s[i] * (x[row].double() @ clean_a[i, :r].double().t() @ clean_b[i, :, :r].double().t()).float()
    assert_close_report(got, ref, rtol=1e-5, atol=1e-5, what="rows by hand")
    x_inf = x.clone()
    x_inf[0, 3] = float("inf")
    got_inf = MK.multi_lora_bgmv_(base.clone(), x_inf, clean_a, clean_b, ids, rk, s, thr)
    assert torch.equal(got_inf[1:], got[1:])
    # Row 0 (adapter 0, rank 1 of 16): u is one +-inf, not nan from the 15 padded ranks, so every column is +-inf.
    assert got_inf[0].isinf().all()


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_grouped_and_reference_mask(p):
    """With A_i = B_i = I, out[m] = drop_i(x_m): exactly dropout_mask(seed) at each row's own rate / (1 - p),
    and the grouped shrink's u (the mask a backward on the grouped kernels would redraw)."""
    m, k, n = 37, 48, 3
    rates = torch.tensor([p, 0.0, p / 2], device=DEV)
    ids = _ids((m,), n)
    eye = torch.eye(k, device=DEV).expand(n, k, k)
    thr = torch.tensor([dropout_threshold(float(q)) for q in rates.double()], device=DEV)
    scale = (1.0 / (1.0 - rates.double())).float()
    ranks = torch.full((n,), k, device=DEV, dtype=torch.int32)
    ones = torch.ones(m, k, device=DEV)
    out = MK.multi_lora_bgmv_(torch.zeros(m, k, device=DEV), ones, eye, eye, ids, ranks, scale, thr, 42, True, k, 1)
    for i in range(n):
        q = float(rates[i].double())
        keep = dropout_mask(42, m, k, q, device=DEV)[ids == i]
        torch.testing.assert_close(out[ids == i], keep.float() / (1 - q), rtol=0, atol=1e-6)
    assert not out[ids == -1].any()
    bm = MK._TEST_BLOCKS["BLOCK_M"]
    order, _, blocks = MK.group_rows(ids, n, bm)
    u_sorted = MK.multi_lora_shrink(ones, eye, order, blocks, ranks, scale, thr, bm, 42, True, k, 1)
    u = torch.zeros_like(u_sorted).index_copy_(0, order, u_sorted)
    torch.testing.assert_close(out, u, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m,n_out,r", [(1, 4096, 16), (16, 4096, 64), (64, 4096, 16), (64, 14336, 128), (7, 130, 1),
                                       (300, 48, 24)])
def test_cuda_block_choice(m, n_out, r, monkeypatch):
    """The blocks bgmv_blocks picks on a GPU (132 SMs faked): power-of-two chunks of 8192 // R_PAD elements in
    [32, 512], each program a whole number of chunks, the columns covered, and about 2 programs per SM (at
    least one column program per row, each at least one chunk)."""
    monkeypatch.setattr(MK, "_use_explicit_blocks", lambda t: False)
    monkeypatch.setattr(MK, "_sm_count", lambda i: 132)
    bk, bn, per_prog, warps = MK.bgmv_blocks(torch.empty(0), m, n_out, r)
    rp = MK.r_pad(r)
    assert bk == bn == max(32, min(512, 8192 // rp)) and bk & (bk - 1) == 0 and warps == 8
    assert per_prog % bn == 0 and per_prog >= bn
    col_progs = -(-n_out // per_prog)
    assert (col_progs - 1) * per_prog < n_out <= col_progs * per_prog
    chunks = -(-n_out // bn)
    assert col_progs == chunks or m * col_progs >= 132, (m, col_progs)  # every SM busy where N allows
    assert col_progs == 1 or m * col_progs <= 4 * 132, (m, col_progs)


def test_launcher_shape_errors():
    x, w, b, a, bb, s, rk = _make(5, 48, 40, [8, 4], torch.float32)
    thr = torch.zeros(2, dtype=torch.int64, device=DEV)
    out = torch.zeros(5, 40, device=DEV)
    ids = _ids((5,), 2)
    with pytest.raises(ValueError, match="shapes do not agree"):
        MK.multi_lora_bgmv_(out[:4], x, a, bb, ids, rk, s, thr)
    with pytest.raises(ValueError, match="shapes do not agree"):
        MK.multi_lora_bgmv_(out, x, a, bb.transpose(1, 2), ids, rk, s, thr)
    with pytest.raises(ValueError, match=r"ids must be \(5,\)"):
        MK.multi_lora_bgmv_(out, x, a, bb, ids[:4], rk, s, thr)
    with pytest.raises(ValueError, match="scales must be"):
        MK.multi_lora_bgmv_(out, x, a, bb, ids, rk, s.double(), thr)
    with pytest.raises(ValueError, match="thresholds must be"):
        MK.multi_lora_bgmv_(out, x, a, bb, ids, rk, s, s, has_mask=True)
    with pytest.raises(ValueError, match="2-D"):
        MK.multi_lora_bgmv_(out, x[None], a, bb, ids, rk, s, thr)


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_opcheck_registered_op():
    x, w, b, a, bb, s, rk = _make(7, 48, 40, RANKS, torch.float32)
    thr = torch.tensor([0, 2**30, 2**31, 3 * 2**30], device=DEV)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    for ranks, mask in ((rk, True), (rk.to(torch.int32), False)):
        torch.library.opcheck(torch.ops.fastpeft.multi_lora_bgmv_.default,
                              (torch.randn(7, 40, device=DEV), x, a, bb, _ids((7,), 4), ranks, s, thr, 3, mask, 48, 1),
                              test_utils=tests)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-no_grad-p"])
def test_compiled_no_grad_forward_is_one_graph(training, monkeypatch):
    """torch.compile(fullgraph=True) traces the no-grad BGMV forward (the registered op), with dropout's seed
    drawn inside the graph, and gives eager's output bit for bit."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "bgmv")
    x, w, b, a, bb, s, rk = _make(7, 48, 40, [8, 4, 2], torch.float32)
    ids = _ids((7,), 3)
    rates = torch.tensor([0.1, 0.0, 0.2], device=DEV)

    def f(x):
        with torch.no_grad():
            return fastpeft.lora_linear_multi(x, w, b, a, bb, s, ids, rk, backend="triton", dropout_p=rates,
                                              training=training)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.manual_seed(3)
        got = compiled(x)
        torch.manual_seed(3)
        assert torch.equal(got, f(x))
    finally:
        torch._dynamo.reset()  # drop the compiled graph and the tensors it holds


def _launches(fn):
    """(aten ops that launch work, triton kernels launched) by one call of fn: aten ops through a dispatch mode
    (views and other metadata-only ops left out), triton launches through the kernel module's ``_wrap`` (the
    interpreter's own tensor work inside a launch is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    metadata = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "as_strided", "detach",
                "alias", "slice", "select", "unsqueeze", "squeeze", "empty", "empty_strided", "lift_fresh",
                "_reshape_alias", "unbind", "split"}
    ops, kernels_run = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in metadata:
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    wrap = MK._wrap

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernels_run.append(self.kernel.fn.__name__)
                with _disable_current_modes():
                    return wrap(self.kernel)[grid](*args, **kwargs)
            return launch

    MK._wrap = Counted
    try:
        with Count():
            fn()
    finally:
        MK._wrap = wrap
    return ops, kernels_run


def test_decode_call_launches_two_ops_on_bgmv(monkeypatch, capsys):
    """A decode step of a FastLoRALinear with 3 adapters in eval, routed by ``mixed_batch``: the BGMV path runs
    the base addmm and the BGMV kernel and nothing else; the grouped path runs the grouping's many small ops
    and two kernels. (Explicit ``adapter_ids`` add their range check: aminmax and two host reads.)"""
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(48, 40, r=8, lora_alpha=16, init_lora_weights=False, adapter_name="a").to(DEV)
    layer.add_adapter("b", 4, 8, init_lora_weights=False)
    layer.add_adapter("c", 16, 16, init_lora_weights=False)
    layer.eval().requires_grad_(False)
    x = torch.randn(16, 1, 48, device=DEV)
    counts = {}
    with fastpeft.use_backend("triton"):
        layer.set_routing([["a", "b", "c", None][i % 4] for i in range(16)])  # as mixed_batch does
        for path in ("bgmv", "grouped"):
            monkeypatch.setenv("FASTPEFT_MULTI_PATH", path)
            layer(x)  # builds and caches the stacks and per-adapter constants
            counts[path] = _launches(lambda: layer(x))
        layer.set_routing(None)
        monkeypatch.setenv("FASTPEFT_MULTI_PATH", "bgmv")
        ids = torch.tensor([[0, 1, 2, -1][i % 4] for i in range(16)], device=DEV)
        explicit = _launches(lambda: layer(x, adapter_ids=ids))
    ops, kernels_run = counts["bgmv"]
    assert ops == ["addmm"] and kernels_run == ["_multi_bgmv_kernel"], counts["bgmv"]
    g_ops, g_kernels = counts["grouped"]
    assert g_kernels == ["_multi_shrink_kernel", "_multi_expand_kernel"] and len(g_ops) >= 10, counts["grouped"]
    with capsys.disabled():
        print(f"\nlaunches per decode call (M=16, 3 adapters, mixed_batch): bgmv {len(ops)} aten + {len(kernels_run)} "
              f"triton; grouped {len(g_ops)} aten + {len(g_kernels)} triton ({', '.join(g_ops)}); "
              f"explicit adapter_ids on bgmv: {', '.join(explicit[0])} + {len(explicit[1])} triton")


# ---- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("path", ["bgmv", "grouped"])
def test_gpu_cuda_graph_capture_and_replay(path, monkeypatch):
    """A FastLoRALinear with 3 adapters in eval, captured under a CUDA graph (no host sync inside the call),
    replayed with new x and ids copied into the static tensors: equal to the reference each time."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", path)
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(256, 384, r=8, lora_alpha=16, init_lora_weights=False, device=DEV)
    layer.add_adapter("b", 4, 8, init_lora_weights=False)
    layer.add_adapter("c", 16, 16, init_lora_weights=False)
    layer.eval().requires_grad_(False)
    m = 24
    x_static = torch.randn(m, 256, device=DEV)
    ids_static = _ids((m,), 3)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels, times the path choice, caches the stacks
            for _ in range(3):
                layer(x_static, adapter_ids=ids_static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = layer(x_static, adapter_ids=ids_static)
    stack_a, stack_b = layer.stacked()
    scalings, ranks, _ = layer._adapter_meta(x_static.device)
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        x_static.copy_(torch.randn(m, 256, generator=g).to(DEV))
        ids_static.copy_(torch.randint(-1, 3, (m,), generator=g).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        want = lora_linear_multi_ref(x_static.double(), layer.weight.double(), layer.bias.double(), stack_a.double(),
                                     stack_b.double(), scalings, ids_static, ranks)
        assert_close_report(y_static, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), what=f"replay {seed}")


@pytest.mark.gpu
def test_gpu_decode_shapes_both_paths():
    """Decode sizes at an LLM layer, bf16, 32 adapters of mixed ranks: both no-grad paths against the reference."""
    ranks = [16, 8, 64, 32] * 8
    x, w, b, a, bb, s, rk = _make(48, 4096, 4096, ranks, torch.bfloat16)
    ids = _ids((48,), len(ranks))
    for path in ("bgmv", "grouped"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTPEFT_MULTI_PATH", path)
            _check(f"gpu-decode-{path}", x, w, b, a, bb, s, ids, rk)


# ---- the fused no-grad forward (one TMA kernel, sm_90+): FASTPEFT_MULTI_PATH=fused and auto's offer -----------

from fastpeft.kernels import lora_tma as KT  # noqa: E402

needs_tma = pytest.mark.skipif(not KT.tma_supported(DEV), reason="needs sm_90+ and triton tensor descriptors")


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of fused forwards run, and the candidates of each timed choice of the no-grad forward."""
    seen = {"fused": 0, "timed": []}

    def fused(*args):
        seen["fused"] += 1
        return real(*args)
    real = OM._fused_forward
    monkeypatch.setattr(OM, "_fused_forward", fused)
    timed = KL.timed_choice

    def record(cache, key, mode, device, candidates, fixed):
        seen["timed"].append(tuple(candidates))
        return timed(cache, key, mode, device, candidates, fixed)
    monkeypatch.setattr(KL, "timed_choice", record)
    return seen


@needs_tma
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("per_seq", [True, False], ids=["per-seq", "per-token"])
def test_fused_path_matches_reference(dt, per_seq, monkeypatch, fused_calls):
    """FASTPEFT_MULTI_PATH=fused: (B, T) rows with per-sequence or per-token ids (every adapter, -1 rows, garbage
    past each rank), as the reference gives them; through FastLoRALinear's adapter_ids too."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "fused")
    x, w, b, a, bb, s, rk = _make(45, 48, 40, RANKS, DTYPES[dt], lead=(3,))
    ids = torch.tensor([2, -1, 3], device=DEV) if per_seq else _ids((3, 45), len(RANKS))
    _check(f"fused-{dt}-{'per-seq' if per_seq else 'per-token'}", x, w, b, a, bb, s, ids, rk)
    assert fused_calls["fused"] == 1
    layer = fastpeft.FastLoRALinear(48, 40, r=8, lora_alpha=16, device=DEV, dtype=DTYPES[dt],
                                    init_lora_weights=False, adapter_name="a")
    layer.add_adapter("b", 16, 8, init_lora_weights=False)
    layer.eval()
    with torch.no_grad(), fastpeft.use_backend("triton"):
        monkeypatch.setenv("FASTPEFT_MULTI_PATH", "grouped")
        want = layer(x, adapter_ids=ids.clamp(max=1))  # the layer's two adapters
        monkeypatch.setenv("FASTPEFT_MULTI_PATH", "fused")
        got = layer(x, adapter_ids=ids.clamp(max=1))
    assert fused_calls["fused"] == 2
    tol = 1e-5 if dt == "fp32" else 2e-2
    assert_close_report(got, want, rtol=tol, atol=tol, what=f"layer {dt}")


@needs_tma
def test_auto_offers_fused_for_long_sequences_only(monkeypatch, fused_calls, tf32_on_the_card):
    """auto, no grad, out of training mode: fused is timed against grouped from FUSED_MIN_ROWS rows where the ids
    are given per sequence of at least FUSED_MIN_SEQ rows; per-token ids, short sequences, fewer rows, training
    mode and dropout keep the grouped kernels alone (untimed). Per-sequence int32 ids stay a stride-0 view."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "auto")
    t = OM.FUSED_MIN_SEQ
    b_ = OM.FUSED_MIN_ROWS // t + (OM.FUSED_MIN_ROWS % t > 0)
    x, w, b, a, bb, s, rk = _make(t, 48, 40, [8, 4], torch.float32, lead=(b_,))
    per_seq = torch.arange(b_, device=DEV) % 2
    _forward("triton", x, w, b, a, bb, s, per_seq.int(), rk, None, 0)
    assert fused_calls["timed"] == [("grouped", "fused")]
    from fastpeft._checks import expand_adapter_ids
    assert OM.sequence_rows(expand_adapter_ids(per_seq.int(), x, 2)) == t
    assert OM.sequence_rows(per_seq.view(-1, 1).expand(b_, t).contiguous()) == 1
    fused_calls["timed"].clear()
    _forward("triton", x, w, b, a, bb, s, per_seq.view(-1, 1).expand(b_, t).contiguous(), rk, None, 0)  # per token
    _forward("triton", x[:, : t - 1], w, b, a, bb, s, per_seq, rk, None, 0)                           # short
    _forward("triton", x[:1], w, b, a, bb, s, per_seq[:1], rk, None, 0)                                # few rows
    with torch.no_grad():
        fastpeft.lora_linear_multi(x, w, b, a, bb, s, per_seq, rk, backend="triton", training=True)
        fastpeft.lora_linear_multi(x, w, b, a, bb, s, per_seq, rk, backend="triton", training=True, seed=1,
                                   dropout_p=torch.tensor([0.1, 0.0], device=DEV))
    assert fused_calls["timed"] == [] and fused_calls["fused"] == 0


@needs_tma
def test_forced_fused_refusals_are_named(monkeypatch):
    """FASTPEFT_MULTI_PATH=fused where the kernel cannot run: a ValueError naming the reason."""
    monkeypatch.setenv("FASTPEFT_MULTI_PATH", "fused")
    x, w, b, a, bb, s, rk = _make(5, 48, 40, [8, 4], torch.float32)
    ids = _ids((5,), 2)
    cases = [(dict(p=torch.tensor([0.1, 0.0], device=DEV), seed=1), "dropout applies"),
             (dict(a=torch.zeros(2, 80, 48, device=DEV), bb=torch.zeros(2, 40, 80, device=DEV),
                   rk=torch.tensor([80, 4], device=DEV)), "r_max 80 is above 64"),
             (dict(x=x[:, :44].half(), w=w[:, :44].half(), a=a[:, :, :44].half(), bb=bb.half(), b=b.half()),
              r"in and out features must be multiples of 8 for torch.float16 \(TMA rows\), got 44 and 40")]
    for change, match in cases:
        kw = {**dict(x=x, w=w, b=b, a=a, bb=bb, s=s, rk=rk, p=None, seed=0), **change}
        with pytest.raises(ValueError, match="FASTPEFT_MULTI_PATH=fused is forced but cannot run here: " + match):
            with torch.no_grad():
                fastpeft.lora_linear_multi(kw["x"], kw["w"], kw["b"], kw["a"], kw["bb"], kw["s"], ids, kw["rk"],
                                           backend="triton", dropout_p=kw["p"], training=kw["p"] is not None,
                                           seed=kw["seed"])
    why = OM._fused_refusal(x, w, b.double(), a, bb, None)
    assert why.startswith("x, W, the stacks and the bias must share one dtype")
    # under CUDA MPS with an SM limit the persistent programs may not all be resident: never offered
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in OM._fused_refusal(x, w, b, a, bb, None)
