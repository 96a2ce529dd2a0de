// Declarations of the C++ CPU kernels (csrc/cpu/*.cpp), registered in csrc/bindings.cpp.
#pragma once
#include <ATen/ATen.h>
