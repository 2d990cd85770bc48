"""The ``fastpeft`` command: the toy LoRA training job trains, reports, and round-trips its adapter."""
import json
import os
import subprocess
import sys

import pytest

from fastpeft.cli import main


def test_train_job_loss_falls_and_adapter_reloads(tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = main(["--steps", "60", "--quiet", "--log-every", "20", "--json", str(out), "--save", str(tmp_path / "ad")])
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
