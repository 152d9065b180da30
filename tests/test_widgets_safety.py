"""The "Run xT" widget never loses what the user had and never hangs: foreign folders and
the input survive a run with "resume" unticked, a napari-xt store is replaced only after
the user confirmed, the unticked box is not saved, a checkpoint the loader refuses (or any
error in a worker) returns the widget to a clean state with an error notification."""

import json

import numpy as np
import pytest
from test_widgets_run import checkpoint, docked, scene, wait_done  # noqa: F401

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_XT_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    return shown


@pytest.fixture
def questions(monkeypatch):
    """Answers to `confirm_replace` (in order) and the questions asked."""
    from napari_xt.widgets import run_widget

    asked, answers = [], []

    def confirm(parent, path, kind):
        asked.append((str(path), kind))
        return answers.pop(0)

    monkeypatch.setattr(run_widget, "confirm_replace", confirm)
    return asked, answers


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_unticked_resume_never_touches_a_foreign_folder(make_napari_viewer, qtbot, tmp_path,
                                                        checkpoint, errors,  # noqa: F811
                                                        questions):
    asked, _ = questions
    viewer, widget = docked(make_napari_viewer, scene(128))
    widget.set_checkpoint(checkpoint)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    (mine / "sub" / "data.npy").write_bytes(b"\x93NUMPY")
    before = _tree(mine)
    widget.store_edit.setText(str(mine))
    widget.resume_check.setChecked(False)
    widget.start()
    assert wait_done(qtbot, widget).outcome == "failed"
    assert _tree(mine) == before  # not a byte changed, nothing added
    assert not asked  # never offered to replace what napari-xt did not write
    assert len(errors) == 1 and "is not a napari-xt result store" in errors[0]
    assert "\n" not in errors[0] and "choose another output store in Run xT" in errors[0]
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not [lay for lay in viewer.layers if "xT" in lay.name]


def test_a_napari_xt_store_is_replaced_only_after_confirmation(make_napari_viewer, qtbot,
                                                               tmp_path, checkpoint,  # noqa: F811
                                                               errors, questions):
    import zarr

    from napari_xt.io import read_labels

    asked, answers = questions
    viewer, widget = docked(make_napari_viewer, scene(128))
    widget.set_checkpoint(checkpoint)
    store = tmp_path / "run.xt.zarr"
    widget.store_edit.setText(str(store))
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    assert not asked  # a new store: nothing to ask
    first = np.asarray(read_labels(store, "prediction").levels[0])
    created = zarr.open_group(str(store), mode="r").attrs["napari-xt"]["created"]
    (store / "notes.txt").write_text("mine, inside the store")  # not napari-xt's

    widget.resume_check.setChecked(False)
    answers.append(False)  # "No": nothing happens
    assert widget.start() is None and not widget.running
    assert asked == [(str(store), "store")]
    assert zarr.open_group(str(store), mode="r").attrs["napari-xt"]["created"] == created
    assert "kept as it is" in widget.status.text()

    answers.append(True)  # "Yes": a fresh run replaces what napari-xt wrote, only that
    widget.start()
    assert wait_done(qtbot, widget).outcome == "finished"
    assert len(asked) == 2
    assert zarr.open_group(str(store), mode="r").attrs["napari-xt"]["created"] != created
    assert np.array_equal(np.asarray(read_labels(store, "prediction").levels[0]), first)
    assert (store / "notes.txt").read_text() == "mine, inside the store"
    assert not errors
    # the unticked box is not saved: the next widget starts with resume on
    saved = json.loads((tmp_path / "config" / "widgets.json").read_text())["run"]
    assert "resume" not in saved
    _, again = docked(make_napari_viewer, scene(128))
    assert again.resume_check.isChecked()


def test_an_old_unticked_setting_is_not_restored(make_napari_viewer, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "widgets.json").write_text(json.dumps({"run": {"resume": False,
                                                             "device": "cpu"}}))
    _, widget = docked(make_napari_viewer, scene(128))
    assert widget.resume_check.isChecked()


def test_the_input_image_is_never_the_output(make_napari_viewer, qtbot, tmp_path, errors,
                                             questions):
    """A napari-xt store opened as the input (its preview image) and chosen as the output
    with resume unticked: the store refuses before anything is removed."""
    from napari_xt.engine import run
    from napari_xt.model.choice import load_model

    asked, answers = questions
    model, _, _ = load_model("xt_tiny_demo_seg", in_chans=1)
    store = tmp_path / "earlier.xt.zarr"
    for _ in run(scene(256)[0], model, store, device="cpu"):
        pass
    before = _tree(store)
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="napari-xt")
    from napari_xt.widgets.run_widget import RunWidget

    widget = RunWidget(viewer)
    widget.select_image(layers[0].name)
    assert widget.current_image().source_path() == str(store)
    widget.model_combo.setCurrentText("xt_tiny_demo_seg")
    widget.device_combo.setCurrentText("cpu")
    assert widget.store_edit.text() != str(store)  # the default is never the input
    widget.store_edit.setText(str(store))
    widget.resume_check.setChecked(False)
    answers.append(True)  # even a careless "Yes"
    widget.start()
    assert wait_done(qtbot, widget).outcome == "failed"
    assert asked and errors and "never writes into its input" in errors[0]
    assert _tree(store) == before


def test_a_corrupt_checkpoint_returns_the_widget_to_a_clean_state(make_napari_viewer, qtbot,
                                                                  tmp_path, errors):
    from napari_xt.widgets.models import DEMO_MODEL

    viewer, widget = docked(make_napari_viewer, scene(128))
    bad = tmp_path / "broken.pth"  # what the file dialog offers, refused by the loader
    bad.write_bytes(b"\x80\x02not a checkpoint" * 8)
    widget.set_checkpoint(str(bad))
    widget.store_edit.setText(str(tmp_path / "out.zarr"))
    session = widget.start()
    assert session is not None and widget.cancel_button.isEnabled()
    session = wait_done(qtbot, widget, timeout=15000)  # a hang fails here
    assert session.outcome == "failed"
    assert len(errors) == 1 and "broken.pth" in errors[0] and "\n" not in errors[0]
    assert "failed" in widget.status.text() and "removed from the model list" in \
        widget.status.text()
    assert widget.model_combo.findText(str(bad)) < 0  # not offered again
    assert widget.model_combo.currentText() == DEMO_MODEL
    saved = json.loads((tmp_path / "config" / "widgets.json").read_text())["run"]
    assert str(bad) not in saved["checkpoints"] and saved["model"] == DEMO_MODEL
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.model_combo.isEnabled() and widget.store_edit.isEnabled()
    assert not (tmp_path / "out.zarr").exists()
    assert not [lay for lay in viewer.layers if "xT" in lay.name]


def test_every_worker_error_reaches_the_widget(make_napari_viewer, qtbot, tmp_path, errors,
                                               monkeypatch):
    """A RuntimeError in the worker (superqt's generator workers drop those) after the
    model loaded: notified, the widget is clean, and the next run works."""
    def explode(*args, **kwargs):
        raise RuntimeError("the device went away")

    viewer, widget = docked(make_napari_viewer, scene(128))
    widget.model_combo.setCurrentText("xt_tiny_demo_seg")  # zoo model, built for 2 channels
    widget.store_edit.setText(str(tmp_path / "out.zarr"))
    with monkeypatch.context() as patch:
        import importlib

        patch.setattr(importlib.import_module("napari_xt.engine.run"), "run", explode)
        widget.start()
        session = wait_done(qtbot, widget, timeout=15000)
    assert session.outcome == "failed" and session.model is not None
    assert errors == ["Run xT failed: RuntimeError: the device went away"]
    assert widget.model_combo.currentText() == "xt_tiny_demo_seg"  # a zoo model stays
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    widget.start()  # the real engine again
    assert wait_done(qtbot, widget).outcome == "finished"


def test_guarded_workers_hand_on_runtime_errors(qtbot):
    from napari_xt.widgets.workers import WorkerError, describe, start_worker

    def gen():
        yield 1
        raise RuntimeError("inside a generator")

    worker = start_worker(gen)
    seen = {"errored": [], "yielded": [], "finished": False}
    worker.errored.connect(seen["errored"].append)
    worker.yielded.connect(seen["yielded"].append)
    worker.finished.connect(lambda: seen.update(finished=True))
    with qtbot.waitSignal(worker.finished, timeout=5000):
        worker.start()
    assert seen["yielded"] == [1] and seen["finished"]
    (err,) = seen["errored"]
    assert isinstance(err, WorkerError) and isinstance(err.error, RuntimeError)
    assert describe(err) == "RuntimeError: inside a generator"
    assert describe(ValueError("bad input\nmore")) == "bad input"
