"""What a BatchNormalization says about the tensors after it, without data (Nagel et al. 2019, §4).

A BatchNormalization in inference mode, ``y = γ (x − μ) / sqrt(σ² + ε) + β``, whose running statistics
(μ, σ²) describe the data, makes each channel of its output roughly ``y_c ~ N(β_c, γ_c²)``. Two uses
of that, both read on the graph **before** ``FoldBatchNorm`` (which gives the folded layer the BN's
output name, so the keys stay valid after cleanup):

* **analytic bias correction** — the mean of a layer's input, E[x], through the activation between
  the BN and the layer (rectified-Gaussian means; ``m = β − a``, ``s = |γ|``)::

      identity:        E[y]             = β
      Relu:            E[max(y, 0)]     = r(β)              r(m) = m Φ(m / s) + s φ(m / s)
      Clip(lo, hi):    E[clip(y, lo, hi)] = lo + r(β − lo) − r(β − hi)

  keyed by the tensor the layer reads, for ``CorrectBias`` (``b' = b + (W − Q(W)) E[x]``);
* **high-bias absorption floors** — ``y_c ≥ β_c − k |γ_c|`` for all but Φ(−k) of the values
  (k = 3: 0.13%), for ``AbsorbHighBias``.

Pure graph analysis: no rewrite, no inference.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError

__all__ = ["activation_means", "bn_moments", "preactivation_floors", "rectified_mean"]

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _const(t: object) -> np.ndarray | None:
    return np.asarray(t.values, np.float64) if isinstance(t, gs.Constant) else None


def bn_moments(graph: gs.Graph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{BN output name: (β, |γ|)}`` for every inference-mode BatchNormalization with constant parameters."""
    out = {}
    for node in graph.nodes:
        if node.op != "BatchNormalization" or int(node.attrs.get("training_mode", 0)) or len(node.inputs) < 5:
            continue
        gamma, beta = _const(node.inputs[1]), _const(node.inputs[2])
        if gamma is None or beta is None or gamma.shape != beta.shape or gamma.ndim != 1:
            continue
        if not (np.all(np.isfinite(gamma)) and np.all(np.isfinite(beta))):
            continue
        out[node.outputs[0].name] = (beta, np.abs(gamma))
    return out


def rectified_mean(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E[max(z, 0)] for z ~ N(m, s²), elementwise; ``max(m, 0)`` where s = 0."""
    m, s = np.broadcast_arrays(np.asarray(m, np.float64), np.asarray(s, np.float64))
    out = np.maximum(m, 0.0)
    pos = s > 0
    if np.any(pos):
        u = m[pos] / s[pos]
        cdf = 0.5 * (1.0 + np.array([math.erf(v / _SQRT2) for v in u]))
        pdf = np.exp(-0.5 * u * u) / _SQRT2PI
        out[pos] = m[pos] * cdf + s[pos] * pdf
    return out


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """Scalar (lo, hi) of a Clip, from its inputs (opset >= 11) or attributes; None if not constant."""
    bounds = [float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))]
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i].name:
            v = _const(node.inputs[i])
            if v is None or v.size != 1:
                return None
            bounds[i - 1] = float(v.reshape(()))
    return bounds[0], bounds[1]


def activation_means(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Per-channel E[x] of every BN output and of a Relu / Clip reading it (rectified-Gaussian means).

    Keys are tensor names; a layer reading one of them can be bias-corrected without data.
    """
    means = {}
    tensors = graph.tensors()
    for name, (beta, s) in bn_moments(graph).items():
        means[name] = beta.copy()
        tensor = tensors.get(name)
        for consumer in tensor.outputs if tensor is not None else ():
            if consumer.inputs[0] is not tensor or not consumer.outputs:
                continue
            if consumer.op == "Relu":
                means[consumer.outputs[0].name] = rectified_mean(beta, s)
            elif consumer.op == "Clip":
                bounds = _clip_bounds(consumer)
                if bounds is None:
                    continue
                lo, hi = bounds
                upper = rectified_mean(beta - hi, s) if math.isfinite(hi) else 0.0
                if math.isfinite(lo):
                    means[consumer.outputs[0].name] = lo + rectified_mean(beta - lo, s) - upper
                else:
                    means[consumer.outputs[0].name] = beta - upper
    return means


def preactivation_floors(graph: gs.Graph, k: float = 3.0) -> dict[str, np.ndarray]:
    """``{BN output name: β − k |γ|}``: per-channel values the BN output falls below with probability Φ(−k)."""
    if not k > 0:
        raise ArgumentError(f"k must be > 0 standard deviations, got {k!r}")
    return {name: beta - k * s for name, (beta, s) in bn_moments(graph).items()}
