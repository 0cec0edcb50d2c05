//! Build script of the gateway: builds the bundled plugins (`plugins/`, a separate Cargo workspace)
//! for `wasm32-wasip2` and embeds the bundled ones into the binary.
//!
//! Writes `$OUT_DIR/bundled_plugins.rs` (`BUNDLED: &[(&str, &[u8])]`) and exports
//! `TOLLGATE_PLUGIN_ARTIFACTS`, the folder holding every built component (the test guests too).

#![allow(
    clippy::print_stdout,
    clippy::disallowed_methods,
    reason = "a build script talks to cargo on stdout and reads cargo's environment"
)]

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Plugins compiled into the gateway binary.
const BUNDLED: &[&str] = &[
    "demo",
    "openai",
    "azure",
    "elevenlabs",
    "anthropic",
    "replicate",
    "bfl",
    "gemini",
    "policy_secrets",
];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let plugins = root.join("plugins");
    for dir in [
        "wit",
        "sdk",
        "demo",
        "openai",
        "azure",
        "elevenlabs",
        "anthropic",
        "replicate",
        "bfl",
        "gemini",
        "policy_secrets",
        "policy_scorer",
        "testguests",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        // Relative to the package root: several checkouts may share one target folder, and an
        // absolute path would make cargo look at the checkout that last ran this script.
        println!("cargo:rerun-if-changed=plugins/{dir}");
    }
    let target_dir = plugins.join("target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(plugins.join("Cargo.toml"))
    .env("CARGO_TARGET_DIR", &target_dir);
    // The outer build's settings are not the plugins' (clippy wrapper, host rustflags, target).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "building the bundled plugins failed ({s}). Is the target installed? Run `rustup target add wasm32-wasip2`."
        )),
        Err(e) => fail(&format!("could not run cargo to build the plugins: {e}")),
    }
    let artifacts = target_dir.join("wasm32-wasip2").join("release");
    println!(
        "cargo:rustc-env=TOLLGATE_PLUGIN_ARTIFACTS={}",
        artifacts.display()
    );
    let mut code = String::from(
        "/// Bundled plugins: (name, component bytes).\npub static BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for name in BUNDLED {
        // Checkouts sharing one target directory share this script's compiled binary (cargo
        // keys it by the path inside the package), so it may run for a checkout that predates
        // a plugin: a plugin whose crate is absent there is not bundled, and cargo says so.
        if !plugins.join(name).join("Cargo.toml").exists() {
            println!(
                "cargo:warning=bundled plugin `{name}` has no crate in this checkout's plugins/; not bundled"
            );
            continue;
        }
        let file = artifacts.join(format!("{name}.wasm"));
        if !file.exists() {
            fail(&format!(
                "bundled plugin `{}` was not built",
                file.display()
            ));
        }
        code.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            file.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    if let Err(e) = std::fs::write(out.join("bundled_plugins.rs"), code) {
        fail(&format!("writing bundled_plugins.rs: {e}"));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
