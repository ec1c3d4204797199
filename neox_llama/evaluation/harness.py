"""lm-evaluation-harness on a neox_llama checkpoint: the registered model class ``neox_llama``.

It tokenises as lm-eval's ``hf`` backend does for a Llama (the start token first, a context's trailing spaces
moved to the continuation, BOS as the context of an empty one, left-truncation to the model's context) and
scores with :class:`~neox_llama.generation.language_model.LanguageModel` in batches, so its log-likelihoods equal
the ``hf`` backend's on the Hugging Face export of the same checkpoint. Use it from Python or through
``tools/evaluate.py --tasks``; ``lm_eval`` itself is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationSettings


@register_model("neox_llama")
class NeoxLlamaLM(TemplateLM):
    """``lm_eval --model neox_llama --model_args checkpoint=DIR[,adapter=DIR][,batch_size=8][,max_length=N]`` or an
    instance. ``max_length`` (default: the model's context) is the longest sequence scored, as the ``hf`` backend's
    (a perplexity task's rolling windows are this long).

    ``group`` (a torch.distributed group, e.g. the data-parallel ranks of a training run) makes each member one
    lm-eval rank: lm-eval gives it its share of the documents and gathers the metrics on the group's first rank.
    ``even_batches``: every member runs the same number of forward passes (ZeRO-3 gathers each layer's weights
    collectively during forward, so a rank with fewer batches would leave the others waiting).
    """

    def __init__(self, lm: LanguageModel | None = None, checkpoint: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, device: str | None = None,
                 max_length: int | str | None = None, *,
                 group: dist.ProcessGroup | None = None, even_batches: bool = False, progress: bool = True,
                 **_: object):
        super().__init__()
        self.lm = lm or LanguageModel.from_checkpoint(checkpoint, adapters=[adapter] if adapter else None, device=device)
        self.tokenizer = self.lm.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = min(int(max_length), self.lm.max_length) if max_length else self.lm.max_length
        self.group, self.even_batches, self.progress = group, even_batches, progress
        if group is not None:
            self._rank, self._world_size = dist.get_rank(group), dist.get_world_size(group)

    @property
    def device(self):
        return self.lm.device

    # ------------------------------------------------------------------ lm-eval's collectives over ``group``
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = [torch.zeros_like(tensor.cpu()) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.cpu(), group=self.group)
        return torch.stack(out)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def _most_batches(self, batches: int) -> int:
        """The largest number of batches any member has (this rank's own without ``even_batches``)."""
        if not self.even_batches or self.world_size == 1:
            return batches
        count = torch.tensor([batches], dtype=torch.long)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return int(count.item())

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the hf backend with our exported tokenizer: the start-token policy unless told otherwise."""
        return self.tokenizer.encode_document(string, bos=None if add_special_tokens is None else add_special_tokens)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            rows.append((whole, len(continuation_enc)))
        out: list[tuple[float, bool]] = []
        batches = range(0, len(rows), self.batch_size)
        for start in tqdm(batches, disable=disable_tqdm or not self.progress, desc="loglikelihood"):
            chunk = rows[start:start + self.batch_size]
            scored = self.lm.token_logprobs([ids for ids, _ in chunk], with_greedy=True)
            for (_, n), (logprobs, greedy) in zip(chunk, scored, strict=True):
                out.append((float(logprobs[-n:].double().sum()), bool(greedy[-n:].all())))
        for _ in range(self._most_batches(len(batches)) - len(batches)):  # keep step with the other ranks
            self.lm.token_logprobs([[self.prefix_token_id] * 2])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.even_batches and self.world_size > 1:
            raise NeoxLlamaError("generate_until tasks cannot run during training under ZeRO-3 with data parallelism "
                                 "(ranks would decode different numbers of steps); use loglikelihood tasks, or "
                                 "tools/evaluate.py --tasks on the checkpoint")
        prompts, settings, stops = [], [], []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts.append(self.tok_encode(context)[-(self.max_length - budget):])
            settings.append(GenerationSettings(max_new_tokens=budget, temperature=temperature, stop_strings=until))
            stops.append(until)
        out = []
        for start in tqdm(range(0, len(prompts), self.batch_size), disable=disable_tqdm or not self.progress,
                          desc="generate_until"):
            end = start + self.batch_size
            for ids, until in zip(self.lm.generate(prompts[start:end], settings[start:end]), stops[start:end],
                                  strict=True):
                text = self.tok_decode(ids)
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out.append(text)
        return out


def run_tasks(lm: LanguageModel, tasks: list[str], include_path: str | Path | None = None,
              num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
              log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` on ``tasks`` (local task YAMLs from ``include_path``) with this model."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    return simple_evaluate(model=NeoxLlamaLM(lm, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
                           limit=limit, task_manager=manager, log_samples=log_samples, batch_size=batch_size)
