"""`jaxscale export RUN_DIR --to hf OUT_DIR`: a run's newest checkpoint as a Hugging Face model directory.

Writes config.json (LlamaForCausalLM, MistralForCausalLM or MixtralForCausalLM), the weights as
safetensors shards with their index, and the tokenizer. The checkpoint is restored onto the run's
own mesh, as a resume would; the writer then fetches one Hugging Face tensor (one layer of one
parameter) at a time and streams it into its shard, so host memory holds one tensor, never the model.

`export_hf` reads the parameters and hands them to `write_model`: an adapter export (a LoRA merge
into the base, or a PEFT adapter directory) transforms or replaces that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np
import safetensors.numpy
import yaml
from flax import nnx
from jax.experimental import multihost_utils

from jaxscale.checkpoint import Checkpointer
from jaxscale.config import Config, flatten, load_config, to_dict
from jaxscale.data import build_tokenizer
from jaxscale.errors import UserError
from jaxscale.hf.load import INDEX_FILE, SINGLE_FILE, by_path
from jaxscale.hf.tensors import ParamPath, TensorMap, stack_sizes, tensor_maps
from jaxscale.hf_config import export_config_json, hf_directory, read_hf_config
from jaxscale.models.lora import ADAPTER_OF, merged_params
from jaxscale.models.transformer import DecoderShape
from jaxscale.storage import run_path
from jaxscale.training.base import base_reference, check_same_base, initial_state, saved_part, with_saved
from jaxscale.training.setup import setup_run

DEFAULT_SHARD_BYTES = 2 * 1024**3
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
BYTE_EOS = "<|endoftext|>"  # the byte tokenizer's id 256 in an exported tokenizer.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the exported model: which slice of which parameter it is."""

    name: str
    path: ParamPath
    stack_index: tuple[int, ...]
    shape: tuple[int, ...]


def export_hf(
    run_dir: str | Path,
    out_dir: Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overrides: Sequence[str] = (),
    merge: bool = False,
) -> int:
    """Write the newest checkpoint of `run_dir` (a local path or a bucket URL) into `out_dir` as a Hugging Face
    model; returns its step.

    A LoRA run is written with its adapters folded into the base (`merge`, a quantized base dequantized), or
    else as a PEFT adapter directory (`write_peft_adapter`) to load onto the base it was trained on.
    `overrides`: runtime.* and mesh.* keys of where the export runs (e.g. another process id or mesh),
    applied to the run's config. Call after jaxscale.runtime.initialize of that config's runtime section.
    """
    run_dir = run_path(run_dir)
    cfg, source = run_config(run_dir, overrides)
    if merge and not cfg.lora.rank:
        raise UserError(
            f"--merge folds LoRA adapters into the base, but '{run_dir}' trained none (lora.rank=0); drop it."
        )
    setup = setup_run(cfg)
    checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    try:
        restored = checkpoints.restore_latest(saved_part(setup, setup.state_structs))
        if restored is not None and cfg.lora.rank:  # the base is rebuilt as a resume rebuilds it, and must match
            base = initial_state(setup)
            saved = checkpoints.read_meta(restored[0]).get("lora_base")
            check_same_base(saved, base_reference(setup, base), checkpoints.directory)
            restored = restored[0], with_saved(base, restored[1])
    finally:
        checkpoints.close()
    if restored is None:
        raise UserError(
            f"'{run_dir}' has no checkpoint to export (looked in {run_dir / 'checkpoints'}); train with "
            f"checkpoint.every > 0, or point at the run.dir of a run that saved."
        )
    step, state = restored
    model = nnx.merge(setup.graphdef, state)[0]
    if cfg.lora.rank and not merge:
        write_peft_adapter(model, setup.shape, cfg, out_dir)
        return step
    params = merged_params(model) if cfg.lora.rank else dict(by_path(nnx.to_pure_dict(state)[0]))
    plain = dataclasses.replace(setup.shape, adapters=None)
    write_model(params, plain, cfg, source, out_dir, shard_bytes)
    return step


def write_peft_adapter(model: nnx.Module, s: DecoderShape, cfg: Config, out_dir: Path) -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them for a Llama-family model.

    Each adapter becomes `base_model.model.<the HF weight's module>.lora_A.weight` [r, in] and
    `.lora_B.weight` [out, r], in the flattening order of the HF weight (heads major); float32.
    """
    plain = tensor_maps(dataclasses.replace(s, adapters=None))
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for path, module in nnx.iter_modules(model):
        for weight, attribute in ADAPTER_OF.items():
            lora = getattr(module, attribute, None)
            if lora is None:
                continue
            m = plain[(*path, weight)]
            a_SIR, b_SRO = _fetch(lora.lora.lora_a[...]), _fetch(lora.lora.lora_b[...])
            for layer in range(a_SIR.shape[0]):
                name = "base_model.model." + m.hf_name((layer,)).removesuffix(".weight")
                tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_SIR[layer].T, np.float32)
                tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_SRO[layer].T, np.float32)
            modules.append(m.name.split(".")[-2])
    if jax.process_index() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(set(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": cfg.model.init_from.removeprefix("hf:"),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any] | None]:
    """The run's config (from RUN_DIR/config.yaml, with runtime.* and mesh.* `overrides`), and the config.json it
    was imported from if still readable.

    The shape is read from config.yaml itself, so the source directory of a full run need not exist any
    more. A LoRA run's checkpoint holds no base: its model.init_from is kept, and the base read from it again.
    """
    path = run_path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory: it has no config.yaml. Pass the run.dir of a run.")
    others = [o for o in overrides if not o.startswith(("runtime.", "mesh."))]
    if others:
        raise UserError(
            f"export takes runtime.* and mesh.* overrides only (where it runs), not {', '.join(others)}: the model "
            f"is the run's."
        )
    saved = flatten(yaml.safe_load(path.read_text()) or {})
    init_from = saved.get("model.init_from", "")
    cfg = load_config(path, [*([] if saved.get("lora.rank") else ["model.init_from="]), *overrides])
    source = None
    if init_from:
        try:
            source = read_hf_config(hf_directory(init_from))
        except UserError:
            source = None  # gone or changed since: export from config.yaml alone
    return cfg, source


def hf_tensors(s: DecoderShape) -> list[tuple[HFTensor, TensorMap]]:
    """Every tensor of the Hugging Face model of shape `s`, in layer order (embeddings first, head last)."""
    tensors = []
    for path, m in tensor_maps(s).items():
        for stack_index in itertools.product(*map(range, stack_sizes(m, s))):
            tensors.append((HFTensor(m.hf_name(stack_index), path, stack_index, m.hf_shape), m))

    def natural(item: tuple[HFTensor, TensorMap]) -> list:
        name = item[0].name
        order = 2 if name.startswith("lm_head") or name == "model.norm.weight" else int(name.startswith("model.layers"))
        return [order, *(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))]

    return sorted(tensors, key=natural)


def write_model(
    params: dict[ParamPath, jax.Array],
    s: DecoderShape,
    cfg: Config,
    source: dict[str, Any] | None,
    out_dir: Path,
    shard_bytes: int,
) -> None:
    """config.json, safetensors shards (one file when it fits in `shard_bytes`) with their index, and the tokenizer.

    Every process fetches each tensor (a collective on several hosts); process 0 writes it.
    """
    dtype = np.dtype(cfg.model.param_dtype)
    tensors = hf_tensors(s)
    shards = _shards([t for t, _ in tensors], dtype.itemsize, shard_bytes)
    if len(shards) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    maps = dict(tensors)
    for file, shard in zip(files, shards, strict=True):
        with open(out_dir / file, "wb") if is_main else contextlib.nullcontext() as out:
            if out:
                _write_header(out, shard, SAFETENSORS_DTYPES[dtype.name], dtype.itemsize)
            for t in shard:
                param = params[t.path]
                value = maps[t].to_hf(_fetch(param[t.stack_index] if t.stack_index else param))
                if out:
                    out.write(np.ascontiguousarray(value, dtype).tobytes())
    if not is_main:
        return
    if len(shards) > 1:
        total = sum(math.prod(t.shape) for t, _ in tensors) * dtype.itemsize
        weight_map = {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    eos_id = write_tokenizer(cfg, out_dir)
    model = to_dict(cfg)["model"] | {"vocab_size": s.vocab_size}
    config = export_config_json(model, source, eos_id, cfg.train.seq_len, dtype.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def _shards(tensors: list[HFTensor], itemsize: int, shard_bytes: int) -> list[list[HFTensor]]:
    """Tensors in order, cut into files of at most `shard_bytes` (a bigger tensor gets a file of its own)."""
    shards: list[list[HFTensor]] = [[]]
    filled = 0
    for t in tensors:
        size = math.prod(t.shape) * itemsize
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(t)
        filled += size
    return shards


def _write_header(out: BinaryIO, shard: list[HFTensor], dtype: str, itemsize: int) -> None:
    """The safetensors header: its length (u64, little-endian), then JSON of each tensor's dtype, shape and bytes.

    Written by hand because safetensors' own writer takes every tensor of a file at once; with the
    header first, the tensors can follow one at a time.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        size = math.prod(t.shape) * itemsize
        header[t.name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    out.write(len(text).to_bytes(8, "little") + text)


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole of a (small: one layer's) global array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_tokenizer(cfg: Config, out_dir: Path) -> int:
    """The run's tokenizer files in `out_dir`; returns its eos id.

    A tokenizer.json is copied with the tokenizer_config.json and special_tokens_map.json beside it.
    The byte tokenizer becomes an equivalent tokenizer.json: UTF-8 bytes as ids 0..255 and BYTE_EOS as 256.
    """
    if cfg.data.tokenizer == "byte":
        (out_dir / "tokenizer.json").write_text(byte_tokenizer_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BYTE_EOS}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return 256
    eos_id = build_tokenizer(cfg.data).eos_id
    source = Path(cfg.data.tokenizer).expanduser()
    shutil.copyfile(source, out_dir / "tokenizer.json")
    for name in TOKENIZER_FILES[1:]:
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, out_dir / name)
    return eos_id


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, which byte-level tokenizers store bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def byte_tokenizer_json() -> str:
    """A tokenizer.json that encodes text as jaxscale's byte tokenizer does: UTF-8 bytes 0..255, eos 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOS, special=True)])
    return tokenizer.to_str()
