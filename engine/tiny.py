"""The embedded default model: a tiny random model of a family, built once into Relay's cache.

``relay generate`` and ``relay serve`` without ``--model`` use it, so the main job runs on any
machine with nothing downloaded. The builder is the family's (the spec's ``make_tiny``; for Wan
:mod:`engine.models.wan.tiny`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: Bump when a tiny model's architecture or defaults change, so caches are rebuilt.
TINY_VERSION = 3


def cache_dir() -> Path:
    """Relay's cache folder: ``$RELAY_CACHE``, else ``$XDG_CACHE_HOME/relay``, else ``~/.cache/relay``."""
    if os.environ.get("RELAY_CACHE"):
        return Path(os.environ["RELAY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "relay"


def make_tiny(directory: str | Path, *, kind: str = "t2v", seed: int = 0, family: str = "wan2.2") -> Path:
    """Writes a tiny random model of ``family`` and ``kind`` to ``directory`` (the real layout)."""
    from relay.engine.loader import quiet_libraries
    from relay.engine.models import get_spec

    quiet_libraries()  # no per-shard save bars from diffusers
    return get_spec(family).make_tiny(directory, kind=kind, seed=seed)


def default_model_dir(kind: str = "t2v", family: str = "wan2.2") -> Path:
    """The embedded default model: a tiny ``kind`` model, built once into the cache folder.

    Built in a temporary folder and renamed into place, so concurrent first uses are safe.
    """
    target = cache_dir() / f"tiny-{family}-{kind}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=target.parent))
    try:
        make_tiny(staging, kind=kind, seed=0, family=family)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
