/*
 * The C ABI's test program (run by scripts/test-capi.sh).
 *
 *   test_capi [--trace FILE] [--dir DIR]   every function and every error path; with --trace,
 *                                          every successful call and every step (inputs, outputs,
 *                                          status, report) is recorded to FILE, which
 *                                          capi/tests/replay.rs replays through the Rust API and
 *                                          compares bitwise. State files go to DIR (default /tmp).
 *   test_capi --bench [ROUNDS]             the overhead of a 4096-parameter Adam step through the
 *                                          ABI against the same step through the Rust API.
 *
 * Exit status 0 when every check holds.
 */
#define _POSIX_C_SOURCE 200809L
#include "fusedopt.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------------------------ */
/* Checks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* A measuring aid of the library, not in the header: steps through the Rust API directly. */
fusedopt_status fusedopt_time_rust_steps(fusedopt_optimizer *opt, float *weights, const float *grads,
                                         size_t len, uint64_t iterations, double *seconds);

static int failures;
static int checks;

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        checks++;                                                                              \
        if (!(cond)) {                                                                         \
            failures++;                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
        }                                                                                      \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                               \
    do {                                                                                       \
        fusedopt_status s_ = (call);                                                           \
        CHECK(s_ == FUSEDOPT_OK, "%s: %s", fusedopt_status_name(s_), fusedopt_last_error());   \
    } while (0)

/* A call that must fail with `status` and a message containing `needle`. */
#define FAILS(call, status, needle)                                                            \
    do {                                                                                       \
        fusedopt_status s_ = (call);                                                           \
        CHECK(s_ == (status), "got %s (%s), expected %s", fusedopt_status_name(s_),            \
              fusedopt_last_error(), #status);                                                 \
        CHECK(strstr(fusedopt_last_error(), (needle)) != NULL, "message \"%s\" lacks \"%s\"",  \
              fusedopt_last_error(), (needle));                                                \
    } while (0)

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* Deterministic data: xorshift32, floats in [-1, 1). */
static uint32_t rng_state = 12345;
static float uniform(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}
static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * uniform();
}
/* float to bfloat16 / half bit patterns (round to nearest even; finite inputs). */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static uint16_t to_f16(float f) {
    /* Small magnitudes only (|f| < 2): normal halves, truncated then rounded. */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, exp = (u >> 23) & 0xff, mant = u & 0x7fffff;
    if (exp < 103) return (uint16_t)sign; /* below half's subnormals: zero */
    if (exp < 113) {                      /* a subnormal half */
        mant |= 0x800000;
        return (uint16_t)(sign | (mant >> (126 - exp)));
    }
    uint32_t h = sign | ((exp - 112) << 10) | (mant >> 13);
    if ((mant & 0x1fff) > 0x1000 || ((mant & 0x1fff) == 0x1000 && (h & 1))) h++;
    return (uint16_t)h;
}

static int same_bits(const void *a, const void *b, size_t bytes) { return memcmp(a, b, bytes) == 0; }

/* ------------------------------------------------------------------------------------------ */
/* The trace (see capi/tests/replay.rs for its reader)                                          */
/* ------------------------------------------------------------------------------------------ */

static FILE *trace;

static void tr(const void *p, size_t bytes) {
    if (trace && bytes && fwrite(p, 1, bytes, trace) != bytes) {
        fprintf(stderr, "cannot write the trace\n");
        exit(2);
    }
}
static void tr_u8(uint8_t v) { tr(&v, 1); }
static void tr_u32(uint32_t v) { tr(&v, 4); }
static void tr_i32(int32_t v) { tr(&v, 4); }
static void tr_u64(uint64_t v) { tr(&v, 8); }
static void tr_f32(float v) { tr(&v, 4); }
static void tr_str(const char *s) {
    tr_u32((uint32_t)strlen(s));
    tr(s, strlen(s));
}

/* A handle with its trace id. */
typedef struct {
    fusedopt_optimizer *opt;
    uint32_t id;
} H;
static uint32_t next_id;

static H h_new(const char *config) {
    H h = {NULL, next_id++};
    OK(fusedopt_new(config, &h.opt));
    if (!h.opt) {
        fprintf(stderr, "cannot create %s\n", config);
        exit(2);
    }
    tr_u8('N');
    tr_u32(h.id);
    tr_str(config);
    return h;
}
static void h_free(H h) {
    OK(fusedopt_free(h.opt));
    tr_u8('F');
    tr_u32(h.id);
}
static void h_lr(H h, float lr) {
    OK(fusedopt_set_lr(h.opt, lr));
    tr_u8('L');
    tr_u32(h.id);
    tr_f32(lr);
}
static void h_threads(H h, size_t n) {
    OK(fusedopt_set_threads(h.opt, n));
    tr_u8('H');
    tr_u32(h.id);
    tr_u64(n);
}
static void h_chunk(H h, size_t n) {
    OK(fusedopt_set_chunk_len(h.opt, n));
    tr_u8('C');
    tr_u32(h.id);
    tr_u64(n);
}
static void h_scale(H h, float s) {
    OK(fusedopt_set_grad_scale(h.opt, s));
    tr_u8('G');
    tr_u32(h.id);
    tr_f32(s);
}
/* A negative `max` turns clipping off. */
static void h_clip(H h, float max) {
    OK(max < 0 ? fusedopt_clear_max_grad_norm(h.opt) : fusedopt_set_max_grad_norm(h.opt, max));
    tr_u8('M');
    tr_u32(h.id);
    tr_u8(max >= 0);
    tr_f32(max);
}
static void h_non_finite(H h, fusedopt_non_finite p) {
    OK(fusedopt_set_non_finite(h.opt, p));
    tr_u8('P');
    tr_u32(h.id);
    tr_i32(p);
}
static void h_format(H h, const char *format) {
    OK(fusedopt_set_state_format(h.opt, format));
    tr_u8('Q');
    tr_u32(h.id);
    tr_str(format);
}
static void h_settings(H h, const fusedopt_settings *s) {
    OK(fusedopt_set_settings(h.opt, s));
    tr_u8('S');
    tr_u32(h.id);
    tr_i32(s->backend);
    tr_u64(s->threads);
    tr_u64(s->chunk_len);
    tr_f32(s->grad_scale);
    tr_i32(s->clip);
    tr_f32(s->max_grad_norm);
    tr_i32(s->non_finite);
    tr_i32(s->state_format);
}
static void h_groups(H h, const fusedopt_param_group *g, size_t n) {
    OK(fusedopt_set_param_groups(h.opt, g, n));
    tr_u8('R');
    tr_u32(h.id);
    tr_u32((uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        tr_f32(g[i].lr_scale);
        tr_f32(g[i].weight_decay);
        tr_i32(g[i].override_weight_decay);
    }
}
static void h_names(H h, const char *const *names, size_t n) {
    OK(fusedopt_set_tensor_names(h.opt, names, n));
    tr_u8('A');
    tr_u32(h.id);
    tr_u32((uint32_t)n);
    for (size_t i = 0; i < n; i++) tr_str(names[i]);
}
static void h_reset(H h) {
    OK(fusedopt_reset(h.opt));
    tr_u8('Z');
    tr_u32(h.id);
}
static void h_save(H h, const char *path) {
    OK(fusedopt_save_state(h.opt, path));
    tr_u8('V');
    tr_u32(h.id);
    tr_str(path);
}
static void h_load(H h, const char *path) {
    OK(fusedopt_load_state(h.opt, path));
    tr_u8('O');
    tr_u32(h.id);
    tr_str(path);
}

static size_t dtype_size(fusedopt_dtype d) { return d == FUSEDOPT_DTYPE_F32 ? 4 : 2; }

/*
 * One traced step of `n` tensors: `fusedopt_step` for one f32 tensor with a gradient (unless
 * `many`), else fusedopt_step_many / _partial / _typed. Records the weights before and after,
 * the gradients (a NULL gradient: none), the status and the report. Returns the status.
 */
static fusedopt_status h_step_ex(H h, int many, fusedopt_dtype wd, void *const *w, fusedopt_dtype gd,
                                 const void *const *g, const size_t *lens, size_t n) {
    int partial = 0;
    for (size_t i = 0; i < n; i++) partial |= g[i] == NULL;
    void **before = xmalloc(n * sizeof(void *));
    for (size_t i = 0; i < n; i++) {
        before[i] = xmalloc(lens[i] * dtype_size(wd));
        memcpy(before[i], w[i], lens[i] * dtype_size(wd));
    }
    fusedopt_status s;
    int typed = wd != FUSEDOPT_DTYPE_F32 || gd != FUSEDOPT_DTYPE_F32;
    if (!many && !typed && !partial && n == 1)
        s = fusedopt_step(h.opt, (float *)w[0], lens[0], (const float *)g[0], lens[0]);
    else if (typed && partial)
        s = fusedopt_step_partial_typed(h.opt, wd, w, gd, g, lens, n);
    else if (typed)
        s = fusedopt_step_many_typed(h.opt, wd, w, gd, g, lens, n);
    else if (partial)
        s = fusedopt_step_partial(h.opt, (float *const *)w, (const float *const *)g, lens, n);
    else
        s = fusedopt_step_many(h.opt, (float *const *)w, (const float *const *)g, lens, n);
    fusedopt_report r = {0, 0, 0, 0};
    OK(fusedopt_last_report(h.opt, &r));
    tr_u8('T');
    tr_u32(h.id);
    tr_i32(wd);
    tr_i32(gd);
    tr_u32((uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        tr_u64(lens[i]);
        tr(before[i], lens[i] * dtype_size(wd));
        tr_u8(g[i] != NULL);
        if (g[i]) tr(g[i], lens[i] * dtype_size(gd));
        tr(w[i], lens[i] * dtype_size(wd));
        if (s != FUSEDOPT_OK)
            CHECK(same_bits(before[i], w[i], lens[i] * dtype_size(wd)),
                  "a failed step (%s) changed the weights of tensor %zu", fusedopt_status_name(s), i);
        free(before[i]);
    }
    free(before);
    tr_i32(s);
    tr_u64(r.step);
    tr_i32(r.skipped);
    tr_i32(r.has_grad_norm);
    tr_f32(r.grad_norm);
    return s;
}

static fusedopt_status h_step_many(H h, float *const *w, const float *const *g, const size_t *lens,
                                   size_t n) {
    return h_step_ex(h, 1, FUSEDOPT_DTYPE_F32, (void *const *)w, FUSEDOPT_DTYPE_F32,
                     (const void *const *)g, lens, n);
}
static fusedopt_status h_step(H h, float *w, const float *g, size_t len) {
    void *wp[1] = {w};
    const void *gp[1] = {g};
    return h_step_ex(h, 0, FUSEDOPT_DTYPE_F32, wp, FUSEDOPT_DTYPE_F32, gp, &len, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Traced scenarios: compared with the Rust API by replay.rs                                   */
/* ------------------------------------------------------------------------------------------ */

static const char *const CONFIGS[] = {
    "sgd",
    "momentum",
    "nag:momentum=0.8",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw:lr=3e-3,weight_decay=0.1",
    "adam:amsgrad=true,weight_decay=0.01",
    "lamb:lr=0.01",
    "lars:lr=0.5,momentum=0.9,weight_decay=0.01",
};
#define NCONFIGS (sizeof CONFIGS / sizeof CONFIGS[0])

/* Every tail length, around the 8-wide vectors and a few chunk-sized lengths, on unaligned
 * sub-slices. */
static void every_optimizer_every_length(void) {
    static const size_t LENS[] = {1,  2,  3,  4,  5,   6,   7,   8,   9,    10,   11,  12, 13,
                                  14, 15, 16, 17, 31,  32,  33,  255, 256,  257,  1000, 4095,
                                  4096, 4097};
    for (size_t c = 0; c < NCONFIGS; c++) {
        for (size_t l = 0; l < sizeof LENS / sizeof LENS[0]; l++) {
            size_t n = LENS[l];
            float *wbuf = xmalloc((n + 1) * 4), *gbuf = xmalloc((n + 1) * 4);
            float *w = wbuf + 1, *g = gbuf + 1; /* not 8-byte aligned when malloc is 16 */
            fill(w, n, 1.0f);
            H h = h_new(CONFIGS[c]);
            for (int step = 0; step < 3; step++) {
                fill(g, n, 0.5f);
                OK(h_step(h, w, g, n));
            }
            uint64_t steps = 0;
            OK(fusedopt_get_steps(h.opt, &steps));
            CHECK(steps == 3, "%s: %llu steps", CONFIGS[c], (unsigned long long)steps);
            h_free(h);
            free(wbuf);
            free(gbuf);
        }
    }
}

/* A model of six tensors in one dispatch, on two threads in small chunks (many tasks), with a
 * schedule, a loss scale, clipping and parameter groups. */
#define MODEL 6
static const size_t MODEL_LENS[MODEL] = {3, 16, 17, 1000, 4097, 20000};

typedef struct {
    float *w[MODEL];
    float *g[MODEL];
} Model;

static Model model_new(void) {
    Model m;
    for (int i = 0; i < MODEL; i++) {
        m.w[i] = xmalloc(MODEL_LENS[i] * 4);
        m.g[i] = xmalloc(MODEL_LENS[i] * 4);
        fill(m.w[i], MODEL_LENS[i], 1.0f);
    }
    return m;
}
static void model_grads(Model *m, float scale) {
    for (int i = 0; i < MODEL; i++) fill(m->g[i], MODEL_LENS[i], scale);
}
static void model_free(Model *m) {
    for (int i = 0; i < MODEL; i++) {
        free(m->w[i]);
        free(m->g[i]);
    }
}

static void whole_model_with_every_option(void) {
    static const char *const configs[] = {"adamw:lr=1e-2,weight_decay=0.05", "momentum:lr=0.05",
                                          "rmsprop:lr=1e-3", "lamb:weight_decay=0.1",
                                          "lars:momentum=0.9,weight_decay=0.01"};
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++) {
        Model m = model_new();
        H h = h_new(configs[c]);
        h_threads(h, 2);
        h_chunk(h, 1024);
        fusedopt_param_group groups[MODEL];
        for (int i = 0; i < MODEL; i++) {
            groups[i].lr_scale = i == 4 ? 0.5f : 1.0f;
            groups[i].weight_decay = 0.0f;
            groups[i].override_weight_decay = i < 3; /* the small ones: no decay */
        }
        h_groups(h, groups, MODEL);
        for (int step = 0; step < 6; step++) {
            h_lr(h, 0.01f * (1.0f - (float)step / 6.0f));
            if (step == 2) h_scale(h, 1024.0f);
            if (step == 3) h_clip(h, 0.5f);
            if (step == 5) h_clip(h, -1.0f);
            model_grads(&m, step >= 2 ? 1024.0f : 1.0f);
            OK(h_step_many(h, m.w, (const float *const *)m.g, MODEL_LENS, MODEL));
            fusedopt_report r;
            OK(fusedopt_last_report(h.opt, &r));
            CHECK(r.step == (uint64_t)step + 1, "step %llu", (unsigned long long)r.step);
            CHECK(r.has_grad_norm == (step == 3 || step == 4), "step %d: has_grad_norm %d", step,
                  r.has_grad_norm);
            if (r.has_grad_norm) CHECK(r.grad_norm > 0.5f, "norm %g", r.grad_norm);
        }
        h_free(h);
        model_free(&m);
    }
}

/* Tensors without a gradient keep their weights and step count. */
static void missing_gradients(void) {
    Model m = model_new();
    H h = h_new("adam:lr=0.01");
    for (int step = 0; step < 4; step++) {
        model_grads(&m, 1.0f);
        const float *g[MODEL];
        for (int i = 0; i < MODEL; i++) g[i] = (i + step) % 3 == 0 ? NULL : m.g[i];
        float first = m.w[0][0];
        OK(h_step_many(h, m.w, g, MODEL_LENS, MODEL));
        if (g[0] == NULL) CHECK(m.w[0][0] == first, "a tensor without a gradient moved");
    }
    h_free(h);
    model_free(&m);
}

/* Half-precision gradients, master weights, compact state. */
static void low_precision(void) {
    static const struct {
        fusedopt_dtype w, g;
        const char *format;
    } CASES[] = {
        {FUSEDOPT_DTYPE_F32, FUSEDOPT_DTYPE_BF16, "f32"}, {FUSEDOPT_DTYPE_F32, FUSEDOPT_DTYPE_F16, "bf16"},
        {FUSEDOPT_DTYPE_BF16, FUSEDOPT_DTYPE_BF16, "f32"}, {FUSEDOPT_DTYPE_BF16, FUSEDOPT_DTYPE_F32, "q8"},
        {FUSEDOPT_DTYPE_F16, FUSEDOPT_DTYPE_F16, "q8"},   {FUSEDOPT_DTYPE_F32, FUSEDOPT_DTYPE_F32, "q8"},
    };
    for (size_t c = 0; c < sizeof CASES / sizeof CASES[0]; c++) {
        void *w[MODEL];
        const void *g[MODEL];
        for (int i = 0; i < MODEL; i++) {
            size_t n = MODEL_LENS[i];
            w[i] = xmalloc(n * dtype_size(CASES[c].w));
            g[i] = xmalloc(n * dtype_size(CASES[c].g));
            for (size_t k = 0; k < n; k++) {
                float x = uniform();
                if (CASES[c].w == FUSEDOPT_DTYPE_F32) ((float *)w[i])[k] = x;
                else ((uint16_t *)w[i])[k] = CASES[c].w == FUSEDOPT_DTYPE_BF16 ? to_bf16(x) : to_f16(x);
            }
        }
        H h = h_new("adamw:lr=1e-2");
        h_format(h, CASES[c].format);
        for (int step = 0; step < 4; step++) {
            for (int i = 0; i < MODEL; i++) {
                for (size_t k = 0; k < MODEL_LENS[i]; k++) {
                    float x = 0.25f * uniform();
                    if (CASES[c].g == FUSEDOPT_DTYPE_F32) ((float *)g[i])[k] = x;
                    else ((uint16_t *)g[i])[k] = CASES[c].g == FUSEDOPT_DTYPE_BF16 ? to_bf16(x) : to_f16(x);
                }
            }
            OK(h_step_ex(h, 1, CASES[c].w, w, CASES[c].g, g, MODEL_LENS, MODEL));
        }
        /* Partial, typed. */
        const void *some[MODEL];
        for (int i = 0; i < MODEL; i++) some[i] = i % 2 ? g[i] : NULL;
        OK(h_step_ex(h, 1, CASES[c].w, w, CASES[c].g, some, MODEL_LENS, MODEL));
        h_free(h);
        for (int i = 0; i < MODEL; i++) {
            free(w[i]);
            free((void *)g[i]);
        }
    }
}

/* NaN under each policy; the report. */
static void non_finite_gradients(void) {
    float w[37], g[37], before[37];
    fill(w, 37, 1.0f);
    H h = h_new("adam");
    fill(g, 37, 1.0f);
    OK(h_step(h, w, g, 37));
    g[20] = NAN;
    h_non_finite(h, FUSEDOPT_NON_FINITE_SKIP);
    memcpy(before, w, sizeof w);
    OK(h_step(h, w, g, 37));
    fusedopt_report r;
    OK(fusedopt_last_report(h.opt, &r));
    CHECK(r.skipped && r.step == 1 && same_bits(w, before, sizeof w), "skipped %d step %llu",
          r.skipped, (unsigned long long)r.step);
    CHECK(r.has_grad_norm && isnan(r.grad_norm), "norm %g", r.grad_norm);
    h_non_finite(h, FUSEDOPT_NON_FINITE_ERROR);
    CHECK(h_step(h, w, g, 37) == FUSEDOPT_ERROR_NON_FINITE, "%s", fusedopt_last_error());
    CHECK(strstr(fusedopt_last_error(), "tensor 0") != NULL, "%s", fusedopt_last_error());
    OK(fusedopt_last_report(h.opt, &r));
    CHECK(r.skipped && r.step == 1, "the failed step changed the report");
    h_non_finite(h, FUSEDOPT_NON_FINITE_PROPAGATE);
    OK(h_step(h, w, g, 37));
    CHECK(isnan(w[20]), "NaN did not propagate");
    fusedopt_non_finite p = -1;
    OK(fusedopt_get_non_finite(h.opt, &p));
    CHECK(p == FUSEDOPT_NON_FINITE_PROPAGATE, "%d", p);
    h_free(h);
}

static char dir[512] = "/tmp";
static char *file_in_dir(const char *name) {
    static char buf[8][640];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

/* Save, load into a new handle, continue: bitwise the uninterrupted run. Named tensors. */
static void state_files(void) {
    static const char *const names[MODEL] = {"a", "b", "c", "d", "e", "f"};
    static const char *const formats[] = {"f32", "bf16", "q8"};
    for (int f = 0; f < 3; f++) {
        Model m = model_new(), m2 = model_new();
        H h = h_new("adam:lr=0.01");
        h_format(h, formats[f]);
        h_names(h, names, MODEL);
        for (int step = 0; step < 3; step++) {
            model_grads(&m, 1.0f);
            OK(h_step_many(h, m.w, (const float *const *)m.g, MODEL_LENS, MODEL));
        }
        char *path = file_in_dir(f == 0 ? "fusedopt-capi-f32.state" : f == 1 ? "fusedopt-capi-bf16.state"
                                                                            : "fusedopt-capi-q8.state");
        h_save(h, path);
        H resumed = h_new("adam");
        h_format(resumed, formats[f]);
        h_names(resumed, names, MODEL);
        h_load(resumed, path);
        uint64_t steps = 0;
        OK(fusedopt_get_steps(resumed.opt, &steps));
        CHECK(steps == 3, "loaded %llu steps", (unsigned long long)steps);
        float lr = 0;
        OK(fusedopt_get_lr(resumed.opt, &lr));
        CHECK(lr == 0.01f, "loaded lr %g", lr);
        for (int i = 0; i < MODEL; i++) memcpy(m2.w[i], m.w[i], MODEL_LENS[i] * 4);
        for (int step = 0; step < 2; step++) {
            model_grads(&m, 1.0f);
            for (int i = 0; i < MODEL; i++) memcpy(m2.g[i], m.g[i], MODEL_LENS[i] * 4);
            OK(h_step_many(h, m.w, (const float *const *)m.g, MODEL_LENS, MODEL));
            OK(h_step_many(resumed, m2.w, (const float *const *)m2.g, MODEL_LENS, MODEL));
        }
        for (int i = 0; i < MODEL; i++)
            CHECK(same_bits(m.w[i], m2.w[i], MODEL_LENS[i] * 4), "%s: tensor %d differs after resuming",
                  formats[f], i);
        h_reset(resumed);
        h_free(h);
        h_free(resumed);
        model_free(&m);
        model_free(&m2);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Error paths: a status, a message, nothing modified                                          */
/* ------------------------------------------------------------------------------------------ */

/* A handle and a twin with the same history: after a refused call on `h`, one more step on both
 * must agree bitwise (the refused call changed neither weights nor state). */
typedef struct {
    H h, twin;
    float w[100], w2[100], g[100];
} Pair;

static void pair_init(Pair *p, const char *config) {
    p->h = h_new(config);
    p->twin = h_new(config);
    fill(p->w, 100, 1.0f);
    memcpy(p->w2, p->w, sizeof p->w);
    fill(p->g, 100, 1.0f);
    OK(h_step(p->h, p->w, p->g, 100));
    OK(h_step(p->twin, p->w2, p->g, 100));
}
static void pair_check(Pair *p, const char *what) {
    CHECK(same_bits(p->w, p->w2, sizeof p->w), "%s changed the weights", what);
    fill(p->g, 100, 1.0f);
    OK(h_step(p->h, p->w, p->g, 100));
    OK(h_step(p->twin, p->w2, p->g, 100));
    CHECK(same_bits(p->w, p->w2, sizeof p->w), "%s changed the state or settings", what);
    uint64_t a = 0, b = 0;
    OK(fusedopt_get_steps(p->h.opt, &a));
    OK(fusedopt_get_steps(p->twin.opt, &b));
    CHECK(a == b, "%s changed the step count", what);
}
static void pair_free(Pair *p) {
    h_free(p->h);
    h_free(p->twin);
}

static void errors_creating(void) {
    fusedopt_optimizer *opt = (fusedopt_optimizer *)&opt; /* must stay as it is on failure */
    fusedopt_optimizer *const untouched = opt;
    FAILS(fusedopt_new(NULL, &opt), FUSEDOPT_ERROR_NULL, "configuration string is NULL");
    FAILS(fusedopt_new("adam", NULL), FUSEDOPT_ERROR_NULL, "out-pointer");
    FAILS(fusedopt_new("shampoo", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "shampoo");
    FAILS(fusedopt_new("adam:beta3=0.5", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "beta3");
    FAILS(fusedopt_new("adam:beta1=1.5", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "beta1");
    FAILS(fusedopt_new("adam:lr=fast", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr");
    FAILS(fusedopt_new("adam:lr", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr");
    FAILS(fusedopt_new("ad\xff" "am", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "UTF-8");
    CHECK(opt == untouched, "a failed fusedopt_new wrote its out-pointer");
    OK(fusedopt_free(NULL));
    CHECK(strcmp(fusedopt_status_name(FUSEDOPT_ERROR_LAYOUT), "FUSEDOPT_ERROR_LAYOUT") == 0, "name");
    CHECK(strcmp(fusedopt_status_name(99), "unknown status") == 0, "name");
}

/* Every function refuses a NULL handle. */
static void errors_null_handle(void) {
    float w[4] = {0}, g[4] = {0}, f = 0;
    float *wp[1] = {w};
    const float *gp[1] = {g};
    void *vw[1] = {w};
    const void *vg[1] = {g};
    size_t len = 4, n = 0;
    uint64_t u = 0;
    int32_t i = 0;
    double secs = 0;
    fusedopt_report r;
    fusedopt_param_group grp = {1, 0, 0};
    const char *name = "x";
    char buf[64];
    fusedopt_settings st = {.version = FUSEDOPT_SETTINGS_VERSION};
    fusedopt_status all[] = {
        fusedopt_step(NULL, w, 4, g, 4),
        fusedopt_step_many(NULL, wp, gp, &len, 1),
        fusedopt_step_partial(NULL, wp, gp, &len, 1),
        fusedopt_step_many_typed(NULL, FUSEDOPT_DTYPE_F32, vw, FUSEDOPT_DTYPE_F32, vg, &len, 1),
        fusedopt_step_partial_typed(NULL, FUSEDOPT_DTYPE_F32, vw, FUSEDOPT_DTYPE_F32, vg, &len, 1),
        fusedopt_set_lr(NULL, 0.1f),
        fusedopt_get_lr(NULL, &f),
        fusedopt_get_config(NULL, buf, sizeof buf, &n),
        fusedopt_set_threads(NULL, 1),
        fusedopt_get_threads(NULL, &n),
        fusedopt_set_chunk_len(NULL, 64),
        fusedopt_get_chunk_len(NULL, &n),
        fusedopt_set_grad_scale(NULL, 2),
        fusedopt_get_grad_scale(NULL, &f),
        fusedopt_set_max_grad_norm(NULL, 1),
        fusedopt_clear_max_grad_norm(NULL),
        fusedopt_get_max_grad_norm(NULL, &i, &f),
        fusedopt_set_non_finite(NULL, FUSEDOPT_NON_FINITE_SKIP),
        fusedopt_get_non_finite(NULL, &i),
        fusedopt_set_param_groups(NULL, &grp, 1),
        fusedopt_set_tensor_names(NULL, &name, 1),
        fusedopt_set_state_format(NULL, "bf16"),
        fusedopt_get_settings(NULL, &st),
        fusedopt_set_settings(NULL, &st),
        fusedopt_get_steps(NULL, &u),
        fusedopt_last_report(NULL, &r),
        fusedopt_save_state(NULL, "/tmp/x"),
        fusedopt_load_state(NULL, "/tmp/x"),
        fusedopt_reset(NULL),
        fusedopt_time_rust_steps(NULL, w, g, 4, 1, &secs),
    };
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) {
        CHECK(all[k] == FUSEDOPT_ERROR_NULL, "function %zu: %s", k, fusedopt_status_name(all[k]));
    }
    CHECK(strstr(fusedopt_last_error(), "handle is NULL") != NULL, "%s", fusedopt_last_error());
    CHECK(w[0] == 0.0f, "a refused call wrote the weights");
}

static void errors_stepping(void) {
    Pair p;
    pair_init(&p, "adam");
    H h = p.h;
    float other[101];
    fill(other, 101, 1.0f);

    FAILS(fusedopt_step(h.opt, NULL, 100, p.g, 100), FUSEDOPT_ERROR_NULL, "weights of tensor 0 are NULL");
    FAILS(fusedopt_step(h.opt, p.w, 100, NULL, 100), FUSEDOPT_ERROR_NULL, "gradients of tensor 0 are NULL");
    FAILS(fusedopt_step(h.opt, p.w, 100, p.g, 99), FUSEDOPT_ERROR_LENGTH_MISMATCH, "100");
    /* Another length than the state's: the layout. */
    FAILS(fusedopt_step(h.opt, other, 101, other, 101), FUSEDOPT_ERROR_OVERLAP, "overlap");
    float g101[101];
    fill(g101, 101, 1.0f);
    FAILS(fusedopt_step(h.opt, other, 101, g101, 101), FUSEDOPT_ERROR_LAYOUT, "101");
    /* Overlapping weights and gradients. */
    FAILS(fusedopt_step(h.opt, other + 1, 100, other, 100), FUSEDOPT_ERROR_OVERLAP, "overlap");
    /* Misaligned and oversized buffers. */
    FAILS(fusedopt_step(h.opt, (float *)((char *)other + 1), 100, p.g, 100),
          FUSEDOPT_ERROR_INVALID_ARGUMENT, "aligned");
    FAILS(fusedopt_step(h.opt, p.w, SIZE_MAX / 2, p.g, SIZE_MAX / 2), FUSEDOPT_ERROR_INVALID_ARGUMENT,
          "address space");
    pair_check(&p, "refused single steps");

    /* Many tensors. */
    float *w2[2] = {p.w, other};
    const float *g2[2] = {p.g, g101};
    size_t l2[2] = {100, 101};
    FAILS(fusedopt_step_many(h.opt, w2, g2, l2, 2), FUSEDOPT_ERROR_LAYOUT, "2");
    FAILS(fusedopt_step_many(h.opt, NULL, g2, l2, 2), FUSEDOPT_ERROR_NULL, "weight pointers");
    FAILS(fusedopt_step_many(h.opt, w2, NULL, l2, 2), FUSEDOPT_ERROR_NULL, "gradient pointers");
    FAILS(fusedopt_step_many(h.opt, w2, g2, NULL, 2), FUSEDOPT_ERROR_NULL, "lengths");
    const float *gnull[2] = {p.g, NULL};
    FAILS(fusedopt_step_many(h.opt, w2, gnull, l2, 2), FUSEDOPT_ERROR_NULL, "gradients of tensor 1 are NULL");
    float *wover[2] = {other, other + 50};
    size_t lover[2] = {51, 51};
    FAILS(fusedopt_step_many(h.opt, wover, g2, lover, 2), FUSEDOPT_ERROR_OVERLAP,
          "weights of tensor 0 overlap the weights of tensor 1");
    const float *gover[2] = {g101, p.w + 10};
    FAILS(fusedopt_step_many(h.opt, w2, gover, l2, 2), FUSEDOPT_ERROR_OVERLAP,
          "weights of tensor 0 overlap the gradients of tensor 1");
    void *vw[1] = {p.w};
    const void *vg[1] = {p.g};
    size_t l1 = 100;
    FAILS(fusedopt_step_many_typed(h.opt, 3, vw, FUSEDOPT_DTYPE_F32, vg, &l1, 1),
          FUSEDOPT_ERROR_INVALID_ARGUMENT, "unknown dtype of the weights 3");
    FAILS(fusedopt_step_many_typed(h.opt, FUSEDOPT_DTYPE_F32, vw, -1, vg, &l1, 1),
          FUSEDOPT_ERROR_INVALID_ARGUMENT, "unknown dtype of the gradients -1");
    /* bf16 values at an odd address. */
    void *odd[1] = {(char *)other + 1};
    FAILS(fusedopt_step_many_typed(h.opt, FUSEDOPT_DTYPE_BF16, odd, FUSEDOPT_DTYPE_F32, vg, &l1, 1),
          FUSEDOPT_ERROR_INVALID_ARGUMENT, "2-byte");
    pair_check(&p, "refused many-tensor steps");
    pair_free(&p);
}

static void errors_settings(void) {
    Pair p;
    pair_init(&p, "adamw:weight_decay=0.1");
    H h = p.h;
    FAILS(fusedopt_set_lr(h.opt, -1.0f), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr");
    FAILS(fusedopt_set_lr(h.opt, NAN), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr");
    FAILS(fusedopt_set_lr(h.opt, INFINITY), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr");
    float lr = 0;
    OK(fusedopt_get_lr(h.opt, &lr));
    CHECK(lr == 0.001f, "a refused lr stayed: %g", lr);
    FAILS(fusedopt_get_lr(h.opt, NULL), FUSEDOPT_ERROR_NULL, "lr is NULL");
    FAILS(fusedopt_set_grad_scale(h.opt, 0.0f), FUSEDOPT_ERROR_INVALID_ARGUMENT, "grad_scale = 0");
    FAILS(fusedopt_set_grad_scale(h.opt, -2.0f), FUSEDOPT_ERROR_INVALID_ARGUMENT, "grad_scale");
    FAILS(fusedopt_set_grad_scale(h.opt, INFINITY), FUSEDOPT_ERROR_INVALID_ARGUMENT, "grad_scale");
    FAILS(fusedopt_set_max_grad_norm(h.opt, -1.0f), FUSEDOPT_ERROR_INVALID_ARGUMENT, "max_grad_norm");
    FAILS(fusedopt_set_max_grad_norm(h.opt, NAN), FUSEDOPT_ERROR_INVALID_ARGUMENT, "max_grad_norm");
    /* The settings struct: every field checked, and a refused struct changes nothing. */
    fusedopt_settings s = {.version = FUSEDOPT_SETTINGS_VERSION};
    OK(fusedopt_get_settings(h.opt, &s));
    fusedopt_settings bad_s = s;
    bad_s.version = 2;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "version 2");
    FAILS(fusedopt_get_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "version 2");
    CHECK(bad_s.version == 2 && bad_s.grad_scale == s.grad_scale, "a refused get wrote");
    bad_s = s;
    bad_s.backend = 9;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "backend 9");
    bad_s = s;
    bad_s.state_format = -1;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "state format -1");
    bad_s = s;
    bad_s.state_format = FUSEDOPT_STATE_Q8; /* the state is held as f32 */
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "q8");
    bad_s = s;
    bad_s.non_finite = 3;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "non-finite policy 3");
    bad_s = s;
    bad_s.threads = 4; /* valid, but with an invalid scale: nothing changes, no pool starts */
    bad_s.grad_scale = NAN;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "grad_scale");
    bad_s = s;
    bad_s.clip = 1;
    bad_s.max_grad_norm = -0.5f;
    FAILS(fusedopt_set_settings(h.opt, &bad_s), FUSEDOPT_ERROR_INVALID_ARGUMENT, "max_grad_norm");
    FAILS(fusedopt_set_settings(h.opt, NULL), FUSEDOPT_ERROR_NULL, "settings are NULL");
    FAILS(fusedopt_get_settings(h.opt, NULL), FUSEDOPT_ERROR_NULL, "settings are NULL");
    fusedopt_settings now_s = {.version = FUSEDOPT_SETTINGS_VERSION};
    OK(fusedopt_get_settings(h.opt, &now_s));
    CHECK(memcmp(&now_s, &s, sizeof s) == 0, "a refused fusedopt_set_settings changed the settings");
    FAILS(fusedopt_set_non_finite(h.opt, 7), FUSEDOPT_ERROR_INVALID_ARGUMENT, "non-finite policy 7");
    FAILS(fusedopt_set_state_format(h.opt, "q4"), FUSEDOPT_ERROR_INVALID_ARGUMENT, "q4");
    FAILS(fusedopt_set_state_format(h.opt, "bf16"), FUSEDOPT_ERROR_INVALID_ARGUMENT, "f32");
    FAILS(fusedopt_set_state_format(h.opt, NULL), FUSEDOPT_ERROR_NULL, "state format");
    fusedopt_param_group groups[2] = {{1.0f, 0.0f, 1}, {1.0f, 0.0f, 0}};
    FAILS(fusedopt_set_param_groups(h.opt, groups, 2), FUSEDOPT_ERROR_LENGTH_MISMATCH, "2");
    FAILS(fusedopt_set_param_groups(h.opt, NULL, 1), FUSEDOPT_ERROR_NULL, "groups");
    fusedopt_param_group bad = {-1.0f, 0.0f, 0};
    FAILS(fusedopt_set_param_groups(h.opt, &bad, 1), FUSEDOPT_ERROR_INVALID_ARGUMENT, "lr_scale");
    fusedopt_param_group bad_wd = {1.0f, NAN, 1};
    FAILS(fusedopt_set_param_groups(h.opt, &bad_wd, 1), FUSEDOPT_ERROR_INVALID_ARGUMENT,
          "weight_decay");
    const char *comma = "a,b", *empty = "";
    FAILS(fusedopt_set_tensor_names(h.opt, &comma, 1), FUSEDOPT_ERROR_INVALID_ARGUMENT, "a,b");
    FAILS(fusedopt_set_tensor_names(h.opt, &empty, 1), FUSEDOPT_ERROR_INVALID_ARGUMENT, "empty");
    const char *two[2] = {"x", "y"};
    FAILS(fusedopt_set_tensor_names(h.opt, two, 2), FUSEDOPT_ERROR_LENGTH_MISMATCH, "2");
    const char *null_name = NULL;
    FAILS(fusedopt_set_tensor_names(h.opt, &null_name, 1), FUSEDOPT_ERROR_NULL, "name of tensor 0");
    char small[8];
    size_t len = 0;
    FAILS(fusedopt_get_config(h.opt, small, sizeof small, &len), FUSEDOPT_ERROR_INVALID_ARGUMENT,
          "cannot hold");
    FAILS(fusedopt_get_config(h.opt, NULL, 0, NULL), FUSEDOPT_ERROR_NULL, "NULL");
    CHECK(len > 8, "the length is written even when the buffer is too small");
    char *config = xmalloc(len + 1);
    OK(fusedopt_get_config(h.opt, config, len + 1, NULL));
    CHECK(strlen(config) == len && strstr(config, "weight_decay=0.1") != NULL, "%s", config);
    fusedopt_optimizer *copy = NULL;
    OK(fusedopt_new(config, &copy)); /* the written configuration parses back */
    OK(fusedopt_free(copy));
    free(config);
    pair_check(&p, "refused settings");
    pair_free(&p);
}

static void errors_state_files(void) {
    Pair p;
    pair_init(&p, "adam");
    H h = p.h;
    FAILS(fusedopt_save_state(h.opt, "/nonexistent-dir/x/y.state"), FUSEDOPT_ERROR_IO, "nonexistent");
    FAILS(fusedopt_save_state(h.opt, ""), FUSEDOPT_ERROR_INVALID_ARGUMENT, "empty");
    FAILS(fusedopt_save_state(h.opt, NULL), FUSEDOPT_ERROR_NULL, "path");
    FAILS(fusedopt_load_state(h.opt, file_in_dir("fusedopt-capi-missing.state")), FUSEDOPT_ERROR_IO,
          "missing");
    /* Not a state file. */
    char *junk = file_in_dir("fusedopt-capi-junk.state");
    FILE *f = fopen(junk, "wb");
    CHECK(f != NULL, "cannot write %s", junk);
    if (f) {
        fputs("not a state file", f);
        fclose(f);
    }
    FAILS(fusedopt_load_state(h.opt, junk), FUSEDOPT_ERROR_STATE_FILE, "junk");
    /* Another optimizer kind, another layout, a damaged file. */
    H sgd = h_new("momentum");
    float w[7] = {0}, g[7] = {1, 1, 1, 1, 1, 1, 1};
    OK(h_step(sgd, w, g, 7));
    char *other = file_in_dir("fusedopt-capi-momentum.state");
    h_save(sgd, other);
    FAILS(fusedopt_load_state(h.opt, other), FUSEDOPT_ERROR_STATE_FILE, "momentum");
    H adam7 = h_new("adam");
    OK(h_step(adam7, w, g, 7));
    char *seven = file_in_dir("fusedopt-capi-adam7.state");
    h_save(adam7, seven);
    FAILS(fusedopt_load_state(h.opt, seven), FUSEDOPT_ERROR_LAYOUT, "layout");
    /* A copy of it with one byte changed. */
    char *damaged = file_in_dir("fusedopt-capi-damaged.state");
    FILE *in = fopen(seven, "rb"), *out = fopen(damaged, "wb");
    CHECK(in && out, "cannot copy %s", seven);
    if (in && out) {
        int ch;
        long at = 0;
        while ((ch = fgetc(in)) != EOF) fputc(at++ == 200 ? ch ^ 1 : ch, out);
    }
    if (in) fclose(in);
    if (out) fclose(out);
    FAILS(fusedopt_load_state(h.opt, damaged), FUSEDOPT_ERROR_STATE_FILE, "damaged");
    h_free(sgd);
    h_free(adam7);
    pair_check(&p, "refused loads");
    pair_free(&p);
    remove(junk);
    remove(damaged);
    if (!trace) { /* the replay reads the saved files */
        remove(other);
        remove(seven);
    }
}

/* The last error is per thread. */
static void *fail_in_thread(void *arg) {
    (void)arg;
    fusedopt_set_lr(NULL, 1.0f);
    return NULL;
}
static void errors_are_thread_local(void) {
    fusedopt_optimizer *opt = NULL;
    FAILS(fusedopt_new("shampoo", &opt), FUSEDOPT_ERROR_INVALID_ARGUMENT, "shampoo");
    pthread_t t;
    CHECK(pthread_create(&t, NULL, fail_in_thread, NULL) == 0, "pthread_create");
    pthread_join(t, NULL);
    CHECK(strstr(fusedopt_last_error(), "shampoo") != NULL, "another thread's error leaked: %s",
          fusedopt_last_error());
    /* A success leaves the message alone. */
    OK(fusedopt_new("sgd", &opt));
    CHECK(strstr(fusedopt_last_error(), "shampoo") != NULL, "%s", fusedopt_last_error());
    OK(fusedopt_free(opt));
}

/* Different handles on different threads are independent: each thread's run gives the
 * single-threaded result bitwise. */
enum { THREADS = 4, THREAD_LEN = 5000, THREAD_STEPS = 20 };
static float thread_init[THREAD_LEN], thread_grads[THREAD_STEPS][THREAD_LEN];
static float thread_out[THREADS + 1][THREAD_LEN];

static void *train_alone(void *arg) {
    float *w = thread_out[(size_t)arg];
    memcpy(w, thread_init, sizeof thread_init);
    fusedopt_optimizer *opt = NULL;
    if (fusedopt_new("adamw:lr=0.01", &opt) != FUSEDOPT_OK) return (void *)1;
    for (int s = 0; s < THREAD_STEPS; s++)
        if (fusedopt_step(opt, w, THREAD_LEN, thread_grads[s], THREAD_LEN) != FUSEDOPT_OK) return (void *)1;
    return fusedopt_free(opt) == FUSEDOPT_OK ? NULL : (void *)1;
}

static void handles_on_threads(void) {
    fill(thread_init, THREAD_LEN, 1.0f);
    for (int s = 0; s < THREAD_STEPS; s++) fill(thread_grads[s], THREAD_LEN, 1.0f);
    CHECK(train_alone((void *)(size_t)THREADS) == NULL, "%s", fusedopt_last_error());
    pthread_t t[THREADS];
    for (size_t i = 0; i < THREADS; i++)
        CHECK(pthread_create(&t[i], NULL, train_alone, (void *)i) == 0, "pthread_create");
    for (size_t i = 0; i < THREADS; i++) {
        void *result = (void *)1;
        pthread_join(t[i], &result);
        CHECK(result == NULL, "thread %zu failed", i);
        CHECK(same_bits(thread_out[i], thread_out[THREADS], sizeof thread_init),
              "thread %zu's result differs", i);
    }
}

/* Getters and setters read back. */
static void settings_read_back(void) {
    H h = h_new("sgd");
    h_threads(h, 3);
    h_chunk(h, 100);
    h_scale(h, 512.0f);
    h_clip(h, 2.5f);
    size_t n = 0;
    float f = 0;
    int32_t on = 0;
    OK(fusedopt_get_threads(h.opt, &n));
    CHECK(n == 3, "threads %zu", n);
    OK(fusedopt_get_chunk_len(h.opt, &n));
    CHECK(n == 112, "chunk_len %zu (100 rounds up to a multiple of 16)", n);
    OK(fusedopt_get_grad_scale(h.opt, &f));
    CHECK(f == 512.0f, "scale %g", f);
    OK(fusedopt_get_max_grad_norm(h.opt, &on, &f));
    CHECK(on == 1 && f == 2.5f, "clip %d %g", on, f);
    h_clip(h, -1);
    OK(fusedopt_get_max_grad_norm(h.opt, &on, &f));
    CHECK(on == 0 && f == 0.0f, "clip %d %g", on, f);
    h_threads(h, 0);
    h_free(h);

    /* The settings struct: defaults, then each field set through it reads back through it and
     * through the per-setting functions. */
    h = h_new("adam");
    fusedopt_settings s = {.version = FUSEDOPT_SETTINGS_VERSION};
    OK(fusedopt_get_settings(h.opt, &s));
    CHECK(s.version == FUSEDOPT_SETTINGS_VERSION && s.backend == FUSEDOPT_BACKEND_SIMD &&
              s.threads == 0 && s.chunk_len == 0 && s.grad_scale == 1.0f && s.clip == 0 &&
              s.non_finite == FUSEDOPT_NON_FINITE_PROPAGATE && s.state_format == FUSEDOPT_STATE_F32,
          "default settings");
    s.backend = FUSEDOPT_BACKEND_PORTABLE;
    s.threads = 2;
    s.chunk_len = 1000;
    s.grad_scale = 64.0f;
    s.clip = 1;
    s.max_grad_norm = 0.75f;
    s.non_finite = FUSEDOPT_NON_FINITE_SKIP;
    s.state_format = FUSEDOPT_STATE_BF16;
    h_settings(h, &s);
    fusedopt_settings back = {.version = FUSEDOPT_SETTINGS_VERSION};
    OK(fusedopt_get_settings(h.opt, &back));
    s.chunk_len = 1008; /* rounded up to a multiple of 16 */
    CHECK(memcmp(&s, &back, sizeof s) == 0, "settings read back");
    OK(fusedopt_get_threads(h.opt, &n));
    CHECK(n == 2, "threads %zu", n);
    int32_t policy = 0;
    OK(fusedopt_get_non_finite(h.opt, &policy));
    CHECK(policy == FUSEDOPT_NON_FINITE_SKIP, "policy %d", policy);
    OK(fusedopt_get_max_grad_norm(h.opt, &on, &f));
    CHECK(on == 1 && f == 0.75f, "clip %d %g", on, f);
    h_free(h);

    /* Every backend and thread count steps to the same bits (the trace checks them against the
     * Rust API too). */
    enum { N = 3000 };
    float *ref = NULL;
    for (int32_t b = FUSEDOPT_BACKEND_SIMD; b <= FUSEDOPT_BACKEND_AVX2; b++) {
        float *w = xmalloc(N * 4), *g = xmalloc(N * 4);
        rng_state = 777;
        fill(w, N, 1.0f);
        H hb = h_new("adamw:weight_decay=0.1");
        fusedopt_settings sb = {.version = FUSEDOPT_SETTINGS_VERSION};
        OK(fusedopt_get_settings(hb.opt, &sb));
        sb.backend = b;
        sb.threads = (size_t)b % 3;
        sb.chunk_len = 256;
        sb.clip = 1;
        sb.max_grad_norm = 1.0f;
        h_settings(hb, &sb);
        for (int step = 0; step < 3; step++) {
            fill(g, N, 0.5f);
            OK(h_step(hb, w, g, N));
        }
        if (ref == NULL)
            ref = w;
        else {
            CHECK(same_bits(ref, w, N * 4), "backend %d changed the bits", b);
            free(w);
        }
        free(g);
        h_free(hb);
    }
    free(ref);
    CHECK(strlen(fusedopt_version()) > 0, "version");
    const char *level = fusedopt_simd_level();
    CHECK(!strcmp(level, "avx2") || !strcmp(level, "portable") || !strcmp(level, "scalar"), "%s", level);
}

/* ------------------------------------------------------------------------------------------ */
/* Benchmark mode                                                                              */
/* ------------------------------------------------------------------------------------------ */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int bench(int rounds) {
    enum { N = 4096, ITERS = 2000 };
    float *w = xmalloc(N * 4), *g = xmalloc(N * 4);
    fill(w, N, 1.0f);
    fill(g, N, 1e-3f);
    fusedopt_optimizer *opt = NULL;
    OK(fusedopt_new("adam", &opt));
    double *c = xmalloc((size_t)rounds * sizeof(double)), *r = xmalloc((size_t)rounds * sizeof(double));
    double *ratio = xmalloc((size_t)rounds * sizeof(double));
    for (int k = 0; k < 2 * ITERS; k++) OK(fusedopt_step(opt, w, N, g, N)); /* warm up */
    for (int round = 0; round < rounds; round++) {
        for (int half = 0; half < 2; half++) {
            if ((half == 0) == (round % 2 == 0)) {
                double t0 = now();
                for (int k = 0; k < ITERS; k++) {
                    if (fusedopt_step(opt, w, N, g, N) != FUSEDOPT_OK) return 1;
                }
                c[round] = (now() - t0) / ITERS;
            } else {
                double secs = 0;
                OK(fusedopt_time_rust_steps(opt, w, g, N, ITERS, &secs));
                r[round] = secs / ITERS;
            }
        }
        ratio[round] = c[round] / r[round];
    }
    qsort(c, (size_t)rounds, sizeof(double), cmp_double);
    qsort(r, (size_t)rounds, sizeof(double), cmp_double);
    qsort(ratio, (size_t)rounds, sizeof(double), cmp_double);
    printf("4096-parameter Adam step (%s kernels), %d alternating rounds of %d steps, medians:\n",
           fusedopt_simd_level(), rounds, ITERS);
    printf("  C ABI (fusedopt_step)     %8.1f ns\n", 1e9 * c[rounds / 2]);
    printf("  Rust API (Optimizer::step) %7.1f ns\n", 1e9 * r[rounds / 2]);
    printf("  ratio C / Rust: %.3f (per round: min %.3f, max %.3f)\n", ratio[rounds / 2], ratio[0],
           ratio[rounds - 1]);
    OK(fusedopt_free(opt));
    free(w);
    free(g);
    free(c);
    free(r);
    free(ratio);
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    const char *trace_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bench")) return bench(i + 1 < argc ? atoi(argv[i + 1]) : 21);
        if (!strcmp(argv[i], "--trace") && i + 1 < argc) trace_path = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--trace FILE] [--dir DIR] | --bench [ROUNDS]\n", argv[0]);
            return 2;
        }
    }
    if (trace_path) {
        trace = fopen(trace_path, "wb");
        if (!trace) {
            perror(trace_path);
            return 2;
        }
        fwrite("FOTRACE1", 1, 8, trace);
    }
    every_optimizer_every_length();
    whole_model_with_every_option();
    missing_gradients();
    low_precision();
    non_finite_gradients();
    state_files();
    settings_read_back();
    handles_on_threads();
    errors_creating();
    errors_null_handle();
    errors_stepping();
    errors_settings();
    errors_state_files();
    errors_are_thread_local();
    if (trace) {
        tr_u8('E');
        fclose(trace);
    }
    printf("test_capi: %d checks, %d failed (library %s, %s kernels)\n", checks, failures,
           fusedopt_version(), fusedopt_simd_level());
    return failures ? 1 : 0;
}
