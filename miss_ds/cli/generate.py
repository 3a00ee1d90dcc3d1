"""Generate with a trained model, prompted exactly as it was trained (greedy decoding, one process).

    miss-ds-generate --checkpoint runs/tiny-cpu/checkpoints/step_00000150 --prompt "Eva had 18 pencils. ..."
    miss-ds-generate --checkpoint CKPT --prompts data/arith/eval.jsonl --limit 5
    miss-ds-generate --base merged/ --prompts prompts.txt                  # a merged export
    miss-ds-generate --adapter lora/ [--base BASE] --prompt "..."          # a PEFT MiSS or LoRA export

--checkpoint is a miss_ds training checkpoint or adapter dir; its base is the one it records (the run's model.path,
or the random base the run saved in <output_dir>/base) unless --base names it, and is checked against it. The prompt
format is the one the run trained with (bos + prompt + data.prompt_separator for "instruction", the chat template's
generation prompt for "chat"), read from the checkpoint, from the run config an export carries, or from --config.
--prompts is a data file in the run's format (its references are shown too) or a .txt file, one prompt per line.
Bad rows stop the command, quoted by file and line, unless --on-bad-row skip drops them.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..data.config import BAD_ROW_POLICIES
from ..data.errors import read_data
from .errors import positive_int, reports_input_errors
from .output import deepspeed_logs_to_stderr

if TYPE_CHECKING:
    from ..data.rows import Advice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="miss-ds-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--prompt", action="append", type=_prompt, default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a data file in the run's format, or a .txt file of one prompt per line")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N rows of --prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the run's data.seq_len, else 128")
    p.add_argument("--device", type=_device, default="cuda" if _cuda() else "cpu",
                   help="where the model runs (default: cuda when there is one, else cpu)")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts:
        p.error("give --prompt TEXT or --prompts FILE")
    return args


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The arguments naming the model and the run config it was trained with (shared with miss-ds-eval; see
    miss_ds.infer.source)."""
    p.add_argument("--checkpoint", help="miss_ds training checkpoint or adapter dir")
    p.add_argument("--adapter", help="PEFT adapter dir (a MiSS or LoRA export)")
    p.add_argument("--base", help="Hugging Face model dir: the base (default: the one the adapter records), "
                                  "or a whole model (a merged export)")
    p.add_argument("--config", help="run config YAML: the prompt format and data, when nothing records them")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the run's model.dtype, else float32")
    p.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES,
                   help="bad rows of the files read: stop, quoting them, or drop them (default: the run's "
                        "data.on_bad_row)")


def tool_advice() -> Advice:
    """What miss-ds-generate and miss-ds-eval say to do about bad rows of the files they read."""
    from ..data.rows import Advice

    return Advice(skip="pass --on-bad-row skip",
                  fit="Shorten these rows (the model was trained on sequences of the run's data.seq_len)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _prompt(text: str) -> str:
    """argparse type: a prompt with some text (an empty one prompts with the format's scaffolding alone)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty: give the text to prompt with")
    return text


def _device(text: str) -> str:
    """argparse type: a device this machine's torch can run on, checked when the flags are read (torch's own
    errors come after the model is read, as tracebacks)."""
    import torch

    try:
        kind = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: e.g. cpu, cuda or cuda:1") from None
    if kind.type == "cpu":
        return text
    backend = getattr(torch, kind.type, None)
    count = backend.device_count() if hasattr(backend, "is_available") and backend.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine's torch ({torch.__version__}) has no {kind.type} "
                                         "device: pass --device cpu")
    if kind.index is not None and kind.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: there are {count} {kind.type} device(s), numbered from 0")
    return text


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deepspeed_logs_to_stderr()  # before anything imports DeepSpeed
    from ..data.encode import prompt_ids
    from ..infer.examples import Example, read_examples
    from ..infer.generate import answer, check_room, format_samples, max_new_tokens
    from ..infer.source import load_model, resolve

    source = resolve(args.checkpoint, args.adapter, args.base, args.config)
    tokenizer = source.tokenizer()
    cfg = source.data_config(tokenizer, args.on_bad_row)
    examples = [Example(text) for text in args.prompt]
    if args.prompts:
        examples += read_data(lambda: read_examples(args.prompts, cfg, args.limit, tokenizer.chat_template,
                                                    "--prompts", tool_advice()))
    if args.max_new_tokens:
        check_room([prompt_ids(e.prompt, tokenizer, cfg) for e in examples], args.max_new_tokens, source.positions())
    model = load_model(source, args.device, source.dtype(args.dtype))
    longest = args.max_new_tokens or max_new_tokens(source.run_config)
    print(format_samples(examples, answer(model, tokenizer, examples, cfg, longest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
