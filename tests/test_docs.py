"""The documentation site's sources: every public name documented, the generated pages
generated from the code (the CLI reference is what `--help` prints), every page in the
navigation and every navigation entry a page. `make docs` builds the site itself (CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _script("docs_hooks")


def test_every_public_name_of_the_api_packages_has_a_docstring():
    missing = _script("check_docstrings").missing()
    assert not missing, f"{len(missing)} without a docstring, e.g. {missing[:10]}"


def test_the_cli_reference_is_what_help_prints():
    page = HOOKS.cli_reference()
    helps = HOOKS.command_help()
    from napari_xt.cli import SUBCOMMANDS

    assert set(helps) == {"", *(name.replace("_", "-") for name in SUBCOMMANDS)}
    for name, text in helps.items():
        assert text.rstrip() in page, name
    # and what a user's terminal shows, at the same width
    env = {**os.environ, "COLUMNS": HOOKS.HELP_COLUMNS}
    out = subprocess.run([sys.executable, "-m", "napari_xt", "predict", "--help"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.rstrip() in page
    assert "--workers" in out and "--devices" in out  # (a flag added with scale-out)


def _nav_pages(entries) -> list[str]:
    out = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return out


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    assert config["strict"] == "true" and "scripts/docs_hooks.py" in config["hooks"]


def test_the_api_reference_covers_every_public_module():
    for package in ("io", "model", "engine", "train", "inspect", "distributed"):
        page = (DOCS / "reference" / "api" / f"{package}.md").read_text()
        assert f"<!-- generated: api napari_xt.{package} -->" in page
        text = HOOKS.on_page_markdown(page, None, None, None)
        modules = HOOKS.public_modules(f"napari_xt.{package}")
        assert modules[0] == f"napari_xt.{package}"
        for module in modules:
            assert f"::: {module}\n" in text
            assert not any(part.startswith("_") for part in module.split("."))
    assert "napari_xt.engine.parts" in HOOKS.public_modules("napari_xt.engine")


@pytest.mark.slow
def test_the_zoo_table_lists_every_model_with_its_counted_parameters():
    from napari_xt.model.zoo import PAPER_PARAMS, list_models

    table = HOOKS.zoo_table()
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list_models()
    base = next(r for r in rows if r.startswith("| `swinv2_t_baseline`"))
    assert "30.82M" in base and f"{PAPER_PARAMS['swinv2_t_baseline']}M" in base


def test_the_docstring_check_sees_conditional_and_empty_definitions():
    import ast

    check = _script("check_docstrings")
    source = ('if True:\n    def made_if():\n        pass\n'
              'try:\n    class MadeInTry:\n        def method(self):\n            """Yes."""\n'
              'except ImportError:\n    pass\n'
              'def empty():\n    ""\n'
              'def _private():\n    pass\n')
    assert check._missing_in(ast.parse(source), "m") == ["m.made_if", "m.MadeInTry", "m.empty"]


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr
    page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--devices" in page and "napari-xt predict" in page
    api = (tmp_path / "site" / "reference" / "api" / "model" / "index.html").read_text()
    assert "R*h*w" in api  # shapes in docstrings are not taken for emphasis
