"""``python -m pcrfs.cli``: the same as the ``pcrfs`` command."""
from .main import main

main()
