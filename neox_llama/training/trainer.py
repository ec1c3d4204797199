"""The training loop: steps, evaluation, metrics, checkpoints, signals, NaN and early stopping."""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from neox_llama.checkpoint.metadata import Metadata
from neox_llama.checkpoint.paths import BEST
from neox_llama.config.schema import Config
from neox_llama.data.instruction import build_instruction_datasets
from neox_llama.data.loader import build_datasets, build_loader, split_sample_counts
from neox_llama.distributed import RankInfo, agree
from neox_llama.errors import TrainingError
from neox_llama.model.args import LlamaArgs
from neox_llama.planning.flops import flops_per_token, recompute_flops_per_token
from neox_llama.model.loss import CausalLMLoss
from neox_llama.model.peft import describe
from neox_llama.parallel.topology import ParallelState
from neox_llama.tokenizers import Tokenizer
from neox_llama.training import checkpointing as ckpt
from neox_llama.training.engine import setup_engine
from neox_llama.training.load_plan import plan_load
from neox_llama.training.metrics import MetricsWriter, format_train
from neox_llama.training.step import make_global_batch, next_samples, run_global_batch
from neox_llama.utils.peak import known_peak_tflops, measure_matmul_tflops

logger = logging.getLogger("train")

EXIT_NAN = 3


class Trainer:
    """One rank's part of a run, from a resolved config (``cfg.derived`` filled, vocabulary known)."""

    def __init__(self, cfg: Config, info: RankInfo, accelerator: str, tokenizer: Tokenizer | None):
        self.cfg, self.info, self.accelerator, self.tokenizer = cfg, info, accelerator, tokenizer
        self.state = ParallelState(cfg.pipe_parallel_size, cfg.model_parallel_size)
        self.args = LlamaArgs.from_config(cfg)
        self.train_state = ckpt.TrainingState()
        self.stop_requested = False
        self.last_saved: Path | None = None

        # Every rank looks for itself (nodes need not share a filesystem) and all must find the same checkpoint.
        plan = agree(lambda: plan_load(cfg), same_result="the checkpoint to load (load)")
        self.plan = plan
        for note in plan.notes:
            logger.info("%s", note)
        resume, meta = plan.resume, plan.meta
        lora_resume = plan.adapters is not None
        if resume is not None and ckpt.keep_saved_zero_stage(meta, cfg):
            logger.info("%s was saved by DeepSpeed at ZeRO stage %d: this run keeps that stage, so that its optimizer "
                        "state loads as it is", resume, cfg.derived.engine_zero_stage)
        weights_only = resume is not None and not lora_resume and not ckpt.same_layout(meta, cfg)
        weights = plan.weights if plan.weights is not None else (resume if weights_only else None)

        def prepare(module):
            if weights is not None:
                ckpt.load_layer_weights(module, self.state, weights, self.args)
            elif resume is not None:  # one clear error naming the file, before DeepSpeed reads its state
                ckpt.check_resume_files(module, self.state, resume, self.args)

        def prepare_adapters(module):
            if lora_resume:
                ckpt.load_adapter_weights(module, self.state, plan.adapters, plan.peft)
                if ckpt.same_layout(meta, cfg):
                    agree(lambda: ckpt.check_engine_files(plan.adapters))

        self.runner = setup_engine(cfg, self.args, self.state, accelerator, prepare_module=prepare, with_schedule=True,
                                   prepare_adapters=prepare_adapters)
        self.engine = self.runner.engine
        self.finetune_info = ckpt.FinetuneInfo(base=plan.base, peft=plan.peft,
                                               prompt_style=meta.prompt_style if resume is not None else None)
        if resume is not None:
            self._resume(resume, meta, weights_only or (lora_resume and not ckpt.same_layout(meta, cfg)),
                         strict=not lora_resume)
        elif plan.weights is not None:
            what = "the weights"
            if plan.peft is not None:  # LoRA keeps its short form (LoRA r 8); an Adapter names its settings
                what = (f"LoRA r {cfg.lora_r}" if cfg.lora_r else describe(plan.peft)) + " on the frozen weights"
            logger.info("fine-tuning from %s of %s (fresh optimizer, step 0)", what, plan.weights)
        self.loss_fn = CausalLMLoss(self.runner.factory)
        self.metrics = agree(lambda: MetricsWriter(cfg, info.rank, resume_step=self.train_state.step))
        self.flops_per_token = flops_per_token(cfg)
        self.recompute_flops_per_token = recompute_flops_per_token(cfg)
        self.peak_tflops = cfg.peak_tflops or self._measure_peak()
        self.task_evaluator = None
        if cfg.eval_tasks:
            from neox_llama.training.eval_tasks import TaskEvaluator

            self.task_evaluator = agree(lambda: TaskEvaluator(cfg, self.args, self.engine.module, tokenizer,
                                                              info.device, self.state.dp_group, info.rank))

    # ------------------------------------------------------------------ setup
    def _resume(self, folder: Path, meta: Metadata, weights_only: bool, strict: bool = True) -> None:
        self.train_state = ckpt.TrainingState.from_metadata(meta)
        layout = meta.layout
        if weights_only:
            self.engine.lr_scheduler.load_state_dict({"num_steps": self.train_state.step})
            logger.warning("resuming %s saved at pp %d x tp %d x dp %d (ZeRO %d) under pp %d x tp %d x dp %d (ZeRO %d): "
                           "weights, step %d, data position and LR schedule restored; optimizer state NOT restored "
                           "(it is sharded by layout), the optimizer starts fresh",
                           folder, layout.pipe_parallel_size, layout.model_parallel_size,
                           layout.data_parallel_size, layout.zero_stage, self.cfg.pipe_parallel_size,
                           self.cfg.model_parallel_size, self.cfg.derived.data_parallel_size,
                           self.cfg.derived.engine_zero_stage, self.train_state.step)
        else:
            ckpt.restore_engine_state(self.engine, folder, strict=strict)
            logger.info("resumed from %s at step %d (%d samples consumed)", folder, self.train_state.step,
                        self.train_state.consumed_samples)
        if layout.world_size == self.cfg.derived.world_size:
            ckpt.restore_rng(folder, self.info.rank)

    def _measure_peak(self) -> float:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.cfg.precision]
        device = "cuda" if self.accelerator == "cuda" else "cpu"
        if device == "cuda":
            name = torch.cuda.get_device_name()
            known = known_peak_tflops(name, dtype)
            if known is not None:
                logger.info("peak_tflops not set: %s's dense %s peak, %.0f TFLOP/s, for MFU", name, self.cfg.precision,
                            known)
                return known
        peak = measure_matmul_tflops(dtype, device=device)
        if device == "cpu" and dtype == torch.bfloat16:
            fp32 = measure_matmul_tflops(torch.float32)
            if peak < 0.5 * fp32:  # emulated bf16 converts to fp32 anyway: the hardware's peak is the fp32 one
                logger.warning("this CPU has no native bf16 (no AVX-512-BF16/AMX): its bf16 matmuls run at %.1f%% of "
                               "fp32 speed; precision: fp32 trains faster here", 100 * peak / fp32)
                logger.info("peak_tflops not set: measured %.3f TFLOP/s per rank (fp32 matmul, faster than this CPU's "
                            "emulated bf16) for MFU", fp32)
                return fp32
        logger.info("peak_tflops not set: measured %.3f TFLOP/s per rank (%s matmul) for MFU", peak, self.cfg.precision)
        return peak

    # ------------------------------------------------------------------ batches
    def _next_batch(self, iterator):
        samples = next_samples(iterator, self.cfg.derived.gradient_accumulation_steps)
        if samples is None:
            raise TrainingError("the training data ran out before train_iters; add data or lower train_iters")
        return make_global_batch(samples, self.runner, self.info.device)

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float:
        """Mean loss per valid token over the next ``eval_iters`` global batches of ``split``.

        Validation walks on through its split (the position is saved in checkpoints) and starts over when
        it is used up; the test split is read from its start.
        """
        self.engine.eval()
        loss_sum, tokens, nbytes = 0.0, 0.0, 0
        for _ in range(self.cfg.eval_iters):
            samples = next_samples(self.eval_streams[split], self.cfg.derived.gradient_accumulation_steps)
            if samples is None:  # the split is used up: start it over
                self.eval_streams[split] = self._eval_iterator(split, 0)
                samples = next_samples(self.eval_streams[split], self.cfg.derived.gradient_accumulation_steps)
                if samples is None:
                    raise TrainingError(f"the {split} split is smaller than one batch; lower the batch size or "
                                        "give it more data")
                if split == "valid":
                    self.train_state.consumed_valid_samples = 0
            batch = make_global_batch(samples, self.runner, self.info.device)
            mean = float(run_global_batch(self.runner, batch, self.loss_fn, train=False))
            loss_sum += mean * batch.valid_tokens
            tokens += batch.valid_tokens
            nbytes += self._scored_bytes(samples)
            if split == "valid":
                self.train_state.consumed_valid_samples += self.cfg.derived.train_batch_size
        self.engine.train()
        self.last_bits_per_byte = None
        if self.tokenizer is not None and self.cfg.eval_iters:
            # Collective device: a host tensor over the data-parallel group (gloo, the CPU backend on GPUs too).
            total = torch.tensor([nbytes], dtype=torch.float64)
            dist.all_reduce(total, group=self.state.dp_group)
            if total.item() > 0:
                self.last_bits_per_byte = loss_sum / math.log(2) / total.item()
        return loss_sum / max(tokens, 1.0)

    def _scored_bytes(self, samples: list[dict]) -> int:
        """UTF-8 bytes of the tokens this rank's ``samples`` score (their loss-bearing labels, decoded)."""
        if self.tokenizer is None:
            return 0
        size = 0
        for micro in samples:
            for labels, mask in zip(micro["labels"], micro["loss_mask"], strict=True):
                size += len(self.tokenizer.decode(labels[mask > 0].tolist()).encode("utf-8"))
        return size

    def _eval_iterator(self, split: str, consumed: int):
        """A stream of ``split``'s micro-batches from ``consumed`` samples on (from the start when none are left)."""
        dataset = self.datasets[split]
        eod = self.tokenizer.eod_id if self.tokenizer else None
        consumed = consumed if consumed + self.cfg.derived.train_batch_size <= len(dataset) else 0
        if split == "valid":
            self.train_state.consumed_valid_samples = consumed  # the position checkpoints save is the one read
        return iter(build_loader(dataset, self.cfg, self.state.dp_rank, self.state.dp_size, consumed, eod))

    # ------------------------------------------------------------------ loop
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
        folder = ckpt.save_checkpoint(self.engine, self.state, self.cfg, self.train_state, files, tag=tag,
                                      info=self.finetune_info)
        if tag is None:
            self.last_saved = folder

    def train(self) -> int:
        """Run to ``train_iters`` (or a stop); returns the process exit code."""
        cfg, d, ts = self.cfg, self.cfg.derived, self.train_state
        if cfg.sft_data_path:
            data = build_instruction_datasets(cfg, self.tokenizer, split_sample_counts(cfg))
            saved_style = self.finetune_info.prompt_style
            if saved_style is not None and saved_style != data.style:
                raise TrainingError(f"the checkpoint's records were rendered in prompt style {saved_style}, this run "
                                    f"renders them in {data.style}; set prompt_style: {saved_style}")
            self.finetune_info.prompt_style = data.style
            self.datasets = data.datasets
        else:
            self.datasets = build_datasets(cfg)
        if "train" not in self.datasets:
            raise TrainingError("no training data: set data_path (split by `split`), train_data_paths or sft_data_path")
        eod = self.tokenizer.eod_id if self.tokenizer else None
        dp_rank, dp = self.state.dp_rank, d.data_parallel_size
        train_iter = iter(build_loader(self.datasets["train"], cfg, dp_rank, dp, ts.consumed_samples, eod))
        self.eval_streams = {}
        if "valid" in self.datasets:
            self.eval_streams["valid"] = self._eval_iterator("valid", ts.consumed_valid_samples)
        evaluating = "valid" in self.eval_streams and cfg.eval_iters > 0
        if self.task_evaluator is not None and not evaluating:
            logger.warning("eval_tasks will not run: there is no validation split to evaluate at (split, "
                           "valid_data_paths or sft_valid_data_path)")
        self._install_signal_handlers()
        tokens_per_step = d.train_batch_size * cfg.seq_length
        if ts.step >= cfg.train_iters:
            logger.info("the checkpoint is at step %d >= train_iters %d: nothing to train", ts.step, cfg.train_iters)
            if evaluating:  # report the last evaluation again: the same validation batches, with these weights
                ts.consumed_valid_samples = max(0, ts.consumed_valid_samples - cfg.eval_iters * d.train_batch_size)
                self.eval_streams["valid"] = self._eval_iterator("valid", ts.consumed_valid_samples)
                self._evaluate_and_track(track=False)
            self.metrics.close()
            return 0
        logger.info("training %d steps from step %d: %d sequences x %d tokens per step (%s, pp %d x tp %d x dp %d)",
                    cfg.train_iters, ts.step, d.train_batch_size, cfg.seq_length, cfg.precision,
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
            step_loss = run_global_batch(self.runner, batch, self.loss_fn, train=True)  # on the device: no wait yet
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
        if not self.stop_requested and "test" in self.datasets and cfg.eval_iters:  # finished or stopped early
            self.eval_streams["test"] = self._eval_iterator("test", 0)
            test_loss = self.evaluate("test")
            record = {"step": ts.step, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50.0))}
            if self.last_bits_per_byte is not None:
                record["test_bpb"] = self.last_bits_per_byte
            self.metrics.write(record)
            logger.info("step %6d | test_loss %.4f | test_ppl %.2f", ts.step, test_loss, record["test_ppl"])
        self.metrics.close()
        return 0

    def _log_epoch(self, consumed: int, batch: int) -> None:
        epoch_of = getattr(self.datasets["train"], "epoch_of", None)
        if epoch_of is not None and (consumed == 0 or epoch_of(consumed + batch - 1) != epoch_of(consumed - 1)):
            logger.info("step %d reads epoch %d of the instruction data", self.train_state.step + 1,
                        epoch_of(consumed + batch - 1))

    def _evaluate_and_track(self, track: bool = True) -> bool:
        """Evaluate, log, keep the best; True when early stopping should end the run."""
        cfg, ts = self.cfg, self.train_state
        valid_loss = self.evaluate("valid")
        record = {"step": ts.step, "valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50.0))}
        if self.last_bits_per_byte is not None:  # known whenever there is a tokenizer to decode the scored tokens
            record["valid_bpb"] = self.last_bits_per_byte
        tasks = self.task_evaluator.run() if self.task_evaluator is not None else {}
        record.update(tasks)
        if track or not self.metrics.has_record(ts.step, "valid_loss"):  # a finished job re-run: logged once
            self.metrics.write(record)
        logger.info("step %6d | valid_loss %.4f | valid_ppl %.2f%s%s", ts.step, valid_loss, record["valid_ppl"],
                    f" | valid_bpb {record['valid_bpb']:.4f}" if "valid_bpb" in record else "",
                    "".join(f" | {k} {v:.4f}" for k, v in tasks.items()))
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
        epoch_of = getattr(self.datasets["train"], "epoch_of", None)
        if epoch_of is not None:  # instruction data: which pass over the records this step read
            record["epoch"] = epoch_of(self.train_state.consumed_samples - 1)
        self.metrics.write(record)
        if self.info.rank == 0:
            logger.info("%s", format_train(record))
