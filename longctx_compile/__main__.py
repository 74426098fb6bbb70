"""``python -m longctx_compile`` runs the ``lcc`` command line."""

from .cli import main

main()
