"""Calibration table: tensor name → range (min, max) and how it was chosen.

Core data type shared by calibration (which fills it) and the quantization passes (which read
it). Missing tensors raise :class:`CalibrationError`; there is no silent default range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

from onnxpress.errors import CalibrationError

__all__ = ["CalibrationTable", "TensorRange"]

TABLE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """The calibrated range of one tensor.

    Attributes:
        min: lower end of the range (≤ 0 is not required; quantizers widen to include 0).
        max: upper end of the range.
        method: how it was chosen ("minmax", "percentile", "kl", "mse", "manual").
        samples: how many samples the observer saw.
    """

    min: float
    max: float
    method: str = "manual"
    samples: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise CalibrationError(f"range [{self.min}, {self.max}] is not finite")
        if self.min > self.max:
            raise CalibrationError(f"range min {self.min} > max {self.max}")

    @property
    def amax(self) -> float:
        """max(|min|, |max|): the symmetric threshold."""
        return max(abs(self.min), abs(self.max))


@dataclasses.dataclass
class CalibrationTable:
    """Mapping of tensor name → :class:`TensorRange`, plus which tensors were left out and why."""

    ranges: dict[str, TensorRange] = dataclasses.field(default_factory=dict)
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)
    version: int = TABLE_VERSION

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, tuple[float, float]], method: str = "manual") -> CalibrationTable:
        """Build a table from ``{name: (min, max)}`` (handy in tests and for hand-made tables)."""
        return cls({k: TensorRange(float(lo), float(hi), method) for k, (lo, hi) in ranges.items()})

    def __getitem__(self, name: str) -> TensorRange:
        try:
            return self.ranges[name]
        except KeyError:
            why = self.excluded.get(name)
            detail = f" (excluded: {why})" if why else ""
            raise CalibrationError(
                f"no calibrated range for tensor {name!r}{detail}; recalibrate with this model"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)
