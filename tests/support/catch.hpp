// Catch2 v2 / v3 compatibility: include this instead of a Catch2 header.
#pragma once
#if defined(MHC_CATCH2_V3)
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif
