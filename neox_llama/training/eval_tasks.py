"""lm-evaluation-harness tasks at every evaluation of a training run (``eval_tasks``), on the training model itself.

Each data-parallel rank is one lm-eval rank (it scores its share of the documents through the engine's module in
eval mode, with the run's tokenizer; metrics are gathered on rank 0), so no checkpoint is written or reloaded.
Pipeline and tensor parallelism are refused at config time: the facade runs the whole model on each rank. Under
ZeRO-3 every rank runs the same number of forward passes. The random-number states are saved and restored around
lm-eval, so a run with ``eval_tasks`` trains exactly as one without.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from neox_llama.checkpoint.metadata import Metadata
from neox_llama.checkpoint.run import Run
from neox_llama.config.schema import Config
from neox_llama.errors import TrainingError
from neox_llama.generation.language_model import LanguageModel
from neox_llama.model.args import LlamaArgs

logger = logging.getLogger("train")


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval's results as flat ``TASK/METRIC`` numbers (``acc,none`` -> ``TASK/acc``; stderr left out)."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) or \
                    isinstance(value, bool):
                continue
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}/{filt}"
            metrics[name] = float(value)
    return metrics


class TaskEvaluator:
    """Runs ``cfg.eval_tasks`` on ``module`` (the engine's model, pp = tp = 1) over the data-parallel ``group``."""

    def __init__(self, cfg: Config, args: LlamaArgs, module: torch.nn.Module, tokenizer, device, group,
                 rank: int):
        from lm_eval.tasks import TaskManager, get_task_dict

        self.cfg, self.rank = cfg, rank
        run = Run(Path(cfg.save or "."), Metadata(tag="training"), cfg, tokenizer, args, tokenizer.vocab_size)
        self.lm = LanguageModel(module, run, device)  # the training module itself: no copy
        module.train()
        self.manager = TaskManager(include_path=cfg.eval_tasks_include_path)
        unknown = [t for t in cfg.eval_tasks if t not in self.manager.all_tasks]
        if unknown:
            raise TrainingError(f"eval_tasks: unknown lm-eval task {unknown[0]!r} (local tasks come from "
                                f"eval_tasks_include_path {cfg.eval_tasks_include_path})")
        self.group, self.even = group, cfg.zero_optimization.stage == 3
        ranks = torch.distributed.get_world_size(group)
        if ranks == 1:
            return
        for name, task in _leaves(get_task_dict(list(cfg.eval_tasks), self.manager)):
            if self.even and task.OUTPUT_TYPE == "generate_until":
                raise TrainingError(f"eval_tasks: {name} generates text, which cannot run under ZeRO-3 with data "
                                    "parallelism (ranks would decode different numbers of steps); use loglikelihood "
                                    "tasks, or tools/evaluate.py --tasks on the checkpoints")
            docs = len(list(task.eval_docs))
            if min(docs, cfg.eval_tasks_limit or docs) < ranks:  # lm-eval deals documents out by rank
                raise TrainingError(f"eval_tasks: {name} has {docs} documents for {ranks} data-parallel ranks; every "
                                    "rank needs at least one (use a bigger task, or fewer ranks)")

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """The tasks' metrics on rank 0 (an empty dict on the others); the module is back in train mode after."""
        from lm_eval import simple_evaluate

        from neox_llama.evaluation.harness import NeoxLlamaLM

        cfg = self.cfg
        states = random.getstate(), np.random.get_state()
        was_training = self.lm.model.training
        self.lm.model.eval()
        quiet = logging.getLogger("lm-eval"), logging.getLogger("lm_eval")
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.WARNING)
        try:
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                model = NeoxLlamaLM(self.lm, batch_size=cfg.eval_tasks_batch_size, group=self.group,
                                    even_batches=self.even, progress=False)
                results = simple_evaluate(model=model, tasks=list(cfg.eval_tasks), num_fewshot=cfg.eval_tasks_num_fewshot,
                                          limit=cfg.eval_tasks_limit, task_manager=self.manager, random_seed=None,
                                          numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=cfg.seed,
                                          batch_size=cfg.eval_tasks_batch_size, verbosity="WARNING",
                                          bootstrap_iters=0)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
            self.lm.model.train(was_training)
        return task_metrics(results) if results else {}


def _leaves(tasks: dict):
    for name, task in tasks.items():
        if isinstance(task, dict):
            yield from _leaves(task)
        else:
            yield str(name), task
