/* auth: a token is the request run through the keyed digests of libhash. */
#include <stdio.h>

#include "core.h"
#include "hash.h"
#include "svc.h"

enum { TOKEN = 16 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint8_t token[TOKEN];
    char hex[2 * TOKEN + 1];
    uint32_t key = hash_digest(svc_fold(req, len));
    for (unsigned i = 0; i < TOKEN; ++i)
        token[i] = (uint8_t)(key >> (8 * (i % 4)));
    hash_transform(token, TOKEN, token);
    svc_hex(token, TOKEN, hex, sizeof hex);
    snprintf(out, size, "token=%s kernels=%u", hex, hash_kernel_count() + core_kernel_count());
    return key ^ svc_fold(token, TOKEN);
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "user=healthcheck scope=read"};
    return svc_main(argc, argv, &svc);
}
