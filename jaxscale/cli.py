"""The `jaxscale` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxscale.errors import UserError

OVERRIDES_HELP = """\
Overrides are section.key=value pairs applied after the YAML file, for example
  jaxscale train configs/tiny.yaml mesh.fsdp=4 train.steps=50 model.remat=full
Sections: model, mesh, parallel, data, optim, train, checkpoint, log, runtime, run.
Values are read as YAML literals (numbers, true/false, null, [lists], {maps}),
never evaluated; an unknown key or a value of the wrong type stops with a message.
"""


# Exit codes: 0 done, 2 a mistake to fix (message says what), 3 training diverged (train.on_nan=stop),
# 75 preempted after saving a checkpoint (restart the same command to resume).
NONFINITE_EXIT_CODE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxscale",
        description="Train transformer language models with JAX on any device mesh.",
        epilog="Run `jaxscale COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train (or resume) a model from a YAML config and overrides",
        description="Train a model; resumes from the newest checkpoint in run.dir when there is one.",
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    checkpoints = commands.add_parser(
        "checkpoints",
        help="list a run's checkpoints: steps, sizes, completeness, mesh, config changes",
        description="List the checkpoints under RUN_DIR/checkpoints. Config changes are shown against "
        "RUN_DIR/config.yaml, or against --config and overrides when given.",
    )
    checkpoints.add_argument("run_dir", help="the run.dir of a run")
    checkpoints.add_argument("--config", help="compare against this YAML config instead of RUN_DIR/config.yaml")
    checkpoints.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides applied to the compared config (before --config on the line)",
    )
    checkpoints.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _checkpoints(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from jaxscale.checkpoint_report import format_report, report
    from jaxscale.config import load_config

    config_path = args.config or Path(args.run_dir) / "config.yaml"
    current = load_config(config_path, args.overrides) if Path(config_path).is_file() else None
    rows = report(args.run_dir, current)
    print(json.dumps(rows, indent=2) if args.json else format_report(rows))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors print one paragraph and exit with code 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "checkpoints":
            _checkpoints(args)
        elif args.command == "train":
            from jaxscale.config import load_config
            from jaxscale.train.loop import NonFiniteLossError, train
            from jaxscale.train.preemption import PREEMPTED_EXIT_CODE

            try:
                summary = train(load_config(args.config, args.overrides))
            except NonFiniteLossError as e:
                print(f"jaxscale: error: {e}", file=sys.stderr)
                return NONFINITE_EXIT_CODE
            if summary["preempted_at"] is not None:
                print(f"jaxscale: preempted; saved step {summary['preempted_at']}, restart to resume", file=sys.stderr)
                return PREEMPTED_EXIT_CODE
    except UserError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2
    finally:
        from jaxscale.runtime import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
