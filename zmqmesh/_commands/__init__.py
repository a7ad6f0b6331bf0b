"""The `zmqmesh` subcommands, one module each, found by `zmqmesh.cli`.

These modules belong to the composition root: with `cli.py` they are the only
code that imports `zmqmesh`, `patterns` and `discovery` together. Each module
defines `register(subparsers)`, which adds its parser(s) and sets `func` to a
callable taking the parsed `argparse.Namespace` and returning an exit code.
"""
