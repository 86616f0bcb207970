"""The fine-tune bridge: ONNX → torch ``nn.Module`` → fine-tune with a teacher → ONNX.

Everything here needs torch (``pip install onnxpress[torch]``); ``import onnxpress`` does not import
this subpackage, and this ``__init__`` imports nothing heavy either: import the submodules
(``onnxpress.bridge.convert``, ``.train``, ``.export``, ``.qat``) where they are needed.
"""

from __future__ import annotations

__all__: list[str] = []
