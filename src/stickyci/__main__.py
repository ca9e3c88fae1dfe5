"""``python -m stickyci``."""

from .cli.main import main

main()
