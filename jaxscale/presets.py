"""Model shapes by name. A preset sets every shape key; config keys given beside it win."""

from typing import Any

from jaxscale.errors import UserError

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
}


def preset_values(name: str) -> dict[str, Any]:
    """Field values of the named preset; a UserError lists the known names."""
    if name not in PRESETS:
        raise UserError(f"Unknown model.preset '{name}'. Known presets: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]
