"""``python -m fwi_core.train``: see :mod:`fwi_core.train.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
