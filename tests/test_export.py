"""Hugging Face conversions on CPU: merged checkpoints, PEFT adapters (export and import), TP resharding and
per-rank sharded loading, in every MiSS mode.

Two DeepSpeed runs (``tests/dist/export_make.py``, TP=2 and TP=4) write tiny random bases, training-checkpoint
adapters with random D and the TP models' logits; the tests convert those and compare logits. One more TP=2 run
(``tests/dist/export_load.py``) loads bases and (resharded) adapters slice by slice on meta-built models.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from miss_ds import MissConfig, adapter_io, adapter_state_dict, apply_miss
from miss_ds.hf_checkpoint import INDEX_FILE, HFCheckpoint
from miss_ds.convert.merge import merge_to_hf
from miss_ds.convert.peft import PEFT_PREFIX, read_peft_adapter, write_peft_adapter
from miss_ds.convert.reshard import reshard_adapter
from miss_ds.loading import build_model_on_meta, load_sharded_weights
from miss_ds.families import LLAMA_PLAN
from tests.conftest import tiny_llama_config
from tests.dist.export_make import MODES, STEP, input_ids
from tests.launch_utils import ROOT, deepspeed_run, result_of

ALL_MODES = list(MODES)  # the Qwen2 case of the TP=2 run is the serving tests' (test_serve.py)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids(model.config.vocab_size)).logits


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(str(directory))


@pytest.fixture(scope="module")
def runs(export_root, export_tp2, export_tp4) -> Path:
    """``<root>/tp{2,4}/<mode>/{base, checkpoints/step_00000001/adapter, logits_base.pt, logits_tp.pt}``."""
    if not (export_tp2 / "miss" / "base" / "tokenizer.json").is_file():
        _save_tokenizer(export_tp2 / "miss" / "base")
    return export_root


@pytest.fixture(scope="module")
def loaded(runs) -> dict:
    """A TP=2 run loading, per mode: the base + its TP=2 adapter, the base + the TP=4 adapter resharded to 2;
    and the miss base with zero D."""
    cases = []
    for mode in ALL_MODES:
        resharded = reshard_adapter(runs / "tp4" / mode / STEP, 2, runs / "tp4" / mode / "adapter_tp2")
        cases += [{"name": f"{mode}-tp2", "base": str(runs / "tp2" / mode / "base"),
                   "adapter": str(runs / "tp2" / mode / STEP / "adapter"), "out": str(runs / f"{mode}-tp2.pt")},
                  {"name": f"{mode}-4to2", "base": str(runs / "tp4" / mode / "base"), "adapter": str(resharded),
                   "out": str(runs / f"{mode}-4to2.pt")}]
    cases.append({"name": "zero", "base": str(runs / "tp2" / "miss" / "base"), "out": str(runs / "zero.pt")})
    proc = deepspeed_run("tests/dist/export_load.py", ["--cases", json.dumps(cases)], 2)
    result = result_of(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"ranks": result["ranks"], "root": runs}


# ----------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("mode", ALL_MODES)
def test_merged_checkpoint_loads_with_the_tp_models_logits(runs, tmp_path, mode):
    run = runs / "tp2" / mode
    out = tmp_path / "merged"
    _tool("convert_to_hf").main(["--checkpoint", str(run / STEP), "--base", str(run / "base"),
                                 "--output", str(out), "--merge", "--max-shard-size", "60KB"])
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    got = _logits(AutoModelForCausalLM.from_pretrained(out))
    _close(got, torch.load(run / "logits_tp.pt"))
    assert not torch.allclose(got, torch.load(run / "logits_base.pt"), atol=1e-3), "the adapter changed nothing"
    if mode == "miss":
        assert AutoTokenizer.from_pretrained(out)("t5 t7").input_ids == [5, 7]


def test_merge_keeps_the_base_dtype_and_rounds_once(runs, tmp_path):
    run = runs / "tp2" / "miss"
    base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base16")
    merge_to_hf(run / STEP, tmp_path / "base16", tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    _, full = adapter_io.read_full_adapter(run / STEP / "adapter")
    key = "model.layers.1.mlp.down_proj"
    w = base.get_submodule(key).weight.detach()
    in_f, out_f = w.shape[1], w.shape[0]
    from miss_ds import functional as MF
    want = MF.merge(w, full[key + ".miss_block"], MF.MissGeometry("miss", 8, 1, in_f, out_f))
    assert merged[key + ".weight"].dtype == torch.bfloat16
    assert torch.equal(merged[key + ".weight"], want)
    assert torch.equal(merged["model.norm.weight"], base.model.norm.weight.detach())


# ----------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("mode", ALL_MODES)
def test_peft_adapter_loads_with_the_tp_models_logits(runs, tmp_path, mode):
    from peft import PeftModel

    run = runs / "tp2" / mode
    _tool("convert_to_hf").main(["--checkpoint", str(run / STEP), "--base", str(run / "base"),
                                 "--output", str(tmp_path / "peft"), "--peft"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), tmp_path / "peft")
    _close(_logits(peft_model), torch.load(run / "logits_tp.pt"))
    config, tensors = read_peft_adapter(tmp_path / "peft")
    meta, full = adapter_io.read_full_adapter(run / STEP / "adapter")
    assert (config.mode, config.r, config.mini_r) == (meta["miss"]["mode"], meta["miss"]["r"], meta["miss"]["mini_r"])
    assert tensors.keys() == full.keys() and all(torch.equal(tensors[k], full[k]) for k in full)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_import_of_an_adapter_trained_with_peft(tmp_path, mode):
    """A PEFT-made MiSS adapter (random D, trained lm_head) gives the same model in miss_ds."""
    from peft import MissConfig as PeftMissConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(intermediate_size=96 if mode == "bat" else 100))  # lm_head untied
    base.save_pretrained(tmp_path / "base")
    init = {"miss": True, "mini": "mini", "bat": "bat"}[mode]
    peft_model = get_peft_model(base, PeftMissConfig(r=MODES[mode]["r"], mini_r=MODES[mode].get("mini_r", 1),
                                                     init_weights=init, target_modules=["q_proj", "down_proj"],
                                                     modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    want = _logits(peft_model)

    config, tensors = read_peft_adapter(tmp_path / "peft")
    assert config.mode == mode and config.modules_to_save == ["lm_head"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    apply_miss(model, config)
    adapter_io.load_full_adapter_into(model, tensors, "peft")
    _close(_logits(model), want)


def test_init_adapter_reads_a_peft_adapter_saved_as_bin(tmp_path):
    """PEFT's older ``.bin`` format: ``check_init_adapter`` takes it and ``load_init_adapter`` gives the PEFT model's
    logits (it used to be read as a miss_ds adapter, failing after the model was built); a LoRA adapter is refused by
    the early check, before any model is built."""
    from peft import LoraConfig, get_peft_model
    from peft import MissConfig as PeftMissConfig

    from miss_ds.convert.init_adapter import check_init_adapter, load_init_adapter
    from miss_ds.convert.peft import read_peft_config
    from miss_ds.run_config import ConfigError

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, PeftMissConfig(r=8, target_modules=["q_proj", "down_proj"],
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    want = _logits(peft_model)
    check_init_adapter(tmp_path / "peft")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    apply_miss(model, read_peft_config(tmp_path / "peft"))
    load_init_adapter(model, tmp_path / "peft")
    _close(_logits(model), want)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match=r"init_adapter=.*lora: .* of type 'LORA', not MiSS"):
        check_init_adapter(tmp_path / "lora")


def test_init_adapter_with_modules_this_run_would_not_train_is_refused(tmp_path):
    """An adapter's trained lm_head loaded into a run that keeps lm_head frozen would shape every step, yet the run's
    checkpoints would not save it: refused; a run that trains lm_head takes it."""
    from miss_ds.convert.init_adapter import load_init_adapter
    from miss_ds.run_config import ConfigError

    torch.manual_seed(0)
    trained = LlamaForCausalLM(tiny_llama_config())
    miss = MissConfig(r=8, init_weights=False, modules_to_save=["lm_head"])
    apply_miss(trained, miss)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, trained, 1)
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(trained, miss), 0, 1)
    for modules_to_save in ([], ["lm_head"]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        apply_miss(model, MissConfig(r=8, modules_to_save=modules_to_save))
        if not modules_to_save:
            with pytest.raises(ConfigError, match=r"holds trained \['lm_head.weight'\], which this run's "
                                                  r"miss.modules_to_save does not train"):
                load_init_adapter(model, adapter)
        else:
            load_init_adapter(model, adapter)
            assert torch.equal(model.lm_head.weight, trained.lm_head.weight)


def test_init_adapter_from_a_peft_export_checks_its_base(tmp_path, caplog):
    """A PEFT export records the fingerprint of the base its adapter was trained on (PEFT's config has no place for
    it), so init_adapter warns about another base as it does for a miss_ds adapter (it used to say nothing)."""
    from miss_ds import fingerprint
    from miss_ds.convert.init_adapter import load_init_adapter

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    miss = MissConfig(r=8, init_weights=False)
    apply_miss(base, miss)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, base, 1, fingerprint.of_model(base))
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(base, miss), 0, 1)
    write_peft_adapter(adapter, tmp_path / "peft", tmp_path / "base")
    for seed, warned in ((0, False), (1, True)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config())
        apply_miss(model, MissConfig(r=8))
        caplog.clear()
        with caplog.at_level("WARNING"):
            load_init_adapter(model, tmp_path / "peft")
        assert any("was trained on another base than this run's base" in r.getMessage()
                   for r in caplog.records) == warned, seed


def test_modules_to_save_are_merged_exported_and_resharded(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    miss = MissConfig(r=8, init_weights=False, modules_to_save=["lm_head"])
    apply_miss(base, miss)
    with torch.no_grad():
        base.lm_head.weight.add_(torch.randn_like(base.lm_head.weight))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, base, 1)
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(base, miss), 0, 1)
    want = _logits(base)

    stats = merge_to_hf(adapter, tmp_path / "base", tmp_path / "merged")
    assert (stats.merged, stats.replaced) == (14, 1)
    _close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), want)
    write_peft_adapter(adapter, tmp_path / "peft", tmp_path / "base")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    _close(_logits(peft_model), want)
    meta, full = adapter_io.read_full_adapter(reshard_adapter(adapter, 2, tmp_path / "tp2"))
    assert meta["layouts"]["lm_head.weight"]["dim"] is None
    assert torch.equal(full["lm_head.weight"], base.lm_head.weight.detach())


def test_modules_to_save_follow_peft_matching(tmp_path):
    """PEFT saves every module whose full name ends with an entry of modules_to_save (``str.endswith``): "mlp" takes
    each MLP with the projections below it, "norm" each ``*_layernorm`` as well as ``model.norm``. Training marks
    exactly what PEFT trains, the adapter holds it, and the PEFT export holds it under PEFT's own key names, loads
    in PEFT with the miss_ds model's logits, and imports back unchanged."""
    from peft import MissConfig as PeftMissConfig
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    targets, saved = ["q_proj", "v_proj"], ["mlp", "norm"]
    get_peft_model(copy.deepcopy(base), PeftMissConfig(r=8, target_modules=targets, modules_to_save=saved,
                                                       task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft_own")
    peft_keys = set(load_file(str(tmp_path / "peft_own" / "adapter_model.safetensors")))

    miss = MissConfig(r=8, init_weights=False, target_modules=targets, modules_to_save=saved)
    model = copy.deepcopy(base)
    apply_miss(model, miss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.layers.1.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight"} <= trainable
    assert {PEFT_PREFIX + n for n in trainable} == peft_keys
    assert set(adapter_state_dict(model, miss)) == trainable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith(".miss_block"):
                p.add_(torch.randn_like(p) * 0.1)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, model, 1)
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model, miss), 0, 1)
    assert set(adapter_io.read_full_adapter(adapter)[1]) == trainable

    write_peft_adapter(adapter, tmp_path / "peft", tmp_path / "base")
    assert set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))) == peft_keys
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    _close(_logits(peft_model), _logits(model))
    _, tensors = read_peft_adapter(tmp_path / "peft")
    assert tensors.keys() == trainable and all(torch.equal(tensors[k], model.get_parameter(k)) for k in trainable)


# ----------------------------------------------------------------------------------------------- reshard
@pytest.mark.parametrize("mode", ALL_MODES)
def test_reshard_4_to_2_is_what_a_tp2_run_writes_and_gives_the_same_logits(loaded, mode):
    root = loaded["root"]
    for rank in loaded["ranks"]:
        assert rank[f"{mode}-4to2"]["failures"] == []
    _close(torch.load(root / f"{mode}-4to2.pt"), torch.load(root / "tp4" / mode / "logits_tp.pt"))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_reshard_4_to_1_gives_the_single_device_model(runs, tmp_path, mode):
    run = runs / "tp4" / mode
    out = reshard_adapter(run / STEP, 1, tmp_path / "tp1", base=run / "base")
    meta, full = adapter_io.read_full_adapter(out)
    assert meta["tp_size"] == 1 and [p.name for p in out.glob("tp*.safetensors")] == ["tp00-of-01.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(run / "base")
    apply_miss(model, MissConfig(**meta["miss"]))
    adapter_io.load_full_adapter_into(model, full, str(out))
    _close(_logits(model), torch.load(run / "logits_tp.pt"))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_reshard_to_a_ragged_split_round_trips(runs, tmp_path, mode):
    src = runs / "tp2" / mode / STEP
    out = reshard_adapter(src, 3, tmp_path / "tp3")
    meta, full = adapter_io.read_full_adapter(out)
    _, want = adapter_io.read_full_adapter(src / "adapter")
    assert full.keys() == want.keys() and all(torch.equal(full[k], want[k]) for k in want)
    gate = meta["layouts"]["model.layers.0.mlp.gate_proj.miss_block"]
    # miss: out 100 split [34, 33, 33]; mini: replicated; bat: out 96 split [32] * 3 = 8 blocks of r=4 each.
    expected = {"miss": (1, [34, 33, 33]), "mini": (None, None), "bat": (0, [8, 8, 8])}[mode]
    assert (gate["dim"], gate["sizes"]) == expected


def test_reshard_splits_as_a_tp2_run_does_on_uneven_shards(loaded):
    """Head-aligned and grain-aligned uneven splits: reshard's layouts are those ``shard_model`` gives a TP=2 run."""
    want = {"miss": ({"dim": 1, "sizes": [32, 16]}, {"dim": 1, "sizes": [48, 52]}),
            "mini": ({"dim": None, "sizes": None}, {"dim": None, "sizes": None}),
            "bat": ({"dim": 0, "sizes": [8, 4]}, {"dim": 0, "sizes": [12, 13]})}
    for rank in loaded["ranks"]:
        for mode, (q, gate) in want.items():
            got = rank["uneven"][mode]
            assert got["equal"], mode
            assert {k: got["q"][k] for k in q} == q and {k: got["gate"][k] for k in gate} == gate, (mode, got)


def test_reshard_cli_writes_the_adapter_for_another_tp_size(runs, tmp_path, capsys):
    """The tool says training checkpoints need no resharding (they resume on any TP size) and reshards the adapter."""
    tool = _tool("reshard")
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "resume" in capsys.readouterr().out.replace("\n", " ")
    assert tool.main(["--checkpoint", str(runs / "tp4" / "miss" / STEP), "--tp", "2",
                      "--output", str(tmp_path / "out")]) == 0
    assert adapter_io.read_adapter_config(tmp_path / "out")["tp_size"] == 2


# ----------------------------------------------------------------------------------------------- loading
def test_sharded_loading_on_two_ranks(loaded):
    root, ranks = loaded["root"], loaded["ranks"]
    _close(torch.load(root / "zero.pt"), torch.load(root / "tp2" / "miss" / "logits_base.pt"))
    for mode in ALL_MODES:
        assert all(r[f"{mode}-tp2"]["failures"] == [] for r in ranks)
        _close(torch.load(root / f"{mode}-tp2.pt"), torch.load(root / "tp2" / mode / "logits_tp.pt"))
    with HFCheckpoint(root / "tp2" / "miss" / "base") as ckpt:
        sizes = {k: torch.Size(ckpt.shape(k)).numel() * 4 for k in ckpt.key_file}
    split = sum(n for k, n in sizes.items() if k.split(".")[-2] in LLAMA_PLAN)
    replicated = sum(sizes.values()) - split
    for rank in ranks:
        assert rank["zero"]["sliced"] == 14
        assert 0.4 * split + replicated < rank["zero"]["bytes_read"] < 0.6 * split + replicated
    assert sum(r["zero"]["bytes_read"] for r in ranks) == split + 2 * replicated
    random = [r["random"] for r in ranks]
    assert all(r["replicated_equal"] and r["shards_differ"] and r["finite"] for r in random)
    assert all(0.015 < r["q_std"] < 0.025 for r in random)


def test_single_device_loading_on_meta_keeps_ties_and_rotary_buffers(runs):
    base = runs / "tp2" / "mini" / "base"  # tied embeddings
    want = AutoModelForCausalLM.from_pretrained(base)
    model = build_model_on_meta(want.config, torch.float32)
    apply_miss(model, MissConfig(r=8))
    stats = load_sharded_weights(model, base, "cpu", torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq)
    assert stats.tensors_sliced == 0 and stats.bytes_read == sum(p.numel() * 4 for p in want.parameters())
    _close(_logits(model), _logits(want))


# ----------------------------------------------------------------------------------------------- errors
def _small_base(path: Path, **overrides) -> Path:
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(path)
    return path


def test_wrong_base_is_named(runs, tmp_path):
    ckpt = runs / "tp2" / "miss" / STEP
    with pytest.raises(ValueError, match="hidden_size: adapter 64 vs model 32"):
        merge_to_hf(ckpt, _small_base(tmp_path / "narrow", hidden_size=32), tmp_path / "out")
    with pytest.raises(ValueError, match="hidden_size"):
        write_peft_adapter(ckpt, tmp_path / "peft", tmp_path / "narrow")
    assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()

    state = load_file(str(_small_base(tmp_path / "same") / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "same" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(adapter_io.AdapterMismatch, match=r"no base tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        merge_to_hf(ckpt, tmp_path / "same", tmp_path / "out")

    meta_model = build_model_on_meta(tiny_llama_config(hidden_size=32))
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight'.*shape \[97, 64\].*\[97, 32\]"):
        load_sharded_weights(meta_model, runs / "tp2" / "miss" / "base", "cpu", torch.float32)


def test_missing_files_are_named(runs, tmp_path):
    adapter = shutil.copytree(runs / "tp2" / "miss" / STEP / "adapter", tmp_path / "adapter")
    (adapter / "tp01-of-02.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="tp01-of-02.safetensors"):
        write_peft_adapter(adapter, tmp_path / "peft")
    base = shutil.copytree(runs / "tp2" / "miss" / "base", tmp_path / "base")
    shard = json.loads((base / INDEX_FILE).read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (base / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} is missing"):
        merge_to_hf(runs / "tp2" / "miss" / STEP, base, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="neither a miss_ds adapter directory"):
        merge_to_hf(base, base, tmp_path / "out")


def test_checkpoint_with_a_manifest_is_verified_first(runs, tmp_path):
    from miss_ds.atomic import CheckpointError, CheckpointManager

    src = runs / "tp2" / "miss" / STEP / "adapter"
    step = CheckpointManager(tmp_path / "ckpts").save(5, lambda d: shutil.copytree(src, d / "adapter"))
    write_peft_adapter(step, tmp_path / "ok")  # a complete checkpoint converts
    with open(step / "adapter" / "tp00-of-02.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="tp00-of-02.safetensors"):
        write_peft_adapter(step, tmp_path / "bad")


def test_non_miss_peft_adapters_are_rejected(runs, tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="type 'LORA', not MiSS"):
        read_peft_adapter(tmp_path / "lora")
    with pytest.raises(ValueError, match="belongs to a miss_ds adapter"):
        read_peft_adapter(runs / "tp2" / "miss" / STEP / "adapter")


def test_incompatible_tp_size_is_refused(runs, tmp_path):
    # 4 KV heads cannot be split over 5 ranks (a bat split that cuts r x r blocks: test_tensor_parallel, test_train).
    with pytest.raises(ValueError, match=r"--tp=5 is more than the 4 key/value heads.*--tp in \[1, 2, 3, 4\]"):
        reshard_adapter(runs / "tp4" / "bat" / STEP, 5, tmp_path / "tp5")
    assert not (tmp_path / "tp5").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="busy"):
        reshard_adapter(runs / "tp4" / "miss" / STEP, 2, tmp_path / "busy")


def test_written_weights_are_as_readable_as_the_json_beside_them(runs, tmp_path):
    """safetensors 0.8 writes its files 0600 whatever the umask; a LoRA server or a colleague running as another
    user could not read the base, adapter or export. Every safetensors file miss_ds writes (the run's random base and
    adapter shards, merged, PEFT and LoRA exports) has the mode of the JSON written beside it."""
    from miss_ds.convert.lora import write_lora_adapter

    run = runs / "tp2" / "random"
    written = [run / "base", run / STEP / "adapter"]
    for flag in ("--merge", "--peft", "--lora"):
        out = tmp_path / flag.strip("-")
        _tool("convert_to_hf").main(["--checkpoint", str(run / STEP), "--output", str(out), flag])
        written.append(out)
    write_lora_adapter(run / STEP, tmp_path / "lora_api", run / "base")
    written.append(tmp_path / "lora_api")
    for directory in written:
        weights = sorted(directory.glob("*.safetensors"))
        json_mode = next(directory.glob("*.json")).stat().st_mode & 0o777
        assert weights and json_mode & 0o044, directory
        assert {p.name: p.stat().st_mode & 0o777 for p in weights} == {p.name: json_mode for p in weights}
