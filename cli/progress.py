"""Progress bars for the command line: shown only when stderr is a terminal (a log file or a
pipe gets the plain lines, never bar redraws)."""

from __future__ import annotations

import sys


def on_terminal(enabled: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for, and stderr is a terminal."""
    return enabled and sys.stderr.isatty()


class StepProgress:
    """A tqdm bar over denoise steps on stderr, showing the expert, the group and Relay's ETA.

    Args:
        total: Steps of the request.
        start: Steps already done (a resume).
        enabled: Draw it (only on a terminal in any case).
        desc: The bar's label.
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, desc: str = "denoise") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", desc=desc, disable=not on_terminal(enabled),
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, *, expert: str, eta_s: float, group: str = "") -> None:
        """Moves the bar to ``step`` steps done."""
        where = f" on {group}" if group else ""
        self.bar.set_postfix_str(f"{expert}{where} eta {eta_s:.1f}s", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        """A line above the bar (or plain on stderr without one)."""
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Closes the bar."""
        self.bar.close()
