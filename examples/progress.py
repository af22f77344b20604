"""Progress output for the examples: a tqdm bar, or plain lines with the same facts.

Both forms show the step count, the elapsed time, an estimate of the time
left and a short status (say, the latest loss), so a run without tqdm is not
silent either.
"""

from __future__ import annotations

import time
from typing import Any


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``update(k, status)`` after each unit of work; ``close()`` at the end.

    Args:
      total: units of work in the whole run.
      desc: what is counted, shown before the count.
      quiet: print nothing.
      lines: plain lines at most this many times over the run (without tqdm).
    """

    def __init__(self, total: int, desc: str, *, quiet: bool = False, lines: int = 20):
        self.total, self.desc, self.quiet = max(1, total), desc, quiet
        self.n, self.status = 0, ""
        self._every = max(1, self.total // max(1, lines))
        self._start = time.perf_counter()
        self._bar: Any = None
        if not quiet:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the examples extra installs tqdm
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=desc, dynamic_ncols=True)
            else:
                print(f"{desc}: {self.total} steps; the first ones include compilation", flush=True)

    def update(self, k: int = 1, status: str = "") -> None:
        self.n += k
        self.status = status or self.status
        if self.quiet:
            return
        if self._bar is not None:
            if status:  # set before update(), whose refresh then shows this step's status
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(k)
            return
        if self.n % self._every == 0 or self.n >= self.total:
            elapsed = time.perf_counter() - self._start
            left = elapsed / self.n * (self.total - self.n)
            print(
                f"{self.desc} {self.n}/{self.total} [{_clock(elapsed)} elapsed, "
                f"~{_clock(left)} left] {self.status}",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
