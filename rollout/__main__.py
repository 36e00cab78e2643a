"""``python -m rollout`` (or ``python rollout/``): run GDPO-SR training.

python -m rollout --dry-run                      # tiny model, local Ray, a few steps on CPU
python -m rollout --config paper model.sd_path=/models/sd21 run.steps=1500
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python rollout/`: put the repository root, not rollout/, first on the path,
    # so `rollout` is the package and its modules cannot shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from rollout.cli import main

if __name__ == "__main__":
    sys.exit(main())
