"""glibc's allocator settings for every ``meunet`` process (docs/inference.md, "The allocator").

Blocks of 1 MiB and more (every activation map of a 3D network) are mapped on allocation and returned to the
system when freed, so the peak memory of a forward pass no longer depends on how the heap happens to be
fragmented (with two torch threads it varied by +-60 MiB from pass to pass); the heap and those blocks use
transparent huge pages where the kernel allows it (mode "madvise"), which more than pays for the mapping in
prediction (CPU training of small patches gets 4 to 13 % slower: docs/demo.md). The variable is read only
when a process starts, so ``meunet.cli.main`` starts the program again with it, and ``local:N`` Dask
clusters start their workers with it.
"""

import os
import platform
import sys
from pathlib import Path

GLIBC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def allocator_tunables() -> str | None:
    """The ``GLIBC_TUNABLES`` meunet's processes should run with: the environment's own value where it is set
    (even to nothing); else :data:`GLIBC_TUNABLES` on Linux with glibc where transparent huge pages are not
    switched off (without them the 1 MiB mmap threshold costs about 30 % of the speed); else None."""
    if "GLIBC_TUNABLES" in os.environ:
        return os.environ["GLIBC_TUNABLES"]
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        huge_pages = "[never]" not in THP_SETTING.read_text()
    except OSError:
        huge_pages = False
    return GLIBC_TUNABLES if huge_pages else None
