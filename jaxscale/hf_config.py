"""Hugging Face `config.json` <-> jaxscale model keys, for the Llama family (Llama 2/3/3.1/3.2, Mistral, Mixtral).

`model.init_from=hf:DIR` takes the model's shape from DIR/config.json (`model_values`); a `model.*`
key the user sets that contradicts it is refused by jaxscale.config.load_config. `export_config_json`
is the way back, for `jaxscale export --to hf`. The weights themselves are jaxscale.hf's job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxscale.errors import UserError

# Architectures whose forward jaxscale's decoder computes exactly (jaxscale/models/transformer.py).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}
PREFIX = "hf:"


def hf_directory(init_from: str) -> Path:
    """The directory `model.init_from="hf:DIR"` names."""
    if not init_from.startswith(PREFIX) or not init_from[len(PREFIX) :]:
        raise UserError(
            f"model.init_from='{init_from}' is not a weight source; write model.init_from=hf:DIR with DIR a local "
            f"Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or leave it empty."
        )
    return Path(init_from[len(PREFIX) :]).expanduser()


def read_hf_config(directory: Path) -> dict[str, Any]:
    """DIR/config.json as a dict, with its architecture checked."""
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
    architecture = (hf.get("architectures") or ["(none given)"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"'{path}' is a {architecture}; jaxscale imports only {', '.join(ARCHITECTURES)}. Use a Llama-family "
            f"model, or train this one from scratch with model.init_from unset."
        )
    return hf


def _rope(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """rope_theta and Llama 3 scaling; transformers 5 keeps both in `rope_parameters`, earlier ones beside it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    values: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling_factor": 1.0}
    if kind == "llama3":
        values |= {
            "rope_scaling_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_context": int(scaling["original_max_position_embeddings"]),
        }
    elif kind != "default":
        raise UserError(
            f"'{path}' uses rope scaling of type '{kind}'; jaxscale implements only Llama 3's ('llama3') and none."
        )
    return values


def model_values(hf: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The `model.*` keys that `config.json` (read by `read_hf_config`) determines."""
    path = directory / "config.json"
    unsupported = [f"{key}={hf[key]}" for key in ("attention_bias", "mlp_bias") if hf.get(key)]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if unsupported:
        raise UserError(f"'{path}' sets {', '.join(unsupported)}; jaxscale's Llama decoder has no biases and SwiGLU.")
    heads = hf["num_attention_heads"]
    values = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "d_ff": hf["intermediate_size"],
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "num_experts": 0,
        **_rope(hf, path),
    }
    if hf["architectures"][0] == "MixtralForCausalLM":
        top_k = hf.get("num_experts_per_tok", 2)
        if top_k < 2:
            # jaxscale.models.moe.route keeps top-1's raw probability (Switch); Mixtral renormalizes it to 1.
            raise UserError(
                f"'{path}' routes each token to num_experts_per_tok={top_k} expert; jaxscale's top-1 router weights "
                f"by the raw probability where Mixtral's weights by 1, so only top-k >= 2 imports exactly."
            )
        values |= {"num_experts": hf["num_local_experts"], "experts_per_token": top_k}
        values |= {"num_shared_experts": 0, "moe_every": 1}
    return values


def check_sliding_window(hf: dict[str, Any], directory: Path, seq_len: int) -> None:
    """Mistral's sliding window changes nothing while every sequence fits in it; jaxscale has none, so refuse longer."""
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < seq_len:
        raise UserError(
            f"'{directory / 'config.json'}' attends within a sliding window of {window} tokens, which jaxscale "
            f"does not implement; set train.seq_len <= {window} so that full causal attention is the same."
        )


def export_config_json(
    model: dict[str, Any], source: dict[str, Any] | None, eos_id: int, max_positions: int, dtype: str
) -> dict[str, Any]:
    """config.json for the jaxscale `model` section (a dict of its keys), in the Hugging Face Llama family.

    `source`: the config.json the run was imported from, if still readable; its other keys (token ids,
    context length) are kept and its architecture too, except that experts always make a Mixtral.
    """
    if model["num_experts"]:
        architecture = "MixtralForCausalLM"
    elif source and source["architectures"][0] != "MixtralForCausalLM":
        architecture = source["architectures"][0]
    else:
        architecture = "LlamaForCausalLM"
    out = dict(source or {"bos_token_id": None, "eos_token_id": eos_id, "max_position_embeddings": max_positions})
    for stale in ("rope_parameters", "num_local_experts", "num_experts_per_tok", "transformers_version"):
        out.pop(stale, None)
    scaled = model["rope_scaling_factor"] != 1.0
    out |= {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": model["vocab_size"],
        "hidden_size": model["d_model"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": model["head_dim"],
        "intermediate_size": model["d_ff"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": model["rope_scaling_factor"],
            "low_freq_factor": model["rope_low_freq_factor"],
            "high_freq_factor": model["rope_high_freq_factor"],
            "original_max_position_embeddings": model["rope_original_context"],
        }
        if scaled
        else None,
        "tie_word_embeddings": model["tie_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
        "dtype": dtype,  # the name transformers 5 reads
    }
    if architecture == "MixtralForCausalLM":
        out |= {"num_local_experts": model["num_experts"], "num_experts_per_tok": model["experts_per_token"]}
    return out
