//! `tollgate policy test|check|eval`: what a compliance team runs on the policy folder.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{Action, Compiled};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Compile every policy file and run its own must-block and must-pass examples.
    Test {
        /// The policy folder (default: the one in the configuration).
        dir: Option<PathBuf>,
    },
    /// Screen one text: verdict, category, rule and the matched span after normalization.
    Check {
        text: String,
        #[arg(long)]
        set: Option<String>,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Score the policies on a labelled JSONL file ({"text", "labels", "source"}).
    Eval {
        file: PathBuf,
        #[arg(long)]
        set: Option<String>,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Write every disagreement (missed harmful rows, blocked benign rows) to this JSONL file.
        #[arg(long)]
        misses: Option<PathBuf>,
        /// With --misses: also write every caught harmful row (to weigh each rule's hits).
        #[arg(long)]
        all_hits: bool,
    },
}

/// Print a report line. A closed pipe (`tollgate policy eval ... | head`) ends the process
/// quietly, as Unix tools do, instead of panicking.
fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error writing the report: {e}");
    }
}

pub fn run(cmd: PolicyCommand, default_dir: &Path) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Test { dir } => {
            let dir = dir.unwrap_or_else(|| default_dir.to_path_buf());
            match Compiled::load(&dir) {
                Ok(c) => {
                    for f in &c.files {
                        say(&format!("ok    {}", f.display()));
                    }
                    say(&format!("{} passed, 0 failed", c.files.len()));
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        say(&format!("FAIL  {e}"));
                    }
                    say(&format!("0 passed, {} failed", errors.len()));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Check { text, set, dir } => {
            let c = load(dir.as_deref().unwrap_or(default_dir))?;
            let set = set.unwrap_or_else(|| c.default_set.clone());
            let v = c.screen(&text, &set);
            say(&format!("verdict:    {}", v.action.as_str()));
            say(&format!("set:        {set}"));
            say(&format!("normalized: {}", v.normalized));
            for h in &v.hits {
                say(&format!(
                    "hit:        {} / {} ({}) at {}..{}: {:?}",
                    h.category,
                    h.rule,
                    h.action.as_str(),
                    h.start,
                    h.end,
                    h.matched
                ));
            }
            Ok(if v.action == Action::Block {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCommand::Eval {
            file,
            set,
            dir,
            misses,
            all_hits,
        } => {
            let c = load(dir.as_deref().unwrap_or(default_dir))?;
            let set = set.unwrap_or_else(|| c.default_set.clone());
            eval(&c, &file, &set, misses.as_deref(), all_hits)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(dir: &Path) -> anyhow::Result<Compiled> {
    Compiled::load(dir).map_err(|errs| {
        anyhow::anyhow!(
            "policies refused:\n{}",
            errs.iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

const SEVERE: &[&str] = &[
    "csam_grooming",
    "human_trafficking",
    "terrorism_extremism",
    "self_harm",
    "malware_cyber",
    "jailbreak_injection",
];

#[derive(Default)]
struct Count {
    tp: u64,
    fp: u64,
    fn_: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

fn eval(
    c: &Compiled,
    file: &Path,
    set: &str,
    misses: Option<&Path>,
    all_hits: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let f = std::fs::File::open(file)?;
    let mut misses = match misses {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let mut per_cat: std::collections::BTreeMap<String, Count> = Default::default();
    let mut per_source: std::collections::BTreeMap<String, (u64, u64, u64, u64)> =
        Default::default(); // harmful, caught, benign, flagged
    let (mut harmful, mut caught, mut i2p, mut i2p_caught) = (0u64, 0u64, 0u64, 0u64);
    let (mut benign, mut benign_blocked) = (0u64, 0u64);
    let mut severe: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    let mut bytes = 0usize;
    let mut elapsed = std::time::Duration::ZERO;
    let mut rows = 0u64;
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line)?;
        let text = row["text"].as_str().unwrap_or_default();
        let source = row["source"].as_str().unwrap_or("unknown").to_string();
        let labels: Vec<String> = row["labels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let t = std::time::Instant::now();
        let v = c.screen(text, set);
        elapsed += t.elapsed();
        bytes += text.len();
        rows += 1;
        let blocked = v.action == Action::Block;
        let cats: std::collections::BTreeSet<String> = v
            .hits
            .iter()
            .filter(|h| h.action == Action::Block)
            .map(|h| h.category.clone())
            .collect();
        let is_benign = labels.iter().all(|l| l == "benign");
        if let Some(w) = misses.as_mut()
            && (is_benign == blocked || (blocked && all_hits))
        {
            let hits: Vec<String> = v
                .hits
                .iter()
                .map(|h| format!("{}:{}:{}", h.rule, h.action.as_str(), h.matched))
                .collect();
            writeln!(
                w,
                "{}",
                serde_json::json!({"kind": if !blocked { "missed" } else if is_benign { "false_block" } else { "caught" }, "labels": labels, "source": source, "hits": hits, "text": text})
            )?;
        }
        let entry = per_source.entry(source.clone()).or_default();
        if is_benign {
            benign += 1;
            entry.2 += 1;
            if blocked {
                benign_blocked += 1;
                entry.3 += 1;
            }
        } else if source == "i2p_hard" {
            i2p += 1;
            i2p_caught += u64::from(blocked);
        } else {
            harmful += 1;
            caught += u64::from(blocked);
            entry.0 += 1;
            entry.1 += u64::from(blocked);
        }
        for cat in &c.categories {
            let labelled = labels.iter().any(|l| l == cat);
            let predicted = cats.contains(cat);
            let e = per_cat.entry(cat.clone()).or_default();
            match (labelled, predicted) {
                (true, true) => e.tp += 1,
                (false, true) => e.fp += 1,
                (true, false) => e.fn_ += 1,
                _ => {}
            }
        }
        if source != "i2p_hard" {
            for s in SEVERE {
                if labels.iter().any(|l| l == s) {
                    let e = severe.entry(s).or_default();
                    e.0 += 1;
                    e.1 += u64::from(blocked);
                }
            }
        }
    }
    say(&format!("set: {set}; rows: {rows}"));
    say(&format!(
        "harmful recall (any block, i2p_hard apart): {:.3} ({caught}/{harmful})",
        ratio(caught, harmful)
    ));
    say(&format!(
        "i2p_hard recall: {:.3} ({i2p_caught}/{i2p})",
        ratio(i2p_caught, i2p)
    ));
    say(&format!(
        "benign blocked (FPR): {:.3} ({benign_blocked}/{benign})",
        ratio(benign_blocked, benign)
    ));
    say("\nsevere categories (recall, any block):");
    for (s, (n, k)) in &severe {
        say(&format!("  {s:<22} {:.3} ({k}/{n})", ratio(*k, *n)));
    }
    say("\nper category (block on that category):");
    say("  category               precision  recall  f1");
    for (cat, e) in &per_cat {
        let p = ratio(e.tp, e.tp + e.fp);
        let r = ratio(e.tp, e.tp + e.fn_);
        let f1 = if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            f64::NAN
        };
        say(&format!("  {cat:<22} {p:>9.3}  {r:>6.3}  {f1:.3}"));
    }
    say("\nper source (harmful recall; benign FPR):");
    for (src, (h, k, b, fl)) in &per_source {
        say(&format!(
            "  {src:<40} recall {:>6.3} ({k}/{h})   fpr {:>6.3} ({fl}/{b})",
            ratio(*k, *h),
            ratio(*fl, *b)
        ));
    }
    let secs = elapsed.as_secs_f64();
    say(&format!(
        "\nthroughput: {:.1} MB/s, {:.0} prompts/s (one core, screening only)",
        bytes as f64 / secs / 1e6,
        rows as f64 / secs
    ));
    Ok(())
}
