#include "llqx_log.h"

#include "ggml.h"
#include "llama.h"

#include <atomic>

static std::atomic<llqx_log_sink_t> g_sink{nullptr};
static std::atomic<void *>          g_sink_user_data{nullptr};

static void log_forward(ggml_log_level level, const char * text, void * /*user_data*/) {
    llqx_log_sink_t sink = g_sink.load();
    if (sink != nullptr) {
        sink((int32_t) level, text, g_sink_user_data.load());
    }
}

void llqx_log_set(llqx_log_sink_t sink, void * user_data) {
    g_sink_user_data.store(user_data);
    g_sink.store(sink);
    llama_log_set(log_forward, nullptr);
    ggml_log_set(log_forward, nullptr);
}
