"""Fine-tuning a compressed language model through the bridge: token ids in, per-token logits out.

The model is ``bench/tied_lm.py``'s GPT (vocab 8000, dim 256, 4 decoder layers, tied embeddings, random
weights, seed 0), exported by dynamo or TorchScript. The student is its data-aware low-rank split to
``--flops`` of the MACs (``onnxpress.lowrank``, moments from 32 random sequences). It is distilled from
the original on ``--train`` random sequences of 64 tokens (soft targets over the vocabulary axis, T = 4,
``--epochs`` epochs, the default 10% held out for early stopping), then exported back (``exporter="auto"``).

Rows: the student before and after the fine-tune. Columns, on ``--test`` other random sequences, against
the original on onnxruntime:
- next-token top-1 agreement;
- the mean KL(teacher ‖ student) of the softmax over the vocabulary, in nats: what distillation minimises;
- the logit SQNR. Distillation matches the softmax, not the logits: the SQNR can fall while the KL and
  the agreement improve.

Wall time and the epoch kept are printed too. Needs torch.

Thirteenth session (2-core box, defaults, ``--exports dynamo torchscript``, 3 min 15 s):

| export | model | top-1 agr | KL nats | SQNR dB | fine-tune |
| --- | --- | --- | --- | --- | --- |
| dynamo | low-rank student | 0.3063 | 8.499 | 3.73 | - |
| dynamo | after the fine-tune | 0.9938 | 0.031 | 0.35 | 96 s, epoch 6 of 6 |
| torchscript | low-rank student | 0.3063 | 8.499 | 3.73 | - |
| torchscript | after the fine-tune | 0.9937 | 0.031 | 0.35 | 82 s, epoch 6 of 6 |

    python bench/finetune_lm.py [--exports dynamo torchscript] [--flops 0.5] [--epochs 6] [--train 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tied_lm  # noqa: E402  (the GPT builder)

import onnxpress  # noqa: E402
from onnxpress.finetune import kl_nats, sqnr_db  # noqa: E402
from onnxpress.reporting import format_table  # noqa: E402
from onnxpress.runtime import make_session  # noqa: E402


def _logits(model, ids: np.ndarray) -> np.ndarray:
    session = make_session(model, what="bench")
    return np.concatenate([session.run(None, {"input": ids[i : i + 32]})[0] for i in range(0, len(ids), 32)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", nargs="+", default=["dynamo"], choices=["dynamo", "torchscript"])
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=512, help="random training sequences")
    parser.add_argument("--test", type=int, default=128, help="random held-out sequences")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(1)
    seqs = lambda n: rng.integers(0, tied_lm.VOCAB, (n, tied_lm.SEQ)).astype(np.int64)  # noqa: E731
    calib, train, test = seqs(32), seqs(args.train), seqs(args.test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for export in args.exports:
            path = Path(tmp) / f"gpt_{export}.onnx"
            tied_lm.build(export, path)
            z_teacher = _logits(str(path), test)
            student = onnxpress.lowrank(str(path), flops=args.flops, calib=[{"input": calib}]).model
            start = time.perf_counter()
            res = onnxpress.finetune(student, str(path), {"input": train}, epochs=args.epochs, lr=args.lr,
                                     batch_size=32, threads=args.threads)  # fmt: skip
            wall = time.perf_counter() - start
            for label, model in (("low-rank student", student), ("after the fine-tune", res.model)):
                z = _logits(model, test)
                rows.append([
                    export, label, f"{np.mean(z.argmax(-1) == z_teacher.argmax(-1)):.4f}",
                    f"{kl_nats(z_teacher, z):.3f}", f"{sqnr_db(z_teacher, z):.2f}",
                    f"{wall:.0f} s, epoch {res.history.best_epoch} of {len(res.history.train_loss)}"
                    if model is res.model else "-",
                ])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    print()
    print(f"GPT vocab {tied_lm.VOCAB}, dim {tied_lm.DIM}, {tied_lm.LAYERS} layers; low-rank to {args.flops:g} of "
          f"the MACs; {args.train} training / {args.test} test sequences of {tied_lm.SEQ} random tokens")
    print(format_table(["export", "model", "top-1 agr", "KL nats", "SQNR dB", "fine-tune"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
