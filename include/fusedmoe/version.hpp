#pragma once
#define FUSEDMOE_VERSION "0.1.0"
namespace fusedmoe {
inline const char* version() { return FUSEDMOE_VERSION; }
}  // namespace fusedmoe
