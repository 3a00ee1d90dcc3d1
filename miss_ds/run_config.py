"""The training job's configuration: one YAML file of nested sections, ``--set`` overrides, strict validation.

Every problem is reported before any rank does heavy work, naming the file and the dotted key, with the
nearest valid key suggested for typos.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config import MissConfig
from .data.config import DataConfig


#: Suffixes of local data files: a path with one of them must exist (other strings may name a cached dataset).
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with what to do about it."""


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """Local Hugging Face checkpoint directory (config.json + safetensors, sharded index allowed)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields for a model built with random weights (when ``path`` is null, or to override)."""
    random_init: bool = False
    """Build from ``path``'s config (or ``config``) with random weights instead of loading them (benchmarks)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    base_precision: Literal["bf16", "fp8"] = "bf16"
    """Precision of the frozen base weights MiSS wraps. ``fp8``: each rank quantises its shards to e4m3 as it loads
    them (``quantize.BaseQuantizer``: 1 byte per element plus an fp32 scale per output row, so the 80-layer 70B
    shape fits on one 141 GB GPU) and runs the two products that read them, the forward GEMM and the input
    gradient's, on FP8 tensor cores with per-token quantised activations (``miss_ds.fp8``); D and its math stay
    bf16/fp32, embeddings, norms and the LM head stay bf16. Like QLoRA, D is trained against the FP8 base (the run's
    own eval loss and samples too) but exported, merged and served on the original bf16 base (``miss-ds-convert``,
    ``miss-ds-eval`` and ``miss-ds-generate`` read the base files; a merge into the FP8 copy is refused), which the
    training loss does not see exactly. Needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer:
    Ada, Hopper, Blackwell; refused elsewhere before the model is built), ``dtype: bfloat16`` and ``miss.mode``
    ``miss`` or ``mini``. Layers whose shard is not a multiple of 16 in both dimensions stay bf16 (one warning lists
    them). TP=1 and TP=2 runs differ by quantisation: a shard's scales are its own. Measured on one H200:
    docs/scale.md."""
    kernels: Literal["hf", "liger"] = "hf"
    """The model's own layers (norms, rotary embedding, MLP activation, loss): ``hf``, transformers' PyTorch code;
    ``liger``, Liger Kernel's fused Triton kernels (``miss_ds.fused_kernels``: RMSNorm, RoPE, SwiGLU/GeGLU, and
    the cross-entropy fused with the LM head, so training never holds the logits). Same results up to rounding,
    faster: measured in docs/scale.md. Needs a CUDA GPU, ``pip install -e '.[liger]'``, and a family marked for it
    in the README's support table (refused otherwise before the model is built). The MiSS layers are the same in
    both."""
    gradient_checkpointing: bool = True
    """Recompute decoder layers in backward instead of storing their activations."""
    recompute_layers: Union[int, Literal["auto"], None] = None
    """With gradient_checkpointing: how many decoder layers recompute (null: all). Fewer is faster and needs
    more memory. ``auto``: the fewest that fit in 85% of the GPU (``memory_plan.AUTO_MEMORY_FRACTION``) by
    ``memory_plan.auto_recompute_layers`` (tools/plan_memory.py prints the plan)."""
    attn_implementation: Optional[str] = None
    """transformers' attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...). Unset: the family's
    default, ``sdpa`` where transformers supports it for the model, else ``eager`` (Gemma2's logit soft-capping)."""

    @property
    def random_weights(self) -> bool:
        """Whether the run draws its base weights (per TP shard: ``loading.materialize_random``), not loads them."""
        return self.path is None or self.random_init


ZERO3_REFUSAL = (
    "parallel.zero_stage=3 is not supported: DeepSpeed's stage 3 manages every parameter of the model, the frozen "
    "base included, and all-gathers its resident parameters after every optimizer step, so a MiSS run would move "
    "its whole frozen base over the data-parallel group every step (about 70 GB per GPU at Llama-2-70B, TP=2) to "
    "save only the memory of D's bf16 copy. Use parallel.zero_stage=2: D's gradients and optimizer state are "
    "partitioned over the data-parallel ranks, and parallel.tp_size splits the frozen base")


@dataclass
class ParallelConfig:
    tp_size: int = 1
    """Tensor-parallel size: q/k/v/gate/up are split along out, o/down along in, MiSS's D with them."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage over data-parallel ranks: 1 partitions D's optimizer state, 2 also its gradients. 3 is refused:
    DeepSpeed's stage 3 manages every parameter, frozen ones included, and all-gathers its resident parameters
    after every optimizer step, so it would re-gather the whole frozen base each step to save D's bf16 copy alone
    (see ``ZERO3_REFUSAL``)."""
    offload_optimizer: bool = False
    """Keep D's optimizer state in CPU memory."""
    tp_grain_size: int = 1
    """MLP splits that do not divide evenly keep every shard a multiple of this (DeepSpeed's tp_grain_size):
    ``bat`` needs a multiple of r."""
    peer_timeout_s: float = 300.0
    """A rank whose heartbeat stops for this long (it died or hangs) is named, and every other rank exits with code 1
    (miss_ds.watchdog); without it a collective with a dead peer would wait for the process group's timeout."""

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise ValueError(ZERO3_REFUSAL)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    max_bad_steps: int = 5
    """Stop after this many skipped optimizer steps in a row: a non-finite loss in any micro-batch of the step's
    accumulation window, or non-finite gradients, skips the step and drops its window (each counts one)."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    max_batches: int = 0
    """Cap on eval micro-batches per evaluation (0: the whole split)."""
    samples: int = 0
    """After training, print this many rows of ``data.eval_path`` with the model's greedy answers (0: none)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps (0: only at the end and on preemption)."""
    keep_last: int = 3
    resume: Optional[str] = None
    """``auto`` (latest complete checkpoint, if any) or a checkpoint path; ``--resume`` overrides."""


@dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    output_dir: str
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to ``model.path`` (not needed with ``data.synthetic``)."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    miss: MissConfig = field(default_factory=MissConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_adapter: Optional[str] = None
    """Start from an existing adapter: a PEFT MiSS adapter directory or a miss_ds checkpoint/adapter directory."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged over the generated one (e.g. comms_logger, flops_profiler)."""
    cluster: dict[str, Any] = field(default_factory=dict)
    """Job-script settings read by ``launch/slurm/submit.py`` (nodes, gpus_per_node, time, partition, account)."""


def load_config(path: str | Path, overrides: list[str] = (), check_files: bool = True) -> RunConfig:
    """Read ``path``, apply ``key.sub=value`` overrides (values parsed as YAML), build and validate the config.

    ``check_files=False`` skips the checks that the model, tokenizer, data and adapter files exist (planning tools
    read a run config on a machine without them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, miss:, data:, ...)")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, str(path), "")
    validate(cfg, str(path), check_files)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str) -> RunConfig:
    """A run config stored as a dict (``to_dict``: a checkpoint's trainer_state.json, an export's run config), built
    and checked like a YAML file, its files unchecked (they were the training machine's)."""
    cfg = _build(RunConfig, raw, source, "")
    validate(cfg, source, check_files=False)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like section.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(value)


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or 'top level'}': {exc}") from None


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' is {value!r}; choose one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            raise ConfigError(f"{source}: '{key}' must be a list, got the string {value!r}")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if origin is list and args and is_dataclass(args[0]):
            return [_build(args[0], item, source, f"{key}[{i}].") for i, item in enumerate(value)]
        return tuple(value) if origin is tuple else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return value
    if hint is float:
        return _as_float(value, source, key)
    if hint in (int, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}")
    return value



def validate(cfg: RunConfig, source: str, check_files: bool = True) -> None:
    """Cross-field checks that need no model and no GPU (and, with ``check_files``, the files the run reads)."""
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: '{key}' {msg}")

    t = cfg.train
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum_steps", t.grad_accum_steps),
                       ("train.max_steps", t.max_steps), ("parallel.tp_size", cfg.parallel.tp_size),
                       ("parallel.tp_grain_size", cfg.parallel.tp_grain_size)):
        if value < 1:
            fail(key, f"is {value}; it must be at least 1")
    if t.lr <= 0:
        fail("train.lr", f"is {t.lr}; it must be positive")
    if not 0 <= t.warmup_steps < t.max_steps:
        fail("train.warmup_steps", f"is {t.warmup_steps}; it must be in [0, train.max_steps={t.max_steps})")
    if cfg.model.path is None and not cfg.model.config:
        fail("model", "needs either 'path' (a Hugging Face checkpoint directory) or 'config' (fields for a random model)")
    if check_files and cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        fail("model.path", f"= {cfg.model.path} has no config.json: point it at a Hugging Face checkpoint directory")
    tokenizer = cfg.tokenizer or cfg.model.path
    if tokenizer is None and not cfg.data.synthetic:
        fail("tokenizer", "is not set and model.path is null: name a tokenizer directory")
    if check_files and tokenizer is not None and not Path(tokenizer).is_dir():
        fail("tokenizer", f"= {tokenizer} is not a directory")
    if not cfg.data.train_path and not cfg.data.sources and not cfg.data.synthetic:
        fail("data.train_path", "is empty: name the training data (or list several under data.sources)")
    paths = [("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)]
    paths += [(f"data.sources[{i}].{key}", getattr(source, key)) for i, source in enumerate(cfg.data.sources)
              for key in ("path", "eval_path")]
    for key, path in paths:
        if check_files and path and not cfg.data.synthetic and Path(path).suffix in DATA_SUFFIXES \
                and not Path(path).exists():
            fail(key, f"= {path} does not exist (relative paths start at {Path.cwd()})")
    try:
        cfg.data.validate()
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if check_files and cfg.init_adapter is not None and not Path(cfg.init_adapter).exists():
        fail("init_adapter", f"= {cfg.init_adapter} does not exist")
    if cfg.parallel.offload_optimizer and cfg.parallel.zero_stage == 0:
        fail("parallel.offload_optimizer", "needs parallel.zero_stage >= 1")
    if cfg.model.base_precision == "fp8":
        if cfg.model.dtype != "bfloat16":
            fail("model.base_precision", f"is 'fp8', which needs model.dtype: bfloat16 (the FP8 GEMMs write bf16), "
                 f"not {cfg.model.dtype!r}: set model.dtype=bfloat16 or model.base_precision=bf16")
        if cfg.miss.mode == "bat":
            fail("model.base_precision", "is 'fp8', which miss.mode='bat' cannot use: bat multiplies by the merged "
                 "weight W + W D + D, which changes every step, so there is no frozen weight to quantise once. Use "
                 "miss.mode=miss or mini, or model.base_precision=bf16")


def _as_float(value: Any, source: str, key: str) -> float:
    """Numbers, and strings such as '1e-4' (YAML 1.1 reads an exponent without a dot as a string)."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}") from None
