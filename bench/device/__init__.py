"""The device check of the CUDA path (see README.md in this folder)."""
