#pragma once

#include <stdexcept>
#include <string>

namespace fusedmoe {

// Every error fusedmoe reports. The message names the offending argument and what was expected.
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument("fusedmoe: " + what) {}
};

}  // namespace fusedmoe
