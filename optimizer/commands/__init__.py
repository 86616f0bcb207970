"""CLI subcommands: one module each, with ``register(subparsers)`` (see :mod:`onnxpress.cli`)."""
