/*
 * lttb.c -- Largest-Triangle-Three-Buckets downsampling of one series (Steinarsson, 2013).
 *
 * Used by query_range's m3shm-specific `max_points` parameter: a series of n points is cut
 * to `threshold` points that keep its visual shape, spikes included. The first and last
 * points are always kept; the n - 2 points between are split into threshold - 2 buckets of
 * (nearly) equal counts, and from each bucket the point forming the largest triangle with the
 * point kept from the previous bucket and the average of the next bucket is kept.
 *
 * Invariants: output indices are strictly increasing, start at 0 and end at n - 1; when
 * n <= threshold (or threshold < 3) every index is returned. A NaN value never wins a bucket
 * unless the whole bucket is NaN (then its first point is kept). Time is x, value is y;
 * areas are computed in double (timestamps in ms fit a double exactly below 2^53).
 */
#include <stdint.h>
#include <stddef.h>
#include <math.h>

#include "m3shm.h"

size_t m3_lttb(const int64_t *ts, const double *v, size_t n, size_t threshold,
               uint32_t *out)
{
    if (n <= threshold || threshold < 3) {
        for (size_t i = 0; i < n; i++)
            out[i] = (uint32_t)i;
        return n;
    }
    size_t k = 0;
    out[k++] = 0;
    double every = (double)(n - 2) / (double)(threshold - 2);
    size_t a = 0;
    for (size_t b = 0; b < threshold - 2; b++) {
        size_t lo = (size_t)(b * every) + 1, hi = (size_t)((b + 1) * every) + 1;
        if (hi > n - 1)
            hi = n - 1;
        /* average of the next bucket (the last point for the last bucket) */
        size_t nlo = hi, nhi = (size_t)((b + 2) * every) + 1;
        if (nhi > n)
            nhi = n;
        if (b == threshold - 3) {
            nlo = n - 1;
            nhi = n;
        }
        double cx = 0, cy = 0;
        size_t cn = 0;
        for (size_t i = nlo; i < nhi; i++) {
            cx += (double)ts[i];
            if (!isnan(v[i])) {
                cy += v[i];
                cn++;
            }
        }
        cx /= (double)(nhi - nlo);
        cy = cn ? cy / (double)cn : 0.0;
        double ax = (double)ts[a], ay = isnan(v[a]) ? 0.0 : v[a];
        size_t best = lo;
        double best_area = -1.0;
        for (size_t i = lo; i < hi; i++) {
            double area = fabs((ax - cx) * (v[i] - ay) - (ax - (double)ts[i]) * (cy - ay));
            if (area > best_area) { /* false for NaN */
                best_area = area;
                best = i;
            }
        }
        out[k++] = (uint32_t)best;
        a = best;
    }
    out[k++] = (uint32_t)(n - 1);
    return k;
}
