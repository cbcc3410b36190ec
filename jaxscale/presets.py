"""Model shapes by name. A preset sets every shape key; config keys given beside it win.

A preset of a Hugging Face family starts from the family's switches (jaxscale.families) and adds the
shape of its model card's config.json, so `plan` and `compile` see the model an import would build.
"""

from typing import Any

from jaxscale.errors import UserError
from jaxscale.families import family_switches

PRESETS: dict[str, dict[str, Any]] = {
    # About 0.9 M parameters: trains on emulated CPU devices in minutes.
    "tiny": dict(
        vocab_size=0,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=384,
        rope_theta=10000.0,
        tie_embeddings=True,
    ),
    # Shapes from the Llama 3 model card (8B and 70B): GQA with 8 KV heads, 128k vocabulary.
    "llama3-8b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    # Llama 3.2 1B (model card shapes): tied embeddings, GQA with 32 query and 8 KV heads of 64.
    "llama3.2-1b": dict(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "llama3-70b": dict(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        d_ff=28672,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    # Llama 3.1 405B (model card shapes): 126 layers of width 16384, 128 query and 8 KV heads of 128.
    "llama3-405b": dict(
        vocab_size=128256,
        d_model=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        head_dim=128,
        d_ff=53248,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    # Four experts of the tiny width, top-2, every layer MoE, with token dropping so the drop metric
    # has something to show. About 1.8 M parameters, 1.0 M active per token.
    "tiny-moe": dict(
        vocab_size=0,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=256,
        rope_theta=10000.0,
        tie_embeddings=True,
        num_experts=4,
        experts_per_token=2,
        num_shared_experts=0,
        capacity_factor=1.25,
        moe_every=1,
    ),
    # Mixtral 8x7B shapes (Mistral AI's model card): 8 experts, top-2, every layer, dropless. For planning.
    "mixtral-8x7b": dict(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=1000000.0,
        tie_embeddings=False,
        num_experts=8,
        experts_per_token=2,
        num_shared_experts=0,
        capacity_factor=0.0,
        moe_every=1,
    ),
    # Qwen2.5-7B (config.json of Qwen/Qwen2.5-7B): q/k/v biases, GQA 28/4 heads of 128, untied.
    "qwen2.5-7b": family_switches("Qwen2ForCausalLM")
    | dict(
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        d_ff=18944,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    # Qwen3-8B: q/k norms, GQA 32/8 heads of 128, untied.
    "qwen3-8b": family_switches("Qwen3ForCausalLM")
    | dict(
        vocab_size=151936,
        d_model=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=12288,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
    ),
    # Qwen3-30B-A3B: 48 layers, every one MoE of 128 experts of width 768, top-8 renormalized; dropless.
    "qwen3-30b-a3b": family_switches("Qwen3MoeForCausalLM")
    | dict(
        vocab_size=151936,
        d_model=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        d_ff=6144,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        num_experts=128,
        experts_per_token=8,
        expert_d_ff=768,
        router_weights="normalized",
        aux_loss_style="transformers",
        aux_loss_weight=0.0,
        z_loss_weight=0.0,
    ),
    # Gemma 3 12B (text_config of google/gemma-3-12b-pt): five local layers (window 1024, rope base 10k) to one
    # global (rope base 1M scaled linearly by 8), head_dim 256, tied 262k vocabulary.
    "gemma3-12b": family_switches("Gemma3ForCausalLM")
    | dict(
        vocab_size=262208,
        d_model=3840,
        n_layers=48,
        n_heads=16,
        n_kv_heads=8,
        head_dim=256,
        d_ff=15360,
        rope_theta=1000000.0,
        rope_type="linear",
        rope_scaling_factor=8.0,
        rope_local_theta=10000.0,
        sliding_window=1024,
        attention_pattern="LLLLLG" * 8,
        query_pre_attn_scalar=256.0,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
}


def preset_values(name: str) -> dict[str, Any]:
    """Field values of the named preset; a UserError lists the known names."""
    if name not in PRESETS:
        raise UserError(f"Unknown model.preset '{name}'. Known presets: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]
