"""Benchmark: jaxscale's default train step against MaxText's on the same model, mesh and devices.

Prints one table from ONE alternating run: for each cell (model x compute dtype x mesh) a jaxscale
process and a MaxText process each compile their train step once, then take turns, round by round
(the order flipped every round: A B, B A, ...), so a change of load on the machine falls on both.
Per cell: median ms/step of each (over all timed steps), their tokens/s ratio jaxscale / MaxText
(>= 1.00: jaxscale is at least as fast), the spread of that ratio over the rounds, and the same
ratio of CPU seconds per step (the work done, which a busy machine inflates less than wall time).

The models (one document per row, synthetic tokens, no checkpoints, 8 emulated CPU devices):
  base: d_model 256, 4 layers, 4 x 64 heads (4 KV), MLP 1024, vocab 256, 16 x 256 tokens
  wide: twice as wide and deep: d_model 512, 8 layers, 8 x 64 heads, MLP 2048, same batch
MaxText 0.2.5 runs with `scan_layers=false remat_policy=minimal attention=dot_product packing=false`
(its fastest setting on CPU) and float32 weights; jaxscale with its defaults and `data.packing=concat`
(MaxText's packing=false: no segment ids). Both untied (Llama 2's head), AdamW with clipping.

MaxText is never a dependency: install it in a side environment (the README's recipe) and pass its
python. Without one the script says so and exits 0.

Usage:
  .venv/bin/python scripts/bench_vs_maxtext.py --maxtext-python /work/venvs/maxtext/bin/python
      [--rounds 5] [--steps 5] [--models base,wide] [--dtypes float32,bfloat16] [--meshes fsdp8,dp2fsdp2tp2]
      [--json-out PATH] [key=value ...]   (extra jaxscale overrides, e.g. model.scan_unroll=4)
The same file is the worker each side runs (`--worker jaxscale|maxtext CELL_JSON`, started by the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEVICES = 8
PER_DEVICE_BATCH, SEQ_LEN, VOCAB = 2, 256, 256

# name: (d_model, layers, heads of 64, MLP width, steps per round relative to the base model's)
MODELS = {"base": (256, 4, 4, 1024, 1.0), "wide": (512, 8, 8, 2048, 0.4)}
MESHES = {"fsdp8": (1, 8, 1), "dp2fsdp2tp2": (2, 2, 2)}  # (data, fsdp, tensor)


@dataclass(frozen=True)
class Cell:
    """One comparison: a model of MODELS, a compute dtype, a mesh of MESHES; jaxscale's extra overrides."""

    model: str
    dtype: str
    mesh: str
    overrides: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return PER_DEVICE_BATCH * DEVICES * SEQ_LEN


def jaxscale_overrides(cell: Cell) -> list[str]:
    """jaxscale's config of `cell`: its defaults, the model's shape and the mesh."""
    d_model, layers, heads, d_ff, _ = MODELS[cell.model]
    data, fsdp, tensor = MESHES[cell.mesh]
    return [
        f"runtime.cpu_devices={DEVICES}",
        f"model.d_model={d_model}",
        f"model.n_layers={layers}",
        f"model.n_heads={heads}",
        f"model.n_kv_heads={heads}",
        "model.head_dim=64",
        f"model.d_ff={d_ff}",
        f"model.vocab_size={VOCAB}",
        "model.tie_embeddings=false",
        f"model.compute_dtype={cell.dtype}",
        f"train.seq_len={SEQ_LEN}",
        f"train.global_batch={PER_DEVICE_BATCH * DEVICES}",
        "data.packing=concat",
        f"mesh.data={data}",
        f"mesh.fsdp={fsdp}",
        f"mesh.tensor={tensor}",
        *cell.overrides,
    ]


def maxtext_argv(cell: Cell, base_yml: str, out_dir: str) -> list[str]:
    """MaxText's command line (pyconfig style) for `cell`."""
    d_model, layers, heads, d_ff, _ = MODELS[cell.model]
    data, fsdp, tensor = MESHES[cell.mesh]
    return [
        "train",
        base_yml,
        "run_name=bench_vs_jaxscale",
        f"base_output_directory={out_dir}",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        "jax_cache_dir=",  # no persistent compilation cache
        "dataset_type=synthetic",
        "steps=1000000",
        "enable_checkpointing=false",
        f"per_device_batch_size={PER_DEVICE_BATCH}",
        f"max_target_length={SEQ_LEN}",
        f"base_emb_dim={d_model}",
        f"base_num_query_heads={heads}",
        f"base_num_kv_heads={heads}",
        "head_dim=64",
        f"base_mlp_dim={d_ff}",
        f"base_num_decoder_layers={layers}",
        f"vocab_size={VOCAB}",
        "decoder_block=llama2",
        "mlp_activations=['silu','linear']",
        f"dtype={cell.dtype}",
        "weight_dtype=float32",
        "matmul_precision=default",
        "remat_policy=minimal",
        "scan_layers=false",
        "attention=dot_product",
        "packing=false",
        "enable_tensorboard=false",
        f"ici_data_parallelism={data}",
        f"ici_fsdp_parallelism={fsdp}",
        f"ici_tensor_parallelism={tensor}",
    ]


# ---------------------------------------------------------------- workers (one process per framework and cell)


def jaxscale_step(cell: Cell) -> tuple[Any, Any]:
    """jaxscale's compiled default train step of `cell` and its first carry: (advance, carry)."""
    import jax
    import numpy as np

    from jaxscale import runtime
    from jaxscale.config import load_config
    from jaxscale.training.setup import setup_run

    cfg = load_config(None, jaxscale_overrides(cell))
    runtime.initialize(cfg.runtime)
    setup = setup_run(cfg, tokenizer_vocab=VOCAB)
    rows, length = cfg.train.global_batch, cfg.train.seq_len
    tokens = np.random.default_rng(0).integers(0, VOCAB, (rows, length + 1), np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length), np.float32)}
    batch = jax.device_put(host, setup.batch_sharding)
    state = setup.init_state()
    compiled = setup.train_step().lower(state, batch).compile()

    def advance(state: Any) -> tuple[Any, float]:
        state, metrics = jax.block_until_ready(compiled(state, batch))
        return state, metrics["loss"]

    return advance, state


def maxtext_step(cell: Cell, out_dir: str) -> tuple[Any, Any]:
    """MaxText's compiled train step of `cell` as its train loop builds it (maxtext.trainers.pre_train.train)."""
    import jax
    from flax import nnx
    from flax.core.spmd import logical_axis_rules
    from maxtext.trainers.pre_train import train
    from maxtext.utils import sharding, train_utils

    base_yml = str(Path(train.__file__).resolve().parent.parent.parent / "configs" / "base.yml")
    config, recorder = train.initialize(maxtext_argv(cell, base_yml, out_dir))
    _, _, shardings, _, mesh, _, _, loader, rampup, _, state = train_utils.setup_train_loop(config, recorder)
    graphdef, state = nnx.split(state)
    params_shardings, shardings = sharding.maybe_update_params_sharding_with_opt(config, shardings)
    jitted, _ = train_utils.jit_train_and_eval_step(
        config, graphdef, mesh, state, shardings, train.train_step, train.eval_step, None, params_shardings
    )
    with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
        batch = loader.load_next_batch(rampup_manager=rampup)
        compiled = jitted.lower(state, batch).compile()

    def advance(state: Any) -> tuple[Any, float]:
        with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
            state, metrics = jax.block_until_ready(compiled(state, batch))
        return state, metrics["scalar"]["learning/loss"]

    return advance, state


def serve(framework: str, cell: Cell) -> None:
    """Worker loop: compile, say `ready`, then answer each `run N` with N steps' wall and CPU seconds.

    Messages go to the original stdout; everything else (libraries' chatter included) to stderr.
    """
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ["JAX_PLATFORMS"] = "cpu"
    if framework == "maxtext":  # jaxscale sets its device count from its config
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        advance, carry = jaxscale_step(cell) if framework == "jaxscale" else maxtext_step(cell, out_dir)
        answer.write(json.dumps({"ready": time.perf_counter() - started}) + "\n")
        for line in sys.stdin:
            command = line.split()
            if command[:1] != ["run"]:
                break
            wall, cpu, loss = [], [], None
            for _ in range(int(command[1])):
                t0, c0 = time.perf_counter(), time.process_time()
                carry, loss = advance(carry)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            answer.write(json.dumps({"wall": wall, "cpu": cpu, "loss": float(loss)}) + "\n")


# ---------------------------------------------------------------- the coordinator


class Worker:
    """One framework's worker process for one cell, its chatter in a log file."""

    def __init__(self, python: str, framework: str, cell: Cell, log_dir: Path):
        self.framework = framework
        self.log_path = log_dir / f"{framework}-{cell.model}-{cell.dtype}-{cell.mesh}.log"
        self.log = self.log_path.open("w")
        env = os.environ | {"PYTHONPATH": str(REPO)} if framework == "jaxscale" else dict(os.environ)
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", framework, json.dumps(asdict(cell))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
            env=env,
        )

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"{self.framework} worker exited ({self.process.returncode}); its log ends:\n{tail}")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def compare(cell: Cell, pythons: dict[str, str], rounds: int, steps: int, log_dir: Path) -> dict[str, Any]:
    """Both workers of `cell`, compiled one after the other, then `rounds` timed rounds taking turns."""
    workers = {}
    try:
        for framework in ("jaxscale", "maxtext"):  # compiled one at a time: compiles do not overlap timed steps
            workers[framework] = Worker(pythons[framework], framework, cell, log_dir)
            compile_s = workers[framework].receive()["ready"]
            print(f"    {framework} ready in {compile_s:.0f} s", flush=True)
        samples: dict[str, dict[str, list[float]]] = {f: {"wall": [], "cpu": [], "round": []} for f in workers}
        losses = {}
        order = list(workers)
        for r in range(rounds + 1):  # round 0 warms both up
            for framework in order if r % 2 == 0 else order[::-1]:
                result = workers[framework].run(steps)
                losses[framework] = result["loss"]
                if r:
                    samples[framework]["wall"] += result["wall"]
                    samples[framework]["cpu"] += result["cpu"]
                    samples[framework]["round"].append(statistics.median(result["wall"]))
    finally:
        for worker in workers.values():
            worker.close()
    median = {f: {k: statistics.median(v) for k, v in s.items() if k != "round"} for f, s in samples.items()}
    per_round = [m / j for j, m in zip(samples["jaxscale"]["round"], samples["maxtext"]["round"], strict=True)]
    return {
        "model": cell.model,
        "dtype": cell.dtype,
        "mesh": cell.mesh,
        "jaxscale_ms": 1e3 * median["jaxscale"]["wall"],
        "maxtext_ms": 1e3 * median["maxtext"]["wall"],
        "ratio": median["maxtext"]["wall"] / median["jaxscale"]["wall"],  # tokens/s jaxscale / MaxText
        "ratio_rounds": [min(per_round), max(per_round)],
        "cpu_ratio": median["maxtext"]["cpu"] / median["jaxscale"]["cpu"],
        "jaxscale_loss": losses["jaxscale"],
        "maxtext_loss": losses["maxtext"],
        "tokens_per_step": cell.tokens,
        "steps_timed": len(samples["jaxscale"]["wall"]),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'model':<6} {'dtype':<9} {'mesh':<12} {'MaxText ms':>11} {'jaxscale ms':>12} "
          f"{'tokens/s js/MT':>15} {'per round':>14} {'CPU js/MT':>10}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<6} {r['dtype']:<9} {r['mesh']:<12} failed: {r['error'].splitlines()[0]}")
            continue
        spread = f"{r['ratio_rounds'][0]:.2f}-{r['ratio_rounds'][1]:.2f}"
        print(
            f"{r['model']:<6} {r['dtype']:<9} {r['mesh']:<12} {r['maxtext_ms']:>11.0f} {r['jaxscale_ms']:>12.0f} "
            f"{r['ratio']:>15.3f} {spread:>14} {r['cpu_ratio']:>10.3f}"
        )


def maxtext_python(given: str | None) -> str | None:
    """The python of an environment where `import maxtext` works: --maxtext-python, $MAXTEXT_PYTHON, or this one."""
    for candidate in (given, os.environ.get("MAXTEXT_PYTHON"), sys.executable):
        if not candidate:
            continue
        probe = subprocess.run([candidate, "-c", "import maxtext"], capture_output=True, cwd="/")
        if probe.returncode == 0:
            return candidate
        if candidate == given:
            print(f"--maxtext-python {given}: `import maxtext` fails there:\n{probe.stderr.decode()[-600:]}")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maxtext-python", help="python of the side environment with MaxText (or $MAXTEXT_PYTHON)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell, after one warm-up round")
    parser.add_argument("--steps", type=int, default=5, help="steps per round on the base model (wide: 40%%)")
    parser.add_argument("--models", default="base,wide")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--meshes", default="fsdp8,dp2fsdp2tp2")
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "CELL"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra jaxscale key=value overrides")
    args = parser.parse_args()
    if args.worker:
        serve(
            args.worker[0],
            Cell(**{k: tuple(v) if k == "overrides" else v for k, v in json.loads(args.worker[1]).items()}),
        )
        return
    python = maxtext_python(args.maxtext_python)
    if python is None:
        print(
            "skipped: MaxText is not installed. Install MaxText 0.2.5 in a side environment (README, 'Benchmarks') "
            "and pass its python with --maxtext-python PATH (or set MAXTEXT_PYTHON)."
        )
        return
    unknown = [m for m in args.models.split(",") if m not in MODELS] + [
        m for m in args.meshes.split(",") if m not in MESHES
    ]
    if unknown:
        raise SystemExit(f"unknown model or mesh {unknown}: models {list(MODELS)}, meshes {list(MESHES)}")
    load = os.getloadavg()
    print(f"MaxText from {python}; {os.cpu_count()} CPU cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for model in args.models.split(","):
            steps = max(1, round(args.steps * MODELS[model][4]))
            for dtype in args.dtypes.split(","):
                for mesh in args.meshes.split(","):
                    cell = Cell(model, dtype, mesh, tuple(args.overrides))
                    print(f"  {model} {dtype} {mesh}: {args.rounds} rounds x {steps} steps", flush=True)
                    try:
                        rows.append(
                            compare(cell, {"jaxscale": sys.executable, "maxtext": python}, args.rounds, steps, log_dir)
                        )
                    except RuntimeError as e:
                        rows.append({"model": model, "dtype": dtype, "mesh": mesh, "error": str(e)})
                        print(f"    failed: {e}", flush=True)
    load_after = os.getloadavg()
    print_table(rows)
    print(f"load average before {load[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    if args.json_out:
        meta = {"load_before": load, "load_after": load_after, "overrides": args.overrides, "rounds": args.rounds}
        args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
