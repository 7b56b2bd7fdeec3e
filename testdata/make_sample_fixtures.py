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

PersonaPlex: `PYTHONPATH=<NVIDIA/personaplex checkout>/moshi ~/oracle/bin/python
testdata/make_sample_fixtures.py personaplex` runs NVIDIA's own offline flow (moshi/offline.py:
voice prompt normalised to -24 LUFS, 6 silence frames, the <system>-wrapped text prompt, 6 silence
frames, then the user's frames) with greedy decoding on a tiny PersonaPlex-shaped model (dep_q 16)
and the same tiny Mimi, and writes sample_personaplex_keys.txt and sample_personaplex_fixture.npz.
(A checkout: `git -C <mirror> archive HEAD moshi | tar -x -C /tmp/personaplex`; the flow needs
pyloudnorm and soundfile beside the fork, e.g. `pip install --target DIR pyloudnorm soundfile`, DIR
last on PYTHONPATH, its numpy removed.) PersonaPlex's silence and 440 Hz sine codes are constants
for the released Mimi; for the tiny Mimi the script computes them the same way (one frame encoded
from a fresh state) and patches them in. The fork is only run here, never copied into the repo.

The same mode writes sample_personaplex_voice.pt and sample_personaplex_wrap_fixture.npz, where
the fork's KV rings wrap (it keeps an older RingKVCache than moshi 0.2.13, which sees one key less
once full: helium.ring_positions): the same weights with an LM context of WRAP_CONTEXT frames,
shorter than prompt + conversation, and the tiny Mimi's 8-step window: the offline flow's tokens
for every frame, the first decoded frames and the logits of the last frames; and the fork's Mimi
streaming hello.wav frame by frame, encoder then decoder, past the wrap: codes and decoded audio.
The first run saves its voice with `save_voice_prompt_embeddings=True`, as NVIDIA's .pt voices are
made (its LMGen's input embeddings and token ring), then runs the flow again from that .pt
(`load_voice_prompt_embeddings`, as `--voice-prompt NATF2.pt` does): `pt_tokens`. Also written:
sample_torch_tensors.pt, other tensors torch.save writes (see tensor_zoo), for the .pt reader. That run keeps
the 3000-frame window, so the conversation still sees the voice prompt (through the wrap run's
24-frame window and two layers, nothing of it would reach the conversation).

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

# The fork is built on an older moshi whose streaming ring KV cache hides the oldest key once the
# ring is full (a query then sees context - 1 past steps, where 0.2.13 sees context), both in the LM
# and in Mimi. The released models only meet this after 4 minutes (the LM's 3000 frames) and 10 s
# (Mimi's 250 steps), so the first PersonaPlex fixture keeps both windows unfilled (the released
# 3000-frame and 250-step contexts; the same weights as the moshiko fixture's Mimi), and the "wrap"
# one fills both (the same weights again, the LM's window shorter than its 62 prompt frames).
PERSONA_CONFIG = dict(LM_CONFIG, dep_q=16, context=3000)
PERSONA_MIMI_CONFIG = dict(MIMI_CONFIG, transformer=dict(MIMI_CONFIG["transformer"], context=250))
PERSONA_SEED = 2026
WRAP_CONTEXT = 24
PERSONA_WRAP_CONFIG = dict(PERSONA_CONFIG, context=WRAP_CONTEXT)
VOICE_PT = os.path.join(HERE, "sample_personaplex_voice.pt")
TENSORS_PT = os.path.join(HERE, "sample_torch_tensors.pt")       # for sample.py's .pt reader: see tensor_zoo
LOGIT_FRAMES = 6              # logits kept for the last frames of the wrap run (the tokens are kept for all)
MIMI_DECODED_FRAMES = 24      # decoded audio kept of the fork's Mimi run
VOICE_SPAN = (12000, 40800)                  # the voice prompt: 1.2 s of hello.wav from 0.5 s
TEXT_PROMPT = "You enjoy having a good conversation."

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


def write_voice_prompt(path):
    """The voice prompt, a slice of hello.wav, as a 16-bit wav (same samples on every machine)."""
    import soundfile
    soundfile.write(path, read_prompt()[VOICE_SPAN[0]:VOICE_SPAN[1]], 24000, subtype="PCM_16")


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
    return convert.to_disk_names(tensors, lambda name: dep_q if name.startswith("depformer.") else 1)


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


def persona_lm(config):
    """The fork's LMModel(**config) with the fixture's random weights (the context does not change them)."""
    import torch
    import random_weights as rw
    from moshi.models.lm import LMModel
    model = LMModel(device="cpu", dtype=torch.float32, **config).eval()
    spec = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    rw.write_spec(os.path.join(HERE, "sample_personaplex_keys.txt"), spec,
                  "PersonaPlex LMModel(**PERSONA_CONFIG) state dict: name<TAB>shape")
    tensors = rw.random_tensors(spec, PERSONA_SEED, lm_overrides())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    return model


def persona_mimi(tmp, mimi_config):
    """The fork's Mimi with the tiny Mimi's weights, and PersonaPlex's constants recomputed for it."""
    import torch
    import random_weights as rw
    from moshi.models import loaders, lm as pp_lm
    from safetensors.numpy import save_file
    # PersonaPlex's loader hard-codes the released Mimi's settings: point them at the tiny one.
    loaders._seanet_kwargs = mimi_config["seanet"]
    loaders._quantizer_kwargs = mimi_config["quantizer"]
    loaders._transformer_kwargs = mimi_config["transformer"]
    mimi_spec = rw.read_spec(os.path.join(HERE, "sample_mimi_keys.txt"))
    save_file(rw.random_tensors(mimi_spec, MIMI_SEED, mimi_overrides()), os.path.join(tmp, MIMI_FILE))
    mimi = loaders.get_mimi(os.path.join(tmp, MIMI_FILE), "cpu")
    F, constants = int(mimi.sample_rate / mimi.frame_rate), {}
    with torch.no_grad():      # PersonaPlex's constants, recomputed for this Mimi
        for name, frame in (("SILENCE_TOKENS", np.zeros(F, np.float32)),
                            ("SINE_TOKENS", pp_lm.create_sinewave(F / 24000, 24000))):
            with mimi.streaming(1):
                codes = mimi.encode(torch.from_numpy(frame)[None, None])[0, :, 0].numpy()
            setattr(pp_lm, name, codes.astype(np.int64))
            constants[name.lower()] = codes.astype(np.int32)
    return mimi, constants


def offline_flow(model, mimi, voice, sp, save_voice=False, logit_frames=0):
    """NVIDIA's offline.py from the prompts on (its warm-up leaves no trace after the resets), greedy:
    voice (a wav, or a .pt of saved embeddings) -> (tokens [T, 17], pcm [T * F], logits of the last
    `logit_frames` frames: text [n, text_card], audio [n, 16, card])."""
    import torch
    from moshi.models import lm as pp_lm
    from moshi.offline import wrap_with_system_tags
    F = int(mimi.sample_rate / mimi.frame_rate)
    lm_gen = pp_lm.LMGen(model, audio_silence_frame_cnt=int(0.5 * mimi.frame_rate), device="cpu",
                         sample_rate=mimi.sample_rate, frame_rate=mimi.frame_rate, use_sampling=False,
                         save_voice_prompt_embeddings=save_voice)
    mimi.streaming_forever(1)
    lm_gen.streaming_forever(1)
    tokens, pcm, logits = [], [], []
    with torch.no_grad():
        if voice.endswith(".pt"):
            lm_gen.load_voice_prompt_embeddings(voice)
        else:
            lm_gen.load_voice_prompt(voice)
        lm_gen.text_prompt_tokens = sp.encode(wrap_with_system_tags(TEXT_PROMPT))
        mimi.reset_streaming()
        lm_gen.reset_streaming()
        lm_gen.step_system_prompts(mimi)
        mimi.reset_streaming()
        # Logits only from here: with return_logits the fork's voice prompt would save None embeddings
        # (its first step then returns (None, None)); they change what step returns, nothing else.
        lm_gen.return_logits = logit_frames > 0
        user = pp_lm.load_audio(PROMPT, mimi.sample_rate)
        for frame in pp_lm._iterate_audio(user, sample_interval_size=F, pad=True):
            step = lm_gen.step(mimi.encode(torch.tensor(frame, dtype=torch.float32)[None]))
            step, frame_logits = step if logit_frames else (step, None)
            if step is None:
                continue
            tokens.append(step[0, :, 0].numpy())
            pcm.append(mimi.decode(step[:, 1:9])[0, 0].numpy())
            logits.append(frame_logits)
    text_logits = np.stack([t[0, 0, 0].numpy() for t, _ in logits[-logit_frames:]]) if logit_frames else None
    audio_logits = np.stack([a[0].numpy() for _, a in logits[-logit_frames:]]) if logit_frames else None
    return np.stack(tokens).astype(np.int32), np.concatenate(pcm), text_logits, audio_logits


def tensor_zoo(torch):
    """What torch.save may hold beside a voice's float32 and int64 tensors: other dtypes (bf16, as a
    bf16 model's embeddings would be), views into a larger storage (offset, strides), nesting. The
    values are x = arange(24).reshape(2, 3, 4), which the test rebuilds in numpy."""
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    return {"bf16": x.bfloat16(), "f16_transposed": x.half().transpose(0, 2),
            "f64_view": x.double()[1, 1:, ::2], "i64": x.long(), "i32": x.int(), "bool": x > 10,
            "u8": x.to(torch.uint8), "nested": [x[0], (x[1, 0],)]}


def mimi_stream(mimi, wav):
    """The fork's Mimi, one frame per call: encode every frame, then decode every frame's codes."""
    import torch
    F = int(mimi.sample_rate / mimi.frame_rate)
    frames = torch.from_numpy(wav[: len(wav) // F * F].reshape(-1, F))
    with torch.no_grad(), mimi.streaming(1):
        codes = torch.cat([mimi.encode(f[None, None]) for f in frames], dim=-1)      # [1, 8, T]
        pcm = torch.cat([mimi.decode(codes[:, :, t:t + 1]) for t in range(codes.shape[-1])], dim=-1)
    return codes[0].numpy().astype(np.int32), pcm[0, 0].numpy()


def run_personaplex():
    """NVIDIA's offline flow (personaplex moshi/offline.py), greedy, on tiny random weights."""
    import shutil
    import tempfile
    import torch
    import sentencepiece
    from moshi.models.lm import LMGen
    from moshi.offline import wrap_with_system_tags
    if not hasattr(LMGen, "step_system_prompts"):
        sys.exit("`moshi` is not NVIDIA's PersonaPlex fork: put <personaplex>/moshi first on PYTHONPATH")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = os.path.join(tmp, "tok.model")
        train_tokenizer(tokenizer_path)
        sp = sentencepiece.SentencePieceProcessor(tokenizer_path)
        voice = os.path.join(tmp, "voice.wav")
        write_voice_prompt(voice)
        out = {"prompt_sha256": np.array(digest(PROMPT)),
               "text_prompt_tokens": np.asarray(sp.encode(wrap_with_system_tags(TEXT_PROMPT)), np.int32)}
        mimi, constants = persona_mimi(tmp, PERSONA_MIMI_CONFIG)
        out.update(constants)
        model = persona_lm(PERSONA_CONFIG)
        out["tokens"], pcm, _, _ = offline_flow(model, mimi, voice, sp, save_voice=True)
        out["pcm_head"] = pcm[: DECODED_FRAMES * 1920]
        shutil.copyfile(os.path.join(tmp, "voice.pt"), VOICE_PT)          # where LMGen saved it
        out["pt_tokens"] = offline_flow(model, mimi, VOICE_PT, sp)[0]
        report("PersonaPlex offline flow", out)
        print("from the saved .pt, the same tokens as from the wav:",
              np.array_equal(out["pt_tokens"], out["tokens"]))
        print(f"wrote {VOICE_PT} ({os.path.getsize(VOICE_PT) / 1e3:.1f} kB)")
        torch.save(tensor_zoo(torch), TENSORS_PT)
        save(out, "sample_personaplex_fixture.npz")

        wrap = {"prompt_sha256": out["prompt_sha256"]}
        mimi, _ = persona_mimi(tmp, MIMI_CONFIG)
        wrap["tokens"], pcm, wrap["text_logits"], wrap["audio_logits"] = offline_flow(
            persona_lm(PERSONA_WRAP_CONFIG), mimi, voice, sp, logit_frames=LOGIT_FRAMES)
        wrap["pcm_head"] = pcm[: DECODED_FRAMES * 1920]
        wrap["mimi_codes"], pcm = mimi_stream(mimi, read_prompt())
        wrap["mimi_pcm_head"] = pcm[: MIMI_DECODED_FRAMES * 1920]
    report(f"the same with LM context {WRAP_CONTEXT} and Mimi context 8", wrap)
    save(wrap, "sample_personaplex_wrap_fixture.npz")


def report(what, out):
    print(f"{what}: {len(out['tokens'])} frames")
    print("distinct text tokens:", len(np.unique(out["tokens"][:, 0])),
          "| distinct codes per Moshi stream:", [len(np.unique(c)) for c in out["tokens"][:, 1:9].T])


def save(out, name):
    path = os.path.join(HERE, name)
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


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
    if sys.argv[1:] == ["personaplex"]:
        sys.path.insert(0, HERE)
        run_personaplex()
    else:
        main()
