"""The ``onnxpress`` command line.

The CLI only parses arguments and calls the same Python API users call. Each subcommand lives in
``onnxpress.commands.<name>`` and exposes ``register(subparsers)``, which adds its parser with
``set_defaults(func=run)``; ``run(args) -> int``. Our own errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from onnxpress.errors import OnnxpressError

__all__ = ["build_parser", "main"]

# Only commands that work are listed (no stubs).
_COMMANDS: tuple[str, ...] = (
    "onnxpress.commands.calibrate",
    "onnxpress.commands.cleanup",
    "onnxpress.commands.finetune",
    "onnxpress.commands.lowrank",
    "onnxpress.commands.optimize",
    "onnxpress.commands.prune",
    "onnxpress.commands.quantize",
    "onnxpress.commands.validate",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from onnxpress import __version__

    parser = argparse.ArgumentParser(
        prog="onnxpress",
        description="Make exported ONNX models smaller and faster; validate them on onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"onnxpress {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand shares."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--sample-axis", action="append", type=_sample_axis, default=[], metavar="INPUT=AXIS",
                        dest="sample_axes", help="the axis of INPUT that holds the samples, where onnxpress cannot "
                        "tell (a sequence-first [seq, batch, ...] input: x=1; found by itself for an RNN's input or "
                        "a dimension named batch), or none for an input exported for one sample (x[3,224,224]: each "
                        "feed is one sample; an .npz stacks them on a new axis 0); repeatable")


def int_at_least(minimum: int, what: str):
    """An argparse ``type`` for an integer >= ``minimum``; ``what`` names it in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type by it in its own messages
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def bounded_float(low: float, high: float, *, include_low: bool, include_high: bool, what: str = "a number"):
    """An argparse ``type`` for a float between ``low`` and ``high`` (ends included as stated)."""
    interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {text!r}") from None
        inside_low = value >= low if include_low else value > low
        inside_high = value <= high if include_high else value < high
        if not (inside_low and inside_high):
            raise argparse.ArgumentTypeError(f"expected {what} in {interval}, got {value}")
        return value

    return parse


def add_dims(parser: argparse.ArgumentParser) -> None:
    """``--dim NAME=SIZE`` (repeatable): sizes of symbolic input dimensions for counting MACs."""
    parser.add_argument("--dim", action="append", type=_dim, default=[], metavar="NAME=SIZE", dest="dims",
                        help="size of a symbolic input dimension beyond the batch (a sequence length), for counting "
                             "MACs; by its name, or INPUT:AXIS when unnamed. Default: the first calibration sample's")


def usage_error(command: str, message: str) -> int:
    """Print a refusal of the command line itself as argparse words its own, and return the exit status 2."""
    print(f"onnxpress {command}: error: {message}", file=sys.stderr)
    return 2


def dims_of(args: argparse.Namespace) -> dict[str, int]:
    """The ``--dim`` sizes as a dict; one name given two different sizes is an error, not the last one kept."""
    out: dict[str, int] = {}
    for name, size in args.dims:
        if out.get(name, size) != size:
            raise OnnxpressError(f"--dim {name} is given twice, as {out[name]} and {size}: give it once")
        out[name] = size
    return out


def _sample_axes_of(args: argparse.Namespace) -> dict[str, int | None]:
    """The ``--sample-axis`` axes as a dict; one input given two different axes is an error, as for ``--dim``."""
    axes: dict[str, int | None] = {}
    for name, axis in getattr(args, "sample_axes", []):
        if axes.get(name, axis) != axis:
            raise OnnxpressError(f"--sample-axis {name} is given twice, as {axes[name]} and {axis}: give it once")
        axes[name] = axis
    return axes


def _check_sample_axis_names(args: argparse.Namespace) -> None:
    """Refuse ``--sample-axis`` names the command's model does not take, before the command runs.

    Only commands that read data consulted the axes, so ``cleanup`` or a dynamic ``quantize`` took a misspelt
    name without a word. The model is parsed once more for this (its external data is not read); a file that
    does not load is left to the command, which says why.
    """
    if not getattr(args, "sample_axes", None):
        return
    paths = [getattr(args, a, None) for a in ("model", "student", "reference")]
    path = next((p for p in paths if isinstance(p, str)), None)
    if path is None or not os.path.isfile(path):
        return
    import onnx

    from onnxpress.calibration.readers import check_given_axes

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 -- not a model: the command's own loading says what is wrong
        return
    check_given_axes(model)


def _sample_axis(text: str) -> tuple[str, int | None]:
    name, sep, axis = text.rpartition("=")
    if sep and name and axis.lower() == "none":  # no sample axis: one sample per run
        return name, None
    if not sep or not name or not axis.isdigit():
        raise argparse.ArgumentTypeError(f"expected INPUT=AXIS with an axis >= 0 or none, got {text!r}")
    return name, int(axis)


def _dim(text: str) -> tuple[str, int]:
    name, eq, size = text.rpartition("=")
    if not eq or not name or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with a positive integer size, got {text!r}")
    return name, int(size)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--quiet`` or stderr is not a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 2 for our errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM (kill, a job scheduler's timeout) unwinds like Ctrl-C, so the scratch files beside the output are
    # removed: it used to end the process where it stood, leaving .onnxpress-*/ with a partial model
    previous = _handle_sigterm()
    from onnxpress.calibration.readers import samples_on

    try:
        with samples_on(_sample_axes_of(args)):
            _check_sample_axis_names(args)
            return int(args.func(args) or 0)
    except OnnxpressError as exc:
        print(f"onnxpress: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("onnxpress: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    except KeyboardInterrupt:
        print("onnxpress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnxpress validate ... | head`: the reader left; stop quietly, as a shell tool does
        with contextlib.suppress(OSError, ValueError):  # and keep the interpreter's exit flush from failing again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a writer whose pipe was closed
    except OSError as exc:  # after BrokenPipeError, one of them
        if exc.errno != errno.ENAMETOOLONG:
            raise
        # a path component over the file system's limit (255 bytes), in any path a command was given
        print(f"onnxpress: error: file name too long: {exc.filename or exc}; use a shorter name", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands; a KeyboardInterrupt, so every cleanup for Ctrl-C runs for it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _handle_sigterm() -> object | None:
    """Install the SIGTERM handler (main thread only: ``main`` may run in a test's worker thread); the old one."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
