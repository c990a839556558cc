// Whether CUDA entry points check index *values* (block ids, seq_lens, slots, positions).
//
// On the CPU every entry point checks them, since the values are already in host memory. On CUDA
// the values live on the device: reading them costs a device-to-host copy and a synchronisation
// per call, which the engine cannot afford (and which is illegal inside CUDA-graph capture). So
// CUDA entries always check shapes, dtypes and devices, and check values only when this switch
// is on (tests and debugging: SAGELLM_CUDA_CHECK_INDICES=1 or
// sagellm.ops.set_cuda_index_checks(True)), and never while the stream is being captured.
#pragma once

namespace sagellm {

bool cuda_index_checks_enabled();
void set_cuda_index_checks(bool on);

}  // namespace sagellm
