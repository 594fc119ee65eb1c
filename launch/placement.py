"""Which worker groups to build: *fused* replicas or a *staged* expert pair (no Ray here).

:func:`plan_groups` turns the placement flags into :class:`GroupPlan` entries (name, roles,
layout) and validates them against the model before anything starts, so a bad combination
exits 2 naming its flag. The executor (:mod:`launch.executor`) builds one worker group per
entry with any backend; the scheduler (:mod:`engine.scheduler`) routes stages to groups by role.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.engine.errors import ValidationError
from relay.engine.experts import DENSE, HIGH, LOW
from relay.engine.stages import DECODE, ENCODE, expert_step_counts, propose_split
from relay.parallel.layout import ParallelLayout

PLACEMENTS = ("fused", "staged")
#: Where encode / decode run in a staged placement: with an expert group, or on their own device.
AUX_PLACES = ("high", "low", "own")


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """One worker group to build.

    Attributes:
        name: ``fused0``, ``fused1``, ... or ``high``, ``low``, ``encode``, ``decode``, ``aux``.
        roles: Stages it runs.
        layout: Its parallel layout (``layout.world_size`` devices).
    """

    name: str
    roles: tuple[str, ...]
    layout: ParallelLayout

    @property
    def devices(self) -> int:
        """Devices (ranks) of the group."""
        return self.layout.world_size


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The validated placement: the groups and, for staged, why the split was chosen."""

    kind: str
    groups: tuple[GroupPlan, ...]
    reason: str = ""

    @property
    def devices(self) -> int:
        """Devices over every group."""
        return sum(group.devices for group in self.groups)


def default_group_layout(devices: int, num_heads: int) -> ParallelLayout:
    """The layout of a stage group of ``devices``: Ulysses over all of them when it divides the
    heads (else ring), experts FSDP-sharded over the group (the official Wan multi-GPU set-up)."""
    if devices == 1:
        return ParallelLayout()
    if num_heads % devices == 0:
        return ParallelLayout(ulysses_degree=devices, fsdp_degree=devices)
    return ParallelLayout(ring_degree=devices, fsdp_degree=devices)


def parse_split(text: str) -> tuple[int, int]:
    """Parses ``--stage-split HIGH:LOW`` (devices per stage)."""
    high, sep, low = text.partition(":")
    try:
        values = int(high), int(low)
    except ValueError:
        values = None
    if not sep or values is None or min(values) < 1:
        raise ValidationError("stage_split", f"must be HIGH:LOW with positive integers, got {text!r}")
    return values


def check_placement(info, *, placement: str = "fused", layout: ParallelLayout | None = None,
                    replicas: int = 1, devices: int | None = None, stage_split: str | None = None,
                    high_layout: str | None = None, low_layout: str | None = None,
                    encode_on: str = "high", decode_on: str = "low") -> tuple[int, int] | None:
    """Every check of the placement flags that needs no step schedule (imports no library).

    Returns:
        The ``--stage-split`` as ``(high, low)`` when given, else ``None``.

    Raises:
        ValidationError: naming the flag (``placement``, ``replicas``, ``stage_split``, ...).
    """
    heads = info.num_attention_heads
    if placement not in PLACEMENTS:
        raise ValidationError("placement", f"must be fused or staged, got {placement!r}")
    if placement == "fused":
        if replicas < 1:
            raise ValidationError("replicas", f"must be at least 1, got {replicas}")
        (layout or ParallelLayout()).check_model(num_heads=heads, supported=info.spec.parallel,
                                                 family=info.spec.description)
        return None
    if not info.is_moe:
        raise ValidationError("placement", "staged needs a two-expert (MoE) model; this one is dense")
    for name, value in (("encode_on", encode_on), ("decode_on", decode_on)):
        if value not in AUX_PLACES:
            raise ValidationError(name, f"must be one of {', '.join(AUX_PLACES)}, got {value!r}")
    split = parse_split(stage_split) if stage_split else None
    if split is None and (devices or 2) < 2:
        raise ValidationError("nproc", f"staged placement needs at least 2 devices, got {devices}")
    for name, spec in (("high", high_layout), ("low", low_layout)):
        if spec:
            ParallelLayout.parse_spec(spec, field=f"{name}_layout")
    if split is not None:  # the group sizes are known: the layouts can be checked whole
        _stage_layouts(*split, high_layout, low_layout, heads)
    return split


def _stage_layouts(high_n: int, low_n: int, high_layout: str | None, low_layout: str | None,
                   heads: int) -> dict[str, ParallelLayout]:
    """The two stage groups' layouts; an error is reported under the group's own flag."""
    layouts = {}
    for name, n, spec in (("high", high_n, high_layout), ("low", low_n, low_layout)):
        flag = f"{name}_layout"
        try:
            group_layout = (ParallelLayout.from_spec(spec, nproc=n, field=flag) if spec
                            else default_group_layout(n, heads))
            group_layout.check_model(num_heads=heads)
        except ValidationError as exc:
            raise ValidationError(flag, f"{exc.field}: {exc.message}" if exc.field != flag else exc.message) from None
        layouts[name] = group_layout
    return layouts


def plan_groups(info, request, *, placement: str = "fused", layout: ParallelLayout | None = None,
                replicas: int = 1, devices: int | None = None, stage_split: str | None = None,
                high_layout: str | None = None, low_layout: str | None = None,
                encode_on: str = "high", decode_on: str = "low") -> Placement:
    """Validates the placement flags and returns the groups to build.

    Args:
        info: :class:`engine.model_info.ModelInfo` of the model.
        request: The resolved request (its steps / shift / boundary size the stage split).
        placement: ``fused`` or ``staged``.
        layout: Fused: each replica's layout (default one device).
        replicas: Fused: identical groups running whole requests (data parallel).
        devices: Staged: devices to split when ``stage_split`` is not given (default 2).
        stage_split: Staged: ``HIGH:LOW`` devices per expert group (default: balanced by
            :func:`engine.stages.propose_split`).
        high_layout, low_layout: Staged: layout specs (``"ulysses=2,fsdp=2"``) of each group
            (default :func:`default_group_layout`).
        encode_on, decode_on: Staged: ``high``, ``low`` or ``own`` (a one-device group of its own).

    Raises:
        ValidationError: naming the flag (``placement``, ``replicas``, ``stage_split``, ...).
    """
    heads = info.num_attention_heads
    split = check_placement(info, placement=placement, layout=layout, replicas=replicas, devices=devices,
                            stage_split=stage_split, high_layout=high_layout, low_layout=low_layout,
                            encode_on=encode_on, decode_on=decode_on)
    if placement == "fused":
        layout = layout or ParallelLayout()
        groups = tuple(GroupPlan(name=f"fused{i}", roles=(ENCODE, HIGH, LOW, DENSE, DECODE), layout=layout)
                       for i in range(replicas))
        return Placement(kind="fused", groups=groups,
                         reason=f"{replicas} replica(s) of {layout.describe()}, each running whole requests")
    # The step counts come from the model's own scheduler (diffusers is imported from here on).
    counts = expert_step_counts(request.steps, request.shift, request.boundary, info=info,
                                solver=request.solver, timesteps=request.timesteps)
    if split is not None:
        high_n, low_n = split
        reason = f"--stage-split {high_n}:{low_n} as given ({counts[HIGH]} high-noise vs {counts[LOW]} low-noise steps)"
    else:
        best = propose_split(devices or 2, counts[HIGH], counts[LOW], allowed=lambda n: heads % n == 0 or n == 1)
        high_n, low_n, reason = best.high_devices, best.low_devices, best.reason
    layouts = _stage_layouts(high_n, low_n, high_layout, low_layout, heads)
    roles = {"high": [HIGH], "low": [LOW]}
    own = []
    for stage, place in ((ENCODE, encode_on), (DECODE, decode_on)):
        (own if place == "own" else roles[place]).append(stage)
    groups = [GroupPlan(name="high", roles=tuple(roles["high"]), layout=layouts["high"]),
              GroupPlan(name="low", roles=tuple(roles["low"]), layout=layouts["low"])]
    if own:
        groups.append(GroupPlan(name="aux", roles=tuple(own), layout=ParallelLayout()))
    return Placement(kind="staged", groups=tuple(groups), reason=reason)
