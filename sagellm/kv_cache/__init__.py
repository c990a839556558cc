"""The native KV block allocator (csrc/kv_cache/), re-exported for the runtime.

`BlockAllocator(num_blocks)`: a fixed pool with reference counts, content-hash prefix reuse and
LRU eviction of cached blocks; `NoFreeBlocksError` when every block is in use.
"""

from sagellm._C import BlockAllocator, NoFreeBlocksError

__all__ = ["BlockAllocator", "NoFreeBlocksError"]
