"""Where the wall time of the whole command goes, in parts that add up to it.

The process has one `clock`. Code marks what it is doing with `with clock.part(name):`; parts
nest, and time always goes to the innermost one (a checkpoint saved in the middle of an epoch is
checkpoint time, not training time). Until the run's loop begins the time is start-up; what no
part claims is "other". On a GPU each switch waits for the device, so that asynchronous work is
counted where it was launched (a few switches per epoch).
"""

import contextlib
import os
import time

PARTS = {
    "startup": "start-up (imports, Accelerator, model, tracker)",
    "data": "data (decode or cache, split, to the device)",
    "first_steps": "first steps (CUDA-graph capture, compilation, warm-up)",
    "training": "training steps",
    "validation": "validation",
    "checkpoints": "checkpoints and weights files",
    "tracking": "plots, metrics file and tracker",
    "final": "final report (every test-time mode, test)",
    "other": "other",
}


def process_seconds() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat") as handle:
            started_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class Clock:
    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.stack = ["startup"]
        self.switched = time.perf_counter() - process_seconds()  # the start-up began with the process
        self.synchronize = lambda: None

    def _switch(self):
        self.synchronize()
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.switched
        self.switched = now

    @contextlib.contextmanager
    def part(self, name: str):
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def begin(self, name: str):
        """From now on, time that no part claims goes to `name` (the loop's start ends the start-up)."""
        self._switch()
        self.stack[0] = name

    def report(self) -> tuple:
        """({"time/<part>": seconds, ..., "time/total": ...}, the table as text), the total being the process's."""
        self._switch()
        total = process_seconds()
        claimed = {name: seconds for name, seconds in self.seconds.items() if name != "other"}
        parts = {**claimed, "other": max(0.0, total - sum(claimed.values()))}
        values = {f"time/{name}": round(seconds, 3) for name, seconds in parts.items()}
        values["time/total"] = round(total, 3)
        width = max(len(label) for label in PARTS.values())
        lines = [f"where the {total:.1f} s of this command went:"]
        lines += [f"  {PARTS[name]:<{width}}  {seconds:8.2f} s  {100 * seconds / max(total, 1e-9):5.1f}%"
                  for name, seconds in parts.items()]
        return values, "\n".join(lines)


clock = Clock()
