"""Plot training runs from their ``metrics.jsonl``: loss (and held-out loss), learning rate, gradient norm,
tokens/s, and every other evaluation metric (``eval_*`` keys), over optimizer steps, one line per run.

    python -m lavis.plot output/shapes [output/other ...] -o runs.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

EVAL_PREFIX = "eval_"
EVAL_LOSS = "eval_loss"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (or the file itself); a bad line raises naming the file and line."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (a run directory has metrics.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key``; ``tokens_per_s`` is derived."""
    xs, ys = [], []
    for r in rows:
        if key == "tokens_per_s":
            v = r["tokens"] / r["step_time_s"] if r.get("tokens") and r.get("step_time_s") else None
        else:
            v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def panels(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """(title, keys) of each subplot: the fixed four, then one per other eval metric found in any run."""
    evals = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith(EVAL_PREFIX)} - {EVAL_LOSS})
    return [("loss", ["loss", EVAL_LOSS]), ("learning rate", ["lr"]), ("grad norm", ["grad_norm"]),
            ("tokens/s", ["tokens_per_s"])] + [(k[len(EVAL_PREFIX):], [k]) for k in evals]


def plot(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d.name if d.is_dir() else d.parent.name for d in run_dirs]
    if len(set(names)) < len(names):  # same directory names: label by the full paths
        names = [str(d) for d in run_dirs]
    runs = {n: read_metrics(d) for n, d in zip(names, run_dirs)}
    spec = panels(runs)
    cols = 2 if len(spec) <= 4 else 3
    nrows = math.ceil(len(spec) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, spec):
        for i, (name, rows) in enumerate(runs.items()):
            for key in keys:
                xs, ys = series(rows, key)
                if not xs:
                    continue
                held_out = key == EVAL_LOSS
                label = f"{name} (held-out)" if held_out else name
                ax.plot(xs, ys, color=colours[i % len(colours)], label=label,
                        linestyle="--" if held_out else "-", marker="o" if held_out or len(xs) < 30 else None,
                        markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title in ("loss", "grad norm") and all(y > 0 for rows in runs.values() for y in series(rows, keys[0])[1]):
            ax.set_yscale("log")
        if ax.lines and (len(runs) > 1 or any(ln.get_linestyle() == "--" for ln in ax.lines)):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(spec):]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavis.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("-o", "--out", default="runs.png", help="image to write (.png, .svg, .pdf)")
    args = p.parse_args(argv)
    try:
        path = plot([Path(r) for r in args.runs], Path(args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
