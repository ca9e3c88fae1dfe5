/* One kernel of the shared libraries: deps.nix compiles this file once per kernel, with
 * -DNAME=<lib>_k<n> and -DSEED=<n>, so each object is real -O2 work on different constants. */
#include <stdint.h>

#define K(n) ((uint32_t)((SEED) * 2654435761u + (n) * 40503u + 0x9e3779b9u))
#define ROTL(x, r) (((x) << ((r) & 31)) | ((x) >> ((32 - ((r) & 31)) & 31)))

struct state {
    uint32_t a, b, c, d;
    uint16_t tag;
    uint8_t lane[8];
};

static const uint32_t T[16] = {
    K(1), K(2), K(3), K(4), K(5), K(6), K(7), K(8),
    K(9), K(10), K(11), K(12), K(13), K(14), K(15), K(16),
};

static inline uint32_t mix(uint32_t x, uint32_t y, uint32_t k)
{
    x ^= ROTL(y, k);
    x *= k | 1u;
    x += T[(x >> (k & 15)) & 15] ^ y;
    y = ROTL(y, k >> 5) + x;
    x ^= x >> (1 + (k & 15));
    return ROTL(x, k >> 10) ^ y ^ k;
}

#define CASE(n)                                                        \
    case n:                                                            \
        s->a = mix(s->a ^ K(n), s->b + x, K(n + 100));                 \
        s->lane[(n) & 7] ^= (uint8_t)(x >> ((n) % 24));                \
        for (unsigned j = 0; j < 2u + ((n) & 3); ++j)                  \
            s->c = mix(s->c, T[(j * (n) + x) & 15], K(n + 200));       \
        s->tag = (uint16_t)(s->tag + ROTL(x, n));                      \
        break;
#define CASES8(n) CASE(n) CASE(n + 1) CASE(n + 2) CASE(n + 3) CASE(n + 4) CASE(n + 5) \
                  CASE(n + 6) CASE(n + 7)

#define STEP(i)                                                        \
    static uint32_t step##i(struct state *s, uint32_t x)               \
    {                                                                  \
        for (unsigned k = 0; k < 8u + (i); ++k) {                      \
            x = mix(x ^ T[(x + k) & 15], s->d + k, K(i));              \
            switch ((x >> (i)) % 40u) {                                \
                CASES8(0) CASES8(8) CASES8(16) CASES8(24) CASES8(32)   \
            default:                                                   \
                s->d ^= x * (K(i) | 1u);                               \
            }                                                          \
        }                                                              \
        return x ^ s->b;                                               \
    }
STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)

uint32_t NAME(uint32_t seed);
uint32_t NAME(uint32_t seed)
{
    struct state s = {seed, ~seed, seed * (K(0) | 1u), seed ^ K(99), 0, {0}};
    uint32_t x = seed;
    x = step0(&s, x); x = step1(&s, x); x = step2(&s, x); x = step3(&s, x);
    x = step4(&s, x); x = step5(&s, x); x = step6(&s, x); x = step7(&s, x);
    for (unsigned i = 0; i < 8u; ++i)
        x = x * 31u + s.lane[i];
    return x ^ s.a ^ s.b ^ s.c ^ s.d ^ s.tag;
}
