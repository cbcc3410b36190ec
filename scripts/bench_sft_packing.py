"""How full packed fine-tuning rows are: the stdlib_functions task (byte tokenizer) at a seq_len.

Prepares the task into a token store (the first time: about 15 s of parsing the standard library), builds the
row table of data.packing=segmented (first-fit decreasing) and of one example per row, and prints the fill
ratio of each (example tokens / (rows x (seq_len + 1))), the rows and examples, and how long the packing took.

    .venv/bin/python scripts/bench_sft_packing.py [--seq-len 1024] [--store DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from jaxscale.config import DataConfig
from jaxscale.data.finetune import PackedRows
from jaxscale.data.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--store", default="", help="token store directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = DataConfig(source="stdlib_functions", store=args.store or f"{scratch}/store")
        started = time.perf_counter()
        store = open_store(cfg)
        print(f"prepared {store.documents('train'):,} train examples in {time.perf_counter() - started:.1f} s")
        for segmented in (True, False):
            started = time.perf_counter()
            rows = PackedRows(store, "train", args.seq_len, segmented, leave_out_long=True)
            figures = rows.figures
            print(
                f"seq_len {args.seq_len} {'segmented (first-fit decreasing)' if segmented else 'one example per row'}: "
                f"fill ratio {figures['fill_ratio']:.4f}, {figures['rows']:,} rows for "
                f"{figures['examples'] - figures['left_out']:,} examples ({figures['left_out']:,} longer than a row "
                f"left out), table built in {time.perf_counter() - started:.2f} s"
            )


if __name__ == "__main__":
    main()
