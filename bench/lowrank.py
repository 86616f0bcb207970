"""Low-rank splits on the reference models: plain vs data-aware SVD at whole-model MACs budgets.

For each model and budget it prints, side by side: the MACs ratio reached, the logit SQNR (dB,
against the original model's logits on the test split) and top-1 accuracy before any fine-tune for
the plain and the data-aware (whitened) SVD, the latency ratio split/original and the size ratio.
Ranks come from the MACs budget chosen by MACs (``macs``) and, in a second row, by measured layer
latency (``latency``: ``onnxpress.lowrank(..., latency=measure_latency(...))``, same MACs budget);
``+joint`` rows split sibling layers that read one input (Q/K/V) as one unit (``joint=True``).

Latency: onnxruntime (all graph optimisations, spinning off, ``--threads`` intra-op threads),
batch ``--batch``; the original and all split sessions are timed interleaved in the same loop
(order rotated every repeat); the ratio is of the medians, then the median of the per-round
ratios (runs next to each other in time), then the ratio of median CPU times (blind to waiting
for a core, the bulk of the noise on a shared machine).
``onnxpress.lowrank`` runs a transformer's token-wise ops on ``[rows, features]`` after splitting
(``flatten_tokens``, exact; ``--keep-ranks`` turns it off here) and runs attention as onnxruntime's
``MultiHeadAttention`` (``fuse_attention``, exact to float rounding; ``--keep-attention``): the
``rewritten orig`` column times the original with only those rewrites, and ``aware / rewritten`` divides
the data-aware split's latency by it, which is what the split alone buys.
``--profile`` also prints where the time goes (onnxruntime profile, all optimisations, by op type,
with the candidate layers and their factors as one row) for the original and the split models.

    python bench/lowrank.py [--models transformer resnet] [--budgets 0.75 0.5] [--multiple 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxpress
from onnxpress.lowrank import collect_moments, measure_latency, tokens_on_rows
from onnxpress.model_io import load_model, normalize_model
from onnxpress.passes.fuse_attention import FuseAttention
from onnxpress.pipeline import cleanup_passes, run_passes
from onnxpress.reporting import format_table
from onnxpress.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
SELECTS = ("macs", "latency", "macs+joint", "latency+joint")


def sqnr_db(y: np.ndarray, ref: np.ndarray) -> float:
    """10·log10(‖ref‖² / ‖y − ref‖²)."""
    err = float(np.sum((y.astype(np.float64) - ref) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def logits(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Run ``session`` over ``x`` in batches; input ``input``, first output."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def interleaved_latency(sessions: list, x: np.ndarray, repeats: int, clock=time.perf_counter) -> list[list[float]]:
    """Seconds (of ``clock``) per run of each session, timed in rotating order within one loop."""
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:  # warm-up
        s.run(None, {name: x})
    for rep in range(repeats):
        order = list(range(len(sessions)))
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for i in order:
            t0 = clock()
            sessions[i].run(None, {name: x})
            times[i].append(clock() - t0)
    return times


def interleaved_latency_stats(sessions: list, x: np.ndarray, repeats: int) -> tuple[list[float], ...]:
    """Ratios to ``sessions[0]``: of median wall times, median of per-round wall ratios, of median CPU times.

    The per-round ratio compares runs made next to each other in time (same load). CPU time
    (``time.process_time``, all the process's threads; a second interleaved loop) is blind to the
    time the process waits for a core, which on a shared machine is most of the noise; at one
    thread it is the latency the kernels would have alone, at more it also counts every thread's
    work (so it is a cost, not a latency).
    """
    wall = interleaved_latency(sessions, x, repeats)
    cpu = interleaved_latency(sessions, x, repeats, clock=time.process_time)
    med = [statistics.median(t) for t in wall]
    med_cpu = [statistics.median(t) for t in cpu]
    paired = [statistics.median(a / b for a, b in zip(t, wall[0], strict=True)) for t in wall]
    return [m / med[0] for m in med], paired, [m / med_cpu[0] for m in med_cpu]


def op_breakdown(models: dict, keys: set[str], x: np.ndarray, threads: int, repeats: int = 20) -> dict:
    """Microseconds per run by op type (all graph optimisations), candidate layers as one ``split layers`` row.

    The models' profiled sessions run interleaved (one run of each per round), so load hits all
    alike. A node counts as a candidate layer when its name is a candidate key or starts with one's
    factor prefix (``<key>_lowrank``, ``<key>_tucker``); onnxruntime renames the Convs it moves to
    its NCHWc layout, so on CNNs the original's layers stay under ``Conv``. Profiles go to a
    removed temporary folder.
    """
    prefixes = tuple(f"{k.replace('/', '_').strip('_')}_{t}" for k in keys for t in ("lowrank", "tucker"))
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for i, (label, model) in enumerate(models.items()):
            opts = ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / f"profile{i}")
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[label] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(repeats):
            for sess in sessions.values():
                sess.run(None, {sess.get_inputs()[0].name: x})
        for label, sess in sessions.items():
            per_op: collections.Counter[str] = collections.Counter()
            for ev in json.loads(Path(sess.end_profiling()).read_text()):
                if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                    node = ev["name"][: -len("_kernel_time")]
                    split = node in keys or node.startswith(prefixes)
                    per_op["split layers" if split else ev["args"].get("op_name", "?")] += ev["dur"] / repeats
            out[label] = dict(per_op)
    return out


def latency_bound(model, keys: set[str], keep: float, x: np.ndarray, threads: int, repeats: int = 10) -> float:
    """Latency ratio if only the split layers got faster, in proportion to their MACs.

    Profiles the original model (graph optimisations off, so node names survive) and takes the
    share ``f`` of kernel time spent in the candidate layers: bound = ``(1 - f) + f · keep``.
    The profile file goes to a temporary folder that is removed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(repeats):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: collections.Counter[str] = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_node[ev["name"][: -len("_kernel_time")]] += ev["dur"]
    share = sum(v for k, v in per_node.items() if k in keys) / max(sum(per_node.values()), 1)
    return (1 - share) + share * keep


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["transformer", "resnet"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5])
    p.add_argument("--multiple", type=int, default=8)
    p.add_argument("--conv-method", choices=["channel", "tucker2"], default="channel")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--calib-samples", type=int, default=500)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--latency-step", choices=["time", "macs"], default="time",
                   help="latency rows: greedy steps by loss per second saved, or per MAC among faster splits")
    p.add_argument("--keep-attention", action="store_true",
                   help="lowrank(fuse_attention=False): keep attention as the graph's ops (output before session 25)")
    p.add_argument("--keep-ranks", action="store_true",
                   help="lowrank(flatten_tokens=False): keep the graph's tensor ranks (output before session 15)")
    p.add_argument("--profile", action="store_true", help="also print kernel time by op type (onnxruntime profile)")
    p.add_argument("--selects", nargs="+", choices=SELECTS, default=list(SELECTS),
                   help="rank selections to build and time (all in one interleaved loop)")
    args = p.parse_args(argv)

    folder = Path(args.models_dir)
    calib = np.load(folder / "digits32_calib.npz")["input"][: args.calib_samples]
    test = np.load(folder / "digits32_test.npz")
    x_test, labels = test["input"], test["labels"]
    x_lat = x_test[: args.batch]

    rows = []
    profiles = []
    for name in args.models:
        path = folder / f"{name}.onnx"
        if not path.is_file():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        original = load_model(path)
        cleaned = run_passes(normalize_model(original), cleanup_passes()).model
        t0 = time.perf_counter()
        moments = collect_moments(cleaned, [{"input": calib}], max_samples=None)
        t_collect = time.perf_counter() - t0
        t0 = time.perf_counter()
        latency = measure_latency(original, batch=args.batch, threads=args.threads, multiple=args.multiple,
                                  conv_method=args.conv_method, joint=any("joint" in s for s in args.selects))
        t_latency = time.perf_counter() - t0
        ref_sess = make_session(original, threads=args.threads)
        ref = logits(ref_sess, x_test)
        acc_ref = float(np.mean(ref.argmax(1) == labels))
        size_ref = len(original.SerializeToString())
        candidates = None
        floor = None
        for budget in args.budgets:
            built = {}
            for select in args.selects:
                lat = latency if select.startswith("latency") else None
                built[select] = [
                    onnxpress.lowrank(original, flops=budget, multiple=args.multiple, conv_method=args.conv_method,
                                      moments=mom, latency=lat, latency_step=args.latency_step,
                                      joint="joint" in select, flatten_tokens=not args.keep_ranks,
                                      fuse_attention=not args.keep_attention)
                    for mom in (None, moments)
                ]
            if candidates is None:
                cand = [lay for lay in built[args.selects[0]][0].layers if lay.full_rank]
                keys = {k for lay in cand for k in (lay.members or (lay.key,))}
                candidates = (keys, sum(lay.macs_before for lay in cand))
            results = [r for select in args.selects for r in built[select]]
            sessions = [make_session(r.model, threads=args.threads) for r in results]
            if floor is None:  # every unit at the smallest grid rank: no rank choice is faster (nor much worse)
                floor = onnxpress.lowrank(original, rank=args.multiple, multiple=args.multiple,
                                          conv_method=args.conv_method, joint=any("joint" in s for s in args.selects),
                                          flatten_tokens=not args.keep_ranks,
                                          fuse_attention=not args.keep_attention)
            sessions.append(make_session(floor.model, threads=args.threads))
            rewritten = cleaned if args.keep_ranks else tokens_on_rows(cleaned).model
            if not args.keep_attention:
                rewritten = run_passes(rewritten, [FuseAttention()]).model
            sessions.append(make_session(rewritten, threads=args.threads))
            outputs = [logits(s, x_test) for s in sessions[:-1]]
            med, paired, cpu = interleaved_latency_stats([ref_sess, *sessions], x_lat, args.repeats)
            # the candidate layers must shed (1 - budget) of the whole model's MACs
            keep = 1 - (1 - budget) * built[args.selects[0]][0].macs_before / candidates[1]
            bound = latency_bound(original, candidates[0], keep, x_lat, args.threads)
            for k, select in enumerate(args.selects):
                plain, aware = built[select]
                y_plain, y_aware = outputs[2 * k], outputs[2 * k + 1]
                i_plain, i_aware = 1 + 2 * k, 2 + 2 * k
                rows.append([
                    name, f"{budget:.2f}", select,
                    f"{plain.macs_after / plain.macs_before:.3f} / {aware.macs_after / aware.macs_before:.3f}",
                    f"{sqnr_db(y_plain, ref):.2f}", f"{sqnr_db(y_aware, ref):.2f}",
                    f"{sqnr_db(y_aware, ref) - sqnr_db(y_plain, ref):+.2f}",
                    f"{acc_ref:.4f}", f"{np.mean(y_plain.argmax(1) == labels):.4f}",
                    f"{np.mean(y_aware.argmax(1) == labels):.4f}",
                    f"{med[i_plain]:.3f} / {med[i_aware]:.3f}",
                    f"{paired[i_plain]:.3f} / {paired[i_aware]:.3f}",
                    f"{cpu[i_plain]:.3f} / {cpu[i_aware]:.3f}",
                    f"{bound:.3f}", f"{cpu[-2]:.3f} ({floor.macs_after / floor.macs_before:.2f})",
                    f"{med[-1]:.3f}", f"{med[i_aware] / med[-1]:.3f}",
                    f"{len(plain.model.SerializeToString()) / size_ref:.3f} / "
                    f"{len(aware.model.SerializeToString()) / size_ref:.3f}",
                ])
            if args.profile:
                models = {"original": original, **{f"{budget:.2f} {s} aware": built[s][1].model for s in args.selects}}
                profiles.append((name, op_breakdown(models, candidates[0], x_lat, args.threads)))
            split = sum(lay.rank is not None for lay in built[args.selects[-1]][1].layers)
            print(f"{name} @ {budget}: {split} units split ({args.selects[-1]}, data-aware); moments {t_collect:.1f}s, "
                  f"layer timing {t_latency:.1f}s", file=sys.stderr)
    header = ["model", "budget", "ranks by", "MACs plain/aware", "SQNR plain", "SQNR aware", "gain dB", "acc orig",
              "acc plain", "acc aware", "latency plain/aware", "paired", "CPU time", "latency bound",
              "floor CPU (MACs)", "rewritten orig", "aware / rewritten",
              "size plain/aware"]
    print(format_table(header, rows))
    print(f"(test split {len(x_test)} samples; calib {len(calib)}; multiple {args.multiple}; latency batch "
          f"{args.batch}, {args.threads} thread(s), ratio of medians of {args.repeats} interleaved runs to the"
          " original's;\n paired: median of the per-round ratios; CPU time: ratio of median process CPU seconds"
          " per run (blind to waiting for a core);\n latency bound: the ratio if the split layers' time fell in"
          " proportion to their MACs and the"
          " rest stayed (from an onnxruntime profile of the original, graph optimisations off);\n floor: CPU-time ratio"
          f" of the model with every unit at rank {args.multiple} (its MACs ratio in brackets), same loop;\n"
          " rewritten orig: the original with only the exact rewrites lowrank ends with (token-wise [rows, features],"
          " fused attention), median ratio, same loop)")
    for name, per_model in profiles:
        ops = sorted({op for b in per_model.values() for op in b}, key=lambda op: -per_model["original"].get(op, 0))
        total0 = sum(per_model["original"].values())
        prow = [[op, *(f"{b.get(op, 0) / total0:.3f}" for b in per_model.values())] for op in ops]
        prow.append(["total", *(f"{sum(b.values()) / total0:.3f}" for b in per_model.values())])
        print(f"\n{name}: kernel time by op type, share of the original's total (onnxruntime profiles, all "
              f"optimisations, run interleaved, batch {args.batch}, {args.threads} thread(s))")
        print(format_table(["op", *per_model], prow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
