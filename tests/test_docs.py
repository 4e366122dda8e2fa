"""The manual is generated where it can be: every config field has the comment the configuration reference
shows (the architecture page's package picture is tools/package_graph.py, whose graph test_architecture keeps
free of cycles). `make docs` builds the site with warnings as errors: broken links, missing pages, pages
outside the navigation."""

from conftest import ROOT


def test_every_config_field_has_a_reference_entry():
    from megatron_soaes.config.reference import ROOTS, load, markdown, rows

    for title, target in ROOTS.items():
        missing = [f"{r.owner}.{r.path.rsplit('.', 1)[-1]}" for r in rows(load(target)) if not r.doc]
        assert not missing, f"{title}: fields without a comment: {missing}"
    md = markdown()
    assert "| `evaluation.repetition_penalty` |" in md and "| `parallel.expert_tensor_parallel` |" in md


def test_the_reference_sees_a_field_without_a_comment():
    from pydantic import BaseModel

    from megatron_soaes.config.reference import rows

    class Section(BaseModel):
        said: int = 1  # a comment
        # above it
        above: int = 2
        silent: int = 3

    assert {r.path: r.doc for r in rows(Section)} == {"said": "a comment", "above": "above it", "silent": ""}


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
