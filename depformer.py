"""depformer.py: the depth transformer, which turns one temporal step into a frame of tokens.

Moshi models 17 token streams per 80 ms frame (text + 8 codebooks of Moshi's voice + 8 of the
user's). The big temporal transformer ("Helium", moshi.py) runs once per frame and summarises the
past in one vector h. The depformer then writes the frame one codebook at a time, each conditioned
on h and on the codebook just before it:

    step 0:  in_0 = W_0 h + E_text[text token]     -> logits of audio codebook 0
    step c:  in_c = W_c h + E_{c-1}[codebook c-1]  -> logits of audio codebook c

A small causal transformer runs along this codebook axis (no positional embedding, no context
limit: a frame has only dep_q = 8 steps), with its own attention and MLP weights at every step
(`weights_per_step`, optionally shared through a schedule, see helium.select_step_weights). Each
step ends in its own output head. The text token of step 0 is the one the temporal transformer has
just chosen for this frame, so text leads and audio follows.

Two ways to run it, as everywhere in this repo:
  forward()   teacher-forced, all codebooks of all frames at once (training): [B*T frames, dep_q steps]
  generate()  codebook by codebook with a KV cache of dep_q slots, sampling as it goes (generation)

It imports helium only. `python depformer.py` checks the two against each other on random weights.
Reference: kyutai-labs/moshi `moshi/models/lm.py` (forward_depformer*, LMGen.depformer_step),
`lm_utils.py` (ScaledEmbedding), `utils/sampling.py` (moshi 0.2.13).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import helium

# "no token here": embeds to an exact zero vector; as a target, masked out of the loss
ZERO_TOKEN = -1


@dataclass(frozen=True)
class DepformerConfig:
    num_steps: int                       # dep_q: codebooks written per frame
    in_dim: int                          # width of the temporal transformer's output h
    card: int                            # audio vocabulary; embeddings have card + 1 rows (+ initial token)
    text_card: int                       # text vocabulary; text embedding has text_card + 1 rows
    transformer: helium.TransformerConfig
    multi_linear: bool = True            # one input projection W_c per step (else one shared W)
    low_rank: int | None = None          # embeddings of width r, then a learned r -> d_model map
    norm: str | None = None              # optional norm before each output head

    @property
    def dim(self) -> int:
        return self.transformer.d_model

    @property
    def schedule(self) -> tuple[int, ...]:
        """Which weight set each step uses (identity unless the transformer has a schedule)."""
        return self.transformer.weights_per_step_schedule or tuple(range(self.num_steps))

    @property
    def num_input_projs(self) -> int:
        """Kyutai builds these even with no steps at all (dep_q = 0, then unused)."""
        return max(self.schedule, default=-1) + 1 if self.multi_linear else 1


# ----------------------------------------------------------------------------------------------
# Embeddings, Kyutai style: token -1 gives an exact zero vector, any other negative token is clamped
# to row 0 (so -2, "not generated yet", is *not* zero). A low-rank table is zero-masked first, then
# mapped up to the model width. moshi.py embeds its 17 input streams with the same function.

def embed(table, tokens, low_rank=None):
    """table [V, E], tokens [...] int -> [..., E] (or [..., D] through low_rank [D, E])."""
    rows = jnp.take(table, jnp.maximum(tokens, 0), axis=0)
    rows = jnp.where((tokens == ZERO_TOKEN)[..., None], jnp.zeros((), rows.dtype), rows)
    return rows if low_rank is None else helium.linear(rows, low_rank)


def audio_embedding(params, tokens, c):
    """Codebook c's embedding of tokens [B] (c may be traced): what step c + 1 conditions on."""
    low_rank = jax.tree.map(lambda w: w[c], params["emb_low_rank"]) if "emb_low_rank" in params else None
    return embed(params["emb"][c], tokens, low_rank)


# ----------------------------------------------------------------------------------------------
# Teacher-forced pass (training): every frame's dep_q steps in one batch of B*T short sequences.

def forward(params, cfg: DepformerConfig, h, tokens, layer_hook: Callable | None = None, remat: bool = False):
    """h [B, T, D] temporal outputs; tokens [B, T, K] the token each step conditions on
    (text, then audio codebooks 0..K-2 of the same frame) -> logits [B, T, K, card]."""
    B, T, _ = h.shape
    K = cfg.num_steps
    steps = tuple(range(K))
    w_in = params["input_proj"][np.asarray(cfg.schedule if cfg.multi_linear else (0,) * K)]
    x = jnp.einsum("btd,ked->btke", h, w_in)                        # w_in [K, Dd, D] -> x [B, T, K, Dd]
    x = x + jnp.stack([embed(params["text_emb"], tokens[:, :, 0], params.get("text_emb_low_rank"))] +
                      [audio_embedding(params, tokens[:, :, c], c - 1) for c in steps[1:]], axis=2)
    layers = helium.select_step_weights(params["transformer"], cfg.transformer, steps)
    _, y = helium.transformer(layers, cfg.transformer, x.reshape(B * T, K, -1),
                              layer_hook=layer_hook, remat=remat)                         # [B*T, K, Dd]
    y = y.reshape(B, T, K, -1)
    if cfg.norm is not None:
        y = helium.norm(params["norms"], cfg.norm, y)                 # per-step norms broadcast over K
    return jnp.einsum("btkd,kvd->btkv", y, params["linears"])                           # [B, T, K, card]


# ----------------------------------------------------------------------------------------------
# Sampling, as Kyutai's `sample_token`: softmax(logits / temp), keep the top k, draw one. Drawing
# from the renormalised top k is a categorical over the top-k logits, which is what we do; a top_k
# outside 1..V-1 keeps every token. Greedy, or a temp that is not > 0 (NaN too), takes the argmax;
# ties go to the lowest index, as torch.argmax does.

def sample_token(logits, key, temp: float, top_k: int, greedy: bool = False):
    """logits [..., V] -> tokens [...] int32."""
    logits = logits.astype(jnp.float32)
    if greedy or not temp > 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temp
    if 0 < top_k < logits.shape[-1]:
        top_logits, top_index = jax.lax.top_k(logits, top_k)                   # [..., k]
        choice = jax.random.categorical(key, top_logits, axis=-1)
        return jnp.take_along_axis(top_index, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Generation: one frame, codebook by codebook. The KV cache lives for one frame only (dep_q
# slots, step c at position c), so the depformer's memory never grows. Steps 1..K-1 are one
# lax.scan (they differ only in which weights they index), so a model compiles one step, not K.

def step(params, cfg: DepformerConfig, cache, h, token_embedding, c):
    """Step c of a frame (c may be traced: inside the scan): h [B, D], the embedded token it
    conditions on [B, Dd] -> (cache, logits [B, card]). Reads step c's slice of every weight that
    differs per step."""
    sched = jnp.asarray(cfg.schedule)
    take = lambda w, i: jax.tree.map(lambda a: a[i], w)                     # an int8 weight is a dict
    layers = params["transformer"]
    if cfg.transformer.weights_per_step:                    # [L, M, out, in] -> [L, 1, out, in]
        stacked = not isinstance(layers, list)              # (unstacked: [M, out, in] -> [1, out, in])
        pick = lambda a: jax.lax.dynamic_slice_in_dim(a, sched[c], 1, axis=1 if stacked else 0)
        layers = (helium.map_step_weights(layers, pick) if stacked
                  else [helium.map_step_weights(p, pick) for p in layers])
    w_in = take(params["input_proj"], sched[c] if cfg.multi_linear else 0)
    x = helium.linear(h, w_in) + token_embedding                                   # [B, Dd]
    cache, y = helium.step(layers, cfg.transformer, cache, x[:, None])             # [B, 1, Dd]
    y = y[:, 0]
    if cfg.norm is not None:
        y = helium.norm(take(params["norms"], c), cfg.norm, y)
    return cache, helium.linear(y, take(params["linears"], c))


def generate(params, cfg: DepformerConfig, h, text_token, key, sample: Callable,
             forced=None, forced_mask=None):
    """Write one frame of audio codebooks.

    h [B, D] (the temporal output of this frame), text_token [B] (its text token), key (PRNG key),
    sample(logits [B, card], key) -> [B]. Where forced_mask [B, K] is True, the next step is
    conditioned on forced [B, K] instead of the sampled token (teacher forcing, as PersonaPlex does
    for tokens it was given); the *sampled* tokens are returned all the same.
    Returns (tokens [B, K] int32, logits [B, K, card]).
    """
    K = cfg.num_steps
    keys = jax.random.split(key, K)
    cache = helium.init_cache(cfg.transformer, h.shape[0], h.dtype, capacity=K,
                              stacked=not isinstance(params["transformer"], list))

    def one_step(cache, c, token_embedding):      # -> (cache, what step c + 1 reads), (token, logits)
        cache, logits = step(params, cfg, cache, h, token_embedding, c)
        token = sample(logits, keys[c])
        prev = token if forced is None else jnp.where(forced_mask[:, c], forced[:, c], token)
        return (cache, prev), (token, logits)

    text_in = embed(params["text_emb"], text_token, params.get("text_emb_low_rank"))
    carry, first = one_step(cache, 0, text_in)
    if K == 1:                             # one codebook: no later step, nor a table to condition it on
        return jax.tree.map(lambda a: a[:, None], first)

    def body(carry, c):
        cache, prev = carry
        return one_step(cache, c, audio_embedding(params, prev, c - 1))

    _, rest = jax.lax.scan(body, carry, jnp.arange(1, K))                # [K - 1, B, ...] each
    return jax.tree.map(lambda a, b: jnp.concatenate([a[:, None], jnp.moveaxis(b, 0, 1)], axis=1),
                        first, rest)


# ----------------------------------------------------------------------------------------------
# Init: truncated normal with std 1/sqrt(fan_in), as Kyutai's `_init_weights` (embeddings: 1/sqrt(width)).

def init(key, cfg: DepformerConfig, dtype=jnp.float32):
    K, Dd, D = cfg.num_steps, cfg.dim, cfg.in_dim
    width = cfg.low_rank or Dd
    k = jax.random.split(key, 7)
    dense = helium.dense_init
    params = {"input_proj": dense(k[0], (cfg.num_input_projs, Dd, D), dtype),
              "text_emb": dense(k[1], (cfg.text_card + 1, width), dtype),
              "emb": dense(k[2], (K - 1, cfg.card + 1, width), dtype),
              "transformer": helium.init(k[3], cfg.transformer, dtype),
              "linears": dense(k[4], (K, cfg.card, Dd), dtype)}
    if cfg.low_rank:
        params["text_emb_low_rank"] = dense(k[5], (Dd, width), dtype)
        params["emb_low_rank"] = dense(k[6], (K - 1, Dd, width), dtype)
    if cfg.norm is not None:
        params["norms"] = jax.tree.map(lambda a: jnp.stack([a] * K), helium.init_norm(cfg.norm, Dd, dtype))
    return params


# ----------------------------------------------------------------------------------------------
# Demo: the teacher-forced pass and the step-by-step pass agree when generation is forced to
# follow the same tokens.

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Runs a random-weight self-check.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tcfg = helium.TransformerConfig(32, 4, 2, int(4.125 * 32), positional_embedding="none",
                                    weights_per_step=8)
    cfg = DepformerConfig(num_steps=8, in_dim=64, card=128, text_card=100, transformer=tcfg)
    key, B = jax.random.key(args.seed), 3
    params = init(key, cfg)
    h = jax.random.normal(jax.random.key(1), (B, 64))
    tokens = jax.random.randint(jax.random.key(2), (B, 8), 0, 100)             # text, then codebooks 0..6
    full = forward(params, cfg, h[:, None], tokens[:, None])[:, 0]                # [B, K, card]
    # Generation forced to the same tokens (step c + 1 conditions on tokens[c + 1]) gives the same logits,
    # whatever it samples (what is forced after the last step conditions nothing).
    forced = jnp.roll(tokens, -1, axis=1)
    sample = lambda logits, k: sample_token(logits, k, 0.8, 250)                 # noqa: E731
    _, stepped = generate(params, cfg, h, tokens[:, 0], key, sample, forced, jnp.ones((B, 8), bool))
    err = float(jnp.max(jnp.abs(stepped - full)) / jnp.max(jnp.abs(full)))
    print(f"{cfg.num_steps} codebooks, batch {B}: teacher-forced pass vs codebook-by-codebook "
          f"generation, max rel. error {err:.2e}")
    sampled, _ = generate(params, cfg, h, tokens[:, 0], key, sample)
    print(f"a sampled frame (random weights): {np.asarray(sampled[0]).tolist()}")


if __name__ == "__main__":
    main()
