"""GGML block quantizers in numpy, vectorised over all blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.

These re-implement the reference algorithms llama.cpp uses when quantizing without an importance
matrix (``quantize_row_*_ref`` in ggml-quants.c) so files come out as llama-quantize writes them:
Q4_K / Q5_K pick each 32-weight sub-block's scale and minimum by a small search over candidate
scales minimising a weighted squared error (``make_qkx2_quants``), then quantize the sub-block scales
to 6 bits; Q6_K does the same with a symmetric search over 16-weight sub-blocks (``make_qx_quants``).

Bit-exactness with the C code depends on doing each float32 operation in the same order: every
array here is float32, sums over a block run sequentially (numpy reduces axis 0 of a C-ordered array
row by row, so sub-blocks are laid out [weights_in_block, n_blocks]), and ``_nearest`` rounds half to
even like ggml's ``nearest_int``. The tests compare against llama.cpp's output byte for byte.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
         "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
_CHUNK = 1 << 16   # weights per vectorised pass: the temporaries stay in L2 (4x faster than 1 << 20)
_F = np.float32


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """uint8 [rows, cols // block * bytes_per_block]: the GGML blocks of a float matrix, row-major."""
    if qtype not in BLOCK:
        raise ValueError(f"cannot quantize to {qtype}; supported: {', '.join(TYPES)}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"only matrices are block-quantized, got shape {x.shape}")
    bs, ts = BLOCK[qtype]
    rows, cols = x.shape
    if cols % bs:
        raise ValueError(f"{qtype} needs a row length that is a multiple of {bs} (got {cols})")
    out = np.empty((rows, cols // bs * ts), dtype=np.uint8)
    fn = _FUNCS[qtype]
    step = max(1, _CHUNK // cols)
    for r in range(0, rows, step):
        blocks = np.ascontiguousarray(x[r:r + step]).reshape(-1, bs)
        out[r:r + step] = fn(blocks).reshape(-1, cols // bs * ts)
    return out


# ---------------------------------------------------------------- helpers

def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (it adds 1.5 * 2**23 in float32)."""
    return np.rint(v).astype(np.int32)


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> the 2 bytes of its IEEE half (round to nearest even, as GGML_FP32_TO_FP16)."""
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per column of [n, blocks]: the value of largest magnitude, the first one on ties (as the C loop)."""
    idx = np.abs(x).argmax(axis=0)
    return np.take_along_axis(x, idx[None], axis=0)[0]


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, _F(1) / d, _F(0)).astype(_F)


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | (hi.astype(np.uint8) << 4)


# ---------------------------------------------------------------- 32-weight types

def _q8_0(b: np.ndarray) -> np.ndarray:
    d = (np.abs(b).max(axis=1) / _F(127)).astype(_F)
    v = b * _inv(d)[:, None]
    q = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)   # roundf: half away from zero, no float32 slip
    return np.concatenate([_f16(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    d = (_absmax_signed(b.T) / _F(-8)).astype(_F)
    q = np.minimum(15, np.trunc(b * _inv(d)[:, None] + _F(8.5))).astype(np.uint8)
    return np.concatenate([_f16(d), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q4_1(b: np.ndarray) -> np.ndarray:
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / _F(15)).astype(_F)
    q = np.minimum(15, np.trunc((b - lo[:, None]) * _inv(d)[:, None] + _F(0.5))).astype(np.uint8)
    return np.concatenate([_f16(d), _f16(lo), _pack_nibbles(q[:, :16], q[:, 16:])], axis=1)


def _qh_bits(q: np.ndarray) -> np.ndarray:
    """The fifth bits of 32 quants as one little-endian uint32 (bit j = weight j)."""
    bits = (q.astype(np.uint32) >> 4) & 1
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = (_absmax_signed(b.T) / _F(-16)).astype(_F)
    q = np.minimum(31, np.trunc(b * _inv(d)[:, None] + _F(16.5))).astype(np.uint8)
    return np.concatenate([_f16(d), _qh_bits(q), _pack_nibbles(q[:, :16], q[:, 16:] & 0xF)], axis=1)


def _q5_1(b: np.ndarray) -> np.ndarray:
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = ((hi - lo) / _F(31)).astype(_F)
    q = np.trunc((b - lo[:, None]) * _inv(d)[:, None] + _F(0.5)).astype(np.uint8)
    return np.concatenate([_f16(d), _f16(lo), _qh_bits(q), _pack_nibbles(q[:, :16], q[:, 16:] & 0xF)], axis=1)


# ---------------------------------------------------------------- K-quants

def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over columns of x [32, n]: (scale, -min, L) with L in 0..nmax (as float32).

    Starts from the min/max grid, then tries nstep+1 stretched grids, each refit by weighted least
    squares for (scale, min), keeping whichever has the lowest weighted squared error. Quants stay
    float32 (whole numbers) and the [32, n] temporaries are reused: this loop is the quantizer's cost.
    """
    lo = np.minimum(x.min(axis=0), _F(0))
    hi = x.max(axis=0)
    flat = hi == lo
    sum_w = w.sum(axis=0)
    sum_x = (w * x).sum(axis=0)
    t, lf, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def grid(iscale, mn, out):
        np.subtract(x, mn, out=out)
        out *= iscale
        np.rint(out, out=out)
        return np.clip(out, 0, nmax, out=out)

    def error(scale, mn, q):
        e = np.multiply(q, scale, out=t)
        e += mn
        e -= x
        e *= e
        e *= w
        return e.sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F(nmax) / (hi - lo)).astype(_F)
        scale = (_F(1) / iscale).astype(_F)
        L = grid(iscale, lo, np.empty_like(x))
        best = error(scale, lo, L)
        mn = lo.copy()
        for i in range(nstep + 1):
            # the C code keeps searching from the best (scale, min) so far: the grid moves with it
            isc = ((_F(rmin) + _F(rdelta) * _F(i) + _F(nmax)) / (hi - mn)).astype(_F)
            grid(isc, mn, lf)
            np.multiply(w, lf, out=wl)
            sum_l = wl.sum(axis=0)
            sum_l2 = np.multiply(wl, lf, out=t).sum(axis=0)
            sum_xl = np.multiply(wl, x, out=t).sum(axis=0)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            err = error(this_scale, this_min, lf)
            take = (D > 0) & (err < best)
            np.copyto(L, lf, where=take)
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L = np.where(flat, _F(0), L)
    scale = np.where(flat, _F(0), scale)
    mn = np.where(flat, lo, mn)
    return scale.astype(_F), (-mn).astype(_F), L


def _make_qx(x: np.ndarray, nmax: int):
    """make_qx_quants(rmse_type=1) over columns of x [16, n]: (scale, L) with L in 0..2*nmax-1 (float32).

    Symmetric grid through the largest-magnitude weight, refit by least squares weighted by x**2,
    and 18 nearby grids tried; the one with the largest sumlx**2 / suml2 wins.
    """
    mx = _absmax_signed(x)
    zero = np.abs(mx) < _F(1e-15)
    wx = (x * x) * x                      # C: w*x[i]*l with w = x[i]*x[i]
    w = x * x
    li, t = np.empty_like(x), np.empty_like(x)

    def fit(iscale, out):
        np.multiply(x, iscale, out=out)
        np.rint(out, out=out)
        np.clip(out, -nmax, nmax - 1, out=out)
        sumlx = np.multiply(wx, out, out=t).sum(axis=0)
        l2 = np.multiply(w, out, out=t)
        l2 *= out
        return sumlx, l2.sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.empty_like(x)
        sumlx, suml2 = fit((_F(-nmax) / mx).astype(_F), L)
        L += nmax
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
        best = scale * sumlx
        for i in (*range(-9, 0), *range(1, 10)):
            sumlx, suml2 = fit((-(_F(nmax) + _F(0.1) * _F(i)) / mx).astype(_F), li)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            li += nmax
            np.copyto(L, li, where=take)
            scale = np.where(take, sumlx / suml2, scale).astype(_F)
            best = np.where(take, scale * sumlx, best)
    return np.where(zero, _F(0), scale).astype(_F), np.where(zero, _F(0), L)


def _k_scales(scales: np.ndarray, mins: np.ndarray):
    """6-bit sub-block scales and mins of a super-block [8, n] -> (d, dmin, packed 12 bytes [n, 12], ls, lm)."""
    max_scale = np.maximum(scales.max(axis=0), _F(0))
    max_min = np.maximum(mins.max(axis=0), _F(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, _F(63) / max_scale, _F(0)).astype(_F)
        inv_m = np.where(max_min > 0, _F(63) / max_min, _F(0)).astype(_F)
    ls = np.minimum(63, _nearest(inv_s * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_m * mins) & 0xFF).astype(np.uint8)
    packed = np.empty((12, scales.shape[1]), dtype=np.uint8)
    packed[0:4] = ls[0:4] | ((ls[4:8] >> 4) << 6)
    packed[4:8] = lm[0:4] | ((lm[4:8] >> 4) << 6)
    packed[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    d = (max_scale / _F(63)).astype(_F)
    dmin = (max_min / _F(63)).astype(_F)
    return d, dmin, packed.T, ls, lm


def _qkx_superblocks(b: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of Q4_K and Q5_K: final quants L [256, n] in 0..nmax, f16 d/dmin, packed scales."""
    n = b.shape[0]
    x = np.ascontiguousarray(b.reshape(n * 8, 32).T)   # [32, sub-blocks]; sub-block j of block i at i*8 + j
    av = np.sqrt((x * x).sum(axis=0) / _F(32)).astype(_F)
    w = av + np.abs(x)
    scales, mins, L = _make_qkx2(x, w, nmax, rmin, 0.1, nstep)
    d, dmin, packed, ls, lm = _k_scales(scales.reshape(n, 8).T, mins.reshape(n, 8).T)
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sub_d = (d16.astype(_F)[None] * ls.astype(_F)).T.reshape(-1)         # per sub-block, same order as x
    sub_m = (dmin16.astype(_F)[None] * lm.astype(_F)).T.reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        redo = np.clip(_nearest((x + sub_m) / sub_d), 0, nmax)
    L = np.where(sub_d != 0, redo, L)
    L = L.T.reshape(n, 256).astype(np.uint8)
    head = np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2), packed], axis=1)
    return L, head


def _q4_k(b: np.ndarray) -> np.ndarray:
    L, head = _qkx_superblocks(b, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)                    # 64-weight chunks: low nibbles first 32, high next 32
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def _q5_k(b: np.ndarray) -> np.ndarray:
    L, head = _qkx_superblocks(b, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    hi = L >> 4                                    # chunk c, half h -> bit 2c + h of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None]).astype(np.uint8)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    x = np.ascontiguousarray(b.reshape(n * 16, 16).T)   # [16, sub-blocks]
    scales, L = _make_qx(x, 32)
    sc = scales.reshape(n, 16).T                  # [16, n]
    idx = np.abs(sc).argmax(axis=0)
    max_scale = np.take_along_axis(sc, idx[None], axis=0)[0]
    zero = np.abs(max_scale) < _F(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F(-128) / max_scale).astype(_F)
        d16 = np.where(zero, _F(0), _F(1) / iscale).astype(np.float16)
        q_sc = np.where(zero, 0, np.minimum(127, _nearest(iscale * sc))).astype(np.int8)   # [16, n]
        sub_d = (d16.astype(_F)[None] * q_sc.astype(_F)).T.reshape(-1)
        redo = np.clip(_nearest(x / sub_d), -32, 31) + 32
    L = np.where(sub_d != 0, redo, L)
    L = np.where(np.repeat(zero, 16)[None], 0, L)
    L = L.T.reshape(n, 2, 4, 32).astype(np.uint8)   # 128-weight halves, 32-weight quarters
    ql = np.stack([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                   (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, q_sc.T.view(np.uint8), d16.view(np.uint8).reshape(n, 2)], axis=1)


_FUNCS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
          "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
