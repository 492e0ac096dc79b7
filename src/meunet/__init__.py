"""meunet: memory-efficient segmentation of very large volumetric microCT images.

Arrays are (z, y, x) everywhere; tensors are (N, C, Z, Y, X).
"""

__version__ = "0.1.0"

# glibc's allocator settings for every ``meunet`` process (docs/inference.md, "The allocator"): blocks of
# 1 MiB and more (every activation map of a 3D network) are mapped on allocation and returned to the system
# when freed, so the peak memory of a forward pass no longer depends on how the heap happens to be fragmented
# (with two torch threads it varied by +-60 MiB from pass to pass); the heap and those blocks use transparent
# huge pages where the kernel allows it (mode "madvise"), which more than pays for the mapping. The variable
# is read only when a process starts, so ``meunet.cli.main`` starts the program again with it, and
# ``local:N`` Dask clusters start their workers with it.
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"
