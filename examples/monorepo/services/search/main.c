/* search: scores 32 documents for a query (libhash, libstore) and returns the best three. */
#include <stdio.h>

#include "hash.h"
#include "store.h"
#include "svc.h"

enum { DOCS = 32, TOP = 3 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint32_t query = svc_fold(req, len);
    uint32_t score[DOCS];
    unsigned best[TOP] = {0, 0, 0};
    uint32_t bias = store_digest(query);
    for (unsigned d = 0; d < DOCS; ++d)
        score[d] = hash_digest(query ^ (d * 0x85ebca6bu)) ^ bias;
    for (unsigned t = 0; t < TOP; ++t) {
        unsigned pick = DOCS;
        for (unsigned d = 0; d < DOCS; ++d) {
            int taken = 0;
            for (unsigned u = 0; u < t; ++u)
                taken |= best[u] == d;
            if (!taken && (pick == DOCS || score[d] > score[pick]))
                pick = d;
        }
        best[t] = pick;
    }
    snprintf(out, size, "top=doc%02u,doc%02u,doc%02u", best[0], best[1], best[2]);
    return score[best[0]] ^ score[best[1]] ^ score[best[2]];
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "q=sticky disks"};
    return svc_main(argc, argv, &svc);
}
