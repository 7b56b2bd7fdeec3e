"""Fixtures for train.py, made by the reference implementations (never by our own code).

Stage `interleaver` (oracle venv, needs a checkout of kyutai-labs/moshi-finetune; nothing of it is
copied here, its module is imported from the checkout):

    git clone https://github.com/kyutai-labs/moshi-finetune /tmp/moshi-finetune
    ~/oracle/bin/python testdata/make_train_fixtures.py interleaver --moshi-finetune /tmp/moshi-finetune

trains a tiny sentencepiece model on a few sentences (-> train_spm.model, kept if it exists; ids 0-3
are unk/bos/eos/pad as in Kyutai's tokenizer, so PAD = 3 and EPAD = 0 mean what they mean there),
then runs moshi-finetune's own data path on hand-written alignment cases: each case is a silent wav
and a one-line manifest cut into windows by `sphn.dataset_jsonl` (as finetune/data/dataset.py calls
it: the manifest's duration decides the windows, their starts come back as float32) and tokenized by
its `InterleavedTokenizer` (keep_main_only, exactly as its train.py builds it), with a stand-in Mimi
that only reports how many frames a window has. Output: train_interleaver.json with, for every case,
the alignments, the file, manifest and window lengths, and per window sphn's start time and unpadded
length and the text and audio-validity rows moshi-finetune produced.

Stage `export` / `official` (see the end of this file): the exported-checkpoint parity fixture.
Stage `lora-names` (oracle venv): which modules Kyutai's LoRA adapts (-> lora_names.json).
Stage `loss` (oracle venv, needs the moshi-finetune checkout as `interleaver`): for the LM fixtures'
configs a (moshiko-shaped) and c (delays up to 4, a depformer weight schedule), Kyutai's LMModel with
the fixture weights, codes with -1 entries and PAD/EPAD text, moshi-finetune's text and audio losses
(its finetune/loss.py, as its train.py calls it: text padding weight 0.5, first codebook 100) and
their gradient; per on-disk tensor its norm and its dot product with a probe tensor (random_weights,
seed PROBE_SEED), config c's gradients whole (-> train_loss.npz).
Stage `optimizer` (oracle venv): moshi-finetune's optimizer as its train.py builds it (torch AdamW,
betas (0.9, 0.95), eps 1e-8, OneCycleLR with pct_start, clip_grad_norm_), stepped on a small
weight with given gradients; per step the lr and the weight (-> train_optimizer.json).
"""
import argparse
import importlib.util
import io
import json
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

SENTENCES = [
    "hello there how are you doing today",
    "i am doing well thank you for asking",
    "moshi listens and speaks at the same time",
    "the weather is lovely in paris this morning",
    "would you like to hear a story about a cat",
    "once upon a time there was a curious little cat",
    "it wandered through the garden looking for adventure",
    "speech and text streams are aligned frame by frame",
]

# (name, window seconds, file seconds, alignments[, manifest seconds]). 12.5 Hz: one frame is 0.08 s.
# The manifest's duration is the file's unless given.
CASES = [
    ("simple", 2.0, 2.0, [["hello", [0.3, 0.6], "SPEAKER_MAIN"], ["there", [0.9, 1.2], "SPEAKER_MAIN"]]),
    ("word_at_zero", 1.6, 1.6, [["moshi", [0.0, 0.4], "SPEAKER_MAIN"], ["listens", [0.5, 0.9], "SPEAKER_MAIN"]]),
    ("overlapping_words_cut", 2.0, 2.0, [["adventure", [0.2, 0.9], "SPEAKER_MAIN"],
                                         ["curious", [0.28, 0.7], "SPEAKER_MAIN"],
                                         ["garden", [0.45, 0.8], "SPEAKER_MAIN"]]),
    ("same_frame_two_words", 1.2, 1.2, [["cat", [0.17, 0.3], "SPEAKER_MAIN"], ["story", [0.2, 0.5], "SPEAKER_MAIN"]]),
    ("back_to_back_no_epad", 1.6, 1.6, [["wandered", [0.08, 0.2], "SPEAKER_MAIN"], ["through", [0.25, 0.5], "SPEAKER_MAIN"]]),
    ("other_speaker_and_zero_duration", 2.0, 2.0, [["hello", [0.1, 0.4], "SPEAKER_MAIN"],
                                                   ["there", [0.5, 0.8], "SPEAKER_OTHER"],
                                                   ["how", [0.9, 0.9], "SPEAKER_MAIN"],
                                                   ["are", [1.1, 1.0], "SPEAKER_MAIN"],
                                                   ["you", [1.2, 1.5], "SPEAKER_MAIN"]]),
    ("words_past_the_window", 1.2, 3.5, [["once", [0.2, 0.5], "SPEAKER_MAIN"],
                                         ["upon", [1.1, 1.5], "SPEAKER_MAIN"],    # starts in w0, spills over
                                         ["a", [1.2, 1.3], "SPEAKER_MAIN"],       # exactly at w1's start
                                         ["time", [1.9, 2.3], "SPEAKER_MAIN"],
                                         ["there", [2.35, 2.6], "SPEAKER_MAIN"],  # last (partial) window
                                         ["was", [3.3, 3.45], "SPEAKER_MAIN"],
                                         ["adventure", [3.6, 4.0], "SPEAKER_MAIN"]]),  # after the audio
    ("long_word_truncated_at_window_end", 0.8, 0.8, [["adventure", [0.55, 0.8], "SPEAKER_MAIN"]]),
    ("tiny_last_window", 1.6, 1.65, [["speech", [0.1, 0.4], "SPEAKER_MAIN"], ["text", [1.62, 1.64], "SPEAKER_MAIN"]]),
    ("unsorted_input", 2.0, 2.0, [["frame", [1.0, 1.3], "SPEAKER_MAIN"], ["by", [0.4, 0.6], "SPEAKER_MAIN"]]),
    ("empty", 1.2, 1.2, []),
    # float32 window starts: f32(0.24) < 0.24 (the window begins a sample early), f32(0.72) > 0.72
    # (a word at 0.72 falls between windows 2 and 3), and a one-frame last window that sphn reads
    # a sample longer (two frames)
    ("float32_starts", 0.24, 1.04, [["cat", [0.2, 0.3], "SPEAKER_MAIN"], ["story", [0.48, 0.6], "SPEAKER_MAIN"],
                                    ["time", [0.72, 0.8], "SPEAKER_MAIN"], ["a", [0.97, 1.0], "SPEAKER_MAIN"]]),
    ("float32_starts_0.4", 0.4, 1.2, [["was", [0.64, 0.7], "SPEAKER_MAIN"], ["cat", [0.8, 0.9], "SPEAKER_MAIN"]]),
    ("manifest_shorter_than_audio", 0.8, 2.0, [["hello", [0.3, 0.5], "SPEAKER_MAIN"],
                                               ["there", [1.7, 1.9], "SPEAKER_MAIN"]], 1.5),
    ("manifest_longer_than_audio", 0.8, 1.2, [["hello", [0.3, 0.5], "SPEAKER_MAIN"],
                                              ["there", [1.0, 1.1], "SPEAKER_MAIN"]], 3.0),
    ("unsorted_across_windows", 0.8, 1.6, [["cat", [1.0, 1.1], "SPEAKER_MAIN"], ["hello", [0.1, 0.3], "SPEAKER_MAIN"],
                                           ["there", [0.9, 1.0], "SPEAKER_MAIN"], ["time", [1.3, 1.5], "SPEAKER_MAIN"]]),
    ("extra_fields_and_nan_start", 0.8, 1.6, [["hello", [0.1, 0.3], "SPEAKER_MAIN", 0.9],
                                              ["never", [float("nan"), 0.5], "SPEAKER_MAIN"],
                                              ["there", [0.9, 1.0, 0.5], "SPEAKER_MAIN", "x"]]),
    # a duration that is not whole frames: ceil(d * 12.5) frames (6.25 -> 7; 0.56 * 12.5 is 7.000000000000001
    # in floats -> 8), the last with no audio, while windows still start every d seconds
    ("window_not_whole_frames", 0.5, 1.3, [["hello", [0.1, 0.3], "SPEAKER_MAIN"], ["there", [0.45, 0.6], "SPEAKER_MAIN"],
                                           ["time", [1.05, 1.2], "SPEAKER_MAIN"]]),
    ("window_a_float_over_whole", 0.56, 1.2, [["cat", [0.3, 0.5], "SPEAKER_MAIN"], ["story", [0.6, 0.9], "SPEAKER_MAIN"]]),
]


def train_spm(path):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=60, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, normalization_rule_name="identity",
        num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def load_interleaver_module(checkout):
    path = os.path.join(checkout, "finetune", "data", "interleaver.py")
    spec = importlib.util.spec_from_file_location("moshi_finetune_interleaver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FrameCounter:
    """Stands in for Mimi: the text stream only depends on how many frames the audio has."""
    frame_rate = 12.5

    def encode(self, x):                                         # [2, 1, S] -> [2, 8, frames]
        import torch
        return torch.zeros(x.shape[0], 8, math.ceil(x.shape[-1] / 1920), dtype=torch.long)


def interleaver_stage(args):
    import numpy as np
    import sentencepiece as spm
    import soundfile
    import sphn
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self               # its tokenizer moves audio to the GPU
    mod = load_interleaver_module(args.moshi_finetune)
    spm_path = os.path.join(HERE, "train_spm.model")
    if not os.path.exists(spm_path):
        train_spm(spm_path)
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    # as finetune/train.py builds them for moshiko: PAD 3, EPAD 0, zero token -1, main speaker only
    interleaver = mod.Interleaver(sp, 12.5, 3, 0, -1, keep_main_only=True, device="cpu")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, window_sec, file_sec, alignments, *manifest in CASES:
            manifest_sec = manifest[0] if manifest else file_sec
            wav_path = os.path.join(tmp, name + ".wav")
            soundfile.write(wav_path, np.zeros((round(file_sec * 24000), 2), np.float32), 24000)
            with open(os.path.join(tmp, name + ".json"), "w") as f:
                json.dump({"alignments": alignments}, f)
            with open(os.path.join(tmp, name + ".jsonl"), "w") as f:
                f.write(json.dumps({"path": wav_path, "duration": manifest_sec}) + "\n")
            tok = mod.InterleavedTokenizer(FrameCounter(), interleaver, duration_sec=window_sec)
            windows = sphn.dataset_jsonl(os.path.join(tmp, name + ".jsonl"), duration_sec=window_sec,
                                         num_threads=1, sample_rate=24000, pad_last_segment=True)
            starts, lengths, text, audio_valid = [], [], [], []
            for sample in windows.seq(skip=0, step_by=1):        # as finetune/data/dataset.py reads it
                wav = sample["data"][..., :sample["unpadded_len"]]
                codes = tok(wav, sample["start_time_sec"], sample["path"]).codes    # [1, 17, frames]
                starts.append(sample["start_time_sec"])
                lengths.append(sample["unpadded_len"])
                text.append(codes[0, 0].tolist())
                audio_valid.append((codes[0, 1] != -1).int().tolist())
            out.append({"name": name, "window_sec": window_sec, "file_sec": file_sec, "manifest_sec": manifest_sec,
                        "alignments": alignments, "start_time_sec": starts, "unpadded_len": lengths,
                        "text": text, "audio_valid": audio_valid})
            print(name, starts, text)
    with open(os.path.join(HERE, "train_interleaver.json"), "w") as f:
        json.dump({"made_by": "moshi-finetune finetune/data/interleaver.py (InterleavedTokenizer) on "
                   "sphn.dataset_jsonl windows", "pieces": {s: sp.encode(s) for s in sorted({a[0] for c in CASES
                                                                                           for a in c[3]})},
                   "cases": out}, f, indent=1)


# ----------------------------------------------------------------------------------------------
# The exported checkpoint, checked by the official package. Two stages, two venvs:
#
#   ~/venv/bin/python testdata/make_train_fixtures.py export      (our code, the project venv)
#   ~/oracle/bin/python testdata/make_train_fixtures.py official  (Kyutai's moshi 0.2.13)
#
# `export`: a tiny moshiko-shaped LM with deterministic random base weights (random_weights.py, from
# the key list and seed, so the base is never committed), LoRA-trained for a few steps by train.py's
# own step on a 1-device mesh, then written by train.export: train_export/model.safetensors (LoRA
# merged, fp32), config.json, adapters/ (lora.safetensors in moshi-finetune's naming and the
# config.json moshi-finetune writes beside it), and meta.json (key list,
# seed, LoRA settings, the codes to evaluate). `official`: Kyutai's get_moshi_lm loads
# model.safetensors with strict key checking and runs LMModel.forward on those codes; it also
# builds the LoRA model (LoRALinear, unfused) from the base + adapters/lora.safetensors, and
# through CheckpointInfo from the base + adapters/ as moshi-finetune's README says; asserts the two
# agree, and saves both outputs to train_export/official.npz. The test suite then loads the
# committed export with our convert.load_lm and must reproduce the official logits, rebuilds the
# merged weights from base + adapters, and runs our training-time LoRA path (layer hook merge).

EXPORT_DIR = os.path.join(HERE, "train_export")
EXPORT_SEED = 4321
EXPORT_CONFIG = dict(
    dim=32, num_heads=2, num_layers=2, hidden_scale=4.125, causal=True, layer_scale=None, context=8,
    max_period=10000, gating="silu", norm="rms_norm_f32", positional_embedding="rope", text_card=48,
    existing_text_padding_id=3, n_q=16, dep_q=8, card=32, depformer_dim=16,
    depformer_dim_feedforward=int(4.125 * 16), depformer_num_heads=2, depformer_num_layers=1,
    depformer_multi_linear=True, depformer_max_period=10000, depformer_gating="silu",
    depformer_pos_emb="none", depformer_weights_per_step=True,
    delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])
EXPORT_LORA = dict(rank=2, scaling=2.0)


def export_codes(cfg_dict, B=2, T=10, seed=7):
    import numpy as np
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, cfg_dict["text_card"], (B, 1, T)),
                            rng.integers(0, cfg_dict["card"], (B, cfg_dict["n_q"], T))], axis=1)
    codes[0, :, -2:] = -1                                       # some ignored targets
    return codes.astype(np.int64)


def export_stage(args):
    sys.path.insert(0, os.path.dirname(HERE))
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import jax
    import numpy as np
    import convert
    import random_weights
    import repo
    import train
    cfg = repo.lm_config(EXPORT_CONFIG)
    spec = sorted(convert.lm_keys(cfg).items())
    base = random_weights.random_tensors(spec, EXPORT_SEED)
    os.makedirs(EXPORT_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert.save_safetensors(os.path.join(tmp, "base.safetensors"), base)
        params = convert.load_lm(os.path.join(tmp, "base.safetensors"), cfg)
    h = train.Hyper(lr=3e-2, warmup_steps=0, max_steps=4, compute_dtype="float32",
                    lora_rank=EXPORT_LORA["rank"], lora_scaling=EXPORT_LORA["scaling"])
    mesh = train.make_mesh(1, 1)
    codes = export_codes(EXPORT_CONFIG, B=4, T=12, seed=3)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        state, frozen = train.initial_state(plan, mesh, h, jax.tree.map(np.asarray, params),
                                            plan.init_lora(jax.random.key(0)))
        batch = jax.device_put(codes[None].astype(np.int32), jax.sharding.NamedSharding(mesh, train.BATCH_SPEC))
        for step in range(h.max_steps):
            state, metrics = plan.step(state, frozen, batch)
            print("LoRA step", step + 1, np.asarray(metrics))
        train.export(EXPORT_DIR, cfg, state, frozen, h, save_adapters=True, dtype="float32")
    meta = {"seed": EXPORT_SEED, "spec": [[k, list(v)] for k, v in spec], "lora": EXPORT_LORA,
            "codes": export_codes(EXPORT_CONFIG).tolist(), "made_by": "testdata/make_train_fixtures.py export"}
    with open(os.path.join(EXPORT_DIR, "meta.json"), "w") as f:
        json.dump(meta, f)


def official_stage(args):
    import numpy as np
    import torch
    from moshi.models import loaders
    import random_weights
    from safetensors.torch import save_file
    with open(os.path.join(EXPORT_DIR, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(EXPORT_DIR, "config.json")) as f:
        lm_kwargs = {k: v for k, v in json.load(f).items() if k != "moshi_name"}
    codes = torch.tensor(meta["codes"])
    out = {"codes": codes.numpy()}
    with torch.no_grad():
        merged = loaders.get_moshi_lm(os.path.join(EXPORT_DIR, "model.safetensors"), lm_kwargs,
                                      dtype=torch.float32)            # strict load_state_dict
        res = merged(codes)
        out.update(logits=res.logits.numpy(), mask=res.mask.numpy(), text_logits=res.text_logits.numpy(),
                   text_mask=res.text_mask.numpy())
        base = random_weights.random_tensors([(k, tuple(s)) for k, s in meta["spec"]], meta["seed"])
        with tempfile.TemporaryDirectory() as tmp:
            base_path = os.path.join(tmp, "base.safetensors")
            save_file({k: torch.from_numpy(v) for k, v in base.items()}, base_path)
            adapters = os.path.join(EXPORT_DIR, "adapters")
            lora_model = loaders.get_moshi_lm(
                base_path, dict(lm_kwargs, lora=True, lora_rank=meta["lora"]["rank"],
                                lora_scaling=meta["lora"]["scaling"]),
                dtype=torch.float32, lora_weights=os.path.join(adapters, "lora.safetensors"), fuse_lora=False)
            from safetensors.numpy import load_file
            expected = {k for k in lora_model.state_dict() if ".lora_" in k}
            assert expected == set(load_file(os.path.join(adapters, "lora.safetensors"))), "adapter names differ"
            n_lora = len(expected)
            res = lora_model(codes)
            out.update(lora_logits=res.logits.numpy(), lora_text_logits=res.text_logits.numpy())
            # moshi-finetune's README route: the base weights, --lora-weight and --config-path of
            # the adapters folder (its config.json says lora, lora_rank, lora_scaling)
            info = loaders.CheckpointInfo.from_hf_repo(
                "unused/repo", moshi_weights=base_path, mimi_weights=base_path, tokenizer=base_path,
                config_path=os.path.join(adapters, "config.json"),
                lora_weights=os.path.join(adapters, "lora.safetensors"))
            res = info.get_moshi(device="cpu", dtype=torch.float32)(codes)
            out.update(route_logits=res.logits.numpy(), route_text_logits=res.text_logits.numpy())
    for a, b in (("lora_logits", "route_logits"), ("lora_text_logits", "route_text_logits")):
        err = np.nanmax(np.abs(out[a] - out[b])) / np.nanmax(np.abs(out[a]))
        print(f"official: base + adapters/ through CheckpointInfo vs LoRALinear, {a}: rel. err {err:.2e}")
        assert err < 1e-5, err
    for a, b in (("logits", "lora_logits"), ("text_logits", "lora_text_logits")):
        m = out["mask" if a == "logits" else "text_mask"][..., None]
        err = np.abs(np.where(m, out[a] - out[b], 0)).max() / np.abs(np.where(m, out[a], 0)).max()
        print(f"official: merged export vs LoRALinear base + adapters, {a}: rel. err {err:.2e}")
        assert err < 1e-5, err
    print(f"official: the {n_lora} LoRA tensors of the official model are exactly those of lora.safetensors")
    np.savez(os.path.join(EXPORT_DIR, "official.npz"), **out)


# Stage `lora-names` (oracle venv): the modules Kyutai's LoRA (replace_all_linear_with_lora, which
# moshi-finetune calls) gives adapters, for configs with every kind of linear layer: per-step and
# multi-linear depformer weights, low-rank embedding projections, extra heads.
LORA_NAME_CONFIGS = {
    "low_rank_per_step": dict(delays=[0, 1, 2, 4, 0, 3, 1], n_q=6, dep_q=3, card=32, text_card=48, dim=16,
                              num_layers=2, num_heads=2, hidden_scale=1, context=4, depformer_dim=16,
                              depformer_multi_linear=True, depformer_weights_per_step=True,
                              depformer_low_rank_embeddings=8, depformer_num_heads=1, depformer_num_layers=1, gating="silu",
                              extra_heads_num_heads=2, extra_heads_dim=5),
    "schedule": dict(delays=[0, 1, 2, 4, 0, 3, 1], n_q=6, dep_q=3, card=32, text_card=48, dim=16, num_layers=2,
                     num_heads=2, hidden_scale=1, context=4, depformer_dim=16, depformer_multi_linear=True,
                     depformer_weights_per_step=True, depformer_weights_per_step_schedule=[0, 1, 1],
                     depformer_low_rank_embeddings=8, depformer_num_heads=1, depformer_num_layers=2,
                     gating="silu", depformer_norm="layer_norm"),
    "moshiko_like": dict(delays=[0] + [0, 1, 1, 1] * 2, n_q=8, dep_q=4, card=32, text_card=48, dim=16,
                         num_layers=2, num_heads=2, hidden_scale=4.125, context=4, depformer_dim=16,
                         depformer_multi_linear=True, depformer_weights_per_step=True, depformer_num_heads=1,
                         depformer_num_layers=2, depformer_dim_feedforward=int(4.125 * 16), gating="silu"),
}


def lora_names_stage(args):
    from moshi.models import lm
    from moshi.modules.lora import replace_all_linear_with_lora
    out = {}
    for name, kwargs in LORA_NAME_CONFIGS.items():
        model = lm.LMModel(**kwargs)
        replace_all_linear_with_lora(model, 2, 1.0)
        modules = sorted(k[:-len(".lora_A.weight")] for k in model.state_dict() if k.endswith(".lora_A.weight"))
        out[name] = {"config": kwargs, "modules": modules}
        print(f"lora-names: {name}: {len(modules)} LoRA modules")
    with open(os.path.join(HERE, "lora_names.json"), "w") as f:
        json.dump(out, f, indent=1)


LOSS_CONFIGS, PROBE_SEED, TEXT_PADDING_WEIGHT, FIRST_CODEBOOK_WEIGHT = ("a", "c"), 99, 0.5, 100.0


def loss_stage(args):
    import numpy as np
    import torch
    from moshi.models import lm
    sys.path.insert(0, HERE)
    import make_lm_fixtures
    import random_weights
    spec = importlib.util.spec_from_file_location("moshi_finetune_loss",
                                                  os.path.join(args.moshi_finetune, "finetune", "loss.py"))
    loss_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loss_module)
    out = {}
    for name in LOSS_CONFIGS:
        kw = make_lm_fixtures.CONFIGS[name]
        model = lm.LMModel(**{k: v for k, v in kw.items() if k != "depformer_causal"}, dtype=torch.float32)
        disk_spec = make_lm_fixtures.on_disk_spec(model)
        weights = make_lm_fixtures.checkpoint(disk_spec)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
        model.train()
        rng = np.random.default_rng(5)
        codes = make_lm_fixtures.make_codes(kw, rng, T=12, B=3)
        text = codes[:, 0]                    # targets within the text head (config c has text_card_out)
        text[text >= 0] %= kw.get("text_card_out") or kw["text_card"]
        text[rng.random(text.shape) < 0.25] = model.text_padding_token_id
        text[rng.random(text.shape) < 0.1] = model.end_of_text_padding_id
        codes_t = torch.from_numpy(codes)
        output = model(codes=codes_t)
        text_loss = loss_module.compute_loss_with_mask(
            output.text_logits, codes_t[:, :model.audio_offset], output.text_mask, mode="text",
            text_padding_weight=TEXT_PADDING_WEIGHT,
            text_padding_ids={model.text_padding_token_id, model.end_of_text_padding_id})
        audio_loss = loss_module.compute_loss_with_mask(
            output.logits, codes_t[:, model.audio_offset:model.audio_offset + model.dep_q], output.mask,
            mode="audio", first_codebook_weight_multiplier=FIRST_CODEBOOK_WEIGHT)
        (text_loss + audio_loss).backward()
        grads = make_lm_fixtures.pack_on_disk(             # under the on-disk names, as the weights
            (n, np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy())
            for n, p in model.named_parameters())
        assert sorted(grads) == sorted(n for n, _ in disk_spec)
        probes = random_weights.random_tensors(disk_spec, PROBE_SEED)
        names = sorted(grads)
        out.update({f"{name}_codes": codes, f"{name}_losses": np.array([text_loss.item(), audio_loss.item()]),
                    f"{name}_names": np.asarray(names),
                    f"{name}_grad_norms": np.array([np.linalg.norm(grads[n].astype(np.float64)) for n in names]),
                    f"{name}_grad_probes": np.array([np.sum(grads[n].astype(np.float64) * probes[n]) for n in names])})
        if name == "c":
            out.update({f"c_grad|{n}": grads[n] for n in names})
        print(f"loss: config {name}: text {text_loss.item():.5f}, audio {audio_loss.item():.5f}, "
              f"{len(names)} gradients")
    np.savez_compressed(os.path.join(HERE, "train_loss.npz"), **out)


OPTIMIZER_CASES = [  # (max_steps, pct_start): the peak at pct_start * max_steps - 1
    (12, 0.05), (20, 0.3), (8, 0.5), (6, 0.9), (10, 0.15), (5, 0.0)]


def optimizer_stage(args):
    import numpy as np
    import torch
    rng, cases = np.random.default_rng(0), []
    for max_steps, pct_start in OPTIMIZER_CASES:
        lr, weight_decay, max_norm = 0.1, 0.1, 1.0
        weight = rng.normal(size=(3, 4)).astype(np.float32)
        grads = (rng.normal(size=(max_steps, 3, 4)) * rng.choice([0.1, 2.0], (max_steps, 1, 1))).astype(np.float32)
        p = torch.nn.Parameter(torch.tensor(weight))
        opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-08, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max_steps, pct_start=pct_start)
        lrs, weights = [], []
        for g in grads:
            p.grad = torch.tensor(g)
            torch.nn.utils.clip_grad_norm_([p], max_norm)
            opt.step()
            lrs.append(sched.get_last_lr()[0])
            sched.step()
            weights.append(p.detach().numpy().tolist())
        cases.append(dict(max_steps=max_steps, pct_start=pct_start, lr=lr, weight_decay=weight_decay,
                          max_norm=max_norm, weight=weight.tolist(), grads=grads.tolist(), lrs=lrs,
                          weights=weights))
        print(f"optimizer: max_steps {max_steps}, pct_start {pct_start}: lrs {np.round(lrs, 5).tolist()}")
    with open(os.path.join(HERE, "train_optimizer.json"), "w") as f:
        json.dump(cases, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("interleaver", help="expected text streams from moshi-finetune's interleaver")
    p.add_argument("--moshi-finetune", required=True, help="a checkout of kyutai-labs/moshi-finetune")
    sub.add_parser("export", help="(project venv) train a tiny LoRA model and export it with train.py")
    sub.add_parser("official", help="(oracle venv) load the export in Kyutai's package, save its logits")
    sub.add_parser("lora-names", help="(oracle venv) the modules Kyutai's LoRA adapts, for a few configs")
    p = sub.add_parser("loss", help="(oracle venv) moshi-finetune's loss and its gradient on the LM fixtures")
    p.add_argument("--moshi-finetune", required=True, help="a checkout of kyutai-labs/moshi-finetune")
    sub.add_parser("optimizer", help="(oracle venv) moshi-finetune's AdamW + OneCycleLR on given gradients")
    args = ap.parse_args()
    {"interleaver": interleaver_stage, "export": export_stage, "official": official_stage,
     "lora-names": lora_names_stage, "optimizer": optimizer_stage, "loss": loss_stage}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
