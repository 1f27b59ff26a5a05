"""lavis.plot draws every run's metrics (and derived tokens/s, held-out metrics) into one image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lavis.plot import main, panels, read_metrics, series


def write_run(d: Path, steps: int, scale: float, eval_every: int = 0) -> Path:
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": scale / s, "lr": 1e-3 * min(1, s / 3), "grad_norm": 2.0 / s, "tokens": 400,
               "step_time_s": 0.5, "samples": 8}
        if eval_every and s % eval_every == 0:
            row.update({"eval_loss": scale / s + 0.1, "eval_shapes_vqa_accuracy": s / steps})
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_series_and_panels(tmp_path: Path) -> None:
    rows = read_metrics(write_run(tmp_path / "a", 6, 3.0, eval_every=3))
    assert series(rows, "tokens_per_s") == ([1, 2, 3, 4, 5, 6], [800.0] * 6)
    assert series(rows, "eval_loss") == ([3, 6], [pytest.approx(1.1), pytest.approx(0.6)])
    assert [t for t, _ in panels({"a": rows})] == ["loss", "learning rate", "grad norm", "tokens/s",
                                                   "shapes_vqa_accuracy"]


def test_plot_two_runs_writes_png(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", 8, 3.0, eval_every=4)
    b = write_run(tmp_path / "b", 5, 2.0)
    out = tmp_path / "runs.png"
    assert main([str(a), str(b / "metrics.jsonl"), "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 300


def test_plot_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 1
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')
    assert main([str(tmp_path / "bad"), "-o", str(tmp_path / "x.png")]) == 1
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err
