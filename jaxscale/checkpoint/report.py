"""`jaxscale checkpoints RUN_DIR [--verify]`: what each checkpoint holds, read from disk.

Every step directory is listed: committed, half-written (a save that never committed) and set aside as
corrupt. A file that cannot be read or parsed marks its row, never stops the listing. Listing needs no
JAX; `--verify` reads every committed step's arrays back and compares their checksums (nothing is
renamed or deleted), telling proven corruption from a read that failed for another reason.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from jaxscale.config import Config, flatten, to_dict
from jaxscale.errors import UserError
from jaxscale.storage import run_path
from jaxscale.units import human_bytes

_META_FILE = "metadata"  # jaxscale.checkpoint.manager.META_FILE, without importing JAX here
_SET_ASIDE_MARKER, _SET_ASIDE_REASON = ".unreadable-", "jaxscale_set_aside.json"


def _size(path: epath.Path) -> int | None:
    """Bytes under `path`, or None when some of it cannot be read."""
    try:
        return sum((_size(p) or 0) if p.is_dir() else p.stat().length for p in path.iterdir())
    except OSError:
        return None


def _read_json(path: epath.Path) -> tuple[dict[str, Any], str]:
    """The JSON object in `path` and "", or {} and why it could not be read ("" when the file is absent)."""
    try:
        if not path.is_file():
            return {}, ""
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {}, f"{path.name} unreadable ({type(e).__name__}: {str(e)[:200]})"
    return (value, "") if isinstance(value, dict) else ({}, f"{path.name} holds no JSON object")


def describe_checkpoint(step_dir: epath.Path, current: Config | None) -> dict[str, Any]:
    """One step directory: step, size, status (complete, partial, set aside, unreadable), mesh, config changes since."""
    name = step_dir.name
    meta, problem = _read_json(step_dir / "meta" / _META_FILE)
    if _SET_ASIDE_MARKER in name:
        note, _ = _read_json(step_dir / _SET_ASIDE_REASON)
        status = f"set aside: {note.get('reason', 'corrupt')}"
    elif not name.isdigit() or not (step_dir / "commit_success.txt").exists():
        status = "partial (never committed)"
    elif problem:
        status = f"unreadable: {problem}"
    elif (step_dir / "state" / "commit_success.txt").exists() and "checksums" in meta:
        status = "complete"
    else:
        status = "incomplete: no state or checksums"
    diff = {}
    if current is not None and isinstance(meta.get("config"), dict):
        saved, now = flatten(meta["config"]), flatten(to_dict(current))
        diff = {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    return {
        "step": int(name.split(".")[0]),
        "path": str(step_dir),
        "bytes": _size(step_dir),
        "status": status,
        "complete": status == "complete",
        "mesh": meta.get("mesh"),
        "process_count": meta.get("process_count"),
        "config_diff": diff,
    }


def report(run_dir: str | os.PathLike, current: Config | None) -> list[dict[str, Any]]:
    """Every step directory under RUN_DIR/checkpoints (a local directory or a bucket URL), oldest first."""
    root = run_path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise UserError(f"No checkpoints under {root}: pass the run.dir of a run that saved checkpoints.")
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.split(".")[0].isdigit()]
    return [describe_checkpoint(p, current) for p in sorted(dirs, key=lambda p: (int(p.name.split(".")[0]), p.name))]


def verify(run_dir: str | os.PathLike, rows: list[dict[str, Any]], config: Config | None) -> None:
    """Add `verified` to each complete row: `ok`, `corrupt: why` (proven damage), or `unreadable: why` /
    `transient: why` (the read failed, not proof of damage). Read-only, on this host's devices (the run's
    runtime settings, e.g. runtime.cpu_devices, when its config is known)."""
    from jaxscale import runtime
    from jaxscale.checkpoint.manager import Checkpointer
    from jaxscale.config import CheckpointConfig

    if config is not None:
        runtime.initialize(config.runtime)
    checkpoints = Checkpointer(run_path(run_dir) / "checkpoints", CheckpointConfig(), read_only=True)
    try:
        for row in rows:
            if row["complete"]:
                verdict = checkpoints.verify(row["step"])
                row["verified"] = verdict.status + (f": {verdict.reason}" if verdict.reason else "")
    finally:
        checkpoints.close()


def format_report(rows: list[dict[str, Any]]) -> str:
    """A table a person reads: one line per step directory, then its config changes indented below it."""
    verified = any("verified" in row for row in rows)
    lines = [f"{'step':>8}  {'size':>10}  {'mesh':<24}  {'processes':<9}  status" + ("; verified" if verified else "")]
    for row in rows:
        mesh = " ".join(f"{k}={v}" for k, v in (row["mesh"] or {}).items() if v != 1) or "?"
        size = human_bytes(row["bytes"]) if row["bytes"] is not None else "?"
        check = f"; {row['verified']}" if "verified" in row else ""
        lines.append(
            f"{row['step']:>8}  {size:>10}  {mesh:<24}  {row['process_count'] or '?'!s:<9}  {row['status']}{check}"
        )
        for key, (saved, now) in row["config_diff"].items():
            lines.append(f"{'':>10}{key}: {saved!r} -> {now!r}")
    return "\n".join(lines)
