"""Solvers and step schedules: which diffusers scheduler integrates the flow, and at which
timesteps.

* ``unipc``: ``UniPCMultistepScheduler`` in flow-prediction mode, the solver every Wan 2.2
  folder ships (``scheduler/scheduler_config.json``).
* ``euler``: ``FlowMatchEulerDiscreteScheduler``, the first-order flow-match Euler step that
  step-distilled models (the 4-step Lightning LoRAs) were trained with.

A schedule is ``steps`` evenly spaced timesteps (the solver's own spacing) or an explicit list
(``timesteps``): values in ``(0, num_train_timesteps]``, strictly decreasing, given *before* the
flow shift -- ``1000,750,500,250`` with shift 5 runs at 1000, 937.5, 833.3 and 625, the
timesteps the Wan 2.2 Lightning LoRAs were distilled on; shift 1 runs them as given. They go to
the scheduler as sigmas (``t / num_train_timesteps``), so the scheduler shifts them and its
timesteps and sigmas stay consistent. Explicit schedules need a solver that takes sigmas
(``euler``).

The solver's whole state is captured into :class:`~engine.state.DenoiseState` by
:func:`engine.state.capture_solver`, whichever solver it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.engine.errors import ModelError, ValidationError

#: Solver name -> the diffusers scheduler class that implements it.
SOLVERS: dict[str, str] = {
    "unipc": "UniPCMultistepScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
}
#: Solvers whose ``set_timesteps`` takes explicit sigmas (explicit schedules).
TAKES_SIGMAS = frozenset({"euler"})


def solver_of(class_name: str) -> str | None:
    """The solver name of a diffusers scheduler class name (``None``: not one Relay names)."""
    return next((name for name, cls in SOLVERS.items() if cls == class_name), None)


def _scheduler_class(name: str, where: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelError(f"{where}: unknown scheduler class {name!r}")
    return cls


def build_scheduler(folder_class: str, folder_config: dict, *, solver: str | None, shift: float,
                    num_train_timesteps: int, where: str):
    """A fresh scheduler for ``solver`` with the request's flow shift.

    The folder's own config is used when it is the solver's class (or ``solver`` is ``None``);
    another solver is built from the folder's training range alone: Euler as
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`` (diffusers' defaults
    otherwise), UniPC in Wan's flow-prediction configuration.

    Args:
        folder_class: ``_class_name`` of the folder's scheduler config.
        folder_config: That config (without ``_class_name`` handling needed).
        solver: ``unipc``, ``euler`` or ``None`` (the folder's).
        shift: Flow shift.
        num_train_timesteps: Training range of the model.
        where: The folder, for error messages.
    """
    if solver is None or SOLVERS.get(solver) == folder_class:
        cls = _scheduler_class(folder_class, where)
        config = dict(folder_config)
    elif solver == "euler":
        cls, config = _scheduler_class(SOLVERS["euler"], where), {"num_train_timesteps": num_train_timesteps}
    elif solver == "unipc":
        cls = _scheduler_class(SOLVERS["unipc"], where)
        config = {"prediction_type": "flow_prediction", "use_flow_sigmas": True,
                  "num_train_timesteps": num_train_timesteps}
    else:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    key = "flow_shift" if "flow_shift" in config or cls.__name__.startswith("UniPC") else "shift"
    return cls.from_config(config, **{key: shift})


def set_schedule(scheduler, steps: int, timesteps: Sequence[float] | None, *, device=None) -> None:
    """Sets the scheduler's timesteps: ``steps`` of its own spacing, or the explicit
    (unshifted) ``timesteps`` as sigmas."""
    if timesteps is None:
        scheduler.set_timesteps(steps, device=device)
    else:
        train = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(len(timesteps), device=device, sigmas=[float(t) / train for t in timesteps])
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


def experts_for(timesteps: Sequence[float], boundary: float | None, num_train_timesteps: int,
                *, high: str, low: str, dense: str) -> list[str]:
    """The expert of each timestep: ``high`` while ``t >= boundary x num_train_timesteps``
    (as ``WanPipeline`` switches), then ``low``; every step ``dense`` without a boundary."""
    if boundary is None:
        return [dense] * len(timesteps)
    cut = boundary * num_train_timesteps
    return [high if float(t) >= cut else low for t in timesteps]


def check_timesteps(values, *, steps: int | None, solver: str, num_train_timesteps: int) -> tuple[float, ...]:
    """Validates an explicit schedule (field ``timesteps``).

    Args:
        values: The timesteps as given (numbers).
        steps: The request's step count if it gave one (must equal the list's length).
        solver: The resolved solver (must take sigmas).
        num_train_timesteps: Upper bound of a timestep.

    Returns:
        The timesteps as floats.

    Raises:
        ValidationError: on field ``timesteps``.
    """
    import math

    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValidationError("timesteps", "must be a non-empty list of numbers")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValidationError("timesteps", f"must be finite numbers, got {value!r}")
        if not 0 < value <= num_train_timesteps:
            raise ValidationError("timesteps", f"must be in (0, {num_train_timesteps}], got {value}")
        if out and value >= out[-1]:
            raise ValidationError("timesteps", f"must be strictly decreasing, got {value} after {out[-1]}")
        out.append(float(value))
    if steps is not None and steps != len(out):
        raise ValidationError("timesteps", f"has {len(out)} values but steps is {steps}")
    if solver not in TAKES_SIGMAS:
        raise ValidationError("timesteps", f"an explicit schedule needs solver {' or '.join(sorted(TAKES_SIGMAS))}, "
                              f"not {solver}")
    return tuple(out)
