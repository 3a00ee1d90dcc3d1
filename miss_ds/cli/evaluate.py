"""Evaluate a trained model on its eval data or a data file: loss, perplexity and exact match, on one rank or several.

    miss-ds-eval --checkpoint runs/tiny-cpu/checkpoints/step_00000150 --answer-regex "The answer is (-?[0-9]+)"
    miss-ds-eval --base merged/ --data data/arith/eval.jsonl --output report.json
    deepspeed --num_gpus 8 --module miss_ds.cli.evaluate --checkpoint CKPT --tp 2     # 4 data-parallel x TP=2
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module miss_ds.cli.evaluate --checkpoint CKPT

The model and its prompt format are named as for miss-ds-generate (--checkpoint / --adapter / --base / --config).
Without --data it evaluates what the run's training evaluated: data.eval_path, or with data.sources every source's
eval_path, each in its source's format; a data.eval_fraction hold-out is rebuilt as training split it (the train
rows read and checked again, then split with data.seed: the same rows while the train files are unchanged). A run
that evaluated nothing needs --data, read in the run's data.format. Loss is the token-weighted cross-entropy of the
labels training uses (answers only for "instruction" and "chat" data); exact match compares the greedy answer (to
eos) with the reference answer; --answer-regex also compares what it extracts from both (its first group) and counts
the answers it finds. Both are of the same rows: the usable ones that fit data.seq_len (--limit: the first N of
each file).
The report names the files read ("data"), counts the rows used ("rows") and those skipped ("skipped_bad_rows",
"skipped_too_long_rows"); with several files it gives the figures over all of them, then each file's ("sets", each
with its "source": the name training logs that file's eval loss under, "loss/<source>").
Rows are split over data-parallel ranks; --tp splits a base plus miss_ds checkpoint over TP ranks as training does.
The report (JSON) is printed by rank 0, alone on stdout (logs go to stderr), and written to --output.
The data (bad rows stop the command unless --on-bad-row skip drops them), --answer-regex and --output are checked
before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

from ..data.errors import read_data
from .errors import positive_int, reports_input_errors
from .generate import add_source_args, tool_advice
from .output import deepspeed_logs_to_stderr

if TYPE_CHECKING:
    from ..data.pipeline import EvalSplit
    from ..distributed import ParallelLayout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="miss-ds-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--data", help="data file in the run's format (default: the eval data of the run's training)")
    p.add_argument("--answer-regex", type=_regex,
                   help="extract the answer to compare, e.g. 'The answer is (-?[0-9]+)'")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N rows of each file")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the run's data.seq_len, else 128")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass of the loss")
    p.add_argument("--generate-batch-size", type=positive_int, default=128, help="prompts generated for together")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (a base plus miss_ds checkpoint)")
    p.add_argument("--output", help="write the report (JSON) here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def _regex(text: str) -> str:
    """argparse type: a valid regular expression."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


def check_output(path: str | None) -> None:
    """Refuse an --output the report could not be written to, before any work."""
    from ..run_config import ConfigError

    if path is None:
        return
    folder = Path(path).parent
    if Path(path).is_dir():
        raise ConfigError(f"--output {path} is a directory: name the report's file")
    if not folder.is_dir():
        raise ConfigError(f"--output {path}: the directory {folder} does not exist: create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--output {path}: the directory {folder} is not writable: choose another path")


def tp_layout(rank: int, world: int, tp: int) -> ParallelLayout:
    """The TP x DP layout of ``--tp`` over the job's ranks; one that does not divide them is refused in this tool's
    terms (``ParallelLayout``'s own error speaks of training's parallel.tp_size and launch/train.py)."""
    from ..distributed import ParallelLayout
    from ..run_config import ConfigError

    try:
        return ParallelLayout(rank, world, tp)
    except ConfigError:
        sizes = [n for n in range(1, world + 1) if world % n == 0]
        raise ConfigError(f"--tp {tp} needs a multiple of {tp} ranks and this job has {world}: start it with deepspeed "
                          f"--num_gpus {tp} --module miss_ds.cli.evaluate ... --tp {tp} (on CPUs with "
                          f"DS_ACCELERATOR=cpu), or pass --tp {' or '.join(map(str, sizes))}") from None


def check_room_for_answers(eval_sets: list[EvalSplit], tokenizer: Any, max_new: int, positions: Optional[int]
                           ) -> None:
    """``generate.check_room`` for the prompts of every eval row, each in its set's format."""
    from ..data.encode import prompt_ids
    from ..infer.examples import example_of
    from ..infer.generate import check_room

    check_room([prompt_ids(example_of(row, part.cfg).prompt, tokenizer, part.cfg)
                for part in eval_sets for row in part.rows], max_new, positions)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output(args.output)
    deepspeed_logs_to_stderr()
    from deepspeed.accelerator import get_accelerator

    from ..distributed import agree, init_distributed
    from ..data.pipeline import build_eval_splits
    from ..infer.evaluate import evaluate
    from ..infer.generate import max_new_tokens
    from ..infer.source import load_model, resolve
    from ..run_config import ConfigError

    source = resolve(args.checkpoint, args.adapter, args.base, args.config)
    source.check_tp(args.tp)
    tokenizer = source.tokenizer()
    cfg = source.data_config(tokenizer, args.on_bad_row)
    info = init_distributed()
    layout = tp_layout(info.rank, info.world_size, args.tp)
    eval_sets = agree("reading the data", lambda: read_data(
        lambda: build_eval_splits(cfg, tokenizer, tool_advice(), args.limit, args.data, "--data")))
    if not eval_sets:
        raise ConfigError("the run evaluated no data (no data.eval_path, data.eval_fraction or data.sources[].eval_path"
                          "): pass --data FILE")
    if args.max_new_tokens:
        check_room_for_answers(eval_sets, tokenizer, args.max_new_tokens, source.positions())
    device, dtype = get_accelerator().current_device_name(), source.dtype(args.dtype)
    model = agree("loading the model", lambda: load_model(source, device, dtype, args.tp))
    max_new = args.max_new_tokens or max_new_tokens(source.run_config)
    report = evaluate(model, tokenizer, eval_sets, layout, micro_batch_size=args.batch_size,
                      max_new_tokens=max_new, answer_regex=args.answer_regex,
                      generate_batch_size=args.generate_batch_size)
    if layout.is_main:
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if args.output:
            Path(args.output).write_text(text + "\n")
    return 0


def run() -> NoReturn:
    """The process: ``main``, then ``exit_process`` (the ranks of a multi-rank job end together; a failed one
    leaves at once)."""
    from ..distributed import PeerFailed, exit_process

    try:
        code = main()
    except PeerFailed:  # another rank failed and printed why
        code = 1
    except SystemExit as exc:  # argparse: --help (0), bad arguments (2)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except BaseException:  # noqa: BLE001 - printed here, then the process leaves
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()
