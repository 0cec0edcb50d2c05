//! Picks the weights file embedded in the plugin: `weights.bin` next to this file (trained on
//! every dev row), or the file `POLICY_SCORER_WEIGHTS` names (a fold's weights, to measure the
//! scorer on rows it was not trained on; see `train/heldout.sh`).

#![allow(
    clippy::print_stdout,
    clippy::disallowed_methods,
    reason = "a build script talks to cargo on stdout and reads cargo's environment"
)]

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=POLICY_SCORER_WEIGHTS");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let src = match std::env::var("POLICY_SCORER_WEIGHTS") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => root.join("weights.bin"),
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    if let Err(e) = std::fs::copy(&src, out.join("weights.bin")) {
        eprintln!("error: reading the scorer weights {}: {e}", src.display());
        std::process::exit(1);
    }
}
