"""checkpoint.py: training checkpoints: per-process shards written atomically, read back onto any mesh.

    python checkpoint.py list runs/my-run                                # steps, data positions, health
    python checkpoint.py inspect runs/my-run/checkpoints/step_000100     # its leaves: names, shapes, dtypes

train.py's state (fp32 master weights or LoRA adapters, and Adam's two moments) lives sharded over a
(dp, fsdp) mesh that may span many hosts. Gathering it onto one host to save it would need the whole
state in one host's memory (84 GB for a 7B model), so each process writes only the shards its own
devices hold, and a checkpoint is a directory:

    step_000100/meta.json           the run's settings (train.py's), the step, the data position,
                                    every leaf's global shape and dtype, the number of processes
    step_000100/process_00000.npz   one per process: its shards, one copy of each (replica 0), keyed
                                    "leaf name@start index", e.g. "['params']['emb']@0,0,32"

Plain .npz files, no orbax: numpy reads them anywhere. An .npz has no bfloat16, so bf16 shards are
stored as their raw uint16 bits, and meta.json says what they are.

Atomic: everything is written into step_000100.tmp/, each file fsync'ed, and the directory is renamed
to step_000100/ once every process is done; a run killed while saving leaves only a .tmp directory,
which is not a checkpoint and is removed when the run starts again. Reading back assembles each
device's block from whichever saved pieces overlap it, so a state saved on one mesh comes back on
another (another dp x fsdp, another number of hosts).

The sections, top to bottom: 1. the hosts: joined into one program, and arrays between them and
the mesh (Kyutai's checkpoints, read by --init-from and written by export, go through them too);
2. saving; 3. reading back (a file that cannot be read is named, as a CorruptCheckpoint); 4. the
run directory: metrics.jsonl and checkpoints/, refusing to write over a used one, starting over,
resuming from the newest checkpoint that can be read; 5. Kyutai's checkpoints in and out of a run
(the model it starts from, with --init-from and the --ttt-* flags, and export's files); 6. the
command line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import convert
import moshi
import repo
import ttt


# ----------------------------------------------------------------------------------------------
# 1. The hosts. train.py runs as one process per host; they are joined into one JAX program before
# any JAX computation (train.py's --distributed, --coordinator-address, ... flags, or a launcher
# that JAX recognises). A global array is then the sum of the blocks its devices hold, and each
# process makes (or reads) only the blocks of its own devices, so that a model or a state is never
# whole in one host's memory on its way onto, or off, the mesh.

def multi_process_launcher(env=os.environ) -> str | None:
    """The launcher that started this program as one of several processes, if any: then
    jax.distributed.initialize() finds the others by itself (its cluster auto-detection)."""
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "Slurm (srun)"        # a job step of several tasks: not sbatch's script, not salloc's shell
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI (mpirun)"   # Open MPI <= 4, what JAX detects; with 5, pass --coordinator-address
    tpu_hosts = max(len([h for h in env.get(n, "").split(",") if h])
                    for n in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"))
    if tpu_hosts > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "a multi-host TPU slice"
    return None


def add_host_flags(add) -> None:
    """train.py's flags for joining the hosts (join_hosts reads them), on an argparse add_argument."""
    add("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host; "
        "automatic under srun, mpirun, TPU pod environments, or when JAX_COORDINATOR_ADDRESS is set)")
    add("--coordinator-address", help="host:port of process 0 (else detected by jax: TPU pods, SLURM, ...)")
    add("--num-processes", type=int)
    add("--process-id", type=int)


def join_hosts(args) -> None:
    """One process per host: join them before any JAX computation. Explicit flags win; otherwise a
    known launcher (Slurm, Open MPI, TPU pod environments) is detected. (On a Cloud TPU VM pod slice
    started by hand, libtpu already joins the hosts; --distributed adds JAX's coordination service.)"""
    explicit = args.distributed or args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    launcher = None if explicit else multi_process_launcher()
    if launcher:
        print(f"started by {launcher}: jax.distributed.initialize()", flush=True)
    if explicit or launcher:
        given = ("coordinator_address", "num_processes", "process_id")
        jax.distributed.initialize(**{k: getattr(args, k) for k in given if getattr(args, k) is not None})


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


def to_host(x):
    """A global array -> numpy on this host, whole (all processes take part when there are several)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------
# 2. Saving. Every process takes part: it writes its own file, and waits for the others at three
# barriers (the .tmp directory made, every file written, the rename done), so that no process
# runs ahead onto a checkpoint that is not there yet.

def named_leaves(tree) -> list:
    """[(name, leaf)] of a pytree, named as jax.tree_util.keystr writes paths (the checkpoint keys)."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _pieces(state) -> dict:
    """-> {"leaf@start": this process's shard as numpy}."""
    pieces = {}
    for name, x in named_leaves(state):
        for shard in x.addressable_shards:
            if shard.replica_id == 0:                       # one copy of each block, whoever holds it
                start = ",".join(str(s.start or 0) for s in shard.index)
                local = np.asarray(shard.data)
                pieces[f"{name}@{start}"] = local.view(np.uint16) if local.dtype == jnp.bfloat16 else local
    return pieces


def save(ckpt_dir: str, step: int, state, meta: dict, keep: int) -> str:
    """Write ckpt_dir/step_NNNNNN (all processes call this) and keep only the newest `keep` (0: all).
    Checkpoints of this step or later already there can only be ones that resume passed over as
    unreadable: they do not count against `keep`, and this step's own is set aside (not deleted)
    as step_NNNNNN.corrupt (.corrupt+, ... when that name is taken)."""
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp, first_process = final + ".tmp", jax.process_index() == 0
    if first_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(f"ckpt-mkdir-{step}")
    with convert.atomic_open(os.path.join(tmp, f"process_{jax.process_index():05d}.npz")) as f:
        np.savez(f, **_pieces(state))
    _barrier(f"ckpt-written-{step}")
    if first_process:                                   # meta.json: every leaf's global shape and dtype
        leaves = {name: {"shape": list(x.shape), "dtype": str(x.dtype)} for name, x in named_leaves(state)}
        with convert.atomic_open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, leaves=leaves, processes=jax.process_count()), f, indent=1)
        convert.fsync(tmp)
        if os.path.exists(final):                    # set aside, beside any earlier one set aside
            aside = final + ".corrupt"
            while os.path.exists(aside):
                aside += "+"
            os.replace(final, aside)
        os.replace(tmp, final)
        convert.fsync(ckpt_dir)
        done = [p for p in list_dir(ckpt_dir) if step_of(p) <= step]     # not a later, unreadable one
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(f"ckpt-done-{step}")
    return final


# ----------------------------------------------------------------------------------------------
# 3. Reading back. A file can be damaged after it was written whole (a disk filling up under a
# copy, a truncated transfer): whatever numpy, zipfile or json then raise becomes one
# CorruptCheckpoint naming the file, which the run directory's `newest` catches to fall back.

class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, altered, missing): the message names it."""


@contextlib.contextmanager
def _reading(file: str):
    try:
        yield
    except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpoint(f"{file} is corrupt or unreadable ({type(e).__name__}: {e})") from None


def step_of(path: str) -> int | None:
    """step_000012 -> 12; None for any other name (step_000012.tmp, step_000012.corrupt, ...)."""
    head, _, digits = os.path.basename(path).partition("_")
    return int(digits) if head == "step" and digits.isdigit() else None


def list_dir(ckpt_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (half-written .tmp directories are not checkpoints)."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    paths = [os.path.join(ckpt_dir, n) for n in names if step_of(n) is not None]
    return sorted((p for p in paths if os.path.exists(os.path.join(p, "meta.json"))), key=step_of)


def read_meta(path: str) -> dict:
    file = os.path.join(path, "meta.json")
    with _reading(file), open(file) as f:
        meta = json.load(f)
        if not (isinstance(meta, dict) and {"step", "leaves", "processes"} <= meta.keys()):
            raise ValueError("not a checkpoint's meta.json: it lacks step, leaves or processes")
    return meta


def load(path: str, like):
    """Fill a state shaped and sharded like `like` (a tree of jax arrays) from a checkpoint dir."""
    meta = read_meta(path)
    pieces = {}
    for p in range(meta["processes"]):
        file = os.path.join(path, f"process_{p:05d}.npz")
        with _reading(file):
            f = np.load(file)
            for key in f.files:
                name, start = key.rsplit("@", 1)
                origin = tuple(map(int, start.split(","))) if start else ()
                pieces.setdefault(name, []).append((origin, _piece_shape(f, key), f, key, file))

    def restore(path_, x):
        name = jax.tree_util.keystr(path_)
        if name not in meta["leaves"]:
            raise ValueError(f"checkpoint {path} has no state leaf {name}: another version of train.py "
                             "wrote it (its optimizer state differs)")
        found = tuple(meta["leaves"][name]["shape"])
        if found != x.shape:
            raise ValueError(f"checkpoint {path}: state leaf {name} has shape {x.shape}, "
                             f"checkpoint has {found}")
        dtype = np.dtype(meta["leaves"][name]["dtype"])
        return jax.make_array_from_callback(x.shape, x.sharding, lambda index: _assemble(
            pieces.get(name, []), x.shape, dtype, f"{path}: {name}", index).astype(x.dtype))
    return jax.tree_util.tree_map_with_path(restore, like)


def _piece_shape(f, key) -> tuple:
    """A saved piece's shape from its .npy header alone: a device's block reads only the pieces it
    overlaps (on a pod, each piece once, not once per block of every device)."""
    with f.zip.open(key + ".npy") as raw:
        major, _ = np.lib.format.read_magic(raw)
        header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return header(raw)[0]


def _assemble(pieces, shape, dtype, what: str, index) -> np.ndarray:
    """The block `index` (a tuple of slices) of a leaf, copied from the saved pieces overlapping it."""
    begin, end = np.array([s.indices(n)[:2] for s, n in zip(index, shape)], int).reshape(-1, 2).T  # 0-d: ()
    out = np.empty(end - begin, dtype)
    filled = 0
    for start, piece_shape, f, key, file in pieces:
        lo, hi = np.maximum(begin, start), np.minimum(end, np.add(start, piece_shape))      # the overlap
        if np.all(lo < hi):                             # only overlapping pieces are read from disk
            with _reading(file):
                saved = f[key].view(dtype)              # bf16's uint16 bits -> bf16; others as they are
                if saved.shape != tuple(piece_shape):
                    raise ValueError(f"piece {key} holds {f[key].dtype}, meta.json says {dtype}")
            out[tuple(map(slice, lo - begin, hi - begin))] = saved[tuple(map(slice, lo - start, hi - start))]
            filled += int(np.prod(hi - lo))
    if filled != out.size:
        raise CorruptCheckpoint(f"checkpoint {what}: part of it is missing (a process file lost?)")
    return out


# ----------------------------------------------------------------------------------------------
# 4. train.py's run directory: metrics.jsonl (one JSON line per step) and checkpoints/. A used one
# is described in words, so that a run refusing to write over it can say what is there; starting
# over removes only what a run writes; resuming takes the newest checkpoint that can be read.

METRICS, CHECKPOINTS = "metrics.jsonl", "checkpoints"


def contents(run_dir: str) -> list[str]:
    """What run_dir holds, in words: e.g. ["metrics.jsonl", "2 checkpoints (step 8, 12)"]; []: nothing."""
    names = sorted(os.listdir(run_dir), key=lambda n: (n == CHECKPOINTS, n)) if os.path.isdir(run_dir) else []
    words = [name + "/" * os.path.isdir(os.path.join(run_dir, name)) for name in names]
    found = list_dir(os.path.join(run_dir, CHECKPOINTS))
    if found:                                   # then checkpoints/ is there, sorted last: told by its steps
        steps = ", ".join(str(step_of(p)) for p in found)
        words[-1] = f"{len(found)} checkpoint{'s' * (len(found) > 1)} (step {steps})"
    return words


def refuse_used(run_dir: str, resume: bool, overwrite: bool) -> None:
    """A used run_dir is neither written over nor continued unless the user says which: a
    ValueError naming what is there, raised before anything is loaded or written."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"--run-dir {run_dir} is a file, not a folder")
    held = contents(run_dir)
    if held and not (resume or overwrite):
        listing = " and ".join(filter(None, [", ".join(held[:-1]), held[-1]]))
        raise ValueError(f"{run_dir} already holds {listing}: pass --resume to continue or --overwrite "
                         "to start over")


def run_meta(args, h, cfg) -> dict:
    """What a run's checkpoints record beside the state (h: train.Hyper, cfg: its moshi.LMConfig):
    what must agree for a checkpoint to be resumed (SAME_RUN), and what `train.py export` needs
    to rebuild the model."""
    return {"hyper": dataclasses.asdict(h), "config": args.config, "init_from": args.init_from,
            "lm_config": repr(cfg), "seed": args.seed, "data": os.path.abspath(args.data),
            "ttt": cfg.ttt and {f: getattr(cfg.ttt, f) for f in TTT_FLAGS}}


# the same model, seed, training
SAME_RUN = ("config", "init_from", "lm_config", "seed", "lora_rank", "lora_scaling", "lora_ft_embed")
UNRECORDED = {"lora_ft_embed": False}     # what a setting older checkpoints do not record was then


def begin(run_dir: str, like, resume: bool, overwrite: bool, this: dict, log=print):
    """Before the first step -> (state, step, data position): `like` (the fresh state) at step 0
    (overwrite: the run's old metrics and checkpoints removed first), or with resume the newest
    checkpoint that can be read of the same run as `this` (run_meta). Then the run dir is tidied."""
    if overwrite:            # every process clears (and waits), whatever it saw: it may look late
        if contents(run_dir):
            log(f"overwrite: removing the {METRICS} and {CHECKPOINTS}/ of {run_dir}")
        clear(run_dir)
    found = newest(run_dir, like, this, log) if resume else None
    meta, state = found or ({"step": 0, "data_position": 0}, like)
    tidy(run_dir, meta["step"])
    return state, meta["step"], meta["data_position"]


def clear(run_dir: str) -> None:
    """--overwrite: remove what a run writes into run_dir (metrics.jsonl, checkpoints/), nothing else."""
    if jax.process_index() == 0:
        if os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
            shutil.rmtree(os.path.join(run_dir, CHECKPOINTS))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, METRICS))
    _barrier("run-dir-cleared")


def _everyone(ok: bool) -> bool:
    """True when it holds on every process (so that all of them take the same branch)."""
    return ok if jax.process_count() == 1 else bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def newest(run_dir: str, like, this: dict, log):
    """-> (meta, state) of the newest checkpoint in run_dir that can be read, or None (said in the
    log: the run starts from step 0) if there is none at all. One of another run (SAME_RUN differs
    from `this`) is an error, not a reason to fall back. One that cannot be read is named in a
    one-line warning, left where it is, and the one before it is tried; if none can be read,
    CorruptCheckpoint."""
    def field(meta, k):
        return meta[k] if k in meta else meta.get("hyper", {}).get(k, UNRECORDED.get(k))
    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    found = list_dir(ckpt_dir)
    for path in reversed(found):
        try:
            meta = read_meta(path)
            for k in SAME_RUN:
                if field(meta, k) != field(this, k):
                    raise ValueError(f"resume: {path} was made with {k}={field(meta, k)!r}, this run has "
                                     f"{field(this, k)!r}")
            state, problem = load(path, like), None
        except CorruptCheckpoint as e:
            problem = e
        if _everyone(problem is None):
            log(f"resume: {path} (step {meta['step']}, data position {meta['data_position']})")
            return meta, state
        log(f"warning: resume: {problem or f'another process cannot read {path}'}; trying the one before")
    if found:
        raise CorruptCheckpoint(f"resume: none of the {len(found)} checkpoints in {ckpt_dir} can be read "
                                "(see the warnings above); --overwrite starts over")
    log(f"resume: no checkpoint in {run_dir}, starting from step 0")
    return None


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def tidy(run_dir: str, step: int) -> None:
    """Before the first step (process 0): checkpoints/ made, the leftovers of an interrupted save
    (.tmp) removed, and the metrics logged after `step` dropped (the run logs those steps again)."""
    if jax.process_index() != 0:
        return
    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(ckpt_dir, exist_ok=True)
    for name in os.listdir(ckpt_dir):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    metrics = os.path.join(run_dir, METRICS)
    if os.path.exists(metrics):
        with open(metrics) as f:  # a line cut short by the interruption is dropped, not fatal
            kept = [line for line in f if _logged_step(line) <= step]
        with convert.atomic_open(metrics, "w") as f:
            f.writelines(kept)


# ----------------------------------------------------------------------------------------------
# 5. Kyutai's checkpoints, in and out of a run: the model it starts from (a preset, a config.json,
# or --init-from a Kyutai checkpoint, with In-Place TTT added or changed by the --ttt-* flags), and
# the model it ends with, written by export in Kyutai's naming so that the official stacks load it.

def load_model(args):
    """-> (cfg, host params or None). --config: a preset of moshi.PRESETS or a Kyutai config.json
    (any architecture). --init-from: a Kyutai checkpoint, found as sample.py's --hf-repo finds one
    (repo.find_checkpoint), read onto the host (CPU) so that `place` can hand each device its slice.
    The --ttt-* flags change the config before any weight is read (see with_ttt); TTT weights the
    checkpoint lacks are left to train.build_state."""
    name = args.config or ("" if args.init_from else "tiny")
    if name and not name.endswith(".json") and name not in moshi.PRESETS:
        raise ValueError(f"--config {name!r}: unknown; choose from {sorted(moshi.PRESETS)} "
                         "or give a config.json")
    config = name and (repo.lm_config(name) if name.endswith(".json") else moshi.PRESETS[name])
    if not args.init_from:
        return with_ttt(config, ttt_flags(args), f"--config {name}"), None
    if os.path.isdir(os.path.join(args.init_from, CHECKPOINTS)):
        raise ValueError(f"--init-from {args.init_from}: a train.py run directory, not a Kyutai checkpoint: "
                         f"continue it with --run-dir {args.init_from} --resume, or start from its model "
                         f"with `python train.py export --run-dir {args.init_from} --out DIR` and "
                         "--init-from DIR")
    ckpt = repo.find_checkpoint(args.init_from, lm_only=True, flags={"repo": "--init-from", "lora": None})
    base = config or repo.lm_config_for(ckpt, print)
    cfg = with_ttt(base, ttt_flags(args), f"--init-from {args.init_from}")
    with jax.default_device(jax.devices("cpu")[0]):
        return cfg, jax.tree.map(np.asarray, convert.load_lm(ckpt.moshi, base, lora=ckpt.lora))


# In-Place TTT on the command line: --ttt-layers puts it on a model (a preset, or a checkpoint that
# has none), the other --ttt-* flags set fields of its ttt.TTTConfig. What is not given keeps the
# checkpoint's value or TTTConfig's default, and TTTConfig checks the values: one home for both.
TTT_FLAGS = {"layers": "--ttt-layers", "chunk_size": "--ttt-chunk", "lr": "--ttt-lr",
             "target": "--ttt-target"}


def add_ttt_flags(add) -> None:
    """train.py's --ttt-* flags, on an argparse add_argument (dests ttt_<TTTConfig field>)."""
    d = ttt.TTTConfig
    add("--ttt-layers", type=ttt_layers, help="add In-Place TTT (ttt.py) on these temporal layers: "
        "5,11,17,23,29 or every:6:5 (every 6th from layer 5); a checkpoint with TTT keeps its own. "
        "TTT weights train in full, LoRA or not")
    add("--ttt-chunk", dest="ttt_chunk_size", metavar="FRAMES", type=int,
        help=f"frames per TTT chunk (default {d.chunk_size})")
    add("--ttt-lr", type=float, help=f"TTT's inner learning rate eta (default {d.lr})")
    add("--ttt-target", choices=ttt.TARGETS, help=f"what TTT's memory learns to recall (default {d.target})")


def ttt_layers(text: str):
    """--ttt-layers: '5,11,17' -> those layers; 'every:K:START' -> a function of the model's depth,
    ttt.every_kth_layer(K, START, num_layers), which with_ttt calls."""
    head, _, rest = text.partition(":")
    try:
        if head == "every":
            k, first = (int(v) for v in rest.split(":"))
            return functools.partial(ttt.every_kth_layer, k, first)
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 5,11,17 or every:K:START like "
                                         f"every:6:5, got {text!r}") from None


def ttt_flags(args) -> dict:
    """{TTTConfig field: value} of the --ttt-* flags given (namespaces without them: none)."""
    return {f: getattr(args, "ttt_" + f) for f in TTT_FLAGS if getattr(args, "ttt_" + f, None) is not None}


def with_ttt(cfg, flags: dict, what: str):
    """cfg with the TTT the flags ask for (flags["layers"]: layer indices, or ttt_layers' function
    of the depth). Refused: --ttt-chunk etc. with no TTT layers to set them on, other layers than
    a checkpoint's own TTT layers (its TTT weights are theirs), and what TTTConfig refuses."""
    if not flags:
        return cfg
    if "layers" in flags:
        layers = flags["layers"]                        # a tuple, a list (meta.json's) or every:K:START's
        flags = {**flags, "layers": tuple(layers(cfg.num_layers) if callable(layers) else layers)}
    elif cfg.ttt is None:
        raise ValueError(f"{', '.join(TTT_FLAGS[f] for f in flags)}: {what} has no TTT layers; add them "
                         "with --ttt-layers")
    if cfg.ttt is not None and flags.get("layers", cfg.ttt.layers) != cfg.ttt.layers:
        raise ValueError(f"--ttt-layers {flags['layers']}: {what} already has TTT on layers {cfg.ttt.layers}")
    old = dataclasses.asdict(cfg.ttt) if cfg.ttt is not None else {}
    try:
        return dataclasses.replace(cfg, ttt=ttt.TTTConfig(**{**old, **flags}))
    except ValueError as e:
        raise ValueError(f"{' '.join(f'{TTT_FLAGS[f]} {v}' for f, v in flags.items())}: {e}") from None


def write_model(out_dir: str, cfg, params, adapters, dtype, lora_scaling: float, whole=()) -> str:
    """Full model params (host arrays) -> out_dir/model.safetensors and config.json, which the
    official PyTorch, MLX and Rust stacks and sample.py load like a released checkpoint; with LoRA
    adapters, also out_dir/adapters/ as moshi-finetune's consolidated/ folder: lora.safetensors in
    its naming and a config.json with "lora": true, lora_rank and lora_scaling, for the base model
    (`--lora-weight out/adapters/lora.safetensors --config out/adapters/config.json`, here and in
    Kyutai's scripts), with the weights at paths `whole` that the run trained in full beside them
    (--lora-ft-embed's embedding tables, which Kyutai's loader loads over the base's). A model with
    TTT layers is ours alone (their weights, config.json's "ttt" entry), and the message says so."""
    def config_json(folder, **extra):
        with convert.atomic_open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(repo.lm_config_dict(cfg), **extra), f, indent=1)
    path, dtype = os.path.join(out_dir, "model.safetensors"), jnp.dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    convert.save_lm(path, jax.tree.map(lambda x: np.asarray(x).astype(dtype), params), cfg)
    config_json(out_dir, moshi_name="model.safetensors")
    if adapters is not None:
        tensors = {k: v.astype(dtype) for k, v in convert.lora_tensors(adapters, cfg, params, whole).items()}
        rank = next(v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight"))
        adapters_dir = os.path.join(out_dir, "adapters")
        os.makedirs(adapters_dir, exist_ok=True)
        convert.save_safetensors(os.path.join(adapters_dir, "lora.safetensors"), tensors, {"format": "pt"})
        config_json(adapters_dir, lora=True, lora_rank=rank, lora_scaling=lora_scaling)
    print(f"export: wrote {path}" + (" and adapters/" if adapters is not None else ""))
    if cfg.ttt is not None:
        print(f"export: {out_dir} has TTT layers: Kyutai's moshi package cannot load it; sample.py --hf-repo "
              f"{out_dir} and train.py --init-from {out_dir} do"
              + ("" if adapters is None else " (adapters/ holds the LoRA adapters, not the TTT weights)"))
    return path


# ----------------------------------------------------------------------------------------------
# 6. The command line: look at checkpoints without a device, a model or the data (meta.json and
# the process files' zip directories are read, a few KB however large the state).

def list_main(where: str) -> None:
    ckpt_dir = os.path.join(where, CHECKPOINTS) if os.path.isdir(os.path.join(where, CHECKPOINTS)) else where
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{where}: no such run directory")
    names = os.listdir(ckpt_dir)
    if not any(n.startswith("step_") for n in names):          # not even a save that never finished
        raise FileNotFoundError(f"{where}: no checkpoints (neither a train.py --run-dir that saved one "
                                "nor its checkpoints/ folder)")
    for path in list_dir(ckpt_dir):
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        try:                     # meta.json, and every process file's zip directory (at its end: cheap)
            meta = read_meta(path)
            for file in (os.path.join(path, f"process_{p:05d}.npz") for p in range(meta["processes"])):
                with _reading(file), zipfile.ZipFile(file):
                    pass
            state = f"data position {meta.get('data_position', '?')}, complete"
        except CorruptCheckpoint as e:
            state = f"UNREADABLE: {e}"
        print(f"{os.path.basename(path)}  {size / 1e6:,.1f} MB  {state}")
    others = sorted(n for n in names if step_of(n) is None)
    if others:
        print("not checkpoints (.tmp: a save that never finished; .corrupt: passed over by resume): "
              + ", ".join(others))


def inspect_main(path: str) -> None:
    meta = read_meta(path)
    keys = ("step", "data_position", "processes", "config", "init_from", "seed")
    print(", ".join(f"{k} {meta[k]}" for k in keys if k in meta))
    for name, info in meta["leaves"].items():
        print(f"  {name}  {tuple(info['shape'])}  {info['dtype']}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="checkpoint.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="a run's checkpoints: size, data position, or why meta.json cannot be read") \
        .add_argument("run_dir", help="a --run-dir of train.py, or its checkpoints/ folder")
    sub.add_parser("inspect", help="one checkpoint's leaves: name, global shape, dtype") \
        .add_argument("path", help="a checkpoint directory, e.g. runs/x/checkpoints/step_000100")
    args = ap.parse_args(argv)
    if args.command == "list":
        list_main(args.run_dir)
    else:
        inspect_main(args.path)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:                 # bad input: no traceback
        sys.exit(f"checkpoint.py: {e}")
