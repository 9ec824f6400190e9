/* The iim plugin `{{name}}`: passes each message of kind `{{name}}` on, unchanged, to its
 * addressees other than the sender. Build it with ./build.sh; see iim.h for the helpers and
 * the rules on who frees what. */
#include "iim.h"

bool app_init(iim_config_t *config, iim_info_t *info, iim_error_t *err) {
    if (config->len > 0) {
        iim_string_t *key = &config->ptr[0].f0;
        return iim_invalid_config(err, "unknown configuration key '%.*s'", (int)key->len,
                                  (const char *)key->ptr);
    }
    iim_info_set(info, "{{name}}", "0.1.0");
    iim_subscribe(info, IIM_SUBSCRIBE_MESSAGE, iim_kind_custom("{{name}}"));
    return true;
}

/* Passes `msg` on to its addressees less the sender, each once. */
static bool pass_on(iim_message_t *msg, iim_error_t *err) {
    iim_user_ids_t to = {NULL, 0};
    for (size_t i = 0; i < msg->to.len; i++) {
        iim_string_t *user = &msg->to.ptr[i];
        if (!iim_string_same(user, &msg->sender) && !iim_user_ids_contains(&to, user))
            iim_user_ids_push(&to, user);
    }
    if (to.len == 0) return true;

    /* The message being handled, unchanged (same id): the host passes it on. */
    uint32_t sent;
    iim_host_error_t host_error;
    bool ok = iim_plugin_iim_pass_on(&to, &sent, &host_error);
    iim_user_ids_free(&to);
    if (!ok) return iim_from_host_error(err, "pass-on", &host_error);
    iim_log(IIM_DEBUG, "message %llu passed on to %u user(s)", (unsigned long long)msg->id, sent);
    return true;
}

bool app_handle(iim_event_t *event, iim_error_t *err) {
    if (event->tag == IIM_PLUGIN_TYPES_EVENT_MESSAGE &&
        iim_kind_is_custom(&event->val.message.kind, "{{name}}"))
        return pass_on(&event->val.message, err);
    return iim_rejected(err, "{{name}} handles only messages of kind {{name}}");
}
