"""Run a function in a child process that is killed when it overruns: a decode that hangs or eats
memory stops with it, instead of living on in an abandoned thread.

    call = IsolatedCall(timeout=30, memory=4 << 30)
    frames = call(decode_clip, data, 17, 8.0, rng, "auto")   # in the child; rng advanced here too

One child per process that calls (a DataLoader worker, an ingest worker), forked on the first
call and reused, so a call costs a pipe round trip, not a process start. The child:
  * runs `fn(*args)` and sends back the result, or the exception it raised;
  * is killed (SIGKILL) when a call takes longer than `timeout` seconds -> CallTimedOut; the next
    call forks a fresh one;
  * may grow its address space by at most `memory` bytes beyond what it inherited
    (RLIMIT_AS): past that an allocation fails inside the child (MemoryError or a decoder error),
    so no input can take the machine's memory;
  * dies with its parent: it exits when the pipe closes.
A child that dies (a decoder crash, the kernel's OOM killer) gives CallDied; the next call forks
a fresh one. np.random.Generator arguments come back advanced, as if `fn` had run in the caller
(the loader crops with the rng its decode drew from).

Linux (fork, /proc, RLIMIT_AS). `fn` is captured when the child is forked (so it may be any
callable, a closure or a patched function included); calling with another `fn` forks anew.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import traceback

import numpy as np


class CallTimedOut(Exception):
    """The call took longer than its timeout; its child was killed."""


class CallDied(Exception):
    """The child died during the call (a crash or a kill from outside); the message says how."""


class IsolatedCall:
    """`fn(*args)` in a reusable child process, killed after `timeout` seconds (None: never) and
    limited to `memory` more bytes of address space than it started with (None: no limit)."""

    def __init__(self, timeout: float | None, memory: int | None = None):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.timeout, self.memory = timeout, memory
        self._child: tuple[int, object, object] | None = None  # (pid, connection, fn)
        self._owner = os.getpid()  # the process that forked the child

    def __getstate__(self) -> dict:
        return {"timeout": self.timeout, "memory": self.memory, "_child": None, "_owner": None}  # each process forks its own

    def __call__(self, fn, *args):
        if self._child is not None and self._owner != os.getpid():
            self._child = None  # copied into a forked process (a DataLoader worker): that child is not ours
        if self._child is None or self._child[2] is not fn or self._child[0] != _alive(self._child[0]):
            self.close()
            self._child, self._owner = _fork(fn, self.memory), os.getpid()
        pid, conn, _ = self._child
        try:
            conn.send(args)
            ready = conn.poll(self.timeout)
        except (BrokenPipeError, EOFError, OSError):
            ready = True  # the child is gone: recv below says so
        if not ready:
            self.close()
            raise CallTimedOut(f"took longer than {self.timeout:g} s; its process was killed")
        try:
            ok, value, states = conn.recv()
        except (EOFError, OSError):
            status = self.close()
            raise CallDied(f"its process died ({status})") from None
        for arg, state in zip(args, states, strict=True):
            if state is not None:
                arg.bit_generator.state = state
        if ok:
            return value
        raise value

    def close(self) -> str:
        """Kill the child (if any); returns how it ended, for messages."""
        if self._child is None or self._owner != os.getpid():
            self._child = None
            return "not started"
        pid, conn, _ = self._child
        self._child = None
        conn.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "already reaped"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def __del__(self):
        self.close()


def _alive(pid: int) -> int:
    """`pid` if that child has not exited, else -1 (it is reaped here)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return -1 if done else pid


def _fork(fn, memory: int | None) -> tuple[int, object, object]:
    parent, child = multiprocessing.Pipe()
    pid = os.fork()
    if pid == 0:  # the child: serve calls until the pipe closes, never return into the caller's code
        code = 0
        try:
            parent.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C in a terminal ends it with the parent
            if memory is not None:
                limit = _address_space() + memory
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            _serve(fn, child)
        except BaseException:  # noqa: BLE001 (a child must never unwind into the parent's stack)
            code = 1
        finally:
            os._exit(code)
    child.close()
    return pid, parent, fn


def _serve(fn, conn) -> None:
    while True:
        try:
            args = conn.recv()
        except EOFError:  # the parent closed the pipe (or died)
            return
        try:
            reply = (True, fn(*args))
        except Exception as exc:  # handed to the caller, which re-raises it
            reply = (False, _picklable(exc))
        states = [a.bit_generator.state if isinstance(a, np.random.Generator) else None for a in args]
        conn.send((*reply, states))


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        multiprocessing.reduction.ForkingPickler.loads(multiprocessing.reduction.ForkingPickler.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 (any failure to round-trip means: send text instead)
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def _address_space() -> int:
    """This process's current virtual memory size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
