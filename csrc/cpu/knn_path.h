// Which algorithm the CPU knn op uses for float Euclidean problems (knn.cpp): "auto" chooses, "tree" always walks
// the k-d tree, "amx" takes the AMX brute force wherever it can run (tests use it to compare the two exactly).
#pragma once

#include <cstdint>
#include <string>

namespace infofuse::cpu {

enum class KnnPath { kAuto, kTree, kAmx };

KnnPath knn_path();
void set_knn_path(const std::string& name);
// How many batch entries the AMX path has solved in this process (tests check that it ran).
int64_t knn_amx_problems();
// "available", or why the AMX path cannot run here.
std::string knn_amx_status();

}  // namespace infofuse::cpu
