"""Low-rank splits of Gemm/MatMul and Conv weights (truncated SVD, plain or data-aware).

A layer computes ``y = W x`` per position with ``W`` of shape ``m × n`` (outputs × input features;
for Conv the features are the unfolded ``C_in/g · kh · kw`` patch, one matrix per group). With the
truncated SVD ``W ≈ U_r Σ_r V_rᵀ = A · B``, ``A = U_r Σ_r^½`` (m × r), ``B = Σ_r^½ V_rᵀ`` (r × n)::

    Gemm/MatMul:  X -> Gemm(W, b) -> Y          ==>  X -> Gemm(Bᵀ) -> Z[r] -> Gemm(Aᵀ, b) -> Y
    Conv:         X -> Conv k×k (W, b) -> Y     ==>  X -> Conv k×k (B, r/group) -> Conv 1×1 (A, b) -> Y
    Tucker-2:     X -> Conv k×k (W, b) -> Y     ==>  X -> Conv 1×1 (U_inᵀ) -> Conv k×k (core) -> Conv 1×1 (U_out, b)

The split costs ``r·(m + n)`` MACs per position instead of ``m·n``, so it only pays when
``r < m·n / (m + n)``; layers where it would not are skipped and reported.

Joint split of siblings (``joint=True``). Gemm/MatMul layers that read the same tensor on the same
axis (attention's Q, K and V projections) are factorised as one unit: the truncated SVD of their
stacked weights ``W = [W_1; …; W_k]`` (Σ m_i × n; data-aware: of ``W C^½``, the one input moment they
share) gives one first factor ``B`` (r × n) and row blocks ``A_i`` of ``A`` (m_i × r)::

    X -> MatMul(W_1) -> Y_1          X -> MatMul(Bᵀ) -> Z[r] -> MatMul(A_1ᵀ) -> Y_1
    X -> MatMul(W_2) -> Y_2   ==>                        ├─> MatMul(A_2ᵀ) -> Y_2
    X -> MatMul(W_3) -> Y_3                              └─> MatMul(A_3ᵀ) -> Y_3

It costs ``r·(n + Σ m_i)`` MACs instead of ``Σ r_i·(n + m_i)``: for three n × n layers at equal MACs
the joint rank is 1.5× the separate one, and where the siblings' outputs draw on the same input
directions (the whitened case) the shared ``B`` keeps far more of their energy. Its loss in the
budget greedy is the sum of its members' noise-to-signal ratios, each read from the one SVD.

Data-aware variant. With the input second moment ``C = E[x xᵀ]`` (streamed by the API, handed to
the pass as numpy arrays), the expected output error is
``E‖(W − W')x‖² = ‖(W − W') C^½‖_F²``. Its minimiser of rank r (Eckart–Young on ``W C^½``) is
``W' = U_r U_rᵀ W`` where ``U_r`` are the leading left singular vectors of ``W C^½``: the output is
projected on the r directions that carry most of the output energy *on the data*, instead of the
directions that carry most of the weight energy. ``C^{-½}`` is never formed. ``C`` is often rank
deficient (ReLU inputs, constant patch borders), so we use ``C + λ·(tr C / n)·I`` (λ = ``ridge``,
1e-3 by default): it leaves the data directions as they are and, where the data has no energy, lets
the weight's own energy break the ties, so directions unseen in calibration are not discarded
arbitrarily.

Rank selection: a fixed rank, the smallest rank keeping a fraction of the spectral energy (output
energy when data-aware), or a whole-model MACs budget. For the budget, every layer offers options
(unsplit, or rank r on a multiple grid) with a cost (MACs) and a loss, its noise-to-signal ratio
``dropped / kept`` energy; a greedy walks each layer's lower convex hull in (MACs, loss), always
taking the step with the least loss added per MAC saved, until the model's MACs fit the budget.
Why NSR and not the dropped fraction: if the layers' errors are independent and pass on with gain
about one, the output's 1/SQNR is roughly the sum of the layers' NSRs, and the dropped fraction
(capped at 1) would rather wipe out a few layers than trim many, which ruins the output. Ranks are
rounded to a multiple for kernel efficiency. MACs come from :func:`onnxpress.passes.flops.count_macs` (per sample).

Latency-steered budget. MACs are a poor proxy for time on small GEMMs: a rank-r split writes and
re-reads an ``r``-wide intermediate and runs two thin GEMMs, so on onnxruntime a 128×128 MatMul split
at r = 56 (0.88 of its MACs) is *slower* than the original, while a 512→128 one at r = 64 (0.62 of
its MACs) takes a third of the time. Given measured seconds ``t_l(r)`` per layer and option
(``latency=``), the options of a layer are the ranks whose time *and* MACs both fall below those of
every larger option, and the greedy walks the lower convex hull in (time, loss) instead of
(MACs, loss): each step is the one adding the least loss per second saved. It stops, as before, as
soon as the model's MACs fit the budget, so the MACs budget is met exactly as in the plain mode::

    MACs mode:     step = argmin Δloss / ΔMACs        stop when Σ MACs ≤ f · MACs₀
    latency mode:  step = argmin Δloss / Δt           stop when Σ MACs ≤ f · MACs₀
                   (latency_step="macs": Δloss / ΔMACs, over the options measured faster only)

In both modes a hull step may overshoot (a layer jumping from whole to a small rank); afterwards,
while some layer can move back to its next larger option and the model still fits, the move that
removes the most loss is taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError, UnsupportedModelError
from onnxpress.passes.base import PassResult, unique_name
from onnxpress.passes.flops import count_macs

__all__ = [
    "conv_spec",
    "LayerReport",
    "MomentSpec",
    "SplitConvLowRank",
    "SplitGemmLowRank",
    "SplitLowRank",
    "candidate_layers",
    "joint_units",
    "layer_keys",
    "moment_requests",
]

log = logging.getLogger(__name__)

_OPS = ("Gemm", "MatMul", "Conv")


# --------------------------------------------------------------------------------------------
# Shapes and MACs
# --------------------------------------------------------------------------------------------


def layer_keys(graph: gs.Graph) -> dict[int, str]:
    """``id(node) -> key`` for every node: its name, else its first output; repeats get ``#k``.

    The same scheme as :func:`onnxpress.passes.flops.node_key`, so keys index ``count_macs`` too.
    """
    seen: dict[str, int] = {}
    keys: dict[int, str] = {}
    for node in graph.nodes:
        key = node.name or (node.outputs[0].name if node.outputs else node.op)
        if key in seen:
            seen[key] += 1
            key = f"{key}#{seen[key]}"
        else:
            seen[key] = 0
        keys[id(node)] = key
    return keys


# --------------------------------------------------------------------------------------------
# Candidate layers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MomentSpec:
    """Which second moment a layer's data-aware split needs.

    Attributes:
        tensor: the layer's input tensor.
        axis: feature axis for Gemm/MatMul (``-1``, or ``0`` for ``Gemm(transA=1)``); ``None`` for Conv.
        kernel, strides, pads, dilations, auto_pad: Conv patch geometry (im2col); empty for Gemm/MatMul.
    """

    tensor: str
    axis: int | None = -1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"


@dataclasses.dataclass
class _Layer:
    node: gs.Node
    key: str
    op: str
    groups: int
    mats: list[np.ndarray]  # per group, (m_g, n) in float64, y = W x
    positions: int  # output positions per sample
    in_positions: int  # input positions per sample (Tucker's first 1x1 runs there)
    macs: int
    params: int
    spec: MomentSpec
    # a joint unit (siblings reading one input): its nodes, their keys and output rows, in stacking order
    members: tuple[gs.Node, ...] = ()
    member_keys: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.members:
            self.members, self.member_keys, self.rows = (self.node,), (self.key,), (self.mats[0].shape[0],)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What happened to one candidate layer.

    Attributes:
        key: node name (or output name when the node has none).
        op: ``Gemm``, ``MatMul`` or ``Conv``.
        shape: ``(m, n)`` of the weight matrix per group (outputs × input features).
        groups: Conv groups (1 for Gemm/MatMul).
        rank: kept rank per group (``None`` when skipped).
        full_rank: ``min(m, n)``.
        energy: fraction of the energy kept (output energy on the data when data-aware).
        macs_before, macs_after: MACs per sample of this layer.
        params_before, params_after: weight (+bias) elements.
        method: ``svd``, ``whitened-svd`` or ``tucker2``.
        skipped: why the layer was left as it is (``None`` when split).
        members: for a joint unit (``joint=True``: sibling layers reading the same input, split with
            one shared first factor), the keys of its layers; ``key`` is then ``"+".join(members)`` and
            ``shape`` the stacked ``(Σ m_i, n)``. Empty for a single layer.
    """

    key: str
    op: str
    shape: tuple[int, int]
    groups: int
    rank: int | None
    full_rank: int
    energy: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    method: str
    skipped: str | None = None
    members: tuple[str, ...] = ()


def _const(t: gs.Tensor | None) -> bool:
    return isinstance(t, gs.Constant)


def _decline(graph: gs.Graph, node: gs.Node) -> str | None:
    """Why ``node`` cannot be split (None when it can)."""
    if node.op == "MatMul":
        if _const(node.inputs[0]) and not _const(node.inputs[1]):
            return "weight is the left operand of MatMul"
        if not _const(node.inputs[1]):
            return "weight is not a constant"
    elif not _const(node.inputs[1]):
        return "weight is not a constant"
    if _const(node.inputs[0]):
        return "input is a constant"
    w = node.inputs[1]
    if len(w.outputs) > 1:
        return f"weight {w.name!r} is shared with {len(w.outputs)} nodes"
    if w in graph.outputs:
        return "weight is a graph output"
    if not np.issubdtype(w.values.dtype, np.floating):
        return f"weight dtype {w.values.dtype} is not floating point"
    if node.op in ("Gemm", "MatMul") and w.values.ndim != 2:
        return f"weight is {w.values.ndim}-D, not 2-D"
    if not np.isfinite(w.values).all():  # LAPACK's SVD raises on NaN and never returns on inf
        return "weight holds NaN or inf values"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.name and not _const(bias):
        return "bias is not a constant"
    if node.op == "Conv":
        g = int(node.attrs.get("group", 1))
        wv = w.values
        if wv.ndim < 3:
            return "weight rank < 3"
        c_in_g = wv.shape[1]
        if g > 1 and c_in_g == 1:
            return "depthwise conv (one input channel per group: nothing to split)"
    return None


def conv_spec(node: gs.Node, tensor: str, wshape: tuple[int, ...]) -> MomentSpec:
    """A Conv's patch geometry (kernel, strides, pads, dilations, auto_pad) read from its attributes."""
    nd = len(wshape) - 2
    kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", wshape[2:]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1] * nd))
    pads = tuple(int(p) for p in node.attrs.get("pads", [0] * (2 * nd)))
    dil = tuple(int(d) for d in node.attrs.get("dilations", [1] * nd))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return MomentSpec(tensor, None, kernel, strides, pads, dil, auto_pad)


def _collect(graph: gs.Graph, ops: Sequence[str], macs: Mapping[str, int] | None):
    """Candidate layers and (key, op, reason) for declined ones.

    ``macs`` (from ``count_macs``) gives each layer's MACs per sample, hence its number of output
    positions; without it (moment requests only) positions count as 1.
    """
    layers: list[_Layer] = []
    declined: list[tuple[str, str, str]] = []
    keys = layer_keys(graph)
    for node in graph.nodes:
        if node.op not in ops or (node.domain or "") not in ("", "ai.onnx"):
            continue
        key = keys[id(node)]
        reason = _decline(graph, node)
        if reason:
            declined.append((key, node.op, reason))
            log.debug("low_rank declines %s: %s", key, reason)
            continue
        w = node.inputs[1].values.astype(np.float64)
        x = node.inputs[0]
        bias_elems = 0
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias_elems = int(np.prod(node.inputs[2].values.shape))
        if node.op == "Conv":
            g = int(node.attrs.get("group", 1))
            mats = list(w.reshape(g, w.shape[0] // g, -1))
            spec = conv_spec(node, x.name, w.shape)
        else:
            g = 1
            # y = W x: Gemm's B is [N, K] = W with transB, else [K, N] = Wᵀ; MatMul's B is [K, N]
            mats = [w if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w.T]
            axis = 0 if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else -1
            spec = MomentSpec(x.name, axis)
        mg, n = mats[0].shape
        layer_macs = int(macs[key]) if macs is not None else g * mg * n
        positions = max(1, layer_macs // (g * mg * n))
        in_positions = positions
        if node.op == "Conv":
            # Tucker's first 1x1 runs at the input resolution: from the inferred input shape, else
            # (no shape) the output positions times the strides.
            spatial = list(x.shape[2:]) if x.shape is not None and len(x.shape) > 2 else []
            if spatial and all(isinstance(d, int) and d > 0 for d in spatial):
                in_positions = int(np.prod(spatial))
            else:
                in_positions = positions * int(np.prod(spec.strides))
        layers.append(_Layer(node, key, node.op, g, mats, positions, in_positions, layer_macs,
                             w.size + bias_elems, spec))
    return layers, declined


def candidate_layers(graph: gs.Graph, ops: Sequence[str] = _OPS) -> dict[str, gs.Node]:
    """The layers the pass would consider splitting, keyed by :func:`layer_keys` (declined ones left out)."""
    layers, _ = _collect(graph, ops, None)
    return {layer.key: layer.node for layer in layers}


def moment_requests(graph: gs.Graph, ops: Sequence[str] = _OPS) -> dict[str, MomentSpec]:
    """Which input second moment each splittable layer needs, keyed by :func:`layer_key`.

    The API collects these (one observer per distinct spec) and passes the arrays back to the pass
    as ``moments={key: C}``, ``C`` of shape ``(n_total, n_total)`` over the layer's input features
    (for a grouped Conv: all ``C_in · kh · kw`` patch features, in the weight's flattening order).
    """
    layers, _ = _collect(graph, ops, None)
    return {layer.key: layer.spec for layer in layers}


def _sibling_key(lay: _Layer) -> tuple[object, ...] | None:
    """Layers with equal keys can share a first factor (same input, axis, op and first-factor attributes)."""
    if lay.op not in ("Gemm", "MatMul"):
        return None
    attrs = lay.node.attrs
    gemm = (int(attrs.get("transA", 0)), float(attrs.get("alpha", 1.0))) if lay.op == "Gemm" else ()
    return (lay.op, lay.spec.tensor, lay.spec.axis, lay.mats[0].shape[1], *gemm)


def _join(layers: list[_Layer]) -> list[_Layer]:
    """Sibling Gemm/MatMul layers (same input tensor and feature axis) merged into one joint unit each.

    The unit's matrix is the members' weights stacked row-wise, ``W = [W_1; …; W_k]`` (Σ m_i × n); it
    takes the place of its first member in the list, the others are dropped from it.
    """
    by_key: dict[tuple[object, ...], list[_Layer]] = {}
    for lay in layers:
        sib = _sibling_key(lay)
        if sib is not None:
            by_key.setdefault(sib, []).append(lay)
    out: list[_Layer] = []
    for lay in layers:
        sib = _sibling_key(lay)
        group = by_key.get(sib, [lay]) if sib is not None else [lay]
        if len(group) == 1:
            out.append(lay)
        elif group[0] is lay:
            mats = [np.concatenate([g.mats[0] for g in group], 0)]
            out.append(_Layer(
                lay.node, "+".join(g.key for g in group), lay.op, 1, mats, lay.positions, lay.in_positions,
                sum(g.macs for g in group), sum(g.params for g in group), lay.spec,
                tuple(g.node for g in group), tuple(g.key for g in group), tuple(g.mats[0].shape[0] for g in group),
            ))
    return out


def joint_units(graph: gs.Graph, ops: Sequence[str] = _OPS) -> dict[str, tuple[str, ...]]:
    """The joint units ``SplitLowRank(joint=True)`` forms: ``{unit key: member layer keys}`` (2+ members)."""
    layers, _ = _collect(graph, ops, None)
    return {lay.key: lay.member_keys for lay in _join(layers) if len(lay.members) > 1}


# --------------------------------------------------------------------------------------------
# Factorisations
# --------------------------------------------------------------------------------------------


def _sqrt_psd(c: np.ndarray, ridge: float) -> np.ndarray:
    """Symmetric square root of ``C + ridge·(tr C / n)·I`` (negative eigenvalues clipped to 0)."""
    c = (c + c.T) / 2
    vals, vecs = np.linalg.eigh(c)
    vals = np.clip(vals, 0.0, None)
    lam = ridge * max(float(vals.sum()) / len(vals), np.finfo(np.float64).tiny)
    return (vecs * np.sqrt(vals + lam)) @ vecs.T


@dataclasses.dataclass
class _Factors:
    """Per-group SVD of a layer: energy spectrum, and how to build rank-r factors."""

    u: list[np.ndarray]  # left singular vectors (m_g, k)
    s: list[np.ndarray]  # singular values (of W or of W·C^½)
    vt: list[np.ndarray]  # right singular vectors (plain) — unused when whitened
    mats: list[np.ndarray]
    whitened: bool
    rows: tuple[int, ...] = ()  # a joint unit's member row counts (one group): the loss sums their NSRs

    def kept(self, r: int) -> float:
        total = sum(float(np.sum(s**2)) for s in self.s)
        if total == 0.0:
            return 1.0
        return sum(float(np.sum(s[:r] ** 2)) for s in self.s) / total

    def loss(self, r: int) -> float:
        """Noise-to-signal ratio ``dropped / kept`` at rank r; for a joint unit, the sum of its members'.

        Member i owns rows ``R_i`` of the stacked target ``T = U S Vᵀ`` (``W``, or ``W·C^½``); its
        rank-r error is ``Σ_{j>r} s_j² ‖U[R_i, j]‖²``, so each member's NSR comes from the one SVD.
        """
        if len(self.rows) < 2:
            kept = self.kept(r)
            return (1.0 - kept) / max(kept, 1e-12)
        u, s = self.u[0], self.s[0]
        total = 0.0
        start = 0
        for rows in self.rows:
            energy = np.sum(u[start : start + rows] ** 2, 0) * s**2
            start += rows
            whole = float(energy.sum())
            if whole > 0.0:
                kept = float(energy[:r].sum())
                total += (whole - kept) / max(kept, 1e-12 * whole)
        return total

    def factors(self, r: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per group ``A`` (m_g × r) and ``B`` (r × n) with ``A·B`` the best rank-r approximation."""
        a_list, b_list = [], []
        for u, s, vt, w in zip(self.u, self.s, self.vt, self.mats, strict=True):
            ur, sr = u[:, :r], s[:r]
            # Split sqrt(S) into both factors rather than S into one: both factors (and the
            # intermediate activation) then have comparable magnitudes, which keeps float16
            # storage and a later per-tensor int8 QDQ of either factor from losing precision.
            root = np.sqrt(np.where(sr > s[0] * 1e-12 if s.size else sr > 0, sr, 1.0))
            a = ur * root
            b = (ur.T @ w) / root[:, None] if self.whitened else sr[:, None] / root[:, None] * vt[:r]
            a_list.append(a)
            b_list.append(b)
        return a_list, b_list


def _gram_svd(w: np.ndarray, c: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of ``W (C + ridge·(tr C / n)·I)^½`` for a wide ``W`` (m < n).

    ``T Tᵀ = W (C + λI) Wᵀ`` is only m × m: its eigenvectors are ``T``'s left singular vectors and its
    eigenvalues their squared singular values, and that is all the whitened factors use (``A = U_r``,
    ``B = U_rᵀ W``). A classifier after a Flatten (W 10 × 4096) took 20 s in the 4096² ``eigh`` of
    :func:`_sqrt_psd`; this costs two products with C. (The Gram form squares the condition number, so
    the smallest singular values lose relative precision: they only enter the dropped energy, where an
    error of ε·s_1² is nothing.)
    """
    c = (c + c.T) / 2
    lam = ridge * max(float(np.trace(c)) / c.shape[0], np.finfo(np.float64).tiny)
    g = w @ (c @ w.T) + lam * (w @ w.T)
    vals, vecs = np.linalg.eigh((g + g.T) / 2)
    order = np.argsort(vals)[::-1]
    return vecs[:, order], np.sqrt(np.clip(vals[order], 0.0, None))


def _svd(mats: list[np.ndarray], moment: np.ndarray | None, ridge: float) -> _Factors:
    us, ss, vts = [], [], []
    n = mats[0].shape[1]
    for gi, w in enumerate(mats):
        if moment is not None and w.shape[0] < n:  # wide: only U and S are used, from the m x m Gram matrix
            u, s = _gram_svd(w, moment[gi * n : (gi + 1) * n, gi * n : (gi + 1) * n], ridge)
            us.append(u)
            ss.append(s)
            vts.append(np.zeros((0, n)))
            continue
        target = w
        if moment is not None:
            block = moment[gi * n : (gi + 1) * n, gi * n : (gi + 1) * n]
            target = w @ _sqrt_psd(block, ridge)
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        us.append(u)
        ss.append(s)
        vts.append(vt)
    return _Factors(us, ss, vts, mats, moment is not None)


@dataclasses.dataclass
class _Tucker:
    """HOSVD of a Conv weight (groups = 1): orthonormal U_out, U_in and the full core."""

    w: np.ndarray  # (M, C, k...)
    u_out: np.ndarray  # (M, M')
    u_in: np.ndarray  # (C, C')
    core: np.ndarray  # (M', C', k...)
    cum: np.ndarray  # cum[o, i] = energy of core[:o, :i]

    @classmethod
    def of(cls, w: np.ndarray) -> _Tucker:
        m, c = w.shape[:2]
        u_out = np.linalg.svd(w.reshape(m, -1), full_matrices=False)[0]
        u_in = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1), full_matrices=False)[0]
        core = np.einsum("mc...,mo,ci->oi...", w, u_out, u_in)
        e = (core**2).reshape(core.shape[0], core.shape[1], -1).sum(-1)
        cum = np.zeros((e.shape[0] + 1, e.shape[1] + 1))
        cum[1:, 1:] = e.cumsum(0).cumsum(1)
        return cls(w, u_out, u_in, core, cum)

    def ranks(self, r: int) -> tuple[int, int]:
        return min(r, self.core.shape[0]), min(r, self.core.shape[1])

    def kept(self, r: int) -> float:
        r_out, r_in = self.ranks(r)
        total = self.cum[-1, -1]
        return float(self.cum[r_out, r_in] / total) if total > 0 else 1.0


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Choice:
    layer: _Layer
    method: str
    fac: _Factors | _Tucker
    full: int
    rank: int | None = None  # None: keep unsplit
    no_faster_split: bool = False  # latency mode: no rank was measured faster than the whole layer


class SplitLowRank:
    """Split Gemm/MatMul (and Conv) weights into two low-rank factors (see the module docstring).

    Exactly one of ``rank``, ``energy`` or ``flops`` selects the ranks.

    Args:
        rank: the same rank for every layer (capped at full rank; rounded up to ``multiple``).
        energy: keep the smallest rank whose fraction of the energy is at least this (0 < e ≤ 1).
        flops: whole-model MACs budget as a fraction of the model's MACs (0 < f ≤ 1).
        multiple: ranks are multiples of this (kernel efficiency); the last option is full rank.
        moments: input second moments per layer key (see :func:`moment_requests`) for the
            data-aware (whitened) SVD; layers without one get the plain SVD.
        ridge: relative ridge added to each second moment (see the module docstring).
        conv_method: ``"channel"`` (k×k with r outputs + 1×1) or ``"tucker2"`` (1×1, k×k, 1×1).
        only_if_cheaper: skip layers whose split would not reduce MACs (off only for tests).
        ops: op types to consider.
        latency: with ``flops``, measured seconds per layer key and option (``None``: unsplit, else
            the rank; see :func:`onnxpress.lowrank.measure_latency`). The budget is still MACs, but
            the greedy spends it where it saves the most *time* per unit of loss, and a rank is only
            an option if it is faster than every larger one (see the module docstring).
        latency_step: with ``latency``, what the greedy's steps are ranked by: ``"time"`` (least
            loss per second saved) or ``"macs"`` (least loss per MAC saved, as without a table,
            but only among the splits measured faster).
        joint: split sibling Gemm/MatMul layers that read the same input (attention's Q, K, V) as
            one unit: one SVD of their stacked weights, one shared first factor (see the module
            docstring). The unit's key is its members' keys joined by ``+`` (in ``latency`` too).

    After a call, ``report`` holds one :class:`LayerReport` per candidate layer (declined ones too)
    and ``macs`` the model's MACs per sample before and after; the API prints them.
    """

    name = "split_low_rank"
    ops: tuple[str, ...] = _OPS

    def __init__(
        self,
        *,
        rank: int | None = None,
        energy: float | None = None,
        flops: float | None = None,
        multiple: int = 1,
        moments: Mapping[str, np.ndarray] | None = None,
        ridge: float = 1e-3,
        conv_method: str = "channel",
        only_if_cheaper: bool = True,
        ops: Sequence[str] | None = None,
        latency: Mapping[str, Mapping[int | None, float]] | None = None,
        latency_step: str = "time",
        joint: bool = False,
    ) -> None:
        if sum(v is not None for v in (rank, energy, flops)) != 1:
            raise ArgumentError("give exactly one of rank=, energy= or flops=")
        if rank is not None and rank < 1:
            raise ArgumentError(f"rank must be >= 1, got {rank}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ArgumentError(f"energy must be in (0, 1], got {energy}")
        if flops is not None and not 0.0 < flops <= 1.0:
            raise ArgumentError(f"flops must be a fraction in (0, 1], got {flops}")
        if multiple < 1:
            raise ArgumentError(f"multiple must be >= 1, got {multiple}")
        if conv_method not in ("channel", "tucker2"):
            raise ArgumentError(f"conv_method must be 'channel' or 'tucker2', got {conv_method!r}")
        if ridge < 0:
            raise ArgumentError(f"ridge must be >= 0, got {ridge}")
        if latency_step not in ("time", "macs"):
            raise ArgumentError(f"latency_step must be 'time' or 'macs', got {latency_step!r}")
        if latency is not None and flops is None:
            raise ArgumentError("latency= only steers the flops= budget; give flops= too")
        if latency is not None:
            for key, table in latency.items():
                bad = [v for v in table.values() if not (np.isfinite(v) and v > 0)]
                if bad:
                    raise ArgumentError(f"latency for layer {key!r} must be positive finite seconds, got {bad[0]!r}")
        self.rank, self.energy, self.flops = rank, energy, flops
        self.multiple = int(multiple)
        self.moments = dict(moments or {})
        self.ridge = float(ridge)
        self.conv_method = conv_method
        self.only_if_cheaper = only_if_cheaper
        if ops is not None:
            self.ops = tuple(ops)
        self.latency = None if latency is None else {k: dict(v) for k, v in latency.items()}
        self.latency_step = latency_step
        self.joint = bool(joint)
        # plain factorisations kept across calls, keyed by layer key and weight bytes (set to {} to
        # reuse one SVD for many ranks, as measure_latency does); None: compute every call
        self.reuse_factors: dict[tuple[object, ...], object] | None = None
        self.report: tuple[LayerReport, ...] = ()
        self.macs: tuple[int, int] = (0, 0)
        # set by a call whose MACs could not be counted per sample (a symbolic sequence length without a size) and
        # that needed no budget: every MACs figure is then per output position of its layer
        self.macs_per_position = False

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (unsupported layers are declined one by one)."""

    # -- cost model ------------------------------------------------------------------------

    @staticmethod
    def _cost(ch: _Choice, r: int | None) -> int:
        lay = ch.layer
        if r is None:
            return lay.macs
        mg, n = lay.mats[0].shape
        if ch.method == "tucker2":
            assert isinstance(ch.fac, _Tucker)
            r_out, r_in = ch.fac.ranks(r)
            k = int(np.prod(ch.fac.w.shape[2:]))
            c = ch.fac.w.shape[1]
            return lay.in_positions * c * r_in + lay.positions * (r_in * r_out * k + r_out * mg)
        return lay.positions * lay.groups * r * (mg + n)

    def _params(self, ch: _Choice, r: int | None) -> int:
        lay = ch.layer
        if r is None:
            return lay.params
        mg, n = lay.mats[0].shape
        bias = lay.params - lay.groups * mg * n
        if ch.method == "tucker2":
            assert isinstance(ch.fac, _Tucker)
            r_out, r_in = ch.fac.ranks(r)
            c, k = ch.fac.w.shape[1], int(np.prod(ch.fac.w.shape[2:]))
            return c * r_in + r_in * r_out * k + r_out * mg + bias
        return lay.groups * r * (mg + n) + bias

    def _grid(self, full: int) -> list[int]:
        ranks = list(range(self.multiple, full, self.multiple))
        return [*ranks, full]

    def _round(self, r: int, full: int) -> int:
        return min(full, -(-r // self.multiple) * self.multiple)

    # -- rank selection --------------------------------------------------------------------

    def _select(self, choices: list[_Choice], total_macs: int) -> None:
        if self.rank is not None:
            for ch in choices:
                ch.rank = self._round(self.rank, ch.full)
        elif self.energy is not None:
            for ch in choices:
                ch.rank = next((r for r in self._grid(ch.full) if ch.fac.kept(r) >= self.energy - 1e-12), ch.full)
        else:
            self._select_budget(choices, total_macs)
            return
        for ch in choices:
            if self.only_if_cheaper and ch.rank is not None and self._cost(ch, ch.rank) >= ch.layer.macs:
                ch.rank = None

    def _options(self, ch: _Choice) -> list[tuple[int, float, float, int | None]]:
        """A layer's budget options ``(MACs, time, loss, rank)``, unsplit first, each cheaper than the last.

        Without a latency table ``time`` is the MACs. With one, a rank is an option only if it was
        measured and is faster *and* fewer MACs than the option before it: a split that saves MACs
        but not time is never offered.
        """
        lay = ch.layer
        table = None
        if self.latency is not None:
            table = self.latency.get(lay.key)
            if table is None or None not in table:
                raise UnsupportedModelError(
                    f"no latency measured for layer {lay.key!r} (unsplit and per rank); measure every candidate "
                    "layer (onnxpress.lowrank.measure_latency) or select by MACs"
                )
        opts: list[tuple[int, float, float, int | None]] = [
            (lay.macs, float(lay.macs) if table is None else float(table[None]), 0.0, None)
        ]
        for r in reversed(self._grid(ch.full)):
            if table is not None and r not in table:
                continue
            cost = self._cost(ch, r)
            time = float(cost) if table is None else float(table[r])
            if cost < opts[-1][0] and time < opts[-1][1]:
                if isinstance(ch.fac, _Factors):
                    loss = ch.fac.loss(r)
                else:
                    kept = ch.fac.kept(r)
                    loss = (1.0 - kept) / max(kept, 1e-12)
                opts.append((cost, time, loss, r))
        return opts

    def _select_budget(self, choices: list[_Choice], total_macs: int) -> None:
        assert self.flops is not None
        budget = self.flops * total_macs
        options = [self._options(ch) for ch in choices]
        axis = 1 if self.latency is not None and self.latency_step == "time" else 0  # what a step saves
        for ch, opts in zip(choices, options, strict=True):
            ch.no_faster_split = self.latency is not None and len(opts) == 1

        def hull_step(i: int, at: int) -> tuple[float, int] | None:
            """Steepest step from option ``at``: least loss added per unit of time (or MACs) saved."""
            opts = options[i]
            best = None
            for j in range(at + 1, len(opts)):
                saved = opts[at][axis] - opts[j][axis]
                ratio = max(opts[j][2] - opts[at][2], 0.0) / saved
                if best is None or ratio < best[0] - 1e-15:
                    best = (ratio, j)
            return best

        current = [0] * len(choices)
        heap: list[tuple[float, int, int]] = []
        for i in range(len(choices)):
            step = hull_step(i, 0)
            if step:
                heapq.heappush(heap, (step[0], i, step[1]))
        total = float(total_macs)
        while total > budget and heap:
            _, i, j = heapq.heappop(heap)
            total -= options[i][current[i]][0] - options[i][j][0]
            current[i] = j
            step = hull_step(i, j)
            if step:
                heapq.heappush(heap, (step[0], i, step[1]))
        # The hull steps can jump past the budget (a layer going from whole to a small rank at once):
        # give back, one option at a time, the larger rank that removes the most loss while the
        # model still fits the budget.
        while total <= budget:
            best = None
            for i, at in enumerate(current):
                if at == 0:
                    continue
                added = options[i][at - 1][0] - options[i][at][0]
                gain = options[i][at][2] - options[i][at - 1][2]
                if total + added <= budget and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, i, added)
            if best is None:
                break
            _, i, added = best
            current[i] -= 1
            total += added
        if total > budget + 0.5:
            floor = total / total_macs
            how = (
                "with only the splits that were measured faster" if self.latency is not None
                else f"splitting every eligible layer at the smallest rank ({self.multiple})"
            )
            raise UnsupportedModelError(
                f"MACs budget {self.flops:.3f} of the model cannot be met: {how} leaves {floor:.3f}; "
                "raise the budget" + (", select by MACs" if self.latency is not None
                                      else " or lower --multiple" if self.multiple > 1 else "")
            )
        for ch, opts, at in zip(choices, options, current, strict=True):
            ch.rank = opts[at][3]

    def _cached(self, lay: _Layer, method: str, make: Callable[[], Any]) -> Any:
        """``make()``, or the factors of an earlier call on the same weights when ``reuse_factors`` is set."""
        if self.reuse_factors is None:
            return make()
        digest = hashlib.sha256()
        for node in lay.members:
            digest.update(np.ascontiguousarray(node.inputs[1].values).tobytes())
        w = lay.node.inputs[1].values
        key = (lay.key, method, lay.mats[0].shape, str(w.dtype), digest.hexdigest())
        if key not in self.reuse_factors:
            self.reuse_factors[key] = make()
        return self.reuse_factors[key]

    # -- rewrite ---------------------------------------------------------------------------

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Choose ranks, split the chosen layers, and record :attr:`report` and :attr:`macs`."""
        self.macs_per_position = False
        try:
            macs: dict[str, int] | None = count_macs(graph)
        except UnsupportedModelError as exc:
            if self.flops is not None or self.latency is not None:
                raise
            # rank / energy choose each layer by itself, and whether a split saves MACs is the same per output
            # position as per sample (so `lowrank --energy` on a BERT export with a dynamic sequence axis needs no
            # --dim); only the totals lose their meaning, and the report says so
            log.info("MACs counted per output position: %s", exc)
            macs, self.macs_per_position = None, True
        layers, declined = _collect(graph, self.ops, macs)
        total = sum(macs.values()) if macs is not None else sum(lay.macs for lay in layers)
        if self.joint:
            layers = _join(layers)
        notes = [f"{key}: kept ({why})" for key, _, why in declined]
        choices: list[_Choice] = []
        for lay in layers:
            mg, n = lay.mats[0].shape
            # a joint unit's members read the same tensor on the same axis: any member's moment is the unit's
            moment = next((self.moments[k] for k in lay.member_keys if k in self.moments), None)
            if moment is not None:
                need = lay.groups * n
                if moment.shape != (need, need):
                    raise UnsupportedModelError(
                        f"second moment for layer {lay.key!r} has shape {moment.shape}, expected {(need, need)}; "
                        "recollect statistics on this model"
                    )
                if not np.all(np.isfinite(moment)):
                    raise UnsupportedModelError(f"second moment for layer {lay.key!r} is not finite")
            if lay.op == "Conv" and self.conv_method == "tucker2":
                if lay.groups == 1:
                    if moment is not None:
                        notes.append(f"{lay.key}: tucker2 is plain (weight energy) only; its moment is not used")
                    tucker = self._cached(lay, "tucker2", lambda lay=lay: _Tucker.of(
                        lay.node.inputs[1].values.astype(np.float64)))
                    choices.append(_Choice(lay, "tucker2", tucker, max(tucker.core.shape[:2])))
                    continue
                notes.append(f"{lay.key}: grouped conv gets the channel split, not tucker2")
            fac = (_svd(lay.mats, moment, self.ridge) if moment is not None
                   else self._cached(lay, "svd", lambda lay=lay: _svd(lay.mats, None, self.ridge)))
            if len(lay.members) > 1:
                fac.rows = lay.rows
            choices.append(_Choice(lay, "whitened-svd" if moment is not None else "svd", fac, min(mg, n)))
        self._select(choices, total)

        reports: list[LayerReport] = []
        split = 0
        for key, op, why in declined:
            reports.append(LayerReport(key, op, (0, 0), 1, None, 0, 1.0, 0, 0, 0, 0, "-", why))
        for ch in choices:
            lay = ch.layer
            mg, n = lay.mats[0].shape
            members = lay.member_keys if len(lay.members) > 1 else ()
            if ch.rank is None:
                bound = mg * n / (mg + n)
                why = (
                    f"a split would not reduce MACs (rank >= m·n/(m+n) = {bound:.1f})"
                    if self.only_if_cheaper and self.flops is None
                    else "no split was measured faster than the whole layer" if ch.no_faster_split
                    else "left whole by the MACs budget"
                )
                notes.append(f"{lay.key}: kept ({why})")
                reports.append(LayerReport(lay.key, lay.op, (mg, n), lay.groups, None, ch.full, 1.0, lay.macs,
                                           lay.macs, lay.params, lay.params, ch.method, why, members))
                continue
            if ch.method == "tucker2":
                self._rewrite_tucker(graph, ch)
            else:
                self._rewrite(graph, ch)
            split += 1
            reports.append(LayerReport(
                lay.key, lay.op, (mg, n), lay.groups, ch.rank, ch.full, ch.fac.kept(ch.rank), lay.macs,
                self._cost(ch, ch.rank), lay.params, self._params(ch, ch.rank), ch.method, None, members,
            ))
        after = total - sum(r.macs_before - r.macs_after for r in reports)
        self.report = tuple(reports)
        self.macs = (total, after)
        stats = {"layers_split": split, "layers_kept": len(reports) - split, "macs_before": total, "macs_after": after}
        return PassResult(graph, split > 0, stats, tuple(notes))

    @staticmethod
    def _rewrite(graph: gs.Graph, ch: _Choice) -> None:
        lay, node = ch.layer, ch.layer.node
        assert isinstance(ch.fac, _Factors) and ch.rank is not None
        a_list, b_list = ch.fac.factors(ch.rank)
        w = node.inputs[1]
        dtype = w.values.dtype
        # a joint unit's shared nodes are named after its first member (``<key>_lowrank_joint…``), so
        # name prefixes still tie every factor node to a member layer's key
        base = lay.member_keys[0].replace("/", "_").strip("_") or "layer"
        stem = f"{base}_lowrank_joint" if len(lay.members) > 1 else f"{base}_lowrank"
        mid = gs.Variable(unique_name(graph, stem), dtype=dtype)
        first_w = unique_name(graph, f"{w.name}_lowrank_in")
        second_w = unique_name(graph, f"{w.name}_lowrank_out")
        if lay.op == "Conv":
            g = lay.groups
            c_in_g, kernel = w.values.shape[1], w.values.shape[2:]
            b = np.concatenate([bg.reshape(ch.rank, c_in_g, *kernel) for bg in b_list], 0)
            a = np.concatenate(a_list, 0).reshape(a_list[0].shape[0] * g, ch.rank, *([1] * len(kernel)))
            first = gs.Node("Conv", unique_name(graph, f"{base}_lowrank_conv"),
                            attrs={k: v for k, v in node.attrs.items()},
                            inputs=[node.inputs[0], gs.Constant(first_w, b.astype(dtype))], outputs=[mid])
            first.attrs["kernel_shape"] = [int(k) for k in kernel]
            bias = list(node.inputs[2:3])
            node.attrs = {"group": g, "kernel_shape": [1] * len(kernel)}
            node.inputs.clear()
            node.inputs.extend([mid, gs.Constant(second_w, a.astype(dtype)), *bias])
        else:
            # y = A (B x); stored as [K, r] and [r, N] (row-vector form). A joint unit shares B (one
            # first node) and each member keeps its own rows of A as its second factor (and its bias).
            (a,), (b,) = a_list, b_list
            first_attrs = {}
            if lay.op == "Gemm":
                first_attrs = {"transA": int(node.attrs.get("transA", 0)), "alpha": float(node.attrs.get("alpha", 1.0))}
            first = gs.Node(lay.op, unique_name(graph, f"{stem}_in"), attrs=first_attrs,
                            inputs=[node.inputs[0], gs.Constant(first_w, np.ascontiguousarray(b.T).astype(dtype))],
                            outputs=[mid])
            start = 0
            for member, rows in zip(lay.members, lay.rows, strict=True):
                name = second_w if member is node else unique_name(graph, f"{member.inputs[1].name}_lowrank_out")
                if lay.op == "Gemm":
                    member.attrs = {"beta": float(member.attrs.get("beta", 1.0))}
                member.inputs[0] = mid
                member.inputs[1] = gs.Constant(name, np.ascontiguousarray(a[start : start + rows].T).astype(dtype))
                start += rows
        graph.nodes.append(first)

    @staticmethod
    def _rewrite_tucker(graph: gs.Graph, ch: _Choice) -> None:
        lay, node = ch.layer, ch.layer.node
        fac = ch.fac
        assert isinstance(fac, _Tucker) and ch.rank is not None
        r_out, r_in = fac.ranks(ch.rank)
        w = node.inputs[1]
        dtype = w.values.dtype
        nd = w.values.ndim - 2
        ones = [1] * nd
        base = lay.key.replace("/", "_").strip("_") or "layer"
        u_in = fac.u_in[:, :r_in].T.reshape(r_in, -1, *ones)
        core = fac.core[:r_out, :r_in]
        u_out = fac.u_out[:, :r_out].reshape(-1, r_out, *ones)
        t1 = gs.Variable(unique_name(graph, f"{base}_tucker_in"), dtype=dtype)
        t2 = gs.Variable(unique_name(graph, f"{base}_tucker_core"), dtype=dtype)
        # A 1x1 conv without bias maps zero padding to zero, so the core conv may pad its input.
        w_in = gs.Constant(unique_name(graph, f"{w.name}_tucker_in"), u_in.astype(dtype))
        n1 = gs.Node("Conv", unique_name(graph, f"{base}_tucker_in"), attrs={"kernel_shape": ones},
                     inputs=[node.inputs[0], w_in], outputs=[t1])
        n2 = gs.Node("Conv", unique_name(graph, f"{base}_tucker_core"), attrs=dict(node.attrs),
                     inputs=[t1, gs.Constant(unique_name(graph, f"{w.name}_tucker_core"), core.astype(dtype))],
                     outputs=[t2])
        n2.attrs["kernel_shape"] = [int(k) for k in w.values.shape[2:]]
        bias = list(node.inputs[2:3])
        node.attrs = {"kernel_shape": ones}
        node.inputs.clear()
        node.inputs.extend([t2, gs.Constant(unique_name(graph, f"{w.name}_tucker_out"), u_out.astype(dtype)), *bias])
        graph.nodes.extend([n1, n2])


class SplitGemmLowRank(SplitLowRank):
    """:class:`SplitLowRank` restricted to Gemm and MatMul (2-D constant weight)."""

    name = "split_gemm_low_rank"
    ops = ("Gemm", "MatMul")


class SplitConvLowRank(SplitLowRank):
    """:class:`SplitLowRank` restricted to Conv (channel split, or Tucker-2 with ``conv_method``)."""

    name = "split_conv_low_rank"
    ops = ("Conv",)
