"""``python -m hf_recon_prune.cli``: the console script ``hf-recon-prune``."""

import sys

from . import main

sys.exit(main())
