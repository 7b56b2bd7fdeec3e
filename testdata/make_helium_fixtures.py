"""Fixtures for helium.py: Kyutai's StreamingTransformer in its three flavours (Mimi, LM, depformer).

Run with the official package (see DEVELOPERS.md): `~/oracle/bin/python testdata/make_helium_fixtures.py`.
Random weights, fixed inputs; saves weights in Kyutai's naming plus batch and streaming outputs.
The LM flavour streams 2 steps per call through a ring cache smaller than the sequence, which is
where Kyutai's streaming output departs from its batch output: we must match the streaming one.
"""
import os
import torch, numpy as np
from moshi.modules.transformer import StreamingTransformer
torch.manual_seed(0)
out = {}
for name, kw in {
  "mimi": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, causal=True, layer_scale=0.01, context=6,
               positional_embedding="rope", gating="none", norm="layer_norm", max_period=10000),
  "lm": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=int(4.125*32), causal=True, context=5,
             positional_embedding="rope", gating="silu", norm="rms_norm_f32", max_period=10000),
  "dep": dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=int(4.125*32), causal=True, context=None,
             positional_embedding="none", gating="silu", norm="rms_norm_f32", weights_per_step=4, weights_per_step_schedule=[0,1,2,2]),
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
np.savez(os.path.join(os.path.dirname(os.path.abspath(__file__)), "helium_fixture.npz"), **out)
