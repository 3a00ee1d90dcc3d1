"""Train a small sentencepiece BPE tokenizer and save it as a Hugging Face tokenizer directory.

The sentencepiece model is converted by transformers into a `tokenizers`-backed
tokenizer (`tokenizer.json`), so `AutoTokenizer.from_pretrained(directory)` loads
it offline without sentencepiece installed and encodes exactly as sentencepiece does.
"""

import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each message is "<|role|>\n" + content; an assistant turn ends with eos (what the
# model learns to emit), other turns with a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train on `texts` (one sentence each) and save a loadable tokenizer with chat template to `out_dir`.

    Ids 0-3 are unk, bos, eos, pad; the role markers are single tokens; digits are
    split one per token (simpler arithmetic); characters outside the training
    text fall back to bytes, so any input encodes without unk. Text is not
    normalised and no leading space is added, so pieces concatenate exactly.
    """
    with tempfile.TemporaryDirectory() as workdir:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=f"{workdir}/tokenizer",  # transformers looks for tokenizer.model
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=list(ROLE_MARKERS),
            num_threads=1,  # deterministic output, so the shipped files are reproducible
            minloglevel=2,
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir, pad_token=PAD)
    # Said explicitly, since transformers releases convert sentencepiece's user-defined symbols differently
    # (added special tokens, or a pre-tokenizer split): the role markers are special tokens either way.
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_MARKERS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer
