"""The hypernetwork's attention for prediction: Triton kernels with the QK norms inside.

Without autograd, a trunk block's attention in torch is: a product writing q, k, v; per-head
RMS norms over q and k, each a pass that reads and writes a (tokens x d) tensor; and cuDNN's
attention. At the Wan2.1-1.3B shapes (240 matrices of 257 tokens: 256 tiles and a CLS token)
cuDNN also spends a whole extra tile row and column of its 128-wide tiles on the 257th token:
0.31 ms against 0.14 at 256 tokens.

``attention`` reads q where the product wrote it (a third of the self-attention's ``qkv``
output, or the cross-attention's query product), normalises it per head in registers, runs
the online softmax over 64-wide key tiles, and writes the heads merged, ready for the output
projection. A sequence that is not a whole number of tiles costs no masked tiles where that
can be helped: the last query tile ends at the last row (it overlaps the tile before it, and
both write the same values there), and one key past the last whole key tile is done on
vectors before the loop.

k's norm: for the text's keys it runs once per prompt, outside (``CrossAttention.context``).
Keys of at most one whole tile of 256 (+1), as the 257 tokens of a matrix that its own
self-attention and stage II's attention to the stage-I tokens read, go to a second kernel
(``launch_short``): one program per (head, batch) normalises them once in registers and runs
every query tile against all of them with a plain softmax. That replaces a pass over k
(0.068 ms) and costs 0.042 ms more kernel time at 240 x 12 x 257 x 64. A development version of
the general kernel that applied each key's norm to every score tile was slower than the pass.

Measured on an H100 (benchmarks/bench_attention.py; the hypernetwork's prediction with and
without it: benchmarks/bench_hypernet.py sections graph_predict and graph_predict_sdpa):
- self-attention, 240 x 12 heads x 257 x 64: q and k norms + cuDNN 0.47 ms, the k norm + the
  general kernel 0.29 ms (the kernel alone 0.23; without the tail handling 0.25), the short
  kernel with both norms inside 0.26 ms;
- cross-attention, the 61,680 queries of one prompt against 512 keys: the q norm + cuDNN
  0.31 ms, this kernel 0.28 ms;
- the whole prediction (one CUDA graph): 59.8 ms with QK norms + cuDNN, 56.8 ms with these kernels.

The torch path (``reference``) is the same math as the plain ``SelfAttention`` /
``CrossAttention`` and runs wherever the kernel does not: CPU, autograd, head sizes that are
not a power of two >= 16. The kernel also runs under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check it on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

#: Use the kernel where it applies (a process-wide switch, for comparisons).
ENABLED = True
_LOG2E = 1.4426950408889634


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``attention`` runs the Triton kernel for tensors of ``dtype`` on ``device``."""
    return ENABLED and triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


if triton is not None:
    @triton.jit
    def _load_norm(ptr, mask, gain, eps, HD: tl.constexpr, NORM: tl.constexpr):
        """A (rows, HD) tile, RMS-normalised per row with ``gain`` when NORM (fp32 math, input dtype out);
        ``gain`` may carry the softmax scale (PRESCALE)."""
        x = tl.load(ptr) if mask is None else tl.load(ptr, mask=mask, other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            xf = xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / HD + eps)[:, None]
            x = (xf * gain[None, :]).to(x.dtype)
        return x

    @triton.jit
    def _attend(q, k, v, col_ok, m_i, l_i, acc, scale2, PRESCALE: tl.constexpr):
        """One key tile of the online softmax: (m_i, l_i, acc) updated with the scores q k^T of the
        keys where ``col_ok`` (None: all); with PRESCALE q already carries the scale."""
        s = tl.dot(q, tl.trans(k))
        if not PRESCALE:
            s = s * scale2
        if col_ok is not None:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _attention_kernel(Q, K, V, O, Mask, QG,
                          sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, smb,
                          q_rows, kv_full, kv_len, scale2, eps,
                          HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KEY_TAIL: tl.constexpr,
                          SHIFT_LAST: tl.constexpr, Q_NORM: tl.constexpr, PRESCALE: tl.constexpr,
                          HAS_MASK: tl.constexpr):
        """One (query tile, head, batch): O = softmax(norm(Q) K^T * scale) V, online over key tiles.
        Keys [0, kv_full) are whole BN tiles; the rest (kv_len - kv_full) are, with KEY_TAIL == 1,
        one key done on vectors before the loop, with KEY_TAIL < 0 one masked tile after it.
        SHIFT_LAST: the last query tile ends at the last row. ``scale2``: the softmax scale times
        log2(e); PRESCALE (q normalised only): it multiplies the q norm's gain, not every score."""
        tile, h = tl.program_id(0), tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)  # batch offsets may pass 2**31 elements
        if SHIFT_LAST:  # rows the last tile shares with the one before are written twice, alike
            rows = tl.minimum(tile * BM, q_rows - BM) + tl.arange(0, BM)
        else:
            rows = tile * BM + tl.arange(0, BM)
        e = tl.arange(0, HD)
        row_ok = rows < q_rows
        # the gain rounded to q's dtype, as RMSNorm rounds it
        qg = tl.load(QG + e).to(Q.dtype.element_ty).to(tl.float32) if Q_NORM else None
        if PRESCALE:
            qg = qg * scale2
        q = _load_norm(Q + b * sqb + h * sqh + rows[:, None] * sqs + e[None, :], row_ok[:, None], qg, eps, HD, Q_NORM)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        if KEY_TAIL == 1:  # the one key past the whole tiles (e.g. the 257th token) on vectors, first:
            kj = tl.load(k_base + kv_full * sks + e).to(tl.float32)  # it sets the softmax's start
            s_j = tl.sum(q.to(tl.float32) * kj[None, :], axis=1)
            if not PRESCALE:
                s_j = s_j * scale2
            if HAS_MASK:
                s_j = tl.where(tl.load(Mask + b * smb + kv_full) != 0, s_j, float("-inf"))
            m_i = s_j
            l_i = tl.where(s_j == float("-inf"), 0.0, 1.0)
            vj = tl.load(v_base + kv_full * svs + e).to(tl.float32)
            acc = l_i[:, None] * vj[None, :]
        else:
            m_i = tl.full([BM], float("-inf"), tl.float32)
            l_i = tl.zeros([BM], tl.float32)
            acc = tl.zeros([BM, HD], tl.float32)
        for start in range(0, kv_full, BN):
            cols = start + tl.arange(0, BN)
            k = tl.load(k_base + cols[:, None] * sks + e[None, :])
            v = tl.load(v_base + cols[:, None] * svs + e[None, :])
            col_ok = (tl.load(Mask + b * smb + cols) != 0) if HAS_MASK else None
            m_i, l_i, acc = _attend(q, k, v, col_ok, m_i, l_i, acc, scale2, PRESCALE)
        if KEY_TAIL < 0:  # the keys past the whole tiles as one masked tile
            cols = kv_full + tl.arange(0, BN)
            col_ok = cols < kv_len
            k = tl.load(k_base + cols[:, None] * sks + e[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + e[None, :], mask=col_ok[:, None], other=0.0)
            if HAS_MASK:
                col_ok = col_ok & (tl.load(Mask + b * smb + cols, mask=col_ok, other=0) != 0)
            m_i, l_i, acc = _attend(q, k, v, col_ok, m_i, l_i, acc, scale2, PRESCALE)
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sos + e[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _short_attention_kernel(Q, K, V, O, QG, KG, sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                                q_rows, scale2, eps, HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                KEY_TAIL: tl.constexpr, SHIFT_LAST: tl.constexpr, Q_NORM: tl.constexpr):
        """One (head, batch) whose keys are one whole BN tile (+ one on vectors with KEY_TAIL): K is
        RMS-normalised (gain KG) once, in registers, and every query tile gets a plain softmax over
        all keys (no online rescaling)."""
        h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # batch offsets may pass 2**31 elements
        e = tl.arange(0, HD)
        j = tl.arange(0, BN)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        kg = tl.load(KG + e).to(K.dtype.element_ty).to(tl.float32)  # rounded as RMSNorm rounds it
        k = _load_norm(k_base + j[:, None] * sks + e[None, :], None, kg, eps, HD, True)
        v = tl.load(v_base + j[:, None] * svs + e[None, :])
        if KEY_TAIL:  # the key past the whole tile, normalised and rounded like the others
            kt = tl.load(k_base + BN * sks + e).to(tl.float32)
            kt = (kt * tl.rsqrt(tl.sum(kt * kt, axis=0) / HD + eps) * kg).to(K.dtype.element_ty).to(tl.float32)
            vt = tl.load(v_base + BN * svs + e).to(tl.float32)
        qg = tl.load(QG + e).to(Q.dtype.element_ty).to(tl.float32) if Q_NORM else None
        q_base = Q + b * sqb + h * sqh
        o_base = O + b * sob + h * soh
        for t in range(0, tl.cdiv(q_rows, BM)):
            if SHIFT_LAST:  # rows the last tile shares with the one before are written twice, alike
                rows = tl.minimum(t * BM, q_rows - BM) + tl.arange(0, BM)
            else:
                rows = t * BM + tl.arange(0, BM)
            row_ok = rows < q_rows
            q = _load_norm(q_base + rows[:, None] * sqs + e[None, :], row_ok[:, None], qg, eps, HD, Q_NORM)
            s = tl.dot(q, tl.trans(k)) * scale2
            m = tl.max(s, axis=1)
            if KEY_TAIL:
                s_t = tl.sum(q.to(tl.float32) * kt[None, :], axis=1) * scale2
                m = tl.maximum(m, s_t)
            p = tl.exp2(s - m[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v)
            if KEY_TAIL:
                p_t = tl.exp2(s_t - m)
                l_i += p_t
                acc += p_t[:, None] * vt[None, :]
            tl.store(o_base + rows[:, None] * sos + e[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                     mask=row_ok[:, None])


def _gain(g: Tensor) -> Tensor:
    """A norm's gain as the kernels read it: in its own dtype (they round it to the input's, as
    ``RMSNorm`` does), contiguous; a conversion here would be a kernel of its own on every call."""
    return g if g.is_contiguous() else g.contiguous()


def _head_dim_ok(hd: int) -> bool:
    """Head sizes the kernel takes (its tiles are powers of two; the op runs others in torch)."""
    return hd >= 16 and hd & (hd - 1) == 0


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (batch, heads, tokens, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if mask is not None and mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"attention: mask {tuple(mask.shape)} is not (batch, keys) = {(k.shape[0], k.shape[2])}")


def _check_launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor) -> None:
    """What both kernels need: the shapes ``_check`` takes, Triton, and a contiguous head_dim."""
    _check(q, k, v, mask)
    if triton is None:
        raise RuntimeError("attention: Triton is not installed")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(3) != 1:
            raise ValueError(f"attention: {name}'s head_dim must be contiguous (stride {t.stride(3)})")


def launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_gain: Tensor | None, eps: float, out: Tensor,
           block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
           tails: bool = True) -> Tensor:
    """Run the kernel: q (B, H, M, hd), k / v (B, H, L, hd), any strides with the last one 1; out
    like q. ``q_gain``: the per-head RMS norm's weight over q (hd,; read in its own dtype and
    rounded to q's in the kernel, as ``hypernet.RMSNorm`` rounds it), None for no norm.
    Returns out.

    With ``tails`` (the default) a sequence that is not a whole number of tiles costs no
    masked tiles where it can be helped: the last query tile ends at the last row (it shares
    rows with the tile before it, which both write alike), and one key past the last whole key
    tile is done on vectors. 257 = 4 x 64 + 1 tokens then cost 5 x 4 tiles (the fifth query tile
    overlapping the fourth) and a key on vectors, not 5 x 5 tiles.
    """
    _check_launch(q, k, v, mask, out)
    bsz, heads, rows, hd = q.shape
    kv_len = k.shape[2]
    if not _head_dim_ok(hd):
        raise ValueError(f"attention: head_dim {hd} must be a power of two >= 16")
    if mask is not None:
        mask = mask.contiguous()  # bool, read as is
    key_tail = kv_len % block_n
    key_tail = 0 if key_tail == 0 else 1 if key_tail == 1 and tails else -1
    # the softmax scale folded into the q norm's gain: 0.290 -> 0.277 ms for the cross-attention to
    # 512 text keys, but 0.227 -> 0.257 ms for the 257-token self-attention (one key on vectors)
    # on an H100 (development probe): Triton schedules the two loops differently, so only there
    prescale = q_gain is not None and key_tail != 1
    _attention_kernel[(triton.cdiv(rows, block_m), heads, bsz)](
        q, k, v, out, q if mask is None else mask, q if q_gain is None else _gain(q_gain),
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2), out.stride(1),
        0 if mask is None else mask.stride(0),
        rows, kv_len // block_n * block_n, kv_len, _LOG2E / math.sqrt(hd), eps,
        HD=hd, BM=block_m, BN=block_n, KEY_TAIL=key_tail, SHIFT_LAST=tails and rows > block_m,
        Q_NORM=q_gain is not None, PRESCALE=prescale, HAS_MASK=mask is not None, num_warps=num_warps,
        num_stages=num_stages)
    return out


def _whole_tile(kv_len: int) -> int:
    """The keys of ``kv_len`` that ``launch_short`` takes as one tile: all of them when a power of two,
    else all but the last (done on vectors); ``short_applies`` checks the result."""
    return kv_len if kv_len & (kv_len - 1) == 0 else kv_len - 1


def short_applies(kv_len: int, mask: Tensor | None, k_gain: Tensor | None, block_n_max: int = 256) -> bool:
    """Whether ``launch_short`` serves keys of ``kv_len``: k normalised in the kernel (``k_gain``), no
    key mask, and the keys one whole power-of-two tile of 16 to ``block_n_max``, or that plus one."""
    tile = _whole_tile(kv_len)
    return mask is None and k_gain is not None and 16 <= tile <= block_n_max and tile & (tile - 1) == 0


def launch_short(q: Tensor, k: Tensor, v: Tensor, q_gain: Tensor | None, k_gain: Tensor, eps: float, out: Tensor,
                 block_m: int = 64, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """The kernel for short key sequences (``short_applies``): one program per (head, batch) that
    RMS-normalises its keys once (gain ``k_gain``) and runs every query tile against all of them.
    Shapes and strides as ``launch``; the q norm as there (``q_gain`` None: none). Returns out.

    It replaces the k norm's own pass: at 240 x 12 x 257 x 64 on an H100
    (benchmarks/bench_attention.py), 0.258 ms against 0.068 (k norm) + 0.226 (``launch``); at 256
    tokens 0.213 against 0.068 + 0.182. Splitting a sequence's query tiles over several programs
    (each normalising the keys again) or doing a 257th query row on vectors were slower in a
    development probe (0.31 to 0.36 and 0.57 ms). Three pipeline stages, not two: 0.254 against
    0.270 ms (development probe, H100, the two alternated six times in one process); a sweep of
    block_m 32 / 64 / 128 and 4 / 8 warps found none faster than 64 rows and 4 warps.
    """
    _check_launch(q, k, v, None, out)
    bsz, heads, rows, hd = q.shape
    kv_len = k.shape[2]
    if not short_applies(kv_len, None, k_gain) or not _head_dim_ok(hd):
        raise ValueError(f"attention: launch_short takes 16..256 keys (a power of two, or one more) and a "
                         f"power-of-two head_dim, got {kv_len} keys, head_dim {hd}")
    tile = _whole_tile(kv_len)
    _short_attention_kernel[(heads, bsz)](
        q, k, v, out, q if q_gain is None else _gain(q_gain), _gain(k_gain),
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2), out.stride(1),
        rows, _LOG2E / math.sqrt(hd), eps, HD=hd, BM=block_m, BN=tile, KEY_TAIL=kv_len != tile,
        SHIFT_LAST=rows > block_m, Q_NORM=q_gain is not None, num_warps=num_warps, num_stages=num_stages)
    return out


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_gain: Tensor | None, eps: float,
              k_gain: Tensor | None = None) -> Tensor:
    """The same math in torch: the per-head RMS norms over q and k (gains in their dtype, as
    ``hypernet.RMSNorm``; None: no norm) then SDPA. Shapes as ``launch``; returns (B, H, M, hd)."""
    _check(q, k, v, mask)
    if q_gain is not None:
        q = F.rms_norm(q, (q.shape[-1],), q_gain.to(q.dtype), eps)
    if k_gain is not None:
        k = F.rms_norm(k, (k.shape[-1],), k_gain.to(k.dtype), eps)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


@torch.library.custom_op("lofa::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q_gain: Tensor | None,
                  eps: float, k_gain: Tensor | None) -> Tensor:
    """(B, H, M, hd) queries against (B, H, L, hd) keys / values -> (B, M, H, hd), heads merged in place."""
    bsz, heads, rows, hd = q.shape
    out = q.new_empty(bsz, rows, heads, hd)
    if available(q.device, q.dtype) and _head_dim_ok(hd):
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        if short_applies(k.shape[2], mask, k_gain):
            return launch_short(q, k, v, q_gain, k_gain, eps, out.transpose(1, 2)).transpose(1, 2)
        if k_gain is not None:  # a pass of its own over k, then the general kernel
            k = F.rms_norm(k, (hd,), k_gain.to(k.dtype), eps)
        return launch(q, k, v, mask, q_gain, eps, out.transpose(1, 2)).transpose(1, 2)
    return out.copy_(reference(q, k, v, mask, q_gain, eps, k_gain).transpose(1, 2))


@_attention_op.register_fake
def _(q, k, v, mask, q_gain, eps, k_gain):
    bsz, heads, rows, hd = q.shape
    return q.new_empty(bsz, rows, heads, hd)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, q_gain: Tensor | None = None,
              eps: float = 1e-6, k_gain: Tensor | None = None) -> Tensor:
    """softmax(norm(q) norm(k)^T / sqrt(hd)) v for prediction (no autograd: the op has no backward).

    Args:
        q: (B, H, M, hd); k, v: (B, H, L, hd); views of the products' outputs (no copies).
        mask: (B, L) bool, True = a key to attend to; None = all.
        q_gain, k_gain: the weights of per-head RMS norms over q and k (hd,), both with ``eps``;
            None = no norm. With ``k_gain``, no key mask and at most 256 (+1) keys the norm runs
            inside the kernel (``launch_short``), else as a pass before it.
    Returns:
        (B, M, H, hd) contiguous: ``.reshape(B, M, H * hd)`` merges the heads as a view.
    """
    return _attention_op(q, k, v, mask, q_gain, eps, k_gain)
