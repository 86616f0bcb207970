"""A model over protobuf's 2 GiB limit, end to end: onnxpress beside onnxruntime's quantizers.

Builds ``--layers`` MatMul+Relu layers of ``--dim`` x ``--dim`` float32 weights (9 x 8192: 2.4 GB, stored as
external data) in a temporary folder, then runs each job in a fresh child process (so its peak memory is its
own), from an empty working folder:

- ``ours calibrate``: ``onnxpress.calibrate(model, data, method="kl")``;
- ``ort calibrate``: ``create_calibrator`` (MinMax, quantize_static's default; ``use_external_data_format=True``),
  ``collect_data``, ``compute_data``, from its default augmented-model path (the working folder);
- ``ours int8``: ``onnxpress.quantize(model, out, calib=data)`` (defaults: QDQ, per-channel int8 weights,
  uint8 activations);
- ``ort int8``: ``quantize_static`` in QDQ format, per-channel, uint8 activations, MinMax, with
  ``use_external_data_format=True`` (which it needs for this model);
- ``ours int4``: ``onnxpress.quantize(model, out, weights="int4")`` (MatMulNBits, block 32);
- ``ort int4``: ``MatMulNBitsQuantizer`` (block 32, symmetric), saved with external data.

For each it prints the wall time, the peak RSS (VmHWM) and its ratio to the model's weight bytes, the files
left in the working folder besides the output, the output's size ratio, and the logit SQNR against the float
model on held-out inputs (onnxruntime CPU). Calibration data: 16 samples; held-out: 16 others (seeded).

    python bench/large_model.py [--layers 9] [--dim 8192] [--dir /tmp]   # ~6 min, ~10 GB of memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("ours calibrate", "ort calibrate", "ours int8", "ort int8", "ours int4", "ort int4")


def build(folder: Path, layers: int, dim: int) -> Path:
    """The float model (external data) and ``calib.npz`` / ``test.npz`` in ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "input"
    for i in range(layers):
        w = rng.standard_normal((dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", dim])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")  # fmt: skip
    np.savez(folder / "calib.npz", input=rng.standard_normal((16, dim), dtype=np.float32))
    np.savez(folder / "test.npz", input=rng.standard_normal((16, dim), dtype=np.float32))
    return path


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _reader(calib: np.ndarray) -> object:
    """onnxruntime's usual data reader: one sample per call."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.i += 1
            return {"input": calib[self.i - 1 : self.i]} if self.i <= len(calib) else None

    return Reader()


def child(job: str, folder: str, workdir: str) -> None:
    """Run one job from ``workdir``; print a JSON line."""
    import onnxruntime  # noqa: F401  (imported before the clock starts, like onnxpress)

    import onnxpress

    src = Path(folder) / "model.onnx"
    calib = np.load(Path(folder) / "calib.npz")["input"]
    os.chdir(workdir)
    out = Path(workdir) / "out.onnx"
    t0 = time.perf_counter()
    result: dict[str, object] = {}
    try:
        if job == "ours calibrate":
            onnxpress.calibrate(str(src), [{"input": calib}], method="kl")
            out = None
        elif job == "ours int8":
            onnxpress.quantize(str(src), str(out), calib=[{"input": calib}])
        elif job == "ours int4":
            onnxpress.quantize(str(src), str(out), weights="int4", block_size=32)
        elif job == "ort calibrate":
            from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

            cal = create_calibrator(str(src), calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
            cal.collect_data(_reader(calib))
            cal.compute_data()
            out = None
        elif job == "ort int8":
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

            quantize_static(str(src), str(out), _reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=True)  # fmt: skip
        elif job == "ort int4":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True)
            q.process()
            q.model.save_model_to_file(str(out), use_external_data_format=True)
        result["time"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001  (reported in the table)
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ''}"
    result["peak_mb"] = _hwm_mb()
    if out is not None and out.exists():
        result["out_bytes"] = sum(p.stat().st_size for p in Path(workdir).iterdir() if p.name.startswith("out.onnx"))
    result["left"] = sorted(p.name for p in Path(workdir).iterdir() if not p.name.startswith("out.onnx"))
    print(json.dumps(result))


def sqnr(folder: Path, candidates: dict[str, Path]) -> dict[str, float]:
    """Logit SQNR (dB) of each candidate against the float model on the held-out inputs."""
    from onnxpress.runtime import make_session

    x = np.load(folder / "test.npz")["input"]
    ref = make_session(str(folder / "model.onnx")).run(None, {"input": x})[0].astype(np.float64)
    out = {}
    for name, path in candidates.items():
        y = make_session(str(path)).run(None, {"input": x})[0].astype(np.float64)
        out[name] = float(10 * np.log10(np.sum(ref**2) / np.sum((y - ref) ** 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--dir", default=None, help="where to build the model (default: the system temp folder)")
    parser.add_argument("--jobs", default=",".join(JOBS))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(ROOT))
    from onnxpress.reporting import format_table

    with tempfile.TemporaryDirectory(prefix="onnxpress-large-", dir=args.dir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        build(folder, args.layers, args.dim)
        weights = (folder / "model.onnx.data").stat().st_size
        print(f"model: {args.layers} x MatMul {args.dim}x{args.dim} + Relu, {weights / 2**30:.2f} GiB of weights "
              f"(built in {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        rows, outputs = [], {}
        for job in args.jobs.split(","):
            work = folder / job.replace(" ", "-")
            work.mkdir()
            proc = subprocess.run([sys.executable, __file__, "--child", job, str(folder), str(work)],
                                  capture_output=True, text=True)  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:150]}
            if "out_bytes" in res:
                outputs[job] = work / "out.onnx"
            rows.append((job, res))
            print(f"  {job}: {res.get('time', float('nan')):.1f} s, peak {res.get('peak_mb', 0) / 1024:.2f} GB"
                  + (f", error {res['error']}" if "error" in res else ""), flush=True)  # fmt: skip
        quality = sqnr(folder, outputs)
        table = []
        for job, res in rows:
            table.append([
                job,
                f"{res['time']:.1f}" if "time" in res else "failed",
                f"{res.get('peak_mb', 0) / 1024:.2f}",
                f"{res.get('peak_mb', 0) * 2**20 / weights:.2f}",
                f"{res['out_bytes'] / weights:.3f}" if "out_bytes" in res else "-",
                f"{quality[job]:.2f}" if job in quality else "-",
                ", ".join(res.get("left", [])) or "none",
                res.get("error", ""),
            ])  # fmt: skip
        print(format_table(["job", "time s", "peak GB", "peak / weights", "size", "SQNR dB", "files left", "error"],
                           table))  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
