"""Models whose inputs keep symbolic dimensions beyond the batch (a sequence length): MACs at given sizes.

LLM-style exports keep ``[batch, seq]`` dynamic; ``lowrank``, ``prune`` and ``optimize`` count MACs per
sample and used to refuse them ("give the model static shapes"). The sizes now come from ``dims`` /
``--dim NAME=SIZE``, else from the first calibration sample.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.calibration.readers import symbolic_sizes
from onnxpress.cli import main
from onnxpress.errors import DataError, UnsupportedModelError
from onnxpress.passes.flops import assume_input_dims, count_macs, scoped_input_dims, symbolic_input_dims
from tests import graphs

D, F = 16, 32


def token_mlp(seq: str | int = "t", *, unnamed: bool = False) -> onnx.ModelProto:
    """X[b, seq, 16] -> MatMul(W1[16,32]) -> Relu -> MatMul(W2[32,16]) -> Y[b, seq, 16] (seq symbolic)."""
    r = graphs.rng(5)
    w1 = numpy_helper.from_array(r.standard_normal((D, F)).astype(np.float32) / 4, "W1")
    w2 = numpy_helper.from_array(r.standard_normal((F, D)).astype(np.float32) / 6, "W2")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", seq, D])
    if unnamed:
        x.type.tensor_type.shape.dim[1].Clear()
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["Y"], name="down")]
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", seq, D])
    g = helper.make_graph(nodes, "g", [x], [y], [w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _data(path, n: int = 24, seq: int = 10):
    np.savez(path, X=graphs.rng(6).standard_normal((n, seq, D)).astype(np.float32))
    return path


def test_macs_at_given_sizes_and_a_clear_error_without():
    model = token_mlp()
    assert symbolic_input_dims(model) == {"t": ("X", 1)}
    assert count_macs(model, dims={"t": 7}) == {"up": 7 * D * F, "down": 7 * F * D}
    with pytest.raises(UnsupportedModelError, match=r"symbolic dimension\(s\) t \(X axis 1\).*--dim NAME=SIZE"):
        count_macs(model)
    unnamed = token_mlp(unnamed=True)
    assert symbolic_input_dims(unnamed) == {"X:1": ("X", 1)}
    assert count_macs(unnamed, dims={"X:1": 3})["up"] == 3 * D * F


def test_assumed_sizes_end_with_the_scoped_call():
    model = token_mlp()

    @scoped_input_dims
    def inside(size: int) -> int:
        assume_input_dims({"t": size})
        return count_macs(model)["up"]

    assert inside(5) == 5 * D * F
    with pytest.raises(UnsupportedModelError):  # nothing leaked out of the call
        count_macs(model)
    assert count_macs(model, dims={"t": 2})["up"] == 2 * D * F  # explicit dims win


def test_symbolic_sizes_come_from_given_then_the_first_sample(tmp_path):
    model = token_mlp()
    data = _data(tmp_path / "d.npz", seq=11)
    assert symbolic_sizes(model, data) == {"t": 11}
    assert symbolic_sizes(model, tmp_path / "missing.npz", {"t": 4}) == {"t": 4}  # nothing left to read
    assert symbolic_sizes(token_mlp(seq=9), tmp_path / "missing.npz") == {}  # static: no data read
    assert symbolic_sizes(token_mlp(unnamed=True), data) == {"X:1": 11}
    with pytest.raises(DataError, match=r"name\(s\) \['tt'\]: not symbolic input dimensions of the model; "
                                         r"it has \['t'\]"):
        symbolic_sizes(model, data, {"tt": 4})  # a typo would count MACs at the sample's length silently
    with pytest.raises(DataError, match=r"\['b'\]: the batch dimension \(MACs are counted per sample, so its size "
                                         r"changes nothing\)"):
        symbolic_sizes(model, data, {"b": 8, "t": 4})  # taken without a word before
    with pytest.raises(DataError, match=r"it has none \(every input dimension beyond the batch is fixed\)"):
        symbolic_sizes(token_mlp(seq=9), data, {"t": 4})


def test_lowrank_takes_the_sequence_length_from_the_data_or_dims(tmp_path):
    model = token_mlp()
    data = _data(tmp_path / "d.npz", seq=10)
    aware = onnxpress.lowrank(model, flops=0.6, calib=data)
    assert aware.macs_before == 10 * 2 * D * F and aware.macs_after <= 0.6 * aware.macs_before
    plain = onnxpress.lowrank(model, rank=4, dims={"t": 3})
    assert plain.macs_before == 3 * 2 * D * F
    x = {"X": graphs.rng(7).standard_normal((2, 13, D)).astype(np.float32)}  # any length still runs
    assert graphs.run(aware.model, x)[0].shape == (2, 13, D)
    assert not plain.macs_per_position and "MACs/sample" in plain.table()
    # a rank or energy choice needs no size: MACs are then counted per output position, and said to be
    per_position = onnxpress.lowrank(model, rank=4)
    assert per_position.macs_per_position and per_position.macs_before == 2 * D * F
    assert [lay.macs_before for lay in per_position.layers] == [D * F, F * D]
    assert "MACs/position" in per_position.table() and "give --dim NAME=SIZE or --calib" in per_position.table()
    np.testing.assert_array_equal(graphs.run(per_position.model, x)[0], graphs.run(plain.model, x)[0])  # same split
    with pytest.raises(UnsupportedModelError, match="--dim NAME=SIZE"):  # a MACs budget does need the size
        onnxpress.lowrank(model, flops=0.6)


def test_layers_are_timed_at_the_assumed_sequence_length():
    """lowrank --by-latency times each layer alone on an input of the assumed size."""
    from onnxpress.lowrank import measure_latency

    model = token_mlp()

    @scoped_input_dims
    def timed(dims):
        assume_input_dims(dims)
        return measure_latency(model, batch=2, rounds=1)

    table = timed({"t": 10})
    assert set(table) == {"up", "down"} and all(t[None] > 0 for t in table.values())
    with pytest.raises(UnsupportedModelError, match=r"cannot time layer 'up'.*--dim NAME=SIZE"):
        timed({})


def test_cli_dim_for_lowrank_prune_and_optimize(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(token_mlp(), src)
    data = _data(tmp_path / "d.npz")
    assert main(["lowrank", str(src), "-o", str(tmp_path / "l.onnx"), "--rank", "4", "--dim", "t=8", "-q"]) == 0
    assert f"{8 * 2 * D * F:,} ->" in capsys.readouterr().out
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.25", "-q"]) == 0
    assert "MACs n/a: they depend on input dimensions without a size; give them with --dim" in capsys.readouterr().out
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.25", "--dim", "t=8", "-q"]) == 0
    assert f"{8 * D * F:,}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["lowrank", str(src), "-o", str(tmp_path / "l.onnx"), "--rank", "4", "--dim", "t=x"])
    assert "expected NAME=SIZE with a positive integer size" in capsys.readouterr().err
    cache = tmp_path / "cache"
    for dim in ([], ["--dim", "t=4"]):  # the calibration sample's length (10), then 4
        out = tmp_path / f"o{len(dim)}.onnx"
        assert main(["optimize", str(src), "-o", str(out), "--calib", str(data), "--budget", "flops=0.7",
                     "--time-limit", "60", "--cache-dir", str(cache), "-q", *dim]) == 0  # fmt: skip
        onnx.checker.check_model(onnx.load(out), full_check=True)
    assert len(list(cache.glob("sensitivity-*.json"))) == 2  # MACs at another length are not reused
