"""`python -m llamaforge <command>`: the same as the `llamaforge` console script."""
import sys

from .cli import main

sys.exit(main())
