"""How workers exist: the per-rank :class:`~launch.worker.StageWorker`, the worker-group protocol
over collective calls (:mod:`launch.group`), its backends -- in this process
(:mod:`launch.inprocess`), spawned local processes (:mod:`launch.processes`), torchrun ranks
(:mod:`launch.torchrun`), Ray actors (:mod:`launch.ray_group`) -- the :mod:`launch.executor` that
builds a placement's groups (:mod:`launch.placement`) under the stage scheduler. Nothing outside
this package reads RANK / WORLD_SIZE or imports ray; importing it imports nothing heavy.
"""
