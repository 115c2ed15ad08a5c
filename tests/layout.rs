//! The source tree stays easy to hold in mind: in every folder of `src/` the modules import each
//! other in one direction only (no module reaches back into one that reaches it), no source file
//! is over 600 lines, and every file opens with a module doc (`//!`). Imports are read from the
//! source text (`crate::`, `super::` and `self::` paths, `use` groups, names a folder's `mod.rs`
//! re-exports resolved to the module that defines them; unit-test modules left out: tests may
//! build on any module), so a new circle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a source file may grow before it is split.
const MAX_LINES: usize = 600;

/// A source file: its module path (`src/train/model/mod.rs` -> [train, model]), whether it is a
/// folder's `mod.rs` (or `lib.rs`/`main.rs`), where it is and its text.
struct File {
    module: Vec<String>,
    is_folder: bool,
    path: PathBuf,
    text: String,
}

/// Every `.rs` file under `dir`.
fn modules(dir: &Path, prefix: Vec<String>, out: &mut Vec<File>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut next = prefix.clone();
            next.push(p.file_name().unwrap().to_string_lossy().to_string());
            modules(&p, next, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let is_folder = matches!(name.as_str(), "mod" | "lib" | "main");
            let mut module = prefix.clone();
            if !is_folder {
                module.push(name);
            }
            let text = std::fs::read_to_string(&p).unwrap();
            out.push(File { module, is_folder, path: p, text });
        }
    }
}

fn ident(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The paths named by `rest` (what follows `crate::`, `super::` or `self::`), each prefixed with
/// `base`: `a::b::c`, or a group `{a, b::{c, d}}` (each member's first segments).
fn paths_after(base: &[String], rest: &str, out: &mut Vec<Vec<String>>) {
    let mut path = base.to_vec();
    let mut rest = rest;
    loop {
        if let Some(group) = rest.strip_prefix('{') {
            // Members at depth one of the group, split on commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        paths_after(&path, group[start..i].trim(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        paths_after(&path, group[start..i].trim(), out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            paths_after(&path, group[start..].trim(), out); // the group goes on past this line
            return;
        }
        let seg = ident(rest);
        if seg.is_empty() {
            break;
        }
        path.push(seg.clone());
        match rest[seg.len()..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    if path.len() > base.len() {
        out.push(path);
    }
}

/// The crate-absolute paths a file refers to, outside its unit tests.
fn references(file: &File) -> Vec<Vec<String>> {
    let mut out = vec![];
    // Unit tests (the `#[cfg(test)]` module at the end of a file) may build on any module.
    let text = file.text.split("\n#[cfg(test)]").next().unwrap_or(&file.text);
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            if code[..i].ends_with('$') {
                continue; // macro hygiene: $crate::
            }
            paths_after(&[], &code[i + 7..], &mut out);
        }
        for (i, _) in code.match_indices("self::") {
            if i >= 2 && &code[i - 2..i] == "::"
                || code[..i].ends_with('$')
                || code[..i].ends_with(char::is_alphanumeric)
            {
                continue;
            }
            paths_after(&file.module, &code[i + 6..], &mut out);
        }
        for (i, _) in code.match_indices("super::") {
            if i >= 2 && &code[i - 2..i] == "::" {
                continue; // counted with the first super:: of the chain
            }
            // Each `super::` is one module up from this one (a folder's mod.rs is the folder).
            let mut base = file.module.clone();
            let mut rest = &code[i..];
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            paths_after(&base, rest, &mut out);
        }
    }
    out
}

/// The modules directly in `folder`, and what the folder's `mod.rs` re-exports from which of them
/// (`pub use stream::{Batch, Item}` -> Batch and Item are stream's).
fn children(files: &[File], folder: &[String]) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut names = BTreeSet::new();
    for f in files {
        if f.module.len() > folder.len() && f.module[..folder.len()] == *folder {
            names.insert(f.module[folder.len()].clone());
        }
    }
    let mut reexports = BTreeMap::new();
    if let Some(own) = files.iter().find(|f| f.is_folder && f.module == folder) {
        for line in own.text.lines() {
            let Some(rest) = line.trim().strip_prefix("pub use ") else { continue };
            let mut paths = vec![];
            paths_after(&[], rest.trim_start_matches("self::"), &mut paths);
            for p in paths {
                if let (Some(first), Some(last)) = (p.first(), p.last()) {
                    if names.contains(first) {
                        reexports.insert(last.clone(), first.clone());
                    }
                }
            }
        }
    }
    (names, reexports)
}

/// Which module of `folder` imports which, from the files under it.
fn folder_graph(files: &[File], folder: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let (names, reexports) = children(files, folder);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        if f.module.len() <= folder.len() || f.module[..folder.len()] != *folder {
            continue;
        }
        let from = &f.module[folder.len()];
        for r in references(f) {
            if r.len() <= folder.len() || r[..folder.len()] != *folder {
                continue;
            }
            let next = &r[folder.len()];
            let to = match reexports.get(next) {
                Some(m) if !names.contains(next) => m,
                _ => next,
            };
            if to != from && names.contains(to) {
                g.entry(from.clone()).or_default().insert(to.clone());
            }
        }
    }
    g
}

/// The circles of a graph, each as the path that closes it.
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
        if done.contains(n) {
            return;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, stack, done, found);
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut found = vec![];
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, graph, &mut vec![], &mut done, &mut found);
    }
    found
}

fn source_files() -> Vec<File> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    modules(&src, vec![], &mut files);
    assert!(files.len() > 50, "read {} files under {}", files.len(), src.display());
    files
}

/// Every folder of `src/` (the crate root as []), from the module paths of its files.
fn folders(files: &[File]) -> Vec<Vec<String>> {
    files.iter().filter(|f| f.is_folder).map(|f| f.module.clone()).collect::<BTreeSet<_>>().into_iter().collect()
}

#[test]
fn every_folder_imports_in_one_direction() {
    let files = source_files();
    let mut problems = vec![];
    let mut edges = 0;
    for folder in folders(&files) {
        let g = folder_graph(&files, &folder);
        edges += g.values().map(BTreeSet::len).sum::<usize>();
        for c in circles(&g) {
            problems.push(format!("src/{}: {}", folder.join("/"), c.join(" -> ")));
        }
    }
    assert!(edges > 100, "found only {edges} imports between modules: is the reader broken?");
    assert!(problems.is_empty(), "import circles:\n{}", problems.join("\n"));
    // Library stages never reach into the command line or the commands.
    let top = folder_graph(&files, &[]);
    for (from, to) in &top {
        if from != "cli" && from != "commands" {
            assert!(!to.contains("commands") && !to.contains("cli"), "{from} imports from the commands: {to:?}");
        }
    }
}

#[test]
fn no_source_file_is_over_the_limit() {
    let long: Vec<String> = source_files()
        .iter()
        .map(|f| (f.text.lines().count(), f.path.display().to_string()))
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, p)| format!("{p}: {n} lines"))
        .collect();
    assert!(long.is_empty(), "split these files (over {MAX_LINES} lines):\n{}", long.join("\n"));
}

#[test]
fn every_file_and_folder_opens_with_a_module_doc() {
    let files = source_files();
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !f.text.trim_start().starts_with("//!"))
        .map(|f| f.path.display().to_string())
        .collect();
    assert!(missing.is_empty(), "no module doc (//! ...) at the top of:\n{}", missing.join("\n"));
    // Every folder has its mod.rs to say what it holds.
    for f in &files {
        if f.module.len() > 1 || (f.module.len() == 1 && !f.is_folder) {
            let folder = if f.is_folder { &f.module[..] } else { &f.module[..f.module.len() - 1] };
            if folder.is_empty() {
                continue;
            }
            assert!(
                files.iter().any(|g| g.is_folder && g.module == folder),
                "src/{} has no mod.rs to describe it",
                folder.join("/")
            );
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
    // A diamond is no circle.
    let mut d: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    d.entry("a".into()).or_default().extend(["b".to_string(), "c".into()]);
    d.entry("b".into()).or_default().insert("d".into());
    d.entry("c".into()).or_default().insert("d".into());
    assert!(circles(&d).is_empty());
}

#[test]
fn the_reader_resolves_super_self_groups_and_reexports() {
    let file = |module: &[&str], is_folder: bool, text: &str| File {
        module: module.iter().map(|s| s.to_string()).collect(),
        is_folder,
        path: PathBuf::new(),
        text: text.into(),
    };
    let norm = file(&["train", "model", "norm"], false, "use super::rope::x;\nuse crate::a::{b, c::{d, e}};");
    let sorted = |mut v: Vec<Vec<String>>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(references(&norm)),
        vec![
            vec!["a".to_string(), "b".into()],
            vec!["a".to_string(), "c".into(), "d".into()],
            vec!["a".to_string(), "c".into(), "e".into()],
            vec!["train".to_string(), "model".into(), "rope".into(), "x".into()],
        ]
    );
    // In a folder's mod.rs, `super::` is the folder's parent and `self::` the folder.
    let m = file(&["ingest", "read"], true, "use super::rows::f;\nuse self::lines::L;");
    assert_eq!(
        sorted(references(&m)),
        vec![
            vec!["ingest".to_string(), "read".into(), "lines".into(), "L".into()],
            vec!["ingest".to_string(), "rows".into(), "f".into()]
        ]
    );
    // A name re-exported by the folder's mod.rs is the defining module's: formats -> stream -> formats.
    let files = vec![
        file(&["ingest"], true, "//! x\npub mod formats;\npub mod stream;\npub use stream::{Batch, Item};"),
        file(&["ingest", "formats"], false, "//! x\nuse super::Item;"),
        file(&["ingest", "stream"], false, "//! x\nuse super::formats::Mapper;"),
    ];
    let g = folder_graph(&files, &["ingest".to_string()]);
    assert_eq!(circles(&g), vec![vec!["formats".to_string(), "stream".into(), "formats".into()]]);
}
