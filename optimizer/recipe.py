"""Recipes: a JSON list of passes and their settings that reproduces an optimized model exactly.

A recipe is data, applied in order to the cleaned model::

    {"version": 1, "steps": [
        {"pass": "prune",    "ratio": {"group": 0.5}, "criterion": "l2"},
        {"pass": "lowrank",  "ranks": {"node_Conv_140": 16}, "max_samples": 256},
        {"pass": "quantize", "method": "mse", "exclude": ["node_Gemm_160"], "max_samples": 256,
         "int4_layers": ["node_MatMul_16"]}
    ]}

    model --cleanup--> M0 --prune--> M1 --lowrank(ranks, E[x xᵀ] on calib)--> M2 --quantize(table on calib)--> out

Every step is deterministic for the same model bytes and calibration data (numpy SVD, fixed
calibration subset, graph passes with stable names), so applying a recipe twice gives the same
bytes; ``tests/test_recipe.py`` checks it. ``quantize.exclude`` names *layers of the input model*:
when a layer was split by ``lowrank`` both its factor nodes stay float. ``quantize.int4_layers``
(MatMul/Gemm node names) get 4-bit weight-only ``MatMulNBits`` before the rest is quantized to int8;
``quantize.codebook_layers`` (layer node names) stay float for compute, their weights stored as 4-bit codebook
indices after the rest is quantized to int8;
``quantize.w4a8_layers`` (layer node names) keep int8 kernels on 4-bit weight codes (W4A8, stored two to a
byte); ``quantize.weights: "int4"`` instead makes the step weight-only (every eligible MatMul/Gemm not in
``exclude`` to ``MatMulNBits``, no QDQ at all). ``quantize.bias_correction`` (default true, as in ``onnxpress
quantize``) corrects the int8 layers' biases on the calibration data; int4 and codebook steps ignore it, and
``activations`` and ``int8_method`` too. ``quantize.int8_method`` is "rtn" (round to nearest) unless a recipe
says "gptq" or "auto" (``onnxpress quantize``'s default: GPTQ where its input moments are cheap, decided on the
model before the step; what the search writes): recipes written before the field existed build the same bytes.
With a ``moments_cache`` the GPTQ input moments are measured once per pre-quantize model and the codes of
unchanged weights are reused. A ``qat`` step (after a quantize step) trains the quantized model
quantization-aware in its own graph (``onnxpress.finetune`` of a QDQ / MatMulNBits student: MSE distillation
from the recipe's input model, seeded, one torch thread on the CPU), so it rebuilds the same bytes too;
``optimize --finetune`` appends one when it measures closer. ``quantize.equalize`` ("split", "skip", "relu" or
"activations"), ``quantize.smoothquant`` (alpha) and ``quantize.codebook`` (bits) are ``onnxpress quantize``'s
``--equalize``, ``--smoothquant`` and ``--codebook`` (null: off); a codebook step is weight-only, so it takes no
``int4_layers``, ``codebook_layers``, ``w4a8_layers`` or int4 weights (its ``exclude`` layers stay float).

Only a ``qat`` step may follow a ``quantize`` step (the others would find a quantized graph: no float layer to
prune or split, two to fine-tune, bias-correction constants to fold into a larger file).

Names are checked against the model at their step, as the steps before it left it (``prune`` groups
after its constant folding, ``lowrank`` layer keys as the split sees them, ``quantize.exclude`` node
names or a split layer's factors): a name that matches nothing, or a rank above the layer's full rank,
is refused rather than built into a model that ignores it. After a ``prune`` step a rank may reach the
layer's full rank before pruning (the search picks ranks on the unpruned model); it leaves the layer whole.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxpress.errors import OnnxpressError
from onnxpress.model_io import (
    ModelSource,
    check_output_path,
    infer_shapes,
    load_model,
    model_digest,
    move_into_place,
    normalize_model,
)
from onnxpress.passes.channel_groups import analyze_channels
from onnxpress.passes.low_rank import SplitLowRank
from onnxpress.passes.prune_channels import PruneChannels
from onnxpress.pipeline import cleanup_passes, run_passes

__all__ = [
    "RECIPE_VERSION", "STEPS", "TRAINING_PASSES", "FixedRanks", "apply_recipe", "load_recipe", "save_recipe",
    "validate_recipe",
]

log = logging.getLogger(__name__)

RECIPE_VERSION = 1

# step name -> {key: (checker, default)}
TRAINING_PASSES = frozenset({"finetune", "qat"})
"""Steps that train (torch): they change values, not the graph, and take a ``device``."""

_KEYS: dict[str, dict[str, Any]] = {
    "cleanup": {},
    "prune": {"ratio": None, "criterion": "l2", "multiple": 1},
    "lowrank": {"ranks": None, "data_aware": True, "max_samples": 64, "batch_size": 64},
    # batch_size null: by the training samples (bridge.train.default_batch_size: 16 on 450 of them)
    "finetune": {"epochs": 6, "lr": 1e-3, "temperature": 4.0, "seed": 0, "max_samples": None, "batch_size": None,
                 "patience": 3, "device": "cpu"},
    # QAT of the quantized model in its own graph (``onnxpress.finetune`` on a QDQ/MatMulNBits student): MSE
    # distillation from the recipe's input model, the held-out 10% keeping epoch 0 when nothing beats it
    "qat": {"epochs": 6, "lr": 1e-4, "distill": "mse", "seed": 0, "max_samples": None, "batch_size": 64,
            "patience": 3, "device": "cpu"},
    "quantize": {
        "method": "mse",
        "weights": "int8",
        "exclude": [],
        "int4_layers": [],
        "codebook_layers": [],
        "w4a8_layers": [],
        "activations": "uint8",
        "per_channel": True,
        "bias_correction": True,
        "int8_method": "rtn",
        # issue 10: onnxpress quantize's --equalize MODE, --smoothquant ALPHA and --codebook BITS
        "equalize": None,
        "smoothquant": None,
        "codebook": None,
        "max_samples": 256,
        "batch_size": 64,
    },
}
STEPS = tuple(_KEYS)
"""Known step names."""

MIN_TRAINING_SAMPLES = 6
"""A training step holds 10% of its samples out to pick the epoch kept: at least one, and one to train on."""


def _bad(where: str, what: str) -> OnnxpressError:
    return OnnxpressError(f"recipe {where}: {what}")


def _check_fraction_map(where: str, value: Any) -> None:
    items = value.items() if isinstance(value, Mapping) else [("*", value)]
    for name, r in items:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise _bad(where, f"ratio for {name!r} must be a number in [0, 1), got {r!r}")


def _check_float_rewrites(where: str, step: Mapping[str, Any]) -> None:
    """A quantize step's ``equalize`` / ``smoothquant`` / ``codebook`` (``onnxpress.quantize``'s arguments, issue 10).

    ``codebook`` is weight-only (k-means indices for every layer instead of QDQ), so the int8/int4 fields it would
    leave unused are refused rather than dropped without a word.
    """
    if step["equalize"] not in (None, "split", "skip", "relu", "activations"):
        raise _bad(where, f"equalize must be split, skip, relu or activations (or null: none), got "
                          f"{step['equalize']!r}")
    alpha = step["smoothquant"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not 0.0 <= float(alpha) <= 1.0):
        raise _bad(where, f"smoothquant is the SmoothQuant alpha, a number in [0, 1] (or null: none), got {alpha!r}")
    bits = step["codebook"]
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise _bad(where, f"codebook is the index width, an integer in 1..8 (or null: none), got {bits!r}")
    unused = [f"{key}={step[key]!r}" for key, default in (("weights", "int8"), ("int4_layers", []),
                                                         ("codebook_layers", []), ("w4a8_layers", []))
              if step[key] != default]
    unused += [f"{key}={step[key]!r}" for key, bad in (("method", "auto"), ("int8_method", "gptq"),
                                                       ("int8_method", "auto")) if step[key] == bad]
    if unused:
        raise _bad(where, f"codebook={bits} stores every layer's weights as codebook indices instead of int8/int4 "
                          f"(no QDQ), so {', '.join(unused)} would not apply; drop "
                          f"{'it' if len(unused) == 1 else 'them'}, or drop codebook")


def validate_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Check a recipe and return it with every default filled in.

    Raises:
        OnnxpressError: not a mapping, wrong version, unknown step or key, or a bad value (named).
    """
    if not isinstance(recipe, Mapping):
        raise OnnxpressError(f"a recipe must be a JSON object with 'version' and 'steps', got {type(recipe).__name__}")
    version = recipe.get("version")
    if version != RECIPE_VERSION or isinstance(version, bool):  # True == 1 in Python
        raise OnnxpressError(f"recipe version must be {RECIPE_VERSION}, got {version!r}")
    unknown = sorted(set(recipe) - {"version", "steps", "meta"})
    if unknown:
        raise OnnxpressError(f"recipe has unknown top-level keys {unknown}; allowed: version, steps, meta")
    steps = recipe.get("steps")
    if not isinstance(steps, list) or not steps:
        raise OnnxpressError("recipe 'steps' must be a non-empty list of {\"pass\": ...} objects")
    out = []
    for i, step in enumerate(steps):
        where = f"step {i + 1}"
        if not isinstance(step, Mapping) or "pass" not in step:
            raise _bad(where, "each step must be an object with a 'pass' key")
        name = step["pass"]
        if not isinstance(name, str) or name not in _KEYS:
            raise _bad(where, f"unknown pass {name!r}; known passes: {', '.join(STEPS)}")
        allowed = _KEYS[name]
        extra = sorted(set(step) - {"pass", *allowed})
        if extra:
            raise _bad(where, f"pass {name!r} has unknown keys {extra}; allowed: {sorted(allowed) or 'none'}")
        full = {"pass": name, **{k: v for k, v in allowed.items()}, **{k: v for k, v in step.items() if k != "pass"}}
        where = f"step {i + 1} ({name})"
        if name == "prune":
            if full["ratio"] is None:
                raise _bad(where, "needs 'ratio': a fraction or {channel group: fraction}")
            _check_fraction_map(where, full["ratio"])
            if full["criterion"] not in ("l1", "l2"):
                raise _bad(where, f"criterion must be 'l1' or 'l2' (data-free), got {full['criterion']!r}")
        if name == "lowrank":
            ranks = full["ranks"]
            if not isinstance(ranks, Mapping) or not ranks:
                raise _bad(where, "needs 'ranks': {layer name: rank (integer >= 1)}")
            if not isinstance(full["data_aware"], bool):
                raise _bad(where, f"data_aware must be true or false, got {full['data_aware']!r}")
            unread = [f"{k}={full[k]!r}" for k in ("max_samples", "batch_size")
                      if not full["data_aware"] and full[k] != _KEYS["lowrank"][k]]
            if unread:
                raise _bad(where, f"data_aware false splits by the weights alone, so {', '.join(unread)} would not "
                                  f"apply: drop {'it' if len(unread) == 1 else 'them'}")
            for key, r in ranks.items():
                if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                    raise _bad(where, f"rank for layer {key!r} must be an integer >= 1, got {r!r}")
        if name == "quantize":
            if full["method"] not in ("kl", "minmax", "percentile", "mse", "auto"):
                raise _bad(where, f"method must be kl, minmax, percentile, mse or auto, got {full['method']!r}")
            if not isinstance(full["exclude"], list) or not all(isinstance(x, str) for x in full["exclude"]):
                raise _bad(where, "'exclude' must be a list of layer names")
            four = full["int4_layers"]
            if not isinstance(four, list) or not all(isinstance(x, str) for x in four):
                raise _bad(where, "'int4_layers' must be a list of MatMul/Gemm layer names")
            both = sorted(set(four) & set(full["exclude"]))
            if both:
                raise _bad(where, f"layers {both} are both in 'exclude' (float) and 'int4_layers'; keep one")
            if full["weights"] not in ("int8", "int4"):
                raise _bad(where, f"weights must be int8 or int4, got {full['weights']!r}")
            if full["weights"] == "int4" and four:
                raise _bad(where, "'int4_layers' is for int8 models; with weights 'int4' every eligible layer is int4")
            if full["weights"] == "int4" and full["codebook"] is None:  # weight-only: the int8 settings go unread
                # (int8_method "auto", which the search writes into every step, reads as "none of this model's")
                unread = [f"{k}={full[k]!r}" for k, default in _KEYS["quantize"].items()
                          if k in ("method", "activations", "per_channel", "bias_correction")
                          and full[k] != default] + (["int8_method='gptq'"] if full["int8_method"] == "gptq" else [])
                if unread:
                    raise _bad(where, f"weights 'int4' is weight-only (activations stay float), so {', '.join(unread)} "
                                      f"would not apply: drop {'it' if len(unread) == 1 else 'them'}")
            books = full["codebook_layers"]
            if not isinstance(books, list) or not all(isinstance(x, str) for x in books):
                raise _bad(where, "'codebook_layers' must be a list of layer names")
            both = sorted(set(books) & (set(full["exclude"]) | set(four)))
            if both:
                raise _bad(where, f"layers {both} are in 'codebook_layers' and in 'exclude' or 'int4_layers'; keep one")
            if full["weights"] == "int4" and books:
                raise _bad(where, "'codebook_layers' is for int8 models")
            w4a8 = full["w4a8_layers"]
            if not isinstance(w4a8, list) or not all(isinstance(x, str) for x in w4a8):
                raise _bad(where, "'w4a8_layers' must be a list of layer names")
            both = sorted(set(w4a8) & (set(full["exclude"]) | set(four) | set(books)))
            if both:
                raise _bad(where, f"layers {both} are in 'w4a8_layers' and in 'exclude', 'int4_layers' or "
                                  "'codebook_layers'; keep one")
            if w4a8 and (full["weights"] != "int8" or not full["per_channel"]):
                raise _bad(where, "'w4a8_layers' gives layers of an int8 model (per-channel scales) 4-bit weight codes")
            if full["activations"] not in ("uint8", "int8"):
                raise _bad(where, f"activations must be uint8 or int8, got {full['activations']!r}")
            for key in ("bias_correction", "per_channel"):
                if not isinstance(full[key], bool):
                    raise _bad(where, f"{key} must be true or false, got {full[key]!r}")
            if full["int8_method"] not in ("rtn", "gptq", "auto"):
                raise _bad(where, f"int8_method must be rtn, gptq or auto, got {full['int8_method']!r}")
            _check_float_rewrites(where, full)
        if any(s["pass"] == "quantize" for s in out) and name != "qat":
            # a quantized graph: prune and lowrank find no float layer, finetune trains two, cleanup folds the
            # bias correction's Casts into float constants (a larger file), and quantize refuses it
            raise _bad(where, f"a {name} step after a quantize step would work on the quantized model: put it "
                              "before the quantize step (a qat step trains the quantized model)")
        if name == "qat":
            if not any(s.get("pass") == "quantize" for s in out):
                raise _bad(where, "a qat step trains a quantized model: put a quantize step before it")
            if full["distill"] not in ("kl", "mse"):
                raise _bad(where, f"distill must be kl or mse, got {full['distill']!r}")
        if name in TRAINING_PASSES:
            for key in ("lr", "temperature"):
                if key not in full:
                    continue
                if (isinstance(full[key], bool) or not isinstance(full[key], (int, float))
                        or not 0 < full[key] < math.inf):  # Infinity trained nothing and was written back as JSON
                    raise _bad(where, f"{key} must be a finite positive number, got {full[key]!r}")
            if isinstance(full["seed"], bool) or not isinstance(full["seed"], int) or not 0 <= full["seed"] < 2**63:
                raise _bad(where, f"seed must be an integer in 0..2**63-1, got {full['seed']!r}")
            if (full["max_samples"] is not None and isinstance(full["max_samples"], int)
                    and full["max_samples"] < MIN_TRAINING_SAMPLES):
                raise _bad(where, f"max_samples {full['max_samples']} leaves no sample for the 10% validation split "
                                  f"that picks the epoch kept: give at least {MIN_TRAINING_SAMPLES}, or null (all)")
            if not isinstance(full["device"], str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", full["device"]):
                raise _bad(where, f"device must be cpu, cuda, cuda:N or auto, got {full['device']!r}")
        for key in ("max_samples", "batch_size", "multiple", "epochs", "patience"):
            if (key == "max_samples" and name in TRAINING_PASSES or key == "batch_size" and name == "finetune") \
                    and full[key] is None:
                continue
            if key in full and (isinstance(full[key], bool) or not isinstance(full[key], int) or full[key] < 1):
                raise _bad(where, f"{key} must be an integer >= 1, got {full[key]!r}")
        out.append(full)
    return {"version": RECIPE_VERSION, "steps": out, **({"meta": recipe["meta"]} if "meta" in recipe else {})}


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read and validate a recipe from a ``.json`` (or ``.yaml`` when PyYAML is installed) file or a dict.

    Raises:
        OnnxpressError: missing/unreadable file, bad JSON/YAML, or an invalid recipe.
    """
    if isinstance(source, Mapping):
        return validate_recipe(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OnnxpressError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise OnnxpressError(f"recipe {path} is not a text file (JSON or YAML); give the recipe that optimize "
                             "wrote (recipe.json beside its model)") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OnnxpressError(f"recipe {path} is YAML but PyYAML is not installed; use a .json recipe") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OnnxpressError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OnnxpressError(f"recipe {path} is not valid JSON: {exc}") from None
    return validate_recipe(data)


def save_recipe(recipe: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate and write a recipe as indented, key-sorted JSON (atomically)."""
    checked = validate_recipe(recipe)
    out = check_output_path(path, example="model.recipe.json")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxpress-", suffix=".json", dir=out.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(checked, indent=2, sort_keys=True) + "\n")
        move_into_place(tmp, out)
    except OSError as exc:
        raise OnnxpressError(f"cannot write recipe {out}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):  # no scratch file left beside it
            os.unlink(tmp)
    return out


class FixedRanks(SplitLowRank):
    """``SplitLowRank`` with one explicit rank per layer key (layers not named stay whole).

    A small adapter: the pass offers one rank for all layers, an energy, or a MACs budget; the
    search chooses ranks per layer.
    """

    def __init__(self, ranks: Mapping[str, int], **kwargs: Any) -> None:
        """Keep ``ranks`` ({layer key: rank}); other arguments go to ``SplitLowRank``."""
        super().__init__(rank=1, **kwargs)
        self.ranks = {str(k): int(v) for k, v in ranks.items()}

    def _select(self, choices: list[Any], total_macs: int) -> None:
        for ch in choices:
            r = self.ranks.get(ch.layer.key)
            ch.rank = None if r is None or r >= ch.full else r
            if ch.rank is not None and self._cost(ch, ch.rank) >= ch.layer.macs:
                ch.rank = None


def _some(names: Sequence[str], k: int = 6) -> str:
    """A few names as an error's hint: ``a, b, c, ... (N in all)``."""
    names = list(names)
    if not names:
        return "none"
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


_FOREIGN = ("a recipe names the layers of the model it was written for, as its steps before this one leave them: "
            "is this another model's recipe?")


class _NamedGroupsPrune(PruneChannels):
    """``PruneChannels`` that refuses ratios for channel groups the graph it runs on lacks or cannot prune.

    The pass itself skips a group it does not find (the sensitivity probes one group of many), so a
    recipe written for another model would reproduce an unpruned one without a word.
    """

    def __init__(self, where: str, ratio: float | Mapping[str, float], **kwargs: Any) -> None:
        """``where``: the recipe step, for the message; the rest as ``PruneChannels``."""
        super().__init__(ratio, **kwargs)
        self.where = where

    def requires(self, graph: gs.Graph) -> None:
        """Refuse named groups that are not in the graph, or that have fewer than two free channel units."""
        if not isinstance(self.ratio, Mapping):
            return
        # the groups the pass will see: the graph after FoldConstants, as the search's sensitivity named them
        analysis = analyze_channels(graph)
        frozen = analysis.frozen_units()
        groups = {g.name: g for g in analysis.groups()}
        prunable = [name for name, g in groups.items() if sum(u not in frozen for u in g.units) >= 2]
        bad = []
        for name in self.ratio:
            if name not in groups:
                bad.append(f"{name!r} (no such group)")
            elif name not in prunable:
                why = "; ".join(groups[name].frozen) or "fewer than two channel units"
                bad.append(f"{name!r} (nothing to prune: {why})")
        if bad:
            raise _bad(self.where, f"ratio names channel groups this model cannot prune: {', '.join(bad)}; its "
                                   f"prunable groups: {_some(prunable)} (onnxpress.sensitivity.prune_groups lists "
                                   f"them); {_FOREIGN}")


def _check_ranks(where: str, ranks: Mapping[str, int], split: FixedRanks, unpruned: onnx.ModelProto | None) -> None:
    """Refuse ranks the split left whole because their layer is not splittable here or the rank is too large.

    ``split`` has run on the model at this step: its report names every layer it could split (with the
    full rank, ``min(m, n)`` of the weight per group) and every Conv/Gemm/MatMul it declined (with why).
    A rank at or above a layer's full rank leaves it whole (the full rank, exactly); above the full rank
    it is refused, except where an earlier prune step shrank the layer: the search picks ranks on the
    unpruned model (``unpruned``, the model before the recipe's first prune step), so a rank up to the
    layer's full rank there leaves a pruned layer whole.
    """
    full = {r.key: r.full_rank for r in split.report if r.full_rank}  # a declined layer reports 0
    declined = {r.key: r.skipped for r in split.report if r.key not in full}
    unknown = [k for k in ranks if k not in full]
    if unknown:
        named = [f"{k!r} ({declined[k]})" if k in declined else f"{k!r} (no Conv/Gemm/MatMul of that name)"
                 for k in unknown]
        raise _bad(where, f"ranks name layers the low-rank pass cannot split in this model: {', '.join(named)}; "
                          f"its splittable layers: {_some(list(full))}; {_FOREIGN}")
    bound = full
    if unpruned is not None and any(r > full[k] for k, r in ranks.items()):
        from onnxpress.sensitivity import layer_infos

        before = {lay.key: lay.full_rank for lay in layer_infos(unpruned)}
        bound = {k: max(v, before.get(k, 0)) for k, v in full.items()}
    over = [f"{k!r}: {r} > {bound[k]}" for k, r in ranks.items() if r > bound[k]]
    if over:
        raise _bad(where, f"ranks above the layer's full rank (min(m, n) of its weight, per group"
                          f"{'; before the prune step for a pruned layer' if unpruned is not None else ''}): "
                          f"{', '.join(over)}; give at most the full rank (which leaves the layer whole)")


def _check_exclude(where: str, model: onnx.ModelProto, exclude: Sequence[str]) -> None:
    """Refuse ``exclude`` items that match no node of ``model`` (the model at the quantize step).

    A plain item is a layer name: it matches the node of that name or, once ``lowrank`` split the layer,
    its factor nodes (``split_names``, as the step resolves it). ``re:PATTERN`` must match some node
    name; ``op:TYPE`` may name an op type the model lacks (one list for many models).
    """
    names = [n.name for n in model.graph.node if n.name]
    present = set(names)
    bad = []
    for item in exclude:
        if item.startswith("op:"):
            continue
        if item.startswith("re:"):
            try:
                pattern = re.compile(item[3:])
            except re.error as exc:
                raise _bad(where, f"exclude pattern {item!r} is not a valid regular expression: {exc}") from None
            if not any(pattern.search(n) for n in names):
                bad.append(item)
        elif item not in present:  # a split layer's factor nodes, by the pattern the step excludes them with
            factors = re.compile(split_names(item)[1][3:])
            if not any(factors.search(n) for n in names):
                bad.append(item)
    if bad:
        layers = [n.name for n in model.graph.node if n.name and n.op_type in ("Conv", "ConvTranspose", "Gemm",
                                                                                "MatMul")]
        raise _bad(where, f"exclude {bad} matches no node of this model; its layers: {_some(layers or names)} "
                          f"(op:TYPE excludes an op type, re:PATTERN node names by a regular expression); {_FOREIGN}")


def split_names(key: str, present: Collection[str] | None = None) -> list[str]:
    """Quantize-exclude items covering layer ``key`` and the factor nodes ``lowrank`` makes from it.

    With ``present`` (the node names of the model quantize gets) a ``key`` that names no node there (the
    layer was split, or it is an unnamed node's output) is left out: quantize refuses names no node has.
    """
    base = key.replace("/", "_").strip("_") or "layer"
    pattern = f"re:^{re.escape(base)}_(lowrank|tucker)"
    return [pattern] if present is not None and key not in present else [key, pattern]


def prepare(model: ModelSource) -> onnx.ModelProto:
    """The cleaned model every recipe starts from (normalised, constants and BN folded, shapes inferred)."""
    proto = normalize_model(load_model(model), min_opset=13)
    return infer_shapes(run_passes(proto, cleanup_passes()).model)


def finetune_in_place(
    model: onnx.ModelProto, teacher: onnx.ModelProto, data: object, step: Mapping[str, Any], *, progress: bool = False
) -> onnx.ModelProto:
    """Distil ``teacher`` into ``model`` (soft targets only) and write the trained weights back into its graph.

    An adapter over the fine-tune bridge (``onnxpress.bridge``): ``onnxpress.finetune`` re-exports
    the module through torch.onnx, which renames every node, and later steps (``quantize.exclude``)
    name layers; the bridge's writeback export (``OnnxModule.state_to_onnx``, as ``finetune(...,
    exporter="writeback")``) copies the trained initializers into the same graph and keeps every name. Training
    runs with ``seed`` on one torch thread (CPU) or on the step's ``device``, so the result is reproducible on
    one machine.
    """
    from onnxpress.bridge import train as tr
    from onnxpress.bridge.convert import OnnxModule

    student = copy.deepcopy(model)
    arrays = tr.load_arrays(data, student, max_samples=step["max_samples"])
    logits = tr.run_teacher(teacher, arrays, [teacher.graph.output[0].name])[0]
    module = OnnxModule(student)
    config = tr.FinetuneConfig(epochs=step["epochs"], lr=step["lr"], batch_size=step["batch_size"],
                               temperature=step["temperature"], hard_weight=0.0, soft_weight=1.0, seed=step["seed"],
                               patience=step["patience"])
    tr.train_student(module, student, arrays, logits, None, config, threads=1, device=step["device"],
                     progress=progress)
    return module.state_to_onnx(student)  # the bridge's writeback export: same graph, trained weights


def _check_training_samples(model: onnx.ModelProto, calib: object, step: Mapping[str, Any]) -> None:
    """Refuse training data too small for the validation split, before a step loads it (a recipe sets no split).

    Raises:
        DataError: the data (capped by the step's ``max_samples``) holds fewer than ``MIN_TRAINING_SAMPLES``.
    """
    from onnxpress.calibration.readers import open_data
    from onnxpress.errors import DataError

    total = open_data(calib, model).total_samples  # None for an iterable: train_student's own check then
    cap = step["max_samples"]
    n = total if cap is None or total is None else min(total, cap)
    if n is not None and n < MIN_TRAINING_SAMPLES:
        raise DataError(f"the training data holds {n} sample(s); a {step['pass']} step holds 10% out to pick the "
                        f"epoch kept and needs at least {MIN_TRAINING_SAMPLES}: give more samples (--calib)")


@contextlib.contextmanager
def _in_step(where: str) -> Iterator[None]:
    """Prefix an error raised inside a recipe step with ``recipe step N (pass):`` (its own type kept)."""
    try:
        yield
    except OnnxpressError as exc:
        if str(exc).startswith("recipe "):
            raise
        raise type(exc)(f"recipe {where}: {exc}") from None


def apply_recipe(
    model: ModelSource,
    recipe: Mapping[str, Any],
    calib: object | None = None,
    *,
    progress: bool = False,
    prepared: bool = False,
    moments_cache: dict[str, dict[str, Any]] | None = None,
    finetune_cache: dict[str, onnx.ModelProto] | None = None,
) -> onnx.ModelProto:
    """Apply ``recipe`` to ``model`` (never modified) and return the result.

    Args:
        model: path or ModelProto.
        recipe: a recipe dict (validated here).
        calib: calibration data for data-aware low-rank splits and quantization.
        progress: progress bars.
        prepared: ``model`` is already the output of :func:`prepare`.
        moments_cache: reuse input second moments across calls, keyed by the model's digest and the
            step's sample count (one dict per calibration data set: the result is unchanged).
        finetune_cache: reuse fine-tuned models across calls, keyed by the student's and the teacher's
            digests and the step's settings (one dict per calibration data set; the fine-tune is seeded and
            single-threaded, so a recipe that differs only after it builds the same bytes either way).

    Raises:
        OnnxpressError: an invalid recipe; a step that needs ``calib`` without it; a layer, channel group or
            excluded node the model lacks at that step, or a rank above a layer's full rank (each named, with
            some of the model's names); errors of the passes.
    """
    from onnxpress.passes.fold import FoldConstants

    checked = validate_recipe(recipe)
    devices = {s["device"] for s in checked["steps"] if s["pass"] in TRAINING_PASSES} - {"cpu"}
    if devices:
        from onnxpress.bridge.train import resolve_device

        for device in sorted(devices):
            resolve_device(device)  # a recipe made on a GPU fails here, not after its prune and split steps
    current = load_model(model) if prepared else prepare(model)
    teacher = current
    unpruned = None  # the model before the first prune step: the search's ranks are of its layers
    for i, step in enumerate(checked["steps"]):
        name = step["pass"]
        # names in a step (layers, channel groups) are checked against the model as the steps before left it
        where = f"step {i + 1} ({name})"
        with _in_step(where):  # an error inside a step names the step
            if name == "cleanup":
                current = run_passes(current, cleanup_passes(), progress=progress).model
            elif name == "prune":
                unpruned = current if unpruned is None else unpruned
                passes = [FoldConstants(), _NamedGroupsPrune(where, step["ratio"], criterion=step["criterion"],
                                                             multiple=step["multiple"])]
                current = infer_shapes(run_passes(current, passes, progress=progress).model)
            elif name == "lowrank":
                moments = None
                cache_key = f"{model_digest(current)}|{step['max_samples']}|{step['batch_size']}"
                cached = moments_cache.get(cache_key) if moments_cache is not None else None
                if cached is not None and step["data_aware"]:
                    moments = {k: v for k, v in cached.items() if k in step["ranks"]}
                elif step["data_aware"]:
                    if calib is None:
                        raise OnnxpressError(f"recipe step {i + 1} (lowrank, data_aware) needs calibration data "
                                             "(--calib)")
                    from onnxpress.lowrank import collect_moments

                    moments = collect_moments(current, calib, batch_size=step["batch_size"],
                                              max_samples=step["max_samples"], progress=progress)
                    if moments_cache is not None:
                        moments_cache[cache_key] = moments
                    moments = {k: v for k, v in moments.items() if k in step["ranks"]}
                split = FixedRanks(step["ranks"], moments=moments)
                done = run_passes(current, [split], progress=progress).model
                _check_ranks(where, step["ranks"], split, unpruned)  # on split.report: the layers as the pass saw them
                current = infer_shapes(done)
            elif name == "finetune":
                if calib is None:
                    raise OnnxpressError(f"recipe step {i + 1} (finetune) needs training data (--calib)")
                _check_training_samples(current, calib, step)
                key = None  # digests only when there is a cache to look in
                if finetune_cache is not None:
                    key = f"{model_digest(current)}|{model_digest(teacher)}|{json.dumps(step, sort_keys=True)}"
                if key is not None and key in finetune_cache:
                    current = copy.deepcopy(finetune_cache[key])
                else:
                    current = finetune_in_place(current, teacher, calib, step, progress=progress)
                    if key is not None:
                        finetune_cache[key] = copy.deepcopy(current)
            elif name == "qat":
                if calib is None:
                    raise OnnxpressError(f"recipe step {i + 1} (qat) needs training data (--calib)")
                _check_training_samples(current, calib, step)
                from onnxpress.finetune import finetune

                current = finetune(current, teacher, calib, epochs=step["epochs"], lr=step["lr"],
                                   distill=step["distill"], seed=step["seed"], max_samples=step["max_samples"],
                                   batch_size=step["batch_size"],
                                   patience=step["patience"], hard_weight=0.0, threads=1, device=step["device"],
                                   progress=progress).model  # fmt: skip
            elif name == "quantize":
                if calib is None:
                    raise OnnxpressError(f"recipe step {i + 1} (quantize) needs calibration data (--calib)")
                from onnxpress.quantize import quantize

                _check_exclude(where, current, step["exclude"])
                nodes = {n.name for n in current.graph.node}
                exclude = [item for key in step["exclude"] for item in split_names(key, nodes)]
                # int8 QDQ's own settings go to quantize only for an int8 QDQ step: it refuses what int4 or codebook
                # weights would ignore (validate_recipe fills in every default, so they are always there)
                qdq = step["weights"] == "int8" and step["codebook"] is None
                hessians, int8_method = None, step["int8_method"] if qdq else None
                if int8_method == "auto":  # quantize's default rule, decided on this model
                    from onnxpress.quantize import default_int8_method

                    int8_method, _ = default_int8_method(current, calib, max_samples=step["max_samples"])
                if int8_method == "gptq":
                    # the layers' input moments depend on the model before quantize only: candidates that
                    # differ in precision alone share them (keyed like the low-rank moments), and the codes
                    # of unchanged weights too
                    from onnxpress.quantize import gptq_moments

                    cache_key = f"{model_digest(current)}|hessians|{step['max_samples']}|{step['batch_size']}"
                    hessians = moments_cache.get(cache_key) if moments_cache is not None else None
                    if hessians is None:
                        hessians = gptq_moments(current, calib, batch_size=step["batch_size"],
                                                max_samples=step["max_samples"], progress=progress)
                        if moments_cache is not None:
                            moments_cache[cache_key] = hessians
                current = quantize(current, calib=calib, method=step["method"] if qdq else None, exclude=exclude,
                                   weights=step["weights"],
                                   int4_layers=step["int4_layers"], codebook_layers=step["codebook_layers"],
                                   w4a8_layers=step["w4a8_layers"],
                                   activations=step["activations"] if qdq else None, per_channel=step["per_channel"],
                                   bias_correction=step["bias_correction"] and qdq, equalize=step["equalize"],
                                   smoothquant=step["smoothquant"], codebook=step["codebook"],
                                   int8_method=int8_method, hessians=hessians,
                                   gptq_cache=(None if moments_cache is None
                                               else moments_cache.setdefault("gptq codes", {})),
                                   max_samples=step["max_samples"], batch_size=step["batch_size"],
                                   progress=progress).model
    return current
