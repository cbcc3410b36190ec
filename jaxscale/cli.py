"""The `jaxscale` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxscale.errors import UserError

OVERRIDES_HELP = """\
Overrides are section.key=value pairs applied after the YAML file, for example
  jaxscale train configs/tiny.yaml mesh.fsdp=4 train.steps=50 model.remat=full
Sections: model, mesh, data, optim, train, checkpoint, log, runtime, run.
Values are read as YAML literals (numbers, true/false, null, [lists], {maps}),
never evaluated; an unknown key or a value of the wrong type stops with a message.
"""


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors print one paragraph and exit with code 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            from jaxscale.config import load_config
            from jaxscale.train.loop import train

            train(load_config(args.config, args.overrides))
    except UserError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2
    finally:
        from jaxscale.runtime import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
