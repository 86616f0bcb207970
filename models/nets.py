"""The five reference networks; every one maps ``input`` [B,1,32,32] to ``logits`` [B,10].

- ``ResNet``: Conv-BN-ReLU stem, residual blocks ``relu(bn(conv(relu(bn(conv(x))))) + s(x))``
  where ``s`` is the identity or, for the downsampling blocks, a strided 1x1 Conv+BN projection;
  global average pool, Flatten, Linear.
- ``MobileNet``: depthwise separable blocks (depthwise 3x3 Conv-BN-ReLU6, pointwise 1x1
  Conv-BN-ReLU6), three with stride 2. ReLU6 and per-channel-skewed depthwise weights make it
  hard to quantize on purpose.
- ``ConcatNet``: a stem and MaxPool, then an Inception-like block whose three branches
  (1x1; 1x1 -> 3x3; 3x3 -> 3x3) are concatenated on the channel axis, then more convs.
- ``Transformer``: 4x4 patches of the 32x32 image (64 tokens x 16 features, patched inside the
  model with Reshape/Transpose), Linear embedding, learned positional embedding, two pre-norm
  encoder layers written by hand (MatMul, LayerNormalization, Softmax, Gelu), mean-pool, Linear.
- ``RowLSTM``: the image's 32 rows read as a sequence (32 steps x 32 features) by a bidirectional
  ``nn.LSTM`` (exported as one ONNX ``LSTM``), mean over time, Linear: the recurrent model of speech
  and sequence exports, whose weights sit in the LSTM op rather than in MatMul/Gemm.

Why 4x4 patches and not the 8 rows: the 32x32 image is a bilinear upsampling of the 8x8 digit,
so a 4x4 patch is one original pixel plus its interpolated neighbourhood. That gives 64 tokens,
so attention is a real [64x64] MatMul per head (the point of a MatMul-heavy reference model),
while 8 row tokens would make attention negligible next to the projections.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NETS", "ConcatNet", "MobileNet", "ResNet", "RowLSTM", "Transformer", "count_macs"]

NUM_CLASSES = 10


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN, plus identity or 1x1 projection shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3))
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem 32@32x32, block 32@32x32, down-block 64@16x16, down-block 128@8x8, GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 32, 3), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 64, stride=2), BasicBlock(64, 128, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


class MobileNet(nn.Module):
    """Stem 3x3 Conv-BN-ReLU6, six depthwise separable blocks (three stride 2), GAP, Linear."""

    # (cin, cout, stride) per depthwise separable block
    CFG = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3), nn.ReLU6()]
        for cin, cout, stride in self.CFG:
            layers += [*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6()]
            layers += [*_conv_bn(cin, cout, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(256, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.flatten(self.pool(self.features(x))))


class Inception(nn.Module):
    """Three branches concatenated on channels: 1x1 | 1x1->3x3 | 3x3->3x3 (each Conv-BN-ReLU)."""

    def __init__(self, cin: int, c1: int, c3: int, c5: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(cin, c1, 1), nn.ReLU())
        self.b3 = nn.Sequential(*_conv_bn(cin, c3 // 2, 1), nn.ReLU(), *_conv_bn(c3 // 2, c3, 3), nn.ReLU())
        self.b5 = nn.Sequential(*_conv_bn(cin, c5, 3), nn.ReLU(), *_conv_bn(c5, c5, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)


class ConcatNet(nn.Module):
    """Stem 32@32x32, MaxPool, Inception(32 | 48 | 16) @16x16, Conv 128 s2, Conv 128, GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.inception = Inception(32, 32, 48, 16)
        self.head = nn.Sequential(*_conv_bn(96, 128, 3, stride=2), nn.ReLU(), *_conv_bn(128, 128, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(self.flatten(self.pool(self.head(self.inception(self.stem(x))))))


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over ``heads`` heads, as plain MatMuls (no fused op)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B,T,D] -> [B,H,T,Dh]
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        y = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B,H,T,Dh]
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        return self.out(y)


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + Attn(LN(x)), then x + FFN(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class Transformer(nn.Module):
    """4x4 patches -> 64 tokens x 16 -> Linear(128) + pos -> 2 encoder layers -> LN -> mean -> Linear."""

    PATCH = 4

    def __init__(self, dim: int = 128, heads: int = 4, ffn: int = 512, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        grid = 32 // self.PATCH
        self.embed = nn.Linear(self.PATCH * self.PATCH, dim)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        p, g = self.PATCH, 32 // self.PATCH
        # [B,1,32,32] -> [B,g,p,g,p] -> [B,g,g,p,p] -> [B,g*g,p*p]
        x = x.reshape(x.shape[0], g, p, g, p).transpose(2, 3).reshape(x.shape[0], g * g, p * p)
        x = self.layers(self.embed(x) + self.pos)
        return self.fc(self.norm(x).mean(dim=1))


class RowLSTM(nn.Module):
    """The 32 image rows as 32 time steps of 32 features -> bidirectional LSTM(128) -> mean over time -> Linear."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y, _ = self.lstm(x.reshape(x.shape[0], 32, 32))
        return self.fc(y.mean(dim=1))


NETS: dict[str, type[nn.Module]] = {
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "concat": ConcatNet,
    "transformer": Transformer,
    "lstm": RowLSTM,
}


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample of Conv2d, Linear, one-layer LSTMs and attention MatMuls (others ignored)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    def lstm_hook(m: nn.LSTM, inp: tuple[torch.Tensor, ...], _out: object) -> None:
        nonlocal total
        steps = inp[0].shape[1] if m.batch_first else inp[0].shape[0]
        directions = 2 if m.bidirectional else 1
        per_step = 4 * m.hidden_size * (m.input_size + m.hidden_size)  # W x and R h, four gates (one layer)
        total += steps * directions * per_step

    def attn_hook(m: SelfAttention, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal total
        tokens, dim = inp[0].shape[1], inp[0].shape[2]
        total += 2 * tokens * tokens * dim  # Q K^T and P V

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, SelfAttention):
            hooks.append(m.register_forward_hook(attn_hook))
        elif isinstance(m, nn.LSTM):
            if m.num_layers != 1:
                raise ValueError("count_macs counts one-layer LSTMs")
            hooks.append(m.register_forward_hook(lstm_hook))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return total
