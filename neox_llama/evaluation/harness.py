"""lm-evaluation-harness on a neox_llama checkpoint: the registered model class ``neox_llama``.

It tokenises as lm-eval's ``hf`` backend does for a Llama (the start token first, a context's trailing spaces
moved to the continuation, BOS as the context of an empty one, left-truncation to the model's context) and
scores with :class:`~neox_llama.generation.language_model.LanguageModel` in batches, so its log-likelihoods equal
the ``hf`` backend's on the Hugging Face export of the same checkpoint. Use it from Python or through
``tools/evaluate.py --tasks``; ``lm_eval`` itself is imported only here.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from neox_llama.generation.generator import GenerationSettings, Generator
from neox_llama.generation.language_model import LanguageModel


@register_model("neox_llama")
class NeoxLlamaLM(TemplateLM):
    """``lm_eval --model neox_llama --model_args checkpoint=DIR[,adapter=DIR][,batch_size=8]`` or an instance."""

    def __init__(self, lm: LanguageModel | None = None, checkpoint: str | None = None, adapter: str | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, device: str | None = None, **_: object):
        super().__init__()
        self.lm = lm or LanguageModel.from_checkpoint(checkpoint, adapters=[adapter] if adapter else None, device=device)
        self.tokenizer = self.lm.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

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
        for start in tqdm(range(0, len(rows), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = rows[start:start + self.batch_size]
            scored = self.lm.token_logprobs([ids for ids, _ in chunk], with_greedy=True)
            for (_, n), (logprobs, greedy) in zip(chunk, scored, strict=True):
                out.append((float(logprobs[-n:].double().sum()), bool(greedy[-n:].all())))
        return out

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
        generator = Generator(self.lm.model, self.lm.run, self.lm.device)
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - budget):] if budget < self.max_length else \
                self.tok_encode(context)[-1:]
            settings = GenerationSettings(max_new_tokens=budget, temperature=temperature, stop_strings=until)
            text = self.tok_decode(generator.generate_ids(prompt, settings))
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
