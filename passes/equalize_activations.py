"""Activation-range equalization: even out the channels of a per-tensor activation grid (data-aware).

onnxruntime's integer Conv/Gemm kernels take one scale per activation tensor. When the channels of
an activation span very different ranges (MobileNet's ReLU6 outputs: channel maxima from 0.75 to
6.0 in one tensor), the small channels use a few of the 256 levels. Per-channel activation scales
would fix that (+4 dB logit SQNR on the reference MobileNet, activations alone), but no integer
kernel takes them. This pass moves the spread into the weights instead, for two layers joined by
elementwise activations (the pairs of :func:`onnxpress.passes.equalize.find_pairs`)::

    X -> Conv1(W1, b1) -> a -> ReLU6 -> Conv2(W2) -> Y
      ==>  X -> Conv1(W1 / s, b1 / s) -> a / s -> ReLU6 -> Conv2(W2 * s) -> Y        s_c <= 1

with ``t_c`` the largest ``|value|`` of channel ``c`` of the second layer's input on the calibration
data and ``T = max_c t_c``::

    s_c = (t_c / T) ** alpha

so channel ``c`` is stretched towards the largest one (``alpha = 1``: every channel ends at ``T``).

What it costs. Scaling the first layer's output channels is free for per-channel weight quantization
(each row has its own scale; the int32 bias follows). Scaling the second layer's input channels is
free too when each of its output channels reads one input channel (a depthwise conv: ``alpha = 1``
there); otherwise it unbalances the second layer's weight rows, and ``alpha = strength`` (default
0.5) trades the two. Per-tensor weights would pay on both sides: :func:`onnxpress.quantize` refuses
the combination.

Why the ReLU6 bound stays. A ReLU is positive-homogeneous, so the rewrite is exact through it. A
Clip(0, hi) is not: the exact bound of channel ``c`` after scaling is ``hi / s_c >= hi``. The pass
leaves the bound at ``hi``, which clips a stretched channel earlier than exact: at ``hi * s_c`` in its
original units, which is at or above its calibrated maximum ``t_c`` (``t_c / s_c <= T <= hi``), so
never on the calibration data. And the QDQ model that follows clips the Clip's output to its
calibrated range ``[0, hi'] ⊆ [0, hi]`` anyway, so its outputs are those of the exact per-channel
bounds: exact for the quantized model, without the per-channel Min node (onnxruntime would run it
in float between every pair) that ``EqualizeCrossLayer(clip="split")`` needs. A Clip whose lower
bound is not 0 is declined (its negative side could make ``T`` exceed ``hi``). Min/Max nodes that
already hold per-channel bounds are rescaled exactly.

Measured (logit SQNR on the digits test split, ``onnxpress.quantize`` without -> with
``equalize="activations"``, everything else as stated; 2026-12-02):

    settings                        mobilenet          resnet             concat
    defaults (mse, 500 samples)     38.08 -> 39.47     43.47 -> 43.75     46.70 -> 46.64
    method minmax                   37.63 -> 39.62     44.53 -> 45.07     46.33 -> 46.74
    method percentile               37.38 -> 39.62     37.68 -> 39.54     45.16 -> 45.99
    activations int8 (symmetric)    32.26 -> 34.63     40.87 -> 41.24     41.13 -> 41.24
    max_samples 128                 38.10 -> 38.94     42.85 -> 43.40     46.39 -> 46.89
    max_samples 32                  37.94 -> 35.05     40.65 -> 38.74     45.91 -> 45.36
    no bias correction, rtn         34.93 -> 33.97     37.85 -> 37.09     41.23 -> 41.36

So it is not a default. It stretches a channel to the range of the largest one as far as its calibrated
maximum allows; a maximum measured on few samples underestimates the channel's tail, which the int8
grid then clips (32 samples: -2.9 dB on MobileNet), and the clipping shifts means that bias correction
(on by default) would otherwise remove. On twelve other architectures (``bench/architectures.py``'s
networks, default settings) it changed the lowest output SQNR by -0.00 to +0.61 dB; nine have no pair
(SiLU, HardSwish, GELU and PReLU are not handled). Check the result with ``onnxpress validate``.

Written by hand (our edge): no library equalizes activation ranges across ONNX layer pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.errors import ArgumentError
from onnxpress.passes.base import PassResult
from onnxpress.passes.equalize import Pair, _clip_bounds, _scale_pair, find_pairs, in_channels

__all__ = ["MIN_SAMPLES", "EqualizeActivations", "activation_pairs"]

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.5
"""``alpha`` where the second layer mixes input channels (see the module docstring).

Measured with this pass at 0.5 (logit SQNR gain over the default quantize, test split): mobilenet +1.39 dB,
resnet +0.28, concat -0.07. An early version that also stretched pairs left float read, on mobilenet,
+1.19 / +1.38 / +0.93 dB at 0.25 / 0.5 / 1.0, resnet +0.52 at 0.25 and 0.5, concat +0.12 / -0.09."""

MIN_SAMPLES = 128
"""Fewest calibration samples the channel maxima are trusted from: below it ``onnxpress.quantize`` warns, and
``onnxpress.optimize`` tries the pass only on held-out evaluation data. MobileNet, held-out logit SQNR without ->
with: 38.10 -> 38.94 dB at 128 samples, 37.94 -> 35.05 at 32, 36.37 -> 17.05 at 4."""

MIN_SCALE = 1.0 / 64
"""Smallest ``s_c``: a channel that is nearly always zero is stretched at most 64-fold (its weights in
the second layer shrink as much)."""


def _mixes_channels(node: gs.Node) -> bool:
    """True unless every output channel of ``node`` reads one input channel (a depthwise conv)."""
    if node.op != "Conv":
        return True
    return int(node.inputs[1].values.shape[1]) != 1


def _clip_reason(pair: Pair) -> str | None:
    """Why a Clip between the layers cannot keep its bound (None when every Clip can)."""
    for node in pair.between:
        if node.op != "Clip":
            continue
        lo, hi = _clip_bounds(node)
        if lo != 0.0 or (hi is not None and hi <= 0.0):
            low = "no lower bound" if lo is None or lo <= -1e38 else f"lower bound {lo:g}"
            return f"{node.name or 'Clip'} has {low}, not a Clip(0, hi) (ReLU6-like)"
    return None


def activation_pairs(graph: gs.Graph) -> tuple[list[Pair], list[str]]:
    """The layer pairs this pass can rescale, and notes on the candidates it declines.

    The tensor of a pair's statistics is ``pair.second.inputs[0]`` (the second layer's input).
    """
    pairs, notes = find_pairs(graph, clip="split")  # "split" only admits Clip pairs; nothing is rewritten here
    kept = []
    for pair in pairs:
        why = _clip_reason(pair)
        if why:
            notes.append(f"{pair.describe()}: not equalized ({why})")
            continue
        kept.append(pair)
    return kept, notes


class EqualizeActivations:
    """Stretch each layer pair's activation channels towards the largest one (module docstring).

    Args:
        absmax: ``{tensor name: per-channel max |x|}`` of each pair's activation (the second layer's
            input, channels on axis 1 for Conv and on the last axis for Gemm), from calibration.
        strength: ``alpha`` where the second layer mixes input channels (``1`` where it does not).
        min_scale: lower bound on ``s_c``.
        only: the activations to stretch (``None``: every pair's). ``onnxpress.quantize`` passes those its
            QDQ pass will quantize: where both layers stay float, stretching buys nothing, and the kept Clip
            bound would change the float model above the calibrated ranges.
    """

    name = "equalize_activations"

    def __init__(self, absmax: Mapping[str, np.ndarray], *, strength: float = DEFAULT_STRENGTH,
                 min_scale: float = MIN_SCALE, only: Iterable[str] | None = None) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ArgumentError(f"strength must be in [0, 1], not {strength}")
        if not 0.0 < min_scale <= 1.0:
            raise ArgumentError(f"min_scale must be in (0, 1], not {min_scale}")
        self.absmax = {k: np.asarray(v, np.float64).reshape(-1) for k, v in absmax.items()}
        self.strength = strength
        self.min_scale = min_scale
        self.only = None if only is None else frozenset(only)

    def requires(self, graph: gs.Graph) -> None:
        """No preconditions (pairs without statistics are declined one by one)."""

    def scales(self, pair: Pair) -> np.ndarray | None:
        """``s`` for one pair, or None when it has no usable statistics."""
        t = self.absmax.get(pair.second.inputs[0].name)
        if t is None or t.size != in_channels(pair.second) or not np.all(np.isfinite(t)) or t.max() <= 0:
            return None
        alpha = self.strength if _mixes_channels(pair.second) else 1.0
        s = np.ones_like(t)
        live = t > 0  # a channel that is always zero stays as it is
        s[live] = np.maximum((t[live] / t.max()) ** alpha, self.min_scale)
        return s

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Rescale every pair with statistics."""
        pairs, notes = activation_pairs(graph)
        done = 0
        for pair in pairs:
            if self.only is not None and pair.second.inputs[0].name not in self.only:
                notes.append(f"{pair.describe()}: not equalized (its activation gets no calibrated int8 range: it "
                             "stays float or has a range override)")
                continue
            s = self.scales(pair)
            if s is None:
                notes.append(f"{pair.describe()}: not equalized (no calibration statistics for its activation)")
                continue
            _scale_pair(pair, s)
            done += 1
            log.debug("equalized activations of %s (median stretch %.2fx)", pair.describe(), float(np.median(1 / s)))
        stats = {"pairs": done, "declined": len(notes)}
        return PassResult(graph, bool(done), stats, tuple(notes))
