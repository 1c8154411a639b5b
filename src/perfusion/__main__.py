from perfusion.cli import entry

entry()
