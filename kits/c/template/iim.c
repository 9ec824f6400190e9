/* The iim plugin helper library for C: see iim.h. It also holds the two exports the host
 * calls, which own their arguments (rule 1 of iim.h) and hand them to app_init/app_handle. */
#include "iim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A tag no error case has: the error was left unset. */
#define UNSET 0xff

static void utf8_fix(uint8_t *p, size_t len);

static void *xmalloc(size_t size) {
    /* The host traps a memory that grows past plugins.max_memory_mib before malloc can
     * return NULL; if it ever does, trap too, as the bindings' own allocator does. */
    void *p = malloc(size ? size : 1);
    if (!p) abort();
    return p;
}

static void *xrealloc(void *old, size_t size) {
    void *p = realloc(old, size ? size : 1);
    if (!p) abort();
    return p;
}

/* The one place a formatted string is made: malloc'd bytes without a NUL in `out`, valid
 * UTF-8. */
static void vformat(iim_string_t *out, const char *fmt, va_list args) {
    va_list again;
    va_copy(again, args);
    int n = vsnprintf(NULL, 0, fmt, args);
    if (n < 0) {
        /* Only a bad format does this: say so rather than lose the message. */
        va_end(again);
        iim_string_from(out, fmt);
        return;
    }
    char *text = xmalloc((size_t)n + 1);
    vsnprintf(text, (size_t)n + 1, fmt, again);
    va_end(again);
    if (n == 0) {
        free(text);
        *out = (iim_string_t){NULL, 0};
        return;
    }
    utf8_fix((uint8_t *)text, (size_t)n);
    *out = (iim_string_t){(uint8_t *)text, (size_t)n};
}

bool exports_iim_plugin_handler_init(iim_config_t *config, iim_info_t *info, iim_error_t *err) {
    memset(info, 0, sizeof *info);
    memset(err, 0, sizeof *err);
    err->tag = UNSET;
    bool ok = app_init(config, info, err);
    plugin_list_tuple2_string_string_free(config);
    if (ok) {
        if (err->tag != UNSET) iim_plugin_types_plugin_error_free(err);
        return true;
    }
    /* On an error the bindings free only `err`: free what app_init put in `info`. */
    iim_plugin_types_plugin_info_free(info);
    if (err->tag == UNSET) iim_failed(err, "app_init returned false without setting an error");
    return false;
}

bool exports_iim_plugin_handler_handle(iim_event_t *event, iim_error_t *err) {
    memset(err, 0, sizeof *err);
    err->tag = UNSET;
    bool ok = app_handle(event, err);
    iim_plugin_types_event_free(event);
    if (ok) {
        if (err->tag != UNSET) iim_plugin_types_plugin_error_free(err);
        return true;
    }
    if (err->tag == UNSET) iim_failed(err, "app_handle returned false without setting an error");
    return false;
}

static bool set_error(iim_error_t *err, uint8_t tag, const char *fmt, va_list args) {
    /* A second error in one call replaces the first. */
    if (err->tag != UNSET) iim_plugin_types_plugin_error_free(err);
    err->tag = tag;
    /* invalid_config, rejected and failed are all one string in one union. */
    vformat(&err->val.rejected, fmt, args);
    return false;
}

bool iim_rejected(iim_error_t *err, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    set_error(err, IIM_PLUGIN_TYPES_PLUGIN_ERROR_REJECTED, fmt, args);
    va_end(args);
    return false;
}

bool iim_failed(iim_error_t *err, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    set_error(err, IIM_PLUGIN_TYPES_PLUGIN_ERROR_FAILED, fmt, args);
    va_end(args);
    return false;
}

bool iim_invalid_config(iim_error_t *err, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    set_error(err, IIM_PLUGIN_TYPES_PLUGIN_ERROR_INVALID_CONFIG, fmt, args);
    va_end(args);
    return false;
}

const char *iim_host_error_case(const iim_host_error_t *e) {
    switch (e->tag) {
    case IIM_PLUGIN_TYPES_HOST_ERROR_UNKNOWN_USER: return "unknown-user";
    case IIM_PLUGIN_TYPES_HOST_ERROR_UNKNOWN_SERVER: return "unknown-server";
    case IIM_PLUGIN_TYPES_HOST_ERROR_FORGED_SENDER: return "forged-sender";
    case IIM_PLUGIN_TYPES_HOST_ERROR_UNKNOWN_MESSAGE: return "unknown-message";
    case IIM_PLUGIN_TYPES_HOST_ERROR_INVALID_ARGUMENT: return "invalid-argument";
    case IIM_PLUGIN_TYPES_HOST_ERROR_PERMISSION_DENIED: return "permission-denied";
    case IIM_PLUGIN_TYPES_HOST_ERROR_LIMIT_EXCEEDED: return "limit-exceeded";
    case IIM_PLUGIN_TYPES_HOST_ERROR_UNAVAILABLE: return "unavailable";
    default: return "unknown host error";
    }
}

bool iim_from_host_error(iim_error_t *err, const char *what, iim_host_error_t *e) {
    const char *name = iim_host_error_case(e);
    uint8_t tag = e->tag == IIM_PLUGIN_TYPES_HOST_ERROR_UNAVAILABLE
                      ? IIM_PLUGIN_TYPES_PLUGIN_ERROR_FAILED
                      : IIM_PLUGIN_TYPES_PLUGIN_ERROR_REJECTED;
    if (e->tag == IIM_PLUGIN_TYPES_HOST_ERROR_UNKNOWN_MESSAGE) {
        unsigned long long id = e->val.unknown_message;
        if (tag == IIM_PLUGIN_TYPES_PLUGIN_ERROR_FAILED) iim_failed(err, "%s: %s(%llu)", what, name, id);
        else iim_rejected(err, "%s: %s(%llu)", what, name, id);
    } else {
        /* Every other case carries one string, at the same place in the union. */
        const iim_string_t *detail = &e->val.unavailable;
        int len = detail->len > 4096 ? 4096 : (int)detail->len;
        const char *text = (const char *)detail->ptr;
        if (tag == IIM_PLUGIN_TYPES_PLUGIN_ERROR_FAILED) iim_failed(err, "%s: %s(%.*s)", what, name, len, text);
        else iim_rejected(err, "%s: %s(%.*s)", what, name, len, text);
    }
    iim_plugin_types_host_error_free(e);
    return false;
}

void iim_string_from(iim_string_t *out, const char *s) {
    size_t n = strlen(s);
    if (n == 0) {
        *out = (iim_string_t){NULL, 0};
        return;
    }
    out->ptr = xmalloc(n);
    memcpy(out->ptr, s, n);
    out->len = n;
    utf8_fix(out->ptr, n);
}

void iim_string_printf(iim_string_t *out, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vformat(out, fmt, args);
    va_end(args);
}

void iim_string_copy(iim_string_t *out, const iim_string_t *s) {
    if (s->len == 0) {
        *out = (iim_string_t){NULL, 0};
        return;
    }
    uint8_t *p = xmalloc(s->len);
    memcpy(p, s->ptr, s->len);
    *out = (iim_string_t){p, s->len};
}

bool iim_string_eq(const iim_string_t *s, const char *c) {
    size_t n = strlen(c);
    return s->len == n && (n == 0 || memcmp(s->ptr, c, n) == 0);
}

bool iim_string_same(const iim_string_t *a, const iim_string_t *b) {
    return a->len == b->len && (a->len == 0 || memcmp(a->ptr, b->ptr, a->len) == 0);
}

char *iim_string_cstr(const iim_string_t *s) {
    char *c = xmalloc(s->len + 1);
    if (s->len) memcpy(c, s->ptr, s->len);
    c[s->len] = '\0';
    return c;
}

/* The length of the UTF-8 character at p[0..len), or 0 if it is not a valid one. */
static size_t utf8_char_len(const uint8_t *p, size_t len) {
    uint8_t b = p[0];
    if (b < 0x80) return 1;
    size_t n;
    uint8_t lo = 0x80, hi = 0xbf; /* the allowed range of the second byte */
    if (b >= 0xc2 && b <= 0xdf) {
        n = 2;
    } else if (b >= 0xe0 && b <= 0xef) {
        n = 3;
        if (b == 0xe0) lo = 0xa0;      /* overlong */
        else if (b == 0xed) hi = 0x9f; /* surrogates */
    } else if (b >= 0xf0 && b <= 0xf4) {
        n = 4;
        if (b == 0xf0) lo = 0x90;      /* overlong */
        else if (b == 0xf4) hi = 0x8f; /* past U+10FFFF */
    } else {
        return 0;
    }
    if (len < n || p[1] < lo || p[1] > hi) return 0;
    for (size_t k = 2; k < n; k++)
        if ((p[k] & 0xc0) != 0x80) return 0;
    return n;
}

bool iim_utf8_valid(const uint8_t *p, size_t len) {
    for (size_t i = 0; i < len;) {
        size_t n = utf8_char_len(p + i, len - i);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

/* Makes the bytes valid UTF-8, each byte of an invalid sequence becoming '?': a string handed
 * to the host must be UTF-8, or the host traps the call. */
static void utf8_fix(uint8_t *p, size_t len) {
    for (size_t i = 0; i < len;) {
        size_t n = utf8_char_len(p + i, len - i);
        if (n == 0) {
            p[i] = '?';
            n = 1;
        }
        i += n;
    }
}

void iim_info_set(iim_info_t *info, const char *name, const char *version) {
    plugin_string_free(&info->name);
    plugin_string_free(&info->version);
    iim_string_from(&info->name, name);
    iim_string_from(&info->version, version);
}

iim_message_kind_t iim_kind_chat(void) {
    return (iim_message_kind_t){.tag = IIM_PLUGIN_TYPES_MESSAGE_KIND_CHAT};
}

iim_message_kind_t iim_kind_receipt(void) {
    return (iim_message_kind_t){.tag = IIM_PLUGIN_TYPES_MESSAGE_KIND_RECEIPT};
}

iim_message_kind_t iim_kind_presence(void) {
    return (iim_message_kind_t){.tag = IIM_PLUGIN_TYPES_MESSAGE_KIND_PRESENCE};
}

iim_message_kind_t iim_kind_custom(const char *name) {
    iim_message_kind_t k = {.tag = IIM_PLUGIN_TYPES_MESSAGE_KIND_CUSTOM};
    iim_string_from(&k.val.custom, name);
    return k;
}

bool iim_kind_is_custom(const iim_message_kind_t *kind, const char *name) {
    return kind->tag == IIM_PLUGIN_TYPES_MESSAGE_KIND_CUSTOM && iim_string_eq(&kind->val.custom, name);
}

void iim_subscribe(iim_info_t *info, uint8_t what, iim_message_kind_t kind) {
    iim_subscription_t s = {.tag = what};
    if (what == IIM_SUBSCRIBE_MESSAGE) s.val.message = kind;
    else if (what == IIM_SUBSCRIBE_DELIVERED) s.val.delivered = kind;
    else iim_plugin_types_message_kind_free(&kind);
    size_t n = info->subscriptions.len;
    info->subscriptions.ptr = xrealloc(info->subscriptions.ptr, (n + 1) * sizeof s);
    info->subscriptions.ptr[n] = s;
    info->subscriptions.len = n + 1;
}

bool iim_user_ids_contains(const iim_user_ids_t *users, const iim_string_t *user) {
    for (size_t i = 0; i < users->len; i++)
        if (iim_string_same(&users->ptr[i], user)) return true;
    return false;
}

void iim_user_ids_push(iim_user_ids_t *users, const iim_string_t *user) {
    size_t n = users->len;
    users->ptr = xrealloc(users->ptr, (n + 1) * sizeof *users->ptr);
    iim_string_copy(&users->ptr[n], user);
    users->len = n + 1;
}

void iim_log(iim_log_level_t level, const char *fmt, ...) {
    iim_string_t line;
    va_list args;
    va_start(args, fmt);
    vformat(&line, fmt, args);
    va_end(args);
    iim_plugin_iim_log(level, &line);
    plugin_string_free(&line);
}
