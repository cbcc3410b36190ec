"""`jaxscale checkpoints RUN_DIR`: what each checkpoint holds, read from disk without starting JAX."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from jaxscale.config import Config, flatten, to_dict
from jaxscale.errors import UserError
from jaxscale.storage import run_path
from jaxscale.units import human_bytes


def _size(path: epath.Path) -> int:
    return sum(_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def describe_checkpoint(step_dir: epath.Path, current: Config | None) -> dict[str, Any]:
    """One checkpoint: step, size, whether it is complete, the mesh it was saved on, config changes since."""
    meta_file = step_dir / "meta" / "metadata"
    committed = (step_dir / "commit_success.txt").exists()
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    complete = (
        step_dir.name.isdigit()  # not a temporary (mid-write) or set-aside (unreadable) directory
        and committed
        and (step_dir / "state" / "commit_success.txt").exists()
        and "checksums" in meta
    )
    diff = {}
    if current is not None and "config" in meta:
        saved, now = flatten(meta["config"]), flatten(to_dict(current))
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    return {
        "step": meta.get("step", step_dir.name.split(".")[0]),
        "path": str(step_dir),
        "bytes": _size(step_dir),
        "complete": complete,
        "mesh": meta.get("mesh"),
        "process_count": meta.get("process_count"),
        "config_diff": diff,
    }


def report(run_dir: str | os.PathLike, current: Config | None) -> list[dict[str, Any]]:
    """Every checkpoint under RUN_DIR/checkpoints (a local directory or a bucket URL, complete or not), oldest
    first."""
    root = run_path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise UserError(f"No checkpoints under {root}: pass the run.dir of a run that saved checkpoints.")
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.split(".")[0].isdigit()]
    return [describe_checkpoint(p, current) for p in sorted(dirs, key=lambda p: (int(p.name.split(".")[0]), p.name))]


def format_report(rows: list[dict[str, Any]]) -> str:
    """A table a person reads: one line per checkpoint, then its config changes indented below it."""
    lines = [f"{'step':>8}  {'size':>10}  {'complete':<8}  mesh"]
    for row in rows:
        mesh = " ".join(f"{k}={v}" for k, v in (row["mesh"] or {}).items() if v != 1) or "?"
        status = "yes" if row["complete"] else "NO"
        lines.append(
            f"{row['step']:>8}  {human_bytes(row['bytes']):>10}  {status:<8}  {mesh}  processes={row['process_count']}"
        )
        for key, (saved, now) in row["config_diff"].items():
            lines.append(f"{'':>10}{key}: {saved!r} -> {now!r}")
    return "\n".join(lines)
