"""Communication of MiSS under TP x DP against PEFT MiSS + ZeRO-3: measured, modelled, projected to many nodes.

    DS_ACCELERATOR=cpu python tools/traffic.py measure --out runs/traffic/cpu.json  # small Llama, 4 CPU ranks
    python tools/traffic.py measure --gpus 2 --full --out runs/traffic/h200x2.json   # the 70B shape, 2 GPUs
    python tools/traffic.py model     # bytes per step per GPU of each layout at the 70B shape
    python tools/traffic.py project   # tokens/s per GPU at 8 and 64 nodes from docs/logs/*/bench.json

``measure`` runs a few steps of each layout under the deepspeed launcher with DeepSpeed's comms logger on, tallies
the bytes of every collective by phase (forward, backward with its recompute, optimizer step) and process group
(TP: inside a node; DP: across nodes once TP fills a node), and prints the steady step beside the analytic model.
``worker`` is what each rank of ``measure`` runs.

Bytes are payloads: an all-reduce's tensor, an all-gather's gathered whole (DeepSpeed logs its input shard; scaled
here by the group size), a reduce-scatter's whole input. A ring moves 2(n-1)/n of the payload per rank for an
all-reduce and (n-1)/n for an all-gather or a reduce-scatter; ``project`` applies those factors.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miss_ds.distributed import free_port  # noqa: E402
from miss_ds.model_shape import ModelShape  # noqa: E402

PHASES = ("forward", "backward", "step")
#: Collectives that DeepSpeed's logger sizes by one rank's input shard; the payload is the gathered whole.
GATHERS = ("all_gather", "all_gather_into_tensor")
#: Payload fraction a ring moves per rank and per link, by collective (n ranks).
RING: dict[str, Callable[[int], float]] = {"all_reduce": lambda n: 2 * (n - 1) / n,
                                           "all_gather_into_tensor": lambda n: (n - 1) / n,
                                           "reduce_scatter_tensor": lambda n: (n - 1) / n}
#: ZeRO-3 of the PEFT baseline probe (baseline70b.py --mode zero3), the run of docs/scale.md. The probe is not in
#: this repository: it is the shared reference ../shared/probes/baseline70b.py, copied into the ignored .probes/.
PEFT_ZERO3 = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "stage3_prefetch_bucket_size": 5e8,
              "stage3_param_persistence_threshold": 1e5}
#: The small Llama of the CPU measurement: run-config overrides of configs/llama-70b-tp2.yaml.
SMALL = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=8", "model.config.num_key_value_heads=2", "model.config.head_dim=32",
         "model.config.max_position_embeddings=256", "model.dtype=float32", "data.seq_len=256",
         "train.micro_batch_size=2", "miss.r=16"]
LLAMA_70B = ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000)
#: Per GPU: 400 Gb/s across nodes, NVLink inside a node (H100/H200: 450 GB/s each way).
INTER_NODE, NVLINK = 400e9 / 8, 450e9
GPUS_PER_NODE = 8


# ----------------------------------------------------------------------------------------------- model
#: Bytes as {phase: {group: {op: bytes}}}, group "tp" or "dp".
Traffic = dict[str, dict[str, dict[str, float]]]


def _add(t: Traffic, phase: str, group: str, op: str, nbytes: float) -> None:
    if nbytes:
        ops = t.setdefault(phase, {}).setdefault(group, {})
        ops[op] = ops.get(op, 0) + nbytes


def miss_traffic(m: ModelShape, *, r: int, mbs: int, seq: int, tp: int, dp: int, zero: int, recompute: int,
                 w_bytes: int, d_bytes: int) -> Traffic:
    """Bytes per step per GPU of miss_ds (mode ``miss``) under TP x DP, ZeRO ``zero`` over the DP group.

    TP, per layer: forward all-reduces the o and down outputs; backward all-reduces the input gradient of the two
    column-layer inputs (q, k and v read one tensor, gate and up another: miss_ds.shared_input sums each group's
    input gradient before the one all-reduce), o's output again in a recomputed layer (non-reentrant checkpointing
    stops before down's), and the replicated row D's gradients (o, down). DP: D only. ZeRO-1/2 all-reduce its
    gradient and all-gather the updated D (miss_ds refuses ZeRO-3: run_config.ZERO3_REFUSAL).
    """
    t: Traffic = {}
    act = mbs * seq * m.hidden * w_bytes
    d = m.adapter_params(r, "miss", tp=tp) * d_bytes
    if tp > 1:
        _add(t, "forward", "tp", "all_reduce", 2 * m.layers * act)
        row_outs = [o for name, (_, o) in m.projections().items() if m.style(name) == "row"]
        row_d_grads = m.layers * r * sum(row_outs) * d_bytes
        _add(t, "backward", "tp", "all_reduce", (2 * m.layers + recompute) * act + row_d_grads)
    if dp > 1:
        _add(t, "backward", "dp", "all_reduce", d)
        _add(t, "step", "dp", "all_gather_into_tensor", d)
    return t


def peft_zero3_traffic(m: ModelShape, *, r: int, w_bytes: int, d_bytes: int,
                       persistence: float = PEFT_ZERO3["stage3_param_persistence_threshold"]) -> Traffic:
    """Bytes per step per GPU of PEFT MiSS on all seven projections + ZeRO-3 over all ranks, every layer recomputed.

    Parameters of at most ``persistence`` elements stay gathered and are all-gathered once after the step; all
    others are gathered on use: once in forward, and in backward once for the recompute and again for the layer's
    backward, except down (entered last by the recompute, first by backward) and the D's (a ParameterDict no hook
    releases); the LM head, final norm and embedding once per pass. D's gradient is reduce-scattered.
    """
    projections = m.projections()
    weights = {name: i * o for name, (i, o) in projections.items()}
    ds = [r * o for _, o in projections.values()]

    def gathered(numels: list[int], nbytes: int, persistent: bool = False) -> float:
        return sum(n * nbytes for n in numels if (n <= persistence) == persistent)

    norms = [m.hidden, m.hidden]
    layer = gathered(list(weights.values()) + norms, w_bytes) + gathered(ds, d_bytes)
    again = gathered([w for k, w in weights.items() if k != "down_proj"] + norms, w_bytes)
    end_params = [m.vocab * m.hidden] * (1 if m.tied_embeddings else 2) + [m.hidden]  # embedding, LM head, norm
    ends = gathered(end_params, w_bytes)
    persistent = (m.layers * (gathered(list(weights.values()) + norms, w_bytes, True) + gathered(ds, d_bytes, True))
                  + gathered(end_params, w_bytes, True))
    t: Traffic = {}
    _add(t, "forward", "dp", "all_gather_into_tensor", m.layers * layer + ends)
    _add(t, "backward", "dp", "all_gather_into_tensor", m.layers * (layer + again) + ends)
    _add(t, "backward", "dp", "reduce_scatter_tensor", m.layers * sum(ds) * d_bytes)
    _add(t, "step", "dp", "all_gather_into_tensor", persistent)
    return t


def by_group(t: Traffic) -> dict[str, float]:
    """Total bytes per process group."""
    out: dict[str, float] = defaultdict(float)
    for groups in t.values():
        for group, ops in groups.items():
            out[group] += sum(ops.values())
    return dict(out)


def modelled(run: dict, layout: dict) -> Traffic:
    """The model's traffic for one measured layout (shape, sizes and dtypes as the run had them)."""
    m = ModelShape(**run["shape"])
    if layout["kind"] == "peft":
        return peft_zero3_traffic(m, r=run["r"], w_bytes=layout["frozen_bytes"], d_bytes=layout["trainable_bytes"],
                                  persistence=layout["persistence"])
    return miss_traffic(m, r=run["r"], mbs=run["mbs"], seq=run["seq"], tp=layout["tp"], dp=layout["dp"],
                        zero=layout["zero"], recompute=run["recompute_layers"], w_bytes=layout["frozen_bytes"],
                        d_bytes=layout["trainable_bytes"])


# ----------------------------------------------------------------------------------------------- measurement
class CommsTally:
    """Bytes of every collective DeepSpeed's comms logger records, by training step, phase, process group and op
    (``ds_compat.tally_comms`` reports each with its group). Ops outside a phase are skipped."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from miss_ds.ds_compat import tally_comms

        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.tp_ranks: set[int] = set()
        self.dp_ranks: set[int] = set()
        self.phase: Optional[str] = None
        self.steps: list[dict[str, dict]] = []
        tally_comms(self._count)

    def layout(self, tp: int) -> None:
        """Set the groups: TP ranks [k*tp, (k+1)*tp), DP ranks equal modulo tp (DeepSpeed's mesh)."""
        first = self.rank // tp * tp
        self.tp_ranks, self.dp_ranks = set(range(first, first + tp)), set(range(self.rank % tp, self.world, tp))

    def _group_class(self, group: Any) -> tuple[str, int]:
        """An op's group as "tp", "dp", "world" or "other", and its size."""
        import torch.distributed as dist

        ranks = set(range(self.world)) if group is None else set(dist.get_process_group_ranks(group))
        if len(ranks) > 1 and ranks == self.dp_ranks:
            return "dp", len(ranks)  # with TP=1 the DP group is the world
        if len(ranks) > 1 and ranks == self.tp_ranks:
            return "tp", len(ranks)
        return ("world" if len(ranks) == self.world else "other"), len(ranks)

    def _count(self, op: str, msg_size: int, process_group: Any) -> None:
        """File one logged op under the current step, phase and group."""
        if self.phase is None:
            return
        group, size = self._group_class(process_group)
        payload = msg_size * size if op in GATHERS else msg_size
        cell = self.steps[-1][self.phase].setdefault(group, {}).setdefault(op, {"bytes": 0, "count": 0, "sizes": {}})
        cell["bytes"] += payload
        cell["count"] += 1
        cell["sizes"][payload] = cell["sizes"].get(payload, 0) + 1

    def run_steps(self, engine: Any, batches: Iterator[dict], steps: int, device: Any) -> list[dict]:
        """Run ``steps`` training steps; returns their tallies (JSON-shaped: sizes keyed by strings)."""
        self.steps = []
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            self.steps.append({phase: {} for phase in PHASES})
            self.phase = "forward"
            loss = engine(**batch).loss
            self.phase = "backward"
            engine.backward(loss)
            self.phase = "step"
            engine.step()
            self.phase = None
        return json.loads(json.dumps(self.steps))


def _frozen_engine(cfg: Any, device: Any) -> Any:
    """The frozen TP base (no adapter, input gradients only, as the floor probe) in the trainer's DeepSpeed setup."""
    from miss_ds import engine as miss_engine
    from miss_ds.loading import build_model_on_meta, materialize_random
    from miss_ds.modeling import DTYPES, enable_recompute, hf_config
    from miss_ds.parallel.autotp import shard_model

    tp, dtype = cfg.parallel.tp_size, DTYPES[cfg.model.dtype]
    model = build_model_on_meta(hf_config(cfg.model), dtype)
    if tp > 1:
        shard_model(model, miss_engine.tensor_parallel_group(tp))
    materialize_random(model, device, dtype, cfg.seed)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "model.norm.weight")
    if cfg.model.gradient_checkpointing:
        enable_recompute(model, cfg.model.recompute_layers)
    model.enable_input_require_grads()
    return miss_engine.initialize(model, miss_engine.deepspeed_config(cfg, device.type), tp_size=tp)[0]


def _peft_engine(cfg: Any, device: Any) -> tuple[Any, float]:
    """PEFT MiSS on every projection + ZeRO-3 over all ranks (the baseline probe's); returns it and its persistence."""
    import deepspeed
    import torch
    from peft import MissConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from miss_ds.engine import merge_configs
    from miss_ds.modeling import DTYPES, hf_config

    ds = merge_configs({"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "bf16": {"enabled": DTYPES[cfg.model.dtype] == torch.bfloat16}, "steps_per_print": 10**9,
                 "zero_optimization": dict(PEFT_ZERO3)}, cfg.deepspeed)
    # zero.Init takes the dtype from the bf16 section (DeepSpeed 0.19.8 ignores its dtype argument on CPU).
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model))
    targets = cfg.miss.for_model(model.config).target_modules  # the family's default when unset
    model = get_peft_model(model, MissConfig(r=cfg.miss.r, target_modules=list(targets)))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    return engine, ds["zero_optimization"]["stage3_param_persistence_threshold"]


def worker(args: argparse.Namespace) -> None:
    """Under the launcher: run each of ``--layouts`` (kind-zSTAGE) and print all ranks' tallies in a RESULT line."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from miss_ds.data import SyntheticBatches
    from miss_ds.distributed import exit_process, init_distributed
    from miss_ds.modeling import hf_config
    from miss_ds.run_config import load_config
    from miss_ds.train.trainer import Trainer

    info = init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    sets = [*args.set, "deepspeed.comms_logger.enabled=true", "deepspeed.comms_logger.verbose=false",
            "deepspeed.comms_logger.prof_all=true", "logging.progress=false", "logging.tensorboard=false",
            "data.synthetic=true", "model.random_init=true"]
    runs = tempfile.mkdtemp(prefix="traffic-")
    layouts, tally = [], None
    for name in args.layouts.split(","):
        kind, _, zero = name.partition("-z")
        tp = 1 if kind == "peft" else args.tp
        # One output_dir per layout: the trainer refuses a directory that holds a run. PEFT's ZeRO-3 is its own
        # DeepSpeed config (PEFT_ZERO3); miss_ds's run config refuses stage 3, so it keeps its default there.
        stage = [] if kind == "peft" else [f"parallel.zero_stage={zero}"]
        cfg = load_config(args.config, [*sets, f"parallel.tp_size={tp}", *stage, f"output_dir={runs}/{name}"])
        tally = tally or CommsTally()
        tally.layout(tp)
        config = hf_config(cfg.model)
        batches = SyntheticBatches(config.vocab_size, cfg.data.seq_len, cfg.train.micro_batch_size, info.rank // tp,
                                   info.world_size // tp)
        trainer, persistence = None, None
        if kind == "miss":
            trainer = Trainer(cfg)
            engine = trainer.engine
        elif kind == "frozen":
            engine = _frozen_engine(cfg, device)
        else:
            engine, persistence = _peft_engine(cfg, device)
        params = list(engine.module.parameters())
        layouts.append({"layout": name, "kind": kind, "tp": tp, "dp": info.world_size // tp, "zero": int(zero),
                        "persistence": persistence,
                        "trainable_bytes": next(p for p in params if p.requires_grad).element_size(),
                        "frozen_bytes": next(p for p in params if not p.requires_grad).element_size(),
                        "steps": tally.run_steps(engine, batches, args.steps, device)})
        if trainer:
            trainer.close()
        else:
            engine.destroy()
        del trainer, engine, params  # two 70B layouts do not fit on a GPU together
        gc.collect()
        get_accelerator().empty_cache()
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, layouts)
    if info.rank == 0:
        recompute = cfg.model.recompute_layers if cfg.model.gradient_checkpointing else 0
        run = {"shape": asdict(ModelShape.from_config(config)), "r": cfg.miss.r, "mbs": cfg.train.micro_batch_size,
               "seq": cfg.data.seq_len, "world": info.world_size, "device": device.type,
               "recompute_layers": config.num_hidden_layers if recompute is None else recompute,
               "layouts": [{**{k: v for k, v in lay.items() if k != "steps"},
                            "ranks": [g[i]["steps"] for g in gathered]} for i, lay in enumerate(gathered[0])]}
        print("RESULT " + json.dumps(run), flush=True)
    exit_process(0)


def launch(ranks: int, layouts: str, tp: int, sets: list[str], steps: int = 3,
           config: str = "configs/llama-70b-tp2.yaml", timeout: int = 1800) -> dict:
    """Run ``worker`` on ``ranks`` ranks under the deepspeed launcher; returns its RESULT."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "tools/traffic.py", "worker", "--config", config, "--layouts", layouts, "--tp", str(tp),
           "--steps", str(steps), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"no RESULT from {' '.join(cmd)} (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")


def steady(layout: dict) -> tuple[Traffic, int]:
    """Rank 0's bytes in the last step, and how many ranks' last steps differ from it (0 expected).

    The last step is the steady one: the first carries one-off work (ZeRO-3's first gather, setup broadcasts).
    """
    lasts = [{ph: {g: {op: c["bytes"] for op, c in ops.items()} for g, ops in groups.items()}
              for ph, groups in steps[-1].items()} for steps in layout["ranks"]]
    return lasts[0], sum(last != lasts[0] for last in lasts)


def compare(run: dict) -> list[tuple[str, str, str, str, int, Optional[float]]]:
    """Rows (layout, phase, group, op, measured, modelled) of the steady step, model included where it has one."""
    rows = []
    for layout in run["layouts"]:
        measured, _ = steady(layout)
        model = {} if layout["kind"] == "frozen" else modelled(run, layout)
        keys = sorted({(ph, g, op) for t in (measured, model) for ph, gs in t.items() for g, ops in gs.items()
                       for op in ops}, key=lambda k: (PHASES.index(k[0]), k[1], k[2]))
        for ph, g, op in keys:
            rows.append((layout["layout"], ph, g, op, measured.get(ph, {}).get(g, {}).get(op, 0),
                         model.get(ph, {}).get(g, {}).get(op) if model else None))
    return rows


def print_comparison(run: dict) -> None:
    """Print the steady step of every layout, measured beside modelled."""
    print(f"shape {run['shape']}, r={run['r']}, mbs={run['mbs']}, seq={run['seq']}, {run['world']} ranks "
          f"({run['device']}), {run['recompute_layers']} layers recompute; steady step, bytes per rank")
    for layout in run["layouts"]:
        _, differing = steady(layout)
        print(f"  {layout['layout']}: TP={layout['tp']} DP={layout['dp']} ZeRO-{layout['zero']}, "
              f"D {layout['trainable_bytes']} B/elem, base {layout['frozen_bytes']} B/elem, "
              f"ranks differing from rank 0: {differing}")
    print(f"{'layout':10} {'phase':9} {'group':5} {'op':24} {'measured B':>15} {'model B':>15} {'model/meas':>10}")
    for lay, ph, g, op, meas, model in compare(run):
        ratio = "" if model is None or not meas else f"{model / meas:10.4f}"
        print(f"{lay:10} {ph:9} {g:5} {op:24} {meas:15,d} {'' if model is None else f'{model:15,.0f}'} {ratio}")


def scaled_zero3(m: ModelShape) -> list[str]:
    """ZeRO-3 overrides that make a small model gather as the 70B does: the probe's prefetch (5e8) and DeepSpeed's
    live-parameter budget (1e9) scaled by the layer size, and gathered weights released at once (the model's
    assumption)."""
    scale = m.layer_linear_params() / LLAMA_70B.layer_linear_params()
    return [f"deepspeed.zero_optimization.stage3_prefetch_bucket_size={int(5e8 * scale)}",
            f"deepspeed.zero_optimization.stage3_max_live_parameters={int(1e9 * scale)}",
            "deepspeed.zero_optimization.stage3_max_reuse_distance=0"]


def measure(args: argparse.Namespace) -> None:
    """The TP x DP layouts in one launch, the PEFT DP layout in another; prints and saves both."""
    sets = ([] if args.full else SMALL) + args.set
    zero3 = [] if args.full else scaled_zero3(shape_from(args.config, sets)[0])
    runs = [launch(args.gpus, args.tp_layouts, args.tp, sets, args.steps, args.config),
            launch(args.gpus, "peft-z3", 1, sets + zero3, args.steps, args.config)]
    run = {**runs[0], "layouts": runs[0]["layouts"] + runs[1]["layouts"]}
    print_comparison(run)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(run, indent=1))


# ----------------------------------------------------------------------------------------------- 70B and projection
def shape_from(config: str, sets: list[str]) -> tuple[ModelShape, Any]:
    """The model shape and run config of a run config file with overrides."""
    from miss_ds.modeling import hf_config
    from miss_ds.run_config import load_config

    cfg = load_config(config, [*sets, "output_dir=/tmp/traffic-model"])
    return ModelShape.from_config(hf_config(cfg.model)), cfg


def print_model(args: argparse.Namespace) -> None:
    """Bytes per step per GPU at the config's shape (bf16 base and activations, D as ``--d-bytes``)."""
    m, cfg = shape_from(args.config, args.set)
    r, mbs, seq = cfg.miss.r, cfg.train.micro_batch_size, cfg.data.seq_len
    print(f"{m}, r={r}, mbs={mbs}, seq={seq}, every layer recomputed; GB (1e9 B) per step per GPU (payloads)")
    print(f"{'layout':34} {'TP (intra-node)':>16} {'DP':>10}  DP by op")
    rows = [(f"MiSS TP={tp} x DP, ZeRO-{z}", miss_traffic(m, r=r, mbs=mbs, seq=seq, tp=tp, dp=2, zero=z,
                                                          recompute=m.layers, w_bytes=2, d_bytes=args.d_bytes))
            for tp in (2, 8) for z in (1, 2)]
    rows.append(("PEFT MiSS + ZeRO-3, DP", peft_zero3_traffic(m, r=r, w_bytes=2, d_bytes=args.d_bytes)))
    for name, t in rows:
        groups = by_group(t)
        ops = ", ".join(f"{ph} {op} {b / 1e9:.3f}" for ph, gs in t.items() for op, b in gs.get("dp", {}).items())
        print(f"{name:34} {groups.get('tp', 0) / 1e9:16.3f} {groups.get('dp', 0) / 1e9:10.3f}  {ops}")


#: The 80-layer 2-GPU runs projected, as stage/variant of docs/logs/STAGE/bench.json.
PROJECTED = ("core/miss", "auto/miss_auto", "peft/peft_zero3")


def bench_step_s() -> dict[str, tuple[float, Optional[int]]]:
    """Median step time and recomputed layers (None: all) of the 2-GPU runs in docs/logs, by stage/variant."""
    return {f"{path.parent.name}/{entry['name']}": (entry["step_s_median"], entry.get("recompute_layers"))
            for path in sorted((ROOT / "docs" / "logs").glob("*/bench.json")) for entry in json.loads(path.read_text())}


def _seconds(t: Traffic, group: str, n: int, bandwidth: float) -> float:
    """Ring time of a group's collectives on ``n`` ranks at ``bandwidth`` bytes/s per GPU."""
    if n == 1:
        return 0.0
    return sum(RING[op](n) * b for gs in t.values() for op, b in gs.get(group, {}).items()) / bandwidth


def project(args: argparse.Namespace) -> list[dict]:
    """Tokens/s per GPU at ``--nodes`` nodes of 8 GPUs, with no and with full overlap of DP traffic and compute.

    TP all-reduces run at NVLink speed and never overlap (they are synchronous); DP collectives run on a ring over
    the DP group at the inter-node bandwidth (the group spans nodes). Compute is the 2-GPU step time less its
    modelled NVLink traffic: TP and DP for no overlap (step = compute + TP + DP), TP only for full overlap
    (step = max(compute + TP, DP)). TP=8 does a quarter of TP=2's compute per GPU (same GEMM efficiency:
    optimistic) with the TP=2 run's recompute.
    """
    m, cfg = shape_from(args.config, args.set)
    r, mbs, seq = cfg.miss.r, cfg.train.micro_batch_size, cfg.data.seq_len
    times, rows = bench_step_s(), []
    for variant in PROJECTED:
        step_s, recompute = times[variant]
        peft = "peft" in variant

        def traffic(tp: int, dp: int) -> Traffic:
            """Bf16 base and activations; PEFT's bytes do not depend on the layout, MiSS's on TP and DP > 1."""
            if peft:
                return peft_zero3_traffic(m, r=r, w_bytes=2, d_bytes=args.d_bytes)
            return miss_traffic(m, r=r, mbs=mbs, seq=seq, tp=tp, dp=dp, zero=1, w_bytes=2, d_bytes=args.d_bytes,
                                recompute=m.layers if recompute is None else recompute)
        ran = traffic(1, 2) if peft else traffic(2, 1)  # the 2-GPU runs: PEFT DP=2, MiSS TP=2
        tp_ran, dp_ran = _seconds(ran, "tp", 2, NVLINK), _seconds(ran, "dp", 2, NVLINK)
        for tp in ((1,) if peft else (2, 8)):
            for nodes in args.nodes:
                dp = nodes * GPUS_PER_NODE // tp
                t, share = traffic(tp, dp), 2 / tp if tp > 1 else 1.0
                tp_s, dp_s = _seconds(t, "tp", tp, NVLINK), _seconds(t, "dp", dp, INTER_NODE)
                none = (step_s - tp_ran - dp_ran) * share + tp_s + dp_s
                full = max((step_s - tp_ran) * share + tp_s, dp_s)
                groups = by_group(t)
                rows.append({"run": variant, "tp": tp, "dp": dp, "nodes": nodes, "tp_gb": groups.get("tp", 0) / 1e9,
                             "dp_gb": groups.get("dp", 0) / 1e9, "tp_s": tp_s, "dp_s": dp_s, "step_s_none": none,
                             "step_s_full": full, "tok_s_gpu_none": mbs * seq / tp / none,
                             "tok_s_gpu_full": mbs * seq / tp / full})
    print(f"{m}, r={r}, mbs={mbs}, seq={seq}; {INTER_NODE * 8 / 1e9:.0f} Gb/s per GPU across nodes, NVLink "
          f"{NVLINK / 1e9:.0f} GB/s, {GPUS_PER_NODE} GPUs per node, D in {args.d_bytes}-byte elements")
    print(f"{'2-GPU run':16} {'TP':>3} {'DP':>4} {'nodes':>5} {'TP GB':>6} {'DP GB':>7} {'TP s':>6} {'DP s':>6} "
          f"{'step s none':>11} {'full':>6} {'tok/s/GPU none':>14} {'full':>5}")
    for w in rows:
        print(f"{w['run']:16} {w['tp']:3d} {w['dp']:4d} {w['nodes']:5d} {w['tp_gb']:6.1f} {w['dp_gb']:7.2f} "
              f"{w['tp_s']:6.3f} {w['dp_s']:6.3f} {w['step_s_none']:11.3f} {w['step_s_full']:6.3f} "
              f"{w['tok_s_gpu_none']:14.0f} {w['tok_s_gpu_full']:5.0f}")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    """Parse the command line and run its subcommand."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("worker", "measure", "model", "project"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="configs/llama-70b-tp2.yaml", help="run config: shape, r, mbs, seq")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
        if name == "worker":
            p.add_argument("--layouts", default="miss-z1", help="comma list of miss-zN, frozen-zN, peft-z3")
            p.add_argument("--tp", type=int, default=2)
            p.add_argument("--steps", type=int, default=3)
        elif name == "measure":
            p.add_argument("--gpus", type=int, default=4, help="ranks (CPU processes with DS_ACCELERATOR=cpu)")
            p.add_argument("--tp", type=int, default=2)
            p.add_argument("--tp-layouts", default="miss-z1,miss-z2,frozen-z1")
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--full", action="store_true", help="the config's own shape and the probe's ZeRO-3 "
                           "(default: the small Llama of SMALL and scaled_zero3)")
            p.add_argument("--out", default=None, help="write every rank's per-step tallies here (JSON)")
        else:
            p.add_argument("--d-bytes", type=int, default=2, help="bytes per D element (2: bf16, as on the GPUs)")
            if name == "project":
                p.add_argument("--nodes", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args(argv)
    {"worker": worker, "measure": measure, "model": print_model, "project": project}[args.command](args)


if __name__ == "__main__":
    main()
