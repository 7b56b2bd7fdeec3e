"""data.py: moshi-finetune's dataset -> prepared token shards, and the training-window iterator.

Moshi trains on 17 token streams at 12.5 Hz: its inner monologue (text), its own voice (8 Mimi
codebooks) and the user's (8 more). moshi-finetune's dataset holds conversations as a .jsonl
manifest of {"path", "duration"}; stereo 24 kHz wavs, channel 0 = Moshi, channel 1 = the user; and
a .json beside each wav with word "alignments". `prepare` turns it into those streams once:

    python data.py --manifest data.jsonl --tokenizer tokenizer_spm_32k_3.model \\
        --mimi tokenizer-e351c8d8-checkpoint125.safetensors --duration-sec 100 --out prepared/

(`python train.py prepare ...` is the same command). It encodes both channels with Mimi, builds
the text stream exactly as moshi-finetune's interleaver does, and writes one int16 token array
[17, frames] per file plus an index.json. Training (train.py) then never runs the codec: it reads
fixed windows of those arrays in a shuffled, resumable order.

The file reads top to bottom:
  1. the text stream (moshi-finetune's interleaver)
  2. `prepare`: wavs + alignments -> token arrays
  3. the window iterator (deterministic, resumable)
  4. the command line

Reference: kyutai-labs/moshi-finetune (finetune/data/interleaver.py, data_loader.py, dataset.py).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import functools
import json
import math
import os
import shutil
import sys

import numpy as np

import convert
import depformer
import audio
import mimi
import moshi

CODEC = mimi.MimiConfig()     # moshi-finetune's data is at the released Mimi's rates: 24 kHz, 80 ms frames
LM = moshi.MOSHIKO            # ... and in Moshi's 17 streams, with its text PAD / EPAD ids
MAIN_SPEAKER = "SPEAKER_MAIN"


class DataError(ValueError):
    """A bad input file: the message names it and says what is wrong."""


# ----------------------------------------------------------------------------------------------
# 1. The text stream. Moshi's inner monologue is one text token per 80 ms frame, aligned to the
# audio. moshi-finetune builds it from word timestamps: each word's pieces are written one per
# frame starting at the word's first frame; frames with nothing to say hold PAD, and the PAD just
# before a word becomes EPAD so the model learns when a word is coming. A word that starts while
# the previous one is still being written cuts it short (the new word replaces what was pending).

def tokenize_word(sp, word: str) -> list[int]:
    """One word's sentencepiece ids, no BOS; a newline inside becomes the newline piece."""
    first, *rest = word.strip().split("\n")
    ids = sp.encode(first)
    for line in rest:
        ids += [sp.encode("\n")[-1]] + sp.encode(line)
    return ids


def text_stream(words, num_steps: int, pad: int, epad: int):
    """words: [(token_ids, start_sec, end_sec)] sorted by start -> list of `num_steps` ids.
    pad, epad: the LM's text ids for "nothing said here" and "a word starts in the next frame"."""
    stream, words = [pad] * num_steps, collections.deque(words)
    pending = collections.deque()
    for t in range(num_steps):
        # every word whose first frame is t (floor(start * 12.5) == t) takes over the pending queue
        while words and words[0][1] * CODEC.frame_rate < t + 1:
            pending = collections.deque(words.popleft()[0])
        if pending:
            if t > 0 and stream[t - 1] == pad:
                stream[t - 1] = epad
            stream[t] = pending.popleft()
        # (between a word's last piece and its end frame moshi-finetune writes "in-word padding",
        # which for Moshi is PAD itself: nothing to do)
    return stream


def window_words(alignments, start_sec: float, duration_sec: float):
    """Words that *start* inside [start_sec, start_sec + duration), times made window-relative, in
    time order. A word that started in the previous window is dropped even if it is still being
    spoken, as moshi-finetune does.

    alignments: [(word, start, end, speaker)] in the file's order. moshi-finetune finds the window's
    words by binary search on that list as it is (`dicho`) and sorts only what it found, so a file
    out of time order loses words there; bisect_left makes the very same comparisons.
    """
    lo = bisect.bisect_left(alignments, start_sec, key=lambda a: a[1])
    hi = bisect.bisect_left(alignments, start_sec + duration_sec, key=lambda a: a[1])
    words = [(w, s - start_sec, e - start_sec, spk) for w, s, e, spk in alignments[lo:hi]]
    return sorted(words, key=lambda a: a[1])


def window_frames(window_sec: float) -> int:
    """A window of `window_sec` seconds has ceil(window_sec * 12.5) frames, as moshi-finetune counts them:
    a duration that is not a whole number of frames gets one more frame, with no audio in its tail."""
    return math.ceil(window_sec * CODEC.frame_rate)


def window_text(sp, alignments, start_sec: float, window_sec: float, real_frames: int) -> np.ndarray:
    """The text row [window_frames] of the window that starts at `start_sec`, as moshi-finetune builds it.

    `real_frames` is how many frames of audio the window really has (fewer in a file's last window).
    moshi-finetune passes that frame count where a duration in seconds is expected, so it builds
    ceil(real_frames * 12.5) steps and cuts them to the window: in a last, partial window the text
    keeps going as PAD past the end of the audio (and is trained on), and is IGNORE only beyond
    ceil(real_frames * 12.5) frames. We reproduce that quirk exactly (tested against its code).
    """
    words = window_words(alignments, start_sec, window_sec)
    words = [(tokenize_word(sp, w), s, e) for w, s, e, spk in words if spk == MAIN_SPEAKER and s < e]
    frames = window_frames(window_sec)
    stream = text_stream(words, window_frames(real_frames), LM.existing_text_padding_id,   # frames as seconds
                         LM.existing_text_end_padding_id)
    return np.array((stream + [depformer.ZERO_TOKEN] * frames)[:frames], np.int32)      # IGNORE past its end


def read_alignments(json_path: str, log=print):
    """The sidecar .json -> [(word, start, end, speaker)], in the file's order (see window_words).
    Words that cannot be placed (end not after start, or a NaN time) are dropped by moshi-finetune
    without a word; here they are dropped the same way, and named. Fields after the speaker are
    ignored, as there."""
    if not os.path.exists(json_path):
        raise DataError(f"{json_path}: missing alignment file (expected beside the wav)")
    try:
        with open(json_path) as f:
            raw = json.load(f)["alignments"]
        out = [(str(w), float(ts[0]), float(ts[1]), str(spk)) for w, ts, spk, *_ in raw]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{json_path}: not a moshi-finetune alignment file "
                        f"(want {{\"alignments\": [[word, [start, end], speaker], ...]}}): {e!r}") from e
    for w, start, end, _ in out:
        if not start < end:                       # NaN compares False too
            log(f"prepare: warning: {json_path}: word {w!r} has times [{start}, {end}]: it is left out")
    starts = [s for _, s, _, _ in out if not math.isnan(s)]
    if starts != sorted(starts):
        log(f"prepare: warning: {json_path}: words are not in time order; moshi-finetune's binary search "
            f"misses some of them in such a file, and so does this (sort the file to keep them all)")
    return out


# ----------------------------------------------------------------------------------------------
# 2. `prepare`: each file of the manifest is cut into consecutive windows of `duration_sec`, exactly
# as moshi-finetune's loader (sphn.dataset_jsonl) cuts it: from t=0 while the *manifest's* duration
# lasts (the last one shorter); each window is encoded by Mimi *on its own* (fresh codec state, as
# there), both channels in one batch. Codes past the end of the audio are IGNORE. The result per
# file: int16 [17, n_windows * window_frames] holding text | Moshi's 8 codebooks | the user's 8
# codebooks, one window after the other.

def read_manifest(path: str):
    """moshi-finetune's .jsonl -> [(wav_path, duration_sec)]; relative paths are taken from the
    manifest's folder, then from the current directory."""
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                wav, duration = item["path"], float(item["duration"])
                if not isinstance(wav, str):
                    raise TypeError(f"path {wav!r} is not a string")
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: want {{\"path\": ..., \"duration\": ...}}: {e!r}") from e
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), wav)     # an absolute wav itself
            wav = beside if os.path.exists(beside) or not os.path.exists(wav) else os.path.abspath(wav)
            entries.append((wav, duration))
    return entries


def load_stereo(path: str, read_audio=audio.read_audio) -> tuple[np.ndarray, int]:
    """(the wav as float32 [2, samples] at its own rate, the rate), or DataError naming what is wrong.
    (sphn reads a window at the file's rate and resamples the window: cut_windows does the same.)"""
    if not os.path.exists(path):
        raise DataError(f"{path}: audio file not found")
    try:
        rate = audio.audio_info(path)[0]
        wav = np.asarray(read_audio(path, sample_rate=None), np.float32)
    except Exception as e:                                       # noqa: BLE001 - any decoder failure
        raise DataError(f"{path}: unreadable audio ({type(e).__name__}: {e})") from e
    if wav.ndim != 2 or wav.shape[0] != 2:
        raise DataError(f"{path}: expected stereo audio (channel 0 = Moshi, channel 1 = user), "
                        f"got {wav.shape[0] if wav.ndim == 2 else 1} channel(s)")
    if wav.shape[1] == 0:
        raise DataError(f"{path}: empty audio")
    return wav, rate


def window_starts(duration: float, window_sec: float) -> list[float]:
    """Where sphn starts the windows of a manifest entry: 0, d, 2d, ... (summed in float64) while
    below the manifest's duration, each kept as a float32, which is what moshi-finetune then gets."""
    starts, t = [], 0.0
    while t < duration:
        starts.append(float(np.float32(t)))
        t += window_sec
    return starts


def to_samples(seconds: float, rate: int) -> int:
    """A time -> samples, as sphn's decoder (symphonia) counts them: whole seconds exactly, then
    the fraction's samples truncated. A float32 start just below k*d thus begins one sample early."""
    whole = int(seconds)
    return whole * rate + int(float(rate) * (seconds - whole))


def cut_windows(wav: np.ndarray, rate: int, window_sec: float, duration: float):
    """[2, S] at `rate` and the manifest's duration -> (window starts in s, chunks [n, 2,
    window_frames * 1920] at 24 kHz zero-padded, real frames per window [n]). A window that would start
    past the audio's end is not there (sphn fails to seek to it and moshi-finetune goes on). At
    another rate each window is read whole (zero-padded) and resampled on its own, as sphn does."""
    frames = window_frames(window_sec)
    out = frames * CODEC.frame_size
    length = to_samples(window_sec, rate)
    starts = [s for s in window_starts(duration, window_sec) if to_samples(s, rate) < wav.shape[1]]
    chunks = np.zeros((len(starts), 2, out), np.float32)
    real_frames = np.zeros(len(starts), np.int64)
    for i, first in enumerate(to_samples(s, rate) for s in starts):
        piece = wav[:, first:first + length]
        real = piece.shape[1]
        if rate != CODEC.sample_rate:       # sphn's count of the resampled window's real samples
            piece = audio.resample(np.pad(piece, ((0, 0), (0, length - real))), rate, CODEC.sample_rate)
            real = piece.shape[1] if real == length else real * CODEC.sample_rate // rate
        chunks[i, :, :min(real, out)] = piece[:, :min(real, out)]
        real_frames[i] = min(frames, -(-real // CODEC.frame_size))  # a last, partial frame counts
    return starts, chunks, real_frames


def encode_windows(params, cfg, batch: int, chunks: np.ndarray) -> np.ndarray:
    """Mimi over batches of windows: [n, 2, S] -> [n, 2K, frames], channel 0's K codebooks then
    channel 1's (K = 8: half of Moshi's audio streams are each voice's). Both channels of `batch`
    windows go through one call of the same compiled shape (a short last batch is zero-padded).
    prepare_main binds the first three arguments."""
    n, _, S = chunks.shape
    K = LM.n_q // 2
    padded = np.pad(chunks, ((0, -n % batch), (0, 0), (0, 0)))
    codes = [mimi.encode(params, cfg, padded[i:i + batch].reshape(2 * batch, 1, S), K)
             for i in range(0, len(padded), batch)]
    return np.concatenate([np.asarray(c).reshape(batch, 2 * K, -1) for c in codes])[:n]


def file_tokens(wav, rate: int, alignments, sp, encode, window_sec: float, duration: float):
    """One file [2, S] at `rate` and its manifest duration -> (int16 [17, n * window_frames], frames
    of real audio)."""
    starts, chunks, real_frames = cut_windows(wav, rate, window_sec, duration)
    frames = window_frames(window_sec)
    codes = encode(chunks)[..., :frames]                         # [n, 16, window_frames]
    if codes.shape[-1] != frames:
        raise DataError(f"Mimi gave {codes.shape[-1]} frames for a {frames}-frame window")
    # IGNORE past the audio each window really has
    codes = np.where(np.arange(frames) < real_frames[:, None, None], codes, depformer.ZERO_TOKEN)
    texts = [window_text(sp, alignments, s, window_sec, int(real)) for s, real in zip(starts, real_frames)]
    windows = np.concatenate([np.stack(texts)[:, None], codes], axis=1)         # [n, 17, window_frames]
    tokens = np.concatenate(windows, axis=1)                                    # [17, n * window_frames]
    if tokens.max() > np.iinfo(np.int16).max:
        raise DataError(f"token id {tokens.max()} does not fit int16")
    return tokens.astype(np.int16), int(real_frames.sum())


def prepare(manifest: str, out_dir: str, sp, encode, window_sec: float, strict: bool = False,
            read_audio=audio.read_audio, meta: dict | None = None, log=print) -> dict:
    """Tokenize a whole manifest into out_dir/{tokens/NNNNNN.npy, index.json}; returns the index.

    Bad files (missing .json, not stereo, unreadable) are reported by name and skipped, or, with
    `strict`, stop the run. The index lists what was skipped and why. out_dir must be new or empty
    (an existing dataset is never mixed with a new one); the dataset is written beside it and
    renamed to it at the end, so a failed run leaves nothing behind.
    """
    check_new_folder(out_dir)
    entries, final = read_manifest(manifest), os.path.normpath(out_dir)
    out_dir = f"{final}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(out_dir, "tokens"))
    try:
        index = _prepare_into(out_dir, entries, manifest, sp, encode, window_sec, strict, read_audio,
                              meta, log)
        if os.path.isdir(final):
            os.rmdir(final)                          # empty, checked above
        os.replace(out_dir, final)
        return index
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)   # gone already unless the run failed


def check_new_folder(out_dir: str) -> None:
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"--out {out_dir} already holds {', '.join(sorted(os.listdir(out_dir))[:5])}: "
                        f"give a new or empty folder (a prepared dataset is not added to)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file, not a folder")


def _prepare_into(out_dir, entries, manifest, sp, encode, window_sec, strict, read_audio, meta, log):
    files, skipped, highest = [], [], {"text": -1, "audio": -1}      # the largest ids, for train's check
    frames = window_frames(window_sec)
    for i, (wav_path, duration) in enumerate(entries):
        try:
            if not duration > 0:
                raise DataError(f"{wav_path}: the manifest gives it {duration} s: no window to cut")
            wav, rate = load_stereo(wav_path, read_audio)
            alignments = read_alignments(os.path.splitext(wav_path)[0] + ".json", log)
        except DataError as e:
            if strict:
                raise
            log(f"prepare: SKIPPED {e}")
            skipped.append({"source": wav_path, "reason": str(e)})
            continue
        if abs(wav.shape[1] / rate - duration) > 1 / CODEC.frame_rate:
            log(f"prepare: note: {wav_path} lasts {wav.shape[1] / rate:.2f} s, the manifest "
                f"says {duration:.2f} s; windows follow the manifest, as in moshi-finetune")
        tokens, real = file_tokens(wav, rate, alignments, sp, encode, window_sec, duration)
        highest = {"text": max(highest["text"], int(tokens[0].max())),
                   "audio": max(highest["audio"], int(tokens[1:].max()))}
        name = os.path.join("tokens", f"{len(files):06d}.npy")
        with convert.atomic_open(os.path.join(out_dir, name)) as f:
            np.save(f, tokens)
        files.append({"tokens": name, "source": wav_path, "windows": tokens.shape[1] // frames,
                      "frames": real})
        log(f"prepare: [{i + 1}/{len(entries)}] {wav_path}: {files[-1]['windows']} windows, {real} frames")
    if not files:
        raise DataError(f"{manifest}: no usable file ({len(skipped)} skipped)")
    index = {"format": "moshi-jax-tokens-v1", "window_sec": window_sec, "window_frames": frames,
             "frame_rate": CODEC.frame_rate, "streams": LM.num_streams,
             "text_padding_id": LM.existing_text_padding_id,
             "end_of_padding_id": LM.existing_text_end_padding_id, "manifest": manifest,
             "max_token_ids": highest, "files": files, "skipped": skipped, **(meta or {})}
    with convert.atomic_open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


# ----------------------------------------------------------------------------------------------
# 3. The window iterator. Every window of every prepared file gets an id; epoch e visits them in
# the order of a permutation seeded by (seed, e), and the epochs follow each other without a gap.
# Step s of a run with G windows per step reads positions [s*G, (s+1)*G) of that endless list, so
# "where we are in the data" is one integer saved in the checkpoint, and each process reads only
# the rows of the global batch that its own devices hold.

class TokenWindows:
    """A prepared dataset: `len(ds)` windows; `ds[i]` -> int32 [17, window_frames]."""

    def __init__(self, data_dir: str):
        path = os.path.join(data_dir, "index.json")
        try:
            with open(path) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a prepared dataset (run `python train.py prepare` first): "
                            f"{e}") from e
        self.dir = data_dir
        self.window_frames = int(self.index["window_frames"])
        self.files = self.index["files"]
        self.first = np.cumsum([0] + [f["windows"] for f in self.files])   # first window id per file
        self._arrays = {}

    def __len__(self):
        return int(self.first[-1])

    def check_fits(self, padding_ids: tuple, outputs: dict) -> None:
        """The model's PAD/EPAD ids are the dataset's, and it predicts every id the dataset holds
        ({"text": n, "audio": n} ids; else the loss would be NaN)."""
        if (self.index["text_padding_id"], self.index["end_of_padding_id"]) != tuple(padding_ids):
            raise DataError(f"{self.dir}: prepared with PAD/EPAD ids {self.index['text_padding_id']}/"
                            f"{self.index['end_of_padding_id']}, the model uses {tuple(padding_ids)}")
        for stream, top in self.index.get("max_token_ids", {}).items():
            if top >= outputs[stream]:
                raise DataError(f"{self.dir}: holds {stream} token {top}, but the model predicts "
                                f"{outputs[stream]} {stream} ids (prepared with another tokenizer or codec?)")

    def locate(self, i: int) -> tuple[dict, int]:
        f = int(np.searchsorted(self.first, i, side="right") - 1)
        return self.files[f], i - int(self.first[f])

    def name(self, i: int) -> str:
        """A human name for window i: the source file and the seconds it covers."""
        info, w = self.locate(i)
        sec = self.index.get("window_sec", self.window_frames / CODEC.frame_rate)
        return f"{info['source']} [{w * sec:g}-{(w + 1) * sec:g} s]"

    def __getitem__(self, i: int) -> np.ndarray:
        info, w = self.locate(i)
        if info["tokens"] not in self._arrays:
            path = os.path.join(self.dir, info["tokens"])
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot read prepared tokens ({e})") from e
            if array.ndim != 2 or array.shape[1] != info["windows"] * self.window_frames:
                raise DataError(f"{path}: shape {array.shape} does not match the index "
                                f"({info['windows']} windows of {self.window_frames} frames)")
            self._arrays[info["tokens"]] = array.reshape(len(array), info["windows"], self.window_frames)
        return np.asarray(self._arrays[info["tokens"]][:, w], np.int32)     # [17, windows, T] -> window w


def window_ids(num_windows: int, seed: int, position: int, count: int) -> np.ndarray:
    """Positions [position, position + count) of the endless shuffled stream -> window ids."""
    out, (epoch, offset) = [], divmod(position, num_windows)
    while len(out) < count:
        order = np.random.default_rng([seed, epoch]).permutation(num_windows)
        out.extend(order[offset:offset + count - len(out)].tolist())
        epoch, offset = epoch + 1, 0
    return np.asarray(out, np.int64)


def read_batch(ds: TokenWindows, ids: np.ndarray) -> np.ndarray:
    """window ids [A, b] -> int32 [A, b, 17, T]."""
    return np.stack([np.stack([ds[int(i)] for i in row]) for row in ids])


# ----------------------------------------------------------------------------------------------
# 4. The command line.

def main(argv=None, prog="data.py") -> dict:
    """`python data.py ARGS` (or `data.py prepare ARGS`); train.py's `prepare` subcommand lands here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Tokenize a moshi-finetune dataset once: Mimi codes of both channels + the text stream."))
    a = ap.add_argument
    a("--manifest", required=True, help=".jsonl of {\"path\": wav, \"duration\": seconds}")
    a("--out", required=True, help="output folder (tokens/*.npy + index.json)")
    a("--tokenizer", required=True, help="sentencepiece model (tokenizer_spm_32k_3.model)")
    a("--mimi", required=True, help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors)")
    a("--duration-sec", type=float, default=10.0, help="window length, as moshi-finetune's duration_sec")
    a("--encode-batch", type=int, default=8, help="windows per Mimi call")
    a("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    return prepare_main(ap.parse_args(argv))


def prepare_main(args) -> dict:
    import sentencepiece
    if not (args.duration_sec > 0 and math.isfinite(args.duration_sec)):
        raise DataError(f"--duration-sec {args.duration_sec}: must be a positive number of seconds")
    if args.encode_batch < 1:
        raise DataError(f"--encode-batch {args.encode_batch}: must be at least 1")
    check_new_folder(args.out)                                  # before Mimi loads (prepare checks again)
    params, cfg = convert.load_mimi(args.mimi)
    if cfg.frame_size != CODEC.frame_size or cfg.sample_rate != CODEC.sample_rate:
        raise ValueError(f"{args.mimi}: a Mimi with {cfg.frame_size}-sample frames at {cfg.sample_rate} Hz; "
                         f"Moshi needs {CODEC.frame_size} at {CODEC.sample_rate}")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
    except (OSError, RuntimeError) as e:
        raise DataError(f"--tokenizer {args.tokenizer}: not a sentencepiece model ({e})") from None
    encode = functools.partial(encode_windows, params, cfg, args.encode_batch)
    return prepare(args.manifest, args.out, sp, encode, args.duration_sec, args.strict,
                   meta={"tokenizer": args.tokenizer, "mimi": args.mimi})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:   # bad input (DataError, CheckpointError): no traceback
        sys.exit(f"data.py: {e}")
