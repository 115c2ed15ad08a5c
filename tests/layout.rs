//! The source tree's rooms import each other in one direction only: among the top-level rooms of
//! `src/` and among the rooms of `src/train/`, no module reaches back into a room that reaches it.
//! Read from the source text (`crate::` and `super::` paths, unit-test modules left out: tests may
//! build on any room), so a new circle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` with its module path (`src/train/model/mod.rs` -> [train, model]).
fn modules(dir: &Path, prefix: Vec<String>, out: &mut Vec<(Vec<String>, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut next = prefix.clone();
            next.push(p.file_name().unwrap().to_string_lossy().to_string());
            modules(&p, next, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let mut m = prefix.clone();
            if !matches!(name.as_str(), "mod" | "lib" | "main") {
                m.push(name);
            }
            out.push((m, p));
        }
    }
}

/// The crate-absolute module paths a file refers to (`crate::a::b`, `super::c`, `use super::{d, e}`).
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = vec![];
    // Unit tests (the `#[cfg(test)]` module at the end of a file) may build on any room.
    let text = text.split("\n#[cfg(test)]").next().unwrap_or(text);
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            if code[..i].ends_with('$') {
                continue; // macro hygiene: $crate::
            }
            let rest = &code[i + 7..];
            let parts: Vec<String> = rest.split("::").map(ident).take_while(|s| !s.is_empty()).collect();
            out.push(parts);
        }
        for (i, _) in code.match_indices("super::") {
            if i >= 2 && &code[i - 2..i] == "::" {
                continue; // counted with the first super:: of the chain
            }
            let mut base: Vec<String> = module.to_vec();
            let mut rest = &code[i..];
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split('}').next().unwrap_or("").split(',') {
                    let first = ident(item.trim());
                    if !first.is_empty() {
                        out.push([base.clone(), vec![first]].concat());
                    }
                }
            } else {
                let parts: Vec<String> = rest.split("::").map(ident).take_while(|s| !s.is_empty()).collect();
                out.push([base, parts].concat());
            }
        }
    }
    out
}

/// The circles among the rooms directly under `room` (nodes are its child modules).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut c = stack[at..].to_vec();
            c.push(n.to_string());
            found.push(c);
            return;
        }
        if !done.insert(n.to_string()) {
            return;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, stack, done, found);
        }
        stack.pop();
    }
    let mut found = vec![];
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, graph, &mut vec![], &mut done, &mut found);
    }
    found
}

fn room_graph(files: &[(Vec<String>, PathBuf)], room: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, path) in files {
        if m.len() <= room.len() || m[..room.len()] != *room {
            continue;
        }
        let from = &m[room.len()];
        for r in references(m, &std::fs::read_to_string(path).unwrap()) {
            if r.len() > room.len() && r[..room.len()] == *room && r[room.len()] != *from {
                g.entry(from.clone()).or_default().insert(r[room.len()].clone());
            }
        }
    }
    g
}

#[test]
fn rooms_import_each_other_in_one_direction() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    modules(&src, vec![], &mut files);
    assert!(files.len() > 50, "read {} files under {}", files.len(), src.display());
    for room in [vec![], vec!["train".to_string()]] {
        let g = room_graph(&files, &room);
        assert!(g.len() > 5, "no imports found among the rooms of src/{}", room.join("/"));
        let c = circles(&g);
        assert!(c.is_empty(), "import circles among the rooms of src/{}: {c:?}", room.join("/"));
    }
    // Library stages never reach into the command line or the commands.
    let top = room_graph(&files, &[]);
    for (from, to) in &top {
        if from != "cli" && from != "commands" {
            assert!(!to.contains("commands") && !to.contains("cli"), "{from} imports from the commands: {to:?}");
        }
    }
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circles(&g), vec![vec!["a".to_string(), "b".into(), "c".into(), "a".into()]]);
    // And `super::` from a file resolves to its folder's sibling.
    let refs = references(&["train".into(), "model".into(), "norm".into()], "use super::rope::x;");
    assert_eq!(refs, vec![vec!["train".to_string(), "model".into(), "rope".into(), "x".into()]]);
}
