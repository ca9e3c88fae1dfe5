/* payments: signs a payment (libhash) and frames the signature for the network (libnet). */
#include <stdio.h>

#include "codec.h"
#include "hash.h"
#include "net.h"
#include "svc.h"

enum { SIG = 12 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint8_t sig[SIG];
    char hex[2 * SIG + 1];
    uint32_t mac = hash_digest(svc_fold(req, len));
    for (unsigned i = 0; i < SIG; ++i)
        sig[i] = (uint8_t)(mac >> (i % 4 * 8)) ^ (uint8_t)i;
    net_transform(sig, SIG, sig);
    codec_transform(sig, SIG, sig);
    svc_hex(sig, SIG, hex, sizeof hex);
    snprintf(out, size, "signature=%s", hex);
    return mac ^ svc_fold(sig, SIG);
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "amount=0.00 currency=EUR"};
    return svc_main(argc, argv, &svc);
}
