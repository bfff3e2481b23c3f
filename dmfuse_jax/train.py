"""`python -m dmfuse_jax.train --config CFG --workdir DIR [--config.KEY=VALUE ...]`: same as `dmfuse train`."""
import sys

from dmfuse_jax.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
