"""`jaxscale report RUN_DIR`: one PNG of a run, drawn from its metrics.jsonl (all attempts).

Four panels: loss (train and eval), tokens/s, where each step's time went (the breakdown of
jaxscale.training.metrics.COMPONENTS as stacked areas over steps) and the goodput split.
"""

from __future__ import annotations

import io
import os

from etils import epath

from jaxscale.storage import run_path
from jaxscale.training.goodput import BADPUT, goodput, read_rows
from jaxscale.training.metrics import COMPONENTS

PANELS = ("loss", "tokens per second", "step time breakdown", "goodput")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[epath.Path, list[str]]:
    """Draw the report of `run_dir` into `out` (default RUN_DIR/report.png); returns the path and panel titles.

    Either may be a local path or a bucket URL."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or used
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "loss" in r and "interval_steps" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    loss_ax, speed_ax, time_ax, goodput_ax = axes.flat

    loss_ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    loss_ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval")
    loss_ax.set(title=PANELS[0], xlabel="step", ylabel="loss")
    loss_ax.legend()

    speed_ax.plot([r["step"] for r in train_rows], [r["tokens_per_sec"] for r in train_rows])
    speed_ax.set(title=PANELS[1], xlabel="step", ylabel="tokens/s")

    steps = [r["step"] for r in train_rows]
    layers = [[r[f"time_{c}_s"] for r in train_rows] for c in COMPONENTS]
    time_ax.stackplot(steps, layers, labels=COMPONENTS)
    time_ax.set(title=PANELS[2], xlabel="step", ylabel="seconds per step")
    time_ax.legend(loc="upper right", fontsize="small")

    g = goodput(rows)
    names = ["productive", *BADPUT]
    seconds = [g.productive_s, *(g.badput_s[b] for b in BADPUT)]
    goodput_ax.barh(names, seconds)
    goodput_ax.invert_yaxis()
    goodput_ax.set(title=PANELS[3], xlabel=f"seconds (goodput {g.goodput:.1%} over {g.attempts} attempt(s))")

    fig.tight_layout()
    path = run_path(out) if out is not None else run_path(run_dir) / "report.png"
    png = io.BytesIO()  # drawn in memory: matplotlib writes local files only
    fig.savefig(png, format="png", dpi=100)
    path.write_bytes(png.getvalue())
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    return path, titles
