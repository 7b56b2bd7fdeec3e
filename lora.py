"""lora.py: LoRA as moshi-finetune does it, on our param dicts: which weights get adapters, their
init, merging them in, and the split of a LoRA run into the frozen base and what trains.

train.py trains these trees (sharded: its layer hook gathers and merges a layer's adapters just
before the layer runs); convert.py names them on disk as moshi-finetune's consolidated/
lora.safetensors. This file does no sharding and no I/O: copied with convert.py (for its path
helpers), it is LoRA for any model made of helium's layers, whose params are nested dicts of
[..., out, in] matrices (moshi.py's embedding tables are named below: lookups get no adapters).

Reference: kyutai-labs/moshi-finetune (moshi/modules/lora.py, finetune/wrapped_model.py).
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

import convert


# LoRA, as in moshi-finetune (moshi/modules/lora.py): every linear weight W [..., out, in] gets
# A [..., r, in] and B [..., out, r] and acts as W + scaling * B @ A, `scaling` being the plain
# multiplier (2.0 in their examples, not alpha / r). A starts kaiming-uniform (torch's default for
# nn.Linear: U(-1/sqrt(in), 1/sqrt(in))), B at zero, so training starts from the base model.
# Embeddings and norms get none. Only A and B are trained; the base stays frozen in bf16.
# In-Place TTT's own weights (params["ttt"]: each TTT layer's conv and P) are the exception: they
# train in full, LoRA or not. They are new (no base model has them) and the conv starts at zero, so
# freezing them, as moshi-finetune's LoRA freezes every weight outside its adapters, would leave
# TTT a silent no-op. With ft_embed (moshi-finetune's lora.ft_embed) the embedding tables train in
# full too. A LoRA run's trainable tree is therefore the adapters plus those whole weights.

def is_layer_stack(tree) -> bool:
    """A helium layer stack: a dict with 'attn' and 'mlp' whose leaves have a leading layer axis."""
    return isinstance(tree, dict) and "attn" in tree and "mlp" in tree


def inside_stack(tree, path) -> bool:
    return any(is_layer_stack(convert.get_path(tree, path[:i])) for i in range(len(path)))


def is_adapter(tree) -> bool:
    return isinstance(tree, dict) and set(tree) == {"a", "b"}


def adapters(lora):
    """(path, {"a", "b"}) of every adapter of a LoRA tree (or of None: none)."""
    return convert.walk(lora or {}, is_adapter)


EMBEDDING_TABLES = ("emb", "text_emb")       # lookups, not matmuls: no LoRA (as in Kyutai)


def targets(params) -> dict:
    """{path: W} of every linear weight, as Kyutai's LoRA replaces every nn.Linear: the matrices of
    the layer stacks ([L, (steps,) out, in]) and the heads and projections outside them (the
    depformer's low-rank embedding projections included); not embedding tables, not norms."""
    out = {}
    for path, w in convert.walk({k: v for k, v in params.items() if k != "ttt"}):     # TTT: trained whole
        is_norm = any("norm" in k for k in path)           # the depformer's per-step norms are 2-D too
        plain = w.ndim >= 2 and path[-1] not in EMBEDDING_TABLES and not is_norm
        if (w.ndim >= 3) if inside_stack(params, path) else plain:
            out[path] = w
    return out


def init(key, params, rank: int) -> dict:
    """A nested dict mirroring params, with {"a", "b"} (fp32) at every LoRA target."""
    lora, found = {}, sorted(targets(params).items())
    for k, (path, w) in zip(jax.random.split(key, len(found)), found):
        *lead, n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(k, (*lead, rank, n_in), jnp.float32, -bound, bound)
        convert.set_path(lora, path, {"a": a, "b": jnp.zeros((*lead, n_out, rank), jnp.float32)})
    return lora


def merge(w, ab, scaling: float):
    """W + scaling * B @ A, computed in fp32 and returned in W's dtype."""
    delta = jnp.einsum("...or,...ri->...oi", ab["b"].astype(jnp.float32), ab["a"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scaling * delta).astype(w.dtype)


def _dicts_copied(tree):
    return {k: _dicts_copied(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def merged(params, lora, scaling: float):
    """The full weights a LoRA run stands for (what export writes)."""
    out = _dicts_copied(params)
    for path, ab in adapters(lora):
        convert.set_path(out, path, merge(convert.get_path(params, path), ab, scaling))
    return out


def trained_whole(params, ft_embed: bool) -> list:
    """The paths of the weights a LoRA run trains in full beside its adapters: params["ttt"], and with
    ft_embed every embedding table (moshi-finetune's ft_embed trains every parameter whose
    name holds "emb"; the low-rank projections of such tables keep their adapters instead)."""
    paths = [("ttt",)] if "ttt" in params else []
    if ft_embed:
        paths += [path for path, _ in convert.walk(params) if path[-1] in EMBEDDING_TABLES]
    return paths


def to_trainable(params, lora, paths):
    """A LoRA run's (frozen, trainable) trees from the model's params and the adapters: the weights
    at `paths` (trained_whole) move from the params to the adapters' tree. (Any trees shaped so:
    params and adapters, or their PartitionSpecs.)"""
    frozen, trainable = _dicts_copied(params), _dicts_copied(lora)
    for path in paths:
        convert.set_path(trainable, path, convert.get_path(frozen, path[:-1]).pop(path[-1]))
    return frozen, trainable


def from_trainable(trainable, frozen):
    """The way back: (adapters, the model's params), whatever of `trainable` is not an adapter
    ({"a", "b"}) returning into the params."""
    lora, params = {}, _dicts_copied(frozen)
    for path, x in convert.walk(trainable, is_adapter):
        convert.set_path(lora if is_adapter(x) else params, path, x)
    return lora, params



# ----------------------------------------------------------------------------------------------
# Demo: what LoRA adapts in one of moshi.py's presets, from shapes alone (nothing is allocated).

def main(argv=None):
    import moshi                                    # the demo's model only: LoRA itself needs none
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="moshiko", choices=sorted(moshi.PRESETS))
    ap.add_argument("--rank", type=int, default=128)
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error(f"--rank must be at least 1, got {args.rank}")
    params = jax.eval_shape(lambda k: moshi.init(k, moshi.PRESETS[args.preset]), jax.random.key(0))
    found = targets(params)
    adapter_params = sum(math.prod(w.shape[:-2]) * args.rank * sum(w.shape[-2:]) for w in found.values())
    for path, w in sorted(found.items()):
        print(f"  {'.'.join(path):40s} {tuple(w.shape)}")
    base = sum(math.prod(w.shape) for w in jax.tree.leaves(params))
    print(f"{args.preset}: LoRA rank {args.rank} adapts {len(found)} weight arrays: "
          f"{adapter_params / 1e6:,.1f} M adapter parameters beside {base / 1e6:,.1f} M frozen ones")


if __name__ == "__main__":
    main()
