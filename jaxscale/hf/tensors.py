"""Which Hugging Face tensors make each jaxscale parameter, and how their layouts differ.

Hugging Face stores a Linear weight as [out, in], one tensor per layer (and per expert);
jaxscale stacks the layers (and experts) along leading axes and splits heads out of the
projections, e.g. wq [S, D, N, H] from `model.layers.{i}.self_attn.q_proj.weight` [N*H, D].
Both conventions rotate (first half, second half) of each head, so q and k need no permutation.

Shape letters as in jaxscale.models.transformer; E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jaxscale.models.transformer import DecoderShape

ParamPath = tuple[str, ...]  # a model parameter's keys, e.g. ("blocks", "attn", "wq")
Index = tuple[slice, ...]


@dataclass(frozen=True)
class TensorMap:
    """One jaxscale parameter [*stack, *param] as Hugging Face tensors of `hf_shape`, one per stack index.

    `name` takes `{layer}` and `{expert}` for the stack axes named in `stack`. A tensor becomes the
    parameter's slice by reshaping to `view` (each HF axis stays or splits in two) and transposing by `perm`.
    """

    name: str
    stack: tuple[str, ...]
    hf_shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]

    def hf_name(self, stack_index: tuple[int, ...]) -> str:
        """The HF tensor of one stack index (layer, expert)."""
        return self.name.format(**dict(zip(self.stack, stack_index, strict=True)))

    def _groups(self) -> list[list[int]]:
        """The view axes each HF axis is split into."""
        groups, axis = [], 0
        for size in self.hf_shape:
            group = [axis]
            while math.prod(self.view[a] for a in group) != size:
                axis += 1
                group.append(axis)
            groups.append(group)
            axis += 1
        return groups

    def hf_slices(self, param_index: Index) -> tuple[Index, Index]:
        """For a slice of the parameter (one stack index, `param_index` over its own axes): the HF tensor's
        slice to read, and the slice of its view (read, reshaped to view axes) that the parameter's slice is."""
        view_index: list[slice] = [slice(None)] * len(self.view)
        for axis, s in zip(self.perm, param_index, strict=True):
            view_index[axis] = slice(*s.indices(self.view[axis])[:2])
        read, within = [], []
        for group in self._groups():
            outer, *inner = group
            step = math.prod(self.view[a] for a in inner)  # elements of one outer index
            read.append(slice(view_index[outer].start * step, view_index[outer].stop * step))
            within += [slice(None)] + [view_index[a] for a in inner]
        return tuple(read), tuple(within)

    def to_param(self, read: np.ndarray, within: Index) -> np.ndarray:
        """The HF slice `read` (from `hf_slices`) in the parameter's layout."""
        local_view = []
        for group, size in zip(self._groups(), read.shape, strict=True):
            outer, *inner = group
            local_view += [size // math.prod(self.view[a] for a in inner)] + [self.view[a] for a in inner]
        return read.reshape(local_view)[within].transpose(self.perm)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        """A whole parameter slice (one stack index) in the HF tensor's layout."""
        return param.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def tensor_maps(s: DecoderShape) -> dict[ParamPath, TensorMap]:
    """Every parameter of the decoder `s` (a Llama or, with experts, a Mixtral) and its Hugging Face tensors."""
    D, N, K, H, F, V, E = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff, s.vocab_size, s.num_experts
    layer, expert = ("layer",), ("layer", "expert")
    at = "model.layers.{layer}."

    def linear(name: str, out: int, in_: int, stack: tuple[str, ...] = layer) -> TensorMap:
        return TensorMap(name, stack, (out, in_), (out, in_), (1, 0))

    blocks = "moe_blocks" if E else "blocks"
    maps = {
        ("embed",): TensorMap("model.embed_tokens.weight", (), (V, D), (V, D), (0, 1)),
        ("final_norm", "scale"): TensorMap("model.norm.weight", (), (D,), (D,), (0,)),
        (blocks, "attn_norm", "scale"): TensorMap(at + "input_layernorm.weight", layer, (D,), (D,), (0,)),
        (blocks, "mlp_norm", "scale"): TensorMap(at + "post_attention_layernorm.weight", layer, (D,), (D,), (0,)),
        (blocks, "attn", "wq"): TensorMap(at + "self_attn.q_proj.weight", layer, (N * H, D), (N, H, D), (2, 0, 1)),
        (blocks, "attn", "wk"): TensorMap(at + "self_attn.k_proj.weight", layer, (K * H, D), (K, H, D), (2, 0, 1)),
        (blocks, "attn", "wv"): TensorMap(at + "self_attn.v_proj.weight", layer, (K * H, D), (K, H, D), (2, 0, 1)),
        (blocks, "attn", "wo"): TensorMap(at + "self_attn.o_proj.weight", layer, (D, N * H), (D, N, H), (1, 2, 0)),
    }
    if not s.tie_embeddings:
        maps[("lm_head",)] = linear("lm_head.weight", V, D, ())
    if E:
        moe = at + "block_sparse_moe."
        maps[(blocks, "mlp", "router")] = linear(moe + "gate.weight", E, D)
        maps[(blocks, "mlp", "w_gate")] = linear(moe + "experts.{expert}.w1.weight", F, D, expert)
        maps[(blocks, "mlp", "w_up")] = linear(moe + "experts.{expert}.w3.weight", F, D, expert)
        maps[(blocks, "mlp", "w_down")] = linear(moe + "experts.{expert}.w2.weight", D, F, expert)
    else:
        maps[(blocks, "mlp", "w_gate")] = linear(at + "mlp.gate_proj.weight", F, D)
        maps[(blocks, "mlp", "w_up")] = linear(at + "mlp.up_proj.weight", F, D)
        maps[(blocks, "mlp", "w_down")] = linear(at + "mlp.down_proj.weight", D, F)
    return maps


def stack_sizes(m: TensorMap, s: DecoderShape) -> tuple[int, ...]:
    """The sizes of the stack axes of `m`'s parameter: layers, then experts."""
    return tuple({"layer": s.n_layers, "expert": s.num_experts}[axis] for axis in m.stack)
