"""Small helpers for the tables the CLI prints and the facts reports quote."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import onnx

__all__ = ["format_table", "node_count", "op_histogram"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned first column and right-aligned other columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in cells[1:])
    return "\n".join(lines)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of nodes per op type in the main graph, most common first."""
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return dict(counts.most_common())


def node_count(model: onnx.ModelProto) -> int:
    """Number of nodes in the main graph."""
    return len(model.graph.node)


def attention_lines(notes: Sequence[str]) -> list[str]:
    """The ``fuse_attention`` notes among ``notes``, one line per reason (a 12-layer encoder gives one, not 12).

    Each note reads ``"fuse_attention: <softmax>: attention kept as it is (<why>)"``.
    """
    marker = ": attention kept as it is ("
    reasons: dict[str, list[str]] = {}
    for note in notes:
        if note.startswith("fuse_attention: ") and marker in note:
            where, why = note[len("fuse_attention: "):].split(marker, 1)
            reasons.setdefault(why[:-1] if why.endswith(")") else why, []).append(where)
    lines = []
    for why, where in reasons.items():
        names = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        lines.append(f"attention kept as the graph's ops at {len(where)} Softmax node(s) ({names}): {why}")
    return lines
