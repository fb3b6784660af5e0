/* bn_simd from C: batch norm's inference and one training step (forward, backward) on a small channels-last (NHWC)
 * float32 batch, through the public API of libbn_simd (bn_simd_api.h).
 *
 * Build against an installed library (CMake install, or the Python wheel's copy):
 *   cc bn_example.c $(pkg-config --cflags --libs bn_simd) -o bn_example
 *   LIB="$(python -c 'import bn_simd; print(bn_simd.get_library_dirs()[0])')"
 *   cc bn_example.c -I"$(python -c 'import bn_simd; print(bn_simd.get_include())')" \
 *      -L"$LIB" -Wl,-rpath,"$LIB" -lbn_simd -o bn_example
 * or with CMake (examples/c/CMakeLists.txt: find_package(bn_simd)). It prints every result as "name v0 v1 ..."
 * (%.9g: float32 round trip), which tests/test_c_library.py compares with the Python package's. */
#include <stdio.h>
#include <stdlib.h>

#include "bn_simd_api.h"

enum { N = 2, H = 3, W = 3, C = 4, E = N * H * W * C };

static void print(const char* name, const float* v, int n) {
    printf("%s", name);
    for (int i = 0; i < n; i++) printf(" %.9g", v[i]);
    printf("\n");
}

/* Exits with the status's message when a call fails. */
static void check(int status, const char* what) {
    if (status != BN_OK) {
        fprintf(stderr, "%s: %s\n", what, bn_strerror(status));
        exit(1);
    }
}

int main(void) {
    /* inputs from a formula that NumPy reproduces exactly (tests/test_c_library.py) */
    static float x[E], dy[E], y[E], dx[E];
    for (int i = 0; i < E; i++) {
        x[i] = (float)(((i * 37) % 101) / 25.0 - 2.0);
        dy[i] = (float)(((i * 53) % 89) / 40.0 - 1.0);
    }
    float weight[C] = {1.0f, 0.5f, 2.0f, -1.0f}, bias[C] = {0.0f, 0.25f, -0.5f, 1.0f};
    float running_mean[C] = {0.1f, -0.2f, 0.0f, 0.3f}, running_var[C] = {1.0f, 0.5f, 2.0f, 1.5f};
    float save_mean[C], save_invstd[C], grad_weight[C], grad_bias[C];
    const double eps = 1e-5, momentum = 0.1;

    /* the tensor: N samples, C channels, H W positions, channels-last, float32 data and float32 per-channel arrays */
    const bn_desc d = {BN_F32, BN_F32, BN_LAYOUT_NHWC, N, C, H * W};
    printf("version %s\n", bn_version());

    /* inference with the running statistics (the default context; the library allocates its scratch) */
    check(bn_batch_norm_inference(NULL, &d, x, y, running_mean, running_var, weight, bias, eps, NULL, 0), "inference");
    print("y_eval", y, E);

    /* a training step, with scratch memory of our own: the call then allocates nothing */
    size_t bytes = 0;
    check(bn_workspace_size(NULL, BN_OP_BATCH_NORM_TRAINING, &d, 0, &bytes), "workspace_size");
    void* workspace = malloc(bytes);
    if (!workspace) return 1;
    check(bn_batch_norm_training(NULL, &d, x, y, weight, bias, eps, momentum, running_mean, running_var, save_mean,
                                 save_invstd, workspace, bytes),
          "training");
    free(workspace);
    print("y_train", y, E);
    print("save_mean", save_mean, C);
    print("save_invstd", save_invstd, C);
    print("running_mean", running_mean, C);
    print("running_var", running_var, C);

    check(bn_batch_norm_backward(NULL, &d, dy, x, dx, save_mean, save_invstd, weight, 1, grad_weight, grad_bias,
                                 NULL, 0),
          "backward");
    print("dx", dx, E);
    print("grad_weight", grad_weight, C);
    print("grad_bias", grad_bias, C);

    /* a wrong argument is a status, and nothing is written */
    const int st = bn_batch_norm_inference(NULL, &d, x, y, running_mean, running_var, weight, bias, -1.0, NULL, 0);
    printf("bad_eps %d %s\n", st, bn_strerror(st));
    return 0;
}
