"""The decoding thread behind the server: continuous batching over one :class:`DecodingBatch`.

Request handlers (on the event loop) :meth:`Engine.submit` jobs, one per choice; the engine thread adds waiting
jobs to the batch at every step boundary while slots are free, takes one step for every running sequence
(requests for different adapters together, through the model's adapter bank) and hands each new token to its
job's event queue on the loop. A cancelled job (its client went away) leaves the batch at the next boundary and
frees its slot. One failing step fails the jobs in it with a server error and the engine goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from neox_llama.generation.batch import DecodedSequence, DecodingBatch
from neox_llama.generation.scores import TokenScore
from neox_llama.generation.settings import GenerationError, GenerationSettings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Event:
    """What a job's handler hears: its prompt's scores (``prompt_scores``, right after the prefill, when asked
    for), a new token (``token``, with its ``score`` when asked for; a stop id comes as a score without a token),
    the end (``finish_reason``), or a failure (``error``)."""

    choice: int
    token: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    score: TokenScore | None = None
    prompt_scores: list[TokenScore] | None = None


@dataclass(eq=False)
class Job:
    """One choice of one request: a prompt to continue, on the base model (adapter 0) or one adapter."""

    prompt: list[int]
    settings: GenerationSettings
    stops: set[int]
    adapter: int
    choice: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False
    sequence: DecodedSequence | None = field(default=None, repr=False)

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass


class Engine:
    """Owns the model: only its thread runs forward passes."""

    def __init__(self, lm, slots: int, context: int | None = None):
        self.lm, self.slots = lm, slots
        self.batch = DecodingBatch(lm, slots, capacity=context)
        self._waiting: deque[Job] = deque()
        self._jobs: dict[DecodedSequence, Job] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self.stats = {"finished": 0, "cancelled": 0, "peak_running": 0}
        """Since start: sequences finished, sequences cancelled (clients gone), the most decoded in one step."""
        self._thread = threading.Thread(target=self._run, name="neox-decoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail every job still waiting or running, and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout)

    def check(self, prompt: list[int], *, generate: bool = True) -> None:
        """GenerationError when ``prompt`` is empty or leaves no room to generate (thread-safe, no model call;
        without ``generate``, a prompt only scored, it may fill the context)."""
        self.batch.check(prompt, generate=generate)

    def submit(self, jobs: list[Job]) -> None:
        with self._wake:
            self._waiting.extend(jobs)
            self._wake.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: these jobs leave the batch at the next step boundary."""
        with self._wake:
            for job in jobs:
                job.cancelled = True
            self._wake.notify_all()

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.batch.running), "waiting": len(self._waiting), "slots": self.slots,
                **self.stats}

    # ------------------------------------------------------------------ the thread
    def _admit(self) -> list[Job] | None:
        """Wait for work; then the waiting jobs that fit into free slots now (None when stopping)."""
        with self._wake:
            while not self._stopping and not self._waiting and not self.batch.running:
                self._wake.wait()
            if self._stopping:
                return None
            admitted = []
            while self._waiting and len(admitted) < len(self.batch.free_slots):
                admitted.append(self._waiting.popleft())
            return admitted

    def _run(self) -> None:
        while True:
            admitted = self._admit()
            if admitted is None:
                break
            try:
                self._iterate(admitted)
            except Exception as err:  # a bug here must fail these requests, not every later one
                logger.exception("the decoding loop failed")
                self._fail_running(f"internal error: {err}")
        self._fail_running("the server is shutting down")
        with self._wake:
            for job in self._waiting:
                job.emit(Event(job.choice, error="the server is shutting down"))
            self._waiting.clear()

    def _iterate(self, admitted: list[Job]) -> None:
        """Admit ``admitted``, drop cancelled sequences, take one step and hand out its tokens."""
        for job in admitted:
            if job.cancelled:
                continue
            try:
                job.sequence = seq = self.batch.add(job.prompt, job.settings, job.stops, job.adapter)
                if seq.finish_reason is not None:  # scored only (max_tokens 0): done with its prefill
                    job.emit(Event(job.choice, finish_reason=seq.finish_reason, prompt_scores=seq.prompt_scores))
                    self.stats["finished"] += 1
                    continue
                self._jobs[seq] = job
                if seq.prompt_scores is not None:
                    job.emit(Event(job.choice, prompt_scores=seq.prompt_scores))
            except GenerationError as err:
                job.emit(Event(job.choice, error=str(err)))
            except Exception as err:
                logger.exception("prefill failed")
                job.emit(Event(job.choice, error=f"internal error: {err}"))
        for seq, job in list(self._jobs.items()):
            if job.cancelled:
                self.batch.cancel(seq)
                del self._jobs[seq]
                self.stats["cancelled"] += 1
        if not self.batch.running:
            return
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.batch.running))
        try:
            events = self.batch.step()
        except Exception as err:
            logger.exception("decoding step failed")
            self._fail_running(f"internal error: {err}")
            return
        for seq, token in events:
            job = self._jobs[seq]
            score = seq.scores[-1] if seq.settings.logprobs is not None else None
            job.emit(Event(job.choice, token=token, finish_reason=seq.finish_reason, score=score))
            if seq.finish_reason is not None:
                del self._jobs[seq]
                self.stats["finished"] += 1

    def _fail_running(self, message: str) -> None:
        for seq, job in list(self._jobs.items()):
            self.batch.cancel(seq)
            job.emit(Event(job.choice, error=message))
        self._jobs.clear()
