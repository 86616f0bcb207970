"""``onnxpress cleanup MODEL -o OUT``: fold constants and BatchNormalization (exact)."""

from __future__ import annotations

import argparse

from onnxpress.api import cleanup
from onnxpress.cli import add_common, progress_enabled
from onnxpress.reporting import format_table, node_count


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cleanup`` subcommand."""
    p = sub.add_parser(
        "cleanup", help="fold constants and BatchNormalization into Conv/Gemm (exact)",
        description="Make weights held in Constant nodes initializers, fold subgraphs that compute constants and "
        "BatchNormalization into the Conv/Gemm before it; the outputs stay the same in float. Prints what changed.",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the cleaned model")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run cleanup and print what changed."""
    from onnxpress.model_io import check_output_path, load_model

    check_output_path(args.output, [args.model])  # the API below gets a ModelProto and cannot see the path
    before = load_model(args.model)
    result = cleanup(before, args.output, progress=progress_enabled(args))
    # what changed only: the passes' "modified" flags and zero counters buried it
    constants = sum(n.op_type == "Constant" for n in before.graph.node)  # made initializers when loaded
    rows = [["Constant nodes made initializers", str(constants)]] if constants else []
    rows += [[key, str(value)] for key, value in sorted(result.stats.items())
             if value and not key.endswith(".modified")]
    rows.append(["nodes", f"{node_count(before)} -> {node_count(result.model)}"])
    print(format_table(["what", "count"], rows))
    if len(rows) == 1:
        print("nothing to fold: the model was already clean")
    print(f"wrote {result.output}")
    return 0
