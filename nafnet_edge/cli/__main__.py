"""``python -m nafnet_edge.cli``."""

import sys

from nafnet_edge.cli import main

sys.exit(main())
