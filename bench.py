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

    enc, dec, frame, steps = mimi.encoder_state(cfg, 1), mimi.decoder_state(cfg, 1), wav[:1, :, :F], []
    for i in range(args.frames + 3):                                                     # 3 warm-up frames
        t0 = time.perf_counter()
        enc, c = mimi.encode_step(params, cfg, enc, frame, 8)
        dec, pcm = mimi.decode_step(params, cfg, dec, c)
        jax.block_until_ready(pcm)
        steps.append(time.perf_counter() - t0)
    ours = {"encode": enc, "decode": dec, "step": steps[3:]}
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


def bench_train(args) -> list[tuple]:
    import dataclasses
    import jax
    import convert
    import moshi
    import train
    cfg = dataclasses.replace(moshi.MOSHIKO, **TRAIN_CONFIGS[args.train_config])
    h = train.Hyper(lr=1e-4, warmup_steps=0, max_steps=10_000, compute_dtype=args.train_dtype,
                    first_codebook_weight=100.0, remat=not args.train_no_remat)
    mesh = train.make_mesh(1, jax.device_count())                   # fsdp over every local device
    B, T = args.train_batch, args.train_frames
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, cfg.text_card, (1, B, 1, T)),
                            rng.integers(0, cfg.card, (1, B, cfg.n_q, T))], axis=2).astype(np.int32)
    with jax.set_mesh(mesh):
        plan = train.make_plan(cfg, mesh, h)
        state, frozen = train.initial_state(plan, mesh, h, plan.init_params(jax.random.key(0)))
        batch = jax.device_put(codes, jax.sharding.NamedSharding(mesh, train.BATCH_SPEC))
        t0 = time.perf_counter()
        state, metrics = plan.step(state, frozen, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0                            # compile + one step

        def one_step():
            nonlocal state
            state, m = plan.step(state, frozen, batch)
            jax.block_until_ready(m)
        one_step()
        steps = _timed(one_step, args.reps)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    official_args = argparse.Namespace(**vars(args), train_lm_kwargs=convert.lm_config_dict(cfg))
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
        flops = train.flops_per_step(cfg, state["params"], B * T, T)
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
    best = None
    for threads in [args.threads] if args.threads else [0, 1]:
        run = run_official(_LM_OFFICIAL, argparse.Namespace(**dict(vars(args), threads=threads),
                                                            lm_kwargs=convert.lm_config_dict(cfg)))
        if run and (best is None or np.median(run["step"]) < np.median(best["step"])):
            best = run
    return best


def bench_lm(args) -> list[tuple]:
    import dataclasses
    import jax
    import jax.numpy as jnp
    import moshi
    cfg = moshi.TINY if args.lm_config == "tiny" else dataclasses.replace(moshi.MOSHIKO, **LM_CONFIGS[args.lm_config])
    B = args.lm_batch
    params = moshi.generation_params(moshi.init(jax.random.key(0), cfg))   # layers as lists, as sample.py runs
    state = moshi.init_gen_state(params, cfg, B)
    user = jnp.zeros((B, cfg.n_q - cfg.dep_q, 1), jnp.int32)
    keys = list(jax.random.split(jax.random.key(1), args.lm_frames + 5))

    def one_frame():
        nonlocal state
        state, out = moshi.gen_step(params, cfg, state, user, keys.pop())
        jax.block_until_ready(out)
    _timed(one_frame, 5)                                              # compile + warm-up
    ours = _timed(one_frame, args.lm_frames)
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


BENCHES = {"mimi": bench_mimi, "lm": bench_lm, "train": bench_train, "conversation": bench_conversation}
SECTIONS = ("mimi", "lm", "train", "conversation")


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
    args = ap.parse_args(argv)
    import jax
    print(f"# bench.py on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} ({jax.default_backend()})\n# command: python bench.py {' '.join(argv or sys.argv[1:])}")
    rows = []
    for name in [args.only] if args.only else SECTIONS:
        if name not in BENCHES:
            print(f"# ({name}: no benchmark yet)")
            continue
        rows += BENCHES[name](args)
    print("\n| benchmark | moshi-jax | official PyTorch | speed-up |\n|---|---|---|---|")
    for what, mine, other, ratio in rows:
        print(f"| {what} | {mine} | {other or ('' if not mine else 'n/a')} | {f'{ratio:.2f}x' if ratio else ''} |")


if __name__ == "__main__":
    main()
