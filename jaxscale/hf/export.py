"""`jaxscale export RUN_DIR --to hf OUT_DIR`: a run's newest checkpoint as a Hugging Face model directory.

Writes config.json (the import's architecture, or the first family of jaxscale.families that computes the
model; none: refused by name), the weights as
safetensors shards with their index, the tokenizer, generation_config.json and the chat template. The
checkpoint is restored onto the run's own mesh, as a resume would; the writer then fetches one Hugging
Face tensor (one layer of one parameter) at a time and streams it into its shard, so host memory holds
one tensor, never the model. The weights are written in the base model's dtype (its config.json's
`dtype` / `torch_dtype`, else model.param_dtype) unless `dtype` names another.

`export_hf` hands `write_model` each tensor's value: a full run's parameter, or a LoRA merge computed
on the host in float64 (`merged_values`) from the ORIGINAL base (model.init_from's files, lora.base's
checkpoint or the seeded initial model, never the rounded or quantized copy the run trained beside,
unless asked), exactly PEFT's merge_and_unload formulas. A PEFT adapter directory replaces that step;
the tokenizer files, the chat template the run trained with and the model's generation_config.json go
beside the adapter too (as TRL's SFTTrainer saves an adapter), so that `AutoTokenizer.from_pretrained` of
the directory gives the template the run trained with.

The output directory must be empty or new: with `overwrite`, what an earlier export wrote there (weight
files and their indexes, a PEFT adapter's config, config.json, the tokenizer, generation and chat template
files) is removed first and nothing else; model.init_from's own directory and the tokenizer's are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np
import safetensors.numpy
import yaml
from flax import nnx
from jax.experimental import multihost_utils

from jaxscale.config import Config, flatten, to_dict
from jaxscale.data import build_tokenizer
from jaxscale.errors import UserError
from jaxscale.families import Family, family_for
from jaxscale.hf.load import INDEX_FILE, SINGLE_FILE, SafetensorsDir, by_path
from jaxscale.hf.tensors import ParamPath, TensorMap, stack_sizes, tensor_maps
from jaxscale.hf_config import export_config_json, hf_directory, read_hf_config
from jaxscale.models.lora import adapters_of, magnitudes, stored_base, stored_value
from jaxscale.models.transformer import Decoder, DecoderShape
from jaxscale.sharding import tree_shardings, use_rules
from jaxscale.storage import run_path
from jaxscale.training.base import base_checkpoint_params
from jaxscale.training.restore import open_run
from jaxscale.training.restore import run_config as saved_run_config
from jaxscale.training.setup import RunSetup

DEFAULT_SHARD_BYTES = 2 * 1024**3
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
BYTE_EOS = "<|endoftext|>"  # the byte tokenizer's id 256 in an exported tokenizer.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Copied beside the tokenizer from the tokenizer's directory, else from model.init_from's.
MODEL_FILES = ("generation_config.json", "chat_template.jinja")
# What `overwrite` removes from an output directory before writing: what an earlier export wrote, which a loader
# could pick up beside this export's files (an old shard beside a new index; an old chat_template.jinja, which
# wins over the one inside a new tokenizer_config.json).
EXPORT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "adapter_config.json")
EXPORT_FILES += ("config.json", *TOKENIZER_FILES, *MODEL_FILES)


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
    dtype: str = "",
    overwrite: bool = False,
    merge_into_quantized: bool = False,
) -> int:
    """Write the newest checkpoint of `run_dir` (a local path or a bucket URL) into `out_dir` as a Hugging Face
    model; returns its step.

    A LoRA run is written with its adapters folded into its original base (`merge`; `merge_into_quantized`:
    into the NF4 / int8 base it trained beside, dequantized), or else as a PEFT adapter directory
    (`write_peft_adapter`) to load onto the base it was trained on. `dtype`: float32, bfloat16 or float16 for
    the weights ("": the base model's). `overwrite`: replace an export already in `out_dir`.
    `overrides`: runtime.* and mesh.* keys of where the export runs (e.g. another process id or mesh),
    applied to the run's config. Call after jaxscale.runtime.initialize of that config's runtime section.
    """
    run_dir = run_path(run_dir)
    cfg, source = run_config(run_dir, overrides)
    if merge and not cfg.lora.rank:
        raise UserError(
            f"--merge folds LoRA adapters into the base, but '{run_dir}' trained none (lora.rank=0); drop it."
        )
    if merge_into_quantized and not (merge and cfg.lora.base_quant != "none"):
        raise UserError(
            f"--merge-into-quantized merges a QLoRA run's adapters into its quantized base, but '{run_dir}' "
            f"{'has no quantized base (lora.base_quant=none)' if merge else 'is not exported with --merge'}; drop it."
        )
    if dtype and dtype not in SAFETENSORS_DTYPES:
        raise UserError(f"--dtype {dtype} is not written; choose one of {', '.join(SAFETENSORS_DTYPES)}.")
    check_out_dir(out_dir, cfg, overwrite)
    setup, restored = open_run(run_dir, cfg)
    step, state = restored.step, restored.state
    model = nnx.merge(setup.graphdef, state)[0]
    if overwrite and jax.process_index() == 0:
        remove_earlier_export(out_dir)
    if cfg.lora.rank and not merge:
        write_peft_adapter(model, setup.shape, cfg, out_dir, dtype or "float32")
        if jax.process_index() == 0:
            write_tokenizer(cfg, out_dir)
            write_model_files(cfg, out_dir)
        return step
    plain = dataclasses.replace(setup.shape, adapters=None)
    with contextlib.ExitStack() as files:
        if not cfg.lora.rank:
            params = dict(by_path(nnx.to_pure_dict(state)[0]))
            values = _hf_values(lambda t, m: _fetch(_slice(params[t.path], t.stack_index)))
        elif merge_into_quantized:
            quantized = stored_base(model)
            values = merged_values(model, lambda t, m: _fetch(stored_value(quantized[t.path], t.stack_index)))
        else:
            values = merged_values(model, original_base(setup, files))
        write_model(values, plain, cfg, source, out_dir, shard_bytes, dtype or base_dtype(cfg, source))
    return step


def base_dtype(cfg: Config, source: dict[str, Any] | None) -> str:
    """The dtype an export writes by default: the base model's (its config.json's `dtype`, or `torch_dtype` as
    transformers before 5 wrote it), else the run's model.param_dtype."""
    declared = (source or {}).get("dtype") or (source or {}).get("torch_dtype")
    return declared if declared in SAFETENSORS_DTYPES else cfg.model.param_dtype


def check_out_dir(out_dir: Path, cfg: Config, overwrite: bool) -> None:
    """UserError unless `out_dir` may be written: new or empty (or, with `overwrite`, holding anything), and neither
    model.init_from's directory nor the tokenizer's (symlinks resolved)."""
    target = out_dir.expanduser().resolve()
    own = {"model.init_from": cfg.model.init_from.removeprefix("hf:") if cfg.model.init_from else ""}
    if cfg.data.tokenizer != "byte":
        own["data.tokenizer"] = str(Path(cfg.data.tokenizer).expanduser().parent)
    for key, directory in own.items():
        if directory and Path(directory).expanduser().resolve() == target:
            raise UserError(
                f"'{out_dir}' is the directory of the run's {key} ({directory}): an export there would overwrite the "
                f"files the run was made from. Export into a new directory, e.g. {out_dir.name}-finetuned."
            )
    if target.exists() and not target.is_dir():
        raise UserError(f"'{out_dir}' is a file; pass a directory to export into (new or empty).")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        shown = ", ".join(sorted(p.name for p in target.iterdir())[:5])
        raise UserError(
            f"'{out_dir}' is not empty ({shown}...): an export there would mix with the files already in it. Export "
            f"into a new or empty directory, or pass --overwrite to replace an earlier export (its weight files "
            f"and index are removed first; other files are kept)."
        )


def remove_earlier_export(out_dir: Path) -> None:
    """Remove what an earlier export wrote in `out_dir` (EXPORT_FILES), nothing else."""
    for pattern in EXPORT_FILES:
        for path in out_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def _slice(x: jax.Array, index: tuple[int, ...]) -> jax.Array:
    return x[index] if index else x


# A tensor's value in jaxscale's layout (one stack index), given its HFTensor and TensorMap.
TensorValue = Callable[[HFTensor, TensorMap], np.ndarray]


def _hf_values(param_values: TensorValue) -> TensorValue:
    """The same values in the HF tensors' layout."""
    return lambda t, m: m.to_hf(param_values(t, m))


def original_base(setup: RunSetup, stack: contextlib.ExitStack) -> TensorValue:
    """The base a LoRA run's adapters are merged into, in full precision: each tensor read from model.init_from's
    files as they are (kept open in `stack`), or from the unadapted model of lora.base's checkpoint or of the seed
    (the same weights the run's base was cast or quantized from)."""
    cfg = setup.cfg
    if cfg.model.init_from:
        files = stack.enter_context(SafetensorsDir(hf_directory(cfg.model.init_from)))

        def read(t: HFTensor, m: TensorMap) -> np.ndarray:
            return files.slice(t.name)[:].reshape(m.view).transpose(m.perm)

        return read
    plain = dataclasses.replace(setup.shape, adapters=None)
    if cfg.lora.base:
        params = dict(by_path(nnx.to_pure_dict(base_checkpoint_params(setup, cfg.lora.base))))
    else:
        with use_rules(setup.rules, setup.mesh):
            abstract = nnx.eval_shape(lambda: nnx.state(Decoder(plain, nnx.Rngs(params=cfg.train.seed)), nnx.Param))
            shardings = tree_shardings(abstract, nnx.get_partition_spec(abstract), setup.rules, setup.mesh)
            seeded = jax.jit(
                lambda: nnx.state(Decoder(plain, nnx.Rngs(params=cfg.train.seed)), nnx.Param), out_shardings=shardings
            )()
        params = dict(by_path(nnx.to_pure_dict(seeded)))
    return lambda t, m: _fetch(_slice(params[t.path], t.stack_index))


def merged_values(model: nnx.Module, base: TensorValue) -> TensorValue:
    """Each tensor of the merged model in HF layout, float64: PEFT's merge_and_unload on the host, W + scale B A,
    and with DoRA m / ||W + scale B A||_c times that, per output feature.

    W is `base`'s (`original_base`, or the quantized base the run trained beside, dequantized); DoRA's m is the
    one the run trained (its base's norms plus the shift), as its PEFT adapter carries it.
    """
    adapters, trained = adapters_of(model), magnitudes(model)

    def value(t: HFTensor, m: TensorMap) -> np.ndarray:
        w = np.asarray(base(t, m), np.float64)
        lora = adapters.get(t.path)
        if lora is not None:
            a_IR = _fetch(_slice(lora.lora.lora_a[...], t.stack_index)).astype(np.float64)
            b_RO = _fetch(_slice(lora.lora.lora_b[...], t.stack_index)).astype(np.float64)
            w_IO = w.reshape(a_IR.shape[0], b_RO.shape[1]) + lora.scale * (a_IR @ b_RO)
            if lora.dora:
                m_O = _fetch(_slice(trained[t.path], t.stack_index)).astype(np.float64)
                w_IO = w_IO * (m_O / np.linalg.norm(w_IO, axis=0))
            w = w_IO.reshape(w.shape)
        return m.to_hf(w)

    return value


def write_peft_adapter(model: nnx.Module, s: DecoderShape, cfg: Config, out_dir: Path, dtype: str) -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them for the model's family, in `dtype`.

    Each adapter of a projection or of the head becomes `base_model.model.<the HF weight's module>.lora_A.weight`
    [r, in] and `.lora_B.weight` [out, r], in the flattening order of the HF weight (heads major); the embedding's
    `lora_embedding_A` [r, V] and `lora_embedding_B` [D, r]; with DoRA each also `lora_magnitude_vector` [out]
    (for the embedding [D]).
    """
    source = read_hf_config(hf_directory(cfg.model.init_from))["architectures"][0] if cfg.model.init_from else None
    plain = tensor_maps(dataclasses.replace(s, adapters=None), family_for(to_dict(cfg)["model"], source))
    trained = magnitudes(model)
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for path, lora in adapters_of(model).items():
        m = plain[path]
        a_SIR, b_SRO = _fetch(lora.lora.lora_a[...]), _fetch(lora.lora.lora_b[...])
        m_SO = _fetch(trained[path]) if lora.dora else None
        stacked = len(m.stack) > 0
        a_names = ("lora_embedding_A", "lora_embedding_B") if path == ("embed",) else ("lora_A.weight", "lora_B.weight")
        for index in itertools.product(*map(range, a_SIR.shape[:1] if stacked else ())):
            name = "base_model.model." + m.hf_name(index).removesuffix(".weight")
            tensors[f"{name}.{a_names[0]}"] = np.ascontiguousarray(_slice(a_SIR, index).T, dtype)
            tensors[f"{name}.{a_names[1]}"] = np.ascontiguousarray(_slice(b_SRO, index).T, dtype)
            if m_SO is not None:
                tensors[f"{name}.lora_magnitude_vector"] = np.ascontiguousarray(_slice(m_SO, index), dtype)
        modules.append(m.name.removesuffix(".weight").split(".")[-1])
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
        "use_rslora": cfg.lora.rslora,
        "use_dora": cfg.lora.dora,
        "target_modules": sorted(set(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": cfg.model.init_from.removeprefix("hf:"),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, Any] | None]:
    """The run's config (jaxscale.training.restore.run_config, with runtime.* and mesh.* `overrides` only: the model
    is the run's), and the config.json it was imported from if still readable."""
    others = [o for o in overrides if not o.startswith(("runtime.", "mesh."))]
    if others:
        raise UserError(
            f"export takes runtime.* and mesh.* overrides only (where it runs), not {', '.join(others)}: the model "
            f"is the run's."
        )
    cfg = saved_run_config(run_dir, list(overrides))
    init_from = flatten(yaml.safe_load((run_path(run_dir) / "config.yaml").read_text()) or {}).get("model.init_from")
    source = None
    if init_from:
        try:
            source = read_hf_config(hf_directory(init_from))
        except UserError:
            source = None  # gone or changed since: export from config.yaml alone
    return cfg, source


def hf_tensors(s: DecoderShape, fam: Family) -> list[tuple[HFTensor, TensorMap]]:
    """Every tensor of the Hugging Face model of shape `s` in family `fam`, in layer order (embeddings first,
    head last)."""
    tensors = []
    for path, m in tensor_maps(s, fam).items():
        for stack_index in itertools.product(*map(range, stack_sizes(m, s))):
            tensors.append((HFTensor(m.hf_name(stack_index), path, stack_index, m.hf_shape), m))

    def natural(item: tuple[HFTensor, TensorMap]) -> list:
        name = item[0].name
        order = 2 if name.startswith("lm_head") or name == "model.norm.weight" else int(name.startswith("model.layers"))
        return [order, *(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))]

    return sorted(tensors, key=natural)


def write_model(
    values: Callable[[HFTensor, TensorMap], np.ndarray],
    s: DecoderShape,
    cfg: Config,
    source: dict[str, Any] | None,
    out_dir: Path,
    shard_bytes: int,
    dtype_name: str,
) -> None:
    """config.json, safetensors shards (one file when it fits in `shard_bytes`) of `values` (each tensor in HF
    layout, cast to `dtype_name`) with their index, the tokenizer and the model's generation and chat files.

    Every process computes each tensor (a collective on several hosts: its fetches); process 0 writes it.
    """
    dtype = np.dtype(dtype_name)
    model = to_dict(cfg)["model"] | {"vocab_size": s.vocab_size}
    fam = family_for(model, source["architectures"][0] if source else None)  # refused here if none computes it
    tensors = hf_tensors(s, fam)
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
                value = values(t, maps[t])
                if out:
                    out.write(np.ascontiguousarray(value.astype(dtype)).tobytes())
    if not is_main:
        return
    if len(shards) > 1:
        total = sum(math.prod(t.shape) for t, _ in tensors) * dtype.itemsize
        weight_map = {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    eos_id = write_tokenizer(cfg, out_dir)
    config = export_config_json(model, source, eos_id, cfg.train.seq_len, dtype.name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_model_files(cfg, out_dir, config)


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


def write_model_files(cfg: Config, out_dir: Path, config: dict[str, Any] | None = None) -> None:
    """generation_config.json and chat_template.jinja beside the tokenizer. The chat template is the one the run
    trained with (data.chat_template's, as jaxscale.data.chat reads it), else a chat_template.jinja of the
    tokenizer's or model.init_from's directory (a template inside tokenizer_config.json travels with that file);
    generation_config.json is copied from the same directories, else made from `config`'s token ids (a model's
    config.json; None, beside an adapter: none made)."""
    sources = []
    if cfg.data.tokenizer != "byte":
        sources.append(Path(cfg.data.tokenizer).expanduser().parent)
    if cfg.model.init_from:
        sources.append(hf_directory(cfg.model.init_from))
    template = trained_chat_template(cfg.data.chat_template) if cfg.data.chat_template else None
    if template is not None:
        (out_dir / "chat_template.jinja").write_text(template)
    for name in MODEL_FILES:
        found = next((d / name for d in sources if (d / name).is_file()), None)
        if found is not None and not (out_dir / name).is_file():
            shutil.copyfile(found, out_dir / name)
    if config is not None and not (out_dir / "generation_config.json").is_file():
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(ids, indent=2))


def trained_chat_template(chat_template: str) -> str | None:
    """The default template `data.chat_template` names (a .jinja file, a tokenizer_config.json, or a directory
    holding either), or None where it has none of its own."""
    where = Path(chat_template).expanduser()
    if where.is_dir():
        where = (
            where / "chat_template.jinja"
            if (where / "chat_template.jinja").is_file()
            else where / "tokenizer_config.json"
        )
    if where.suffix == ".jinja":
        return where.read_text()
    template = json.loads(where.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: transformers' chat_template.jinja holds the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


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
