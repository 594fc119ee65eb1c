"""Feature caches per expert: fewer transformer forwards, on diffusers' own cache hooks.

A cache answers some forwards of a denoise step from what earlier steps computed. Three kinds,
all diffusers 0.42 hooks (:mod:`diffusers.hooks`) installed on each expert separately:

* ``fbc:THRESHOLD`` -- first-block cache: the first block always runs; when its residual
  changed by less than ``THRESHOLD`` (relative mean absolute change since the last computed
  forward) the remaining blocks are skipped and their cached residual is added instead.
  ``fbc:0`` never skips. Under sequence parallelism each rank holds a chunk of the residual, so
  the metric is reduced over the group before the comparison (:class:`GroupVote`).
* ``mag:THRESHOLD[,k=K][,retention=R],ratios=R0/R1/...`` -- MagCache: skips by the accumulated
  error of per-step magnitude ratios measured once for the model and schedule; ``mag:calibrate``
  runs without skipping and reports the ratios of each expert in the run stats
  (``caches.<expert>.mag_ratios``). Its decisions depend on the step only, so every rank agrees.
* ``taylorseer[:interval=N][,warmup=W][,order=O][,modules=lite|blocks]`` -- TaylorSeer: every
  ``N``-th step after ``W`` warm-up steps computes the blocks; the others predict with a Taylor
  expansion of order ``O``: by default (``lite``, diffusers' lite variant) the output
  projection's output, skipping every block -- its factors are output-sized; ``blocks`` predicts
  each block's attention and feed-forward outputs, which holds ``O + 1`` hidden-state tensors per
  hooked module (3 per block: on an A14B expert at 720p, ~370 GB per branch in fp32 divided by
  the sequence-parallel degree -- small sizes only). Step-driven as well.

Request fields: ``cache`` (every expert) and ``cache_high`` / ``cache_low`` (one expert of an
MoE model) are resolved into one canonical spec per expert (:func:`resolve_caches`).

State is per request and per expert: :meth:`ExpertCaches.begin` removes the hooks of the
previous request and installs fresh ones, so nothing survives from one request to the next, and
each expert's state starts empty at its first step (the expert switch). The conditional and
unconditional forwards keep separate state through diffusers' ``cache_context`` (``cond`` /
``uncond``), as ``WanPipeline`` does.

Order of hooks on a transformer: Relay's sequence-parallel split (torch forward pre-hooks of the
model and ``blocks.0``) runs first, then FSDP2's unshard (its own pre-hook), then the cache hook
that replaces the block's ``forward`` (diffusers' ``HookRegistry``), then the block itself with
the sequence-parallel attention processor. So a cache sees this rank's chunk of the tokens,
never the padding of another rank, and a skipped block still unshards under FSDP (no rank ever
misses a collective).

A checkpoint does not hold the cache tensors (three hidden-state tensors per branch: ~2.3 GB
per branch in bf16 at 720p on an A14B expert, divided by the sequence-parallel degree); it holds the denoise state at the step the
current expert's cache started from (``DenoiseState.anchor``), and a run resumed mid-segment
replays the steps from there, which makes it bit-identical to an undisturbed run.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field, replace

from relay.engine.errors import ValidationError

# torch and diffusers are imported where they are used: the request rules parse cache specs
# before any flag check has imported torch.

#: Cache kinds and the syntax of each.
CACHE_KINDS = {
    "none": "none",
    "fbc": "fbc:THRESHOLD",
    "mag": "mag:THRESHOLD[,k=K][,retention=R],ratios=R0/R1/... or mag:calibrate",
    "taylorseer": "taylorseer[:interval=N][,warmup=W][,order=O][,modules=lite|blocks]",
}
NONE = "none"
#: Branch names of the cache contexts (diffusers' convention).
COND, UNCOND = "cond", "uncond"
_MAG_DEFAULTS = {"k": 3, "retention": 0.2}
_TAYLOR_DEFAULTS = {"interval": 5, "warmup": 3, "order": 1, "modules": "lite"}


@dataclass(frozen=True)
class CacheSpec:
    """One expert's cache, parsed from its text form (:data:`CACHE_KINDS`).

    Attributes:
        kind: ``none``, ``fbc``, ``mag`` or ``taylorseer``.
        threshold: FBC / MagCache threshold.
        calibrate: MagCache calibration run (no skipping).
        ratios: MagCache magnitude ratios, one per step of the expert (interpolated otherwise).
        options: The kind's integer / float options (``k``, ``retention``, ``interval``, ...).
    """

    kind: str = NONE
    threshold: float = 0.0
    calibrate: bool = False
    ratios: tuple[float, ...] = ()
    options: tuple[tuple[str, float | str], ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether this spec installs a cache."""
        return self.kind != NONE

    def option(self, name: str):
        """The value of option ``name`` (the kind's default when not given)."""
        defaults = _MAG_DEFAULTS if self.kind == "mag" else _TAYLOR_DEFAULTS
        return dict(self.options).get(name, defaults.get(name))

    @classmethod
    def parse(cls, text: str, *, field_name: str = "cache") -> CacheSpec:
        """Parses ``text``; a :class:`ValidationError` on ``field_name`` says what is wrong."""
        if not isinstance(text, str) or not text.strip():
            raise ValidationError(field_name, f"must be a cache spec ({_syntax()}), got {text!r}")
        kind, _, rest = text.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in CACHE_KINDS:
            raise ValidationError(field_name, f"unknown cache {kind!r}; known: {_syntax()}")
        if kind == NONE:
            if rest:
                raise ValidationError(field_name, "none takes no arguments")
            return cls()
        parts = [part.strip() for part in rest.split(",")] if rest.strip() else []
        if kind == "fbc":
            if len(parts) != 1:
                raise ValidationError(field_name, f"fbc takes one threshold ({CACHE_KINDS['fbc']}), got {text!r}")
            return cls(kind="fbc", threshold=_number(field_name, "threshold", parts[0], 0.0, 10.0))
        if kind == "mag":
            return _parse_mag(field_name, text, parts)
        options = []
        for part in parts:
            name, value = _keyed(field_name, part, ("interval", "warmup", "order", "modules"))
            if name == "modules":
                if value not in ("lite", "blocks"):
                    raise ValidationError(field_name, f"modules must be lite or blocks, got {value!r}")
                if value == "blocks":
                    options.append((name, value))
                continue
            # warmup >= 1: diffusers cannot predict before its first computed step
            options.append((name, int(_number(field_name, name, value, 1, 1000, integer=True))))
        return cls(kind="taylorseer", options=tuple(sorted(options)))

    def text(self) -> str:
        """The canonical text form (what the resolved request and the stats show)."""
        if self.kind == NONE:
            return NONE
        if self.kind == "fbc":
            return f"fbc:{_fmt(self.threshold)}"
        if self.kind == "mag":
            if self.calibrate:
                return "mag:calibrate"
            opts = "".join(f",{name}={_fmt(value)}" for name, value in self.options)
            return f"mag:{_fmt(self.threshold)}{opts},ratios={'/'.join(_fmt(r) for r in self.ratios)}"
        opts = ",".join(f"{name}={_fmt(value)}" for name, value in self.options)
        return f"taylorseer:{opts}" if opts else "taylorseer"


def _syntax() -> str:
    return " | ".join(CACHE_KINDS.values())


def _fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _number(field_name: str, what: str, text: str, low: float, high: float, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise ValidationError(field_name, f"{what} must be {'an integer' if integer else 'a number'}, "
                                          f"got {text!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ValidationError(field_name, f"{what} must be in [{low:g}, {high:g}], got {text}")
    return value


def _keyed(field_name: str, part: str, names) -> tuple[str, str]:
    name, sep, value = part.partition("=")
    if not sep or name.strip() not in names:
        raise ValidationError(field_name, f"expected one of {', '.join(f'{n}=...' for n in names)}, got {part!r}")
    return name.strip(), value.strip()


def _parse_mag(field_name: str, text: str, parts: list[str]) -> CacheSpec:
    if parts == ["calibrate"]:
        return CacheSpec(kind="mag", calibrate=True)
    if not parts or "=" in parts[0]:
        raise ValidationError(field_name, f"mag needs a threshold first ({CACHE_KINDS['mag']}), got {text!r}")
    threshold = _number(field_name, "threshold", parts[0], 0.0, 10.0)
    options, ratios = [], ()
    for part in parts[1:]:
        name, value = _keyed(field_name, part, ("k", "retention", "ratios"))
        if name == "ratios":
            try:
                ratios = tuple(float(r) for r in value.split("/") if r.strip())
            except ValueError:
                raise ValidationError(field_name, f"ratios must be numbers separated by '/', got {value!r}") from None
            if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
                raise ValidationError(field_name, "ratios must be positive finite numbers")
        elif name == "k":
            options.append(("k", int(_number(field_name, "k", value, 1, 1000, integer=True))))
        else:
            options.append(("retention", _number(field_name, "retention", value, 0.0, 1.0)))
    if not ratios:
        raise ValidationError(field_name, "mag needs the model's ratios=R0/R1/...; measure them once with "
                                          "--cache mag:calibrate (the run stats list them per expert)")
    return CacheSpec(kind="mag", threshold=threshold, ratios=ratios, options=tuple(sorted(options)))


def resolve_caches(cache, cache_high, cache_low, *, experts: tuple[str, ...]) -> dict[str, str]:
    """One canonical cache spec per expert of the model.

    Args:
        cache: Every expert's spec (``None``: ``none``).
        cache_high, cache_low: Overrides for the high- / low-noise expert (MoE models only).
        experts: The model's experts.

    Raises:
        ValidationError: on ``cache``, ``cache_high`` or ``cache_low``.
    """
    from relay.engine.experts import HIGH, LOW

    base = CacheSpec.parse(cache, field_name="cache") if cache is not None else CacheSpec()
    out = {expert: base.text() for expert in experts}
    for name, expert, given in (("cache_high", HIGH, cache_high), ("cache_low", LOW, cache_low)):
        if given is None:
            continue
        if expert not in experts:
            raise ValidationError(name, "this model has a single transformer (no expert switch); use cache")
        out[expert] = CacheSpec.parse(given, field_name=name).text()
    return out


# --- agreeing on a skip -----------------------------------------------------------------------
class LocalVote:
    """The first-block decision of one process: diffusers' own metric, nothing to agree with."""

    def decide(self, residual: torch.Tensor, previous: torch.Tensor, threshold: float) -> tuple[bool, bool, int]:
        """``(this branch computes, the group computes, skipped branches of the request)``."""
        change = ((residual - previous).abs().mean() / previous.abs().mean()).item()
        want = change > threshold
        return want, want, 0 if want else 1

    def first(self) -> tuple[bool, bool, int]:
        """The decision of a branch's first forward (nothing cached yet: compute)."""
        return True, True, 0


# --- hooks ------------------------------------------------------------------------------------
def _head_hook_class():
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    class GroupFBCHeadBlockHook(FBCHeadBlockHook):
        """diffusers' first-block head hook whose decision is taken with the group's vote.

        When this branch would skip but another rank of the group computes, the state marks
        ``lockstep``: the remaining blocks then run (their result is discarded) so that every
        rank's collectives stay in step, and the output is still the cached one.
        """

        def __init__(self, state_manager, threshold: float, vote, tally) -> None:
            super().__init__(state_manager, threshold)
            self.vote, self.tally = vote, tally

        def initialize_hook(self, module):
            _register_block_class(module)
            return super().initialize_hook(module)

        def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
            state = self.state_manager.get_state()
            previous = state.head_block_residual
            if previous is None:
                want, group, skipped = self.vote.first()
            else:
                want, group, skipped = self.vote.decide(hidden_states_residual, previous, self.threshold)
            state.lockstep = group and not want
            self.tally.record(skipped=skipped, lockstep=group)
            return want

    return GroupFBCHeadBlockHook


def _block_hook_class():
    from diffusers.hooks.first_block_cache import FBCBlockHook

    class GroupFBCBlockHook(FBCBlockHook):
        """diffusers' first-block cache hook of the other blocks, run in ``lockstep`` when asked."""

        def initialize_hook(self, module):
            _register_block_class(module)
            return super().initialize_hook(module)

        def new_forward(self, module, *args, **kwargs):
            state = self.state_manager.get_state()
            if not state.should_compute and getattr(state, "lockstep", False):
                self.fn_ref.original_forward(*args, **kwargs)  # keeps the group's collectives in step
            return super().new_forward(module, *args, **kwargs)

    return GroupFBCBlockHook


def _register_block_class(module) -> None:
    """Registers an FSDP2-wrapped block's dynamic class with its base class's metadata, so that
    diffusers' block registry (keyed by exact class) knows it."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.utils.torch_utils import unwrap_module

    cls = type(unwrap_module(module))
    TransformerBlockRegistry._register()
    if cls in TransformerBlockRegistry._registry:
        return
    for base in cls.__mro__[1:]:
        if base in TransformerBlockRegistry._registry:
            TransformerBlockRegistry.register(cls, replace(TransformerBlockRegistry._registry[base]))
            return


def _blocks(model) -> list:
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    out = []
    for name, child in model.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            out.extend(child)
    return out


@dataclass
class Tally:
    """Counts of one expert's cache since the last :meth:`take`: branch forwards of the request
    answered from the cache, and those among them whose blocks still ran in lock-step."""

    skipped: int = 0
    lockstep: int = 0
    mag_ratios: dict = field(default_factory=dict)

    def record(self, *, skipped: int, lockstep: bool) -> None:
        """Adds one forward's outcome: ``skipped`` branches of the request, which ran their
        blocks anyway when ``lockstep`` (some rank of the group computed)."""
        self.skipped += int(skipped)
        self.lockstep += int(skipped) if lockstep else 0

    def take(self) -> tuple[int, int]:
        """``(skipped, lockstep)`` since the previous call, and resets them."""
        out = (self.skipped, self.lockstep)
        self.skipped = self.lockstep = 0
        return out


class ExpertCache:
    """The cache hooks of one expert for one request.

    Args:
        model: The expert's transformer (plain or FSDP-sharded).
        spec: Its cache.
        steps: Steps this expert runs in the request (MagCache's schedule length).
        vote: How a first-block decision is agreed (:class:`LocalVote` or the group's).
        branches: Branch forwards of the request per forward on this rank (2 under CFG-parallel,
            where the other half's decision is the same step-driven one for MagCache/TaylorSeer).
        taylorseer_modules: The family's TaylorSeer module patterns (its spec's).
    """

    def __init__(self, model, spec: CacheSpec, *, steps: int, vote, branches: int = 1,
                 taylorseer_modules: tuple[str, ...] = ()) -> None:
        self.model, self.spec, self.steps, self.vote = model, spec, steps, vote
        self.taylorseer_modules = taylorseer_modules
        self.branches = branches
        self.tally = Tally()
        self._probe = None
        self.finished = False
        install = {"fbc": self._install_fbc, "mag": self._install_mag, "taylorseer": self._install_taylorseer}
        if spec.kind in install:
            self._installed(install[spec.kind])

    def _install_fbc(self) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
        from diffusers.hooks.hooks import StateManager
        from diffusers.hooks.first_block_cache import (_FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK,
                                                       FBCSharedBlockState)

        blocks = _blocks(self.model)
        if len(blocks) < 2:
            raise ValueError("a first-block cache needs a transformer with at least 2 blocks")
        manager = StateManager(FBCSharedBlockState, (), {})
        head, block = _head_hook_class(), _block_hook_class()
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(
            head(manager, self.spec.threshold, self.vote, self.tally), _FBC_LEADER_BLOCK_HOOK)
        for index, module in enumerate(blocks[1:], start=1):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                block(manager, is_tail=index == len(blocks) - 1), _FBC_BLOCK_HOOK)
        self.model._cache_config = FirstBlockCacheConfig(threshold=self.spec.threshold)  # disable_cache finds them

    def _install_mag(self) -> None:
        from diffusers.hooks import HookRegistry, MagCacheConfig
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        for module in _blocks(self.model):
            _register_block_class(module)
        spec = self.spec
        config = MagCacheConfig(calibrate=True, num_inference_steps=self.steps) if spec.calibrate else MagCacheConfig(
            threshold=spec.threshold, max_skip_steps=int(spec.option("k")), retention_ratio=spec.option("retention"),
            num_inference_steps=self.steps, mag_ratios=list(spec.ratios))
        self.model.enable_cache(config)
        blocks = _blocks(self.model)
        self._probe = HookRegistry.check_if_exists_or_initialize(blocks[0]).get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
        if spec.calibrate:  # diffusers prints the ratios and clears them at the last step: keep a copy
            tail = HookRegistry.check_if_exists_or_initialize(blocks[-1]).get_hook(_MAG_CACHE_BLOCK_HOOK)
            advance = tail._advance_step

            def keep_then_advance(state, advance=advance, manager=tail.state_manager):
                if state.calibration_ratios and manager.context.name == COND:
                    self.tally.mag_ratios = [round(float(r), 5) for r in state.calibration_ratios]
                with redirect_stdout(io.StringIO()):  # diffusers prints them too; a server's stdout is not the place
                    advance(state)

            tail._advance_step = keep_then_advance

    def _install_taylorseer(self) -> None:
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig
        from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook

        spec = self.spec
        lite = spec.option("modules") == "lite"
        config = TaylorSeerCacheConfig(cache_interval=int(spec.option("interval")),
                                       disable_cache_before_step=int(spec.option("warmup")),
                                       max_order=int(spec.option("order")), taylor_factors_dtype=torch.float32,
                                       use_lite_mode=lite,
                                       cache_identifiers=None if lite else list(self.taylorseer_modules) or None)
        self.model.enable_cache(config)
        # Every hooked module follows the same step-driven schedule: the first one tells.
        self._probe = next((hook for module in self.model.modules()
                            for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values()
                            if isinstance(hook, TaylorSeerCacheHook)), None)
        if self._probe is None:
            raise ValueError("TaylorSeer found no module to cache in this transformer")

    @contextmanager
    def branch(self, name: str):
        """The forwards of branch ``name`` (``cond`` / ``uncond``) inside this context share state."""
        with self.model.cache_context(name):
            yield
            self._after_forward()

    def _installed(self, install) -> None:
        """Runs ``install``; a failure leaves no hook behind (the next request can cache again)."""
        try:
            install()
        except BaseException:
            self.remove()
            raise

    def _after_forward(self) -> None:
        """Counts the forward just run for the step-driven caches (FBC counts in its vote)."""
        if self._probe is None:
            return
        state = self._probe.state_manager.get_state()
        if self.spec.kind == "mag":
            skipped = not state.should_compute
        else:  # TaylorSeer: the step predicted instead of updating its factors
            skipped = state.last_update_step != state.current_step
        self.tally.record(skipped=self.branches if skipped else 0, lockstep=False)

    def remove(self) -> None:
        """Removes the hooks (and so the state) from the expert."""
        if getattr(self.model, "_cache_config", None) is None and self.spec.kind == "fbc":
            from diffusers.hooks import FirstBlockCacheConfig

            self.model._cache_config = FirstBlockCacheConfig(threshold=self.spec.threshold)  # a partial install
        if getattr(self.model, "_cache_config", None) is not None:
            self.model.disable_cache()


class ExpertCaches:
    """The caches of one engine's experts; rebuilt for every request (:meth:`begin`).

    Args:
        vote: Factory ``(expert name) -> vote`` (the worker's group vote; default: one process).
        branches: Branch forwards per rank forward (2 under CFG-parallel).
        taylorseer_modules: The family's TaylorSeer module patterns.
    """

    def __init__(self, vote=None, *, branches: int = 1, taylorseer_modules: tuple[str, ...] = ()) -> None:
        self._vote = vote or (lambda expert: LocalVote())
        self.branches = branches
        self.taylorseer_modules = taylorseer_modules
        self.active: dict[str, ExpertCache] = {}

    def begin(self, experts, request: dict, schedule: list[str]) -> None:
        """Installs fresh caches for ``request`` (its resolved ``caches``) on ``experts``."""
        self.clear()
        specs = request.get("caches") or {}
        for name, text in specs.items():
            spec = CacheSpec.parse(text)
            if spec.enabled and name in experts:
                self.active[name] = ExpertCache(experts[name], spec, steps=schedule.count(name),
                                                vote=self._vote(name), branches=self.branches,
                                                taylorseer_modules=self.taylorseer_modules)

    def branch(self, expert: str, name: str):
        """The cache context of ``expert``'s branch ``name`` (a no-op without a cache)."""
        cache = self.active.get(expert)
        return cache.branch(name) if cache is not None else nullcontext()

    def take(self, expert: str) -> tuple[int, int]:
        """``(skipped, lockstep)`` branch forwards of ``expert`` since the last call."""
        cache = self.active.get(expert)
        return cache.tally.take() if cache is not None else (0, 0)

    def report(self) -> dict:
        """What the run stats show of the caches (MagCache calibration ratios)."""
        return {name: {"mag_ratios": cache.tally.mag_ratios}
                for name, cache in self.active.items() if cache.tally.mag_ratios}

    def finish(self, expert: str) -> None:
        """Frees ``expert``'s cache after its last step (its report stays readable)."""
        cache = self.active.get(expert)
        if cache is not None and not cache.finished:
            cache.remove()
            cache.finished = True

    def enabled(self, expert: str) -> bool:
        """Whether ``expert`` has a cache in the current request."""
        return expert in self.active

    def clear(self) -> None:
        """Removes every cache hook."""
        for cache in self.active.values():
            if not cache.finished:
                cache.remove()
        self.active = {}
