"""``python benchmarks/harness [options]``: the benchmark harness without the ``fastddpm`` CLI."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: make ``harness`` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from harness.cli import main
else:
    from .cli import main

sys.exit(main())
