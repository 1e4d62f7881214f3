/*
 * A small C trainer on fusedopt: a two-layer network (2 -> 16 tanh -> 1 sigmoid) learns whether
 * a point lies inside a circle, from 512 points it generates. AdamW, a cosine learning-rate
 * schedule, no weight decay on the biases (parameter groups), gradient clipping, and a state
 * file saved at the end and loaded back.
 *
 *   cargo build --release -p fusedopt-capi
 *   cc -O2 -Icapi/include capi/examples/train.c -Ltarget/release -lfusedopt -lm \
 *      -Wl,-rpath,$PWD/target/release -o train && ./train [STATE_FILE]
 *
 * Exits with 1 unless the network classifies at least 90% of the points right.
 */
#include "fusedopt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define N 512    /* samples */
#define H 16     /* hidden units */
#define STEPS 400

/* The model: four tensors, each a flat float array. */
static float w1[H * 2], b1[H], w2[H], b2[1];
static float gw1[H * 2], gb1[H], gw2[H], gb2[1];
static float x[N][2], y[N];

static uint32_t seed = 7;
static float uniform(void) { /* in [-1, 1) */
    seed = seed * 1664525u + 1013904223u;
    return (float)(seed >> 8) / 8388608.0f - 1.0f;
}

/* Full-batch forward and backward pass: fills the gradients, returns the mean log loss and the
 * accuracy. */
static float loss_and_grads(float *accuracy) {
    float loss = 0;
    int right = 0;
    for (int k = 0; k < H * 2; k++) gw1[k] = 0;
    for (int k = 0; k < H; k++) gb1[k] = gw2[k] = 0;
    gb2[0] = 0;
    for (int n = 0; n < N; n++) {
        float h[H], z = b2[0];
        for (int j = 0; j < H; j++) {
            h[j] = tanhf(w1[2 * j] * x[n][0] + w1[2 * j + 1] * x[n][1] + b1[j]);
            z += w2[j] * h[j];
        }
        float p = 1.0f / (1.0f + expf(-z));
        loss -= y[n] * logf(p + 1e-7f) + (1 - y[n]) * logf(1 - p + 1e-7f);
        right += (p > 0.5f) == (y[n] > 0.5f);
        float dz = (p - y[n]) / N; /* d loss / d z */
        gb2[0] += dz;
        for (int j = 0; j < H; j++) {
            gw2[j] += dz * h[j];
            float dh = dz * w2[j] * (1 - h[j] * h[j]);
            gw1[2 * j] += dh * x[n][0];
            gw1[2 * j + 1] += dh * x[n][1];
            gb1[j] += dh;
        }
    }
    *accuracy = (float)right / N;
    return loss / N;
}

#define TRY(call)                                                                                  \
    do {                                                                                           \
        fusedopt_status status_ = (call);                                                          \
        if (status_ != FUSEDOPT_OK) {                                                              \
            fprintf(stderr, "%s failed: %s: %s\n", #call, fusedopt_status_name(status_),           \
                    fusedopt_last_error());                                                        \
            exit(2);                                                                               \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv) {
    const char *state_file = argc > 1 ? argv[1] : "/tmp/fusedopt-train-c.state";
    for (int n = 0; n < N; n++) {
        x[n][0] = uniform();
        x[n][1] = uniform();
        y[n] = x[n][0] * x[n][0] + x[n][1] * x[n][1] < 0.5f ? 1.0f : 0.0f;
    }
    for (int k = 0; k < H * 2; k++) w1[k] = uniform();
    for (int k = 0; k < H; k++) w2[k] = 0.5f * uniform();

    /* The model as fusedopt sees it: four tensors, their gradients and lengths. */
    float *weights[4] = {w1, b1, w2, b2};
    const float *grads[4] = {gw1, gb1, gw2, gb2};
    const size_t lens[4] = {H * 2, H, H, 1};
    const fusedopt_param_group groups[4] = {
        {1.0f, 0.0f, 0}, /* w1: the configured weight decay */
        {1.0f, 0.0f, 1}, /* b1: none */
        {1.0f, 0.0f, 0}, /* w2 */
        {1.0f, 0.0f, 1}, /* b2: none */
    };

    fusedopt_optimizer *opt;
    TRY(fusedopt_new("adamw:lr=0.05,weight_decay=0.01", &opt));
    TRY(fusedopt_set_param_groups(opt, groups, 4));
    TRY(fusedopt_set_max_grad_norm(opt, 1.0f));
    printf("fusedopt %s (%s kernels): AdamW on a 2-16-1 network, %d samples\n", fusedopt_version(),
           fusedopt_simd_level(), N);

    float loss = 0, accuracy = 0;
    for (int step = 0; step < STEPS; step++) {
        float lr = 0.05f * 0.5f * (1.0f + cosf(3.14159265f * (float)step / STEPS));
        TRY(fusedopt_set_lr(opt, lr));
        loss = loss_and_grads(&accuracy);
        TRY(fusedopt_step_many(opt, weights, grads, lens, 4));
        if (step % 50 == 0) {
            fusedopt_report report;
            TRY(fusedopt_last_report(opt, &report));
            printf("step %3d  loss %.4f  accuracy %.3f  grad norm %.4f\n", step, loss, accuracy,
                   report.grad_norm);
        }
    }
    loss = loss_and_grads(&accuracy);
    printf("final     loss %.4f  accuracy %.3f\n", loss, accuracy);

    /* Save, and load into a new optimizer: it carries on where this one stopped. */
    TRY(fusedopt_save_state(opt, state_file));
    fusedopt_optimizer *resumed;
    TRY(fusedopt_new("adamw", &resumed));
    TRY(fusedopt_load_state(resumed, state_file));
    uint64_t steps;
    TRY(fusedopt_get_steps(resumed, &steps));
    printf("state saved to %s and loaded back at step %llu\n", state_file, (unsigned long long)steps);
    TRY(fusedopt_free(opt));
    TRY(fusedopt_free(resumed));
    remove(state_file);
    return accuracy >= 0.9f && steps == STEPS ? 0 : 1;
}
