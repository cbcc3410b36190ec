"""The `jaxscale` command: each subcommand's arguments are declared right above its handler.

A handler prints its result and returns an exit code (None: 0), or raises UserError (exit 2) or
TransientError (exit 69); jaxscale.errors has the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jaxscale.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTED_UNSAVED_EXIT_CODE,
    TRANSIENT_EXIT_CODE,
    TransientError,
    UserError,
)

OVERRIDES_HELP = """\
Overrides are section.key=value pairs applied after the YAML file, for example
  jaxscale train configs/tiny.yaml mesh.fsdp=4 train.steps=50 model.remat=full
Sections: model, mesh, parallel, data, optim, train, checkpoint, log, runtime, run.
Values are read as YAML literals (numbers, true/false, null, [lists], {maps}),
never evaluated; an unknown key or a value of the wrong type stops with a message.
"""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, help, how its arguments are declared and its handler."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    config_example: str = ""  # a command reading CONFIG [section.key=value ...]: an example config file


COMMANDS: list[Command] = []


def command(
    name: str, help: str, description: str = "", config_example: str = "", arguments: Callable | None = None
) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int | None]]:
    """Register the decorated handler as subcommand `name`; `arguments(parser)` declares its options."""

    def register(run: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int | None]:
        COMMANDS.append(
            Command(
                name, help, description or help[0].upper() + help[1:] + ".", arguments or _none, run, config_example
            )
        )
        return run

    return register


def _none(parser: argparse.ArgumentParser) -> None:
    """No options beyond the command's positional arguments."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxscale",
        description="Train transformer language models with JAX on any device mesh.",
        epilog="Run `jaxscale COMMAND --help` for a command's options.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        # A config command's epilog is a preformatted example: kept as written.
        config_args = {"epilog": OVERRIDES_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter}
        sub = subcommands.add_parser(
            c.name, help=c.help, description=c.description, **(config_args if c.config_example else {})
        )
        if c.config_example:
            sub.add_argument("config", help=f"YAML config file, e.g. {c.config_example}")
            sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        c.arguments(sub)
    return parser


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run.dir of a run (a local path or gs:// URL)")


@command(
    "train",
    help="train (or resume) a model from a YAML config and overrides",
    description="Train a model; resumes from the newest checkpoint in run.dir when there is one.",
    config_example="configs/tiny.yaml",
)
def _train(args: argparse.Namespace) -> int:
    from jaxscale.config import load_config
    from jaxscale.training.loop import NonFiniteLossError, train

    try:
        summary = train(load_config(args.config, args.overrides))
    except NonFiniteLossError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    stopped, newest = summary["preempted_at"], summary["resumable_step"]
    if stopped is None:
        return 0
    if newest is None:
        print(
            f"jaxscale: preempted at step {stopped}; checkpoints are off (checkpoint.every=0), so nothing was saved "
            f"and a restart would train again from step 0",
            file=sys.stderr,
        )
        return PREEMPTED_UNSAVED_EXIT_CODE
    where = f"the newest checkpoint is step {newest}" if newest else "no step was saved yet"
    print(f"jaxscale: preempted at step {stopped}; {where}; restart to resume", file=sys.stderr)
    return PREEMPTED_EXIT_CODE


def _supervise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts before giving up (default 3)")
    parser.add_argument("--backoff-s", type=float, default=10.0, help="wait before the first restart, doubled after")
    parser.add_argument("--max-backoff-s", type=float, default=300.0, help="longest wait between attempts")
    parser.add_argument(
        "--grace-s",
        type=float,
        default=60.0,
        help="once a process of an attempt exits, how long the others may take to follow before they are killed",
    )
    parser.add_argument(
        "--local-processes",
        metavar="N[,N2,...]",
        help="run N training processes on this machine, joined by jax.distributed on 127.0.0.1; a list gives each "
        "attempt's count in turn (4,2,4: hosts leave and come back; the last repeats)",
    )
    parser.add_argument(
        "--devices-per-process", type=int, default=0, help="emulated CPU devices per local process (0: the config's)"
    )


@command(
    "supervise",
    help="train, and train again from the newest checkpoint after a crash or preemption, on the hosts there are",
    description="Run `jaxscale train` and restart it after a crash, a preemption (exit 75) or storage unavailable "
    "for now (exit 69), with a doubling backoff, up to --max-restarts times; exit 2 (a mistake to fix), 3 (diverged) "
    "and 4 (preempted with checkpoints off) are final. Each restart resumes from the newest checkpoint on the "
    "processes and devices present then, with the same global batches (train.elastic=true: train.grad_accum rises "
    "where the layout needs it, and the log says so). With train.hang_timeout_s a process that makes no progress "
    "that long is killed and restarted. On a pod run it on every host instead of `jaxscale train`; the cluster "
    "decides the world. --local-processes runs the processes on this machine instead.",
    config_example="configs/tiny.yaml",
    arguments=_supervise_arguments,
)
def _supervise(args: argparse.Namespace) -> int:
    from jaxscale.config import load_config
    from jaxscale.training.supervise import RestartPolicy, Supervisor, local_commands, train_command

    # A config mistake stops here, not at every attempt.
    cfg = load_config(args.config, ["train.elastic=true", *args.overrides])
    policy = RestartPolicy(
        args.max_restarts, args.backoff_s, args.max_backoff_s, args.grace_s, cfg.train.hang_timeout_s
    )
    policy.check()
    if args.devices_per_process < 0 or (args.devices_per_process and not args.local_processes):
        raise UserError(
            f"--devices-per-process {args.devices_per_process}: give it with --local-processes, as a number of "
            f"emulated CPU devices (1 or more) per local process."
        )
    if args.local_processes:
        counts = args.local_processes.split(",")
        if not all(c.strip().isdigit() and int(c) >= 1 for c in counts):
            raise UserError(
                f"--local-processes {args.local_processes} must be a process count of 1 or more, or a comma-separated "
                f"list of them (one per attempt, e.g. 4,2,4)."
            )
        commands = local_commands(args.config, args.overrides, [int(c) for c in counts], args.devices_per_process)
    else:
        one = train_command(args.config, args.overrides)

        def commands(attempt: int) -> list[list[str]]:
            return [one]  # one process on this host; the cluster decides the rest at each start

    return Supervisor(commands, policy, lambda line: print(f"jaxscale supervise: {line}", flush=True)).run()


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify", action="store_true", help="also read every file against its sha256")


@command(
    "prepare",
    help="tokenize data.paths once into the token store that training reads (resumable; a no-op when current)",
    description="Tokenize the corpus of a config's data section into its token store (data.store, or a cache "
    "under $JAXSCALE_CACHE or ~/.cache/jaxscale) with data.workers processes. Running it again does nothing "
    "when the sources and tokenizer are unchanged and every file has its recorded size, finishes an "
    "interrupted build, and rebuilds (as a new generation, beside the one running jobs read) a store whose "
    "sources or tokenizer changed, or the shards of damaged files.",
    config_example="configs/tiny.yaml",
    arguments=_prepare_arguments,
)
def _prepare(args: argparse.Namespace) -> None:
    from jaxscale.config import load_config
    from jaxscale.data.store import format_prepared, prepare

    cfg = load_config(args.config, args.overrides)
    print(format_prepared(prepare(cfg.data, progress=cfg.log.progress, verify=args.verify)))


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="print every key of every section: type, default, allowed values, meaning (Markdown)",
    )


@command(
    "config",
    help="print a config resolved (presets, YAML, overrides), or the reference of every key",
    description="Print CONFIG with its overrides as the run would use it: every key, after the model preset (or "
    "model.init_from's config.json), the YAML file and the overrides, as YAML. --reference prints every key of "
    "every section with its type, default, allowed values and meaning, read from jaxscale/config.py.",
    arguments=_config_arguments,
)
def _config(args: argparse.Namespace) -> None:
    import yaml

    from jaxscale.config import load_config, to_dict
    from jaxscale.config_reference import reference_markdown

    if args.reference:
        print(reference_markdown())
        return
    if args.config is None:
        raise UserError("jaxscale config needs a CONFIG file (e.g. configs/tiny.yaml), or --reference.")
    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hardware",
        required=True,
        help="v4-N, v5e-N, v5p-N, v6e-N (v4/v5p count TensorCores), a100xN, h100xN, h200xN, or cpu-N",
    )
    parser.add_argument("--top", type=int, default=10, help="rows of the ranking to print (default 10)")
    _json_flag(parser)


@command(
    "plan",
    help="predict per-device memory, communication and step time; rank every mesh of a cluster",
    description="Model the train step of a config on a cluster without touching it: memory per device, "
    "collectives per mesh axis, compute time at peak, step time and MFU, for every factorization of the "
    "devices over data, fsdp, expert and tensor. Meshes that do not fit are dropped, the rest ranked.",
    config_example="configs/llama3-70b.yaml",
    arguments=_plan_arguments,
)
def _plan(args: argparse.Namespace) -> None:
    import json

    from jaxscale.config import load_config
    from jaxscale.hardware import parse_cluster
    from jaxscale.planning.report import format_plan, plan_dict
    from jaxscale.planning.search import plan

    cluster = parse_cluster(args.hardware)
    result = plan(load_config(args.config, args.overrides), cluster)
    print(json.dumps(plan_dict(result), indent=2) if args.json else format_plan(result, args.top))


def _compile_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="TPU topology, e.g. v5e:4x4, v5p:2x2x2, v6e:8x8")
    target.add_argument("--cpu-devices", type=int, help="compile for this many emulated CPU devices")
    parser.add_argument(
        "--hbm-gib", type=float, help="memory per device to check against (default: the TPU's HBM; none on CPU)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


@command(
    "compile",
    help="compile the real train step for a TPU topology or emulated CPU devices; report XLA's memory and FLOPs",
    description="Lower and compile the train step ahead of time for a target that need not be present: a TPU "
    "topology (needs the optional libtpu: pip install 'jax[tpu]==0.12.0.1'; no TPU) or N emulated CPU devices. "
    "A step that does not fit the target's memory stops with exit code 2, before any hardware is used.",
    config_example="configs/tiny.yaml",
    arguments=_compile_arguments,
)
def _compile(args: argparse.Namespace) -> None:
    import json

    from jaxscale.aot import compile_for_target, format_compile
    from jaxscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = compile_for_target(cfg, args.topology, args.cpu_devices, args.hbm_gib)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_compile(report))


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="steps timed for the step and the loop (default 10)")
    parser.add_argument("--trace", action="store_true", help="capture a jax.profiler trace of the timed steps")
    _json_flag(parser)


@command(
    "profile",
    help="measure the input pipeline, host-to-device copy, step, checkpoint, compile and loop; say what bounds it",
    description="Measure each component of a run alone on its own config and mesh, then the training loop, and "
    "name the component that bounds the run and the change to make. Nothing is written to run.dir but a trace "
    "(with --trace) and a compile cache.",
    config_example="configs/tiny.yaml",
    arguments=_profile_arguments,
)
def _profile(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from jaxscale.config import load_config
    from jaxscale.profile import format_profile, profile_run

    if args.steps < 2:
        raise UserError(f"--steps {args.steps} must be at least 2.")
    result = profile_run(load_config(args.config, args.overrides), steps=args.steps, trace=args.trace)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else format_profile(result))


def _checkpoints_arguments(parser: argparse.ArgumentParser) -> None:
    _run_dir_argument(parser)
    parser.add_argument("--config", help="compare against this YAML config instead of RUN_DIR/config.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides applied to the compared config (before --config on the line)",
    )
    _json_flag(parser)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="read every complete step back and compare its checksums: ok, corrupt (proven damage), or unreadable "
        "(no permission, storage unavailable: not proof of damage)",
    )


@command(
    "checkpoints",
    help="list a run's checkpoints: steps, sizes, status, mesh, config changes; --verify reads them back",
    description="List every step directory under RUN_DIR/checkpoints: complete, half-written, set aside as "
    "corrupt, or with metadata that cannot be read. Config changes are shown against RUN_DIR/config.yaml, or "
    "against --config and overrides when given. Nothing is renamed or deleted.",
    arguments=_checkpoints_arguments,
)
def _checkpoints(args: argparse.Namespace) -> None:
    import json

    from jaxscale.checkpoint.report import format_report, report, verify
    from jaxscale.config import load_config
    from jaxscale.storage import run_path

    config_path = args.config or run_path(args.run_dir) / "config.yaml"
    current = load_config(config_path, args.overrides) if run_path(config_path).is_file() else None
    rows = report(args.run_dir, current)
    if args.verify:
        verify(args.run_dir, rows, current)
    print(json.dumps(rows, indent=2) if args.json else format_report(rows))


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run.dir of a run")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. mesh.*")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue (with --chat: the user's message)")
    source.add_argument(
        "--prompts",
        metavar="FILE",
        help='one prompt per line, or a .jsonl file of {"prompt": ...} (with --chat also {"messages": [...]})',
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="render each prompt with the run's chat template and its generation prompt: a text as one user message",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to add at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass")
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="end a completion where its text holds STRING, cut before it (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    parser.add_argument("--json", action="store_true", help="print one JSON row per prompt")


@command(
    "generate",
    help="complete prompts with a run's newest checkpoint (KV cache; greedy, or temperature/top-k/top-p sampling)",
    description="Sample from the newest checkpoint of RUN_DIR on the run's mesh (overrides after RUN_DIR change "
    "it, e.g. a smaller mesh for fewer devices). Greedy by default; with --temperature > 0 it samples, the "
    "distribution cut as transformers cuts it: temperature, then --top-k, then --top-p. A row stops at any of "
    "the model's eos ids, at a --stop string (the text is cut before it) or after --max-new-tokens. The longest "
    "prompt plus --max-new-tokens must fit the model's context (an imported model's max_position_embeddings, "
    "else train.seq_len).",
    arguments=_generate_arguments,
)
def _generate(args: argparse.Namespace) -> None:
    from jaxscale.generate import check_sampling, generate, read_prompts
    from jaxscale.models.decode import Sampling

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    check_sampling(args.max_new_tokens, sampling)
    prompts = read_prompts(args.prompt, args.prompts, args.chat)
    _, completions = generate(
        args.run_dir, prompts, args.max_new_tokens, sampling, args.seed, args.overrides, stops=args.stop
    )
    finish = {"eos": "stopped at eos", "length": "stopped at --max-new-tokens"}
    for i, c in enumerate(completions, start=1):
        if args.json:
            print(c.as_json(), flush=True)
        else:
            why = finish.get(c.finish) or f"stopped at --stop {c.stop!r}"
            print(f"--- prompt {i}: {c.tokens} new tokens, {why}\n{c.prompt}{c.text}", flush=True)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _run_dir_argument(parser)
    parser.add_argument("--to", required=True, choices=["hf"], help="the format: hf (Hugging Face transformers)")
    parser.add_argument("out_dir", help="the directory to write: new or empty (see --overwrite)")
    parser.add_argument("--shard-mib", type=int, default=2048, help="largest safetensors file in MiB (default 2048)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: fold the adapters into the base and write the whole model (default: a PEFT adapter dir)",
    )
    parser.add_argument(
        "--merge-into-quantized",
        action="store_true",
        help="a QLoRA run with --merge: merge into the NF4/int8 base it trained beside (default: the original base)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="",
        help="the weights' dtype (default: the base model's, from model.init_from's config.json, else "
        "model.param_dtype; a PEFT adapter's: float32)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR: its weight files and index are removed first, nothing else",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="runtime.* and mesh.* keys of where the export runs (e.g. runtime.process_id=1), over the run's config",
    )


@command(
    "export",
    help="write a run's newest checkpoint as a Hugging Face model directory",
    description="Write the newest checkpoint of RUN_DIR to OUT_DIR as a Hugging Face model of its family "
    "(config.json with the family's architectures), safetensors shards with their index, the tokenizer, "
    "generation_config.json and the chat template; a LoRA run as a PEFT adapter directory, or with --merge as the "
    "whole model, merged in float64 into its original base. The checkpoint is restored onto the run's mesh (run "
    "it where the run resumes), read-only: a corrupt step is passed over, never renamed.",
    arguments=_export_arguments,
)
def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from jaxscale import runtime
    from jaxscale.hf.export import export_hf, run_config

    if args.shard_mib < 1:
        raise UserError(f"--shard-mib {args.shard_mib} must be at least 1.")
    runtime.initialize(run_config(args.run_dir, args.overrides)[0].runtime)
    step = export_hf(
        args.run_dir,
        Path(args.out_dir),
        args.shard_mib * 2**20,
        args.overrides,
        merge=args.merge,
        dtype=args.dtype,
        overwrite=args.overwrite,
        merge_into_quantized=args.merge_into_quantized,
    )
    print(f"jaxscale export: step {step} of {args.run_dir} written to {args.out_dir} as a Hugging Face model")


def _make_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["stdlib-functions"], help="the task to write")
    parser.add_argument("out_dir", help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="share held out (default 0.05)")
    parser.add_argument(
        "--max-bytes", type=int, default=512, help="longest prompt + completion in UTF-8 bytes (default 512)"
    )


@command(
    "make-task",
    help="write a fine-tuning task as train.jsonl and eval.jsonl (prompt/completion rows)",
    description="Write the stdlib-functions task: each function of Python's standard library with a docstring, "
    "prompt = its signature and docstring, completion = its body (data.source=stdlib_functions trains on the "
    "same examples without files).",
    arguments=_make_task_arguments,
)
def _make_task(args: argparse.Namespace) -> None:
    from jaxscale.data.stdlib_task import write_task

    counts = write_task(args.out_dir, args.eval_fraction, args.max_bytes)
    print(f"jaxscale make-task: {counts['train']} train and {counts['eval']} eval examples in {args.out_dir}")


def _goodput_arguments(parser: argparse.ArgumentParser) -> None:
    _run_dir_argument(parser)
    _json_flag(parser)


@command(
    "goodput",
    help="productive step time over the job's wall time, over all restarts; badput by cause",
    arguments=_goodput_arguments,
)
def _goodput(args: argparse.Namespace) -> None:
    import json

    from jaxscale.training.goodput import format_goodput, goodput, read_rows

    result = goodput(read_rows(args.run_dir))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_goodput(result))


@command(
    "report",
    help="write RUN_DIR/report.png: loss, tokens/s, step-time breakdown, goodput",
    arguments=_run_dir_argument,
)
def _report(args: argparse.Namespace) -> None:
    from jaxscale.report import write_report

    path, _ = write_report(args.run_dir)
    print(f"jaxscale report: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; user errors print one paragraph and exit with code 2."""
    parser = _parser()
    # Overrides may also follow options (`compile CONFIG --cpu-devices 8 mesh.fsdp=8`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        (chosen,) = [c for c in COMMANDS if c.name == args.command]
        return chosen.run(args) or 0
    except UserError as e:
        print(f"jaxscale: error: {e}", file=sys.stderr)
        return 2
    except TransientError as e:
        print(f"jaxscale: error (transient): {e}", file=sys.stderr)
        return TRANSIENT_EXIT_CODE
    finally:
        from jaxscale.runtime import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
