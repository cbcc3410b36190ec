"""Autoregressive decoding with a key/value cache: prefill the prompts in one forward pass, then one
token per step inside a compiled `lax.while_loop`.

Prompts of different lengths are left-padded to one length P, so every row writes its step's keys
and values into the same cache slot; a row's padding is masked out as keys, and its rotary
positions count from its own first token (slot j of a row with `pad` padding has position j - pad),
as in training, where each example's row starts at position 0. The cache of each layer holds
[B, T, K, H] keys and values (T = P + max_new_tokens), split like the activations: the batch over
the batch axes, the kv heads over `tensor`. The layers are walked as training walks them
(`Decoder.run_stack`), each through its block's own residual structure (`Block.residual`), and the
attention layers' own projections (`Attention.qkv`, `Attention.output`) compute queries, keys,
values and outputs, so decoding runs exactly the weights and the block training runs; only the
attention reads the cache (within the sliding window on local layers).

Mixture-of-experts layers route every token to its k experts (`dropless`): capacity is a training
device counted per sequence, under which whether a token reaches its second expert depends on the tokens
after it, so no step-by-step decoder could reproduce it; the layer runs on the run's mesh as in training
(experts split over `expert`, tokens exchanged by all-to-all), one token per row and step.

Decoding runs in pieces (`start_decoding`, then `continue_decoding` up to a step the caller chooses), so a
caller can look at the text between pieces (`jaxscale generate --stop`) while the loop stays compiled.

Shape letters as in jaxscale.models.transformer, plus P prompt length, T cache length, G new tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxscale.models.attention import masked_attention
from jaxscale.models.moe import MoE
from jaxscale.models.transformer import Attention, Block, Decoder, LayerKind
from jaxscale.sharding import constrain

CACHE_NAMES = ("layers", "batch", None, "kv_heads", None)  # [S, B, T, K, H]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from its logits: greedy (temperature 0), or drawn from the distribution at
    `temperature`, cut as transformers' sampling warpers cut it, in their order: first to the `top_k` most likely
    tokens (0: no cut; ties with the k-th stay), then to the smallest set of the rest whose probability reaches
    `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """The logits [B, V] a sampled token is drawn from: divided by the temperature, then -inf outside the top-k,
    then -inf outside the top-p nucleus (transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper, in that order). Not for greedy sampling."""
    logits_BV = logits_BV / sampling.temperature
    if 0 < sampling.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    if sampling.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their probability reaches top_p; the first always stays.
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
        kept = jnp.sum(before_BV < sampling.top_p, axis=-1, keepdims=True)
        threshold_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return logits_BV


def choose_tokens(logits_BV: jax.Array, sampling: Sampling, key: jax.Array) -> jax.Array:
    """The next token of each row, int32 [B], from float32 logits [B, V] (-inf where a token is ruled out)."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, sampling), axis=-1).astype(jnp.int32)


def dropless(model: Decoder) -> Decoder:
    """`model` with every MoE layer routing dropless (capacity_factor 0), as decoding runs it (module docstring).
    Changes the layers' static shape in place, so call it on a model merged for decoding, not on one training."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE) and module.s.capacity_factor > 0:
            module.s = dataclasses.replace(module.s, capacity_factor=0.0)
    return model


def _cached_attention(
    attn: Attention,
    h_BLD: jax.Array,
    positions_BL: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    start: jax.Array,
    visible_BLT: jax.Array,
    local: bool,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """A layer's attention on the L new tokens at cache slots [start, start + L): their keys and values go into
    the cache ([B, T, K, H] each), and each attends to the slots `visible_BLT` allows (within the sliding window
    on a `local` layer). Returns (output [B, L, D], the cache)."""
    s = attn.s
    q_BLNH, k_BLKH, v_BLKH = attn.qkv(h_BLD, positions_BL, local=local)
    k_BTKH, v_BTKH = (
        constrain(jax.lax.dynamic_update_slice_in_dim(c, new, start, axis=1), CACHE_NAMES[1:])
        for c, new in zip(cache, (k_BLKH, v_BLKH), strict=True)
    )
    if local and s.sliding_window:
        slot_L, slot_T = start + jnp.arange(h_BLD.shape[1]), jnp.arange(k_BTKH.shape[1])
        visible_BLT = visible_BLT & (slot_L[None, :, None] - slot_T[None, None, :] < s.sliding_window)
    # A padding query sees no key; the masked softmax then averages junk values that nothing reads.
    out_BLNH = masked_attention(
        q_BLNH, k_BTKH, v_BTKH, visible_BLT[:, None], scale=s.attention_scale, softcap=s.attn_softcap
    )
    return attn.output(out_BLNH), (k_BTKH, v_BTKH)


def _forward_cached(
    model: Decoder,
    tokens_BL: jax.Array,
    pad_B: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    start: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Tokens [B, L] at cache slots [start, start + L) through every layer, reading and filling the cache
    ([S, B, T, K, H] keys and values). Returns the float32 logits of the last slot [B, V] and the cache.

    The layers run through `Decoder.run_stack` and each block's own `Block.residual`, as in training: only
    the attention differs, reading and writing the cache."""
    length, slots = tokens_BL.shape[1], cache[0].shape[2]
    slot_L = start + jnp.arange(length)
    positions_BL = jnp.maximum(slot_L[None, :] - pad_B[:, None], 0)
    slot_T = jnp.arange(slots)
    # Key slot t is visible to the query at slot l when it is no later and not a row's left padding.
    visible_BLT = (slot_T[None, None, :] <= slot_L[None, :, None]) & (slot_T[None, None, :] >= pad_B[:, None, None])

    def layer(block: Block, kind: LayerKind, x_BLD: jax.Array, layer_cache: tuple) -> tuple:
        def attention(h_BLD: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            return _cached_attention(block.attn, h_BLD, positions_BL, layer_cache, start, visible_BLT, kind.local)

        return block.residual(x_BLD, attention)

    x_BLD, _, cache = model.run_stack(model.embed_tokens(tokens_BL), layer, cache)
    return model.logits(x_BLD[:, -1:])[:, 0], cache


def prefill(
    model: Decoder, prompt_BP: jax.Array, pad_B: jax.Array, max_new_tokens: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The prompts [B, P] (left-padded by `pad_B`) in one forward pass: the float32 logits of each row's last
    token [B, V], and the key and value caches [S, B, P + max_new_tokens, K, H] with the prompts' slots filled,
    split as CACHE_NAMES says under `jaxscale.sharding.use_rules`. The cache holds what is asked for, not the
    model's longest context."""
    s = model.s
    batch, prompt_len = prompt_BP.shape
    cache_shape = (s.n_layers, batch, prompt_len + max_new_tokens, s.n_kv_heads, s.head_dim)
    empty = constrain(jnp.zeros(cache_shape, jnp.dtype(s.compute_dtype)), CACHE_NAMES)
    return _forward_cached(dropless(model), prompt_BP, pad_B, (empty, empty), jnp.int32(0))


class Decoding(NamedTuple):
    """Decoding under way: the new tokens so far and what the next step needs.

    tokens_BG: int32, the first `step` new tokens of each row (after a row's eos, its first eos id); the rest eos.
    cache: keys and values [S, B, P + G, K, H]. done_B: a row has produced an eos. pad_B: each row's left padding.
    """

    tokens_BG: jax.Array
    cache: tuple[jax.Array, jax.Array]
    done_B: jax.Array
    step: jax.Array  # int32: tokens produced so far
    pad_B: jax.Array


def _chooser(
    model: Decoder, sampling: Sampling, key: jax.Array, eos_ids: Sequence[int], vocab_size: int
) -> tuple[Callable[[jax.Array, jax.Array, jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
    """(choose, is_eos): the next token of each row from its logits at a step (the tokenizer's ids only; a row
    that is done repeats its eos), and whether a token ends a row."""
    outside_vocab_V = jnp.arange(model.s.vocab_size) >= vocab_size
    eos_E = jnp.asarray(eos_ids, jnp.int32)

    def choose(logits_BV: jax.Array, step: jax.Array, done_B: jax.Array) -> jax.Array:
        logits_BV = jnp.where(outside_vocab_V, -jnp.inf, logits_BV)
        token_B = choose_tokens(logits_BV, sampling, jax.random.fold_in(key, step))
        return jnp.where(done_B, eos_E[0], token_B)

    def is_eos(token_B: jax.Array) -> jax.Array:
        return jnp.any(token_B[:, None] == eos_E[None, :], axis=-1)

    return choose, is_eos


def start_decoding(
    model: Decoder,
    prompt_BP: jax.Array,
    pad_B: jax.Array,
    max_new_tokens: int,
    sampling: Sampling,
    key: jax.Array,
    eos_ids: Sequence[int],
    vocab_size: int,
) -> Decoding:
    """The prompts through the model (`prefill`) and each row's first new token: a Decoding at step 1.

    `prompt_BP`: int32 prompts, left-padded to a common length P (any id in the padding); `pad_B`: each row's
    padding. `eos_ids`: the ids that end a row (the first fills it after). `vocab_size`: the tokenizer's; the
    model's padded rows beyond it are never chosen. Call under `jax.jit` (and `jaxscale.sharding.use_rules` to
    split the cache like the activations).
    """
    choose, is_eos = _chooser(model, sampling, key, eos_ids, vocab_size)
    batch = prompt_BP.shape[0]
    logits_BV, cache = prefill(model, prompt_BP, pad_B, max_new_tokens)
    first_B = choose(logits_BV, jnp.int32(0), jnp.zeros(batch, bool))
    tokens_BG = jnp.full((batch, max_new_tokens), eos_ids[0], jnp.int32).at[:, 0].set(first_B)
    return Decoding(tokens_BG, cache, is_eos(first_B), jnp.int32(1), pad_B)


def continue_decoding(
    model: Decoder,
    decoding: Decoding,
    until: jax.Array,
    sampling: Sampling,
    key: jax.Array,
    eos_ids: Sequence[int],
    vocab_size: int,
) -> Decoding:
    """One token per step, each attending to the cache, until `until` tokens (at most G) or every row's eos, in
    a compiled `lax.while_loop`. Arguments as `start_decoding`'s; the same key gives the same tokens however the
    steps are cut into calls."""
    choose, is_eos = _chooser(model, sampling, key, eos_ids, vocab_size)
    model = dropless(model)
    prompt_len = decoding.cache[0].shape[2] - decoding.tokens_BG.shape[1]
    until = jnp.minimum(until, decoding.tokens_BG.shape[1])

    def unfinished(d: Decoding) -> jax.Array:
        return (d.step < until) & ~jnp.all(d.done_B)

    def next_token(d: Decoding) -> Decoding:
        previous_B1 = jax.lax.dynamic_slice_in_dim(d.tokens_BG, d.step - 1, 1, axis=1)
        logits_BV, cache = _forward_cached(model, previous_B1, d.pad_B, d.cache, prompt_len + d.step - 1)
        token_B = choose(logits_BV, d.step, d.done_B)
        tokens_BG = jax.lax.dynamic_update_slice_in_dim(d.tokens_BG, token_B[:, None], d.step, axis=1)
        return Decoding(tokens_BG, cache, d.done_B | is_eos(token_B), d.step + 1, d.pad_B)

    return jax.lax.while_loop(unfinished, next_token, decoding)


def generate_tokens(
    model: Decoder,
    prompt_BP: jax.Array,
    pad_B: jax.Array,
    max_new_tokens: int,
    sampling: Sampling,
    key: jax.Array,
    eos_ids: Sequence[int],
    vocab_size: int,
) -> jax.Array:
    """Up to `max_new_tokens` tokens after each prompt, int32 [B, G], in one call; after a row's eos, its first
    eos id fills it. Arguments as `start_decoding`'s."""
    decoding = start_decoding(model, prompt_BP, pad_B, max_new_tokens, sampling, key, eos_ids, vocab_size)
    return continue_decoding(model, decoding, jnp.int32(max_new_tokens), sampling, key, eos_ids, vocab_size).tokens_BG
