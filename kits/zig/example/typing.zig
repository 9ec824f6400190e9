//! The `typing` plugin of iim, in Zig: forwards "user is typing" indicators.
//!
//! Configuration (typing.toml): max_body (1..=65536, default 64), the longest body passed on;
//! kind (default "typing"), the custom message kind it handles. Built by build.sh with the
//! Zig kit's helper library (../template/iim.zig).
const std = @import("std");
const iim = @import("iim");

pub const panic = iim.panic;

comptime {
    iim.exportPlugin(@This());
}

const default_max_body = 64;
const max_body_limit = 65536;
const max_kind_len = 64;

// Per instance: init runs once on each new instance, before any event.
var max_body: usize = default_max_body;
var kind_buf: [max_kind_len]u8 = undefined;
var kind: []const u8 = "typing";
// What init returns must outlive init: a global, not a local array.
var subscriptions: [1]iim.Subscription = undefined;

/// Parses max_body: plain digits only, 1..=max_body_limit.
fn parseMaxBody(value: []const u8) !usize {
    for (value) |ch| {
        if (!std.ascii.isDigit(ch)) return iim.invalidConfig("max_body must be a whole number, got '{s}'", .{value});
    }
    const n = std.fmt.parseInt(usize, value, 10) catch |e| switch (e) {
        error.Overflow => max_body_limit + 1,
        error.InvalidCharacter => return iim.invalidConfig("max_body must be a whole number, got '{s}'", .{value}),
    };
    if (n < 1 or n > max_body_limit) {
        return iim.invalidConfig("max_body must be between 1 and {d}, got '{s}'", .{ max_body_limit, value });
    }
    return n;
}

/// Checks kind: 1..=64 bytes of a-z 0-9 . _ -
fn parseKind(value: []const u8) ![]const u8 {
    const ok = value.len >= 1 and value.len <= max_kind_len and for (value) |ch| {
        switch (ch) {
            'a'...'z', '0'...'9', '.', '_', '-' => {},
            else => break false,
        }
    } else true;
    if (!ok) return iim.invalidConfig("kind must be 1 to {d} bytes of a-z 0-9 . _ -, got '{s}'", .{ max_kind_len, value });
    return value;
}

pub fn init(config: []const iim.ConfigEntry) !iim.Info {
    var new_max_body: ?usize = null;
    var new_kind: ?[]const u8 = null;
    for (config) |entry| {
        if (std.mem.eql(u8, entry.key, "max_body")) {
            if (new_max_body != null) return iim.invalidConfig("max_body is given more than once", .{});
            new_max_body = try parseMaxBody(entry.value);
        } else if (std.mem.eql(u8, entry.key, "kind")) {
            if (new_kind != null) return iim.invalidConfig("kind is given more than once", .{});
            new_kind = try parseKind(entry.value);
        } else {
            return iim.invalidConfig("unknown configuration key '{s}'", .{entry.key});
        }
    }
    max_body = new_max_body orelse default_max_body;
    // `config` is freed after init: keep a copy.
    const k = new_kind orelse "typing";
    @memcpy(kind_buf[0..k.len], k);
    kind = kind_buf[0..k.len];
    subscriptions[0] = .{ .message = .{ .custom = kind } };
    return .{ .name = "typing", .version = "0.1.0", .subscriptions = &subscriptions };
}

pub fn handle(event: iim.Event) !void {
    switch (event) {
        .message => |msg| if (iim.isCustom(msg.kind, kind)) return forward(msg),
        else => {},
    }
    return iim.rejected("typing handles only messages of kind {s}", .{kind});
}

fn forward(msg: *iim.Message) !void {
    const body = iim.bytes(msg.body);
    if (body.len > max_body) {
        return iim.rejected("typing body is {d} bytes, more than the {d} allowed", .{ body.len, max_body });
    }
    if (!std.unicode.utf8ValidateSlice(body)) return iim.rejected("typing body is not UTF-8", .{});

    // The addressees, less the sender, each once, in order. The slices point into the event.
    var recipients: std.ArrayList([]const u8) = .empty;
    defer recipients.deinit(iim.allocator);
    const sender = iim.str(msg.sender);
    for (iim.users(msg.to)) |u| {
        const user = iim.str(u);
        if (std.mem.eql(u8, user, sender)) continue;
        for (recipients.items) |seen| {
            if (std.mem.eql(u8, seen, user)) break;
        } else try recipients.append(iim.allocator, user);
    }

    var sent: u32 = 0;
    if (recipients.items.len > 0) {
        // The message being handled, unchanged (same id): the host passes it on.
        sent = iim.passOn(recipients.items) catch |e| return iim.fromHostError("pass-on", e);
    }
    iim.log(.debug, "typing '{s}' from {s}/{s} (message {d}) sent to {d} of {d} user(s)", .{
        body[0..@min(body.len, 64)], sender, iim.str(msg.sender_device), msg.id, sent, recipients.items.len,
    });
}
