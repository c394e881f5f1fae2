"""`python -m pipeline.cli` is `lst`."""

import sys

from pipeline.cli import main

sys.exit(main())
