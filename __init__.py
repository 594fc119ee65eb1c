"""Relay: distributed multi-GPU inference for the Wan 2.2 video diffusion models.

The installed package is this repository's root: ``relay.engine`` (what runs), ``relay.parallel``
(how one step spans devices), ``relay.launch`` (the CLI, workers and executors), ``relay.serve``
(gRPC) and ``relay.bench`` (benchmarks). Importing ``relay`` itself imports nothing heavy.
"""

__version__ = "0.2.0"
