#include "llqx_score_sample.h"

#include <algorithm>
#include <cmath>
#include <utility>

static uint64_t splitmix64(uint64_t & state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t name_hash(const std::string & name, int32_t expert) {
    uint64_t h = 0xcbf29ce484222325ULL; // FNV-1a
    for (unsigned char c : name) {
        h = (h ^ c) * 0x100000001b3ULL;
    }
    return h ^ ((uint64_t) (uint32_t) expert * 0x9e3779b97f4a7c15ULL);
}

void llqx_score_sample_rows(const std::string & name, int32_t expert, const std::vector<double> & energy,
                            int64_t n_sample, std::vector<int64_t> & rows, std::vector<double> & scales) {
    rows.clear();
    scales.clear();
    const int64_t n_rows = (int64_t) energy.size();
    if (n_rows <= 0 || n_sample <= 0) {
        return;
    }
    if (n_sample >= n_rows) {
        for (int64_t i = 0; i < n_rows; ++i) {
            rows.push_back(i);
            scales.push_back(1.0);
        }
        return;
    }
    // rows taken for certain, largest first: while one row alone holds at least the energy one sample of
    // the rest stands for (a massive-activation row: missed, or counted many times over, by an even spacing)
    std::vector<int64_t> order((size_t) n_rows);
    for (int64_t i = 0; i < n_rows; ++i) {
        order[(size_t) i] = i;
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return energy[(size_t) a] > energy[(size_t) b]; });
    double total = 0.0;
    for (int64_t i = 0; i < n_rows; ++i) {
        total += energy[(size_t) i];
    }
    std::vector<uint8_t> certain((size_t) n_rows, 0);
    int64_t n_certain = 0;
    double  rest      = total;
    while (n_certain < n_sample) {
        const int64_t r = order[(size_t) n_certain];
        if (!(rest > 0.0) || energy[(size_t) r] * (double) (n_sample - n_certain) < rest) {
            break;
        }
        certain[(size_t) r] = 1;
        rest -= energy[(size_t) r];
        ++n_certain;
    }
    // the other rows, evenly spaced in file order with a random phase, each standing for its share of them:
    // a row's quantization error follows its energy only loosely (relative errors of one type differ by
    // 50x between rows of one tensor), so drawing by energy would not help with them
    std::vector<std::pair<int64_t, double>> picked;
    std::vector<int64_t> other;
    other.reserve((size_t) (n_rows - n_certain));
    for (int64_t i = 0; i < n_rows; ++i) {
        if (certain[(size_t) i]) {
            picked.push_back({ i, 1.0 });
        } else {
            other.push_back(i);
        }
    }
    const int64_t n_draw  = n_sample - n_certain;
    const int64_t n_other = (int64_t) other.size();
    if (n_draw > 0) {
        uint64_t state = name_hash(name, expert);
        const double phase  = (double) (splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
        const double stride = (double) n_other / (double) n_draw;
        for (int64_t k = 0; k < n_draw; ++k) {
            const int64_t i = std::min((int64_t) std::floor((phase + (double) k) * stride), n_other - 1);
            picked.push_back({ other[(size_t) i], stride });
        }
    }
    std::sort(picked.begin(), picked.end());
    for (const auto & p : picked) {
        rows.push_back(p.first);
        scales.push_back(p.second);
    }
}
