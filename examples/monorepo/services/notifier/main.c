/* notifier: encodes a message (libcodec) and fans it out to its channels (libnet). */
#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "net.h"
#include "svc.h"

static const char *const channels[] = {"email", "sms", "push", "webhook", "chat"};
enum { CHANNELS = sizeof channels / sizeof channels[0], BODY = 8 };

static uint32_t handle(const uint8_t *req, size_t len, char *out, size_t size)
{
    uint8_t body[BODY] = {0};
    char hex[2 * BODY + 1];
    uint32_t fanout = net_digest(svc_fold(req, len));
    size_t o = 0;
    memcpy(body, req, len < BODY ? len : BODY);
    codec_transform(body, BODY, body);
    svc_hex(body, BODY, hex, sizeof hex);
    o += (size_t)snprintf(out, size, "body=%s to=", hex);
    for (unsigned c = 0; c < CHANNELS && o < size; ++c)
        if (fanout >> c & 1u || c == 0)
            o += (size_t)snprintf(out + o, size - o, "%s%s", o && out[o - 1] != '=' ? "," : "",
                                  channels[c]);
    return fanout ^ svc_fold(body, BODY);
}

int main(int argc, char **argv)
{
    static const struct svc svc = {handle, "to=oncall text=health"};
    return svc_main(argc, argv, &svc);
}
