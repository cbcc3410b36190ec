"""An independent float64 numpy forward of the Hugging Face families jaxscale imports, and small models of them.

Written from transformers' modeling code (5.x): LlamaForCausalLM, MistralForCausalLM,
MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma2ForCausalLM and
Gemma3ForCausalLM (their attention, repeat_kv, rotate_half, RMSNorm, MLP, sparse MoE blocks, the
sliding-window causal mask of masking_utils) and modeling_rope_utils (default, linear, dynamic, yarn,
llama3). It reads config.json as a dict and the weights by their Hugging Face names, and never calls
jaxscale. `random_hf_weights` and `write_hf_model` make a model directory as `save_pretrained` would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxscale.hf.export import byte_tokenizer_json

GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def architecture(config: dict) -> str:
    return config["architectures"][0]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def n_experts(config: dict) -> int:
    return config.get("num_local_experts") or config.get("num_experts") or 0


def sparse_layer(config: dict, i: int) -> bool:
    """Qwen3MoeDecoderLayer's test (and Mixtral's every layer)."""
    if architecture(config) == "MixtralForCausalLM":
        return True
    if architecture(config) != "Qwen3MoeForCausalLM":
        return False
    step = config.get("decoder_sparse_step", 1)
    return i not in (config.get("mlp_only_layers") or []) and n_experts(config) > 0 and (i + 1) % step == 0


def random_hf_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 tensors of the model `config` describes, named and laid out as transformers saves them."""
    rng = np.random.default_rng(seed)
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    N, K, H = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    gemma = architecture(config) in GEMMA
    arch = architecture(config)

    def normal(*shape: int, std: float = 0.15) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(*shape: int) -> np.ndarray:  # Gemma's scale is 1 + w, w near 0
        return normal(*shape, std=0.1) + (0.0 if gemma else 1.0)

    w = {"model.embed_tokens.weight": normal(V, D, std=1.0), "model.norm.weight": norm(D)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(D),
            p + "post_attention_layernorm.weight": norm(D),
            p + "self_attn.q_proj.weight": normal(N * H, D),
            p + "self_attn.k_proj.weight": normal(K * H, D),
            p + "self_attn.v_proj.weight": normal(K * H, D),
            p + "self_attn.o_proj.weight": normal(D, N * H),
        }
        if arch == "Qwen2ForCausalLM" or config.get("attention_bias"):
            w |= {p + f"self_attn.{x}_proj.bias": normal(n * H, std=0.5) for x, n in (("q", N), ("k", K), ("v", K))}
        if config.get("attention_bias"):
            w[p + "self_attn.o_proj.bias"] = normal(D, std=0.5)
        if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
            w |= {p + "self_attn.q_norm.weight": norm(H), p + "self_attn.k_norm.weight": norm(H)}
        if gemma:
            w |= {p + "pre_feedforward_layernorm.weight": norm(D), p + "post_feedforward_layernorm.weight": norm(D)}
        if arch == "MixtralForCausalLM":
            w[p + "block_sparse_moe.gate.weight"] = normal(n_experts(config), D, std=0.5)
            for e in range(n_experts(config)):
                q = f"{p}block_sparse_moe.experts.{e}."
                w |= {q + "w1.weight": normal(F, D), q + "w3.weight": normal(F, D), q + "w2.weight": normal(D, F)}
        elif sparse_layer(config, i):
            Fe = config["moe_intermediate_size"]
            w[p + "mlp.gate.weight"] = normal(n_experts(config), D, std=0.5)
            for e in range(n_experts(config)):
                q = f"{p}mlp.experts.{e}."
                w |= {q + "gate_proj.weight": normal(Fe, D), q + "up_proj.weight": normal(Fe, D)}
                w[q + "down_proj.weight"] = normal(D, Fe)
        else:
            w |= {
                p + "mlp.gate_proj.weight": normal(F, D),
                p + "mlp.up_proj.weight": normal(F, D),
                p + "mlp.down_proj.weight": normal(D, F),
            }
    return w


def write_hf_model(directory: Path, config: dict, weights: dict[str, np.ndarray], shards: int = 1) -> Path:
    """A model directory as `save_pretrained` writes it: config.json, safetensors (with an index when sharded),
    and a byte-level tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    names = list(weights)
    if shards == 1:
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part.tolist(), file)
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def rope_parameters(config: dict, layer_type: str) -> dict:
    """The layer type's rope parameters as transformers standardizes them (convert_rope_params_to_dict)."""
    if architecture(config) == "Gemma3ForCausalLM":
        if layer_type == "sliding_attention":
            return {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}
        scaling = dict(config.get("rope_scaling") or {})
        return scaling | {"rope_theta": config.get("rope_theta", 1e6)}
    params = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    return params


def inv_freq(config: dict, layer_type: str, seq_len: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [H/2], attention scaling) from modeling_rope_utils' functions, in float64."""
    p = rope_parameters(config, layer_type)
    kind, base, dim = p.get("rope_type", "default"), p["rope_theta"], head_dim(config)
    exponents = np.arange(0, dim, 2) / dim
    if kind == "default":
        return 1.0 / base**exponents, 1.0
    factor = p["factor"]
    if kind == "linear":
        return 1.0 / base**exponents / factor, 1.0
    if kind == "dynamic":  # dynamic_frequency_update: recomputed at seq_len once it passes max_position_embeddings
        max_positions = config["max_position_embeddings"]
        seq = max(seq_len, max_positions)
        base = base * ((factor * seq / max_positions) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    if kind == "llama3":
        freqs = 1.0 / base**exponents
        low, high, old = p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        llama = np.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, llama), 1.0
    assert kind == "yarn", kind
    original = p["original_max_position_embeddings"]
    attention = p.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base**exponents
    return (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation, attention


def layer_types(config: dict) -> list[str]:
    """Each layer's attention as the family's config class sets it."""
    n, arch = config["num_hidden_layers"], architecture(config)
    if config.get("layer_types"):
        return config["layer_types"]
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        first = config.get("max_window_layers", 28)
        return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if arch == "Gemma2ForCausalLM":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if arch == "Gemma3ForCausalLM":
        period = config.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    uniform = config.get("sliding_window") and config.get("use_sliding_window", True)
    return ["sliding_attention" if uniform else "full_attention"] * n


def hf_forward(
    config: dict,
    w: dict[str, np.ndarray],
    tokens_BL: np.ndarray,
    segment_ids_BL: np.ndarray | None = None,
    positions_BL: np.ndarray | None = None,
    router_logits: list | None = None,
) -> np.ndarray:
    """Logits [B, L, V] of the model `config` describes, float64. With segment ids and positions (packed
    documents), a token attends within its document only and is rotated by its position in it, as
    transformers' forward of each document alone computes it. `router_logits`: a list each MoE layer's
    router logits [B * L, E] are appended to."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    arch = architecture(config)
    gemma = arch in GEMMA
    B, L = tokens_BL.shape
    D, N, K, H = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    eps = config["rms_norm_eps"]
    if positions_BL is None:
        positions_BL = np.broadcast_to(np.arange(L), (B, L))
    if segment_ids_BL is None:
        segment_ids_BL = np.zeros((B, L), int)

    def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
        return normed * (1.0 + weight if gemma else weight)  # Gemma3RMSNorm: (1 + w)

    def rotate_half(x: np.ndarray) -> np.ndarray:
        return np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], axis=-1)

    def activation(x: np.ndarray) -> np.ndarray:
        if gemma:  # gelu_pytorch_tanh
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return x / (1 + np.exp(-x))  # silu

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)

    def mlp(h: np.ndarray, p: str) -> np.ndarray:
        return (activation(h @ w[p + "gate_proj.weight"].T) * (h @ w[p + "up_proj.weight"].T)) @ w[
            p + "down_proj.weight"
        ].T

    types = layer_types(config)
    window = config.get("sliding_window")
    if arch.startswith("Qwen") and not config.get("use_sliding_window"):
        window = None
    seq_len = int(np.max(positions_BL)) + 1  # what a dynamic rope reads: max(position_ids) + 1
    rope = {}
    for t in set(types):
        freq, scaling = inv_freq(config, t, seq_len)
        angles = positions_BL[..., None] * freq  # [B, L, H/2]
        emb = np.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, L, H]
        rope[t] = (np.cos(emb) * scaling, np.sin(emb) * scaling)
    same_document = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    distance = positions_BL[:, None, :, None] - positions_BL[:, None, None, :]
    scaling = config["query_pre_attn_scalar"] ** -0.5 if gemma else H**-0.5
    softcap = config.get("attn_logit_softcapping") if arch == "Gemma2ForCausalLM" else None

    x = w["model.embed_tokens.weight"][tokens_BL]
    if gemma:
        x = x * D**0.5  # Gemma3TextScaledWordEmbedding
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])

        def project(h: np.ndarray, p: str, name: str, n: int) -> np.ndarray:
            y = h @ w[p + f"self_attn.{name}_proj.weight"].T
            if p + f"self_attn.{name}_proj.bias" in w:
                y = y + w[p + f"self_attn.{name}_proj.bias"]
            return y.reshape(B, L, n, H)

        q, k, v = project(h, p, "q", N), project(h, p, "k", K), project(h, p, "v", K)
        if p + "self_attn.q_norm.weight" in w:  # per head, before rope
            q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"]), rms_norm(k, w[p + "self_attn.k_norm.weight"])
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        cos, sin = rope[types[i]]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # repeat_kv
        scores = q @ k.transpose(0, 1, 3, 2) * scaling
        if softcap:
            scores = np.tanh(scores / softcap) * softcap
        visible = same_document & (distance >= 0)
        if types[i] == "sliding_attention" and window:
            visible = visible & (distance < window)  # sliding_window_overlay: kv_idx > q_idx - window
        probs = softmax(np.where(visible, scores, -np.inf))
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, N * H) @ w[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in w:
            out = out + w[p + "self_attn.o_proj.bias"]
        if gemma:  # Gemma's post_attention_layernorm is on the attention's output; its MLP norm pre_feedforward
            x = x + rms_norm(out, w[p + "post_attention_layernorm.weight"])
            h = rms_norm(x, w[p + "pre_feedforward_layernorm.weight"])
        else:
            x = x + out
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        if arch == "MixtralForCausalLM":
            y = sparse_moe(config, w, p + "block_sparse_moe.", h, activation, softmax, "w1", "w3", "w2", router_logits)
        elif sparse_layer(config, i):
            y = sparse_moe(
                config, w, p + "mlp.", h, activation, softmax, "gate_proj", "up_proj", "down_proj", router_logits
            )
        else:
            y = mlp(h, p + "mlp.")
        if gemma:
            y = rms_norm(y, w[p + "post_feedforward_layernorm.weight"])
        x = x + y
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    logits = x @ head.T
    if gemma and config.get("final_logit_softcapping"):
        cap = config["final_logit_softcapping"]
        logits = np.tanh(logits / cap) * cap
    return logits


def sparse_moe(
    config: dict,
    w: dict,
    p: str,
    h: np.ndarray,
    activation,
    softmax,
    gate: str,
    up: str,
    down: str,
    router_logits: list | None = None,
) -> np.ndarray:
    """MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock: softmax over all router logits, top-k, renormalized
    (Mixtral always, Qwen3-MoE where norm_topk_prob), the weighted sum of the chosen experts' gated MLPs."""
    logits = h @ w[p + "gate.weight"].T  # [B, L, E]
    if router_logits is not None:
        router_logits.append(logits.reshape(-1, logits.shape[-1]))
    probs = softmax(logits)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., : config["num_experts_per_tok"]]
    weights = np.take_along_axis(probs, top, axis=-1)
    if architecture(config) == "MixtralForCausalLM" or config.get("norm_topk_prob"):
        weights = weights / np.sum(weights, axis=-1, keepdims=True)
    out = np.zeros_like(h)
    for e in range(n_experts(config)):
        q = f"{p}experts.{e}."
        y = (activation(h @ w[q + f"{gate}.weight"].T) * (h @ w[q + f"{up}.weight"].T)) @ w[q + f"{down}.weight"].T
        out += np.sum(np.where(top == e, weights, 0.0), axis=-1, keepdims=True) * y
    return out


def load_balancing_loss(config: dict, router_logits: list[np.ndarray]) -> float:
    """transformers' load_balancing_loss_func (no attention mask): every MoE layer's [tokens, E] logits together."""
    E, k = n_experts(config), config["num_experts_per_tok"]
    counts, prob_sum, rows = np.zeros(E), np.zeros(E), 0
    for logits in router_logits:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        counts += np.bincount(top.reshape(-1), minlength=E)
        prob_sum += probs.sum(0)
        rows += probs.shape[0]
    return float(np.sum(counts / rows * prob_sum / rows) * E)
