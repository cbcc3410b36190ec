"""Benchmark: start-up and memory of training do not grow with the corpus; prepare and loader throughput.

Generates two text corpora from the standard library's files, concatenated in an order each file's seed picks
(about 2 GB and 20 MB), and prints:
  1. `jaxscale prepare` throughput (MB of text per second) with 1 and with 2 worker processes (2 GB corpus);
  2. time from process start to the first training step, and the training process's peak resident memory,
     for each corpus (targets: under 10% and under 100 MB apart);
  3. the loader's tokens/s over the tokens/s the default model's step consumes (`jaxscale profile`, target >= 10).

Usage: .venv/bin/python scripts/bench_store.py [--large-gb 2] [--dir DIR]   (DIR needs about 3x large-gb free)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxscale.config import DataConfig
from jaxscale.data.store import prepare

FILE_BYTES = 2**20  # a text file is one document
EVAL_FRACTION = 0.25  # so that the 20 MB corpus holds eval documents too
TRAIN = [
    "train.steps=3",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=0",
    "train.eval_every=0",
    "train.eval_batches=1",
]


def write_corpus(directory: Path, total_bytes: int) -> None:
    """Files of about FILE_BYTES, each the standard library's .py files in an order of its own seed."""
    directory.mkdir(parents=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_bytes() for path in sorted(root.rglob("*.py")) if "site-packages" not in path.parts]
    for seed in range(max(1, round(total_bytes / FILE_BYTES))):
        order = np.random.default_rng(seed).permutation(len(texts))
        with open(directory / f"part{seed:05d}.txt", "wb") as f:
            written = 0
            for index in order:
                if written >= min(FILE_BYTES, total_bytes):
                    break
                written += f.write(texts[index])


def first_step(corpus: Path, store: Path, run_dir: Path) -> tuple[float, float]:
    """Seconds from start to the first logged training step, and the process's peak RSS in MB."""
    data = ["data.source=text", f"data.paths={corpus}/*.txt", f"data.store={store}", f"run.dir={run_dir}"]
    data.append(f"data.eval_fraction={EVAL_FRACTION}")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxscale.cli", "train", "configs/tiny.yaml", *data, *TRAIN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics, first = run_dir / "metrics.jsonl", None
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4, not poll(): it also gives this child's peak RSS
    while pid == 0:
        if first is None and metrics.exists() and '"loss"' in metrics.read_text():
            first = time.perf_counter() - started
        time.sleep(0.02)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if status != 0 or first is None:
        raise SystemExit(f"training failed: {proc.stderr.read().decode()[-3000:]}")
    return first, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-gb", type=float, default=2.0)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="jaxscale-bench-store-"))
    try:
        corpora = {"large": scratch / "large", "small": scratch / "small"}
        write_corpus(corpora["large"], int(args.large_gb * 1e9))
        write_corpus(corpora["small"], 20 * 10**6)
        base = {
            name: DataConfig(source="text", paths=f"{path}/*.txt", eval_fraction=EVAL_FRACTION)
            for name, path in corpora.items()
        }

        print("1. prepare throughput, large corpus:")
        for workers in (1, 2):
            cfg = dataclasses.replace(base["large"], store=str(scratch / f"store-large-{workers}"), workers=workers)
            result = prepare(cfg)
            print(
                f"   {workers} worker(s): {result.source_bytes / 1e6:,.0f} MB in {result.seconds:.1f} s = "
                f"{result.source_bytes / 1e6 / result.seconds:,.1f} MB/s ({result.built_shards} shards)"
            )
        shutil.rmtree(scratch / "store-large-2")  # same tokens as store-large-1; frees the disk
        stores = {"large": scratch / "store-large-1", "small": scratch / "store-small"}
        prepare(dataclasses.replace(base["small"], store=str(stores["small"])))

        print("2. time to the first training step and peak RSS of the training process (best of 2 each):")
        measured: dict[str, list[tuple[float, float]]] = {"small": [], "large": []}
        for attempt in range(2):
            for name in ("small", "large"):
                measured[name].append(first_step(corpora[name], stores[name], scratch / f"run-{name}-{attempt}"))
        best = {name: (min(t for t, _ in runs), min(m for _, m in runs)) for name, runs in measured.items()}
        for name, (seconds, rss) in best.items():
            size = sum(p.stat().st_size for p in corpora[name].iterdir()) / 1e6
            print(f"   {name:5s} ({size:,.0f} MB of text): first step at {seconds:.2f} s, peak RSS {rss:,.0f} MB")
        time_gap = abs(best["large"][0] - best["small"][0]) / best["small"][0]
        rss_gap = best["large"][1] - best["small"][1]
        print(f"   difference: {100 * time_gap:.1f}% in time (target < 10%), {rss_gap:+.0f} MB in RSS (target < 100)")

        print("3. loader throughput over the default step's consumption (jaxscale profile, large store):")
        data = ["data.source=text", f"data.paths={corpora['large']}/*.txt", f"data.store={stores['large']}"]
        data.append(f"data.eval_fraction={EVAL_FRACTION}")
        profile = subprocess.run(
            [
                sys.executable,
                "-m",
                "jaxscale.cli",
                "profile",
                "configs/tiny.yaml",
                "--json",
                "--steps",
                "5",
                *data,
                f"run.dir={scratch / 'profile'}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        p = json.loads(profile.stdout)
        consumed = p["tokens_per_step"] / p["loop_step_s"]
        print(
            f"   loader {p['input_tokens_per_s']:,.0f} tokens/s, step consumes {consumed:,.0f} tokens/s: "
            f"{p['supply_ratio']:.1f}x (target >= 10x)"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
