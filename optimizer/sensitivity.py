"""Per-layer sensitivity: the output error when only one layer changes, per option.

For every MAC layer ``l`` (Conv/Gemm/MatMul of the cleaned model) and option ``o``::

    M_l,o = M with only layer l rewritten by o        (o ∈ {int8, int4, rank r, ...}; fp32 = M itself)
    SQNR(l, o) = 10 log10( Σ y² / Σ (y - y_l,o)² )     y = M(x), over the sensitivity samples

    cleaned M ──┬── calibrate once (table) ──► InsertQDQ(only l) ──► run ──► SQNR(l, int8)
                │                          └─► InsertQDQ(only l, 4-bit codes, GPTQ) ──► run ──► SQNR(l, w4a8)
                ├── E[x xᵀ] once (moments) ──► FixedRanks({l: r}) ──► run ──► SQNR(l, rank r)
                │                          └─► QuantizeWeightsInt4(only l, GPTQ) ──► run ──► SQNR(l, int4)
                └── PruneChannels({g: ρ}, multiple=8) (the recipe's prune step) ──► run ──► SQNR(g, prune ρ)

Pruning options are per *channel group* ``g`` (coupled channels: a conv's outputs and, through a
residual Add, every branch that shares them), not per layer: removing a unit shrinks the producers,
every op in between and the consumers' inputs. Their score rows carry the group name as ``layer``,
family ``prune``, ``macs_after``/``params_after`` summed over all the table's layers after pruning only ``g``,
``layer_macs`` per layer (so that the search can combine groups: a conv between two pruned groups
keeps ``(1 - ρ_in)(1 - ρ_out)`` of its MACs, not ``1 - ρ_in - ρ_out``), ``acts_removed`` (the
fraction of float activation elements per sample it removes: what Relu/Add/QDQ stream through memory,
additive across groups since every tensor's channels belong to one group), and the measured byte
delta (against the model's graphsurgeon round trip: :func:`roundtrip_bytes`).
Kept counts are rounded to ``prune_multiple``; ratios that remove nothing
after rounding, or the same units as a smaller ratio, are dropped.

The ``int4`` option (4-bit weight-only ``MatMulNBits``, block 64, float activations: the recipe's
``quantize.int4_layers``) is offered for MatMul/Gemm layers with a named node and a constant 2-D
float weight of at least ``INT4_MIN_WEIGHTS`` elements; its ``bytes_delta`` is the measured size
change (0.5 byte per weight + a float scale per 64-row block, minus the float weight). Its GPTQ
rounding uses the ``moment_samples`` moments (the recipe's step those of its ``max_samples``).

With ``latency=True`` every rank and prune candidate (fp32) is also timed against the model in one
interleaved loop: ``latency_ratio`` = t(M_l,o) / t(M). A split's extra node and a pruned group's
smaller activations (Relu, Add, the next conv's input) show there, which MACs do not.

What is shared: one streamed calibration pass per option family (the activation ranges for int8,
the input second moments for ranks), the reference outputs and the batches read once, and the
reference's activations: one run of the model over the sensitivity samples (default 64) with every
value an output, held when they fit ``REUSE_BUDGET`` (97 MB on resnet, 181 MB on the transformer).
A candidate (layer, option) then runs only the nodes whose structural keys (:func:`value_keys`:
op, attributes, weights' contents and the keys upstream; not names) the reference lacks — the rewritten
layer, its Q/DQ or factor nodes, a pruned group's producers, and everything downstream — fed the
cached values at the cut (:class:`_Reuse`); one that differs from its first node on, or has subgraphs,
runs whole. The scores equal the whole runs' within 4e-5 dB on the reference models (0 on the CNNs).
Measured (defaults, no cache, 2 shared cores, medians of 4 interleaved runs, before -> after):
resnet 5.92 -> 4.59 s (1.29x; 42 of 48 candidates in part), mobilenet 2.07 -> 1.95 s (1.06x; 43 of 47),
transformer 5.93 -> 5.47 s (1.08x; 52 of 52). Running the candidates was about half of the time on
resnet and a third on the other two; the rest is building them (SVDs, graph round trips) and
calibrating, which the reuse does not touch; the rank candidates then shared one factorisation per
layer instead of an SVD of every layer per candidate: resnet 4.55 -> 3.9 s, transformer 5.1 -> 3.9 s.
Noise is assumed additive across layers
(``NSR = 10^(-SQNR/10)`` summed), which the search uses as its fidelity estimate and then checks
by measuring the real candidates.

Results are cached as JSON in ``cache_dir`` under a key of the model's digest, the digest of every
sample any phase reads (the first ``max(max_samples, calib_samples, moment_samples)``) and the options;
the default folder is ``~/.cache/onnxpress`` (never the current folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.errors import DataError, OnnxpressError
from onnxpress.model_io import model_digest
from onnxpress.passes.codebook import RECURRENT_OPS
from onnxpress.passes.flops import assumed_input_dims, count_macs, count_params
from onnxpress.prune import sqnr_db

__all__ = [
    "CACHE_VERSION",
    "INT4_MIN_WEIGHTS",
    "LayerInfo",
    "OptionScore",
    "SensitivityResult",
    "analyze_sensitivity",
    "default_cache_dir",
    "flat_outputs",
    "int4_layers",
    "nsr",
    "prune_groups",
    "read_feeds",
    "run_output_arrays",
    "run_outputs",
    "w4a8_layers",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 8  # 8: the data digest covers the range and moment samples too

INT4_MIN_WEIGHTS = 4096
"""Smallest weight (elements) offered the int4 option: smaller ones cost little and can dominate the error."""

def nsr(sqnr: float) -> float:
    """Noise-to-signal power ratio of an SQNR in dB (0 for +inf)."""
    return 0.0 if math.isinf(sqnr) and sqnr > 0 else 10.0 ** (-sqnr / 10.0)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A MAC layer of the cleaned model: name, op, MACs per sample, weight params, full rank."""

    key: str
    op: str
    macs: int
    params: int
    full_rank: int


@dataclasses.dataclass(frozen=True)
class OptionScore:
    """Output SQNR when only ``layer`` takes ``option`` (``family`` int8 | int4 | codebook | w4a8 | rank | prune).

    For ``prune`` rows ``layer`` is a channel group, ``ratio`` the ratio asked for, ``units_removed``
    what the pass removed, and ``macs_after``/``params_after`` are sums over the table's layers.
    """

    layer: str
    family: str
    option: str
    sqnr_db: float
    macs_after: int
    params_after: int
    rank: int | None = None
    bytes_delta: int = 0  # serialized bytes of the one-layer candidate minus the model's (QDQ/factor overhead incl.)
    ratio: float | None = None
    units_removed: int = 0
    latency_ratio: float | None = None  # fp32 latency with only this rank/prune option / the model's (measured)
    layer_macs: dict[str, int] | None = None  # prune rows: MACs per table layer after pruning only this group
    acts_removed: float | None = None  # prune rows: fraction of the float activation elements this group removes


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Layers, per-option scores, and which cache entry they came from."""

    layers: tuple[LayerInfo, ...]
    scores: tuple[OptionScore, ...]
    samples: int
    key: str
    cached: bool = False

    def score(self, layer: str, family: str, option: str) -> OptionScore | None:
        """The score of one (layer, family, option), or None when it was not measured."""
        for s in self.scores:
            if s.layer == layer and s.family == family and s.option == option:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record (infinite SQNR as the string "inf")."""
        def fix(row: dict[str, Any]) -> dict[str, Any]:
            return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}

        return {
            "version": CACHE_VERSION,
            "key": self.key,
            "samples": self.samples,
            "layers": [dataclasses.asdict(x) for x in self.layers],
            "scores": [fix(dataclasses.asdict(s)) for s in self.scores],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, cached: bool = True) -> SensitivityResult:
        """Inverse of :meth:`to_dict`."""
        def num(v: Any) -> Any:
            return math.inf if v == "inf" else v

        scores = tuple(OptionScore(**{k: num(v) for k, v in s.items()}) for s in data["scores"])
        layers = tuple(LayerInfo(**x) for x in data["layers"])
        return cls(layers, scores, int(data["samples"]), str(data["key"]), cached)


def default_cache_dir() -> Path:
    """``$ONNXPRESS_CACHE`` or ``~/.cache/onnxpress``."""
    env = os.environ.get("ONNXPRESS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxpress"


def read_feeds(
    model: onnx.ModelProto, data: object, max_samples: int, batch_size: int = 64
) -> list[dict[str, np.ndarray]]:
    """The first ``max_samples`` samples of ``data`` as validated batches (read once, reused)."""
    from onnxpress.calibration.readers import open_data

    feeds = list(open_data(data, model, max_samples=max_samples).batches(batch_size))
    if not feeds:
        raise DataError("the data yielded no samples; give at least one sample")
    return feeds


def run_outputs(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Every output of ``model`` over ``feeds``, flattened and concatenated (float64)."""
    return flat_outputs(run_output_arrays(model, feeds))


def flat_outputs(arrays: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Outputs per feed (as :func:`run_output_arrays` returns them) as one flat float64 vector: what SQNR compares.

    Only the floating-point outputs, as ``quantize`` and ``validate`` measure SQNR: integer outputs (TopK
    indices, ArgMax) added their large, exactly kept values to the signal (a model measured 82.3 dB here against
    61-62 dB per float output in ``validate``). A model whose every output is an integer keeps them all.
    """
    floats = [[v for v in outs if np.issubdtype(np.asarray(v).dtype, np.floating)] for outs in arrays]
    if not any(floats):
        floats = arrays
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for outs in floats for v in outs])


def run_output_arrays(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The outputs of ``model`` per feed, each a list in the graph's output order (as onnxruntime returns them)."""
    from onnxpress.runtime import make_session

    session = make_session(model, optimization="basic", what="candidate model")
    names = [o.name for o in session.get_outputs()]
    return [list(session.run(names, dict(feed))) for feed in feeds]


REUSE_BUDGET = 256 * 2**20
"""Most bytes of reference values :class:`_Reuse` holds (every node output over the SQNR samples).

At the default 64 samples the reference models need 97 MB (resnet, 1.5 MB a sample), 81 MB (mobilenet)
and 181 MB (transformer: peak RSS of the analysis 210 -> 391 MB, measured); a model past the budget,
or with a value of unknown shape, runs every candidate whole as before.
"""

_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"})  # Dropout: random in training mode


def value_keys(model: onnx.ModelProto) -> dict[str, str] | None:
    """A structural key per value of ``model``: equal keys in two models mean the same computation.

    A graph input's key is its name; an initializer's its type, shape and contents (not its name); a node
    output's hashes the op (domain, the model's opset of that domain, type, attributes), the output's
    index and the keys of the node's inputs, so it covers everything upstream. Node and value names do not
    count: a pass that re-exports or renames an unchanged part keeps its keys, and any real difference
    (a new weight, an inserted Q/DQ, a pruned producer) changes the key of every value downstream.
    None when keys cannot be trusted: a node with a subgraph (it reads outer values by name, unhashed),
    a random op (equal keys, other values on each run), a value read before any node produces it
    (unsorted), or a sparse initializer.
    """
    from onnx import numpy_helper

    g = model.graph
    if g.sparse_initializer:
        return None
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    keys = {i.name: f"input:{i.name}" for i in g.input}
    for init in g.initializer:  # after the inputs: an initializer overrides an input of its name
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
        keys[init.name] = f"init:{h.hexdigest()}"
    for node in g.node:
        if node.op_type in _RANDOM_OPS or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        domain = node.domain or "ai.onnx"
        h = hashlib.sha256(f"{domain}|{opsets.get(domain)}|{node.op_type}".encode())
        for attr in sorted(node.attribute, key=lambda a: a.name):
            h.update(attr.SerializeToString(deterministic=True))
        for name in node.input:
            if name and name not in keys:
                return None
            h.update(f"|{keys[name] if name else ''}".encode())  # an omitted optional input keeps its place
        base = h.hexdigest()
        keys.update((out, f"{base}:{k}") for k, out in enumerate(node.output) if out)
    return keys


class _Reuse:
    """The reference model's values over the SQNR feeds, and runs of only the part of a candidate that differs.

    A candidate's node whose outputs all have keys (:func:`value_keys`) among the reference's values is not
    run: its values are the reference's. The others (the changed layer, Q/DQ or factor nodes next to it,
    a pruned group's producers, and every node downstream of any of them) form a sub-model whose inputs
    are the unchanged values they read (the frontier), fed from here; outputs none of them produces are
    the reference's. What cannot be matched runs whole: no keys, a frontier of graph inputs only (nothing
    to skip), or a value needed that is neither computed by the part nor among the reference's.

    Exact up to float rounding where onnxruntime computes differently across the cut: the cached values
    come from a run with every value an output (no fusion spans one), and the part is optimized alone,
    its inputs' shapes known. On the reference models the scores are the whole runs' within 4e-5 dB
    (the transformer; the CNNs' to the bit).
    """

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], keys: dict[str, str]) -> None:
        """Run ``model`` once over ``feeds`` with every node output as a graph output (use :meth:`build`)."""
        from onnxpress.calibration.collect import exposed_model, value_types
        from onnxpress.runtime import make_session

        self.feeds = feeds
        names = [o for n in model.graph.node for o in n.output if o]
        exposed, fetch, _ = exposed_model(model, names, value_types(model))
        session = make_session(exposed, optimization="basic", what="reference model with every value as an output")
        self.values: list[dict[str, np.ndarray]] = []
        for feed in feeds:
            got = dict(zip(fetch, session.run(fetch, dict(feed)), strict=True))
            got.update(feed)
            self.values.append(got)
        self.name_of: dict[str, str] = {}  # key -> a reference value of it (a value computed twice: the first)
        for name, key in keys.items():
            if name in self.values[0]:
                self.name_of.setdefault(key, name)
        self.runs = {"partial": 0, "whole": 0}

    @classmethod
    def build(cls, model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
              budget: int | None = None) -> _Reuse | None:
        """The reference values of ``model`` over ``feeds``; None past ``budget`` (:data:`REUSE_BUDGET`) or unkeyed."""
        from onnxpress.calibration.collect import bytes_per_sample
        from onnxpress.model_io import is_large

        budget = REUSE_BUDGET if budget is None else budget
        if budget <= 0 or is_large(model):
            return None
        keys = value_keys(model)
        if keys is None:
            log.info("sensitivity: the model has subgraphs or is unsorted; every candidate runs whole")
            return None
        from onnxpress.calibration.readers import sample_axes, samples_in

        per = bytes_per_sample(model, [o for n in model.graph.node for o in n.output if o])
        axes = sample_axes(model)
        samples = sum(samples_in(f, axes) for f in feeds)
        if per is None or per * samples > budget:
            log.info("sensitivity: every candidate runs whole (reference values: %s bytes a sample x %d, budget %d)",
                     per, samples, budget)
            return None
        return cls(model, feeds, keys)

    def outputs(self, cand: onnx.ModelProto) -> np.ndarray:
        """What ``run_outputs(cand, feeds)`` returns, running only the nodes whose values differ from the reference."""
        return flat_outputs(self._output_arrays(cand))

    def plan(self, cand: onnx.ModelProto) -> tuple[list[str], list[str], dict[str, str]] | None:
        """What of ``cand`` runs: (changed nodes, frontier, values that are the reference's); None: all of it.

        The changed nodes by name (or first output), the frontier as ``cand``'s value names, and every value
        of ``cand`` the reference computes as ``{name in cand: name in the reference}``.
        """
        keys = value_keys(cand)
        if keys is None:
            return None
        ref = {name: self.name_of[key] for name, key in keys.items() if key in self.name_of}
        changed = [n for n in cand.graph.node if any(o and o not in ref for o in n.output)]
        made = {o for n in changed for o in n.output if o}
        inits = {i.name for i in cand.graph.initializer}
        frontier = sorted({i for n in changed for i in n.input if i and i not in made and i not in inits})
        if any(x not in made and x not in ref for x in [*frontier, *(o.name for o in cand.graph.output)]):
            return None  # a value neither the part computes nor the reference has
        if frontier and all(ref[x] in self.feeds[0] for x in frontier):
            return None  # the part reads only graph inputs: it is the whole model
        return [n.name or n.output[0] for n in changed], frontier, ref

    def _output_arrays(self, cand: onnx.ModelProto) -> list[list[np.ndarray]]:
        from onnxpress.pipeline import export_graph, import_graph
        from onnxpress.runtime import make_session

        plan = self.plan(cand)
        if plan is None:
            self.runs["whole"] += 1
            return run_output_arrays(cand, self.feeds)
        self.runs["partial"] += 1
        _, frontier, ref = plan
        outputs = [o.name for o in cand.graph.output]
        wanted = [x for x in outputs if x not in ref]
        got: list[dict[str, np.ndarray]] = [{} for _ in self.values]
        if wanted:
            graph = import_graph(cand)
            tensors = graph.tensors()
            for x in frontier:  # the part's inputs, with the cached shapes (a dim batches disagree on: open)
                arrays = [values[ref[x]] for values in self.values]
                tensors[x].dtype = arrays[0].dtype
                tensors[x].shape = [d if all(a.shape[i] == d for a in arrays) else f"{x}_{i}"
                                    for i, d in enumerate(arrays[0].shape)]
            graph.inputs = [tensors[x] for x in frontier]
            graph.outputs = [tensors[x] for x in wanted]
            session = make_session(export_graph(graph, cand), optimization="basic", what="changed part of a candidate")
            for values, out in zip(self.values, got, strict=True):
                out.update(zip(wanted, session.run(wanted, {x: values[ref[x]] for x in frontier}), strict=True))
        return [[out[x] if x in out else values[ref[x]] for x in outputs]
                for values, out in zip(self.values, got, strict=True)]


def _feeds_and_digest(
    model: onnx.ModelProto, data: object, keep: int, digest_samples: int, batch_size: int = 64
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The first ``keep`` samples of ``data`` as batches (as :func:`read_feeds`), and a digest of more of them.

    The digest covers the first ``max(keep, digest_samples)`` samples, every sample the analysis reads: the
    int8 ranges come from ``calib_samples`` (256) and the moments from ``moment_samples``, not only from the
    SQNR samples. Keyed on the first 64 alone, a data file equal in those but different after them was served
    the other file's cached table. One streamed read does both (a one-shot source is read once here, as
    before), holding one batch beyond ``keep`` at a time.
    """
    from onnxpress.calibration.collect import fixed_batch_inputs
    from onnxpress.calibration.readers import open_data, sample_axes, samples_in, take_samples

    h = hashlib.sha256()
    feeds: list[dict[str, np.ndarray]] = []
    kept = 0
    whole = bool(fixed_batch_inputs(model))  # a fixed batch runs whole or not at all: it cannot be cut
    axes = sample_axes(model)
    for feed in open_data(data, model, max_samples=max(keep, digest_samples)).batches(batch_size):
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
            h.update(arr.tobytes())
        n = samples_in(feed, axes)
        if kept < keep:
            take = n if whole else min(n, keep - kept)  # along every input's sample axis (the readers' convention)
            feeds.append(feed if take == n else take_samples(feed, 0, take, axes))
            kept += take
    if not feeds:
        raise DataError("the data yielded no samples; give at least one sample")
    return feeds, h.hexdigest()[:16]


def layer_infos(model: onnx.ModelProto, *, recurrent: bool = False) -> list[LayerInfo]:
    """MAC layers of ``model`` in graph order (Conv/Gemm/MatMul with a constant weight).

    ``recurrent``: also LSTMs, GRUs and RNNs with constant W and R (a size search offers their weights as
    codebooks). An LSTM's int8 is onnxruntime's DynamicQuantizeLSTM; a GRU's or RNN's "int8" is what an int8
    model does with them (no integer kernel: float16 weights, float kernel).
    """
    macs = count_macs(model)
    params = count_params(model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        key = node.name or node.output[0]
        if recurrent and node.op_type in RECURRENT_OPS and len(node.input) > 2 and {*node.input[1:3]} <= inits.keys():
            out.append(LayerInfo(key, node.op_type, int(macs.get(key, 0)), int(params.get(key, 0)), 0))
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = inits[node.input[1]]
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            full = min(dims[0] // max(group, 1), int(np.prod(dims[1:])))
        else:
            full = min(dims) if len(dims) == 2 else 0
        out.append(LayerInfo(key, node.op_type, int(macs.get(key, 0)), int(params.get(key, 0)), int(full)))
    return out


def roundtrip_bytes(model: onnx.ModelProto) -> int:
    """Serialized bytes of ``model`` after an unchanged graphsurgeon round trip (what every candidate went through).

    The baseline of ``bytes_delta``: the round trip drops node metadata (a torch export's stack traces)
    and value_info, the same bytes for every candidate (~51 kB of the 1.7 MB reference transformer), so
    deltas against the input's own size would each count that loss once and their sum could pass -100%.
    """
    from onnxpress.pipeline import export_graph, import_graph

    return export_graph(import_graph(model).cleanup().toposort(), model).ByteSize()


CODEBOOK_MIN_WEIGHTS = 1024
"""Smallest weight (elements) offered the cb4 option: below it the rebuild's nodes cost about what the codes save."""


def _layers_with_weights(model: onnx.ModelProto, min_elements: int) -> list[str]:
    """Keys of the Conv/Gemm/MatMul layers with a constant float weight of at least ``min_elements``."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and math.prod(w.dims) >= min_elements:
            out.append(node.name or node.output[0])
    return out


def codebook_layers(model: onnx.ModelProto) -> list[str]:
    """Keys of the layers offered the cb4 option.

    Conv/Gemm/MatMul layers with a constant float weight of at least ``CODEBOOK_MIN_WEIGHTS``, and the LSTMs, GRUs
    and RNNs whose W has that many.
    """
    inits = {i.name: i for i in model.graph.initializer}
    recurrent = [node.name or node.output[0] for node in model.graph.node
                 if node.op_type in RECURRENT_OPS and len(node.input) > 2
                 and (w := inits.get(node.input[1])) is not None and w.data_type == onnx.TensorProto.FLOAT
                 and math.prod(w.dims) >= CODEBOOK_MIN_WEIGHTS]
    return _layers_with_weights(model, CODEBOOK_MIN_WEIGHTS) + recurrent


def w4a8_layers(model: onnx.ModelProto) -> list[str]:
    """Keys of the Conv/Gemm/MatMul layers whose constant float weight can take W4A8's 4-bit codes (4096+ elements)."""
    from onnxpress.passes.qdq import FOUR_BIT_MIN_ELEMENTS

    return _layers_with_weights(model, FOUR_BIT_MIN_ELEMENTS)


def int4_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes that can take 4-bit weights (constant 2-D float >= INT4_MIN_WEIGHTS).

    Empty when an eligible node has no name: the int4 pass selects layers by node name.
    """
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            continue
        if math.prod(w.dims) < INT4_MIN_WEIGHTS:
            continue
        if not node.name:
            log.info("MatMul/Gemm producing %s has no name; no int4 options", node.output[0])
            return []
        out.append(node.name)
    return out


def rank_options(full: int, fractions: Sequence[float], multiple: int = 1) -> list[int]:
    """Distinct integer ranks ``ceil(f·full)`` rounded up to ``multiple`` and below ``full``."""
    out = []
    for f in fractions:
        r = max(1, math.ceil(f * full))
        r = min(full, -(-r // multiple) * multiple)
        if r < full and r not in out:
            out.append(r)
    return out


def prune_groups(model: onnx.ModelProto) -> list[str]:
    """Channel groups of ``model`` with at least two prunable units, in graph order."""
    import onnx_graphsurgeon as gs

    from onnxpress.passes.base import quiet_graphsurgeon
    from onnxpress.passes.channel_groups import analyze_channels

    with quiet_graphsurgeon():
        analysis = analyze_channels(gs.import_onnx(model))
    frozen = analysis.frozen_units()
    return [g.name for g in analysis.groups() if sum(u not in frozen for u in g.units) >= 2]


def activation_elements(model: onnx.ModelProto) -> int:
    """Elements per sample of every float value computed by a node (symbolic dims count 1; unknown shapes 0).

    What elementwise ops (Relu, Add, QuantizeLinear/DequantizeLinear) stream through memory: pruning a
    residual stream shrinks it though its convs keep most of their MACs.
    """
    from onnxpress.model_io import infer_shapes

    inferred = infer_shapes(model)
    produced = {o for n in inferred.graph.node for o in n.output}
    total = 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if vi.name not in produced or t.elem_type != onnx.TensorProto.FLOAT or not t.HasField("shape"):
            continue
        total += int(np.prod([d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]))
    return total


def _prune_one(model: onnx.ModelProto, group: str, ratio: float, multiple: int) -> tuple[onnx.ModelProto, int]:
    """The model with only ``group`` pruned to ``ratio`` — the same passes as the recipe's prune step."""
    from onnxpress.passes.fold import FoldConstants
    from onnxpress.passes.prune_channels import PruneChannels
    from onnxpress.pipeline import run_passes

    res = run_passes(model, [FoldConstants(), PruneChannels({group: ratio}, criterion="l2", multiple=multiple)])
    return res.model, int(res.stats.get("prune_channels.units_removed", 0))


def analyze_sensitivity(
    model: onnx.ModelProto,
    calib: object,
    *,
    rank_fractions: Sequence[float] = (0.5, 0.25),
    prune_ratios: Sequence[float] = (0.25, 0.5, 0.75),
    prune_multiple: int = 8,
    quantize: bool = True,
    int4: bool = True,
    codebook: bool = False,
    w4a8: bool = False,
    latency: bool = False,
    method: str = "mse",
    max_samples: int = 64,
    calib_samples: int = 256,
    moment_samples: int = 64,
    multiple: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    deadline: float | None = None,
) -> SensitivityResult:
    """Measure the output SQNR of every (layer, option) with all other layers left as they are.

    Args:
        model: the *cleaned* model (see :func:`onnxpress.recipe.prepare`); not modified.
        calib: calibration data (anything ``open_data`` accepts).
        rank_fractions: rank options as fractions of each layer's full rank.
        prune_ratios: channel-pruning options per prunable channel group (empty: none).
        prune_multiple: kept channel counts rounded to a multiple of this (as the recipe's prune step).
        quantize: measure the int8 option.
        int4: measure the int4 weight-only option of eligible MatMul/Gemm layers (:func:`int4_layers`).
        codebook: measure the ``cb4`` option of layers with at least ``CODEBOOK_MIN_WEIGHTS`` weights: a float
            kernel on 4-bit codebook weights (``quantize(codebook_layers=)``), GPTQ-assigned with the layer's
            input moment where it fits. ``optimize`` asks for it under a size budget.
        w4a8: measure the ``w4a8`` option of layers with a weight of ``FOUR_BIT_MIN_ELEMENTS`` or more: the int8
            layer with 4-bit weight codes (``quantize(w4a8_layers=)``), GPTQ-rounded where ``quantize``'s default
            int8 rounding would be, its bytes measured stored two to a byte. ``optimize`` asks for it under a size
            budget.
        latency: also time every rank and prune candidate against the model (onnxruntime, one thread,
            one batch of the sensitivity data, interleaved rounds; see ``search.measure_latency``).
        method: calibration method for the int8 option.
        max_samples: samples the SQNR is measured on.
        calib_samples: samples for the activation ranges (as the recipe's quantize step uses).
        moment_samples: samples for the input second moments (data-aware splits).
        multiple: ranks rounded up to a multiple of this.
        cache_dir: where results are cached (``None``: :func:`default_cache_dir`); ``False`` disables.
        progress: progress bar over the candidates.
        deadline: a ``time.monotonic()`` value. The int8 option of every layer is measured first and
            always (the uniform int8 baseline needs it); the other options only while the clock is
            before the deadline. A result cut short is not cached, and when the clock passed the
            deadline before the rank/prune candidates were timed (``latency``), they are dropped.

    Raises:
        DataError: the data does not fit the model. Errors of calibration and of the passes.
    """
    from tqdm.auto import tqdm

    from onnxpress.advanced import collect_layer_hessians
    from onnxpress.calibrate import calibrate
    from onnxpress.lowrank import collect_moments
    from onnxpress.passes.codebook import CodebookWeights
    from onnxpress.passes.dynamic_quant import QuantizeLSTMDynamic
    from onnxpress.passes.int4_storage import PackInt4Weights
    from onnxpress.passes.qdq import InsertQDQ, Selection
    from onnxpress.passes.weight_only import QuantizeWeightsInt4, StoreConstantsInt8
    from onnxpress.pipeline import run_passes
    from onnxpress.quantize import (  # the recipe step's block size too
        CODEBOOK_LAYER_BITS,
        CONSTANTS_INT8_MIN_SIZE,
        INT4_BLOCK_SIZE,
        default_int8_method,
        gptq_moments,
    )
    from onnxpress.recipe import FixedRanks

    if max_samples < 1:
        raise OnnxpressError(f"sensitivity needs at least one sample, got max_samples={max_samples}")
    # the key covers every sample any phase reads (SQNR, ranges, moments) and every setting that changes a score
    feeds, data_digest = _feeds_and_digest(model, calib, max_samples, max(calib_samples, moment_samples))
    from onnxpress.calibration.readers import sample_axes, samples_in

    axes = sample_axes(model)
    samples = sum(samples_in(f, axes) for f in feeds)
    config = {"ranks": list(rank_fractions), "prune": [float(r) for r in prune_ratios],
              "prune_multiple": prune_multiple, "latency": latency, "int8": quantize, "int4": int4, "method": method,
              "samples": max_samples, "calib": calib_samples,
              "moments": moment_samples, "multiple": multiple, "v": CACHE_VERSION}
    if codebook:  # only then: earlier caches stay valid. 2: the codebooks are fitted to the layer outputs (refit);
        config["codebook"] = 4  # 3: LSTMs are layers too (int8 and cb4 options); 4: GRUs and RNNs too
    if w4a8:
        config["w4a8"] = True
    if assumed_input_dims():  # MACs counted at these sizes of the inputs' symbolic dimensions (a sequence length)
        config["dims"] = assumed_input_dims()
    key = hashlib.sha256(
        f"{model_digest(model)}|{data_digest}|{json.dumps(config, sort_keys=True)}".encode()
    ).hexdigest()[:20]
    cache_file = None
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache_file = folder / f"sensitivity-{key}.json"
        if cache_file.is_file():
            try:
                result = SensitivityResult.from_dict(json.loads(cache_file.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable sensitivity cache %s: %s", cache_file, exc)
            else:
                log.info("sensitivity from cache %s", cache_file)
                return result

    layers = layer_infos(model, recurrent=codebook)
    base_bytes = roundtrip_bytes(model)
    reference = run_outputs(model, feeds)
    reuse = _Reuse.build(model, feeds)  # the reference's values: candidates run only what they change
    factors: dict[tuple[object, ...], object] = {}  # FixedRanks' factorisations, keyed by layer, method, weights
    names = [n.name for n in model.graph.node if n.name]
    jobs: list[tuple[LayerInfo | str, str, float | None]] = []
    four = set(int4_layers(model)) if int4 else set()
    books = set(codebook_layers(model)) if codebook else set()
    fours = set(w4a8_layers(model)) if w4a8 else set()
    weight_of = {n.name or n.output[0]: n.input[1] for n in model.graph.node if len(n.input) > 1}
    recurrence_of = {n.name or n.output[0]: n.input[2] for n in model.graph.node if n.op_type in RECURRENT_OPS}
    dims_of = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for lay in layers:
        if quantize:
            jobs.append((lay, "int8", None))
        if lay.key in four:
            jobs.append((lay, "int4", None))
        if lay.key in books:
            jobs.append((lay, "codebook", None))
        if quantize and lay.key in fours:
            jobs.append((lay, "w4a8", None))
        if lay.full_rank > 1:
            jobs.extend((lay, "rank", r) for r in rank_options(lay.full_rank, rank_fractions, multiple))
    if prune_ratios:
        jobs.extend((g, "prune", float(r)) for g in prune_groups(model) for r in sorted(prune_ratios))
    removed_seen: dict[str, set[int]] = {}
    acts0 = activation_elements(model) if prune_ratios else 0
    table = moments = None
    if quantize and any(lay.op not in RECURRENT_OPS for lay in layers):  # a recurrent int8 needs no ranges
        table = calibrate(model, calib, method=method, max_samples=calib_samples)
    if any(fam in ("rank", "int4", "codebook") for _, fam, _ in jobs):
        moments = collect_moments(model, calib, max_samples=moment_samples)
    w4a8_moments = None  # by weight name; GPTQ where the recipe's int8_method "auto" would round with it
    if fours and default_int8_method(model, calib, max_samples=calib_samples)[0] == "gptq":
        w4a8_moments = gptq_moments(model, calib, max_samples=calib_samples)
    recurrent_moments = None  # an LSTM's W / R moments, by weight name, when its codebook option is measured
    measured: dict[int, tuple[OptionScore, onnx.ModelProto | None]] = {}  # job -> (score, candidate to time)
    skipped = 0
    # int8 first (the baseline needs every layer's), then the rest in their order; results keep job order
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][1] != "int8")
    for j in tqdm(order, desc="sensitivity", unit="candidate", disable=not progress):
        lay, fam, r = jobs[j]
        if deadline is not None and fam != "int8" and time.monotonic() > deadline:
            skipped += 1
            continue
        if fam == "prune":
            group = str(lay)
            cand, units = _prune_one(model, group, float(r), prune_multiple)
            if units == 0 or units in removed_seen.setdefault(group, set()):
                log.debug("prune %s at %g removes %d units (none or as before); option dropped", group, r, units)
                continue
            removed_seen[group].add(units)
            outs = reuse.outputs(cand) if reuse is not None else run_outputs(cand, feeds)
            macs, params = count_macs(cand), count_params(cand)  # summed over the table's layers
            measured[j] = (OptionScore(group, "prune", f"prune{r:g}", sqnr_db(reference, outs),
                                   int(sum(macs.get(x.key, 0) for x in layers)),
                                   int(sum(params.get(x.key, 0) for x in layers)),
                                   None, cand.ByteSize() - base_bytes, float(r), int(units),
                                   layer_macs={x.key: int(macs.get(x.key, 0)) for x in layers},
                                   acts_removed=1.0 - activation_elements(cand) / acts0 if acts0 else None), cand)
            continue
        if fam == "int8" and lay.op == "LSTM":  # onnxruntime's DynamicQuantizeLSTM, as quantize builds it
            lstm = QuantizeLSTMDynamic(exclude=Selection(nodes=frozenset(n for n in names if n != lay.key)))
            cand = run_passes(model, [lstm]).model
            if not any(d.quantized for d in lstm.decisions):
                continue
            macs_after, params_after, option = lay.macs, lay.params, "int8"
        elif fam == "int8" and lay.op in RECURRENT_OPS:  # no integer kernel: an int8 model stores W and R in float16
            mine = {weight_of[lay.key], recurrence_of[lay.key]}
            store = StoreConstantsInt8(min_size=CONSTANTS_INT8_MIN_SIZE,
                                       exclude=frozenset(i.name for i in model.graph.initializer) - mine)
            cand = run_passes(model, [store]).model
            macs_after, params_after, option = lay.macs, lay.params, "int8"
        elif fam == "int8":
            others = frozenset(n for n in names if n != lay.key)
            qdq = InsertQDQ(table, exclude=Selection(nodes=others))
            cand = run_passes(model, [qdq]).model
            quantized = [d for d in qdq.decisions if d.quantized and d.name == lay.key]
            if not quantized:
                log.info("layer %s is not quantized by InsertQDQ; int8 option dropped", lay.key)
                continue
            macs_after, params_after, option = lay.macs, lay.params, "int8"
        elif fam == "w4a8":
            others = frozenset(n for n in names if n != lay.key)
            qdq = InsertQDQ(table, exclude=Selection(nodes=others), weight_bits=4, four_bit_layers=[lay.key],
                            hessians=w4a8_moments)
            cand = run_passes(model, [qdq, PackInt4Weights()]).model  # packed: the bytes the recipe's model has
            if lay.key not in qdq.four_bit_layers_done:
                log.info("layer %s took no 4-bit codes; w4a8 option dropped", lay.key)
                continue
            macs_after, params_after, option = lay.macs, lay.params, "w4a8"
        elif fam == "int4":
            pass4 = QuantizeWeightsInt4(
                block_size=INT4_BLOCK_SIZE, exclude=frozenset(n for n in names if n != lay.key), int8_below=0,
                constants_int8_min_size=None, hessians={k: v for k, v in (moments or {}).items() if k == lay.key},
            )  # fmt: skip
            done = run_passes(model, [pass4])
            if not done.stats.get("quantize_weights_int4.weights_int4"):
                log.info("layer %s declined by the int4 pass; int4 option dropped", lay.key)
                continue
            cand = done.model
            macs_after, params_after, option = lay.macs, lay.params, "int4"
        elif fam == "codebook" and lay.op in RECURRENT_OPS:  # W and R, GPTQ-rounded on input / hidden-state moments
            if recurrent_moments is None:
                recurrent_moments = collect_layer_hessians(model, calib, recurrent="only", max_samples=moment_samples)
            cb = CodebookWeights(bits=CODEBOOK_LAYER_BITS, layers=[lay.key], hessians=recurrent_moments)
            cand = run_passes(model, [cb]).model
            if weight_of[lay.key] not in cb.objective:
                continue
            macs_after, params_after, option = lay.macs, lay.params, f"cb{CODEBOOK_LAYER_BITS}"
        elif fam == "codebook":
            w = weight_of[lay.key]
            h = (moments or {}).get(lay.key)
            width = math.prod(dims_of[w][1:]) if lay.op == "Conv" else None
            fits = h is not None and (width is None or h.shape[-1] == width)  # a grouped conv's moment spans groups
            cb = CodebookWeights(bits=CODEBOOK_LAYER_BITS, layers=[lay.key], hessians={w: h} if fits else None)
            cand = run_passes(model, [cb]).model
            if w not in cb.objective:
                log.info("layer %s declined by the codebook pass; cb4 option dropped", lay.key)
                continue
            macs_after, params_after, option = lay.macs, lay.params, f"cb{CODEBOOK_LAYER_BITS}"
        else:
            split = FixedRanks({lay.key: r}, moments={k: v for k, v in (moments or {}).items() if k == lay.key})
            split.reuse_factors = factors  # each layer's SVD once across the rank candidates (same factors)
            cand = run_passes(model, [split]).model
            rep = next((x for x in split.report if x.key == lay.key and x.rank is not None), None)
            if rep is None:
                continue
            macs_after, params_after, option = rep.macs_after, rep.params_after, f"rank{r}"
        outs = reuse.outputs(cand) if reuse is not None else run_outputs(cand, feeds)
        measured[j] = (OptionScore(lay.key, fam, option, sqnr_db(reference, outs), int(macs_after),
                               int(params_after), r, cand.ByteSize() - base_bytes), cand if fam == "rank" else None)
    if reuse is not None:
        log.info("sensitivity: %(partial)d candidates run in part, %(whole)d whole", reuse.runs)
        reuse = None  # the values are not needed for the timing below
    scores = [measured[j][0] for j in sorted(measured)]
    structural = [(i, measured[j][1]) for i, j in enumerate(sorted(measured)) if measured[j][1] is not None]
    if latency and structural and deadline is not None and time.monotonic() > deadline:
        log.warning("time limit: the %d rank/prune candidates were not timed and are left out", len(structural))
        drop = {i for i, _ in structural}
        scores = [x for i, x in enumerate(scores) if i not in drop]
        structural, skipped = [], skipped + len(drop)
    if latency and structural:
        from onnxpress.search import measure_latency

        ratios = measure_latency(model, [m for _, m in structural], feeds[0])
        for (i, _), r in zip(structural, ratios, strict=True):
            scores[i] = dataclasses.replace(scores[i], latency_ratio=float(r))
    result = SensitivityResult(tuple(layers), tuple(scores), samples, key)
    if skipped:
        log.warning("time limit: %d of %d sensitivity options not measured; the search offers the others",
                    skipped, len(jobs))
        return result  # not cached: a later run without the limit measures them all
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + ".tmp")
            tmp.write_text(json.dumps(result.to_dict(), indent=1))
            os.replace(tmp, cache_file)
        except OSError as exc:
            log.warning("cannot write the sensitivity cache %s: %s", cache_file, exc)
    return result
