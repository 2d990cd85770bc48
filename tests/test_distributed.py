"""Data-parallel training of an injected model: DDP and FSDP2 (``fully_shard``), gloo, 2 CPU processes.

Two ranks are spawned once (a module-scoped fixture) and run every case in turn, each in a fresh
process group: each rank trains its half of every global batch for ``STEPS`` SGD steps, then rank 0
hands back the trainable parameters (whole: FSDP2's shards are gathered with ``DTensor.full_tensor()``),
the wrapped model's eval logits and an adapter written by ``fastpeft.save_adapter`` (every rank calls it, rank 0
alone writes; FSDP2's shards are gathered). The tests compare them, in this
process, with a single-process run. The ``-mixed`` case trains one of two adapters of different ranks
under FSDP2 with batches routed per sequence (``fastpeft.mixed_batch``).

What equality holds, and why. A LoRA dropout mask is a pure function of ``(seed, flat position)``:
element (m, k) of the input viewed as (M, K) uses Philox draw ``m * K + k`` of the seed
(``fastpeft/reference.py``), and the seed is drawn per layer call from torch's default CPU generator
(``functional.draw_seed``). Every rank seeds that generator alike and makes the same calls, so all
ranks draw the same seeds, and position m of a rank's shard is position m of that shard, not of the
global batch. So:

- ``lora_dropout=0``: a 2-rank step equals a single-process step on the whole global batch (loss a
  mean over the global batch: the ranks average equal-size halves).
- ``lora_dropout>0``: rank r's rows get the masks of rows 0..B/2-1 of the same call in one process,
  not those of rows r*B/2.. . A 2-rank step equals a single-process step over the global batch in 2
  micro-batches (gradient accumulation, each loss / 2) where each micro-batch's forward starts from
  the generator state the step started with (``_train(..., micro_batches=2)``). It does not equal the
  plain global-batch step; ``test_dropout_mask_follows_local_rows`` pins that down without processes.
  Matching the global batch's masks exactly would need a row offset in the mask's counter.
"""
import datetime
import os
import sys
import time
import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from conftest import assert_close_report

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
STEPS = 3
BATCH, SEQ, VOCAB, DIM, HEADS, HIDDEN = 4, 6, 29, 16, 2, 37  # HIDDEN odd: FSDP2 shards unevenly
LR = 0.5
DROPOUT_SEED = 1234
COLLECTIVE_TIMEOUT_S = 30  # a collective one rank never joins raises on the other
TIMEOUT_S = 240  # all cases, start-up included: a hang fails the tests instead of blocking CI
TARGETS = ["q", "k", "v", "o", "up", "down"]
ROUTE = ["default", "other"]  # mixed-batch cases: the adapter of even / odd sequences


class Block(nn.Module):
    """Pre-norm attention + MLP."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(b, t, HEADS, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, DIM))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _base_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def _model(dropout: float, mixed: bool = False) -> TinyLM:
    """The same base weights and LoRA init on every rank and here (seeded). ``mixed``: a frozen second
    adapter of another rank beside the trained one, for batches that route each sequence to one."""
    model = fastpeft.inject(_base_model(), fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                               target_modules=TARGETS))
    if mixed:
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                   init_lora_weights=False), adapter_name="other", activate=False)
    return model


def _batches() -> list:
    """Global batches (BATCH, SEQ + 1); their own generator, so the default one only draws dropout seeds."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _eval_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))


def _loss(model, tokens, mixed: bool = False):
    if mixed:  # sequence i of the global batch gets ROUTE[i % 2]; the halves keep that pattern
        with fastpeft.mixed_batch(model, [ROUTE[i % 2] for i in range(tokens.shape[0])]):
            logits = model(tokens[:, :-1])
    else:
        logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _train(model, batches, micro_batches: int = 1, mixed: bool = False) -> list:
    """SGD with momentum; each batch split into ``micro_batches`` whose forwards all start from the
    generator state of the step (so each draws the same dropout seeds, as the ranks do)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    torch.manual_seed(DROPOUT_SEED)
    losses = []
    for tokens in batches:
        state = torch.get_rng_state()
        total = 0.0
        for part in tokens.chunk(micro_batches):
            torch.set_rng_state(state)
            loss = _loss(model, part, mixed) / micro_batches
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- the ranks -------------------------------------------------------------------------------------

HAS_FSDP2 = hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard")
# (kind, lora_dropout, mixed): mixed = two adapters of different ranks, batches routed per sequence.
CASES = [("ddp", 0.0, False), ("ddp", 0.1, False), ("fsdp2", 0.0, False), ("fsdp2", 0.1, False),
         ("fsdp2", 0.0, True)]
CASE_IDS = [f"{kind}-p{p}" + ("-mixed" if mixed else "") for kind, p, mixed in CASES]


def _run_case(rank: int, kind: str, dropout: float, mixed: bool, case_dir: str) -> None:
    model = _model(dropout, mixed)
    if kind == "ddp":
        # Bucket views: the gradients live in DDP's buckets.
        wrapped = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    losses = _train(wrapped, [b.chunk(WORLD)[rank] for b in _batches()], mixed=mixed)
    # FSDP2 parameters are DTensors holding one shard each: gather them (a collective, every rank).
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in trained}
    sharded = [n for n, p in trained if hasattr(p, "full_tensor")]
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(_eval_tokens())
    adapter = os.path.join(case_dir, "adapter")
    # every rank calls it: FSDP2's gathers the shards; rank 0 alone writes (DDP: every rank wrote before 2026-12-01,
    # and their atomic renames raced)
    fastpeft.save_adapter(model if kind == "fsdp2" else wrapped, adapter)
    if kind != "fsdp2":  # Trainer's resume on every rank: the adapter state dict through the model's load_state_dict,
        dist.barrier()   # which writes a temporary adapter folder on each rank (rank 1 raised when rank 0 alone wrote)
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(adapter, "adapter_model.safetensors")), strict=False)
    if rank == 0:
        torch.save({"params": params, "logits": logits, "losses": losses, "sharded": sharded},
                   os.path.join(case_dir, "result.pt"))
    dist.barrier()


def _rank_main(rank: int, out_dir: str) -> None:
    """Every case in turn, each in a fresh process group; a case's error goes to its folder (a rank
    left waiting in a collective times out) and the next case still runs."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: no need to resolve the hostname
    torch.set_num_threads(1)
    for (kind, dropout, mixed), case_id in zip(CASES, CASE_IDS):
        if kind == "fsdp2" and not HAS_FSDP2:
            continue
        case_dir = os.path.join(out_dir, case_id)
        try:
            dist.init_process_group("gloo", init_method="file://" + os.path.join(case_dir, "store"), rank=rank,
                                    world_size=WORLD, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            try:
                _run_case(rank, kind, dropout, mixed, case_dir)
            finally:
                dist.destroy_process_group()
        except Exception:
            with open(os.path.join(case_dir, f"error-rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    """Spawns the 2 ranks once for all cases (process start-up and imports cost more than the runs)."""
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("distributed"))
    for case_id in CASE_IDS:
        os.makedirs(os.path.join(out_dir, case_id))
    ctx = mp.start_processes(_rank_main, args=(out_dir,), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return out_dir


@pytest.fixture(params=CASES, ids=CASE_IDS)
def run(request, runs) -> dict:
    kind, dropout, mixed = request.param
    if kind == "fsdp2" and not HAS_FSDP2:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    case_dir = os.path.join(runs, CASE_IDS[CASES.index(request.param)])
    errors = sorted(f for f in os.listdir(case_dir) if f.startswith("error-rank"))
    if errors:
        pytest.fail("\n".join(f"{e}:\n" + open(os.path.join(case_dir, e)).read() for e in errors))
    result = torch.load(os.path.join(case_dir, "result.pt"))
    result.update(kind=kind, dropout=dropout, mixed=mixed, adapter=os.path.join(case_dir, "adapter"))
    return result


@pytest.fixture(scope="module")
def single():
    """Single-process runs by (dropout, mixed): the model after training (micro_batches=WORLD with
    dropout: the ranks' semantics, see the module docstring; at p=0 the plain global batch)."""
    cache = {}

    def get(dropout, mixed=False):
        if (dropout, mixed) not in cache:
            model = _model(dropout, mixed)
            losses = _train(model, _batches(), micro_batches=WORLD if dropout > 0 else 1, mixed=mixed)
            cache[dropout, mixed] = (model, losses)
        return cache[dropout, mixed]
    return get


def test_trained_parameters_match_single_process(run, single):
    model, losses = single(run["dropout"], run["mixed"])
    expected = _trainable(model)
    assert sorted(run["params"]) == sorted(expected)
    assert len(expected) == 2 * len(TARGETS) * 2  # lora_A and lora_B of every target in both blocks
    if run["kind"] == "fsdp2":
        assert sorted(run["sharded"]) == sorted(expected), "FSDP2 should shard every trainable parameter"
    init = _trainable(_model(run["dropout"], run["mixed"]))
    for name, p in expected.items():
        assert_close_report(run["params"][name], p, rtol=1e-5, atol=1e-6, what=f"{run['kind']} {name}")
        if "lora_B" in name:
            assert (p - init[name]).abs().max() > 1e-3, f"{name} barely trained: the check would be vacuous"
    # Rank 0's loss is over its half only: the halves' mean is the global one, rank 0's alone is not.
    assert len(run["losses"]) == STEPS and all(torch.isfinite(torch.tensor(run["losses"])))


def test_saved_adapter_loads_into_fresh_model(run, single):
    """An adapter saved from the distributed run (every rank calls save_adapter, rank 0 alone writes; FSDP2's shards
    are gathered) loads into a fresh single-process model that then gives the distributed model's outputs and the
    single-process run's."""
    fresh = fastpeft.load_adapter(_base_model(), run["adapter"]).eval()
    trained, _ = single(run["dropout"], run["mixed"])
    with torch.no_grad():
        got = fresh(_eval_tokens())
        want = trained.eval()(_eval_tokens())
    assert fastpeft.read_adapter_config(run["adapter"]).lora_dropout == run["dropout"]
    assert_close_report(got, run["logits"], rtol=1e-5, atol=1e-5, what=f"{run['kind']}: loaded vs distributed")
    assert_close_report(got, want, rtol=1e-5, atol=1e-5, what=f"{run['kind']}: loaded vs single-process")


def test_dropout_runs_differ_from_plain_global_batch(single):
    """The documented limit: with dropout, the 2-rank semantics (micro_batches=2) is not the plain
    global-batch step, because rank 1's rows reuse the masks of rank 0's positions."""
    sharded, _ = single(0.1)
    plain = _model(0.1)
    _train(plain, _batches(), micro_batches=1)
    diff = max((a - b).abs().max().item() for a, b in zip(_trainable(sharded).values(), _trainable(plain).values()))
    assert diff > 1e-4


def test_dropout_mask_follows_local_rows():
    """With one seed, a shard's rows get the masks of the first rows of the global call."""
    torch.manual_seed(0)
    m, k, n, r = 8, 16, 12, 4
    x, w, a, b = torch.randn(m, k), torch.randn(n, k), torch.randn(r, k), torch.randn(n, r)
    full = fastpeft.lora_linear(x, w, None, a, b, 2.0, dropout_p=0.5, seed=7)
    top = fastpeft.lora_linear(x[: m // 2], w, None, a, b, 2.0, dropout_p=0.5, seed=7)
    bottom = fastpeft.lora_linear(x[m // 2:], w, None, a, b, 2.0, dropout_p=0.5, seed=7)
    torch.testing.assert_close(top, full[: m // 2], rtol=0, atol=0)
    keep = fastpeft.reference.cpu_keep_mask(7, m, k, 0.5)[: m // 2]  # the top rows' mask (the CPU path's stream)
    xb = x[m // 2:]
    want_bottom = xb @ w.t() + 2.0 * ((xb * keep / 0.5) @ a.t()) @ b.t()
    torch.testing.assert_close(bottom, want_bottom, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bottom, full[m // 2:])


def test_swapped_in_parameters_are_not_repointed():
    """FSDP2 swaps Parameters of its own into each layer at every forward and fills them in place (the
    all-gather). A mixed batch must read what they hold at that forward: re-pointing them, or a cached
    stack that missed the in-place write, would leave every later forward stale."""
    torch.manual_seed(0)
    layer = fastpeft.FastLoRALinear(8, 6, r=2, init_lora_weights=False)
    layer.add_adapter("other", 2, 2, init_lora_weights=False)
    layer.stacked()
    x, ids = torch.randn(2, 3, 8), torch.tensor([0, 1])
    gathered = torch.zeros(2, 8)  # stands for FSDP2's all-gather output
    layer.lora_A_adapters["default"] = swapped = nn.Parameter(gathered)
    for step, grad in enumerate((True, False, True)):
        gathered.copy_(torch.randn(2, 8))  # the next all-gather writes in place
        with torch.set_grad_enabled(grad):
            got = layer(x, ids)
        want = fastpeft.lora_linear(x[:1], layer.weight, layer.bias, gathered, layer.lora_B_adapters["default"],
                                    layer.scaling)
        assert swapped.data_ptr() == gathered.data_ptr(), "the swapped-in Parameter was re-pointed"
        assert_close_report(got[:1].detach(), want.detach(), rtol=1e-6, atol=1e-6, what=f"step {step}")
