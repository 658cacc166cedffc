"""Peak memory for the benchmark scripts: torch's CPU allocations are invisible to tracemalloc."""
import threading
import time


class RssSampler:
    """Peak resident set size of this process, sampled in a background thread."""

    def __init__(self, every: float = 0.005):
        import psutil
        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        """Peak minus the RSS on entry."""
        return self.peak - self.base
