/* Every service of the example: SERVICE and PORT come from the build (service.nix).
 *   ./gateway --health    prints "gateway ok port=8080 digest=…" and exits 0 */
#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "core.h"
#include "hash.h"
#include "net.h"
#include "store.h"

int main(int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[1], "--health") != 0) {
        fprintf(stderr, "usage: %s --health\n", argv[0]);
        return 2;
    }
    uint32_t seed = 0;
    for (const char *c = SERVICE; *c; ++c)
        seed = seed * 31u + (unsigned char)*c;
    uint32_t digest = net_digest(seed) ^ store_digest(seed + 1) ^ core_digest(seed + 2)
                      ^ codec_digest(seed + 3) ^ hash_digest(seed + 4);
    printf("%s ok port=%d digest=%08x\n", SERVICE, PORT, (unsigned)digest);
    return 0;
}
