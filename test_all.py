"""The test suite: `python -m pytest -q test_all.py` (CI runs exactly the README's command).

Parity tests compare against outputs of Kyutai's official `moshi` 0.2.13 package, saved under
testdata/ by the `testdata/make_*_fixtures.py` scripts (which need torch; these tests do not).
Tolerances: fp32 relative error <= 1e-4 on activations/logits; exact equality on tokens and codes.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import convert  # noqa: E402
import helium  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "testdata")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ================================================================================================
# helium.py


HELIUM_CONFIGS = {
    "mimi": helium.TransformerConfig(32, 4, 2, 64, context=6, norm="layer_norm", gating="none", layer_scale=0.01),
    "lm": helium.TransformerConfig(32, 4, 2, int(4.125 * 32), context=5),
    "dep": helium.TransformerConfig(32, 4, 2, int(4.125 * 32), positional_embedding="none",
                                    weights_per_step=4, weights_per_step_schedule=(0, 1, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(HELIUM_CONFIGS))
def test_helium_matches_official_transformer(name):
    """Batch and streaming outputs of Kyutai's StreamingTransformer, incl. its ring-cache wrap."""
    cfg = HELIUM_CONFIGS[name]
    d = np.load(os.path.join(TESTDATA, "helium_fixture.npz"))
    sd = {k.split("|")[1]: d[k] for k in d.files if k.startswith(name + "|")}   # in-memory naming
    sd = convert.to_disk_attention_names(sd, lambda _: cfg.num_weight_sets)
    convert.check_keys(convert.transformer_keys("layers.", cfg), {k: v.shape for k, v in sd.items()}, name)
    params = convert.stack_transformer(sd, "layers.", cfg, jnp.asarray)
    x = jnp.asarray(d[name + "_x"])
    T = x.shape[1]
    steps = tuple(range(T))
    y, _ = helium.transformer(helium.select_step_weights(params, cfg, steps), cfg, x)
    assert rel_err(y, d[name + "_y"]) < 1e-5
    chunk = 1 if cfg.weights_per_step else 2
    cache, ys = helium.init_cache(cfg, x.shape[0]), []
    for t in range(0, T, chunk):
        p = helium.select_step_weights(params, cfg, tuple(range(t, t + chunk)))
        cache, yt = helium.step(p, cfg, cache, x[:, t:t + chunk])
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), d[name + "_ys"]) < 1e-5
    # and the weights survive the trip back to Kyutai's on-disk naming
    back = convert.unstack_transformer(params, "layers.", cfg)
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_helium_streaming_equals_batch_within_window():
    """One step at a time through a ring cache equals the sliding-window batch pass, past the wrap."""
    cfg = helium.TransformerConfig(32, 4, 2, 128, context=8)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y, _ = helium.transformer(params, cfg, x)
    step = jax.jit(lambda c, xt: helium.step(params, cfg, c, xt))
    cache, ys = helium.init_cache(cfg, 2), []
    for t in range(x.shape[1]):
        cache, yt = step(cache, x[:, t:t + 1])
        ys.append(yt)
    assert cache["k"].shape[3] == 8                              # constant memory: 8 slots for 21 steps
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-5


def test_helium_is_causal():
    """d output[t] / d input[s] is exactly zero for s > t, and for s <= t - context."""
    cfg = helium.TransformerConfig(16, 2, 2, 64, context=3)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 10, 16))
    jac = jax.jacobian(lambda x: helium.transformer(params, cfg, x)[0][0, 5].sum())(x)[0]   # [T, D]
    touched = np.abs(np.asarray(jac)).sum(-1) > 0
    # 2 layers of window 3 reach back 2 * (3 - 1) = 4 steps: inputs 1..5 matter, nothing else.
    assert touched.tolist() == [t in range(1, 6) for t in range(10)]


@pytest.mark.parametrize("context", [None, 50])
def test_flash_attention_kernel_matches_reference(context):
    """The Pallas kernel (interpret mode on CPU) against the plain attention, values and gradients,
    with a length that is not a multiple of the blocks and a window that skips whole blocks."""
    cfg = helium.TransformerConfig(64, 2, 1, 128, context=context)
    params = helium.init(jax.random.key(0), cfg)
    x = jax.random.normal(jax.random.key(1), (1, 200, 64))
    loss = lambda p, attention: jnp.sum(jnp.sin(helium.transformer(p, cfg, x, attention=attention)[0]))
    y_ref, y_flash = (helium.transformer(params, cfg, x, attention=a)[0] for a in ("xla", "flash"))
    assert rel_err(y_flash, y_ref) < 1e-5
    g_ref, g_flash = (jax.grad(loss)(params, a) for a in ("xla", "flash"))
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-4
    q, k, v = (jax.random.normal(kk, (1, 2, 200, 64)) for kk in jax.random.split(jax.random.key(2), 3))
    small_blocks = helium.flash_attention(q, k, v, context, 64, 128)
    assert rel_err(small_blocks, helium._reference_causal(q, k, v, context)) < 1e-5


# ================================================================================================
# convert.py: safetensors and key checking


def test_safetensors_round_trip_and_atomic_write(tmp_path):
    import ml_dtypes
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.ones((2, 5), ml_dtypes.bfloat16), "c": np.arange(3, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    convert.save_safetensors(path, tensors, {"format": "pt"})
    back = convert.load_safetensors(path)
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert isinstance(back["a"].base, np.memmap) or isinstance(back["a"], np.memmap)   # lazy, not a copy
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]                   # no temp file left


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
        convert.load_safetensors(junk)


# ================================================================================================
# train.py
#
# Fixtures: testdata/make_train_fixtures.py (moshi-finetune's own interleaver; the official moshi
# package for the exported checkpoint). Budget: tiny models, short windows, < 5 min on 2 cores.

import json  # noqa: E402

import train  # noqa: E402


def _train_spm():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(TESTDATA, "train_spm.model"))


def test_train_interleaver_matches_moshi_finetune():
    """Text rows and audio validity for every window, as moshi-finetune's InterleavedTokenizer made them."""
    sp = _train_spm()
    with open(os.path.join(TESTDATA, "train_interleaver.json")) as f:
        fixture = json.load(f)
    for word, pieces in fixture["pieces"].items():
        assert train.tokenize_word(sp, word) == pieces
    for case in fixture["cases"]:
        frames = round(case["window_sec"] * train.FRAME_RATE)
        alignments = sorted([(w, s, e, spk) for w, (s, e), spk in case["alignments"]], key=lambda a: a[1])
        wav = np.zeros((2, round(case["file_sec"] * train.SAMPLE_RATE)), np.float32)
        _, real_frames = train.cut_windows(wav, frames)
        assert len(real_frames) == len(case["text"]), case["name"]
        for w, real in enumerate(real_frames):
            assert (np.arange(frames) < real).astype(int).tolist() == case["audio_valid"][w], case["name"]
            got = train.window_text(sp, alignments, w, frames, int(real))
            assert got.tolist() == case["text"][w], (case["name"], w)
