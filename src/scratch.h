/* Internal: the drivers' scratch memory. A public API call given a workspace (api.c) points the calling thread's
 * arena at it; the drivers' allocations (batchnorm.c maps malloc and free to these) then come from it, 64-byte
 * aligned, and none from the heap: an arena that runs out gives NULL (the driver's BN_ENOMEM, which the API reports
 * as BN_EWORKSPACE). Without an arena (the Python bridge, calls given no workspace) they are malloc and free. The
 * drivers allocate only on the thread that called them, outside their parallel regions. */
#ifndef BN_SCRATCH_H
#define BN_SCRATCH_H

#include <stddef.h>

typedef struct bn_arena {
    char* base;
    size_t size;
    size_t used;
    int exhausted; /* set when an allocation did not fit */
} bn_arena;

/* The calling thread's arena, NULL: the heap. */
extern _Thread_local bn_arena* bn_tls_arena;

void* bn_scratch_malloc(size_t n);
void bn_scratch_free(void* p);

#endif /* BN_SCRATCH_H */
