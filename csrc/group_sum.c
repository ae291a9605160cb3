/*
 * group_sum.c -- sum and count of an instant-vector matrix by group, in one pass (PromQL's
 * sum/avg/count/group aggregations).
 *
 * Input: nrows x nsteps values (row-major doubles), a presence byte per value (0 or 1), and
 * per row its group (0 <= gid < ngroups). Output: per group and step the sum of its rows'
 * values and the number of rows present; an absent value counts as 0.0 in the sum.
 *
 * Order of the additions (it matters for floats): within a group, rows in input order, the
 * first row's value (or 0.0) as the starting value, then each next one added -- exactly what
 * numpy's add.reduceat gives over the rows sorted stably by group, the Python path this
 * replaces (no temporary copy of the sorted matrix, no gather). Invariant: every group has
 * at least one row (the caller's grouping guarantees it); a group without rows reads 0.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "m3shm.h"

int m3_group_sum(const double *vals, const uint8_t *present, const int64_t *gid, size_t nrows,
                 size_t nsteps, size_t ngroups, double *sum, int64_t *cnt, uint8_t *seen)
{
    if ((nrows && nsteps && (!vals || !present || !gid)) || !sum || !cnt || !seen)
        return M3_EINVAL;
    memset(sum, 0, ngroups * nsteps * sizeof *sum);
    memset(cnt, 0, ngroups * nsteps * sizeof *cnt);
    memset(seen, 0, ngroups);
    for (size_t r = 0; r < nrows; r++) {
        int64_t g = gid[r];
        if (g < 0 || (uint64_t)g >= ngroups)
            return M3_EINVAL;
        const double *v = vals + r * nsteps;
        const uint8_t *p = present + r * nsteps;
        double *s = sum + (size_t)g * nsteps;
        int64_t *c = cnt + (size_t)g * nsteps;
        if (!seen[g]) {   /* the group's first row starts its sums */
            seen[g] = 1;
            for (size_t j = 0; j < nsteps; j++) {
                s[j] = p[j] ? v[j] : 0.0;
                c[j] = p[j] != 0;
            }
        } else {
            for (size_t j = 0; j < nsteps; j++) {
                s[j] += p[j] ? v[j] : 0.0;
                c[j] += p[j] != 0;
            }
        }
    }
    return M3_OK;
}
