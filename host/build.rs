//! Builds the default plugins (chat, presence, receipts, groups, keys) for `wasm32-wasip2` and
//! hands their paths to the host's source, which embeds them: a host started with an empty data
//! directory installs them in its plugins directory, so `cargo run -p iim-host` serves chat
//! (and end-to-end encryption's key directory) on a fresh machine with nothing else to build.
//! It builds the push plugin too, which is not installed by default (it needs a gateway to post
//! to): an operator installs `target/plugins-wasm/wasm32-wasip2/release/iim_plugin_push.wasm`
//! with its configuration.
//!
//! The plugins are built by a nested `cargo build` into their own target directory
//! (`target/plugins-wasm`): the outer build holds the lock of its own target directory, and one
//! wasm build serves the debug and release builds of the host alike.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PLUGINS: &[&str] = &["chat", "presence", "receipts", "groups", "push", "keys"];

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("the host crate is inside the workspace")
        .to_path_buf();
    for watched in ["plugin-sdk", "wit", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    for plugin in PLUGINS {
        let dir = workspace.join("plugins").join(plugin);
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    embed_kits(&workspace);
    ensure_target();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("plugins-wasm");
    let mut build = Command::new(env("CARGO"));
    build
        .current_dir(&workspace)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for plugin in PLUGINS {
        build.args(["-p", &format!("iim-plugin-{plugin}")]);
    }
    // The outer build's settings are for the host's target, not wasm; a lint wrapper (clippy)
    // would only slow the nested build down. And the variables cargo gives this build script
    // about the host's package (`CARGO_PKG_NAME`, ...) are not the nested build's: some build
    // scripts rerun when they change, so inherited they would make this build and the test
    // plugins' (`iim_e2e::test_plugin`, same target directory) rebuild each other's crates.
    for var in ["RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "OUT_DIR"] {
        build.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && key.starts_with("CARGO_")
            // The jobserver is shared, so that the nested build takes no more cores.
            && !matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS")
        {
            build.env_remove(key);
        }
    }
    let output = build
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the default plugins: {e}"));
    if !output.status.success() {
        panic!(
            "building the default plugins for {TARGET} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join(TARGET).join("release");
    for plugin in PLUGINS {
        let file = built.join(format!("iim_plugin_{plugin}.wasm"));
        if !file.is_file() {
            panic!("the build of plugin {plugin} left no {}", file.display());
        }
        println!(
            "cargo:rustc-env=IIM_PLUGIN_{}_WASM={}",
            plugin.to_uppercase(),
            file.display()
        );
    }
}

/// Writes `$OUT_DIR/kits.rs`: every file of every `kits/LANG/template/`, for `iim-host plugin
/// new`. A template holds source files only: what a build leaves in one (tools, outputs, caches)
/// is not embedded.
fn embed_kits(workspace: &Path) {
    let kits = workspace.join("kits");
    println!("cargo:rerun-if-changed={}", kits.display());
    let mut out =
        String::from("/// One file of a template: its path in the project, and its bytes.\n");
    out.push_str("pub type TemplateFile = (&'static str, &'static [u8]);\n");
    out.push_str("/// Every kit's template files, by language.\n");
    out.push_str("pub const KITS: &[(&str, &[TemplateFile])] = &[\n");
    let mut langs: Vec<PathBuf> = std::fs::read_dir(&kits)
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    langs.sort();
    for lang in langs {
        let template = lang.join("template");
        if !template.is_dir() {
            continue;
        }
        let name = lang
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let mut files = Vec::new();
        template_files(&template, &template, &mut files);
        files.sort();
        out.push_str(&format!("    ({name:?}, &[\n"));
        for (relative, path) in files {
            out.push_str(&format!(
                "        ({relative:?}, include_bytes!({:?})),\n",
                path.display().to_string()
            ));
        }
        out.push_str("    ]),\n");
    }
    out.push_str("];\n");
    let path = PathBuf::from(env("OUT_DIR")).join("kits.rs");
    std::fs::write(&path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn template_files(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let built = (name.starts_with('.') && name != ".gitignore")
            || matches!(
                name.as_str(),
                "node_modules" | "target" | "__pycache__" | "dist" | "Cargo.lock"
            )
            || name.ends_with(".wasm")
            || name.contains(".tmp");
        if built {
            continue;
        }
        if path.is_dir() {
            template_files(root, &path, files);
        } else if let Ok(relative) = path.strip_prefix(root) {
            files.push((relative.to_string_lossy().into_owned(), path));
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

/// Installs the wasm target with rustup when it is missing (rust-toolchain.toml lists it, but
/// rustup adds listed targets only when it installs the toolchain itself).
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = sysroot.is_some_and(|root| has_target(&root));
    if installed {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup to build the plugins");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        panic!(
            "the {TARGET} target is missing and `rustup target add {TARGET}` failed; \
             install it to build the default plugins"
        );
    }
}

fn has_target(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}
