"""Expected GPU memory per rank of a MiSS fine-tune: ``miss-ds-plan-memory`` (miss_ds/cli/plan_memory.py).

    python tools/plan_memory.py --config configs/llama-70b-tp2.yaml [--set KEY=VALUE ...] [--world N] [--gpu-gib G]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miss_ds.cli.plan_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
