"""The ``fastpeft`` command: the toy LoRA training job trains, reports, and round-trips its adapter."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastpeft.cli import main


def test_train_job_loss_falls_and_adapter_reloads(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["--steps", "60", "--max-seconds", "600", "--quiet", "--log-every", "20", "--json", str(out),
               "--save", str(tmp_path / "ad")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "trainable params: " in text and " || all params: " in text and "trainable%: " in text
    result = json.loads(out.read_text())
    losses = [loss for _, loss in result["history"]]
    assert result["steps"] == 60 and len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    assert result["reload_matches"] is True
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "fastpeft", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout


@pytest.mark.parametrize("argv,words", [
    (["train", "--rank", "0"], "must be a positive int"),
    (["train", "--lr", "-1"], "--lr: must be a positive number, got -1"),
    (["train", "--max-seconds", "-5"], "--max-seconds: must be a positive number"),
    (["train", "--dropout", "1.5"], "--dropout: must be in [0, 1), got 1.5"),
    (["bench", "--ranks", "-3"], "--ranks: must be a positive int, got -3"),
    (["bench", "--tokens", "0"], "--tokens: must be a positive int, got 0"),
    (["bench", "--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    (["bench", "multi", "--adapters", "0"], "--adapters: must be a positive int"),
    (["bench", "sparse", "--density", "200"], "--density: must be in (0, 1]"),
    (["bench", "sparse", "--density", "0"], "--density: must be in (0, 1]"),
    (["bench", "doraa"], "unknown bench 'doraa': one of lora, multi, sparse, qlora"),
    (["bench", "--shapes", "0x80"], "--shapes: must be KxN with K and N positive, got '0x80'"),
    (["bench", "--shapes", "4x"], "--shapes: must be KxN, two positive ints"),
    (["bench", "--rep-ms", "0"], "--rep-ms: must be a positive number, got 0"),
    (["bench", "--warmup-ms", "-5"], "--warmup-ms: must be a number >= 0, got -5"),
    (["bench", "sparse", "--lora-rank", "-1"], "--lora-rank: must be an int >= 0, got -1"),
    (["bench", "--json", "/nonexistent-dir/x.json"], "--json: the folder '/nonexistent-dir' of"),
    (["bench", "--markdown", "/nonexistent-dir/x.md"], "--markdown: the folder '/nonexistent-dir' of"),
    (["bench", "--plot", "/nonexistent-dir/x.png"], "--plot: the folder '/nonexistent-dir' of"),
    (["bench", "--json", "."], "--json: '.' is a folder"),
    (["bench", "plot", "x.json", "--out", "/nonexistent-dir/x.png"], "--out: the folder '/nonexistent-dir' of"),
    (["train", "--json", "/nonexistent-dir/x.json"], "--json: the folder '/nonexistent-dir' of"),
    (["demo", "--json", "/nonexistent-dir/d.json"], "--json: the folder '/nonexistent-dir' of"),
    (["demo", "--plot", "/nonexistent-dir/d.png"], "--plot: the folder '/nonexistent-dir' of"),
    (["demo", "--device", "foo"], "--device: not a torch device: 'foo'"),
    (["demo", "--lm-dropout", "1.5"], "--lm-dropout: must be in [0, 1), got 1.5"),
    (["demo", "--lm-lr", "0"], "--lm-lr: must be a positive number, got 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_exit_2(capsys, argv, words):
    """A bad option value is argparse's error (exit 2, naming the option), never a traceback or a table of
    failed rows."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device is there")
def test_demo_refuses_cuda_without_a_device_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "cuda"])
    assert e.value.code == 2 and "--device: 'cuda': this torch has no CUDA device" in capsys.readouterr().err


def test_bench_multi_with_nothing_to_time_says_so(capsys):
    with pytest.raises(SystemExit, match="--decode and --prefill are both empty"):
        main(["bench", "multi", "--decode", "--prefill", "--shape", "48x80", "--quiet"])


def test_output_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """``write_text_atomic`` / ``save_figure_atomic``: a write that fails half way (a full disk) leaves the previous
    file as it was and no temporary beside it (before 2026-12-01 --plot wrote in place, a failed --json left its
    temporary)."""
    import builtins

    from fastpeft import _cli
    path = tmp_path / "t.json"
    path.write_text("old")
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, text):
            self.f.write(text[:3])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: Full(real_open(p, *a, **k)) if str(p).endswith(".json")
                        and "tmp" in str(p) else real_open(p, *a, **k))
    with pytest.raises(OSError, match="No space left"):
        _cli.write_text_atomic(str(path), "new text")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    _cli.write_text_atomic(str(path), "new text")
    assert path.read_text() == "new text" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]

    class Figure:  # savefig writes part of the file, then fails
        def savefig(self, p, **kw):
            assert p.endswith(".png")  # the temporary keeps the extension: matplotlib picks the format by it
            with real_open(p, "wb") as f:
                f.write(b"\x89PNG")
            raise OSError(28, "No space left on device")
    png = tmp_path / "t.png"
    png.write_bytes(b"old png")
    with pytest.raises(OSError):
        _cli.save_figure_atomic(Figure(), str(png), dpi=120)
    assert png.read_bytes() == b"old png" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.png"]


def test_the_commands_write_through_the_atomic_writers(tmp_path, monkeypatch):
    """The bench's plots and the train job's --json go through _cli's atomic writers (before 2026-12-01 savefig and
    open() wrote in place)."""
    import sys

    from fastpeft import cli
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import harness
    seen = []
    real_fig, real_text = harness.save_figure_atomic, cli.write_text_atomic
    monkeypatch.setattr(harness, "save_figure_atomic", lambda fig, path, **kw: seen.append(path) or real_fig(fig, path,
                                                                                                           **kw))
    monkeypatch.setattr(cli, "write_text_atomic", lambda path, text: seen.append(path) or real_text(path, text))
    rows = [{"M": 1, "provider": "linear", "vs_linear": 1.0}, {"M": 1, "provider": "lora", "vs_linear": 1.2}]
    harness.plot_ratios(rows, str(tmp_path / "p.png"), "t")
    assert main(["train", "--steps", "2", "--max-seconds", "5", "--quiet", "--json", str(tmp_path / "t.json")]) == 0
    assert seen == [str(tmp_path / "p.png"), str(tmp_path / "t.json")]


def test_bench_table_json_markdown_plot(tmp_path, capsys):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    rc = main(["bench", "--tokens", "64", "--shapes", "96x80", "--ranks", "8", "--dropout", "0", "0.1",
               "--warmup-ms", "1", "--rep-ms", "5", "--quiet", "--json", str(js), "--markdown", str(md),
               "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "No GPU here" in out and "x nn.Linear" in out and "torch " in out
    data = json.loads(js.read_text())
    assert {"device", "torch", "triton", "date"} <= set(data["environment"])
    rows = data["rows"]
    assert {r["provider"] for r in rows} >= {"linear", "reference"}
    assert {(r["p"], r["mode"]) for r in rows} == {(p, m) for p in (0.0, 0.1) for m in ("fwd", "fwd+bwd")}
    assert all(r["vs_linear"] == 1.0 for r in rows if r["provider"] == "linear")
    assert all(r["ms"] > 0 for r in rows)
    assert md.read_text().startswith("# LoRA linear") and png.stat().st_size > 1000
    # the same chart drawn later from the JSON alone (a device run's tables, plotted here)
    again = tmp_path / "again.png"
    assert main(["bench", "plot", str(js), "--out", str(again)]) == 0 and again.stat().st_size > 1000


def _bench_json(path, baseline="linear", partial=None, **over):
    rows = [dict(M=m, K=64, N=64, mode="fwd", provider=prov, ms=t, **{f"vs_{baseline}": t / base})
            for m, base in ((16, 1.0), (64, 2.0)) for prov, t in ((baseline, base), ("fastpeft", 1.2 * base))]
    data = {"environment": {"device": "CPU test"}, "rows": rows, **over}
    if partial:
        data["partial"] = partial
    path.write_text(json.dumps(data))
    return path


def test_bench_plot_draws_each_json_beside_it(tmp_path, capsys):
    one = _bench_json(tmp_path / "bench_lora.json")
    two = _bench_json(tmp_path / "bench_multi.json", baseline="single", partial="3 rows; stopped")
    data = json.loads(two.read_text())  # bench multi's rows also carry vs_linear (= vs_single): the own one wins
    two.write_text(json.dumps({**data, "rows": [{**r, "vs_linear": r["vs_single"]} for r in data["rows"]]}))
    assert main(["bench", "plot", str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "ratios to linear" in out and "ratios to single" in out
    assert (tmp_path / "bench_lora.png").stat().st_size > 1000 and (tmp_path / "bench_multi.png").stat().st_size > 1000


@pytest.mark.parametrize("content,words", [
    (None, ["missing.json", "cannot read it"]),
    ("{not json", ["bad.json", "not JSON"]),
    (json.dumps({"rows": []}), ["bad.json", "non-empty list of rows", "0 rows"]),
    (json.dumps([1, 2]), ["bad.json", "non-empty list of rows", "got NoneType"]),
    (json.dumps({"rows": [{"provider": "linear", "ms": 1.0}]}), ["bad.json", "'vs_<baseline>'", "got ratio columns []"]),
], ids=["missing", "not-json", "no-rows", "not-a-table", "no-ratio"])
def test_bench_plot_bad_files_name_the_file_and_write_nothing(tmp_path, content, words):
    good = _bench_json(tmp_path / "good.json")
    bad = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "plot", str(good), str(bad)])
    assert all(w in str(exc.value) for w in words), str(exc.value)
    assert not list(tmp_path.glob("*.png"))  # every file is checked before any chart is written
    with pytest.raises(SystemExit, match="--out takes one JSON file, got 2"):
        main(["bench", "plot", str(good), str(good), "--out", str(tmp_path / "x.png")])


def test_bench_multi_table(tmp_path, capsys):
    js = tmp_path / "m.json"
    rc = main(["bench", "multi", "--decode", "4", "--prefill", "1024", "--adapters", "1", "3", "--ranks", "mixed",
               "--shape", "64x48", "--warmup-ms", "1", "--rep-ms", "5", "--quiet", "--json", str(js),
               "--markdown", str(tmp_path / "m.md")])
    assert rc == 0
    assert "ratios to one adapter on the same rows" in capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert {(r["phase"], r["M"], r["adapters"]) for r in rows} == {(ph, m, n) for ph, m in (("decode", 4),
                                                                    ("prefill", 1024)) for n in (1, 3)}
    assert {r["provider"] for r in rows} >= {"single", "reference"}
    assert all(r["vs_single"] == 1.0 for r in rows if r["provider"] == "single")


def test_bench_moe_table(tmp_path, capsys):
    """``fastpeft bench moe``: the experts module, PEFT's ParamWrapper and the accelerated model side by side, the
    fastpeft rows checked against PEFT's."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    js = tmp_path / "moe.json"
    rc = main(["bench", "moe", "--tokens", "5", "--experts", "4", "--top-k", "2", "--shapes", "32x16", "--ranks", "4",
               "--warmup-ms", "1", "--rep-ms", "5", "--quiet", "--json", str(js)])
    assert rc == 0
    assert "ratios to the experts module without LoRA" in capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("fwd", "fwd+bwd")
                                                          for p in ("experts", "peft", "fastpeft")}
    assert all(r["rel_err"] < 1e-5 and r["err_vs"] == "peft" for r in rows if r["provider"] == "fastpeft")
