"""What the built sdist and wheel contain and declare: the npe2 manifest inside the package as
a real file (napari finds the plugin from an installed wheel, not only from an editable
install), LICENSE, no training logs in the wheel, and dependencies that cover what the code
imports with GUI packages only in the `napari` extra. scripts/wheel_smoke.py installs the
wheel into fresh environments (newest and lowest declared versions) and runs the CLI."""

import ast
import functools
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "napari_xt"
# parts of the package a CLI-only install imports (widgets and _napari_io need napari)
CORE = ("io", "model", "engine", "train", "inspect", "commands", "bench", "cli.py",
        "distributed", "sample_data.py", "__init__.py", "__main__.py")
# imported only inside functions, each from the extra that provides it
OPTIONAL_IMPORTS = {"mamba_ssm": "mamba", "causal_conv1d": "mamba",
                    "distributed": "distributed", "fsspec": "remote", "napari": "napari",
                    "openslide": "openslide", "wsidicom": "dicom", "pydicom": "dicom"}
NOT_INSTALLED_HERE = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
GUI = {"napari", "npe2", "magicgui", "qtpy", "superqt", "pyqt5", "pyqt6", "pyside2",
       "pyside6", "vispy", "psutil"}
# lowest versions that work, measured (timm: 1.0.9 lacks backbones the zoo uses, 1.0.10-1.0.20
# fail with "Cannot copy out of meta tensor"; zarr: 3.1.2 fails with tifffile's zarr store,
# and tifffile's zarr extra needs 3.1.5; tifffile: before 2025.5.21 its TIFF zarr store is not
# a zarr 3 store; numpy: zarr 3.1.5 needs 1.26; Python: every zarr 3 needs 3.11)
MEASURED_MINIMUM = {"timm": "1.0.21", "zarr": "3.1.5", "tifffile": "2025.5.21",
                    "numpy": "1.26", "scipy": "1.11"}


def _smoke_module():
    spec = importlib.util.spec_from_file_location("wheel_smoke", ROOT / "scripts" /
                                                  "wheel_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = _smoke_module()


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel): the sdist built from the checkout, the wheel from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    (sdist,) = out.glob("napari_xt-*.tar.gz")
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (tree,) = unpacked.iterdir()
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)],
                   cwd=tree, check=True, capture_output=True)
    (whl,) = out.glob("napari_xt-*.whl")
    return sdist, whl


@pytest.fixture(scope="module")
def wheel(dists):
    return dists[1]


def _sdist_member(sdist: Path, name: str) -> tuple[tarfile.TarInfo | None, bytes | None]:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name.split("/", 1)[-1] == name:
                data = tar.extractfile(member).read() if member.isfile() else None
                return member, data
    return None, None


def test_wheel_contains_manifest(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_xt/napari.yaml" in names
        assert "napari_xt/weights/xt_demo_sar.safetensors" in names  # the built-in model
        shipped = zf.read("napari_xt/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_xt:napari.yaml" in zf.read(entry_points).decode()
    assert shipped == (ROOT / "napari.yaml").read_text()


def test_package_manifest_is_a_real_copy_of_the_root_one():
    package_copy = PACKAGE / "napari.yaml"
    assert not package_copy.is_symlink(), "napari_xt/napari.yaml must be a file, not a link"
    assert package_copy.read_bytes() == (ROOT / "napari.yaml").read_bytes(), (
        "napari.yaml and napari_xt/napari.yaml differ: edit napari.yaml, then copy it to "
        "napari_xt/napari.yaml")


def test_sdist_holds_real_manifests_identical_to_the_root_one(dists):
    sdist, _ = dists
    root = (ROOT / "napari.yaml").read_bytes()
    for name in ("napari.yaml", "napari_xt/napari.yaml"):
        member, data = _sdist_member(sdist, name)
        assert member is not None, f"{name} missing from the sdist"
        assert member.isfile() and not member.issym(), f"{name} in the sdist is not a file"
        assert data == root, f"{name} in the sdist differs from napari.yaml"


def test_training_logs_stay_out_of_the_wheel_and_in_the_sdist(dists):
    sdist, whl = dists
    with zipfile.ZipFile(whl) as zf:
        logs = [n for n in zf.namelist() if n.endswith(".train.log")]
    assert not logs, f"training logs in the wheel: {logs}"
    cited = set(re.findall(r"napari_xt/weights/[\w.]+\.train\.log",
                           (ROOT / "docs" / "demo_model.md").read_text()))
    on_disk = {str(p.relative_to(ROOT)) for p in (PACKAGE / "weights").glob("*.train.log")}
    assert cited and cited <= on_disk  # the docs cite logs that exist
    for name in on_disk:
        member, data = _sdist_member(sdist, name)
        assert member is not None and data == (ROOT / name).read_bytes(), name


def test_license_ships_in_sdist_and_wheel(dists):
    sdist, whl = dists
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "the napari-xt developers" in text
    _, in_sdist = _sdist_member(sdist, "LICENSE")
    assert in_sdist == text.encode()
    with zipfile.ZipFile(whl) as zf:
        licenses = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert licenses and zf.read(licenses[0]).decode() == text
        metadata_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Requires-Python"] == ">=3.11"


def test_package_description_has_no_link_an_index_cannot_follow(dists):
    """PyPI and the napari hub show the wheel's description: README.md's pictures and
    document links are repository paths there, so they are written as text."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert re.search(r"!\[[^\]]*\]\(docs/", readme)  # the README does link a picture
    for dist in dists:
        if dist.suffix == ".whl":
            with zipfile.ZipFile(dist) as zf:
                name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
                text = zf.read(name).decode()
        else:
            _, raw = _sdist_member(dist, "PKG-INFO")
            text = raw.decode()
        description = Parser().parsestr(text).get_payload()
        links = re.findall(r"\]\(([^)\s]+)\)", description)
        assert links, "the description keeps its absolute links"
        assert all(re.match(r"^(https?|mailto):", target) for target in links), links
        assert "`docs/images/demo_headless.png` in the source distribution" in description
        assert "Install for use" in description  # README.md's text, not a stand-in


def test_package_description_rewrites_links_not_code():
    sys.path.insert(0, str(ROOT))
    try:
        from hatch_build import package_description
    finally:
        sys.path.remove(str(ROOT))
    same = ["Use `[a](b.md)` in code", "```\nx = f[0](docs/z)\n```\n",
            "[x](//cdn.example.com/a.png)", "[site](https://napari.org) and [top](#install)"]
    for text in same:
        assert package_description(text) == text
    assert package_description('[a](docs/a.md "Title")') == \
        "a (`docs/a.md` in the source distribution)"
    assert package_description("[x](<docs/a b.md>)") == \
        "x (`docs/a b.md` in the source distribution)"
    assert package_description("![pic](docs/p.png)") == \
        "*(picture: pic; `docs/p.png` in the source distribution)*"


def test_readme_pictures_become_absolute_links_under_the_pictures_url(monkeypatch):
    import re

    sys.path.insert(0, str(ROOT))
    try:
        from hatch_build import DescriptionHook, package_description
    finally:
        sys.path.remove(str(ROOT))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme)
    assert pictures, "README.md shows no picture"
    monkeypatch.delenv("NAPARI_XT_PICTURES_URL", raising=False)
    hook = DescriptionHook(str(ROOT), {"pictures-url": "https://example.org/xt/v{version}/"})
    metadata = {"version": "9.8.7"}
    hook.update(metadata)
    text = metadata["readme"]["text"]
    shown = re.findall(r"!\[[^\]]*\]\((https://example\.org/xt/v9\.8\.7/[^)]+)\)", text)
    assert len(shown) == len(pictures)
    for url in shown:  # each names a file the repository (and the sdist's docs/) holds
        assert (ROOT / url.removeprefix("https://example.org/xt/v9.8.7/")).is_file(), url
    assert "in the source distribution)*" not in text  # no picture left as a line of text
    monkeypatch.setenv("NAPARI_XT_PICTURES_URL", "https://other.example/p")
    hook.update(metadata)
    assert "](https://other.example/p/docs/" in metadata["readme"]["text"]
    assert package_description("![a](<./docs/p q.png>)", "https://h.example/") == \
        "![a](https://h.example/docs/p%20q.png)"
    with pytest.raises(ValueError, match="https://"):
        package_description("![a](p.png)", "http://h.example/")
    for bad in ("![a](../p.png)", "![a](<docs/p#1.png>)"):
        with pytest.raises(ValueError, match="inside the repository"):
            package_description(bad, "https://h.example/")
    with pytest.raises(ValueError, match="query"):
        package_description("![a](p.png)", "https://h.example/raw?ref=v1")


def test_classifiers_are_known_and_match_requires_python():
    from trove_classifiers import classifiers as known

    project = SMOKE.project()
    unknown = [c for c in project["classifiers"] if c not in known]
    assert not unknown, unknown
    minimum = _version(project["requires-python"].removeprefix(">="))
    pythons = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
               if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert pythons and all(_version(v) >= minimum for v in pythons)


def _third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, unguarded) for each absolute non-stdlib import; unguarded: run at
    module level outside a try block, so importing the module needs it."""
    tree = ast.parse(path.read_text())
    unguarded = set()
    for node in tree.body:  # module level, also under `if`, never inside `try` or a def
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, ast.Import | ast.ImportFrom):
                unguarded.add(id(n))
            elif isinstance(n, ast.If):
                stack += n.body + n.orelse
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        for name in names:
            module = name.split(".")[0]
            if module not in sys.stdlib_module_names and module != "napari_xt":
                found.append((module, id(node) in unguarded))
    return found


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution(module: str) -> str:
    providers = _providers().get(module)
    if not providers:
        assert module in NOT_INSTALLED_HERE, f"no installed distribution provides {module!r}"
        return NOT_INSTALLED_HERE[module]
    return providers[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = SMOKE.project()
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return core, extras


def test_core_dependencies_cover_every_import_of_the_core():
    core, extras = _declared()
    missing, misplaced = [], []
    paths = [p for part in CORE for p in ([PACKAGE / part] if part.endswith(".py")
                                           else (PACKAGE / part).rglob("*.py"))]
    assert len(paths) > 50
    for path in paths:
        where = path.relative_to(ROOT)
        for module, unguarded in _third_party_imports(path):
            dist = _distribution(module)
            if module in OPTIONAL_IMPORTS:
                extra = OPTIONAL_IMPORTS[module]
                if dist not in extras[extra]:
                    missing.append(f"{where}: {module} (extra {extra!r} lacks {dist})")
                if unguarded:
                    misplaced.append(f"{where}: optional {module} imported unguarded at "
                                     "module level")
            elif dist not in core:
                missing.append(f"{where}: {module} ({dist} is not a core dependency)")
    assert not missing, "\n".join(missing)
    assert not misplaced, "\n".join(misplaced)


def test_napari_extra_covers_the_plugin_imports():
    core, extras = _declared()
    napari_requires = {_name(r) for r in importlib.metadata.requires("napari")
                       if "extra ==" not in r}
    allowed = core | extras["napari"] | napari_requires
    missing = []
    for path in [PACKAGE / "_napari_io.py", *(PACKAGE / "widgets").rglob("*.py")]:
        for module, _ in _third_party_imports(path):
            if _distribution(module) not in allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module}")
    assert not missing, missing


def test_gui_packages_only_in_the_napari_extra():
    core, extras = _declared()
    assert not core & GUI, f"GUI packages in the core dependencies: {core & GUI}"
    assert {"napari", "npe2", "qtpy"} <= extras["napari"]


def test_every_core_dependency_has_a_tested_lower_bound():
    project = SMOKE.project()
    bounds = SMOKE.lower_bounds(project["dependencies"])  # one `>=` each, or it raises
    assert set(bounds) == {_name(r) for r in project["dependencies"]}
    for name, minimum in MEASURED_MINIMUM.items():
        assert _version(bounds[name]) >= _version(minimum), (name, bounds[name])
    assert project["requires-python"] == ">=3.11"
    with pytest.raises(SMOKE.SmokeError, match="needs one lower bound"):
        SMOKE.lower_bounds(["numpy"])


def test_manifest_validates_with_npe2():
    npe2 = Path(sys.executable).with_name("npe2")
    for manifest in (ROOT / "napari.yaml", PACKAGE / "napari.yaml"):
        res = subprocess.run([str(npe2), "validate", str(manifest)], capture_output=True,
                             text=True)
        assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_installed_wheel_manifest_loads(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from npe2 import PluginManifest;"
        "m = PluginManifest.from_distribution('napari-xt');"
        "print(m.name); print(m._yaml_path if hasattr(m, '_yaml_path') else '');"
        "import napari_xt; print(napari_xt.__file__);"
        "from napari_xt.train.demo import load_demo_model, demo_weights_path;"
        "load_demo_model(); print(demo_weights_path())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, check=True
    )
    name, _, module_file, weights = res.stdout.strip().splitlines()[-4:]
    assert name == "napari-xt"
    assert Path(module_file).is_relative_to(target)
    assert Path(weights).is_relative_to(target)
    # every python_name of the installed manifest imports (widgets, reader, writers, samples)
    manifest = target / "napari_xt" / "napari.yaml"
    res = subprocess.run(
        [str(Path(sys.executable).with_name("npe2")), "validate", str(manifest), "--imports"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr
    assert "has no attribute" not in res.stdout + res.stderr
