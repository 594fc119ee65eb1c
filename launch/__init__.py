"""How workers exist and how users start them: the ``relay`` command line, and later the
torchrun and Ray launchers. Launchers only produce rank information; nothing outside this
package reads RANK / WORLD_SIZE or imports ray.
"""
