"""Run metrics for rank 0: one JSON line per log call, the same scalars in TensorBoard, and a loss plot.

``<output_dir>/metrics.jsonl`` is opened in append mode so a resumed run continues it; call
:meth:`MetricsLogger.truncate_after` with the resumed step first so lines (and TensorBoard events) of the
interrupted run past that step are dropped. A disabled logger (non-zero ranks) does nothing at all.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")
#: The loss plot: 8 x 5 inches at 120 dots per inch, 960 x 600 pixels.
PLOT_INCHES, PLOT_DPI = (8, 5), 120

Scalar = Union[bool, int, float, str]


class MetricsLogger:
    """Writes ``{"step", "split", "time", **values}`` lines to metrics.jsonl (flushed per line) and
    ``<split>/<name>`` scalars to TensorBoard under ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: Union[str, os.PathLike], enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._file: Optional[IO[str]] = None
        self._writer: Any = None  # torch SummaryWriter, created on first use
        self._purge_step: Optional[int] = None

    def log(self, step: int, values: dict[str, Any], split: str = "train") -> None:
        """Record ``values`` (numbers, 1-element tensors/arrays, or strings, which skip TensorBoard)."""
        if not self.enabled:
            return
        record: dict[str, Scalar] = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        for name, value in values.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved ({', '.join(_RESERVED)})")
            record[name] = _scalar(name, value)
        file = self._jsonl()
        file.write(json.dumps(record) + "\n")
        file.flush()
        if not self.tensorboard:
            return
        writer = self._tensorboard()
        for name, value in record.items():
            if name not in _RESERVED and isinstance(value, (int, float)):
                writer.add_scalar(f"{split}/{name}", value, int(step))
        writer.flush()

    def truncate_after(self, step: int) -> int:
        """Drop lines with a step > ``step`` (and torn lines) from metrics.jsonl and hide TensorBoard events
        from ``step + 1`` on; call it when resuming from ``step`` (``-1`` clears everything). Returns the
        number of lines dropped."""
        if not self.enabled:
            return 0
        self.close()
        self._purge_step = step + 1
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (line_step := _step_of(line)) is not None and line_step <= step]
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(kept))
        os.replace(partial, self.path)
        return len(lines) - len(kept)

    def close(self) -> None:
        """Close the JSON lines file and the TensorBoard writer; a later :meth:`log` reopens them."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def plot_losses(self, path_png: Union[str, os.PathLike], key: str = "loss") -> Optional[Figure]:
        """Plot ``key`` against step, one line per split (train, eval, ...; splits sorted), into a PNG; returns
        the saved figure, or None when disabled or nothing has been logged under ``key``."""
        if not self.enabled:
            return None
        series: dict[str, tuple[list[int], list[float]]] = {}
        for record in read_metrics(self.path):
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(record["split"], ([], []))
                steps.append(record["step"])
                values.append(value)
        if not series:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=PLOT_INCHES)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for split, (steps, values) in sorted(series.items()):
            axes.plot(steps, values, label=f"{split} {key}", marker="o" if len(steps) < 50 else None)
        axes.set(xlabel="step", ylabel=key, title=f"{key} vs step")
        axes.grid(alpha=0.3)
        axes.legend()
        path = Path(path_png)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=PLOT_DPI)
        return figure

    def _jsonl(self) -> IO[str]:
        if self._file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            torn = _last_byte(self.path) not in (b"", b"\n")
            self._file = open(self.path, "a")
            if torn:
                self._file.write("\n")  # end a line torn by a crash so the next record parses
        return self._file

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer


def read_metrics(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, skipping lines that do not parse (e.g. torn by a crash)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _scalar(name: str, value: Any) -> Scalar:
    """A JSON-friendly scalar from a number, a string, or anything with ``.item()`` (tensors, numpy)."""
    if hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"metric {name!r} must be a number or string, got {type(value).__name__}")
    return value


def _last_byte(path: Path) -> bytes:
    """The last byte of ``path``, or b"" if it is missing or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _step_of(line: str) -> Optional[int]:
    """The step of one complete JSON line, or None if it is torn or malformed."""
    if not line.endswith("\n"):
        return None
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
