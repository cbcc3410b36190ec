"""`model.init_from=hf:DIR`: a Hugging Face model's safetensors read straight into the run's shardings.

Each parameter is made by `jax.make_array_from_callback`: for every device this process holds, the
callback reads only that device's slice, layer by layer, from lazy safetensors slices. No process
reads a slice its devices do not hold, and the whole model never sits on one host. Every tensor is
checked from the files' headers before anything is read: present, of the right shape, a float, and no
tensor left unread (strict: a file holding more than the architecture's tensors is refused by name).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from jaxscale.errors import UserError
from jaxscale.families import family
from jaxscale.hf.tensors import ParamPath, TensorMap, stack_sizes, tensor_maps
from jaxscale.hf_config import read_hf_config
from jaxscale.models.quant import QuantizedWeight, quantize
from jaxscale.models.transformer import DecoderShape
from jaxscale.sharding import Rules, use_rules

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def tensor_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of the model in `directory` and the safetensors file that holds it.

    An index's files must lie in `directory` and exist; a UserError names any that does not.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"'{index}' is no safetensors index (a JSON object with a weight_map): {e!r}. Restore it from the "
                f"model's source."
            ) from None
        files = {name: directory / file for name, file in weight_map.items()}
        root = directory.resolve()
        outside = sorted({str(f) for f in set(files.values()) if not f.resolve().is_relative_to(root)})
        if outside:
            raise UserError(
                f"'{index}' points outside '{directory}': {', '.join(outside)}. jaxscale reads only the model's own "
                f"directory; fix the weight_map (file names relative to the directory, no '..')."
            )
        missing = sorted({f.name for f in set(files.values()) if not f.is_file()})
        if missing:
            raise UserError(
                f"'{index}' names shard(s) that are not in '{directory}': {', '.join(missing)}. Download the "
                f"missing file(s) of the model again."
            )
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise UserError(
        f"model.init_from: no {SINGLE_FILE} or {INDEX_FILE} in '{directory}'. Save the model with "
        f"`save_pretrained(DIR, safe_serialization=True)`; pickled *.bin weights are never read."
    )


class SafetensorsDir(contextlib.ExitStack):
    """The open safetensors files of a model directory, each opened once (only headers are read on open)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.files = tensor_files(directory)
        self._open: dict[Path, Any] = {}

    def slice(self, name: str) -> Any:
        """The lazy slice of tensor `name`: `get_shape()`, and indexing reads only the bytes asked for."""
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self.enter_context(safe_open(path, framework="numpy"))
        return self._open[path].get_slice(name)


# The safetensors dtypes of float weights; anything else (I8, U8, F8_*: a quantized checkpoint) is refused.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_tensors(files: SafetensorsDir, maps: dict[ParamPath, TensorMap], s: DecoderShape, architecture: str) -> None:
    """A UserError naming every missing, misshapen, non-float or unread tensor, before anything is read."""
    missing, misshapen, wanted = [], [], set()
    for m in maps.values():
        for stack_index in itertools.product(*map(range, stack_sizes(m, s))):
            name = m.hf_name(stack_index)
            wanted.add(name)
            if name not in files.files:
                missing.append(name)
            elif tuple(files.slice(name).get_shape()) != m.hf_shape:
                misshapen.append(f"{name} is {tuple(files.slice(name).get_shape())}, config.json makes it {m.hf_shape}")
    where = f"the model in '{files.directory}'"
    if missing:
        raise UserError(
            f"{where} lacks {len(missing)} tensor(s) its config.json needs: {_listed(missing)}. Re-save the whole "
            f"model (save_pretrained) or fix config.json to match the weights."
        )
    if misshapen:
        raise UserError(
            f"{where} has tensors of the wrong shape: {_listed(misshapen, '; ')}. The weights and config.json disagree."
        )
    not_float = [
        f"{n} ({files.slice(n).get_dtype()})" for n in sorted(wanted) if files.slice(n).get_dtype() not in FLOAT_DTYPES
    ]
    if not_float:
        raise UserError(
            f"{where} stores weights as integers or 8-bit floats: {_listed(not_float)}, a quantized checkpoint "
            f"jaxscale does not read. Import the unquantized checkpoint (bf16 or fp32) and set lora.base_quant=nf4 "
            f"(or int8) to train on a quantized base."
        )
    # Left unread on purpose, as transformers leaves them: a tied head saved anyway (the embedding again), and
    # rotary buffers some conversions saved (recomputed from config.json).
    ignored = {n for n in files.files if n.endswith("rotary_emb.inv_freq")} | (
        {"lm_head.weight"} if s.tie_embeddings else set()
    )
    unread = sorted(set(files.files) - wanted - ignored)
    if unread:
        raise UserError(
            f"{where} holds {len(unread)} tensor(s) a {architecture} of this config.json does not have: "
            f"{_listed(unread)}. jaxscale reads every tensor or none: the files belong to another architecture or "
            f"config.json is not theirs; restore the matching config.json."
        )


def _listed(items: list[str], sep: str = ", ", shown: int = 5) -> str:
    """The first `shown` items and how many more."""
    return sep.join(items[:shown]) + (f"{sep}and {len(items) - shown} more" if len(items) > shown else "")


def read_param(files: SafetensorsDir, m: TensorMap, s: DecoderShape, struct: jax.ShapeDtypeStruct) -> jax.Array:
    """One parameter as a global array in `struct`'s sharding; each device's slice read from its HF tensors."""
    n_stack = len(m.stack)
    read_already: dict[tuple, np.ndarray] = {}  # replicas of a slice are read once

    def device_slice(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s_.indices(size) for s_, size in zip(index, struct.shape, strict=True))
        if key not in read_already:
            stack_ranges = [range(*k[:2]) for k in key[:n_stack]]
            read, within = m.hf_slices(index[n_stack:])
            pieces = [
                m.to_param(files.slice(m.hf_name(stack_index))[read], within)
                for stack_index in itertools.product(*stack_ranges)
            ]
            local = np.stack(pieces).reshape(*map(len, stack_ranges), *pieces[0].shape)
            read_already[key] = local.astype(struct.dtype)
        return read_already[key]

    return jax.make_array_from_callback(struct.shape, struct.sharding, device_slice)


def by_path(tree: dict, prefix: tuple = ()) -> Iterator[tuple[ParamPath, Any]]:
    """The leaves of a nested dict (a pure-dict state) with their key paths."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from by_path(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _nested(flat: dict[ParamPath, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def read_quantized(
    files: SafetensorsDir,
    m: TensorMap,
    s: DecoderShape,
    weight: QuantizedWeight,
    codes: jax.ShapeDtypeStruct,
    scales: jax.ShapeDtypeStruct,
) -> tuple[jax.Array, jax.Array]:
    """A LoRA run's quantized base weight: read in full precision in the codes' sharding (the weight's own
    logical names), then quantized into `codes` and `scales`; one parameter's full-precision copy at a time."""
    stack = stack_sizes(m, s)
    full = jax.ShapeDtypeStruct((*stack, *(m.view[a] for a in m.perm)), jnp.float32, sharding=codes.sharding)

    def quantize_layer(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return quantize(w, weight.block_axis, weight.kind)

    for _ in stack:  # the weight was quantized layer by layer, inside the stack's vmap
        quantize_layer = jax.vmap(quantize_layer)
    shardings = (codes.sharding, scales.sharding)
    return jax.jit(quantize_layer, out_shardings=shardings)(read_param(files, m, s, full))


def read_params(directory: Path, s: DecoderShape, model: nnx.Module) -> dict[ParamPath, jax.Array]:
    """The base parameters of `model` (abstract: ShapeDtypeStructs in their shardings) from the Hugging Face
    model in `directory`, by path, as sharded arrays.

    LoRA adapters are not read (they start as initialized); a base weight stored quantized is read and
    quantized into its codes and scales.
    """
    architecture = read_hf_config(directory)["architectures"][0]
    maps = tensor_maps(s, family(architecture))
    structs = dict(by_path(nnx.to_pure_dict(nnx.state(model))))
    params = {}
    with SafetensorsDir(directory) as files:
        check_tensors(files, maps, s, architecture)
        for path, m in maps.items():
            if path in structs:
                params[path] = read_param(files, m, s, structs[path])
                continue
            weight = functools.reduce(getattr, path, model)
            codes, scales = structs[(*path, "codes")], structs[(*path, "scales")]
            params[(*path, "codes")], params[(*path, "scales")] = read_quantized(files, m, s, weight, codes, scales)
    return params


def init_state_from_hf(
    directory: Path,
    shape: DecoderShape,
    build: Callable[[], tuple[nnx.Module, nnx.Optimizer]],
    graphdef: nnx.GraphDef,
    state_structs: nnx.State,
    shardings: Any,
    rules: Rules,
    mesh: Mesh,
) -> nnx.State:
    """The train state with the Hugging Face weights as its (base) parameters and a fresh optimizer state.

    The fresh state is built as `jaxscale.training.state.init_state` does, under jit: its random base
    weights are never used, so XLA drops them, and the read ones are donated into it.
    """
    params = read_params(directory, shape, nnx.merge(graphdef, state_structs)[0])

    def init(params: dict) -> nnx.State:
        state = nnx.split(build())[1]
        nnx.replace_by_pure_dict(state, {0: _nested(params)})
        return state

    with use_rules(rules, mesh):
        return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)
