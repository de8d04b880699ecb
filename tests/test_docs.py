"""The documents stay true to the repository: every relative link points at a file, every `make X` named is a target
of the Makefile, every script named exists, and docs/configuration.md is what the typed config generates."""

from __future__ import annotations

import re
from pathlib import Path

from ichpipe.base.config_reference import reference

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "BENCHMARKS.md",
             *sorted((REPO / "docs").glob("*.md"))]


def broken_links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file (``[text](target)``, images too) that name no file."""
    text = path.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")
            and not (path.parent / t.split("#")[0]).exists()]


def test_every_relative_link_of_the_documents_points_at_a_file(tmp_path):
    assert {p.name: broken_links(p) for p in DOCUMENTS if broken_links(p)} == {}
    (tmp_path / "a.md").write_text("[ok](a.md), [gone](nowhere.md), [web](https://x.org/y)")  # the check can fail
    assert broken_links(tmp_path / "a.md") == ["nowhere.md"]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def test_every_make_target_and_script_the_documents_name_exists():
    targets = make_targets()
    assert {"demo", "test", "lint", "docs"} <= targets
    for path in DOCUMENTS:
        text = path.read_text()
        named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", text))
        assert named <= targets, (path.name, named - targets)
        # ours, not the 2nd place's
        scripts = set(re.findall(r"(?<![\w/])scripts/([0-9]{2}_[a-z0-9_]+\.py|lstm_train\.py)", text))
        assert all((REPO / "scripts" / s).exists() for s in scripts), (path.name, scripts)


def test_the_readme_is_a_landing_page_and_names_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")  # CI runs exactly the README's command


def test_the_configuration_reference_is_generated_from_the_config():
    assert (REPO / "docs" / "configuration.md").read_text() == reference(), "run `make docs`"
    assert "| `train.lr` | number > 0.0 |" in reference()  # a field, its type and bound, as the model has them
