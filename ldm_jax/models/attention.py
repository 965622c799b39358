"""Multi-head scaled dot-product attention with a selectable implementation.

Every attention layer of the U-Net, the VAE and the CLIP text encoder calls
:func:`attention`; its ``impl`` (a module field ``attention_impl``, set for
all three models by ``Pipeline`` / ``build_modules`` and by the run config's
top-level ``attention_impl``) picks the kernel:

============  ================================================================
``auto``      the heads-first einsum on CPU, ``jax.nn.dot_product_attention``
              with no implementation named elsewhere (which jax 0.10 runs as
              XLA's, not cuDNN's, even on NVIDIA GPUs)
``xla``       ``jax.nn.dot_product_attention(implementation='xla')``
``cudnn``     cuDNN's fused flash attention (NVIDIA GPUs only):
              ``jax.nn.dot_product_attention(implementation='cudnn')`` for
              the calls cuDNN takes (bfloat16 / float16 inputs, head width a
              multiple of 8 up to 128, 256 on Hopper or later, an even
              query length); keys unmasked by ``mask`` and ``is_causal``
              whose number is not a multiple of 8 (SD's 77 text tokens) are
              zero-padded to one and masked out by their length; the others
              (float32 ``upcast_attention``, the VAE's single 512-wide head,
              masked or causal attention over an odd number of keys) run
              XLA's implementation
``einsum``    two heads-first batched matmuls around a float32 softmax (the
              fastest layout on XLA:CPU); unmasked attention with more than
              :data:`LOGITS_PER_TILE` logits (the VAE's mid-block attention
              over 32x32 or larger latents) runs tiled instead, with a
              hand-written backward pass (:func:`tiled_attention`)
``pallas_tpu`` the Pallas flash-attention kernel for TPUs
              (``jax.experimental.pallas.ops.tpu.flash_attention``), TPU
              only; see :func:`pallas_tpu_attention`
============  ================================================================

Naming an implementation the backend does not have (``cudnn`` off NVIDIA
GPUs, ``pallas_tpu`` off TPUs) raises ValueError naming both. All agree to
float32 rounding (tests/test_attention_impl.py).
"""

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "pallas_tpu")
# The backend each implementation needs (None: any).
_BACKENDS = {"auto": None, "xla": None, "einsum": None, "cudnn": "gpu", "pallas_tpu": "tpu"}
_TPU_BLOCK = 128  # the Pallas TPU kernel's tile: keys (and long query sequences) are padded to a multiple of it
_CUDNN_KEYS = 8  # cuDNN's unmasked keys are padded to a multiple of this many (its training kernels refuse odd counts)
# The most logits (float32: 8 MiB) that the einsum implementation materialises at once for unmasked attention. The f=2
# VAE's mid-block attention (1,024 tokens) trained 1.4x and encoded 2.0x faster tiled at 8 MiB than whole on a
# 2-core Xeon (docs/experiments.md): tiles that stay in cache instead of a logits array written and read several times.
LOGITS_PER_TILE = 1 << 21


def check_attention_impl(impl: str) -> None:
    """ValueError unless ``impl`` names one of :data:`ATTENTION_IMPLS` (whatever the backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {list(ATTENTION_IMPLS)}")


def check_backend(impl: str, backend: str | None = None) -> None:
    """ValueError unless ``backend`` (default: JAX's) can run attention implementation ``impl``."""
    check_attention_impl(impl)
    backend = backend or jax.default_backend()
    needed = _BACKENDS[impl]
    if needed is not None and backend != needed:
        raise ValueError(f"attention_impl {impl!r} needs the {needed!r} backend (an NVIDIA GPU for 'cudnn', a TPU "
                         f"for 'pallas_tpu'), but JAX's backend is {backend!r}; use 'auto', 'xla' or 'einsum'")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, mask: jax.Array | None = None,
              is_causal: bool = False, impl: str = "auto") -> jax.Array:
    """Multi-head attention on [B, T, heads * head_dim] inputs, returning [B, Tq, heads * head_dim].

    ``mask`` (bool, True = attend) broadcasts to [B, heads, Tq, Tk];
    ``is_causal`` adds the causal mask. ``impl`` is one of
    :data:`ATTENTION_IMPLS` (module docstring).
    """
    check_backend(impl)
    b, tq, d = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads)
    q, k, v = split(q), split(k), split(v)
    if impl == "auto" and jax.default_backend() == "cpu":
        impl = "einsum"
    unmasked = mask is None and not is_causal
    if impl == "cudnn" and not _cudnn_supports(q, k, padded_keys=unmasked):
        impl = "xla"
    if impl == "einsum":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        if unmasked and q.shape[0] * heads * tq * k.shape[2] > LOGITS_PER_TILE:
            out = tiled_attention(q, k, v, LOGITS_PER_TILE)
        else:
            out = einsum_attention(q, k, v, mask, is_causal)
        return out.transpose(0, 2, 1, 3).reshape(b, tq, d)
    if impl == "pallas_tpu":
        out = pallas_tpu_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), mask, is_causal)
        return out.transpose(0, 2, 1, 3).reshape(b, tq, d)
    if impl == "cudnn" and unmasked:
        return padded_keys_attention(q, k, v, _CUDNN_KEYS, implementation="cudnn").reshape(b, tq, d)
    implementation = impl if impl in ("xla", "cudnn") else None  # None ('auto' off CPU): jax chooses
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=implementation).reshape(b, tq, d)


def padded_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int,
                          implementation: str = "cudnn") -> jax.Array:
    """Unmasked attention on heads-last q [B, Tq, N, H], k / v [B, Tk, N, H], with the keys and values
    zero-padded to a multiple of ``multiple`` and the padding masked out by the keys' length.

    The output is the unpadded attention's; padded keys get no weight and
    their rows no gradient. It lets cuDNN's fused kernel take SD's
    cross-attention to 77 text tokens, which XLA's implementation runs with
    its scores materialised.
    """
    batch, keys = k.shape[:2]
    pad = -keys % multiple
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    return jax.nn.dot_product_attention(q, jnp.pad(k, widths), jnp.pad(v, widths), implementation=implementation,
                                        key_value_seq_lengths=jnp.full((batch,), keys, jnp.int32))


def _cudnn_supports(q: jax.Array, k: jax.Array, padded_keys: bool) -> bool:
    """Whether cuDNN's flash attention takes heads-last ``q`` [B, Tq, N, H], ``k`` [B, Tk, N, H].

    Dtype, head width, and even sequence lengths: JAX refuses cuDNN's
    training kernels for an odd length ("Unsupported sequence length Q 4096,
    KV 77" on an H200 for SD's cross-attention to 77 tokens). With
    ``padded_keys`` (unmasked attention, whose keys :func:`padded_keys_attention`
    pads) any number of keys will do.
    """
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[1] % 2 or (k.shape[1] % 2 and not padded_keys):
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    widest = 256 if tuple(int(x) for x in capability.split(".")[:2]) >= (9, 0) else 128
    return q.shape[-1] % 8 == 0 and q.shape[-1] <= widest


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     is_causal: bool = False) -> jax.Array:
    """Heads-first attention: q [B, H, Tq, D], k / v [B, H, Tk, D] -> [B, H, Tq, D]; float32 softmax."""
    tq, tk = q.shape[2], k.shape[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    if is_causal:
        causal = jnp.tril(jnp.ones((tq, tk), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def _tiles(n: int, tq: int, tk: int, logits_per_tile: int) -> tuple[int, int]:
    """(rows of batch x heads, query rows) per tile: whole query sequences for as many rows as fit, else one
    row and as many queries as fit."""
    group = _largest_divisor(n, logits_per_tile // (tq * tk))
    queries = tq if group * tq * tk <= logits_per_tile else _largest_divisor(tq, logits_per_tile // tk)
    return group, queries


def _split_tiles(x: jax.Array, group: int, queries: int) -> jax.Array:
    """[N, T, ...] -> [N / group, T / queries, group, queries, ...]."""
    n, t, *rest = x.shape
    return x.reshape(n // group, group, t // queries, queries, *rest).swapaxes(1, 2)


def _join_tiles(x: jax.Array) -> jax.Array:
    """The inverse of :func:`_split_tiles`."""
    a, b, group, queries, *rest = x.shape
    return x.swapaxes(1, 2).reshape(a * group, b * queries, *rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_attention(q: jax.Array, k: jax.Array, v: jax.Array, logits_per_tile: int) -> jax.Array:
    """Unmasked heads-first attention (q [B, H, Tq, D], k / v [B, H, Tk, D]) computed in tiles of at most
    ``logits_per_tile`` logits, with a hand-written backward pass.

    Each tile is a group of (batch, head) rows and a block of their queries
    against all keys, so its softmax is exact (float32). The forward pass
    keeps the output and each query's log-sum-exp; the backward pass
    recomputes each tile's weights from them (as flash attention does) and
    accumulates the key and value gradients over the query blocks. Equal to
    :func:`einsum_attention` up to float32 rounding (tests/test_attention_impl.py).
    """
    return _tiled_forward(q, k, v, logits_per_tile)[0]


def _tiled_forward(q, k, v, logits_per_tile):
    """(output, residuals for :func:`_tiled_backward`)."""
    (b, h, tq, d), tk = q.shape, k.shape[2]
    n = b * h
    group, queries = _tiles(n, tq, tk, logits_per_tile)
    q, k, v = q.reshape(n, tq, d), k.reshape(n // group, group, tk, d), v.reshape(n // group, group, tk, d)
    scale = 1.0 / math.sqrt(d)

    def per_group(tiles):
        q_blocks, kg, vg = tiles

        def per_block(qb):
            logits = jnp.einsum("gqd,gkd->gqk", qb, kg).astype(jnp.float32) * scale
            peak = logits.max(-1, keepdims=True)
            weights = jnp.exp(logits - peak)
            total = weights.sum(-1, keepdims=True)
            out = jnp.einsum("gqk,gkd->gqd", (weights / total).astype(vg.dtype), vg)
            return out, (peak + jnp.log(total))[..., 0]

        return jax.lax.map(per_block, q_blocks)

    out, logsumexp = jax.lax.map(per_group, (_split_tiles(q, group, queries), k, v))
    out, logsumexp = _join_tiles(out), _join_tiles(logsumexp)
    return out.reshape(b, h, tq, d), (q, k, v, out, logsumexp)


def _tiled_backward(logits_per_tile, residuals, d_out):
    """Gradients of :func:`tiled_attention` for q, k, v from the forward pass's residuals."""
    q, k, v, out, logsumexp = residuals
    (n, tq, d), (_, group, tk, _) = q.shape, k.shape
    b, h = d_out.shape[:2]
    _, queries = _tiles(n, tq, tk, logits_per_tile)
    d_out = d_out.reshape(n, tq, d)
    # sum_k P * dP per query: the softmax backward's row term, from the output instead of the weights.
    row_term = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)
    scale = 1.0 / math.sqrt(d)

    def per_group(tiles):
        q_blocks, d_out_blocks, lse_blocks, row_blocks, kg, vg = tiles

        def per_block(carry, block):
            dk, dv = carry
            qb, dob, lse, row = block
            logits = jnp.einsum("gqd,gkd->gqk", qb, kg).astype(jnp.float32) * scale
            weights = jnp.exp(logits - lse[..., None])
            dv = dv + jnp.einsum("gqk,gqd->gkd", weights, dob.astype(jnp.float32))
            d_weights = jnp.einsum("gqd,gkd->gqk", dob, vg).astype(jnp.float32)
            d_logits = weights * (d_weights - row[..., None]) * scale
            dq = jnp.einsum("gqk,gkd->gqd", d_logits, kg.astype(jnp.float32))
            dk = dk + jnp.einsum("gqk,gqd->gkd", d_logits, qb.astype(jnp.float32))
            return (dk, dv), dq

        zeros = jnp.zeros(kg.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(per_block, (zeros, zeros), (q_blocks, d_out_blocks, lse_blocks, row_blocks))
        return dq, dk, dv

    split = lambda x: _split_tiles(x, group, queries)
    dq, dk, dv = jax.lax.map(per_group, (split(q), split(d_out), split(logsumexp), split(row_term), k, v))
    shape = (b, h, -1, d)
    return (_join_tiles(dq).reshape(shape).astype(q.dtype), dk.reshape(shape).astype(k.dtype),
            dv.reshape(shape).astype(v.dtype))


tiled_attention.defvjp(_tiled_forward, _tiled_backward)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                         is_causal: bool = False) -> jax.Array:
    """The Pallas TPU flash-attention kernel on heads-first q [B, H, Tq, D], k / v [B, H, Tk, D].

    The kernel's tiles need keys in multiples of 128 and heads no wider than
    128 or a multiple of 128: keys and values are zero-padded to a multiple
    of 128 and the padding masked out by segment ids; a head wider than 128
    is zero-padded to a multiple of 128 (scores and outputs are unchanged;
    the padding is sliced off); a query sequence longer than 128 is padded to
    a multiple of 128. ``mask`` may only mask keys ([B or 1, 1, 1, Tk]).

    Runs on TPUs; on a CPU inside
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (tests). Not
    yet wrapped in ``shard_map``: under a multi-device mesh XLA cannot
    partition the kernel, so it gathers the operands and runs it whole on
    every device (right results, wasted work).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # loaded only when used

    b, h, tq, d = q.shape
    tk = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    keep = None
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(f"attention_impl 'pallas_tpu' takes key masks of shape [B, 1, 1, Tk], got {mask.shape}")
        keep = jnp.broadcast_to(mask[:, 0, 0, :], (b, tk))
    pad_d = -d % _TPU_BLOCK if d > _TPU_BLOCK else 0
    pad_q = -tq % _TPU_BLOCK if tq > _TPU_BLOCK else 0
    pad_k = -tk % _TPU_BLOCK
    pad = lambda x, rows: jnp.pad(x, ((0, 0), (0, 0), (0, rows), (0, pad_d)))
    q, k, v = pad(q, pad_q), pad(k, pad_k), pad(v, pad_k)
    if pad_k:
        keep = jnp.ones((b, tk), bool) if keep is None else keep
        keep = jnp.pad(keep, ((0, 0), (0, pad_k)))
    segments = None if keep is None else fa.SegmentIds(q=jnp.ones((b, tq + pad_q), jnp.int32),
                                                       kv=keep.astype(jnp.int32))
    block_q = min(tq + pad_q, _TPU_BLOCK)
    blocks = fa.BlockSizes(block_q=block_q, block_k_major=_TPU_BLOCK, block_k=_TPU_BLOCK, block_b=1,
                           block_q_major_dkv=block_q, block_k_major_dkv=_TPU_BLOCK, block_k_dkv=_TPU_BLOCK,
                           block_q_dkv=block_q, block_k_major_dq=_TPU_BLOCK, block_k_dq=_TPU_BLOCK,
                           block_q_dq=block_q)
    out = fa.flash_attention(q, k, v, segment_ids=segments, causal=is_causal, sm_scale=scale, block_sizes=blocks)
    return out[:, :, :tq, :d]
