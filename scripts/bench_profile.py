"""Benchmark: `jaxscale profile` on a config, and whether the loop's components add up to its step time.

Prints the profile's table and verdict, then the training loop's wall time per step beside the sum of
its measured components (compute, data wait, transfer, checkpoint, eval; `other` is the remainder),
and their ratio (target: within 10%, i.e. `other` under a tenth of the step).

Usage: .venv/bin/python scripts/bench_profile.py [configs/tiny.yaml] [key=value ...]
"""

from __future__ import annotations

import sys

from jaxscale.config import load_config
from jaxscale.profile import format_profile, profile_run


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 and "=" not in sys.argv[1] else "configs/tiny.yaml"
    overrides = [a for a in sys.argv[1:] if "=" in a]
    result = profile_run(load_config(path, overrides), steps=10)
    print(format_profile(result))
    measured = sum(v for k, v in result.loop_breakdown.items() if k != "other")
    print(
        f"\nloop step {result.loop_step_s * 1e3:.2f} ms; measured components add up to {measured * 1e3:.2f} ms "
        f"(ratio {measured / result.loop_step_s:.3f}, target >= 0.90)"
    )


if __name__ == "__main__":
    main()
