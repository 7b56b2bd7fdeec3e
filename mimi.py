"""mimi.py: Kyutai's Mimi neural audio codec in pure JAX.

Mimi turns 24 kHz speech into 12.5 tokens per second per codebook (8 codebooks = 1.1 kbps) and
back. It is a convolutional autoencoder with a transformer at each end and a residual vector
quantizer in the middle; everything is causal, so it can run one 80 ms frame at a time. In the
order a waveform meets it:

    wav [B, 1, S] 24 kHz
      -> SEANet encoder: causal convs, 4 strided stages (x4 x5 x6 x8)  -> [B, S/960, 512]   25 Hz
      -> encoder transformer: 8 layers, sliding window of 250 steps (10 s)
      -> learnt strided conv, 25 Hz -> 12.5 Hz                          -> [B, S/1920, 512]
      -> split RVQ: 1 semantic + up to 31 acoustic codebooks of 2048     -> codes [B, K, S/1920]
    and back: codebook sums -> depthwise transposed conv 12.5 -> 25 Hz -> decoder transformer
      -> SEANet decoder (transposed convs) -> wav [B, 1, S]

One code path per direction serves batch and streaming use: every conv keeps the tail of its input
(a transposed conv, the overhang of its output) in an explicit state, and the transformers keep a
ring KV cache (helium.py). Streaming passes each direction's state from one 80 ms frame to the
next (`encoder_state` / `decoder_state`, `(state, out) = encode_step / decode_step(...)`); the
batch functions run the same steps over 10 s chunks from a fresh state, with a KV cache big enough
to hold a full window behind every chunk: exactly the non-streaming result, in bounded memory.

Streaming note (Kyutai's behaviour, reproduced exactly): the streaming transformers get 2 steps
per frame and a ring cache of exactly 250 slots, so once more than 250 steps (10 s) have passed, the
first step of each frame sees 249 past keys instead of 250. Kyutai's streaming codes therefore
drift from its batch codes after 10 s; ours match its streaming codes there, not its batch codes.
NVIDIA's PersonaPlex streams Mimi through an older ring that sees one key less again (248 and 249);
`kv_ring="personaplex"` reproduces that one (see helium.ring_positions).

Audio files in and out are audio.py's. This file imports helium.py only. `python mimi.py` runs a
random tiny codec, batch vs streaming; Kyutai's weights load with `convert.load_mimi`, and
`python convert.py mimi in.wav out.wav --weights tokenizer-e351c8d8-checkpoint125.safetensors`
round-trips a file through them.

Reference: kyutai-labs/moshi `moshi/models/compression.py`, `modules/seanet.py`, `conv.py`,
`resample.py`, `quantization/` (moshi 0.2.13).
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

import helium


@dataclass(frozen=True)
class MimiConfig:
    """Defaults are Kyutai's released Mimi (`moshi.models.loaders._mimi_config`)."""
    sample_rate: int = 24000
    channels: int = 1
    dimension: int = 512                      # latent width: SEANet output, transformer d_model
    # SEANet
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)    # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2                         # residual branches are dim // compress wide
    downsample_stride: int = 2                # encoder frame rate / codec frame rate (25 -> 12.5 Hz)
    # the two transformers
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    layer_scale: float = 0.01
    max_period: float = 10_000.0
    # split residual vector quantizer
    codebook_dim: int = 256
    codebook_size: int = 2048
    num_quantizers: int = 32                  # semantic + acoustic
    num_semantic: int = 1
    # Whose streaming KV ring the transformers follow once it is full (helium.ring_positions):
    # Kyutai's, or NVIDIA's older one, which PersonaPlex's Mimi streams with (sample.py sets it to the LM's).
    kv_ring: str = "kyutai"

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(self.ratios))     # hashable: configs are static under jit
        self.transformer                      # noqa: B018  its config refuses an unknown kv_ring

    @property
    def hop_length(self) -> int:
        """Samples per encoder step (960: the SEANet runs at 25 Hz)."""
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        """Samples per codec frame (1920 = 80 ms at 24 kHz)."""
        return self.hop_length * self.downsample_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def transformer(self) -> helium.TransformerConfig:
        return helium.TransformerConfig(
            d_model=self.dimension, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=self.dim_feedforward, causal=True, context=self.context, norm="layer_norm",
            gating="none", positional_embedding="rope", max_period=self.max_period,
            layer_scale=self.layer_scale, kv_ring=self.kv_ring)


# A codec of a few thousand parameters with the real structure and 80 ms frames, for tests and
# demos (its 8-step KV ring wraps after 4 frames); it fits moshi.TINY's 64-entry codebooks.
TINY = MimiConfig(dimension=16, n_filters=4, num_heads=2, num_layers=2, dim_feedforward=32, context=8,
                  codebook_dim=8, codebook_size=64, num_quantizers=8)


# ----------------------------------------------------------------------------------------------
# The layout: every conv of the codec as a small spec, in nested dicts that mirror the params.
# init, the streaming state and convert.py's key mapping are all derived from it (a spec is a leaf
# to jax.tree: a plain dataclass is not a pytree).

@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    transposed: bool = False

    @property
    def weight_shape(self) -> tuple:
        # Ours, chosen so no weight is ever re-laid-out at run time (see "Causal convolutions"):
        # conv (k, in/groups, out) ("WIO"); transposed conv (in, k, out/groups). The only grouped
        # convs are the depthwise upsampler (groups = channels).
        if self.transposed:
            return (self.cin, self.kernel, self.cout // self.groups)
        return (self.kernel, self.cin // self.groups, self.cout)

    def state_shape(self, batch_size: int) -> tuple:
        if self.transposed:   # output overhang past the last full stride: (ceil(k/s) - 1) * s samples
            return (batch_size, (-(-self.kernel // self.stride) - 1) * self.stride, self.cout)
        # input tail a causal conv still needs: effective kernel minus stride
        return (batch_size, (self.kernel - 1) * self.dilation + 1 - self.stride, self.cin)


def _resblocks_layout(cfg: MimiConfig, dim: int) -> list:
    hidden = dim // cfg.compress
    return [{"conv1": Conv(dim, hidden, cfg.residual_kernel_size, dilation=cfg.dilation_base ** j),
             "conv2": Conv(hidden, dim, 1)} for j in range(cfg.n_residual_layers)]


def _stages(cfg: MimiConfig) -> list:
    """(width, ratio) of every SEANet stage in the encoder's order; the decoder runs them reversed."""
    return [(cfg.n_filters * 2 ** i, ratio) for i, ratio in enumerate(reversed(cfg.ratios))]


def encoder_layout(cfg: MimiConfig) -> dict:
    """SEANet encoder: conv, then per stage (residual blocks, strided conv doubling the width), conv."""
    stages = [{"res": _resblocks_layout(cfg, w), "down": Conv(w, 2 * w, 2 * ratio, stride=ratio)}
              for w, ratio in _stages(cfg)]
    return {"conv_in": Conv(cfg.channels, cfg.n_filters, cfg.kernel_size), "stages": stages,
            "conv_out": Conv(cfg.n_filters * 2 ** len(cfg.ratios), cfg.dimension, cfg.last_kernel_size)}


def decoder_layout(cfg: MimiConfig) -> dict:
    """SEANet decoder: the mirror image, with transposed convs halving the width at each stage."""
    stages = [{"up": Conv(2 * w, w, 2 * ratio, stride=ratio, transposed=True),
               "res": _resblocks_layout(cfg, w)} for w, ratio in reversed(_stages(cfg))]
    return {"conv_in": Conv(cfg.dimension, cfg.n_filters * 2 ** len(cfg.ratios), cfg.kernel_size),
            "stages": stages, "conv_out": Conv(cfg.n_filters, cfg.channels, cfg.last_kernel_size)}


def downsample_layout(cfg: MimiConfig) -> Conv:
    s = cfg.downsample_stride           # learnt, full (not depthwise), no bias, replicate-padded
    return Conv(cfg.dimension, cfg.dimension, 2 * s, stride=s, bias=False)


def upsample_layout(cfg: MimiConfig) -> Conv:
    s = cfg.downsample_stride           # depthwise ("channel_wise" bug kept by Kyutai), no bias
    return Conv(cfg.dimension, cfg.dimension, 2 * s, stride=s, groups=cfg.dimension, bias=False,
                transposed=True)


# ----------------------------------------------------------------------------------------------
# Causal convolutions. Activations are channels-last [B, T, C] throughout. A causal conv is a plain
# "valid" conv over [history | x]: in a batch the history is zeros (left padding by kernel -
# stride), in streaming it is the previous input's tail. Either way T must be a multiple of the
# stride and the output has T / stride steps. Weights are stored in the layout the CPU kernels read
# (convert.py transposes PyTorch's once at load): with PyTorch's (out, in, k), XLA re-lays out every
# weight on every call, which made a streaming frame 5x slower.

def conv1d(p, spec: Conv, history, x):
    # history [B, (k-1)*d+1-s, Cin] -> new history, y [B, T/s, Cout]
    x = jnp.concatenate([history, x], axis=1)
    new_history = x[:, x.shape[1] - history.shape[1]:]
    y = jax.lax.conv_general_dilated(x, p["w"], (spec.stride,), "VALID", rhs_dilation=(spec.dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return new_history, (y + p["b"] if spec.bias else y)


def conv_transpose1d(p, spec: Conv, overhang, x):
    """Causal transposed conv: input step t paints `kernel` output samples from t * stride on.

    Written as one matmul plus an overlap-add of ceil(k/s) shifted copies (XLA's CPU backend has no
    fast path for input-dilated convolutions). Output samples past T * stride are incomplete: they
    are held back as `overhang` and added to the next call's output, exactly Kyutai's `partial`.
    """
    B, T, _ = x.shape
    s, n = spec.stride, -(-spec.kernel // spec.stride)             # n: output strides one input step touches
    w = jnp.pad(p["w"], ((0, 0), (0, n * s - spec.kernel), (0, 0)))  # [Cin, n * s, Cout/groups]: zero taps
    if spec.groups == 1:                                            # a plain matmul: no weight relayout
        y = x @ w.reshape(spec.cin, n * s * spec.cout)
    else:                                                           # depthwise: a broadcast product
        y = x[:, :, None, :] * w[:, :, 0].T
    y = y.reshape(B, T, n, s, spec.cout)                            # [B, T, n, s, Cout]
    full = sum(jnp.pad(y[:, :, m], ((0, 0), (m, n - 1 - m), (0, 0), (0, 0))) for m in range(n))
    full = full.reshape(B, (T + n - 1) * s, spec.cout)              # every touched sample, bias-free
    full = full.at[:, :overhang.shape[1]].add(overhang)
    out, overhang = full[:, :T * s], full[:, T * s:]
    return overhang, (out + p["b"] if spec.bias else out)


# ----------------------------------------------------------------------------------------------
# SEANet. A residual block is x + conv1x1(elu(conv_k(elu(x)))); the identity skip keeps it causal.

def resblocks(p, spec, state, x):
    """A stage's residual blocks, one after the other (p, spec, state: lists of blocks)."""
    new = []
    for pr, lr, sr in zip(p, spec, state):
        s1, h = conv1d(pr["conv1"], lr["conv1"], sr["conv1"], jax.nn.elu(x))
        s2, h = conv1d(pr["conv2"], lr["conv2"], sr["conv2"], jax.nn.elu(h))
        new.append({"conv1": s1, "conv2": s2})
        x = x + h
    return new, x


def seanet(p, spec, state, x):
    """The SEANet encoder or decoder, as `spec` lays it out: conv_in, the stages, ELU, conv_out. A
    stage runs its parts in the layout's order: the encoder's residual blocks, then ELU and strided
    conv ("down"); the decoder's ELU and transposed conv ("up"), then residual blocks."""
    # encoder: x [B, S, channels] -> (new state, [B, S / hop_length, dimension]); decoder: the reverse,
    # with no final activation and no clipping
    new = {"stages": []}
    new["conv_in"], x = conv1d(p["conv_in"], spec["conv_in"], state["conv_in"], x)
    for ps, ls, ss in zip(p["stages"], spec["stages"], state["stages"]):
        stage = {}
        for k, part in ls.items():
            if k == "res":
                stage[k], x = resblocks(ps[k], part, ss[k], x)
            else:
                conv = conv_transpose1d if part.transposed else conv1d
                stage[k], x = conv(ps[k], part, ss[k], jax.nn.elu(x))
        new["stages"].append(stage)
    new["conv_out"], x = conv1d(p["conv_out"], spec["conv_out"], state["conv_out"], jax.nn.elu(x))
    return new, x


# ----------------------------------------------------------------------------------------------
# 25 Hz -> 12.5 Hz: a learnt strided conv whose left padding repeats the very first latent frame
# (Kyutai's pad_mode="replicate"), so the state remembers whether the stream has started. (Back up,
# in decode_chunk, is a plain depthwise transposed conv.)

def downsample(w, cfg: MimiConfig, state, x):
    # x [B, 2T, D] -> (new state, [B, T, D])
    history = jnp.where(state["first"][:, None, None], x[:, :1], state["history"])
    history, y = conv1d({"w": w}, downsample_layout(cfg), history, x)
    return {"history": history, "first": jnp.zeros_like(state["first"])}, y


# ----------------------------------------------------------------------------------------------
# Split residual vector quantizer. Two independent RVQs read the same latent: the "semantic" one
# (1 codebook, distilled from WavLM in training) and the "acoustic" one (up to 31). Each projects
# 512 -> 256, then each level picks the nearest codebook entry to what is left and subtracts it.
# Distances are computed as Kyutai's torch.cdist does for big inputs, sqrt(max(|x|^2 - 2 x.e +
# |e|^2, 0)) as one augmented matmul, so that near-ties round the same way; argmin takes the first
# of equal values, like torch.

def nearest_code(x, codebook):
    # x [N, d], codebook [bins, d] -> int32 [N]
    ones_x, ones_e = jnp.ones_like(x[:, :1]), jnp.ones_like(codebook[:, :1])
    x_aug = jnp.concatenate([-2 * x, jnp.sum(x * x, -1, keepdims=True), ones_x], -1)          # [N, d+2]
    e_aug = jnp.concatenate([codebook, ones_e, jnp.sum(codebook * codebook, -1, keepdims=True)], -1)
    dist = jnp.sqrt(jnp.maximum(x_aug @ e_aug.T, 0))                                          # [N, bins]
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def rvq_encode(p, latent, n: int):
    # latent [B, T, D] -> codes [B, n, T]
    B, T, _ = latent.shape
    residual = helium.linear(latent, p["input_proj"]).reshape(B * T, -1)                      # [B*T, d]

    def level(residual, codebook):
        idx = nearest_code(residual, codebook)
        return residual - codebook[idx], idx

    _, codes = jax.lax.scan(level, residual, p["codebooks"][:n])                              # [n, B*T]
    return codes.reshape(n, B, T).transpose(1, 0, 2)


def rvq_decode(p, codes):
    # codes [B, n, T] -> [B, T, D]
    n = codes.shape[1]
    vectors = p["codebooks"][jnp.arange(n)[None, :, None], codes]                             # [B, n, T, d]
    return helium.linear(jnp.sum(vectors, axis=1), p["output_proj"])


def quantize(p, cfg: MimiConfig, latent, num_codebooks: int):
    # latent [B, T, D] -> codes int32 [B, K, T]: the semantic codebook(s), then K - num_semantic acoustic ones
    n_sem = cfg.num_semantic
    return jnp.concatenate([rvq_encode(p["semantic"], latent, n_sem),
                            rvq_encode(p["acoustic"], latent, num_codebooks - n_sem)], axis=1)


def dequantize(p, cfg: MimiConfig, codes):
    # codes [B, K, T] -> latent [B, T, D]: the sum of both RVQs' reconstructions (with no acoustic
    # codes, the acoustic one is exact zeros)
    n_sem = cfg.num_semantic
    return rvq_decode(p["semantic"], codes[:, :n_sem]) + rvq_decode(p["acoustic"], codes[:, n_sem:])


# ----------------------------------------------------------------------------------------------
# The two directions, one chunk at a time with explicit state. A chunk is any whole number of
# frames; the state carries conv tails, the transformer's ring KV cache and its position. The
# transformers are helium layers (LayerNorm, interleaved RoPE, LayerScale, GELU MLP, 250-step
# window) kept as a list, the layout a streaming step reads in place (see helium's stack).

def _conv_states(layout, batch_size: int):
    return jax.tree.map(lambda c: jnp.zeros(c.state_shape(batch_size), jnp.float32), layout)


def encoder_state(cfg: MimiConfig, batch_size: int, capacity: int | None = None) -> dict:
    """Streaming state of the encoder (KV cache of `capacity` slots, default the context)."""
    return {"seanet": _conv_states(encoder_layout(cfg), batch_size),
            "transformer": helium.init_cache(cfg.transformer, batch_size, capacity=capacity, stacked=False),
            "downsample": {"history": _conv_states(downsample_layout(cfg), batch_size),
                           "first": jnp.ones((batch_size,), bool)}}


def decoder_state(cfg: MimiConfig, batch_size: int, capacity: int | None = None) -> dict:
    """Streaming state of the decoder (KV cache of `capacity` slots, default the context)."""
    return {"upsample": _conv_states(upsample_layout(cfg), batch_size),
            "transformer": helium.init_cache(cfg.transformer, batch_size, capacity=capacity, stacked=False),
            "seanet": _conv_states(decoder_layout(cfg), batch_size)}


def encode_chunk(params, cfg: MimiConfig, state, wav):
    # wav [B, n * frame_size, channels] -> new state, latent [B, n, D] at 12.5 Hz (before quantization)
    tails, x = seanet(params["encoder"], encoder_layout(cfg), state["seanet"], wav)             # [B, 2n, D]
    cache, x = helium.step(params["encoder_transformer"], cfg.transformer, state["transformer"], x)
    down, x = downsample(params["downsample"], cfg, state["downsample"], x)                     # [B, n, D]
    return {"seanet": tails, "transformer": cache, "downsample": down}, x


def decode_chunk(params, cfg: MimiConfig, state, codes):
    # codes [B, K, n] -> new state, wav [B, n * frame_size, channels]
    x = dequantize(params["quantizer"], cfg, codes)                                            # [B, n, D]
    # 12.5 Hz -> 25 Hz [B, 2n, D]: a depthwise transposed conv
    up, x = conv_transpose1d({"w": params["upsample"]}, upsample_layout(cfg), state["upsample"], x)
    cache, x = helium.step(params["decoder_transformer"], cfg.transformer, state["transformer"], x)
    tails, wav = seanet(params["decoder"], decoder_layout(cfg), state["seanet"], x)
    return {"upsample": up, "transformer": cache, "seanet": tails}, wav


def _check_codebooks(cfg: MimiConfig, num_codebooks: int):
    if not cfg.num_semantic <= num_codebooks <= cfg.num_quantizers:
        raise ValueError(f"num_codebooks={num_codebooks}: this Mimi has {cfg.num_quantizers} codebooks, "
                         f"use {cfg.num_semantic} to {cfg.num_quantizers}")


def _check_codes(cfg: MimiConfig, codes, what: str):
    if codes.ndim != 3 or codes.shape[0] == 0 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"{what}: expected integer codes [B>0, K, T], "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    _check_codebooks(cfg, codes.shape[1])


def _check_wav(cfg: MimiConfig, wav, what: str, whole_frames: bool):
    if wav.ndim != 3 or 0 in wav.shape or wav.shape[1] != cfg.channels:
        raise ValueError(f"{what}: expected audio [B>0, {cfg.channels}, samples>0], "
                         f"got shape {tuple(wav.shape)}")
    if whole_frames and wav.shape[2] % cfg.frame_size:
        raise ValueError(f"{what}: streaming input must be whole frames of {cfg.frame_size} samples, "
                         f"got {wav.shape[2]} (buffer the audio before calling)")


# ----------------------------------------------------------------------------------------------
# Streaming API: fixed shapes, constant memory. The KV caches have exactly `context` slots, like
# Kyutai's, so the results are Kyutai's streaming results (see the note at the top about streams
# longer than 10 s). The state passed in is donated: its buffers (KV caches above all) are updated
# in place, not copied, so a state must not be used twice: always continue from the one returned.
# Mimi always runs in float32: every matmul and conv is traced at full precision, on accelerators too.

@functools.partial(jax.jit, static_argnames=("cfg", "num_codebooks"), donate_argnames=("state",))
def encode_step(params, cfg: MimiConfig, state, frame, num_codebooks: int = 8):
    """frame [B, channels, n * frame_size] (usually n = 1) -> (new encoder state, codes int32 [B, K, n])."""
    _check_wav(cfg, frame, "mimi.encode_step", whole_frames=True)
    _check_codebooks(cfg, num_codebooks)
    with jax.default_matmul_precision("highest"):
        state, latent = encode_chunk(params, cfg, state, frame.astype(jnp.float32).transpose(0, 2, 1))
        return state, quantize(params["quantizer"], cfg, latent, num_codebooks)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def decode_step(params, cfg: MimiConfig, state, codes):
    """codes int [B, K, n] -> (new decoder state, pcm float32 [B, channels, n * frame_size]). Codes
    must lie in [0, codebook_size): a jitted step cannot look at values (mimi.decode checks them)."""
    _check_codes(cfg, codes, "mimi.decode_step")
    with jax.default_matmul_precision("highest"):
        state, wav = decode_chunk(params, cfg, state, codes.astype(jnp.int32))
    return state, wav.transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Batch API: the streaming steps over chunks of `chunk_frames`, from a fresh state whose KV caches
# hold context + chunk steps. Every step then sees its full 250-step window, which is exactly the
# non-streaming result, and memory stays bounded by the chunk however long the audio. The chunk
# loop is a Python loop over one compiled step: XLA's CPU backend runs convolutions inside a
# lax.scan body several times slower than outside one. The batch result is the codec without a ring
# at all, so no ring rule may hide a key: the chunks run with Kyutai's, as NVIDIA's would hide a
# chunk's first step in a single chunk's cache (sized to the chunk).

CHUNK_FRAMES = 125   # 10 s


def _in_chunks(step, new_state, params, cfg: MimiConfig, x, n_frames: int, unit: int, chunk_frames: int):
    """Run `(state, y) = step(params, cfg, state, x chunk)` over x [B, C, L] (n_frames frames of `unit`
    steps, zero-padded here to whole chunks of chunk_frames frames) from a fresh
    `new_state(cfg, B, capacity)`, and join the outputs along their last axis."""
    if not chunk_frames >= 1:
        raise ValueError(f"chunk_frames={chunk_frames}: must be at least 1")
    cfg = replace(cfg, kv_ring="kyutai")              # see above: a ring rule that hides no key
    chunk = min(chunk_frames, n_frames)
    n_chunks = -(-n_frames // chunk)
    # KV slots so that every step of a chunk sees its whole window: the chunk plus the context
    # before it; a single chunk needs only its own steps.
    steps = chunk * cfg.downsample_stride
    state = new_state(cfg, x.shape[0], capacity=steps if n_chunks == 1 else cfg.context + steps)
    size = chunk * unit
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n_chunks * size - x.shape[2])))
    ys = []
    for i in range(n_chunks):
        state, y = step(params, cfg, state, x[:, :, i * size:(i + 1) * size])
        ys.append(y)
    return jnp.concatenate(ys, axis=-1)


def encode(params, cfg: MimiConfig, wav, num_codebooks: int = 8, chunk_frames: int = CHUNK_FRAMES):
    """wav float32 [B, channels, S] at cfg.sample_rate -> codes int32 [B, K, ceil(S / frame_size)].

    The audio is right-padded with zeros to whole frames, as Kyutai's `MimiModel.encode` does.
    """
    _check_wav(cfg, wav, "mimi.encode", whole_frames=False)
    n_frames = -(-wav.shape[2] // cfg.frame_size)
    step = functools.partial(encode_step, num_codebooks=num_codebooks)
    codes = _in_chunks(step, encoder_state, params, cfg, jnp.asarray(wav, jnp.float32), n_frames,
                       cfg.frame_size, chunk_frames)
    return codes[:, :, :n_frames]


def decode(params, cfg: MimiConfig, codes, chunk_frames: int = CHUNK_FRAMES):
    """codes int [B, K, T] (any 1 <= K <= num_quantizers) -> wav float32 [B, channels, T * frame_size]."""
    _check_codes(cfg, codes, "mimi.decode")
    T = codes.shape[2]
    if T == 0:
        raise ValueError(f"mimi.decode: no frames to decode (codes of shape {tuple(codes.shape)})")
    if not isinstance(codes, jax.core.Tracer):      # out-of-range codes would silently gather a clamped entry
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"mimi.decode: codes must be in [0, {cfg.codebook_size}), "
                             f"got values in [{lo}, {hi}]")
    wav = _in_chunks(decode_step, decoder_state, params, cfg, jnp.asarray(codes, jnp.int32), T, 1,
                     chunk_frames)
    return wav[:, :, :T * cfg.frame_size]


# ----------------------------------------------------------------------------------------------
# Random init (for tests and demos; real weights come from convert.load_mimi). Convs get
# N(0, 1/fan_in) weights and zero biases, the transformers helium's init, codebooks N(0, 0.1^2).
# All of Mimi's own weights come from one normal draw, cut up: on CPU, XLA compiles the random
# generator anew for every distinct shape (about a second each), and a codec has dozens.

def init(key, cfg: MimiConfig) -> dict:
    d, D, bins, n_sem = cfg.codebook_dim, cfg.dimension, cfg.codebook_size, cfg.num_semantic
    convs = {"encoder": encoder_layout(cfg), "decoder": decoder_layout(cfg),
             "downsample": downsample_layout(cfg), "upsample": upsample_layout(cfg)}
    specs, tree = jax.tree.flatten(convs)
    fan_in = [c.cin // c.groups * (max(1, c.kernel // c.stride) if c.transposed else c.kernel) for c in specs]
    rvq = lambda n: [((d, D), D ** -0.5), ((D, d), d ** -0.5), ((n, bins, d), 0.1)]
    draws = ([(c.weight_shape, f ** -0.5) for c, f in zip(specs, fan_in)]
             + rvq(n_sem) + rvq(cfg.num_quantizers - n_sem))
    k_weights, k_enc, k_dec = jax.random.split(key, 3)
    sizes = [math.prod(shape) for shape, _ in draws]
    parts = jnp.split(jax.random.normal(k_weights, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
    arrays = [scale * part.reshape(shape) for (shape, scale), part in zip(draws, parts)]
    # a conv is {"w", "b"}; the bias-free resamplers are a bare weight
    conv_params = [{"w": w, "b": jnp.zeros((c.cout,), jnp.float32)} if c.bias else w
                   for c, w in zip(specs, arrays)]
    params = jax.tree.unflatten(tree, conv_params)
    q, names = arrays[len(specs):], ("input_proj", "output_proj", "codebooks")
    params["quantizer"] = {"semantic": dict(zip(names, q[:3])), "acoustic": dict(zip(names, q[3:]))}
    for name, k in (("encoder_transformer", k_enc), ("decoder_transformer", k_dec)):
        params[name] = helium.unstack_layers(helium.init(k, cfg.transformer))
    return params


# ----------------------------------------------------------------------------------------------
# Demo: a random codec (random weights: the sound is noise; the codec's arithmetic is not). Batch
# and 80 ms streaming must give the same codes and audio while the stream is shorter than the
# 10 s window. Real weights: `python convert.py mimi in.wav out.wav --weights W`.

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Runs a random-weight self-check.",
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:4]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the released Mimi's size (default: the tiny config)")
    ap.add_argument("--frames", type=int, help="80 ms frames of noise to encode (default: one window)")
    ap.add_argument("--num-codebooks", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = MimiConfig() if args.full else TINY
    try:
        _check_codebooks(cfg, args.num_codebooks)
    except ValueError as e:
        ap.error(f"--num-codebooks: {e}")
    if args.frames is not None and args.frames < 1:
        ap.error(f"--frames must be at least 1, got {args.frames}")
    params = init(jax.random.key(0), cfg)
    F, frames = cfg.frame_size, args.frames or cfg.context // cfg.downsample_stride
    wav = 0.1 * jax.random.normal(jax.random.key(1), (2, 1, frames * F))                   # [B, 1, S]
    codes = encode(params, cfg, wav, args.num_codebooks)                                    # [B, K, frames]
    pcm = decode(params, cfg, codes)
    enc, dec, steps = encoder_state(cfg, 2), decoder_state(cfg, 2), []
    for t in range(frames):
        enc, c = encode_step(params, cfg, enc, wav[:, :, t * F:(t + 1) * F], args.num_codebooks)
        dec, p = decode_step(params, cfg, dec, c)
        steps.append((c, p))
    stream_codes, stream_pcm = (jnp.concatenate(parts, -1) for parts in zip(*steps))
    same = bool(jnp.array_equal(stream_codes, codes))
    err = float(jnp.linalg.norm(stream_pcm - pcm) / jnp.linalg.norm(pcm))
    past = frames > cfg.context // cfg.downsample_stride
    print(f"{'released' if args.full else 'tiny'} Mimi, random weights: {frames} frames -> codes "
          f"{tuple(codes.shape)}; streaming vs batch: codes {'identical' if same else 'differ'}, audio rel. "
          f"L2 {err:.1e}" + (" (past one window they differ: see the top)" if past else ""))


if __name__ == "__main__":
    main()
