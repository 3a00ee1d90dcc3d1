"""launch/train.py with an FP8 base on a CPU, for tests: the device check refuses a CPU (no FP8 tensor cores, so no
speed to gain), but ``torch._scaled_mm`` runs there, so lifting the check runs the whole FP8 training path.

    python tests/dist/fp8_train.py --config configs/tiny-cpu.yaml --set model.base_precision=fp8 ...
"""
from __future__ import annotations

from miss_ds.train import trainer

trainer.check_base_precision = lambda base_precision, device: None

from miss_ds.cli.train import run  # noqa: E402

if __name__ == "__main__":
    run()
