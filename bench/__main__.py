import sys

from bench.cli import main  # bench/__init__.py has already moved the repo root behind the installed mixprec_ops

sys.exit(main())
