"""train.py: fine-tune (or train) Moshi on a dp x fsdp mesh, from moshi-finetune's data format.

    python train.py prepare --manifest data.jsonl --tokenizer tokenizer_spm_32k_3.model \\
        --mimi tokenizer-e351c8d8-checkpoint125.safetensors --duration-sec 100 --out prepared/
    python train.py --data prepared/ --init-from ~/moshiko-pytorch-bf16 --lora-rank 128 \\
        --mesh dp=4,fsdp=8 --batch-size 32 --max-steps 2000 --run-dir runs/my-run

The data side lives in data.py: `prepare` (run by the first command) encodes moshi-finetune's
dataset once into token arrays [17, frames] (text, Moshi's 8 codebooks, the user's 8), and
`data.TokenWindows` / `data.window_ids` cut fixed windows from them in a shuffled, resumable order.
What goes to disk and back lives in checkpoint.py: the run directory and its checkpoints, the model
a run starts from (--init-from, --ttt-*) and the one export writes, the hosts' share of each array.
This file is the training program: each step reads a batch of windows [B, 17, T], runs
moshi.forward and the loss under `jax.shard_map` on a (dp, fsdp) device mesh, one process per
host, and updates the weights (or LoRA adapters, and In-Place TTT's weights) with AdamW under
moshi-finetune's OneCycle schedule. The sections: 1. the loss, 2. sharding (of the weights and of
the LoRA adapters, which lora.py defines), 3. the train step, 4. the training loop, and the CLI.

Reference: kyutai-labs/moshi-finetune (finetune/loss.py, train.py, args.py, moshi/modules/lora.py).
Run `python train.py --help` / `python train.py prepare --help` / `python train.py export --help`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpoint
import convert
import data
import helium
import lora
import moshi


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
    audio_w = jnp.where(jnp.arange(dep_q) == 0, first_codebook_weight, 1.0)[None, :, None]  # dep_q may be 0
    text = weighted_ce_sums(out["text_logits"], text_target, out["text_mask"], text_w)
    audio = weighted_ce_sums(out["logits"], audio_target, out["mask"], audio_w)   # audio_w broadcasts
    return jnp.stack([*text, *audio])                   # [text num, text den, audio num, audio den]


def loss_from_sums(sums):
    """[4] (possibly psum'ed over devices) -> (loss, text loss, audio loss). An all-ignored stream
    contributes 0 instead of 0/0."""
    text, audio = sums[0::2] / jnp.maximum(sums[1::2], 1e-9)
    return text + audio, text, audio


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
        name, _, value = map(str.strip, part.partition("="))
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: want e.g. dp=4,fsdp=8 (axes dp and fsdp, positive sizes)")
        sizes[name] = int(value)
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
        inside = in_layer_stack or lora.is_layer_stack(params)
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
    return jax.lax.all_gather(x, "fsdp", axis=spec.index("fsdp"), tiled=True) if "fsdp" in spec else x


ADAPTER_AXES = {"a": -1, "b": -2}           # the axis fsdp splits: A's `in`, B's `out`


def adapter_specs(adapters, fsdp: int):
    """LoRA adapters are split too: A [.., r, in] along `in`, B [.., out, r] along `out` (at rank 128
    moshiko's adapters are 0.4 B parameters: worth 1/fsdp of their fp32 + Adam state per device).
    In layer stacks the hook gathers them by that rule, so fsdp must divide; elsewhere an adapter
    it does not divide is replicated."""
    specs = {}
    for path, ab in lora.adapters(adapters):
        for name, axis in ADAPTER_AXES.items():
            shape = ab[name].shape
            if shape[axis] % fsdp and lora.inside_stack(adapters, path):
                raise ValueError(f"fsdp={fsdp} does not divide dim {axis} of LoRA {name.upper()} of "
                                 f"{'.'.join(path)} {shape}")
            spec = P() if shape[axis] % fsdp else split_spec(len(shape), axis)
            convert.set_path(specs, (*path, name), spec)
    return specs


def layer_hook(layer, lora_scaling: float):
    """Called by helium's layer scan on one layer's weights (leading layer axis gone): gather each
    matrix over fsdp, then its LoRA adapters if the layer carries them (under "lora"), and merge."""
    layer = dict(layer)
    adapters = layer.pop("lora", None)
    gather_axis = lambda w, axis: gather(w, split_spec(w.ndim, axis))                # noqa: E731
    layer = jax.tree.map(lambda w: gather_axis(w, -2) if w.ndim >= 2 else w, layer)    # [.., out, in]
    for path, ab in lora.adapters(adapters):
        whole = {name: gather_axis(ab[name], axis) for name, axis in ADAPTER_AXES.items()}
        convert.set_path(layer, path, lora.merge(convert.get_path(layer, path), whole, lora_scaling))
    return layer


def lora_by_step(adapters, cfg):
    """With a depformer weight schedule, depformer.forward picks each step's weight set
    (helium.select_step_weights) before the layer hook merges LoRA into it: pick the adapters of
    the depformer's layers the same way, [L, sets, ...] -> [L, steps, ...]. A set shared by several
    steps gets the sum of their gradients, through the indexing, as its weights do."""
    schedule = cfg.depformer_weights_per_step_schedule
    stack = (adapters or {}).get("depformer", {}).get("transformer")
    if schedule is None or stack is None:
        return adapters
    stack = jax.tree.map(lambda a: a[:, np.asarray(schedule)], stack)
    return dict(adapters, depformer=dict(adapters["depformer"], transformer=stack))


def model_view(params, specs, adapters, lora_specs, lora_scaling: float, dtype):
    """Inside shard_map: the params moshi.forward gets. Weights outside the layer stacks are cast
    to the compute dtype, gathered whole and LoRA-merged here (embeddings, heads: used once per
    step); layer stacks are only cast, and carry their adapters under "lora", for the layer hook."""
    def view(p, s, l, ls):
        if lora.is_layer_stack(p):
            p = jax.tree.map(lambda x: x.astype(dtype), p)
            return dict(p, lora=l) if l else p
        if isinstance(p, dict):
            return {k: view(v, s[k], (l or {}).get(k), (ls or {}).get(k)) for k, v in p.items()}
        w = gather(p.astype(dtype), s)
        return lora.merge(w, {k: gather(l[k], ls[k]) for k in "ab"}, lora_scaling) if l else w
    return view(params, specs, adapters, lora_specs)


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
    lr: float = 1e-4                      # the schedule's peak
    pct_start: float = 0.05               # the share of the run the lr rises for
    max_steps: int = 100
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
    lora_ft_embed: bool = False           # with LoRA, also train the embedding tables in full
    compute_dtype: str = "bfloat16"
    remat: bool = True
    # the temporal transformer's attention over whole windows: auto = Pallas on TPU, cuDNN on GPU
    # (16-bit), XLA's elsewhere (helium.default_attention); or xla | flash | cudnn
    attention: str = "auto"


# moshi-finetune's schedule is torch's OneCycleLR with its defaults: over the first pct_start of
# the run the lr rises from lr / 25 to lr while Adam's beta1 falls from 0.95 to 0.85 (torch cycles
# AdamW's beta1, so moshi-finetune's 0.9 is never used), then both return, the lr to lr / 25e4,
# each along a half cosine. Step s reads the values at s; the peak is at pct_start * max_steps - 1.
DIV_FACTOR, FINAL_DIV_FACTOR, MAX_BETA1, BASE_BETA1 = 25.0, 1e4, 0.95, 0.85


def half_cos(start, end, pct):
    return end + (start - end) / 2 * (jnp.cos(jnp.pi * pct) + 1)


def one_cycle(h: Hyper):
    """-> (learning rate, beta1), functions of the optimizer's step count (from 0), as torch's."""
    peak, last, low = h.pct_start * h.max_steps - 1.0, h.max_steps - 1.0, h.lr / DIV_FACTOR

    def curve(start, top, end):
        def value(count):
            step = jnp.asarray(count, jnp.float32)
            # only step 0 rises when peak < 1, so max(peak, 1) changes nothing where torch divides
            # by a peak > 0, and gives a peak of exactly 0 (torch: ZeroDivisionError) its start value
            rise, fall = step / max(peak, 1.0), (step - peak) / (last - peak)
            return jnp.where(step <= peak, half_cos(start, top, rise), half_cos(top, end, fall))
        return value
    return curve(low, h.lr, low / FINAL_DIV_FACTOR), curve(MAX_BETA1, BASE_BETA1, MAX_BETA1)


def optimizer(h: Hyper):
    """moshi-finetune's: clipping by the global norm, then AdamW (decay on every trainable weight,
    as torch's AdamW on all params) with the OneCycle lr and beta1."""
    return optax.chain(optax.clip_by_global_norm(h.max_norm), optax.inject_hyperparams(optax.adamw)(
        *one_cycle(h), h.b2, h.eps, weight_decay=h.weight_decay))


def attention_of(h: Hyper) -> str:
    """The attention implementation the step runs (h.attention, or by backend for "auto")."""
    return helium.default_attention(h.compute_dtype) if h.attention == "auto" else h.attention


def make_train_step(cfg, mesh, h: Hyper, tx, trainable_specs, frozen_specs, specs):
    """-> (jitted step(state, frozen, batch [A, B, 17, T]) -> (state, [loss, text, audio, grad norm]),
    jitted evaluate(trainable, frozen, batch [N, B, 17, T]) -> [loss, text, audio], the mean of the N
    batches' losses (moshi-finetune's evaluate averages its batches))."""
    lora_specs = lora.from_trainable(trainable_specs, frozen_specs)[0] if h.lora_rank else None

    def loss_fn(trainable, frozen, codes):
        """Inside shard_map: (global loss, [loss, text, audio]) for this device's codes [b, 17, T]."""
        adapters, params = lora.from_trainable(trainable, frozen) if h.lora_rank else (None, trainable)
        view = model_view(params, specs, lora_by_step(adapters, cfg), lora_specs, h.lora_scaling,
                          jnp.dtype(h.compute_dtype))
        out = moshi.forward(view, cfg, codes, layer_hook=lambda layer: layer_hook(layer, h.lora_scaling),
                            remat=h.remat, attention=attention_of(h))
        sums = loss_sums(out, codes, h.text_padding_weight, h.first_codebook_weight, h.padding_ids)
        metrics = jnp.stack(loss_from_sums(jax.lax.psum(sums, AXES)))      # over the whole global batch
        return metrics[0], metrics

    def local_grads(trainable, frozen, batch):
        def micro(acc, codes):
            grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable, frozen, codes)
            return jax.tree.map(jnp.add, acc, grads), metrics
        grads, metrics = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, trainable), batch)
        return jax.tree.map(lambda g: g / batch.shape[0], grads), metrics.mean(axis=0)

    in_specs = (trainable_specs, frozen_specs, BATCH_SPEC)
    sharded = jax.shard_map(local_grads, mesh=mesh, in_specs=in_specs, out_specs=(trainable_specs, P()))
    evaluate = jax.shard_map(lambda trainable, frozen, batch: jax.lax.map(
        lambda codes: loss_fn(trainable, frozen, codes)[1], batch).mean(axis=0),
        mesh=mesh, in_specs=in_specs, out_specs=P())

    def step(state, frozen, batch):
        grads, metrics = sharded(state["params"], frozen, batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = jnp.concatenate([metrics, optax.tree.norm(grads)[None]])
        return {"params": params, "opt": opt}, metrics

    return jax.jit(step, donate_argnums=(0,)), jax.jit(evaluate)


# ----------------------------------------------------------------------------------------------
# 4. The training loop: model and state on the mesh, batches in, metrics out, checkpoints, export
# (what comes from disk and goes back to it is checkpoint.py's).

def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def make_batch(ds: data.TokenWindows, ids: np.ndarray, sharding, cfg):
    """window ids [A, B] -> int32 global array [A, B, streams, T]; each process reads only its rows."""
    shape = (*ids.shape, cfg.num_streams, ds.window_frames)
    return jax.make_array_from_callback(shape, sharding, lambda idx: data.read_batch(ds, ids[idx[0], idx[1]]))


def flops_per_step(cfg, params, frames: int, window_frames: int) -> float:
    """Model FLOPs of one step (forward + backward, remat not counted): 6 N per frame for the N
    weights every frame touches (the matrices: embedding tables are looked up, not multiplied),
    plus causal attention of the temporal transformer (12 L D T/2 per frame), plus, per TTT layer,
    its block-causal products (H Hᵀ and the product with V̂: 6 T/2 (Hd + D) per frame) and V̂'s
    depthwise conv and P (6 D (K + D) per frame)."""
    matmul_params = sum(math.prod(w.shape) for w in lora.targets(params).values())
    tcfg, D = cfg.temporal, cfg.temporal.d_model
    context = min(window_frames, tcfg.context or window_frames)
    attention = 12 * tcfg.num_layers * D * context / 2
    fast_weights = 0 if cfg.ttt is None else 6 * len(cfg.ttt.layers) * (
        window_frames / 2 * (tcfg.gating_hidden + D) + D * (cfg.ttt.kernel_size + D * cfg.ttt.use_proj))
    return frames * (6 * matmul_params + attention + fast_weights)


PEAK_TFLOPS = {"TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459, "TPU v5": 459,
               "TPU v6 lite": 918, "TPU v6e": 918, "H100": 989, "H200": 989, "A100": 312}


def peak_flops(args) -> float | None:
    """Peak bf16 FLOP/s of all devices (dense), from --peak-tflops or the device kind; None if unknown."""
    per_device = args.peak_tflops
    if per_device is None:
        kind = jax.devices()[0].device_kind
        per_device = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
    return None if per_device is None else per_device * 1e12 * jax.device_count()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about a run that depends only on (model config, mesh, hyper-parameters): the
    sharding of every tree and the jitted functions. Cached, so that runs in one process (tests,
    a resumed run) reuse the compiled step."""
    abstract: dict              # the model params' shapes and dtypes (fp32)
    specs: dict                 # PartitionSpecs of the model params
    trainable_specs: dict       # of what the optimizer updates (the params, or the adapters + params["ttt"])
    frozen_specs: dict          # of a LoRA run's frozen base ({} in full fine-tuning)
    init_params: object         # key -> params, born sharded (fp32; a LoRA run's in the compute dtype)
    init_lora: object           # key -> LoRA adapters, sharded by adapter_specs (None: full fine-tuning)
    init_opt: object            # trainable -> optimizer state, sharded like it
    step: object                # (state, frozen, batch) -> (state, metrics)
    evaluate: object            # (trainable, frozen, batches) -> [loss, text, audio]


@functools.lru_cache(maxsize=None)
def make_plan(cfg, mesh, h: Hyper) -> Plan:
    abstract = jax.eval_shape(lambda k: moshi.init(k, cfg, jnp.float32), jax.random.key(0))
    fsdp = mesh.shape["fsdp"]
    specs = param_specs(abstract, fsdp)
    # a frozen LoRA base needs no fp32 master copy: it is kept in the compute dtype
    master = jnp.dtype(h.compute_dtype) if h.lora_rank else jnp.float32
    make_lora = lambda k: lora.init(k, abstract, h.lora_rank)                      # noqa: E731
    lora_specs = adapter_specs(jax.eval_shape(make_lora, jax.random.key(0)), fsdp) if h.lora_rank else {}
    whole = lora.trained_whole(abstract, h.lora_ft_embed)
    frozen_specs, trainable_specs = (lora.to_trainable(specs, lora_specs, whole) if h.lora_rank
                                     else ({}, specs))
    tx = optimizer(h)
    return Plan(abstract, specs, trainable_specs, frozen_specs,
                jax.jit(lambda k: moshi.init(k, cfg, master), out_shardings=shardings(mesh, specs)),
                jax.jit(make_lora, out_shardings=shardings(mesh, lora_specs)) if h.lora_rank else None,
                jax.jit(tx.init), *make_train_step(cfg, mesh, h, tx, trainable_specs, frozen_specs, specs))


def initial_state(plan: Plan, mesh, h: Hyper, params, adapters=None):
    """(state, frozen) from model params and an optional LoRA tree, host or device arrays. What
    trains is kept in fp32, a LoRA run's frozen base in the compute dtype (as make_plan inits it)."""
    whole = lora.trained_whole(params, h.lora_ft_embed)
    frozen, trainable = lora.to_trainable(params, adapters, whole) if h.lora_rank else ({}, params)
    frozen = checkpoint.place(frozen, shardings(mesh, plan.frozen_specs), jnp.dtype(h.compute_dtype))
    trainable = checkpoint.place(trainable, shardings(mesh, plan.trainable_specs), jnp.float32)
    return {"params": trainable, "opt": plan.init_opt(trainable)}, frozen


def build_state(args, h: Hyper, mesh, cfg, host_params=None):
    """-> (plan, state, frozen): the model (loaded, or from scratch by seed) and LoRA, sharded. TTT
    layers new to a loaded checkpoint start at their init, moshi.init's (of which jit computes only
    the part returned): the conv at zero, so the model starts as the checkpoint's."""
    key_model, key_lora = jax.random.split(jax.random.key(args.seed))
    plan = make_plan(cfg, mesh, h)
    if host_params is None:
        host_params = plan.init_params(key_model)
    else:
        if cfg.ttt is not None and "ttt" not in host_params:
            print(f"init: TTT on layers {cfg.ttt.layers}, new to {args.init_from}: starting at their init")
            host_params = dict(host_params, ttt=jax.jit(lambda k: moshi.init(k, cfg)["ttt"])(key_model))
        shapes = lambda tree: {name: x.shape for name, x in checkpoint.named_leaves(tree)}      # noqa: E731
        convert.check_keys(shapes(plan.abstract), shapes(host_params), f"--init-from {args.init_from}")
    adapters = plan.init_lora(key_lora) if h.lora_rank else None
    return (plan, *initial_state(plan, mesh, h, host_params, adapters))


def train(args) -> list[dict]:
    """The whole run. Returns the metrics of every step it ran (also in run_dir/metrics.jsonl).
    The command line is checked before the model is read or anything is written."""
    checkpoint.refuse_used(args.run_dir, args.resume, args.overwrite)
    mesh = make_mesh(**parse_mesh(args.mesh or f"fsdp={jax.device_count()}"))    # default: fsdp over all
    batch_size = args.batch_size or mesh.size
    if batch_size % mesh.size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the mesh size {mesh.size}")
    if (args.eval_every or args.eval_batches) and not args.eval_data:
        raise ValueError("--eval-every and --eval-batches need --eval-data (a folder written by prepare)")
    ds, eval_ds = (data.TokenWindows(d) if d else None for d in (args.data, args.eval_data))
    if eval_ds is not None and len(eval_ds) < batch_size:
        raise ValueError(f"--eval-data {args.eval_data}: {len(eval_ds)} windows, fewer than one batch "
                         f"({batch_size})")
    cfg, host_params = checkpoint.load_model(args)
    h = Hyper(padding_ids=(cfg.existing_text_padding_id, cfg.existing_text_end_padding_id),
              **{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyper) if f.name != "padding_ids"})
    for windows in filter(None, (ds, eval_ds)):
        windows.check_fits(h.padding_ids, {"text": cfg.text_card_out or cfg.text_card, "audio": cfg.card})
    with jax.set_mesh(mesh):
        plan, state, frozen = build_state(args, h, mesh, cfg, host_params)
        return run(args, h, mesh, cfg, (ds, eval_ds), batch_size, plan, state, frozen)


def start(args, cfg, state, window_frames: int, this: dict):
    """-> (state, first step, data position), by checkpoint.begin. With TTT, a warning if windows
    are not longer than attention's context + one chunk: the first chunk never uses ΔW, and a later
    chunk within attention's reach recalls nothing attention does not see, so TTT learns nothing."""
    reach = (cfg.context or 0) + cfg.ttt.chunk_size if cfg.ttt else None
    if reach and window_frames <= reach:
        print(f"warning: TTT: windows of {window_frames} frames are not longer than the attention context "
              f"({cfg.context}) + one TTT chunk ({cfg.ttt.chunk_size}) = {reach} frames: TTT gets no useful "
              "gradient; prepare longer windows (--duration-sec) or pass a smaller --ttt-chunk", flush=True)
    return checkpoint.begin(args.run_dir, state, args.resume, args.overwrite, this)


class NonFiniteLoss(RuntimeError):
    """The loss, the gradient norm or the updated weights went NaN/inf: the message names the step
    (and, for the loss and the gradient, the batch's windows)."""


def evaluate(plan: Plan, state, frozen, ds: data.TokenWindows, G: int, args, cfg, sharding) -> dict:
    """moshi-finetune's evaluation: the loss of the eval windows, in order (no shuffling), averaged
    over batches of the run's batch size; as many batches as --eval-batches, by default its 40 per
    device batches (40 // devices global ones), as many as the data holds. Its "perplexity" is
    moshi-finetune's, 2 ** loss (the loss being in nats)."""
    n = min(args.eval_batches or max(1, 40 // sharding.mesh.size), len(ds) // G)
    batches = make_batch(ds, np.arange(n * G).reshape(n, G), sharding, cfg)        # [n, G, 17, T]
    loss, text, audio = np.asarray(plan.evaluate(state["params"], frozen, batches)).tolist()
    return {"eval_loss": loss, "eval_text_loss": text, "eval_audio_loss": audio,
            "eval_perplexity": 2.0 ** loss}


def log_step(args, rec: dict, max_steps: int, last: int, mfu, eta_s) -> None:
    """metrics.jsonl gets every step; the console every --log-every steps and the last one, and
    every evaluation."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(args.run_dir, checkpoint.METRICS), "a") as f:
        f.write(json.dumps(rec) + "\n")
    if rec["step"] % args.log_every == 0 or rec["step"] == last:
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown peak: --peak-tflops)"
        print(f"step {rec['step']}/{max_steps} | loss {rec['loss']:.4f} (text {rec['text_loss']:.4f}, "
              f"audio {rec['audio_loss']:.4f}) | grad {rec['grad_norm']:.3f} | lr {rec['lr']:.2e} | "
              f"{rec['tokens_per_s']:,.0f} tok/s | MFU {mfu_text} | ETA "
              f"{time.strftime('%H:%M:%S', time.gmtime(eta_s))}", flush=True)
    if "eval_loss" in rec:
        print(f"eval step {rec['step']} | loss {rec['eval_loss']:.4f} (text {rec['eval_text_loss']:.4f}, "
              f"audio {rec['eval_audio_loss']:.4f}) | perplexity {rec['eval_perplexity']:.3f}", flush=True)


def check_finite(m, step: int, ds, ids, position: int) -> None:
    """A step's metrics [loss, text, audio, grad_norm] must all be finite, else the update it made
    is garbage (an inf gradient norm makes the clipped update NaN, whatever the loss): the run stops
    before anything of it is saved, naming the step and the windows of its batch."""
    if not np.all(np.isfinite(m)):
        what = (f"loss is {m[0]} (text {m[1]}, audio {m[2]})" if not np.all(np.isfinite(m[:3]))
                else f"gradient norm is {m[3]} (loss {m[0]})")
        names = "\n  ".join(ds.name(int(i)) for i in ids.reshape(-1))
        raise NonFiniteLoss(f"step {step}: {what}; nothing of this step was saved; the batch (data "
                            f"position {position}) held:\n  {names}")


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_weights_finite(params, step: int, m) -> None:
    """Before a save: finite loss and gradient can still make non-finite weights (an lr that is inf
    in fp32), and a checkpoint of those would break every --resume. The run stops instead."""
    if not _all_finite(params):
        raise NonFiniteLoss(f"step {step}: the updated weights are not finite (loss {m[0]}, gradient norm "
                            f"{m[3]}): they were not saved; a smaller --lr?")


def run(args, h: Hyper, mesh, cfg, datasets, G: int, plan: Plan, state, frozen) -> list[dict]:
    """The steps, G windows per micro-batch (train() resolves --batch-size's default)."""
    (ds, eval_ds), A = datasets, args.grad_accum
    T = ds.window_frames
    this = checkpoint.run_meta(args, h, cfg)          # what the checkpoints record beside the state
    state, first, position = start(args, cfg, state, T, this)
    last = min(h.max_steps, args.stop_at or h.max_steps)
    tokens_per_step = A * G * T * (1 + cfg.dep_q)       # moshi-finetune's count: text + Moshi's codebooks
    flops, lr_at = flops_per_step(cfg, frozen or state["params"], A * G * T, T), one_cycle(h)[0]
    peak = peak_flops(args)
    print(f"train: mesh {dict(mesh.shape)}, {len(ds)} windows of {T} frames, {A} x {G} windows per step, "
          f"{'LoRA rank %d' % h.lora_rank if h.lora_rank else 'full fine-tuning'}, steps {first + 1}..{last}"
          + (f", TTT on layers {cfg.ttt.layers}" if cfg.ttt else "") + f", attention {attention_of(h)}")
    history, times, batch_sharding = [], [], NamedSharding(mesh, BATCH_SPEC)
    for step in range(first + 1, last + 1):
        ids = data.window_ids(len(ds), args.seed, position, A * G).reshape(A, G)    # [A, G] window ids
        t0 = time.perf_counter()
        state, metrics = plan.step(state, frozen, make_batch(ds, ids, batch_sharding, cfg))
        m = np.asarray(metrics)                          # waits for the step: each step is checked
        times.append(time.perf_counter() - t0)
        check_finite(m, step, ds, ids, position)
        position += A * G
        steady = np.mean(times[1:] or times)   # the first step also compiles
        losses = dict(zip(("loss", "text_loss", "audio_loss", "grad_norm"), m.tolist()))
        history.append({"step": step, **losses, "lr": float(lr_at(step - 1)), "step_time": times[-1],
                        "tokens_per_s": tokens_per_step / steady})
        if eval_ds and (step == last or (args.eval_every and step % args.eval_every == 0)):
            history[-1].update(evaluate(plan, state, frozen, eval_ds, G, args, cfg, batch_sharding))
        log_step(args, history[-1], h.max_steps, last, flops / steady / peak if peak else None,
                 steady * (h.max_steps - step))
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == last:
            check_weights_finite(state["params"], step, m)
            checkpoint.save(os.path.join(args.run_dir, checkpoint.CHECKPOINTS), step, state,
                            dict(this, data_position=position), args.keep_checkpoints)
    if args.export and last == h.max_steps and history:
        export(args.export, cfg, state, frozen, h, args.save_adapters)
    return history


def export(out_dir: str, cfg, state, frozen, h: Hyper, save_adapters: bool = False, dtype="bfloat16") -> str:
    """The trained model, LoRA merged in, written by checkpoint.write_model in Kyutai's naming (with
    save_adapters and LoRA, the adapters too, in moshi-finetune's). -> the model.safetensors path."""
    trained = state["params"]
    adapters, params = lora.from_trainable(trained, frozen) if h.lora_rank else (None, trained)
    adapters, params = jax.tree.map(checkpoint.to_host, (adapters, params))   # every process takes part
    if jax.process_index() != 0:
        return os.path.join(out_dir, "model.safetensors")
    with jax.default_device(jax.devices("cpu")[0]):
        params = lora.merged(params, adapters, h.lora_scaling)
    whole = [path for path in lora.trained_whole(params, h.lora_ft_embed) if path != ("ttt",)]   # TTT: ours
    return checkpoint.write_model(out_dir, cfg, params, adapters if save_adapters else None, dtype,
                                  h.lora_scaling, whole)


def export_checkpoint(args) -> str:
    """`train.py export`: a saved checkpoint (the newest, or --step's), on this process's first device."""
    found = checkpoint.list_dir(os.path.join(args.run_dir, checkpoint.CHECKPOINTS))
    found = [c for c in found if args.step in (None, checkpoint.step_of(c))]
    if not found:
        which = f" for step {args.step}" if args.step else ""
        raise SystemExit(f"export: no checkpoint{which} in {args.run_dir}")
    meta = checkpoint.read_meta(found[-1])
    run_args = argparse.Namespace(config=meta["config"], init_from=meta["init_from"], seed=meta["seed"],
                                  **{"ttt_" + k: v for k, v in (meta.get("ttt") or {}).items()})
    h = Hyper(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyper"].items()})
    mesh = make_mesh(1, 1)
    cfg, host_params = checkpoint.load_model(run_args)
    with jax.set_mesh(mesh):
        _, state, frozen = build_state(run_args, h, mesh, cfg, host_params)
        state = checkpoint.load(found[-1], state)
        return export(args.out, cfg, state, frozen, h, args.save_adapters, args.dtype)


# ----------------------------------------------------------------------------------------------
# Command line. A flag that sets a Hyper field is named after it (its dest) and takes its default
# from it, so the two cannot drift apart. Numbers are checked as they are parsed: a bad one is a
# one-line usage error naming the flag, before anything is loaded or written.

def checked(kind, ok, expected: str):
    """An argparse type: kind(text), refused unless ok(value)."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if ok(value := kind(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, "an integer >= 1")
COUNT = checked(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = checked(float, lambda v: 0 < v < math.inf, "a number > 0")
NON_NEGATIVE = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
BETA = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
SEED = checked(int, lambda v: v in moshi.SEEDS, f"an integer from 0 to {moshi.SEEDS[-1]}")


def _hyper_flags(a) -> None:
    def flag(field, name=None, **kw):                      # --max-steps sets max_steps, ...
        a(name or "--" + field.replace("_", "-"), dest=field, default=getattr(Hyper, field), **kw)
    flag("max_steps", type=POSITIVE_INT, help="length of the run (and of the lr schedule)")
    flag("lr", type=POSITIVE, help="the peak learning rate")
    flag("pct_start", type=FRACTION, help="the share of the run the lr rises for (OneCycle's)")
    flag("b2", "--beta2", metavar="BETA2", type=BETA)
    flag("eps", type=POSITIVE)
    flag("weight_decay", type=NON_NEGATIVE)
    flag("max_norm", type=POSITIVE, help="gradient clipping (global norm)")
    flag("text_padding_weight", type=NON_NEGATIVE, help="loss weight of PAD/EPAD text targets")
    flag("first_codebook_weight", type=NON_NEGATIVE,
         help="loss weight of the semantic codebook (moshi-finetune's example uses 100)")
    flag("lora_rank", type=COUNT, help="0: full fine-tuning; >0: LoRA on every linear layer")
    flag("lora_scaling", type=POSITIVE, help="LoRA multiplier: W + scaling * B @ A")
    flag("lora_ft_embed", "--lora-ft-embed", action="store_true",
         help="with LoRA, also train the embedding tables in full (moshi-finetune's lora.ft_embed)")
    flag("compute_dtype", "--dtype", choices=["bfloat16", "float32"],
         help="compute dtype (master weights are fp32)")
    flag("remat", "--no-remat", action="store_false",
         help="keep activations instead of recomputing each layer")
    flag("attention", choices=["auto", *helium.SUPPORTED["attention"]],
         help="the temporal transformer's attention (auto: Pallas on TPU, cuDNN on GPU, XLA otherwise)")


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
    a("--batch-size", type=POSITIVE_INT, help="windows per micro-batch, whole mesh (default: one per device)")
    a("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    a("--stop-at", type=POSITIVE_INT, help="stop after this step (a job time slice); continue with --resume")
    a("--eval-data", help="held-out windows (a folder written by prepare): their loss after the last step")
    a("--eval-every", type=COUNT, default=0, help="with --eval-data: also every this many steps (0: no)")
    a("--eval-batches", type=POSITIVE_INT, help="with --eval-data: batches of --batch-size windows "
      "(default: moshi-finetune's 40 per device, 40 // devices; at most what the data holds)")
    _hyper_flags(a)
    checkpoint.add_ttt_flags(a)
    a("--seed", type=SEED, default=0)
    a("--log-every", type=POSITIVE_INT, default=1)
    a("--ckpt-every", type=COUNT, default=100, help="0: only at the end")
    a("--keep-checkpoints", type=COUNT, default=3, help="0: all")
    again = ap.add_mutually_exclusive_group().add_argument
    again("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    again("--overwrite", action="store_true", help="start over in a used --run-dir (removes its run files)")
    a("--export", help="after training, write model.safetensors (Kyutai naming, LoRA merged) here")
    a("--save-adapters", action="store_true", help="with --export and LoRA: also the adapters (adapters/)")
    a("--peak-tflops", type=POSITIVE, help="per-device peak for the MFU estimate (default: by device kind)")
    checkpoint.add_host_flags(a)
    return ap


def export_parser():
    ap = argparse.ArgumentParser(prog="train.py export", description=(
        "Export a checkpoint to Kyutai's safetensors naming (LoRA merged)."))
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--step", type=int, help="default: the newest checkpoint")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--save-adapters", action="store_true", help="LoRA runs: also the adapters (adapters/)")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:                     # the data side: data.py
        return data.main(argv[1:], prog="train.py prepare")
    if argv[:1] == ["export"]:
        return export_checkpoint(export_parser().parse_args(argv[1:]))
    if argv[:1] == ["train"]:
        argv = argv[1:]
    args = train_parser().parse_args(argv)
    checkpoint.join_hosts(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:   # bad input: no traceback
        sys.exit(f"train.py: {e}")
