// The switch byte, one per pooled element (docs/ops.md): bits 0-3 hold the row-major offset dy * pool + dx of
// the window's maximum, bit 7 the `a` switch (window maximum > 0), bits 4-6 are zero. The only C++/CUDA
// definition; the Python one is drmm_kernels/contract.py. Torch-free, so the .cu files include it too.
#pragma once

#include <cstdint>

namespace drmm {

constexpr uint8_t kOnBit = 0x80;
constexpr uint8_t kOffsetMask = 0x0F;

}  // namespace drmm
