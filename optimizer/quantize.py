"""``onnxpress.quantize``: calibrate, insert QDQ (int8) or pack 4-bit weights, check and save.

    model --normalise--> opset >= 13, Constant weights as initializers
          --cleanup-->   constants and BatchNormalization folded
          --calibrate--> CalibrationTable (or the table given)
          --InsertQDQ--> int8 weights per channel, uint8 (or int8) activations, int32 biases
    or    --QuantizeWeightsInt4--> 4-bit MatMul/Gemm weights (weight-only; with calibration data the
                                   rounding is GPTQ on each layer's input second moment E[x xᵀ])
    mixed (int4_layers=L):  --QuantizeWeightsInt4(only L)--> --calibrate--> --InsertQDQ-->
          layers in L run MatMulNBits (float activations, 4-bit weights); InsertQDQ leaves them
          float (it does not know MatMulNBits) and quantizes the rest to int8 as above:
          X ─ Q/DQ ─ Gemm(W8) ─ Q/DQ ─ MatMulNBits(W4, L) ─ Q/DQ ─ ...

The result says what was quantized, what stayed float and why, and the sizes before and after.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

import onnx

from onnxpress.calibration.readers import accepts_infinite_inputs
from onnxpress.calibration.table import CalibrationTable
from onnxpress.errors import CalibrationError, OnnxpressError, UnsupportedModelError, check_argument_types
from onnxpress.model_io import (
    ModelSource,
    check_model,
    check_output_path,
    infer_shapes,
    infer_shapes_thoroughly,
    is_large,
    load_model,
    model_bytes,
    normalize_model,
    refuse_quantized,
    save_model,
)
from onnxpress.passes.codebook import RECURRENT_OPS, WEIGHT_INPUTS
from onnxpress.passes.dynamic_quant import QuantizeDynamic, QuantizeLSTMDynamic
from onnxpress.passes.einsum import EinsumToMatMul
from onnxpress.passes.flatten_tokens import FlattenTokens
from onnxpress.passes.flops import unique_keys
from onnxpress.passes.fold import ShareConstants, ShareTransposedConstants
from onnxpress.passes.fuse_attention import FuseAttention
from onnxpress.passes.global_pool import ReduceMeanToGlobalPool
from onnxpress.passes.hard_activations import IntegerHardActivations
from onnxpress.passes.int4_storage import PackInt4Weights
from onnxpress.passes.leading_mean import LeadingMeanAsMatMul
from onnxpress.passes.matmul_bias import MatMulBiasToOutputRank
from onnxpress.passes.matmul_to_gemm import MatMulAddToGemm
from onnxpress.passes.pad_input_channels import PadInputChannels
from onnxpress.passes.prelu import RewritePRelu
from onnxpress.passes.qdq import (
    ACTIVATION_TYPES,
    FOUR_BIT_MIN_ELEMENTS,
    WEIGHTED_OPS,
    CompactQDQ,
    InsertQDQ,
    NodeDecision,
    Selection,
    TensorOverride,
)
from onnxpress.passes.quantized_attention import FuseQuantizedAttention
from onnxpress.passes.weight_only import INT4_METHODS, QuantizeWeightsInt4, StoreConstantsInt8
from onnxpress.pipeline import PipelineResult, attention_passes, cleanup_passes, import_graph, run_passes
from onnxpress.precision import half_precision_layers, store_float16, upcast_float16
from onnxpress.range_search import METHODS as AUTO_METHODS
from onnxpress.range_search import RangeSearch, scoring_feeds, search_ranges

__all__ = [
    "BIAS_CORRECTION_SAMPLES", "DEFAULT_METHOD", "GPTQ_AUTO_FLOPS", "GPTQ_MEMORY_BYTES", "GPTQ_ROWS_PER_SAMPLE",
    "GPTQ_SAMPLES",
    "INT8_METHODS", "QuantizeResult", "default_int8_method", "gptq_moments", "quantize",
]

log = logging.getLogger(__name__)

DEFAULT_METHOD = "mse"
"""Default calibration method (see bench/quantize.py for the comparison that chose it)."""

WEIGHT_TYPES = ("int8", "int4")

INT4_BLOCK_SIZE = 64
"""Default rows per scale block of int4 weights (``block_size``)."""

INT8_METHODS = ("rtn", "gptq")

GPTQ_SAMPLES = 128
"""Calibration samples whose layer inputs give ``int8_method="gptq"`` its second moments."""

CONSTANTS_INT8_MIN_SIZE = 1024
"""Other float constants of at least this many values (token tables, positional embeddings) are stored int8."""

GPTQ_ROWS_PER_SAMPLE = 32
"""Rows (conv output positions, tokens) of each sample that enter the GPTQ input moments, evenly
spaced: with all of them a 224x224 ResNet-18's moments took 48 s for 64 samples."""

GPTQ_AUTO_FLOPS = 40e9
"""By default (``int8_method=None``) GPTQ runs when its input moments cost at most this many multiply-adds
(``advanced.moment_flops``): 0.3-9e9 on the reference models (GPTQ adds 0.2-1.6 s there), 2.3e10 on a
4-layer BERT-style encoder (d = 256, 32 tokens counted for its dynamic sequence), 3.8e11 on a 224x224
ResNet-18, where GPTQ took 85 s beside 20 s for the rest of quantize; such models are rounded to nearest
unless ``int8_method="gptq"`` asks for it."""

GPTQ_MEMORY_BYTES = 1 << 30
"""Memory the GPTQ input moments may take together (float64 ``K x K`` per layer: a 4096-wide layer
takes 128 MB); layers past it, in graph order, are rounded to nearest (a warning, and the CLI's
"N of M weights GPTQ-rounded", say how many)."""

BIAS_CORRECTION_SAMPLES = 128
"""Calibration samples bias correction reads (one pass per corrected layer). On the reference models
128 samples reach within 0.3 dB of 512 (resnet 41.63 vs 41.91, mobilenet 37.87 vs 37.87, concat 42.18
vs 42.27, transformer 36.54 vs 36.60 dB logit SQNR) at a quarter of the passes."""


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize`` produced.

    Attributes:
        model: the quantized model.
        output: where it was written (None when not asked).
        quantized: nodes that now run on quantized tensors.
        kept_float: nodes left in float, each with the reason.
        excluded_tensors: tensors calibration could not range (name -> reason).
        table: the calibration table used (None for weight-only int4).
        size_before: serialized bytes of the input model.
        size_after: serialized bytes of the result.
        stats: pass counters (``"insert_qdq.nodes_quantized"``, ...).
        notes: why the float rewrites asked for (``equalize``, ``smoothquant``) declined what they
            declined, one line each, prefixed by the pass name (``"smoothquant: <tensor>: not smoothed (...)"``),
            and attention that looked fusable but stays as the graph's ops (``"fuse_attention: <softmax>: ..."``).
    """

    model: onnx.ModelProto
    output: Path | None
    quantized: tuple[NodeDecision, ...]
    kept_float: tuple[NodeDecision, ...]
    excluded_tensors: dict[str, str]
    table: CalibrationTable | None
    size_before: int
    size_after: int
    stats: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def size_ratio(self) -> float:
        """size_after / size_before."""
        return self.size_after / self.size_before


def _as_selection(exclude: Selection | Iterable[str]) -> Selection:
    if isinstance(exclude, Selection):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    try:
        return Selection.from_strings(exclude)
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None


def _check_override_keys(ovs: Mapping[str, TensorOverride], constants: set[str]) -> None:
    """Refuse override keys the tensor does not take (they changed nothing, without a word).

    A weight (a constant) takes ``per_channel`` only: its int8 scale comes from its values, symmetric; an
    activation takes ``dtype``, ``range`` and ``method``, one scale per tensor.

    Raises:
        OnnxpressError: naming each tensor and key.
    """
    bad = []
    for name, ov in ovs.items():
        if name in constants:
            keys = [k for k in ("range", "method") if getattr(ov, k) is not None] + (["dtype"] if ov.dtype else [])
            if keys:
                bad.append(f"{name!r} is a weight and takes per_channel only, not {', '.join(keys)}"
                           + (" (to keep its layer float, exclude the layer: --exclude NODE)" if ov.dtype == "float"
                              else ""))
        elif ov.per_channel is not None:
            bad.append(f"{name!r} is an activation (one scale per tensor) and takes dtype, range and method, "
                       "not per_channel")
    if bad:
        raise OnnxpressError(f"overrides (--override) that would change nothing: {'; '.join(bad[:3])}; drop them")


def _check_layers_not_excluded(models: Sequence[onnx.ModelProto], selection: Selection, int4_layers: Sequence[str],
                               codebook_layers: Sequence[str], w4a8_layers: Sequence[str] = ()) -> None:
    """Refuse layers named for int4, codebook or W4A8 weights that ``exclude`` keeps float (by name, op:, re:).

    Raises:
        OnnxpressError: naming the layers, the option and why the exclusion takes them.
    """
    ops = {n.name or n.output[0]: n.op_type for m in models for n in m.graph.node}
    for option, flag, names in (("int4_layers", "--int4-layers", int4_layers),
                                ("codebook_layers", "--codebook-layers", codebook_layers),
                                ("w4a8_layers", "--w4a8-layers", w4a8_layers)):
        both = {name: why for name in names if (why := selection.reason_of(name, ops.get(name, "")))}
        if both:
            first = next(iter(both))
            raise OnnxpressError(f"layers {sorted(both)[:5]} are in {option} ({flag}) and kept float by exclude "
                                 f"(--exclude; {first}: {both[first]}): keep one")


def _check_selection(models: Sequence[onnx.ModelProto], selection: Selection) -> None:
    """Refuse excluded node names that match no node of ``models`` (the model as given and cleaned).

    A typo would quantize the layer the user meant to keep float. An op type the model lacks is fine
    (one exclude list for many models), and so is a ``re:`` pattern that matches nothing: the
    recipes name a layer's low-rank factors by pattern whether or not the layer was split.

    Raises:
        OnnxpressError: names the entries and some of the model's node names.
    """
    names = {n.name for m in models for n in m.graph.node if n.name}
    missing = sorted(selection.nodes - names)
    if missing:
        some = sorted(names)[:8]
        raise OnnxpressError(f"exclude {missing[:5]} matches no node of the model; its node names look like {some}"
                             f"{' ...' if len(names) > 8 else ''} (op:TYPE excludes an op type, re:PATTERN a name "
                             "pattern)")


TABLE_FOREIGN_SHARE = 0.25
"""A table of which at least this share of tensors the model lacks is refused as another model's."""


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    """The graph's input and initializer names and every node output name."""
    g = model.graph
    return {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}


def _check_table_fits(table: CalibrationTable, present: set[str]) -> list[str]:
    """Refuse a calibration table written for another model; note the tensors a table has that the model lacks.

    The names of different exports overlap (``relu``, ``view``, ``conv``): a table of another model would
    lend its ranges to the tensors that happen to share a name, so the check is on the tensors the table
    has that the model lacks (``present``: the tensors of the model as given and as prepared).

    Raises:
        CalibrationError: at least ``TABLE_FOREIGN_SHARE`` of the table's tensors are not in the model.
    """
    calibrated = set(table.ranges) | set(table.excluded)
    if not calibrated:
        return []
    foreign = sorted(calibrated - present)
    if len(foreign) >= TABLE_FOREIGN_SHARE * len(calibrated):
        raise CalibrationError(
            f"the calibration table does not fit this model: {len(foreign)} of its {len(calibrated)} tensors "
            f"(e.g. {foreign[:4]}) are not in the model; calibrate this model (onnxpress calibrate, or calib= / "
            "--calib instead of a table)"
        )
    if foreign:
        return [f"table: {len(foreign)} of the table's {len(calibrated)} tensors are not in the model "
                f"(e.g. {foreign[:3]}); their ranges are unused"]
    return []


def _hard_activation_decisions(decisions: list[NodeDecision], rewritten: list[tuple[str, str]]) -> list[NodeDecision]:
    """``decisions`` with the HardSwish / HardSigmoid nodes IntegerHardActivations rewrote marked quantized.

    InsertQDQ leaves a HardSigmoid float (no integer kernel of its own) and does not list a HardSwish (an op it
    does not know); after the rewrite both run as onnxruntime's integer Add (+ Mul).
    """
    if not rewritten:
        return decisions
    done = dict(rewritten)
    out = [NodeDecision(d.name, d.op, True) if done.get(d.name) == d.op else d for d in decisions]
    listed = {d.name for d in out}
    out.extend(NodeDecision(name, op, True) for name, op in rewritten if name not in listed)
    return out


def _refuse_nothing_quantized(decisions: Sequence[NodeDecision], int4_done: Sequence[NodeDecision],
                              codebook_layers: object) -> None:
    """Refuse an int8 model in which no layer was quantized because the table had no range for them.

    Written, it would be the float model under a new name (a table whose every tensor held NaN/inf, or one
    of another export); excluding every layer on purpose is not refused.

    Raises:
        CalibrationError: no layer quantized, and at least one for want of a range.
    """
    if not decisions or int4_done or codebook_layers or any(d.quantized for d in decisions):
        return
    # the reasons InsertQDQ._missing_reason gives
    missing = [d for d in decisions if re.search(r"has no (usable|calibrated) range", d.reason)]
    if missing:
        raise CalibrationError(
            f"no layer was quantized: {len(missing)} of {len(decisions)} read a tensor the calibration has no range "
            f"for ({missing[0].name}: {missing[0].reason}); calibrate this model on data without NaN/inf values"
        )


def _as_overrides(overrides: Mapping[str, TensorOverride | Mapping[str, object]] | None) -> dict[str, TensorOverride]:
    out: dict[str, TensorOverride] = {}
    for name, ov in (overrides or {}).items():
        if isinstance(ov, TensorOverride):
            out[name] = ov
            continue
        try:
            out[name] = TensorOverride(**dict(ov))
        except (TypeError, ValueError) as exc:
            raise OnnxpressError(
                f"bad override for tensor {name!r}: {exc}; keys are dtype, range, per_channel, method"
            ) from None
    return out


@accepts_infinite_inputs  # an attention mask fed as an input holds -inf: reported, left float
def quantize(
    model: ModelSource,
    output: str | os.PathLike[str] | None = None,
    *,
    calib: object | None = None,
    table: CalibrationTable | str | os.PathLike[str] | None = None,
    method: str | None = None,
    per_channel: bool = True,
    activations: str | None = None,
    weights: str = "int8",
    block_size: int | None = None,
    exclude: Selection | Iterable[str] = (),
    overrides: Mapping[str, TensorOverride | Mapping[str, object]] | None = None,
    quantize_ops: Iterable[str] = (),
    max_samples: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    constants_int8_min_size: int | None = CONSTANTS_INT8_MIN_SIZE,
    equalize: str | None = None,
    bias_correction: bool | None = None,
    compact: bool = True,
    smoothquant: float | None = None,
    codebook: int | None = None,
    int4_method: str | None = None,
    int4_layers: Iterable[str] = (),
    int8_method: str | None = None,
    hessians: Mapping[str, object] | None = None,
    gptq_cache: dict | None = None,
    keep_float16: bool | None = None,
    codebook_layers: Iterable[str] = (),
    w4a8_layers: Iterable[str] = (),
    fuse_attention: bool = True,
    quantized_attention: bool = True,
) -> QuantizeResult:
    """Quantize ``model`` for onnxruntime's CPU integer kernels (or 4-bit weight-only).

    Args:
        model: path or ModelProto (never modified). Opset 11/12 models are upgraded to 13 and
            weights held in ``Constant`` nodes become initializers first.
        output: where to write the result (atomically, checked, loaded in onnxruntime first).
        calib: calibration data (``.npz`` path, folder of ``.npz``, iterable of feed dicts,
            onnxruntime CalibrationDataReader); needed for int8 unless ``table`` is given; with
            int4 weights it makes the rounding data-aware (``int4_method``).
        table: a CalibrationTable or the path of one saved with ``CalibrationTable.save``.
        method: calibration method: "kl", "minmax", "percentile" or "mse"; or "auto": per tensor, the one of
            the four whose range gives the closest outputs on the first calibration samples (a greedy pass
            over the tensors, one onnxruntime run per trial; ``onnxpress.range_search``). Needs ``calib``.
            Default (None): ``DEFAULT_METHOD`` on ``calib``, or the table's own ranges; named with a table
            that keeps histograms, the table's ranges are recomputed with it (refused without histograms,
            and where nothing is calibrated: int4 weight-only, codebook, dynamic activations).
        per_channel: per-output-channel weight scales (else per tensor).
        activations: "uint8" (asymmetric; x86 integer kernels), "int8" (symmetric; TensorRT) or "dynamic"
            (quantized at run time by onnxruntime, no calibration data: MatMul/Gemm and LSTM layers only,
            ``passes/dynamic_quant.py``). Default: "uint8"; "dynamic" when neither ``calib`` nor ``table`` is
            given for int8 weights and the model has no Conv/ConvTranspose layer (a note says so; a model
            with convolutions still asks for data, since dynamic int8 convs run slower than float).
        weights: "int8" (QDQ, weights and activations) or "int4" (blockwise weight-only MatMul/Gemm). With
            either, an LSTM with constant weights becomes onnxruntime's DynamicQuantizeLSTM (int8 weights, its
            input and hidden state quantized at run time: QDQ has no integer recurrent kernel); exclude
            ``op:LSTM`` to keep it float. "int4" with ``activations`` "uint8" or "int8" named is W4A8: the int8
            QDQ model, its weights of 4096+ elements given 4-bit codes (one scale per channel, rounded as
            ``int8_method`` says) that onnxruntime's int8 kernels read, Conv included, stored two to a byte
            when ``compact`` (``passes/int4_storage.py``): the reference ResNet 38.9 dB at 0.136x size and int8
            speed, the transformer 38.6 dB at 0.145x.
        block_size: rows per scale block for int4 weights (``weights="int4"`` or ``int4_layers``); default
            ``INT4_BLOCK_SIZE`` = 64: the size/accuracy balance measured in bench/quantize.py (with GPTQ rounding, 128
            measured the same logit SQNR on the transformer at 0.141x instead of 0.148x). Refused where no layer
            gets int4 weights: it would change nothing.
        exclude: node names, ``op:<OpType>`` or ``re:<regex on node names>`` to keep float.
        overrides: per-tensor ``{"dtype": "uint8"|"int8"|"float", "range": (lo, hi),
            "per_channel": bool, "method": "minmax"|...}``.
        quantize_ops: ops that stay float by default to quantize anyway ("LayerNormalization", "HardSigmoid",
            "Softmax", "MatMul" for the MatMuls of two activations, attention's, "Gelu" for the Mul/Add
            nodes of a GELU written out around Erf/Tanh, and "SiLU" for the Sigmoid and Mul of ``x * sigmoid(x)``).
        max_samples: calibrate on at most this many samples.
        batch_size: calibration batch size.
        progress: progress bars.
        constants_int8_min_size: int8 mode: other float constants (a positional embedding) with at
            least this many elements are stored int8 with one scale (``|error| <= s/2``); None: keep them.
        equalize: cross-layer equalization before calibration: "split" (exact; ReLU6 becomes Relu + Min),
            "skip" (pairs joined by ReLU6 left alone) or "relu" (ReLU6 -> Relu, lossy); see onnxpress.advanced.
            Or "activations": each layer pair's activation channels stretched towards the largest one, from
            their ranges on ``calib``, so the per-tensor activation grid serves every channel
            (``onnxpress.passes.equalize_activations``; exact for the quantized model, needs per-channel
            weights). Logit SQNR on the test split, default -> activations: mobilenet 38.08 -> 39.47 dB,
            resnet 43.47 -> 43.75, concat 46.70 -> 46.64; the transformer and LSTM have no such pair. Off by
            default: on 32 calibration samples it cost 2.9 dB (a channel's maximum is then underestimated and
            its stretched tail clipped; the pass's docstring has the table): validate the result.
        bias_correction: correct each quantized layer's bias for the output shift measured on the W8A8
            model, layer by layer, on at most ``BIAS_CORRECTION_SAMPLES`` calibration samples; with a
            table and no ``calib``, analytically from the BatchNorm statistics (β, γ) before each layer
            (data-free; layers without one keep their bias). Default (None): on for int8 QDQ wherever one
            of the two applies, off otherwise (int4 or codebook weights). Measured with calib on the four
            reference models (test split, onnxruntime): logit SQNR +4.0 / +2.6 / +5.3 / +0.3 dB (resnet /
            mobilenet / concat / transformer) for 0.4-1.4 s more.
        compact: store the QDQ graph with ``CompactQDQ``'s exact rewrites (absorbed Relu/Clip, shared
            constants, int16 biases, short names); outputs are bit-identical either way.
        smoothquant: SmoothQuant alpha in [0, 1] for MatMul/Gemm after LayerNorm/Gemm (needs calib).
        codebook: store weights as BITS-bit k-means codebook indices instead (weight-only, no QDQ; Conv, Gemm,
            MatMul and ConvTranspose weights and the W and R of LSTM/GRU/RNN nodes); with ``calib`` the indices are
            chosen GPTQ-style against each layer's output error and the codebooks fitted to it (``passes/codebook.py``,
            ``refit``; ConvTranspose weights take the nearest level).
        int4_method: how int4 weights are rounded: "gptq" (error-compensating, from each layer's
            input second moment on ``calib``; needs it) or "rtn" (round to nearest, no data).
            Default: "gptq" when ``calib`` is given and its input moments fit in ``GPTQ_MEMORY_BYTES``
            (a note says when they do not), else "rtn". On the reference transformer (block 64) logit
            SQNR 26.2 -> 41.5 dB at the same size (bench/quantize.py; GPTQ codes, block scales refitted to them).
        int4_layers: with ``weights="int8"``: MatMul/Gemm layers (node names, or first output names
            for unnamed nodes) whose constant 2-D weights become 4-bit ``MatMulNBits`` first (GPTQ
            rounding from ``calib``); the rest of the model is then calibrated and quantized to int8 QDQ.
        codebook_layers: with ``weights="int8"``: layers (Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU, RNN; node
            names, or first output names) kept float for compute but stored as ``CODEBOOK_LAYER_BITS``-bit codebook
            indices (``passes/codebook.py``; GPTQ-assigned with the int8 layers' input moments when those are
            measured, a recurrent layer's on the moments of its input and hidden states in the int8 model);
            the rest is quantized int8 as usual. ``optimize``'s size searches offer it per layer: a smaller file
            than int8 at float speed.
        w4a8_layers: with ``weights="int8"`` and static activations: layers (Conv, ConvTranspose, Gemm, MatMul;
            node names, or first output names) whose weights, of ``FOUR_BIT_MIN_ELEMENTS`` or more, take the 4-bit
            codes of W4A8 on their int8 kernels (stored two to a byte when ``compact``); the other layers keep
            8-bit codes. ``optimize``'s size searches offer it per layer: nearly int4's size at int8's speed.
        int8_method: how int8 QDQ weights are rounded: "gptq" (error-compensating, from each layer's
            input second moment on at most ``GPTQ_SAMPLES`` calibration samples; needs ``calib``) or
            "rtn" (to nearest). The same grid, scales and kernels either way. Default: "gptq" when
            ``calib`` is given and its input moments are cheap (``GPTQ_AUTO_FLOPS``), else "rtn" (and a
            note says so). Test-split logit SQNR of the reference models, rtn -> gptq (bias correction
            on): resnet 41.93 -> 43.47 dB, mobilenet 38.06 -> 38.08, concat 45.18 -> 46.70,
            transformer 42.03 -> 43.16, for one more pass over the data (+0.2-1.6 s here).
        hessians: with "gptq", input second moments by weight name measured before (``onnxpress.advanced.
            collect_layer_hessians`` on this model and ``calib``) instead of that pass: recipes reuse
            them across candidates that differ only in precision. Layers missing from it are rounded
            to nearest.
        gptq_cache: a dict shared across calls (recipes, the search): GPTQ codes of a weight seen before
            with the same values, scales and moments object are reused instead of recomputed.
        keep_float16: a float16 export is quantized in float32 inside, its float16 inputs and outputs kept
            (``onnxpress.precision``). With int4 weight-only it can instead keep computing in float16
            (``MatMulNBits`` with float16 scales): no float32 copy of the weights, but slower on CPU (the
            reference transformer's float16 export: 1.13 / 1.15x its latency at batch 1 / 64 against
            0.89 / 0.85x through float32, 39.8 vs 40.0 dB). Default (None): keep for int4 when the model is
            over protobuf's 2 GiB, upcast otherwise.
        fuse_attention: int8 (static or dynamic) and int4: run each scaled dot-product attention as onnxruntime's
            ``MultiHeadAttention``
            (:class:`~onnxpress.passes.fuse_attention.FuseAttention`, exact to float rounding); its MatMuls and
            Softmax stay float either way (unless ``quantize_ops`` names them: then it is not run). The reference
            transformer against fp32, the same 43.2 dB, quiet box: 1 thread 0.524 -> 0.479x at batch 64,
            0.583 -> 0.565x at batch 1; 2 threads 0.558 -> 0.556x (paired 0.573 -> 0.551) and 0.738 -> 0.722x
            (with two other jobs running: 0.486 -> 0.408x and 0.696 -> 0.644x). Other runtimes do not know the
            node: ``False`` keeps the ops. int4 weight-only (2 threads, another job running): 1.071 -> 1.020x at
            batch 64, 1.022 -> 0.992x at batch 1, 41.06 dB either way.
        quantized_attention: int8 with uint8 or dynamic activations: a fused attention whose query, key and value
            projections are int8 layers of one tensor runs with them as onnxruntime's ``QAttention``
            (:class:`~onnxpress.passes.quantized_attention.FuseQuantizedAttention`: the same int8 weights and
            biases, outputs equal to float rounding): the reference transformer 0.62 -> 0.58x fp32 at batch 1,
            within noise at batch 64. ``False`` keeps the Gemms and ``MultiHeadAttention`` (QAT trains those).

    Raises:
        OnnxpressError: bad option (names it and the choices), no calibration data, unreadable table.
        CalibrationError / DataError: from calibration.
        OutputError: ``output`` cannot be written or is the input.
    """
    check_argument_types("quantize", flags={"per_channel": per_channel, "progress": progress, "compact": compact,
                                            "bias_correction": bias_correction, "keep_float16": keep_float16,
                                            "fuse_attention": fuse_attention,
                                            "quantized_attention": quantized_attention},
                         counts={"max_samples": max_samples, "batch_size": batch_size, "codebook": codebook},
                         numbers={"smoothquant": smoothquant})
    int4_layers = [int4_layers] if isinstance(int4_layers, str) else list(int4_layers)
    quantize_ops = (quantize_ops,) if isinstance(quantize_ops, str) else tuple(quantize_ops)  # read more than once
    codebook_layers = [codebook_layers] if isinstance(codebook_layers, str) else list(codebook_layers)
    w4a8_layers = [w4a8_layers] if isinstance(w4a8_layers, str) else list(w4a8_layers)
    if w4a8_layers and (weights != "int8" or codebook is not None or activations == "dynamic" or not per_channel):
        raise OnnxpressError("w4a8_layers (--w4a8-layers) gives some int8 layers 4-bit weight codes: use it with "
                             "weights='int8', static activations, per-channel scales and no codebook= (or "
                             "weights='int4' with activations='uint8' for every large layer)")
    mixed = sorted(set(w4a8_layers) & (set(int4_layers) | set(codebook_layers)))
    if mixed:
        raise OnnxpressError(f"layers {mixed[:5]} are in w4a8_layers (--w4a8-layers) and in int4_layers or "
                             "codebook_layers; keep one")
    if codebook_layers and (weights != "int8" or codebook is not None or activations == "dynamic"):
        raise OnnxpressError("codebook_layers mixes codebook layers into an int8 QDQ model: use it with "
                             "weights='int8', static activations and no codebook=")
    if weights not in WEIGHT_TYPES:
        raise OnnxpressError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
    # options that the chosen weights would ignore are refused, not dropped without a word
    if codebook is not None and weights != "int8":
        raise OnnxpressError(f"codebook={codebook} replaces the linear weights and sets their bits itself: drop "
                             f"weights={weights!r} (--weights)")
    # int4 weights with static int8 activations (asked for by name): 4-bit codes on onnxruntime's int8 kernels,
    # stored two to a byte (passes/int4_storage.py); from here on the int8 QDQ path with weight_bits=4
    weight_bits = 8
    if weights == "int4" and codebook is None and not int4_layers and activations in ACTIVATION_TYPES:
        w4 = f"weights='int4' with activations={activations!r} (--weights int4 --activations {activations})"
        if not per_channel:
            raise OnnxpressError(f"{w4} takes one scale per output channel: drop per_channel=False (--per-tensor)")
        if block_size is not None:
            raise OnnxpressError(f"{w4} takes one scale per output channel, not blocks: drop block_size "
                                 "(--block-size), or drop activations for int4 weight-only MatMulNBits")
        if int4_method is not None:
            raise OnnxpressError(f"{w4} rounds its 4-bit codes as int8 weights are rounded: use int8_method "
                                 "(--int8-method gptq|rtn) instead of int4_method (--int4-method)")
        weights, weight_bits = "int8", 4
    four_bit_layers = None  # with weight_bits=4: every weight of FOUR_BIT_MIN_ELEMENTS or more
    if w4a8_layers:
        weight_bits, four_bit_layers = 4, frozenset(w4a8_layers)
    if weights == "int4" and codebook is None and not int4_layers and not per_channel:  # weight-only int4
        raise OnnxpressError("per_channel=False (--per-tensor) is for int8 weights: int4 weights take one scale "
                             "per block of block_size values (--block-size); drop it")
    if codebook is not None or (weights == "int4" and not int4_layers):  # weight-only: no QDQ, no table read
        what = f"codebook={codebook} (--codebook)" if codebook is not None else "weights='int4' (--weights int4)"
        unused = [name for name, given in (
            ("per_channel=False (--per-tensor)", codebook is not None and not per_channel),
            (f"activations={activations!r} (--activations)",
             codebook is not None and activations is not None and activations != "dynamic"),
            ("table (--table)", table is not None), ("quantize_ops (--quantize-ops)", bool(quantize_ops)),
        ) if given]
        if unused:
            raise OnnxpressError(f"{what} is weight-only (no QDQ; activations stay float), so {', '.join(unused)} "
                                 f"would not apply: drop {'it' if len(unused) == 1 else 'them'}")
    if int4_method is not None and int4_method not in INT4_METHODS:
        raise OnnxpressError(f"int4_method must be one of {', '.join(INT4_METHODS)}, got {int4_method!r}")
    if int4_method is not None and (weights != "int4" or codebook is not None) and not int4_layers:
        raise OnnxpressError("int4_method (--int4-method) is for weights='int4' (without codebook); drop it or set "
                             "weights='int4' (--weights int4)")
    if int4_method == "gptq" and calib is None:
        raise CalibrationError(
            "int4_method='gptq' needs calibration data for the layers' input moments: pass calib= (--calib) "
            "(an .npz of inputs), or int4_method='rtn' (round to nearest, no data)"
        )
    method_asked, method = method, DEFAULT_METHOD if method is None else method
    if method == "auto" and (calib is None or weights != "int8" or codebook is not None):
        raise CalibrationError(
            "method='auto' (--method auto) chooses each activation's range on calibration data, for int8 QDQ: "
            "pass calib= (--calib) and int8 weights, or name one method (mse, kl, percentile, minmax)"
        )
    if equalize == "activations" and (codebook is not None or (weights == "int4" and not int4_layers)):
        raise OnnxpressError("equalize='activations' (--equalize activations) evens out the channels of the int8 "
                             "activation grid, and weight-only weights leave activations float: drop it")
    if equalize == "activations" and calib is None:  # before the default picks dynamic activations for it
        raise CalibrationError("equalize='activations' (--equalize activations) stretches each activation's channels "
                               "by their ranges on calibration data: pass calib= (--calib)")
    if equalize == "activations" and not per_channel:
        raise OnnxpressError("equalize='activations' (--equalize activations) moves each activation channel's range "
                             "into the weights of the layers beside it, which only per-channel weight scales take "
                             "for free: drop per_channel=False (--per-tensor), or use equalize='split' for "
                             "per-tensor weights")
    if int8_method is not None and int8_method not in INT8_METHODS:
        raise OnnxpressError(f"int8_method must be one of {', '.join(INT8_METHODS)}, got {int8_method!r}")
    if int8_method == "gptq" and (weights != "int8" or codebook is not None):
        raise OnnxpressError("int8_method='gptq' (--int8-method gptq) is for int8 QDQ weights; drop it with int4 "
                             "or codebook weights")
    if int8_method == "gptq" and calib is None:
        raise CalibrationError(
            "int8_method='gptq' needs calibration data for the layers' input moments: pass calib= (--calib) "
            "(an .npz of inputs), or int8_method='rtn' (round to nearest)"
        )
    if int4_layers and (weights != "int8" or codebook is not None):
        raise OnnxpressError("int4_layers (--int4-layers) mixes 4-bit layers into an int8 model: use it with "
                             "weights='int8'")
    if block_size is not None and (codebook is not None or (weights == "int8" and not int4_layers)):
        raise OnnxpressError(f"block_size={block_size} (--block-size) sets the scale blocks of int4 weights, and no "
                             "layer gets int4 weights here: drop it, or add weights='int4' (--weights int4) or "
                             "int4_layers (--int4-layers)")
    if block_size is None:
        block_size = INT4_BLOCK_SIZE
    if activations is not None and activations not in (*ACTIVATION_TYPES, "dynamic"):
        raise OnnxpressError(f"activations must be one of {', '.join(ACTIVATION_TYPES)} or dynamic, "
                             f"got {activations!r}")
    dynamic_why = None
    if activations is None:
        activations = "uint8"
        if calib is None and table is None and weights == "int8" and codebook is None and not int4_layers:
            dynamic_why = "no calibration data"  # decided below, once the model shows whether it has convolutions
    elif activations == "dynamic":
        _check_dynamic_options(calib, table, weights, codebook, int4_layers, method, equalize, smoothquant,
                               bias_correction, int8_method)
    weight_only4 = weights == "int4" and codebook is None and not int4_layers
    uncalibrated = ("weights='int4' is weight-only (activations stay float)" if weight_only4 else
                    "codebook weights are weight-only (activations stay float)" if codebook is not None else
                    "activations='dynamic' are quantized at run time" if activations == "dynamic" else None)
    if uncalibrated and method_asked is not None:  # the range rule would be ignored without a word
        raise OnnxpressError(f"method={method_asked!r} (--method) chooses the calibrated int8 activation ranges, and "
                             f"{uncalibrated}: nothing is calibrated; drop it")
    if uncalibrated and overrides:
        raise OnnxpressError(f"overrides (--override) set the int8 QDQ ranges, dtypes and weight scales of tensors, "
                             f"and {uncalibrated}: they would have no effect; drop them")
    if (method_asked is not None or overrides) and calib is None and table is None and not uncalibrated:
        what = f"method={method_asked!r} (--method) sets" if method_asked is not None else "overrides (--override) set"
        raise CalibrationError(f"{what} int8 activation ranges, which come from calibration data: pass calib= "
                               "(--calib) or a calibration table (table= / --table)")
    if keep_float16 and not weight_only4:
        raise OnnxpressError("keep_float16 (--keep-float16) is for int4 weight-only quantization: int8 layers need "
                             "float32 around them (onnxruntime's integer kernels); drop it")
    selection = asked = _as_selection(exclude)
    if codebook_layers:  # float for InsertQDQ (and the passes before it), codebook indices at the end
        selection = dataclasses.replace(selection, nodes=selection.nodes | frozenset(codebook_layers))
    ovs = _as_overrides(overrides)
    if output is not None:
        check_output_path(output, [model, calib, table])  # never overwrite the data or table
    original = load_model(model)
    refuse_quantized(original, "quantize")
    size_before = model_bytes(original)
    upgrading = _upgrade_check_source(original, calib)
    proto = normalize_model(original, min_opset=13, in_place=True)  # original is load_model's private copy
    del original  # each copy of a large model's weights held at once costs gigabytes
    cleaned = run_passes(proto, cleanup_passes(), progress=progress).model
    _check_selection([proto, cleaned], asked)  # the user's names, or the cleaned graph's (recipes)
    _check_layers_not_excluded([proto, cleaned], asked, int4_layers, codebook_layers, w4a8_layers)
    _check_w4a8_layers(w4a8_layers, cleaned)
    per_tensor = sorted(n for n, ov in ovs.items() if ov.per_channel is False)
    if equalize == "activations" and per_tensor:
        raise OnnxpressError(f"equalize='activations' (--equalize activations) moves activation ranges into "
                             f"per-channel weight scales, and overrides make {', '.join(map(repr, per_tensor[:3]))} "
                             "per tensor: drop those per_channel overrides, or equalize='activations'")
    given = _tensor_names(proto)  # overrides and a table may name tensors cleanup folded away
    unknown = sorted(set(ovs) - given - _tensor_names(cleaned))
    if unknown:  # a typo would leave the tensor with the setting it was meant to lose
        raise OnnxpressError(f"overrides name tensors the model does not have: {unknown[:5]}; give tensor names "
                             "(node outputs or graph inputs)")
    _check_override_keys(ovs, {i.name for m in (proto, cleaned) for i in m.graph.initializer})
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    if table is not None and method_asked not in (None, "auto", table.meta.get("method")):
        table = _table_with_method(table, method_asked)
    if table is not None:
        _check_table_for_int8(table, equalize, smoothquant)
    if upgrading is not None:
        _check_upgrade(*upgrading, cleaned, calib)
    if weight_only4 and not _int4_layers(cleaned):
        layers = collections.Counter(n.op_type for n in cleaned.graph.node if n.op_type in ("Conv", "ConvTranspose",
                                                                                              "MatMul", "Gemm", "LSTM"))
        found = ", ".join(f"{n} x {op}" for op, n in layers.most_common()) or "no Conv, MatMul or Gemm"
        raise UnsupportedModelError(
            f"weights='int4' is weight-only for MatMul/Gemm layers with a constant 2-D weight, and this model has "
            f"none ({found}); quantize it int8 (the default) instead"
        )
    # int4 weight-only can keep a float16 export in float16 (MatMulNBits takes it): no float32 copy of a large one
    keep = weight_only4 and (keep_float16 if keep_float16 is not None else is_large(cleaned))
    cleaned, half_note = _float32_inside(cleaned, keep=keep)
    if dynamic_why and not any(n.op_type in ("Conv", "ConvTranspose") for n in cleaned.graph.node):
        activations = "dynamic"
    # BatchNorm statistics matter only for data-free bias correction of int8 layers, read before cleanup folds them
    analytic = (calib is None and bias_correction is not False and weights == "int8" and codebook is None
                and not equalize and smoothquant is None and activations != "dynamic")
    bn_means = _bn_input_means(proto) if analytic else {}
    del proto
    if bias_correction is None:  # the default: on wherever it can run (int8 QDQ with data or BN statistics)
        bias_correction = ((calib is not None or bool(bn_means)) and weights == "int8" and codebook is None
                           and activations != "dynamic")
    if bias_correction and (weights != "int8" or codebook is not None):
        raise OnnxpressError("bias correction is for int8 weights; drop it with int4 or codebook weights")
    if bias_correction and calib is None and not bn_means:
        raise CalibrationError(
            "bias correction needs calibration data (calib= / --calib) or BatchNorm statistics before a "
            "layer (the model has none that apply): pass calib, or bias_correction=False"
        )
    advanced_stats: dict[str, int] = {}
    advanced_notes: list[str] = [half_note] if half_note else []  # run_passes prefixes each with its pass name
    attention_notes: list[str] = []  # attention left unfused, and why ("fuse_attention: <softmax>: ...")
    foreign = collections.Counter(f"{n.domain}::{n.op_type}" for n in cleaned.graph.node
                                  if n.domain not in ("", "ai.onnx"))
    if foreign:  # passed through in float, and the table of ops lists them nowhere
        advanced_notes.append(
            "float: kept float, no QDQ form: " + ", ".join(f"{k} x{v}" for k, v in sorted(foreign.items()))
            + (" (onnxruntime's own fused ops: a model saved after its graph optimisations; quantize the model as "
               "exported instead, so that those layers are quantized too)"
               if any(k.startswith("com.microsoft::") for k in foreign) else ""))
    if activations == "dynamic" and dynamic_why:
        advanced_notes.append("dynamic: no calibration data: activations are quantized at run time (dynamic int8 "
                              "MatMul/Gemm and LSTM); calibration data (--calib) gives static int8, faster and more "
                              "faithful")
    if equalize or (bias_correction and calib is not None) or smoothquant is not None:  # onnxpress.advanced
        from onnxpress.advanced import prepare_for_quantize

        # the int4 layers leave InsertQDQ's hands too: their inputs get no int8 grid from them
        stretch = (functools.partial(_quantized_activations, per_channel=per_channel, activations=activations,
                                     exclude=dataclasses.replace(selection,
                                                                 nodes=selection.nodes | frozenset(int4_layers)),
                                     overrides=ovs, quantize_ops=quantize_ops)
                   if equalize == "activations" else None)
        cleaned = prepare_for_quantize(
            cleaned,
            calib,
            equalize=equalize,
            stretch_only=stretch,
            smoothquant=smoothquant,
            bias_correction=False,  # done below, on the layers InsertQDQ quantizes
            per_channel=per_channel,
            batch_size=batch_size,
            max_samples=max_samples,
            progress=progress,
            stats=advanced_stats,
            notes=advanced_notes,
        )

    # LSTMs: int8 weights in onnxruntime's DynamicQuantizeLSTM, whatever the other layers get (QDQ has no recurrent
    # integer kernel, and onnxruntime no int4 one); the codebook path leaves them float
    lstm = QuantizeLSTMDynamic(per_channel=per_channel, exclude=selection)
    if activations == "dynamic":  # int8 weights, activations quantized by onnxruntime at run time
        dyn = QuantizeDynamic(per_channel=per_channel, exclude=selection)
        # the other constants first, the layers' biases kept float: QuantizeDynamic's weight scales (behind a Mul)
        # and the biases (behind an Add) stored int8 cost a BERT-style encoder 37.8 -> 34.1 dB
        head = [] if constants_int8_min_size is None else [StoreConstantsInt8(min_size=constants_int8_min_size,
                                                                              keep_biases=True)]
        # then the token tables only, for one an output layer also read (tied, Gemm transB=1) and QuantizeDynamic
        # took: its int8 rows equal that layer's int8 weight (or its transpose), and the two are stored once (a
        # second full run would store QuantizeDynamic's weight scales too: 37.24 -> 36.91 dB on a GPT-style export)
        tables = [] if constants_int8_min_size is None else [StoreConstantsInt8(min_size=constants_int8_min_size,
                                                                                tables_only=True)]
        # attention fused as in the static paths (the pass reads the tensor types: onnxruntime's inference too)
        fuse = attention_passes() if fuse_attention and any(n.op_type == "Softmax" for n in cleaned.graph.node) else []
        # the fused attention's int8 projections and the attention as one QAttention, its input quantized at run time
        # (passes/quantized_attention.py)
        qattention = [FuseQuantizedAttention()] if fuse and quantized_attention else []
        result = run_passes(_shaped(cleaned, thoroughly=bool(fuse)),
                            [*fuse, lstm, *head, dyn, *tables, *qattention, LeadingMeanAsMatMul(), ShareConstants(),
                             ShareTransposedConstants()], progress=progress)
        attention_notes.extend(_attention_notes(result.notes))
        decisions, used_table, excluded = [*dyn.decisions, *lstm.decisions], None, {}
        convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in cleaned.graph.node)
        if convs and not any(d.quantized for d in decisions):  # the model is written as it was (a U-Net: 1.003x)
            advanced_notes.append(
                f"dynamic: no layer was quantized: dynamic int8 takes MatMul/Gemm and LSTM layers only, and this "
                f"model's {convs} convolution(s) need calibration data for int8 (--calib)"
            )
    elif codebook is not None:  # weight-only k-means codebooks (onnxpress.advanced, issue 10)
        from onnxpress.advanced import codebook_weights

        # with calibration data the indices are chosen against each layer's output error (GPTQ-style), as
        # int4 weights are: mobilenet / resnet / transformer 4-bit logit SQNR 18.3 / 18.7 / 24.1 -> 22.0 / 28.1 /
        # 34.1 dB (bench/advanced_ptq.py)
        result, decisions = codebook_weights(cleaned, codebook, progress=progress, data=calib, exclude=selection,
                                             max_samples=128 if max_samples is None else min(max_samples, 128))
        used_table, excluded = None, {}
    elif weights == "int4":
        hessians = None
        method4 = int4_method or ("gptq" if calib is not None else "rtn")
        need = _int4_moment_bytes(cleaned) if method4 == "gptq" else 0
        if int4_method is None and need > GPTQ_MEMORY_BYTES:  # the default gives way (large models)
            method4 = "rtn"
            advanced_notes.append(
                f"gptq: int4 weights rounded to nearest: GPTQ's input moments would take {_size_text(need)} "
                f"here (the default allows {_size_text(GPTQ_MEMORY_BYTES)}); int4_method='gptq' "
                "(--int4-method gptq) runs it anyway, in rounds of layers whose moments fit"
            )
        # the node names the selection keeps float, its op:TYPE and re:PATTERN items resolved (they were dropped)
        left_out = frozenset(n.name for n in cleaned.graph.node if n.name and selection.reason_of(n.name, n.op_type))
        start4, round_stats, round_notes, handled = cleaned, {}, [], None
        if method4 == "gptq" and need > GPTQ_MEMORY_BYTES:
            try:
                start4, round_stats, round_notes, handled = _int4_gptq_rounds(
                    cleaned, calib, block_size=block_size, exclude=left_out, batch_size=batch_size,
                    max_samples=max_samples, progress=progress,
                )  # fmt: skip
            except ValueError as exc:
                raise OnnxpressError(str(exc)) from None
            advanced_notes.append(f"gptq: int4 GPTQ ran in {round_stats.pop('rounds')} rounds of layers whose "
                                  f"input moments fit in {_size_text(GPTQ_MEMORY_BYTES)} ({_size_text(need)} "
                                  "at once)")  # fmt: skip
        elif method4 == "gptq":
            from onnxpress.lowrank import collect_moments

            hessians = collect_moments(
                cleaned, calib, ops=("MatMul", "Gemm"), batch_size=batch_size, max_samples=max_samples,
                progress=progress,
            )  # fmt: skip
        # after GPTQ rounds, this pass takes the other layers only: it declines them or rounds them, and
        # stores the constants
        rest = None if handled is None else frozenset(unique_keys(start4.graph.node)) - handled
        try:
            int4 = QuantizeWeightsInt4(block_size=block_size, exclude=left_out, hessians=hessians, only=rest)
        except ValueError as exc:
            raise OnnxpressError(str(exc)) from None
        passes4: list = [lstm, int4]
        if fuse_attention and any(n.op_type == "Softmax" for n in start4.graph.node):
            # attention as onnxruntime's MultiHeadAttention here too (the pass reads the tensor types; see the
            # docstring for what it measured)
            start4, passes4 = _shaped(start4, thoroughly=True), [*attention_passes(), *passes4]
        result = run_passes(start4, passes4, progress=progress)
        attention_notes.extend(_attention_notes(result.notes))
        if handled is not None:
            merged = {k: round_stats.get(k, 0) + result.stats.get(k, 0) for k in {*round_stats, *result.stats}}
            result = dataclasses.replace(result, stats=merged, notes=(*round_notes, *result.notes))
        decisions = [*_int4_decisions(cleaned, result.notes, convs=True), *lstm.decisions]
        used_table = None
        excluded: dict[str, str] = {}
    else:
        int4_result, int4_done = None, []
        if int4_layers:
            int4_result, int4_done = _int4_layers_first(
                cleaned, int4_layers, calib, block_size, int4_method, batch_size, max_samples, progress
            )
            cleaned = int4_result.model
        # GPTQ's input moments on the graph as exported: after FlattenTokens a token is a row of its own,
        # which neither the cost estimate nor the per-sample row cap would see (the weights keep their names)
        if int8_method is None:  # the default: GPTQ rounding where there are data and its moments are cheap
            int8_method, why = default_int8_method(cleaned, calib, weights=weights, codebook=codebook,
                                                   max_samples=max_samples)
            advanced_notes.extend([why] if why else [])
        if int8_method != "gptq":
            hessians = None
        elif hessians is None:
            hessians = gptq_moments(cleaned, calib, batch_size=batch_size, max_samples=max_samples, progress=progress)
        pre_stats: dict[str, int] = {}  # counters of the passes before InsertQDQ
        pre = []
        if any(n.op_type == "ReduceMean" for n in cleaned.graph.node):
            # spatial-mean heads as GlobalAveragePool: onnxruntime fuses DQ -> pool -> Q (passes/global_pool.py)
            pre.append(ReduceMeanToGlobalPool())
        if any(n.op_type == "MatMul" for n in cleaned.graph.node):
            # token-wise transformer regions on [rows, features], so their dense layers are rank 2
            # and the next pass makes them Gemms with an int32 bias (passes/flatten_tokens.py)
            pre.append(FlattenTokens(skip=lambda node: selection.reason(node) is not None))
            # rank-2 MatMul + bias as Gemm: an int32 bias and QGemm, float output or not (passes/matmul_to_gemm.py)
            pre.append(MatMulAddToGemm(skip=lambda node: selection.reason(node) is not None))
        if (fuse_attention and not {"MatMul", "Softmax"} & set(quantize_ops)
                and any(n.op_type == "Softmax" for n in cleaned.graph.node)):
            # attention as onnxruntime's MultiHeadAttention: its MatMuls and Softmax stay float anyway, and
            # the fused kernel is faster (passes/fuse_attention.py); the Reshape pairs it leaves become one each
            # (passes/merge_reshapes.py)
            pre.extend(attention_passes())
        if pre:
            # onnxruntime's symbolic inference where onnx's stops (TorchScript reshapes): FlattenTokens
            # and MatMulAddToGemm decide on ranks
            prepared = run_passes(_shaped(cleaned, thoroughly=True), pre)
            cleaned, pre_stats = prepared.model, dict(prepared.stats)
            attention_notes.extend(_attention_notes(prepared.notes))
        start = AUTO_METHODS[0] if method == "auto" else method  # auto: every tensor starts at the first method
        if table is not None:  # on the graph the ranges are for: after FlattenTokens' row tensors exist
            advanced_notes.extend(_check_table_fits(table, given | _tensor_names(cleaned)))
        used_table = _resolve_table(cleaned, calib, table, start, ovs, max_samples, batch_size, progress)

        codes = {} if gptq_cache is None else gptq_cache  # GPTQ rounds each weight once across auto's trials

        def make_qdq(tab: CalibrationTable) -> InsertQDQ:
            try:
                return InsertQDQ(tab, per_channel=per_channel, activations=activations, exclude=selection,
                                 overrides=ovs, quantize_ops=quantize_ops, hessians=hessians, gptq_cache=codes,
                                 weight_bits=weight_bits, four_bit_layers=four_bit_layers)
            except ValueError as exc:
                raise OnnxpressError(str(exc)) from None

        if method == "auto":  # per tensor, the method whose range gives the closest outputs (range_search.py)
            searched = _auto_ranges(cleaned, calib, used_table, make_qdq, ovs, max_samples, batch_size, progress)
            used_table = searched.table
            advanced_notes.append(searched.summary())
        qdq = make_qdq(used_table)
        if bias_correction and calib is None:  # analytic: E[x] from the BatchNorms the cleanup folded
            cleaned = _correct_bias_analytic(_shaped(cleaned), qdq, bn_means, per_channel)
        elif bias_correction:  # onnxpress.advanced (issue 10): only the layers this pass quantizes
            from onnxpress.advanced import correct_bias_for_qdq

            bc_samples = BIAS_CORRECTION_SAMPLES if max_samples is None else min(max_samples, BIAS_CORRECTION_SAMPLES)
            cleaned = correct_bias_for_qdq(  # dtypes on every tensor, as for the real InsertQDQ run below
                _shaped(cleaned), qdq, calib, batch_size=batch_size, max_samples=bc_samples, progress=progress
            )
        # the codebook layers' weights stay float32 for the codebook pass at the end (a GRU's went float16 here)
        coded = frozenset(n.input[i] for n in cleaned.graph.node if (n.name or n.output[0]) in codebook_layers
                          for i in WEIGHT_INPUTS.get(n.op_type, ()) if i < len(n.input))
        tail = [] if constants_int8_min_size is None else [StoreConstantsInt8(min_size=constants_int8_min_size,
                                                                              exclude=coded)]
        if quantized_attention and pre_stats.get("fuse_attention.fused", 0):
            # the fused attention's int8 projections and the attention as one QAttention, its float bias made here
            # after the float constants went int8 (passes/quantized_attention.py; it leaves int8 activations be)
            tail.append(FuseQuantizedAttention())
        # dtypes on every tensor: InsertQDQ quantizes float32 activations only
        if compact:  # exact storage rewrites (bit-identical outputs, same fused kernels, fewer bytes)
            tail.append(CompactQDQ())
            if weight_bits == 4:  # the 4-bit codes two to a byte, rebuilt at load (passes/int4_storage.py)
                tail.append(PackInt4Weights())
        # MatMulBiasToOutputRank: keeps onnxruntime from turning a fixed-shape int8 MatMul + bias into a
        # float Gemm (passes/matmul_bias.py)
        # ShareConstants / ShareTransposedConstants: a tied embedding and its output layer, both int8 (the table's
        # rows equal to the layer's weight, or to its transpose), stored once
        # LeadingMeanAsMatMul: a float mean over leading axes (a recurrent net's mean over time), which onnxruntime
        # runs 15x slower on two threads, as one MatMul (passes/leading_mean.py; after InsertQDQ, which it leaves be)
        # PadInputChannels: an int8 input conv of 1-3 channels (a grayscale ResNet stem) on onnxruntime's fast kernel
        # IntegerHardActivations: HardSwish / HardSigmoid between uint8 Q/DQ as integer Add (+ Mul) kernels
        # (passes/hard_activations.py; onnxruntime has no integer kernel of its own for them)
        hard = IntegerHardActivations(exclude=selection)
        result = run_passes(_shaped(cleaned), [qdq, hard, PadInputChannels(), MatMulBiasToOutputRank(), lstm,
                                               LeadingMeanAsMatMul(), *tail, ShareConstants(),
                                               ShareTransposedConstants()], progress=progress)
        decisions = _hard_activation_decisions([*qdq.decisions, *lstm.decisions], hard.rewritten)
        if four_bit_layers is not None:
            _check_w4a8_layers(w4a8_layers, cleaned, qdq.four_bit_layers_done)
        if codebook_layers:
            recurrent = any(n.op_type in RECURRENT_OPS and (n.name or n.output[0]) in codebook_layers
                            for n in result.model.graph.node)
            if recurrent and calib is not None:  # their W and R take GPTQ codes on what they multiply in this model
                from onnxpress.advanced import collect_layer_hessians

                hessians = {**(hessians or {}), **collect_layer_hessians(
                    result.model, calib, recurrent="only", batch_size=batch_size, max_samples=max_samples)}
            result, decisions = _codebook_layers_last(result, decisions, codebook_layers, hessians)
        excluded = dict(used_table.excluded)
        _refuse_nothing_quantized(decisions, int4_done, codebook_layers)
        idle = sorted(n for n, ov in ovs.items() if n not in qdq.quantized_tensors and ov.dtype != "float")
        if idle:  # a graph output, a tensor of float ops, or one the rewrites before InsertQDQ replaced
            advanced_notes.append(
                f"override: no effect on {', '.join(map(repr, idle[:5]))}{' ...' if len(idle) > 5 else ''}: "
                f"{'this tensor is' if len(idle) == 1 else 'these tensors are'} not quantized in the written model "
                "(a graph output, or no quantized node reads it; see the float nodes and why)"
            )
        if int4_result is not None:  # the MatMulNBits nodes InsertQDQ left float are the int4 layers
            decisions = [d for d in decisions if d.op != "MatMulNBits"] + int4_done
            pre_stats = {**int4_result.stats, **pre_stats}
        result = dataclasses.replace(result, stats={**pre_stats, **result.stats})
    if half_note and (stored := store_float16(result.model)):  # what stayed float keeps the export's bytes
        advanced_notes.append(f"float16: {stored} constants of float layers stored as float16 again (exact)")
    check_model(result.model, where="the quantized model")
    written = save_model(result.model, output) if output is not None else None
    return QuantizeResult(
        model=result.model,
        output=written,
        quantized=tuple(d for d in decisions if d.quantized),
        kept_float=tuple(d for d in decisions if not d.quantized),
        excluded_tensors=excluded,
        table=used_table,
        size_before=size_before,
        size_after=model_bytes(result.model),
        stats={**advanced_stats, **result.stats},
        notes=(*advanced_notes, *attention_notes),
    )


def _attention_notes(notes: Iterable[str]) -> list[str]:
    """The notes of FuseAttention among a pipeline's (``run_passes`` prefixes each with its pass's name)."""
    return [n for n in notes if n.startswith(f"{FuseAttention.name}: ")]


def default_int8_method(model: onnx.ModelProto, calib: object, *, weights: str = "int8", codebook: int | None = None,
                        max_samples: int | None = None) -> tuple[str, str | None]:
    """``quantize``'s default int8 rounding for ``model`` and its data, and why not GPTQ when it was the cost.

    ("gptq", None) with data when GPTQ's input moments cost at most ``GPTQ_AUTO_FLOPS``, else
    ("rtn", a note naming the cost), or ("rtn", None) without data or int8 QDQ weights.
    """
    if calib is None or weights != "int8" or codebook is not None:
        return "rtn", None
    from onnxpress.advanced import moment_flops

    cost = moment_flops(model, samples=_gptq_samples(max_samples), rows_per_sample=GPTQ_ROWS_PER_SAMPLE)
    if cost <= GPTQ_AUTO_FLOPS:
        return "gptq", None
    return "rtn", (f"gptq: int8 weights rounded to nearest: GPTQ's input moments would take {cost / 1e9:.0f}e9 "
                   f"multiply-adds here (the default allows {GPTQ_AUTO_FLOPS / 1e9:.0f}e9); int8_method='gptq' "
                   "(--int8-method gptq) runs it anyway")


def gptq_moments(model: onnx.ModelProto, calib: object, *, batch_size: int = 64, max_samples: int | None = None,
                 progress: bool = False) -> dict[str, object]:
    """The input second moments ``int8_method="gptq"`` rounds with, by weight name (``GPTQ_*`` bounds)."""
    from onnxpress.advanced import collect_layer_hessians

    return collect_layer_hessians(model, calib, min_elements=0, batch_size=batch_size,
                                  max_samples=_gptq_samples(max_samples), progress=progress,
                                  max_bytes=GPTQ_MEMORY_BYTES, rows_per_sample=GPTQ_ROWS_PER_SAMPLE)


def _gptq_samples(max_samples: int | None) -> int:
    """Samples the GPTQ moments read (and the cost rule counts): ``GPTQ_SAMPLES``, or fewer if asked."""
    return GPTQ_SAMPLES if max_samples is None else min(max_samples, GPTQ_SAMPLES)


def _int4_gptq_rounds(
    model: onnx.ModelProto, calib: object, *, block_size: int, exclude: frozenset[str], batch_size: int,
    max_samples: int | None, progress: bool,
) -> tuple[onnx.ModelProto, dict[str, int], list[str], frozenset[str]]:
    """int4 GPTQ of every constant-weight MatMul/Gemm, in rounds whose input moments fit ``GPTQ_MEMORY_BYTES``.

    Layers are taken in graph order; each round measures its layers' moments on the model with the earlier
    rounds already 4-bit (sequential, as GPTQ itself runs over a network's blocks), rounds them, and frees the
    moments. A layer whose moment alone is larger gets a round of its own. Returns the model, the summed pass
    counters (plus ``rounds``), the notes and the keys of the layers the rounds took. Each round is one more
    pass over the data.
    """
    from onnxpress.lowrank import collect_moments
    from onnxpress.passes.low_rank import MomentSpec

    rounds: list[dict[str, MomentSpec]] = [{}]
    used, inputs = 0, set()
    for node, key, k, axis in _int4_layers(model):
        if node.name in exclude:
            continue
        size = 0 if node.input[0] in inputs else 8 * k * k
        if rounds[-1] and used + size > GPTQ_MEMORY_BYTES:
            rounds.append({})
            used, inputs = 0, set()
            size = 8 * k * k
        rounds[-1][key] = MomentSpec(node.input[0], axis)
        used += size
        inputs.add(node.input[0])
    current, stats, notes = model, {"rounds": 0}, []
    handled = frozenset(key for r in rounds for key in r)
    for requests in [r for r in rounds if r]:
        hessians = collect_moments(current, calib, requests=requests, batch_size=batch_size,
                                   max_samples=max_samples, progress=progress)  # fmt: skip
        step = QuantizeWeightsInt4(block_size=block_size, exclude=exclude, hessians=hessians,
                                   only=frozenset(requests), constants_int8_min_size=None)  # fmt: skip
        del hessians  # the pass holds them until it has run
        done = run_passes(current, [step], progress=progress)
        del step  # this round's moments go before the next round's are collected
        current = done.model
        for name, value in done.stats.items():
            stats[name] = stats.get(name, 0) + value
        notes.extend(done.notes)
        stats["rounds"] += 1
    return current, stats, notes, handled


def _check_w4a8_layers(asked: Sequence[str], model: onnx.ModelProto, done: Collection[str] | None = None) -> None:
    """Refuse ``w4a8_layers`` that cannot take (before InsertQDQ) or took (``done``, after it) no 4-bit codes.

    Before: each must be a Conv/ConvTranspose/Gemm/MatMul of ``model`` with a constant weight of
    ``FOUR_BIT_MIN_ELEMENTS`` or more. After: each must be among the layers InsertQDQ gave 4-bit codes.

    Raises:
        OnnxpressError: the layers and the reason of the first.
    """
    nodes = {n.name or n.output[0]: n for n in model.graph.node}
    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer}

    def why(key: str) -> str | None:
        node = nodes.get(key)
        if node is None:
            return "is not a node of the model (give node names, or first output names of unnamed nodes)"
        if node.op_type not in WEIGHTED_OPS:
            return f"is a {node.op_type}, not a {'/'.join(sorted(WEIGHTED_OPS))} layer"
        size = sizes.get(node.input[1]) if len(node.input) > 1 else None
        if size is None:
            return "has no constant weight"
        if size < FOUR_BIT_MIN_ELEMENTS:
            return f"has a weight of {size} elements, and 4-bit codes go to weights of {FOUR_BIT_MIN_ELEMENTS}+"
        if done is not None and key not in done:
            return "was kept float by the int8 pass (its line among the float layers says why)"
        return None

    refused = {k: reason for k in dict.fromkeys(asked) if (reason := why(k))}
    if refused:
        first = next(iter(refused))
        raise OnnxpressError(f"w4a8_layers (--w4a8-layers) {list(refused)[:5]} cannot take 4-bit weight codes: "
                             f"{first} {refused[first]}; drop them")


CODEBOOK_LAYER_BITS = 4
"""Index width of ``codebook_layers`` (two indices a byte, a 16-level codebook and a scale per channel)."""


def _codebook_layers_last(result: PipelineResult, decisions: list, layers: list[str],
                          hessians: Mapping[str, object] | None) -> tuple[PipelineResult, list]:
    """Store ``layers``' float weights (InsertQDQ left them float) as codebook indices; their decisions say so.

    Raises:
        OnnxpressError: a named layer is not in the model or took no codebook (its weight is not a float
            constant of at least the pass's minimum size).
    """
    from onnxpress.passes.codebook import CodebookWeights
    from onnxpress.passes.qdq import NodeDecision

    names = {n.name or n.output[0]: n for n in result.model.graph.node}
    unknown = [k for k in layers if k not in names]
    if unknown:
        raise OnnxpressError(f"codebook_layers {unknown[:5]} are not layers of the model; give node names "
                             "(or first output names of unnamed nodes)")
    cb = CodebookWeights(bits=CODEBOOK_LAYER_BITS, layers=layers, hessians=hessians)  # type: ignore[arg-type]
    done = run_passes(result.model, [cb])
    taken = {k for k in layers if names[k].input[1] in cb.objective}
    refused = sorted(set(layers) - taken)
    if refused:
        raise OnnxpressError(f"codebook_layers cannot take codebook weights: {', '.join(refused[:5])} (a weight "
                             "that is not a float constant, or one too small); drop them from codebook_layers")
    stats = {**result.stats, **{k: v for k, v in done.stats.items() if k.startswith("codebook_weights.")},
             "codebook_weights.layers": len(taken)}  # an LSTM's W and R: two weights, one layer
    kept = [d for d in decisions if d.name not in taken]
    ops = {k: names[k].op_type for k in taken}
    mixed = kept + [NodeDecision(k, ops[k], True, f"{CODEBOOK_LAYER_BITS}-bit codebook weights") for k in sorted(taken)]
    return dataclasses.replace(done, stats=stats, notes=(*result.notes, *done.notes)), mixed


def _int4_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, int, int]]:
    """``(node, layer key, K, feature axis)`` of each MatMul/Gemm with a constant 2-D weight, in graph order."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = []
    for node, key in zip(model.graph.node, unique_keys(model.graph.node), strict=True):
        weight = dims.get(node.input[1], ()) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else ()
        if len(weight) != 2:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k = weight[1] if node.op_type == "Gemm" and attrs.get("transB") else weight[0]
        out.append((node, key, k, 0 if node.op_type == "Gemm" and attrs.get("transA") else -1))
    return out


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _int4_moment_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float64 ``K x K`` input moments int4 GPTQ collects.

    One per input of a MatMul/Gemm with a constant 2-D weight (the 2.25 GiB model of
    ``bench/large_model.py``: 4.5 GiB).
    """
    per_input: dict[str, int] = {}
    for node, _, k, _ in _int4_layers(model):
        per_input[node.input[0]] = max(per_input.get(node.input[0], 0), 8 * k * k)
    return sum(per_input.values())


def _quantized_activations(model: onnx.ModelProto, **qdq: object) -> set[str]:
    """The activations InsertQDQ (with ``qdq``'s settings) quantizes in ``model``: a dry run on a copy.

    Every float activation gets the range [-1, 1] and weights are rounded to nearest: which tensors are
    quantized follows from the graph and the settings, not from the ranges. Tensors with a range override are
    left out. Equalizing activations only pays on these (``passes/equalize_activations.py``): where both layers
    of a pair stay float (MobileNet's stem and first depthwise conv), stretching would only change the float
    model beyond the calibrated ranges. ``prepare_for_quantize`` calls it only on a model with a pair to equalize.
    """
    from onnxpress.calibration.collect import select_tensors

    shaped = infer_shapes(model)
    names = select_tensors(shaped, inferred=shaped)
    dry = InsertQDQ(CalibrationTable.from_ranges({n: (-1.0, 1.0) for n in names}), **qdq)  # type: ignore[arg-type]
    run_passes(shaped, [dry])
    # a range set by hand may reach past a kept Clip bound, where the exact bound would let values through
    by_hand = {n for n, ov in dry.overrides.items() if ov.range is not None}
    return set(dry.quantized_tensors) - by_hand


def _shaped(model: onnx.ModelProto, *, thoroughly: bool = False) -> onnx.ModelProto:
    """``infer_shapes(model)`` (or ``infer_shapes_thoroughly``), or in place for a model too large to serialise.

    Such a model gets the inferred types and shapes written into it: it is quantize's private working
    copy, and a copy of its weights would cost gigabytes (inference runs on the light copy either way).
    """
    if not is_large(model):
        return infer_shapes_thoroughly(model) if thoroughly else infer_shapes(model)
    light = infer_shapes(model, weights=False)
    for field in ("value_info", "output"):
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(light.graph, field))
    return model


def _bn_input_means(model: onnx.ModelProto) -> dict[str, object]:
    """Per-channel E[x] after each BatchNorm (and a Relu/Clip reading it) of ``model`` before cleanup."""
    from onnxpress.passes.bn_stats import activation_means

    return activation_means(import_graph(model))


def _correct_bias_analytic(model: onnx.ModelProto, qdq: InsertQDQ, means: Mapping[str, object],
                           per_channel: bool) -> onnx.ModelProto:
    """Data-free bias correction (Nagel et al. 2019): ``b += (W - Q(W)) E[x]`` with E[x] from BatchNorm β, γ.

    Only the layers ``qdq`` quantizes whose input a BatchNorm (+ Relu/Clip) produced; the others keep
    their bias. Folding keeps the BN output's name on the folded layer, so the means still apply.
    """
    from onnxpress.passes.bias_correction import CorrectBias

    run_passes(model, [qdq])  # dry run: fills qdq.decisions (the real run resets them)
    layers = {d.name for d in qdq.decisions if d.quantized and d.op in ("Conv", "Gemm", "MatMul")}
    result = run_passes(model, [CorrectBias(means, per_channel=per_channel, layers=layers)])
    log.info("analytic bias correction: %s layers from BatchNorm statistics",
             result.stats.get("correct_bias.corrected", 0))
    return result.model


def _int4_layers_first(
    model: onnx.ModelProto,
    layers: list[str],
    calib: object | None,
    block_size: int,
    int4_method: str | None,
    batch_size: int,
    max_samples: int | None,
    progress: bool,
) -> tuple[PipelineResult, list[NodeDecision]]:
    """Rewrite only ``layers`` (MatMul/Gemm, by name or first output) to MatMulNBits; the rest untouched."""
    # types first: onnx's shape inference cannot see through MatMulNBits, and calibration and InsertQDQ
    # pick float32 tensors only, so the int4 layers' outputs keep the float32 types they had
    model = infer_shapes(copy.deepcopy(model))
    mm = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")]
    for n in mm:  # the pass selects by node name: name unnamed layers by their output (a layer key)
        if not n.name:
            n.name = n.output[0]
    names = {n.name for n in mm}
    unknown = [x for x in layers if x not in names]
    if unknown:
        raise OnnxpressError(
            f"int4_layers {unknown[:5]} are not MatMul/Gemm layers of the model; "
            f"choose among {sorted(names)[:10]}{' ...' if len(names) > 10 else ''}"
        )
    wanted = set(layers)
    hessians = None
    if (int4_method or ("gptq" if calib is not None else "rtn")) == "gptq":
        from onnxpress.lowrank import collect_moments

        hessians = collect_moments(
            model, calib, ops=("MatMul", "Gemm"), batch_size=batch_size, max_samples=max_samples, progress=progress
        )
        hessians = {k: v for k, v in hessians.items() if k in wanted}
    try:
        int4 = QuantizeWeightsInt4(
            block_size=block_size,
            exclude=frozenset(names - wanted),
            hessians=hessians,
            int8_below=0,  # every named layer gets 4-bit weights; the others go through InsertQDQ
            constants_int8_min_size=None,  # left to the int8 step's StoreConstantsInt8
        )
    except ValueError as exc:
        raise OnnxpressError(str(exc)) from None
    result = run_passes(model, [int4], progress=progress)
    decisions = [d for d in _int4_decisions(model, result.notes) if d.name in wanted]
    refused = [f"{d.name} ({d.reason})" for d in decisions if not d.quantized]
    if refused:
        raise OnnxpressError(f"int4_layers cannot take 4-bit weights: {', '.join(refused)}; drop them from int4_layers")
    return result, decisions


def _int4_decisions(model: onnx.ModelProto, notes: Iterable[str], *, convs: bool = False) -> list[NodeDecision]:
    """Per-node decisions of the int4 pass from its notes (declined nodes) and the graph.

    ``convs``: the model's convolutions too, as float (whole-model int4 leaves them as they are).
    """
    declined: dict[str, NodeDecision] = {}
    for note in notes:
        text = note.split(": ", 1)[1] if ": " in note else note
        label, _, rest = text.partition(" (")
        op, _, why = rest.partition("): float (")
        declined[label] = NodeDecision(label, op, False, why.rstrip(")"))
    out = []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            label = n.name or n.output[0]
            out.append(declined.get(label, NodeDecision(label, n.op_type, True)))
        elif convs and n.op_type in ("Conv", "ConvTranspose"):  # named, so the summary does not hide them
            out.append(NodeDecision(n.name or n.output[0], n.op_type, False,
                                    "int4 weight-only takes MatMul/Gemm layers; int8 (the default) quantizes convs"))
    return out


def _check_dynamic_options(calib, table, weights, codebook, int4_layers, method, equalize, smoothquant,
                           bias_correction, int8_method) -> None:
    """Dynamic activations take no calibration: refuse the options that need it, naming each."""
    if calib is not None or table is not None:
        raise OnnxpressError("activations='dynamic' takes no calibration data or table (onnxruntime quantizes the "
                             "activations at run time): drop calib/table, or choose activations 'uint8' or 'int8'")
    if weights != "int8" or codebook is not None or int4_layers:
        raise OnnxpressError("activations='dynamic' is for int8 weights: drop int4, codebook and int4_layers")
    if (method == "auto" or equalize or smoothquant is not None or bias_correction or int8_method == "gptq"):
        raise OnnxpressError("activations='dynamic' has no calibration data for method='auto', equalize, "
                             "smoothquant, bias correction or int8_method='gptq'; drop them")


UPGRADE_MIN_SQNR_DB = 60.0
"""An opset upgrade plus the exact cleanup must leave the float outputs this close (folding BatchNorm moves
them by ~1e-7 relative, over 100 dB); the Resize grid bug fixed in the twelfth session read ~10 dB."""

_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})


def _upgrade_check_source(model: onnx.ModelProto, calib: object) -> tuple[bytes, int] | None:
    """``(serialized model, its opset)`` when quantize will upgrade it and can check that on ``calib``, else None.

    Checked: models below opset 13 (onnx's version converter has changed what models compute: Resize before
    opset 11, Hardmax before 13, both now kept exact), with re-readable data (a path or a list of feeds), not
    over 2 GiB, and without random ops (their outputs differ between runs anyway).
    """
    from onnxpress.model_io import default_opset

    if calib is None or not isinstance(calib, (str, os.PathLike, list, tuple)) or is_large(model):
        return None
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import) or default_opset(model) >= 13:
        return None
    if any(n.op_type in _RANDOM_OPS for n in model.graph.node):
        return None
    return model.SerializeToString(), default_opset(model)


def _check_upgrade(before: bytes, opset: int, after: onnx.ModelProto, calib: object, batch: int = 8) -> None:
    """Refuse when the upgraded, cleaned model's float outputs differ from the original's on the first samples.

    Raises:
        UnsupportedModelError: names the output, its SQNR and the fix (re-export at opset >= 13).
    """
    import numpy as np

    from onnxpress.calibration.readers import first_batch
    from onnxpress.prune import sqnr_db
    from onnxpress.runtime import make_session

    feed = first_batch(calib, after, batch)
    ref = make_session(onnx.load_model_from_string(before), what="original model").run(None, feed)
    new = make_session(after, what="upgraded model").run(None, feed)
    for info, r, c in zip(after.graph.output, ref, new, strict=False):
        if np.asarray(r).dtype.kind != "f" or np.shape(r) != np.shape(c):
            continue
        db = sqnr_db(r, c)
        if db < UPGRADE_MIN_SQNR_DB:
            raise UnsupportedModelError(
                f"upgrading the model from opset {opset} to 13 (what per-channel int8 needs) changed its output "
                f"{info.name!r} on the calibration data ({db:.1f} dB SQNR against the original, before any "
                "quantization): onnx's version converter does not keep one of its ops exact; re-export the model "
                "with opset >= 13"
            )


def _float32_inside(model: onnx.ModelProto, *, keep: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """A float16 export computed in float32 inside (float16 inputs/outputs kept), with a note; bfloat16 refused.

    Every pass quantizes float32 layers, which onnxruntime's CPU integer kernels sit between; on a half
    precision export they found nothing to do (it used to be written back unchanged). float16 layers are
    upcast (:func:`onnxpress.precision.upcast_float16`; exact, and onnxruntime's CPU provider runs most
    float16 ops through Casts to float32 anyway). The cleanup passes are not run again: the model was
    cleaned in float16, and the upcast adds nothing to fold (the float16 exports of the four reference
    models quantize to the same bytes either way); only the Einsum and PRelu rewrites, which take float32
    constants alone, run again where the graph has one.

    With ``keep`` (int4 weight-only) a float16 model is returned as it is, with a note: ``MatMulNBits``
    takes float16 activations and scales, and a large export is not copied to float32.

    Raises:
        UnsupportedModelError: the Conv/Gemm/MatMul weights are all bfloat16 (no numpy dtype to calibrate with,
            no onnxruntime CPU Conv).
    """
    kinds = half_precision_layers(model)
    if kinds and set(kinds) == {onnx.TensorProto.BFLOAT16}:
        raise UnsupportedModelError(
            f"the model computes in bfloat16 (its {kinds[onnx.TensorProto.BFLOAT16]} Conv/Gemm/MatMul weights are): "
            "onnxpress quantizes float32 and float16 models, which onnxruntime's CPU integer kernels take. Export "
            "it in float32 (torch: call model.float() before torch.onnx.export) and quantize that"
        )
    if onnx.TensorProto.FLOAT16 not in kinds:
        return model, None
    if keep:
        return model, (f"float16: the model computes in float16 ({kinds[onnx.TensorProto.FLOAT16]} layers) and keeps "
                       "doing so: 4-bit weights with float16 scales")
    upcast, info = upcast_float16(model)  # on the cleaned model: the rewrite leaves nothing new to fold
    if any(n.op_type in ("Einsum", "PRelu") for n in upcast.graph.node):
        # the cleanup's rewrites that take float32 constants only, now that the export computes in float32
        upcast = run_passes(upcast, [EinsumToMatMul(), RewritePRelu()]).model
    kept = ", ".join([*info.inputs, *info.outputs][:6]) + (" ..." if len(info.inputs) + len(info.outputs) > 6 else "")
    note = (f"float16: the model computes in float16 ({kinds[onnx.TensorProto.FLOAT16]} layers): quantized in "
            f"float32 inside ({info.tensors} constants upcast, exactly)"
            + (f"; its float16 inputs and outputs stay float16 ({kept})" if kept else ""))
    return upcast, note


def _auto_ranges(
    model: onnx.ModelProto,
    calib: object,
    table: CalibrationTable,
    make_qdq: Callable[[CalibrationTable], InsertQDQ],
    overrides: Mapping[str, TensorOverride],
    max_samples: int | None,
    batch_size: int,
    progress: bool,
) -> RangeSearch:
    """``method="auto"``: search each tensor's range method on the first calibration samples."""
    from onnxpress.sensitivity import run_outputs

    if not table.histograms:
        raise CalibrationError(
            "method='auto' picks among the ranges of each tensor's histogram, and this table has none "
            "(a minmax table, or one saved without histograms): drop table= / --table and let calib= / --calib "
            "calibrate, or save the table from a histogram method (mse, kl, percentile)"
        )
    feeds = scoring_feeds(model, calib, max_samples, batch_size)
    shaped = infer_shapes(model)

    def build(tab: CalibrationTable) -> onnx.ModelProto:  # no bias correction: the ranking is what counts
        return run_passes(shaped, [make_qdq(tab), MatMulBiasToOutputRank()]).model

    return search_ranges(
        table, build, lambda m: run_outputs(m, feeds), run_outputs(model, feeds),
        skip=[n for n, o in overrides.items() if o.range is not None],
        bits=int(table.meta.get("bits", 8)), percentile=float(table.meta.get("percentile", 99.99)),
        progress=progress,
    )  # fmt: skip


def _table_with_method(table: CalibrationTable, method: str) -> CalibrationTable:
    """``table``'s ranges recomputed with ``method`` from its histograms (a table of bare ranges cannot be)."""
    bare = sorted(n for n in table.ranges if n not in table.histograms)
    if bare:
        raise CalibrationError(
            f"the table holds {table.meta.get('method', 'its')} ranges without histograms ({len(bare)} tensors, "
            f"e.g. {bare[0]!r}), so method={method!r} (--method) cannot be applied to it: calibrate with that "
            f"method (onnxpress calibrate --method {method}), or drop the method to use the table's ranges"
        )
    return CalibrationTable.merge(table, method=method)


def _check_table_for_int8(table: CalibrationTable, equalize: str | None, smoothquant: float | None) -> None:
    """Refuse a table whose ranges would not fit the int8 activations of the model quantize builds.

    Raises:
        CalibrationError: a float rewrite (equalize, smoothquant) rescales the activations after the table was
            measured, or its kl/mse ranges were searched for another bit width (calibrate --bits).
    """
    if equalize or smoothquant is not None:  # the ranges of the rescaled channels: 2-10x off
        what = "equalize (--equalize)" if equalize else "smoothquant (--smoothquant)"
        raise CalibrationError(
            f"{what} rescales activations the table's ranges were measured on, so they would not fit the rewritten "
            "model: pass calib= / --calib instead of a table (quantize calibrates after the rewrite)"
        )
    bits = table.meta.get("bits", 8)
    searched = sorted({r.method for r in table.ranges.values()} & {"kl", "mse"})
    if bits != 8 and searched:  # a 4-bit search clips far inside the range 8-bit levels would cover
        raise CalibrationError(
            f"the table's {'/'.join(searched)} ranges were searched for {bits}-bit values (calibrate --bits {bits}) "
            "and quantize's activations are 8-bit: calibrate with --bits 8 (the default)"
        )


def _with_preserved_inputs(model: onnx.ModelProto, table: CalibrationTable) -> CalibrationTable:
    """``table`` plus the range (and histogram) of each tensor it lacks that holds the values of one it has.

    That is, the input of a value-preserving op (Flatten, Reshape, ...) whose output the table has. quantize's own
    exact rewrites make such tensors (``ReduceMeanToGlobalPool``'s ``<name>_pooled`` before the Flatten back to
    ``<name>``): a table calibrated on the model as given never saw them, and ``--table`` left the pool and its
    Flatten float where ``--calib`` quantized them.
    """
    from onnxpress.calibration.collect import VALUE_PRESERVING

    constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                               for o in n.output}
    added: dict[str, str] = {}
    for node in reversed(model.graph.node):  # outputs first: a chain of them takes the range back to its start
        if node.op_type in VALUE_PRESERVING and node.input and node.output:
            src, dst = node.input[0], node.output[0]
            root = added.get(dst, dst)
            if src not in table.ranges and src not in table.excluded and src not in constants and root in table.ranges:
                added[src] = root
    if not added:
        return table
    out = dataclasses.replace(table, ranges=dict(table.ranges), histograms=dict(table.histograms))
    for name, root in added.items():
        out.ranges[name] = table.ranges[root]
        if root in table.histograms:
            out.histograms[name] = table.histograms[root]
    log.debug("ranges of %d tensors taken over from the value-preserving ops they feed: %s", len(added), added)
    return out


def _resolve_table(
    model: onnx.ModelProto,
    calib: object | None,
    table: CalibrationTable | None,
    method: str,
    overrides: Mapping[str, TensorOverride],
    max_samples: int | None,
    batch_size: int,
    progress: bool,
) -> CalibrationTable:
    """The table given (``quantize`` loaded a path early, to check it fits), or one calibrated on ``calib``."""
    if table is not None:
        result = _with_preserved_inputs(model, table)
    elif calib is None:
        raise CalibrationError(
            "int8 quantization needs calibration data: pass calib= / --calib (an .npz of inputs) or table= / --table "
            "(a saved calibration table); or use weights='int4' / --weights int4 (weight-only, no data needed), or "
            "activations='dynamic' / --activations dynamic (no data; MatMul/Gemm and LSTM layers only, convolutions "
            "stay float)"
        )
    else:
        from onnxpress.calibrate import calibrate
        from onnxpress.calibration.collect import select_tensors

        if not select_tensors(model):
            # Nothing quantizable (no float activation around a quantizable op): hand the model
            # back in float, as the per-node decisions say, rather than refusing it.
            log.info("no float activations to calibrate; the model stays float")
            return CalibrationTable()
        result = calibrate(
            model, calib, method=method, batch_size=batch_size, max_samples=max_samples, progress=progress
        )
    by_method: dict[str, list[str]] = {}
    for name, ov in overrides.items():
        if ov.method and ov.range is None:
            by_method.setdefault(ov.method, []).append(name)
    if by_method:
        result = _apply_method_overrides(model, result, by_method, calib, max_samples, batch_size)
    return result


def _apply_method_overrides(
    model: onnx.ModelProto,
    table: CalibrationTable,
    by_method: Mapping[str, list[str]],
    calib: object | None,
    max_samples: int | None,
    batch_size: int,
) -> CalibrationTable:
    """Recompute the ranges of overridden tensors with their own method (from histograms if kept)."""
    from onnxpress.calibration.observers import range_from_histogram

    ranges = dict(table.ranges)
    for method, names in by_method.items():
        missing = [n for n in names if n not in table.histograms or method == "minmax" and n not in ranges]
        for n in names:
            hist = table.histograms.get(n)
            if hist is not None:
                ranges[n] = range_from_histogram(hist, method, name=n)
        if missing:
            if calib is None:
                raise CalibrationError(
                    f"method override for {missing[:3]} needs calibration data (the table has no histograms)"
                )
            from onnxpress.calibrate import calibrate

            extra = calibrate(
                model, calib, method=method, tensors=missing, batch_size=batch_size, max_samples=max_samples
            )
            ranges.update(extra.ranges)
    return dataclasses.replace(table, ranges=ranges)
