"""Pipeline schedules as static tables: which stage does what, tick by tick (numpy, built before tracing).

A schedule runs P devices in lockstep ticks. In one tick a device runs at most one op: the forward
(F) or the backward (B) of one microbatch through one of its model chunks, then every device sends
one activation downstream and one cotangent upstream (`lax.ppermute`, one tick of latency). Each
device follows a fixed op order; a simulation starts each op at the first tick its inputs have
arrived, which gives the table. Memory follows from it: a stage keeps each microbatch's input from
its arrival until its backward, and a device's buffer has as many slots as it ever keeps at once.

- gpipe: all forwards, then all backwards. Every stage holds all M microbatches' inputs.
- 1f1b: after P - 1 - p warm-up forwards, device p alternates one forward and one backward, so it
  holds about P - p microbatches' inputs, whatever M (Narayanan et al. 2021, PipeDream-Flush).
- interleaved: each device holds V chunks; stage s = v * P + p lives on device p, chunk v. The op
  order is Megatron-LM's interleaved 1F1B (microbatches in groups of P), which shortens the fill and
  drain V-fold: bubble (P - 1) / (V M + P - 1) instead of (P - 1) / (M + P - 1).

Ops take one tick whatever their kind, so idle ticks / all ticks is the bubble of a pipeline whose
backward costs what its forward does. A real backward costs about three forwards (it recomputes its
stage's forward, then takes twice its FLOPs), and a lockstep tick lasts as long as its costliest op:
`time_bubble_fraction` weighs the table by those costs, which is what the devices actually idle.
Where a tick pairs forwards with backwards (1F1B's steady state) it is far above the slot count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IDLE, FWD, BWD = 0, 1, 2

# Columns of Schedule.table: what one device does in one tick.
BRANCH = 0  # one of the BRANCHES below
MB = 1  # the microbatch
CHUNK = 2  # which of the device's V chunks (v)
STASH_SLOT = 3  # slot of the stage input (read by forward and backward of stages past the first)
COT_SLOT = 4  # slot of the output cotangent (read by backward of stages before the last)
RECV_ACT = 5  # 1: an activation arrives at the end of this tick...
RECV_ACT_SLOT = 6  # ...into this stash slot
RECV_COT = 7  # 1: a cotangent arrives at the end of this tick...
RECV_COT_SLOT = 8  # ...into this slot
COLUMNS = 9

# The first stage embeds tokens, the last adds the head and loss; the last stage's forward is folded
# into its backward (which recomputes it), so it runs nothing of its own.
BRANCHES = ("idle", "fwd_first", "fwd_mid", "bwd_first", "bwd_mid", "bwd_last")
# Each branch's cost in stage forwards: a backward recomputes its stage's forward (1) and then takes
# twice its FLOPs (2); the last stage's backward runs its forward in place of the recompute.
BRANCH_COST = np.array([0.0, 1.0, 1.0, 3.0, 3.0, 3.0])


@dataclass(frozen=True)
class Schedule:
    """A static pipeline schedule for P devices, V chunks per device and M microbatches.

    `ops` [T, P, 3]: per tick and device, (kind IDLE/FWD/BWD, microbatch, chunk).
    `table` [T, P, COLUMNS] int32: the same ticks as the runner reads them (see the column names).
    """

    name: str
    stages: int  # P, devices along the pipeline axis
    virtual: int  # V, chunks per device
    microbatches: int  # M
    ops: np.ndarray
    table: np.ndarray
    stash_slots: int  # stage inputs a device keeps, at most (all its chunks together)
    cot_slots: int  # output cotangents a device keeps, at most

    @property
    def ticks(self) -> int:
        return self.ops.shape[0]

    @property
    def bubble_fraction(self) -> float:
        """Idle ticks over all ticks of all devices, counted in the table."""
        return float(np.mean(self.ops[..., 0] == IDLE))

    @property
    def time_bubble_fraction(self) -> float:
        """Idle share of device time when every lockstep tick lasts as long as its costliest op (BRANCH_COST)."""
        cost_TP = BRANCH_COST[self.table[..., BRANCH]]
        return float(1 - cost_TP.sum() / (cost_TP.max(axis=1).sum() * self.stages))

    def log_row(self) -> dict[str, int | float | str]:
        """The schedule's numbers for the run log: bubble from the table (slots and time) beside the textbook's."""
        return {
            "pipeline_schedule": self.name,
            "pipeline_stages": self.stages,
            "pipeline_virtual_stages": self.virtual,
            "pipeline_microbatches": self.microbatches,
            "pipeline_ticks": self.ticks,
            "pipeline_bubble": round(self.bubble_fraction, 4),
            "pipeline_bubble_time": round(self.time_bubble_fraction, 4),
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


def build_schedule(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """Simulate every device's op order in lockstep ticks and derive the runner's table.

    Callers validate the numbers (jaxscale.training.layout.check_layout); interleaved needs
    `microbatches` to be a multiple of `stages`.
    """
    p_, m, v = stages, microbatches, virtual
    num_stages = p_ * v
    orders = [op_order(name, p, p_, m, v) for p in range(p_)]
    done_f = np.full((m, num_stages), -1)  # tick each op ran at; -1: not yet
    done_b = np.full((m, num_stages), -1)
    nxt = [0] * p_
    rows = []
    t = 0
    while any(nxt[p] < len(orders[p]) for p in range(p_)):
        row = [(IDLE, 0, 0)] * p_
        for p in range(p_):
            if nxt[p] == len(orders[p]):
                continue
            kind, mb, chunk = orders[p][nxt[p]]
            s = chunk * p_ + p
            if kind == FWD:
                ready = s == 0 or 0 <= done_f[mb, s - 1] < t
            else:
                after = done_f[mb, s] if s == num_stages - 1 else done_b[mb, s + 1]
                ready = 0 <= done_f[mb, s] < t and 0 <= after < t
            if ready:
                row[p] = (kind, mb, chunk)
                nxt[p] += 1
        for p, (kind, mb, chunk) in enumerate(row):
            if kind != IDLE:
                (done_f if kind == FWD else done_b)[mb, chunk * p_ + p] = t
        if all(r[0] == IDLE for r in row):
            raise AssertionError(f"{name} schedule deadlocks at tick {t} (P={p_}, M={m}, V={v})")
        rows.append(row)
        t += 1
    ops = np.array(rows, dtype=np.int32)
    return _with_table(name, p_, v, m, ops, done_f, done_b)


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


def _with_table(
    name: str, p_: int, v: int, m: int, ops: np.ndarray, done_f: np.ndarray, done_b: np.ndarray
) -> Schedule:
    num_stages = p_ * v
    # A stage's input arrives at the end of the tick its upstream stage ran the forward, and is
    # read for the last time by its own backward; output cotangents likewise from the downstream backward.
    stash_of, stash = _assign_slots(
        p_, {(mb, s): (done_f[mb, s - 1], done_b[mb, s]) for mb in range(m) for s in range(1, num_stages)}
    )
    cot_of, cots = _assign_slots(
        p_, {(mb, s): (done_b[mb, s + 1], done_b[mb, s]) for mb in range(m) for s in range(num_stages - 1)}
    )
    table = np.zeros((*ops.shape[:2], COLUMNS), np.int32)
    for t, p in np.ndindex(*ops.shape[:2]):
        kind, mb, chunk = ops[t, p]
        s = chunk * p_ + p
        r = table[t, p]
        r[MB], r[CHUNK] = mb, chunk
        r[STASH_SLOT], r[COT_SLOT] = stash_of.get((mb, s), 0), cot_of.get((mb, s), 0)
        if kind == FWD:
            r[BRANCH] = BRANCHES.index("fwd_first" if s == 0 else "idle" if s == num_stages - 1 else "fwd_mid")
        elif kind == BWD:
            r[BRANCH] = BRANCHES.index("bwd_first" if s == 0 else "bwd_last" if s == num_stages - 1 else "bwd_mid")
        up_kind, up_mb, up_chunk = ops[t, (p - 1) % p_]
        up_stage = up_chunk * p_ + (p - 1) % p_
        if up_kind == FWD and up_stage + 1 < num_stages:
            r[RECV_ACT], r[RECV_ACT_SLOT] = 1, stash_of[up_mb, up_stage + 1]
        down_kind, down_mb, down_chunk = ops[t, (p + 1) % p_]
        down_stage = down_chunk * p_ + (p + 1) % p_
        if down_kind == BWD and down_stage > 0:
            r[RECV_COT], r[RECV_COT_SLOT] = 1, cot_of[down_mb, down_stage - 1]
    return Schedule(name, p_, v, m, ops, table, stash, cots)
