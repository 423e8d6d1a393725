"""Attention of a step's rows over the engine's per-slot KV cache, each row only as far as it sees.

    out = slot_attention(q, k_cache, v_cache, slots, ctx, tile_start, tile_rows, rows_per_tile)
    q = rope_store(qkv, cos, sin, k_cache, v_cache, dest, heads, kv_heads)   # what feeds it

The engine (`veritune.serve.engine`) keeps one cache per layer, `[slots, kv_heads, max_len, head_dim]`.
A step's rows are tokens: a decode row is one slot's next token, a prompt piece is several
consecutive tokens of one slot. Row `r` belongs to slot `slots[r]` and sees that slot's keys
`0 .. ctx[r] - 1` (its position + 1, its own key already written; 0 for a padding row, whose
output is 0). Rows are grouped into *tiles*, consecutive rows of one slot: a decode row alone,
a prompt piece in tiles of `rows_per_tile` rows. One program per (tile, kv head) reads the
slot's keys once, in blocks of BLOCK_N, for all the query heads of that kv head and all the
tile's rows (grouped-query attention without copies), with the online softmax of flash
attention in float32, and stops at the tile's own length.

Why a kernel of our own: SDPA over a static cache reads every slot up to the longest one in
the batch (lengths bucketed for the CUDA graphs), masked, and a prompt piece needs a copy of its
slot's cache; here a decode step reads each slot's keys once up to its own length, prompt pieces
of several slots share one launch, and the loop bounds live on the GPU, so one CUDA graph serves
every length. Triton (CUDA; on a CPU only under TRITON_INTERPRET=1, which the tests use).

`rope_store`, the step's other kernel of its own, turns a layer's fused q/k/v projection into
attention's inputs in one launch: RoPE on the queries and keys, the keys and values written
straight into their slots' cache rows.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the engine keeps SDPA
    triton = None

BLOCK_N = 64  # keys per block: 64 x head_dim x 2 bytes per K and V tile in shared memory
DECODE_QUERIES = 16  # a decode tile's query heads padded to this (tl.dot needs >= 16 rows)
PIECE_QUERIES = 128  # a prompt tile's (rows x query heads of one kv head)


def available(device: torch.device) -> bool:
    """True where the kernel runs: Triton installed and a CUDA device (or the interpreter)."""
    import os

    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def rows_per_tile(group: int) -> int:
    """Rows of a prompt tile: as many as fit PIECE_QUERIES query vectors (group query heads each)."""
    return max(1, PIECE_QUERIES // group)


if triton is not None:

    @triton.jit
    def _slot_attention(
        Q,
        K,
        V,
        Out,
        slot_ptr,
        ctx_ptr,
        tile_start_ptr,
        tile_rows_ptr,
        stride_qr,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_kt,
        stride_or,
        stride_oh,
        scale_log2,
        GROUP: tl.constexpr,
        M: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(tile_rows_ptr + t)
        start = tl.load(tile_start_ptr + t)
        m = tl.arange(0, M)
        row = m // GROUP  # query vector m: row `row` of the tile, query head h * GROUP + m % GROUP
        head = h * GROUP + m % GROUP
        valid = row < n
        r = start + row
        d = tl.arange(0, D)
        q = tl.load(Q + r[:, None] * stride_qr + head[:, None] * stride_qh + d[None, :], mask=valid[:, None], other=0.0)
        ctx = tl.load(ctx_ptr + r, mask=valid, other=0)
        # The tile's last row sees the most (a tile's positions increase); an unused tile sees nothing.
        ctx_max = tl.where(n > 0, tl.load(ctx_ptr + start + tl.maximum(n - 1, 0)), 0)
        slot = tl.load(slot_ptr + start)
        k_base = K + slot * stride_ks + h * stride_kh
        v_base = V + slot * stride_ks + h * stride_kh
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        for s0 in range(0, ctx_max, BLOCK):
            j = s0 + tl.arange(0, BLOCK)
            inside = j < ctx_max
            k = tl.load(k_base + j[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_base + j[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(j[None, :] < ctx[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet: no NaN
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            Out + r[:, None] * stride_or + head[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=valid[:, None],
        )


if triton is not None:

    @triton.jit
    def _rope_store(
        QKV,
        Cos,
        Sin,
        Qout,
        Kc,
        Vc,
        dest_ptr,
        stride_row,
        H: tl.constexpr,
        HKV: tl.constexpr,
        HP: tl.constexpr,
        HKVP: tl.constexpr,
        D: tl.constexpr,
    ):
        # One program per (row, part): part 0 rotates the row's query heads into Qout, part 1
        # rotates its key heads into the cache, part 2 copies its value heads into the cache.
        row = tl.program_id(0)
        part = tl.program_id(1)
        half: tl.constexpr = D // 2
        base = QKV + row * stride_row
        # (Names differ between the branches: a name set in both must hold one shape in both.)
        if part == 2:
            hv = tl.arange(0, HKVP)
            dv = tl.arange(0, D)
            keep_v = hv < HKV
            v = tl.load(base + (H + HKV + hv)[:, None] * D + dv[None, :], mask=keep_v[:, None])
            dest_v = tl.load(dest_ptr + row * HKV + hv, mask=keep_v, other=0)
            tl.store(Vc + dest_v[:, None] * D + dv[None, :], v, mask=keep_v[:, None])
        else:
            j = tl.arange(0, half)
            c1 = tl.load(Cos + row * D + j).to(tl.float32)
            c2 = tl.load(Cos + row * D + half + j).to(tl.float32)
            s1 = tl.load(Sin + row * D + j).to(tl.float32)
            s2 = tl.load(Sin + row * D + half + j).to(tl.float32)
            # Both parts as [HP, D/2] tiles (the key heads masked past HKV): the compiled branches
            # must give values of one shape.
            h = tl.arange(0, HP)
            if part == 0:
                keep = h < H
                at = base + h[:, None] * D + j[None, :]
            else:
                keep = h < HKV
                at = base + (H + h)[:, None] * D + j[None, :]
            x1 = tl.load(at, mask=keep[:, None]).to(tl.float32)
            x2 = tl.load(at + half, mask=keep[:, None]).to(tl.float32)
            # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
            y1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(Qout.dtype.element_ty)
            y2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(Qout.dtype.element_ty)
            if part == 0:
                out = Qout + row * H * D + h[:, None] * D + j[None, :]
            else:
                dest = tl.load(dest_ptr + row * HKV + h, mask=keep, other=0)
                out = Kc + dest[:, None] * D + j[None, :]
            tl.store(out, y1, mask=keep[:, None])
            tl.store(out + half, y2, mask=keep[:, None])


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dest: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """The step's q/k/v projection `qkv` [rows, (heads + 2 kv_heads) x head_dim] into attention's
    inputs in one kernel: RoPE (`cos`/`sin` [rows, head_dim], the rows' positions) on the query
    heads, returned [rows, heads, head_dim], and on the key heads, which go with the value heads
    straight into the cache rows `dest` [rows x kv_heads] (of the cache viewed as [-1, head_dim]).
    Replaces a rotation kernel and two index copies per layer: a decode step runs ~100 fewer
    small kernels."""
    rows, head_dim = qkv.shape[0], cos.shape[-1]
    if qkv.stride(-1) != 1 or cos.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("rope_store needs contiguous rows")
    q = torch.empty((rows, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_store[(rows, 3)](
        qkv,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        dest,
        qkv.stride(0),
        H=heads,
        HKV=kv_heads,
        HP=triton.next_power_of_2(heads),
        HKVP=triton.next_power_of_2(kv_heads),
        D=head_dim,
        num_warps=4,
    )
    return q


def slot_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    ctx: torch.Tensor,
    tile_start: torch.Tensor,
    tile_rows: torch.Tensor,
    queries: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of rows `q` [rows, heads, head_dim] over the cache [slots, kv_heads, max_len,
    head_dim] (see the module docstring); tiles `tile_start`/`tile_rows` [tiles] (rows of one
    slot; 0 rows: an unused tile), `queries` = tile rows x group, padded to a power of two >= 16.
    Writes the tile rows of `out` [rows, heads, head_dim] (zeros where a row sees nothing); rows
    in no tile are left as they were."""
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if out is None:
        out = torch.zeros_like(q)
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("slot_attention needs the head dimension contiguous")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (tile_start.shape[0], kv_heads)
    _slot_attention[grid](
        q,
        k_cache,
        v_cache,
        out,
        slots,
        ctx,
        tile_start,
        tile_rows,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        scale * 1.4426950408889634,
        GROUP=heads // kv_heads,
        M=queries,
        D=head_dim,
        BLOCK=BLOCK_N,
        PRECISION=precision,
        num_warps=4 if queries <= 16 else 8,
        num_stages=2,
    )
    return out


def reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, ctx: torch.Tensor
) -> torch.Tensor:
    """The same attention row by row in plain torch (float32): what the tests compare with."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for r in range(q.shape[0]):
        n = int(ctx[r])
        if n == 0:
            continue
        k = k_cache[int(slots[r]), :, :n].float().repeat_interleave(heads // kv_heads, 0)  # [heads, n, d]
        v = v_cache[int(slots[r]), :, :n].float().repeat_interleave(heads // kv_heads, 0)
        w = torch.softmax((q[r].float()[:, None] @ k.transpose(1, 2))[:, 0] / q.shape[-1] ** 0.5, -1)  # [heads, n]
        out[r] = (w[:, None] @ v)[:, 0]
    return out
