"""``python -m manifold_merge.data {list,fetch}``: see :mod:`manifold_merge.data.fetch`."""

import sys

from manifold_merge.data.fetch import main

if __name__ == "__main__":
    sys.exit(main())
