// how a core function failed: a status saying what kind of failure it was (the Python binding raises
// one exception class per status) and a message for people
#pragma once

#include <cstdint>
#include <string>

enum llqx_status : int32_t {
    LLQX_STATUS_OK    = 0,
    LLQX_STATUS_INPUT = 1, // bad arguments from the caller
    LLQX_STATUS_LOAD  = 2, // a model or file that cannot be read or loaded
    LLQX_STATUS_CORE  = 3, // llama.cpp or ggml failed while running
};

// filled by a core function that fails (returns false, -1 or nullptr); untouched on success
struct llqx_error {
    int32_t     status = LLQX_STATUS_OK;
    std::string msg;
};
