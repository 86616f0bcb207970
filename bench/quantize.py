"""Side-by-side quantization bench: onnxruntime's quantize_static vs onnxpress.quantize.

For every reference model in ``--models`` (``resnet``, ``mobilenet``, ``concat``, ``transformer``,
``lstm`` and, when present, ``resnet_opset11`` / ``resnet_constants``), in one run:

- ``ort-default``: ``quantize_static`` in QDQ format with its defaults (per-tensor, QInt8 activations, MinMax);
- ``ort-best``: per-channel, QUInt8 activations, the better (by logit SQNR) of MinMax and Percentile;
- ``onnxpress``: ``onnxpress.quantize`` with its defaults (``--compare-methods`` to compare calibrations,
  ``--auto`` for ``--method auto`` beside the default);
- ``ort-dynamic`` / ``onnxpress-dynamic`` (transformer and lstm): no calibration data: onnxruntime's
  ``quantize_dynamic`` (per channel) and ``onnxpress.quantize`` without ``calib`` (dynamic activations);
  ``ort-dynamic[pre]`` (lstm): ``quant_pre_process`` first, which folds the Concat that builds the LSTM's
  weights in the dynamo export (``quantize_dynamic`` alone leaves that LSTM float);
- ``onnxpress-int4``: weight-only int4 with its default rounding given calibration data (GPTQ), and
  ``onnxpress-int4[rtn]`` with round-to-nearest (what it does without data) (transformer only).
- ``onnxpress-w4a8``: ``weights="int4", activations="uint8"``: 4-bit codes (weights of 4096+ elements, one scale
  per channel, GPTQ-rounded) on onnxruntime's int8 kernels, stored two to a byte (every model but the LSTM).

Columns: logit SQNR vs fp32 on the test split (dB), top-1 agreement with fp32, accuracy, latency
relative to fp32 at batch 1 and 64 (2 threads, spinning off, every session timed in rotation within
each repeat, medians), file size relative to fp32. onnxruntime's quantizer runs inside a temporary
folder because it drops ``*.data`` and ``sym_shape_infer_temp.onnx`` into the current one.

    python bench/quantize.py [--models models] [--repeats 15] [--only resnet,mobilenet]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxpress
from onnxpress.reporting import format_table
from onnxpress.runtime import make_session

MODELS = ("resnet", "mobilenet", "concat", "transformer", "lstm", "resnet_opset11", "resnet_constants")


@contextlib.contextmanager
def _in_dir(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration array (batches of ``batch``)."""

    def __init__(self, x: np.ndarray, batch: int = 50) -> None:
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"input": self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def ort_quantize(src: Path, calib: np.ndarray, work: Path, tag: str, reader_batch: int = 50, **kwargs) -> Path | str:
    """quantize_static in QDQ format, run inside ``work``; the output path or the error text."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    out = work / f"{src.stem}_{tag}.onnx"
    try:
        with _in_dir(str(work)):
            quantize_static(str(src), str(out), _Reader(calib, reader_batch), quant_format=QuantFormat.QDQ, **kwargs)
    except Exception as exc:  # the anchor's own failures are part of the result
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def session_or_error(path: Path) -> object | str:
    """A 2-thread onnxruntime session of ``path``, or the text of why it does not load."""
    try:
        return make_session(str(path), threads=2)
    except onnxpress.OnnxpressError as exc:
        return str(exc)


def logits(sess, x: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.sum((ref.astype(np.float64) - out) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise)) if noise > 0 else float("inf")


def latency_ratios(sessions: dict[str, object], x: np.ndarray, batch: int, repeats: int,
                   reference: str = "fp32") -> dict[str, float]:
    """Median over repeats of (session time / ``reference`` time in the same repeat); sessions rotate in a repeat.

    Each measurement runs the session enough times to take ~40 ms at fp32 speed, so scheduler noise
    on a shared machine averages out; the per-repeat ratio cancels slow drifts of the machine load.
    """
    feed = {"input": np.ascontiguousarray(x[:batch])}
    names = list(sessions)
    for s in sessions.values():  # warm up
        for _ in range(3):
            s.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(5):
        sessions[reference].run(None, feed)
    inner = max(2, int(0.04 / ((time.perf_counter() - t0) / 5)))
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        took = {}
        for n in order:
            s = sessions[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                s.run(None, feed)
            took[n] = time.perf_counter() - t0
        for n in names:
            ratios[n].append(took[n] / took[reference])
    return {n: float(np.median(v)) for n, v in ratios.items()}


def bench_model(name: str, folder: Path, calib: np.ndarray, test_x: np.ndarray, labels: np.ndarray, args) -> list[list]:
    src = folder / f"{name}.onnx"
    rows: list[list] = []
    with tempfile.TemporaryDirectory(prefix="onnxpress-bench-") as tmp:
        work = Path(tmp)
        candidates: dict[str, Path | str] = {"fp32": src}
        from onnxruntime.quantization import CalibrationMethod, QuantType

        candidates["ort-default"] = ort_quantize(src, calib, work, "default")
        best_kw = {"per_channel": True, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
        ort_best = {
            "minmax": ort_quantize(src, calib, work, "best_mm", calibrate_method=CalibrationMethod.MinMax, **best_kw),
            "percentile": ort_quantize(
                src, calib, work, "best_pct", calibrate_method=CalibrationMethod.Percentile, **best_kw
            ),
        }
        for method in args.methods:
            out = work / f"{name}_onnxpress_{method}.onnx"
            try:
                onnxpress.quantize(src, out, calib=folder / "digits32_calib.npz", method=method)
                candidates[f"onnxpress[{method}]" if len(args.methods) > 1 else "onnxpress"] = out
            except onnxpress.OnnxpressError as exc:
                candidates[f"onnxpress[{method}]"] = f"{type(exc).__name__}: {exc}"
        if name in ("transformer", "lstm"):
            # no calibration data: onnxruntime's quantize_dynamic (per channel, its best) vs quantize's default then
            from onnxruntime.quantization import quantize_dynamic

            out = work / f"{name}_ort_dynamic.onnx"
            with _in_dir(str(work)):
                quantize_dynamic(str(src), str(out), per_channel=True)
            candidates["ort-dynamic"] = out
            if name == "lstm":  # the dynamo export builds W and R with Concat: quantize_dynamic skips the LSTM
                from onnxruntime.quantization.shape_inference import quant_pre_process  # folds them first

                pre, out = work / f"{name}_pre.onnx", work / f"{name}_ort_dynamic_pre.onnx"
                with _in_dir(str(work)):
                    quant_pre_process(str(src), str(pre))
                    quantize_dynamic(str(pre), str(out), per_channel=True)
                candidates["ort-dynamic[pre]"] = out
            out = work / f"{name}_onnxpress_dynamic.onnx"
            onnxpress.quantize(src, out)  # no calib: dynamic activations
            candidates["onnxpress-dynamic"] = out
        if name != "lstm":  # int4 codes on the int8 kernels (W4A8; the LSTM's weights run in DynamicQuantizeLSTM)
            out = work / f"{name}_onnxpress_w4a8.onnx"
            onnxpress.quantize(src, out, calib=folder / "digits32_calib.npz", weights="int4", activations="uint8")
            candidates["onnxpress-w4a8"] = out
        if name == "transformer":
            extra = {} if args.block_size is None else {"block_size": args.block_size}
            # default with calibration data: GPTQ rounding; [rtn]: round to nearest, as without data
            for tag, kw in (("onnxpress-int4", {}), ("onnxpress-int4[rtn]", {"int4_method": "rtn"})):
                out = work / f"{name}_{tag.replace('[', '_').rstrip(']')}.onnx"
                onnxpress.quantize(src, out, weights="int4", calib=folder / "digits32_calib.npz", **extra, **kw)
                candidates[tag] = out

        sessions, outputs = {}, {}
        for tag, path in list(candidates.items()) + [(f"ort-best[{m}]", p) for m, p in ort_best.items()]:
            if isinstance(path, str):
                continue
            session = session_or_error(path)
            if isinstance(session, str):
                candidates[tag] = session
                if tag.startswith("ort-best["):
                    ort_best[tag[9:-1]] = session
                continue
            sessions[tag] = session
            outputs[tag] = logits(sessions[tag], test_x)
        ref = outputs["fp32"]
        # ORT's best config: the better of MinMax / Percentile by logit SQNR.
        scored = [(sqnr_db(ref, outputs[f"ort-best[{m}]"]), m) for m in ort_best if f"ort-best[{m}]" in outputs]
        if scored:
            _, m = max(scored)
            candidates["ort-best"] = ort_best[m]
            sessions["ort-best"] = sessions[f"ort-best[{m}]"]
            outputs["ort-best"] = outputs[f"ort-best[{m}]"]
            best_label = f"ort-best ({m})"
        else:
            # each config's reason once, whole: the first 60 characters were "onnxruntime cannot load the model:
            # [ONNXRuntimeError] : 10 :", without onnxruntime's reason
            candidates["ort-best"] = "; ".join(dict.fromkeys(str(p) for p in ort_best.values()))
            best_label = "ort-best"
        for m in ort_best:
            sessions.pop(f"ort-best[{m}]", None)
        timed = dict(sessions)
        lat1 = latency_ratios(timed, test_x, 1, args.repeats)
        lat64 = latency_ratios(timed, test_x, 64, args.repeats)
        size0 = src.stat().st_size
        order = ["fp32", "ort-default", "ort-best"] + [k for k in candidates if k.startswith("onnxpress")]
        order += [k for k in candidates if k.startswith("ort-dynamic")]
        for tag in order:
            path = candidates[tag]
            label = best_label if tag == "ort-best" else tag
            if isinstance(path, str):
                rows.append([name, label, f"failed: {path[:110]}", "", "", "", "", ""])
                continue
            out = outputs[tag]
            agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
            acc = float(np.mean(out.argmax(1) == labels))
            rows.append(
                [
                    name,
                    label,
                    "-" if tag == "fp32" else f"{sqnr_db(ref, out):.2f}",
                    f"{100 * agree:.2f}%",
                    f"{100 * acc:.2f}%",
                    f"{lat1[tag]:.3f}",
                    f"{lat64[tag]:.3f}",
                    f"{path.stat().st_size / size0:.3f}",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="folder with the reference models and digits32 data")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all present)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compare-methods", action="store_true", help="onnxpress with kl, minmax, percentile and mse")
    ap.add_argument("--auto", action="store_true", help="also onnxpress --method auto (each tensor's range method "
                    "chosen on the calibration outputs; same graph, so the same latency as the default)")
    ap.add_argument("--block-size", type=int, default=None, help="int4 block size (default: quantize's default)")
    args = ap.parse_args(argv)
    from onnxpress.quantize import DEFAULT_METHOD

    args.methods = ["kl", "minmax", "percentile", "mse"] if args.compare_methods else [DEFAULT_METHOD]
    args.methods += ["auto"] if args.auto else []
    rows = run_models(bench_model, MODELS, args)
    if rows is None:
        return 2
    print(format_table(HEADER, rows))
    print(f"latency and size relative to fp32; {args.repeats} interleaved repeats, 2 threads; onnx {onnx.__version__}")
    return 0


HEADER = ["model", "config", "SQNR dB", "top-1 agree", "accuracy", "lat b1", "lat b64", "size"]


def run_models(bench, models: tuple[str, ...], args) -> list[list] | None:
    """``bench(name, folder, calib, test_x, labels, args)`` rows for each model of ``args.only`` (default:
    ``models``) present in ``args.models``; None (and a message) when there is none."""
    logging.basicConfig(level=logging.ERROR)
    folder = Path(args.models).resolve()
    calib = np.load(folder / "digits32_calib.npz")["input"]
    test = np.load(folder / "digits32_test.npz")
    test_x, labels = test["input"], test["labels"]
    names = [n for n in (args.only.split(",") if args.only else models) if (folder / f"{n}.onnx").exists()]
    if not names:
        print(f"no reference models in {folder}", file=sys.stderr)
        return None
    rows: list[list] = []
    for name in names:
        rows += bench(name, folder, calib, test_x, labels, args)
        print(f"done {name}", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
