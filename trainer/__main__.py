"""`python -m trainer` is `u-mask` (for `ray job submit` entrypoints without the console script)."""
import sys

from trainer.cli import main

sys.exit(main())
