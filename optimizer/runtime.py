"""onnxruntime sessions, built one way everywhere (CPU provider, spinning off, optional threads)."""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxpress.errors import UnsupportedModelError
from onnxpress.model_io import external_small_tensors_hint, is_large, split_large

__all__ = ["make_session", "quiet_run_options", "time_interleaved"]


def quiet_run_options() -> ort.RunOptions:
    """Run options that keep onnxruntime's own error line (red, on stderr) out of a failed run.

    For a caller that turns the exception into its own one-line error, which repeats the message: a
    calibration batch with a token id out of the embedding's range printed it twice.
    """
    opts = ort.RunOptions()
    opts.log_severity_level = 4
    return opts

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | None = None,
    what: str = "model",
    initializers: Sequence[onnx.TensorProto] = (),
    external_data_folder: str | os.PathLike[str] | None = None,
) -> ort.InferenceSession:
    """Build a CPU InferenceSession from a ModelProto (in memory, no file) or a path.

    Thread spinning is turned off so that two sessions timed side by side on few cores do not steal
    each other's cores. A model too large to serialise (over ~1.8 GiB of weights) is handed over without
    its big initializers, which onnxruntime takes from memory; so are ``initializers``, which complete a
    model built without them (``split_large``'s light copy). ``external_data_folder``: where the data files
    of a ModelProto's external tensors are (``load_model(path, external_data=False)`` keeps them as
    references; onnxruntime then reads them itself, memory-mapped, instead of from our copy).

    Raises:
        UnsupportedModelError: onnxruntime cannot load the model (its first message line is kept).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[optimization]
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    if external_data_folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_folder))
    handed_over: list[np.ndarray] = []  # OrtValues view these arrays: alive until the session has copied them
    if isinstance(model, onnx.ModelProto) and (initializers or is_large(model)):
        model = _in_memory_initializers(model, initializers, opts, handed_over)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        first = ort_message(exc)
        if "IR version" in first:
            first += f" (onnxruntime {ort.__version__}: upgrade it, or save the model with a lower ir_version)"
        first += external_small_tensors_hint(first)
        raise UnsupportedModelError(f"onnxruntime cannot load the {what}: {first}") from None


def ort_message(exc: BaseException, limit: int = 300) -> str:
    """The first line of an onnxruntime error without its C++ source location and function signature.

    onnxruntime writes ``[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/.../model.cc:256
    onnxruntime::Model::Model(onnx::ModelProto&&, ...) Unsupported model IR version: 12, max ...``: the
    location and signature took 250 of the 300 characters kept, and cut the reason off.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    found = re.match(r"(\[ONNXRuntimeError\] : \d+ : \w+ : )\S+\.(?:cc|h|cpp):\d+ (.*)$", line)
    if found:
        rest, depth, cut = found.group(2), 0, None
        for i, ch in enumerate(rest):  # skip the function signature: up to its balanced closing parenthesis
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    cut = i + 1
                    break
            elif ch == " " and depth == 0 and "(" not in rest[:i]:
                break  # no signature (a plain message follows the location)
        line = found.group(1) + (rest[cut:].strip() if cut is not None else rest)
    return line[:limit]


_IN_MEMORY = "onnxpress-in-memory"


def _in_memory_initializers(
    model: onnx.ModelProto,
    initializers: Sequence[onnx.TensorProto],
    opts: ort.SessionOptions,
    arrays: list[np.ndarray],
) -> onnx.ModelProto:
    """A light model whose big initializers onnxruntime takes from memory (no file is written).

    The big initializers of a model too large to serialise (:func:`onnxpress.model_io.split_large`), and
    ``initializers``, become external-data references that are never read; their values go to
    ``SessionOptions.add_external_initializers``, which replaces such references before the graph is
    optimised and copies the data (onnxruntime's documentation: the buffers may be freed once the
    session is built). The values are appended to ``arrays``, which the caller keeps until then (an
    OrtValue made from a numpy array does not keep it alive).
    """
    light, big = split_large(model) if is_large(model) else (copy.deepcopy(model), [])
    values = []
    for tensor in [*big, *initializers]:
        array = np.ascontiguousarray(numpy_helper.to_array(tensor))
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", _IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        arrays.append(array)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    opts.add_external_initializers([t.name for t in [*big, *initializers]], values)
    return light


def time_interleaved(
    sessions: Sequence[ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    rounds: int,
    *,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Seconds per run of each session: ``warmup`` untimed runs each, then ``rounds`` timed rounds.

    Every round runs each session once, the order rotated by one per round (for two sessions: forward,
    then backward), so that the load of other processes hits every session alike; ``clock`` is
    ``time.perf_counter`` (latency) or ``time.process_time`` (CPU time, blind to waiting for a core).
    """
    for session in sessions:
        for _ in range(warmup):
            session.run(None, dict(feed))
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(rounds):
        for i in [*range(r % n, n), *range(r % n)]:
            t0 = clock()
            sessions[i].run(None, dict(feed))
            times[i].append(clock() - t0)
    return times
