"""A GPT-style language model with tied embeddings: onnxpress vs onnxruntime's quantizers, side by side.

Language models tie the token table to the output layer (GPT-2, Gemma, Qwen and Phi-4-mini's small sizes):
one ``W [vocab, dim]`` is read by the embedding ``Gather`` and, transposed, by the last MatMul. It is often
the largest tensor. How an export stores it differs:

- torch's dynamo exporter: ``W`` once, and a ``Transpose(W)`` node in front of the output MatMul;
- the TorchScript exporter: ``W`` and a folded ``W.T``, two initializers.

The model: vocab 8000, dim 256, 4 pre-norm decoder layers (4 heads, causal ``scaled_dot_product_attention``,
tanh-GELU MLP), random weights (seed 0), inputs of 64 token ids named ``input``. The table is 2.05M of the
5.21M parameters. Calibration: 32 random sequences; evaluation: 16 others.

Rows per export:

- ``ort quantize_dynamic``: onnxruntime's data-free int8 (its defaults);
- ``ort quantize_static best``: QDQ, per-channel int8 weights, uint8 activations, MinMax;
- ``ort MatMulNBits``: onnxruntime's 4-bit weight-only quantizer (``MatMulNBitsQuantizer``, its defaults:
  block 128, asymmetric);
- ``onnxpress int8`` / ``onnxpress dynamic`` / ``onnxpress int4``: ``onnxpress.quantize`` with its defaults and
  ``activations="dynamic"`` / ``weights="int4"``.

Columns: logit SQNR against fp32 (dB), next-token top-1 agreement, latency relative to fp32 at batch 1 and 8
(2 threads, interleaved rounds, medians: ``bench/quantize.py``'s ``latency_ratios``), file size relative to
the float file (the dynamo export's float file stores the table once, the TorchScript one twice).
onnxruntime's quantizers run in a temporary folder. Needs torch.

    python bench/tied_lm.py [--repeats 15] [--exports dynamo torchscript]

Eleventh session (2026-11-30, quiet 2-core box, ``--repeats 12``, 37 s):

| export | config | SQNR dB | top-1 agr | lat b1 | lat b8 | size |
| --- | --- | --- | --- | --- | --- | --- |
| dynamo | ort quantize_dynamic | 35.82 | 1.0000 | 0.815 | 0.711 | 0.260 |
| dynamo | ort quantize_static best | 24.81 | 1.0000 | 0.719 | 0.696 | 0.264 |
| dynamo | ort MatMulNBits | 30.69 | 1.0000 | 1.003 | 1.043 | 0.483 |
| dynamo | onnxpress int8 | 36.86 | 1.0000 | 0.555 | 0.524 | 0.254 |
| dynamo | onnxpress dynamic | 36.60 | 1.0000 | 0.522 | 0.496 | 0.256 |
| dynamo | onnxpress int4 | 19.47 | 1.0000 | 0.972 | 1.079 | 0.141 |
| torchscript | ort quantize_dynamic | 34.41 | 1.0000 | 0.578 | 0.535 | 0.254 |
| torchscript | ort quantize_static best | 16.79 | 1.0000 | 0.707 | 0.689 | 0.260 |
| torchscript | ort MatMulNBits | 19.64 | 1.0000 | 1.013 | 1.069 | 0.382 |
| torchscript | onnxpress int8 | 36.85 | 1.0000 | 0.619 | 0.544 | 0.186 |
| torchscript | onnxpress dynamic | 36.60 | 1.0000 | 0.634 | 0.553 | 0.188 |
| torchscript | onnxpress int4 | 19.47 | 1.0000 | 1.006 | 1.063 | 0.104 |

- onnxruntime's MatMulNBits leaves the dynamo export's output layer float (its weight is a Transpose output,
  not an initializer) and the token table float in both: 30.69 dB at 0.483x there. onnxpress's int4 stores the
  table once as the head's 4-bit blocks (GatherBlockQuantized): 19.47 dB at 0.141x; on the TorchScript export
  both quantize the head, 19.64 vs 19.47 dB, at 0.382 vs 0.104x.
- int4 is weight-only: MatMulNBits runs no faster than fp32 on this CPU (as on the reference transformer).
- The TorchScript float file stores the table twice; onnxpress's int8 file stores it once (0.186x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantize as qbench  # noqa: E402  (bench/quantize.py: the anchor's runner and the timing loop)

import onnxpress  # noqa: E402
from onnxpress.reporting import format_table  # noqa: E402
from onnxpress.runtime import make_session  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, SEQ = 8000, 256, 4, 4, 64


def build(export: str, path: Path) -> None:
    """Export the seeded GPT-style model with ``export`` ("dynamo" or "torchscript") to ``path``."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (y.view(b, t, HEADS, d // HEADS).transpose(1, 2) for y in self.qkv(self.ln1(x)).split(d, -1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
            self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
            self.ln, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)
            self.head.weight = self.wte.weight  # tied

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], device=ids.device)
            return self.head(self.ln(self.blocks(self.wte(ids) + self.wpe(pos))))

    torch.manual_seed(0)
    net = GPT().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if export == "dynamo":
            dims = {"ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=SEQ)}}
            torch.onnx.export(net, (ids,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=dims, dynamo=True, external_data=False)
        else:
            torch.onnx.export(net, (ids,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch", 1: "seq"}}, opset_version=17, dynamo=False)


def ort_int4(src: Path, work: Path) -> Path | str:
    """onnxruntime's MatMulNBitsQuantizer with its defaults; the output path or the error text."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = work / f"{src.stem}_ort_int4.onnx"
    try:
        with qbench._in_dir(str(work)):
            q = MatMulNBitsQuantizer(onnx.load(str(src)))
            q.process()
            q.model.save_model_to_file(str(out), use_external_data_format=False)
    except Exception as exc:  # the anchor's own failures are part of the result
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def ort_dynamic(src: Path, work: Path) -> Path | str:
    """onnxruntime's quantize_dynamic with its defaults; the output path or the error text."""
    from onnxruntime.quantization import quantize_dynamic

    out = work / f"{src.stem}_ort_dynamic.onnx"
    try:
        with qbench._in_dir(str(work)):
            quantize_dynamic(str(src), str(out))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def bench_export(export: str, work: Path, repeats: int) -> list[list[str]]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    src = work / f"gpt_{export}.onnx"
    build(export, src)
    r = np.random.default_rng(3)
    calib = r.integers(0, VOCAB, (32, SEQ)).astype(np.int64)
    test_x = r.integers(0, VOCAB, (16, SEQ)).astype(np.int64)
    paths: dict[str, Path | str] = {"fp32": src}
    paths["ort quantize_dynamic"] = ort_dynamic(src, work)
    paths["ort quantize_static best"] = qbench.ort_quantize(
        src, calib, work, "ortbest", reader_batch=8, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    paths["ort MatMulNBits"] = ort_int4(src, work)
    for tag, kw in (("int8", {}), ("dynamic", {"activations": "dynamic"}), ("int4", {"weights": "int4"})):
        out = work / f"gpt_{export}_{tag}.onnx"
        onnxpress.quantize(str(src), str(out), calib=None if tag == "dynamic" else [{"input": calib}], **kw)
        paths[f"onnxpress {tag}"] = out
    ok = {k: p for k, p in paths.items() if isinstance(p, Path)}
    sessions = {k: make_session(str(p), threads=2) for k, p in ok.items()}
    ref = qbench.logits(sessions["fp32"], test_x, batch=8)
    lat = {b: qbench.latency_ratios(sessions, test_x, b, repeats) for b in (1, 8)}
    rows = []
    for k, p in paths.items():
        if k not in ok:
            rows.append([export, k, f"failed: {p}", "-", "-", "-", "-"])
            continue
        got = qbench.logits(sessions[k], test_x, batch=8)
        agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        sq = "-" if k == "fp32" else f"{qbench.sqnr_db(ref, got):.2f}"
        size = ok[k].stat().st_size / src.stat().st_size
        rows.append([export, k, sq, f"{agree:.4f}", f"{lat[1][k]:.3f}", f"{lat[8][k]:.3f}", f"{size:.3f}"])
    print(f"{export}: done", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", nargs="+", default=["dynamo", "torchscript"], choices=["dynamo", "torchscript"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for export in args.exports:
            rows += bench_export(export, Path(tmp), args.repeats)
    print(format_table(["export", "config", "SQNR dB", "top-1 agr", "lat b1", "lat b8", "size"], rows))
    print(f"latency and file size relative to the float export, 2 threads, {args.repeats} interleaved repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
