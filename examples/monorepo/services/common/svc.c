/* Built into every binary service with -DSERVICE_NAME, -DSERVICE_PORT and -DSERVICE_LIBS. */
#include "svc.h"

#include <stdio.h>
#include <string.h>

#ifndef SERVICE_NAME
#error "build with -DSERVICE_NAME='\"name\"' (services/service.mk does)"
#endif
#ifndef SERVICE_PORT
#define SERVICE_PORT 0
#endif
#ifndef SERVICE_LIBS
#define SERVICE_LIBS ""
#endif

uint32_t svc_fold(const uint8_t *p, size_t len)
{
    uint32_t h = 0x811c9dc5u;
    for (size_t i = 0; i < len; ++i)
        h = (h ^ p[i]) * 0x01000193u;
    return h;
}

void svc_hex(const uint8_t *p, size_t n, char *out, size_t size)
{
    static const char digits[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < n && o + 2 < size; ++i) {
        out[o++] = digits[p[i] >> 4];
        out[o++] = digits[p[i] & 15];
    }
    if (size)
        out[o] = '\0';
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: %s --health | --request TEXT | --help\n"
            "  --health        run the self-check through the deps libraries (%s)\n"
            "  --request TEXT  handle one request and print the answer\n"
            "(an example service: it would listen on port %d, and does not)\n",
            SERVICE_NAME, SERVICE_LIBS, SERVICE_PORT);
}

/* Healthy: the probe request gives a non-empty answer, the same twice. */
static int health(const struct svc *svc)
{
    char first[256], second[256];
    size_t len = strlen(svc->probe);
    uint32_t a = svc->handle((const uint8_t *)svc->probe, len, first, sizeof first);
    uint32_t b = svc->handle((const uint8_t *)svc->probe, len, second, sizeof second);
    if (a != b || strcmp(first, second) != 0 || first[0] == '\0') {
        printf("%s unhealthy: the probe gave %08x, then %08x\n", SERVICE_NAME, (unsigned)a,
               (unsigned)b);
        return 1;
    }
    printf("%s ok port=%d libs=%s check=%08x %s\n", SERVICE_NAME, SERVICE_PORT, SERVICE_LIBS,
           (unsigned)a, first);
    return 0;
}

int svc_main(int argc, char **argv, const struct svc *svc)
{
    if (argc == 2 && strcmp(argv[1], "--health") == 0)
        return health(svc);
    if (argc == 3 && strcmp(argv[1], "--request") == 0) {
        char answer[256];
        uint32_t sum = svc->handle((const uint8_t *)argv[2], strlen(argv[2]), answer,
                                   sizeof answer);
        printf("%s check=%08x\n", answer, (unsigned)sum);
        return 0;
    }
    if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    usage(stderr);
    return 2;
}
