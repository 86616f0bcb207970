"""Codebook (non-uniform) weights: k-means with 2^b centroids per layer or per channel group.

Each weight W of a Conv/ConvTranspose/Gemm/MatMul (and the W and R of an LSTM/GRU/RNN) is replaced by indices
into a small float codebook C that minimises the k-means objective (1-D, exact Lloyd iterations on sorted
values)::

    min_{C, idx}  sum_i (W_i - C[idx_i])^2,      |C| = 2^b,  b <= 8

    W[float32] -> Conv               ==>
    idx[uint8, packed: 8 per byte at b = 1, 4 at b = 2, 2 at b = 3-4] -> (BitShift, Mod, Concat or Reshape,
        Slice) -> Cast(int32) -> Reshape[G, M]
        -> GatherElements(C[G, 2^b], axis=1) -> Reshape -> (Transpose) -> W' -> Conv

With ``group_size`` = g, every g output channels share one codebook (G = channels / g); otherwise
one codebook per layer (G = 1). With ``channel_scale`` each output channel is first divided by its
max |W| (stored as a float per channel, rebuilt with one Mul), W ~ s_c * C[idx], so that narrow
channels are not crushed onto one or two centroids of a codebook sized for the wide ones; with
``preserve_norm`` s_c is then multiplied by ||W_c|| / ||s_c C[idx_c]|| (the rebuilt channel keeps
its norm: k-means levels are cluster means, which shrink every channel a little). ``keep_gain``
(the default) undoes that shrink exactly instead: the centroid condition makes the reconstruction
R = C[idx] orthogonal to its error, so ``<R, W> = ||W||^2 - sse`` and every layer passes on
``1 - sse/||W||^2`` of its input's projection (a gain below 1 that compounds through the network);
each output channel's scale (each group's codebook without ``channel_scale``) is multiplied by::

    g_c = <W_c, W_c> / <R_c, W_c>          so that  <g_c R_c, W_c> = ||W_c||^2

(the rebuilt channel's projection onto the original is the original; no extra bytes).
Storage is b bits per weight (8, 4 or 2 indices share a byte at b = 1, 2 or 3-4;
for 4 < b <= 8 one byte each) plus G * 2^b floats (plus one float per output channel with
``channel_scale``, the default), against 32 bits per weight in float.

With ``hessians`` (data-aware, GPTQ-style: Frantar et al. 2022) the codebooks are the same, but the
indices are chosen column by column against the layer's output error instead of the weight error:
with H = E[x x^T] of the values each weight row multiplies (input features, or conv patches) and
U the upper Cholesky factor of (H + damp I)^-1, column j is rounded to its nearest level and its
error is spread over the columns not yet rounded::

    e = (W[:, j] - W_hat[:, j]) / U[j, j];     W[:, j+1:] -= e U[j, j+1:]

which minimises ||X W^T - X W_hat^T||^2 greedily (the weight error itself grows).

Runtime cost: the rebuild subgraph has only constant inputs, so onnxruntime's constant folding
(any optimisation level above ``disable``) evaluates it once when the session is created and the
layers then run on float weights at float speed; the model is small on disk, not in memory. With
optimisations off the rebuild runs on every call. Passes that fold constants (``cleanup``) turn
the weights back into float initializers, and ``InsertQDQ`` sees no constant weight to quantize,
so run this pass last.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError
from onnxpress.passes.base import PassResult, unique_name
from onnxpress.passes.weight_only import gptq_factor

__all__ = ["RECURRENT_OPS", "WEIGHT_INPUTS", "CodebookWeights", "KMeansResult", "gptq_assign", "hessian_times",
           "kmeans_1d", "refit_codebook", "weight_channel_axis"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """Sorted centroids, the index of each value's centroid, and the objective sum (x - c)^2."""

    centroids: np.ndarray
    labels: np.ndarray
    sse: float


def _lloyd(xs: np.ndarray, csum: np.ndarray, starts: np.ndarray, max_iterations: int) -> np.ndarray:
    """Lloyd iterations on sorted values from an initial partition (cluster start indices)."""
    centroids = np.empty(0)
    for _ in range(max_iterations):
        counts = np.diff(np.append(starts, xs.size))
        keep = counts > 0
        means = (csum[np.append(starts, xs.size)[1:]] - csum[starts])[keep] / counts[keep]
        if np.array_equal(means, centroids):
            break
        centroids = means
        starts = np.concatenate([[0], np.searchsorted(xs, (centroids[:-1] + centroids[1:]) / 2.0, side="right")])
    return centroids


def kmeans_1d(values: np.ndarray, k: int, *, max_iterations: int = 100) -> KMeansResult:
    """Lloyd's k-means on scalars from two starts (equal-count quantiles, equal-width grid); keeps the better.

    In 1-D the clusters of a fixed point are contiguous runs of the sorted values, so each
    iteration is a ``searchsorted`` of the midpoints plus cluster means from a cumulative sum.
    Quantile starts suit the bulk of a bell-shaped weight distribution; equal-width starts give
    the tails their own clusters; Lloyd only finds a local optimum, so both are run.

    Args:
        values: any-shaped array (flattened).
        k: number of centroids (fewer are returned when there are fewer distinct values).
        max_iterations: cap on Lloyd iterations per start.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("cannot cluster an empty array")
    if k < 1:
        raise ArgumentError(f"k must be >= 1, got {k}")
    xs = np.sort(x, kind="stable")
    distinct = np.unique(xs)
    candidates = [distinct]
    if distinct.size > k:
        csum = np.concatenate([[0.0], np.cumsum(xs)])
        quantile_starts = np.linspace(0, xs.size, k + 1).round().astype(np.int64)[:-1]
        grid = np.linspace(xs[0], xs[-1], k + 1)
        grid_starts = np.concatenate([[0], np.searchsorted(xs, grid[1:-1], side="right")])
        candidates = [_lloyd(xs, csum, st, max_iterations) for st in (quantile_starts, grid_starts)]
    best = None
    for centroids in candidates:
        bounds = (centroids[:-1] + centroids[1:]) / 2.0
        labels = np.searchsorted(bounds, x, side="right")  # nearest centroid (ties to the upper one)
        sse = float(np.sum((x - centroids[labels]) ** 2))
        if best is None or sse < best.sse:
            best = KMeansResult(centroids, labels.astype(np.int64), sse)
    return best


def _nearest(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level of each row: v [C], levels [C, k] -> [C]."""
    return np.abs(v[:, None] - levels).argmin(axis=1)


def gptq_assign(w: np.ndarray, levels: np.ndarray, hessian: np.ndarray, *, damp: float = 0.01) -> np.ndarray:
    """Indices into per-row levels, chosen column by column with GPTQ error feedback (module docstring).

    Args:
        w: [C, M] weight rows (one output channel each; M in the order of ``hessian``).
        levels: [C, k] the values row c may take (codebook times channel scale, or an integer grid).
        hessian: [M, M] second moments of the inputs shared by every row, or [G, M, M], one per group of
            C / G consecutive rows (a grouped conv; a depthwise conv has one per channel).
        damp: added to the diagonal, as a fraction of its mean (keeps the inverse well conditioned).

    Returns:
        [C, M] int64 indices into ``levels``.

    Raises:
        ValueError: shapes that do not fit.
    """
    w = np.asarray(w, np.float64)
    levels = np.asarray(levels, np.float64)
    h = np.asarray(hessian, np.float64)
    c, m = w.shape
    if levels.ndim != 2 or levels.shape[0] != c:
        raise ValueError(f"levels must be [{c}, k], got {levels.shape}")
    if h.ndim == 3 and h.shape[1:] == (m, m) and h.shape[0] and c % h.shape[0] == 0:
        per = c // h.shape[0]
        return np.concatenate([gptq_assign(w[g * per : (g + 1) * per], levels[g * per : (g + 1) * per], h[g], damp=damp)
                               for g in range(h.shape[0])])
    if h.shape != (m, m):
        raise ValueError(f"hessian must be [{m}, {m}] or [G, {m}, {m}] with G dividing {c}, got {h.shape}")
    _, u = gptq_factor(h, damp, act_order=False)  # columns in their own order
    w = w.copy()
    idx = np.zeros((c, m), np.int64)
    rows = np.arange(c)
    for j in range(m):
        idx[:, j] = _nearest(w[:, j], levels)
        err = (w[:, j] - levels[rows, idx[:, j]]) / u[j, j]
        w[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    return idx


def _row_blocks(rows: int, hessian: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """``(first row, end row, H)`` for each run of rows that share one moment ([M, M], or [G, M, M])."""
    if hessian.ndim == 2:
        return [(0, rows, hessian)]
    per = rows // hessian.shape[0]
    return [(g * per, (g + 1) * per, hessian[g]) for g in range(hessian.shape[0])]


def _damped(hessian: np.ndarray, damp: float) -> np.ndarray:
    """``H + damp * mean(diag H) * I`` for each moment ([M, M] or [G, M, M]); a copy."""
    out = np.array(hessian, np.float64)
    diag = np.einsum("...ii->...i", out)  # a writable view of the diagonal(s)
    diag += damp * diag.mean(axis=-1, keepdims=True)
    return out


def hessian_times(rows: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``H_c w_c`` for each row ``w_c`` of ``rows`` [C, M], with the moment that row's inputs have."""
    out = np.empty(rows.shape, np.float64)
    for lo, hi, h in _row_blocks(rows.shape[0], np.asarray(hessian, np.float64)):
        out[lo:hi] = rows[lo:hi] @ h  # H is symmetric
    return out


# Multiply-adds one codebook refit may spend on its normal equations (about a second here): a layer whose
# rows cost more is refitted on evenly spaced rows of each group, which still gives 2^b unknowns
# thousands of equations each.
_REFIT_WORK = 1 << 33


def refit_codebook(
    rows: np.ndarray,
    idx: np.ndarray,
    books: np.ndarray,
    scales: np.ndarray | None,
    hessian: np.ndarray,
    *,
    alternations: int = 4,
    fit_books: bool = True,
    damp: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Codebooks (and channel scales) that minimise the layer's output error for fixed indices.

    The rebuilt row ``c`` is ``s_c B[g(c)][idx_c]``, linear in the codebook ``B[g]`` (group ``g(c)`` of
    C / G consecutive rows) for fixed scales and in ``s_c`` for a fixed codebook, so each step is an
    exact least-squares solve of ``sum_c (w_c - s_c B[idx_c])^T H_c (w_c - s_c B[idx_c])``:

        B[g] = (sum_c s_c^2 O_c^T H_c O_c)^-1 sum_c s_c O_c^T H_c w_c     (O_c: one-hot of idx_c, [M, 2^b])
        s_c  = <B[idx_c], w_c>_H / <B[idx_c], B[idx_c]>_H

    alternated ``alternations`` times (each step lowers the objective or leaves it). Written here
    because it is the method (GPTVQ's codebook update, Van Baalen et al. 2024, on our 1-D codebooks):
    k-means fits the levels to the weights; this fits them to what the layer computes with GPTQ's
    indices. A centroid no row uses keeps its value; a scale whose fit is not positive keeps its old value.

    Args:
        rows: [C, M] weight rows in the order of ``hessian``'s inputs (original units).
        idx: [C, M] indices into the row's codebook.
        books: [G, 2^b] codebooks (G divides C).
        scales: [C] channel scales, or None (the codebooks carry the scale; only they are fitted).
        hessian: [M, M] or [G', M, M] input second moments (see :func:`gptq_assign`).
        alternations: scale and codebook steps.
        fit_books: False keeps the codebooks (a fixed grid: linear int4's levels) and fits only the scales.
        damp: added to each moment's diagonal, as a fraction of its mean. A moment with a null space -- the
            inputs of a layer after LayerNorm sum to zero, so a constant added to every level changes no
            output -- leaves the codebook's offset free, and undamped the solve moved it far along it (a
            ConvNeXt's logits fell from 22.4 dB to -9.4, a ViT's from 19.4 to -4.6). 1e-6 pins those
            directions and moved no reference model's SQNR by more than 0.07 dB (1e-8 to 1e-4 fixed them
            too); GPTQ's own 1e-2 pulls the fit back towards the weights (resnet 31.87 -> 28.20 dB).

    Returns:
        ``(books, scales)`` as float64 arrays (scales None when given None).
    """
    rows = np.asarray(rows, np.float64)
    books = np.array(books, np.float64)
    groups, k = books.shape
    c, m = rows.shape
    per_book = c // groups
    book_of = np.arange(c) // per_book
    fit_scales = scales is not None
    s = np.array(scales, np.float64) if fit_scales else np.ones(c)
    h = _damped(np.asarray(hessian, np.float64), damp)
    blocks = _row_blocks(c, h)
    hw = hessian_times(rows, h) if fit_scales else None
    budget_rows = max(1, _REFIT_WORK // (m * m * k + m * k * k))
    chunk = max(1, min(64, (1 << 24) // (m * k)))  # one-hot chunk of ~128 MB at most
    for _ in range(alternations):
        if fit_scales:
            rec = books[book_of[:, None], idx]
            num = np.sum(rec * hw, axis=1)
            den = np.sum(rec * hessian_times(rec, h), axis=1)
            ok = (den > 0) & (num > 0)
            s = np.where(ok, num / np.where(ok, den, 1.0), s)
        if not fit_books:
            continue
        normal = np.zeros((groups, k, k))
        rhs = np.zeros((groups, k))
        for lo, hi, hb in blocks:
            for g in range(book_of[lo], book_of[hi - 1] + 1):
                first, last = max(lo, g * per_book), min(hi, (g + 1) * per_book)
                picked = np.linspace(first, last - 1, min(last - first, budget_rows)).round().astype(np.int64)
                picked = np.unique(picked)
                for start in range(0, picked.size, chunk):
                    r = picked[start : start + chunk]
                    onehot = np.eye(k)[idx[r]]  # [c, M, k]
                    h_onehot = np.matmul(hb, onehot)  # H O_c
                    normal[g] += np.tensordot(onehot * (s[r] ** 2)[:, None, None], h_onehot, axes=([0, 1], [0, 1]))
                    rhs[g] += np.tensordot(h_onehot, rows[r] * s[r, None], axes=([0, 1], [0, 1]))
        for g in range(groups):
            used = np.flatnonzero(np.diag(normal[g]) > 0)
            if used.size:
                a = normal[g][np.ix_(used, used)]
                a = a + np.eye(used.size) * (1e-12 * np.trace(a) / used.size)
                books[g, used] = np.linalg.solve(a, rhs[g, used])
    return books, (s if fit_scales else None)


RECURRENT_OPS = ("LSTM", "GRU", "RNN")
"""Recurrent ops whose input and recurrence weights (W, R) the pass codes, one row per gate unit."""

WEIGHT_INPUTS = dict.fromkeys(("Conv", "ConvTranspose", "Gemm", "MatMul"), (1,)) | dict.fromkeys(RECURRENT_OPS, (1, 2))
"""The ops whose weights (these inputs) the pass stores as codes. onnxruntime has no integer ConvTranspose, so a
codebook is the one way to shrink a decoder's upsampling weights below int8's storage (a U-Net's 64x64x4x4
ConvTranspose kept 256 KB float, 54% of its 4-bit file); it has no integer GRU or RNN, and its integer LSTM
(DynamicQuantizeLSTM) stores 8 bits, so a recurrent net's input and recurrence weights (W, R) -- most of its
bytes -- shrink further only here (the reference LSTM's 4-bit file was 0.94x its float one with them left float)."""


def weight_channel_axis(node: gs.Node, w: np.ndarray) -> int:
    """The output-channel axis of a layer's weight.

    Conv 0; ConvTranspose 1 ([C_in, C_out / group, k...]: with groups, axis 1 spans the same slot of each); Gemm by
    transB; MatMul last; the gate units of a recurrent W / R ([directions, gates * hidden, inputs]) 1.
    """
    if node.op == "ConvTranspose" or node.op in RECURRENT_OPS:
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        return w.ndim - 1
    return 0


class CodebookWeights:
    """Store Conv/ConvTranspose/Gemm/MatMul weights (and LSTM/GRU/RNN W and R) as b-bit indices into k-means codebooks.

    Args:
        bits: index width b (1..8); 2^b centroids per codebook.
        group_size: output channels per codebook; ``None`` for one codebook per layer.
        min_elements: leave weights with fewer elements float (a codebook would not pay).
        pack: store 8 / 4 / 2 indices per byte at 1 / 2 / 3-4 bits.
        channel_scale: divide each output channel by its max |W| first and store that scale
            (32 bits per channel, as per-channel linear int4 does), so channels of small range keep
            their relative precision; the codebook then holds normalised levels in [-1, 1]. On by
            default: on the reference models it gains 2.7 to 9.2 dB of logit SQNR over raw per-layer
            codebooks for +0.07 to +0.5 bits per weight (bench/advanced_ptq.py, section C).
        preserve_norm: with ``channel_scale``, multiply each channel's scale by
            ``||W_c|| / ||s_c C[idx_c]||`` so that the rebuilt channel keeps the original norm.
            Cluster means shrink a channel (E[C[idx]^2] < E[W^2]), and through many layers the
            shrink compounds into a systematic logit error; the gain undoes it at no storage cost
            (the scale is stored anyway), at the price of a slightly larger weight MSE
            (Banner et al. 2019 correct the per-channel weight variance the same way).
        keep_gain: multiply each channel's scale (without ``channel_scale``: each codebook) by
            ``<W_c, W_c> / <R_c, W_c>``, so the rebuilt channel's projection onto the original is
            exactly the original (see the module docstring). Logit SQNR, 4 bits, weights only
            (bench/advanced_ptq.py section C, channel scales): mobilenet 16.44 -> 18.27 dB,
            resnet 17.56 -> 18.72, transformer 23.43 -> 24.12. With ``preserve_norm`` set, that takes its place.
            With a Hessian for the weight (and channel scales) the projection is taken in output space,
            ``g_c = W_c^T H W_c / W_hat_c^T H W_c`` (GPTQ moves W_hat away from W on purpose).
        hessians: ``{weight name: H}`` (see :func:`gptq_assign`; ``onnxpress.advanced.collect_layer_hessians``
            measures them): those weights get GPTQ-assigned indices into the same codebooks. Others,
            and every weight when None, take the nearest level. 4 bits with channel scales, logit
            SQNR mobilenet / resnet / transformer: 18.27 / 18.72 / 24.12 -> 22.01 / 28.12 / 34.10 dB
            (500 calibration samples, ``refit=0``); per-channel int4 given the same GPTQ + gain: 20.50 / 28.20 /
            32.23.
        damp: GPTQ diagonal damping, as a fraction of the mean of H's diagonal.
        layers: only the weights of these layers (node names, else first output names); None: every layer.
            ``onnxpress.quantize(codebook_layers=...)`` mixes such layers into an int8 model.
        refit: with a Hessian for the weight, rounds of :func:`refit_codebook` (the codebook and channel
            scales fitted to the layer's output for GPTQ's indices) each followed by GPTQ again with the
            fitted levels, and a last fit for the final indices; 0 keeps the k-means levels. 4 bits with
            channel scales, logit SQNR mobilenet / resnet / transformer (bench/advanced_ptq.py section C,
            500 calibration samples):
            22.01 / 28.12 / 34.10 dB at 0 -> 21.89 / 31.87 / 37.14 at 1 (2: 22.43 / 31.86 / 36.10; 3: 22.31 /
            31.74 / 34.15). Costs about 4x the pass time (resnet 0.36 -> 1.7 s).

    After a call, ``objective`` maps each rewritten weight name to its k-means objective (sum of
    squared reconstruction errors over all its groups; of the normalised weights W_c / max|W_c|
    with ``channel_scale``; before the ``keep_gain`` / ``preserve_norm`` rescaling and of the nearest-level
    indices, also when ``hessians`` chose others).
    """

    name = "codebook_weights"

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        min_elements: int = 256,
        pack: bool = True,
        channel_scale: bool = True,
        preserve_norm: bool = False,
        keep_gain: bool = True,
        hessians: Mapping[str, np.ndarray] | None = None,
        damp: float = 0.01,
        layers: Iterable[str] | None = None,
        refit: int = 1,
    ):
        if not 1 <= int(bits) <= 8:
            raise ArgumentError(f"bits must be in 1..8 (uint8 indices), got {bits}")
        if group_size is not None and group_size < 1:
            raise ArgumentError(f"group_size must be >= 1 or None, got {group_size}")
        self.bits = int(bits)
        self.group_size = group_size
        self.min_elements = int(min_elements)
        self.pack = pack
        if preserve_norm and not channel_scale:
            raise ArgumentError("preserve_norm rescales the per-channel scales: it needs channel_scale=True")
        self.channel_scale = channel_scale
        self.preserve_norm = preserve_norm
        self.keep_gain = keep_gain and not preserve_norm
        self.hessians = dict(hessians or {})
        self.damp = float(damp)
        if int(refit) < 0:
            raise ArgumentError(f"refit must be >= 0, got {refit}")
        self.refit = int(refit)
        self.layers = None if layers is None else frozenset(layers)
        self.objective: dict[str, float] = {}

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (opset >= 11 for BitShift holds for every normalised model)."""

    def _targets(
        self, graph: gs.Graph
    ) -> tuple[dict[str, tuple[gs.Constant, list[tuple[gs.Node, int]], int]], list[str]]:
        """Each weight to store as codes: (its constant, the (layer, input slot) pairs that read it, channel axis)."""
        found: dict[str, tuple[gs.Constant, list[tuple[gs.Node, int]], int]] = {}
        notes = []
        dropped: set[str] = set()
        for node in graph.nodes:
            if node.op not in WEIGHT_INPUTS:
                continue
            if self.layers is not None and (node.name or node.outputs[0].name) not in self.layers:
                continue
            for slot in WEIGHT_INPUTS[node.op]:
                w = node.inputs[slot] if len(node.inputs) > slot else None
                if not isinstance(w, gs.Constant) or w.values.dtype != np.float32 or w.name in dropped:
                    continue
                if w.values.size < self.min_elements:
                    notes.append(f"{w.name}: kept float ({w.values.size} < {self.min_elements} elements)")
                    continue
                axis = weight_channel_axis(node, w.values)
                if w.name in found:
                    if found[w.name][2] != axis:
                        notes.append(f"{w.name}: kept float (shared with different channel axes)")
                        del found[w.name]
                        dropped.add(w.name)
                        continue
                    found[w.name][1].append((node, slot))
                else:
                    found[w.name] = (w, [(node, slot)], axis)
        for name, (w, readers, _axis) in list(found.items()):
            uses = [(r, i) for r in w.outputs for i, t in enumerate(r.inputs) if t is w]
            if any(i not in WEIGHT_INPUTS.get(r.op, ()) for r, i in uses):
                notes.append(f"{name}: kept float (also read as something other than a layer weight)")
                del found[name]
            elif len(readers) < len(uses):  # a tied weight one of whose layers is left out stays float
                notes.append(f"{name}: kept float (shared with a layer left out)")
                del found[name]
        return found, notes

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Cluster and rewrite every eligible weight."""
        self.objective = {}
        targets, notes = self._targets(graph)
        before = after = 0
        for name, (w_const, readers, axis) in targets.items():
            w = w_const.values
            channels = w.shape[axis]
            g = self.group_size or channels
            if channels % g:
                notes.append(f"{name}: kept float ({channels} channels not divisible by group_size {g})")
                continue
            rebuilt, nbytes, sse = self._rewrite(graph, name, w, axis, channels // g, self.hessians.get(name))
            for r, slot in readers:
                r.inputs[slot] = rebuilt
            self.objective[name] = sse
            before += w.nbytes
            after += nbytes
            log.debug("codebook %s: %d bits, %d groups, sse %.4g", name, self.bits, channels // g, sse)
        stats = {"weights": len(self.objective), "bytes_before": before, "bytes_after": after}
        return PassResult(graph, bool(self.objective), stats, tuple(notes))

    def _cluster(self, w: np.ndarray, axis: int, groups: int, hessian: np.ndarray | None = None):
        """(indices [G, M], codebooks [G, 2^b], channel scales or None, channel-first shape, objective)."""
        k = 2**self.bits
        first = np.moveaxis(w, axis, 0)
        scales = None
        if self.channel_scale:  # k-means on W_c / max|W_c|: every channel gets the same relative precision
            amax = np.abs(first.reshape(first.shape[0], -1)).max(axis=1).astype(np.float32)
            scales = np.where(amax > 0, amax, np.float32(1.0)).astype(np.float32)
            first = first / scales.reshape((-1,) + (1,) * (first.ndim - 1))
        rows = first.reshape(groups, -1)  # [G, M]: channel-major, so each group is one row
        idx = np.zeros(rows.shape, np.uint8)
        book = np.zeros((groups, k), np.float32)
        sse = 0.0
        for gi in range(groups):
            res = kmeans_1d(rows[gi], k)
            c = res.centroids.astype(np.float32)
            book[gi, : c.size] = c
            book[gi, c.size :] = c[-1]
            idx[gi] = res.labels
            sse += float(np.sum((rows[gi].astype(np.float64) - c[res.labels].astype(np.float64)) ** 2))
        if hessian is not None:  # same codebooks; indices against the output error (rows are independent
            n_ch = first.shape[0]  # under GPTQ's updates, so the normalised rows give the same indices)
            group_of = np.arange(n_ch) // (n_ch // groups)
            chosen = gptq_assign(first.reshape(n_ch, -1), book[group_of], hessian, damp=self.damp)
            if self.refit:  # levels fitted to the layer's output with these indices, then indices again
                w_rows = first.reshape(n_ch, -1).astype(np.float64)
                if scales is not None:
                    w_rows = w_rows * scales[:, None]
                books, fitted = book.astype(np.float64), None if scales is None else scales.astype(np.float64)
                for _ in range(self.refit):
                    books, fitted = refit_codebook(w_rows, chosen, books, fitted, hessian)
                    levels = books[group_of] * (1.0 if fitted is None else fitted[:, None])
                    chosen = gptq_assign(w_rows, levels, hessian, damp=self.damp)
                books, fitted = refit_codebook(w_rows, chosen, books, fitted, hessian)  # for the final indices
                book = books.astype(np.float32)
                if fitted is not None:  # the rows normalised by the fitted scales (keep_gain rescales them)
                    scales = fitted.astype(np.float32)
                    first = (w_rows / fitted[:, None]).reshape(first.shape)
            idx = chosen.reshape(groups, -1).astype(np.uint8)
        if scales is not None and self.preserve_norm:  # ||s_c' C[idx_c]|| = ||W_c||: undo the k-means shrink
            levels = np.take_along_axis(book, idx.astype(np.int64), axis=1).reshape(first.shape[0], -1)
            norm_rec = np.sqrt(np.sum(levels.astype(np.float64) ** 2, axis=1))
            norm_w = np.sqrt(np.sum(first.reshape(first.shape[0], -1).astype(np.float64) ** 2, axis=1))
            gain = np.where(norm_rec > 0, norm_w / np.where(norm_rec > 0, norm_rec, 1.0), 1.0)
            scales = (scales * gain).astype(np.float32)
        if self.keep_gain:  # <g R_c, W_c> = ||W_c||^2: undo the (1 - sse / ||W||^2) shrink of the centroids
            levels = np.take_along_axis(book, idx.astype(np.int64), axis=1).astype(np.float64)
            target = first.reshape(levels.shape).astype(np.float64)
            if scales is not None:
                levels, target = levels.reshape(first.shape[0], -1), target.reshape(first.shape[0], -1)
            if hessian is not None and scales is not None:  # in output space: <R_c, W_c>_H = W_c^T H R_c
                hw = hessian_times(target, hessian)
                dot, energy = np.sum(levels * hw, axis=1), np.sum(target * hw, axis=1)
            else:
                dot, energy = np.sum(levels * target, axis=1), np.sum(target * target, axis=1)
            gain = np.where(dot > 0, energy / np.where(dot > 0, dot, 1.0), 1.0)
            if scales is not None:
                scales = (scales * gain).astype(np.float32)
            else:
                book = (book * gain[:, None]).astype(np.float32)
        return idx, book, scales, first.shape, sse

    def reconstruct(self, node: gs.Node, w: np.ndarray) -> np.ndarray:
        """The weight this pass would rebuild for ``node`` (numpy; e.g. for CorrectBias(quantizer=))."""
        axis = weight_channel_axis(node, w)
        channels = w.shape[axis]
        g = self.group_size or channels
        if channels % g or w.size < self.min_elements:  # the pass leaves these float
            return np.asarray(w, np.float32)
        h = self.hessians.get(node.inputs[1].name) if len(node.inputs) > 1 else None
        idx, book, scales, shape, _ = self._cluster(np.asarray(w, np.float32), axis, channels // g, h)
        first = np.take_along_axis(book, idx.astype(np.int64), axis=1).reshape(shape)
        if scales is not None:
            first = first * scales.reshape((-1,) + (1,) * (first.ndim - 1))
        return np.moveaxis(first, 0, axis).astype(np.float32)

    def _rewrite(self, graph: gs.Graph, name: str, w: np.ndarray, axis: int, groups: int, hessian=None):
        idx, book, scales, first_shape, sse = self._cluster(w, axis, groups, hessian)
        rows_shape = idx.shape

        def var(suffix: str, dtype, shape=None) -> gs.Variable:
            return gs.Variable(unique_name(graph, f"{name}_{suffix}"), dtype=dtype, shape=shape)

        def node(op: str, inputs, outputs, **attrs) -> None:
            graph.nodes.append(gs.Node(op, unique_name(graph, f"{name}_{op}"), attrs, inputs, outputs))

        def const(suffix: str, values: np.ndarray) -> gs.Constant:
            return gs.Constant(unique_name(graph, f"{name}_{suffix}"), np.asarray(values))

        flat = idx.reshape(-1)
        n = flat.size
        lane = 1 if self.bits == 1 else 2 if self.bits == 2 else 4  # 3 bits take a nibble: bytes split evenly
        if self.pack and self.bits <= 4:
            # 8 / lane indices per byte, lane-major: index i of segment k sits at bits [k*lane, (k+1)*lane) of
            # byte i, so every lane comes out of one shift and one modulus
            per = 8 // lane
            seg = -(-n // per)
            padded = np.zeros(per * seg, np.uint8)
            padded[:n] = flat
            lanes = padded.reshape(per, seg).astype(np.uint16)
            packed = sum((lanes[k] << (k * lane)) for k in range(per)).astype(np.uint8)
            both, cut = var("codes2", np.uint8), var("codes", np.uint8)
            if per == 2:  # nibbles, as before (the 4-bit models' bytes unchanged)
                stored = const("codes_packed", packed)
                lo, hi = var("lo", np.uint8), var("hi", np.uint8)
                node("Mod", [stored, const("sixteen", np.uint8(16))], [lo], fmod=0)
                node("BitShift", [stored, const("four", np.uint8(4))], [hi], direction="RIGHT")
                node("Concat", [lo, hi], [both], axis=0)
            else:  # all lanes in one broadcast shift and modulus: [1, seg] >> [per, 1], then flattened lane-major
                stored = const("codes_packed", packed.reshape(1, seg))
                shifted, masked = var("lanes", np.uint8), var("lanes_masked", np.uint8)
                shifts = const("shifts", (np.arange(per) * lane).astype(np.uint8).reshape(per, 1))
                node("BitShift", [stored, shifts], [shifted], direction="RIGHT")
                node("Mod", [shifted, const("modulus", np.uint8(1 << lane))], [masked], fmod=0)
                node("Reshape", [masked, const("flat", np.array([-1], np.int64))], [both])
            node("Slice", [both, const("start", np.array([0], np.int64)), const("end", np.array([n], np.int64))], [cut])
            codes = cut
            nbytes = packed.nbytes + book.nbytes
        else:
            codes = const("codes", idx)
            nbytes = idx.nbytes + book.nbytes
        wide, grid, gathered = var("codes_i32", np.int32), var("codes_grid", np.int32), var("values", np.float32)
        node("Cast", [codes], [wide], to=6)  # int32
        node("Reshape", [wide, const("grid_shape", np.array(rows_shape, np.int64))], [grid])
        node("GatherElements", [const("codebook", book), grid], [gathered], axis=1)
        if scales is not None:
            nbytes += scales.nbytes
        if axis == 0 and scales is None:
            out = var("rebuilt", np.float32, list(w.shape))
            node("Reshape", [gathered, const("shape", np.array(w.shape, np.int64))], [out])
        else:
            shaped = var("channel_first", np.float32, list(first_shape))
            node("Reshape", [gathered, const("shape", np.array(first_shape, np.int64))], [shaped])
            if scales is not None:
                scaled = var("rebuilt" if axis == 0 else "scaled", np.float32, list(first_shape))
                scale_const = const("channel_scale", scales.reshape((-1,) + (1,) * (len(first_shape) - 1)))
                node("Mul", [shaped, scale_const], [scaled])
                shaped = scaled
                if axis == 0:
                    return shaped, nbytes, sse
            perm = list(range(1, w.ndim))
            perm.insert(axis, 0)
            out = var("rebuilt", np.float32, list(w.shape))
            node("Transpose", [shaped], [out], perm=perm)
        return out, nbytes, sse
