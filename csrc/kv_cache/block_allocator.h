// The KV block allocator: a fixed pool of cache blocks with reference counts and content-hash
// prefix reuse. Every operation is O(1).
//
// A block is in one of three states:
//   free    — ref count 0, no content hash, on the free stack;
//   used    — ref count >= 1 (shared prefixes hold one reference per sequence);
//   cached  — ref count 0 but carrying a content hash: its K/V are still valid, so a later
//             lookup() of the same hash revives it; it sits on an LRU list and is evicted
//             (its hash forgotten) only when allocate() finds no free block.
// The content hash of a full block is hash_block(parent_hash, token_ids): identical prefixes
// give identical hash chains, hence the same blocks.
//
// Not thread-safe by itself; the Python binding holds the GIL for every call.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace pybind11 {
class module_;
}

namespace sagellm {

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  // A block for new content (ref count 1). Takes a free block, else evicts the least recently
  // used cached block. Throws NoFreeBlocks when every block is in use.
  int64_t allocate();
  std::vector<int64_t> allocate_n(int64_t n);  // all or nothing
  // Drop one reference; at zero the block becomes cached (if hashed) or free.
  void free(int64_t block);
  void free_n(const std::vector<int64_t>& blocks);
  // Add a reference to a used block (a forked sequence sharing it).
  void incref(int64_t block);

  // The block holding this content, with one more reference (reviving it if cached); -1 if
  // none. Counts a hit or a miss.
  int64_t lookup(uint64_t hash);
  // Like lookup() but changes nothing and counts nothing.
  int64_t peek(uint64_t hash) const;
  // Record that a used block now holds full content with this hash. Returns false (and leaves
  // the block unhashed) when another block already holds the same content.
  bool set_hash(int64_t block, uint64_t hash);

  static uint64_t hash_block(uint64_t parent_hash, const std::vector<int64_t>& token_ids);

  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_stack_.size()) + num_cached_; }
  int64_t num_cached() const { return num_cached_; }
  int64_t num_used() const { return num_blocks() - num_free(); }
  int32_t ref_count(int64_t block) const;
  bool is_hashed(int64_t block) const;

  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }
  int64_t evictions() const { return evictions_; }
  void reset_counters() { hits_ = misses_ = evictions_ = 0; }
  // Forget every cached block (their content becomes unreachable); used blocks are untouched.
  void clear_cache();

 private:
  void check_block(int64_t block, const char* what) const;
  void lru_unlink(int32_t block);
  void lru_push_back(int32_t block);
  void forget_hash(int32_t block);

  std::vector<int32_t> ref_;
  std::vector<uint64_t> hash_;
  std::vector<uint8_t> hashed_;
  std::vector<int32_t> prev_, next_;  // LRU links of cached blocks (-1 = none)
  int32_t lru_head_ = -1, lru_tail_ = -1;
  int64_t num_cached_ = 0;
  std::vector<int32_t> free_stack_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

void bind_block_allocator(pybind11::module_& m);

}  // namespace sagellm
