"""SegCLIP model parts: backbone, pixel decoder, transformer decoder and meta-architecture.

Importing this package registers them in their registries.
"""
