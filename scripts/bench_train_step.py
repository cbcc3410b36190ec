"""Benchmark: jaxscale's train step against an independent plain-jnp Llama step, and the data share.

Prints, from one run on the same devices:
  1. the loss of jaxscale's model and of the reference (scripts/reference_llama.py) on one batch from the
     same initial parameters, before and after one optimizer step (fp32: equal within 1e-5 relative);
  2. median step time of jaxscale's compiled train step over that of the reference, its layers unrolled
     and scanned, timed in alternating rounds (target <= 1.02);
  3. the collectives (count and bytes, those in a loop body counted once per trip) and fusions in each
     compiled step's HLO, side by side;
  4. the data pipeline's share of step time in a short run of the same config: time the loop waited on
     input over step time, from the run's own metrics.jsonl (target < 2%).

The batch holds one document per row (no segment ids), the same arrays for both steps.

Usage: .venv/bin/python scripts/bench_train_step.py [--quick] [--hlo DIR] [configs/tiny.yaml] [key=value ...]
  --quick: 3 rounds x 5 steps (default 5 x 20) and a 30-step data share run (default 60);
  --hlo DIR: also write each compiled step's HLO text there.
The issue's model (the tiny preset's 4 layers, 4 query and 2 KV heads, widened) on 8 CPU devices, fsdp=8, fp32:
  .venv/bin/python scripts/bench_train_step.py --quick configs/tiny.yaml model.d_model=256 model.head_dim=64 \
      model.d_ff=1024 train.seq_len=256 train.global_batch=16 mesh.data=1 mesh.fsdp=8 mesh.tensor=1 \
      model.compute_dtype=float32
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import reference_llama as ref
from flax import nnx
from jax.sharding import AxisType

from jaxscale import runtime
from jaxscale.config import load_config
from jaxscale.training.loop import train
from jaxscale.training.setup import RunSetup, setup_run
from jaxscale.training.state import make_optimizer

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}


def timed_steps(advance: Callable, carry: Any, batch: dict, n: int) -> tuple[float, Any]:
    """Median wall time of `carry, loss = advance(carry, batch)` over `n` steps, each waited on."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        carry, _ = jax.block_until_ready(advance(carry, batch))
        times.append(time.perf_counter() - started)
    return statistics.median(times), carry


# Where each reference parameter lies in jaxscale's model state (blocks stacked like the reference's layers).
JAXSCALE_PATHS = {"embed": "embed", "final_norm": "final_norm.scale", "lm_head": "lm_head"}
JAXSCALE_LAYER_PATHS = {
    "attn_norm": "blocks.attn_norm.scale",
    "wq": "blocks.attn.wq",
    "wk": "blocks.attn.wk",
    "wv": "blocks.attn.wv",
    "wo": "blocks.attn.wo",
    "mlp_norm": "blocks.mlp_norm.scale",
    "w_gate": "blocks.mlp.w_gate",
    "w_up": "blocks.mlp.w_up",
    "w_down": "blocks.mlp.w_down",
}


def reference_params(setup: RunSetup, state: nnx.State, shape: ref.Shape) -> ref.Params:
    """jaxscale's model parameters in `state`, copied to host in the reference's layout (layers stacked).

    Raises ValueError naming every parameter whose path is missing or whose shape differs, and every
    jaxscale parameter the reference has no place for.
    """
    model, _ = nnx.merge(setup.graphdef, state)
    flat = {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shapes = ref.param_shapes(shape)
    layer_shapes = shapes.pop("layers")
    wanted = [(k, JAXSCALE_PATHS[k], v) for k, v in shapes.items()]
    wanted += [(k, JAXSCALE_LAYER_PATHS[k], v) for k, v in layer_shapes.items()]
    problems = [
        f"  {name} <- {path}: jaxscale has {flat[path].shape if path in flat else 'nothing'}, reference wants {want}"
        for name, path, want in wanted
        if path not in flat or flat[path].shape != want
    ]
    problems += [f"  {path}: no place in the reference" for path in sorted(set(flat) - {p for _, p, _ in wanted})]
    if problems:
        raise ValueError("jaxscale's parameters do not map onto the reference's:\n" + "\n".join(problems))
    params = {k: np.asarray(flat[JAXSCALE_PATHS[k]]) for k in shapes}
    params["layers"] = {k: np.asarray(flat[JAXSCALE_LAYER_PATHS[k]]) for k in layer_shapes}
    return params


def hlo_profile(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{opcode: (times run per step, bytes of its results per step)} for the collectives and fusions of an HLO module.

    Instructions in a while loop's body count once per trip where XLA knows the trip count (a scan).
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current and line.strip() and line.strip() != "}":
            computations[current].append(line)

    times: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, multiplicity: int) -> None:
        times[name] += multiplicity
        for line in computations.get(name, ()):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for callee in re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line):
                visit(callee, multiplicity * (int(trips.group(1)) if trips and "body=" in line else 1))

    visit(entry, 1)
    profile: dict[str, tuple[int, int]] = collections.defaultdict(lambda: (0, 0))
    for name, lines in computations.items():
        for line in lines:
            op = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][a-z0-9\-]*)\(", line)
            if not op or op.group(2).removesuffix("-start") not in (*COLLECTIVES, "fusion"):
                continue
            kind = op.group(2).removesuffix("-start")
            size = sum(
                _BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1))
            )
            count, total = profile[kind]
            profile[kind] = (count + times[name], total + times[name] * size)
    return dict(profile)


def print_profiles(profiles: dict[str, dict[str, tuple[int, int]]]) -> None:
    """`hlo_profile`s side by side: one row per collective (times run, result MiB) and for fusions."""
    names = list(profiles)
    print(f"{'HLO per step: runs, result MiB':<34}" + "".join(f"{n:>26}" for n in names))
    for kind in (*COLLECTIVES, "fusion"):
        cells = []
        for n in names:
            count, size = profiles[n].get(kind, (0, 0))
            cells.append(f"{count:>6} {size / 2**20:>9.2f} MiB" if kind != "fusion" else f"{count:>6}{'':>14}")
        print(f"  {kind:<32}" + "".join(f"{c:>26}" for c in cells))


def parse_args(argv: list[str]) -> tuple[str, list[str], bool, Path | None]:
    """(config path, key=value overrides, --quick, --hlo DIR) from the command line."""
    hlo_dir = None
    if "--hlo" in argv:
        i = argv.index("--hlo")
        hlo_dir, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    quick = "--quick" in argv
    positional = [a for a in argv if a != "--quick" and "=" not in a]
    return (positional[0] if positional else "configs/tiny.yaml"), [a for a in argv if "=" in a], quick, hlo_dir


def candidates_of(setup: RunSetup, host_batch: dict[str, np.ndarray]) -> tuple[dict, dict[str, str]]:
    """The three compiled steps from the same initial parameters, and their HLO texts.

    Returns ({name: (advance, carry, batch)}, {name: HLO}), where `advance(carry, batch) -> (carry, loss)`.
    """
    cfg, s, sizes = setup.cfg, setup.shape, dict(setup.mesh.shape)
    state = setup.init_state()
    batch = jax.device_put(host_batch, setup.batch_sharding)
    jaxscale_step = setup.train_step().lower(state, batch).compile()

    def jaxscale_advance(state: nnx.State, b: dict) -> tuple[nnx.State, jax.Array]:
        state, metrics = jaxscale_step(state, b)
        return state, metrics["loss"]

    candidates = {"jaxscale": (jaxscale_advance, state, batch)}
    hlo_texts = {"jaxscale": jaxscale_step.as_text()}

    # The reference on a mesh of the same devices and degrees, with jaxscale's optimizer.
    shape = ref.Shape(
        s.vocab_size, s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff,
        s.rope_theta, s.norm_eps, s.tie_embeddings, s.compute_dtype,
    )  # fmt: skip
    axes = ("data", "fsdp", "tensor")
    mesh = jax.make_mesh(tuple(sizes[a] for a in axes), axes, axis_types=(AxisType.Auto,) * 3)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    stacked = reference_params(setup, state, shape)
    for name, params in (("ref unrolled", ref.unstack(stacked)), ("ref scanned", stacked)):
        step, params, opt_state, ref_batch_sharding = ref.make_step(shape, mesh, tx, params)
        ref_batch = jax.device_put(host_batch, ref_batch_sharding)
        compiled = step.lower(params, opt_state, ref_batch).compile()

        def ref_advance(carry: tuple, b: dict, compiled: Callable = compiled) -> tuple[tuple, jax.Array]:
            params, opt_state, loss = compiled(*carry, b)
            return (params, opt_state), loss

        candidates[name] = (ref_advance, (params, opt_state), ref_batch)
        hlo_texts[name] = compiled.as_text()
    return candidates, hlo_texts


def check_losses(candidates: dict, fp32: bool) -> None:
    """Run each step twice, print its losses (from the initial parameters, then after one update) beside
    jaxscale's, and in fp32 assert the initial ones agree within 1e-5 relative. Advances the carries."""
    losses: dict[str, list[float]] = {}
    for name, (advance, carry, b) in candidates.items():
        losses[name] = []
        for _ in range(2):
            carry, loss = advance(carry, b)
            losses[name].append(float(loss))
        candidates[name] = (advance, carry, b)
    ours = losses.pop("jaxscale")
    for name, theirs in losses.items():
        for when, mine, other in zip(("initial", "after 1 step"), ours, theirs, strict=True):
            relative = abs(other - mine) / abs(mine)
            print(f"loss {when:<12} jaxscale {mine:.7f}  {name} {other:.7f}  relative difference {relative:.1e}")
        relative = abs(theirs[0] - ours[0]) / abs(ours[0])
        assert not fp32 or relative <= 1e-5, f"{name}'s initial loss differs from jaxscale's by {relative:.1e} (> 1e-5)"


def median_step_times(candidates: dict, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median over `rounds` of each step's median time in a round, the candidates taking turns round by round."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds + 1):
        for name, (advance, carry, b) in candidates.items():
            seconds, carry = timed_steps(advance, carry, b, steps_per_round)
            candidates[name] = (advance, carry, b)
            if round_index:  # round 0 warms up
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def data_share(path: str, overrides: list[str], steps: int) -> float:
    """The fraction of step time the training loop waited on input, over steps 11 to `steps` of a short run."""
    with tempfile.TemporaryDirectory() as run_dir:
        run_overrides = [
            f"run.dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=0",
            "log.progress=false",
            "log.every=10",
            f"train.eval_every={steps}",
            "train.eval_batches=1",
            "log.tensorboard=false",
        ]
        train(load_config(path, [*overrides, *run_overrides]))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "data_wait_s" in r][1:]  # the first interval holds the first dispatch
    return sum(r["data_wait_s"] for r in steady) / sum(r["step_time_s"] for r in steady)


def main() -> None:
    path, overrides, quick, hlo_dir = parse_args(sys.argv[1:])
    rounds, steps_per_round, share_steps = (3, 5, 30) if quick else (5, 20, 60)
    cfg = load_config(path, overrides)
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg)
    sizes = dict(setup.mesh.shape)
    if any(n > 1 for a, n in sizes.items() if a not in ("data", "fsdp", "tensor")) or setup.shape.num_experts:
        raise SystemExit("the reference is a dense Llama on a data x fsdp x tensor mesh; set the other axes to 1")
    if cfg.train.grad_accum != 1:
        raise SystemExit("the reference takes the whole batch at once; set train.grad_accum=1")
    B, L = cfg.train.global_batch, cfg.train.seq_len
    tokens = np.random.default_rng(0).integers(0, setup.shape.vocab_size, (B, L + 1), np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((B, L), np.float32)}

    candidates, hlo_texts = candidates_of(setup, host_batch)
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        for name, text in hlo_texts.items():
            (hlo_dir / f"{name.replace(' ', '_')}.hlo.txt").write_text(text)
    print(f"mesh {sizes}, batch {B}x{L}, compute {cfg.model.compute_dtype}, params {cfg.model.param_dtype}")
    check_losses(candidates, fp32=cfg.model.compute_dtype == "float32")
    median = median_step_times(candidates, rounds, steps_per_round)
    for name, t in median.items():
        ratio = f"   jaxscale / this {median['jaxscale'] / t:6.3f}   (target <= 1.02)" if name != "jaxscale" else ""
        print(f"{name:<14} {t * 1e3:9.2f} ms (median of {rounds} rounds x {steps_per_round} steps){ratio}")
    print_profiles({name: hlo_profile(text) for name, text in hlo_texts.items()})
    share = data_share(path, overrides, share_steps)
    print(f"data pipeline share of step time (steps 11-{share_steps}): {100 * share:.3f}%   (target < 2%)")


if __name__ == "__main__":
    main()
