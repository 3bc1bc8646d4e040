import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare_data  # noqa: E402
from prepare_data import get_tokenizer, load_meta, main, open_split  # noqa: E402

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 😀",
    "short",
    "A somewhat longer document.\n\nIt has two paragraphs, some numbers 12345 and punctuation!?",
    "x" * 70,
    "Last one: tabs\tand  double  spaces.",
]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "source": "test"}) + "\n" for d in docs), encoding="utf-8")
    return path


def expected_rows(tok, docs, row_len):
    """SPEC 1 framing, computed independently: docs + EOS, concatenated, (L-2)-token pieces as [BOS] piece [EOS]."""
    stream = [t for d in docs if d.strip() for t in tok.encode(d) + [tok.eos_token_id]]
    piece = row_len - 2
    rows = [[tok.bos_token_id] + stream[i:i + piece] + [tok.eos_token_id]
            for i in range(0, len(stream) - piece + 1, piece)]
    return np.array(rows, dtype=np.uint16).reshape(-1, row_len), len(stream)


def run(*args):
    """main() with ("--key", value, "--flag", ...) written as the command line takes them: --key=value, --flag."""
    argv, args = [], [str(a) for a in args]
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        argv.append(f"{a}={args[i + 1]}" if has_value else a)
    return main([*argv, "--quiet"])


def files(d):
    return {n: (Path(d) / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")}


# --- tokenizers -------------------------------------------------------------------------------

def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert get_tokenizer("byte") is tok  # cached
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (258, 256, 256, 257)
    for d in DOCS:
        assert tok.decode(tok.encode(d)) == d
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode(torch.tensor([256, 104, 195, 169, 257])) == "<|endoftext|>hé[MASK]"
    assert tok.batch_decode(np.array([[104, 105], [257, 105]])) == ["hi", "[MASK]i"]
    assert tok("hi")["input_ids"] == [104, 105]
    assert tok.encode_batch(["a", "b"]) == [[97], [98]]
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is rendered, not raised


def test_gpt2_tokenizer():
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (50258, 50256, 50256, 50257)
    assert tok.mask_token_id == tok.vocab_size - 1
    # known GPT-2 ids (tiktoken.get_encoding would need network)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("The quick brown fox") == [464, 2068, 7586, 21831]
    assert 50256 not in tok.encode("<|endoftext|>")  # no special tokens from text
    for d in DOCS:
        assert tok.decode(tok.encode(d)) == d
    assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    assert tok(DOCS[0])["input_ids"] == tok.encode(DOCS[0])
    ids = torch.tensor([50256, 15496, 50257, 995, 50256])
    assert tok.decode(ids) == "<|endoftext|>Hello[MASK] world<|endoftext|>"
    assert tok.batch_decode(ids[None].numpy()) == [tok.decode(ids)]


# --- framing and outputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name,row_len,layout", [("byte", 16, "files"), ("gpt2", 8, "files"), ("byte", 16, "dirs"),
                                                  ("byte", 16, "gzip")])
def test_framing_split_by_file(tmp_path, name, row_len, layout):
    src = tmp_path / "corpus"
    src.mkdir()
    train_docs, val_docs = DOCS * 3 + ["   "], DOCS[::-1]
    if layout in ("files", "gzip"):
        write_jsonl(src / "train.jsonl", train_docs)
        write_jsonl(src / "val.jsonl", val_docs)
        if layout == "gzip":  # (the embedded corpus's form) read as it is
            for f in ("train.jsonl", "val.jsonl"):
                (src / (f + ".gz")).write_bytes(gzip.compress((src / f).read_bytes()))
                (src / f).unlink()
    else:  # train/ and validation/ subdirectories (once pooled: 99% of the val docs went into train)
        for sub, docs in (("train", train_docs), ("validation", val_docs)):
            (src / sub).mkdir()
            write_jsonl(src / sub / "part-0.jsonl", docs[:2])
            write_jsonl(src / sub / "part-1.jsonl", docs[2:])
    (src / "notes.txt").write_text("ignored: neither train* nor val*")
    out = tmp_path / "out"
    meta = run("--source", src, "--out_dir", out, "--tokenizer", name, "--row_len", row_len, "--num_proc", 1)
    tok = get_tokenizer(name)
    assert load_meta(out) == meta
    for split, docs in (("train", train_docs), ("val", val_docs)):
        want, n_tok = expected_rows(tok, docs, row_len)
        got = open_split(out, split)
        assert got.shape == want.shape and np.array_equal(got, want)
        assert (got[:, 0] == tok.bos_token_id).all() and (got[:, -1] == tok.eos_token_id).all()
        assert meta[f"n_{split}_rows"] == len(want)
        assert meta[f"n_{split}_tokens"] == len(want) * row_len
        assert meta[f"n_{split}_doc_tokens"] == n_tok
        assert meta[f"n_{split}_dropped_tokens"] == n_tok - len(want) * (row_len - 2)
        assert meta[f"n_{split}_docs"] == sum(1 for d in docs if d.strip())
    assert meta["n_train_empty_docs_skipped"] == 1 and meta["n_val_empty_docs_skipped"] == 0
    assert (meta["tokenizer"], meta["vocab_size"], meta["mask_id"], meta["row_len"]) == (name, tok.vocab_size, tok.mask_token_id, row_len)
    assert (meta["bos_id"], meta["eos_id"], meta["framing"], meta["dtype"]) == (tok.bos_token_id, tok.eos_token_id, "wrap", "uint16")
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temporaries left


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_deterministic_and_num_proc(tmp_path, monkeypatch, name):
    monkeypatch.setattr(prepare_data, "_CHUNK_DOCS", 3)  # many chunks and windows, so ordering is exercised
    src = write_jsonl(tmp_path / "docs.jsonl", [f"{i}: " + DOCS[i % len(DOCS)] * (1 + i % 4) for i in range(60)])
    outs = []
    for i, nproc in enumerate([1, 1, 2]):
        outs.append(tmp_path / f"out{i}")
        meta = run("--source", src, "--out_dir", outs[-1], "--tokenizer", name, "--row_len", 32,
                   "--num_proc", nproc, "--num_val_docs", 10)
    assert files(outs[0]) == files(outs[1]) == files(outs[2])
    # single file: the LAST --num_val_docs docs are val
    docs = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    tok = get_tokenizer(name)
    assert np.array_equal(open_split(outs[0], "val"), expected_rows(tok, docs[-10:], 32)[0])
    assert np.array_equal(open_split(outs[0], "train"), expected_rows(tok, docs[:-10], 32)[0])
    assert (meta["n_train_docs"], meta["n_val_docs"]) == (50, 10)


def test_embedded_corpus():
    """The default corpus ships with the repository: both splits read, and they share no document."""
    args = SimpleNamespace(source=str(ROOT / "corpus"), text_field="text", txt_docs="file",
                              skip_bad_lines=False, hf_config=None, hf_split="train", hf_val_split=None,
                              num_val_docs=None, val_fraction=0.01)
    train, val, desc, issues = prepare_data.load_source(args)
    assert "train.jsonl.gz" in desc and "val.jsonl.gz" in desc and issues == {"not_utf8": 0, "bad_lines": 0}
    assert len(train) > 100 and len(val) >= 10 and sum(map(len, train)) > 10_000_000 and sum(map(len, val)) > 300_000
    assert not set(train) & set(val)
    listed = (ROOT / "corpus" / "SOURCES.md").read_text().count("\n| train |"), \
        (ROOT / "corpus" / "SOURCES.md").read_text().count("\n| val |")
    assert listed == (len(train), len(val))  # SOURCES.md names every document


def test_txt_modes(tmp_path):
    text = "first doc line one\nline two\n\n\nsecond doc\n  \nthird doc\n"
    (tmp_path / "a.txt").write_text(text)
    tok = get_tokenizer("byte")
    for mode, docs in [("file", [text.strip("\n")]),
                       ("blankline", ["first doc line one\nline two", "second doc", "third doc"]),
                       ("lines", ["first doc line one", "line two", "second doc", "third doc"])]:
        d = tmp_path / "txt" / mode
        os.makedirs(d)
        (d / "train.txt").write_text(text)
        (d / "val.txt").write_text(text)
        out = tmp_path / ("out_" + mode)
        meta = run("--source", d, "--out_dir", out, "--tokenizer", "byte", "--row_len", 6, "--txt_docs", mode)
        assert meta["n_train_docs"] == meta["n_val_docs"] == len(docs), mode
        assert np.array_equal(open_split(out, "val"), expected_rows(tok, docs, 6)[0])


def test_bad_utf8_counted(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.txt").write_bytes(b"good text here\n\nbad \xff\xfe bytes here\n")
    (d / "val.txt").write_bytes(b"some validation text")
    meta = run("--source", d, "--out_dir", tmp_path / "o", "--tokenizer", "byte", "--row_len", 4, "--txt_docs", "blankline")
    assert meta["n_not_utf8_docs"] == 1 and meta["n_train_docs"] == 2


# --- errors ----------------------------------------------------------------------------------------

def test_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no such file"):
        run("--source", tmp_path / "missing.jsonl", "--out_dir", out)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        run("--source", tmp_path / "empty.jsonl", "--out_dir", out, "--tokenizer", "byte")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine document"}\n{not json}\n{"other": "x"}\n{"text": "also fine"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        run("--source", bad, "--out_dir", out, "--tokenizer", "byte")
    meta = run("--source", bad, "--out_dir", out, "--tokenizer", "byte", "--row_len", 4,
               "--num_val_docs", 1, "--skip_bad_lines")
    assert meta["n_bad_lines_skipped"] == 2 and meta["n_train_docs"] == meta["n_val_docs"] == 1
    # too little data for one row: clear error, nothing (not even temporaries) left behind
    small = write_jsonl(tmp_path / "small.jsonl", ["a long enough training document", "tiny"])
    with pytest.raises(ValueError, match="val split has 0 rows of 16 tokens.*or more val docs: --num_val_docs"):
        run("--source", small, "--out_dir", tmp_path / "o2", "--tokenizer", "byte", "--row_len", 16, "--num_val_docs", 1)
    assert not os.listdir(tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        load_meta(tmp_path / "o2")
    (tmp_path / "o2" / "meta.json").write_text('{"row_len": 16,')  # cut short
    with pytest.raises(ValueError, match="o2/meta.json is not valid JSON"):
        load_meta(tmp_path / "o2")
    # a file that is not .txt/.jsonl would be read as one document; a single .txt is one by default: say so
    (tmp_path / "docs.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    with pytest.raises(ValueError, match="reads .txt and .jsonl files"):
        run("--source", tmp_path / "docs.json", "--out_dir", tmp_path / "o3", "--tokenizer", "byte")
    (tmp_path / "input.txt").write_text("\n".join(DOCS * 20))
    with pytest.raises(ValueError, match="--txt_docs=lines"):
        run("--source", tmp_path / "input.txt", "--out_dir", tmp_path / "o3", "--tokenizer", "byte")


def test_one_document_and_an_out_dir_that_is_a_file(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", ["a single long document " * 50])
    with pytest.raises(ValueError, match="cannot split 1 val docs off 1 docs; a split needs at least 2 documents"):
        run("--source", one, "--out_dir", tmp_path / "o", "--tokenizer", "byte")  # (was: "set --num_val_docs")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        run("--source", write_jsonl(tmp_path / "d.jsonl", DOCS), "--out_dir", tmp_path / "file", "--tokenizer", "byte")


@pytest.mark.parametrize("sig, num_proc", [("SIGTERM", 1), ("SIGINT", 2)])
def test_a_stopped_run_leaves_no_temporaries_and_ends(tmp_path, sig, num_proc):
    import signal
    import time
    src = write_jsonl(tmp_path / "big.jsonl", [f"document {i}: " + " ".join(DOCS) * 8 for i in range(40000)])  # ~20 MB
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "prepare_data.py", f"--source={src}", f"--out_dir={out}", "--tokenizer=gpt2",
                          "--row_len=64", f"--num_proc={num_proc}", "--quiet"], cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # (a test run started in the background of a script inherits SIGINT ignored: Ctrl-C as a
                         # terminal sends it needs the default)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not (out / "train.bin.tmp").exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert p.poll() is None, "finished before it could be stopped: make the corpus bigger"
    os.killpg(p.pid, getattr(signal, sig))  # the whole group, as a terminal's Ctrl-C (workers included)
    _, err = p.communicate(timeout=60)  # (SIGINT with a pool of 2: hung in pool.terminate() about 1 run in 4)
    assert p.returncode != 0 and not os.listdir(out), (err[-2000:], os.listdir(out))


def test_refuse_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    args = ["--source", src, "--out_dir", out, "--tokenizer", "byte", "--row_len", 8, "--num_val_docs", 2]
    run(*args)
    before = files(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(*args[:-1], 3)
    assert files(out) == before
    meta = run(*args[:-1], 3, "--overwrite")
    assert meta["n_val_docs"] == 3 and files(out) != before
    # the configurator of every script: --flag=True works, an abbreviated or unknown key is an error, not a guess
    assert main([f"--source={src}", f"--out_dir={out}", "--tokenizer=byte", "--row_len=8", "--num_val_docs=2",
                 "--overwrite=True", "--quiet"])["n_val_docs"] == 2
    with pytest.raises(ValueError, match="unknown config key 'row'; did you mean row_len"):
        main([f"--source={src}", f"--out_dir={out}", "--row=8"])
    for bad in ("--tokenizer=bpe", "--row_len=2", "--num_val_docs=x"):
        with pytest.raises(ValueError, match=bad[2:].split("=")[0]):
            main([f"--source={src}", f"--out_dir={out}", "--overwrite", bad])
    before = files(out)
    # a truncated bin is caught by open_split
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="re-run prepare_data.py"):
        open_split(out, "val")


def test_hub_unreachable_message(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), f"--out_dir={tmp_path / 'o'}",
                        "--tokenizer=byte", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "openwebtext" in r.stderr and "local path" in r.stderr


def test_hf_path_with_fake_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    docs = [f"doc {i}: " + DOCS[i % len(DOCS)] for i in range(20)] + [""]
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": docs, "other": list(range(len(docs)))})
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match="cannot split 100000 val docs off 21"):  # MDLM default for openwebtext
        run("--out_dir", tmp_path / "o", "--tokenizer", "byte")
    monkeypatch.setattr(prepare_data, "_CHUNK_DOCS", 4)
    meta = run("--out_dir", tmp_path / "o", "--tokenizer", "byte", "--row_len", 16, "--num_val_docs", 5, "--num_proc", 2)
    assert calls[-1] == ("openwebtext", None, "train")
    tok = get_tokenizer("byte")
    assert np.array_equal(open_split(tmp_path / "o", "train"), expected_rows(tok, docs[:-5], 16)[0])
    assert np.array_equal(open_split(tmp_path / "o", "val"), expected_rows(tok, docs[-5:], 16)[0])
    assert (meta["n_val_docs"], meta["n_val_empty_docs_skipped"]) == (4, 1)
    assert "openwebtext" in meta["source"] and "last 5 docs" in meta["source"]


def test_split_of_names_in_a_source_directory():
    from prepare_data import split_of
    cases = {'train.jsonl': 'train', 'val.jsonl': 'val', os.path.join('validation', 'a.txt'): 'val',
             os.path.join('train', 'x', 'val.txt'): 'train', 'TRAIN-0.txt': 'train', 'valid.txt': 'val',
             os.path.join('training_logs', 'a.txt'): None, os.path.join('valentines', 'a.txt'): None,
             'values.txt': None, os.path.join('a', 'b.txt'): None}
    assert {p: split_of(p) for p in cases} == cases
