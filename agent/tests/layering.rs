//! The crate's modules depend on each other one way only, as docs/architecture.md draws them.
//!
//! Ambit is one crate with strict module boundaries (ztunnel's choice; docs/architecture.md says
//! why). Nothing in the compiler stops a module from importing one above it, so this test reads
//! every source file, collects the `crate::<module>` paths its non-test code names, and fails if
//! a module names one of its own layer or a layer above. Test code (`#[cfg(test)]` modules and
//! the files they declare) may reach anywhere: a test of the identity client may start a CA.
//! So may test support: the `testing` module, declared `#[cfg(any(test, feature = "testing"))]`
//! (its files, and every file below it), which sits above every layer; no production code may
//! name it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The layers, bottom first. A module may use only modules of the layers below its own.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "plumbing: depend on nothing of the crate",
        &[
            "backoff",
            "serdes",
            "timefmt",
            "telemetry",
            "netns",
            "allocator",
        ],
    ),
    ("shared bounds and identity", &["limits", "identity"]),
    // The relay takes its read buffers from the limits' budget.
    ("policy model and the byte relay", &["policy", "relay"]),
    ("the mesh state and the HBONE protocol", &["state", "hbone"]),
    (
        "what feeds or acts on the state",
        &["discovery", "redirect", "cni"],
    ),
    ("the CA service and the proxy", &["ca", "proxy"]),
    ("enrolment: per-pod listeners and maps", &["enrolment"]),
    (
        "replacing an agent: the handover between two",
        &["handover"],
    ),
    ("admin endpoints", &["admin"]),
    ("the waypoint: the L7 proxy", &["waypoint"]),
    (
        "the binary's wiring and the operators' commands",
        &["app", "cli"],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The top-level module a file belongs to (`src/hbone/client.rs` -> `hbone`).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The gates that make code test code: compiled for unit tests, or for other crates' tests
/// through the `testing` feature, never for the release binary.
const TEST_GATES: &[&str] = &["#[cfg(test)]", "#[cfg(any(test, feature = \"testing\"))]"];

/// The test support module: above every layer, used by no production code.
const TEST_SUPPORT: &str = "testing";

/// The modules a file's text declares behind a test gate (`#[cfg(test)] mod name;`).
fn gated_modules(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter(|pair| TEST_GATES.contains(&pair[0]))
        .filter_map(|pair| {
            ["mod ", "pub mod ", "pub(crate) mod ", "pub(super) mod "]
                .iter()
                .find_map(|prefix| pair[1].strip_prefix(prefix))
                .and_then(|rest| rest.strip_suffix(';'))
                .map(str::to_string)
        })
        .collect()
}

/// Test code, exempt: the files of modules declared behind a test gate, and every file below
/// such a module's directory (the files it declares in turn).
struct TestOnly(BTreeSet<PathBuf>);

impl TestOnly {
    fn of(files: &[PathBuf]) -> Self {
        let mut out = BTreeSet::new();
        for file in files {
            for name in gated_modules(&fs::read_to_string(file).unwrap()) {
                let dir = match file.file_stem().unwrap().to_str().unwrap() {
                    "mod" | "lib" => file.parent().unwrap().to_path_buf(),
                    stem => file.parent().unwrap().join(stem),
                };
                out.insert(dir.join(format!("{name}.rs")));
                out.insert(dir.join(name));
            }
        }
        Self(out)
    }

    fn contains(&self, file: &Path) -> bool {
        file.ancestors().any(|path| self.0.contains(path))
    }
}

/// The source without comments and without inline `#[cfg(test)]` modules.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if TEST_GATES.contains(&trimmed)
            && lines.peek().is_some_and(|next| {
                let next = next.trim_start();
                (next.starts_with("mod ") || next.starts_with("pub(crate) mod "))
                    && next.ends_with('{')
            })
        {
            // Skip the module: count braces until the one it opened closes.
            let mut depth = 0i32;
            for line in lines.by_ref() {
                depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
                if depth <= 0 {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules a text names through `crate::`, including in grouped imports
/// (`use crate::{a::X, b::{Y, Z}}` names `a` and `b`).
fn named_modules(code: &str) -> BTreeSet<String> {
    names_after(code, "crate::")
}

/// The first path segments after each `prefix` (`crate::` or `super::`) in `code`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        rest = &rest[at + prefix.len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Items at depth 0 of the group, each up to its first `::`, `,` or `}`.
            let mut depth = 0;
            let mut at_item_start = true;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        if !item.is_empty() {
                            out.insert(std::mem::take(&mut item));
                        }
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_item_start = true,
                    _ => {}
                }
                if depth == 0 && at_item_start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        out.insert(std::mem::take(&mut item));
                        // An item that ends at its comma (`a, b`) is followed by another.
                        at_item_start = c == ',';
                    }
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out.remove("self");
    out
}

#[test]
fn modules_depend_only_on_layers_below_their_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let exempt = TestOnly::of(&files);
    assert!(
        exempt.contains(&src.join(TEST_SUPPORT).join("mod.rs")),
        "the test support module `{TEST_SUPPORT}` must be declared behind {:?} in lib.rs",
        TEST_GATES[1]
    );

    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut unplaced = BTreeSet::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        if exempt.contains(file) {
            continue;
        }
        if layer_of(&module).is_none() {
            unplaced.insert(module.clone());
        }
        let code = production_code(&fs::read_to_string(file).unwrap());
        for used in named_modules(&code) {
            if used != module {
                edges
                    .entry(module.clone())
                    .or_default()
                    .entry(used)
                    .or_default()
                    .insert(file.strip_prefix(&src).unwrap().display().to_string());
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules {unplaced:?} have no layer: add them to LAYERS here and to the graph in \
         docs/architecture.md"
    );

    // `LAYERING_PRINT=1 cargo test -p ambit --test layering` prints the graph for the docs.
    if std::env::var_os("LAYERING_PRINT").is_some() {
        for (module, uses) in &edges {
            let names: Vec<&str> = uses.keys().map(String::as_str).collect();
            eprintln!("| `{module}` | {} |", names.join(", "));
        }
    }

    let mut violations = Vec::new();
    for (module, uses) in &edges {
        let own = layer_of(module).unwrap();
        for (used, files) in uses {
            match layer_of(used) {
                _ if used == TEST_SUPPORT => violations.push(format!(
                    "{module} uses the test support module `{TEST_SUPPORT}` in {files:?}: it is \
                     compiled only for tests, production code must not name it"
                )),
                Some(layer) if layer < own => {}
                Some(layer) => violations.push(format!(
                    "{module} (layer {own}, {}) uses {used} (layer {layer}, {}) in {files:?}",
                    LAYERS[own].0, LAYERS[layer].0
                )),
                None => {
                    violations.push(format!("{module} uses unknown module {used} in {files:?}"))
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "module dependencies must point down the layers (docs/architecture.md):\n{}",
        violations.join("\n")
    );

    // The parser must see the edges it exists to police, or the test proves nothing.
    let seen = |from: &str, to: &str| edges.get(from).is_some_and(|u| u.contains_key(to));
    for (from, to) in [("proxy", "state"), ("discovery", "state"), ("app", "proxy")] {
        assert!(
            seen(from, to),
            "expected to find {from} -> {to}; is the parser broken?"
        );
    }
}

/// A file's module path below `src` (`hbone/pool.rs` -> `["hbone", "pool"]`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let mut path: Vec<String> = file
        .strip_prefix(src)
        .unwrap()
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_string())
        .collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

/// Within a module, its files do not use each other in a circle either (`client` -> `pool` ->
/// `client`): a shared part gets its own file both use.
#[test]
fn sibling_files_do_not_use_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let exempt = TestOnly::of(&files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&src, f)).collect();

    // parent module -> (child -> siblings it uses)
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files.iter().filter(|f| !exempt.contains(f)) {
        let path = module_path(&src, file);
        let Some((me, parent)) = path.split_last() else {
            continue;
        };
        let code = production_code(&fs::read_to_string(file).unwrap());
        let mut used = names_after(&code, "super::");
        // `crate::a::b::c` paths naming a sibling by its full path.
        let mut rest = code.as_str();
        let own_prefix = format!("crate::{}::", parent.join("::"));
        while let Some(at) = rest.find(&own_prefix).filter(|_| !parent.is_empty()) {
            rest = &rest[at + own_prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
        for sibling in used {
            let mut sibling_path = parent.to_vec();
            sibling_path.push(sibling.clone());
            if &sibling != me && modules.contains(&sibling_path) {
                graphs
                    .entry(parent.to_vec())
                    .or_default()
                    .entry(me.clone())
                    .or_default()
                    .insert(sibling);
            }
        }
    }

    let mut cycles = Vec::new();
    for (parent, graph) in &graphs {
        for start in graph.keys() {
            // Depth-first search for a path back to `start`.
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            let mut seen = BTreeSet::new();
            while let Some((node, trail)) = stack.pop() {
                for next in graph.get(&node).into_iter().flatten() {
                    if next == start {
                        cycles.push(format!(
                            "{}: {} -> {start}",
                            parent.join("::"),
                            trail.join(" -> ")
                        ));
                    } else if seen.insert(next.clone()) {
                        let mut longer = trail.clone();
                        longer.push(next.clone());
                        stack.push((next.clone(), longer));
                    }
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "files of one module use each other in a circle:\n{}",
        cycles.join("\n")
    );
    let edges: usize = graphs
        .values()
        .flat_map(|g| g.values())
        .map(BTreeSet::len)
        .sum();
    assert!(
        edges > 10,
        "only {edges} sibling edges found; is the parser broken?"
    );
}

#[test]
fn the_parser_sees_grouped_and_plain_paths_and_skips_tests() {
    let code = production_code(
        "use crate::{a::X, b::{c::Y, Z}, self};\n\
         fn f() { crate::d::g(); ambit::crate_like(); }\n\
         // crate::commented::out\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::hidden;\n    fn t() { if true { } }\n}\n\
         fn after() { crate::e::h() }\n",
    );
    let names: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(names, ["a", "b", "d", "e"]);
    // A plain item ending at its comma is followed by another item.
    let names: Vec<String> = names_after("use super::{A, b::C, d};", "super::")
        .into_iter()
        .collect();
    assert_eq!(names, ["A", "b", "d"]);

    // Both gates make test code; another cfg does not.
    let lib = "pub mod app;\n#[cfg(test)]\nmod unit;\n#[cfg(any(test, feature = \"testing\"))]\n\
               pub mod testing;\n#[cfg(feature = \"jemalloc\")]\nmod alloc;\n";
    assert_eq!(gated_modules(lib), ["unit", "testing"]);
    let code = production_code(
        "#[cfg(any(test, feature = \"testing\"))]\nmod helpers {\n    use crate::hidden;\n}\n\
         fn f() { crate::testing::ca::TestCa::new(\"x\"); }\n",
    );
    let names: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(
        names,
        [TEST_SUPPORT],
        "a production use of test support must be seen"
    );
}
