"""Convert a miss_ds adapter for Hugging Face and LoRA servers: ``miss-ds-convert`` (miss_ds/cli/convert.py).

    python tools/convert_to_hf.py --checkpoint CKPT [--base BASE] --output OUT --merge | --peft | --lora
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miss_ds.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
