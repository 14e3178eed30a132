"""``python -m klvae.serve [--model PATH] ...``: the same as ``klvae serve``."""

import sys

from klvae.cli.serve import main

sys.exit(main())
