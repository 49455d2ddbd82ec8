"""``python -m quantduo.cli``: the ``quantduo`` command."""
import sys

from quantduo.cli import main

sys.exit(main())
