/* The shared skeleton of every binary service: command line, --health and --request. */
#ifndef SVC_H
#define SVC_H

#include <stddef.h>
#include <stdint.h>

/* Handle one request: write a one-line answer (no newline) to out and return a checksum of it. */
typedef uint32_t (*svc_handler)(const uint8_t *req, size_t len, char *out, size_t size);

struct svc {
    svc_handler handle;
    const char *probe; /* the request --health sends */
};

/* FNV-1a of len bytes: turns a request into a seed for the deps libraries. */
uint32_t svc_fold(const uint8_t *p, size_t len);
/* Write the first n bytes of p as hex to out (size bytes, NUL-terminated). */
void svc_hex(const uint8_t *p, size_t n, char *out, size_t size);

int svc_main(int argc, char **argv, const struct svc *svc);

#endif
