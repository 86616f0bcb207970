"""Architectures the reference models do not cover, side by side: onnxpress vs onnxruntime's quantize_static.

The reference models are digit classifiers with a 1-channel input. Users bring other shapes, and those
meet other onnxruntime kernels and fusions. This bench builds twelve small networks with torch (random
weights, seed 0, BatchNorm statistics drawn at random so that folding them matters), exports them
(TorchScript exporter, opset 17, dynamic batch) and quantizes each with:

- ``ort-default``: ``quantize_static`` with its defaults (QDQ, per-tensor, int8 activations, MinMax);
- ``ort-best``: per-channel int8 weights, uint8 activations, MinMax;
- ``onnxpress``: ``onnxpress.quantize`` with its defaults;
- ``onnxpress cleanup (fp32)``: ``onnxpress.cleanup`` alone (tenth session): the exact float rewrites every
  pipeline starts with (constant and BatchNorm folding, PRelu as LeakyRelu or Relu + slope * Min).

The networks:

- ``unet``: RGB stem, strided convs, ConvTranspose, bilinear Resize, skip Concats, Sigmoid output;
- ``detector``: Conv+SiLU backbone (x * sigmoid(x) written out) and two 1x1 heads, one through Softmax;
- ``mbconv``: EfficientNet-style blocks (1x1 expand + SiLU, depthwise + SiLU, squeeze-excite with a
  Sigmoid gate, 1x1 project, residual Add);
- ``mnv3``: MobileNetV3-style blocks (HardSwish, depthwise, squeeze-excite with HardSigmoid);
- ``resnext``: ResNeXt-style bottlenecks whose 3x3 conv has 32 groups of 4 or 8 channels, residual Adds;
- ``audio``: Conv1d + BatchNorm + grouped Conv1d, a GRU, mean over time, Linear.
- ``crnn``: text-line recognition (tenth session): three Conv-BN-ReLU + MaxPool stages on a 32 x 128 line,
  its 32 columns as time steps of a bidirectional LSTM, a per-step Linear and log-softmax.
- ``face``: an iresnet-style face embedder (tenth session): BN-Conv-BN-PReLU(64)-Conv-BN residual blocks at
  56 x 56, mean-pool, a 128-d embedding.
- ``separator``: a Conv-TasNet-style source separator (tenth session): strided Conv1d encoder, dilated depthwise
  blocks with a one-slope PReLU and GroupNorm, sigmoid masks, ConvTranspose1d decoder, on 4000 samples.
- ``vit``: a ViT (eleventh session): 16x16 patch conv on 224 x 224 RGB, [CLS] token and learned positions, four
  pre-norm encoder layers (dim 192, 3 heads, GELU MLP), LayerNorm, Linear on [CLS];
- ``vit_tied``: the same built with ``nn.TransformerEncoder``, whose layers are deep copies of one: with random
  weights they are equal, and TorchScript stores each weight once behind one Identity per layer (the layout
  of tied weights: ALBERT, siamese branches);
- ``convnext``: ConvNeXt-style (eleventh session): 4x4 patchify stem + channels-last LayerNorm, blocks of
  depthwise 7x7, LayerNorm over channels (permuted), Linear-GELU-Linear, layer scale, residual; a 2x2 downsample.

Columns: per-output logit SQNR against fp32 (the lowest over outputs, dB) on 64 held-out random
inputs, file size relative to fp32 (tenth session), and latency relative to fp32 at batch 1 and 32
(2 threads, spinning off, every session timed in rotation within each repeat, medians:
``bench/quantize.py``'s ``latency_ratios``). Calibration: 64 seeded standard-normal inputs.
onnxruntime's quantizer runs in a temporary folder (it drops files into the current one). Needs torch
(``pip install -e .[torch]``).

    python bench/architectures.py [--models unet detector mbconv mnv3 resnext audio crnn face separator]
        [--repeats 20]

Seventh session (2026-11-30, quiet 2-core box, ``--repeats 20``, 40 s), onnxpress latency at batch 1 / 32
before (the session's first commit) -> after its quantize changes, SQNR after (lowest output):

- unet: 1.03 / 0.96 -> 0.76 / 0.77, 63.4 dB (onnxruntime best 0.88 / 0.86, 56.0 dB; default 1.19 / 1.16).
  Two encoder convs had run float on dequantized inputs: one ended on a graph output without a Q
  (``_GRAPH_OUTPUT_OPS``), one had its Relu kept in front of the Q by a skip Concat's signed shared
  range; and the RGB stem is faster in fp32 (``_narrow_input_reason``).
- detector: 1.33 / 1.36 -> 1.03 / 0.88, 40.7 dB (best 1.39 / 1.38, 39.4 dB): float RGB stem, and the SiLU
  after it left to onnxruntime's float QuickGelu fusion (``SILU_REASON``).
- mbconv: 1.27 / 1.29 -> 1.21 / 1.17, 47.9 dB (best 1.67 / 1.47, 43.3 dB). Still slower than fp32: the
  squeeze-excite gate Mul runs onnxruntime's general-broadcast QLinearMul (707 us at batch 32 against
  142 us in float NCHW; as a float Mul on the NHWC tensor between DQ and Q it took 417 us + 438 us of DQ/Q,
  worse), and the int8 SiLU costs about what the fused float one does.
- mnv3: 1.16 / 1.60 -> 1.12 / 1.49, 47.9 dB (best 1.56 / 1.75, 43.3 dB): HardSwish has no integer kernel and
  runs as float HardSigmoid + Mul between DQ and Q, where fp32 fuses it into the Conv. Thirty-second session
  (``passes/hard_activations.py``: HardSwish / HardSigmoid as integer Add + Mul), paired, 20 repeats: 1.13 / 1.50 ->
  0.95 / 0.95, 47.90 -> 47.77 dB.
- resnext (added later that session): 1.66 / 1.90 -> 0.85 / 0.97, 52.1 dB (best 1.65-1.71 / 1.87-1.94, 43.8 dB):
  its 32-group 3x3 convs (4 and 8 channels per group) ran as onnxruntime's int8 grouped conv; they now
  stay float (``_narrow_group_reason``), as fast as in fp32, where they take most of the time too.
- audio: 0.99 / 0.76 -> 1.01 / 0.76, 44.8 dB (best 0.87 / 0.75, 42.7 dB): the GRU stays float; its weights
  are stored int8 (``constants_int8_min_size``) and dequantized at every run, 10 us of ~110 us at batch 1.
  Tenth session: GRU/RNN weights are stored float16 behind a Cast that onnxruntime folds at load: 0.86 /
  0.74, 46.0 dB (best 0.87 / 0.73 in that run), size 0.40x fp32 (0.28x int8-stored, 0.64x float32).
- crnn (tenth session): 0.64 / 0.53, 74.3 dB on the log-probabilities (onnxruntime best 0.92 / 0.83, 70.3 dB;
  default 0.99 / 0.98): its LSTM runs as DynamicQuantizeLSTM; kept float (``exclude=["op:LSTM"]``, a script
  not kept) 0.91 / 0.71 at 0.90x size against 0.26x, probability SQNR 64.2 against 62.8 dB.
- Tenth session, ``--models face separator crnn audio --repeats 20``, after the PRelu rewrite
  (``passes/prelu.py``), batch 1 / 32, lowest-output SQNR:
  - face: cleanup alone 0.90 / 0.95 (bit-identical), onnxpress 0.44 / 0.51, 46.5 dB (0.64 / 0.64 with the
    PRelu kept); onnxruntime best 0.62 / 0.62, 42.0 dB; default 0.67 / 0.74, 41.9 dB.
  - separator: cleanup alone 0.42 / 0.43 (its eight one-slope PRelu as LeakyRelu), onnxpress 0.38 / 0.48,
    31.9 dB; onnxruntime best 0.93 / 1.11, 29.4 dB; default 1.09 / 1.31. At batch 32 the float cleanup beats
    the int8 model (its GroupNorms stay float between Q/DQ); ``onnxpress quantize`` now says so when it sees it.
  - crnn: onnxpress 0.57 / 0.50, 74.3 dB; best 0.90 / 0.77; cleanup alone 1.01 / 1.00.
  - audio: onnxpress 0.86 / 0.75, 46.0 dB; best 0.87 / 0.74; cleanup alone 1.00 / 1.00.
- Eleventh session, ``--models vit vit_tied convnext --repeats 20`` (112 s), batch 1 / 32, SQNR, size:
  - vit: onnxpress 0.74 / 0.72, 31.8 dB, 0.266; onnxruntime best 0.97 / 0.82, 11.7 dB, 0.286; default 1.61 / 1.73.
  - vit_tied: onnxpress 0.74 / 0.72, 33.7 dB, 0.293; best 1.55 / 0.98, 11.7 dB, 0.356. Before this session's
    fixes (a script on the same export): 0.97x the float file (the cleanup copied each tied weight per layer,
    then quantizing kept one int8 copy per layer) and the patch conv float (0.46x once the copies were shared).
  - convnext: onnxpress 0.85 / 0.91, 36.1 dB, 0.292; best 1.22 / 1.27, 31.3 dB; default 2.29 / 3.14.
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

MODELS = ("unet", "detector", "mbconv", "mnv3", "resnext", "audio", "crnn", "face", "separator", "vit", "vit_tied",
          "convnext")


def _nets():
    """The torch modules, defined here so that importing this file does not need torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    def cbr(c_in: int, c_out: int, stride: int = 1, act: type = nn.ReLU) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), act())

    class SiLU(nn.Module):  # written out, as many exporters leave it
        def forward(self, x):
            return x * torch.sigmoid(x)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2, self.e3 = cbr(3, 16), cbr(16, 32, 2), cbr(32, 64, 2)
            self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
            self.d1, self.d2 = cbr(64, 32), cbr(48, 16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(a)
            d = self.d1(torch.cat([self.up(self.e3(b)), b], 1))
            d = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
            return torch.sigmoid(self.head(self.d2(torch.cat([d, a], 1))))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(cbr(3, 16, 2, SiLU), cbr(16, 32, 2, SiLU), cbr(32, 32, 1, SiLU))
            self.cls, self.box = nn.Conv2d(32, 5, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            f = self.body(x)
            return self.cls(f).flatten(2).transpose(1, 2).softmax(-1), self.box(f).flatten(2).transpose(1, 2)

    class SE(nn.Module):
        def __init__(self, c: int, gate: type, act: type):
            super().__init__()
            self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1), act(), gate()

        def forward(self, x):
            return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))

    class Block(nn.Module):
        def __init__(self, c: int, act: type, gate: type):
            super().__init__()
            e = 4 * c
            self.body = nn.Sequential(
                nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), act(),
                nn.Conv2d(e, e, 3, 1, 1, groups=e), nn.BatchNorm2d(e), act(),
                SE(e, gate, act), nn.Conv2d(e, c, 1), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.body(x)

    class Mobile(nn.Module):
        def __init__(self, act: type, gate: type):
            super().__init__()
            self.stem = cbr(3, 16, 2, act)
            self.blocks = nn.Sequential(Block(16, act, gate), nn.Conv2d(16, 32, 3, 2, 1), act(),
                                        Block(32, act, gate), Block(32, act, gate))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    class NeXtBlock(nn.Module):
        def __init__(self, c: int, d: int, groups: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c, d, 1), nn.BatchNorm2d(d), nn.ReLU(),
                nn.Conv2d(d, d, 3, 1, 1, groups=groups), nn.BatchNorm2d(d), nn.ReLU(),
                nn.Conv2d(d, c, 1), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    class ResNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 32, 2)
            self.blocks = nn.Sequential(NeXtBlock(32, 128, 32), NeXtBlock(32, 128, 32), cbr(32, 64, 2),
                                        NeXtBlock(64, 256, 32))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    class Audio(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(40, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
                                      nn.Conv1d(64, 64, 3, padding=1, groups=4), nn.ReLU())
            self.gru = nn.GRU(64, 48, batch_first=True)
            self.fc = nn.Linear(48, 12)

        def forward(self, x):
            out, _ = self.gru(self.conv(x).transpose(1, 2))
            return self.fc(out.mean(1))

    class CRNN(nn.Module):  # text-line recognition: conv features, columns as time steps, bidirectional LSTM
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(cbr(1, 32, 1), nn.MaxPool2d(2), cbr(32, 64, 1), nn.MaxPool2d(2),
                                      cbr(64, 128, 1), nn.MaxPool2d((2, 1)))
            self.lstm = nn.LSTM(128 * 4, 128, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(256, 40)

        def forward(self, x):
            f = self.conv(x)  # [B, 128, 4, W/4]
            seq = f.permute(0, 3, 1, 2).reshape(f.shape[0], f.shape[3], -1)
            out, _ = self.lstm(seq)
            return self.fc(out).log_softmax(-1)

    class FaceNet(nn.Module):  # iresnet-style face embedder: BN-Conv-BN-PReLU(C)-Conv-BN blocks, identity adds
        def __init__(self, c: int = 64):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c))
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c),
                              nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)) for _ in range(4))
            self.fc = nn.Linear(c, 128)

        def forward(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = h + block(h)
            return self.fc(h.mean((2, 3)))

    class Separator(nn.Module):  # Conv-TasNet-style: encoder, dilated depthwise blocks with PReLU + GroupNorm, masks
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv1d(1, 64, 16, stride=8, bias=False)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv1d(64, 128, 1), nn.PReLU(), nn.GroupNorm(1, 128),
                              nn.Conv1d(128, 128, 3, padding=2**i, dilation=2**i, groups=128), nn.PReLU(),
                              nn.GroupNorm(1, 128), nn.Conv1d(128, 64, 1)) for i in range(4))
            self.mask = nn.Conv1d(64, 128, 1)
            self.dec = nn.ConvTranspose1d(64, 1, 16, stride=8, bias=False)

        def forward(self, x):
            e = self.enc(x)
            h = e
            for block in self.blocks:
                h = h + block(h)
            m = torch.sigmoid(self.mask(h)).reshape(x.shape[0], 2, 64, -1)
            return self.dec((e.unsqueeze(1) * m).reshape(-1, 64, e.shape[-1])).reshape(x.shape[0], 2, -1)

    class ViT(nn.Module):  # patch-16 stem, [CLS] + learned positions, pre-norm encoder layers, head on [CLS]
        def __init__(self, tied: bool = False, dim: int = 192, depth: int = 4, heads: int = 3):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 16, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 197, dim) * 0.02)

            def layer():
                return nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, activation="gelu", batch_first=True,
                                                  norm_first=True)
            # tied: nn.TransformerEncoder's deep copies of one layer, equal weights that TorchScript stores once
            # behind an Identity per reader; else layers of their own, as a trained ViT has
            self.enc = (nn.TransformerEncoder(layer(), depth) if tied
                        else nn.Sequential(*[layer() for _ in range(depth)]))
            self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, 10)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
            return self.fc(self.norm(self.enc(t))[:, 0])

    class ChannelsLastNorm(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.ln = nn.LayerNorm(c)

        def forward(self, x):
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ConvNeXtBlock(nn.Module):  # ConvNeXt: depthwise 7x7, LayerNorm over channels, Linear-GELU-Linear, layer scale
        def __init__(self, c: int):
            super().__init__()
            self.dw, self.ln = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
            self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
            self.gamma = nn.Parameter(torch.full((c,), 0.5))

        def forward(self, x):
            y = self.pw2(F.gelu(self.pw1(self.ln(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
            return x + y.permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 48, 4, 4), ChannelsLastNorm(48))
            self.stages = nn.Sequential(ConvNeXtBlock(48), ConvNeXtBlock(48), ChannelsLastNorm(48),
                                        nn.Conv2d(48, 96, 2, 2), ConvNeXtBlock(96), ConvNeXtBlock(96))
            self.head = nn.Sequential(nn.LayerNorm(96), nn.Linear(96, 10))

        def forward(self, x):
            return self.head(self.stages(self.stem(x)).mean((2, 3)))

    return {
        "unet": (UNet, (3, 32, 32), ["out"]),
        "detector": (Detector, (3, 64, 64), ["scores", "boxes"]),
        "mbconv": (lambda: Mobile(SiLU, nn.Sigmoid), (3, 64, 64), ["logits"]),
        "mnv3": (lambda: Mobile(nn.Hardswish, nn.Hardsigmoid), (3, 64, 64), ["logits"]),
        "resnext": (ResNeXt, (3, 64, 64), ["logits"]),
        "audio": (Audio, (40, 50), ["logits"]),
        "crnn": (CRNN, (1, 32, 128), ["log_probs"]),
        "face": (FaceNet, (3, 56, 56), ["embedding"]),
        "separator": (Separator, (1, 4000), ["sources"]),
        "vit": (ViT, (3, 224, 224), ["logits"]),
        "vit_tied": (lambda: ViT(tied=True), (3, 224, 224), ["logits"]),
        "convnext": (ConvNeXt, (3, 64, 64), ["logits"]),
    }


def build(name: str, work: Path) -> tuple[Path, tuple[int, ...]]:
    """Export network ``name`` with seeded random weights and BatchNorm statistics; its path and input shape."""
    import torch

    cls, shape, outputs = _nets()[name]
    torch.manual_seed(0)
    net = cls().eval()
    g = torch.Generator().manual_seed(1)
    for mod in net.modules():
        if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 1.5 + 0.5)
    path = work / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, *shape),), str(path), input_names=["input"], output_names=outputs,
                          dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    return path, shape


def outputs(sess, x: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """Every output of ``sess`` over ``x`` (batched)."""
    parts = [sess.run(None, {"input": x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(col) for col in zip(*parts, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from onnxruntime.quantization import CalibrationMethod, QuantType

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            src, shape = build(name, work)
            r = np.random.default_rng(2)
            calib = r.standard_normal((64, *shape)).astype(np.float32)
            test_x = r.standard_normal((64, *shape)).astype(np.float32)
            ours = work / f"{name}_ours.onnx"
            onnxpress.quantize(str(src), str(ours), calib=[{"input": calib}])
            cleaned = work / f"{name}_cleanup.onnx"  # the exact rewrites alone (float): what quantizing adds on top
            onnxpress.cleanup(str(src), str(cleaned))
            paths: dict[str, Path | str] = {"fp32": src, "onnxpress cleanup (fp32)": cleaned, "onnxpress": ours}
            paths["ort-default"] = qbench.ort_quantize(src, calib, work, "ortdef", reader_batch=16)
            paths["ort-best"] = qbench.ort_quantize(src, calib, work, "ortbest", reader_batch=16, per_channel=True,
                                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                                    calibrate_method=CalibrationMethod.MinMax)
            ok = {k: p for k, p in paths.items() if isinstance(p, Path)}
            sessions = {k: make_session(str(p), threads=2) for k, p in ok.items()}
            ref = outputs(sessions["fp32"], test_x)
            lat = {b: qbench.latency_ratios(sessions, test_x, b, args.repeats) for b in (1, 32)}
            for k, p in paths.items():
                if k not in ok:
                    rows.append([name, k, f"failed: {p}", "-", "-", "-"])
                    continue
                got = outputs(sessions[k], test_x)
                sq = "-" if k == "fp32" else f"{min(qbench.sqnr_db(a, b) for a, b in zip(ref, got, strict=True)):.2f}"
                size = ok[k].stat().st_size / src.stat().st_size
                rows.append([name, k, sq, f"{lat[1][k]:.3f}", f"{lat[32][k]:.3f}", f"{size:.3f}"])
            print(f"{name}: done", file=sys.stderr)
    print(format_table(["model", "config", "SQNR dB (lowest output)", "lat b1", "lat b32", "size"], rows))
    print(f"latency and file size relative to fp32, 2 threads, {args.repeats} interleaved repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
