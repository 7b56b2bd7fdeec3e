"""flash.py: causal flash attention as Pallas TPU kernels, forward and backward, beside its reference.

Training runs Moshi's temporal transformer on windows of thousands of frames. Plain attention builds
the [T, T] score matrix; these kernels never do. Each grid step takes one block of queries and one
block of keys and keeps a running max `m`, normaliser `l` and unnormalised output `acc` (online
softmax, FlashAttention-2). Each block of queries visits only the band of key blocks it can see
(not in its future, not past the sliding window), so the cost grows as T x context, not T^2. The
backward pass is two more kernels (FlashAttention-2's): one walks the query blocks
for each key block and accumulates dK, dV; the other walks the key blocks for each query block and
accumulates dQ. Both rebuild a block's attention weights from the forward's per-row log-sum-exp, so
no [T, S] matrix exists in either direction.

    reference_attention(q, k, v, context)   the math, in plain jnp (what the kernels must equal)
    flash_attention(q, k, v, context)       the kernels, differentiable (jax.custom_vjp)

Off TPU the kernels run in Pallas' interpret mode (tests, CPU). helium.py uses this file when a
transformer config asks for attention="flash"; it imports no project file. `python flash.py` checks
the kernels against the reference, values and gradients.
Reference: the structure of jax's `pallas/ops/tpu/flash_attention.py` (no code taken from it).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK_Q = 128        # queries per grid step (multiple of 8 on TPU)
BLOCK_K = 128        # keys per grid step (multiple of 128 on TPU: the lane width)
STAT_LANES = 128     # running max / sum are stored lane-replicated, as TPU layouts want


def reference_attention(q, k, v, context=None):
    """q, k, v [B, H, T, Dh] -> [B, H, T, Dh]: causal softmax attention, query t seeing keys s with
    0 <= t - s < context (all s <= t when context is None)."""
    t = jnp.arange(q.shape[2])
    delta = t[:, None] - t[None, :]
    mask = (delta >= 0) & (delta < (context or q.shape[2]))
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v).astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# Which blocks meet. Every kernel runs on a grid (batch * heads, outer block i, inner step j): the
# forward and dQ walk key blocks for each query block, dK/dV walk query blocks for each key block.
# A query block [q0, q1] sees key block [k0, k1] iff some pair has 0 <= q - k < context, i.e.
# k0 <= q1 and q0 - k1 < context: for each outer block that is a contiguous band of inner blocks
# [lo, hi]. Step j reads inner block lo + j; steps past the band compute nothing, and their index
# map repeats the band's last block, so the pipeline copies nothing for them either (consecutive
# steps reading the same block share one copy). The inner grid axis is as long as the widest band.

@dataclass(frozen=True)
class _Band:
    block_q: int
    block_k: int
    n_inner: int              # blocks along the inner axis
    context: int | None
    keys_inner: bool          # True: outer = query blocks, inner = key blocks

    def span(self, i):
        """First and last inner block that outer block i meets. (Divisions of non-negative ints
        only: Mosaic lowers lax.div directly, floor division of signed ints needs the chip's info.)"""
        bq, bk, c, last = self.block_q, self.block_k, self.context, self.n_inner - 1
        div = jax.lax.div
        if self.keys_inner:
            lo = 0 if c is None else div(jnp.maximum(0, i * bq - c + 1), bk)
            return lo, jnp.minimum(last, div(i * bq + bq - 1, bk))
        return div(i * bk, bq), last if c is None else jnp.minimum(last, div(i * bk + bk + c - 2, bq))

    @property
    def steps(self) -> int:
        if self.context is None:
            return self.n_inner
        outer, inner = (self.block_q, self.block_k) if self.keys_inner else (self.block_k, self.block_q)
        return min(self.n_inner, (outer + self.context - 2) // inner + 2)

    def inner(self, i, j):
        """(inner block that grid step (i, j) reads, whether it lies in the band)."""
        lo, hi = self.span(i)
        return jnp.minimum(lo + j, hi), lo + j <= hi

    def firsts(self, i, j):
        """(first query, first key) of the blocks that grid step (i, j) pairs."""
        block = self.span(i)[0] + j
        if self.keys_inner:
            return i * self.block_q, block * self.block_k
        return block * self.block_q, i * self.block_k

    def index_maps(self):
        """BlockSpec index maps (b, i, j) -> block of the outer and of the inner arrays."""
        return (lambda b, i, j: (b, i, 0)), (lambda b, i, j: (b, self.inner(i, j)[0], 0))


def _block_scores(q, k, q_first, k_first, scale, context):
    """Scores [bq, bk] (fp32) of a query block against a key block, and which pairs attend."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    delta = (q_first + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
             - k_first - jax.lax.broadcasted_iota(jnp.int32, s.shape, 1))
    mask = delta >= 0
    if context is not None:
        mask = mask & (delta < context)
    return s, mask


def _over_band(band, start, body, finish):
    """The loop every kernel runs along its grid's inner axis j: `start()` at the first step,
    `body(q_first, k_first)` at the steps inside the band, `finish()` at the last step."""
    i, j = pl.program_id(1), pl.program_id(2)
    pl.when(j == 0)(start)
    pl.when(band.inner(i, j)[1])(partial(body, *band.firsts(i, j)))
    pl.when(j == pl.num_programs(2) - 1)(finish)


# ----------------------------------------------------------------------------------------------
# Forward: grid (batch * heads, query blocks, key blocks), the key blocks last (the reduction).

def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, band, scale):
    def start():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(q_first, k_first):
        q, k, v = q_ref[0], k_ref[0], v_ref[0]                      # [bq, Dh], [bk, Dh], [bk, Dh]
        s, mask = _block_scores(q, k, q_first, k_first, scale, band.context)
        m_prev, l_prev = m_ref[:, :1], l_ref[:, :1]                   # [bq, 1]
        m_next = jnp.maximum(m_prev, jnp.max(jnp.where(mask, s, -jnp.inf), axis=1, keepdims=True))
        safe_m = jnp.where(m_next == -jnp.inf, 0.0, m_next)          # rows with nothing visible yet
        p = jnp.where(mask, jnp.exp(s - safe_m), 0.0)                # [bq, bk]
        alpha = jnp.exp(jnp.where(m_prev == -jnp.inf, -jnp.inf, m_prev - safe_m))
        l_ref[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_ref.shape)
        m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v,
                                                      preferred_element_type=jnp.float32)

    def finish():
        o_ref[0] = (acc_ref[...] / l_ref[:, :1]).astype(o_ref.dtype)
        lse_ref[0] = m_ref[...] + jnp.log(l_ref[...])               # what the backward rebuilds p from

    _over_band(band, start, body, finish)


# ----------------------------------------------------------------------------------------------
# Backward: dS = p * (dO v^T - D) with D = rowsum(dO * O), then dV = p^T dO, dK = dS^T q, dQ = dS k.

def _block_softmax_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, q_first, k_first, scale, context):
    """What both backward kernels need of a (query block, key block) pair: the attention weights p
    [bq, bk], rebuilt from the forward's log-sum-exp, and dS, the gradient that reaches the scores
    through the softmax."""
    s, mask = _block_scores(q_ref[0], k_ref[0], q_first, k_first, scale, context)
    p = jnp.where(mask, jnp.exp(s - lse_ref[0][:, :1]), 0.0)
    dp = jax.lax.dot_general(do_ref[0], v_ref[0], (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return p, p * (dp - d_ref[0][:, :1])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, band, scale):
    """Grid (BH, key blocks, query blocks): dK, dV of one key block, summed over the query blocks."""
    def start():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(q_first, k_first):
        q, do = q_ref[0], do_ref[0]
        p, ds = _block_softmax_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, q_first, k_first, scale,
                                     band.context)
        dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)   # p^T dO
        dk_acc[...] += scale * jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                                   preferred_element_type=jnp.float32)   # dS^T q

    def finish():
        dk_ref[0] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[0] = dv_acc[...].astype(dv_ref.dtype)

    _over_band(band, start, body, finish)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref, dq_acc, *, band, scale):
    """Grid (BH, query blocks, key blocks): dQ of one query block, summed over the key blocks."""
    def start():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def body(q_first, k_first):
        k = k_ref[0]
        _, ds = _block_softmax_grads(q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, q_first, k_first, scale,
                                     band.context)
        dq_acc[...] += scale * jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    def finish():
        dq_ref[0] = dq_acc[...].astype(dq_ref.dtype)

    _over_band(band, start, body, finish)


# ----------------------------------------------------------------------------------------------
# The calls. Every array is flattened to [B * H, T + pad, X], the sequence padded to whole blocks
# (padded rows sit in every real query's future, so they change nothing).

def _flat(a, pad):
    B, H, T, X = a.shape
    return jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B * H, T + pad, X)


def _interpret(interpret):
    return jax.default_backend() != "tpu" if interpret is None else interpret


def _call(kernel, band, inputs, outputs, sides, scratch, interpret):
    """pallas_call on band's grid (b, outer block i, inner step j) over [BH, Tp, X] arrays: `inputs`,
    then `outputs` given as (X, dtype). `sides` says of each of them whether its rows are queries
    ("q") or keys ("k"): an array on the outer side is read by block i, the other by step j."""
    BH, Tp, Dh = inputs[0].shape
    rows = {"q": band.block_q, "k": band.block_k}
    outer = "q" if band.keys_inner else "k"
    by_i, by_j = band.index_maps()
    spec = lambda X, side: pl.BlockSpec((1, rows[side], X), by_i if side == outer else by_j)   # noqa: E731
    # manual_axis_type: inside shard_map (train.py), the outputs vary over the same mesh axes as q
    axes = jax.typeof(inputs[0]).manual_axis_type
    return pl.pallas_call(
        partial(kernel, band=band, scale=1.0 / math.sqrt(Dh)),
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, X), dtype, manual_axis_type=axes) for X, dtype in outputs],
        grid=(BH, Tp // rows[outer], band.steps),
        in_specs=[spec(a.shape[-1], side) for a, side in zip(inputs, sides)],
        out_specs=[spec(X, side) for (X, _), side in zip(outputs, sides[len(inputs):])],
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        # the last grid axis is each kernel's reduction; the others may split over a chip's cores
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
    )(*inputs)


def _forward(q, k, v, context, block_q, block_k, interpret):
    """-> out [B, H, T, Dh] and the per-row log-sum-exp [BH, Tp, lanes] the backward needs."""
    B, H, T, Dh = q.shape
    pad = (-T) % math.lcm(block_q, block_k)
    band = _Band(block_q, block_k, (T + pad) // block_k, context, keys_inner=True)
    out, lse = _call(_forward_kernel, band, [_flat(a, pad) for a in (q, k, v)],
                     [(Dh, q.dtype), (STAT_LANES, jnp.float32)], "qkkqq",             # q, k, v -> out, lse
                     [(block_q, STAT_LANES), (block_q, STAT_LANES), (block_q, Dh)], interpret)
    return out.reshape(B, H, T + pad, Dh)[:, :, :T], lse


def _backward(q, k, v, out, lse, d_out, context, block_q, block_k, interpret):
    B, H, T, Dh = q.shape
    pad = (-T) % math.lcm(block_q, block_k)
    Tp = T + pad
    # D = rowsum(dO * O), the softmax backward's correction term, lane-replicated like lse
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    inputs = ([_flat(a, pad) for a in (q, k, v, d_out)]
              + [lse, _flat(jnp.broadcast_to(delta, (B, H, T, STAT_LANES)), pad)])
    sides = "qkkqqq"                                                  # q, k, v, dO, lse, D
    # dK, dV: grid (b, key block i, query block of step j); dQ: grid (b, query block i, key block of step j)
    dk, dv = _call(_dkv_kernel, _Band(block_q, block_k, Tp // block_q, context, keys_inner=False), inputs,
                   [(Dh, k.dtype), (Dh, v.dtype)], sides + "kk", [(block_k, Dh), (block_k, Dh)], interpret)
    (dq,) = _call(_dq_kernel, _Band(block_q, block_k, Tp // block_k, context, keys_inner=True), inputs,
                  [(Dh, q.dtype)], sides + "q", [(block_q, Dh)], interpret)
    return tuple(g.reshape(B, H, Tp, Dh)[:, :, :T] for g in (dq, dk, dv))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def flash_attention(q, k, v, context=None, block_q=BLOCK_Q, block_k=BLOCK_K, interpret=None):
    """Causal (optionally sliding-window) attention over a whole sequence; q, k, v [B, H, T, Dh].
    interpret: None runs the kernels compiled on TPU and interpreted elsewhere."""
    return _forward(q, k, v, context, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, context, block_q, block_k, interpret):
    out, lse = _forward(q, k, v, context, block_q, block_k, interpret)
    return out, (q, k, v, out, lse)


def _flash_bwd(context, block_q, block_k, interpret, residuals, d_out):
    return _backward(*residuals, d_out, context, block_q, block_k, interpret)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Checks them against the reference.")
    ap.add_argument("--length", type=int, default=300, help="sequence length (any, not only whole blocks)")
    ap.add_argument("--context", type=int, default=100, help="sliding window (0: none)")
    args = ap.parse_args(argv)
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 2, args.length, 64))
    context = args.context or None
    loss = lambda fn: lambda *qkv: jnp.sum(jnp.sin(fn(*qkv, context)))        # noqa: E731
    err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))   # noqa: E731
    value = err(flash_attention(q, k, v, context), reference_attention(q, k, v, context))
    grads = zip(jax.grad(loss(flash_attention), (0, 1, 2))(q, k, v),
                jax.grad(loss(reference_attention), (0, 1, 2))(q, k, v))
    mode = "interpret mode" if _interpret(None) else "compiled"
    print(f"T={args.length}, window {context}, blocks {BLOCK_Q}x{BLOCK_K} ({mode}): max rel. error vs "
          f"reference: output {value:.1e}, dq/dk/dv {max(err(a, b) for a, b in grads):.1e}")


if __name__ == "__main__":
    main()
