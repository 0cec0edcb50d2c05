//! The official `openai` Python SDK against the real `tollgate serve` binary (embedded defaults,
//! ports overridden to 0 through the environment), streamed and not.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the gateway when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn openai_python_sdk_streamed_and_not() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import openai"]).status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "the `openai` Python package is required: pip install openai (.ci/run installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    // The operator's first minutes, with the CLI on the same (embedded-default) database.
    let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(dir.path())
            .env("TOLLGATE__MODERATION__POLICIES_DIR", policies)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    cli(&["accounts", "create", "sdk-test"]);
    cli(&["credits", "add", "sdk-test", "1.00"]);
    let key = cli(&["keys", "create", "--account", "sdk-test", "--name", "sdk"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .current_dir(dir.path())
            .env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE__OPERATOR__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE__LOG__JSON", "true")
            .env("TOLLGATE__MODERATION__POLICIES_DIR", policies)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tollgate starts"),
    );
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60).saturating_sub(started.elapsed()))
            .expect("tollgate reports where it listens");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "tollgate is serving" {
            break v["fields"]["public_addr"].as_str().unwrap().to_string();
        }
    };
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/test_openai_sdk.py"
    );
    let status = Command::new(&python)
        .arg(script)
        .env("TOLLGATE_BASE_URL", format!("http://{addr}/v1"))
        .env("TOLLGATE_API_KEY", &key)
        .status()
        .unwrap();
    assert!(status.success(), "the openai SDK checks failed");
    // Three billed completions, two billed embeddings, one billed image and two billed speeches:
    // the ledger holds the credit and eight charges, and sums to the balance.
    let ledger = cli(&["credits", "ledger", "--account", "sdk-test"]);
    let entries = ledger.as_array().unwrap();
    let charges = entries.iter().filter(|e| e["kind"] == "charge").count();
    assert_eq!(charges, 8, "{ledger}");
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    let account = cli(&["credits", "show", "sdk-test"]);
    assert_eq!(account["balance"].as_i64().unwrap(), sum);
}
