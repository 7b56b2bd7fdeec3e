"""Fixtures for ttt.py: the official In-Place TTT MLP (ByteDance-Seed/In-Place-TTT, Qwen3MLP in
hf_models/hf_qwen3/modeling_qwen3.py) run on random weights, in fp32.

The official class is read at run time from the repository's git mirror (no copy of it lives here):
its modeling and configuration files go into a temporary package whose __init__.py is empty (the
official __init__.py imports liger_kernel and registers HF auto classes, which the MLP does not use);
nothing in either file is changed. Set TTT_MIRROR to point elsewhere than the default mirror path.

Run it from a separate virtualenv with the packages the official module imports (transformers 4.57.3
is the official pin; transformers 5.x fails to import the module):

    python3 -m venv ~/ttt-oracle
    ~/ttt-oracle/bin/pip install torch==2.13.0 transformers==4.57.3 einops opt_einsum numpy
    ~/ttt-oracle/bin/python testdata/make_ttt_fixtures.py

It writes testdata/ttt_fixture.npz: per case, the inputs `CASE_x`, `CASE_t` (the target source T0),
the weights in the official layout `CASE|gate_proj` [Hd, D], `CASE|up_proj` [Hd, D], `CASE|down_proj`
[D, Hd], `CASE|ttt_conv` [D, 1, 5], `CASE|ttt_proj` [D, D] (absent without P), the constants
`CASE_chunk` and `CASE_lr`, the official output `CASE_y` and the plain MLP's `CASE_y_plain` (so a
test can see that the TTT term is not negligible). P is a dense random matrix, not the diagonal init,
so that a transposed P would show.
"""
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

MIRROR = os.environ.get("TTT_MIRROR", "/work/.mirror/ByteDance-Seed+In-Place-TTT/repo")
HERE = os.path.dirname(os.path.abspath(__file__))
D, HIDDEN = 8, 12

# name: (batch, frames, chunk, use_proj, target, lr)   target "hidden": t is x itself
CASES = {
    "hidden_proj": (2, 13, 4, True, "hidden", 0.5),        # 4 chunks, the last one partial (13 = 3 x 4 + 1)
    "embed_proj": (2, 10, 3, True, "embed", 0.3),          # a separate target, 10 = 3 x 3 + 1
    "embed_noproj": (2, 12, 4, False, "embed", 0.5),       # whole chunks, V̂ = the conv output
    "hidden_noproj": (1, 9, 4, False, "hidden", 0.5),      # 9 = 2 x 4 + 1
    "partial_proj": (2, 3, 4, True, "embed", 0.5),         # one partial chunk: no update is ever applied
}


def official_module():
    """Import hf_qwen3.modeling_qwen3 from the mirror's HEAD, via a temporary package."""
    root = tempfile.mkdtemp(prefix="ttt_official_")
    pkg = os.path.join(root, "hf_qwen3")
    os.makedirs(pkg)
    for name in ("configuration_qwen3.py", "modeling_qwen3.py"):
        src = subprocess.run(["git", "-C", MIRROR, "show", f"HEAD:hf_models/hf_qwen3/{name}"],
                             check=True, capture_output=True, text=True).stdout
        with open(os.path.join(pkg, name), "w") as f:
            f.write(src)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, root)
    try:
        return (importlib.import_module("hf_qwen3.modeling_qwen3"),
                importlib.import_module("hf_qwen3.configuration_qwen3"))
    finally:                                  # the imported modules stay in memory
        sys.path.remove(root)
        shutil.rmtree(root)


def main():
    modeling, configuration = official_module()
    torch.manual_seed(0)
    out = {}
    for name, (B, T, chunk, use_proj, target, lr) in CASES.items():
        cfg = configuration.Qwen3Config(hidden_size=D, intermediate_size=HIDDEN, hidden_act="silu",
                                        ttt_mode=True, ttt_layers=[0], ttt_proj=use_proj, ttt_lr=lr,
                                        ttt_chunk=chunk, ttt_target="input_embed" if target == "embed"
                                        else "hidden_states")
        mlp = modeling.Qwen3MLP(cfg, layer_idx=0).eval()
        assert mlp.ttt_chunk == chunk and mlp.ttt_lr == lr and (mlp.ttt_proj is not None) == use_proj
        with torch.no_grad():
            for p in mlp.parameters():
                p.normal_(0, 0.4)
            x = torch.randn(B, T, D)
            t = x if target == "hidden" else torch.randn(B, T, D)
            y = mlp(x, t)
            y_plain = mlp(x)                      # t=None: the plain MLP
        out[f"{name}_x"], out[f"{name}_t"] = x.numpy(), t.numpy()
        out[f"{name}_y"], out[f"{name}_y_plain"] = y.numpy(), y_plain.numpy()
        out[f"{name}_chunk"], out[f"{name}_lr"] = np.int64(chunk), np.float64(lr)
        for k, v in mlp.state_dict().items():
            out[f"{name}|{k.removesuffix('.weight')}"] = v.numpy()
        change = float((y - y_plain).abs().max() / y_plain.abs().max())
        print(f"{name}: x {tuple(x.shape)}, chunk {chunk}, proj {use_proj}, lr {lr}: "
              f"TTT changes the output by {change:.3f} of its max")
    path = os.path.join(HERE, "ttt_fixture.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
