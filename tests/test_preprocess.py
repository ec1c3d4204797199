"""tools/preprocess_data.py: outputs, worker equivalence, inputs of every kind, malformed lines, interruption."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from helpers import inprocess
from helpers.data import make_docs
from helpers.runner import ROOT

from neox_llama.data import preprocess as pre
from neox_llama.data.indexed import IndexedDataset
from neox_llama.tokenizers.train import train_sentencepiece


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(make_docs(400)))
    return train_sentencepiece([corpus], folder / "tiny", 300)


def run_cli(*args):
    """``python tools/preprocess_data.py ARGS --no-progress``, run in this process."""
    return inprocess.tool("preprocess_data.py", *args, "--no-progress")


def test_jsonl_to_dataset_holds_exactly_the_tokens(tmp_path, spm_model):
    docs = make_docs(50)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    proc = run_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model), "--append-eod")
    assert proc.returncode == 0, proc.stderr
    assert "50 documents" in proc.stderr and "0 malformed record(s) skipped" in proc.stderr
    ds = IndexedDataset(tmp_path / "out_text_document")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert ds.dtype == np.uint16 and len(ds) == 50
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == [1, *sp.encode(doc), 2]  # the start-token policy: BOS first, as Meta trains
    proc = run_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "neox"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model), "--append-eod",
                   "--no-prepend-bos")
    assert proc.returncode == 0, proc.stderr
    assert IndexedDataset(tmp_path / "neox_text_document")[0].tolist() == [*sp.encode(docs[0]), 2]  # GPT-NeoX's data


def test_two_workers_write_identical_files(tmp_path, spm_model):
    docs = make_docs(700, seed=3)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for workers in (1, 2):
        pre.preprocess([tmp_path / "in.jsonl"], str(tmp_path / f"w{workers}"), "SPMTokenizer", str(spm_model),
                       append_eod=True, workers=workers, progress=False)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1_text_document.{ext}").read_bytes() == (tmp_path / f"w2_text_document.{ext}").read_bytes()


def test_json_list_txt_gz_and_several_keys(tmp_path, spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    records = [{"instruction": "say hi", "output": "hi there"}, {"instruction": "count", "output": "one two"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"instruction": "more", "output": "text"}) + "\n")
    pre.preprocess([tmp_path / "a.json", tmp_path / "b.jsonl.gz"], str(tmp_path / "multi"), "SPMTokenizer",
                   str(spm_model), keys=("instruction", "output"), progress=False)
    for key in ("instruction", "output"):
        ds = IndexedDataset(tmp_path / f"multi_{key}_document")
        expected = [r[key] for r in records] + [{"instruction": "more", "output": "text"}[key]]
        assert [ds[i].tolist() for i in range(3)] == [[1, *sp.encode(t)] for t in expected]
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n\n\n")
    summary = pre.preprocess([tmp_path / "c.txt"], str(tmp_path / "para"), "SPMTokenizer", str(spm_model),
                             txt_split="paragraph", progress=False)
    ds = IndexedDataset(tmp_path / "para_text_document")
    assert summary.documents == 2 and ds[1].tolist() == [1, *sp.encode("second paragraph")]
    pre.preprocess([tmp_path / "c.txt"], str(tmp_path / "whole"), "SPMTokenizer", str(spm_model), progress=False)
    assert len(IndexedDataset(tmp_path / "whole_text_document")) == 1


def test_malformed_lines_are_reported_with_their_line_and_skipped(tmp_path, spm_model):
    lines = [json.dumps({"text": "good one"}), "{not json", json.dumps({"body": "wrong key"}), "", json.dumps([1]),
             json.dumps({"text": "good two"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model))
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'in.jsonl'}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)" in proc.stderr
    assert f"{tmp_path / 'in.jsonl'}:3: no string value for key(s) text" in proc.stderr
    assert f"{tmp_path / 'in.jsonl'}:5: expected a JSON object" in proc.stderr
    assert "2 documents" in proc.stderr and "3 malformed record(s) skipped" in proc.stderr
    assert len(IndexedDataset(tmp_path / "out_text_document")) == 2

    proc = run_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "strict"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model), "--strict")
    assert proc.returncode == 2 and "in.jsonl:2: not valid JSON (Expecting" in proc.stderr and "(--strict)" in proc.stderr
    assert not list(tmp_path.glob("strict*"))


def test_interrupted_run_leaves_no_final_named_file(tmp_path, spm_model, monkeypatch):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(600)))
    calls = {"n": 0}
    real = pre._encode_batch

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(pre, "_encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess([tmp_path / "in.jsonl"], str(tmp_path / "out"), "SPMTokenizer", str(spm_model), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "/no/such.jsonl"], "/no/such.jsonl: input file not found"),
    (["--input", "{tmp}/x.csv"], "unsupported input type; use .jsonl, .json or .txt"),
    (["--vocab-file", "/no/tok.model"], "/no/tok.model: tokenizer file not found"),
])
def test_bad_inputs_fail_clearly(tmp_path, spm_model, args, message):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    base = {"--input": str(tmp_path / "ok.jsonl"), "--vocab-file": str(spm_model)}
    base.update({args[0]: args[1].format(tmp=tmp_path)})
    proc = run_cli(*[x for kv in base.items() for x in kv], "--output-prefix", str(tmp_path / "o"),
                   "--tokenizer-type", "SPMTokenizer")
    assert proc.returncode == 2 and message in proc.stderr
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.parametrize(("lines", "why"), [
    ([json.dumps({"body": f"doc {i}"}) for i in range(40)], "40 malformed record(s), 0 empty"),
    (["{not json"] * 3, "3 malformed record(s)"),
    ([json.dumps({"text": "  "})] * 4, "0 malformed record(s), 4 empty"),
], ids=["key-absent-everywhere", "all-malformed", "all-empty"])
def test_nothing_usable_fails_with_a_summary_and_writes_nothing(tmp_path, spm_model, lines, why):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model))
    assert proc.returncode == 2 and "no usable document" in proc.stderr and why in proc.stderr, proc.stderr
    assert "check --jsonl-keys text (nothing was written)" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("skipping") <= 5  # a few examples, then a count: not one warning per line
    assert not list(tmp_path.glob("out*"))


def test_a_missing_input_fails_before_any_progress_bar(tmp_path, spm_model):
    # a real process: the tool's script path itself
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "no.jsonl"),
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "SPMTokenizer",
                           "--vocab-file", str(spm_model)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"preprocess_data.py: error: {tmp_path / 'no.jsonl'}: input file not found"


def test_llama3_dataset_holds_tiktokens_ids(tmp_path, monkeypatch):
    """The Llama-3 path writes tiktoken's uint32 arrays (encode_to_numpy); a batch with a long run falls back to
    splitting it as Meta does."""
    from helpers.assets import asset

    from neox_llama.tokenizers import build_tokenizer

    vocab = asset("llama3-tokenizer")
    tok = build_tokenizer("Llama3Tokenizer", vocab)
    docs = ["<|eot_id|> is text here", "cut \ud800 emoji", *make_docs(20), "a" * 30_000 + " end"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setattr(pre, "BATCH_DOCS", 8)  # the last batch holds the long run, the others take the numpy path
    summary = pre.preprocess([tmp_path / "in.jsonl"], str(tmp_path / "out"), "Llama3Tokenizer", str(vocab),
                             append_eod=True, progress=False)
    assert summary.skipped == [f"{tmp_path / 'in.jsonl'}:2: the value of 'text' holds a lone surrogate \\ud800 at "
                               "character 5, which no tokenizer can encode"]  # the text policy of every tokenizer
    docs.remove("cut \ud800 emoji")
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert ds.dtype == np.int32 and len(ds) == len(docs)  # (Megatron's dtype codes have no uint32)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == [tok.bos_id, *tok.encode(doc), tok.eod_id], i


def test_text_no_tokenizer_can_encode_is_a_skipped_record_and_encoding_reads_latin1(tmp_path, spm_model):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "caf\xe9"}\n{"text": "a \\ud800 b"}\n'
                                           b'{"text": "good two"}\n')
    proc = run_cli("--input", str(tmp_path / "mixed.jsonl"), "--output-prefix", str(tmp_path / "out"),
                   "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model))
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'mixed.jsonl'}:2: not valid utf-8 text (byte 0xe9 at column 14); a corpus in another " \
           "encoding needs --encoding, e.g. --encoding latin-1" in proc.stderr
    assert f"{tmp_path / 'mixed.jsonl'}:3: the value of 'text' holds a lone surrogate \\ud800 at character 3" in proc.stderr
    assert "2 documents" in proc.stderr and "2 malformed record(s) skipped" in proc.stderr
    assert [d.tolist() for d in IndexedDataset(tmp_path / "out_text_document")] == \
        [[1, *sp.encode("good one")], [1, *sp.encode("good two")]]

    text = "café au lait\n\nnaïve crème"
    (tmp_path / "latin1.jsonl").write_bytes((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("latin-1"))
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    proc = run_cli("--input", f"{tmp_path / 'latin1.jsonl'},{tmp_path / 'latin1.txt'}", "--output-prefix",
                   str(tmp_path / "l1"), "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model),
                   "--encoding", "latin-1")
    assert proc.returncode == 0 and "0 malformed record(s) skipped" in proc.stderr, proc.stderr
    assert [d.tolist() for d in IndexedDataset(tmp_path / "l1_text_document")] == [[1, *sp.encode(text)]] * 2

    (tmp_path / "para.txt").write_bytes("plain first\n\n\nnaïve crème".encode("latin-1"))
    summary = pre.preprocess([tmp_path / "para.txt"], str(tmp_path / "para"), "SPMTokenizer", str(spm_model),
                             txt_split="paragraph", progress=False)  # read as UTF-8: the second paragraph is skipped
    assert summary.documents == 1 and summary.skipped == [
        f"{tmp_path / 'para.txt'}:paragraph 2: not valid utf-8 text (byte 0xef at line 4 column 3); a corpus in "
        "another encoding needs --encoding, e.g. --encoding latin-1"]


def test_a_damaged_input_stops_preprocessing_with_how_far_it_got(tmp_path, spm_model):
    """A truncated stream is never a shorter corpus: exit 2 naming the lines read (the issue's .zst cut in half
    exited 0 with 617 of 2,000 documents), nothing written, no folder left; a whole multi-frame .zst reads fully."""
    import re

    import zstandard

    data = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(2000, seed=5)).encode()
    whole = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "half.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    for workers in ("1", "2"):
        proc = run_cli("--input", str(tmp_path / "half.jsonl.zst"), "--output-prefix", str(tmp_path / "new/sub/o"),
                       "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model), "--workers", workers)
        lines = re.search(r"after ([\d,]+) line\(s\) were read; stopped, no output was written", proc.stderr)
        assert proc.returncode == 2 and lines and 0 < int(lines[1].replace(",", "")) < 2000, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "new").exists()
    lines = data.splitlines(keepends=True)
    (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(b"".join(lines[a:b]))
                                                         for a, b in ((0, 700), (700, 1500), (1500, 2000))))
    summary = pre.preprocess([tmp_path / "frames.jsonl.zst"], str(tmp_path / "all"), "SPMTokenizer", str(spm_model),
                             progress=False)
    assert summary.documents == 2000 and not summary.skipped


def _same_files(prefix_a, prefix_b, keys=("text",)):
    for key in keys:
        for ext in ("bin", "idx"):
            a, b = f"{prefix_a}_{key}_document.{ext}", f"{prefix_b}_{key}_document.{ext}"
            assert open(a, "rb").read() == open(b, "rb").read(), (a, b)


def test_parquet_and_save_to_disk_give_the_bytes_of_the_same_records_as_jsonl(tmp_path, spm_model):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": d, "title": f"title {i}", "n": i} for i, d in enumerate(make_docs(300, seed=4))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet", row_group_size=70)  # 5 row groups
    assert pq.ParquetFile(tmp_path / "in.parquet").num_row_groups == 5
    whole = datasets.Dataset.from_list(records)
    whole.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": whole.select(range(7)), "test": whole}).save_to_disk(str(tmp_path / "dict"))
    common = ["--tokenizer-type", "SPMTokenizer", "--vocab-file", str(spm_model), "--append-eod",
              "--jsonl-keys", "text", "title"]
    for name, source, extra in [("jsonl", "in.jsonl", []), ("parquet", "in.parquet", ["--workers", "2"]),
                                ("saved", "saved", []), ("test", "dict", ["--split", "test"]), ("train", "dict", [])]:
        proc = run_cli("--input", str(tmp_path / source), "--output-prefix", str(tmp_path / name), *common, *extra)
        assert proc.returncode == 0, proc.stderr
    for name in ("parquet", "saved", "test"):
        _same_files(tmp_path / "jsonl", tmp_path / name, keys=("text", "title"))
    assert len(IndexedDataset(tmp_path / "train_text_document")) == 7  # the default split is train
    proc = run_cli("--input", str(tmp_path / "dict"), "--output-prefix", str(tmp_path / "o"), *common, "--split", "dev")
    assert proc.returncode == 2 and f"{tmp_path / 'dict'}: no split 'dev' (--split); its splits are: train, test" \
        in proc.stderr
    assert not list(tmp_path.glob("o_*"))


def test_a_parquet_value_that_is_not_utf8_or_a_lone_surrogate_is_a_skipped_record(tmp_path, spm_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [b"first ok", b"a \xed\xa0\x80 b", b"caf\xe9", None, b"last ok"]  # \xed\xa0\x80: U+D800 as UTF-8
    column = pa.array(values, pa.binary()).view(pa.string())  # as another writer may store it: not validated
    pq.write_table(pa.table({"text": column}), tmp_path / "in.parquet")
    path = tmp_path / "in.parquet"
    proc = run_cli("--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "SPMTokenizer",
                   "--vocab-file", str(spm_model))
    assert proc.returncode == 0, proc.stderr
    assert (f"{path}:row 1: the value of 'text' holds a lone surrogate \\ud800 at character 3, which no tokenizer "
            "can encode") in proc.stderr
    assert f"{path}:row 2: the value of 'text' is not valid utf-8 text (byte 0xe9 at column 4)" in proc.stderr
    assert f"{path}:row 3: no string value for key(s) text" in proc.stderr
    assert "2 documents" in proc.stderr and "3 malformed record(s) skipped" in proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert IndexedDataset(tmp_path / "out_text_document")[1].tolist() == [1, *sp.encode("last ok")]
