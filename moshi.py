"""moshi.py: the Moshi language model, for training (forward) and for talking (gen_step).

Moshi reads and writes 1 + n_q token streams at 12.5 frames per second:

    stream 0          text (Moshi's inner monologue, a SentencePiece token or PAD per frame)
    streams 1..8      Moshi's voice, 8 Mimi codebooks           } together n_q = 16 audio streams;
    streams 9..16     the user's voice, 8 Mimi codebooks        } the first dep_q = 8 are generated

Each frame, the 17 tokens are embedded and *summed* into one vector, the temporal transformer
(Helium, 32 layers, helium.py) runs one step, its normalised output h gives the text logits, and
the depformer (depformer.py) writes the dep_q audio codebooks one by one from h.

Streams are *delayed*: stream k at time t holds the token of frame t - delays[k]. Moshi's acoustic
codebooks lag one frame behind text and the semantic codebook, so the model decides what to say
before how it sounds. Position 0 of every stream is an "initial" token (text_card for text, card for
audio), and so is every position a delay leaves empty. In this file:

    LMConfig, presets ........ the model's hyper-parameters (Kyutai's lm kwargs)
    init ..................... random params
    embed_frames, temporal ... tokens -> h and text logits (shared by training and generation)
    delay / undelay .......... the stream shifts
    forward .................. training: codes [B, 17, T] -> aligned logits + masks (= LMModel.forward)
    Sampling, init_gen_state,
    gen_step ................. streaming generation, one frame per call (= LMGen.step, + forcing)

`python moshi.py` runs a tiny random model: forward, then generation forced to follow the same
tokens, and checks that the two give the same logits.
Reference: kyutai-labs/moshi `moshi/models/lm.py`, `lm_utils.py`, `loaders.py` (moshi 0.2.13) and
NVIDIA/personaplex `moshi/models/lm.py` (its LMGen, for forced tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import depformer
import helium
import ttt

UNGENERATED = -2                     # "nothing here": a slot not yet written, or a token not forced


# ----------------------------------------------------------------------------------------------
# Config. Field names and defaults are those of Kyutai's `LMModel(**lm_kwargs)` and the
# StreamingTransformer it builds (so a config.json maps onto it key for key, see
# convert.lm_config; where Kyutai has no default -- num_layers, depformer_num_heads, delays to fit
# n_q -- ours are placeholders); the moshiko preset below spells out Kyutai's `_lm_kwargs`. The
# depformer inherits the main transformer's settings unless a `depformer_*` field says otherwise;
# that inheritance is resolved when a config.json is read, so the fields here are explicit.

@dataclass(frozen=True)
class LMConfig:
    delays: tuple[int, ...] = (0,) * 9
    n_q: int = 8                          # audio streams in
    dep_q: int = 8                        # audio streams out (the first dep_q of the n_q)
    card: int = 1024                      # audio vocabulary
    text_card: int = 32000                # text vocabulary (the initial text token is text_card)
    text_card_out: int | None = None      # text logits width if not text_card
    dim: int = 128
    num_heads: int = 8
    num_layers: int = 2
    hidden_scale: float = 4
    norm: str = "layer_norm"
    causal: bool = True
    context: int | None = None
    positional_embedding: str = "sin"
    max_period: float = 10_000
    gating: str = "none"
    layer_scale: float | None = None
    depformer_dim: int = 256
    depformer_dim_feedforward: int | None = None   # None: hidden_scale * depformer_dim
    depformer_num_heads: int = 8
    depformer_num_layers: int = 2
    depformer_multi_linear: bool = False
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    depformer_low_rank_embeddings: int | None = None
    depformer_pos_emb: str = "sin"
    depformer_norm: str | None = None
    depformer_max_period: float = 10_000
    depformer_gating: str = "none"
    depformer_layer_scale: float | None = None
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    extra_heads_num_heads: int = 0        # STT's voice-activity heads: loaded and saved, not used here
    extra_heads_dim: int = 6
    ttt: ttt.TTTConfig | None = None      # In-Place TTT on some temporal layers (ttt.py); not Kyutai's
    # Whose streaming KV ring the temporal and depth transformers follow once it is full (see
    # helium.ring_positions): "kyutai" (moshi 0.2.13) or "personaplex" (NVIDIA's fork, which sees
    # one key less). Not a Kyutai kwarg: PersonaPlex checkpoints get it from repo.lm_config_for.
    kv_ring: str = "kyutai"

    def __post_init__(self):
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"LMConfig: {len(self.delays)} delays for {self.n_q + 1} streams "
                             f"(text + n_q={self.n_q})")
        if not 0 <= self.dep_q <= self.n_q:
            raise ValueError(f"LMConfig: dep_q={self.dep_q} must be within 0..n_q={self.n_q}")
        if min(self.delays) < 0:
            raise ValueError(f"LMConfig: negative delay in {self.delays}")
        sched = self.depformer_weights_per_step_schedule
        if sched is not None and len(sched) != self.dep_q:
            raise ValueError(f"LMConfig: depformer_weights_per_step_schedule has {len(sched)} entries, "
                             f"dep_q={self.dep_q}")
        self.temporal, self.depformer                 # noqa: B018  their configs refuse unsupported options
        if self.ttt is not None:
            if self.gating != "silu":
                raise ValueError(f"LMConfig: TTT rewrites a gated MLP's down projection; "
                                 f"gating={self.gating!r}")
            self.ttt.check_num_layers(self.num_layers)

    @property
    def num_streams(self) -> int:
        return self.n_q + 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def temporal(self) -> helium.TransformerConfig:
        """The main ("temporal") transformer."""
        return helium.TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), causal=self.causal, context=self.context,
            norm=self.norm, gating=self.gating, positional_embedding=self.positional_embedding,
            max_period=self.max_period, layer_scale=self.layer_scale, kv_ring=self.kv_ring)

    @property
    def depformer(self) -> depformer.DepformerConfig:
        """The depth transformer, with its helium config under `.transformer`. No context limit."""
        ff = self.depformer_dim_feedforward or int(self.hidden_scale * self.depformer_dim)
        tcfg = helium.TransformerConfig(
            d_model=self.depformer_dim, num_heads=self.depformer_num_heads,
            num_layers=self.depformer_num_layers, dim_feedforward=ff, causal=self.causal, context=None,
            norm=self.norm, gating=self.depformer_gating, positional_embedding=self.depformer_pos_emb,
            max_period=self.depformer_max_period, layer_scale=self.depformer_layer_scale,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule, kv_ring=self.kv_ring)
        return depformer.DepformerConfig(
            num_steps=self.dep_q, in_dim=self.dim, card=self.card, text_card=self.text_card,
            transformer=tcfg, multi_linear=self.depformer_multi_linear,
            low_rank=self.depformer_low_rank_embeddings, norm=self.depformer_norm)

    def initial_tokens(self) -> np.ndarray:
        """[1 + n_q]: what every stream holds before its first frame."""
        return np.asarray([self.text_card] + [self.card] * self.n_q, np.int32)


# Kyutai's `_lm_kwargs` (loaders.py), identical to configs/moshi_7b_202409.json: moshiko and moshika.
MOSHIKO = LMConfig(
    delays=(0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1), n_q=16, dep_q=8, card=2048,
    text_card=32000, dim=4096, num_heads=32, num_layers=32, hidden_scale=4.125, norm="rms_norm_f32",
    context=3000, positional_embedding="rope", max_period=10_000, gating="silu",
    depformer_dim=1024, depformer_dim_feedforward=int(4.125 * 1024), depformer_num_heads=16,
    depformer_num_layers=6, depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_pos_emb="none", depformer_max_period=10_000, depformer_gating="silu")
# NVIDIA's PersonaPlex: moshiko whose depformer also writes the user's 8 codebooks, streamed with
# the KV ring of NVIDIA's code.
PERSONAPLEX = dataclasses.replace(MOSHIKO, dep_q=16, kv_ring="personaplex")
# Tiny models of the same shape, for tests and demos.
TINY = dataclasses.replace(MOSHIKO, card=64, text_card=96, dim=64, num_heads=4, num_layers=2, context=8,
                           depformer_dim=32, depformer_dim_feedforward=int(4.125 * 32),
                           depformer_num_heads=2, depformer_num_layers=2)
TINY_PERSONAPLEX = dataclasses.replace(TINY, dep_q=16, kv_ring="personaplex")
PRESETS = {"moshiko": MOSHIKO, "moshika": MOSHIKO, "personaplex": PERSONAPLEX,
           "tiny": TINY, "tiny_personaplex": TINY_PERSONAPLEX}


# ----------------------------------------------------------------------------------------------
# Params: {"emb" [n_q, card+1, D], "text_emb" [text_card+1, D], "transformer" (helium layers),
# "out_norm", "text_linear" [text_card_out, D], "depformer" (depformer.py), ["extra_heads"]}.

@partial(jax.jit, static_argnames=("cfg", "dtype"))        # eager, every random op would compile alone
def init(key, cfg: LMConfig, dtype=jnp.float32):
    k = jax.random.split(key, 6)
    D, dcfg, dense = cfg.dim, cfg.depformer, helium.dense_init
    params = {"emb": dense(k[0], (cfg.n_q, cfg.card + 1, D), dtype),
              "text_emb": dense(k[1], (cfg.text_card + 1, D), dtype),
              "transformer": helium.init(k[2], cfg.temporal, dtype),
              "out_norm": helium.init_norm(cfg.norm, D, dtype),
              "text_linear": dense(k[3], (cfg.text_card_out or cfg.text_card, D), dtype)}
    if cfg.dep_q:
        params["depformer"] = depformer.init(k[4], dcfg, dtype)
    elif dcfg.num_input_projs:          # no depformer, but Kyutai's checkpoint has its input
        params["depformer"] = {"input_proj": dense(k[4], (dcfg.num_input_projs, dcfg.dim, D), dtype)}
    if cfg.extra_heads_num_heads:
        params["extra_heads"] = dense(k[5], (cfg.extra_heads_num_heads, cfg.extra_heads_dim, D), dtype)
    if cfg.ttt is not None:                    # one conv (and P) per TTT layer, stacked in layer order
        keys = jax.random.split(jax.random.fold_in(key, 7), len(cfg.ttt.layers))
        params["ttt"] = jax.vmap(lambda k: ttt.init_layer(k, D, cfg.ttt, dtype))(keys)
    return params


# ----------------------------------------------------------------------------------------------
# One frame in: the audio embeddings summed in stream order, then the text embedding added last
# (the order Kyutai sums in, which matters in bf16). Then the temporal transformer, the output
# norm, and the text head. The depformer reads the *normalised* h.

def embed_frames(params, cfg: LMConfig, tokens):
    """tokens [B, 1 + n_q, T] -> summed embeddings [B, T, D]."""
    audio = sum(depformer.embed(params["emb"][k], tokens[:, 1 + k]) for k in range(cfg.n_q))
    return audio + depformer.embed(params["text_emb"], tokens[:, 0])


def temporal(params, cfg: LMConfig, x, offset=0, cache=None, ttt_states=None, attention: str = "xla", **kw):
    """x [B, T, D] -> (cache, ttt_states, h [B, T, D] after out_norm, text_logits [B, T, text_card]).
    With TTT layers (cfg.ttt) ttt_states are their streaming states (None for a whole window)."""
    tcfg = dataclasses.replace(cfg.temporal, attention=attention)
    if cfg.ttt is None:
        cache, h = helium.transformer(params["transformer"], tcfg, x, offset, cache, **kw)
    else:
        cache, ttt_states, h = ttt.transformer(params["transformer"], params["ttt"], tcfg, cfg.ttt, x, offset,
                                               cache, ttt_states, **kw)
    h = helium.norm(params["out_norm"], cfg.norm, h)
    return cache, ttt_states, h, helium.linear(h, params["text_linear"])


# ----------------------------------------------------------------------------------------------
# Delays. delay(): stream k shifted right by delays[k], the gap filled with its initial token.
# undelay(): per-frame outputs shifted back left, so position t lines up with frame t; the last
# delays[k] positions have nothing to line up with and are masked.

def delay(codes, delays, initial):
    """codes [B, K, T] -> delayed [B, K, T]."""
    t = jnp.arange(codes.shape[-1])
    rows = [jnp.where(t < d, initial[k], jnp.roll(codes[:, k], d, axis=-1)) for k, d in enumerate(delays)]
    return jnp.stack(rows, axis=1)


def undelay(values, delays, targets):
    """values [B, K, T, ...] predicting targets [B, K, T] -> (aligned [B, K, T, ...], mask [B, K, T]):
    False past a delay (where the values hold 0) and where the target is -1."""
    K, T = values.shape[1:3]
    valid = jnp.arange(T) < T - np.asarray(delays)[:, None]                     # [K, T]
    rows = jnp.stack([jnp.roll(values[:, k], -d, axis=1) for k, d in enumerate(delays)], axis=1)
    ok = valid.reshape((1, K, T) + (1,) * (values.ndim - 3))
    return jnp.where(ok, rows, jnp.zeros((), rows.dtype)), valid & (targets != depformer.ZERO_TOKEN)


# ----------------------------------------------------------------------------------------------
# Training forward, equal to Kyutai's `LMModel.forward`: the delayed streams, preceded by one frame
# of initial tokens, go through the temporal transformer (position t sees frames < t), and the
# depformer is teacher-forced on the delayed tokens of position t. Outputs are undelayed so that
# `logits[:, c, t]` predicts `codes[:, 1 + c, t]` and `text_logits[:, 0, t]` predicts `codes[:, 0, t]`.

def forward(params, cfg: LMConfig, codes, *, layer_hook: Callable | None = None, remat: bool = False,
            attention: str = "xla"):
    """codes [B, 1 + n_q, T] int -> dict of
        logits      [B, dep_q, T, card]      (compute dtype; 0 where `mask` is False, Kyutai has NaN)
        mask        [B, dep_q, T] bool       (False past a delay, or where the target code is -1)
        text_logits [B, 1, T, text_card]
        text_mask   [B, 1, T] bool
    layer_hook / remat go to both transformers (the hook sees one layer's weights, inside the
    scan; depformer layers arrive with their per-step weights already selected, [dep_q, out, in]).
    attention ("xla" | "flash") applies to the temporal transformer only.
    """
    B, K, T = codes.shape
    if K != cfg.num_streams:
        raise ValueError(f"moshi.forward: codes have {K} streams, the config has 1 + n_q = {cfg.num_streams}")
    codes = codes.astype(jnp.int32)
    initial = jnp.asarray(cfg.initial_tokens())
    inputs = delay(codes, [d + 1 for d in cfg.delays], initial)                  # step t reads frame t - 1
    _, _, h, text_logits = temporal(params, cfg, embed_frames(params, cfg, inputs), attention=attention,
                                    layer_hook=layer_hook, remat=remat)
    text_logits, text_mask = undelay(text_logits[:, None], cfg.delays[:1], codes[:, :1])
    out = {"text_logits": text_logits, "text_mask": text_mask}
    if cfg.dep_q:
        dep_tokens = jnp.moveaxis(delay(codes, cfg.delays, initial)[:, :cfg.dep_q], 1, 2)   # [B, T, dep_q]
        logits = depformer.forward(params["depformer"], cfg.depformer, h, dep_tokens,
                                   layer_hook=layer_hook, remat=remat)           # [B, T, dep_q, card]
        out["logits"], out["mask"] = undelay(jnp.moveaxis(logits, 2, 1), cfg.delays[1:1 + cfg.dep_q],
                                             codes[:, 1:1 + cfg.dep_q])
    else:
        out.update(logits=jnp.zeros((B, 0, T, cfg.card), h.dtype), mask=jnp.zeros((B, 0, T), bool))
    return out


# ----------------------------------------------------------------------------------------------
# Streaming generation. One call = one frame of 80 ms, fixed shapes, one jitted function.
#
# The state keeps the temporal KV cache (a ring over `context` frames: constant memory) and a small
# ring of *delayed* tokens, `tokens` [B, 1 + n_q, max_delay + 3], slot p % size for delayed position
# p, with a `provided` mask beside it. Call n (n = state["step"]):
#   1. writes what it is given -- user codes, and any forced text / Moshi codes -- for stream k at
#      position n + lookahead + delays[k], and marks them provided;
#   2. runs the temporal transformer on position n (initial tokens where n <= delays[k]);
#   3. chooses position n + 1: the text token, then the depformer's dep_q codebooks, each sampled
#      unless provided, in which case the provided token is kept and also conditions the next
#      codebook (teacher forcing);
#   4. returns frame n - max_delay, undelayed: [B, 1 + dep_q] = text + Moshi's audio; -1 while
#      n < max_delay (Kyutai's LMGen returns None then).
#
# lookahead = 0 is Kyutai's LMGen exactly: what call n is given is frame n - 1 (the frame given
# to call 0 is never seen), and a frame's tokens reach the transformer in the call they are given.
# lookahead = 1 is PersonaPlex's LMGen: call n is given frame n, whose delay-0 tokens are the
# targets of this very call, so they can teacher-force the depformer; the transformer reads them
# one call later. Like PersonaPlex it also teacher-forces initial tokens where a delay leaves the
# target empty (Kyutai samples those and throws them away; with PersonaPlex's delays, where user
# codebook 0 follows a delayed one, that changes what is sampled for it in the first frame).
# PersonaPlex's first `step` call only seeds its cache (its frame is dropped), so our call n does
# the work of its call n + 1, fed the frame that call n + 1 is fed.

def generation_params(params):
    """The same weights laid out for gen_step: every layer stack (temporal and depformer) becomes a
    list of layers, which a step reads in place instead of slicing out of the stack (see helium's
    note on layouts; about 3x faster per frame on CPU). gen_step takes either layout."""
    out = dict(params, transformer=helium.unstack_layers(params["transformer"]))
    if "ttt" in params:
        out["ttt"] = helium.unstack_layers(params["ttt"])
    if "transformer" in params.get("depformer", {}):
        layers = helium.unstack_layers(params["depformer"]["transformer"])
        out["depformer"] = dict(params["depformer"], transformer=layers)
    return out


def is_int8_matrix(path) -> bool:
    """Whether params[path] (its keys from the top, list indices included) is one of the matrices
    quantize_int8 makes int8: the temporal and depth transformers' attention and MLP weights, the text
    head, the depformer's input projections and heads (not embedding tables, norms, or TTT's conv and P)."""
    names = [k for k in path if isinstance(k, str)]
    in_layer = names[:1] == ["transformer"] or names[:2] == ["depformer", "transformer"]
    return (in_layer and len(names) > 2 and names[-2] in ("attn", "mlp")) or \
        names in (["text_linear"], ["depformer", "input_proj"], ["depformer", "linears"])


def quantize_int8(params, path=()):
    """The same model with int8 weights for generation (sample.py --quantize int8): every matrix
    is_int8_matrix names becomes helium.quantize_int8's (weights int8 already are kept). Runs where the
    params are (sample.py: on the host, then places the result). Stacked or listed layers alike."""
    if isinstance(params, dict):
        return {k: quantize_int8(v, path + (k,)) for k, v in params.items()}
    if isinstance(params, list):
        return [quantize_int8(v, path + (i,)) for i, v in enumerate(params)]
    return helium.quantize_int8(params) if is_int8_matrix(path) else params


def init_gen_state(params, cfg: LMConfig, batch_size: int, lookahead: int = 0):
    if cfg.context is None:
        raise ValueError("moshi.init_gen_state: streaming needs a finite `context` (the KV ring size)")
    if lookahead not in (0, 1):
        raise ValueError(f"moshi.init_gen_state: lookahead must be 0 (Kyutai) or 1 (PersonaPlex), "
                         f"got {lookahead}")
    dtype = params["text_emb"].dtype
    shape = (batch_size, cfg.num_streams, cfg.max_delay + 3)
    stacked = not isinstance(params["transformer"], list)
    state = {"kv": helium.init_cache(cfg.temporal, batch_size, dtype, stacked=stacked),
             "tokens": jnp.full(shape, UNGENERATED, jnp.int32), "provided": jnp.zeros(shape, bool),
             "step": jnp.zeros((), jnp.int32), "lookahead": jnp.asarray(lookahead, jnp.int32)}
    if cfg.ttt is not None:          # per row: S (fp32 D x Hd) and the unfinished chunk, per TTT layer
        state["ttt"] = [ttt.init_state(batch_size, cfg.dim, cfg.temporal.gating_hidden,
                                       chunk_size=cfg.ttt.chunk_size, kernel_size=cfg.ttt.kernel_size,
                                       dtype=dtype) for _ in cfg.ttt.layers]
    return state


def _user_codebooks_read(cfg: LMConfig, n_user: int) -> int:
    """How many of n_user given user codebooks the model reads: a model with input-only streams
    the first n_q - dep_q (Kyutai's LMGen drops any more), one without them all (PersonaPlex; with
    Kyutai's lookahead _write_given then masks them out, as LMGen reads none)."""
    return cfg.n_q - cfg.dep_q if cfg.n_q > cfg.dep_q else n_user


def _write_given(state, cfg: LMConfig, delays, user_codes, text, moshi_codes):
    """Step 1: user codes land on the last n_user audio streams (as given; on streams the model also
    generates, only with PersonaPlex's lookahead: Kyutai's LMGen drops them); forced text and Moshi
    codes (entries != -2) on stream 0 and streams 1..M; each at its delayed position (delays:
    cfg.delays as an int32 array)."""
    tokens, provided = state["tokens"], state["provided"]
    groups = []
    if user_codes is not None and user_codes.shape[1]:
        n_user = _user_codebooks_read(cfg, user_codes.shape[1])
        values = user_codes[:, :n_user, 0]
        read = jnp.logical_or(cfg.n_q > cfg.dep_q, state["lookahead"] == 1)
        groups.append((np.arange(1 + cfg.n_q)[-n_user:], values, jnp.broadcast_to(read, values.shape)))
    if text is not None:
        groups.append((np.arange(1), text[:, None], text[:, None] != UNGENERATED))
    if moshi_codes is not None:
        groups.append((np.arange(1, 1 + moshi_codes.shape[1]), moshi_codes, moshi_codes != UNGENERATED))
    for streams, values, mask in groups:                     # values, mask [B, S] for streams [S]
        values = values.astype(jnp.int32)
        slots = (state["step"] + state["lookahead"] + delays[streams]) % tokens.shape[-1]
        tokens = tokens.at[:, streams, slots].set(jnp.where(mask, values, tokens[:, streams, slots]))
        provided = provided.at[:, streams, slots].set(provided[:, streams, slots] | mask)
    return tokens, provided


def _check_gen_inputs(cfg: LMConfig, state, user_codes, text, moshi_codes, embedding):
    B = state["tokens"].shape[0]
    n_user = 0 if user_codes is None else user_codes.shape[1]
    n_moshi = 0 if moshi_codes is None else moshi_codes.shape[1]
    if user_codes is not None and user_codes.shape != (B, n_user, 1):
        raise ValueError(f"gen_step: user_codes must be [B={B}, n_user, 1], got {user_codes.shape}")
    if not cfg.n_q - cfg.dep_q <= n_user <= cfg.n_q:
        raise ValueError(f"gen_step: {n_user} user codebooks given; this model reads {cfg.n_q - cfg.dep_q} "
                         f"input-only streams and has n_q={cfg.n_q} audio streams in all")
    n_user = _user_codebooks_read(cfg, n_user)
    if n_moshi > cfg.dep_q or n_moshi + n_user > cfg.n_q:
        raise ValueError(f"gen_step: moshi_codes has {n_moshi} codebooks; at most dep_q={cfg.dep_q} "
                         f"and not overlapping the {n_user} user codebooks")
    if text is not None and text.shape != (B,):
        raise ValueError(f"gen_step: text must be [B={B}], got {text.shape}")
    if embedding is not None and embedding.shape != (B, cfg.dim):
        raise ValueError(f"gen_step: embedding must be [B={B}, dim={cfg.dim}], got {embedding.shape}")


@dataclass(frozen=True)
class Sampling:
    """How gen_step picks a token: softmax(logits / temp), keep the top k, draw one; greedy takes the
    argmax. The defaults are Kyutai's LMGen's."""
    greedy: bool = False
    temp: float = 0.8            # audio codebooks
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25

    @property
    def is_greedy(self) -> bool:
        """Every token an argmax: asked for, or both temperatures 0 (or below), as in Kyutai's sampler."""
        return self.greedy or not (self.temp > 0 or self.temp_text > 0)


SEEDS = range(2**32)    # jax.random.key keeps 32 bits of a seed: a larger one would repeat a smaller one


@partial(jax.jit, static_argnames=("cfg", "sampling", "return_logits"), donate_argnames=("state",))
def gen_step(params, cfg: LMConfig, state, user_codes, key, text=None, moshi_codes=None, embedding=None, *,
             sampling: Sampling = Sampling(), return_logits: bool = False):
    """One frame of streaming generation: (state, out) = gen_step(...). `state` is donated (its KV
    cache is updated in place): always continue from the returned one.

    user_codes   int [B, n_user, 1]: the user's Mimi codes, written onto the *last* n_user audio
                 streams. A model with input-only streams reads the first n_q - dep_q given
                 (moshiko: 8 -> streams 9..16) and, as Kyutai's LMGen, drops any more. A model
                 whose depformer also writes those streams (PersonaPlex, dep_q = 16) gets them
                 teacher-forced with PersonaPlex's lookahead, and drops them with Kyutai's (as
                 LMGen does). None or [B, 0, 1] when there are none.
    key          the conversation's PRNG key: call n draws from fold_in(key, n) (text, then one
                 key per codebook), so the same key may be passed to every call.
    text         int [B] or None: force this frame's text token (-2 = sample it).
    moshi_codes  int [B, M] or None: force Moshi's codebooks 1..M (-2 = sample), M <= dep_q.
    embedding    float [B, D] or None: the temporal step's input (in the model's dtype), in place of
                 the summed embeddings of position n's tokens (PersonaPlex's saved voice prompts are
                 replayed this way, as its LMGen.step_embeddings does); what is given above is
                 written all the same.
    sampling     a Sampling (static: changing it recompiles).
    out          int32 [B, 1 + dep_q]: text + audio tokens of frame step - max_delay; -1 before.
    Which frame the inputs belong to depends on the state's lookahead (see init_gen_state).
    return_logits=True also returns {"text_logits" [B, text_card], "audio_logits" [B, dep_q, card]}.
    """
    _check_gen_inputs(cfg, state, user_codes, text, moshi_codes, embedding)
    n, size = state["step"], state["tokens"].shape[-1]
    delays, initial = jnp.asarray(cfg.delays, jnp.int32), jnp.asarray(cfg.initial_tokens())
    G, nxt = 1 + cfg.dep_q, (n + 1) % size       # streams 0..G-1 are this model's; slot of position n + 1
    # 1. what this call is given, at its delayed positions
    tokens, provided = _write_given(state, cfg, delays, user_codes, text, moshi_codes)
    # 2. the temporal step on position n
    here = jnp.where(n <= delays, initial, tokens[:, :, n % size])                            # [B, K]
    x = embed_frames(params, cfg, here[:, :, None]) if embedding is None else embedding[:, None]   # [B, 1, D]
    kv, ttt_states, h, text_logits = temporal(params, cfg, x.astype(params["text_emb"].dtype), n, state["kv"],
                                              state.get("ttt"))
    h, text_logits = h[:, 0], text_logits[:, 0]
    # 3. position n + 1: the text token, then the depformer's codebooks; a given token wins over
    # the sampled one and conditions the next codebook (the sampled ones are what logits report)
    target, given = tokens[:, :, nxt], provided[:, :, nxt]                                   # [B, K]
    at_start = (n + 1 <= delays) & (state["lookahead"] == 1)     # PersonaPlex forces initial tokens there
    target, given = jnp.where(at_start, initial, target), given | at_start
    text_key, audio_key = jax.random.split(jax.random.fold_in(key, n))
    sample = partial(depformer.sample_token, greedy=sampling.greedy)
    chosen = [jnp.where(given[:, 0], target[:, 0], sample(text_logits, text_key, sampling.temp_text,
                                                            sampling.top_k_text))[:, None]]
    logits = {"text_logits": text_logits}
    if cfg.dep_q:
        audio, logits["audio_logits"] = depformer.generate(
            params["depformer"], cfg.depformer, h, chosen[0][:, 0], audio_key,
            partial(sample, temp=sampling.temp, top_k=sampling.top_k), target[:, 1:G], given[:, 1:G])
        chosen.append(jnp.where(given[:, 1:G], target[:, 1:G], audio))
    tokens = tokens.at[:, :G, nxt].set(jnp.concatenate(chosen, axis=1))
    provided = provided.at[:, :, n % size].set(False)           # slot n is done; it will hold n + size
    # 4. frame n - max_delay, read back from its delayed positions
    positions = n + 1 - cfg.max_delay + delays[:G]
    out = tokens[:, np.arange(G), positions % size]                                       # [B, G]
    out = jnp.where(n < cfg.max_delay, depformer.ZERO_TOKEN, out)
    state = dict(state, kv=kv, tokens=tokens, provided=provided, step=n + 1)
    if ttt_states is not None:
        state["ttt"] = ttt_states
    return (state, out, logits) if return_logits else (state, out)


# ----------------------------------------------------------------------------------------------
# Demo: a tiny random Moshi. Generation forced to follow a token sequence (PersonaPlex's lookahead,
# so the depformer is teacher-forced too) must reproduce the training forward's logits.

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Runs a tiny random-weight demo.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=[k for k in PRESETS if k.startswith("tiny")])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    params = init(jax.random.key(args.seed), cfg)
    B, T = 2, args.frames
    codes = jax.random.randint(jax.random.key(1), (B, cfg.num_streams, T), 0, cfg.card)
    codes = codes.at[:, 0].set(codes[:, 0] % cfg.text_card)
    out = jax.jit(lambda p, c: forward(p, cfg, c))(params, codes)
    # The check streams through Kyutai's KV ring: NVIDIA's (the PersonaPlex presets) sees one key less
    # once a ring is full, so it departs from the whole-sequence forward by design (helium.ring_positions).
    check = dataclasses.replace(cfg, kv_ring="kyutai")
    state = init_gen_state(params, check, B, lookahead=1)
    n_user, key, errs = cfg.n_q - cfg.dep_q or 8, jax.random.key(2), []
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))       # noqa: E731
    for n in range(T):
        frame = codes[:, :, n]
        state, _, logits = gen_step(params, check, state, frame[:, -n_user:, None], key, text=frame[:, 0],
                                    moshi_codes=frame[:, 1:1 + cfg.n_q - n_user], return_logits=True)
        errs.append(rel(logits["text_logits"], out["text_logits"][:, 0, n]))
        errs += [rel(logits["audio_logits"][:, c], out["logits"][:, c, n - cfg.delays[1 + c]])
                 for c in range(cfg.dep_q) if n >= cfg.delays[1 + c]]
    print(f"{args.preset}: {cfg.num_streams} streams, {T} frames, batch {B}: training forward vs forced "
          f"streaming generation, max rel. error of text and audio logits {max(errs, default=0.0):.2e}")


if __name__ == "__main__":
    main()
