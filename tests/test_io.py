"""Adapter files: round trips, the on-disk format, atomic saves, and loads that check before they touch."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import LoraConfig
from fastpeft.inject import adapter_configs
from fastpeft.io import CONFIG_NAME, WEIGHTS_NAME
from test_inject import Toy


def _toy():
    torch.manual_seed(0)
    return Toy()


def _trained(config=None, seed=1):
    m = fastpeft.inject(_toy(), config or LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(mod).__name__) for n, mod in model.named_modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_unchanged(model, snap):
    state, modules, flags = snap
    assert [(n, type(mod).__name__) for n, mod in model.named_modules()] == modules
    assert [p.requires_grad for p in model.parameters()] == flags
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


CONFIGS = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns-rslora": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                  rank_pattern={"mlp.0": 2}, alpha_pattern={r"layers\.1\..*": 32}),
    "bias-all-saved-head": LoraConfig(r=2, target_modules=["o_proj"], bias="all", modules_to_save=["lm_head"]),
    "bias-lora-only": LoraConfig(r=2, target_modules=["k_proj", "mlp.2"], bias="lora_only"),
    # overlapping keys, the first match wins (as in PEFT): sorted, "1.attn.q_proj" would come first and give
    # layer 1 alpha 60 after a round trip (before 2026-12-01 the file's pattern keys were sorted)
    "overlapping-patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                       alpha_pattern={"attn.q_proj": 2, "1.attn.q_proj": 60},
                                       rank_pattern={"attn.q_proj": 3, "1.attn.q_proj": 5}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_gives_same_outputs(tmp_path, name):
    m = _trained(CONFIGS[name])
    x = torch.randn(3, 16)
    fastpeft.save_adapter(m, tmp_path / "a")
    fresh = fastpeft.load_adapter(_toy(), tmp_path / "a").eval()
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    assert fastpeft.trainable_parameters(fresh) == fastpeft.trainable_parameters(m)
    # Loading again over the adapter now present replaces its weights in place.
    other = _trained(CONFIGS[name], seed=5)
    fastpeft.save_adapter(other, tmp_path / "b")
    fastpeft.load_adapter(fresh, tmp_path / "b")
    torch.testing.assert_close(fresh(x), other(x), rtol=0, atol=0)


def test_overlapping_patterns_keep_their_order_for_peft_too(tmp_path):
    peft = pytest.importorskip("peft")
    m = _trained(CONFIGS["overlapping-patterns"])
    assert {l.adapter_spec("default").lora_alpha for l in fastpeft.lora_layers(m).values()} == {2}
    fastpeft.save_adapter(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(_toy(), tmp_path).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(pm(x), m(x), rtol=1e-6, atol=1e-6)


def test_files_are_in_peft_format(tmp_path):
    m = _trained(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["k_proj"],
                            bias="lora_only", modules_to_save=["lm_head"]))
    fastpeft.save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "lora_only"
    assert cfg["target_modules"] == sorted(fastpeft.lora_layers(m)) and cfg["exclude_modules"] is None
    assert cfg["modules_to_save"] == ["lm_head"] and cfg["use_dora"] is False
    t = load_file(tmp_path / WEIGHTS_NAME)
    assert t["base_model.model.layers.0.attn.q_proj.lora_A.weight"].shape == (4, 16)
    assert t["base_model.model.layers.0.mlp.0.lora_B.weight"].shape == (32, 4)
    assert "base_model.model.layers.0.attn.q_proj.base_layer.bias" in t
    assert "base_model.model.lm_head.weight" in t
    assert all(k.startswith("base_model.model.") for k in t)
    assert not any("k_proj" in k for k in t)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_save_keeps_other_files_and_replaces_adapter(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "README.md").write_text("model card")
    (d / CONFIG_NAME).write_text("{}")
    fastpeft.save_adapter(_trained(), d)
    assert (d / "README.md").read_text() == "model card"
    assert json.loads((d / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folders left


def test_save_writes_in_place_and_leaves_the_rest_of_the_folder_alone(tmp_path, monkeypatch):
    """Saves write each file in place (a temporary beside it, renamed over it): an open log file in the folder keeps
    its later writes, the folder keeps its permissions, a symlinked folder's target gets the files (the link stays),
    a dangling link in the folder is no obstacle, and a save into the working directory keeps it (before
    2026-12-01 the folder was rebuilt beside itself and swapped in: all of these broke)."""
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o775)
    os.symlink("/nonexistent/blob", d / "tokenizer.json")
    log = open(d / "train.log", "w")
    log.write("step 1\n")
    log.flush()
    fastpeft.save_adapter(_trained(seed=1), d)
    log.write("step 2\n")
    log.close()
    assert (d / "train.log").read_text() == "step 1\nstep 2\n"
    assert os.stat(d).st_mode & 0o777 == 0o775 and os.path.islink(d / "tokenizer.json")
    assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "train.log"])
    store = tmp_path / "store" / "v1"
    store.mkdir(parents=True)
    os.symlink(store, tmp_path / "current")
    for seed in (1, 2):
        fastpeft.save_adapter(_trained(seed=seed), tmp_path / "current")
    assert os.path.islink(tmp_path / "current")
    want = _trained(seed=2).state_dict()
    got = fastpeft.load_adapter(_toy(), store).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.chdir(d)
    fastpeft.save_adapter(_trained(seed=3), ".")
    assert os.getcwd() == str(d) and (d / CONFIG_NAME).is_file()


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    """Two savers of one folder: the second waits for the first's lock (on the folder itself), so the folder ends
    with one save's pair of files, never one's config beside the other's weights; a save that made the folder and
    then failed removes it only while it is empty."""
    import threading
    import time

    from fastpeft.io import write_folder_atomically

    def writer(text):
        def write(path):
            with open(path, "w") as f:
                f.write(text)
        return write

    d = tmp_path / "a"
    started, release = threading.Event(), threading.Event()

    def slow_weights(path):
        started.set()
        release.wait(10)
        writer("A weights")(path)
    a = threading.Thread(target=write_folder_atomically, args=(d, {"w": slow_weights, "c": writer("A config")}))
    a.start()
    assert started.wait(10)
    b = threading.Thread(target=write_folder_atomically, args=(d, {"w": writer("B weights"), "c": writer("B config")}))
    b.start()
    time.sleep(0.3)
    assert b.is_alive() and not (d / "w").exists()  # B waits for A's lock
    release.set()
    a.join(10)
    b.join(10)
    assert ((d / "w").read_text(), (d / "c").read_text()) == ("B weights", "B config")

    def boom(path):
        (e / "other").write_text("another saver's file")  # something else arrived in the new folder meanwhile
        raise OSError("disk full")
    e = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(e, {"w": boom})
    assert sorted(p.name for p in e.iterdir()) == ["other"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_during_a_save_does_not_hold_the_folder_lock(tmp_path):
    """flock belongs to the open file description, which fork duplicates: a process forked while a save held the
    lock (a DataLoader worker started by another thread) kept it until it exited, and the next save waited for it.
    Children close their copies (os.register_at_fork)."""
    import threading

    from fastpeft.io import write_folder_atomically

    child = []

    def write_and_fork(path):
        with open(path, "w") as f:
            f.write("{}")
        pid = os.fork()
        if pid == 0:
            import time
            time.sleep(3)
            os._exit(0)
        child.append(pid)

    write_folder_atomically(tmp_path, {"c.json": write_and_fork})
    done = threading.Event()
    threading.Thread(target=lambda: (write_folder_atomically(tmp_path, {"x.json": lambda p: open(p, "w").close()}),
                                     done.set()), daemon=True).start()
    try:
        assert done.wait(2.0), "the second save waited for the forked process"
    finally:
        os.waitpid(child[0], 0)


def test_failed_save_leaves_directory_as_it_was(tmp_path, monkeypatch):
    d = tmp_path / "adapter"
    fastpeft.save_adapter(_trained(seed=1), d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        fastpeft.save_adapter(_trained(seed=2), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_unknown_adapter_name(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_name 'other' is not an adapter of this model; it has \['default'\]"):
        fastpeft.save_adapter(_trained(), tmp_path, adapter_name="other")


def test_adapter_name_and_trainable_flag(tmp_path):
    fastpeft.save_adapter(_trained(), tmp_path)
    m = fastpeft.load_adapter(_toy(), tmp_path, adapter_name="sql", trainable=False)
    assert all(lay.adapter_names == ["sql"] for lay in fastpeft.lora_layers(m).values())
    assert fastpeft.trainable_parameters(m)[0] == 0
    fastpeft.save_adapter(m, tmp_path / "again", adapter_name="sql")


def test_load_dtypes_follow_peft(tmp_path):
    """An fp32 file on a bf16 model: fp32 factors, bit for bit the file's (PEFT's from_pretrained keeps them fp32
    too), or with autocast_adapter_dtype=False cast to the model's dtype; on an fp64 model fp64 factors."""
    fastpeft.save_adapter(_trained(), tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    m = fastpeft.load_adapter(_toy().to(torch.bfloat16), tmp_path)
    for name, lay in fastpeft.lora_layers(m).items():
        assert lay.lora_A.dtype == torch.float32 and lay.weight.dtype == torch.bfloat16
        assert torch.equal(lay.lora_A, saved[f"base_model.model.{name}.lora_A.weight"])
    m = fastpeft.load_adapter(_toy().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert all(lay.lora_A.dtype == torch.bfloat16 for lay in fastpeft.lora_layers(m).values())
    m = fastpeft.load_adapter(_toy().double(), tmp_path)
    assert all(lay.lora_A.dtype == torch.float64 for lay in fastpeft.lora_layers(m).values())


# ---- loads that must fail, leaving the model exactly as it was -------------------------------------

def _saved(tmp_path):
    fastpeft.save_adapter(_trained(), tmp_path)
    return tmp_path


def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    t = load_file(d / WEIGHTS_NAME)
    fn(t)
    save_file(t, d / WEIGHTS_NAME)


def _bad_adapters():
    key = "base_model.model.layers.0.attn.q_proj.lora_A.weight"
    return {
        "missing-dir": (lambda d: d / "nope", FileNotFoundError, "no adapter_config.json"),
        "missing-weights": (lambda d: (d / WEIGHTS_NAME).unlink() or d, FileNotFoundError, WEIGHTS_NAME),
        "pickle-only": (lambda d: ((d / WEIGHTS_NAME).unlink(), (d / "adapter_model.bin").write_bytes(
            pickle.dumps({"x": 1})))[0] or d, ValueError, "pickle"),
        "truncated": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:100]) and d,
                      ValueError, "not a readable safetensors file"),
        "bad-json": (lambda d: (d / CONFIG_NAME).write_text("{r: 8") and d, ValueError, "not valid JSON"),
        "wrong-peft-type": (lambda d: _edit_config(d, peft_type="PREFIX_TUNING") or d, ValueError, "peft_type"),
        "dora": (lambda d: _edit_config(d, use_dora=True) or d, ValueError, "use_dora"),
        # (a "pissa" / "olora" file loads: W - s B0 A0 computed again from W, as PEFT's load does; a randomized one not)
        "pissa_niter": (lambda d: _edit_config(d, init_lora_weights="pissa_niter_4") or d, ValueError,
                        "init_lora_weights='pissa_niter_4'.*randomized SVD"),
        # (lora_bias is read since 2026-12-02: a config saying so over a file without B's biases misses them)
        "lora_bias-without-biases": (lambda d: _edit_config(d, lora_bias=True) or d, ValueError,
                                     "missing keys.*lora_B.bias"),
        "target_parameters": (lambda d: _edit_config(d, target_parameters=["mlp.experts.down_proj"]) or d,
                              ValueError, "target_parameters .*matched no parameter"),
        # a variant fastpeft does not know by name (gradients only: nothing in the file would show it)
        "velora": (lambda d: _edit_config(d, velora_config={"num_groups": 64, "scale": 1.0}) or d, ValueError,
                   "LoRA variants .*'velora_config'"),
        "ensure_weight_tying-on-embeddings": (lambda d: _edit_config(d, ensure_weight_tying=True, target_modules=[
            "q_proj", "lm_head"]) or d, ValueError, "ensure_weight_tying on \\['lm_head'\\]"),
        "bad-rank-in-config": (lambda d: _edit_config(d, r=0) or d, ValueError, "r must be a positive int"),
        "targets-not-in-model": (lambda d: _edit_config(d, target_modules=["c_attn"]) or d, ValueError, "matched no"),
        "missing-key": (lambda d: _edit_weights(d, lambda t: t.pop(key)) or d, ValueError, "missing keys"),
        "unexpected-key": (lambda d: _edit_weights(d, lambda t: t.update(
            {"base_model.model.extra.lora_A.weight": torch.zeros(1)})) or d, ValueError, "unexpected keys"),
        "wrong-shape": (lambda d: _edit_weights(d, lambda t: t.update({key: torch.zeros(4, 15)})) or d,
                        ValueError, r"must have shape \(4, 16\)"),
        "int-tensor": (lambda d: _edit_weights(d, lambda t: t.update({key: torch.zeros(4, 16, dtype=torch.int32)}))
                       or d, ValueError, "floating point"),
        "rank-mismatch": (lambda d: _edit_config(d, rank_pattern={"q_proj": 2}) or d, ValueError, r"shape \(2, 16\)"),
    }


@pytest.mark.parametrize("case", list(_bad_adapters()))
@pytest.mark.parametrize("into", ["fresh", "injected"])
def test_bad_adapter_raises_and_leaves_model_unchanged(tmp_path, case, into):
    make, exc, msg = _bad_adapters()[case]
    d = make(_saved(tmp_path))
    model = _toy() if into == "fresh" else _trained(seed=9)
    snap = _snapshot(model)
    if case == "pissa_niter" and into == "injected":  # into the model's own adapter of that name (a Trainer resume):
        fastpeft.load_adapter(model, d)               # a plain load of its weights, whatever the init
        assert fastpeft.lora_layers(model)["layers.0.attn.q_proj"].lora_A.abs().sum() > 0
        return
    with pytest.raises(exc, match=msg):
        fastpeft.load_adapter(model, d)
    _assert_unchanged(model, snap)


def test_fan_in_fan_out_flag_is_read_from_each_module(tmp_path):
    """A file's fan_in_fan_out=True over nn.Linear targets loads as PEFT loads it (PEFT sets each layer's flag from
    its base module: False on an nn.Linear, True on a transformers Conv1D): the same outputs as without the flag.
    Before 2026-12-01 the flag was refused (GPT-2 files could not load)."""
    m = _trained()
    fastpeft.save_adapter(m, tmp_path / "a")
    _edit_config(tmp_path / "a", fan_in_fan_out=True)
    x = torch.randn(2, 5, 16)
    loaded = fastpeft.load_adapter(_toy(), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_loading_over_same_name_with_other_shapes_leaves_model(tmp_path):
    fastpeft.save_adapter(_trained(LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), tmp_path)
    model = _trained()  # r=4 on the same modules
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"rank 2, the model's adapter 'default' has rank 4 there"):
        fastpeft.load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


_QV = ["q_proj", "v_proj"]
_SPARSE_KINDS = {"lora": {}, "rosa-flat": dict(sparse_density=0.1), "rosa-blocks4": dict(sparse_density=0.1,
                                                                                           sparse_block_size=4)}


@pytest.mark.parametrize("file,model", [("rosa-flat", "lora"), ("lora", "rosa-flat"), ("rosa-blocks4", "rosa-flat")])
def test_loading_over_same_name_with_another_sparse_delta_leaves_model(tmp_path, file, model):
    """A file over an adapter of the same name whose sparse delta (RoSA) differs, present or absent or of another
    block size, is refused before anything changes: the alphas, the recorded config and the outputs stay (a LoRA
    file used to leave the old delta in place, and a RoSA file to change the alphas before failing)."""
    fastpeft.save_adapter(_trained(LoraConfig(r=4, lora_alpha=32, target_modules=_QV, **_SPARSE_KINDS[file])), tmp_path)
    m = _trained(LoraConfig(r=4, lora_alpha=8, target_modules=_QV, **_SPARSE_KINDS[model]))
    snap, config = _snapshot(m), adapter_configs(m)["default"]
    scalings = {n: layer.scaling for n, layer in fastpeft.lora_layers(m).items()}
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        before = m(x)
    with pytest.raises(ValueError, match="sparse delta.*the model's adapter 'default' has .*load it under another"):
        fastpeft.load_adapter(m, tmp_path)
    _assert_unchanged(m, snap)
    assert adapter_configs(m)["default"] == config
    assert {n: layer.scaling for n, layer in fastpeft.lora_layers(m).items()} == scalings
    with torch.no_grad():
        assert torch.equal(m(x), before)
    fastpeft.load_adapter(m, tmp_path, adapter_name="other")  # under another name it loads
    fastpeft.set_adapter(m, "other")
    want = fastpeft.load_adapter(_toy(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), want(x))


def test_second_adapter_loads_beside_the_first(tmp_path):
    other = _trained(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]), seed=3)
    fastpeft.save_adapter(other, tmp_path)
    model = _trained()
    x = torch.randn(2, 3, 16)
    y_default = model(x)
    fastpeft.load_adapter(model, tmp_path, adapter_name="second")
    assert fastpeft.active_adapter(model) == "default"
    torch.testing.assert_close(model(x), y_default)  # loaded beside, not activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".second"))
    fastpeft.set_adapter(model, "second")
    torch.testing.assert_close(model(x), other(x))
    fastpeft.save_adapter(model, tmp_path / "again", adapter_name="second")
    assert load_file(tmp_path / "again" / WEIGHTS_NAME).keys() == load_file(tmp_path / WEIGHTS_NAME).keys()
    with pytest.raises(ValueError, match="already exists|rank"):
        fastpeft.inject(model, LoraConfig(target_modules=["q_proj"]), adapter_name="second")


def test_load_adapter_takes_a_hub_repo_id(tmp_path, monkeypatch):
    """A Hub repo id (owner/name) is downloaded with huggingface_hub.snapshot_download (revision, subfolder passed as
    PEFT's from_pretrained takes them), then loaded; a failed download names the repo and the reason. Before
    2026-12-01 only local folders loaded ('no adapter_config.json in adapter directory')."""
    hub = pytest.importorskip("huggingface_hub")
    src = _trained()
    fastpeft.save_adapter(src, tmp_path / "snapshot" / "sub")
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    x = torch.randn(2, 3, 16)
    model = fastpeft.load_adapter(_toy(), "someone/my-lora", revision="v1", subfolder="sub").eval()
    assert calls == [("someone/my-lora", "v1", ["sub/*"])]
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))

    def offline(repo_id, **kw):
        raise OSError("no network")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/other' is no folder here.*Hub failed: OSError: no network"):
        fastpeft.load_adapter(_toy(), "someone/other")
    with pytest.raises(TypeError, match="revision must be a str"):
        fastpeft.load_adapter(_toy(), tmp_path / "snapshot" / "sub", revision=3)
