"""``ParallelLayout``: how one request's denoising is spread over a group of devices.

Degrees multiply to the world size: ``cfg_degree x ring_degree x ulysses_degree``. The CFG
dimension splits the conditional / unconditional forwards; ring x ulysses is the sequence-
parallel group that splits a video's tokens. FSDP2 shards each expert's parameters either over
the sequence-parallel ranks (``fsdp_degree == ring x ulysses``) or over every rank
(``fsdp_degree == world size``); ``1`` keeps a full copy per rank. Validation happens in
``__post_init__`` and needs no processes, so a layout for 8 or 16 GPUs can be checked anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.engine.errors import ValidationError

#: Mesh dimension names, outermost first. Ulysses is innermost so that its all-to-all stays
#: between neighbouring ranks (same node / NVLink island).
MESH_DIMS = ("cfg", "ring", "ulysses")


_FIELDS = {"cfg_degree": "cfg_parallel", "ulysses_degree": "ulysses", "ring_degree": "ring",
           "fsdp_degree": "fsdp"}


class LayoutError(ValidationError):
    """A parallel layout that cannot work. ``field`` names the command-line flag at fault
    (``nproc``, ``ulysses``, ``ring``, ``cfg_parallel`` or ``fsdp``)."""


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Degrees of parallelism for one worker group.

    Attributes:
        cfg_degree: 1, or 2 to run the conditional and unconditional forwards on two halves.
        ulysses_degree: Ulysses (all-to-all over heads) sequence-parallel degree.
        ring_degree: Ring-attention sequence-parallel degree.
        fsdp_degree: Ranks one expert's parameters are sharded over: 1 (no sharding), the
            sequence-parallel degree, or the world size.
    """

    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    fsdp_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("cfg_degree", "ulysses_degree", "ring_degree", "fsdp_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(_FIELDS[name], f"must be a positive integer, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise LayoutError("cfg_parallel", f"must be 1 or 2 (conditional + unconditional), got {self.cfg_degree}")
        allowed = sorted({1, self.sp_degree, self.world_size})
        if self.fsdp_degree not in allowed:
            raise LayoutError(
                "fsdp", f"must be one of {allowed} (none, the sequence-parallel ranks, or all "
                        f"ranks), got {self.fsdp_degree}")

    @property
    def sp_degree(self) -> int:
        """Sequence-parallel degree: ``ulysses x ring``."""
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        """Ranks the layout needs: ``cfg x ulysses x ring``."""
        return self.cfg_degree * self.sp_degree

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        """Mesh shape in :data:`MESH_DIMS` order."""
        return (self.cfg_degree, self.ring_degree, self.ulysses_degree)

    def check_world(self, world_size: int) -> None:
        """Raises :class:`LayoutError` unless the layout fills exactly ``world_size`` ranks."""
        if world_size != self.world_size:
            raise LayoutError(
                "nproc", f"world size {world_size} != cfg {self.cfg_degree} x ulysses {self.ulysses_degree} "
                f"x ring {self.ring_degree} = {self.world_size}")

    def check_model(self, *, num_heads: int, guidance_needs_uncond: bool | None = None,
                    supported: frozenset[str] | None = None, family: str = "") -> None:
        """Raises :class:`LayoutError` when the layout cannot split this model.

        Args:
            num_heads: Attention heads of the transformer (40 for A14B, 24 for TI2V-5B).
            guidance_needs_uncond: When known, whether any step runs an unconditional forward;
                CFG-parallel without one leaves half the group idle.
            supported: The layout flags the model's family runs (its spec's ``parallel``:
                ``ulysses``, ``ring``, ``cfg_parallel``, ``fsdp``); ``None``: all of them.
            family: The family's name, for the message.
        """
        if supported is not None:
            for attribute, flag in _FIELDS.items():
                if getattr(self, attribute) > 1 and flag not in supported:
                    raise LayoutError(flag, f"is not available for {family or 'this model family'} yet "
                                            f"(it runs {', '.join(sorted(supported)) or 'on one process per group'})")
        if num_heads % self.ulysses_degree:
            raise LayoutError(
                "ulysses", f"{self.ulysses_degree} must divide the model's {num_heads} attention "
                f"heads (try {', '.join(str(d) for d in _divisors(num_heads) if d > 1)})")
        if guidance_needs_uncond is False and self.cfg_degree == 2:
            raise LayoutError("cfg_parallel", "2 needs guidance > 1 on some step (there is no unconditional forward)")

    @classmethod
    def from_flags(cls, *, nproc: int, ulysses: int | None = None, ring: int | None = None,
                   cfg: int | None = None, fsdp: int | bool | None = None) -> ParallelLayout:
        """Completes a layout from command-line style flags.

        Unset sequence degrees take what is left of ``nproc`` after ``cfg`` (Ulysses first);
        ``fsdp=True`` means "shard over the sequence-parallel ranks".
        """
        cfg = cfg or 1
        if nproc % cfg:
            raise LayoutError("nproc", f"{nproc} is not divisible by the CFG degree {cfg}")
        remaining = nproc // cfg
        if ulysses is None and ring is None:
            ulysses, ring = remaining, 1
        elif ulysses is None:
            if remaining % ring:
                raise LayoutError("ring", f"{ring} does not divide nproc {nproc} / cfg {cfg} = {remaining}")
            ulysses = remaining // ring
        elif ring is None:
            if remaining % ulysses:
                raise LayoutError("ulysses", f"{ulysses} does not divide nproc {nproc} / cfg {cfg} = {remaining}")
            ring = remaining // ulysses
        if fsdp is True:
            fsdp = ulysses * ring
        layout = cls(cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring, fsdp_degree=int(fsdp or 1))
        layout.check_world(nproc)
        return layout

    @staticmethod
    def parse_spec(spec: str, *, field: str = "layout") -> dict[str, int]:
        """The degrees of a ``"ulysses=4,ring=1,cfg=2,fsdp=8"`` spec, checked for syntax only.

        Raises:
            LayoutError: unknown key, a key given twice, or a non-integer value.
        """
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            key = {"cfg_parallel": "cfg"}.get(key.strip(), key.strip())
            if not sep or key not in ("ulysses", "ring", "cfg", "fsdp"):
                raise LayoutError(field, f"{part!r} is not KEY=N with KEY one of ulysses, ring, cfg, fsdp")
            if key in values:
                raise LayoutError(field, f"{key} is given twice")
            try:
                values[key] = int(value)
            except ValueError:
                raise LayoutError(field, f"{key} must be an integer, got {value.strip()!r}") from None
        return values

    @classmethod
    def from_spec(cls, spec: str, *, nproc: int | None = None, field: str = "layout") -> ParallelLayout:
        """Parses ``"ulysses=4,ring=1,cfg=2,fsdp=8"`` (the layout flags' names, any subset).

        Args:
            spec: Comma-separated ``key=value`` pairs; keys ``ulysses``, ``ring``, ``cfg``
                (or ``cfg_parallel``) and ``fsdp``.
            nproc: Ranks the layout must fill; unset sequence degrees take what is left (as in
                :meth:`from_flags`). ``None``: unset degrees are 1.
            field: Flag name to report parse errors under.

        Raises:
            LayoutError: unknown key, non-integer value, or an impossible layout.
        """
        values = cls.parse_spec(spec, field=field)
        if nproc is None:
            return cls(cfg_degree=values.get("cfg", 1), ulysses_degree=values.get("ulysses", 1),
                       ring_degree=values.get("ring", 1), fsdp_degree=values.get("fsdp", 1))
        return cls.from_flags(nproc=nproc, ulysses=values.get("ulysses"), ring=values.get("ring"),
                              cfg=values.get("cfg"), fsdp=values.get("fsdp"))

    def spec(self) -> str:
        """The inverse of :meth:`from_spec`: ``"cfg=1,ulysses=4,ring=1,fsdp=4"``."""
        return (f"cfg={self.cfg_degree},ulysses={self.ulysses_degree},ring={self.ring_degree},"
                f"fsdp={self.fsdp_degree}")

    def describe(self) -> str:
        """One line for logs: ``cfg=2 ulysses=4 ring=1 fsdp=4 (8 ranks)``."""
        return (f"cfg={self.cfg_degree} ulysses={self.ulysses_degree} ring={self.ring_degree} "
                f"fsdp={self.fsdp_degree} ({self.world_size} ranks)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
