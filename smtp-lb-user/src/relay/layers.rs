//! The relay's layers, checked: every module path a relay source file names
//! (`use super::…`, `crate::relay::…`, in `use` items and in code) is an
//! edge of the module graph; the graph must have no cycle.
//!
//! An edge between two modules is lifted to the children of their deepest
//! common ancestor (`queue::worker → policy::shaping` counts as `queue →
//! policy`), so each folder's modules must form a layering of their own and
//! the folders above them too. A module naming its own ancestor or
//! descendant is one unit (a folder's `mod.rs` and the files that extend
//! its types) and makes no edge.
//!
//! `cargo test -p smtp-lb-user --lib relay::layers -- --nocapture` prints the graph.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// A module path below `relay`, e.g. `["queue", "worker"]`; empty = `relay` itself.
type Module = Vec<String>;

fn relay_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/relay")
}

/// Every module file below `dir`, with its module path.
fn modules(dir: &Path, prefix: &Module, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).expect("read relay dir") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_stem()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let mut m = prefix.clone();
        if path.is_dir() {
            m.push(name);
            modules(&path, &m, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if name != "mod" {
                m.push(name);
            }
            out.insert(m, std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

/// Source text without comments, string and char literals (they may hold `::`).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A char literal ('x', '\n'); a lifetime ('a) has no closing quote.
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let (head, rest) = (&tree[..open], &tree[open + 1..tree.len() - 1]);
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&rest[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&rest[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |e| format!("{head}{e}")))
        .collect()
}

/// The paths a file names: `use` trees expanded, and `super::…`/`crate::…`
/// paths in code, each with the inline module (`mod tests {`) it sits in.
fn paths(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // Inline module depth at each byte: `mod x {` opens one.
    let mut inline: Vec<usize> = Vec::new(); // brace depth at which each inline mod opened
    let mut depth = 0usize;
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &code[i..];
        if rest.starts_with('{') {
            depth += 1;
        } else if rest.starts_with('}') {
            depth -= 1;
            if inline.last() == Some(&depth) {
                inline.pop();
            }
        } else if word_at(code, i, "mod") {
            let decl: String = rest[3..]
                .chars()
                .take_while(|&c| c != ';' && c != '{')
                .collect();
            if rest[3 + decl.len()..].starts_with('{') {
                inline.push(depth);
            }
        } else if word_at(code, i, "use") {
            let end = rest.find(';').unwrap_or(rest.len());
            for p in expand(&rest[3..end]) {
                out.push((inline.len(), p));
            }
            i += end;
            continue;
        } else if word_at(code, i, "super") || word_at(code, i, "crate") || word_at(code, i, "self")
        {
            let p: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if p.contains("::") {
                out.push((inline.len(), p.clone()));
            }
            i += p.len().max(1);
            continue;
        }
        i += 1;
    }
    out
}

/// Whether the word `w` starts at byte `i` of `s`.
fn word_at(s: &str, i: usize, w: &str) -> bool {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    s[i..].starts_with(w)
        && (i == 0 || !ident(s.as_bytes()[i - 1]))
        && !s.as_bytes().get(i + w.len()).copied().is_some_and(ident)
}

/// The relay module a path names, from module `at` (inside `inline` inline
/// modules), or `None` if it leaves the relay.
fn resolve(
    at: &Module,
    inline: usize,
    path: &str,
    known: &BTreeMap<Module, String>,
) -> Option<Module> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let (mut base, rest): (Module, &[&str]) = match *segs.first()? {
        "crate" if segs.get(1) == Some(&"relay") => (Vec::new(), &segs[2..]),
        "super" => {
            let ups = segs.iter().take_while(|s| **s == "super").count();
            // The first `super`s only climb out of inline modules.
            let climb = ups.checked_sub(inline)?;
            if climb > at.len() {
                return None;
            }
            (at[..at.len() - climb].to_vec(), &segs[ups..])
        }
        "self" if inline == 0 => (at.clone(), &segs[1..]),
        _ => return None,
    };
    if path.starts_with("super")
        && inline > 0
        && segs.iter().take_while(|s| **s == "super").count() <= inline
    {
        return None; // names this very file
    }
    for s in rest {
        let mut next = base.clone();
        next.push((*s).to_owned());
        if !known.contains_key(&next) {
            break;
        }
        base = next;
    }
    Some(base)
}

/// Edges lifted to siblings: (parent, from child, to child).
fn graph() -> BTreeSet<(Module, String, String)> {
    let mut known = BTreeMap::new();
    modules(&relay_dir(), &Vec::new(), &mut known);
    let mut edges = BTreeSet::new();
    for (m, src) in &known {
        if m.first().is_some_and(|s| s == "layers") {
            continue;
        }
        for (inline, p) in paths(&code_only(src)) {
            let Some(to) = resolve(m, inline, &p, &known) else {
                continue;
            };
            let common = m.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == m.len() || common == to.len() {
                continue; // an ancestor, a descendant, or itself
            }
            edges.insert((m[..common].to_vec(), m[common].clone(), to[common].clone()));
        }
    }
    edges
}

/// A cycle among the sibling edges of one folder, if any.
fn cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeSet<(String, String)>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for (_, to) in edges.iter().filter(|(f, _)| f == n) {
            if let Some(c) = visit(to, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .iter()
        .find_map(|(f, _)| visit(f, edges, &mut Vec::new(), &mut done))
}

#[test]
fn relay_modules_import_only_downward() {
    let edges = graph();
    let mut by_folder: BTreeMap<Module, BTreeSet<(String, String)>> = BTreeMap::new();
    for (parent, from, to) in &edges {
        by_folder
            .entry(parent.clone())
            .or_default()
            .insert((from.clone(), to.clone()));
    }
    for (folder, e) in &by_folder {
        let name = if folder.is_empty() {
            "relay".to_owned()
        } else {
            format!("relay::{}", folder.join("::"))
        };
        println!("{name}:");
        let mut from: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (f, t) in e {
            from.entry(f).or_default().push(t);
        }
        for (f, ts) in from {
            println!("  {f} -> {}", ts.join(", "));
        }
    }
    for (folder, e) in &by_folder {
        if let Some(c) = cycle(e) {
            panic!(
                "import cycle in relay::{}: {}",
                folder.join("::"),
                c.join(" -> ")
            );
        }
    }
    // The graph is not empty: the parser sees the imports.
    assert!(
        edges
            .iter()
            .any(|(p, f, t)| p.is_empty() && f == "queue" && t == "spool")
    );
}

#[test]
fn a_cycle_is_found() {
    let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .iter()
        .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
        .collect();
    assert_eq!(
        cycle(&e),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("a", "c")]
        .iter()
        .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
        .collect();
    assert_eq!(cycle(&e), None);
}

#[test]
fn use_trees_expand_and_super_resolves_from_inline_modules() {
    assert_eq!(
        expand("super::{a::{B, c::D}, e}"),
        vec!["super::a::B", "super::a::c::D", "super::e"]
    );
    let known: BTreeMap<Module, String> = [
        vec![],
        vec!["q".to_owned()],
        vec!["q".to_owned(), "w".to_owned()],
        vec!["p".to_owned()],
    ]
    .into_iter()
    .map(|m| (m, String::new()))
    .collect();
    let w = vec!["q".to_owned(), "w".to_owned()];
    assert_eq!(
        resolve(&w, 0, "super::super::p::X", &known),
        Some(vec!["p".to_owned()])
    );
    assert_eq!(resolve(&w, 1, "super::X", &known), None);
    assert_eq!(
        resolve(&w, 1, "super::super::p", &known),
        Some(vec!["q".to_owned()])
    );
    assert_eq!(
        resolve(&w, 0, "crate::relay::p::Y", &known),
        Some(vec!["p".to_owned()])
    );
    assert_eq!(resolve(&w, 0, "crate::smtp::Reply", &known), None);
}
