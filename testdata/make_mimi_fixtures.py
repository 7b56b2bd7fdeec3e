"""Fixtures for mimi.py: Kyutai's official Mimi (moshi 0.2.13) on random weights, batch and streaming.

Run with the official package: `~/oracle/bin/python testdata/make_mimi_fixtures.py` (a few minutes on
2 cores). It writes testdata/mimi_keys.txt (the official state dict's names and shapes, in Kyutai's
on-disk naming) and testdata/mimi_fixture.npz. `--only tiny` (seconds) rebuilds just the tiny_* and
tiny|* entries and keeps every other entry of the existing npz as it is. The full-size random weights
(385 MB) are not saved: the test rebuilds them bit for bit from mimi_keys.txt, SEED and `overrides()`
below, with numpy alone. The test signals are rebuilt the same way (`test_signal`); their sha256 is
stored to catch drift.

Everything above `main` must stay importable without torch: test_all.py loads this file for them.

Contents of mimi_fixture.npz:
  full_*   full-size Mimi, batch 2, 70000 samples (2.9 s, padded to 37 frames by the codec):
           batch codes for 32 and 8 codebooks, batch decode of the 8 codes, streaming (one 1920-
           sample frame per call) codes and decode.
  *_gaps*  for each code, Kyutai's (2nd-best - best) / best codebook distance: near 0 (a tie up to
           fp32 rounding) the winner depends on summation order, and the test tolerates a flip.
  long_*   full-size Mimi, batch 1, 140 frames (11.2 s): streaming codes and a window of the
           streaming decode, past the 250-step (10 s) wrap of the KV cache; also the batch codes,
           which streaming departs from there.
  tiny|*   the tiny Mimi's random weights (Kyutai's on-disk names), stored in full. The tiny config
           is the project's one tiny Mimi, TINY_KYUTAI_CONFIG = make_sample_fixtures.MIMI_CONFIG
           (sample.tiny_mimi_config(64)): the real 80 ms frame (ratios 8 6 5 4, 12.5 Hz), dimension
           16, 4 filters, 2 heads, 2 layers, feedforward 32, 8 codebooks of 64 entries (dim 8) and a
           transformer context of 8 steps: 2 steps per frame, so the ring KV cache wraps after 4 frames.
  tiny_*   on it, batch 2, 24 frames (24 x 1920 samples, chirp + strong noise): tiny_wav, batch codes
           for all 8 codebooks with their gaps and decode, and streaming (one frame per call) codes,
           gaps and decode. Past frame 4 Kyutai's streaming codes depart from its batch codes.
           tiny_multi_*: the first 20 frames streamed 5 frames per call (more steps than the ring).
"""
import argparse
import copy
import hashlib
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
FULL_SAMPLES, FULL_BATCH = 70000, 2
LONG_FRAMES = 140
LONG_WINDOW = (120, 140)      # frames of the long streaming decode that are kept
TINY_FRAMES = 24
CODEBOOK_STD = 0.18           # random codebook entries: about a quarter of the quantizer input's std


def _sibling(name):
    """Another script of testdata/, imported by its path (this file is itself imported that way)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_testdata_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The one tiny Mimi config, written once in make_sample_fixtures.py (MIMI_CONFIG, Kyutai's mimi_config
# dict for sample.tiny_mimi_config(64)): the real 80 ms frame (ratios 8 6 5 4, 12.5 Hz), tiny widths,
# 8 codebooks of 64 entries, a transformer context of 8 steps (2 per frame: the ring wraps after 4 frames).
TINY_KYUTAI_CONFIG = copy.deepcopy(_sibling("make_sample_fixtures").MIMI_CONFIG)
TINY_CODEBOOKS = TINY_KYUTAI_CONFIG["quantizer"]["n_q"]       # 8: the tiny runs use every codebook


def test_signal(batch: int, samples: int, seed: int = 0, sample_rate: int = 24000, noise: float = 0.05):
    """A chirp with a slow tremolo plus noise, per batch item, quantized to 16 bits -> float32 [B, 1, S].

    16-bit quantization makes it exactly representable, so the same bits come out on any machine
    (up to a libm ulp in sin that would have to cross a rounding boundary; the sha256 catches that).
    """
    rng = np.random.default_rng([seed, 7])
    t = np.arange(samples) / sample_rate
    dur = samples / sample_rate
    out = []
    for b in range(batch):
        f0, f1 = 110.0 * (b + 1), 3800.0 / (b + 1)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur))
        x = 0.5 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t + b)) + noise * rng.standard_normal(samples)
        out.append(np.round(np.clip(x, -1, 1) * 32767))
    pcm = np.stack(out)[:, None].astype(np.int16)
    return pcm.astype(np.float32) / 32768


def signal_digest(wav) -> str:
    return hashlib.sha256(np.ascontiguousarray(wav, np.float32).tobytes()).hexdigest()


def overrides():
    """random_weights overrides: scales that keep a deep random Mimi numerically alive.

    Transposed convs are scaled by their true fan-in (cin * kernel / stride). Codebooks come from
    random buffers as in a real checkpoint: `embedding_sum / max(cluster_usage, 1e-5)`, with a few
    dead entries (usage 0, so the clamp matters and they land far away).
    """
    def usage(name, shape, rng):
        u = rng.uniform(0.8, 1.25, shape)
        u[rng.random(shape) < 0.01] = 0.0
        return u

    return {
        "upsample.*": lambda n, s, rng: rng.standard_normal(s) / np.sqrt(2.0),
        "*convtr.weight": lambda n, s, rng: rng.standard_normal(s) / np.sqrt(s[0] * 2.0),
        "*cluster_usage": usage,
        "*embedding_sum": lambda n, s, rng: CODEBOOK_STD * rng.standard_normal(s),
        "*_initialized": lambda n, s, rng: np.ones(s),
        "*layer_scale_*": lambda n, s, rng: 0.2 * rng.standard_normal(s),
    }


def tiny_overrides():
    # A tiny latent is mostly its bias-driven mean; zero conv biases spread the codes. Larger layer
    # scales make the transformers matter, so the ring-cache wrap visibly changes codes.
    o = {"*conv.bias": lambda n, s, rng: np.zeros(s)}
    o.update(overrides())
    o["*embedding_sum"] = lambda n, s, rng: 0.4 * rng.standard_normal(s)
    o["*layer_scale_*"] = lambda n, s, rng: 0.5 + 0.2 * rng.standard_normal(s)
    return o


def to_disk_name(name: str) -> str:
    return name.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight").replace(
        ".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight")


# ----------------------------------------------------------------------------------------------
# Everything below needs torch and the official package.

def build_official(mimi_config, spec_path, overrides_, seed):
    import torch
    import random_weights as rw
    from moshi.models import loaders
    model = loaders.get_mimi(None, mimi_config, num_codebooks=32 if mimi_config is None else mimi_config["quantizer"]["n_q"])
    spec = [(to_disk_name(k), tuple(v.shape)) for k, v in model.state_dict().items()]
    if spec_path:
        rw.write_spec(spec_path, spec, "Kyutai Mimi (moshi 0.2.13) state dict, on-disk naming: name<TAB>shape")
    tensors = rw.random_tensors(spec, seed, overrides_)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    return model.eval(), tensors


_GAP_LOG = []


def record_distance_gaps():
    """Make Kyutai's codebook lookup also log, per vector, (2nd-best - best) / best distance.

    Where that gap is within fp32 rounding, which entry wins is decided by summation order, not by
    the model: the test allows a different code there (and in the same RVQ's later levels) only.
    """
    import torch
    from moshi.quantization.core_vq import EuclideanCodebook
    original = EuclideanCodebook._quantize

    def _quantize(self, x):
        top2 = torch.cdist(x[None], self.embedding[None], p=2)[0].topk(2, largest=False).values
        _GAP_LOG.append(((top2[:, 1] - top2[:, 0]) / top2[:, 0].clamp_min(1e-30)).numpy())
        return original(self, x)

    EuclideanCodebook._quantize = _quantize


def _gaps(B: int, K: int) -> np.ndarray:
    # the last K logged lookups, one per codebook level, each over B * T vectors (b major) -> [B, K, T]
    gaps = np.stack(_GAP_LOG[-K:]).astype(np.float32)
    return gaps.reshape(K, B, -1).transpose(1, 0, 2)


def run_batch(model, wav, n_q):
    """-> codes [B, K, T], their distance gaps, decoded audio."""
    import torch
    model.set_num_codebooks(n_q)
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(wav))
        gaps = _gaps(wav.shape[0], n_q)
        return codes.numpy().astype(np.int32), gaps, model.decode(codes).numpy()


def run_stream(model, wav, n_q, frames_per_call=1):
    """`frames_per_call` frames per call: -> codes [B, K, T], their distance gaps, the streaming decode
    of the codes (the same frames per call)."""
    import torch
    model.set_num_codebooks(n_q)
    F = model.frame_size * frames_per_call
    codes, gaps, pcm = [], [], []
    with torch.no_grad(), model.streaming(wav.shape[0]):
        for i in range(wav.shape[-1] // F):
            codes.append(model.encode(torch.from_numpy(wav[..., i * F:(i + 1) * F])))
            gaps.append(_gaps(wav.shape[0], n_q))
        for c in codes:
            pcm.append(model.decode(c))
    return torch.cat(codes, -1).numpy().astype(np.int32), np.concatenate(gaps, -1), torch.cat(pcm, -1).numpy()


def describe(name, codes):
    flat = codes.transpose(1, 0, 2).reshape(codes.shape[1], -1)
    distinct = [len(np.unique(row)) for row in flat]
    print(f"{name}: codes {codes.shape}, distinct values per codebook {distinct}")


def is_tiny(key: str) -> bool:
    return key.startswith("tiny_") or key.startswith("tiny|")


def make_full(out):
    model, _ = build_official(None, os.path.join(HERE, "mimi_keys.txt"), overrides(), SEED)
    wav = test_signal(FULL_BATCH, FULL_SAMPLES, seed=0)
    out["full_signal_sha256"] = np.array(signal_digest(wav))
    out["full_codes32"], out["full_gaps32"], _ = run_batch(model, wav, 32)
    out["full_codes8"], _, out["full_decoded8"] = run_batch(model, wav, 8)
    F = model.frame_size
    padded = np.pad(wav, ((0, 0), (0, 0), (0, -wav.shape[-1] % F)))
    out["full_stream_codes8"], out["full_stream_gaps8"], out["full_stream_decoded8"] = run_stream(model, padded, 8)
    describe("full batch", out["full_codes32"])
    print("full: smallest relative distance gaps of the official argmins:", np.sort(out["full_gaps32"].ravel())[:5])
    print("full: stream codes == batch codes:", np.array_equal(out["full_stream_codes8"], out["full_codes8"]),
          "| decoded rms", float(np.sqrt(np.mean(out["full_decoded8"] ** 2))),
          "| stream vs batch decode max diff", float(np.abs(out["full_stream_decoded8"] - out["full_decoded8"]).max()))

    long_wav = test_signal(1, LONG_FRAMES * F, seed=1)
    out["long_signal_sha256"] = np.array(signal_digest(long_wav))
    out["long_batch_codes8"], _, _ = run_batch(model, long_wav, 8)
    out["long_stream_codes8"], out["long_stream_gaps8"], long_pcm = run_stream(model, long_wav, 8)
    a, b = LONG_WINDOW
    out["long_stream_decoded8_window"] = long_pcm[..., a * F:b * F]
    differs = (out["long_batch_codes8"] != out["long_stream_codes8"]).any(1)[0]
    print("long: frames where streaming codes differ from batch codes:", np.nonzero(differs)[0].tolist())


def make_tiny(out):
    model, tensors = build_official(TINY_KYUTAI_CONFIG, None, tiny_overrides(), SEED)
    for k, v in tensors.items():
        out["tiny|" + k] = v
    tiny_wav = test_signal(2, TINY_FRAMES * model.frame_size, seed=2, noise=0.3)
    out["tiny_wav"] = tiny_wav
    out["tiny_codes"], out["tiny_gaps"], out["tiny_decoded"] = run_batch(model, tiny_wav, TINY_CODEBOOKS)
    out["tiny_stream_codes"], out["tiny_stream_gaps"], out["tiny_stream_decoded"] = run_stream(
        model, tiny_wav, TINY_CODEBOOKS)
    # 5 frames per call: 10 steps into the 8-slot ring, so each call overwrites its own first keys and
    # its first steps see no key at all (torch's attention gives them 0)
    out["tiny_multi_codes"], out["tiny_multi_gaps"], out["tiny_multi_decoded"] = run_stream(
        model, tiny_wav[..., :20 * model.frame_size], TINY_CODEBOOKS, frames_per_call=5)
    describe("tiny batch", out["tiny_codes"])
    describe("tiny stream", out["tiny_stream_codes"])
    print("tiny: smallest relative distance gaps of the official argmins:", np.sort(out["tiny_gaps"].ravel())[:5])
    differs = (out["tiny_codes"] != out["tiny_stream_codes"]).any(1)
    print("tiny: frames where streaming codes differ from batch codes:", [np.nonzero(d)[0].tolist() for d in differs])
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    print("tiny: rms of input", rms(tiny_wav), "| batch decode", rms(out["tiny_decoded"]),
          "| stream decode", rms(out["tiny_stream_decoded"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny"], help="regenerate only these entries; every other entry "
                        "of the existing mimi_fixture.npz is kept as it is (and mimi_keys.txt is not rewritten)")
    args = parser.parse_args(argv)
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.path.insert(0, HERE)
    record_distance_gaps()
    path = os.path.join(HERE, "mimi_fixture.npz")
    out = {}
    if args.only == "tiny":
        with np.load(path) as old:
            out = {k: old[k] for k in old.files if not is_tiny(k)}
        print(f"kept {len(out)} non-tiny entries of {path}")
    else:
        make_full(out)
    make_tiny(out)
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
