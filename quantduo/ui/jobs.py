"""One job at a time on the models, a bounded line of waiting requests, progress and cancellation.

Handlers run :meth:`JobRunner.run` as a generator: it yields status lines (``busy`` while waiting, then the job's
progress) and finally a :class:`Done` carrying the result or the error. The work itself runs in a worker thread,
so the page gets progress while it runs; cancelling (button, or the page going away) sets the job's flag, and the
engines stop at their next step.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .backend import Cancelled, Job, UserError

POLL_S = 0.25


@dataclass
class Done:
    """End of a job: ``result`` or ``error`` (a message for the page); ``cancelled`` when it was stopped."""

    result: Any = None
    error: str | None = None
    cancelled: bool = False


class QueueFull(UserError):
    """Too many requests are already waiting."""


class JobRunner:
    """Runs jobs one at a time; at most ``max_waiting`` requests wait behind the running one."""

    def __init__(self, max_waiting: int = 2, log: Callable[[str], None] = print):
        self.max_waiting = max_waiting
        self.log = log
        self._lock = threading.Lock()  # held while a job runs
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self.running: Job | None = None

    def _enqueue(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                busy = self.running.label if self.running else "a job"
                raise QueueFull(f"busy: {busy} is running and {len(self._waiting)} requests are waiting "
                                f"(at most {self.max_waiting}); try again in a moment")
            self._waiting.append(job)

    def _busy_line(self, job: Job) -> str:
        with self._cond:
            position = self._waiting.index(job) + 1 if job in self._waiting else 0
        running = self.running.label if self.running else "another request"
        return f"busy: {running} is running; your request is queued (number {position} in line)"

    def cancel(self, session: str | None = None) -> int:
        """Cancel the running and waiting jobs of ``session`` (None: every job); returns how many."""
        with self._cond:
            jobs = self._waiting + ([self.running] if self.running else [])
            hit = [j for j in jobs if session is None or j.session == session]
        for job in hit:
            job.cancel()
        return len(hit)

    def run(self, label: str, fn: Callable[[Job], Any], session: str = "") -> Iterator[str | Done]:
        """Yield status lines while ``fn(job)`` waits and runs, then one :class:`Done`."""
        job = Job(label, session)
        try:
            self._enqueue(job)
        except QueueFull as err:
            yield Done(error=str(err))
            return
        try:
            while not self._lock.acquire(timeout=POLL_S):
                if job.cancel_event.is_set():
                    yield Done(error=f"{label}: cancelled while queued", cancelled=True)
                    return
                yield self._busy_line(job)
        finally:
            with self._cond:
                self._waiting.remove(job)
        try:
            self.running = job
            yield from self._execute(job, fn)
        finally:
            self.running = None
            self._lock.release()

    def _execute(self, job: Job, fn: Callable[[Job], Any]) -> Iterator[str | Done]:
        """Run ``fn`` in a worker thread, yielding its progress; cancels and joins it if the caller goes away."""
        box: dict[str, Any] = {}

        def work():
            try:
                box["result"] = fn(job)
            except BaseException as err:  # reported to the page below
                box["error"] = err

        thread = threading.Thread(target=work, name=f"quantduo-ui {job.label}", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(POLL_S)
                if thread.is_alive():
                    yield job.status()
        finally:
            if thread.is_alive():  # the generator was closed (page gone or cancelled by Gradio)
                job.cancel()
                thread.join()
        yield self._done(job, box)

    def _done(self, job: Job, box: dict) -> Done:
        err = box.get("error")
        if err is None:
            return Done(result=box.get("result"))
        if isinstance(err, Cancelled):
            return Done(error=f"{job.label}: cancelled", cancelled=True)
        if isinstance(err, UserError):
            return Done(error=str(err))
        self.log("".join(traceback.format_exception(err)))
        return Done(error=f"{job.label} failed: {type(err).__name__}: {err}")
