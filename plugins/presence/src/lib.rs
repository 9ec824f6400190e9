//! The presence plugin (skeleton: filled in by the plugin platform work).
