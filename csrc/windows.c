/*
 * windows.c -- where every (series, step) window of a query lies in its flat samples.
 *
 * The engine evaluates a selector for all series and all steps at once: series i's samples
 * are ts[offs[i], offs[i+1]), sorted; step s asks for the samples with start[s] <= t <=
 * end[s]. This fills lo/hi (row-major, nseries x nsteps) with the bounds lo <= j < hi of every
 * such window. Steps come in time order (start and end never decrease, which the caller
 * checks), so two cursors walk each series once: O(samples + series x steps), no search.
 */
#include <stdint.h>
#include <stddef.h>

#include "m3shm.h"

int m3_windows(const int64_t *ts, const int64_t *offs, size_t nseries, const int64_t *start,
               const int64_t *end, size_t nsteps, int64_t *lo, int64_t *hi)
{
    for (size_t s = 1; s < nsteps; s++)
        if (start[s] < start[s - 1] || end[s] < end[s - 1])
            return M3_EINVAL;
    for (size_t i = 0; i < nseries; i++) {
        int64_t a = offs[i], b = offs[i + 1];
        if (a > b)
            return M3_EINVAL;
        int64_t l = a, h = a;
        int64_t *lo_row = lo + i * nsteps, *hi_row = hi + i * nsteps;
        for (size_t s = 0; s < nsteps; s++) {
            while (l < b && ts[l] < start[s])
                l++;
            if (h < l)
                h = l;
            while (h < b && ts[h] <= end[s])
                h++;
            lo_row[s] = l;
            hi_row[s] = h;
        }
    }
    return M3_OK;
}
