"""train.py: fine-tune (or train) Moshi on a dp x fsdp mesh, from moshi-finetune's data format.

    python train.py prepare --manifest data.jsonl --tokenizer tokenizer_spm_32k_3.model \\
        --mimi tokenizer-e351c8d8-checkpoint125.safetensors --duration-sec 100 --out prepared/
    python train.py --data prepared/ --init-from ~/moshiko-pytorch-bf16 --lora-rank 128 \\
        --mesh dp=4,fsdp=8 --batch-size 32 --max-steps 2000 --run-dir runs/my-run

The data side lives in data.py: `prepare` (run by the first command) encodes moshi-finetune's
dataset once into token arrays [17, frames] (text, Moshi's 8 codebooks, the user's 8), and
`data.TokenWindows` / `data.window_ids` cut fixed windows from them in a shuffled, resumable order.
This file is the training program: each step reads a batch of windows [B, 17, T], runs
moshi.forward and the loss under `jax.shard_map` on a (dp, fsdp) device mesh, one process per host,
and updates the weights (or LoRA adapters) with AdamW. The sections, top to bottom: 1. the loss
and LoRA, 2. sharding, 3. the train step, 4. checkpoints, 5. the training loop, export and the CLI.

Reference: kyutai-labs/moshi-finetune (finetune/loss.py, train.py, args.py, moshi/modules/lora.py).
Run `python train.py --help` / `python train.py prepare --help` / `python train.py export --help`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import convert
import data
import moshi
import repo


# ----------------------------------------------------------------------------------------------
# 1. The loss, as moshi-finetune defines it: cross-entropy in fp32 on the text stream and on
# Moshi's dep_q audio codebooks, each averaged with its own weights and then added. Weights: 0 where
# the model's mask says "no valid target" (IGNORE targets, the delay's edge), `text_padding_weight`
# on PAD/EPAD text targets, `first_codebook_weight` on the semantic codebook. The averages run over
# the whole global batch (sums are psum'ed over the mesh), so the loss does not depend on how the
# batch is split across devices.

def weighted_ce_sums(logits, targets, mask, weights):
    """logits [..., V] (any float dtype), int targets, mask, weights [...] -> (sum of weight * CE,
    sum of weight), in fp32. Masked positions may hold NaN logits (the official forward fills them
    with NaN): they are replaced before the CE so no NaN reaches the gradient."""
    logits = jnp.where(mask[..., None], logits, 0).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    weights = jnp.where(mask, weights, 0.0)
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights), jnp.sum(weights)


def loss_sums(out, codes, text_padding_weight, first_codebook_weight, padding_ids):
    """moshi.forward output + codes [B, 17, T] -> the four sums the loss is made of."""
    dep_q = out["logits"].shape[1]
    text_target, audio_target = codes[:, :1], codes[:, 1:1 + dep_q]           # [B, 1, T], [B, dep_q, T]
    is_padding = jnp.isin(text_target, jnp.asarray(padding_ids))
    text_w = jnp.where(is_padding, text_padding_weight, 1.0)
    audio_w = jnp.where(jnp.arange(dep_q) == 0, first_codebook_weight, 1.0)[None, :, None]   # (dep_q may be 0)
    text_num, text_den = weighted_ce_sums(out["text_logits"], text_target, out["text_mask"], text_w)
    audio_num, audio_den = weighted_ce_sums(out["logits"], audio_target, out["mask"],
                                            jnp.broadcast_to(audio_w, audio_target.shape))
    return jnp.stack([text_num, text_den, audio_num, audio_den])


def loss_from_sums(sums):
    """[4] (possibly psum'ed over devices) -> (loss, text loss, audio loss). An all-ignored stream
    contributes 0 instead of 0/0."""
    text = sums[0] / jnp.maximum(sums[1], 1e-9)
    audio = sums[2] / jnp.maximum(sums[3], 1e-9)
    return text + audio, text, audio


# ----------------------------------------------------------------------------------------------
# LoRA, as in moshi-finetune (moshi/modules/lora.py): every linear weight W [..., out, in] gets
# A [..., r, in] and B [..., out, r] and acts as W + scaling * B @ A, `scaling` being the plain
# multiplier (2.0 in their examples, not alpha / r). A starts kaiming-uniform (torch's default for
# nn.Linear: U(-1/sqrt(in), 1/sqrt(in))), B at zero, so training starts from the base model.
# Embeddings and norms get none. Only A and B are trained; the base stays frozen in bf16.

def is_layer_stack(tree) -> bool:
    """A helium layer stack: a dict with 'attn' and 'mlp' whose leaves have a leading layer axis."""
    return isinstance(tree, dict) and "attn" in tree and "mlp" in tree


def inside_stack(tree, path) -> bool:
    return any(is_layer_stack(convert.get_path(tree, path[:i])) for i in range(len(path)))


def adapters(lora):
    """(path, {"a", "b"}) of every adapter of a LoRA tree (or of None: none)."""
    return convert.walk(lora or {}, lambda d: set(d) == {"a", "b"})


EMBEDDING_TABLES = ("emb", "text_emb")       # lookups, not matmuls: no LoRA (as in Kyutai)


def lora_targets(params) -> dict:
    """{path: W} of every linear weight, as Kyutai's LoRA replaces every nn.Linear: the matrices of
    the layer stacks ([L, (steps,) out, in]) and the heads and projections outside them (the
    depformer's low-rank embedding projections included); not embedding tables, not norms."""
    out = {}
    for path, w in convert.walk(params):
        is_norm = any("norm" in k for k in path)           # the depformer's per-step norms are 2-D too
        plain = w.ndim >= 2 and path[-1] not in EMBEDDING_TABLES and not is_norm
        if (w.ndim >= 3) if inside_stack(params, path) else plain:
            out[path] = w
    return out


def init_lora(key, params, rank: int) -> dict:
    """A nested dict mirroring params, with {"a", "b"} (fp32) at every LoRA target."""
    lora = {}
    targets = sorted(lora_targets(params).items())
    for k, (path, w) in zip(jax.random.split(key, len(targets)), targets):
        *lead, n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(k, (*lead, rank, n_in), jnp.float32, -bound, bound)
        convert.set_path(lora, path, {"a": a, "b": jnp.zeros((*lead, n_out, rank), jnp.float32)})
    return lora


def merge_lora(w, ab, scaling: float):
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    delta = jnp.einsum("...or,...ri->...oi", ab["b"].astype(jnp.float32), ab["a"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scaling * delta).astype(w.dtype)


def merged_params(params, lora, scaling: float):
    """The full weights a LoRA run stands for (what export writes)."""
    out = jax.tree.map(lambda x: x, params)                      # a copy of the containers
    for path, ab in adapters(lora):
        convert.set_path(out, path, merge_lora(convert.get_path(params, path), ab, scaling))
    return out


# ----------------------------------------------------------------------------------------------
# 2. Sharding. The mesh has two axes: `dp` (replicas that each see different data) and `fsdp`
# (devices that split every large weight between them and also see different data). Each weight
# matrix lives as 1/fsdp of its rows on each fsdp device (fp32 master weights and Adam moments
# alike); inside the step a layer's full weights are all-gathered just before the layer runs (the
# `layer_hook` that helium's layer scan calls) and dropped right after, and the backward pass
# re-gathers them (the layer body is rematerialised, and jax.checkpoint saves no all_gather).
# The gradient of all_gather is a reduce-scatter, and a weight that is the same on every dp replica
# gets its gradient summed over dp by autodiff itself (shard_map with check_vma): we add no manual
# reduction. See jax_anchors.md 2.4 for the double-counting trap this avoids.

AXES = ("dp", "fsdp")
BATCH_SPEC = P(None, AXES)                # [microbatches, batch, 17, T]: batch split over both axes


def parse_mesh(text: str) -> dict:
    """'dp=4,fsdp=8' -> {'dp': 4, 'fsdp': 8} (a missing axis is 1)."""
    sizes = {"dp": 1, "fsdp": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: want e.g. dp=4,fsdp=8 (axes dp and fsdp, positive sizes)")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(dp: int, fsdp: int):
    devices = jax.devices()
    if dp * fsdp > len(devices):
        raise ValueError(f"mesh dp={dp} x fsdp={fsdp} needs {dp * fsdp} devices, {len(devices)} available")
    # make_mesh gives Explicit axes (jax >= 0.9): inputs are device_put to their specs before use
    return jax.make_mesh((dp, fsdp), AXES, devices=devices[:dp * fsdp])


def split_spec(ndim: int, axis: int):
    """A PartitionSpec splitting `axis` (negative: from the end) over fsdp."""
    return P(*[("fsdp" if a == axis % ndim else None) for a in range(ndim)])


def param_specs(params, fsdp: int, in_layer_stack: bool = False, path=()):
    """A tree of PartitionSpecs matching params (arrays or ShapeDtypeStructs): which axis of a
    weight is split over fsdp. Layer weights [L, (steps,) out, in]: `out` (the rule the layer hook
    applies); other matrices: their largest axis that fsdp divides; vectors, norms and scalars are
    replicated."""
    if isinstance(params, dict):
        inside = in_layer_stack or is_layer_stack(params)
        return {k: param_specs(v, fsdp, inside, path + (k,)) for k, v in params.items()}
    shape = params.shape
    if in_layer_stack:
        if len(shape) < 3:
            return P()
        if shape[-2] % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the output dim of {'.'.join(path)} {shape}")
        return split_spec(len(shape), -2)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]) if len(shape) >= 2 else ():
        if shape[axis] % fsdp == 0:
            return split_spec(len(shape), axis)
    return P()


def gather(x, spec):
    """Inside shard_map: the whole weight from this device's fsdp shard."""
    for axis, name in enumerate(spec):
        if name == "fsdp":
            return jax.lax.all_gather(x, "fsdp", axis=axis, tiled=True)
    return x


def adapter_specs(lora, fsdp: int):
    """LoRA adapters are split too: A [.., r, in] along `in`, B [.., out, r] along `out` (at rank 128
    moshiko's adapters are 0.4 B parameters: worth 1/fsdp of their fp32 + Adam state per device).
    In layer stacks the hook gathers them by that rule, so fsdp must divide; elsewhere an adapter
    it does not divide is replicated."""
    specs = {}
    for path, ab in adapters(lora):
        spec = {}
        for name, axis in (("a", -1), ("b", -2)):
            shape = ab[name].shape
            if shape[axis] % fsdp == 0:
                spec[name] = split_spec(len(shape), axis)
            elif inside_stack(lora, path):
                raise ValueError(f"fsdp={fsdp} does not divide dim {axis} of LoRA {name.upper()} of "
                                 f"{'.'.join(path)} {shape}")
            else:
                spec[name] = P()
        convert.set_path(specs, path, spec)
    return specs


def layer_hook(layer, lora_scaling: float = 1.0):
    """Called by helium's layer scan on one layer's weights (leading layer axis gone): gather each
    matrix over fsdp, then its LoRA adapters if the layer carries them (under "lora"), and merge."""
    lora = layer.get("lora")
    layer = {k: v for k, v in layer.items() if k != "lora"}
    gather_rows = lambda w: jax.lax.all_gather(w, "fsdp", axis=w.ndim - 2, tiled=True)   # noqa: E731
    layer = jax.tree.map(lambda w: gather_rows(w) if w.ndim >= 2 else w, layer)
    for path, ab in adapters(lora):
        a = jax.lax.all_gather(ab["a"], "fsdp", axis=ab["a"].ndim - 1, tiled=True)         # [.., r, in]
        merged = merge_lora(convert.get_path(layer, path), {"a": a, "b": gather_rows(ab["b"])}, lora_scaling)
        convert.set_path(layer, path, merged)
    return layer


def lora_by_step(lora, cfg):
    """With a depformer weight schedule, depformer.forward picks each step's weight set
    (helium.select_step_weights) before the layer hook merges LoRA into it: pick the adapters of
    the depformer's layers the same way, [L, sets, ...] -> [L, steps, ...]. A set shared by several
    steps gets the sum of their gradients, through the indexing, as its weights do."""
    schedule = cfg.depformer_weights_per_step_schedule
    stack = (lora or {}).get("depformer", {}).get("transformer")
    if schedule is None or stack is None:
        return lora
    pick = np.asarray(schedule)
    return dict(lora, depformer=dict(lora["depformer"], transformer=jax.tree.map(lambda a: a[:, pick], stack)))


def model_view(params, specs, lora, lora_specs, lora_scaling: float, dtype):
    """Inside shard_map: the params moshi.forward gets. Weights outside the layer stacks are cast
    to the compute dtype, gathered whole and LoRA-merged here (embeddings, heads: used once per
    step); layer stacks are only cast, and carry their adapters under "lora", for the layer hook."""
    def view(p, s, l, ls):
        if is_layer_stack(p):
            p = jax.tree.map(lambda x: x.astype(dtype), p)
            return dict(p, lora=l) if l else p
        if isinstance(p, dict):
            return {k: view(v, s[k], (l or {}).get(k), (ls or {}).get(k)) for k, v in p.items()}
        w = gather(p.astype(dtype), s)
        return merge_lora(w, {k: gather(l[k], ls[k]) for k in "ab"}, lora_scaling) if l else w
    return view(params, specs, lora, lora_specs)


# ----------------------------------------------------------------------------------------------
# 3. The train step. Inside shard_map each device: casts its fp32 shards to the compute dtype,
# runs moshi.forward on its slice of the batch (layers gathered on use), and differentiates the
# global loss with respect to its own shards. Micro-batches are a lax.scan that sums gradients
# (each already reduce-scattered and dp-summed by autodiff). Outside shard_map, under the same jit,
# optax clips by the global norm and applies AdamW to the sharded fp32 state: element-wise work on
# shards, plus one all-reduce for the norm that XLA inserts itself.

@dataclasses.dataclass(frozen=True)
class Hyper:
    """The run's settings; the command line's defaults are these (train_parser reads them)."""
    lr: float = 1e-4
    warmup_steps: int = 5
    max_steps: int = 100
    min_lr_ratio: float = 0.0             # the cosine decays to lr * min_lr_ratio at max_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_norm: float = 1.0
    text_padding_weight: float = 0.5
    first_codebook_weight: float = 1.0
    # PAD / EPAD text ids: the LM config's (train() takes the run's); these are moshiko's
    padding_ids: tuple = (moshi.MOSHIKO.existing_text_padding_id, moshi.MOSHIKO.existing_text_end_padding_id)
    lora_rank: int = 0                    # 0: full fine-tuning
    lora_scaling: float = 2.0
    compute_dtype: str = "bfloat16"
    remat: bool = True
    attention: str = "xla"                # or "flash": helium's Pallas kernel for the temporal transformer


def learning_rate(h: Hyper):
    """Linear warmup from 0, then cosine decay to lr * min_lr_ratio at max_steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, h.lr, max(h.warmup_steps, 0), max(h.max_steps, h.warmup_steps + 1), h.lr * h.min_lr_ratio)


def make_optimizer(h: Hyper):
    # AdamW with decay on every trainable weight, as moshi-finetune (torch AdamW on all params).
    return optax.chain(optax.clip_by_global_norm(h.max_norm),
                       optax.adamw(learning_rate(h), h.b1, h.b2, h.eps, weight_decay=h.weight_decay))


def make_train_step(cfg, mesh, h: Hyper, tx, trainable_specs, frozen_specs, specs):
    """-> jitted step(state, frozen, batch [A, B, 17, T]) -> (state, metrics [loss, text, audio, grad_norm])."""
    lora_specs = trainable_specs if h.lora_rank else None

    def loss_fn(trainable, frozen, codes):
        """Inside shard_map: (global loss, [loss, text, audio]) for this device's codes [b, 17, T]."""
        params, lora = (frozen, trainable) if h.lora_rank else (trainable, None)
        view = model_view(params, specs, lora_by_step(lora, cfg), lora_specs, h.lora_scaling,
                          jnp.dtype(h.compute_dtype))
        out = moshi.forward(view, cfg, codes, layer_hook=lambda layer: layer_hook(layer, h.lora_scaling),
                            remat=h.remat, attention=h.attention)
        sums = loss_sums(out, codes, h.text_padding_weight, h.first_codebook_weight, h.padding_ids)
        loss, text, audio = loss_from_sums(jax.lax.psum(sums, AXES))       # over the whole global batch
        return loss, jnp.stack([loss, text, audio])

    def local_grads(trainable, frozen, batch):
        def micro(acc, codes):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, codes)
            return jax.tree.map(jnp.add, acc, grads), metrics
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, metrics = jax.lax.scan(micro, zeros, batch)
        n = batch.shape[0]
        return jax.tree.map(lambda g: g / n, grads), metrics.mean(axis=0)

    sharded = jax.shard_map(local_grads, mesh=mesh, in_specs=(trainable_specs, frozen_specs, BATCH_SPEC),
                            out_specs=(trainable_specs, P()))

    def step(state, frozen, batch):
        grads, metrics = sharded(state["params"], frozen, batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = jnp.concatenate([metrics, optax.tree.norm(grads)[None]])
        return {"params": params, "opt": opt}, metrics

    return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints: plain .npz files, no orbax. Each process writes only the shards its devices hold
# (one copy of each: replica 0), keyed by leaf name and the shard's start index, so a 7B run on 32
# hosts writes 32 files of 1/32 of the state each. bfloat16 is stored as its raw uint16 bits and
# the dtypes go in meta.json. Atomic: everything is written into `step_NNNNNN.tmp/`, fsync'ed, and
# the directory is renamed once all processes are done; a run killed mid-write leaves only a .tmp
# directory, which is ignored and removed. Loading assembles each device's slice from whatever
# pieces overlap it, so a run may even resume on a different mesh.

def named_leaves(tree) -> list:
    """[(name, leaf)] of a pytree, named as jax.tree_util.keystr writes paths (the checkpoint keys)."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_checkpoint(ckpt_dir: str, step: int, state, meta: dict, keep: int) -> str:
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp, first_process = final + ".tmp", jax.process_index() == 0
    if first_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(f"ckpt-mkdir-{step}")
    pieces, leaves = {}, {}
    for name, x in named_leaves(state):
        leaves[name] = {"shape": list(x.shape), "dtype": str(x.dtype)}
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                start = ",".join(str(s.start or 0) for s in shard.index)
                local = np.asarray(shard.data)
                pieces[f"{name}@{start}"] = local.view(np.uint16) if local.dtype == jnp.bfloat16 else local
    with convert.atomic_open(os.path.join(tmp, f"process_{jax.process_index():05d}.npz")) as f:
        np.savez(f, **pieces)
    _barrier(f"ckpt-written-{step}")
    if first_process:
        with convert.atomic_open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, leaves=leaves, processes=jax.process_count()), f, indent=1)
        convert.fsync(tmp)
        os.replace(tmp, final)
        convert.fsync(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(f"ckpt-done-{step}")
    return final


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written .tmp directories are not checkpoints)."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_") and not n.endswith(".tmp")
                   and os.path.exists(os.path.join(ckpt_dir, n, "meta.json")))
    return [os.path.join(ckpt_dir, n) for n in names]


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def load_checkpoint(path: str, like):
    """Fill a state shaped and sharded like `like` (a tree of jax arrays) from a checkpoint dir."""
    meta = read_meta(path)
    pieces = {}
    for p in range(meta["processes"]):
        f = np.load(os.path.join(path, f"process_{p:05d}.npz"))
        for key in f.files:
            name, start = key.rsplit("@", 1)
            pieces.setdefault(name, []).append((tuple(map(int, start.split(","))) if start else (), f, key))

    def restore(path_, x):
        name = jax.tree_util.keystr(path_)
        info = meta["leaves"].get(name)
        if info is None or tuple(info["shape"]) != x.shape:
            found = None if info is None else tuple(info["shape"])
            raise ValueError(f"checkpoint {path}: state leaf {name} has shape {x.shape}, checkpoint has {found}")
        dtype = np.dtype(jnp.dtype(info["dtype"]))
        return jax.make_array_from_callback(
            x.shape, x.sharding, lambda index: _assemble(pieces[name], index, x.shape, dtype).astype(x.dtype))
    return jax.tree_util.tree_map_with_path(restore, like)


def _assemble(pieces, index, shape, dtype) -> np.ndarray:
    """The block `index` (a tuple of slices) of a leaf, copied from the saved pieces overlapping it."""
    want = [range(n)[s] for s, n in zip(index, shape)]
    begin, end = np.array([r.start for r in want], int), np.array([r.stop for r in want], int)
    out = np.empty(end - begin, dtype)
    filled = 0
    for start, f, key in pieces:
        saved = f[key]
        saved = saved.view(dtype) if saved.dtype != dtype else saved
        lo, hi = np.maximum(begin, start), np.minimum(end, np.add(start, saved.shape))      # the overlap
        if np.all(lo < hi):
            out[tuple(map(slice, lo - begin, hi - begin))] = saved[tuple(map(slice, lo - start, hi - start))]
            filled += int(np.prod(hi - lo))
    if filled != out.size:
        raise ValueError(f"checkpoint is missing part of {pieces[0][2].rsplit('@', 1)[0]} "
                         f"(a process file lost?)")
    return out


# ----------------------------------------------------------------------------------------------
# 5. The training loop: model and state on the mesh, batches in, metrics out, checkpoints, export.

def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def place(tree, shardings, dtype=None):
    """Arrays -> global arrays with the given shardings (and dtype). Host arrays (numpy, possibly
    memory-mapped) are read slice by slice, each process reading only what its own devices hold,
    so a checkpoint is never loaded whole onto one device; device arrays are resharded."""
    def put(x, s):
        target = dtype or x.dtype
        if isinstance(x, jax.Array):
            return jax.device_put(x.astype(target), s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx]).astype(target))
    return jax.tree.map(put, tree, shardings)


def make_batch(ds: data.TokenWindows, ids: np.ndarray, sharding, cfg, window_frames: int):
    """window ids [A, B] -> int32 global array [A, B, streams, T]; each process reads only its rows."""
    shape = (*ids.shape, cfg.num_streams, window_frames)
    return jax.make_array_from_callback(shape, sharding, lambda idx: data.read_batch(ds, ids[idx[0], idx[1]]))


def flops_per_step(cfg, params, frames: int, window_frames: int) -> float:
    """Model FLOPs of one step (forward + backward, remat not counted): 6 N per frame for the N
    weights every frame touches (the matrices: embedding tables are looked up, not multiplied),
    plus causal attention of the temporal transformer (12 L D T/2 per frame)."""
    matmul_params = sum(int(np.prod(w.shape)) for w in lora_targets(params).values())
    tcfg = cfg.temporal
    context = min(window_frames, tcfg.context or window_frames)
    attention = 12 * tcfg.num_layers * tcfg.d_model * context / 2
    return frames * (6 * matmul_params + attention)


PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
               "TPU v6 lite": 918, "TPU v6e": 918, "H100": 989, "H200": 989, "A100": 312}


def peak_flops(args) -> float | None:
    """Peak bf16 FLOP/s of all devices (dense), from --peak-tflops or the device kind; None if unknown."""
    per_device = args.peak_tflops
    if per_device is None:
        kind = jax.devices()[0].device_kind
        per_device = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    return None if per_device is None else per_device * 1e12 * jax.device_count()


def load_model(args):
    """-> (cfg, host params or None). --config: a preset of moshi.PRESETS or a Kyutai config.json
    (any architecture). --init-from: a Kyutai checkpoint, found as sample.py's --hf-repo finds one
    (repo.find_checkpoint), read onto the host (CPU) so that `place` can hand each device its slice."""
    name = args.config or ("" if args.init_from else "tiny")
    if name and not name.endswith(".json") and name not in moshi.PRESETS:
        raise ValueError(f"--config {name!r}: unknown; choose from {sorted(moshi.PRESETS)} "
                         "or give a config.json")
    config = name and (convert.lm_config(name) if name.endswith(".json") else moshi.PRESETS[name])
    if not args.init_from:
        return config, None
    ckpt = repo.find_checkpoint(args.init_from, lm_only=True, flags={"repo": "--init-from"})
    config = config or repo.lm_config_for(ckpt, print)
    with jax.default_device(jax.devices("cpu")[0]):
        params, cfg = convert.load_lm(ckpt.moshi, config=config)
        return cfg, jax.tree.map(np.asarray, params)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about a run that depends only on (model config, mesh, hyper-parameters): the
    sharding of every tree and the jitted functions. Cached, so that runs in one process (tests,
    a resumed run) reuse the compiled step."""
    abstract: dict              # the model params' shapes and dtypes (fp32)
    specs: dict                 # PartitionSpecs of the model params
    trainable_specs: dict       # of what the optimizer updates (the params, or the LoRA tree)
    master: object              # the model params' dtype on the mesh
    init_params: object         # key -> params, born sharded (master dtype)
    init_lora: object           # key -> LoRA tree, sharded by adapter_specs (None: full fine-tuning)
    init_opt: object            # trainable -> optimizer state, sharded like it
    step: object                # (state, frozen, batch) -> (state, metrics)


@functools.lru_cache(maxsize=None)
def make_plan(cfg, mesh, h: Hyper) -> Plan:
    abstract = jax.eval_shape(lambda k: moshi.init(k, cfg, jnp.float32), jax.random.key(0))
    specs = param_specs(abstract, mesh.shape["fsdp"])
    # a frozen LoRA base needs no fp32 master copy: it is kept in the compute dtype
    master = jnp.dtype(h.compute_dtype) if h.lora_rank else jnp.float32
    make_lora = lambda k: init_lora(k, abstract, h.lora_rank)                      # noqa: E731
    trainable_specs = (adapter_specs(jax.eval_shape(make_lora, jax.random.key(0)), mesh.shape["fsdp"])
                       if h.lora_rank else specs)
    tx = make_optimizer(h)
    step = make_train_step(cfg, mesh, h, tx, trainable_specs, specs if h.lora_rank else {}, specs)
    return Plan(abstract, specs, trainable_specs, master,
                jax.jit(lambda k: moshi.init(k, cfg, master), out_shardings=shardings(mesh, specs)),
                jax.jit(make_lora, out_shardings=shardings(mesh, trainable_specs)) if h.lora_rank else None,
                jax.jit(tx.init), step)


def initial_state(plan: Plan, mesh, h: Hyper, params, lora=None):
    """(state, frozen) from model params and an optional LoRA tree, host or device arrays."""
    params = place(params, shardings(mesh, plan.specs), plan.master)
    trainable = place(lora, shardings(mesh, plan.trainable_specs), jnp.float32) if h.lora_rank else params
    return {"params": trainable, "opt": plan.init_opt(trainable)}, (params if h.lora_rank else {})


def build_state(args, h: Hyper, mesh, cfg, host_params=None):
    """-> (plan, state, frozen): the model (loaded, or from scratch by seed) and LoRA, sharded."""
    key_model, key_lora = jax.random.split(jax.random.key(args.seed))
    plan = make_plan(cfg, mesh, h)
    if host_params is None:
        host_params = plan.init_params(key_model)
    else:
        shapes = lambda tree: {name: x.shape for name, x in named_leaves(tree)}      # noqa: E731
        convert.check_keys(shapes(plan.abstract), shapes(host_params), f"--init-from {args.init_from}")
    lora = plan.init_lora(key_lora) if h.lora_rank else None
    return (plan, *initial_state(plan, mesh, h, host_params, lora))


def run_meta(args, h: Hyper, cfg) -> dict:
    """What a checkpoint must agree on to be resumed, plus what export needs to rebuild the model."""
    return {"hyper": dataclasses.asdict(h), "config": args.config, "init_from": args.init_from,
            "lm_config": repr(cfg), "seed": args.seed, "data": os.path.abspath(args.data)}


def train(args) -> list[dict]:
    """The whole run. Returns the metrics of every step it ran (also in run_dir/metrics.jsonl)."""
    sizes = parse_mesh(args.mesh) if args.mesh else {"dp": 1, "fsdp": jax.device_count()}
    mesh = make_mesh(sizes["dp"], sizes["fsdp"])
    ds = data.TokenWindows(args.data)
    cfg, host_params = load_model(args)
    h = Hyper(padding_ids=(cfg.existing_text_padding_id, cfg.existing_text_end_padding_id),
              **{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyper) if f.name != "padding_ids"})
    if (ds.index["text_padding_id"], ds.index["end_of_padding_id"]) != h.padding_ids:
        raise data.DataError(f"{args.data}: prepared with PAD/EPAD ids {ds.index['text_padding_id']}/"
                             f"{ds.index['end_of_padding_id']}, the model uses {h.padding_ids}")
    with jax.set_mesh(mesh):
        plan, state, frozen = build_state(args, h, mesh, cfg, host_params)
        return run(args, h, mesh, cfg, ds, plan, state, frozen)


def start(args, h, cfg, state, ckpt_dir):
    """-> (state, first step, data position): fresh, or from the newest complete checkpoint (made
    by the same model, seed and kind of training). Leftovers of an interrupted save (.tmp) and
    metrics logged after that checkpoint are dropped."""
    found, first, position = list_checkpoints(ckpt_dir) if args.resume else [], 0, 0
    if args.resume and not found:
        print(f"resume: no checkpoint in {ckpt_dir}, starting from step 0")
    if found:
        meta = read_meta(found[-1])
        made = dict(meta, lora_rank=meta["hyper"]["lora_rank"])
        this = dict(run_meta(args, h, cfg), lora_rank=h.lora_rank)
        for k in ("config", "init_from", "lm_config", "seed", "lora_rank"):
            if made[k] != this[k]:
                raise ValueError(f"resume: {found[-1]} was made with {k}={made[k]!r}, "
                                 f"this run has {this[k]!r}")
        print(f"resume: {found[-1]} (step {meta['step']}, data position {meta['data_position']})")
        state, first, position = load_checkpoint(found[-1], state), meta["step"], meta["data_position"]
    if jax.process_index() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        metrics = os.path.join(args.run_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                kept = [line for line in f if json.loads(line)["step"] <= first]
            with convert.atomic_open(metrics, "w") as f:
                f.writelines(kept)
    return state, first, position


class NonFiniteLoss(RuntimeError):
    """The loss went NaN/inf: the message names the step and the windows of the batch."""


def log_step(args, rec: dict, max_steps: int, last: int, mfu, eta_s) -> None:
    """metrics.jsonl gets every step; the console every --log-every steps and the last one."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(args.run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if rec["step"] % args.log_every == 0 or rec["step"] == last:
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown peak: --peak-tflops)"
        print(f"step {rec['step']}/{max_steps} | loss {rec['loss']:.4f} (text {rec['text_loss']:.4f}, "
              f"audio {rec['audio_loss']:.4f}) | grad {rec['grad_norm']:.3f} | lr {rec['lr']:.2e} | "
              f"{rec['tokens_per_s']:,.0f} tok/s | MFU {mfu_text} | ETA "
              f"{time.strftime('%H:%M:%S', time.gmtime(eta_s))}", flush=True)


def run(args, h: Hyper, mesh, cfg, ds: data.TokenWindows, plan: Plan, state, frozen) -> list[dict]:
    G, A, T = args.batch_size or mesh.size, args.grad_accum, ds.window_frames
    if G % mesh.size:
        raise ValueError(f"--batch-size {G} must be a multiple of the mesh size {mesh.size} (dp x fsdp)")
    ckpt_dir = os.path.join(args.run_dir, "checkpoints")
    state, first, position = start(args, h, cfg, state, ckpt_dir)
    last = min(h.max_steps, args.stop_at or h.max_steps)
    tokens_per_step = A * G * T * (1 + cfg.dep_q)       # moshi-finetune's count: text + Moshi's codebooks
    flops, peak, lr_at = flops_per_step(cfg, frozen or state["params"], A * G * T, T), peak_flops(args), learning_rate(h)
    print(f"train: mesh {dict(mesh.shape)}, {len(ds)} windows of {T} frames, {A} x {G} windows per step, "
          f"{'LoRA rank %d' % h.lora_rank if h.lora_rank else 'full fine-tuning'}, steps {first + 1}..{last}")
    history, times, batch_sharding = [], [], NamedSharding(mesh, BATCH_SPEC)
    for step in range(first + 1, last + 1):
        ids = data.window_ids(len(ds), args.seed, position, A * G).reshape(A, G)    # [A, G] window ids
        t0 = time.perf_counter()
        state, metrics = plan.step(state, frozen, make_batch(ds, ids, batch_sharding, cfg, T))
        m = np.asarray(metrics)                          # waits for the step: each loss is checked
        times.append(time.perf_counter() - t0)
        if not np.all(np.isfinite(m[:3])):
            names = "\n  ".join(ds.name(int(i)) for i in ids.reshape(-1))
            raise NonFiniteLoss(f"step {step}: loss is {m[0]} (text {m[1]}, audio {m[2]}); the batch "
                                f"(data position {position}) held:\n  {names}")
        position += A * G
        steady = np.mean(times[1:]) if len(times) > 1 else times[0]   # the first step also compiles
        losses = dict(zip(("loss", "text_loss", "audio_loss", "grad_norm"), m.tolist()))
        history.append({"step": step, **losses, "lr": float(lr_at(step - 1)), "step_time": times[-1],
                        "tokens_per_s": tokens_per_step / steady})
        log_step(args, history[-1], h.max_steps, last, flops / steady / peak if peak else None,
                 steady * (h.max_steps - step))
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == last:
            save_checkpoint(ckpt_dir, step, state, dict(run_meta(args, h, cfg), data_position=position),
                            args.keep_checkpoints)
    if args.export and last == h.max_steps and history:
        export(args.export, cfg, state, frozen, h, args.save_adapters)
    return history


def to_host(x):
    """A global array -> numpy on this host (all processes take part when there are several)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export(out_dir: str, cfg, state, frozen, h: Hyper, save_adapters: bool = False, dtype="bfloat16") -> str:
    """Write the trained model in Kyutai's naming: out_dir/model.safetensors (LoRA merged in) and
    config.json, which the official PyTorch, MLX and Rust stacks and sample.py load like a released
    checkpoint; with save_adapters, also out_dir/lora.safetensors in moshi-finetune's naming."""
    trainable, dtype = jax.tree.map(to_host, state["params"]), jnp.dtype(dtype)
    path, save_adapters = os.path.join(out_dir, "model.safetensors"), save_adapters and h.lora_rank
    if jax.process_index() != 0:
        return path
    os.makedirs(out_dir, exist_ok=True)
    with jax.default_device(jax.devices("cpu")[0]):
        params = (merged_params(jax.tree.map(to_host, frozen), trainable, h.lora_scaling) if h.lora_rank
                  else trainable)
        convert.save_lm(path, jax.tree.map(lambda x: np.asarray(x).astype(dtype), params), cfg)
    with convert.atomic_open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(convert.lm_config_dict(cfg), moshi_name="model.safetensors"), f, indent=1)
    if save_adapters:
        tensors = {k: v.astype(dtype) for k, v in convert.lora_tensors(trainable, cfg).items()}
        convert.save_safetensors(os.path.join(out_dir, "lora.safetensors"), tensors, {"format": "pt"})
    print(f"export: wrote {path}" + (" and lora.safetensors" if save_adapters else ""))
    return path


def export_checkpoint(args) -> str:
    """`train.py export`: a saved checkpoint (the newest, or --step's), on this process's first device."""
    found = list_checkpoints(os.path.join(args.run_dir, "checkpoints"))
    if args.step is not None:
        found = [c for c in found if c.endswith(f"step_{args.step:06d}")]
    if not found:
        which = f" for step {args.step}" if args.step else ""
        raise SystemExit(f"export: no checkpoint{which} in {args.run_dir}")
    meta = read_meta(found[-1])
    run_args = argparse.Namespace(config=meta["config"], init_from=meta["init_from"], seed=meta["seed"])
    h = Hyper(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyper"].items()})
    mesh = make_mesh(1, 1)
    cfg, host_params = load_model(run_args)
    with jax.set_mesh(mesh):
        _, state, frozen = build_state(run_args, h, mesh, cfg, host_params)
        state = load_checkpoint(found[-1], state)
        return export(args.out, cfg, state, frozen, h, args.save_adapters, args.dtype)


# ----------------------------------------------------------------------------------------------
# Command line. A flag that sets a Hyper field is named after it (its dest) and takes its default
# from it, so the two cannot drift apart.

def _hyper_flags(a) -> None:
    def flag(field, name=None, **kw):                      # --max-steps sets max_steps, ...
        name = name or "--" + field.replace("_", "-")
        if "action" not in kw:
            kw["type"] = type(getattr(Hyper, field))
        a(name, dest=field, default=getattr(Hyper, field), **kw)
    flag("max_steps", help="length of the run (and of the lr schedule)")
    flag("lr")
    flag("warmup_steps")
    flag("min_lr_ratio", help="the cosine ends at lr * this")
    flag("b1", "--beta1", metavar="BETA1")
    flag("b2", "--beta2", metavar="BETA2")
    flag("eps")
    flag("weight_decay")
    flag("max_norm", help="gradient clipping (global norm)")
    flag("text_padding_weight", help="loss weight of PAD/EPAD text targets")
    flag("first_codebook_weight",
         help="loss weight of the semantic codebook (moshi-finetune's example uses 100)")
    flag("lora_rank", help="0: full fine-tuning; >0: LoRA on every linear layer")
    flag("lora_scaling", help="LoRA multiplier: W + scaling * B @ A")
    flag("compute_dtype", "--dtype", choices=["bfloat16", "float32"],
         help="compute dtype (master weights are fp32)")
    flag("remat", "--no-remat", action="store_false",
         help="keep activations instead of recomputing each layer")
    flag("attention", choices=["xla", "flash"], help="temporal attention implementation")


def train_parser():
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Subcommands: `train.py prepare --help`, `train.py export --help`.")
    a = ap.add_argument
    a("--data", required=True, help="a folder written by `train.py prepare`")
    a("--run-dir", required=True, help="checkpoints, metrics.jsonl and the export go here")
    a("--config", help="model preset or config.json (from scratch; with --init-from, overrides its config)")
    a("--init-from", help="Kyutai checkpoint to start from: a Hugging Face repo id (with huggingface_hub "
      "installed), a local repo folder, or a .safetensors file (with the config.json beside it, if any)")
    a("--mesh", help="device mesh, e.g. dp=4,fsdp=8 (default: fsdp over all devices)")
    a("--batch-size", type=int, help="windows per micro-batch, whole mesh (default: one per device)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--stop-at", type=int, help="stop after this step (a job time slice); continue with --resume")
    _hyper_flags(a)
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=1)
    a("--ckpt-every", type=int, default=100)
    a("--keep-checkpoints", type=int, default=3)
    a("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    a("--export", help="after training, write model.safetensors (Kyutai naming, LoRA merged) here")
    a("--save-adapters", action="store_true", help="with --export and LoRA: also lora.safetensors")
    a("--peak-tflops", type=float, help="per-device peak for the MFU estimate (default: by device kind)")
    a("--distributed", action="store_true",
      help="call jax.distributed.initialize() (multi-host; automatic under srun, mpirun, TPU pod "
           "environments, or when JAX_COORDINATOR_ADDRESS is set)")
    a("--coordinator-address", help="host:port of process 0 (else auto-detected by jax: TPU pods, SLURM, ...)")
    a("--num-processes", type=int)
    a("--process-id", type=int)
    return ap


def export_parser():
    ap = argparse.ArgumentParser(prog="train.py export", description=(
        "Export a checkpoint to Kyutai's safetensors naming (LoRA merged)."))
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--step", type=int, help="default: the newest checkpoint")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--save-adapters", action="store_true", help="LoRA runs: also lora.safetensors")
    return ap


def multi_process_launcher(env=os.environ) -> str | None:
    """The launcher that started this program as one of several processes, if any: then
    jax.distributed.initialize() finds the others by itself (its cluster auto-detection)."""
    count = lambda names: max([len([h for h in env.get(n, "").split(",") if h]) for n in names])   # noqa: E731
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "Slurm (srun)"        # a job step of several tasks: not sbatch's script, not salloc's shell
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI (mpirun)"   # Open MPI <= 4, what JAX detects; with 5, pass --coordinator-address
    if count(("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "a multi-host TPU slice"
    return None


def maybe_init_distributed(args) -> None:
    """One process per host: join them before any JAX computation. Explicit flags win; otherwise a
    known launcher (Slurm, Open MPI, TPU pod environments) is detected. (On a Cloud TPU VM pod slice
    started by hand, libtpu already joins the hosts; --distributed adds JAX's coordination service.)"""
    explicit = args.distributed or args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    launcher = None if explicit else multi_process_launcher()
    if explicit or launcher:
        kw = {k: v for k, v in (("coordinator_address", args.coordinator_address),
                                ("num_processes", args.num_processes), ("process_id", args.process_id)) if v is not None}
        if launcher:
            print(f"started by {launcher}: jax.distributed.initialize()", flush=True)
        jax.distributed.initialize(**kw)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:                     # the data side: data.py
        return data.main(argv[1:], prog="train.py prepare")
    if argv[:1] == ["export"]:
        return export_checkpoint(export_parser().parse_args(argv[1:]))
    if argv[:1] == ["train"]:
        argv = argv[1:]
    args = train_parser().parse_args(argv)
    maybe_init_distributed(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:   # bad input: no traceback
        sys.exit(f"train.py: {e}")
