"""The ``perfusion`` command line: app (the typer app, the error guard, exit codes), options (the
options several commands share, each defined once, and the Config they make), console, and one module
per command holding the command, its run_ function and its printing. Nothing in the library imports
from here."""
