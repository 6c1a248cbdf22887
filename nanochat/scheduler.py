"""The scheduler of `nanochat serve`: one thread owns the model and a KV cache of `max_batch` rows
(an engine.BatchDecoder) and runs continuous batching for the HTTP side (nanochat/server.py).

Requests (Jobs) wait in a bounded queue; whenever a row is free, a waiting job joins the running
batch (its prompt is prefilled into that row); every step decodes one token for every active row
in one forward; a row leaves when its sequence ends or its client goes away (job.cancelled), and
the freed row is reused at once. Tokens go back to each job's asyncio queue through its event
loop, one wake-up per loop per step. A sequence whose sampling fails ends alone; a failing
forward fails only the requests of that batch.
"""
import asyncio
import threading
import time
import traceback
from collections import Counter, deque

import torch

from nanochat.engine import BatchDecoder, Sequence

DEFAULT_MAX_QUEUE = 64         # requests waiting for a row; more are refused with 503


class Job:
    """A request as the scheduler sees it. The scheduler thread puts ("token", id) and finally
    ("done", finish_reason) or ("error", message) on `events` through the asyncio loop."""

    def __init__(self, prompt, settings, loop):
        self.prompt = prompt
        self.settings = settings
        self.loop = loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()  # set when the client went away: the row is freed
        self.submitted = time.time()
        self.arrived = time.monotonic()  # for the latency metrics (nanochat/serve_metrics.py)
        self.first_token_at = self.last_token_at = None
        self.n_tokens = 0


def _put_all(events):
    for job, item in events:
        job.events.put_nowait(item)


def deliver(events):
    """Hand [(job, event)] from the scheduler thread to the jobs' asyncio loops: one wake-up of
    each loop per call (not one per token), which matters when 16 streams advance every step."""
    by_loop = {}
    for job, item in events:
        by_loop.setdefault(job.loop, []).append((job, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down)


class Scheduler:
    def __init__(self, model, tokenizer, max_batch=8, seed=42, token_delay=0.0, compile=False,
                 max_queue=DEFAULT_MAX_QUEUE, metrics=None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.token_delay = token_delay  # seconds slept per decode step (tests and demos only)
        self.max_queue = max_queue
        self.metrics = metrics  # a metrics.Metrics, or None
        self.waiting = deque()  # jobs not yet in a row, guarded by self.cond
        self.cond = threading.Condition()
        self.decoder = BatchDecoder(model, tokenizer, batch_size=max_batch, seed=seed, compile=compile)
        self.ready = threading.Event()  # set once the (compiled) decode step is warm
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="nanochat-scheduler", daemon=True)
        # statistics (written by the scheduler thread, read by /stats)
        self.started = time.time()
        self.total_requests = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.rejected = 0
        self.tokens_generated = 0
        self.steps = 0
        self.rows_histogram = Counter()  # rows in a decode step -> number of such steps
        self.active = 0
        self.prefill_s = 0.0  # scheduler-thread seconds spent admitting (prefill) and decoding
        self.decode_s = 0.0

    def start(self):
        self.thread.start()

    def shutdown(self):
        self.stop_event.set()
        with self.cond:
            self.cond.notify()  # wake the thread
        self.thread.join(timeout=10)

    def submit(self, job):
        """Queue a job; False (and nothing queued) when max_queue jobs already wait beyond the rows
        that are free (those are about to be admitted). Jobs whose clients left while waiting are
        dropped first, so they never hold a place."""
        with self.cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - self.active):
                self.rejected += 1
                if self.metrics:
                    self.metrics.refused(503)
                return False
            self.total_requests += 1
            self.waiting.append(job)
            self.cond.notify()
        return True

    def _drop_cancelled(self):
        live = [j for j in self.waiting if not j.cancelled.is_set()]
        self.cancelled += len(self.waiting) - len(live)
        if self.metrics:
            for j in self.waiting:
                if j.cancelled.is_set():
                    self.metrics.finished(j, "abort")
        self.waiting = deque(live)

    def _finished(self, job, reason):
        if self.metrics:
            self.metrics.finished(job, reason)

    def stats(self):
        steps = sum(self.rows_histogram.values())
        rows = sum(k * v for k, v in self.rows_histogram.items())
        return {
            "active": self.active,
            "queued": len(self.waiting),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "total_requests": self.total_requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "rejected": self.rejected,
            "tokens_generated": self.tokens_generated,
            "uptime_s": round(time.time() - self.started, 3),
            "decode_steps": steps,
            "mean_rows_per_step": round(rows / steps, 3) if steps else 0.0,
            "max_rows_per_step": max(self.rows_histogram) if self.rows_histogram else 0,
            "rows_per_step_histogram": {str(k): v for k, v in sorted(self.rows_histogram.items())},
            "ready": self.ready.is_set(),
            "compiled": self.decoder.compiled is not None,
            "prefill_s": round(self.prefill_s, 3),
            "decode_s": round(self.decode_s, 3),
        }

    # -- the thread ---------------------------------------------------------------------------

    def _admit(self, block):
        """Move waiting jobs into free rows (prefilling them together). Blocks (briefly) for the
        first job only when nothing is running."""
        jobs = []
        with self.cond:
            self._drop_cancelled()
            if block and not self.waiting and not self.stop_event.is_set():
                self.cond.wait(timeout=0.5)
                self._drop_cancelled()
            while self.waiting and len(self.decoder.seqs) + len(jobs) < self.max_batch:
                jobs.append(self.waiting.popleft())
        new, failed = [], []
        for job in jobs:
            s = job.settings
            try:
                new.append(Sequence(job.prompt, max_tokens=s["max_tokens"], temperature=s["temperature"],
                                    top_k=s["top_k"] or None, top_p=s["top_p"], owner=job, seed=s["seed"]))
            except ValueError as e:  # validation should have caught it; fail this request only
                failed.append((job, ("error", f"generation failed: {e}")))
        self.failed += len(failed)
        for job, _ in failed:
            self._finished(job, "error")
        deliver(failed)
        if not new:
            return
        if self.metrics:
            for seq in new:
                self.metrics.admitted(seq.owner)
        t0 = time.perf_counter()
        try:
            produced = self.decoder.add(new)
        except Exception:
            # take the new rows out again (the running ones are untouched) and admit them one by
            # one, so that only a request that fails on its own is failed
            for seq in [q for q in self.decoder.seqs if q in new]:
                self.decoder.remove(seq)
            produced = []
            for seq in new:
                try:
                    produced += self.decoder.add([seq])
                except Exception as e:
                    for q in [q for q in self.decoder.seqs if q is seq]:
                        self.decoder.remove(q)
                    self._log_failure(e)
                    self.failed += 1
                    self._finished(seq.owner, "error")
                    deliver([(seq.owner, ("error", f"generation failed: {type(e).__name__}: {e}"))])
        self.prefill_s += time.perf_counter() - t0
        self._emit(produced)

    def _log_failure(self, e):
        traceback.print_exception(type(e), e, e.__traceback__)

    def _emit(self, produced):
        """Send the step's tokens to their requests. Counters and rows are updated first, so a
        client that has seen its reply end also sees it in /stats."""
        events = []
        for seq, token, mask in produced:
            if seq.error:  # its sampling failed: this request alone ends, with the reason
                self.failed += 1
                self._finished(seq.owner, "error")
                events.append((seq.owner, ("error", f"generation failed: {seq.error}")))
                continue
            if token not in self.decoder.specials["stop"]:  # the stop token itself is not text
                events.append((seq.owner, ("token", token)))
                self.tokens_generated += 1
                if self.metrics:
                    self.metrics.token(seq.owner)
            if seq.done:
                self.completed += 1
                self._finished(seq.owner, seq.finish_reason)
                events.append((seq.owner, ("done", seq.finish_reason)))
        self.decoder.remove_done()
        self.active = len(self.decoder.seqs)
        deliver(events)

    def _loop(self):
        torch.set_grad_enabled(False)
        # compile every row bucket before the first request (in this thread: CUDA graphs are
        # per thread); requests that arrive meanwhile wait in the queue
        self.decoder.warmup()
        self.ready.set()
        while not self.stop_event.is_set():
            try:
                self._admit(block=not self.decoder.seqs)
                # a client that went away frees its row before the next step
                for seq in [s for s in self.decoder.seqs if s.owner.cancelled.is_set()]:
                    self.decoder.remove(seq)
                    self.cancelled += 1
                    self._finished(seq.owner, "abort")
                self.active = len(self.decoder.seqs)
                if not self.decoder.seqs:
                    continue
                self.rows_histogram[len(self.decoder.seqs)] += 1
                t0 = time.perf_counter()
                produced = self.decoder.step()
                self.decode_s += time.perf_counter() - t0
                self._emit(produced)
                self.active = len(self.decoder.seqs)
                if self.token_delay:
                    time.sleep(self.token_delay)
            except Exception as e:
                # the forward of the whole batch failed (a per-row failure never gets here): never
                # let it kill the server; fail the requests of that batch, serve the next ones
                self._log_failure(e)
                self.failed += len(self.decoder.seqs)
                for seq in self.decoder.seqs:
                    self._finished(seq.owner, "error")
                deliver([(seq.owner, ("error", f"generation failed: {type(e).__name__}: {e}"))
                         for seq in self.decoder.seqs])
                for seq in list(self.decoder.seqs):
                    self.decoder.remove(seq)
                self.active = 0
