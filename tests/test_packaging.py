"""The built wheel ships the npe2 manifest inside the package, so napari finds the plugin
from an installed wheel, not only from an editable install."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("napari_xt-*.whl")
    return whl


def test_wheel_contains_manifest(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_xt/napari.yaml" in names
        assert "napari_xt/weights/xt_demo_sar.safetensors" in names  # the built-in model
        shipped = zf.read("napari_xt/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_xt:napari.yaml" in zf.read(entry_points).decode()
    assert shipped == (ROOT / "napari.yaml").read_text()


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
