"""Raster sources and writers: PNG/JPEG/GeoTIFF reading in windows, GeoTIFF/COG writing. Imports
without torch."""
