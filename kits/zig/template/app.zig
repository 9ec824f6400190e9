//! The iim plugin `{{name}}`: passes each message of kind `{{name}}` on, unchanged, to its
//! addressees other than the sender. Build it with ./build.sh; iim.zig has the helpers.
const std = @import("std");
const iim = @import("iim");

/// A panic is logged through the host and traps.
pub const panic = iim.panic;

comptime {
    iim.exportPlugin(@This());
}

pub fn init(config: []const iim.ConfigEntry) !iim.Info {
    for (config) |entry| return iim.invalidConfig("unknown configuration key '{s}'", .{entry.key});
    return .{
        .name = "{{name}}",
        .version = "0.1.0",
        .subscriptions = &.{.{ .message = .{ .custom = "{{name}}" } }},
    };
}

pub fn handle(event: iim.Event) !void {
    switch (event) {
        .message => |msg| if (iim.isCustom(msg.kind, "{{name}}")) return passOn(msg),
        else => {},
    }
    return iim.rejected("{{name}} handles only messages of kind {{name}}", .{});
}

/// Passes `msg` on to its addressees less the sender, each once.
fn passOn(msg: *iim.Message) !void {
    var to: std.ArrayList([]const u8) = .empty;
    defer to.deinit(iim.allocator);
    const sender = iim.str(msg.sender);
    for (iim.users(msg.to)) |u| {
        const user = iim.str(u);
        if (std.mem.eql(u8, user, sender)) continue;
        for (to.items) |seen| {
            if (std.mem.eql(u8, seen, user)) break;
        } else try to.append(iim.allocator, user);
    }
    if (to.items.len == 0) return;

    // The message being handled, unchanged (same id): the host passes it on.
    const sent = iim.passOn(to.items) catch |e| return iim.fromHostError("pass-on", e);
    iim.log(.debug, "message {d} passed on to {d} user(s)", .{ msg.id, sent });
}
