"""Ctrl-C during training: finish the step, save it, say how to resume.

An interrupt that lands inside a step (in autograd, or halfway through the optimizer's update)
leaves no state worth saving, and the steps since the last checkpoint were lost. Under
:func:`deferred_interrupt` the first Ctrl-C (SIGINT) only asks the loop to stop: the running step
ends, the loop saves a checkpoint of it and raises :class:`Interrupted` (a KeyboardInterrupt)
whose message names the checkpoint; a second Ctrl-C interrupts at once, as usual. Resuming
from that checkpoint continues exactly (the batch of a step is a function of the step; the RNG
is saved). In one process only: under a launcher every rank would have to agree on the step
(a collective per step), so there a Ctrl-C keeps its usual meaning and the run resumes from its
last periodic checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """Training stopped at a step boundary on Ctrl-C; the message says where it was saved."""


class StopRequest:
    requested = False


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True):
    """Yield a :class:`StopRequest` whose ``requested`` the first SIGINT sets (see the module
    docstring); nothing changes when not ``enabled`` or outside the main thread."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if stop.requested:  # the second Ctrl-C: now
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.requested = True
        print("\nCtrl-C: stopping after this step and saving it (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)  # fmt: skip

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
