"""Fixtures for helium.py: Kyutai's StreamingTransformer in its three flavours (Mimi, LM, depformer),
and its norms applied to a bf16 input by a bf16 module (as in a model loaded in bf16).

Run with the official package (see DEVELOPERS.md): `~/oracle/bin/python testdata/make_helium_fixtures.py`.
Random weights, fixed inputs; saves weights in Kyutai's naming plus batch and streaming outputs.
The LM and non-causal flavours stream 2 steps per call through a ring cache smaller than the sequence, which is
where Kyutai's streaming output departs from its batch output: we must match the streaming one.
"""
import os
import torch, numpy as np
from moshi.modules.transformer import StreamingTransformer, create_norm_fn
from moshi.utils.compile import no_compile
torch.manual_seed(0)
out = {}
for name, kw in {
  "mimi": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, causal=True, layer_scale=0.01, context=6,
               positional_embedding="rope", gating="none", norm="layer_norm", max_period=10000),
  "lm": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=int(4.125*32), causal=True, context=5,
             positional_embedding="rope", gating="silu", norm="rms_norm_f32", max_period=10000),
  "dep": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=int(4.125*32), causal=True, context=None,
             positional_embedding="none", gating="silu", norm="rms_norm_f32", weights_per_step=4, weights_per_step_schedule=[0,1,2,2]),
  # no config ships it, but LMModel(causal=False) is accepted: then nothing is masked, not even empty ring slots
  "noncausal": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, causal=False, context=5,
                    positional_embedding="rope", gating="silu", norm="rms_norm_f32", max_period=10000),
}.items():
    m = StreamingTransformer(**kw).eval()
    with torch.no_grad():
        for p in m.parameters(): p.normal_(0, 0.3)
    T = 4 if name == "dep" else 14
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        y = m(x)
        ys = []
        with m.streaming(2):
            step = 1 if name == "dep" else 2
            for t in range(0, T, step):
                ys.append(m(x[:, t:t+step]))
        ys = torch.cat(ys, 1)
    out[name + "_x"] = x.numpy(); out[name + "_y"] = y.numpy(); out[name + "_ys"] = ys.numpy()
    for k, v in m.state_dict().items(): out[name + "|" + k] = v.numpy()
# bf16 norms, eager (on CPU, Kyutai's layers switch torch.compile off, so this is what a layer runs).
# LayerNormF32 is left out: with its weights cast to bf16, torch refuses the mixed dtypes.
g = torch.Generator().manual_seed(1)
x = (2 * torch.randn(2, 5, 64, generator=g) + 0.5).to(torch.bfloat16)
out["norm_bf16_x"] = x.float().numpy()
for kind in ("layer_norm", "rms_norm", "rms_norm_f32"):
    m = create_norm_fn(kind, 64).to(torch.bfloat16)
    with torch.no_grad(), no_compile():
        for p in m.parameters(): p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        out[f"norm_bf16_{kind}_y"] = m(x).float().numpy()
    for k, v in m.state_dict().items(): out[f"norm_bf16_{kind}|{k}"] = v.float().numpy()
np.savez(os.path.join(os.path.dirname(os.path.abspath(__file__)), "helium_fixture.npz"), **out)
