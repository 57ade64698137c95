//! The API server's layers depend one way: each module may use its own layer and the layers
//! below it, never one above (see the crate docs), and only `http` knows axum.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top to bottom.
const LAYERS: [&str; 6] = ["http", "policy", "resource", "admission", "storage", "base"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The layers a source text names: `crate::LAYER`, each name inside `crate::{…}`, and
/// `super::super::LAYER` (from a file one folder down).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (prefix, grouped) in [("crate::", true), ("super::super::", false)] {
        for (i, _) in text.match_indices(prefix) {
            let rest = &text[i + prefix.len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) if grouped => {
                    let mut depth = 0;
                    let end = group
                        .char_indices()
                        .find(|&(_, c)| {
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => return true,
                                '}' => depth -= 1,
                                _ => {}
                            }
                            false
                        })
                        .map_or(group.len(), |(j, _)| j);
                    // Names at the top level of the group.
                    let mut depth = 0;
                    let mut tops = Vec::new();
                    let mut start = 0;
                    for (j, c) in group[..end].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                tops.push(&group[start..j]);
                                start = j + 1;
                            }
                            _ => {}
                        }
                    }
                    tops.push(&group[start..end]);
                    tops
                }
                _ => vec![rest],
            };
            for name in names {
                let ident: String = name
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if LAYERS.contains(&ident.as_str()) {
                    out.insert(ident);
                }
            }
        }
    }
    out
}

/// Every `(file, layer it may not use)` under `src`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let Some(layer) = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .filter(|l| LAYERS.contains(l))
        else {
            continue;
        };
        let rank = |l: &str| LAYERS.iter().position(|x| *x == l).unwrap_or(0);
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for used in referenced(&text) {
            if rank(&used) < rank(layer) {
                found.push(format!("{} uses {used}", rel.display()));
            }
        }
        if layer != "http" && (text.contains("axum::") || text.contains("use axum")) {
            found.push(format!("{} uses axum", rel.display()));
        }
    }
    found.sort();
    found
}

#[test]
fn layers_use_only_themselves_and_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "layering violations (order top to bottom: {LAYERS:?}):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_plain_grouped_and_relative_uses() {
    assert_eq!(
        referenced("use crate::resource::verbs::Api;"),
        BTreeSet::from(["resource".to_string()])
    );
    assert_eq!(
        referenced("use crate::{base::meta, http::{route, server}};"),
        BTreeSet::from(["base".to_string(), "http".to_string()])
    );
    assert_eq!(
        referenced("let x = super::super::policy::authorize;"),
        BTreeSet::from(["policy".to_string()])
    );
    assert!(referenced("use crate::resourceful;").is_empty());
}
