#include "kv_cache/block_allocator.h"

#include <stdexcept>
#include <string>

#include "kv_cache/no_free_blocks.h"

namespace sagellm {

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31), got " +
                                std::to_string(num_blocks));
  }
  ref_.assign(num_blocks, 0);
  hash_.assign(num_blocks, 0);
  hashed_.assign(num_blocks, 0);
  prev_.assign(num_blocks, -1);
  next_.assign(num_blocks, -1);
  free_stack_.reserve(num_blocks);
  // Pop order 0, 1, 2, ...: low block ids first, which keeps small tests readable.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_stack_.push_back(static_cast<int32_t>(b));
  by_hash_.reserve(static_cast<size_t>(num_blocks));
}

void BlockAllocator::check_block(int64_t block, const char* what) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::out_of_range(std::string(what) + ": block " + std::to_string(block) +
                            " is out of range [0, " + std::to_string(num_blocks()) + ")");
  }
}

void BlockAllocator::lru_unlink(int32_t b) {
  if (prev_[b] >= 0) next_[prev_[b]] = next_[b]; else lru_head_ = next_[b];
  if (next_[b] >= 0) prev_[next_[b]] = prev_[b]; else lru_tail_ = prev_[b];
  prev_[b] = next_[b] = -1;
  --num_cached_;
}

void BlockAllocator::lru_push_back(int32_t b) {
  prev_[b] = lru_tail_;
  next_[b] = -1;
  if (lru_tail_ >= 0) next_[lru_tail_] = b; else lru_head_ = b;
  lru_tail_ = b;
  ++num_cached_;
}

void BlockAllocator::forget_hash(int32_t b) {
  if (!hashed_[b]) return;
  by_hash_.erase(hash_[b]);
  hashed_[b] = 0;
  hash_[b] = 0;
}

int64_t BlockAllocator::allocate() {
  int32_t b;
  if (!free_stack_.empty()) {
    b = free_stack_.back();
    free_stack_.pop_back();
  } else if (lru_head_ >= 0) {
    b = lru_head_;
    lru_unlink(b);
    forget_hash(b);
    ++evictions_;
  } else {
    throw NoFreeBlocks("no free KV cache blocks: all " + std::to_string(num_blocks()) +
                       " blocks are in use");
  }
  ref_[b] = 1;
  return b;
}

std::vector<int64_t> BlockAllocator::allocate_n(int64_t n) {
  if (n < 0) throw std::invalid_argument("allocate_n: n must be >= 0, got " + std::to_string(n));
  if (n > num_free()) {
    throw NoFreeBlocks("cannot allocate " + std::to_string(n) + " KV cache blocks: only " +
                       std::to_string(num_free()) + " of " + std::to_string(num_blocks()) +
                       " are free");
  }
  std::vector<int64_t> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(allocate());
  return out;
}

void BlockAllocator::free(int64_t block) {
  check_block(block, "free");
  const int32_t b = static_cast<int32_t>(block);
  if (ref_[b] <= 0) {
    throw std::invalid_argument("double free: block " + std::to_string(block) +
                                " is not in use");
  }
  if (--ref_[b] > 0) return;
  if (hashed_[b]) {
    lru_push_back(b);
  } else {
    free_stack_.push_back(b);
  }
}

void BlockAllocator::free_n(const std::vector<int64_t>& blocks) {
  for (int64_t b : blocks) free(b);
}

void BlockAllocator::incref(int64_t block) {
  check_block(block, "incref");
  if (ref_[block] <= 0) {
    throw std::invalid_argument("incref: block " + std::to_string(block) + " is not in use");
  }
  ++ref_[block];
}

int64_t BlockAllocator::peek(uint64_t hash) const {
  auto it = by_hash_.find(hash);
  return it == by_hash_.end() ? -1 : it->second;
}

int64_t BlockAllocator::lookup(uint64_t hash) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) {
    ++misses_;
    return -1;
  }
  const int32_t b = it->second;
  if (ref_[b] == 0) lru_unlink(b);  // revive a cached block
  ++ref_[b];
  ++hits_;
  return b;
}

bool BlockAllocator::set_hash(int64_t block, uint64_t hash) {
  check_block(block, "set_hash");
  const int32_t b = static_cast<int32_t>(block);
  if (ref_[b] <= 0) {
    throw std::invalid_argument("set_hash: block " + std::to_string(block) + " is not in use");
  }
  if (hashed_[b]) {
    if (hash_[b] == hash) return true;
    throw std::invalid_argument("set_hash: block " + std::to_string(block) +
                                " already holds other content");
  }
  auto [it, inserted] = by_hash_.emplace(hash, b);
  if (!inserted) return it->second == b;
  hash_[b] = hash;
  hashed_[b] = 1;
  return true;
}

uint64_t BlockAllocator::hash_block(uint64_t parent_hash, const std::vector<int64_t>& token_ids) {
  // splitmix64 chained over (parent, n, tokens...): every input bit reaches every output bit,
  // and the length is mixed in so [a] and [a, 0] differ.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  uint64_t h = mix(parent_hash ^ 0x5a6e4c4c4d4b5631ull);
  h = mix(h ^ static_cast<uint64_t>(token_ids.size()));
  for (int64_t t : token_ids) h = mix(h ^ static_cast<uint64_t>(t));
  return h;
}

int32_t BlockAllocator::ref_count(int64_t block) const {
  check_block(block, "ref_count");
  return ref_[block];
}

bool BlockAllocator::is_hashed(int64_t block) const {
  check_block(block, "is_hashed");
  return hashed_[block] != 0;
}

void BlockAllocator::clear_cache() {
  while (lru_head_ >= 0) {
    const int32_t b = lru_head_;
    lru_unlink(b);
    forget_hash(b);
    free_stack_.push_back(b);
  }
}

}  // namespace sagellm
