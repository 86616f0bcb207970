"""QuantizeWeightsInt4: blockwise 4-bit weight-only quantization of MatMul/Gemm (onnxruntime MatMulNBits).

A constant weight ``W[K, N]`` is cut along K into blocks of ``B`` rows; each block ``b`` of column
``n`` gets its own scale (symmetric, zero point 8 in unsigned storage)::

    s[n, b] = argmin_{s in S} || W[bB:(b+1)B, n] - s * clip(round(W / s), -8, 7) ||^2,
    S = {-m / 8 * f : f in a grid over [0.6, 1]},  m = the block's value of largest magnitude
    q = clip(round(W / s), -8, 7) + 8  in [0, 15],  two per byte (low nibble = even row)

(f = 1 maps ``m`` to exactly -8, as onnxruntime's own MatMulNBits quantizer does; the scale is negative
when ``m`` is positive, which the kernel takes as it is), so every element satisfies
``|W - s (q - 8)| <= |s| / 2`` inside the block's clipped range (round to nearest, "rtn"). Measured
against the former ``max|W| / 7 * f`` grid (block 32, logit SQNR): reference transformer 27.8 -> 29.1 dB
round to nearest, 40.4 -> 41.0 with GPTQ; a 2-layer 8192-wide random ReLU MLP 17.1 -> 18.8 dB
(onnxruntime's quantizer 18.4). With the input second moment ``H = E[x xᵀ]`` of the layer (calibration data), the
rounding is GPTQ-style error compensation instead ("gptq"): the scales are the same per-block MSE
ones, but the rows are rounded one at a time (in order of decreasing ``H_ii``) and each row's rounding
error is spread over the rows not yet rounded so as to minimise the expected output error::

    E ||x (W - Ŵ)||² = tr((W - Ŵ)ᵀ H (W - Ŵ)),     H <- H + damp · mean(diag H) · I
    U = chol(H⁻¹)ᵀ (upper, Uᵀ U = H⁻¹),  for each row i:  ŵ_i = s (clip(round(w_i / s)) - z)
                                                         W[j > i] -= U[i, j] / U[i, i] · (w_i - ŵ_i)

which leaves every stored value on the same grid (the kernel and the packing do not change). On the
reference transformer (block 64) this raises logit SQNR from 26.0 to 40.2 dB (bench/quantize.py). The
block scales are then refitted to the chosen codes (least squares on the same objective, codes fixed):
40.99 / 40.17 / 41.18 -> 42.43 / 41.49 / 41.45 dB at block 32 / 64 / 128.

Activations
stay float; onnxruntime's ``MatMulNBits`` (com.microsoft) dequantizes the blocks on the fly. A weight
with fewer rows than a block uses the smallest power-of-two block >= 16 that covers it. Other large
float constants (a positional embedding, biases, LayerNorm parameters: >= 128 elements by default)
are stored as int8 with one symmetric scale, ``c ~ s * q``, ``|error| <= s/2``, behind a
DequantizeLinear, so the file shrinks to ~0.15x rather than ~0.17x on the reference transformer.

Before / after::

    X -> MatMul(W[K,N]) -> Y                    X -> MatMulNBits(Wq[N, K/B, B/2] uint8, s[N*K/B]) -> Y
    X -> Gemm(W, C, alpha, beta, transB) -> Y   X -> MatMulNBits(alpha * W') -> Add(beta * C) -> Y

Why MatMulNBits rather than standard int4 QDQ (``DequantizeLinear`` with ``block_size`` at opset
21): onnxruntime rewrites such a QDQ pair into MatMulNBits anyway, so both run the same kernel; in
our measurement (bench in the module's test notes: 8 MatMuls 128x512, 2 threads, 4096 rows,
interleaved medians) MatMulNBits at accuracy level 0 ran at 0.86-0.99x fp32 and int4 QDQ at
1.00-1.10x, level 4 (int8 compute) at 1.2-1.5x. MatMulNBits also needs no opset 21 and its packed
uint8 storage round-trips through onnx-graphsurgeon 0.6.1, which cannot export INT4 initializers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError, CalibrationError
from onnxpress.passes.base import PassResult, fresh_names, graph_names
from onnxpress.passes.low_rank import layer_keys

__all__ = [
    "INT4_METHODS",
    "QuantizeWeightsInt4",
    "StoreConstantsInt8",
    "dequantize_blocks",
    "gptq_blocks",
    "gptq_factor",
    "gptq_rows",
    "quantize_blocks",
    "refit_block_scales",
    "store_constants_int8",
]

log = logging.getLogger(__name__)

_GRID = np.linspace(0.6, 1.0, 21, dtype=np.float32)

INT4_METHODS = ("gptq", "rtn")
"""How int4 weights are rounded: error-compensating with the input second moment, or to nearest."""


def quantize_blocks(w: np.ndarray, block_size: int, *, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric int4 of ``w[K, N]`` along K.

    Column chunk by chunk, in place (``_SEARCH_CHUNK``): on one 8192 x 8192 weight the whole-matrix version
    took 6.1 s, streaming full-size temporaries through memory for each of the search's 21 grid points.

    Returns:
        ``q`` int8 in [-8, 7] of shape [K_pad, N] (K padded with zeros to a multiple of the block)
        and ``scale`` float32 of shape [K_pad / block_size, N].
    """
    k, n = w.shape
    nb = -(-k // block_size)
    if k % block_size:
        padded = np.zeros((nb * block_size, n), np.float32)
        padded[:k] = w
    else:
        padded = np.asarray(w, np.float32)
    blocks = padded.reshape(nb, block_size, n)
    q = np.empty((nb, block_size, n), np.int8)
    scale = np.empty((nb, n), np.float32)
    step = max(1, _SEARCH_CHUNK // (nb * block_size))
    starts = range(0, n, step)

    def run(c0s: Sequence[int]) -> None:  # one work array per thread; chunks are independent
        work = np.empty((nb, block_size, min(step, n)), np.float32)
        for c0 in c0s:
            _round_chunk(blocks, q, scale, work, c0, step, search)

    threads = min(os.cpu_count() or 1, len(starts))
    if threads > 1 and n * nb * block_size >= _THREADED_FROM:
        # numpy releases the GIL inside each pass over a chunk: an 8192 x 8192 weight 2.0 -> 1.0 s on 2 cores
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [starts[i::threads] for i in range(threads)]))
    else:
        run(starts)
    return q.reshape(nb * block_size, n), scale


_SEARCH_CHUNK = 1 << 18
"""Values per column chunk of :func:`quantize_blocks`: its work array (1 MB) stays in cache over the 21 passes."""

_THREADED_FROM = 1 << 22
"""Weights of at least this many values are rounded on one thread per core (fewer: thread start-up costs more)."""


def _round_chunk(blocks: np.ndarray, q: np.ndarray, scale: np.ndarray, work: np.ndarray, c0: int, step: int,
                 search: bool) -> None:
    """Scales and codes of the columns ``c0 : c0 + step`` of ``blocks`` ``[blocks, block, N]``, in place."""
    chunk = np.ascontiguousarray(blocks[:, :, c0 : c0 + step])
    t = work[:, :, : chunk.shape[2]]
    # the block's largest-magnitude value maps to -8, so it uses the grid's 16th level (a negative scale
    # when that value is positive). Measured on an 8192 x 8192 Gaussian weight, block 32: weight SQNR 21.3 dB
    # against 20.3 for max|W| / 7 (21.3 after that grid's MSE search, whose clipping left the rounding
    # errors summed over K twice as large: 0.131 vs 0.069 per column), the bias ReLU inputs (mean > 0)
    # turn into output error
    hi, lo = chunk.max(axis=1), chunk.min(axis=1)
    extreme = np.where(-lo > hi, lo, hi)
    base = np.where(extreme != 0, extreme / -8.0, 1.0).astype(np.float32)
    s = _search_scales(chunk, base, t) if search else base
    scale[:, c0 : c0 + step] = s
    np.divide(chunk, s[:, None, :], out=t)
    np.rint(t, out=t)
    np.clip(t, -8, 7, out=t)
    q[:, :, c0 : c0 + step] = t


def _search_scales(chunk: np.ndarray, base: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per block and column, the scale ``base * f`` (``f`` in ``_GRID``) with the least squared rounding error.

    ``chunk`` is ``[blocks, block, columns]``, ``t`` a work array of its shape.
    """
    best = base.copy()
    best_err = np.full(base.shape, np.inf, np.float32)
    for f in _GRID:
        s = base * f
        np.divide(chunk, s[:, None, :], out=t)
        np.rint(t, out=t)
        np.clip(t, -8, 7, out=t)
        t *= s[:, None, :]
        t -= chunk
        np.square(t, out=t)
        err = t.sum(axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = s[better]
    return best


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blocks`, cut back to ``k`` rows."""
    nb, n = scale.shape
    block = q.shape[0] // nb
    return (q.reshape(nb, block, n).astype(np.float32) * scale[:, None, :]).reshape(-1, n)[:k]


def quantize_blocks_asym(
    w: np.ndarray, block_size: int, *, search: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blockwise asymmetric uint4 of ``w[K, N]`` along K: ``w ~ s (q - z)``, q, z in [0, 15].

    Per block ``[lo, hi] = [min(w, 0), max(w, 0)]`` shrunk by the factor (same grid as the
    symmetric search) that minimises the block's squared error; ``s = (hi - lo) / 15``,
    ``z = round(-lo / s)``.

    Returns:
        ``q`` uint8 [K_pad, N], ``scale`` float32 [K_pad / block_size, N], ``zero`` uint8 (same shape).
    """
    k, n = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((nb * block_size, n), np.float32)
    padded[:k] = w
    blocks = padded.reshape(nb, block_size, n)
    lo0 = np.minimum(blocks.min(axis=1), 0.0)
    hi0 = np.maximum(blocks.max(axis=1), 0.0)
    best_err = np.full(lo0.shape, np.inf, np.float64)
    best_s = np.ones(lo0.shape, np.float32)
    best_z = np.zeros(lo0.shape, np.float32)
    for f in _GRID if search else [np.float32(1.0)]:
        lo, hi = lo0 * f, hi0 * f
        s = np.where(hi - lo > 0, (hi - lo) / 15.0, 1.0).astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(blocks / s[:, None, :]) + z[:, None, :], 0, 15)
        err = (((q - z[:, None, :]) * s[:, None, :] - blocks) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
    q = np.clip(np.rint(blocks / best_s[:, None, :]) + best_z[:, None, :], 0, 15).astype(np.uint8)
    return q.reshape(nb * block_size, n), best_s.astype(np.float32), best_z.astype(np.uint8)


def dequantize_blocks_asym(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blocks_asym`, cut back to ``k`` rows."""
    nb, n = scale.shape
    block = q.shape[0] // nb
    centred = q.reshape(nb, block, n).astype(np.float32) - zero[:, None, :].astype(np.float32)
    return (centred * scale[:, None, :]).reshape(-1, n)[:k]


def gptq_blocks(
    w: np.ndarray,
    block_size: int,
    hessian: np.ndarray,
    *,
    symmetric: bool = True,
    search: bool = True,
    damp: float = 0.01,
    act_order: bool = True,
    refit: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ-style rounding of ``w[K, N]`` onto the blockwise int4 grid of :func:`quantize_blocks`.

    The scales (and zero points when not ``symmetric``) start as those of the round-to-nearest functions,
    fixed from ``w`` before any update ("static groups"), so the result packs exactly like theirs;
    which grid point each element takes is chosen to minimise ``tr(Δᵀ H Δ)``. Then (``refit`` times)
    the scales are refitted to those codes under the same objective (:func:`refit_block_scales`;
    zero points stay), and codes rounded again on the new scales before any further refit.

    Written by hand in numpy (no GPTQ library): it is the core of our int4 accuracy.

    Args:
        w: float weight, rows = input features (K), columns = outputs (N).
        block_size: rows per scale block.
        hessian: ``E[x xᵀ]`` of the layer's input, ``[K, K]`` (symmetric positive semi-definite).
        symmetric: zero point 8 (``q`` int8 in [-8, 7]) or a 4-bit zero point per block (``q`` uint8).
        search: MSE search of the block scales (as in :func:`quantize_blocks`).
        damp: added to the diagonal, as a fraction of its mean (regularises a singular ``H``).
        act_order: round the rows with the largest ``H_ii`` first (their errors get compensated most).
        refit: rounds of scale refitting after the rounding (0: the round-to-nearest scales, unchanged).
            One by default: on the reference transformer two gave -0.6 / +0.3 / +0.2 dB more at block
            32 / 64 / 128 than one, three less again at 128.

    Returns:
        ``(q, scale, zero)`` as :func:`quantize_blocks` (``zero`` None) or
        :func:`quantize_blocks_asym` return them.

    Raises:
        ValueError: ``hessian`` is not ``[K, K]``, not finite, or not positive definite even after damping.
    """
    k, n = w.shape
    h = np.asarray(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"input second moment has shape {h.shape}, the weight needs ({k}, {k})")
    if not np.all(np.isfinite(h)):
        raise ValueError("input second moment contains NaN or inf")
    if symmetric:
        q0, scale = quantize_blocks(w, block_size, search=search)
        zero_f = np.full(scale.shape, 8.0)
        zero = None
    else:
        q0, scale, zero = quantize_blocks_asym(w, block_size, search=search)
        zero_f = zero.astype(np.float64)
    k_pad = q0.shape[0]
    hp = np.zeros((k_pad, k_pad), np.float64)
    hp[:k, :k] = h  # the padding rows are dead inputs
    order, upper = gptq_factor(hp, damp, act_order)
    codes = _gptq_codes(w, upper, order, scale.astype(np.float64), zero_f, block_size)
    if refit <= 1:
        del upper  # [K_pad, K_pad] float64: the refit's float32 copy of H takes its place at the peak
    for r in range(refit):
        scale = refit_block_scales(w, codes - zero_f.repeat(block_size, axis=0), scale, hp, block_size)
        if r + 1 < refit:
            codes = _gptq_codes(w, upper, order, scale.astype(np.float64), zero_f, block_size)
    if symmetric:
        return (codes - 8).astype(np.int8), scale, None
    return codes.astype(np.uint8), scale, zero


def _gptq_codes(
    w: np.ndarray, upper: np.ndarray, order: np.ndarray, scale: np.ndarray, zero_f: np.ndarray, block_size: int
) -> np.ndarray:
    """GPTQ's codes in [0, 15] (``[K_pad, N]`` float, rows in the weight's order) for fixed block scales and zeros."""
    k, n = w.shape
    k_pad = upper.shape[0]
    work = np.zeros((k_pad, n), np.float64)
    work[:k] = w
    work = work[order]
    row_scale = scale[order // block_size]  # [K_pad, N]: each row's block scale
    row_zero = zero_f[order // block_size]
    codes = np.empty((k_pad, n), np.float64)
    # lazy batches, as in gptq_rows: updates inside a block of rows, then one product for the rows after it
    # (a 4096 x 4096 weight: 40.6 s -> 6.2 s against updating every later row after each row; same codes)
    for b0 in range(0, k_pad, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k_pad)
        errors = np.empty((b1 - b0, n))
        for i in range(b0, b1):
            c = np.clip(np.rint(work[i] / row_scale[i]) + row_zero[i], 0, 15)
            codes[i] = c
            err = (work[i] - (c - row_zero[i]) * row_scale[i]) / upper[i, i]
            errors[i - b0] = err
            work[i + 1 : b1] -= np.outer(upper[i, i + 1 : b1], err)
        work[b1:] -= upper[b0:b1, b1:].T @ errors
    out = np.empty_like(codes)
    out[order] = codes
    return out


REFIT_ITERATIONS = 2
"""Conjugate-gradient steps of :func:`refit_block_scales`."""

_REFIT_CHUNK = 1 << 22
"""Values of the ``[K_pad, columns]`` work arrays :func:`refit_block_scales` holds at once (32 MB in float64)."""


def refit_block_scales(
    w: np.ndarray,
    centred: np.ndarray,
    scale: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    *,
    iterations: int = REFIT_ITERATIONS,
) -> np.ndarray:
    """Block scales that lower ``tr(Δᵀ H Δ)`` for fixed integer codes, ``Δ = W - Ŵ``, column by column.

    GPTQ picks each code for scales fixed in advance from the weights alone; once the codes are
    chosen, the best scales for them solve a small least-squares problem per output column ``n``
    (``Ŵ[:, n] = Σ_b s_b q_b``, ``q_b`` the column's centred codes in block ``b``, zero elsewhere)::

        A s = c,   A[b, b'] = q_bᵀ H q_b',   c[b] = q_bᵀ H w

    Building every ``A`` costs ``K·N·(K / block)`` memory traffic (13 s beside GPTQ's 9 s on a
    4096 x 4096 weight), so it is solved by conjugate gradients from the current scales instead, with
    the diagonal blocks ``q_bᵀ H_bb q_b`` as preconditioner: each step is one product ``H (Q̃ p)`` for all
    columns at once (2 steps: 2-3 s on that weight, where GPTQ itself takes 9 s). Every step lowers
    each column's objective (CG on a positive semi-definite quadratic); on random 512-4096 square
    weights 2 steps reach the exact solution's objective to 1e-4 and 4 to 1e-9.
    Reference transformer, logit SQNR at block 32 / 64 / 128: 40.99 / 40.17 / 41.18 -> 42.43 / 41.49 /
    41.45 dB (42.56 / 41.47 / 41.45 with the exact solution). Written by hand: it is part of our int4
    rounding (no library fits scales to GPTQ codes).

    Args:
        w: float weight ``[K, N]``.
        centred: codes minus zero point, ``[K_pad, N]`` (``K_pad`` a multiple of ``block_size``).
        scale: current scales ``[K_pad / block_size, N]``.
        hessian: ``E[x xᵀ]``, ``[K_pad, K_pad]`` (zero rows for padding).
        block_size: rows per scale block.
        iterations: conjugate-gradient steps.

    Returns:
        float32 scales, the shape of ``scale``.
    """
    k, n = w.shape
    nb = scale.shape[0]
    k_pad = nb * block_size
    out = np.array(scale, np.float32, copy=True)
    h32 = np.asarray(hessian, np.float32)  # the products in float32: half the time, errors ~1e-7 of A
    diag = [np.asarray(hessian[b * block_size : (b + 1) * block_size, b * block_size : (b + 1) * block_size],
                       np.float64) for b in range(nb)]
    step = max(1, _REFIT_CHUNK // k_pad)
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        qb = np.asarray(centred[:, c0:c1], np.float64).reshape(nb, block_size, -1)

        def a_times(x: np.ndarray, qb: np.ndarray = qb) -> np.ndarray:  # Q̃ᵀ H x for x [K_pad, C]: [nb, C]
            hx = (h32 @ x.astype(np.float32)).astype(np.float64)
            return np.einsum("bic,bic->bc", qb, hx.reshape(nb, block_size, -1))

        def spread(s: np.ndarray, qb: np.ndarray = qb) -> np.ndarray:  # Q̃ s: [K_pad, C]
            return (qb * s[:, None, :]).reshape(k_pad, -1)

        precond = np.stack([np.einsum("ic,ic->c", qb[b], diag[b] @ qb[b]) for b in range(nb)])
        precond = np.where(precond > 0, precond, 1.0)
        s = out[:, c0:c1].astype(np.float64)
        wc = np.zeros((k_pad, c1 - c0))
        wc[:k] = w[:, c0:c1]
        r = a_times(wc - spread(s))  # c - A s
        z = r / precond
        p = z.copy()
        rz = np.sum(r * z, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            for _ in range(iterations):
                ap = a_times(spread(p))
                curv = np.sum(p * ap, axis=0)
                alpha = np.where(curv > 0, rz / np.where(curv > 0, curv, 1.0), 0.0)
                s += alpha * p
                r -= alpha * ap
                z = r / precond
                rz_next = np.sum(r * z, axis=0)
                p = z + np.where(rz > 0, rz_next / np.where(rz > 0, rz, 1.0), 0.0) * p
                rz = rz_next
        ok = np.all(np.isfinite(s), axis=0)
        out[:, c0:c1] = np.where(ok[None, :], s, out[:, c0:c1]).astype(np.float32)
    return out


GPTQ_BLOCK = 128
"""Columns :func:`gptq_rows` rounds before it passes their errors on to the rest in one product."""


def gptq_factor(h: np.ndarray, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """The column order and the upper Cholesky factor ``U`` (``Uᵀ U = (H + λI)⁻¹``, in that order) GPTQ needs.

    ``H`` is symmetrised; an input that was always 0 (or padding) gets a unit diagonal and no coupling,
    so its column is rounded to nearest with nothing to compensate. ``λ`` is ``damp`` times the mean
    diagonal, raised 10x and 100x when the inverse is not positive definite.
    """
    h = (np.asarray(h, np.float64) + np.asarray(h, np.float64).T) / 2
    m = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(m)
    h = h[np.ix_(order, order)]
    mean_diag = float(np.mean(np.diag(h)))
    for factor in (1.0, 10.0, 100.0):
        try:
            return order, np.linalg.cholesky(np.linalg.inv(h + np.eye(m) * damp * factor * mean_diag)).T
        except np.linalg.LinAlgError:
            continue
    raise ValueError("input second moment is not positive definite even with 100x damping")


def gptq_rows(
    rows: np.ndarray,
    scale: np.ndarray | float,
    hessian: np.ndarray,
    *,
    qmax: int = 127,
    damp: float = 0.01,
    act_order: bool = True,
) -> np.ndarray:
    """GPTQ rounding of weight rows onto symmetric uniform grids: integer codes ``k`` with ``rows ~ scale * k``.

    The int8 counterpart of :func:`gptq_blocks` (written by hand for the same reason): the grid of
    row ``c`` is ``scale[c] * k`` for ``k`` in ``[-qmax, qmax]`` (per-channel int8 as InsertQDQ
    stores it, zero point 0); only which level each weight takes changes, chosen column by column
    so that the error already made is spread over the columns not yet rounded, minimising
    ``tr(Δ H Δᵀ)`` (the layer's output error on inputs with second moments ``H``) instead of ``|Δ|²``.

    Args:
        rows: ``[C, M]`` float weights, one output channel per row, columns in ``hessian``'s order.
        scale: ``[C]`` per-row steps, or one step for every row.
        hessian: ``E[x xᵀ]`` of the layer's input, ``[M, M]``, or ``[G, M, M]`` with one per group of
            ``C / G`` consecutive rows (a grouped conv, each group reading its own input channels; a
            depthwise conv: one per channel).
        qmax: largest code magnitude.
        damp: added to the diagonal, as a fraction of its mean.
        act_order: round the columns with the largest ``H_jj`` first.

    Returns:
        ``[C, M]`` int64 codes in ``[-qmax, qmax]``.

    Raises:
        ValueError: shapes that do not fit, a non-finite ``hessian``, or one not positive definite
            even with 100x damping.
    """
    w = np.asarray(rows, np.float64)
    c, m = w.shape
    s = np.broadcast_to(np.asarray(scale, np.float64), (c,)).copy()
    s[s <= 0] = 1.0  # an all-zero row: every code is 0 whatever the step
    h = np.asarray(hessian, np.float64)
    if h.ndim == 3 and h.shape[1:] == (m, m) and h.shape[0] and c % h.shape[0] == 0:
        per = c // h.shape[0]
        return np.concatenate([gptq_rows(w[g * per : (g + 1) * per], s[g * per : (g + 1) * per], h[g], qmax=qmax,
                                         damp=damp, act_order=act_order) for g in range(h.shape[0])])
    if h.shape != (m, m):
        raise ValueError(f"input second moment has shape {h.shape}, the rows need ({m}, {m}) or (G, {m}, {m}) "
                         f"with G dividing {c}")
    if not np.all(np.isfinite(h)):
        raise ValueError("input second moment contains NaN or inf")
    order, upper = gptq_factor(h, damp, act_order)
    work = w[:, order].copy()
    codes = np.empty((c, m), np.int64)
    # lazy batches (Frantar et al. 2022, section 3): a block of columns is rounded with updates inside the
    # block only, then the columns after it take the block's errors in one matrix product -- the same
    # arithmetic as updating every later column after each one, without sweeping C x M per column
    for b0 in range(0, m, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, m)
        errors = np.empty((c, b1 - b0))
        for j in range(b0, b1):
            k = np.clip(np.rint(work[:, j] / s), -qmax, qmax)
            codes[:, j] = k
            err = (work[:, j] - k * s) / upper[j, j]
            errors[:, j - b0] = err
            work[:, j + 1 : b1] -= np.outer(err, upper[j, j + 1 : b1])
        work[:, b1:] -= errors @ upper[b0:b1, b1:]
    out = np.empty_like(codes)
    out[:, order] = codes
    return out


def _pack_zero_points(zero: np.ndarray) -> np.ndarray:
    """MatMulNBits zero points: uint8 [N * ceil(blocks / 2)], two blocks per byte, low nibble first."""
    nb, n = zero.shape
    z = zero.T  # [N, nb]
    if nb % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    return np.ascontiguousarray((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1))


def _pack(q: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits layout: B uint8 [N, blocks, block/2] (low nibble first), scales [N * blocks]."""
    nb, n = scale.shape
    offset = 0 if q.dtype == np.uint8 else 8  # symmetric int4 is stored with the implicit zero point 8
    u = (q.astype(np.int16) + offset).astype(np.uint8).reshape(nb, block_size, n).transpose(2, 0, 1)  # [N, nb, B]
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale.T.reshape(-1))


def _unpack(b: np.ndarray) -> np.ndarray:
    """The codes of :func:`_pack`'s ``B`` (uint8 [N, blocks, block/2], low nibble first): uint8 [N, blocks, block]."""
    n, blocks, half = b.shape
    return np.stack([b & 0x0F, b >> 4], axis=3).reshape(n, blocks, 2 * half)


def _unpack_zero_points(zero: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """The uint8 [N, blocks] zero points of :func:`_pack_zero_points`'s packed [N * ceil(blocks / 2)]."""
    z = np.asarray(zero).reshape(n, -1)
    return np.stack([z & 0x0F, z >> 4], axis=2).reshape(n, -1)[:, :blocks].astype(np.uint8)


class QuantizeWeightsInt4:
    """Replace MatMul/Gemm with constant 2-D weights by 4-bit ``MatMulNBits`` (weight-only).

    Args:
        block_size: rows per scale block (power of two, >= 16).
        exclude: node names that stay float.
        min_size: weights with fewer elements stay float (not worth a kernel switch).
        search: pick each block's scale by a small MSE search (else plain max/7).
        constants_int8_min_size: other float constants with at least this many elements (a learned
            positional embedding, say) are stored as int8 with one symmetric scale and a
            DequantizeLinear (``|error| <= s/2``, ``s = max|c| / 127``); None keeps them float.
        symmetric: zero point 8 implied (default) or a 4-bit zero point per block
            (:func:`quantize_blocks_asym`; on the reference transformer +0.4..+0.8 dB at block 32/128,
            -0.6 dB at 64, +1-3% size: not the default).
        int8_below: weights with fewer elements get int8 per output channel (DequantizeLinear before
            the float MatMul/Gemm) instead of int4: they cost little space and can dominate the
            error (reference transformer: the 16x128 patch embedding alone at int4 limits logit
            SQNR to 26 dB; with it and the 128x10 head at int8, all int4 elsewhere: see the bench).
        hessians: input second moments ``E[x xᵀ]`` keyed by layer key (node name, else first output;
            :func:`onnxpress.passes.low_rank.layer_keys`), e.g. from :func:`onnxpress.lowrank.collect_moments`.
            Layers found here are rounded by :func:`gptq_blocks`, the others to nearest.
        damp: GPTQ diagonal damping, as a fraction of the mean of ``diag H``.
        act_order: GPTQ rounds the inputs with the largest second moment first.
        only: rewrite only the layers with these keys (``None``: every eligible one).
    """

    name = "quantize_weights_int4"

    def __init__(
        self,
        *,
        block_size: int = 32,
        exclude: frozenset[str] = frozenset(),
        min_size: int = 0,
        search: bool = True,
        constants_int8_min_size: int | None = 128,
        int8_below: int = 4096,
        symmetric: bool = True,
        hessians: Mapping[str, np.ndarray] | None = None,
        damp: float = 0.01,
        act_order: bool = True,
        only: frozenset[str] | None = None,
    ) -> None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ArgumentError(f"block_size must be a power of two >= 16, got {block_size}")
        self.block_size = block_size
        self.exclude = frozenset(exclude)
        self.min_size = min_size
        self.search = search
        self.constants_int8_min_size = constants_int8_min_size
        self.int8_below = int8_below
        self.symmetric = symmetric
        if not damp > 0:
            raise ArgumentError(f"damp must be > 0, got {damp}")
        self.hessians = dict(hessians or {})
        self.damp = float(damp)
        self.act_order = act_order
        self.only = None if only is None else frozenset(only)

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (MatMulNBits lives in the com.microsoft domain)."""

    def _decline(self, node: gs.Node) -> str | None:
        if node.name in self.exclude:
            return "excluded by name"
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(w, gs.Constant):
            return "weight is not a constant (attention's second operand, or a graph input): nothing to store in 4 bits"
        if np.asarray(w.values).dtype not in (np.float32, np.float16):
            return "weight is not a float32 or float16 constant"
        if np.asarray(w.values).ndim != 2:
            return "weight is not 2-D"
        if np.asarray(w.values).size < self.min_size:
            return f"weight smaller than {self.min_size} elements"
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)):
                return "Gemm with transA"
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and c.name and not isinstance(c, gs.Constant):
                return "Gemm C is not a constant"
        return None

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite every eligible MatMul/Gemm; count them."""
        done, int8, gptq, notes = 0, 0, 0, []
        fresh = fresh_names(graph_names(graph))
        keys = layer_keys(graph)
        # a weight that several layers read (tied or cloned layers) is packed once, by its name and how the
        # layers read it, and rounded to nearest: GPTQ's input moments are one layer's
        packed_of: dict[tuple, tuple[list[gs.Constant], int, int, int]] = {}
        int8_of: dict[tuple, gs.Variable] = {}
        tables = _embedding_tables(graph, self.min_size)
        tied_gathers: list[tuple[gs.Node, list[gs.Constant], int]] = []  # (Gather, its packed weight, block)

        for node in [n for n in graph.nodes if n.op in ("MatMul", "Gemm") and n.domain in (None, "", "ai.onnx")]:
            if self.only is not None and keys[id(node)] not in self.only:
                continue  # another round's layer (quantize's GPTQ rounds): left as it is, without a note
            why = self._decline(node)
            if why:
                notes.append(f"{node.name or node.outputs[0].name} ({node.op}): float ({why})")
                log.debug("int4 declines %s: %s", node.name, why)
                continue
            w_t = node.inputs[1]
            # a float16 layer keeps float16 activations: its scales and bias are float16 too (MatMulNBits
            # takes T1 = float16; the rounding itself runs in float32)
            dtype = np.asarray(w_t.values).dtype
            shared = len(w_t.outputs) > 1
            gemm = node.op == "Gemm"
            read_as = (w_t.name, gemm and int(node.attrs.get("transB", 0)),
                       float(node.attrs.get("alpha", 1.0)) if gemm else 1.0)
            w = np.asarray(w_t.values, np.float32)
            if w.size < self.int8_below:
                if read_as not in int8_of:
                    int8_of[read_as] = _int8_weight(w_t, node, fresh, graph)
                    int8 += 1
                node.inputs[1] = int8_of[read_as]
                continue
            bias = None
            if gemm and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                bias = (np.asarray(node.inputs[2].values, np.float32) * np.float32(node.attrs.get("beta", 1.0))
                        ).astype(dtype)
            base = w_t.name
            if read_as not in packed_of:
                if gemm:
                    if int(node.attrs.get("transB", 0)):
                        w = w.T
                    w = w * np.float32(node.attrs.get("alpha", 1.0))
                k, n = w.shape
                # A weight with fewer rows than a block gets the smallest block that covers it (no padding bytes).
                block = min(self.block_size, max(16, 1 << (k - 1).bit_length()))
                gathers = _tied_gathers(tables, w, block) if self.symmetric and dtype == np.float32 else []
                key = None if shared else keys[id(node)]
                q, scale, zero = self._round(w, block, key)
                gptq += key in self.hessians
                zeros = None if zero is None else _pack_zero_points(zero)
                packed, scales = _pack(q, scale, block)
                if gathers:  # [N, blocks]: the shape GatherBlockQuantized needs, which MatMulNBits takes too
                    scales = scales.reshape(n, -1)
                stored = [
                    gs.Constant(fresh(f"{base}_int4"), packed),
                    gs.Constant(fresh(f"{base}_scales"), scales.astype(dtype)),
                    *([] if zeros is None else [gs.Constant(fresh(f"{base}_zero_points"), zeros)]),
                ]
                packed_of[read_as] = (stored, k, n, block)
                tied_gathers += [(g, stored, block) for g in gathers]
            stored, k, n, block = packed_of[read_as]
            y = node.outputs[0]
            mm_out = y if bias is None else gs.Variable(fresh(f"{y.name}_nobias"), dtype=dtype)
            new = gs.Node(
                "MatMulNBits",
                fresh(f"{node.name or base}_int4"),
                {"K": int(k), "N": int(n), "bits": 4, "block_size": block, "accuracy_level": 0},
                [node.inputs[0], *stored],
                [mm_out],
                domain="com.microsoft",
            )
            node.outputs.clear()
            node.inputs.clear()
            graph.nodes.append(new)
            if bias is not None:
                graph.nodes.append(
                    gs.Node(
                        "Add", fresh(f"{new.name}_bias"), {}, [mm_out, gs.Constant(fresh(f"{base}_bias"), bias)], [y]
                    )
                )
            done += 1
        for gather, stored, block in tied_gathers:
            _gather_packed(graph, gather, stored, block, fresh)
        consts = 0
        if self.constants_int8_min_size is not None:
            consts, halves = store_constants_int8(graph, self.constants_int8_min_size, fresh, exclude=self.exclude)
        else:
            halves = 0
        if done:
            graph.import_domains = _with_ms_domain(graph)
        stats = {"weights_int4": done, "weights_int4_gptq": gptq, "weights_int8": int8, "constants_int8": consts,
                 "constants_float16": halves, "embeddings_tied_int4": len(tied_gathers)}  # fmt: skip
        return PassResult(graph, done + int8 + consts + halves > 0, stats, tuple(notes))


    def _round(self, w: np.ndarray, block: int, key: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(q, scale, zero)`` of one weight: GPTQ when its input moment is known, else round to nearest."""
        h = self.hessians.get(key)
        if h is not None:
            try:
                return gptq_blocks(
                    w, block, h, symmetric=self.symmetric, search=self.search, damp=self.damp, act_order=self.act_order
                )
            except ValueError as exc:  # a moment that does not fit is the caller's error: say which layer
                raise CalibrationError(
                    f"int4 GPTQ for layer {key!r}: {exc}; collect the moments on the model being quantized"
                ) from None
        if self.symmetric:
            return (*quantize_blocks(w, block, search=self.search), None)
        return quantize_blocks_asym(w, block, search=self.search)


def _with_ms_domain(graph: gs.Graph):
    """Graph's import domains with com.microsoft (version 1) added."""
    from onnx import helper

    domains = list(graph.import_domains or [helper.make_opsetid("", graph.opset)])
    if not any(d.domain == "com.microsoft" for d in domains):
        domains.append(helper.make_opsetid("com.microsoft", 1))
    return domains


# an LSTM's W and R are QuantizeLSTMDynamic's decision as a layer's weights are InsertQDQ's (an excluded LSTM stays
# float); DynamicQuantizeLSTM's bias and scales stay float, as onnxruntime's own quantize_dynamic keeps them
_WEIGHT_CONSUMERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "LSTM", "DynamicQuantizeLSTM"})
# recurrent ops without an integer kernel in onnxruntime: their weights are stored float16 behind a Cast, which
# onnxruntime folds when it loads the model. int8 + DequantizeLinear (not folded: onnxruntime keeps Q/DQ for its
# fusions) ran at every call: a Conv1d + GRU net at 0.99x fp32 at batch 1 against 0.86x with float weights
_HALF_STORED = frozenset({"GRU", "RNN"})
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_QDQ_OPS = frozenset({"DequantizeLinear", "QuantizeLinear"})


def store_constants_int8(graph: gs.Graph, min_size: int, fresh, *, exclude: frozenset[str] = frozenset(),
                         keep_biases: bool = False, tables_only: bool = False) -> tuple[int, int]:
    """Store float32 constants of ``min_size``+ elements as int8 + one symmetric scale + DequantizeLinear.

    GRU/RNN weights (no integer kernel; see ``_HALF_STORED``) are stored float16 behind a Cast instead.
    Weights of Conv/Gemm/MatMul/LSTM (their quantization is InsertQDQ's, QuantizeWeightsInt4's or
    QuantizeLSTMDynamic's decision, so a layer kept float stays float) and Q/DQ parameters are left alone.
    ``s = max|c| / 127``, ``|c - s q| <= s/2``. A 2-D table read by ``Gather`` (axis 0: an embedding) gets a
    scale per row instead and is dequantized after the gather, so only the rows looked up are converted.
    ``tables_only``: only such tables (a second run after a layer pass, for a table it no longer reads).
    Returns the numbers of constants stored int8 and stored float16.
    """
    stored: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    stored_half: dict[str, gs.Variable] = {}  # recurrent weights: float16 behind a Cast
    rows_of: dict[str, tuple[gs.Constant, gs.Constant]] = {}  # embedding tables: int8 rows, one scale per row
    dequantized: dict[str, gs.Variable] = {}
    # keep_biases: a MatMul layer's bias Add keeps its float constant (the dynamic int8 path, whose MatMul layers
    # keep their bias Adds: the BERT-style encoder 37.8 -> 34.7 dB with its FFN biases stored int8). Not the
    # default: on the reference transformer's int4 model it read 40.17 -> 39.55 dB (the stored patch-embedding
    # bias's error happens to cancel some of the rest)
    biases = set()
    for n in graph.nodes if keep_biases else []:  # shared biases too (an export that dedupes equal layers)
        readers = n.outputs[0].outputs if n.op == "MatMul" and n.outputs else []
        if len(readers) == 1 and readers[0].op == "Add":
            biases.update(id(t) for t in readers[0].inputs if isinstance(t, gs.Constant))
    for node in list(graph.nodes):
        if tables_only and node.op != "Gather":
            continue
        if node.op in _HALF_STORED:
            _store_float16_inputs(graph, node, min_size, fresh, exclude, stored_half)
            continue
        if node.op in _QDQ_OPS or node.op in _WEIGHT_CONSUMERS:
            continue
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or t.name in exclude or id(t) in biases:
                continue
            if any(c.op in _WEIGHT_CONSUMERS or c.op in _QDQ_OPS for c in t.outputs):
                continue
            values = np.asarray(t.values)
            if values.dtype != np.float32 or values.size < min_size:
                continue
            table = node.op == "Gather" and i == 0 and values.ndim == 2 and int(node.attrs.get("axis", 0)) == 0
            if tables_only and not table:
                continue
            if table:
                # an embedding table: int8 rows with a scale each, gathered, then dequantized (Cast * the gathered
                # scales). A DequantizeLinear of the whole table ran at every call (a 2000 x 256 table took a
                # BERT-style encoder from 0.68 to 0.75x fp32 at batch 1), and one scale for all rows cost it
                # 37.8 -> 34.4 dB of logit SQNR
                if t.name not in rows_of:  # symmetric int8 per row: the per-channel grid of the layers' weights
                    from onnxpress.passes.qdq import quantize_array, weight_qparams

                    qp = weight_qparams(values, 0)
                    rows_of[t.name] = (gs.Constant(fresh(f"{t.name}_rows_q"), quantize_array(values, qp)),
                                       gs.Constant(fresh(f"{t.name}_rows_s"), qp.scale.reshape(-1, 1)))
                table, scales = rows_of[t.name]
                y = node.outputs[0]
                picked = gs.Variable(fresh(f"{y.name}_q"), dtype=np.int8)
                picked_f = gs.Variable(fresh(f"{y.name}_qf"), dtype=np.float32)
                picked_s = gs.Variable(fresh(f"{y.name}_s"), dtype=np.float32)
                ids = node.inputs[1]
                node.inputs[0] = table
                node.outputs[0] = picked
                graph.nodes += [
                    gs.Node("Gather", fresh(f"{t.name}_Gather_scales"), {"axis": 0}, [scales, ids], [picked_s]),
                    gs.Node("Cast", fresh(f"{t.name}_Cast_rows"), {"to": 1}, [picked], [picked_f]),
                    gs.Node("Mul", fresh(f"{t.name}_Dequantize_rows"), {}, [picked_f, picked_s], [y]),
                ]
                continue
            if t.name not in stored:
                amax = float(np.abs(values).max())
                if amax == 0.0:
                    continue
                scale = np.float32(amax / 127)
                q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
                stored[t.name] = (gs.Constant(fresh(f"{t.name}_q"), q),
                                  gs.Constant(fresh(f"{t.name}_s"), np.asarray(scale)))
            q_const, s_const = stored[t.name]
            if t.name not in dequantized:
                out = gs.Variable(fresh(f"{t.name}_dq"), dtype=np.float32, shape=list(values.shape))
                graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{t.name}_DQ"), {}, [q_const, s_const], [out]))
                dequantized[t.name] = out
            node.inputs[i] = dequantized[t.name]
    return len(set(stored) | set(rows_of)), len(stored_half)


def _store_float16_inputs(graph: gs.Graph, node: gs.Node, min_size: int, fresh, exclude: frozenset[str],
                          done: dict[str, gs.Variable]) -> None:
    """``node``'s float32 constant inputs of ``min_size``+ elements as float16 + Cast (within float16's range)."""
    for i, t in enumerate(node.inputs):
        if not isinstance(t, gs.Constant) or t.name in exclude:
            continue
        if t.name not in done:
            values = np.asarray(t.values)
            if (values.dtype != np.float32 or values.size < min_size or not np.all(np.isfinite(values))
                    or float(np.abs(values).max()) > _FLOAT16_MAX):
                continue
            out = gs.Variable(fresh(f"{t.name}_f32"), dtype=np.float32, shape=list(values.shape))
            half = gs.Constant(fresh(f"{t.name}_f16"), values.astype(np.float16))
            graph.nodes.append(gs.Node("Cast", fresh(f"{t.name}_Cast"), {"to": 1}, [half], [out]))
            done[t.name] = out
        node.inputs[i] = done[t.name]


class StoreConstantsInt8:
    """Weight-only int8 for large float constants that no quantization pass took (see store_constants_int8).

    Args:
        min_size: constants with fewer elements stay float.
        exclude: constant names that stay float.
        keep_biases: the constant of a MatMul layer's bias Add stays float.
        tables_only: store embedding tables only (see store_constants_int8).
    """

    name = "store_constants_int8"

    def __init__(self, *, min_size: int = 1024, exclude: frozenset[str] = frozenset(), keep_biases: bool = False,
                 tables_only: bool = False) -> None:
        self.min_size = min_size
        self.exclude = frozenset(exclude)
        self.keep_biases = keep_biases
        self.tables_only = tables_only

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rewrite the constants in place; count them."""
        fresh = fresh_names(graph_names(graph))

        n, halves = store_constants_int8(graph, self.min_size, fresh, exclude=self.exclude,
                                         keep_biases=self.keep_biases, tables_only=self.tables_only)  # fmt: skip
        return PassResult(graph, n + halves > 0, {"constants_int8": n, "constants_float16": halves})


def _int8_weight(w_t: gs.Constant, node: gs.Node, fresh, graph: gs.Graph) -> gs.Variable:
    """Symmetric int8 per output channel (axis 1 of MatMul's [K, N]; Gemm by transB) behind a DequantizeLinear."""
    from onnxpress.passes.qdq import quantize_array, weight_qparams

    dtype = np.asarray(w_t.values).dtype
    w = np.asarray(w_t.values, np.float32)
    axis = 0 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 1
    qp = weight_qparams(w, axis)
    inputs = [
        gs.Constant(fresh(f"{w_t.name}_q"), quantize_array(w, qp)),
        gs.Constant(fresh(f"{w_t.name}_s"), np.asarray(qp.scale, np.float32)),
        gs.Constant(fresh(f"{w_t.name}_zp"), np.asarray(qp.zero_point)),
    ]
    out = gs.Variable(fresh(f"{w_t.name}_dq"), dtype=np.float32, shape=list(w.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{w_t.name}_DQ"), {"axis": axis}, inputs, [out]))
    if dtype == np.float16:  # a float16 layer: DequantizeLinear gives float16 only from opset 19 on
        half = gs.Variable(fresh(f"{w_t.name}_dq16"), dtype=np.float16, shape=list(w.shape))
        graph.nodes.append(gs.Node("Cast", fresh(f"{w_t.name}_Cast"), {"to": 10}, [out], [half]))
        return half
    return out


def _embedding_tables(graph: gs.Graph, min_size: int) -> dict[tuple[int, int], list[gs.Node]]:
    """Gathers of rows (axis 0) from a 2-D float32 constant table of at least ``min_size`` values, by table shape."""
    tables: dict[tuple[int, int], list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or not isinstance(node.inputs[0], gs.Constant):
            continue
        t = np.asarray(node.inputs[0].values)
        if t.ndim == 2 and t.dtype == np.float32 and t.size >= min_size:
            tables.setdefault(t.shape, []).append(node)
    return tables


def _tied_gathers(tables: dict[tuple[int, int], list[gs.Node]], w: np.ndarray, block: int) -> list[gs.Node]:
    """The Gathers whose table is ``w.T`` (``w`` [K, N], the layer's orientation): a tied embedding.

    Only when K is a whole number of blocks, so that the packed [N, blocks, block/2] weight is the table's
    [N, K/2] rows with no padding.
    """
    k, n = w.shape
    candidates = tables.get((n, k), [])
    if not candidates or k % block:
        return []
    wt = np.ascontiguousarray(w.T)
    return [g for g in candidates if np.array_equal(np.asarray(g.inputs[0].values), wt)]


def _gather_packed(graph: gs.Graph, gather: gs.Node, stored: list[gs.Constant], block: int, fresh) -> None:
    """Make ``gather`` read its rows from the output layer's packed 4-bit weight (``GatherBlockQuantized``).

    The table is then stored once, as 4-bit blocks: MatMulNBits reads ``B`` [N, blocks, block/2], the gather a
    Reshape of it to [N, K/2] (which onnxruntime folds at load), both with the [N, blocks] scales. Each row comes
    back exactly as the output layer's weight column dequantizes (zero point 8, low nibble first). Those are the
    head's GPTQ codes where it has input moments: on a GPT-style export (vocab 2000, dim 128, random weights)
    logit SQNR read 19.49 dB with them against 19.08 rounding both to nearest; the untied int8 table with the
    GPTQ head read 21.90 dB at 0.238x the float file, against 0.142x tied.
    """
    packed, scales = stored[0], stored[1]
    n, blocks, half = np.asarray(packed.values).shape
    rows = gs.Variable(fresh(f"{packed.name}_rows"), dtype=np.uint8, shape=[n, blocks * half])
    shape = gs.Constant(fresh(f"{packed.name}_rows_shape"), np.array([n, blocks * half], np.int64))
    graph.nodes.append(gs.Node("Reshape", fresh(f"{packed.name}_Reshape_rows"), {}, [packed, shape], [rows]))
    table = gather.inputs[0]
    gather.op = "GatherBlockQuantized"
    gather.domain = "com.microsoft"
    gather.attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": int(block), "bits": 4}
    ids = gather.inputs[1]
    gather.inputs.clear()
    gather.inputs.extend([rows, ids, scales])
    log.debug("Gather %s reads the packed 4-bit weight instead of %s", gather.name, table.name)
