"""The command line: lists only working commands, --version, and cleanup → validate end to end."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import onnxpress
from onnxpress.cli import _COMMANDS, build_parser, main
from onnxpress.model_io import save_model
from tests import graphs


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_help_lists_exactly_the_registered_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listed = set(re.findall(r"^    (\w+)\s", text, flags=re.MULTILINE))
    registered = set(_subcommands())
    assert listed == registered
    assert {"cleanup", "validate"} <= registered
    assert len(registered) == len(_COMMANDS)


def test_every_listed_command_is_wired_to_a_real_function(capsys):
    for name, sub in _subcommands().items():
        func = sub.get_default("func")
        assert callable(func) and func.__module__.startswith("onnxpress.commands."), name
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: onnxpress {name}")


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_cleanup_then_validate_end_to_end(tmp_path, capsys):
    model = save_model(graphs.conv_bn_relu(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", X=graphs.rng(4).standard_normal((30, 3, 8, 8)).astype(np.float32))
    assert main(["cleanup", str(model), "-o", str(tmp_path / "c.onnx"), "-q"]) == 0
    shown = capsys.readouterr().out
    # what changed, not every pass's counters: the BatchNorm folded, no ".modified" flags or zero rows
    assert "fold_batchnorm" in shown and ".modified" not in shown and not re.search(r"\s0\n", shown), shown
    argv = ["validate", str(model), str(tmp_path / "c.onnx"), "--data", str(tmp_path / "d.npz"),
            "--json", str(tmp_path / "r.json"), "--batch", "8", "--repeats", "3", "--threads", "1",
            "--max-abs-error", "1e-5", "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^Y\s+\S+\s+\d+\.\d+\s+1\.0000", printed, flags=re.MULTILINE), printed
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["samples"] == 30 and record["batch_size"] == 8 and record["threads"] == 1
    assert record["outputs"][0]["max_abs_error"] <= 1e-5
    assert record["reference_ops"]["BatchNormalization"] == 1 and "BatchNormalization" not in record["candidate_ops"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "d.npz", "m.onnx", "r.json"]
    # a threshold that fails is our error: one line, exit 2
    no_timing = [a for i, a in enumerate(argv[:-3]) if a != "--repeats" and argv[i - 1] != "--repeats"]
    assert main([*no_timing, "--max-abs-error", "0", "--no-latency", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"onnxpress: error: output 'Y': max abs error \S+ exceeds the allowed 0", err[0])


def test_a_closed_stdout_stops_quietly_with_the_sigpipe_status(tmp_path):
    """`onnxpress validate ... | head -3` once ended in a BrokenPipeError traceback (status 1). Here the reader is
    gone before the first line: no traceback, status 141 (128 + SIGPIPE), as a shell tool."""
    import onnx

    from tests import graphs

    onnx.save(graphs.gemm(), tmp_path / "g.onnx")
    np.savez(tmp_path / "g.npz", X=np.ones((4, 8), np.float32))
    argv = ["validate", str(tmp_path / "g.onnx"), str(tmp_path / "g.onnx"), "--data", str(tmp_path / "g.npz"),
            "--no-latency"]
    proc = subprocess.Popen([sys.executable, "-m", "onnxpress", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_python_m_onnxpress_version():
    done = subprocess.run(
        [sys.executable, "-m", "onnxpress", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"onnxpress {onnxpress.__version__}"


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_scratch_beside_the_output(tmp_path):
    """SIGTERM ended the process where it stood: .onnxpress-*/ with a partial model stayed beside the output."""
    import onnx

    from tests import graphs

    onnx.save(graphs.gemm(), tmp_path / "g.onnx")
    (tmp_path / "out").mkdir()
    # the signal arrives while the scratch model is being checked, as a scheduler's timeout would
    script = (
        "import os, signal, sys, onnx\n"
        "import onnxpress.model_io as io\n"
        "real = onnx.checker.check_model\n"
        "def check(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        "io.onnx.checker.check_model = check\n"
        "from onnxpress.cli import main\n"
        f"sys.exit(main(['cleanup', {str(tmp_path / 'g.onnx')!r}, '-o', {str(tmp_path / 'out' / 'c.onnx')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 143 and done.stderr.strip().splitlines()[-1] == "onnxpress: terminated", done.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_device_output_and_names_too_long_are_one_line_each(tmp_path, capsys):
    """-o /dev/null replaced the device with a regular file (root); a 260-byte name was a raw OSError traceback.

    A FIFO stands for the device here: a regression must not replace the machine's /dev/null.
    """
    import os

    import onnx

    from tests import graphs

    onnx.save(graphs.gemm(), tmp_path / "g.onnx")
    os.mkfifo(tmp_path / "pipe.onnx")
    assert main(["cleanup", str(tmp_path / "g.onnx"), "-o", str(tmp_path / "pipe.onnx")]) == 2
    assert "is not a regular file" in capsys.readouterr().err and (tmp_path / "pipe.onnx").is_fifo()
    (tmp_path / "pipe.onnx").unlink()
    assert main(["cleanup", str(tmp_path / "g.onnx"), "-o", str(tmp_path / ("b" * 260 + ".onnx"))]) == 2
    assert "265 bytes long; file systems take at most 255" in capsys.readouterr().err
    assert main(["cleanup", str(tmp_path / ("c" * 300 + ".onnx")), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxpress: error: file name too long: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
