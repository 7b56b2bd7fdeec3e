"""ttt.py: In-Place Test-Time Training, a fast-weight MLP for Moshi's temporal transformer.

In-Place TTT (Feng et al., ByteDance Seed, arXiv 2604.06169) turns the down projection of a few MLPs
into a memory that keeps learning while the model runs. A TTT layer's MLP is helium's SiLU-gated
MLP; what changes is that its `linear_out` W_down is rewritten after every chunk of C frames:

    H    = silu(x W_gateᵀ) ⊙ (x W_upᵀ)                 # [T, Hd] the MLP's hidden rows
    V̂_i  = DWConv(T0_i) @ P                            # [C, D]  per chunk, zero-padded at chunk edges
    ΔW_i = V̂_iᵀ H_i                                    # [D, Hd] a plain sum over the chunk, no 1/C
    O_i  = H_i (W_down + η Σ_{j<i} ΔW_j)ᵀ               # chunk i only uses the chunks before it

T0 is the "target source": the layer's own MLP input x, or the summed input token embeddings. The
conv looks up to K//2 frames ahead, which is why a chunk never applies its own ΔW. Nothing else is
in the rule: no normalisation, no decay, η is one fixed float.

This file holds that rule in the order it is computed:

    config -> the MLP's hidden rows -> the targets V̂ -> the parallel form (training)
           -> the streaming form (generation, one frame at a time) -> init -> a self-check

It imports only helium (for `linear`). Both forms take the weights in helium's layout: `w_in`
[2Hd, D] packs gate rows then up rows, `w_out` [D, Hd]; `conv` [D, K] is torch's depthwise Conv1d
weight [D, 1, K] squeezed, `proj` [D, D] is right-multiplied as stored (the official einsum
'c d, d e'), not applied as a Linear (x Pᵀ). Run `python ttt.py` for a parallel-vs-streaming check
on random weights.

Reference: ByteDance-Seed/In-Place-TTT, `hf_models/hf_qwen3/modeling_qwen3.py` (Qwen3MLP, the
training rule) and `inference_model/hf_qwen3/modeling_qwen3.py` (the streaming rule).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import helium

HIGHEST = jax.lax.Precision.HIGHEST     # fp32 x fp32 products stay fp32 (no bf16/TF32 passes on TPU/GPU)


# ----------------------------------------------------------------------------------------------
# Config. Which of the temporal transformer's layers carry TTT, and the rule's constants.

def every_kth_layer(k: int, start: int, num_layers: int) -> tuple[int, ...]:
    """Layers start, start + k, ... below num_layers: `every_kth_layer(6, 5, 32)` = (5, 11, 17, 23, 29)."""
    if k < 1 or not 0 <= start < num_layers:
        raise ValueError(f"every_kth_layer: need k >= 1 and 0 <= start < num_layers, "
                         f"got k={k}, start={start}, num_layers={num_layers}")
    return tuple(range(start, num_layers, k))


TARGETS = ("hidden", "embed")


@dataclass(frozen=True)
class TTTConfig:
    # Moshi 7B: every 6th of its 32 layers from layer 5 (as the one known Moshi TTT fork), so the
    # last layers stay plain; the official Qwen3 recipe is every 6th from layer 0.
    layers: tuple[int, ...] = every_kth_layer(6, 5, 32)
    chunk_size: int = 256                # frames per chunk: 20.5 s at 12.5 Hz
    # η. At init the TTT branch is exactly zero for any η (the conv starts at zero), so η only sets
    # how fast training opens it: η scales conv and P's effect as a product. We keep the official
    # recommended 3 (configs/pretrain/qwen3_longct.yaml), tuned on Qwen3-8B, whose MLP (4096 x 12288)
    # is nearly Moshi 7B's (4096 x 11264). Since ΔW is a sum over positions, a frame's TTT term is η
    # times a sum over all earlier frames' terms whatever C is, so the smaller chunk does not call for
    # rescaling η. The config class's 0.3 is the untuned default; the fork's 1e-3 would leave the
    # branch ~3000x weaker for the same conv, i.e. near a no-op in a short finetune.
    lr: float = 3.0
    target: str = "hidden"               # hidden: the layer's own MLP input | embed: summed token embeddings
    kernel_size: int = 5                 # conv taps at offsets -K//2 .. K-1-K//2 (5: -2..2, the official,
    #                                      which runs odd K only; an even K reaches one frame further back)
    use_proj: bool = True                # learn P (D x D) after the conv; False: V̂ = the conv output

    def __post_init__(self):
        # A list (from JSON, say) becomes a tuple: the config must be hashable to be static under jit.
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        _check(isinstance(self.layers, tuple) and all(_is_int(i, 0) for i in self.layers),
               "layers", self.layers, "a tuple of layer indices >= 0")
        _check(list(self.layers) == sorted(set(self.layers)), "layers", self.layers,
               "increasing, without repeats")
        _check(_is_int(self.chunk_size, 1), "chunk_size", self.chunk_size, "an int >= 1")
        _check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
               and math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a finite float > 0")
        _check(self.target in TARGETS, "target", self.target, " or ".join(map(repr, TARGETS)))
        _check(_is_int(self.kernel_size, 1), "kernel_size", self.kernel_size, "an int >= 1")
        _check(isinstance(self.use_proj, bool), "use_proj", self.use_proj, "True or False")

    def check_num_layers(self, num_layers: int):
        """Raise if a TTT layer index is past the transformer's last layer."""
        if self.layers and self.layers[-1] >= num_layers:
            raise ValueError(f"TTT config: layers={self.layers} names layer {self.layers[-1]}, but the "
                             f"transformer has {num_layers} layers (0..{num_layers - 1})")


def _is_int(v, least: int) -> bool:
    """v is an int (not a bool) >= least."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least


def _check(ok: bool, field: str, value, expected: str):
    if not ok:
        raise ValueError(f"TTT config: {field}={value!r} is invalid (expected {expected})")


# For tests and demos on tiny models (moshi.TINY has 2 layers): TTT on the last one, 4-frame chunks.
TINY = TTTConfig(layers=(1,), chunk_size=4)


# ----------------------------------------------------------------------------------------------
# The MLP's hidden rows, exactly as helium.mlp computes them (so the TTT layer at ΔW = 0 is
# bit for bit the plain MLP).

def hidden_rows(x, w_in):
    # x [B, T, D], w_in [2Hd, D] (gate rows, then up rows) -> H [B, T, Hd] in x's dtype
    return helium.gated_hidden(helium.linear(x, w_in))


# ----------------------------------------------------------------------------------------------
# The targets V̂ = DWConv(T0) @ P, computed chunk by chunk. Tap k reads offset k - K//2 (torch's
# cross-correlation with padding K//2, for odd K; for even K the first L of torch's L+1 outputs),
# and every chunk is zero-padded on both sides: the conv never reads across a chunk boundary, so
# a chunk's targets depend on that chunk's frames alone.

def chunk_targets(t_chunks, conv, proj):
    # t_chunks [B, n, C, D], conv [D, K], proj [D, D] or None -> V̂ [B, n, C, D] in t's dtype
    C, K = t_chunks.shape[2], conv.shape[1]
    left = K // 2
    padded = jnp.pad(t_chunks, ((0, 0), (0, 0), (left, K - 1 - left), (0, 0)))   # [B, n, C + K - 1, D]
    w = conv.astype(jnp.float32)
    v = sum(padded[:, :, k:k + C].astype(jnp.float32) * w[:, k] for k in range(K))   # fp32 taps
    v = v.astype(t_chunks.dtype)
    if proj is None:
        return v
    return jnp.einsum("...d,de->...e", v, proj, preferred_element_type=jnp.float32).astype(t_chunks.dtype)


def sequence_targets(t, conv, proj, chunk_size: int):
    # t [B, T, D] -> V̂ [B, T, D]: zero-pad to whole chunks, convolve each chunk, drop the padding
    B, T, D = t.shape
    n = -(-T // chunk_size)
    t_chunks = jnp.pad(t, ((0, 0), (0, n * chunk_size - T), (0, 0))).reshape(B, n, chunk_size, D)
    return chunk_targets(t_chunks, conv, proj).reshape(B, n * chunk_size, D)[:, :T]


# ----------------------------------------------------------------------------------------------
# The parallel form (training, whole windows). Two exact ways to compute it:
#   weight form (the official code): build the n cumulative weights W_down + η Σ_{j<i} ΔW_j
#     [n, D, Hd] and apply each to its chunk. For Moshi 7B (D = 4096, Hd = 11264, C = 256) on a
#     1250-frame window that is 5 x 46M values per row and layer (0.9 GB in fp32, kept again for
#     the backward pass) and 2 T D Hd = 115 G multiply-adds on top of the MLP's 173 G.
#   attention form (ours): O = H W_downᵀ + η ((H Hᵀ) ⊙ M) V̂ with M[p, q] = chunk(q) < chunk(p),
#     because H_p (Σ_q V̂_qᵀ H_q)ᵀ = Σ_q (H_p · H_q) V̂_q. The scores are [T, T]
#     (1250² = 1.6 M values, 6 MB in fp32) and cost T² (Hd + D) = 24 G multiply-adds.
# The attention form wins in memory while T < D Hd / C (180 k frames) and in compute while
# T < 2 D Hd / (D + Hd) (~6000 frames, 8 minutes): all training windows Moshi sees. It is also
# what makes the memory independent of D Hd, which the weight form is not.

def fast_weight_mlp(x, t, w_in, w_out, conv, proj, *, chunk_size: int, lr: float):
    """x, t [B, T, D] (MLP input, target source T0) -> the TTT MLP's output [B, T, D] in x's dtype."""
    _check_inputs(x, t, w_in, w_out, conv, proj, chunk_size)
    h = hidden_rows(x, w_in)                                      # [B, T, Hd]
    base = helium.linear(h, w_out)                                # [B, T, D] the plain MLP
    v = sequence_targets(t, conv, proj, chunk_size)               # [B, T, D]
    scores = jnp.einsum("bph,bqh->bpq", h, h, preferred_element_type=jnp.float32)   # [B, T, T] fp32
    chunk = jnp.arange(x.shape[1]) // chunk_size
    earlier = chunk[None, :] < chunk[:, None]                     # [T, T] M: q's chunk is before p's
    scores = jnp.where(earlier, scores, 0.0)
    fast = jnp.einsum("bpq,bqd->bpd", scores, v.astype(jnp.float32), precision=HIGHEST)   # [B, T, D]
    return (base.astype(jnp.float32) + lr * fast).astype(x.dtype)


def _check_inputs(x, t, w_in, w_out, conv, proj, chunk_size):
    B, T, D = x.shape
    # an int8 weight (helium.quantize_int8's {"int8", "scale"}: sample.py --quantize) has its matrix's shape
    w_in, w_out = (w["int8"] if isinstance(w, dict) else w for w in (w_in, w_out))
    Hd = w_out.shape[-1]
    expect = {"t": (t.shape, (B, T, D)), "w_in": (w_in.shape, (2 * Hd, D)), "w_out": (w_out.shape, (D, Hd)),
              "conv": (conv.shape[:1], (D,))}
    if proj is not None:
        expect["proj"] = (proj.shape, (D, D))
    for name, (got, want) in expect.items():
        if tuple(got) != want:
            raise ValueError(f"ttt: {name} has shape {tuple(got)}, expected {want} (x is {x.shape})")
    if conv.ndim != 2 or not _is_int(chunk_size, 1):
        raise ValueError(f"ttt: need conv [D, K] and an int chunk_size >= 1, got conv {conv.shape}, "
                         f"chunk_size={chunk_size!r}")


# ----------------------------------------------------------------------------------------------
# The streaming form (generation: one frame per call, constant memory). The state per batch row:
#   sum_dw [B, D, Hd] fp32  Σ ΔW of the completed chunks (S); fp32 so that small updates are not
#                           lost in a bf16 weight (the official inference adds ΔW into a bf16 W)
#   h      [B, C, Hd]       the unfinished chunk's hidden rows H
#   t      [B, C, D]        its target rows T0 (the conv needs the chunk's later frames, so V̂ waits)
#   frame  [] int32         frames seen; all rows of a batch advance, and complete chunks, together
# Every frame outputs H W_downᵀ + η H Sᵀ, the second term in fp32 on its own (never folded into a
# bf16 copy of W). The frame that completes a chunk still uses the old S, then commits that chunk's
# ΔW. ΔW is C x D x Hd multiply-adds (11.8 G for Moshi 7B), so it runs under lax.cond only on the
# completing frame: one compiled program whose other frames skip it, instead of a jnp.where that
# would compute it every frame. (Under vmap a cond becomes a select and runs both branches: batch
# rows through the leading axis, not vmap.) The other frames cost the plain MLP plus one D x Hd
# product with S per row. S is per row and fp32: for Moshi 7B 185 MB per row and TTT layer (0.9 GB
# for 5 layers), all read every frame, so a frame's MLP weight traffic grows from 3 bf16 D x Hd
# matrices to 5 at batch 1, and by 2 more per extra row.

def init_state(batch: int, dim: int, hidden: int, *, chunk_size: int, kernel_size: int, dtype=jnp.float32):
    """A fresh conversation: S = 0 and an empty chunk. Call again to reset (per conversation).

    kernel_size is checked but not stored: the conv runs over the whole buffered chunk when it
    completes, so no conv tail is needed. `dtype` is the buffers' (bf16 halves them; fp32 holds a
    bf16 model's rows exactly too); S is always fp32.
    """
    if chunk_size < 1 or kernel_size < 1:
        raise ValueError(f"ttt.init_state: chunk_size={chunk_size} and kernel_size={kernel_size} "
                         "must be >= 1")
    return {"sum_dw": jnp.zeros((batch, dim, hidden), jnp.float32),
            "h": jnp.zeros((batch, chunk_size, hidden), dtype),
            "t": jnp.zeros((batch, chunk_size, dim), dtype),
            "frame": jnp.zeros((), jnp.int32)}


def chunk_delta(h_chunk, t_chunk, conv, proj):
    # h_chunk [B, C, Hd], t_chunk [B, C, D] -> ΔW = V̂ᵀ H [B, D, Hd] in fp32
    v = chunk_targets(t_chunk[:, None], conv, proj)[:, 0]         # [B, C, D]
    return jnp.einsum("bcd,bch->bdh", v, h_chunk, preferred_element_type=jnp.float32)


def fast_weight_mlp_step(state, x, t, w_in, w_out, conv, proj, *, chunk_size: int, lr: float):
    """One frame: x, t [B, 1, D] -> (new state, the TTT MLP's output [B, 1, D] in x's dtype)."""
    _check_inputs(x, t, w_in, w_out, conv, proj, chunk_size)
    if x.shape[1] != 1 or state["h"].shape[1] != chunk_size:
        raise ValueError(f"ttt step: one frame [B, 1, D] per call into a state of chunk {chunk_size}, "
                         f"got x {x.shape} and a state buffer of {state['h'].shape[1]} frames")
    h = hidden_rows(x, w_in)                                      # [B, 1, Hd]
    base = helium.linear(h, w_out)                                # [B, 1, D] the plain MLP
    fast = jnp.einsum("bth,bdh->btd", h.astype(jnp.float32), state["sum_dw"], precision=HIGHEST)
    y = (base.astype(jnp.float32) + lr * fast).astype(x.dtype)    # uses the completed chunks only

    slot = state["frame"] % chunk_size
    h_buf = jax.lax.dynamic_update_slice_in_dim(state["h"], h.astype(state["h"].dtype), slot, axis=1)
    t_buf = jax.lax.dynamic_update_slice_in_dim(state["t"], t.astype(state["t"].dtype), slot, axis=1)

    def commit(s):
        return s + chunk_delta(h_buf.astype(h.dtype), t_buf.astype(t.dtype), conv, proj)
    # ΔW is committed only when this frame completes the chunk
    sum_dw = jax.lax.cond(slot == chunk_size - 1, commit, lambda s: s, state["sum_dw"])
    # The buffers need no clearing: the next chunk overwrites every slot before it completes.
    return {"sum_dw": sum_dw, "h": h_buf, "t": t_buf, "frame": state["frame"] + 1}, y


# ----------------------------------------------------------------------------------------------
# In the model. A TTT layer is a helium layer whose MLP is the fast-weight MLP, built from the same
# weights (the MLP's linear_in and linear_out) plus the layer's own conv and P; the attention path
# is untouched. The stack runs each run of plain layers through helium.transformer (scanned or
# listed, as the params are laid out) and each TTT layer on its own between them.

def layer(p, fast, cfg, tcfg: TTTConfig, x, embed, offset, cache=None, state=None):
    """x [B, T, D] -> (cache, state, y). state None: the parallel form over a whole window; else the
    streaming state of one frame. embed [B, T, D]: the summed input embeddings (target "embed")."""
    cache, update = helium.self_attention(p["attn"], cfg, helium.norm(p["norm1"], cfg.norm, x), offset, cache)
    x = helium.residual(p, 1, x, update)
    h = helium.norm(p["norm2"], cfg.norm, x)
    t = h if tcfg.target == "hidden" else embed.astype(h.dtype)
    args = (h, t, p["mlp"]["linear_in"], p["mlp"]["linear_out"], fast["conv"], fast.get("proj"))
    if state is None:
        update = fast_weight_mlp(*args, chunk_size=tcfg.chunk_size, lr=tcfg.lr)
    else:
        state, update = fast_weight_mlp_step(state, *args, chunk_size=tcfg.chunk_size, lr=tcfg.lr)
    return cache, state, helium.residual(p, 2, x, update)


def transformer(layers, fast, cfg, tcfg: TTTConfig, x, offset=0, cache=None, states=None,
                layer_hook=None, remat=False):
    """helium.transformer with TTT on layers tcfg.layers: x [B, T, D] -> (cache, states, y).
    layers and fast (one entry per TTT layer) stacked or listed; cache as helium's; states one
    streaming state per TTT layer, or None for a whole window. x is also the "embed" target."""
    offset, embed = jnp.asarray(offset, jnp.int32), x
    if cfg.positional_embedding == "sin":             # added once here, not again by every run
        x = x + helium.sin_embedding(offset + jnp.arange(x.shape[1]), x.shape[-1], cfg.max_period, x.dtype)
        cfg = dataclasses.replace(cfg, positional_embedding="none")
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    parts, new_states, start = [], [], 0                # parts: the new kv of each run and TTT layer
    for n, i in enumerate(tcfg.layers + (cfg.num_layers,)):
        if i > start:                                 # the plain layers start..i-1
            run = None if kv is None else dict(_take(kv, start, i), offset=offset)
            run, x = helium.transformer(_take(layers, start, i), cfg, x, offset, run, layer_hook, remat)
            parts.append(run)
        if i == cfg.num_layers:
            break
        p = _take(layers, i)
        step = jax.checkpoint(layer, static_argnums=(2, 3)) if remat else layer
        one, state, x = step(layer_hook(p) if layer_hook else p, _take(fast, n), cfg, tcfg, x, embed, offset,
                             None if kv is None else _take(kv, i), None if states is None else states[n])
        parts.append(None if one is None
                     else jax.tree.map(lambda a: [a] if isinstance(cache["k"], list) else a[None], one))
        new_states.append(state)
        start = i + 1
    if cache is not None:
        cache = dict({n: _join([c[n] for c in parts]) for n in kv}, offset=cache["offset"] + x.shape[1])
    return cache, None if states is None else new_states, x


def _take(tree, lo, hi=None):
    """Entries lo..hi-1 of a stack (a list, or stacked leaves; a dict of lists holds one stack per
    key); hi None: entry lo itself."""
    index = lo if hi is None else slice(lo, hi)
    return jax.tree.map(lambda a: a[index], tree, is_leaf=lambda a: isinstance(a, list))


def _join(parts):
    return sum(parts, []) if isinstance(parts[0], list) else jnp.concatenate(parts)


# ----------------------------------------------------------------------------------------------
# Init. Added to a trained model, a TTT layer must start as the plain MLP: the conv starts at zero
# (so V̂ = 0 and ΔW ≡ 0), P at a small diagonal (the official N(0, 0.02²) on the diagonal). With
# the conv at zero, P gets no gradient at step 0 but the conv does (through P ≠ 0); zeroing both
# would leave the branch stuck at zero. The official init applies that diagonal rule to every
# square Linear, which in Moshi would hit the attention projections: here it is P alone.

def init_layer(key, dim: int, cfg: TTTConfig, dtype=jnp.float32):
    """A TTT layer's own parameters: {"conv": [D, K]} and, with cfg.use_proj, {"proj": [D, D]}."""
    p = {"conv": jnp.zeros((dim, cfg.kernel_size), dtype)}
    if cfg.use_proj:
        p["proj"] = jnp.diag(0.02 * jax.random.normal(key, (dim,), jnp.float32)).astype(dtype)
    return p


# ----------------------------------------------------------------------------------------------
# Self-check: random weights (a non-zero conv, so the memory is live), a length that is not a
# multiple of the chunk, the parallel form against the streaming form fed one frame at a time.

def self_check(seed: int = 0, dim: int = 16, hidden: int = 24, frames: int = 11, lr: float = 0.5):
    chunk = TINY.chunk_size
    k = jax.random.split(jax.random.key(seed), 6)
    w_in = helium.dense_init(k[0], (2 * hidden, dim))
    w_out = helium.dense_init(k[1], (dim, hidden))
    conv = 0.3 * jax.random.normal(k[2], (dim, TINY.kernel_size))
    proj = helium.dense_init(k[3], (dim, dim))
    x, t = jax.random.normal(k[4], (2, frames, dim)), jax.random.normal(k[5], (2, frames, dim))
    errors = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        args = [a.astype(dtype) for a in (w_in, w_out, conv, proj)]
        full = fast_weight_mlp(x.astype(dtype), t.astype(dtype), *args, chunk_size=chunk, lr=lr)
        step = jax.jit(lambda s, xi, ti: fast_weight_mlp_step(s, xi, ti, *args, chunk_size=chunk, lr=lr))
        state, ys = init_state(2, dim, hidden, chunk_size=chunk, kernel_size=TINY.kernel_size), []
        for i in range(frames):
            state, y = step(state, x[:, i:i + 1].astype(dtype), t[:, i:i + 1].astype(dtype))
            ys.append(y)
        a, b = np.asarray(jnp.concatenate(ys, 1), np.float64), np.asarray(full, np.float64)
        errors[jnp.dtype(dtype).name] = float(np.abs(a - b).max() / np.abs(b).max())
    return errors


# ----------------------------------------------------------------------------------------------
# Demo: what the memory is for. A tiny Moshi whose attention reaches 8 frames back (2 layers x a
# 5-frame window) must recall, from a query key, the value that followed that key at the start of
# the text stream, many windows earlier: key-value pairs in the first chunk, queries from the third
# on. Trained with train.py's loss and step, with and without TTT on its last layer, same data, seeds
# and budget; recall is then measured on fresh sequences, by distance in attention reaches.

DEMO = dict(layers=2, context=5, chunk=8, frames=80, pairs=4, queries=12, keys=(8, 40), values=(40, 72),
            filler=3)   # filler: PAD
DEMO_REACH = DEMO["layers"] * (DEMO["context"] - 1)       # how many frames back attention reaches


def demo_config(with_ttt: bool):
    import moshi
    d = DEMO
    return moshi.LMConfig(delays=(0, 0), n_q=1, dep_q=0, card=8, text_card=80, dim=64, num_heads=4,
                          num_layers=d["layers"], norm="rms_norm_f32", context=d["context"],
                          positional_embedding="rope", gating="silu",
                          depformer_dim=16, depformer_num_heads=1, depformer_num_layers=1,
                          ttt=TTTConfig(layers=(1,), chunk_size=d["chunk"], lr=1.0) if with_ttt else None)


def demo_batch(rng, batch: int, queries: int):
    """codes [B, 2, T] (text, one silent audio stream), and per query (row, value frame, distance back
    to its pair). Each pair is asked for queries / pairs times; asked once, the nearest earlier copy of
    the key is its pair, many reaches back (repeats, for training, may sit within reach of each other).
    PAD fills the rest; train.py's loss, with text_padding_weight 0, does not count it."""
    d, T = DEMO, DEMO["frames"]
    text = np.full((batch, T), d["filler"], np.int32)
    found = []
    for b in range(batch):
        keys = rng.choice(np.arange(*d["keys"]), d["pairs"], replace=False)
        values = rng.integers(*d["values"], d["pairs"])
        text[b, 0:2 * d["pairs"]:2], text[b, 1:2 * d["pairs"]:2] = keys, values
        # which pair each query asks for
        asked = rng.permutation(np.resize(np.arange(d["pairs"]), queries))
        for q, i in zip(rng.choice(np.arange(2 * d["chunk"], T - 1, 2), queries, replace=False), asked):
            text[b, q], text[b, q + 1] = keys[i], values[i]
            found.append((b, q + 1, q + 1 - (2 * i + 1)))
    return np.stack([text, np.full((batch, T), -1, np.int32)], axis=1), found


def demo_train(with_ttt: bool, steps: int, seed: int = 0):
    """The model trained on the task by train.py's step (its loss, AdamW, one device) -> its params."""
    import moshi
    import train
    cfg = demo_config(with_ttt)
    h = train.Hyper(lr=3e-3, pct_start=min(10 / steps, 1.0), max_steps=steps, weight_decay=0.0,
                    text_padding_weight=0.0, compute_dtype="float32", remat=False)
    mesh, rng = train.make_mesh(1, 1), np.random.default_rng(seed)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        state, frozen = train.initial_state(plan, mesh, h, moshi.init(jax.random.key(seed), cfg))
        sharding = jax.sharding.NamedSharding(mesh, train.BATCH_SPEC)
        for _ in range(steps):
            batch = demo_batch(rng, 16, DEMO["queries"])[0][None]                # [1, 16, 2, T]
            state, _ = plan.step(state, frozen, jax.device_put(batch, sharding))
    return cfg, jax.device_get(state["params"])


def demo_recall(cfg, params, seed: int = 123, batch: int = 256):
    """Recall of the values, by distance from the query back to its pair (in attention reaches), each
    pair asked for once -> ({bin: (recall, queries)}, recall over all)."""
    import moshi
    codes, queries = demo_batch(np.random.default_rng(seed), batch, DEMO["pairs"])
    logits = jax.jit(lambda p, c: moshi.forward(p, cfg, c)["text_logits"])(params, codes)
    predicted = np.asarray(jnp.argmax(logits[:, 0], -1))
    bins = {"1-2": (1, 2), "2-4": (2, 4), "4+": (4, np.inf)}               # in reaches of attention
    hits = {name: [predicted[b, t] == codes[b, 0, t] for b, t, dist in queries
                   if lo <= dist / DEMO_REACH < hi] for name, (lo, hi) in bins.items()}
    return ({name: (float(np.mean(h)), len(h)) for name, h in hits.items()},
            float(np.mean([h for v in hits.values() for h in v])))


def demo(steps: int = 1000):
    print(f"key-value recall, {DEMO['frames']} frames: pairs in frames 0-{2 * DEMO['pairs'] - 1}, queries "
          f"from frame {2 * DEMO['chunk']}; attention reaches {DEMO_REACH} frames; TTT chunk "
          f"{DEMO['chunk']}; chance {1 / (DEMO['values'][1] - DEMO['values'][0]):.2f}; {steps} train.py "
          "steps of 16 sequences each")
    total = {}
    for with_ttt in (True, False):
        by_distance, total[with_ttt] = demo_recall(*demo_train(with_ttt, steps))
        print(f"  {'ttt' if with_ttt else 'no-ttt':>6}: " + ", ".join(
            f"{name} reaches back {v:.2f} ({n} queries)" for name, (v, n) in by_distance.items()))
    print(f"recall beyond the window: ttt {total[True]:.2f}, no-ttt {total[False]:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Runs a self-check.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", action="store_true", help="train a tiny Moshi with and without TTT on a recall "
                    "task beyond its attention window (about a minute on 2 CPU cores)")
    ap.add_argument("--steps", type=int, default=1000, help="--demo: training steps per model")
    args = ap.parse_args(argv)
    if args.demo:
        return demo(args.steps)
    errors = self_check(args.seed)
    print("parallel form vs streaming form (one frame at a time), 2 rows of 11 frames, chunk 4, kernel 5, "
          "with P:\n" + "\n".join(f"  {name}: max rel. error {err:.2e}" for name, err in errors.items()))


if __name__ == "__main__":
    main()
