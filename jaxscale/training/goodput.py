"""Goodput: how much of a job's wall time, over all its restarts, went into steps that count.

Read from `<run.dir>/metrics.jsonl`, which every attempt of a run appends to: each attempt writes a
`start` row (its wall-clock start, start-up, restore and compile seconds), a row per logging
interval (its steps, wall time and the breakdown of jaxscale.training.metrics.COMPONENTS) and, when
it ends without being killed, an `end` row. An attempt's wall time runs from its start to its last
row: what a killed process did after its last row leaves no trace, so it is not counted.

A step counts once: the steps an attempt ran past the checkpoint the next attempt resumed from
were redone, and their time is badput. Productive time is the compute time of the steps that count;
badput is split into compile, start-up and restore, redone work, checkpoint blocking, data waits
(host-to-device transfer included), eval and other (host overhead, and whatever no row accounts for).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from jaxscale.errors import UserError
from jaxscale.storage import run_path

BADPUT = ("compile", "startup", "redone", "checkpoint", "data", "eval", "other")


@dataclass
class Goodput:
    """A run's wall time over all attempts, split into productive time and badput (seconds)."""

    attempts: int = 0
    wall_s: float = 0.0
    productive_s: float = 0.0
    productive_steps: float = 0.0
    redone_steps: float = 0.0
    badput_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BADPUT, 0.0))

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"goodput": self.goodput}


def read_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl` (a local directory or a bucket URL); a last line cut short by a
    kill is skipped."""
    path = run_path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"No metrics under {path}: pass the run.dir of a run that has started training.")
    rows = []
    for line in path.read_text().split("\n"):  # not splitlines: U+2028 and kin are valid inside JSON strings
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def goodput(rows: list[dict[str, Any]]) -> Goodput:
    """Goodput of the attempts recorded in `rows` (see the module docstring)."""
    attempts: list[list[dict[str, Any]]] = []
    for row in rows:
        if row.get("event") == "start":
            attempts.append([row])
        elif attempts:
            attempts[-1].append(row)
    result = Goodput(attempts=len(attempts))
    for i, attempt in enumerate(attempts):
        start = attempt[0]
        # Steps past the next attempt's starting step were lost with this attempt and run again.
        kept_until = attempts[i + 1][0]["step"] if i + 1 < len(attempts) else float("inf")
        result.wall_s += max(row.get("time", start["time"]) for row in attempt) - start["time"]
        result.badput_s["compile"] += start["compile_s"]
        result.badput_s["startup"] += start["startup_s"] + start["restore_s"]
        for row in attempt:
            if "interval_steps" in row:
                _add_interval(result, row, kept_until)
    # What no interval holds (the last eval, the end of the run, gaps between rows) is host overhead too.
    result.badput_s["other"] += max(result.wall_s - result.productive_s - sum(result.badput_s.values()), 0.0)
    return result


def _add_interval(result: Goodput, row: dict[str, Any], kept_until: float) -> None:
    """Split one logging interval (steps row['step'] - n + 1 .. row['step']) into kept and redone steps."""
    steps = row["interval_steps"]
    kept = min(max(kept_until - (row["step"] - steps), 0), steps)
    share = kept / steps if steps else 0.0
    per_step = {k.removeprefix("time_").removesuffix("_s"): v for k, v in row.items() if k.startswith("time_")}
    wall = sum(per_step.values()) * steps
    result.productive_steps += kept
    result.redone_steps += steps - kept
    result.productive_s += per_step["compute"] * steps * share
    result.badput_s["redone"] += wall * (1 - share)
    for name, component in (("checkpoint", "checkpoint"), ("eval", "eval"), ("other", "other")):
        result.badput_s[name] += per_step[component] * steps * share
    result.badput_s["data"] += (per_step["data_wait"] + per_step["transfer"]) * steps * share


def format_goodput(g: Goodput) -> str:
    """The goodput table a person reads."""
    lines = [
        f"goodput {g.goodput:.1%}: {g.productive_s:.1f} s of productive step time in {g.wall_s:.1f} s of wall time "
        f"over {g.attempts} attempt(s)",
        f"steps: {g.productive_steps:g} counted, {g.redone_steps:g} redone after a restart",
        "badput:",
    ]
    lines += [
        f"  {name:<10} {seconds:9.1f} s  {seconds / g.wall_s if g.wall_s else 0:6.1%}"
        for name, seconds in g.badput_s.items()
    ]
    return "\n".join(lines)
