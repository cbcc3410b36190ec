"""Hugging Face `config.json` <-> jaxscale model keys, for every family of jaxscale.families.

`model.init_from=hf:DIR` takes the model's shape from DIR/config.json (`model_values`); a `model.*`
key the user sets that contradicts it is refused by jaxscale.config.load_config. `training_values`
are the family's training defaults (the router's auxiliary loss), which the user's keys may change.
`export_config_json` is the way back, for `jaxscale export --to hf`. The weights themselves are
jaxscale.hf's job. Keys are read as transformers reads them: its config classes' defaults where
config.json leaves one out (the family's `defaults`), its rope standardization
(modeling_rope_utils); anything jaxscale would compute otherwise is refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxscale.errors import UserError
from jaxscale.families import FAMILIES, Family, family, family_for

PREFIX = "hf:"
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # jaxscale.config.ROPE_TYPES
_REQUIRED = object()  # no transformers default jaxscale trusts: config.json must say


def hf_directory(init_from: str) -> Path:
    """The directory `model.init_from="hf:DIR"` names."""
    if not init_from.startswith(PREFIX) or not init_from[len(PREFIX) :]:
        raise UserError(
            f"model.init_from='{init_from}' is not a weight source; write model.init_from=hf:DIR with DIR a local "
            f"Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or leave it empty."
        )
    return Path(init_from[len(PREFIX) :]).expanduser()


def read_hf_config(directory: Path) -> dict[str, Any]:
    """DIR/config.json as a dict, with its architecture checked against the families jaxscale knows."""
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(
            f"model.init_from: no config.json in '{directory}'. Point model.init_from=hf:DIR at a Hugging Face model "
            f"directory as `save_pretrained` writes it (config.json beside the *.safetensors files)."
        )
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); restore it from the model's source.") from None
    family((hf.get("architectures") or ["(none given)"])[0], str(path))
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "a quantization method")
        raise UserError(
            f"'{path}' is a checkpoint quantized by {method} (quantization_config), whose weights jaxscale does not "
            f"read. Import the unquantized checkpoint (bf16 or fp32) instead, and set lora.base_quant=nf4 (or int8) "
            f"to train on a quantized base (QLoRA)."
        )
    return hf


class _Reader:
    """config.json's keys as transformers reads them: the value, or the family's default where it is absent."""

    def __init__(self, hf: dict[str, Any], fam: Family, path: Path):
        self.hf, self.fam, self.path = hf, fam, path

    def __call__(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.hf:
            return self.hf[key]
        value = self.fam.defaults.get(key, default)
        if value is _REQUIRED:
            raise UserError(
                f"'{self.path}' lacks `{key}`, which {self.fam.architecture} needs; restore config.json from the "
                f"model's source (as save_pretrained writes it)."
            )
        return value

    def refuse(self, what: str) -> UserError:
        return UserError(f"'{self.path}' sets {what}, which jaxscale's {self.fam.architecture} does not compute.")


def model_values(hf: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The `model.*` keys that `config.json` (read by `read_hf_config`) determines."""
    fam = FAMILIES[hf["architectures"][0]]
    get = _Reader(hf, fam, directory / "config.json")
    heads, d_model, n_layers = get("num_attention_heads"), get("hidden_size"), get("num_hidden_layers")
    unsupported = [f"{key}={hf[key]}" for key in ("mlp_bias", "use_bidirectional_attention") if hf.get(key)]
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported.append(f"partial_rotary_factor={hf['partial_rotary_factor']}")
    activation = get(fam.activation_key)
    wanted = "gelu_pytorch_tanh" if fam.switch("activation") == "gelu_tanh" else "silu"
    if activation != wanted:
        unsupported.append(f"{fam.activation_key}={activation} (jaxscale's {fam.architecture} uses {wanted})")
    if unsupported:
        raise get.refuse(", ".join(unsupported))
    values = {key: fam.switch(key) for key in ("attention_bias", "qk_norm", "norm_offset", "sandwich_norms")}
    values |= {key: fam.switch(key) for key in ("activation", "scale_embeddings", "num_shared_experts")}
    values |= {
        "vocab_size": get("vocab_size"),
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": heads,
        "n_kv_heads": get("num_key_value_heads", None) or heads,
        "head_dim": get("head_dim", None) or d_model // heads,
        "d_ff": get("intermediate_size"),
        "norm_eps": float(get("rms_norm_eps")),
        "tie_embeddings": bool(get("tie_word_embeddings")),
        "num_experts": 0,
        **_rope(get),
        **_attention_layers(get, n_layers),
    }
    if "attention_bias" in fam.variable:
        values["attention_bias"] = "qkvo" if get("attention_bias") else "none"
    if fam.switch("scale_embeddings"):  # Gemma's logit scale and caps
        values["query_pre_attn_scalar"] = float(get("query_pre_attn_scalar"))
        values["final_softcap"] = float(get("final_logit_softcapping") or 0.0)
        if "attn_softcap" in fam.variable:
            values["attn_softcap"] = float(get("attn_logit_softcapping") or 0.0)
    if fam.experts != "none":
        values |= _experts(get)
    return values


def training_values(hf: dict[str, Any]) -> dict[str, Any]:
    """The training defaults a family's config.json sets (a user's `model.*` keys win): Qwen3-MoE's router loss
    as transformers adds it, `router_aux_loss_coef` times its load_balancing_loss_func where
    `output_router_logits` is on, and nothing where it is off (transformers' default); no z-loss."""
    fam = FAMILIES[hf["architectures"][0]]
    if fam.experts != "sparse_step":
        return {}
    get = _Reader(hf, fam, Path("config.json"))
    weight = float(get("router_aux_loss_coef")) if get("output_router_logits") else 0.0
    return {"aux_loss_style": "transformers", "aux_loss_weight": weight, "z_loss_weight": 0.0}


def _rope_parameters(get: _Reader) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The global layers' rope parameters and the local layers' (None: as the global ones), standardized as
    transformers' convert_rope_params_to_dict does: `rope_scaling` (the older name) or `rope_parameters`,
    then `rope_theta` beside them, then the family's default; Gemma 3 nests them per layer type."""
    hf, fam = get.hf, get.fam
    given = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    nested = "full_attention" in given or "sliding_attention" in given
    if "rope_local_theta" not in fam.variable:
        if nested:
            raise get.refuse(f"rope parameters per layer type ({sorted(given)})")
        return dict(given) | {"rope_theta": given.get("rope_theta", get("rope_theta"))}, None
    if nested:
        global_, local = dict(given.get("full_attention") or {}), dict(given.get("sliding_attention") or {})
    else:  # Gemma 3's older keys: rope_scaling is the global layers', rope_local_base_freq the local base
        global_, local = dict(hf.get("rope_scaling") or {}), {}
    global_.setdefault("rope_theta", get("rope_theta"))
    local.setdefault("rope_theta", get("rope_local_base_freq"))
    return global_, local


def _rope(get: _Reader) -> dict[str, Any]:
    """rope_* keys: the variant and its parameters, as transformers' modeling_rope_utils reads them."""
    global_, local = _rope_parameters(get)
    values: dict[str, Any] = {"rope_theta": float(global_["rope_theta"]), "rope_scaling_factor": 1.0}
    if local is not None:
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise get.refuse(f"rope scaling on the sliding-window layers ({local})")
        values["rope_local_theta"] = float(local["rope_theta"])
    kind = global_.get("rope_type", global_.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(
            f"'{get.path}' uses rope of type '{kind}'; jaxscale implements {', '.join(ROPE_TYPES)} (as transformers' "
            f"modeling_rope_utils computes them). Use a model with one of those."
        )
    if global_.get("partial_rotary_factor", 1.0) != 1.0:
        raise get.refuse(f"partial_rotary_factor={global_['partial_rotary_factor']}")
    values["rope_type"] = kind
    if kind == "default":
        return values
    max_positions = get("max_position_embeddings")
    # transformers prefers a top-level original_max_position_embeddings (Phi-3's layout) to the rope dict's.
    original = get.hf.get("original_max_position_embeddings", global_.get("original_max_position_embeddings"))
    factor = global_.get("factor")
    if kind == "yarn" and factor is None:
        factor = max_positions / (original or max_positions)
    values["rope_scaling_factor"] = float(factor)
    if kind == "llama3":
        values |= {
            "rope_low_freq_factor": float(global_["low_freq_factor"]),
            "rope_high_freq_factor": float(global_["high_freq_factor"]),
            "rope_original_context": int(original or max_positions),
        }
    elif kind == "dynamic":
        values["rope_original_context"] = int(max_positions)
    elif kind == "yarn":
        values |= {
            "rope_original_context": int(original or max_positions),
            "rope_beta_fast": float(global_.get("beta_fast") or 32),
            "rope_beta_slow": float(global_.get("beta_slow") or 1),
            "rope_attention_factor": _yarn_attention_factor(global_, float(factor)),
            "rope_truncate": bool(global_.get("truncate", True)),
        }
    return values


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
    """transformers' yarn attention factor: given, or from mscale and mscale_all_dim, or 0.1 ln(factor) + 1."""

    def mscale(scale: float, m: float = 1.0) -> float:  # yarn_get_mscale
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _attention_layers(get: _Reader, n_layers: int) -> dict[str, Any]:
    """sliding_window and attention_pattern: which layers attend within a window, as the family's config says."""
    fam = get.fam
    if fam.layers == "global":
        return {"sliding_window": 0, "attention_pattern": ""}
    window = get("sliding_window", None)
    if "use_sliding_window" in fam.defaults and not get("use_sliding_window"):
        window = None  # Qwen: the window is off unless use_sliding_window
    if fam.layers == "uniform":
        return {"sliding_window": window or 0, "attention_pattern": ""}
    types = get.hf.get("layer_types") or _default_layer_types(get, n_layers, window)
    if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise UserError(
            f"'{get.path}' gives layer_types of {len(types)} layers ({', '.join(sorted(set(types)))}) for "
            f"num_hidden_layers={n_layers}; it needs one full_attention or sliding_attention per layer. Restore "
            f"config.json from the model's source."
        )
    pattern = "".join("L" if t == "sliding_attention" and window else "G" for t in types)
    if "L" not in pattern:
        return {"sliding_window": 0, "attention_pattern": ""}
    return {"sliding_window": int(window), "attention_pattern": "" if "G" not in pattern else pattern}


def _default_layer_types(get: _Reader, n_layers: int, window: int | None) -> list[str]:
    """layer_types as the family's config class makes them when config.json has none."""
    if "max_window_layers" in get.fam.defaults:  # Qwen2/3: the layers from max_window_layers on are local
        first = get("max_window_layers")
        local = [window is not None and i >= first for i in range(n_layers)]
    else:  # Gemma: every sliding_window_pattern-th layer global (Gemma 2: every other one)
        period = get("sliding_window_pattern", 2)
        local = [bool((i + 1) % period) for i in range(n_layers)]
    return ["sliding_attention" if is_local else "full_attention" for is_local in local]


def _experts(get: _Reader) -> dict[str, Any]:
    """The MoE keys of Mixtral (every layer, renormalized top-k) or Qwen3-MoE (every decoder_sparse_step-th layer
    bar mlp_only_layers, experts of moe_intermediate_size, norm_topk_prob); both dropless, no shared experts."""
    hf, fam = get.hf, get.fam
    # transformers 5 writes num_local_experts for both (an attribute map), the Hub's Qwen3-MoE num_experts.
    default = "num_local_experts" if fam.experts == "every_layer" else "num_experts"
    values = {
        "num_experts": hf.get("num_local_experts") or hf.get("num_experts") or get(default),
        "experts_per_token": get("num_experts_per_tok"),
        "capacity_factor": 0.0,
        "num_shared_experts": 0,
    }
    if fam.experts == "every_layer":
        return values | {"moe_every": 1, "mlp_only_layers": [], "expert_d_ff": 0, "router_weights": "normalized"}
    return values | {
        "moe_every": get("decoder_sparse_step"),
        "mlp_only_layers": list(get("mlp_only_layers") or []),
        "expert_d_ff": get("moe_intermediate_size"),
        "router_weights": "normalized" if get("norm_topk_prob") else "raw",
    }


def export_config_json(
    model: dict[str, Any], source: dict[str, Any] | None, eos_id: int, max_positions: int, dtype: str
) -> dict[str, Any]:
    """config.json for the jaxscale `model` section (a dict of its keys), as its family writes it.

    The family is the import's where the model still is one of it, else the first that computes the model
    (jaxscale.families.family_for; none: a UserError naming why). `source`: the config.json the run was
    imported from, if still readable; its other keys (token ids, context length) are kept.
    """
    preferred = source["architectures"][0] if source else None
    fam = family_for(model, preferred)
    same_family = source is not None and preferred == fam.architecture
    out = dict(source if same_family else {"bos_token_id": None, "eos_token_id": eos_id})
    out.setdefault("max_position_embeddings", max_positions)
    for stale in ("rope_parameters", "rope_scaling", "transformers_version", "layer_types"):
        out.pop(stale, None)
    out |= {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["d_model"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": model["head_dim"],
        "intermediate_size": model["d_ff"],
        "rms_norm_eps": model["norm_eps"],
        "tie_word_embeddings": model["tie_embeddings"],
        fam.activation_key: "gelu_pytorch_tanh" if model["activation"] == "gelu_tanh" else "silu",
        "torch_dtype": dtype,
        "dtype": dtype,  # the name transformers 5 reads
    }
    if "attention_bias" in fam.variable:
        out["attention_bias"] = model["attention_bias"] != "none"
    out |= _export_rope(model, fam) | _export_attention_layers(model, fam)
    if fam.switch("scale_embeddings"):
        out |= {
            # An int in transformers' Gemma configs (its strict config classes refuse 256.0).
            "query_pre_attn_scalar": _integral(model["query_pre_attn_scalar"] or model["head_dim"]),
            "final_logit_softcapping": model["final_softcap"] or None,
        }
        if "attn_softcap" in fam.variable:
            out["attn_logit_softcapping"] = model["attn_softcap"] or None
    if fam.experts == "every_layer":
        out |= {"num_local_experts": model["num_experts"], "num_experts_per_tok": model["experts_per_token"]}
    elif fam.experts == "sparse_step":
        out.pop("num_local_experts", None)  # transformers 5's name for it; the Hub's configs say num_experts
        out |= {
            "num_experts": model["num_experts"],
            "num_experts_per_tok": model["experts_per_token"],
            "moe_intermediate_size": model["expert_d_ff"] or model["d_ff"],
            "decoder_sparse_step": model["moe_every"],
            "mlp_only_layers": list(model["mlp_only_layers"]),
            "norm_topk_prob": model["router_weights"] == "normalized"
            or (model["router_weights"] == "auto" and model["experts_per_token"] > 1),
        }
    return out


def _integral(x: float) -> int | float:
    """x as an int where it is one."""
    return int(x) if float(x).is_integer() else x


def _export_rope(model: dict[str, Any], fam: Family) -> dict[str, Any]:
    """rope_theta and rope_scaling (the older names every transformers version reads), Gemma 3's local base."""
    kind, factor = model["rope_type"], model["rope_scaling_factor"]
    scaling: dict[str, Any] | None = {"rope_type": kind, "factor": factor}
    if kind == "default":
        scaling = None
    elif kind == "llama3":
        scaling |= {
            "low_freq_factor": model["rope_low_freq_factor"],
            "high_freq_factor": model["rope_high_freq_factor"],
            "original_max_position_embeddings": model["rope_original_context"],
        }
    elif kind == "yarn":
        scaling |= {
            "original_max_position_embeddings": model["rope_original_context"],
            "beta_fast": model["rope_beta_fast"],
            "beta_slow": model["rope_beta_slow"],
            "attention_factor": model["rope_attention_factor"] or None,
            "truncate": model["rope_truncate"],
        }
    out: dict[str, Any] = {"rope_theta": model["rope_theta"], "rope_scaling": scaling}
    if kind == "dynamic":  # transformers' dynamic rope reads the context it grows past here
        out["max_position_embeddings"] = model["rope_original_context"]
    if "rope_local_theta" in fam.variable:
        out["rope_local_base_freq"] = model["rope_local_theta"] or model["rope_theta"]
    return out


def _export_attention_layers(model: dict[str, Any], fam: Family) -> dict[str, Any]:
    """sliding_window (and layer_types, use_sliding_window, max_window_layers) as the family's config says them."""
    window, n = model["sliding_window"], model["n_layers"]
    pattern = model["attention_pattern"] or ("L" if window else "G") * n
    if fam.layers == "global":
        return {}
    out: dict[str, Any] = {"sliding_window": window or None}
    if "use_sliding_window" in fam.defaults:  # Qwen: no window at all unless this says so
        out["use_sliding_window"] = "L" in pattern
    if fam.layers == "uniform":
        return out
    out["sliding_window"] = window or fam.defaults["sliding_window"]
    out["layer_types"] = ["sliding_attention" if c == "L" else "full_attention" for c in pattern]
    if "max_window_layers" in fam.defaults:  # older Qwen readers take the local layers from this
        out["max_window_layers"] = pattern.find("L") if "L" in pattern else n
    return out
