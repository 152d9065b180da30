"""MkDocs hooks of the documentation site: pages that are generated from the code at build
time, never copied by hand, so they cannot drift from it.

A page asks for generated content with a marker on a line of its own:

    <!-- generated: cli -->                  every `napari-xt` command's --help
    <!-- generated: zoo -->                  the model zoo table (parameters against the paper)
    <!-- generated: api napari_xt.engine --> the API reference of every public module of a
                                             package (mkdocstrings blocks)

The functions are importable (tests compare the CLI page with `--help`).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: (\w+)(?: ([\w.]+))? -->$", re.MULTILINE)
HELP_COLUMNS = "100"  # the width --help is rendered at in the reference


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for its subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_help() -> dict[str, str]:
    """`--help` of `napari-xt` ("") and of each subcommand, at `HELP_COLUMNS` columns."""
    from napari_xt.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        out = {"": parser.format_help()}
        for name, sub in _subparsers(parser).items():
            out[name] = sub.format_help()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out


def cli_reference() -> str:
    """Markdown: one section per command with its --help verbatim."""
    parts = []
    for name, text in command_help().items():
        title = f"napari-xt {name}".strip()
        parts.append(f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def zoo_table() -> str:
    """Markdown table of every zoo model: region encoder and size, crop, context, head,
    parameters counted on the meta device (no memory, nothing downloaded) and the paper's
    figure where it has one."""
    import torch

    from napari_xt.model.zoo import PAPER_PARAMS, create_model, get_config, list_models

    rows = ["| name | region encoder | region px | crop (regions) | context | head | "
            "parameters | paper | difference |", "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for name in list_models():
        cfg = get_config(name)
        with torch.device("meta"):
            model = create_model(name)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        ctx = cfg.context
        context = "none" if ctx.kind == "none" else f"{ctx.kind} x {ctx.depth}, {ctx.dim} wide"
        if cfg.global_context is not None:
            context += ", whole image"
        crop = cfg.crop_regions or 1
        paper = PAPER_PARAMS.get(name)
        diff = f"{100 * (count - paper) / paper:+.2f} %" if paper else "—"
        rows.append(f"| `{name}` | {cfg.region.backbone} | {cfg.region.region_size} | "
                    f"{crop} x {crop} | {context} | {cfg.head.kind} | {count:.2f}M | "
                    f"{f'{paper}M' if paper else '—'} | {diff} |")
    return "\n".join(rows) + "\n"


def public_modules(package: str) -> list[str]:
    """Dotted names of the package and its public modules (no part starting with "_")."""
    base = ROOT / Path(*package.split("."))
    out = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(p.startswith("_") for p in parts):
            out.append(".".join(parts))
    return sorted(set(out), key=lambda m: (m != package, m))


def api_reference(package: str) -> str:
    """mkdocstrings blocks for `package` and every public module in it."""
    parts = []
    for module in public_modules(package):
        heading = "##" if module == package else "###"
        parts.append(f"{heading} `{module}`\n\n::: {module}\n    options:\n"
                     "      show_root_heading: false\n      show_submodules: false\n")
    return "\n".join(parts)


def _generate(match: re.Match) -> str:
    kind, arg = match.group(1), match.group(2)
    if kind == "cli":
        return cli_reference()
    if kind == "zoo":
        return zoo_table()
    if kind == "api" and arg:
        return api_reference(arg)
    raise ValueError(f"unknown generated block {match.group(0)!r}")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook
    """Replace each generated-content marker of a page with its content."""
    return MARKER.sub(_generate, markdown)
