/* Internal: the active microkernel tables. */
#ifndef BN_DISPATCH_H
#define BN_DISPATCH_H

#include "bn_simd.h"
#include "ukernels.h"

const bn_uk_f32* bn_uk_active_f32(void);
const bn_uk_f64* bn_uk_active_f64(void);

#endif /* BN_DISPATCH_H */
