#include "llqx_llama.h"

#include "llama.h"

#include <limits>
#include <mutex>

void llqx_backend_init(void) {
    static std::once_flag once;
    std::call_once(once, [] { llama_backend_init(); });
}

static llama_model * model_load(const std::string & path, const llama_model_params & mp, llqx_error & err) {
    llqx_backend_init();
    llama_model * model = llama_model_load_from_file(path.c_str(), mp);
    if (model == nullptr) {
        err = { LLQX_STATUS_LOAD, "failed to load model " + path };
    }
    return model;
}

llama_model * llqx_model_load(const std::string & path, int32_t n_gpu_layers, bool use_extra_bufts, bool vocab_only,
                              llqx_error & err) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers    = n_gpu_layers;
    mp.use_extra_bufts = use_extra_bufts;
    mp.vocab_only      = vocab_only;
    return model_load(path, mp, err);
}

llama_model * llqx_model_load_writable(const std::string & path, int32_t n_gpu_layers, llqx_error & err) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers    = n_gpu_layers;
    mp.use_extra_bufts = false;
    mp.load_mode       = LLAMA_LOAD_MODE_NONE;
    mp.lazy_mode       = LLAMA_LAZY_MODE_OFF;
    return model_load(path, mp, err);
}

bool llqx_vocab_tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special,
                         std::vector<int32_t> & tokens, llqx_error & err) {
    // a first guess of one token per byte (and BOS/EOS), then the size llama_tokenize asks for
    if (text.size() > size_t(std::numeric_limits<int32_t>::max()) - 2) {
        err = { LLQX_STATUS_INPUT, "text too large to tokenize" };
        return false;
    }
    tokens.resize(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(),
                               add_special, parse_special);
    if (n == std::numeric_limits<int32_t>::min()) {
        err = { LLQX_STATUS_INPUT, "tokenization failed: too many tokens" };
        return false;
    }
    if (n < 0) {
        tokens.resize(-n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), tokens.data(), (int32_t) tokens.size(),
                           add_special, parse_special);
        if (n < 0) {
            err = { LLQX_STATUS_CORE, "tokenization failed" };
            return false;
        }
    }
    tokens.resize(n);
    return true;
}
