//! The plugin kit: `plugin check` passes every bundled provider and fails misbehaving guests with
//! a reason; `plugin new` writes a crate that passes its own tests, builds for wasm32-wasip2 and
//! passes `plugin check` with its samples.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tollgate::kit::check::{Outcome, Report};

use crate::common::artifact;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn plugins_config() -> tollgate::config::PluginsConfig {
    tollgate::config::PluginsConfig {
        dir: PathBuf::from("/nonexistent-tollgate-plugin-dir"),
        bundled: false,
        memory_limit_bytes: 64 * 1024 * 1024,
        call_timeout: Duration::from_millis(100),
        max_instances: 8,
        watch: false,
        reuse: tollgate::config::PluginReuse::default(),
    }
}

fn check(name: &str) -> Report {
    let (described, report) = tollgate::kit::check_file(&plugins_config(), &artifact(name), None)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(described.name(), name);
    report
}

fn failed<'a>(report: &'a Report, check: &str) -> &'a str {
    let f = report
        .findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no check `{check}` in:\n{}", report.render()));
    assert_eq!(f.outcome, Outcome::Fail, "{}", report.render());
    &f.reason
}

/// Policy components are vetted too: what they describe, and ordinary prompts screened within
/// the call's limits, none blocked.
#[test]
fn policy_plugins_are_checked_as_policies() {
    for name in ["policy_secrets", "policy_scorer"] {
        let (described, report) =
            tollgate::kit::check_file(&plugins_config(), &artifact(name), None).unwrap();
        assert!(
            matches!(&described, tollgate::kit::Described::Policy { categories, .. } if !categories.is_empty()),
            "{name}: {described:?}"
        );
        assert!(report.passed(), "{name}:\n{}", report.render());
        for check in [
            "describe: version",
            "describe: categories",
            "screen: a plain question",
            "screen: an empty prompt",
            "screen: non-Latin text",
            "screen: a 64 KiB prompt",
        ] {
            assert!(
                report
                    .findings
                    .iter()
                    .any(|f| f.check == check && f.outcome == Outcome::Pass),
                "{name}: `{check}` did not pass:\n{}",
                report.render()
            );
        }
    }
    // One that blocks ordinary prompts, with a made-up version and an undeclared category, fails.
    let (_, report) =
        tollgate::kit::check_file(&plugins_config(), &artifact("tg_overzealous"), None).unwrap();
    assert!(!report.passed());
    assert!(failed(&report, "describe: version").contains("not a semantic version"));
    assert!(failed(&report, "screen: a plain question").contains("blocked an ordinary prompt"));
    assert!(failed(&report, "screen: an empty prompt").contains("`undeclared`"));
    // A file that is no component is refused with a load error, not checked.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let e = tollgate::kit::check_file(&plugins_config(), &junk, None).unwrap_err();
    assert!(matches!(e, tollgate::kit::CheckError::Load(_)), "{e}");
}

#[test]
fn every_bundled_provider_passes() {
    for name in [
        "demo",
        "openai",
        "azure",
        "elevenlabs",
        "anthropic",
        "gemini",
        "replicate",
        "bfl",
    ] {
        let report = check(name);
        assert!(report.passed(), "{name}:\n{}", report.render());
        // Every plugin gets the checks that apply to it, not just the manifest's.
        assert!(report.findings.len() >= 5, "{name}:\n{}", report.render());
    }
    // What an OpenAI-compatible plugin is checked on, at least.
    let report = check("openai");
    for name in [
        "chat: build_request",
        "chat: OpenAI-shaped answer",
        "chat: unusable answers",
        "chat: upstream errors",
        "chat: retry hint",
        "chat: OpenAI-shaped stream",
        "chat: unusable events",
        "embedding: build_request",
        "speech: upstream errors",
        "models: build_models_request",
    ] {
        let f = report.findings.iter().find(|f| f.check == name);
        assert!(
            f.is_some_and(|f| f.outcome == Outcome::Pass),
            "{name}:\n{}",
            report.render()
        );
    }
    let text = report.render();
    assert!(
        text.contains("POST https://upstream.invalid/v1/chat/completions"),
        "{text}"
    );
}

#[test]
fn a_plugin_of_another_wire_format_is_checked_with_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anthropic");
    std::fs::copy(fixtures.join("message.json"), dir.path().join("chat.json")).unwrap();
    std::fs::copy(
        fixtures.join("message_stream.sse"),
        dir.path().join("chat.sse"),
    )
    .unwrap();
    let (_, report) =
        tollgate::kit::check_file(&plugins_config(), &artifact("anthropic"), Some(dir.path()))
            .unwrap();
    assert!(report.passed(), "{}", report.render());
    for name in [
        "chat: sample answer (chat.json)",
        "chat: sample stream (chat.sse)",
    ] {
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.check == name && f.outcome == Outcome::Pass),
            "{name}:\n{}",
            report.render()
        );
    }
    // The same samples are not OpenAI's: the openai plugin cannot translate them.
    let (_, report) =
        tollgate::kit::check_file(&plugins_config(), &artifact("openai"), Some(dir.path()))
            .unwrap();
    assert!(!report.passed(), "{}", report.render());
    failed(&report, "chat: sample answer (chat.json)");
    failed(&report, "chat: sample stream (chat.sse)");
}

#[test]
fn misbehaving_guests_fail_with_a_reason() {
    let report = check("tg_panicky");
    assert!(
        failed(&report, "chat: build_request").contains("trap"),
        "{}",
        report.render()
    );
    assert!(failed(&report, "chat: streamed build_request").contains("trap"));

    let report = check("tg_garbage");
    assert!(
        failed(&report, "chat: build_request").contains("invalid HTTP method"),
        "{}",
        report.render()
    );
    // It answers every upstream status with text, as if it had succeeded.
    let errors = failed(&report, "chat: upstream errors");
    assert!(
        errors.contains("429 was not reported as an error")
            && errors.contains("500 was not reported as an error"),
        "{errors}"
    );

    let report = check("tg_spin");
    assert!(
        failed(&report, "chat: build_request").contains("CPU time"),
        "{}",
        report.render()
    );

    // The CLI prints each check and exits non-zero.
    let out = tollgate()
        .args(["plugin", "check"])
        .arg(artifact("tg_garbage"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tg_garbage 0.1.0") && text.contains("FAIL  chat: build_request"),
        "{text}"
    );
}

#[test]
fn plugin_check_on_a_bundled_plugin_exits_zero() {
    let out = tollgate()
        .args(["plugin", "check"])
        .arg(artifact("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("PASS  chat: offline stream"), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[test]
fn plugin_new_refuses_bad_names_and_existing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk");
    for bad in ["My-Plugin", "9lives", "self"] {
        let out = tollgate()
            .args(["plugin", "new", bad, "--dir"])
            .arg(dir.path())
            .arg("--sdk")
            .arg(&sdk)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad) && err.contains("name"), "{err}");
    }
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    std::fs::write(dir.path().join("taken/keep.txt"), "mine").unwrap();
    let out = tollgate()
        .args(["plugin", "new", "taken", "--dir"])
        .arg(dir.path())
        .arg("--sdk")
        .arg(&sdk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read_dir(dir.path().join("taken")).unwrap().count(),
        1,
        "nothing written into an existing folder"
    );
    // Outside any checkout and without --sdk: told what to pass.
    let out = tollgate()
        .args(["plugin", "new", "lonely", "--dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sdk"));
    assert!(!dir.path().join("lonely").exists());
    // A folder that is not the SDK is refused.
    let out = tollgate()
        .args(["plugin", "new", "wrong", "--dir"])
        .arg(dir.path())
        .arg("--sdk")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the plugin SDK"));
}

/// `cargo` for the scaffolded crate: the plugins workspace's target folder (the crate gets the
/// workspace's `Cargo.lock` and release profile, so a warm build reuses every dependency), and
/// none of the outer build's settings.
fn cargo(dir: &Path) -> Command {
    let plugins_target = Path::new(env!("TOLLGATE_PLUGIN_ARTIFACTS"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf();
    #[allow(
        clippy::disallowed_methods,
        reason = "a test runs the cargo that runs it"
    )]
    let program = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).env("CARGO_TARGET_DIR", plugins_target);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Slow (the new crate compiles twice, for the host and for wasm32-wasip2): what a contributor
/// does first, end to end.
#[test]
fn plugin_new_builds_passes_its_tests_and_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk");
    run(tollgate()
        .args(["plugin", "new", "acme_llm", "--dir"])
        .arg(dir.path())
        .arg("--sdk")
        .arg(&sdk));
    let krate = dir.path().join("acme_llm");
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "src/lib.rs",
        "samples/chat.json",
        "samples/chat.sse",
    ] {
        assert!(krate.join(file).is_file(), "{file}");
    }
    let tests = run(cargo(&krate).args(["test", "--quiet"]));
    assert!(tests.contains("5 passed"), "{tests}");
    run(cargo(&krate).args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"]));
    let wasm = Path::new(env!("TOLLGATE_PLUGIN_ARTIFACTS")).join("acme_llm.wasm");
    let out = tollgate()
        .args(["plugin", "check"])
        .arg(&wasm)
        .arg("--samples")
        .arg(krate.join("samples"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "PASS  chat: sample answer (chat.json)",
        "PASS  chat: sample stream (chat.sse)",
        "PASS  chat: upstream errors",
        "PASS  chat: unusable answers",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    assert!(!text.contains("WARN"), "{text}");
    let _ = std::fs::remove_file(wasm);
}
