// Statistics kernels for the baseline instruction set of the build (SSE2 on x86-64).
#define MINIGPT_ISA base
#include "kernels_impl.h"
