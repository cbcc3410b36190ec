"""The Hugging Face model families jaxscale imports and exports: one declaration each, over the one decoder.

A family is data: the `model.*` architecture switches every model of it has (`fixed`), those its
config.json may set (`variable`), how its layers' attention varies (`layers`), its experts' layout,
the transformers config defaults of the keys jaxscale reads, and the Hugging Face name of every
tensor. Everything that knows what "a Qwen3" is reads this table: config.json import and export
(jaxscale.hf_config), the tensor maps of import, export and PEFT adapters (jaxscale.hf.tensors), and
the presets (jaxscale.presets). The decoder (jaxscale.models.transformer) only sees the switches.

Adding a family is one more `Family` below, written from its transformers modeling code: if its
forward is the decoder's under some switches, nothing else changes.

Tensor roles name a parameter of the decoder (`ROLE_PATHS`); `{layer}` and `{expert}` stand for the
stack indices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from jaxscale.errors import UserError

# Each architecture switch of jaxscale.config.ModelConfig and the value a Llama has; a family that neither
# fixes nor varies one has this value.
SWITCHES: dict[str, Any] = {
    "attention_bias": "none",
    "qk_norm": False,
    "norm_offset": 0.0,
    "sandwich_norms": False,
    "activation": "silu",
    "scale_embeddings": False,
    "query_pre_attn_scalar": 0.0,
    "attn_softcap": 0.0,
    "final_softcap": 0.0,
    "rope_local_theta": 0.0,
    "num_shared_experts": 0,
    "capacity_factor": 0.0,
    "expert_d_ff": 0,
    "router_weights": "auto",
    "moe_every": 1,
    "mlp_only_layers": [],
}

EXPERT_SWITCHES = ("num_shared_experts", "capacity_factor", "expert_d_ff", "router_weights", "moe_every")
EXPERT_SWITCHES += ("mlp_only_layers",)

# Where each tensor role lives in the decoder's state: per-layer roles under a block stack.
ROLE_PATHS: dict[str, tuple[str, ...]] = {
    "embed": ("embed",),
    "final_norm": ("final_norm", "scale"),
    "lm_head": ("lm_head",),
    "attn_norm": ("attn_norm", "scale"),
    "mlp_norm": ("mlp_norm", "scale"),
    "post_attn_norm": ("post_attn_norm", "scale"),
    "post_mlp_norm": ("post_mlp_norm", "scale"),
    "wq": ("attn", "wq"),
    "wk": ("attn", "wk"),
    "wv": ("attn", "wv"),
    "wo": ("attn", "wo"),
    "q_bias": ("attn", "q_bias"),
    "k_bias": ("attn", "k_bias"),
    "v_bias": ("attn", "v_bias"),
    "o_bias": ("attn", "o_bias"),
    "q_norm": ("attn", "q_norm", "scale"),
    "k_norm": ("attn", "k_norm", "scale"),
    "w_gate": ("mlp", "w_gate"),
    "w_up": ("mlp", "w_up"),
    "w_down": ("mlp", "w_down"),
    "router": ("mlp", "router"),
    "expert_gate": ("mlp", "w_gate"),
    "expert_up": ("mlp", "w_up"),
    "expert_down": ("mlp", "w_down"),
}

_LAYER = "model.layers.{layer}."
LLAMA_TENSORS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": _LAYER + "input_layernorm.weight",
    "mlp_norm": _LAYER + "post_attention_layernorm.weight",
    **{f"w{p}": f"{_LAYER}self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"{p}_bias": f"{_LAYER}self_attn.{p}_proj.bias" for p in "qkvo"},
    "q_norm": _LAYER + "self_attn.q_norm.weight",
    "k_norm": _LAYER + "self_attn.k_norm.weight",
    **{f"w_{p}": f"{_LAYER}mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
MIXTRAL_EXPERTS = {
    "router": _LAYER + "block_sparse_moe.gate.weight",
    "expert_gate": _LAYER + "block_sparse_moe.experts.{expert}.w1.weight",
    "expert_up": _LAYER + "block_sparse_moe.experts.{expert}.w3.weight",
    "expert_down": _LAYER + "block_sparse_moe.experts.{expert}.w2.weight",
}
QWEN_MOE_EXPERTS = {
    "router": _LAYER + "mlp.gate.weight",
    **{f"expert_{p}": f"{_LAYER}mlp.experts.{{expert}}.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# Gemma's post_attention_layernorm is the norm after attention; the MLP's input norm is pre_feedforward.
GEMMA_TENSORS = LLAMA_TENSORS | {
    "mlp_norm": _LAYER + "pre_feedforward_layernorm.weight",
    "post_attn_norm": _LAYER + "post_attention_layernorm.weight",
    "post_mlp_norm": _LAYER + "post_feedforward_layernorm.weight",
}

GEMMA_SWITCHES = {
    "norm_offset": 1.0,
    "sandwich_norms": True,
    "activation": "gelu_tanh",
    "scale_embeddings": True,
}


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture as switches of jaxscale's decoder.

    `layers`: how its config.json sets each layer's attention: `global` (no window: Llama), `uniform` (one
    `sliding_window` for every layer, or none: Mistral), `per_layer` (`layer_types`: Qwen2/3, Gemma).
    `experts`: `none`, `every_layer` (Mixtral), or `sparse_step` (Qwen3-MoE: every `decoder_sparse_step`-th
    layer, bar `mlp_only_layers`). `defaults`: transformers' config class defaults of the keys jaxscale
    reads, for a config.json that leaves one out.
    """

    architecture: str
    model_type: str
    tensors: dict[str, str]
    fixed: dict[str, Any] = field(default_factory=dict)
    variable: frozenset[str] = frozenset()
    layers: str = "global"
    experts: str = "none"
    activation_key: str = "hidden_act"
    defaults: dict[str, Any] = field(default_factory=dict)

    def switch(self, key: str) -> Any:
        """The value of architecture switch `key` a model of this family has, where it is not variable."""
        return self.fixed.get(key, SWITCHES[key])

    def refusal(self, model: dict[str, Any]) -> str | None:
        """Why the jaxscale model `model` (its `model.*` keys) is no model of this family; None if it is one."""
        moe = model["num_experts"] > 0
        # A dense model's expert keys mean nothing; a family with experts reads its own from config.json.
        skipped = set(EXPERT_SWITCHES) if not moe or self.experts != "none" else set()
        differ = [
            f"{key}={model[key]!r} (it has {self.switch(key)!r})"
            for key in SWITCHES
            if key not in self.variable | skipped and model[key] != self.switch(key)
        ]
        if moe and self.experts == "none":
            differ.insert(0, f"num_experts={model['num_experts']} (it has no experts)")
        if not moe and self.experts != "none":
            differ.insert(0, "no experts (it has them)")
        if differ:
            return ", ".join(differ)
        pattern = model["attention_pattern"] or ("L" if model["sliding_window"] else "G") * model["n_layers"]
        if self.layers == "global" and "L" in pattern:
            return "local (sliding-window) layers (it has none)"
        if self.layers == "uniform" and len(set(pattern)) > 1:
            return f"attention_pattern={pattern!r} (its layers are all local or all global)"
        if not moe:
            return None
        if model["capacity_factor"] or model["num_shared_experts"]:
            return (
                f"capacity_factor={model['capacity_factor']}, num_shared_experts={model['num_shared_experts']} (its "
                f"routing is dropless, without shared experts)"
            )
        normalized = model["router_weights"] == "normalized" or (
            model["router_weights"] == "auto" and model["experts_per_token"] > 1
        )
        if self.experts == "every_layer" and (
            model["moe_every"] != 1 or model["mlp_only_layers"] or model["expert_d_ff"] not in (0, model["d_ff"])
        ):
            return (
                f"moe_every={model['moe_every']}, mlp_only_layers={model['mlp_only_layers']}, expert_d_ff="
                f"{model['expert_d_ff']} (every layer of it is MoE, its experts as wide as d_ff)"
            )
        if self.experts == "every_layer" and not normalized:
            return f"router_weights={model['router_weights']!r} (it renormalizes the top-k probabilities)"
        return None


_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_act": "silu"}
_QWEN_DEFAULTS = _LLAMA_DEFAULTS | {"max_position_embeddings": 32768, "use_sliding_window": False}
_GEMMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}

FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family(
            "LlamaForCausalLM",
            "llama",
            LLAMA_TENSORS,
            variable=frozenset({"attention_bias"}),
            defaults=_LLAMA_DEFAULTS | {"max_position_embeddings": 2048, "attention_bias": False},
        ),
        Family(
            "MistralForCausalLM",
            "mistral",
            LLAMA_TENSORS,
            layers="uniform",
            defaults=_LLAMA_DEFAULTS | {"max_position_embeddings": 131072, "sliding_window": 4096},
        ),
        Family(
            "MixtralForCausalLM",
            "mixtral",
            LLAMA_TENSORS | MIXTRAL_EXPERTS,
            fixed={"router_weights": "normalized"},
            layers="uniform",
            experts="every_layer",
            defaults=_LLAMA_DEFAULTS
            | {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072, "sliding_window": None}
            | {"num_experts_per_tok": 2, "num_local_experts": 8},
        ),
        Family(
            "Qwen2ForCausalLM",
            "qwen2",
            LLAMA_TENSORS,
            fixed={"attention_bias": "qkv"},
            layers="per_layer",
            defaults=_QWEN_DEFAULTS | {"sliding_window": 4096, "max_window_layers": 28},
        ),
        Family(
            "Qwen3ForCausalLM",
            "qwen3",
            LLAMA_TENSORS,
            fixed={"qk_norm": True},
            variable=frozenset({"attention_bias"}),
            layers="per_layer",
            defaults=_QWEN_DEFAULTS
            | {"head_dim": 128, "attention_bias": False}
            | {"sliding_window": 4096, "max_window_layers": 28},
        ),
        Family(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            LLAMA_TENSORS | QWEN_MOE_EXPERTS,
            fixed={"qk_norm": True},
            variable=frozenset({"attention_bias"}),
            layers="uniform",
            experts="sparse_step",
            defaults=_QWEN_DEFAULTS
            | {"attention_bias": False, "sliding_window": 4096, "num_experts_per_tok": 8, "num_experts": 128}
            | {"moe_intermediate_size": 768, "norm_topk_prob": False, "decoder_sparse_step": 1}
            | {"mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False},
        ),
        Family(
            "Gemma2ForCausalLM",
            "gemma2",
            GEMMA_TENSORS,
            fixed=GEMMA_SWITCHES,
            variable=frozenset({"query_pre_attn_scalar", "attn_softcap", "final_softcap"}),
            layers="per_layer",
            activation_key="hidden_activation",
            defaults=_GEMMA_DEFAULTS
            | {"rope_theta": 10000.0, "max_position_embeddings": 8192, "attention_bias": False}
            | {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
        ),
        # transformers' Gemma 3 never soft-caps attention (Gemma3Attention does not pass attn_logit_softcapping).
        Family(
            "Gemma3ForCausalLM",
            "gemma3_text",
            GEMMA_TENSORS,
            fixed=GEMMA_SWITCHES | {"qk_norm": True},
            variable=frozenset({"query_pre_attn_scalar", "final_softcap", "rope_local_theta"}),
            layers="per_layer",
            activation_key="hidden_activation",
            defaults=_GEMMA_DEFAULTS
            | {"rope_theta": 1e6, "rope_local_base_freq": 10000.0, "max_position_embeddings": 131072}
            | {"attention_bias": False, "final_logit_softcapping": None, "sliding_window_pattern": 6},
        ),
    )
}


def family(architecture: str, where: str = "config.json") -> Family:
    """The family of `architecture`; a UserError naming the supported ones for any other."""
    if architecture not in FAMILIES:
        raise UserError(
            f"'{where}' is a {architecture}; jaxscale imports only {', '.join(FAMILIES)}. Use a model of one of "
            f"those families, or train this one from scratch with model.init_from unset."
        )
    return FAMILIES[architecture]


def family_switches(architecture: str) -> dict[str, Any]:
    """The `model.*` switches every model of `architecture` has: the ones a preset of the family starts from."""
    return copy.deepcopy(SWITCHES | FAMILIES[architecture].fixed)


def family_for(model: dict[str, Any], preferred: str | None = None) -> Family:
    """The family a jaxscale model (its `model.*` keys) is exported as: `preferred` (the architecture it was
    imported from) if it is one of it, else the first in FAMILIES that is; a UserError naming each
    family's reason where none is (transformers could not compute the model)."""
    candidates = ([FAMILIES[preferred]] if preferred in FAMILIES else []) + list(FAMILIES.values())
    reasons = {}
    for f in candidates:
        reason = f.refusal(model)
        if reason is None:
            return f
        reasons[f.architecture] = reason
    shown = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise UserError(
        f"No Hugging Face architecture computes this model, so it cannot be exported: {shown}. Export a model "
        f"trained with the switches of one of them (for MoE: dropless, no shared experts)."
    )
