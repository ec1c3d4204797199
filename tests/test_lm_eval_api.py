"""lm-eval's own API client (``local-completions``) scoring through tools/serve.py on 127.0.0.1: a multiple-choice
and a perplexity task give the same per-request log-likelihoods and the same metrics as the in-process
``neox_llama`` model and as lm-eval's ``hf`` backend on the Hugging Face export; per-request adapters and the
server's own tokenizer (``tokenizer_backend=remote``, no export needed) work too."""

from __future__ import annotations

import pytest
from helpers.runner import ROOT
from helpers.serving import CONTEXT, running_server, served_checkpoints

from neox_llama.convert.hf_export import export_to_hf
from neox_llama.evaluation.harness import NeoxLlamaLM
from neox_llama.generation.language_model import LanguageModel

TASKS = ["neox_tiny_mc", "neox_tiny_ppl"]
TOLERANCE = 1e-4
"""Per-request log-likelihood, relative to its size (the issue's bound; the same fp32 forward pass scores all three)."""
WINDOW = CONTEXT - 2
"""lm-eval's API models keep one position for the token they ask for and score rolling windows one shorter still
(``max_length - 2``); the in-process and hf backends are given windows of the same length to compare long documents."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The served checkpoints, their base exported to Hugging Face, the local tasks with absolute data paths."""
    root = served_checkpoints(tmp_path_factory.mktemp("lm_eval_api"))
    export_to_hf(root / "base", root / "hf", dtype="fp32")
    data = ROOT / "tests" / "data" / "lm_eval"
    (root / "tasks").mkdir()
    for task in TASKS:
        text = (data / f"{task}.yaml").read_text().replace(f"tests/data/lm_eval/{task}.jsonl",
                                                           str(data / f"{task}.jsonl"))
        (root / "tasks" / f"{task}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def server(world):
    with running_server(world, "--max-batch-size", "4") as served:
        yield served[0]


@pytest.fixture(scope="module")
def api(server, world):
    """The issue's command on both tasks, run once."""
    return evaluate("local-completions", world, model_args=api_args(server, world))


_MANAGERS: dict = {}


def evaluate(model, world, tasks=TASKS, model_args: str | None = None) -> dict:
    import lm_eval.models  # noqa: F401 (registers lm-eval's own models, local-completions among them)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if world not in _MANAGERS:  # indexing lm-eval's own task folders takes seconds: once
        _MANAGERS[world] = TaskManager(include_path=str(world / "tasks"))
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, batch_size=4,
                           task_manager=_MANAGERS[world])


def api_args(url: str, world, model: str = "base", **extra: object) -> str:
    """The issue's command: the export's tokenizer, the start token added as the hf backend adds it."""
    args = {"model": model, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(world / "hf"), "add_bos_token": True, "max_length": CONTEXT, **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


def requests(result: dict, task: str) -> list[tuple[float, bool | None]]:
    """Every request's (log-likelihood, greedy or None for rolling ones) in document order."""
    out = []
    for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            out.append((float(value[0]), bool(value[1])) if isinstance(value, list | tuple) else (float(value), None))
    return out


def assert_same(ours: dict, theirs: dict, tasks=TASKS) -> None:
    for task in tasks:
        a, b = requests(ours, task), requests(theirs, task)
        assert len(a) == len(b) > 0, task
        for (la, ga), (lb, gb) in zip(a, b, strict=True):
            assert abs(la - lb) <= TOLERANCE * max(1.0, abs(lb)) and ga == gb, (task, la, lb)
        for metric, value in theirs["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_local_completions_equals_the_in_process_model_and_the_hf_backend(api, world):
    from lm_eval.models.huggingface import HFLM

    lm = LanguageModel.from_checkpoint(str(world / "base"), device="cpu")
    in_process = evaluate(NeoxLlamaLM(lm, batch_size=4, max_length=WINDOW, progress=False), world)
    hf = evaluate(HFLM(pretrained=str(world / "hf"), dtype="float32", batch_size=4, device="cpu", max_length=WINDOW),
                  world)
    assert_same(api, in_process)
    assert_same(api, hf)
    assert len(requests(api, "neox_tiny_ppl")) == 5  # one per document; the longest (1381 tokens) in 6 windows


def test_a_served_adapter_and_the_servers_own_tokenizer(server, world, api):
    """model=a scores with the LoRA adapter (as its own merged model); tokenizer_backend=remote needs no export
    and, like lm-eval's API models with any remote tokenizer, adds no start token (so it equals the export's
    tokenizer without add_bos_token)."""
    adapter = evaluate("local-completions", world, ["neox_tiny_mc"], api_args(server, world, model="a"))
    merged = LanguageModel.from_checkpoint(str(world / "a"), device="cpu")
    assert_same(adapter, evaluate(NeoxLlamaLM(merged, batch_size=4, progress=False), world, ["neox_tiny_mc"]),
                ["neox_tiny_mc"])
    remote = evaluate("local-completions", world, ["neox_tiny_mc"],
                      f"model=base,base_url={server}/v1/completions,tokenizer_backend=remote,max_length={CONTEXT}")
    plain = evaluate("local-completions", world, ["neox_tiny_mc"], api_args(server, world, add_bos_token=False))
    assert_same(remote, plain, ["neox_tiny_mc"])
    with_bos = [x for x, _ in requests(api, "neox_tiny_mc")]
    assert [x for x, _ in requests(plain, "neox_tiny_mc")] != with_bos  # the start token matters
