"""Top-k sparse attention (TKSA): channel attention keeping the top-k scores."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from drsformer_jax.model.convolution import Conv, DepthwiseConv, Layer


def topk_sizes(c: int) -> tuple[int, int, int, int]:
    """The four k of the release: c/2, 2c/3, 3c/4, 4c/5, each Python int() of the float."""
    return int(c / 2), int(c * 2 / 3), int(c * 3 / 4), int(c * 4 / 5)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along `axis`, as torch's F.normalize (eps 1e-12)."""
    sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def topk_masks(scores: jax.Array, ks: tuple[int, ...]) -> list[jax.Array]:
    """For each k, a boolean mask keeping exactly the k largest entries of each row.

    One `top_k` (for the largest k) ranks every row; entry j is kept for a given
    k when its rank is below k. Ranking by index rather than comparing with a
    threshold keeps exactly k entries even when scores tie, as torch.topk does.
    """
    c = scores.shape[-1]
    kmax = max(ks)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), kmax)
    # rank[j] = r where idx[r] == j, kmax where j is not in the top kmax: a one-hot
    # reduction (c x kmax per row) rather than a scatter, so that it also traces with
    # symbolic batch sizes (a shape-polymorphic export).
    hit = idx[..., :, None] == jnp.arange(c, dtype=idx.dtype)
    rank = jnp.where(jnp.any(hit, axis=-2), jnp.argmax(hit, axis=-2), kmax)
    return [rank < k for k in ks]


class TopKSparseAttention(Layer):
    """TKSA of the release (checkpoint prefix `attn.`).

    Per head, q and k are (c, H*W) matrices, L2-normalised along H*W; the c x c
    score matrix times a learned temperature is sparsified four ways (top k_i of
    each row kept, others -inf), each softmaxed, and the four maps are mixed with
    learned scalars attn1..attn4. Because the mix is linear it is applied to the
    probability maps, so the large product with v is done once, not four times.
    `recompute`: the backward pass keeps q and k (in the computation dtype) and
    normalises them and forms the scores again, rather than keeping float32 copies.
    """

    dim: int
    num_heads: int
    use_bias: bool = False
    recompute: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        n = self.num_heads
        cf = self.channels_first
        h, w = (x.shape[2], x.shape[3]) if cf else (x.shape[1], x.shape[2])
        # Own parameters first: the release's state_dict lists them before the convs.
        temperature = self.param("temperature", nn.initializers.ones, (n, 1, 1),
                                 self.param_dtype)
        mix = [self.param(f"attn{i}", nn.initializers.constant(0.2), (1,), self.param_dtype)
               for i in range(1, 5)]
        kw = dict(use_bias=self.use_bias, **self.options())
        qkv = Conv(3 * self.dim, 1, name="qkv", **kw)(x)
        qkv = DepthwiseConv(3 * self.dim, 3, name="qkv_dwconv", **kw)(qkv)
        # Channel index = head * c + i (head-major), as the release splits heads.
        # Channels first, each head's q, k, v are (c, H*W) matrices as in the release;
        # channels last, (H*W, c).
        if cf:
            q, k, v = (rearrange(t, "b (n c) h w -> b n c (h w)", n=n)
                       for t in jnp.split(qkv, 3, axis=1))
            spatial, qk, pv = -1, "bncx,bndx->bncd", "bncd,bndx->bncx"
        else:
            q, k, v = (rearrange(t, "b h w (n c) -> b (h w) n c", n=n)
                       for t in jnp.split(qkv, 3, axis=-1))
            spatial, qk, pv = 1, "bxnc,bxnd->bncd", "bncd,bxnd->bxnc"

        # Normalisation, scores and softmax in at least float32 (float64 stays float64).
        acc = jnp.promote_types(self.dtype, jnp.float32)

        def score(q: jax.Array, k: jax.Array, temperature: jax.Array) -> jax.Array:
            q, k = (l2_normalize(t.astype(acc), axis=spatial) for t in (q, k))
            # Always at full precision: a c x c product, cheap, and top_k selects on it.
            scores = jnp.einsum(qk, q.astype(self.dtype), k.astype(self.dtype),
                                preferred_element_type=acc, precision="highest")
            return scores * temperature.astype(acc)

        scores = (jax.checkpoint(score) if self.recompute else score)(q, k, temperature)

        c = self.dim // n
        probs = jnp.zeros_like(scores)
        for weight, keep in zip(mix, topk_masks(scores, topk_sizes(c)), strict=True):
            p = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
            probs = probs + weight.astype(acc) * p

        out = jnp.einsum(pv, probs.astype(self.dtype), v.astype(self.dtype),
                         precision=self.precision)
        if cf:
            out = rearrange(out, "b n c (h w) -> b (n c) h w", h=h, w=w)
        else:
            out = rearrange(out, "b (h w) n c -> b h w (n c)", h=h, w=w)
        return Conv(self.dim, 1, name="project_out", **kw)(out)
