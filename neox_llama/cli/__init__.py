"""The command lines: each module's ``main(argv)`` is a console script (``neox-*``) and a thin ``tools/*.py``."""
