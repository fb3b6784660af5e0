/* The drivers' scratch memory: see scratch.h. */
#include "scratch.h"

#include <stdint.h>
#include <stdlib.h>

_Thread_local bn_arena* bn_tls_arena = NULL;

void* bn_scratch_malloc(size_t n) {
    bn_arena* a = bn_tls_arena;
    if (!a) return malloc(n);
    /* bump allocation, each block on a 64-byte boundary (the drivers align within a block themselves) */
    const uintptr_t start = ((uintptr_t)a->base + a->used + 63) & ~(uintptr_t)63;
    const size_t off = (size_t)(start - (uintptr_t)a->base);
    if (off > a->size || n > a->size - off) {
        a->exhausted = 1;
        return NULL;
    }
    a->used = off + n;
    return (void*)start;
}

void bn_scratch_free(void* p) {
    bn_arena* a = bn_tls_arena;
    /* an arena's blocks live until the call ends (the API resets it); anything else came from the heap */
    if (a && (uintptr_t)p >= (uintptr_t)a->base && (uintptr_t)p < (uintptr_t)a->base + a->size) return;
    free(p);
}
