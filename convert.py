"""convert.py: Kyutai safetensors checkpoints <-> our param dicts, and model configs.

Everything that knows Kyutai's on-disk key names lives here, so the model files can name things
the way the math reads. Four parts, top to bottom:

1. safetensors, read and written by hand: the format is an 8-byte header length, a JSON header
   and raw little-endian tensors. Reading memory-maps the file and hands out one tensor at a time,
   so a 15 GB bf16 checkpoint never sits in RAM twice. Writing is atomic (temp file + rename), by
   `atomic_open` / `atomic_path`, which sample.py, train.py and data.py also write their files with.
2. Mimi: `params, cfg = load_mimi(path, cfg=None)` (fp32 or bf16 files, both attention namings),
   `save_mimi(path, params, cfg)`, and `mimi_config(d)` for a repo's Mimi config JSON.
3. The LM: `params, cfg = load_lm(path, config=None)` and `save_lm(path, params, cfg)`.
4. Repo files: `ckpt = find_checkpoint(repo)` resolves a Kyutai repo (a Hugging Face id, a local
   folder, or one .safetensors file) as the official loader does, into the LM, Mimi and tokenizer
   paths and their configs; `load_lm(ckpt.moshi, lm_config_for(ckpt))` then loads the LM. sample.py's
   --hf-repo and train.py's --init-from both go through it.

`python convert.py inspect FILE` lists a checkpoint's tensors without loading them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import struct
import tempfile
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes                        # ships with jax; it gives numpy a bfloat16
import numpy as np

import mimi
import moshi

_BF16 = np.dtype(ml_dtypes.bfloat16)


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
    with atomic_open(path) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for a in arrays:
            fh.write(a.tobytes())


# The files the programs write (checkpoints, token shards, configs, wavs, transcripts) go through
# atomic_path / atomic_open: the data lands in a temporary file beside the target, is fsync'ed, and
# is renamed over the target in one step, so a run killed mid-write leaves the old file whole.
# (mimi.py, which must import nothing but helium.py, has its own few lines for write_audio.)

def fsync(path) -> None:
    """Flush a file, or a directory's list of names, to disk (before a rename relies on it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """`with atomic_path(path) as tmp:` a temporary file name beside `path`, for writers that want a
    name (soundfile, ...). Renamed over `path` when the block ends well, removed if it raises."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        fsync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                     # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **kwargs):
    """`with atomic_open(path, "w") as f:` a file object (open()'s arguments) that replaces `path`
    only once it is completely written."""
    with atomic_path(path, os.path.splitext(os.fspath(path))[1]) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


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


def stack_transformer(tensors: dict, prefix: str, cfg, cast, stacked: bool = True):
    """Checkpoint tensors (on-disk names) -> helium's stacked layer params. `cast(np_array) -> array`.

    stacked=False gives helium's unstacked layout instead (a list of layers, the one generation
    runs on), built layer by layer so that no stacked copy ever exists."""
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

    if not stacked:
        return [jax.tree.map(lambda x: cast(np.asarray(x)), layer(i)) for i in range(cfg.num_layers)]
    layers = [layer(i) for i in range(cfg.num_layers)]
    # Stack leaf by leaf and cast right away, so only one layer-sized numpy temporary lives at a time.
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
    if isinstance(tree, list):                       # unstacked layers: layer i is already apart
        return jax.tree.map(np.asarray, tree[i])
    if isinstance(tree, dict):
        return {k: _layer_slice(v, i) for k, v in tree.items()}
    return np.asarray(tree[i])


# ----------------------------------------------------------------------------------------------
# 2. Mimi (mimi.py)
#
# Kyutai names SEANet convs by their index in an nn.Sequential: stage i of the encoder holds
# n_res residual blocks, an ELU and the strided conv; the decoder puts the ELU and the transposed
# conv first. So with one residual block per stage, a stage is 3 slots and the indices below follow.
# The quantizer ships EMA buffers, not codebooks: codebook = embedding_sum / max(cluster_usage, 1e-5).
# Older checkpoints use older buffer names, which Kyutai's loader renames; so do we.

_OLD_CODEBOOK_NAMES = {"inited": "_initialized", "cluster_size": "cluster_usage",
                       "embed_avg": "embedding_sum", "embed_sum": "embedding_sum"}


def _mimi_conv_names(cfg) -> dict:
    """{Kyutai module name: path into mimi params} for every SEANet conv."""
    per_stage = cfg.n_residual_layers + 2
    names = {"encoder.model.0.conv.conv": ("encoder", "conv_in"), "decoder.model.0.conv.conv": ("decoder", "conv_in")}
    for i in range(len(cfg.ratios)):
        base = 1 + i * per_stage
        for j in range(cfg.n_residual_layers):
            for side, index in (("encoder", base + j), ("decoder", base + 2 + j)):
                names[f"{side}.model.{index}.block.1.conv.conv"] = (side, "stages", i, "res", j, "conv1")
                names[f"{side}.model.{index}.block.3.conv.conv"] = (side, "stages", i, "res", j, "conv2")
        names[f"encoder.model.{base + per_stage - 1}.conv.conv"] = ("encoder", "stages", i, "down")
        names[f"decoder.model.{base + 1}.convtr.convtr"] = ("decoder", "stages", i, "up")
    last = 2 + len(cfg.ratios) * per_stage              # after the final ELU
    names[f"encoder.model.{last}.conv.conv"] = ("encoder", "conv_out")
    names[f"decoder.model.{last}.conv.conv"] = ("decoder", "conv_out")
    return names


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _kyutai_conv_shape(spec) -> tuple:
    # PyTorch: Conv1d (out, in/groups, k); ConvTranspose1d (in, out/groups, k). mimi.py stores
    # (k, in/groups, out) and (in, k, out/groups): the layouts XLA's CPU kernels read directly.
    if spec.transposed:
        return (spec.cin, spec.cout // spec.groups, spec.kernel)
    return (spec.cout, spec.cin // spec.groups, spec.kernel)


def _swap_conv_layout(w, spec):
    """PyTorch's conv weight layout <-> mimi.py's (above). Each swap is its own inverse, so the
    same function loads and saves."""
    return w.transpose(0, 2, 1) if spec.transposed else w.transpose(2, 1, 0)


def _mimi_rvqs(cfg):
    return (("rvq_first", "semantic", cfg.num_semantic), ("rvq_rest", "acoustic", cfg.num_quantizers - cfg.num_semantic))


def mimi_keys(cfg) -> dict:
    """On-disk {name: shape} of a Kyutai Mimi checkpoint for a mimi.MimiConfig."""
    layouts = {"encoder": mimi.encoder_layout(cfg), "decoder": mimi.decoder_layout(cfg)}
    keys = {}
    for name, path in _mimi_conv_names(cfg).items():
        spec = _at(layouts[path[0]], path[1:])
        keys[name + ".weight"], keys[name + ".bias"] = _kyutai_conv_shape(spec), (spec.cout,)
    keys["downsample.conv.conv.conv.weight"] = _kyutai_conv_shape(mimi.downsample_layout(cfg))
    keys["upsample.convtr.convtr.convtr.weight"] = _kyutai_conv_shape(mimi.upsample_layout(cfg))
    D, d, bins = cfg.dimension, cfg.codebook_dim, cfg.codebook_size
    for rvq, _, n in _mimi_rvqs(cfg):
        keys[f"quantizer.{rvq}.input_proj.weight"] = (d, D, 1)
        keys[f"quantizer.{rvq}.output_proj.weight"] = (D, d, 1)
        for level in range(n):
            cb = f"quantizer.{rvq}.vq.layers.{level}._codebook."
            keys.update({cb + "_initialized": (1,), cb + "cluster_usage": (bins,), cb + "embedding_sum": (bins, d)})
    for side in ("encoder", "decoder"):
        keys.update(transformer_keys(f"{side}_transformer.transformer.layers.", cfg.transformer))
    return keys


def _mimi_params(t: dict, cfg, cast) -> dict:
    f32 = lambda name: np.asarray(t[name], np.float32)
    is_conv = lambda x: isinstance(x, mimi.Conv)
    layouts = {"encoder": mimi.encoder_layout(cfg), "decoder": mimi.decoder_layout(cfg)}
    params = {side: jax.tree.map(lambda _: {}, layout, is_leaf=is_conv) for side, layout in layouts.items()}
    for name, path in _mimi_conv_names(cfg).items():
        spec = _at(layouts[path[0]], path[1:])
        w = np.ascontiguousarray(_swap_conv_layout(f32(name + ".weight"), spec))
        _at(params, path).update(w=cast(w), b=cast(f32(name + ".bias")))
    down, up = mimi.downsample_layout(cfg), mimi.upsample_layout(cfg)
    params["downsample"] = cast(np.ascontiguousarray(_swap_conv_layout(f32("downsample.conv.conv.conv.weight"), down)))
    params["upsample"] = cast(np.ascontiguousarray(_swap_conv_layout(f32("upsample.convtr.convtr.convtr.weight"), up)))
    params["quantizer"] = {}
    for rvq, ours, n in _mimi_rvqs(cfg):
        codebooks = []
        for level in range(n):
            cb = f"quantizer.{rvq}.vq.layers.{level}._codebook."
            usage = np.maximum(f32(cb + "cluster_usage"), np.float32(1e-5))      # fp32, as Kyutai
            codebooks.append(f32(cb + "embedding_sum") / usage[:, None])
        params["quantizer"][ours] = {"input_proj": cast(f32(f"quantizer.{rvq}.input_proj.weight")[:, :, 0]),
                                     "output_proj": cast(f32(f"quantizer.{rvq}.output_proj.weight")[:, :, 0]),
                                     "codebooks": cast(np.stack(codebooks))}
    for side in ("encoder", "decoder"):     # mimi keeps the layers as a list (see mimi.transformer_step)
        stacked = stack_transformer(t, f"{side}_transformer.transformer.layers.", cfg.transformer,
                                    lambda a: np.asarray(a, np.float32))
        params[f"{side}_transformer"] = [jax.tree.map(lambda a: cast(np.ascontiguousarray(a[i])), stacked)
                                         for i in range(cfg.num_layers)]
    return params


def _mimi_tensors(params: dict, cfg) -> dict:
    a = lambda x: np.asarray(x, np.float32)
    layouts = {"encoder": mimi.encoder_layout(cfg), "decoder": mimi.decoder_layout(cfg)}
    out = {}
    for name, path in _mimi_conv_names(cfg).items():
        conv, spec = _at(params, path), _at(layouts[path[0]], path[1:])
        out[name + ".weight"], out[name + ".bias"] = _swap_conv_layout(a(conv["w"]), spec), a(conv["b"])
    out["downsample.conv.conv.conv.weight"] = _swap_conv_layout(a(params["downsample"]), mimi.downsample_layout(cfg))
    out["upsample.convtr.convtr.convtr.weight"] = _swap_conv_layout(a(params["upsample"]), mimi.upsample_layout(cfg))
    for rvq, ours, n in _mimi_rvqs(cfg):
        q = params["quantizer"][ours]
        out[f"quantizer.{rvq}.input_proj.weight"] = a(q["input_proj"])[:, :, None]
        out[f"quantizer.{rvq}.output_proj.weight"] = a(q["output_proj"])[:, :, None]
        for level in range(n):       # usage 1 makes embedding_sum the codebook itself, exactly
            cb = f"quantizer.{rvq}.vq.layers.{level}._codebook."
            out[cb + "embedding_sum"] = a(q["codebooks"][level])
            out[cb + "cluster_usage"] = np.ones((cfg.codebook_size,), np.float32)
            out[cb + "_initialized"] = np.ones((1,), np.float32)
    for side in ("encoder", "decoder"):
        stacked = jax.tree.map(lambda *xs: np.stack([a(x) for x in xs]), *params[f"{side}_transformer"])
        out.update({k: a(v) for k, v in unstack_transformer(
            stacked, f"{side}_transformer.transformer.layers.", cfg.transformer).items()})
    return out


def _mimi_config_from_metadata(metadata: dict, path):
    if "mimi_config" not in metadata:
        return None
    try:
        fields = json.loads(metadata["mimi_config"])
        return mimi.MimiConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad mimi_config metadata ({e})") from e


def load_mimi(path, cfg=None):
    """A Kyutai Mimi checkpoint -> (params, mimi.MimiConfig). Params are float32 whatever the file
    holds (fp32 or bf16): Kyutai never runs Mimi in lower precision.

    cfg: None uses the config saved by `save_mimi` if the file has one, else Kyutai's released
    Mimi. Accepted namings: on-disk `self_attn.in_proj_weight` / `out_proj.weight` and in-memory
    `self_attn.in_projs.0.weight` / `out_projs.0.weight`; old codebook buffer names
    (inited, cluster_size, embed_avg, embed_sum). Tensors are read one at a time from a memory map.
    """
    f = SafeTensorsFile(path)
    cfg = cfg or _mimi_config_from_metadata(f.metadata, path) or mimi.MimiConfig()
    tensors = {}
    for name in f.keys():
        head, _, leaf = name.rpartition(".")
        if head.endswith("._codebook") and leaf in _OLD_CODEBOOK_NAMES:
            tensors[f"{head}.{_OLD_CODEBOOK_NAMES[leaf]}"] = f[name]
        else:
            tensors[name] = f[name]
    tensors = to_disk_attention_names(tensors, lambda name: 1)
    check_keys(mimi_keys(cfg), {k: v.shape for k, v in tensors.items()}, f"Mimi checkpoint {path}")
    return _mimi_params(tensors, cfg, jnp.asarray), cfg


def save_mimi(path, params, cfg) -> None:
    """mimi params -> a safetensors file in Kyutai's on-disk naming (fp32), atomically. Kyutai's
    `get_mimi` loads it; the config goes into the metadata so `load_mimi(path)` finds it again."""
    tensors = _mimi_tensors(params, cfg)
    check_keys(mimi_keys(cfg), {k: v.shape for k, v in tensors.items()}, "save_mimi: params")
    save_safetensors(path, tensors, {"format": "pt", "mimi_config": json.dumps(dataclasses.asdict(cfg))})


def mimi_config(d: dict):
    """Kyutai's Mimi config JSON (a repo's `mimi_config_name` file, structured like
    loaders._mimi_config) -> mimi.MimiConfig. Settings the released Mimi does not use are refused
    by name."""
    try:
        seanet, quantizer, transformer = d["seanet"], d["quantizer"], d["transformer"]
        fixed = {"causal": True, "norm": "none", "pad_mode": "constant", "true_skip": True, "activation": "ELU"}
        fixed_tr = {"gating": "none", "norm": "layer_norm", "positional_embedding": "rope", "causal": True}
        bad = [f"seanet.{k}={seanet[k]!r}" for k, v in fixed.items() if k in seanet and seanet[k] != v]
        bad += [f"transformer.{k}={transformer[k]!r}" for k, v in fixed_tr.items() if k in transformer and transformer[k] != v]
        if transformer["d_model"] != seanet["dimension"]:
            bad.append(f"transformer.d_model={transformer['d_model']} != seanet.dimension={seanet['dimension']}")
        if bad:
            raise CheckpointError(f"Mimi config: unsupported settings {', '.join(bad)}")
        ratios = tuple(int(r) for r in seanet["ratios"])
        stride = d["sample_rate"] / math.prod(ratios) / d["frame_rate"]  # encoder rate / codec frame rate
        return mimi.MimiConfig(
            sample_rate=d["sample_rate"], channels=d["channels"], dimension=seanet["dimension"],
            n_filters=seanet["n_filters"], ratios=ratios, kernel_size=seanet["kernel_size"],
            last_kernel_size=seanet["last_kernel_size"], residual_kernel_size=seanet["residual_kernel_size"],
            n_residual_layers=seanet["n_residual_layers"], dilation_base=seanet["dilation_base"],
            compress=seanet["compress"], downsample_stride=int(round(stride)),
            num_heads=transformer["num_heads"], num_layers=transformer["num_layers"],
            dim_feedforward=transformer["dim_feedforward"], context=transformer["context"],
            layer_scale=transformer["layer_scale"], max_period=transformer["max_period"],
            codebook_dim=quantizer["dimension"], codebook_size=quantizer["bins"], num_quantizers=quantizer["n_q"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"Mimi config: missing or bad entry {e}") from None


# ----------------------------------------------------------------------------------------------
# 3. The LM (moshi.py, depformer.py)
#
# Configs: Kyutai ships an LM as a safetensors file plus, except for the first moshiko/moshika
# repos, a config.json whose keys are `LMModel(**lm_kwargs)` arguments mixed with file names and
# tool settings. `lm_config` turns that into a moshi.LMConfig, resolving what Kyutai's LMModel
# resolves: the depformer inherits the main transformer's settings it does not override.
# Conditioners (Hibiki's quality label, TTS speakers) are not implemented: a config that declares
# them, or a checkpoint that holds `condition_provider.*` / `fuser.*` tensors, loads with a warning
# and the conditioning is ignored, so such a model runs unconditioned.

_NOT_LM_KWARGS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type", "version",
                  "lm_gen_config", "tts_config", "stt_config", "model_id")     # files and tool settings
_DROPPED_LM_KWARGS = ("depformer_causal", "depformer_context", "gradient_checkpointing")   # unused by Kyutai too
_UNSUPPORTED_LM_KWARGS = {"demux_second_text_stream": False, "norm_emb": False, "bias_proj": False,
                          "quantize": False, "lora": False, "kv_repeat": 1, "depformer_kv_repeat": 1,
                          "cross_attention": False}
_INHERITED_BY_DEPFORMER = ("num_layers", "gating", "max_period", "layer_scale")


def lm_config(config=None):
    """A Kyutai LM config -> moshi.LMConfig. `config`: None (moshiko, Kyutai's built-in default), a
    config.json path, its dict, or an LMConfig (returned as is)."""
    if config is None:
        return moshi.MOSHIKO
    if isinstance(config, moshi.LMConfig):
        return config
    if not isinstance(config, dict):
        with open(config) as fh:
            config = json.load(fh)
    kw = {k: v for k, v in config.items() if k not in _NOT_LM_KWARGS + _DROPPED_LM_KWARGS}
    if "demux_second_stream" in kw:                                  # Kyutai renamed it
        kw["demux_second_text_stream"] = kw.pop("demux_second_stream")
    cond = [k for k in ("conditioners", "fuser") if kw.pop(k, None)]
    if cond:
        warnings.warn(f"LM config declares {' and '.join(cond)}: conditioning is not implemented, "
                      "the model will run unconditioned")
    for key, plain in _UNSUPPORTED_LM_KWARGS.items():
        value = kw.pop(key, None)
        if value not in (plain, None):
            raise ValueError(f"LM config: {key}={value!r} is not supported (only {plain!r})")
    ff = kw.get("depformer_dim_feedforward")
    if isinstance(ff, list):
        if len(set(ff)) != 1:
            raise ValueError(f"LM config: per-step depformer_dim_feedforward {ff} is not supported")
        kw["depformer_dim_feedforward"] = ff[0]
    defaults = {f.name: f.default for f in dataclasses.fields(moshi.LMConfig)}
    for name in _INHERITED_BY_DEPFORMER:
        kw.setdefault("depformer_" + name, kw.get(name, defaults[name]))
    for name in ("delays", "depformer_weights_per_step_schedule"):
        if kw.get(name) is not None:
            kw[name] = tuple(int(v) for v in kw[name])
    unknown = sorted(set(kw) - set(defaults))
    if unknown:
        raise ValueError(f"LM config: unknown keys {unknown}")
    return moshi.LMConfig(**kw)


def lm_config_dict(cfg) -> dict:
    """moshi.LMConfig -> Kyutai lm kwargs (what a config.json holds; `LMModel(**d)` accepts it)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _norm_keys(prefix: str, kind: str, dim: int) -> dict:
    if kind.startswith("rms_norm"):
        return {prefix + "alpha": (1, 1, dim)}
    return {prefix + "weight": (dim,), prefix + "bias": (dim,)}


def lm_keys(cfg) -> dict:
    """On-disk {name: shape} of an LM checkpoint (legacy packed attention, as released)."""
    D, card, text_card = cfg.dim, cfg.card, cfg.text_card
    keys = {f"emb.{k}.weight": (card + 1, D) for k in range(cfg.n_q)}
    keys["text_emb.weight"] = (text_card + 1, D)
    keys["text_linear.weight"] = (cfg.text_card_out or text_card, D)
    keys.update(transformer_keys("transformer.layers.", cfg.temporal))
    keys.update(_norm_keys("out_norm.", cfg.norm, D))
    Dd, rank = cfg.depformer_dim, cfg.depformer_low_rank_embeddings
    keys.update({f"depformer_in.{i}.weight": (Dd, D) for i in range(cfg.depformer.num_input_projs)})
    keys.update({f"extra_heads.{i}.weight": (cfg.extra_heads_dim, D) for i in range(cfg.extra_heads_num_heads)})
    if not cfg.dep_q:
        return keys
    for name, rows in [(f"depformer_emb.{i}.", card + 1) for i in range(cfg.dep_q - 1)] + [("depformer_text_emb.", text_card + 1)]:
        keys[name + "weight"] = (rows, rank or Dd)
        if rank:
            keys[name + "low_rank.weight"] = (Dd, rank)
    keys.update(transformer_keys("depformer.layers.", cfg.depformer.transformer))
    if cfg.depformer_norm is not None:
        for c in range(cfg.dep_q):
            keys.update(_norm_keys(f"depformer_norms.{c}.", cfg.depformer_norm, Dd))
    keys.update({f"linears.{c}.weight": (card, Dd) for c in range(cfg.dep_q)})
    return keys


def _get_norm(t, prefix: str, kind: str):
    if kind.startswith("rms_norm"):
        return {"alpha": t[prefix + "alpha"].reshape(-1)}
    return {"weight": t[prefix + "weight"], "bias": t[prefix + "bias"]}


def _put_norm(out: dict, prefix: str, kind: str, p: dict):
    if kind.startswith("rms_norm"):
        out[prefix + "alpha"] = np.asarray(p["alpha"]).reshape(1, 1, -1)
    else:
        out[prefix + "weight"], out[prefix + "bias"] = np.asarray(p["weight"]), np.asarray(p["bias"])


def _lm_params(t: dict, cfg, cast, stacked: bool = True) -> dict:
    """On-disk tensors -> moshi params (see moshi.init for the layout; stacked=False: the layer
    stacks as lists, see moshi.generation_params)."""
    stack = lambda names: cast(np.stack([np.asarray(t[n]) for n in names]))
    params = {"emb": stack([f"emb.{k}.weight" for k in range(cfg.n_q)]),
              "text_emb": cast(t["text_emb.weight"]),
              "transformer": stack_transformer(t, "transformer.layers.", cfg.temporal, cast, stacked),
              "out_norm": {k: cast(v) for k, v in _get_norm(t, "out_norm.", cfg.norm).items()},
              "text_linear": cast(t["text_linear.weight"])}
    if cfg.extra_heads_num_heads:
        params["extra_heads"] = stack([f"extra_heads.{i}.weight" for i in range(cfg.extra_heads_num_heads)])
    n_in = cfg.depformer.num_input_projs
    dep = {"input_proj": stack([f"depformer_in.{i}.weight" for i in range(n_in)])} if n_in else {}
    if cfg.dep_q:
        K = cfg.dep_q
        dep.update(text_emb=cast(t["depformer_text_emb.weight"]),
                   emb=stack([f"depformer_emb.{i}.weight" for i in range(K - 1)]),
                   transformer=stack_transformer(t, "depformer.layers.", cfg.depformer.transformer, cast, stacked),
                   linears=stack([f"linears.{c}.weight" for c in range(K)]))
        if cfg.depformer_low_rank_embeddings:
            dep["text_emb_low_rank"] = cast(t["depformer_text_emb.low_rank.weight"])
            dep["emb_low_rank"] = stack([f"depformer_emb.{i}.low_rank.weight" for i in range(K - 1)])
        if cfg.depformer_norm is not None:
            norms = [_get_norm(t, f"depformer_norms.{c}.", cfg.depformer_norm) for c in range(K)]
            dep["norms"] = {k: cast(np.stack([np.asarray(n[k]) for n in norms])) for k in norms[0]}
    if dep:
        params["depformer"] = dep
    return params


def _lm_tensors(params: dict, cfg) -> dict:
    """moshi params -> on-disk {name: numpy array} (inverse of _lm_params)."""
    a = np.asarray
    out = {f"emb.{k}.weight": a(params["emb"][k]) for k in range(cfg.n_q)}
    out["text_emb.weight"], out["text_linear.weight"] = a(params["text_emb"]), a(params["text_linear"])
    out.update(unstack_transformer(params["transformer"], "transformer.layers.", cfg.temporal))
    _put_norm(out, "out_norm.", cfg.norm, params["out_norm"])
    for i in range(cfg.extra_heads_num_heads):
        out[f"extra_heads.{i}.weight"] = a(params["extra_heads"][i])
    dep = params.get("depformer", {})
    for i in range(cfg.depformer.num_input_projs):
        out[f"depformer_in.{i}.weight"] = a(dep["input_proj"][i])
    if not cfg.dep_q:
        return out
    out["depformer_text_emb.weight"] = a(dep["text_emb"])
    for i in range(cfg.dep_q - 1):
        out[f"depformer_emb.{i}.weight"] = a(dep["emb"][i])
    if cfg.depformer_low_rank_embeddings:
        out["depformer_text_emb.low_rank.weight"] = a(dep["text_emb_low_rank"])
        for i in range(cfg.dep_q - 1):
            out[f"depformer_emb.{i}.low_rank.weight"] = a(dep["emb_low_rank"][i])
    out.update(unstack_transformer(dep["transformer"], "depformer.layers.", cfg.depformer.transformer))
    for c in range(cfg.dep_q):
        if cfg.depformer_norm is not None:
            _put_norm(out, f"depformer_norms.{c}.", cfg.depformer_norm, {k: v[c] for k, v in dep["norms"].items()})
        out[f"linears.{c}.weight"] = a(dep["linears"][c])
    return out


def load_lm(path, config=None, dtype=None, stacked: bool = True):
    """A Kyutai LM checkpoint -> (params, moshi.LMConfig).

    config: None (moshiko's built-in config, like Kyutai's loader without a config.json), a
    config.json path, its dict, or an LMConfig. dtype: None keeps the file's dtype (bf16 for the
    released models); jnp.float32 etc. casts. Every attention naming Kyutai's loader accepts is
    accepted (packed `in_proj_weight` or `in_proj.weight`, and moshi>=0.2's `in_projs.{i}`). Tensors are read one at a time from a
    memory map; `condition_provider.*` / `fuser.*` tensors are skipped with a warning.
    stacked=False returns the generation layout (see moshi.generation_params) without ever
    holding the stacked copy: what sample.py loads a 7B model with.
    """
    cfg = lm_config(config)
    f = SafeTensorsFile(path)
    tensors = {k: f[k] for k in f.keys()}
    skipped = [k for k in tensors if k.startswith(("condition_provider.", "fuser."))]
    if skipped:
        warnings.warn(f"{path}: ignoring {len(skipped)} conditioner tensors (e.g. {skipped[0]!r}); "
                      "conditioning is not implemented, the model runs unconditioned")
    tensors = {k.replace(".self_attn.in_proj.weight", ".self_attn.in_proj_weight"): v     # a third naming
               for k, v in tensors.items() if k not in skipped}
    dep_sets = cfg.depformer.transformer.num_weight_sets if cfg.dep_q else 1
    tensors = to_disk_attention_names(tensors, lambda name: dep_sets if name.startswith("depformer.") else 1)
    check_keys(lm_keys(cfg), {k: v.shape for k, v in tensors.items()}, f"LM checkpoint {path}")
    cast = lambda x: jnp.asarray(x, dtype=dtype or x.dtype)
    return _lm_params(tensors, cfg, cast, stacked), cfg


def save_lm(path, params, cfg) -> None:
    """moshi params -> a safetensors file in Kyutai's on-disk naming (packed attention), atomically.
    Kyutai's loaders (PyTorch `get_moshi_lm`, MLX, Rust) read it; dtypes are kept."""
    tensors = _lm_tensors(params, cfg)
    check_keys(lm_keys(cfg), {k: v.shape for k, v in tensors.items()}, "save_lm: params")
    save_safetensors(path, tensors, {"format": "pt"})


# ----------------------------------------------------------------------------------------------
# 4. Finding a checkpoint. A Kyutai repo holds the LM, Mimi and the text tokenizer under fixed
# names; an optional config.json describes the LM and may rename the files (`moshi_name`,
# `mimi_name`, `tokenizer_name`, `mimi_config_name`), exactly like the official
# `CheckpointInfo.from_hf_repo`. The repo is a Hugging Face id (downloaded once into the standard
# cache, when huggingface_hub is installed), a local directory laid out the same way, or a single
# LM safetensors file (its folder then plays the repo). Single files can replace the repo's.

DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
MOSHI_NAME = "model.safetensors"   # the default file names in a Kyutai repo (config.json may rename)
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
# How each argument of find_checkpoint reaches us on a command line, so that an error says what to
# change: the flags of Kyutai's own scripts (moshi.server, run_tts), which sample.py keeps.
FLAGS = {"repo": "--hf-repo", "moshi": "--moshi-weight", "mimi": "--mimi-weight", "tokenizer": "--tokenizer",
         "config": "--config"}


@dataclasses.dataclass
class Checkpoint:
    moshi: str                    # path of the LM's safetensors
    mimi: str | None              # path of Mimi's safetensors (None when only the LM was asked for)
    tokenizer: str | None         # path of the sentencepiece model (idem)
    config: dict | None           # config.json without the file names (None: there is none)
    mimi_config: dict | None = None   # the JSON named by `mimi_config_name`, if any (see mimi_config)


def find_checkpoint(repo=None, moshi=None, mimi=None, tokenizer=None, config=None, lm_only=False,
                    flags=None) -> Checkpoint:
    """Resolve every file like the official loader; explicit files win over the repo's.

    repo: a Hugging Face id, a local repo directory, or an LM .safetensors file (with the
    config.json beside it, if any). None means DEFAULT_REPO, except when all the files are given:
    then no repo is consulted and the LM config is `config`'s, or moshiko's. config: a config.json
    to use instead of the repo's. lm_only: resolve the LM alone (what training starts from), not
    Mimi and the tokenizer. flags: {argument: its command-line flag} for the error messages
    (defaults: FLAGS). Problems raise CheckpointError saying what is missing and how to give it.
    """
    flags = dict(FLAGS, **(flags or {}))
    repo = None if repo is None else os.path.expanduser(repo)      # no Hugging Face id starts with ~
    if repo is not None and os.path.isfile(repo):         # one LM file: its folder plays the repo
        moshi, repo = moshi or repo, os.path.dirname(os.path.abspath(repo))
    standalone = repo is None and moshi and (lm_only or (mimi and tokenizer))
    if standalone:                                         # names in `config` are relative to it
        folder = os.path.dirname(os.path.abspath(config)) if config else os.getcwd()
        get = lambda name, optional=False: os.path.join(folder, name)     # noqa: E731
    else:
        get = repo_files(repo or DEFAULT_REPO, flags, lm_only)
    raw = None
    if config:
        raw = _read_json(config, flags["config"])
    elif not standalone:
        path = get("config.json", optional=True)
        raw = _read_json(path, "config.json") if path else None
    lm_config = dict(raw or {})
    names = {"moshi": lm_config.pop("moshi_name", MOSHI_NAME), "mimi": lm_config.pop("mimi_name", MIMI_NAME),
             "tokenizer": lm_config.pop("tokenizer_name", TOKENIZER_NAME)}
    mimi_config_name = lm_config.pop("mimi_config_name", None)
    model_type = lm_config.pop("model_type", "moshi")
    if model_type not in CONVERSATION_MODEL_TYPES:
        raise CheckpointError(f"config.json says model_type={model_type!r}; only conversation models run "
                              f"here (model_type 'moshi': Moshiko, Moshika; 'personaplex': PersonaPlex)")
    for key in _NOT_LM_KWARGS:
        lm_config.pop(key, None)                           # file names and tool settings, not the LM's
    given = {"moshi": moshi} if lm_only else {"moshi": moshi, "mimi": mimi, "tokenizer": tokenizer}
    for what, path in given.items():
        if path is not None and not os.path.isfile(path):
            raise CheckpointError(f"{flags[what]}: no such file {path!r}")
    files = {what: given[what] or get(names[what]) for what in given}
    read_mimi_config = mimi_config_name and not lm_only
    return Checkpoint(files["moshi"], files.get("mimi"), files.get("tokenizer"), lm_config if raw else None,
                      _read_json(get(mimi_config_name), mimi_config_name) if read_mimi_config else None)


# Kyutai's repos say "moshi"; NVIDIA's PersonaPlex repo ships only {"model_type": "personaplex",
# "version": "7b-v1"} (no LM settings: lm_config_for reads the architecture off the checkpoint).
CONVERSATION_MODEL_TYPES = ("moshi", "personaplex")


def repo_files(repo: str, flags=FLAGS, lm_only=False):
    """A function `get(name, optional=False) -> path or None` over a local directory or an HF repo."""
    if os.path.isdir(repo):
        holds = MOSHI_NAME if lm_only else f"{MOSHI_NAME}, {MIMI_NAME} and {TOKENIZER_NAME}"

        def get_local(name, optional=False):
            path = os.path.join(repo, name)
            if os.path.isfile(path):
                return path
            if optional:
                return None
            raise CheckpointError(f"{repo} has no file {name!r} (a Kyutai repo directory holds {holds}, "
                                  f"or config.json naming {'it' if lm_only else 'them'})")
        return get_local
    # A Hugging Face id is `name` or `owner/name`: anything else was meant as a local path.
    if os.path.isabs(repo) or repo.startswith((".", "~")) or repo.count("/") > 1 or repo.endswith(".safetensors"):
        raise CheckpointError(f"{flags['repo']}: no such file or directory {repo!r}")
    try:
        import huggingface_hub
    except ImportError:
        files = "." if lm_only else (f",\n  or pass the files: {flags['moshi']} FILE {flags['mimi']} FILE "
                                     f"{flags['tokenizer']} FILE.")
        raise CheckpointError(
            f"the weights come from the Hugging Face repo {repo!r}, but huggingface_hub is not installed.\n"
            f"  Either `pip install huggingface_hub` (the files are downloaded once, ~16 GB for Moshi),\n"
            f"  or download the repo yourself and pass {flags['repo']} DIR{files}") from None

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:                              # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError

    def get_hub(name, optional=False):
        try:
            return huggingface_hub.hf_hub_download(repo, name)
        except EntryNotFoundError:
            if optional:
                return None
            raise CheckpointError(f"the Hugging Face repo {repo!r} has no file {name!r}") from None
        except Exception as e:                       # offline, gated repo, typo in the id, ...
            raise CheckpointError(
                f"could not get {name!r} from the Hugging Face repo {repo!r}:\n  {type(e).__name__}: {e}\n"
                f"  Check the repo id and your connection (gated repos need `huggingface-cli login`),\n"
                f"  or pass a local copy with {flags['repo']} DIR.") from None
    return get_hub


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} ({path}): {e}") from None


def lm_config_for(ckpt: Checkpoint, log=None):
    """The LM config to load `ckpt.moshi` with (see load_lm): config.json's, or, where the repo has
    none (or one that does not describe the LM, like PersonaPlex's), Kyutai's built-in moshiko config
    with as many depformer outputs as the checkpoint has heads (16 for PersonaPlex, whose own loader
    also ignores config.json). `log(message)`, if given, hears when the heads decide."""
    if ckpt.config and "dim" in ckpt.config:
        return ckpt.config
    heads = sum(1 for k in SafeTensorsFile(ckpt.moshi).keys() if re.fullmatch(r"linears\.\d+\.weight", k))
    if heads and heads != moshi.MOSHIKO.dep_q:
        if log:
            log(f"no LM config: moshiko's, with dep_q={heads} as the checkpoint has {heads} depformer heads")
        return dataclasses.replace(moshi.MOSHIKO, dep_q=heads)
    return None


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
