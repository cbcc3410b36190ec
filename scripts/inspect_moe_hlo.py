"""Inspect the compiled expert-parallel train step: all-to-alls present, expert weights never all-gathered.

Compiles the train step of a run config (default configs/tiny_moe.yaml: data=2 x expert=4 on 8
emulated CPU devices) ahead of time, reads the optimized HLO, and prints:
  - every collective kind with its count and bytes per device per step (ops inside the layer
    scan counted once per iteration),
  - whether any all-gather runs over the expert axis, and whether any gathers expert weights,
  - all-to-all bytes per device per step against the analytic figure
    tokens x d_model x k x 2 (there and back) x bytes per element, per MoE layer, forward only.
Exits 1 if there is no all-to-all or an expert weight is all-gathered over the expert axis.

With `--topology T` (e.g. v5p:2x2x1; needs the `tpu` extra, no TPU) the step is compiled for that
TPU topology instead, and again with the experts unsplit (the expert axis's devices moved to
`data`), and it also prints XLA's FLOPs per device of both and their ratio. With dropless routing
`model.expert_exchange=auto` is ragged there: the HLO must hold ragged all-to-alls.

    .venv/bin/python scripts/inspect_moe_hlo.py [CONFIG] [--topology T] [section.key=value ...]
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8}
SHAPE = re.compile(r"\b(pred|s8|u8|bf16|f16|s16|f32|s32|u32|f64)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclass
class Collective:
    kind: str
    computation: str
    result_bytes: int
    elements: int
    shapes: list[tuple[int, ...]]
    groups: list[list[int]]
    backward: bool


def shapes_of(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in SHAPE.findall(text)]


def replica_groups(attrs: str) -> list[list[int]]:
    """Device groups from any HLO spelling: mesh[...] {'axes'}, explicit {{0,1},{2,3}}, iota [G,S]<=[dims]T(p)."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if named:  # the mesh it names may be a flattened one (e.g. 'axis_0'=8): read its own axes
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", named[1])}
        names, shape = list(sizes), tuple(sizes.values())
        axes = [names.index(a) for a in re.findall(r"'(\w+)'", named[2])]
        ids = np.arange(math.prod(shape)).reshape(shape)
        rest = [i for i in range(len(shape)) if i not in axes]
        return ids.transpose(rest + axes).reshape(-1, math.prod(shape[a] for a in axes)).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        groups, size = int(iota[1]), int(iota[2])
        dims = [int(d) for d in iota[3].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota[4]:
            ids = ids.transpose([int(p) for p in iota[4].split(",")])
        return ids.reshape(groups, size).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if explicit:
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", explicit[1])]
    return []


def parse(hlo: str) -> tuple[list[Collective], dict[str, int]]:
    """Collectives, and how many times each computation runs per step (while-loop trip counts)."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # callee -> [(caller, times per call)]
    collectives, entry, current = [], None, None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            match = COMPUTATION.match(line)
            if match:
                current = match[1]
                entry = current if line.startswith("ENTRY") else entry
            continue
        match = INSTRUCTION.match(line)
        if not match or current is None:
            continue
        _, result, op, rest = match.groups()
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
        for key, callee in re.findall(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)", rest):
            calls[callee].append((current, int(trip[1]) if key == "body" and trip else 1))
        kind = op.removesuffix("-start")
        if kind in COLLECTIVES:
            shapes = shapes_of(result)
            collectives.append(
                Collective(
                    kind=kind,
                    computation=current,
                    result_bytes=sum(DTYPE_BYTES[dt] * math.prod(s) for dt, s in shapes),
                    elements=sum(math.prod(s) for _, s in shapes),
                    shapes=[s for _, s in shapes],
                    groups=replica_groups(rest),
                    backward="transpose(" in rest,
                )
            )

    runs: dict[str, int] = {}

    def times(comp: str) -> int:
        if comp not in runs:
            runs[comp] = 1 if comp == entry else sum(times(caller) * n for caller, n in calls.get(comp, []))
        return runs[comp]

    for c in collectives:
        times(c.computation)
    return collectives, runs


def spans_axis(groups: list[list[int]], mesh_shape: tuple[int, ...], axis: int) -> bool:
    """Whether some replica group holds devices that differ in their coordinate along mesh axis `axis`."""
    return any(len({np.unravel_index(d, mesh_shape)[axis] for d in g}) > 1 for g in groups)


def compile_step(cfg, devices) -> tuple:
    """(run setup, optimized HLO text, XLA's FLOPs per device) of the train step of `cfg` on `devices`."""
    from jaxscale.training.setup import setup_run

    setup = setup_run(cfg, devices, tokenizer_vocab=256)
    compiled = setup.lower_train_step().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return setup, compiled.as_text(), float(cost.get("flops", 0.0))


def main(argv: list[str]) -> int:
    topology = argv[argv.index("--topology") + 1] if "--topology" in argv else None
    args = [a for i, a in enumerate(argv) if a != "--topology" and (i == 0 or argv[i - 1] != "--topology")]
    path = args[0] if args and "=" not in args[0] else "configs/tiny_moe.yaml"
    overrides = [a for a in args if "=" in a]

    from jaxscale.config import load_config

    cfg = load_config(path, overrides)
    import jax

    jax.config.update("jax_platforms", "cpu")
    if topology is None:
        jax.config.update("jax_num_cpu_devices", cfg.runtime.cpu_devices or 8)
        devices = jax.devices()
    else:
        from jaxscale.aot import topology_devices

        devices = topology_devices(topology)

    setup, hlo, flops = compile_step(cfg, devices)
    mesh, shape, rules = setup.mesh, setup.shape, setup.rules
    mesh_shape = tuple(mesh.devices.shape)
    collectives, runs = parse(hlo)

    print(f"mesh {dict(mesh.shape)} on {topology or 'CPU'}; model {cfg.model.preset}: E={shape.num_experts} ")
    print(f"  k={shape.experts_per_token} capacity_factor={shape.capacity_factor} d_model={shape.d_model}")
    print(f"  MoE layers={shape.n_moe_layers} expert_exchange={cfg.model.expert_exchange}")
    print("\ncollectives per device per step (count, MiB):")
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for c in collectives:
        totals[c.kind][0] += runs[c.computation]
        totals[c.kind][1] += runs[c.computation] * c.result_bytes / 2**20
    for kind, (count, mib) in sorted(totals.items()):
        print(f"  {kind:20s} {count:5d} {mib:10.3f}")

    expert_axis = mesh.axis_names.index("expert")
    a2a = [c for c in collectives if c.kind in ("all-to-all", "ragged-all-to-all")]
    ragged = [c for c in a2a if c.kind == "ragged-all-to-all"]
    gathers_over_expert = [
        c for c in collectives if c.kind == "all-gather" and spans_axis(c.groups, mesh_shape, expert_axis)
    ]
    expert_weight_gathers = [c for c in gathers_over_expert if any(shape.num_experts in s for s in c.shapes)]
    print(
        f"\nall-to-all ops: {len(a2a)} in the HLO ({len(ragged)} ragged), all over the expert axis: "
        f"{all(spans_axis(c.groups, mesh_shape, expert_axis) for c in a2a)}"
    )
    print(f"all-gathers over the expert axis: {len(gathers_over_expert)} {[c.shapes for c in gathers_over_expert]}")
    print(f"  of them on an array with an experts dimension (E={shape.num_experts}): {len(expert_weight_gathers)}")

    if ragged:
        print("\nragged all-to-alls move only routed rows; their buffers are sized, not filled: no byte ratio.")
    else:
        print_padded_bytes(cfg, shape, mesh, rules, a2a, runs)
    from jaxscale.models.expert_parallel import resolve_exchange

    dropless = cfg.model.capacity_factor <= 0
    ragged_expected = resolve_exchange(cfg.model.expert_exchange, devices[0].platform, dropless) == "ragged"
    print(f"ragged exchange expected on {devices[0].platform}: {ragged_expected}, found: {bool(ragged)}")
    ok = bool(a2a) and not expert_weight_gathers and bool(ragged) == ragged_expected
    if topology is not None:
        compare_unsplit(path, overrides, devices, flops, mesh)
    print("\nOK: all-to-all dispatch, no all-gather of expert weights over the expert axis" if ok else "\nFAILED")
    return 0 if ok else 1


def compare_unsplit(path: str, overrides: list[str], devices, flops: float, mesh) -> None:
    """Print XLA's FLOPs per device beside the same model's with its experts unsplit."""
    from jaxscale.config import load_config

    sizes = dict(mesh.shape)
    unsplit = overrides + [f"mesh.data={sizes['data'] * sizes['expert']}", "mesh.expert=1"]
    _, _, unsplit_flops = compile_step(load_config(path, unsplit), devices)
    print(
        f"\nXLA FLOPs per device: experts split {flops:.4g}, unsplit {unsplit_flops:.4g}, "
        f"ratio {flops / unsplit_flops:.3f}"
    )
    print("  (XLA charges ragged_dot per row of its static buffer: 2 x rows x D x F, whatever the kernel skips)")


def print_padded_bytes(cfg, shape, mesh, rules, a2a: list[Collective], runs: dict[str, int]) -> None:
    """All-to-all bytes of the padded exchange against the analytic bytes of the routed tokens."""
    import jax

    # Tokens on one device's batch shard; the expert axis splits the batch outside MoE layers.
    batch_shards = math.prod(mesh.shape[a] for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    tokens_per_device = cfg.train.global_batch * cfg.train.seq_len // batch_shards
    elem = jax.numpy.dtype(cfg.model.compute_dtype).itemsize
    analytic = tokens_per_device * shape.d_model * shape.experts_per_token * 2 * elem * shape.n_moe_layers
    # XLA:CPU runs bf16 collectives in f32, so the compiled bytes are also counted at the compute dtype.
    forward = sum(runs[c.computation] * c.elements for c in a2a if not c.backward) * elem
    total = sum(runs[c.computation] * c.elements for c in a2a) * elem
    compiled = sum(runs[c.computation] * c.result_bytes for c in a2a)
    print("\nall-to-all bytes per device per step (the buffer each device sends, its own share included):")
    print(
        f"  analytic, forward: {tokens_per_device} tokens x {shape.d_model} x k={shape.experts_per_token} x 2 x "
        f"{elem} B x {shape.n_moe_layers} layers = {analytic / 2**20:.3f} MiB"
    )
    print(f"  measured, forward:            {forward / 2**20:.3f} MiB  ratio {forward / analytic:.3f}")
    print(f"  measured, forward + backward: {total / 2**20:.3f} MiB  ratio {total / analytic:.3f}")
    print(f"  as compiled for this backend: {compiled / 2**20:.3f} MiB (element type as the backend moves it)")
    capacity = shape.moe_shape().capacity(cfg.train.seq_len)
    padding = shape.num_experts * capacity / (cfg.train.seq_len * shape.experts_per_token)
    print(f"  expected forward ratio: buffer padding E x C / (L x k) = {padding:.3f}; backward doubles it")
    print(f"  off-device share of each all-to-all: (n-1)/n = {(mesh.shape['expert'] - 1) / mesh.shape['expert']:.2f}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
