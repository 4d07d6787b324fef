// routes llama.cpp's and ggml's log to one sink, so a host program can show or hide it
#pragma once

#include <cstdint>

// level: ggml_log_level (1 debug, 2 info, 3 warn, 4 error, 5 cont)
typedef void (*llqx_log_sink_t)(int32_t level, const char * text, void * user_data);

// nullptr silences the log; the sink may be called from any thread
void llqx_log_set(llqx_log_sink_t sink, void * user_data);
