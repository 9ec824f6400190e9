//! The host's modules form no circle: each module uses only modules below it, so that each
//! can be read, tested and changed without the ones above it (ARCHITECTURE.md, "Layers").
//!
//! Reads the crate's source: a module uses another when its code (tests and comments left
//! out) names `crate::other` (or, from a top-level module, `super::other`); naming `Host` or
//! anything else defined in `lib.rs` uses the crate root, which uses the modules its `Host`
//! holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module a source file belongs to (`lib` for the crate root).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "main.rs" => None,
        "lib.rs" => Some("lib".into()),
        name => Some(name.trim_end_matches(".rs").to_owned()),
    }
}

/// The code of a file, without its tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names that follow `prefix` in `code` (`crate::store::Store` gives `store`; `crate::{a,
/// b::c}` gives `a` and `b`).
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            names.extend(
                inner
                    .split(',')
                    .filter_map(|item| item.trim().split("::").next())
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("the source directory reads") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Each top-level module and the modules it uses.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f.strip_prefix(&src).ok()?))
        .collect();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("inside src");
        let Some(module) = module_of(relative) else {
            continue;
        };
        let text = code(&std::fs::read_to_string(file).expect("a source file reads"));
        let mut names = names_after(&text, "crate::");
        // From a top-level module's file, `super` is the crate root.
        if relative.components().count() == 1 {
            names.extend(names_after(&text, "super::"));
        }
        let used = graph.entry(module.clone()).or_default();
        for name in names {
            let target = if modules.contains(&name) {
                name
            } else {
                // An item of the crate root (`Host`).
                "lib".to_owned()
            };
            if target != module {
                used.insert(target);
            }
        }
    }
    // The crate root uses the modules whose types its `Host` holds.
    let lib = code(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs reads"));
    let held: Vec<String> = modules
        .iter()
        .filter(|m| *m != "lib" && lib.contains(&format!("{m}::")))
        .cloned()
        .collect();
    graph.entry("lib".into()).or_default().extend(held);
    graph
}

/// A circle through `start`, if there is one.
fn circle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("a path is never empty");
        for next in graph.get(last).into_iter().flatten() {
            if next == start {
                let mut circle = path.clone();
                circle.push(next.clone());
                return Some(circle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn the_host_s_modules_form_no_circle() {
    let graph = uses();
    assert!(
        graph.len() > 10,
        "the crate's modules were not found: {graph:?}"
    );
    // The modules the layering rests on are where the check expects them.
    for (module, uses) in [
        ("session", "cmd"),
        ("cmd", "store"),
        ("iim", "store"),
        ("network", "iim"),
    ] {
        assert!(
            graph.get(module).is_some_and(|u| u.contains(uses)),
            "{module} should use {uses}: {graph:#?}"
        );
    }
    for module in graph.keys() {
        if let Some(circle) = circle_through(&graph, module) {
            panic!("a circle of modules: {}\n{graph:#?}", circle.join(" -> "));
        }
    }
}

#[test]
fn the_store_and_the_plugin_runtime_stay_below_the_requests() {
    let graph = uses();
    let below = |module: &str, above: &[&str]| {
        for other in above {
            assert!(
                !graph.get(module).is_some_and(|u| u.contains(*other)),
                "{module} must not use {other}: {graph:#?}"
            );
        }
    };
    below(
        "store",
        &["plugin", "iim", "network", "cmd", "session", "lib"],
    );
    below("plugin", &["cmd", "session", "network", "lib"]);
    below("iim", &["network", "plugin", "cmd", "lib"]);
}
