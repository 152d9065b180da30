"""`napari-xt convert` end to end: exit codes, output store, no overwrite."""

import numpy as np
import pytest

from napari_xt.cli import main
from napari_xt.io import open_image


@pytest.fixture
def npy(tmp_path, rng):
    path = tmp_path / "scene.npy"
    np.save(path, rng.integers(0, 255, (600, 700, 3), dtype=np.uint8))
    return path


def test_convert_writes_a_pyramid(npy, tmp_path, capsys):
    out = tmp_path / "scene.ome.zarr"
    assert main(["convert", str(npy), str(out), "--chunk", "256"]) == 0
    assert "wrote" in capsys.readouterr().out
    image = open_image(out)
    source = np.load(npy)
    assert image.num_levels >= 1
    np.testing.assert_array_equal(image.to_yxc(0).compute(), source)


def test_convert_refuses_to_overwrite_and_bad_input(npy, tmp_path, capsys):
    out = tmp_path / "scene.ome.zarr"
    assert main(["convert", str(npy), str(out), "--quiet"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["convert", str(npy), str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["convert", str(tmp_path / "missing.tif"), str(tmp_path / "x.zarr")]) == 2
    assert not (tmp_path / "x.zarr").exists()
