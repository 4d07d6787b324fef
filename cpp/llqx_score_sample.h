// row sampling of the scoring pass: which rows of an expert slice are quantized to estimate its error
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// the rows sampled from one expert slice, given every row's expected squared output (energy): the largest
// rows always (while one holds at least the energy a sampled row of the rest stands for), the rest evenly
// spaced with a random phase (deterministic from name and expert). rows: sorted; scales: per row, the
// inverse of its inclusion probability (1 for a row always taken), so that a sum over the sampled rows times
// their scales estimates the sum over all rows without bias
void llqx_score_sample_rows(const std::string & name, int32_t expert, const std::vector<double> & energy,
                            int64_t n_sample, std::vector<int64_t> & rows, std::vector<double> & scales);
