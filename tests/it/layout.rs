//! The module layout (issue 10): imports run only downward in the data
//! flow — lifecycle → workers → core → vocabulary — so each stage can be
//! read, tested and replaced alone. This reads `src/*.rs` (code outside
//! `#[cfg(test)]` modules) and checks every `crate::<module>` reference.

use std::collections::BTreeMap;

/// Each module's layer: a module may use modules of lower layers only.
const LAYERS: &[(&str, u8)] = &[
    // Vocabulary: names, numbers, text.
    ("keys", 0),
    ("domain", 0),
    ("text", 0),
    // Plumbing: configuration, metrics, connections, shared tables.
    ("config", 1),
    ("scripts", 1),
    ("resp", 1),
    ("steps", 1),
    ("acl", 2),
    ("metrics", 2),
    ("telemetry", 2),
    ("sentinel", 2),
    ("store", 3),
    ("watchdog", 3),
    // The pure core, and the stream reader the workers share.
    ("rules", 3),
    ("record", 4),
    ("permits", 5),
    ("allowlist", 4),
    ("known", 4),
    ("stream", 4),
    // Workers.
    ("consumer", 6),
    ("ledger", 6),
    // Above control: a liquidation sets its symbol's state through the
    // control path (SPEC §19).
    ("exchange", 7),
    ("http", 6),
    ("control", 6),
    ("instance", 6),
    // The operator's command line, then start, supervision, signals.
    ("ctl", 7),
    ("explain", 7),
    ("replay", 7),
    ("guardian", 7),
    ("lifecycle", 8),
];

#[test]
fn imports_run_only_downward() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut seen = 0;
    let mut wrong = Vec::new();
    // A module is `src/<name>.rs` or a folder `src/<name>/` (every file in
    // it belongs to the module's layer).
    let mut modules: Vec<(String, Vec<std::path::PathBuf>)> = Vec::new();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() {
            if file == "bin" || file == "scripts" {
                continue;
            }
            let mut files: Vec<_> = std::fs::read_dir(&path)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                .collect();
            files.sort();
            modules.push((file.to_string(), files));
        } else if let Some(name) = file.strip_suffix(".rs") {
            modules.push((name.to_string(), vec![path.clone()]));
        }
    }
    for (name, files) in &modules {
        let name = name.as_str();
        if name == "lib" || name == "main" {
            continue;
        }
        let Some(&mine) = layer.get(name) else {
            panic!("src/{name} has no layer in tests/layout.rs: give it one");
        };
        seen += 1;
        for path in files {
            let text = std::fs::read_to_string(path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                let mut rest = line;
                while let Some(i) = rest.find("crate::") {
                    rest = &rest[i + "crate::".len()..];
                    let used: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    let mut targets = vec![used.clone()];
                    if used.is_empty() && rest.starts_with('{') {
                        // `use crate::{a, b::c}`
                        let inner = rest[1..].split('}').next().unwrap_or("");
                        targets = inner
                            .split(',')
                            .map(|t| t.trim().split("::").next().unwrap_or("").to_string())
                            .collect();
                    }
                    for t in targets.into_iter().filter(|t| !t.is_empty() && t != name) {
                        match layer.get(t.as_str()) {
                            Some(&theirs) if theirs < mine => {}
                            _ => {
                                wrong.push(format!("{}:{}: uses crate::{t}", path.display(), n + 1))
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(seen >= LAYERS.len(), "only {seen} modules found");
    assert!(
        wrong.is_empty(),
        "imports that do not run downward:\n{}",
        wrong.join("\n")
    );
}
