//! The one place that calls `wit_bindgen::generate!`: the Rust side of `wit/iim.wit`.
//!
//! Plugins do not use this module directly: the types are re-exported at the root of the crate,
//! the imports are wrapped by [`crate::host`], and the export glue is reached through
//! [`crate::export_plugin!`]. It is public only because that macro expands in the plugin's crate
//! and has to name the generated export macro and the `Guest` trait from there.

wit_bindgen::generate!({
    // The whole package directory, so that the WIT file stays the single source of truth.
    path: "../wit",
    world: "plugin",
    // `export_plugin!` calls the generated export macro from the plugin's crate.
    pub_export_macro: true,
    export_macro_name: "export_guest",
    // Tests compare events, messages and errors.
    additional_derives: [PartialEq, Eq],
});
