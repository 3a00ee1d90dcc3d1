"""The training job's configuration: one YAML file of nested sections, ``--set`` overrides, strict validation.

Every problem is reported before any rank does heavy work, naming where the value came from (the file, or the
``--set`` argument) and the dotted key, with the nearest valid key or value suggested for typos. Each field's range
is checked where the field is defined (the dataclasses' ``__post_init__``); ``validate`` checks what spans sections
and the files the run reads.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from .config import ConfigError, MissConfig
from .data.config import DataConfig


#: Suffixes of local data files: a path with one of them must exist (other strings may name a cached dataset).
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class FieldError(ValueError):
    """One field's value is out of its range: raised by the dataclasses below, located by ``_build`` (which knows
    whether the file or a ``--set`` argument gave it)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key = key


@dataclass(frozen=True)
class Origins:
    """Where the keys of a run config came from, for error messages: a file (or a stored config) and the ``--set``
    arguments applied over it."""

    source: str
    overrides: tuple[str, ...] = ()
    file: dict[str, Any] = field(default_factory=dict)
    """The mapping the source held before the overrides."""

    def of(self, key: str) -> str:
        """What set ``key`` (dotted, ``[i]`` for list items; a section too): the last ``--set`` of it or of a section
        above it; else the source, with the ``--set`` arguments that changed keys below it (those alone when the
        source lacks the key)."""
        key = key.rstrip(".")
        sets = [(item.partition("=")[0], f"--set {item!r}") for item in self.overrides]
        for set_key, where in reversed(sets):
            if _is_under(key, set_key):
                return where
        below = ", ".join(where for set_key, where in sets if key and _is_under(set_key, key))
        if not below:
            return self.source
        return f"{self.source} with {below}" if _holds(self.file, key) else below


def _is_under(key: str, section: str) -> bool:
    """Whether dotted ``key`` is ``section`` or inside it."""
    return key == section or key.startswith((section + ".", section + "["))


def _holds(tree: Any, key: str) -> bool:
    """Whether the nested mappings and lists ``tree`` hold dotted ``key`` (``data.sources[1].path``)."""
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return False
    return True


def _at_least(key: str, value: int, low: int) -> None:
    """Refuse an integer ``value`` of ``key`` below ``low``."""
    if value < low:
        raise FieldError(key, f"is {value}; it must be at least {low}")


def _finite(key: str, value: float, ok: bool, valid: str) -> None:
    """Refuse a number ``value`` of ``key`` that is not finite or not ``ok``; ``valid`` says the range."""
    if not (math.isfinite(value) and ok):
        raise FieldError(key, f"is {value}; it must be {valid}")


#: transformers' attention implementations a run can ask for (``modeling.ATTENTION_FLAGS`` says which model classes
#: support which).
AttentionImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


@dataclass
class ModelConfig:
    path: Optional[str] = None
    """Local Hugging Face checkpoint directory (config.json + safetensors, sharded index allowed)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields for a model built with random weights (when ``path`` is null, or to override)."""
    random_init: bool = False
    """Build from ``path``'s config (or ``config``) with random weights instead of loading them (benchmarks)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Dtype of the base weights and activations (``bfloat16`` also runs DeepSpeed's bf16 mode)."""
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
    """With gradient_checkpointing: how many decoder layers recompute, 0 or more (null: all; 0: none, like
    ``gradient_checkpointing: false``; more than the model has: all). Fewer is faster and needs more memory.
    ``auto``: the fewest that fit in 85% of the GPU (``memory_plan.AUTO_MEMORY_FRACTION``) by
    ``memory_plan.auto_recompute_layers`` (tools/plan_memory.py prints the plan)."""
    attn_implementation: Optional[AttentionImplementation] = None
    """transformers' attention implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ``flash_attention_3`` or
    ``flex_attention``, where the model class supports it. Unset: the family's default, ``sdpa`` where transformers
    supports it for the model, else ``eager`` (Gemma2's logit soft-capping)."""

    def __post_init__(self) -> None:
        if isinstance(self.recompute_layers, int):
            _at_least("model.recompute_layers", self.recompute_layers, 0)

    @property
    def random_weights(self) -> bool:
        """Whether the run draws its base weights (per TP shard: ``loading.materialize_random``), not loads them."""
        return self.path is None or self.random_init


ZERO3_REFUSAL = (
    "DeepSpeed's stage 3 manages every parameter of the model, the frozen base included, and all-gathers its "
    "resident parameters after every optimizer step, so a MiSS run would move its whole frozen base over the "
    "data-parallel group every step (about 70 GB per GPU at Llama-2-70B, TP=2) to save only the memory of D's bf16 "
    "copy. Use parallel.zero_stage=2: D's gradients and optimizer state are "
    "partitioned over the data-parallel ranks, and parallel.tp_size splits the frozen base")


@dataclass
class ParallelConfig:
    tp_size: int = 1
    """Tensor-parallel size, at least 1, dividing the job's ranks: q/k/v/gate/up are split along out, o/down along
    in, MiSS's D with them."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage over data-parallel ranks: 1 partitions D's optimizer state, 2 also its gradients. 3 is refused:
    DeepSpeed's stage 3 manages every parameter, frozen ones included, and all-gathers its resident parameters
    after every optimizer step, so it would re-gather the whole frozen base each step to save D's bf16 copy alone
    (see ``ZERO3_REFUSAL``)."""
    offload_optimizer: bool = False
    """Keep D's optimizer state in CPU memory."""
    tp_grain_size: int = 1
    """MLP splits that do not divide evenly keep every shard a multiple of this, at least 1 (DeepSpeed's
    tp_grain_size): ``bat`` needs a multiple of r."""
    peer_timeout_s: float = 300.0
    """Seconds, > 0: a rank whose heartbeat stops for this long (it died or hangs) is named, and every other rank
    exits with code 1 (miss_ds.watchdog); without it a collective with a dead peer would wait for the process group's
    timeout."""

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            raise FieldError("parallel.zero_stage", f"is 3, which miss_ds refuses: {ZERO3_REFUSAL}")
        _at_least("parallel.tp_size", self.tp_size, 1)
        _at_least("parallel.tp_grain_size", self.tp_grain_size, 1)
        _finite("parallel.peer_timeout_s", self.peer_timeout_s, self.peer_timeout_s > 0, "a finite number > 0")


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Sequences per rank in each forward/backward, at least 1."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated into each optimizer step, at least 1."""
    max_steps: int = 100
    """Optimizer steps of the run, at least 1."""
    lr: float = 1e-3
    """Peak learning rate of AdamW over D, > 0."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio, in [0, 1] (1: no decay)."""
    warmup_steps: int = 0
    """Steps of linear warm-up to ``lr``, in [0, max_steps)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after the warm-up."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, >= 0 (0: none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's two moment decay rates, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW's denominator term, > 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this, >= 0 (0 disables)."""
    max_bad_steps: int = 5
    """Stop after this many skipped optimizer steps in a row, at least 1 (1: at the first): a non-finite loss in any
    micro-batch of the step's accumulation window, or non-finite gradients, skips the step and drops its window (each
    counts one)."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "grad_accum_steps", "max_steps", "max_bad_steps"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        if not 0 <= self.warmup_steps < self.max_steps:
            raise FieldError("train.warmup_steps", f"is {self.warmup_steps}; it must be in [0, train.max_steps="
                                                   f"{self.max_steps})")
        _finite("train.lr", self.lr, self.lr > 0, "a finite number > 0")
        _finite("train.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _finite("train.weight_decay", self.weight_decay, self.weight_decay >= 0, "a finite number >= 0")
        for i, beta in enumerate(self.betas):
            _finite(f"train.betas[{i}]", beta, 0 <= beta < 1, "in [0, 1)")
        _finite("train.eps", self.eps, self.eps > 0, "a finite number > 0")
        _finite("train.grad_clip", self.grad_clip, self.grad_clip >= 0, "a finite number >= 0 (0 disables clipping)")


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the held-out split every N steps, N >= 0 (0: only at the end)."""
    max_batches: int = 0
    """Cap on eval micro-batches per evaluation, >= 0 (0: the whole split)."""
    samples: int = 0
    """After training, print this many rows of ``data.eval_path`` with the model's greedy answers, >= 0 (0: none)."""

    def __post_init__(self) -> None:
        for key in ("every_steps", "max_batches", "samples"):
            _at_least(f"eval.{key}", getattr(self, key), 0)


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps, N >= 0 (0: only at the end and on preemption)."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are deleted), at least 1: the newest is what a resume reads."""
    resume: Optional[str] = None
    """``auto`` (latest complete checkpoint, if any) or a checkpoint path; ``--resume`` overrides."""

    def __post_init__(self) -> None:
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Log the training loss every N steps, N >= 1 (and at the last step)."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard events."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _at_least("logging.every_steps", self.every_steps, 1)


#: Entries of the DeepSpeed config that ``engine.deepspeed_config`` derives from the run config, with what to set
#: instead: a ``deepspeed:`` entry that sets one of them (or replaces a section holding one) is refused when the
#: config is read, since it would silently override the run config or contradict it.
DEEPSPEED_OWNED = {
    "train_batch_size": "set train.micro_batch_size and train.grad_accum_steps (the global batch is their product "
                        "times the data-parallel ranks)",
    "train_micro_batch_size_per_gpu": "set train.micro_batch_size",
    "gradient_accumulation_steps": "set train.grad_accum_steps",
    "optimizer.type": "miss_ds always trains D with torch's AdamW (train.lr, train.betas, train.eps, "
                      "train.weight_decay)",
    "optimizer.params.lr": "set train.lr",
    "optimizer.params.betas": "set train.betas",
    "optimizer.params.eps": "set train.eps",
    "optimizer.params.weight_decay": "set train.weight_decay",
    "scheduler": "set train.schedule, train.warmup_steps and train.min_lr_ratio (miss_ds passes its own schedule, "
                 "which a DeepSpeed scheduler would replace)",
    "gradient_clipping": "set train.grad_clip",
    "zero_optimization.stage": "set parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "set parallel.offload_optimizer",
    "bf16.enabled": "set model.dtype (bfloat16 runs DeepSpeed's bf16 mode)",
    "fp16.enabled": "set model.dtype (miss_ds trains in float32 or bfloat16)",
    "tensor_parallel": "set parallel.tp_size and parallel.tp_grain_size (miss_ds splits the model itself)",
}


@dataclass
class RunConfig:
    output_dir: str
    """Where the run writes its metrics, checkpoints, adapter and summary."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to ``model.path`` (not needed with ``data.synthetic``)."""
    seed: int = 0
    """Seed of torch's generators (random base weights, a random D), in [0, 2**64)."""
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
    """Extra DeepSpeed config merged over the generated one (e.g. comms_logger, flops_profiler,
    optimizer.params.fused); the entries miss_ds derives from the other sections (``DEEPSPEED_OWNED``) are refused."""
    cluster: dict[str, Any] = field(default_factory=dict)
    """Job-script settings read by ``launch/slurm/submit.py`` (nodes, gpus_per_node, time, partition, account)."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise FieldError("seed", f"is {self.seed}; it must be in [0, 2**64)")
        _check_deepspeed(self.deepspeed)


def _check_deepspeed(extra: dict[str, Any]) -> None:
    """Refuse a ``deepspeed:`` entry that sets, or replaces a section holding, an entry of ``DEEPSPEED_OWNED``."""
    for path, value in _leaves(extra):
        for owned, advice in DEEPSPEED_OWNED.items():
            if _is_under(path, owned) or _is_under(owned, path):
                what = "" if path == owned else f", which replaces deepspeed.{owned}"
                raise FieldError(f"deepspeed.{path}", f"is {value!r}{what}: miss_ds sets that from the run config; "
                                                      f"{advice} instead, and remove it from the deepspeed: section")


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every non-mapping value of nested mappings (an empty mapping sets nothing)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


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
        raise ConfigError(f"{path}{_yaml_position(exc)} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, miss:, data:, ...)")
    origins = Origins(str(path), tuple(overrides), copy.deepcopy(raw))
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, origins, "")
    validate(cfg, origins, check_files)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str) -> RunConfig:
    """A run config stored as a dict (``to_dict``: a checkpoint's trainer_state.json, an export's run config), built
    and checked like a YAML file, its files unchecked (they were the training machine's)."""
    origins = Origins(source)
    cfg = _build(RunConfig, raw, origins, "")
    validate(cfg, origins, check_files=False)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _yaml_position(exc: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error, where it says."""
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


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
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML{_yaml_position(exc)}: "
                          f"{getattr(exc, 'problem', exc)} (quote a string, close a list's brackets)") from None


def _build(cls: type, raw: Any, origins: Origins, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    section = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise ConfigError(f"{origins.of(section)}: '{section or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{origins.of(f'{prefix}{key}')}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, origins, f"{prefix}{key}")
    missing = [f.name for f in fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{origins.of(section)}: '{prefix}{missing[0]}' is required and not set")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as exc:
        raise ConfigError(f"{origins.of(exc.key)}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _section_error(origins, section, exc) from None


def _section_error(origins: Origins, section: str, exc: Exception) -> ConfigError:
    """A section's own refusal, located at the key its message starts with (``MissConfig.validate`` and
    ``DataConfig.validate`` name the key first), else at the section."""
    match = re.match(r"[\w.\[\]]+", str(exc))
    if section and match and _is_under(match[0], section):
        return ConfigError(f"{origins.of(match[0])}: {exc}")
    return ConfigError(f"{origins.of(section)}: section '{section or 'top level'}': {exc}")


def _coerce(hint: Any, value: Any, origins: Origins, key: str) -> Any:
    if is_dataclass(hint):
        return _build(hint, value, origins, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = origins.of(key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, origins, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1) \
                if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: '{key}' is {value!r}; choose one of {list(args)}{hint}")
        return value
    if origin in (list, tuple):
        return _coerce_items(origin, args, value, origins, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return value
    if hint is float:
        return _as_float(value, where, key)
    if hint in (int, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{where}: '{key}' must be {hint.__name__}, got {value!r}")
    return value


def _coerce_items(origin: type, args: tuple, value: Any, origins: Origins, key: str) -> Any:
    """A list (``list[X]``: any length) or a tuple (``tuple[X, Y]``: that many items), each item coerced to its
    type."""
    where = origins.of(key)
    if isinstance(value, str) and origin is list:
        raise ConfigError(f"{where}: '{key}' must be a list, got the string {value!r}")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
    if origin is tuple and args and ... not in args:
        if len(value) != len(args):
            raise ConfigError(f"{where}: '{key}' must be a list of {len(args)} values, got {value!r}")
        hints = args
    else:
        hints = (args[0] if args else Any,) * len(value)
    items = [_coerce(hint, item, origins, f"{key}[{i}]") for i, (hint, item) in enumerate(zip(hints, value))]
    return tuple(items) if origin is tuple else items


def validate(cfg: RunConfig, origins: Origins, check_files: bool = True) -> None:
    """Cross-section checks that need no GPU (and, with ``check_files``, the files the run reads), then the model's
    Hugging Face config (``modeling.hf_config``) where it can be read here."""
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{origins.of(key)}: '{key}' {msg}")

    if cfg.model.path is None and not cfg.model.config:
        fail("model", "needs either 'path' (a Hugging Face checkpoint directory) or 'config' (fields for a random model)")
    if check_files and cfg.model.path is not None:
        _check_model_dir(cfg.model, fail)
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
        raise _section_error(origins, "data", exc) from None
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
    if cfg.model.path is None or check_files:
        from .modeling import hf_config  # imports torch and transformers: only once the cheap checks passed

        hf_config(cfg.model, where=origins.of)


def _check_model_dir(model: ModelConfig, fail: Callable[[str, str], None]) -> None:
    """``model.path`` must hold a config.json and, unless the run draws random weights, safetensors weights."""
    from .hf_checkpoint import INDEX_FILE, SINGLE_FILE  # imports torch: only when the files are checked

    directory = Path(model.path)
    if not (directory / "config.json").is_file():
        fail("model.path", f"= {model.path} has no config.json: point it at a Hugging Face checkpoint directory")
    if not model.random_weights and not any((directory / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        fail("model.path", f"= {model.path} has config.json but no weights: it needs {SINGLE_FILE}, or "
             f"{INDEX_FILE} and the shards it lists (a .bin model: re-save it with save_pretrained("
             "safe_serialization=True)); or set model.random_init=true for random weights")


def _as_float(value: Any, where: str, key: str) -> float:
    """Numbers, and strings such as '1e-4' (YAML 1.1 reads an exponent without a dot as a string)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}") from None
