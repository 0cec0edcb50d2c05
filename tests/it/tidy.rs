//! House rules checked as tests: every source file says what it is for in a `//!` line, and no
//! stub (`todo!`, `unimplemented!`) is left in the gateway or the plugins.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_starts_with_a_doc_line_and_nothing_is_stubbed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("plugins"), &mut files);
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Fragments pulled in with `include!` cannot carry inner doc comments.
        let fragment = f
            .parent()
            .is_some_and(|p| p.ends_with("plugins/testguests"));
        if !fragment && !text.starts_with("//!") {
            problems.push(format!("{}: first line is not a //! doc line", f.display()));
        }
        for stub in ["todo!(", "unimplemented!("] {
            if text.contains(stub) {
                problems.push(format!("{}: contains {stub}", f.display()));
            }
        }
    }
    assert!(files.len() > 30, "found only {} files", files.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
