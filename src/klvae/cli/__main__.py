import sys

from klvae.cli import main

sys.exit(main())
