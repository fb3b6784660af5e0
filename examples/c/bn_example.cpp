// bn_simd from C++: the same steps as bn_example.c (inference, a training step), with the library's tasks run on a
// thread pool of the program's own through bn_context_set_parallel_for instead of OpenMP: the results are the same
// bits. Build: c++ -std=c++17 bn_example.cpp $(pkg-config --cflags --libs bn_simd) -pthread, or CMake
// (examples/c/CMakeLists.txt).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bn_simd_api.h"

namespace {

constexpr int N = 2, H = 3, W = 3, C = 4, E = N * H * W * C;

// A minimal pool: each parallel_for starts `threads` workers that take task indices from a shared counter.
struct Pool {
    int threads;
    static void parallel_for(void* self, int64_t n, bn_task_fn task, void* arg) {
        const int nt = static_cast<Pool*>(self)->threads;
        std::atomic<int64_t> next{0};
        auto work = [&] {
            for (int64_t i; (i = next.fetch_add(1)) < n;) task(arg, i);
        };
        std::vector<std::thread> workers;
        for (int t = 1; t < nt; t++) workers.emplace_back(work);
        work();
        for (auto& w : workers) w.join();
    }
};

// Throws with the status's message when a call fails.
void check(int status, const char* what) {
    if (status != BN_OK) throw std::runtime_error(std::string(what) + ": " + bn_strerror(status));
}

void print(const char* name, const std::vector<float>& v) {
    std::printf("%s", name);
    for (float f : v) std::printf(" %.9g", f);
    std::printf("\n");
}

}  // namespace

int main() {
    std::vector<float> x(E), dy(E), y(E), dx(E);
    for (int i = 0; i < E; i++) {
        x[i] = static_cast<float>(((i * 37) % 101) / 25.0 - 2.0);
        dy[i] = static_cast<float>(((i * 53) % 89) / 40.0 - 1.0);
    }
    std::vector<float> weight{1.0f, 0.5f, 2.0f, -1.0f}, bias{0.0f, 0.25f, -0.5f, 1.0f};
    std::vector<float> running_mean{0.1f, -0.2f, 0.0f, 0.3f}, running_var{1.0f, 0.5f, 2.0f, 1.5f};
    std::vector<float> save_mean(C), save_invstd(C), grad_weight(C), grad_bias(C);
    const double eps = 1e-5, momentum = 0.1;
    const bn_desc d{BN_F32, BN_F32, BN_LAYOUT_NHWC, N, C, H * W};

    // a context of our own: our pool, 3 tasks per op
    Pool pool{3};
    std::unique_ptr<bn_context, void (*)(bn_context*)> ctx(bn_context_create(), bn_context_destroy);
    if (!ctx) return 1;
    check(bn_context_set_num_threads(ctx.get(), 3), "set_num_threads");
    check(bn_context_set_parallel_for(ctx.get(), &Pool::parallel_for, &pool), "set_parallel_for");

    try {
        std::printf("version %s\n", bn_version());
        check(bn_batch_norm_inference(ctx.get(), &d, x.data(), y.data(), running_mean.data(), running_var.data(),
                                      weight.data(), bias.data(), eps, nullptr, 0),
              "inference");
        print("y_eval", y);
        check(bn_batch_norm_training(ctx.get(), &d, x.data(), y.data(), weight.data(), bias.data(), eps, momentum,
                                     running_mean.data(), running_var.data(), save_mean.data(), save_invstd.data(),
                                     nullptr, 0),
              "training");
        print("y_train", y);
        print("save_mean", save_mean);
        print("save_invstd", save_invstd);
        print("running_mean", running_mean);
        print("running_var", running_var);
        check(bn_batch_norm_backward(ctx.get(), &d, dy.data(), x.data(), dx.data(), save_mean.data(),
                                     save_invstd.data(), weight.data(), 1, grad_weight.data(), grad_bias.data(),
                                     nullptr, 0),
              "backward");
        print("dx", dx);
        print("grad_weight", grad_weight);
        print("grad_bias", grad_bias);
        const int st = bn_batch_norm_inference(ctx.get(), &d, x.data(), y.data(), running_mean.data(),
                                               running_var.data(), weight.data(), bias.data(), -1.0, nullptr, 0);
        std::printf("bad_eps %d %s\n", st, bn_strerror(st));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
