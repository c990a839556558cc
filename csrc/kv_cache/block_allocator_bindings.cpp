#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kv_cache/block_allocator.h"
#include "kv_cache/no_free_blocks.h"

namespace py = pybind11;

namespace sagellm {

void bind_block_allocator(py::module_& m) {
  py::register_exception<NoFreeBlocks>(m, "NoFreeBlocksError", PyExc_RuntimeError);

  py::class_<BlockAllocator>(m, "BlockAllocator", R"doc(
Fixed pool of KV cache blocks with reference counts and content-hash prefix reuse (O(1) ops).

States: free (ref 0, unhashed), used (ref >= 1), cached (ref 0, hashed: reusable through
lookup() until evicted, least recently freed first, by allocate()).
)doc")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def("allocate", &BlockAllocator::allocate,
           "A block for new content (ref 1); evicts the LRU cached block if none is free. "
           "Raises NoFreeBlocksError when all blocks are in use.")
      .def("allocate_n", &BlockAllocator::allocate_n, py::arg("n"),
           "n blocks, all or nothing.")
      .def("free", &BlockAllocator::free, py::arg("block"),
           "Drop one reference; at zero the block becomes cached (if hashed) or free.")
      .def("free_n", &BlockAllocator::free_n, py::arg("blocks"))
      .def("incref", &BlockAllocator::incref, py::arg("block"),
           "Add a reference to a used block.")
      .def("lookup", &BlockAllocator::lookup, py::arg("hash"),
           "The block with this content hash, with one more reference (revived if cached), "
           "or -1. Counts a hit or a miss.")
      .def("peek", &BlockAllocator::peek, py::arg("hash"),
           "Like lookup() without taking a reference or counting.")
      .def("set_hash", &BlockAllocator::set_hash, py::arg("block"), py::arg("hash"),
           "Register a used, full block's content hash; False if another block holds it.")
      .def_static("hash_block", &BlockAllocator::hash_block, py::arg("parent_hash"),
                  py::arg("token_ids"), "Content hash of a full block: (parent hash, token ids).")
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_free", &BlockAllocator::num_free,
                             "Free plus cached (evictable) blocks.")
      .def_property_readonly("num_cached", &BlockAllocator::num_cached)
      .def_property_readonly("num_used", &BlockAllocator::num_used)
      .def_property_readonly("hits", &BlockAllocator::hits)
      .def_property_readonly("misses", &BlockAllocator::misses)
      .def_property_readonly("evictions", &BlockAllocator::evictions)
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block"))
      .def("is_hashed", &BlockAllocator::is_hashed, py::arg("block"))
      .def("reset_counters", &BlockAllocator::reset_counters)
      .def("clear_cache", &BlockAllocator::clear_cache,
           "Forget every cached block; used blocks are untouched.");
}

}  // namespace sagellm
