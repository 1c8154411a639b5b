"""The ``perfusion`` command line: app (the typer commands, option checks, exit codes) and commands
(what each command does and prints). Nothing in the library imports from here."""
