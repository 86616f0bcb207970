"""float16 exports, side by side: onnxpress vs onnxruntime's quantize_static on the same half-precision model.

Users export in half precision (``model.half()`` before ``torch.onnx.export``) for a GPU and then want
a fast CPU model from the same file. Each reference model is turned into such an export: its trained
weights through ``onnxpress.bridge`` (an ``OnnxModule``), ``.half()``, ``torch.onnx.export(dynamo=True)``
with a dynamic batch. Needs torch (``pip install -e .[torch]``).

Rows per model:
- ``fp16``: the export itself, the reference of every column;
- ``fp32``: the original float32 model (the precision the export gave up);
- ``ort-default``: ``quantize_static`` (QDQ) with its defaults on the float16 export, float16 calibration data;
- ``ort-best``: per-channel, QUInt8 activations, MinMax (its best config in ``bench/quantize.py``);
- ``onnxpress``: ``onnxpress.quantize`` with its defaults (float32 inside, float16 inputs/outputs);
- ``onnxpress int4`` / ``onnxpress int4 keep-float16`` (transformer): 4-bit weight-only (GPTQ) through
  float32 inside, or kept in float16 (``keep_float16=True``: MatMulNBits with float16 scales).

Columns: logit SQNR against the float16 export on the digits test split, top-1 agreement with it,
accuracy, latency relative to it at batch 1 and 64 (2 threads, every session timed in rotation,
medians; ``bench/quantize.py``'s loop), file size relative to it. onnxruntime's quantizer runs in a
temporary folder (it drops files into the current one).

    python bench/half_precision.py [--models models] [--only resnet,transformer] [--repeats 15]
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

MODELS = ("resnet", "mobilenet", "concat", "transformer")


def export_float16(src: Path, out: Path, example: np.ndarray) -> None:
    """``src``'s weights in a torch module, ``.half()``, exported by dynamo with a dynamic batch."""
    import torch

    from onnxpress.bridge.convert import OnnxModule

    module = OnnxModule(onnx.load(src)).half().eval()
    x = torch.from_numpy(example[:2]).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=(({0: torch.export.Dim("batch")},),), verbose=False)
    onnx.save(program.model_proto, out)


def bench_model(name: str, folder: Path, calib: np.ndarray, test_x: np.ndarray, labels: np.ndarray,
                args) -> list[list]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    rows: list[list] = []
    with tempfile.TemporaryDirectory(prefix="onnxpress-bench-") as tmp:
        work = Path(tmp)
        half = work / f"{name}_fp16.onnx"
        export_float16(folder / f"{name}.onnx", half, test_x)
        calib16, test16 = calib.astype(np.float16), test_x.astype(np.float16)
        np.savez(work / "calib16.npz", input=calib16)
        candidates: dict[str, Path | str] = {"fp16": half, "fp32": folder / f"{name}.onnx"}
        candidates["ort-default"] = qbench.ort_quantize(half, calib16, work, "default")
        candidates["ort-best"] = qbench.ort_quantize(
            half, calib16, work, "best", calibrate_method=CalibrationMethod.MinMax, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        variants = {"onnxpress": {}}
        if name == "transformer":  # 4-bit weights: through float32 inside (the default here) or kept float16
            variants.update({"onnxpress int4": {"weights": "int4"},
                             "onnxpress int4 keep-float16": {"weights": "int4", "keep_float16": True}})
        for tag, kwargs in variants.items():
            ours = work / f"{name}_{tag.replace(' ', '_')}.onnx"
            try:
                onnxpress.quantize(half, ours, calib=work / "calib16.npz", **kwargs)
                candidates[tag] = ours
            except onnxpress.OnnxpressError as exc:
                candidates[tag] = f"{type(exc).__name__}: {exc}"
        sessions, outputs = {}, {}
        for tag, path in candidates.items():
            if isinstance(path, str):
                continue
            session = qbench.session_or_error(path)
            if isinstance(session, str):
                candidates[tag] = session
                continue
            sessions[tag] = session
            feed_x = test_x if tag == "fp32" else test16
            outputs[tag] = qbench.logits(sessions[tag], feed_x).astype(np.float64)
        x_for = {tag: (test_x if tag == "fp32" else test16) for tag in sessions}
        lat = {}
        for batch in (1, 64):  # the fp32 model takes float32 inputs: it is timed on its own feed
            lat[batch] = _ratios(sessions, x_for, batch, args.repeats)
        ref = outputs["fp16"]
        size0 = half.stat().st_size
        for tag, path in candidates.items():
            if isinstance(path, str):
                rows.append([name, tag, f"failed: {path[:70]}", "", "", "", "", ""])
                continue
            out = outputs[tag]
            rows.append([
                name, tag, "-" if tag == "fp16" else f"{qbench.sqnr_db(ref, out):.2f}",
                f"{100 * np.mean(out.argmax(1) == ref.argmax(1)):.2f}%",
                f"{100 * np.mean(out.argmax(1) == labels):.2f}%",
                f"{lat[1][tag]:.3f}", f"{lat[64][tag]:.3f}", f"{path.stat().st_size / size0:.3f}",
            ])  # fmt: skip
    return rows


def _ratios(sessions: dict, x_for: dict, batch: int, repeats: int) -> dict[str, float]:
    """``qbench.latency_ratios`` with each session fed its own dtype (one wrapper per session)."""

    class Fed:
        def __init__(self, session, x):
            self.session, self.feed = session, {"input": np.ascontiguousarray(x[:batch])}

        def run(self, _outputs, _feed):
            return self.session.run(None, self.feed)

    wrapped = {tag: Fed(s, x_for[tag]) for tag, s in sessions.items()}
    return qbench.latency_ratios(wrapped, x_for["fp16"], batch, repeats, reference="fp16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="folder with the reference models and digits32 data")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all present)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    rows = qbench.run_models(bench_model, MODELS, args)
    if rows is None:
        return 2
    print(format_table(qbench.HEADER, rows))
    print(f"SQNR, agreement, latency and size against the float16 export; {args.repeats} interleaved repeats, "
          f"2 threads; onnx {onnx.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
