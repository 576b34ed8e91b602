"""`python -m fscs ...` (what torchrun launches)."""
import sys

from fscs.cli import main

sys.exit(main())
