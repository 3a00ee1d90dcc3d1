"""Every shipped config is valid (with local stand-ins for the paths users fill in), and the memory plan behaves."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from miss_ds import memory_plan
from miss_ds.config import MissConfig
from miss_ds.distributed import ParallelLayout
from miss_ds.engine import deepspeed_config, prepare_model
from miss_ds.loading import build_model_on_meta
from miss_ds.model_shape import ModelShape
from miss_ds.modeling import ATTENTION_FLAGS
from miss_ds.run_config import ATTENTION_IMPLEMENTATIONS, DEEPSPEED_OWNED, ConfigError, _leaves, load_config
from tests.conftest import tiny_llama_config
from tests.launch_utils import ROOT
from tests.tiny_models import tiny_config

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(path)
    return path


#: Shipped configs that need no files (random models, synthetic tokens or the shipped corpus).
SELF_CONTAINED = ("tiny-cpu.yaml", "llama-70b-tp2.yaml", "llama-70b-fp8-1gpu.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_is_valid(name, tiny_checkpoint):
    cfg = load_config(ROOT / "configs" / name) if name in SELF_CONTAINED else load_config(
        ROOT / "configs" / name, [f"model.path={tiny_checkpoint}", "tokenizer=data/arith/tokenizer",
                                  "data.train_path=data/arith/train.jsonl", "data.eval_path=data/arith/eval.jsonl"])
    assert cfg.train.max_steps > 0 and cfg.miss.r > 0


def test_plan_memory_cli_reports_fit():
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/llama-70b-tp2.yaml"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "fits in 139.8 GiB" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/llama-70b-tp2.yaml",
                           "--set", "model.recompute_layers=0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout


LLAMA_70B = ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000)


def test_plan_grows_as_fewer_layers_recompute_and_shrinks_with_zero():
    kw = dict(tp=2, dp=4, offload=False, micro_batch=2, seq=4096)
    totals = [memory_plan.plan(LLAMA_70B, zero=1, recompute=k, **kw).total for k in (80, 60, 40, 0)]
    assert totals == sorted(totals)
    adapter = [memory_plan.plan(LLAMA_70B, zero=z, recompute=80, **kw).adapter for z in (0, 1, 2, 3)]
    assert adapter == sorted(adapter, reverse=True) and adapter[0] > 2 * adapter[1]
    budget = memory_plan.plan(LLAMA_70B, zero=1, recompute=50, **kw).total
    assert memory_plan.layers_to_recompute(LLAMA_70B, budget, zero=1, **kw) == 50


def test_auto_recompute_plans_for_a_share_of_the_gpu():
    """``auto`` picks the fewest recomputed layers whose plan fits AUTO_MEMORY_FRACTION of the GPU, for mini
    with its own mini_r."""
    kw = dict(tp=2, dp=1, zero=1, offload=False, micro_batch=2, seq=4096, r=64, mode="mini", mini_r=16)
    gpu = memory_plan.plan(LLAMA_70B, recompute=30, **kw).total / memory_plan.AUTO_MEMORY_FRACTION
    assert memory_plan.auto_recompute_layers(LLAMA_70B, gpu, **kw) == 30
    assert memory_plan.plan(LLAMA_70B, recompute=29, **kw).total > memory_plan.AUTO_MEMORY_FRACTION * gpu


@pytest.mark.parametrize("device, overrides, fused", [
    ("cuda", [], True), ("cpu", [], False),
    ("cuda", ["parallel.offload_optimizer=true"], False),  # the state lives on the host
    ("cuda", ["deepspeed.optimizer.params.fused=false"], False)])  # the run's deepspeed: section wins
def test_adamw_is_fused_where_its_state_lives_on_a_gpu(device, overrides, fused):
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    params = deepspeed_config(cfg, device)["optimizer"]["params"]
    assert params["fused"] is fused and params["torch_adam"] is True


TINY_CPU = ROOT / "configs" / "tiny-cpu.yaml"


def refusal(*overrides: str, config: Path = TINY_CPU, check_files: bool = False) -> str:
    """The ConfigError message of loading ``config`` with ``overrides`` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as err:
        load_config(config, [*overrides, "output_dir=unused"], check_files=check_files)
    return str(err.value)


@pytest.mark.parametrize("override, expect", [
    ("eval.max_batches=-2", "'eval.max_batches' is -2; it must be at least 0"),
    ("eval.every_steps=-1", "'eval.every_steps' is -1; it must be at least 0"),
    ("eval.samples=-1", "'eval.samples' is -1; it must be at least 0"),
    ("checkpoint.every_steps=-1", "'checkpoint.every_steps' is -1; it must be at least 0"),
    ("checkpoint.keep_last=0", "'checkpoint.keep_last' is 0; it must be at least 1"),
    ("logging.every_steps=0", "'logging.every_steps' is 0; it must be at least 1"),
    ("train.betas=[1.5, 2]", "'train.betas[0]' is 1.5; it must be in [0, 1)"),
    ("train.betas=[0.9]", "'train.betas' must be a list of 2 values"),
    ("train.eps=-1", "'train.eps' is -1.0; it must be a finite number > 0"),
    ("train.lr=.nan", "'train.lr' is nan; it must be a finite number > 0"),
    ("train.lr=.inf", "'train.lr' is inf; it must be a finite number > 0"),
    ("train.grad_clip=-1", "'train.grad_clip' is -1.0; it must be a finite number >= 0 (0 disables clipping)"),
    ("train.weight_decay=-5", "'train.weight_decay' is -5.0; it must be a finite number >= 0"),
    ("train.min_lr_ratio=1.5", "'train.min_lr_ratio' is 1.5; it must be in [0, 1]"),
    ("train.max_bad_steps=0", "'train.max_bad_steps' is 0; it must be at least 1"),
    ("train.micro_batch_size=0", "'train.micro_batch_size' is 0; it must be at least 1"),
    ("parallel.peer_timeout_s=0", "'parallel.peer_timeout_s' is 0.0; it must be a finite number > 0"),
    ("parallel.tp_grain_size=0", "'parallel.tp_grain_size' is 0; it must be at least 1"),
    ("model.recompute_layers=-1", "'model.recompute_layers' is -1; it must be at least 0"),
    ("model.recompute_layers=auto", "'model.recompute_layers' is 'auto' but model.gradient_checkpointing is false"),
    ("seed=-1", "'seed' is -1; it must be in [0, 2**64)"),
    ("data.seed=-3", "data.seed is -3: use an integer in [0, 2**32)"),
    ("miss.mini_r=0", "miss.mini_r=0 must be a positive integer"),
])
def test_numeric_options_out_of_range_are_refused_when_read(override, expect):
    """Every numeric option is checked where it is defined, naming the --set argument, the key and the range."""
    message = refusal(override)
    assert message.startswith(f"--set {override!r}: ") and expect in message, message


@pytest.mark.parametrize("sources, expect", [
    ("[{path: a.jsonl, name: 'my set'}]", "data.sources[0].name is 'my set': use letters, digits, '-', '_' and '.'"),
    ("[{path: a.jsonl}, {path: b.jsonl, name: source0}]",
     "data.sources[0] and data.sources[1] are both named 'source0': give each source its own name"),
])
def test_source_names_that_cannot_name_a_metric_are_refused_when_read(sources, expect):
    """A source's name becomes its eval loss's metric (``loss/<name>``, a TensorBoard tag): one of its characters,
    and unique (the unnamed are ``source<i>``)."""
    message = refusal("data.train_path=''", "data.eval_path=null", f"data.sources={sources}")
    assert expect in message, message


def test_zero_is_accepted_where_it_means_never_none_or_all():
    """0 is refused only where it means nothing: eval and checkpoints only at the end, whole eval split, no samples,
    no clipping, no decay, no recomputed layer."""
    cfg = load_config(TINY_CPU, ["output_dir=unused", "eval.every_steps=0", "eval.max_batches=0", "eval.samples=0",
                                 "checkpoint.every_steps=0", "train.grad_clip=0", "train.weight_decay=0",
                                 "train.min_lr_ratio=0", "model.gradient_checkpointing=true",
                                 "model.recompute_layers=0", "train.betas=[0, 0.5]"],
                      check_files=False)
    assert cfg.train.betas == (0.0, 0.5) and cfg.model.recompute_layers == 0


def test_errors_name_the_set_argument_or_the_file(tmp_path):
    """An error in a --set value names that argument; one in the file names the file (and its --set changes)."""
    assert refusal("trian.lr=3") == "--set 'trian.lr=3': unknown key 'trian'; did you mean 'train'?"
    assert refusal("miss.target_modules=[q_proj").startswith(
        "--set 'miss.target_modules=[q_proj': the value is not valid YAML")
    config = tmp_path / "run.yaml"
    config.write_text(TINY_CPU.read_text().replace("  max_steps: 150", "  max_steps: 150\n  lr_max: 1"))
    assert refusal("train.lr=0.1", config=config).startswith(f"{config}: unknown key 'train.lr_max'")
    config.write_text(TINY_CPU.read_text().replace("  r: 16", "  r: 0"))
    assert refusal("miss.mode=mini", config=config).startswith(f"{config}: miss.r=0 must be a positive integer")
    config.write_text("\n".join(line for line in TINY_CPU.read_text().splitlines()
                                 if not line.startswith("output_dir:")))
    with pytest.raises(ConfigError, match=f"^{config}: 'output_dir' is required and not set$"):
        load_config(config, check_files=False)


@pytest.mark.parametrize("override, key, instead", [
    ("deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.train_micro_batch_size_per_gpu",
     "train.micro_batch_size"),
    ("deepspeed.train_batch_size=64", "deepspeed.train_batch_size", "train.grad_accum_steps"),
    ("deepspeed.gradient_accumulation_steps=2", "deepspeed.gradient_accumulation_steps", "train.grad_accum_steps"),
    ("deepspeed={zero_optimization: {stage: 3}}", "deepspeed.zero_optimization.stage", "parallel.zero_stage"),
    ("deepspeed.zero_optimization=2", "deepspeed.zero_optimization", "parallel.zero_stage"),
    ("deepspeed.zero_optimization.offload_optimizer={device: cpu}",
     "deepspeed.zero_optimization.offload_optimizer.device", "parallel.offload_optimizer"),
    ("deepspeed.optimizer.params.lr=0.1", "deepspeed.optimizer.params.lr", "train.lr"),
    ("deepspeed.optimizer.type=SGD", "deepspeed.optimizer.type", "AdamW"),
    ("deepspeed.scheduler={type: WarmupLR}", "deepspeed.scheduler.type", "train.schedule"),
    ("deepspeed.gradient_clipping=0", "deepspeed.gradient_clipping", "train.grad_clip"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16.enabled", "model.dtype"),
    ("deepspeed.fp16.enabled=true", "deepspeed.fp16.enabled", "model.dtype"),
    ("deepspeed.tensor_parallel.autotp_size=2", "deepspeed.tensor_parallel.autotp_size", "parallel.tp_size"),
])
def test_deepspeed_entries_that_miss_ds_sets_are_refused(override, key, instead):
    """A deepspeed: entry that miss_ds derives from the run config would win silently: refused, naming the key to
    set instead."""
    message = refusal(override)
    assert f"'{key}' is" in message and f"{instead}" in message and "remove it from the deepspeed: section" in message


def test_every_deepspeed_entry_miss_ds_sets_is_owned_or_tunable():
    """``DEEPSPEED_OWNED`` covers every entry ``deepspeed_config`` derives from the run config; the rest are tunable
    through ``deepspeed:`` (and such overrides still win)."""
    tunable = {"steps_per_print", "wall_clock_breakdown", "optimizer.params.torch_adam", "optimizer.params.fused",
               "zero_optimization.offload_optimizer.pin_memory"}
    cfg = load_config(TINY_CPU, ["output_dir=unused", "parallel.offload_optimizer=true"], check_files=False)
    for path, _ in _leaves(deepspeed_config(cfg, "cuda")):
        owned = [o for o in DEEPSPEED_OWNED if path == o or path.startswith(o + ".")]
        assert owned or path in tunable, path
    cfg = load_config(TINY_CPU, ["output_dir=unused", "deepspeed.steps_per_print=5",
                                 "deepspeed.bf16.immediate_grad_update=true"], check_files=False)
    assert deepspeed_config(cfg, "cpu")["steps_per_print"] == 5


def test_model_config_problems_are_refused_when_read(tmp_path):
    """The model's Hugging Face config is built when the run config is read, its problems located at their key."""
    message = refusal("model.attn_implementation=spda")
    assert "'model.attn_implementation' is 'spda'; choose one of ['eager', 'sdpa'" in message
    assert message.endswith("did you mean 'sdpa'?"), message
    message = refusal("model.config.hidden_size=130")
    assert message.startswith("--set 'model.config.hidden_size=130': 'model.config.hidden_size' is 130, which makes "
                              "no valid LlamaConfig: The hidden size (130) is not a multiple"), message
    config = tmp_path / "run.yaml"
    config.write_text(TINY_CPU.read_text().replace("num_hidden_layers: 2", "num_hidden_layer: 2"))
    assert refusal(config=config).startswith(f"{config}: unknown field 'model.config.num_hidden_layer' for "
                                             "LlamaConfig; did you mean 'model.config.num_hidden_layers'?")
    config.write_text(TINY_CPU.read_text().replace("model_type: llama", "model_type: gpt2"))
    assert refusal(config=config).startswith(f"{config}: model_type 'gpt2' is not supported")
    assert set(ATTENTION_IMPLEMENTATIONS) == {"eager", *ATTENTION_FLAGS}


def test_a_hub_attention_kernel_is_taken_in_its_form_and_needs_the_kernels_package(monkeypatch):
    """``org/name[@revision]`` is passed to transformers, once the kernels package that loads it is found; another
    string with a slash is refused naming the form."""
    import importlib.util

    message = refusal("model.attn_implementation=kernels-community/flash-attn3@v1")
    assert "is a Hub attention kernel, which transformers loads with the kernels package: pip install kernels" \
        in message, message
    assert "is neither one of ['eager', 'sdpa'" in refusal("model.attn_implementation=a/b/c")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "kernels" else
                        find_spec(name, *a))
    cfg = load_config(TINY_CPU, ["output_dir=unused", "model.attn_implementation=kernels-community/flash-attn3@v1"],
                      check_files=False)
    assert cfg.model.attn_implementation == "kernels-community/flash-attn3@v1"


@pytest.mark.parametrize("case, expect", [
    ("not_json", "config.json is not valid JSON (Expecting"),
    ("no_model_type", "config.json has no 'model_type': add it there, or set model.config.model_type"),
    ("no_weights", "has config.json but no weights: it needs model.safetensors, or model.safetensors.index.json"),
])
def test_model_directory_problems_name_the_file(tiny_checkpoint, tmp_path, case, expect):
    """A broken model directory is refused when the config is read, before any model is built."""
    model = shutil.copytree(tiny_checkpoint, tmp_path / case)
    fields = json.loads((model / "config.json").read_text())
    if case == "not_json":
        (model / "config.json").write_text('{"model_type": "llama",,}')
    elif case == "no_model_type":
        (model / "config.json").write_text(json.dumps({k: v for k, v in fields.items() if k != "model_type"}))
    else:
        (model / "model.safetensors").unlink()
    message = refusal(f"model.path={model}", "model.config={}", check_files=True)
    assert str(model) in message and expect in message, message


@pytest.mark.parametrize("miss, expect", [
    (dict(modules_to_save=["lm_haed"]), "miss.modules_to_save entry 'lm_haed' matches no module"),
    (dict(target_modules=["q_prj", "v_proj"]), "miss.target_modules entry 'q_prj' matches no module"),
    (dict(exclude_modules=["k_prj"]), "miss.exclude_modules entry 'k_prj' matches no module"),
    (dict(target_modules=r".*\.q_prj"), r"miss.target_modules entry '.*\\.q_prj' matches no module"),
])
def test_module_entries_matching_nothing_are_refused_on_the_meta_model(miss, expect):
    """A misspelt entry would leave its modules untouched (lm_head untrained): refused on the meta-device model,
    before any weight exists, naming the nearest module names."""
    model = build_model_on_meta(tiny_llama_config())
    with pytest.raises(ConfigError) as err:
        prepare_model(model, MissConfig(r=8, **miss), tp_size=1)
    assert expect in str(err.value) and "closest module names: '" in str(err.value), str(err.value)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("saved, first", [(["q_proj"], "model.layers.0.self_attn.q_proj' (and 1 more modules)"),
                                          (["layers.1.mlp"], "model.layers.1.mlp.gate_proj' (and 2 more modules)")])
def test_a_module_both_adapted_and_saved_is_refused_on_the_meta_model(saved, first):
    """modules_to_save covering an adapted module (itself, or a module around it) trained both its D and its full
    weight, and the merged and PEFT exports each kept one: their losses differed from the checkpoint's."""
    model = build_model_on_meta(tiny_llama_config())
    with pytest.raises(ConfigError) as err:
        prepare_model(model, MissConfig(r=8, modules_to_save=saved), tp_size=1)
    assert f"miss.target_modules adapts '{first}, which miss.modules_to_save={saved!r} trains in full" in str(
        err.value), str(err.value)
    assert all(p.is_meta for p in model.parameters())


def test_a_module_name_given_as_a_string_is_told_to_be_a_list():
    """``target_modules: q_proj`` (a string) is one regex over full names and matches nothing; the refusal said so
    while listing 'q_proj' as the closest name: it now says to write a list."""
    with pytest.raises(ConfigError, match=r"give a list: miss.target_modules=\[q_proj\]$"):
        prepare_model(build_model_on_meta(tiny_llama_config()), MissConfig(r=8, target_modules="q_proj"), tp_size=1)


def test_family_default_targets_a_model_lacks_are_not_refused():
    """Qwen3-MoE's default targets include the dense MLP's projections, which an all-MoE model does not have."""
    report = prepare_model(build_model_on_meta(tiny_config("qwen3_moe")), MissConfig(r=8), tp_size=1)
    assert report.adapted_modules == 8


def test_tp_size_not_dividing_the_ranks_says_what_works():
    """A bad input error (exit 2 in the trainer), saying which sizes work."""
    with pytest.raises(ConfigError, match=r"parallel.tp_size=2 does not divide the 1 ranks of this job: set "
                                          r"parallel.tp_size to one of \[1\], or start a multiple of 2 ranks"):
        ParallelLayout(0, 1, 2)


def test_train_cli_refuses_bad_input_in_one_line_and_help_is_plain(tmp_path):
    """A misspelt modules_to_save ends as one 'error:' line and exit 2 before any weight is made; --help prints no
    preemption notice."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(TINY_CPU), "--set",
                           f"output_dir={tmp_path / 'run'}", "--set", "miss.modules_to_save=[lm_haed]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: miss.modules_to_save entry 'lm_haed' matches no module of this LlamaForCausalLM (an "
                      "entry matches every module whose name ends with it); closest module names: 'lm_head'"], errors
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()  # a refused run writes nothing
    proc = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "preemption handler" not in proc.stdout + proc.stderr


def test_output_dir_is_checked_without_writing_and_claimed_once_the_checks_pass(tmp_path, monkeypatch):
    """``check_output_dir`` writes nothing (a run refused later leaves no directory, and --overwrite moves the old
    run only when ``claim_output_dir`` creates the new one); a file in the way or a run without --overwrite/--resume
    is refused."""
    from miss_ds.train.preflight import check_output_dir, claim_output_dir

    def cfg(out: Path):
        return load_config(TINY_CPU, [f"output_dir={out}"], check_files=False)

    fresh = tmp_path / "a" / "fresh"
    assert check_output_dir(cfg(fresh), None, overwrite=False) is False and not (tmp_path / "a").exists()
    aside, lock = claim_output_dir(fresh, move_aside=False)
    assert aside is None and fresh.is_dir() and lock is not None
    # two runs started into one directory wrote their metrics and checkpoints over each other: the second is refused
    with pytest.raises(ConfigError, match=f"output_dir={fresh} is in use by another run .process {os.getpid()} on "):
        claim_output_dir(fresh, move_aside=False)
    with pytest.raises(ConfigError, match="is in use by another run"):
        claim_output_dir(fresh, move_aside=True)  # --overwrite would move it from under the running one
    assert [path.name for path in fresh.parent.iterdir()] == ["fresh"]
    lock.close()  # as the process's end releases it
    claim_output_dir(fresh, move_aside=False)[1].close()
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run .metrics.jsonl.: it saved no checkpoint .--resume auto "
                                          "would start it again at step 0., start over with --overwrite"):
        check_output_dir(cfg(old), None, overwrite=False)
    (old / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a run .checkpoints, metrics.jsonl.: continue it with --resume auto"):
        check_output_dir(cfg(old), None, overwrite=False)
    assert check_output_dir(cfg(old), "auto", overwrite=False) is False
    assert check_output_dir(cfg(old), None, overwrite=True) is True and (old / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="--overwrite starts over in output_dir=.*, but this run resumes 'auto'"):
        check_output_dir(cfg(old), "auto", overwrite=True)  # it used to resume, --overwrite ignored
    monkeypatch.chdir(old)
    with pytest.raises(ConfigError, match="would move output_dir=. aside, and the current directory is in it"):
        check_output_dir(cfg(Path(".")), None, overwrite=True)  # it used to fail moving "." after the model loaded
    monkeypatch.chdir(tmp_path)
    aside, _ = claim_output_dir(old, move_aside=True)
    assert (aside / "metrics.jsonl").exists() and old.is_dir() and [path.name for path in old.iterdir()] == [".lock"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output_dir(cfg(tmp_path / "file" / "run"), None, overwrite=False)


def test_eval_options_with_nothing_to_do_are_warned_about(caplog):
    """eval.every_steps without an eval split and eval.samples without an eval file are warned about at start (they
    used to be ignored silently); samples come from the first source that has an eval file."""
    from miss_ds.train.preflight import sample_file, warn_idle_eval_options

    def warnings(*overrides: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_idle_eval_options(load_config(TINY_CPU, ["output_dir=unused", *overrides], check_files=False))
        return [record.getMessage().split(":")[0] for record in caplog.records]

    assert warnings() == []
    assert warnings("data.eval_path=null", "eval.every_steps=5") == ["eval.every_steps=5", "eval.samples=3"]
    assert warnings("data.eval_path=null", "data.eval_fraction=0.1", "eval.every_steps=5") == ["eval.samples=3"]
    sources = ("data.sources=[{path: data/arith/train_chat.jsonl, format: chat}, "
               "{path: data/arith/train.jsonl, eval_path: data/arith/eval.jsonl}]")
    cfg = load_config(TINY_CPU, ["output_dir=unused", "data.train_path=''", "data.eval_path=null", sources],
                      check_files=False)
    assert sample_file(cfg).eval_path == "data/arith/eval.jsonl" and sample_file(cfg).format == "instruction"
    assert warnings("data.train_path=''", "data.eval_path=null", sources, "eval.every_steps=5") == []
