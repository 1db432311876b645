//! The layout (issues 10 and 31): one folder per stage of the data flow,
//! each a layer that imports only the layers below it — app → exchange →
//! operator → gate → allowlist → observe → config → redis → vocabulary —
//! and inside a folder, its modules in an order of their own. This reads
//! every `src/**/*.rs` (code outside `#[cfg(test)]` modules) and checks
//! every `crate::<folder>::<module>` and `super::<module>` reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level folder's (or root module's) layer: it may use lower
/// layers only.
const FOLDERS: &[(&str, u8)] = &[
    // Vocabulary: numbers, sides, text.
    ("domain", 0),
    ("text", 0),
    // Redis: the key map, connections, the stream reader, the scripts.
    ("redis", 1),
    // The environment, parsed once (it names keys and Redis targets).
    ("config", 2),
    // Metrics, logging, the watchdog.
    ("observe", 3),
    ("allowlist", 4),
    // Plans to permits.
    ("gate", 5),
    // The kill switch and the operator's tools.
    ("operator", 6),
    // Above the operator: a liquidation tightens its symbol through the
    // control path (SPEC §19).
    ("exchange", 7),
    // The process.
    ("app", 8),
];

/// Inside a folder: each module's layer among its siblings (`mod.rs`, the
/// folder's own top, is not listed: it may use every sibling).
const MODULES: &[(&str, &str, u8)] = &[
    ("redis", "keys", 0),
    ("redis", "resp", 0),
    ("redis", "scripts", 0),
    ("redis", "target", 0),
    ("redis", "sentinel", 1),
    ("redis", "store", 2),
    ("redis", "stream", 3),
    ("config", "vars", 0),
    ("config", "values", 1),
    ("config", "env", 1),
    ("config", "credentials", 2),
    ("config", "redis_settings", 3),
    ("config", "check", 3),
    ("observe", "metrics", 0),
    ("observe", "telemetry", 0),
    ("observe", "watchdog", 1),
    ("gate", "rules", 0),
    ("gate", "steps", 0),
    ("gate", "known", 0),
    ("gate", "intake", 1),
    ("gate", "record", 1),
    ("gate", "permits", 2),
    ("gate", "consumer", 3),
    ("gate", "ledger", 3),
    ("operator", "acl", 0),
    ("operator", "instance", 0),
    ("operator", "states", 0),
    ("operator", "change", 1),
    ("operator", "control", 2),
    ("operator", "explain", 2),
    ("operator", "replay", 2),
    ("operator", "guardian", 3),
    ("operator", "ctl", 3),
    ("exchange", "positions", 0),
    ("exchange", "rest", 0),
    ("exchange", "step_table", 0),
    ("exchange", "orders", 1),
    ("exchange", "book", 1),
    ("exchange", "machine", 2),
    ("exchange", "closes", 2),
    ("exchange", "frames", 2),
    ("exchange", "snapshots", 3),
    ("exchange", "user_stream", 4),
    ("app", "http", 0),
    ("app", "lifecycle", 1),
];

/// Every `.rs` file under `dir` (a folder's modules and their own
/// submodule files, such as `rules/tests.rs`).
fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The names a line refers to after each `prefix` (`crate::`, `super::`):
/// `a::b` gives `[a, b]`, `{a, b::c}` gives `[a]`, `[b]`.
fn references(line: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find(prefix) {
        // `crate::` inside `position_state_brain::crate::` does not occur;
        // a `super::` inside `super::super::` is read from the first.
        rest = &rest[i + prefix.len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            let inner = inner.split('}').next().unwrap_or("");
            for t in inner.split(',') {
                out.push(path_of(t.trim()));
            }
        } else {
            out.push(path_of(rest));
        }
    }
    out
}

fn path_of(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            break;
        }
        rest = &rest[name.len()..];
        parts.push(name);
        match rest.strip_prefix("::") {
            Some(r) if !r.starts_with('{') => rest = r,
            Some(r) => {
                // `a::{b, c}`: the first name of each.
                let inner = r[1..].split('}').next().unwrap_or("");
                if let Some(first) = inner.split(',').next() {
                    parts.extend(path_of(first.trim()).into_iter().take(1));
                }
                break;
            }
            None => break,
        }
    }
    parts
}

#[test]
fn imports_run_only_downward() {
    let folder_layer: BTreeMap<&str, u8> = FOLDERS.iter().copied().collect();
    let module_layer: BTreeMap<(&str, &str), u8> =
        MODULES.iter().map(|(f, m, l)| ((*f, *m), *l)).collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    let mut folders_seen = 0;
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let (folder, files) = if path.is_dir() {
            if file == "bin" {
                continue;
            }
            (file.to_string(), rs_files(&path))
        } else if let Some(name) = file.strip_suffix(".rs") {
            if name == "lib" || name == "main" {
                continue;
            }
            (name.to_string(), vec![path.clone()])
        } else {
            continue;
        };
        let folder = folder.as_str();
        let Some(&mine) = folder_layer.get(folder) else {
            panic!("src/{folder} has no layer in tests/it/layout.rs: give it one");
        };
        folders_seen += 1;
        // A module's unit tests (`rules/tests.rs`) are test code.
        for path in files.into_iter().filter(|p| !p.ends_with("tests.rs")) {
            // The module a file is: `gate/rules.rs` and `gate/rules/tests.rs`
            // are `rules`; a folder's `mod.rs` is its top.
            let rel = path.strip_prefix(src.join(folder)).unwrap_or(&path);
            let module = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|s| s.trim_end_matches(".rs").to_string())
                .unwrap_or_default();
            let in_folder = path.is_dir() || rel != path.as_path();
            let my_module = if !in_folder || module == "mod" {
                None
            } else {
                match module_layer.get(&(folder, module.as_str())) {
                    Some(&l) => Some(l),
                    None => panic!(
                        "src/{folder}/{module} has no layer among its siblings in tests/it/layout.rs: give it one"
                    ),
                }
            };
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                let at = format!("{}:{}", path.display(), n + 1);
                for r in references(line, "crate::") {
                    let Some(top) = r.first() else { continue };
                    if top == folder {
                        // A sibling, by its full path.
                        if let (Some(mine), Some(sib)) = (my_module, r.get(1)) {
                            check_sibling(
                                &module_layer,
                                folder,
                                &module,
                                mine,
                                sib,
                                &at,
                                &mut wrong,
                            );
                        }
                        continue;
                    }
                    match folder_layer.get(top.as_str()) {
                        Some(&theirs) if theirs < mine => {}
                        _ => wrong.push(format!("{at}: uses crate::{}", r.join("::"))),
                    }
                }
                if let Some(mine) = my_module {
                    for r in references(line, "super::") {
                        if let Some(sib) = r.first() {
                            check_sibling(
                                &module_layer,
                                folder,
                                &module,
                                mine,
                                sib,
                                &at,
                                &mut wrong,
                            );
                        }
                    }
                }
            }
        }
    }
    assert!(
        folders_seen >= FOLDERS.len(),
        "only {folders_seen} folders found"
    );
    assert!(
        wrong.is_empty(),
        "imports that do not run downward:\n{}",
        wrong.join("\n")
    );
}

/// A reference from `module` (layer `mine`) to `sib` in the same folder:
/// fine when `sib` is lower, or not a module (an item of `mod.rs`).
fn check_sibling(
    layers: &BTreeMap<(&str, &str), u8>,
    folder: &str,
    module: &str,
    mine: u8,
    sib: &str,
    at: &str,
    wrong: &mut Vec<String>,
) {
    if sib == module {
        return;
    }
    if let Some(&theirs) = layers.get(&(folder, sib)) {
        if theirs >= mine {
            wrong.push(format!("{at}: {folder}/{module} uses its sibling {sib}"));
        }
    }
}

#[test]
fn every_folder_says_what_it_does_and_what_it_may_import() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (folder, _) in FOLDERS {
        let m = src.join(folder).join("mod.rs");
        if !m.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&m).unwrap();
        let head: String = text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            head.len() > 200,
            "src/{folder}/mod.rs opens with a paragraph"
        );
        assert!(
            head.contains("import"),
            "src/{folder}/mod.rs says what it may import: {head}"
        );
    }
}

#[test]
fn no_source_file_is_over_about_800_lines_unless_it_is_one_table() {
    // The one table: the variables (one line each).
    let tables = ["config/vars.rs"];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    for p in rs_files(&src) {
        let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if tables.contains(&rel.as_str()) {
            continue;
        }
        let n = std::fs::read_to_string(&p).unwrap().lines().count();
        if n > 850 {
            long.push(format!("src/{rel}: {n} lines"));
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
}
