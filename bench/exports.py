"""Other exports of the reference transformer, side by side: onnxpress vs onnxruntime's best quantize_static.

The reference models are dynamo exports with a dynamic batch. Users hand in other exports of the
same layers, and those trip onnxruntime's fusions in ways the reference does not show:

- ``fixed-batch``: ``models/transformer.onnx`` (trained weights) with its batch fixed to 1. With all
  shapes known, onnxruntime turns ``MatMul + Add`` into a Gemm before its QDQ fusions
  (``passes/matmul_bias.py``).
- ``torchscript-17`` / ``torchscript-13``: ``models.nets.Transformer`` (random weights, seed 0,
  dropout off) through the TorchScript exporter. GELU comes out written around Erf, Reshape targets
  are Shape arithmetic, and at opset 13 LayerNorm is written out too (``gelu_chain_nodes`` and
  ``norm_chain_nodes`` in ``passes/qdq.py``). These need torch.

Per variant: logit SQNR against the variant's own fp32 on the digits test split, and latency relative to
that fp32 at batch 1 (2 threads, every session timed in rotation, medians; ``bench/quantize.py``'s
``latency_ratios``). onnxruntime's config: per-channel int8 weights, uint8 activations, MinMax,
QDQ, run in a temporary folder (it drops files into the current one).

    python bench/exports.py [--repeats 25] [--variants fixed-batch torchscript-17 torchscript-13]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantize as qbench  # noqa: E402  (bench/quantize.py: the anchor's runner and the timing loop)

import onnxpress  # noqa: E402
from onnxpress.reporting import format_table  # noqa: E402
from onnxpress.runtime import make_session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fixed-batch", "torchscript-17", "torchscript-13")


def build(variant: str, work: Path) -> Path:
    """Write ``variant``'s float model into ``work`` and return its path."""
    out = work / f"{variant}.onnx"
    if variant == "fixed-batch":
        model = onnx.load(str(ROOT / "models" / "transformer.onnx"))
        for vi in (model.graph.input[0], model.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].dim_value = 1
        del model.graph.value_info[:]
        onnx.save(model, str(out))
        return out
    import torch

    from models.nets import Transformer

    torch.manual_seed(0)
    net = Transformer(dropout=0.0).eval()
    opset = int(variant.rsplit("-", 1)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.randn(1, 1, 32, 32),), str(out), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return out


def logits(sess, x: np.ndarray, fixed: bool) -> np.ndarray:
    if not fixed:
        return qbench.logits(sess, x)
    return np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args(argv)
    calib = np.load(ROOT / "models" / "digits32_calib.npz")["input"]
    test_x = np.load(ROOT / "models" / "digits32_test.npz")["input"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in args.variants:
            src = build(variant, work)
            fixed = variant == "fixed-batch"
            ours = work / f"{variant}_ours.onnx"
            feeds = [{"input": calib[i : i + 1]} for i in range(256)] if fixed else [{"input": calib}]
            onnxpress.quantize(str(src), str(ours), calib=feeds)
            from onnxruntime.quantization import CalibrationMethod, QuantType

            best = qbench.ort_quantize(src, calib[:256], work, "ortbest", reader_batch=1 if fixed else 50,
                                       per_channel=True, activation_type=QuantType.QUInt8,
                                       weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            paths = {"fp32": src, "onnxpress": ours}
            if isinstance(best, Path):
                paths["ort-best"] = best
            sessions = {k: make_session(str(p), threads=2) for k, p in paths.items()}
            ref = logits(sessions["fp32"], test_x, fixed)
            lat = qbench.latency_ratios(sessions, test_x, 1, args.repeats)
            for name in paths:
                sq = qbench.sqnr_db(ref, logits(sessions[name], test_x, fixed)) if name != "fp32" else None
                rows.append([variant, name, "-" if sq is None else f"{sq:.2f}", f"{lat[name]:.3f}"])
            if not isinstance(best, Path):
                rows.append([variant, "ort-best", f"failed: {best}", "-"])
    print(format_table(["export", "config", "SQNR dB", "lat b1"], rows))
    print(f"latency relative to each export's own fp32, batch 1, 2 threads, {args.repeats} interleaved repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
