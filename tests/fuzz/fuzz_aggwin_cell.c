/*
 * libFuzzer target for aggregation cells read back from shared memory after a crash
 * (csrc/aggwin.c): arbitrary bytes are taken as a cell; m3_agg_cell_check must refuse it or
 * repair it so that applying samples and finalising never crash, read or write outside the
 * cell, or hit undefined behaviour (ASan+UBSan watch). The input's first 32 bytes also serve
 * as parameters for a fresh cell that gets the same treatment.
 * Inputs are capped at 64 KiB (-max_len in tests/fuzz/run.sh).
 *
 * fuzz-sources: csrc/aggwin.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define OUT_CAP 4096

static void exercise(uint8_t *cell, uint64_t cap, const uint8_t *data, size_t size)
{
    static m3_agg_out out[OUT_CAP];
    int64_t ts[16];
    double v[16];
    size_t n = 0;
    for (size_t i = 0; i + 16 <= size && n < 16; i += 16, n++) {
        memcpy(&ts[n], data + i, 8);
        memcpy(&v[n], data + i + 8, 8);
        ts[n] %= INT64_C(1) << 40;  /* mostly plausible times, some not */
    }
    size_t nout = 0, done = 0;
    uint32_t next = 0;
    int64_t now = n ? ts[0] : 0;
    m3_agg_apply(cell, cap, 1, 0, 0, ts, v, n, now, out, OUT_CAP, &nout, &done);
    nout = 0;
    m3_agg_finalise(cell, cap, 1, 0, now + 1000000, out, OUT_CAP, &nout, &next);
    nout = 0;
    m3_agg_finalise(cell, cap, 1, 0, INT64_MAX, out, OUT_CAP, &nout, &next);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* an exact-size, 8-aligned heap copy so ASan sees every access past the cell */
    uint64_t cap = (size + 7) & ~(uint64_t)7;
    uint8_t *cell = aligned_alloc(8, cap ? cap : 8);
    memset(cell, 0, cap ? cap : 8);
    memcpy(cell, data, size);
    if (m3_agg_cell_check(cell, cap) == M3_OK) exercise(cell, cap, data, size);
    free(cell);

    m3_agg_params p;
    if (size < sizeof(p)) return 0;
    memcpy(&p, data, sizeof(p));
    uint64_t need = m3_agg_cell_bytes(&p);
    if (need == 0 || need > (1u << 20)) return 0;
    cell = aligned_alloc(8, need);
    if (m3_agg_cell_init(cell, need, &p) == M3_OK) {
        exercise(cell, need, data + sizeof(p), size - sizeof(p));
        exercise(cell, need, data, size);
    }
    free(cell);
    return 0;
}
