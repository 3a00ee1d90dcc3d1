"""Use what was trained: load a model with its tokenizer and prompt format, generate, evaluate.

- ``source``: what to load (a base plus a miss_ds checkpoint, a merged export, or a PEFT MiSS/LoRA adapter), and the
  run config it was trained with, which gives the prompt format.
- ``examples``: rows of a data file (or prompts) as examples: what to prompt with and the reference answer.
- ``generate``: greedy answers, batched without padding.
- ``evaluate``: loss/perplexity and exact match over the run's eval files (or a given one), data-parallel over ranks
  (TP optional).

Prompts are built by ``miss_ds.data.encode.prompt_ids``, the rule training uses.
"""
