/* catalog: finds an item's page in the store (libstore) and encodes its record (libcodec). */
#include <stdio.h>

#include "codec.h"
#include "store.h"
#include "svc.h"

struct item {
    uint32_t id;
    uint32_t page;
    uint16_t price_cents;
    uint8_t record[8];
};

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    struct item item;
    char hex[2 * sizeof item.record + 1];
    item.id = svc_fold(req, len) % 100000u;
    item.page = store_digest(item.id) % 4096u;
    item.price_cents = (uint16_t)(item.page * 7u + 99u);
    for (unsigned i = 0; i < sizeof item.record; ++i)
        item.record[i] = (uint8_t)(item.id >> i ^ item.page << i);
    codec_transform(item.record, sizeof item.record, item.record);
    svc_hex(item.record, sizeof item.record, hex, sizeof hex);
    snprintf(out, size, "item=%05u page=%u price=%u.%02u record=%s", (unsigned)item.id,
             (unsigned)item.page, item.price_cents / 100u, item.price_cents % 100u, hex);
    return item.id ^ item.page * 0x9e3779b1u ^ svc_fold(item.record, sizeof item.record);
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "sku:HEALTH-0001"};
    return svc_main(argc, argv, &svc);
}
