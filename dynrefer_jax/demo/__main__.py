import sys

from dynrefer_jax.demo.server import main

sys.exit(main())
