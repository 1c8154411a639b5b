from perfusion.cli.app import entry

entry()
