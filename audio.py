"""audio.py: audio files in and out, in numpy: read any rate and channel count, resample, loudness.

Every program here takes audio from files: sample.py the user's prompt and PersonaPlex's voice
prompts, data.py moshi-finetune's stereo conversations, `convert.py mimi` a file to round-trip
through the codec. They all read it here, block by block, in constant memory, resampled on the
fly by the official scripts' resampler (sphn's, i.e. rubato's FFT resampler):

    read_blocks(path, rate, channel)  float32 blocks [channels, n] (or one channel's [n]) at `rate`
    read_audio(path, rate)            the blocks joined: the same samples however the file is read
    frames_of(blocks, n, frame_size)  a stream cut into codec frames (the last one zero-padded)
    write_audio(path, wav, rate)      16-bit, written whole or not at all (a temporary name, then renamed)
    normalize_loudness(x, rate)       to -24 LUFS (ITU-R BS.1770, as pyloudnorm), for voice prompts

It imports no project file and no JAX (numpy and soundfile), so a script that only reads audio needs
nothing else; Mimi's frame geometry (24 kHz, 1920-sample frames) comes in as arguments from
mimi.MimiConfig. `python audio.py in.wav out.wav --rate 16000` resamples a file.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np


# ----------------------------------------------------------------------------------------------
# Reading. A file is read block by block (a second at a time, so an
# hour of audio costs the memory of a second), one channel taken if asked, and resampled on the fly.
# Resampling is sphn's (Kyutai's and NVIDIA's scripts read audio with sphn.read / sphn.resample), that
# is rubato's FftFixedInOut, so that a 16 kHz prompt gives the official scripts' Mimi codes. The
# input is cut into chunks of n_in samples (n_in / n_out = sr_in / sr_out, n_in the first multiple
# of sr_in / gcd that reaches 1024); each chunk, zero-padded to 2 n_in, is convolved in the frequency
# domain with a lowpass of n_in taps (a sinc windowed by Blackman-Harris squared, cut a little below
# the lower of the two Nyquist rates), its spectrum cut or zero-extended to 2 n_out samples, and the
# chunks' outputs overlap-added. The filter is never re-centred: the output lags the input by
# n_out / 2 samples (32 ms at 16 kHz), and the last chunk is zero-padded, so S samples become
# ceil(S / n_in) * n_out. Chunks are independent but for the overlap, so a file resampled block by
# block equals the file resampled at once.

class AudioError(ValueError):
    """An audio file that cannot be used: names the file and the problem."""


def lowpass_cutoff(taps: int) -> np.float32:
    """rubato's fitted cutoff (of Nyquist) for a Blackman-Harris² sinc of `taps` taps, in float32."""
    f = np.float32
    k1, k2, k3 = f(13.745202940783823), f(121.73532586374934), f(5964.163279612051)
    return f(1) / (k1 / f(taps) + k2 / f(taps ** 2) + k3 / f(taps ** 3) + f(1))


class Resampler:
    """Streaming resampler: `r(block)` takes input [..., n] and returns the output of the chunks that
    input completes [..., m] (float32); `r(block, final=True)` also flushes the last, zero-padded chunk."""

    def __init__(self, sr_in: int, sr_out: int):
        g = math.gcd(sr_in, sr_out)
        chunks = -(-1024 // (sr_in // g))                  # sphn's chunks: at least 1024 input samples
        self.n_in, self.n_out = chunks * sr_in // g, chunks * sr_out // g
        n = self.n_in
        cutoff = float(lowpass_cutoff(min(n, self.n_out)) * np.float32(min(1.0, self.n_out / n)))
        x = np.arange(n)
        window = (0.35875 - 0.48829 * np.cos(2 * np.pi * x / n) + 0.14128 * np.cos(4 * np.pi * x / n)
                  - 0.01168 * np.cos(6 * np.pi * x / n)) ** 2                       # periodic, squared
        h = window * np.sinc((x - n // 2) * cutoff)
        # the filter's spectrum, scaled for rubato's unnormalised FFTs, on the bins both sides share
        self.filter = np.fft.rfft(h / h.sum() / (2 * n), 2 * n)[:min(n + 1, self.n_out)]
        self.pending, self.overlap = None, 0.0                     # input of the unfinished chunk; tail

    def length(self, n_in: int) -> int:
        """Outputs for n_in input samples: ceil(n_in / chunk) chunks."""
        return -(-n_in // self.n_in) * self.n_out

    def __call__(self, block, final: bool = False):
        block = np.asarray(block, np.float64)
        buf = block if self.pending is None else np.concatenate([self.pending, block], axis=-1)
        if final:                                                       # the last chunk, zero-padded
            buf = np.pad(buf, [(0, 0)] * (buf.ndim - 1) + [(0, -buf.shape[-1] % self.n_in)])
        m = buf.shape[-1] // self.n_in                                                   # chunks now
        self.pending = buf[..., m * self.n_in:]
        chunks = buf[..., :m * self.n_in].reshape(*buf.shape[:-1], m, self.n_in)          # [..., m, n_in]
        # irfft zero-extends the spectrum to n_out + 1 bins
        spectrum = np.fft.rfft(chunks, 2 * self.n_in)[..., :len(self.filter)] * self.filter
        y = np.fft.irfft(spectrum, 2 * self.n_out) * (2 * self.n_out)                 # [..., m, 2 n_out]
        # overlap-add: each chunk's second half onto the next one's first, the last one's kept for later
        out = np.zeros((*buf.shape[:-1], (m + 1) * self.n_out))
        out[..., :m * self.n_out] += y[..., :self.n_out].reshape(*buf.shape[:-1], -1)
        out[..., self.n_out:] += y[..., self.n_out:].reshape(*buf.shape[:-1], -1)
        out[..., :self.n_out] += self.overlap
        self.overlap = out[..., m * self.n_out:]
        return out[..., :m * self.n_out].astype(np.float32)


def resample(x, sr_in: int, sr_out: int):
    """x [..., S] -> float32 [..., ceil(S / n_in) * n_out], in one go (Resampler, fed once)."""
    x = np.asarray(x, np.float32)
    return x if sr_in == sr_out else Resampler(sr_in, sr_out)(x, final=True)


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


def resampled_length(path, sample_rate: int) -> int:
    """How many samples read_audio / read_blocks give at `sample_rate`, from the header alone."""
    sr, samples, _ = audio_info(path)
    return samples if sr == sample_rate else Resampler(sr, sample_rate).length(samples)


def read_blocks(path, sample_rate: int | None, channel: int | None = None, block_seconds: float = 1.0):
    """Yield a file as float32 blocks [channels, n] at `sample_rate` (None: the file's), one block
    of input read at a time. channel: only that channel's [n], taken before resampling (Kyutai's and
    NVIDIA's scripts hear a stereo prompt's first channel)."""
    import soundfile as sf
    sr = audio_info(path)[0]
    resampler = None if sample_rate in (None, sr) else Resampler(sr, sample_rate)
    blocksize = max(1, int(sr * block_seconds))
    try:
        with sf.SoundFile(os.fspath(path)) as f:
            final = False
            while not final:                                        # a short read is the file's end
                block = f.read(blocksize, dtype="float32", always_2d=True).T                  # [channels, n]
                final = block.shape[1] < blocksize
                if not np.isfinite(block).all():                    # they would spoil every code
                    raise AudioError(f"{path}: NaN or infinite samples (from about "
                                     f"{(f.tell() - block.shape[1]) / sr:.2f} s): not audio")
                if channel is not None:
                    block = block[channel]
                if resampler is not None:
                    block = resampler(block, final=final)
                if block.shape[-1]:
                    yield block
    except (RuntimeError, TypeError, OSError) as e:      # a file that breaks off: soundfile's errors
        raise AudioError(f"{path}: cannot read audio ({e})") from e


def read_audio(path, sample_rate: int | None) -> np.ndarray:
    """Any file soundfile reads -> float32 [channels, samples], resampled to `sample_rate` (None: keep).
    The blocks of read_blocks, joined: the same samples however the file is read."""
    return np.concatenate(list(read_blocks(path, sample_rate)), axis=-1)


def mix_down(wav) -> np.ndarray:
    """[..., channels, samples] -> [..., 1, samples], the average of the channels."""
    return np.asarray(wav, np.float32).mean(axis=-2, keepdims=True)


def frames_of(blocks, num_samples: int, frame_size: int):
    """Cut a stream of mono blocks [n] into ceil(num_samples / frame_size) frames [frame_size] for
    mimi.encode_step: the stream is cut at `num_samples`, or continued with silence up to it, and
    the last frame zero-padded (as mimi.encode pads)."""
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


def to_pcm16(wav) -> np.ndarray:
    """float -> int16 as sphn.write_wav (Kyutai's and NVIDIA's scripts write with it): clipped to
    [-1, 1], times 32767, truncated toward zero."""
    return (np.clip(np.asarray(wav, np.float32), -1.0, 1.0) * 32767).astype(np.int16)


def write_audio(path, wav, sample_rate: int) -> None:
    """Write [channels, samples] atomically, as 16-bit samples (to_pcm16)."""
    import soundfile as sf
    if np.ndim(wav) != 2:
        raise AudioError(f"{path}: expected audio [channels, samples], got shape {np.shape(wav)}")
    # Written under a temporary name beside `path`, then renamed: a crash leaves no half file. (The
    # other scripts use convert.atomic_path; audio.py imports no project file.) soundfile
    # creates the file itself, so it gets the usual permissions, and reads the format off its suffix.
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    if os.path.exists(path) and not os.path.isfile(path):
        raise AudioError(f"{path}: not a regular file (a folder, a device?): give a file name")
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}{'' if os.path.splitext(name)[1] else '.wav'}")
    try:
        sf.write(tmp, to_pcm16(wav).T, sample_rate)
        os.replace(tmp, path)
    except (TypeError, ValueError, RuntimeError) as e:
        raise AudioError(f"{path}: cannot write audio ({e})") from e
    finally:
        if os.path.exists(tmp):                  # only after a failure: it was renamed otherwise
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# Loudness. PersonaPlex normalises voice prompts to -24 LUFS, the integrated loudness of
# ITU-R BS.1770-4 (as the pyloudnorm package computes it): K-weight the signal (a +4 dB high shelf
# at 1.5 kHz modelling the head, then a 38 Hz high-pass), take the mean square over 400 ms blocks
# every 100 ms, drop blocks under -70 LUFS, then blocks 10 LU under the mean of those left, and
# report -0.691 + 10 log10(mean square of the kept blocks).

def biquad_coefficients(kind: str, gain_db: float, q: float, fc: float, fs: int):
    """Audio-EQ-cookbook biquads (R. Bristow-Johnson): returns b [3], a [3] with a[0] = 1."""
    A, w0 = 10 ** (gain_db / 40), 2 * np.pi * fc / fs
    alpha, cos = np.sin(w0) / (2 * q), np.cos(w0)
    if kind == "high_shelf":
        s = 2 * np.sqrt(A) * alpha
        b = [A * ((A + 1) + (A - 1) * cos + s), -2 * A * ((A - 1) + (A + 1) * cos),
             A * ((A + 1) + (A - 1) * cos - s)]
        a = [(A + 1) - (A - 1) * cos + s, 2 * ((A - 1) - (A + 1) * cos), (A + 1) - (A - 1) * cos - s]
    else:                                                                               # "high_pass"
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    return np.asarray(b) / a[0], np.asarray(a) / a[0]


def biquad(x, b, a):
    """y[n] = b0 x[n] + b1 x[n-1] + b2 x[n-2] - a1 y[n-1] - a2 y[n-2] (direct form I, float64)."""
    y, x1, x2, y1, y2 = [], 0.0, 0.0, 0.0, 0.0
    b0, b1, b2, a1, a2 = map(float, (*b, *a[1:]))
    for xn in np.asarray(x, np.float64).tolist():
        yn = b0 * xn + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
        x2, x1, y2, y1 = x1, xn, y1, yn
        y.append(yn)
    return np.array(y)


def integrated_loudness(x, fs: int) -> float:
    """BS.1770 integrated loudness of a mono signal, in LUFS (-inf for silence)."""
    y = biquad(x, *biquad_coefficients("high_shelf", 4.0, 1 / np.sqrt(2), 1500.0, fs))
    y = biquad(y, *biquad_coefficients("high_pass", 0.0, 0.5, 38.0, fs))
    block, hop = 0.4 * fs, 0.1 * fs
    # pyloudnorm rounds the block count, so the last block may run past the end (it is then
    # a partial sum over a full block's length); we do the same to give the same numbers.
    count = int(round((len(y) / fs - 0.4) / 0.1)) + 1
    power = np.array([np.sum(np.square(y[int(i * hop): int(i * hop + block)])) / block for i in range(count)])
    lufs = lambda p: -0.691 + 10 * np.log10(p)                                       # noqa: E731
    with np.errstate(divide="ignore"):
        block_lufs = lufs(power)
        kept = power[block_lufs >= -70.0]                                       # the absolute gate
        if len(kept) == 0:
            return -math.inf
        kept = power[(block_lufs > lufs(kept.mean()) - 10.0) & (block_lufs > -70.0)]   # the relative gate
        return float(lufs(kept.mean())) if len(kept) else -math.inf


def normalize_loudness(x, fs: int, target_lufs: float = -24.0):
    if len(x) < 0.4 * fs:                          # pyloudnorm refuses less than one block too
        raise AudioError(f"the voice prompt lasts {len(x) / fs:.2f} s: loudness needs at least 0.4 s")
    loudness = integrated_loudness(x, fs)
    if not math.isfinite(loudness):
        raise AudioError("the voice prompt is silent: nothing to normalise")
    return (x * 10 ** ((target_lufs - loudness) / 20)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Command line: resample a file (any rate and channels in; mono with --mono).

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--rate", type=int, required=True, help="the output's sample rate (Mimi's: 24000)")
    ap.add_argument("--mono", action="store_true", help="mix the channels down")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error(f"--rate must be a positive number of samples per second, got {args.rate}")
    try:
        wav = read_audio(args.input, args.rate)
        write_audio(args.output, mix_down(wav) if args.mono else wav, args.rate)
    except AudioError as e:
        raise SystemExit(f"audio.py: {e}")
    print(f"{args.input} -> {args.output}: {wav.shape[-1] / args.rate:.2f} s at {args.rate} Hz")


if __name__ == "__main__":
    main()
