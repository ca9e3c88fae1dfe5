/* inventory: counts an item's stock in each warehouse (libstore pages). */
#include <stdio.h>

#include "store.h"
#include "svc.h"

enum { WAREHOUSES = 4 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint32_t item = svc_fold(req, len);
    unsigned stock[WAREHOUSES];
    unsigned total = 0;
    for (unsigned w = 0; w < WAREHOUSES; ++w) {
        stock[w] = (unsigned)(store_digest(item + w) % 500u);
        total += stock[w];
    }
    snprintf(out, size, "stock=%u,%u,%u,%u total=%u", stock[0], stock[1], stock[2], stock[3],
             total);
    return item ^ (uint32_t)total * 0x27d4eb2du;
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "sku:HEALTH-0001"};
    return svc_main(argc, argv, &svc);
}
