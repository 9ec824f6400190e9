//! The one place that calls `bindgen!`: Rust types and traits for the WIT package in `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: trappable },
    exports: { default: async },
});
