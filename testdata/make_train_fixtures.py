"""Fixtures for train.py, made by the reference implementations (never by our own code).

Stage `interleaver` (oracle venv, needs a checkout of kyutai-labs/moshi-finetune; nothing of it is
copied here, its module is imported from the checkout):

    git clone https://github.com/kyutai-labs/moshi-finetune /tmp/moshi-finetune
    ~/oracle/bin/python testdata/make_train_fixtures.py interleaver --moshi-finetune /tmp/moshi-finetune

trains a tiny sentencepiece model on a few sentences (-> train_spm.model; ids 0-3 are
unk/bos/eos/pad as in Kyutai's tokenizer, so PAD = 3 and EPAD = 0 mean what they mean there), then
runs moshi-finetune's own `InterleavedTokenizer` (window selection + `Interleaver`, keep_main_only,
exactly as its train.py builds them) on hand-written alignment cases, with a stand-in Mimi that only
reports how many frames a window has. Output: train_interleaver.json with, for every case, the
alignments, the file length and window length, and the text and audio-validity rows it produced.

Stage `export` / `official` (see the end of this file): the exported-checkpoint parity fixture.
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

# (name, window seconds, file seconds, alignments). 12.5 Hz: one frame is 0.08 s.
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
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self               # its tokenizer moves audio to the GPU
    mod = load_interleaver_module(args.moshi_finetune)
    spm_path = os.path.join(HERE, "train_spm.model")
    train_spm(spm_path)
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    # as finetune/train.py builds them for moshiko: PAD 3, EPAD 0, zero token -1, main speaker only
    interleaver = mod.Interleaver(sp, 12.5, 3, 0, -1, keep_main_only=True, device="cpu")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, window_sec, file_sec, alignments in CASES:
            wav_path = os.path.join(tmp, name + ".wav")             # never read: only its .json is
            with open(os.path.join(tmp, name + ".json"), "w") as f:
                json.dump({"alignments": alignments}, f)
            tok = mod.InterleavedTokenizer(FrameCounter(), interleaver, duration_sec=window_sec)
            samples, window_samples = round(file_sec * 24000), round(window_sec * 24000)
            text, audio_valid = [], []
            for w in range(math.ceil(samples / window_samples)):
                wav = np.zeros((2, min(samples - w * window_samples, window_samples)), np.float32)
                codes = tok(wav, w * window_sec, wav_path).codes    # [1, 17, frames]
                text.append(codes[0, 0].tolist())
                audio_valid.append((codes[0, 1] != -1).int().tolist())
            out.append({"name": name, "window_sec": window_sec, "file_sec": file_sec,
                        "alignments": alignments, "text": text, "audio_valid": audio_valid})
            print(name, text)
    with open(os.path.join(HERE, "train_interleaver.json"), "w") as f:
        json.dump({"made_by": "moshi-finetune finetune/data/interleaver.py (InterleavedTokenizer)",
                   "pieces": {s: sp.encode(s) for s in sorted({a[0] for c in CASES for a in c[3]})},
                   "cases": out}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("interleaver", help="expected text streams from moshi-finetune's interleaver")
    p.add_argument("--moshi-finetune", required=True, help="a checkout of kyutai-labs/moshi-finetune")
    args = ap.parse_args()
    {"interleaver": interleaver_stage}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
