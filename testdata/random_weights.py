"""Deterministic random checkpoints, rebuilt bit for bit from (key names, shapes, seed) with numpy alone.

The fixture scripts (run once with the official PyTorch package) and the tests (run in CI without
torch) both call `random_tensors`, so a full-size model's random weights never need to be committed:
only the key list, the seed and the reference outputs are. Every tensor, buffers included, is random.
"""
import fnmatch
import zlib

import numpy as np


def default_init(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Scaled so that deep random networks stay numerically tame (activations of order 1)."""
    if len(shape) >= 2:                                   # weights: N(0, 1/fan_in)
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape) / np.sqrt(fan_in)
    if name.endswith(("alpha", "weight")):                # norm gains near 1
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)               # biases, scales, other vectors


def random_tensors(spec, seed: int, overrides: dict | None = None, dtype=np.float32) -> dict:
    """spec: iterable of (name, shape). overrides: {glob pattern: fn(name, shape, rng) -> array}.

    Each tensor has its own generator seeded from (seed, crc32(name)), so adding or reordering keys
    never changes the others.
    """
    out = {}
    for name, shape in spec:
        shape = tuple(int(s) for s in shape)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        fn = default_init
        for pattern, f in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                fn = f
                break
        out[name] = np.asarray(fn(name, shape, rng), dtype=dtype).reshape(shape)
    return out


def read_spec(path) -> list:
    """A key list as written by the fixture scripts: one `name<TAB>shape` per line, '#' comments."""
    spec = []
    for line in open(path):
        if line.strip() and not line.startswith("#"):
            name, shape = line.rstrip("\n").split("\t")[:2]
            spec.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return spec


def write_spec(path, spec, header: str = "") -> None:
    with open(path, "w") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        for name, shape in spec:
            f.write(f"{name}\t{tuple(shape)}\n")
