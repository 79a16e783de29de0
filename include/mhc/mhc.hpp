// mhc.hpp: every CPU header of mhc (the CUDA headers live in mhc/cuda/ and are included apart).
#pragma once

#include "mhc/config.hpp"
#include "mhc/types.hpp"
#include "mhc/sinkhorn.hpp"
#include "mhc/coefficients.hpp"
#include "mhc/mixing.hpp"
#include "mhc/variants.hpp"
#include "mhc/streams.hpp"
#include "mhc/diagnostics.hpp"
#include "mhc/block.hpp"
#include "mhc/stack.hpp"
