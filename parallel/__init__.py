"""How one denoise step runs on many devices: process groups, Ulysses / ring attention through
xDiT, CFG-parallel and FSDP2 sharding, applied to an already built model by ``parallelize``.

Nothing here yet: the engine currently runs one request on one device (see the parallel
execution issue). Models never import torch.distributed; only this package will.
"""
