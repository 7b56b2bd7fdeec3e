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
ring KV cache (helium.py). Streaming passes the state from one 80 ms frame to the next; the batch
functions run the same steps over 10 s chunks from a fresh state, with a KV cache big enough to
hold a full window behind every chunk: exactly the non-streaming result, in bounded memory.

Streaming note (Kyutai's behaviour, reproduced exactly): the streaming transformers get 2 steps
per frame and a ring cache of exactly 250 slots, so once more than 250 steps (10 s) have passed, the
first step of each frame sees 249 past keys instead of 250. Kyutai's streaming codes therefore
drift from its batch codes after 10 s; ours match its streaming codes there, not its batch codes.

Also here: audio I/O for the other scripts (`read_blocks` streams a file of any rate and channel
count through a windowed-sinc polyphase resampler written in numpy, in constant memory;
`read_audio` joins its blocks; `frames_of` cuts a stream into 80 ms frames; `mix_down`,
`write_audio`), and a command line round trip:
    python mimi.py in.wav out.wav --weights tokenizer-e351c8d8-checkpoint125.safetensors

Reference: kyutai-labs/moshi `moshi/models/compression.py`, `modules/seanet.py`, `conv.py`,
`resample.py`, `quantization/` (moshi 0.2.13). Weights load with `convert.load_mimi`.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

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

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(self.ratios))     # hashable: configs are static under jit

    @classmethod
    def tiny(cls) -> "MimiConfig":
        """A few-thousand-parameter codec with the same structure, for fast tests (context 8)."""
        return cls(dimension=16, n_filters=4, ratios=(4, 2), num_heads=2, num_layers=2, dim_feedforward=32,
                   context=8, codebook_dim=8, codebook_size=32, num_quantizers=4)

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
            gating="none", positional_embedding="rope", max_period=self.max_period, layer_scale=self.layer_scale)


TINY = MimiConfig.tiny()


# ----------------------------------------------------------------------------------------------
# The layout: every conv of the codec as a small spec, in nested dicts that mirror the params.
# init, the streaming state and convert.py's key mapping are all derived from it.

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
        # conv (k, in/groups, out) ("WIO"); transposed conv (in, k, out/groups).
        if self.transposed:
            return (self.cin, self.kernel, self.cout // self.groups)
        return (self.kernel, self.cin // self.groups, self.cout)

    def state_shape(self, batch_size: int) -> tuple:
        if self.transposed:   # output overhang past the last full stride: (ceil(k/s) - 1) * s samples
            return (batch_size, (-(-self.kernel // self.stride) - 1) * self.stride, self.cout)
        # input tail a causal conv still needs: effective kernel minus stride
        return (batch_size, (self.kernel - 1) * self.dilation + 1 - self.stride, self.cin)


def _resblock_layout(cfg: MimiConfig, dim: int, dilation: int) -> dict:
    hidden = dim // cfg.compress
    return {"conv1": Conv(dim, hidden, cfg.residual_kernel_size, dilation=dilation),
            "conv2": Conv(hidden, dim, 1)}


def encoder_layout(cfg: MimiConfig) -> dict:
    """SEANet encoder: conv, then per stage (residual blocks, strided conv doubling the width), conv."""
    nf, stages = cfg.n_filters, []
    for i, ratio in enumerate(reversed(cfg.ratios)):
        width = nf * 2 ** i
        stages.append({"res": [_resblock_layout(cfg, width, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)],
                       "down": Conv(width, 2 * width, 2 * ratio, stride=ratio)})
    return {"conv_in": Conv(cfg.channels, nf, cfg.kernel_size), "stages": stages,
            "conv_out": Conv(nf * 2 ** len(cfg.ratios), cfg.dimension, cfg.last_kernel_size)}


def decoder_layout(cfg: MimiConfig) -> dict:
    """SEANet decoder: the mirror image, with transposed convs halving the width at each stage."""
    nf, stages = cfg.n_filters, []
    for i, ratio in enumerate(cfg.ratios):
        width = nf * 2 ** (len(cfg.ratios) - i - 1)
        stages.append({"up": Conv(2 * width, width, 2 * ratio, stride=ratio, transposed=True),
                       "res": [_resblock_layout(cfg, width, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]})
    return {"conv_in": Conv(cfg.dimension, nf * 2 ** len(cfg.ratios), cfg.kernel_size), "stages": stages,
            "conv_out": Conv(nf, cfg.channels, cfg.last_kernel_size)}


def downsample_layout(cfg: MimiConfig) -> Conv:
    s = cfg.downsample_stride           # learnt, full (not depthwise), no bias, replicate-padded
    return Conv(cfg.dimension, cfg.dimension, 2 * s, stride=s, bias=False)


def upsample_layout(cfg: MimiConfig) -> Conv:
    s = cfg.downsample_stride           # depthwise ("channel_wise" bug kept by Kyutai), no bias
    return Conv(cfg.dimension, cfg.dimension, 2 * s, stride=s, groups=cfg.dimension, bias=False, transposed=True)


def _is_conv(x) -> bool:
    return isinstance(x, Conv)


# ----------------------------------------------------------------------------------------------
# Causal convolutions. Activations are channels-last [B, T, C] throughout. A causal conv is a plain
# "valid" conv over [history | x]: in a batch the history is zeros (left padding by kernel -
# stride), in streaming it is the previous input's tail. Either way T must be a multiple of the
# stride and the output has T / stride steps. Weights are stored in the layout the CPU kernels read
# (convert.py transposes PyTorch's once at load): with PyTorch's (out, in, k), XLA re-lays out every
# weight on every call, which made a streaming frame 5x slower.

def conv1d(p, spec: Conv, x, history):
    # x [B, T, Cin], history [B, (k-1)*d+1-s, Cin] -> y [B, T/s, Cout], new history
    x = jnp.concatenate([history, x], axis=1)
    new_history = x[:, x.shape[1] - history.shape[1]:]
    y = jax.lax.conv_general_dilated(x, p["w"], (spec.stride,), "VALID", rhs_dilation=(spec.dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=spec.groups)
    return (y + p["b"] if spec.bias else y), new_history


def conv_transpose1d(p, spec: Conv, x, overhang):
    """Causal transposed conv: input step t paints `kernel` output samples from t * stride on.

    Written as one matmul plus an overlap-add of ceil(k/s) shifted copies (XLA's CPU backend has no
    fast path for input-dilated convolutions). Output samples past T * stride are incomplete: they
    are held back as `overhang` and added to the next call's output, exactly Kyutai's `partial`.
    """
    B, T, _ = x.shape
    s, g = spec.stride, spec.groups
    n = -(-spec.kernel // s)                                        # output strides one input step touches
    w = p["w"]                                                      # [Cin, k, Cout/g]
    if n * s != spec.kernel:
        w = jnp.pad(w, ((0, 0), (0, n * s - spec.kernel), (0, 0)))
    if g == 1:                                                      # a plain matmul: no weight relayout
        y = x @ w.reshape(spec.cin, n * s * spec.cout)
    elif g == spec.cin == spec.cout:                                # depthwise: a broadcast product
        y = x[:, :, None, :] * w[:, :, 0].T
    else:
        y = jnp.einsum("btgi,giko->btkgo", x.reshape(B, T, g, spec.cin // g), w.reshape(g, spec.cin // g, n * s, -1))
    y = y.reshape(B, T, n, s, spec.cout)                            # [B, T, n, s, Cout]
    full = sum(jnp.pad(y[:, :, m], ((0, 0), (m, n - 1 - m), (0, 0), (0, 0))) for m in range(n))
    full = full.reshape(B, (T + n - 1) * s, spec.cout)              # every touched sample, bias-free
    full = full.at[:, :overhang.shape[1]].add(overhang)
    out, overhang = full[:, :T * s], full[:, T * s:]
    return (out + p["b"] if spec.bias else out), overhang


def elu(x):
    return jax.nn.elu(x)


# ----------------------------------------------------------------------------------------------
# SEANet. A residual block is x + conv1x1(elu(conv_k(elu(x)))); the identity skip keeps it causal.

def resblock(p, spec, x, state):
    h, s1 = conv1d(p["conv1"], spec["conv1"], elu(x), state["conv1"])
    h, s2 = conv1d(p["conv2"], spec["conv2"], elu(h), state["conv2"])
    return x + h, {"conv1": s1, "conv2": s2}


def seanet_encoder(p, spec, x, state):
    # x [B, S, channels] -> [B, S / hop_length, dimension]
    new = {"stages": []}
    x, new["conv_in"] = conv1d(p["conv_in"], spec["conv_in"], x, state["conv_in"])
    for ps, ls, ss in zip(p["stages"], spec["stages"], state["stages"]):
        res = []
        for pr, lr, sr in zip(ps["res"], ls["res"], ss["res"]):
            x, st = resblock(pr, lr, x, sr)
            res.append(st)
        x, down = conv1d(ps["down"], ls["down"], elu(x), ss["down"])
        new["stages"].append({"res": res, "down": down})
    x, new["conv_out"] = conv1d(p["conv_out"], spec["conv_out"], elu(x), state["conv_out"])
    return x, new


def seanet_decoder(p, spec, x, state):
    # x [B, T, dimension] -> [B, T * hop_length, channels]; no final activation, no clipping
    new = {"stages": []}
    x, new["conv_in"] = conv1d(p["conv_in"], spec["conv_in"], x, state["conv_in"])
    for ps, ls, ss in zip(p["stages"], spec["stages"], state["stages"]):
        x, up = conv_transpose1d(ps["up"], ls["up"], elu(x), ss["up"])
        res = []
        for pr, lr, sr in zip(ps["res"], ls["res"], ss["res"]):
            x, st = resblock(pr, lr, x, sr)
            res.append(st)
        new["stages"].append({"up": up, "res": res})
    x, new["conv_out"] = conv1d(p["conv_out"], spec["conv_out"], elu(x), state["conv_out"])
    return x, new


# ----------------------------------------------------------------------------------------------
# 25 Hz <-> 12.5 Hz. Down: a learnt strided conv whose left padding repeats the very first latent
# frame (Kyutai's pad_mode="replicate"), so the state remembers whether the stream has started.
# Up: a depthwise transposed conv.

def downsample(w, cfg: MimiConfig, x, state):
    # x [B, 2T, D] -> [B, T, D]
    history = jnp.where(state["first"][:, None, None], x[:, :1], state["history"])
    y, history = conv1d({"w": w}, downsample_layout(cfg), x, history)
    return y, {"history": history, "first": jnp.zeros_like(state["first"])}


def upsample(w, cfg: MimiConfig, x, overhang):
    # x [B, T, D] -> [B, 2T, D]
    return conv_transpose1d({"w": w}, upsample_layout(cfg), x, overhang)


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
    # latent [B, T, D] -> codes int32 [B, K, T]
    n_sem = cfg.num_semantic
    codes = rvq_encode(p["semantic"], latent, min(num_codebooks, n_sem))
    if num_codebooks > n_sem:
        codes = jnp.concatenate([codes, rvq_encode(p["acoustic"], latent, num_codebooks - n_sem)], axis=1)
    return codes


def dequantize(p, cfg: MimiConfig, codes):
    # codes [B, K, T] -> latent [B, T, D]: the sum of both RVQs' reconstructions
    n_sem = cfg.num_semantic
    latent = rvq_decode(p["semantic"], codes[:, :n_sem])
    if codes.shape[1] > n_sem:
        latent = latent + rvq_decode(p["acoustic"], codes[:, n_sem:])
    return latent


# ----------------------------------------------------------------------------------------------
# The transformers: helium layers (LayerNorm, interleaved RoPE, LayerScale, GELU MLP, 250-step
# window, ring KV cache), applied one by one from a list. helium's own stack stores layers stacked
# and runs them in a lax.scan, which slices (copies) every layer's weights on each call: for a
# 2-step streaming call on CPU that copy costs as much as the layer itself.

def transformer_cache(cfg: MimiConfig, batch_size: int, capacity: int | None = None) -> dict:
    tc = cfg.transformer
    shape = (batch_size, tc.num_heads, capacity or tc.cache_capacity(), tc.head_dim)
    return {"layers": [{"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in range(tc.num_layers)],
            "offset": jnp.zeros((), jnp.int32)}


def transformer_step(layers, cfg: MimiConfig, cache, x):
    # x [B, T, D] continues the sequence in `cache` -> new cache, [B, T, D]
    new = []
    for p, c in zip(layers, cache["layers"]):
        x, c = helium.layer(p, cfg.transformer, x, cache["offset"], c)
        new.append(c)
    return {"layers": new, "offset": cache["offset"] + x.shape[1]}, x


# ----------------------------------------------------------------------------------------------
# The two directions, one chunk at a time with explicit state. A chunk is any whole number of
# frames; the state carries conv tails, the transformer's ring KV cache and its position.

def encoder_state(cfg: MimiConfig, batch_size: int, capacity: int | None = None) -> dict:
    conv_states = jax.tree.map(lambda c: jnp.zeros(c.state_shape(batch_size)), encoder_layout(cfg), is_leaf=_is_conv)
    return {"seanet": conv_states,
            "transformer": transformer_cache(cfg, batch_size, capacity),
            "downsample": {"history": jnp.zeros(downsample_layout(cfg).state_shape(batch_size)),
                           "first": jnp.ones((batch_size,), bool)}}


def decoder_state(cfg: MimiConfig, batch_size: int, capacity: int | None = None) -> dict:
    conv_states = jax.tree.map(lambda c: jnp.zeros(c.state_shape(batch_size)), decoder_layout(cfg), is_leaf=_is_conv)
    return {"upsample": jnp.zeros(upsample_layout(cfg).state_shape(batch_size)),
            "transformer": transformer_cache(cfg, batch_size, capacity),
            "seanet": conv_states}


def encode_chunk(params, cfg: MimiConfig, state, wav):
    # wav [B, n * frame_size, channels] -> new state, latent [B, n, D] at 12.5 Hz (before quantization)
    x, seanet = seanet_encoder(params["encoder"], encoder_layout(cfg), wav, state["seanet"])    # [B, 2n, D]
    cache, x = transformer_step(params["encoder_transformer"], cfg, state["transformer"], x)
    x, down = downsample(params["downsample"], cfg, x, state["downsample"])                    # [B, n, D]
    return {"seanet": seanet, "transformer": cache, "downsample": down}, x


def decode_chunk(params, cfg: MimiConfig, state, codes):
    # codes [B, K, n] -> new state, wav [B, n * frame_size, channels]
    x = dequantize(params["quantizer"], cfg, codes)                                            # [B, n, D]
    x, up = upsample(params["upsample"], cfg, x, state["upsample"])                             # [B, 2n, D]
    cache, x = transformer_step(params["decoder_transformer"], cfg, state["transformer"], x)
    wav, seanet = seanet_decoder(params["decoder"], decoder_layout(cfg), x, state["seanet"])
    return {"upsample": up, "transformer": cache, "seanet": seanet}, wav


def _fp32(fn):
    """Mimi always runs in float32: make every matmul/conv full precision on accelerators too."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)
    return wrapped


def _check_codebooks(cfg: MimiConfig, num_codebooks: int):
    if not cfg.num_semantic <= num_codebooks <= cfg.num_quantizers:
        raise ValueError(f"num_codebooks={num_codebooks}: this Mimi has {cfg.num_quantizers} codebooks, "
                         f"use {cfg.num_semantic} to {cfg.num_quantizers}")


def _check_wav(cfg: MimiConfig, wav, what: str, whole_frames: bool):
    if wav.ndim != 3 or wav.shape[1] != cfg.channels or wav.shape[2] == 0:
        raise ValueError(f"{what}: expected audio [B, {cfg.channels}, samples>0], got shape {tuple(wav.shape)}")
    if whole_frames and wav.shape[2] % cfg.frame_size:
        raise ValueError(f"{what}: streaming input must be whole frames of {cfg.frame_size} samples, "
                         f"got {wav.shape[2]} (buffer the audio before calling)")


# ----------------------------------------------------------------------------------------------
# Streaming API: one state for both directions (they are independent), fixed shapes, constant
# memory. The KV caches have exactly `context` slots, like Kyutai's, so the results are Kyutai's
# streaming results (see the note at the top about streams longer than 10 s).

def init_state(cfg: MimiConfig, batch_size: int) -> dict:
    return {"encoder": encoder_state(cfg, batch_size), "decoder": decoder_state(cfg, batch_size)}


# The state passed in is donated: its buffers (KV caches above all) are updated in place, not copied.
# So a state must not be used twice: always continue from the one a step returns.

@functools.partial(jax.jit, static_argnames=("cfg", "num_codebooks"), donate_argnames=("enc_state",))
@_fp32
def _encode_step(params, cfg: MimiConfig, enc_state, frame, num_codebooks: int):
    _check_wav(cfg, frame, "mimi.encode_step", whole_frames=True)
    _check_codebooks(cfg, num_codebooks)
    enc_state, latent = encode_chunk(params, cfg, enc_state, frame.astype(jnp.float32).transpose(0, 2, 1))
    return enc_state, quantize(params["quantizer"], cfg, latent, num_codebooks)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("dec_state",))
@_fp32
def _decode_step(params, cfg: MimiConfig, dec_state, codes):
    _check_codebooks(cfg, codes.shape[1])
    dec_state, wav = decode_chunk(params, cfg, dec_state, codes.astype(jnp.int32))
    return dec_state, wav.transpose(0, 2, 1)


def encode_step(params, cfg: MimiConfig, state, frame, num_codebooks: int = 8):
    """frame [B, channels, n * frame_size] (usually n = 1) -> new state, codes int32 [B, K, n].

    `state["encoder"]` is consumed (its buffers are reused for the new state); keep the returned one.
    """
    enc_state, codes = _encode_step(params, cfg, state["encoder"], frame, num_codebooks)
    return dict(state, encoder=enc_state), codes


def decode_step(params, cfg: MimiConfig, state, codes):
    """codes int [B, K, n] -> new state, pcm float32 [B, channels, n * frame_size].

    `state["decoder"]` is consumed (its buffers are reused for the new state); keep the returned one.
    """
    dec_state, pcm = _decode_step(params, cfg, state["decoder"], codes)
    return dict(state, decoder=dec_state), pcm


# ----------------------------------------------------------------------------------------------
# Batch API: the streaming steps over chunks of `chunk_frames`, from a fresh state whose KV caches
# hold context + chunk steps. Every step then sees its full 250-step window, which is exactly the
# non-streaming result, and memory stays bounded by the chunk however long the audio. The chunk
# loop is a Python loop over one compiled step: XLA's CPU backend runs convolutions inside a
# lax.scan body several times slower than outside one.

CHUNK_FRAMES = 125   # 10 s


def _batch_capacity(cfg: MimiConfig, chunk: int, n_chunks: int) -> int:
    # KV slots so that every step of a chunk sees its whole window: the chunk plus the context
    # before it; a single chunk needs only its own steps.
    steps = chunk * cfg.downsample_stride
    return steps if n_chunks == 1 else cfg.context + steps


def encode(params, cfg: MimiConfig, wav, num_codebooks: int = 8, chunk_frames: int = CHUNK_FRAMES):
    """wav float32 [B, channels, S] at cfg.sample_rate -> codes int32 [B, K, ceil(S / frame_size)].

    The audio is right-padded with zeros to whole frames, as Kyutai's `MimiModel.encode` does.
    """
    _check_wav(cfg, wav, "mimi.encode", whole_frames=False)
    B, _, S = wav.shape
    n_frames = -(-S // cfg.frame_size)
    chunk = min(chunk_frames, n_frames)
    n_chunks = -(-n_frames // chunk)
    wav = jnp.pad(jnp.asarray(wav, jnp.float32), ((0, 0), (0, 0), (0, n_chunks * chunk * cfg.frame_size - S)))
    state = encoder_state(cfg, B, capacity=_batch_capacity(cfg, chunk, n_chunks))
    codes, size = [], chunk * cfg.frame_size
    for i in range(n_chunks):
        state, c = _encode_step(params, cfg, state, wav[:, :, i * size:(i + 1) * size], num_codebooks)
        codes.append(c)
    return jnp.concatenate(codes, axis=-1)[:, :, :n_frames]


def decode(params, cfg: MimiConfig, codes, chunk_frames: int = CHUNK_FRAMES):
    """codes int [B, K, T] (any 1 <= K <= num_quantizers) -> wav float32 [B, channels, T * frame_size]."""
    B, K, T = codes.shape
    if T == 0:
        raise ValueError(f"mimi.decode: no frames to decode (codes of shape {tuple(codes.shape)})")
    if not isinstance(codes, jax.core.Tracer):      # out-of-range codes would silently gather a clamped entry
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < 0 or hi >= cfg.codebook_size:
            raise ValueError(f"mimi.decode: codes must be in [0, {cfg.codebook_size}), got values in [{lo}, {hi}]")
    chunk = min(chunk_frames, T)
    n_chunks = -(-T // chunk)
    codes = jnp.pad(jnp.asarray(codes, jnp.int32), ((0, 0), (0, 0), (0, n_chunks * chunk - T)))
    state, wav = decoder_state(cfg, B, capacity=_batch_capacity(cfg, chunk, n_chunks)), []
    for i in range(n_chunks):
        state, pcm = _decode_step(params, cfg, state, codes[:, :, i * chunk:(i + 1) * chunk])
        wav.append(pcm)
    return jnp.concatenate(wav, axis=-1)[:, :, :T * cfg.frame_size]


# ----------------------------------------------------------------------------------------------
# Random init (for tests and demos; real weights come from convert.load_mimi). Convs get
# N(0, 1/fan_in) weights and zero biases, the transformers helium's init, codebooks N(0, 0.1^2).
# All of Mimi's own weights come from one normal draw, cut up: on CPU, XLA compiles the random
# generator anew for every distinct shape (about a second each), and a codec has dozens.

def init(key, cfg: MimiConfig) -> dict:
    d, D, bins, n_sem = cfg.codebook_dim, cfg.dimension, cfg.codebook_size, cfg.num_semantic
    convs = {"encoder": encoder_layout(cfg), "decoder": decoder_layout(cfg),
             "downsample": downsample_layout(cfg), "upsample": upsample_layout(cfg)}
    specs, tree = jax.tree.flatten(convs, is_leaf=_is_conv)
    fan_in = [c.cin // c.groups * (max(1, c.kernel // c.stride) if c.transposed else c.kernel) for c in specs]
    rvq = lambda n: [((d, D), D ** -0.5), ((D, d), d ** -0.5), ((n, bins, d), 0.1)]
    draws = [(c.weight_shape, f ** -0.5) for c, f in zip(specs, fan_in)] + rvq(n_sem) + rvq(cfg.num_quantizers - n_sem)
    k_weights, k_enc, k_dec = jax.random.split(key, 3)
    flat = jax.random.normal(k_weights, (sum(math.prod(shape) for shape, _ in draws),))
    arrays, offset = [], 0
    for shape, scale in draws:
        arrays.append(scale * flat[offset:offset + math.prod(shape)].reshape(shape))
        offset += math.prod(shape)
    conv_params = [{"w": w, "b": jnp.zeros((c.cout,))} if c.bias else {"w": w} for c, w in zip(specs, arrays)]
    params = jax.tree.unflatten(tree, conv_params)
    params["downsample"], params["upsample"] = params["downsample"]["w"], params["upsample"]["w"]
    q = arrays[len(specs):]
    params["quantizer"] = {"semantic": dict(zip(("input_proj", "output_proj", "codebooks"), q[:3])),
                           "acoustic": dict(zip(("input_proj", "output_proj", "codebooks"), q[3:]))}
    for name, k in (("encoder_transformer", k_enc), ("decoder_transformer", k_dec)):
        stacked = helium.init(k, cfg.transformer)
        params[name] = [jax.tree.map(lambda a: a[i], stacked) for i in range(cfg.num_layers)]
    return params


# ----------------------------------------------------------------------------------------------
# Audio in and out, for the other scripts. A file is read block by block (a second at a time, so an
# hour of audio costs the memory of a second), mixed down if asked, and resampled on the fly.
# Resampling is band-limited interpolation: output sample j sits at input time t_j = j * sr_in /
# sr_out = j * down / up (up/down in lowest terms) and is sum_k x[k] h(t_j - k), h a lowpass sinc
# cut just below the lower of the two Nyquist rates, tapered by a Kaiser window. t_j has only `up`
# distinct fractional parts, so h is tabulated once per "phase": a polyphase resampler. t_j is split
# into integer and fraction in exact integer arithmetic and each output is the same dot product
# whenever it is computed, so a file resampled block by block equals the file resampled at once.

class AudioError(ValueError):
    """An audio file that cannot be used: names the file and the problem."""


class Resampler:
    """Streaming resampler: `r(block)` takes input [..., n] and returns the output samples that input
    completes [..., m] (float32); `r(block, final=True)` also flushes the rest, reading silence past
    the end. Stopband about -110 dB, passband to 0.94 Nyquist."""

    def __init__(self, sr_in: int, sr_out: int, zero_crossings: int = 32, rolloff: float = 0.945, beta: float = 12.0):
        g = math.gcd(sr_in, sr_out)
        self.up, self.down = sr_out // g, sr_in // g                  # t_j = j * down / up
        self.cutoff = rolloff * min(1.0, self.up / self.down)         # lowpass edge, a fraction of the input Nyquist
        self.half_width = zero_crossings / self.cutoff                # h(tau) = 0 for |tau| > half_width
        self.beta = beta
        reach = math.ceil(self.half_width)
        self.taps = np.arange(-reach, reach + 1)                      # output j reads inputs floor(t_j) + taps
        # one filter per phase [up, taps]; for rates with no small common divisor, per output instead
        self.table = None if self.up > 4096 else self.kernel(np.arange(self.up)[:, None] / self.up - self.taps)
        self.buffer = None                                            # input [..., n] from index `start` on
        self.start = self.received = self.produced = 0                # input index, inputs seen, outputs given

    def kernel(self, tau):
        """h(tau) in float64: the windowed sinc, zero beyond half_width."""
        u = np.clip(tau / self.half_width, -1.0, 1.0)
        h = self.cutoff * np.sinc(self.cutoff * tau) * np.i0(self.beta * np.sqrt(1.0 - u * u)) / np.i0(self.beta)
        return np.where(np.abs(tau) > self.half_width, 0.0, h)

    def outputs_for(self, n_in: int) -> int:
        """Outputs with t_j < n_in: ceil(n_in * up / down)."""
        return -(-n_in * self.up // self.down)

    def __call__(self, block, final: bool = False):
        block = np.asarray(block, np.float32)
        self.buffer = block if self.buffer is None else np.concatenate([self.buffer, block], axis=-1)
        self.received += block.shape[-1]
        end = self.outputs_for(self.received)                         # every output, once the input is complete
        if not final:                                                 # those whose right-most tap has arrived
            end = min(end, max(self.produced, self.outputs_for(self.received - self.taps[-1])))
        pad = np.zeros(self.buffer.shape[:-1] + (len(self.taps),), np.float32)
        padded = np.concatenate([pad, self.buffer, pad], axis=-1)    # taps beyond the buffer read silence
        windows = np.lib.stride_tricks.sliding_window_view(padded, len(self.taps), axis=-1)
        todo = np.arange(self.produced, end)
        out = [self._outputs(windows, j) for j in np.array_split(todo, max(1, -(-len(todo) // 1024)))]
        self.produced = end
        keep_from = (end * self.down) // self.up + self.taps[0]      # the next output's first tap
        if keep_from > self.start:
            self.buffer = self.buffer[..., keep_from - self.start:]
            self.start = keep_from
        return np.concatenate(out, axis=-1).astype(np.float32)

    def _outputs(self, windows, j):
        """Outputs j [m] from windows [..., positions, taps] of the zero-padded buffer -> [..., m]."""
        base, phase = (j * self.down) // self.up, (j * self.down) % self.up
        x = windows[..., base + self.taps[0] - self.start + len(self.taps), :]                 # [..., m, taps]
        h = self.table[phase] if self.table is not None else self.kernel(phase[:, None] / self.up - self.taps)
        return np.sum(x * h, axis=-1)                                                          # float64


def resample(x, sr_in: int, sr_out: int, zero_crossings: int = 32, rolloff: float = 0.945, beta: float = 12.0):
    """x [..., S] -> float32 [..., ceil(S * sr_out / sr_in)], in one go (Resampler, fed once)."""
    x = np.asarray(x, np.float32)
    if sr_in == sr_out:
        return x
    return Resampler(sr_in, sr_out, zero_crossings, rolloff, beta)(x, final=True)


def audio_info(path) -> tuple[int, int, int]:
    """(sample_rate, samples, channels) of an audio file, or an AudioError saying why not."""
    import soundfile as sf
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: cannot read audio (no such audio file)")
    try:
        info = sf.info(path)
    except Exception as e:   # soundfile raises LibsndfileError, RuntimeError, TypeError or OSError
        raise AudioError(f"{path}: cannot read audio ({e})") from e
    if info.frames <= 0 or info.channels <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    return info.samplerate, info.frames, info.channels


def resampled_length(path, sample_rate: int = 24000) -> int:
    """How many samples read_audio / read_blocks give at `sample_rate`, from the header alone."""
    sr, samples, _ = audio_info(path)
    return -(-samples * sample_rate // sr)


def read_blocks(path, sample_rate: int | None = 24000, mono: bool = False, block_seconds: float = 1.0):
    """Yield a file as float32 blocks [channels, n] at `sample_rate` (None: the file's), one block
    of input read at a time. mono: the channels' average [n], taken before resampling (one channel
    to resample instead of several)."""
    import soundfile as sf
    sr, _, _ = audio_info(path)
    resampler = None if sample_rate in (None, sr) else Resampler(sr, sample_rate)
    blocksize = max(1, int(sr * block_seconds))
    try:
        with sf.SoundFile(os.fspath(path)) as f:
            while True:
                block = f.read(blocksize, dtype="float32", always_2d=True).T                  # [channels, n]
                final = block.shape[1] < blocksize
                if mono:
                    block = block.mean(axis=0)
                if resampler is not None:
                    block = resampler(block, final=final)
                if block.shape[-1]:
                    yield block
                if final:
                    return
    except (RuntimeError, TypeError, OSError) as e:      # a file that breaks off: soundfile's errors
        raise AudioError(f"{path}: cannot read audio ({e})") from e


def read_audio(path, sample_rate: int | None = 24000) -> np.ndarray:
    """Any file soundfile reads -> float32 [channels, samples], resampled to `sample_rate` (None: keep).
    The blocks of read_blocks, joined: the same samples however the file is read."""
    return np.concatenate(list(read_blocks(path, sample_rate)), axis=-1)


def mix_down(wav) -> np.ndarray:
    """[..., channels, samples] -> [..., 1, samples], the average of the channels."""
    wav = np.asarray(wav, np.float32)
    return wav.mean(axis=-2, keepdims=True)


def frames_of(blocks, num_samples: int, frame_size: int = 1920):
    """Cut a stream of mono blocks [n] into ceil(num_samples / frame_size) frames [frame_size] for
    encode_step: the stream is cut at `num_samples`, or continued with silence up to it, and the
    last frame zero-padded (as `encode` pads). 1920 is Mimi's 80 ms frame."""
    blocks, buf, given = iter(blocks), np.zeros(0, np.float32), 0
    for _ in range(-(-num_samples // frame_size)):
        while len(buf) < frame_size:
            block = next(blocks, None) if given < num_samples else None
            if block is None:                        # past the end of the stream, or of num_samples
                block = np.zeros(frame_size - len(buf), np.float32)
            else:
                block = block[: num_samples - given]
                given += len(block)
            buf = np.concatenate([buf, block])
        yield buf[:frame_size]
        buf = buf[frame_size:]


def write_audio(path, wav, sample_rate: int) -> None:
    """Write [channels, samples] (or [samples], or [1, channels, samples]) atomically, clipped to [-1, 1]."""
    import soundfile as sf
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 3 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2:
        raise AudioError(f"{path}: expected audio [channels, samples], got shape {wav.shape}")
    # Written under a temporary name beside `path`, then renamed: a crash leaves no half file. (The
    # other scripts use convert.atomic_path; mimi.py imports nothing but helium.py.) soundfile
    # creates the file itself, so it gets the usual permissions, and reads the format off its suffix.
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}{'' if os.path.splitext(name)[1] else '.wav'}")
    try:
        sf.write(tmp, np.clip(wav, -1.0, 1.0).T, sample_rate)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (TypeError, ValueError, RuntimeError)):
            raise AudioError(f"{path}: cannot write audio ({e})") from e
        raise


# ----------------------------------------------------------------------------------------------
# Command line: a round trip through the codec.

def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Mimi round trip: audio in (any rate, any channels: resampled to 24 kHz, mixed to mono) "
                    "-> codes -> audio out.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]) + "\n\nexamples:\n"
               "  python mimi.py talk.wav talk_mimi.wav --weights tokenizer-e351c8d8-checkpoint125.safetensors\n"
               "  python mimi.py talk.wav out.wav --weights W --num-codebooks 32 --codes codes.npy --stream\n"
               "  python mimi.py --bench --seconds 10      # speed next to the official PyTorch package",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="audio file to encode")
    ap.add_argument("output", nargs="?", help="where to write the decoded audio (24 kHz mono)")
    ap.add_argument("--weights", help="Mimi checkpoint, e.g. tokenizer-e351c8d8-checkpoint125.safetensors")
    ap.add_argument("--num-codebooks", type=int, default=8, help="codebooks to use (1-32; Moshi uses 8)")
    ap.add_argument("--codes", help="also save the codes, int32 [1, K, frames], to this .npy file")
    ap.add_argument("--stream", action="store_true", help="run frame by frame (80 ms) through the streaming API")
    ap.add_argument("--bench", action="store_true", help="run `bench.py --only mimi` (extra arguments pass on)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bench" in argv and not {"-h", "--help"} & set(argv):    # everything else goes to bench.py
        bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
        if not os.path.exists(bench):
            sys.exit("bench.py is not next to mimi.py")
        sys.exit(subprocess.call([sys.executable, bench, "--only", "mimi", *(a for a in argv if a != "--bench")]))
    args = ap.parse_args(argv)
    if not (args.input and args.output and args.weights):
        ap.error("give INPUT OUTPUT and --weights (or --bench)")
    import convert   # reads Kyutai's checkpoint; imported here so mimi.py needs only helium.py to import

    try:
        params, cfg = convert.load_mimi(args.weights)
        _check_codebooks(cfg, args.num_codebooks)
        wav = mix_down(read_audio(args.input, cfg.sample_rate))[None]                          # [1, 1, S]
    except ValueError as e:                      # CheckpointError, AudioError: they name the file
        sys.exit(f"mimi.py: {e}")
    S = wav.shape[-1]
    t0 = time.perf_counter()
    if args.stream:
        state, codes, out = init_state(cfg, 1), [], []
        for frame in frames_of([wav[0, 0]], S, cfg.frame_size):                               # [frame_size]
            state, c = encode_step(params, cfg, state, frame[None, None], args.num_codebooks)
            state, pcm = decode_step(params, cfg, state, c)
            codes.append(c)
            out.append(pcm)
        codes, out = jnp.concatenate(codes, -1), jnp.concatenate(out, -1)
    else:
        codes = encode(params, cfg, jnp.asarray(wav), args.num_codebooks)
        out = decode(params, cfg, codes)
    out = np.asarray(out)[0, :, :S]
    elapsed = time.perf_counter() - t0
    if args.codes:
        np.save(args.codes, np.asarray(codes, np.int32))
    write_audio(args.output, out, cfg.sample_rate)
    print(f"{S / cfg.sample_rate:.2f} s of audio -> codes {tuple(codes.shape)} -> {args.output} "
          f"({elapsed:.1f} s including compilation{', streaming' if args.stream else ''})")


if __name__ == "__main__":
    main()
