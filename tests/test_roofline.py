"""benchmarks/roofline.py: the bytes / flops model the device runs are read against is self-consistent."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import roofline as R  # noqa: E402

M, K, N, r = 8192, 4096, 4096, 16


def test_gemm_bytes_and_flops():
    c = R.gemm("g", "", M, K, N)
    assert c.bytes == (M * K + K * N + M * N) * 2
    assert c.flops == 2 * M * K * N
    assert R.gemm("g", "", 3, 5, 7, itemsize=4, out_itemsize=2).bytes == (15 + 35) * 4 + 21 * 2


def test_lora_kernels_add_exactly_their_low_rank_traffic():
    lin, lo = R.linear_costs(M, K, N), R.lora_costs(M, K, N, r)
    fused, linear = lo["fwd"][1], lin["fwd"][0]
    assert fused.flops - linear.flops == 2 * M * r * N
    assert fused.bytes - linear.bytes == M * r * 4 + N * r * 2  # u (fp32) and B
    dx = lo["bwd"][-1]
    assert dx.bytes - lin["bwd"][0].bytes == M * r * 4 + r * K * 2  # v (fp32) and A
    shrink = lo["fwd"][0]
    assert shrink.bytes == (M * K + r * K) * 2 + M * r * 4 and shrink.flops == 2 * M * K * r


def test_fused_dy_pass_saves_one_read_of_dy_less_its_partials():
    two = R.lora_costs(M, K, N, r)["bwd"][:2]
    one, sums = R.lora_costs(M, K, N, r, fused_dy_pass=True)["bwd"][:2]
    _, rows, split = R.dy_pass_layout(M, N, r)
    assert (rows, split) == (32, 5)
    parts = (split * M * r + rows * N * r) * 4  # fp32 partials: v per column chunk, dB per row block
    # The shrinks read dY twice and u once, write v (fp32) and dB; the pass reads dY and u once, writes partials.
    assert sum(c.bytes for c in two) - one.bytes == M * N * 2 + M * r * 4 + N * r * 2 - parts
    assert sums.bytes == parts + (M + N) * r * 4  # read back, v and dB written in fp32
    assert sum(c.flops for c in two) == one.flops
    assert one.bytes + sums.bytes < 0.7 * sum(c.bytes for c in two)


@pytest.mark.parametrize("m,n,rank", [(8192, 4096, 16), (8192, 14336, 16), (1, 4096, 16), (64, 4096, 64),
                                      (100, 130, 24), (5000, 300, 128)])
def test_dy_pass_layout_is_the_launchers(monkeypatch, m, n, rank):
    """The model cuts dY as kernels/lora.py's launcher does on a GPU of R.SMS SMs."""
    pytest.importorskip("triton")
    from fastpeft.kernels import lora as L

    monkeypatch.setattr(L, "_use_explicit_blocks", lambda t: False)
    monkeypatch.setattr(L, "_sm_count", lambda index: R.SMS)
    block_m = L.dy_pass_block_m(m, L.r_pad(rank))
    rows = -(-m // block_m)
    split = L.split_chunk(n, L.dy_pass_split(L.torch.empty(1), rows, n, L._DY_PASS_N_ALIGN), L._DY_PASS_N_ALIGN)[1]
    assert R.dy_pass_layout(m, n, rank) == (block_m, rows, split)


def test_roofline_time_and_bound():
    big, decode = R.linear_costs(M, K, N)["fwd"][0], R.linear_costs(1, K, N)["fwd"][0]
    for card, peak in R.CARDS.items():
        assert big.bound(card) == "compute"
        assert big.seconds(card) == pytest.approx(big.flops / peak["flops"])
        assert decode.bound(card) == "memory"
        assert decode.seconds(card) == pytest.approx(decode.bytes / peak["bandwidth"])
    assert decode.seconds("H200") < decode.seconds("H100-SXM")  # more bandwidth, same flops
    assert big.seconds("H200") == big.seconds("H100-SXM")


@pytest.mark.parametrize("shape", R.TARGET_SHAPES, ids=[f"M{m}-K{k}-N{n}-r{rr}" for m, k, n, rr in R.TARGET_SHAPES])
def test_lora_never_beats_linear_and_totals_add_up(shape):
    for card in R.CARDS:
        s = R.summary(*shape, card)
        assert 1.0 < s["fwd ratio"] < 1.2 and 1.0 < s["fwd+bwd ratio"] < 1.3 and 1.0 < s["one dY pass ratio"] < 1.3
        assert s["best fwd+bwd ratio"] == min(s["fwd+bwd ratio"], s["one dY pass ratio"])
        lo = R.lora_costs(*shape)
        assert s["lora fwd"] == pytest.approx(sum(c.seconds(card) for c in lo["fwd"]) * 1e6)


def test_main_writes_the_table(tmp_path):
    out = tmp_path / "roofline.md"
    R.main(["--tokens", "64", "--shapes", "4096x4096", "--ranks", "16", "--out", str(out)])
    text = out.read_text()
    assert "computed, not measured" in text and "| 64 | 4096 | 4096 | 16 | fused GEMM |" in text
