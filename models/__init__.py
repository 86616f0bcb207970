"""Reference models for onnxpress: small CNNs and a transformer trained on scikit-learn digits.

Run ``python -m models.build`` (needs the ``torch`` extra) to rebuild the committed ``*.onnx``
files, the ``digits32*.npz`` data files and ``manifest.json``. Tests read only the committed
artifacts, so they need neither torch nor scikit-learn.
"""
