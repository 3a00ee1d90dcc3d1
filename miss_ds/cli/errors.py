"""The tools' contract for bad input, as miss-ds-train's: a known input error prints one ``error: ...`` line and the
tool exits 2, before heavy work where it can be found early; any other failure keeps its traceback (exit 1).

Known input errors are the project's own error classes (each says what is wrong and what to do) and the files and
directories the user named that are missing or in the way; what is wrong with the data arrives as ``ConfigError``
(``miss_ds.data.errors.read_data``).
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Optional

Main = Callable[[Optional[list[str]]], int]


def reports_input_errors(main: Main) -> Main:
    """``main`` under the contract above. In a multi-rank job the error is printed once, by the first rank that
    found it (``distributed.agree`` records which ranks failed)."""
    @functools.wraps(main)
    def checked(argv: Optional[list[str]] = None) -> int:
        try:
            return main(argv)
        except Exception as exc:
            if not isinstance(exc, input_errors()):
                raise
            return report_input_error(exc)
    return checked


def report_input_error(exc: Exception) -> int:
    """Print the ``error:`` line of bad input ``exc`` (once in a multi-rank job: by the first rank that found it,
    as ``distributed.agree`` records; ranks as ``distributed.discover`` finds them under any launcher) and return the
    exit code, 2."""
    from ..distributed import discover

    if discover().rank == min(getattr(exc, "failed_ranks", [0])):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def input_errors() -> tuple[type[Exception], ...]:
    """The exception classes that mean bad input (imported when needed: most import torch)."""
    from ..adapter_io import AdapterMismatch
    from ..atomic import CheckpointError
    from ..families import UnsupportedModel
    from ..fingerprint import OtherBaseError
    from ..functional import MissShapeError
    from ..hf_checkpoint import DamagedWeights
    from ..run_config import ConfigError

    return (ConfigError, UnsupportedModel, MissShapeError, OtherBaseError, CheckpointError, AdapterMismatch,
            DamagedWeights, FileNotFoundError, FileExistsError)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value
