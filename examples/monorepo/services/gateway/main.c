/* gateway: routes each request to one of 16 shards (libnet) and frames it (libcodec). */
#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "core.h"
#include "net.h"
#include "svc.h"

enum { SHARDS = 16, FRAME = 12 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint8_t frame[FRAME] = {0};
    char hex[2 * FRAME + 1];
    uint32_t seed = svc_fold(req, len);
    uint32_t route = net_digest(core_digest(seed));
    memcpy(frame, req, len < FRAME ? len : FRAME);
    codec_transform(frame, FRAME, frame);
    svc_hex(frame, FRAME, hex, sizeof hex);
    snprintf(out, size, "route=shard-%02u frame=%s", (unsigned)(route % SHARDS), hex);
    return route ^ svc_fold(frame, FRAME);
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "GET /healthz HTTP/1.1"};
    return svc_main(argc, argv, &svc);
}
