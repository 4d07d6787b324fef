// the core's one parallel loop: independent work items spread over a few threads
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

// run fn(i) for i in [0, n) on n_threads threads; each i is independent, so results do not depend
// on the thread count
template <typename F>
void llqx_parallel_for(int32_t n, int32_t n_threads, F fn) {
    n_threads = std::max(1, std::min(n_threads, n));
    if (n_threads == 1) {
        for (int32_t i = 0; i < n; ++i) {
            fn(i);
        }
        return;
    }
    std::vector<std::thread> workers;
    workers.reserve(n_threads - 1);
    for (int32_t t = 1; t < n_threads; ++t) {
        workers.emplace_back([=, &fn] {
            for (int32_t i = t; i < n; i += n_threads) {
                fn(i);
            }
        });
    }
    for (int32_t i = 0; i < n; i += n_threads) {
        fn(i);
    }
    for (auto & w : workers) {
        w.join();
    }
}
