"""Which Hugging Face tensors make each jaxscale parameter, and how their layouts differ.

The names are the family's (jaxscale.families); which parameters there are, the decoder shape's.

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

from jaxscale.families import ROLE_PATHS, Family
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
    layers: tuple[int, ...] = ()  # the HF layer of each index of the `layer` stack axis (dense or MoE blocks)

    def hf_name(self, stack_index: tuple[int, ...]) -> str:
        """The HF tensor of one stack index (layer, expert)."""
        index = dict(zip(self.stack, stack_index, strict=True))
        if "layer" in index:
            index["layer"] = self.layers[index["layer"]]
        return self.name.format(**index)

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


def tensor_maps(s: DecoderShape, fam: Family) -> dict[ParamPath, TensorMap]:
    """Every parameter of the decoder `s` and its Hugging Face tensors, named as family `fam` names them.

    The parameters are those the shape's switches make (biases, q/k norms, sandwich norms, experts); a
    family that has no name for one of them cannot hold the model (jaxscale.families.family_for says why).
    """
    D, N, K, H, F, V, E = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.d_ff, s.vocab_size, s.num_experts
    layer, expert = ("layer",), ("layer", "expert")

    def linear(out: int, in_: int, stack: tuple[str, ...] = layer) -> tuple:
        return stack, (out, in_), (out, in_), (1, 0)

    def vector(size: int, stack: tuple[str, ...] = layer) -> tuple:
        return stack, (size,), (size,), (0,)

    attention = {
        "attn_norm": vector(D),
        "mlp_norm": vector(D),
        "wq": (layer, (N * H, D), (N, H, D), (2, 0, 1)),
        "wk": (layer, (K * H, D), (K, H, D), (2, 0, 1)),
        "wv": (layer, (K * H, D), (K, H, D), (2, 0, 1)),
        "wo": (layer, (D, N * H), (D, N, H), (1, 2, 0)),
    }
    if s.attention_bias != "none":
        attention |= {"q_bias": (layer, (N * H,), (N, H), (0, 1)), "k_bias": (layer, (K * H,), (K, H), (0, 1))}
        attention["v_bias"] = (layer, (K * H,), (K, H), (0, 1))
    if s.attention_bias == "qkvo":
        attention["o_bias"] = vector(D)
    if s.qk_norm:
        attention |= {"q_norm": vector(H), "k_norm": vector(H)}
    if s.sandwich_norms:
        attention |= {"post_attn_norm": vector(D), "post_mlp_norm": vector(D)}
    dense = {"w_gate": linear(F, D), "w_up": linear(F, D), "w_down": linear(D, F)}
    F_e = s.expert_d_ff or F
    experts = {
        "router": linear(E, D),
        "expert_gate": linear(F_e, D, expert),
        "expert_up": linear(F_e, D, expert),
        "expert_down": linear(D, F_e, expert),
    }
    roles: dict[ParamPath, tuple[str, tuple]] = {
        ("embed",): ("embed", ((), (V, D), (V, D), (0, 1))),
        ("final_norm", "scale"): ("final_norm", vector(D, ())),
    }
    if not s.tie_embeddings:
        roles[("lm_head",)] = ("lm_head", linear(V, D, ()))
    kinds = s.layer_kinds
    stacks = [stack for stack, moe in (("blocks", False), ("moe_blocks", True)) if any(k.moe == moe for k in kinds)]
    for stack in stacks:
        for role, spec in attention.items() | (experts if stack == "moe_blocks" else dense).items():
            roles[(stack, *ROLE_PATHS[role])] = (role, spec)
    # A stack holds the layers of its kind: its index i is the HF layer of the i-th of them.
    numbers = {stack: tuple(i for i, k in enumerate(kinds) if k.moe == (stack == "moe_blocks")) for stack in stacks}
    return {path: TensorMap(fam.tensors[role], *spec, numbers.get(path[0], ())) for path, (role, spec) in roles.items()}


def stack_sizes(m: TensorMap, s: DecoderShape) -> tuple[int, ...]:
    """The sizes of the stack axes of `m`'s parameter: its stack's layers, then experts."""
    return tuple({"layer": len(m.layers), "expert": s.num_experts}[axis] for axis in m.stack)
