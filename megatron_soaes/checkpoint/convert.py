"""HF safetensors <-> megatron-core torch_dist conversion for Qwen2, streamed one layer at a time.

Peak memory is about one transformer layer plus the embedding, whatever the model size. Every
input is validated (names, shapes, architecture, parallel split) before anything is written, and
the output directory appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_soaes.checkpoint import qwen2_hf
from megatron_soaes.checkpoint.dcp_io import DcpReader, DcpWriter
from megatron_soaes.checkpoint.manifest import CheckpointCorrupt, verify, write_manifest
from megatron_soaes.checkpoint.meta import atomic_directory, read_meta, write_meta
from megatron_soaes.checkpoint.safetensors_io import SafetensorsReader, SafetensorsStreamWriter, tensor_nbytes
from megatron_soaes.models.config import ModelConfigError, Qwen2Config
from megatron_soaes.utils.dtypes import DTYPES, HF_NAMES, dtype_name

# chat_template.jinja: where transformers 5 saves a tokenizer's chat template (no longer in tokenizer_config)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tokenizer.model", "qwen.tiktoken", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
IGNORED_HF = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file/tensor at fault."""


class HFCheckpoint:
    """Lazy view of an HF safetensors directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a directory")
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: invalid index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.dir}: no *.safetensors files")
        self.handles = {}
        self.where: dict[str, str] = {}
        for name in files:
            path = self.dir / name
            try:
                h = SafetensorsReader(path)
                keys = h.keys()
            except (ValueError, OSError) as e:
                raise ConversionError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
            self.handles[name] = h
            for k in keys:
                self.where[k] = name

    def shape(self, name: str) -> tuple:
        return tuple(self.handles[self.where[name]].shape(name))

    def get(self, name: str) -> torch.Tensor:
        path = self.dir / self.where[name]
        try:
            return self.handles[self.where[name]].get(name)
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {name} ({e})") from None

    def fused_layers(self, cfg: Qwen2Config) -> set[int]:
        """MoE layers stored in transformers 5's fused expert layout (the rest: the hub's per-expert one)."""
        return {i for i in range(cfg.num_layers) if f"model.layers.{i}.mlp.experts.gate_up_proj" in self.where}

    def validate(self, cfg: Qwen2Config) -> None:
        expected = qwen2_hf.hf_tensor_shapes(cfg, self.fused_layers(cfg))
        present = {k for k in self.where if not k.endswith(IGNORED_HF)}
        if cfg.tie_word_embeddings:
            present.discard("lm_head.weight")  # some tied exports keep the copy; it is ignored
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        if missing:
            raise ConversionError(f"{self.dir}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise ConversionError(f"{self.dir}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, shape in expected.items():
            got = self.shape(name)
            if got != tuple(shape):
                raise ConversionError(f"{self.dir / self.where[name]}: tensor {name} has shape {list(got)}, expected {list(shape)}")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def _workers(workers: int | None) -> int:
    return workers or min(8, os.cpu_count() or 1)


def _parallel(fn, n: int, desc: str, progress: bool, workers: int | None) -> None:
    """fn(0..n-1) on a thread pool (tensor copies, reads and writes release the GIL): at most `workers`
    layers are in memory at once; the first error is raised."""
    with ThreadPoolExecutor(_workers(workers)) as pool:
        for _ in tqdm(pool.map(fn, range(n)), total=n, desc=desc, disable=not progress, unit="layer"):
            pass


@contextmanager
def _fast_torch_save():
    """No zip CRC32 on the DCP chunks while converting: it costs about a third of torch.save's time, and
    the checkpoint's manifest carries a checksum of every file."""
    from torch.utils.serialization import config

    with config.patch({"save.compute_crc32": False}):
        yield


def hf_to_megatron(hf_dir, out_dir, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   dtype: str | None = None, overwrite: bool = False, progress: bool = True,
                   workers: int | None = None) -> Path:
    """Convert an HF Qwen2 directory into a torch_dist checkpoint chunked for TP/PP (layers in parallel
    threads, `workers` of them; default: the CPU count, at most 8)."""
    try:
        cfg = Qwen2Config.from_hf(hf_dir)
        cfg.check_parallel(tensor_parallel, pipeline_parallel)
    except ModelConfigError as e:
        raise ConversionError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES.get(dtype) if dtype else None
    hf = HFCheckpoint(hf_dir)
    hf.validate(cfg)
    src_dtype = hf.get("model.norm.weight").dtype
    out_dtype = torch_dtype or src_dtype
    tensors = qwen2_hf.megatron_tensors(cfg)
    n = cfg.num_layers
    get = lambda name: _cast(hf.get(name), torch_dtype)  # noqa: E731
    fused = hf.fused_layers(cfg)
    with atomic_directory(out_dir, overwrite) as tmp:
        w = DcpWriter(tmp)
        for t in tensors:
            w.declare(t.key, t.global_shape(n), out_dtype)
        by_key = {t.key: t for t in tensors}

        def layer(i: int) -> None:
            for key, tensor in qwen2_hf.hf_to_megatron_layer(cfg, get, i, fused=i in fused).items():
                t = by_key[key]
                if isinstance(tensor, qwen2_hf.PerExpert):  # expert by expert, at its global index
                    for e in range(tensor.n):
                        for off, chunk in qwen2_hf.tp_chunks(t, tensor.get(e), tensor_parallel):
                            w.write(key, (e,) + off, chunk.unsqueeze(0))
                    continue
                for off, chunk in qwen2_hf.tp_chunks(t, tensor, tensor_parallel):
                    w.write(key, *(((i,) + off, chunk.unsqueeze(0)) if t.stacked else (off, chunk)))

        with _fast_torch_save():
            for key, tensor in qwen2_hf.hf_to_megatron_global(cfg, get).items():
                for off, chunk in qwen2_hf.tp_chunks(by_key[key], tensor, tensor_parallel):
                    w.write(key, off, chunk)
            _parallel(layer, n, "HF -> Megatron layers", progress, workers)
        w.close()
        write_meta(tmp, cfg, dtype=dtype_name(out_dtype),
                   parallel={"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel},
                   source=str(hf_dir))
        _copy_tokenizer(Path(hf_dir), tmp / "tokenizer")
        write_manifest(tmp)  # last: a published checkpoint is checked against it before it is trusted
    return Path(out_dir)


def first_layers(hf_dir, out_dir, num_layers: int, overwrite: bool = True) -> Path:
    """An HF checkpoint of `hf_dir`'s first `num_layers` layers with its embeddings, final norm and
    tokenizer: a draft that starts from what the target already knows (then distilled from it)."""
    from safetensors.torch import save_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    if not 1 <= num_layers < cfg["num_hidden_layers"]:
        raise ConversionError(f"{hf_dir}: cannot keep {num_layers} of its {cfg['num_hidden_layers']} layers")
    hf = HFCheckpoint(hf_dir)
    keep = {}
    for name in hf.where:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= num_layers:
            continue
        keep[name] = hf.get(name).contiguous()
    with atomic_directory(out_dir, overwrite) as tmp:
        save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        total = cfg["num_hidden_layers"]
        # per-layer lists (transformers 5 writes `layer_types`) keep their first entries
        cut = {k: v[:num_layers] for k, v in cfg.items() if isinstance(v, list) and len(v) == total}
        (tmp / "config.json").write_text(json.dumps({**cfg, **cut, "num_hidden_layers": num_layers}, indent=2))
        _copy_tokenizer(Path(hf_dir), tmp)
    return Path(out_dir)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
    if files:
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst / f.name)


def _plan_shards(groups: list[list[str]], shapes: dict, dtype: torch.dtype, max_bytes: int):
    """Assign tensors (in production order) to shards of at most `max_bytes` (one tensor may exceed it)."""
    shards, cur, cur_bytes = [], [], 0
    for name in (n for g in groups for n in g):
        nbytes = tensor_nbytes(shapes[name], dtype)
        if cur and cur_bytes + nbytes > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


class _HFShardWriter:
    """Writes tensors into planned safetensors shards, each at its planned offset, in any order and from
    any thread; writes the index when there is more than one shard."""

    def __init__(self, directory: Path, shards: list[list[str]], shapes: dict, dtype: torch.dtype):
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.dir, self.shapes, self.dtype = directory, shapes, dtype
        self.where = {name: i for i, names in enumerate(shards) for name in names}
        self.writers = [SafetensorsStreamWriter(directory / f, [(k, tuple(shapes[k]), dtype) for k in names],
                                                metadata={"format": "pt"}) for f, names in zip(self.files, shards)]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writers[self.where[name]].add(name, tensor.to(self.dtype))

    def abort(self) -> None:
        for w in self.writers:
            w.abort()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if len(self.files) > 1:
            total = sum(tensor_nbytes(s, self.dtype) for s in self.shapes.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: self.files[i] for n, i in self.where.items()}}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def megatron_to_hf(mcore_dir, out_dir, dtype: str | None = None, overwrite: bool = False,
                   max_shard_bytes: int = 5 << 30, progress: bool = True, tokenizer_dir=None,
                   workers: int | None = None) -> Path:
    """Convert a torch_dist checkpoint written by megatron-soaes (conversion or training) into HF format."""
    mcore_dir = Path(mcore_dir)
    try:
        verify(mcore_dir)
    except CheckpointCorrupt as e:
        raise ConversionError(str(e)) from None
    try:
        meta = read_meta(mcore_dir)
        cfg = Qwen2Config(**meta["model"])
        reader = DcpReader(mcore_dir)
    except (FileNotFoundError, TypeError, KeyError) as e:
        raise ConversionError(f"{mcore_dir}: {e}") from None
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES.get(dtype) if dtype else None
    for t in qwen2_hf.megatron_tensors(cfg):
        if t.key not in reader.metadata.state_dict_metadata:
            raise ConversionError(f"{mcore_dir}: missing tensor {t.key}")
        want = t.global_shape(cfg.num_layers)
        if tuple(reader.shape(t.key)) != want:
            raise ConversionError(f"{mcore_dir}: tensor {t.key} has shape {list(reader.shape(t.key))}, expected {list(want)}")
    out_dtype = torch_dtype or reader.dtype("decoder.final_layernorm.weight")
    shapes = qwen2_hf.hf_tensor_shapes(cfg)
    layer_names = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_layers)]
    global_names = [n for n in shapes if not n.startswith("model.layers.")]
    shards = _plan_shards([global_names, *layer_names], shapes, out_dtype, max_shard_bytes)
    with atomic_directory(out_dir, overwrite) as tmp:
        w = _HFShardWriter(tmp, shards, shapes, out_dtype)
        produced = qwen2_hf.megatron_to_hf_global(cfg, reader.read)
        for name in global_names:
            w.add(name, produced.pop(name))

        def layer(i: int) -> None:
            produced = qwen2_hf.megatron_to_hf_layer(cfg, reader.read, i)
            for name in layer_names[i]:
                w.add(name, produced.pop(name))

        try:
            _parallel(layer, cfg.num_layers, "Megatron -> HF layers", progress, workers)
        except BaseException:
            w.abort()
            raise
        w.close()
        dname = HF_NAMES[out_dtype]
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dname), indent=2))
        tok = Path(tokenizer_dir) if tokenizer_dir else mcore_dir / "tokenizer"
        if tok.is_dir():
            _copy_tokenizer(tok, tmp)
    return Path(out_dir)
