"""Progress of long runs (`python -m fused_attn check`, `python -m bench`): the current case, done / total,
elapsed and remaining time -- a tqdm bar on a terminal; elsewhere (CI logs, files) each finished case's line ends
with the count and the times."""
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, title: str, file=None):
        self.file = file or sys.stdout
        self.total, self.done, self.start = total, 0, time.monotonic()
        tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.bar = tqdm(total=total, desc=title, file=self.file, leave=False, dynamic_ncols=True) if tty else None

    def current(self, label: str):
        """The case now running (shown on the bar)."""
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def advance(self, line: str):
        """One case done: print its result line (with the count and times where there is no bar)."""
        self.done += 1
        if self.bar is not None:
            self.bar.write(line, file=self.file)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"{line}  [{self.done}/{self.total}, {tqdm.format_interval(elapsed)} elapsed, "
              f"~{tqdm.format_interval(left)} left]", file=self.file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
