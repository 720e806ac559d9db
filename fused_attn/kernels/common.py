"""Device helpers shared by the forward and backward kernels: the one mask, the block range it implies, the
score modifiers (softcap, ALiBi) and the dropout keep-mask, the packed-sequence prologue, tile loads (pointer or
TMA), the tile order, and dot.

Mask (docs/design.md): query row i sees key column j iff

    i + offset - left <= j <= i + offset + right,   0 <= i < seqlen_q,  0 <= j < seqlen_k

offset = seqlen_k - seqlen_q for FlashAttention's bottom-right alignment, 0 for SDPA's top-left one; a side
with window -1 is unbounded (HAS_LEFT / HAS_RIGHT false).
"""
import triton
import triton.language as tl


@triton.jit
def _visible(i, j, seqlen_q, seqlen_k, offset, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The mask for broadcastable row indices i and column indices j (either orientation)."""
    ok = (i < seqlen_q) & (j < seqlen_k)
    if HAS_LEFT:
        ok = ok & (j >= i + offset - left)
    if HAS_RIGHT:
        ok = ok & (j <= i + offset + right)
    return ok


@triton.jit
def _tanh(x):
    """tanh to a few float32 ulps without libdevice (the interpreter runs it too): (1 - e) / (1 + e), e = exp(-2|x|),
    where that does not cancel, its odd Taylor series below |x| = 1/4 (a huge softcap is then exactly no softcap)."""
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                      + x2 * 0.021869488536155203))))
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.25, series, tl.where(x < 0, -t, t))


@triton.jit
def _bounded(i, j, seqlen_q, seqlen_k):
    """Row and column indices clamped into [0, seqlen): what mask and score functions see, so the rows and columns
    of a tile past the sequence ends (masked anyway) index nothing outside the tables those functions read."""
    return tl.minimum(i, seqlen_q - 1), tl.minimum(j, seqlen_k - 1)


@triton.jit
def _score(s, i, j, offset, slope, b, h, seqlen_q, seqlen_k, qk_scale, mods, F: tl.constexpr):
    """Raw scores s = q.k of rows i, columns j (broadcastable, either orientation) of batch row b, query head h ->
    (the modified score divided by the softmax scale, d(it) / ds), the modifiers' values from `mods` (a ModArgs:
    cap_in, cap_out, SCORE_ARGS) and the rows' slope, each on where its flag F says. Keeping the kernels' unit
    (score / scale) leaves the online softmax, the stats and P = exp2((s - m) * scale * log2 e - log2 l) as they
    are without modifiers:

        softcap (cap_in = scale / softcap, cap_out = softcap / scale):  s -> cap_out * tanh(cap_in * s)
        ALiBi (slope already divided by the scale):                     s -> s - slope * |i + offset - j|
        SCORE_MOD (a @triton.jit function, FlexAttention's score_mod):  x = s * scale -> SCORE_MOD(x, b, h, i, j,
            *mods.SCORE_ARGS) / scale, its derivative SCORE_GRAD(x, b, h, i, j, *mods.SCORE_ARGS) (None: 1)

    The derivative is the product of 1 - tanh^2 (softcap) and SCORE_GRAD's, else 1 (and unused). SCORE_BOUNDED:
    SCORE_MOD sees the indices clamped into [0, seqlen) (a tile's rows and columns past the ends, masked anyway,
    index nothing outside the tables it reads); else as they are, which keeps them contiguous, so that a function
    loading a tile along them (a bias, which masks its own loads) gets vectorized, pipelined loads."""
    ds = 1.0
    if F.SOFTCAP:
        t = _tanh(s * mods.cap_in)
        s = mods.cap_out * t
        ds = 1.0 - t * t
    if F.ALIBI:
        s = s - slope * tl.abs(i + offset - j).to(tl.float32)
    if F.SCORE_MOD is not None:
        scale = qk_scale * 0.6931471805599453
        qi, kj = i, j
        if F.SCORE_BOUNDED:
            qi, kj = _bounded(i, j, seqlen_q, seqlen_k)
        x = s * scale
        s = F.SCORE_MOD(x, b, h, qi, kj, *mods.SCORE_ARGS) * (1.0 / scale)
        if F.SCORE_GRAD is not None:
            ds = ds * F.SCORE_GRAD(x, b, h, qi, kj, *mods.SCORE_ARGS)
    return s, ds


@triton.jit
def _add_bias(score, b, h, i, j, BIAS, stride_b, stride_h, stride_i, stride_j, n_i, n_j):
    """A float attention bias (B, Hq, n_i, n_j)-indexed (stride 0 where broadcast) as an unbounded score function
    (ScoreMod.bounded False): its loads masked to the bias's extent instead."""
    return score + tl.load(BIAS + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + i.to(tl.int64) * stride_i
                           + j.to(tl.int64) * stride_j, mask=(i < n_i) & (j < n_j), other=0.0).to(tl.float32)


@triton.jit
def _unit_grad(score, b, h, i, j, BIAS, stride_b, stride_h, stride_i, stride_j, n_i, n_j):
    """d(_add_bias) / d(score)."""
    return 1.0


@triton.jit
def _fp8_round(x, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr, fp8_max):
    """x (float32) clamped to +-fp8_max and rounded to the nearest FP8 value (ties to even) of an FP8 type with
    MANTISSA stored bits and smallest normal exponent MIN_EXP, in float32 arithmetic, so that the cast after it is
    exact on every target (the interpreter's casts to FP8 truncate)."""
    x = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    ulp = ((tl.maximum(exp, MIN_EXP) - MANTISSA + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even
    return ((x / ulp + magic) - magic) * ulp


@triton.jit
def _p_for(p, v, FP32_DOT: tl.constexpr):
    """The probabilities in V's dtype for the P.V product: FP8 V takes P rounded to FP8 (FlashAttention-3's P.V in
    FP8), to nearest even -- by hand where the dots run on fp32 copies (the interpreter, whose FP8 casts truncate)."""
    if FP32_DOT:
        if v.dtype == tl.float8e4nv:
            p = _fp8_round(p, 3, -6, 448.0)
        elif v.dtype == tl.float8e5:
            p = _fp8_round(p, 2, -14, 57344.0)
    return p.to(v.dtype)


@triton.jit
def _keep(seed, rng_offset, bh, i, j, threshold):
    """The dropout keep-mask of rows i, columns j (broadcastable, either orientation) of query head bh (b * Hq + h):
    Philox-4x32-10 keyed by the 64-bit seed at counter (j, i, bh, rng_offset); kept where the top 24 bits of its
    first word are >= threshold = round(p * 2^24). fused_attn.dropout_mask draws the same bits."""
    zero = i * 0 + j * 0
    r, _, _, _ = tl.philox(seed, zero + j, zero + i, zero + bh, zero + rng_offset)
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit
def _block_range(start, n_rows, n_cols, offset, left, right,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Column tiles that rows [start, start + BLOCK_ROWS) can see, as (lo, full_lo, full_hi, hi), multiples of
    BLOCK_COLS: tiles in [full_lo, full_hi) are visible to every valid row and in range (no mask needed);
    [lo, full_lo) and [full_hi, hi) need the mask; nothing outside [lo, hi) is visible.

    Used for key tiles of a query tile, and, transposed (offset -> -offset, left <-> right), for the query tiles
    that see a key tile."""
    last = tl.minimum(start + BLOCK_ROWS, n_rows) - 1
    lo = start * 0
    hi = lo + n_cols
    full_lo = lo
    full_hi = hi
    if HAS_LEFT:
        lo = tl.maximum(start + offset - left, 0)
        full_lo = tl.maximum(last + offset - left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(last + offset + right + 1, n_cols)
        full_hi = tl.minimum(start + offset + right + 1, n_cols)
    lo = tl.minimum(lo, n_cols)
    hi = tl.maximum(hi, lo)
    # Round outwards for the visible range, inwards for the fully visible one.
    lo_t = lo // BLOCK_COLS * BLOCK_COLS
    hi_t = tl.where(hi > lo, tl.cdiv(hi, BLOCK_COLS) * BLOCK_COLS, lo_t)
    full_lo_t = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_COLS) * BLOCK_COLS, lo_t), hi_t)
    full_hi_t = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_COLS * BLOCK_COLS, full_lo_t), hi_t)
    return lo_t, full_lo_t, full_hi_t, hi_t


@triton.jit
def _slope(SLOPES, b, h, stride_ab, stride_ah, qk_scale, ALIBI: tl.constexpr):
    """The ALiBi slope of batch row b, query head h (a scalar or a vector of heads) in the kernels' score unit (divided
    by the softmax scale; qk_scale = scale * log2 e); 0 without ALiBi."""
    slope = tl.zeros([], tl.float32)
    if ALIBI:
        slope = tl.load(SLOPES + b.to(tl.int64) * stride_ab + h * stride_ah) * (1.4426950408889634 / qk_scale)
    return slope


@triton.jit
def _sink(SINKS, h, qk_scale, HAS_SINKS: tl.constexpr):
    """Query head h's sink logit in the kernels' score unit (divided by the softmax scale); -inf without sinks."""
    sink = tl.full([], float("-inf"), tl.float32)
    if HAS_SINKS:
        sink = tl.load(SINKS + h) * (1.4426950408889634 / qk_scale)
    return sink


@triton.jit
def _join_sink(acc, l_i, m_i, sink, qk_scale):
    """The online softmax's state (acc, l, m) after a sink logit (kernel units) joins each row's denominator: its
    term exp(sink) adds to l, nothing to acc."""
    m_new = tl.maximum(m_i, sink)
    alpha = tl.math.exp2((m_i - m_new) * qk_scale)
    return acc * alpha[:, None], l_i * alpha + tl.math.exp2((sink - m_new) * qk_scale), m_new


@triton.jit
def _partial(acc, l_i, m_i, qk_scale):
    """A key range's normalized output and lse (natural log) from its online-softmax state (acc, l, m); rows that
    saw no key of it: 0 and -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (tl.where(empty, 0.0, m_i) * qk_scale + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    return out, tl.where(empty, float("-inf"), lse)


@triton.jit
def _merge_partial(o, lse, o_s, lse_s):
    """(out, lse) of the keys behind (o, lse) followed by those behind (o_s, lse_s), each a normalized output and
    its lse: the batch-invariant mode's one merge, a left fold over a row's splits in key order (the forward in
    registers, the split-KV combine kernel over fp32 partials; a sink is a split with output 0). A split the row
    sees nothing of (0, -inf) leaves (o, lse) exactly as they were, and the first real one is taken exactly."""
    m = tl.maximum(lse, lse_s)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_sub)
    w_s = tl.exp(lse_s - m_sub)
    l_i = w + w_s
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    o = (o * w[:, None] + o_s * w_s[:, None]) / l_i[:, None]
    return o, tl.where(empty, float("-inf"), m_sub + tl.log(l_i))


@triton.jit
def _merge_stats(m_i, l_i, m_s, l_s, qk_scale):
    """The softmax stats (row max, denominator; kernel units) of two key ranges together: what the backward
    recomputes P from when the forward merged splits."""
    m_new = tl.maximum(m_i, m_s)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.math.exp2((m_i - m_sub) * qk_scale) + l_s * tl.math.exp2((m_s - m_sub) * qk_scale)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _split_count(lo, hi, split_keys):
    """How many of the batch-invariant mode's splits (multiples of split_keys) a walk over keys [lo, hi) meets."""
    return tl.cdiv(hi - lo // split_keys * split_keys, split_keys)


@triton.jit
def _split_range(split, lo, hi, split_keys):
    """Keys [first, end) of split number `split` of a walk over [lo, hi) cut at multiples of split_keys (absolute
    key positions, whatever the walk's start): the batch-invariant mode's splits."""
    first = lo // split_keys * split_keys + split * split_keys
    return _clamp(first, lo, hi), _clamp(first + split_keys, lo, hi)


@triton.jit
def _rng(RNG, DROPOUT: tl.constexpr):
    """(seed, offset) of a dropout call from its int64 [seed, offset] tensor (drawn from torch's generator)."""
    seed = tl.zeros([], tl.int64)
    rng_offset = tl.zeros([], tl.int32)
    if DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1).to(tl.int32)
    return seed, rng_offset


@triton.jit
def _sequence(CU_Q, CU_K, b, seqlen_q, seqlen_k, offset, VARLEN: tl.constexpr):
    """(q0, k0, seqlen_q, seqlen_k, offset) of batch row b: its first query and key rows (int64), lengths and
    diagonal offset. Packed (VARLEN): sequence b holds query rows [cu_q[b], cu_q[b + 1]) and key rows
    [cu_k[b], cu_k[b + 1]) of one (1, H, total, D) view, its mask bottom-right aligned within the pair; dense: row
    0 of b's own slice and the launch's lengths."""
    q0 = tl.zeros([], tl.int64)
    k0 = tl.zeros([], tl.int64)
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        seqlen_k = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        offset = seqlen_k - seqlen_q
    return q0, k0, seqlen_q, seqlen_k, offset


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """tl.dot with fp32 inputs in IEEE precision (no TF32), or on fp32 copies of the operands where the
    interpreter cannot multiply bf16 (it multiplies raw bit patterns). FP32_DOT == 2 (the interpreter in the
    batch-invariant mode): each row's products summed on their own, so that a row's result does not depend on its
    place in the tile -- the interpreter's tl.dot is NumPy's matmul, whose BLAS kernels (OpenBLAS on AMD Zen, for
    one) round a row differently by its position."""
    if FP32_DOT == 2:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)
    elif FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """ptr[rows, cols] for 1-D offsets rows and cols, zero outside [0, n_rows) x [0, n_cols). A side known to be
    in bounds (a fully visible tile, a power-of-two head dim) is loaded without its check."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptr, x, rows, cols, stride_r, stride_c, n_rows, n_cols, CHECK_COLS: tl.constexpr):
    """ptr[rows, cols] = x inside [0, n_rows) x [0, n_cols), cast to ptr's element type."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_COLS:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _at_head(X, offset, TMA: tl.constexpr):
    """X advanced to one (batch, head) slice. A tensor descriptor stays as it is: _load_block indexes it by (b, h)."""
    if TMA:
        return X
    else:
        return X + offset


@triton.jit
def _at_rows(X, offset, n_rows, stride_r, N_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
             TMA: tl.constexpr):
    """What _load_block reads one head's rows through: with TMA == 2 a tensor descriptor of its (n_rows, N_COLS)
    rows (X + offset, unit column stride) made in the kernel -- the form whose tiles Triton's warp specialization
    can split between consumer warp groups; else _at_head's."""
    if TMA == 2:
        return tl.make_tensor_descriptor(X + offset, [n_rows, N_COLS], [stride_r, 1], [BLOCK_R, BLOCK_C])
    else:
        return _at_head(X, offset, TMA)


@triton.jit
def _load_block(X, b, h, start, stride_r, stride_c, n_rows, n_cols,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK_R), columns [0, BLOCK_C) of head (b, h), zero outside n_rows x n_cols. TMA: X is a
    (B, H, S, D) tensor descriptor, whose copy engine zero-fills out of bounds; TMA == 2: X is a (S, D) descriptor
    of the head itself (_at_rows); else X is a pointer already at (b, h) (see _at_head) and the loads are masked
    where CHECK_ROWS / CHECK_COLS say a side can run out."""
    if TMA == 2:
        return X.load([start, 0])
    elif TMA:
        return X.load([b, h, start, 0]).reshape(BLOCK_R, BLOCK_C)
    else:
        return _load_tile(X, start + tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_C), stride_r, stride_c, n_rows, n_cols,
                          CHECK_ROWS, CHECK_COLS)


@triton.jit
def _tile_pages(pages, start, page_size, n_rows, BLOCK_R: tl.constexpr, PAGED: tl.constexpr):
    """The page numbers of key rows [start, start + BLOCK_R) in the block table pages[0] (row j: page PAGES[j //
    page_size], slot j % page_size): one number where the page size (constexpr) is a multiple of BLOCK_R (the tile
    lies in one page), else one per row; 0 (nothing loaded) where not PAGED (pages None) or past n_rows."""
    if PAGED:
        PAGES = pages[0]
        if page_size % BLOCK_R == 0:
            return tl.load(PAGES + start // page_size, mask=start < n_rows, other=0).to(tl.int64)
        else:
            rows = start + tl.arange(0, BLOCK_R)
            return tl.load(PAGES + rows // page_size, mask=rows < n_rows, other=0).to(tl.int64)
    else:
        return 0


@triton.jit
def _load_kv(X, page, pages, WHICH: tl.constexpr, b, h, start, strides, page_size, n_rows, n_cols,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr, TMA: tl.constexpr,
             PAGED: tl.constexpr):
    """Key / value rows [start, start + BLOCK_R) of X, strides = its (row, col) strides: _load_block, or (PAGED)
    from a paged cache, page the tile's page numbers (_tile_pages; X at the head, its pages pages[WHICH] apart), so
    any page size works. The caller loads the page numbers one tile ahead: Triton divides a loop's load latency
    among the loads a tile load's address depends on, so an address behind a load of the same iteration halves the
    tile's buffering (the compile-time gate)."""
    stride_r, stride_c = strides
    if PAGED:
        stride_page = pages[WHICH]
        rows = start + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        ok = rows < n_rows
        if page_size % BLOCK_R == 0:
            ptrs = X + page * stride_page + (start % page_size + tl.arange(0, BLOCK_R))[:, None] * stride_r
        else:
            ptrs = X + page[:, None] * stride_page + (rows % page_size)[:, None] * stride_r
        return tl.load(ptrs + cols[None, :] * stride_c, mask=ok[:, None] & (cols[None, :] < n_cols), other=0.0)
    else:
        return _load_block(X, b, h, start, stride_r, stride_c, n_rows, n_cols, BLOCK_R, BLOCK_C, CHECK_ROWS,
                           n_cols != BLOCK_C, TMA)


@triton.jit
def _tile_id(REVERSE: tl.constexpr):
    """This program's tile along grid axis 0; REVERSE hands out the last tiles first (longest-first when the last
    tiles see the most keys, e.g. causal queries)."""
    if REVERSE:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


@triton.jit
def _program_tile(head_start, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """(first row, head index) of the one tile a program works on: its tile along grid axis 0, and the head
    (b * H + h) head_start + grid axis 1."""
    return _tile_id(REVERSE) * BLOCK, tl.program_id(1) + head_start


@triton.jit
def _walk_tile(t, n_tiles, n_heads, head_start, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """(first row, head index) of step t of a persistent kernel's walk over n_tiles tiles of each of n_heads heads
    (from head_start): every head's tile of one rank before any tile of the next, ranks in REVERSE order where the
    last tiles are the heaviest -- longest-processing-time first, and balanced over the heads. Program p takes steps
    p, p + programs, ...; each tile is computed exactly as a program of the one-tile grid computes it."""
    rank = t // n_heads
    if REVERSE:
        rank = n_tiles - 1 - rank
    return rank * BLOCK, head_start + t % n_heads


@triton.jit
def _query_head(bh, n_heads, group):
    """(b, h, the kv head h // group that query head h reads under GQA) of head index bh = b * Hq + h."""
    h = bh % n_heads
    return bh // n_heads, h, h // group


@triton.jit
def _segment_range(seg: tl.constexpr, lo, full_lo, full_hi, hi, WARP_SPEC: tl.constexpr):
    """[first, end) of segment seg of a key walk run as three loops -- the masked leading edge, the unmasked middle,
    the masked trailing edge (_key_walk's ranges) -- or, WARP_SPEC, as one loop over the whole walk, every tile
    masked (a warp-specialized loop has no branch in it)."""
    if WARP_SPEC:
        return lo, hi
    elif seg == 0:
        return lo, full_lo
    elif seg == 1:
        return full_lo, full_hi
    else:
        return full_hi, hi


@triton.jit
def _listed_range(TABLE, per):
    """(lo, full_lo, full_hi, hi) of a walk over a block mask's list TABLE = [n_lead, n_full, n_trail, blocks in
    ascending order...] (fused_attn/blockmask.py): the n_full blocks after the first n_lead are full (no mask
    arithmetic), the others are masked -- the band's three segments, so a block mask equal to a band visits the
    same tiles in the same order. Positions count rows or columns: per = those one mask block spans."""
    n_lead = tl.load(TABLE)
    n_full = tl.load(TABLE + 1)
    n_all = n_lead + n_full + tl.load(TABLE + 2)
    return n_lead * 0, n_lead * per, (n_lead + n_full) * per, n_all * per


@triton.jit
def _key_walk(blocks, b64, h64, start_m, seqlen_q, seqlen_k, offset, left, right, C: tl.constexpr,
              F: tl.constexpr):
    """(row, lo, full_lo, full_hi, hi): the key tiles a query tile at start_m walks -- on a block mask (F.LISTED)
    its query block's list in `blocks` (a MaskArgs), `row` the list's offset in the tables; else the band's range
    (_block_range), row 0."""
    if F.LISTED:
        row = b64 * blocks.strides[0] + h64 * blocks.strides[1] + (start_m // blocks.block_q) * blocks.strides[2]
        lo, full_lo, full_hi, hi = _listed_range(blocks.TABLE + row, blocks.block_k)
    else:
        row = b64 * 0
        lo, full_lo, full_hi, hi = _block_range(start_m, seqlen_q, seqlen_k, offset, left, right, C.BLOCK_M,
                                                C.BLOCK_N, F.HAS_LEFT, F.HAS_RIGHT)
    return row, lo, full_lo, full_hi, hi


@triton.jit
def _tile_at(pos, blocks, row, KEYS: tl.constexpr, LISTED: tl.constexpr):
    """(first row / column of the tile at loop position pos, its list entry): pos itself on a range walk; on a list
    walk (LISTED) position pos lies in entry pos // per of the list at blocks.TABLE + row, whose block starts at
    TABLE[row + 3 + entry] * per, per = the keys (KEYS) or queries a mask block spans."""
    if LISTED:
        per = blocks.block_k if KEYS else blocks.block_q
        entry = pos // per
        return tl.load(blocks.TABLE + row + 3 + entry) * per + pos % per, entry
    else:
        return pos, pos


@triton.jit
def _tile_mask(i, j, seq, blocks, mrow, entry, b, h, F: tl.constexpr):
    """Which pairs (rows i, columns j, broadcastable, either orientation) of a masked tile take part: the band of
    seq = (seqlen_q, seqlen_k, offset, left, right), and on a block mask (F.LISTED) its bits or F.MASK_MOD."""
    seqlen_q, seqlen_k, offset, left, right = seq
    ok = _visible(i, j, seqlen_q, seqlen_k, offset, left, right, F.HAS_LEFT, F.HAS_RIGHT)
    if F.LISTED:
        ok = ok & _block_bits(blocks.SLOTS, mrow, blocks.BITS, entry, i, j, blocks.block_q, blocks.block_k, b, h,
                              seqlen_q, seqlen_k, F.MASK_MOD, blocks.MASK_ARGS)
    return ok


@triton.jit
def _tiles(n_steps, C: tl.constexpr):
    """(first, end, step) of a program's steps over n_steps (tile, head) steps: PERSISTENT, steps program_id,
    program_id + programs, ...; else the one step of the program's own tile (a loop of one, folded away)."""
    if C.PERSISTENT:
        return tl.program_id(0), n_steps, tl.num_programs(0)
    else:
        return 0, 1, 1


@triton.jit
def _step_tile(t, n_tiles, sched, BLOCK: tl.constexpr, C: tl.constexpr):
    """(first row, head index) of step t (_tiles): a persistent walk's (_walk_tile) or the program's own tile
    (_program_tile)."""
    if C.PERSISTENT:
        return _walk_tile(t, n_tiles, sched.head_count, sched.head_start, BLOCK, C.REVERSE)
    else:
        return _program_tile(sched.head_start, BLOCK, C.REVERSE)


@triton.jit
def _block_bits(SLOTS, row, BITS, entry, i, j, block_q, block_k, b, h, seqlen_q, seqlen_k, MASK_MOD: tl.constexpr,
                MASK_ARGS):
    """The block mask of list entry `entry`'s block at rows i, columns j (broadcastable, either orientation) of
    batch row b, head h: True where the pair takes part. MASK_MOD (a @triton.jit mask function) is evaluated there,
    on indices clamped into [0, seqlen) (_bounded; the pairs past the ends are masked by _visible); else the
    stored bits: SLOTS + row holds the block's slot in BITS (slots >= 1, block_q, block_k) uint8, or -1 for a full
    block (all True). The load itself is unmasked (slot 0 stands in for a full block), so the pipeliner makes it
    asynchronous like the tiles'."""
    if MASK_MOD is not None:
        qi, kj = _bounded(i, j, seqlen_q, seqlen_k)
        return MASK_MOD(b, h, qi, kj, *MASK_ARGS)
    else:
        slot = tl.load(SLOTS + row + 3 + entry).to(tl.int64)
        bits = tl.load(BITS + tl.maximum(slot, 0) * block_q * block_k + (i % block_q) * block_k + j % block_k)
        return (bits != 0) | (slot < 0)
