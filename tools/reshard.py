"""Rewrite a miss_ds adapter for another tensor-parallel size: ``miss-ds-reshard`` (miss_ds/cli/reshard.py).

    python tools/reshard.py --checkpoint CKPT --tp 2 --output OUT [--base BASE]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miss_ds.cli.reshard import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
