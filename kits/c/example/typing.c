/* The `typing` plugin of iim, in C: forwards "user is typing" indicators.
 *
 * Configuration (typing.toml): max_body (1..=65536, default 64), the longest body passed on;
 * kind (default "typing"), the custom message kind it handles. Built by build.sh with the C
 * kit's helper library (../template/iim.h). */
#include "iim.h"

#include <string.h>

#define DEFAULT_MAX_BODY 64
#define MAX_BODY_LIMIT 65536
#define MAX_KIND_LEN 64

/* Per instance: app_init runs once on each new instance, before any event. */
static size_t max_body = DEFAULT_MAX_BODY;
static char kind[MAX_KIND_LEN + 1] = "typing";

/* Parses max_body: plain digits only, 1..=MAX_BODY_LIMIT. */
static bool parse_max_body(const iim_string_t *value, size_t *out, iim_error_t *err) {
    size_t n = 0;
    bool digits = value->len > 0;
    for (size_t i = 0; i < value->len && digits; i++) {
        uint8_t c = value->ptr[i];
        if (c < '0' || c > '9') digits = false;
        else if (n <= MAX_BODY_LIMIT) n = n * 10 + (c - '0'); /* stops growing past the limit */
    }
    int shown = value->len > 32 ? 32 : (int)value->len;
    if (!digits)
        return iim_invalid_config(err, "max_body must be a whole number, got '%.*s'", shown,
                                  (const char *)value->ptr);
    if (n < 1 || n > MAX_BODY_LIMIT)
        return iim_invalid_config(err, "max_body must be between 1 and %d, got '%.*s'",
                                  MAX_BODY_LIMIT, shown, (const char *)value->ptr);
    *out = n;
    return true;
}

/* Checks kind: 1..=64 bytes of a-z 0-9 . _ - */
static bool parse_kind(const iim_string_t *value, char *out, iim_error_t *err) {
    bool ok = value->len >= 1 && value->len <= MAX_KIND_LEN;
    for (size_t i = 0; i < value->len && ok; i++) {
        uint8_t c = value->ptr[i];
        ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    }
    if (!ok)
        return iim_invalid_config(err, "kind must be 1 to %d bytes of a-z 0-9 . _ -, got '%.*s'",
                                  MAX_KIND_LEN, value->len > 80 ? 80 : (int)value->len,
                                  (const char *)value->ptr);
    memcpy(out, value->ptr, value->len);
    out[value->len] = '\0';
    return true;
}

bool app_init(iim_config_t *config, iim_info_t *info, iim_error_t *err) {
    size_t new_max_body = DEFAULT_MAX_BODY;
    char new_kind[MAX_KIND_LEN + 1] = "typing";
    bool seen_max_body = false, seen_kind = false;
    for (size_t i = 0; i < config->len; i++) {
        const iim_string_t *key = &config->ptr[i].f0, *value = &config->ptr[i].f1;
        if (iim_string_eq(key, "max_body")) {
            if (seen_max_body) return iim_invalid_config(err, "max_body is given more than once");
            seen_max_body = true;
            if (!parse_max_body(value, &new_max_body, err)) return false;
        } else if (iim_string_eq(key, "kind")) {
            if (seen_kind) return iim_invalid_config(err, "kind is given more than once");
            seen_kind = true;
            if (!parse_kind(value, new_kind, err)) return false;
        } else {
            return iim_invalid_config(err, "unknown configuration key '%.*s'",
                                      key->len > 80 ? 80 : (int)key->len, (const char *)key->ptr);
        }
    }
    max_body = new_max_body;
    memcpy(kind, new_kind, sizeof kind);
    iim_info_set(info, "typing", "0.1.0");
    iim_subscribe(info, IIM_SUBSCRIBE_MESSAGE, iim_kind_custom(kind));
    return true;
}

static bool forward(iim_message_t *msg, iim_error_t *err) {
    const iim_bytes_t *body = &msg->body;
    if (body->len > max_body)
        return iim_rejected(err, "typing body is %zu bytes, more than the %zu allowed", body->len,
                            max_body);
    if (!iim_utf8_valid(body->ptr, body->len)) return iim_rejected(err, "typing body is not UTF-8");

    /* The addressees, less the sender, each once, in order. */
    iim_user_ids_t recipients = {NULL, 0};
    for (size_t i = 0; i < msg->to.len; i++) {
        const iim_string_t *user = &msg->to.ptr[i];
        if (!iim_string_same(user, &msg->sender) && !iim_user_ids_contains(&recipients, user))
            iim_user_ids_push(&recipients, user);
    }

    uint32_t sent = 0;
    size_t addressed = recipients.len;
    if (recipients.len > 0) {
        /* The message being handled, unchanged (same id): the host passes it on. */
        iim_host_error_t host_error;
        bool ok = iim_plugin_iim_pass_on(&recipients, &sent, &host_error);
        iim_user_ids_free(&recipients);
        if (!ok) return iim_from_host_error(err, "pass-on", &host_error);
    }

    int shown = body->len > 64 ? 64 : (int)body->len;
    iim_log(IIM_DEBUG, "typing '%.*s' from %.*s/%.*s (message %llu) sent to %u of %zu user(s)",
            shown, (const char *)body->ptr, (int)msg->sender.len, (const char *)msg->sender.ptr,
            (int)msg->sender_device.len, (const char *)msg->sender_device.ptr,
            (unsigned long long)msg->id, sent, addressed);
    return true;
}

bool app_handle(iim_event_t *event, iim_error_t *err) {
    if (event->tag == IIM_PLUGIN_TYPES_EVENT_MESSAGE &&
        iim_kind_is_custom(&event->val.message.kind, kind))
        return forward(&event->val.message, err);
    return iim_rejected(err, "typing handles only messages of kind %s", kind);
}
