"""The command lines: each module's ``main(argv)`` is built by :func:`neox_llama.cli.runner.command` (one-line
errors, exit statuses) and is both a console script (``neox-*``) and the body of a thin ``tools/*.py``."""
