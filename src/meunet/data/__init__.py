"""Patches and sampling: the patch grid, background rejection, lazy patch reading, intensity normalisation
and augmentation. Arrays are (z, y, x); tensors (N, C, Z, Y, X)."""
