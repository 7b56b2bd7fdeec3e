"""Fixture for audio.py's resampler: what sphn (the official scripts' audio reader) makes of a signal.

Run with the oracle venv (sphn installed): `~/oracle/bin/python testdata/make_audio_fixtures.py`
(a second). For each input rate in RATES it resamples SIGNAL_SECONDS of `signal(rate)` (a tone plus
noise, rebuilt by the tests with numpy alone) to 24 kHz with `sphn.resample`, as NVIDIA's
load_audio does, and reads a 16-bit stereo wav of it with `sphn.read(path, sample_rate=24000)`, as
Kyutai's run_inference.py does. And it cuts a WINDOW_FILE_SECONDS stereo wav of each rate into
WINDOW_SECONDS windows with `sphn.dataset_jsonl`, as moshi-finetune's loader does (each window read
at the file's rate and resampled on its own). Writes testdata/audio_fixture.npz (`resampled_<rate>`
[S'], `read_<rate>` [2, S'], `window_<rate>_<k>` [2, unpadded_len], float32). Everything above
`main` is importable without sphn.
"""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RATES = (8000, 16000, 22050, 44100, 48000)
SIGNAL_SECONDS = 0.3
WINDOW_RATES, WINDOW_SECONDS, WINDOW_FILE_SECONDS = (16000, 44100, 24000), 0.48, 1.3


def signal(rate: int, seconds: float = SIGNAL_SECONDS) -> np.ndarray:
    """float32 [2, S]: a 440 Hz tone under noise, and its negative plus more noise."""
    rng = np.random.default_rng(rate)
    t = np.arange(round(seconds * rate)) / rate
    tone = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(len(t))
    return np.stack([tone, -tone + 0.05 * rng.standard_normal(len(t))]).astype(np.float32)


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def main():
    import tempfile

    import soundfile
    import sphn
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in RATES:
            x = signal(rate)
            out[f"resampled_{rate}"] = sphn.resample(x[0], src_sample_rate=rate, dst_sample_rate=24000)
            path = os.path.join(tmp, f"{rate}.wav")
            soundfile.write(path, pcm16(x).T, rate, subtype="PCM_16")
            out[f"read_{rate}"], sr = sphn.read(path, sample_rate=24000)
            assert sr == 24000
            print(rate, out[f"resampled_{rate}"].shape, out[f"read_{rate}"].shape)
        for rate in WINDOW_RATES:
            path = os.path.join(tmp, f"long{rate}.wav")
            soundfile.write(path, pcm16(signal(rate, WINDOW_FILE_SECONDS)).T, rate, subtype="PCM_16")
            with open(os.path.join(tmp, "data.jsonl"), "w") as f:
                f.write(json.dumps({"path": path, "duration": WINDOW_FILE_SECONDS}) + "\n")
            windows = sphn.dataset_jsonl(os.path.join(tmp, "data.jsonl"), duration_sec=WINDOW_SECONDS,
                                         num_threads=1, sample_rate=24000, pad_last_segment=True)
            for k, sample in enumerate(windows.seq(skip=0, step_by=1)):
                out[f"window_{rate}_{k}"] = sample["data"][..., :sample["unpadded_len"]]
                print(rate, k, sample["start_time_sec"], sample["data"].shape, sample["unpadded_len"])
    np.savez_compressed(os.path.join(HERE, "audio_fixture.npz"), **out)


if __name__ == "__main__":
    main()
