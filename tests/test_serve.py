"""The OpenAI-compatible server, run as users run it (tools/serve.py in a subprocess on a free port) and spoken to
with the official openai client and raw HTTP: completions and chat, streamed and not, equal to tools/generate.py
and to each adapter's own model; concurrent requests batched; bad requests answered with OpenAI's error body."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import inprocess
from helpers.bad_cases.generate_args import ROOM, SAME_AS_SERVER
from helpers.runner import ROOT
from helpers.serving import running_server, served_checkpoints

from neox_llama.generation.language_model import LanguageModel
from neox_llama.generation.settings import GenerationSettings
from neox_llama.serving.app import ServedModel, Service, build_app
from neox_llama.serving.engine import Engine
from neox_llama.serving.text import TextStream
from neox_llama.tokenizers import build_tokenizer
from neox_llama.tokenizers.prompts import Message, encode_dialog

PROMPT = "it was the age of"
MAX_REQUEST_BYTES = 65536
"""The server's --max-request-bytes (its default, 1 MiB, is tested in-process)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return served_checkpoints(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(folders):
    with running_server(folders, "--max-batch-size", "8", "--max-request-bytes", str(MAX_REQUEST_BYTES)) as served:
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def alone(folder, ids: list[int], n: int) -> list[int]:
    """Greedy ids from a model of its own (a LoRA checkpoint merged into its base, an Adapter v2 one attached)."""
    lm = LanguageModel.from_checkpoint(str(folder), device="cpu")
    return lm.generate([ids], [GenerationSettings(max_new_tokens=n)])[0]


def test_models_lists_the_base_and_each_adapter(server):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["base", "a", "b"]


def test_completion_equals_generate_py_streamed_or_not(server, folders):
    url, _ = server
    c = client(url)
    done = c.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0)
    cli = inprocess.tool("generate.py", "--checkpoint", str(folders / "base"), "--prompt", PROMPT, "--max-new-tokens",
                         "20", cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert PROMPT + done.choices[0].text + "\n" == cli.stdout
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 20
    tok = build_tokenizer("SPMTokenizer", folders / "base" / "tok.model")
    assert done.usage.prompt_tokens == len(tok.encode_document(PROMPT))
    chunks = list(c.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    raw = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True}).text
    assert raw.rstrip("\n").endswith("data: [DONE]")  # no "model": the base answers


def test_chat_in_the_adapters_prompt_style_equals_its_merged_model(server, folders):
    url, _ = server
    c = client(url)
    tok = build_tokenizer("SPMTokenizer", folders / "base" / "tok.model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say it was the best."}]
    ids, _ = encode_dialog(tok, "llama2-chat", [Message(m["role"], m["content"]) for m in messages], open_turn=True)
    expected = tok.decode(alone(folders / "b", ids, 16))
    done = c.chat.completions.create(model="b", messages=messages, max_tokens=16, temperature=0)
    assert done.choices[0].message.content == expected and done.choices[0].message.role == "assistant"
    assert done.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="b", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_base_and_two_adapters_in_one_batch_each_equal_their_own_model(server, folders):
    url, _ = server
    tok = build_tokenizer("SPMTokenizer", folders / "base" / "tok.model")
    prompts = {"base": "it was the", "a": "the age of wisdom", "b": "Document 2"}
    before = httpx.get(f"{url}/health").json()["peak_running"]

    def ask(name):
        return client(url).completions.create(model=name, prompt=prompts[name], max_tokens=40, temperature=0)

    with ThreadPoolExecutor(6) as pool:  # each model twice, all at once
        results = list(pool.map(ask, list(prompts) * 2))
    answers = dict(zip(prompts, results[:3], strict=True))
    assert [r.choices[0].text for r in results[3:]] == [r.choices[0].text for r in results[:3]]
    for name, folder in (("base", "base"), ("a", "a"), ("b", "b")):
        want = tok.decode(alone(folders / folder, tok.encode_document(prompts[name]), 40))
        assert answers[name].choices[0].text == want, name
    assert httpx.get(f"{url}/health").json()["peak_running"] >= max(before, 2)  # they were decoded together


def test_concurrent_requests_all_succeed(server, capsys):
    url, _ = server
    c = client(url)
    start = time.perf_counter()
    c.completions.create(model="a", prompt=PROMPT, max_tokens=32, temperature=0.7, seed=5)
    one = time.perf_counter() - start

    def ask(i):
        return c.completions.create(model="ab"[i % 2], prompt=f"{PROMPT} {i}", max_tokens=32, temperature=0.7, seed=i)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    total = time.perf_counter() - start
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    same = c.completions.create(model="a", prompt=PROMPT, max_tokens=32, temperature=0.7, seed=5)
    first = c.completions.create(model="a", prompt=PROMPT, max_tokens=32, temperature=0.7, seed=5)
    assert same.choices[0].text == first.choices[0].text  # a seed fixes sampling
    two = c.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [ch.index for ch in two.choices] == [0, 1, 2] and two.usage.completion_tokens <= 24
    with capsys.disabled():
        print(f"\n8 concurrent requests: {total:.2f} s; one request alone: {one:.2f} s")


def test_stop_strings_end_the_text_before_them(server):
    url, _ = server
    c = client(url)
    full = c.completions.create(model="base", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[10:13]
    cut = c.completions.create(model="base", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = c.completions.create(model="base", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in chunks) == cut.choices[0].text


BAD = [
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 9}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 300, "max_tokens": 0, "echo": True}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("/tokenize", {"add_special_tokens": False}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": "y" * 300}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ["x"] * 9, "n": 8}, 400, "n"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "zz", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, status, param):
    url, _ = server
    answer = httpx.post(f"{url}{path}", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health").status_code == 200


CHAT = '"messages": [{"role": "user", "content": "x"}]'
EXACT = [  # (path, raw JSON body, param, the whole message): the rules tools/generate.py shares, strict integers
    *[("/v1/completions", f'{{"prompt": "x", "{field}": {value}}}', field, message.format(field))
      for field, _flag, value, _cli, message in SAME_AS_SERVER.values()],
    ("/v1/completions", '{"prompt": "x", "temperature": Infinity}', "temperature",
     "temperature is inf, not a finite number; it must be between 0 and 2 (0: greedy)"),
    ("/v1/completions", '{"prompt": "x", "temperature": true}', "temperature",
     "temperature: Input should be a valid number, got true"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": true}', "max_tokens",
     "max_tokens: Input should be a valid integer, got true"),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 4.0}', "max_tokens",
     "max_tokens: Input should be a valid integer, got 4.0"),
    ("/v1/completions", '{"prompt": "x", "n": true}', "n", "n: Input should be a valid integer, got true"),
    ("/v1/completions", '{"prompt": "x", "top_k": true}', "top_k", "top_k: Input should be a valid integer, got true"),
    ("/v1/completions", '{"prompt": "x", "seed": 1.5}', "seed", "seed: Input should be a valid integer, got 1.5"),
    ("/v1/completions", '{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop",
     "stop may hold at most 4 strings, got 5"),
    ("/v1/chat/completions", f'{{{CHAT}, "max_completion_tokens": true}}', "max_completion_tokens",
     "max_completion_tokens: Input should be a valid integer, got true"),
    ("/v1/chat/completions", f'{{{CHAT}, "max_completion_tokens": 0}}', "max_completion_tokens",
     "max_completion_tokens must be at least 1, got 0"),
    ("/v1/chat/completions", f'{{{CHAT}, "temperature": NaN}}', "temperature",
     "temperature is NaN, not a number; it must be between 0 and 2 (0: greedy)"),
]


@pytest.mark.parametrize(("path", "body", "param", "message"), EXACT)
def test_bad_settings_get_the_messages_generate_py_gives(server, path, body, param, message):
    url, _ = server
    answer = httpx.post(f"{url}{path}", content=body.encode(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] | {"code": None} == {"message": message, "type": "invalid_request_error",
                                                       "param": param, "code": None}


def test_max_tokens_beyond_the_context_names_both_lengths(server, folders):
    url, _ = server
    n = len(build_tokenizer("SPMTokenizer", folders / "base" / "tok.model").encode_document(PROMPT))
    answer = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 100000})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {"message": ROOM.format(n, "max_tokens", 256, 256 - n), "param": "max_tokens",
                                      "type": "invalid_request_error", "code": "context_length_exceeded"}


def test_a_body_over_max_request_bytes_is_a_413(server):
    url, _ = server
    body = json.dumps({"prompt": "word " * 20000}).encode()
    answer = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == {
        "message": f"the request body is {len(body)} bytes; this server accepts at most {MAX_REQUEST_BYTES} "
                   "(tools/serve.py --max-request-bytes)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_body_over_the_limit_is_refused_before_it_is_parsed_or_tokenized(folders, monkeypatch):
    from starlette.testclient import TestClient

    lm = LanguageModel.from_checkpoint(str(folders / "base"), device="cpu")
    service = Service(Engine(lm, 1), [ServedModel("base", 0, "llama2-chat")])  # no lifespan: the engine never runs
    calls = []
    encode = service.tokenizer.encode_document
    monkeypatch.setattr(service.tokenizer, "encode_document", lambda text: calls.append(len(text)) or encode(text))
    small = TestClient(build_app(service, max_request_bytes=4096))
    big = json.dumps({"prompt": "word " * 2000}).encode()
    answer = small.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and f"the request body is {len(big)} bytes" in answer.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives, refused once past the limit
        yield from (big[i:i + 1000] for i in range(0, len(big), 1000))

    answer = small.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["message"].startswith("the request body is more than 4096 bytes")
    assert calls == []  # neither was tokenized
    answer = small.post("/v1/completions", json={"prompt": "word " * 400})  # under the limit: tokenized, then too long
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
    assert calls == [2000]
    default = TestClient(build_app(service))  # 16 bytes per position of a 256-token context is below 1 MiB
    answer = default.post("/v1/completions", content=b" " * (2**20 + 1), headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "at most 1048576 " in answer.json()["error"]["message"]
    assert calls == [2000]


def test_text_that_is_not_unicode_is_repaired_by_the_server_and_generate_py(server, folders):
    """The one text policy (docs/tokenizers.md): a lone surrogate in a request (valid JSON) and a byte that is not
    UTF-8 on generate.py's command line or stdin are encoded as U+FFFD, said once in the log; never a 500 (it was:
    sentencepiece's pybind11 error) nor a traceback."""
    url, _ = server

    def post(path: str, body: str) -> dict:
        answer = httpx.post(f"{url}{path}", content=body.encode(), headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def complete(prompt: str) -> dict:
        return post("/v1/completions", f'{{"prompt": "{prompt}", "max_tokens": 4, "temperature": 0}}')

    bad, repaired = complete("it was \\ud800 the age"), complete("it was \\ufffd the age")
    assert bad["choices"][0]["text"] == repaired["choices"][0]["text"] and bad["usage"] == repaired["usage"]
    post("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2}')
    assert (folders / "serve.log").read_text().count("text to tokenize holds a lone surrogate \\ud800 (not valid "
                                                     "Unicode): each such character is encoded as U+FFFD") == 1

    args = ["--checkpoint", str(folders / "base"), "--max-new-tokens", "4"]
    latin1 = b"it was the \xe9ge".decode("utf-8", "surrogateescape")  # the argument as Python reads it from argv
    cli = inprocess.tool("generate.py", *args, "--prompt", latin1, cwd=ROOT)
    same = inprocess.tool("generate.py", *args, "--prompt", "it was the \ufffdge", cwd=ROOT)
    assert cli.returncode == 0 and cli.stdout == same.stdout and cli.stdout.startswith("it was the \ufffdge")
    chat = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), *args, "--chat"],  # a real stdin
                          input=b"caf\xe9 noir\n", capture_output=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    out, err = chat.stdout.decode(), chat.stderr.decode()
    assert chat.returncode == 0 and ">>> caf\ufffd noir" in out and "Traceback" not in err, err
    assert "text to tokenize holds the byte 0xe9 (not valid UTF-8): each such character is encoded as U+FFFD" in err


def test_not_json_and_unknown_routes(server):
    url, _ = server
    answer = httpx.post(f"{url}/v1/completions", content=b"{bad", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x")


def test_a_client_that_disconnects_frees_its_slot(server):
    url, _ = server
    before = httpx.get(f"{url}/health").json()["cancelled"]
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 240, "stream": True,
                                                             "temperature": 0}) as response:
        next(response.iter_lines())  # the first chunk, then hang up
    for _ in range(100):
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["cancelled"] > before:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["cancelled"] == before + 1


def test_a_client_that_disconnects_before_a_whole_answer_frees_its_slots(server):
    url, _ = server
    before = httpx.get(f"{url}/health").json()
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 240, "n": 16, "temperature": 1.0, "seed": 1}).encode()
    with socket.create_connection((host, int(port))) as raw:  # a non-streaming request, abandoned
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.3)
    for _ in range(100):
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["cancelled"] > before["cancelled"]
    assert health["finished"] - before["finished"] < 16  # not all 16 choices were decoded to the end


def test_sigterm_stops_the_server_cleanly(server, folders):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (folders / "serve.log").read_text()
    assert "Traceback" not in log and "stopped" in log


def test_text_stream_holds_back_partial_stop_strings_and_characters():
    class Chars:  # a tokenizer whose ids are characters (\ufffd: half of a multi-byte character)
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    s = TextStream(Chars(), ["END"])
    sent = [s.push(ord(ch)) for ch in "abE"]
    assert sent == ["a", "b", ""]  # "E" could start "END"
    assert s.push(ord("x")) == "Ex"
    assert [s.push(ord(ch)) for ch in "ENDzz"] == ["", "", "", "", ""] and s.stopped
    assert s.text == "abEx" and s.finish() == ""
    s = TextStream(Chars(), [])
    assert s.push(ord("a")) == "a" and s.push(0xFFFD) == "" and s.push(ord("é")) == "\ufffdé"
