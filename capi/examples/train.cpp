// fusedopt from C++: the C header wrapped in a small RAII class that throws on errors, used to
// fit a linear model y = W x + b (8 inputs, 4 outputs) by least squares.
//
//   cargo build --release -p fusedopt-capi
//   c++ -std=c++17 -O2 -Icapi/include capi/examples/train.cpp -Ltarget/release -lfusedopt
//       -Wl,-rpath,$PWD/target/release -o train_cpp && ./train_cpp
//
// Exits with 1 unless the fit recovers the true weights to 1e-2.
#include "fusedopt.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace fo {

// A fusedopt status other than FUSEDOPT_OK, with the library's message.
struct Error : std::runtime_error {
    fusedopt_status status;
    explicit Error(fusedopt_status s)
        : std::runtime_error(std::string(fusedopt_status_name(s)) + ": " + fusedopt_last_error()),
          status(s) {}
};

inline void check(fusedopt_status s) {
    if (s != FUSEDOPT_OK) throw Error(s);
}

// One optimizer; movable, not copyable; freed by the destructor.
class Optimizer {
  public:
    explicit Optimizer(const std::string &config) { check(fusedopt_new(config.c_str(), &opt_)); }
    Optimizer(Optimizer &&other) noexcept : opt_(other.opt_) { other.opt_ = nullptr; }
    Optimizer(const Optimizer &) = delete;
    Optimizer &operator=(const Optimizer &) = delete;
    ~Optimizer() { fusedopt_free(opt_); }

    void set_lr(float lr) { check(fusedopt_set_lr(opt_, lr)); }

    // One update of every tensor: weights[i] and grads[i] have the same size.
    void step(std::vector<std::vector<float>> &weights, const std::vector<std::vector<float>> &grads) {
        if (weights.size() != grads.size()) throw std::invalid_argument("one gradient per tensor");
        std::vector<float *> w;
        std::vector<const float *> g;
        std::vector<size_t> lens;
        for (size_t i = 0; i < weights.size(); i++) {
            if (weights[i].size() != grads[i].size())
                throw std::invalid_argument("tensor " + std::to_string(i) + ": sizes differ");
            w.push_back(weights[i].data());
            g.push_back(grads[i].data());
            lens.push_back(weights[i].size());
        }
        check(fusedopt_step_many(opt_, w.data(), g.data(), lens.data(), w.size()));
    }

    uint64_t steps() const {
        uint64_t n = 0;
        check(fusedopt_get_steps(opt_, &n));
        return n;
    }

  private:
    fusedopt_optimizer *opt_ = nullptr;
};

}  // namespace fo

int main() {
    constexpr size_t In = 8, Out = 4, Samples = 256;
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> true_w(Out * In), true_b(Out), xs(Samples * In), ys(Samples * Out);
    for (auto &v : true_w) v = u(rng);
    for (auto &v : true_b) v = u(rng);
    for (auto &v : xs) v = u(rng);
    for (size_t n = 0; n < Samples; n++)
        for (size_t o = 0; o < Out; o++) {
            float y = true_b[o];
            for (size_t i = 0; i < In; i++) y += true_w[o * In + i] * xs[n * In + i];
            ys[n * Out + o] = y;
        }

    std::vector<std::vector<float>> params{std::vector<float>(Out * In), std::vector<float>(Out)};
    std::vector<std::vector<float>> grads{std::vector<float>(Out * In), std::vector<float>(Out)};
    fo::Optimizer opt("nag:lr=0.1,momentum=0.9");
    try {
        fo::Optimizer("adam:beta1=2");
        return 1;  // not reached: the configuration is refused
    } catch (const fo::Error &e) {
        std::printf("refused as expected: %s\n", e.what());
    }

    for (int step = 0; step < 300; step++) {
        for (auto &g : grads) std::fill(g.begin(), g.end(), 0.0f);
        for (size_t n = 0; n < Samples; n++)
            for (size_t o = 0; o < Out; o++) {
                float y = params[1][o];
                for (size_t i = 0; i < In; i++) y += params[0][o * In + i] * xs[n * In + i];
                float d = (y - ys[n * Out + o]) / Samples;
                for (size_t i = 0; i < In; i++) grads[0][o * In + i] += d * xs[n * In + i];
                grads[1][o] += d;
            }
        opt.step(params, grads);
    }
    float err = 0;
    for (size_t k = 0; k < Out * In; k++) err = std::fmax(err, std::fabs(params[0][k] - true_w[k]));
    for (size_t o = 0; o < Out; o++) err = std::fmax(err, std::fabs(params[1][o] - true_b[o]));
    std::printf("after %llu steps of NAG the largest weight error is %.2e\n",
                static_cast<unsigned long long>(opt.steps()), err);
    return err < 1e-2f ? 0 : 1;
}
