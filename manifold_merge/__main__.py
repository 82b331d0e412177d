"""``python -m manifold_merge merge CONFIG.yaml OUT_DIR ...``: the ``manifold-merge`` command."""

import sys

from manifold_merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
