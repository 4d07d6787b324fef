#include "llqx_score.h"
#include "llqx_score_row.h"
#include "llqx_score_sample.h"

#include "ggml.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

// rows of one work item: a block never crosses an expert boundary
static const int64_t LLQX_SCORE_BLOCK_ELEMENTS = 32 * 1024;

// expert slice e of per-expert rows of n values (nullptr when v is empty): a metric's diagonal (n = ne0) or
// its directions (n = n_dir * ne0)
static const float * job_slice(const std::vector<float> & v, int64_t e, int64_t n) {
    return v.empty() ? nullptr : v.data() + (size_t) e * (size_t) n;
}

// the error metric's diagonal: the importance values unless the job gives its own
static const std::vector<float> & job_diagonal(const llqx_score_job & j) {
    return j.diagonal.empty() ? j.weights : j.diagonal;
}

namespace {

struct score_block {
    int32_t expert;
    int64_t first; // index into the tensor's sampled rows
    int64_t count;
};

struct score_item {
    int32_t job;
    int32_t cand;  // LLQX_SCORE_LOAD: read the tensor (its energies and sampled rows), no candidate
    int32_t block;
};

constexpr int32_t LLQX_SCORE_LOAD = -1;

struct score_tensor {
    std::vector<int64_t>     rows;         // sampled rows, global (expert * ne1 + row)
    std::vector<double>      row_scale;    // per sampled row: the rows of its slice it stands for (1 / inclusion)
    std::vector<int64_t>     expert_first; // ne2 + 1 offsets into rows
    std::vector<score_block> blocks;
    std::mutex               mutex;
    bool                     loaded = false;
    std::vector<float>       data;         // sampled rows as F32
    std::vector<double>      slice_energy; // per expert slice: expected squared output of all its rows
    std::vector<double>      slice_noise;  // n_noise * ne2: expected squared output of each input noise
    std::vector<double>      row_num;      // n_cand * rows.size(): expected squared output error
    int64_t                  remaining = 0;
};

struct mapped_file {
    void * addr = MAP_FAILED;
    size_t size = 0;
    ~mapped_file() {
        if (addr != MAP_FAILED) {
            munmap(addr, size);
        }
    }
};

} // namespace

int32_t llqx_score_run(const std::string & path, const std::vector<llqx_score_job> & jobs,
                       const llqx_score_params & params, std::vector<std::vector<double>> & errors,
                       llqx_score_done_t done, void * user_data, const std::atomic<bool> * cancel,
                       llqx_error & err) {
    errors.assign(jobs.size(), {});

    // validate everything before any work starts
    size_t max_qrow = 0;
    int64_t max_ne0 = 0;
    int64_t max_block_rows = 1;
    for (const auto & j : jobs) {
        const int64_t ne0 = j.ne[0];
        if (ne0 <= 0 || j.ne[1] <= 0 || j.ne[2] <= 0) {
            err = { LLQX_STATUS_INPUT, "invalid shape for " + j.name };
            return -1;
        }
        if (j.src_type < 0 || j.src_type >= GGML_TYPE_COUNT) {
            err = { LLQX_STATUS_INPUT, "invalid source type for " + j.name };
            return -1;
        }
        const ggml_type_traits * st = ggml_get_type_traits((ggml_type) j.src_type);
        if (j.src_type != GGML_TYPE_F32 && st->to_float == nullptr) {
            err = { LLQX_STATUS_INPUT,
                    std::string("cannot read ") + j.name + " of type " + ggml_type_name((ggml_type) j.src_type) };
            return -1;
        }
        if (ne0 % ggml_blck_size((ggml_type) j.src_type) != 0) {
            err = { LLQX_STATUS_INPUT, "row length does not fit the source type of " + j.name };
            return -1;
        }
        const size_t nw = (size_t) (j.ne[0] * j.ne[2]);
        if ((!j.weights.empty() && j.weights.size() != nw) || (!j.diagonal.empty() && j.diagonal.size() != nw) ||
            j.n_dir < 0 || j.directions.size() != nw * (size_t) j.n_dir) {
            err = { LLQX_STATUS_INPUT, "importance data of " + j.name + " does not match its shape" };
            return -1;
        }
        if ((!j.alt_diagonal.empty() && j.alt_diagonal.size() != nw) || j.alt_n_dir < 0 ||
            j.alt_directions.size() != nw * (size_t) j.alt_n_dir || (j.alt_diagonal.empty() && j.alt_n_dir > 0)) {
            err = { LLQX_STATUS_INPUT, "second error metric of " + j.name + " does not match its shape" };
            return -1;
        }
        if (j.n_noise < 0 || j.noise.size() != nw * (size_t) j.n_noise) {
            err = { LLQX_STATUS_INPUT, "input noise of " + j.name + " does not match its shape" };
            return -1;
        }
        for (int32_t t : j.candidates) {
            if (t < 0 || t >= GGML_TYPE_COUNT || ggml_get_type_traits((ggml_type) t)->to_float == nullptr ||
                ggml_blck_size((ggml_type) t) <= 0 || ne0 % ggml_blck_size((ggml_type) t) != 0) {
                err = { LLQX_STATUS_INPUT, "candidate type " + std::to_string(t) + " cannot hold " + j.name };
                return -1;
            }
            if (!ggml_is_quantized((ggml_type) t) && t != GGML_TYPE_F16 && t != GGML_TYPE_BF16 && t != GGML_TYPE_F32) {
                err = { LLQX_STATUS_INPUT, "candidate type " + std::to_string(t) + " cannot be quantized to" };
                return -1;
            }
            if (j.weights.empty() && ggml_quantize_requires_imatrix((ggml_type) t)) {
                err = { LLQX_STATUS_INPUT, std::string("candidate ") + ggml_type_name((ggml_type) t) + " of " + j.name +
                        " needs importance data" };
                return -1;
            }
            max_qrow = std::max(max_qrow, ggml_row_size((ggml_type) t, ne0));
        }
        max_ne0 = std::max(max_ne0, ne0);
        max_block_rows = std::max(max_block_rows, std::max<int64_t>(1, LLQX_SCORE_BLOCK_ELEMENTS / ne0));
    }

    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) {
        err = { LLQX_STATUS_LOAD, "cannot open " + path + ": " + std::strerror(errno) };
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        err = { LLQX_STATUS_LOAD, "cannot stat " + path };
        return -1;
    }
    mapped_file mf;
    mf.size = (size_t) sb.st_size;
    mf.addr = mf.size > 0 ? mmap(nullptr, mf.size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    close(fd);
    if (mf.addr == MAP_FAILED) {
        err = { LLQX_STATUS_LOAD, "cannot map " + path };
        return -1;
    }
    const uint8_t * base = (const uint8_t *) mf.addr;
    // each tensor is read whole once (the energy of every row), then its sampled rows; its pages are
    // dropped once it is scored
    const uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE);

    // sampling plan and the flat, ordered list of work items
    std::vector<std::unique_ptr<score_tensor>> tensors(jobs.size());
    std::vector<score_item> items;
    for (size_t ji = 0; ji < jobs.size(); ++ji) {
        const auto & j = jobs[ji];
        const size_t src_row = ggml_row_size((ggml_type) j.src_type, j.ne[0]);
        if (j.offset + src_row * (uint64_t) (j.ne[1] * j.ne[2]) > mf.size) {
            err = { LLQX_STATUS_LOAD, "tensor data of " + j.name + " lies beyond the end of " + path };
            return -1;
        }
        auto st = std::make_unique<score_tensor>();
        const int64_t n_sample   = j.sample_elements > 0 ? j.sample_elements : params.sample_elements;
        const int64_t per_expert = std::max<int64_t>(params.min_rows, (n_sample / j.ne[2] + j.ne[0] - 1) / j.ne[0]);
        const int64_t block_rows = std::max<int64_t>(1, LLQX_SCORE_BLOCK_ELEMENTS / j.ne[0]);
        // which rows depends on their energies, read when the tensor is loaded; how many is known now
        const int64_t n_rows = std::min(per_expert, j.ne[1]);
        st->expert_first.push_back(0);
        for (int32_t e = 0; e < (int32_t) j.ne[2]; ++e) {
            const int64_t first = st->expert_first.back();
            for (int64_t b = 0; b < n_rows; b += block_rows) {
                st->blocks.push_back({ e, first + b, std::min(block_rows, n_rows - b) });
            }
            st->expert_first.push_back(first + n_rows);
        }
        st->remaining = (int64_t) st->blocks.size() * (int64_t) j.candidates.size();
        tensors[ji] = std::move(st);
    }
    // a tensor is read by one thread, so the next tensor's read is queued before this one's candidates:
    // one thread reads ahead while the others quantize, instead of all of them waiting for the read
    auto push_load = [&](size_t ji) {
        if (ji < jobs.size() && tensors[ji]->remaining > 0) {
            items.push_back({ (int32_t) ji, LLQX_SCORE_LOAD, 0 });
        }
    };
    push_load(0);
    for (size_t ji = 0; ji < jobs.size(); ++ji) {
        push_load(ji + 1);
        for (int32_t b = 0; b < (int32_t) tensors[ji]->blocks.size(); ++b) {
            for (int32_t c = 0; c < (int32_t) jobs[ji].candidates.size(); ++c) {
                items.push_back({ (int32_t) ji, c, b });
            }
        }
    }

    // IQ grids once, up front, before any thread needs them
    for (const auto & j : jobs) {
        for (int32_t t : j.candidates) {
            ggml_quantize_init((ggml_type) t);
        }
    }

    std::atomic<size_t> next { 0 };
    std::atomic<bool>   stop { false };
    std::mutex          done_mutex;
    bool                stopped_by_callback = false;

    auto finish_job = [&](size_t ji) {
        const auto & j = jobs[ji];
        score_tensor & st = *tensors[ji];
        const size_t nr = st.rows.size();
        const size_t nc = j.candidates.size();
        const size_t ne2 = (size_t) j.ne[2];
        // per candidate and expert slice: the slice's summed squared output error, estimated from the
        // sampled rows, each standing for its share of the slice; then per slice its exact squared output
        const size_t nn = (size_t) j.n_noise;
        const size_t na = j.alt_diagonal.empty() ? 0 : nc;
        std::vector<double> out((nc + 1 + nn + na) * ne2, 0.0);
        for (size_t e = 0; e < ne2; ++e) {
            const int64_t a = st.expert_first[e];
            const int64_t b = st.expert_first[e + 1];
            for (size_t c = 0; c < nc + na; ++c) {
                double sum = 0.0;
                for (int64_t r = a; r < b; ++r) {
                    sum += st.row_num[c * nr + (size_t) r] * st.row_scale[(size_t) r];
                }
                // the second metric's errors follow the noise
                out[(c < nc ? c : c + 1 + nn) * ne2 + e] = sum;
            }
            out[nc * ne2 + e] = st.slice_energy[e];
            for (size_t i = 0; i < nn; ++i) {
                out[(nc + 1 + i) * ne2 + e] = st.slice_noise[i * ne2 + e];
            }
        }
        st.data.clear();
        st.data.shrink_to_fit();
        {
            const uint64_t begin = j.offset / page * page;
            const uint64_t end   = j.offset + ggml_row_size((ggml_type) j.src_type, j.ne[0]) * (uint64_t) (j.ne[1] * j.ne[2]);
            madvise((void *) (base + begin), (size_t) (end - begin), MADV_DONTNEED);
        }
        st.row_num.clear();
        st.row_num.shrink_to_fit();
        std::lock_guard<std::mutex> lock(done_mutex);
        errors[ji] = out;
        if (done != nullptr && !done((int32_t) ji, out.data(), (int32_t) out.size(), (int64_t) nr, user_data)) {
            stopped_by_callback = true;
            stop = true;
        }
    };

    // the energy (expected squared output) of every row, the rows sampled by it, and those rows as F32
    auto load_tensor = [&](const llqx_score_job & j, score_tensor & st) {
        const int64_t ne0 = j.ne[0];
        const ggml_type stype = (ggml_type) j.src_type;
        const size_t src_row = ggml_row_size(stype, ne0);
        auto read_row = [&](int64_t global_row, float * dst) {
            llqx_score_read_row(base + j.offset + (uint64_t) global_row * src_row, j.src_type, ne0, dst);
        };
        st.rows.assign((size_t) st.expert_first.back(), 0);
        st.row_scale.assign(st.rows.size(), 0.0);
        st.slice_energy.assign((size_t) j.ne[2], 0.0);
        st.slice_noise.assign((size_t) j.n_noise * (size_t) j.ne[2], 0.0);
        std::vector<float>   xr((size_t) ne0);
        std::vector<double>  energy((size_t) j.ne[1]);
        std::vector<double>  col2;
        std::vector<int64_t> rows;
        std::vector<double>  scales;
        for (int64_t e = 0; e < j.ne[2]; ++e) {
            const float * v = job_slice(job_diagonal(j), e, ne0);
            const float * a = job_slice(j.directions, e, j.n_dir * ne0);
            double slice = 0.0;
            // input noise of variance σ_k per column costs Σ_rows Σ_k w_k² σ_k = Σ_k σ_k · (Σ_rows w_k²)
            col2.assign(j.n_noise > 0 ? (size_t) ne0 : 0, 0.0);
            for (int64_t r = 0; r < j.ne[1]; ++r) {
                read_row(e * j.ne[1] + r, xr.data());
                energy[(size_t) r] = llqx_score_quadratic(xr.data(), v, a, j.n_dir, ne0);
                slice += energy[(size_t) r];
                for (size_t k = 0; k < col2.size(); ++k) {
                    col2[k] += (double) xr[k] * (double) xr[k];
                }
            }
            st.slice_energy[(size_t) e] = slice;
            for (int32_t i = 0; i < j.n_noise; ++i) {
                const float * nv = j.noise.data() + ((size_t) i * (size_t) j.ne[2] + (size_t) e) * (size_t) ne0;
                double sum = 0.0;
                for (int64_t k = 0; k < ne0; ++k) {
                    sum += (double) nv[k] * col2[(size_t) k];
                }
                st.slice_noise[(size_t) i * (size_t) j.ne[2] + (size_t) e] = sum;
            }
            const int64_t first = st.expert_first[(size_t) e];
            llqx_score_sample_rows(j.name, (int32_t) e, energy, st.expert_first[(size_t) e + 1] - first, rows, scales);
            for (size_t i = 0; i < rows.size(); ++i) {
                st.rows[(size_t) first + i] = e * j.ne[1] + rows[i];
                st.row_scale[(size_t) first + i] = scales[i];
            }
        }
        st.data.resize(st.rows.size() * (size_t) ne0);
        for (size_t r = 0; r < st.rows.size(); ++r) {
            read_row(st.rows[r], st.data.data() + r * (size_t) ne0);
        }
        st.row_num.assign(st.rows.size() * j.candidates.size() * (j.alt_diagonal.empty() ? 1 : 2), 0.0);
    };

    auto worker = [&]() {
        std::vector<uint8_t> qbuf(max_qrow * (size_t) max_block_rows);
        std::vector<float>   ybuf((size_t) (max_ne0 * max_block_rows));
        std::vector<double>  dbuf((size_t) max_ne0);
        while (!stop.load() && !(cancel != nullptr && cancel->load())) {
            const size_t ii = next.fetch_add(1);
            if (ii >= items.size()) {
                break;
            }
            const score_item & it = items[ii];
            const auto & j = jobs[(size_t) it.job];
            score_tensor & st = *tensors[(size_t) it.job];
            const int64_t ne0 = j.ne[0];
            {
                std::lock_guard<std::mutex> lock(st.mutex);
                if (!st.loaded) {
                    load_tensor(j, st);
                    st.loaded = true;
                }
            }
            if (it.cand == LLQX_SCORE_LOAD) {
                continue;
            }
            const score_block & blk = st.blocks[(size_t) it.block];
            const ggml_type qt = (ggml_type) j.candidates[(size_t) it.cand];
            const float * x = st.data.data() + blk.first * ne0;
            const float * v = j.weights.empty() ? nullptr : j.weights.data() + (size_t) blk.expert * (size_t) ne0;
            const float * dv = job_slice(job_diagonal(j), blk.expert, ne0);
            const float * a = job_slice(j.directions, blk.expert, j.n_dir * ne0);
            const size_t qrow = ggml_row_size(qt, ne0);
            ggml_quantize_chunk(qt, x, qbuf.data(), 0, blk.count, ne0, v);
            const ggml_type_traits * tt = ggml_get_type_traits(qt);
            for (int64_t r = 0; r < blk.count; ++r) {
                tt->to_float(qbuf.data() + (size_t) r * qrow, ybuf.data() + r * ne0, ne0);
            }
            double * out = st.row_num.data() + (size_t) it.cand * st.rows.size() + (size_t) blk.first;
            const float * alt_v = job_slice(j.alt_diagonal, blk.expert, ne0);
            const float * alt_a = job_slice(j.alt_directions, blk.expert, j.alt_n_dir * ne0);
            double * alt_out = alt_v == nullptr ? nullptr : out + j.candidates.size() * st.rows.size();
            for (int64_t r = 0; r < blk.count; ++r) {
                const float * xr = x + r * ne0;
                const float * yr = ybuf.data() + r * ne0;
                for (int64_t k = 0; k < ne0; ++k) {
                    dbuf[(size_t) k] = (double) yr[k] - (double) xr[k];
                }
                out[r] = llqx_score_quadratic(dbuf.data(), dv, a, j.n_dir, ne0);
                if (alt_out != nullptr) {
                    alt_out[r] = llqx_score_quadratic(dbuf.data(), alt_v, alt_a, j.alt_n_dir, ne0);
                }
            }
            bool last = false;
            {
                std::lock_guard<std::mutex> lock(st.mutex);
                last = --st.remaining == 0;
            }
            if (last) {
                finish_job((size_t) it.job);
            }
        }
    };

    const int32_t nthread = std::max<int32_t>(1, params.nthread);
    std::vector<std::thread> threads;
    for (int32_t i = 1; i < nthread; ++i) {
        threads.emplace_back(worker);
    }
    worker();
    for (auto & t : threads) {
        t.join();
    }

    if (stopped_by_callback || (cancel != nullptr && cancel->load())) {
        // jobs that did not finish keep empty curves
        for (size_t ji = 0; ji < jobs.size(); ++ji) {
            if (tensors[ji]->remaining != 0) {
                errors[ji].clear();
            }
        }
        return 0;
    }
    return 1;
}
