//! `iim-plugin-sdk`: what a Rust plugin author depends on to write an iim plugin.
//!
//! The plugin runtime is not built yet. This crate already names the WIT package plugins are
//! built against (`wit/iim.wit` at the root of the repository), so that the SDK, the host and
//! the plugins agree on one version from the start; the trait, the export macro and the fake
//! host for native unit tests come with the plugin platform.

/// The WIT package (name and version) this SDK builds plugins against.
pub const WIT_PACKAGE: &str = "iim:plugin@0.1.0";

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_package_the_wit_file_declares() {
        let wit = include_str!("../../wit/iim.wit");
        let declared = wit
            .lines()
            .find_map(|line| line.strip_prefix("package "))
            .map(|rest| rest.trim_end_matches(';'));
        assert_eq!(declared, Some(super::WIT_PACKAGE));
    }
}
