/* orders: numbers an order (libstore) and picks its shipping route (libnet). */
#include <stdio.h>

#include "net.h"
#include "store.h"
#include "svc.h"

static const char *const routes[] = {"air", "rail", "road", "sea"};

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint32_t seed = svc_fold(req, len);
    uint32_t number = store_digest(seed) % 1000000u;
    uint32_t hop = net_digest(number);
    unsigned route = (unsigned)(hop % (sizeof routes / sizeof routes[0]));
    snprintf(out, size, "order=%06u route=%s hops=%u", (unsigned)number, routes[route],
             (unsigned)(1 + (hop >> 8) % 5));
    return number * 2654435761u ^ hop;
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "cart=health items=1"};
    return svc_main(argc, argv, &svc);
}
