"""Weights & Biases: every row the run logs, on the main process, as one W&B run across restarts.

`log.wandb=true` (the `wandb` extra) sends each row of metrics.jsonl to W&B: numbers as history keyed by
the run's own step (W&B's internal step only grows, so a resumed run logging steps again is still drawn
at its steps), events (start, layout changes, end) as their numbers plus an `event` text. The W&B run
id is stored in RUN_DIR/wandb_id on first use and read back by every resume, so a run restarted after a
preemption continues the same W&B run. W&B's own settings apply: WANDB_MODE=offline writes the run
locally (`wandb sync` uploads it later), WANDB_API_KEY and the rest as W&B documents them.
"""

from __future__ import annotations

import math
import secrets
import tempfile
from pathlib import Path
from typing import Any

from etils import epath

from jaxscale.config import Config, to_dict
from jaxscale.errors import UserError
from jaxscale.storage import is_remote

ID_FILE = "wandb_id"


class WandbRows:
    """A W&B run that takes the rows MetricsWriter writes; create it on the main process only."""

    def __init__(self, cfg: Config, run_dir: epath.Path) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "log.wandb=true logs to Weights & Biases, which is not installed; install the extra "
                "(pip install 'jaxscale[wandb]') or set log.wandb=false."
            ) from None
        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        # W&B keeps its files in a local directory; a bucket's run keeps them in a temporary one.
        local = Path(tempfile.mkdtemp(prefix="jaxscale-wandb-")) if is_remote(run_dir) else Path(run_dir)
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity or None,
            name=Path(str(run_dir)).name,
            id=run_id,
            resume="allow",
            dir=str(local),
            config=to_dict(cfg),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if not id_file.exists():
            id_file.write_text(run_id)

    def write(self, row: dict[str, Any]) -> None:
        """Log the numbers of `row` (and its event name) at the row's step."""
        values = {
            k: v
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and k != "time"
        }
        if "event" in row:
            values["event"] = str(row["event"])
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()
