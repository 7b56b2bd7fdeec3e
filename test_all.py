"""The test suite: `python -m pytest -q test_all.py` (CI runs exactly the README's command).

Parity tests compare against outputs of the peers' own code -- Kyutai's official `moshi` 0.2.13,
NVIDIA's PersonaPlex, moshi-finetune, ByteDance-Seed's In-Place TTT -- saved under testdata/ by the
`testdata/make_*_fixtures.py` scripts (which need torch; these tests do not). Tolerances: fp32
relative error <= 1e-4 on activations/logits; exact equality on tokens and codes. Importing this
file runs no fixture script: `fixture(name)` loads one when a test first asks for it.

One section per file, in the order the files import each other (a file's tests in its section):
    flash.py       kernels vs their reference (values, gradients), the window's band, TPU lowering
    helium.py      Kyutai's StreamingTransformer (batch, streaming, wrap), bf16 norms, fused attention, int8
    audio.py       reading and resampling files, writing them whole, BS.1770 loudness
    mimi.py        Kyutai's Mimi (full size and tiny, batch and streaming, past the wrap), its CLI demo
    depformer.py   sampling (temperature, top-k, greedy)
    ttt.py         the official In-Place TTT MLP: parallel and streaming forms, chunk causality, init
    moshi.py       LMModel.forward / LMGen.step (three configs, bf16), KV rings, embeddings in, TTT
    convert.py     safetensors, atomic writes, both models' key tables (load, save, other namings), the CLI
    repo.py        finding a repo's files as Kyutai's CheckpointInfo does, and what its configs say
    data.py        moshi-finetune's interleaver, prepare, the window iterator, bad input
    sample.py      run_inference.py's and PersonaPlex's loops, .pt voices, the CLI, bad input
    train.py       the sharded step vs one device, LoRA (lora.py), TTT, the CLI (overfit, resume, NaNs, bad input), export
    checkpoint.py  sharded checkpoints on another mesh, --init-from, joining hosts
"""
import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import soundfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # before jax starts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import audio  # noqa: E402
import checkpoint  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import depformer  # noqa: E402
import flash  # noqa: E402
import helium  # noqa: E402
import lora  # noqa: E402
import mimi  # noqa: E402
import moshi  # noqa: E402
import repo  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import ttt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "testdata")


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Each function XLA compiles for the CPU keeps memory maps of its own, and Linux allows a
    process vm.max_map_count of them (65,530 by default): past that, LLVM fails with "Cannot
    allocate memory" and the suite dies in a compile (it got there by the train section). Past half
    the limit, the compiled code of earlier tests is let go."""
    yield
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f, open("/proc/sys/vm/max_map_count") as limit:
            if sum(1 for _ in f) > int(limit.read()) // 2:
                jax.clear_caches()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@functools.cache
def fixture(name):
    """A script of testdata/ (a fixture maker, random_weights.py), imported by its path on first use:
    everything above a fixture script's main() imports without torch."""
    spec = importlib.util.spec_from_file_location(f"_testdata_{name}", os.path.join(TESTDATA, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ================================================================================================
# flash.py
#
# The Pallas kernels (interpret mode on CPU) against their reference: values, gradients, the
# window's band, lowering for TPU.


@pytest.mark.parametrize("context", [None, 50])
def test_flash_attention_kernel_matches_reference(context):
    """The Pallas kernels (interpret mode on CPU) against the plain attention, values and gradients,
    with a length that is not a multiple of the blocks and a window that skips whole blocks."""
    cfg = helium.TransformerConfig(64, 2, 1, 128, context=context)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 200, 64))
    run = lambda p, attention: helium.transformer(p, dataclasses.replace(cfg, attention=attention), x)[1]   # noqa: E731
    loss = lambda p, attention: jnp.sum(jnp.sin(run(p, attention)))                                    # noqa: E731
    y_ref, y_flash = (run(params, a) for a in ("xla", "flash"))
    assert rel_err(y_flash, y_ref) < 1e-5
    g_ref, g_flash = (jax.grad(loss)(params, a) for a in ("xla", "flash"))
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-4
    q, k, v = (jax.random.normal(kk, (1, 2, 200, 64)) for kk in jax.random.split(jax.random.key(2), 3))
    small_blocks = flash.flash_attention(q, k, v, context, 64, 128)
    assert rel_err(small_blocks, flash.reference_attention(q, k, v, context)) < 1e-5
    # the backward kernels (dK/dV over query blocks, dQ over key blocks) with many small blocks
    w = jax.random.normal(jax.random.key(3), (2, 3, 37, 16))
    q, k, v = (jax.random.normal(kk, (2, 3, 37, 16)) for kk in jax.random.split(jax.random.key(4), 3))
    window = None if context is None else 9
    kernel = jax.grad(lambda *qkv: jnp.sum(w * flash.flash_attention(*qkv, window, 8, 16)), (0, 1, 2))(q, k, v)
    plain = jax.grad(lambda *qkv: jnp.sum(w * flash.reference_attention(*qkv, window)), (0, 1, 2))(q, k, v)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(kernel, plain))
    # asked for where it cannot run, flash says so instead of quietly running something else
    flash_cfg = dataclasses.replace(cfg, attention="flash")
    with pytest.raises(ValueError, match="attention='flash' runs whole causal sequences"):
        helium.step(params, flash_cfg, helium.init_cache(flash_cfg, 1, capacity=4), x[:, :1])


def test_flash_kernels_visit_only_the_window_and_lower_for_tpu():
    """Each query block visits only the key blocks it can see: with a 256-frame window over 4096
    frames the grid's inner axis has 4 steps, not 32 (cost T x context, not T^2); the kernels,
    forward and backward, lower to Mosaic for TPU (jax.export, no TPU needed)."""
    assert flash._Band(128, 128, 32, 256, keys_inner=True).steps == 4
    assert flash._Band(128, 128, 32, 256, keys_inner=False).steps == 4
    assert flash._Band(128, 128, 32, None, keys_inner=True).steps == 32
    q = jnp.zeros((1, 2, 1024, 128), jnp.bfloat16)
    loss = lambda q, k, v: flash.flash_attention(q, k, v, 256, interpret=False).astype(jnp.float32).sum()  # noqa: E731
    lowered = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1, 2))), platforms=["tpu"])(q, q, q)
    assert lowered.mlir_module().count("tpu_custom_call") == 3            # forward, dK/dV, dQ


# ================================================================================================
# helium.py
#
# Fixture: testdata/make_helium_fixtures.py (Kyutai's StreamingTransformer, three flavours, and its
# bf16 norms). Also the fused attention paths, int8 matmuls and refused options.


HELIUM_CONFIGS = {
    "mimi": helium.TransformerConfig(32, 4, 2, 64, context=6, norm="layer_norm", gating="none", layer_scale=0.01),
    "lm": helium.TransformerConfig(32, 4, 2, int(4.125 * 32), context=5),
    "dep": helium.TransformerConfig(32, 4, 2, int(4.125 * 32), positional_embedding="none",
                                    weights_per_step=4, weights_per_step_schedule=(0, 1, 2, 2)),
    "noncausal": helium.TransformerConfig(32, 4, 2, 64, causal=False, context=5),
}


@pytest.mark.parametrize("name", sorted(HELIUM_CONFIGS))
def test_helium_matches_official_transformer(name):
    """Batch and streaming outputs of Kyutai's StreamingTransformer, incl. its ring-cache wrap."""
    cfg = HELIUM_CONFIGS[name]
    d = np.load(os.path.join(TESTDATA, "helium_fixture.npz"))
    sd = {k.split("|")[1]: d[k] for k in d.files if k.startswith(name + "|")}   # in-memory naming
    sd = convert.to_disk_names(sd, lambda _: cfg.num_weight_sets)
    rows = convert.transformer_rows("layers.", (), cfg)
    convert.check_keys(convert.row_keys(rows), {k: v.shape for k, v in sd.items()}, name)
    params = convert.from_disk(rows, sd, name)
    x = jnp.asarray(d[name + "_x"])
    T = x.shape[1]
    steps = tuple(range(T))
    _, y = helium.transformer(helium.select_step_weights(params, cfg, steps), cfg, x)
    assert rel_err(y, d[name + "_y"]) < 1e-5
    chunk = 1 if cfg.weights_per_step else 2
    for layers, stacked in ((params, True), (helium.unstack_layers(params), False)):
        cache, ys = helium.init_cache(cfg, x.shape[0], stacked=stacked), []
        for t in range(0, T, chunk):
            p = helium.select_step_weights(layers, cfg, tuple(range(t, t + chunk)))
            cache, yt = helium.step(p, cfg, cache, x[:, t:t + chunk])
            ys.append(yt)
        assert rel_err(jnp.concatenate(ys, 1), d[name + "_ys"]) < 1e-5
    # and the weights survive the trip back to Kyutai's on-disk naming
    back = convert.to_disk(rows, params, name)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "rms_norm_f32"])
def test_helium_bf16_norms_round_like_torch(kind):
    """A bf16 norm gives Kyutai's bf16 result: torch's LayerNorm works in fp32 and rounds once, plain
    RMSNorm rounds after every op, rms_norm_f32 works in fp32 (at most 1% of values one ulp off)."""
    d = np.load(os.path.join(TESTDATA, "helium_fixture.npz"))
    prefix = f"norm_bf16_{kind}"
    p = {k.split("|")[1]: jnp.asarray(d[k].reshape(-1), jnp.bfloat16) for k in d.files if k.startswith(prefix + "|")}
    y = jax.jit(helium.norm, static_argnums=1)(p, kind, jnp.asarray(d["norm_bf16_x"], jnp.bfloat16))
    assert y.dtype == jnp.bfloat16                   # (jitted: XLA may fuse ops, yet must round the same)
    y, ref = np.asarray(y, np.float32), d[prefix + "_y"]
    ulp = np.exp2(np.floor(np.log2(np.abs(ref) + 1e-30)) - 7)             # bf16 keeps 8 significant bits
    assert np.all(np.abs(y - ref) <= ulp) and np.mean(y != ref) <= 0.01


def test_helium_streaming_equals_batch_within_window():
    """One step at a time through a ring cache equals the sliding-window batch pass, past the wrap."""
    cfg = helium.TransformerConfig(32, 4, 2, 128, context=8)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    _, y = helium.transformer(params, cfg, x)
    step = jax.jit(lambda c, xt: helium.step(params, cfg, c, xt))
    cache, ys = helium.init_cache(cfg, 2), []
    for t in range(x.shape[1]):
        cache, yt = step(cache, x[:, t:t + 1])
        ys.append(yt)
    assert cache["k"].shape[3] == 8                              # constant memory: 8 slots for 21 steps
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-5
    # the unstacked layout (generation's) gives the same steps, and round-trips to the stacked one
    layers = helium.unstack_layers(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.tree.map(lambda *xs: jnp.stack(xs), *layers)),
                                                     jax.tree.leaves(params)))
    step_list = jax.jit(lambda c, xt: helium.step(layers, cfg, c, xt))
    cache, ys_list = helium.init_cache(cfg, 2, stacked=False), []
    for t in range(x.shape[1]):
        cache, yt = step_list(cache, x[:, t:t + 1])
        ys_list.append(yt)
    assert len(cache["k"]) == 2 and cache["k"][0].shape == (2, 4, 8, 8)
    assert rel_err(jnp.concatenate(ys_list, 1), jnp.concatenate(ys, 1)) < 1e-6


def test_helium_is_causal():
    """d output[t] / d input[s] is exactly zero for s > t, and for s <= t - context."""
    cfg = helium.TransformerConfig(16, 2, 2, 64, context=3)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 10, 16))
    jac = jax.jacobian(lambda x: helium.transformer(params, cfg, x)[1][0, 5].sum())(x)[0]   # [T, D]
    touched = np.abs(np.asarray(jac)).sum(-1) > 0
    # 2 layers of window 3 reach back 2 * (3 - 1) = 4 steps: inputs 1..5 matter, nothing else.
    assert touched.tolist() == [t in range(1, 6) for t in range(10)]


@pytest.mark.parametrize("context", [None, 7])
def test_helium_fused_attention_equals_ours(context):
    """attention='cudnn' is jax.nn.dot_product_attention with Moshi's window as local_window_size:
    run here with its XLA implementation (cuDNN needs a GPU), it equals our masked attention, values
    and gradients; on this CPU the default for training is XLA's."""
    cfg = helium.TransformerConfig(32, 4, 1, 64, context=context, attention="cudnn")
    q, k, v, w = (jax.random.normal(kk, (2, 4, 23, 8)) for kk in jax.random.split(jax.random.key(0), 4))
    pos = jnp.arange(23)
    ours = lambda *qkv: helium.dot_product_attention(*qkv, helium.attention_mask(pos, pos, True, context))  # noqa: E731
    fused = lambda *qkv: helium.fused_attention(*qkv, cfg, implementation="xla")                              # noqa: E731
    assert rel_err(fused(q, k, v), ours(q, k, v)) < 1e-5
    grads = [jax.grad(lambda *qkv: jnp.sum(w * f(*qkv)), (0, 1, 2))(q, k, v) for f in (fused, ours)]
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(*grads))
    assert helium.default_attention(jnp.bfloat16) == "xla"               # (cpu: neither Pallas nor cuDNN)


def test_helium_int8_matmul_equals_dequantized_weights():
    """An int8 weight (per output channel, symmetric) multiplies like its dequantized matrix: exactly
    up to fp32 rounding in fp32, and as the bf16 matmul of the dequantized bf16 weight in bf16;
    per-step weights too; the quantization error itself is at most half a step per entry."""
    for shape, x_shape in (((48, 32), (3, 5, 32)), ((4, 48, 32), (3, 4, 32))):
        w = jax.random.normal(jax.random.key(1), shape)
        x = jax.random.normal(jax.random.key(2), x_shape)
        q = helium.quantize_int8(w)
        dequant = np.asarray(q["int8"], np.float32) * np.asarray(q["scale"])[..., None]
        assert q["int8"].dtype == jnp.int8 and np.abs(dequant - w).max() <= float(q["scale"].max()) / 2 + 1e-7
        assert rel_err(helium.linear(x, q), helium.linear(x, jnp.asarray(dequant))) < 1e-6
        x16, ref16 = x.astype(jnp.bfloat16), helium.linear(x.astype(jnp.bfloat16), jnp.asarray(dequant, jnp.bfloat16))
        assert helium.linear(x16, q).dtype == jnp.bfloat16 and rel_err(helium.linear(x16, q), ref16) < 2e-2


def test_helium_refuses_unsupported_options_by_name():
    """Kyutai's options that no released model uses are refused by name, also from an LM config."""
    for field, value in (("gating", "relu"), ("norm", "layer_norm_f32"), ("positional_embedding", "sin_rope")):
        with pytest.raises(ValueError, match=f"{field}='{value}' is not supported"):
            helium.TransformerConfig(16, 2, 1, 64, **{field: value})
    with pytest.raises(ValueError, match="depformer_gating|gating='tanh' is not supported"):
        moshi.LMConfig(depformer_gating="tanh")


# ================================================================================================
# audio.py
#
# Reading any rate and channel count block by block, the official scripts' resampler, writing, and
# BS.1770 loudness against pyloudnorm's numbers (recorded by testdata/make_sample_fixtures.py).


def test_audio_resampler_matches_sphn(tmp_path):
    """The official scripts' resampler (sphn's: rubato's FFT resampler), number for number: lengths
    ceil(S / n_in) * n_out, the same output within float32 rounding, also read from a 16-bit stereo
    file and block by block; a 1 kHz tone survives, delayed by half a chunk, and a tone above the
    new Nyquist is removed."""
    ref = np.load(os.path.join(TESTDATA, "audio_fixture.npz"))
    make = fixture("make_audio_fixtures")
    for rate in make.RATES:
        x = make.signal(rate)
        y = audio.resample(x[0], rate, 24000)
        assert y.shape == ref[f"resampled_{rate}"].shape and np.abs(y - ref[f"resampled_{rate}"]).max() < 1e-5
        soundfile.write(tmp_path / "in.wav", make.pcm16(x).T, rate, subtype="PCM_16")
        whole = audio.read_audio(tmp_path / "in.wav", 24000)
        assert whole.shape == ref[f"read_{rate}"].shape and np.abs(whole - ref[f"read_{rate}"]).max() < 1e-5
        assert audio.resampled_length(tmp_path / "in.wav", 24000) == whole.shape[1]
        blocks = list(audio.read_blocks(tmp_path / "in.wav", 24000, channel=1, block_seconds=0.013))
        assert np.array_equal(np.concatenate(blocks), whole[1])
    t = lambda sr, n: np.arange(n) / sr                                          # noqa: E731
    for sr_in, sr_out in ((44100, 24000), (24000, 16000), (16000, 48000)):
        r = audio.Resampler(sr_in, sr_out)
        y = r(np.sin(2 * np.pi * 1000 * t(sr_in, sr_in)).astype(np.float32), final=True)
        lag = (r.n_in // 2) * r.n_out / r.n_in                                   # 768 samples from 16 kHz
        mid = slice(len(y) // 4, len(y) // 2)
        assert np.abs(y[mid] - np.sin(2 * np.pi * 1000 * (np.arange(len(y)) - lag) / sr_out)[mid]).max() < 1e-6
    alias = audio.resample(np.sin(2 * np.pi * 15000 * t(44100, 44100)).astype(np.float32), 44100, 24000)
    assert np.abs(alias[2000:-2000]).max() < 1e-6


def test_audio_files_in_and_out(tmp_path):
    import soundfile
    rng = np.random.default_rng(0)
    stereo = (0.3 * rng.standard_normal((44100, 2))).astype(np.float32)
    soundfile.write(tmp_path / "in.wav", stereo, 44100, subtype="FLOAT")
    wav = audio.read_audio(tmp_path / "in.wav", 24000)
    assert wav.shape == (2, 24080) and wav.dtype == np.float32                # 43 chunks of 1029 -> 560
    assert np.array_equal(audio.read_audio(tmp_path / "in.wav", None), stereo.T)
    # read a second at a time, or in 0.05 s blocks: the same samples as the whole file resampled at once
    assert np.array_equal(wav, audio.resample(stereo.T, 44100, 24000))
    blocks = list(audio.read_blocks(tmp_path / "in.wav", 24000, block_seconds=0.05))
    assert len(blocks) > 10 and np.array_equal(np.concatenate(blocks, axis=-1), wav)
    assert audio.resampled_length(tmp_path / "in.wav", 24000) == 24080
    mono = audio.mix_down(wav)[:, :24000]
    assert mono.shape == (1, 24000) and np.allclose(mono[0], wav[:, :24000].mean(0))
    audio.write_audio(tmp_path / "out.wav", 2 * mono, 24000)                      # clipped, not wrapped
    back, sr = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert sr == 24000 and back.shape == (24000,) and np.abs(back).max() <= 1.0
    assert np.abs(back - np.clip(2 * mono[0], -1, 1)).max() < 1e-4
    audio.write_audio(tmp_path / "out.wav", np.array([[1.0, -1.0, 0.5, 1 / 32768, -2.0]]), 24000)
    pcm, _ = soundfile.read(tmp_path / "out.wav", dtype="int16")     # as sphn.write_wav writes them
    assert pcm.tolist() == [32767, -32767, 16383, 0, -32767]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.wav"]   # no temp file left
    assert (tmp_path / "out.wav").stat().st_mode & 0o777 == _usual_mode()
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 24000)
    with pytest.raises(audio.AudioError, match="empty.wav: the file holds no audio"):
        audio.read_audio(tmp_path / "empty.wav", 24000)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(audio.AudioError, match="junk.wav: cannot read audio"):
        audio.read_audio(tmp_path / "junk.wav", 24000)
    with pytest.raises(audio.AudioError, match="missing.wav: cannot read audio"):
        audio.read_audio(tmp_path / "missing.wav", 24000)


def test_audio_refuses_non_finite_samples_device_targets_and_no_rate(tmp_path):
    """NaN or infinite samples would zero every code Mimi makes of the file: named, with where they
    start. A folder or device as the output is refused (the rename would replace a device node), as
    is a rate that is no rate."""
    import soundfile
    wav = np.zeros((48000, 1), np.float32)
    wav[30000:30100] = np.nan
    soundfile.write(tmp_path / "nan.wav", wav, 24000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match=r"nan.wav: NaN or infinite samples \(from about 1.00 s\)"):
        audio.read_audio(tmp_path / "nan.wav", 16000)
    (tmp_path / "adir.wav").mkdir()
    for target in (tmp_path / "adir.wav", "/dev/null"):
        with pytest.raises(audio.AudioError, match="not a regular file"):
            audio.write_audio(target, np.zeros((1, 10)), 24000)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    with pytest.raises(SystemExit):
        audio.main([str(tmp_path / "nan.wav"), str(tmp_path / "o.wav"), "--rate", "0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.wav", "nan.wav"]


def test_audio_reads_long_files_lazily(tmp_path):
    """The prompt, of any rate and channel count, through audio.read_blocks: one channel resampled as
    audio.read_audio does, block by block, in memory that does not grow with the file (a minute of
    44.1 kHz stereo)."""
    rng = np.random.default_rng(0)
    short = (0.3 * rng.standard_normal((30000, 2))).astype(np.float32)
    soundfile.write(tmp_path / "short.wav", short, 44100, subtype="FLOAT")
    streamed = np.concatenate(list(audio.read_blocks(str(tmp_path / "short.wav"), 24000, channel=0, block_seconds=0.05)))
    whole = audio.read_audio(tmp_path / "short.wav", 24000)[0]
    assert streamed.shape == whole.shape and np.abs(streamed - whole).max() < 1e-5
    long_path = tmp_path / "long.wav"
    with soundfile.SoundFile(long_path, "w", 44100, 2, subtype="PCM_16") as f:
        for _ in range(60):
            f.write(0.1 * rng.standard_normal((44100, 2)))
    n = audio.resampled_length(str(long_path), 24000)
    assert n == -(-60 * 44100 // 1029) * 560                   # 1440320: whole chunks of 1029 -> 560
    tracemalloc.start()
    count = sum(1 for _ in audio.frames_of(audio.read_blocks(str(long_path), 24000, channel=0), n, 1920))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == -(-n // 1920) and peak < 5e6        # the file is 21 MB as float32 at 44.1 kHz stereo
    frames = list(audio.frames_of([np.ones(5000, np.float32)], 4000, 1920))        # cut, then the last frame padded
    assert len(frames) == 3 and frames[2][:4000 - 3840].all() and not frames[2][160:].any()


def test_audio_loudness_matches_pyloudnorm():
    """BS.1770 integrated loudness (PersonaPlex normalises voice prompts to -24 LUFS with pyloudnorm)."""
    ref = np.load(os.path.join(TESTDATA, "sample_fixture.npz"))
    for name, x in fixture("make_sample_fixtures").loudness_signals():
        assert abs(audio.integrated_loudness(x, 24000) - float(ref[f"lufs_{name}"])) < 1e-6, name
    wav = fixture("make_sample_fixtures").read_prompt()
    assert abs(audio.integrated_loudness(audio.normalize_loudness(wav, 24000), 24000) + 24.0) < 1e-4
    with pytest.raises(audio.AudioError, match="lasts 0.36 s: loudness needs at least 0.4 s"):
        audio.normalize_loudness(wav[:8640], 24000)                 # pyloudnorm refuses it too


# ================================================================================================
# mimi.py
#
# Fixtures: testdata/make_mimi_fixtures.py (official moshi 0.2.13): full-size Mimi with every parameter
# and buffer random (rebuilt from testdata/mimi_keys.txt and a seed, written in Kyutai's on-disk naming
# and loaded through convert.load_mimi), on a chirp + noise; and the tiny config (mimi.TINY) whose
# 8-step KV cache wraps after 4 frames. Also audio input and output. Budget: < 4 min on 2 cores.


MIMI_TIE = 1e-5      # relative codebook-distance gap below which fp32 summation order picks the winner


def assert_codes_match(codes, ref, gaps, what, n_semantic=1):
    """Codes equal the official ones, except where Kyutai's own distances were tied up to fp32
    rounding (relative gap < MIMI_TIE, recorded by the fixture script): there the winner depends on
    summation order, so that code, and the later levels of the same RVQ (which then quantize another
    residual), may differ. A flip anywhere else fails, naming the code and its gap."""
    codes = np.asarray(codes)
    assert codes.shape == ref.shape, (codes.shape, ref.shape)
    diff, flips = codes != ref, 0
    for b, t in zip(*np.nonzero(diff.any(1))):
        for lo, hi in ((0, n_semantic), (n_semantic, codes.shape[1])):
            levels = np.nonzero(diff[b, lo:hi, t])[0]
            if len(levels):
                k = lo + levels[0]
                assert gaps[b, k, t] < MIMI_TIE, (
                    f"{what}: item {b} frame {t} codebook {k}: code {codes[b, k, t]} != official {ref[b, k, t]} "
                    f"(official relative distance gap {gaps[b, k, t]:.1e}: not a tie)")
                flips += 1
    assert flips <= max(1, diff.shape[0] * diff.shape[2] // 50), f"{what}: {flips} near-tie flips, too many"


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mimi_ref():
    return np.load(os.path.join(TESTDATA, "mimi_fixture.npz"))


@pytest.fixture(scope="module")
def full_mimi(tmp_path_factory):
    """Full-size random Mimi, through a 385 MB safetensors file in Kyutai's on-disk naming."""
    spec = fixture("random_weights").read_spec(os.path.join(TESTDATA, "mimi_keys.txt"))
    path = tmp_path_factory.mktemp("mimi") / "tokenizer-random.safetensors"
    convert.save_safetensors(path, fixture("random_weights").random_tensors(spec, fixture("make_mimi_fixtures").SEED, fixture("make_mimi_fixtures").overrides()))
    params, cfg = convert.load_mimi(path)
    os.unlink(path)
    assert cfg == mimi.MimiConfig()
    return params, cfg


def _tiny_checkpoint(ref, path, dtype=np.float32, rename=lambda k: k):
    tensors = {rename(k.split("|", 1)[1]): ref[k].astype(dtype) for k in ref.files if k.startswith("tiny|")}
    convert.save_safetensors(path, tensors)
    return tensors


def _stream(params, cfg, wav, num_codebooks, frames_per_call=1):
    """Frame by frame (or n frames per call): encode everything, then decode the codes, as the fixture
    script does."""
    F, codes, pcm = cfg.frame_size * frames_per_call, [], []
    enc, dec = mimi.encoder_state(cfg, wav.shape[0]), mimi.decoder_state(cfg, wav.shape[0])
    for i in range(wav.shape[-1] // F):
        enc, c = mimi.encode_step(params, cfg, enc, wav[..., i * F:(i + 1) * F], num_codebooks)
        codes.append(np.asarray(c))
    for c in codes:
        dec, p = mimi.decode_step(params, cfg, dec, c)
        pcm.append(np.asarray(p))
    return np.concatenate(codes, -1), np.concatenate(pcm, -1)


def test_mimi_full_size_batch_matches_official(full_mimi, mimi_ref):
    """Codes identical for 32 codebooks (and so for 8, their prefix); decoded audio within 1e-4."""
    params, cfg = full_mimi
    wav = fixture("make_mimi_fixtures").test_signal(fixture("make_mimi_fixtures").FULL_BATCH, fixture("make_mimi_fixtures").FULL_SAMPLES, seed=0)      # 70000: not whole frames
    assert fixture("make_mimi_fixtures").signal_digest(wav) == str(mimi_ref["full_signal_sha256"]), "test signal differs from the fixture's"
    ref32 = mimi_ref["full_codes32"]
    assert np.array_equal(ref32[:, :8], mimi_ref["full_codes8"])
    # The fixture is only worth something if the codes are spread over many entries.
    assert min(len(np.unique(ref32[:, k])) for k in range(32)) >= 20
    codes = np.asarray(mimi.encode(params, cfg, jnp.asarray(wav), num_codebooks=32))
    assert codes.dtype == np.int32 and codes.shape == (2, 32, 37)
    assert_codes_match(codes, ref32, mimi_ref["full_gaps32"], "batch, 32 codebooks")
    pcm = mimi.decode(params, cfg, jnp.asarray(mimi_ref["full_codes8"]))
    assert pcm.shape == (2, 1, 37 * 1920)
    assert rel_l2(pcm, mimi_ref["full_decoded8"]) < 1e-4


def test_mimi_full_size_streaming_matches_official(full_mimi, mimi_ref):
    """One 80 ms frame per call, 8 codebooks: codes equal Kyutai's streaming codes (which equal its
    batch codes here, < 10 s); streaming decode equals Kyutai's streaming decode."""
    params, cfg = full_mimi
    wav = fixture("make_mimi_fixtures").test_signal(fixture("make_mimi_fixtures").FULL_BATCH, fixture("make_mimi_fixtures").FULL_SAMPLES, seed=0)
    wav = np.pad(wav, ((0, 0), (0, 0), (0, -wav.shape[-1] % cfg.frame_size)))
    codes, pcm = _stream(params, cfg, wav, 8)
    assert np.array_equal(mimi_ref["full_stream_codes8"], mimi_ref["full_codes8"])
    assert_codes_match(codes, mimi_ref["full_stream_codes8"], mimi_ref["full_stream_gaps8"], "streaming")
    assert rel_l2(pcm, mimi_ref["full_stream_decoded8"]) < 1e-4


def test_mimi_full_size_streaming_past_the_cache_wrap(full_mimi, mimi_ref):
    """11.2 s streamed: past 10 s Kyutai's ring cache (250 slots, 2 steps per call) gives the first
    step of a frame 249 keys, so its streaming codes depart from its batch codes. Ours equal its
    streaming codes, and the decode after the wrap matches too."""
    params, cfg = full_mimi
    F = cfg.frame_size
    wav = fixture("make_mimi_fixtures").test_signal(1, fixture("make_mimi_fixtures").LONG_FRAMES * F, seed=1)
    assert fixture("make_mimi_fixtures").signal_digest(wav) == str(mimi_ref["long_signal_sha256"])
    enc, dec, codes, pcm = mimi.encoder_state(cfg, 1), mimi.decoder_state(cfg, 1), [], []
    for i in range(fixture("make_mimi_fixtures").LONG_FRAMES):
        enc, c = mimi.encode_step(params, cfg, enc, wav[..., i * F:(i + 1) * F], 8)
        dec, p = mimi.decode_step(params, cfg, dec, c)
        codes.append(np.asarray(c))
        pcm.append(np.asarray(p))
    assert enc["transformer"]["k"][0].shape[2] == dec["transformer"]["k"][0].shape[2] == 250   # constant memory
    codes, pcm = np.concatenate(codes, -1), np.concatenate(pcm, -1)
    ref, batch = mimi_ref["long_stream_codes8"], mimi_ref["long_batch_codes8"]
    departs = np.nonzero((ref != batch).any(1)[0])[0]
    assert len(departs) and departs.min() >= 125                # Kyutai's own streaming vs batch
    assert_codes_match(codes, ref, mimi_ref["long_stream_gaps8"], "long streaming")
    a, b = fixture("make_mimi_fixtures").LONG_WINDOW
    assert rel_l2(pcm[..., a * F:b * F], mimi_ref["long_stream_decoded8_window"]) < 1e-4


def test_mimi_tiny_matches_official_batch_and_streaming(tmp_path, mimi_ref):
    """A tiny config whose 8-step context wraps after 4 frames: batch (also cut into 5-frame chunks)
    equals Kyutai's batch; streaming equals Kyutai's streaming, which departs from its batch, also
    with more frames per call than the ring holds."""
    _tiny_checkpoint(mimi_ref, tmp_path / "tiny.safetensors")
    cfg = mimi.TINY
    params, _ = convert.load_mimi(tmp_path / "tiny.safetensors", cfg)
    wav = jnp.asarray(mimi_ref["tiny_wav"])
    codes = np.asarray(mimi.encode(params, cfg, wav, num_codebooks=8))
    assert_codes_match(codes, mimi_ref["tiny_codes"], mimi_ref["tiny_gaps"], "tiny batch")
    assert np.array_equal(np.asarray(mimi.encode(params, cfg, wav, 8, chunk_frames=5)), codes)
    assert rel_l2(mimi.decode(params, cfg, codes), mimi_ref["tiny_decoded"]) < 1e-4
    assert rel_l2(mimi.decode(params, cfg, codes, chunk_frames=5), mimi_ref["tiny_decoded"]) < 1e-4
    stream_codes, stream_pcm = _stream(params, cfg, np.asarray(wav), 8)
    assert not np.array_equal(mimi_ref["tiny_stream_codes"], mimi_ref["tiny_codes"])
    assert_codes_match(stream_codes, mimi_ref["tiny_stream_codes"], mimi_ref["tiny_stream_gaps"], "tiny streaming")
    assert rel_l2(stream_pcm, mimi_ref["tiny_stream_decoded"]) < 1e-4
    # 5 frames per call overfill the 8-step ring: the steps left with no key attend to nothing, as in torch
    multi_codes, multi_pcm = _stream(params, cfg, np.asarray(wav)[..., :20 * cfg.frame_size], 8, frames_per_call=5)
    assert_codes_match(multi_codes, mimi_ref["tiny_multi_codes"], mimi_ref["tiny_multi_gaps"], "tiny 5 per call")
    assert rel_l2(multi_pcm, mimi_ref["tiny_multi_decoded"]) < 1e-4


def test_mimi_streaming_with_nvidias_kv_ring_matches_personaplex(tmp_path):
    """NVIDIA's PersonaPlex fork streams Mimi through an older KV ring that hides one more key once full:
    hello.wav frame by frame through its tiny Mimi (8-step window: wrapped from the 4th frame) gives our
    codes with kv_ring="personaplex" exactly, and the same decoded audio; Kyutai's ring departs from it.
    The batch API has no ring, so the setting leaves it unchanged."""
    ref = np.load(os.path.join(TESTDATA, "sample_personaplex_wrap_fixture.npz"))
    spec = fixture("random_weights").read_spec(os.path.join(TESTDATA, "sample_mimi_keys.txt"))
    path = tmp_path / "tiny.safetensors"
    weights = fixture("random_weights").random_tensors(spec, fixture("make_sample_fixtures").MIMI_SEED, fixture("make_sample_fixtures").mimi_overrides())
    convert.save_safetensors(path, weights)
    kyutai = repo.mimi_config(fixture("make_sample_fixtures").MIMI_CONFIG)
    nvidia = dataclasses.replace(kyutai, kv_ring="personaplex")
    params, _ = convert.load_mimi(path, nvidia)
    wav = fixture("make_sample_fixtures").read_prompt()
    wav = wav[: len(wav) // nvidia.frame_size * nvidia.frame_size][None, None]
    codes, pcm = _stream(params, nvidia, wav, 8)
    np.testing.assert_array_equal(codes[0], ref["mimi_codes"])
    assert rel_l2(pcm[0, 0, :ref["mimi_pcm_head"].size], ref["mimi_pcm_head"]) < 1e-4
    assert not np.array_equal(_stream(params, kyutai, wav, 8)[0][0], ref["mimi_codes"])
    batch = np.asarray(mimi.encode(params, nvidia, jnp.asarray(wav)))
    assert np.array_equal(batch, np.asarray(mimi.encode(params, kyutai, jnp.asarray(wav))))
    two = np.asarray(mimi.encode(params, nvidia, jnp.asarray(wav[..., :2 * nvidia.frame_size])))
    assert np.array_equal(two, batch[..., :2])                   # one chunk: its cache is the chunk's size


def test_mimi_code_comparison_forgives_only_ties():
    ref, gaps = np.zeros((1, 3, 4), np.int32), np.full((1, 3, 4), 1e-2, np.float32)
    gaps[0, 1, 2] = 1e-7
    codes = ref.copy()
    codes[0, 1:, 2] = 5                      # a flip at a tie, and the level after it in the same RVQ
    assert_codes_match(codes, ref, gaps, "tie")
    codes[0, 0, 3] = 1                       # a semantic code with a clear winner
    with pytest.raises(AssertionError, match="frame 3 codebook 0: code 1 != official 0 .* not a tie"):
        assert_codes_match(codes, ref, gaps, "no tie")


def test_mimi_api_checks_and_random_init():
    cfg = mimi.TINY
    assert (cfg.frame_size, cfg.sample_rate, cfg.frame_rate) == (1920, 24000, 12.5)
    real = mimi.MimiConfig()
    assert (real.frame_size, real.frame_rate, real.hop_length) == (1920, 12.5, 960)
    params = mimi.init(jax.random.key(0), cfg)
    wav = jnp.zeros((1, 1, 4000))
    assert mimi.encode(params, cfg, wav, num_codebooks=2).shape == (1, 2, 3)
    assert mimi.decode(params, cfg, jnp.zeros((1, 3, 5), jnp.int32)).shape == (1, 1, 5 * 1920)
    state = mimi.encoder_state(cfg, 1)
    with pytest.raises(ValueError, match="whole frames of 1920 samples, got 2000"):
        mimi.encode_step(params, cfg, state, jnp.zeros((1, 1, 2000)))
    with pytest.raises(ValueError, match="num_codebooks=9"):
        mimi.encode(params, cfg, wav, num_codebooks=9)
    for bad in (jnp.zeros((1, 2, 40)), jnp.zeros((0, 1, 40))):
        with pytest.raises(ValueError, match=r"expected audio \[B>0, 1, samples>0\]"):
            mimi.encode(params, cfg, bad)
    with pytest.raises(ValueError, match="chunk_frames=0: must be at least 1"):
        mimi.encode(params, cfg, wav, chunk_frames=0)
    for bad in (jnp.zeros((8, 3), jnp.int32), jnp.zeros((1, 8, 3)), jnp.zeros((0, 8, 3), jnp.int32)):
        with pytest.raises(ValueError, match=r"mimi.decode: expected integer codes \[B>0, K, T\]"):
            mimi.decode(params, cfg, bad)
    with pytest.raises(ValueError, match=r"mimi.decode_step: expected integer codes \[B>0, K, T\], got int32 \(8, 1\)"):
        mimi.decode_step(params, cfg, mimi.decoder_state(cfg, 1), jnp.zeros((8, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 64\), got values in \[0, 64\]"):
        mimi.decode(params, cfg, jnp.full((1, 3, 5), 64, jnp.int32).at[0, 0, 0].set(0))


# ================================================================================================
# depformer.py
#
# Sampling (the depformer's, and the text token's).


def test_lm_sampling_is_softmax_top_k():
    """temp / top-k sampling: never outside the top k, frequencies of softmax(logits / temp) renormalised."""
    logits = jnp.asarray([2.0, 0.5, 1.0, -1.0, 1.5, 0.0])
    draws = depformer.sample_token(jnp.broadcast_to(logits, (20000, 6)), jax.random.key(0), temp=0.5, top_k=3)
    counts = np.bincount(np.asarray(draws), minlength=6) / 20000
    top = np.asarray([0, 4, 2])
    expected = np.zeros(6)
    expected[top] = np.exp(np.asarray(logits)[top] / 0.5) / np.exp(np.asarray(logits)[top] / 0.5).sum()
    assert counts[[1, 3, 5]].sum() == 0 and np.abs(counts - expected).max() < 0.015
    assert int(depformer.sample_token(logits, jax.random.key(0), 0.8, 250, greedy=True)) == 0
    for temp in (0.0, -1.0, float("nan")):           # Kyutai samples only when temp > 0, else argmax
        assert np.all(np.asarray(depformer.sample_token(jnp.broadcast_to(logits, (50, 6)),
                                                        jax.random.key(1), temp, 3)) == 0)


def test_depformer_generation_equals_forward_for_one_and_three_codebooks():
    """Codebook-by-codebook generation forced to the tokens forward sees gives forward's logits,
    also for a depformer of one codebook (dep_q = 1, which Kyutai's LMModel allows)."""
    for K in (1, 3):
        tcfg = helium.TransformerConfig(16, 2, 1, 32, positional_embedding="none", weights_per_step=K)
        cfg = depformer.DepformerConfig(num_steps=K, in_dim=24, card=32, text_card=20, transformer=tcfg)
        params = depformer.init(jax.random.key(K), cfg)
        h = jax.random.normal(jax.random.key(1), (2, 24))
        tokens = jax.random.randint(jax.random.key(2), (2, K), 0, 20)            # text, then codebooks
        full = depformer.forward(params, cfg, h[:, None], tokens[:, None])[:, 0]    # [B, K, card]
        sample = lambda logits, k: depformer.sample_token(logits, k, 0.8, 250)   # noqa: E731
        _, stepped = depformer.generate(params, cfg, h, tokens[:, 0], jax.random.key(3), sample,
                                        jnp.roll(tokens, -1, axis=1), jnp.ones((2, K), bool))
        assert stepped.shape == (2, K, 32) and rel_err(stepped, full) < 1e-5, K


# ================================================================================================
# ttt.py
#
# Fixtures: testdata/make_ttt_fixtures.py runs the official In-Place TTT MLP (ByteDance-Seed/
# In-Place-TTT's Qwen3MLP, read from its git mirror at run time) on random fp32 weights: lengths that
# are and are not multiples of the chunk, one partial chunk, with and without P, the layer's own
# input as target or a separate one, kernel 5. Budget: < 30 s on 2 cores.


TTT_CASES = ("hidden_proj", "embed_proj", "embed_noproj", "hidden_noproj", "partial_proj")


def _ttt_case(name):
    """A fixture case -> (inputs x, t, weights in ttt's layout, constants, official output, plain MLP)."""
    d = np.load(os.path.join(TESTDATA, "ttt_fixture.npz"))
    w = {k.split("|")[1]: jnp.asarray(d[k]) for k in d.files if k.startswith(name + "|")}
    weights = (jnp.concatenate([w["gate_proj"], w["up_proj"]], 0), w["down_proj"], w["ttt_conv"][:, 0],
               w.get("ttt_proj"))
    consts = dict(chunk_size=int(d[name + "_chunk"]), lr=float(d[name + "_lr"]))
    return (jnp.asarray(d[name + "_x"]), jnp.asarray(d[name + "_t"]), weights, consts,
            d[name + "_y"], d[name + "_y_plain"])


def _ttt_stream(x, t, weights, consts, dtype=jnp.float32):
    """Feed the streaming form one frame at a time -> (final state, outputs [B, T, D])."""
    B, T, D = x.shape
    step = jax.jit(lambda s, xi, ti: ttt.fast_weight_mlp_step(s, xi, ti, *weights, **consts))
    state = ttt.init_state(B, D, weights[1].shape[1], chunk_size=consts["chunk_size"], kernel_size=5,
                           dtype=dtype)
    ys = []
    for i in range(T):
        state, y = step(state, x[:, i:i + 1], t[:, i:i + 1])
        ys.append(y)
    return state, jnp.concatenate(ys, 1)


@pytest.mark.parametrize("name", TTT_CASES)
def test_ttt_parallel_matches_official_mlp(name):
    """The parallel (attention) form equals the official weight-form Qwen3MLP on every case."""
    x, t, weights, consts, y_ref, y_plain = _ttt_case(name)
    y = jax.jit(lambda x, t: ttt.fast_weight_mlp(x, t, *weights, **consts))(x, t)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert rel_err(y, y_ref) <= 1e-4
    if x.shape[1] > consts["chunk_size"]:          # the fast weights really act in these cases
        assert rel_err(y_ref, y_plain) > 0.3
    else:                                          # one partial chunk never updates: the plain MLP
        assert rel_err(y, y_plain) <= 1e-6


@pytest.mark.parametrize("name", TTT_CASES)
def test_ttt_streaming_equals_parallel(name):
    """One frame at a time through the fp32 state equals the parallel form, frame by frame."""
    x, t, weights, consts, _, _ = _ttt_case(name)
    state, ys = _ttt_stream(x, t, weights, consts)
    y = ttt.fast_weight_mlp(x, t, *weights, **consts)
    assert rel_err(ys, y) <= 1e-5
    assert int(state["frame"]) == x.shape[1] and state["sum_dw"].dtype == jnp.float32


def test_ttt_streaming_commits_on_the_completing_frame():
    """S stays 0 until the frame that completes a chunk; that frame's output still uses the old S;
    each batch row keeps its own S; bf16 buffers and inputs stay close to the parallel form."""
    x, t, weights, consts, _, _ = _ttt_case("hidden_proj")
    C = consts["chunk_size"]
    step = jax.jit(lambda s, xi, ti: ttt.fast_weight_mlp_step(s, xi, ti, *weights, **consts))
    state = ttt.init_state(2, 8, 12, chunk_size=C, kernel_size=5)
    plain = {"linear_in": weights[0], "linear_out": weights[1]}
    mlp_cfg = helium.TransformerConfig(8, 1, 1, 16)
    for i in range(C):
        assert not np.any(np.asarray(state["sum_dw"]))
        state, y = step(state, x[:, i:i + 1], t[:, i:i + 1])
        assert rel_err(y, helium.mlp(plain, mlp_cfg, x[:, i:i + 1])) <= 1e-6   # first chunk: W_down
    h = ttt.hidden_rows(x[:, :C], weights[0])
    v = ttt.sequence_targets(t[:, :C], weights[2], weights[3], C)
    assert rel_err(state["sum_dw"], jnp.einsum("bcd,bch->bdh", v, h)) <= 1e-5
    assert rel_err(state["sum_dw"][0], state["sum_dw"][1]) > 0.1                 # per-row state
    xb, tb = x.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
    wb = tuple(w.astype(jnp.bfloat16) for w in weights)
    _, ys = _ttt_stream(xb, tb, wb, consts, dtype=jnp.bfloat16)
    assert ys.dtype == jnp.bfloat16
    assert rel_err(ys, ttt.fast_weight_mlp(xb, tb, *wb, **consts)) <= 2e-2


def test_ttt_step_is_one_program_with_the_update_under_cond():
    """The step traces once for every frame, and its only chunk-sized product sits in a lax.cond
    branch: ordinary frames do the three per-frame matmuls (gate/up, W_down, S)."""
    x, t, weights, consts, _, _ = _ttt_case("embed_proj")
    traces = []

    def counted(s, xi, ti):
        traces.append(1)
        return ttt.fast_weight_mlp_step(s, xi, ti, *weights, **consts)
    step = jax.jit(counted)
    state = ttt.init_state(2, 8, 12, chunk_size=consts["chunk_size"], kernel_size=5)
    for i in range(x.shape[1]):
        state, _ = step(state, x[:, i:i + 1], t[:, i:i + 1])
    assert len(traces) == 1
    jaxpr = jax.make_jaxpr(counted)(state, x[:, :1], t[:, :1]).jaxpr
    names = [e.primitive.name for e in jaxpr.eqns]
    assert names.count("dot_general") == 3 and names.count("cond") == 1
    cond = jaxpr.eqns[names.index("cond")]
    assert any(e.primitive.name == "dot_general" for e in cond.params["branches"][1].jaxpr.eqns)
    assert not any(e.primitive.name == "dot_general" for e in cond.params["branches"][0].jaxpr.eqns)


def test_ttt_chunk_sees_only_earlier_chunks():
    """Changing chunk i's target changes no output of chunks <= i (its own ΔW is never applied to
    it, the conv stays inside it); changing chunk i's input changes no output of chunks < i."""
    k = jax.random.split(jax.random.key(3), 6)
    D, Hd, C, T = 8, 12, 3, 11
    weights = (helium.dense_init(k[0], (2 * Hd, D)), helium.dense_init(k[1], (D, Hd)),
               jax.random.normal(k[2], (D, 5)), helium.dense_init(k[3], (D, D)))
    x, t = jax.random.normal(k[4], (1, T, D)), jax.random.normal(k[5], (1, T, D))
    f = jax.jit(lambda x, t: ttt.fast_weight_mlp(x, t, *weights, chunk_size=C, lr=0.5))
    y = np.asarray(f(x, t))
    for i in range(3):
        frames = slice(i * C, (i + 1) * C)
        y_t = np.asarray(f(x, t.at[:, frames].add(1.0)))
        assert np.array_equal(y_t[:, :(i + 1) * C], y[:, :(i + 1) * C])
        assert not np.allclose(y_t[:, (i + 1) * C:], y[:, (i + 1) * C:])              # later ones move
        y_x = np.asarray(f(x.at[:, frames].add(1.0), t))
        assert np.array_equal(y_x[:, :i * C], y[:, :i * C])
        assert not np.allclose(y_x[:, frames], y[:, frames])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ttt_init_is_the_plain_mlp_and_the_conv_learns(dtype):
    """init_layer: conv 0, P a small diagonal -> exactly helium's gated MLP, yet d(out)/d(conv) != 0
    for every channel (through P) while d(out)/d(P) = 0."""
    cfg = ttt.TTTConfig(chunk_size=4)
    D, Hd = 16, 24
    k = jax.random.split(jax.random.key(5), 4)
    p = ttt.init_layer(k[0], D, cfg, dtype)
    assert p["conv"].shape == (D, 5) and not np.any(np.asarray(p["conv"], np.float32))
    proj = np.asarray(p["proj"], np.float32)
    assert np.array_equal(proj, np.diag(np.diag(proj))) and 0 < np.abs(proj).max() < 0.1
    assert 0.019 < np.diag(np.asarray(ttt.init_layer(k[0], 4096, cfg)["proj"])).std() < 0.021
    assert "proj" not in ttt.init_layer(k[0], D, dataclasses.replace(cfg, use_proj=False))
    mlp = {"linear_in": helium.dense_init(k[1], (2 * Hd, D), dtype),
           "linear_out": helium.dense_init(k[2], (D, Hd), dtype)}
    x = jax.random.normal(k[3], (2, 10, D), dtype)

    def ttt_mlp(conv, proj):
        return ttt.fast_weight_mlp(x, x, mlp["linear_in"], mlp["linear_out"], conv, proj,
                                   chunk_size=4, lr=cfg.lr)
    y = ttt_mlp(p["conv"], p["proj"])
    plain = helium.mlp(mlp, helium.TransformerConfig(D, 1, 1, 32), x)
    assert y.dtype == dtype and np.array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))
    loss = lambda conv, proj: jnp.sum(ttt_mlp(conv, proj).astype(jnp.float32) * jnp.cos(jnp.arange(D)))
    g_conv, g_proj = (np.asarray(g, np.float32) for g in jax.grad(loss, argnums=(0, 1))(p["conv"], p["proj"]))
    assert np.all(np.abs(g_conv).max(axis=1) > 0) and not np.any(g_proj)


def test_ttt_config_defaults_and_validation():
    cfg = ttt.TTTConfig()
    assert (cfg.layers, cfg.chunk_size, cfg.lr, cfg.target, cfg.kernel_size, cfg.use_proj) == \
        ((5, 11, 17, 23, 29), 256, 3.0, "hidden", 5, True)
    assert ttt.every_kth_layer(6, 0, 36) == (0, 6, 12, 18, 24, 30)
    assert ttt.TTTConfig(layers=[1, 4]).layers == (1, 4) and hash(ttt.TTTConfig(layers=[1, 4]))
    bad = [("layers", (3, 3)), ("layers", (-1,)), ("layers", (1.5,)), ("layers", (4, 2)), ("layers", 5),
           ("chunk_size", 0), ("chunk_size", 2.0), ("lr", -1.0), ("lr", float("nan")), ("lr", "3"),
           ("target", "input_embed"), ("kernel_size", 0), ("use_proj", 1)]
    for field, value in bad:
        with pytest.raises(ValueError, match=f"TTT config: {field}="):
            ttt.TTTConfig(**{field: value})
    with pytest.raises(ValueError, match="every_kth_layer"):
        ttt.every_kth_layer(0, 5, 32)
    cfg.check_num_layers(32)
    with pytest.raises(ValueError, match="names layer 29, but the transformer has 24 layers"):
        cfg.check_num_layers(24)
    x, conv = jnp.zeros((1, 5, 8)), jnp.zeros((8, 5))
    with pytest.raises(ValueError, match=r"ttt: w_out has shape \(12, 8\), expected \(8, 8\)"):
        ttt.fast_weight_mlp(x, x, jnp.zeros((16, 8)), jnp.zeros((12, 8)), conv, None, chunk_size=2, lr=1.0)


def test_ttt_command_line(capsys):
    ttt.main([])
    out = capsys.readouterr().out
    errors = {line.split(":")[0].strip(): float(line.split()[-1]) for line in out.splitlines()[1:]}
    assert errors["float32"] <= 1e-5 and errors["bfloat16"] <= 2e-2
    ttt.main(["--demo", "--steps", "2"])             # the recall demo's plumbing (its result needs ~1000 steps)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"recall beyond the window: ttt \d\.\d\d, no-ttt \d\.\d\d", last), last


# ================================================================================================
# moshi.py
#
# Fixtures: testdata/make_lm_fixtures.py runs Kyutai's LMModel / LMGen on three small configs with
# deterministic random weights (rebuilt here from the key list and seed: no weights committed):
# a = moshiko-shaped, b = PersonaPlex-shaped (dep_q 16), c = delays up to 4, weight schedule,
# low-rank embeddings, LayerNorm + sin embedding. Also TTT in the model. Budget: < 4 min on 2 cores.


def _lm_fixture(name, tmp_path, file_dtype=np.float32, dtype=jnp.float32):
    """(fixture arrays, params, cfg): the fixture checkpoint written to disk and read by convert.load_lm."""
    d = np.load(fixture("make_lm_fixtures").fixture_path(name))
    spec = [(n, tuple(json.loads(s))) for n, s in zip(d["spec_names"], d["spec_shapes"])]
    path = tmp_path / f"lm_{name}.safetensors"
    convert.save_safetensors(path, fixture("make_lm_fixtures").checkpoint(spec, file_dtype))
    cfg = repo.lm_config(json.loads(str(d["config_json"])))
    params = convert.load_lm(path, cfg, dtype=dtype)
    return d, params, cfg


def _positionwise_rel_err(ours, ref, mask):
    """max over unmasked positions of |ours - ref|_inf / |ref|_inf, each position's logits on their own."""
    ours, ref = np.asarray(ours, np.float64)[mask], np.asarray(ref, np.float64)[mask]
    return float((np.abs(ours - ref).max(-1) / np.abs(ref).max(-1)).max())


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_lm_forward_matches_official(name, tmp_path):
    """LMModel.forward: logits within 1e-4 at every unmasked position, identical masks."""
    d, params, cfg = _lm_fixture(name, tmp_path)
    out = jax.jit(lambda p, c: moshi.forward(p, cfg, c))(params, jnp.asarray(d["codes"]))
    for key in ("mask", "text_mask"):
        assert np.array_equal(np.asarray(out[key]), d[key]), key
    assert not d["mask"].all() and not d["text_mask"].all()       # the fixture does exercise the masks
    assert _positionwise_rel_err(out["logits"], d["logits"], d["mask"]) < 1e-4
    assert _positionwise_rel_err(out["text_logits"], d["text_logits"], d["text_mask"]) < 1e-4
    # where a delay leaves nothing to predict, Kyutai has NaN and we have zeros
    past_delay = np.isnan(d["logits"]).all(-1)
    assert past_delay.any() and np.all(np.asarray(out["logits"])[past_delay] == 0)


def _greedy_run(params, cfg, user, **kw):
    B, _, frames = user.shape
    state, outs = moshi.init_gen_state(params, cfg, B), []
    for n in range(frames):
        state, out = moshi.gen_step(params, cfg, state, jnp.asarray(user[:, :, n:n + 1]), jax.random.key(n),
                                    sampling=moshi.Sampling(greedy=True), **kw)
        outs.append(np.asarray(out))
    return np.stack(outs, axis=-1), state


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_lm_greedy_generation_matches_official(name, tmp_path):
    """LMGen(use_sampling=False) fed the same user codes: the same tokens, frame for frame, batch 2,
    past the wrap of the KV ring (context 6 or 4 < 14 frames)."""
    d, params, cfg = _lm_fixture(name, tmp_path)
    tokens, state = _greedy_run(params, cfg, d["gen_user"])
    assert tokens.shape == d["gen_tokens"].shape
    assert np.array_equal(tokens, d["gen_tokens"])
    assert state["kv"]["k"].shape[3] == cfg.context                      # constant memory
    if name == "c":              # the generation layout (layers as lists) gives the same tokens
        tokens, state = _greedy_run(moshi.generation_params(params), cfg, d["gen_user"])
        assert np.array_equal(tokens, d["gen_tokens"]) and isinstance(state["kv"]["k"], list)
    if name == "a":              # a codebook more than the model reads is dropped, as LMGen drops it
        extra = np.concatenate([d["gen_user"], d["gen_user"][:, :1]], axis=1)            # [B, 9, T]
        assert np.array_equal(_greedy_run(params, cfg, extra)[0], d["gen_tokens"])
    if name == "b":              # dep_q = n_q: LMGen reads no user codebook, so 8 given change nothing
        user = np.random.default_rng(0).integers(0, cfg.card, (2, 8, d["gen_tokens"].shape[-1]))
        assert np.array_equal(_greedy_run(params, cfg, user)[0], d["gen_tokens"])


def test_lm_bf16_checkpoint_matches_official_bf16(tmp_path):
    """A bf16 file loads as bf16 and greedy tokens equal Kyutai's model run in bf16 (not its fp32 run,
    which itself differs from its bf16 run after a few frames); dtype=float32 upcasts on request."""
    d, params, cfg = _lm_fixture("a", tmp_path, file_dtype=convert._BF16, dtype=None)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    tokens, _ = _greedy_run(params, cfg, d["gen_user"])
    assert np.array_equal(tokens, d["gen_tokens_bf16"])
    up = convert.load_lm(tmp_path / "lm_a.safetensors", cfg, dtype=jnp.float32)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(up))


@pytest.mark.parametrize("name", ["a", "c"])
def test_lm_q8_checkpoint_runs_as_kyutais_quantized_model(name, tmp_path):
    """A -q8 checkpoint (every nn.Linear as bitsandbytes int8 + its absmax, from Kyutai's own
    replace_linear_with_qlinear: testdata/make_lm_fixtures.py q8) loads for generation only, its int8
    matrices as they are; greedy tokens equal the official quantized model's (which differ from its
    float model's), forced text logits are within its fp16 matmul's rounding (10x closer than to the
    float model's). Training and LoRA are refused by name."""
    make, q = fixture("make_lm_fixtures"), np.load(os.path.join(TESTDATA, "lm_fixture_q8.npz"))
    d = np.load(make.fixture_path(name))
    tensors = make.checkpoint([(n, tuple(json.loads(s))) for n, s in zip(d["spec_names"], d["spec_shapes"])])
    tensors.update({k.split("|", 1)[1]: q[k] for k in q.files if k.startswith(name + "|")})
    path = tmp_path / "model.q8.safetensors"
    convert.save_safetensors(path, tensors)
    cfg = repo.lm_config(dict(json.loads(str(d["config_json"])), quantize=True))     # as a -q8 config.json
    with pytest.raises(convert.CheckpointError, match="a bitsandbytes int8 checkpoint .* to train, take the bf16"):
        convert.load_lm(path, cfg)
    with pytest.raises(convert.CheckpointError, match="runs \\(without LoRA\\); to merge LoRA, take the bf16"):
        convert.load_lm(path, cfg, int8=True, lora=(str(path), 2, 2.0))
    params = convert.load_lm(path, cfg, dtype=jnp.float32, stacked=False, int8=True)
    w = params["transformer"][0]["attn"]["in_proj"]
    assert w["int8"].dtype == jnp.int8 and w["scale"].dtype == jnp.float32
    assert np.array_equal(w["int8"], tensors["transformer.layers.0.self_attn.in_proj_weight"])
    assert np.allclose(w["scale"] * 127, tensors["transformer.layers.0.self_attn.in_proj_weight_scb"], rtol=1e-6, atol=0)
    assert jax.tree.all(jax.tree.map(np.array_equal, moshi.quantize_int8(params), params))     # kept as they are
    tokens, _ = _greedy_run(params, cfg, d["gen_user"])
    assert np.array_equal(tokens, q[f"{name}_gen_tokens"]) and not np.array_equal(tokens, d["gen_tokens"])
    text_logits = _forced_run(params, cfg, d["codes"], lookahead=0)[0]                       # [B, T, V]
    assert rel_err(text_logits, q[f"{name}_text_logits"][:, 0]) < 3e-3
    assert rel_err(text_logits, d["text_logits"][:, 0]) > 1e-2


@pytest.mark.parametrize("name,lookahead", [("b", 1), ("a", 1), ("c", 1), ("a", 0)])
def test_lm_forced_generation_reproduces_official_forward(name, lookahead, tmp_path):
    """Forcing every stream from `codes` (text, Moshi's codebooks, the user's) must make each streaming
    step see exactly what LMModel.forward saw: the text logits of call n are the forward's text logits
    of frame n. With PersonaPlex's lookahead the depformer is teacher-forced as well, so every audio
    logit matches too; and the frames returned are the forced codes."""
    d, params, cfg = _lm_fixture(name, tmp_path)
    codes = d["codes"]
    text_logits, audio_logits, returned = _forced_run(params, cfg, codes, lookahead)
    for n in range(codes.shape[-1]):
        assert rel_err(text_logits[:, n], d["text_logits"][:, 0, n]) < 1e-4, n
        for c in range(cfg.dep_q if lookahead else 0):
            t = n - cfg.delays[1 + c]
            if t >= 0:
                assert rel_err(audio_logits[:, n, c], d["logits"][:, c, t]) < 1e-4, (n, c)
    returned = returned[:, :, cfg.max_delay:]                         # call n returns frame n - max_delay
    assert np.array_equal(returned, codes[:, :1 + cfg.dep_q, :codes.shape[-1] - cfg.max_delay])


def _forced_run(params, cfg, codes, lookahead):
    """gen_step with every stream forced from codes [B, K, T] -> (text logits [B, T, V], audio logits
    [B, T, dep_q, card], the frames returned [B, 1 + dep_q, T])."""
    B, K, T = codes.shape
    n_user = 8 if cfg.dep_q == cfg.n_q else cfg.n_q - cfg.dep_q         # PersonaPlex: user on 9..16
    state, returned, logits = moshi.init_gen_state(params, cfg, B, lookahead=lookahead), [], []
    for n in range(T):
        frame = codes[:, :, n - 1 + lookahead] if n - 1 + lookahead >= 0 else np.full((B, K), -2)
        state, out, step_logits = moshi.gen_step(
            params, cfg, state, jnp.asarray(frame[:, K - n_user:, None]), jax.random.key(0),
            text=jnp.asarray(frame[:, 0]), moshi_codes=jnp.asarray(frame[:, 1:K - n_user]), return_logits=True)
        returned.append(np.asarray(out))
        logits.append(step_logits)
    text, audio = (np.stack([np.asarray(x[k]) for x in logits], 1) for k in ("text_logits", "audio_logits"))
    return text, audio, np.stack(returned, axis=-1)


def test_lm_kv_ring_is_kyutais_unless_the_model_is_personaplex(tmp_path):
    """Each model streams with its own code's KV ring: moshi 0.2.13's lets a step fed alone see the whole
    ring (capacity 4: step 3 sees 0..3, step 6 sees 3..6), NVIDIA's older one hides the oldest slot
    (1..3, 4..6). Kyutai's configs keep 0.2.13's and config.json never mentions it; PersonaPlex's (preset,
    or a checkpoint recognised by model_type or its 16 depformer heads) get NVIDIA's, temporal and depth
    transformers alike."""
    def seen(kv_ring, step):                   # the positions a step fed alone attends to
        pos = np.asarray(helium.ring_positions(jnp.asarray(step), 1, 4, kv_ring))
        return sorted(pos[np.asarray(helium.attention_mask(jnp.asarray([step]), pos, True, 4))[0]].tolist())
    assert [seen("kyutai", 3), seen("kyutai", 6)] == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert [seen("personaplex", s) for s in (3, 6, 2)] == [[1, 2, 3], [4, 5, 6], [0, 1, 2]]
    assert moshi.MOSHIKO.kv_ring == moshi.TINY.kv_ring == "kyutai"
    assert "kv_ring" not in repo.lm_config_dict(moshi.MOSHIKO)
    pp = moshi.PERSONAPLEX
    assert pp.temporal.kv_ring == pp.depformer.transformer.kv_ring == "personaplex"
    assert repo.lm_config(repo.lm_config_dict(pp)) == pp
    with pytest.raises(ValueError, match="kv_ring='ring' is not supported"):
        repo.lm_config(dict(repo.lm_config_dict(pp), kv_ring="ring"))
    with pytest.raises(ValueError, match="2 slots or more"):
        helium.ring_positions(jnp.asarray(0), 1, 1, "personaplex")
    heads = {f"linears.{i}.weight": np.zeros((1, 1), np.float32) for i in range(16)}
    convert.save_safetensors(tmp_path / "pp.safetensors", heads)
    convert.save_safetensors(tmp_path / "m.safetensors", dict(list(heads.items())[:8]))
    def ring(path, config=None, model_type="moshi"):
        ckpt = repo.Checkpoint(str(tmp_path / path), "", "", config, model_type=model_type)
        return repo.lm_config_for(ckpt).kv_ring
    tiny = repo.lm_config_dict(moshi.TINY)
    persona = (("pp.safetensors",), ("pp.safetensors", tiny), ("m.safetensors", tiny, "personaplex"))
    kyutai = (("m.safetensors",), ("m.safetensors", tiny), ("pp.safetensors", dict(tiny, kv_ring="kyutai")))
    assert [ring(*c) for c in persona] == ["personaplex"] * 3 and [ring(*c) for c in kyutai] == ["kyutai"] * 3


def test_lm_gen_step_from_an_input_embedding():
    """gen_step fed the summed embeddings of the tokens it would read is the same step as fed those
    tokens (what replays PersonaPlex's saved voices); a wrongly shaped embedding is named."""
    cfg = moshi.TINY_PERSONAPLEX
    params = moshi.init(jax.random.key(0), cfg)
    codes = np.asarray(jax.random.randint(jax.random.key(1), (2, 8, 3), 0, cfg.card))
    plain, fed = (moshi.init_gen_state(params, cfg, 2, lookahead=1) for _ in range(2))
    initial, key = jnp.asarray(cfg.initial_tokens()), jax.random.key(2)
    for n in range(3):
        here = jnp.where(n <= jnp.asarray(cfg.delays), initial, plain["tokens"][:, :, n % 4])   # position n
        embedding = moshi.embed_frames(params, cfg, here[:, :, None])[:, 0]                        # [B, D]
        user = codes[:, :, n:n + 1]
        plain, a, la = moshi.gen_step(params, cfg, plain, user, key, return_logits=True)
        fed, b, lb = moshi.gen_step(params, cfg, fed, user, key, embedding=embedding, return_logits=True)
        assert np.array_equal(a, b) and rel_err(lb["audio_logits"], la["audio_logits"]) < 1e-6
    with pytest.raises(ValueError, match=r"embedding must be \[B=2, dim=64\], got \(2, 32\)"):
        moshi.gen_step(params, cfg, fed, codes[:, :, :1], jax.random.key(2), embedding=jnp.zeros((2, 32)))


def test_lm_text_only_model_runs(tmp_path):
    """dep_q = 0 (Kyutai's STT shape): no depformer; forward gives text logits, generation text only;
    the checkpoint round-trips (with the unused `depformer_in` Kyutai builds anyway)."""
    cfg = moshi.LMConfig(delays=(0,) * 5, n_q=4, dep_q=0, card=16, text_card=20, dim=16, num_heads=2,
                         num_layers=1, context=4, depformer_multi_linear=False)
    params = moshi.init(jax.random.key(0), cfg)
    out = jax.jit(lambda p, c: moshi.forward(p, cfg, c))(params, jnp.zeros((1, 5, 6), jnp.int32))
    assert out["text_logits"].shape == (1, 1, 6, 20) and out["logits"].shape == (1, 0, 6, 16)
    tokens, _ = _greedy_run(params, cfg, np.zeros((1, 4, 3), np.int32))
    assert tokens.shape == (1, 1, 3) and (tokens >= 0).all()
    convert.save_lm(tmp_path / "stt.safetensors", params, cfg)
    assert "depformer_in.0.weight" in _load_safetensors(tmp_path / "stt.safetensors")
    again = convert.load_lm(tmp_path / "stt.safetensors", cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="3 user codebooks given; this model reads 4"):
        moshi.gen_step(params, cfg, moshi.init_gen_state(params, cfg, 1), jnp.zeros((1, 3, 1), jnp.int32),
                       jax.random.key(0))


TTT_LM = dataclasses.replace(moshi.TINY, ttt=ttt.TINY)       # TTT on layer 1 of 2, 4-frame chunks


def _ttt_lm(live=True):
    """moshi.TINY with TTT (and its base without): at init, or with the memory made live (a random conv)."""
    params = moshi.init(jax.random.key(0), TTT_LM)
    base = {k: v for k, v in params.items() if k != "ttt"}
    if live:
        params = dict(params, ttt=dict(params["ttt"], conv=0.3 * jax.random.normal(jax.random.key(5),
                                                                                   params["ttt"]["conv"].shape)))
    return params, base


def test_ttt_model_starts_as_its_base_model():
    """A Kyutai model with TTT added (conv zero, P diagonal) gives its base model's logits exactly, in
    forward and in greedy gen_step; the conv, P (once the conv moved) and the base weights get gradients."""
    params, base = _ttt_lm(live=False)
    codes = jax.random.randint(jax.random.key(1), (2, 17, 14), 0, 64)
    forward = lambda cfg: jax.jit(lambda p, c: moshi.forward(p, cfg, c))       # noqa: E731
    ours, theirs = forward(TTT_LM)(params, codes), forward(moshi.TINY)(base, codes)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ("logits", "text_logits"))
    user = np.asarray(jax.random.randint(jax.random.key(2), (2, 8, 12), 0, 64))
    assert np.array_equal(_greedy_run(params, TTT_LM, user)[0], _greedy_run(base, moshi.TINY, user)[0])
    loss = lambda p: jnp.sum(jnp.sin(moshi.forward(p, TTT_LM, codes)["text_logits"]))   # noqa: E731
    grad = jax.jit(jax.grad(loss))                         # compiled once for both: eager takes 20 s more
    grads = grad(params)
    assert np.abs(grads["ttt"]["conv"]).max() > 0 and np.abs(grads["transformer"]["mlp"]["linear_out"]).max() > 0
    grads = grad(_ttt_lm(live=True)[0])
    assert np.abs(grads["ttt"]["proj"]).max() > 0


def test_ttt_model_is_chunk_causal_and_streams_like_forward():
    """Changing the tokens of chunk i changes no output before chunk i (the conv looks ahead only inside
    a chunk, which never uses its own update); gen_step over three chunks, forced to follow the same
    tokens, gives forward's logits (the fast-weight state commits each chunk on time), in both layouts."""
    params, _ = _ttt_lm(live=True)
    codes = np.asarray(jax.random.randint(jax.random.key(1), (2, 17, 12), 0, 64))
    run = jax.jit(lambda c: moshi.forward(params, TTT_LM, c)["text_logits"])
    changed = codes.copy()
    changed[:, :, 4:6] = (changed[:, :, 4:6] + 1) % 64     # inputs 5, 6 (frame t is read at t + 1): chunk 1
    a, b = np.asarray(run(codes)), np.asarray(run(changed))
    # position 4 (chunk 1) would see them through the conv's look-ahead if chunk 1 used its own update
    assert np.array_equal(a[..., :5, :], b[..., :5, :]) and not np.allclose(a[..., 8:, :], b[..., 8:, :])
    for layout in (params, moshi.generation_params(params)):
        state = moshi.init_gen_state(layout, TTT_LM, 2, lookahead=1)
        for n in range(codes.shape[-1]):                                   # 12 frames: three chunks
            frame = jnp.asarray(codes[:, :, n])
            state, _, logits = moshi.gen_step(layout, TTT_LM, state, frame[:, 9:, None], jax.random.key(0),
                                              text=frame[:, 0], moshi_codes=frame[:, 1:9], return_logits=True)
            assert rel_err(logits["text_logits"], a[:, 0, n]) < 1e-4, n
        assert len(state["ttt"]) == 1 and state["ttt"][0]["sum_dw"].shape == (2, 64, TTT_LM.temporal.gating_hidden)


def test_ttt_model_generates_with_int8_weights():
    """sample.py --quantize int8 on a TTT model: the TTT layer's MLP weights are int8 too, and greedy
    generation gives the tokens of the same model with those int8 weights dequantized (fp32)."""
    params = moshi.generation_params(_ttt_lm(live=True)[0])
    quantized = moshi.quantize_int8(params)
    is_int8 = lambda w: isinstance(w, dict) and "int8" in w                        # noqa: E731
    dequantized = jax.tree.map(lambda w: w["int8"].astype(jnp.float32) * w["scale"][..., None] if is_int8(w)
                               else w, quantized, is_leaf=is_int8)
    user = np.asarray(jax.random.randint(jax.random.key(2), (2, 8, 10), 0, 64))
    tokens, state = _greedy_run(quantized, TTT_LM, user)
    expected, _ = _greedy_run(dequantized, TTT_LM, user)
    assert np.array_equal(tokens, expected) and np.abs(state["ttt"][0]["sum_dw"]).max() > 0


# ================================================================================================
# convert.py
#
# safetensors, atomic writes, key checking, both models' key tables (load, save, other namings),
# and the command line (inspect, the Mimi round trip).


def test_safetensors_round_trip_and_atomic_write(tmp_path):
    import ml_dtypes
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.ones((2, 5), ml_dtypes.bfloat16), "c": np.arange(3, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    convert.save_safetensors(path, tensors, {"format": "pt"})
    back = _load_safetensors(path)
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert isinstance(back["a"].base, np.memmap) or isinstance(back["a"], np.memmap)   # lazy, not a copy
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]                   # no temp file left
    assert path.stat().st_mode & 0o777 == _usual_mode()                                # not mkstemp's 0600


def test_safetensors_header_that_is_not_one_and_outputs_that_are_inputs(tmp_path):
    """A JSON header that is no safetensors header is named, not a TypeError or KeyError; an output
    that is a device or one of the inputs is refused before any work."""
    for name, header in [("list", []), ("entry", {"w": "x"}), ("offsets", {"w": {"dtype": "F32", "shape": [1]}})]:
        blob = json.dumps(header).encode()
        (tmp_path / name).write_bytes(len(blob).to_bytes(8, "little") + blob)
        with pytest.raises(convert.CheckpointError, match=f"{name}: not a safetensors file"):
            convert.SafeTensorsFile(tmp_path / name)
    (tmp_path / "in.wav").write_bytes(b"x")
    with pytest.raises(convert.OutputError, match="not a regular file"):
        convert.check_writable("/dev/null", "--out")
    with pytest.raises(convert.OutputError, match="in.wav is also an input"):
        convert.check_writable(tmp_path / "in.wav", "--out", (None, str(tmp_path / "in.wav")))
    convert.check_writable(tmp_path / "new.wav", "--out", (str(tmp_path / "in.wav"),))


def _load_safetensors(path):
    """Every tensor of a file, as memory-mapped numpy views (nothing is read until used)."""
    f = convert.SafeTensorsFile(path)
    return {k: f[k] for k in f.keys()}


def _usual_mode():
    """The permissions open() gives a new file here (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_writes_replace_whole_or_not_at_all(tmp_path):
    """convert.atomic_open (which sample.py, train.py and data.py write with): an interrupted write
    leaves the old file and no temporary; a finished one replaces it, with the usual permissions."""
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with convert.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with convert.atomic_open(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert target.stat().st_mode & 0o777 == _usual_mode()


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(convert.CheckpointError, match="missing key 'w'.*\\(3, 4\\)"):
        convert.check_keys({"w": (3, 4)}, {}, "model")
    with pytest.raises(convert.CheckpointError, match="key 'w' has shape \\(4, 3\\), expected \\(3, 4\\)"):
        convert.check_keys({"w": (3, 4)}, {"w": (4, 3)}, "model")
    with pytest.raises(convert.CheckpointError, match="unexpected key 'extra'"):
        convert.check_keys({}, {"extra": (1,)}, "model")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(convert.CheckpointError, match="junk.safetensors"):
        _load_safetensors(junk)


def test_lm_save_load_round_trip_and_namings(tmp_path):
    """load -> save -> load is lossless and writes Kyutai's on-disk names (the fixture script checks
    that Kyutai's LMModel loads our file with strict=True); the in-memory naming `in_projs.{i}` and
    the `in_proj.weight` variant load to the same params; bad keys are named with their shapes."""
    d, params, cfg = _lm_fixture("c", tmp_path)
    convert.save_lm(tmp_path / "saved.safetensors", params, cfg)
    saved = _load_safetensors(tmp_path / "saved.safetensors")
    assert sorted(saved) == sorted(str(n) for n in d["spec_names"])
    cfg2 = repo.lm_config(repo.lm_config_dict(cfg))
    again = convert.load_lm(tmp_path / "saved.safetensors", cfg2)
    assert cfg2 == cfg
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)))
    in_memory = {}
    for k, v in saved.items():
        for disk, mem in ((".self_attn.in_proj_weight", ".self_attn.in_projs."), (".self_attn.out_proj.weight", ".self_attn.out_projs.")):
            if k.endswith(disk):
                M = cfg.depformer.transformer.num_weight_sets if k.startswith("depformer.") else 1
                in_memory.update({k[:-len(disk)] + f"{mem}{i}.weight": w for i, w in enumerate(np.split(v, M))})
                break
        else:
            in_memory[k] = v
    convert.save_safetensors(tmp_path / "mem.safetensors", in_memory)
    variant = {k.replace(".in_proj_weight", ".in_proj.weight"): v for k, v in saved.items()}
    convert.save_safetensors(tmp_path / "variant.safetensors", variant)
    for f in ("mem.safetensors", "variant.safetensors"):
        loaded = convert.load_lm(tmp_path / f, cfg)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params))), f
    # the generation layout loads directly (layers as lists) and saves back to the same file
    listed = convert.load_lm(tmp_path / "saved.safetensors", cfg, stacked=False)
    expected = moshi.generation_params(params)
    assert isinstance(listed["transformer"], list) and isinstance(listed["depformer"]["transformer"], list)
    assert jax.tree.structure(listed) == jax.tree.structure(expected)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(listed), jax.tree.leaves(expected)))
    convert.save_lm(tmp_path / "from_list.safetensors", listed, cfg)
    from_list = _load_safetensors(tmp_path / "from_list.safetensors")
    assert sorted(from_list) == sorted(saved) and all(np.array_equal(from_list[k], saved[k]) for k in saved)
    bad = dict(saved, **{"linears.0.weight": np.zeros((5, 16), np.float32)})
    bad.pop("out_norm.weight")
    convert.save_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(convert.CheckpointError, match=r"missing key 'out_norm.weight'.*\n.*linears.0.weight' has shape \(5, 16\), expected \(32, 16\)"):
        convert.load_lm(tmp_path / "bad.safetensors", cfg)


def test_mimi_checkpoint_namings_dtypes_and_errors(tmp_path, mimi_ref):
    """bf16 files load (as fp32); in-memory attention names and old codebook buffer names load to the
    same params; save_mimi round-trips exactly and records the config; bad keys are named."""
    cfg = mimi.TINY
    tensors = _tiny_checkpoint(mimi_ref, tmp_path / "disk.safetensors")
    disk, _ = convert.load_mimi(tmp_path / "disk.safetensors", cfg)

    import ml_dtypes
    _tiny_checkpoint(mimi_ref, tmp_path / "bf16.safetensors", dtype=ml_dtypes.bfloat16)
    bf16, _ = convert.load_mimi(tmp_path / "bf16.safetensors", cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16))
    same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
    convert.save_safetensors(tmp_path / "rounded.safetensors", rounded)   # the same values, as fp32
    assert same(bf16, convert.load_mimi(tmp_path / "rounded.safetensors", cfg)[0])
    assert not same(bf16, disk)

    def in_memory(k):
        return k.replace(".self_attn.in_proj_weight", ".self_attn.in_projs.0.weight").replace(
            ".self_attn.out_proj.weight", ".self_attn.out_projs.0.weight").replace(
            "._codebook.cluster_usage", "._codebook.cluster_size").replace(
            "._codebook.embedding_sum", "._codebook.embed_avg").replace("._codebook._initialized", "._codebook.inited")
    _tiny_checkpoint(mimi_ref, tmp_path / "memory.safetensors", rename=in_memory)
    memory, _ = convert.load_mimi(tmp_path / "memory.safetensors", cfg)
    assert same(memory, disk)

    convert.save_mimi(tmp_path / "saved.safetensors", disk, cfg)
    again, cfg_again = convert.load_mimi(tmp_path / "saved.safetensors")          # config from the metadata
    assert cfg_again == cfg and same(again, disk)

    bad = dict(tensors)
    bad["upsample.convtr.convtr.convtr.weight"] = np.zeros((16, 1, 3), np.float32)
    del bad["quantizer.rvq_rest.vq.layers.0._codebook.embedding_sum"]
    bad["extra.weight"] = np.zeros(2, np.float32)
    convert.save_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_mimi(tmp_path / "bad.safetensors", cfg)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "unexpected key 'extra.weight'" in msg
    assert "missing key 'quantizer.rvq_rest.vq.layers.0._codebook.embedding_sum' (expected shape (64, 8))" in msg
    assert "key 'upsample.convtr.convtr.convtr.weight' has shape (16, 1, 3), expected (16, 1, 4)" in msg
    with pytest.raises(convert.CheckpointError, match="missing key"):
        convert.load_mimi(tmp_path / "disk.safetensors")                  # tiny file, default (full) config


def test_mimi_command_line_round_trip(tmp_path, mimi_ref, capsys):
    """python convert.py mimi in.wav out.wav --weights W --codes C: a 32 kHz stereo file in, 24 kHz mono
    out, batch or streaming; output paths that cannot be written are refused before any work, and
    `python mimi.py` (no weights) checks a random codec's batch against its streaming."""
    cfg = mimi.TINY
    _tiny_checkpoint(mimi_ref, tmp_path / "t.safetensors")
    params, _ = convert.load_mimi(tmp_path / "t.safetensors", cfg)
    convert.save_mimi(tmp_path / "tiny.safetensors", params, cfg)      # records the tiny config
    rng = np.random.default_rng(1)
    soundfile.write(tmp_path / "in.wav", (0.3 * rng.standard_normal((96000, 2))).astype(np.float32), 32000)
    run = lambda out, *extra: convert.main(["mimi", str(tmp_path / "in.wav"), str(out), "--weights",   # noqa: E731
                                            str(tmp_path / "tiny.safetensors"), "--num-codebooks", "3", *extra])
    run(tmp_path / "out.wav", "--codes", str(tmp_path / "codes.npy"))
    out, sr = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert sr == 24000 and out.shape == (72192,)              # 96000 samples at 32 kHz: 94 chunks of 1024 -> 768
    codes = np.load(tmp_path / "codes.npy")
    wav = audio.mix_down(audio.read_audio(tmp_path / "in.wav", 24000))[None]
    assert np.array_equal(codes, np.asarray(mimi.encode(params, cfg, jnp.asarray(wav), 3)))
    assert codes.shape == (1, 3, 38) and "codes (1, 3, 38)" in capsys.readouterr().out
    expected = np.asarray(mimi.decode(params, cfg, codes))[0, 0, :72192]
    assert np.abs(out - np.clip(expected, -1, 1)).max() < 1e-4              # 16-bit file
    run(tmp_path / "stream.wav", "--stream")            # (past 4 frames the tiny ring wraps: not the batch result)
    assert soundfile.read(tmp_path / "stream.wav", dtype="float32")[0].shape == out.shape
    before = sorted(p.name for p in tmp_path.iterdir())
    for out_path, extra, message in ((tmp_path, (), "is a folder"),
                                     (tmp_path / "x.wav", ("--codes", str(tmp_path / "no" / "c.npy")), "does not exist")):
        with pytest.raises(SystemExit, match=message):
            run(out_path, *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == before              # nothing written, nothing lost
    with pytest.raises(SystemExit):
        convert.main(["mimi", str(tmp_path / "in.wav"), str(tmp_path / "x.wav")])     # no --weights: usage
    mimi.main(["--frames", "2"])
    assert "streaming vs batch: codes identical" in capsys.readouterr().out
    for flags, message in ((["--num-codebooks", "0"], "--num-codebooks: num_codebooks=0: this Mimi has 8"),
                           (["--frames", "0"], "--frames must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            mimi.main(flags)
        assert message in capsys.readouterr().err


# ================================================================================================
# repo.py
#
# Finding a model's files as Kyutai's CheckpointInfo does (no network: a stand-in huggingface_hub),
# and config.json / Mimi config JSON parsing.


def _fake_hub(monkeypatch, hf_hub_download):
    """A stand-in huggingface_hub module (no network here): `hf_hub_download(repo, name) -> path`."""
    import sys
    import types
    hub, errors = types.ModuleType("huggingface_hub"), types.ModuleType("huggingface_hub.errors")
    errors.EntryNotFoundError = type("EntryNotFoundError", (Exception,), {})
    errors.LocalEntryNotFoundError = type("LocalEntryNotFoundError", (errors.EntryNotFoundError,), {})
    hub.errors, hub.hf_hub_download = errors, hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", errors)
    return hub


def test_lm_configs_and_7b_footprint(tmp_path):
    """config.json parsing: Kyutai's moshiko file gives the built-in preset, whose param tree (shapes
    only, nothing allocated) has Kyutai's 7,687,729,152 parameters in 355 on-disk tensors."""
    moshiko_json = dict(repo.lm_config_dict(moshi.MOSHIKO), depformer_causal=True, depformer_context=8,
                        moshi_name="model.safetensors", model_type="moshi")
    assert repo.lm_config(moshiko_json) == repo.lm_config(None) == moshi.MOSHIKO
    shapes = jax.eval_shape(lambda: moshi.init(jax.random.key(0), moshi.MOSHIKO, jnp.bfloat16))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 7_687_729_152
    keys = convert.lm_keys(moshi.MOSHIKO)
    assert len(keys) == 355 and sum(int(np.prod(s)) for s in keys.values()) == 7_687_729_152
    pp = convert.lm_keys(moshi.PERSONAPLEX)
    assert pp["depformer.layers.0.self_attn.in_proj_weight"] == (16 * 3 * 1024, 1024) and "linears.15.weight" in pp
    # Kyutai's depformer inherits main settings it does not override
    small = repo.lm_config({"delays": [0, 1], "n_q": 1, "dep_q": 1, "num_layers": 3, "gating": "silu",
                               "depformer_num_heads": 2, "depformer_weights_per_step": True})
    assert small.depformer_num_layers == 3 and small.depformer_gating == "silu"
    with pytest.raises(ValueError, match="unknown keys \\['dimm'\\]"):
        repo.lm_config({"dimm": 3})
    for bad, message in (({"dim": "64"}, "dim='64' should be int"), ({"num_heads": 4.0}, "num_heads=4.0 should be int"),
                         ({"ttt": {"layers": [1], "chunk": 4}}, "TTTConfig.* unexpected keyword argument 'chunk'"),
                         ({"dim": 64, "num_heads": 5}, "d_model=64 is not a multiple of num_heads=5"),
                         ({"context": 0}, "context=0 must be at least 1")):
        with pytest.raises(ValueError, match=message):                  # one line, not a traceback later
            repo.lm_config(bad)
    (tmp_path / "config.json").write_text(json.dumps({"dimm": 3}))
    with pytest.raises(ValueError, match=f"LM config {tmp_path / 'config.json'}: unknown keys"):   # names the file
        repo.lm_config(str(tmp_path / "config.json"))
    (tmp_path / "list.json").write_text("[3]")
    with pytest.raises(repo.CheckpointError, match="list.json\\) holds a JSON list, not an object"):
        repo.lm_config(str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match="demux_second_text_stream"):
        repo.lm_config({"demux_second_stream": True})
    assert repo.lm_config({"quantize": True}) == repo.lm_config({})     # a -q8 repo's: its file says it
    with pytest.warns(UserWarning, match="conditioners"):
        repo.lm_config(dict(moshiko_json, conditioners={"description": {}}, fuser={"sum": ["description"]}))
    with pytest.raises(ValueError, match="3 delays for 2 streams"):
        moshi.LMConfig(delays=(0, 1, 1), n_q=1, dep_q=1)


def test_sample_finds_weights_like_checkpoint_info(tmp_path):
    """Repo files, config.json's file names (moshi_name, mimi_name, tokenizer_name, mimi_config_name),
    single-file overrides, and files given alone with --config, as the official CheckpointInfo does."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("weights.safetensors", repo.MIMI_NAME, "tok.model", "other.safetensors"):
        (folder / name).write_bytes(b"x")
    (folder / "mimi.json").write_text(json.dumps(fixture("make_sample_fixtures").MIMI_CONFIG))
    (folder / "config.json").write_text(json.dumps(dict(fixture("make_sample_fixtures").LM_CONFIG, moshi_name="weights.safetensors",
                                                      tokenizer_name="tok.model", mimi_config_name="mimi.json")))
    ckpt = repo.find_checkpoint(str(folder))
    assert (ckpt.moshi, ckpt.mimi, ckpt.tokenizer) == (str(folder / "weights.safetensors"), str(folder / repo.MIMI_NAME),
                                                        str(folder / "tok.model"))
    assert ckpt.config == fixture("make_sample_fixtures").LM_CONFIG and ckpt.mimi_config == fixture("make_sample_fixtures").MIMI_CONFIG
    assert repo.mimi_config(ckpt.mimi_config) == mimi.TINY
    assert repo.lm_config(ckpt.config) == moshi.TINY and ckpt.gen_config == {}
    # names as Kyutai's hf_get takes them: file://PATH; and lm_gen_config kept for LMGen
    fx = fixture("make_sample_fixtures")
    (tmp_path / "elsewhere.json").write_text(json.dumps(fx.MIMI_CONFIG))
    names = dict(moshi_name="weights.safetensors", tokenizer_name="tok.model")
    (folder / "config.json").write_text(json.dumps(dict(fx.LM_CONFIG, **names, lm_gen_config={"temp": 0.5},
                                                      mimi_config_name=f"file://{tmp_path}/elsewhere.json")))
    ckpt = repo.find_checkpoint(str(folder))
    assert ckpt.mimi_config == fx.MIMI_CONFIG and ckpt.gen_config == {"temp": 0.5} and ckpt.config == fx.LM_CONFIG
    (folder / "config.json").write_text(json.dumps(dict(fx.LM_CONFIG, **names, mimi_name="file:///nowhere/m.safetensors")))
    with pytest.raises(convert.CheckpointError, match="config.json names 'file:///nowhere/m.safetensors': no such file"):
        repo.find_checkpoint(str(folder))
    (folder / "config.json").write_text(json.dumps(dict(fx.LM_CONFIG, moshi_name="weights.safetensors",
                                                      tokenizer_name="tok.model", mimi_config_name="mimi.json")))
    assert repo.find_checkpoint(str(folder), moshi=str(folder / "other.safetensors")).moshi == str(folder / "other.safetensors")
    alone = repo.find_checkpoint(None, str(folder / "other.safetensors"), str(folder / repo.MIMI_NAME),
                                    str(folder / "tok.model"), config=str(folder / "config.json"))
    assert alone.moshi == str(folder / "other.safetensors") and alone.mimi_config == fixture("make_sample_fixtures").MIMI_CONFIG
    assert repo.find_checkpoint(None, str(folder / "other.safetensors"), str(folder / repo.MIMI_NAME),
                                   str(folder / "tok.model")).config is None          # moshiko's config
    (folder / "config.json").write_text(json.dumps({"model_type": "stt"}))
    with pytest.raises(convert.CheckpointError, match="model_type='stt'"):
        repo.find_checkpoint(str(folder))
    # No LM config (moshiko's repo, or PersonaPlex's, whose config.json does not describe the LM):
    # moshiko's config, with as many depformer outputs as the checkpoint has heads.
    # PersonaPlex's config.json is exactly this (nvidia/personaplex-7b-v1).
    heads = {f"linears.{i}.weight": np.zeros((1, 1), np.float32) for i in range(16)}
    convert.save_safetensors(folder / repo.MOSHI_NAME, heads)
    (folder / "config.json").write_text(json.dumps({"model_type": "personaplex", "version": "7b-v1"}))
    ckpt = repo.find_checkpoint(str(folder), lm_only=True)
    assert ckpt.moshi == str(folder / repo.MOSHI_NAME)
    assert repo.lm_config_for(ckpt, lambda msg: None) == moshi.PERSONAPLEX
    convert.save_safetensors(folder / "moshiko.safetensors", dict(list(heads.items())[:8]))
    assert repo.lm_config_for(repo.Checkpoint(str(folder / "moshiko.safetensors"), "", "", None), print) == moshi.MOSHIKO


# ================================================================================================
# data.py
#
# Fixture: testdata/make_train_fixtures.py (moshi-finetune's own interleaver on hand-written
# alignment cases). A tiny dataset in moshi-finetune's format, prepared through the CLI.


def _train_spm():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(TESTDATA, "train_spm.model"))


def test_train_interleaver_matches_moshi_finetune(tmp_path, capsys):
    """Windows, text rows and audio validity, as moshi-finetune's loader made them: sphn's windows
    (the manifest's duration decides how many, starts are float32, a window past the audio is not
    there) and its InterleavedTokenizer (binary search on the file's word order, extra fields)."""
    sp = _train_spm()
    with open(os.path.join(TESTDATA, "train_interleaver.json")) as f:
        fixture = json.load(f)
    for word, pieces in fixture["pieces"].items():
        assert data.tokenize_word(sp, word) == pieces
    for case in fixture["cases"]:
        frames = data.window_frames(case["window_sec"])
        (tmp_path / "a.json").write_text(json.dumps({"alignments": case["alignments"]}))
        alignments = data.read_alignments(str(tmp_path / "a.json"))
        samples = round(case["file_sec"] * data.CODEC.sample_rate)
        starts, chunks, real_frames = data.cut_windows(np.ones((2, samples), np.float32), 24000, case["window_sec"],
                                                       case["manifest_sec"])
        assert starts == case["start_time_sec"], case["name"]
        assert (chunks.sum((1, 2)) / 2).tolist() == case["unpadded_len"], case["name"]
        for w, (start, real) in enumerate(zip(starts, real_frames)):
            assert (np.arange(frames) < real).astype(int).tolist() == case["audio_valid"][w], case["name"]
            got = data.window_text(sp, alignments, start, case["window_sec"], int(real))
            assert got.tolist() == case["text"][w], (case["name"], w)
    assert "not in time order" in capsys.readouterr().out


def test_data_windows_are_sphns_at_any_rate(tmp_path):
    """The audio of each window, as sphn.dataset_jsonl hands it to moshi-finetune: at 24 kHz, and at
    16 and 44.1 kHz read at the file's rate and resampled window by window (fixture:
    testdata/make_audio_fixtures.py); a window's real frames are those of its unpadded samples."""
    ref, make = np.load(os.path.join(TESTDATA, "audio_fixture.npz")), fixture("make_audio_fixtures")
    frames = round(make.WINDOW_SECONDS * data.CODEC.frame_rate)
    for rate in make.WINDOW_RATES:
        soundfile.write(tmp_path / "w.wav", make.pcm16(make.signal(rate, make.WINDOW_FILE_SECONDS)).T, rate,
                        subtype="PCM_16")
        wav, sr = data.load_stereo(str(tmp_path / "w.wav"))
        starts, chunks, real_frames = data.cut_windows(wav, sr, make.WINDOW_SECONDS, make.WINDOW_FILE_SECONDS)
        assert sr == rate and len(starts) == sum(k.startswith(f"window_{rate}_") for k in ref.files) == 3
        for k, real in enumerate(real_frames):
            want = ref[f"window_{rate}_{k}"][:, :frames * 1920]
            assert np.abs(chunks[k, :, :want.shape[1]] - want).max() < 1e-5, (rate, k)
            assert not chunks[k, :, want.shape[1]:].any() and real == -(-want.shape[1] // 1920), (rate, k)


# A Mimi with real 1920-sample frames (so windows are 80 ms frames) but a few hundred parameters.
TRAIN_MIMI = mimi.TINY


TRAIN_SENTENCES = ["hello there how are you doing today", "moshi listens and speaks at the same time",
                   "once upon a time there was a curious little cat"]


@pytest.fixture(scope="module")
def train_dataset(tmp_path_factory):
    """moshi-finetune's format: 3 stereo wavs (2.2 s) with alignments, plus 3 bad files; prepared
    by the CLI into 16-frame windows (2 per file) with a random tiny Mimi checkpoint."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    lines = []
    for i, sentence in enumerate(TRAIN_SENTENCES):
        t = np.arange(int(2.2 * data.CODEC.sample_rate)) / data.CODEC.sample_rate
        wav = np.stack([0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t), 0.1 * rng.standard_normal(t.shape)], 1)
        soundfile.write(root / f"talk{i}.wav", wav, data.CODEC.sample_rate)
        words = [[w, [0.1 + 0.25 * j, 0.3 + 0.25 * j], "SPEAKER_MAIN"] for j, w in enumerate(sentence.split())]
        (root / f"talk{i}.json").write_text(json.dumps({"alignments": words}))
        lines.append({"path": f"talk{i}.wav", "duration": 2.2})
    soundfile.write(root / "mono.wav", np.zeros(4800), data.CODEC.sample_rate)
    (root / "mono.json").write_text(json.dumps({"alignments": []}))
    soundfile.write(root / "no_alignments.wav", np.zeros((4800, 2)), data.CODEC.sample_rate)
    (root / "broken.wav").write_bytes(b"RIFF but not really a wav")
    (root / "broken.json").write_text(json.dumps({"alignments": []}))
    lines += [{"path": p, "duration": 0.2} for p in ("mono.wav", "no_alignments.wav", "broken.wav")]
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert.save_mimi(root / "mimi.safetensors", mimi.init(jax.random.key(0), TRAIN_MIMI), TRAIN_MIMI)
    with _fast_compile():
        index = train.main(["prepare", "--manifest", str(root / "data.jsonl"), "--out", str(root / "prepared"),
                            "--tokenizer", os.path.join(TESTDATA, "train_spm.model"),
                            "--mimi", str(root / "mimi.safetensors"), "--duration-sec", "1.28", "--encode-batch", "4"])
    mimi_params, _ = convert.load_mimi(root / "mimi.safetensors")
    return {"root": root, "prepared": str(root / "prepared"), "index": index, "mimi": mimi_params}


def test_train_prepare_windows_and_bad_files(train_dataset, fast_compile):
    """Token arrays: text as the interleaver builds it, Mimi codes of each window encoded on its
    own (as moshi-finetune does), -1 past the audio; bad files reported by name; the iterator."""
    root, index = train_dataset["root"], train_dataset["index"]
    assert [f["windows"] for f in index["files"]] == [2, 2, 2]
    reasons = {os.path.basename(s["source"]): s["reason"] for s in index["skipped"]}
    assert "expected stereo" in reasons["mono.wav"] and "no_alignments.json: missing" in reasons["no_alignments.wav"]
    assert "unreadable audio" in reasons["broken.wav"]
    with pytest.raises(data.DataError, match="mono.wav"):
        data.prepare(str(root / "data.jsonl"), str(root / "strict"), _train_spm(),
                      lambda chunks: np.zeros((len(chunks), 16, 16), np.int32), 1.28,
                      strict=True, read_audio=audio.read_audio, log=lambda *_: None)
    ds = data.TokenWindows(train_dataset["prepared"])
    tokens = np.load(os.path.join(train_dataset["prepared"], index["files"][1]["tokens"]))
    assert tokens.dtype == np.int16 and tokens.shape == (17, 32)
    wav = audio.read_audio(root / "talk1.wav", 24000)                                       # [2, 52800]
    alignments = data.read_alignments(str(root / "talk1.json"))
    # 2.2 s = 16 + 11.5 frames; float32(1.28) < 1.28, so sphn starts window 1 at sample 30719
    for w, (first, real) in enumerate([(0, 16), (30719, 12)]):
        window = ds[2 + w]
        assert window.tolist() == tokens[:, 16 * w:16 * (w + 1)].tolist()
        start = float(np.float32(1.28 * w))
        assert window[0].tolist() == data.window_text(_train_spm(), alignments, start, 1.28, real).tolist()
        alone = wav[:, first:first + 16 * 1920][:, None]                              # the window, unpadded
        codes = np.asarray(mimi.encode(train_dataset["mimi"], TRAIN_MIMI, alone, num_codebooks=8))
        assert np.array_equal(window[1:, :real], codes.reshape(16, -1)[:, :real])
        assert (window[1:, real:] == -1).all()
    assert "talk1.wav [1.28-2.56 s]" in ds.name(3)
    # the shuffled stream: every window once per epoch, resumable from any position
    ids = data.window_ids(len(ds), seed=5, position=0, count=18)
    assert sorted(ids[:6]) == list(range(6)) and sorted(ids[6:12]) == list(range(6))
    assert ids[7:15].tolist() == data.window_ids(len(ds), seed=5, position=7, count=8).tolist()
    assert ids.tolist() != data.window_ids(len(ds), seed=6, position=0, count=18).tolist()


def test_data_prepare_refuses_bad_input_and_loses_nothing(train_dataset, tmp_path, capsys):
    """prepare never mixes datasets (a non-empty --out is refused, its files untouched) and a failed run
    leaves nothing behind; bad flags, a bad tokenizer and unplaceable words are named in one line;
    a missing wav is reported as a missing wav, not as its missing .json."""
    root = train_dataset["root"]
    stub = lambda chunks: np.zeros((len(chunks), 16, 16), np.int32)                    # noqa: E731  no Mimi
    prep = lambda out, **kw: data.prepare(str(root / "data.jsonl"), str(out), _train_spm(), stub, 1.28,   # noqa: E731
                                          read_audio=audio.read_audio, log=print, **kw)
    before = {p: p.read_bytes() for p in (root / "prepared").rglob("*") if p.is_file()}
    with pytest.raises(data.DataError, match="prepared already holds index.json, tokens"):
        prep(root / "prepared")
    assert {p: p.read_bytes() for p in (root / "prepared").rglob("*") if p.is_file()} == before
    with pytest.raises(data.DataError, match="mono.wav"):
        prep(tmp_path / "strict", strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []                  # no half dataset, no tokens/
    cli = ["prepare", "--manifest", str(root / "data.jsonl"), "--mimi", str(root / "mimi.safetensors"),
           "--tokenizer", os.path.join(TESTDATA, "train_spm.model"), "--out", str(tmp_path / "out")]
    for extra, message in ((["--duration-sec", "0"], "--duration-sec 0.0: must be a positive number"),
                           (["--tokenizer", str(root / "talk0.json")], "not a sentencepiece model"),
                           (["--out", str(root / "prepared")], "already holds")):
        with pytest.raises(data.DataError, match=message):
            data.main(cli + extra)
    (root / "odd.json").write_text(json.dumps({"alignments": [["late", [1.0, 0.5], "SPEAKER_MAIN"],
                                                              ["never", [float("nan"), 1.0], "SPEAKER_MAIN"],
                                                              ["blink", [2.0, 2.0], "SPEAKER_MAIN"],
                                                              ["early", [0.1, 0.2], "SPEAKER_MAIN"]]}))
    capsys.readouterr()
    kept = data.read_alignments(str(root / "odd.json"))
    warned = capsys.readouterr().out
    assert "odd.json: word 'late' has times [1.0, 0.5]" in warned and "word 'never'" in warned
    assert "word 'blink' has times [2.0, 2.0]" in warned and "early" not in warned   # dropped as moshi-finetune
    assert "odd.json: words are not in time order" in warned
    assert [w for w, *_ in kept] == ["late", "never", "blink", "early"]   # as moshi-finetune searches them
    with pytest.raises(data.DataError, match="gone.wav: audio file not found"):
        data.load_stereo(str(root / "gone.wav"))
    (root / "num.jsonl").write_text('{"path": 5, "duration": 2}\n')
    with pytest.raises(data.DataError, match="num.jsonl:1: .*path 5 is not a string"):
        data.read_manifest(str(root / "num.jsonl"))


# ================================================================================================
# sample.py
#
# The offline conversation loop on tiny random models in a local repo directory laid out like the
# Hugging Face ones. Parity: the tokens of every frame equal those of Kyutai's run_inference.py loop
# (moshiko-shaped model) and of NVIDIA's PersonaPlex offline.py (dep_q 16), both greedy, recorded by
# testdata/make_sample_fixtures.py. Budget: < 3 min on 2 cores.


def _write_sample_repo(folder, persona: bool, wrap: bool = False):
    """The fixture's weights rebuilt bit for bit, in Kyutai's on-disk format, with configs and a tokenizer.
    wrap: the PersonaPlex weights with the short windows of the fixture's wrap run."""
    fx, rw = fixture("make_sample_fixtures"), fixture("random_weights")
    folder.mkdir()
    if wrap:
        spec, seed, config = "sample_personaplex_keys.txt", fx.PERSONA_SEED, fx.PERSONA_WRAP_CONFIG
        mimi_config = fx.MIMI_CONFIG
    elif persona:        # already on-disk names in the fork's state dict
        spec, seed, config, mimi_config = "sample_personaplex_keys.txt", fx.PERSONA_SEED, fx.PERSONA_CONFIG, fx.PERSONA_MIMI_CONFIG
    else:
        spec, seed, config, mimi_config = "sample_lm_keys.txt", fx.LM_SEED, fx.LM_CONFIG, fx.MIMI_CONFIG
    raw = rw.random_tensors(rw.read_spec(os.path.join(TESTDATA, spec)), seed, fx.lm_overrides())
    convert.save_safetensors(folder / "raw.safetensors", raw)
    cfg = repo.lm_config(config)
    params = convert.load_lm(folder / "raw.safetensors", cfg)
    convert.save_lm(folder / "model.safetensors", params, cfg)          # what sample.py reads: our writer's output
    (folder / "raw.safetensors").unlink()
    mimi_raw = rw.random_tensors(rw.read_spec(os.path.join(TESTDATA, "sample_mimi_keys.txt")), fx.MIMI_SEED,
                                 fx.mimi_overrides())
    convert.save_safetensors(folder / fx.MIMI_FILE, mimi_raw)
    (folder / "config.json").write_text(json.dumps(dict(config, mimi_config_name="mimi_config.json")))
    (folder / "mimi_config.json").write_text(json.dumps(mimi_config))
    fx.train_tokenizer(str(folder / "tokenizer_spm_32k_3.model"))
    return folder


@pytest.fixture(scope="module")
def sample_repo(tmp_path_factory):
    return _write_sample_repo(tmp_path_factory.mktemp("sample") / "moshiko-tiny", persona=False)


def _sample_models(repo, *extra):
    args = sample.parse_args(["--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", str(repo), "--dtype", "fp32", *extra])
    return args, sample.load_models(args, lambda msg: None)


def _prompt_frames(whole_frames_only=False):
    n = audio.resampled_length(fixture("make_sample_fixtures").PROMPT, 24000)
    n -= n % 1920 if whole_frames_only else 0
    return audio.frames_of(audio.read_blocks(fixture("make_sample_fixtures").PROMPT, 24000, channel=0), n, 1920)


def _run_converse(models, batch_size=1, prompt=None):
    frames = _prompt_frames(whole_frames_only=prompt is None)      # as sample.run: Moshiko's, whole frames
    steps = list(sample.converse(models, frames, batch_size, moshi.Sampling(greedy=True), 0, prompt))
    return np.stack([t for t, _ in steps], 1), np.concatenate([p for _, p in steps], 1)   # [B, T, K], [B, S]


def test_sample_matches_official_run_inference(sample_repo):
    """Kyutai's run_inference.py loop (greedy): the same text + audio tokens for every frame, the same audio."""
    ref = np.load(os.path.join(TESTDATA, "sample_fixture.npz"))
    assert str(ref["prompt_sha256"]) == fixture("make_sample_fixtures").digest(fixture("make_sample_fixtures").PROMPT), "hello.wav changed: rerun the fixture"
    _, models = _sample_models(sample_repo)
    assert models.lm_cfg == moshi.TINY and models.mimi_cfg == mimi.TINY
    tokens, pcm = _run_converse(models)
    T = len(ref["tokens"])                        # the official loop drops the trailing partial frame
    assert tokens.shape == (1, T, 9)
    np.testing.assert_array_equal(tokens[0], ref["tokens"])
    assert rel_err(pcm[0, :ref["pcm_head"].size], ref["pcm_head"]) < 1e-4


def test_sample_delay_of_two_gives_a_frame_less_as_lmgen(sample_repo, tmp_path, capsys):
    """With max_delay 2, Kyutai's LMGen returns None on its first two calls (run_inference skips them):
    the first frame given twice covers one, so the answer has one frame less, every token generated;
    the program writes and reports that length, and refuses by name a prompt too short to answer."""
    _, models = _sample_models(sample_repo)
    delays = (0, 0) + (2,) * 7 + (0,) + (2,) * 7
    models.lm_cfg = dataclasses.replace(models.lm_cfg, delays=delays)
    frames = list(_prompt_frames(whole_frames_only=True))
    steps = list(sample.converse(models, frames, 1, moshi.Sampling(greedy=True), 0))
    assert len(steps) == len(frames) - 1 == sample.answer_frames(models.lm_cfg, len(frames), None)
    assert all((t >= 0).all() for t, _ in steps)
    delayed_repo = tmp_path / "delay2"
    shutil.copytree(sample_repo, delayed_repo)
    config = json.loads((delayed_repo / "config.json").read_text())
    (delayed_repo / "config.json").write_text(json.dumps(dict(config, delays=list(delays))))
    common = ("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", delayed_repo, "--greedy", "--dtype", "fp32")
    log = _main(*common, "--out", tmp_path / "a.wav")
    assert soundfile.info(tmp_path / "a.wav").frames == (len(frames) - 1) * 1920
    assert f"({(len(frames) - 1) * 0.08:.2f} s)" in log and "[100%" in log
    with pytest.raises(SystemExit):
        sample.main([str(a) for a in (*common, "--duration", 0.08, "--out", tmp_path / "b.wav")])
    assert "delays (up to 2) need 2 frames" in capsys.readouterr().err and not list(tmp_path.glob("b*"))


def test_sample_matches_personaplex_offline(tmp_path):
    """NVIDIA's PersonaPlex offline.py (greedy): voice prompt at -24 LUFS, silences, <system> text prompt,
    then the user forced onto streams 9..16: the same 17 tokens for every frame, the same audio."""
    ref = np.load(os.path.join(TESTDATA, "sample_personaplex_fixture.npz"))
    repo = _write_sample_repo(tmp_path / "persona-tiny", persona=True)
    fixture("make_sample_fixtures").write_voice_prompt(str(tmp_path / "voice.wav"))
    args, models = _sample_models(repo, "--voice-prompt", str(tmp_path / "voice.wav"),
                                  "--text-prompt", fixture("make_sample_fixtures").TEXT_PROMPT)
    assert models.is_persona
    np.testing.assert_array_equal(models.tokenizer.encode(sample.wrap_system(args.text_prompt)), ref["text_prompt_tokens"])
    prompt = sample.build_persona_prompt(models, args.voice_prompt, args.text_prompt)
    np.testing.assert_array_equal(prompt.moshi_codes[-1], ref["silence_tokens"])     # the recipe for the
    np.testing.assert_array_equal(prompt.user_codes[0], ref["sine_tokens"])          # constants
    tokens, pcm = _run_converse(models, prompt=prompt)
    np.testing.assert_array_equal(tokens[0], ref["tokens"])
    assert rel_err(pcm[0, :ref["pcm_head"].size], ref["pcm_head"]) < 1e-4


def test_sample_personaplex_past_the_kv_ring_wrap(tmp_path, monkeypatch):
    """NVIDIA's offline flow where its KV rings wrap (an LM window of 24 frames < 62 prompt + 52 user
    frames, Mimi's of 8 steps): a PersonaPlex checkpoint streams the LM and Mimi with NVIDIA's ring by
    default and gives the same 17 tokens for every frame, the same audio, and the same logits at the
    last frames (the depformer's last codebook included, which NVIDIA's ring keeps from its first);
    Kyutai's ring (--kv-ring kyutai) departs from them."""
    ref = np.load(os.path.join(TESTDATA, "sample_personaplex_wrap_fixture.npz"))
    repo_dir = _write_sample_repo(tmp_path / "persona-wrap", persona=True, wrap=True)
    fixture("make_sample_fixtures").write_voice_prompt(str(tmp_path / "voice.wav"))
    persona = ("--voice-prompt", str(tmp_path / "voice.wav"), "--text-prompt", fixture("make_sample_fixtures").TEXT_PROMPT)
    args, models = _sample_models(repo_dir, *persona)
    assert models.lm_cfg.kv_ring == models.mimi_cfg.kv_ring == "personaplex" and models.lm_cfg.context == 24
    prompt = sample.build_persona_prompt(models, args.voice_prompt, args.text_prompt)
    assert len(prompt) > models.lm_cfg.context
    logits, gen_step = [], moshi.gen_step

    def recording(*a, **kw):
        state, out, frame_logits = gen_step(*a, return_logits=True, **kw)
        logits.append(frame_logits)
        return state, out
    monkeypatch.setattr(moshi, "gen_step", recording)
    tokens, pcm = _run_converse(models, prompt=prompt)
    np.testing.assert_array_equal(tokens[0], ref["tokens"])
    assert rel_err(pcm[0, :ref["pcm_head"].size], ref["pcm_head"]) < 1e-4
    last = logits[-len(ref["text_logits"]):]
    assert rel_err(np.stack([l["text_logits"][0] for l in last]), ref["text_logits"]) < 1e-4
    audio = np.stack([l["audio_logits"][0] for l in last])                      # [frames, 16, card]
    for c in range(16):
        assert rel_err(audio[:, c], ref["audio_logits"][:, c]) < 1e-4, c
    monkeypatch.undo()
    _, kyutai = _sample_models(repo_dir, *persona, "--kv-ring", "kyutai")
    assert kyutai.lm_cfg.kv_ring == kyutai.mimi_cfg.kv_ring == "kyutai"
    other, _ = _run_converse(kyutai, prompt=prompt)
    assert not np.array_equal(other[0], ref["tokens"])


def test_sample_replays_personaplex_pt_voices(tmp_path):
    """`sample.py --voice-prompt voice.pt`, a voice saved by NVIDIA's LMGen (save_voice_prompt_embeddings)
    and replayed as its offline flow replays one: the same tokens for every frame as NVIDIA's run from
    that .pt (which equal its run from the wav); the prompt is as long as the wav's."""
    ref = np.load(os.path.join(TESTDATA, "sample_personaplex_fixture.npz"))
    repo_dir = _write_sample_repo(tmp_path / "persona-tiny", persona=True)
    persona = ("--voice-prompt", fixture("make_sample_fixtures").VOICE_PT, "--text-prompt", fixture("make_sample_fixtures").TEXT_PROMPT)
    args, models = _sample_models(repo_dir, *persona)
    prompt = sample.build_persona_prompt(models, args.voice_prompt, args.text_prompt)
    fixture("make_sample_fixtures").write_voice_prompt(str(tmp_path / "voice.wav"))
    from_wav = sample.build_persona_prompt(models, str(tmp_path / "voice.wav"), args.text_prompt)
    assert prompt.embeddings.shape == (len(from_wav) - len(prompt.text) - 1, 64)
    assert len(prompt) == len(from_wav)
    tokens, _ = _run_converse(models, prompt=prompt)
    np.testing.assert_array_equal(tokens[0], ref["pt_tokens"])
    _main("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", repo_dir, "--greedy", "--dtype", "fp32",
          "--out", tmp_path / "a.wav", *persona)
    answer = json.loads((tmp_path / "a.json").read_text())["answers"][0]
    assert answer["text_tokens"] == ref["pt_tokens"][:, 0].tolist()
    assert answer["audio_tokens"] == ref["pt_tokens"][:, 1:9].tolist()


def test_sample_reads_pt_voices_without_torch_and_refuses_other_classes(tmp_path):
    """The .pt reader needs no torch (in a process where importing torch fails), rebuilds what torch.save
    writes (dtypes, views), and a pickle that asks for anything but a tensor's rebuild is refused,
    naming what it asked for, before it can run; so are files that are not voices for this LM."""
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, *args):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "import moshi, sample\n"
            f"emb, cache = sample.read_voice_pt({fixture('make_sample_fixtures').VOICE_PT!r}, moshi.TINY_PERSONAPLEX)\n"
            "assert 'torch' not in sys.modules\n"
            "print(emb.shape, emb.dtype, cache.shape, cache.dtype)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["(14,", "64)", "float32", "(17,", "4)", "int32"]
    # other dtypes, views into a larger storage, nesting (testdata's tensor_zoo), as torch.save wrote them
    zoo, x = sample.read_torch_file(fixture("make_sample_fixtures").TENSORS_PT), np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    expected = {"bf16": x, "f16_transposed": x.transpose(2, 1, 0), "f64_view": x[1, 1:, ::2], "i64": x,
                "i32": x, "bool": x > 10, "u8": x}
    dtypes = {"bf16": jnp.bfloat16, "f16_transposed": np.float16, "f64_view": np.float64, "i64": np.int64,
              "i32": np.int32, "bool": np.bool_, "u8": np.uint8}
    for name, want in expected.items():
        assert zoo[name].dtype == dtypes[name] and np.array_equal(zoo[name].astype(np.float64), want), name
    assert np.array_equal(zoo["nested"][0], x[0]) and np.array_equal(zoo["nested"][1][0], x[1, 0])
    # a torch.save zip whose pickle calls os.system: refused by name, and nothing ran
    evil, marker = tmp_path / "evil.pt", tmp_path / "ran"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
                   + f"touch {marker}".encode() + b"\x85R.")
    with pytest.raises(sample.SampleError, match="refusing to unpickle os.system"):
        sample.read_voice_pt(str(evil), moshi.TINY_PERSONAPLEX)
    assert not marker.exists()
    (tmp_path / "old.pt").write_bytes(b"\x80\x02}q\x00.")                     # torch's pre-1.6 format
    with pytest.raises(sample.SampleError, match="not a torch.save zip file"):
        sample.read_voice_pt(str(tmp_path / "old.pt"), moshi.TINY_PERSONAPLEX)
    wrong_width = r"embeddings of shape \(14, 1, 1, 64\).*\[frames, 1, 1, 4096\]"
    with pytest.raises(sample.SampleError, match=wrong_width):
        sample.read_voice_pt(fixture("make_sample_fixtures").VOICE_PT, moshi.PERSONAPLEX)


def _main(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sample.main([str(a) for a in argv])
    return out.getvalue()


def test_sample_cli_end_to_end(sample_repo, tmp_path):
    """`sample.py --prompt hello.wav`: a wav of the input's whole frames (as run_inference.py: the
    official tokens, no more), a transcript; --greedy is reproducible,
    and --batch-size 2 gives twice the --batch-size 1 answer; the steps compile once for all frames."""
    ref = np.load(os.path.join(TESTDATA, "sample_fixture.npz"))
    n_in = soundfile.info(fixture("make_sample_fixtures").PROMPT).frames
    common = ("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--greedy", "--dtype", "fp32")
    compiled = moshi.gen_step._cache_size()
    log = _main(*common, "--out", tmp_path / "a.wav")
    assert moshi.gen_step._cache_size() - compiled <= 1       # 53 steps, one compilation (none if cached)
    assert "real-time factor" in log and "[100%" in log          # the progress display reached the end
    _main(*common, "--out", tmp_path / "b.wav")
    _main(*common, "--out", tmp_path / "c.wav", "--batch-size", 2)
    a, sr = soundfile.read(tmp_path / "a.wav")
    assert n_in % 1920 and sr == 24000 and a.shape == (n_in // 1920 * 1920,) and np.abs(a).max() > 0
    transcript = json.loads((tmp_path / "a.json").read_text())
    answer = transcript["answers"][0]
    assert answer["text_tokens"] == ref["tokens"][:, 0].tolist()                  # the official text
    assert answer["text"] == "".join(p["piece"] for p in answer["pieces"]) and answer["pieces"]
    assert all(p["token"] not in (0, 3) and p["time"] == round(p["frame"] * 0.08, 3) for p in answer["pieces"])
    assert answer["pieces"][0]["piece"] in log                 # streamed to the terminal
    assert open(tmp_path / "b.wav", "rb").read() == open(tmp_path / "a.wav", "rb").read()
    assert json.loads((tmp_path / "b.json").read_text())["answers"] == [dict(answer, wav=str(tmp_path / "b.wav"))]
    batched = json.loads((tmp_path / "c.json").read_text())["answers"]
    assert [b["text_tokens"] for b in batched] == [answer["text_tokens"]] * 2
    assert answer["audio_tokens"] == ref["tokens"][:, 1:].tolist()              # Moshi's voice, the official
    assert [b["audio_tokens"] for b in batched] == [answer["audio_tokens"]] * 2
    for i in range(2):       # a batch of 2 rounds floats differently: equal to the 16-bit sample, +-1
        assert np.abs(soundfile.read(tmp_path / f"c-{i}.wav")[0] - a).max() <= 1.5 / 32768
    # config.json's lm_gen_config is LMGen's settings, as Kyutai's loader hands them over: greedy here
    greedy_repo = tmp_path / "greedy_repo"
    shutil.copytree(sample_repo, greedy_repo)
    config = json.loads((greedy_repo / "config.json").read_text())
    gen = {"use_sampling": False, "temp": 0.5}
    (greedy_repo / "config.json").write_text(json.dumps(dict(config, lm_gen_config=gen)))
    _main("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", greedy_repo, "--dtype", "fp32",
          "--out", tmp_path / "e.wav")
    assert open(tmp_path / "e.wav", "rb").read() == open(tmp_path / "a.wav", "rb").read()
    assert json.loads((tmp_path / "e.json").read_text())["sampling"] == dict(
        greedy=True, temp=0.5, temp_text=0.7, top_k=250, top_k_text=25)
    # a stereo prompt: its first channel is heard, as run_inference.py and NVIDIA's offline.py hear it
    hello, sr = soundfile.read(fixture("make_sample_fixtures").PROMPT, dtype="float32")
    noise = 0.3 * np.random.default_rng(0).standard_normal(len(hello)).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", np.stack([hello, noise], 1), sr, subtype="FLOAT")
    _main(*common[2:], "--prompt", tmp_path / "stereo.wav", "--out", tmp_path / "d.wav")
    assert open(tmp_path / "d.wav", "rb").read() == open(tmp_path / "a.wav", "rb").read()
    assert not list(tmp_path.glob(".tmp-*"))                   # atomic writes leave nothing behind
    assert all((tmp_path / name).stat().st_mode & 0o777 == _usual_mode() for name in ("a.wav", "a.json"))


def test_sample_cli_duration_and_sampling(sample_repo, tmp_path):
    """--duration pads with silence or cuts; sampled answers in one batch differ, and the seed repeats them."""
    common = ("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--dtype", "fp32", "--batch-size", 2,
              "--duration", 5.0)
    _main(*common, "--out", tmp_path / "s.wav")
    _main(*common, "--out", tmp_path / "t.wav")
    s0, s1, t0 = (soundfile.read(tmp_path / name)[0] for name in ("s-0.wav", "s-1.wav", "t-0.wav"))
    assert s0.shape == (120000,) and np.array_equal(s0, t0) and not np.array_equal(s0, s1)
    answers = json.loads((tmp_path / "s.json").read_text())["answers"]
    assert len(answers[0]["text_tokens"]) == 63 and answers[0]["text_tokens"] != answers[1]["text_tokens"]
    _main(*common[:-1], 1.0, "--batch-size", 1, "--greedy", "--out", tmp_path / "short.wav")
    assert soundfile.info(tmp_path / "short.wav").frames == 24000
    log = _main("--prompt", fixture("make_sample_fixtures").PROMPT, "--random-init", "tiny", "--dtype", "fp32", "--greedy", "--duration", 1.0,
                "--out", tmp_path / "random.wav")                  # random weights only when asked, and loudly
    assert log.count("RANDOM WEIGHTS") == 2 and soundfile.info(tmp_path / "random.wav").frames == 24000


def test_sample_runs_with_int8_weights(sample_repo, tmp_path):
    """--quantize int8 --greedy on the tiny fixture repo runs end to end: the LM's matrices int8 (the
    weights printed smaller than in fp32), a full-length answer, text and audio tokens every frame."""
    common = ("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--greedy",
              "--dtype", "fp32", "--duration", 2.0)
    sizes = {}
    for name, extra in (("fp32", ()), ("int8", ("--quantize", "int8"))):
        log = _main(*common, *extra, "--out", tmp_path / f"{name}.wav")
        sizes[name] = float(re.search(r"LM weights: ([0-9.]+) MB", log).group(1))
        assert soundfile.info(tmp_path / f"{name}.wav").frames == 48000
    answer = json.loads((tmp_path / "int8.json").read_text())["answers"][0]
    assert len(answer["text_tokens"]) == 25 and all(len(a) == 8 for a in answer["audio_tokens"])
    assert sizes["int8"] < 0.5 * sizes["fp32"]
    # a -q8 repo (its linear layers int8 + absmax, config.json naming model.q8.safetensors) runs as it is
    q8 = tmp_path / "moshiko-q8"
    shutil.copytree(sample_repo, q8)
    f = convert.SafeTensorsFile(q8 / "model.safetensors")
    tensors = {k: np.asarray(f[k]) for k in f.keys()}
    for name in [k for k, w in tensors.items() if w.ndim == 2 and "emb" not in k]:          # the nn.Linear weights
        w = np.asarray(tensors[name], np.float32)
        tensors[name + "_scb"] = np.abs(w).max(axis=-1)
        tensors[name] = np.rint(w * 127 / tensors[name + "_scb"][:, None]).astype(np.int8)
    convert.save_safetensors(q8 / "model.q8.safetensors", tensors)
    (q8 / "model.safetensors").unlink()
    config = json.loads((q8 / "config.json").read_text())
    (q8 / "config.json").write_text(json.dumps(dict(config, moshi_name="model.q8.safetensors", quantize=True)))
    log = _main(*common[:3], q8, *common[4:], "--out", tmp_path / "q8.wav")
    assert float(re.search(r"LM weights: ([0-9.]+) MB \(int8\)", log).group(1)) == sizes["int8"]
    assert soundfile.info(tmp_path / "q8.wav").frames == 48000


def test_sample_clear_errors(sample_repo, tmp_path, monkeypatch, capsys):
    """Bad input and missing weights end in one clear line, never a traceback or random weights."""
    def error_of(*argv):
        with pytest.raises(SystemExit):
            sample.main([str(a) for a in argv])
        return capsys.readouterr().err
    empty, junk = tmp_path / "empty.wav", tmp_path / "junk.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 24000)
    junk.write_text("not audio")
    assert "holds no audio samples" in error_of("--prompt", empty, "--hf-repo", sample_repo)
    assert "cannot read" in error_of("--prompt", junk, "--hf-repo", sample_repo)
    assert "no such audio file" in error_of("--prompt", tmp_path / "missing.wav", "--hf-repo", sample_repo)
    soundfile.write(tmp_path / "blip.wav", np.full(1900, 0.1, np.float32), 24000)   # 79 ms: no whole frame
    err = error_of("--prompt", tmp_path / "blip.wav", "--hf-repo", sample_repo, "--out", tmp_path / "blip-out.wav")
    assert "shorter than one frame (80 ms)" in err and "--duration" in err and "Traceback" not in err
    assert not list(tmp_path.glob("blip-out*"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # as on a machine without it
    err = error_of("--prompt", fixture("make_sample_fixtures").PROMPT)
    assert "huggingface_hub is not installed" in err and "--hf-repo DIR" in err and "Traceback" not in err

    def offline(repo, name, **kw):
        raise ConnectionError("no network")
    hub = _fake_hub(monkeypatch, offline)
    err = error_of("--prompt", fixture("make_sample_fixtures").PROMPT)
    assert "could not get 'config.json' from the Hugging Face repo 'kyutai/moshiko-pytorch-bf16'" in err
    assert "no network" in err and "Traceback" not in err

    def not_cached(repo_id, name, **kw):                       # huggingface_hub offline, nothing cached
        raise hub.errors.LocalEntryNotFoundError(name)
    hub.hf_hub_download = not_cached
    err = error_of("--prompt", fixture("make_sample_fixtures").PROMPT)
    assert "cannot reach the Hugging Face hub (offline?)" in err and "--hf-repo DIR" in err and "Traceback" not in err

    def hub_download(repo, name, **kw):                        # a repo without config.json, as moshiko's
        if name == "config.json":
            raise hub.errors.EntryNotFoundError(name)
        return f"/cache/{repo}/{name}"
    hub.hf_hub_download = hub_download
    ckpt = repo.find_checkpoint("kyutai/moshiko-pytorch-bf16")
    assert ckpt.config is None and ckpt.moshi == "/cache/kyutai/moshiko-pytorch-bf16/model.safetensors"
    assert ckpt.tokenizer.endswith("/tokenizer_spm_32k_3.model") and ckpt.mimi.endswith(repo.MIMI_NAME)
    (tmp_path / "incomplete").mkdir()
    assert "has no file 'model.safetensors'" in error_of("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", tmp_path / "incomplete")
    # outputs that cannot be written are named before anything is loaded, and nothing is lost
    (tmp_path / "taken").mkdir()
    (tmp_path / "answer.json").mkdir()                          # a folder named like the transcript
    (tmp_path / "kept.wav").write_bytes(b"old")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for out, message in ((tmp_path / "taken", "--out .*taken is a folder"),
                         (tmp_path / "answer.wav", "transcript .*answer.json is a folder")) + (
                        () if os.geteuid() == 0 else ((locked / "a.wav", "not writable"),)):   # root writes anyway
        assert re.search(message, error_of("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--out", out))
    assert (tmp_path / "kept.wav").read_bytes() == b"old" and not list(locked.iterdir())
    # a run killed mid-write (kill -9) left a temporary file of ours: the next run removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-{socket.gethostname().replace('-', '_')}-abc.wav"
    stale.write_bytes(b"half")
    elsewhere = tmp_path / f".tmp-{dead.pid}-other_machine-abc.wav"    # a shared folder: not ours to judge
    elsewhere.write_bytes(b"being written")
    _main("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--greedy", "--dtype", "fp32", "--duration", 0.5,
          "--out", tmp_path / "fresh.wav")
    assert not stale.exists() and (tmp_path / "fresh.wav").exists() and elsewhere.exists()
    assert "--voice-prompt and --text-prompt are for PersonaPlex" in error_of(
        "--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo, "--text-prompt", "hi", "--dtype", "fp32")
    for flags, message in ((("--duration", "nan"), "--duration must be a positive number of seconds, got nan"),
                           (("--duration", "0"), "--duration must be"), (("--batch-size", "0"), "--batch-size must"),
                           (("--seed", 2**32), "--seed must be an integer from 0 to 4294967295, got 4294967296"),
                           (("--out", tmp_path / "a.mp3"), "the answer is written as a wav file; name it .wav"),
                           (("--random-init", "tiny", "--hf-repo", sample_repo, "--config", "c.json"),
                            "--random-init makes the LM's weights: --hf-repo, --config would be ignored")):
        assert message in error_of("--prompt", fixture("make_sample_fixtures").PROMPT, *flags)
    # the repo's lm_gen_config: a JSON object of LMGen's settings, in their types
    config, settings = tmp_path / "config.json", json.loads((sample_repo / "config.json").read_text())
    for gen_config, message in (("hot", "lm_gen_config must be an object {...}, got 'hot'"),
                                ({"temp": "0.7"}, "lm_gen_config: temp must be a number, got '0.7'"),
                                ({"top_k": 25.0}, "lm_gen_config: top_k must be a whole number, got 25.0"),
                                ({"use_sampling": 0}, "lm_gen_config: use_sampling must be true or false, got 0")):
        config.write_text(json.dumps(dict(settings, lm_gen_config=gen_config)))
        assert message in error_of("--prompt", fixture("make_sample_fixtures").PROMPT, "--hf-repo", sample_repo,
                                   "--config", config)
    args = sample.parse_args(["--prompt", "p.wav", "--temp", "0", "--temp-text", "0"])
    picked = sample.sampling_for(args, {"temp": 1, "top_k": 5, "use_sampling": True}, print)
    assert picked == moshi.Sampling(False, 0.0, 0.0, 5, 25) and picked.is_greedy      # both temperatures 0
    assert not moshi.Sampling(temp=0).is_greedy
    logged = []                                                  # another model's tokenizer: said at start-up
    monkeypatch.setitem(moshi.PRESETS, "tiny_text_100", dataclasses.replace(moshi.TINY, text_card=100))
    sample.load_models(sample.parse_args(["--prompt", "p.wav", "--random-init", "tiny_text_100", "--tokenizer",
                                          str(sample_repo / "tokenizer_spm_32k_3.model")]), logged.append)
    assert "the tokenizer has 96 pieces, the LM 100 text tokens" in " ".join(logged)


# ================================================================================================
# train.py
#
# Fixtures: testdata/make_train_fixtures.py (the official package for the exported checkpoint and
# LoRA's module names). Budget: tiny models, short windows, < 5 min on 2 cores.


# A small moshiko-shaped model (17 streams, moshiko's delays, weights per depformer step) with 2
# depformer steps instead of 8: compile time is what these tests spend, and the structure is the same.
TRAIN_CFG = dataclasses.replace(moshi.TINY, dep_q=2)


@contextlib.contextmanager
def _fast_compile():
    """XLA's CPU optimisation passes are most of these tests' time and change nothing they check.
    Switched off only while a train test runs: other sections compare tokens exactly."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture
def fast_compile():
    with _fast_compile():
        yield


def _train_codes(B, T, seed=0, A=1):
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, TRAIN_CFG.text_card, (A, B, 1, T)),
                            rng.integers(0, TRAIN_CFG.card, (A, B, 16, T))], axis=2).astype(np.int32)
    codes[:, ::3, :, -3:] = -1
    codes[:, :, 0, ::4] = TRAIN_CFG.existing_text_padding_id
    return codes


def _one_step(dp, fsdp, h, params, lora, codes, cfg=TRAIN_CFG):
    mesh = train.make_mesh(dp, fsdp)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        state, frozen = train.initial_state(plan, mesh, h, params, lora)
        batch = jax.device_put(codes, jax.sharding.NamedSharding(mesh, train.BATCH_SPEC))
        state, metrics = plan.step(state, frozen, batch)
        layer_scans = _layer_scans(jax.make_jaxpr(plan.step)(state, frozen, batch).jaxpr)
        return plan, state, np.asarray(metrics), layer_scans


def _layer_scans(jaxpr):
    """[(all_gathers, reduce_scatters)] of every scan over layers in a traced step (nested scans)."""
    def inner(params):
        for v in params.values():
            for x in (v if isinstance(v, (tuple, list)) else [v]):
                x = getattr(x, "jaxpr", x)
                if hasattr(x, "eqns"):
                    yield x

    def count(jx, name):
        return sum((e.primitive.name == name) + sum(count(s, name) for s in inner(e.params)) for e in jx.eqns)
    found = []
    for e in jaxpr.eqns:
        body = e.params["jaxpr"].jaxpr if e.primitive.name == "scan" else None
        if body is not None and not any(s.primitive.name == "scan" for s in body.eqns):
            found.append((count(body, "all_gather"), count(body, "reduce_scatter")))
        for s in inner(e.params):
            found += _layer_scans(s)
    return found


def _max_rel(a_tree, b_tree):
    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


@pytest.mark.parametrize("name", ["a", "c"])
def test_train_loss_and_gradient_match_moshi_finetune(name, tmp_path):
    """moshi-finetune's text and audio losses (its compute_loss_with_mask: PAD/EPAD targets at 0.5,
    the first codebook at 100) on Kyutai's LMModel with the LM fixtures' weights, codes with -1 and
    padding, and their gradient: every tensor's within 1e-4 (its norm and its projection on a random
    probe; config c's gradients whole), under the on-disk names."""
    ref, make = np.load(os.path.join(TESTDATA, "train_loss.npz")), fixture("make_train_fixtures")
    _, params, cfg = _lm_fixture(name, tmp_path)
    codes = jnp.asarray(ref[f"{name}_codes"])
    padding_ids = (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id)

    def loss(p):
        sums = train.loss_sums(moshi.forward(p, cfg, codes), codes, make.TEXT_PADDING_WEIGHT,
                               make.FIRST_CODEBOOK_WEIGHT, padding_ids)
        total, text, audio = train.loss_from_sums(sums)
        return total, jnp.stack([text, audio])
    grads, losses = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert rel_err(losses, ref[f"{name}_losses"]) < 1e-5
    grads = convert.to_disk(convert._lm_rows(cfg), grads, "the gradient")
    names = [str(n) for n in ref[f"{name}_names"]]
    assert sorted(grads) == names
    probes = fixture("random_weights").random_tensors([(n, grads[n].shape) for n in names], make.PROBE_SEED)
    for n, norm, probe in zip(names, ref[f"{name}_grad_norms"], ref[f"{name}_grad_probes"]):
        g = grads[n].astype(np.float64)
        assert abs(np.linalg.norm(g) - norm) <= 1e-4 * norm, n
        assert abs(np.sum(g * probes[n]) - probe) <= 1e-4 * norm * np.linalg.norm(probes[n]), n
        if name == "c":
            assert rel_err(g, ref[f"c_grad|{n}"]) < 1e-4, n
    # every tensor is in play but config c's extra heads, which the loss does not read
    assert all((norm > 0) != n.startswith("extra_heads.") for n, norm in zip(names, ref[f"{name}_grad_norms"]))


def test_train_optimizer_matches_moshi_finetune():
    """train.optimizer (clipping, AdamW, OneCycle lr and beta1) stepped on the gradients torch's
    AdamW + OneCycleLR + clip_grad_norm_ were given in moshi-finetune's settings: the same lr and
    weight at every step, with the peak before step 0, at a fractional step, and at step 0 only."""
    with open(os.path.join(TESTDATA, "train_optimizer.json")) as f:
        cases = json.load(f)
    for case in cases:
        h = train.Hyper(lr=case["lr"], pct_start=case["pct_start"], max_steps=case["max_steps"],
                        weight_decay=case["weight_decay"], max_norm=case["max_norm"])
        tx, weight = train.optimizer(h), jnp.asarray(case["weight"], jnp.float32)
        opt, lr_at, update = tx.init(weight), jax.jit(train.one_cycle(h)[0]), jax.jit(tx.update)
        for step, (g, lr, expected) in enumerate(zip(case["grads"], case["lrs"], case["weights"])):
            where = (case["max_steps"], case["pct_start"], step)
            assert abs(float(lr_at(step)) - lr) <= 1e-6 * case["lr"], where
            updates, opt = update(jnp.asarray(g, jnp.float32), opt, weight)
            weight = weight + updates
            assert rel_err(weight, np.asarray(expected)) < 1e-5, where


@pytest.mark.parametrize("lora_rank", [0, 3])
def test_train_sharded_step_matches_one_device(lora_rank, fast_compile):
    """dp=2 x fsdp=4 on 8 simulated devices: the same loss, gradients and updated params as one
    device (fp32), each device holding 1/4 of every sharded weight. Full fine-tuning with 2
    accumulated micro-batches; LoRA with random A and B so that every adapter matters."""
    # eps=1 makes Adam's first update proportional to the gradient, so the comparison of updated
    # params is as sharp as the comparison of gradients (with a tiny eps, g / |g| amplifies noise).
    # No clipping here: it would hide a gradient off by a constant factor.
    h = train.Hyper(lr=0.5, eps=1.0, max_steps=10, max_norm=1e9, compute_dtype="float32",
                    lora_rank=lora_rank, lora_scaling=2.0, first_codebook_weight=100.0)
    params = jax.tree.map(np.asarray, moshi.init(jax.random.key(0), TRAIN_CFG))
    lora_tree = None
    if lora_rank:
        lora_tree = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)) * 0.05,
                            lora.init(jax.random.key(1), params, lora_rank))
    codes = _train_codes(B=8, T=10, A=1 if lora_rank else 2)
    _, one, m1, _ = _one_step(1, 1, h, params, lora_tree, codes)
    plan, eight, m8, layer_scans = _one_step(2, 4, h, params, lora_tree, codes)
    assert rel_err(m8, m1) < 1e-5 and m1[0] > 0                                 # loss, text, audio, grad norm
    adam = lambda state: state["opt"][1].inner_state[0]                        # noqa: E731
    assert _max_rel(adam(eight).mu, adam(one).mu) < 1e-5                      # the gradients, via Adam's mu
    assert _max_rel(eight["params"], one["params"]) < 1e-5
    before = lora_tree if lora_rank else params
    assert _max_rel(one["params"], before) > 1e-4                              # the step did change them
    # Gather on use, free after: the forward layer scans (temporal, depformer) all-gather each of a
    # layer's 4 matrices (LoRA: and their 8 adapters); the backward ones gather them again (remat
    # saved none) and reduce-scatter the gradients (LoRA: of the adapters only, the base is frozen).
    gathered, scattered = (12, 8) if lora_rank else (4, 4)
    assert sorted(layer_scans) == sorted([(gathered, 0)] * 2 + [(gathered, scattered)] * 2)
    # every weight matrix is split 4 ways over fsdp (and replicated over dp); so are LoRA adapters
    def split_in_four(y, axis):
        axis %= y.ndim
        expected = y.shape[:axis] + (y.shape[axis] // 4,) + y.shape[axis + 1:]
        return all(s.data.shape == expected for s in y.addressable_shards)
    trained = {jax.tree_util.keystr(p): y for p, y in jax.tree_util.tree_flatten_with_path(eight["params"])[0]}
    for (path, spec), x in zip(jax.tree_util.tree_flatten_with_path(plan.specs, is_leaf=lambda s: isinstance(s, jax.P))[0],
                               jax.tree.leaves(params)):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            assert spec == jax.P()
        elif not lora_rank:
            assert split_in_four(trained[name], list(spec).index("fsdp")), name
    if lora_rank:
        assert all(split_in_four(y, -1 if name.endswith("['a']") else -2) for name, y in trained.items())


def _cli(dataset, run_dir, *extra):
    return train.main(["--data", dataset["prepared"], "--run-dir", str(run_dir), "--config", "train_test",
                       "--mesh", "dp=2,fsdp=4", "--batch-size", "8", "--max-steps", "24", "--lr", "3e-3",
                       "--pct-start", "0.1", "--dtype", "float32", "--log-every", "6", "--ckpt-every", "8",
                       "--keep-checkpoints", "2", *extra])


def _held_out(train_dataset, tmp_path):
    """An eval set of 12 windows (one batch of 8 and some): the prepared files, listed twice."""
    held_out = tmp_path / "held_out"
    shutil.copytree(train_dataset["prepared"], held_out)
    index = json.loads((held_out / "index.json").read_text())
    (held_out / "index.json").write_text(json.dumps(dict(index, files=index["files"] * 2)))
    return str(held_out)


def _eval_losses(record):
    return [record[f"eval_{k}loss"] for k in ("", "text_", "audio_")]


def _one_device_loss(params, cfg, eval_dir, batch=8):
    """[loss, text, audio] of the first `batch` windows of a prepared folder, on one device, fp32."""
    codes = jnp.asarray(data.read_batch(data.TokenWindows(eval_dir), np.arange(batch)[None])[0])
    h = train.Hyper()
    sums = train.loss_sums(moshi.forward(params, cfg, codes), codes, h.text_padding_weight,
                           h.first_codebook_weight, h.padding_ids)
    return train.loss_from_sums(sums)


def test_train_cli_overfits_resumes_and_stops_on_nan(train_dataset, tmp_path, monkeypatch, capsys, fast_compile):
    """Through the CLI on dp=2 x fsdp=4: a tiny model overfits 6 windows (loss more than halves);
    a run stopped after step 12 (and left with a half-written checkpoint, as if killed while saving)
    resumes to exactly the losses of an uninterrupted run; a NaN stops the run naming the batch."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    full = _cli(train_dataset, tmp_path / "full")
    losses = [r["loss"] for r in full]
    assert len(losses) == 24 and losses[-1] < 0.5 * losses[0], losses
    out = capsys.readouterr().out
    assert "step 24/24 | loss" in out and ", attention xla" in out       # auto: XLA's on this CPU
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 25))
    # the CLI export writes the checkpoint's weights under Kyutai's names (+ a config.json)
    train.main(["export", "--run-dir", str(tmp_path / "full"), "--out", str(tmp_path / "export"), "--dtype", "float32"])
    cfg = repo.lm_config(tmp_path / "export" / "config.json")
    exported = convert.load_lm(tmp_path / "export" / "model.safetensors", cfg)
    assert cfg == TRAIN_CFG
    one = jax.sharding.NamedSharding(train.make_mesh(1, 1), jax.P())
    saved = checkpoint.load(str(tmp_path / "full" / "checkpoints" / "step_000024"),
                                  {"params": jax.tree.map(lambda x: jax.device_put(np.zeros_like(x), one), exported)})
    assert _max_rel(saved["params"], exported) == 0 and _max_rel(exported, moshi.init(jax.random.key(0), TRAIN_CFG)) > 1e-3
    # ... and a run started from that export (a Kyutai repo folder) starts where training ended
    again = _cli(train_dataset, tmp_path / "from_export", "--init-from", str(tmp_path / "export"), "--stop-at", "1")
    assert again[0]["loss"] < 1.5 * losses[-1], (again[0]["loss"], losses[-1])
    first = _cli(train_dataset, tmp_path / "resumed", "--stop-at", "12")
    assert [r["loss"] for r in first] == losses[:12]
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000008", "step_000012"]
    (ckpts / "step_000016.tmp").mkdir()                                # killed mid-write: ignored
    (ckpts / "step_000016.tmp" / "process_00000.npz").write_bytes(b"partial")
    rest = _cli(train_dataset, tmp_path / "resumed", "--resume")
    assert [r["step"] for r in rest] == list(range(13, 25))
    np.testing.assert_allclose([r["loss"] for r in rest], losses[12:], rtol=1e-6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000016", "step_000024"]   # the last 2 kept
    meta = checkpoint.read_meta(str(ckpts / "step_000024"))
    assert meta["step"] == 24 and meta["data_position"] == 24 * 8
    # a NaN loss stops the run with the step and the windows of its batch
    (tmp_path / "nan" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "step_000016", tmp_path / "nan" / "checkpoints" / "step_000016")
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, like: jax.tree.map(
        lambda x: x * np.nan if x.dtype == jnp.float32 and x.ndim else x, real_load(path, like)))
    with pytest.raises(train.NonFiniteLoss, match=r"step 17: loss is nan.*\n.*talk\d\.wav \[[0-9.]+-[0-9.]+ s\]"):
        _cli(train_dataset, tmp_path / "nan", "--resume")


def _files(root):
    """{path under root: bytes} of every file (what a refused command must leave as it found it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_refuses_bad_input_before_touching_the_run_dir(train_dataset, tmp_path, monkeypatch, capsys,
                                                             fast_compile):
    """A used run dir without --resume, bad numbers, clashing flags: one-line errors naming the
    problem, raised before anything is written, so metrics.jsonl and the checkpoints stay byte for
    byte. --overwrite starts over (the first run's losses again, its old files gone)."""
    import re
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    run = tmp_path / "run"
    first = _cli(train_dataset, run, "--stop-at", "12")
    before = _files(run)
    assert "metrics.jsonl" in before and "checkpoints/step_000012/process_00000.npz" in before
    refusal = (f"{run} already holds metrics.jsonl and 2 checkpoints (step 8, 12): pass --resume to continue "
               "or --overwrite to start over")
    with pytest.raises(ValueError, match=re.escape(refusal)):
        _cli(train_dataset, run)
    assert _files(run) == before
    with pytest.raises(ValueError, match="metrics.jsonl is a file, not a folder"):
        _cli(train_dataset, run / "metrics.jsonl")
    assert _files(run) == before
    capsys.readouterr()
    for flag, value, expected in (("--lr", "-1", "a number > 0"), ("--batch-size", "0", "an integer >= 1"),
                                  ("--batch-size", "-2", "an integer >= 1"), ("--grad-accum", "0", "an integer >= 1"),
                                  ("--max-steps", "0", "an integer >= 1"), ("--lora-scaling", "0", "a number > 0"),
                                  ("--seed", "-1", "an integer from 0 to 4294967295")):
        with pytest.raises(SystemExit):
            _cli(train_dataset, run, "--resume", flag, value)
        assert f"argument {flag}: expected {expected}, got '{value}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="was made with lora_scaling=2.0, this run has 3.0"):
        _cli(train_dataset, run, "--resume", "--lora-scaling", "3")            # a different model
    with pytest.raises(SystemExit):
        _cli(train_dataset, run, "--resume", "--overwrite")
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ttt-chunk: --config train_test has no TTT layers; add them with --ttt-layers"):
        _cli(train_dataset, run, "--resume", "--ttt-chunk", "8")
    with pytest.raises(ValueError, match=r"--ttt-layers \(5,\): TTT config: layers=\(5,\) names layer 5, but the "
                                         r"transformer has 2 layers"):
        _cli(train_dataset, run, "--resume", "--ttt-layers", "5")
    with pytest.raises(ValueError, match="--eval-every and --eval-batches need --eval-data"):
        _cli(train_dataset, run, "--resume", "--eval-every", "2")
    with pytest.raises(ValueError, match=r"--eval-data .*: 6 windows, fewer than one batch \(8\)"):
        _cli(train_dataset, run, "--resume", "--eval-data", train_dataset["prepared"])
    with pytest.raises(ValueError, match="a train.py run directory, not a Kyutai checkpoint: continue it with"):
        _cli(train_dataset, tmp_path / "other", "--init-from", str(run))
    assert _files(run) == before
    top = train_dataset["index"]["max_token_ids"]["text"]           # a text head too small for the data
    monkeypatch.setitem(moshi.PRESETS, "small_text", dataclasses.replace(TRAIN_CFG, text_card=top))
    with pytest.raises(data.DataError, match=f"holds text token {top}, but the model predicts {top} text ids"):
        _cli(train_dataset, tmp_path / "other", "--config", "small_text")
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").iterdir())
    again = _cli(train_dataset, run, "--overwrite", "--stop-at", "4")
    assert [r["loss"] for r in again] == [r["loss"] for r in first[:4]]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004"]
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


def test_train_resume_passes_over_an_unreadable_checkpoint(train_dataset, tmp_path, monkeypatch, capsys, fast_compile):
    """A truncated process file, or a meta.json that is not JSON, is named in a one-line warning
    and the run resumes from the newest checkpoint that can be read, to the losses of an
    uninterrupted run; the damaged files stay as they were (until a save of the same step sets them
    aside as step_N.corrupt). None readable: an error, and nothing changes. `checkpoint.py list`
    tells them apart beforehand."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    reference = [r["loss"] for r in _cli(train_dataset, tmp_path / "ref", "--stop-at", "12")]
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    shutil.copytree(tmp_path / "ref", run)
    npz = ckpts / "step_000012" / "process_00000.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    damaged, intact = npz.read_bytes(), _files(ckpts / "step_000008")
    capsys.readouterr()
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint.main(["list", str(tmp_path)])                    # not a run dir
    checkpoint.main(["list", str(run)])
    listing = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert listing["step_000008"].endswith(", complete") and f"UNREADABLE: {npz} is corrupt" in listing["step_000012"]
    rest = _cli(train_dataset, run, "--resume", "--stop-at", "10")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: resume: {npz} is corrupt or unreadable (BadZipFile: File is not a zip file); "
                        "trying the one before"]
    assert f"resume: {ckpts / 'step_000008'} (step 8, data position 64)" in out
    np.testing.assert_allclose([r["loss"] for r in rest], reference[8:10], rtol=1e-6)
    assert npz.read_bytes() == damaged and _files(ckpts / "step_000008") == intact
    _cli(train_dataset, run, "--resume", "--stop-at", "12")                 # from step 10: saves 12 anew
    assert (ckpts / "step_000012.corrupt" / "process_00000.npz").read_bytes() == damaged
    assert checkpoint.list_dir(str(ckpts))[-1] == str(ckpts / "step_000012")
    # a meta.json that is not JSON is named; with no checkpoint left to read, the run stops
    shutil.rmtree(run)
    shutil.copytree(tmp_path / "ref", run)
    (ckpts / "step_000012" / "meta.json").write_text('{"step": 12, "leav')
    capsys.readouterr()
    rest = _cli(train_dataset, run, "--resume", "--stop-at", "9")
    assert f"warning: resume: {ckpts / 'step_000012' / 'meta.json'} is corrupt or unreadable (JSONDecodeError" \
        in capsys.readouterr().out
    np.testing.assert_allclose([r["loss"] for r in rest], reference[8:9], rtol=1e-6)
    for step in (8, 9):
        npz = ckpts / f"step_{step:06d}" / "process_00000.npz"
        npz.write_bytes(npz.read_bytes()[:-10])
    before = _files(run)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="none of the 3 checkpoints in .* can be read"):
        _cli(train_dataset, run, "--resume")
    assert _files(run) == before


def test_train_stops_when_the_gradient_norm_is_not_finite(train_dataset, tmp_path, monkeypatch, fast_compile):
    """--lr 1e3 blows the weights up: at step 3 the loss is still finite (~1e26) but its gradient
    overflows to NaN, and so would the updated weights. The run stops naming the step and the
    batch; no checkpoint holds a non-finite weight (steps 1 and 2 are saved, step 3 is not)."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    with pytest.raises(train.NonFiniteLoss, match=r"step 3: gradient norm is nan \(loss [0-9.]+e\+\d+\); nothing "
                                                  r"of this step was saved.*\n.*talk\d\.wav \["):
        _cli(train_dataset, tmp_path / "run", "--lr", "1e3", "--ckpt-every", "1", "--keep-checkpoints", "0")
    saved = checkpoint.list_dir(str(tmp_path / "run" / "checkpoints"))
    assert [checkpoint.step_of(p) for p in saved] == [1, 2]
    for path in saved:
        arrays = np.load(os.path.join(path, "process_00000.npz"))
        assert all(np.isfinite(arrays[k]).all() for k in arrays.files if arrays[k].dtype.kind == "f"), path


def test_train_never_saves_weights_an_update_made_non_finite(train_dataset, tmp_path, monkeypatch, fast_compile):
    """--lr 1e39 is inf in fp32: step 1's loss and gradient are finite, its update is not. The run
    stops at the save of step 1, naming it, and no checkpoint is written."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    with pytest.raises(train.NonFiniteLoss, match=r"step 1: the updated weights are not finite.*not saved"):
        _cli(train_dataset, tmp_path / "run", "--lr", "1e39", "--ckpt-every", "1", "--max-steps", "2")
    assert checkpoint.list_dir(str(tmp_path / "run" / "checkpoints")) == []


_TWO_PROCESS_WORKER = """
import dataclasses, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_disable_most_optimizations", True)
import moshi, train
moshi.PRESETS["train_test"] = dataclasses.replace(moshi.TINY, dep_q=2)
history = train.main(sys.argv[1:])
if jax.process_index() == 0:
    print("LOSSES", [r["loss"] for r in history])
"""


def test_train_two_processes_match_one(train_dataset, tmp_path, monkeypatch, fast_compile):
    """The same command on 2 processes x 4 devices (jax.distributed, as on 2 hosts) gives the
    losses of 1 process x 8 devices; each process writes its own checkpoint shards, and one
    process on another mesh resumes from them exactly."""
    import socket
    import subprocess
    import sys
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    reference = [r["loss"] for r in _cli(train_dataset, tmp_path / "one", "--stop-at", "6")]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["--data", train_dataset["prepared"], "--run-dir", str(tmp_path / "two"), "--config", "train_test",
            "--mesh", "dp=2,fsdp=4", "--batch-size", "8", "--max-steps", "24", "--lr", "3e-3", "--pct-start", "0.1",
            "--dtype", "float32", "--ckpt-every", "8", "--stop-at", "4",
            "--coordinator-address", f"localhost:{port}", "--num-processes", "2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, *args, "--process-id", str(i)], cwd=HERE,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    losses = json.loads(outs[0].split("LOSSES")[1].strip().splitlines()[0])
    np.testing.assert_allclose(losses, reference[:4], rtol=1e-5)
    ckpt = tmp_path / "two" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "process_00000.npz", "process_00001.npz"]
    rest = _cli(train_dataset, tmp_path / "two", "--resume", "--stop-at", "6", "--mesh", "dp=1,fsdp=8")
    np.testing.assert_allclose([r["loss"] for r in rest], reference[4:6], rtol=1e-5)


def test_train_step_with_flash_attention_matches_xla(fast_compile):
    """--attention flash inside the sharded step (dp=2 x fsdp=2): the loss and gradients of XLA's
    attention, through the Pallas forward and backward kernels (interpret mode here)."""
    codes = _train_codes(B=4, T=10, A=1)
    results = []
    for attention in ("xla", "flash"):
        h = train.Hyper(lr=0.5, eps=1.0, max_steps=10, max_norm=1e9, compute_dtype="float32",
                        attention=attention)
        mesh = train.make_mesh(2, 2)
        with jax.set_mesh(mesh):
            plan = train.make_plan(TRAIN_CFG, mesh, h)
            state, frozen = train.initial_state(plan, mesh, h, jax.tree.map(np.asarray, moshi.init(jax.random.key(0), TRAIN_CFG)))
            state, metrics = plan.step(state, frozen, jax.device_put(codes, jax.sharding.NamedSharding(mesh, train.BATCH_SPEC)))
        results.append((np.asarray(metrics), state["opt"][1].inner_state[0].mu))
    (m_xla, mu_xla), (m_flash, mu_flash) = results
    assert rel_err(m_flash, m_xla) < 1e-5 and _max_rel(mu_flash, mu_xla) < 1e-5


def test_lora_adapts_exactly_kyutais_linear_layers():
    """LoRA goes where Kyutai's replace_all_linear_with_lora puts it (every nn.Linear: per-step and
    multi-linear depformer weights, low-rank embedding projections, extra heads), under the same
    module names (testdata/lora_names.json, from the official package)."""
    with open(os.path.join(TESTDATA, "lora_names.json")) as f:
        cases = json.load(f)
    for name, case in cases.items():
        cfg = repo.lm_config(case["config"])
        params = jax.eval_shape(lambda: moshi.init(jax.random.key(0), cfg))
        modules = [m for path in lora.targets(params) for _, m in convert.lora_modules(cfg)[path]]
        assert sorted(modules) == case["modules"], name


def test_train_lora_with_a_depformer_weight_schedule(fast_compile):
    """Depformer steps that share a weight set (schedule [0, 1, 1]) share its adapters: one LoRA
    step on fsdp=2 gives the loss of the merged weights, and the adapters' gradient (via Adam's mu)
    that plain autodiff through lora.merged gives."""
    with open(os.path.join(TESTDATA, "lora_names.json")) as f:
        cfg = repo.lm_config(json.load(f)["schedule"]["config"])
    h = train.Hyper(lr=0.5, eps=1.0, max_steps=10, max_norm=1e9, compute_dtype="float32",
                    lora_rank=2, lora_scaling=2.0)
    params = jax.tree.map(np.asarray, moshi.init(jax.random.key(0), cfg))
    lora_tree = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)) * 0.05,
                        lora.init(jax.random.key(1), params, h.lora_rank))
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (1, 4, 1, 8)),
                            rng.integers(0, cfg.card, (1, 4, cfg.n_q, 8))], axis=2).astype(np.int32)

    def loss_of(adapters):
        out = moshi.forward(lora.merged(params, adapters, h.lora_scaling), cfg, codes[0])
        sums = train.loss_sums(out, codes[0], h.text_padding_weight, h.first_codebook_weight, h.padding_ids)
        return train.loss_from_sums(sums)[0]
    loss, grad = jax.jit(jax.value_and_grad(loss_of))(lora_tree)
    mesh = train.make_mesh(1, 2)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        state, frozen = train.initial_state(plan, mesh, h, params, lora_tree)
        batch = jax.device_put(codes, jax.sharding.NamedSharding(mesh, train.BATCH_SPEC))
        state, metrics = plan.step(state, frozen, batch)
    assert rel_err(np.asarray(metrics)[0], loss) < 1e-5
    b1 = train.one_cycle(h)[1](0)                                # beta1 at step 0
    mu = jax.tree.map(lambda m: np.asarray(m) / (1 - b1), state["opt"][1].inner_state[0].mu)
    assert _max_rel(mu, grad) < 1e-5
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grad["depformer"]["transformer"]))   # all in play


def _lora_from_tensors(tensors: dict, params, cfg, rank: int) -> dict:
    """{moshi-finetune name: array} -> our LoRA tree for `params` (every target must be present)."""
    lora_tree, modules = {}, convert.lora_modules(cfg)
    for path, w in sorted(lora.targets(params).items()):
        lead, (n_out, n_in) = w.shape[:-2], w.shape[-2:]
        a, b = np.zeros((*lead, rank, n_in), np.float32), np.zeros((*lead, n_out, rank), np.float32)
        for idx, module in modules[path]:
            a[idx], b[idx] = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        convert.set_path(lora_tree, path, {"a": a, "b": b})
    return lora_tree


def test_train_export_loads_in_official_moshi(fast_compile, tmp_path):
    """testdata/train_export was written by train.export from a LoRA run; Kyutai's package loaded it
    strictly (model.safetensors + config.json) and also ran LoRALinear on base + adapters/, also
    through CheckpointInfo as moshi-finetune's README says.
    Here: our loader + forward reproduce its logits; base + adapters merge back to the exported
    weights; and the training-time path (weights gathered over fsdp, LoRA merged in the layer
    hook) reproduces the official LoRA model's logits."""
    random_weights = fixture("random_weights")
    folder = os.path.join(TESTDATA, "train_export")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    official = np.load(os.path.join(folder, "official.npz"))
    ckpt = repo.find_checkpoint(folder, lm_only=True)
    cfg = repo.lm_config_for(ckpt)
    params = convert.load_lm(ckpt.moshi, cfg, dtype=jnp.float32)
    codes = jnp.asarray(official["codes"], jnp.int32)
    out = moshi.forward(params, cfg, codes)
    for name, mask in (("logits", "mask"), ("text_logits", "text_mask")):
        assert np.array_equal(np.asarray(out[mask]), official[mask])
        m = official[mask][..., None]
        assert rel_err(np.where(m, out[name], 0), np.where(m, official[name], 0)) < 1e-4
    # base (rebuilt from the key list and seed) + the adapters -> exactly the exported weights
    base = random_weights.random_tensors([(k, tuple(s)) for k, s in meta["spec"]], meta["seed"])
    convert.save_safetensors(tmp_path / "base.safetensors", base)
    base = convert.load_lm(tmp_path / "base.safetensors", cfg, dtype=jnp.float32)
    lora_tree = _lora_from_tensors(_load_safetensors(os.path.join(folder, "adapters", "lora.safetensors")),
                              base, cfg, meta["lora"]["rank"])
    merged = lora.merged(base, lora_tree, meta["lora"]["scaling"])
    assert _max_rel(merged, params) < 1e-6 and _max_rel(base, params) > 1e-2
    # the base + adapters/ as Kyutai's loader takes them (--lora-weight, --config: "lora": true,
    # lora_rank, lora_scaling), merged at load: the official route's logits
    adapters = os.path.join(folder, "adapters")
    found = repo.find_checkpoint(None, str(tmp_path / "base.safetensors"), config=os.path.join(adapters, "config.json"),
                                 lora=os.path.join(adapters, "lora.safetensors"), lm_only=True)
    assert found.lora[1:] == (meta["lora"]["rank"], meta["lora"]["scaling"])
    loaded = convert.load_lm(found.moshi, repo.lm_config_for(found), jnp.float32, lora=found.lora)
    assert _max_rel(loaded, params) < 1e-6
    route = moshi.forward(loaded, cfg, codes)
    m = official["mask"][..., None]
    assert rel_err(np.where(m, route["logits"], 0), np.where(m, official["route_logits"], 0)) < 1e-4
    with pytest.raises(convert.CheckpointError, match="names no adapters: give lora_name or --lora-weight FILE"):
        repo.find_checkpoint(None, str(tmp_path / "base.safetensors"), config=os.path.join(adapters, "config.json"),
                             lm_only=True)
    with pytest.raises(convert.CheckpointError, match='does not say "lora": true'):
        repo.find_checkpoint(None, str(tmp_path / "base.safetensors"), config=os.path.join(folder, "config.json"),
                             lora=os.path.join(adapters, "lora.safetensors"), lm_only=True)
    with pytest.raises(convert.CheckpointError, match="lora.safetensors: .* has rank 2, config.json says 3"):
        convert.load_lm(found.moshi, cfg, lora=(found.lora[0], 3, 2.0))
    # today's train.export writes what the official package loaded strictly: the same files, tensor
    # names, shapes, dtypes and config.json (so a change to export cannot silently break that)
    h = train.Hyper(lora_rank=meta["lora"]["rank"], lora_scaling=meta["lora"]["scaling"])
    train.export(str(tmp_path / "again"), cfg, {"params": jax.tree.map(jnp.asarray, lora_tree)}, base, h,
                 save_adapters=True, dtype="float32")
    for name in ("model.safetensors", "adapters/lora.safetensors"):
        ours, theirs = (convert.SafeTensorsFile(os.path.join(d, name)) for d in (tmp_path / "again", folder))
        assert sorted(ours.keys()) == sorted(theirs.keys()), name
        assert all(ours.shape(k) == theirs.shape(k) and ours.dtype_name(k) == theirs.dtype_name(k)
                   for k in theirs.keys()), name
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(jax.tree.leaves(convert.load_lm(tmp_path / "again" / "model.safetensors",
                                                                                     cfg, jnp.float32)),
                                                    jax.tree.leaves(params)))
    for name in ("config.json", "adapters/config.json"):
        with open(tmp_path / "again" / name) as f, open(os.path.join(folder, name)) as g:
            assert json.load(f) == json.load(g), name
    # the training-time path on a 2-device fsdp mesh vs the official LoRALinear model
    mesh = train.make_mesh(1, 2)
    specs = train.param_specs(base, 2)
    named = lambda tree: jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), tree)   # noqa: E731

    def local_forward(p, l, c):
        view = train.model_view(p, specs, l, lora_specs, meta["lora"]["scaling"], jnp.float32)
        o = moshi.forward(view, cfg, c, layer_hook=lambda layer: train.layer_hook(layer, meta["lora"]["scaling"]))
        return o["logits"], o["text_logits"]
    lora_specs = train.adapter_specs(lora_tree, 2)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.shard_map(local_forward, mesh=mesh, in_specs=(specs, lora_specs, jax.P(train.AXES)),
                                   out_specs=(jax.P(train.AXES), jax.P(train.AXES))))
        logits, text_logits = fn(checkpoint.place(base, named(specs)), checkpoint.place(lora_tree, named(lora_specs)),
                                 jax.device_put(codes, jax.sharding.NamedSharding(mesh, jax.P(train.AXES))))
    m, tm = official["mask"][..., None], official["text_mask"][..., None]
    assert rel_err(np.where(m, logits, 0), np.where(m, official["lora_logits"], 0)) < 1e-4
    assert rel_err(np.where(tm, text_logits, 0), np.where(tm, official["lora_text_logits"], 0)) < 1e-4


def test_train_ttt_lora_sharded_step_matches_one_device(fast_compile):
    """In-Place TTT (layer 1 of 2, 4-frame chunks over 10 frames) under LoRA on dp=2 x fsdp=2: the
    loss, gradients (via Adam's mu) and updated trainables of one device. What trains is the
    adapters plus params["ttt"] (no adapters of its own, split over fsdp like every weight); the
    base is not in it. From moshi.init's TTT (conv 0: the model is exactly the base) the conv gets
    a gradient and moves: TTT does train under LoRA."""
    cfg = dataclasses.replace(TRAIN_CFG, ttt=ttt.TINY)
    h = train.Hyper(lr=0.5, eps=1.0, max_steps=10, max_norm=1e9, compute_dtype="float32",
                    lora_rank=3, lora_scaling=2.0, first_codebook_weight=100.0)
    params = jax.tree.map(np.asarray, moshi.init(jax.random.key(0), cfg))
    rng = np.random.default_rng(0)
    live = dict(params, ttt={"conv": 0.3 * rng.standard_normal(params["ttt"]["conv"].shape).astype(np.float32),
                             "proj": params["ttt"]["proj"]})
    lora_tree = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)) * 0.05,
                        lora.init(jax.random.key(1), params, h.lora_rank))
    assert "ttt" not in lora_tree
    codes = _train_codes(B=8, T=10, A=1)
    _, one, m1, _ = _one_step(1, 1, h, live, lora_tree, codes, cfg)
    _, four, m4, _ = _one_step(2, 2, h, live, lora_tree, codes, cfg)
    mu1, mu4 = one["opt"][1].inner_state[0].mu, four["opt"][1].inner_state[0].mu
    assert rel_err(m4, m1) < 1e-5 and _max_rel(mu4, mu1) < 1e-5 and _max_rel(four["params"], one["params"]) < 1e-5
    assert set(one["params"]) == set(lora_tree) | {"ttt"} and set(one["params"]["ttt"]) == {"conv", "proj"}
    assert all(np.abs(mu1["ttt"][k]).max() > 0 for k in ("conv", "proj"))           # conv and P both learn
    assert all(s.data.shape[1] == cfg.dim // 2 for leaf in jax.tree.leaves(four["params"]["ttt"])
               for s in leaf.addressable_shards)                                       # [n, D/fsdp, ...]
    # moshi.init's TTT: the loss of the base model without TTT, and the conv moves off zero
    _, fresh, m0, _ = _one_step(1, 1, h, params, lora_tree, codes, cfg)
    base = {k: v for k, v in params.items() if k != "ttt"}
    _, _, m_base, _ = _one_step(1, 1, h, base, lora_tree, codes)
    assert rel_err(m0[0], m_base[0]) < 1e-6 and np.abs(np.asarray(fresh["params"]["ttt"]["conv"])).max() > 0


def test_train_ttt_cli_warns_resumes_and_exports(train_dataset, tmp_path, monkeypatch, capsys, fast_compile):
    """--ttt-layers on a checkpoint without TTT: TTT starts at its init, so the first loss is the
    base's, and under --lora-rank its weights train. 16-frame windows are not longer than context
    8 + chunk 8: one warning. Checkpoints carry the TTT weights (resuming gives the losses of an
    uninterrupted run); export writes them, with config.json's "ttt", saying Kyutai's package cannot
    load it, and convert.load_lm (what --init-from uses) reads them back identical."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    base = tmp_path / "base"
    base.mkdir()
    convert.save_lm(base / "model.safetensors", moshi.init(jax.random.key(3), TRAIN_CFG), TRAIN_CFG)
    (base / "config.json").write_text(json.dumps(repo.lm_config_dict(TRAIN_CFG)))
    lora = ("--init-from", str(base), "--lora-rank", "2", "--max-steps", "4", "--ckpt-every", "2")
    with_ttt = (*lora, "--ttt-layers", "every:1:1", "--ttt-chunk", "8")
    plain = _cli(train_dataset, tmp_path / "plain", *lora, "--stop-at", "1")
    capsys.readouterr()
    full = _cli(train_dataset, tmp_path / "ttt", *with_ttt, "--export", str(tmp_path / "export"),
                "--eval-data", _held_out(train_dataset, tmp_path), "--eval-every", "3")
    out = capsys.readouterr().out
    evals = {r["step"]: r for r in full if "eval_loss" in r}
    assert sorted(evals) == [3, 4] and f"eval step 4 | loss {evals[4]['eval_loss']:.4f}" in out
    assert out.count("warning: TTT: windows of 16 frames are not longer than the attention context (8) + one "
                     "TTT chunk (8) = 16 frames") == 1
    assert f"init: TTT on layers (1,), new to {base}: starting at their init" in out
    assert rel_err(full[0]["loss"], plain[0]["loss"]) < 1e-6
    export = tmp_path / "export"
    assert (f"export: {export} has TTT layers: Kyutai's moshi package cannot load it; sample.py --hf-repo {export} "
            f"and train.py --init-from {export} do") in out
    _cli(train_dataset, tmp_path / "resumed", *with_ttt, "--stop-at", "2")
    rest = _cli(train_dataset, tmp_path / "resumed", *with_ttt, "--resume")
    # (full evaluated twice, rest never: evaluating changes nothing)
    np.testing.assert_allclose([r["loss"] for r in rest], [r["loss"] for r in full[2:]], rtol=1e-6)
    # the exported TTT weights: the checkpoint's, exactly (fp32 export), under config.json's ttt entry
    train.main(["export", "--run-dir", str(tmp_path / "ttt"), "--out", str(tmp_path / "fp32"), "--dtype", "float32"])
    cfg = repo.lm_config(tmp_path / "fp32" / "config.json")
    params = convert.load_lm(tmp_path / "fp32" / "model.safetensors", cfg)
    assert cfg == dataclasses.replace(TRAIN_CFG, ttt=ttt.TTTConfig(layers=(1,), chunk_size=8))
    one = jax.sharding.NamedSharding(train.make_mesh(1, 1), jax.P())
    like = {"params": {"ttt": jax.tree.map(lambda x: jax.device_put(np.zeros_like(x), one), params["ttt"])}}
    saved = checkpoint.load(str(tmp_path / "ttt" / "checkpoints" / "step_000004"), like)["params"]["ttt"]
    assert _max_rel(saved, params["ttt"]) == 0 and np.abs(params["ttt"]["conv"]).max() > 0
    # the held-out loss after the last step: one batch (8 windows, in order) of the exported model (LoRA
    # merged, TTT) on one device; its perplexity is moshi-finetune's 2 ** loss
    assert rel_err(_eval_losses(evals[4]), _one_device_loss(params, cfg, str(tmp_path / "held_out"))) < 1e-5
    assert evals[4]["eval_perplexity"] == 2 ** evals[4]["eval_loss"]
    with open(export / "config.json") as f:
        assert json.load(f)["ttt"]["layers"] == [1]
    # --init-from a checkpoint with TTT: its TTT weights load (no new init)
    capsys.readouterr()
    train.main(["--data", train_dataset["prepared"], "--run-dir", str(tmp_path / "again"), "--mesh", "dp=2,fsdp=4",
                "--init-from", str(tmp_path / "fp32"), *lora[2:], "--dtype", "float32", "--stop-at", "1"])
    out = capsys.readouterr().out
    assert "TTT on layers (1,)" in out and "init: TTT" not in out


def test_train_lora_ft_embed_trains_the_embeddings_and_exports_them(train_dataset, tmp_path, monkeypatch,
                                                                     fast_compile):
    """--lora-ft-embed (moshi-finetune's lora.ft_embed): the embedding tables train in full beside
    the adapters, every other weight stays the base's; export's adapters/lora.safetensors carries
    them under Kyutai's names, so base + adapters, merged at load as Kyutai's loader does, is the
    exported model; a run made so resumes only so."""
    monkeypatch.setitem(moshi.PRESETS, "train_test", TRAIN_CFG)
    base = tmp_path / "base"
    base.mkdir()
    convert.save_lm(base / "model.safetensors", moshi.init(jax.random.key(3), TRAIN_CFG), TRAIN_CFG)
    (base / "config.json").write_text(json.dumps(repo.lm_config_dict(TRAIN_CFG)))
    run = ("--init-from", str(base), "--lora-rank", "2", "--max-steps", "2", "--lora-ft-embed")
    _cli(train_dataset, tmp_path / "ft", *run)
    train.main(["export", "--run-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "export"), "--dtype", "float32",
                "--save-adapters"])
    before = convert.load_lm(base / "model.safetensors", TRAIN_CFG)
    after = convert.load_lm(tmp_path / "export" / "model.safetensors", TRAIN_CFG, jnp.float32)
    tables = [("emb",), ("text_emb",), ("depformer", "emb"), ("depformer", "text_emb")]
    assert all(_max_rel(convert.get_path(after, p), convert.get_path(before, p)) > 1e-4 for p in tables)
    assert _max_rel(after["out_norm"], before["out_norm"]) == 0           # neither adapted nor trained
    adapters = tmp_path / "export" / "adapters"
    keys = convert.SafeTensorsFile(adapters / "lora.safetensors").keys()
    assert {"emb.0.weight", "text_emb.weight", "depformer_emb.0.weight", "depformer_text_emb.weight"} <= set(keys)
    found = repo.find_checkpoint(None, str(base / "model.safetensors"), config=str(adapters / "config.json"),
                                 lora=str(adapters / "lora.safetensors"), lm_only=True)
    assert _max_rel(convert.load_lm(found.moshi, TRAIN_CFG, jnp.float32, lora=found.lora), after) < 1e-6
    # a weight trained whole under LoRALinear's name for it replaces the base's too (here without adapters)
    tensors = {k: np.asarray(v) for k, v in _load_safetensors(adapters / "lora.safetensors").items()
               if not k.startswith("text_linear.lora_")}
    replaced = np.full(before["text_linear"].shape, 0.5, np.float32)
    convert.save_safetensors(tmp_path / "whole.safetensors", dict(tensors, **{"text_linear.frozen_W.weight": replaced}))
    merged = convert.load_lm(found.moshi, TRAIN_CFG, jnp.float32, lora=(tmp_path / "whole.safetensors", 2, 2.0))
    assert np.array_equal(merged["text_linear"], replaced)
    bad = dict(tensors, **{"text_linear.frozen_W.weight": replaced[:3]})
    convert.save_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(convert.CheckpointError, match=r"text_linear.frozen_W.weight \(3, 64\), the LM's is \(\d+, 64\)"):
        convert.load_lm(found.moshi, TRAIN_CFG, jnp.float32, lora=(tmp_path / "bad.safetensors", 2, 2.0))
    with pytest.raises(ValueError, match="was made with lora_ft_embed=True, this run has False"):
        _cli(train_dataset, tmp_path / "ft", *run[:-1], "--resume")


# ================================================================================================
# checkpoint.py
#
# Per-process shards, atomic, read back onto another mesh.


def test_train_checkpoint_round_trip_bf16_and_other_mesh(tmp_path):
    """Per-process shards with bf16 kept exact, reassembled on a different mesh; a .tmp directory
    (a save that never finished) is not a checkpoint."""
    state = {"w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8),
             "b": (np.arange(16) / 7).astype(jnp.bfloat16), "step": np.int32(7)}
    specs = {"w": jax.P("fsdp", None), "b": jax.P("fsdp"), "step": jax.P()}
    mesh = train.make_mesh(2, 4)
    placed = checkpoint.place(state, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
    checkpoint.save(str(tmp_path), 3, placed, {"data_position": 5}, keep=1)
    (tmp_path / "step_000004.tmp").mkdir()
    assert checkpoint.list_dir(str(tmp_path)) == [str(tmp_path / "step_000003")]
    for dp, fsdp, spec in ((1, 1, jax.P()), (4, 2, jax.P(None, "fsdp"))):
        other = train.make_mesh(dp, fsdp)
        like = checkpoint.place(jax.tree.map(np.zeros_like, state), jax.tree.map(
            lambda x: jax.sharding.NamedSharding(other, spec if x.ndim == 2 else jax.P()), state))
        back = checkpoint.load(str(tmp_path / "step_000003"), like)
        assert back["b"].dtype == jnp.bfloat16 and back["w"].sharding == like["w"].sharding
        assert all(np.array_equal(np.asarray(back[k]), np.asarray(state[k])) for k in state)
    # onto the mesh it was saved from, each device's block reads only the one piece it overlaps
    reads = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np.lib.npyio.NpzFile, "__getitem__",
                   lambda f, key: reads.append(key) or real_getitem(f, key))
        back = checkpoint.load(str(tmp_path / "step_000003"), placed)
        assert np.array_equal(np.asarray(back["w"]), state["w"])
    w_reads = [key for key in reads if key.startswith("['w']")]
    # 8 blocks, 4 pieces
    assert len(w_reads) == len(placed["w"].addressable_shards) and len(set(w_reads)) == 4
    # a meta.json whose dtype does not fit the saved bytes names the piece, not garbage values
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tmp_path / "step_000003", relabelled)
    meta = json.loads((relabelled / "meta.json").read_text())
    meta["leaves"]["['w']"]["dtype"] = "bfloat16"
    (relabelled / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CorruptCheckpoint,
                       match=r"piece \['w'\]@0,0 holds float32, meta.json says bfloat16"):
        jax.block_until_ready(checkpoint.load(str(relabelled), placed))
    # a state with a leaf the checkpoint lacks (another train.py's optimizer state) is named
    with pytest.raises(ValueError, match=r"has no state leaf \['extra'\]: another version of train.py"):
        checkpoint.load(str(tmp_path / "step_000003"), dict(placed, extra=placed["step"]))
    # saving a step that is already there (resume passed it over) sets it aside, never over another
    for position in (6, 7):
        checkpoint.save(str(tmp_path), 3, placed, {"data_position": position}, keep=1)
    assert [checkpoint.read_meta(str(tmp_path / name))["data_position"]
            for name in ("step_000003.corrupt", "step_000003.corrupt+", "step_000003")] == [5, 6, 7]


def test_checkpoint_tidy_drops_later_metrics_and_a_line_cut_short(tmp_path):
    """Resuming at step 2: the steps logged after it and a last line the interruption cut in half
    are dropped (the run logs them again); an unfinished save (.tmp) is removed."""
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    (tmp_path / "checkpoints" / "step_000003.tmp").mkdir(parents=True)
    checkpoint.tidy(str(tmp_path), 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert os.listdir(tmp_path / "checkpoints") == []


def test_train_init_from_accepts_what_hf_repo_accepts(tmp_path, monkeypatch):
    """--init-from is resolved by repo.find_checkpoint, as sample.py's --hf-repo: a .safetensors
    file (with the config.json beside it), a repo folder holding only the LM, a Hugging Face id (of
    which only the LM's files are fetched); a path that does not exist is named as such."""
    import types
    folder = os.path.join(TESTDATA, "train_export")
    args = lambda init_from: types.SimpleNamespace(init_from=init_from, config=None)   # noqa: E731
    cfg_file, params_file = checkpoint.load_model(args(os.path.join(folder, "model.safetensors")))
    cfg_dir, params_dir = checkpoint.load_model(args(folder))
    assert cfg_file == cfg_dir == repo.lm_config(os.path.join(folder, "config.json"))
    assert _max_rel(params_file, params_dir) == 0
    fetched = []

    def download(repo_id, name, **kw):
        fetched.append((repo_id, name))
        return os.path.join(folder, name)
    _fake_hub(monkeypatch, download)
    cfg_hub, _ = checkpoint.load_model(args("someone/moshi-finetune"))
    assert cfg_hub == cfg_dir and fetched == [("someone/moshi-finetune", n) for n in ("config.json", "model.safetensors")]
    with pytest.raises(convert.CheckpointError, match="--init-from: no such file or directory .*missing"):
        checkpoint.load_model(args(str(tmp_path / "missing")))


def test_train_joins_hosts_when_a_launcher_started_it(monkeypatch):
    """Several processes started by srun / mpirun / a TPU pod join up; one process does not."""
    assert checkpoint.multi_process_launcher({}) is None
    assert checkpoint.multi_process_launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None     # salloc, no srun
    assert checkpoint.multi_process_launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None  # sbatch
    assert checkpoint.multi_process_launcher({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
                                         "SLURM_STEP_NUM_TASKS": "4"})
    assert checkpoint.multi_process_launcher({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}) is None
    mpirun = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000"}
    assert checkpoint.multi_process_launcher(mpirun)
    assert checkpoint.multi_process_launcher({"OMPI_COMM_WORLD_SIZE": "8"}) is None      # Open MPI 5: JAX cannot tell
    assert checkpoint.multi_process_launcher({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert checkpoint.multi_process_launcher({"TPU_WORKER_HOSTNAMES": "w0"}) is None
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    args = train.train_parser().parse_args(["--data", "d", "--run-dir", "r"])
    checkpoint.join_hosts(args)
    assert calls == []
    for name, value in dict(mpirun, OMPI_COMM_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    checkpoint.join_hosts(args)
    assert calls == [{}]
    checkpoint.join_hosts(train.train_parser().parse_args(["--data", "d", "--run-dir", "r", "--coordinator-address",
                                                   "h:1", "--num-processes", "2", "--process-id", "1"]))
    assert calls[1] == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
