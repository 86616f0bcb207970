"""``python -m onnxpress`` runs the CLI."""

import sys

from onnxpress.cli import main

sys.exit(main())
