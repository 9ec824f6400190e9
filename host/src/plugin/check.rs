//! A plugin file examined before it meets a running host: `iim-host plugin check`, and the
//! check `iim-host plugin install` makes before it copies a file into a plugins directory.
//!
//! The file is compiled by the host's engine, with the host's settings, and matched against
//! the host's linker: what it imports that the host does not provide is listed, every such
//! import (not only the first), each with what to do about it. If it fits, it is instantiated
//! in a [`Sandbox`] (a store in a temporary directory: nothing of a running host is touched)
//! and its `init` run with the configuration given, which tells its name, version and
//! subscriptions, or why it refuses the configuration.

use super::LoadedInfo;
use super::bindings::PluginPre;
use super::imports::{PluginState, Services};
use super::runtime::{Build, LoadError, Runtime, short_digest};
use super::settings::PluginFile;
use crate::iim::Iim;
use crate::registry::Registry;
use crate::store::Store;
use crate::store::UserRecord;
use iim_proto::UserId;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceType};

/// Why a file is not a component at all.
#[derive(Debug, thiserror::Error)]
pub enum NotComponent {
    /// Not WebAssembly.
    #[error("not a WebAssembly file: it starts with {0}, not \\0asm")]
    NotWasm(String),
    /// A core module.
    #[error(
        "a core WebAssembly module, not a component: a plugin is a component of the \
         iim:plugin world. Make one with your language's kit (C and Zig: the build runs \
         `wasm-tools component new` with the WASI adapter; Rust: build for wasm32-wasip2)"
    )]
    CoreModule,
    /// Another WebAssembly binary format.
    #[error("a WebAssembly binary of an unknown kind (version bytes {0})")]
    Unknown(String),
}

/// What [`examine`] found.
pub struct Examined {
    /// Size of the file, in bytes.
    pub size: usize,
    /// The first 12 hex digits of its SHA-256.
    pub digest: String,
    /// How long compiling took.
    pub compile: Duration,
    /// Everything it imports, by name.
    pub imports: Vec<String>,
    /// What it exports, by name.
    pub exports: Vec<String>,
    /// The imports the host does not provide, each with why and what to do.
    pub missing: Vec<(String, String)>,
    /// Whether its exports fit the world; the error if not.
    pub world: Result<(), String>,
    /// The build, if it fits (no import missing, exports right).
    pub build: Option<Build>,
}

impl Examined {
    /// Whether the host can load it (its `init` aside).
    pub fn fits(&self) -> bool {
        self.build.is_some()
    }
}

/// Compiles `bytes` with `runtime`'s engine and matches it against the host's linker. Errors
/// only for a file that is not a component or does not compile; a component that does not
/// fit is an [`Examined`] that says why.
pub fn examine(runtime: &Runtime, bytes: &[u8]) -> Result<Examined, LoadError> {
    if let Err(e) = is_component(bytes) {
        return Err(LoadError::Compile(wasmtime::Error::msg(e.to_string())));
    }
    let started = Instant::now();
    let component = Component::new(runtime.engine(), bytes).map_err(LoadError::Compile)?;
    let compile = started.elapsed();
    let engine = runtime.engine();
    let ty = component.component_type();
    let imports: Vec<(String, ComponentItem)> = ty
        .imports(engine)
        .map(|(name, item)| (name.to_owned(), item.ty))
        .collect();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    let missing = missing_imports(runtime.linker(), &component, &imports);
    let digest = short_digest(bytes);
    let (world, build) = if missing.is_empty() {
        match runtime
            .linker()
            .instantiate_pre(&component)
            .and_then(PluginPre::new)
        {
            Ok(pre) => {
                let digest = digest.clone();
                (Ok(()), Some(Build { pre, digest }))
            }
            Err(e) => (Err(world_error(&e, &exports)), None),
        }
    } else {
        // With the missing imports stubbed, are the exports right?
        let mut stubbed = runtime.linker().clone();
        stubbed.allow_shadowing(true);
        for (name, item) in &imports {
            if missing.iter().any(|(m, _)| m == name) {
                let _ = stub(&mut stubbed, name, item, engine);
            }
        }
        let world = match stubbed.instantiate_pre(&component).and_then(PluginPre::new) {
            Ok(_) => Ok(()),
            Err(e) => Err(world_error(&e, &exports)),
        };
        (world, None)
    };
    Ok(Examined {
        size: bytes.len(),
        digest,
        compile,
        imports: imports.into_iter().map(|(name, _)| name).collect(),
        exports,
        missing,
        world,
        build,
    })
}

/// Whether `bytes` are a component, by their header.
pub fn is_component(bytes: &[u8]) -> Result<(), NotComponent> {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(NotComponent::NotWasm(hex(&bytes[..bytes.len().min(4)])));
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(NotComponent::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        _ => Err(NotComponent::Unknown(hex(&bytes[4..8]))),
    }
}

/// The imports of `component` that `linker` does not provide (or provides with another type),
/// each with the linker's complaint and advice. The linker names one at a time: each one
/// found is stubbed in a copy of the linker, until the rest links.
fn missing_imports(
    linker: &Linker<PluginState>,
    component: &Component,
    imports: &[(String, ComponentItem)],
) -> Vec<(String, String)> {
    let engine = linker.engine().clone();
    let mut linker = linker.clone();
    linker.allow_shadowing(true);
    let mut missing: Vec<(String, String)> = Vec::new();
    for _ in 0..=imports.len() {
        let Err(error) = linker.instantiate_pre(component) else {
            break;
        };
        let text = format!("{error:#}");
        // The import the error names (the longest name that appears in it).
        let named = imports
            .iter()
            .filter(|(name, _)| {
                text.contains(name.as_str()) && !missing.iter().any(|(m, _)| m == name)
            })
            .max_by_key(|(name, _)| name.len());
        let Some((name, item)) = named else {
            // Not about an import: the exports, checked by the caller.
            break;
        };
        missing.push((name.clone(), advice(name, &text)));
        if stub(&mut linker, name, item, &engine).is_err() {
            break;
        }
    }
    missing
}

/// Why an import is missing and what to do, in one line.
fn advice(name: &str, error: &str) -> String {
    let cause = error.lines().last().unwrap_or(error).trim();
    if name.starts_with("wasi:http/") {
        format!(
            "{cause}. The host does not provide wasi:http: plugins reach the network only \
             through the host. With componentize-js, build with `--disable http \
             --disable fetch-event` (kits/js does)"
        )
    } else if name.starts_with("iim:plugin/") {
        format!(
            "{cause}. Built against another version of the iim:plugin WIT than this host's \
             ({}); rebuild against the host's wit/iim.wit (`iim-host plugin new` writes it)",
            super::kits::WIT
                .lines()
                .find(|l| l.starts_with("package "))
                .unwrap_or("package iim:plugin")
                .trim_start_matches("package ")
                .trim_end_matches(';')
        )
    } else if name.starts_with("wasi:") {
        format!(
            "{cause}. The host provides WASI 0.2 (io, clocks, random, cli, filesystem, \
             sockets) and nothing else (docs/plugins.md, \"What a plugin may import\")"
        )
    } else {
        format!("{cause}. The host provides only iim:plugin and WASI 0.2 interfaces")
    }
}

/// The export problem said plainly.
fn world_error(error: &wasmtime::Error, exports: &[String]) -> String {
    let text = format!("{error:#}");
    if !exports.iter().any(|e| e.starts_with("iim:plugin/handler@")) {
        return format!(
            "it does not export iim:plugin/handler (it exports: {}); a plugin is built \
             against the `plugin` world of wit/iim.wit",
            if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            }
        );
    }
    format!("its exports do not fit the iim:plugin world: {text}")
}

/// Stubs what `item` is as `name` in `linker`: a function that traps if called, an instance of
/// such functions, a resource of no use. Only for type-checking what else is there.
fn stub(
    linker: &mut Linker<PluginState>,
    name: &str,
    item: &ComponentItem,
    engine: &wasmtime::Engine,
) -> wasmtime::Result<()> {
    struct Stubbed;
    let mut root = linker.root();
    match item {
        ComponentItem::ComponentInstance(instance) => {
            let mut inner = root.instance(name)?;
            for (export, item) in instance.exports(engine) {
                match item.ty {
                    ComponentItem::ComponentFunc(_) => {
                        inner.func_new(export, |_, _, _, _| {
                            wasmtime::bail!("not provided by this host")
                        })?;
                    }
                    ComponentItem::Resource(_) => {
                        inner.resource(export, ResourceType::host::<Stubbed>(), |_, _| Ok(()))?;
                    }
                    _ => {}
                }
            }
        }
        ComponentItem::ComponentFunc(_) => {
            root.func_new(name, |_, _, _, _| {
                wasmtime::bail!("not provided by this host")
            })?;
        }
        ComponentItem::Resource(_) => {
            root.resource(name, ResourceType::host::<Stubbed>(), |_, _| Ok(()))?;
        }
        _ => {}
    }
    Ok(())
}

/// A host of its own for running a plugin outside a server: a store in a temporary directory
/// with some users, and the services the imports work on. Nothing leaves it.
pub struct Sandbox {
    _dir: tempfile::TempDir,
    /// What the imports work on.
    pub services: Arc<Services>,
}

impl Sandbox {
    /// A sandbox whose store has accounts for `users`.
    pub fn new(users: &[UserId]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("store"))?;
        for user in users {
            let record = UserRecord {
                password_hash: String::new(),
                created_at: 0,
            };
            store.accounts.create(user, &record)?;
        }
        let registry = Arc::new(Registry::new(16));
        let iim = Arc::new(Iim::new(
            "sandbox".into(),
            store.clone(),
            Arc::clone(&registry),
            None,
            None,
        ));
        let services = Arc::new(Services {
            store,
            registry,
            iim,
            max_body: iim_proto::DEFAULT_MAX_BODY,
            max_frame: iim_proto::DEFAULT_MAX_FRAME,
            max_send_users: 10_000,
        });
        Ok(Self {
            _dir: dir,
            services,
        })
    }
}

/// Checks a plugin file as the host would load it under `name` with configuration `file`:
/// examines it and, if it fits, runs its `init` in a sandbox. Returns what was found and the
/// loaded info (or why `init` refused).
pub async fn check(
    runtime: &Runtime,
    bytes: &[u8],
    name: &str,
    file: &PluginFile,
) -> Result<(Examined, Option<Result<LoadedInfo, LoadError>>), LoadError> {
    let examined = examine(runtime, bytes)?;
    let Some(build) = &examined.build else {
        return Ok((examined, None));
    };
    let sandbox = Sandbox::new(&[]).map_err(|e| LoadError::Trap(format!("no sandbox: {e:#}")))?;
    let init = runtime
        .instantiate(build, name, sandbox.services, &file.config, &file.settings)
        .await
        .and_then(|(mut instance, info)| {
            let groups = instance.state().subscribed_groups();
            LoadedInfo::from_init(info, groups, &build.digest)
        });
    Ok((examined, Some(init)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime::new(&crate::config::PluginsConfig::default(), None).expect("runtime")
    }

    fn examine_wat(wat: &str) -> Result<Examined, LoadError> {
        examine(&runtime(), &wat::parse_str(wat).expect("valid text"))
    }

    #[test]
    fn every_import_the_host_lacks_is_named_with_advice() {
        let examined = examine_wat(
            r#"(component
                (import "wasi:http/types@0.2.3" (instance
                    (export "fields" (type (sub resource)))
                    (export "now" (func (result u64)))))
                (import "wasi:io/poll@0.2.6" (instance
                    (export "pollable" (type (sub resource)))))
                (import "acme:db/query@1.0.0" (instance
                    (export "run" (func (param "q" string)))))
            )"#,
        )
        .expect("it compiles");
        let missing: Vec<&str> = examined.missing.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(missing.len(), 2, "{:?}", examined.missing);
        assert!(missing.contains(&"wasi:http/types@0.2.3"), "{missing:?}");
        assert!(missing.contains(&"acme:db/query@1.0.0"), "{missing:?}");
        let (_, http) = &examined.missing[missing
            .iter()
            .position(|m| m.starts_with("wasi:http"))
            .expect("http")];
        assert!(http.contains("--disable http"), "{http}");
        assert!(!examined.fits());
        // And its exports are wrong too: no handler.
        let world = examined.world.expect_err("no handler export");
        assert!(
            world.contains("does not export iim:plugin/handler"),
            "{world}"
        );
    }

    #[test]
    fn a_component_of_another_world_is_told_so() {
        let examined = examine_wat(
            r#"(component
                (import "iim:plugin/iim@0.2.0" (instance
                    (export "log" (func (param "m" string)))))
            )"#,
        )
        .expect("it compiles");
        let [(name, why)] = examined.missing.as_slice() else {
            panic!("{:?}", examined.missing);
        };
        assert_eq!(name, "iim:plugin/iim@0.2.0");
        assert!(
            why.contains("another version of the iim:plugin WIT"),
            "{why}"
        );
        assert!(why.contains("iim:plugin@0.1.2"), "{why}");
    }

    #[test]
    fn a_core_module_or_another_file_is_not_a_component() {
        let core = wat::parse_str("(module)").expect("module");
        assert!(matches!(is_component(&core), Err(NotComponent::CoreModule)));
        let error = examine(&runtime(), &core)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            error.contains("a core WebAssembly module, not a component"),
            "{error}"
        );
        assert!(matches!(
            is_component(b"#!/bin/sh\n"),
            Err(NotComponent::NotWasm(_))
        ));
        assert!(matches!(
            is_component(b"\0asm"),
            Err(NotComponent::NotWasm(_))
        ));
    }
}
