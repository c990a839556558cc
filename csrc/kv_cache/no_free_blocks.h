#pragma once

#include <stdexcept>
#include <string>

namespace sagellm {

// Raised as sagellm._C.NoFreeBlocksError (a RuntimeError) in Python, so the scheduler can tell
// "out of KV blocks, preempt something" apart from a bug.
class NoFreeBlocks : public std::runtime_error {
 public:
  explicit NoFreeBlocks(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace sagellm
