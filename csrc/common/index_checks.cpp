#include "common/index_checks.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace sagellm {
namespace {

bool from_env() {
  const char* v = std::getenv("SAGELLM_CUDA_CHECK_INDICES");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}

std::atomic<bool>& flag() {
  static std::atomic<bool> on{from_env()};
  return on;
}

}  // namespace

bool cuda_index_checks_enabled() { return flag().load(std::memory_order_relaxed); }
void set_cuda_index_checks(bool on) { flag().store(on, std::memory_order_relaxed); }

}  // namespace sagellm
