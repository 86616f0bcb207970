"""onnxruntime sessions, built one way everywhere (CPU provider, spinning off, optional threads)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxpress.errors import UnsupportedModelError

__all__ = ["make_session", "time_interleaved"]

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
) -> ort.InferenceSession:
    """Build a CPU InferenceSession from a ModelProto (in memory, no file) or a path.

    Thread spinning is turned off so that two sessions timed side by side on few cores do not steal
    each other's cores.

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
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load the {what}: {first}") from None


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
