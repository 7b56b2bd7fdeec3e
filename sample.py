"""sample.py: talk to Moshi. `python sample.py --prompt in.wav` writes Moshi's answer to out.wav.

Moshi is full duplex: every 80 ms it hears one frame of the user and says one frame back, whether
the user is talking or not. This program plays a wav file as the user, frame by frame, exactly as a
microphone would:

    1920 samples of the user -> mimi.encode_step -> 8 user codes
        -> moshi.gen_step -> one text token + 8 audio codes for Moshi (one jitted call)
        -> mimi.decode_step -> 1920 samples of Moshi's voice

It writes Moshi's voice to out.wav (one frame out per frame in), streams its inner monologue (the text it
speaks from) to the terminal, and saves that text with frame timestamps to out.json. The loop is
the one of Kyutai's offline `moshi/run_inference.py`, so with --greedy it gives the same tokens as
the official package, frame for frame.

PersonaPlex (`--hf-repo nvidia/personaplex-7b-v1`) is Moshi fine-tuned to take a voice prompt and
a role in text before the conversation: see `build_persona_prompt` below.

Sections, top to bottom: the PersonaPlex prompt (with its saved .pt voices, read without torch); the
conversation loop; text display; main.
The weights are found as Kyutai's loader finds them, by `repo.find_checkpoint`; the prompt (any rate
or channel count) is read lazily by `audio.read_blocks`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import pickle
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
import soundfile

import convert
import helium
import audio
import mimi
import moshi
import repo


class SampleError(Exception):
    """Something the user can fix (a missing file, bad audio, a bad flag): printed without a traceback."""


# ----------------------------------------------------------------------------------------------
# 1. The PersonaPlex prompt. PersonaPlex (NVIDIA) is Moshi fine-tuned with a 16-codebook depformer
# (8 for its own voice, 8 predicting the user) and a prompt played before the conversation, one
# frame per step, every stream forced:
#   voice prompt   Moshi's audio = the voice prompt's Mimi codes, text = PAD, user = a 440 Hz sine
#   0.5 s          Moshi's audio = silence,                     text = PAD, user = sine
#   text prompt    Moshi's audio = silence, text = "<system> ... <system>" one token per frame, user = sine
#   0.5 s          as above, text = PAD
# Then the conversation, the user's real codes forced onto streams 9..16. The sine and silence
# codes are PersonaPlex's constants for the released Mimi; for any other Mimi (tests) the same
# recipe is computed: one frame of each encoded from a fresh codec state.

PERSONAPLEX_TEXT_PROMPT = ("You are a wise and friendly teacher. Answer questions or provide advice "
                           "in a clear and engaging way.")
SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)   # Mimi codes of an 80 ms silent frame
SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)        # ... of 80 ms of a 440 Hz sine at 0.5
PROMPT_SILENCE_FRAMES = 6                                        # int(0.5 s * 12.5 Hz)


def wrap_system(text: str) -> str:
    text = text.strip()
    if text.startswith("<system>") and text.endswith("<system>"):
        return text
    return f"<system> {text} <system>"


@dataclasses.dataclass
class Prompt:
    """Forced tokens for the frames before the conversation: text [N], moshi_codes [N, 8], user_codes [N, 8].
    A saved voice (read_voice_pt) comes before them instead of voice frames: embeddings [M, D] and the
    token ring it leaves, cache [1 + n_q, max_delay + 3]."""
    text: np.ndarray
    moshi_codes: np.ndarray
    user_codes: np.ndarray
    embeddings: np.ndarray | None = None
    cache: np.ndarray | None = None

    def __len__(self):
        """Frames, as many as the audio it was made from (a saved voice's first frame left no embedding)."""
        return len(self.text) + (0 if self.embeddings is None else len(self.embeddings) + 1)


def encode_audio(models, wav):
    """Mono float32 [S] -> Mimi codes int32 [ceil(S / frame_size), K], frame by frame from a fresh state."""
    state, codes = mimi.encoder_state(models.mimi_cfg, 1), []
    for frame in audio.frames_of([wav], len(wav), models.mimi_cfg.frame_size):
        state, c = mimi.encode_step(models.mimi, models.mimi_cfg, state, jnp.asarray(frame)[None, None],
                                    num_codebooks=models.codebooks)
        codes.append(np.asarray(c)[0, :, 0])
    return np.stack(codes)


def build_persona_prompt(models, voice_prompt: str | None, text_prompt: str) -> Prompt:
    """voice_prompt: audio of the voice, a saved voice (.pt, as NVIDIA ships them), or None."""
    sr, F = models.mimi_cfg.sample_rate, models.mimi_cfg.frame_size
    released = mimi.MimiConfig(kv_ring=models.mimi_cfg.kv_ring)          # whichever ring it streams with
    if models.mimi_cfg == released and models.codebooks == len(SILENCE_CODES):
        silence, sine = np.array([SILENCE_CODES, SINE_CODES], np.int32)
    else:                                            # not the released Mimi: the same recipe
        silence = encode_audio(models, np.zeros(F, np.float32))[0]
        t = np.arange(F) / sr                        # 80 ms of a 440 Hz sine at 0.5
        sine = encode_audio(models, (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32))[0]
    voice_codes, saved = np.zeros((0, models.codebooks), np.int32), ()      # [n, 8]
    if voice_prompt and voice_prompt.endswith(".pt"):
        saved = read_voice_pt(voice_prompt, models.lm_cfg)                       # (embeddings, cache)
    elif voice_prompt:
        voice = audio.mix_down(audio.read_audio(voice_prompt, sr))[0]                    # [S]
        voice_codes = encode_audio(models, audio.normalize_loudness(voice, sr, -24.0))
    text_tokens = []
    if text_prompt:                                  # NVIDIA wraps even a blank one in its tags
        if models.tokenizer is None:
            raise SampleError("--text-prompt needs a text tokenizer (--tokenizer)")
        text_tokens = models.tokenizer.encode(wrap_system(text_prompt))
    # PAD text over the voice, the 0.5 s gaps and the text prompt between them; after the voice,
    # Moshi's audio is silence throughout, and the user's a sine.
    pad = models.lm_cfg.existing_text_padding_id
    gap = [pad] * PROMPT_SILENCE_FRAMES
    text = np.array([pad] * len(voice_codes) + gap + text_tokens + gap, np.int32)             # [N]
    moshi_codes = np.concatenate([voice_codes, np.tile(silence, (len(text) - len(voice_codes), 1))])
    return Prompt(text, moshi_codes, np.tile(sine, (len(text), 1)), *saved)


# PersonaPlex's saved voices. NVIDIA ships its 18 voices (NATF0 .. VARM4) as torch.save files of
# {"embeddings": [M, 1, 1, D], "cache": [1, 1 + n_q, max_delay + 3] int64}: the temporal
# transformer's input at each voice-prompt frame but the first (the summed embeddings of the tokens
# its LMGen fed), and LMGen's token ring after the prompt. play_prompt replays them.
# A torch.save file is a zip holding a pickle (data.pkl) whose tensors name, by key, raw storages
# stored beside it (data/<key>). Unpickling calls whatever the pickle names, so this unpickler
# resolves only the names a tensor's rebuild needs and refuses any other by name: no torch, and no
# code from the file is run. It lives here, beside the prompt it feeds: a voice is an input to a
# conversation, not a checkpoint (convert.py reads those, in safetensors).

TORCH_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                  "BoolStorage": np.bool_}


class TensorUnpickler(pickle.Unpickler):
    """torch's pickle of tensors (the record `root`data.pkl of the zip file `z`), rebuilt as numpy arrays
    from the storages beside it (`root`data/<key>)."""

    def __init__(self, z, root, path):
        super().__init__(io.BytesIO(z.read(root + "data.pkl")))
        self.zip, self.root, self.path = z, root, path

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in TORCH_STORAGES:
            return np.dtype(TORCH_STORAGES[name])
        if (module, name) == ("collections", "OrderedDict"):           # a tensor's (empty) backward hooks
            return collections.OrderedDict
        raise SampleError(f"{self.path}: refusing to unpickle {module}.{name}: a saved voice holds only "
                          f"tensors (only torch's tensor rebuild is allowed, nothing the file names is run)")

    def persistent_load(self, pid):
        # ("storage", its dtype (from find_class), key, device, number of elements) -> a flat array
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], np.dtype)):
            raise ValueError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        data = self.zip.read(f"{self.root}data/{key}")
        if len(data) < numel * dtype.itemsize:
            raise ValueError(f"storage {key} is truncated")
        return np.frombuffer(data, dtype, count=numel)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2's arguments (then requires_grad, hooks) -> a numpy copy."""
    size, stride = tuple(size), tuple(stride)
    if 0 in size:
        return np.zeros(size, storage.dtype)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if offset < 0 or min(stride, default=0) < 0 or end > len(storage):
        raise ValueError(f"a tensor of shape {size} runs past its storage")
    steps = [s * storage.itemsize for s in stride]                        # strides in bytes
    return np.lib.stride_tricks.as_strided(storage[offset:], size, steps).copy()


def read_torch_file(path):
    """A torch.save file -> the object it holds, its tensors as numpy arrays, without torch."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError(f"{len(pickles)} data.pkl records, expected one")
            root = pickles[0][:-len("data.pkl")]
            if root + "byteorder" in z.namelist() and z.read(root + "byteorder") != b"little":
                raise ValueError("written on a big-endian machine, which is not supported")
            return TensorUnpickler(z, root, path).load()
    except zipfile.BadZipFile:
        raise SampleError(f"{path}: not a torch.save zip file (torch >= 1.6 writes those)") from None
    except OSError as e:
        raise SampleError(f"cannot read the voice prompt {path}: {e}") from None
    except (ValueError, KeyError, EOFError, TypeError, pickle.UnpicklingError) as e:
        raise SampleError(f"{path}: not a readable torch.save file ({e})") from None


def read_voice_pt(path, cfg) -> tuple[np.ndarray, np.ndarray]:
    """A saved PersonaPlex voice -> (embeddings float32 [M, D], token ring int32 [1 + n_q, max_delay + 3]),
    checked against the LM config `cfg`."""
    voice = read_torch_file(path)
    if not (isinstance(voice, dict) and {"embeddings", "cache"} <= set(voice)):
        raise SampleError(f"{path}: not a PersonaPlex voice (expected a dict of 'embeddings' and 'cache', "
                          f"got {sorted(voice) if isinstance(voice, dict) else type(voice).__name__})")
    emb, cache = voice["embeddings"], voice["cache"]
    if not (emb.ndim == 4 and emb.shape[1:] == (1, 1, cfg.dim) and len(emb) and emb.dtype.kind == "f"):
        raise SampleError(f"{path}: embeddings of shape {emb.shape} ({emb.dtype}); this LM takes "
                          f"[frames, 1, 1, {cfg.dim}] floats")
    ring = (1, cfg.num_streams, cfg.max_delay + 3)
    if cache.shape != ring or cache.dtype.kind not in "iu" or cache.min() < moshi.UNGENERATED \
            or cache.max() > max(cfg.card, cfg.text_card):
        raise SampleError(f"{path}: token cache of shape {cache.shape} ({cache.dtype}); this LM keeps "
                          f"{list(ring)} token ids")
    return emb[:, 0, 0].astype(np.float32), cache[0].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# 2. The conversation. Per 80 ms frame: encode the user's frame, one LM step, decode Moshi's frame.
# Each is one jitted call on fixed shapes with its state passed in and out: the LM's KV cache is a
# ring over `context` frames and Mimi's caches are rings too, so frame 10 000 costs what frame 10
# costs, in the same memory.
#
# Moshiko follows Kyutai's run_inference.py: Kyutai's LMGen never shows the transformer the user
# frame given to its first call (it reads initial tokens there), so the first frame is given twice.
# Like run_inference, it hears only the prompt's whole frames (a trailing partial frame is dropped);
# with --duration the prompt is cut, or followed by silence, to that many seconds, the last frame
# zero-padded and the answer cut to the length asked for.
# PersonaPlex follows NVIDIA's offline.py: it zero-pads the last frame and cuts Moshi's audio to the
# input's length; the prompt comes first, then the user's frames, with the LM
# state in PersonaPlex's "lookahead" mode (see moshi.init_gen_state), and the LM and Mimi streaming
# with the KV ring of NVIDIA's code, which sees one step less once full (helium.ring_positions; the
# checkpoint decides, --kv-ring overrides). Both return one frame per input frame (for delays past 1,
# see answer_frames). Moshi's audio is decoded from codebooks 1..8 (PersonaPlex also predicts the
# user's 8, which we ignore as it does).

@dataclasses.dataclass
class Models:
    lm: dict
    lm_cfg: object             # moshi.LMConfig
    mimi: dict
    mimi_cfg: object           # mimi.MimiConfig
    tokenizer: object = None   # sentencepiece.SentencePieceProcessor, or None (tokens shown as <id>)
    gen_config: dict = dataclasses.field(default_factory=dict)   # the repo's lm_gen_config

    @property
    def codebooks(self) -> int:
        """Mimi codebooks per voice: half of the LM's audio streams are Moshi's, half the user's."""
        return self.lm_cfg.n_q // 2

    @property
    def is_persona(self) -> bool:
        """PersonaPlex-style: the depformer writes every audio stream, the user's included."""
        return self.lm_cfg.dep_q == self.lm_cfg.n_q

    def word(self, token: int) -> str | None:
        """The printable text of a text token (sentencepiece's "▁", a word start, becomes a space),
        or None for PAD / EPAD, which say nothing and are never printed."""
        if token in (self.lm_cfg.existing_text_padding_id, self.lm_cfg.existing_text_end_padding_id):
            return None
        if self.tokenizer is None or token >= self.tokenizer.get_piece_size():
            return f"<{token}>"
        return self.tokenizer.id_to_piece(token).replace("\u2581", " ")


def answer_frames(lm_cfg, input_frames: int, prompt) -> int:
    """How many frames converse answers `input_frames` with: as many, except without a prompt, where
    Kyutai's LMGen returns nothing for its first max_delay calls and the first frame given twice
    covers one of them (moshiko, max_delay 1: as many)."""
    return max(0, input_frames - (max(0, lm_cfg.max_delay - 1) if prompt is None else 0))


def converse(models: Models, frames, batch_size: int, sampling: moshi.Sampling, seed: int,
             prompt: Prompt | None = None):
    """Yield, for every answer frame (answer_frames of them), (tokens int32 [B, 1 + dep_q], pcm
    float32 [B, frame_size]) as numpy: the text token and audio codes of Moshi's answer frame, and
    its decoded audio."""
    lm, lm_cfg, K, B = models.lm, models.lm_cfg, models.codebooks, batch_size
    key = jax.random.key(seed)                     # gen_step folds in its step: one key per conversation
    lm_state = moshi.init_gen_state(lm, lm_cfg, B, lookahead=0 if prompt is None else 1)
    enc_state = mimi.encoder_state(models.mimi_cfg, 1)       # the user is the same in every row:
    dec_state = mimi.decoder_state(models.mimi_cfg, B)       # encoded once, Moshi decoded per row
    rows = lambda a: jnp.broadcast_to(jnp.asarray(a), (B,) + np.shape(a))           # noqa: E731
    if prompt is not None:
        lm_state = play_prompt(models, lm_state, prompt, rows, key, sampling)
    pending = None
    for i, frame in enumerate(frames):
        enc_state, codes = mimi.encode_step(models.mimi, models.mimi_cfg, enc_state,
                                            jnp.asarray(frame)[None, None], K)
        for _ in range(2 if i == 0 and prompt is None else 1):    # Kyutai's LMGen never sees call 0's frame
            lm_state, tokens = moshi.gen_step(lm, lm_cfg, lm_state, rows(codes[0]), key, sampling=sampling)
        if prompt is None and i + 1 < lm_cfg.max_delay:    # no frame out yet (LMGen's None): as
            continue                                        # run_inference, nothing decoded (answer_frames)
        dec_state, pcm = mimi.decode_step(models.mimi, models.mimi_cfg, dec_state, tokens[:, 1:1 + K, None])
        # A frame's results come to the host only once the next frame is queued: JAX dispatches
        # asynchronously, so the accelerator never idles while Python prints text and writes audio.
        if pending is not None:
            yield _on_host(pending)
        pending = tokens, pcm[:, 0]                                                         # pcm [B, F]
    if pending is not None:
        yield _on_host(pending)


def play_prompt(models: Models, state, prompt: Prompt, rows, key, sampling: moshi.Sampling):
    """The PersonaPlex prompt through the LM, one gen_step per frame, every stream forced (NVIDIA's
    step_system_prompts). A saved voice first, as its _step_voice_prompt_core replays one: each
    embedding is a temporal step's input while the streams are forced to what its step_embeddings
    writes (initial audio tokens, PAD text), then the token ring becomes the saved one. NVIDIA's
    first step only seeds its cache, so the first frame is dropped (step_embeddings seeds it itself)."""
    lm, cfg = models.lm, models.lm_cfg
    audio, pad = rows(np.full(models.codebooks, cfg.card, np.int32)), rows(cfg.existing_text_padding_id)
    for embedding in [] if prompt.embeddings is None else prompt.embeddings:
        state, _ = moshi.gen_step(lm, cfg, state, audio[:, :, None], key, text=pad, moshi_codes=audio,
                                  embedding=rows(embedding), sampling=sampling)
    if prompt.cache is not None:
        state = dict(state, tokens=rows(prompt.cache))
    for i in range(1 if prompt.embeddings is None else 0, len(prompt.text)):
        state, _ = moshi.gen_step(lm, cfg, state, rows(prompt.user_codes[i])[:, :, None], key,
                                  text=rows(prompt.text[i]), moshi_codes=rows(prompt.moshi_codes[i]),
                                  sampling=sampling)
    return state


def _on_host(step):
    tokens, pcm = jax.device_get(step)
    if (tokens < 0).any():
        raise RuntimeError(f"internal error: the LM returned no frame ({tokens.tolist()})")
    return tokens, pcm


# ----------------------------------------------------------------------------------------------
# 3. Text display.

class Display:
    """Moshi's text as it comes, with a progress line, on a terminal; plain text otherwise.

    On a terminal the last line is a live status line, `[ 42%    3.4/8.0 s    61 ms/frame] words...`,
    redrawn every frame; finished lines of text scroll up above it. Piped, the text pieces are
    written as they come and progress goes to stderr every 10%.
    """

    def __init__(self, total_frames: int, frame_seconds: float):
        self.live = sys.stdout.isatty()
        self.total, self.frame_seconds = total_frames, frame_seconds
        self.width = max(40, os.get_terminal_size(sys.stdout.fileno()).columns - 1) if self.live else 88
        self.line, self.done, self.reported, self.first = "", 0, 0, 0.0

    def status(self) -> str:
        rate = "compiling" if self.done < 2 else \
            f"{1000 * (time.perf_counter() - self.first) / (self.done - 1):5.0f} ms/frame"
        done, total = self.done * self.frame_seconds, self.total * self.frame_seconds
        return f"[{100 * self.done // self.total:3d}% {done:6.1f}/{total:.1f} s {rate}]"

    def frame(self, piece: str | None):
        self.done += 1
        if self.done == 1:
            self.first = time.perf_counter()        # the rate leaves out the first frame's compilation
        if not self.live:
            if piece:
                print(piece, end="", flush=True)
            tenths = 10 * self.done // self.total
            if tenths > self.reported:
                self.reported = tenths
                print(f"\n{self.status()}", file=sys.stderr, flush=True)
            return
        self.line += piece or ""
        status = self.status() + " "
        while len(status) + len(self.line) > self.width and " " in self.line.strip():
            cut = self.line.rstrip().rfind(" ", 0, self.width - len(status))
            cut = cut if cut > 0 else len(self.line.rstrip())
            print("\r\033[K" + " " * len(status) + self.line[:cut])
            self.line = self.line[cut:]
        print("\r\033[K" + status + self.line[-(self.width - len(status)):], end="", flush=True)

    def close(self):
        print("\r\033[K" + self.line if self.live else "", flush=True)


# ----------------------------------------------------------------------------------------------
# 4. Main: load, converse, write.

def load_tokenizer(path):
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as e:
        raise SampleError(f"cannot load the text tokenizer {path!r}: {e}") from None


def load_models(args, log) -> Models:
    # With --quantize the checkpoint is read and quantized on the host: the bf16 weights never
    # occupy the accelerator, only their int8 form does (7.7 GB instead of 15.4 for moshiko).
    with jax.default_device(jax.devices("cpu")[0]) if args.quantize else contextlib.nullcontext():
        models = _load_models(args, log)
    if args.quantize:
        models.lm = jax.device_put(moshi.quantize_int8(models.lm))
    size = sum(x.nbytes for x in jax.tree.leaves(models.lm))
    shown = f"{size / 1e9:.2f} GB" if size > 1e8 else f"{size / 1e6:.1f} MB"
    log(f"LM weights: {shown} ({'int8' if isinstance(models.lm['text_linear'], dict) else args.dtype})")
    return models


def _load_models(args, log) -> Models:
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    if args.random_init:
        log("!" * 88 + f"\n!! --random-init {args.random_init}: RANDOM WEIGHTS. Moshi will babble noise; "
            f"this is a demo of the pipeline.\n" + "!" * 88)
        cfg = moshi.PRESETS[args.random_init]
        lm = moshi.generation_params(moshi.init(jax.random.key(args.seed), cfg, dtype))
        if args.mimi_weight:
            mimi_params, mimi_cfg = _load(convert.load_mimi, args.mimi_weight)
        else:
            mimi_cfg = mimi.TINY if args.random_init.startswith("tiny") else mimi.MimiConfig()
            mimi_params = mimi.init(jax.random.key(args.seed + 1), mimi_cfg)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    else:
        ckpt = repo.find_checkpoint(args.hf_repo, args.moshi_weight, args.mimi_weight, args.tokenizer,
                                    args.config, lora=args.lora_weight)
        log(f"loading Moshi from {ckpt.moshi}" + (f" + LoRA {ckpt.lora[0]}" if ckpt.lora else ""))
        cfg = repo.lm_config_for(ckpt, log)
        # stacked=False: the layers come as lists, the layout gen_step reads in place
        # (moshi.generation_params); a -q8 checkpoint's matrices come as int8 (convert._int8_rows)
        lm = _load(convert.load_lm, ckpt.moshi, cfg=cfg, dtype=dtype, stacked=False, lora=ckpt.lora,
                   int8=True)
        log(f"loading Mimi from {ckpt.mimi}")
        mimi_cfg = repo.mimi_config(ckpt.mimi_config) if ckpt.mimi_config else None
        mimi_params, mimi_cfg = _load(convert.load_mimi, ckpt.mimi, cfg=mimi_cfg)
        tokenizer = load_tokenizer(ckpt.tokenizer)
    if tokenizer is not None and tokenizer.get_piece_size() != cfg.text_card:
        log(f"warning: the tokenizer has {tokenizer.get_piece_size()} pieces, the LM {cfg.text_card} text "
            "tokens: is it this model's tokenizer? (its text will read wrong)")
    # One codebase streams both: Mimi follows the LM's KV ring (--kv-ring overrides the checkpoint's).
    ring = args.kv_ring or cfg.kv_ring
    cfg, mimi_cfg = dataclasses.replace(cfg, kv_ring=ring), dataclasses.replace(mimi_cfg, kv_ring=ring)
    models = Models(lm, cfg, mimi_params, mimi_cfg, tokenizer, {} if args.random_init else ckpt.gen_config)
    if mimi_cfg.codebook_size != cfg.card or mimi_cfg.num_quantizers < models.codebooks:
        raise SampleError(f"Mimi ({mimi_cfg.num_quantizers} codebooks of {mimi_cfg.codebook_size}) does not "
                          f"fit the LM ({models.codebooks} codebooks of {cfg.card} per voice)")
    return models


def _load(fn, path, **kw):
    try:
        return fn(path, **kw)
    except (ValueError, OSError) as e:             # convert.CheckpointError is a ValueError
        raise SampleError(f"cannot load {path}: {e}") from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python sample.py --prompt testdata/hello.wav --out out.wav --duration 12")
    ap.add_argument("--prompt", required=True,
                    help="the user's audio (any format soundfile reads, any rate/channels)")
    ap.add_argument("--out", default="out.wav",
                    help="Moshi's voice (24 kHz wav); its text goes to the same name .json")
    add_weight_flags(ap.add_argument_group("weights"))
    g = ap.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=4242)
    for name, kind, what in [("temp", float, "audio temperature"), ("temp_text", float, "text temperature"),
                             ("top_k", int, "audio top-k"), ("top_k_text", int, "text top-k")]:
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{what} (default: the repo's "
                       f"lm_gen_config, else {getattr(moshi.Sampling(), name)})")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (deterministic; "
                   "also when the repo's lm_gen_config says use_sampling: false)")
    g.add_argument("--batch-size", type=int, default=1, help="independent answers to the same prompt, "
                   "in one batch: out-0.wav, out-1.wav, ...")
    g.add_argument("--duration", type=float, help="seconds of conversation: the prompt is cut, or followed "
                   "by silence, to this length (default: the prompt's length)")
    add_persona_flags(ap.add_argument_group(
        "PersonaPlex (models whose depformer writes all 16 audio streams)"))
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.duration is not None and not 0 < args.duration < float("inf"):
        ap.error(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.seed not in moshi.SEEDS:
        ap.error(f"--seed must be an integer from 0 to {moshi.SEEDS[-1]}, got {args.seed}")
    if os.path.splitext(args.out)[1].lower() not in ("", ".wav"):
        ap.error(f"--out {args.out}: the answer is written as a wav file; name it .wav")
    if args.random_init and args.random_init not in moshi.PRESETS:
        ap.error(f"--random-init: unknown preset {args.random_init!r} "
                 f"(choose from {', '.join(moshi.PRESETS)})")
    ignored = [f"--{k.replace('_', '-')}" for k in ("hf_repo", "moshi_weight", "config", "lora_weight")
               if args.random_init and getattr(args, k)]
    if ignored:
        ap.error(f"--random-init makes the LM's weights: {', '.join(ignored)} would be ignored")
    return args


def add_weight_flags(g):
    g.add_argument("--hf-repo", help="Hugging Face repo id, local directory or LM .safetensors "
                   f"(default {repo.DEFAULT_REPO})")
    g.add_argument("--moshi-weight", help="the LM's safetensors (overrides the repo's)")
    g.add_argument("--mimi-weight", help="Mimi's safetensors (overrides the repo's)")
    g.add_argument("--tokenizer", help="the sentencepiece text tokenizer (overrides the repo's)")
    g.add_argument("--config", help="an LM config.json (overrides the repo's)")
    g.add_argument("--lora-weight", help="LoRA adapters to merge (moshi-finetune's lora.safetensors; "
                   "pass the config.json beside them with --config)")
    g.add_argument("--random-init", metavar="PRESET",
                   help=f"random weights, for demos and tests: one of {', '.join(moshi.PRESETS)}")
    g.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="the LM's dtype (Mimi runs in fp32)")
    g.add_argument("--quantize", choices=("int8",), help="int8 weights for the LM's matrices (per output "
                   "channel, quantized at load time; embeddings, norms and Mimi stay as they are): half "
                   "the memory")


def add_persona_flags(g):
    g.add_argument("--voice-prompt", help="audio of the voice Moshi should speak with (normalised to "
                   "-24 LUFS), or one of PersonaPlex's saved voices (NATF2.pt, ...; torch is not needed)")
    g.add_argument("--text-prompt",
                   help=f"the role, wrapped in <system> tags (default: {PERSONAPLEX_TEXT_PROMPT!r})")
    g.add_argument("--kv-ring", choices=helium.SUPPORTED["kv_ring"],
                   help="whose streaming KV ring the LM and Mimi follow once it is full: Kyutai's (moshi "
                   "0.2.13) or NVIDIA's older one, which sees one step less (default: the checkpoint's, "
                   "NVIDIA's for PersonaPlex; any model takes either)")


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    # what the user can fix: one line, no traceback
    except (SampleError, convert.CheckpointError, convert.OutputError, audio.AudioError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def sampling_for(args, gen_config: dict, log) -> moshi.Sampling:
    """A flag given wins, then the repo's lm_gen_config (which Kyutai's loader hands to LMGen), then
    Kyutai's LMGen defaults."""
    defaults = {k: v for k, v in dataclasses.asdict(moshi.Sampling()).items() if k != "greedy"}
    unknown = sorted(set(gen_config) - set(defaults) - {"use_sampling"})
    if unknown:
        log(f"config.json lm_gen_config: {unknown} not supported here, ignored")
    kinds = {bool: ("true or false", (bool,)), int: ("a whole number", (int,)),
             float: ("a number", (int, float))}
    for k, v in gen_config.items():                # in JSON's types: true, 250, 0.7 (or 1)
        words, types = kinds.get(bool if k == "use_sampling" else type(defaults.get(k)), ("", (type(v),)))
        if type(v) not in types:
            raise SampleError(f"config.json lm_gen_config: {k} must be {words}, got {v!r}")
    picked = {k: gen_config.get(k, v) if getattr(args, k) is None else getattr(args, k)
              for k, v in defaults.items()}
    return moshi.Sampling(args.greedy or gen_config.get("use_sampling") is False, **picked)


def run(args):
    """The program, in order: outputs checked, models loaded, the conversation played and written,
    the timings reported. -> the answers (also in the transcript)."""
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    outs, transcript = check_outputs(args, log)
    models = load_models(args, log)
    sr, F = models.mimi_cfg.sample_rate, models.mimi_cfg.frame_size
    num_samples = (max(1, round(args.duration * sr)) if args.duration
                   else audio.resampled_length(args.prompt, sr))
    prompt = persona_prompt_for(args, models, log)
    if prompt is None and not args.duration:     # Moshiko, as run_inference.py: whole frames only
        num_samples -= num_samples % F
        if not num_samples:
            raise SampleError(f"{args.prompt} is shorter than one frame ({F / sr * 1000:.0f} ms), and only "
                              "whole frames are heard; --duration extends it with silence")
    sampling = sampling_for(args, models.gen_config, log)
    n_frames = -(-num_samples // F)
    out_frames = answer_frames(models.lm_cfg, n_frames, prompt)
    if not out_frames:
        d = models.lm_cfg.max_delay
        raise SampleError(f"{args.prompt}: {n_frames} frame(s) of audio; this model's delays (up to {d}) "
                          f"need {d} frames before it answers; --duration extends it with silence")
    out_samples = min(num_samples, out_frames * F)
    log(f"{args.prompt}: {num_samples / sr:.2f} s, {n_frames} frames; batch {args.batch_size}, "
        f"{'greedy' if sampling.is_greedy else f'sampling (seed {args.seed})'}")
    answers, (start, first, end) = talk(args, models, outs, num_samples, out_frames, sampling, prompt)
    with convert.atomic_open(transcript, "w", encoding="utf-8") as f:
        json.dump({"prompt": args.prompt, "seed": args.seed, "sampling": dataclasses.asdict(sampling),
                   "frame_seconds": F / sr, "random_init": args.random_init, "answers": answers},
                  f, ensure_ascii=False, indent=1)
    steady = (end - first) / max(1, out_frames - 1)
    print(f"wrote {', '.join(outs)} ({out_samples / sr:.2f} s) and {transcript}. {n_frames} frames in "
          f"{end - start:.1f} s (first frame {first - start:.1f} s, with compilation"
          f"{' and the PersonaPlex prompt' if prompt else ''}), then {1000 * steady:.1f} ms/frame: "
          f"real-time factor {steady * sr / F:.2f} (below 1 is faster than real time)"
          + ("  [RANDOM WEIGHTS]" if args.random_init else ""))
    return answers


def check_outputs(args, log) -> tuple[list[str], str]:
    """Before anything is loaded: the prompt must be readable and every output writable (a bad one
    fails now, not after loading 16 GB of weights and conversing). -> (the wavs, the transcript)."""
    audio.audio_info(args.prompt)
    # Several answers are numbered as run_inference.py numbers them: out-0.wav, out-1.wav, ...
    stem, ext = os.path.splitext(args.out)
    outs = [args.out] if args.batch_size == 1 else [f"{stem}-{b}{ext}" for b in range(args.batch_size)]
    transcript = stem + ".json"
    folder = os.path.dirname(os.path.abspath(args.out))
    # A new folder for the answers is made; one that cannot be made is named by check_writable.
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
    for path, what in [(p, "--out") for p in outs] + [(transcript, "the transcript (--out's name, .json)")]:
        convert.check_writable(path, what, (args.prompt, args.voice_prompt))
    for name in convert.remove_stale_temps(folder):
        log(f"removed {name}, left by a run that was killed while writing")
    return outs, transcript


def talk(args, models: Models, outs, num_samples: int, out_frames: int, sampling: moshi.Sampling, prompt):
    """The conversation, frame by frame: each answer's audio streamed into its wav, the text shown
    as it comes and recorded. -> (answers, times: start, first frame done, last frame done)."""
    sr, F, B = models.mimi_cfg.sample_rate, models.mimi_cfg.frame_size, args.batch_size
    # The prompt is read block by block, its first channel (as the official scripts) resampled on the
    # fly, so a conversation of an hour holds a second of input in memory, not an hour.
    frames = audio.frames_of(audio.read_blocks(args.prompt, sr, channel=0), num_samples, F)
    start, kept = time.perf_counter(), []                    # kept: each frame's tokens [B, 1 + codebooks]
    with contextlib.ExitStack() as files:
        # Each answer streams into a 16-bit wav under a temporary name (convert.atomic_path): the file
        # appears, whole, only when the conversation ends well, so an interrupted run leaves no half file.
        tmps = [files.enter_context(convert.atomic_path(path, ".wav")) for path in outs]
        wavs = [files.enter_context(soundfile.SoundFile(tmp, "w", samplerate=sr, channels=1, format="WAV",
                                                         subtype="PCM_16")) for tmp in tmps]
        display = Display(out_frames, F / sr)                      # answer_frames of them
        files.callback(display.close)
        for i, (tokens, pcm) in enumerate(converse(models, frames, B, sampling, args.seed, prompt)):
            for wav, row in zip(wavs, pcm):
                wav.write(audio.to_pcm16(row[:num_samples - i * F]))               # num_samples in all
            display.frame(models.word(int(tokens[0, 0])))     # display.first: frame 0 done, compiled
            kept.append(tokens[:, :1 + models.codebooks])
        end = time.perf_counter()
    # np.stack(kept, 1): [B, T, 1 + codebooks], a row per answer
    answers = [_answer(models, path, t, F / sr) for path, t in zip(outs, np.stack(kept, 1))]
    return answers, (start, display.first, end)


def persona_prompt_for(args, models, log):
    """PersonaPlex's prompt (its default role if none is given), or None for Moshiko-style models."""
    if not models.is_persona:
        if args.voice_prompt or args.text_prompt:
            raise SampleError("--voice-prompt and --text-prompt are for PersonaPlex-style models "
                              f"(dep_q = n_q = 16); this one has dep_q={models.lm_cfg.dep_q}, "
                              f"n_q={models.lm_cfg.n_q}")
        return None
    text = PERSONAPLEX_TEXT_PROMPT if args.text_prompt is None else args.text_prompt
    if args.text_prompt is None and models.tokenizer is None:       # --random-init demos have no tokenizer
        log("no text tokenizer: PersonaPlex's default role is left out of the prompt (give --tokenizer)")
        text = ""
    prompt = build_persona_prompt(models, args.voice_prompt, text)
    log(f"PersonaPlex prompt: {len(prompt)} frames (voice {args.voice_prompt or 'none'}, text {text!r})")
    return prompt


def _answer(models: Models, wav: str, tokens, frame_seconds: float) -> dict:
    """One answer as the transcript records it. tokens [T, 1 + codebooks]: each frame's text token and
    the audio codes of Moshi's voice; its text pieces are the tokens that say something."""
    text_tokens = tokens[:, 0].tolist()
    words = [(frame, token, models.word(token)) for frame, token in enumerate(text_tokens)]
    pieces = [{"frame": frame, "time": round(frame * frame_seconds, 3), "token": token, "piece": piece}
              for frame, token, piece in words if piece is not None]
    return {"wav": wav, "text": "".join(p["piece"] for p in pieces), "pieces": pieces,
            "text_tokens": text_tokens, "audio_tokens": tokens[:, 1:].tolist()}


if __name__ == "__main__":
    main()
