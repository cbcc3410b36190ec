"""scripts/accelerator_check.py --small: every section runs on a CPU, and its table and JSON hold sane figures.

The figures themselves mean nothing here (a CPU, a one-layer model, a machine shared with other
work); what is checked is that each section measured what it names and reported it.
"""

import json
import math
import subprocess
import sys

from cli_runner import REPO, cli_env


def test_small_check_reports_every_section(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "scripts/accelerator_check.py", "--small", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["attention", "flags", "deterministic", "checkpoint", "lora"]
    assert report["platform"] == "cpu" and report["small"] is True
    for name, section in sections.items():
        assert "error" not in section, (name, section)
        assert f"| {name} |" in done.stdout  # the table printed at the end names every section
    rows = {name: {r["case"]: r for r in section["rows"]} for name, section in sections.items()}

    xla = rows["attention"]["xla"]  # XLA's attention only: the CPU runs no fused kernel
    assert list(rows["attention"]) == ["xla"]
    assert xla["step_ms"] > 0 and xla["memory_bytes"] > 0 and xla["mfu"] is None  # a CPU has no known peak
    assert math.isclose(xla["tokens_per_s"], 2 * 128 / (xla["step_ms"] / 1e3))  # 2 rows of 128 tokens a step

    assert set(rows["flags"]) == {"on", "off"} and rows["flags"]["on"]["tokens_per_s"] == xla["tokens_per_s"]
    assert rows["flags"]["off"]["tokens_per_s"] > 0 and rows["flags"]["off"]["attention"] == "xla"

    (resume,) = rows["deterministic"].values()
    assert resume["ok"] is True, resume["result"]
    assert resume["result"] == "resumed at 2: parameters bitwise equal, losses equal"

    never, every10 = rows["checkpoint"]["never"], rows["checkpoint"]["every 10 steps"]
    assert never["step_ms"] > 0 and every10["step_ms"] > 0
    assert math.isclose(every10["overhead"], every10["step_ms"] / never["step_ms"] - 1)
    assert every10["ok"] is (every10["overhead"] <= 0.02)

    lora, qlora = rows["lora"]["LoRA r16"], rows["lora"]["QLoRA nf4 r16"]
    assert lora["trainable"] == qlora["trainable"] > 0  # the same adapters
    # NF4 codes (4 bits) and their block scales against bf16 weights: between 1/4 and 1/3 of the bytes.
    assert 0.25 < qlora["base_bytes"] / lora["base_bytes"] < 1 / 3
    assert lora["step_ms"] > 0 and qlora["step_ms"] > 0 and lora["memory_bytes"] > 0 and qlora["memory_bytes"] > 0
