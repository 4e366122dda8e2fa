"""Bad input, command by command: every malformed input a user can give a `soaes` command -- a missing file, an
empty one, one that is not UTF-8, a truncated or unknown-shaped record, a directory where a file belongs, a
config of an unsupported architecture, an output that cannot be written -- ends with exit status 2 and one
line naming the input and the problem: no traceback, nothing half-written. The table this sweep holds is
`SWEEP`; docs/testing.md shows it (`python tests/test_bad_input.py` prints it)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import cli_in_process  # noqa: E402


def inputs(d: Path) -> dict:
    """The bad inputs, made once per test in `d`."""
    (d / "adir").mkdir()
    (d / "empty.yaml").write_text("")
    (d / "empty.jsonl").write_text("")
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (d / "truncated.jsonl").write_text('{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "con\n')
    (d / "unknown.jsonl").write_text(json.dumps({"question": "问", "answer": "答"}, ensure_ascii=False) + "\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    gpt2 = d / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                  "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100,
                                                  "bos_token_id": 0, "eos_token_id": 0}))
    (d / "gpt2.yaml").write_text(f"kind: cpt\nmodel: {{hf_config: {gpt2}}}\ndata: {{tokenizer: qwen, seq_length: 64, "
                                 f"train: [{{path: {d / 'nodata'}}}]}}\ntrain: {{steps: 1, global_batch_size: 1, "
                                 f"output_dir: {d / 'out'}}}\n")
    (d / "a_file").write_text("x")
    return {"missing": d / "missing.yaml", "empty": d / "empty.yaml", "latin1": d / "latin1.yaml",
            "dir": d / "adir", "list": d / "list.yaml", "gpt2": d / "gpt2.yaml", "gpt2_dir": gpt2,
            "missing_jsonl": d / "missing.jsonl", "empty_jsonl": d / "empty.jsonl", "latin1_jsonl": d / "latin1.jsonl",
            "truncated_jsonl": d / "truncated.jsonl", "unknown_jsonl": d / "unknown.jsonl",
            "under_a_file": d / "a_file" / "out"}


# (command, bad input, arguments with {placeholders} from `inputs`, what the one line must say)
SWEEP = [
    ("train", "missing config", ["train", "--config", "{missing}"], "missing.yaml"),
    ("train", "empty config", ["train", "--config", "{empty}"], "empty.yaml"),
    ("train", "config not UTF-8", ["train", "--config", "{latin1}"], "latin1.yaml"),
    ("train", "a directory as config", ["train", "--config", "{dir}"], "adir"),
    ("train", "config not a mapping", ["train", "--config", "{list}"], "list.yaml"),
    ("train", "unsupported architecture", ["train", "--config", "{gpt2}", "--dry-run", "--skip-path-check"], "GPT2LMHeadModel"),
    ("distill", "missing config", ["distill", "--config", "{missing}"], "missing.yaml"),
    ("sft", "missing recipe", ["sft", "--recipe", "{missing}"], "missing.yaml"),
    ("pipeline", "missing config", ["pipeline", "--config", "{missing}"], "missing.yaml"),
    ("pipeline", "config not UTF-8", ["pipeline", "--config", "{latin1}"], "latin1.yaml"),
    ("curate", "missing source", ["curate", "--source", "x={missing_jsonl}", "--out", "{under_a_file}"], "missing.jsonl"),
    ("curate", "a directory as source", ["curate", "--source", "x={dir}", "--out", "{under_a_file}"], "is a directory"),
    ("curate", "evaluation file not UTF-8", ["curate", "--source", "x={empty_jsonl}", "--eval", "{latin1_jsonl}",
                                             "--out", "{under_a_file}"], "latin1.jsonl:1"),
    ("curate", "truncated evaluation record", ["curate", "--source", "x={empty_jsonl}", "--eval", "{truncated_jsonl}",
                                               "--out", "{under_a_file}"], "truncated.jsonl:1"),
    ("curate", "evaluation record of unknown shape", ["curate", "--source", "x={empty_jsonl}", "--eval",
                                                      "{unknown_jsonl}", "--out", "{under_a_file}"], "unknown.jsonl:1"),
    ("convert", "missing checkpoint", ["convert", "megatron-to-hf", "{missing}", "{under_a_file}"], "missing.yaml"),
    ("convert", "a directory that is no checkpoint", ["convert", "megatron-to-hf", "{dir}", "{under_a_file}"], "adir"),
    ("convert", "HF directory of an unsupported architecture", ["convert", "hf-to-megatron", "{gpt2_dir}",
                                                                "{under_a_file}"], "GPT2LMHeadModel"),
    ("verify-checkpoint", "missing checkpoint", ["verify-checkpoint", "{missing}"], "missing.yaml"),
    ("verify-checkpoint", "a directory that is no checkpoint", ["verify-checkpoint", "{dir}"], "adir"),
    ("generate", "missing model", ["generate", "--target", "{missing}", "--prompt", "x"], "no such model directory"),
    ("generate", "unsupported architecture", ["generate", "--target", "{gpt2_dir}", "--prompt", "x"], "GPT2LMHeadModel"),
    ("peft merge", "missing base", ["peft", "merge", "--base", "{missing}", "--adapter", "{missing}", "--out",
                                    "{under_a_file}"], "missing.yaml"),
    ("serve-check", "missing target", ["serve-check", "--target", "{missing}", "--draft", "{missing}"], "missing.yaml"),
    ("compare-logits", "missing HF directory", ["compare-logits", "--hf", "{missing}"], "missing.yaml"),
]


@pytest.mark.parametrize("command,bad,argv,says", SWEEP, ids=[f"{c}: {b}" for c, b, _, _ in SWEEP])
def test_bad_input_is_an_error_message_and_writes_nothing(tmp_path, command, bad, argv, says):
    paths = inputs(tmp_path)
    res = cli_in_process(*[a.format(**paths) for a in argv])
    err = res.stderr.strip()
    assert res.returncode == 2, f"exit {res.returncode}: {err[-2000:]}"
    # One line per problem (a config lists each bad field on its own line), never a traceback.
    assert err.startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert says in err.splitlines()[0], err
    assert not (tmp_path / "out").exists() and (tmp_path / "a_file").read_text() == "x"


if __name__ == "__main__":  # the table docs/testing.md shows
    import tempfile

    print("| command | bad input | the error (first line) |\n|---|---|---|")
    for command, bad, argv, _ in SWEEP:
        with tempfile.TemporaryDirectory() as d:
            paths = inputs(Path(d))
            line = cli_in_process(*[a.format(**paths) for a in argv]).stderr.strip().splitlines()[0].replace(d, "...")
        print(f"| `{command}` | {bad} | `{line}` |")


def test_a_full_disk_is_an_error_message_and_publishes_nothing(tmp_path):
    """A write the disk refuses mid-file (here the file-size limit, EFBIG; a full disk, ENOSPC, and a read-only
    one, EROFS, take the same path) ends with exit 2 and one line naming the output; the converted checkpoint is
    never published, and curation keeps only its resumable `.part` (a rerun with room continues it)."""
    import random
    import resource
    import subprocess

    from conftest import ROOT, job_env
    from megatron_soaes.models.random_init import make_random_hf_model

    make_random_hf_model(tmp_path / "hf", "test", vocab_size=4096)
    docs = tmp_path / "docs.jsonl"
    rng = random.Random(0)  # distinct documents (near-duplicates would be curated away)
    docs.write_text("".join(json.dumps({"text": "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(600)) + "。"},
                                       ensure_ascii=False) + "\n" for _ in range(200)), encoding="utf-8")
    limit = 200_000  # bytes: below one converted tensor file, and below the curated output

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for argv, out in ((["convert", "hf-to-megatron", tmp_path / "hf", tmp_path / "mc"], tmp_path / "mc"),
                      (["curate", "--source", f"x={docs}", "--out", tmp_path / "cur"], tmp_path / "cur")):
        res = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", *map(str, argv)], cwd=ROOT, env=job_env(),
                             capture_output=True, text=True, preexec_fn=small_disk, timeout=600)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert len(lines) == 1 and str(out) in lines[0] and "File too large" in lines[0], res.stderr[-2000:]
        published = [p.name for p in out.iterdir()] if out.exists() else []
        assert "x.jsonl" not in published and not (out / "soaes_model.json").exists(), published
    assert not (tmp_path / "mc").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".mc")]


def test_a_refused_write_is_found_under_the_error_that_reports_it():
    """torch's writers re-raise a failed write as their own RuntimeError: the CLI finds the OSError beneath."""
    import errno

    from megatron_soaes.cli import write_failure

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")
    except RuntimeError as e:
        assert write_failure(e).errno == errno.ENOSPC
    assert write_failure(RuntimeError("x")) is None and write_failure(FileNotFoundError(errno.ENOENT, "x")) is None
