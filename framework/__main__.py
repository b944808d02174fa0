"""``python -m charfw`` runs the command line."""

from .cli import main

main()
