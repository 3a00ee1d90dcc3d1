"""MetricsLogger: JSON lines, truncation on resume, TensorBoard scalars, loss plot, disabled ranks, summary."""
from __future__ import annotations

import json

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from miss_ds.train.metrics import PLOT_DPI, PLOT_INCHES, MetricsLogger, read_metrics


def tensorboard_scalars(output_dir, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(output_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_log_writes_one_flushed_json_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"loss": torch.tensor(2.5), "lr": np.float32(0.5), "phase": "warmup"})
    # flushed before close: another reader sees the line now
    first = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {k: first[k] for k in ("step", "split", "loss", "lr", "phase")} == \
        {"step": 1, "split": "train", "loss": 2.5, "lr": 0.5, "phase": "warmup"}
    logger.log(1, {"loss": 3.0}, split="eval")
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"], r["loss"]) for r in records] == [(1, "train", 2.5), (1, "eval", 3.0)]
    assert all(isinstance(r["time"], float) for r in records)


def test_log_rejects_reserved_names_and_non_scalars(tmp_path):
    logger = MetricsLogger(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(1, {"step": 3})
    with pytest.raises(TypeError, match="'hist'"):
        logger.log(1, {"hist": [1, 2]})
    logger.close()


def test_resume_truncates_later_lines_and_appends(tmp_path):
    first_run = MetricsLogger(tmp_path)
    for step in range(1, 6):
        first_run.log(step, {"loss": float(step)})
    first_run.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # a line torn by the crash

    resumed = MetricsLogger(tmp_path)
    assert resumed.truncate_after(3) == 3  # steps 4, 5 and the torn line
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "lo')
    logger = MetricsLogger(tmp_path)
    logger.log(3, {"loss": 3.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 3]


def test_tensorboard_gets_the_same_scalars(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(10, {"loss": 1.5, "phase": "warmup"})
    logger.log(20, {"loss": 1.25})
    logger.log(20, {"loss": 2.0}, split="eval")
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard_scalars(tmp_path, "train/loss") == [(10, 1.5), (20, 1.25)]
    assert tensorboard_scalars(tmp_path, "eval/loss") == [(20, 2.0)]


def test_truncate_after_hides_later_tensorboard_events(tmp_path):
    first_run = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        first_run.log(step, {"loss": float(step)})
    first_run.close()
    resumed = MetricsLogger(tmp_path)
    resumed.truncate_after(1)
    resumed.log(2, {"loss": 20.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 20.0)]


def plotted_lines(figure) -> dict[str, list[tuple[float, float]]]:
    (axes,) = figure.axes
    return {line.get_label(): [tuple(xy) for xy in line.get_xydata()] for line in axes.get_lines()}


def loss_series(path) -> dict[str, list[tuple[float, float]]]:
    """Each split's (step, loss) pairs as metrics.jsonl has them, labelled as the plot's legend says."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in read_metrics(path):
        if "loss" in record:
            series.setdefault(f"{record['split']} loss", []).append((record["step"], record["loss"]))
    return series


def pixels_of(image: np.ndarray, color) -> int:
    """How many pixels of an RGBA float image have ``color`` (a matplotlib colour)."""
    return int((np.abs(image[..., :3] - matplotlib.colors.to_rgb(color)).max(axis=-1) < 0.02).sum())


def test_plot_losses_draws_each_split_of_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    assert logger.plot_losses(tmp_path / "empty.png") is None  # nothing logged yet
    for step in range(1, 11):
        logger.log(step, {"loss": 3.0 / step})
    logger.log(5, {"loss": 0.9}, split="eval")
    logger.log(10, {"loss": 0.5}, split="eval")
    logger.log(10, {"lr": 0.1})  # no loss: not plotted
    path = tmp_path / "plots" / "loss.png"
    figure = logger.plot_losses(path)
    logger.close()
    assert not (tmp_path / "empty.png").exists()
    want = loss_series(tmp_path / "run" / "metrics.jsonl")
    assert sorted(want) == ["eval loss", "train loss"] and len(want["train loss"]) == 10
    assert plotted_lines(figure) == want
    image = matplotlib.image.imread(path)
    width, height = PLOT_INCHES
    assert image.shape == (height * PLOT_DPI, width * PLOT_DPI, 4)
    for line in figure.axes[0].get_lines():  # every line is drawn in its own colour, not only its legend entry
        assert pixels_of(image, line.get_color()) > 400, line.get_label()  # the legend swatch alone: ~110


def test_disabled_logger_is_a_no_op(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(1, {"loss": 1.0})
    assert logger.truncate_after(0) == 0
    assert logger.plot_losses(tmp_path / "run" / "loss.png") is None
    logger.close()
    assert not (tmp_path / "run").exists()
