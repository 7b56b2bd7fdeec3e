"""Fixtures for sample.py: Kyutai's own offline loop (run_inference.py) on a tiny moshiko-shaped model.

Run with the official package: `~/oracle/bin/python testdata/make_sample_fixtures.py` (a minute).
It builds a local model repo the way a Hugging Face one is laid out (config.json, model.safetensors,
the Mimi checkpoint plus the mimi_config.json that config.json names, a sentencepiece model), loads
it with the official `CheckpointInfo.from_hf_repo` and runs the official `InferenceState.run` (the
loop of `python -m moshi.run_inference`) with greedy decoding on testdata/hello.wav. It records
every frame's tokens, the user's Mimi codes and the first decoded frames.

Committed outputs: sample_lm_keys.txt and sample_mimi_keys.txt (the official state dicts' names and
shapes, on-disk naming) and sample_fixture.npz. The random weights are not committed: the test
rebuilds them bit for bit from the key lists, the seeds and `lm_overrides` / `mimi_overrides`.

testdata/hello.wav (4.1 s, 24 kHz mono 16-bit) is the README's example prompt, made with
`espeak-ng -v en-us -s 160 "Hello Moshi! How are you today? Tell me about the ocean."`, resampled
to 24 kHz, trimmed and peak-normalised to 0.7.

Also recorded: pyloudnorm's integrated loudness (BS.1770) of a few signals, which sample.py's own
implementation must reproduce (`pip install pyloudnorm` in the fixture environment).

Everything above `main` stays importable without torch: test_all.py uses it.
"""
import hashlib
import io
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = os.path.join(HERE, "hello.wav")
LM_SEED, MIMI_SEED = 2024, 2025
DECODED_FRAMES = 16           # decoded audio kept for the first frames (the tokens are kept for all)

# Kyutai's lm kwargs for moshi.TINY: moshiko's streams, delays and layout, tiny widths, a KV window
# of 8 frames (so the 51-frame prompt wraps the ring cache six times).
LM_CONFIG = {
    "dim": 64, "text_card": 96, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 64,
    "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 8, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 32, "depformer_dim_feedforward": 132, "depformer_num_heads": 2, "depformer_num_layers": 2,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
# Kyutai's mimi_config for sample.tiny_mimi_config(64): the real 80 ms frame (ratios 8 6 5 4,
# 12.5 Hz), 8 codebooks of 64 entries, tiny widths, a transformer window of 8 steps.
MIMI_CONFIG = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 16, "causal": True, "n_filters": 4, "n_residual_layers": 1,
               "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
               "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
               "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 8, "n_q": 8, "bins": 64, "input_dimension": 16, "output_dimension": 16},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 2, "causal": True, "layer_scale": 0.01,
                    "context": 8, "conv_layout": True, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 32,
                    "input_dimension": 16, "output_dimensions": [16]},
}
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"   # the default name: no mimi_name needed
REPO_CONFIG = dict(LM_CONFIG, mimi_config_name="mimi_config.json")

CORPUS = """Hello Moshi, how are you today? I am fine, thank you. Tell me about the ocean.
The ocean covers most of the planet and holds nearly all of its water.
Waves are made by the wind, and tides by the moon.
What is your favorite color? I like blue, like the sea and the sky.
Can you hear me? Yes, I can hear you very well.
<system> You enjoy having a good conversation. <system>
Let us talk about music, books and the weather tomorrow."""


def train_tokenizer(path, vocab_size=LM_CONFIG["text_card"]):
    """A tiny sentencepiece model with Kyutai's special ids (0 unk, 1 bos, 2 eos, 3 pad)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=1.0,
        minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def lm_overrides():
    # Norm gains near 1 (the default recipe treats the [1, 1, D] RMSNorm gains as matrices).
    return {"*alpha": lambda n, s, rng: 1.0 + 0.1 * rng.standard_normal(s)}


def mimi_overrides():
    """Codebooks as in a real checkpoint, embedding_sum / cluster_usage, with usage around 1."""
    return {"*cluster_usage": lambda n, s, rng: rng.uniform(0.8, 1.25, s),
            "*embedding_sum": lambda n, s, rng: 0.3 * rng.standard_normal(s),
            "*_initialized": lambda n, s, rng: np.ones(s),
            "*convtr.weight": lambda n, s, rng: rng.standard_normal(s) / np.sqrt(s[0] * 2.0)}


def read_prompt():
    """hello.wav as float32 [S] (16-bit samples / 32768, as soundfile and sphn read them)."""
    import soundfile
    wav, sr = soundfile.read(PROMPT, dtype="float32")
    assert sr == 24000 and wav.ndim == 1
    return wav


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def loudness_signals():
    """(name, mono signal at 24 kHz) pairs whose BS.1770 loudness the fixture records."""
    wav = read_prompt().astype(np.float64)
    t = np.arange(48000) / 24000
    return [("hello", wav), ("hello_quiet", 0.02 * wav), ("sine997", np.sin(2 * np.pi * 997 * t)),
            ("tone_bursts", np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0.3))]


# ----------------------------------------------------------------------------------------------
# Everything below needs torch and the official package.

def disk_names(state_dict, dep_q):
    """In-memory `in_projs.{i}` / `out_projs.{i}` -> the packed on-disk names every checkpoint uses."""
    sys.path.append(os.path.dirname(HERE))          # convert.py, *after* the official moshi package
    import convert
    tensors = {k: v.numpy() for k, v in state_dict.items()}
    return convert.to_disk_attention_names(tensors, lambda name: dep_q if name.startswith("depformer.") else 1)


def build_repo(repo):
    """The local repo: random weights in Kyutai's on-disk format, configs, tokenizer."""
    import random_weights as rw
    import torch
    from moshi.models import loaders
    os.makedirs(repo, exist_ok=True)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(LM_CONFIG), device="cpu", dtype=torch.float32)
    lm_spec = [(k, v.shape) for k, v in disk_names(lm.state_dict(), LM_CONFIG["dep_q"]).items()]
    mimi = loaders.get_mimi(None, MIMI_CONFIG, num_codebooks=8)
    mimi_spec = [(k, v.shape) for k, v in disk_names(mimi.state_dict(), 1).items()]
    rw.write_spec(os.path.join(HERE, "sample_lm_keys.txt"), lm_spec,
                  "official LMModel(**LM_CONFIG) state dict, on-disk naming: name<TAB>shape")
    rw.write_spec(os.path.join(HERE, "sample_mimi_keys.txt"), mimi_spec,
                  "official Mimi(MIMI_CONFIG) state dict, on-disk naming: name<TAB>shape")
    from safetensors.numpy import save_file
    save_file(rw.random_tensors(lm_spec, LM_SEED, lm_overrides()), os.path.join(repo, "model.safetensors"))
    save_file(rw.random_tensors(mimi_spec, MIMI_SEED, mimi_overrides()), os.path.join(repo, MIMI_FILE))
    with open(os.path.join(repo, "config.json"), "w") as f:
        json.dump(REPO_CONFIG, f)
    with open(os.path.join(repo, "mimi_config.json"), "w") as f:
        json.dump(MIMI_CONFIG, f)
    train_tokenizer(os.path.join(repo, "tokenizer_spm_32k_3.model"))


def run_official(repo, wav):
    """Kyutai's offline loop, greedy, batch 1: every frame's tokens, user codes and decoded audio."""
    import torch
    from moshi.models import loaders
    from moshi.run_inference import InferenceState, seed_all
    seed_all(4242)
    info = loaders.CheckpointInfo.from_hf_repo(
        "unused/repo", moshi_weights=os.path.join(repo, "model.safetensors"),
        mimi_weights=os.path.join(repo, MIMI_FILE), tokenizer=os.path.join(repo, "tokenizer_spm_32k_3.model"),
        config_path=os.path.join(repo, "config.json"), mimi_config_path=os.path.join(repo, "mimi_config.json"))
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    state = InferenceState(info, mimi, info.get_text_tokenizer(), lm, batch_size=1, cfg_coef=1.0,
                           device="cpu", use_sampling=False, **info.lm_gen_config)
    tokens, user_codes = [], []
    step, encode = state.lm_gen.step, state.mimi.encode

    def recording_step(codes):
        out = step(codes)
        if out is not None:
            tokens.append(out[0, :, 0].numpy())
        return out

    def recording_encode(chunk):
        codes = encode(chunk)
        user_codes.append(codes[0, :, 0].numpy())
        return codes

    state.lm_gen.step, state.mimi.encode = recording_step, recording_encode
    with torch.no_grad():
        (text, pcm), = state.run(torch.from_numpy(wav)[None, None])
    tokens = np.stack(tokens).astype(np.int32)                 # [T, 1 + dep_q]
    assert np.array_equal(tokens[:, 0], text.numpy()), "recorded tokens differ from run()'s text"
    return tokens, np.stack(user_codes).astype(np.int32), pcm[0].numpy()


def main():
    import tempfile
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.path.insert(0, HERE)
    out = {"prompt_sha256": np.array(digest(PROMPT))}
    with tempfile.TemporaryDirectory() as repo:
        build_repo(repo)
        wav = read_prompt()
        tokens, user_codes, pcm = run_official(repo, wav)
    out["tokens"], out["user_codes"] = tokens, user_codes
    out["pcm_head"] = pcm[: DECODED_FRAMES * 1920]
    F = 1920
    print(f"official run_inference loop: {len(wav)} samples -> {len(tokens)} frames "
          f"(the trailing {len(wav) % F} samples dropped), decoded {pcm.shape[-1]} samples")
    print("distinct text tokens:", len(np.unique(tokens[:, 0])),
          "| distinct codes per audio stream:", [len(np.unique(c)) for c in tokens[:, 1:].T],
          "| distinct user codes:", [len(np.unique(c)) for c in user_codes.T])
    try:
        import pyloudnorm
        meter = pyloudnorm.Meter(24000)
        for name, x in loudness_signals():
            out[f"lufs_{name}"] = np.array(meter.integrated_loudness(x))
            print(f"pyloudnorm {name}: {float(out[f'lufs_{name}']):.4f} LUFS")
    except ImportError:
        sys.exit("pip install pyloudnorm: its loudness values are part of the fixture")
    path = os.path.join(HERE, "sample_fixture.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
