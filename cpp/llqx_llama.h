// the core's one way into llama.cpp: the backend set up once, models loaded, text tokenized
#pragma once

#include "llqx_error.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_model;
struct llama_vocab;

// llama_backend_init, once per process (any thread)
void llqx_backend_init(void);

// the model at path, or only its vocabulary; initializes the backend first. n_gpu_layers < 0: all
// (llama.cpp's default); use_extra_bufts: CPU extra buffer types (weight repacking, AMX).
// nullptr with err set when llama.cpp cannot load it; free it with llama_model_free
llama_model * llqx_model_load(const std::string & path, int32_t n_gpu_layers, bool use_extra_bufts, bool vocab_only,
                              llqx_error & err);

// as llqx_model_load, with the weights read into plain writable buffers (no mmap, no lazy reading, no
// repacking), so that ggml_backend_tensor_set can change them in place and they keep ggml's layout
llama_model * llqx_model_load_writable(const std::string & path, int32_t n_gpu_layers, llqx_error & err);

// llama_tokenize of the whole text (add_special: BOS/EOS as the vocabulary adds them; parse_special:
// special-token text becomes those tokens); false with err set on failure
bool llqx_vocab_tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special,
                         std::vector<int32_t> & tokens, llqx_error & err);
