"""convert.py: Kyutai safetensors checkpoints <-> our param dicts, and model configs.

Everything that knows Kyutai's on-disk key names lives here, so the model files can name things
the way the math reads. The parts, top to bottom:

1. safetensors, read and written by hand: the format is an 8-byte header length, a JSON header
   and raw little-endian tensors. Reading memory-maps the file and hands out one tensor at a time,
   so a 15 GB bf16 checkpoint never sits in RAM twice. Writing is atomic (temp file + rename), by
   `atomic_open` / `atomic_path`, which sample.py, train.py and data.py also write their files with.
2. The key mapping: each model's checkpoint is one table of `Row`s, from which the expected keys,
   loading (`from_disk`) and saving (`to_disk`) are derived; `get_path` / `set_path` / `walk`
   move about our nested params (lora.py and train.py use them too).
3. Mimi: `params, cfg = load_mimi(path, cfg=None)` (fp32 or bf16 files, both attention namings),
   `save_mimi(path, params, cfg)`. This part
   needs only mimi.py and helium.py: copied with them, it loads Mimi's released weights.
4. The LM: `params = load_lm(path, cfg)`, `save_lm(path, params, cfg)` (Kyutai's -q8 int8 files
   load too, for generation), and moshi-finetune's LoRA adapter names. It needs no moshi.py: the
   config (moshi.LMConfig) comes in.

Which files make up a model (a Hugging Face repo, a folder) and what its config.json says is repo.py's.
`python convert.py inspect FILE` lists a checkpoint's tensors without loading them;
`python convert.py mimi IN OUT --weights W` round-trips audio through a Mimi checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import tempfile
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import ml_dtypes                        # ships with jax; it gives numpy a bfloat16
import numpy as np

import mimi

_BF16 = np.dtype(ml_dtypes.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key(s) and the shapes involved."""


# ----------------------------------------------------------------------------------------------
# 1. safetensors

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": _BF16, "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}                  # safetensors' names: numpy's dtypes
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafeTensorsFile:
    """A read-only, memory-mapped safetensors file: `f.keys()`, `f.shape(k)`, `f[k]` (a numpy view)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{self.path}: too short to be a safetensors file")
                n = int.from_bytes(raw, "little")
                if n > 100_000_000:
                    raise CheckpointError(f"{self.path}: not a safetensors file (header length {n})")
                header = json.loads(fh.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read as safetensors ({e})") from e
        entry = {"dtype", "shape", "data_offsets"}
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (its header is not a JSON object)")
        bad = [k for k, v in header.items()
               if k != "__metadata__" and not (isinstance(v, dict) and entry <= set(v))]
        if bad:
            raise CheckpointError(f"{self.path}: not a safetensors file (the entry of {bad[0]!r} "
                                  "is not {dtype, shape, data_offsets})")
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._start = 8 + n
        end = self._start + max((info["data_offsets"][1] for info in header.values()), default=0)
        if os.path.getsize(self.path) < end:
            raise CheckpointError(f"{self.path}: truncated ({os.path.getsize(self.path):,} bytes, the header "
                                  f"describes {end:,}): an interrupted download or copy?")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self):
        return list(self.header)

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
        return self._mmap[self._start + begin: self._start + end].view(dtype).reshape(info["shape"])


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors (numpy or jax arrays) atomically: a crash mid-write leaves the old file intact."""
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    header, offset = {}, 0
    for name, a in arrays.items():
        if a.dtype not in _NAMES:
            raise CheckpointError(f"cannot write {name!r}: unsupported dtype {a.dtype}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                      # keep tensor data 8-byte aligned
    with atomic_open(path) as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        fh.writelines(a.tobytes() for a in arrays.values())


# The files the programs write (checkpoints, token shards, configs, wavs, transcripts) go through
# atomic_path / atomic_open: the data lands in a temporary file beside the target, is fsync'ed, and
# is renamed over the target in one step, so a run killed mid-write leaves the old file whole.
# (audio.py, which imports no project file, has its own few lines for write_audio.)

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
    name (soundfile, ...). Renamed over `path` when the block ends well, removed if it raises. The
    name carries our process id and machine, so that remove_stale_temps can tell a killed run's
    leftovers."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-{_host()}-", suffix=suffix)
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
    with atomic_path(path, os.path.splitext(path)[1]) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


class OutputError(ValueError):
    """An output path that cannot be written: found before any work is done."""


def check_writable(path, what: str, inputs=()) -> None:
    """Fail now, not after the work: `path` must not be a folder, a device or one of the `inputs`
    (the atomic writers rename a new file over it), and its folder must exist and be writable (they
    create their temporary file there)."""
    path = os.path.abspath(path)
    folder, exists = os.path.dirname(path), os.path.exists(path)
    if os.path.isdir(path):
        raise OutputError(f"{what} {path} is a folder, not a file name")
    if exists and not os.path.isfile(path):
        raise OutputError(f"{what} {path} is not a regular file (a device?): give a file name")
    if exists and any(i and os.path.exists(i) and os.path.samefile(path, i) for i in inputs):
        raise OutputError(f"{what} {path} is also an input: give another name")
    if not os.path.isdir(folder):
        raise OutputError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (exists and not os.access(path, os.W_OK)):
        raise OutputError(f"{what} {path}: not writable here (permissions)")


def _host() -> str:
    return socket.gethostname().replace("-", "_")            # "-" separates a temporary name's fields


def remove_stale_temps(folder) -> list:
    """Remove the temporary files (".tmp-<pid>-<host>-...") that a run killed mid-write left in
    `folder`: this machine's whose process is gone (a folder shared with other machines keeps
    theirs: their process ids mean nothing here). Returns their names."""
    removed, here = [], _host()
    for name in os.listdir(folder or "."):
        fields = name.split("-")                                          # .tmp, pid, host, the rest
        if (len(fields) > 3 and fields[0] == ".tmp" and fields[1].isdigit() and fields[2] == here
                and int(fields[1]) != os.getpid() and not _alive(int(fields[1]))):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                      # someone else's live process
        pass
    return True


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
    lines += [f"  key {k!r} has shape {tuple(found[k])}, expected {tuple(expected[k])}"
              for k in misshaped[:20]]
    hidden = sum(max(0, len(keys) - 20) for keys in (missing, unexpected, misshaped))
    if hidden:
        lines.append(f"  ... and {hidden} more")
    raise CheckpointError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# 2. The key mapping. Our params are nested dicts (and lists of layers); a path is the tuple of
# keys down to a leaf. Each model's checkpoint is ONE table of rows, one row per on-disk tensor:
# its name and shape on disk, the leaf of our params it fills, where in that leaf (a leaf may stack
# layers, per-step weight sets or heads: one row per slice), and how its layout differs here.

def get_path(tree, path):
    """tree[path[0]][path[1]]...: a leaf or subtree of nested dicts and lists."""
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree, path, value) -> None:
    """tree[path[0]]...[path[-1]] = value, making the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def walk(tree, stop=lambda d: False, path=()):
    """(path, leaf) of nested dicts, depth first; a dict for which `stop` holds is yielded whole."""
    for k, v in tree.items():
        if isinstance(v, dict) and not stop(v):
            yield from walk(v, stop, path + (k,))
        else:
            yield path + (k,), v


def _as_lists(tree):
    """Dicts keyed 0..n-1 (set_path's, for layer and stage indices) -> lists."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: _as_lists(v) for k, v in tree.items()}
    return [tree[i] for i in range(len(tree))] if all(isinstance(k, int) for k in tree) else tree


class Row(NamedTuple):
    """One tensor of a checkpoint, and where and how it lives in our params."""
    name: str                   # on disk
    shape: tuple                # on disk
    path: tuple | None          # the leaf of our params it fills; None: a codebook buffer we do not keep
    index: tuple = ()           # where in that leaf: () all of it; (i,) or (layer, step) one slice
    ours: tuple | None = None   # the slice's shape here, where the layouts differ by a reshape
    axes: tuple | None = None   # or by this axis permutation, its own inverse (Mimi's convs)
    usage: str | None = None    # a codebook: the cluster_usage buffer that divides embedding_sum
    keep: bool = False          # read in the file's dtype, whatever the model's (int8 and its fp32 scale)


def row_keys(rows) -> dict:
    """{on-disk name: shape}: what check_keys holds a checkpoint to."""
    return {r.name: r.shape for r in rows}


def _to_ours(row: Row, tensors: dict, dtype):
    x = np.asarray(tensors[row.name], None if row.keep else dtype)
    if row.usage:                                                   # fp32, as Kyutai
        x = x / np.maximum(np.asarray(tensors[row.usage], dtype), np.float32(1e-5))[:, None]
    if row.axes:
        x = np.ascontiguousarray(x.transpose(row.axes))
    return x if row.ours is None else x.reshape(row.ours)


def _leaf(rows: list, tensors: dict, dtype):
    first = _to_ours(rows[0], tensors, dtype)
    if not rows[0].index:
        return first
    leaf = np.empty(tuple(np.max([r.index for r in rows], axis=0) + 1) + first.shape, first.dtype)
    leaf[rows[0].index] = first
    for r in rows[1:]:               # one slice at a time into the stacked leaf
        leaf[r.index] = _to_ours(r, tensors, dtype)
    return leaf


def from_disk(rows, tensors: dict, what: str, dtype=None) -> dict:
    """On-disk {name: tensor} -> our params. The names and shapes are checked first (check_keys,
    naming `what`); tensors are read one at a time (as `dtype`, if given, except the rows that
    `keep` theirs), and each leaf, once assembled from its rows, becomes one jax array."""
    check_keys(row_keys(rows), {k: v.shape for k, v in tensors.items()}, what)
    leaves = {}
    for r in rows:
        if r.path is not None:
            leaves.setdefault(r.path, []).append(r)
    params = {}
    for path, group in leaves.items():
        set_path(params, path, jnp.asarray(_leaf(group, tensors, dtype)))
    return _as_lists(params)


def _from_ours(row: Row, params, dtype):
    if row.path is None:       # usage 1 makes embedding_sum the codebook itself, exactly
        return np.ones(row.shape, np.float32)
    x = np.asarray(get_path(params, row.path)[row.index], dtype)
    x = x.transpose(row.axes) if row.axes else x
    return x.reshape(row.shape) if row.ours else x


def to_disk(rows, params, what: str, dtype=None) -> dict:
    """Our params -> {on-disk name: numpy array} (in `dtype`, if given), shapes checked."""
    out = {r.name: _from_ours(r, params, dtype) for r in rows}
    check_keys(row_keys(rows), {k: v.shape for k, v in out.items()}, what)
    return out


# Other namings of the same tensors, renamed to the on-disk one before anything is looked up:
#   moshi >= 0.2's in-memory attention, self_attn.in_projs.{m}.weight [3D, D] per weight set m
#     (and out_projs.{m}.weight [D, D]), packed on disk as in_proj_weight [M*3D, D] (out_proj.weight);
#   the `.in_proj.weight` variant, and older codebook buffer names, which Kyutai's loader renames.
# M is 1 except in the depformer. We always write the on-disk naming, which every Kyutai stack
# (PyTorch, MLX, Rust) reads.
_PACKED = {".self_attn.in_proj_weight": ".self_attn.in_projs.",
           ".self_attn.out_proj.weight": ".self_attn.out_projs."}
_RENAMED = {".self_attn.in_proj.weight": ".self_attn.in_proj_weight",
            "._codebook.inited": "._codebook._initialized",
            "._codebook.cluster_size": "._codebook.cluster_usage",
            "._codebook.embed_avg": "._codebook.embedding_sum",
            "._codebook.embed_sum": "._codebook.embedding_sum"}


def to_disk_names(tensors: dict, num_weight_sets=lambda name: 1) -> dict:
    """{name: tensor} in any naming above -> the on-disk naming. `num_weight_sets(name)` gives M
    for the layer of a packed key. Nothing is read but the per-step projections, concatenated."""
    out, groups = {}, {}
    for name, value in tensors.items():
        for old, new in _RENAMED.items():
            if name.endswith(old):
                name = name.removesuffix(old) + new
        for disk, mem in _PACKED.items():
            if mem in name and name.endswith((".weight", ".weight_scb")):      # _scb: a -q8 scale
                head, tail = name.split(mem)
                suffix = "_scb" if name.endswith("_scb") else ""
                groups.setdefault(head + disk + suffix, {})[int(tail.split(".")[0])] = value
                break
        else:
            out[name] = value
    for name, parts in groups.items():
        M = num_weight_sets(name)
        if sorted(parts) != list(range(M)):
            raise CheckpointError(f"{name}: found per-step projections {sorted(parts)}, expected 0..{M - 1}")
        out[name] = parts[0] if M == 1 else np.concatenate([np.asarray(parts[i]) for i in range(M)])
    return out


def _norm_rows(prefix: str, path: tuple, kind: str, dim: int, index=()) -> list:
    """RMSNorm's alpha ([1, 1, D] on disk, [D] here), or LayerNorm's weight and bias."""
    if kind.startswith("rms_norm"):
        return [Row(prefix + "alpha", (1, 1, dim), path + ("alpha",), index, ours=(dim,))]
    return [Row(prefix + w, (dim,), path + (w,), index) for w in ("weight", "bias")]


def transformer_rows(prefix: str, path: tuple, cfg, stacked: bool = True) -> list:
    """The rows of a helium layer stack (helium.TransformerConfig) at `path` in our params, named
    `{prefix}{layer}.` on disk: Kyutai's StreamingTransformer, for Mimi's two transformers, the
    temporal transformer and the depformer. stacked: leaves [L, ...] (the layout lax.scan runs);
    else a list of per-layer dicts (generation's, and Mimi's), built without a stacked copy."""
    D, M = cfg.d_model, cfg.num_weight_sets
    steps = (M,) if cfg.weights_per_step else ()          # per-step weight sets lead each matrix
    rows = []
    for layer in range(cfg.num_layers):
        at, lead = (path, (layer,)) if stacked else (path + (layer,), ())

        def row(name, shape, leaf, index=(), **kw):
            return Row(f"{prefix}{layer}.{name}", shape, at + leaf, lead + index, **kw)
        rows += [row("self_attn.in_proj_weight", (M * 3 * D, D), ("attn", "in_proj"),
                     ours=steps + (3 * D, D)),
                 row("self_attn.out_proj.weight", (M * D, D), ("attn", "out_proj"), ours=steps + (D, D))]
        for i in (1, 2):
            rows += _norm_rows(f"{prefix}{layer}.norm{i}.", at + (f"norm{i}",), cfg.norm, D, lead)
        if cfg.gating == "none":
            F = cfg.dim_feedforward
            rows += [row("linear1.weight", (F, D), ("mlp", "linear1")),
                     row("linear2.weight", (D, F), ("mlp", "linear2"))]
        else:
            Hd = cfg.gating_hidden
            for gate, index in [(f"gating.{m}.", (m,)) for m in range(M)] if steps else [("gating.", ())]:
                rows += [row(gate + "linear_in.weight", (2 * Hd, D), ("mlp", "linear_in"), index),
                         row(gate + "linear_out.weight", (D, Hd), ("mlp", "linear_out"), index)]
        if cfg.layer_scale is not None:
            rows += [row(f"layer_scale_{i}.scale", (D,), (f"layer_scale_{i}",)) for i in (1, 2)]
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Mimi (mimi.py)
#
# Kyutai names SEANet convs by their index in an nn.Sequential: stage i of the encoder holds
# n_res residual blocks, an ELU and the strided conv; the decoder puts the ELU and the transposed
# conv first. So with one residual block per stage, a stage is 3 slots and the indices below follow.
# The quantizer ships EMA buffers, not codebooks: codebook = embedding_sum / max(cluster_usage, 1e-5).

def _mimi_conv_names(cfg) -> dict:
    """{Kyutai module name: path into mimi params (and into mimi's layout)} for every conv."""
    per_stage = cfg.n_residual_layers + 2
    last = 2 + len(cfg.ratios) * per_stage              # after the final ELU
    names = {"downsample.conv.conv.conv": ("downsample",), "upsample.convtr.convtr.convtr": ("upsample",)}
    for side in ("encoder", "decoder"):
        names[f"{side}.model.0.conv.conv"] = (side, "conv_in")
        names[f"{side}.model.{last}.conv.conv"] = (side, "conv_out")
    for i in range(len(cfg.ratios)):
        base = 1 + i * per_stage
        for j in range(cfg.n_residual_layers):
            for side, index in (("encoder", base + j), ("decoder", base + 2 + j)):
                names[f"{side}.model.{index}.block.1.conv.conv"] = (side, "stages", i, "res", j, "conv1")
                names[f"{side}.model.{index}.block.3.conv.conv"] = (side, "stages", i, "res", j, "conv2")
        names[f"encoder.model.{base + per_stage - 1}.conv.conv"] = ("encoder", "stages", i, "down")
        names[f"decoder.model.{base + 1}.convtr.convtr"] = ("decoder", "stages", i, "up")
    return names


def _mimi_rows(cfg) -> list:
    layout = {"encoder": mimi.encoder_layout(cfg), "decoder": mimi.decoder_layout(cfg),
              "downsample": mimi.downsample_layout(cfg), "upsample": mimi.upsample_layout(cfg)}
    rows = []
    for name, path in _mimi_conv_names(cfg).items():
        spec = get_path(layout, path)
        # PyTorch: Conv1d (out, in/groups, k); ConvTranspose1d (in, out/groups, k). mimi.py stores
        # (k, in/groups, out) and (in, k, out/groups): the layouts XLA's CPU kernels read directly.
        axes = (0, 2, 1) if spec.transposed else (2, 1, 0)
        leaf = path + ("w",) if spec.bias else path     # a conv {"w", "b"}; the resamplers are a bare weight
        rows.append(Row(name + ".weight", tuple(spec.weight_shape[a] for a in axes), leaf, axes=axes))
        if spec.bias:
            rows.append(Row(name + ".bias", (spec.cout,), path + ("b",)))
    D, d, bins = cfg.dimension, cfg.codebook_dim, cfg.codebook_size
    for rvq, ours, n in (("rvq_first", "semantic", cfg.num_semantic),
                         ("rvq_rest", "acoustic", cfg.num_quantizers - cfg.num_semantic)):
        q, pre = ("quantizer", ours), f"quantizer.{rvq}."
        rows += [Row(pre + "input_proj.weight", (d, D, 1), q + ("input_proj",), ours=(d, D)),
                 Row(pre + "output_proj.weight", (D, d, 1), q + ("output_proj",), ours=(D, d))]
        for level in range(n):
            cb = f"{pre}vq.layers.{level}._codebook."
            rows += [Row(cb + "embedding_sum", (bins, d), q + ("codebooks",), (level,),
                         usage=cb + "cluster_usage"),
                     Row(cb + "cluster_usage", (bins,), None), Row(cb + "_initialized", (1,), None)]
    for side in ("encoder", "decoder"):     # mimi keeps the layers as a list (see mimi.transformer_step)
        rows += transformer_rows(f"{side}_transformer.transformer.layers.", (f"{side}_transformer",),
                                 cfg.transformer, stacked=False)
    return rows


def load_mimi(path, cfg=None):
    """A Kyutai Mimi checkpoint -> (params, mimi.MimiConfig). Params are float32 whatever the file
    holds (fp32 or bf16): Kyutai never runs Mimi in lower precision.

    cfg: None uses the config saved by `save_mimi` if the file has one, else Kyutai's released
    Mimi. Every naming of to_disk_names is accepted. Tensors are read one at a time from a memory map.
    """
    f = SafeTensorsFile(path)
    if cfg is None and "mimi_config" in f.metadata:
        try:
            cfg = mimi.MimiConfig(**json.loads(f.metadata["mimi_config"]))     # it makes the ratios a tuple
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad mimi_config metadata ({e})") from e
    cfg = cfg or mimi.MimiConfig()
    tensors = to_disk_names({k: f[k] for k in f.keys()})
    return from_disk(_mimi_rows(cfg), tensors, f"Mimi checkpoint {path}", dtype=np.float32), cfg


def save_mimi(path, params, cfg) -> None:
    """mimi params -> a safetensors file in Kyutai's on-disk naming (fp32), atomically. Kyutai's
    `get_mimi` loads it; the config goes into the metadata so `load_mimi(path)` finds it again."""
    tensors = to_disk(_mimi_rows(cfg), params, "save_mimi: params", np.float32)
    save_safetensors(path, tensors, {"format": "pt", "mimi_config": json.dumps(dataclasses.asdict(cfg))})


# ----------------------------------------------------------------------------------------------
# 4. The LM (moshi.py, depformer.py): its configs (moshi.LMConfig) come from repo.lm_config.

def _lm_rows(cfg, stacked: bool = True) -> list:
    """The rows of an LM checkpoint (legacy packed attention, as released) for moshi.init's params;
    stacked=False: the layer stacks as lists (see moshi.generation_params)."""
    D, Dd, card, text_card, K = cfg.dim, cfg.depformer_dim, cfg.card, cfg.text_card, cfg.dep_q
    rows = [Row(f"emb.{k}.weight", (card + 1, D), ("emb",), (k,)) for k in range(cfg.n_q)]
    rows += [Row("text_emb.weight", (text_card + 1, D), ("text_emb",)),
             Row("text_linear.weight", (cfg.text_card_out or text_card, D), ("text_linear",))]
    rows += transformer_rows("transformer.layers.", ("transformer",), cfg.temporal, stacked)
    rows += _ttt_rows(cfg, stacked)
    rows += _norm_rows("out_norm.", ("out_norm",), cfg.norm, D)
    rows += [Row(f"extra_heads.{i}.weight", (cfg.extra_heads_dim, D), ("extra_heads",), (i,))
             for i in range(cfg.extra_heads_num_heads)]
    rows += [Row(f"depformer_in.{i}.weight", (Dd, D), ("depformer", "input_proj"), (i,))
             for i in range(cfg.depformer.num_input_projs)]
    if not K:
        return rows
    rank = cfg.depformer_low_rank_embeddings
    tables = [(f"depformer_emb.{i}.", "emb", card + 1, (i,)) for i in range(K - 1)]
    for name, leaf, n, index in tables + [("depformer_text_emb.", "text_emb", text_card + 1, ())]:
        rows.append(Row(name + "weight", (n, rank or Dd), ("depformer", leaf), index))
        if rank:                                  # low-rank tables, projected up to the depformer's width
            rows.append(Row(name + "low_rank.weight", (Dd, rank), ("depformer", leaf + "_low_rank"), index))
    rows += transformer_rows("depformer.layers.", ("depformer", "transformer"), cfg.depformer.transformer,
                             stacked)
    for c in range(K if cfg.depformer_norm is not None else 0):
        rows += _norm_rows(f"depformer_norms.{c}.", ("depformer", "norms"), cfg.depformer_norm, Dd, (c,))
    return rows + [Row(f"linears.{c}.weight", (card, Dd), ("depformer", "linears"), (c,)) for c in range(K)]


def _ttt_rows(cfg, stacked: bool) -> list:
    """TTT layers' own weights (ours: no Kyutai checkpoint has them), named after the official
    In-Place TTT modules inside the layer's MLP (Kyutai's `gating`): the depthwise conv as torch's
    Conv1d weight [D, 1, K], and P."""
    rows, D = [], cfg.dim
    for n, layer in enumerate(cfg.ttt.layers if cfg.ttt else ()):
        at, index = (("ttt",), (n,)) if stacked else (("ttt", n), ())
        pre = f"transformer.layers.{layer}.gating."
        rows.append(Row(pre + "ttt_conv.weight", (D, 1, cfg.ttt.kernel_size), at + ("conv",), index,
                        ours=(D, cfg.ttt.kernel_size)))
        if cfg.ttt.use_proj:
            rows.append(Row(pre + "ttt_proj.weight", (D, D), at + ("proj",), index))
    return rows


def lm_keys(cfg) -> dict:
    """On-disk {name: shape} of an LM checkpoint (legacy packed attention, as released)."""
    return row_keys(_lm_rows(cfg))


# Kyutai's -q8 checkpoints (kyutai/moshiko-pytorch-q8's model.q8.safetensors, config.json "quantize":
# true) hold every nn.Linear of the LM as bitsandbytes int8: `weight` int8 [out, in] and `weight_scb`
# fp32 [out], each row's absmax, so W = weight * weight_scb / 127 (bitsandbytes' int8_vectorwise_quant).
# That is helium's int8 weight with scale = weight_scb / 127: each such matrix and its absmax load
# into {"int8", "scale"} (load_lm divides the absmax vectors), nothing rounded again. Embedding
# tables and norms stay floats, in the model's dtype.

def _int8_rows(rows, tensors) -> list:
    out = []
    for r in rows:
        if r.name + "_scb" not in tensors:
            out.append(r)
            continue
        scale_shape = r.ours[:-1] if r.ours else None
        out += [r._replace(path=r.path + ("int8",), keep=True),
                Row(r.name + "_scb", r.shape[:-1], r.path + ("scale",), r.index, scale_shape, keep=True)]
    return out


def load_lm(path, cfg, dtype=None, stacked: bool = True, lora=None, int8: bool = False):
    """A Kyutai LM checkpoint and its moshi.LMConfig (repo.lm_config reads a config.json; moshi.MOSHIKO
    is what Kyutai's loader assumes without one) -> params. dtype: None keeps the file's dtype (bf16
    for the released models); jnp.float32 etc. casts. Every naming of to_disk_names is accepted. Tensors are
    read one at a time from a memory map; `condition_provider.*` / `fuser.*` tensors are skipped with
    a warning. stacked=False returns the generation layout (see moshi.generation_params) without ever
    holding the stacked copy: what sample.py loads a 7B model with. lora: (path, rank, scaling) of
    moshi-finetune adapters to merge in (merge_lora). int8: a -q8 checkpoint is accepted (see
    _int8_rows), for generation: its matrices come as helium's int8 weights.
    """
    f = SafeTensorsFile(path)
    skipped = [k for k in f.keys() if k.startswith(("condition_provider.", "fuser."))]
    if skipped:
        warnings.warn(f"{path}: ignoring {len(skipped)} conditioner tensors (e.g. {skipped[0]!r}); "
                      "conditioning is not implemented, the model runs unconditioned")
    dep_sets = cfg.depformer.transformer.num_weight_sets if cfg.dep_q else 1
    tensors = to_disk_names({k: f[k] for k in f.keys() if k not in skipped},
                            lambda name: dep_sets if name.startswith("depformer.") else 1)
    rows = _lm_rows(cfg, stacked)
    if any(k.endswith("_scb") for k in tensors):
        if not int8 or lora:
            raise CheckpointError(f"{path}: a bitsandbytes int8 checkpoint (a -q8 repo), which sample.py "
                                  f"runs (without LoRA); to {'merge LoRA' if lora else 'train'}, "
                                  "take the bf16 one")
        rows = _int8_rows(rows, tensors)
        tensors.update({k: np.asarray(v, np.float32) / np.float32(127)             # absmax -> scale
                        for k, v in tensors.items() if k.endswith("_scb")})
    if lora:
        tensors = merge_lora(tensors, *lora)
    return from_disk(rows, tensors, f"LM checkpoint {path}", dtype)


def save_lm(path, params, cfg) -> None:
    """moshi params (either layout) -> a safetensors file in Kyutai's on-disk naming (packed
    attention), atomically. Kyutai's loaders (PyTorch `get_moshi_lm`, MLX, Rust) read it; dtypes are kept."""
    rows = _lm_rows(cfg, stacked=not isinstance(params["transformer"], list))
    save_safetensors(path, to_disk(rows, params, "save_lm: params"), {"format": "pt"})


# moshi-finetune saves LoRA adapters under PyTorch module names (moshi.modules.lora.LoRALinear):
# `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]. The modules are the LM's
# linear layers, so the names come from the LM's rows: a row's name less ".weight", except that a
# packed attention row is the in-memory modules `self_attn.in_projs.{m}` of its M weight sets.

def lora_modules(cfg) -> dict:
    """{path of a weight in moshi.init's params: [(index into it, module name)]}, for every LM
    weight (lora.targets picks those LoRA adapts)."""
    out = {}
    for r in _lm_rows(cfg):
        disk = next((disk for disk in _PACKED if r.name.endswith(disk)), None)
        if disk:
            base = r.name.removesuffix(disk) + _PACKED[disk]
            steps = r.ours[:-2]                                       # (M,) with per-step weights, else ()
            modules = ([(r.index + (m,), f"{base}{m}") for m in range(steps[0])] if steps
                       else [(r.index, base + "0")])
        elif r.name.endswith(".weight"):
            modules = [(r.index, r.name.removesuffix(".weight"))]
        else:
            continue
        out.setdefault(r.path, []).extend(modules)
    return out


def lora_tensors(lora, cfg, params=None, whole=()) -> dict:
    """Our LoRA tree ({"a" [.., r, in], "b" [.., out, r]} at each adapted weight's path; host
    arrays) -> {moshi-finetune name: array}; with the weights at paths `whole` of params, which a
    LoRA run trained in full, in Kyutai's names beside them (as moshi-finetune saves them)."""
    modules = lora_modules(cfg)
    tensors = {f"{module}.lora_{path[-1].upper()}.weight": np.asarray(x[index])
               for path, x in walk(lora) for index, module in modules[path[:-1]]}   # path ends in "a" or "b"
    return tensors | to_disk([r for r in _lm_rows(cfg) if r.path in whole], params, "lora_tensors")


def merge_lora(tensors: dict, path, rank: int, scaling: float) -> dict:
    """On-disk LM tensors + moshi-finetune's adapters at `path` -> W + scaling * B @ A (in fp32, then
    in W's dtype), as Kyutai's loader fuses them. A packed attention weight [M * n, D] takes weight
    set m's rows from the adapters of `...self_attn.in_projs.{m}`. Weights saved whole beside the
    adapters (the embedding tables, with moshi-finetune's ft_embed; an adapted weight as its
    LoRALinear names it, `<module>.frozen_W.weight`) replace the base's, as Kyutai's loader loads
    them over it, before the adapters merge."""
    adapters, out = SafeTensorsFile(path), dict(tensors)
    modules = sorted(k.removesuffix(".lora_A.weight") for k in adapters.keys() if k.endswith("lora_A.weight"))
    whole = sorted(set(adapters.keys()) - {f"{m}.lora_{x}.weight" for m in modules for x in "AB"})
    if not modules or any(f"{m}.lora_B.weight" not in adapters.header for m in modules):
        raise CheckpointError(f"{path}: not LoRA adapters (want <module>.lora_A.weight, .lora_B.weight)")
    for name in whole:
        key = name.replace(".frozen_W.", ".")
        if key not in out or out[key].shape != adapters.shape(name):
            have = f", the LM's is {out[key].shape}" if key in out else ": the LM has no such weight"
            raise CheckpointError(f"{path}: {name} {adapters.shape(name)}{have}")
        out[key] = np.asarray(adapters[name]).astype(out[key].dtype)
    for module in modules:
        a, b = (np.asarray(adapters[f"{module}.lora_{x}.weight"], np.float32) for x in "AB")
        if a.shape[0] != rank or b.shape[1:] != (rank,):
            raise CheckpointError(f"{path}: {module} has rank {a.shape[0]}, config.json says {rank}")
        key, rows = module + ".weight", slice(None)
        for disk, mem in _PACKED.items():
            if mem in module:
                head, m = module.split(mem)
                key, rows = head + disk, slice(int(m) * len(b), (int(m) + 1) * len(b))
        if key not in out or out[key][rows].shape != (len(b), a.shape[1]):
            have = "no such weight" if key not in out else f"its weight is {out[key][rows].shape}"
            raise CheckpointError(f"{path}: {module} adapters make a [{len(b)}, {a.shape[1]}] update, {have}")
        merged = np.array(out[key], np.float32)
        merged[rows] += scaling * b @ a
        out[key] = merged.astype(out[key].dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Command line: inspect a checkpoint; round-trip audio through Mimi's released weights (mimi.py
# itself imports nothing but helium.py, so its real-weights command lives here).

def inspect(path) -> None:
    f = SafeTensorsFile(path)
    for k in f.keys():
        print(f"{k}\t{f.shape(k)}\t{f.dtype_name(k)}")
    print(f"# {len(f.keys())} tensors, {sum(math.prod(f.shape(k)) for k in f.keys()):,} elements")


def mimi_round_trip(args) -> None:
    """audio in (any rate and channels: resampled to 24 kHz, mixed to mono) -> codes -> audio out."""
    import audio                     # audio files: the command line's, not the Mimi loader's (mimi + helium)
    for path, what in ((args.output, "output"), (args.codes, "--codes")):
        if path:
            check_writable(path, what, (args.input, args.weights))   # before an hour of audio is encoded
    params, cfg = load_mimi(args.weights)
    mimi._check_codebooks(cfg, args.num_codebooks)
    wav = audio.mix_down(audio.read_audio(args.input, cfg.sample_rate))[None]               # [1, 1, S]
    S, K = wav.shape[-1], args.num_codebooks
    if args.stream:
        enc, dec, steps = mimi.encoder_state(cfg, 1), mimi.decoder_state(cfg, 1), []
        for frame in audio.frames_of([wav[0, 0]], S, cfg.frame_size):                     # [frame_size]
            enc, c = mimi.encode_step(params, cfg, enc, jnp.asarray(frame)[None, None], K)
            dec, pcm = mimi.decode_step(params, cfg, dec, c)
            steps.append((np.asarray(c), np.asarray(pcm)))
        codes, out = (np.concatenate(parts, -1) for parts in zip(*steps))
    else:
        codes = np.asarray(mimi.encode(params, cfg, jnp.asarray(wav), K))
        out = np.asarray(mimi.decode(params, cfg, codes))
    if args.codes:
        with atomic_open(args.codes) as f:
            np.save(f, codes.astype(np.int32))
    audio.write_audio(args.output, out[0, :, :S], cfg.sample_rate)
    print(f"{S / cfg.sample_rate:.2f} s of audio -> codes {tuple(codes.shape)} -> {args.output}"
          f"{' (streaming)' if args.stream else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inspect", help="list the tensors of a safetensors file").add_argument("file")
    p = sub.add_parser("mimi", help=mimi_round_trip.__doc__,
                       epilog="example: python convert.py mimi talk.wav talk_mimi.wav "
                       "--weights tokenizer-e351c8d8-checkpoint125.safetensors --codes talk.npy")
    p.add_argument("input", help="audio file to encode")
    p.add_argument("output", help="where to write the decoded audio (24 kHz mono)")
    p.add_argument("--weights", required=True,
                   help="Mimi checkpoint, e.g. tokenizer-e351c8d8-checkpoint125.safetensors")
    p.add_argument("--num-codebooks", type=int, default=8, help="codebooks to use (1-32; Moshi uses 8)")
    p.add_argument("--codes", help="also save the codes, int32 [1, K, frames], to this .npy file")
    p.add_argument("--stream", action="store_true",
                   help="run frame by frame (80 ms) through the streaming API")
    args = ap.parse_args(argv)
    try:
        inspect(args.file) if args.cmd == "inspect" else mimi_round_trip(args)
    except ValueError as e:                          # CheckpointError, AudioError, OutputError: they name it
        raise SystemExit(f"convert.py: {e}")


if __name__ == "__main__":
    main()
