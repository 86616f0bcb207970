"""Quantizing without calibration data, side by side: onnxpress (dynamic int8) vs onnxruntime's quantize_dynamic.

Two torch-built token models (random weights, seed 0; dynamo exports with a dynamic batch and sequence), the
kind users quantize without data:

- ``bert``: a 4-layer ``nn.TransformerEncoder`` (d = 256, 4 heads, GELU), a 2000-word embedding, a learned
  positional table, token ids and a padding mask as inputs, a 2-class head on the first token;
- ``decoder``: a 2-layer RMSNorm / causal SDPA / SwiGLU decoder over a 512-word vocabulary (opset 18);
- ``einsum`` (tenth session): a 2-layer encoder (d = 256) whose QKV, output and MLP projections are
  ``torch.einsum`` with weight tensors, as einops-style code writes them (they export as ONNX ``Einsum``).

Rows: ``fp32``; ``ort-dynamic`` / ``ort-dynamic[pc]``: ``quantize_dynamic`` per tensor (its default) and per
channel; ``onnxpress``: ``onnxpress.quantize`` without ``calib`` (dynamic activations, per-channel weights).
Columns: logit SQNR against fp32 on 64 held-out sequences of 32 tokens (batches of 16), latency relative to
fp32 at batch 1 and 16 (2 threads, interleaved medians), file size relative to fp32. onnxruntime's quantizer
runs in a temporary folder. Needs torch (``pip install -e .[torch]``).

    python bench/no_data.py [--models bert decoder einsum] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantize as qbench  # noqa: E402  (bench/quantize.py: sqnr and the temporary-folder helper)

import onnxpress  # noqa: E402
from onnxpress.reporting import format_table  # noqa: E402
from onnxpress.runtime import make_session, time_interleaved  # noqa: E402

MODELS = ("bert", "decoder", "einsum")


def build(name: str, out: Path) -> dict[str, np.ndarray]:
    """Export ``name`` to ``out``; returns the held-out feed (64 sequences of 32 tokens)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name == "bert":
        class Bert(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(2000, 256)
                self.pos = nn.Parameter(torch.randn(1, 128, 256) * 0.02)
                layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True, activation="gelu")
                self.encoder = nn.TransformerEncoder(layer, 4)
                self.head = nn.Linear(256, 2)

            def forward(self, ids, mask):
                x = self.embed(ids) + self.pos[:, : ids.shape[1]]
                return self.head(self.encoder(x, src_key_padding_mask=mask == 0)[:, 0])

        model, names = Bert().eval(), ["ids", "mask"]
        example = (torch.randint(0, 2000, (2, 32)), torch.ones(2, 32, dtype=torch.int64))
        ids = rng.integers(0, 2000, (64, 32)).astype(np.int64)
        mask = np.ones((64, 32), np.int64)
        mask[32:, 24:] = 0  # half the sequences padded
        feed = {"ids": ids, "mask": mask}
    elif name == "decoder":
        class Block(nn.Module):
            def __init__(self, d: int = 128, heads: int = 4, hidden: int = 344):
                super().__init__()
                self.heads = heads
                self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
                self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
                self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
                self.down = nn.Linear(hidden, d, bias=False)

            def forward(self, x):
                b, t, d = x.shape
                q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                           for z in self.qkv(self.n1(x)).split(d, -1))
                x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
                h = self.n2(x)
                return x + self.down(F.silu(self.gate(h)) * self.up(h))

        class Decoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(512, 128)
                self.blocks = nn.ModuleList([Block(), Block()])
                self.norm, self.head = nn.RMSNorm(128), nn.Linear(128, 512, bias=False)

            def forward(self, ids):
                x = self.embed(ids)
                for block in self.blocks:
                    x = block(x)
                return self.head(self.norm(x))

        model, names = Decoder().eval(), ["ids"]
        example = (torch.randint(0, 512, (2, 16)),)
        feed = {"ids": rng.integers(0, 512, (64, 32)).astype(np.int64)}
    else:  # einsum: an encoder whose projections are einsums with weight tensors, as einops-style code writes them
        class EinsumBlock(nn.Module):
            def __init__(self, d: int = 256, heads: int = 4, ffn: int = 1024):
                super().__init__()
                self.qkv = nn.Parameter(torch.randn(d, 3, heads, d // heads) / d**0.5)
                self.o = nn.Parameter(torch.randn(heads, d // heads, d) / d**0.5)
                self.w1 = nn.Parameter(torch.randn(d, ffn) / d**0.5)
                self.w2 = nn.Parameter(torch.randn(ffn, d) / ffn**0.5)
                self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

            def forward(self, x):
                q, k, v = torch.einsum("btd,dshk->sbhtk", self.n1(x), self.qkv)
                a = torch.softmax(torch.einsum("bhtk,bhsk->bhts", q, k) / q.shape[-1] ** 0.5, -1)
                x = x + torch.einsum("bhtk,hkd->btd", torch.einsum("bhts,bhsk->bhtk", a, v), self.o)
                h = torch.relu(torch.einsum("btd,df->btf", self.n2(x), self.w1))
                return x + torch.einsum("btf,fd->btd", h, self.w2)

        class EinsumEncoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(512, 256)
                self.blocks = nn.Sequential(EinsumBlock(), EinsumBlock())
                self.head = nn.Linear(256, 2)

            def forward(self, ids):
                return self.head(self.blocks(self.embed(ids)).mean(1))

        model, names = EinsumEncoder().eval(), ["ids"]
        example = (torch.randint(0, 512, (2, 16)),)
        feed = {"ids": rng.integers(0, 512, (64, 32)).astype(np.int64)}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example, dynamo=True, input_names=names, output_names=["logits"],
                                    dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), verbose=False)
    program.save(str(out))
    return feed


def outputs(session, feed: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    n = next(iter(feed.values())).shape[0]
    return np.concatenate([session.run(None, {k: v[i : i + batch] for k, v in feed.items()})[0]
                           for i in range(0, n, batch)])


def bench_model(name: str, work: Path, repeats: int) -> list[list]:
    from onnxruntime.quantization import quantize_dynamic

    src = work / f"{name}.onnx"
    feed = build(name, src)
    paths = {"fp32": src}
    for tag, kwargs in (("ort-dynamic", {}), ("ort-dynamic[pc]", {"per_channel": True})):
        paths[tag] = work / f"{name}_{tag.replace('[', '_').rstrip(']')}.onnx"
        with qbench._in_dir(str(work)):
            quantize_dynamic(str(src), str(paths[tag]), **kwargs)
    paths["onnxpress"] = work / f"{name}_onnxpress.onnx"
    onnxpress.quantize(src, paths["onnxpress"])  # no calib: dynamic activations
    sessions = {tag: make_session(str(p), threads=2) for tag, p in paths.items()}
    ref = outputs(sessions["fp32"], feed)
    lat = {}
    for batch in (1, 16):
        part = {k: v[:batch] for k, v in feed.items()}
        times = time_interleaved(list(sessions.values()), part, repeats, warmup=3)
        med = [statistics.median(t) for t in times]
        lat[batch] = {tag: m / med[0] for tag, m in zip(sessions, med, strict=True)}
    size0 = src.stat().st_size
    rows = []
    for tag, path in paths.items():
        out = outputs(sessions[tag], feed)
        rows.append([name, tag, "-" if tag == "fp32" else f"{qbench.sqnr_db(ref, out):.2f}",
                     f"{lat[1][tag]:.3f}", f"{lat[16][tag]:.3f}", f"{path.stat().st_size / size0:.3f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    rows: list[list] = []
    with tempfile.TemporaryDirectory(prefix="onnxpress-bench-") as tmp:
        for name in args.models:
            rows += bench_model(name, Path(tmp), args.repeats)
            print(f"done {name}", file=sys.stderr, flush=True)
    print(format_table(["model", "config", "SQNR dB", "lat b1", "lat b16", "size"], rows))
    print(f"latency and size relative to fp32; {args.repeats} interleaved runs per batch size, 2 threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
