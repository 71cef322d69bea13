"""``python -m bench …`` is the ``bench`` command; ``torchrun … -m bench run …`` starts it as ranks."""

from bench.cli.main import main

main()
