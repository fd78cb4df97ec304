"""``python -m loadtest bench ...``: the bench command without pdserve's CLI."""
import sys

from loadtest.cli import main

sys.exit(main())
