"""The one mapping -> frozen dataclass reader (`napari_xt.model.fields`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from napari_xt.model.fields import check_fields, from_mapping


@dataclass(frozen=True)
class Inner:
    size: int = 1
    pair: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None
    sizes: list[int] = field(default_factory=list)
    maybe_sizes: list[int] | None = None
    nested: tuple[tuple[str, int], ...] = ()
    options: dict[str, object] = field(default_factory=dict)


def test_plain_fields_and_defaults():
    assert from_mapping(Outer, {}) == Outer()
    assert from_mapping(Outer, {"name": "y"}) == Outer(name="y")


def test_unknown_keys_list_them_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown Outer fields: \['bogus', 'zz'\]") as err:
        from_mapping(Outer, {"name": "y", "zz": 1, "bogus": 2})
    assert "known: ['extra', 'inner', 'maybe_sizes', 'name', 'nested', 'options', 'sizes']" in (
        str(err.value)
    )
    with pytest.raises(ValueError, match=r"^cfg: unknown keys \['bogus'\]; known: \['extra'"):
        from_mapping(Outer, {"bogus": 2}, "cfg")


def test_non_mapping_is_refused_naming_where_or_the_class():
    with pytest.raises(ValueError, match="^Outer: expected a mapping, got list"):
        from_mapping(Outer, [("name", "y")])
    with pytest.raises(ValueError, match="^cfg: expected a mapping, got str"):
        from_mapping(Outer, "name: y", "cfg")
    with pytest.raises(TypeError, match="needs a dataclass"):
        from_mapping(dict, {})


def test_nested_dataclasses_are_built_from_their_hint():
    got = from_mapping(Outer, {"inner": {"size": 3, "pair": [2, 5]}})
    assert got.inner == Inner(size=3, pair=(2, 5))
    assert isinstance(got.inner.pair, tuple)
    kept = Inner(size=7)
    assert from_mapping(Outer, {"inner": kept}).inner is kept


def test_nested_errors_name_the_class_or_the_path():
    with pytest.raises(ValueError, match=r"unknown Inner fields: \['sise'\]"):
        from_mapping(Outer, {"inner": {"sise": 3}})
    with pytest.raises(ValueError, match=r"^cfg\.inner: unknown keys \['sise'\]; known: "):
        from_mapping(Outer, {"inner": {"sise": 3}}, "cfg")
    with pytest.raises(ValueError, match="^cfg.inner: expected a mapping, got int"):
        from_mapping(Outer, {"inner": 3}, "cfg")
    with pytest.raises(ValueError, match="^Inner: expected a mapping, got NoneType"):
        from_mapping(Outer, {"inner": None})


def test_optional_nested_dataclass():
    assert from_mapping(Outer, {"extra": None}).extra is None
    assert from_mapping(Outer, {"extra": {"size": 4}}).extra == Inner(size=4)
    with pytest.raises(ValueError, match=r"^cfg\.extra: unknown keys \['x'\]"):
        from_mapping(Outer, {"extra": {"x": 1}}, "cfg")
    with pytest.raises(ValueError, match="^cfg.extra: expected a mapping, got list"):
        from_mapping(Outer, {"extra": [1]}, "cfg")


def test_none_is_empty_builds_defaults_of_non_optional_sections():
    got = from_mapping(Outer, {"inner": None, "extra": None}, "cfg", none_is_empty=True)
    assert got.inner == Inner() and got.extra is None


def test_lists_become_tuples_except_in_list_fields():
    got = from_mapping(Outer, {
        "sizes": [1, 2],
        "maybe_sizes": [3],
        "nested": [["a", 1], ["b", 2]],
        "options": {"k": [1, 2]},
    })
    assert got.sizes == [1, 2] and isinstance(got.sizes, list)
    assert got.maybe_sizes == [3] and isinstance(got.maybe_sizes, list)
    assert got.nested == (("a", 1), ("b", 2))
    assert got.options == {"k": [1, 2]}  # dict values are passed on unchanged


def test_json_roundtrip_gives_an_equal_config():
    cfg = Outer(name="z", inner=Inner(2, (3.0, 4.0)), extra=Inner(5), sizes=[1],
                nested=(("a", 1),), options={"k": 1})
    from dataclasses import asdict

    assert from_mapping(Outer, json.loads(json.dumps(asdict(cfg)))) == cfg


def test_check_fields():
    check_fields(Inner, ["size", "pair"])
    check_fields(Inner, {})
    with pytest.raises(ValueError, match=r"^unknown Inner fields: \['x'\]; known: \['pair', "):
        check_fields(Inner, {"x": 1, "size": 2})
    with pytest.raises(ValueError, match=r"^model\.head: unknown keys \['x'\]"):
        check_fields(Inner, ["x"], "model.head")


def test_project_readers_share_the_rules():
    from napari_xt.train.config import TrainConfig
    from napari_xt.train.synthetic import SceneConfig

    scene = SceneConfig.from_dict({"target_length": [3, 6]})
    assert scene.target_length == (3, 6)
    with pytest.raises(ValueError, match=r"unknown SceneConfig fields: \['hight'\]"):
        SceneConfig.from_dict({"hight": 3})
    with pytest.raises(ValueError, match=r"^config\.data\.scene: unknown keys \['hight'\]"):
        TrainConfig.from_dict({"data": {"scene": {"hight": 3}}})
    cfg = TrainConfig.from_dict({"run": None, "data": {"normalize": {"mean": [1, 2]},
                                                       "scene_sizes": [64]}})
    assert cfg.run == TrainConfig().run
    assert cfg.data.normalize.mean == (1, 2) and cfg.data.scene_sizes == [64]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
