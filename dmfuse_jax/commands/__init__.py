"""The top floor: every `dmfuse` subcommand's argparse, printing and exit codes (`cli.py` is the
registry). Each module defines `add_arguments(parser)` and `run(args) -> int`. Library packages
below never import from here (`tests/import_graph.py` checks it)."""
