"""bench.py: speed of moshi-jax, side by side with Kyutai's official PyTorch package on the same machine.

    python bench.py                      # every section
    python bench.py --only mimi          # Mimi: encode/decode throughput, streaming latency per 80 ms frame
    python bench.py --only train         # train.py: one training step (fwd + bwd + AdamW), tokens/s
    python bench.py --only train --train-config 1b --train-dtype bfloat16 --no-torch   # GPU/TPU: + MFU
    python bench.py --only conversation  # a 10-minute conversation: time per frame and memory, start vs end

Our numbers come from this process. The official ones come from a subprocess running
`--torch-python` (default ~/oracle/bin/python, a venv with torch and `moshi`); without it, or with
--no-torch, only our column is printed. Both sides use random weights of the real shapes (speed does
not depend on the values) unless --mimi-weights is given. One function per section (bench_mimi,
bench_lm, bench_train, bench_conversation); each returns rows for the markdown table printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_TORCH_PYTHON = os.path.expanduser("~/oracle/bin/python")


def _timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of `reps` calls of fn (which must block until its result is ready)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_official(script: str, args) -> dict | None:
    """Run a timing script under the official package's Python; it prints one JSON line last."""
    if args.no_torch or not os.path.exists(args.torch_python):
        return None
    with tempfile.TemporaryDirectory() as tmp:       # cwd away from the repo: our moshi.py must not shadow theirs
        proc = subprocess.run([args.torch_python, "-c", script, json.dumps(vars(args))], cwd=tmp,
                              capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"(official benchmark failed, showing ours only)\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Mimi

_MIMI_OFFICIAL = r"""
import json, sys, time
import numpy as np, torch
from moshi.models import loaders
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"] or torch.get_num_threads())
mimi = loaders.get_mimi(args["mimi_weights"], num_codebooks=8)
# As XLA does on CPU, flush denormals: otherwise random weights let streaming state decay into
# denormal floats and the official code slows down 10x, which would be an unfair comparison.
torch.set_flush_denormal(True)
if not args["mimi_weights"]:          # random codebooks like ours (the default init has all-zero ones)
    torch.manual_seed(0)
    for name, buf in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buf.normal_(0, 0.1)
B, F = args["batch"], mimi.frame_size
wav = 0.1 * torch.from_numpy(np.random.default_rng(0).standard_normal((B, 1, int(args["seconds"] * 24000)), np.float32))
def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    return out
res = {"torch": torch.__version__, "threads": torch.get_num_threads()}
with torch.no_grad():
    codes = mimi.encode(wav)
    res["encode"] = timed(lambda: mimi.encode(wav), args["reps"])
    mimi.decode(codes)
    res["decode"] = timed(lambda: mimi.decode(codes), args["reps"])
    frame = wav[:1, :, :F]
    with mimi.streaming(1):
        steps = []
        for i in range(args["frames"] + 3):
            t0 = time.perf_counter()
            c = mimi.encode(frame)
            mimi.decode(c)
            steps.append(time.perf_counter() - t0)
    res["step"] = steps[3:]
print(json.dumps(res))
"""


def mimi_step_times(params, cfg, frames: int) -> list[float]:
    """Seconds of one streaming frame, encode_step + decode_step, batch 1, after 3 warm-up frames."""
    import jax
    import mimi
    wav = 0.1 * jax.random.normal(jax.random.key(0), (1, 1, cfg.frame_size))
    enc, dec, steps = mimi.encoder_state(cfg, 1), mimi.decoder_state(cfg, 1), []
    for i in range(frames + 3):
        t0 = time.perf_counter()
        enc, c = mimi.encode_step(params, cfg, enc, wav, 8)
        dec, pcm = mimi.decode_step(params, cfg, dec, c)
        jax.block_until_ready(pcm)
        steps.append(time.perf_counter() - t0)
    return steps[3:]


def bench_mimi(args) -> list[tuple]:
    import jax
    import jax.numpy as jnp
    import mimi
    if args.mimi_weights:
        import convert
        params, cfg = convert.load_mimi(args.mimi_weights)
    else:
        cfg = mimi.MimiConfig()
        params = mimi.init(jax.random.key(0), cfg)
    B, F = args.batch, cfg.frame_size
    rng = np.random.default_rng(0)
    wav = jnp.asarray(0.1 * rng.standard_normal((B, 1, int(args.seconds * cfg.sample_rate)), np.float32))
    codes = jax.block_until_ready(mimi.encode(params, cfg, wav, 8))                     # compiles
    enc = _timed(lambda: jax.block_until_ready(mimi.encode(params, cfg, wav, 8)), args.reps)
    jax.block_until_ready(mimi.decode(params, cfg, codes))
    dec = _timed(lambda: jax.block_until_ready(mimi.decode(params, cfg, codes)), args.reps)

    ours = {"encode": enc, "decode": dec, "step": mimi_step_times(params, cfg, args.frames)}
    theirs = run_official(_MIMI_OFFICIAL, args)

    audio = B * args.seconds
    rows = []
    for key, what in (("encode", f"Mimi encode, {B} x {args.seconds:g} s, 8 codebooks"),
                      ("decode", f"Mimi decode, {B} x {args.seconds:g} s")):
        mine = audio / float(np.median(ours[key]))
        other = audio / float(np.median(theirs[key])) if theirs else None
        rows.append((what + " (x real time)", f"{mine:.1f}", other and f"{other:.1f}", other and mine / other))
    mine, other = 1000 * float(np.median(ours["step"])), theirs and 1000 * float(np.median(theirs["step"]))
    rows.append((f"Mimi streaming frame, encode_step + decode_step, batch 1 (ms per 80 ms frame, median of {args.frames})",
                 f"{mine:.1f}", other and f"{other:.1f}", other and other / mine))
    mine, other = 1000 * float(np.percentile(ours["step"], 90)), theirs and 1000 * float(np.percentile(theirs["step"], 90))
    rows.append(("  same, 90th percentile (ms)", f"{mine:.1f}", other and f"{other:.1f}", other and other / mine))
    if theirs:
        rows.append(("  (official: torch " + theirs["torch"] + f", {theirs['threads']} threads)", "", "", None))
    return rows


# ----------------------------------------------------------------------------------------------
# Training step (train.py): forward + backward + AdamW of the whole LM, against Kyutai's LMModel
# forward + moshi-finetune's loss + backward + clip + torch AdamW, same shapes, same batch, both with
# per-layer rematerialisation (moshi-finetune's gradient_checkpointing) unless --train-no-remat.
# Tokens are counted as moshi-finetune counts them: frames x (text + dep_q codebooks).
# On a GPU/TPU: `python bench.py --only train --train-config 1b --train-dtype bfloat16 --no-torch`
# (add --peak-tflops if the device kind is not in train.PEAK_TFLOPS) prints tokens/s and MFU.

TRAIN_CONFIGS = {   # moshiko's layout (17 streams, vocabularies 32000 / 2048, weights per depformer step)
    "small": dict(dim=256, num_heads=4, num_layers=4, context=250, depformer_dim=128, depformer_num_heads=4,
                  depformer_num_layers=2, depformer_dim_feedforward=int(4.125 * 128)),
    "1b": dict(dim=2048, num_heads=16, num_layers=16, context=3000, depformer_dim=512, depformer_num_heads=8,
               depformer_num_layers=6, depformer_dim_feedforward=int(4.125 * 512)),
    "moshiko": {},
}

_TRAIN_OFFICIAL = r"""
import json, sys, time
import torch
from moshi.models.lm import LMModel
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"] or torch.get_num_threads())
torch.set_flush_denormal(True)         # as XLA does on CPU
kw, B, T = args["train_lm_kwargs"], args["train_batch"], args["train_frames"]
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args["train_dtype"]]
torch.manual_seed(0)
model = LMModel(**kw, gradient_checkpointing=not args["train_no_remat"], device="cpu", dtype=dtype)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
g = torch.Generator().manual_seed(0)
codes = torch.cat([torch.randint(0, kw["text_card"], (B, 1, T), generator=g),
                   torch.randint(0, kw["card"], (B, kw["n_q"], T), generator=g)], 1)
text_w = torch.where((codes[:, :1] == 3) | (codes[:, :1] == 0), 0.5, 1.0)
audio_w = torch.ones(kw["dep_q"]); audio_w[0] = 100.0
def ce(logits, target, mask, weights):   # moshi-finetune's compute_loss_with_mask
    target = torch.where(mask, target, torch.zeros_like(target))
    w = (mask.float() * weights).reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    return torch.where(w > 0, loss * w, torch.zeros_like(loss)).sum() / w.sum()
def step():
    opt.zero_grad()
    out = model(codes)
    loss = ce(out.text_logits, codes[:, :1], out.text_mask, text_w) + \
        ce(out.logits, codes[:, 1:1 + kw["dep_q"]], out.mask, audio_w[None, :, None])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()
step()
times = []
for _ in range(args["reps"]):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"step": times, "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def train_step_times(cfg, h, B: int, T: int, reps: int):
    """(compile + first step seconds, [step seconds], model params) of train.py's step on all local
    devices (fsdp), random weights (LoRA adapters too, with h.lora_rank) and random codes [B, 17, T]."""
    import jax
    import train
    mesh = train.make_mesh(1, jax.device_count())                   # fsdp over every local device
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (1, B, 1, T)),
                            rng.integers(0, cfg.card, (1, B, cfg.n_q, T))], axis=2).astype(np.int32)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        lora = plan.init_lora(jax.random.key(1)) if h.lora_rank else None
        state, frozen = train.initial_state(plan, mesh, h, plan.init_params(jax.random.key(0)), lora)
        batch = jax.device_put(codes, jax.sharding.NamedSharding(mesh, train.BATCH_SPEC))

        def one_step():
            nonlocal state
            state, m = plan.step(state, frozen, batch)
            jax.block_until_ready(m)
        first = _timed(one_step, 1)[0]                              # compile + one step
        one_step()
        return first, _timed(one_step, reps), frozen or state["params"]


def bench_train(args) -> list[tuple]:
    import dataclasses
    import jax
    import convert
    import repo
    import moshi
    import train
    cfg = dataclasses.replace(moshi.MOSHIKO, **TRAIN_CONFIGS[args.train_config])
    h = train.Hyper(lr=1e-4, max_steps=10_000, compute_dtype=args.train_dtype,
                    first_codebook_weight=100.0, remat=not args.train_no_remat)
    B, T = args.train_batch, args.train_frames
    first, steps, params = train_step_times(cfg, h, B, T, args.reps)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    official_args = argparse.Namespace(**vars(args), train_lm_kwargs=repo.lm_config_dict(cfg))
    theirs = run_official(_TRAIN_OFFICIAL, official_args) if jax.default_backend() == "cpu" else None
    tokens = B * T * (1 + cfg.dep_q)
    mine = tokens / float(np.median(steps))
    other = theirs and tokens / float(np.median(theirs["step"]))
    what = (f"Train step '{args.train_config}' ({n_params / 1e6:.0f}M params), batch {B} x {T} frames, "
            f"{args.train_dtype}{'' if h.remat else ', no remat'} (tokens/s)")
    rows = [(what, f"{mine:,.0f}", other and f"{other:,.0f}", other and mine / other),
            ("  first step, incl. compile (s)", f"{first:.1f}", "", None)]
    peak = train.peak_flops(argparse.Namespace(peak_tflops=args.peak_tflops))
    if peak:
        flops = train.flops_per_step(cfg, params, B * T, T)
        rows.append(("  model FLOPs utilisation (MFU)", f"{100 * flops * mine / tokens / peak:.1f}%", "", None))
    if theirs:
        rows.append((f"  (official: torch {theirs['torch']}, {theirs['threads']} threads)", "", "", None))
    return rows


# ----------------------------------------------------------------------------------------------
# LM generation (moshi.gen_step): one 80 ms frame per call, batch 1, Kyutai's default sampling
# (temp 0.8 / 0.7, top-k 250 / 25), against Kyutai's LMGen.step on the same config. Then the 7B
# footprint in bf16, counted from moshi.init's shapes with jax.eval_shape (nothing allocated).

LM_CONFIGS = {   # moshiko's layout (17 streams, delays, vocabularies 32000 / 2048), narrower and shallower
    "small": dict(dim=512, num_heads=8, num_layers=6, context=256, depformer_dim=256, depformer_num_heads=4,
                  depformer_num_layers=2, depformer_dim_feedforward=int(4.125 * 256)),
}

_LM_OFFICIAL = r"""
import json, sys, time
import torch
from moshi.models import lm
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"] or torch.get_num_threads())
kw, B = args["lm_kwargs"], args["lm_batch"]
torch.manual_seed(0)
gen = lm.LMGen(lm.LMModel(**kw).eval())            # its defaults: sampling, temp 0.8 / 0.7, top-k 250 / 25
user = torch.randint(0, kw["card"], (B, kw["n_q"] - kw["dep_q"], 1))
times = []
with torch.no_grad(), gen.streaming(B):
    for _ in range(args["lm_frames"] + 5):
        t0 = time.perf_counter(); gen.step(user); times.append(time.perf_counter() - t0)
print(json.dumps({"step": times[5:], "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def lm_param_count(cfg) -> int:
    """Parameters of a moshi.LMConfig in closed form (checked against moshi.init's shapes)."""
    D, L, H = cfg.dim, cfg.num_layers, cfg.temporal.gating_hidden
    dc = cfg.depformer
    Dd, Ld, Hd, M = dc.dim, dc.transformer.num_layers, dc.transformer.gating_hidden, dc.transformer.num_weight_sets
    temporal = (cfg.n_q * (cfg.card + 1) * D + (cfg.text_card + 1) * D      # embeddings
                + L * (4 * D * D + 3 * D * H + 2 * D)                         # attention, gated MLP, 2 norms
                + D + cfg.text_card * D)                                       # out_norm, text head
    depth = (dc.num_input_projs * Dd * D + (cfg.text_card + 1) * Dd + (cfg.dep_q - 1) * (cfg.card + 1) * Dd
             + Ld * (M * (4 * Dd * Dd + 3 * Dd * Hd) + 2 * Dd) + cfg.dep_q * cfg.card * Dd)
    return temporal + depth


def _lm_official(args, cfg):
    """Kyutai's LMGen timing; with --threads 0, the faster of torch's default and 1 thread (on a small
    busy machine torch's default OpenMP threads can be several times slower than one)."""
    import convert
    import repo
    best = None
    for threads in [args.threads] if args.threads else [0, 1]:
        run = run_official(_LM_OFFICIAL, argparse.Namespace(**dict(vars(args), threads=threads),
                                                            lm_kwargs=repo.lm_config_dict(cfg)))
        if run and (best is None or np.median(run["step"]) < np.median(best["step"])):
            best = run
    return best


def gen_step_times(params, cfg, B: int, frames: int) -> list[float]:
    """Seconds per gen_step (Kyutai's default sampling) for `frames` frames after 5 of warm-up."""
    import jax
    import jax.numpy as jnp
    import moshi
    state = moshi.init_gen_state(params, cfg, B)
    user = jnp.zeros((B, cfg.n_q - cfg.dep_q, 1), jnp.int32)

    def one_frame():
        nonlocal state
        state, out = moshi.gen_step(params, cfg, state, user, jax.random.key(1))
        jax.block_until_ready(out)
    _timed(one_frame, 5)                                              # compile + warm-up
    return _timed(one_frame, frames)


def bench_lm(args) -> list[tuple]:
    import dataclasses
    import jax
    import jax.numpy as jnp
    import moshi
    cfg = moshi.TINY if args.lm_config == "tiny" else dataclasses.replace(moshi.MOSHIKO, **LM_CONFIGS[args.lm_config])
    B = args.lm_batch
    params = moshi.generation_params(moshi.init(jax.random.key(0), cfg))   # layers as lists, as sample.py runs
    ours = gen_step_times(params, cfg, B, args.lm_frames)
    theirs = _lm_official(args, cfg)
    what = (f"LM gen_step '{args.lm_config}' ({lm_param_count(cfg) / 1e6:.1f}M params, fp32), batch {B}, "
            f"ms per 80 ms frame (median of {args.lm_frames})")
    rows = []
    for label, stat in ((what, np.median), ("  same, 90th percentile (ms)", lambda t: np.percentile(t, 90))):
        mine, other = 1000 * float(stat(ours)), theirs and 1000 * float(stat(theirs["step"]))
        rows.append((label, f"{mine:.2f}", other and f"{other:.2f}", other and other / mine))
    if theirs:
        rows.append((f"  (official: torch {theirs['torch']}, {theirs['threads']} threads)", "", "", None))
    big = moshi.MOSHIKO
    shapes = jax.eval_shape(lambda: moshi.init(jax.random.key(0), big, jnp.bfloat16))
    counted = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    formula = lm_param_count(big)
    agree = "= formula = Kyutai's 7,687,729,152" if formula == counted == 7_687_729_152 else f"!= formula {formula:,}"
    kv = 2 * big.num_layers * big.context * big.dim * 2                  # k and v, bf16, per conversation
    rows += [(f"Moshiko 7B parameters, eval_shape(moshi.init) {agree}", f"{counted:,}", "-", None),
             ("  bf16 weights, 2 bytes each (GB)", f"{2 * counted / 1e9:.3f}", "-", None),
             (f"  bf16 KV cache per conversation, any length: 2 x {big.num_layers} layers x {big.context} "
              f"frames x {big.dim} (MB)", f"{kv / 1e6:.0f}", "-", None)]
    return rows


# ----------------------------------------------------------------------------------------------
# A long conversation through sample.py's loop (Mimi encode -> gen_step -> Mimi decode, frame by
# frame): time per frame and resident memory at the start and at the end must not grow. Tiny random
# models with short contexts, so that both ring caches wrap many times; the input is made on the fly.

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def bench_conversation(args) -> list[tuple]:
    import jax
    import mimi
    import moshi
    import sample
    cfg = moshi.TINY
    lm = moshi.generation_params(moshi.init(jax.random.key(0), cfg))
    models = sample.Models(lm, cfg, mimi.init(jax.random.key(1), mimi.TINY), mimi.TINY)
    n = int(args.minutes * 60 * 12.5)
    rng = np.random.default_rng(0)
    frames = (0.1 * rng.standard_normal(1920).astype(np.float32) for _ in range(n))
    times, rss, last = [], {}, time.perf_counter()
    for i, _ in enumerate(sample.converse(models, frames, 1, moshi.Sampling(), seed=0)):
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if i in (500, n - 1):
            rss[i] = _rss_mb()
    window = min(500, n // 4)
    first, final = 1000 * np.median(times[10:10 + window]), 1000 * np.median(times[-window:])
    what = f"conversation, {args.minutes:g} min ({n} frames) through sample.py's loop, tiny random models"
    return [(f"{what}: ms per frame, frames 10-{10 + window} / last {window}", f"{first:.2f} / {final:.2f}", "-", None),
            (f"  resident memory at frame 500 / at the end (MB, {jax.default_backend()})",
             f"{rss.get(500, float('nan')):.0f} / {rss[n - 1]:.0f}", "-", None)]


# ----------------------------------------------------------------------------------------------
# int8 weights (sample.py --quantize int8): how far int8 logits are from bf16 ones, teacher-forced.
# Every stream is forced from the same random tokens (PersonaPlex's lookahead, so the depformer is
# forced too): both runs see exactly the same inputs at every frame, unlike free-running greedy
# decoding, which on random weights diverges even between bf16 and fp32. Then the resident bytes.

def _testdata(name):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_testdata_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forced_logits(params, cfg, codes):
    """gen_step forced to follow codes [B, K, T] -> text logits [T, B, V] and audio logits [T, B, dep_q, card]."""
    import jax
    import jax.numpy as jnp
    import moshi
    B, K, T = codes.shape
    n_user = K - 1 - (cfg.dep_q if cfg.dep_q < cfg.n_q else cfg.n_q // 2)
    state, text, audio = moshi.init_gen_state(params, cfg, B, lookahead=1), [], []
    for n in range(T):
        frame = jnp.asarray(codes[:, :, n])
        state, _, logits = moshi.gen_step(params, cfg, state, frame[:, K - n_user:, None], jax.random.key(0),
                                          text=frame[:, 0], moshi_codes=frame[:, 1:K - n_user], return_logits=True)
        text.append(np.asarray(logits["text_logits"], np.float32))
        audio.append(np.asarray(logits["audio_logits"], np.float32))
    return np.stack(text), np.stack(audio)


def int8_agreement(params, cfg, frames: int, seed: int = 0):
    """(logits rel. error, argmax agreement) of int8 vs bf16 weights, text and audio, over `frames`."""
    import jax
    import jax.numpy as jnp
    import moshi
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (2, 1, frames)),
                            rng.integers(0, cfg.card, (2, cfg.n_q, frames))], axis=1).astype(np.int32)
    bf16 = moshi.generation_params(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params))
    fp32 = moshi.generation_params(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    ref, q, exact = (forced_logits(p, cfg, codes) for p in (bf16, moshi.quantize_int8(bf16), fp32))
    compare = lambda a, b: (float(np.abs(a - b).max() / np.abs(b).max()), float(np.mean(a.argmax(-1) == b.argmax(-1))))  # noqa: E731
    return {"int8": [compare(q[i], ref[i]) for i in (0, 1)], "bf16": [compare(ref[i], exact[i]) for i in (0, 1)]}


def bench_int8(args) -> list[tuple]:
    import dataclasses
    import jax
    import jax.numpy as jnp
    import convert
    import repo
    import moshi
    fx, rows, frames = _testdata("make_lm_fixtures"), [], args.int8_frames
    models = []
    for name in ("a", "b", "c"):
        d = np.load(fx.fixture_path(name))
        spec = [(n, tuple(json.loads(s))) for n, s in zip(d["spec_names"], d["spec_shapes"])]
        cfg = repo.lm_config(json.loads(str(d["config_json"])))
        with tempfile.TemporaryDirectory() as tmp:
            convert.save_safetensors(os.path.join(tmp, "lm.safetensors"), fx.checkpoint(spec))
            models.append((f"LM fixture {name}", cfg, convert.load_lm(os.path.join(tmp, "lm.safetensors"), cfg)))
    small = dataclasses.replace(moshi.MOSHIKO, **LM_CONFIGS["small"])
    models.append(("'small' random model (98.8M)", small, moshi.init(jax.random.key(0), small)))
    cell = lambda pair: f"{pair[0]:.3f} / {100 * pair[1]:.1f}%"                             # noqa: E731
    for what, cfg, params in models:
        agree = int8_agreement(params, cfg, frames)
        rows.append((f"int8 vs bf16, {what}, {frames} frames teacher-forced: text / audio logits, rel. error / "
                     f"argmax agreement", f"{cell(agree['int8'][0])}; {cell(agree['int8'][1])}", "-", None))
        rows.append(("  for scale, bf16 vs fp32, same inputs", f"{cell(agree['bf16'][0])}; {cell(agree['bf16'][1])}",
                     "-", None))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))     # noqa: E731
    shapes = jax.eval_shape(lambda: moshi.generation_params(moshi.init(jax.random.key(0), moshi.MOSHIKO, jnp.bfloat16)))
    rows.append(("Moshiko 7B LM weights, bf16 / int8 (GB, eval_shape: nothing allocated)",
                 f"{nbytes(shapes) / 1e9:.2f} / {nbytes(jax.eval_shape(moshi.quantize_int8, shapes)) / 1e9:.2f}", "-", None))
    return rows


# ----------------------------------------------------------------------------------------------
# In-Place TTT's cost: the same model with and without TTT layers, in a train step and a gen step.

def bench_ttt(args) -> list[tuple]:
    import dataclasses
    import jax
    import jax.numpy as jnp
    import moshi
    import train
    import ttt
    rows = []
    base = dataclasses.replace(moshi.MOSHIKO, **TRAIN_CONFIGS["small"])            # 4 layers, context 250
    with_ttt = dataclasses.replace(base, ttt=ttt.TTTConfig(layers=(1, 3), chunk_size=16))
    h = train.Hyper(max_steps=10_000, compute_dtype=args.train_dtype)
    B, T = args.train_batch, args.train_frames
    times = {cfg.ttt is not None: float(np.median(train_step_times(cfg, h, B, T, args.reps)[1]))
             for cfg in (base, with_ttt)}
    rows.append((f"TTT cost, train step 'small' (TTT on 2 of 4 layers, chunk 16), batch {B} x {T} frames "
                 f"(ms, with / without)", f"{1000 * times[True]:.0f} / {1000 * times[False]:.0f}", "-", None))
    rows.append(("  TTT overhead, train step", f"{100 * (times[True] / times[False] - 1):+.0f}%", "-", None))
    base = dataclasses.replace(moshi.MOSHIKO, **LM_CONFIGS["small"])                # 6 layers
    with_ttt = dataclasses.replace(base, ttt=ttt.TTTConfig(layers=(2, 5), chunk_size=32))
    for cfg in (base, with_ttt):                                      # 64+ frames: spans chunk commits
        params = moshi.generation_params(moshi.init(jax.random.key(0), cfg))
        times[cfg.ttt is not None] = gen_step_times(params, cfg, 1, max(args.lm_frames, 64))
    p50 = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    p99 = {k: 1000 * float(np.percentile(v, 99)) for k, v in times.items()}
    rows.append((f"TTT cost, gen_step 'small' (TTT on 2 of 6 layers, chunk 32), batch 1: ms per frame p50 "
                 f"(p99), with / without", f"{p50[True]:.2f} ({p99[True]:.2f}) / {p50[False]:.2f} ({p99[False]:.2f})",
                 "-", None))
    rows.append(("  TTT overhead, gen_step p50", f"{100 * (p50[True] / p50[False] - 1):+.0f}%", "-", None))
    return rows


# ----------------------------------------------------------------------------------------------
# The GPU report: one prepared command for one accelerator, within ~8 minutes, printing one table.
# Moshiko-shaped 7B random bf16 weights: gen_step per frame at batch 1, 8 and 32 against the floor
# of reading every weight once per frame (bf16 bytes / memory bandwidth), int8 at batch 1; Mimi's
# streaming frame; the Mimi and LM parity tests re-run on this device (a port of Mimi to XLA-on-GPU
# once silently miscomputed its depthwise upsampling); train steps (the ~1B config, full fine-tuning;
# 7B LoRA rank 128 with moshi-finetune's batch 16 x 100 s clips); the official PyTorch package on the
# GPU beside them where it imports. Sections run by priority and are skipped once the budget is spent.
# `--tiny` runs the same script with tiny configs: how it is checked on a CPU.

BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L4": 0.3, "TPU v5 lite": 0.82, "TPU v6 lite": 1.64}

_LM_OFFICIAL_GPU = r"""
import json, sys, time
import torch
from moshi.models import lm, loaders
args = json.loads(sys.argv[1])
torch.manual_seed(0)
with torch.device("meta"):
    model = lm.LMModel(**loaders._lm_kwargs, device="meta", dtype=torch.bfloat16)
model = model.to_empty(device="cuda").eval()
for p in model.parameters():
    p.data.normal_(0, 0.02)
gen = lm.LMGen(model)
user = torch.zeros((1, 8, 1), dtype=torch.long, device="cuda")
times = []
with torch.no_grad(), gen.streaming(1):
    for _ in range(args["frames"] + 5):
        torch.cuda.synchronize(); t0 = time.perf_counter(); gen.step(user); torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
print(json.dumps({"step": times[5:], "torch": torch.__version__}))
"""


def _ms(times):
    return f"{1000 * float(np.median(times)):.2f} / {1000 * float(np.percentile(times, 99)):.2f}"


def gpu_lm_rows(args, cfg, frames):
    import jax
    import jax.numpy as jnp
    import moshi
    params = moshi.generation_params(moshi.init(jax.random.key(0), cfg, jnp.bfloat16))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kind = jax.devices()[0].device_kind
    bandwidth = next((v for k, v in BANDWIDTH_TBS.items() if k.lower() in kind.lower()), None)
    floor = f"floor {1000 * nbytes / (bandwidth * 1e12):.2f} ms ({nbytes / 1e9:.1f} GB at {bandwidth} TB/s)" \
        if bandwidth else "no bandwidth known for this device"
    rows = []
    for B in (1, 8, 32):
        rows.append((f"gen_step, {'tiny' if args.tiny else 'moshiko 7B'} random bf16, batch {B}: ms per frame "
                     f"p50 / p99 ({floor})", _ms(gen_step_times(params, cfg, B, frames)), "", None))
    q = jax.device_put(moshi.quantize_int8(params))
    rows.append(("  same, int8 weights, batch 1", _ms(gen_step_times(q, cfg, 1, frames)), "", None))
    return rows


def gpu_parity_rows(args):
    """The parity tests against the official fixtures, run on this machine's default device."""
    tests = "mimi_full_size or mimi_tiny or lm_forward or lm_greedy or lm_bf16 or sample_matches"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py", "-k", tests],
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return [(f"parity tests on {__import__('jax').default_backend()} ({tests})", summary, "", None)]


def gpu_train_rows(args):
    import dataclasses
    import moshi
    import train
    rows = []
    runs = (("1b", 0, 4, 250), ("moshiko", 128, 16, 1250)) if not args.tiny else (("tiny", 0, 2, 16), ("tiny", 4, 2, 16))
    for name, rank, B, T in runs:
        cfg = moshi.TINY if name == "tiny" else dataclasses.replace(moshi.MOSHIKO, **TRAIN_CONFIGS[name])
        h = train.Hyper(max_steps=10_000, compute_dtype="bfloat16", lora_rank=rank,
                        first_codebook_weight=100.0)
        first, steps, params = train_step_times(cfg, h, B, T, 2)
        tokens = B * T * (1 + cfg.dep_q)
        peak = train.peak_flops(argparse.Namespace(peak_tflops=args.peak_tflops))
        mfu = f", MFU {100 * train.flops_per_step(cfg, params, B * T, T) / float(np.median(steps)) / peak:.1f}%" \
            if peak else ""
        rows.append((f"train step '{name}'{f' LoRA rank {rank}' if rank else ''}, batch {B} x {T} frames, bf16: "
                     f"tokens/s (compile + first step {first:.0f} s{mfu})", f"{tokens / float(np.median(steps)):,.0f}",
                     "", None))
    return rows


def gpu_report(args) -> list[tuple]:
    import jax
    import mimi
    import moshi
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    start, rows = time.perf_counter(), [(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, "
                                         f"jax {jax.__version__}", "", "", None)]
    frames = 8 if args.tiny else 50
    sections = [("LM generation", lambda: gpu_lm_rows(args, moshi.TINY if args.tiny else moshi.MOSHIKO, frames)),
                ("Mimi streaming", lambda: [("Mimi streaming frame, encode + decode, batch 1: ms p50 / p99",
                                              _ms(mimi_step_times(mimi.init(jax.random.key(0), cfg), cfg, frames)),
                                              "", None) for cfg in [mimi.TINY if args.tiny else mimi.MimiConfig()]]),
                ("parity", lambda: gpu_parity_rows(args)),
                ("training", lambda: gpu_train_rows(args)),
                ("official LM", lambda: [] if args.tiny or args.no_torch else _official_gpu_rows(args, frames))]
    for name, section in sections:
        if time.perf_counter() - start > args.budget:
            rows.append((f"{name}: skipped, past the {args.budget:.0f} s budget", "", "", None))
            continue
        try:
            rows += section()
        except Exception as e:                       # report it and go on: one table, whatever happens
            rows.append((f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})", "", "", None))
    rows.append((f"report time (s)", f"{time.perf_counter() - start:.0f}", "", None))
    return rows


def _official_gpu_rows(args, frames):
    theirs = run_official(_LM_OFFICIAL_GPU, argparse.Namespace(frames=frames, no_torch=False,
                                                               torch_python=args.torch_python))
    if not theirs:
        return [("official LMGen.step on this GPU: did not run (see stderr)", "", "", None)]
    return [(f"official LMGen.step, moshiko 7B random bf16, batch 1, torch {theirs['torch']}, no CUDA graphs: "
             f"ms p50 / p99", _ms(theirs["step"]), "", None)]


BENCHES = {"mimi": bench_mimi, "lm": bench_lm, "train": bench_train, "conversation": bench_conversation,
           "int8": bench_int8, "ttt": bench_ttt, "gpu_report": gpu_report}
SECTIONS = ("mimi", "lm", "train", "conversation", "int8", "ttt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=SECTIONS, help="run one section")
    ap.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON, help="python with torch + moshi 0.2.13")
    ap.add_argument("--no-torch", action="store_true", help="skip the official package")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each batch call (median)")
    ap.add_argument("--mimi-weights", help="a Mimi checkpoint (default: random weights, same shapes)")
    ap.add_argument("--seconds", type=float, default=10.0, help="Mimi: audio length per batch item")
    ap.add_argument("--batch", type=int, default=1, help="Mimi: batch size of encode/decode")
    ap.add_argument("--frames", type=int, default=50, help="Mimi: streaming frames timed")
    ap.add_argument("--lm-config", default="small", choices=sorted(LM_CONFIGS) + ["tiny"], help="lm: model size")
    ap.add_argument("--lm-batch", type=int, default=1, help="lm: conversations generated at once")
    ap.add_argument("--lm-frames", type=int, default=50, help="lm: frames timed")
    ap.add_argument("--train-config", default="small", choices=sorted(TRAIN_CONFIGS), help="train: model size")
    ap.add_argument("--train-batch", type=int, default=4, help="train: windows per step")
    ap.add_argument("--train-frames", type=int, default=50, help="train: frames per window (12.5 per second)")
    ap.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"], help="train: compute dtype")
    ap.add_argument("--train-no-remat", action="store_true", help="train: keep activations (no per-layer remat)")
    ap.add_argument("--peak-tflops", type=float, help="train: per-device peak for MFU (default: by device kind)")
    ap.add_argument("--minutes", type=float, default=10.0, help="conversation: length of the input")
    ap.add_argument("--int8-frames", type=int, default=128, help="int8: teacher-forced frames compared")
    ap.add_argument("--gpu-report", action="store_true", help="the accelerator report (see the comment above "
                    "gpu_report); alone, under ~8 minutes")
    ap.add_argument("--tiny", action="store_true", help="--gpu-report with tiny configs (to check it on a CPU)")
    ap.add_argument("--budget", type=float, default=420, help="--gpu-report: seconds after which sections are skipped")
    ap.add_argument("--compile-cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"),
                    help="--gpu-report: JAX's persistent compilation cache (a rerun skips compiling)")
    args = ap.parse_args(argv)
    import jax
    print(f"# bench.py on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.default_backend()})\n# command: python bench.py {' '.join(argv or sys.argv[1:])}")
    rows = []
    for name in ["gpu_report"] if args.gpu_report else [args.only] if args.only else SECTIONS:
        if name not in BENCHES:
            print(f"# ({name}: no benchmark yet)")
            continue
        rows += BENCHES[name](args)
    print("\n| benchmark | moshi-jax | official PyTorch | speed-up |\n|---|---|---|---|")
    for what, mine, other, ratio in rows:
        print(f"| {what} | {mine} | {other or ('' if not mine else 'n/a')} | {f'{ratio:.2f}x' if ratio else ''} |")


if __name__ == "__main__":
    main()
