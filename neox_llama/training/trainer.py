"""The training loop of one rank: steps, logging, stop signals, NaN checks, evaluation at its interval, best and early
stopping, checkpoints. The run is wired by :mod:`neox_llama.training.wiring`, evaluated by
:mod:`neox_llama.training.evaluation`."""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from neox_llama.checkpoint.paths import BEST
from neox_llama.config.schema import Config
from neox_llama.data.loader import build_loader
from neox_llama.distributed import RankInfo
from neox_llama.errors import TrainingError
from neox_llama.planning.flops import flops_per_token, recompute_flops_per_token
from neox_llama.tokenizers import Tokenizer
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.evaluation import Evaluator
from neox_llama.training.metrics import format_train, peak_tflops
from neox_llama.training.preference import PreferenceObjective, make_preference_batch, run_preference_batch
from neox_llama.training.step import make_global_batch, next_samples, run_global_batch
from neox_llama.training.wiring import build_run

logger = logging.getLogger("train")

EXIT_NAN = 3


class Trainer:
    """One rank's part of a run, from a resolved config (``cfg.derived`` filled, vocabulary known)."""

    def __init__(self, cfg: Config, info: RankInfo, accelerator: str, tokenizer: Tokenizer | None):
        run = self.run = build_run(cfg, info, accelerator, tokenizer)
        self.cfg, self.info, self.accelerator, self.tokenizer = cfg, info, accelerator, tokenizer
        self.training_engine, self.engine = run.training_engine, run.engine  # self.engine: DeepSpeed's
        self.train_state, self.metrics, self.datasets = run.train_state, run.metrics, run.datasets
        self.stop_requested = False
        self.step_metrics: dict[str, float] = {}
        """A preference run's TRL metrics of its last step (rewards/chosen, ...)."""
        self.last_saved: Path | None = None
        self.flops_per_token = flops_per_token(cfg)
        self.recompute_flops_per_token = recompute_flops_per_token(cfg)
        self.peak_tflops = cfg.peak_tflops or peak_tflops(cfg, accelerator)
        self.evaluator = Evaluator(self.run)

    def _next_batch(self, iterator):
        samples = next_samples(iterator, self.cfg.derived.gradient_accumulation_steps)
        if samples is None:
            raise TrainingError("the training data ran out before train_iters; add data or lower train_iters")
        if isinstance(self.run.loss_fn, PreferenceObjective):
            return make_preference_batch(samples, self.training_engine, self.info.device)
        return make_global_batch(samples, self.training_engine, self.info.device)

    def _run_batch(self, batch) -> torch.Tensor:
        """One training step: its mean loss (a preference run's TRL metrics kept for the next log)."""
        if isinstance(self.run.loss_fn, PreferenceObjective):
            loss, totals = run_preference_batch(self.training_engine, batch, self.run.loss_fn, train=True)
            self.step_metrics = totals.means()
            return loss
        return run_global_batch(self.training_engine, batch, self.run.loss_fn, train=True)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True
            logger.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                           signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _stop_agreed(self) -> bool:
        # Collective device: a host tensor, reduced by gloo (the CPU backend of cpu:gloo,cuda:nccl on GPUs).
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _save(self, tag: str | None = None) -> None:
        if not self.cfg.save:
            return
        files = self.tokenizer.files if self.tokenizer else []
        folder = ckpt.save_checkpoint(self.engine, self.training_engine.state, self.cfg, self.train_state, files,
                                      tag=tag, info=self.run.finetune_info, zero_stage=self.training_engine.zero_stage)
        if tag is None:
            self.last_saved = folder

    def train(self) -> int:
        """Run to ``train_iters`` (or a stop); returns the process exit code."""
        cfg, d, ts = self.cfg, self.cfg.derived, self.train_state
        eod = self.tokenizer.eod_id if self.tokenizer else None
        dp_rank, dp = self.training_engine.state.dp_rank, d.data_parallel_size
        train_iter = iter(build_loader(self.datasets["train"], cfg, dp_rank, dp, ts.consumed_samples, eod))
        evaluating = self.evaluator.validates
        self._install_signal_handlers()
        tokens_per_step = d.train_batch_size * cfg.seq_length * (2 if cfg.preference_loss else 1)  # pairs: 2 rows
        if ts.step >= cfg.train_iters:
            logger.info("the checkpoint is at step %d >= train_iters %d: nothing to train", ts.step, cfg.train_iters)
            if evaluating:  # report the last evaluation again: the same validation batches, with these weights
                self.evaluator.rewind_validation()
                self._evaluate_and_track(track=False)
            self.metrics.close()
            return 0
        logger.info("training %d steps from step %d: %s x %d tokens per step (%s, pp %d x tp %d x dp %d)",
                    cfg.train_iters, ts.step, f"{d.train_batch_size} {'completions' if cfg.preference_loss == 'kto' else 'pairs'}"
                    f" ({2 * d.train_batch_size} sequences)" if cfg.preference_loss else f"{d.train_batch_size} sequences", cfg.seq_length, cfg.precision,
                    cfg.pipe_parallel_size, cfg.model_parallel_size, dp)
        # Step time is measured over the steps since the last log (evaluations and saves left out), so the device
        # need not be waited for at every step.
        window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
        nonfinite = None  # on the device: whether any step's loss since the last read was not finite (no sync)
        while ts.step < cfg.train_iters:
            start = time.perf_counter()
            lr = self.engine.lr_scheduler.current()
            batch = self._next_batch(train_iter)
            window_data += time.perf_counter() - start
            window_steps += 1
            step_loss = self._run_batch(batch)  # no wait yet
            bad = ~torch.isfinite(step_loss)
            nonfinite = bad if nonfinite is None else nonfinite | bad
            self._log_epoch(ts.consumed_samples, d.train_batch_size)
            ts.step += 1
            ts.consumed_samples += d.train_batch_size
            last = ts.step == cfg.train_iters
            log_now = ts.step % cfg.log_interval == 0 or last
            stop = self._stop_agreed()
            evaluate_now = evaluating and (ts.step % cfg.eval_interval == 0 or last)
            save_now = ts.step % cfg.checkpoint_factor == 0 or last
            if log_now or evaluate_now or save_now or stop:
                # The loss is read (the host waits for the device) only here: a non-finite loss is caught at the
                # next log, evaluation or save, and never saved.
                loss = float(step_loss)
                if bool(nonfinite) or not math.isfinite(loss):
                    where = (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                             else "no checkpoint was saved")
                    when = f"at step {ts.step}" if window_steps == 1 else \
                        f"at step {ts.step} or one of the {window_steps - 1} steps before it"
                    logger.error("loss is not finite (%s %s); stopping (%s). Lower the learning rate or check the "
                                 "data.", loss, when, where)
                    return EXIT_NAN
                nonfinite = None
                if log_now:
                    step_time = (time.perf_counter() - window_start) / window_steps
                    self._log(ts.step, loss, lr, step_time, window_data / window_steps, tokens_per_step)
            if evaluate_now and self._evaluate_and_track():
                logger.info("early stopping: no improvement for %d evaluations", cfg.early_stopping_patience)
                stop = True
            if stop or save_now:
                self._save()
            if stop:
                logger.info("stopped at step %d", ts.step)
                break
            if log_now or evaluate_now or save_now:
                window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
        if not self.stop_requested:  # finished or stopped early
            record = self.evaluator.test(ts.step)
            if record is not None:
                self.metrics.write(record)
        self.metrics.close()
        return 0

    def _log_epoch(self, consumed: int, batch: int) -> None:
        epoch_of = getattr(self.datasets["train"], "epoch_of", None)
        if epoch_of is not None and (consumed == 0 or epoch_of(consumed + batch - 1) != epoch_of(consumed - 1)):
            logger.info("step %d reads epoch %d of the %s data", self.train_state.step + 1,
                        epoch_of(consumed + batch - 1), "preference" if self.cfg.preference_loss else "instruction")

    def _evaluate_and_track(self, track: bool = True) -> bool:
        """Evaluate, log, keep the best; True when early stopping should end the run."""
        cfg, ts = self.cfg, self.train_state
        record = self.evaluator.validate(ts.step)
        valid_loss = record["valid_loss"]
        if track or not self.metrics.has_record(ts.step, "valid_loss"):  # a finished job re-run: logged once
            self.metrics.write(record)
        if not track:
            return False
        if ts.best_valid_loss is None or valid_loss < ts.best_valid_loss:
            ts.best_valid_loss, ts.evaluations_without_improvement = valid_loss, 0
            if cfg.save_best:
                self._save(tag=BEST)
            return False
        ts.evaluations_without_improvement += 1
        return bool(cfg.early_stopping_patience and ts.evaluations_without_improvement >= cfg.early_stopping_patience)

    def _log(self, step: int, loss: float, lr: float, step_time: float, data_time: float, tokens: int) -> None:
        tokens_per_sec = tokens / step_time
        world = self.cfg.derived.world_size
        tflops = self.flops_per_token * tokens_per_sec / world / 1e12
        grad_norm = self.engine.get_global_grad_norm()
        scale = None
        if self.cfg.precision == "fp16":
            scale = float(getattr(self.engine.optimizer, "cur_scale", 0.0) or 0.0)
        if self.accelerator == "cuda":
            peak_mem = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {
            "step": step, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_sec": tokens_per_sec, "samples_per_sec": self.cfg.derived.train_batch_size / step_time,
            "tflops_per_rank": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else 0.0,
            "hfu": (tflops * (1 + self.recompute_flops_per_token / self.flops_per_token) / self.peak_tflops
                    if self.peak_tflops else 0.0),
            "loss_scale": scale, "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            "step_time": step_time, "time_data": data_time, "time_compute": step_time - data_time,
            "peak_memory_mb": peak_mem, "consumed_samples": self.train_state.consumed_samples,
        }
        record.update({name: float(value) for name, value in self.step_metrics.items()})  # TRL's, preference runs
        epoch_of = getattr(self.datasets["train"], "epoch_of", None)
        if epoch_of is not None:  # instruction data: which pass over the records this step read
            record["epoch"] = epoch_of(self.train_state.consumed_samples - 1)
        self.metrics.write(record)
        if self.info.rank == 0:
            logger.info("%s", format_train(record))
