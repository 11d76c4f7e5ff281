"""``python -m splitkernels.cli``."""
import sys

from . import main

sys.exit(main())
