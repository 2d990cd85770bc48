"""The CPU path of the reference backend: the CPU dropout stream (keep rate, seed purity, its compiled
form), ``LoRALinearCPUFunction`` (every gradient against the formula in fp64, against lora_linear_ref, no
dropped copy of x saved, checkpoint recomputation), and many adapters grouped by rows (each present
adapter once, the grouping cached, gradients only to each row's adapter)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft import reference as R
from fastpeft.ops.lora_cpu import LoRALinearCPUFunction, lora_linear_cpu
from conftest import assert_close_report


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the CPU dropout stream --------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_in_every_lane(p):
    rows, cols = 1024, 1024
    keep = R.cpu_keep_mask(123, rows, cols, p)
    q = 1.0 - R.cpu_dropout_threshold(p) / 2**16          # p to 2**-16
    assert abs(q - (1.0 - p)) <= 2**-16
    n = rows * cols
    sigma = (q * (1 - q) / n) ** 0.5
    rate = keep.double().mean().item()
    assert abs(rate - q) < 5 * sigma, (rate, q)
    # Each of a word's four 16-bit draws (element e % 4) keeps at the same rate.
    lanes = keep.reshape(-1, 4).double().mean(0)
    assert (lanes - q).abs().max().item() < 5 * sigma * 2, lanes


def test_draws_are_uniform_and_seeds_independent():
    d = R.cpu_draws(7, 1 << 20).double()
    assert d.min() >= -2**15 and d.max() < 2**15
    assert abs(d.mean().item() + 0.5) < 5 * (2**16 / 12 ** 0.5) / 2**10  # uniform on [-2**15, 2**15)
    hist = torch.histc(d, bins=16, min=-2**15, max=2**15)
    assert (hist / hist.mean() - 1).abs().max() < 0.02, hist
    # Neighbouring seeds and neighbouring elements: the masks agree as often as independent ones would.
    p = 0.5
    a, b = R.cpu_keep_mask(1, 512, 512, p), R.cpu_keep_mask(2, 512, 512, p)
    assert abs((a == b).double().mean().item() - 0.5) < 0.01
    flat = a.reshape(-1)
    assert abs((flat[1:] == flat[:-1]).double().mean().item() - 0.5) < 0.01


def test_mask_is_a_pure_function_of_the_seed():
    m1 = R.cpu_keep_mask(2**62 + 5, 33, 80, 0.1)
    assert torch.equal(m1, R.cpu_keep_mask(2**62 + 5, 33, 80, 0.1))
    assert not torch.equal(m1, R.cpu_keep_mask(2**62 + 6, 33, 80, 0.1))
    # A seed drawn inside a compiled region is a one-element tensor: the same bits.
    assert torch.equal(m1, R.cpu_keep_mask(torch.tensor([2**62 + 5]), 33, 80, 0.1))
    # The same mask whatever the number of threads.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = R.cpu_keep_mask(9, 700, 1300, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, R.cpu_keep_mask(9, 700, 1300, 0.3))
    # A prefix of a longer stream: element e's draw does not depend on the tensor's size.
    assert torch.equal(R.cpu_draws(3, 1001), R.cpu_draws(3, 4096)[:1001])
    with pytest.raises(ValueError, match="seed"):
        R.cpu_draws(-1, 8)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_draws_equal_eager(backend):
    """While compiling, the 16-bit lanes are read with shifts instead of a dtype view: the same bits, under
    inductor too (its CPU code once made every draw 0 / -1 / 32767: a mask keeping everything), for a seed tensor
    given as input, an int seed and a seed tensor made in the graph (constants inductor folds), at a lane offset."""
    want = R.cpu_draws(2**61 + 17, 1003, start=5)
    cases = {"input": (lambda s: R.cpu_draws(s, 1003, start=5), torch.tensor([2**61 + 17])),
             "int": (lambda s: R.cpu_draws(2**61 + 17, 1003, s.device, start=5), torch.zeros(1)),
             "constant": (lambda s: R.cpu_draws(torch.tensor([2**61 + 17]), 1003, s.device, start=5), torch.zeros(1))}
    for name, (fn, arg) in cases.items():
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend=backend)(arg)
        assert torch.equal(got, want), (name, int((got != want).sum()))


def test_oracle_stream_is_still_the_kernels():
    """The Philox oracle is untouched: lora_linear_ref's mask is dropout_mask's, not the CPU stream's."""
    x = torch.ones(7, 48)
    dropped = R.lora_dropout_ref(x, 0.25, 11)
    assert torch.equal(dropped != 0, R.dropout_mask(11, 7, 48, 0.25))
    assert not torch.equal(R.dropout_mask(11, 7, 48, 0.25), R.cpu_keep_mask(11, 7, 48, 0.25))


# ---- LoRALinearCPUFunction ----------------------------------------------------------------------------

def _args(m, k, n, r, dtype=torch.float64, bias=True, grad_base=True):
    g = _g(m * 1000 + k)

    def t(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)
    return (t(m, k), t(n, k, scale=k ** -0.5, grad=grad_base), t(n, grad=grad_base) if bias else None,
            t(r, k, scale=k ** -0.5), t(n, r, scale=0.3))


SHAPES = [(1, 48, 40, 1), (7, 80, 48, 8), (33, 130, 48, 16), (100, 48, 80, 24)]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n,r", SHAPES, ids=[f"M{m}-K{k}-N{n}-r{r}" for m, k, n, r in SHAPES])
def test_gradients_match_the_formula_fp64(m, k, n, r, bias, p):
    """dX = dY W + s D*(dY B A)/(1-p), dA = s (dY B)^T drop(x), dB = s dY^T u, dW = dY^T x, db = sum dY."""
    x, w, b, a, bb = _args(m, k, n, r, bias=bias)
    s, seed = 1.7, 2**40 + 3
    y = LoRALinearCPUFunction.apply(x, w, b, a, bb, s, p, seed)
    dy = torch.randn(m, n, generator=_g(1), dtype=torch.float64)
    got = torch.autograd.grad(y, [t for t in (x, w, b, a, bb) if t is not None], dy)
    with torch.no_grad():
        d = (R.cpu_keep_mask(seed, m, k, p).double() / (1 - p)) if p > 0 else torch.ones(m, k, dtype=torch.float64)
        xd = x * d
        u = xd @ a.t()
        want_y = x @ w.t() + (b if bias else 0) + s * u @ bb.t()
        want = [dy @ w + s * d * (dy @ bb @ a), dy.t() @ x] + ([dy.sum(0)] if bias else []) + \
               [s * (dy @ bb).t() @ xd, s * dy.t() @ u]
    assert_close_report(y, want_y, 1e-12, 1e-12, "y")
    for name, gg, ww in zip(["dX", "dW"] + (["db"] if bias else []) + ["dA", "dB"], got, want):
        assert_close_report(gg, ww, 1e-12, 1e-12, name)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_gradcheck_through_lora_linear(p):
    x, w, b, a, bb = _args(5, 12, 9, 3)
    x = x.detach().view(5, 3, 4).transpose(1, 2).contiguous().transpose(1, 2).reshape(5, 12).requires_grad_()
    fn = lambda x, w, b, a, bb: fastpeft.lora_linear(x, w, b, a, bb, 0.7, p, seed=5, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))
    # second derivatives: dB = s dY^T u goes through a u recomputed by recorded ops (the saved u has no graph)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, a, bb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_lora_linear_ref_without_dropout(dtype):
    """p = 0 (and eval mode): the CPU Function against the oracle, both in ``dtype``, against fp64; the
    Function's error at most 2x the oracle's (plus a tiny atol). Leading dims, non-contiguous x."""
    x, w, b, a, bb = (t.detach() for t in _args(2 * 33, 80, 48, 16))
    x = x.view(2, 33, 80).transpose(0, 1)  # (33, 2, 80), not contiguous
    dy = torch.randn(33, 2, 48, generator=_g(2), dtype=torch.float64)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in (x, w, b, a, bb)]
        y = fn(*leaves)
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(dt)))
    exact = run(lambda *t: R.lora_linear_ref(*t, 2.0, 0.3, False, None), torch.float64)
    ref = run(lambda *t: R.lora_linear_ref(*t, 2.0), dtype)
    got = run(lambda *t: fastpeft.lora_linear(*t, 2.0, 0.3, training=False, backend="reference"), dtype)
    for name, g_, r_, e in zip(["y", "dX", "dW", "db", "dA", "dB"], got, ref, exact):
        assert g_.dtype == dtype and g_.shape == e.shape, name
        err, ref_err = (g_.double() - e).abs().max().item(), (r_.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * e.abs().max().item(), (name, err, ref_err)


def test_dropout_matches_the_plain_formula_with_the_cpu_mask():
    """Training with dropout: the same output and gradients as autograd through lora_dropout_cpu."""
    x, w, b, a, bb = _args(33, 80, 48, 8, dtype=torch.float32, grad_base=False)
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, 0.1, seed=77, backend="reference")
    want = F.linear(x, w, b) + 2.0 * F.linear(F.linear(R.lora_dropout_cpu(x, 0.1, 77), a), bb)
    assert_close_report(y, want, 1e-5, 1e-5, "y")
    for name, g_, e in zip("x A B".split(), torch.autograd.grad(y.square().sum(), (x, a, bb)),
                           torch.autograd.grad(want.square().sum(), (x, a, bb))):
        assert_close_report(g_, e, 1e-4, 1e-4, f"d{name}")


def _saved(fn):
    """The distinct non-parameter storages autograd saves while running fn: {data_ptr: nbytes}."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_no_dropped_copy_of_x_is_saved():
    """With dropout, backward keeps x, u (M, r) and nothing of x's size besides x; the oracle keeps more."""
    m, k, n, r = 256, 128, 96, 8
    layer = fastpeft.FastLoRALinear(k, n, r=r, lora_dropout=0.1, init_lora_weights=False).train()
    x = torch.randn(m, k, requires_grad=True)
    with fastpeft.use_backend("reference"):
        saved = _saved(lambda: layer(x))
    assert x.untyped_storage().data_ptr() in saved
    others = sum(v for ptr, v in saved.items() if ptr != x.untyped_storage().data_ptr())
    assert others <= m * r * 4 + 64, saved  # u, and the scalar seed at most
    a, bb = layer.lora_A, layer.lora_B
    oracle = _saved(lambda: R.lora_linear_ref(x, layer.weight, layer.bias, a, bb, layer.scaling, 0.1, True, 5))
    assert sum(oracle.values()) >= sum(saved.values()) + m * k * 4  # the dropped copy the CPU path avoids


def test_checkpoint_recomputes_the_same_mask():
    layer = fastpeft.FastLoRALinear(48, 40, r=8, lora_dropout=0.2, init_lora_weights=False).train()
    x = torch.randn(2, 7, 48, requires_grad=True)
    leaves = [x, layer.lora_A, layer.lora_B]

    def run(f):
        torch.manual_seed(3)
        y = f(x)
        return [y.detach()] + list(torch.autograd.grad(y.square().sum(), leaves))
    with fastpeft.use_backend("reference"):
        plain = run(layer)
        ckpt = run(lambda x: checkpoint(layer, x, use_reentrant=False))
        again = run(layer)
        torch.manual_seed(4)
        other = layer(x)
    for i, (c, p_, a) in enumerate(zip(ckpt, plain, again)):
        assert torch.equal(c, p_) and torch.equal(a, p_), i
    assert not torch.equal(other, plain[0])  # another seed, another mask


def test_autocast_bf16_follows_nn_linear():
    x, w, b, a, bb = (t.detach() for t in _args(9, 48, 40, 8, dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_linear_cpu(x, w, b, a, bb, 2.0, 0.0, None)
        want = R.lora_linear_ref(x, w, b, a, bb, 2.0)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close_report(got, want, 2e-2, 2e-2, "autocast y")
    with pytest.raises(ValueError, match="seed"):
        lora_linear_cpu(x, w, b, a, bb, 2.0, 0.1, None)


# ---- many adapters: rows grouped by adapter ------------------------------------------------------------

class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _multi_layer(n_adapters, dropout=0.0):
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(48, 40, r=4, lora_dropout=dropout, init_lora_weights=False)
    for i in range(1, n_adapters):
        layer.add_adapter(f"a{i}", 1 + i % 8, 4 + i % 3, lora_dropout=dropout, init_lora_weights=False)
    return layer


def test_cost_follows_the_present_adapters_not_the_registered_ones():
    x = torch.randn(2, 9, 48)
    ids = torch.tensor([[0, 3, -1] * 3, [3, 3, 0] * 3])
    counts = []
    for n in (4, 64):
        layer = _multi_layer(n).eval()
        with fastpeft.use_backend("reference"), torch.no_grad(), _CountMatmuls() as mode:
            layer(x, ids)
        counts.append(mode.count)
    assert counts[0] == counts[1] == 1 + 2 * 2, counts  # the base GEMM and two per present adapter


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_grouped_rows_match_each_row_alone_and_gradients_stay_with_their_adapter(p):
    layer = _multi_layer(64, dropout=p).train()
    for prm in layer.parameters():
        prm.requires_grad_(prm is not layer.weight and prm is not layer.bias)
    x = torch.randn(3, 5, 48, requires_grad=True)
    ids = torch.tensor([[7, 7, -1, 30, 0], [30, 0, 7, 7, 63], [-1, -1, 63, 0, 7]])
    seed = 2**50 + 9
    with fastpeft.use_backend("reference"):
        stack_a, stack_b = layer._forward_stacks()
        scalings, ranks, rates = layer._adapter_meta(x.device)
        y = fastpeft.lora_linear_multi(x, layer.weight, layer.bias, stack_a, stack_b, scalings, ids, ranks,
                                       dropout_p=rates, seed=seed)
    # The oracle: each row alone through its adapter's own factors, with the row's slice of the CPU mask.
    x2, ids2 = x.reshape(-1, 48), ids.reshape(-1)
    keep = R.cpu_keep_mask(seed, 15, 48, p) if p > 0 else torch.ones(15, 48, dtype=torch.bool)
    rows = []
    for m in range(15):
        i = int(ids2[m])
        base = F.linear(x2[m:m + 1], layer.weight, layer.bias)
        if i < 0:
            rows.append(base)
            continue
        name = layer.adapter_names[i]
        a, b = layer.adapter_parameters(name)
        xd = x2[m:m + 1] * keep[m] / (1 - p)
        rows.append(base + layer.adapter_spec(name).scaling * F.linear(F.linear(xd, a), b))
    want = torch.cat(rows).view(3, 5, 40)
    assert_close_report(y, want, 1e-5, 1e-5, "y")
    params = [layer.adapter_parameters(nm)[j] for nm in layer.adapter_names for j in (0, 1)]
    got = torch.autograd.grad(y.square().sum(), [x] + params, allow_unused=True)
    exp = torch.autograd.grad(want.square().sum(), [x] + params, allow_unused=True)
    assert_close_report(got[0], exp[0], 1e-4, 1e-4, "dX")
    used = {0, 7, 30, 63}
    for j, (g_, e) in enumerate(zip(got[1:], exp[1:])):
        adapter = j // 2
        if adapter in used:
            assert_close_report(g_, e, 1e-4, 1e-4, f"adapter {adapter} grad {j % 2}")
        else:
            assert g_ is None or not g_.any(), f"adapter {adapter} has no rows but got a gradient"


def test_grouping_is_cached_per_ids_tensor_and_sees_in_place_changes():
    layer = _multi_layer(8).eval()
    routing = torch.tensor([1, 5, -1, 1])  # per sequence, as mixed_batch holds it
    x = torch.randn(4, 3, 48)
    with fastpeft.use_backend("reference"), torch.no_grad():
        first = layer(x, routing)
        ids = routing.view(4, 1).expand(4, 3)
        hit = R.row_groups(ids, 8)
        assert R.row_groups(routing.view(4, 1).expand(4, 3), 8)[0] is hit[0]  # a new view, the same entry
        assert [g[0] for g in hit[1]] == [1, 5]
        routing[1] = 2  # in place: the version counter moves, the grouping is recomputed
        assert [g[0] for g in R.row_groups(routing.view(4, 1).expand(4, 3), 8)[1]] == [1, 2]
        second = layer(x, routing)
        layer.set_adapter("a2")
        alone = layer(x[1:2])
    assert torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert_close_report(second[1:2], alone, 1e-6, 1e-6, "re-routed sequence")


def test_multi_dropout_uses_the_cpu_stream_as_lora_linear_does():
    """One adapter through lora_linear_multi equals lora_linear with the same seed, dropout included."""
    x, w, b, a, bb = (t.detach() for t in _args(7, 48, 40, 8, dtype=torch.float32))
    ids = torch.zeros(7, dtype=torch.int64)
    with fastpeft.use_backend("reference"):
        multi = fastpeft.lora_linear_multi(x, w, b, a[None], bb[None], torch.tensor([2.0]), ids,
                                           dropout_p=torch.tensor([0.3]), seed=41)
        single = fastpeft.lora_linear(x, w, b, a, bb, 2.0, 0.3, seed=41)
    assert_close_report(multi, single, 1e-6, 1e-6, "multi vs single")


@pytest.mark.parametrize("routing", ["runs", "scattered"])
def test_contiguous_runs_and_scattered_rows_agree(routing):
    """Per-sequence routing gives each adapter contiguous rows (read as views, added in place without
    autograd); scattered rows take the gather / index_add form. Both equal each adapter alone."""
    layer = _multi_layer(8).eval()
    routing_ids = torch.tensor([0, 0, 5, 5, 2]) if routing == "runs" else torch.tensor([0, 5, 0, 2, 5])
    x = torch.randn(5, 3, 48)
    ids = routing_ids.view(5, 1).expand(5, 3)
    runs = R.row_groups(ids, 8)[2]
    assert (runs is not None) == (routing == "runs"), runs
    with fastpeft.use_backend("reference"), torch.no_grad():
        y = layer(x, routing_ids)
        for s in range(5):
            layer.set_adapter(layer.adapter_names[int(routing_ids[s])])
            assert_close_report(y[s], layer(x[s]), 1e-6, 1e-6, f"sequence {s}")


def test_mask_drawn_by_pieces_is_the_whole_mask():
    whole = R.cpu_keep_mask(5, 37, 130, 0.3)
    for row0, rows in [(0, 1), (1, 5), (6, 31), (36, 1)]:  # pieces starting mid-word (37 * 130 is not / 4)
        assert torch.equal(R.cpu_keep_mask(5, rows, 130, 0.3, row0=row0), whole[row0:row0 + rows]), row0


def test_pieces_path_equals_one_piece(monkeypatch):
    """Rows drawn and reduced by pieces (large inputs) give the formula's values, as one piece does."""
    from fastpeft.ops import lora_cpu
    x, w, b, a, bb = _args(37, 130, 48, 8)
    dy = torch.randn(37, 48, generator=_g(3), dtype=torch.float64)
    outs = []
    for piece in (1 << 18, 130 * 5):  # one piece; then pieces of 5 rows
        monkeypatch.setattr(lora_cpu, "_PIECE", piece)
        y = LoRALinearCPUFunction.apply(x, w, b, a, bb, 1.5, 0.25, 99)
        outs.append([y] + list(torch.autograd.grad(y, (x, w, b, a, bb), dy)))
    assert len(lora_cpu._row_pieces(37, 130)) == 8
    for name, one, many in zip("y dX dW db dA dB".split(), *outs):
        assert_close_report(many, one, 1e-12, 1e-12, name)


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 5, 2**63 - 1])
def test_numpy_route_of_small_masks_is_the_torch_route(monkeypatch, seed):
    """Up to _NUMPY_MAX_WORDS words numpy computes the stream (uint64, logical shifts): the same bits as the
    int64 tensor ops, at any start, length and lane, up to the limit and past it."""
    cases = [(1, 0), (7, 3), (1001, 5), (5000, 123457), (4 * R._NUMPY_MAX_WORDS, 0), (4 * R._NUMPY_MAX_WORDS + 1, 2)]
    small = [R.cpu_draws(seed, n, start=start) for n, start in cases]
    monkeypatch.setattr(R, "_NUMPY_MAX_WORDS", -1)
    for (n, start), got in zip(cases, small):
        assert torch.equal(got, R.cpu_draws(seed, n, start=start)), (n, start)


def test_small_masks_follow_the_default_device():
    """device=None means torch's default device, on the numpy route as on the torch route."""
    try:
        torch.set_default_device("meta")
        small, large = R.cpu_draws(3, 10), R.cpu_draws(3, 4 * R._NUMPY_MAX_WORDS + 4)
    finally:
        torch.set_default_device(None)
    assert small.device.type == large.device.type == "meta"


def test_dropout_near_one_drops_everything_on_every_route(monkeypatch):
    """p in [1 - 2**-17, 1): the 16-bit threshold is 2**16, every element dropped, whether the numpy route, the
    torch route (a tensor seed, a mask past the numpy limit) or the compiled form draws it."""
    p = 1 - 2**-18
    assert not R.cpu_keep_mask(5, 3, 100, p).any()
    assert not R.cpu_keep_mask(torch.tensor([5]), 3, 100, p).any()
    monkeypatch.setattr(R, "_NUMPY_MAX_WORDS", -1)
    assert not R.cpu_keep_mask(5, 3, 100, p).any()
    assert not torch.compile(lambda: R.cpu_keep_mask(5, 3, 100, p), fullgraph=True, backend="aot_eager")().any()


def test_inductor_with_an_int_seed_equals_eager():
    """An explicit int seed under inductor: the CPU stream's counter is kept out of inductor's index expressions
    (a constant key there overflowed int64 at compile time); the compiled layer gives eager's output."""
    x, w, b, a, bb = _args(7, 48, 40, 8, dtype=torch.float32, grad_base=False)

    def fn(x, a):
        return fastpeft.lora_linear(x, w, b, a, bb, 0.7, dropout_p=0.2, seed=5, backend="reference")
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x, a)
    assert_close_report(got, fn(x, a), 1e-5, 1e-5, "y")


def test_float64_stays_float64_under_autocast():
    """Autocast casts no float64 tensor (its own rule, as F.linear under it): the CPU path neither."""
    x, w, b, a, bb = (t.detach() for t in _args(5, 48, 40, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastpeft.lora_linear(x, w, b, a, bb, 0.7, backend="reference")
    assert y.dtype == torch.float64
    assert_close_report(y, R.lora_linear_ref(x, w, b, a, bb, 0.7), 1e-12, 1e-12, "y")


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_torch_func_transforms_equal_eager(p):
    """torch.func.grad and vmap over the reference backend on CPU tensors: a plain autograd composition runs there
    (the CPU path's Functions define no setup_context), with the same CPU-stream mask: the gradient equals eager's;
    without dropout the per-sample gradients add up to it."""
    x, w, b, a, bb = (t.detach() for t in _args(4, 12, 9, 3))

    def loss(a, xi):
        return fastpeft.lora_linear(xi, w, b, a, bb, 0.7, p, seed=3, backend="reference").square().sum()
    g = torch.func.grad(loss)(a, x)
    a_ = a.clone().requires_grad_()
    want, = torch.autograd.grad(loss(a_, x), a_)  # eager: the CPU path
    assert_close_report(g, want, 1e-10, 1e-10, "dA")
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(a, x[:, None])
    assert per_sample.shape == (4, *a.shape)
    if p == 0.0:
        assert_close_report(per_sample.sum(0), want, 1e-12, 1e-12, "sum of per-sample dA")


@pytest.mark.parametrize("p", [0.0, 0.2], ids=lambda p: f"p{p}")
def test_many_adapters_gradcheck_and_double_backward(p):
    """Many adapters on the CPU path (a plain autograd composition): first and second derivatives, mixed ranks,
    base-only rows and per-adapter dropout rates, fp64."""
    g = _g(7)
    x = torch.randn(5, 10, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    sa = torch.randn(3, 4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    sb = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scalings = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    ids, ranks = torch.tensor([0, 1, -1, 2, 0]), torch.tensor([4, 2, 3])
    rates = torch.tensor([0.0, p, p / 2], dtype=torch.float64) if p else None

    def fn(x, sa, sb):
        return fastpeft.lora_linear_multi(x, w, b, sa, sb, scalings, ids, ranks, dropout_p=rates, seed=3,
                                          backend="reference")
    assert torch.autograd.gradcheck(fn, (x, sa, sb))
    assert torch.autograd.gradgradcheck(fn, (x, sa, sb))


def _grads(fn, leaves, dy, dtype):
    ls = [t.to(dtype).detach().requires_grad_() for t in leaves]
    y = fn(*ls)
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in ls]


@pytest.mark.parametrize("case", ["s0.25-M4096", "p0.9-big-dy", "s16-M16-big-u"])
@pytest.mark.parametrize("op", ["lora", "rosa", "dora"])
def test_fp16_gradients_stay_finite_where_pytorchs_do(case, op):
    """fp16 on the CPU path: every scale goes into the products as their alpha, so no intermediate is a multiple
    of what autograd's own fp16 composition holds. Before 2026-12-01 dA = s vᵀx was formed as vᵀx (4 dA at
    s = 0.25: inf from |dA| ~ 16k), dB likewise, and with dropout s c (dY B) overflowed at p = 0.9 where dX did
    not (then nan through the mask). Each gradient within 2x PyTorch's own fp16 error against fp64, all finite."""
    torch.manual_seed(0)
    p, seed = 0.0, 1234
    if case == "s0.25-M4096":
        M, K, N, r, s = 4096, 64, 64, 64, 0.25
        x = torch.randn(M, K, dtype=torch.float64)
        A = torch.randn(r, K, dtype=torch.float64) / K**0.5
        B = torch.randn(N, r, dtype=torch.float64) * 0.1
        dy = 24.0 * ((x @ A.t())[:, :1] @ torch.ones(1, N, dtype=torch.float64))
    elif case == "p0.9-big-dy":
        M, K, N, r, s, p = 32, 1024, 64, 8, 2.0, 0.9
        x = 0.05 * torch.randn(M, K, dtype=torch.float64)
        A = (torch.rand(r, K, dtype=torch.float64) * 2 - 1) / K**0.5
        B = 0.05 + 0.01 * torch.randn(N, r, dtype=torch.float64)
        dy = 1200.0 * torch.ones(M, N, dtype=torch.float64) * torch.rand(M, 1, dtype=torch.float64)
    else:
        M, K, N, r, s = 16, 64, 32, 8, 16.0
        x = torch.randn(M, K, dtype=torch.float64)
        x[:, 3] = 400.0
        A = torch.randn(r, K, dtype=torch.float64) / K**0.5
        A[:, 3] = 12.0
        B = 0.01 * torch.randn(N, r, dtype=torch.float64)
        dy = 0.01 * torch.randn(M, N, dtype=torch.float64)
    if op == "dora" and p > 0:
        pytest.skip("DoRA's exact dropout mode adds drop(x) W^T: another case")
    W = torch.randn(N, K, dtype=torch.float64) / K**0.5
    c = 1.0 / (1.0 - p)
    keep = R.cpu_keep_mask(seed, M, K, p) if p else torch.ones(M, K, dtype=torch.bool)
    mag = torch.linalg.vector_norm(W + s * B @ A, dim=1) * 1.1
    if op == "dora":
        def ours(x, A, B):
            return fastpeft.dora_linear(x, W.to(x.dtype), None, A, B, mag.to(x.dtype), s, backend="reference")

        def theirs(x, A, B):  # PEFT's DoraLinearLayer written out
            w = W.to(x.dtype)
            g = (mag.to(x.dtype) / torch.linalg.norm(w + s * (B @ A), dim=1).detach()).view(1, -1)
            base = F.linear(x, w)
            return base + (g - 1) * base + g * F.linear(F.linear(x, A), B) * s
    else:
        idx = torch.tensor([3, 70, 200])
        vals = torch.zeros(3, dtype=torch.float64)

        def ours(x, A, B):
            if op == "rosa":
                return fastpeft.lora_sparse_linear(x, W.to(x.dtype), None, A, B, s, idx, vals.to(x.dtype), 1,
                                                   dropout_p=p, training=True, seed=seed, backend="reference")
            return fastpeft.lora_linear(x, W.to(x.dtype), None, A, B, s, dropout_p=p, training=True, seed=seed,
                                        backend="reference")

        def theirs(x, A, B):
            return F.linear(x, W.to(x.dtype)) + s * F.linear(F.linear(x * keep.to(x.dtype) * c, A), B)
    exact = _grads(theirs, (x, A, B), dy, torch.float64)
    got = _grads(ours, (x, A, B), dy, torch.float16)
    same = _grads(theirs, (x, A, B), dy, torch.float16)
    for name, g_, s_, e_ in zip(("y", "dX", "dA", "dB"), got, same, exact):
        assert torch.isfinite(s_).all(), f"{name}: PyTorch's own fp16 is not finite here: a bad case"
        assert torch.isfinite(g_).all(), f"{op} {case} {name}: {int((~torch.isfinite(g_)).sum())} non-finite"
        err, base = (g_.double() - e_).abs().max().item(), (s_.double() - e_).abs().max().item()
        assert err <= 2 * base + 1e-3 * e_.abs().max().item(), f"{op} {case} {name}: {err:.3g} vs PyTorch {base:.3g}"
