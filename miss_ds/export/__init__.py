"""Hugging Face conversions of miss_ds adapters: merged checkpoints, PEFT adapters (both ways), TP resharding.

    from miss_ds.export.merge import merge_to_hf        # base + D merged, loads with from_pretrained
    from miss_ds.export.peft import write_peft_adapter  # loads with PeftModel.from_pretrained
    from miss_ds.export.peft import read_peft_adapter   # (MissConfig, full D): start a run from a PEFT adapter
    from miss_ds.export.reshard import reshard_adapter  # the same adapter split for another TP size

Every tool takes a training checkpoint directory (its ``adapter/`` is used) or an adapter directory. The
submodules are not imported here, so ``miss_ds.loading`` can use ``hf_checkpoint`` without pulling in PEFT.
"""
