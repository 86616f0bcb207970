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
