"""One module per command: add_arguments(parser) declares its options, run(args) runs it
(exit status). cli.py imports a command's module only when that command runs."""


class Terminate(Exception):
    """SIGTERM, turned into an exception so the same cleanup as Ctrl-C runs."""
