"""Fixtures for moshi.py / depformer.py / convert.py's LM section, from Kyutai's official package.

Run with the official package: `~/oracle/bin/python testdata/make_lm_fixtures.py` (writes
testdata/lm_fixture_<name>.npz). For three small configs it builds Kyutai's `LMModel` with
deterministic random weights in the on-disk naming (rebuilt by the tests from the key list and seed
in the npz, so no weights are committed) and records:
  - `LMModel.forward` on codes with some -1 entries: logits, mask, text_logits, text_mask;
  - greedy `LMGen` (use_sampling=False) over 14 frames with random user codes fed in;
  - for config a, the same greedy run of the model cast to bf16.
It then has *our* convert.py (in the project venv, in a subprocess) load the checkpoint and write
it back with save_lm, and loads that file into Kyutai's LMModel with strict=True: every tensor must
come back bit-identical. The test suite cannot do that last check itself (no torch in CI).

Configs: a = moshiko-shaped (n_q 16, dep_q 8, moshiko delays, rms_norm_f32, silu, rope, multi-linear
depformer with weights per step), b = the same with dep_q 16 (PersonaPlex), c = the official
tests/assets knobs (delays up to 4, LayerNorm + sin embedding + plain GELU MLP in the main
transformer, a depformer weight schedule, low-rank depformer embeddings) plus user streams, a
depformer norm, text_card_out and extra heads.

Importable without torch (the tests do, for CONFIGS and `checkpoint`).
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import random_weights  # noqa: E402

SMALL = dict(dim=64, num_heads=4, num_layers=2, hidden_scale=4.125, causal=True, layer_scale=None, context=6,
             max_period=10000, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
             text_card=96, existing_text_padding_id=3, n_q=16, dep_q=8, card=64,
             depformer_dim=32, depformer_dim_feedforward=int(4.125 * 32), depformer_num_heads=2,
             depformer_num_layers=2, depformer_causal=True, depformer_layer_scale=None,
             depformer_multi_linear=True, depformer_context=8, depformer_max_period=10000,
             depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True,
             delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])
CONFIGS = {
    "a": SMALL,
    "b": dict(SMALL, dep_q=16),
    "c": dict(delays=[0, 1, 2, 4, 0, 3, 1], n_q=6, dep_q=3, card=32, text_card=48, text_card_out=40,
              dim=16, num_layers=2, num_heads=1, hidden_scale=1, context=4, depformer_dim=16,
              depformer_multi_linear=True, depformer_weights_per_step=True,
              depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8,
              depformer_num_heads=1, depformer_gating="silu", depformer_norm="layer_norm",
              extra_heads_num_heads=2),
}
SEED = 1234
GEN_FRAMES = 14


def _gain(scale):
    return lambda name, shape, rng: scale * random_weights.default_init(name, shape, rng)


# Norm gains near 1 (RMSNorm's alpha is (1, 1, D), which the default would treat as a matrix), and
# output heads 4x the default so that logits are peaked as in a trained model and greedy choices
# are not decided by rounding.
OVERRIDES = {"*alpha": lambda name, shape, rng: 1.0 + 0.1 * rng.standard_normal(shape),
             "text_linear.weight": _gain(4.0), "linears.*": _gain(4.0)}


def checkpoint(spec, dtype=np.float32):
    """The fixture checkpoint (on-disk names) from its key list: what both sides load."""
    return random_weights.random_tensors(spec, SEED, OVERRIDES, dtype=dtype)


def fixture_path(name):
    return os.path.join(HERE, f"lm_fixture_{name}.npz")


# ----------------------------------------------------------------------------------------------
# Everything below needs torch and the official package.

def pack_on_disk(named) -> dict:
    """(in-memory name, numpy array) pairs in state_dict order -> {on-disk name: array}: the
    per-step attention projections concatenated in their order under the packed name, which takes
    the place of the first of them (their bitsandbytes scales, `..._scb`, likewise)."""
    out = {}
    for name, value in named:
        for mem, disk in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                          (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if mem in name:
                key = name.split(mem)[0] + disk + ("_scb" if name.endswith("_scb") else "")
                out[key] = np.concatenate([out[key], value]) if key in out else value
                break
        else:
            out[name] = value
    return out


def on_disk_spec(model):
    """Kyutai's in-memory state_dict names -> the packed on-disk names and shapes, in order."""
    packed = pack_on_disk((name, value.numpy()) for name, value in model.state_dict().items())
    return [(name, tuple(value.shape)) for name, value in packed.items()]


def make_codes(kw, rng, T, B=2):
    codes = rng.integers(0, kw["card"], size=(B, kw["n_q"] + 1, T))
    codes[:, 0] = rng.integers(0, kw["text_card"], size=(B, T))
    codes[rng.random(codes.shape) < 0.06] = -1                    # exercise the masks,
    codes[0, 0, 4] = codes[1, 1, 6] = -1                          # text and audio for sure
    return codes


def greedy_generation(torch, lm, model, user, B):
    """Kyutai's LMGen, greedy, fed user[:, :, n] at call n -> [B, 1 + dep_q, frames], -1 where None."""
    gen = lm.LMGen(model, use_sampling=False)
    outs = []
    with gen.streaming(B):
        for n in range(user.shape[-1]):
            out = gen.step(torch.from_numpy(user[:, :, n:n + 1]))
            outs.append(np.full((B, model.dep_q + 1), -1) if out is None else out[:, :, 0].numpy())
    return np.stack(outs, axis=-1)


def round_trip_through_our_convert(torch, build, kw, tensors, tmp):
    """Our load_lm + save_lm (project venv) on the fixture checkpoint; Kyutai must load it strictly."""
    from safetensors.torch import save_file
    src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, src)
    code = ("import json, sys, convert, repo; c = repo.lm_config(json.loads(sys.argv[3])); p = convert.load_lm(sys.argv[1], c); "
            "convert.save_lm(sys.argv[2], p, c)")
    venv_python = os.path.expanduser("~/venv/bin/python")
    subprocess.run([venv_python, "-c", code, src, dst, json.dumps(kw)], check=True, cwd=os.path.dirname(HERE))
    from safetensors.torch import load_file
    model = build()
    model.load_state_dict(load_file(dst), strict=True)            # raises on any missing/unexpected key
    reference = build()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), f"round trip changed {k}"


def main():
    import tempfile
    import torch
    from moshi.models import lm
    torch.manual_seed(0)
    for name, kw in CONFIGS.items():
        build = lambda dtype=torch.float32: lm.LMModel(**{k: v for k, v in kw.items() if k != "depformer_causal"},
                                                       dtype=dtype).eval()
        model = build()
        spec = on_disk_spec(model)
        tensors = checkpoint(spec)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
        rng = np.random.default_rng(SEED)
        codes = make_codes(kw, rng, T=12)
        with torch.no_grad():
            fwd = model(torch.from_numpy(codes))
        n_user = kw["n_q"] - kw["dep_q"]
        user = rng.integers(0, kw["card"], size=(2, n_user, GEN_FRAMES))
        out = dict(config_json=json.dumps(kw), spec_names=np.asarray([s[0] for s in spec]),
                   spec_shapes=np.asarray([json.dumps(list(s[1])) for s in spec]), codes=codes,
                   logits=fwd.logits.numpy(), mask=fwd.mask.numpy(),
                   text_logits=fwd.text_logits.numpy(), text_mask=fwd.text_mask.numpy(),
                   gen_user=user, gen_tokens=greedy_generation(torch, lm, model, user, 2))
        if name == "a":
            bf16 = build(torch.bfloat16)
            bf16.load_state_dict({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, strict=True)
            out["gen_tokens_bf16"] = greedy_generation(torch, lm, bf16, user, 2)
            same = (out["gen_tokens_bf16"] == out["gen_tokens"]).mean()
            print(f"  official bf16 vs fp32 greedy tokens: {same:.1%} equal")
        with tempfile.TemporaryDirectory() as tmp:
            round_trip_through_our_convert(torch, build, kw, tensors, tmp)
        np.savez_compressed(fixture_path(name), **out)
        print(f"{name}: {len(spec)} tensors, forward {codes.shape}, {GEN_FRAMES} greedy frames; "
              f"our save_lm output loads into LMModel with strict=True, bit-identical")


def q8_main():
    """`make_lm_fixtures.py q8` (the oracle venv plus `pip install bitsandbytes`, which runs on CPU):
    configs a and c quantized by Kyutai's own replace_linear_with_qlinear (what LMModel(quantize=True)
    does, and what a -q8 repo holds), run in fp32 (moshi 0.2.13 cannot run them in bf16: its loader
    casts the fp32 scales to bf16, which QLinear refuses) -> lm_fixture_q8.npz: the int8 matrices and
    their scales under their on-disk names (`a|...`; the other tensors are the float fixture's),
    forward logits, greedy tokens."""
    import torch
    from moshi.models import lm
    from moshi.utils.quantize import replace_linear_with_qlinear
    out = {}
    for name in ("a", "c"):
        d = np.load(fixture_path(name))
        kw = json.loads(str(d["config_json"]))
        spec = [(n, tuple(json.loads(s))) for n, s in zip(d["spec_names"], d["spec_shapes"])]
        tensors = checkpoint(spec)
        model = lm.LMModel(**{k: v for k, v in kw.items() if k != "depformer_causal"}, dtype=torch.float32).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
        replace_linear_with_qlinear(model)
        packed = pack_on_disk((k, v.numpy()) for k, v in model.state_dict().items())
        names = sorted(k.removesuffix("_scb") for k in packed if k.endswith("_scb"))
        # the int8 tensors themselves (bitsandbytes' rounding of ties is its own): the tests load them
        out.update({f"{name}|{k}": packed[k] for n in names for k in (n, n + "_scb")})
        with torch.no_grad():
            fwd = model(torch.from_numpy(d["codes"]))
        out.update({f"{name}_text_logits": fwd.text_logits.float().numpy(),
                    f"{name}_logits": fwd.logits.float().numpy(),
                    f"{name}_gen_tokens": greedy_generation(torch, lm, model, d["gen_user"], 2)})
        same = (out[f"{name}_gen_tokens"] == d["gen_tokens"]).mean()
        print(f"{name}: {len(names)} int8 matrices; greedy tokens "
              f"{same:.1%} equal to the float model's")
    np.savez_compressed(os.path.join(HERE, "lm_fixture_q8.npz"), **out)


if __name__ == "__main__":
    q8_main() if sys.argv[1:] == ["q8"] else main()
