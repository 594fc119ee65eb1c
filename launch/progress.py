"""Per-step callbacks shared by the single-process command and the worker group: the progress
bar and the checkpoint writer."""

from __future__ import annotations

import sys
from pathlib import Path


class StepProgress:
    """A tqdm bar over denoise steps on stderr, showing the expert and Relay's own ETA."""

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, desc: str = "denoise") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", desc=desc, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event) -> None:
        self.bar.set_postfix_str(f"{event.expert} t={event.timestep} eta {event.eta:.1f}s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()


def checkpoint_writer(run, folder: str | Path, steps):
    """A step callback that saves ``run``'s snapshot as ``folder/step-NNNN.pt`` after each step
    count in ``steps``."""
    folder, wanted = Path(folder), set(steps)

    def on_step(event) -> None:
        if event.step in wanted:
            folder.mkdir(parents=True, exist_ok=True)
            run.snapshot().save(folder / f"step-{event.step:04d}.pt")

    return on_step
