"""helium.py: the transformer every part of Moshi is built from.

Kyutai uses one streaming transformer for three jobs: Mimi's two 8-layer codec transformers
(LayerNorm, GELU MLP, layer scale, 250-step sliding window), Moshi's 32-layer temporal transformer
"Helium" (RMSNorm, SiLU-gated MLP, 3000-step window) and the 6-layer depth transformer (one set of
weights per codebook step). This file is that transformer in pure JAX, in the order a token meets it:

    norms -> RoPE -> attention (+ ring KV cache) -> MLPs -> one layer -> the layer stack (lax.scan)

It imports no other project file, so it can be copied alone (flash.py, the Pallas kernels, is used
only when a config asks for attention="flash"). Params are nested dicts of arrays with the layers
stacked on a leading axis, or listed; weights keep PyTorch's (out, in) layout so the checkpoint
conversion is a rename. Every streaming function returns `(state, out)`. Run `python helium.py`
for a tiny LM: batch forward, then token-by-token streaming through the KV cache, checked against
each other.

Reference: kyutai-labs/moshi `moshi/modules/transformer.py`, `rope.py`, `gating.py` (moshi 0.2.13);
NVIDIA/personaplex `moshi/modules/transformer.py` for its older ring KV cache (kv_ring="personaplex").
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


SUPPORTED = {"norm": ("rms_norm_f32", "rms_norm", "layer_norm"), "gating": ("silu", "none"),
             "positional_embedding": ("rope", "sin", "none"), "attention": ("xla", "flash", "cudnn"),
             "kv_ring": ("kyutai", "personaplex")}


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int                  # GELU MLP width; the gated MLP derives its own (see gating_hidden)
    causal: bool = True
    context: int | None = None            # sliding window: a query sees keys with 0 <= q - k < context
    norm: str = "rms_norm_f32"            # rms_norm_f32 | rms_norm | layer_norm
    gating: str = "silu"                  # silu (gated MLP) | none (plain GELU MLP)
    positional_embedding: str = "rope"    # rope (interleaved) | sin | none
    max_period: float = 10_000.0
    layer_scale: float | None = None      # LayerScale init value; None = no layer scale
    weights_per_step: int = 0             # >0: step t of a sequence uses its own projections (depformer)
    weights_per_step_schedule: tuple[int, ...] | None = None   # step t uses weights schedule[t]
    attention: str = "xla"                # xla | flash | cudnn: see self_attention
    kv_ring: str = "kyutai"               # kyutai | personaplex: whose streaming KV ring, see ring_positions

    def __post_init__(self):
        # Kyutai's transformer has more options (other gatings, norms, RoPE layouts); no released
        # model uses them, so they are refused by name rather than carried untested.
        for name, allowed in SUPPORTED.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"transformer config: {name}={getattr(self, name)!r} is not supported "
                                 f"(only {', '.join(allowed)}: what the released models use)")
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"transformer config: d_model={self.d_model} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"transformer config: context={self.context} must be at least 1 (or none)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def gating_hidden(self) -> int:
        # Kyutai's ActivationGating keeps the parameter count of a 4x MLP: 2/3 of the width.
        if self.dim_feedforward == 4 * self.d_model:
            return (21 * self.d_model) // 8
        return (2 * self.dim_feedforward) // 3

    @property
    def num_weight_sets(self) -> int:
        """How many copies of the attention/MLP weights each layer holds (1 unless weights_per_step)."""
        if not self.weights_per_step:
            return 1
        if self.weights_per_step_schedule is not None:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    def cache_capacity(self) -> int:
        """Ring KV cache size, as Kyutai sizes it: the context, or one slot per weight step."""
        if self.context is not None:
            return self.context
        if self.weights_per_step:
            return self.weights_per_step
        raise ValueError("a streaming KV cache needs `context` or `weights_per_step` to size it")


# ----------------------------------------------------------------------------------------------
# Linear layers. A weight is (out, in) as in PyTorch. A weight with a leading time axis
# (T, out, in) applies a different matrix at each time step: that is how the depformer gives every
# codebook its own projections while attending across codebooks.
# A weight may also be int8, {"int8": [..., out, in], "scale": [..., out]} (quantize_int8): the
# matmul reads the int8 matrix, converted to the activations' dtype inside the dot, and scales its
# fp32 output per output channel, so a step reads half the bytes of a bf16 weight.

def linear(x, w):
    if isinstance(w, dict):
        y = linear(x, w["int8"].astype(x.dtype))                     # exact: |int8| <= 127 fits bf16
        return (y.astype(jnp.float32) * w["scale"].astype(jnp.float32)).astype(x.dtype)
    if w.ndim == 3:                                              # per-step weights [T, out, in]
        return jnp.einsum("bti,toi->bto", x, w)
    return jnp.einsum("...i,oi->...o", x, w)


def quantize_int8(w) -> dict:
    """[..., out, in] -> symmetric int8 per output channel: w ~ int8 * scale[..., None], where
    scale = max |row| / 127. Computed where w lives (sample.py quantizes on the host, under
    jax.default_device(cpu), so the bf16 weights never reach the accelerator)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.abs(w).max(axis=-1) / 127.0                                  # [..., out]
    q = jnp.round(w / jnp.where(scale == 0, 1.0, scale)[..., None])
    return {"int8": q.astype(jnp.int8), "scale": scale}


# ----------------------------------------------------------------------------------------------
# Norms. Moshi's LM uses RMSNorm computed in fp32 with eps 1e-8 *added after* the mean; Mimi uses
# torch's LayerNorm (eps 1e-5). The dtypes follow torch's: plain "rms_norm" is a chain of ops, each
# rounded to the input's dtype; torch's LayerNorm kernel computes in fp32 for a bf16 input and
# rounds once at the end, and so does ours.

def rms_norm(x, alpha, eps: float, fp32: bool):
    xf = x.astype(jnp.float32) if fp32 else x
    var = eps + jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * (alpha.astype(var.dtype) * jax.lax.rsqrt(var))).astype(x.dtype)


def layer_norm(x, weight, bias, eps: float):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(p, kind: str, x):
    if kind == "rms_norm_f32":
        return rms_norm(x, p["alpha"], 1e-8, fp32=True)
    if kind == "rms_norm":
        return rms_norm(x, p["alpha"], 1e-5, fp32=False)
    return layer_norm(x, p["weight"], p["bias"], 1e-5)


def init_norm(kind: str, dim: int, dtype=jnp.float32):
    if kind.startswith("rms_norm"):
        return {"alpha": jnp.ones((dim,), dtype)}
    return {"weight": jnp.ones((dim,), dtype), "bias": jnp.zeros((dim,), dtype)}


# ----------------------------------------------------------------------------------------------
# Positions. RoPE rotates pairs of q/k channels by an angle that grows with the position; Kyutai's
# "rope" pairs channels (2i, 2i+1) ("interleaved"). Angles are computed in fp32 whatever the model
# dtype, exactly as the reference does.

def rope_angles(positions, head_dim: int, max_period: float):
    # positions [T] (int) -> cos, sin [T, Dh/2] in fp32
    ds = jnp.arange(head_dim // 2, dtype=jnp.float32)
    freqs = jnp.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * freqs
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    # x [B, H, T, Dh]; cos, sin [T, Dh/2]
    pairs = x.reshape(*x.shape[:-1], -1, 2).astype(jnp.float32)                 # [B, H, T, Dh/2, 2]
    xr, xi = pairs[..., 0], pairs[..., 1]
    out_r = (xr * cos - xi * sin).astype(x.dtype)
    out_i = (xr * sin + xi * cos).astype(x.dtype)
    return jnp.stack([out_r, out_i], axis=-1).reshape(x.shape)


def sin_embedding(positions, dim: int, max_period: float, dtype):
    # Additive sinusoidal embedding [T, dim]; note the (half - 1) in the exponent, as in the reference.
    half = dim // 2
    pos = positions.astype(dtype)[:, None]
    adim = jnp.arange(half, dtype=dtype)
    phase = pos / (jnp.asarray(max_period, dtype) ** (adim / (half - 1)))
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Attention. One packed projection gives q | k | v (each head-major). In streaming mode the keys and
# values go into a ring buffer of `capacity` slots: position p lives in slot p % capacity, so memory
# stays constant however long the stream. Which absolute position each slot holds is recomputed
# from the offset (the same arithmetic as Kyutai's RingKVCache), and the mask is then the plain
# causal sliding-window rule on absolute positions.

def attention_mask(pos_q, pos_k, causal: bool, context: int | None):
    # pos_q [T], pos_k [S] (-1 = empty slot) -> bool [T, S], True = may attend
    if not causal:      # Kyutai masks nothing then: a stream also attends to its empty (zero) slots
        return jnp.ones((pos_q.shape[0], pos_k.shape[0]), bool)
    delta = pos_q[:, None] - pos_k[None, :]
    allowed = (pos_k[None, :] >= 0) & (delta >= 0)
    if context is not None:
        allowed = allowed & (delta < context)
    return allowed


def dot_product_attention(q, k, v, mask):
    # q [B, H, T, Dh], k/v [B, H, S, Dh], mask [T, S] -> [B, H, T, Dh]
    # Scores and softmax in fp32. As in FlashAttention (and torch's CPU kernel), the *unnormalised*
    # weights meet v in v's dtype and the fp32 sum divides at the end: in bf16 this rounding order
    # is what keeps greedy tokens equal to Kyutai's (normalising first flips a few tokens). A row
    # with no visible key (a streaming call of more steps than the ring holds overwrites its own
    # first keys) gives 0, as torch's scaled_dot_product_attention does, not NaN.
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(top > -jnp.inf, top, 0.0))              # unnormalised, fp32
    out = jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    total = jnp.sum(weights, axis=-1)[..., None]
    return (out / jnp.where(total > 0, total, 1.0)).astype(v.dtype)


# Two rings, because two official codebases disagree once the ring is full, and each model must
# match its own: Kyutai's moshi 0.2.13 gives every slot the position it holds, so a step fed alone
# with capacity C sees C keys (itself and C - 1 before). NVIDIA's PersonaPlex fork keeps the older
# RingKVCache, which advances its end offset *before* computing positions: the slot after the
# newest one (the oldest key, once the ring is full) is labelled end_offset, a future position, and
# is masked, so the same step sees C - 1 keys. Before the ring fills that slot is empty either way.
# The depformer's cache (dep_q slots, refilled every frame) meets it too: under NVIDIA's ring its
# last codebook does not see its first.

def ring_positions(offset, T: int, capacity: int, kv_ring: str):
    """Absolute position held by each cache slot after writing T steps at `offset`; -1 if empty or
    (kv_ring="personaplex") hidden as NVIDIA's ring hides it."""
    last = offset + T - 1
    slots = jnp.arange(capacity)
    delta = slots - last % capacity
    pos = jnp.where(delta <= 0, last + delta, last + delta - capacity)
    if kv_ring == "personaplex":
        if capacity < 2:                     # NVIDIA's ring would hide the newest key: nothing to attend to
            raise ValueError(f"kv_ring='personaplex' needs a KV cache of 2 slots or more, not {capacity}")
        pos = jnp.where(slots == (last + 1) % capacity, -1, pos)
    return jnp.where(pos >= 0, pos, -1)


def self_attention(p, cfg: TransformerConfig, x, offset, cache=None):
    """x [B, T, D] at absolute positions offset..offset+T-1 -> (new cache or None, [B, T, D])."""
    B, T, D = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    qkv = linear(x, p["in_proj"]).reshape(B, T, 3, H, Dh)          # [B, T, (3 H Dh)] unpacked
    q, k, v = (jnp.moveaxis(qkv[:, :, i], 1, 2) for i in range(3))  # each [B, H, T, Dh]
    pos_q = offset + jnp.arange(T)
    if cfg.positional_embedding == "rope":
        cos, sin = rope_angles(pos_q, Dh, cfg.max_period)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        pos_k = pos_q
    else:                                           # into the ring [B, H, C, Dh]: position p in slot p % C
        C = cache["k"].shape[2]
        cache = {"k": cache["k"].at[:, :, pos_q % C].set(k.astype(cache["k"].dtype)),
                 "v": cache["v"].at[:, :, pos_q % C].set(v.astype(cache["v"].dtype))}
        k, v, pos_k = cache["k"], cache["v"], ring_positions(offset, T, C, cfg.kv_ring)
    if cfg.attention == "xla":
        out = dot_product_attention(q, k, v, attention_mask(pos_q, pos_k, cfg.causal, cfg.context))
    else:
        out = fused_attention(q, k, v, cfg, cache)
    out = jnp.moveaxis(out, 1, 2).reshape(B, T, D)
    return cache, linear(out, p["out_proj"])


# Fused attention for whole causal sequences (training), where the [T, T] scores of the plain path
# cost the most: "flash" is flash.py's Pallas kernels (TPU), "cudnn" is cuDNN's fused kernel through
# jax.nn.dot_product_attention (GPU, bf16/fp16), Moshi's window as its local_window_size. A streaming
# step attends one query row per step, for which the plain path is already cheap. The offset only
# moved RoPE: the masks are relative. `default_attention` picks by backend and dtype.

def fused_attention(q, k, v, cfg: TransformerConfig, cache=None, implementation: str = "cudnn"):
    # q, k, v [B, H, T, Dh] -> [B, H, T, Dh]
    if cache is not None or not cfg.causal:
        raise ValueError(f"attention={cfg.attention!r} runs whole causal sequences (training); streaming "
                         f"and non-causal transformers use attention='xla'")
    if cfg.attention == "flash":
        try:
            import flash
        except ImportError as e:
            raise ImportError("attention='flash' needs flash.py (the Pallas kernels) beside helium.py") from e
        return flash.flash_attention(q, k, v, cfg.context)
    window = None if cfg.context is None else (cfg.context - 1, 0)           # keys q - context + 1 .. q
    out = jax.nn.dot_product_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), is_causal=True,
                                       local_window_size=window, implementation=implementation)
    return out.swapaxes(1, 2)


def default_attention(dtype) -> str:
    """The fastest attention for training on this backend: Pallas on TPU, cuDNN on GPU (which takes
    only 16-bit inputs), XLA's own elsewhere."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "flash"
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


# ----------------------------------------------------------------------------------------------
# MLPs. Helium and the depformer use a SiLU-gated MLP whose packed `linear_in` holds [gate | up];
# Mimi uses a plain GELU MLP (exact erf GELU, no biases).

# The activations are computed in fp32 and rounded once, as torch computes them on bf16 inputs,
# so a bf16 model rounds as Kyutai's does.

def gated_hidden(h):
    """[.., 2 * hidden] = [gate | up] -> silu(gate) * up [.., hidden]."""
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up


def mlp(p, cfg: TransformerConfig, x):
    if cfg.gating == "none":
        h = linear(x, p["linear1"])
        return linear(jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype), p["linear2"])
    return linear(gated_hidden(linear(x, p["linear_in"])), p["linear_out"])      # [B, T, 2 * hidden] inside


# ----------------------------------------------------------------------------------------------
# One layer: pre-norm attention then pre-norm MLP, each added back through an optional LayerScale.

def layer(p, cfg: TransformerConfig, x, offset, cache=None):
    """x [B, T, D] -> (new cache or None, [B, T, D])."""
    cache, update = self_attention(p["attn"], cfg, norm(p["norm1"], cfg.norm, x), offset, cache)
    x = residual(p, 1, x, update)
    return cache, residual(p, 2, x, mlp(p["mlp"], cfg, norm(p["norm2"], cfg.norm, x)))


def residual(p, i: int, x, update):
    """x + update, through the layer's i-th LayerScale if it has one (Mimi's layers do)."""
    if f"layer_scale_{i}" in p:
        update = p[f"layer_scale_{i}"] * update
    return x.astype(update.dtype) + update


# Weights that differ per step when cfg.weights_per_step (norms and layer scales are shared).
PER_STEP = (("attn", "in_proj"), ("attn", "out_proj"), ("mlp", "linear_in"), ("mlp", "linear_out"))


def select_step_weights(layers, cfg: TransformerConfig, steps):
    """Turn per-step weight stacks [L, M, out, in] into the weights for the given steps [L, T, out, in].

    `steps` is a static tuple of step indices (codebook indices, for the depformer); the schedule,
    if any, maps each to its weight set, as in Kyutai's `apply_weights_per_step`.
    """
    if not cfg.weights_per_step:
        return layers
    sched = cfg.weights_per_step_schedule or tuple(range(cfg.weights_per_step))
    index = np.asarray([sched[s] for s in steps])
    if isinstance(layers, (list, tuple)):                          # unstacked: [M, out, in] per layer
        return [map_step_weights(p, lambda a: a[index]) for p in layers]
    return map_step_weights(layers, lambda a: a[:, index])


def map_step_weights(p, take):
    """Apply `take` to the per-step weights (PER_STEP) of layer params, stacked or one layer (an
    int8 weight's matrix and scales alike)."""
    out = dict(p)
    for group, name in PER_STEP:
        if name in out[group]:
            out[group] = dict(out[group], **{name: jax.tree.map(take, out[group][name])})
    return out


# ----------------------------------------------------------------------------------------------
# The stack. Layers come in one of two layouts, and the same function runs both:
#   stacked  one dict whose leaves have a leading [num_layers] axis: a lax.scan traces and compiles
#            one layer, and FSDP shards each leaf once (training, the default everywhere);
#   unstacked  a list of per-layer dicts: a Python loop reads each layer's weights where they lie.
#            A scan must slice every layer's weights out of the stack, which XLA does by copying
#            them; at one token per step that copy costs more than the matmuls. Generation
#            therefore runs unstacked (3x faster per step on CPU, see unstack_layers).
# The KV cache follows the layers' layout. `layer_hook` is applied to each layer's weights right
# before use: train.py uses it to all-gather FSDP shards and merge LoRA adapters one layer at a time.

def transformer(params, cfg: TransformerConfig, x, offset=0, cache=None,
                layer_hook: Callable | None = None, remat: bool = False):
    """x [B, T, D] -> (new cache, y [B, T, D]). `cache` is None (whole sequence) or from init_cache."""
    offset = jnp.asarray(offset, jnp.int32)
    if cfg.positional_embedding == "sin":
        x = x + sin_embedding(offset + jnp.arange(x.shape[1]), x.shape[-1], cfg.max_period, x.dtype)

    def body(h, layer_inputs):
        p, c = layer_inputs
        if layer_hook is not None:
            p = layer_hook(p)
        c, h = layer(p, cfg, h, offset, c)
        return h, c

    if remat:
        body = jax.checkpoint(body)
    kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    if isinstance(params, (list, tuple)):
        y, new_kv = x, []
        for i, p in enumerate(params):
            y, c = body(y, (p, None if kv is None else {n: kv[n][i] for n in kv}))
            new_kv.append(c)
        kv = None if kv is None else {n: [c[n] for c in new_kv] for n in kv}
    else:
        y, kv = jax.lax.scan(body, x, (params, kv))
    if cache is not None:
        cache = dict(kv, offset=cache["offset"] + x.shape[1])
    return cache, y.astype(x.dtype)


def unstack_layers(layers) -> list:
    """Stacked layers -> a list of per-layer dicts (the layout generation runs fastest on)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], layers) for i in range(n)]


def init_cache(cfg: TransformerConfig, batch_size: int, dtype=jnp.float32, capacity: int | None = None,
               stacked: bool = True):
    """Streaming state: ring buffers [L, B, H, C, Dh] (or, unstacked, a list of L [B, H, C, Dh])
    and the absolute position of the next step."""
    C = capacity or cfg.cache_capacity()
    shape = (batch_size, cfg.num_heads, C, cfg.head_dim)
    zeros = lambda: (jnp.zeros((cfg.num_layers,) + shape, dtype) if stacked
                     else [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)])
    return {"k": zeros(), "v": zeros(), "offset": jnp.zeros((), jnp.int32)}


def step(params, cfg: TransformerConfig, cache, x):
    """Streaming call: x [B, T, D] continues the sequence held in `cache` -> (new cache, y)."""
    return transformer(params, cfg, x, offset=cache["offset"], cache=cache)


# ----------------------------------------------------------------------------------------------
# Init. Truncated normal with std 1/sqrt(fan_in), as Kyutai's `_init_weights`; norms at identity.

def dense_init(key, shape, dtype=jnp.float32):
    std = 1.0 / math.sqrt(shape[-1])
    return (std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)).astype(dtype)


def init_layer(key, cfg: TransformerConfig, dtype=jnp.float32):
    D, M = cfg.d_model, cfg.num_weight_sets
    per_step = (M,) if cfg.weights_per_step else ()
    k = jax.random.split(key, 4)
    p = {"norm1": init_norm(cfg.norm, D, dtype), "norm2": init_norm(cfg.norm, D, dtype),
         "attn": {"in_proj": dense_init(k[0], per_step + (3 * D, D), dtype),
                  "out_proj": dense_init(k[1], per_step + (D, D), dtype)}}
    if cfg.gating == "none":
        F = cfg.dim_feedforward
        p["mlp"] = {"linear1": dense_init(k[2], (F, D), dtype), "linear2": dense_init(k[3], (D, F), dtype)}
    else:
        Hd = cfg.gating_hidden
        p["mlp"] = {"linear_in": dense_init(k[2], per_step + (2 * Hd, D), dtype),
                    "linear_out": dense_init(k[3], per_step + (D, Hd), dtype)}
    if cfg.layer_scale is not None:
        p.update({f"layer_scale_{i}": jnp.full((D,), cfg.layer_scale, dtype) for i in (1, 2)})
    return p


def init(key, cfg: TransformerConfig, dtype=jnp.float32):
    """Stacked layer params: every leaf gets a leading [num_layers] axis."""
    # vmap over the layer keys: one layer is traced, not num_layers of them.
    return jax.vmap(lambda k: init_layer(k, cfg, dtype))(jax.random.split(key, cfg.num_layers))


# ----------------------------------------------------------------------------------------------
# Demo: a tiny random byte-level LM built from the stack. It shows the two ways every model in this
# repo runs: the whole sequence at once (training), and one step at a time through the ring KV
# cache (generation), and that they agree.

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Runs a tiny random LM demo.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="Moshi listens and speaks at the same time.", help="prompt bytes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = TransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=4 * 64, context=16)
    k = jax.random.split(jax.random.key(args.seed), 3)
    params = {"emb": dense_init(k[0], (256, 64)), "layers": init(k[1], cfg),
              "out_norm": init_norm(cfg.norm, 64), "head": dense_init(k[2], (256, 64))}

    @jax.jit
    def logits_of(p, tokens, offset=0, cache=None):
        """tokens [B, T] -> (cache, logits [B, T, 256]), a whole sequence when cache is None."""
        cache, h = transformer(p["layers"], cfg, p["emb"][tokens], offset, cache)
        return cache, linear(norm(p["out_norm"], cfg.norm, h), p["head"])

    tokens = jnp.asarray([list(args.text.encode())], jnp.int32)    # [1, T]
    _, full = logits_of(params, tokens)
    # Generation runs on unstacked layers (a list), the layout that reads weights in place.
    params = dict(params, layers=unstack_layers(params["layers"]))
    cache, streamed = init_cache(cfg, 1, stacked=False), []
    for t in range(tokens.shape[1]):
        cache, logits = logits_of(params, tokens[:, t:t + 1], cache["offset"], cache)
        streamed.append(logits)
    streamed = jnp.concatenate(streamed, axis=1)
    err = float(jnp.max(jnp.abs(streamed - full)) / jnp.max(jnp.abs(full)))
    print(f"{tokens.shape[1]} prompt bytes, sliding window {cfg.context}, ring cache of "
          f"{cache['k'][0].shape[2]} slots: batch vs streaming logits, max rel. error {err:.2e}")


if __name__ == "__main__":
    main()
