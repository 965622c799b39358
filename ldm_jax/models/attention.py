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
              fastest layout on XLA:CPU)
``pallas_tpu`` the Pallas flash-attention kernel for TPUs
              (``jax.experimental.pallas.ops.tpu.flash_attention``), TPU
              only; see :func:`pallas_tpu_attention`
============  ================================================================

Naming an implementation the backend does not have (``cudnn`` off NVIDIA
GPUs, ``pallas_tpu`` off TPUs) raises ValueError naming both. All agree to
float32 rounding (tests/test_attention_impl.py).
"""

import math

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "pallas_tpu")
# The backend each implementation needs (None: any).
_BACKENDS = {"auto": None, "xla": None, "einsum": None, "cudnn": "gpu", "pallas_tpu": "tpu"}
_TPU_BLOCK = 128  # the Pallas TPU kernel's tile: keys (and long query sequences) are padded to a multiple of it
_CUDNN_KEYS = 8  # cuDNN's unmasked keys are padded to a multiple of this many (its training kernels refuse odd counts)


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
        out = einsum_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), mask, is_causal)
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
