"""The README's Python example: load a trained model with the one loader and predict a GeoTIFF
with segclip_d2.geo.outputs.predict_file."""

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")


def test_predict_file_writes_a_georeferenced_class_map_equal_to_the_predictor(
    tmp_path, tiny_config, write_geotiff
):
    import torch

    from segclip_d2.geo.outputs import predict_file
    from segclip_d2.predict.load import build_predictor, load_model
    from segclip_d2.raster.sources import open_source

    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    _, model = load_model(config, allow_random_weights=True, optimize=False)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    scene = tmp_path / "scene.tif"
    transform = write_geotiff(scene, height=100, width=90, nodata_rows=10)

    predictor = build_predictor(config, weights, precision="fp32")
    outputs = predict_file(predictor, scene, tmp_path / "out")

    assert outputs[0] == tmp_path / "out" / "scene_pred.tif"
    assert all(p.is_file() for p in outputs)
    with rasterio.open(outputs[0]) as ds:
        ids = ds.read(1)
        assert ds.transform == transform and ds.crs.to_epsg() == 32633 and ids.shape == (100, 90)
    assert (ids[:10] == 255).all()  # the no-data strip
    # one block covers the scene: the file holds the predictor's own answer for its pixels
    src = open_source(scene)
    rgb, valid = src.read(0, 0, 100, 90)
    src.close()
    expected, _ = predictor(rgb, valid)
    assert np.array_equal(ids[10:], expected[10:])
    assert set(np.unique(ids[10:])) <= set(range(len(predictor.class_names)))
