"""The training job's configuration: one YAML file of nested sections, ``--set`` overrides, strict validation.

Every problem is reported before any rank does heavy work, naming where the value came from (the file, or the
``--set`` argument) and the dotted key, with the nearest valid key or value suggested for typos. Each field's range
is checked where the field is defined (the dataclasses' ``__post_init__``); ``validate`` checks what spans sections
and the files the run reads. This module is the schema; ``miss_ds.config_loader`` reads YAML into it.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from .config import ConfigError, MissConfig
from .config_loader import (FieldError, Origins, apply_override, at_least, build, finite, is_under, read_yaml,
                            section_error)
from .data.config import FILE_SUFFIXES, DataConfig


#: transformers' own attention implementations (``modeling.ATTENTION_FLAGS`` says which model classes support
#: which); ``model.attn_implementation`` also takes a Hub kernel, ``org/name`` (``modeling.attention_implementation``).
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def draws_random_weights(path: Optional[str], random_init: bool) -> bool:
    """Whether a model section with ``model.path`` ``path`` and ``model.random_init`` draws its base weights (per TP
    shard, from the seed: ``loading.materialize_random``) instead of loading them."""
    return path is None or random_init


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
    """With gradient_checkpointing (set without it: refused): how many decoder layers recompute, 0 or more (null:
    all; 0: none, like ``gradient_checkpointing: false``; more than the model has: all). Fewer is faster and needs
    more memory.
    ``auto``: the fewest that fit in 85% of the GPU (``memory_plan.AUTO_MEMORY_FRACTION``) by
    ``memory_plan.auto_recompute_layers`` (tools/plan_memory.py prints the plan)."""
    attn_implementation: Optional[str] = None
    """transformers' attention implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ``flash_attention_3`` or
    ``flex_attention``, where the model class supports it, or an attention kernel from the Hugging Face Hub
    (``kernels-community/flash-attn3``, ``org/name@revision``), which transformers fetches with the ``kernels``
    package (``pip install kernels``; on offline nodes it must be in the Hub cache). ``flash_attention_2`` needs
    ``pip install flash-attn`` and ``flash_attention_3`` FlashAttention-3, or else the ``kernels`` package
    (``modeling.FLASH_ATTENTION_PACKAGES``; refused when the config is read without either). Unset: the family's
    default, ``sdpa`` where transformers supports it for the model, else ``eager`` (Gemma2's logit soft-capping)."""

    def __post_init__(self) -> None:
        if isinstance(self.recompute_layers, int):
            at_least("model.recompute_layers", self.recompute_layers, 0)
        attention = self.attn_implementation
        if attention is not None and attention not in ATTENTION_IMPLEMENTATIONS and "/" not in attention:
            close = difflib.get_close_matches(attention, ATTENTION_IMPLEMENTATIONS, n=1)
            raise FieldError("model.attn_implementation", f"is {attention!r}; choose one of "
                             f"{list(ATTENTION_IMPLEMENTATIONS)} or a Hub kernel ('org/name', e.g. "
                             "'kernels-community/flash-attn3')" + (f"; did you mean {close[0]!r}?" if close else ""))
        if self.recompute_layers is not None and not self.gradient_checkpointing:
            raise FieldError("model.recompute_layers", f"is {self.recompute_layers!r} but model.gradient_checkpointing "
                             "is false, so no layer recomputes: set model.gradient_checkpointing=true, or unset "
                             "model.recompute_layers")

    @property
    def random_weights(self) -> bool:
        """Whether the run draws its base weights (``draws_random_weights``)."""
        return draws_random_weights(self.path, self.random_init)


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
        at_least("parallel.tp_size", self.tp_size, 1)
        at_least("parallel.tp_grain_size", self.tp_grain_size, 1)
        finite("parallel.peer_timeout_s", self.peer_timeout_s, self.peer_timeout_s > 0, "a finite number > 0")


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
    """The ``cosine`` and ``linear`` schedules decay to lr * min_lr_ratio, in [0, 1] (1: no decay); ``constant``
    keeps lr."""
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
            at_least(f"train.{key}", getattr(self, key), 1)
        if not 0 <= self.warmup_steps < self.max_steps:
            raise FieldError("train.warmup_steps", f"is {self.warmup_steps}; it must be in [0, train.max_steps="
                                                   f"{self.max_steps})")
        finite("train.lr", self.lr, self.lr > 0, "a finite number > 0")
        finite("train.min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        finite("train.weight_decay", self.weight_decay, self.weight_decay >= 0, "a finite number >= 0")
        for i, beta in enumerate(self.betas):
            finite(f"train.betas[{i}]", beta, 0 <= beta < 1, "in [0, 1)")
        finite("train.eps", self.eps, self.eps > 0, "a finite number > 0")
        finite("train.grad_clip", self.grad_clip, self.grad_clip >= 0, "a finite number >= 0 (0 disables clipping)")


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the held-out split every N steps, N >= 0 (0: only at the end)."""
    max_batches: int = 0
    """Cap on an evaluation: its first ``max_batches x train.micro_batch_size`` sequences of the held-out split (of
    each source's with ``data.sources``; the same sequences on any number of ranks), >= 0 (0: the whole split)."""
    samples: int = 0
    """After training, print this many rows of the first eval file (``data.eval_path``, or the first source's
    ``eval_path``; without one, a warning at start and no samples) with the model's greedy answers, >= 0 (0:
    none)."""

    def __post_init__(self) -> None:
        for key in ("every_steps", "max_batches", "samples"):
            at_least(f"eval.{key}", getattr(self, key), 0)


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps, N >= 0 (0: only at the end and on preemption)."""
    keep_last: Optional[int] = 3
    """Complete checkpoints kept (older ones are deleted), at least 1: the newest is what a resume reads. ``null``
    keeps every checkpoint."""
    resume: Optional[str] = None
    """``auto`` (latest complete checkpoint, if any) or a checkpoint path; ``--resume`` overrides."""

    def __post_init__(self) -> None:
        at_least("checkpoint.every_steps", self.every_steps, 0)
        if self.keep_last is not None:
            at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Log the training loss every N steps, N >= 1 (and at the last step)."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard events."""
    progress: bool = True
    """Show progress on rank 0: a progress bar on a terminal; in a log file (Slurm, mpirun, nohup), a line per
    logged step."""

    def __post_init__(self) -> None:
        at_least("logging.every_steps", self.every_steps, 1)


@dataclass
class ClusterConfig:
    """The Slurm job ``launch/slurm/submit.py`` asks for (each key is the sbatch flag of its name, ``_`` as ``-``;
    a flag given to submit.py wins, and what neither sets keeps ``launch/slurm/train.sbatch``'s #SBATCH default)."""

    nodes: Optional[int] = None
    """Nodes, at least 1 (``--nodes``)."""
    gpus_per_node: Optional[int] = None
    """GPUs per node, at least 1 (``--gpus-per-node``; one rank per GPU, so also ``--ntasks-per-node``)."""
    time: Optional[str] = None
    """Time limit, e.g. ``"24:00:00"`` or ``"1-00:00:00"`` (quoted: YAML reads 24:00:00 as a number)
    (``--time``)."""
    partition: Optional[str] = None
    """Partition (``--partition``)."""
    account: Optional[str] = None
    """Account to charge (``--account``)."""

    def __post_init__(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) is not None:
                at_least(f"cluster.{key}", getattr(self, key), 1)


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
    """Where the run writes its metrics, checkpoints, adapter and summary; not empty (``load_config`` refuses ``''``,
    which would be the current directory)."""
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
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig())
    """Slurm job settings for ``launch/slurm/submit.py``; the trainer does not read them."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise FieldError("seed", f"is {self.seed}; it must be in [0, 2**64)")
        _check_deepspeed(self.deepspeed)


def _check_deepspeed(extra: dict[str, Any]) -> None:
    """Refuse a ``deepspeed:`` entry that sets, or replaces a section holding, an entry of ``DEEPSPEED_OWNED``."""
    for path, value in _leaves(extra):
        for owned, advice in DEEPSPEED_OWNED.items():
            if is_under(path, owned) or is_under(owned, path):
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
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, miss:, data:, ...)")
    origins = Origins(str(path), tuple(overrides), copy.deepcopy(raw))
    for item in overrides:
        apply_override(raw, item)
    cfg = build(RunConfig, raw, origins, "")
    _check_output_dir_named(cfg, origins)
    validate(cfg, origins, check_files)
    return cfg


def _check_output_dir_named(cfg: RunConfig, origins: Origins) -> None:
    """Refuse an empty ``output_dir``: the run would write into the current directory. Checked on the configs users
    write, not in ``RunConfig`` itself, so that a run config stored by an earlier run that had one still loads."""
    if not cfg.output_dir.strip():
        raise ConfigError(f"{origins.of('output_dir')}: 'output_dir' is {cfg.output_dir!r}, which would write the run "
                          "into the current directory: name a directory, e.g. --set output_dir=runs/my-run")


def config_from_dict(raw: dict[str, Any], source: str) -> RunConfig:
    """A run config stored as a dict (``to_dict``: a checkpoint's trainer_state.json, an export's run config), built
    and checked like a YAML file, its files unchecked (they were the training machine's)."""
    origins = Origins(source)
    cfg = build(RunConfig, raw, origins, "")
    validate(cfg, origins, check_files=False)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


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
    try:
        cfg.data.validate()
    except ValueError as exc:
        raise section_error(origins, "data", exc) from None
    paths = [("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)]
    paths += [(f"data.sources[{i}].{key}", getattr(source, key)) for i, source in enumerate(cfg.data.sources)
              for key in ("path", "eval_path")]
    for key, path in paths:
        if check_files and path and not cfg.data.synthetic and Path(path).suffix in FILE_SUFFIXES \
                and not Path(path).exists():
            fail(key, f"= {path} does not exist (relative paths start at {Path.cwd()})")
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


