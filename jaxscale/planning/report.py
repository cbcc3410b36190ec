"""A plan as a table for people, or as JSON for scripts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from jaxscale.planning.candidate import Candidate
from jaxscale.planning.search import Plan, explain
from jaxscale.units import GIB


def _row(rank: str, c: Candidate) -> str:
    t = c.time
    return (
        f"{rank:>4}  {c.label():34s} {c.memory.total / GIB:9.2f}  {t.compute_s:9.3g}  {t.hidden_comm_s:9.3g}  "
        f"{t.exposed_comm_s:9.3g}  {t.step_s:9.3g}  {c.mfu:5.0%}"
    )


def _header() -> str:
    return (
        f"{'rank':>4}  {'mesh':34s} {'GiB/dev':>9}  {'compute s':>9}  {'hidden s':>9}  {'exposed s':>9}  "
        f"{'step s':>9}  {'MFU':>5}"
    )


def _details(c: Candidate) -> list[str]:
    m = c.memory
    lines = [
        f"  layer loop: model.scan_unroll={c.scan_unroll}, model.remat={c.remat}",
        "  memory per device (GiB): "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in asdict(m).items())
        + f"; total {m.total / GIB:.2f}",
        "  communication per device per step:",
    ]
    if c.schedule is not None:
        sch = c.schedule
        lines.insert(
            1,
            f"  pipeline: {sch.name}, {sch.stages} stages x {sch.virtual} chunks, {sch.microbatches} microbatches, "
            f"{sch.backward_ticks} backward ticks; {sch.stash_slots} stash slots; bubble "
            f"{sch.time_bubble_fraction():.1%} of device time (stretches the compute)",
        )
    for t in c.traffic:
        hidden = "on the critical path" if t.exposed else "overlaps compute"
        lines.append(
            f"    {t.axis}={t.size} {t.collective}: {t.bytes / GIB:.2f} GiB over {t.link}, {t.seconds:.3g} s ({hidden})"
        )
    if not c.traffic:
        lines.append("    none (one device)")
    return lines


def format_plan(p: Plan, top: int = 10) -> str:
    """The ranking table, the winner explained, and its memory and traffic broken down."""
    acc, cfg = p.cluster.accelerator, p.cfg
    tokens = cfg.train.global_batch * cfg.train.seq_len
    lines = [
        f"jaxscale plan: {cfg.model.preset} ({p.parameters / 1e9:.2f} B parameters) on {p.cluster.name} = "
        f"{p.cluster.devices} x {acc.name} ({acc.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{acc.peak_flops / 1e12:.0f} TFLOP/s bf16)",
        f"step: {cfg.train.global_batch} x {cfg.train.seq_len} = {tokens:,} tokens, train.grad_accum="
        f"{cfg.train.grad_accum}, model.remat={cfg.model.remat}, mesh.strategy={cfg.mesh.strategy}",
        f"searched: every factorization over data, pipeline, fsdp, expert, tensor (pipeline meshes run "
        f"parallel.pipeline_schedule={cfg.parallel.pipeline_schedule} over the train.grad_accum microbatches).",
        f"{len(p.ranked)} meshes fit, {len(p.too_big)} do not, {len(p.rejected)} are not valid layouts.",
        "",
        _header(),
    ]
    lines += [_row(str(i + 1), c) for i, c in enumerate(p.ranked[:top])]
    if p.too_big:
        lines.append(f"  does not fit (smallest of {len(p.too_big)}):")
        lines += [_row("-", c) for c in p.too_big[:3]]
    if p.configured is not None:
        fits = "fits" if p.configured.fits else "does NOT fit"
        lines += ["", f"the config's own mesh ({fits}):", _row("cfg", p.configured)]
    lines += ["", explain(p)]
    best = p.ranked[0] if p.ranked else (p.too_big[0] if p.too_big else None)
    if best is not None:
        lines += ["", f"{'top choice' if p.ranked else 'smallest'}: {best.label()}", *_details(best)]
    return "\n".join(lines)


def _candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "mesh": c.mesh,
        "scan_unroll": c.scan_unroll,
        "remat": c.remat,
        "fits": c.fits,
        "memory_bytes": asdict(c.memory) | {"total": c.memory.total},
        "traffic": [asdict(t) for t in c.traffic],
        "compute_s": c.time.compute_s,
        "hidden_comm_s": c.time.hidden_comm_s,
        "exposed_comm_s": c.time.exposed_comm_s,
        "step_s": c.time.step_s,
        "mfu": c.mfu,
        "model_flops": c.time.model_flops,
        "hardware_flops": c.hardware_flops,
        "pipeline_bubble": c.schedule.time_bubble_fraction() if c.schedule else 0.0,
    }


def plan_dict(p: Plan) -> dict[str, Any]:
    """Everything in the plan, JSON-ready: numbers in bytes, seconds and FLOPs."""
    return {
        "hardware": {"name": p.cluster.name, "devices": p.cluster.devices} | asdict(p.cluster.accelerator),
        "parameters": p.parameters,
        "explanation": explain(p),
        "ranked": [_candidate_dict(c) for c in p.ranked],
        "too_big": [_candidate_dict(c) for c in p.too_big],
        "rejected": p.rejected,
        "configured": _candidate_dict(p.configured) if p.configured else None,
    }
