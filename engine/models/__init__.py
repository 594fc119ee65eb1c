"""Model families (:mod:`engine.models.spec`): one :class:`~engine.models.spec.ModelSpec` per
family, looked up by name or by a folder's ``model_index.json``. Importing this package imports
no library (torch, diffusers); each spec imports what it needs when used."""

from relay.engine.models.spec import (
    FAMILIES,
    MetaModel,
    ModelSpec,
    SequenceParallelPlan,
    get_spec,
    spec_for_index,
    specs,
)

__all__ = ["FAMILIES", "MetaModel", "ModelSpec", "SequenceParallelPlan", "get_spec", "spec_for_index", "specs"]
