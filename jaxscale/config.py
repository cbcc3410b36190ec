"""Typed run configuration: one dataclass per part, YAML files, dotted overrides.

A run config is built in three layers, later ones winning: the dataclass
defaults, a YAML file, and `section.key=value` overrides from the command line.
Override values are parsed as YAML scalars with the safe loader (literals only,
never evaluated) and then checked against the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from etils import epath

from jaxscale.errors import UserError
from jaxscale.hf_config import hf_directory, model_values, read_hf_config, training_values
from jaxscale.presets import preset_values


class _SafeLoader(yaml.SafeLoader):
    """YAML's safe loader, except that `10:15` stays a string instead of YAML 1.1's base-60 integer 615."""


_INT = "tag:yaml.org,2002:int"
_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_DECIMAL_HEX_OCTAL_BINARY = r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
_SafeLoader.add_implicit_resolver(_INT, re.compile(_DECIMAL_HEX_OCTAL_BINARY), list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass: literals only


# Names the config accepts; the modules that act on them (jaxscale.models.transformer,
# jaxscale.parallel.schedules) key their tables by these, and a test keeps the two in step.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
AUTO = "auto"  # model.remat / model.scan_unroll: chosen by the planner for the run's devices (jaxscale.planning.auto)
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")
DTYPES = ("float32", "bfloat16", "float16")
CONTEXT_ATTENTION = ("ring", "allgather")  # jaxscale.models.attention: how a sequence split over `context` attends


@dataclass
class ModelConfig:
    """Shape of the decoder. `preset` fills every other field first; keys given beside it win."""

    preset: str = "tiny"  # a model shape by name (jaxscale/presets.py); the keys below refine it
    # "hf:DIR": start from a Hugging Face model directory (jaxscale/families.py); its config.json sets the shape (and
    # the preset is not used), its tokenizer.json becomes data.tokenizer unless that is set. "": random init.
    init_from: str = ""
    vocab_size: int = 0  # 0: the tokenizer's vocabulary, padded to a multiple of 128
    d_model: int = 128  # the width of the residual stream
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4  # query heads per layer
    n_kv_heads: int = 2  # key/value heads per layer (grouped-query attention), a divisor of n_heads
    head_dim: int = 32  # the width of each head (even, for rotary embeddings); need not be d_model / n_heads
    d_ff: int = 384  # the hidden width of the gated MLP
    rope_theta: float = 10000.0  # the rotary base (of global layers, where local ones differ)
    # Rotary embeddings as transformers' modeling_rope_utils computes them: default (none), linear (positions
    # divided by the factor), dynamic (NTK: the base grows once a batch's positions pass rope_original_context),
    # yarn (wavelengths between the beta_fast and beta_slow rotation counts blended, cos and sin times the
    # attention factor), llama3 (Llama 3.1+: wavelengths longer than rope_original_context / rope_low_freq_factor
    # stretched by the factor, shorter than rope_original_context / rope_high_freq_factor kept, those between blended).
    rope_type: str = "default"
    rope_scaling_factor: float = 1.0  # linear, dynamic, yarn, llama3: how far positions stretch; 1: not at all
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths beyond original context / this are stretched
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original context / this are kept
    rope_original_context: int = 8192  # llama3, yarn: the pretraining context; dynamic: max_position_embeddings
    rope_beta_fast: float = 32.0  # yarn: dimensions turning more often than this over the context are kept
    rope_beta_slow: float = 1.0  # yarn: dimensions turning less often are interpolated; those between, blended
    rope_attention_factor: float = 0.0  # yarn: cos and sin times this; 0: 0.1 ln(factor) + 1
    rope_truncate: bool = True  # yarn: the blended band's bounds rounded outwards
    rope_local_theta: float = 0.0  # local (sliding-window) layers' rope base, unscaled (Gemma 3); 0: as global
    # Attention per layer: G global, L local (the last sliding_window tokens, the token itself included), one
    # letter per layer; "": every layer L when sliding_window > 0, else G.
    sliding_window: int = 0
    attention_pattern: str = ""  # one G or L per layer (see sliding_window)
    # What differs between the families jaxscale imports (jaxscale/families.py); the defaults are Llama's.
    attention_bias: str = "none"  # none | qkv (Qwen2) | qkvo: biases on those projections
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1 for Gemma, whose w starts at 0
    sandwich_norms: bool = False  # norms also on the attention's and the MLP's outputs, before the residual add
    activation: str = "silu"  # of the gated MLP: silu (SwiGLU) | gelu_tanh (GeGLU with tanh-approximated GELU)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model), in the compute dtype (Gemma)
    query_pre_attn_scalar: float = 0.0  # attention logits scaled by its -1/2 power; 0: head_dim
    attn_softcap: float = 0.0  # attention logits become c tanh(logits / c) (Gemma 2); 0: none
    final_softcap: float = 0.0  # the output logits likewise (Gemma 2, 3); 0: none
    norm_eps: float = 1e-5  # the epsilon of every RMSNorm
    tie_embeddings: bool = True  # the output head is the embedding table, transposed
    init_std: float = 0.02  # the standard deviation of the initial weights (a seeded, not imported, model)
    param_dtype: str = "float32"  # the stored parameters and optimizer state; a resume casts between floats
    compute_dtype: str = "bfloat16"  # the matmuls and activations (mixed precision)
    # auto: the planner's choice (jaxscale.planning.auto): the least recomputation whose planned memory fits the
    # device with headroom | none | full | dots_saveable | dots_with_no_batch_dims_saveable
    remat: str = "auto"
    # auto: splash attention on TPU, cuDNN flash attention on GPU (bf16/fp16), XLA elsewhere | xla | cudnn | splash
    attention: str = "auto"
    # Positions of each row whose float32 logits exist at once: the head and loss run over the
    # sequence in chunks of this many, recomputed in the backward (a divisor of train.seq_len); 0: all.
    logits_chunk: int = 0
    # Layers per iteration of the layer loop (lax.scan's unroll); n_layers unrolls it whole: XLA fuses
    # across layers with no loop between them, for a compile that grows with depth (XLA:CPU also keeps
    # every layer's FSDP-gathered weights). auto: the planner's choice, with model.remat.
    scan_unroll: int | str = "auto"
    # Mixture of experts; num_experts=0 keeps every feed-forward dense. Each expert is a gated MLP of width
    # expert_d_ff (0: d_ff).
    num_experts: int = 0
    experts_per_token: int = 2  # top-k
    expert_d_ff: int = 0  # the hidden width of each expert; 0: d_ff
    # The top-k probabilities as combine weights: auto (renormalized to sum 1 for k >= 2, the raw one for top-1,
    # as Switch) | normalized (always; transformers' norm_topk_prob=true, Mixtral) | raw (norm_topk_prob=false)
    router_weights: str = "auto"
    num_shared_experts: int = 0  # experts every token passes through, beside the routed ones
    capacity_factor: float = 0.0  # > 0: an expert takes <= ceil(cf * seq_len * k / E) tokens per sequence; 0: dropless
    # How tokens reach experts split over devices: padded buffers by all_to_all, or exact counts by
    # ragged_all_to_all (dropless only). auto: ragged for dropless routing on TPU and GPU, else padded.
    expert_exchange: str = "auto"
    # Under the ragged exchange, an expert shard's receive buffer in balanced shares (its tokens x k
    # rows; MaxText's ragged_buffer_factor). 0: the worst case, every token to one shard: never drops.
    ragged_buffer: float = 0.0
    moe_every: int = 1  # the last layer of every group of this many layers is MoE, the others dense
    mlp_only_layers: list[int] = field(default_factory=list)  # layers kept dense whatever moe_every says
    aux_loss_weight: float = 0.01  # load-balancing loss (Switch Transformer), added to the token loss
    # switch: the mean over MoE layers of each layer's loss; transformers: its load_balancing_loss_func, one
    # loss of every layer's tokens together, summed over the k choices
    aux_loss_style: str = "switch"
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE), added to the token loss


@dataclass
class MeshConfig:
    """Degrees of each mesh axis; one may be -1 (fill the rest). `dcn_*` split an axis across slices."""

    data: int = 1  # splits the batch; parameters replicated (gradient all-reduce)
    fsdp: int = -1  # splits the batch and parameters, gradients, optimizer state (ZeRO-3)
    pipeline: int = 1  # splits the layers into stages that microbatches flow through
    expert: int = 1  # splits the experts of MoE layers (and the batch elsewhere)
    context: int = 1  # splits each sequence (context parallelism): attention gathers keys and values
    tensor: int = 1  # splits heads and MLP units inside a layer (Megatron style)
    dcn_data: int = 1  # data across slices (the slow links between slices carry its gradient all-reduce)
    dcn_fsdp: int = 1  # fsdp across slices
    dcn_pipeline: int = 1  # pipeline stages across slices
    dcn_expert: int = 1  # expert across slices
    dcn_context: int = 1  # context across slices
    dcn_tensor: int = 1  # tensor across slices (rarely worth its traffic)
    strategy: str = "fsdp_tp"  # name of a rule table in jaxscale.sharding.STRATEGIES
    rules: dict[str, Any] = field(default_factory=dict)  # logical name -> mesh axis / list / null


@dataclass
class ParallelConfig:
    """How parallelism runs beyond the mesh degrees: the pipeline schedule, sequence parallelism, the context
    axis's attention.

    With mesh.pipeline > 1 the layers split into that many stages and train.grad_accum is the number
    of microbatches M that flow through them each step (the same split as gradient accumulation).
    """

    pipeline_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    virtual_stages: int = 2  # interleaved only: chunks of layers per pipeline device
    # Ticks each stage's backward is split into, one group of its layers per tick, so that a tick's
    # ops cost about the same (jaxscale.parallel.schedules); must divide the layers per chunk. 0: the
    # split whose schedule idles least.
    pipeline_backward_ticks: int = 0
    # With mesh.tensor > 1: the residual stream's tokens split over `tensor` between the blocks (Megatron-style
    # sequence parallelism, jaxscale.sharding.SEQUENCE_PARALLEL): norms and saved layer inputs per shard.
    # auto: on wherever mesh.tensor > 1 and train.seq_len splits over context x tensor (never slower in the
    # benchmarks of docs/parallelism.md); true insists (a seq_len that does not split is refused), false: off.
    sequence_parallel: bool | str = "auto"
    # With mesh.context > 1: ring (key/value blocks passed around the context devices, an online softmax:
    # keys and values O(L / C) per device) or allgather (every layer gathers the whole sequence's keys and values).
    context_attention: str = "ring"


@dataclass
class DataConfig:
    """Where tokens come from. The batch of step s is a pure function of (seed, s, this config)."""

    source: str = "stdlib"  # stdlib | text | jsonl | parquet; fine-tuning: prompt_completion | chat | stdlib_functions
    paths: str = ""  # comma-separated globs, for text / jsonl / parquet
    text_field: str = "text"  # column or key holding the document text (jsonl, parquet)
    tokenizer: str = "byte"  # "byte" or the path of a Hugging Face tokenizer.json
    seed: int = 0  # the order of the rows (grain shuffles windows by it, reseeded each epoch)
    eval_fraction: float = 0.05  # share of documents held out for eval loss
    store: str = ""  # directory of the tokenized corpus; "": a default under $JAXSCALE_CACHE or ~/.cache/jaxscale
    workers: int = 0  # tokenizer processes of `jaxscale prepare` (and of a first run preparing it); 0: one per core
    prefetch: int = 2  # batches prepared ahead by a background thread
    # data.source=chat: a chat_template.jinja, a tokenizer_config.json or their directory; "": beside data.tokenizer
    chat_template: str = ""
    # Sources mixed by weight, e.g. [{source: stdlib, weight: 0.7}, {source: jsonl, paths: "a/*.jsonl", weight: 0.3}];
    # each entry may set source, paths, text_field and name, and takes the rest of this section.
    mixture: list[dict[str, Any]] = field(default_factory=list)
    # segmented: attention and positions per document (fine-tuning: several examples per row, each as if alone);
    # concat: one sequence per row (fine-tuning: one example per row, padded)
    packing: str = "segmented"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping."""

    lr: float = 3e-3  # the peak learning rate
    warmup_steps: int = 20  # steps of linear warmup to lr
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr times this
    decay_steps: int = 0  # length of the schedule; 0: train.steps (set it to extend a run without changing it)
    b1: float = 0.9  # AdamW's first-moment decay
    b2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    weight_decay: float = 0.1  # decoupled weight decay; norms and biases are never decayed
    clip_norm: float = 1.0  # gradients clipped to this global norm


@dataclass
class TrainConfig:
    """The run's length, batch and sequence, evaluation, and what a bad step does."""

    steps: int = 300  # optimizer steps of the whole run (a resume continues to it)
    global_batch: int = 16  # sequences per optimizer step, summed over all devices and microbatches
    seq_len: int = 128  # tokens per sequence
    grad_accum: int = 1  # microbatches per step; with mesh.pipeline > 1, those that flow through the stages
    seed: int = 0  # the initial weights and adapter dropout
    eval_every: int = 100  # steps between held-out evaluations; 0: only after the last step
    eval_at_start: bool = False  # also evaluate the initial state before step 0 (a fine-tune's starting point)
    eval_batches: int = 4  # held-out batches each evaluation averages (the same ones every time)
    on_nan: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    # XLA's deterministic GPU ops (no atomics in reductions, scatters): bitwise resume on GPU, at some speed.
    deterministic: bool = False
    # Elastic restarts (jaxscale supervise sets it): on a device count where train.grad_accum would not split the
    # batch, or would put more than max_device_batch sequences on a device per microbatch (0: no limit), use the
    # smallest grad_accum above it that does; train.global_batch, and so the batches, never change.
    elastic: bool = False
    max_device_batch: int = 0  # with train.elastic: the most sequences per device per microbatch; 0: no limit
    # jaxscale supervise's watchdog: a training process that makes no progress (no step, no eval) for this many
    # seconds is killed and restarted from the newest checkpoint, as a crash. Longer than restore + compile. 0: off.
    hang_timeout_s: float = 0.0


@dataclass
class CheckpointConfig:
    """Orbax checkpoints: when to save, how many to keep, and how a restart resumes."""

    every: int = 100  # steps between saves; 0 disables checkpoints
    every_minutes: float = 0.0  # also save when this much time passed since the last save; 0: off
    keep: int = 3  # the newest K are kept...
    keep_every: int = 0  # ...plus every step divisible by M, permanently; 0: off
    async_save: bool = True  # saves written in the background; the loop waits only to copy the state
    resume: bool = True  # false refuses a run.dir that already holds steps instead of resuming from them
    on_preemption: bool = True  # SIGTERM / SIGINT: finish the step, save, exit with code 75
    # When the run directory holds steps (committed, set aside as corrupt) and none is usable: false stops the run
    # (exit 2) listing them, true trains from step 0.
    allow_fresh_start: bool = False
    # Keys that change the model's math (rope, norm eps, vocabulary, LoRA alpha, ...) accepted on resume on purpose;
    # any other such change is refused naming the key (jaxscale.training.restore).
    allow_config_change: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    """What the run reports, where, and how often."""

    every: int = 10  # steps between logged rows (stdout, metrics.jsonl, TensorBoard, W&B)
    progress: bool = True  # a progress bar with the ETA on the main process
    tensorboard: bool = True  # TensorBoard events in <run.dir>/tensorboard
    profile_steps: str = ""  # "START:END": a jax.profiler trace of steps START..END-1 (from 0) in <run.dir>/profile
    wandb: bool = False  # also log every row to Weights & Biases (the wandb extra); WANDB_MODE=offline honoured
    wandb_project: str = "jaxscale"  # the W&B project; the run is named after run.dir, its id kept in it
    wandb_entity: str = ""  # the W&B team or user; empty: the API key's default


@dataclass
class RuntimeConfig:
    """Devices and processes. Zero / empty values mean: detect from the environment."""

    cpu_devices: int = 0  # > 0: emulate this many CPU devices
    # Memory per device that model.remat=auto / model.scan_unroll=auto plan to fit (jaxscale.planning.auto);
    # 0: the device's own (its allocator's limit, else the catalog's HBM; CPU: host memory / local devices).
    device_memory_gib: float = 0.0
    performance_flags: bool = True  # XLA / libtpu flags that overlap collectives with compute (jaxscale.runtime)
    coordinator_address: str = ""  # many processes: HOST:PORT of process 0; "": JAX's cluster detection
    num_processes: int = 0  # processes of the run; 0: detected
    process_id: int = -1  # this process's index; -1: detected


# The weights an adapter may sit beside: the attention and SwiGLU projections (the default), the embedding, the head.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "embed_tokens", "lm_head")
BASE_QUANTS = ("none", "nf4", "int8")


@dataclass
class LoraConfig:
    """Low-rank adapters beside a frozen base (LoRA); with `base_quant`, the base stored quantized (QLoRA)."""

    rank: int = 0  # 0: off (every parameter trains); r > 0: adapters A [in, r] and B [r, out], base frozen
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    # Any of LORA_TARGETS: q, k, v, o, gate, up, down (the default: every projection), embed_tokens, lm_head.
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS[:7]))
    dropout: float = 0.0  # in training, the share of each adapter's input zeroed (PEFT's lora_dropout); 0: off
    rslora: bool = False  # scale the update by alpha / sqrt(rank) (PEFT's use_rslora) instead of alpha / rank
    dora: bool = False  # weight-decomposed LoRA (PEFT's use_dora): a trainable magnitude per output feature
    # AdamW's decay of the adapters (in place of optim.weight_decay, which a LoRA run has nothing left to apply to):
    # 0 as transformers' Trainer defaults to; biases, norms and DoRA magnitudes are never decayed.
    weight_decay: float = 0.0
    base_quant: str = "none"  # none | nf4 (4-bit NormalFloat, blocks of 64) | int8 (absmax, blocks of 64)
    # The frozen base: "" is the run's initial model (model.init_from, else the seeded init); a checkpoint
    # directory holds it, its content hash goes into every checkpoint, and resuming onto another is refused.
    base: str = ""


@dataclass
class RunConfig:
    """Where the run lives."""

    dir: str = "runs/tiny"  # where everything of the run goes: a local path, file:///abs/path or gs://bucket/path


@dataclass
class Config:
    """A run: one section per part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserError(f"Unknown config key '{key}'.{hint} Run `jaxscale train --help` for how keys are named.")


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Return `value` as `expected` (ints widen to float), or raise a UserError naming all three."""
    origin = typing.get_origin(expected)
    if origin in (dict, list, typing.Union, types.UnionType):
        ok = isinstance(value, origin) if origin in (dict, list) else True
    elif expected is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept any float literal.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise UserError(
            f"Config key '{key}' expects {name}, got {value!r} ({type(value).__name__}). Set it like `{key}=<{name}>`."
        )
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise _unknown_key(key)
    section_name, name = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section) or name not in _field_types(type(section)):
        raise _unknown_key(key)
    setattr(section, name, _check_type(key, value, _field_types(type(section))[name]))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as a dict of sections -> {\"section.key\": value}; mesh.rules stays one value."""
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        # A dict value is a section unless the field itself holds a dict (mesh.rules).
        if isinstance(value, dict) and full not in ("mesh.rules",):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` and read the value as a YAML literal (safe loader, no evaluation)."""
    if "=" not in text:
        raise UserError(f"Override '{text}' is not of the form section.key=value, e.g. train.steps=50.")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, an optional YAML file and `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = epath.Path(path)  # a local file or one in a bucket (the config.yaml of a run.dir)
        if not path.is_file():
            raise UserError(f"Config file '{path}' does not exist. Pass a YAML file such as configs/tiny.yaml.")
        try:
            loaded = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"Config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"Config file '{path}' must hold a mapping of sections, got {type(loaded).__name__}.")
        values.update(flatten(loaded))
    values.update(parse_override(o) for o in overrides)

    cfg = Config()
    # The model preset goes first so that every other model key refines it; an imported model's
    # config.json takes the preset's place.
    preset = values.get("model.preset", cfg.model.preset)
    _apply(cfg, "model.preset", preset)
    init_from = values.get("model.init_from", "")
    shape = _imported_shape(init_from, values) if init_from else preset_values(cfg.model.preset)
    for key, value in shape.items():
        _apply(cfg, f"model.{key}", value)
    for key, value in values.items():
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def _imported_shape(init_from: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The model keys of the Hugging Face directory `init_from` names; a UserError for a user's key that contradicts
    them. Sets data.tokenizer to the directory's tokenizer.json when the user left it unset."""
    directory = hf_directory(str(init_from))
    hf = read_hf_config(directory)
    shape = model_values(hf, directory)
    for key, wanted in shape.items():
        full = f"model.{key}"
        if full in values and _check_type(full, values[full], type(wanted)) != wanted:
            raise UserError(
                f"{full}={values[full]} contradicts {directory / 'config.json'}, which makes it {wanted}. With "
                f"model.init_from the model's shape comes from config.json: drop {full} from the config."
            )
    if "data.tokenizer" not in values:
        tokenizer = directory / "tokenizer.json"
        if not tokenizer.is_file():
            raise UserError(
                f"model.init_from: no tokenizer.json in '{directory}'. Add the model's tokenizer.json there, or set "
                f"data.tokenizer to the path of its tokenizer.json."
            )
        values["data.tokenizer"] = str(tokenizer)
    # The family's training defaults (e.g. Qwen3-MoE's router loss) sit under the user's own keys.
    return training_values(hf) | shape


def validate(cfg: Config) -> None:
    """Checks of single values, which need no devices; how they fit a mesh is jaxscale.training.layout's to check."""
    unroll = cfg.model.scan_unroll  # int | str: the range table checks a number, this what is not one
    if unroll != AUTO and (not isinstance(unroll, int) or isinstance(unroll, bool)):
        raise UserError(
            f"model.scan_unroll={unroll!r} is neither auto nor a number of layers; set model.scan_unroll=auto (the "
            f"planner picks) or a whole number of layers per iteration of the layer loop, e.g. 1 (scanned)."
        )
    sp = cfg.parallel.sequence_parallel  # bool | str: true, false or auto
    if not isinstance(sp, bool) and sp != AUTO:
        raise UserError(
            f"parallel.sequence_parallel={sp!r} is not one of auto, true, false; set parallel.sequence_parallel=auto "
            f"(on wherever mesh.tensor > 1)."
        )
    _validate_ranges(cfg)
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    if m.head_dim % 2:
        raise UserError(f"model.head_dim={m.head_dim} must be even for rotary embeddings.")
    _validate_architecture(m)
    if m.logits_chunk < 0 or (m.logits_chunk and cfg.train.seq_len % m.logits_chunk):
        raise UserError(
            f"model.logits_chunk={m.logits_chunk} must divide train.seq_len={cfg.train.seq_len}; choose a divisor "
            f"of it (e.g. {cfg.train.seq_len // 4 or 1}), or 0 to compute every position's logits at once."
        )
    if m.remat != AUTO and m.remat not in REMAT_POLICIES:
        raise UserError(
            f"model.remat='{m.remat}' is not a remat policy; choose auto (the planner picks) or one of "
            f"{', '.join(REMAT_POLICIES)}."
        )
    for dtype_key in ("param_dtype", "compute_dtype"):
        if getattr(m, dtype_key) not in DTYPES:
            raise UserError(f"model.{dtype_key}='{getattr(m, dtype_key)}' must be float32, bfloat16 or float16.")
    _validate_moe(m)
    if cfg.train.global_batch % cfg.train.grad_accum:
        raise UserError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by train.grad_accum="
            f"{cfg.train.grad_accum}; pick a global batch that is a multiple of the microbatch count."
        )
    if cfg.parallel.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise UserError(
            f"parallel.pipeline_schedule='{cfg.parallel.pipeline_schedule}' is not a schedule; choose one of "
            f"{', '.join(PIPELINE_SCHEDULES)}."
        )
    if cfg.parallel.context_attention not in CONTEXT_ATTENTION:
        raise UserError(
            f"parallel.context_attention='{cfg.parallel.context_attention}' is not one of "
            f"{', '.join(CONTEXT_ATTENTION)}: ring passes key/value blocks around the context devices, allgather "
            f"gathers the whole sequence's keys and values on each."
        )
    if cfg.data.packing not in CHOICES["data.packing"]:
        raise UserError(
            f"data.packing='{cfg.data.packing}' must be 'segmented' (attention and positions per packed document) "
            f"or 'concat' (each row one sequence)."
        )
    if cfg.train.on_nan not in CHOICES["train.on_nan"]:
        raise UserError(f"train.on_nan='{cfg.train.on_nan}' must be 'stop' or 'skip'.")
    step_window(cfg.log.profile_steps)
    for key in cfg.checkpoint.allow_config_change:
        if key not in _all_keys():
            close = difflib.get_close_matches(str(key), _all_keys(), n=3, cutoff=0.5)
            raise UserError(
                f"checkpoint.allow_config_change lists '{key}', which is no config key"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; list keys whose change a resume may accept, e.g. "
                "checkpoint.allow_config_change=[model.rope_theta]."
            )
    _validate_lora(cfg.lora, m)


def _validate_lora(lora: LoraConfig, m: ModelConfig) -> None:
    """The `lora.*` values on their own and against the model's widths; how they fit a mesh is the layout's check."""
    if lora.rank == 0:
        if lora.base_quant != "none":
            raise UserError(
                f"lora.base_quant={lora.base_quant} quantizes a frozen base, but LoRA is off (lora.rank=0); set "
                f"lora.rank (e.g. lora.rank=8) or lora.base_quant=none."
            )
        if lora.dropout != 0:
            raise UserError(
                f"lora.dropout={lora.dropout} drops part of the adapters' input, but LoRA is off (lora.rank=0); set "
                f"lora.rank (e.g. lora.rank=8) or lora.dropout=0."
            )
        for key in ("rslora", "dora"):
            if getattr(lora, key):
                raise UserError(
                    f"lora.{key}=true shapes LoRA adapters, but LoRA is off (lora.rank=0); set lora.rank (e.g. "
                    f"lora.rank=8) or lora.{key}=false."
                )
        if lora.weight_decay != 0:
            raise UserError(
                f"lora.weight_decay={lora.weight_decay} decays the adapters, but LoRA is off (lora.rank=0); set "
                f"optim.weight_decay for a full run, or lora.rank (e.g. lora.rank=8)."
            )
        return
    widest_rank = min(m.d_model, m.head_dim * m.n_kv_heads)
    if not 1 <= lora.rank <= widest_rank:
        raise UserError(
            f"lora.rank={lora.rank} is out of range: it must be 0 (off) or between 1 and {widest_rank}, the "
            f"narrowest projection's width (model.d_model, model.n_kv_heads x model.head_dim); e.g. lora.rank=8."
        )
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets:
        raise UserError(
            f"lora.targets={lora.targets} names {', '.join(map(repr, unknown)) or 'nothing'}; list any of "
            f"{', '.join(LORA_TARGETS)} (the attention and SwiGLU projections, the embedding, the head), e.g. "
            f"lora.targets=[q,v]."
        )
    outer = [t for t in lora.targets if t in ("embed_tokens", "lm_head")]
    if outer and m.tie_embeddings:
        raise UserError(
            f"lora.targets names {' and '.join(outer)}, but model.tie_embeddings=true: one matrix is both the "
            f"embedding and the head, and an adapter on either (as PEFT would save it) changes the other once merged. "
            f"Drop embed_tokens and lm_head from lora.targets, or adapt a model with an untied head."
        )
    if "lm_head" in lora.targets and lora.dropout:
        raise UserError(
            f"lora.targets names lm_head with lora.dropout={lora.dropout}: jaxscale folds the head's adapter into "
            f"the head and cannot drop its input as PEFT does. Set lora.dropout=0 or drop lm_head from lora.targets."
        )
    if not lora.alpha > 0:
        raise UserError(f"lora.alpha={lora.alpha} must be positive; the adapters' update is scaled by alpha / rank.")
    if not 0 <= lora.dropout < 1:
        raise UserError(
            f"lora.dropout={lora.dropout} must be at least 0 and below 1: the share of each adapter's input zeroed "
            f"in training (0: off); e.g. lora.dropout=0.05."
        )
    if not lora.weight_decay >= 0:
        raise UserError(
            f"lora.weight_decay={lora.weight_decay} must not be negative; 0 (the default, as transformers' Trainer) "
            f"leaves the adapters undecayed, e.g. lora.weight_decay=0.01 decays them."
        )
    if lora.base_quant not in BASE_QUANTS:
        raise UserError(f"lora.base_quant='{lora.base_quant}' must be one of {', '.join(BASE_QUANTS)}.")
    if lora.base_quant != "none" and (m.d_model % 64 or m.d_ff % 64):
        raise UserError(
            f"lora.base_quant={lora.base_quant} stores the base in blocks of 64 along model.d_model={m.d_model} "
            f"and model.d_ff={m.d_ff}; make both multiples of 64 or set lora.base_quant=none."
        )
    if lora.base and m.init_from:
        raise UserError(
            f"lora.base={lora.base} and model.init_from={m.init_from} both name the frozen base; keep one of them."
        )
    if m.num_experts and (lora.base_quant != "none" or set(lora.targets) - {"q", "k", "v", "o", *outer}):
        raise UserError(
            f"LoRA on a mixture-of-experts model (model.num_experts={m.num_experts}) adapts attention only, with "
            f"the base unquantized: the experts' weights get no adapters. Set lora.targets=[q,k,v,o] and "
            f"lora.base_quant=none, or model.num_experts=0."
        )


def step_window(text: str) -> tuple[int, int] | None:
    """The steps START..END-1 that `log.profile_steps="START:END"` names (None when empty), or a UserError."""
    if not text:
        return None
    start, _, end = str(text).partition(":")
    if not (start.strip().isdigit() and end.strip().isdigit()) or int(start) >= int(end):
        raise UserError(
            f"log.profile_steps='{text}' is not a window of steps; write START:END with 0 <= START < END, "
            f"e.g. log.profile_steps=10:15 traces steps 10 to 14 (counted from 0)."
        )
    return int(start), int(end)


# Each numeric key's allowed range, as (low, low included, high, high included, what the value means);
# None: unbounded. Every float key must also be finite. Checks that need more than one key live in `validate`.
_INF = None
_RANGES = {
    "model.vocab_size": (0, True, _INF, False, "0: the tokenizer's vocabulary, padded to a multiple of 128"),
    "model.d_model": (1, True, _INF, False, "the width of the residual stream"),
    "model.n_layers": (1, True, _INF, False, "decoder blocks"),
    "model.n_heads": (1, True, _INF, False, "query heads"),
    "model.n_kv_heads": (1, True, _INF, False, "key/value heads, a divisor of model.n_heads"),
    "model.head_dim": (1, True, _INF, False, "the width of each head"),
    "model.d_ff": (1, True, _INF, False, "the width of the feed-forward layer"),
    "model.rope_theta": (0.0, False, _INF, False, "the rotary base"),
    "model.rope_original_context": (1, True, _INF, False, "the context the rope scaling stretches"),
    "model.rope_beta_fast": (0.0, False, _INF, False, "yarn: the rotation count above which dimensions are kept"),
    "model.rope_beta_slow": (0.0, False, _INF, False, "yarn: the rotation count below which they are interpolated"),
    "model.rope_attention_factor": (0.0, True, _INF, False, "yarn: cos and sin times this; 0: 0.1 ln(factor) + 1"),
    "model.rope_local_theta": (0.0, True, _INF, False, "the local layers' rotary base; 0: the global one"),
    "model.query_pre_attn_scalar": (0.0, True, _INF, False, "logits scaled by its -1/2 power; 0: head_dim"),
    "model.attn_softcap": (0.0, True, _INF, False, "attention logits become c tanh(logits / c); 0: none"),
    "model.final_softcap": (0.0, True, _INF, False, "output logits become c tanh(logits / c); 0: none"),
    "model.norm_eps": (0.0, False, _INF, False, "the epsilon of RMSNorm"),
    "model.init_std": (0.0, False, _INF, False, "the standard deviation of the initial weights"),
    "model.scan_unroll": (1, True, _INF, False, "layers per iteration of the layer loop; auto: the planner picks"),
    "model.experts_per_token": (1, True, _INF, False, "the experts each token is routed to"),
    "model.aux_loss_weight": (0.0, True, _INF, False, "the load-balancing loss's weight; 0: off"),
    "model.z_loss_weight": (0.0, True, _INF, False, "the router z-loss's weight; 0: off"),
    "parallel.virtual_stages": (1, True, _INF, False, "chunks of layers per pipeline device"),
    "parallel.pipeline_backward_ticks": (0, True, _INF, False, "0: the split that idles least"),
    "data.eval_fraction": (0.0, True, 1.0, False, "the share of documents held out for eval"),
    "data.workers": (0, True, _INF, False, "tokenizer processes; 0: one per core"),
    "data.prefetch": (1, True, _INF, False, "batches prepared ahead"),
    "optim.lr": (0.0, False, _INF, False, ""),
    "optim.warmup_steps": (0, True, _INF, False, ""),
    "optim.decay_steps": (0, True, _INF, False, ""),
    "optim.min_lr_ratio": (0.0, True, 1.0, True, ""),
    "optim.b1": (0.0, True, 1.0, False, ""),
    "optim.b2": (0.0, True, 1.0, False, ""),
    "optim.eps": (0.0, False, _INF, False, ""),
    "optim.weight_decay": (0.0, True, _INF, False, ""),
    "optim.clip_norm": (0.0, False, _INF, False, ""),
    "train.steps": (1, True, _INF, False, ""),
    "train.global_batch": (1, True, _INF, False, "sequences per optimizer step"),
    "train.seq_len": (1, True, _INF, False, "tokens per sequence"),
    "train.grad_accum": (1, True, _INF, False, "microbatches per step"),
    "train.eval_every": (0, True, _INF, False, "steps between evaluations; 0: evaluate after the last step only"),
    "train.eval_batches": (1, True, _INF, False, "held-out batches each evaluation averages"),
    "train.max_device_batch": (0, True, _INF, False, "0: no limit"),
    "train.hang_timeout_s": (0.0, True, _INF, False, "0: no hang watchdog"),
    "checkpoint.every": (0, True, _INF, False, "steps between saves; 0: no step-count saves"),
    "checkpoint.every_minutes": (0.0, True, _INF, False, "minutes between saves; 0: off"),
    "checkpoint.keep": (1, True, _INF, False, "the newest checkpoints kept; checkpoint.every=0 turns saving off"),
    "checkpoint.keep_every": (0, True, _INF, False, "0: keep no step for good"),
    "log.every": (1, True, _INF, False, "steps between logged rows"),
    "runtime.cpu_devices": (0, True, _INF, False, "0: the devices there are"),
    "runtime.num_processes": (0, True, _INF, False, "0: detect the cluster"),
    "runtime.device_memory_gib": (0.0, True, _INF, False, "0: the device's own memory"),
    "lora.alpha": (0.0, False, _INF, False, "the adapters' update is scaled by alpha / rank"),
}


def _validate_ranges(cfg: Config) -> None:
    """Every float finite and every key of `_RANGES` in its range, each refusal naming the key, the range and a
    value that works: a bad value would otherwise show as a crash or as divergence many steps later."""
    defaults = Config()
    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(
                    f"{section.name}.{item.name}={value} must be a finite number, e.g. {section.name}.{item.name}="
                    f"{getattr(getattr(defaults, section.name), item.name)}."
                )
    for key, (low, low_ok, high, high_ok, meaning) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not in_range(value, key):
            left, right = "[" if low_ok else "(", "]" if high_ok else ")"
            span = f"{left}{low}, {high if high is not None else 'inf'}{right}"
            default = getattr(getattr(defaults, section), name)  # in range: a test keeps it so
            raise UserError(
                f"{key}={value} is out of range; set it within {span}, e.g. {key}={default}"
                + (f" ({meaning})." if meaning else ".")
            )


def in_range(value: float, key: str) -> bool:
    """Whether `value` lies in the range `_RANGES` gives `key`."""
    if value == AUTO:  # model.scan_unroll=auto: the planner picks a value in range
        return True
    low, low_ok, high, high_ok, _ = _RANGES[key]
    above = value > low or (low_ok and value == low)
    below = high is None or value < high or (high_ok and value == high)
    return above and below


# The values of the model's architecture switches the decoder implements (jaxscale.models.transformer).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MODEL_CHOICES = {
    "rope_type": ROPE_TYPES,
    "attention_bias": ("none", "qkv", "qkvo"),
    "activation": ("silu", "gelu_tanh"),
    "router_weights": ("auto", "normalized", "raw"),
    "aux_loss_style": ("switch", "transformers"),
}


# The keys whose values are names, with the names each takes; validation and the config reference read this.
CHOICES = {
    "model.remat": (AUTO, *REMAT_POLICIES),
    "model.param_dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    **{f"model.{key}": choices for key, choices in MODEL_CHOICES.items()},
    "parallel.pipeline_schedule": PIPELINE_SCHEDULES,
    "parallel.context_attention": CONTEXT_ATTENTION,
    "data.packing": ("segmented", "concat"),
    "train.on_nan": ("stop", "skip"),
    "lora.base_quant": BASE_QUANTS,
}


def _validate_architecture(m: ModelConfig) -> None:
    for key, choices in MODEL_CHOICES.items():
        if getattr(m, key) not in choices:
            raise UserError(f"model.{key}={getattr(m, key)!r} is not one of {', '.join(choices)}.")
    if m.rope_scaling_factor < 1 or not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise UserError(
            f"model.rope_scaling_factor={m.rope_scaling_factor} must be at least 1 (1: no scaling), and "
            f"0 < model.rope_low_freq_factor={m.rope_low_freq_factor} < model.rope_high_freq_factor="
            f"{m.rope_high_freq_factor}."
        )
    if m.rope_type == "default" and m.rope_scaling_factor != 1:
        raise UserError(
            f"model.rope_scaling_factor={m.rope_scaling_factor} scales rope, but model.rope_type=default does not "
            f"scale; set model.rope_type to one of {', '.join(ROPE_TYPES[1:])} (llama3 for a Llama 3.1+ run saved "
            f"before rope_type existed), or the factor to 1."
        )
    if m.sliding_window < 0 or set(m.attention_pattern) - set("GL"):
        raise UserError(
            f"model.sliding_window={m.sliding_window} must be 0 (none) or a window of tokens, and "
            f"model.attention_pattern={m.attention_pattern!r} a string of G (global) and L (local) per layer."
        )
    if m.attention_pattern and len(m.attention_pattern) != m.n_layers:
        raise UserError(
            f"model.attention_pattern has {len(m.attention_pattern)} letters for model.n_layers={m.n_layers} "
            f"layers; give one G or L per layer, or leave it empty."
        )
    if "L" in m.attention_pattern and not m.sliding_window:
        raise UserError(
            "model.attention_pattern has local (L) layers but model.sliding_window=0; set the window they attend "
            "over, or make every layer G."
        )
    if m.norm_offset not in (0.0, 1.0) or m.attn_softcap < 0 or m.final_softcap < 0 or m.query_pre_attn_scalar < 0:
        raise UserError(
            f"model.norm_offset={m.norm_offset} must be 0 or 1 (Gemma), and model.attn_softcap={m.attn_softcap}, "
            f"model.final_softcap={m.final_softcap}, model.query_pre_attn_scalar={m.query_pre_attn_scalar} at "
            f"least 0 (0: off, or head_dim for the scalar)."
        )


def _validate_moe(m: ModelConfig) -> None:
    if m.num_experts < 0:
        raise UserError(f"model.num_experts={m.num_experts} must be 0 (dense) or a positive number of experts.")
    if m.num_experts == 0:
        if m.num_shared_experts:
            raise UserError(
                f"model.num_shared_experts={m.num_shared_experts} needs routed experts; set model.num_experts > 0 "
                f"or model.num_shared_experts=0."
            )
        return
    if not 1 <= m.experts_per_token <= m.num_experts:
        raise UserError(
            f"model.experts_per_token={m.experts_per_token} must be between 1 and model.num_experts={m.num_experts}; "
            f"lower experts_per_token or add experts."
        )
    if m.num_shared_experts < 0 or m.capacity_factor < 0:
        raise UserError(
            f"model.num_shared_experts={m.num_shared_experts} and model.capacity_factor={m.capacity_factor} must not "
            f"be negative (capacity_factor=0 means dropless)."
        )
    if m.ragged_buffer != 0 and m.ragged_buffer < 1:
        raise UserError(
            f"model.ragged_buffer={m.ragged_buffer} must be 0 (worst-case buffers, never drops) or at least 1: "
            f"a buffer below one balanced share drops tokens even when routing is balanced."
        )
    if m.moe_every < 1 or m.n_layers % m.moe_every:
        raise UserError(
            f"model.moe_every={m.moe_every} must be at least 1 and divide model.n_layers={m.n_layers}; pick a divisor "
            f"of {m.n_layers} (1: every layer is MoE)."
        )
    if m.expert_d_ff < 0 or any(not 0 <= i < m.n_layers for i in m.mlp_only_layers):
        raise UserError(
            f"model.expert_d_ff={m.expert_d_ff} must be 0 (d_ff) or a width, and model.mlp_only_layers="
            f"{m.mlp_only_layers} layer numbers below model.n_layers={m.n_layers}."
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, after presets and overrides) as YAML."""
    epath.Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
