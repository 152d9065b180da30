"""Slides and remote images: OpenSlide against tifffile on a real Aperio file, associated
images, a multi-series TIFF, an OME-Zarr over HTTP read lazily, and missing extras."""

from __future__ import annotations

import http.server
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_xt.io import ImageIOError, open_image

SVS = Path(__file__).resolve().parents[1] / ".venv" / "test-data" / "CMU-1-Small-Region.svs"
needs_svs = pytest.mark.skipif(not SVS.is_file(), reason="make setup fetches the SVS")


@needs_svs
def test_openslide_reads_the_aperio_slide_as_tifffile_does():
    pytest.importorskip("openslide", reason="the openslide extra")
    from napari_xt.io.openslide_reader import open_openslide

    a, b = open_image(SVS), open_openslide(SVS)
    assert b.axes == "YXC" and b.num_levels == a.num_levels
    assert b.pixel_size == a.pixel_size == (0.499, 0.499) and b.unit == "micrometer"
    assert b.levels[0].chunksize[:2] == (240, 240)  # OpenSlide's own tiles
    for la, lb in zip(a.levels, b.levels):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    window = (slice(1000, 1300), slice(700, 1100))  # a window through the dask graph
    np.testing.assert_array_equal(np.asarray(b.levels[0][window]),
                                  np.asarray(a.levels[0][window]))
    assert set(a.associated) == set(b.associated) == {"label", "macro", "thumbnail"}
    for key in a.associated:
        np.testing.assert_array_equal(a.associated[key], b.associated[key])


@needs_svs
def test_napari_shows_a_slides_label_and_macro_beside_it():
    from napari_xt import _napari_io

    layers = _napari_io.read_paths(str(SVS))
    names = [k["name"] for _, k, _ in layers]
    assert names == ["CMU-1-Small-Region", "CMU-1-Small-Region label",
                     "CMU-1-Small-Region macro", "CMU-1-Small-Region thumbnail"]
    slide_w = 2220 * 0.499
    for data, kw, kind in layers[1:]:
        assert kind == "image" and kw["rgb"] and kw["visible"] is False
        assert kw["translate"][1] > slide_w  # beside the slide, not over it
        assert data.ndim == 3 and data.shape[2] == 3


def test_a_multi_series_tiff_lists_its_series_and_opens_the_chosen_one(tmp_path):
    path = tmp_path / "two.tif"
    a = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    b = np.full((3, 30, 20), 7, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(a)
        tif.write(b, photometric="minisblack", metadata={"axes": "CYX"})
    with pytest.raises(ImageIOError) as err:
        open_image(path, series=None)
    assert "(40, 50)" in str(err.value) and "(3, 30, 20)" in str(err.value)
    np.testing.assert_array_equal(np.asarray(open_image(path, series=0).levels[0]), a)
    second = open_image(path, series=1)
    assert second.axes == "CYX" and second.levels[0].shape == (3, 30, 20)


class _Counting(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the standard library's name
        type(self).requests.append(self.path)
        return super().do_GET()

    def log_message(self, *args):
        pass


def test_an_ome_zarr_over_http_is_read_lazily(tmp_path):
    pytest.importorskip("aiohttp", reason="the remote extra")
    from napari_xt.io import convert

    data = np.random.default_rng(0).integers(0, 255, (2, 2048, 2048), dtype=np.uint8)
    np.save(tmp_path / "img.npy", data)
    convert(str(tmp_path / "img.npy"), str(tmp_path / "img.ome.zarr"), chunk=256)
    handler = type("Handler", (_Counting,), {"requests": []})

    def make(*a, **k):
        return handler(*a, directory=str(tmp_path), **k)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img.ome.zarr"
        image = open_image(url)
        assert image.levels[0].shape == (2, 2048, 2048) and image.num_levels >= 2
        before = list(handler.requests)
        assert not any("/c/" in r for r in before)  # opening reads metadata only
        window = np.asarray(image.levels[0][:, 200:400, 600:800])
        np.testing.assert_array_equal(window, data[:, 200:400, 600:800])
        chunks = [r for r in handler.requests[len(before):] if "/0/c/" in r]
        assert 1 <= len(chunks) <= 4, chunks  # the 2 x 2 chunks the window covers (of
        # 64), never the whole level
    finally:
        server.shutdown()


def test_an_ome_zarr_on_s3_is_read_lazily(tmp_path, monkeypatch):
    """s3:// through s3fs, against a local S3 server (moto's), with the credentials and the
    endpoint from the environment as for any S3-compatible store."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from napari_xt.io import convert

    data = np.random.default_rng(1).integers(0, 255, (2, 1024, 1024), dtype=np.uint8)
    np.save(tmp_path / "img.npy", data)
    root = tmp_path / "img.ome.zarr"
    convert(str(tmp_path / "img.npy"), str(root), chunk=256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    requests: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record):
            requests.append(record.getMessage())

    log = logging.getLogger("werkzeug")
    handler = Seen()
    log.addHandler(handler)
    try:
        for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "x"),
                           ("AWS_DEFAULT_REGION", "us-east-1"),
                           ("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")):
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="slides")
        for f in root.rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), "slides", f"scene.ome.zarr/{f.relative_to(root)}")
        requests.clear()
        image = open_image("s3://slides/scene.ome.zarr")
        assert image.levels[0].shape == (2, 1024, 1024)
        assert not any("/0/c/" in r for r in requests)  # opening reads metadata only
        window = np.asarray(image.levels[0][:, 300:500, 600:700])
        np.testing.assert_array_equal(window, data[:, 300:500, 600:700])
        got = [r for r in requests if '"GET /slides/scene.ome.zarr/0/c/' in r]
        assert 1 <= len(got) <= 4, got  # the chunks the window covers, of 16
    finally:
        log.removeHandler(handler)
        server.stop()


def test_missing_extras_are_one_line_naming_them(tmp_path, monkeypatch):
    slide = tmp_path / "slide.mrxs"
    slide.write_bytes(b"not really a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were missing
    with pytest.raises(ImageIOError, match=r"napari-xt\[openslide\]"):
        open_image(slide)
    monkeypatch.delitem(sys.modules, "openslide")
    pytest.importorskip("openslide", reason="the openslide extra")
    with pytest.raises(ImageIOError, match="OpenSlide cannot read it"):
        open_image(slide)
    from zarr.storage import FsspecStore

    def no_aiohttp(*args, **kwargs):  # what fsspec raises for http:// without aiohttp
        raise ImportError("HTTPFileSystem requires 'requests' and 'aiohttp'", name="aiohttp")

    monkeypatch.setattr(FsspecStore, "from_url", no_aiohttp)
    with pytest.raises(ImageIOError, match=r"needs aiohttp .*napari-xt\[remote\]"):
        open_image("http://127.0.0.1:9/none.zarr")


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    """The Aperio slide made into a DICOM WSI by wsidicomizer (its JPEG tiles kept)."""
    pytest.importorskip("wsidicom", reason="the dicom extra")
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="the test extra")
    if not SVS.is_file():
        pytest.skip("make setup fetches the SVS")
    out = tmp_path_factory.mktemp("dicom")
    wsidicomizer.WsiDicomizer.convert(str(SVS), str(out))
    return out


def test_a_dicom_slide_made_from_the_aperio_file_reads_back_equal(dicom_slide, tmp_path):
    from napari_xt import _napari_io
    from napari_xt.io import convert

    a, d = open_image(SVS), open_image(dicom_slide)
    assert d.source.startswith("DICOM WSI") and d.num_levels == a.num_levels
    assert d.pixel_size == pytest.approx(a.pixel_size) and d.unit == "micrometer"
    for la, ld in zip(a.levels, d.levels):
        np.testing.assert_array_equal(np.asarray(ld), np.asarray(la))
    assert {"label", "overview"} <= set(d.associated)
    one = next(p for p in dicom_slide.iterdir() if p.suffix == ".dcm")
    assert open_image(one).levels[0].shape == d.levels[0].shape  # a file: its slide
    assert _napari_io.get_reader(str(dicom_slide)) is _napari_io.read_paths
    out = convert(str(dicom_slide), str(tmp_path / "slide.ome.zarr"))  # to OME-Zarr 0.5
    np.testing.assert_array_equal(np.asarray(out.to_yxc(0)), np.asarray(a.levels[0]))


def test_the_optical_paths_of_a_dicom_slide_are_its_channels(dicom_slide, tmp_path):
    """A slide with a second optical path: the converted slide's image instances again,
    under optical path 1 (new instance UIDs, written by pydicom); each path's channels side
    by side, named by the path's description, and through to OME-Zarr."""
    import shutil

    import pydicom
    from pydicom.uid import generate_uid

    from napari_xt.io import convert

    two = tmp_path / "two-paths"
    shutil.copytree(dicom_slide, two)
    for f in sorted(two.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if "VOLUME" not in ds.ImageType:
            continue
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.OpticalPathSequence[0].OpticalPathIdentifier = "1"
        ds.OpticalPathSequence[0].OpticalPathDescription = "second path"
        ds.save_as(two / f"{f.stem}-path1.dcm")
    one, both = open_image(dicom_slide), open_image(two)
    assert both.levels[0].shape == (*one.levels[0].shape[:2], 6)
    assert both.channel_names == ("optical path 0 R", "optical path 0 G", "optical path 0 B",
                                  "second path R", "second path G", "second path B")
    window = np.asarray(both.levels[0][100:180, 200:300])
    expected = np.asarray(one.levels[0][100:180, 200:300])
    np.testing.assert_array_equal(window[..., :3], expected)
    np.testing.assert_array_equal(window[..., 3:], expected)
    out = convert(str(two), str(tmp_path / "two.ome.zarr"))
    assert out.channel_names == both.channel_names
    np.testing.assert_array_equal(np.asarray(out.to_yxc(0))[100:180, 200:300], window)


def test_the_dicom_extra_missing_is_one_line_naming_it(dicom_slide, monkeypatch):
    monkeypatch.setitem(sys.modules, "wsidicom", None)
    with pytest.raises(ImageIOError, match=r"needs wsidicom .*napari-xt\[dicom\]"):
        open_image(dicom_slide)


def test_napari_opens_every_series_of_a_multi_series_tiff_as_its_own_layer(tmp_path):
    # a file with two image series used to open as series 0 alone, silently
    from napari_xt import _napari_io

    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((40, 50), np.uint16))
        tif.write(np.full((3, 30, 20), 7, np.uint8), photometric="minisblack",
                  metadata={"axes": "CYX"})
    layers = _napari_io.read_paths(str(path))
    names = [k["name"] for _, k, _ in layers]
    assert names[0] == "two series 0" and any("series 1" in str(n) for n in names)
    one = tmp_path / "one.tif"
    tifffile.imwrite(one, np.ones((20, 30), np.uint8))
    assert [k["name"] for _, k, _ in _napari_io.read_paths(str(one))] == ["one"]


def test_the_napari_reader_claims_the_slide_formats():
    from npe2 import PluginManifest

    from napari_xt import _napari_io

    patterns = set(PluginManifest.from_distribution("napari-xt").contributions.readers[0]
                   .filename_patterns)
    assert {"*.mrxs", "*.scn", "*.vms", "*.bif", "*.svslide", "*.dcm"} <= patterns
    for suffix in (".mrxs", ".scn", ".vms", ".bif", ".svslide", ".dcm"):
        assert _napari_io.get_reader(f"/data/slide{suffix}") is _napari_io.read_paths


def test_openslide_levels_at_whole_number_downsamples_equal_tifffile(tmp_path):
    # (at other downsamples OpenSlide resamples by a fraction of a pixel: documented; TIFF
    # slides are read by tifffile, exactly)
    pytest.importorskip("openslide", reason="the openslide extra")
    from napari_xt.io.openslide_reader import open_openslide

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1024, 768, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"  # levels as a chain of tiled pages (generic TIFF)
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(256, 256), photometric="rgb")
        for f in (2, 4):
            tif.write(base[::f, ::f], tile=(256, 256), subfiletype=1, photometric="rgb")
    b = open_openslide(path)
    assert b.num_levels == 3
    for f, level in zip((1, 2, 4), b.levels):
        np.testing.assert_array_equal(np.asarray(level), base[::f, ::f])


def test_one_dicom_file_opens_its_own_slide_and_a_folder_of_two_is_refused(dicom_slide,
                                                                          tmp_path):
    import shutil

    import pydicom
    import wsidicomizer
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from napari_xt import _napari_io

    both = tmp_path / "both"
    shutil.copytree(dicom_slide, both)
    small = tmp_path / "small"
    wsidicomizer.WsiDicomizer.convert(str(SVS), str(small))  # a second slide (new UIDs)
    for f in small.iterdir():
        shutil.copy(f, both / f"b-{f.name}")
    with pytest.raises(ImageIOError, match="holds 2 slides"):
        open_image(both)
    mine = next(f for f in both.iterdir() if f.name.startswith("b-"))
    opened = [Path(str(f)).name for f in open_image(mine).resources[0].files]
    assert opened and all(n.startswith("b-") for n in opened)  # that slide, not the other
    # a folder of other DICOM (a CT slice) is not claimed as a slide
    ct = tmp_path / "ct"
    ct.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(ct / "slice.dcm", enforce_file_format=True)
    assert _napari_io.get_reader(str(ct)) is None
    with pytest.raises(ImageIOError, match="not a DICOM whole-slide image"):
        open_image(ct / "slice.dcm")


@needs_svs
def test_slide_levels_index_like_numpy_arrays(dicom_slide):
    # direct indexing of a level (steps, integers, open or clipped bounds, a channel) gives
    # what numpy gives on the same pixels
    pytest.importorskip("openslide", reason="the openslide extra")
    from napari_xt.io.dicom_reader import _Level as DicomLevel
    from napari_xt.io.openslide_reader import open_openslide

    want = np.asarray(open_image(SVS).levels[0])
    slide = open_openslide(SVS).resources[0]
    import threading

    from napari_xt.io.openslide_reader import _Level as SlideLevel

    levels = [SlideLevel(slide, 0, (255, 255, 255), threading.Lock())]
    wsi = open_image(dicom_slide).resources[0]
    levels.append(DicomLevel(wsi, wsi.levels[0], threading.Lock(), [("0", 3)], np.uint8))
    keys = [(slice(10, 50, 3), slice(None, 40), 1), (5, slice(2900, None)),
            (slice(2960, 4000), slice(-20, None)), (slice(100, 90), slice(0, 10)),
            (-1, -1)]
    for level in levels:
        for key in keys:
            np.testing.assert_array_equal(level[key], want[key], err_msg=str(key))


@pytest.mark.gui
def test_file_open_in_napari_shows_a_dicom_slide_and_its_pictures(make_napari_viewer,
                                                                  dicom_slide):
    # what a user gets from File > Open: the slide at its physical pixel size, with its label
    # and overview as hidden layers beside it (not over it)
    viewer = make_napari_viewer()
    layers = viewer.open(str(dicom_slide), plugin="napari-xt")
    slide, *pictures = layers
    assert slide.rgb and slide.data.shape == (2967, 2220, 3)
    assert tuple(slide.scale) == pytest.approx((0.499, 0.499))
    np.testing.assert_array_equal(np.asarray(slide.data[100:164, 200:264]),
                                  np.asarray(open_image(SVS).levels[0][100:164, 200:264]))
    assert {p.metadata["associated"] for p in pictures} == {"label", "overview"}
    assert all(not p.visible for p in pictures)
    right_of_slide = slide.extent.world[1][1]
    assert all(p.extent.world[0][1] > right_of_slide for p in pictures)
    viewer.reset_view()
