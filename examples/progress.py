"""Progress output for the examples: a tqdm bar, or plain lines with the same facts.

Both forms show the step count, the elapsed time, an estimate of the time
left and a short status (say, the latest loss), so a run without tqdm is not
silent either. The estimate leaves out the first update: the first step of a
jitted loop includes its compilation, which can take longer than the rest of
a short run, so a rate from it would promise hours for a two-minute run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
      clock: seconds, monotonic (``time.perf_counter``; a test passes its own).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        quiet: bool = False,
        lines: int = 20,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.desc, self.quiet = max(1, total), desc, quiet
        self.n, self.status = 0, ""
        self._every = max(1, self.total // max(1, lines))
        self._clock = clock
        self._start = clock()
        # (time, count) after the first update: the rate is measured from there
        self._first: tuple[float, int] | None = None
        self._bar: Any = None
        if not quiet:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the examples extra installs tqdm
                tqdm = None
            if tqdm is not None:
                # tqdm's own estimate would count the first step's compilation: ours in
                # the postfix instead of its {remaining}
                self._bar = tqdm(
                    total=self.total,
                    desc=desc,
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                )
            else:
                print(f"{desc}: {self.total} steps; the first ones include compilation", flush=True)

    def left(self) -> str:
        """The estimated time left, ``"~m:ss left"``, from the steps after the first update."""
        if self.n >= self.total:
            return "done"
        if self._first is None or self.n <= self._first[1]:
            return "time left after the first steps (they include compilation)"
        since, done = self._first
        rate = (self._clock() - since) / (self.n - done)
        return f"~{_clock(rate * (self.total - self.n))} left"

    def update(self, k: int = 1, status: str = "") -> None:
        self.n += k
        self.status = status or self.status
        if self._first is None:
            self._first = (self._clock(), self.n)
        if self.quiet:
            return
        if self._bar is not None:
            # set before update(), whose refresh then shows this step's estimate and status
            postfix = self.left() + (f", {self.status}" if self.status else "")
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(k)
            return
        if self.n % self._every == 0 or self.n >= self.total:
            elapsed = self._clock() - self._start
            print(
                f"{self.desc} {self.n}/{self.total} [{_clock(elapsed)} elapsed, "
                f"{self.left()}] {self.status}",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
