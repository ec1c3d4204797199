"""Scoring through the server: /v1/completions with echo and logprobs (OpenAI's legacy format, as vLLM answers
it), chat logprobs, /tokenize, /detokenize and /tokenizer_info, spoken to by the official openai client, raw HTTP
and lm-eval's own remote-tokenizer client; every log-probability equal to what tools/evaluate.py computes."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import inprocess
from helpers.runner import ROOT
from helpers.serving import CONTEXT, running_server, served_checkpoints

from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationSettings
from neox_llama.serving.app import ServedModel, Service, build_app
from neox_llama.serving.engine import Engine
from neox_llama.tokenizers.prompts import Message, encode_dialog

PROMPT = "it was the age of wisdom, it was the age of foolishness"
TOLERANCE = 1e-6
"""Prompt log-probabilities against tools/evaluate.py's (the same fp32 forward pass, batch of one)."""
DECODED = 1e-5
"""Generated tokens' log-probabilities (one token at a time through the KV cache) against a full forward pass."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return served_checkpoints(tmp_path_factory.mktemp("serve_logprobs"))


@pytest.fixture(scope="module")
def server(folders):
    with running_server(folders, "--max-batch-size", "4") as served:
        yield served[0]


@pytest.fixture(scope="module")
def models(folders):
    """Each served name's own model (a LoRA checkpoint merged into its base; the Adapter v2 one attached)."""
    return {name: LanguageModel.from_checkpoint(str(folders / name), device="cpu") for name in ("base", "a", "b")}


def post(url: str, path: str, body: dict) -> dict:
    answer = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def reference(lm: LanguageModel, ids: list[int]) -> list[float]:
    """tools/evaluate.py's log-probabilities of ``ids`` after the first."""
    return lm.token_logprobs([ids])[0].tolist()


def check_format(logprobs: dict, text: str, k: int) -> None:
    """OpenAI's legacy object: tokens joining to ``text``, offsets into it, the chosen token among its top ones."""
    assert "".join(logprobs["tokens"]) == text
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i])
                                       for i in range(len(logprobs["tokens"]))]
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                                 strict=True):
        if value is None:
            assert top is None
            continue
        # up to k + 1 (the chosen token beside the k most likely); fewer where two tokens have the same text
        assert top[token] == value and 1 <= len(top) <= k + 1 and value <= 0


def test_echo_with_max_tokens_0_scores_the_prompt_as_evaluate_py_does(server, folders, models, tmp_path):
    answer = post(server, "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0})
    choice = answer["choices"][0]
    ids = models["base"].tokenizer.encode_document(PROMPT)
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    check_format(lp, PROMPT, 2)
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], reference(models["base"], ids), strict=True)) \
        <= TOLERANCE
    (tmp_path / "prompt.txt").write_text(PROMPT)
    cli = inprocess.tool("evaluate.py", "--checkpoint", str(folders / "base"), "--text", str(tmp_path / "prompt.txt"),
                         "--seq-length", str(CONTEXT), "--output", str(tmp_path / "eval.json"), "--no-progress",
                         cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["tokens"] == len(ids) - 1
    assert abs(-sum(lp["token_logprobs"][1:]) - result["loss"] * result["tokens"]) <= TOLERANCE * result["tokens"]


def test_token_id_prompts_are_scored_as_sent_through_the_openai_client(server, models):
    ids = models["base"].tokenizer.encode(PROMPT)  # no start token: none is added
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    done = c.completions.create(model="base", prompt=[ids, ids[:5]], echo=True, logprobs=0, max_tokens=0)
    for choice, sent in zip(done.choices, (ids, ids[:5]), strict=True):
        assert len(choice.logprobs.tokens) == len(sent)
        assert choice.text == models["base"].tokenizer.decode(sent)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and max(abs(a - b) for a, b in zip(got[1:], reference(models["base"], sent),
                                                                  strict=True)) <= TOLERANCE
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: the chosen token


def test_echo_then_generate_gives_the_prompt_and_each_new_tokens_logprob(server, models):
    lm = models["base"]
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    plain = post(server, "/v1/completions", body)
    echoed = post(server, "/v1/completions", {**body, "echo": True})
    prompt = lm.tokenizer.encode_document(PROMPT)
    new = lm.generate([prompt], [GenerationSettings(max_new_tokens=6)], stop_ids=set())[0]
    text = plain["choices"][0]["text"]
    assert echoed["choices"][0]["text"] == PROMPT + text
    assert lm.tokenizer.decode(prompt + new) == PROMPT + text  # a leading space of the answer is kept
    check_format(plain["choices"][0]["logprobs"], text, 3)
    check_format(echoed["choices"][0]["logprobs"], PROMPT + text, 3)
    want = reference(lm, prompt + new)
    for lp, first in ((plain["choices"][0]["logprobs"], len(prompt) - 1), (echoed["choices"][0]["logprobs"], -1)):
        got = [x for x in lp["token_logprobs"] if x is not None]
        assert max(abs(a - b) for a, b in zip(got, want[first:] if first >= 0 else want, strict=True)) <= DECODED
        for value, top in zip(lp["token_logprobs"][-6:], lp["top_logprobs"][-6:], strict=True):
            assert value == max(top.values())  # greedy: the chosen token is the most likely one, exactly
    assert echoed["choices"][0]["logprobs"]["token_logprobs"][-6:] == plain["choices"][0]["logprobs"]["token_logprobs"]


def test_a_stream_carries_the_same_text_and_logprobs(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    whole = post(server, "/v1/completions", body)["choices"][0]
    events = httpx.post(f"{server}/v1/completions", json={**body, "stream": True}, timeout=120).text.split("\n\n")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    parts = [ch["choices"][0] for ch in chunks]
    assert "".join(p["text"] for p in parts) == whole["text"]
    joined = {key: [x for p in parts if p["logprobs"] for x in p["logprobs"][key]] for key in whole["logprobs"]}
    assert joined == whole["logprobs"]
    assert parts[0]["text"] == PROMPT and parts[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_adapter_scores_with_its_own_model_in_one_batch(server, models, name):
    prompts = {"base": PROMPT, name: "the season of Darkness, it was the spring of hope"}

    def score(model):
        body = {"model": model, "prompt": prompts[model], "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0}
        return post(server, "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]

    with ThreadPoolExecutor(4) as pool:  # both models at once, twice each
        results = list(pool.map(score, list(prompts) * 2))
    for model, got in zip(list(prompts) * 2, results, strict=True):
        ids = models[model].tokenizer.encode_document(prompts[model])
        assert len(got) == len(ids) + 1 and got[0] is None
        assert max(abs(a - b) for a, b in zip(got[1:-1], reference(models[model], ids), strict=True)) <= DECODED


def test_chat_logprobs_in_openais_chat_format(server, models):
    lm = models["b"]  # the Adapter v2 model's llama2-chat prompt style
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say it was the best."}]
    c = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    done = c.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                     top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert "".join(t.token for t in content) == done.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy
    assert all(bytes(t.bytes) == t.token.encode() for t in content)
    prompt, _ = encode_dialog(lm.tokenizer, "llama2-chat", [Message(m["role"], m["content"]) for m in messages],
                              open_turn=True)
    new = lm.generate([prompt], [GenerationSettings(max_new_tokens=8)])[0]
    want = reference(lm, prompt + new)[len(prompt) - 1:]
    assert len(content) == len(new)
    assert max(abs(t.logprob - w) for t, w in zip(content, want, strict=True)) <= DECODED
    plain = c.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == done.choices[0].message.content
    chunks = list(c.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_tokenize_and_detokenize_as_vllm_and_lm_evals_remote_tokenizer(server, models):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    tok = models["base"].tokenizer
    got = post(server, "/tokenize", {"prompt": PROMPT})
    assert got == {"count": len(tok.encode_document(PROMPT)), "max_model_len": CONTEXT,
                   "tokens": tok.encode_document(PROMPT), "token_strs": None}
    assert post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})["tokens"] == tok.encode(PROMPT)
    chat = post(server, "/tokenize", {"model": "b", "messages": [{"role": "user", "content": "Hi"}]})["tokens"]
    assert chat == encode_dialog(tok, "llama2-chat", [Message("user", "Hi")], open_turn=True)[0]
    assert post(server, "/detokenize", {"tokens": tok.encode(PROMPT)}) == {"prompt": PROMPT}
    info = httpx.get(f"{server}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["model_max_length"] == CONTEXT
    assert check_remote_tokenizer_support(f"{server}/v1/completions")
    remote = RemoteTokenizer(f"{server}/v1/completions")
    assert (remote.eos_token_id, remote.bos_token_id) == (tok.eos_id, tok.bos_id)
    assert remote.encode(PROMPT) == tok.encode(PROMPT) and remote.decode(tok.encode(PROMPT)) == PROMPT


def test_a_stop_id_is_listed_last_and_scoring_rows_take_one_forward_pass_each(folders, monkeypatch):
    """In-process: the greedy next token made a stop id (as an end-of-sequence token would be) still gets its
    entry, so a harness asking for one token after a prompt finds it; and rows that only score cost generating rows
    one forward pass each (their prefill), never a decoding step."""
    from starlette.testclient import TestClient

    lm = LanguageModel.from_checkpoint(str(folders / "base"), device="cpu")
    ids = lm.tokenizer.encode_document(PROMPT)
    greedy = lm.generate([ids], [GenerationSettings(max_new_tokens=1)], stop_ids=set())[0][0]
    monkeypatch.setattr(lm, "default_stops", lambda: {greedy})
    passes = []
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: passes.append(a[0].shape) or forward(*a, **k))
    service = Service(Engine(lm, 4), [ServedModel("base", 0, "llama2-chat")])
    with TestClient(build_app(service)) as client:
        answer = client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1,
                                                      "temperature": 0}).json()["choices"][0]
        assert answer["finish_reason"] == "stop" and answer["text"] == lm.tokenizer.decode(ids)
        lp = answer["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and "".join(lp["tokens"][:-1]) == answer["text"]  # not in the text
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
        assert lp["text_offset"][-1] == len(answer["text"])
        assert len(passes) == 1  # the prefill; the stop id was chosen from its logits

        passes.clear()
        with ThreadPoolExecutor(4) as pool:
            generating = pool.submit(client.post, "/v1/completions",
                                     json={"prompt": "it was", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            scoring = [pool.submit(client.post, "/v1/completions",
                                   json={"prompt": PROMPT[:20 + i], "echo": True, "logprobs": 1,
                                         "max_tokens": i % 2, "temperature": 0, "ignore_eos": True})
                       for i in range(6)]
            answers = [f.result().json() for f in scoring]
            text = generating.result().json()["choices"][0]["text"]
        assert all(len(a["choices"][0]["logprobs"]["tokens"]) >= 2 for a in answers)
        prefills = [shape for shape in passes if shape[1] > 1]
        assert len(prefills) == 7  # the generating row's and one for each scoring row, nothing else
        assert len(passes) - len(prefills) == 11  # the generating row's decoding steps (its 12th token is not fed)
    alone = lm.generate([lm.tokenizer.encode_document("it was")], [GenerationSettings(max_new_tokens=12)],
                        stop_ids=set())[0]
    assert text == lm.tokenizer.decode(lm.tokenizer.encode_document("it was") + alone)[len("it was"):]
    assert math.isfinite(sum(x for x in lp["token_logprobs"][1:]))
