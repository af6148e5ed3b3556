"""python -m fox_megatron.launch CONFIG.yaml ... (same as fox-launch)."""

import sys

from .cli import main

sys.exit(main())
