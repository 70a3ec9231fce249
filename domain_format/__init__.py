"""Torch-free facts shared by the artifact format, the model family and serving.

The bottom layer of the project: it imports nothing of the project and never imports torch, so the
front-end processes (which do not load torch) and the artifact store can use it. Modules:
``kinds`` (the adapter kinds and their defaults) and ``preprocess`` (decode → 8-bit → resize → centre
crop, uint8 out).
"""
