//! The crate's layer order (see the crate's documentation), checked over its source: a module
//! may name (`crate::m`) only modules below it, and the files inside a module may not name each
//! other in a cycle. Test code (the `tests` module closing a file, and test-only files) is not
//! checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Bottom first: the order of `lib.rs`'s documentation.
const LAYERS: &[&str] = &[
    "json",
    "error",
    "serve",
    "thread_class",
    "request",
    "usage",
    "config",
    "telemetry",
    "upstream",
    "auth",
    "journal",
    "ledger",
    "router",
    "quota",
    "metrics",
    "metering",
    "relay",
    "scheduler",
    "coalesce",
    "state",
    "pipeline",
    "api",
    "grpc",
    "gateway",
];

/// A source file: its module path inside the crate (`["quota", "redis"]`) and its checked text.
struct Source {
    path: Vec<String>,
    text: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let test_only = test_only_modules(&files, &root);
    files
        .into_iter()
        .filter_map(|file| {
            let relative = file.strip_prefix(&root).ok()?.with_extension("");
            let mut path: Vec<String> = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if path
                .last()
                .is_some_and(|last| last == "mod" || last == "lib")
            {
                path.pop();
            }
            if test_only.contains(&path) {
                return None;
            }
            let text = fs::read_to_string(&file).ok()?;
            let text = match text.find("#[cfg(test)]") {
                Some(at) if text[at..].contains("\nmod tests {") => text[..at].to_owned(),
                _ => text,
            };
            Some(Source { path, text })
        })
        .collect()
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Modules declared `#[cfg(test)] mod name;`, as module paths.
fn test_only_modules(files: &[PathBuf], root: &Path) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for file in files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        let Ok(relative) = file.strip_prefix(root) else {
            continue;
        };
        let mut parent: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        parent.pop();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() == "#[cfg(test)]"
                && let Some(next) = lines.peek()
                && let Some(name) = next
                    .trim()
                    .strip_prefix("mod ")
                    .and_then(|n| n.strip_suffix(';'))
            {
                let mut path = parent.clone();
                path.push(name.to_owned());
                found.insert(path);
            }
        }
    }
    found
}

/// Every `crate::a::b` a text names, as `[a, b]` (`b` absent for `crate::a` alone or a braced
/// list).
fn crate_paths(text: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        if text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        let first = ident(rest);
        let second = rest[first.len()..]
            .strip_prefix("::")
            .map(ident)
            .filter(|s| !s.is_empty());
        found.push((first, second));
    }
    found
}

/// Every `super::name` a text names.
fn super_paths(text: &str) -> Vec<String> {
    text.match_indices("super::")
        .map(|(at, _)| {
            text[at + "super::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty() && name != "super")
        .collect()
}

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|m| *m == module)
}

#[test]
fn every_module_has_a_layer() {
    let mut missing = BTreeSet::new();
    for source in sources() {
        if let Some(top) = source.path.first()
            && top != "layers"
            && rank(top).is_none()
        {
            missing.insert(top.clone());
        }
    }
    assert!(missing.is_empty(), "modules without a layer: {missing:?}");
}

#[test]
fn modules_import_only_from_below() {
    let mut upward = Vec::new();
    for source in sources() {
        let Some(from) = source.path.first().and_then(|m| rank(m)) else {
            continue;
        };
        for (module, _) in crate_paths(&source.text) {
            let Some(to) = rank(&module) else { continue };
            if to > from {
                upward.push(format!("{} -> {module}", source.path.join("::")));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a higher layer: {upward:#?}"
    );
}

#[test]
fn files_inside_a_module_form_no_cycle() {
    // module -> file -> files of the same module it names
    let mut graphs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for source in sources() {
        let [module, file] = source.path.as_slice() else {
            continue;
        };
        let mut named: BTreeSet<String> = super_paths(&source.text).into_iter().collect();
        named.extend(
            crate_paths(&source.text)
                .into_iter()
                .filter(|(m, _)| m == module)
                .filter_map(|(_, file)| file),
        );
        named.remove(file);
        graphs
            .entry(module.clone())
            .or_default()
            .insert(file.clone(), named);
    }
    for (module, graph) in &graphs {
        let files: BTreeSet<&String> = graph.keys().collect();
        for start in graph.keys() {
            // Depth-first from `start`: reaching `start` again is a cycle.
            let mut stack: Vec<&String> =
                graph[start].iter().filter(|f| files.contains(f)).collect();
            let mut seen: BTreeSet<&String> = BTreeSet::new();
            while let Some(file) = stack.pop() {
                assert_ne!(
                    file, start,
                    "a cycle among the files of `{module}` through `{start}`"
                );
                if seen.insert(file) {
                    stack.extend(graph[file].iter().filter(|f| files.contains(f)));
                }
            }
        }
    }
}

#[test]
fn the_check_sees_an_upward_import() {
    let text = "use crate::gateway::Gateway;\nfn f() { crate::usage::now_ms(); }";
    assert_eq!(
        crate_paths(text),
        [
            ("gateway".to_owned(), Some("Gateway".to_owned())),
            ("usage".to_owned(), Some("now_ms".to_owned()))
        ]
    );
    assert_eq!(
        super_paths("use super::load::Load; use super::*;"),
        ["load"]
    );
}
