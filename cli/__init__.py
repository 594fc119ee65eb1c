"""The ``relay`` command line (``relay.cli.main:main``): parsing, flag checks before any library
is imported, and the sub-commands, each a thin layer over the engine, the executors, the
service and the planner. Nothing else in Relay imports this package."""
