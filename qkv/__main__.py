"""`python -m qkv ...`, the same as `qkv ...`; what torchrun runs: `torchrun ... -m qkv train`."""

import sys

from .cli import main

sys.exit(main())
