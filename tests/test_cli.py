"""The ``fastpeft`` command: the toy LoRA training job trains, reports, and round-trips its adapter."""
import json
import os
import subprocess
import sys

import pytest

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


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--rank", "0"])
    assert e.value.code == 2
    assert "must be a positive int" in capsys.readouterr().err


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
