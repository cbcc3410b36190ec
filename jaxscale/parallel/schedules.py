"""Pipeline schedules as static tables: which stage does what, tick by tick (numpy, built before tracing).

A schedule runs P devices in lockstep ticks. In one tick a device runs at most one op, then every
device sends one activation downstream and one cotangent upstream (`lax.ppermute`, one tick of
latency). Each device follows a fixed order of forwards (F) and backwards (B), one per microbatch
and model chunk; a simulation played from the end places each op at the last tick that still feeds
every op reading its output in time, which gives the table (as many ticks as placing each op as
early as it can go). Memory follows from it: a stage keeps each microbatch's input from its arrival
until its backward, and a device's buffer has as many slots as it ever keeps at once.

- gpipe: all forwards, then all backwards. Every stage holds all M microbatches' inputs.
- 1f1b: after P - 1 - p warm-up forwards, device p alternates one forward and one backward, so it
  holds about P - p microbatches' inputs, whatever M (Narayanan et al. 2021, PipeDream-Flush).
- interleaved: each device holds V chunks; stage s = v * P + p lives on device p, chunk v. The op
  order is Megatron-LM's interleaved 1F1B (microbatches in groups of P), which shortens the fill and
  drain V-fold: bubble (P - 1) / (V M + P - 1) instead of (P - 1) / (M + P - 1).

Why a backward takes several ticks: a lockstep tick lasts as long as its costliest op, and a
backward costs about three forwards (it recomputes its stage's forward, then takes twice its FLOPs).
Where one tick pairs a forward on one device with a backward on the next (1F1B's steady state),
the forward's device idles two thirds of it: at P=4, M=16 that is 42% of device time against the
16% the schedule promises. So a stage's chunk of n layers is cut into k equal groups of layers and
its backward into k ticks, the last group first, each recomputing and differentiating one group
from that group's input (kept by the forward). With k = 3 every op costs about one forward and the
devices idle the textbook share. The forward keeps the k group inputs instead of one stage input.

Why as late as possible: the last stage's forward skips its last group (the head's backward
recomputes it), so it costs (k - 1) / k of a tick, and a tick where it runs alone is that short.
Placed as early as they can go, 1F1B's other devices run their warm-up forwards beside the last
stage's first forward and backwards beside its last; placed as late, those ops move into ticks the
devices idled anyway, both forwards run alone (as GPipe's last forward does), and 1F1B idles no
more than GPipe: at P=4, M=16, k=3, 0.168 of device time against GPipe's 0.172 (0.175 early).

`time_bubble_fraction` weighs the table by each op's cost: by default the nominal costs above
(`nominal_costs`), or measured ones (XLA's cost analysis of each branch, scripts/bench_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

IDLE, FWD, BWD = 0, 1, 2

# Columns of Schedule.table: what one device does in one tick.
BRANCH = 0  # one of the BRANCHES below
MB = 1  # the microbatch
CHUNK = 2  # which of the device's V chunks (v)
GROUP = 3  # backward: which of the chunk's k layer groups this tick differentiates
STASH_SLOT = 4  # slot of the stage's kept group inputs (written by its forward, read by its backward)
COT_SLOT = 5  # slot of the output cotangent (read by the first backward tick of stages before the last)
RECV_ACT = 6  # 1: an activation arrives at the end of this tick...
RECV_ACT_SLOT = 7  # ...into this stash slot (as group 0's input)
RECV_COT = 8  # 1: a cotangent arrives at the end of this tick...
RECV_COT_SLOT = 9  # ...into this slot
COLUMNS = 10

# The first stage embeds tokens, the last adds the head and loss. The last stage's forward runs its
# groups but the last (whose output only the head needs: its backward recomputes it), so with k = 1
# it runs nothing of its own. A backward tick differentiates one group; the first stage's group 0
# also differentiates the embedding, the last stage's group k - 1 the head and loss.
BRANCHES = ("idle", "fwd_first", "fwd_mid", "fwd_last", "bwd_first", "bwd_mid", "bwd_last")

# A backward costs its recompute (1) plus twice its forward's FLOPs (2), in forwards; under full remat
# the layers recompute once more inside it (4).
BACKWARD_COST = 3.0


@dataclass(frozen=True)
class Schedule:
    """A static pipeline schedule for P devices, V chunks per device, M microbatches and k backward ticks.

    `ops` [T, P, 4]: per tick and device, (kind IDLE/FWD/BWD, microbatch, chunk, group).
    `table` [T, P, COLUMNS] int32: the same ticks as the runner reads them (see the column names).
    """

    name: str
    stages: int  # P, devices along the pipeline axis
    virtual: int  # V, chunks per device
    microbatches: int  # M
    backward_ticks: int  # k, layer groups per chunk: ticks of one stage's backward
    backward_cost: float  # one stage's backward in forwards (nominal)
    ops: np.ndarray
    table: np.ndarray
    stash_slots: int  # microbatches whose stage inputs a device keeps at once (each k group inputs)
    cot_slots: int  # output cotangents a device keeps, at most

    @property
    def ticks(self) -> int:
        return self.ops.shape[0]

    @property
    def bubble_fraction(self) -> float:
        """Idle ticks over all ticks of all devices, counted in the table."""
        return float(np.mean(self.ops[..., 0] == IDLE))

    @property
    def nominal_costs(self) -> np.ndarray:
        """Each branch's cost in stage forwards: a forward 1, a backward tick backward_cost / k (BRANCHES order)."""
        k = self.backward_ticks
        bwd = self.backward_cost / k
        return np.array([0.0, 1.0, 1.0, (k - 1) / k, bwd, bwd, bwd])

    def time_bubble_fraction(self, costs: np.ndarray | None = None) -> float:
        """Idle share of device time when every lockstep tick lasts as long as its costliest op.

        `costs` [len(BRANCHES)]: each branch's cost (any unit); the nominal costs by default.
        """
        cost_TP = (self.nominal_costs if costs is None else np.asarray(costs, float))[self.table[..., BRANCH]]
        return float(1 - cost_TP.sum() / (cost_TP.max(axis=1).sum() * self.stages))

    def log_row(self) -> dict[str, int | float | str]:
        """The schedule's numbers for the run log: bubble from the table (slots and time) beside the textbook's."""
        return {
            "pipeline_schedule": self.name,
            "pipeline_stages": self.stages,
            "pipeline_virtual_stages": self.virtual,
            "pipeline_microbatches": self.microbatches,
            "pipeline_backward_ticks": self.backward_ticks,
            "pipeline_ticks": self.ticks,
            "pipeline_bubble": round(self.bubble_fraction, 4),
            "pipeline_bubble_time": round(self.time_bubble_fraction(), 4),
            "pipeline_bubble_theory": round(self.theory_bubble_fraction, 4),
            "pipeline_stash_slots": self.stash_slots,
        }

    @property
    def theory_bubble_fraction(self) -> float:
        """(P - 1) / (V M + P - 1): the textbook bubble of this schedule (V = 1 unless interleaved)."""
        p, v, m = self.stages, self.virtual, self.microbatches
        return (p - 1) / (v * m + p - 1)


def op_order(name: str, p: int, stages: int, microbatches: int, virtual: int) -> list[tuple[int, int, int]]:
    """Device p's ops in the order it runs them: (kind, microbatch, chunk)."""
    m, v = microbatches, virtual
    if name == "gpipe":
        return [(FWD, i, 0) for i in range(m)] + [(BWD, i, 0) for i in range(m)]

    def op(kind: int, k: int) -> tuple[int, int, int]:
        # The k-th forward (or backward) of this device: microbatches in groups of P, each group
        # through every chunk in turn (forward: chunk 0 first; backward: the last chunk first).
        group, within = divmod(k, stages * v)
        chunk = within // stages
        return kind, group * stages + within % stages, chunk if kind == FWD else v - 1 - chunk

    total = m * v
    warmup = min((stages - p - 1) * (2 if v > 1 else 1) + (v - 1) * stages, total)
    order = [op(FWD, k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [op(FWD, warmup + k), op(BWD, k)]
    return order + [op(BWD, k) for k in range(total - warmup, total)]


def build_schedule(
    name: str,
    stages: int,
    microbatches: int,
    virtual: int = 1,
    backward_ticks: int = 1,
    backward_cost: float = BACKWARD_COST,
) -> Schedule:
    """Simulate every device's op order in lockstep ticks and derive the runner's table.

    Each backward becomes `backward_ticks` consecutive ticks (its layer groups, the last first).
    Ops are placed once as early and once as late as they can go; of the two tables (the same
    number of ticks) the one idling less device time at nominal costs wins, late on a tie.
    Callers validate the numbers (jaxscale.training.layout.check_layout); interleaved needs
    `microbatches` to be a multiple of `stages`.
    """
    p_, m, v, k = stages, microbatches, virtual, backward_ticks
    last = p_ * v - 1
    orders = []
    for p in range(p_):
        order = []
        for kind, mb, chunk in op_order(name, p, p_, m, v):
            order += [(FWD, mb, chunk, 0)] if kind == FWD else [(BWD, mb, chunk, g) for g in reversed(range(k))]
        orders.append(order)

    def early(kind: int, mb: int, s: int, group: int, placed: dict) -> bool:
        """Ready once its inputs were made in an earlier tick."""
        if kind == FWD:
            return s == 0 or (FWD, mb, s - 1, 0) in placed
        if group < k - 1:  # a backward's later groups follow its first tick, on this device
            return True
        return (FWD, mb, s, 0) in placed and (s == last or (BWD, mb, s + 1, 0) in placed)

    def late(kind: int, mb: int, s: int, group: int, placed: dict) -> bool:
        """Ready, in reverse, once every op reading its output was placed in a later tick."""
        if kind == FWD:  # this stage's backward reads it too, later in the device's order
            return s == last or (FWD, mb, s + 1, 0) in placed
        if group > 0:  # a backward's earlier groups run right before its later ones, on this device
            return True
        return s == 0 or (BWD, mb, s - 1, k - 1) in placed

    where = f"{name} (P={p_}, M={m}, V={v}, k={k})"
    placed_late = _place([o[::-1] for o in orders], p_, late, where)[::-1]
    placed_early = _place(orders, p_, early, where)
    tables = [_with_table(name, p_, v, m, k, backward_cost, ops) for ops in (placed_late, placed_early)]
    return min(tables, key=lambda schedule: round(schedule.time_bubble_fraction(), 9))


def _place(orders: list[list[tuple[int, int, int, int]]], p_: int, ready: Callable, where: str) -> np.ndarray:
    """Lockstep ticks [T, P, 4]: each tick, each device runs its next op in `orders` if `ready` says so.

    `ready(kind, microbatch, stage, group, placed)`: whether the op may run now, given `placed`, the
    ops (kind, microbatch, stage, group) run in earlier ticks.
    """
    placed: set[tuple[int, int, int, int]] = set()
    nxt = [0] * p_
    rows = []
    while any(nxt[p] < len(orders[p]) for p in range(p_)):
        row = [(IDLE, 0, 0, 0)] * p_
        for p in range(p_):
            if nxt[p] < len(orders[p]):
                kind, mb, chunk, group = orders[p][nxt[p]]
                if ready(kind, mb, chunk * p_ + p, group, placed):
                    row[p] = orders[p][nxt[p]]
                    nxt[p] += 1
        if all(op[0] == IDLE for op in row):
            raise AssertionError(f"{where} schedule deadlocks at tick {len(rows)}")
        ran = [(kind, mb, chunk * p_ + p, group) for p, (kind, mb, chunk, group) in enumerate(row)]
        placed.update(op for op in ran if op[0] != IDLE)
        rows.append(row)
    return np.array(rows, dtype=np.int32)


def best_backward_ticks(
    name: str, stages: int, microbatches: int, virtual: int, layers_per_chunk: int, backward_cost: float
) -> int:
    """The split of each backward (a divisor of the chunk's layers, at most backward_cost + 1) idling least.

    Ops of equal cost keep the lockstep ticks full: with n divisible by 3, k = 3 (a backward tick
    then costs one forward). Otherwise the nearest divisors leave some idle; the simulation decides,
    and among equals the fewest ticks (the fewest kept group inputs) win.
    """
    candidates = [k for k in range(1, round(backward_cost) + 2) if layers_per_chunk % k == 0]
    bubble = {
        k: build_schedule(name, stages, microbatches, virtual, k, backward_cost).time_bubble_fraction()
        for k in candidates
    }
    return min(candidates, key=lambda k: (round(bubble[k], 6), k))


def _assign_slots(p_: int, intervals: dict[tuple[int, int], tuple[int, int]]) -> tuple[dict, int]:
    """Buffer slots for values alive from the end of tick `arrive` until read at tick `free`.

    `intervals` maps (microbatch, stage) -> (arrive, free), stage s on device s % P. Each device
    gets its own pool; taking values by arrival and reusing any slot freed at or before that tick
    uses as few slots as are ever alive at once (interval colouring). Returns the slot of every
    value and the largest pool.
    """
    slot_of, most = {}, 0
    for p in range(p_):
        mine = sorted((arrive, free, key) for key, (arrive, free) in intervals.items() if key[1] % p_ == p)
        free_at: list[int] = []  # per slot, the tick its value is read for the last time
        for arrive, free, key in mine:
            reusable = [i for i, f in enumerate(free_at) if f <= arrive]
            slot = reusable[0] if reusable else len(free_at)
            free_at[slot : slot + 1] = [free]
            slot_of[key] = slot
        most = max(most, len(free_at))
    return slot_of, most


def _branch(kind: int, stage: int, group: int, num_stages: int, k: int) -> str:
    """The runner's branch for one op (see BRANCHES)."""
    if kind == IDLE:
        return "idle"
    if kind == FWD:
        return "fwd_first" if stage == 0 else "fwd_last" if stage == num_stages - 1 else "fwd_mid"
    if stage == num_stages - 1 and group == k - 1:
        return "bwd_last"
    return "bwd_first" if stage == 0 and group == 0 else "bwd_mid"


def _with_table(name: str, p_: int, v: int, m: int, k: int, cost: float, ops: np.ndarray) -> Schedule:
    num_stages = p_ * v
    done_f = np.zeros((m, num_stages), int)  # tick each forward runs at
    first_b = np.zeros((m, num_stages), int)  # tick each backward's first tick (group k - 1) runs at
    done_b = np.zeros((m, num_stages), int)  # tick each backward's last tick (group 0) runs at
    for t, p in np.ndindex(*ops.shape[:2]):
        kind, mb, chunk, group = ops[t, p]
        s = chunk * p_ + p
        if kind == FWD:
            done_f[mb, s] = t
        if kind == BWD and group == k - 1:
            first_b[mb, s] = t
        if kind == BWD and group == 0:
            done_b[mb, s] = t
    # A stage's kept inputs: group 0's arrives at the end of the tick its upstream stage ran the
    # forward (the first stage makes its own), the others at the end of its own forward; all are
    # read for the last time by its backward's last tick. The first stage with one group keeps none:
    # its backward recomputes the embedding from the tokens.
    stash_of, stash = _assign_slots(
        p_,
        {
            (mb, s): (done_f[mb, s - 1] if s else done_f[mb, s], done_b[mb, s])
            for mb in range(m)
            for s in range(num_stages)
            if s or k > 1
        },
    )
    # An output cotangent arrives with the downstream backward's last tick; the first tick reads it.
    cot_of, cots = _assign_slots(
        p_, {(mb, s): (done_b[mb, s + 1], first_b[mb, s]) for mb in range(m) for s in range(num_stages - 1)}
    )
    table = np.zeros((*ops.shape[:2], COLUMNS), np.int32)
    for t, p in np.ndindex(*ops.shape[:2]):
        kind, mb, chunk, group = ops[t, p]
        s = chunk * p_ + p
        r = table[t, p]
        r[BRANCH] = BRANCHES.index(_branch(kind, s, group, num_stages, k))
        r[MB], r[CHUNK], r[GROUP] = mb, chunk, group
        r[STASH_SLOT], r[COT_SLOT] = stash_of.get((mb, s), 0), cot_of.get((mb, s), 0)
        up_kind, up_mb, up_chunk, _ = ops[t, (p - 1) % p_]
        up_stage = up_chunk * p_ + (p - 1) % p_
        if up_kind == FWD and up_stage + 1 < num_stages:
            r[RECV_ACT], r[RECV_ACT_SLOT] = 1, stash_of[up_mb, up_stage + 1]
        down_kind, down_mb, down_chunk, down_group = ops[t, (p + 1) % p_]
        down_stage = down_chunk * p_ + (p + 1) % p_
        if down_kind == BWD and down_group == 0 and down_stage > 0:
            r[RECV_COT], r[RECV_COT_SLOT] = 1, cot_of[down_mb, down_stage - 1]
    return Schedule(name, p_, v, m, k, cost, ops, table, stash, cots)
