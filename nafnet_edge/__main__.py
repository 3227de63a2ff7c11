"""``python -m nafnet_edge``: the ``nafnet-edge`` command."""

import sys

from nafnet_edge.cli import main

sys.exit(main())
