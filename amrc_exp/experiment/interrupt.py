"""Ctrl-C for the `amrc` command: exit 130 (the shell's 128 + SIGINT) with one line, promptly,
whatever the process is doing. Standard library only: it is installed before torch is imported.

Why not Python's default KeyboardInterrupt alone: an exception raised where C++ calls back into
Python can be swallowed. `import torch` initialises NumPy from C++ and turns any error there into
a "Failed to initialize NumPy" warning, so a Ctrl-C in that window (about 0.45-0.57 s after
start on an idle 2-core AMD EPYC, longer and later under load) was lost and the run went on:
an endless `zfit.iters` fit then never exited (issue 34). Hence:

* before `ready()` (imports, config composition: nothing to clean up), SIGINT exits at once;
* after it, SIGINT raises KeyboardInterrupt, so the run writes its `failed.json` and closes its
  tracker, and a watchdog exits anyway `GRACE_S` later if that cleanup is swallowed or stuck;
* a second Ctrl-C exits at once.

`results.json` is written only at a run's end, atomically, so exiting early never leaves one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["GRACE_S", "MESSAGE", "install", "ready", "say"]

GRACE_S = 3.0  # KeyboardInterrupt's cleanup (failed.json, the tracker, interpreter exit) gets this long
MESSAGE = "amrc_exp: interrupted (no results.json written for the unfinished job; rerun to resume)"
_state = {"ready": False, "interrupted": False, "said": False}
_lock = threading.Lock()


def say() -> None:
    """Print MESSAGE to stderr, once per process however many paths reach it."""
    with _lock:
        if _state["said"]:
            return
        _state["said"] = True
    print(MESSAGE, file=sys.stderr, flush=True)


def _exit_now() -> None:
    say()
    os._exit(130)  # no cleanup left worth waiting for; a finished job's files are complete already


def _watchdog() -> None:
    time.sleep(GRACE_S)
    _exit_now()


def _on_sigint(signum: int, frame: object) -> None:
    if not _state["ready"] or _state["interrupted"]:
        _exit_now()
    _state["interrupted"] = True
    threading.Thread(target=_watchdog, name="amrc-ctrl-c-watchdog", daemon=True).start()
    raise KeyboardInterrupt


def install() -> None:
    """Take over SIGINT in the main thread (no-op elsewhere, or where SIGINT is ignored: a
    background job started with `nohup` or `&` in a non-interactive shell keeps ignoring it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    signal.signal(signal.SIGINT, _on_sigint)


def ready() -> None:
    """From now on Ctrl-C raises KeyboardInterrupt (the run has state worth cleaning up)."""
    _state["ready"] = True
