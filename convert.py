"""convert.py: Kyutai safetensors checkpoints <-> our param dicts, and model configs.

Everything that knows Kyutai's on-disk key names lives here, so the model files can name things
the way the math reads. Three parts, top to bottom:

1. safetensors, read and written by hand: the format is an 8-byte header length, a JSON header
   and raw little-endian tensors. Reading memory-maps the file and hands out one tensor at a time,
   so a 15 GB bf16 checkpoint never sits in RAM twice. Writing is atomic (temp file + rename).
2. Mimi: `params, cfg = load_mimi(path)`.
3. The LM: `params, cfg = load_lm(path, config=None)` and `save_lm(path, params, cfg)`.

`python convert.py inspect FILE` lists a checkpoint's tensors without loading them.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile

import numpy as np

try:                                    # ml_dtypes ships with jax; it gives numpy a bfloat16
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:                     # pragma: no cover - jax always brings it
    _BF16 = None


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key(s) and the shapes involved."""


# ----------------------------------------------------------------------------------------------
# 1. safetensors

_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": _BF16,
           "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
           "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_NAMES = {v: k for k, v in _DTYPES.items() if v is not None}


class SafeTensorsFile:
    """A read-only, memory-mapped safetensors file: `f.keys()`, `f.shape(k)`, `f[k]` (a numpy view)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{self.path}: too short to be a safetensors file")
                (n,) = struct.unpack("<Q", raw)
                if n > 100_000_000:
                    raise CheckpointError(f"{self.path}: not a safetensors file (header length {n})")
                header = json.loads(fh.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read as safetensors ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._start = 8 + n
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self):
        return list(self.header)

    def __contains__(self, key):
        return key in self.header

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def dtype_name(self, key) -> str:
        return self.header[key]["dtype"]

    def __getitem__(self, key) -> np.ndarray:
        info = self.header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        buf = self._mmap[self._start + begin: self._start + end]
        return buf.view(dtype).reshape(info["shape"])


def load_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors as memory-mapped numpy views (nothing is read until used)."""
    f = SafeTensorsFile(path)
    return {k: f[k] for k in f.keys()}


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors (numpy or jax arrays) atomically: a crash mid-write leaves the old file intact."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot write {name!r}: unsupported dtype {a.dtype}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # keep tensor data 8-byte aligned
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for a in arrays:
                fh.write(a.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_keys(expected: dict, found: dict, what: str) -> None:
    """Compare {name: shape} maps; raise one CheckpointError listing every problem, by name."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what}: the checkpoint does not fit the model config"]
    lines += [f"  missing key {k!r} (expected shape {tuple(expected[k])})" for k in missing[:20]]
    lines += [f"  unexpected key {k!r} (shape {tuple(found[k])})" for k in unexpected[:20]]
    lines += [f"  key {k!r} has shape {tuple(found[k])}, expected {tuple(expected[k])}" for k in misshaped[:20]]
    hidden = max(0, len(missing) - 20) + max(0, len(unexpected) - 20) + max(0, len(misshaped) - 20)
    if hidden:
        lines.append(f"  ... and {hidden} more")
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Kyutai's StreamingTransformer <-> helium's stacked layers. Shared by Mimi's two transformers, the
# temporal transformer and the depformer. Kyutai has two namings for attention weights:
#   on disk (legacy, all released checkpoints): self_attn.in_proj_weight [M*3D, D], out_proj.weight [M*D, D]
#   in memory (moshi >= 0.2):                   self_attn.in_projs.{i}.weight [3D, D], out_projs.{i}.weight
# where M is the number of per-step weight sets (1 except in the depformer). Both are accepted; we
# always write the on-disk one, which every Kyutai stack (PyTorch, MLX, Rust) reads.

def _transformer_layer_keys(prefix: str, cfg) -> dict:
    """On-disk {name: shape} for one layer of a helium.TransformerConfig."""
    D, M = cfg.d_model, cfg.num_weight_sets
    keys = {f"{prefix}self_attn.in_proj_weight": (M * 3 * D, D),
            f"{prefix}self_attn.out_proj.weight": (M * D, D)}
    if cfg.norm.startswith("rms_norm"):
        keys.update({f"{prefix}norm{i}.alpha": (1, 1, D) for i in (1, 2)})
    else:
        keys.update({f"{prefix}norm{i}.{w}": (D,) for i in (1, 2) for w in ("weight", "bias")})
    if cfg.gating == "none":
        F = cfg.dim_feedforward
        keys.update({f"{prefix}linear1.weight": (F, D), f"{prefix}linear2.weight": (D, F)})
    else:
        Hd = cfg.gating_hidden
        gates = [f"gating.{i}." for i in range(M)] if cfg.weights_per_step else ["gating."]
        for g in gates:
            keys.update({f"{prefix}{g}linear_in.weight": (2 * Hd, D), f"{prefix}{g}linear_out.weight": (D, Hd)})
    if cfg.layer_scale is not None:
        keys.update({f"{prefix}layer_scale_{i}.scale": (D,) for i in (1, 2)})
    return keys


def transformer_keys(prefix: str, cfg) -> dict:
    """On-disk {name: shape} of a whole stack, e.g. prefix 'transformer.layers.'."""
    keys = {}
    for layer in range(cfg.num_layers):
        keys.update(_transformer_layer_keys(f"{prefix}{layer}.", cfg))
    return keys


def to_disk_attention_names(tensors: dict, num_weight_sets) -> dict:
    """Rewrite in-memory `in_projs.{i}` / `out_projs.{i}` names to the packed on-disk form.

    `num_weight_sets(name)` gives M for the layer a key belongs to. Other keys pass through.
    """
    out, groups = {}, {}
    for name, value in tensors.items():
        for mem, disk in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                          (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if mem in name and name.endswith(".weight"):
                head, tail = name.split(mem)
                groups.setdefault(head + disk, {})[int(tail.split(".")[0])] = value
                break
        else:
            out[name] = value
    for name, parts in groups.items():
        M = num_weight_sets(name)
        if sorted(parts) != list(range(M)):
            raise CheckpointError(f"{name}: found per-step projections {sorted(parts)}, expected 0..{M - 1}")
        out[name] = parts[0] if M == 1 else np.concatenate([np.asarray(parts[i]) for i in range(M)])
    return out


def stack_transformer(tensors: dict, prefix: str, cfg, cast) -> dict:
    """Checkpoint tensors (on-disk names) -> helium's stacked layer params. `cast(np_array) -> array`."""
    D, M = cfg.d_model, cfg.num_weight_sets
    per_step = cfg.weights_per_step > 0

    def layer(i):
        g = lambda k: tensors[f"{prefix}{i}.{k}"]
        in_proj, out_proj = g("self_attn.in_proj_weight"), g("self_attn.out_proj.weight")
        if per_step:
            in_proj, out_proj = in_proj.reshape(M, 3 * D, D), out_proj.reshape(M, D, D)
        p = {"attn": {"in_proj": in_proj, "out_proj": out_proj}}
        for n in (1, 2):
            p[f"norm{n}"] = ({"alpha": g(f"norm{n}.alpha").reshape(D)} if cfg.norm.startswith("rms_norm")
                             else {"weight": g(f"norm{n}.weight"), "bias": g(f"norm{n}.bias")})
        if cfg.gating == "none":
            p["mlp"] = {"linear1": g("linear1.weight"), "linear2": g("linear2.weight")}
        elif per_step:
            p["mlp"] = {w: np.stack([g(f"gating.{j}.{w}.weight") for j in range(M)])
                        for w in ("linear_in", "linear_out")}
        else:
            p["mlp"] = {w: g(f"gating.{w}.weight") for w in ("linear_in", "linear_out")}
        if cfg.layer_scale is not None:
            p["layer_scale_1"], p["layer_scale_2"] = g("layer_scale_1.scale"), g("layer_scale_2.scale")
        return p

    layers = [layer(i) for i in range(cfg.num_layers)]
    # Stack leaf by leaf and cast right away, so only one layer-sized numpy temporary lives at a time.
    import jax
    return jax.tree.map(lambda *xs: cast(np.stack([np.asarray(x) for x in xs])), *layers)


def unstack_transformer(params: dict, prefix: str, cfg) -> dict:
    """helium's stacked layer params -> {on-disk name: numpy array} (inverse of stack_transformer)."""
    D, M = cfg.d_model, cfg.num_weight_sets
    per_step = cfg.weights_per_step > 0
    out = {}
    for i in range(cfg.num_layers):
        p = {k: v for k, v in _layer_slice(params, i).items()}
        pre = f"{prefix}{i}."
        in_proj, out_proj = p["attn"]["in_proj"], p["attn"]["out_proj"]
        out[pre + "self_attn.in_proj_weight"] = in_proj.reshape(M * 3 * D, D)
        out[pre + "self_attn.out_proj.weight"] = out_proj.reshape(M * D, D)
        for n in (1, 2):
            if cfg.norm.startswith("rms_norm"):
                out[pre + f"norm{n}.alpha"] = p[f"norm{n}"]["alpha"].reshape(1, 1, D)
            else:
                out[pre + f"norm{n}.weight"] = p[f"norm{n}"]["weight"]
                out[pre + f"norm{n}.bias"] = p[f"norm{n}"]["bias"]
        if cfg.gating == "none":
            out[pre + "linear1.weight"], out[pre + "linear2.weight"] = p["mlp"]["linear1"], p["mlp"]["linear2"]
        elif per_step:
            for j in range(M):
                for w in ("linear_in", "linear_out"):
                    out[pre + f"gating.{j}.{w}.weight"] = p["mlp"][w][j]
        else:
            for w in ("linear_in", "linear_out"):
                out[pre + f"gating.{w}.weight"] = p["mlp"][w]
        if cfg.layer_scale is not None:
            out[pre + "layer_scale_1.scale"], out[pre + "layer_scale_2.scale"] = p["layer_scale_1"], p["layer_scale_2"]
    return out


def _layer_slice(tree, i):
    if isinstance(tree, dict):
        return {k: _layer_slice(v, i) for k, v in tree.items()}
    return np.asarray(tree[i])


# ----------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="list the tensors of a safetensors file")
    p.add_argument("file")
    args = ap.parse_args(argv)
    if args.cmd == "inspect":
        f = SafeTensorsFile(args.file)
        total = 0
        for k in f.keys():
            n = int(np.prod(f.shape(k)))
            total += n
            print(f"{k}\t{f.shape(k)}\t{f.dtype_name(k)}")
        print(f"# {len(f.keys())} tensors, {total:,} elements")


if __name__ == "__main__":
    main()
