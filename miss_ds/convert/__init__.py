"""Conversions of miss_ds adapters, both ways: merged HF checkpoints, PEFT adapters (export and import), exact LoRA
adapters, TP resharding.

    from miss_ds.convert.merge import merge_to_hf        # base + D merged, loads with from_pretrained
    from miss_ds.convert.peft import write_peft_adapter  # loads with PeftModel.from_pretrained
    from miss_ds.convert.peft import read_peft_adapter   # (MissConfig, full D): start a run from a PEFT adapter
    from miss_ds.convert.lora import write_lora_adapter  # miss/mini as an exact LoRA adapter (vLLM, SGLang, PEFT)
    from miss_ds.convert.reshard import reshard_adapter  # the same adapter split for another TP size

Every tool takes a training checkpoint directory (its ``adapter/`` is used) or an adapter directory. The
submodules are not imported here, so importing one does not pull in PEFT.
"""
