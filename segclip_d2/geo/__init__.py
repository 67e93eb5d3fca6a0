"""GIS products of a prediction: GeoTIFF / COG class, probability and confidence rasters, polygons
(:mod:`.vectorize`), the ground-sample-distance policy (:mod:`.gsd`) and the run manifest. Imports
without torch (the ONNX path of the demo uses it)."""
