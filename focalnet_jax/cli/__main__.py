"""`python -m focalnet_jax.cli ...`: the `focalnet` console script."""

import sys

from focalnet_jax.cli import main

sys.exit(main())
