"""Evaluation during training: the mean loss per valid token (and bits per byte) of the validation and test splits,
through the same step functions as training, the validation position checkpoints save, and the lm-eval tasks
(``eval_tasks``); each evaluation is logged and returned as a metrics record."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from neox_llama.data.loader import build_loader
from neox_llama.distributed import agree
from neox_llama.errors import TrainingError
from neox_llama.training.preference import (
    PreferenceObjective,
    PreferenceTotals,
    make_preference_batch,
    run_preference_batch,
)
from neox_llama.training.step import make_global_batch, next_samples, run_global_batch
from neox_llama.training.wiring import TrainingRun

logger = logging.getLogger("train")


class Evaluator:
    """Evaluates a wired run's model; moves ``train_state.consumed_valid_samples`` as it reads the validation split."""

    def __init__(self, run: TrainingRun):
        self.run = run
        cfg = run.cfg
        self.streams: dict = {}
        """Each split's stream of this rank's micro-batches, where evaluation goes on reading."""
        self.preference_totals = PreferenceTotals()
        """A preference run's TRL metrics summed over an evaluation's steps."""
        self.tasks = None
        if cfg.eval_tasks:
            from neox_llama.training.eval_tasks import TaskEvaluator

            self.tasks = agree(lambda: TaskEvaluator(cfg, run.training_engine.args, run.engine.module, run.tokenizer,
                                                     run.info.device, run.state.dp_group, run.info.rank))
        if "valid" in run.datasets:
            self.streams["valid"] = self._stream("valid", run.train_state.consumed_valid_samples)
        if self.tasks is not None and not self.validates:
            logger.warning("eval_tasks will not run: there is no validation split to evaluate at (split, "
                           "valid_data_paths or sft_valid_data_path)")

    @property
    def validates(self) -> bool:
        """Whether the run evaluates at all (a validation split and ``eval_iters`` > 0)."""
        return "valid" in self.streams and self.run.cfg.eval_iters > 0

    def validate(self, step: int) -> dict:
        """Validation loss (and ppl, bits per byte, the lm-eval tasks' metrics) at ``step``: logged, returned as the
        metrics record."""
        self.preference_totals = PreferenceTotals()
        valid_loss, bits_per_byte = self.loss("valid")
        record = {"step": step, "valid_loss": valid_loss}
        if not isinstance(self.run.loss_fn, PreferenceObjective):  # a preference loss has no perplexity
            record["valid_ppl"] = math.exp(min(valid_loss, 50.0))
        record.update({f"valid_{name}": value for name, value in self.preference_totals.means().items()})
        if bits_per_byte is not None:  # known whenever there is a tokenizer to decode the scored tokens
            record["valid_bpb"] = bits_per_byte
        tasks = self.tasks.run() if self.tasks is not None else {}
        record.update(tasks)
        preference = {k: v for k, v in record.items() if k.startswith(("valid_rewards/", "valid_logps/", "valid_kl"))}
        logger.info("step %6d | valid_loss %.4f%s%s%s", step, valid_loss,
                    f" | valid_ppl {record['valid_ppl']:.2f}" if "valid_ppl" in record else "",
                    f" | valid_bpb {record['valid_bpb']:.4f}" if "valid_bpb" in record else "",
                    "".join(f" | {k} {v:.4f}" for k, v in {**preference, **tasks}.items()))
        return record

    def rewind_validation(self) -> None:
        """Step back over the last evaluation's batches, so that the next one reads the same validation data."""
        cfg, ts = self.run.cfg, self.run.train_state
        ts.consumed_valid_samples = max(0, ts.consumed_valid_samples - cfg.eval_iters * cfg.derived.train_batch_size)
        self.streams["valid"] = self._stream("valid", ts.consumed_valid_samples)

    def test(self, step: int) -> dict | None:
        """The test split's loss from its start (None without a test split or ``eval_iters``): logged, returned as
        the metrics record."""
        if "test" not in self.run.datasets or not self.run.cfg.eval_iters:
            return None
        self.streams["test"] = self._stream("test", 0)
        test_loss, bits_per_byte = self.loss("test")
        record = {"step": step, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50.0))}
        if bits_per_byte is not None:
            record["test_bpb"] = bits_per_byte
        logger.info("step %6d | test_loss %.4f | test_ppl %.2f", step, test_loss, record["test_ppl"])
        return record

    @torch.no_grad()
    def loss(self, split: str = "valid") -> tuple[float, float | None]:
        """Mean loss per valid token over the next ``eval_iters`` global batches of ``split``, and bits per byte (None
        without a tokenizer).

        Validation walks on through its split (the position is saved in checkpoints) and starts over when
        it is used up; the test split is read from its start.
        """
        run, cfg, ts = self.run, self.run.cfg, self.run.train_state
        accumulation = cfg.derived.gradient_accumulation_steps
        run.engine.eval()
        loss_sum, tokens, nbytes = 0.0, 0.0, 0
        for _ in range(cfg.eval_iters):
            samples = next_samples(self.streams[split], accumulation)
            if samples is None:  # the split is used up: start it over
                self.streams[split] = self._stream(split, 0)
                samples = next_samples(self.streams[split], accumulation)
                if samples is None:
                    raise TrainingError(f"the {split} split is smaller than one batch; lower the batch size or "
                                        "give it more data")
                if split == "valid":
                    ts.consumed_valid_samples = 0
            if isinstance(run.loss_fn, PreferenceObjective):  # the mean over pairs (completions), TRL's metrics
                batch = make_preference_batch(samples, run.training_engine, run.info.device)
                mean, totals = run_preference_batch(run.training_engine, batch, run.loss_fn, train=False)
                loss_sum += float(mean) * batch.examples
                tokens += batch.examples
                self.preference_totals.add(totals)
            else:
                batch = make_global_batch(samples, run.training_engine, run.info.device)
                mean = float(run_global_batch(run.training_engine, batch, run.loss_fn, train=False))
                loss_sum += mean * batch.valid_tokens
                tokens += batch.valid_tokens
                nbytes += self._scored_bytes(samples)
            if split == "valid":
                ts.consumed_valid_samples += cfg.derived.train_batch_size
        run.engine.train()
        bits_per_byte = None
        if run.tokenizer is not None and cfg.eval_iters:
            # Collective device: a host tensor over the data-parallel group (gloo, the CPU backend on GPUs too).
            total = torch.tensor([nbytes], dtype=torch.float64)
            dist.all_reduce(total, group=run.state.dp_group)
            if total.item() > 0:
                bits_per_byte = loss_sum / math.log(2) / total.item()
        return loss_sum / max(tokens, 1.0), bits_per_byte

    def _scored_bytes(self, samples: list[dict]) -> int:
        """UTF-8 bytes of the tokens this rank's ``samples`` score (their loss-bearing labels, decoded)."""
        tokenizer = self.run.tokenizer
        if tokenizer is None:
            return 0
        size = 0
        for micro in samples:
            for labels, mask in zip(micro["labels"], micro["loss_mask"], strict=True):
                size += len(tokenizer.decode(labels[mask > 0].tolist()).encode("utf-8"))
        return size

    def _stream(self, split: str, consumed: int):
        """A stream of ``split``'s micro-batches from ``consumed`` samples on (from the start when none are left)."""
        run, cfg = self.run, self.run.cfg
        dataset = run.datasets[split]
        eod = run.tokenizer.eod_id if run.tokenizer else None
        consumed = consumed if consumed + cfg.derived.train_batch_size <= len(dataset) else 0
        if split == "valid":
            run.train_state.consumed_valid_samples = consumed  # the position checkpoints save is the one read
        return iter(build_loader(dataset, cfg, run.state.dp_rank, run.state.dp_size, consumed, eod))
