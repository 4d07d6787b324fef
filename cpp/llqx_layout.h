// layout of the file llama_model_quantize writes: its metadata size, computed with gguf's own writer
#pragma once

#include "llqx_error.h"
#include "llqx_quantize.h"

#include <cstdint>
#include <string>
#include <vector>

// bytes of the metadata (header, key/values, tensor infos, padding) that llama_model_quantize writes for
// the model at path with the given metadata overrides; tensor types do not change it. -1 with err set.
int64_t llqx_layout_meta_size(const std::string & path, const std::vector<llqx_kv_override> & kv_overrides,
                              int32_t ftype, llqx_error & err);
