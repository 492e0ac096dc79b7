"""meunet: memory-efficient segmentation of very large volumetric microCT images.

Arrays are (z, y, x) everywhere; tensors are (N, C, Z, Y, X).
"""

__version__ = "0.1.0"
