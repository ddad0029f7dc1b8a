"""QuPath GeoJSON and HoVer-Net JSON exports, checked with shapely on real labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import shape

from studio.data.crops import hgsc_nest_dataset
from studio.data.samples import PANNUKE_CLASSES
from studio.errors import InputError
from studio.export import (
    hovernet_json,
    mask_rings,
    nucleus_features,
    to_geojson,
    write_features,
    write_geojson,
    write_hovernet_json,
)
from studio.metrics import instance_centroids
from studio.report import CLASS_COLOURS


@pytest.fixture(scope="module")
def real_labels():
    s = hgsc_nest_dataset(256, 256, region=(256, 257, 256, 257)).read(0)
    return np.asarray(s.inst), np.asarray(s.cls)


def test_geojson_round_trip_with_shapely(real_labels):
    inst, cls = real_labels
    h, w = inst.shape
    ids = np.unique(inst)[1:]
    areas = np.bincount(inst.ravel())
    gj = json.loads(json.dumps(to_geojson(inst, cls)))  # JSON-serialisable as is
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == len(ids) > 20
    seen = set()
    for f in feats:
        assert f["type"] == "Feature" and f["properties"]["objectType"] == "detection"
        geom = shape(f["geometry"])
        assert geom.is_valid and not geom.is_empty
        nid = f["properties"]["measurements"]["nucleus_id"]
        seen.add(nid)
        assert abs(geom.area - areas[nid]) <= 0.15 * areas[nid], (nid, geom.area, areas[nid])
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= w and maxy <= h
        code = int(cls[inst == nid][0])
        assert f["properties"]["classification"] == {"name": PANNUKE_CLASSES[code],
                                                     "color": list(CLASS_COLOURS[code])}
        # the polygon covers the nucleus: its pixel centres lie inside
        ys, xs = np.nonzero(inst == nid)
        inside = np.mean([geom.buffer(0.3).contains(shape({"type": "Point", "coordinates": [x + 0.5, y + 0.5]}))
                          for y, x in zip(ys[::7], xs[::7], strict=True)])
        assert inside > 0.95
    assert seen == set(ids.tolist())


def test_exact_outline_offset_and_scale():
    inst = np.zeros((10, 12), np.int32)
    inst[2:5, 3:9] = 4  # a 3x6 rectangle
    (f,) = to_geojson(inst, simplify=0.0)["features"]
    assert "classification" not in f["properties"]  # class 0 = unknown
    geom = shape(f["geometry"])
    assert geom.bounds == (3.0, 2.0, 9.0, 5.0)
    assert abs(geom.area - 18) < 0.2  # four 1/32 px corner chamfers
    ring = np.array(f["geometry"]["coordinates"][0])
    x, y = ring[:, 0], ring[:, 1]
    assert np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) > 0  # exterior counter-clockwise
    (g,) = to_geojson(inst, offset=(1000, 2000), scale=2.0)["features"]
    assert shape(g["geometry"]).bounds == (1006.0, 2004.0, 1018.0, 2010.0)


def test_split_nucleus_and_hole():
    inst = np.zeros((20, 20), np.int32)
    inst[2:10, 2:10] = 1
    inst[5:7, 5:7] = 0  # a hole
    inst[12:15, 12:15] = 1  # a second piece of the same nucleus
    inst[15, 2] = 2
    cls = np.where(inst == 1, 3, np.where(inst == 2, 1, 0))
    feats = {f["properties"]["measurements"]["nucleus_id"]: f for f in to_geojson(inst, cls)["features"]}
    multi = feats[1]["geometry"]
    assert multi["type"] == "MultiPolygon" and len(multi["coordinates"]) == 2
    assert len(multi["coordinates"][0]) == 2  # the larger piece first, with its hole
    geom = shape(multi)
    assert geom.is_valid and abs(geom.area - (64 - 4 + 9)) < 1.0
    single = shape(feats[2]["geometry"])
    assert feats[2]["geometry"]["type"] == "Polygon" and single.is_valid and single.area > 0.8
    assert len(mask_rings(np.zeros((3, 3), bool))) == 0


def test_geojson_errors():
    inst = np.zeros((6, 6), np.int32)
    inst[1:3, 1:3] = 1
    with pytest.raises(InputError, match="class 7"):
        to_geojson(inst, np.where(inst > 0, 7, 0))
    with pytest.raises(InputError, match="several classes"):
        to_geojson(inst, np.where(inst > 0, np.arange(36).reshape(6, 6) % 2 + 1, 0))


def test_written_files_parse(tmp_path, real_labels):
    inst, cls = real_labels
    path = write_geojson(tmp_path / "out" / "tile.geojson", to_geojson(inst, cls))
    streamed = tmp_path / "streamed.geojson"
    n = write_features(streamed, nucleus_features(inst, cls))
    a, b = json.loads(path.read_text()), json.loads(streamed.read_text())
    assert n == len(a["features"]) == len(b["features"])
    assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
    assert not list(tmp_path.rglob("*.tmp"))


def test_hovernet_json(tmp_path, real_labels):
    inst, cls = real_labels
    probs = {int(i): 0.5 + 0.001 * int(i) for i in np.unique(inst)[1:]}
    data = hovernet_json(inst, cls, type_prob=probs, mag=20)
    ids, centroids = instance_centroids(inst)
    assert data["mag"] == 20 and len(data["nuc"]) == len(ids)
    for i, (cy, cx) in zip(ids.tolist(), centroids, strict=True):
        nuc = data["nuc"][str(i)]
        assert np.hypot(nuc["centroid"][0] - cx, nuc["centroid"][1] - cy) < 1.0
        ys, xs = np.nonzero(inst == i)
        assert nuc["bbox"] == [[ys.min(), xs.min()], [ys.max() + 1, xs.max() + 1]]
        assert nuc["type"] == int(cls[ys[0], xs[0]]) and nuc["type_prob"] == round(probs[i], 4)
        contour = np.array(nuc["contour"])
        # pixel-centre coordinates: the contour stays within half a pixel of the nucleus' box
        assert contour[:, 0].min() >= xs.min() - 0.5 and contour[:, 0].max() <= xs.max() + 0.5
        assert contour[:, 1].min() >= ys.min() - 0.5 and contour[:, 1].max() <= ys.max() + 0.5
    path = write_hovernet_json(tmp_path / "json" / "tile.json", inst, cls, mag=40)
    assert json.loads(path.read_text())["nuc"].keys() == data["nuc"].keys()
    assert hovernet_json(inst)["nuc"][str(ids[0])]["type"] == 0
