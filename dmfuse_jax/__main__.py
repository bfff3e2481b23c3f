import sys

from dmfuse_jax.cli import main

sys.exit(main())
